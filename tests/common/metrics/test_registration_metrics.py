"""Registration metrics: mask warping, Dice/HD/HD95/ASD on shapes with known answers, Jacobian folding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.metrics.registration import (
    jacobian_determinant,
    mask_overlap_metrics,
    nonpositive_jacobian_percent,
    registration_metrics,
    warp_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")


def _square(size: int, rows: tuple[int, int], cols: tuple[int, int], label: int = 1) -> torch.Tensor:
    """``(1, 1, size, size)`` mask with ``label`` on rows/cols ``[a, b]`` (inclusive)."""
    m = torch.zeros(1, 1, size, size, dtype=torch.long)
    m[..., rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = label
    return m


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask (pixels beyond the image count as outside)."""
    p = np.pad(mask, 1)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def _directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    pa = np.argwhere(_boundary(a)) * np.asarray(spacing, dtype=np.float64)
    pb = np.argwhere(_boundary(b)) * np.asarray(spacing, dtype=np.float64)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def _reference(pred: torch.Tensor, target: torch.Tensor, spacing=(1.0, 1.0)) -> dict[str, float]:
    a, b = pred[0, 0].numpy() == 1, target[0, 0].numpy() == 1
    d_ab, d_ba = _directed(a, b, spacing), _directed(b, a, spacing)
    return {
        "dice": 2 * (a & b).sum() / (a.sum() + b.sum()),
        "hd": max(d_ab.max(), d_ba.max()),
        "hd95": max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)),
        "asd_target_to_warped": d_ba.mean(),
        "asd_symmetric": np.concatenate([d_ab, d_ba]).mean(),
    }


def test_shifted_squares_hand_values():
    target = _square(24, (4, 11), (4, 11))
    pred = _square(24, (4, 11), (6, 13))  # shifted by 2 columns
    out = mask_overlap_metrics(pred, target)
    # overlap 8x6 of two 8x8 squares; every boundary is at most 2 px from the other; target->pred distances sum to
    # 8*2 (left side) + (1+2+2+2+2+1) (right side inside pred) + 1 + 1 (top/bottom row ends) = 28 over 28 pixels
    assert out["dice"].item() == pytest.approx(0.75)
    assert out["hd"].item() == pytest.approx(2.0)
    assert out["asd"].item() == pytest.approx(1.0)
    # anisotropic pixels: 2 columns of 0.5 mm
    assert mask_overlap_metrics(pred, target, spacing=(1.0, 0.5))["hd"].item() == pytest.approx(1.0)


def test_nested_squares_direction_and_reference():
    target = _square(20, (6, 13), (6, 13))  # 8x8
    pred = _square(20, (4, 15), (4, 15))  # 12x12 around it
    out = mask_overlap_metrics(pred, target)
    sym = mask_overlap_metrics(pred, target, symmetric_asd=True)
    ref = _reference(pred, target)
    # hand values: Dice 2*64/(64+144); the outer corner is 2*sqrt(2) from the inner one; every target boundary
    # pixel is exactly 2 px from the outer boundary, so target -> warped ASD is 2
    assert out["dice"].item() == pytest.approx(128 / 208)
    assert out["hd"].item() == pytest.approx(2 * math.sqrt(2), rel=1e-6)
    assert out["asd"].item() == pytest.approx(2.0)
    assert sym["asd"].item() > 2.0  # outer corners are further than 2 px: the direction matters
    assert sym["asd"].item() == pytest.approx(ref["asd_symmetric"], rel=1e-6)
    assert out["hd95"].item() == pytest.approx(ref["hd95"], rel=1e-6)
    for key in ("dice", "hd"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-6)


def test_irregular_shapes_against_brute_force():
    g = torch.Generator().manual_seed(0)
    blob = (torch.rand(1, 1, 8, 8, generator=g) > 0.4).float()
    target = (torch.nn.functional.interpolate(blob, size=(32, 32), mode="bilinear") > 0.5).long()
    pred = torch.roll(target, shifts=(1, 3), dims=(2, 3))
    spacing = (1.2, 0.8)
    out = mask_overlap_metrics(pred, target, spacing=spacing)
    ref = _reference(pred, target, spacing)
    assert out["dice"].item() == pytest.approx(ref["dice"], rel=1e-6)
    assert out["hd"].item() == pytest.approx(ref["hd"], rel=1e-5)
    assert out["hd95"].item() == pytest.approx(ref["hd95"], rel=1e-5)
    assert out["asd"].item() == pytest.approx(ref["asd_target_to_warped"], rel=1e-5)


def test_warp_mask_modes():
    labels = torch.randint(0, 3, (2, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    zero = torch.zeros(2, 2, 16, 16)
    for mode in ("linear", "nearest"):
        assert torch.equal(warp_mask(labels, zero, mode=mode), labels)
    shift = torch.zeros(2, 2, 16, 16)
    shift[:, 0], shift[:, 1] = 1.0, 2.0
    for mode in ("linear", "nearest"):
        out = warp_mask(labels, shift, mode=mode)
        assert torch.equal(out[..., :15, :14], labels[..., 1:, 2:])
        assert (out[..., 15:, :] == 0).all()  # pulled from outside the image -> background
    # fractional shifts: the one-hot/argmax warp picks the nearer pixel, like nearest resampling
    for frac in (0.4, 0.6):
        sub = torch.zeros(2, 2, 16, 16)
        sub[:, 1] = frac
        assert torch.equal(warp_mask(labels, sub, "linear")[..., :15], warp_mask(labels, sub, "nearest")[..., :15])
    with pytest.raises(ValueError, match="mode"):
        warp_mask(labels, zero, mode="cubic")


def test_registration_metrics_end_to_end():
    source = _square(24, (4, 11), (6, 13))
    target = _square(24, (4, 11), (4, 11))
    identity = registration_metrics(source, target, torch.zeros(1, 2, 24, 24))
    assert identity["dice"].item() == pytest.approx(0.75)
    assert identity["nonpositive_jacobian_percent"].item() == 0.0
    # the source square sits 2 columns right of the target one: pull from x + 2
    disp = torch.zeros(1, 2, 24, 24)
    disp[:, 1] = 2.0
    aligned = registration_metrics(source, target, disp)
    assert aligned["dice"].item() == pytest.approx(1.0)
    assert aligned["hd"].item() == 0.0 and aligned["asd"].item() == 0.0
    assert torch.equal(aligned["warped_mask"], target)


def test_jacobian_identity_linear_and_folding():
    zero = torch.zeros(2, 2, 10, 12)
    assert torch.all(nonpositive_jacobian_percent(zero) == 0)
    assert torch.allclose(jacobian_determinant(zero), torch.ones(2, 10, 12, dtype=torch.float64))
    yy, xx = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")

    def linear(a: list[list[float]]) -> torch.Tensor:
        # û_i(x) = Σ_j a_ij x_j with x_0 = row, x_1 = column: det J = det(I + A) everywhere (finite differences
        # are exact on linear fields, also at the border)
        u0 = a[0][0] * yy + a[0][1] * xx
        u1 = a[1][0] * yy + a[1][1] * xx
        return torch.stack([u0, u1])[None]

    det = jacobian_determinant(linear([[0.1, 0.2], [0.3, -0.1]]))
    assert torch.allclose(det, torch.full_like(det, 1.1 * 0.9 - 0.2 * 0.3))
    assert nonpositive_jacobian_percent(linear([[0.5, 0.0], [0.0, -2.0]])).item() == 100.0
    # a local fold: columns 4..7 map backwards
    fold = torch.zeros(1, 2, 10, 12)
    fold[0, 1] = torch.where((xx >= 4) & (xx <= 7), -3.0 * (xx - 4), torch.where(xx > 7, -9.0, 0.0))
    pct = nonpositive_jacobian_percent(fold).item()
    # central differences of û_1 along columns: 0 (col 3), -1.5 (col 4), -3 (5, 6), -1.5 (7), 0 (col 8)
    # -> det J = 1 + ∂û_1/∂x_1 < 0 on columns 4..7, i.e. 4 of the 12 columns
    assert pct == pytest.approx(100.0 * 4 / 12)


def test_jacobian_3d():
    zz, yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(8.0), indexing="ij")
    u = torch.stack([0.2 * zz, -0.1 * xx, 0.3 * yy])[None]
    # I + A = [[1.2, 0, 0], [0, 1, -0.1], [0, 0.3, 1]] -> 1.2 * (1 + 0.03)
    det = jacobian_determinant(u)
    assert det.shape == (1, 6, 7, 8)
    assert torch.allclose(det, torch.full_like(det, 1.2 * 1.03))
    with pytest.raises(ValueError, match="displacement must be"):
        jacobian_determinant(torch.zeros(1, 2, 4, 4, 4))
