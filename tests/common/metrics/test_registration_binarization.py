"""Warped-mask binarisation of the AdaCS evaluation (issue 17, point 2): ``argmax`` (ours) vs ``any`` (the authors').

Hand-made case: a 4x4 square mask shifted by half a pixel along the columns. Bilinear warping gives the values,
counted by hand below, 0.5 on the column the square half enters and 0.5 on the column it half leaves, 1 inside;
``argmax`` ties at 0.5 go to background (the first channel), ``any`` counts every value > 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.engines.registration import RegistrationMetricsd, RegistrationReport, score_pair
from common.metrics.registration import warp_mask

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")

H = W = 12


def _square() -> torch.Tensor:
    mask = torch.zeros(1, 1, H, W, dtype=torch.long)
    mask[0, 0, 4:8, 4:8] = 1
    return mask


def _shift(cols: float) -> torch.Tensor:
    ddf = torch.zeros(1, 2, H, W)
    ddf[:, 1] = cols  # pull-back: warped(r, c) = mask(r, c + cols)
    return ddf


def test_half_pixel_shift_hand_counted():
    mask, ddf = _square(), _shift(0.5)
    # warped foreground value at column c is (m[c] + m[c + 1]) / 2: 0.5 at c = 3 and c = 7, 1 at c = 4..6
    argmax = warp_mask(mask, ddf, mode="linear", num_labels=2)[0, 0].numpy()
    any_pos = warp_mask(mask, ddf, mode="linear_any", num_labels=2)[0, 0].numpy()
    expected_argmax = np.zeros((H, W), dtype=np.int64)
    expected_argmax[4:8, 4:7] = 1  # ties (0.5 vs 0.5) go to background
    expected_any = np.zeros((H, W), dtype=np.int64)
    expected_any[4:8, 3:8] = 1  # every value > 0
    np.testing.assert_array_equal(argmax, expected_argmax)
    np.testing.assert_array_equal(any_pos, expected_any)
    # a whole-pixel shift (-1: the square moves one column right) is exact: both modes agree
    whole = np.zeros((H, W), dtype=np.int64)
    whole[4:8, 5:9] = 1
    for mode in ("linear", "linear_any"):
        np.testing.assert_array_equal(warp_mask(mask, _shift(-1.0), mode=mode, num_labels=2)[0, 0].numpy(), whole)


def test_quarter_pixel_shift_changes_dice_by_hand():
    # -0.25 px: column 4 keeps 0.75 (argmax fg), column 8 gets 0.25 (fg only with "any")
    mask, ddf = _square(), _shift(-0.25)
    target = _square()  # the unshifted square as reference
    masks = torch.cat([mask, target], dim=1)[0].float()
    arg, warped_arg = score_pair(ddf[0], masks, ("dice",), mask_binarization="argmax")
    anyp, warped_any = score_pair(ddf[0], masks, ("dice",), mask_binarization="any")
    assert int(warped_arg.sum()) == 16 and int(warped_any.sum()) == 20
    assert arg["dice"] == pytest.approx(1.0)
    assert anyp["dice"] == pytest.approx(2 * 16 / (20 + 16))  # 0.888...
    with pytest.raises(ValueError, match="mask_binarization must be one of"):
        score_pair(ddf[0], masks, ("dice",), mask_binarization="threshold")


def test_evaluation_components_carry_the_option(tmp_path):
    mask, ddf = _square(), _shift(-0.25)
    item = {"pred": ddf[0], "label": torch.cat([mask, _square()], dim=1)[0].float()}
    out_any = RegistrationMetricsd(metrics=("dice",), mask_binarization="any")(item)
    out_arg = RegistrationMetricsd(metrics=("dice",))(item)
    assert float(out_any["scores"][0]) == pytest.approx(2 * 16 / 36) and float(out_arg["scores"][0]) == 1.0
    assert out_any["mask_binarization"] == "any"
    report = RegistrationReport(str(tmp_path), mask_binarization="any")
    assert report.summary()["mask_binarization"] == "any"
    with pytest.raises(ValueError, match="mask_binarization"):
        RegistrationMetricsd(mask_binarization="max")
