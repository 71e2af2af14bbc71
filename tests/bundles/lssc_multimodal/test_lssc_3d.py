"""The LSSC 3D configuration of the bundle (``spatial_dims`` 3: nnFormer-style network on patches, sliding-window
inference): the ``configs/cpu_reduced_3d.json`` path (training from the command line, evaluation with the same config
files in this process) learns on the synthetic default (held-out volumes of both modalities above an untrained
network and an all-background prediction), inference writes predictions in the input geometry, and the model zoo's
checks (metadata, ``verify_net_in_out``, export) pass for the 3D configuration (``configs/metadata_3d.json`` + the
overrides of ``configs/3d.json``).

One shortened training (cpu_reduced_3d.json with ``LEARN_OVERRIDES``: one epoch, so the learning rate stays constant)
is shared by the tests of this module; the full cpu_reduced_3d run and its numbers are in the bundle README.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import BUNDLE, CONFIGS, run_cli

CFG_3D = json.loads((CONFIGS / "3d.json").read_text())
REDUCED_3D = json.loads((CONFIGS / "cpu_reduced_3d.json").read_text())
LEARN_OVERRIDES = ["--epochs", "1", "--epoch_length", "600"]
MIN_GAIN = 20.0  # Dice points above the untrained network, per modality (all background scores 0)
NET_KEYS = ("embed_dim", "num_heads", "depths", "decoder_depths", "window_size")


def _evaluate(root, env, monkeypatch, ckpt=None, out=None) -> dict:
    """``train.json + cpu_reduced_3d.json + evaluate.json`` in this process (as the CLI runs it); the metrics."""
    from monai.bundle import ConfigWorkflow

    monkeypatch.setenv("CARDIAC_DATA_DIR", env["CARDIAC_DATA_DIR"])
    out = out or root / "eval"
    extra = {} if ckpt is None else {"ckpt_path": str(ckpt)}
    wf = ConfigWorkflow(config_file=[str(CONFIGS / f) for f in ("train.json", "cpu_reduced_3d.json", "evaluate.json")],
                        logging_file=False, workflow_type="infer", bundle_root=str(root), output_dir=str(out), **extra)
    wf.initialize()
    wf.run()
    wf.finalize()
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained3d(tmp_path_factory, lssc_env):
    """Train the reduced 3D full method once from the command line; returns the bundle root."""
    root = tmp_path_factory.mktemp("lssc3d_trained")
    t0 = time.time()
    run_cli("run", ["train.json", "cpu_reduced_3d.json"], lssc_env, "--bundle_root", root, *LEARN_OVERRIDES,
            timeout=900)
    print(f"\nLSSC 3D training: {time.time() - t0:.0f} s")
    return root


@pytest.mark.slow
def test_3d_learns_above_untrained_and_all_background(trained3d, lssc_env, monkeypatch, tmp_path):
    from common.data.io import read_image
    from common.data.mmwhs import remap_mmwhs_labels
    from common.engines.lssc import InferenceWeights, lssc_network
    from common.metrics.segmentation import dice_per_class

    state = torch.load(trained3d / "models" / "model.pt", weights_only=True)
    assert state and not any(k.startswith("eams.") for k in state)  # the EAM-free inference network
    metrics = _evaluate(trained3d, lssc_env, monkeypatch)
    m = metrics["metrics"]
    assert metrics["table2"]["dice"]["ct"]["n_cases"] == 4 and metrics["table2"]["dice"]["mr"]["n_cases"] == 4

    torch.manual_seed(0)
    net = lssc_network("full", ["ct", "mr"], for_inference=True, spatial_dims=3, in_channels=1, num_classes=5,
                       img_size=REDUCED_3D["spatial_size"], **{k: REDUCED_3D[k] for k in NET_KEYS})
    ckpt = tmp_path / "untrained.pt"
    torch.save(InferenceWeights(net).state_dict(), ckpt)
    broken = _evaluate(trained3d, lssc_env, monkeypatch, ckpt=ckpt, out=tmp_path / "eval_untrained")["metrics"]
    print(f"\nLSSC 3D held-out Dice %: CT {m['dice_ct']:.1f}, MRI {m['dice_mr']:.1f} "
          f"(untrained {broken['dice_ct']:.1f}, {broken['dice_mr']:.1f}); "
          f"ASD mm CT {m.get('asd_ct', float('nan')):.2f}, MRI {m.get('asd_mr', float('nan')):.2f}")
    for mod in ("ct", "mr"):
        assert m[f"dice_{mod}"] >= broken[f"dice_{mod}"] + MIN_GAIN, (mod, m, broken)

    # an all-background prediction scores 0 on every structure of a held-out volume of each modality
    data = lssc_env["CARDIAC_DATA_DIR"] + "/mmwhs-seed0"
    for mod in ("ct", "mr"):
        case = next(r["case"] for r in metrics["per_case"] if r["modality"] == mod)
        label = remap_mmwhs_labels(read_image(f"{data}/{mod}_train/{case}_label.nii.gz").array)
        np.testing.assert_array_equal(dice_per_class(np.zeros_like(label), label, 5), 0.0)


@pytest.mark.slow
def test_3d_inference_writes_predictions_in_the_input_geometry(trained3d, lssc_env, monkeypatch, tmp_path):
    """Sliding-window inference of a whole held-out volume (not a multiple of the window) back on the file's grid."""
    import nibabel as nib
    from monai.bundle import ConfigWorkflow

    from common.data.mmwhs import remap_mmwhs_labels
    from common.metrics.segmentation import dice_per_class

    monkeypatch.setenv("CARDIAC_DATA_DIR", lssc_env["CARDIAC_DATA_DIR"])
    data = lssc_env["CARDIAC_DATA_DIR"] + "/mmwhs-seed0"
    image_path = sorted(Path(data).glob("mr_train/*_image.nii.gz"))[-1]
    out = tmp_path / "out"
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "cpu_reduced_3d.json")],
                        logging_file=False, workflow_type="infer", bundle_root=str(trained3d), output_dir=str(out),
                        input_path=str(image_path))
    wf.initialize()
    wf.run()
    wf.finalize()
    pred_file = out / "predictions" / image_path.name.replace("_image.nii.gz", "_image_seg.nii.gz")
    image, pred = nib.load(str(image_path)), nib.load(str(pred_file))
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    seg = np.asarray(pred.dataobj)
    label = remap_mmwhs_labels(np.asarray(nib.load(str(image_path).replace("_image", "_label")).dataobj))
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3, 4}
    assert np.nanmean(dice_per_class(seg, label, 5)[1:]) > 0.05  # the trained 3D network, not an empty map


@pytest.mark.slow
def test_model_zoo_checks_pass_for_the_3d_configuration(trained3d, tmp_path):
    """metadata_3d.json (zoo schema and the project's strict one), the inference properties, verify_net_in_out with
    default arguments on the paper-size 3D network, and the traced ckpt_export of the trained reduced 3D model."""
    from tools.check_bundle import STRICT_SCHEMA
    from tools.verify_bundle import STEPS, verify_bundle

    meta_2d = json.loads((CONFIGS / "metadata.json").read_text())
    meta_3d = json.loads((CONFIGS / "metadata_3d.json").read_text())
    # one bundle, one version: the two descriptions are bumped together
    assert meta_3d["version"] == meta_2d["version"] and meta_3d["changelog"] == meta_2d["changelog"]
    inference = json.loads((CONFIGS / "inference.json").read_text())
    overrides = {k: v for k, v in CFG_3D.items() if k in inference}  # inference.json + 3d.json
    assert overrides["spatial_dims"] == 3
    export = {k: REDUCED_3D[k] for k in (*NET_KEYS, "spatial_size")}  # the trained reduced network, traced at 32^2x16
    results = verify_bundle(BUNDLE, work_dir=tmp_path / "zoo", meta_file=CONFIGS / "metadata_3d.json",
                            overrides=overrides, export_overrides=export,
                            ckpt_file=trained3d / "models" / "model.pt")
    assert [r.step for r in results] == list(STEPS)
    failed = [str(r) for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    steps = {r.step: r for r in results}
    assert "[1, 1, 32, 32, 16]" in steps["net_in_out"].detail and "traced" in steps["export"].detail
    strict = verify_bundle(BUNDLE, work_dir=tmp_path / "strict", meta_file=CONFIGS / "metadata_3d.json",
                           steps=["metadata"], schema=STRICT_SCHEMA)
    assert strict[0].ok, strict[0]


def test_3d_benchmark_quick_size_writes_json_markdown_and_png(tmp_path):
    from tools.bench.lssc3d import run

    paths = run(out_dir=str(tmp_path), quick=True, repeats=1)
    report = json.loads(paths["json"].read_text())
    names = [r["configuration"] for r in report["rows"]]
    assert names == ["2D (Swin-Unet), slice-wise", "3D (nnFormer-style), sliding window"]
    assert all(r["cpu_s"] > 0 and r["peak_mb"] >= 0 for r in report["rows"])
    assert report["rows"][1]["calls"] == 1  # 64x64x48 = two 64x64x32 windows at 25 % overlap, 2 per call
    assert paths["md"].read_text().count("|") > 10 and paths["png"].stat().st_size > 1000
