"""LSSC settings side by side on one split: every row of the paper's Table 2 (Backbone and Baseline per modality,
Joint V1-V3 with and without the consistency terms, the full method) and Table 4 (1 or 3 labelled MRI or CT volumes
with all of the other modality) on MM-WHS, and for the abdominal task (``--task abdomen``: BTCV CT + CHAOS MRI, the
bundle's ``configs/abdomen.json``) every row of Table 3 (the rows of Table 2) and Table 5 (Joint V3 with L_mcr, L_icr
or both), trained and evaluated with the ``lssc_multimodal`` bundle; JSON + Markdown + a plot.

Every setting is one ``train.json`` run and one ``train.json + evaluate.json`` run with the same data split, seed
and overrides; only the setting's own keys (``variant``, ``modalities``, ``few_shot``) differ. Dice (%) and ASD (mm)
are the evaluation's volume scores on the test split in the original geometry (mean over the four structures).

Examples::

    # the paper's Table 4 question on the synthetic default, CPU-sized (the bundle README's numbers)
    python -m tools.lssc_compare --overrides bundles/lssc_multimodal/configs/demo.json

    # real data, GPU, every run of the paper's Table 2 and Table 4 (``table2``, ``table4`` or ``all`` select groups)
    python -m tools.lssc_compare --dataset_dir /data/MM-WHS --device cuda:0 --settings all

    # abdomen (BTCV + CHAOS in one folder), the runs of the paper's Tables 3 and 5
    python -m tools.lssc_compare --task abdomen --dataset_dir /data/abdomen --settings table3,table5

Outputs under ``output_dir``: ``runs/<setting>/`` (models, evaluation), ``comparison.json``, ``comparison.md`` (one row
per run, then the runs arranged in the paper's Table 2 and Table 4 layouts (Tables 3 and 5 for the abdomen, columns
in the paper's order Liver, Spleen, R-kdy, L-kdy): Dice and ASD per structure and modality, modality means and the
overall mean; the single-modality Backbone/Baseline rows combine the CT run and the MRI run) and
``comparison.png``; the tables are also printed.
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

__all__ = ["SETTINGS", "SETTING_GROUPS", "PAPER_TABLES", "TASKS", "comparison_markdown", "paper_table_markdown",
           "plot_comparison", "run_comparison", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "lssc_multimodal" / "configs"
MODALITY_LABELS = {"ct": "CT", "mr": "MRI"}
SETTINGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "backbone_ct": ("Backbone", "all CT", {"variant": "backbone", "modalities": ["ct"]}),
    "backbone_mr": ("Backbone", "all MRI", {"variant": "backbone", "modalities": ["mr"]}),
    "baseline_ct": ("Baseline", "all CT", {"variant": "baseline", "modalities": ["ct"]}),
    "baseline_mr": ("Baseline", "all MRI", {"variant": "baseline", "modalities": ["mr"]}),
    "joint_v1": ("Joint V1", "all CT + all MRI", {"variant": "joint_v1"}),
    "joint_v2": ("Joint V2", "all CT + all MRI", {"variant": "joint_v2"}),
    "joint_v3": ("Joint V3", "all CT + all MRI", {"variant": "joint_v3"}),
    "joint_v1_cr": ("Joint V1+CR", "all CT + all MRI", {"variant": "joint_v1+cr"}),
    "joint_v2_cr": ("Joint V2+CR", "all CT + all MRI", {"variant": "joint_v2+cr"}),
    "full": ("LSSC (full)", "all CT + all MRI", {"variant": "full"}),
    "full_mr1": ("LSSC (full)", "all CT + 1 MRI", {"variant": "full", "few_shot": {"mr": 1}}),
    "full_mr3": ("LSSC (full)", "all CT + 3 MRI", {"variant": "full", "few_shot": {"mr": 3}}),
    "full_ct1": ("LSSC (full)", "1 CT + all MRI", {"variant": "full", "few_shot": {"ct": 1}}),
    "full_ct3": ("LSSC (full)", "3 CT + all MRI", {"variant": "full", "few_shot": {"ct": 3}}),
    "baseline_mr1": ("Baseline", "1 MRI", {"variant": "baseline", "modalities": ["mr"], "few_shot": {"mr": 1}}),
    # Table 5: one consistency term on Joint V3 (L_icr needs the correlation path of the "+cr" network)
    "joint_v3_mcr": ("Joint V3 + Lmcr", "all CT + all MRI", {"variant": "joint_v3", "loss#use_mcr": True}),
    "joint_v3_icr": ("Joint V3 + Licr", "all CT + all MRI", {"variant": "full", "loss#use_mcr": False}),
}
"""``name: (method, labelled training data, bundle overrides)``."""

PAPER_TABLES: dict[str, list[tuple[str, list[str]]]] = {
    "table2": [("Backbone", ["backbone_ct", "backbone_mr"]), ("Baseline", ["baseline_ct", "baseline_mr"]),
               ("Joint V1", ["joint_v1"]), ("Joint V2", ["joint_v2"]), ("Joint V3", ["joint_v3"]),
               ("Joint V1+CR", ["joint_v1_cr"]), ("Joint V2+CR", ["joint_v2_cr"]), ("Ours", ["full"])],
    "table4": [("Baseline", ["baseline_ct", "baseline_mr"]), ("Ours", ["full"]),
               ("One annotated MRI", ["full_mr1"]), ("Three annotated MRI", ["full_mr3"]),
               ("One annotated CT", ["full_ct1"]), ("Three annotated CT", ["full_ct3"])],
    "table5": [("Joint V3", ["joint_v3"]), ("Joint V3 + Lmcr", ["joint_v3_mcr"]), ("Joint V3 + Licr", ["joint_v3_icr"]),
               ("Joint V3 + Lmcr + Licr", ["full"])],
}
PAPER_TABLES["table3"] = PAPER_TABLES["table2"]  # the abdominal Table 3 has Table 2's rows
"""The paper's tables: ``table: [(paper row, the settings whose CT and MRI scores make that row)]``; a row built from
two single-modality runs takes CT from the CT run and MRI from the MRI run, as the paper's Backbone/Baseline rows."""

SETTING_GROUPS: dict[str, list[str]] = {
    name: list(dict.fromkeys(s for _, settings in rows for s in settings)) for name, rows in PAPER_TABLES.items()
}
SETTING_GROUPS["all"] = list(dict.fromkeys(SETTING_GROUPS["table2"] + SETTING_GROUPS["table4"] +
                                           SETTING_GROUPS["table5"]))
"""Names usable in ``--settings`` for several runs at once: ``table2``..``table5`` and ``all``."""

TASKS: dict[str, dict[str, Any]] = {
    "mmwhs": {"configs": [], "tables": ["table2", "table4"], "columns": {}},
    "abdomen": {"configs": ["abdomen.json"], "tables": ["table3", "table5"],
                "columns": {"liver": "Liver", "spleen": "Spleen", "right_kidney": "R-kdy", "left_kidney": "L-kdy"}},
}
"""``task: {configs: bundle override files after train.json, tables: its paper tables, columns: {structure: paper
column} in the paper's column order}`` (MM-WHS keeps the bundle's class order and names)."""
_TABLE_TITLES = {"table2": "Table 2 layout (paper: 2D Transformer, MM-WHS)",
                 "table4": "Table 4 layout (paper: few-shot, 2D network, MM-WHS)",
                 "table3": "Table 3 layout (paper: 3D nnFormer backbone, BTCV CT + CHAOS MRI)",
                 "table5": "Table 5 layout (paper: consistency ablation, 3D nnFormer backbone, BTCV CT + CHAOS MRI)"}


def _split(value: str | Sequence[str]) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [str(v) for v in value]
    out: list[str] = []
    for n in names:  # groups expand in place; a run listed twice runs once
        out += [m for m in SETTING_GROUPS.get(n, [n]) if m not in out]
    return out


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


def _paper_row(rows: dict[str, dict[str, Any]], settings: Sequence[str], metric: str, mod: str) -> dict | None:
    """The ``mod`` entry of ``metric`` from the first of ``settings`` that was run and scored that modality."""
    for name in settings:
        r = rows.get(name)
        if r is not None and (e := _modality_entry(r["table2"], metric, mod)) is not None:
            return e
    return None


def paper_table_markdown(rows: list[dict[str, Any]], structures: Sequence[str], table: str = "table2",
                         labels: dict[str, str] | None = None) -> str:
    """The runs arranged as the paper's Table 2, 3, 4 or 5: per paper row, Dice (%) then ASD (mm) as mean ± std per
    structure and modality, the modality mean and the overall mean (mean of the CT and MRI means, "–" when a
    modality was not run). Paper rows none of whose runs is in ``rows`` are left out. Columns follow
    ``structures``; ``labels`` names them (default: the structure names)."""
    if table not in PAPER_TABLES:
        raise ValueError(f"unknown paper table {table!r}; choose from {list(PAPER_TABLES)}")
    labels = labels or {}
    by_name = {r["setting"]: r for r in rows}
    head = ["Methods", *[f"{MODALITY_LABELS[m]} {labels.get(s, s)}" for m in ("ct", "mr") for s in (*structures,
                                                                                                    "Mean")],
            "Overall Mean", "runs"]
    title = _TABLE_TITLES[table]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, label, digits in (("dice", "Dice (%)", 1), ("asd", "ASD (mm)", 2)):
        lines.append("| " + " | ".join([f"**{label}**"] + [""] * (len(head) - 1)) + " |")
        for paper_row, settings in PAPER_TABLES[table]:
            ran = [n for n in settings if n in by_name]
            if not ran:
                continue
            cells, means = [paper_row], []
            for mod in ("ct", "mr"):
                e = _paper_row(by_name, settings, metric, mod)
                for st in structures:
                    cells.append("–" if e is None else f"{e[st]['mean']:.{digits}f}±{e[st]['std']:.{digits}f}")
                cells.append(_fmt(None if e is None else e["mean"], digits))
                if e is not None:
                    means.append(e["mean"])
            cells.append(_fmt(sum(means) / 2 if len(means) == 2 else None, digits))
            cells.append(", ".join(ran))
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
                   skip_existing: bool = True, task: str = "mmwhs") -> dict[str, Any]:
    """Train and evaluate every setting; write ``comparison.json``, ``comparison.md`` and ``comparison.png``.

    Args:
        settings: names of :data:`SETTINGS` or of :data:`SETTING_GROUPS` (``table2``..``table5``, ``all``),
            comma-separated or a list.
        output_dir: where runs and reports go.
        dataset_dir: the task's dataset folder: MM-WHS, or BTCV + CHAOS for ``abdomen`` (default: the bundle's
            synthetic default of the task).
        overrides: bundle overrides for every run (e.g. ``epochs``, ``spatial_size``): a dict or a JSON file such as
            ``bundles/lssc_multimodal/configs/demo.json``. A setting's own keys win over them.
        device: e.g. ``"cpu"`` or ``"cuda:0"`` (default: the bundle's choice).
        skip_existing: reuse a run whose ``eval/metrics.json`` exists (an interrupted comparison resumes).
        task: ``"mmwhs"`` (Tables 2 and 4) or ``"abdomen"`` (the bundle's ``abdomen.json``; Tables 3 and 5).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    task_configs = TASKS[task]["configs"]
    names = _split(settings)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise ValueError(f"unknown settings {unknown}; choose from {list(SETTINGS)} or the groups "
                         f"{list(SETTING_GROUPS)}")
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
            run_workflow(CONFIGS, ["train.json", *task_configs], "train", **run)
            t1 = time.time()
            print(f"== [{i}/{len(names)}] {name}: evaluating", flush=True)
            run_workflow(CONFIGS, ["train.json", *task_configs, "evaluate.json"], "train", **run)
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
    labels = TASKS[task]["columns"]
    columns = [s for s in labels if s in structures] + [s for s in structures if s not in labels]
    for table in TASKS[task]["tables"]:
        if any(n in SETTING_GROUPS[table] for n in names):
            md += "\n" + paper_table_markdown(rows, columns, table, labels)
    (out / "comparison.md").write_text(md)
    plot_comparison(rows, out / "comparison.png")
    result = {"rows": rows, "overrides": extra, "structures": structures, "task": task}
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
