"""botm_seg through tools.pacs against a real Orthanc (DICOMweb): the README's commands, SEG/SR read back from the
PACS and compared with the bundle's own inference.json output, reruns that store nothing twice, no patient data in
logs or the ledger."""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.tools.pacs.conftest import TINY_BOTM
from tools.pacs.results import ANATOMY, decode_seg_frames
from tools.pacs.run import run_batch

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[3]
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


def readme_pacs_commands() -> list[str]:
    """Every ``python -m tools.pacs`` command of the README's "Batch inference against a PACS" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Batch inference against a PACS", 1)[1].split("\n## ", 1)[0]
    cmds = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("python -m tools.pacs")]
    assert len(cmds) >= 3, "the README's PACS section lost its commands"
    return cmds


def run_cli(cmd: str, orthanc, tmp_path: Path, ckpt: Path) -> subprocess.CompletedProcess:
    """A documented command against the test Orthanc: its port instead of 8042, the tiny checkpoint appended."""
    args = shlex.split(cmd.replace("127.0.0.1:8042", f"127.0.0.1:{orthanc.http_port}"))
    args[0] = sys.executable
    if args[3] == "run":
        args += ["--ckpt", str(ckpt), "--device", "cpu", "--overrides", json.dumps(TINY_BOTM)]
    # PAGER=cat: a usage error must print, not wait in fire's pager
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PAGER": "cat"})
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def json_out(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def results_by_source(client) -> dict[str, dict[str, list[pydicom.Dataset]]]:
    """``{source SOP UID: {"SEG": [...], "SR": [...]}}`` of every result instance in the PACS (with pixels)."""
    out: dict[str, dict[str, list]] = {}
    for study in client.search_for_studies():
        study_uid = pydicom.Dataset.from_json(study).StudyInstanceUID
        for s in client.search_for_series(study_uid):
            ser = pydicom.Dataset.from_json(s)
            if ser.Modality not in ("SEG", "SR"):
                continue
            for ds in client.retrieve_series(study_uid, ser.SeriesInstanceUID):
                if ds.Modality == "SEG":
                    src = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
                else:
                    src = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
                        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                out.setdefault(str(src), {"SEG": [], "SR": []})[ds.Modality].append(ds)
    return out


def sr_numbers(ds: pydicom.Dataset) -> list[tuple[str, str, float]]:
    """``(group tracking identifier, finding site meaning, value)`` of every NUM item of the SR's groups."""
    found = []

    def walk(items, group=""):
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if it.ValueType == "CONTAINER" and "ContentSequence" in it:
                ident = [c.TextValue for c in it.ContentSequence if c.ValueType == "TEXT" and
                         c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"]
                walk(it.ContentSequence, ident[0] if ident else group)
            elif it.ValueType == "NUM" and name == "Area":
                site = [c.ConceptCodeSequence[0].CodeMeaning for c in it.get("ContentSequence", [])
                        if c.ConceptNameCodeSequence[0].CodeMeaning == "Finding Site"]
                found.append((group, site[0] if site else "", float(it.MeasuredValueSequence[0].NumericValue)))

    walk(ds.ContentSequence)
    return found


def test_botm_dicomweb_end_to_end(orthanc, tiny_botm_ckpt, synth_cines, jpeg_cine, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    from common.data.loading import to_frames
    from tools.runs import run_workflow

    sources = [synth_cines[0], synth_cines[1], jpeg_cine]  # two synthetic cines and a real JPEG US cine
    for p in sources:
        orthanc.upload(p)
    src_ds = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in sources)}
    # this test runs the botm_seg commands and status; the other bundles' commands are run by their own tests
    cmds = [c for c in readme_pacs_commands() if "--bundle" not in c or "--bundle botm_seg" in c]
    dry = next(c for c in cmds if "--dry_run" in c)
    run = next(c for c in cmds if " run " in c and "--dry_run" not in c)
    status = next(c for c in cmds if " status " in c)
    assert len(cmds) == 3, f"every documented tools.pacs command must run here: {cmds}"

    # dry run: --since 20260101 leaves out the 2016 JPEG study; nothing computed, nothing stored, no ledger
    plan = json_out(run_cli(dry, orthanc, tmp_path, tiny_botm_ckpt))["plan"]
    assert [p["action"] for p in plan] == ["run botm_seg", "run botm_seg"]
    assert len(orthanc.instances()) == 3 and not (tmp_path / "output" / "pacs" / "ledger.sqlite").exists()

    summary = json_out(run_cli(run, orthanc, tmp_path, tiny_botm_ckpt))
    assert summary["ledger"] == {"queued": 0, "running": 0, "done": 3, "failed": 0, "skipped": 0}
    stat = json_out(run_cli(status, orthanc, tmp_path, tiny_botm_ckpt))
    assert stat["counts"]["done"] == 3 and stat["problems"] == []

    client = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    results = results_by_source(client)
    assert sorted(results) == sorted(src_ds)
    for sop, res in results.items():
        src = src_ds[sop]
        n = int(src.NumberOfFrames)
        assert len(res["SEG"]) == 1 and len(res["SR"]) == 1, f"source {sop}: {len(res['SEG'])} SEG, {len(res['SR'])} SR"
        seg, sr = res["SEG"][0], res["SR"][0]
        # patient/study modules of the source, its grid and spacing, a reference to every source frame
        assert (seg.StudyInstanceUID, seg.PatientID, seg.Rows, seg.Columns) == \
            (src.StudyInstanceUID, src.PatientID, src.Rows, src.Columns)
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["LV", "Myo", "LA"]
        assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == \
            [ANATOMY[k][0] for k in ("LV", "Myo", "LA")]
        algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "botm_seg" and algo.AlgorithmVersion
        assert int(seg.NumberOfFrames) == 3 * n
        refs = {(int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
                 f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID,
                 int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber))
                for f in seg.PerFrameFunctionalGroupsSequence}
        assert refs == {(s, sop, t) for s in (1, 2, 3) for t in range(1, n + 1)}
        spacing = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
        region = src.SequenceOfUltrasoundRegions[0]
        np.testing.assert_allclose(spacing, [10 * float(region.PhysicalDeltaY), 10 * float(region.PhysicalDeltaX)],
                                   rtol=1e-5)
        masks = decode_seg_frames(seg, n)
        # SR: per-frame LV/LA areas equal the SEG's areas; ED/ES groups; research-use label
        nums = sr_numbers(sr)
        lv = {g: v for g, site, v in nums if site == "Left ventricle"}
        px = spacing[0] * spacing[1]
        for t in range(n):
            assert lv[f"frame {t + 1}"] == pytest.approx(float((masks[t] == 1).sum()) * px, rel=1e-6)
        assert any(g.startswith("ED (frame") for g in lv) and any(g.startswith("ES (frame") for g in lv)
        assert "not for diagnostic use" in sr.SeriesDescription and sr.PatientID == src.PatientID
        if sop == str(pydicom.dcmread(synth_cines[0], stop_before_pixels=True).SOPInstanceUID):
            first_masks = masks

    # the bundle's own inference.json workflow (in-process: this process has MONAI loaded already) on the same file
    # gives the same masks as the SEG stored in the PACS
    out = tmp_path / "bundle_inference"
    run_workflow(REPO / "bundles/botm_seg/configs", ["inference.json"], workflow_type="infer",
                 input_path=str(synth_cines[0]), ckpt_path=str(tiny_botm_ckpt), output_dir=str(out), save_png=False,
                 device="$torch.device('cpu')", **TINY_BOTM)
    import nibabel as nib

    written = [p for p in out.rglob("*.nii*") if "uncert" not in p.name]
    assert len(written) == 1, written
    bundle_masks = to_frames(np.asarray(nib.load(written[0]).dataobj))
    assert bundle_masks.shape == first_masks.shape
    assert (bundle_masks == first_masks).all()
    assert len(np.unique(first_masks)) > 1  # an all-background comparison would prove nothing

    # a rerun (a fresh ledger: only the PACS knows) computes and stores nothing
    n_instances = len(orthanc.instances())
    again = run_batch(bundle="botm_seg", source=orthanc.dicomweb_url, ledger=str(tmp_path / "rerun" / "l.sqlite"),
                      ckpt=str(tiny_botm_ckpt), device="cpu", overrides=TINY_BOTM)
    assert again["ledger"]["done"] == 3 and again["ledger"]["failed"] == 0
    assert again["ledger"]["skipped"] == 6  # the SEG and SR series match no rule: skipped, not failed
    with sqlite3.connect(tmp_path / "rerun" / "l.sqlite") as db:
        notes = [r[0] for r in db.execute("SELECT reason FROM jobs WHERE state = 'done'")]
    assert notes == ["already at the destination"] * 3
    assert len(orthanc.instances()) == n_instances

    # privacy: no patient name, ID or birth date (nor raw study UIDs) in the logs or the ledger
    logs = (tmp_path / "output" / "pacs" / "pacs.log").read_text()
    ledger_bytes = (tmp_path / "output" / "pacs" / "ledger.sqlite").read_bytes()
    for ds in src_ds.values():
        for value in (str(ds.PatientName), str(ds.PatientID), str(ds.get("PatientBirthDate", ""))):
            if len(value) >= 4:
                assert value not in logs and value.encode() not in ledger_bytes, value
        assert str(ds.StudyInstanceUID) not in logs
    assert re.search(r"study #[0-9a-f]{12}", logs)
