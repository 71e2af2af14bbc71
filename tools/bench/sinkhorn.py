"""Sinkhorn benchmark at BOTM's sizes: ``common.ops.sinkhorn`` vs POT and geomloss, side by side in one run.

Usage: ``python -m tools.bench.sinkhorn [--out_dir output/bench] [--quick] [--device cpu] [--repeats 3]
[--threads 1]``.

Every method solves the same problem: ``eps = 0.1``, uniform marginals, the cosine cost of the same features
``xs``, ``xt`` (B, N, D), the same number of iterations, a (B, N, M) plan as output unless stated. Two times per
method: ``solve_s`` from the cost matrix ``C`` (B, N, M) (the solver comparison; the targets use it) and
``total_s`` from the features (measured for ours, whose op builds the kernel itself; for the baselines the
``cost build (cosine_cost)`` row is added: once, twice for geomloss which builds ``C_xy`` and ``C_yx``).

* ``ours`` (``domain="auto"``, the scaling form here), ``ours log`` (``domain="log"``), ``ours transport``
  (both barycentric transports ``T @ xt``, ``T^T @ xs`` instead of the plan, what BOTM consumes; total through
  ``sinkhorn_transport``);
* ``ot.batch.solve_batch(method="log_sinkhorn")`` (POT's batched solver: row-first, ``v = 1`` initially, our exact
  iterates), ``ot.sinkhorn`` and ``ot.bregman.sinkhorn_log`` looped over the batch (per-pair plans returned as
  they come, no stacking copy). Those two update the columns first, so they are run on the transposed problem
  ``(b, a, C^T)``, whose iterates are exactly ours. ``stopThr=0`` / ``tol=0`` disable their early stops. Inputs
  are float32 numpy arrays on CPU (float32 torch tensors on CUDA), the precision of ours.
* ``geomloss tensorized`` (``SamplesLoss("sinkhorn", p=1, blur=eps, debias=False, potentials=True)``, the cost
  function returning ``C``), timed up to its potentials (no plan): a different scheme (symmetric updates with
  eps-annealing from the diameter 2 to eps), so only its iteration count is matched where possible (``scaling``
  chosen to give the same number of updates; it cannot do fewer than 5).

``max_rel_diff`` is the largest plan difference to ours relative to the largest plan entry (same iterates: ~1e-6
in float32; geomloss differs by design).

The iteration loop of ours is also timed alone (``K`` given) and compared with the two-pass bandwidth bound
``iterations x 2 x bytes(K) / copy bandwidth``, the copy bandwidth being measured in the same run. Times are
medians of ``repeats`` calls after a warm-up call (the warm-up call measures the peak memory: sampled RSS increase
on CPU, max allocated on CUDA).
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.ops.sinkhorn import _gibbs, _torch_iterate, cosine_cost, sinkhorn, sinkhorn_transport
from tools.bench.report import copy_bandwidth_gbs, peak_memory_bytes, time_fn, write_report

__all__ = ["run", "main"]

EPS = 0.1
BATCH = 8
# per method and configuration: fewer repeats (at least 1) for methods whose warm-up call exceeds budget / repeats
TIME_BUDGET_S = 30.0

COLUMNS = [
    "N",
    "D",
    "iters",
    "method",
    "iters_run",
    "solve_s",
    "total_s",
    "repeats",
    "peak_mb",
    "x_vs_ours",
    "x_vs_ours_total",
    "max_rel_diff",
]
TARGET_COLUMNS = [
    "N",
    "D",
    "iters",
    "loop_s",
    "bound_s",
    "loop_bw_fraction",
    "speedup_vs_pot_batch_log",
    "log_speedup_vs_pot_sinkhorn_log",
    "speedup_vs_pot_sinkhorn",
    "total_speedup_vs_pot_batch_log",
    "total_log_speedup_vs_pot_sinkhorn_log",
    "total_speedup_vs_pot_sinkhorn",
    "log_loop_s",
    "targets_missed",
]


def _geomloss_scaling(n_iters: int, diameter: float, blur: float) -> tuple[float, int]:
    """``scaling`` giving ``n_iters`` softmin pairs in geomloss' loop (initial + one per eps value + extrapolation).

    The schedule is ``[diameter] + exp(arange(log diameter, log blur, log scaling)) + [blur]``, so the count is
    ``len(arange) + 4``, at least 5.
    """
    want = max(1, n_iters - 4)
    scaling = math.exp((math.log(blur) - math.log(diameter)) / want)
    got = len(np.arange(math.log(diameter), math.log(blur), math.log(scaling))) + 4
    return scaling, got


def _budgeted_time(fn, repeats: int, device: str) -> dict[str, float]:
    """``time_fn`` after one warm-up call, with at most ``TIME_BUDGET_S`` worth of repeats (at least 1)."""
    t0 = time.perf_counter()
    fn()
    warm_s = time.perf_counter() - t0
    reps = max(1, min(repeats, int(TIME_BUDGET_S // max(warm_s, 1e-9))))
    return time_fn(fn, repeats=reps, warmup=0, device=device)


def _rel_diff(p: torch.Tensor, ref: torch.Tensor) -> float:
    return float((p.double() - ref.double()).abs().max() / ref.double().abs().max())


def _bench_config(
    N: int, D: int, n_iters: int, device: str, repeats: int, bw_gbs: float, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import ot
    from geomloss import SamplesLoss

    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(BATCH, N, D, generator=g).to(device)
    xt = torch.randn(BATCH, N, D, generator=g).to(device)
    C = cosine_cost(xs, xt)
    cpu = torch.device(device).type == "cpu"
    rows: list[dict[str, Any]] = []
    results: dict[str, torch.Tensor] = {}

    def measure(fn) -> tuple[dict[str, float], float, Any]:
        holder: dict[str, Any] = {}

        def call():
            holder["out"] = fn()

        with torch.no_grad():
            t0 = time.perf_counter()
            peak = peak_memory_bytes(call, device=device)  # doubles as the warm-up call
            warm_s = time.perf_counter() - t0
            # slow baselines get fewer repeats so the full grid stays within minutes (recorded per row)
            reps = max(1, min(repeats, int(TIME_BUDGET_S // max(warm_s, 1e-9))))
            stats = time_fn(call, repeats=reps, warmup=0, device=device)
        return stats, peak / 2**20, holder["out"]

    def add_row(method: str, solve, total=None, total_from_cost: float | None = None, iters_run=n_iters) -> None:
        stats, peak, out = measure(solve)
        if isinstance(out, list):  # per-pair POT plans
            out = torch.stack([torch.as_tensor(np.asarray(p)) for p in out])
        elif isinstance(out, tuple) and len(out) == 2 and out[0].shape == (BATCH, N):  # geomloss potentials
            f, gg = out
            out = torch.exp((f.unsqueeze(2) + gg.unsqueeze(1) - C) / EPS) / (N * N)
        elif isinstance(out, tuple):  # transports: compare the first
            out = out[0]
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        results[method] = out.detach().float().cpu()
        row = {
            "N": N,
            "D": D,
            "iters": n_iters,
            "method": method,
            "iters_run": iters_run,
            "solve_s": stats["median_s"],
            "repeats": stats["repeats"],
            "peak_mb": peak,
        }
        if total is not None:
            row["total_s"] = measure(total)[0]["median_s"]
        elif total_from_cost is not None:
            row["total_s"] = stats["median_s"] + total_from_cost
        rows.append(row)

    def to_backend(x: torch.Tensor):
        return x.cpu().numpy() if cpu else x

    cost_s = measure(lambda: cosine_cost(xs, xt))[0]["median_s"]

    add_row(
        "ours",
        lambda: sinkhorn(C, eps=EPS, n_iters=n_iters).plan,
        total=lambda: sinkhorn(xs=xs, xt=xt, eps=EPS, n_iters=n_iters).plan,
    )
    add_row(
        "ours log",
        lambda: sinkhorn(C, eps=EPS, n_iters=n_iters, domain="log").plan,
        total=lambda: sinkhorn(xs=xs, xt=xt, eps=EPS, n_iters=n_iters, domain="log").plan,
    )

    def ours_transport_from_cost():
        r = sinkhorn(C, eps=EPS, n_iters=n_iters)
        return r.transport(xt), r.transport_t(xs)

    add_row(
        "ours transport",
        ours_transport_from_cost,
        total=lambda: sinkhorn_transport(xs, xt, eps=EPS, n_iters=n_iters),
    )

    M = to_backend(C)
    w = to_backend(torch.full((N,), 1.0 / N, device=device))

    def pot_batch_log():
        res = ot.batch.solve_batch(M, reg=EPS, max_iter=n_iters, tol=0.0, method="log_sinkhorn", grad="detach")
        return res.plan

    def pot_loop(solver):
        # transposed problem: POT updates columns first, this makes its iterates equal to ours. The per-pair plans
        # are returned as they come (transposed views, no copy); stacking happens outside the timing.
        return lambda: [solver(w, w, M[i].T, EPS, numItermax=n_iters, stopThr=0.0, warn=False).T for i in range(BATCH)]

    add_row("POT ot.batch log_sinkhorn", pot_batch_log, total_from_cost=cost_s)
    add_row("POT ot.sinkhorn loop", pot_loop(ot.sinkhorn), total_from_cost=cost_s)
    add_row("POT ot.sinkhorn_log loop", pot_loop(ot.bregman.sinkhorn_log), total_from_cost=cost_s)

    scaling, g_iters = _geomloss_scaling(n_iters, 2.0, EPS)

    def given_cost(x, y):  # the precomputed cost, so the solve is timed apart from the cost build
        return C if x is xs else C.transpose(1, 2)

    loss = SamplesLoss(
        "sinkhorn",
        p=1,
        blur=EPS,
        scaling=scaling,
        diameter=2.0,
        debias=False,
        potentials=True,
        backend="tensorized",
        cost=given_cost,
    )
    wb = torch.full((BATCH, N), 1.0 / N, device=device)
    # it builds C_xy and C_yx from the features: two cost builds in its total
    add_row("geomloss tensorized", lambda: loss(wb, xs, wb, xt), total_from_cost=2 * cost_s, iters_run=g_iters)

    ref = results["ours"]
    by = {r["method"]: r for r in rows}
    for row in rows:
        row["x_vs_ours"] = row["solve_s"] / by["ours"]["solve_s"]
        row["x_vs_ours_total"] = row["total_s"] / by["ours"]["total_s"]
        out = results.get(row["method"])
        if out is not None and out.shape == ref.shape and row["method"] != "ours transport":
            row["max_rel_diff"] = _rel_diff(out, ref)
    rows.insert(
        0, {"N": N, "D": D, "iters": n_iters, "method": "cost build (cosine_cost)", "solve_s": 0.0, "total_s": cost_s}
    )

    # iteration loop alone, against the two-pass bandwidth bound
    a = torch.full((BATCH, N), 1.0 / N, device=device)
    with torch.no_grad():
        K = _gibbs(C.float(), EPS, False)
        # the op's own dispatch (per-element or batched loop), on a prebuilt kernel
        loop_s = _budgeted_time(lambda: _torch_iterate(K, a, a, False, n_iters, None, False), repeats, device)
        S = _gibbs(C.float(), EPS, True)
        log_loop_s = _budgeted_time(lambda: _torch_iterate(S, a, a, True, n_iters, None, False), repeats, device)
    bound_s = n_iters * 2 * K.numel() * K.element_size() / (bw_gbs * 1e9)
    solve = {r["method"]: r["solve_s"] for r in rows}
    total = {r["method"]: r["total_s"] for r in rows}
    target = {
        "N": N,
        "D": D,
        "iters": n_iters,
        "loop_s": loop_s["median_s"],
        "log_loop_s": log_loop_s["median_s"],
        "bound_s": bound_s,
        "loop_bw_fraction": bound_s / loop_s["median_s"],
        "speedup_vs_pot_batch_log": solve["POT ot.batch log_sinkhorn"] / solve["ours"],
        "log_speedup_vs_pot_sinkhorn_log": solve["POT ot.sinkhorn_log loop"] / solve["ours log"],
        "speedup_vs_pot_sinkhorn": solve["POT ot.sinkhorn loop"] / solve["ours"],
        "total_speedup_vs_pot_batch_log": total["POT ot.batch log_sinkhorn"] / total["ours"],
        "total_log_speedup_vs_pot_sinkhorn_log": total["POT ot.sinkhorn_log loop"] / total["ours log"],
        "total_speedup_vs_pot_sinkhorn": total["POT ot.sinkhorn loop"] / total["ours"],
    }
    met = {
        "bw>=50%": target["loop_bw_fraction"] >= 0.5,
        ">=10x batch": target["speedup_vs_pot_batch_log"] >= 10,
        "log>=2x": target["log_speedup_vs_pot_sinkhorn_log"] >= 2,
        ">=1x sinkhorn": target["speedup_vs_pot_sinkhorn"] >= 1,
    }
    target["targets_met"] = ", ".join(k for k, v in met.items() if v) or "none"
    target["targets_missed"] = ", ".join(k for k, v in met.items() if not v) or "none"
    return rows, target


def run(
    out_dir: str = "output/bench",
    quick: bool = False,
    device: str = "cpu",
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark and write ``sinkhorn.{json,md,png}`` and ``sinkhorn_targets.{json,md}`` under ``out_dir``.

    Args:
        out_dir: output folder.
        quick: a smoke-test subset (N = M = 121, D = 64, 3 and 50 iterations, one timed call per method), seconds
            on 2 idle CPU cores.
        device: ``"cpu"`` or ``"cuda"`` (ours then runs the Triton kernels).
        repeats: timed calls per method (median reported; fewer for calls slower than ``TIME_BUDGET_S / repeats``).
        threads: torch intra-op threads for the run (default: leave as is). On a machine shared with other jobs,
            OpenMP barriers wait for descheduled threads and multi-threaded timings blow up; 1 avoids that.

    Returns:
        ``{"rows": [...], "targets": [...], "copy_bandwidth_gbs": float, "paths": {...}}``.
    """
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(out_dir, quick, device, repeats)
    finally:
        torch.set_num_threads(threads_before)


def _run(out_dir: str, quick: bool, device: str, repeats: int) -> dict[str, Any]:
    sizes = [121] if quick else [441, 1764]
    dims = [64] if quick else [64, 256, 512]
    iters = [50, 3]
    if quick:  # a smoke test: one timed call per method
        repeats = 1
    load_start = os.getloadavg()
    bw = copy_bandwidth_gbs()
    rows: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    for N in sizes:
        for D in dims:
            for n in iters:
                r, t = _bench_config(N, D, n, device, repeats, bw)
                rows += r
                targets.append(t)
    bw_end = copy_bandwidth_gbs()

    def plot(ax):
        labels = sorted({(r["N"], r["D"], r["iters"]) for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        xs = np.arange(len(labels))
        for m in methods:
            ys = [
                next((r["total_s"] for r in rows if (r["N"], r["D"], r["iters"]) == lab and r["method"] == m), np.nan)
                for lab in labels
            ]
            ax.plot(xs, ys, marker="o", label=m)
        ax.set_xticks(xs, [f"N={n}\nD={d}\nit={i}" for n, d, i in labels], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("total time from features (s)")
        ax.legend(fontsize=7)

    extra = {
        "eps": EPS,
        "batch": BATCH,
        "device": device,
        "copy_bandwidth_gbs_start": bw,
        "copy_bandwidth_gbs_end": bw_end,
        "threads": torch.get_num_threads(),
        # other processes on the machine distort CPU timings (OpenMP barriers wait for descheduled threads)
        "load_average_1_5_15_start": load_start,
        "load_average_1_5_15_end": os.getloadavg(),
        "cpu": platform.processor(),
    }
    paths = write_report(
        out_dir, "sinkhorn", rows, COLUMNS, plot=plot, extra=extra, title=f"Sinkhorn, B={BATCH}, eps={EPS}, {device}"
    )
    tpaths = write_report(
        out_dir,
        "sinkhorn_targets",
        targets,
        TARGET_COLUMNS,
        extra={"copy_bandwidth_gbs_start": bw, "copy_bandwidth_gbs_end": bw_end},
        title="Sinkhorn targets (loop vs two-pass bandwidth bound; speedups at equal iterations)",
    )
    return {
        "rows": rows,
        "targets": targets,
        "copy_bandwidth_gbs": bw,
        "paths": {**{k: str(v) for k, v in paths.items()}, **{"targets_" + k: str(v) for k, v in tpaths.items()}},
    }


def _cli(
    out_dir: str = "output/bench",
    quick: bool = False,
    device: str = "cpu",
    repeats: int = 3,
    threads: int | None = None,
) -> str:
    res = run(out_dir=out_dir, quick=quick, device=device, repeats=repeats, threads=threads)
    return "\n\n".join(Path(res["paths"][k]).read_text() for k in ("md", "targets_md"))


def main() -> None:
    """Fire entry point: runs :func:`run` and prints the two Markdown tables."""
    import fire

    fire.Fire(_cli)


if __name__ == "__main__":
    main()
