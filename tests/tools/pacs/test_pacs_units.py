"""tools.pacs pieces without a server: ledger resume rules, deterministic UIDs and sharding, UID scrubbing,
selection rules, the synthetic US cine writer, and a folder-to-folder batch with malformed instances among good ones."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pydicom
import pytest

from tests.tools.pacs.conftest import TINY_BOTM
from tools.pacs.ledger import Ledger
from tools.pacs.nodes import Unreachable, open_node, with_retries
from tools.pacs.run import parse_filters, run_batch
from tools.pacs.selection import rules_for, select
from tools.pacs.uids import hash_uid, result_uid, scrub_uids, shard_of


def test_ledger_resume_rules(tmp_path):
    path = tmp_path / "ledger.sqlite"
    book = Ledger(path)
    for k in range(3):
        book.add("1.2.3", f"1.2.3.{k}", "botm_seg", "0.1.1")
    assert book.claim("1.2.3", "1.2.3.0", "botm_seg", "0.1.1")
    assert not book.claim("1.2.3", "1.2.3.0", "botm_seg", "0.1.1")  # running: nobody else takes it
    book.finish("1.2.3", "1.2.3.0", "botm_seg", "0.1.1", "done", timings={"model": 1.5})
    # a row left running by a process that is gone (a real, exited PID) is requeued; a live one is not
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    book.claim("1.2.3", "1.2.3.1", "botm_seg", "0.1.1")
    book._db.execute("UPDATE jobs SET pid = ? WHERE series_uid = '1.2.3.1'", (int(dead.stdout),))
    other = Ledger(path)  # a rerun opens the same file
    assert other.recover() == 1
    assert other.get("1.2.3", "1.2.3.1", "botm_seg", "0.1.1")["state"] == "queued"
    assert other.get("1.2.3", "1.2.3.0", "botm_seg", "0.1.1")["state"] == "done"  # done stays done
    assert other.add("1.2.3", "1.2.3.0", "botm_seg", "0.1.1")["attempts"] == 1  # re-adding keeps the row
    assert other.counts() == {"queued": 2, "running": 0, "done": 1, "failed": 0, "skipped": 0}
    with pytest.raises(ValueError, match="state"):
        other.finish("1.2.3", "1.2.3.2", "botm_seg", "0.1.1", "lost")
    assert other._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_uids_sharding_and_scrubbing():
    src = ["1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"]
    a = result_uid("seg", src, "botm_seg", "0.1.1")
    assert a == result_uid("seg", src, "botm_seg", "0.1.1") and len(a) <= 64
    assert len({a, result_uid("sr", src, "botm_seg", "0.1.1"), result_uid("seg", src, "botm_seg", "0.1.2"),
                result_uid("seg", src[::-1], "botm_seg", "0.1.1")}) == 4
    studies = [f"1.2.826.0.1.3680043.{k}" for k in range(400)]
    shards = Counter(shard_of(s, 3) for s in studies)
    assert set(shards) == {0, 1, 2} and min(shards.values()) > 90  # balanced, and stable across processes
    # every process on every host agrees (no salted hash()): another interpreter with another hash seed
    code = f"from tools.pacs.uids import shard_of; print([shard_of(s, 3) for s in {studies[:20]!r}])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == str([shard_of(s, 3) for s in studies[:20]])
    text = f"GET /studies/{studies[7]}/instances?SOPInstanceUID={src[0]} failed on 127.0.0.1:8042"
    scrubbed = scrub_uids(text)
    assert studies[7] not in scrubbed and src[0] not in scrubbed and hash_uid(studies[7]) in scrubbed
    assert "127.0.0.1:8042" in scrubbed
    with pytest.raises(ValueError, match="source UIDs"):
        result_uid("seg", ["1.2", ""], "botm_seg", "1")


def test_selection_rules_and_options():
    rules = rules_for("botm_seg")
    us = pydicom.Dataset()
    us.update({"Modality": "US", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.3.1", "NumberOfFrames": 20, "Rows": 64,
               "Columns": 64})
    assert select([us], rules)[0] is rules[0]
    # a cine stored as single-frame US images (one per frame) is selected as one series
    frame = pydicom.Dataset()
    frame.update({"Modality": "US", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1", "Rows": 64, "Columns": 64})
    assert select([frame] * 5, rules)[0] is not None
    ct = pydicom.Dataset()
    ct.update({"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "Rows": 512, "Columns": 512})
    rule, why = select([ct], rules)
    assert rule is None and "modality CT" in why
    tiny = pydicom.Dataset()
    tiny.update({**{k: us[k].value for k in ("Modality", "SOPClassUID", "NumberOfFrames")}, "Rows": 4, "Columns": 64})
    assert "image size" in select([tiny], rules)[1]
    assert "instances" in select([us, us], rules)[1]
    with pytest.raises(ValueError, match="no PACS selection rule"):
        rules_for("unknown_bundle")
    assert parse_filters("ModalitiesInStudy=US, StudyDescription=Echo*") == {"ModalitiesInStudy": "US",
                                                                              "StudyDescription": "Echo*"}
    with pytest.raises(ValueError, match="KEYWORD=VALUE"):
        parse_filters("ModalitiesInStudy")
    node = open_node("dimse://ORTHANC@127.0.0.1:4242", ae_title="ME", attempts=2, user="ignored for DIMSE")
    assert (node.peer_aet, node.port, node.ae_title, node.attempts) == ("ORTHANC", 4242, "ME", 2)
    with pytest.raises(ValueError, match="dimse://nohost"):
        open_node("dimse://nohost")
    with pytest.raises(ValueError, match="unknown scheme"):
        open_node("ftp://127.0.0.1/x")
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionError("refused")

    with pytest.raises(Unreachable, match="no answer after 3 attempts"):
        with_retries("QIDO-RS test", flaky, attempts=3, backoff=0.001)
    assert len(calls) == 3


def test_synthetic_echo_dicom_is_a_real_us_cine(synth_cines):
    from common.data.io import read_image
    from common.data.synthetic.echo import simulate_echo_sequence

    ds = pydicom.dcmread(synth_cines[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1" and ds.Modality == "US"
    assert int(ds.NumberOfFrames) == 6 and ds.FrameIncrementPointer == 0x00181063 and float(ds.FrameTime) > 0
    assert str(ds.PatientName).startswith("SYNTH^")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    seq = simulate_echo_sequence(seed=7000, n_frames=6, image_size=(64, 64))
    np.testing.assert_array_equal(ds.pixel_array, np.round(seq.images * 255).astype(np.uint8))
    region = ds.SequenceOfUltrasoundRegions[0]
    assert 10 * float(region.PhysicalDeltaY) == pytest.approx(seq.spacing[0])
    img = read_image(synth_cines[0])  # the project's reader: cine frames and spacing come back as written
    assert img.array.shape == (64, 64, 6) and img.spacing[0] == pytest.approx(seq.spacing[1])
    assert len({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in synth_cines}) == 4


def _malformed(good: pydicom.Dataset, k: int) -> pydicom.Dataset:
    """Variant ``k`` of a bad instance in a study of its own: truncated pixels, wrong transfer syntax, fuzzed tags."""
    ds = pydicom.dcmread(good.filename)
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, kw, pydicom.uid.generate_uid(entropy_srcs=["malformed", kw, str(k)]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    kind = k % 5
    if kind == 0:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated pixel data
    elif kind == 1:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000  # claims JPEG 2000, holds raw bytes
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    elif kind == 2:
        ds.Rows = 0  # fuzzed geometry tag
    elif kind == 3:
        ds.BitsAllocated = 13
    else:
        ds.NumberOfFrames = 10_000_000  # claims far more frames than it holds
    return ds


def test_folder_batch_with_malformed_instances(tmp_path, tiny_botm_ckpt, synth_cines):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    good = [pydicom.dcmread(p) for p in synth_cines[:2]]
    for ds in good:
        ds.save_as(src / f"{ds.SOPInstanceUID}.dcm")
    n_bad = 10
    for k in range(n_bad):
        _malformed(good[0], k).save_as(src / f"bad_{k}.dcm", enforce_file_format=False)
    (src / "notes.txt").write_text("not DICOM")
    summary = run_batch(bundle="botm_seg", source=str(src), dest=str(dst), ledger=str(tmp_path / "l" / "l.sqlite"),
                        ckpt=str(tiny_botm_ckpt), device="cpu", overrides=TINY_BOTM)
    c = summary["ledger"]
    assert c["done"] == 2 and c["failed"] + c["skipped"] == n_bad and c["queued"] == c["running"] == 0, c
    book = Ledger(tmp_path / "l" / "l.sqlite")
    assert all(r["reason"] for r in book.rows("failed") + book.rows("skipped"))
    # the reader's own reason, not MONAI's "applying transform" wrapper
    assert not any("applying transform" in r["reason"] for r in book.rows("failed")), book.rows("failed")
    assert len(book.rows("failed")) >= n_bad // 2, [r["reason"] for r in book.rows("skipped")]
    written = sorted(p for p in dst.rglob("*.dcm"))
    assert len(written) == 4  # a SEG and an SR per good study
    assert Counter(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in written) == {"SEG": 2, "SR": 2}


def test_missing_checkpoint_is_a_clear_error_and_the_row_stays_pending(tmp_path, synth_cines):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.dcm").write_bytes(synth_cines[0].read_bytes())
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.pt not found"):
        run_batch(bundle="botm_seg", source=str(src), dest=str(tmp_path / "out"),
                  ledger=str(tmp_path / "l" / "l.sqlite"), ckpt=str(tmp_path / "nope.pt"), device="cpu")
    rows = Ledger(tmp_path / "l" / "l.sqlite").rows()
    assert [r["state"] for r in rows] == ["queued"] and "nope.pt" in rows[0]["reason"]
    with pytest.raises(ValueError, match="--source is required"):
        run_batch(bundle="botm_seg", source="")


def test_unreachable_source_at_query_time_stops_with_the_reason(tmp_path):
    """No PACS on the port: the run stops before queuing anything, with a reason and exit code 2 on the CLI."""
    import subprocess
    import sys

    from tools.pacs.orthanc import free_port
    from tools.pacs.run import run_batch

    source = f"dicomweb://127.0.0.1:{free_port()}/dicom-web"
    summary = run_batch(bundle="botm_seg", source=source, ledger=str(tmp_path / "ledger.sqlite"), attempts=1,
                        backoff=0.0)
    assert summary["stopped"].startswith("source unreachable while querying")
    assert summary["selected"] == 0 and not any(summary["counts_this_run"].values())
    proc = subprocess.run([sys.executable, "-m", "tools.pacs", "run", "--bundle", "botm_seg", "--source", source,
                           "--ledger", str(tmp_path / "cli" / "ledger.sqlite"), "--attempts", "1", "--backoff", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "source unreachable while querying" in proc.stdout
