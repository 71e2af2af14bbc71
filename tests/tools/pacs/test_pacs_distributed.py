"""Two torchrun workers on one batch (the README's torchrun command): disjoint work by StudyInstanceUID hash, every
study done, nothing stored twice."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.tools.pacs.conftest import TINY_BOTM
from tests.tools.pacs.test_pacs_faults import _assert_exactly_once
from tools.pacs.uids import shard_of

pytestmark = [pytest.mark.server, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[3]


def test_two_torchrun_workers_share_a_batch(orthanc, tiny_botm_ckpt, synth_cines, tmp_path):
    for p in synth_cines:
        orthanc.upload(p)
    studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in synth_cines}
    assert {shard_of(s, 2) for s in studies} == {0, 1}, "the fixture's studies must fall on both ranks"
    section = (REPO / "README.md").read_text().split("## Batch inference against a PACS", 1)[1].split("\n## ", 1)[0]
    cmds = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("torchrun")]
    assert len(cmds) == 1, cmds
    args = shlex.split(cmds[0].replace("127.0.0.1:8042", f"127.0.0.1:{orthanc.http_port}"))
    args = [sys.executable, "-m", "torch.distributed.run", *args[1:], "--ckpt", str(tiny_botm_ckpt), "--device",
            "cpu", "--overrides", json.dumps(TINY_BOTM)]
    env = {**os.environ, "PAGER": "cat", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{cmds[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    with sqlite3.connect(tmp_path / "output" / "pacs" / "ledger.sqlite") as db:
        rows = list(db.execute("SELECT study_uid, rank, state, attempts FROM jobs"))
    # each study handled once, by the rank its hash names; both ranks worked
    assert sorted(r[0] for r in rows) == sorted(studies)
    assert all(rank == shard_of(study, 2) and state == "done" and att == 1 for study, rank, state, att in rows), rows
    assert {r[1] for r in rows} == {0, 1}
    assert (tmp_path / "output" / "pacs" / "pacs.log").exists() and (tmp_path / "output" / "pacs" /
                                                                       "pacs.rank1.log").exists()
    _assert_exactly_once(orthanc, [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                   for p in synth_cines])
