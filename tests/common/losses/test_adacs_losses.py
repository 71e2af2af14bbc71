"""AdaCS Eq. 1-9 and the baseline losses against float64 NumPy references, stop-gradients, momentum state."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from common.losses.adacs import (
    MomentumTVWeight,
    adaframe_loss,
    adaframe_weight,
    adareg_loss,
    adareg_weight,
    beta_nll_loss,
    displacement_step_loss,
    gaussian_nll_loss,
    gradient_smoothness,
    plain_registration_loss,
    residual_energy,
    score_regularizer,
    scoring_data_term,
    scoring_step_loss,
    weighted_gradient_smoothness,
)
from common.networks.registration import VoxelMorphEstimator
from common.networks.scoring import ScoringNet

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")


def _data(seed: int = 0, shape=(2, 1, 12, 10)):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g, dtype=torch.float64)
    warped = torch.rand(shape, generator=g, dtype=torch.float64)
    score = torch.rand(shape, generator=g, dtype=torch.float64)
    disp = 3 * torch.randn((shape[0], len(shape) - 2, *shape[2:]), generator=g, dtype=torch.float64)
    return target, warped, score, disp


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def _ref_smooth(v: np.ndarray, w: np.ndarray | None = None) -> float:
    """(1/n) Σ_k mean over (b, c, x) of w(x) (v(x + e_k) - v(x))², written with np.diff."""
    terms = []
    for axis in range(2, v.ndim):
        d2 = np.diff(v, axis=axis) ** 2
        if w is not None:
            idx = [slice(None)] * v.ndim
            idx[axis] = slice(0, v.shape[axis] - 1)
            d2 = d2 * w[tuple(idx)]
        terms.append(d2.mean())
    return float(np.mean(terms))


@pytest.mark.parametrize("shape", [(2, 2, 9, 7), (1, 3, 5, 6, 4)])
def test_gradient_smoothness_matches_reference(shape):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert math.isclose(float(gradient_smoothness(v)), _ref_smooth(_np(v)), rel_tol=1e-12)
    w = torch.rand((shape[0], 1, *shape[2:]), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert math.isclose(float(weighted_gradient_smoothness(v, w)), _ref_smooth(_np(v), _np(w)), rel_tol=1e-12)
    assert math.isclose(float(weighted_gradient_smoothness(v, torch.ones_like(w))), float(gradient_smoothness(v)))
    # hand value: a ramp of slope 2 along the last axis only -> (1/n) * 4
    ramp = 2.0 * torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 5, 7)
    assert math.isclose(float(gradient_smoothness(ramp)), 4.0 / 2)


def test_eq1_eq2_eq3_eq4_values():
    target, warped, score, disp = _data()
    t, w, s, u = _np(target), _np(warped), _np(score), _np(disp)
    lam, alpha, beta, m = 0.01, 0.02, 1.5, 0.7
    assert math.isclose(
        float(plain_registration_loss(target, warped, disp, lam)), ((t - w) ** 2).mean() + lam * _ref_smooth(u)
    )
    assert math.isclose(
        float(displacement_step_loss(target, warped, disp, score, lam)),
        (s * (t - w) ** 2).mean() + lam * _ref_smooth(u),
    )
    assert math.isclose(float(scoring_data_term(target, warped, score)), (s * (t - w) ** 2).mean())
    assert math.isclose(float(score_regularizer(score)), ((1 - s) ** 2).mean())
    expected = (s * (t - w) ** 2).mean() + alpha * ((1 - s) ** 2).mean() + beta * m * _ref_smooth(s)
    assert math.isclose(float(scoring_step_loss(target, warped, score, alpha, beta, m)), expected, rel_tol=1e-12)
    assert math.isclose(float(residual_energy(target, warped)), ((t - w) ** 2).mean())
    # Ŝ ≡ 1 turns the displacement step into the plain loss (the warm-up of Algorithm 1)
    ones = torch.ones_like(score)
    assert math.isclose(
        float(displacement_step_loss(target, warped, disp, ones, lam)),
        float(plain_registration_loss(target, warped, disp, lam)),
    )


def _small_nets():
    torch.manual_seed(0)
    f = VoxelMorphEstimator(enc_channels=(4, 4), dec_channels=(4, 4, 4))
    with torch.no_grad():
        f.net.backbone.net[1].final_conv_out.conv.weight.normal_(0, 0.1)
    g = ScoringNet(enc_channels=(4, 4), dec_channels=(4, 4, 4))
    source, target = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    return f, g, source, target


def _grads(loss: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True))


def test_eq2_gives_no_gradient_to_the_scoring_net():
    f, g, source, target = _small_nets()
    warped, disp = f(source, target)
    score = g(target)
    loss = displacement_step_loss(target, warped, disp, score, lam=0.01)
    assert all(gr is None for gr in _grads(loss, g))
    f_grads = _grads(loss, f)
    assert all(gr is not None for gr in f_grads) and any(gr.abs().sum() > 0 for gr in f_grads)
    # the same product without the stop-gradient would train g: the check above can fail
    leaky = (score * (target - warped).pow(2)).mean()
    assert any(gr is not None and gr.abs().sum() > 0 for gr in _grads(leaky, g))


def test_eq3_eq9_give_no_gradient_to_the_displacement_net():
    f, g, source, target = _small_nets()
    warped, disp = f(source, target)
    score = g(target)
    for loss in (scoring_data_term(target, warped, score), scoring_step_loss(target, warped, score, 0.02, 1.5, 0.8)):
        assert all(gr is None for gr in _grads(loss, f))
        g_grads = _grads(loss, g)
        assert all(gr is not None for gr in g_grads) and any(gr.abs().sum() > 0 for gr in g_grads)
    leaky = (score * (target - warped).pow(2)).mean()
    assert any(gr is not None and gr.abs().sum() > 0 for gr in _grads(leaky, f))


def test_momentum_weight_hand_computed_sequence():
    mom = MomentumTVWeight()
    assert mom.value == 0.0  # m_0
    # γ = min(1 - 1/(epoch+1), 0.99): epochs 0, 1, 2, 3 -> 0, 1/2, 2/3, 3/4
    # b = cos(π/2 μ) for μ = 0.5, 0.2, 0.1, 0.05 -> 0.70710678, 0.95105652, 0.98768834, 0.99691733
    # m_1 = b_1; m_2 = (m_1 + b_2)/2; m_3 = 2/3 m_2 + 1/3 b_3; m_4 = 3/4 m_3 + 1/4 b_4
    expected = [0.7071067812, 0.8290816487, 0.8819505460, 0.9106922430]
    for epoch, (mu, m) in enumerate(zip([0.5, 0.2, 0.1, 0.05], expected)):
        assert abs(mom.update(mu, epoch) - m) < 1e-9
    assert mom.num_updates == 4
    assert mom.decay(49) == pytest.approx(0.98) and mom.decay(100) == 0.99 and mom.decay(1000) == 0.99
    # a tensor residual is accepted; the authors' scale folds 100 into the cosine
    code_form = MomentumTVWeight(residual_scale=100.0)
    assert abs(code_form.update(torch.tensor(0.004, dtype=torch.float64), 0) - math.cos(math.pi * 50 * 0.004)) < 1e-12
    with pytest.raises(ValueError, match="finite"):
        mom.update(float("nan"), 5)


def test_momentum_weight_save_and_resume_continues_identically():
    rng = np.random.default_rng(0)
    schedule = [(float(mu), epoch) for epoch in range(6) for mu in rng.uniform(0.0, 0.3, size=3)]
    reference = MomentumTVWeight()
    ref_values = [reference.update(mu, epoch) for mu, epoch in schedule]

    first = MomentumTVWeight()
    for mu, epoch in schedule[:8]:
        first.update(mu, epoch)
    buffer = io.BytesIO()
    torch.save({"momentum": first.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["momentum"]
    resumed = MomentumTVWeight()
    resumed.load_state_dict(state)
    resumed_values = [resumed.update(mu, epoch) for mu, epoch in schedule[8:]]
    assert resumed_values == ref_values[8:]  # bit-identical continuation
    assert resumed.num_updates == len(schedule)
    with pytest.raises(ValueError, match="missing"):
        MomentumTVWeight().load_state_dict({"m": 0.5})


def test_adareg_weight_and_loss():
    target, warped, _, disp = _data(3)
    t, w, u = _np(target), _np(warped), _np(disp)
    rho = np.abs(t - w)
    sigma = rho.mean(axis=(1, 2, 3), keepdims=True)
    ref_w = np.exp(-50.0 * rho * sigma)
    weight = adareg_weight(target, warped)
    np.testing.assert_allclose(_np(weight), ref_w, rtol=1e-12)
    expected = ((t - w) ** 2).mean() + 0.01 * _ref_smooth(u, ref_w)
    assert math.isclose(float(adareg_loss(target, warped, disp, lam=0.01)), expected, rel_tol=1e-12)
    # larger residuals relax the smoothness more; the weight carries no gradient
    flat_w, flat_rho = _np(weight).ravel(), rho.ravel()
    order = np.argsort(flat_rho[: flat_rho.size // 2])  # first image only: one σ
    assert np.all(np.diff(flat_w[: flat_rho.size // 2][order]) <= 1e-15)
    warped_req = warped.clone().requires_grad_(True)
    assert adareg_weight(target, warped_req).grad_fn is None


def test_adaframe_weight_and_loss():
    target, warped, _, disp = _data(4)
    t, w, u = _np(target), _np(warped), _np(disp)
    rho = np.abs(t - w)
    mean = rho.mean(axis=(1, 2, 3), keepdims=True)
    std = np.sqrt(((rho - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True))
    a, b = 0.1 / (mean + 1e-7), 10.0 * (1 - np.cos(np.pi * mean))
    ref_w = 1.0 - 1.0 / (1.0 + np.exp(-(a * (rho - mean) / (std + 1e-7) - b)))
    np.testing.assert_allclose(_np(adaframe_weight(target, warped)), ref_w, rtol=1e-10)
    expected = (ref_w * (t - w) ** 2).mean() + 0.01 * _ref_smooth(u)
    assert math.isclose(float(adaframe_loss(target, warped, disp, lam=0.01)), expected, rel_tol=1e-10)
    # the weight is detached: the data-term gradient is the weighted MSE gradient
    warped_req = warped.clone().requires_grad_(True)
    zero = torch.zeros_like(disp)
    (grad,) = torch.autograd.grad(adaframe_loss(target, warped_req, zero), warped_req)
    np.testing.assert_allclose(_np(grad), -2 * ref_w * (t - w) / t.size, rtol=1e-8)


def test_nll_and_beta_nll():
    target, warped, _, disp = _data(5)
    log_var = torch.randn(target.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t, w, s, u = _np(target), _np(warped), _np(log_var), _np(disp)
    nll_map = 0.5 * (t - w) ** 2 / np.exp(s) + 0.5 * s
    assert math.isclose(
        float(gaussian_nll_loss(target, warped, log_var, disp, lam=0.01)), nll_map.mean() + 0.01 * _ref_smooth(u)
    )
    assert math.isclose(
        float(beta_nll_loss(target, warped, log_var, disp, lam=0.01, beta=0.5)),
        (np.exp(0.5 * s) * nll_map).mean() + 0.01 * _ref_smooth(u),
        rel_tol=1e-12,
    )
    assert math.isclose(
        float(beta_nll_loss(target, warped, log_var, disp, beta=0.0)),
        float(gaussian_nll_loss(target, warped, log_var, disp)),
    )
    # NLL: the variance gradient vanishes at σ² = r² (the MLE), and the variance receives gradient (joint training)
    r2 = (target - warped).pow(2)
    at_mle = r2.log().clone().requires_grad_(True)
    (g_var,) = torch.autograd.grad(gaussian_nll_loss(target, warped, at_mle, torch.zeros_like(disp)), at_mle)
    assert g_var.abs().max() < 1e-12
    # β-NLL with β = 1: the mean's gradient is that of ½ MSE whatever the variance (Seitzer et al.)
    warped_req = warped.clone().requires_grad_(True)
    (g_beta,) = torch.autograd.grad(
        beta_nll_loss(target, warped_req, log_var, torch.zeros_like(disp), beta=1.0), warped_req
    )
    warped_mse = warped.clone().requires_grad_(True)
    (g_mse,) = torch.autograd.grad(0.5 * (target - warped_mse).pow(2).mean(), warped_mse)
    torch.testing.assert_close(g_beta, g_mse, rtol=1e-10, atol=1e-14)
    # β-NLL's weight ⌊σ^(2β)⌋ is a constant for autograd: d/ds = σ^(2β) ½ (1 - r² e^(-s)) / N, no β σ^(2β) NLL term
    s_req = log_var.clone().requires_grad_(True)
    (g_s,) = torch.autograd.grad(beta_nll_loss(target, warped, s_req, torch.zeros_like(disp), beta=0.5), s_req)
    expected = np.exp(0.5 * s) * 0.5 * (1 - (t - w) ** 2 * np.exp(-s)) / t.size
    np.testing.assert_allclose(_np(g_s), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="beta"):
        beta_nll_loss(target, warped, log_var, disp, beta=1.5)


def test_shape_errors_are_clear():
    target, warped, score, disp = _data()
    with pytest.raises(ValueError, match="displacement must have shape"):
        plain_registration_loss(target, warped, disp[:, :1])
    with pytest.raises(ValueError, match="shapes must match"):
        displacement_step_loss(target, warped, disp, score[..., :5])
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        scoring_data_term(target.repeat(1, 2, 1, 1), warped.repeat(1, 2, 1, 1), score.repeat(1, 2, 1, 1))
