"""Benchmark: LSSC's 2D slice-wise vs 3D sliding-window inference of one volume, side by side in one run.

One ``160 x 160 x 128`` volume (random values, z-scored scale; CPU) segmented by the inference network (``model.pt``,
no EAMs) of each configuration at the paper's size, random weights:

* ``2D (Swin-Unet), slice-wise``: every coronal slice with its two neighbours as channels, 224-configuration network
  (embed 96, depths [2, 2, 2, 2], window 7, patch 4), 16 slice stacks per call
  (:class:`common.engines.inference.SliceStackInferer`, the bundle's default inferer);
* ``3D (nnFormer-style), sliding window``: ``128 x 128 x 64`` windows with 25 % overlap (12 windows for this
  volume), 2 windows per call, embed 96, depths [2, 2, 2, 2], window 4, patch 4 x 4 x 2
  (:class:`common.engines.lssc3d.ModalitySlidingWindowInferer`, ``configs/3d.json``).

Measured: median process CPU time and wall time over interleaved repeats (order alternating), peak extra memory of
one call (sampled RSS after the timing, glibc's mmap threshold fixed), parameters, network calls. No speed goal is set
by the issue; the table says what the 3D configuration costs per volume against the 2D one.

Usage: ``python -m tools.bench lssc3d [--quick] [--repeats 3] [--out_dir output/bench]``; ``--quick`` uses a
``64 x 64 x 48`` volume and the reduced networks of ``configs/cpu_reduced.json`` / ``cpu_reduced_3d.json``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tools.bench.cost_volume import _fixed_mmap_threshold
from tools.bench.report import peak_memory_bytes, write_report

__all__ = ["main", "run"]

COLUMNS = ["configuration", "volume", "network_input", "calls", "wall_s", "cpu_s", "x_vs_2d", "peak_mb", "params_m"]


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:  # configs/cpu_reduced.json and configs/cpu_reduced_3d.json
        net2d = {"img_size": 64, "embed_dim": 32, "num_heads": [2, 4, 8, 16], "depths": [1, 1, 1, 1],
                 "decoder_depths": [1, 1, 1], "window_size": 4}
        net3d = {"img_size": 64, "embed_dim": 16, "num_heads": [1, 2, 4, 8], "depths": [1, 1, 1, 1],
                 "decoder_depths": [1, 1, 1], "window_size": 4}
        return {"volume": (64, 64, 48), "roi": (64, 64, 32), "net2d": net2d, "net3d": net3d}
    net2d = {"img_size": 224, "embed_dim": 96, "num_heads": [3, 6, 12, 24], "depths": [2, 2, 2, 2],
             "decoder_depths": [2, 2, 2], "window_size": 7}
    net3d = {"img_size": 128, "embed_dim": 96, "num_heads": [3, 6, 12, 24], "depths": [2, 2, 2, 2],
             "decoder_depths": [2, 2, 2], "window_size": 4}
    return {"volume": (160, 160, 128), "roi": (128, 128, 64), "net2d": net2d, "net3d": net3d}


class _Counting(torch.nn.Module):
    """Counts the network calls (slice-stack chunks or window batches) of one volume."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        self.calls += 1
        return self.net(x, modality)


def _cases(quick: bool) -> tuple[dict[str, tuple[str, str, _Counting, Callable[[], Any]]], str]:
    """``({key: (name, network input, counted network, one-volume inference)}, volume size text)``."""
    from common.engines.lssc import lssc_network
    from common.engines.lssc3d import lssc_inferer

    s = _sizes(quick)
    torch.manual_seed(0)
    net2d = _Counting(lssc_network("full", ["ct", "mr"], for_inference=True, in_channels=3, num_classes=5,
                                   **s["net2d"]).eval())
    net3d = _Counting(lssc_network("full", ["ct", "mr"], for_inference=True, spatial_dims=3, in_channels=1,
                                   num_classes=5, **s["net3d"]).eval())
    volume = torch.randn(1, 1, *s["volume"], generator=torch.Generator().manual_seed(1))
    slice_wise = lssc_inferer(2, slice_axis="coronal", num_slices=3, batch_size=16, size_multiple=32)
    sliding = lssc_inferer(3, roi_size=list(s["roi"]), overlap=0.25, batch_size=2)

    def infer(inferer, net):
        def fn():
            with torch.inference_mode():
                return inferer(volume, net, modality="mr")
        return fn

    vol = "x".join(map(str, s["volume"]))
    return {
        "2d": ("2D (Swin-Unet), slice-wise", f"3 x {s['volume'][0]} x {s['volume'][2]} slice stacks", net2d,
               infer(slice_wise, net2d)),
        "3d": ("3D (nnFormer-style), sliding window", "x".join(map(str, s["roi"])) + " windows, 25 % overlap", net3d,
               infer(sliding, net3d)),
    }, vol


def run(out_dir: str = "output/bench", quick: bool = False, device: str = "cpu", repeats: int = 3) -> dict:
    """Time and measure both configurations; write ``lssc3d.json``, ``lssc3d.md`` and ``lssc3d.png`` under
    ``out_dir``."""
    if torch.device(device).type != "cpu":
        raise ValueError("the LSSC 3D benchmark runs on CPU only (the bundle infers on GPU with the same code)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cases, vol = _cases(quick)
    calls = {}
    for key, (_, _, net, fn) in cases.items():  # warm-up, and the number of network calls per volume
        net.calls = 0
        fn()
        calls[key] = net.calls
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    keys = list(cases)
    for r in range(repeats):  # interleaved, order alternating, so load bursts hit both alike
        for key in keys[r % 2:] + keys[: r % 2]:
            t0, c0 = time.perf_counter(), time.process_time()
            cases[key][3]()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    if not _fixed_mmap_threshold():
        raise RuntimeError("cannot fix glibc's mmap threshold: the RSS-based peak memory would be unreliable")
    base = statistics.median(cpu["2d"])
    rows = []
    for key, (name, net_input, net, fn) in cases.items():
        rows.append({"configuration": name, "volume": vol, "network_input": net_input, "calls": calls[key],
                     "wall_s": statistics.median(wall[key]), "cpu_s": statistics.median(cpu[key]),
                     "x_vs_2d": statistics.median(cpu[key]) / base, "peak_mb": peak_memory_bytes(fn) / 2**20,
                     "params_m": sum(p.numel() for p in net.parameters()) / 1e6})
    extra = {"threads": torch.get_num_threads(), "repeats": repeats, "networks": _sizes(quick)}

    def plot(ax) -> None:
        bars = ax.bar(range(len(rows)), [r["cpu_s"] for r in rows], color=["tab:gray", "tab:blue"])
        for b, r in zip(bars, rows):
            ax.annotate(f"{r['cpu_s']:.1f} s, {r['peak_mb']:.0f} MB\n{r['x_vs_2d']:.2f}x", (b.get_x() + b.get_width()
                        / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [r["configuration"] for r in rows], fontsize=8)
        ax.set_ylabel(f"CPU time per volume, s ({torch.get_num_threads()} threads)")
        ax.set_ylim(0, max(r["cpu_s"] for r in rows) * 1.3)

    return write_report(out_dir, "lssc3d", rows, COLUMNS, plot=plot, extra=extra,
                        title=f"LSSC inference of one {vol} volume: 2D slice-wise vs 3D sliding window")


def main() -> None:
    import fire

    fire.Fire(run)


if __name__ == "__main__":
    main()
