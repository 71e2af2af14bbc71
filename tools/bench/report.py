"""Shared helpers for benchmarks: repeat timing, peak memory, and the JSON + Markdown + PNG report."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["time_fn", "PeakRSS", "peak_memory_bytes", "machine_info", "write_report", "copy_bandwidth_gbs",
           "time_memory_bars"]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device: str | None = None) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` calls; returns median/min/max seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling the process RSS in a thread; ``peak_bytes`` is the increase over the start.

    ``ru_maxrss`` is monotone over the whole process life, so it cannot compare two methods in one run;
    sampling the RSS every millisecond can.
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self._base = _current_rss_bytes()
        self._peak = self._base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _current_rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _current_rss_bytes())
        self.peak_bytes = self._peak - self._base


def peak_memory_bytes(fn: Callable[[], Any], device: str | None = None) -> int:
    """Peak extra memory of one call: CUDA max allocated on GPU, sampled RSS increase on CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with PeakRSS() as p:
        fn()
    return int(p.peak_bytes)


def copy_bandwidth_gbs(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured copy bandwidth (read + write bytes per second, GB/s) of a large float32 tensor copy."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    stats = time_fn(lambda: dst.copy_(src), repeats=repeats, warmup=2)
    return 2 * n_bytes / stats["median_s"] / 1e9


def machine_info() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "max_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    name: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    plot: Callable[[Any], None] | None = None,
    extra: dict[str, Any] | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and (if ``plot`` is given) ``<name>.png`` under ``out_dir``.

    ``plot`` receives a matplotlib ``Axes`` and draws on it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "machine": machine_info(), "rows": list(rows), **(extra or {})}
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    md = [f"# {title or name}", "", _markdown_table(rows, columns), ""]
    if extra:
        md += ["", "```json", json.dumps(extra, indent=2, default=str), "```", ""]
    paths["md"].write_text("\n".join(md))
    if plot is not None:
        from common.plotting import save_figure, subplots

        fig, ax = subplots(figsize=(8, 4.5))
        plot(ax)
        ax.set_title(title or name)
        paths["png"] = save_figure(fig, out / f"{name}.png", dpi=110)
    return paths


def time_memory_bars(ax: Any, rows: Sequence[dict], colors: Any = "#1f77b4", rotate_labels: float = 0.0) -> None:
    """Bar chart of ``median_s`` per ``method``, each bar annotated with its time and ``peak_mb``."""
    bars = ax.bar([r["method"] for r in rows], [r["median_s"] for r in rows], color=colors)
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['median_s']:.3g} s\n{r['peak_mb']:.0f} MB", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("median time (s)")
    ax.set_ylim(0, max(r["median_s"] for r in rows) * 1.3)
    if rotate_labels:
        ax.tick_params(axis="x", labelrotation=rotate_labels)
