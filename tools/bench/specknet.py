"""Benchmark: SpeckNet encoder-only time vs full tracking time on one echo video (the ``specknet_tracking`` bundle).

Size from the issue: an 80-frame 512 x 512 video with 75 query points (the paper's dataset D averages 82 frames and 75
trajectories). Methods, side by side in one run on the same input and network:

* ``encoder``: :meth:`common.networks.specknet.SpeckNet.encode` (the feature pyramid of every frame);
* ``track``: :meth:`~common.networks.specknet.SpeckNet.track` alone on precomputed features (cost volumes,
  soft-argmax);
* ``full``: the whole forward (encode + track), what inference runs per video.

Goal: tracking adds at most 30 % to the encoder, ``full / encoder - 1 <= 0.30``. Reported: median time over
``repeats`` (interleaved across methods so load bursts hit all of them alike), peak extra memory of one call (sampled
RSS in a fresh process per method on CPU, max allocated on CUDA), and the overhead ratio. The video is a simulated
apical 4-chamber sequence (:func:`common.data.synthetic.echo.simulate_echo_sequence`) with its 75 myocardial
centre-line points queried at ``int(0.72 T)``; weights are random (the time does not depend on them).

Usage: ``python -m tools.bench specknet [--quick] [--device cpu] [--repeats 3] [--out_dir output/bench]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.data.synthetic.echo import simulate_echo_sequence
from common.networks.specknet import SpeckNet
from common.transforms.video import diastasis_frame
from tools.bench.cost_volume import _fixed_mmap_threshold
from tools.bench.report import peak_memory_bytes, time_fn, write_report

__all__ = ["make_inputs", "run", "main"]

_IMAGE = 512
_POINTS = 75
_TARGET_OVERHEAD = 0.30


def _frames(quick: bool) -> int:
    return 16 if quick else 80


def make_inputs(frames: int, points: int = _POINTS, size: int = _IMAGE, device: str = "cpu",
                seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A simulated echo video (1, T, size, size) in [-1, 1], its centre-line points (1, N, 2) on the query frame
    ``int(0.72 T)`` and the query frames (1, N)."""
    seq = simulate_echo_sequence(seed, view="4CH", n_frames=frames, image_size=(size, size), n_track_points=points)
    video = torch.as_tensor(seq.images, dtype=torch.float32)[None] * 2.0 - 1.0
    q = diastasis_frame(frames)
    qp = torch.as_tensor(seq.tracks[q], dtype=torch.float32)[None]
    qf = torch.full((1, points), q, dtype=torch.long)
    return video.to(device), qp.to(device), qf.to(device)


def _network(device: str) -> SpeckNet:
    torch.manual_seed(0)
    return SpeckNet().to(device).eval()


def _methods(net: SpeckNet, video: torch.Tensor, qp: torch.Tensor, qf: torch.Tensor) -> dict[str, Callable[[], Any]]:
    size = (int(video.shape[-2]), int(video.shape[-1]))
    feats = net.encode(video)
    return {
        "encoder": lambda: net.encode(video),
        "track": lambda: net.track(feats, qp, qf, size),
        "full": lambda: net(video, qp, qf),
    }


def _child_peak_bytes(name: str, quick: bool, device: str) -> int:
    """Peak extra memory of one call of ``name`` in this process (run in a fresh process on CPU)."""
    if torch.device(device).type != "cuda" and not _fixed_mmap_threshold():
        raise RuntimeError("cannot fix glibc's mmap threshold: the RSS-based peak memory would be unreliable")
    net = _network(device)
    video, qp, qf = make_inputs(_frames(quick), device=device)
    with torch.no_grad():
        # a tiny call first: thread pools and lazily initialised kernels allocate once per process
        net(video[:, :2, :64, :64], qp[:, :2] / 8, torch.zeros(1, 2, dtype=torch.long, device=device))
        if name == "track":
            size = (int(video.shape[-2]), int(video.shape[-1]))
            feats = net.encode(video)
            return peak_memory_bytes(lambda: net.track(feats, qp, qf, size), device=device)
        fn = {"encoder": lambda: net.encode(video), "full": lambda: net(video, qp, qf)}[name]
        return peak_memory_bytes(fn, device=device)


def _peak_bytes(name: str, quick: bool, device: str) -> int:
    if torch.device(device).type == "cuda":
        return _child_peak_bytes(name, quick, device)
    root = Path(__file__).resolve().parents[2]
    code = (
        "import json; from tools.bench.specknet import _child_peak_bytes; "
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
    """Time encoder / track / full; write ``specknet.{json,md,png}`` under ``out_dir``; return the payload.

    ``quick`` shrinks T to 16 frames (a smoke run); the goal refers to the full size. ``threads`` sets
    ``torch.set_num_threads`` (default: torch's choice; ``1`` on a machine shared with other processes).
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    load_before = os.getloadavg()
    frames = _frames(quick)
    net = _network(device)
    video, qp, qf = make_inputs(frames, device=device)
    with torch.no_grad():
        fns = _methods(net, video, qp, qf)
        for fn in fns.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(int(repeats)):
            for name, fn in fns.items():
                times[name].append(time_fn(fn, repeats=1, warmup=0, device=device)["median_s"])
        # the full forward must equal encode + track (same features, same op), else the comparison is meaningless
        full, parts = fns["full"](), net.track(net.encode(video), qp, qf, (_IMAGE, _IMAGE))
        same = bool(torch.equal(full["tracks"], parts["tracks"]))
    mems = {name: _peak_bytes(name, quick, device) for name in fns}
    enc = statistics.median(times["encoder"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"method": name, "median_s": med, "min_s": min(ts), "peak_mb": mems[name] / 2**20,
                     "per_frame_ms": 1000 * med / frames, "relative_to_encoder": med / enc})
    overhead = statistics.median(times["full"]) / enc - 1.0
    extra = {
        "sizes": {"T": frames, "N": _POINTS, "image_size": [_IMAGE, _IMAGE], "quick": quick},
        "device": device,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "tracking_overhead_vs_encoder": overhead,
        "goal": {"tracking_overhead_vs_encoder_max": _TARGET_OVERHEAD,
                 "met": bool(overhead <= _TARGET_OVERHEAD)},
        "full_equals_encode_plus_track": same,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "memory": "peak extra memory of one call: sampled RSS growth in a fresh process per method with glibc's "
        "mmap threshold fixed at 64 KiB on CPU, max allocated on CUDA; for 'track' the features are computed before "
        "the measured call, so it is the tracking head's own memory",
    }

    def plot(ax):
        labels = [r["method"] for r in rows]
        bars = ax.bar(labels, [r["median_s"] for r in rows], color=["#1f77b4", "#ff7f0e", "#2ca02c"])
        for bar, r in zip(bars, rows):
            ax.annotate(f"{r['median_s']:.3g} s\n{r['peak_mb']:.0f} MB", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=9)
        ax.axhline(enc * (1 + _TARGET_OVERHEAD), color="gray", ls="--", lw=0.8, label="goal: encoder + 30 %")
        ax.set_ylabel("median time (s)")
        ax.set_ylim(0, max(r["median_s"] for r in rows) * 1.35)
        ax.legend(fontsize=8, loc="upper left")

    columns = ["method", "median_s", "min_s", "per_frame_ms", "relative_to_encoder", "peak_mb"]
    title = (f"SpeckNet, T={frames} {_IMAGE}x{_IMAGE} N={_POINTS} ({device}): tracking adds "
             f"{100 * overhead:.0f} % to the encoder")
    paths = write_report(out_dir, "specknet", rows, columns, plot=plot, extra=extra, title=title)
    return {"rows": rows, **extra, "paths": {k: str(v) for k, v in paths.items()}}


def main() -> None:
    import fire

    fire.Fire(run)


if __name__ == "__main__":
    main()
