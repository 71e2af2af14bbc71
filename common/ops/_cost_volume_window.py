"""Windowed search of the cost-volume op: the locality prior (``search="chained"`` and ``"coarse_to_fine"``).

:func:`common.ops.cost_volume.cost_volume_track` dispatches here when ``search`` is not ``"global"``; its module
docstring ("Search modes") fixes the conventions. This module holds the window geometry (which coarse cells the
bilinear upsampling of every scale reads for a window of finest-grid cells), the PyTorch evaluation of a block of
windows, the chaining outward from the query frames (or the coarse-to-fine centres) and the autograd wrapper around
the Triton window kernel (:mod:`common.ops._cost_volume_triton`), whose backward recomputes the PyTorch window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from common.ops.cost_volume import _NORM_EPS, _normalise_maps, _scale_weights

__all__ = ["WindowConfig", "windowed_search"]

# evaluate(pb, pt, pn, centre, argmax=None) -> (cells, confidence, argmax) of a block of windows
_Evaluator = Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass
class _ScaleWindow:
    """Where one scale's weights come from for a window of finest-grid cells.

    ``rows``/``cols`` are the bilinear source tables of ``interpolate(size=(H_0, W_0), align_corners=False)`` for
    every fine row/column: (i0, i1, lambda1); ``span`` is the largest number of coarse rows/columns any window
    touches. Both are ``None`` for scales of the finest size (used as they are).
    """

    size: tuple[int, int]
    rows: tuple[Tensor, Tensor, Tensor] | None = None
    cols: tuple[Tensor, Tensor, Tensor] | None = None
    span: tuple[int, int] = (0, 0)


@dataclass
class _WindowGeometry:
    """Window of ``(2 * half + 1)**2`` finest-grid cells and the per-scale tables to evaluate it."""

    grid: tuple[int, int]
    half: int
    disc_limit: int  # a cell is in the soft-argmax disc when dy**2 + dx**2 < disc_limit (= ceil(radius**2))
    scales: list[_ScaleWindow]

    @property
    def side(self) -> int:
        return 2 * self.half + 1


def _source_table(out_size: int, in_size: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """Bilinear source indices of ``interpolate(..., align_corners=False)`` from ``in_size`` to ``out_size``.

    Same arithmetic as PyTorch's upsampling kernels: scale ``in / out`` in the compute dtype, source coordinate
    ``(dst + 0.5) * scale - 0.5`` clamped at 0, ``i1 = min(i0 + 1, in - 1)`` (the border replicates).
    """
    scale = torch.tensor(in_size / out_size, dtype=dtype, device=device)
    src = ((torch.arange(out_size, dtype=dtype, device=device) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (src - i0.to(dtype)).clamp(0, 1)


def _window_geometry(
    grids: Sequence[tuple[int, int]], half: int, radius: float, dtype: torch.dtype, device: torch.device
) -> _WindowGeometry:
    h0, w0 = grids[0]
    scales = []
    for hs, ws in grids:
        if (hs, ws) == (h0, w0):
            scales.append(_ScaleWindow((hs, ws)))
            continue
        rows = _source_table(h0, hs, dtype, device)
        cols = _source_table(w0, ws, dtype, device)
        spans = []
        for (i0, i1, _), n0 in ((rows, h0), (cols, w0)):
            # windows clipped at the border touch fewer coarse cells, so the largest span is over every centre
            c = torch.arange(n0, device=device)
            lo, hi = (c - half).clamp(0, n0 - 1), (c + half).clamp(0, n0 - 1)
            spans.append(int((i1[hi] - i0[lo]).max()) + 1)
        scales.append(_ScaleWindow((hs, ws), rows, cols, (spans[0], spans[1])))
    return _WindowGeometry((h0, w0), half, math.ceil(radius * radius), scales)


def _cell_major(f: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
    """Frames ``frames`` (U,) (flat ``b * T + t``, sorted, distinct) of (B, T, D, H, W) features -> (U * H * W, D)
    cell-major features, each cell's vector contiguous, and their inverse norms (U * H * W,).

    Gathering windows across the strided D axis of the channel-first layout touches one cache line per element and
    was most of the windowed path's time; a transposed copy of the frames a block of windows reads is cheaper, and
    holding only those frames keeps memory O(block) rather than a copy of the whole input. The inverse norms
    (``F.normalize`` semantics, eps 1e-12) are computed once per cell rather than once per window that reads it.
    """
    d = f.shape[2]
    flat = f.flatten(0, 1)
    first, last = int(frames[0]), int(frames[-1])  # frames are sorted and distinct
    if last - first + 1 == frames.shape[0]:
        slab = flat[first : last + 1]  # a run of frames (coarse-to-fine blocks, one-video steps): a view, no copy
    else:
        # index_select on a 2-D view copies whole frames (the N-D kernel is several times slower)
        slab = flat.reshape(flat.shape[0], -1).index_select(0, frames).view(-1, *f.shape[2:])  # (U, D, H, W)
    # contiguous(): for U = 1 the permuted reshape would otherwise be a strided view, not cell-major
    feats = slab.permute(0, 2, 3, 1).contiguous().view(-1, d)
    # a reduction along the contiguous axis: no (B, T, D, H, W) temporary such as f * f
    return feats, 1.0 / torch.linalg.vector_norm(feats, dim=1).clamp_min(_NORM_EPS)


def _gathered_weights(
    q: Tensor, cells: tuple[Tensor, Tensor], rows: Tensor, form: str, gamma: float, inplace: bool
) -> Tensor:
    """Per-scale weights of (P, K) gathered cells ``rows`` of ``cells`` (:func:`_cell_major`) against unit queries
    q (P, D).

    Only the window's feature vectors are read (never a whole map). The max-normalisation of :func:`_scale_weights`
    runs over the gathered cells, which are all cells the window uses.
    """
    feats, inv = cells
    flat = rows.reshape(-1)
    gathered = feats.index_select(0, flat).view(*rows.shape, feats.shape[1])  # (P, K, D)
    c = torch.matmul(gathered, q[:, :, None])[..., 0] * inv.index_select(0, flat).view(rows.shape)
    return _scale_weights(c, form, gamma, inplace, dim=-1)


def _upsample_window(
    wc: Tensor, y0: Tensor, y1: Tensor, ly: Tensor, x0: Tensor, x1: Tensor, lx: Tensor
) -> Tensor:
    """Bilinear upsampling of coarse weights (P, sy, sx) to the (P, S * S) window cells.

    ``y0, y1, ly`` (P, S): per window row its two source rows (local to ``wc``) and the weight of the second;
    ``x0, x1, lx`` likewise per column (``interpolate``'s ``align_corners=False`` formula, see :func:`_source_table`).
    """
    p, sy, sx = wc.shape
    side = y0.shape[1]
    flat = wc.reshape(p, sy * sx)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat.gather(1, (yy[:, :, None] * sx + xx[:, None, :]).flatten(1)).view(p, side, side)

    ly = ly[:, :, None].to(wc.dtype)
    lx = lx[:, None, :].to(wc.dtype)
    top = (1 - lx) * at(y0, x0) + lx * at(y0, x1)
    bottom = (1 - lx) * at(y1, x0) + lx * at(y1, x1)
    return ((1 - ly) * top + ly * bottom).flatten(1)


def _window_eval(
    qs: list[Tensor],
    cells: list[tuple[Tensor, Tensor]],
    slot: Tensor,
    geo: _WindowGeometry,
    form: str,
    gamma: float,
    pb: Tensor,
    pn: Tensor,
    centre: Tensor,
    argmax: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Windowed combined weights and soft-argmax for P (batch, frame, point) triples.

    Args:
        qs: per scale (B, N, D_s) unit query features.
        cells: per scale the cell-major features and inverse norms of :func:`_cell_major` of some frames.
        slot: (P,) index of each triple's frame among those frames.
        geo: window geometry.
        pb, pn: (P,) batch and point index of every triple.
        centre: (P, 2) integer ``(cy, cx)`` finest-grid cell the window is centred on (inside the grid).
        argmax: optional (P,) window-local argmax to use instead of computing it (Triton backward).

    Returns:
        cells (P, 2) ``(x, y)`` in finest-grid cells (centres at +0.5), confidence (P,), window-local argmax (P,)
        (row-major index into the ``side x side`` window).
    """
    h0, w0 = geo.grid
    half, side = geo.half, geo.side
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*qs, *(c[0] for c in cells)))
    inplace = not grad
    ar = torch.arange(-half, half + 1, device=centre.device)
    rows, cols = centre[:, :1] + ar, centre[:, 1:] + ar  # (P, S) each, increasing
    valid = (((rows >= 0) & (rows < h0))[:, :, None] & ((cols >= 0) & (cols < w0))[:, None, :]).flatten(1)
    # cells outside the grid read the border cell (which is inside the window); they are masked out below
    rows, cols = rows.clamp(0, h0 - 1), cols.clamp(0, w0 - 1)
    prod: Tensor | None = None
    for q, f, sc in zip(qs, cells, geo.scales):
        qv = q[pb, pn]  # (P, D_s)
        hs, ws = sc.size
        first = (slot * (hs * ws))[:, None]  # row of the frame's cell 0
        if sc.rows is None or sc.cols is None:
            w = _gathered_weights(qv, f, first + (rows[:, :, None] * w0 + cols[:, None, :]).flatten(1), form, gamma,
                                  inplace)
        else:
            (y0t, y1t, lyt), (x0t, x1t, lxt) = sc.rows, sc.cols
            y0, y1, x0, x1 = y0t[rows], y1t[rows], x0t[cols], x1t[cols]  # (P, S)
            sy, sx = sc.span
            # the coarse cells the bilinear upsampling of the window reads: a contiguous block starting at the
            # first row's i0; rows past the last row's i1 repeat it (real, used cells, so the max is unchanged)
            cr = torch.minimum(y0[:, :1] + torch.arange(sy, device=rows.device), y1[:, -1:])
            cc = torch.minimum(x0[:, :1] + torch.arange(sx, device=rows.device), x1[:, -1:])
            wc = _gathered_weights(qv, f, first + (cr[:, :, None] * ws + cc[:, None, :]).flatten(1), form, gamma,
                                   inplace)  # (P, sy * sx)
            w = _upsample_window(wc.view(-1, sy, sx), y0 - cr[:, :1], y1 - cr[:, :1], lyt[rows], x0 - cc[:, :1],
                                 x1 - cc[:, :1], lxt[cols])
        prod = w if prod is None else prod * w
    assert prod is not None
    if form == "authors":
        prod = prod.square()
    prod = prod.masked_fill(~valid, 0.0)
    det = prod.detach()
    if argmax is None:
        # -1 outside the grid: an all-zero window still picks an in-grid cell (first index on ties, as max(dim))
        peak, argmax = det.masked_fill(~valid, -1.0).max(-1)
    else:
        peak = det.gather(1, argmax[:, None])[:, 0]
    ai = torch.div(argmax, side, rounding_mode="floor")
    aj = argmax - ai * side
    ii = torch.arange(side, device=centre.device)
    dy = (ii[None, :, None] - ai[:, None, None]).expand(-1, side, side).flatten(1)
    dx = (ii[None, None, :] - aj[:, None, None]).expand(-1, side, side).flatten(1)
    disc = valid & (dy * dy + dx * dx < geo.disc_limit)
    wv = prod * disc
    tiny = torch.finfo(prod.dtype).tiny
    wn = wv / peak.clamp_min(tiny)[:, None]  # the argmax weight is a constant for autograd (module docstring)
    sw = wn.sum(-1).clamp_min(tiny)
    off = torch.stack([(wn * dx).sum(-1), (wn * dy).sum(-1)], dim=-1) / sw[:, None]
    base = torch.stack([centre[:, 1] - half + aj, centre[:, 0] - half + ai], dim=-1).to(prod.dtype) + 0.5
    conf = wv.sum(-1) / prod.sum(-1).clamp_min(tiny)
    return base + off, conf, argmax


def _window_block(
    qs: list[Tensor],
    fs: list[Tensor],
    frames: Tensor,
    slot: Tensor,
    geo: _WindowGeometry,
    form: str,
    gamma: float,
    pb: Tensor,
    pn: Tensor,
    centre: Tensor,
    argmax: Tensor | None,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triples whose frames are all in ``frames`` (flat ``b * T + t``): convert those frames once, then evaluate
    the windows ``chunk`` triples at a time (``slot`` indexes ``frames``)."""
    cells = [_cell_major(f, frames) for f in fs]
    parts = []
    for p0 in range(0, pb.shape[0], chunk):
        sl = slice(p0, p0 + chunk)
        parts.append(_window_eval(qs, cells, slot[sl], geo, form, gamma, pb[sl], pn[sl], centre[sl],
                                  None if argmax is None else argmax[sl]))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _torch_window_evaluator(
    qs: list[Tensor], fs: list[Tensor], geo: _WindowGeometry, form: str, gamma: float, chunk_frames: int,
    chunk_points: int,
) -> _Evaluator:
    """The PyTorch windowed evaluation: triples grouped by frame, ``chunk_frames`` distinct frames converted at a
    time (:func:`_cell_major`) and ``chunk_points`` windows evaluated at a time; each frame block is checkpointed
    when gradients are needed."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*qs, *fs))
    t = int(fs[0].shape[1])

    def evaluate(pb: Tensor, pt: Tensor, pn: Tensor, centre: Tensor, argmax: Tensor | None = None):
        flat = pb * t + pt
        frames, inverse = torch.unique(flat, return_inverse=True)  # sorted distinct frames of this call
        order = torch.argsort(inverse, stable=True)
        bounds = torch.searchsorted(inverse[order], torch.arange(0, frames.shape[0] + chunk_frames, chunk_frames,
                                                                 device=flat.device)).tolist()
        parts = []
        for k, f0 in enumerate(range(0, frames.shape[0], chunk_frames)):
            idx = order[bounds[k] : bounds[k + 1]]
            args = (qs, fs, frames[f0 : f0 + chunk_frames], inverse[idx] - f0, geo, form, gamma, pb[idx], pn[idx],
                    centre[idx], None if argmax is None else argmax[idx], chunk_points)
            # recompute a block in backward instead of keeping its frames and windows: saved memory stays O(block)
            parts.append(checkpoint(_window_block, *args, use_reentrant=False) if grad else _window_block(*args))
        out = [torch.cat([p[i] for p in parts]) for i in range(3)]
        back = torch.empty_like(order)
        back[order] = torch.arange(order.shape[0], device=order.device)
        return tuple(o[back] for o in out)

    return evaluate


def _coarse_to_fine_centres(
    qs: list[Tensor], fs: list[Tensor], form: str, gamma: float, chunk_frames: int
) -> Tensor:
    """(B, T, N, 2) ``(cy, cx)``: the finest-grid cell containing the centre of the coarsest scale's argmax cell."""
    s = min(range(len(fs)), key=lambda i: (fs[i].shape[-2] * fs[i].shape[-1], -i))  # coarsest; last on ties
    h0, w0 = fs[0].shape[-2:]
    hs, ws = fs[s].shape[-2:]
    q = qs[s].detach()
    args = []
    with torch.no_grad():
        for t0 in range(0, fs[s].shape[1], chunk_frames):
            fn = _normalise_maps(fs[s][:, t0 : t0 + chunk_frames].detach())
            c = torch.matmul(fn.transpose(-1, -2), q.transpose(-1, -2)[:, None])  # (B, t, P_s, N)
            args.append(_scale_weights(c, form, gamma, inplace=True, dim=-2).max(-2)[1])
    am = torch.cat(args, dim=1)
    ay = torch.div(am, ws, rounding_mode="floor")
    ax = am - ay * ws
    # centre (a + 0.5) * H_0 / H_s in fine cells, floored, in exact integer arithmetic
    cy = torch.div((2 * ay + 1) * h0, 2 * hs, rounding_mode="floor").clamp(0, h0 - 1)
    cx = torch.div((2 * ax + 1) * w0, 2 * ws, rounding_mode="floor").clamp(0, w0 - 1)
    return torch.stack([cy, cx], dim=-1)


def _windowed_track(
    evaluate: _Evaluator,
    search: str,
    shape: tuple[int, int, int],
    grid: tuple[int, int],
    query_cells: Tensor | None,
    query_frames: Tensor | None,
    centres: Tensor | None,
) -> tuple[Tensor, ...]:
    """Drive the windowed search; returns the flat triples ``pb, pt, pn, centre, cells, conf, argmax``.

    ``"chained"`` walks outward from every point's query frame, both directions in one batch per step, each window
    centred on the cell holding the previous frame's (detached) estimate; ``"coarse_to_fine"`` evaluates every
    (b, t, n) at the precomputed ``centres`` (B, T, N, 2).
    """
    bsz, t, n = shape
    h0, w0 = grid
    if search == "coarse_to_fine":
        assert centres is not None
        device = centres.device
        pb, pt, pn = (ix.reshape(-1) for ix in torch.meshgrid(
            torch.arange(bsz, device=device), torch.arange(t, device=device), torch.arange(n, device=device),
            indexing="ij"))
        centre = centres.reshape(-1, 2)
        return (pb, pt, pn, centre, *evaluate(pb, pt, pn, centre))

    assert query_cells is not None and query_frames is not None
    qf = query_frames
    start = query_cells.detach().floor().long()  # (B, N, 2) (x, y) cell holding the query point
    state = [torch.stack([start[..., 1].clamp(0, h0 - 1), start[..., 0].clamp(0, w0 - 1)], dim=-1)] * 2
    records: list[tuple[Tensor, ...]] = []
    for k in range(1, t):
        frames = (qf + k, qf - k)
        active = (frames[0] < t, frames[1] >= 0)
        idx = [a.nonzero(as_tuple=True) for a in active]
        sizes = [int(i[0].shape[0]) for i in idx]
        if sum(sizes) == 0:
            break
        pb = torch.cat([i[0] for i in idx])
        pn = torch.cat([i[1] for i in idx])
        pt = torch.cat([fr[i] for fr, i in zip(frames, idx)])
        centre = torch.cat([st[i] for st, i in zip(state, idx)])
        cells, conf, am = evaluate(pb, pt, pn, centre)
        nxt = cells.detach().floor().long()
        nxt = torch.stack([nxt[:, 1].clamp(0, h0 - 1), nxt[:, 0].clamp(0, w0 - 1)], dim=-1)
        new_state = []
        for st, i, part in zip(state, idx, nxt.split(sizes)):
            st = st.clone()
            st[i] = part
            new_state.append(st)
        state = new_state
        records.append((pb, pt, pn, centre, cells, conf, am))
    if not records:  # T == 1: only query frames
        empty = torch.zeros(0, dtype=torch.long, device=qf.device)
        return (empty, empty, empty, empty.view(0, 2), query_cells.new_zeros(0, 2), query_cells.new_zeros(0), empty)
    return tuple(torch.cat([r[i] for r in records]) for i in range(7))


def _scatter_tracks(pb: Tensor, pt: Tensor, pn: Tensor, cells: Tensor, conf: Tensor, shape: tuple[int, int, int]):
    """Place per-triple results into (B, T, N, 2) / (B, T, N) (zeros where no triple was evaluated)."""
    out_cells = cells.new_zeros(*shape, 2).index_put((pb, pt, pn), cells)
    out_conf = conf.new_zeros(shape).index_put((pb, pt, pn), conf)
    return out_cells, out_conf


@dataclass(frozen=True)
class WindowConfig:
    """Settings of one windowed call (hashable plain values, so an autograd Function can keep them on ``ctx``)."""

    form: str
    gamma: float
    radius: float
    search: str
    half: int
    image_size: tuple[int, int]
    chunk_frames: int
    chunk_points: int
    triton: bool


def windowed_search(
    config: WindowConfig, query_points: Tensor | None, query_frames: Tensor | None, qs: list[Tensor],
    fs: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """Windowed search -> cells (B, T, N, 2) ``(x, y)`` in finest-grid cells and confidence (B, T, N).

    Query frames of ``"chained"`` are not evaluated (zeros; the caller writes the query points there).
    """
    if config.triton:
        return _TritonWindowTrack.apply(config, query_points, query_frames, len(qs), *qs, *fs)
    bsz, t = fs[0].shape[:2]
    n = qs[0].shape[1]
    grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in fs]
    geo = _window_geometry(grids, config.half, config.radius, fs[0].dtype, fs[0].device)
    qn = [F.normalize(q, dim=-1, eps=_NORM_EPS) for q in qs]
    evaluate = _torch_window_evaluator(qn, fs, geo, config.form, config.gamma, config.chunk_frames,
                                       config.chunk_points)
    triples = _run_search(config, evaluate, qn, fs, query_points, query_frames)
    pb, pt, pn, _, cells, conf, _ = triples
    return _scatter_tracks(pb, pt, pn, cells, conf, (bsz, t, n))


def _run_search(
    config: WindowConfig, evaluate: _Evaluator, qn: list[Tensor], fs: list[Tensor], query_points: Tensor | None,
    query_frames: Tensor | None,
) -> tuple[Tensor, ...]:
    """Window centres (coarse-to-fine) or query cells (chained), then :func:`_windowed_track`."""
    bsz, t = fs[0].shape[:2]
    n = qn[0].shape[1]
    h0, w0 = fs[0].shape[-2:]
    h, w = config.image_size
    centres = query_cells = None
    if config.search == "coarse_to_fine":
        centres = _coarse_to_fine_centres(qn, fs, config.form, config.gamma, config.chunk_frames)
    else:
        assert query_points is not None
        query_cells = query_points.detach() * query_points.new_tensor([w0 / w, h0 / h])
    return _windowed_track(evaluate, config.search, (bsz, t, n), (h0, w0), query_cells, query_frames, centres)


class _TritonWindowTrack(torch.autograd.Function):
    """Windowed search with the Triton window kernel; backward recomputes the PyTorch window at the kernel's argmax.

    The window centres are integers (detached by definition) and the argmax is not differentiated, so evaluating
    the PyTorch path at the same centres and argmax gives exactly the gradients of the PyTorch windowed path.
    """

    @staticmethod
    def forward(ctx, config, query_points, query_frames, num_scales, *tensors):  # type: ignore[override]
        from common.ops._cost_volume_triton import triton_window_evaluator

        qs, fs = list(tensors[:num_scales]), list(tensors[num_scales:])
        grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in fs]
        geo = _window_geometry(grids, config.half, config.radius, fs[0].dtype, fs[0].device)
        evaluate = triton_window_evaluator(qs, fs, config.form, config.gamma, config.half, geo.disc_limit)
        qn = [F.normalize(q, dim=-1, eps=_NORM_EPS) for q in qs]
        pb, pt, pn, centre, cells, conf, argmax = _run_search(config, evaluate, qn, fs, query_points, query_frames)
        shape = (fs[0].shape[0], fs[0].shape[1], qs[0].shape[1])
        out_cells, out_conf = _scatter_tracks(pb, pt, pn, cells, conf, shape)
        ctx.save_for_backward(pb, pt, pn, centre, argmax, *tensors)
        ctx.config = (config, num_scales, shape)
        return out_cells, out_conf

    @staticmethod
    def backward(ctx, grad_cells, grad_conf):  # type: ignore[override]
        config, num_scales, shape = ctx.config
        pb, pt, pn, centre, argmax, *tensors = ctx.saved_tensors
        if pb.numel() == 0:  # only query frames (T = 1): no window depends on the features
            return (None, None, None, None,
                    *(torch.zeros_like(x) if needs else None for x, needs in zip(tensors, ctx.needs_input_grad[4:])))
        inputs = [x.detach().requires_grad_(needs) for x, needs in zip(tensors, ctx.needs_input_grad[4:])]
        with torch.enable_grad():
            qs, fs = inputs[:num_scales], inputs[num_scales:]
            grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in fs]
            geo = _window_geometry(grids, config.half, config.radius, fs[0].dtype, fs[0].device)
            qn = [F.normalize(q, dim=-1, eps=_NORM_EPS) for q in qs]
            evaluate = _torch_window_evaluator(qn, fs, geo, config.form, config.gamma, config.chunk_frames,
                                               config.chunk_points)
            cells, conf, _ = evaluate(pb, pt, pn, centre, argmax)
            out_cells, out_conf = _scatter_tracks(pb, pt, pn, cells, conf, shape)
            wanted = [x for x in inputs if x.requires_grad]
            grads = torch.autograd.grad((out_cells, out_conf), wanted, (grad_cells, grad_conf), allow_unused=True)
        it = iter(grads)
        out = [next(it) if x.requires_grad else None for x in inputs]
        return (None, None, None, None, *out)
