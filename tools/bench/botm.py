"""BOTM forward-time benchmark: a frame pair at 672x672 with the BOTM (optimal-transport) blocks on vs off, one run.

Usage: ``python -m tools.bench.botm [--out_dir output/bench] [--quick] [--device cpu] [--repeats 3] [--threads N]``.

Configurations, all the full MiT-B2 BOTMSegNet of the bundle (4 classes, eval mode, no gradients), same input:

* ``OT on`` -- BOTM blocks with the default 50 Sinkhorn iterations (the bundle's network);
* ``OT on, 10 it`` -- the same with 10 iterations (what the iteration count costs);
* ``OT on, keys reduced`` -- ``token_reduction="keys"``: full-resolution queries, keys/values on the pooled grid,
  rectangular plans (pooled grid x full grid: 1764 x 28224 at stage 1), 50 iterations;
* ``OT off (single)`` -- the same encoder and decoder without BOTM blocks, each frame on its own (paper Table 6 #1);
* ``OT off (ADD)`` -- without BOTM blocks, frames combined by addition (Table 6 #2).

Goal (issue): the OT blocks add at most 25 % to the forward time of ``OT off (single)``. The configurations are
timed in interleaved rounds (one call of each per round, ``repeats`` rounds after one warm-up call each), so load
changes on a shared machine hit all of them alike; the median per configuration is reported, with the peak memory
of one call (sampled RSS increase on CPU, max allocated on CUDA) and the median process CPU time of a call
(``cpu_s``: with one thread it is the compute time without the waits a loaded machine adds to the wall time).
``--quick`` uses 224x224 and 2 rounds; ``--threads`` sets ``torch.set_num_threads`` for the run (restored after).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from common.networks.botm import BOTMSegNet
from tools.bench.report import peak_memory_bytes, write_report

__all__ = ["run", "main", "CONFIGS", "TARGET_OVERHEAD"]

TARGET_OVERHEAD = 0.25
CONFIGS: dict[str, dict[str, Any]] = {
    "OT on": {"use_ot": True, "sinkhorn_iters": 50},
    "OT on, 10 it": {"use_ot": True, "sinkhorn_iters": 10},
    "OT on, keys reduced": {"use_ot": True, "sinkhorn_iters": 50, "token_reduction": "keys"},
    "OT off (single)": {"use_ot": False, "pairing": "single"},
    "OT off (ADD)": {"use_ot": False, "pairing": "add"},
}
COLUMNS = ["config", "size", "sinkhorn_iters", "token_reduction", "time_s", "min_s", "x_vs_ot_off", "overhead_pct",
           "cpu_s", "cpu_overhead_pct", "peak_mb", "params_m"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(out_dir: str = "output/bench", quick: bool = False, device: str = "cpu", repeats: int = 3,
        threads: int | None = None) -> dict[str, Path]:
    """Time the configurations; write ``botm.json``, ``botm.md`` and ``botm.png`` under ``out_dir``."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(out_dir, quick, torch.device(device), repeats)
    finally:
        torch.set_num_threads(old_threads)


def _run(out_dir: str, quick: bool, dev: torch.device, repeats: int) -> dict[str, Path]:
    device = str(dev)
    size = 224 if quick else 672
    rounds = 2 if quick else max(1, int(repeats))
    x = torch.rand(1, 2, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    nets = {}
    for name, kw in CONFIGS.items():
        torch.manual_seed(0)
        nets[name] = BOTMSegNet(num_classes=4, **kw).to(dev).eval()
    peaks, times, cpu = {}, {name: [] for name in nets}, {name: [] for name in nets}
    with torch.no_grad():
        for name, net in nets.items():
            # the warm-up call doubles as the memory measurement (allocator caches are warm after it)
            peaks[name] = peak_memory_bytes(lambda net=net: net(x), device=device) / 2**20
        for _ in range(rounds):
            for name, net in nets.items():
                _sync(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                net(x)
                _sync(dev)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    base = statistics.median(times["OT off (single)"])
    cpu_base = statistics.median(cpu["OT off (single)"])
    rows = []
    for name, net in nets.items():
        med = statistics.median(times[name])
        cpu_med = statistics.median(cpu[name])
        rows.append({
            "config": name, "size": f"{size}x{size}", "sinkhorn_iters": CONFIGS[name].get("sinkhorn_iters", "-"),
            "token_reduction": CONFIGS[name].get("token_reduction", "both") if CONFIGS[name]["use_ot"] else "-",
            "time_s": med, "min_s": min(times[name]), "x_vs_ot_off": med / base, "overhead_pct": 100 * (med / base - 1),
            "cpu_s": cpu_med, "cpu_overhead_pct": 100 * (cpu_med / cpu_base - 1),
            "peak_mb": peaks[name], "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        })
    overhead = rows[0]["x_vs_ot_off"] - 1.0
    extra = {
        "device": str(dev), "threads": torch.get_num_threads(), "rounds": rounds, "input": [1, 2, size, size],
        "ot_overhead_pct": 100 * overhead, "ot_cpu_overhead_pct": rows[0]["cpu_overhead_pct"],
        "target_overhead_pct": 100 * TARGET_OVERHEAD, "target_met": bool(overhead <= TARGET_OVERHEAD),
    }

    def plot(ax) -> None:
        names = [r["config"] for r in rows]
        vals = [r["time_s"] for r in rows]
        bars = ax.bar(names, vals, color=["tab:red", "tab:orange", "tab:purple", "tab:blue", "tab:cyan"])
        for b, r in zip(bars, rows):
            ax.annotate(f"{r['time_s']:.2f} s\n{r['overhead_pct']:+.0f} %", (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.axhline(base * (1 + TARGET_OVERHEAD), ls="--", color="gray", label="goal: OT off + 25 %")
        ax.set_ylabel(f"forward time of one pair, s ({dev.type}, {torch.get_num_threads()} threads)")
        ax.set_ylim(0, max(vals) * 1.25)
        ax.legend(fontsize=8)

    return write_report(out_dir, "botm", rows, COLUMNS, plot=plot, extra=extra,
                        title=f"BOTM forward time, pair {size}x{size}: OT blocks on vs off")


def main() -> None:
    import fire

    fire.Fire(run)


if __name__ == "__main__":
    main()
