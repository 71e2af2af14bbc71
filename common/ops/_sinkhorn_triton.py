"""Triton kernels of :mod:`common.ops.sinkhorn` (forward only; gradients come from the PyTorch path).

``triton`` is imported in a guarded way so :mod:`common.ops` works without it; :func:`triton_available` tells.
Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.

The Gibbs kernel is stored once, ``K = exp(-C / eps)`` (scaling domain) or ``S = -C / eps`` (log domain), as a
``(B, N, M)`` tensor in the compute dtype. Three kernels:

1. ``_gibbs_from_features_kernel``, grid (row blocks, column blocks, B): the cosine cost of L2-normalised features
   fused with the exponential (or the scaling by ``-1/eps``). The feature norms are accumulated in the same loop over
   the feature dimension as the dot products, so normalised features are never written. Entries of zero-mass
   tokens are written as if their cost were 0 (the PyTorch path does the same), so NaN padding cannot leak.
2. ``_half_step_kernel``, grid (row blocks, B): one Sinkhorn half-iteration, ``u = a / (K v)`` or
   ``log_u = log_a - LSE_j(S_ij + log_v_j)`` (online log-sum-exp over column tiles). The column half-iteration is
   the same kernel launched on the transposed strides, so an iteration is two launches. It also writes the
   reduction ``K v`` (or the LSE), from which the host gets the row marginal of the previous iterate for free.
3. ``_transport_kernel``, grid (row blocks, value blocks, B): ``T @ V`` with ``T = diag(u) K diag(v)`` or
   ``exp(S + log_u + log_v)`` evaluated tile by tile and fed to ``tl.dot``: the plan is never written. ``T^T @ U`` is
   the same kernel on the transposed strides.

Dots use ``input_precision="ieee"``: TF32 cosines are amplified by ``1/eps`` in the exponent.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = [
    "triton_available",
    "check_triton_runnable",
    "gibbs_from_features",
    "half_step",
    "transport",
    "sinkhorn_loop",
]

try:  # guarded: the package must import without triton (CPU-only installs)
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment (ImportError or a broken install)
    triton = None
    tl = None
    _HAS_TRITON = False


def triton_available() -> bool:
    """True when triton imported successfully."""
    return _HAS_TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_runnable(device: torch.device) -> None:
    """Raise ``RuntimeError`` unless the Triton kernels can run on ``device``."""
    if not _HAS_TRITON:
        raise RuntimeError("backend='triton' needs the 'triton' package, which could not be imported")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got device {device}); on CPU it only runs under TRITON_INTERPRET=1"
        )


if _HAS_TRITON:

    @triton.jit
    def _gibbs_from_features_kernel(
        xs_ptr,
        xt_ptr,
        vs_ptr,
        vt_ptr,
        out_ptr,
        N,
        M,
        D,
        s_xb,
        s_xn,
        s_xd,
        s_tb,
        s_tm,
        s_td,
        s_vsb,
        s_vtb,
        s_ob,
        s_on,
        s_om,
        inv_eps,
        LOG_DOMAIN: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_b = tl.program_id(2)
        dt = out_ptr.dtype.element_ty
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_n = offs_n < N
        in_m = offs_m < M
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=dt)
        ns = tl.zeros([BLOCK_N], dtype=dt)
        nt = tl.zeros([BLOCK_M], dtype=dt)
        xs_base = xs_ptr + pid_b * s_xb + offs_n[:, None] * s_xn
        xt_base = xt_ptr + pid_b * s_tb + offs_m[:, None] * s_tm
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            in_d = dd < D
            xs = tl.load(xs_base + dd[None, :] * s_xd, mask=in_n[:, None] & in_d[None, :], other=0.0).to(dt)
            xt = tl.load(xt_base + dd[None, :] * s_td, mask=in_m[:, None] & in_d[None, :], other=0.0).to(dt)
            acc += tl.dot(xs, tl.trans(xt), input_precision="ieee")
            ns += tl.sum(xs * xs, axis=1)
            nt += tl.sum(xt * xt, axis=1)
        # F.normalize semantics: x / max(|x|, 1e-12), so a zero feature vector has cosine 0 with everything
        den_s = tl.maximum(tl.sqrt(ns), 1e-12)
        den_t = tl.maximum(tl.sqrt(nt), 1e-12)
        cost = 1.0 - acc / (den_s[:, None] * den_t[None, :])
        vs = tl.load(vs_ptr + pid_b * s_vsb + offs_n, mask=in_n, other=0)
        vt = tl.load(vt_ptr + pid_b * s_vtb + offs_m, mask=in_m, other=0)
        support = (vs[:, None] != 0) & (vt[None, :] != 0)
        cost = tl.where(support, cost, 0.0)
        if LOG_DOMAIN:
            val = -cost * inv_eps
        else:
            val = tl.exp(-cost * inv_eps)
        out = out_ptr + pid_b * s_ob + offs_n[:, None] * s_on + offs_m[None, :] * s_om
        tl.store(out, val.to(dt), mask=in_n[:, None] & in_m[None, :])

    @triton.jit
    def _half_step_kernel(
        k_ptr,
        x_ptr,
        marg_ptr,
        new_ptr,
        red_ptr,
        R,
        C,
        s_kb,
        s_kr,
        s_kc,
        s_xb,
        s_mb,
        s_nb,
        s_rb,
        LOG_DOMAIN: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_b = tl.program_id(1)
        dt = k_ptr.dtype.element_ty
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, BLOCK_C)
        in_r = offs_r < R
        k_base = k_ptr + pid_b * s_kb + offs_r[:, None] * s_kr
        x_base = x_ptr + pid_b * s_xb
        if LOG_DOMAIN:
            run_max = tl.full([BLOCK_R], float("-inf"), dtype=dt)
            acc = tl.zeros([BLOCK_R], dtype=dt)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                in_c = cc < C
                s = tl.load(k_base + cc[None, :] * s_kc, mask=in_r[:, None] & in_c[None, :], other=float("-inf"))
                w = tl.load(x_base + cc, mask=in_c, other=float("-inf"))
                z = s + w[None, :]
                new_max = tl.maximum(run_max, tl.max(z, axis=1))
                # a row whose terms are all -inf so far keeps a finite reference, so no inf - inf appears
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)
                acc = acc * tl.exp(run_max - ref) + tl.sum(tl.exp(z - ref[:, None]), axis=1)
                run_max = new_max
            # the where() guards keep the discarded lanes free of log(0) and inf - inf as well (quiet interpreter)
            ref = tl.where(run_max == float("-inf"), 0.0, run_max)
            red = tl.where(acc > 0, ref + tl.log(tl.where(acc > 0, acc, 1.0)), float("-inf"))
            lm = tl.load(marg_ptr + pid_b * s_mb + offs_r, mask=in_r, other=float("-inf"))
            zero_mass = lm == float("-inf")
            new = tl.where(zero_mass, float("-inf"), lm - tl.where(zero_mass, 0.0, red))
        else:
            acc = tl.zeros([BLOCK_R], dtype=dt)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                in_c = cc < C
                k = tl.load(k_base + cc[None, :] * s_kc, mask=in_r[:, None] & in_c[None, :], other=0.0)
                w = tl.load(x_base + cc, mask=in_c, other=0.0)
                acc += tl.sum(k * w[None, :], axis=1)
            red = acc
            m = tl.load(marg_ptr + pid_b * s_mb + offs_r, mask=in_r, other=0.0)
            # zero-mass rows get exactly 0 (no 0/0); a positive mass over an underflowed sum gives inf, which the
            # host reports as an overflow of the scaling domain
            new = tl.where(m > 0, m / tl.where(m > 0, red, 1.0), 0.0)
        tl.store(new_ptr + pid_b * s_nb + offs_r, new.to(dt), mask=in_r)
        tl.store(red_ptr + pid_b * s_rb + offs_r, red.to(dt), mask=in_r)

    @triton.jit
    def _transport_kernel(
        k_ptr,
        xr_ptr,
        xc_ptr,
        v_ptr,
        out_ptr,
        R,
        C,
        DV,
        s_kb,
        s_kr,
        s_kc,
        s_xrb,
        s_xcb,
        s_vb,
        s_vc,
        s_vd,
        s_ob,
        s_or,
        s_od,
        LOG_DOMAIN: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_b = tl.program_id(2)
        dt = k_ptr.dtype.element_ty
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, BLOCK_C)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        in_r = offs_r < R
        in_d = offs_d < DV
        k_base = k_ptr + pid_b * s_kb + offs_r[:, None] * s_kr
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=dt)
        if LOG_DOMAIN:
            xr = tl.load(xr_ptr + pid_b * s_xrb + offs_r, mask=in_r, other=float("-inf"))
        else:
            xr = tl.load(xr_ptr + pid_b * s_xrb + offs_r, mask=in_r, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            in_c = cc < C
            tile_mask = in_r[:, None] & in_c[None, :]
            if LOG_DOMAIN:
                s = tl.load(k_base + cc[None, :] * s_kc, mask=tile_mask, other=float("-inf"))
                xc = tl.load(xc_ptr + pid_b * s_xcb + cc, mask=in_c, other=float("-inf"))
                t = tl.exp(s + xr[:, None] + xc[None, :])
            else:
                k = tl.load(k_base + cc[None, :] * s_kc, mask=tile_mask, other=0.0)
                xc = tl.load(xc_ptr + pid_b * s_xcb + cc, mask=in_c, other=0.0)
                t = k * xc[None, :]
            vals = tl.load(
                v_ptr + pid_b * s_vb + cc[:, None] * s_vc + offs_d[None, :] * s_vd,
                mask=in_c[:, None] & in_d[None, :],
                other=0.0,
            ).to(dt)
            acc += tl.dot(t.to(dt), vals, input_precision="ieee")
        if not LOG_DOMAIN:
            acc = acc * xr[:, None]
        out = out_ptr + pid_b * s_ob + offs_r[:, None] * s_or + offs_d[None, :] * s_od
        tl.store(out, acc.to(dt), mask=in_r[:, None] & in_d[None, :])


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def gibbs_from_features(
    xs: Tensor, xt: Tensor, support_s: Tensor, support_t: Tensor, eps: float, log_domain: bool, dtype: torch.dtype
) -> Tensor:
    """Gibbs kernel from raw features without writing the normalised features or the cost.

    Args:
        xs: (B, N, D) source features (any float dtype; read and converted in the kernel).
        xt: (B, M, D) target features.
        support_s: (B, N) bool, tokens with positive mass; the others get cost 0.
        support_t: (B, M) bool.
        eps: entropic regularisation.
        log_domain: write ``S = -C / eps`` instead of ``K = exp(-C / eps)``.
        dtype: compute dtype of the output (float32 or float64).

    Returns:
        (B, N, M) contiguous tensor of ``dtype``.
    """
    B, N, D = xs.shape
    M = xt.shape[1]
    out = torch.empty(B, N, M, device=xs.device, dtype=dtype)
    vs = support_s.to(torch.uint8)
    vt = support_t.to(torch.uint8)
    block_n = _pow2_block(N, 16, 64)
    block_m = _pow2_block(M, 16, 64)
    block_d = _pow2_block(D, 16, 32)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), B)
    _gibbs_from_features_kernel[grid](
        xs,
        xt,
        vs,
        vt,
        out,
        N,
        M,
        D,
        *xs.stride(),
        *xt.stride(),
        vs.stride(0),
        vt.stride(0),
        *out.stride(),
        1.0 / eps,
        LOG_DOMAIN=log_domain,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    return out


def half_step(
    gibbs: Tensor, other: Tensor, marginal: Tensor, log_domain: bool, transpose: bool = False
) -> tuple[Tensor, Tensor]:
    """One Sinkhorn half-iteration.

    Args:
        gibbs: (B, N, M) ``K`` (scaling) or ``S`` (log domain).
        other: (B, M) ``v`` or ``log_v`` (``transpose``: (B, N) ``u`` or ``log_u``).
        marginal: (B, N) ``a`` or ``log_a`` (``transpose``: (B, M) ``b`` or ``log_b``).
        log_domain: which form ``gibbs``, ``other`` and ``marginal`` are in.
        transpose: update the column scaling from ``K^T`` instead of the row scaling from ``K``.

    Returns:
        ``(new, red)``: the updated scaling (B, R) and the reduction ``K v`` / ``LSE_j(S_ij + log_v_j)`` (B, R),
        R = N (rows) or M (``transpose``).
    """
    B, N, M = gibbs.shape
    s_kb, s_kn, s_km = gibbs.stride()
    if transpose:
        R, C, s_kr, s_kc = M, N, s_km, s_kn
    else:
        R, C, s_kr, s_kc = N, M, s_kn, s_km
    new = torch.empty(B, R, device=gibbs.device, dtype=gibbs.dtype)
    red = torch.empty_like(new)
    block_r = _pow2_block(R, 16, 32)
    block_c = _pow2_block(C, 16, 128)
    _half_step_kernel[(triton.cdiv(R, block_r), B)](
        gibbs,
        other,
        marginal,
        new,
        red,
        R,
        C,
        s_kb,
        s_kr,
        s_kc,
        other.stride(0),
        marginal.stride(0),
        new.stride(0),
        red.stride(0),
        LOG_DOMAIN=log_domain,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return new, red


def transport(
    gibbs: Tensor, x_row: Tensor, x_col: Tensor, values: Tensor, log_domain: bool, transpose: bool = False
) -> Tensor:
    """``T @ values`` (or ``T^T @ values`` with ``transpose``) without writing the plan.

    Args:
        gibbs: (B, N, M) ``K`` or ``S``.
        x_row: (B, N) ``u`` or ``log_u`` (``transpose``: (B, M) ``v`` or ``log_v``).
        x_col: (B, M) ``v`` or ``log_v`` (``transpose``: (B, N) ``u`` or ``log_u``).
        values: (B, M, Dv) (``transpose``: (B, N, Dv)), any float dtype.
        log_domain: which form ``gibbs`` and the scalings are in.

    Returns:
        (B, N, Dv) (``transpose``: (B, M, Dv)) in ``gibbs.dtype``.
    """
    B, N, M = gibbs.shape
    s_kb, s_kn, s_km = gibbs.stride()
    if transpose:
        R, C, s_kr, s_kc = M, N, s_km, s_kn
    else:
        R, C, s_kr, s_kc = N, M, s_kn, s_km
    DV = values.shape[2]
    out = torch.empty(B, R, DV, device=gibbs.device, dtype=gibbs.dtype)
    block_r = _pow2_block(R, 16, 32)
    block_c = _pow2_block(C, 16, 64)
    block_d = _pow2_block(DV, 16, 64)
    grid = (triton.cdiv(R, block_r), triton.cdiv(DV, block_d), B)
    _transport_kernel[grid](
        gibbs,
        x_row,
        x_col,
        values,
        out,
        R,
        C,
        DV,
        s_kb,
        s_kr,
        s_kc,
        x_row.stride(0),
        x_col.stride(0),
        *values.stride(),
        *out.stride(),
        LOG_DOMAIN=log_domain,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
    )
    return out


def sinkhorn_loop(
    gibbs: Tensor,
    marg_s: Tensor,
    marg_t: Tensor,
    init_t: Tensor,
    n_iters: int,
    tol: float | None,
    log_domain: bool,
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """Row-first Sinkhorn iterations, two launches per iteration.

    Args:
        gibbs: (B, N, M) ``K`` or ``S`` (contiguous or any strides).
        marg_s: (B, N) ``a`` (scaling) or ``log a`` (log domain).
        marg_t: (B, M) ``b`` or ``log b``.
        init_t: (B, M) initial column scaling (``v``) or its log.
        n_iters: maximum number of iterations.
        tol: stop before an iteration once the row-marginal L1 error of every batch element is below ``tol``.
        log_domain: which form the tensors are in.

    Returns:
        ``(x_s, x_t, iterations_run, err)`` with ``err`` the (B,) L1 row-marginal error of the returned state when
        the early stop measured it, else ``None``.
    """
    x_t = init_t
    x_s = None
    for it in range(n_iters):
        new_s, red = half_step(gibbs, x_t, marg_s, log_domain)
        if tol is not None and x_s is not None:
            row = torch.exp(x_s + red) if log_domain else x_s * red
            a = torch.exp(marg_s) if log_domain else marg_s
            err = (row - a).abs().sum(1)
            if bool(err.max() < tol):
                return x_s, x_t, it, err
        x_s = new_s
        x_t, _ = half_step(gibbs, x_s, marg_t, log_domain, transpose=True)
    return x_s, x_t, n_iters, None
