"""Tests of common.ops.sinkhorn (PyTorch path) against POT in float64, float64 math and autograd checks."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from torch.autograd import gradcheck

from common.ops import sinkhorn as sk
from common.ops.sinkhorn import cosine_cost, sinkhorn, sinkhorn_transport

DOMAINS = ["scaling", "log"]


def _features(B=3, N=7, M=5, D=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g, dtype=dtype), torch.randn(B, M, D, generator=g, dtype=dtype)


def _simplex(B, n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.2
    return w / w.sum(1, keepdim=True)


def _cos_ref(xs: np.ndarray, xt: np.ndarray) -> np.ndarray:
    out = np.empty((xs.shape[0], xs.shape[1], xt.shape[1]))
    for b in range(xs.shape[0]):
        for i in range(xs.shape[1]):
            for j in range(xt.shape[1]):
                x, y = xs[b, i], xt[b, j]
                out[b, i, j] = 1.0 - float(x @ y) / (np.linalg.norm(x) * np.linalg.norm(y))
    return out


# ------------------------------------------------------------------------------------------------ cost


def test_cosine_cost_matches_float64_loop():
    xs, xt = _features()
    C = cosine_cost(xs, xt)
    assert C.shape == (3, 7, 5) and C.dtype == torch.float64
    np.testing.assert_allclose(C.numpy(), _cos_ref(xs.numpy(), xt.numpy()), rtol=0, atol=1e-13)


def test_cosine_cost_zero_vector_and_half_dtype():
    xs, xt = _features(dtype=torch.float32)
    xs[0, 2] = 0.0
    C = cosine_cost(xs, xt)
    assert torch.all(C[0, 2] == 1.0)
    for dt in (torch.float16, torch.bfloat16):
        Ch = cosine_cost(xs.to(dt), xt.to(dt))
        assert Ch.dtype == dt
        ref = cosine_cost(xs.to(dt).float(), xt.to(dt).float()).to(dt)
        assert torch.equal(Ch, ref)


# ------------------------------------------------------------------------------------------------ vs POT


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("n_iters", [1, 7])
@pytest.mark.parametrize("per_element", [True, False])
def test_fixed_iterations_match_pot_batch(domain, n_iters, per_element, monkeypatch):
    # single-threaded, small kernels are iterated one batch element at a time; otherwise the batched loop runs
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1 if per_element else 2)
    batch_sizes = []
    loop = sk._scaling_loop

    def spy(K, *args):
        batch_sizes.append(K.shape[0])
        return loop(K, *args)

    monkeypatch.setattr(sk, "_scaling_loop", spy)
    xs, xt = _features()
    C = cosine_cost(xs, xt)
    a, b = _simplex(3, 7, 1), _simplex(3, 5, 2)
    res = sinkhorn(C, a=a, b=b, eps=0.1, n_iters=n_iters, domain=domain)
    if domain == "scaling":
        assert batch_sizes == ([1, 1, 1] if per_element else [3])
    method = "log_sinkhorn" if domain == "log" else "sinkhorn"
    ref = ot.batch.solve_batch(
        C.numpy(), reg=0.1, a=a.numpy(), b=b.numpy(), max_iter=n_iters, tol=0.0, method=method, grad="detach"
    )
    assert res.n_iters == n_iters and res.domain == domain
    np.testing.assert_allclose(res.plan.numpy(), np.asarray(ref.plan), rtol=1e-10, atol=1e-15)
    pu, pv = (np.asarray(p) for p in ref.potentials)
    if domain == "scaling":  # ot.batch's scaling solver returns u, v; the log solver log u, log v
        pu, pv = np.log(pu), np.log(pv)
    np.testing.assert_allclose(res.log_u.numpy(), pu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.log_v.numpy(), pv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("domain", DOMAINS)
def test_fixed_iterations_match_pot_per_pair_on_transposed_problem(domain):
    # POT's per-pair solvers update the columns first (and start from u = 1/n); on the transposed problem
    # (b, a, C^T) their iterates are exactly our row-first ones: plan^T, and v_pot = u M, u_pot = v / M (scaling)
    xs, xt = _features(seed=3)
    C = cosine_cost(xs, xt)
    a, b = _simplex(3, 7, 4), _simplex(3, 5, 5)
    res = sinkhorn(C, a=a, b=b, eps=0.2, n_iters=9, domain=domain)
    solver = ot.bregman.sinkhorn_log if domain == "log" else ot.sinkhorn
    for i in range(3):
        P, log = solver(
            b[i].numpy(), a[i].numpy(), C[i].numpy().T, 0.2, numItermax=9, stopThr=0.0, log=True, warn=False
        )
        np.testing.assert_allclose(res.plan[i].numpy(), P.T, rtol=1e-10, atol=1e-15)
        if domain == "log":
            np.testing.assert_allclose(res.log_u[i].numpy(), log["log_v"], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(res.log_v[i].numpy(), log["log_u"], rtol=1e-10, atol=1e-12)
        else:
            np.testing.assert_allclose(res.log_u[i].numpy(), np.log(log["v"]) - math.log(5), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(res.log_v[i].numpy(), np.log(log["u"]) + math.log(5), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("domain", DOMAINS)
def test_converged_plan_matches_pot(domain):
    xs, xt = _features(B=2, N=9, M=6, seed=7)
    C = cosine_cost(xs, xt)
    a, b = _simplex(2, 9, 8), _simplex(2, 6, 9)
    res = sinkhorn(C, a=a, b=b, eps=0.1, n_iters=5000, tol=1e-13, domain=domain)
    assert res.n_iters < 5000
    assert float(res.marginal_error.max()) < 1e-13
    for i in range(2):
        P = ot.sinkhorn(a[i].numpy(), b[i].numpy(), C[i].numpy(), 0.1, numItermax=100000, stopThr=1e-15)
        np.testing.assert_allclose(res.plan[i].numpy(), P, rtol=1e-8, atol=1e-14)


def test_small_eps_log_domain_matches_pot_sinkhorn_log():
    xs, xt = _features(B=2, N=6, M=6, seed=11)
    C = cosine_cost(xs, xt)
    eps = 0.004  # max C / eps ~ 500 > 354: auto must choose the log domain even in float64
    res = sinkhorn(C, eps=eps, n_iters=40)
    assert res.domain == "log"
    w = np.full(6, 1 / 6)
    for i in range(2):
        P = ot.bregman.sinkhorn_log(w, w, C[i].numpy().T, eps, numItermax=40, stopThr=0.0, warn=False)
        np.testing.assert_allclose(res.plan[i].numpy(), P.T, rtol=1e-9, atol=1e-300)
    # every entry of K underflows to 0 in a forced scaling domain: an error, not NaNs or a silent switch
    far = 1.5 + 0.5 * torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="scaling-domain"):
        sinkhorn(far, eps=0.001, n_iters=5, domain="scaling")
    res = sinkhorn(far, eps=0.001, n_iters=5)
    P = ot.bregman.sinkhorn_log(w, w, far[0].numpy().T, 0.001, numItermax=5, stopThr=0.0, warn=False)
    np.testing.assert_allclose(res.plan[0].numpy(), P.T, rtol=1e-9, atol=1e-300)


# ------------------------------------------------------------------------------------------------ marginals, tol


@pytest.mark.parametrize("domain", DOMAINS)
def test_marginal_constraints_and_reported_error(domain):
    xs, xt = _features(seed=5)
    a, b = _simplex(3, 7, 6), _simplex(3, 5, 7)
    res = sinkhorn(xs=xs, xt=xt, a=a, b=b, eps=0.1, n_iters=4, domain=domain)
    P = res.plan
    # the state is after a column update: column marginal exact, the row marginal carries the reported error
    np.testing.assert_allclose(P.sum(1).numpy(), b.numpy(), rtol=1e-12, atol=1e-15)
    err = (P.sum(2) - a).abs().sum(1)
    assert float(err.min()) > 1e-8  # 4 iterations are not converged: the check below is not vacuous
    np.testing.assert_allclose(res.marginal_error.numpy(), err.numpy(), rtol=1e-9, atol=1e-15)
    assert torch.all(P >= 0)


@pytest.mark.parametrize("domain", DOMAINS)
def test_tol_stops_at_first_iteration_below_tol(domain):
    xs, xt = _features(seed=9)
    tol = 1e-6
    res = sinkhorn(xs=xs, xt=xt, eps=0.1, n_iters=1000, tol=tol, domain=domain)
    k = res.n_iters
    assert 1 < k < 1000
    assert float(res.marginal_error.max()) < tol
    before = sinkhorn(xs=xs, xt=xt, eps=0.1, n_iters=k - 1, domain=domain)
    same = sinkhorn(xs=xs, xt=xt, eps=0.1, n_iters=k, domain=domain)
    assert float(before.marginal_error.max()) >= tol
    torch.testing.assert_close(res.plan, same.plan, rtol=0, atol=0)
    torch.testing.assert_close(res.marginal_error, same.marginal_error, rtol=1e-9, atol=1e-15)


def test_domains_agree_and_auto_choice():
    xs, xt = _features(dtype=torch.float32)
    r_auto = sinkhorn(xs=xs, xt=xt, eps=0.1, n_iters=20)
    r_log = sinkhorn(xs=xs, xt=xt, eps=0.1, n_iters=20, domain="log")
    assert r_auto.domain == "scaling" and r_auto.backend == "torch"
    torch.testing.assert_close(r_auto.plan, r_log.plan, rtol=1e-4, atol=1e-7)
    # float32: 2 / eps above 43.7 switches to the log domain for features, whatever the data
    assert sinkhorn(xs=xs, xt=xt, eps=0.04, n_iters=2).domain == "log"
    C = cosine_cost(xs, xt)
    assert sinkhorn(C * 3, eps=0.1, n_iters=2).domain == "log"


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("domain", DOMAINS)
def test_masks_equal_cropped_problem(domain):
    xs, xt = _features(B=2, N=7, M=6, seed=13)
    ns, nt = [7, 4], [6, 3]
    mask_s = torch.arange(7)[None] < torch.tensor(ns)[:, None]
    mask_t = torch.arange(6)[None] < torch.tensor(nt)[:, None]
    xs_p, xt_p = xs.clone(), xt.clone()
    xs_p[~mask_s] = float("nan")  # padding content must never be read
    xt_p[~mask_t] = float("inf")
    res = sinkhorn(xs=xs_p, xt=xt_p, mask_s=mask_s, mask_t=mask_t, eps=0.1, n_iters=6, domain=domain)
    V = torch.randn(2, 6, 3, dtype=torch.float64)
    TV = res.transport(V)
    for i in range(2):
        ref = sinkhorn(xs=xs[i : i + 1, : ns[i]], xt=xt[i : i + 1, : nt[i]], eps=0.1, n_iters=6, domain=domain)
        torch.testing.assert_close(res.plan[i, : ns[i], : nt[i]], ref.plan[0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(res.log_u[i, : ns[i]], ref.log_u[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.marginal_error[i], ref.marginal_error[0], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(TV[i, : ns[i]], ref.transport(V[i : i + 1, : nt[i]])[0], rtol=1e-12, atol=1e-14)
    assert torch.all(res.plan[~mask_s] == 0) and torch.all(res.plan.transpose(1, 2)[~mask_t] == 0)
    assert torch.all(TV[~mask_s] == 0)
    assert torch.all(res.log_u[~mask_s] == -math.inf) and torch.all(res.log_v[~mask_t] == -math.inf)


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_masked_gradients_are_finite_and_zero_on_padding(grad):
    xs, xt = _features(B=2, N=6, M=5, seed=17)
    mask_s = torch.ones(2, 6, dtype=torch.bool)
    mask_s[1, 4:] = False
    xs = xs.clone()
    xs[~mask_s] = float("nan")
    xs.requires_grad_(True)
    xt = xt.clone().requires_grad_(True)
    res = sinkhorn(xs=xs, xt=xt, mask_s=mask_s, eps=0.2, n_iters=200, tol=1e-12, grad=grad)
    (res.transport(xt) ** 2).sum().backward()
    assert torch.isfinite(xs.grad).all() and torch.isfinite(xt.grad).all()
    assert torch.all(xs.grad[~mask_s] == 0)
    assert float(xs.grad[mask_s].abs().max()) > 0


# ------------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("domain", DOMAINS)
def test_half_inputs_compute_in_float32(dtype, domain):
    xs, xt = _features(B=2, N=8, M=6, D=16, dtype=torch.float32, seed=19)
    xs_h, xt_h = xs.to(dtype), xt.to(dtype)
    res = sinkhorn(xs=xs_h, xt=xt_h, eps=0.1, n_iters=10, domain=domain)
    ref = sinkhorn(xs=xs_h.float(), xt=xt_h.float(), eps=0.1, n_iters=10, domain=domain)
    assert res.plan.dtype == dtype and res.log_u.dtype == dtype and res.marginal_error.dtype == dtype
    assert torch.equal(res.plan, ref.plan.to(dtype))
    assert torch.equal(res.log_v, ref.log_v.to(dtype))
    out = res.transport(xt_h)
    assert out.dtype == dtype
    assert torch.equal(out, ref.transport(xt_h.float()).to(dtype))
    Cres = sinkhorn(cosine_cost(xs_h, xt_h), eps=0.1, n_iters=10, domain=domain)
    assert Cres.plan.dtype == dtype


# ------------------------------------------------------------------------------------------------ transport


@pytest.mark.parametrize("domain", DOMAINS)
def test_transport_equals_plan_products(domain):
    xs, xt = _features(seed=23)
    res = sinkhorn(xs=xs, xt=xt, eps=0.1, n_iters=8, domain=domain)
    V = torch.randn(3, 5, 4, dtype=torch.float64)
    U = torch.randn(3, 7, 2, dtype=torch.float64)
    TV, TU = res.transport(V), res.transport_t(U)  # from the kernel
    err = res.marginal_error
    P = res.plan.clone()  # without autograd the plan replaces the kernel: later calls read the plan
    torch.testing.assert_close(TV, P @ V, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(TU, P.transpose(1, 2) @ U, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(res.transport(V), TV, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(res.transport_t(U), TU, rtol=1e-12, atol=1e-15)
    res._err = None
    torch.testing.assert_close(res.marginal_error, err, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(res.plan, P, rtol=0, atol=0)
    ts, tt = sinkhorn_transport(xs, xt, eps=0.1, n_iters=8, domain=domain)
    torch.testing.assert_close(ts, res.plan @ xt, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tt, res.plan.transpose(1, 2) @ xs, rtol=1e-12, atol=1e-15)
    # cost given directly gives the same answer as the features
    res_c = sinkhorn(cosine_cost(xs, xt), eps=0.1, n_iters=8, domain=domain)
    torch.testing.assert_close(res_c.plan, res.plan, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------ errors


def _err_cases():
    xs, xt = _features(dtype=torch.float32)
    C = cosine_cost(xs, xt)
    bad_cost = C.clone()
    bad_cost[0, 1, 2] = float("nan")
    inf_xs = xs.clone()
    inf_xs[1, 0, 0] = float("inf")
    a0 = torch.full((3, 7), 1 / 7)
    a0[1] = 0
    neg = torch.full((3, 7), 1 / 7)
    neg[0, 0] = -0.1
    empty_mask = torch.ones(3, 5, dtype=torch.bool)
    empty_mask[2] = False
    pad_mass_mask = torch.ones(3, 7, dtype=torch.bool)
    pad_mass_mask[0, 6] = False
    return [
        (dict(cost=bad_cost), "cost"),
        (dict(xs=inf_xs, xt=xt), "xs"),
        (dict(cost=C[:, :, :, None]), "cost"),
        (dict(xs=xs, xt=xt[:2]), "batch"),
        (dict(xs=xs, xt=xt[..., :3]), "feature dimension"),
        (dict(cost=C, xs=xs, xt=xt), "either"),
        (dict(xs=xs), "xs and xt"),
        (dict(cost=C, a=a0), "a has zero total mass"),
        (dict(cost=C, a=neg), "a must be non-negative"),
        (dict(cost=C, b=torch.full((3, 4), 0.25)), "b must have shape"),
        (dict(cost=C, a=torch.full((3, 7), 2 / 7)), "equal total mass"),
        (dict(cost=C, mask_t=empty_mask), "mask_t leaves no valid token"),
        (dict(cost=C, mask_s=pad_mass_mask, a=torch.full((3, 7), 1 / 7)), "a puts positive mass"),
        (dict(cost=C, mask_s=torch.ones(3, 7)), "mask_s must be a bool"),
        (dict(cost=C, eps=0.0), "eps"),
        (dict(cost=C, eps=float("nan")), "eps"),
        (dict(cost=C, n_iters=0), "n_iters"),
        (dict(cost=C, tol=-1.0), "tol"),
        (dict(cost=C, domain="exp"), "domain"),
        (dict(cost=C, grad="adjoint"), "grad"),
        (dict(cost=C, backend="cuda"), "backend"),
        (dict(cost=C.long()), "cost must be a floating"),
    ]


@pytest.mark.parametrize("kwargs,match", _err_cases())
def test_bad_input_raises_value_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(**kwargs)


def test_bad_transport_values_raise():
    xs, xt = _features(dtype=torch.float32)
    res = sinkhorn(xs=xs, xt=xt, n_iters=2)
    with pytest.raises(ValueError, match="values_t"):
        res.transport(torch.randn(3, 7, 2))
    with pytest.raises(ValueError, match="values_s"):
        res.transport_t(torch.randn(3, 5))
    with pytest.raises(ValueError, match="xs"):
        cosine_cost(xs[0], xt)


# ------------------------------------------------------------------------------------------------ autograd


@pytest.mark.parametrize("domain", DOMAINS)
def test_gradcheck_unrolled(domain):
    xs, xt = _features(B=2, N=4, M=3, D=3, seed=29)
    xs.requires_grad_(True)
    xt.requires_grad_(True)
    V = torch.randn(2, 3, 2, dtype=torch.float64)

    def f(xs, xt):
        r = sinkhorn(xs=xs, xt=xt, eps=0.3, n_iters=5, domain=domain)
        return r.plan, r.log_u, r.log_v, r.transport(V)

    assert gradcheck(f, (xs, xt))
    C = cosine_cost(*_features(B=2, N=4, M=3, seed=31)).requires_grad_(True)
    a = _simplex(2, 4, 1).requires_grad_(True)
    b = _simplex(2, 3, 2).requires_grad_(True)

    def g(C, a, b):
        r = sinkhorn(C, a=a, b=b, eps=0.3, n_iters=4, domain=domain)
        return r.plan, r.log_u, r.log_v

    assert gradcheck(g, (C, a, b))


@pytest.mark.parametrize("domain", DOMAINS)
def test_gradcheck_implicit(domain):
    C = cosine_cost(*_features(B=2, N=4, M=3, seed=37)).requires_grad_(True)
    # softmax keeps the perturbed marginals on the simplex, where the converged problem is defined
    al = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    bl = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 3, 2, dtype=torch.float64)

    def f(C, al, bl):
        r = sinkhorn(
            C, a=al.softmax(1), b=bl.softmax(1), eps=0.5, n_iters=500, tol=1e-15, grad="implicit", domain=domain
        )
        return r.plan, r.transport(V), r.log_u[:, :, None] + r.log_v[:, None, :]

    assert gradcheck(f, (C, al, bl))


def test_implicit_matches_unrolled_at_convergence():
    xs, xt = _features(B=2, N=6, M=5, seed=41)
    V = torch.randn(2, 5, 3, dtype=torch.float64)
    grads = {}
    for mode in ("unrolled", "implicit"):
        x1, x2 = xs.clone().requires_grad_(True), xt.clone().requires_grad_(True)
        r = sinkhorn(xs=x1, xt=x2, eps=0.2, n_iters=400, grad=mode)
        (r.transport(V).sin().sum() + (r.plan * r.plan).sum()).backward()
        grads[mode] = (x1.grad, x2.grad)
    for g_u, g_i in zip(grads["unrolled"], grads["implicit"]):
        torch.testing.assert_close(g_i, g_u, rtol=1e-7, atol=1e-10)


def test_implicit_cg_matches_dense_solve():
    C = cosine_cost(*_features(B=2, N=9, M=6, seed=43))
    res = sinkhorn(C, eps=0.1, n_iters=2000, tol=1e-14)
    P = res.plan
    g = torch.Generator().manual_seed(0)
    gs, gt = torch.randn(2, 9, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g, dtype=torch.float64)
    sup_s, sup_t = torch.ones(2, 9, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)
    xd, yd = sk._implicit_adjoint(P, sup_s, sup_t, gs, gt, solver="dense")
    xc, yc = sk._implicit_adjoint(P, sup_s, sup_t, gs, gt, solver="cg")
    torch.testing.assert_close(xc, xd, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(yc, yd, rtol=1e-7, atol=1e-9)
    # the solution satisfies J [x; y] = g after projecting g on the gauge-free subspace
    shift = (gs.sum(1, keepdim=True) - gt.sum(1, keepdim=True)) / 15
    r, c = P.sum(2), P.sum(1)
    torch.testing.assert_close(r * xd + (P @ yd[..., None])[..., 0], gs - shift, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(c * yd + (P.transpose(1, 2) @ xd[..., None])[..., 0], gt + shift, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("domain", DOMAINS)
def test_unrolled_memory_saves_no_plan_sized_tensor_per_iteration(domain):
    # autograd keeps O(iters * B * (N + M)) beyond the kernel: the (B, N, M) tensors saved for backward are the same
    # few storages whatever the number of iterations (the log-sum-exp recomputes its weights in backward)
    C = cosine_cost(*_features(B=2, N=6, M=5, seed=47)).requires_grad_(True)

    def big_saved(n_iters):
        ptrs, count = set(), [0]

        def pack(t):
            if t.numel() == C.numel():
                ptrs.add(t.untyped_storage().data_ptr())
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            r = sinkhorn(C, eps=0.1, n_iters=n_iters, domain=domain)
            _ = (r.log_u, r.log_v)
        return ptrs, count[0]

    few, n_few = big_saved(3)
    many, n_many = big_saved(30)
    assert n_many > 5 * n_few / 2  # the hook saw the per-iteration vectors
    assert len(many) == len(few) <= 2
