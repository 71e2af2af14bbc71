"""Classical speckle tracking: normalised-cross-correlation (NCC) block matching, the method vendors' speckle
tracking is built on, as a baseline with the learned tracker's calling convention.

Per point: a template (``2 template_radius + 1`` square) is taken around the query point at its query frame. The
point is tracked frame to frame in both directions from the query frame: in frame ``t`` the template of the
previous frame (taken at the previous estimate, bilinear) is matched inside a ``± search_radius`` window around that
estimate; the NCC peak is refined to sub-pixel by a parabola through the peak and its neighbours along x and y.
Drift correction: the query frame's template is then matched inside a ``± drift_radius`` window around the new
estimate, and when that match is good (peak NCC >= ``drift_min_ncc``) it replaces the frame-to-frame estimate, so
errors do not accumulate while the speckle still resembles the query frame.

:class:`NCCTracker` is an ``nn.Module`` without parameters exposing ``encode``/``track`` (what
:class:`common.engines.tracking.TrackingEvaluator` calls) and ``forward(image, query_points, query_frames)`` ->
``pred (B, 3, T, N)`` like :class:`common.networks.specknet.SpeckNetBundleAdapter`; confidence is the frame-to-frame
peak NCC clipped to [0, 1]. :func:`select_tracker` and :class:`TrackerCheckpoint` let the bundle configs switch
between the two with one knob, ``tracker`` (``"specknet"`` | ``"ncc"``); the NCC tracker needs no checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NCCTracker", "ncc_track_video", "select_tracker", "TrackerCheckpoint", "TRACKERS"]

TRACKERS = ("specknet", "ncc")


def _sample_patches(frame: Tensor, centres: Tensor, radius: int) -> Tensor:
    """Bilinear patches ``(N, 2r+1, 2r+1)`` of ``frame`` (H, W) centred at ``centres`` (N, 2) (x, y) px; outside
    the image the border value is repeated (a point near the edge keeps a usable template)."""
    H, W = frame.shape
    off = torch.arange(-radius, radius + 1, device=frame.device, dtype=frame.dtype)
    xs = centres[:, 0, None, None] + off[None, None, :]
    ys = centres[:, 1, None, None] + off[None, :, None]
    # align_corners=True: -1 and +1 are the centres of the first and last pixels, which sit at 0 and W-1
    grid = torch.stack([xs.expand(-1, off.numel(), -1) / max(W - 1, 1) * 2 - 1,
                        ys.expand(-1, -1, off.numel()) / max(H - 1, 1) * 2 - 1], -1)
    out = F.grid_sample(frame[None, None], grid.reshape(1, -1, off.numel(), 2), mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out.reshape(centres.shape[0], off.numel(), off.numel())


def _ncc_map(templates: Tensor, regions: Tensor, radius: int) -> Tensor:
    """NCC ``(N, P, P)`` of templates ``(N, K, K)`` at every offset inside regions ``(N, L, L)``, ``L = P + K - 1``."""
    n, k = templates.shape[0], 2 * radius + 1
    cols = F.unfold(regions[:, None], kernel_size=k)  # (N, K², P²)
    p = int(round((cols.shape[-1]) ** 0.5))
    t = templates.reshape(n, -1, 1)
    t = t - t.mean(1, keepdim=True)
    c = cols - cols.mean(1, keepdim=True)
    num = (t * c).sum(1)
    den = torch.sqrt((t * t).sum(1) * (c * c).sum(1)).clamp_min(1e-8)
    return (num / den).reshape(n, p, p)


def _subpixel_peak(ncc: Tensor) -> tuple[Tensor, Tensor]:
    """Peak offset ``(N, 2)`` (dx, dy) from the window centre with parabolic sub-pixel refinement, and peak value."""
    n, p, _ = ncc.shape
    flat = ncc.reshape(n, -1)
    val, idx = flat.max(1)
    iy, ix = idx // p, idx % p
    rows = torch.arange(n, device=ncc.device)

    def refine(i: Tensor, along_x: bool) -> Tensor:
        inner = (i > 0) & (i < p - 1)
        lo, hi = (i - 1).clamp_min(0), (i + 1).clamp_max(p - 1)
        if along_x:
            a, b, c = ncc[rows, iy, lo], ncc[rows, iy, i], ncc[rows, iy, hi]
        else:
            a, b, c = ncc[rows, lo, ix], ncc[rows, i, ix], ncc[rows, hi, ix]
        den = a - 2 * b + c
        # a peak on the window's border has no neighbour on one side: no refinement there
        delta = torch.where(inner & (den < -1e-8), 0.5 * (a - c) / den.clamp_max(-1e-8), torch.zeros_like(den))
        return i.to(ncc.dtype) + delta.clamp(-0.5, 0.5)

    half = (p - 1) / 2
    return torch.stack([refine(ix, True) - half, refine(iy, False) - half], -1), val


def _match(frame: Tensor, templates: Tensor, centres: Tensor, radius: int, search: int) -> tuple[Tensor, Tensor]:
    regions = _sample_patches(frame, centres, radius + search)
    offset, peak = _subpixel_peak(_ncc_map(templates, regions, radius))
    return centres + offset, peak


def ncc_track_video(video: Tensor, query_points: Tensor, query_frame: int, template_radius: int = 8,
                    search_radius: int = 6, drift_radius: int = 2, drift_min_ncc: float = 0.6) -> tuple[Tensor, Tensor]:
    """Track ``query_points`` (N, 2) (x, y) px of one ``video`` (T, H, W) from ``query_frame`` in both directions.

    Returns ``tracks`` (T, N, 2) and ``confidence`` (T, N) (frame-to-frame peak NCC, 1 at the query frame)."""
    if video.ndim != 3:
        raise ValueError(f"ncc_track_video: video must be (T, H, W), got {tuple(video.shape)}")
    T = int(video.shape[0])
    q = int(query_frame)
    if not 0 <= q < T:
        raise ValueError(f"ncc_track_video: query frame {q} outside 0..{T - 1}")
    video = video.float()
    pts = query_points.to(video)
    tracks = pts.new_zeros(T, pts.shape[0], 2)
    conf = pts.new_zeros(T, pts.shape[0])
    tracks[q], conf[q] = pts, 1.0
    anchor = _sample_patches(video[q], pts, template_radius)
    for step in (1, -1):
        prev = pts
        for t in range(q + step, T if step > 0 else -1, step):
            template = _sample_patches(video[t - step], prev, template_radius)
            cur, peak = _match(video[t], template, prev, template_radius, search_radius)
            if drift_radius > 0:
                fixed, fpeak = _match(video[t], anchor, cur, template_radius, drift_radius)
                cur = torch.where((fpeak >= drift_min_ncc)[:, None], fixed, cur)
            tracks[t], conf[t] = cur, peak.clamp(0.0, 1.0)
            prev = cur
    return tracks, conf


class NCCTracker(nn.Module):
    """NCC block-matching tracker with the SpeckNet bundle calling convention (no parameters, no checkpoint).

    Shapes: ``forward(image (B, C, T, H, W) | (B, T, H, W), query_points (B, N, 2), query_frames (B, N) | (B,) |
    int | None)`` -> ``pred (B, 3, T, N)`` (x, y in input pixels, confidence). Points of one sample that share a
    query frame are tracked together; the channels of a multi-channel image are averaged.

    Args:
        template_radius: half size of the square template (pixels of the network input).
        search_radius: half size of the frame-to-frame search window.
        drift_radius: half size of the window of the drift correction against the query frame (0: off).
        drift_min_ncc: peak NCC the query-frame match needs to replace the frame-to-frame estimate.
        default_grid: points per axis tracked when ``query_points`` is None (as the SpeckNet adapter).
    """

    def __init__(self, template_radius: int = 8, search_radius: int = 6, drift_radius: int = 2,
                 drift_min_ncc: float = 0.6, default_grid: int = 4) -> None:
        super().__init__()
        if int(template_radius) < 1 or int(search_radius) < 1 or int(drift_radius) < 0:
            raise ValueError(f"NCCTracker: radii must be template >= 1, search >= 1, drift >= 0; got "
                             f"{template_radius}, {search_radius}, {drift_radius}")
        self.template_radius, self.search_radius = int(template_radius), int(search_radius)
        self.drift_radius, self.drift_min_ncc = int(drift_radius), float(drift_min_ncc)
        self.default_grid = int(default_grid)

    def encode(self, video: Tensor) -> Tensor:
        """``(B, T, C, H, W)`` or ``(B, T, H, W)`` -> the frames ``(B, T, H, W)`` (NCC works on intensities)."""
        if video.ndim == 5:
            return video.float().mean(2)
        if video.ndim == 4:
            return video.float()
        raise ValueError(f"NCCTracker: video must be (B, T, C, H, W) or (B, T, H, W), got {tuple(video.shape)}")

    def track(self, feats: Tensor, query_points: Tensor, query_frames: Tensor | int | None,
              size: Any = None) -> dict[str, Tensor]:
        """Tracks ``(B, T, N, 2)`` and confidence ``(B, T, N)`` of ``query_points`` (B, N, 2) in frames ``feats``."""
        B, T = int(feats.shape[0]), int(feats.shape[1])
        N = int(query_points.shape[1])
        if query_frames is None:
            qf = torch.zeros(B, N, dtype=torch.long)
        else:
            qf = torch.as_tensor(query_frames).long().cpu()
            qf = qf.reshape(-1, 1).expand(B, N) if qf.ndim <= 1 else qf
        tracks = feats.new_zeros(B, T, N, 2)
        conf = feats.new_zeros(B, T, N)
        for b in range(B):
            for q in torch.unique(qf[b]).tolist():
                sel = (qf[b] == q).nonzero().flatten().to(feats.device)
                tr, c = ncc_track_video(feats[b], query_points[b, sel], int(q), self.template_radius,
                                        self.search_radius, self.drift_radius, self.drift_min_ncc)
                tracks[b][:, sel], conf[b][:, sel] = tr, c
        return {"tracks": tracks, "confidence": conf}

    def forward(self, image: Tensor, query_points: Tensor | None = None,
                query_frames: Tensor | int | None = None) -> Tensor:
        if image.ndim == 5:
            image = image.transpose(1, 2)  # (B, C, T, H, W) -> (B, T, C, H, W)
        frames = self.encode(image)
        if query_points is None:
            from common.networks.specknet import centred_grid

            grid = centred_grid(int(frames.shape[-2]), int(frames.shape[-1]), self.default_grid,
                                device=frames.device, dtype=frames.dtype)
            query_points = grid[None].expand(frames.shape[0], -1, -1)
        with torch.no_grad():
            out = self.track(frames, query_points.float(), query_frames)
        return torch.cat([out["tracks"], out["confidence"][..., None]], -1).permute(0, 3, 1, 2)


def select_tracker(tracker: str, network: nn.Module, device: Any = None, ncc: nn.Module | None = None) -> nn.Module:
    """The network a bundle config runs, on ``device``: ``network`` for ``"specknet"``, ``ncc`` (default
    :class:`NCCTracker`) for ``"ncc"``; any other name raises ``ValueError`` naming it."""
    if tracker == "specknet":
        chosen = network
    elif tracker == "ncc":
        chosen = ncc if ncc is not None else NCCTracker()
    else:
        raise ValueError(f"unknown tracker {tracker!r}; choose one of {TRACKERS}")
    return chosen.to(device) if device is not None else chosen


class TrackerCheckpoint:
    """Evaluation/inference checkpoint handling by tracker: for ``"specknet"`` attaches
    :class:`common.engines.handlers.CheckpointRequired` (clear message when ``path`` is missing) and MONAI's
    ``CheckpointLoader`` (``load_dict = {"model": network}``); for ``"ncc"`` nothing (it has no weights)."""

    def __init__(self, tracker: str, path: str, network: nn.Module, map_location: Any = None) -> None:
        if tracker not in TRACKERS:
            raise ValueError(f"unknown tracker {tracker!r}; choose one of {TRACKERS}")
        self.tracker, self.path, self.network, self.map_location = tracker, path, network, map_location

    def attach(self, engine: Any) -> None:
        if self.tracker == "ncc":
            return
        from monai.handlers import CheckpointLoader

        from common.engines.handlers import CheckpointRequired

        CheckpointRequired(self.path).attach(engine)
        CheckpointLoader(load_path=self.path, load_dict={"model": self.network},
                         map_location=self.map_location).attach(engine)
