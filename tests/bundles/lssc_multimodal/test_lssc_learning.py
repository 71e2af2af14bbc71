"""The full LSSC method learns (CLI train -> evaluate -> inference on the synthetic default), and the trained
bundle exports: verify_net_in_out, ckpt_export (TorchScript by tracing) and torch.export of the EAM-free network.

One reduced training (``configs/cpu_reduced.json``: 64x64 coronal crops at 2.4 mm, embed_dim 32, one Swin block per
stage; every LSSC part on) is shared by the tests of this module. The command and the numbers are recorded in the
bundle README.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from .conftest import CONFIGS, run_cli

# the learning-test configuration (README "Measured numbers"): the reduced CPU configuration of the bundle, with the
# paper's loss weights, optimiser and schedule; 15 x 100 iterations of one CT and one MRI batch of 8 slices
LEARN_CONFIG = CONFIGS / "cpu_reduced.json"
LEARN = json.loads(LEARN_CONFIG.read_text())
MIN_DICE = 75.0  # % mean foreground Dice per modality on the held-out volumes


@pytest.fixture(scope="module")
def learn_json():
    return LEARN_CONFIG


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lssc_env, learn_json):
    """Train and evaluate the reduced full method once from the command line; returns (bundle_root, metrics)."""
    root = tmp_path_factory.mktemp("lssc_trained")
    t0 = time.time()
    train = run_cli("run", ["train.json", learn_json], lssc_env, "--bundle_root", root, timeout=900)
    run_cli("run", ["train.json", "evaluate.json", learn_json], lssc_env, "--bundle_root", root)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    print(f"\nLSSC learning test: train {train.elapsed:.0f} s, train+evaluate {time.time() - t0:.0f} s; "
          f"Dice % CT {metrics['metrics']['dice_ct']:.1f}, MRI {metrics['metrics']['dice_mr']:.1f}, "
          f"overall {metrics['metrics']['dice_overall']:.1f}; ASD mm overall {metrics['metrics']['asd_overall']:.2f}")
    return root, metrics


@pytest.mark.slow
def test_full_method_learns_both_modalities(trained, lssc_env, learn_json, monkeypatch):
    root, metrics = trained
    m = metrics["metrics"]
    assert m["dice_ct"] >= MIN_DICE and m["dice_mr"] >= MIN_DICE, m
    assert m["val_mean_dice"] == pytest.approx(m["dice_overall"] / 100, abs=0.02)  # MONAI's MeanDice agrees
    table = metrics["table2"]
    assert table["dice"]["overall"] == pytest.approx((table["dice"]["ct"]["mean"] + table["dice"]["mr"]["mean"]) / 2)
    for mod in ("ct", "mr"):
        assert table["dice"][mod]["n_cases"] == 4 and table["asd"][mod]["mean"] < 5.0  # mm
    md = (root / "eval" / "table2.md").read_text()
    assert "| Method | CT LVM | CT LAC | CT LVC | CT AA | CT Mean | MRI LVM" in md
    assert (root / "eval" / "overlays.png").stat().st_size > 20_000
    assert len((root / "eval" / "per_case.csv").read_text().splitlines()) == 1 + 8

    # a broken model through the same evaluation: the untrained network scores far below
    from monai.bundle import ConfigWorkflow

    from common.engines.lssc import InferenceWeights, lssc_network

    monkeypatch.setenv("CARDIAC_DATA_DIR", lssc_env["CARDIAC_DATA_DIR"])
    torch.manual_seed(0)
    net = lssc_network("full", ["ct", "mr"], in_channels=3, num_classes=5, img_size=64,
                       **{k: LEARN[k] for k in ("embed_dim", "num_heads", "depths", "decoder_depths", "window_size")})
    ckpt = root / "untrained.pt"
    torch.save(InferenceWeights(net).state_dict(), ckpt)
    out = root / "eval_untrained"
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), str(learn_json)],
                        logging_file=False, workflow_type="infer", bundle_root=str(root), ckpt_path=str(ckpt),
                        output_dir=str(out))
    wf.initialize()
    wf.run()
    broken = json.loads((out / "metrics.json").read_text())["metrics"]
    print(f"\nuntrained network: Dice % CT {broken['dice_ct']:.1f}, MRI {broken['dice_mr']:.1f}, "
          f"overall {broken['dice_overall']:.1f}")
    assert broken["dice_overall"] < 30.0 < MIN_DICE
    # and an all-background prediction scores 0 on every structure of a held-out volume
    from common.data.io import read_image
    from common.data.mmwhs import remap_mmwhs_labels
    from common.metrics.segmentation import dice_per_class

    case = metrics["per_case"][0]["case"]
    data = lssc_env["CARDIAC_DATA_DIR"] + "/mmwhs-seed0"
    label = remap_mmwhs_labels(read_image(f"{data}/{case[:2]}_train/{case}_label.nii.gz").array)
    np.testing.assert_array_equal(dice_per_class(np.zeros_like(label), label, 5), 0.0)


@pytest.mark.slow
def test_inference_cli_writes_predictions_in_the_input_geometry(trained, lssc_env, learn_json, tmp_path):
    import nibabel as nib

    from common.data.mmwhs import remap_mmwhs_labels
    from common.metrics.segmentation import dice_per_class

    root, metrics = trained
    out = tmp_path / "out"
    # default input: the test split of the synthetic default, the modality read from each file name
    run_cli("run", ["inference.json", learn_json], lssc_env, "--bundle_root", root, "--output_dir", out)
    preds = sorted((out / "predictions").glob("*_seg.nii.gz"))
    assert len(preds) == 8
    per_case = {r["case"]: r for r in metrics["per_case"]}
    data = lssc_env["CARDIAC_DATA_DIR"] + "/mmwhs-seed0"
    for p in preds:
        case = p.name.replace("_image_seg.nii.gz", "")
        image = nib.load(f"{data}/{case[:2]}_train/{case}_image.nii.gz")
        label = remap_mmwhs_labels(np.asarray(nib.load(f"{data}/{case[:2]}_train/{case}_label.nii.gz").dataobj))
        pred = nib.load(str(p))
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
        seg = np.asarray(pred.dataobj)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3, 4}
        # the saved prediction is exactly what the evaluation scored
        np.testing.assert_allclose(100 * dice_per_class(seg, label, 5), per_case[case]["dice"], atol=1e-3)


@pytest.mark.slow
def test_exports_of_the_trained_network(trained, lssc_env, learn_json, tmp_path):
    """verify_net_in_out and ckpt_export (tracing; scripting is impossible with MONAI's Swin blocks), and the
    documented alternative torch.export with the modality as a graph input; no EAM parameters anywhere."""
    from monai.bundle import verify_net_in_out

    from common.engines.lssc import lssc_network

    root, _ = trained
    cfg = [str(CONFIGS / "inference.json"), str(learn_json)]
    meta = str(CONFIGS / "metadata.json")
    ckpt = root / "models" / "model.pt"
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, n=2, device="cpu",
                      extra_forward_args={"modality": "mr"})

    state = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("eams.") for k in state)
    net = lssc_network("full", ["ct", "mr"], for_inference=True, in_channels=3, num_classes=5, img_size=64,
                       **{k: LEARN[k] for k in ("embed_dim", "num_heads", "depths", "decoder_depths", "window_size")})
    net.load_state_dict(state, strict=True)
    net.eval()
    x = torch.randn(2, 3, 64, 64)

    ts_path = tmp_path / "lssc_mr.ts"
    # the README's command: one traced file per modality, chosen with --network_def#default_modality
    run_cli("ckpt_export", ["inference.json", learn_json], lssc_env, "--net_id", "network_def", "--filepath", ts_path,
            "--ckpt_file", ckpt, "--meta_file", meta, "--use_trace", "True", "--input_shape", "[1, 3, 64, 64]",
            "--network_def#default_modality", "mr")
    traced = torch.jit.load(str(ts_path))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x, "mr"), rtol=1e-4, atol=1e-4)

    # the reason ckpt_export needs --use_trace (README, export section): MONAI's PatchEmbed does not script
    with pytest.raises(RuntimeError):
        torch.jit.script(net)

    exported = torch.export.export(net, net.example_input(batch_size=2))
    assert not any("eams" in k for k in exported.state_dict)
    mixed = torch.tensor([0, 1])  # one CT and one MRI image in the same batch
    with torch.no_grad():
        out = exported.module()(x, mixed)
        torch.testing.assert_close(out[:1], net(x[:1], "ct"), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1:], net(x[1:], "mr"), rtol=1e-4, atol=1e-4)
