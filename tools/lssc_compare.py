"""LSSC settings side by side on one split: the full method, the few-shot setting (paper Table 4) and the
single-modality Baseline, trained and evaluated with the ``lssc_multimodal`` bundle; JSON + Markdown + a plot.

Every setting is one ``train.json`` run and one ``train.json + evaluate.json`` run with the same data split, seed
and overrides; only the setting's own keys (``variant``, ``modalities``, ``few_shot``) differ. Dice (%) and ASD (mm)
are the evaluation's volume scores on the test split in the original geometry (mean over the four structures).

Examples::

    # the paper's Table 4 question on the synthetic default, CPU-sized (the bundle README's numbers)
    python -m tools.lssc_compare --overrides bundles/lssc_multimodal/configs/demo.json

    # real data, GPU, all settings
    python -m tools.lssc_compare --dataset_dir /data/MM-WHS --device cuda:0 \\
        --settings full,full_mr1,full_mr3,baseline_ct,baseline_mr,baseline_mr1

Outputs under ``output_dir``: ``runs/<setting>/`` (models, evaluation), ``comparison.json``, ``comparison.md`` and
``comparison.png``; the table is also printed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fire

from tools.runs import run_workflow

__all__ = ["SETTINGS", "comparison_markdown", "plot_comparison", "run_comparison", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "lssc_multimodal" / "configs"
MODALITY_LABELS = {"ct": "CT", "mr": "MRI"}
SETTINGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "full": ("LSSC (full)", "all CT + all MRI", {"variant": "full"}),
    "full_mr1": ("LSSC (full)", "all CT + 1 MRI", {"variant": "full", "few_shot": {"mr": 1}}),
    "full_mr3": ("LSSC (full)", "all CT + 3 MRI", {"variant": "full", "few_shot": {"mr": 3}}),
    "baseline_ct": ("Baseline", "all CT", {"variant": "baseline", "modalities": ["ct"]}),
    "baseline_mr": ("Baseline", "all MRI", {"variant": "baseline", "modalities": ["mr"]}),
    "baseline_mr1": ("Baseline", "1 MRI", {"variant": "baseline", "modalities": ["mr"], "few_shot": {"mr": 1}}),
}
"""``name: (method, labelled training data, bundle overrides)``."""


def _split(value: str | Sequence[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _load_overrides(overrides: str | dict | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    path = Path(str(overrides)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--overrides {str(overrides)!r}: give a dict or a JSON file of bundle overrides")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--overrides {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--overrides {str(path)!r} must hold a JSON object of bundle overrides")
    return data


def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _modality_entry(table2: dict, metric: str, modality: str) -> dict | None:
    return table2.get(metric, {}).get(modality)


def comparison_markdown(rows: list[dict[str, Any]], structures: Sequence[str]) -> str:
    """One row per setting: mean Dice (%) and ASD (mm) per modality, and the MRI Dice per structure."""
    head = ["Setting", "Method", "Labelled training data", "CT Dice", "MRI Dice", "CT ASD", "MRI ASD",
            *[f"MRI {s} Dice" for s in structures], "train s"]
    lines = ["Dice (%) and ASD (mm) on the test volumes, mean over the structures (– = modality not trained)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t2 = r["table2"]
        cells = [r["setting"], r["method"], r["data"]]
        for metric, digits in (("dice", 1), ("asd", 2)):
            for mod in ("ct", "mr"):
                e = _modality_entry(t2, metric, mod)
                cells.append(_fmt(None if e is None else e["mean"], digits))
        mr = _modality_entry(t2, "dice", "mr")
        cells += [_fmt(None if mr is None else mr[s]["mean"]) for s in structures]
        cells.append(f"{r['train_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Grouped bars: mean Dice per modality for every setting."""
    import numpy as np

    from common.plotting import save_figure, subplots

    fig, ax = subplots(figsize=(1.6 + 1.4 * len(rows), 4))
    x = np.arange(len(rows))
    for k, (mod, colour) in enumerate((("ct", "tab:orange"), ("mr", "tab:blue"))):
        vals = [(_modality_entry(r["table2"], "dice", mod) or {}).get("mean", np.nan) for r in rows]
        bars = ax.bar(x + (k - 0.5) * 0.38, vals, 0.36, label=MODALITY_LABELS[mod], color=colour)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=8)
    ax.set_xticks(x, [f"{r['method']}\n{r['data']}" for r in rows], fontsize=8)
    ax.set_ylabel("mean Dice (%)")
    ax.set_ylim(0, 115)
    ax.legend(loc="upper right", ncol=2)
    ax.set_title("LSSC settings on the test split")
    return save_figure(fig, out_png)


def run_comparison(settings: str | Sequence[str] = "full,full_mr1,baseline_mr,baseline_mr1",
                   output_dir: str = "output/lssc_compare", dataset_dir: str | None = None,
                   overrides: str | dict | None = None, device: str | None = None,
                   skip_existing: bool = True) -> dict[str, Any]:
    """Train and evaluate every setting; write ``comparison.json``, ``comparison.md`` and ``comparison.png``.

    Args:
        settings: names of :data:`SETTINGS`, comma-separated or a list.
        output_dir: where runs and reports go.
        dataset_dir: MM-WHS folder (default: the bundle's synthetic default).
        overrides: bundle overrides for every run (e.g. ``epochs``, ``spatial_size``): a dict or a JSON file such as
            ``bundles/lssc_multimodal/configs/demo.json``. A setting's own keys win over them.
        device: e.g. ``"cpu"`` or ``"cuda:0"`` (default: the bundle's choice).
        skip_existing: reuse a run whose ``eval/metrics.json`` exists (an interrupted comparison resumes).
    """
    names = _split(settings)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    extra = _load_overrides(overrides)
    if dataset_dir is not None:
        if not Path(dataset_dir).expanduser().is_dir():
            raise FileNotFoundError(f"dataset_dir {dataset_dir!r} does not exist or is not a folder")
        extra["dataset_dir"] = str(Path(dataset_dir).expanduser().resolve())
    if device:
        extra["device"] = f"$torch.device({device!r})"
    out = Path(output_dir).resolve()
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names, 1):
        method, data, keys = SETTINGS[name]
        root = out / "runs" / name
        metrics_path = root / "eval" / "metrics.json"
        t0 = time.time()
        if not (skip_existing and metrics_path.is_file()):
            run = {**extra, **keys, "bundle_root": str(root), "output_dir": str(root / "eval")}
            print(f"== [{i}/{len(names)}] {name} ({method}, {data}): training", flush=True)
            run_workflow(CONFIGS, ["train.json"], "train", **run)
            t1 = time.time()
            print(f"== [{i}/{len(names)}] {name}: evaluating", flush=True)
            run_workflow(CONFIGS, ["train.json", "evaluate.json"], "train", **run)
            (root / "train_seconds.txt").write_text(f"{t1 - t0:.1f}\n")
        else:
            print(f"== [{i}/{len(names)}] {name}: reusing {metrics_path}", flush=True)
        timing = root / "train_seconds.txt"
        train_seconds = float(timing.read_text()) if timing.is_file() else float("nan")
        metrics = json.loads(metrics_path.read_text())
        rows.append({"setting": name, "method": method, "data": data, "overrides": keys, "run_dir": str(root),
                     "table2": metrics["table2"], "metrics": metrics["metrics"], "train_seconds": train_seconds})
    structures = json.loads(metrics_path.read_text())["class_names"]
    out.mkdir(parents=True, exist_ok=True)
    md = comparison_markdown(rows, structures)
    (out / "comparison.md").write_text(md)
    plot_comparison(rows, out / "comparison.png")
    result = {"rows": rows, "overrides": extra, "structures": structures}
    from common.engines.handlers import write_json_atomic

    write_json_atomic(out / "comparison.json", result)
    print(md)
    print(f"written: {out / 'comparison.json'}, {out / 'comparison.md'} and {out / 'comparison.png'}")
    return result


def main() -> None:
    fire.Fire(run_comparison, serialize=lambda result: None)
    sys.exit(0)


if __name__ == "__main__":
    main()
