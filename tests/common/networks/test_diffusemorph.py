"""DiffuseMorph estimator: interface and shapes in 2D and 3D, the forward diffusion against float64 hand math,
deterministic registration at t = 0, gradient flow to both sub-networks, input validation, export by tracing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.networks.diffusemorph import DiffuseMorph
from common.networks.registration import (
    DisplacementEstimator,
    StackedPairAdapter,
    VoxelMorphEstimator,
    build_displacement_estimator,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
    pytest.mark.usefixtures("one_torch_thread"),
]

# small but complete: two diffusion levels with attention at the deepest, every deformation U-Net level
SMALL = dict(diffusion_channels=(8, 16), norm_num_groups=4, num_head_channels=8,
             deformation_features=(4, 8, 8, 8, 8, 4))


def _pair(spatial: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, *spatial, generator=g), torch.rand(2, 1, *spatial, generator=g)


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_factory_builds_it_with_the_estimator_interface(spatial):
    torch.manual_seed(0)
    est = build_displacement_estimator("diffusemorph", spatial_dims=len(spatial), **SMALL)
    assert isinstance(est, DiffuseMorph) and isinstance(est, DisplacementEstimator)
    assert est.has_training_loss and not est.has_velocity and est.size_divisor == 16
    source, target = _pair(spatial)
    warped, disp = est(source, target)
    assert warped.shape == source.shape and disp.shape == (2, len(spatial), *spatial)
    # the tiny-weight head starts at the identity: the warp returns the source
    assert disp.abs().max() < 1e-3
    assert torch.allclose(warped, source, atol=1e-3)
    est.eval()
    stacked = StackedPairAdapter(est)(torch.cat([source, target], dim=1))
    assert stacked.shape == disp.shape
    disp2, loss = est.forward_stacked(torch.cat([source, target], dim=1), return_training_loss=True)
    assert disp2.shape == disp.shape and loss.ndim == 0 and torch.isfinite(loss)


def test_default_configuration_is_lean_and_divisible_by_16():
    est = DiffuseMorph()
    n = sum(p.numel() for p in est.parameters())
    assert 0.5e6 < n < 1.2e6  # documented "about 0.85 M parameters in 2D"
    assert est.size_divisor == 16
    assert DiffuseMorph(diffusion_channels=(8,) * 6, num_head_channels=8).size_divisor == 32


def test_training_forward_matches_the_ddpm_forward_process_in_float64():
    torch.manual_seed(0)
    est = DiffuseMorph(**SMALL)
    source, target = _pair((32, 32), seed=1)
    noise = torch.randn_like(target)
    t = torch.tensor([0, 1999])
    out = est.diffusion_forward(source, target, noise=noise, timesteps=t)
    # independent schedule: β linear in [1e-6, 1e-2] over 2000 steps, ᾱ_t = Π_{s<=t} (1 - β_s)
    abar = np.cumprod(1.0 - np.linspace(1e-6, 1e-2, 2000, dtype=np.float64))[t.numpy()]
    x0 = 2.0 * target.double().numpy() - 1.0
    expected = np.sqrt(abar)[:, None, None, None] * x0 + np.sqrt(1 - abar)[:, None, None, None] * noise.double().numpy()
    # MONAI accumulates ᾱ in float32 over 2000 steps (~3e-5 off); a wrong schedule or t is off by >> 1e-2
    np.testing.assert_allclose(out.noisy_target.numpy(), expected, atol=1e-4)
    assert abar[1] < 1e-3  # at t = T - 1 the target is (almost) pure noise
    with torch.no_grad():
        eps = est.diffusion(torch.cat([2 * source - 1, 2 * target - 1, out.noisy_target], dim=1), t)
        disp = est.deformation(torch.cat([source, eps], dim=1))
    torch.testing.assert_close(out.noise_pred, eps)
    torch.testing.assert_close(out.displacement, disp)


def test_registration_is_deterministic_at_t0_on_the_target_and_training_is_stochastic():
    torch.manual_seed(0)
    est = DiffuseMorph(**SMALL)
    with torch.no_grad():  # a visible field, and an ε̂ that depends on its input (MONAI zero-initialises that conv)
        est.deformation.final_conv.weight.normal_(0, 0.5)
        est.diffusion.out[2].conv.weight.normal_(0, 0.5)
    source, target = _pair((32, 32), seed=2)
    est.eval()
    with torch.no_grad():
        d1, d2 = est(source, target)[1], est(source, target)[1]
        tgt = 2 * target - 1
        eps0 = est.diffusion(torch.cat([2 * source - 1, tgt, tgt], dim=1), torch.zeros(2, dtype=torch.long))
        by_hand = est.deformation(torch.cat([source, eps0], dim=1))
        half = est.register(source, target, eta=0.5)
        by_hand_half = est.deformation(torch.cat([source, 0.5 * eps0], dim=1))
    assert torch.equal(d1, d2)
    torch.testing.assert_close(d1, by_hand)
    torch.testing.assert_close(half, by_hand_half)
    est.train()
    with torch.no_grad():
        t1, t2 = est(source, target)[1], est(source, target)[1]
    assert (t1 - t2).abs().max() > 1e-3


def test_every_parameter_of_both_networks_gets_a_gradient():
    torch.manual_seed(0)
    est = DiffuseMorph(**SMALL)
    source, target = _pair((32, 32), seed=3)
    disp, loss = est.predict_displacement_and_training_loss(source, target)
    (est.warp(source, disp) - target).pow(2).mean().backward(retain_graph=True)
    # the registration loss alone reaches the diffusion network through ε̂ (the deformation network's input)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in est.diffusion.parameters())
    loss.backward()
    missing = [n for n, p in est.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing  # DDP without find_unused_parameters needs every parameter used
    assert all(p.grad.abs().sum() > 0 for p in est.deformation.parameters())


def test_clear_errors():
    est = DiffuseMorph(**SMALL)
    with pytest.raises(ValueError, match="divisible by 16"):
        est(*_pair((24, 24)))
    with pytest.raises(ValueError, match="1 channel"):
        est(torch.rand(1, 2, 32, 32), torch.rand(1, 2, 32, 32))
    with pytest.raises(ValueError, match="norm_num_groups"):
        DiffuseMorph(diffusion_channels=(6, 12))
    with pytest.raises(ValueError, match="6 positive widths"):
        DiffuseMorph(deformation_features=(4, 8, 8))
    with pytest.raises(ValueError, match="num_head_channels"):
        DiffuseMorph(diffusion_channels=(8, 24), num_head_channels=16)
    with pytest.raises(ValueError, match="one flag per level"):
        DiffuseMorph(diffusion_attention=(True,))
    with pytest.raises(ValueError, match="timesteps"):
        est.diffusion_forward(*_pair((32, 32)), timesteps=torch.tensor([0, 2000]))
    with pytest.raises(ValueError, match="no velocity field"):
        est.forward_stacked(torch.rand(1, 2, 32, 32), return_velocity=True)
    with pytest.raises(ValueError, match="no training loss"):
        VoxelMorphEstimator(enc_channels=(4, 4, 4, 4), dec_channels=(4,) * 7).forward_stacked(
            torch.rand(1, 2, 32, 32), return_training_loss=True)


def test_exports_by_tracing_not_scripting():
    torch.manual_seed(0)
    net = StackedPairAdapter(DiffuseMorph(**SMALL)).eval()
    image = torch.rand(1, 2, 32, 32)
    with pytest.raises(RuntimeError, match="use_trace"):
        torch.jit.script(net)
    traced = torch.jit.trace(net, image, check_trace=False)
    other = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), net(other))
