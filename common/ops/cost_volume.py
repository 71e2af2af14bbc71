"""Multi-scale cosine cost volumes with a windowed soft-argmax: SpeckNet's tracking head (METHODS.md §4).

For every query point and every frame, each scale ``s`` gives a cosine similarity map between the (L2-normalised)
query feature and the (L2-normalised) feature map of the frame. The maps are turned into non-negative matching
weights, upsampled to the finest grid, multiplied over scales, and the tracked position is the soft-argmax of the
combined weights in a disc of ``radius`` grid cells around their hard argmax (TAP-Net's
``soft_argmax_heatmap_batched`` convention).

Conventions, shared by every function of this module:

* Points are ``(x, y)`` in input pixels of an image of size ``image_size = (H, W)``. Pixel ``i`` covers
  ``[i, i + 1)``, so its centre is at ``i + 0.5``. A feature grid of size ``(H_s, W_s)`` tiles the same image:
  grid cell ``j`` covers pixels ``[j * W / W_s, (j + 1) * W / W_s)`` and its centre is ``(j + 0.5) * W / W_s``
  (TAP-Net: cell centres at ``+0.5``). This is ``grid_sample``/``interpolate`` with ``align_corners=False``.
* Cost forms (per scale, ``c`` the cosine similarity in ``[-1, 1]``):

  - ``"paper"`` (SpeckNet paper, Sec. 4.2): ``w_s = ((c + 1) / 2) ** gamma``, combined ``w = prod_s up(w_s)``.
  - ``"authors"`` (the authors' later code): ``w_s = c ** 4``, combined ``w = (prod_s up(w_s)) ** 2``.

  ``up`` is bilinear upsampling of the per-scale weights to the finest grid with ``align_corners=False``
  (``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``: half-pixel centres, consistent
  with the convention above; border cells replicate). Scales with the finest grid's size are used as they are.
* Before the power each per-scale map is divided by its maximum over the grid (per frame and query), so the largest
  weight of every scale is 1 (up to rounding): weak similarities (an untrained network, the authors' ``c ** 8``) no
  longer underflow float32; only scales whose peaks disagree completely can still drive the product below it. That
  multiplies the combined map of a (frame, query) by a positive constant, which changes neither the hard argmax, nor
  the normalised soft-argmax, nor the confidence below; the normalisers are treated as constants for autograd (their
  exact gradient is zero for that reason).
* Hard argmax over the flattened finest grid (row-major, ``y * W_0 + x``); ties go to the first index, as
  ``torch.argmax``.
* Soft-argmax: the weights of the cells whose centre lies at a distance ``< radius`` (strict, in finest-grid cells)
  from the argmax cell centre, clipped at the grid border, give the position
  ``sum_k w_k * centre_k / sum_k w_k`` in grid cells, then scaled to input pixels by ``(W / W_0, H / H_0)``.
  If every weight of the window is zero the argmax cell centre is returned.
* Confidence: the fraction of the combined weight that lies inside that window, ``sum_window w / sum_grid w``, in
  ``[0, 1]`` (0 when the whole map is zero, 1 on query frames).

Search modes (``search``): where the hard argmax may fall. ``"global"`` (the paper, the default) searches the whole
grid as above. The two windowed modes restrict everything to a square *search window* of finest-grid cells,
``|dy|, |dx| <= search_radius`` around a centre cell (clipped at the grid border; a locality prior: nothing lets a
point jump to a distant look-alike):

* ``"chained"`` (needs ``query_points`` and ``query_frames``): per point, frames are processed outward from its
  query frame in both directions; frame ``q + k`` (``q - k``) is searched around the cell containing the point's
  estimate at ``q + k - 1`` (``q - k + 1``), the query point itself for ``k = 1``. Points with different query
  frames run in one batch; each step handles every point and both directions at once (at most ``T - 1`` steps).
* ``"coarse_to_fine"``: per frame, the coarsest scale's full weight map (cheap) gives its argmax; the window is
  centred on the finest cell that contains the centre of that coarse cell (the lower/right one when the centre lies
  on a cell boundary). No chaining.

Inside the window: the combined weights are computed only at the window's cells (a coarser scale only at the
coarse cells its bilinear ``align_corners=False`` upsampling to those cells reads, with ``interpolate``'s border
clamping), every scale is max-normalised over the window's cells instead of the grid (the same cancelling
constant), the hard argmax is restricted to in-grid window cells (first index on ties), the soft-argmax disc uses
only window cells, and the confidence is ``sum_disc w / sum_window w``. Window centres are integers (no gradient);
gradients flow through the soft-argmax weights as in ``"global"``. Compute and memory are ``O(T N S^2 D)`` with
``S = 2 * floor(search_radius) + 1`` instead of ``O(T N H_0 W_0 D)``: no full-grid map of a fine scale is built.

Memory: the PyTorch path processes ``chunk_frames`` frames x ``chunk_points`` points at a time, so at most one
chunk's full-resolution volumes exist at once; when gradients are needed every chunk is checkpointed (recomputed in
the backward pass), so no volume is kept for backward either. The Triton path (CUDA tensors, or forced with
``backend="triton"`` under ``TRITON_INTERPRET=1``) never writes a ``T x N x H x W`` volume: one kernel computes the
per-scale maxima, one fused kernel per (frame, query block) streams the finest grid keeping a running argmax and the
weight total, then evaluates the soft-argmax window. Its backward pass recomputes the PyTorch path (chunked and
checkpointed) at the argmax the kernel found, so gradients are those of the PyTorch path. The windowed modes have
their own kernel (one program per (point, frame) of a step, a block over the window's cells, loops over scales and
D); their backward pass likewise recomputes the PyTorch window at the kernel's centres and argmax.

Layout: this module holds the conventions, the global search and the entry point; the windowed search is
:mod:`common.ops._cost_volume_window`, the Triton kernels :mod:`common.ops._cost_volume_triton`, and the naive
references the tests and the benchmark compare with :mod:`common.ops._cost_volume_reference`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "TrackEstimate",
    "sample_query_features",
    "sample_query_features_multiframe",
    "cost_volume_track",
]

_FORMS = ("paper", "authors")
_BACKENDS = ("auto", "torch", "triton")
_SEARCHES = ("global", "chained", "coarse_to_fine")
# Same epsilon as torch.nn.functional.normalize: zero feature vectors stay zero instead of becoming NaN.
_NORM_EPS = 1e-12
# evaluate(pb, pt, pn, centre[, argmax]) -> cells (P, 2), confidence (P,), window-local argmax (P,); the PyTorch
# evaluator also takes a given argmax (the Triton backward pass), the Triton one never needs it


@dataclass
class TrackEstimate:
    """Output of :func:`cost_volume_track`.

    Attributes:
        positions: (B, T, N, 2) tracked ``(x, y)`` in input pixels (pixel centres at ``+0.5``).
        confidence: (B, T, N) fraction of the combined matching weight inside the soft-argmax window, in ``[0, 1]``.
    """

    positions: Tensor
    confidence: Tensor


# ----------------------------------------------------------------------------------------------------------------
# validation helpers


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {tuple(image_size)}")
    h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0 or h != image_size[0] or w != image_size[1]:
        raise ValueError(f"image_size must be two positive integers (H, W), got {tuple(image_size)}")
    return h, w


def _check_points(points: Tensor, name: str, batch: int | None = None) -> None:
    if not isinstance(points, Tensor) or points.ndim != 3 or points.shape[-1] != 2:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"{name} must have shape (B, N, 2) holding (x, y), got {shape}")
    if not points.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {points.dtype}")
    if batch is not None and points.shape[0] != batch:
        raise ValueError(f"{name} has batch size {points.shape[0]}, expected {batch}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half precision cannot represent ((c+1)/2)**15 contrasts or pixel positions to 1e-4; compute in float32
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# query sampling


def _pixels_to_grid(points: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(…, 2) pixel (x, y) -> normalised grid_sample coordinates for align_corners=False (grid-size independent)."""
    h, w = image_size
    scale = points.new_tensor([2.0 / w, 2.0 / h])
    return points * scale - 1.0


def sample_query_features(feature_map: Tensor, points: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Bilinearly sample one feature map at query points.

    Args:
        feature_map: (B, D, H_s, W_s) features of the query frame.
        points: (B, N, 2) query ``(x, y)`` in input pixels of an ``image_size`` image; pixel ``i`` has its centre at
            ``i + 0.5``, feature cell ``j`` at ``(j + 0.5) * W / W_s`` (``align_corners=False``). Points outside the
            image take the border value (``padding_mode="border"``, as TAP-Net).
        image_size: (H, W) of the input image the points refer to.

    Returns:
        (B, N, D) sampled features (differentiable w.r.t. ``feature_map`` and ``points``).
    """
    size = _check_image_size(image_size)
    if not isinstance(feature_map, Tensor) or feature_map.ndim != 4:
        raise ValueError(f"feature_map must have shape (B, D, H_s, W_s), got {getattr(feature_map, 'shape', None)}")
    _check_points(points, "points", feature_map.shape[0])
    grid = _pixels_to_grid(points.to(feature_map.dtype), size)[:, :, None, :]  # (B, N, 1, 2)
    out = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)  # (B, D, N, 1) -> (B, N, D)


def sample_query_features_multiframe(
    feature_maps: Tensor, points: Tensor, query_frames: Tensor, image_size: tuple[int, int]
) -> Tensor:
    """Bilinearly sample each query point on its own query frame.

    Same sampling convention as :func:`sample_query_features` (``align_corners=False``, border padding), but every
    point ``n`` is read from frame ``query_frames[b, n]``. Only the four neighbouring feature vectors of each point
    are gathered, so the cost is O(B * N * D) whatever T is.

    Args:
        feature_maps: (B, T, D, H_s, W_s) features of every frame.
        points: (B, N, 2) query ``(x, y)`` in input pixels of an ``image_size`` image.
        query_frames: (B, N) integer frame index of each point, in ``[0, T)``.
        image_size: (H, W) of the input image.

    Returns:
        (B, N, D) sampled features.
    """
    h, w = _check_image_size(image_size)
    if not isinstance(feature_maps, Tensor) or feature_maps.ndim != 5:
        raise ValueError(
            f"feature_maps must have shape (B, T, D, H_s, W_s), got {getattr(feature_maps, 'shape', None)}"
        )
    bsz, t, _, hs, ws = feature_maps.shape
    _check_points(points, "points", bsz)
    n = points.shape[1]
    if not isinstance(query_frames, Tensor) or query_frames.shape != (bsz, n) or query_frames.is_floating_point():
        raise ValueError(f"query_frames must be an integer tensor of shape {(bsz, n)}, got {query_frames!r}")
    if n and (int(query_frames.min()) < 0 or int(query_frames.max()) >= t):
        raise ValueError(f"query_frames must lie in [0, {t}), got range [{int(query_frames.min())}, "
                         f"{int(query_frames.max())}]")
    pts = points.to(feature_maps.dtype)
    # grid_sample(align_corners=False, padding="border") source index: pixel -> cell units minus the half-cell
    # offset, clipped to the valid range before the bilinear split
    sx = (pts[..., 0] * (ws / w) - 0.5).clamp(0, ws - 1)
    sy = (pts[..., 1] * (hs / h) - 0.5).clamp(0, hs - 1)
    x0 = sx.detach().floor().long().clamp(max=ws - 1)
    y0 = sy.detach().floor().long().clamp(max=hs - 1)
    x1 = (x0 + 1).clamp(max=ws - 1)
    y1 = (y0 + 1).clamp(max=hs - 1)
    lx = (sx - x0.to(sx.dtype))[..., None]
    ly = (sy - y0.to(sy.dtype))[..., None]
    bi = torch.arange(bsz, device=feature_maps.device)[:, None].expand(bsz, n)
    fi = query_frames.to(feature_maps.device).long()

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        # advanced indices around the sliced channel dim -> (B, N, D)
        return feature_maps[bi, fi, :, yy, xx]

    top = at(y0, x0) * (1 - lx) + at(y0, x1) * lx
    bottom = at(y1, x0) * (1 - lx) + at(y1, x1) * lx
    return top * (1 - ly) + bottom * ly


# ----------------------------------------------------------------------------------------------------------------
# PyTorch path


def _window_offsets(radius: float, device: torch.device | None = None) -> Tensor:
    """(K, 2) integer ``(dy, dx)`` with ``dy**2 + dx**2 < radius**2`` (strict, TAP-Net), row-major order."""
    half = int(math.ceil(radius))
    r = torch.arange(-half, half + 1)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    keep = (dy * dy + dx * dx).double() < radius * radius
    return torch.stack([dy[keep], dx[keep]], dim=-1).to(device)


def _scale_weights(c: Tensor, form: str, gamma: float, inplace: bool, dim: int = -2) -> Tensor:
    """Per-scale matching weights from cosines ``c``, max-normalised over the grid axis ``dim`` before the power.

    The in-place variant (no autograd; overwrites ``c``) works in the log domain, which takes about half the passes
    over the volume of normalise-then-power (the op is memory-bound on CPU). The autograd variant uses the direct
    formula, whose derivative stays finite (zero) at ``c = -1``. Both give the same weights up to rounding.
    """
    tiny = torch.finfo(c.dtype).tiny
    if form == "paper":
        if inplace:
            # exp(gamma * (log(c + 1) - log(max c + 1))): the 1/2 of (c + 1) / 2 cancels in the normalisation; the
            # clamp removes cosines a few ulps below -1. (log_ is vectorised on CPU, log1p_ is not.)
            lg = c.add_(1.0).clamp_min_(0.0).log_()
            top = lg.amax(dim, keepdim=True).nan_to_num_(neginf=0.0)  # all c = -1: every weight 0 rather than NaN
            return torch.add(top.mul_(-gamma), lg, alpha=gamma, out=lg).exp_()
        denom = (c.detach().amax(dim, keepdim=True) + 1).clamp_min(tiny)
        # clamp: rounding can push c a few ulps below -1, and a negative base breaks non-integer powers
        return ((c + 1).clamp_min(0) / denom).pow(gamma)
    if inplace:
        sq = c.square_()  # (c / max|c|) ** 4 = (c**2 / max c**2) ** 2
        sq.div_(sq.amax(dim, keepdim=True).clamp_min_(tiny))
        return sq.square_()
    a = c.abs()
    return (a / a.detach().amax(dim, keepdim=True).clamp_min(tiny)).pow(4)


def _normalise_maps(f: Tensor) -> Tensor:
    """(B, t, D, H, W) -> (B, t, D, H*W) unit vectors over D, as ``F.normalize(f, dim=2)`` (eps 1e-12)."""
    f = f.flatten(3)
    # the sum of squares over the strided D axis vectorises along the contiguous grid axis; F.normalize's
    # linalg.vector_norm over a strided dim is several times slower on CPU and dominated the whole op (and f * f
    # beats f.square(), which goes through pow)
    inv = 1.0 / (f * f).sum(2, keepdim=True).sqrt().clamp_min(_NORM_EPS)
    return f * inv


def _window_tables(offsets: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """For every finest-grid cell, its window's flat cell indices (clamped) and in-grid mask: (P0, K) each."""
    h0, w0 = grid
    cell = torch.arange(h0 * w0, device=offsets.device)
    yy = torch.div(cell, w0, rounding_mode="floor")[:, None] + offsets[:, 0]
    xx = (cell % w0)[:, None] + offsets[:, 1]
    valid = (yy >= 0) & (yy < h0) & (xx >= 0) & (xx < w0)
    return yy.clamp(0, h0 - 1) * w0 + xx.clamp(0, w0 - 1), valid


def _track_chunk(
    qs: list[Tensor],
    fs: list[Tensor],
    grids: list[tuple[int, int]],
    form: str,
    gamma: float,
    win_idx: Tensor,
    win_valid: Tensor,
    argmax: Tensor | None,
    normalised: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Combined weights of one chunk, reduced to what the soft-argmax needs.

    Volumes are laid out (B, t, P, n), grid before points: the (P, n) block of a frame is then a channels-last
    (n, H, W) image, the layout ``interpolate``'s CPU kernel works in (a channels-first call spends ~15x longer
    transposing than interpolating), and reductions over P vectorise along n.

    Args:
        qs: per scale (B, n, D_s) unit query features.
        fs: per scale (B, t, D_s, H_s * W_s) unit features if ``normalised`` else raw (B, t, D_s, H_s, W_s).
        grids: per scale (H_s, W_s); ``grids[0]`` is the finest grid.
        win_idx, win_valid: (P0, K) window tables from :func:`_window_tables`.
        argmax: optional (B, t, n) flat argmax to use instead of computing it (Triton backward).

    Returns:
        window weights (B, t, n, K) (0 outside the grid), peak weight (B, t, n) (detached), total weight (B, t, n),
        argmax (B, t, n).
    """
    bsz, t = fs[0].shape[:2]
    n = qs[0].shape[1]
    h0, w0 = grids[0]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*qs, *fs))
    inplace = not grad
    prod: Tensor | None = None
    for q, f, (hs, ws) in zip(qs, fs, grids):
        fn = f if normalised else _normalise_maps(f)
        c = torch.matmul(fn.transpose(-1, -2), q.transpose(-1, -2)[:, None])  # (B, t, P, n)
        w = _scale_weights(c, form, gamma, inplace, dim=-2)
        if (hs, ws) != (h0, w0):
            img = w.view(bsz * t, hs, ws, n).permute(0, 3, 1, 2)  # channels-last (B*t, n, H_s, W_s), no copy
            up = F.interpolate(img, size=(h0, w0), mode="bilinear", align_corners=False)
            w = up.permute(0, 2, 3, 1).reshape(bsz, t, h0 * w0, n)  # a view: the output is channels-last too
        if prod is None:
            prod = w
        else:
            prod = prod.mul_(w) if inplace else prod * w
    assert prod is not None
    if form == "authors":
        prod = prod.square_() if inplace else prod.square()
    if argmax is None:
        # max(dim) gives the first index on ties, like argmax, and is several times faster on CPU
        peak, argmax = prod.detach().max(-2)  # (B, t, n)
    else:
        peak = prod.detach().gather(-2, argmax[..., None, :]).squeeze(-2)
    idx = win_idx[argmax]  # (B, t, n, K)
    wv = prod.gather(-2, idx.transpose(-1, -2)).transpose(-1, -2) * win_valid[argmax]
    return wv, peak, prod.sum(-2), argmax


def _soft_argmax(wv: Tensor, peak: Tensor, total: Tensor, argmax: Tensor, offsets: Tensor, w0: int):
    """Window weights (…, K) around the flat ``argmax`` -> cells (…, 2) (x, y) in grid cells, confidence (…)."""
    tiny = torch.finfo(wv.dtype).tiny
    # normalising by the argmax weight (a constant for autograd, see the module docstring) keeps the window sum >= 1
    wn = wv / peak.clamp_min(tiny)[..., None]
    sw = wn.sum(-1, keepdim=True)
    off = torch.matmul(wn[..., None, :], offsets.flip(-1).to(wn.dtype))[..., 0, :] / sw.clamp_min(tiny)  # (dx, dy)
    ay = torch.div(argmax, w0, rounding_mode="floor")
    centre = torch.stack([argmax - ay * w0, ay], dim=-1).to(wn.dtype) + 0.5
    conf = wv.sum(-1) / total.clamp_min(tiny)
    return centre + off, conf


def _torch_track(
    qs: list[Tensor],
    fs: list[Tensor],
    form: str,
    gamma: float,
    offsets: Tensor,
    chunk_frames: int,
    chunk_points: int,
    argmax: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked PyTorch path -> cells (B, T, N, 2), confidence (B, T, N), argmax (B, T, N)."""
    t_total = fs[0].shape[1]
    n_total = qs[0].shape[1]
    grids = [tuple(f.shape[-2:]) for f in fs]
    win_idx, win_valid = _window_tables(offsets, grids[0])
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*qs, *fs))
    qs = [F.normalize(q, dim=-1, eps=_NORM_EPS) for q in qs]  # (B, N, D_s): small, normalised once
    rows: list[list[tuple[Tensor, ...]]] = []
    for t0 in range(0, t_total, chunk_frames):
        f_chunk = [f[:, t0 : t0 + chunk_frames] for f in fs]
        if not grad:
            # normalise a frame chunk once for all its point chunks; with autograd this happens inside the
            # checkpointed function so that no normalised copy of the features is kept for backward
            f_chunk = [_normalise_maps(f) for f in f_chunk]
        row = []
        for n0 in range(0, n_total, chunk_points):
            q_chunk = [q[:, n0 : n0 + chunk_points] for q in qs]
            a_chunk = None if argmax is None else argmax[:, t0 : t0 + chunk_frames, n0 : n0 + chunk_points]
            args = (q_chunk, f_chunk, grids, form, gamma, win_idx, win_valid, a_chunk)
            if grad:
                # recompute the chunk in backward instead of saving its volumes: saved memory stays O(chunk)
                row.append(checkpoint(_track_chunk, *args, False, use_reentrant=False))
            else:
                row.append(_track_chunk(*args, True))
        rows.append(row)
    # the soft-argmax arithmetic runs once on all (B, T, N, K) windows rather than per chunk: fewer small ops
    wv, peak, total, arg = (torch.cat([torch.cat([c[i] for c in row], dim=2) for row in rows], dim=1) for i in range(4))
    cells, conf = _soft_argmax(wv, peak, total, arg, offsets, grids[0][1])
    return cells, conf, arg


# ----------------------------------------------------------------------------------------------------------------
# Triton path


class _TritonTrack(torch.autograd.Function):
    """Triton forward; backward recomputes the chunked PyTorch path at the kernel's argmax (documented fallback)."""

    @staticmethod
    def forward(ctx, form, gamma, offsets, chunk_frames, chunk_points, num_scales, *tensors):  # type: ignore[override]
        from common.ops._cost_volume_triton import triton_track

        qs, fs = list(tensors[:num_scales]), list(tensors[num_scales:])
        cells, conf, argmax = triton_track(qs, fs, form, gamma, offsets)
        ctx.save_for_backward(argmax, offsets, *tensors)
        ctx.config = (form, gamma, chunk_frames, chunk_points, num_scales)
        ctx.mark_non_differentiable(argmax)
        return cells, conf, argmax

    @staticmethod
    def backward(ctx, grad_cells, grad_conf, _grad_argmax):  # type: ignore[override]
        form, gamma, chunk_frames, chunk_points, num_scales = ctx.config
        argmax, offsets, *tensors = ctx.saved_tensors
        inputs = [x.detach().requires_grad_(needs) for x, needs in zip(tensors, ctx.needs_input_grad[6:])]
        with torch.enable_grad():
            cells, conf, _ = _torch_track(
                inputs[:num_scales], inputs[num_scales:], form, gamma, offsets, chunk_frames, chunk_points, argmax
            )
            wanted = [x for x in inputs if x.requires_grad]
            grads = torch.autograd.grad((cells, conf), wanted, (grad_cells, grad_conf), allow_unused=True)
        it = iter(grads)
        out = [next(it) if x.requires_grad else None for x in inputs]
        return (None, None, None, None, None, None, *out)


def _triton_usable(tensors: Sequence[Tensor]) -> bool:
    # the kernels compute in float32; float64 CUDA inputs keep their precision on the PyTorch path
    if not all(x.is_cuda and x.dtype == torch.float32 for x in tensors):
        return False
    from common.ops._cost_volume_triton import triton_available

    return triton_available()


# ----------------------------------------------------------------------------------------------------------------
# public entry point


def _validate(
    query_features: Sequence[Tensor], feature_maps: Sequence[Tensor]
) -> tuple[int, int, int, tuple[int, int]]:
    if isinstance(query_features, Tensor) or isinstance(feature_maps, Tensor):
        raise ValueError("query_features and feature_maps must be sequences with one tensor per scale")
    if len(query_features) == 0 or len(query_features) != len(feature_maps):
        raise ValueError(
            f"need one query tensor per feature map, got {len(query_features)} query tensors and "
            f"{len(feature_maps)} feature maps"
        )
    f0 = feature_maps[0]
    if not isinstance(f0, Tensor) or f0.ndim != 5:
        raise ValueError(f"feature_maps[0] must have shape (B, T, D, H, W), got {getattr(f0, 'shape', None)}")
    bsz, t, _, h0, w0 = f0.shape
    q0 = query_features[0]
    if not isinstance(q0, Tensor) or q0.ndim != 3:
        raise ValueError(f"query_features[0] must have shape (B, N, D), got {getattr(q0, 'shape', None)}")
    n = q0.shape[1]
    for s, (q, f) in enumerate(zip(query_features, feature_maps)):
        if not isinstance(f, Tensor) or f.ndim != 5:
            raise ValueError(f"feature_maps[{s}] must have shape (B, T, D, H, W), got {getattr(f, 'shape', None)}")
        if not isinstance(q, Tensor) or q.ndim != 3:
            raise ValueError(f"query_features[{s}] must have shape (B, N, D), got {getattr(q, 'shape', None)}")
        if f.shape[:2] != (bsz, t):
            raise ValueError(f"feature_maps[{s}] has (B, T) = {tuple(f.shape[:2])}, expected {(bsz, t)}")
        if q.shape[:2] != (bsz, n):
            raise ValueError(f"query_features[{s}] has (B, N) = {tuple(q.shape[:2])}, expected {(bsz, n)}")
        if q.shape[2] != f.shape[2]:
            raise ValueError(
                f"query_features[{s}] has D = {q.shape[2]} but feature_maps[{s}] has D = {f.shape[2]}"
            )
        if f.shape[3] > h0 or f.shape[4] > w0:
            raise ValueError(
                f"scales must be ordered finest first: feature_maps[{s}] grid {tuple(f.shape[3:])} is larger than "
                f"feature_maps[0] grid {(h0, w0)}"
            )
        if min(f.shape[2:]) == 0:
            raise ValueError(f"feature_maps[{s}] has an empty dimension: {tuple(f.shape)}")
        if not (q.is_floating_point() and f.is_floating_point()):
            raise ValueError(f"scale {s}: features must be floating point, got {q.dtype} and {f.dtype}")
        if q.device != f0.device or f.device != f0.device:
            raise ValueError(f"scale {s}: all tensors must be on {f0.device}, got {q.device} and {f.device}")
    return bsz, t, n, (h0, w0)


def cost_volume_track(
    query_features: Sequence[Tensor],
    feature_maps: Sequence[Tensor],
    image_size: tuple[int, int],
    *,
    form: str = "paper",
    gamma: float = 15.0,
    radius: float = 5.0,
    search: str = "global",
    search_radius: float = 4.0,
    query_points: Tensor | None = None,
    query_frames: Tensor | None = None,
    chunk_frames: int = 8,
    chunk_points: int = 64,
    backend: str = "auto",
) -> TrackEstimate:
    """Track query points through all frames with multi-scale cosine cost volumes and a windowed soft-argmax.

    See the module docstring for the exact conventions (pixel centres, ``align_corners=False`` upsampling, cost
    forms, max-normalisation, tie-breaking, window, confidence).

    Args:
        query_features: per scale ``s`` (finest first), (B, N, D_s) query features (need not be normalised).
        feature_maps: per scale ``s``, (B, T, D_s, H_s, W_s) feature maps; ``feature_maps[0]`` is the finest grid
            ``(H_0, W_0)`` and every other scale is at most that size.
        image_size: (H, W) of the input images; positions are returned in these pixels.
        form: ``"paper"`` (``((c+1)/2)**gamma`` per scale, product) or ``"authors"`` (``c**4`` per scale, product
            squared; ``gamma`` unused).
        gamma: exponent of the paper form (> 0).
        radius: soft-argmax window radius in finest-grid cells (strict ``<``, > 0).
        search: where the hard argmax may fall (module docstring, "Search modes"): ``"global"`` (the whole grid,
            the paper), ``"chained"`` (a window around the point's estimate in the neighbouring frame, chained
            outward from its query frame; needs ``query_points`` and ``query_frames``) or ``"coarse_to_fine"``
            (a window around the coarsest scale's argmax).
        search_radius: half-width of the square search window in finest-grid cells (``|dy|, |dx| <=
            search_radius``, >= 1); unused by ``"global"``.
        query_points: optional (B, N, 2) query ``(x, y)`` in input pixels; with ``query_frames`` (B, N) integer,
            frame ``query_frames[b, n]`` returns ``query_points[b, n]`` itself with confidence 1.
        query_frames: see ``query_points``; both or neither must be given.
        chunk_frames: frames per chunk of the PyTorch path (memory knob; results do not depend on it).
        chunk_points: points per chunk of the PyTorch path; the windowed searches evaluate ``chunk_points``
            (point, frame) windows at a time (and pick coarse-to-fine centres ``chunk_frames`` frames at a time).
        backend: ``"auto"`` (Triton for CUDA tensors when triton is installed, PyTorch otherwise), ``"torch"`` or
            ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``).

    Returns:
        :class:`TrackEstimate` with positions (B, T, N, 2) and confidence (B, T, N), in float32 for half-precision
        inputs and in the input dtype otherwise. Gradients flow to the features through the soft-argmax weights
        (and to ``query_points`` on query frames).
    """
    image_hw = _check_image_size(image_size)
    bsz, t, n, (h0, w0) = _validate(query_features, feature_maps)
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite positive number, got {gamma}")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite positive number, got {radius}")
    if int(chunk_frames) < 1 or int(chunk_points) < 1:
        raise ValueError(f"chunk_frames and chunk_points must be >= 1, got {chunk_frames} and {chunk_points}")
    if search not in _SEARCHES:
        raise ValueError(f"search must be one of {_SEARCHES}, got {search!r}")
    if isinstance(search_radius, bool) or not (isinstance(search_radius, numbers.Real) and math.isfinite(search_radius)
                                               and search_radius >= 1):
        raise ValueError(f"search_radius must be a finite number >= 1 (finest-grid cells), got {search_radius!r}")
    if (query_points is None) != (query_frames is None):
        raise ValueError("query_points and query_frames must be given together (or neither)")
    if search == "chained" and query_points is None:
        raise ValueError("search='chained' needs query_points and query_frames: the chain starts at each point's "
                         "query position on its query frame")
    if query_points is not None:
        _check_points(query_points, "query_points", bsz)
        if query_points.shape[1] != n:
            raise ValueError(f"query_points has N = {query_points.shape[1]}, query_features have N = {n}")
        if not isinstance(query_frames, Tensor) or query_frames.shape != (bsz, n) or query_frames.is_floating_point():
            raise ValueError(f"query_frames must be an integer tensor of shape {(bsz, n)}, got "
                             f"{getattr(query_frames, 'shape', type(query_frames).__name__)}")
        if n and (int(query_frames.min()) < 0 or int(query_frames.max()) >= t):
            raise ValueError(f"query_frames must lie in [0, {t}), got range [{int(query_frames.min())}, "
                             f"{int(query_frames.max())}]")

    dtype = _compute_dtype(torch.promote_types(query_features[0].dtype, feature_maps[0].dtype))
    qs = [q.to(dtype) for q in query_features]
    fs = [f.to(dtype) for f in feature_maps]
    device = fs[0].device
    offsets = _window_offsets(radius, device)

    if backend == "auto":
        backend = "triton" if _triton_usable([*qs, *fs]) else "torch"
    if n == 0 or t == 0 or bsz == 0:
        empty = fs[0].new_zeros(bsz, t, n)
        return TrackEstimate(positions=fs[0].new_zeros(bsz, t, n, 2), confidence=empty)
    if search != "global":
        if backend == "triton":
            from common.ops._cost_volume_triton import check_triton_runnable

            check_triton_runnable(device, len(qs))
        from common.ops._cost_volume_window import WindowConfig, windowed_search

        config = WindowConfig(form, float(gamma), float(radius), search, int(math.floor(search_radius)), image_hw,
                               int(chunk_frames), int(chunk_points), backend == "triton")
        qp = None if query_points is None else query_points.to(device=device, dtype=dtype)
        qf = None if query_frames is None else query_frames.to(device).long()
        cells, conf = windowed_search(config, qp, qf, qs, fs)
    elif backend == "triton":
        from common.ops._cost_volume_triton import check_triton_runnable

        check_triton_runnable(device, len(qs))
        cells, conf, _ = _TritonTrack.apply(form, float(gamma), offsets, int(chunk_frames), int(chunk_points),
                                            len(qs), *qs, *fs)
    else:
        cells, conf, _ = _torch_track(qs, fs, form, float(gamma), offsets, int(chunk_frames), int(chunk_points))

    h, w = image_hw
    positions = cells * cells.new_tensor([w / w0, h / h0])
    if query_points is not None:
        frames = torch.arange(t, device=device)
        is_query = frames[None, :, None] == query_frames.to(device)[:, None, :]  # (B, T, N)
        positions = torch.where(is_query[..., None], query_points.to(dtype)[:, None], positions)
        conf = torch.where(is_query, torch.ones_like(conf), conf)
    return TrackEstimate(positions=positions, confidence=conf)
