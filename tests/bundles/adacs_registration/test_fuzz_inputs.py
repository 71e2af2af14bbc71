"""Fuzz test of adacs_registration batch inference: a folder of 50+ malformed image pairs and a few good ones.

Every good pair gets its warped image and its ``predictions.json`` record, every bad one is listed in
``failed_inputs.json`` (under its source image) with a reason and a stage, the log holds no traceback, the exit
status is 3 and the peak memory stays bounded although some headers claim terabytes (issue 13).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests import fuzz_inputs as fz

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "adacs_registration" / "configs"
TINY = {"network_def#estimator#enc_channels": [8, 8, 8, 8],
        "network_def#estimator#dec_channels": [8, 8, 8, 8, 8, 8, 8],
        "network_def#estimator#integration_steps": 3, "spatial_size": [64, 64]}


def _pair_fuzz_folder(folder: Path, staging: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good pairs (pydicom's CT and MR slices, nibabel's anatomical slices as NIfTI and PNG) and bad ones: every
    malformed file is a ``<name>_source`` beside a good ``<name>_target``; plus a source without target, a bad
    target, a bad mask and a pair whose images differ in shape."""
    import nibabel as nib
    from PIL import Image

    folder.mkdir()
    staging.mkdir()
    vol = np.asarray(nib.load(fz.nibabel_file("anatomical.nii")).dataobj).astype(np.float32)
    s0, s1 = vol[:, :, 12].copy(), vol[:, :, 13].copy()
    u8 = [np.clip(s / vol.max() * 255, 0, 255).astype(np.uint8) for s in (s0, s1)]
    good = []
    for name, src, tgt in [("good_ct", fz.dicom_file("CT_small.dcm"), fz.dicom_file("CT_small.dcm")),
                           ("good_mr", fz.dicom_file("MR_small.dcm"), fz.dicom_file("MR_small.dcm"))]:
        good.append(fz.copy_good(src, folder, f"{name}_source.dcm"))
        fz.copy_good(tgt, folder, f"{name}_target.dcm")
    good.append(fz.write_array(folder / "good_nii_source.nii.gz", s0))
    fz.write_array(folder / "good_nii_target.nii.gz", s1)
    good.append(folder / "good_png_source.png")
    Image.fromarray(u8[0]).save(good[-1])
    Image.fromarray(u8[1]).save(folder / "good_png_target.png")

    made: dict[Path, str] = {}
    for src, suffix, tag in [(good[0], ".dcm", "bdcm"), (good[2], ".nii.gz", "bniigz"), (good[3], ".png", "bpng")]:
        made.update(fz.byte_variants(src, staging, tag, suffix))
    made.update(fz.nifti_header_variants(vol, staging, "hdr"))
    made.update(fz.mhd_variants(vol, staging, "mhd"))
    made.update(fz.array_variants(staging, "arr", [".nii.gz", ".mha"], s0, sequence=False))
    made.update(fz.dicom_variants(staging, "dcm"))
    bad: dict[Path, str] = {}
    for raw in staging.glob("*.raw"):
        shutil.move(raw, folder / raw.name)  # MetaImage headers name their .raw files
    for path, note in made.items():
        name = path.name
        ext = next(e for e in (".nii.gz", ".nii", ".mhd", ".mha", ".dcm", ".png") if name.endswith(e))
        stem = name[: -len(ext)]
        dst = folder / f"{stem}_source{ext}"
        shutil.move(path, dst)
        fz.write_array(folder / f"{stem}_target.nii.gz", s1)
        bad[dst] = note
    lone = fz.write_array(folder / "lonely_source.nii.gz", s0)
    bad[lone] = "no target"
    bad_target = fz.write_array(folder / "badtarget_source.nii.gz", s0)
    (folder / "badtarget_target.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    bad[bad_target] = "corrupt target"
    bad_mask = fz.write_array(folder / "badmask_source.nii.gz", s0)
    fz.write_array(folder / "badmask_target.nii.gz", s1)
    fz.write_array(folder / "badmask_source_mask.nii.gz", np.full(s0.shape, np.nan, np.float32))
    bad[bad_mask] = "NaN mask"
    mismatch = fz.write_array(folder / "mismatch_source.nii.gz", s0)
    fz.write_array(folder / "mismatch_target.nii.gz", s1[:-3])
    bad[mismatch] = "source and target shapes differ"
    return good, bad


def test_fuzz_folder_every_good_pair_registered_every_bad_one_listed(tmp_path):
    good, bad = _pair_fuzz_folder(tmp_path / "pairs", tmp_path / "staging")
    assert len(bad) >= 50
    ckpt = fz.untrained_checkpoint(CONFIGS / "inference.json", TINY, tmp_path / "model.pt")
    out = tmp_path / "out"
    args = ["run", "--config_file", CONFIGS / "inference.json", "--meta_file", CONFIGS / "metadata.json",
            "--logging_file", CONFIGS / "logging.conf", "--bundle_root", tmp_path, "--ckpt_path", ckpt,
            "--input_path", tmp_path / "pairs", "--output_dir", out,
            *(a for k, v in TINY.items() for a in (f"--{k}", json.dumps(v)))]
    proc, rss_mib = fz.run_cli_with_peak_rss(args, tmp_path / "rss.txt", cwd=tmp_path)
    failed = fz.check_fuzz_outcome(proc, out, [str(p) for p in bad], [str(p) for p in good])
    predictions = {r["input"]: r for r in json.loads((out / "predictions.json").read_text())["predictions"]}
    assert set(predictions) == {str(p) for p in good}
    outputs = {predictions[str(p)]["warped"] for p in good}
    assert len(outputs) == len(good) and all(Path(o).is_file() for o in outputs), predictions
    pairs = tmp_path / "pairs"
    assert failed[str(pairs / "lonely_source.nii.gz")]["stage"] == "datalist"
    assert "badtarget_target.nii.gz" in failed[str(pairs / "badtarget_source.nii.gz")]["reason"]
    assert "badmask_source_mask.nii.gz" in failed[str(pairs / "badmask_source.nii.gz")]["reason"]
    assert failed[str(pairs / "mismatch_source.nii.gz")]["stage"] == "preprocessing"
    for p in bad:
        if "hugeclaim" in p.name:
            assert fz.refused_from_header(failed[str(p)]["reason"]), failed[str(p)]
    assert rss_mib < 1500, f"peak RSS {rss_mib:.0f} MiB"


def test_evaluation_records_a_corrupt_volume_and_evaluates_the_rest(adacs_env, tmp_path, monkeypatch):
    """An ACDC folder whose first patient's ED volume is truncated in its pixel data: evaluation lists it once in
    failed_inputs.json (under that volume, although every slice pair of the patient uses it), evaluates the pairs of
    the other patients and ends with exit status 3."""
    import pytest
    from monai.bundle import run

    from common.data.default import default_dataset_dir
    from common.data.pairs import pair_datalist
    from common.engines.screening import EXIT_INPUTS_FAILED, InputsFailed

    monkeypatch.setenv("CARDIAC_DATA_DIR", adacs_env["ADACS_CACHE"])
    data = tmp_path / "acdc"
    shutil.copytree(default_dataset_dir("acdc"), data)
    victim = sorted(data.rglob("*_frame01.nii.gz"))[0]
    content = victim.read_bytes()
    victim.write_bytes(content[: len(content) * 6 // 10])  # the header stays readable, the voxels do not
    entries = pair_datalist(data, split="all")
    n_victim = sum(e["source"] == str(victim) for e in entries)
    assert 0 < n_victim < len(entries)
    tiny = {**TINY, "scoring_def#enc_channels": [8, 8, 8, 8], "scoring_def#dec_channels": [8, 8, 8, 8, 8, 8, 8]}
    ckpt = fz.untrained_checkpoint(CONFIGS / "train.json", {**tiny, "dataset_dir": str(data)}, tmp_path / "m.pt")
    out = tmp_path / "eval"
    with pytest.raises(InputsFailed) as exit_info:
        run(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
            meta_file=str(CONFIGS / "metadata.json"), logging_file=False, bundle_root=str(tmp_path),
            dataset_dir=str(data), ckpt_path=str(ckpt), output_dir=str(out), eval_split="all", **tiny)
    assert exit_info.value.code == EXIT_INPUTS_FAILED
    failed = json.loads((out / "failed_inputs.json").read_text())["failed"]
    assert [f["input"] for f in failed] == [str(victim)], failed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_iterations"] == len(entries) - n_victim, (metrics["n_iterations"], len(entries), n_victim)
