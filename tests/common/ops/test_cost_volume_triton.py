"""Triton kernels of common.ops.cost_volume under TRITON_INTERPRET=1 (set by tests/conftest.py) vs the PyTorch path.

Shapes are small (the interpreter is slow) but chosen to cover several query blocks, several grid tiles with a
partial last tile, non-square grids, a coarse scale with a non-integer upsampling ratio, and both cost forms.
"""

from __future__ import annotations

import pytest
import torch

from common.ops._cost_volume_reference import reference_cost_volume_track
from common.ops.cost_volume import cost_volume_track

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_torch_thread")]

IMAGE = (40, 84)
# finest 10x14 = 140 cells = 2 full 64-cell tiles + a partial one; 4x5 coarse: ratios 0.4 and 0.357 (non-integer)
GRIDS = ((10, 14), (10, 14), (4, 5))


def _inputs(b=1, t=2, n=5, d=6, grids=GRIDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(b, t, d, h, w, generator=g) for h, w in grids]
    qs = [torch.randn(b, n, d, generator=g) for _ in grids]
    # plant every query at a random fine cell (and the coarse cell covering it) so the peaks are distinct: float32
    # near-ties could otherwise send the two paths to different argmax cells
    h0, w0 = grids[0]
    for bb in range(b):
        for tt in range(t):
            ys = torch.randint(0, h0, (n,), generator=g)
            xs = torch.randint(0, w0, (n,), generator=g)
            for i, (h, w) in enumerate(grids):
                fs[i][bb, tt, :, ys * h // h0, xs * w // w0] += 2.0 * qs[i][bb].T
    return qs, fs


def _both(qs, fs, **kw):
    tri = cost_volume_track(qs, fs, IMAGE, backend="triton", **kw)
    ref = cost_volume_track(qs, fs, IMAGE, backend="torch", **kw)
    return tri, ref


@pytest.mark.parametrize("form,gamma,radius", [("paper", 15.0, 5.0), ("authors", 15.0, 3.0), ("paper", 6.5, 2.5)])
def test_triton_forward_matches_torch_path(form, gamma, radius):
    qs, fs = _inputs(b=2, t=2, n=37)  # 37 points: two query blocks of 32, the second partial
    tri, ref = _both(qs, fs, form=form, gamma=gamma, radius=radius)
    assert tri.positions.shape == (2, 2, 37, 2) and tri.positions.dtype == torch.float32
    torch.testing.assert_close(tri.positions, ref.positions, rtol=0, atol=2e-4)
    torch.testing.assert_close(tri.confidence, ref.confidence, rtol=0, atol=1e-5)
    exact = reference_cost_volume_track([q.double() for q in qs], [f.double() for f in fs], IMAGE, form=form,
                                         gamma=gamma, radius=radius)
    torch.testing.assert_close(tri.positions.double(), exact.positions, rtol=0, atol=2e-4)


def test_triton_border_windows():
    qs, fs = _inputs(n=4, seed=1)
    corners = [(0, 0), (9, 13), (0, 13), (9, 0)]
    for q, f in zip(qs, fs):
        for n, (y, x) in enumerate(corners):
            cy, cx = y * f.shape[-2] // 10, x * f.shape[-1] // 14
            f[0, :, :, cy, cx] = 5.0 * q[0, n][None]
    tri, ref = _both(qs, fs)
    torch.testing.assert_close(tri.positions, ref.positions, rtol=0, atol=2e-4)
    torch.testing.assert_close(tri.confidence, ref.confidence, rtol=0, atol=1e-5)
    cells = tri.positions[0, :, :, :] / torch.tensor([IMAGE[1] / 14, IMAGE[0] / 10])
    target = torch.tensor([[x + 0.5, y + 0.5] for y, x in corners])
    assert ((cells - target).abs() < 1).all()


@pytest.mark.parametrize(
    "cells",
    [[(6, 1), (2, 9)], [(0, 3), (0, 10)], [(9, 13), (1, 2)], [(4, 9), (4, 5)]],
    ids=["across-tiles", "same-tile", "first-tile-vs-last", "same-row"],
)
def test_triton_ties_go_to_first_index(cells):
    # bit-identical features at the tied cells, the opposite vector elsewhere; coarse scale constant
    h, w, d = 10, 14, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, d, generator=g)
    fine = -q[0, 0].view(1, 1, d, 1, 1).expand(1, 1, d, h, w).clone()
    for y, x in cells:
        fine[0, 0, :, y, x] = q[0, 0]
    coarse = q[0, 0].view(1, 1, d, 1, 1).expand(1, 1, d, 5, 7).clone()  # ratio 0.5: exactly 1 after upsampling
    qs, fs = [q, q], [fine, coarse]
    tri, ref = _both(qs, fs, radius=2.0)
    first = min(y * w + x for y, x in cells)
    fy, fx = divmod(first, w)
    expected = torch.tensor([(fx + 0.5) * IMAGE[1] / w, (fy + 0.5) * IMAGE[0] / h])
    torch.testing.assert_close(tri.positions[0, 0, 0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.positions[0, 0, 0], expected, rtol=0, atol=1e-5)


def test_triton_query_frames():
    qs, fs = _inputs(t=3, n=4, seed=2)
    qp = torch.tensor([[[3.0, 4.0], [80.0, 2.0], [10.5, 39.0], [42.0, 20.0]]])
    qf = torch.tensor([[0, 2, 1, 1]])
    tri, ref = _both(qs, fs, query_points=qp, query_frames=qf)
    for n in range(4):
        assert torch.equal(tri.positions[0, qf[0, n], n], qp[0, n])
        assert tri.confidence[0, qf[0, n], n] == 1.0
    torch.testing.assert_close(tri.positions, ref.positions, rtol=0, atol=2e-4)


@pytest.mark.parametrize("form", ["paper", "authors"])
def test_triton_backward_matches_torch_path(form):
    qs, fs = _inputs(n=5, seed=3)
    grads = {}
    for backend in ("triton", "torch"):
        q_leaf = [q.clone().requires_grad_() for q in qs]
        f_leaf = [f.clone().requires_grad_() for f in fs]
        out = cost_volume_track(q_leaf, f_leaf, IMAGE, form=form, backend=backend, chunk_frames=1, chunk_points=2)
        g = torch.Generator().manual_seed(7)
        loss = (out.positions * torch.randn(out.positions.shape, generator=g)).sum() + 3.0 * out.confidence.sum()
        loss.backward()
        grads[backend] = [x.grad for x in (*q_leaf, *f_leaf)]
    for gt, gr in zip(grads["triton"], grads["torch"]):
        assert gt is not None and gt.abs().sum() > 0
        torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-6)


def test_triton_partial_requires_grad():
    qs, fs = _inputs(n=3, seed=4)
    f0 = fs[0].clone().requires_grad_()
    out = cost_volume_track(qs, [f0, *fs[1:]], IMAGE, backend="triton")
    out.positions.sum().backward()
    assert f0.grad is not None and f0.grad.abs().sum() > 0


def test_triton_backend_rejects_float64():
    qs, fs = _inputs(n=2)
    with pytest.raises(ValueError, match="float32"):
        cost_volume_track([q.double() for q in qs], [f.double() for f in fs], IMAGE, backend="triton")
