"""Tests of common/losses/paired.py (MONAI's DiceCELoss per frame) against the loss written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.losses.paired import PairedDiceCELoss


def data(b=3, c=4, frames=2, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, frames * c, h, w, generator=g, dtype=torch.float64)
    label = torch.randint(0, c, (b, frames, h, w), generator=g).double()
    return logits, label


def reference_loss(logits: np.ndarray, label: np.ndarray, c: int, include_background: bool, smooth: float = 1e-5,
                   ce_weight: float = 0.5, dice_weight: float = 0.5) -> float:
    """The paper's loss in float64 numpy, frame by frame: log-softmax cross-entropy averaged over pixels and the
    batch, and 1 - (2 |P G| + s) / (|P| + |G| + s) per sample and class averaged over both (the pre-MONAI
    implementation's formula, written independently)."""
    total = 0.0
    for k in range(label.shape[1]):
        z = logits[:, k * c : (k + 1) * c]
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        prob = np.exp(logp)
        onehot = np.stack([(label[:, k] == j) for j in range(c)], axis=1).astype(np.float64)
        ce = -(logp * onehot).sum(axis=1).mean()
        if not include_background:
            prob, onehot = prob[:, 1:], onehot[:, 1:]
        inter = (prob * onehot).sum(axis=(2, 3))
        denom = prob.sum(axis=(2, 3)) + onehot.sum(axis=(2, 3))
        dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
        total += ce_weight * ce + dice_weight * dice.mean()
    return float(total)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_loss_computed_by_hand(include_background, seed):
    logits, label = data(seed=seed)
    label[0, 1] = 0  # one frame without any foreground: the smoothing terms decide its Dice
    ours = PairedDiceCELoss(4, include_background=include_background)(logits, label)
    expected = reference_loss(logits.numpy(), label.numpy(), 4, include_background)
    assert ours.dtype == torch.float64
    assert float(ours) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    ours32 = PairedDiceCELoss(4, include_background=include_background)(logits.float(), label.long())
    assert float(ours32) == pytest.approx(expected, rel=1e-5)
    weighted = PairedDiceCELoss(4, ce_weight=0.2, dice_weight=1.3, include_background=include_background)
    assert float(weighted(logits, label)) == pytest.approx(
        reference_loss(logits.numpy(), label.numpy(), 4, include_background, ce_weight=0.2, dice_weight=1.3),
        rel=1e-10)


def test_weights_single_frame_and_gradient():
    logits, label = data(frames=1)
    logits.requires_grad_(True)
    only_ce = PairedDiceCELoss(4, ce_weight=1.0, dice_weight=0.0)(logits, label)
    torch.testing.assert_close(only_ce, torch.nn.functional.cross_entropy(logits.float(), label[:, 0].long()),
                               check_dtype=False)
    PairedDiceCELoss(4)(logits, label).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_perfect_prediction_gives_a_small_loss_and_a_wrong_one_a_large_loss():
    _, label = data()
    onehot = torch.nn.functional.one_hot(label.long(), 4).permute(0, 1, 4, 2, 3).reshape(3, 8, 12, 10).double()
    loss = PairedDiceCELoss(4)
    good = loss(onehot * 50.0, label)
    bad = loss((1.0 - onehot) * 50.0, label)
    assert good < 1e-3 and bad > 10.0


def test_clear_errors():
    loss = PairedDiceCELoss(4)
    logits, label = data()
    with pytest.raises(ValueError, match="frames \\* 4"):
        loss(logits[:, :7], label)
    with pytest.raises(ValueError, match="label must be"):
        loss(logits, label[:, :1])
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        loss(logits, label + 1)
    with pytest.raises(ValueError, match="integer class ids"):
        loss(logits, label + 0.5)
    with pytest.raises(ValueError, match="num_classes"):
        PairedDiceCELoss(1)
