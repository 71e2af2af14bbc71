"""Never lose, never duplicate: a worker SIGKILLed mid-batch, then Orthanc stopped mid-batch; each time the rerun
ends with every study done exactly once (0 lost, 0 duplicate instances in the PACS)."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import requests

from tests.tools.pacs.conftest import TINY_BOTM
from tools.pacs.run import run_batch

pytestmark = pytest.mark.server


def _states(ledger: Path) -> list[tuple[str, int, str]]:
    if not ledger.exists():
        return []
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
            return list(db.execute("SELECT state, attempts, reason FROM jobs"))
    except sqlite3.OperationalError:  # the table does not exist yet
        return []


def _start_worker(orthanc, ledger: Path, ckpt: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tools.pacs", "run", "--bundle", "botm_seg", "--source", orthanc.dicomweb_url,
           "--ledger", str(ledger), "--ckpt", str(ckpt), "--device", "cpu", "--overrides", json.dumps(TINY_BOTM),
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PAGER": "cat"})


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker ended before the fault was injected:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the worker")


def _results_per_source(orthanc) -> Counter:
    """``Counter({(source SOP UID, "SEG"|"SR"): n})`` over every result instance stored in Orthanc (each instance
    read from Orthanc's own storage, ``/instances/<id>/file``)."""
    out: Counter = Counter()
    for inst in orthanc.instances():
        r = requests.get(f"{orthanc.url}/instances/{inst['ID']}/file", timeout=60)
        r.raise_for_status()
        ds = pydicom.dcmread(io.BytesIO(r.content), stop_before_pixels=True)
        if ds.Modality == "SEG":
            src = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        elif ds.Modality == "SR":
            src = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
                .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        else:
            continue
        out[(str(src), str(ds.Modality))] += 1
    return out


def _assert_exactly_once(orthanc, sources: list[str]) -> None:
    counts = _results_per_source(orthanc)
    expected = Counter({(s, m): 1 for s in sources for m in ("SEG", "SR")})
    assert counts == expected, f"lost or duplicated results: {counts - expected} extra, {expected - counts} missing"


def test_worker_sigkill_mid_batch_then_rerun(orthanc, tiny_botm_ckpt, synth_cines, tmp_path):
    for p in synth_cines:
        orthanc.upload(p)
    sources = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in synth_cines]
    ledger = tmp_path / "run" / "ledger.sqlite"
    worker = _start_worker(orthanc, ledger, tiny_botm_ckpt)
    # kill it while a series is running after at least one is done: mid-batch and mid-series
    _wait_for(lambda: (s := [r[0] for r in _states(ledger)]).count("done") >= 1 and "running" in s, worker)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    states = [r[0] for r in _states(ledger)]
    assert "running" in states and states.count("done") < len(synth_cines), states

    summary = run_batch(bundle="botm_seg", source=orthanc.dicomweb_url, ledger=str(ledger),
                        ckpt=str(tiny_botm_ckpt), device="cpu", overrides=TINY_BOTM)
    # the SEG and SR series stored before the kill are now in the query too: skipped (no rule), not failed
    assert summary["ledger"] == {"queued": 0, "running": 0, "done": 4, "failed": 0,
                                 "skipped": summary["ledger"]["skipped"]}
    rows = _states(ledger)
    assert any(att == 2 for _, att, _ in rows), "the killed worker's series was not retried"
    _assert_exactly_once(orthanc, sources)


def test_orthanc_down_mid_batch_then_restart(orthanc, tiny_botm_ckpt, synth_cines, tmp_path):
    for p in synth_cines:
        orthanc.upload(p)
    sources = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in synth_cines]
    ledger = tmp_path / "run" / "ledger.sqlite"
    worker = _start_worker(orthanc, ledger, tiny_botm_ckpt, "--attempts", "2", "--backoff", "0.05",
                           "--max_unreachable", "2")
    _wait_for(lambda: [r[0] for r in _states(ledger)].count("done") >= 1, worker)
    orthanc.stop(kill=True)  # the PACS dies without warning
    out, err = worker.communicate(timeout=120)
    # the batch stopped with "pending" (exit 2), nothing was marked failed, the pending rows say why
    assert worker.returncode == 2, (worker.returncode, err[-3000:])
    rows = _states(ledger)
    assert not any(s == "failed" for s, _, _ in rows), rows
    assert any(s == "queued" and reason.startswith("pending:") and "no answer" in reason for s, _, reason in rows)
    # the connection errors embed QIDO URLs with UIDs: the log must carry them hashed only
    log_text = (ledger.parent / "pacs.log").read_text()
    assert "no answer" in log_text
    for p in synth_cines:
        hdr = pydicom.dcmread(p, stop_before_pixels=True)
        assert str(hdr.StudyInstanceUID) not in log_text and str(hdr.SOPInstanceUID) not in log_text
    status = subprocess.run([sys.executable, "-m", "tools.pacs", "status", "--ledger", str(ledger)],
                            capture_output=True, text=True, timeout=120, check=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PAGER": "cat"})
    assert "pending" in status.stdout

    orthanc.start()  # same storage, same ports
    summary = run_batch(bundle="botm_seg", source=orthanc.dicomweb_url, ledger=str(ledger),
                        ckpt=str(tiny_botm_ckpt), device="cpu", overrides=TINY_BOTM)
    assert summary["ledger"] == {"queued": 0, "running": 0, "done": 4, "failed": 0,
                                 "skipped": summary["ledger"]["skipped"]}
    _assert_exactly_once(orthanc, sources)


def test_ctrl_c_stops_cleanly_and_rerun_resumes(tmp_path, tiny_botm_ckpt, synth_cines):
    """SIGINT (Ctrl-C) after the first study: the current series finishes, the worker exits 130, no row is left
    running; the rerun does the rest (a folder is source and destination here: no server needed)."""
    src, dst, ledger = tmp_path / "in", tmp_path / "out", tmp_path / "run" / "ledger.sqlite"
    src.mkdir()
    for p in synth_cines:
        (src / p.name).write_bytes(p.read_bytes())
    cmd = [sys.executable, "-m", "tools.pacs", "run", "--bundle", "botm_seg", "--source", str(src), "--dest", str(dst),
           "--ledger", str(ledger), "--ckpt", str(tiny_botm_ckpt), "--device", "cpu", "--overrides",
           json.dumps(TINY_BOTM)]
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, env={**os.environ, "PAGER": "cat"})
    _wait_for(lambda: "running" in [r[0] for r in _states(ledger)], worker)
    worker.send_signal(signal.SIGINT)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 130, err[-3000:]
    states = [r[0] for r in _states(ledger)]
    assert "running" not in states and "failed" not in states and states.count("done") < 4, states
    summary = run_batch(bundle="botm_seg", source=str(src), dest=str(dst), ledger=str(ledger),
                        ckpt=str(tiny_botm_ckpt), device="cpu", overrides=TINY_BOTM)
    assert summary["ledger"] == {"queued": 0, "running": 0, "done": 4, "failed": 0, "skipped": 0}
    assert len(list(dst.rglob("*.dcm"))) == 8  # one SEG + one SR per study, none twice
