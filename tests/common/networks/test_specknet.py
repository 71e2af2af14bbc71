"""Tests of the SpeckNet tracker (common/networks/specknet.py).

Tiny videos (64x64 to 96x96, T <= 6) keep the file well under a minute on CPU. Exactness of the tracking head is
checked with hand-built one-hot feature maps; the real (untrained) encoder is checked on cell-aligned translations.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.losses.tracking import tracking_l1_loss
from common.networks.specknet import (
    PreActBlock,
    SpeckNet,
    SpeckNetBundleAdapter,
    _sample_on_query_frames,
    centred_grid,
    split_pred,
)
from common.ops.cost_volume import sample_query_features_multiframe


def make_net(seed: int = 0, **kwargs) -> SpeckNet:
    torch.manual_seed(seed)
    return SpeckNet(**kwargs)


def rand_video(b: int = 1, t: int = 6, h: int = 64, w: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rand_queries(b: int, n: int, t: int, h: int, w: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(b, n, 2, generator=g) * torch.tensor([w - 1.0, h - 1.0])
    frames = torch.randint(0, t, (b, n), generator=g)
    return pts, frames


def translating_video(size: int, t: int, step: tuple[int, int], seed: int, sigma: float = 1.0) -> torch.Tensor:
    """(1, t, size, size) crops of a smooth random texture whose content moves by ``step`` (dx, dy) px per frame."""
    rng = np.random.default_rng(seed)
    pad = 8 + (abs(step[0]) + abs(step[1])) * t
    canvas = ndimage.gaussian_filter(rng.standard_normal((size + 2 * pad, size + 2 * pad)), sigma)
    canvas /= np.abs(canvas).max()
    frames = [canvas[pad - k * step[1] : pad - k * step[1] + size, pad - k * step[0] : pad - k * step[0] + size]
              for k in range(t)]
    return torch.tensor(np.stack(frames), dtype=torch.float32)[None]


# ---------------------------------------------------------------------------------------------------------------
# architecture and shapes
# ---------------------------------------------------------------------------------------------------------------


def test_architecture_matches_methods():
    net = make_net()
    assert net.unshuffle.downscale_factor == 2
    assert (net.stem.in_channels, net.stem.out_channels) == (4, 32)
    assert net.stem.kernel_size == (7, 7) and net.stem.stride == (2, 2) and net.stem.bias is None
    assert len(net.groups) == 4
    assert [len(g) for g in net.groups] == [2, 2, 2, 2]
    assert [g[0].conv_0.out_channels for g in net.groups] == [32, 64, 64, 64]
    assert [g[0].conv_0.stride[0] for g in net.groups] == [1, 2, 1, 2]
    blocks = [b for g in net.groups for b in g]
    assert all(isinstance(b, PreActBlock) for b in blocks)
    assert [b.proj is not None for b in blocks] == [True, False] * 4
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(norms) == 16 and all(m.affine and not m.track_running_stats for m in norms)
    assert not [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert net.feature_strides == (8, 8, 16) and net.size_multiple == 16


def test_encode_shapes_and_unit_norm():
    net = make_net().eval()
    with torch.no_grad():
        feats = net.encode(rand_video(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 3, 64, 8, 12), (2, 3, 64, 8, 12), (2, 3, 64, 4, 6)]
    for f in feats:
        assert torch.allclose(f.norm(dim=2), torch.ones(()), atol=1e-5)


def test_paper_input_size_gives_64_64_32_grids():
    net = make_net(channels=(4, 4, 4, 4)).eval()  # widths do not change the grids; keeps the 512 input cheap
    with torch.no_grad():
        feats = net.encode(torch.zeros(1, 1, 512, 512))
    assert [f.shape[-2:] for f in feats] == [(64, 64), (64, 64), (32, 32)]


def test_forward_shapes_and_input_layouts():
    net = make_net().eval()
    video = rand_video(2, 5, 64, 80)
    pts, frames = rand_queries(2, 7, 5, 64, 80)
    with torch.no_grad():
        out = net(video, pts, frames)
        out_c = net(video[:, :, None], pts, frames)
    assert out["tracks"].shape == (2, 5, 7, 2) and out["confidence"].shape == (2, 5, 7)
    assert torch.equal(out["tracks"], out_c["tracks"]) and torch.equal(out["confidence"], out_c["confidence"])
    assert torch.all((out["confidence"] >= 0) & (out["confidence"] <= 1))
    assert torch.isfinite(out["tracks"]).all()


def test_bundle_adapter_channel_first_pred():
    net = make_net().eval()
    adapter = SpeckNetBundleAdapter()
    adapter.load_state_dict(net.state_dict())  # same parameters: checkpoints are interchangeable
    video = rand_video(1, 4, 64, 64)
    pts, frames = rand_queries(1, 3, 4, 64, 64)
    with torch.no_grad():
        out = net(video, pts, frames)
        pred = adapter(video[:, None], pts, frames)  # MONAI channel-first (B, C, T, H, W)
    assert pred.shape == (1, 3, 4, 3)  # channel-first (B, 3, T, N): axis 1 is what verify_net_in_out checks
    tracks, conf = split_pred(pred)
    assert torch.equal(tracks, out["tracks"]) and torch.equal(conf, out["confidence"])


def test_bundle_adapter_tracks_a_centred_grid_without_query_points():
    """The model zoo calls a bundle network with the image alone: the adapter then tracks the centred default grid
    from frame 0, exactly as if those points had been passed."""
    torch.manual_seed(0)
    adapter = SpeckNetBundleAdapter(channels=(8, 16, 16, 16), default_grid=3, backend="torch").eval()
    image = rand_video(2, 3, 64, 48)[:, None]
    grid = centred_grid(64, 48, 3)
    assert grid.shape == (9, 2)
    # cell centres of a 3 x 3 tiling, pixel centres at integers: symmetric about the image centre ((W-1)/2, (H-1)/2)
    torch.testing.assert_close(grid[:3, 0], torch.tensor([7.5, 23.5, 39.5]))
    torch.testing.assert_close(grid[::3, 1], torch.tensor([64 / 6 - 0.5, 31.5, 5 * 64 / 6 - 0.5]))
    torch.testing.assert_close(grid.mean(0), torch.tensor([23.5, 31.5]))
    with torch.no_grad():
        default = adapter(image)
        explicit = adapter(image, grid[None].expand(2, -1, -1), torch.zeros(2, 9, dtype=torch.long))
    assert default.shape == (2, 3, 3, 9)
    assert torch.equal(default, explicit)
    with pytest.raises(ValueError, match="query_frames given without query_points"):
        adapter(image, None, 1)


# ---------------------------------------------------------------------------------------------------------------
# query frames, determinism, sampling
# ---------------------------------------------------------------------------------------------------------------


def test_query_frames_return_query_points_exactly():
    net = make_net().eval()
    video = rand_video(2, 6, 64, 64)
    pts, frames = rand_queries(2, 9, 6, 64, 64)
    pts = pts + 0.1234567  # not representable after a +-0.5 round trip in float32
    with torch.no_grad():
        out = net(video, pts, frames)
    b_idx, n_idx = torch.meshgrid(torch.arange(2), torch.arange(9), indexing="ij")
    assert torch.equal(out["tracks"][b_idx, frames, n_idx], pts)
    assert torch.equal(out["confidence"][b_idx, frames, n_idx], torch.ones(2, 9))
    # per-video and scalar query frames
    with torch.no_grad():
        per_video = net(video, pts, torch.tensor([4, 1]))
        scalar = net(video, pts, 3)
    assert torch.equal(per_video["tracks"][0, 4], pts[0]) and torch.equal(per_video["tracks"][1, 1], pts[1])
    assert torch.equal(scalar["tracks"][:, 3], pts)


def test_eval_forward_is_deterministic_and_chunk_independent():
    net = make_net().eval()
    video = rand_video(1, 6, 64, 64)
    pts, frames = rand_queries(1, 11, 6, 64, 64)
    with torch.no_grad():
        a = net(video, pts, frames)
        b = net(video, pts, frames)
        chunked = make_net(encoder_chunk_frames=2, chunk_frames=1, chunk_points=3).eval()
        chunked.load_state_dict(net.state_dict())
        c = chunked(video, pts, frames)
    assert torch.equal(a["tracks"], b["tracks"]) and torch.equal(a["confidence"], b["confidence"])
    torch.testing.assert_close(c["tracks"], a["tracks"], atol=1e-3, rtol=0)
    torch.testing.assert_close(c["confidence"], a["confidence"], atol=1e-4, rtol=0)


def test_train_and_eval_modes_compute_the_same_function():
    net = make_net()
    video = rand_video(1, 3, 64, 64)
    pts, frames = rand_queries(1, 4, 3, 64, 64)
    with torch.no_grad():
        train_out = net.train()(video, pts, frames)
        eval_out = net.eval()(video, pts, frames)
    torch.testing.assert_close(train_out["tracks"], eval_out["tracks"])


def test_query_sampling_matches_the_op_multiframe_sampler():
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(2, 5, 16, 8, 12, generator=g)
    pts = torch.rand(2, 13, 2, generator=g) * torch.tensor([96.0, 64.0]) - 2.0  # a few points past the border
    frames = torch.randint(0, 5, (2, 13), generator=g)
    ours = _sample_on_query_frames(fmap, pts, frames, (64, 96))
    ref = sample_query_features_multiframe(fmap, pts, frames, (64, 96))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_forms_are_wired_through():
    video = rand_video(1, 4, 64, 64)
    pts, frames = rand_queries(1, 6, 4, 64, 64)
    paper, authors = make_net(form="paper").eval(), make_net(form="authors").eval()
    authors.load_state_dict(paper.state_dict())
    with torch.no_grad():
        a, b = paper(video, pts, frames), authors(video, pts, frames)
    assert not torch.equal(a["confidence"], b["confidence"])


# ---------------------------------------------------------------------------------------------------------------
# tracking correctness
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form,search", [("paper", "global"), ("authors", "global"), ("paper", "chained")])
def test_hand_constructed_features_give_exact_tracks(form, search):
    """One-hot 'content id' features moving by whole cells: every tracked point must land on its moved cell centre.

    Checks the glue around the op (query sampling on each point's own frame, the +0.5 pixel-centre conversion both
    ways, scaling to pixels, query-frame replacement) without the encoder.
    """
    net = make_net(form=form, search=search, search_radius=2.0).eval()  # content moves <= 1 cell per frame
    size, stride, margin, t = 64, 8, 3, 6
    g = size // stride
    disp = torch.tensor([[0, 0], [1, 0], [1, -1], [2, -1], [2, -2], [3, -2]])  # (kx, ky) cells of frame t
    side = g + 2 * margin
    ids = [torch.randperm(side * side, generator=torch.Generator().manual_seed(s)).view(side, side) for s in (0, 1)]

    def onehot_maps(id_grid: torch.Tensor) -> torch.Tensor:
        maps = torch.zeros(1, t, side * side, g, g)
        for k in range(t):
            kx, ky = disp[k].tolist()
            crop = id_grid[margin - ky : margin - ky + g, margin - kx : margin - kx + g]  # content moved by (kx, ky)
            maps[0, k] = torch.nn.functional.one_hot(crop, side * side).permute(2, 0, 1).float()
        return maps

    coarse = torch.ones(1, t, 1, g // 2, g // 2)  # uninformative coarse scale: cosine 1 everywhere
    features = [onehot_maps(ids[0]), onehot_maps(ids[1]), coarse]

    qpts, qframes, expected = [], [], []
    rng = np.random.default_rng(0)
    for i in range(g):
        for j in range(g):
            q = int(rng.integers(t))
            cells = torch.tensor([j, i]) + disp - disp[q]  # (t, 2) cell of this content in every frame
            if (cells < 0).any() or (cells >= g).any():
                continue
            qpts.append([stride * j + (stride - 1) / 2, stride * i + (stride - 1) / 2])  # cell centre, data pixels
            qframes.append(q)
            expected.append(cells.float() * stride + (stride - 1) / 2)
    assert len(qpts) >= 8
    qp = torch.tensor([qpts])
    qf = torch.tensor([qframes])
    with torch.no_grad():
        out = net.track(features, qp, qf, (size, size))
    want = torch.stack(expected, dim=1)[None]  # (1, t, N, 2)
    torch.testing.assert_close(out["tracks"], want, atol=1e-3, rtol=0)
    assert out["confidence"].min() > 0.999


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untrained_network_tracks_cell_aligned_translation(seed):
    """Random weights already match translated texture when the shift is a whole feature cell (8 px) per frame.

    The zero-motion answer is 8 px or more off on every evaluated frame. (Shifts that are not multiples of 8 px
    are not tracked to 1 px by an untrained network: its matching weights are so peaked that the soft-argmax snaps
    to cell centres; sub-cell accuracy is what training buys.)
    """
    size, t, q, step = 96, 5, 2, (8, -8)
    net = make_net(seed).eval()
    video = translating_video(size, t, step, seed)
    centres = torch.arange(size // 8) * 8 + 3.5
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 2)
    motion = (torch.arange(t) - q)[:, None, None] * torch.tensor(step, dtype=torch.float32)
    truth = grid[None] + motion
    interior = ((truth >= 16) & (truth <= size - 17)).all(-1).all(0)  # away from the zero-padded border
    qp, truth = grid[interior][None], truth[:, interior][None]
    assert qp.shape[1] >= 9
    with torch.no_grad():
        out = net(video, qp, q)
    err = (out["tracks"] - truth).norm(dim=-1)
    evaluated = torch.arange(t) != q
    assert err[:, evaluated].max() < 1.0
    assert (truth - qp[:, None]).norm(dim=-1)[:, evaluated].min() >= 8.0  # the zero-motion predictor fails


def test_gradients_reach_every_parameter_through_the_soft_argmax():
    net = make_net().train()
    video = rand_video(1, 4, 64, 64)
    pts, frames = rand_queries(1, 6, 4, 64, 64)
    target = pts[:, None].expand(1, 4, 6, 2) + torch.randn(1, 4, 6, 2, generator=torch.Generator().manual_seed(5))
    out = net(video, pts, frames)
    loss = tracking_l1_loss(out["tracks"], target, torch.ones(1, 4, 6, dtype=torch.bool), frames)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# search settings: locality prior, radius units, per-call overrides
# ---------------------------------------------------------------------------------------------------------------


def test_module_search_settings_equal_per_call_overrides():
    video = rand_video(1, 5, 64, 64)
    pts, frames = rand_queries(1, 7, 5, 64, 64)
    base = make_net().eval()
    with torch.no_grad():
        feats = base.encode(video)
        for settings in (dict(search="chained", search_radius=2.0, radius=3.0),
                         dict(search="coarse_to_fine", search_radius=3.0, radius=2.0),
                         dict(radius=24.0, radius_unit="pixels")):
            net = make_net(**settings).eval()
            net.load_state_dict(base.state_dict())  # no new parameters or buffers: checkpoints interchangeable
            adapter = SpeckNetBundleAdapter(**settings).eval()
            adapter.load_state_dict(base.state_dict())
            module = net(video, pts, frames)
            call = base.track(feats, pts, frames, (64, 64), **settings)
            assert torch.equal(module["tracks"], call["tracks"]), settings
            assert torch.equal(module["confidence"], call["confidence"]), settings
            tracks, conf = split_pred(adapter(video[:, None], pts, frames))
            assert torch.equal(tracks, module["tracks"]) and torch.equal(conf, module["confidence"])
        # the overrides really change the search: chained with a 1-cell window differs from the default global one
        narrow = base.track(feats, pts, frames, (64, 64), search="chained", search_radius=1.0)
        assert not torch.equal(narrow["tracks"], base.track(feats, pts, frames, (64, 64))["tracks"])


def test_pixel_radii_are_divided_by_the_finest_feature_stride():
    video = rand_video(1, 5, 64, 64)
    pts, frames = rand_queries(1, 7, 5, 64, 64)
    net = make_net().eval()
    assert net.feature_strides[0] == 8
    with torch.no_grad():
        feats = net.encode(video)

        def run(**kw):
            return net.track(feats, pts, frames, (64, 64), **kw)

        for cells, pixels in ((dict(radius=5.0), dict(radius=40.0, radius_unit="pixels")),
                              (dict(radius=1.5), dict(radius=12.0, radius_unit="pixels")),
                              (dict(search="chained", search_radius=2.0, radius=2.0),
                               dict(search="chained", search_radius=2.0, radius=16.0, radius_unit="pixels"))):
            a, b = run(**cells), run(**pixels)
            assert torch.equal(a["tracks"], b["tracks"]) and torch.equal(a["confidence"], b["confidence"])
        # the paper's "five-pixel radius" is less than one cell: a different soft-argmax from 5 cells
        five_px, five_cells = run(radius=5.0, radius_unit="pixels"), run(radius=5.0)
        assert not torch.equal(five_px["confidence"], five_cells["confidence"])
        assert (five_px["confidence"] <= five_cells["confidence"] + 1e-6).all()  # a smaller disc holds less weight


def test_chained_search_returns_query_points_exactly_on_query_frames():
    net = make_net(search="chained", search_radius=2.0).eval()
    video = rand_video(2, 6, 64, 64)
    pts, frames = rand_queries(2, 9, 6, 64, 64)
    pts = pts + 0.1234567  # not representable after a +-0.5 round trip in float32
    with torch.no_grad():
        out = net(video, pts, frames)
    b_idx, n_idx = torch.meshgrid(torch.arange(2), torch.arange(9), indexing="ij")
    assert torch.equal(out["tracks"][b_idx, frames, n_idx], pts)
    assert torch.equal(out["confidence"][b_idx, frames, n_idx], torch.ones(2, 9))
    # every other frame is a windowed estimate: within search_radius + 1/2 cells of the previous frame's cell
    assert torch.isfinite(out["tracks"]).all() and (out["confidence"] <= 1).all()
    step = (out["tracks"][:, 1:] - out["tracks"][:, :-1]).abs().amax(-1)
    assert step.max() <= (2.0 + 1.0) * 8 + 1e-3


def test_untrained_network_with_chained_search_tracks_cell_aligned_translation():
    size, t, q, step = 96, 5, 2, (8, -8)
    net = make_net(0, search="chained", search_radius=1.0).eval()  # a window of +-1 cell around the last estimate
    video = translating_video(size, t, step, 0)
    centres = torch.arange(size // 8) * 8 + 3.5
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 2)
    truth = grid[None] + (torch.arange(t) - q)[:, None, None] * torch.tensor(step, dtype=torch.float32)
    interior = ((truth >= 16) & (truth <= size - 17)).all(-1).all(0)
    qp, truth = grid[interior][None], truth[:, interior][None]
    with torch.no_grad():
        out = net(video, qp, q)
    # two frames away from the query the point has moved 2 cells per axis, out of reach of a +-1 cell window around
    # the query cell: only the chained window (moved to the previous frame's estimate) follows it
    assert (out["tracks"] - truth).norm(dim=-1).max() < 1.0


def test_clear_errors_for_bad_search_settings():
    with pytest.raises(ValueError, match="radius_unit must be one of"):
        SpeckNet(radius_unit="mm")
    with pytest.raises(ValueError, match="search must be one of"):
        SpeckNet(search="local")
    with pytest.raises(ValueError, match="radius must be a finite positive number"):
        SpeckNet(radius=0.0)
    with pytest.raises(ValueError, match="search_radius must be a finite positive number"):
        SpeckNet(search_radius=float("nan"))
    with pytest.raises(ValueError, match=r"search_radius=0.5 finest-grid cells; the search window needs at least 1"):
        SpeckNet(search="chained", search_radius=0.5)
    SpeckNet(search="chained", radius_unit="pixels")  # the search window stays in cells whatever the radius unit
    net = make_net().eval()
    video = rand_video(1, 3, 64, 64)
    pts, frames = rand_queries(1, 2, 3, 64, 64)
    with torch.no_grad():
        feats = net.encode(video)
    with pytest.raises(ValueError, match="search must be one of"):
        net.track(feats, pts, frames, (64, 64), search="nearest")
    with pytest.raises(ValueError, match="radius_unit must be one of"):
        net.track(feats, pts, frames, (64, 64), radius_unit="px")


# ---------------------------------------------------------------------------------------------------------------
# export and clear failures
# ---------------------------------------------------------------------------------------------------------------


def test_trace_and_export_of_the_eval_adapter():
    torch.manual_seed(0)
    net = SpeckNetBundleAdapter(channels=(8, 16, 16, 16), backend="torch").eval()
    image = rand_video(1, 4, 64, 64)[:, None]
    pts, frames = rand_queries(1, 3, 4, 64, 64)
    with torch.no_grad():
        ref = net(image, pts, frames)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about specialised shapes are expected
            traced = torch.jit.trace(net, (image, pts, frames), check_trace=False)
        exported = torch.export.export(net, (image, pts, frames))
        other = rand_video(1, 4, 64, 64, seed=9)[:, None]
        pts2, frames2 = rand_queries(1, 3, 4, 64, 64, seed=10)
        for program in (traced, exported.module()):
            torch.testing.assert_close(program(image, pts, frames), ref)
            torch.testing.assert_close(program(other, pts2, frames2), net(other, pts2, frames2))


def test_clear_errors_for_bad_inputs():
    net = make_net().eval()
    pts, frames = rand_queries(1, 3, 4, 64, 64)
    with pytest.raises(ValueError, match="floating point"):
        net(torch.zeros(1, 4, 64, 64, dtype=torch.uint8), pts, frames)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(rand_video(1, 4, 60, 64), pts, frames)
    with pytest.raises(ValueError, match=r"\(B, N, 2\)"):
        net(rand_video(1, 4, 64, 64), pts[..., 0], frames)
    with pytest.raises(ValueError, match="query_frames must lie in"):
        net(rand_video(1, 4, 64, 64), pts, frames + 4)
    with pytest.raises(ValueError, match="channel-first"):
        SpeckNetBundleAdapter()(torch.zeros(1, 3, 4, 64, 64), pts, frames)
    with pytest.raises(ValueError, match="form"):
        SpeckNet(form="cosine")
