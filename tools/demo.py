"""The main job on the embedded synthetic default: ``make demo`` (or ``python -m tools.demo``).

Runs every part of the collection that exists, each as a step with progress, and ends by printing where each
result and picture is. Parts that are not built yet are listed plainly as such.

A bundle joins the demo by shipping ``configs/demo.json``: overrides (small epochs, reduced size) applied on top
of ``train.json``, then ``evaluate.json`` and ``inference.json`` are run with the same overrides.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fire

__all__ = ["run_demo", "BUNDLES"]

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("botm_seg", "lssc_multimodal", "adacs_registration", "specknet_tracking")


def _step_synthetic(out: Path) -> list[str]:
    try:
        echo = importlib.import_module("common.data.synthetic.echo")
        layouts = importlib.import_module("common.data.synthetic.echo_layouts")
    except ImportError:
        return ["NOT BUILT YET: the echo simulator (issue: synthetic ground-truth data)"]
    results = []
    root = layouts.write_camus(out / "camus_nifti", n_patients=2, seed=0, release="nifti", progress=True)
    results.append(f"CAMUS-layout synthetic echo: {root}")
    seq = echo.simulate_echo_sequence(seed=0, view="4CH", n_frames=16)
    if hasattr(echo, "plot_echo_sequence"):
        png = out / "synthetic_echo_4ch.png"
        echo.plot_echo_sequence(seq, png)
        results.append(f"picture of simulated frames with masks and tracks: {png}")
    results.append(f"true GLS of the simulated patient: {seq.gls:.1f} %")
    return results


def _step_benchmarks(out: Path) -> list[str]:
    results = []
    for name in ("sinkhorn", "cost_volume"):
        try:
            mod = importlib.import_module(f"tools.bench.{name}")
        except ImportError:
            results.append(f"NOT BUILT YET: {name} op and its benchmark (issue: common.ops)")
            continue
        paths = mod.run(out_dir=str(out), quick=True)
        results.append(f"{name} quick benchmark: {paths.get('md', out)}" if isinstance(paths, dict) else
                       f"{name} quick benchmark under {out}")
    return results


def _bundle_step(name: str) -> Callable[[Path], list[str]]:
    def step(out: Path) -> list[str]:
        configs = REPO_ROOT / "bundles" / name / "configs"
        demo = configs / "demo.json"
        if not demo.is_file():
            return [f"NOT BUILT YET: bundle {name}"]
        base = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(REPO_ROOT / "bundles" / name),
                "--output_dir", str(out)]
        stages = [("train", ["train.json", "demo.json"]), ("evaluate", ["train.json", "evaluate.json", "demo.json"]),
                  ("inference", ["inference.json", "demo.json"])]
        results = []
        for stage, files in stages:
            cfg = "[" + ",".join(f"'{configs / f}'" for f in files) + "]"
            print(f"   - {name}: {stage}", flush=True)
            proc = subprocess.run(base + ["--config_file", cfg], cwd=REPO_ROOT)
            if proc.returncode != 0:
                results.append(f"FAILED: {name} {stage} (exit {proc.returncode}); see the log above")
                return results
        results.append(f"{name}: outputs under {out}")
        results += [f"  picture: {p}" for p in sorted(out.rglob("*.png"))[:6]]
        return results

    return step


def run_demo(output_dir: str = "output/demo", only: str | None = None) -> int:
    """Run the demo steps (``only``: a comma-separated subset of step names); returns 0 when nothing failed."""
    out_root = Path(output_dir).resolve()
    steps: list[tuple[str, Callable[[Path], list[str]]]] = [
        ("synthetic", _step_synthetic),
        ("benchmarks", _step_benchmarks),
        *[(b, _bundle_step(b)) for b in BUNDLES],
    ]
    if only:
        wanted = set(only.split(",")) if isinstance(only, str) else set(only)
        steps = [s for s in steps if s[0] in wanted]
    summary: list[tuple[str, list[str], float]] = []
    for i, (name, step) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {name} ...", flush=True)
        t0 = time.time()
        out = out_root / name
        out.mkdir(parents=True, exist_ok=True)
        try:
            lines = step(out)
        except Exception as e:  # one failed step must not hide the others' results
            lines = [f"FAILED: {type(e).__name__}: {e}"]
        summary.append((name, lines, time.time() - t0))
    print("\n==== demo summary ====")
    failed = False
    for name, lines, dt in summary:
        print(f"{name} ({dt:.0f} s)")
        for ln in lines:
            print(f"   {ln}")
            failed |= ln.startswith("FAILED")
    print(f"all outputs under {out_root}")
    return 1 if failed else 0


def main() -> None:
    sys.exit(fire.Fire(run_demo))


if __name__ == "__main__":
    main()
