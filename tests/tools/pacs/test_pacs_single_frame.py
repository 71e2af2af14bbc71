"""A cine stored as single-frame US images (one instance per frame) runs through botm_seg as one cine, frames in
InstanceNumber order, and the SEG/SR reference every frame's own instance (real Orthanc, DICOMweb)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from tests.tools.pacs.conftest import TINY_BOTM
from tools.pacs.cine import as_cine
from tools.pacs.results import decode_seg_frames
from tools.pacs.run import run_batch

pytestmark = pytest.mark.server

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def split_cine(cine: Path, folder: Path, seed: int = 0) -> list[Path]:
    """The multi-frame cine as single-frame US Image instances of one new series, InstanceNumber = frame + 1,
    written (and so uploaded) in a shuffled order with random SOP UIDs: neither order gives the frame order."""
    src = pydicom.dcmread(cine)
    frames = src.pixel_array
    study, series = generate_uid(), generate_uid()
    paths = []
    for t in np.random.default_rng(seed).permutation(len(frames)):
        ds = copy.deepcopy(src)
        del ds.NumberOfFrames
        for kw in ("FrameIncrementPointer", "FrameTime", "CineRate"):
            if kw in ds:
                delattr(ds, kw)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = US_IMAGE
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(t) + 1
        ds.PixelData = np.ascontiguousarray(frames[t]).tobytes()
        paths.append(folder / f"frame_{t}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def test_as_cine_rejects_ambiguous_order(synth_cines, tmp_path):
    insts = [pydicom.dcmread(p) for p in split_cine(synth_cines[0], tmp_path)]
    cine, order = as_cine(insts)
    assert [int(d.InstanceNumber) for d in order] == list(range(1, 7)) and int(cine.NumberOfFrames) == 6
    assert (cine.pixel_array == pydicom.dcmread(synth_cines[0]).pixel_array).all()
    insts[1].InstanceNumber = insts[0].InstanceNumber
    with pytest.raises(ValueError, match="repeated InstanceNumber"):
        as_cine(insts)
    del insts[1].InstanceNumber
    with pytest.raises(ValueError, match="1 of 6 single-frame instances have no InstanceNumber"):
        as_cine(insts)


def test_single_frame_series_as_one_cine(orthanc, tiny_botm_ckpt, synth_cines, tmp_path):
    from tools.pacs.model import BundleModel

    paths = split_cine(synth_cines[0], tmp_path)
    for p in paths:
        orthanc.upload(p)
    by_number = {int(d.InstanceNumber): d for d in (pydicom.dcmread(p) for p in paths)}
    summary = run_batch(bundle="botm_seg", source=orthanc.dicomweb_url, ledger=str(tmp_path / "out" / "l.sqlite"),
                        ckpt=str(tiny_botm_ckpt), device="cpu", overrides=TINY_BOTM)
    assert summary["ledger"]["done"] == 1 and summary["ledger"]["skipped"] == 0, summary

    client = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    study = str(by_number[1].StudyInstanceUID)
    results = {}
    for s in client.search_for_series(study):
        ser = pydicom.Dataset.from_json(s)
        if ser.Modality in ("SEG", "SR"):
            (ds,) = client.retrieve_series(study, ser.SeriesInstanceUID)
            results[ds.Modality] = ds
    seg, sr = results["SEG"], results["SR"]
    # every SEG frame references the instance of its cine frame (InstanceNumber t), by temporal position
    assert int(seg.NumberOfFrames) == 3 * 6
    for item in seg.PerFrameFunctionalGroupsSequence:
        t = int(item.FrameContentSequence[0].TemporalPositionIndex)
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == by_number[t].SOPInstanceUID and "ReferencedFrameNumber" not in ref
    assert {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {str(d.SOPInstanceUID) for d in by_number.values()}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in evidence} == {str(d.SOPInstanceUID) for d in by_number.values()}

    # the masks equal the bundle's prediction on the original multi-frame cine: the frames went in, in order
    expected, _ = BundleModel("botm_seg", ckpt_path=str(tiny_botm_ckpt), device="cpu",
                              overrides=TINY_BOTM).predict(synth_cines[0])
    masks = decode_seg_frames(seg, 6)
    assert len(np.unique(expected)) > 1 and (masks == expected).all()
