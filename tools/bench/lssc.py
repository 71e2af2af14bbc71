"""Benchmark: what LSSC's parts cost, side by side in one run (the ``lssc_multimodal`` bundle's network).

Networks at the paper's size (224 x 224 slice stacks of 3 slices, Swin-Unet embed 96, depths [2, 2, 2, 2], window 7)
with random weights:

* ``backbone``: the plain Swin-Unet (the paper's Backbone);
* ``full, inference network``: LSSC as saved in ``models/model.pt`` (image embeddings and channel-wise
  multiplication; no EAMs);
* ``full, training network``: the same with the EAMs, auxiliary maps and correlation matrices (``forward_train``).

Measured: the eval-mode forward of a batch of ``batch`` slice stacks (what inference runs, ``infer_batch_size`` 16
in the bundle) and one training step (forward + Eq. 15 + backward + Adam) on one CT and one MRI batch; median
process CPU time and wall time over interleaved rounds (the order rotates every round), peak extra memory of one call
(sampled RSS, measured after the timing with glibc's mmap threshold fixed) and parameters.
No speed goal is set by the issue; the table shows the price of the channel-wise multiplication at inference and of
the training-only EAMs.

Usage: ``python -m tools.bench lssc [--quick] [--repeats 3] [--out_dir output/bench]``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tools.bench.cost_volume import _fixed_mmap_threshold
from tools.bench.report import peak_memory_bytes, write_report

__all__ = ["run", "main"]

COLUMNS = ["network", "task", "batch", "wall_s", "cpu_s", "x_vs_backbone", "peak_mb", "params_m"]


def _size(quick: bool) -> dict[str, Any]:
    if quick:  # the bundle's reduced CPU configuration (configs/cpu_reduced.json)
        return {"img_size": 64, "embed_dim": 32, "num_heads": [2, 4, 8, 16], "depths": [1, 1, 1, 1],
                "decoder_depths": [1, 1, 1], "window_size": 4}
    return {"img_size": 224, "embed_dim": 96, "num_heads": [3, 6, 12, 24], "depths": [2, 2, 2, 2],
            "decoder_depths": [2, 2, 2], "window_size": 7}


def _cases(quick: bool, batch: int, train_batch: int) -> dict[str, tuple[str, int, torch.nn.Module, Callable]]:
    from common.engines.lssc import lssc_loss, lssc_network

    size = _size(quick)
    s = size["img_size"]
    torch.manual_seed(0)
    kw = {"in_channels": 3, "num_classes": 5, **size}
    backbone = lssc_network("backbone", ["ct"], **kw).eval()
    full_inf = lssc_network("full", ["ct", "mr"], for_inference=True, **kw).eval()
    full_train = lssc_network("full", ["ct", "mr"], **kw)
    backbone_train = lssc_network("backbone", ["ct"], **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, s, s, generator=g)
    xt = torch.randn(2, train_batch, 3, s, s, generator=g)
    yt = torch.randint(0, 5, (2, train_batch, 1, s, s), generator=g)
    full_loss, backbone_loss = lssc_loss("full"), lssc_loss("backbone")
    opt_full = torch.optim.Adam(full_train.parameters(), 1e-4)
    opt_bb = torch.optim.Adam(backbone_train.parameters(), 1e-4)

    def infer(net, modality):
        def fn():
            with torch.inference_mode():
                return net(x, modality)
        return fn

    def step_full():
        out_ct, out_mr = full_train.forward_train(xt[0], "ct"), full_train.forward_train(xt[1], "mr")
        loss = full_loss(out_ct, yt[0], out_mr, yt[1])["loss"]
        opt_full.zero_grad()
        loss.backward()
        opt_full.step()

    def step_backbone():  # one network per modality in the paper: two steps, one per modality
        for k in range(2):
            loss = backbone_loss(backbone_train.forward_train(xt[k], "ct"), yt[k])["loss"]
            opt_bb.zero_grad()
            loss.backward()
            opt_bb.step()

    return {
        "backbone|inference": ("backbone", batch, backbone, infer(backbone, "ct")),
        "full, inference network|inference": ("full, inference network", batch, full_inf, infer(full_inf, "mr")),
        "backbone|training step (CT + MRI)": ("backbone (one per modality)", train_batch, backbone_train,
                                              step_backbone),
        "full, training network|training step (CT + MRI)": ("full, training network", train_batch, full_train,
                                                             step_full),
    }


def run(out_dir: str = "output/bench", quick: bool = False, device: str = "cpu", repeats: int = 3,
        batch: int = 16, train_batch: int = 2) -> dict:
    """Time and measure every case; write ``lssc.json``, ``lssc.md`` and ``lssc.png`` under ``out_dir``."""
    if torch.device(device).type != "cpu":
        raise ValueError("the LSSC benchmark runs on CPU only (the bundle trains on GPU with the same code)")
    cases = _cases(quick, batch, train_batch)
    for _, _, _, fn in cases.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    keys = list(cases)
    for r in range(repeats):  # interleaved and rotated, so load bursts and cache state hit every case alike
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            fn = cases[key][3]
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    # peaks after the timing: freed blocks must go back to the system, or the sampled RSS under-counts
    if not _fixed_mmap_threshold():
        raise RuntimeError("cannot fix glibc's mmap threshold: the RSS-based peak memory would be unreliable")
    rows = []
    for key, (name, b, net, fn) in cases.items():
        task = key.split("|")[1]
        base = statistics.median(cpu[f"backbone|{task}"])
        rows.append({"network": name, "task": task, "batch": b if task == "inference" else f"{b} + {b}",
                     "wall_s": statistics.median(wall[key]), "cpu_s": statistics.median(cpu[key]),
                     "x_vs_backbone": statistics.median(cpu[key]) / base,
                     "peak_mb": peak_memory_bytes(fn) / 2**20,
                     "params_m": sum(p.numel() for p in net.parameters()) / 1e6})
    size = _size(quick)
    extra = {"threads": torch.get_num_threads(), "repeats": repeats, "network_size": size,
             "input": f"(batch, 3, {size['img_size']}, {size['img_size']})"}

    def plot(ax) -> None:
        labels = [f"{r['network']}\n{r['task']}" for r in rows]
        bars = ax.bar(range(len(rows)), [r["cpu_s"] for r in rows],
                      color=["tab:gray", "tab:blue", "tab:gray", "tab:blue"])
        for b, r in zip(bars, rows):
            ax.annotate(f"{r['cpu_s']:.2f} s\n{r['x_vs_backbone']:.2f}x", (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel(f"CPU time, s ({torch.get_num_threads()} threads)")
        ax.set_ylim(0, max(r["cpu_s"] for r in rows) * 1.3)

    return write_report(out_dir, "lssc", rows, COLUMNS, plot=plot, extra=extra,
                        title=f"LSSC at {size['img_size']}x{size['img_size']}: backbone vs full method")


def main() -> None:
    import fire

    fire.Fire(run)


if __name__ == "__main__":
    main()
