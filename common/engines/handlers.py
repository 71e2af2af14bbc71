"""Ignite/MONAI event handlers shared by the bundles: metrics JSON reports, progress bars, early checks."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MetricsJSONWriter", "TqdmProgress", "write_json_atomic", "summarise_details", "CheckpointRequired"]


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON via a temporary file + rename so a crash never leaves a half-written report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def summarise_details(details: np.ndarray | torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """Mean/std/median per class (columns) of a (cases, classes) metric table; NaN entries (absent class) ignored."""
    arr = np.asarray(details.detach().cpu() if isinstance(details, torch.Tensor) else details, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    names = list(class_names) if class_names is not None else [f"class{i}" for i in range(arr.shape[1])]
    out = {}
    for j, name in enumerate(names[: arr.shape[1]]):
        col = arr[:, j][np.isfinite(arr[:, j])]
        out[name] = {
            "mean": _finite_or_none(col.mean()) if col.size else None,
            "std": _finite_or_none(col.std()) if col.size else None,
            "median": _finite_or_none(np.median(col)) if col.size else None,
            "n": int(col.size),
        }
    return out


class MetricsJSONWriter:
    """Write the evaluator's metrics (and per-class summaries of metric details) to a JSON file on completion.

    Args:
        output_dir: folder of the report.
        filename: report name (``metrics.json`` by default).
        class_names: names of the metric-detail columns (e.g. ``["LV", "Myo", "LA"]``).
        extra: callable ``engine -> dict`` adding bundle-specific entries (e.g. per-frame tables).
        save_rank: only this rank writes (distributed evaluation).
    """

    def __init__(self, output_dir: str, filename: str = "metrics.json", class_names: Sequence[str] | None = None,
                 extra: Callable[[Any], dict] | None = None, save_rank: int = 0) -> None:
        self.path = Path(output_dir) / filename
        self.class_names = class_names
        self.extra = extra
        self.save_rank = save_rank

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        from monai.utils import min_version, optional_import

        idist, _ = optional_import("ignite", "0.4.10", min_version, "distributed")
        if idist.get_rank() != self.save_rank:
            return
        metrics = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
                   for k, v in engine.state.metrics.items()}
        details = {k: summarise_details(v, self.class_names)
                   for k, v in getattr(engine.state, "metric_details", {}).items()}
        payload = {"metrics": metrics, "per_class": details, "epoch": engine.state.epoch,
                   "n_iterations": engine.state.iteration}
        if self.extra is not None:
            payload.update(self.extra(engine))
        write_json_atomic(self.path, payload)
        engine.logger.info(f"metrics written to {self.path}")


class TqdmProgress:
    """A tqdm progress bar over the iterations of an ignite engine (one bar per epoch)."""

    def __init__(self, desc: str = "") -> None:
        self.desc = desc

    def attach(self, engine) -> None:
        from ignite.contrib.handlers import ProgressBar

        ProgressBar(persist=False, desc=self.desc).attach(engine)


class CheckpointRequired:
    """Fail early with a clear message when an evaluation/inference checkpoint is missing."""

    def __init__(self, path: str, hint: str = "train the bundle first (train.json) or pass --ckpt_path") -> None:
        self.path = Path(path)
        self.hint = hint

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint {self.path} not found: {self.hint}")
