"""Triton kernels of common.ops.sinkhorn under TRITON_INTERPRET=1 against the PyTorch path (and POT in float64)."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from common.ops import _sinkhorn_triton as tri
from common.ops import sinkhorn as sk
from common.ops.sinkhorn import cosine_cost, sinkhorn, sinkhorn_transport

pytestmark = pytest.mark.triton

DOMAINS = ["scaling", "log"]


def _features(B=2, N=21, M=13, D=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g, dtype=dtype), torch.randn(B, M, D, generator=g, dtype=dtype)


def _masks(B, N, M, ns, nt):
    return torch.arange(N)[None] < torch.tensor(ns)[:, None], torch.arange(M)[None] < torch.tensor(nt)[:, None]


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gibbs_from_features_matches_torch(domain, dtype):
    xs, xt = _features(N=37, M=19, D=40, dtype=dtype)  # D > BLOCK_D: several feature tiles
    sup_s, sup_t = _masks(2, 37, 19, [37, 30], [19, 11])
    xs[~sup_s] = float("nan")
    G = tri.gibbs_from_features(xs, xt, sup_s, sup_t, 0.1, domain == "log", torch.float32)
    C = cosine_cost(xs.float().nan_to_num(0.0), xt.float())
    C = torch.where(sup_s[:, :, None] & sup_t[:, None, :], C, 0.0)
    ref = -C / 0.1 if domain == "log" else torch.exp(-C / 0.1)
    torch.testing.assert_close(G, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("domain", DOMAINS)
def test_forward_matches_torch_with_masks_and_tol(domain):
    xs, xt = _features(seed=1)
    mask_s, mask_t = _masks(2, 21, 13, [21, 15], [10, 13])
    xt[~mask_t] = float("nan")
    kw = dict(xs=xs, xt=xt, mask_s=mask_s, mask_t=mask_t, eps=0.1, domain=domain)
    for n_iters, tol in ((7, None), (300, 1e-5)):
        r_tri = sinkhorn(**kw, n_iters=n_iters, tol=tol, backend="triton")
        r_pt = sinkhorn(**kw, n_iters=n_iters, tol=tol, backend="torch")
        assert r_tri.backend == "triton" and r_pt.backend == "torch" and r_tri.domain == domain
        assert r_tri.n_iters == r_pt.n_iters
        torch.testing.assert_close(r_tri.plan, r_pt.plan, rtol=1e-4, atol=1e-7)
        for x, y in ((r_tri.log_u, r_pt.log_u), (r_tri.log_v, r_pt.log_v)):
            assert torch.equal(torch.isinf(x), torch.isinf(y))
            torch.testing.assert_close(x[torch.isfinite(y)], y[torch.isfinite(y)], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(r_tri.marginal_error, r_pt.marginal_error, rtol=1e-2, atol=2e-7)
    assert r_tri.n_iters < 300 and float(r_tri.marginal_error.max()) < 1e-5
    V = torch.randn(2, 13, 24)
    U = torch.randn(2, 21, 5)
    # a fresh result: the transport kernel runs on K (reading .plan first makes the plan replace K)
    r_fresh = sinkhorn(**kw, n_iters=7, backend="triton")
    r_pt = sinkhorn(**kw, n_iters=7, backend="torch")
    TV = r_fresh.transport(V)
    torch.testing.assert_close(TV, r_pt.transport(V), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r_fresh.transport_t(U), r_pt.transport_t(U), rtol=1e-4, atol=1e-6)
    assert r_fresh._gibbs is not None
    assert torch.all(TV[~mask_s] == 0)
    err = r_fresh.marginal_error  # from the row kernel, before the plan exists
    torch.testing.assert_close(r_fresh.plan @ V, TV, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r_fresh.transport(V), TV, rtol=1e-5, atol=1e-7)  # now from the plan
    r_fresh._err = None
    torch.testing.assert_close(r_fresh.marginal_error, err, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("domain", DOMAINS)
def test_float64_triton_matches_pot_batch(domain):
    xs, xt = _features(B=2, N=9, M=6, D=5, seed=2, dtype=torch.float64)
    C = cosine_cost(xs, xt)
    res = sinkhorn(C, eps=0.1, n_iters=6, domain=domain, backend="triton")
    ref = ot.batch.solve_batch(C.numpy(), reg=0.1, max_iter=6, tol=0.0, method="log_sinkhorn", grad="detach")
    np.testing.assert_allclose(res.plan.numpy(), np.asarray(ref.plan), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(res.log_u.numpy(), np.asarray(ref.potentials[0]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("domain", DOMAINS)
def test_sinkhorn_transport_matches_torch(domain):
    xs, xt = _features(seed=3, dtype=torch.bfloat16)
    out_tri = sinkhorn_transport(xs, xt, eps=0.1, n_iters=5, domain=domain, backend="triton")
    out_pt = sinkhorn_transport(xs, xt, eps=0.1, n_iters=5, domain=domain, backend="torch")
    for o_tri, o_pt in zip(out_tri, out_pt):
        assert o_tri.dtype == torch.bfloat16
        torch.testing.assert_close(o_tri.float(), o_pt.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_backward_matches_torch(domain, grad):
    xs, xt = _features(N=11, M=9, D=6, seed=4, dtype=torch.float64)
    mask_s, _ = _masks(2, 11, 9, [11, 8], [9, 9])
    b = torch.rand(2, 9, dtype=torch.float64) + 0.5
    b = b / b.sum(1, keepdim=True)
    V = torch.randn(2, 9, 3, dtype=torch.float64)
    grads = {}
    n_iters = 6 if grad == "unrolled" else 400
    for backend in ("triton", "torch"):
        x1, x2, bb = (t.clone().requires_grad_(True) for t in (xs, xt, b))
        r = sinkhorn(
            xs=x1,
            xt=x2,
            b=bb,
            mask_s=mask_s,
            eps=0.2,
            n_iters=n_iters,
            tol=1e-13,
            domain=domain,
            grad=grad,
            backend=backend,
        )
        assert r.backend == backend
        loss = (r.transport(V) ** 2).sum() + (r.plan * torch.arange(9.0, dtype=torch.float64)).sum()
        loss = loss + r.log_v[:, :3].sum() - r.log_u[mask_s].sum() * 9 / 19
        loss.backward()
        grads[backend] = (x1.grad, x2.grad, bb.grad)
    for g_tri, g_pt in zip(grads["triton"], grads["torch"]):
        assert float(g_pt.abs().max()) > 0
        torch.testing.assert_close(g_tri, g_pt, rtol=1e-8, atol=1e-10)


def test_triton_backend_refused_outside_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    xs, xt = _features()
    with pytest.raises(RuntimeError, match="CUDA"):
        sinkhorn(xs=xs, xt=xt, backend="triton")
    # auto never picks triton for CPU tensors
    assert sinkhorn(xs=xs, xt=xt, n_iters=2).backend == "torch"


def test_half_step_column_update_uses_transposed_strides():
    # the column half-iteration is the row kernel on K^T's strides: check it against a float64 formula directly
    g = torch.Generator().manual_seed(5)
    K = torch.rand(2, 19, 35, generator=g, dtype=torch.float64) + 0.1
    u = torch.rand(2, 19, generator=g, dtype=torch.float64)
    b = torch.rand(2, 35, generator=g, dtype=torch.float64)
    v, red = tri.half_step(K, u, b, False, transpose=True)
    torch.testing.assert_close(red, torch.einsum("bij,bi->bj", K, u), rtol=1e-12, atol=0)
    torch.testing.assert_close(v, b / red, rtol=1e-12, atol=0)
    S = torch.log(K)
    lu = torch.log(u)
    lv, lred = tri.half_step(S, lu, torch.log(b), True, transpose=True)
    torch.testing.assert_close(lred, torch.logsumexp(S + lu[:, :, None], 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lv, torch.log(b) - lred, rtol=1e-12, atol=1e-12)
    assert math.isfinite(float(lv.sum()))
    assert sk._lse_cols(S, lu).shape == (2, 35)
