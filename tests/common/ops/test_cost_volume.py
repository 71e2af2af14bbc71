"""Tests of common.ops.cost_volume (PyTorch path) against a naive float64 reference and hand-computed cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.ops._cost_volume_reference import reference_cost_volume_track
from common.ops.cost_volume import (
    TrackEstimate,
    _scale_weights,
    cost_volume_track,
    sample_query_features,
    sample_query_features_multiframe,
)

IMAGE = (40, 72)  # (H, W): 4 px per fine cell in y, 6 px in x, so an x/y swap cannot pass
GRIDS = ((10, 12), (10, 12), (5, 6))  # SpeckNet's layout: two fine scales, one coarse, finest first


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(b=2, t=3, n=5, d=6, grids=GRIDS, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(b, t, d, h, w, generator=g).to(dtype) for h, w in grids]
    qs = [torch.randn(b, n, d, generator=g).to(dtype) for _ in grids]
    return qs, fs


def _track(qs, fs, image=IMAGE, **kw):
    return cost_volume_track(qs, fs, image, backend="torch", **kw)


@pytest.mark.parametrize(
    "form,gamma,radius",
    [("paper", 15.0, 5.0), ("paper", 7.5, 2.5), ("authors", 15.0, 5.0), ("authors", 15.0, 3.0)],
)
def test_matches_naive_float64_reference(form, gamma, radius):
    qs, fs = _inputs()
    out = _track(qs, fs, form=form, gamma=gamma, radius=radius, chunk_frames=2, chunk_points=3)
    ref = reference_cost_volume_track(qs, fs, IMAGE, form=form, gamma=gamma, radius=radius)
    assert isinstance(out, TrackEstimate)
    assert out.positions.shape == (2, 3, 5, 2) and out.confidence.shape == (2, 3, 5)
    assert out.positions.dtype == torch.float64
    torch.testing.assert_close(out.positions, ref.positions, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.confidence, ref.confidence, rtol=0, atol=1e-12)
    assert ((out.confidence >= 0) & (out.confidence <= 1)).all()
    # the soft-argmax stays in the image
    assert (out.positions >= 0).all() and (out.positions[..., 0] <= IMAGE[1]).all()


def _angle_features(cos_map: torch.Tensor) -> torch.Tensor:
    """(H, W) target cosines -> (1, 1, 2, H, W) unit features whose cosine with the query (1, 0) is cos_map."""
    return torch.stack([cos_map, torch.sqrt(1 - cos_map**2)], dim=0)[None, None]


def test_hand_computed_corner_window_and_confidence():
    # one scale, 8x8 grid on a 32x64 image; matches at the top-left corner, so the window is clipped by the border
    h0, w0, gamma = 8, 8, 15.0
    cos_map = torch.full((h0, w0), -1.0, dtype=torch.float64)
    cos_map[0, 0] = 1.0
    cos_map[0, 1] = 0.5  # (x=1, y=0)
    cos_map[1, 0] = 0.5  # (x=0, y=1)
    cos_map[7, 7] = 0.5  # far outside the window: counts in the confidence only
    fm = _angle_features(cos_map)
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    out = cost_volume_track([q], [fm], (32, 64), gamma=gamma, radius=5.0, backend="torch")
    a = 0.75**gamma  # ((0.5 + 1) / 2) ** gamma
    x_cells = (0.5 * 1 + 1.5 * a + 0.5 * a) / (1 + 2 * a)
    y_cells = (0.5 * 1 + 0.5 * a + 1.5 * a) / (1 + 2 * a)
    expected = torch.tensor([x_cells * 64 / 8, y_cells * 32 / 8], dtype=torch.float64)
    torch.testing.assert_close(out.positions[0, 0, 0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.confidence[0, 0, 0].item(), (1 + 2 * a) / (1 + 3 * a), rtol=0, atol=1e-12)


def test_hand_computed_bottom_right_border_authors_form():
    h0, w0 = 6, 9
    cos_map = torch.zeros((h0, w0), dtype=torch.float64)
    cos_map[5, 8] = 1.0
    cos_map[5, 7] = -0.5  # |c| counts in the authors' form: c**4 per scale, squared -> 0.5 ** 8
    cos_map[3, 8] = 0.5  # two cells up: still inside radius 2.5
    fm = _angle_features(cos_map)
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    out = cost_volume_track([q], [fm], (6, 9), form="authors", radius=2.5, backend="torch")
    a = 0.5**8
    x = (8.5 + 7.5 * a + 8.5 * a) / (1 + 2 * a)
    y = (5.5 + 5.5 * a + 3.5 * a) / (1 + 2 * a)
    torch.testing.assert_close(out.positions[0, 0, 0], torch.tensor([x, y], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("corner", [(0, 0), (9, 11), (0, 11), (9, 0), (4, 0), (0, 6)])
def test_border_windows_match_reference(corner):
    qs, fs = _inputs(b=1, t=2, n=3, seed=3)
    y, x = corner
    for q, f in zip(qs, fs):  # plant query 0's feature at the border cell (its coarse cell on the coarse scale)
        cy, cx = y * f.shape[-2] // 10, x * f.shape[-1] // 12
        f[0, :, :, cy, cx] = 3.0 * q[0, 0][None]  # cosines ignore the norm
    out = _track(qs, fs)
    ref = reference_cost_volume_track(qs, fs, IMAGE)
    torch.testing.assert_close(out.positions, ref.positions, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.confidence, ref.confidence, rtol=0, atol=1e-12)
    # query 0 is found in the planted border cell (soft-argmax stays within one cell of its centre)
    cell = out.positions[0, :, 0] / torch.tensor([IMAGE[1] / 12, IMAGE[0] / 10], dtype=torch.float64)
    assert ((cell - torch.tensor([x + 0.5, y + 0.5], dtype=torch.float64)).abs() < 1).all()


def _tie_inputs(cells, grid=(10, 12), d=3, coarse=(5, 6)):
    """Feature maps where ``cells`` [(y, x), ...] carry the query exactly (cosine 1, bit-identical) and every other
    fine cell is orthogonal-opposite; the coarse scale is constant so it cannot break the tie."""
    h, w = grid
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    fine = -q[0, 0].view(1, 1, d, 1, 1).expand(1, 1, d, h, w).clone()
    for y, x in cells:
        fine[0, 0, :, y, x] = q[0, 0]
    coarse_map = q[0, 0].view(1, 1, d, 1, 1).expand(1, 1, d, *coarse).clone()
    return [q, q], [fine, coarse_map]


@pytest.mark.parametrize("cells", [[(6, 1), (2, 9)], [(3, 2), (3, 10)], [(8, 11), (0, 0), (4, 5)]])
def test_ties_go_to_first_index(cells):
    qs, fs = _tie_inputs(cells)
    out = _track(qs, fs, radius=2.0)  # windows of the tied cells do not overlap
    first = min(y * 12 + x for y, x in cells)
    fy, fx = divmod(first, 12)
    expected = torch.tensor([(fx + 0.5) * 6, (fy + 0.5) * 4], dtype=torch.float64)
    torch.testing.assert_close(out.positions[0, 0, 0], expected, rtol=0, atol=1e-12)
    ref = reference_cost_volume_track(qs, fs, IMAGE, radius=2.0)
    torch.testing.assert_close(out.positions, ref.positions, rtol=0, atol=1e-12)


def test_chunking_invariance():
    qs, fs = _inputs(b=2, t=5, n=7, seed=1)
    base = _track(qs, fs, chunk_frames=100, chunk_points=100)
    for cf, cp in [(1, 1), (2, 3), (4, 6), (5, 7)]:
        out = _track(qs, fs, chunk_frames=cf, chunk_points=cp)
        torch.testing.assert_close(out.positions, base.positions, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.confidence, base.confidence, rtol=0, atol=1e-14)


def test_scale_weights_are_max_normalised():
    c = torch.rand(3, 4, 50, dtype=torch.float64) * 2 - 1
    c[0, 0] = -1.0  # a map with every cosine -1: all weights 0, not NaN
    for form in ("paper", "authors"):
        raw = ((c + 1) / 2) ** 15 if form == "paper" else c**4
        for inplace in (False, True):
            w = _scale_weights(c.clone(), form, 15.0, inplace=inplace, dim=-1)
            assert not torch.isnan(w).any()
            top = w.amax(-1)
            if form == "paper":
                assert (top[0, 0] == 0) and (w[0, 0] == 0).all()
                top[0, 0] = 1.0
            torch.testing.assert_close(top, torch.ones_like(top), rtol=0, atol=1e-14)
            # the same map up to one positive constant per (frame, query): raw / w constant along the grid
            keep = w > 1e-200
            ratio = torch.where(keep, raw / w.clamp_min(1e-300), 0)
            scale = ratio.amax(-1, keepdim=True)
            torch.testing.assert_close(torch.where(keep, ratio, scale), scale.expand_as(ratio), rtol=1e-10, atol=0)


def test_max_normalisation_is_invariant_and_prevents_float32_underflow():
    # weak matches (|cosine| <= 0.005): the authors' form gives c**8 <= 4e-19 per scale, and the product of three
    # scales underflows float32 to exactly 0 without the per-scale normalisation
    g = torch.Generator().manual_seed(5)
    b, t, n, d = 1, 2, 3, 16
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
    ref64 = reference_cost_volume_track(qs, fs, IMAGE, form="authors")
    q32, f32 = [q.float() for q in qs], [f.float() for f in fs]
    naive32 = reference_cost_volume_track(q32, f32, IMAGE, form="authors")
    # the unnormalised float32 volumes are all zero: the naive path falls back to cell (0, 0) and confidence 0
    assert (naive32.confidence == 0).all()
    assert (naive32.positions.double() - ref64.positions).abs().max() > 1.0
    out32 = _track(q32, f32, form="authors")
    torch.testing.assert_close(out32.positions.double(), ref64.positions, rtol=0, atol=1e-3)
    torch.testing.assert_close(out32.confidence.double(), ref64.confidence, rtol=0, atol=1e-5)
    # and in float64 the normalised op equals the unnormalised reference: the scaling changes nothing
    out64 = _track(qs, fs, form="authors")
    torch.testing.assert_close(out64.positions, ref64.positions, rtol=0, atol=1e-9)
    torch.testing.assert_close(out64.confidence, ref64.confidence, rtol=0, atol=1e-12)


def test_query_frames_return_query_points():
    qs, fs = _inputs(b=2, t=4, n=5, seed=2)
    g = torch.Generator().manual_seed(0)
    qp = torch.rand(2, 5, 2, generator=g, dtype=torch.float64) * torch.tensor([72.0, 40.0], dtype=torch.float64)
    qf = torch.tensor([[0, 3, 1, 1, 2], [2, 2, 0, 3, 3]])
    plain = _track(qs, fs)
    out = _track(qs, fs, query_points=qp, query_frames=qf)
    ref = reference_cost_volume_track(qs, fs, IMAGE, query_points=qp, query_frames=qf)
    is_q = torch.arange(4)[None, :, None] == qf[:, None, :]
    for b in range(2):
        for n in range(5):
            assert torch.equal(out.positions[b, qf[b, n], n], qp[b, n])
            assert out.confidence[b, qf[b, n], n] == 1.0
    assert torch.equal(out.positions[~is_q], plain.positions[~is_q])
    assert torch.equal(out.confidence[~is_q], plain.confidence[~is_q])
    torch.testing.assert_close(out.positions, ref.positions, rtol=0, atol=1e-9)


def _tiny_double(seed=0, grids=((5, 6), (3, 3))):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(1, 2, 3, h, w, generator=g, dtype=torch.float64, requires_grad=True) for h, w in grids]
    qs = [torch.randn(1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in grids]
    return qs, fs


@pytest.mark.parametrize("form", ["paper", "authors"])
def test_gradcheck_float64(form):
    qs, fs = _tiny_double(seed=4)
    gamma = 3.0 if form == "paper" else 15.0  # a gentler power keeps finite differences well conditioned

    def fn(q0, q1, f0, f1):
        out = cost_volume_track([q0, q1], [f0, f1], (10, 18), form=form, gamma=gamma, radius=2.0,
                                chunk_frames=2, chunk_points=1, backend="torch")
        return out.positions, out.confidence

    assert torch.autograd.gradcheck(fn, (*qs, *fs), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradients_flow_only_through_the_window_weights():
    qs, fs = _inputs(b=1, t=1, n=1, seed=6)
    fs = [f.requires_grad_() for f in fs]
    out = _track(qs, fs, radius=2.0)
    out.positions.sum().backward()
    cell = (out.positions[0, 0, 0] / torch.tensor([6.0, 4.0], dtype=torch.float64)).detach()
    ys, xs = torch.meshgrid(torch.arange(10), torch.arange(12), indexing="ij")
    g0 = fs[0].grad[0, 0].abs().sum(0)  # (10, 12)
    assert g0.sum() > 0
    # fine-scale features outside the (rounded-out) window get no gradient: the hard argmax is not differentiated
    far = ((xs + 0.5 - cell[0]).abs() > 3) | ((ys + 0.5 - cell[1]).abs() > 3)
    assert (g0[far] == 0).all()
    assert fs[2].grad.abs().sum() > 0  # the coarse scale contributes through its upsampled weights


def test_half_inputs_compute_in_float32():
    qs, fs = _inputs(b=1, t=2, n=3, dtype=torch.float32, seed=7)
    out = _track([q.half() for q in qs], [f.half() for f in fs])
    ref = _track([q.half().float() for q in qs], [f.half().float() for f in fs])
    assert out.positions.dtype == torch.float32
    torch.testing.assert_close(out.positions, ref.positions, rtol=0, atol=1e-4)


def test_empty_point_or_frame_sets():
    qs, fs = _inputs(b=1, t=2, n=3)
    out = _track([q[:, :0] for q in qs], fs)
    assert out.positions.shape == (1, 2, 0, 2) and out.confidence.shape == (1, 2, 0)
    out = _track(qs, [f[:, :0] for f in fs])
    assert out.positions.shape == (1, 0, 3, 2)


def test_auto_backend_on_cpu_is_the_torch_path():
    qs, fs = _inputs(b=1, t=2, n=3, seed=8)
    a = cost_volume_track(qs, fs, IMAGE)
    b = _track(qs, fs)
    assert torch.equal(a.positions, b.positions)


def _fs_with(shape_changes):
    qs, fs = _inputs(b=2, t=3, n=5)
    for key, value in shape_changes.items():
        kind, s = key
        (qs if kind == "q" else fs)[s] = value
    return qs, fs


@pytest.mark.parametrize(
    "change,match",
    [
        ({("f", 1): torch.zeros(3, 3, 6, 10, 12, dtype=torch.float64)}, r"feature_maps\[1\] has \(B, T\)"),
        ({("f", 2): torch.zeros(2, 4, 6, 5, 6, dtype=torch.float64)}, r"feature_maps\[2\] has \(B, T\)"),
        ({("q", 1): torch.zeros(2, 4, 6, dtype=torch.float64)}, r"query_features\[1\] has \(B, N\)"),
        ({("q", 2): torch.zeros(2, 5, 7, dtype=torch.float64)}, r"query_features\[2\] has D = 7"),
        ({("f", 0): torch.zeros(2, 3, 6, 4, 4, dtype=torch.float64)}, "finest first"),
        ({("f", 1): torch.zeros(2, 3, 6, 10, 12, dtype=torch.float64)[0]}, r"feature_maps\[1\] must have shape"),
        ({("q", 0): torch.zeros(2, 5, dtype=torch.float64)}, r"query_features\[0\] must have shape"),
        ({("q", 1): torch.zeros(2, 5, 6, dtype=torch.long)}, "floating point"),
    ],
)
def test_clear_errors_for_mismatched_shapes(change, match):
    qs, fs = _fs_with(change)
    with pytest.raises(ValueError, match=match):
        _track(qs, fs)


def test_clear_errors_for_bad_arguments():
    qs, fs = _inputs(b=2, t=3, n=5)
    qp = torch.zeros(2, 5, 2, dtype=torch.float64)
    qf = torch.zeros(2, 5, dtype=torch.long)
    cases = [
        (dict(query_features=qs[:2]), "one query tensor per feature map"),
        (dict(query_features=[], feature_maps=[]), "one query tensor per feature map"),
        (dict(query_features=qs[0]), "sequences"),
        (dict(form="softmax"), "form must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=float("nan")), "gamma"),
        (dict(radius=-1.0), "radius"),
        (dict(chunk_frames=0), "chunk_frames"),
        (dict(image_size=(40,)), "image_size"),
        (dict(image_size=(40, 0)), "image_size"),
        (dict(query_points=qp), "together"),
        (dict(query_points=qp[:, :4], query_frames=qf[:, :4]), "query_points has N"),
        (dict(query_points=qp[..., :1], query_frames=qf), r"query_points must have shape \(B, N, 2\)"),
        (dict(query_points=qp, query_frames=qf.double()), "query_frames must be an integer"),
        (dict(query_points=qp, query_frames=qf + 3), r"query_frames must lie in \[0, 3\)"),
    ]
    for kwargs, match in cases:
        args = dict(query_features=qs, feature_maps=fs, image_size=IMAGE, backend="torch")
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            cost_volume_track(**args)


# ---------------------------------------------------------------------------------------------------------------
# query sampling


def test_sample_query_features_at_cell_centres_and_borders():
    g = torch.Generator().manual_seed(0)
    fm = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)  # grid 5x7 on a 40x56 image: 8 px per cell
    ys, xs = torch.tensor([0, 4, 2, 3]), torch.tensor([0, 6, 3, 1])
    centres = torch.stack([(xs + 0.5) * 8, (ys + 0.5) * 8], dim=-1).to(torch.float64)[None].expand(2, -1, -1)
    out = sample_query_features(fm, centres, (40, 56))
    assert out.shape == (2, 4, 4)
    torch.testing.assert_close(out, fm[:, :, ys, xs].transpose(1, 2), rtol=0, atol=1e-12)
    # halfway between two cell centres: the mean; beyond the border: the border value
    mid = torch.tensor([[[(0.5 + 1.5) / 2 * 8, 0.5 * 8], [-30.0, 100.0]]], dtype=torch.float64).expand(2, -1, -1)
    out = sample_query_features(fm, mid, (40, 56))
    torch.testing.assert_close(out[:, 0], (fm[:, :, 0, 0] + fm[:, :, 0, 1]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, 1], fm[:, :, 4, 0], rtol=0, atol=1e-12)


def test_sample_query_features_multiframe_matches_per_frame_sampling():
    g = torch.Generator().manual_seed(1)
    fms = torch.randn(2, 4, 3, 6, 9, generator=g, dtype=torch.float64)
    pts = torch.rand(2, 7, 2, generator=g, dtype=torch.float64) * torch.tensor([80.0, 60.0], dtype=torch.float64)
    pts = pts - 5  # some points beyond the image border
    pts[0, 0] = torch.tensor([72.0, 48.0], dtype=torch.float64)  # exactly at the image corner
    qf = torch.randint(0, 4, (2, 7), generator=g)
    out = sample_query_features_multiframe(fms, pts, qf, (48, 72))
    expected = torch.stack(
        [torch.stack([sample_query_features(fms[b, int(qf[b, n])][None], pts[b, n][None, None], (48, 72))[0, 0]
                      for n in range(7)]) for b in range(2)]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_sample_query_features_gradcheck():
    g = torch.Generator().manual_seed(2)
    fms = torch.randn(1, 2, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pts = torch.tensor([[[5.3, 3.1], [11.7, 7.9]]], dtype=torch.float64, requires_grad=True)
    qf = torch.tensor([[1, 0]])
    assert torch.autograd.gradcheck(lambda f, p: sample_query_features_multiframe(f, p, qf, (12, 16)), (fms, pts))
    fm = fms[:, 0].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda f, p: sample_query_features(f, p, (12, 16)), (fm, pts))


def test_sample_query_features_errors():
    fm = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="feature_map must have shape"):
        sample_query_features(fm[0], torch.zeros(2, 1, 2), (8, 8))
    with pytest.raises(ValueError, match=r"points must have shape \(B, N, 2\)"):
        sample_query_features(fm, torch.zeros(2, 1, 3), (8, 8))
    with pytest.raises(ValueError, match="batch size"):
        sample_query_features(fm, torch.zeros(3, 1, 2), (8, 8))
    fms = torch.zeros(2, 5, 3, 4, 4)
    with pytest.raises(ValueError, match="query_frames must lie"):
        sample_query_features_multiframe(fms, torch.zeros(2, 1, 2), torch.full((2, 1), 5), (8, 8))
    with pytest.raises(ValueError, match="query_frames must be an integer tensor"):
        sample_query_features_multiframe(fms, torch.zeros(2, 1, 2), torch.zeros(2, 2, dtype=torch.long), (8, 8))


def test_query_features_then_track_recovers_a_translation():
    # end to end: a texture translated by a known shift per frame is tracked to within a fraction of a cell
    g = torch.Generator().manual_seed(9)
    h, w, d = 64, 64, 16
    base = F.avg_pool2d(torch.randn(1, d, 32, 32, generator=g, dtype=torch.float64), 3, 1, 1)
    shifts = torch.tensor([[0.0, 0.0], [4.0, -2.0], [-6.0, 3.0]], dtype=torch.float64)  # pixels (x, y)
    maps = []
    for gh, gw in ((16, 16), (8, 8)):
        yy, xx = torch.meshgrid((torch.arange(gh) + 0.5) * h / gh, (torch.arange(gw) + 0.5) * w / gw, indexing="ij")
        frames = []
        for sx, sy in shifts:
            grid = torch.stack([(xx - sx) / w * 2 - 1, (yy - sy) / h * 2 - 1], dim=-1)[None] * 0.5
            frames.append(F.grid_sample(base, grid.to(base.dtype), mode="bilinear", align_corners=False))
        maps.append(torch.stack(frames, dim=1))
    pts = torch.tensor([[[20.0, 28.0], [40.0, 36.0]]], dtype=torch.float64)
    qs = [sample_query_features(m[:, 0], pts, (h, w)) for m in maps]
    out = cost_volume_track(qs, maps, (h, w), backend="torch")
    err = (out.positions[0] - (pts[0][None] + shifts[:, None])).norm(dim=-1)
    assert err.max() < 0.5 * h / 16, err
    assert ((out.confidence > 0) & (out.confidence <= 1)).all()
