"""LSSC losses (common.losses.lssc, Eq. 12-15) against hand-computed values and independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses.lssc import (
    LSSCLoss,
    downsample_labels,
    image_consistency_loss,
    lssc_loss_kwargs,
    modality_consistency_loss,
    symmetric_kl_rows,
)

Z = 4


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine OpenMP workers mostly spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mcr_zero_for_identical_embeddings_and_hand_computed():
    q = torch.randn(Z, 16, generator=torch.Generator().manual_seed(0))
    assert modality_consistency_loss(q, q.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # cosine ignores the norm: a positive rescaling per class is still "consistent"
    assert modality_consistency_loss(q, q * torch.tensor([[2.0], [0.5], [3.0], [1.0]])).item() == pytest.approx(
        0.0, abs=1e-6
    )
    # class 0 orthogonal (1 - 0), class 1 identical (0), class 2 opposite (1 - (-1))
    q1 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    q2 = torch.tensor([[0.0, 3.0], [2.0, 2.0], [0.0, -1.0]])
    assert modality_consistency_loss(q1, q2).item() == pytest.approx(3.0, abs=1e-6)
    assert modality_consistency_loss(q, torch.randn(Z, 16)).item() > 0.1


def test_symmetric_kl_hand_computed_and_symmetric():
    tau = 4.0
    e1 = torch.zeros(2, 2, dtype=torch.float64)  # softmax rows (0.5, 0.5)
    e2 = torch.tensor([[tau * math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)  # row 0 -> (0.75, 0.25)
    # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q) = 0.25 ln 1.5 + 0.25 ln 2 = 0.25 ln 3 for row 0, 0 for row 1
    want = 0.25 * math.log(3.0)
    assert symmetric_kl_rows(e1, e2, tau).item() == pytest.approx(want, rel=1e-12)
    assert symmetric_kl_rows(e2, e1, tau).item() == pytest.approx(want, rel=1e-12)
    assert symmetric_kl_rows(e2, e2.clone(), tau).item() == pytest.approx(0.0, abs=1e-12)

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(Z, Z, generator=g, dtype=torch.float64), torch.randn(Z, Z, generator=g, dtype=torch.float64)
    # independent reference: torch's kl_div (input = log q, target = p gives KL(p || q)) per row, both directions
    lpa, lpb = F.log_softmax(a / tau, -1), F.log_softmax(b / tau, -1)
    ref = F.kl_div(lpb, lpa, log_target=True, reduction="sum") + F.kl_div(lpa, lpb, log_target=True, reduction="sum")
    assert symmetric_kl_rows(a, b, tau).item() == pytest.approx(ref.item(), rel=1e-10)
    # the temperature softens: larger tau, smaller divergence
    assert symmetric_kl_rows(a, b, 8.0) < symmetric_kl_rows(a, b, 1.0)


def test_icr_pairing_sums_scales_and_is_symmetric():
    g = torch.Generator().manual_seed(2)
    e1 = [torch.randn(3, Z, Z, generator=g, dtype=torch.float64) for _ in range(3)]
    e2 = [torch.randn(2, Z, Z, generator=g, dtype=torch.float64) for _ in range(3)]
    assert image_consistency_loss(e1, [e.clone() for e in e1], pairing="mean").item() == pytest.approx(0, abs=1e-12)

    all_pairs = image_consistency_loss(e1, e2, tau=4.0, pairing="all_pairs")
    ref = sum(sum(symmetric_kl_rows(a[i], b[j], 4.0) for i in range(3) for j in range(2)) / 6 for a, b in zip(e1, e2))
    assert all_pairs.item() == pytest.approx(ref.item(), rel=1e-10)
    assert image_consistency_loss(e2, e1).item() == pytest.approx(all_pairs.item(), rel=1e-10)

    mean = image_consistency_loss(e1, e2, tau=4.0, pairing="mean")
    ref_mean = sum(symmetric_kl_rows(a.mean(0), b.mean(0), 4.0) for a, b in zip(e1, e2))
    assert mean.item() == pytest.approx(ref_mean.item(), rel=1e-10)
    # one image per modality: both pairings are Eq. 14 itself; three equal scales count three times
    one1, one2 = [e1[0][:1]] * 3, [e2[0][:1]] * 3
    single = symmetric_kl_rows(e1[0][0], e2[0][0], 4.0).item()
    for pairing in ("all_pairs", "mean"):
        assert image_consistency_loss(one1, one2, pairing=pairing).item() == pytest.approx(3 * single, rel=1e-10)
    with pytest.raises(ValueError, match="pairing"):
        image_consistency_loss(e1, e2, pairing="max")


def test_downsample_labels_takes_the_cell_centre():
    coarse = torch.randint(0, Z, (2, 4, 5), generator=torch.Generator().manual_seed(3))
    fine = coarse.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    fine[:, ::4, ::4] = Z - 1 - fine[:, ::4, ::4]  # corrupt the top-left pixel of each cell; the centre decides
    down = downsample_labels(fine, (4, 5))
    assert down.shape == (2, 1, 4, 5) and down.dtype == fine.dtype
    assert torch.equal(down[:, 0], coarse)
    assert torch.equal(downsample_labels(fine.unsqueeze(1), (16, 20)), fine.unsqueeze(1))


def _dice_ce_reference(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """CE (mean over pixels) + soft Dice loss pooled over the batch, background included, MONAI smoothing."""
    logits = logits.double()
    ce = F.cross_entropy(logits, label)
    p = logits.softmax(1)
    onehot = F.one_hot(label, logits.shape[1]).permute(0, 3, 1, 2).double()
    inter = (p * onehot).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + dice.mean()


def _fake_output(batch: int, modality: int, seed: int, q: torch.Tensor, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "logits": torch.randn(batch, Z, size, size, generator=g),
        "aux_logits": [torch.randn(batch, Z, s, s, generator=g) for s in (size // 4, size // 2, size)],
        "correlations": [torch.randn(batch, Z, Z, generator=g) for _ in range(3)],
        "class_embeddings": q,
        "modality": torch.full((batch,), modality, dtype=torch.long),
    }


def test_lssc_loss_combines_eq_15():
    q = torch.randn(2, Z, 8, generator=torch.Generator().manual_seed(4))
    o1, o2 = _fake_output(2, 0, 5, q), _fake_output(3, 1, 6, q)
    g = torch.Generator().manual_seed(7)
    y1, y2 = torch.randint(0, Z, (2, 16, 16), generator=g), torch.randint(0, Z, (3, 1, 16, 16), generator=g)
    out = LSSCLoss()(o1, y1, o2, y2)

    seg1, seg2 = _dice_ce_reference(o1["logits"], y1), _dice_ce_reference(o2["logits"], y2[:, 0])
    aux1 = sum(_dice_ce_reference(a, downsample_labels(y1, a.shape[-2:])[:, 0]) for a in o1["aux_logits"])
    aux2 = sum(_dice_ce_reference(a, downsample_labels(y2, a.shape[-2:])[:, 0]) for a in o2["aux_logits"])
    mcr = modality_consistency_loss(q[0], q[1])
    icr = image_consistency_loss(o1["correlations"], o2["correlations"], 4.0)
    for key, want in (
        ("seg_m1", seg1),
        ("seg_m2", seg2),
        ("aux_m1", aux1),
        ("aux_m2", aux2),
        ("mcr", mcr),
        ("icr", icr),
    ):
        assert out[key].item() == pytest.approx(want.item(), rel=1e-5), key
    total = seg1 + seg2 + 0.5 * (aux1 + aux2) + 0.5 * mcr + 0.5 * icr
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)

    # switches: Joint V3 without CR keeps seg + aux only; Backbone has no aux
    no_cr = LSSCLoss(**lssc_loss_kwargs("joint_v3"))(o1, y1, o2, y2)
    assert no_cr["mcr"].item() == 0 and no_cr["icr"].item() == 0
    assert no_cr["loss"].item() == pytest.approx((seg1 + seg2 + 0.5 * (aux1 + aux2)).item(), rel=1e-5)
    single = LSSCLoss(**lssc_loss_kwargs("backbone"))(o1, y1)
    assert single["loss"].item() == pytest.approx(seg1.item(), rel=1e-5)


def test_perfect_prediction_scores_near_zero_and_wrong_one_high():
    y = torch.randint(0, Z, (2, 16, 16), generator=torch.Generator().manual_seed(8))
    perfect = 30.0 * F.one_hot(y, Z).permute(0, 3, 1, 2).float()
    wrong = 30.0 * F.one_hot((y + 1) % Z, Z).permute(0, 3, 1, 2).float()
    loss = LSSCLoss(use_aux=False, use_mcr=False, use_icr=False)
    assert loss.segmentation_loss(perfect, y).item() < 1e-3
    assert loss.segmentation_loss(wrong, y).item() > 20.0


def test_lssc_loss_kwargs_and_errors():
    assert (
        lssc_loss_kwargs("full")
        == lssc_loss_kwargs("Joint_V3+CR")
        == {"use_aux": True, "use_mcr": True, "use_icr": True}
    )
    assert lssc_loss_kwargs("joint_v1_cr") == lssc_loss_kwargs("joint_v2+cr")
    assert lssc_loss_kwargs("baseline") == {"use_aux": True, "use_mcr": False, "use_icr": False}
    with pytest.raises(ValueError, match="unknown LSSC variant"):
        lssc_loss_kwargs("ours")

    q = torch.randn(2, Z, 8)
    o1, y = _fake_output(2, 0, 9, q), torch.zeros(2, 16, 16, dtype=torch.long)
    loss = LSSCLoss()
    with pytest.raises(ValueError, match="two different modalities"):
        loss(o1, y, _fake_output(2, 0, 10, q), y)
    mixed = _fake_output(2, 0, 11, q)
    mixed["modality"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="one modality"):
        loss(mixed, y, _fake_output(2, 1, 12, q), y)
    with pytest.raises(ValueError, match="both out_m2 and label_m2"):
        loss(o1, y, _fake_output(2, 1, 13, q))
    with pytest.raises(ValueError, match="does not match logits"):
        loss(o1, torch.zeros(2, 8, 8, dtype=torch.long))
    no_eam = {**o1, "aux_logits": []}
    with pytest.raises(ValueError, match="no aux_logits"):
        loss(no_eam, y)
