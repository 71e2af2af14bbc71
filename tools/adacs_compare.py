"""AdaCS against its baselines on one split: the paper's Table 1 and paired t-tests (Table 2), JSON + Markdown.

Every (dataset, architecture, method) is trained with the ``adacs_registration`` bundle's ``train.json`` (same data
split, same seed, same overrides) and evaluated with ``evaluate.json`` on the test split. ``--protocol`` chooses how
the methods are trained (:data:`PROTOCOLS`):

* ``authors`` (default; the AdaCS authors' scripts): the baselines with ``configs/baseline_protocol.json`` (150
  epochs, Adam 1e-4, the last epoch's weights), AdaCS with its preset (``epochs`` 340 = 300 + 2W, the preset's
  learning rate) and also the last epoch's weights — no method's model is chosen with test-like labels;
* ``same``: every method with AdaCS's preset (epochs, learning rate) and the weights of the best validation Dice
  (the bundle defaults; this tool's behaviour before issue 17).

``--overrides`` apply to every method and win over the protocol (e.g. ``epochs`` of a short CPU run);
``--method_overrides "{'plain': {'epochs': 200}}"`` sets a knob for one method. The authors also trained every
method bidirectionally: add ``'bidir': True`` to ``--overrides`` for that.
The per-pair tables are joined by pair name and AdaCS is compared with each baseline by a two-sided paired t-test
(``scipy.stats.ttest_rel``) on DSC, HD and ASD.

Examples::

    # the paper's setting on real data (GPU recommended): both datasets, the three architectures, all methods
    python -m tools.adacs_compare --dataset_dirs /data/ACDC,/data/CAMUS \
        --architectures voxelmorph,transmorph,diffusemorph

    # a CPU-sized run on synthetic pairs with lost-correspondence regions
    python -m tools.synth registration --out data/pairs48 --patients 48
    python -m tools.adacs_compare --dataset_dirs data/pairs48 \\
        --overrides "{'spatial_size': [64, 64], 'epochs': 30, 'warmup_epochs': 3, 'learning_rate': 0.003}"

Outputs under ``output_dir``: ``runs/<protocol>/<dataset>/<architecture>/<method>/`` (models, evaluation),
``comparison.json``
and ``comparison.md``; the Markdown tables are also printed.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fire
import numpy as np

from tools.runs import run_workflow

__all__ = ["METHOD_LABELS", "ARCH_LABELS", "PROTOCOLS", "method_run_config", "run_comparison", "compare_tables",
           "markdown_tables", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "adacs_registration" / "configs"
# row order and names of the paper's Table 1 (the plain estimator carries the architecture's name)
METHOD_LABELS = {"plain": None, "nll": "NLL", "beta_nll": "β-NLL", "adaframe": "AdaFrame", "adareg": "AdaReg",
                 "adacs": "AdaCS (Ours)"}
ARCH_LABELS = {"voxelmorph": ("CNN", "Voxelmorph"), "transmorph": ("Transformer", "Transmorph"),
               "diffusemorph": ("Diffusion", "Diffusemorph")}
TABLE_METRICS = (("DSC", "dice", 100.0), ("HD", "hd", 1.0), ("ASD", "asd", 1.0))
PROTOCOLS = ("authors", "same")
BASELINE_PROTOCOL = "baseline_protocol.json"
# learning rates of the authors' baseline runs that differ from baseline_protocol.json's Adam 1e-4: their DiffuseMorph
# scripts keep the 2e-5 of their DiffuseMorph 2D config for every method
AUTHORS_BASELINE_LR = {"diffusemorph": 2e-5}


def method_run_config(protocol: str, method: str, overrides: dict[str, Any] | None = None,
                      method_overrides: dict[str, dict[str, Any]] | None = None,
                      architecture: str = "voxelmorph") -> tuple[list[str], dict[str, Any]]:
    """Extra config files and overrides that train ``method`` under ``protocol`` (see the module docstring).

    Under ``authors`` the baselines of an architecture in :data:`AUTHORS_BASELINE_LR` keep that learning rate.

    Returns:
        ``(files, overrides)``: config files to add after ``train.json`` (names in the bundle's ``configs``) and the
        overrides for the run; ``overrides`` win over the protocol, ``method_overrides[method]`` over both.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    files: list[str] = []
    out: dict[str, Any] = {}
    if protocol == "authors":
        if method == "adacs":
            out["model_selection"] = "last"
        else:
            files.append(BASELINE_PROTOCOL)
            if architecture in AUTHORS_BASELINE_LR:
                out["learning_rate"] = AUTHORS_BASELINE_LR[architecture]
    out.update(overrides or {})
    bad = sorted(set(method_overrides or {}) - set(METHOD_LABELS))
    if bad:
        raise ValueError(f"method_overrides has unknown methods {bad}; choose from {list(METHOD_LABELS)}")
    out.update((method_overrides or {}).get(method, {}))
    return files, out


def _split(value: str | Sequence[str]) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _read_per_pair(path: Path) -> dict[str, dict[str, float]]:
    with open(path, newline="") as f:
        return {row["pair"]: {k: float(v) for k, v in row.items() if k != "pair" and v != ""}
                for row in csv.DictReader(f)}


def _finite_mean(values: Sequence[float]) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def compare_tables(per_pair: dict[str, dict[str, dict[str, dict[str, float]]]],
                   reference: str = "adacs") -> dict[str, Any]:
    """Table 1 means and Table 2 paired t-tests from per-pair metrics.

    Args:
        per_pair: ``{dataset: {architecture: {method: {pair: {"dice", "hd", "asd", ...}}}}}``.
        reference: the method compared with every other one.

    Returns:
        ``{"table1": {dataset: {arch: {method: {"DSC", "HD", "ASD", "folding", "n"}}}}, "table2": {dataset: {arch:
        {method: {"DSC": {"t", "p", "n"}, ...}}}}}``; pairs missing from either method, or with a non-finite value,
        are left out of a test (``n`` says how many were used).
    """
    from scipy import stats

    table1: dict = {}
    table2: dict = {}
    for ds, archs in per_pair.items():
        for arch, methods in archs.items():
            for method, rows in methods.items():
                entry = {name: _finite_mean([r.get(key, math.nan) * scale for r in rows.values()])
                         for name, key, scale in TABLE_METRICS}
                entry["folding"] = _finite_mean([r.get("nonpositive_jacobian_percent", math.nan)
                                                 for r in rows.values()])
                entry["n"] = len(rows)
                table1.setdefault(ds, {}).setdefault(arch, {})[method] = entry
            if reference not in methods:
                continue
            ref = methods[reference]
            for method, rows in methods.items():
                if method == reference:
                    continue
                tests = {}
                for name, key, scale in TABLE_METRICS:
                    pairs = sorted(set(ref) & set(rows))
                    a = np.asarray([ref[p].get(key, math.nan) * scale for p in pairs], dtype=np.float64)
                    b = np.asarray([rows[p].get(key, math.nan) * scale for p in pairs], dtype=np.float64)
                    ok = np.isfinite(a) & np.isfinite(b)
                    if ok.sum() >= 2 and np.any(a[ok] != b[ok]):
                        res = stats.ttest_rel(a[ok], b[ok])
                        tests[name] = {"t": float(res.statistic), "p": float(res.pvalue), "n": int(ok.sum()),
                                       "mean_difference": float((a[ok] - b[ok]).mean())}
                    else:  # identical or too few pairs: no test
                        tests[name] = {"t": None, "p": None, "n": int(ok.sum()), "mean_difference": 0.0}
                table2.setdefault(ds, {}).setdefault(arch, {})[method] = tests
    return {"table1": table1, "table2": table2}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _method_label(arch: str, method: str) -> str:
    label = METHOD_LABELS.get(method, method)
    return ARCH_LABELS.get(arch, (arch, arch))[1] if label is None else label


def markdown_tables(result: dict[str, Any], reference: str = "adacs") -> str:
    """The paper's Table 1 layout (architecture groups x methods, DSC/HD/ASD per dataset) and Table 2 p-values."""
    t1, t2 = result["table1"], result["table2"]
    datasets = list(t1)
    archs = [a for a in ARCH_LABELS if any(a in t1[d] for d in datasets)]
    archs += [a for d in datasets for a in t1[d] if a not in archs]
    lines = ["**Table 1** — warped source myocardium vs target: DSC (%), HD and ASD (pixels of the network grid), "
             "folding = % non-positive Jacobian determinants", ""]
    head = "| | Method | " + " | ".join(f"{d} DSC | {d} HD | {d} ASD | {d} folding %" for d in datasets) + " |"
    lines += [head, "|" + "---|" * (2 + 4 * len(datasets))]
    for arch in archs:
        group = ARCH_LABELS.get(arch, (arch, arch))[0]
        methods = [m for m in METHOD_LABELS if any(m in t1[d].get(arch, {}) for d in datasets)]
        for i, m in enumerate(methods):
            cells = []
            for d in datasets:
                e = t1[d].get(arch, {}).get(m)
                cells += ["–"] * 4 if e is None else [_fmt(e["DSC"]), _fmt(e["HD"]), _fmt(e["ASD"]),
                                                      _fmt(e["folding"], 3)]
            lines.append(f"| {group if i == 0 else ''} | {_method_label(arch, m)} | " + " | ".join(cells) + " |")
    lines += ["", f"**Table 2** — paired t-test (two-sided) of {_method_label('', reference)} against each baseline "
              "over the test pairs: p-value (mean difference AdaCS − baseline)", ""]
    head = "| | Baseline | " + " | ".join(f"{d} DSC | {d} HD | {d} ASD" for d in datasets) + " |"
    lines += [head, "|" + "---|" * (2 + 3 * len(datasets))]
    for arch in archs:
        group = ARCH_LABELS.get(arch, (arch, arch))[0]
        methods = [m for m in METHOD_LABELS if m != reference and any(m in t2.get(d, {}).get(arch, {})
                                                                       for d in datasets)]
        for i, m in enumerate(methods):
            cells = []
            for d in datasets:
                tests = t2.get(d, {}).get(arch, {}).get(m)
                for name, _, _ in TABLE_METRICS:
                    r = None if tests is None else tests[name]
                    cells.append("–" if r is None or r["p"] is None else
                                 f"{r['p']:.2g} ({r['mean_difference']:+.2f})")
            lines.append(f"| {group if i == 0 else ''} | {_method_label(arch, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run_bundle(files: list[str], overrides: dict[str, Any]) -> None:
    run_workflow(CONFIGS, files, "train", **overrides)


def run_comparison(dataset_dirs: str | Sequence[str], architectures: str | Sequence[str] = "voxelmorph",
                   methods: str | Sequence[str] = ",".join(METHOD_LABELS), output_dir: str = "output/adacs_compare",
                   overrides: dict | None = None, device: str | None = None, skip_existing: bool = True,
                   protocol: str = "authors", method_overrides: dict | None = None) -> dict:
    """Train and evaluate every (dataset, architecture, method); write ``comparison.json`` and ``comparison.md``.

    Args:
        dataset_dirs: dataset folders (ACDC, CAMUS or registration-pair layout), comma-separated or a list.
        architectures: displacement estimators (``voxelmorph``, ``transmorph``, ``diffusemorph``: the CNN,
            Transformer and Diffusion groups of Table 1).
        methods: any of ``adacs, plain, adareg, adaframe, nll, beta_nll`` (AdaCS is the reference of Table 2).
        output_dir: where runs and reports go.
        overrides: bundle config overrides applied to every run (e.g. ``epochs``, ``spatial_size``); they win over
            the protocol.
        protocol: ``"authors"`` (baselines: ``baseline_protocol.json``, every method keeps its last epoch) or
            ``"same"`` (every method with AdaCS's preset and the best validation Dice); see the module docstring.
        method_overrides: ``{method: {key: value}}`` for single methods (e.g. ``{"plain": {"epochs": 200}}``).
        device: e.g. ``"cpu"`` or ``"cuda:0"`` (default: the bundle's choice).
        skip_existing: reuse a run whose ``per_pair.csv`` exists (an interrupted comparison resumes).

    Returns:
        The result dict written to ``comparison.json``.
    """
    from common.data.pairs import detect_pair_layout
    from common.engines.registration import METHODS
    from common.networks.registration import ESTIMATORS

    out = Path(output_dir).resolve()
    datasets = [Path(d).expanduser().resolve() for d in _split(dataset_dirs)]
    archs, meths = _split(architectures), _split(methods)
    if not datasets:
        raise ValueError("give at least one dataset folder (--dataset_dirs)")
    for d in datasets:
        if not d.is_dir():
            raise FileNotFoundError(f"dataset_dir {str(d)!r} does not exist or is not a folder")
    bad = [m for m in meths if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {METHODS}")
    bad = [a for a in archs if a not in ESTIMATORS]
    if bad:
        raise ValueError(f"unknown architectures {bad}; choose from {sorted(ESTIMATORS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    extra = dict(overrides or {})
    if device:
        extra["device"] = f"$torch.device({device!r})"
    per_pair: dict = {}
    runs: list[dict] = []
    names = {}
    for d in datasets:
        name = f"{detect_pair_layout(d).upper()}:{d.name}"
        names[str(d)] = name
        for arch in archs:
            for method in meths:
                root = out / "runs" / protocol / d.name / arch / method
                csv_path = root / "eval" / "per_pair.csv"
                t0 = time.time()
                if not (skip_existing and csv_path.is_file()):
                    print(f"== {name} {arch} {method}: training", flush=True)
                    files, run_overrides = method_run_config(protocol, method, extra, method_overrides, arch)
                    common = {**run_overrides, "dataset_dir": str(d), "architecture": arch, "method": method,
                              "bundle_root": str(root), "output_dir": str(root / "eval")}
                    _run_bundle(["train.json", *files], common)
                    print(f"== {name} {arch} {method}: evaluating", flush=True)
                    _run_bundle(["train.json", *files, "evaluate.json"], common)
                per_pair.setdefault(name, {}).setdefault(arch, {})[method] = _read_per_pair(csv_path)
                runs.append({"dataset": name, "dataset_dir": str(d), "architecture": arch, "method": method,
                             "protocol": protocol,
                             "run_dir": str(root), "per_pair_csv": str(csv_path), "seconds": time.time() - t0})
    result = compare_tables(per_pair)
    result.update({"runs": runs, "overrides": extra, "datasets": names, "protocol": protocol,
                   "method_overrides": dict(method_overrides or {})})
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_tables(result)
    (out / "comparison.md").write_text(md)
    from common.engines.handlers import write_json_atomic

    write_json_atomic(out / "comparison.json", result)
    print(md)
    print(f"written: {out / 'comparison.json'} and {out / 'comparison.md'}")
    return result


def main() -> None:
    # the tables are printed by run_comparison; fire would print the whole result dict again
    fire.Fire(run_comparison, serialize=lambda result: None)
    sys.exit(0)


if __name__ == "__main__":
    main()
