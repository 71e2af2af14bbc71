"""Triton kernels of :mod:`common.ops.cost_volume` (forward only; the backward pass recomputes the PyTorch path).

``triton`` is imported in a guarded way so :mod:`common.ops` works without it; :func:`triton_available` tells.
Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.

Two launches per call, nothing of size ``T x N x H x W`` written to memory:

1. ``_scale_stat_kernel``, grid (B*T, query blocks, scales): the per-scale maximum over the grid of ``c`` (paper
   form) or ``|c|`` (authors' form), the normaliser applied before the power -> (B*T, S, N).
2. ``_track_kernel``, grid (B*T, query blocks): streams the finest grid in tiles; per tile and scale it computes the
   cosines with ``tl.dot`` (coarse scales: at the four bilinear source cells of every fine cell, i.e. the upsampling
   is evaluated on the fly, not stored), maps and multiplies them, and keeps a running argmax (strict ``>`` across
   tiles plus left tie-break inside a tile = first index) and the running weight total. It then recomputes the
   combined weights on the soft-argmax window of each query and writes cells, confidence and argmax.

3. ``_window_kernel``, grid (triples,): the windowed searches (``search="chained"``/``"coarse_to_fine"``). One
   program per (batch, frame, point) triple of a step evaluates the ``S x S`` search window around its centre cell
   in one block: per scale it gathers the cosines at the window's cells (coarse scales at the four bilinear source
   cells of every window cell), max-normalises them over the window, maps and multiplies them; then the hard argmax
   over the in-grid window cells (first index on ties), the soft-argmax disc and the confidence. The chaining
   between steps runs on the host (:mod:`common.ops.cost_volume`).

Features are L2-normalised and packed on the host (one copy of the inputs, all scales concatenated) so the kernels
loop over scales at run time with a small metadata table. Dots use ``input_precision="ieee"``: TF32 cosines would be
amplified by the power ``gamma``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["triton_available", "check_triton_runnable", "triton_track", "triton_window_evaluator"]

try:  # guarded: the package must import without triton (CPU-only installs)
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment (ImportError or a broken install)
    triton = None
    tl = None
    _HAS_TRITON = False

# read once: triton.jit decides at decoration time whether kernels are interpreted
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when ``triton`` imported successfully."""
    return _HAS_TRITON


def check_triton_runnable(device: torch.device, num_scales: int) -> None:
    """Raise ``RuntimeError`` when the Triton backend cannot run on ``device``."""
    if not _HAS_TRITON:
        raise RuntimeError("backend='triton' needs the 'triton' package (pip install triton), which is not importable")
    if device.type != "cuda" and not (device.type == "cpu" and _INTERPRET):
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors, or on CPU tensors only when TRITON_INTERPRET=1 was set before "
            f"triton was imported; got device {device}"
        )
    if num_scales < 1:
        raise RuntimeError("backend='triton' needs at least one scale")


if _HAS_TRITON:
    _TINY = tl.constexpr(1.1754943508222875e-38)  # float32 smallest normal, as torch.finfo(torch.float32).tiny

    @triton.jit
    def _map_weights(c, stat, gamma, PAPER: tl.constexpr):
        """Max-normalised per-scale weight from cosines ``c``; ``stat`` is max c (paper) or max |c| (authors)."""
        if PAPER:
            m = tl.maximum(c + 1.0, 0.0) / tl.maximum(stat + 1.0, _TINY)
            # m ** gamma as exp2(gamma * log2 m); m = 0 is selected out rather than relying on log2(0) = -inf
            w = tl.where(m > 0.0, tl.exp2(gamma * tl.log2(tl.maximum(m, _TINY))), 0.0)
        else:
            m = tl.abs(c) / tl.maximum(stat, _TINY)
            m2 = m * m
            w = m2 * m2
        return w

    @triton.jit
    def _source_index(dst, scale, size):
        """Bilinear source index of ``interpolate(..., align_corners=False)``: (i0, i1, lambda1)."""
        src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
        i0 = tl.minimum(src.to(tl.int32), size - 1)  # src >= 0, so truncation is floor
        i1 = tl.minimum(i0 + 1, size - 1)
        lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
        return i0, i1, lam

    @triton.jit
    def _scale_stat_kernel(
        q_ptr, f_ptr, meta_ptr, stat_ptr, T, N, S, LQ, LF,
        PAPER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_bt = tl.program_id(0)
        pid_n = tl.program_id(1)
        s = tl.program_id(2)
        b = pid_bt // T
        d_s = tl.load(meta_ptr + s * 6 + 0)
        hs = tl.load(meta_ptr + s * 6 + 1)
        ws = tl.load(meta_ptr + s * 6 + 2)
        foff = tl.load(meta_ptr + s * 6 + 3)
        qoff = tl.load(meta_ptr + s * 6 + 4)
        p_s = hs * ws
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_s
        q_rows = q_ptr + (b.to(tl.int64) * N + offs_n) * LQ + qoff
        q = tl.load(q_rows[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        f_base = f_ptr + pid_bt.to(tl.int64) * LF + foff
        run = tl.full([BLOCK_N], float("-inf"), tl.float32)
        for p0 in range(0, p_s, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < p_s
            f = tl.load(f_base + offs_d[:, None] * p_s + offs_p[None, :], mask=mask_d[:, None] & mask_p[None, :],
                        other=0.0)
            c = tl.dot(q, f, input_precision="ieee")
            if not PAPER:
                c = tl.abs(c)
            c = tl.where(mask_p[None, :], c, float("-inf"))
            run = tl.maximum(run, tl.max(c, axis=1))
        tl.store(stat_ptr + (pid_bt.to(tl.int64) * S + s) * N + offs_n, run, mask=mask_n)

    @triton.jit
    def _tile_weights(q, f_base, p_s, hs, ws, sy, sx, same, stat, offs_p, mask_p, offs_d, mask_d, W0, gamma,
                      PAPER: tl.constexpr):
        """Weights (BLOCK_N, BLOCK_P) of one scale at fine cells ``offs_p`` shared by the query block."""
        if same:
            f = tl.load(f_base + offs_d[:, None] * p_s + offs_p[None, :], mask=mask_d[:, None] & mask_p[None, :],
                        other=0.0)
            w = _map_weights(tl.dot(q, f, input_precision="ieee"), stat, gamma, PAPER)
        else:
            fy = offs_p // W0
            fx = offs_p - fy * W0
            y0, y1, ly = _source_index(fy, sy, hs)
            x0, x1, lx = _source_index(fx, sx, ws)
            m2 = mask_d[:, None] & mask_p[None, :]
            rows = f_base + offs_d[:, None] * p_s
            f00 = tl.load(rows + (y0 * ws + x0)[None, :], mask=m2, other=0.0)
            w00 = _map_weights(tl.dot(q, f00, input_precision="ieee"), stat, gamma, PAPER)
            f01 = tl.load(rows + (y0 * ws + x1)[None, :], mask=m2, other=0.0)
            w01 = _map_weights(tl.dot(q, f01, input_precision="ieee"), stat, gamma, PAPER)
            f10 = tl.load(rows + (y1 * ws + x0)[None, :], mask=m2, other=0.0)
            w10 = _map_weights(tl.dot(q, f10, input_precision="ieee"), stat, gamma, PAPER)
            f11 = tl.load(rows + (y1 * ws + x1)[None, :], mask=m2, other=0.0)
            w11 = _map_weights(tl.dot(q, f11, input_precision="ieee"), stat, gamma, PAPER)
            lx2 = lx[None, :]
            ly2 = ly[None, :]
            w = (1.0 - ly2) * ((1.0 - lx2) * w00 + lx2 * w01) + ly2 * ((1.0 - lx2) * w10 + lx2 * w11)
        return w

    @triton.jit
    def _window_weights(q_rows, d_s, f_base, p_s, hs, ws, sy, sx, same, stat, fy, fx, mask, mask_n, gamma,
                        PAPER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Weights (BLOCK_N, BLOCK_K) of one scale at per-query fine cells (fy, fx): gathered dots, no tl.dot."""
        if same:
            idx = fy * ws + fx
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d in range(d_s):
                qd = tl.load(q_rows + d, mask=mask_n, other=0.0)
                fd = tl.load(f_base + d * p_s + idx, mask=mask, other=0.0)
                acc += qd[:, None] * fd
            w = _map_weights(acc, stat, gamma, PAPER)
        else:
            y0, y1, ly = _source_index(fy, sy, hs)
            x0, x1, lx = _source_index(fx, sx, ws)
            a00 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            a01 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            a10 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            a11 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for d in range(d_s):
                qd = tl.load(q_rows + d, mask=mask_n, other=0.0)[:, None]
                row = f_base + d * p_s
                a00 += qd * tl.load(row + y0 * ws + x0, mask=mask, other=0.0)
                a01 += qd * tl.load(row + y0 * ws + x1, mask=mask, other=0.0)
                a10 += qd * tl.load(row + y1 * ws + x0, mask=mask, other=0.0)
                a11 += qd * tl.load(row + y1 * ws + x1, mask=mask, other=0.0)
            w00 = _map_weights(a00, stat, gamma, PAPER)
            w01 = _map_weights(a01, stat, gamma, PAPER)
            w10 = _map_weights(a10, stat, gamma, PAPER)
            w11 = _map_weights(a11, stat, gamma, PAPER)
            w = (1.0 - ly) * ((1.0 - lx) * w00 + lx * w01) + ly * ((1.0 - lx) * w10 + lx * w11)
        return w

    @triton.jit
    def _track_kernel(
        q_ptr, f_ptr, meta_ptr, scale_ptr, stat_ptr, woff_ptr, cells_ptr, conf_ptr, arg_ptr,
        T, N, S, LQ, LF, H0, W0, K, gamma,
        PAPER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_bt = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = pid_bt // T
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_d = tl.arange(0, BLOCK_D)
        q_rows0 = q_ptr + (b.to(tl.int64) * N + offs_n) * LQ
        f_bt = f_ptr + pid_bt.to(tl.int64) * LF
        stat_rows = stat_ptr + pid_bt.to(tl.int64) * S * N + offs_n
        p0_total = H0 * W0

        # pass over the finest grid: running argmax (first index on ties) and running weight total
        run_max = tl.full([BLOCK_N], -1.0, tl.float32)
        run_idx = tl.zeros([BLOCK_N], tl.int32)
        run_sum = tl.zeros([BLOCK_N], tl.float32)
        for p0 in range(0, p0_total, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < p0_total
            prod = tl.full([BLOCK_N, BLOCK_P], 1.0, tl.float32)
            for s in range(S):
                d_s = tl.load(meta_ptr + s * 6 + 0)
                hs = tl.load(meta_ptr + s * 6 + 1)
                ws = tl.load(meta_ptr + s * 6 + 2)
                foff = tl.load(meta_ptr + s * 6 + 3)
                qoff = tl.load(meta_ptr + s * 6 + 4)
                same = tl.load(meta_ptr + s * 6 + 5)
                sy = tl.load(scale_ptr + s * 2 + 0)
                sx = tl.load(scale_ptr + s * 2 + 1)
                mask_d = offs_d < d_s
                q = tl.load(q_rows0[:, None] + qoff + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                            other=0.0)
                stat = tl.load(stat_rows + s * N, mask=mask_n, other=0.0)[:, None]
                w = _tile_weights(q, f_bt + foff, hs * ws, hs, ws, sy, sx, same != 0, stat, offs_p, mask_p, offs_d,
                                  mask_d, W0, gamma, PAPER)
                prod = prod * w
            if not PAPER:
                prod = prod * prod
            prod = tl.where(mask_p[None, :], prod, -1.0)  # weights are >= 0, so padding never wins
            tile_max, tile_arg = tl.max(prod, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = tile_max > run_max  # strict: an equal value in a later tile keeps the earlier index
            run_idx = tl.where(better, p0 + tile_arg.to(tl.int32), run_idx)
            run_max = tl.where(better, tile_max, run_max)
            run_sum += tl.sum(tl.where(mask_p[None, :], prod, 0.0), axis=1)

        # soft-argmax window around the argmax, recomputed per query (never stored)
        ay = run_idx // W0
        ax = run_idx - ay * W0
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        dy = tl.load(woff_ptr + offs_k * 2 + 0, mask=mask_k, other=0)
        dx = tl.load(woff_ptr + offs_k * 2 + 1, mask=mask_k, other=0)
        yy = ay[:, None] + dy[None, :]
        xx = ax[:, None] + dx[None, :]
        valid = mask_n[:, None] & mask_k[None, :] & (yy >= 0) & (yy < H0) & (xx >= 0) & (xx < W0)
        fy = tl.minimum(tl.maximum(yy, 0), H0 - 1)
        fx = tl.minimum(tl.maximum(xx, 0), W0 - 1)
        prodw = tl.full([BLOCK_N, BLOCK_K], 1.0, tl.float32)
        for s in range(S):
            d_s = tl.load(meta_ptr + s * 6 + 0)
            hs = tl.load(meta_ptr + s * 6 + 1)
            ws = tl.load(meta_ptr + s * 6 + 2)
            foff = tl.load(meta_ptr + s * 6 + 3)
            qoff = tl.load(meta_ptr + s * 6 + 4)
            same = tl.load(meta_ptr + s * 6 + 5)
            sy = tl.load(scale_ptr + s * 2 + 0)
            sx = tl.load(scale_ptr + s * 2 + 1)
            stat = tl.load(stat_rows + s * N, mask=mask_n, other=0.0)[:, None]
            w = _window_weights(q_rows0 + qoff, d_s, f_bt + foff, hs * ws, hs, ws, sy, sx, same != 0, stat, fy, fx,
                                valid, mask_n, gamma, PAPER, BLOCK_N, BLOCK_K)
            prodw = prodw * w
        if not PAPER:
            prodw = prodw * prodw
        wv = tl.where(valid, prodw, 0.0)
        # normalising by the argmax weight keeps the window sum >= 1 (same as the PyTorch path)
        wn = wv / tl.maximum(run_max, _TINY)[:, None]
        sw = tl.maximum(tl.sum(wn, axis=1), _TINY)
        ox = tl.sum(wn * dx[None, :].to(tl.float32), axis=1) / sw
        oy = tl.sum(wn * dy[None, :].to(tl.float32), axis=1) / sw
        cx = ax.to(tl.float32) + 0.5 + ox
        cy = ay.to(tl.float32) + 0.5 + oy
        conf = tl.sum(wv, axis=1) / tl.maximum(run_sum, _TINY)
        out = pid_bt.to(tl.int64) * N + offs_n
        tl.store(cells_ptr + out * 2 + 0, cx, mask=mask_n)
        tl.store(cells_ptr + out * 2 + 1, cy, mask=mask_n)
        tl.store(conf_ptr + out, conf, mask=mask_n)
        tl.store(arg_ptr + out, run_idx, mask=mask_n)


if _HAS_TRITON:

    @triton.jit
    def _window_scale_weights(q_row, d_s, f_base, p_s, hs, ws, sy, sx, same, fy, fx, mask_k, gamma,
                              PAPER: tl.constexpr, BLOCK_K: tl.constexpr):
        """Weights (BLOCK_K,) of one scale at the window's fine cells (fy, fx), max-normalised over the window.

        The normaliser is the maximum over the cells read: for a coarse scale the four bilinear source cells of
        every window cell, i.e. the same block of coarse cells the PyTorch path gathers.
        """
        if same:
            idx = fy * ws + fx
            acc = tl.zeros([BLOCK_K], tl.float32)
            for d in range(d_s):
                acc += tl.load(q_row + d) * tl.load(f_base + d * p_s + idx, mask=mask_k, other=0.0)
            stat_c = acc if PAPER else tl.abs(acc)
            stat = tl.max(tl.where(mask_k, stat_c, float("-inf")), axis=0)
            w = _map_weights(acc, stat, gamma, PAPER)
        else:
            y0, y1, ly = _source_index(fy, sy, hs)
            x0, x1, lx = _source_index(fx, sx, ws)
            a00 = tl.zeros([BLOCK_K], tl.float32)
            a01 = tl.zeros([BLOCK_K], tl.float32)
            a10 = tl.zeros([BLOCK_K], tl.float32)
            a11 = tl.zeros([BLOCK_K], tl.float32)
            for d in range(d_s):
                qd = tl.load(q_row + d)
                row = f_base + d * p_s
                a00 += qd * tl.load(row + y0 * ws + x0, mask=mask_k, other=0.0)
                a01 += qd * tl.load(row + y0 * ws + x1, mask=mask_k, other=0.0)
                a10 += qd * tl.load(row + y1 * ws + x0, mask=mask_k, other=0.0)
                a11 += qd * tl.load(row + y1 * ws + x1, mask=mask_k, other=0.0)
            if PAPER:
                m = tl.maximum(tl.maximum(a00, a01), tl.maximum(a10, a11))
            else:
                m = tl.maximum(tl.maximum(tl.abs(a00), tl.abs(a01)), tl.maximum(tl.abs(a10), tl.abs(a11)))
            stat = tl.max(tl.where(mask_k, m, float("-inf")), axis=0)
            w00 = _map_weights(a00, stat, gamma, PAPER)
            w01 = _map_weights(a01, stat, gamma, PAPER)
            w10 = _map_weights(a10, stat, gamma, PAPER)
            w11 = _map_weights(a11, stat, gamma, PAPER)
            w = (1.0 - ly) * ((1.0 - lx) * w00 + lx * w01) + ly * ((1.0 - lx) * w10 + lx * w11)
        return w

    @triton.jit
    def _window_kernel(
        q_ptr, f_ptr, meta_ptr, scale_ptr, pair_ptr, cells_ptr, conf_ptr, arg_ptr,
        T, N, S, LQ, LF, H0, W0, HALF, DISC, gamma,
        PAPER: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.load(pair_ptr + pid * 5 + 0)
        t = tl.load(pair_ptr + pid * 5 + 1)
        n = tl.load(pair_ptr + pid * 5 + 2)
        cy = tl.load(pair_ptr + pid * 5 + 3)
        cx = tl.load(pair_ptr + pid * 5 + 4)
        side = 2 * HALF + 1
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < side * side
        wi = offs_k // side
        wj = offs_k - wi * side
        yy = cy - HALF + wi
        xx = cx - HALF + wj
        valid = mask_k & (yy >= 0) & (yy < H0) & (xx >= 0) & (xx < W0)
        # out-of-grid cells read the border cell (inside the window, so the per-scale max is unchanged); masked below
        fy = tl.minimum(tl.maximum(yy, 0), H0 - 1)
        fx = tl.minimum(tl.maximum(xx, 0), W0 - 1)
        q_row = q_ptr + (b.to(tl.int64) * N + n) * LQ
        f_bt = f_ptr + (b.to(tl.int64) * T + t) * LF
        prod = tl.full([BLOCK_K], 1.0, tl.float32)
        for s in range(S):
            d_s = tl.load(meta_ptr + s * 6 + 0)
            hs = tl.load(meta_ptr + s * 6 + 1)
            ws = tl.load(meta_ptr + s * 6 + 2)
            foff = tl.load(meta_ptr + s * 6 + 3)
            qoff = tl.load(meta_ptr + s * 6 + 4)
            same = tl.load(meta_ptr + s * 6 + 5)
            sy = tl.load(scale_ptr + s * 2 + 0)
            sx = tl.load(scale_ptr + s * 2 + 1)
            w = _window_scale_weights(q_row + qoff, d_s, f_bt + foff, hs * ws, hs, ws, sy, sx, same != 0, fy, fx,
                                      mask_k, gamma, PAPER, BLOCK_K)
            prod = prod * w
        if not PAPER:
            prod = prod * prod
        prod = tl.where(valid, prod, 0.0)
        # -1 outside the grid: an all-zero window still picks an in-grid cell
        peak, am = tl.max(tl.where(valid, prod, -1.0), axis=0, return_indices=True, return_indices_tie_break_left=True)
        am = am.to(tl.int32)
        ai = am // side
        aj = am - ai * side
        di = wi - ai
        dj = wj - aj
        wv = tl.where(valid & (di * di + dj * dj < DISC), prod, 0.0)
        # normalising by the argmax weight keeps the disc sum >= 1 (same as the PyTorch path)
        wn = wv / tl.maximum(peak, _TINY)
        sw = tl.maximum(tl.sum(wn, axis=0), _TINY)
        ox = tl.sum(wn * dj.to(tl.float32), axis=0) / sw
        oy = tl.sum(wn * di.to(tl.float32), axis=0) / sw
        tl.store(cells_ptr + pid * 2 + 0, (cx - HALF + aj).to(tl.float32) + 0.5 + ox)
        tl.store(cells_ptr + pid * 2 + 1, (cy - HALF + ai).to(tl.float32) + 0.5 + oy)
        tl.store(conf_ptr + pid, tl.sum(wv, axis=0) / tl.maximum(tl.sum(prod, axis=0), _TINY))
        tl.store(arg_ptr + pid, am.to(tl.int64))


def _next_pow2(x: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, int(x) - 1).bit_length())


def _pack(qs: list[Tensor], fs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L2-normalise and pack all scales: q (B, N, LQ), f (B, T, LF), meta (S, 6) int32, scales (S, 2) float32."""
    check_triton_runnable(fs[0].device, len(fs))
    if any(x.dtype != torch.float32 for x in (*qs, *fs)):
        raise ValueError("backend='triton' computes in float32; pass float32 (or half) features or use backend='torch'")
    device = fs[0].device
    bsz, t = fs[0].shape[:2]
    h0, w0 = fs[0].shape[-2:]
    meta, scales, q_parts, f_parts = [], [], [], []
    qoff = foff = 0
    for q, f in zip(qs, fs):
        d, hs, ws = f.shape[2:]
        # one row of 6 per scale, read by the kernels at meta_ptr + s * 6: D_s, H_s, W_s, feature offset,
        # query offset, same-size-as-finest flag
        meta.append([d, hs, ws, foff, qoff, int((hs, ws) == (h0, w0))])
        # float32(H_s / H_0), as interpolate computes its scale when given an output size
        scales.append([hs / h0, ws / w0])
        q_parts.append(F.normalize(q.detach(), dim=-1, eps=1e-12))
        f_parts.append(F.normalize(f.detach(), dim=2, eps=1e-12).reshape(bsz, t, d * hs * ws))
        qoff += d
        foff += d * hs * ws
    q_packed = torch.cat(q_parts, dim=-1).contiguous()  # (B, N, LQ)
    f_packed = torch.cat(f_parts, dim=-1).contiguous()  # (B, T, LF)
    del q_parts, f_parts
    if foff >= 2**31:
        raise ValueError(f"one frame's features span {foff} elements; the Triton kernels index a frame with int32")
    meta_t = torch.tensor(meta, dtype=torch.int32, device=device)
    scale_t = torch.tensor(scales, dtype=torch.float32, device=device)
    return q_packed, f_packed, meta_t, scale_t


def triton_window_evaluator(
    qs: list[Tensor], fs: list[Tensor], form: str, gamma: float, half: int, disc_limit: int
) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """Pack the features once; return ``evaluate(pb, pt, pn, centre)`` running ``_window_kernel``.

    ``pb, pt, pn`` (P,) are the batch, frame and point of each triple, ``centre`` (P, 2) its ``(cy, cx)`` window
    centre on the finest grid. Returns cells (P, 2) ``(x, y)`` in finest-grid cells (centres at +0.5), confidence
    (P,) and the window-local argmax (P,) int64 (row-major in the ``2 * half + 1`` square). (The backward pass
    evaluates the PyTorch path at that argmax; the kernel never needs a given one.)
    """
    q_packed, f_packed, meta_t, scale_t = _pack(qs, fs)
    device = fs[0].device
    t = fs[0].shape[1]
    n = qs[0].shape[1]
    h0, w0 = fs[0].shape[-2:]
    side = 2 * int(half) + 1
    block_k = _next_pow2(side * side, 16)
    lq, lf = q_packed.shape[-1], f_packed.shape[-1]

    def evaluate(pb: Tensor, pt: Tensor, pn: Tensor, centre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = int(pb.shape[0])
        pairs = torch.stack([pb, pt, pn, centre[:, 0], centre[:, 1]], dim=-1).to(device=device, dtype=torch.int32)
        cells = torch.empty(p, 2, dtype=torch.float32, device=device)
        conf = torch.empty(p, dtype=torch.float32, device=device)
        arg = torch.empty(p, dtype=torch.int64, device=device)
        if p:
            _window_kernel[(p,)](
                q_packed, f_packed, meta_t, scale_t, pairs.contiguous(), cells, conf, arg,
                t, n, len(fs), lq, lf, h0, w0, int(half), int(disc_limit), float(gamma),
                PAPER=form == "paper", BLOCK_K=block_k,
            )
        return cells, conf, arg

    return evaluate


def triton_track(
    qs: list[Tensor], fs: list[Tensor], form: str, gamma: float, offsets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the kernels: qs[s] (B, N, D_s), fs[s] (B, T, D_s, H_s, W_s), float32, finest scale first.

    Returns:
        cells (B, T, N, 2) soft-argmax ``(x, y)`` in finest-grid cells (centres at +0.5), confidence (B, T, N),
        argmax (B, T, N) int64 flat index on the finest grid.
    """
    q_packed, f_packed, meta_t, scale_t = _pack(qs, fs)
    device = fs[0].device
    bsz, t = fs[0].shape[:2]
    n = qs[0].shape[1]
    h0, w0 = fs[0].shape[-2:]
    woff = offsets.to(device=device, dtype=torch.int32).contiguous()
    num_scales = len(fs)
    d_max = max(int(f.shape[2]) for f in fs)
    block_n = _next_pow2(min(n, 32), 16)  # tl.dot needs every block dim >= 16
    block_d = _next_pow2(d_max, 16)
    block_p = 64
    block_k = _next_pow2(woff.shape[0], 16)
    paper = form == "paper"
    stat = torch.empty(bsz * t, num_scales, n, dtype=torch.float32, device=device)
    cells = torch.empty(bsz, t, n, 2, dtype=torch.float32, device=device)
    conf = torch.empty(bsz, t, n, dtype=torch.float32, device=device)
    arg = torch.empty(bsz, t, n, dtype=torch.int32, device=device)
    if n == 0 or bsz * t == 0:
        return cells, conf, arg.long()
    n_blocks = triton.cdiv(n, block_n)
    lq, lf = q_packed.shape[-1], f_packed.shape[-1]
    _scale_stat_kernel[(bsz * t, n_blocks, num_scales)](
        q_packed, f_packed, meta_t, stat, t, n, num_scales, lq, lf,
        PAPER=paper, BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_D=block_d,
    )
    _track_kernel[(bsz * t, n_blocks)](
        q_packed, f_packed, meta_t, scale_t, stat, woff, cells, conf, arg,
        t, n, num_scales, lq, lf, h0, w0, woff.shape[0], float(gamma),
        PAPER=paper, BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_K=block_k,
    )
    return cells, conf, arg.long()
