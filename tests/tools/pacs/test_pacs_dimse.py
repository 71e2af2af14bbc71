"""tools.pacs over DIMSE against a real Orthanc's DICOM port: C-FIND, C-GET and C-MOVE (to our storage SCP), C-STORE
of the results, the existence check by C-FIND at IMAGE level (a rerun stores nothing)."""

from __future__ import annotations

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.tools.pacs.conftest import TINY_BOTM
from tests.tools.pacs.test_pacs_botm import results_by_source
from tools.pacs.dimse import DimseNode, parse_dimse
from tools.pacs.orthanc import free_port
from tools.pacs.results import decode_seg_frames
from tools.pacs.run import run_batch

pytestmark = pytest.mark.server

OUR_AET = "H12_TEST_SCU"


def test_parse_dimse_names_the_spec():
    assert parse_dimse("dimse://ORTHANC@127.0.0.1:4242") == ("ORTHANC", "127.0.0.1", 4242)
    assert parse_dimse("dimse://pacs.example:104") == ("ANY-SCP", "pacs.example", 104)
    with pytest.raises(ValueError, match="dimse://nohost"):
        parse_dimse("dimse://nohost")
    with pytest.raises(ValueError, match="needs move_port"):
        DimseNode("dimse://ORTHANC@127.0.0.1:4242", retrieve="move")
    with pytest.raises(ValueError, match="retrieve must be"):
        DimseNode("dimse://ORTHANC@127.0.0.1:4242", retrieve="fetch")


@pytest.mark.parametrize("mode", ["get", "move"])
def test_botm_dimse_batch(mode, orthanc_factory, tiny_botm_ckpt, synth_cines, tmp_path):
    move_port = free_port()
    # C-MOVE: Orthanc sends to a peer it knows by AE title, here our storage SCP on move_port
    orthanc = orthanc_factory(modalities={"h12": [OUR_AET, "127.0.0.1", move_port]})
    sources = synth_cines[:2]
    for p in sources:
        orthanc.upload(p)
    spec = f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    kw = dict(bundle="botm_seg", source=spec, ckpt=str(tiny_botm_ckpt), device="cpu", overrides=TINY_BOTM,
              ae_title=OUR_AET, retrieve=mode, move_port=move_port)

    # the node on its own: C-FIND finds both studies with the selection headers; the retrieve brings the pixels
    node = DimseNode(spec, ae_title=OUR_AET, retrieve=mode, move_port=move_port)
    series = node.query(filters={"ModalitiesInStudy": "US"}, since="20260101")
    src = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in sources)}
    assert sorted(str(s.instances[0].SOPInstanceUID) for s in series) == sorted(src)
    assert all(int(s.instances[0].NumberOfFrames) == 6 and s.modality == "US" for s in series)
    got = node.retrieve(series[0].study_uid, series[0].series_uid)
    assert len(got) == 1 and (got[0].pixel_array == src[str(got[0].SOPInstanceUID)].pixel_array).all()
    assert node.query(since="29990101") == []

    summary = run_batch(ledger=str(tmp_path / "run1" / "ledger.sqlite"), **kw)
    assert summary["ledger"]["done"] == 2 and summary["ledger"]["failed"] == 0, summary

    # the results went in by C-STORE: read them back (DICOMweb, an independent path) and check them
    results = results_by_source(DICOMwebClient(url=f"{orthanc.url}/dicom-web"))
    assert sorted(results) == sorted(src)
    for sop, res in results.items():
        assert len(res["SEG"]) == 1 and len(res["SR"]) == 1, sop
        seg = res["SEG"][0]
        assert seg.StudyInstanceUID == src[sop].StudyInstanceUID and int(seg.NumberOfFrames) == 3 * 6
        assert decode_seg_frames(seg, 6).shape == (6, 64, 64)
        assert node.exists(seg.StudyInstanceUID, seg.SeriesInstanceUID, seg.SOPInstanceUID)
    assert not node.exists(seg.StudyInstanceUID, seg.SeriesInstanceUID, "1.2.3.4.5")

    # a rerun with a fresh ledger: the C-FIND existence check finds every result, nothing is stored again
    n = len(orthanc.instances())
    again = run_batch(ledger=str(tmp_path / "run2" / "ledger.sqlite"), **kw)
    assert again["ledger"]["done"] == 2 and again["ledger"]["failed"] == 0, again
    assert len(orthanc.instances()) == n == 6


def test_dimse_unreachable_is_pending(tmp_path, tiny_botm_ckpt):
    """No PACS on the port: the node gives up after its retries with a reason naming the peer."""
    from tools.pacs.nodes import Unreachable

    node = DimseNode(f"dimse://NOBODY@127.0.0.1:{free_port()}", attempts=2, backoff=0.01, timeout=2)
    with pytest.raises(Unreachable, match="NOBODY@127.0.0.1"):
        node.query()
