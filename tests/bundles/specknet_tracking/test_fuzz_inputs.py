"""Fuzz test of specknet_tracking batch inference: a folder of 50+ malformed videos and a few good ones.

Every good video gets its tracks and its ``predictions.json`` record, every bad one is listed in
``failed_inputs.json`` with a reason and a stage, the log holds no traceback, the exit status is 3 and the peak
memory stays bounded although some headers claim terabytes (issue 13). Today a NaN frame stops the whole run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests import fuzz_inputs as fz

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "specknet_tracking" / "configs"
TINY = {"spatial_size": 64}


def _h5_video(path: Path, video: np.ndarray | None, **extra: np.ndarray) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        if video is not None:
            f.create_dataset("video", data=video)
        for k, v in extra.items():
            f.create_dataset(k, data=v)
    return path


def _video_fuzz_folder(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good videos (a US cine from pydicom's ultrasound frame, nibabel's anatomical volume as a 2D+t
    NIfTI/MetaImage/HDF5 video) and the malformed ones (from those and pydicom-data's multi-frame MR)."""
    import nibabel as nib

    folder.mkdir()
    # (x, y, t): 6 of its slices as frames keep the network's work small
    vol = np.asarray(nib.load(fz.nibabel_file("anatomical.nii")).dataobj)[:, :, 8:14].astype(np.float32)
    frames = np.ascontiguousarray(vol.transpose(2, 1, 0))  # (T, H, W) = (6, 41, 33)
    u8 = np.clip(frames / frames.max() * 255, 0, 255).astype(np.uint8)
    good = [fz.us_cine(folder / "good_us_cine.dcm"),
            fz.write_array(folder / "good_nifti.nii.gz", vol),
            fz.write_array(folder / "good_meta.mha", frames),
            _h5_video(folder / "good_hdf5.h5", u8)]
    bad: dict[Path, str] = {}
    for src, suffix, tag in [(fz.dicom_file("emri_small.dcm"), ".dcm", "bdcm"), (good[1], ".nii.gz", "bniigz"),
                             (good[3], ".h5", "bh5")]:
        bad.update(fz.byte_variants(src, folder, tag, suffix))
    bad.update(fz.nifti_header_variants(vol, folder, "hdr"))
    bad.update(fz.mhd_variants(vol, folder, "mhd"))
    bad.update(fz.array_variants(folder, "arr", [".nii.gz", ".mha"], frames[3], sequence=True))
    bad.update(fz.dicom_variants(folder, "mf", good[0]))
    nan = frames.copy()
    nan[3, 5, 5] = np.nan
    for name, video, extra, note in [
        ("h5_novideo.h5", None, {"labels": u8}, "HDF5 without a 'video' dataset"),
        ("h5_nan.h5", nan, {}, "a NaN pixel in frame 3"),
        ("h5_zeroframes.h5", u8[:0], {}, "0 frames"),
        ("h5_4d.h5", np.stack([u8, u8], -1), {}, "(T, H, W, 2) video"),
    ]:
        bad[_h5_video(folder / name, video, **extra)] = note
    return good, bad


def test_fuzz_folder_every_good_video_tracked_every_bad_one_listed(tmp_path):
    good, bad = _video_fuzz_folder(tmp_path / "inputs")
    assert len(bad) >= 50
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"points": [[10, 10], [20, 15], [25, 30]], "query_frame": 2}))
    ckpt = fz.untrained_checkpoint(CONFIGS / "inference.json", TINY, tmp_path / "model.pt")
    out = tmp_path / "out"
    args = ["run", "--config_file", CONFIGS / "inference.json", "--meta_file", CONFIGS / "metadata.json",
            "--logging_file", CONFIGS / "logging.conf", "--bundle_root", tmp_path, "--ckpt_path", ckpt,
            "--input_path", tmp_path / "inputs", "--output_dir", out, "--query_points_path", points,
            "--save_png", "false", *(a for k, v in TINY.items() for a in (f"--{k}", json.dumps(v)))]
    proc, rss_mib = fz.run_cli_with_peak_rss(args, tmp_path / "rss.txt", cwd=tmp_path)
    failed = fz.check_fuzz_outcome(proc, out, [str(p) for p in bad], [str(p) for p in good])
    predictions = {r["input"]: r for r in json.loads((out / "predictions.json").read_text())["predictions"]}
    assert set(predictions) == {str(p) for p in good}
    outputs = {predictions[str(p)]["outputs"]["h5"] for p in good}
    assert len(outputs) == len(good) and all(Path(o).is_file() for o in outputs), predictions
    assert "NaN" in failed[str(tmp_path / "inputs" / "h5_nan.h5")]["reason"]
    for p in bad:
        if "hugeclaim" in p.name:
            assert fz.refused_from_header(failed[str(p)]["reason"]), failed[str(p)]
    assert rss_mib < 1500, f"peak RSS {rss_mib:.0f} MiB"
