"""The bundle from the command line, as a user runs it: train -> evaluate -> inference on the embedded synthetic
default (no --dataset_dir given), with the documented overrides (--epochs, --device, --output_dir, --input_path)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.default import default_dataset_dir, generate_dataset

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "botm_seg" / "configs"


def cli(configs, *args, env):
    cfg = "[" + ",".join(f"'{c if os.path.isabs(str(c)) else CONFIGS / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg, *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_train_evaluate_infer_from_the_cli(tmp_path, tiny_json, monkeypatch):
    # CARDIAC_DATA_DIR points at a fresh folder; the embedded CAMUS default is put there at a test size (the
    # generator itself is tested in tests/common/data), so the bundle must find it without --dataset_dir
    monkeypatch.setenv("CARDIAC_DATA_DIR", str(tmp_path / "data_home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    default = generate_dataset("camus", default_dataset_dir("camus"), n_patients=5, image_size=(72, 64), n_frames=3,
                               progress=False)
    env = dict(os.environ)
    root = tmp_path / "bundle"

    cli(["train.json", tiny_json], "--bundle_root", root, "--epochs", 2, "--device", "cpu",
        "--output_dir", root / "train_logs", env=env)
    ckpt = root / "models" / "model.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors only, as MONAI 1.6 loads it
    # one saved object: MONAI's CheckpointSaver stores the network's state dict itself
    assert "decoder.classifier.weight" in state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(p.name.startswith("events.out.tfevents") for p in (root / "train_logs").iterdir())

    cli(["train.json", "evaluate.json", tiny_json], "--bundle_root", root, "--output_dir", root / "eval", env=env)
    report = json.loads((root / "eval" / "metrics.json").read_text())
    assert 0.0 <= report["metrics"]["val_mean_dice"] <= 1.0
    paper = report["echo"]["paper"]
    assert set(paper["all_frames"]) == {"mDice", "mHD", "mHD95", "n_missed", "mIoU", "Spe", "MAE"}
    assert set(paper["by_phase"]) == {"ED", "ES"} and set(paper["per_class"]) == {"LV", "Myo", "LA"}
    assert report["echo"]["class_names"] == ["LV", "Myo", "LA"]
    with open(root / "eval" / "per_frame.csv") as f:
        frames = list(csv.DictReader(f))
    n_cases = report["echo"]["n_cases"]
    assert len(frames) == 2 * n_cases and {r["phase"] for r in frames} == {"ED", "ES"}
    assert {"dice_LV", "hd_LA", "hd95_Myo", "iou_mean", "specificity_LV", "mae_LA"} <= set(frames[0])
    assert (root / "eval" / "per_patient.csv").is_file() and (root / "eval" / "report.md").is_file()
    assert len((root / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()) == n_cases + 1
    assert report["files"]["overlays"] and all(Path(p).is_file() for p in report["files"]["overlays"])

    patient = sorted(default.glob("patient*"))[-1]
    cli(["inference.json", tiny_json], "--bundle_root", root, "--input_path", patient, "--output_dir", root / "pred",
        "--save_uncertainty", True, env=env)
    inputs = sorted(p for p in patient.glob("*.nii.gz") if not p.name.endswith("_gt.nii.gz"))
    assert len(inputs) == 6  # ED, ES and the half sequence of both views
    for src in inputs:
        stem = src.name[: -len(".nii.gz")]
        seg, ent = nib.load(root / "pred" / f"{stem}_seg.nii.gz"), nib.load(root / "pred" / f"{stem}_entropy.nii.gz")
        ref = nib.load(src)
        assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)  # the input's geometry
        labels = np.asarray(seg.dataobj)
        assert labels.dtype == np.uint8 and labels.max() <= 3
        e = np.asarray(ent.dataobj)
        assert e.shape == ref.shape and e.min() >= 0.0 and e.max() <= 1.0 + 1e-6
    preds = json.loads((root / "pred" / "predictions.json").read_text())["cases"]
    assert len(preds) == 4 and all(Path(c["png"]).is_file() for c in preds)
    sequence = next(c for c in preds if c["n_frames"] == 3)
    assert set(sequence["area_mm2"]) == {"LV", "Myo", "LA"} and len(sequence["area_mm2"]["LV"]) == 3
