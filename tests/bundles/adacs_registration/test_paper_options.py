"""Bundle wiring of issue 17's AdaCS options: ``m_T`` logged per epoch (point 1), ``--mask_binarization`` (point 2)
and ``--regularization velocity`` (point 4). The behaviour itself is tested in ``tests/common``; here: the configs
reach it, with the documented defaults."""

from __future__ import annotations

import csv
import json

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")


def test_training_logs_the_momentum_weight_per_epoch(trained_bundle):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = trained_bundle / "eval"
    records = json.loads((out / "train_metrics.json").read_text())["epochs"]
    state = torch.load(trained_bundle / "models" / "checkpoint.pt", weights_only=True)
    assert [r["epoch"] for r in records] == [1]
    assert records[-1]["tv_weight"] == pytest.approx(state["momentum"]["m"], abs=1e-12)
    # the bundle's scaled form: m after one epoch is well below the paper form's ≈ 1 (realistic residuals)
    assert 0.0 <= records[-1]["tv_weight"] < 0.99 and 0.0 < records[-1]["momentum_mu"] < 0.05
    acc = EventAccumulator(str(out))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value, abs=1e-6)) for e in acc.Scalars("tv_weight")] == [
        (1, records[-1]["tv_weight"])]


def test_evaluation_binarization_option(trained_bundle, adacs_env, adacs, tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    # in this process (the CLI path of evaluate.json has its own test): two evaluations of one trained model
    monkeypatch.setenv("CARDIAC_DATA_DIR", adacs_env["CARDIAC_DATA_DIR"])
    nets = {k: json.loads(v) for k, v in adacs.TINY_NETS.items()}
    reports, dice = {}, {}
    for mode in ("any", "argmax"):
        out = tmp_path / mode
        wf = ConfigWorkflow(config_file=[str(adacs.CONFIGS / f) for f in ("train.json", "evaluate.json")],
                            meta_file=str(adacs.CONFIGS / "metadata.json"), logging_file=False, workflow_type="train",
                            **nets, bundle_root=str(trained_bundle), output_dir=str(out), mask_binarization=mode)
        wf.initialize()
        wf.run()
        wf.finalize()
        reports[mode] = json.loads((out / "metrics.json").read_text())
        dice[mode] = {r["pair"]: (float(r["dice"]), float(r["dice_identity"]))
                      for r in csv.DictReader(open(out / "per_pair.csv"))}
    assert reports["any"]["mask_binarization"] == "any" and reports["argmax"]["mask_binarization"] == "argmax"
    assert dice["any"].keys() == dice["argmax"].keys()
    # same pairs and displacements (identity Dice unchanged), different warped masks
    assert all(dice["any"][p][1] == dice["argmax"][p][1] for p in dice["any"])
    assert any(abs(dice["any"][p][0] - dice["argmax"][p][0]) > 1e-6 for p in dice["any"])


def test_config_switches_reach_the_trainer(adacs_env, adacs, monkeypatch, tmp_path):
    from monai.bundle import ConfigParser

    monkeypatch.setenv("CARDIAC_DATA_DIR", adacs_env["CARDIAC_DATA_DIR"])
    parser = ConfigParser()
    parser.read_config(str(adacs.CONFIGS / "train.json"))
    assert (parser["regularization"], parser["mask_binarization"]) == ("displacement", "argmax")  # ours by default
    momentum = parser.get_parsed_content("momentum")
    assert (momentum.residual_scale, momentum.clip, momentum.average) == (100.0, True, "epoch")
    assert parser["momentum_residual"] == "weighted"
    # output and checkpoint folders in tmp_path: building the trainer creates its TensorBoard writers
    parser.update({"output_dir": str(tmp_path / "eval"), "ckpt_dir": str(tmp_path / "models"),
                   "regularization": "velocity", "network_def#estimator#half_res": True, "epochs": 1,
                   **{k: json.loads(v) for k, v in adacs.TINY_NETS.items()}})
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.regularization == "velocity" and trainer.velocity_mult == 2.0
    assert trainer.momentum_residual == "weighted"
