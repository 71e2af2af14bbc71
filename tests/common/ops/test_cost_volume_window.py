"""Tests of the windowed searches of common.ops.cost_volume ("chained", "coarse_to_fine"; PyTorch path).

Every numerical check compares with :func:`reference_windowed_track`, a naive float64 reference that builds the full
combined map and masks it to the window in Python loops (it shares no code with the windowed path), or with
hand-built feature maps whose answer is known exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from common.ops._cost_volume_reference import reference_windowed_track
from common.ops.cost_volume import cost_volume_track

IMAGE = (40, 72)  # (H, W): 4 px per fine cell in y, 6 px in x, so an x/y swap cannot pass
GRIDS = ((10, 12), (10, 12), (5, 6))  # SpeckNet's layout: two fine scales, one coarse, finest first


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(b=2, t=5, n=4, d=6, grids=GRIDS, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(b, t, d, h, w, generator=g).to(dtype) for h, w in grids]
    qs = [torch.randn(b, n, d, generator=g).to(dtype) for _ in grids]
    qp = (torch.rand(b, n, 2, generator=g) * torch.tensor([IMAGE[1], IMAGE[0]])).to(dtype)
    qf = torch.randint(0, t, (b, n), generator=g)
    return qs, fs, qp, qf


def _track(qs, fs, image=IMAGE, **kw):
    return cost_volume_track(qs, fs, image, backend="torch", **kw)


@pytest.mark.parametrize(
    "search,form,search_radius,radius",
    [
        ("chained", "paper", 2.0, 5.0),
        ("chained", "authors", 3.7, 2.5),
        ("chained", "paper", 1.0, 1.5),
        ("coarse_to_fine", "paper", 2.5, 5.0),
        ("coarse_to_fine", "authors", 4.0, 3.0),
    ],
)
def test_windowed_matches_naive_float64_reference(search, form, search_radius, radius):
    qs, fs, qp, qf = _inputs(seed=1)
    qf[0] = torch.tensor([0, 4, 2, 1])  # both chain ends and the middle, mixed within a video
    kw = dict(search=search, search_radius=search_radius, form=form, radius=radius, query_points=qp, query_frames=qf)
    out = _track(qs, fs, chunk_frames=2, chunk_points=3, **kw)  # chunks of 6 triples: several per step
    ref = reference_windowed_track(qs, fs, IMAGE, **kw)
    assert out.positions.shape == (2, 5, 4, 2) and out.positions.dtype == torch.float64
    torch.testing.assert_close(out.positions, ref.positions, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.confidence, ref.confidence, rtol=0, atol=1e-12)
    assert ((out.confidence >= 0) & (out.confidence <= 1)).all()
    # the soft-argmax never leaves the search window: at most search_radius + 1/2 cells from its centre cell, and
    # the windowed answer differs from the global one on these random maps (the restriction is doing something)
    glob = _track(qs, fs, form=form, radius=radius, query_points=qp, query_frames=qf)
    assert (out.positions - glob.positions).abs().max() > 1.0


def test_coarse_to_fine_window_without_query_points():
    qs, fs, _, _ = _inputs(seed=2)
    out = _track(qs, fs, search="coarse_to_fine", search_radius=2.0)
    ref = reference_windowed_track(qs, fs, IMAGE, search="coarse_to_fine", search_radius=2.0)
    torch.testing.assert_close(out.positions, ref.positions, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.confidence, ref.confidence, rtol=0, atol=1e-12)


@pytest.mark.parametrize("search", ["chained", "coarse_to_fine"])
def test_a_window_covering_the_grid_is_the_global_search(search):
    # any centre + 11 cells covers the 10 x 12 grid: the windowed path must then reproduce "global" exactly, which
    # ties its normalisation, upsampling, disc and confidence to the independently tested global path
    qs, fs, qp, qf = _inputs(seed=3)
    glob = _track(qs, fs, query_points=qp, query_frames=qf)
    out = _track(qs, fs, search=search, search_radius=11.0, query_points=qp, query_frames=qf)
    torch.testing.assert_close(out.positions, glob.positions, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.confidence, glob.confidence, rtol=0, atol=1e-12)


def _onehot_maps(t, h, w, d, cells_per_frame, q):
    """(1, t, d, h, w) features: ``-q`` (cosine -1, weight 0) everywhere, ``q`` (cosine 1) at the listed cells."""
    f = -q.view(1, 1, d, 1, 1).expand(1, t, d, h, w).clone()
    for k, cells in enumerate(cells_per_frame):
        for y, x in cells:
            f[0, k, :, y, x] = q
    return f


def test_a_distant_perfect_look_alike_is_ignored_by_chained_and_picked_by_global():
    h, w, d = 10, 12, 4
    q = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    f = _onehot_maps(2, h, w, d, [[(5, 6)], []], q)
    f[0, 1, :, 5, 8] = 0.9 * q + 0.3 * torch.tensor([0.0, 1.0, 2.0, 0.0], dtype=torch.float64)  # true match, cos < 1
    f[0, 1, :, 0, 0] = q  # a perfect look-alike far from the point
    qp = torch.tensor([[[(6 + 0.5) * 6, (5 + 0.5) * 4]]], dtype=torch.float64)  # centre of cell (5, 6)
    qf = torch.zeros(1, 1, dtype=torch.long)
    args = ([q[None, None]], [f], IMAGE)
    glob = cost_volume_track(*args, radius=1.0, query_points=qp, query_frames=qf, backend="torch")
    chained = cost_volume_track(*args, radius=1.0, search="chained", search_radius=3.0, query_points=qp,
                                query_frames=qf, backend="torch")
    torch.testing.assert_close(glob.positions[0, 1, 0], torch.tensor([0.5 * 6, 0.5 * 4], dtype=torch.float64))
    torch.testing.assert_close(chained.positions[0, 1, 0], torch.tensor([8.5 * 6, 5.5 * 4], dtype=torch.float64))
    # a window that does not reach the match (2 cells away) cannot find it: the window really restricts
    short = cost_volume_track(*args, radius=1.0, search="chained", search_radius=1.0, query_points=qp,
                              query_frames=qf, backend="torch")
    assert short.positions[0, 1, 0, 0] < 8 * 6


def test_chaining_in_both_directions_with_mixed_query_frames():
    # a target moving 2 cells right and 1 down per frame, 10 cells in all; a static perfect copy at (0, 13) is a
    # look-alike with a lower flat index, so the global search (ties go to the first index) jumps to it. Only a
    # window chained frame by frame from each query frame can follow the target.
    t, h, w, d = 6, 10, 14, 3
    q = torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
    path = [(2 + k, 1 + 2 * k) for k in range(t)]  # (y, x)
    f = _onehot_maps(t, h, w, d, [[p, (0, 13)] for p in path], q)
    image = (h * 4, w * 6)
    qf = torch.tensor([[0, 5, 2, 3]])
    qp = torch.tensor([[[(path[k][1] + 0.5) * 6, (path[k][0] + 0.5) * 4] for k in qf[0].tolist()]],
                      dtype=torch.float64)
    qs = [q.view(1, 1, d).expand(1, 4, d).clone()]
    out = cost_volume_track(qs, [f], image, radius=1.0, search="chained", search_radius=2.5, query_points=qp,
                            query_frames=qf, backend="torch")
    expected = torch.tensor([[(x + 0.5) * 6, (y + 0.5) * 4] for y, x in path], dtype=torch.float64)
    for n in range(4):
        torch.testing.assert_close(out.positions[0, :, n], expected, rtol=0, atol=1e-12)
    assert (out.confidence == 1).all()
    glob = cost_volume_track(qs, [f], image, radius=1.0, query_points=qp, query_frames=qf, backend="torch")
    assert (glob.positions[0, 1:-1] - expected[1:-1, None]).abs().max() > 10  # global jumps to the look-alike
    # the windows of "coarse_to_fine" are not chained: with a single scale its window sits on the global argmax
    c2f = cost_volume_track(qs, [f], image, radius=1.0, search="coarse_to_fine", search_radius=2.5, backend="torch")
    look_alike = torch.tensor([13.5 * 6, 0.5 * 4], dtype=torch.float64)
    torch.testing.assert_close(c2f.positions[0, :, 0], look_alike.expand(t, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("corner", [(0, 0), (9, 11), (0, 11), (9, 0)])
@pytest.mark.parametrize("search", ["chained", "coarse_to_fine"])
def test_windows_clipped_at_the_border(search, corner):
    qs, fs, _, _ = _inputs(b=1, t=3, n=2, seed=4)
    y, x = corner
    for q, f in zip(qs, fs):  # plant query 0 at the corner cell (its coarse cell on the coarse scale) in every frame
        f[0, :, :, y * f.shape[-2] // 10, x * f.shape[-1] // 12] = 3.0 * q[0, 0][None]
    qp = torch.tensor([[[(x + 0.5) * 6, (y + 0.5) * 4], [36.0, 20.0]]], dtype=torch.float64)
    qf = torch.tensor([[1, 0]])
    kw = dict(search=search, search_radius=3.0, query_points=qp, query_frames=qf)
    out = _track(qs, fs, **kw)
    ref = reference_windowed_track(qs, fs, IMAGE, **kw)
    torch.testing.assert_close(out.positions, ref.positions, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.confidence, ref.confidence, rtol=0, atol=1e-12)
    cell = out.positions[0, :, 0] / torch.tensor([6.0, 4.0], dtype=torch.float64)
    assert ((cell - torch.tensor([x + 0.5, y + 0.5], dtype=torch.float64)).abs() < 1).all()


@pytest.mark.parametrize("search", ["chained", "coarse_to_fine"])
def test_gradcheck_float64(search):
    g = torch.Generator().manual_seed(5)
    grids = ((5, 6), (3, 3))
    fs = [torch.randn(1, 3, 3, h, w, generator=g, dtype=torch.float64, requires_grad=True) for h, w in grids]
    qs = [torch.randn(1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in grids]
    qp = torch.tensor([[[4.0, 3.0], [14.0, 7.0]]], dtype=torch.float64)
    qf = torch.tensor([[0, 2]])

    def fn(q0, q1, f0, f1):
        out = cost_volume_track([q0, q1], [f0, f1], (10, 18), gamma=3.0, radius=2.0, search=search,
                                search_radius=1.0, query_points=qp, query_frames=qf, chunk_frames=1,
                                chunk_points=1, backend="torch")
        return out.positions, out.confidence

    # fast mode (random projections of the Jacobian) keeps this under a second; it still fails on a wrong gradient
    assert torch.autograd.gradcheck(fn, (*qs, *fs), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gradients_stay_inside_the_search_window():
    qs, fs, qp, qf = _inputs(b=1, t=2, n=1, seed=6)
    qf[:] = 0
    fs = [f.requires_grad_() for f in fs]
    out = _track(qs, fs, search="chained", search_radius=2.0, radius=5.0, query_points=qp, query_frames=qf)
    out.positions[0, 1].sum().backward()
    g0 = fs[0].grad[0, 1].abs().sum(0)  # (10, 12) fine-scale gradient on frame 1
    assert g0.sum() > 0
    cy, cx = int(qp[0, 0, 1] // 4), int(qp[0, 0, 0] // 6)
    ys, xs = torch.meshgrid(torch.arange(10), torch.arange(12), indexing="ij")
    outside = ((ys - cy).abs() > 2) | ((xs - cx).abs() > 2)
    assert (g0[outside] == 0).all()  # the disc (radius 5) is clipped to the window
    assert fs[0].grad[0, 0].abs().sum() == 0  # the query frame is not searched


def test_float32_windowed_search_does_not_underflow():
    # weak similarities (|cosine| <= 0.005) in the authors' form: c**8 per scale underflows float32 without the
    # per-scale max-normalisation over the window
    g = torch.Generator().manual_seed(7)
    b, t, n, d = 1, 3, 3, 16
    qs, fs = [], []
    for h, w in GRIDS:
        q = torch.zeros(b, n, d, dtype=torch.float64)
        q[..., 0] = 1.0
        f = torch.randn(b, t, d, h, w, generator=g, dtype=torch.float64)
        f[:, :, 0] = 0.0
        f = f / f.norm(dim=2, keepdim=True)
        f[:, :, 0] = 0.005 * (torch.rand(b, t, h, w, generator=g, dtype=torch.float64) * 2 - 1)
        qs.append(q)
        fs.append(f)
    qp = torch.tensor([[[10.0, 10.0], [40.0, 20.0], [70.0, 39.0]]], dtype=torch.float64)
    qf = torch.tensor([[0, 1, 2]])
    for search in ("chained", "coarse_to_fine"):
        kw = dict(search=search, search_radius=2.0, form="authors", query_points=qp, query_frames=qf)
        ref = reference_windowed_track(qs, fs, IMAGE, **kw)
        out = _track([q.float() for q in qs], [f.float() for f in fs], **{**kw, "query_points": qp.float()})
        torch.testing.assert_close(out.positions.double(), ref.positions, rtol=0, atol=1e-3)
        torch.testing.assert_close(out.confidence.double(), ref.confidence, rtol=0, atol=1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) any op allocates; views of existing storage do not count."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, o.numel())
        return out


def test_windowed_search_cuts_compute_and_memory():
    # SpeckNet-like layout at a moderate size (a 256 x 256 input): the windowed modes must never allocate a
    # full-grid map of the fine scales, and their cosine FLOPs must be a small fraction of the global search's
    b, t, n, d = 1, 10, 32, 4
    grids = ((32, 32), (32, 32), (16, 16))
    qs, fs, _, qf = _inputs(b=b, t=t, n=n, d=d, grids=grids, seed=8, dtype=torch.float32)
    qp = torch.rand(b, n, 2, generator=torch.Generator().manual_seed(0)) * 256
    full_map = b * t * n * 32 * 32
    kw = dict(query_points=qp, query_frames=qf, chunk_frames=8, chunk_points=64)
    stats = {}
    for search in ("global", "chained", "coarse_to_fine"):
        with torch.no_grad(), _LargestAllocation() as alloc, FlopCounterMode(display=False) as flops:
            _track(qs, fs, image=(256, 256), search=search, search_radius=4.0, **kw)
        stats[search] = (alloc.largest, flops.get_total_flops())
    assert stats["global"][0] >= full_map * 0.5  # the instrument sees the global path's (chunked) volumes
    # cosines per (point, frame): global 32² + 32² + 16² = 2304 cells; chained 9² + 9² + 7² = 211 window cells;
    # coarse-to-fine also scans the whole coarsest map (16² = 256)
    for search, min_ratio in (("chained", 8), ("coarse_to_fine", 4)):
        largest, flop = stats[search]
        # the largest tensors left: the coarse-to-fine pick's coarse map (B, chunk_frames, 16 * 16, N) and the
        # gathered window features (chunk_points, 9 * 9, D)
        assert largest <= full_map / 4, (search, largest, full_map)
        assert flop * min_ratio < stats["global"][1], (search, flop, stats["global"][1])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_single_frame_video_returns_the_query_points(backend):
    # nothing to chain: every output is a query frame
    qs, fs, qp, qf = _inputs(b=1, t=1, n=3, seed=9, dtype=torch.float32)
    fs = [f.requires_grad_() for f in fs]
    out = cost_volume_track(qs, fs, IMAGE, search="chained", query_points=qp, query_frames=qf, backend=backend)
    assert torch.equal(out.positions[:, 0], qp) and (out.confidence == 1).all()
    if backend == "triton":  # the autograd Function's backward pass has no window to recompute, and must not fail
        out.positions.sum().backward()
        assert all(f.grad is not None and (f.grad == 0).all() for f in fs)


def test_clear_errors_for_bad_search_arguments():
    qs, fs, qp, qf = _inputs(b=2, t=3, n=4)
    cases = [
        (dict(search="local"), "search must be one of"),
        (dict(search="chained"), "search='chained' needs query_points and query_frames"),
        (dict(search="chained", search_radius=0.5, query_points=qp, query_frames=qf), "search_radius"),
        (dict(search="coarse_to_fine", search_radius=float("inf")), "search_radius"),
        (dict(search="coarse_to_fine", search_radius=float("nan")), "search_radius"),
        (dict(search="coarse_to_fine", search_radius="4"), "search_radius"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            cost_volume_track(qs, fs, IMAGE, backend="torch", **kwargs)
