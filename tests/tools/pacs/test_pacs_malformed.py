"""Hundreds of malformed DICOM instances stored in a real Orthanc among good studies: the batch records each bad series
as failed (or skipped) with a reason, does every good study, and finishes without a traceback."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, JPEGBaseline8Bit, generate_uid

from tests.tools.pacs.conftest import TINY_BOTM
from tools.pacs.run import run_batch

pytestmark = pytest.mark.server

# 11 kinds x 25 = 275 instances; Orthanc refuses some kinds at upload (DCMTK cannot parse them), it must store >= 200
N_PER_KIND = 25


def _truncate_pixels(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    ds.PixelData = ds.PixelData[: int(len(ds.PixelData) * rng.uniform(0.05, 0.9)) // 2 * 2]
    return "pixel data truncated"


def _odd_pixels(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    # at least one whole frame more than NumberOfFrames declares (less than a frame is trailing padding, which
    # pydicom strips and the reader rightly accepts: the declared frames decode unchanged)
    frame = len(ds.PixelData) // int(ds.NumberOfFrames)
    ds.PixelData = ds.PixelData + bytes(frame + int(rng.integers(0, frame // 2)) * 2)
    return "pixel data longer than NumberOfFrames frames"


def _encapsulated(ds: pydicom.Dataset, syntax: str) -> None:
    # raw frames encapsulated under a compressed transfer syntax, as a broken gateway writes them (Orthanc refuses
    # native, unencapsulated pixels under a compressed syntax at upload)
    frame = len(ds.PixelData) // int(ds.NumberOfFrames)
    ds.PixelData = encapsulate([ds.PixelData[i: i + frame] for i in range(0, len(ds.PixelData), frame)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax


def _jpeg_claim(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    _encapsulated(ds, JPEGBaseline8Bit)
    return "JPEG transfer syntax over raw (not JPEG) frames"


def _mpeg2(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    _encapsulated(ds, MPEG2MPML)
    return "MPEG2 transfer syntax (no decoder) over raw frames"


def _no_pixels(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    del ds.PixelData
    return "no pixel data"


def _no_size(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    del ds[["Rows", "Columns"][int(rng.integers(2))]]
    return "Rows or Columns missing"


def _huge_frames(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    ds.NumberOfFrames = int(rng.choice([0, 7, 1999, 30000, 2**31 - 1]))
    return "NumberOfFrames not matching the pixel data"


def _fuzz_size(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    ds.Columns = int(rng.integers(65, 4000))
    ds.Rows = int(rng.integers(65, 4000))
    return "Rows/Columns fuzzed"


def _fuzz_bits(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    ds.BitsAllocated = int(rng.choice([16, 32, 64]))
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsAllocated - 1
    return "BitsAllocated fuzzed"


def _fuzz_samples(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    ds.SamplesPerPixel = int(rng.choice([3, 4]))
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    return "SamplesPerPixel fuzzed"


def _no_geometry(ds: pydicom.Dataset, rng: np.random.Generator) -> str:
    for k in ("SequenceOfUltrasoundRegions", "PixelSpacing"):
        if k in ds:
            del ds[k]
    return "no pixel spacing"


KINDS: list[Callable[[pydicom.Dataset, np.random.Generator], str]] = [
    _truncate_pixels, _odd_pixels, _jpeg_claim, _mpeg2, _no_pixels, _no_size, _huge_frames, _fuzz_size, _fuzz_bits,
    _fuzz_samples, _no_geometry]


def _serialize(ds: pydicom.Dataset) -> bytes:
    """The dataset as DICOM file bytes (preamble, file meta)."""
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def malformed_instances(good: Path, seed: int = 0) -> list[tuple[bytes, str, str]]:
    """``N_PER_KIND`` variants of each kind in :data:`KINDS` made from the good cine ``good`` (cut to 2 frames), each
    in its own new study (Orthanc keys instances by UID), as ``(file bytes, note, StudyInstanceUID)``."""
    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(good)
    frame_bytes = len(base.PixelData) // int(base.NumberOfFrames)
    out = []
    for kind in KINDS:
        for i in range(N_PER_KIND):
            ds = pydicom.dcmread(good)
            ds.NumberOfFrames = 2
            ds.PixelData = base.PixelData[: 2 * frame_bytes]
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            note = kind(ds, rng)
            out.append((_serialize(ds), f"{kind.__name__} #{i}: {note}", str(ds.StudyInstanceUID)))
    return out


def test_malformed_instances_in_orthanc(orthanc, tiny_botm_ckpt, synth_cines, tmp_path):
    good = synth_cines[:2]
    for p in good:
        orthanc.upload(p)
    good_studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in good}
    stored, refused, notes = 0, {}, {}
    with requests.Session() as http:  # one connection for hundreds of uploads
        for payload, note, study in malformed_instances(synth_cines[2]):
            r = http.post(f"{orthanc.url}/instances", data=payload, timeout=30)
            if r.ok:
                stored += 1
                notes[study] = note
            else:
                kind = note.split(" #")[0]
                refused[kind] = refused.get(kind, 0) + 1
    print(f"Orthanc stored {stored} malformed instances, refused {refused}")
    assert stored >= 200, f"Orthanc stored only {stored} malformed instances (refused: {refused})"

    ledger = tmp_path / "out" / "ledger.sqlite"
    summary = run_batch(bundle="botm_seg", source=orthanc.dicomweb_url, ledger=str(ledger), ckpt=str(tiny_botm_ckpt),
                        device="cpu", overrides=TINY_BOTM, backoff=0.05)
    assert summary["stopped"] == "", summary
    with sqlite3.connect(ledger) as db:
        rows = db.execute("SELECT study_uid, state, reason FROM jobs").fetchall()
    assert len(rows) == stored + len(good), (len(rows), stored)
    states, wrong = {}, []
    for study, state, reason in rows:
        if study in good_studies:
            assert state == "done", (state, reason)
        elif state not in ("failed", "skipped") or not reason:
            wrong.append((notes[study], state, reason))
        else:
            # a reason the operator can act on, never a bare traceback
            assert "Traceback" not in reason and len(reason) > 10, reason
        states[state] = states.get(state, 0) + 1
    assert not wrong, f"{len(wrong)} malformed series not failed/skipped: {sorted(set(wrong))[:20]}"
    assert states["failed"] >= 150, states  # most malformed instances reach the decoder and fail there
    log_text = (ledger.parent / "pacs.log").read_text()
    assert "Traceback" not in log_text
