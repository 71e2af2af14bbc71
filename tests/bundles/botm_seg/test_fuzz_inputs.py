"""Fuzz test of botm_seg batch inference: a folder of 60+ malformed echo inputs and a few good ones.

Every good input gets its mask and its ``predictions.json`` record, every bad one is listed in
``failed_inputs.json`` with a reason and a stage, the log holds no traceback, the exit status is 3 and the peak
memory stays bounded although some headers claim terabytes (issue 13).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tests import fuzz_inputs as fz

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "botm_seg" / "configs"
TINY = {"network_def#widths": [8, 16, 24, 32], "network_def#depths": [1, 1, 1, 1],
        "network_def#num_heads": [1, 1, 2, 2], "network_def#decoder_width": 16, "network_def#sinkhorn_iters": 5,
        "network_def#botm_reductions": [2, 1, 1, 1], "spatial_size": [64, 64]}


def _echo_fuzz_folder(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good echo inputs (two nibabel files as they are, frames cut from one, a NumPy sequence, a US cine made from
    pydicom's ultrasound frame) and the malformed ones."""
    import nibabel as nib

    folder.mkdir()
    vol = np.asarray(nib.load(fz.nibabel_file("anatomical.nii")).dataobj).astype(np.float32)
    frame = vol[:, :, 12].T.copy()  # (H, W) = (41, 33)
    good = [fz.copy_good(fz.nibabel_file("standard.nii.gz"), folder, "good_standard.nii.gz"),
            fz.copy_good(fz.nibabel_file("anatomical.nii"), folder, "good_anat_seq.nii"),
            fz.write_array(folder / "good_frame.nii.gz", frame.T.copy()),
            fz.write_array(folder / "good_frame_meta.mha", frame),
            fz.write_array(folder / "good_seq.npy", np.stack([frame, frame[::-1], frame[:, ::-1]])),
            fz.us_cine(folder / "good_us_cine.dcm")]
    bad: dict[Path, str] = {}
    for src, suffix, tag in [(good[1], ".nii", "bnii"), (good[2], ".nii.gz", "bniigz"), (good[3], ".mha", "bmha"),
                             (good[4], ".npy", "bnpy")]:
        bad.update(fz.byte_variants(src, folder, tag, suffix))
    bad.update(fz.nifti_header_variants(vol, folder, "hdr"))
    bad.update(fz.mhd_variants(vol, folder, "mhd"))
    bad.update(fz.array_variants(folder, "arr", [".nii.gz", ".npy", ".mha"], frame, sequence=True))
    bad.update(fz.dicom_variants(folder, "dcm", good[5]))
    return good, bad


def test_fuzz_folder_every_good_input_written_every_bad_one_listed(tmp_path):
    good, bad = _echo_fuzz_folder(tmp_path / "inputs")
    assert len(bad) >= 50
    ckpt = fz.untrained_checkpoint(CONFIGS / "inference.json", TINY, tmp_path / "model.pt")
    out = tmp_path / "out"
    args = ["run", "--config_file", CONFIGS / "inference.json", "--meta_file", CONFIGS / "metadata.json",
            "--logging_file", CONFIGS / "logging.conf", "--bundle_root", tmp_path, "--ckpt_path", ckpt,
            "--input_path", tmp_path / "inputs", "--output_dir", out, "--save_png", "false",
            *(a for k, v in TINY.items() for a in (f"--{k}", json.dumps(v)))]
    proc, rss_mib = fz.run_cli_with_peak_rss(args, tmp_path / "rss.txt", cwd=tmp_path)
    failed = fz.check_fuzz_outcome(proc, out, [str(p) for p in bad], [str(p) for p in good])
    for p in good:
        stem = p.name.split(".")[0]
        assert (out / f"{stem}_seg.nii.gz").is_file(), stem
    cases = [c["case"] for c in json.loads((out / "predictions.json").read_text())["cases"]]
    assert sorted(cases) == sorted(p.name.split(".")[0] for p in good)
    # the crafted headers were refused from the header, before any allocation
    for p in bad:
        if "hugeclaim" in p.name:
            assert fz.refused_from_header(failed[str(p)]["reason"]), failed[str(p)]
    assert "complex" in failed[str(tmp_path / "inputs" / "arr_complex_npy.npy")]["reason"]
    assert rss_mib < 1500, f"peak RSS {rss_mib:.0f} MiB"


def test_evaluation_records_a_corrupt_case_and_evaluates_the_rest(tmp_path, botm_data, run_bundle):
    """A CAMUS folder with one ED frame truncated in its pixel data: evaluation lists that case in
    failed_inputs.json, writes the metrics of every other case and ends with exit status 3."""
    import pytest

    from common.engines.screening import EXIT_INPUTS_FAILED, InputsFailed

    data = tmp_path / "camus"
    shutil.copytree(botm_data["camus"], data)
    victim = sorted(data.rglob("*_2CH_ED.nii.gz"))[0]
    data_bytes = victim.read_bytes()
    # cut in the pixel data: the header stays readable (the CAMUS reader reads headers when it lists the cases)
    victim.write_bytes(data_bytes[: len(data_bytes) * 6 // 10])
    ckpt = fz.untrained_checkpoint(CONFIGS / "train.json", {**TINY, "dataset_dir": str(data)}, tmp_path / "m.pt")
    out = tmp_path / "eval"
    with pytest.raises(InputsFailed) as exit_info:
        run_bundle(["train.json", "evaluate.json"], tmp_path, dataset_dir=str(data), ckpt_path=str(ckpt),
                   output_dir=str(out), eval_split="all", **TINY)
    assert exit_info.value.code == EXIT_INPUTS_FAILED
    failed = json.loads((out / "failed_inputs.json").read_text())["failed"]
    assert len(failed) == 1 and str(victim) in failed[0]["input"], failed
    metrics = json.loads((out / "metrics.json").read_text())
    n_cases = len(list(data.rglob("*_ED.nii.gz")))
    assert metrics["n_iterations"] == n_cases - 1, (metrics["n_iterations"], n_cases)


def test_rerun_into_the_same_folder_adds_no_records_and_strict_stops_at_the_first_failure(tmp_path, run_bundle):
    import nibabel as nib
    import pytest

    from common.engines.screening import InputsFailed

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    vol = np.asarray(nib.load(fz.nibabel_file("anatomical.nii")).dataobj).astype(np.float32)
    fz.write_array(inputs / "a_good.nii.gz", vol[:, :, 12].copy())
    (inputs / "b_empty.nii.gz").write_bytes(b"")
    ckpt = fz.untrained_checkpoint(CONFIGS / "inference.json", TINY, tmp_path / "model.pt")
    out = tmp_path / "out"
    args = dict(ckpt_path=str(ckpt), input_path=str(inputs), output_dir=str(out), save_png="false", **TINY)
    for _ in range(2):
        with pytest.raises(InputsFailed):
            run_bundle(["inference.json"], tmp_path, **args)
        failed = json.loads((out / "failed_inputs.json").read_text())
        assert [Path(f["input"]).name for f in failed["failed"]] == ["b_empty.nii.gz"] and failed["n_failed"] == 1
        assert [c["case"] for c in json.loads((out / "predictions.json").read_text())["cases"]] == ["a_good"]
    with pytest.raises(Exception) as err:
        run_bundle(["inference.json"], tmp_path, strict="true", **{**args, "output_dir": str(tmp_path / "strict")})
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("b_empty.nii.gz: file is empty" in c and "strict" in c for c in chain), chain
    assert not (tmp_path / "strict" / "a_good_seg.nii.gz").exists()
