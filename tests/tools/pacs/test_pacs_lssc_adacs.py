"""lssc_multimodal (CT and MR series -> DICOM SEG) and adacs_registration (a cine's ED/ES frames -> Dice-free SR)
through tools.pacs against a real Orthanc (DICOMweb): results read back from the PACS and compared with each
bundle's own inference.json output on the same images; reruns store nothing twice."""

from __future__ import annotations

import io
import json
import math
import os
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from tests.dicom_geometry import sitk_ras, write_mr_series
from tests.tools.pacs.test_pacs_botm import readme_pacs_commands
from tools.pacs.run import run_batch
from tools.pacs.volumes import MMWHS_ANATOMY

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[3]
# toy sizes of the bundles' own networks (the reductions tests/bundles/<name> use)
TINY_LSSC = {"spatial_size": 32, "pixdim": [2.4, 2.4, 2.4], "embed_dim": 12, "num_heads": [1, 2, 4, 8],
             "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "window_size": 4}
TINY_ADACS = {"network_def#estimator#enc_channels": [8, 8, 8, 8], "network_def#estimator#dec_channels": [8] * 7,
              "network_def#estimator#integration_steps": 3, "spatial_size": [64, 64]}


def _tiny_ckpt(bundle: str, overrides: dict, path: Path, flow_std: float = 0.0) -> Path:
    """An untrained checkpoint of the bundle's own ``network_def`` (``{"model": state_dict}``). ``flow_std`` > 0
    re-draws the last layer so an untrained registration net moves pixels (VoxelMorph starts at ~0 displacement,
    which would make every comparison trivially equal)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser["device"] = "$torch.device('cpu')"
    for k, v in overrides.items():
        parser[k] = v
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    if flow_std:
        last = [p for n, p in net.named_parameters() if n.endswith("weight")][-1]
        with torch.no_grad():
            last.normal_(0.0, flow_std)
    torch.save({"model": net.state_dict()}, path)
    return path


def _run_readme_command(bundle: str, orthanc, tmp_path: Path, ckpt: Path, overrides: dict) -> dict:
    """The README's ``python -m tools.pacs run --bundle <bundle>`` command against the test Orthanc (its port, the
    tiny checkpoint appended), from ``tmp_path``; its JSON summary."""
    cmds = [c for c in readme_pacs_commands() if f"--bundle {bundle} " in c]
    assert len(cmds) == 1, f"the README's PACS section must show one {bundle} command: {cmds}"
    args = shlex.split(cmds[0].replace("127.0.0.1:8042", f"127.0.0.1:{orthanc.http_port}"))
    args[0] = sys.executable
    args += ["--ckpt", str(ckpt), "--device", "cpu", "--overrides", json.dumps(overrides)]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PAGER": "cat"})
    assert proc.returncode == 0, f"{cmds[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def _oblique(a: float, b: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])


def _instances(orthanc) -> list[pydicom.Dataset]:
    """Every instance stored in Orthanc, read from Orthanc's own storage."""
    out = []
    for inst in orthanc.instances():
        r = requests.get(f"{orthanc.url}/instances/{inst['ID']}/file", timeout=60)
        r.raise_for_status()
        out.append(pydicom.dcmread(io.BytesIO(r.content)))
    return out


def _bundle_lssc_labels(series_dir: Path, ckpt: Path, out: Path) -> dict[str, np.ndarray]:
    """``{SOP UID: (Rows, Columns) labels}`` of the bundle's own inference.json on a series folder; the NIfTI it
    writes is mapped to the slices through SimpleITK's reading of the same series (independent of tools.pacs)."""
    from tools.runs import run_workflow

    run_workflow(REPO / "bundles/lssc_multimodal/configs", ["inference.json"], workflow_type="infer",
                 input_path=str(series_dir), ckpt_path=str(ckpt), output_dir=str(out),
                 device="$torch.device('cpu')", **TINY_LSSC)
    written = list(out.rglob("*seg.nii*"))
    assert len(written) == 1, written
    pred = nib.load(written[0])
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    ref = reader.Execute()
    # the bundle writes on the series' own grid: index (i, j, k) = (column, row, k-th slice of SimpleITK's order)
    np.testing.assert_allclose(pred.affine, sitk_ras(ref), atol=1e-3)
    arr = np.asarray(pred.dataobj)
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): arr[:, :, k].T
            for k, f in enumerate(files)}


def test_lssc_ct_and_mr_series_seg_dicomweb(orthanc, tmp_path):
    ckpt = _tiny_ckpt("lssc_multimodal", TINY_LSSC, tmp_path / "lssc.pt")
    zz, yy, xx = np.mgrid[0:8, 0:36, 0:40]
    blob = np.exp(-((zz - 4) ** 2 / 8 + (yy - 15) ** 2 / 60 + (xx - 22) ** 2 / 80))
    series = {"MR": tmp_path / "mr", "CT": tmp_path / "ct"}
    # an oblique MR series and a CT series (file names against slice order: the reader must sort by geometry)
    write_mr_series(series["MR"], 800 * blob + 40 * (xx % 3), _oblique(0.35, -0.5), origin=(-20, 10, 5))
    write_mr_series(series["CT"], 1024 + 400 * blob + 30 * (yy % 4), _oblique(-0.2, 0.0), origin=(5, -30, 40),
                    spacing=(0.8, 0.8), step=2.5, template="CT_small.dcm")
    sources = {}
    for mod, folder in series.items():
        for p in sorted(folder.iterdir()):
            orthanc.upload(p)
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            assert ds.Modality == mod
            sources[str(ds.SOPInstanceUID)] = ds

    # among them: an MR series whose slices lost their geometry (failed, with the reason) and a 2-slice one (skipped)
    write_mr_series(tmp_path / "flat", 100 * blob[:3], _oblique(0.0, 0.0), origin=(0, 0, 0))
    write_mr_series(tmp_path / "short", 100 * blob[:2], _oblique(0.0, 0.0), origin=(0, 0, 0))
    for p in sorted((tmp_path / "flat").iterdir()):
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p, enforce_file_format=True)
    for p in [*sorted((tmp_path / "flat").iterdir()), *sorted((tmp_path / "short").iterdir())]:
        orthanc.upload(p)

    summary = _run_readme_command("lssc_multimodal", orthanc, tmp_path, ckpt, TINY_LSSC)
    assert summary["ledger"] == {"queued": 0, "running": 0, "done": 2, "failed": 1, "skipped": 1}, summary
    with sqlite3.connect(tmp_path / "output/pacs/lssc/ledger.sqlite") as db:
        reasons = dict(db.execute("SELECT state, reason FROM jobs WHERE state IN ('failed', 'skipped')").fetchall())
    assert "ImagePositionPatient" in reasons["failed"] and "2 frames" in reasons["skipped"], reasons

    segs = [d for d in _instances(orthanc) if d.Modality == "SEG"]
    assert len(segs) == 2
    for mod, folder in series.items():
        series_uid = str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
        seg = next(s for s in segs if s.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid)
        src = {u: d for u, d in sources.items() if str(d.SeriesInstanceUID) == series_uid}
        # references to every source slice, patient/study modules of the source
        refs = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert refs == set(src) and len(src) == 8
        first = next(iter(src.values()))
        assert (seg.StudyInstanceUID, seg.PatientID, seg.FrameOfReferenceUID) == \
            (first.StudyInstanceUID, first.PatientID, first.FrameOfReferenceUID)
        # coded anatomy of the structures the bundle segments, algorithm = bundle name + version
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["LVM", "LAC", "LVC", "AA"]
        assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == \
            [MMWHS_ANATOMY[k][0] for k in ("LVM", "LAC", "LVC", "AA")]
        algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert "not for diagnostic use" in seg.SeriesDescription
        assert algo.AlgorithmName == "lssc_multimodal" and algo.AlgorithmVersion == json.loads(
            (REPO / "bundles/lssc_multimodal/configs/metadata.json").read_text())["version"]
        # the source geometry: each frame's plane position is its source slice's, orientation and spacing shared
        shared = seg.SharedFunctionalGroupsSequence[0]
        np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                                   [float(v) for v in first.ImageOrientationPatient], atol=1e-6)
        np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                                   [float(v) for v in first.PixelSpacing])
        assert int(seg.NumberOfFrames) == 4 * len(src)
        for item in seg.PerFrameFunctionalGroupsSequence:
            ref = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                                       [float(v) for v in src[ref].ImagePositionPatient], atol=1e-4)
        # the decoded masks equal the bundle's own inference.json output on the same series
        expected = _bundle_lssc_labels(folder, ckpt, tmp_path / f"bundle_{mod}")
        uids = sorted(src)
        got = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
            source_sop_instance_uids=uids, combine_segments=True)
        want = np.stack([expected[u] for u in uids])
        assert got.shape == want.shape and (got == want).all(), f"{mod}: SEG differs from the bundle's output"
        assert len(np.unique(want)) > 1  # an all-background comparison would prove nothing

    # a rerun (fresh ledger: only the PACS knows) computes and stores nothing
    n = len(orthanc.instances())
    again = run_batch(bundle="lssc_multimodal", source=orthanc.dicomweb_url, ledger=str(tmp_path / "r" / "l.sqlite"),
                      ckpt=str(ckpt), device="cpu", overrides=TINY_LSSC)
    assert again["ledger"]["done"] == 2 and again["ledger"]["failed"] == 1
    with sqlite3.connect(tmp_path / "r" / "l.sqlite") as db:
        assert [r[0] for r in db.execute("SELECT reason FROM jobs WHERE state = 'done'")] == \
            ["already at the destination"] * 2
    assert len(orthanc.instances()) == n


def _sr_values(ds: pydicom.Dataset) -> dict[str, float]:
    """``{concept meaning: value}`` of every NUM item of an SR."""
    out = {}

    def walk(items):
        for it in items:
            if it.ValueType == "NUM":
                out[it.ConceptNameCodeSequence[0].CodeMeaning] = float(it.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    return out


def test_adacs_ed_es_registration_sr_dicomweb(orthanc, tmp_path):
    from common.data.io import write_nifti
    from common.data.synthetic.echo_dicom import write_echo_dicom_study
    from tools.runs import run_workflow

    ckpt = _tiny_ckpt("adacs_registration", TINY_ADACS, tmp_path / "adacs.pt", flow_std=8.0)
    path = write_echo_dicom_study(tmp_path / "cine", n_studies=1, seed=11, n_frames=10, image_size=(64, 64))[0]
    ds = pydicom.dcmread(path)
    assert "ED frame 1, ES frame 4" in ds.ImageComments  # the simulator's own cycle
    # the cine starts 2 frames before the R wave: the header's R wave time must move ED to frame 3 (ES to 6)
    frames = np.roll(ds.pixel_array, 2, axis=0)
    ds.PixelData = frames.tobytes()
    ds.RWaveTimeVector = [2 * float(ds.FrameTime)]
    ds.save_as(path, enforce_file_format=True)
    orthanc.upload(path)

    summary = _run_readme_command("adacs_registration", orthanc, tmp_path, ckpt, TINY_ADACS)
    assert summary["ledger"] == {"queued": 0, "running": 0, "done": 1, "failed": 0, "skipped": 0}, summary
    srs = [d for d in _instances(orthanc) if d.Modality == "SR"]
    assert len(srs) == 1
    sr = srs[0]
    assert "not for diagnostic use" in sr.SeriesDescription and sr.PatientID == ds.PatientID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    values = _sr_values(sr)
    assert values["End-diastolic frame number"] == 3 and values["End-systolic frame number"] == 6

    # the bundle's own inference.json on the same ED -> ES frames (cut out here with pydicom) reports the same
    spacing = [float(v) for v in ds.PixelSpacing]
    assert spacing[0] == spacing[1]  # so the bundle's pixel displacement converts to mm by one factor
    pair = {}
    for key, k in (("source", 2), ("target", 5)):
        pair[key] = write_nifti(tmp_path / "pair" / f"ed_es_{key}.nii.gz",
                                np.ascontiguousarray(frames[k].T.astype(np.float32)), spacing=tuple(spacing))
    out = tmp_path / "bundle_adacs"
    run_workflow(REPO / "bundles/adacs_registration/configs", ["inference.json"], workflow_type="infer",
                 input_path=str(pair["source"]), target_path=str(pair["target"]), ckpt_path=str(ckpt),
                 output_dir=str(out), device="$torch.device('cpu')", **TINY_ADACS)
    ref = json.loads((out / "inference_summary.json").read_text())["pairs"][0]
    # the re-drawn net really moves (and folds) pixels: equal values are not zeros on both sides
    assert ref["mean_displacement_pixels"] > 0.5 and ref["nonpositive_jacobian_percent"] > 0
    assert values["Non-positive Jacobian determinant fraction"] == pytest.approx(
        ref["nonpositive_jacobian_percent"], abs=1e-6)
    assert values["Mean displacement magnitude"] == pytest.approx(ref["mean_displacement_pixels"] * spacing[0],
                                                                  rel=1e-5)

    # a rerun stores nothing
    n = len(orthanc.instances())
    again = run_batch(bundle="adacs_registration", source=orthanc.dicomweb_url,
                      ledger=str(tmp_path / "r" / "l.sqlite"), ckpt=str(ckpt), device="cpu", overrides=TINY_ADACS)
    assert again["ledger"]["done"] == 1 and len(orthanc.instances()) == n
