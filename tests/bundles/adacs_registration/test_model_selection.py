"""Issue 17, AdaCS point 5: ``--model_selection last`` (the authors' protocol) saves the last epoch's weights as
``models/model.pt``, ``best_val`` (default) the weights of the best validation Dice; ``baseline_protocol.json``
parses and sets the authors' baseline protocol."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
              pytest.mark.usefixtures("one_torch_thread")]


def _train(adacs, root, selection: str, monkeypatch, env) -> tuple[dict, list[float], list[dict]]:
    """One tiny in-process training of the bundle; per epoch the validation Dice and a copy of the weights."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    monkeypatch.setenv("CARDIAC_DATA_DIR", env["CARDIAC_DATA_DIR"])
    nets = {**{k: json.loads(v) for k, v in adacs.TINY_NETS.items()}, "spatial_size": [32, 32]}
    # a large learning rate makes the validation Dice go down after its best epoch, so "best" and "last" differ
    wf = ConfigWorkflow(config_file=str(adacs.CONFIGS / "train.json"), meta_file=str(adacs.CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type="train", **nets,
                        dataset_kind="registration", method="plain", epochs=4, batch_size=4, learning_rate=0.05,
                        torch_threads=1, bundle_root=str(root), output_dir=str(root / "eval"),
                        model_selection=selection)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    dice, weights = [], []

    @trainer.on(Events.EPOCH_COMPLETED)  # attached last: runs after validation and the model savers
    def _record(engine):
        dice.append(float(evaluator.state.metrics["val_dice"]))
        weights.append({k: v.detach().clone() for k, v in trainer.network.state_dict().items()})

    wf.run()
    wf.finalize()
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    return saved, dice, weights


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_last_and_best_val_selection(adacs_env, adacs, tmp_path, monkeypatch):
    last, dice, weights = _train(adacs, tmp_path / "last", "last", monkeypatch, adacs_env)
    best, dice_b, weights_b = _train(adacs, tmp_path / "best", "best_val", monkeypatch, adacs_env)
    assert dice == dice_b and all(_same(a, b) for a, b in zip(weights, weights_b))  # one deterministic trajectory
    best_epoch = max(range(len(dice)), key=lambda i: (dice[i], -i))  # the first epoch with the highest Dice
    assert best_epoch != len(dice) - 1, f"validation Dice {dice}: the best epoch is the last, nothing to tell apart"
    assert not _same(weights[best_epoch], weights[-1])
    assert _same(last, weights[-1])
    assert _same(best, weights[best_epoch])


def test_baseline_protocol_preset_parses(adacs_env, adacs, monkeypatch, tmp_path):
    from monai.bundle import ConfigParser

    from common.engines.registration import LastEpochModelSaver

    monkeypatch.setenv("CARDIAC_DATA_DIR", adacs_env["CARDIAC_DATA_DIR"])
    parser = ConfigParser()
    parser.read_config([str(adacs.CONFIGS / "train.json"), str(adacs.CONFIGS / "baseline_protocol.json")])
    # building the handlers creates their folders (TensorBoard): keep them out of the repository
    parser.update({"method": "plain", "bundle_root": str(tmp_path), "output_dir": str(tmp_path / "eval"),
                   **{k: json.loads(v) for k, v in adacs.TINY_NETS.items()}})
    assert (parser["epochs"], parser["learning_rate"], parser["model_selection"]) == (150, 1e-4, "last")
    saver = next(h for h in parser.get_parsed_content("train#handlers") if isinstance(h, LastEpochModelSaver))
    assert saver.model_selection == "last"
    assert parser.get_parsed_content("optimizer").param_groups[0]["lr"] == 1e-4
    assert parser.get_parsed_content("train#trainer").state.max_epochs == 150
    # the best-Dice saver of validation is off, so nothing else writes model.pt
    assert not parser.get_parsed_content("validate#handlers")[-1]._key_metric_checkpoint
    with pytest.raises(ValueError, match="model_selection must be one of.*'best'"):
        LastEpochModelSaver(".", torch.nn.Linear(1, 1), "best")


def test_compare_protocols_train_each_method_as_documented(adacs_env, adacs, monkeypatch):
    from monai.bundle import ConfigParser

    from tools.adacs_compare import method_run_config

    monkeypatch.setenv("CARDIAC_DATA_DIR", adacs_env["CARDIAC_DATA_DIR"])

    def parsed(protocol, method, overrides=None, method_overrides=None):
        files, ov = method_run_config(protocol, method, overrides, method_overrides)
        parser = ConfigParser()
        parser.read_config([str(adacs.CONFIGS / f) for f in ("train.json", *files)])
        parser.update({"method": method, **ov})
        return tuple(parser.get_parsed_content(k) for k in ("epochs", "learning_rate", "model_selection"))

    # the authors' protocol: baselines 150 epochs at 1e-4, AdaCS its preset (ACDC layout: 2e-4); all keep the last epoch
    assert parsed("authors", "plain") == (150, 1e-4, "last")
    assert parsed("authors", "adareg") == (150, 1e-4, "last")
    assert parsed("authors", "adacs") == (340, 2e-4, "last")
    # "same": every method with AdaCS's preset and the best validation Dice
    assert parsed("same", "plain") == (340, 2e-4, "best_val")
    # overrides win over the protocol; method_overrides over both, for that method only
    assert parsed("authors", "plain", {"epochs": 30}) == (30, 1e-4, "last")
    assert parsed("authors", "nll", {"epochs": 30}, {"nll": {"epochs": 200}}) == (200, 1e-4, "last")
    assert parsed("authors", "plain", {"epochs": 30}, {"nll": {"epochs": 200}})[0] == 30
    with pytest.raises(ValueError, match="protocol must be one of"):
        method_run_config("paper", "plain")
    with pytest.raises(ValueError, match="unknown methods.*'nl'"):
        method_run_config("authors", "plain", None, {"nl": {"epochs": 1}})
