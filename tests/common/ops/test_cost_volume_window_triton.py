"""Triton window kernel of common.ops.cost_volume (search="chained"/"coarse_to_fine") under TRITON_INTERPRET=1 (set by
tests/conftest.py) vs the PyTorch windowed path and the float64 reference.

Small shapes (the interpreter is slow) that still cover: a window of 25 cells in a 32-lane block, windows clipped at
every border, a coarse scale with non-integer upsampling ratios (0.4 and 0.357), mixed query frames chained in both
directions, and both cost forms.
"""

from __future__ import annotations

import pytest
import torch

from common.ops._cost_volume_reference import reference_windowed_track
from common.ops.cost_volume import cost_volume_track

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_torch_thread")]

IMAGE = (40, 84)
GRIDS = ((10, 14), (10, 14), (4, 5))


def _inputs(b=1, t=4, n=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(b, t, d, h, w, generator=g) for h, w in GRIDS]
    qs = [torch.randn(b, n, d, generator=g) for _ in GRIDS]
    # plant every query near a random cell of every frame (distinct peaks: float32 near-ties could send the two paths
    # to different argmax cells, which would test rounding rather than the kernel)
    for bb in range(b):
        for tt in range(t):
            ys = torch.randint(0, 10, (n,), generator=g)
            xs = torch.randint(0, 14, (n,), generator=g)
            for i, (h, w) in enumerate(GRIDS):
                fs[i][bb, tt, :, ys * h // 10, xs * w // 14] += 2.0 * qs[i][bb].T
    # query points on the borders and inside; query frames at both ends and in the middle
    qp = torch.tensor([[[1.0, 1.0], [83.0, 39.0], [40.0, 2.0], [3.0, 30.0], [50.0, 21.0]]]).expand(b, -1, -1)[:, :n]
    qf = torch.tensor([[0, t - 1, 1, 2, 2]]).expand(b, -1)[:, :n].clone()
    return qs, fs, qp.clone(), qf


@pytest.mark.parametrize("search,form", [("chained", "paper"), ("chained", "authors"), ("coarse_to_fine", "paper")])
def test_window_kernel_forward_matches_torch_path_and_reference(search, form):
    qs, fs, qp, qf = _inputs(b=2)
    kw = dict(search=search, search_radius=2.0, form=form, radius=2.5, query_points=qp, query_frames=qf)
    tri = cost_volume_track(qs, fs, IMAGE, backend="triton", **kw)
    ref = cost_volume_track(qs, fs, IMAGE, backend="torch", **kw)
    assert tri.positions.shape == (2, 4, 5, 2) and tri.positions.dtype == torch.float32
    torch.testing.assert_close(tri.positions, ref.positions, rtol=0, atol=2e-4)
    torch.testing.assert_close(tri.confidence, ref.confidence, rtol=0, atol=1e-5)
    exact = reference_windowed_track([q.double() for q in qs], [f.double() for f in fs], IMAGE,
                                      **{**kw, "query_points": qp.double()})
    torch.testing.assert_close(tri.positions.double(), exact.positions, rtol=0, atol=2e-4)
    torch.testing.assert_close(tri.confidence.double(), exact.confidence, rtol=0, atol=1e-5)


@pytest.mark.parametrize("search", ["chained", "coarse_to_fine"])
def test_window_kernel_backward_matches_torch_path(search):
    qs, fs, qp, qf = _inputs(t=3, n=4, seed=3)
    grads = {}
    for backend in ("triton", "torch"):
        q_leaf = [q.clone().requires_grad_() for q in qs]
        f_leaf = [f.clone().requires_grad_() for f in fs]
        out = cost_volume_track(q_leaf, f_leaf, IMAGE, search=search, search_radius=2.0, query_points=qp,
                                query_frames=qf, backend=backend, chunk_points=3)
        g = torch.Generator().manual_seed(7)
        loss = (out.positions * torch.randn(out.positions.shape, generator=g)).sum() + 3.0 * out.confidence.sum()
        loss.backward()
        grads[backend] = [x.grad for x in (*q_leaf, *f_leaf)]
    for gt, gr in zip(grads["triton"], grads["torch"]):
        assert gt is not None and gt.abs().sum() > 0
        torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-6)


def test_window_kernel_partial_requires_grad():
    qs, fs, qp, qf = _inputs(t=2, n=3, seed=4)
    f0 = fs[0].clone().requires_grad_()
    out = cost_volume_track(qs, [f0, *fs[1:]], IMAGE, search="chained", search_radius=2.0, query_points=qp,
                            query_frames=qf, backend="triton")
    out.positions.sum().backward()
    assert f0.grad is not None and f0.grad.abs().sum() > 0
