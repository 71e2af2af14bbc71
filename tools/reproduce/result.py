"""The result of one claim: paired comparisons and absolute criteria, and its JSON + Markdown + PNG report.

A claim **holds** when every paired comparison favours the method with a one-sided Wilcoxon signed-rank p-value
below ``alpha`` (0.05) and every absolute criterion (e.g. "GLS MAD <= 1.5 %") is met. Nothing is rounded or
filtered before the test; a comparison whose differences are all zero has p = 1 (no evidence).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ALPHA", "PAIRED_TEST", "Comparison", "Criterion", "ClaimResult", "paired_p_value", "write_claim_report",
           "SIZES", "size_config"]

ALPHA = 0.05
PAIRED_TEST = "Wilcoxon signed-rank, one-sided (method better than baseline), scipy.stats.wilcoxon"
SIZES = ("smoke", "quick", "full")


def size_config(configs: Mapping[str, Any], size: str) -> Any:
    """A claim's configuration for ``size`` (smoke/quick/full); an unknown size is an error naming the choices."""
    if size not in configs:
        raise ValueError(f"size must be one of {sorted(configs)}, got {size!r}")
    return configs[size]


def paired_p_value(method: list[float], baseline: list[float], higher_is_better: bool) -> float:
    """One-sided Wilcoxon signed-rank p-value that ``method`` is better than ``baseline`` (paired by index).

    Returns 1.0 when every difference is zero (no evidence either way) and NaN with fewer than 2 pairs."""
    from scipy.stats import wilcoxon

    if len(method) != len(baseline):
        raise ValueError(f"paired values differ in length: method {len(method)} vs baseline {len(baseline)}")
    diffs = [m - b for m, b in zip(method, baseline)]
    if any(not math.isfinite(d) for d in diffs):
        raise ValueError("paired values contain NaN/Inf; drop or explain those cases before testing")
    if len(diffs) < 2:
        return float("nan")
    if all(d == 0 for d in diffs):
        return 1.0
    return float(wilcoxon(diffs, alternative="greater" if higher_is_better else "less").pvalue)


@dataclass
class Comparison:
    """Method vs baseline on one metric, one value per case (same cases, same order)."""

    metric: str
    higher_is_better: bool
    cases: list[str]
    method_values: list[float]
    baseline_values: list[float]
    unit: str = ""
    note: str = ""
    # per training seed: mean over cases (method, baseline); optional, shown for seed-to-seed spread
    per_seed_method: list[float] = field(default_factory=list)
    per_seed_baseline: list[float] = field(default_factory=list)
    # what the two value lists are when they are not the claim's method and baseline (e.g. the method's own score
    # outside vs inside a region); the Markdown and the plot then name them instead
    method_label: str = ""
    baseline_label: str = ""

    def __post_init__(self) -> None:
        if not (len(self.cases) == len(self.method_values) == len(self.baseline_values)):
            raise ValueError(f"{self.metric}: cases ({len(self.cases)}), method ({len(self.method_values)}) and "
                             f"baseline ({len(self.baseline_values)}) values must have the same length")
        self.method_values = [float(v) for v in self.method_values]
        self.baseline_values = [float(v) for v in self.baseline_values]

    @classmethod
    def from_seeds(cls, metric: str, higher_is_better: bool, method_runs: Sequence[Mapping[str, float]],
                   baseline_runs: Sequence[Mapping[str, float]], **kwargs: Any) -> Comparison:
        """The comparison of per-case values averaged over training seeds.

        ``method_runs[k]`` / ``baseline_runs[k]`` map case name -> value for training seed ``k``. Every run of both
        arms must score the same cases (a case missing from a run is an error naming it: dropping it would change
        the test set after the results are seen). Cases are sorted by name; ``per_seed_*`` are each run's mean over
        the cases; ``kwargs`` go to the constructor (``unit``, ``note``, labels).
        """
        runs = [*method_runs, *baseline_runs]
        if not method_runs or len(method_runs) != len(baseline_runs):
            raise ValueError(f"{metric}: need the same number (>= 1) of method and baseline runs, got "
                             f"{len(method_runs)} and {len(baseline_runs)}")
        cases = sorted(runs[0])
        for k, run in enumerate(runs):
            if set(run) != set(cases):
                diff = sorted(set(run) ^ set(cases))
                raise ValueError(f"{metric}: run {k} scored other cases than run 0 (differing: {diff[:5]})")

        def mean_over_seeds(arm: Sequence[Mapping[str, float]]) -> list[float]:
            return [statistics.fmean(float(run[c]) for run in arm) for c in cases]

        return cls(metric, higher_is_better, cases, mean_over_seeds(method_runs), mean_over_seeds(baseline_runs),
                   per_seed_method=[statistics.fmean(float(v) for v in run.values()) for run in method_runs],
                   per_seed_baseline=[statistics.fmean(float(v) for v in run.values()) for run in baseline_runs],
                   **kwargs)

    def summary(self, alpha: float = ALPHA) -> dict[str, Any]:
        """Means, mean difference (method - baseline), n, p-value and whether the comparison favours the method."""
        p = paired_p_value(self.method_values, self.baseline_values, self.higher_is_better)
        m_mean, b_mean = statistics.fmean(self.method_values), statistics.fmean(self.baseline_values)
        better = m_mean > b_mean if self.higher_is_better else m_mean < b_mean
        return {
            "metric": self.metric, "unit": self.unit, "higher_is_better": self.higher_is_better,
            "n": len(self.cases), "method_mean": m_mean, "baseline_mean": b_mean,
            "method_sd": statistics.stdev(self.method_values) if len(self.cases) > 1 else 0.0,
            "baseline_sd": statistics.stdev(self.baseline_values) if len(self.cases) > 1 else 0.0,
            "mean_difference": m_mean - b_mean, "p_value": p,
            "holds": bool(better and math.isfinite(p) and p < alpha),
        }


@dataclass
class Criterion:
    """An absolute condition of a claim, e.g. ``GLS MAD <= 1.5``, with the measured value."""

    name: str
    value: float
    threshold: float
    comparison: str  # "<=", "<", ">=", ">"
    holds: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        ops = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b}
        if self.comparison not in ops:
            raise ValueError(
                f"criterion {self.name!r}: comparison must be one of {sorted(ops)}, got {self.comparison!r}")
        self.value = float(self.value)
        self.holds = bool(math.isfinite(self.value) and ops[self.comparison](self.value, float(self.threshold)))


@dataclass
class ClaimResult:
    """Everything a claim measured. ``comparisons[0]`` is the primary metric (top-level JSON fields)."""

    claim: str
    statement: str
    method: str
    baseline: str
    comparisons: list[Comparison]
    criteria: list[Criterion] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self, size: str, seeds: int, command: str, runtime_s: float, alpha: float = ALPHA) -> dict[str, Any]:
        """The ``<claim>.json`` payload: top-level fields for the primary comparison, then all of them."""
        if not self.comparisons:
            raise ValueError(f"claim {self.claim!r} has no paired comparison")
        summaries = [c.summary(alpha) for c in self.comparisons]
        primary, first = self.comparisons[0], summaries[0]
        holds = all(s["holds"] for s in summaries) and all(c.holds for c in self.criteria)
        return {
            "claim": self.claim, "statement": self.statement, "metric": primary.metric,
            "method": self.method, "baseline": self.baseline,
            "cases": primary.cases, "method_values": primary.method_values, "baseline_values": primary.baseline_values,
            "n": first["n"], "test": PAIRED_TEST, "alpha": alpha, "p_value": first["p_value"], "holds": holds,
            "comparisons": [{**s, "cases": c.cases, "method_values": c.method_values,
                             "baseline_values": c.baseline_values, "per_seed_method": c.per_seed_method,
                             "per_seed_baseline": c.per_seed_baseline, "note": c.note,
                             "method_label": c.method_label, "baseline_label": c.baseline_label}
                            for c, s in zip(self.comparisons, summaries)],
            "criteria": [asdict(c) for c in self.criteria],
            "size": size, "seeds": seeds, "command": command, "runtime_s": runtime_s,
            "python": platform.python_version(), "details": self.details,
        }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a ``|`` in a metric name (``|GLS error|``) would split the cell."""
    return str(text).replace("|", "\\|")


def _markdown(payload: dict[str, Any]) -> str:
    lines = [f"# Claim `{payload['claim']}`: {'holds' if payload['holds'] else 'does NOT hold'}", "",
             payload["statement"], "",
             f"Method: **{payload['method']}**; baseline: **{payload['baseline']}**. Size `{payload['size']}`, "
             f"{payload['seeds']} training seed(s), {payload['runtime_s']:.0f} s wall"
             + (f", {payload['cpu_time_s']:.0f} s CPU" if "cpu_time_s" in payload else "")
             + f". Command: `{payload['command']}`", "",
             f"Paired test: {payload['test']}, alpha {payload['alpha']}.", "",
             "| metric | method mean ± sd | baseline mean ± sd | difference | n | p | holds |",
             "|---|---|---|---|---|---|---|"]
    for c in payload["comparisons"]:
        unit = f" {c['unit']}" if c["unit"] else ""
        arrow = "↑" if c["higher_is_better"] else "↓"
        labels = (f" ({c['method_label'] or payload['method']} vs {c['baseline_label'] or payload['baseline']})"
                  if c.get("method_label") or c.get("baseline_label") else "")
        lines.append(f"| {_cell(c['metric'])}{unit} {arrow}{_cell(labels)} | "
                     f"{_fmt(c['method_mean'])} ± {_fmt(c['method_sd'])} | "
                     f"{_fmt(c['baseline_mean'])} ± {_fmt(c['baseline_sd'])} | {_fmt(c['mean_difference'])} | "
                     f"{c['n']} | {_fmt(c['p_value'])} | {'yes' if c['holds'] else 'no'} |")
    if payload["criteria"]:
        lines += ["", "| criterion | value | condition | holds |", "|---|---|---|---|"]
        for c in payload["criteria"]:
            lines.append(f"| {_cell(c['name'])} | {_fmt(c['value'])} | {c['comparison']} {_fmt(c['threshold'])} | "
                         f"{'yes' if c['holds'] else 'no'} |")
    notes = [c["note"] for c in payload["comparisons"] + payload["criteria"] if c.get("note")]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _plot(payload: dict[str, Any], out_png: Path) -> Path:
    """One panel per comparison: each case's baseline and method values joined by a line (paired plot)."""
    from common.plotting import save_figure, subplots

    comps = payload["comparisons"]
    fig, axes = subplots(1, len(comps), figsize=(4.2 * len(comps), 4.0), squeeze=False)
    for ax, c in zip(axes[0], comps):
        for b, m in zip(c["baseline_values"], c["method_values"]):
            better = m > b if c["higher_is_better"] else m < b
            ax.plot([0, 1], [b, m], color="#2ca02c" if better else "#d62728", alpha=0.5, lw=1)
        ax.scatter([0] * c["n"], c["baseline_values"], color="#7f7f7f", s=12, zorder=3)
        ax.scatter([1] * c["n"], c["method_values"], color="#1f77b4", s=12, zorder=3)
        ax.set_xticks([0, 1], [c.get("baseline_label") or payload["baseline"],
                               c.get("method_label") or payload["method"]])
        ax.set_xlim(-0.3, 1.3)
        ax.set_ylabel(f"{c['metric']} ({c['unit']})" if c["unit"] else c["metric"])
        ax.set_title(f"{c['metric']}: p = {_fmt(c['p_value'])} ({'holds' if c['holds'] else 'does not hold'})",
                     fontsize=9)
    fig.suptitle(f"{payload['claim']}: {'holds' if payload['holds'] else 'does NOT hold'} (n = {payload['n']})")
    return save_figure(fig, out_png, dpi=100)


def _json_safe(value: Any) -> Any:
    """NaN/Inf become ``null`` so the file is strict JSON (a p-value of fewer than two pairs is undefined)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_claim_report(payload: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``<out_dir>/<claim>.json``, ``.md`` and ``.png``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = payload["claim"]
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=2, default=str, allow_nan=False))
    paths["md"].write_text(_markdown(payload))
    _plot(payload, paths["png"])
    return paths
