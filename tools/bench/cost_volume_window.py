"""Benchmark: windowed searches of the cost-volume op (``search="chained"``, ``"coarse_to_fine"``) vs ``"global"``.

SpeckNet sizes (METHODS.md §4): T = 80 frames, N = 75 points, features of a 512² input (64², 64², 32², D = 64),
search window ``|dy|, |dx| <= 4`` finest cells (9 x 9). Same inputs as :mod:`tools.bench.cost_volume` (a smoothly
moving synthetic texture, query points on frame 0), all methods side by side in one run:

* ``global``: :func:`common.ops.cost_volume.cost_volume_track` with the PyTorch backend, the whole-grid argmax (paper);
* ``chained``: windows chained frame by frame from the query frame (79 sequential steps of 75 windows);
* ``coarse_to_fine``: every frame's window centred on the coarsest scale's argmax;
* on CUDA also the Triton backend of each (``*_triton``).

Reported: median time over ``repeats``, peak extra memory of one call (sampled RSS in a fresh process per method on
CPU, max allocated on CUDA), and how far the windowed positions are from the global ones (on this smooth motion of
at most ~2 cells per frame from frame 0 the window should rarely change the answer; a large difference would mean
the window misses the match).

Usage: ``python -m tools.bench cost_volume_window [--quick] [--device cpu] [--repeats 3] [--out_dir output/bench]``.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import torch

from tools.bench.cost_volume import _DIM, _GRIDS, _IMAGE_SIZE, SEARCH_RADIUS, _method, _peak_bytes, _sizes, make_inputs
from tools.bench.report import time_fn, time_memory_bars, write_report

__all__ = ["run", "main"]


def run(
    out_dir: str = "output/bench",
    quick: bool = False,
    device: str = "cpu",
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time and measure the searches; write ``cost_volume_window.{json,md,png}`` under ``out_dir``.

    ``quick`` shrinks T to 24 (a smoke run). ``threads`` sets ``torch.set_num_threads`` for the timed calls.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    load_before = os.getloadavg()
    torch.manual_seed(0)
    frames, points = _sizes(quick)
    qs, fs, pts = make_inputs(frames, points, _DIM, _GRIDS, _IMAGE_SIZE, seed=0, device=device)
    names = ["global", "chained", "coarse_to_fine"]
    if torch.device(device).type == "cuda":
        names += [f"{n}_triton" for n in names]

    with torch.no_grad():
        fns = {name: _method(name, qs, fs, pts) for name in names}
        outs = {name: fn() for name, fn in fns.items()}  # also the warm-up calls
        # repeats interleaved across methods, so a burst of load from other processes hits all of them alike
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(time_fn(fn, repeats=1, warmup=0, device=device)["median_s"])
    mems = {name: _peak_bytes(name, quick, device) for name in names}

    ref = outs["global"].positions
    t_global = statistics.median(times["global"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        dist = (outs[name].positions - ref).norm(dim=-1)[:, 1:]  # frame 0 is the query frame of every point
        rows.append(
            {
                "method": name,
                "median_s": med,
                "min_s": min(times[name]),
                "peak_mb": mems[name] / 2**20,
                "speedup_vs_global": t_global / med,
                "memory_ratio_vs_global": mems["global"] / max(mems[name], 1),
                "median_dpos_vs_global_px": dist.median().item(),
                "frac_within_1px_of_global": (dist <= 1.0).float().mean().item(),
            }
        )
    extra = {
        "sizes": {"T": frames, "N": points, "D": _DIM, "grids": _GRIDS, "image_size": _IMAGE_SIZE, "quick": quick,
                  "search_radius_cells": SEARCH_RADIUS},
        "device": device,
        "repeats": repeats,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "memory": "peak extra memory of one call: sampled RSS growth in a fresh process per method with glibc's mmap "
        "threshold fixed at 64 KiB on CPU, max allocated on CUDA",
    }
    if torch.device(device).type != "cuda":
        extra["note"] = "Triton backends not timed on CPU: the interpreter is a correctness tool (see the tests)."

    def plot(ax):
        time_memory_bars(ax, rows, rotate_labels=20)

    columns = ["method", "median_s", "min_s", "peak_mb", "speedup_vs_global", "memory_ratio_vs_global",
               "median_dpos_vs_global_px", "frac_within_1px_of_global"]
    title = (f"Windowed vs global search, T={frames} N={points} D={_DIM} grids 64²/64²/32², window 9x9 cells "
             f"({device})")
    paths = write_report(out_dir, "cost_volume_window", rows, columns, plot=plot, extra=extra, title=title)
    return {"rows": rows, **extra, "paths": {k: str(v) for k, v in paths.items()}}


def main() -> None:
    import fire

    fire.Fire(run)


if __name__ == "__main__":
    main()
