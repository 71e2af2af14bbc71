"""Listing the cases of a dataset folder when some of them cannot be read: one mechanism for every reader.

The dataset readers (:mod:`common.data.camus`, :mod:`~common.data.ted`, :mod:`~common.data.acdc`,
:mod:`~common.data.registration`, :mod:`~common.data.pairs`, :mod:`~common.data.tracking`,
:mod:`~common.data.mmwhs`) read headers, configuration files and sometimes labels while they list a folder's cases.
Their datalist functions take an optional ``ledger`` (anything with ``fail(input_id, reason, stage)``, in practice
a :class:`common.engines.screening.BatchLedger`) and build each case through :func:`build_cases`:

* without a ledger (training) the first unreadable case stops the run with the reader's error, which names the file;
* with a ledger (evaluation, ``evaluate.json``) an unreadable case is recorded (stage ``datalist``) and left out, and
  the others are listed; only when no case at all could be read does listing fail, with the reasons.

Splits are computed from names (patient folders, pair names) before any case is read, so leaving a corrupt case
out never moves another case into a different subset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from common.data.loading import DataError

__all__ = ["DATALIST_STAGE", "FailureRecorder", "build_cases", "describe_error"]

DATALIST_STAGE = "datalist"

T = TypeVar("T")
R = TypeVar("R")


class FailureRecorder(Protocol):
    """What a reader needs of a ledger: record one failed input (``BatchLedger.fail``)."""

    def fail(self, input_id: str, reason: str, stage: str) -> None:
        """Record that ``input_id`` failed at ``stage`` for ``reason``."""


def describe_error(e: BaseException) -> str:
    """One line for a failure: our own errors (which name the file) as they are, others with their type.

    MONAI wraps an error inside a transform as ``RuntimeError: applying transform ...`` (and config expressions as
    ``Failed to evaluate ...``); the innermost cause is what the user needs, preferably one of our named errors.
    """
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    ours = [c for c in chain if isinstance(c, (DataError, FileNotFoundError))]
    e = ours[0] if ours else chain[-1]
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (DataError, FileNotFoundError)):
        return text
    return f"{type(e).__name__}: {text}"


def build_cases(cases: Iterable[T], build: Callable[[T], R], case_id: Callable[[T], str | Path],
                ledger: FailureRecorder | None = None, where: str | Path = "dataset") -> list[R]:
    """``[build(c) for c in cases]``, except that with ``ledger`` a case whose ``build`` raises is recorded there
    (input ``case_id(c)``, the error's message, stage ``datalist``) and left out.

    Args:
        cases: the cases of the requested split, in order.
        build: reads one case (headers, cfg files, labels) and returns its datalist entry (or entries).
        case_id: the name of a case in the record (its folder or main file).
        ledger: ``None`` raises the first error unchanged (training stops naming the file).
        where: the dataset folder, for the message when no case could be read.

    Raises:
        DataError: with ``ledger``, when there were cases and none could be read (the reasons of the first few).
    """
    out: list[R] = []
    reasons: list[str] = []
    for case in cases:
        if ledger is None:
            out.append(build(case))
            continue
        try:
            out.append(build(case))
        except Exception as e:  # readers of corrupt files raise many unrelated types; each is this case's failure
            cid, reason = str(case_id(case)), describe_error(e)
            ledger.fail(cid, reason, DATALIST_STAGE)
            reasons.append(reason if cid in reason else f"{cid}: {reason}")
    if reasons and not out:
        shown = "; ".join(reasons[:5]) + (f"; ... and {len(reasons) - 5} more" if len(reasons) > 5 else "")
        raise DataError(f"{where}: no case could be read ({len(reasons)} failed): {shown}")
    return out
