"""lssc_multimodal workflows from the command line: a user folder in the official MM-WHS layout, DDP with torchrun,
and clear failures (wrong modality, missing checkpoint, unreadable file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import CONFIGS, REPO_ROOT, config_list, run_cli


@pytest.mark.slow
def test_official_layout_dataset_dir_trains_and_evaluates_unchanged(tmp_path, lssc_env, tiny_json):
    """--dataset_dir at a folder in the MM-WHS release layout (ct_train/, mr_train/, original label codes)."""
    from common.data.synthetic.mmwhs import write_mmwhs

    data = tmp_path / "MM-WHS 2017"  # a space in the path, as real downloads often have
    write_mmwhs(data, n_ct=5, n_mr=5, seed=11, ct_shape=(72, 72, 48), mr_shape=(64, 64, 40), progress=False)
    root = tmp_path / "bundle"
    args = ["--bundle_root", root, "--dataset_dir", data]
    run_cli("run", ["train.json", tiny_json], lssc_env, *args)
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert state and not any(k.startswith("eams.") for k in state)  # tensors only, no training-only EAMs
    run_cli("run", ["train.json", "evaluate.json", tiny_json], lssc_env, *args)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    cases = metrics["per_case"]
    # the test split of this folder (1 of 5 cases per modality), not the synthetic default
    assert sorted(c["modality"] for c in cases) == ["ct", "mr"]
    assert all(c["case"].endswith(("1001", "1002", "1003", "1004", "1005")) for c in cases)
    for mod in ("ct", "mr"):
        block = metrics["table2"]["dice"][mod]
        assert set(block) >= {"LVM", "LAC", "LVC", "AA", "mean"}
        assert 0.0 <= block["mean"] <= 100.0
    assert (root / "eval" / "overlays.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_on_cpu(tmp_path, lssc_env, tiny_json):
    root = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file",
           config_list("train.json", "multi_gpu_train.json", tiny_json),
           "--bundle_root", str(root), "--epoch_length", "2", "--val_interval", "1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=lssc_env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(log.splitlines()[-40:])
    assert (root / "models" / "model.pt").is_file()
    assert "val_mean_dice" in log  # the validation ran (sharded over both ranks, metric gathered)
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith(("eams.", "module.", "network.")) for k in state)  # unwrapped from DDP


def _workflow(config_files, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(CONFIGS / f) if isinstance(f, str) else str(f) for f in config_files],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, workflow_type="infer",
                        **overrides)
    wf.initialize()
    return wf


def _chain(e: BaseException) -> str:
    msgs = []
    while e is not None:
        msgs.append(str(e))
        e = e.__cause__ or e.__context__
    return " | ".join(msgs)


def _root(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def test_wrong_modality_fails_clearly(tmp_path, lssc_env, tiny_json):
    image = tmp_path / "heart_scan.nii.gz"
    image.write_bytes(b"not used: the modality is checked first")
    proc = run_cli("run", ["inference.json", tiny_json], lssc_env, "--bundle_root", tmp_path,
                   "--input_path", image, "--modality", "xray", check=False)
    assert proc.returncode != 0
    assert "unknown modality 'xray' for all inputs; this network knows ('ct', 'mr')" in proc.stderr + proc.stdout
    # without --modality, a name that tells nothing is refused with the way out
    with pytest.raises(Exception) as err:
        _workflow(["inference.json", tiny_json], bundle_root=str(tmp_path), input_path=str(image)).run()
    assert "cannot tell the modality of" in _chain(err.value) and "--modality" in _chain(err.value)


def test_missing_checkpoint_fails_clearly(tmp_path, lssc_env, tiny_json, monkeypatch):
    monkeypatch.setenv("CARDIAC_DATA_DIR", lssc_env["CARDIAC_DATA_DIR"])
    wf = _workflow(["train.json", "evaluate.json", tiny_json], bundle_root=str(tmp_path),
                   ckpt_path=str(tmp_path / "nowhere" / "model.pt"))
    with pytest.raises(Exception) as err:
        wf.run()
    msg = _chain(err.value)
    assert "FileNotFoundError" in repr(_root(err.value))
    assert "nowhere/model.pt not found: train the bundle first (train.json) or pass --ckpt_path" in msg


def test_unreadable_image_fails_naming_the_file(tmp_path, lssc_env, tiny_json, monkeypatch):
    monkeypatch.setenv("CARDIAC_DATA_DIR", lssc_env["CARDIAC_DATA_DIR"])
    from common.engines.lssc import InferenceWeights, lssc_network

    ckpt = tmp_path / "model.pt"
    tiny = json.loads(tiny_json.read_text())
    net = lssc_network("full", ["ct", "mr"], for_inference=True, in_channels=3, num_classes=5,
                       img_size=tiny["spatial_size"], embed_dim=tiny["embed_dim"], num_heads=tiny["num_heads"],
                       depths=tiny["depths"], decoder_depths=tiny["decoder_depths"], window_size=tiny["window_size"])
    torch.save(InferenceWeights(net).state_dict(), ckpt)
    broken = tmp_path / "ct_broken_image.nii.gz"
    broken.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    wf = _workflow(["inference.json", tiny_json], bundle_root=str(tmp_path), ckpt_path=str(ckpt),
                   input_path=str(broken))
    with pytest.raises(Exception) as err:
        wf.run()
    assert "ct_broken_image.nii.gz" in _chain(err.value)


def test_unknown_override_key_fails_naming_it(tmp_path, lssc_env, tiny_json):
    proc = run_cli("run", ["train.json", tiny_json], lssc_env, "--bundle_root", tmp_path, "--few_shots", "{'mr': 1}",
                   check=False)
    assert proc.returncode != 0
    assert "--few_shots (did you mean --few_shot?)" in proc.stderr + proc.stdout
    assert not (tmp_path / "models").exists()


def test_batch_inference_records_bad_inputs_and_goes_on(tmp_path, lssc_env, tiny_json, monkeypatch):
    """A folder with one good volume, one corrupt file, one volume holding NaN and one 2D image: the good volume is
    segmented, the three others are listed with their reasons in failed_inputs.json."""
    import nibabel as nib
    import numpy as np

    from common.data.io import write_nifti
    from common.engines.lssc import InferenceWeights, lssc_network

    monkeypatch.setenv("CARDIAC_DATA_DIR", lssc_env["CARDIAC_DATA_DIR"])
    tiny = json.loads(tiny_json.read_text())
    net = lssc_network("full", ["ct", "mr"], for_inference=True, in_channels=3, num_classes=5,
                       img_size=tiny["spatial_size"], embed_dim=tiny["embed_dim"], num_heads=tiny["num_heads"],
                       depths=tiny["depths"], decoder_depths=tiny["decoder_depths"], window_size=tiny["window_size"])
    ckpt = tmp_path / "model.pt"
    torch.save(InferenceWeights(net).state_dict(), ckpt)
    inputs = tmp_path / "scans"
    inputs.mkdir()
    good = nib.load(f"{lssc_env['CARDIAC_DATA_DIR']}/mmwhs-seed0/ct_train/ct_train_1001_image.nii.gz")
    nib.save(good, inputs / "ct_good.nii.gz")
    (inputs / "ct_corrupt.nii.gz").write_bytes(b"\x1f\x8b truncated")
    vol = np.asarray(good.dataobj).astype(np.float32)
    vol[3, 4, 5] = np.nan
    write_nifti(inputs / "mr_nan.nii.gz", vol, good.affine)
    write_nifti(inputs / "mr_flat.nii.gz", vol[:, :, 0].copy() * 0)
    out = tmp_path / "out"
    _workflow(["inference.json", tiny_json], bundle_root=str(tmp_path), ckpt_path=str(ckpt), input_path=str(inputs),
              output_dir=str(out)).run()
    assert [p.name for p in (out / "predictions").iterdir()] == ["ct_good_seg.nii.gz"]
    record = json.loads((out / "failed_inputs.json").read_text())
    assert record["n_failed"] == 3 and {f["stage"] for f in record["failed"]} == {"screening"}
    errors = {Path(f["input"]).name: f["reason"] for f in record["failed"]}
    assert "not a readable NIfTI file" in errors["ct_corrupt.nii.gz"]
    assert "image contains 1 NaN/Inf values" in errors["mr_nan.nii.gz"]
    assert "expected a 3D image, got shape" in errors["mr_flat.nii.gz"]
