"""Myocardial centre-line query points from a segmentation mask (apical echocardiography views).

SpeckNet's clinical output (GLS, METHODS.md §4) tracks points on the myocardial centre line. When no query points are
given, :func:`centreline_points_from_mask` derives them from a label mask at the query frame (e.g. a ``botm_seg``
prediction): ``N`` points equally spaced by arc length along the mid-wall line of the myocardium, ordered from one
base through the apex to the other base.

Method (scipy only, for the horseshoe-shaped myocardium of apical 2/3/4-chamber views):

1. Myocardium = ``mask == myo_label`` (or the mask itself if boolean), largest 8-connected component.
2. Base ends: a double sweep of geodesic distances inside it (Dijkstra on the 8-neighbour pixel graph, steps 1 and
   sqrt 2): ``A`` is the pixel farthest from an arbitrary pixel, ``B`` the pixel farthest from ``A``.
3. Mid-wall path: the minimal path from ``A`` to ``B`` when a step costs ``length / depth**2``, ``depth`` the
   Euclidean distance to the background. The path follows the ridge of ``depth`` (the medial axis: points
   equidistant from endo- and epicardium) instead of the geodesic's short cut along the inner side of the bend.
4. The branches of the path into the corners ``A`` and ``B`` (where ``depth`` falls below 0.75 of the path's median,
   i.e. the last half wall thickness before the base) are dropped.
5. A moving average over half a wall thickness removes the pixel staircase; each point then moves across the wall
   onto the sub-pixel ridge of ``depth`` (tent fit through three samples along the normal), and ``n_points`` are
   placed equidistantly by arc length.
6. Orientation: the end with the smaller ``x`` comes first (left base -> apex -> right base when the apex is at the
   top, as the synthetic simulator's tracks).

Points are ``(x, y)`` with pixel ``[r, c]`` centred at ``(x=c, y=r)`` (the data pipeline's convention).

Choices the paper does not state
--------------------------------
1. The centre line is the medial axis of the myocardium (equidistant from endo- and epicardium, which is the
   mid-wall), traced as a medialness-weighted minimal path; no LV label is needed.
2. The line stops about half a wall thickness short of the base ends (the medial axis forks into the corners
   there); the synthetic simulator's reference line stops 2 mm short of the mitral plane. GLS is a relative length
   change, so the exact ends matter little.
3. Only the largest myocardial component is used; a closed ring (short-axis view) is not an apical myocardium and
   gives no meaningful base-apex-base order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage, sparse
from scipy.sparse import csgraph

__all__ = ["centreline_points_from_mask"]

_STEPS = ((0, 1, 1.0), (1, 0, 1.0), (1, 1, 2**0.5), (1, -1, 2**0.5))
# path pixels shallower than this fraction of the median half thickness belong to the branches into the corners
_DEPTH_FRACTION = 0.75


def _myocardium(mask: Any, myo_label: int) -> np.ndarray:
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]  # channel-first (1, H, W) masks
    if arr.ndim != 2:
        raise ValueError(f"centreline_points_from_mask: mask must be 2D (H, W), got shape {arr.shape}")
    myo = arr.astype(bool) if arr.dtype == bool else arr == myo_label
    comps, count = ndimage.label(myo, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        raise ValueError(f"centreline_points_from_mask: the mask has no pixel with the myocardium label {myo_label}")
    sizes = np.bincount(comps.ravel())[1:]
    return comps == (int(np.argmax(sizes)) + 1)


def _geodesic_graph(myo: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """8-neighbour graph of the mask pixels -> (graph, rows, cols)."""
    rows, cols = np.nonzero(myo)
    index = np.full(myo.shape, -1, dtype=np.int64)
    index[rows, cols] = np.arange(rows.size)
    h, w = myo.shape
    src, dst, wts = [], [], []
    for dr, dc, wt in _STEPS:
        r2, c2 = rows + dr, cols + dc
        ok = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
        ok[ok] = myo[r2[ok], c2[ok]]
        src.append(index[rows[ok], cols[ok]])
        dst.append(index[r2[ok], c2[ok]])
        wts.append(np.full(int(ok.sum()), wt))
    n = rows.size
    graph = sparse.csr_matrix((np.concatenate(wts), (np.concatenate(src), np.concatenate(dst))), shape=(n, n))
    return graph, rows, cols


def _refine_to_ridge(edt: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each path point across the wall onto the sub-pixel ridge of the distance map.

    Across a wall the distance to the background is a tent ``h - |u - p|`` with its peak ``p`` on the mid-wall; with
    samples ``d_-, d_0, d_+`` at ``u = -1, 0, 1`` along the normal the peak is ``p = (1 + d_+ - d_0) / 2`` when
    ``d_+ >= d_-`` (else mirrored). A pixel path can only sit on a whole pixel, half a pixel off for even wall widths.
    """
    if cx.size < 3:
        return cx, cy
    tx, ty = np.gradient(cx), np.gradient(cy)
    norm = np.hypot(tx, ty)
    norm[norm == 0] = 1.0
    nx, ny = -ty / norm, tx / norm

    def sample(u: float) -> np.ndarray:
        return ndimage.map_coordinates(edt, [cy + u * ny, cx + u * nx], order=1, mode="constant")

    dm, d0, dp = sample(-1.0), sample(0.0), sample(1.0)
    shift = np.where(dp >= dm, (1.0 + dp - d0) / 2.0, -(1.0 + dm - d0) / 2.0)
    shift = np.clip(shift, -1.0, 1.0)
    return cx + shift * nx, cy + shift * ny


def centreline_points_from_mask(mask: Any, n_points: int, myo_label: int = 2) -> np.ndarray:
    """``n_points`` equidistant points on the myocardial centre line, base -> apex -> base.

    Args:
        mask: (H, W) label map (numpy or torch; a leading singleton channel is dropped) or a boolean myocardium mask.
        n_points: number of points (>= 2).
        myo_label: label value of the myocardium (2 in the CAMUS-style layout 0 bg, 1 LV, 2 Myo, 3 LA).

    Returns:
        (n_points, 2) float32 ``(x, y)`` pixel coordinates, equally spaced by arc length along the centre line, the
        end with the smaller ``x`` first.
    """
    if int(n_points) < 2:
        raise ValueError(f"centreline_points_from_mask: n_points must be >= 2, got {n_points}")
    myo = _myocardium(mask, myo_label)
    graph, rows, cols = _geodesic_graph(myo)
    if rows.size < 3:
        raise ValueError(f"centreline_points_from_mask: the myocardium has only {rows.size} pixels")

    # the two base ends: double sweep of plain geodesic distances (A farthest from anywhere, B farthest from A)
    d0 = csgraph.dijkstra(graph, directed=False, indices=0)
    a = int(np.argmax(d0))
    b = int(np.argmax(csgraph.dijkstra(graph, directed=False, indices=a)))

    # minimal path from A to B under a medialness cost: steps cost 1 / depth**2, so the path keeps to the ridge of
    # the distance-to-background map (the mid-wall) instead of cutting the inner side of the apical bend
    # zero border: a wall cut by the image edge (e.g. the sector) ends there rather than looking deeper
    edt = ndimage.distance_transform_edt(np.pad(myo, 1))[1:-1, 1:-1]
    depth = edt[rows, cols]
    cost = 1.0 / depth**2
    coo = graph.tocoo()
    medial = sparse.csr_matrix((coo.data * 0.5 * (cost[coo.row] + cost[coo.col]), (coo.row, coo.col)),
                               shape=graph.shape)
    _, pred = csgraph.dijkstra(medial, directed=False, indices=a, return_predecessors=True)
    path = [b]
    while path[-1] != a:
        path.append(int(pred[path[-1]]))
    path = np.array(path[::-1])

    # drop the branches into the corners A and B: there the depth falls from the half thickness to 0
    d = depth[path]
    half = float(np.median(d))
    deep = np.nonzero(d >= _DEPTH_FRACTION * half)[0]
    if deep.size >= 2:
        path = path[deep[0] : deep[-1] + 1]
    cx, cy = cols[path].astype(np.float64), rows[path].astype(np.float64)
    if cx.size < 2:
        raise ValueError("centreline_points_from_mask: the myocardium is too small to define a centre line")

    # moving average over half a wall thickness: removes the 8-neighbour staircase of the pixel path
    win = max(int(round(half)), 1)
    if win > 1 and cx.size > win:
        cx = ndimage.uniform_filter1d(cx, win, mode="nearest")
        cy = ndimage.uniform_filter1d(cy, win, mode="nearest")
    cx, cy = _refine_to_ridge(edt, cx, cy)

    seg = np.hypot(np.diff(cx), np.diff(cy))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    target = np.linspace(0.0, arc[-1], int(n_points))
    pts = np.stack([np.interp(target, arc, cx), np.interp(target, arc, cy)], axis=-1)
    if pts[0, 0] > pts[-1, 0]:
        pts = pts[::-1]
    return np.ascontiguousarray(pts, dtype=np.float32)
