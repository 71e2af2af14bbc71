"""``python -m tools.reproduce <claim>|all [--quick] [--seeds 5] [--out_dir output/reproduce] [--device cpu]``.

Sizes: the default is the full run meant for a GPU; ``--quick`` fits in about 10 minutes per claim on a 2-core CPU;
``--smoke`` is the CI size that only checks the plumbing (its ``holds`` means nothing and the report says so).
Each claim writes ``<out_dir>/<claim>.json|.md|.png``; its training runs and data go under ``<out_dir>/<claim>/``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tools.reproduce import CLAIMS
from tools.reproduce.result import write_claim_report

logger = logging.getLogger("tools.reproduce")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_claim(claim: str, size: str = "full", seeds: int = 5, out_dir: str | Path = "output/reproduce",
              device: str = "cpu", command: str = "") -> dict[str, Any]:
    """Run one claim at ``size`` with ``seeds`` training seeds; write and return its JSON payload."""
    if claim not in CLAIMS:
        raise ValueError(f"unknown claim {claim!r}; choose one of {sorted(CLAIMS)} or 'all'")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    module = importlib.import_module(CLAIMS[claim])
    work_dir = Path(out_dir) / claim
    work_dir.mkdir(parents=True, exist_ok=True)
    logger.info("claim %s: size %s, %d seed(s), work dir %s", claim, size, seeds, work_dir)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    result = module.run(size=size, seeds=seeds, work_dir=work_dir, device=device)
    runtime = time.perf_counter() - t0
    payload = result.to_json(size=size, seeds=seeds, command=command or f"python -m tools.reproduce {claim}",
                             runtime_s=runtime)
    # CPU seconds of this process and the training subprocesses it waited for: on a shared machine the wall time
    # says little about the budget, the CPU time does (on 2 free cores the wall time is about cpu_time_s / 2..1)
    payload["cpu_time_s"] = _cpu_seconds() - cpu0
    if size == "smoke":
        payload["details"]["smoke_note"] = "smoke size checks the plumbing only; 'holds' is not a result"
    paths = write_claim_report(payload, out_dir)
    logger.info("claim %s %s (p = %s) in %.0f s -> %s", claim, "holds" if payload["holds"] else "does NOT hold",
                payload["p_value"], runtime, paths["json"])
    return payload


def _summary(payloads: list[dict[str, Any]], out_dir: Path) -> Path:
    lines = ["# Claims", "", "| claim | metric | method | baseline | method mean | baseline mean | n | p | holds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in payloads:
        c = p["comparisons"][0]
        lines.append(f"| {p['claim']} | {p['metric']} | {p['method']} | {p['baseline']} | {c['method_mean']:.4g} | "
                     f"{c['baseline_mean']:.4g} | {p['n']} | {p['p_value']} | {'yes' if p['holds'] else 'no'} |")
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("claim", choices=[*CLAIMS, "all"], help="the claim to test, or all of them in turn")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU size: about 10 minutes per claim on 2 cores")
    size.add_argument("--smoke", action="store_true", help="CI size: checks the plumbing only")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per arm (default 5)")
    parser.add_argument("--out_dir", default="output/reproduce", help="where the reports go")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    size_name = "quick" if args.quick else "smoke" if args.smoke else "full"
    claims = list(CLAIMS) if args.claim == "all" else [args.claim]
    command = "python -m tools.reproduce " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    payloads, failed = [], []
    for claim in claims:
        try:
            payloads.append(run_claim(claim, size_name, args.seeds, args.out_dir, args.device, command))
        except Exception:  # one claim failing must not hide the others' results; the exit code reports it
            if len(claims) == 1:
                raise
            logger.exception("claim %s failed", claim)
            failed.append(claim)
    if len(claims) > 1:
        logger.info("summary: %s", _summary(payloads, Path(args.out_dir)))
    if failed:
        logger.error("claims that failed to run: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
