"""The main job on the embedded synthetic default: ``make demo`` (or ``python -m tools.demo``).

Runs every part of the collection, each as a step with progress, and ends by printing where each result and
picture is.

Each bundle ships ``configs/demo.json``: overrides (small epochs, reduced size) applied on top of ``train.json``,
then ``evaluate.json`` and ``inference.json`` are run with the same overrides. The demo writes under its
``output_dir`` only (besides the synthetic default datasets, generated once into their cache, ``CARDIAC_DATA_DIR``):
the reduced demo models go to ``<output_dir>/<bundle>/models``, never to the bundle's own ``models/`` folder, where
they would replace the user's checkpoints (and, being reduced, no longer load with the full-size ``inference.json``).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fire

from tools.runs import config_list

__all__ = ["run_demo", "bundle_stage_args", "BUNDLES"]

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("botm_seg", "lssc_multimodal", "adacs_registration", "specknet_tracking")


def _step_synthetic(out: Path) -> list[str]:
    from common.data.synthetic import echo, echo_layouts

    results = []
    root = echo_layouts.write_camus(out / "camus_nifti", n_patients=2, seed=0, release="nifti", progress=True)
    results.append(f"CAMUS-layout synthetic echo: {root}")
    seq = echo.simulate_echo_sequence(seed=0, view="4CH", n_frames=16)
    png = echo.plot_echo_sequence(seq, out / "synthetic_echo_4ch.png")
    results.append(f"picture of simulated frames with masks and tracks: {png}")
    results.append(f"true GLS of the simulated patient: {seq.gls:.1f} %")
    return results


def _step_benchmarks(out: Path) -> list[str]:
    results = []
    for name in ("sinkhorn", "cost_volume"):
        mod = importlib.import_module(f"tools.bench.{name}")
        paths = mod.run(out_dir=str(out), quick=True)
        results.append(f"{name} quick benchmark: {paths.get('md', out)}" if isinstance(paths, dict) else
                       f"{name} quick benchmark under {out}")
    return results


def bundle_stage_args(name: str, out: Path, extra_config: str | Path | None = None) -> list[tuple[str, list[str]]]:
    """The ``python -m monai.bundle run`` arguments of the demo stages (train, evaluate, inference) of bundle
    ``name``, every output directed under ``out``.

    ``--ckpt_dir`` is given explicitly: the configs default it to ``<bundle_root>/models``, which is the user's own
    checkpoint folder. ``extra_config`` (a JSON file) is merged after ``demo.json`` (e.g. even smaller sizes)."""
    configs = REPO_ROOT / "bundles" / name / "configs"
    tail = ["demo.json"] + ([str(Path(extra_config).resolve())] if extra_config else [])
    stages = [("train", ["train.json", *tail]), ("evaluate", ["train.json", "evaluate.json", *tail]),
              ("inference", ["inference.json", *tail])]
    common_args = ["--bundle_root", str(REPO_ROOT / "bundles" / name), "--output_dir", str(out),
                   "--ckpt_dir", str(out / "models")]
    return [(stage, ["--config_file", config_list(configs, *files), *common_args]) for stage, files in stages]


def _bundle_step(name: str, extra_config: str | Path | None = None) -> Callable[[Path], list[str]]:
    def step(out: Path) -> list[str]:
        results = []
        for stage, args in bundle_stage_args(name, out, extra_config):
            print(f"   - {name}: {stage}", flush=True)
            proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO_ROOT)
            if proc.returncode != 0:
                results.append(f"FAILED: {name} {stage} (exit {proc.returncode}); see the log above")
                return results
        results.append(f"{name}: outputs under {out} (demo model: {out / 'models' / 'model.pt'})")
        results += [f"  picture: {p}" for p in sorted(out.rglob("*.png"))[:6]]
        return results

    return step


def run_demo(output_dir: str = "output/demo", only: str | None = None, extra_config: str | None = None) -> int:
    """Run the demo steps and print where each result is; returns 0 when nothing failed.

    Args:
        output_dir: every file the demo writes goes under this folder (one subfolder per step).
        only: a comma-separated subset of the step names (``synthetic``, ``benchmarks`` and the bundle names).
        extra_config: a JSON file merged after each bundle's ``demo.json`` (e.g. smaller sizes for a quick check).
    """
    out_root = Path(output_dir).resolve()
    if extra_config and not Path(extra_config).is_file():
        raise FileNotFoundError(f"extra_config {extra_config}: no such file")
    steps: list[tuple[str, Callable[[Path], list[str]]]] = [
        ("synthetic", _step_synthetic),
        ("benchmarks", _step_benchmarks),
        *[(b, _bundle_step(b, extra_config)) for b in BUNDLES],
    ]
    if only:
        wanted = set(only.split(",")) if isinstance(only, str) else set(only)
        unknown = sorted(wanted - {name for name, _ in steps})
        if unknown:
            raise ValueError(f"only: unknown step(s) {unknown}; choose from {[name for name, _ in steps]}")
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
