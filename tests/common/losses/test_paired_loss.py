"""Tests of common/losses/paired.py against MONAI's DiceCELoss applied frame by frame."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from common.losses.paired import PairedDiceCELoss


def data(b=3, c=4, frames=2, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, frames * c, h, w, generator=g, dtype=torch.float64)
    label = torch.randint(0, c, (b, frames, h, w), generator=g).double()
    return logits, label


@pytest.mark.parametrize("include_background", [True, False])
def test_equals_monai_dicece_summed_over_frames(include_background):
    logits, label = data()
    ours = PairedDiceCELoss(4, include_background=include_background)(logits, label)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5,
                     include_background=include_background)
    expected = ref(logits[:, :4].float(), label[:, :1]) + ref(logits[:, 4:].float(), label[:, 1:])
    torch.testing.assert_close(ours.float(), expected, rtol=1e-5, atol=1e-6)


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
