"""``python -m tools.pacs run|status`` -- batch inference against a PACS (see :mod:`tools.pacs`)."""

from __future__ import annotations

import functools
import json
import sys

import fire

from tools.pacs.run import run_batch, status

__all__ = ["main"]


@functools.wraps(run_batch)  # fire reads run_batch's signature through __wrapped__: flags are typed (--dry_run)
def _run(*args: object, **kwargs: object) -> None:
    """Run a bundle over a PACS or folder (see :func:`tools.pacs.run.run_batch`); prints a JSON summary.
    Exit code 0 when the batch finished, 2 when series stay pending (PACS unreachable), 130 when interrupted."""
    summary = run_batch(*args, **kwargs)  # type: ignore[arg-type]
    print(json.dumps(summary, indent=2))
    if summary.get("stopped") == "interrupted" or summary.get("stopped") == "stop requested":
        sys.exit(130)
    if summary.get("stopped"):
        sys.exit(2)


def _status(ledger: str = "output/pacs/ledger.sqlite") -> None:
    """Counts by state and failures/pending rows with reasons, as JSON."""
    print(json.dumps(status(ledger), indent=2))


def main() -> None:
    """The fire entry point."""
    fire.Fire({"run": _run, "status": _status})


if __name__ == "__main__":
    main()
