"""Benchmark: 3D forward/backward time and peak memory of the AdaCS displacement estimators (``adacs_registration``).

One training step of each estimator on one 3D pair, side by side in one run on the same input: the forward
``f(I_s, I_t) -> (warped, û)`` in training mode and the backward of the plain registration loss (Eq. 1:
``mean (I_t - warped)² + λ ‖∇û‖²``, λ = 0.01). Estimators: every name of
:data:`common.networks.registration.ESTIMATORS` among ``voxelmorph``, ``transmorph`` and ``diffusemorph`` (the last
once its factory entry exists), each with the constructor defaults the bundle uses (``spatial_dims=3``). Also timed:
the forward alone in evaluation mode (what inference runs).

Size from the issue: a 64³ volume pair (batch 1) on CPU; ``--quick`` uses 32³ (every estimator needs sizes divisible
by 32 or less). Reported per estimator: median time over ``repeats`` (after one warm-up call), peak extra memory of one
training step (on CPU the sampled RSS increase in a fresh process per estimator, with glibc's mmap threshold fixed
so freed memory is returned and counted again (as :mod:`tools.bench.cost_volume`), after one warm-up step, so
one-time allocations are not counted; ``--quick`` measures in this process instead, with the same threshold, to save
the interpreter start-ups; max allocated on CUDA), the parameter count, and each estimator's time
relative to VoxelMorph's. Inputs are a synthetic 3D echo pair
(:func:`common.data.synthetic.registration3d.simulate_volume_pair`) resized to the size; weights are random (the
time does not depend on them).

Usage: ``python -m tools.bench registration3d [--quick] [--device cpu] [--repeats 3] [--out_dir output/bench]``, or
``python -m tools.bench.registration3d --threads 1 ...`` to pin the CPU threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.data.synthetic.registration3d import simulate_volume_pair
from common.losses.adacs import plain_registration_loss
from common.networks.registration import ESTIMATORS, build_displacement_estimator
from tools.bench.cost_volume import _fixed_mmap_threshold
from tools.bench.report import peak_memory_bytes, time_fn, time_memory_bars, write_report

__all__ = ["CANDIDATES", "make_pair", "run", "main"]

CANDIDATES = ("voxelmorph", "transmorph", "diffusemorph")
_SIZE, _QUICK_SIZE = 64, 32


def make_pair(size: int, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic ED/ES echo volume pair ``(1, 1, size, size, size)`` each, min-max normalised to [0, 1]."""
    pair = simulate_volume_pair(seed, shape=(40, 40, 40), clean=True)
    out = []
    for arr in (pair.source, pair.target):
        t = torch.as_tensor(np.asarray(arr, dtype=np.float32))[None, None]
        t = F.interpolate(t, size=(size,) * 3, mode="trilinear", align_corners=False)
        out.append(((t - t.min()) / (t.max() - t.min())).to(device))
    return out[0], out[1]


def _train_step(net: torch.nn.Module, source: torch.Tensor, target: torch.Tensor):
    def step() -> None:
        net.train()
        net.zero_grad(set_to_none=True)
        warped, disp = net(source, target)
        plain_registration_loss(target, warped, disp, 0.01).backward()

    return step


def _child_peak_bytes(name: str, size: int, device: str) -> int:
    """Peak extra memory of one training step of ``name`` after one warm-up step (run in a fresh process on CPU)."""
    if torch.device(device).type != "cuda" and not _fixed_mmap_threshold():
        raise RuntimeError("cannot fix glibc's mmap threshold: the RSS-based peak memory would be unreliable")
    torch.manual_seed(0)
    source, target = make_pair(size, device)
    step = _train_step(build_displacement_estimator(name, spatial_dims=3).to(device), source, target)
    step()
    return peak_memory_bytes(step, device=device)


def _peak_bytes(name: str, size: int, device: str) -> int:
    if torch.device(device).type == "cuda":
        return _child_peak_bytes(name, size, device)
    root = Path(__file__).resolve().parents[2]
    code = ("import json, torch; from tools.bench.registration3d import _child_peak_bytes; "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            f"print(json.dumps(_child_peak_bytes({name!r}, {size!r}, {device!r})))")
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {name!r} failed:\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1]))


def _row(name: str, source: torch.Tensor, target: torch.Tensor, device: str, repeats: int,
         fresh_process: bool = True) -> dict[str, Any]:
    torch.manual_seed(0)
    net = build_displacement_estimator(name, spatial_dims=3).to(device)
    train_step = _train_step(net, source, target)

    def forward_eval() -> None:
        net.eval()
        with torch.no_grad():
            net(source, target)

    n_params = sum(p.numel() for p in net.parameters())
    if fresh_process:
        step = time_fn(train_step, repeats=repeats, warmup=1, device=device)
        fwd = time_fn(forward_eval, repeats=repeats, warmup=1, device=device)
        peak = _peak_bytes(name, int(source.shape[-1]), device)
    else:  # quick: the peak of the timed steps, after one warm-up step (what is allocated once is not counted)
        if torch.device(device).type != "cuda" and not _fixed_mmap_threshold():
            raise RuntimeError("cannot fix glibc's mmap threshold: the RSS-based peak memory would be unreliable")
        train_step()
        peak_box: list[dict[str, float]] = []
        peak = peak_memory_bytes(lambda: peak_box.append(time_fn(train_step, repeats=repeats, warmup=0,
                                                                  device=device)), device=device)
        step = peak_box[0]
        fwd = time_fn(forward_eval, repeats=repeats, warmup=0, device=device)
    return {"method": name, "median_s": step["median_s"], "min_s": step["min_s"], "max_s": step["max_s"],
            "forward_eval_s": fwd["median_s"], "peak_mb": peak / 2**20, "params_m": n_params / 1e6}


def run(out_dir: str = "output/bench", quick: bool = False, device: str = "cpu", repeats: int = 3,
        threads: int | None = None, size: int | None = None) -> dict[str, Any]:
    """Time and measure every available 3D estimator at ``size``³ (64, or 32 with ``quick``); writes
    ``registration3d.json``, ``.md`` and ``.png`` under ``out_dir``; returns the report's paths."""
    if threads:
        torch.set_num_threads(int(threads))
    size = int(size or (_QUICK_SIZE if quick else _SIZE))
    source, target = make_pair(size, device)
    names = [n for n in CANDIDATES if n in ESTIMATORS]
    missing = [n for n in CANDIDATES if n not in ESTIMATORS]
    rows = [_row(n, source, target, device, int(repeats), fresh_process=not quick) for n in names]
    base = next((r["median_s"] for r in rows if r["method"] == "voxelmorph"), None)
    for r in rows:
        r["time_vs_voxelmorph"] = r["median_s"] / base if base else float("nan")
    extra = {"size": [size] * 3, "batch": 1, "device": device, "repeats": int(repeats),
             "threads": torch.get_num_threads(), "not_available": missing,
             "step": "train-mode forward + backward of Eq. 1 (lambda 0.01)"}
    paths = write_report(
        out_dir, "registration3d", rows,
        ["method", "median_s", "forward_eval_s", "peak_mb", "params_m", "time_vs_voxelmorph"],
        plot=lambda ax: time_memory_bars(ax, rows), extra=extra,
        title=f"3D registration estimators, {size}^3 pair, forward+backward ({device})")
    for r in rows:
        print(f"{r['method']:>13}: step {r['median_s']:.3f} s, eval forward {r['forward_eval_s']:.3f} s, "
              f"peak {r['peak_mb']:.0f} MB, {r['params_m']:.2f} M params")
    print(f"report: {paths['md']}")
    return {k: str(v) for k, v in paths.items()}


def main() -> None:
    import fire

    fire.Fire(run)


if __name__ == "__main__":
    main()
