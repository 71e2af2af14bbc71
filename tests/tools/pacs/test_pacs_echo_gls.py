"""The flagship chain ``echo_gls`` (botm_seg -> specknet_tracking) and ``specknet_tracking`` through tools.pacs
against a real Orthanc: SEG + area SR + GLS SR read back from the PACS, the GLS checked against the specknet bundle's
own ``inference.json`` run on the same file with the same query points, versions, references, reruns that store
nothing twice."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue

from tests.tools.pacs.conftest import TINY_BOTM
from tests.tools.pacs.test_pacs_botm import readme_pacs_commands
from tools.pacs.run import run_batch

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[3]
TINY_SPECKNET = {"spatial_size": 64}


@pytest.fixture(scope="module")
def botm_myo_ckpt(tiny_botm_ckpt: Path, tmp_path_factory) -> Path:
    """The tiny untrained botm_seg with its classifier's Myo bias raised by 0.3: its masks then mix background, LV,
    Myo and LA on the synthetic cine (measured: ~27 % Myo), so the myocardium has a centre line to seed the tracker
    (an untrained net without it predicts no Myo at all, and the chain rightly fails the study)."""
    import torch

    state = torch.load(tiny_botm_ckpt, weights_only=True)
    state["model"]["decoder.classifier.bias"][2] += 0.3
    path = tmp_path_factory.mktemp("pacs_gls_ckpt") / "botm_myo.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_specknet_ckpt(tmp_path_factory) -> Path:
    """An untrained specknet_tracking checkpoint from the bundle's own ``network_def`` (``{"model": state_dict}``)."""
    import torch
    from monai.bundle import ConfigParser

    from tools.pacs.model import BUNDLES_DIR

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "specknet_tracking" / "configs" / "inference.json"))
    parser["device"] = "$torch.device('cpu')"
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    path = tmp_path_factory.mktemp("pacs_gls_ckpt") / "specknet.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


def _groups(sr: pydicom.Dataset) -> dict[str, dict]:
    """``{tracking identifier: {"num": {concept meaning: [values]}, "scoord": (N, 2) or None, "frames": [...],
    "algo": (name, version)}}`` of the SR's measurement groups."""
    out = {}
    for item in sr.ContentSequence:
        if item.ValueType != "CONTAINER" or "ContentSequence" not in item:
            continue
        for grp in item.ContentSequence:
            if grp.ValueType != "CONTAINER" or "ContentSequence" not in grp:
                continue
            g: dict = {"num": {}, "scoord": None, "frames": [], "algo": None}
            ident = None
            for c in grp.ContentSequence:
                name = c.ConceptNameCodeSequence[0].CodeMeaning
                if c.ValueType == "TEXT" and name == "Tracking Identifier":
                    ident = c.TextValue
                elif c.ValueType == "NUM":
                    g["num"].setdefault(name, []).append(float(c.MeasuredValueSequence[0].NumericValue))
                elif c.ValueType == "SCOORD":
                    g["scoord"] = np.asarray(c.GraphicData, np.float64).reshape(-1, 2)
                    frames = c.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber
                    g["frames"] = [int(f) for f in frames] if isinstance(frames, MultiValue) else [int(frames)]
                elif c.ValueType == "TEXT" and name == "Algorithm Name":
                    g["algo"] = c.TextValue
                elif c.ValueType == "TEXT" and name == "Algorithm Version":
                    g["algo"] = (g["algo"], c.TextValue)
            if ident is not None:
                out[ident] = g
    return out


def test_echo_gls_chain_on_orthanc(orthanc, botm_myo_ckpt, tiny_specknet_ckpt, synth_cines, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    from common.data.centreline import centreline_points_from_mask
    from common.metrics.tracking import global_longitudinal_strain
    from common.transforms.video import diastasis_frame
    from tools.pacs.chains import chain_version
    from tools.pacs.results import decode_seg_frames
    from tools.runs import run_workflow

    cine = synth_cines[0]
    orthanc.upload(cine)
    src = pydicom.dcmread(cine)
    n = int(src.NumberOfFrames)
    ckpt = {"botm_seg": str(botm_myo_ckpt), "specknet_tracking": str(tiny_specknet_ckpt)}
    overrides = {"botm_seg": TINY_BOTM, "specknet_tracking": TINY_SPECKNET}
    # the README's echo_gls command, against this Orthanc, with the tiny checkpoints and sizes
    (cmd,) = [c for c in readme_pacs_commands() if "--bundle echo_gls" in c]
    args = shlex.split(cmd.replace("127.0.0.1:8042", f"127.0.0.1:{orthanc.http_port}"))
    args[0] = sys.executable
    args[args.index("--ckpt") + 1] = ",".join(f"{k}={v}" for k, v in ckpt.items())
    args += ["--device", "cpu", "--overrides", json.dumps(overrides)]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PAGER": "cat"})
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["ledger"]["done"] == 1 and summary["ledger"]["failed"] == 0, summary

    client = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(str(src.StudyInstanceUID))]
    results = {}
    for s in series:
        if s.Modality in ("SEG", "SR"):
            for ds in client.retrieve_series(str(src.StudyInstanceUID), s.SeriesInstanceUID):
                results.setdefault(ds.Modality, []).append(ds)
    assert len(results["SEG"]) == 1 and len(results["SR"]) == 2, {k: len(v) for k, v in results.items()}
    seg = results["SEG"][0]
    gls_sr = next(d for d in results["SR"] if "GLS" in d.SeriesDescription)
    # one run stored the multi-frame SEG (every source frame referenced) and the GLS SR of the same cine
    assert int(seg.NumberOfFrames) == 3 * n
    masks = decode_seg_frames(seg, n)
    ev = gls_sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ev.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert (gls_sr.PatientID, gls_sr.StudyInstanceUID) == (src.PatientID, src.StudyInstanceUID)
    assert "not for diagnostic use" in gls_sr.SeriesDescription and "echo_gls" in gls_sr.SeriesDescription
    groups = _groups(gls_sr)
    versions = dict(part.split(" ") for part in chain_version("echo_gls").split(" + "))
    gls_key = next(k for k in groups if k.startswith("GLS"))
    query_key = next(k for k in groups if k.startswith("query points"))
    assert groups[gls_key]["algo"] == ("specknet_tracking", versions["specknet_tracking"])
    assert groups[query_key]["algo"] == ("botm_seg", versions["botm_seg"])
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == \
        versions["botm_seg"]

    # the query points: the centre line of the SEG's myocardium (read back from the PACS) on specknet's query frame
    q = diastasis_frame(n, 0.72)
    assert groups[query_key]["frames"] == [q + 1]
    query = centreline_points_from_mask(masks[q], 32, myo_label=2)
    np.testing.assert_allclose(groups[query_key]["scoord"] - 0.5, query, atol=1e-3)

    # the specknet bundle's own inference.json on the same file, seeded with those points
    points = tmp_path / "query.json"
    points.write_text(json.dumps({"query_frame": q, "points": query.tolist()}))
    out = tmp_path / "specknet_inference"
    run_workflow(REPO / "bundles/specknet_tracking/configs", ["inference.json"], workflow_type="infer",
                 input_path=str(cine), ckpt_path=str(tiny_specknet_ckpt), output_dir=str(out), save_png=False,
                 query_points_path=str(points), device="$torch.device('cpu')", **TINY_SPECKNET)
    (tracks_json,) = list(out.rglob("*_tracks.json"))
    bundle_out = json.loads(tracks_json.read_text())
    tracks = np.asarray(bundle_out["tracks"], np.float64)
    assert tracks.shape == (n, 32, 2)
    # the tracked points of the SR (one SCOORD polyline per frame) are the bundle's tracks (json rounds to 1e-4)
    for t in range(n):
        g = groups[f"tracked points, frame {t + 1}"]
        assert g["frames"] == [t + 1]
        # points tracked off the image are clipped in the SCOORD only
        inside = (tracks[t] >= -0.5).all(1) & (tracks[t, :, 0] <= src.Columns - 0.5) & \
            (tracks[t, :, 1] <= src.Rows - 0.5)
        assert inside.any()
        np.testing.assert_allclose(g["scoord"][inside] - 0.5, tracks[t][inside], atol=2e-3)
    # GLS: the metric called here on the bundle's own tracks, ED = the frame of the SEG's largest LV
    ed = int(np.argmax((masks == 1).reshape(n, -1).sum(1)))
    ref = global_longitudinal_strain(tracks, ed_frame=ed, spacing=bundle_out["pixel_spacing_mm"])
    assert gls_key == f"GLS (ED frame {ed + 1}, ES frame {ref.es_frame + 1})"
    assert groups[gls_key]["num"]["Global longitudinal strain"][0] == pytest.approx(ref.gls, abs=1e-3)
    assert abs(ref.gls) > 1e-3  # a zero GLS would not tell a broken chain from a working one
    curve = [groups[f"tracked points, frame {t + 1}"]["num"]["Longitudinal strain"][0] for t in range(n)]
    np.testing.assert_allclose(curve, ref.strain, atol=1e-3)
    lengths = [groups[f"tracked points, frame {t + 1}"]["num"]["Myocardial centre-line length"][0] for t in range(n)]
    np.testing.assert_allclose(lengths, ref.lengths, rtol=1e-4)  # mm: the cine's ultrasound-region spacing

    # a rerun with a fresh ledger (only the PACS knows) stores nothing; the result series are skipped, not failed
    n_instances = len(orthanc.instances())
    again = run_batch(bundle="echo_gls", source=orthanc.dicomweb_url, ledger=str(tmp_path / "rerun" / "l.sqlite"),
                      ckpt=ckpt, device="cpu", overrides=overrides)
    assert again["ledger"]["done"] == 1 and again["ledger"]["failed"] == 0 and again["ledger"]["skipped"] == 3
    assert len(orthanc.instances()) == n_instances

    # specknet_tracking alone: only its GLS SR (its own UIDs), the same GLS as the chain's; a rerun adds nothing
    for k in range(2):
        alone = run_batch(bundle="specknet_tracking", source=orthanc.dicomweb_url,
                          ledger=str(tmp_path / f"alone{k}" / "l.sqlite"), ckpt=ckpt, device="cpu",
                          overrides=overrides)
        assert alone["ledger"]["done"] == 1 and alone["ledger"]["failed"] == 0, alone
        assert len(orthanc.instances()) == n_instances + 1
    srs = [ds for s in client.search_for_series(str(src.StudyInstanceUID))
           if pydicom.Dataset.from_json(s).Modality == "SR"
           for ds in client.retrieve_series(str(src.StudyInstanceUID), pydicom.Dataset.from_json(s).SeriesInstanceUID)
           if ds.SeriesDescription.startswith("specknet_tracking GLS")]
    assert len(srs) == 1
    alone_groups = _groups(srs[0])
    assert alone_groups[gls_key]["num"] == groups[gls_key]["num"]


def test_chain_failures_are_recorded(tiny_botm_ckpt, tiny_specknet_ckpt, synth_cines, tmp_path):
    """A cine whose segmentation has no myocardium is failed with that reason (nothing stored, the batch goes on);
    a malformed per-bundle --ckpt stops the batch before any series is failed."""
    import shutil
    import sqlite3

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    for p in synth_cines[:2]:
        shutil.copy(p, src / p.name)
    ckpt = {"botm_seg": str(tiny_botm_ckpt), "specknet_tracking": str(tiny_specknet_ckpt)}
    overrides = {"botm_seg": TINY_BOTM, "specknet_tracking": TINY_SPECKNET}
    # the untrained botm_seg predicts no Myo at all on these cines (see botm_myo_ckpt)
    out = run_batch(bundle="echo_gls", source=str(src), dest=str(dest), ledger=str(tmp_path / "l" / "l.sqlite"),
                    ckpt=ckpt, device="cpu", overrides=overrides)
    assert out["ledger"]["failed"] == 2 and out["ledger"]["done"] == 0, out
    with sqlite3.connect(tmp_path / "l" / "l.sqlite") as db:
        reasons = [r[0] for r in db.execute("SELECT reason FROM jobs WHERE state = 'failed'")]
    assert all("myocardium on the query frame 4 gives no centre line" in r for r in reasons), reasons
    assert not any(dest.rglob("*.dcm"))

    with pytest.raises(KeyError, match="BUNDLE=VALUE"):
        run_batch(bundle="echo_gls", source=str(src), dest=str(dest), ledger=str(tmp_path / "k" / "l.sqlite"),
                  ckpt=str(tiny_botm_ckpt), device="cpu", overrides=overrides)
    with sqlite3.connect(tmp_path / "k" / "l.sqlite") as db:
        assert [r[0] for r in db.execute("SELECT state FROM jobs")] == ["queued"]
