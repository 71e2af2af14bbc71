"""Naive references of the cost-volume op, written independently of it, for tests and the benchmark.

They materialise every (B, T, N, H_0, W_0) volume at once (memory O(B T N H_0 W_0)) and compute the literal
formulas in the input dtype (pass float64 for a reference): the global search of the paper and the windowed search
as a masked global map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops.cost_volume import _NORM_EPS, TrackEstimate

__all__ = ["reference_cost_volume_track", "reference_windowed_track"]


def _reference_scale_volume(q: Tensor, f: Tensor, form: str, gamma: float) -> Tensor:
    """Literal per-scale weights (B, T, N, H_s, W_s) of one scale, no max-normalisation (reference only)."""
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    fn = f / f.norm(dim=2, keepdim=True).clamp_min(_NORM_EPS)
    c = torch.einsum("bnd,btdyx->btnyx", qn, fn)
    return ((c + 1) / 2) ** gamma if form == "paper" else c**4


def _reference_combined(
    query_features: Sequence[Tensor], feature_maps: Sequence[Tensor], form: str, gamma: float
) -> Tensor:
    """Literal combined weights (B, T, N, H_0, W_0): per-scale weights upsampled with ``F.interpolate``, multiplied
    (and squared for the authors' form). Reference only: materialises every volume."""
    h0, w0 = feature_maps[0].shape[-2:]
    combined = None
    for q, f in zip(query_features, feature_maps):
        vol = _reference_scale_volume(q, f, form, gamma)
        if vol.shape[-2:] != (h0, w0):
            b, t, n = vol.shape[:3]
            vol = F.interpolate(vol.reshape(b * t, n, *vol.shape[-2:]), size=(h0, w0), mode="bilinear",
                                align_corners=False).reshape(b, t, n, h0, w0)
        combined = vol if combined is None else combined * vol
    assert combined is not None
    return combined**2 if form == "authors" else combined


def reference_cost_volume_track(
    query_features: Sequence[Tensor],
    feature_maps: Sequence[Tensor],
    image_size: tuple[int, int],
    *,
    form: str = "paper",
    gamma: float = 15.0,
    radius: float = 5.0,
    query_points: Tensor | None = None,
    query_frames: Tensor | None = None,
) -> TrackEstimate:
    """Naive reference of :func:`cost_volume_track`: materialises every (B, T, N, H_0, W_0) volume at once.

    Written independently of the chunked path: the literal formulas without max-normalisation, a full-grid distance
    mask for the window (TAP-Net style), computed in the input dtype (pass float64 for a reference). Memory is
    O(B * T * N * H_0 * W_0) — for tests and the benchmark only.
    """
    h, w = image_size
    f0 = feature_maps[0]
    h0, w0 = f0.shape[-2:]
    combined = _reference_combined(query_features, feature_maps, form, gamma)
    b, t, n = combined.shape[:3]
    ys, xs = torch.meshgrid(torch.arange(h0, device=f0.device), torch.arange(w0, device=f0.device), indexing="ij")
    coords = torch.stack([xs, ys], dim=-1).to(combined.dtype) + 0.5  # (H0, W0, 2) cell centres
    arg = combined.reshape(b, t, n, -1).argmax(-1)
    peak = coords.reshape(-1, 2)[arg]  # (B, T, N, 2)
    delta = coords - peak[..., None, None, :]  # (B, T, N, H0, W0, 2)
    weights = combined * ((delta**2).sum(-1) < radius**2)
    wsum = weights.sum((-2, -1))
    # sum of w * (centre - peak) rather than of w * centre: the same number, without float32 cancellation on
    # coordinates up to the grid size
    weighted = (weights[..., None] * delta).sum((-3, -2))
    tiny = torch.finfo(combined.dtype).tiny
    cells = peak + weighted / wsum.clamp_min(tiny)[..., None]
    total = combined.sum((-2, -1))
    conf = torch.where(total > 0, wsum / total.clamp_min(tiny), torch.zeros_like(total))
    positions = cells * cells.new_tensor([w / w0, h / h0])
    if query_points is not None:
        is_query = torch.arange(t, device=f0.device)[None, :, None] == query_frames[:, None, :]
        positions = torch.where(is_query[..., None], query_points.to(positions.dtype)[:, None], positions)
        conf = torch.where(is_query, torch.ones_like(conf), conf)
    return TrackEstimate(positions=positions, confidence=conf)


def reference_windowed_track(
    query_features: Sequence[Tensor],
    feature_maps: Sequence[Tensor],
    image_size: tuple[int, int],
    *,
    search: str,
    search_radius: float = 4.0,
    form: str = "paper",
    gamma: float = 15.0,
    radius: float = 5.0,
    query_points: Tensor | None = None,
    query_frames: Tensor | None = None,
) -> TrackEstimate:
    """Naive reference of the windowed searches of :func:`cost_volume_track` (tests only).

    Independent of the windowed code: it builds the full (B, T, N, H_0, W_0) combined map of
    :func:`_reference_combined` (literal formulas, no normalisation: the window's constant cancels), then per point
    and frame, in plain Python loops, masks it to the square window, takes the argmax, the disc and the sums.
    ``"chained"`` walks frame by frame from the query frame (window centred on the cell that contains the previous
    estimate, in pixels); ``"coarse_to_fine"`` centres on the fine cell containing the centre of the coarsest
    scale's argmax cell.
    """
    h, w = image_size
    combined = _reference_combined(query_features, feature_maps, form, gamma)
    bsz, t, n, h0, w0 = combined.shape
    half = int(math.floor(search_radius))
    ys, xs = torch.meshgrid(torch.arange(h0), torch.arange(w0), indexing="ij")
    coords = torch.stack([xs, ys], dim=-1).to(combined.dtype) + 0.5
    positions = combined.new_zeros(bsz, t, n, 2)
    conf = combined.new_zeros(bsz, t, n)

    def solve(b: int, f: int, i: int, cy: int, cx: int) -> None:
        vol = combined[b, f, i]
        window = ((ys - cy).abs() <= half) & ((xs - cx).abs() <= half)
        a = int(torch.where(window, vol, torch.full_like(vol, -1.0)).flatten().argmax())
        ay, ax = divmod(a, w0)
        disc = window & (((ys - ay) ** 2 + (xs - ax) ** 2).double() < radius * radius)
        wts = torch.where(disc, vol, torch.zeros_like(vol))
        peak = coords[ay, ax]
        wsum = wts.sum()
        cell = peak + (wts[..., None] * (coords - peak)).sum((0, 1)) / max(float(wsum), 1e-300)
        positions[b, f, i] = cell * torch.tensor([w / w0, h / h0], dtype=cell.dtype)
        total = torch.where(window, vol, torch.zeros_like(vol)).sum()
        conf[b, f, i] = wsum / total if total > 0 else 0.0

    def cell_of(p: Tensor) -> tuple[int, int]:
        cx = min(max(int(math.floor(float(p[0]) * w0 / w)), 0), w0 - 1)
        cy = min(max(int(math.floor(float(p[1]) * h0 / h)), 0), h0 - 1)
        return cy, cx

    if search == "chained":
        assert query_points is not None and query_frames is not None
        for b in range(bsz):
            for i in range(n):
                q = int(query_frames[b, i])
                for step in (1, -1):
                    prev = query_points[b, i]
                    f = q + step
                    while 0 <= f < t:
                        solve(b, f, i, *cell_of(prev))
                        prev = positions[b, f, i]
                        f += step
    else:
        s = min(range(len(feature_maps)), key=lambda k: (feature_maps[k].shape[-2] * feature_maps[k].shape[-1], -k))
        coarse = _reference_scale_volume(query_features[s], feature_maps[s], form, gamma)
        hs, ws = coarse.shape[-2:]
        for b in range(bsz):
            for f in range(t):
                for i in range(n):
                    ay, ax = divmod(int(coarse[b, f, i].flatten().argmax()), ws)
                    cy = min(int(math.floor((ay + 0.5) * h0 / hs)), h0 - 1)
                    cx = min(int(math.floor((ax + 0.5) * w0 / ws)), w0 - 1)
                    solve(b, f, i, cy, cx)
    if query_points is not None:
        is_query = torch.arange(t)[None, :, None] == query_frames[:, None, :]
        positions = torch.where(is_query[..., None], query_points.to(positions.dtype)[:, None], positions)
        conf = torch.where(is_query, torch.ones_like(conf), conf)
    return TrackEstimate(positions=positions, confidence=conf)
