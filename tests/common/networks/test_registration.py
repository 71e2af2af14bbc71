"""Displacement estimators (VoxelMorph, TransMorph), the stacked-pair adapter, and the AdaCS scoring/variance nets."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from monai.networks.blocks.warp import Warp
from torch import nn

from common.losses.adacs import plain_registration_loss
from common.networks.registration import (
    ESTIMATORS,
    DisplacementEstimator,
    StackedPairAdapter,
    VoxelMorphEstimator,
    build_displacement_estimator,
    pull_warp,
    voxelmorph_unet_channels,
)
from common.networks.scoring import ScoringNet, VarianceNet, VoxelMorphStyleUNet
from common.networks.transmorph import TransMorph

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")

# small but complete configurations: every stage, skip and head is exercised
TM_SMALL = dict(embed_dim=8, depths=(2, 2, 2), num_heads=(2, 2, 2), window_size=4, drop_path_rate=0.0)
CONFIGS = {
    "voxelmorph": ({}, 32),
    "transmorph": (TM_SMALL, 32),
}


def _build(name: str, **extra) -> DisplacementEstimator:
    kwargs, _ = CONFIGS[name]
    return build_displacement_estimator(name, **{**kwargs, **extra})


def _pair(size: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, size, size, generator=g), torch.rand(batch, 1, size, size, generator=g)


def _head(est: DisplacementEstimator) -> nn.Conv2d:
    return est.net.backbone.net[1].final_conv_out.conv if isinstance(est, VoxelMorphEstimator) else est.reg_head


def _wake_head(est: DisplacementEstimator, std: float = 0.05) -> None:
    """Replace the near-zero head init so the displacement depends visibly on the input."""
    with torch.no_grad():
        _head(est).weight.normal_(0.0, std, generator=torch.Generator().manual_seed(1))


def _conv_params(cin: int, cout: int, k: int = 9) -> int:
    return k * cin * cout + cout


def test_registry_builds_both_estimators():
    assert set(ESTIMATORS) >= {"voxelmorph", "transmorph"}
    assert isinstance(_build("voxelmorph"), VoxelMorphEstimator)
    assert isinstance(_build("transmorph"), TransMorph)
    with pytest.raises(ValueError, match="unknown displacement estimator"):
        build_displacement_estimator("diffusemorph-typo")


def test_voxelmorph_channel_mapping_and_size():
    assert voxelmorph_unet_channels((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16)) == (
        (16, 32, 32, 32, 32, 32, 32, 32),
        32,
        (16, 16),
    )
    # independent count of the VoxelMorph-paper U-Net: 4 encoder convs, bottleneck + 3 decoder convs with skips,
    # full-resolution convs 32 (after the top skip), 16, 16, and the 2-channel velocity head
    convs = [(2, 16), (16, 32), (32, 32), (32, 32), (32, 32), (64, 32), (64, 32), (64, 32), (48, 32), (32, 16)]
    convs += [(16, 16), (16, 2)]
    expected = sum(_conv_params(i, o) for i, o in convs)
    est = VoxelMorphEstimator()
    assert sum(p.numel() for p in est.parameters()) == expected
    assert est.integration_steps == 7 and est.net.dvf2ddf.num_steps == 7
    # the scoring U-Net has the same layout on one input channel, plus the 1-channel score head
    unet = VoxelMorphStyleUNet(2, 1)
    convs_1ch = [(1, 16)] + convs[1:-1]
    assert sum(p.numel() for p in unet.parameters()) == sum(_conv_params(i, o) for i, o in convs_1ch)
    assert sum(p.numel() for p in ScoringNet().parameters()) == sum(_conv_params(i, o) for i, o in convs_1ch) + (
        _conv_params(16, 1)
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes(name):
    est = _build(name).eval()
    size = CONFIGS[name][1]
    source, target = _pair(size, batch=3)
    with torch.no_grad():
        warped, disp = est(source, target)
        stacked = est.forward_stacked(torch.cat([source, target], dim=1))
        adapted = StackedPairAdapter(est)(torch.cat([source, target], dim=1))
    assert warped.shape == (3, 1, size, size) and disp.shape == (3, 2, size, size)
    assert torch.equal(stacked, disp) and torch.equal(adapted, disp)
    assert torch.isfinite(warped).all() and torch.isfinite(disp).all()
    # the near-zero head init starts training close to the identity
    assert disp.abs().max() < 1e-2


def test_3d_shapes():
    vxm = VoxelMorphEstimator(spatial_dims=3, enc_channels=(8, 8), dec_channels=(8, 8, 8, 8)).eval()
    tm = TransMorph(spatial_dims=3, embed_dim=8, depths=(1, 1), num_heads=(2, 2), window_size=2, drop_path_rate=0.0)
    x = torch.rand(1, 1, 16, 16, 16)
    for est in (vxm, tm.eval()):
        with torch.no_grad():
            warped, disp = est(x, x)
        assert warped.shape == (1, 1, 16, 16, 16) and disp.shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_displacement_is_identity(name):
    est = _build(name)
    source, _ = _pair(CONFIGS[name][1])
    zero = torch.zeros(source.shape[0], 2, *source.shape[2:])
    assert (est.warp(source, zero) - source).abs().max() < 1e-5
    labels = (source * 4).floor().long()
    assert torch.equal(est.warp(labels, zero, mode="nearest"), labels)


def test_known_translation_warps_correctly():
    est = VoxelMorphEstimator()
    source, _ = _pair(32, batch=1)
    dy, dx = 2, -3
    disp = torch.zeros(1, 2, 32, 32)
    disp[:, 0], disp[:, 1] = dy, dx
    warped = est.warp(source, disp)
    # pull convention: warped[y, x] = source[y + dy, x + dx]; compare where the sample stays inside the image
    expected = source[:, :, dy:, : 32 + dx]
    assert (warped[:, :, : 32 - dy, -dx:] - expected).abs().max() < 1e-5
    assert warped[:, :, 32 - dy :, :].abs().max() == 0  # pulled from outside: zero padding
    # sub-pixel: bilinear interpolation is exact on a linear ramp
    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 1, 32, 32).contiguous()
    half = torch.zeros(1, 2, 32, 32)
    half[:, 1] = 0.5
    assert (est.warp(ramp, half)[..., :-1] - (ramp[..., :-1] + 0.5)).abs().max() < 1e-5
    # nearest for label maps: integer shift moves labels exactly, fractional shift rounds
    labels = torch.randint(0, 4, (1, 1, 32, 32), generator=torch.Generator().manual_seed(3))
    assert torch.equal(est.warp(labels, disp, mode="nearest")[:, :, : 32 - dy, -dx:], labels[:, :, dy:, : 32 + dx])
    with pytest.raises(ValueError, match="warp mode"):
        est.warp(source, disp, mode="bicubic")


class _FixedVelocity(nn.Module):
    def __init__(self, velocity: torch.Tensor) -> None:
        super().__init__()
        self.velocity = velocity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.velocity.expand(x.shape[0], -1, -1, -1)


def _rotation_velocity(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    c = (size - 1) / 2
    damp = torch.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * 14.0**2))
    return (torch.stack([0.15 * (xx - c), -0.15 * (yy - c)]) * damp)[None].float()


def test_voxelmorph_integration_full_and_half_resolution():
    size = 64
    v = _rotation_velocity(size)
    full = VoxelMorphEstimator(integration_steps=7)
    half = VoxelMorphEstimator(integration_steps=7, half_res=True)
    plain = VoxelMorphEstimator(integration_steps=0)
    for est in (full, half, plain):
        est.net.backbone = _FixedVelocity(v)
    x = torch.rand(1, 1, size, size)
    u_full, u_half, u_plain = full(x, x)[1], half(x, x)[1], plain(x, x)[1]
    assert torch.equal(u_plain, v)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    # scaling and squaring bends the rotation: the displacement differs from the velocity ...
    assert (u_full - v)[inner].abs().max() > 0.04
    # ... and integrating at half resolution with VoxelMorph's scaling reproduces it (MONAI's own half-res scaling
    # is off by 0.2 px here)
    assert (u_half - u_full)[inner].abs().max() < 0.03
    # a constant velocity integrates to the same translation
    const = torch.zeros(1, 2, size, size)
    const[:, 0], const[:, 1] = 1.5, -2.0
    full.net.backbone = _FixedVelocity(const)
    assert (full(x, x)[1] - const)[inner].abs().max() < 1e-4


def test_voxelmorph_velocity_output_and_grid_cache_reset():
    x, y = _pair(32)
    for half_res, vel_size in ((False, 32), (True, 16)):
        est = VoxelMorphEstimator(half_res=half_res).eval()
        _wake_head(est)
        with torch.no_grad():
            warped, disp, vel = est.forward_with_velocity(x, y)
            ref_warped, ref_disp = est(x, y)
        assert vel.shape == (2, 2, vel_size, vel_size)
        assert torch.allclose(disp, ref_disp, atol=1e-6) and torch.allclose(warped, ref_warped, atol=1e-6)
    # MONAI's Warp keeps its reference grid as a plain attribute: moving the module must drop it
    warps = [m for m in est.modules() if isinstance(m, Warp)]
    assert len(warps) == 4 and any(w.ref_grid is not None for w in warps)
    est.to(torch.float64)
    assert all(w.ref_grid is None for w in warps)
    with torch.no_grad():
        assert est(x.double(), y.double())[1].dtype == torch.float64


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_flow(name):
    est = _build(name).train()
    source, target = _pair(CONFIGS[name][1])
    warped, disp = est(source, target)
    plain_registration_loss(target, warped, disp, lam=0.01).backward()
    for pname, p in est.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eval_determinism(name):
    est = _build(name, drop_path_rate=0.3) if name == "transmorph" else _build(name)
    _wake_head(est)
    est.eval()
    source, target = _pair(CONFIGS[name][1])
    with torch.no_grad():
        a = est(source, target)
        b = est(source, target)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].abs().max() > 1e-3  # not trivially zero


def test_input_validation():
    est = VoxelMorphEstimator()
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="1 channel"):
        est(torch.rand(1, 2, 32, 32), torch.rand(1, 2, 32, 32))
    with pytest.raises(ValueError, match="shapes differ"):
        est(x, torch.rand(1, 1, 32, 48))
    with pytest.raises(ValueError, match="divisible by 16"):
        est(torch.rand(1, 1, 40, 40), torch.rand(1, 1, 40, 40))
    with pytest.raises(ValueError, match="2 channels"):
        StackedPairAdapter(est)(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible by 16"):
        TransMorph(**TM_SMALL)(torch.rand(1, 1, 40, 40), torch.rand(1, 1, 40, 40))
    with pytest.raises(ValueError, match="num_heads"):
        TransMorph(embed_dim=6, depths=(1, 1), num_heads=(4, 4))
    with pytest.raises(ValueError, match="DisplacementEstimator"):
        StackedPairAdapter(ScoringNet())


def test_scoring_and_variance_nets():
    g = ScoringNet().eval()
    target, warped = _pair(32)
    with torch.no_grad():
        score = g(target)
    assert score.shape == (2, 1, 32, 32) and score.min() >= 0 and score.max() <= 1
    with pytest.raises(ValueError, match="1 channel"):
        g(torch.rand(1, 2, 32, 32))
    var = VarianceNet()
    warped = warped.clone().requires_grad_(True)
    target = target.clone().requires_grad_(True)
    log_var = var(target, warped)
    assert log_var.shape == (2, 1, 32, 32)
    log_var.sum().backward()
    assert warped.grad is None and target.grad is not None  # warped enters detached by default
    warped.grad = None
    VarianceNet(detach_warped_input=False)(target, warped).sum().backward()
    assert warped.grad is not None and warped.grad.abs().sum() > 0


# a two-stage TransMorph keeps tracing/exporting quick while covering windows, shifts, merging and all skips
EXPORT_CONFIGS = {
    "voxelmorph": ({}, 32),
    "transmorph": (dict(embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=4, drop_path_rate=0.0), 32),
}


@pytest.fixture(scope="module", params=sorted(EXPORT_CONFIGS))
def exported(request):
    """``(adapter, example, other, traced)``: the inference model of one estimator, traced once per module."""
    kwargs, size = EXPORT_CONFIGS[request.param]
    est = build_displacement_estimator(request.param, **kwargs)
    _wake_head(est)
    adapter = StackedPairAdapter(est).eval()
    example, other = torch.cat(_pair(size, seed=5), dim=1), torch.cat(_pair(size, seed=6), dim=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # check_trace would re-run the model twice; the test below compares against eager outputs instead
        traced = torch.jit.trace(adapter, example, check_trace=False)
    return adapter, example, other, traced


def test_exported_model_holds_only_the_displacement_estimator(exported):
    adapter, _, _, traced = exported
    scoring = ScoringNet()
    est_ids = {id(p) for p in adapter.estimator.parameters()}
    assert not est_ids & {id(p) for p in scoring.parameters()}
    assert all(k.startswith("estimator.") for k in adapter.state_dict())
    n_traced = sum(p.numel() for p in traced.parameters())
    n_est = sum(p.numel() for p in adapter.estimator.parameters())
    assert n_traced == n_est
    assert n_traced != n_est + sum(p.numel() for p in scoring.parameters())


def test_jit_trace_roundtrip(exported):
    adapter, example, other, traced = exported
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    with torch.no_grad():
        eager = adapter(other)
        assert eager.abs().max() > 1e-3
        assert (loaded(other) - eager).abs().max() < 1e-5
        assert (loaded(other) - loaded(example)).abs().max() > 1e-4  # input-dependent, not a baked constant


def test_torch_export(exported):
    adapter, example, other, _ = exported
    with warnings.catch_warnings():
        # MONAI's Warp caches its reference grid as a plain attribute; export notes it and bakes the grid in
        warnings.simplefilter("ignore", UserWarning)
        program = torch.export.export(adapter, (example,))
    with torch.no_grad():
        assert (program.module()(other) - adapter(other)).abs().max() < 1e-5


def test_transmorph_default_size_is_documented():
    tm = TransMorph()
    assert (tm.patch_embed.embed_dim, len(tm.stages)) == (96, 4)
    assert [len(s.blocks) for s in tm.stages] == [2, 2, 4, 2]
    assert tm.size_divisor == 32
    n = sum(p.numel() for p in tm.parameters())
    assert math.isclose(n / 1e6, 31.0, abs_tol=0.5)


@pytest.mark.parametrize("spatial_dims, mode, padding", [(2, "bilinear", "zeros"), (3, "bilinear", "zeros"),
                                                         (2, "nearest", "border")])
def test_pull_warp_equals_monai_warp(spatial_dims, mode, padding):
    """The TorchScript-compatible warp of the scripted export is MONAI's Warp (PyTorch path), value for value."""
    g = torch.Generator().manual_seed(3)
    size = (9, 12) if spatial_dims == 2 else (5, 7, 6)
    image = torch.rand(2, 3, *size, generator=g)
    ddf = 3 * torch.randn(2, spatial_dims, *size, generator=g)  # large enough to leave the image in places
    torch.testing.assert_close(pull_warp(image, ddf, mode, padding), Warp(mode, padding)(image, ddf),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, spatial_dims, size", [
    ({}, 2, (64, 48)),
    ({"half_res": True}, 2, (32, 32)),
    ({"integration_steps": 0}, 2, (32, 32)),
    ({"enc_channels": (4, 4), "dec_channels": (4, 4, 4)}, 3, (8, 12, 16)),
])
def test_voxelmorph_adapter_scripts_and_equals_eager(kwargs, spatial_dims, size):
    """`ckpt_export` without --use_trace calls torch.jit.script: the VoxelMorph bundle network compiles (through the
    adapter's __prepare_scriptable__), shares the eager weights and computes the same displacement."""
    est = build_displacement_estimator("voxelmorph", spatial_dims=spatial_dims, **kwargs)
    with torch.no_grad():
        for p in est.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    adapter = StackedPairAdapter(est).eval()
    scripted = torch.jit.script(adapter)
    assert isinstance(scripted, torch.jit.ScriptModule)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.rand(2, 2, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        eager = adapter(x)
        assert eager.abs().max() > 1e-2  # a displacement worth comparing
        torch.testing.assert_close(loaded(x), eager, rtol=1e-5, atol=1e-6)
        # scripting left the eager network intact
        torch.testing.assert_close(adapter(x), eager, rtol=0, atol=0)
    with pytest.raises(Exception, match="divisible by"):
        loaded(torch.rand(1, 2, *[s + 1 for s in size]))


def test_transmorph_adapter_refuses_scripting_with_the_documented_alternative():
    adapter = StackedPairAdapter(_build("transmorph")).eval()
    with pytest.raises(RuntimeError, match=r"cannot be compiled with torch.jit.script.*--use_trace True"):
        torch.jit.script(adapter)
