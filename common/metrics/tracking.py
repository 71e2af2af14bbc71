"""Point-tracking metrics (TAP-Vid position accuracy, median trajectory error) and global longitudinal strain.

SpeckNet paper, Sec. 5.2; METHODS.md §4. Points are ``(x, y)`` pixels of the input video (any consistent pixel
convention: only differences and lengths enter).

Tracking metrics, per video (TAP-Vid, Doersch et al. 2022; "strided" query mode):

* Evaluated entries: frames ``t != q_n`` where the reference point ``n`` is visible. The query frame is excluded
  because the query point is an input (paper Sec. 4.1); invisible reference points are excluded.
* Coordinates are rescaled to a ``256 x 256`` frame (``x * 256 / W``, ``y * 256 / H``) before any distance.
* ``delta_x`` = 100 * (evaluated entries with ``||pred - ref|| < x``) / (evaluated entries), for
  ``x in (1, 2, 4, 8, 16)``; ``delta_avg`` = mean of the five (in %). The comparison is strict (TAP-Vid).
* ``mte`` = for every trajectory the median L2 error over its evaluated frames (the mean of the two middle values
  for an even count), then the mean over trajectories with at least one evaluated frame (256-scale pixels).
* Over a data set: the mean of the per-video values (TAP-Vid averages videos, not points); ``reduction="mean"``.

Global longitudinal strain (paper Sec. 5.2, METHODS.md §4):

* ``L_t`` = length of the polyline through the tracked myocardial centre-line points of frame ``t`` (in mm with a
  pixel spacing, else pixels), ``strain(t) = 100 * (L_t - L_ED) / L_ED`` (the strain curve, %),
  ``GLS = strain(ES)`` with ED the first frame and ES the frame of minimal length unless given.
* :func:`gls_mad` is the mean absolute deviation between GLS values and a reference (percentage points).
* The polyline length depends on the order of the points, so GLS means something only for ordered centre-line
  points. These functions cannot check that; callers decide (the tracking workflow reads the tracking file's
  ``centreline_ordered`` attribute and reports GLS as not applicable without it).

Choices the paper does not state
--------------------------------
1. Query-frame exclusion uses the TAP-Vid "strided" rule (all frames but the query frame), since SpeckNet queries
   any frame of the cycle; TAP-Vid's "first" rule (only frames after the query) is not offered.
2. A video with no evaluated entry gets NaN for every metric (and NaN propagates into the data-set mean) rather
   than a silent 0 or a dropped video.
3. ES search: the first frame of minimal polyline length over the whole video (``argmin``, first index on ties).
4. Spacing: ``(row, col)`` mm per pixel (or one number), as the synthetic echo simulator; with isotropic spacing GLS
   does not depend on it.
5. All computations in float64 numpy; torch inputs are converted (detached) first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DELTA_THRESHOLDS",
    "TAPVID_SIZE",
    "evaluation_mask",
    "position_accuracy",
    "median_trajectory_error",
    "tracking_metrics",
    "polyline_length",
    "strain_curve",
    "StrainResult",
    "global_longitudinal_strain",
    "gls_mad",
]

DELTA_THRESHOLDS: tuple[int, ...] = (1, 2, 4, 8, 16)
TAPVID_SIZE: int = 256


def _np(x: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _query_frames(query_frames: Any, b: int, n: int, batched: bool) -> np.ndarray:
    """int, (B,) (batched) / (N,) (unbatched), or (B, N) -> (B, N) int64."""
    qf = _np(query_frames)
    if qf.dtype.kind not in "iu":
        raise ValueError(f"query_frames must be integers, got dtype {qf.dtype}")
    qf = qf.astype(np.int64)
    if qf.ndim == 0:
        return np.full((b, n), int(qf))
    if qf.ndim == 1:
        if batched and qf.shape[0] == b:
            return np.repeat(qf[:, None], n, axis=1)
        if not batched and qf.shape[0] == n:
            return qf[None]
    if qf.ndim == 2 and qf.shape == (b, n):
        return qf
    expect = "an int, (B,) or (B, N)" if batched else "an int or (N,)"
    raise ValueError(f"query_frames must be {expect} with B={b}, N={n}, got shape {qf.shape}")


def evaluation_mask(visible: Any, query_frames: Any) -> np.ndarray:
    """Entries that count in the metrics: visible and not on the point's query frame.

    Args:
        visible: (T, N) or (B, T, N) reference visibility (bool or 0/1).
        query_frames: int, (N,) for unbatched; int, (B,) or (B, N) for batched input.

    Returns:
        Bool mask with the shape of ``visible``.
    """
    vis = _np(visible).astype(bool)
    if vis.ndim not in (2, 3):
        raise ValueError(f"visible must have shape (T, N) or (B, T, N), got {vis.shape}")
    batched = vis.ndim == 3
    vb = vis if batched else vis[None]
    b, t, n = vb.shape
    qf = _query_frames(query_frames, b, n, batched)
    if qf.size and (qf.min() < 0 or qf.max() >= t):
        raise ValueError(f"query_frames must lie in [0, {t}), got range [{qf.min()}, {qf.max()}]")
    mask = vb & (np.arange(t)[None, :, None] != qf[:, None, :])
    return mask if batched else mask[0]


def _prepare(pred: Any, target: Any, visible: Any, query_frames: Any, image_size: Sequence[int] | None,
             tapvid_size: int | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """-> per-entry L2 error (B, T, N) in the evaluation scale, evaluation mask (B, T, N), batched flag."""
    p = _np(pred, np.float64)
    g = _np(target, np.float64)
    if p.shape != g.shape or p.ndim not in (3, 4) or p.shape[-1] != 2:
        raise ValueError(f"pred and target must both have shape (T, N, 2) or (B, T, N, 2), got {p.shape} and "
                         f"{g.shape}")
    if _np(visible).shape != p.shape[:-1]:
        raise ValueError(f"visible must have shape {p.shape[:-1]}, got {_np(visible).shape}")
    batched = p.ndim == 4
    mask = evaluation_mask(visible, query_frames)
    if not batched:
        p, g, mask = p[None], g[None], mask[None]
    diff = p - g
    if tapvid_size is not None:
        if image_size is None or len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size (H, W) is needed to rescale to {tapvid_size} x {tapvid_size}, got "
                             f"{image_size!r}")
        h, w = (float(v) for v in image_size)
        diff = diff * np.array([tapvid_size / w, tapvid_size / h])
    return np.sqrt((diff**2).sum(-1)), mask, batched


def _out(values: np.ndarray, batched: bool) -> np.ndarray | float:
    return values if batched else float(values[0])


def position_accuracy(
    pred: Any,
    target: Any,
    visible: Any,
    query_frames: Any,
    image_size: Sequence[int] | None,
    thresholds: Sequence[float] = DELTA_THRESHOLDS,
    tapvid_size: int | None = TAPVID_SIZE,
) -> dict[str, np.ndarray | float]:
    """TAP-Vid position accuracy ``delta_x`` and ``delta_avg`` (in %).

    Args:
        pred: (T, N, 2) or (B, T, N, 2) predicted ``(x, y)`` in pixels of an ``image_size`` video.
        target: reference tracks, same shape.
        visible: (T, N) or (B, T, N) reference visibility.
        query_frames: int, (N,) (unbatched) or int, (B,), (B, N) (batched) query frame of each point.
        image_size: (H, W) of the video the coordinates refer to (None only with ``tapvid_size=None``).
        thresholds: pixel thresholds in the evaluation scale.
        tapvid_size: side of the square evaluation frame (256, TAP-Vid); None evaluates in input pixels.

    Returns:
        ``{"delta_<x>": ..., "delta_avg": ...}``, floats for unbatched input, (B,) arrays for batched input.
    """
    err, mask, batched = _prepare(pred, target, visible, query_frames, image_size, tapvid_size)
    count = mask.sum(axis=(1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        fracs = [100.0 * ((err < thr) & mask).sum(axis=(1, 2)) / count for thr in thresholds]
    out: dict[str, np.ndarray | float] = {}
    for thr, frac in zip(thresholds, fracs):
        out[f"delta_{thr:g}"] = _out(frac, batched)
    out["delta_avg"] = _out(np.mean(np.stack(fracs, 0), axis=0), batched)
    return out


def median_trajectory_error(
    pred: Any,
    target: Any,
    visible: Any,
    query_frames: Any,
    image_size: Sequence[int] | None,
    tapvid_size: int | None = TAPVID_SIZE,
) -> np.ndarray | float:
    """Median trajectory error: per-trajectory median over evaluated frames, mean over trajectories.

    Args: as :func:`position_accuracy`.

    Returns:
        MTE in evaluation-scale pixels: a float for unbatched input, a (B,) array for batched input (NaN for a video
        without evaluated entries).
    """
    err, mask, batched = _prepare(pred, target, visible, query_frames, image_size, tapvid_size)
    b, _, n = err.shape
    values = np.full(b, np.nan)
    for i in range(b):
        medians = [np.median(err[i, mask[i, :, k], k]) for k in range(n) if mask[i, :, k].any()]
        if medians:
            values[i] = float(np.mean(medians))
    return _out(values, batched)


def tracking_metrics(
    pred: Any,
    target: Any,
    visible: Any,
    query_frames: Any,
    image_size: Sequence[int] | None,
    reduction: str = "mean",
    thresholds: Sequence[float] = DELTA_THRESHOLDS,
    tapvid_size: int | None = TAPVID_SIZE,
) -> dict[str, np.ndarray | float]:
    """``delta_<x>``, ``delta_avg`` (%) and ``mte`` (px) of one video or a batch of videos.

    Args:
        pred, target, visible, query_frames, image_size, thresholds, tapvid_size: as :func:`position_accuracy`.
        reduction: ``"mean"`` (mean over the videos of a batch, TAP-Vid aggregation; floats) or ``"none"``
            (per-video (B,) arrays for batched input).

    Returns:
        Dict of metric name -> value.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    out = position_accuracy(pred, target, visible, query_frames, image_size, thresholds, tapvid_size)
    out["mte"] = median_trajectory_error(pred, target, visible, query_frames, image_size, tapvid_size)
    if reduction == "mean":
        out = {k: float(np.mean(v)) for k, v in out.items()}
    return out


# --------------------------------------------------------------------------------------------------------------
# global longitudinal strain


def _spacing(spacing: float | Sequence[float]) -> np.ndarray:
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size == 1:
        sp = np.repeat(sp, 2)
    if sp.size != 2 or not np.all(sp > 0):
        raise ValueError(f"spacing must be one positive number or (row, col) mm per pixel, got {spacing!r}")
    return sp


def polyline_length(points: Any, spacing: float | Sequence[float] = 1.0) -> np.ndarray:
    """Length of the polyline through ``points`` in their order.

    Args:
        points: (..., N, 2) ``(x, y)`` pixels, N >= 2.
        spacing: mm per pixel, one number or ``(row, col)``.

    Returns:
        (...) lengths (mm, or pixels with spacing 1).
    """
    p = _np(points, np.float64)
    if p.ndim < 2 or p.shape[-1] != 2 or p.shape[-2] < 2:
        raise ValueError(f"points must have shape (..., N, 2) with N >= 2, got {p.shape}")
    sp = _spacing(spacing)
    d = np.diff(p, axis=-2) * np.array([sp[1], sp[0]])  # x runs along columns, y along rows
    return np.sqrt((d**2).sum(-1)).sum(-1)


def strain_curve(tracks: Any, ed_frame: int = 0, spacing: float | Sequence[float] = 1.0) -> np.ndarray:
    """Longitudinal strain over time, ``100 * (L_t - L_ED) / L_ED`` (%).

    Args:
        tracks: (T, N, 2) tracked centre-line points ``(x, y)``, ordered along the myocardium.
        ed_frame: end-diastolic reference frame.
        spacing: mm per pixel (one number or ``(row, col)``).

    Returns:
        (T,) strain in %, 0 at ``ed_frame``.
    """
    lengths = _lengths(tracks, spacing)
    ed = _frame_index(ed_frame, lengths.shape[0], "ed_frame")
    if lengths[ed] <= 0:
        raise ValueError(f"the centre line has zero length at the ED frame {ed}")
    return 100.0 * (lengths - lengths[ed]) / lengths[ed]


def _lengths(tracks: Any, spacing: float | Sequence[float]) -> np.ndarray:
    tr = _np(tracks, np.float64)
    if tr.ndim != 3 or tr.shape[-1] != 2 or tr.shape[1] < 2 or tr.shape[0] < 1:
        raise ValueError(f"tracks must have shape (T, N, 2) with T >= 1 and N >= 2, got {tr.shape}")
    return polyline_length(tr, spacing)


def _frame_index(frame: int, t: int, name: str) -> int:
    f = int(frame)
    if not 0 <= f < t:
        raise ValueError(f"{name} = {frame} is outside [0, {t})")
    return f


@dataclass
class StrainResult:
    """Result of :func:`global_longitudinal_strain`.

    Attributes:
        gls: global longitudinal strain (%), ``strain[es_frame]``.
        strain: (T,) strain curve (%), 0 at ED.
        lengths: (T,) centre-line lengths (mm, or pixels with spacing 1).
        ed_frame: reference (end-diastolic) frame.
        es_frame: end-systolic frame (given, or the frame of minimal length).
    """

    gls: float
    strain: np.ndarray
    lengths: np.ndarray
    ed_frame: int
    es_frame: int


def global_longitudinal_strain(
    tracks: Any, ed_frame: int = 0, es_frame: int | None = None, spacing: float | Sequence[float] = 1.0
) -> StrainResult:
    """GLS = ``100 * (L_ES - L_ED) / L_ED`` of the tracked centre line, with its strain curve.

    Args:
        tracks: (T, N, 2) tracked myocardial centre-line points ``(x, y)``, ordered base -> apex -> base.
        ed_frame: end-diastolic frame (default: the first frame).
        es_frame: end-systolic frame; None picks the frame of minimal centre-line length.
        spacing: mm per pixel (one number or ``(row, col)``).

    Returns:
        :class:`StrainResult`.
    """
    lengths = _lengths(tracks, spacing)
    t = lengths.shape[0]
    ed = _frame_index(ed_frame, t, "ed_frame")
    es = int(np.argmin(lengths)) if es_frame is None else _frame_index(es_frame, t, "es_frame")
    curve = strain_curve(tracks, ed, spacing)
    return StrainResult(gls=float(curve[es]), strain=curve, lengths=lengths, ed_frame=ed, es_frame=es)


def gls_mad(gls: Any, reference: Any) -> float:
    """Mean absolute deviation ``mean |GLS - GLS_ref|`` (percentage points) over videos.

    Args:
        gls: (V,) estimated GLS values (%), or one value.
        reference: (V,) reference GLS values (%), same shape.
    """
    a = _np(gls, np.float64).reshape(-1)
    r = _np(reference, np.float64).reshape(-1)
    if a.shape != r.shape or a.size == 0:
        raise ValueError(f"gls and reference must be non-empty and of equal length, got {a.shape} and {r.shape}")
    return float(np.mean(np.abs(a - r)))
