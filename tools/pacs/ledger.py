"""The durable job ledger of a PACS batch: one SQLite file (WAL mode) per run folder.

One row per ``(study, series, bundle, version)`` with its ``state`` -- ``queued``, ``running``, ``done``,
``failed``, ``skipped`` -- the ``reason`` (why it failed, was skipped or is still pending), ``attempts``, the owner
(``host``, ``pid``) while running, the result UIDs and per-step timings (retrieve, decode, model, encode, store).
A rerun resumes: ``done``/``failed``/``skipped`` rows are not redone (``--retry_failed`` requeues failures), and
``running`` rows whose process is gone (same host, PID not alive) go back to ``queued``. Several processes on one
host may share the file (WAL + busy timeout); nothing else is shared between hosts -- the destination PACS is the
source of truth through the deterministic result UIDs.

Privacy: only UIDs, states, reasons and timings are stored -- never patient name, ID or birth date.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["STATES", "Ledger", "pid_alive"]

STATES = ("queued", "running", "done", "failed", "skipped")
TIMINGS = ("retrieve", "decode", "model", "encode", "store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    bundle TEXT NOT NULL,
    version TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped')),
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    host TEXT NOT NULL DEFAULT '',
    pid INTEGER NOT NULL DEFAULT 0,
    rank INTEGER NOT NULL DEFAULT 0,
    results TEXT NOT NULL DEFAULT '[]',
    timings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    PRIMARY KEY (study_uid, series_uid, bundle, version)
);
"""


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Ledger:
    """The job table of one run folder (see the module docstring). ``path`` is created with its parents."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        # autocommit mode; every change is one short IMMEDIATE transaction (see _tx)
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        with self._tx():
            self._db.execute(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    # ------------------------------------------------------------------------------------------------- writing
    def add(self, study_uid: str, series_uid: str, bundle: str, version: str, rank: int = 0) -> dict:
        """Insert a ``queued`` row unless the key exists; returns the row as it is now."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO jobs (study_uid, series_uid, bundle, version, state, rank, created) "
                       "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                       (study_uid, series_uid, bundle, version, rank, time.time()))
        return self.get(study_uid, series_uid, bundle, version)  # type: ignore[return-value]

    def recover(self) -> int:
        """Requeue ``running`` rows of this host whose process is dead (a killed worker); returns how many."""
        n = 0
        with self._tx() as db:
            rows = db.execute("SELECT study_uid, series_uid, bundle, version, pid FROM jobs "
                              "WHERE state = 'running' AND host = ?", (self.host,)).fetchall()
            for r in rows:
                if r["pid"] != self.pid and not pid_alive(int(r["pid"])):
                    db.execute("UPDATE jobs SET state = 'queued', reason = ? WHERE study_uid = ? AND series_uid = ? "
                               "AND bundle = ? AND version = ?",
                               (f"worker pid {r['pid']} died while running", *self._key(r)))
                    n += 1
        return n

    @staticmethod
    def _key(row: Mapping[str, Any]) -> tuple[str, str, str, str]:
        return row["study_uid"], row["series_uid"], row["bundle"], row["version"]

    def claim(self, study_uid: str, series_uid: str, bundle: str, version: str) -> bool:
        """Mark a ``queued`` row ``running`` by this process (attempts + 1); False if it is not queued."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, host = ?, pid = ?, "
                             "started = ?, reason = '' WHERE study_uid = ? AND series_uid = ? AND bundle = ? "
                             "AND version = ? AND state = 'queued'",
                             (self.host, self.pid, time.time(), study_uid, series_uid, bundle, version))
            return cur.rowcount == 1

    def finish(self, study_uid: str, series_uid: str, bundle: str, version: str, state: str, reason: str = "",
               results: list[str] | None = None, timings: Mapping[str, float] | None = None) -> None:
        """Set a row's final (or pending: ``queued``) ``state`` with ``reason``, result UIDs and timings (s)."""
        if state not in STATES:
            raise ValueError(f"ledger state must be one of {STATES}, got {state!r}")
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, reason = ?, results = ?, timings = ?, finished = ?, pid = ? "
                       "WHERE study_uid = ? AND series_uid = ? AND bundle = ? AND version = ?",
                       (state, reason[:2000], json.dumps(results or []), json.dumps(dict(timings or {})),
                        time.time(), 0 if state != "running" else self.pid, study_uid, series_uid, bundle, version))

    def requeue_failed(self) -> int:
        """Put every ``failed`` row back to ``queued``; returns how many."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'failed'").rowcount

    # ------------------------------------------------------------------------------------------------- reading
    def get(self, study_uid: str, series_uid: str, bundle: str, version: str) -> dict | None:
        """The row of a key as a dict, or None."""
        r = self._db.execute("SELECT * FROM jobs WHERE study_uid = ? AND series_uid = ? AND bundle = ? "
                             "AND version = ?", (study_uid, series_uid, bundle, version)).fetchone()
        return None if r is None else dict(r)

    def rows(self, state: str | None = None) -> list[dict]:
        """All rows (of one ``state``), oldest first."""
        q, args = "SELECT * FROM jobs", ()
        if state is not None:
            q, args = q + " WHERE state = ?", (state,)
        return [dict(r) for r in self._db.execute(q + " ORDER BY created, study_uid, series_uid", args)]

    def counts(self) -> dict[str, int]:
        """``{state: count}`` for every state (zeros included)."""
        out = dict.fromkeys(STATES, 0)
        for r in self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            out[r["state"]] = int(r["n"])
        return out
