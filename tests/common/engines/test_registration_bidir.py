"""Bidirectional training (issue 17, AdaCS point 3): with ``bidir`` every step's loss is the mean of the source ->
target loss and the target -> source loss on the inverse field, each computed here separately from the loss
functions; the inverse field really inverts the forward one."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.blocks import DVF2DDF

from common.engines.registration import AdaCSTrainer, build_auxiliary_net
from common.losses.adacs import (
    displacement_step_loss,
    gaussian_nll_loss,
    gradient_smoothness,
    plain_registration_loss,
    scoring_step_loss,
)
from common.networks.registration import StackedPairAdapter, VoxelMorphEstimator

pytestmark = [
    pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
    pytest.mark.usefixtures("one_torch_thread"),
]

SMALL = {"enc_channels": (4, 8, 8, 8), "dec_channels": (8, 8, 8, 8, 8, 4, 4)}
SIZE = 32


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    """Blobs on [0, 1]; the target is the source moved by (2, 1) pixels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = 12 + 6 * torch.rand(2, generator=g)
        src = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
        tgt = torch.exp(-((yy - cy - 2) ** 2 + (xx - cx - 1) ** 2) / 30.0)
        out.append(torch.stack([src, tgt]))
    return torch.stack(out).float()


def _trainer(method: str, bidir: bool, regularization: str = "displacement", steps: int = 3,
             half_res: bool = False) -> AdaCSTrainer:
    torch.manual_seed(0)
    est = VoxelMorphEstimator(**SMALL, integration_steps=steps, half_res=half_res)
    with torch.no_grad():  # a visible velocity (up to ~0.85 px) so that the two directions differ
        est.net.backbone.net[1].final_conv_out.conv.weight.normal_(0, 3.0)
    net = StackedPairAdapter(est)
    torch.manual_seed(1)
    aux = build_auxiliary_net(method, 2, **SMALL)
    return AdaCSTrainer("cpu", 3, [], net, torch.optim.SGD(net.parameters(), lr=0.0), method=method,
                        auxiliary_network=aux,
                        auxiliary_optimizer=None if aux is None else torch.optim.SGD(aux.parameters(), lr=0.0),
                        lam=0.5, alpha=0.02, beta=1.5, warmup_epochs=1, regularization=regularization, bidir=bidir)


def _two_directions(tr: AdaCSTrainer, image: torch.Tensor):
    """Forward and backward direction by hand: MONAI's DVF2DDF integrates -v for the inverse (independent code)."""
    est = copy.deepcopy(tr.network.estimator)
    source, target = image[:, :1], image[:, 1:]
    with torch.no_grad():
        disp, velocity = est.predict_displacement_and_velocity(source, target)
        inverse = DVF2DDF(num_steps=est.integration_steps, mode="bilinear", padding_mode="zeros")(-velocity)
        return ((target, est.warp(source, disp), disp), (source, est.warp(target, inverse), inverse), velocity)


@pytest.mark.parametrize("half_res", [False, True])
def test_inverse_field_undoes_the_forward_field(half_res):
    tr = _trainer("plain", bidir=True, half_res=half_res)
    image = _images()
    est = tr.network.estimator
    with torch.no_grad():
        disp, velocity = est.predict_displacement_and_velocity(image[:, :1], image[:, 1:])
        inverse = est.inverse_displacement(disp, velocity)
        # u_inv(x) + u(x + u_inv(x)) = 0 for an exact inverse; -u would leave a residual of the field's variation
        composed = inverse + est.warp(disp, inverse)
        negated = -disp + est.warp(disp, -disp)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # away from the zero-padded border
    assert disp.abs().max() > 0.5  # a field large enough for the check to mean something
    assert composed[inner].abs().max() < 0.02 * disp[inner].abs().max()
    assert composed[inner].abs().max() < 0.5 * negated[inner].abs().max()  # better than merely negating û
    if not half_res:
        assert torch.allclose(DVF2DDF(num_steps=3, mode="bilinear", padding_mode="zeros")(-velocity), inverse)


@pytest.mark.parametrize("phase", ["displacement", "scoring"])
def test_adacs_bidir_loss_is_the_mean_of_the_two_directions(phase):
    image = _images()
    tr = _trainer("adacs", bidir=True)
    (t1, w1, d1), (t2, w2, d2), _ = _two_directions(tr, image)
    g = copy.deepcopy(tr.auxiliary_network)
    with torch.no_grad():
        s1, s2 = g(t1), g(t2)  # Ŝ of each direction's fixed image: g(I_t), then g(I_s)
        if phase == "displacement":
            fwd = float(displacement_step_loss(t1, w1, d1, s1, 0.5))
            bwd = float(displacement_step_loss(t2, w2, d2, s2, 0.5))
        else:
            m = tr.momentum.value
            fwd = float(scoring_step_loss(t1, w1, s1, 0.02, 1.5, m))
            bwd = float(scoring_step_loss(t2, w2, s2, 0.02, 1.5, m))
    assert abs(fwd - bwd) > 1e-3 * abs(fwd)  # the directions differ, so a one-direction loss cannot pass
    if phase == "displacement":
        loss, _ = tr._displacement_step(image, use_score=True, epoch=0)
        uni, _ = _trainer("adacs", bidir=False)._displacement_step(image, use_score=True, epoch=0)
    else:
        loss, _ = tr._scoring_step(image)
        uni, _ = _trainer("adacs", bidir=False)._scoring_step(image)
    assert loss == pytest.approx(0.5 * (fwd + bwd), rel=1e-5)
    assert uni == pytest.approx(fwd, rel=1e-5)


def test_adacs_bidir_momentum_residual_is_the_mean_of_the_two_directions():
    image = _images()
    tr = _trainer("adacs", bidir=True)
    (t1, w1, _), (t2, w2, _), _ = _two_directions(tr, image)
    mu = 0.5 * float((t1 - w1).pow(2).mean() + (t2 - w2).pow(2).mean())
    tr.momentum_residual = "plain"
    tr._displacement_step(image, use_score=False, epoch=0)
    assert tr.momentum.epoch_mean == pytest.approx(mu, rel=1e-5)


@pytest.mark.parametrize("method, regularization", [("plain", "displacement"), ("plain", "velocity"),
                                                    ("nll", "displacement")])
def test_baseline_bidir_loss_is_the_mean_of_the_two_directions(method, regularization):
    image = _images()
    tr = _trainer(method, bidir=True, regularization=regularization)
    (t1, w1, d1), (t2, w2, d2), velocity = _two_directions(tr, image)
    lam = 0.0 if regularization == "velocity" else 0.5
    with torch.no_grad():
        if method == "plain":
            fwd = float(plain_registration_loss(t1, w1, d1, lam))
            bwd = float(plain_registration_loss(t2, w2, d2, lam))
        else:
            v = copy.deepcopy(tr.auxiliary_network)
            fwd = float(gaussian_nll_loss(t1, w1, v(t1, w1), d1, lam))
            bwd = float(gaussian_nll_loss(t2, w2, v(t2, w2), d2, lam))
        if regularization == "velocity":  # λ R(-v) = λ R(v): the same term in both directions
            reg = 0.5 * float(gradient_smoothness(velocity))
            fwd, bwd = fwd + reg, bwd + reg
    assert abs(fwd - bwd) > 1e-4 * abs(fwd)
    assert tr._baseline_step(image) == pytest.approx(0.5 * (fwd + bwd), rel=1e-5)
