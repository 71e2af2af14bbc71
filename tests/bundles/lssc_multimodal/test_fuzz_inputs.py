"""Fuzz test of lssc_multimodal batch inference: a folder of 50+ malformed CT/MR volumes and a few good ones.

Every good volume gets its segmentation and its ``predictions.json`` record, every bad one is listed in
``failed_inputs.json`` with a reason and a stage, the log holds no traceback, the exit status is 3 and the peak
memory stays bounded although some headers claim terabytes (issue 13).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests import fuzz_inputs as fz

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "lssc_multimodal" / "configs"
# every LSSC part at toy size (the inference keys of conftest.TINY)
TINY = {"spatial_size": 64, "pixdim": [2.4, 2.4, 2.4], "embed_dim": 12, "num_heads": [1, 2, 4, 8],
        "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "window_size": 4, "torch_threads": 1}


def _volume_fuzz_folder(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good volumes (nibabel's anatomical and oblique big-endian test volumes as they are, and re-encoded) and the
    malformed ones; every name
    carries a modality token so that the failures come from the files, plus one good volume whose modality cannot
    be told (a datalist failure)."""
    import nibabel as nib
    import SimpleITK as sitk

    folder.mkdir()
    anat = nib.load(fz.nibabel_file("anatomical.nii"))
    vol = np.asarray(anat.dataobj).astype(np.float32)
    good = [fz.write_array(folder / "ct_good_anat.nii.gz", vol, anat.affine),
            fz.copy_good(fz.nibabel_file("reoriented_anat_moved.nii"), folder, "mr_good_oblique.nii"),
            fz.write_array(folder / "ct_good_meta.mha", vol),
            fz.copy_good(fz.nibabel_file("anatomical.nii"), folder, "mr_good_real_anat.nii")]
    nrrd = folder / "ct_good_nrrd.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(nrrd))
    good.append(nrrd)
    bad: dict[Path, str] = {}
    for src, suffix, tag in [(good[0], ".nii.gz", "ct_bniigz"), (good[1], ".nii", "mr_bnii"),
                             (good[2], ".mha", "ct_bmha"), (nrrd, ".nrrd", "ct_bnrrd")]:
        bad.update(fz.byte_variants(src, folder, tag, suffix))
    bad.update(fz.nifti_header_variants(vol, folder, "ct_hdr"))
    bad.update(fz.mhd_variants(vol, folder, "ct_mhd"))
    bad.update(fz.array_variants(folder, "ct_arr", [".nii.gz", ".mha"], vol[:, :, 12], sequence=True))
    flat = fz.write_array(folder / "mr_flat2d.nii.gz", vol[:, :, 12].copy())
    bad[flat] = "a 2D image"
    bad.update(fz.dicom_variants(folder, "ct_dcm"))
    one_slice = fz.copy_good(fz.dicom_file("CT_small.dcm"), folder, "ct_one_slice.dcm")
    bad[one_slice] = "a single CT slice (2D)"
    unnamed = fz.write_array(folder / "scan_without_modality.nii.gz", vol)
    bad[unnamed] = "modality not in the name"
    return good, bad


def test_fuzz_folder_every_good_volume_written_every_bad_one_listed(tmp_path):
    good, bad = _volume_fuzz_folder(tmp_path / "inputs")
    assert len(bad) >= 50
    ckpt = fz.untrained_checkpoint(CONFIGS / "inference.json", TINY, tmp_path / "model.pt")
    out = tmp_path / "out"
    args = ["run", "--config_file", CONFIGS / "inference.json", "--meta_file", CONFIGS / "metadata.json",
            "--logging_file", CONFIGS / "logging.conf", "--bundle_root", tmp_path, "--ckpt_path", ckpt,
            "--input_path", tmp_path / "inputs", "--output_dir", out,
            *(a for k, v in TINY.items() for a in (f"--{k}", json.dumps(v)))]
    proc, rss_mib = fz.run_cli_with_peak_rss(args, tmp_path / "rss.txt", cwd=tmp_path)
    failed = fz.check_fuzz_outcome(proc, out, [str(p) for p in bad], [str(p) for p in good])
    predictions = {r["input"]: r for r in json.loads((out / "predictions.json").read_text())["predictions"]}
    assert set(predictions) == {str(p) for p in good}
    outputs = {predictions[str(p)]["output"] for p in good}
    assert len(outputs) == len(good) and all(Path(o).is_file() for o in outputs), predictions
    assert failed[str(tmp_path / "inputs" / "scan_without_modality.nii.gz")]["stage"] == "datalist"
    for p in bad:
        if "hugeclaim" in p.name:
            assert fz.refused_from_header(failed[str(p)]["reason"]), failed[str(p)]
    assert rss_mib < 1500, f"peak RSS {rss_mib:.0f} MiB"
