"""Batched entropic optimal transport (Sinkhorn), as BOTM uses it (METHODS.md §1).

Problem, per batch element: ``min_T <T, C> - eps * H(T)`` subject to ``T 1 = a`` and ``T^T 1 = b``. Its solution is
``T = diag(u) K diag(v)`` with the Gibbs kernel ``K = exp(-C / eps)``; ``f = eps * log u`` and ``g = eps * log v`` are
the dual potentials.

Conventions, shared by every function of this module:

* Cost: a tensor ``cost`` (B, N, M), or token features ``xs`` (B, N, D), ``xt`` (B, M, D) with
  ``C = 1 - cos(xs_i, xt_j)`` (:func:`cosine_cost`; a zero feature vector has cosine 0 with everything).
* Marginals ``a`` (B, N) and ``b`` (B, M), uniform over the valid tokens by default; they must be non-negative,
  have positive and equal total mass per batch element (relative tolerance 1e-4). Padding masks ``mask_s`` (B, N)
  and ``mask_t`` (B, M) are boolean, True for a real token; padded tokens get zero mass, so their plan rows/columns
  are exactly zero and their cost and features are never read (NaN padding is fine). Zero-mass tokens behave
  exactly like absent tokens: the result equals that of the problem with those tokens removed, at every iteration.
* Iterations (the paper's Alg. 1, row first): initialise ``v = 1`` on the target tokens with positive mass (0 on the
  others), then repeat ``n_iters`` times ``u = a / (K v)`` followed by ``v = b / (K^T u)``. The returned state is
  after a column update, so the column marginal is exact and the row marginal carries the error. With ``tol``,
  iteration ``k`` stops early (before its row update) once the L1 row-marginal error of every batch element is
  below ``tol``; ``n_iters`` of the result is then the number of completed iterations (the whole batch stops
  together). The error check is free: it reuses the product ``K v`` of the next row update.
* Domains: ``"scaling"`` iterates on ``u, v`` with ``K`` stored; ``"log"`` iterates on ``log u, log v`` with
  ``S = -C / eps`` stored and log-sum-exp reductions (same iterates in exact arithmetic, no under/overflow for small
  ``eps``). ``"auto"`` takes the scaling form when ``max|C| / eps <= -0.5 * log(tiny)`` of the compute dtype
  (43.7 for float32, 354 for float64), which keeps ``K`` and the scalings far from underflow; for features the
  bound ``max|C| <= 2`` of the cosine cost is used, so the decision does not depend on the data. A forced scaling
  domain that overflows raises ``RuntimeError`` (no silent switch).
* Dtypes: float16/bfloat16 inputs are computed in float32, float32 in float32, float64 in float64; outputs are in
  the input dtype (note that the entries of a large plan, ~1/(N M), are subnormal in float16).
* Backends: ``"torch"`` (CPU and fallback), ``"triton"`` (CUDA tensors; on CPU only under ``TRITON_INTERPRET=1``),
  ``"auto"`` = triton for CUDA tensors when triton imports, else torch. Same API and results. The Triton path
  builds ``K``/``S`` straight from the features, runs two launches per iteration and transports values without
  writing the plan.
* PyTorch path without autograd: ``K`` (or ``S``) is built once; a scaling iteration is two batched
  (1 x n) @ (n x m) products into preallocated buffers and two in-place divisions (two streaming passes over
  ``K``); with one intra-op thread, kernels of one batch element up to 1 MiB are iterated one element at a time so
  they stay in the L2 cache (without ``tol`` only; the results are identical). The log-domain log-sum-exps stream
  ``S`` once per half-iteration through a 2 MiB in-cache buffer (the column one as an online log-sum-exp), so no
  (B, N, M) temporary is allocated per iteration.
* Autograd (whenever an input requires grad):

  - ``grad="unrolled"`` (default): differentiate through the iterations. Memory beyond the stored kernel is
    O(n_iters * B * (N + M)): the scaling-domain mat-vecs save vectors only, and the log-domain log-sum-exp is a
    custom function that recomputes its softmax weights in the backward pass instead of saving them. On the
    Triton backend the backward pass re-runs the PyTorch unrolled iterations (same number of iterations), so the
    gradients are those of the PyTorch path.
  - ``grad="implicit"``: implicit differentiation at the returned state, treated as the fixed point. With
    ``P = exp(S + log u + log v)``, ``r = P 1``, ``c = P^T 1``, the optimality conditions ``P 1 = a``,
    ``P^T 1 = b`` have the Jacobian ``J = [[diag(r), P], [P^T, diag(c)]]`` in ``(log u, log v)``. The backward
    pass solves ``J [lu; lv] = [gu; gv]`` and returns ``dC = P * (lu_i + lv_j) / eps``, ``da = lu``, ``db = lv``.
    ``J`` is singular along the gauge ``(log u + t, log v - t)``: the incoming gradient is projected on the
    gauge-free subspace first, so gradients of gauge-invariant quantities (the plan, transported values,
    ``f_i + g_j``) are exact; for ``log_u``/``log_v`` alone, whose gauge the iterations fix and the optimality
    conditions do not, the component of their gradient along the gauge is dropped. The
    system is reduced to the Schur complement on the smaller side (size ``min(N, M)``), made definite by adding
    ``gamma 1 1^T`` (which does not change the solution for a gauge-free right-hand side), and solved densely in
    float64 (``torch.linalg.solve``) when ``min(N, M) <= 1024``, otherwise by Jacobi-preconditioned conjugate
    gradients in the compute dtype (relative residual 1e-6 in float32, 1e-10 in float64, at most
    ``max(200, min(N, M))`` steps, a ``RuntimeWarning`` if not reached). Memory: no per-iteration state; the
    backward pass holds a few (B, N, M) temporaries. Requires a converged forward (use ``tol``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from common.ops import _sinkhorn_triton as _tri

__all__ = ["SinkhornResult", "cosine_cost", "sinkhorn", "sinkhorn_transport"]

_DOMAINS = ("auto", "scaling", "log")
_GRADS = ("unrolled", "implicit")
_BACKENDS = ("auto", "torch", "triton")
# Schur systems up to this size are solved densely in float64 by the implicit backward pass, larger ones by CG.
_IMPLICIT_DENSE_MAX = 1024
# Relative tolerance on the total masses of a and b: Sinkhorn has no solution when they differ.
_MASS_RTOL = 1e-4
# Elements of the in-cache work buffer of the chunked log-sum-exp (2 MiB in float32, the L2 size of common CPUs).
_LSE_CHUNK_ELEMS = 1 << 19
# Single-threaded, kernels of one batch element up to this size are iterated one element at a time, from L2.
_CACHE_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype, name: str) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.float32
    if dtype == torch.float64:
        return torch.float64
    raise ValueError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {dtype}")


def _check_tensor(name: str, x: object, ndim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_features(xs: object, xt: object) -> tuple[Tensor, Tensor]:
    xs = _check_tensor("xs", xs, 3)
    xt = _check_tensor("xt", xt, 3)
    _compute_dtype(xs.dtype, "xs")
    _compute_dtype(xt.dtype, "xt")
    if xs.shape[0] != xt.shape[0]:
        raise ValueError(f"xs and xt must have the same batch size, got {tuple(xs.shape)} and {tuple(xt.shape)}")
    if xs.shape[2] != xt.shape[2]:
        raise ValueError(f"xs and xt must have the same feature dimension, got {tuple(xs.shape)} and {tuple(xt.shape)}")
    if xs.device != xt.device:
        raise ValueError(f"xs and xt must be on the same device, got {xs.device} and {xt.device}")
    if xs.shape[1] == 0 or xt.shape[1] == 0 or xs.shape[2] == 0:
        raise ValueError(f"xs and xt must be non-empty, got {tuple(xs.shape)} and {tuple(xt.shape)}")
    return xs, xt


def _check_mask(name: str, mask: Tensor | None, B: int, n: int, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    mask = _check_tensor(name, mask, 2)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (B, n):
        raise ValueError(f"{name} must have shape {(B, n)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} leaves no valid token (zero mass) in batch element(s) {empty}")
    return mask


def _prepare_marginal(
    name: str, x: Tensor | None, mask: Tensor | None, mask_name: str, B: int, n: int, cdt: torch.dtype, device
) -> Tensor:
    """(B, n) marginal in the compute dtype (differentiable w.r.t. ``x``)."""
    if x is None:
        if mask is None:
            return torch.full((B, n), 1.0 / n, dtype=cdt, device=device)
        m = mask.to(cdt)
        return m / m.sum(1, keepdim=True)
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _compute_dtype(x.dtype, name)
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    if x.ndim == 1 and x.shape[0] == n:
        x = x.unsqueeze(0).expand(B, n)
    if tuple(x.shape) != (B, n):
        raise ValueError(f"{name} must have shape {(B, n)} or {(n,)}, got {tuple(x.shape)}")
    xd = x.detach()
    if not bool(torch.isfinite(xd).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if bool((xd < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    zero = (xd.sum(1) <= 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"{name} has zero total mass in batch element(s) {zero}")
    if mask is not None and bool((xd[~mask] != 0).any()):
        raise ValueError(f"{name} puts positive mass on tokens that {mask_name} marks as padding")
    return x.to(cdt)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_scalars(eps: float, n_iters: int, tol: float | None) -> tuple[float, int, float | None]:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be a positive int, got {n_iters!r}")
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0
    ):
        raise ValueError(f"tol must be None or a positive finite number, got {tol!r}")
    return float(eps), n_iters, None if tol is None else float(tol)


def _scaling_limit(cdt: torch.dtype) -> float:
    return -0.5 * math.log(torch.finfo(cdt).tiny)


def _safe_log(x: Tensor) -> Tensor:
    """log with exact -inf at 0 and a zero (not NaN) gradient there."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))), torch.full_like(x, -math.inf))


def _cosine_cost_compute(xs: Tensor, xt: Tensor, cdt: torch.dtype) -> Tensor:
    xs_n = F.normalize(xs.to(cdt), dim=-1, eps=1e-12)
    xt_n = F.normalize(xt.to(cdt), dim=-1, eps=1e-12)
    return 1.0 - torch.bmm(xs_n, xt_n.transpose(1, 2))


def cosine_cost(xs: Tensor, xt: Tensor) -> Tensor:
    """Cosine cost ``C_ij = 1 - cos(xs_i, xt_j)`` in ``[0, 2]``.

    Args:
        xs: (B, N, D) source features.
        xt: (B, M, D) target features.

    Returns:
        (B, N, M) cost in the promoted input dtype (float16/bfloat16 are computed in float32). A zero feature vector
        has cosine 0 with everything (``F.normalize`` semantics).
    """
    xs, xt = _check_features(xs, xt)
    out_dtype = torch.promote_types(xs.dtype, xt.dtype)
    return _cosine_cost_compute(xs, xt, _compute_dtype(out_dtype, "xs")).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch iterations
# ---------------------------------------------------------------------------------------------------------------


def _lse_rows(S: Tensor, w: Tensor) -> Tensor:
    """``LSE_j(S[b, i, j] + w[b, j])`` -> (B, N), streaming S once through an in-cache buffer (no (B, N, M) temp)."""
    B, N, M = S.shape
    rows = max(1, min(N, _LSE_CHUNK_ELEMS // max(1, B * M)))
    out = torch.empty(B, N, dtype=S.dtype, device=S.device)
    buf = torch.empty(B, rows, M, dtype=S.dtype, device=S.device)
    floor = torch.finfo(S.dtype).min
    w3 = w.unsqueeze(1)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        blk = buf[:, : r1 - r0]
        torch.add(S[:, r0:r1], w3, out=blk)
        # clamping the reference keeps an all -inf row at exp(-inf) = 0 instead of exp(-inf + inf) = NaN
        ref = blk.amax(2, keepdim=True).clamp_min_(floor)
        blk.sub_(ref).exp_()
        out[:, r0:r1] = blk.sum(2).log_().add_(ref.squeeze(2))
    return out


def _lse_cols(S: Tensor, w: Tensor) -> Tensor:
    """``LSE_i(S[b, i, j] + w[b, i])`` -> (B, M), an online log-sum-exp over row chunks (S read once, row-major)."""
    B, N, M = S.shape
    rows = max(1, min(N, _LSE_CHUNK_ELEMS // max(1, B * M)))
    floor = torch.finfo(S.dtype).min
    run_max = torch.full((B, M), floor, dtype=S.dtype, device=S.device)
    acc = torch.zeros(B, M, dtype=S.dtype, device=S.device)
    buf = torch.empty(B, rows, M, dtype=S.dtype, device=S.device)
    w3 = w.unsqueeze(2)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        blk = buf[:, : r1 - r0]
        torch.add(S[:, r0:r1], w3[:, r0:r1], out=blk)
        new_max = torch.maximum(run_max, blk.amax(1))
        acc.mul_(torch.exp(run_max - new_max))
        blk.sub_(new_max.unsqueeze(1)).exp_()
        acc.add_(blk.sum(1))
        run_max = new_max
    return acc.log_().add_(run_max)


class _StreamLSE(torch.autograd.Function):
    """Log-sum-exp of ``S + w`` along ``dim`` (2: over columns, w is (B, M); 1: over rows, w is (B, N)).

    The backward pass recomputes the softmax weights from ``S``, ``w`` and the output instead of saving a
    (B, N, M) tensor per call, which keeps unrolled log-domain iterations at O(B * (N + M)) memory per iteration.
    """

    @staticmethod
    def forward(ctx, S: Tensor, w: Tensor, dim: int) -> Tensor:
        y = _lse_rows(S, w) if dim == 2 else _lse_cols(S, w)
        ctx.save_for_backward(S, w, y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        S, w, y = ctx.saved_tensors
        if ctx.dim == 2:
            p = torch.exp(S + w.unsqueeze(1) - y.unsqueeze(2))
            gS = p * gy.unsqueeze(2)
            gw = gS.sum(1)
        else:
            p = torch.exp(S + w.unsqueeze(2) - y.unsqueeze(1))
            gS = p * gy.unsqueeze(1)
            gw = gS.sum(2)
        return (gS if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), None


def _row_error(row: Tensor, a: Tensor) -> Tensor:
    return (row - a).abs().sum(1)


def _scaling_loop(
    K: Tensor, a: Tensor, b: Tensor, n_iters: int, tol: float | None, track_grad: bool
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """Row-first scaling iterations. Returns ``(u, v, iterations_run, err or None)``.

    The mat-vecs are ``v^T K^T`` and ``u^T K`` as (1 x n) @ (n x m) batched products: on CPU these stream the
    row-major K at close to read bandwidth, while ``bmm(K, v[..., None])`` runs at about half of it.
    """
    B, N, M = K.shape
    Kt = K.transpose(1, 2)
    v = (b > 0).to(K.dtype)
    u = None
    if track_grad:
        for it in range(n_iters):
            kv = torch.bmm(v.unsqueeze(1), Kt).squeeze(1)
            if tol is not None and u is not None:
                err = _row_error(u.detach() * kv.detach(), a.detach())
                if bool(err.max() < tol):
                    return u, v, it, err
            u = a / kv
            v = b / torch.bmm(u.unsqueeze(1), K).squeeze(1)
        return u, v, n_iters, None
    kv = torch.empty(B, 1, N, dtype=K.dtype, device=K.device)
    ktu = torch.empty(B, 1, M, dtype=K.dtype, device=K.device)
    u = torch.empty(B, N, dtype=K.dtype, device=K.device)
    kv2, ktu2 = kv.view(B, N), ktu.view(B, M)
    for it in range(n_iters):
        torch.bmm(v.view(B, 1, M), Kt, out=kv)
        if tol is not None and it > 0:
            err = _row_error(u * kv2, a)
            if bool(err.max() < tol):
                return u, v, it, err
        torch.div(a, kv2, out=u)
        torch.bmm(u.view(B, 1, N), K, out=ktu)
        torch.div(b, ktu2, out=v)
    return u, v, n_iters, None


def _log_loop(
    S: Tensor, log_a: Tensor, log_b: Tensor, n_iters: int, tol: float | None, track_grad: bool
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """Row-first log-domain iterations. Returns ``(log_u, log_v, iterations_run, err or None)``."""
    lv = torch.where(log_b > -math.inf, torch.zeros_like(log_b), log_b).detach()
    lu = None
    a = torch.exp(log_a.detach())
    for it in range(n_iters):
        if track_grad:
            lse_r = _StreamLSE.apply(S, lv, 2)
        else:
            lse_r = _lse_rows(S, lv)
        if tol is not None and lu is not None:
            err = _row_error(torch.exp(lu.detach() + lse_r.detach()), a)
            if bool(err.max() < tol):
                return lu, lv, it, err
        # -inf - finite stays -inf: zero-mass tokens keep log u = -inf without special cases
        lu = log_a - lse_r
        lse_c = _StreamLSE.apply(S, lu, 1) if track_grad else _lse_cols(S, lu)
        lv = log_b - lse_c
    return lu, lv, n_iters, None


def _gibbs(C: Tensor, eps: float, log_domain: bool) -> Tensor:
    S = C * (-1.0 / eps)
    if log_domain:
        return S
    # in place when no graph is recorded: saves one (B, N, M) temporary
    return torch.exp(S) if torch.is_grad_enabled() and S.requires_grad else S.exp_()


def _finite_absmax(x: Tensor) -> float | None:
    """max |x| in one pass, or None when x holds NaN/Inf (``aminmax`` propagates NaN; ``isfinite`` costs 4 passes)."""
    lo, hi = (float(t) for t in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return max(-lo, hi)


def _gibbs_from_features_nograd(xs: Tensor, xt: Tensor, cdt: torch.dtype, eps: float, log_domain: bool) -> Tensor:
    """``K`` or ``S`` straight from features with a single (B, N, M) allocation (no graph).

    ``S = cos / eps - 1 / eps``: the ``1 / eps`` is folded into the (B, N, D) source features, so the bmm output is
    shifted and exponentiated in place instead of going through ``1 - cos``, ``* (-1 / eps)`` and ``exp`` copies.
    """
    xs_n = F.normalize(xs.to(cdt), dim=-1, eps=1e-12).mul_(1.0 / eps)
    xt_n = F.normalize(xt.to(cdt), dim=-1, eps=1e-12)
    G = torch.bmm(xs_n, xt_n.transpose(1, 2)).sub_(1.0 / eps)
    return G if log_domain else G.exp_()


def _torch_solve(
    C: Tensor, a: Tensor, b: Tensor, eps: float, log_domain: bool, n_iters: int, tol: float | None, track_grad: bool
) -> tuple[Tensor, Tensor, Tensor, int, Tensor | None]:
    """Returns ``(gibbs, x_s, x_t, iterations_run, err)`` with ``x`` = scalings or log-scalings."""
    return _torch_iterate(_gibbs(C, eps, log_domain), a, b, log_domain, n_iters, tol, track_grad)


def _torch_iterate(
    G: Tensor, a: Tensor, b: Tensor, log_domain: bool, n_iters: int, tol: float | None, track_grad: bool
) -> tuple[Tensor, Tensor, Tensor, int, Tensor | None]:
    """Iterations on a built kernel ``G`` (``K`` or ``S``); returns ``(G, x_s, x_t, iterations_run, err)``."""
    ma, mb = (_safe_log(a), _safe_log(b)) if log_domain else (a, b)
    if log_domain or track_grad:
        loop = _log_loop if log_domain else _scaling_loop
        xs_, xt_, n_run, err = loop(G, ma, mb, n_iters, tol, track_grad)
        return G, xs_, xt_, n_run, err
    B = G.shape[0]
    small = G[0].numel() * G.element_size() <= _CACHE_BYTES
    if tol is None and B > 1 and small and torch.get_num_threads() == 1:
        # single-threaded, one batch element at a time keeps its kernel in the core's L2 cache for all iterations
        # (2-3x faster than streaming all B kernels from L3 every half-iteration). Not with several threads: B
        # times more, smaller parallel regions, and each one stalls for a scheduler tick when another process
        # holds a core (measured 10-100x slowdowns on a shared 2-core machine). Not with tol, whose stopping rule
        # couples the batch. (The log domain is bound by exp(), not by memory traffic, and always runs batched.)
        outs = [_scaling_loop(G[i : i + 1], ma[i : i + 1], mb[i : i + 1], n_iters, None, False) for i in range(B)]
        return G, torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), n_iters, None
    xs_, xt_, n_run, err = _scaling_loop(G, ma, mb, n_iters, tol, False)
    return G, xs_, xt_, n_run, err


def _check_overflow(x_s: Tensor, x_t: Tensor, log_domain: bool) -> None:
    if log_domain:
        bad = torch.isnan(x_s).any() | torch.isnan(x_t).any() | (x_s == math.inf).any() | (x_t == math.inf).any()
        if bool(bad):
            raise RuntimeError("log-domain Sinkhorn produced NaN/+inf potentials; check the cost and eps")
        return
    if not bool(torch.isfinite(x_s).all() & torch.isfinite(x_t).all()):
        raise RuntimeError(
            "scaling-domain Sinkhorn overflowed/underflowed (max|C|/eps too large for the dtype); use domain='log' "
            "or 'auto'"
        )


# ---------------------------------------------------------------------------------------------------------------
# autograd wrappers
# ---------------------------------------------------------------------------------------------------------------


def _cg_solve(matvec: Callable[[Tensor], Tensor], rhs: Tensor, diag: Tensor, rtol: float, max_iter: int) -> Tensor:
    """Batched Jacobi-preconditioned conjugate gradients on (B, n) right-hand sides (SPD operator)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    rhs_norm = rhs.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rhs.dtype).tiny)
    for _ in range(max_iter):
        if bool((r.norm(dim=1, keepdim=True) <= rtol * rhs_norm).all()):
            return x
        ap = matvec(p)
        pap = (p * ap).sum(1, keepdim=True)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        z = r / diag
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(torch.finfo(rhs.dtype).tiny)) * p
        rz = rz_new
    res = (r.norm(dim=1, keepdim=True) / rhs_norm).max().item()
    if res > rtol:
        warnings.warn(
            f"implicit Sinkhorn backward: CG stopped after {max_iter} steps at relative residual {res:.2e}",
            RuntimeWarning,
            stacklevel=3,
        )
    return x


def _implicit_adjoint(
    P: Tensor, support_s: Tensor, support_t: Tensor, g_s: Tensor, g_t: Tensor, solver: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Solve ``[[diag(r), P], [P^T, diag(c)]] [x; y] = [g_s; g_t]`` in the gauge-free subspace.

    Args:
        P: (B, N, M) plan at the fixed point (zero rows/columns on zero-mass tokens).
        support_s, support_t: (B, N), (B, M) bool, tokens with positive mass (the system lives on them).
        g_s, g_t: (B, N), (B, M) incoming gradients w.r.t. ``log u`` and ``log v``.
        solver: ``"dense"``, ``"cg"`` or ``"auto"`` (dense when ``min(N, M) <= _IMPLICIT_DENSE_MAX``).

    Returns:
        ``(x, y)`` of shapes (B, N), (B, M), zero on unsupported tokens.
    """
    B, N, M = P.shape
    if N > M:  # eliminate the larger side: the Schur system has size min(N, M)
        y, x = _implicit_adjoint(P.transpose(1, 2), support_t, support_s, g_t, g_s, solver)
        return x, y
    if solver == "auto":
        solver = "dense" if N <= _IMPLICIT_DENSE_MAX else "cg"
    work = torch.float64 if solver == "dense" else P.dtype
    P = P.to(work)
    fs, ft = support_s.to(work), support_t.to(work)
    g_s = torch.where(support_s, g_s.to(work), 0.0)
    g_t = torch.where(support_t, g_t.to(work), 0.0)
    # project out the gauge direction (1, -1): the system is consistent only for gradients orthogonal to it
    shift = (g_s.sum(1, keepdim=True) - g_t.sum(1, keepdim=True)) / (fs.sum(1, keepdim=True) + ft.sum(1, keepdim=True))
    g_s = g_s - shift * fs
    g_t = g_t + shift * ft
    r = torch.where(support_s, P.sum(2), 1.0)
    c = torch.where(support_t, P.sum(1), 1.0)
    rhs = g_s - torch.bmm(P, (g_t / c).unsqueeze(2)).squeeze(2)
    # gamma 1 1^T (on supported rows) removes the null vector 1 of the Schur complement with eigenvalue ~ mean(r)
    gamma = ((r * fs).sum(1, keepdim=True) / fs.sum(1, keepdim=True) ** 2).unsqueeze(2)
    if solver == "dense":
        Pc = P / c.unsqueeze(1)
        A = torch.diag_embed(r) - torch.bmm(Pc, P.transpose(1, 2)) + gamma * fs.unsqueeze(2) * fs.unsqueeze(1)
        x = torch.linalg.solve(A, rhs)
    elif solver == "cg":
        gam = gamma.squeeze(2)

        def matvec(z: Tensor) -> Tensor:
            pt = torch.bmm(z.unsqueeze(1), P).squeeze(1) / c
            return (
                r * z
                - torch.bmm(pt.unsqueeze(1), P.transpose(1, 2)).squeeze(1)
                + gam * fs * (fs * z).sum(1, keepdim=True)
            )

        diag = r - (P * P / c.unsqueeze(1)).sum(2) + gam * fs
        rtol = 1e-10 if work == torch.float64 else 1e-6
        x = _cg_solve(matvec, rhs, diag.clamp_min(torch.finfo(work).tiny), rtol, max(200, N))
    else:
        raise ValueError(f"solver must be 'auto', 'dense' or 'cg', got {solver!r}")
    x = x * fs
    y = (g_t - torch.bmm(x.unsqueeze(1), P).squeeze(1)) / c * ft
    return x, y


class _ImplicitSinkhorn(torch.autograd.Function):
    """(C, a, b) -> (log u, log v) at the fixed point given by the forward solve; implicit-function backward."""

    @staticmethod
    def forward(ctx, C: Tensor, a: Tensor, b: Tensor, lu: Tensor, lv: Tensor, eps: float):
        ctx.save_for_backward(C, a, b, lu, lv)
        ctx.eps = eps
        return lu.clone(), lv.clone()

    @staticmethod
    def backward(ctx, g_u: Tensor, g_v: Tensor):
        C, a, b, lu, lv = ctx.saved_tensors
        eps = ctx.eps
        if g_u is None:
            g_u = torch.zeros_like(lu)
        if g_v is None:
            g_v = torch.zeros_like(lv)
        P = torch.exp(C * (-1.0 / eps) + lu.unsqueeze(2) + lv.unsqueeze(1))
        x, y = _implicit_adjoint(P, a > 0, b > 0, g_u, g_v)
        gC = P * (x.to(P.dtype).unsqueeze(2) + y.to(P.dtype).unsqueeze(1)) * (1.0 / eps)
        return (
            gC.to(C.dtype) if ctx.needs_input_grad[0] else None,
            x.to(a.dtype) if ctx.needs_input_grad[1] else None,
            y.to(b.dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


class _TritonUnrolled(torch.autograd.Function):
    """Forward values from the Triton loop; backward re-runs the PyTorch unrolled iterations and differentiates them."""

    @staticmethod
    def forward(ctx, C: Tensor, a: Tensor, b: Tensor, lu: Tensor, lv: Tensor, eps: float, log_domain: bool, n: int):
        ctx.save_for_backward(C, a, b)
        ctx.cfg = (eps, log_domain, n)
        return lu.clone(), lv.clone()

    @staticmethod
    def backward(ctx, g_u: Tensor, g_v: Tensor):
        C, a, b = ctx.saved_tensors
        eps, log_domain, n = ctx.cfg
        with torch.enable_grad():
            Cr = C.detach().requires_grad_(ctx.needs_input_grad[0])
            ar = a.detach().requires_grad_(ctx.needs_input_grad[1])
            br = b.detach().requires_grad_(ctx.needs_input_grad[2])
            _, xs_, xt_, _, _ = _torch_solve(Cr, ar, br, eps, log_domain, n, None, True)
            lu, lv = (xs_, xt_) if log_domain else (_safe_log(xs_), _safe_log(xt_))
            ins = [t for t in (Cr, ar, br) if t.requires_grad]
            outs, gouts = [], []
            for o, g in ((lu, g_u), (lv, g_v)):
                if g is not None and o.requires_grad:
                    outs.append(o)
                    gouts.append(g)
            grads = torch.autograd.grad(outs, ins, gouts, allow_unused=True) if outs and ins else []
        it = iter(grads)
        res = [next(it) if t.requires_grad else None for t in (Cr, ar, br)]
        return (*res, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------------------------


class SinkhornResult:
    """Output of :func:`sinkhorn`. Tensors are in the input dtype; heavy ones are computed on first access.

    Attributes:
        plan: (B, N, M) transport plan ``diag(u) K diag(v)`` (built lazily; the Triton path never needs it). Without
            autograd it is built in the storage of the kernel, and is also what later transports read: treat it
            as read-only.
        log_u: (B, N) log row scaling (``f = eps * log_u``); ``-inf`` on zero-mass tokens.
        log_v: (B, M) log column scaling (``g = eps * log_v``); ``-inf`` on zero-mass tokens.
        n_iters: iterations actually run (fewer than requested after an early stop with ``tol``).
        marginal_error: (B,) L1 error of the row marginal ``|T 1 - a|_1`` at exit (no gradient).
        domain: ``"scaling"`` or ``"log"``, the form that was used.
        backend: ``"torch"`` or ``"triton"``, the backend that ran the iterations.
        eps: the entropic regularisation.
    """

    def __init__(
        self,
        *,
        gibbs: Tensor,
        x_s: Tensor,
        x_t: Tensor,
        a: Tensor,
        n_iters: int,
        eps: float,
        domain: str,
        backend: str,
        out_dtype: torch.dtype,
        marginal_error: Tensor | None,
        triton_transport: bool,
    ):
        self._gibbs = gibbs
        self._x_s = x_s
        self._x_t = x_t
        self._a = a
        self.n_iters = int(n_iters)
        self.eps = float(eps)
        self.domain = domain
        self.backend = backend
        self._out_dtype = out_dtype
        self._err = marginal_error
        self._triton_transport = triton_transport
        self._plan: Tensor | None = None
        self._plan_compute: Tensor | None = None

    @property
    def _log(self) -> bool:
        return self.domain == "log"

    @property
    def log_u(self) -> Tensor:
        x = self._x_s if self._log else _safe_log(self._x_s)
        return x.to(self._out_dtype)

    @property
    def log_v(self) -> Tensor:
        x = self._x_t if self._log else _safe_log(self._x_t)
        return x.to(self._out_dtype)

    def _plan_c(self) -> Tensor:
        if self._plan_compute is None:
            G, xs_, xt_ = self._gibbs, self._x_s.unsqueeze(2), self._x_t.unsqueeze(1)
            graph = torch.is_grad_enabled() and any(t.requires_grad for t in (G, xs_, xt_))
            if graph:
                P = torch.exp(G + xs_ + xt_) if self._log else xs_ * G * xt_
            else:
                # Without a graph the plan overwrites the kernel, which this result owns and no longer needs (the
                # transports and the marginal error then use the plan): no second (B, N, M) allocation, whose fresh
                # pages cost about as much as two of the iterations on CPU.
                P = G.add_(xs_).add_(xt_).exp_() if self._log else G.mul_(xs_).mul_(xt_)
                self._gibbs = None
            self._plan_compute = P
        return self._plan_compute

    @property
    def plan(self) -> Tensor:
        if self._plan is None:
            self._plan = self._plan_c().to(self._out_dtype)
        return self._plan

    @property
    def marginal_error(self) -> Tensor:
        if self._err is None:
            with torch.no_grad():
                xs_, xt_ = self._x_s.detach(), self._x_t.detach()
                G = None if self._gibbs is None else self._gibbs.detach()
                if G is None:
                    row = self._plan_compute.detach().sum(2)
                elif self._triton_transport:
                    a = self._a.detach()
                    _, red = _tri.half_step(G, xt_, (_safe_log(a) if self._log else a).contiguous(), self._log)
                    row = torch.exp(xs_ + red) if self._log else xs_ * red
                elif self._log:
                    row = torch.exp(xs_ + _lse_rows(G, xt_))
                else:
                    row = xs_ * torch.bmm(xt_.unsqueeze(1), G.transpose(1, 2)).squeeze(1)
                self._err = _row_error(row, self._a.detach())
        return self._err.to(self._out_dtype)

    def _check_values(self, name: str, values: Tensor, n: int) -> Tensor:
        values = _check_tensor(name, values, 3)
        _compute_dtype(values.dtype, name)
        B = self._x_s.shape[0]
        if values.shape[0] != B or values.shape[1] != n:
            raise ValueError(f"{name} must have shape ({B}, {n}, Dv), got {tuple(values.shape)}")
        if values.device != self._x_s.device:
            raise ValueError(f"{name} must be on {self._x_s.device}, got {values.device}")
        return values

    def _transport(self, values: Tensor, transpose: bool) -> Tensor:
        out_dtype = torch.promote_types(self._out_dtype, values.dtype)
        cdt = self._x_s.dtype
        if self._gibbs is None:  # the plan has replaced the kernel
            P, V = self._plan_compute, values.to(cdt)
            return (torch.bmm(P.transpose(1, 2), V) if transpose else torch.bmm(P, V)).to(out_dtype)
        if self._triton_transport:
            if transpose:
                out = _tri.transport(self._gibbs, self._x_t, self._x_s, values, self._log, transpose=True)
            else:
                out = _tri.transport(self._gibbs, self._x_s, self._x_t, values, self._log)
            return out.to(out_dtype)
        V = values.to(cdt)
        if self._log:
            P = self._plan_c()
            out = torch.bmm(P.transpose(1, 2), V) if transpose else torch.bmm(P, V)
        else:
            u, v, K = self._x_s, self._x_t, self._gibbs
            if transpose:
                out = v.unsqueeze(2) * torch.bmm(K.transpose(1, 2), u.unsqueeze(2) * V)
            else:
                out = u.unsqueeze(2) * torch.bmm(K, v.unsqueeze(2) * V)
        return out.to(out_dtype)

    def transport(self, values_t: Tensor) -> Tensor:
        """Transport of target values onto the source tokens: (B, M, Dv) -> (B, N, Dv) = ``T @ values_t``."""
        return self._transport(self._check_values("values_t", values_t, self._x_t.shape[1]), transpose=False)

    def transport_t(self, values_s: Tensor) -> Tensor:
        """Transport of source values onto the target tokens: (B, N, Du) -> (B, M, Du) = ``T^T @ values_s``."""
        return self._transport(self._check_values("values_s", values_s, self._x_s.shape[1]), transpose=True)

    def __repr__(self) -> str:
        B, N = self._x_s.shape
        M = self._x_t.shape[1]
        return (
            f"SinkhornResult(B={B}, N={N}, M={M}, n_iters={self.n_iters}, eps={self.eps}, domain={self.domain!r}, "
            f"backend={self.backend!r})"
        )


# ---------------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------------


def _select_backend(backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "torch"
    if backend == "triton":
        _tri.check_triton_runnable(device)
        return "triton"
    return "triton" if device.type == "cuda" and _tri.triton_available() else "torch"


def sinkhorn(
    cost: Tensor | None = None,
    *,
    xs: Tensor | None = None,
    xt: Tensor | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    eps: float = 0.1,
    n_iters: int = 50,
    tol: float | None = None,
    mask_s: Tensor | None = None,
    mask_t: Tensor | None = None,
    domain: str = "auto",
    grad: str = "unrolled",
    backend: str = "auto",
) -> SinkhornResult:
    """Batched entropic OT by Sinkhorn iterations (row first: ``u = a / (K v)``, then ``v = b / (K^T u)``, ``v = 1``
    initially). See the module docstring for the conventions (domains, masks, dtypes, autograd, backends).

    Args:
        cost: (B, N, M) cost matrix; or give ``xs`` and ``xt`` instead.
        xs: (B, N, D) source token features (cost ``1 - cos``).
        xt: (B, M, D) target token features.
        a: (B, N) or (N,) source marginal; default uniform over the valid source tokens.
        b: (B, M) or (M,) target marginal; default uniform over the valid target tokens.
        eps: entropic regularisation (> 0).
        n_iters: maximum number of iterations (>= 1).
        tol: optional early stop on the L1 row-marginal error.
        mask_s: (B, N) bool, True for real source tokens.
        mask_t: (B, M) bool, True for real target tokens.
        domain: ``"auto"``, ``"scaling"`` or ``"log"``.
        grad: ``"unrolled"`` or ``"implicit"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        :class:`SinkhornResult` with ``plan`` (B, N, M), ``log_u`` (B, N), ``log_v`` (B, M), ``n_iters``,
        ``marginal_error`` (B,), ``transport`` and ``transport_t``.

    Raises:
        ValueError: bad shapes, dtypes, devices, NaN/Inf inputs, negative or zero-mass marginals, unequal masses,
            empty masks, or an unknown option; the message names the argument.
        RuntimeError: Triton forced but not runnable, or a forced scaling domain that overflowed.
    """
    _check_choice("domain", domain, _DOMAINS)
    _check_choice("grad", grad, _GRADS)
    _check_choice("backend", backend, _BACKENDS)
    eps, n_iters, tol = _check_scalars(eps, n_iters, tol)
    if cost is not None and (xs is not None or xt is not None):
        raise ValueError("give either cost or (xs, xt), not both")
    if cost is None:
        if xs is None or xt is None:
            raise ValueError("give either cost or both xs and xt")
        xs, xt = _check_features(xs, xt)
        B, N, _ = xs.shape
        M = xt.shape[1]
        device = xs.device
        out_dtype = torch.promote_types(xs.dtype, xt.dtype)
        cdt = _compute_dtype(out_dtype, "xs")
    else:
        cost = _check_tensor("cost", cost, 3)
        B, N, M = cost.shape
        if N == 0 or M == 0:
            raise ValueError(f"cost must be non-empty, got shape {tuple(cost.shape)}")
        device = cost.device
        out_dtype = cost.dtype
        cdt = _compute_dtype(out_dtype, "cost")
    mask_s = _check_mask("mask_s", mask_s, B, N, device)
    mask_t = _check_mask("mask_t", mask_t, B, M, device)
    a_c = _prepare_marginal("a", a, mask_s, "mask_s", B, N, cdt, device)
    b_c = _prepare_marginal("b", b, mask_t, "mask_t", B, M, cdt, device)
    with torch.no_grad():
        ma, mb = a_c.sum(1).double(), b_c.sum(1).double()
        off = ((ma - mb).abs() > _MASS_RTOL * torch.maximum(ma, mb)).nonzero().flatten().tolist()
    if off:
        raise ValueError(f"a and b must have equal total mass; they differ in batch element(s) {off}")
    be = _select_backend(backend, device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (cost, xs, xt, a, b))
    support_s, support_t = a_c.detach() > 0, b_c.detach() > 0
    has_zero_mass = not bool(support_s.all() & support_t.all())

    C: Tensor | None = None
    if cost is None:
        zero = torch.zeros((), dtype=xs.dtype, device=device)
        xs_z = torch.where(support_s.unsqueeze(2), xs, zero) if has_zero_mass else xs
        xt_z = torch.where(support_t.unsqueeze(2), xt, zero.to(xt.dtype)) if has_zero_mass else xt
        if _finite_absmax(xs_z.detach()) is None:
            raise ValueError("xs contains NaN or Inf on tokens with positive mass")
        if _finite_absmax(xt_z.detach()) is None:
            raise ValueError("xt contains NaN or Inf on tokens with positive mass")
        cmax = 2.0  # 1 - cos lies in [0, 2]: a data-independent domain decision for features
        if needs_grad:
            # padding was zeroed before the cost so NaN features cannot reach gradients of real tokens
            C = _cosine_cost_compute(xs_z, xt_z, cdt)
    else:
        C = cost.to(cdt)
        support = support_s.unsqueeze(2) & support_t.unsqueeze(1)
        if has_zero_mass:
            C = torch.where(support, C, torch.zeros((), dtype=cdt, device=device))
        cmax = _finite_absmax(C.detach())
        if cmax is None:
            raise ValueError("cost contains NaN or Inf (on entries between tokens with positive mass)")
    if domain == "auto":
        domain = "scaling" if cmax / eps <= _scaling_limit(cdt) else "log"
    log_domain = domain == "log"

    if be == "torch":
        if needs_grad and grad == "unrolled":
            G, x_s, x_t, n_run, err = _torch_solve(C, a_c, b_c, eps, log_domain, n_iters, tol, True)
            _check_overflow(x_s.detach(), x_t.detach(), log_domain)
        else:
            with torch.no_grad():
                if C is None:
                    G0 = _gibbs_from_features_nograd(xs_z, xt_z, cdt, eps, log_domain)
                else:
                    G0 = _gibbs(C.detach(), eps, log_domain)
                G, x_s, x_t, n_run, err = _torch_iterate(G0, a_c, b_c, log_domain, n_iters, tol, False)
            _check_overflow(x_s, x_t, log_domain)
    else:
        with torch.no_grad():
            if C is None:
                G = _tri.gibbs_from_features(xs, xt, support_s, support_t, eps, log_domain, cdt)
            else:
                G = _gibbs(C.detach(), eps, log_domain).contiguous()
            if log_domain:
                m_s, m_t = _safe_log(a_c.detach()).contiguous(), _safe_log(b_c.detach()).contiguous()
                init = torch.where(support_t, 0.0, -math.inf).to(cdt)
            else:
                m_s, m_t = a_c.detach().contiguous(), b_c.detach().contiguous()
                init = support_t.to(cdt)
            x_s, x_t, n_run, err = _tri.sinkhorn_loop(G, m_s, m_t, init, n_iters, tol, log_domain)
        _check_overflow(x_s, x_t, log_domain)

    if needs_grad and (be == "triton" or grad == "implicit"):
        lu = x_s if log_domain else _safe_log(x_s)
        lv = x_t if log_domain else _safe_log(x_t)
        if grad == "implicit":
            lu, lv = _ImplicitSinkhorn.apply(C, a_c, b_c, lu, lv, eps)
        else:
            lu, lv = _TritonUnrolled.apply(C, a_c, b_c, lu, lv, eps, log_domain, n_run)
        G = _gibbs(C, eps, log_domain)
        x_s, x_t = (lu, lv) if log_domain else (torch.exp(lu), torch.exp(lv))

    return SinkhornResult(
        gibbs=G,
        x_s=x_s,
        x_t=x_t,
        a=a_c,
        n_iters=n_run,
        eps=eps,
        domain=domain,
        backend=be,
        out_dtype=out_dtype,
        marginal_error=err,
        triton_transport=be == "triton" and not needs_grad,
    )


def sinkhorn_transport(
    xs: Tensor,
    xt: Tensor,
    values_s: Tensor | None = None,
    values_t: Tensor | None = None,
    *,
    eps: float = 0.1,
    n_iters: int = 50,
    tol: float | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    mask_s: Tensor | None = None,
    mask_t: Tensor | None = None,
    domain: str = "auto",
    backend: str = "auto",
    grad: str = "unrolled",
) -> tuple[Tensor, Tensor]:
    """Barycentric transports of BOTM's cross-transport attention, with the cost ``1 - cos(xs, xt)``.

    Args:
        xs: (B, N, D) source features; xt: (B, M, D) target features.
        values_s: (B, N, Du) values on the source tokens (default ``xs``).
        values_t: (B, M, Dv) values on the target tokens (default ``xt``).
        other arguments: as :func:`sinkhorn`.

    Returns:
        ``(T @ values_t, T^T @ values_s)`` of shapes (B, N, Dv) and (B, M, Du). On the Triton path (no gradient
        needed) the plan is never written: the kernel ``K`` is built from the features and the transports are
        evaluated tile by tile.
    """
    res = sinkhorn(
        xs=xs,
        xt=xt,
        a=a,
        b=b,
        eps=eps,
        n_iters=n_iters,
        tol=tol,
        mask_s=mask_s,
        mask_t=mask_t,
        domain=domain,
        grad=grad,
        backend=backend,
    )
    return res.transport(xt if values_t is None else values_t), res.transport_t(xs if values_s is None else values_s)
