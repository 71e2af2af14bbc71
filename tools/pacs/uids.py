"""Deterministic result UIDs, work sharding and UID hashing for logs.

* :func:`result_uid` -- the UID of a result (a SEG or SR instance, its series) is a function of the source UIDs,
  the bundle name and version and the result kind (``pydicom.uid.generate_uid`` with entropy sources, a SHA-512
  based derivation under pydicom's root). A rerun, a retry or two workers racing on the same series produce the
  same UIDs, so the destination can be asked "is it there already?" and a second store is never a second instance.
* :func:`shard_of` -- which of ``world_size`` workers owns a study: a stable hash of the StudyInstanceUID (not
  Python's salted ``hash``), so every process on every host splits the same batch the same way without talking.
* :func:`hash_uid` -- a short, non-reversible tag of a UID for logs (``#3fa2c1d09b7e``): logs can be correlated
  with the ledger (which stores the UIDs) without printing identifiers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from pydicom.uid import generate_uid

__all__ = ["hash_uid", "result_uid", "scrub_uids", "shard_of"]


def result_uid(kind: str, source_uids: Sequence[str], bundle: str, version: str) -> str:
    """The UID of result ``kind`` (e.g. ``"seg-series"``, ``"seg"``, ``"sr"``) for ``source_uids`` (study, series,
    instance UIDs in a fixed order) produced by ``bundle`` at ``version``. Same inputs -> same UID."""
    if not source_uids or not all(source_uids):
        raise ValueError(f"result_uid: source UIDs must be non-empty strings, got {list(source_uids)!r}")
    return generate_uid(entropy_srcs=["cardiac-bundles/tools.pacs", kind, bundle, str(version), *source_uids])


def _digest(uid: str) -> bytes:
    return hashlib.sha256(uid.encode("ascii", "replace")).digest()


def shard_of(study_uid: str, world_size: int) -> int:
    """The rank in ``[0, world_size)`` that owns ``study_uid`` (SHA-256 of the UID, modulo ``world_size``)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return int.from_bytes(_digest(study_uid)[:8], "big") % world_size


def hash_uid(uid: str | None) -> str:
    """``#`` + the first 12 hex digits of the UID's SHA-256 (``#-`` for none)."""
    return "#-" if not uid else "#" + _digest(uid).hex()[:12]


# 5+ dot-separated components: every real UID has them (1.2.840...), an IPv4 address has 4
_UID_RE = re.compile(r"(?<![\d.])\d+(?:\.\d+){4,}(?![\d.])")


def scrub_uids(text: str) -> str:
    """``text`` with every DICOM-UID-like number (5+ dot-separated components) replaced by :func:`hash_uid` -- for
    error messages that embed UIDs (e.g. a QIDO URL) before they reach a log."""
    return _UID_RE.sub(lambda m: hash_uid(m.group(0)), str(text))
