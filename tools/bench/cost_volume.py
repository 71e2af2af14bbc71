"""Benchmark: multi-scale cost volume + windowed soft-argmax (``common.ops.cost_volume``) vs the naive reference.

SpeckNet sizes (METHODS.md §4): T = 80 frames, N = 75 points, feature maps 64², 64², 32² with D = 64, image 512x512.
Methods, side by side in one run on the same inputs:

* ``naive``: :func:`common.ops._cost_volume_reference.reference_cost_volume_track` in float32 — every
  (T, N, 64, 64) volume materialised at once and a TAP-Net-style full-grid soft-argmax mask;
* ``chunked``: :func:`common.ops.cost_volume.cost_volume_track` with the PyTorch backend (chunks of frames x points);
* ``triton``: the same op with the Triton backend (CUDA only: the CPU interpreter is a correctness tool, far too slow
  to time at these sizes).

Reported: median time over ``repeats``, peak extra memory of one call (sampled RSS on CPU, max allocated on CUDA),
and the largest position difference to the float32 naive output and to a float64 naive output (not timed).
The inputs are a synthetic moving texture (each frame a translated copy of a smooth random field plus noise), so the
matching peaks are distinct as with trained features; i.i.d. noise features would make near-ties of the argmax
common and the position comparison meaningless.

Usage: ``python -m tools.bench.cost_volume [--quick] [--device cpu] [--repeats 3] [--out_dir output/bench]``.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.ops._cost_volume_reference import reference_cost_volume_track
from common.ops.cost_volume import cost_volume_track, sample_query_features
from tools.bench.report import peak_memory_bytes, time_fn, time_memory_bars, write_report

__all__ = ["make_inputs", "run", "main"]

_IMAGE_SIZE = (512, 512)
_GRIDS = ((64, 64), (64, 64), (32, 32))
_DIM = 64


def make_inputs(
    frames: int,
    points: int,
    dim: int,
    grids: tuple[tuple[int, int], ...],
    image_size: tuple[int, int],
    seed: int = 0,
    device: str = "cpu",
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Synthetic SpeckNet-like inputs.

    Returns:
        query features per scale (1, N, D), feature maps per scale (1, T, D, H_s, W_s), query points (1, N, 2) in
        pixels on frame 0.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    # smooth periodic motion of up to ~3 % of the image, different per frame
    t = torch.arange(frames, dtype=torch.float32)
    phase = 2 * math.pi * t / frames
    shift = torch.stack([0.03 * w * torch.sin(phase), 0.02 * h * torch.cos(phase)], dim=-1)
    pts = torch.rand(1, points, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8]) + torch.tensor([w * 0.1, h * 0.1])
    maps, queries = [], []
    for hs, ws in grids:
        base = torch.randn(1, dim, hs * 2, ws * 2, generator=g)
        base = F.avg_pool2d(base, 3, stride=1, padding=1)  # a little spatial correlation, like CNN features
        # frame k samples the base field at (cell centre - shift_k), i.e. the texture moves by shift_k pixels
        ys = (torch.arange(hs) + 0.5) * (h / hs)
        xs = (torch.arange(ws) + 0.5) * (w / ws)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid_x = (gx[None] - shift[:, 0, None, None]) / w  # in [0, 1) of the base field, which covers 2x the image
        grid_y = (gy[None] - shift[:, 1, None, None]) / h
        grid = torch.stack([grid_x - 0.5, grid_y - 0.5], dim=-1)  # base field centred on the image
        fm = F.grid_sample(base.expand(frames, -1, -1, -1), grid, mode="bilinear", align_corners=False)
        fm = fm + 0.05 * torch.randn(fm.shape, generator=g)
        fm = fm[None].contiguous()  # (1, T, D, H_s, W_s)
        maps.append(fm.to(device))
        queries.append(sample_query_features(fm[:, 0], pts, image_size).to(device))
    return queries, maps, pts.to(device)


def _sizes(quick: bool) -> tuple[int, int]:
    return (24, 75) if quick else (80, 75)


# windowed searches of the op (tools.bench.cost_volume_window): (search, backend) per method name
WINDOW_METHODS = {
    "global": ("global", "torch"),
    "chained": ("chained", "torch"),
    "coarse_to_fine": ("coarse_to_fine", "torch"),
    "global_triton": ("global", "triton"),
    "chained_triton": ("chained", "triton"),
    "coarse_to_fine_triton": ("coarse_to_fine", "triton"),
}
SEARCH_RADIUS = 4.0  # the op's default window, 9 x 9 finest cells


def _method(
    name: str, qs: list[torch.Tensor], fs: list[torch.Tensor], pts: torch.Tensor | None = None
) -> Callable[[], Any]:
    if name == "naive":
        return lambda: reference_cost_volume_track(qs, fs, _IMAGE_SIZE)
    if name == "chunked":
        return lambda: cost_volume_track(qs, fs, _IMAGE_SIZE, backend="torch")
    if name == "triton":
        return lambda: cost_volume_track(qs, fs, _IMAGE_SIZE, backend="triton")
    if name in WINDOW_METHODS:
        if pts is None:
            raise ValueError(f"method {name!r} needs the query points")
        search, backend = WINDOW_METHODS[name]
        # make_inputs samples the query features on frame 0, so that is every point's query frame
        qf = torch.zeros(pts.shape[:2], dtype=torch.long, device=pts.device)
        return lambda: cost_volume_track(qs, fs, _IMAGE_SIZE, search=search, search_radius=SEARCH_RADIUS,
                                         query_points=pts, query_frames=qf, backend=backend)
    raise ValueError(f"unknown method {name!r}")


def _fixed_mmap_threshold() -> bool:
    """Make glibc serve every allocation >= 64 KiB by its own mmap, returned to the system on free.

    By default glibc raises its mmap threshold after large frees and then keeps freed blocks in the heap, so a later
    allocation can reuse them without growing the RSS: the sampled RSS would under-count. Returns False when glibc's
    ``mallopt`` is unavailable (the measurement then only shows heap growth).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024))


def _child_peak_bytes(name: str, quick: bool, device: str) -> int:
    """Peak extra memory of one call of ``name``, measured in a fresh process (see :func:`_peak_bytes`)."""
    if torch.device(device).type != "cuda" and not _fixed_mmap_threshold():
        raise RuntimeError("cannot fix glibc's mmap threshold: the RSS-based peak memory would be unreliable")
    torch.manual_seed(0)
    # one small call first: thread pools and lazily initialised kernels allocate once per process, which is not
    # the op's memory
    sq, sf, sp = make_inputs(2, 4, 8, ((8, 8), (8, 8), (4, 4)), _IMAGE_SIZE, seed=1, device=device)
    frames, points = _sizes(quick)
    qs, fs, pts = make_inputs(frames, points, _DIM, _GRIDS, _IMAGE_SIZE, seed=0, device=device)
    with torch.no_grad():
        _method(name, sq, sf, sp)()
        return peak_memory_bytes(_method(name, qs, fs, pts), device=device)


def _peak_bytes(name: str, quick: bool, device: str) -> int:
    """Peak memory of one call. On CPU each method runs in its own fresh process: the sampled RSS only shows growth,
    and memory one method freed (kept by the allocator) would hide the next method's allocations."""
    if torch.device(device).type == "cuda":
        return _child_peak_bytes(name, quick, device)
    root = Path(__file__).resolve().parents[2]
    code = (
        "import json; from tools.bench.cost_volume import _child_peak_bytes; "
        f"print(json.dumps(_child_peak_bytes({name!r}, {quick!r}, {device!r})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {name!r} failed:\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def run(
    out_dir: str = "output/bench",
    quick: bool = False,
    device: str = "cpu",
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time and measure the methods; write ``cost_volume.{json,md,png}`` under ``out_dir``; return the payload.

    ``quick`` shrinks T to 24 (a smoke run, < 1 min); the targets refer to the full sizes. ``threads`` sets
    ``torch.set_num_threads`` for the timed calls (default: torch's choice); on a machine shared with other processes,
    ``threads=1`` avoids OpenMP threads waiting for descheduled partners, which penalises many small ops.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    load_before = os.getloadavg()
    torch.manual_seed(0)
    frames, points = _sizes(quick)
    qs, fs, _ = make_inputs(frames, points, _DIM, _GRIDS, _IMAGE_SIZE, seed=0, device=device)
    names = ["naive", "chunked"] + (["triton"] if torch.device(device).type == "cuda" else [])

    with torch.no_grad():
        exact = reference_cost_volume_track([q.double() for q in qs], [f.double() for f in fs], _IMAGE_SIZE)
        fns = {name: _method(name, qs, fs) for name in names}
        outs = {name: fn() for name, fn in fns.items()}  # also the warm-up calls
        # repeats interleaved across methods, so a burst of load from other processes hits all of them alike
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(time_fn(fn, repeats=1, warmup=0, device=device)["median_s"])
    results = {name: (outs[name], {"median_s": statistics.median(ts), "min_s": min(ts)}) for name, ts in times.items()}
    mems = {name: _peak_bytes(name, quick, device) for name in names}

    naive_out, naive_time = results["naive"]
    rows = []
    for name, (out, timing) in results.items():
        d32 = (out.positions - naive_out.positions).abs().max().item()
        d64 = (out.positions.double() - exact.positions).abs().max().item()
        rows.append(
            {
                "method": name,
                "median_s": timing["median_s"],
                "min_s": timing["min_s"],
                "peak_mb": mems[name] / 2**20,
                "speedup_vs_naive": naive_time["median_s"] / timing["median_s"],
                "memory_ratio_vs_naive": mems["naive"] / max(mems[name], 1),
                "max_dpos_vs_naive_px": d32,
                "max_dpos_vs_float64_px": d64,
                "positions_equal_1e-4": bool(d32 <= 1e-4),
            }
        )
    extra = {
        "sizes": {"T": frames, "N": points, "D": _DIM, "grids": _GRIDS, "image_size": _IMAGE_SIZE, "quick": quick},
        "device": device,
        "repeats": repeats,
        "targets": {"speedup_vs_naive": 3.0, "memory_ratio_vs_naive": 10.0, "positions_px": 1e-4},
        # other processes on a 2-core machine distort timings (OpenMP threads wait for each other): record the load
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "memory": "peak extra memory of one call: sampled RSS growth in a fresh process per method with glibc's mmap "
        "threshold fixed at 64 KiB (freed blocks leave the RSS) on CPU, max allocated on CUDA",
    }
    if torch.device(device).type != "cuda":
        extra["note"] = "Triton backend not timed on CPU: the interpreter is a correctness tool (see the tests)."

    def plot(ax):
        time_memory_bars(ax, rows, colors=["#999999", "#1f77b4", "#2ca02c"][: len(rows)])

    columns = ["method", "median_s", "min_s", "peak_mb", "speedup_vs_naive", "memory_ratio_vs_naive",
               "max_dpos_vs_naive_px", "max_dpos_vs_float64_px", "positions_equal_1e-4"]
    title = f"Cost volume + soft-argmax, T={frames} N={points} D={_DIM} grids 64²/64²/32² ({device})"
    paths = write_report(out_dir, "cost_volume", rows, columns, plot=plot, extra=extra, title=title)
    return {"rows": rows, **extra, "paths": {k: str(v) for k, v in paths.items()}}


def main() -> None:
    import fire

    fire.Fire(run)


if __name__ == "__main__":
    main()
