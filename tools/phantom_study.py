"""Speckle-phantom study of ``specknet_tracking``: zero motion, NCC block matching and SpeckNet (paper mode and with
the locality prior) per motion amplitude, on phantoms drawn outside the training ranges.

A speckle tracker is validated first on a phantom: fully developed speckle moving with a known motion, no anatomy.
``generate`` writes such a test set with :mod:`common.data.synthetic.phantom`, with parameters (scatterer density,
PSF size, frame rate) drawn from ranges **disjoint from the training ranges** (the defaults of
:func:`~common.data.synthetic.phantom.draw_phantom_params`, which the training mix-in ``phantom_videos`` uses); the
generator refuses test ranges that overlap them. One sub-folder per amplitude (``amp04/``, ``amp08/``, ...) holds
every motion type, so the evaluation's per-dataset table is the per-amplitude table.

``run`` evaluates each tracker with the bundle's own ``evaluate.json`` (the phantom folder is just another
``dataset_dir``, ``--eval_split all``) as the ``python -m monai.bundle run`` subprocess a user types, and joins the
``metrics.json`` files into ``phantom_study.json``, ``phantom_study.md`` and ``phantom_study.png``.

Examples::

    python -m tools.phantom_study generate --out data/phantom_test
    python -m tools.phantom_study run --data_dir data/phantom_test \\
        --ckpt_path bundles/specknet_tracking/models/model.pt --configs reduced.json --out_dir output/phantom_study
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import numpy as np

from tools.runs import config_list, override_args, run_bundle_cli

__all__ = ["TEST_RANGES", "TRACKERS", "generate", "run", "study_tables", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "specknet_tracking" / "configs"
# held-out phantom parameters: each range lies outside the training range of draw_phantom_params (checked below)
TEST_RANGES: dict[str, tuple[float, float]] = {
    "density": (5.0, 8.0),
    "sigma_axial": (1.5, 1.9),
    "sigma_lateral": (2.4, 3.0),
    "fps": (65.0, 90.0),
}
# tracker name -> evaluate.json overrides (the locality-prior modes are options of the network's cost-volume op)
TRACKERS: dict[str, dict[str, Any]] = {
    "ncc": {"tracker": "ncc"},
    "specknet_paper": {"tracker": "specknet", "search": "global"},
    "specknet_chained": {"tracker": "specknet", "search": "chained"},
    "specknet_coarse_to_fine": {"tracker": "specknet", "search": "coarse_to_fine"},
}
_LABELS = {"zero_motion": "zero motion", "ncc": "NCC block matching", "specknet_paper": "SpeckNet, paper (global)",
           "specknet_chained": "SpeckNet, locality prior (chained window)",
           "specknet_coarse_to_fine": "SpeckNet, locality prior (coarse-to-fine)"}


def _check_disjoint(ranges: Mapping[str, Sequence[float]]) -> None:
    """Refuse a test range that overlaps the training range (the default of ``draw_phantom_params``)."""
    from common.data.synthetic.phantom import draw_phantom_params

    defaults = inspect.signature(draw_phantom_params).parameters
    for name, (lo, hi) in ranges.items():
        tlo, thi = defaults[name].default
        if not (hi < tlo or lo > thi):
            raise ValueError(f"phantom_study: test range {name} = [{lo}, {hi}] overlaps the training range "
                             f"[{tlo}, {thi}]; a held-out test set must lie outside it")


def generate(out: str, amplitudes: Sequence[float] = (4, 8, 16), videos_per_motion: int = 2, seed: int = 2027,
             n_frames: int = 40, image_size: int = 256, n_points: int = 32) -> str:
    """Write the held-out phantom test set: ``out/ampNN/<motion>/phantomNNNN.h5`` for every amplitude (peak
    displacement in px) and motion type, parameters drawn from :data:`TEST_RANGES`."""
    from common.data.synthetic.phantom import MOTIONS, write_phantom_h5

    _check_disjoint(TEST_RANGES)
    amps = [float(a) for a in (amplitudes if isinstance(amplitudes, (list, tuple)) else [amplitudes])]
    for ai, amp in enumerate(amps):
        for mi, motion in enumerate(MOTIONS):
            folder = Path(out) / f"amp{int(round(amp)):02d}" / motion
            write_phantom_h5(folder, n_videos=int(videos_per_motion), seed=int(seed) * 1000 + ai * 10 + mi,
                             motion=motion, amplitude=amp, image_size=(int(image_size), int(image_size)),
                             n_frames=int(n_frames), n_points=int(n_points), progress=False, **TEST_RANGES)
    n = len(amps) * len(MOTIONS) * int(videos_per_motion)
    print(f"wrote {n} held-out phantom videos to {out} (amplitudes {amps} px, ranges {TEST_RANGES})")
    return str(out)


def _metrics_row(m: Mapping[str, Any]) -> dict[str, float | None]:
    m = m.get("metrics", m)  # metrics.json nests the overall numbers under "metrics"; per-dataset entries do not
    keys = ("delta_avg", "mte", "zero_motion_delta_avg", "zero_motion_mte", "n_videos")
    return {k: m.get(k) for k in keys}


def study_tables(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{tracker: metrics.json}`` -> ``{"overall": {tracker: row}, "per_amplitude": {amp: {tracker: row}}}`` with
    the zero-motion predictor as its own tracker (it is the same for every run)."""
    overall: dict[str, Any] = {}
    per_amp: dict[str, dict[str, Any]] = {}
    for name, m in metrics.items():
        overall[name] = _metrics_row(m)
        for amp, sub in sorted((m.get("per_dataset") or {}).items()):
            per_amp.setdefault(amp, {})[name] = _metrics_row(sub)
    first = next(iter(metrics.values()))
    first = first.get("metrics", first)
    overall = {"zero_motion": {"delta_avg": first.get("zero_motion_delta_avg"), "mte": first.get("zero_motion_mte"),
                               "n_videos": first.get("n_videos")}, **overall}
    for amp, rows in per_amp.items():
        z = next(iter(rows.values()))
        per_amp[amp] = {"zero_motion": {"delta_avg": z["zero_motion_delta_avg"], "mte": z["zero_motion_mte"],
                                        "n_videos": z["n_videos"]}, **rows}
    return {"overall": overall, "per_amplitude": per_amp}


def _fmt(v: Any, nd: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{float(v):.{nd}f}"


def _markdown(tables: Mapping[str, Any], header: str) -> str:
    names = list(tables["overall"])
    lines = [header, "", "| amplitude | " + " | ".join(f"{_LABELS.get(n, n)} δ_avg / MTE" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    rows = [*tables["per_amplitude"].items(), ("all", tables["overall"])]
    for amp, r in rows:
        cells = [f"{_fmt(r.get(n, {}).get('delta_avg'))} / {_fmt(r.get(n, {}).get('mte'), 2)}" for n in names]
        lines.append(f"| {amp} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(tables: Mapping[str, Any], out_png: Path) -> Path:
    from common.plotting import save_figure, subplots

    names = list(tables["overall"])
    groups = [*tables["per_amplitude"], "all"]
    fig, ax = subplots(figsize=(1.6 + 1.3 * len(groups), 3.4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [(tables["per_amplitude"].get(g, {}) if g != "all" else tables["overall"]).get(n, {}).get("delta_avg")
                for g in groups]
        xs = np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=_LABELS.get(n, n))
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("δ_avg (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out speckle phantoms", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    return save_figure(fig, out_png, dpi=120)


def run(data_dir: str, ckpt_path: str, out_dir: str = "output/phantom_study", configs: Sequence[str] = (),
        trackers: Sequence[str] = tuple(TRACKERS), overrides: Mapping[str, Any] | None = None,
        timeout: float = 3600) -> dict[str, Any]:
    """Evaluate every tracker of ``trackers`` on ``data_dir`` with ``evaluate.json`` and write the study files.

    ``configs`` are bundle config files merged between ``train.json`` and ``evaluate.json``, the ones the checkpoint
    was trained with (e.g. ``reduced.json``: same input size and feature pyramid); ``overrides`` are extra bundle
    overrides for every run (e.g. ``{"search_radius": 3}``).
    """
    extra = [configs] if isinstance(configs, str) else list(configs)
    names = [trackers] if isinstance(trackers, str) else list(trackers)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"phantom_study: unknown tracker(s) {unknown}; choose from {list(TRACKERS)}")
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"phantom_study: {data_dir} is not a folder (write one with `generate`)")
    out = Path(out_dir)
    metrics: dict[str, Any] = {}
    files = config_list(CONFIGS, "train.json", *extra, "evaluate.json")
    for name in names:
        run_dir = out / "runs" / name
        args = {"dataset_dir": str(Path(data_dir).resolve()), "eval_split": "all",
                "ckpt_path": str(Path(ckpt_path).resolve()), "output_dir": str(run_dir.resolve()), **TRACKERS[name],
                **dict(overrides or {})}
        proc = run_bundle_cli("run", files, *override_args(args),
                              cwd=REPO_ROOT, check=False, timeout=timeout)
        # exit 3 = some videos failed and are listed in failed_inputs.json; the metrics cover the others
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"phantom_study: evaluation of {name} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        metrics[name] = json.loads((run_dir / "metrics.json").read_text())
        row = _metrics_row(metrics[name])
        print(f"{name}: δ_avg {_fmt(row['delta_avg'])}, MTE {_fmt(row['mte'], 2)} ({proc.elapsed:.0f} s)")
    tables = study_tables(metrics)
    result = {"data_dir": str(data_dir), "ckpt_path": str(ckpt_path), "configs": extra,
              "test_ranges": TEST_RANGES, "overrides": dict(overrides or {}), **tables}
    out.mkdir(parents=True, exist_ok=True)
    (out / "phantom_study.json").write_text(json.dumps(result, indent=2))
    md = _markdown(tables, f"Held-out speckle phantoms ({data_dir}), configs train.json {' '.join(extra)} "
                           "evaluate.json; metrics at 256x256; cells: δ_avg (%) / MTE (px)")
    (out / "phantom_study.md").write_text(md)
    _plot(tables, out / "phantom_study.png")
    print(md)
    return result


def main() -> None:
    def run_cli(*args: Any, **kwargs: Any) -> None:
        run(*args, **kwargs)  # the tables are printed and written; do not let fire print the returned dict

    run_cli.__doc__ = run.__doc__
    fire.Fire({"generate": generate, "run": run_cli})


if __name__ == "__main__":
    sys.exit(main())
