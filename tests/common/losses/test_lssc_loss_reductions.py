"""The two reduction knobs of the LSSC loss (Dice pooling, image-level consistency over pairs) against float64
references written out here with numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.losses.lssc import LSSCLoss, image_consistency_loss

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "lssc_multimodal" / "configs"
SMOOTH = 1e-5  # MONAI's DiceLoss smooth_nr = smooth_dr


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _dice_ce_reference(logits: torch.Tensor, label: torch.Tensor, per_sample: bool) -> float:
    """Cross entropy (mean over pixels) + soft Dice loss (mean over classes, background included)."""
    x = logits.double().numpy()
    y = label.numpy()
    z = x.shape[1]
    p = _softmax(x, axis=1)
    g = np.stack([(y == c) for c in range(z)], axis=1).astype(np.float64)
    ce = -np.log(np.take_along_axis(p, y[:, None], axis=1)).mean()
    sums = (2, 3) if per_sample else (0, 2, 3)  # per (slice, class) or per class over the batch
    inter = (p * g).sum(axis=sums)
    den = p.sum(axis=sums) + g.sum(axis=sums)
    dice = (1.0 - (2.0 * inter + SMOOTH) / (den + SMOOTH)).mean()
    return float(ce + dice)


def _sym_kl_reference(e1: np.ndarray, e2: np.ndarray, tau: float) -> float:
    p, q = _softmax(e1 / tau, axis=-1), _softmax(e2 / tau, axis=-1)
    return float((p * np.log(p / q) + q * np.log(q / p)).sum())


def test_dice_reduction_batch_pools_the_slices_sample_averages_them():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6, 6) * 2
    label = torch.randint(0, 4, (3, 6, 6))
    label[0][label[0] == 3] = 0  # class 3 absent from slice 0: per-slice Dice punishes any mass predicted there
    batch = LSSCLoss(dice_reduction="batch").segmentation_loss(logits, label)
    sample = LSSCLoss(dice_reduction="sample").segmentation_loss(logits, label)
    assert float(batch) == pytest.approx(_dice_ce_reference(logits, label, per_sample=False), rel=1e-5)
    assert float(sample) == pytest.approx(_dice_ce_reference(logits, label, per_sample=True), rel=1e-5)
    assert abs(float(batch) - float(sample)) > 0.01
    assert LSSCLoss().dice_reduction == "batch"  # the default is unchanged


def _fake_outputs(b1: int, b2: int, z: int = 3, scales: int = 3):
    g = torch.Generator().manual_seed(1)
    out = []
    for m, b in enumerate((b1, b2)):
        out.append({
            "logits": torch.randn(b, z, 4, 4, generator=g),
            "aux_logits": [],
            "correlations": [torch.randn(b, z, z, generator=g) * 3 for _ in range(scales)],
            "class_embeddings": torch.randn(2, z, 8, generator=g),
            "modality": torch.full((b,), m, dtype=torch.long),
        })
    labels = [torch.randint(0, z, (b, 4, 4), generator=g) for b in (b1, b2)]
    return out, labels


def test_icr_reduction_mean_vs_sum_over_image_pairs():
    b1, b2, tau, gamma = 2, 3, 4.0, 0.5
    (o1, o2), (l1, l2) = _fake_outputs(b1, b2)
    per_pair = [
        [sum(_sym_kl_reference(e1[i].numpy().astype(np.float64), e2[j].numpy().astype(np.float64), tau)
             for e1, e2 in zip(o1["correlations"], o2["correlations"])) for j in range(b2)]
        for i in range(b1)
    ]
    ref_sum = float(np.sum(per_pair))
    ref_mean = ref_sum / (b1 * b2)
    for reduction, ref in (("mean", ref_mean), ("sum", ref_sum)):
        loss = image_consistency_loss(o1["correlations"], o2["correlations"], tau, "all_pairs", reduction)
        assert float(loss) == pytest.approx(ref, rel=1e-5)

    parts = {}
    for reduction in ("mean", "sum"):
        crit = LSSCLoss(gamma=gamma, use_aux=False, use_mcr=False, icr_reduction=reduction)
        parts[reduction] = crit(o1, l1, o2, l2)
    assert float(parts["mean"]["icr"]) == pytest.approx(ref_mean, rel=1e-5)
    assert float(parts["sum"]["icr"]) == pytest.approx(ref_sum, rel=1e-5)
    # only the consistency term changes: the effective gamma of "mean" is gamma / (B1 B2) per pair
    diff = float(parts["sum"]["loss"] - parts["mean"]["loss"])
    assert diff == pytest.approx(gamma * (ref_sum - ref_mean), rel=1e-4)


def test_reduction_knobs_reject_bad_values():
    with pytest.raises(ValueError, match="icr_pairing='all_pairs'"):
        LSSCLoss(icr_pairing="mean", icr_reduction="sum")
    with pytest.raises(ValueError, match="icr_reduction must be"):
        LSSCLoss(icr_reduction="max")
    with pytest.raises(ValueError, match="dice_reduction must be"):
        LSSCLoss(dice_reduction="pixel")


def test_bundle_knobs_reach_the_loss():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    default = parser.get_parsed_content("loss")
    assert (default.icr_reduction, default.dice_reduction, default.dice_ce.dice.batch) == ("mean", "batch", True)
    parser.update({"icr_reduction": "sum", "dice_reduction": "sample"})
    changed = parser.get_parsed_content("loss", instantiate=True, lazy=False)
    assert (changed.icr_reduction, changed.dice_reduction, changed.dice_ce.dice.batch) == ("sum", "sample", False)
