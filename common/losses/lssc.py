"""LSSC objective (Yang et al., Sec. 3.4, Eq. 12-15): segmentation, auxiliary and consistency losses.

``L = Lseg(M1) + Lseg(M2) + alpha (Laux(M1) + Laux(M2)) + beta Lmcr + gamma Licr`` with
``alpha = beta = gamma = 0.5`` and temperature ``tau = 4``:

- ``Lseg``: cross entropy + Dice of the logits ``(B, Z, H, W)`` against the labels.
- ``Laux`` (Eq. 12): ``sum_lambda [CE + Dice]`` of the auxiliary logits of scales 1-3 against the labels
  downsampled to each scale's grid.
- ``Lmcr`` (Eq. 13): ``sum_i (1 - cos(Q_M1^i, Q_M2^i))`` over the ``Z`` modality-specific class embeddings.
- ``Licr`` (Eq. 14): ``sum_lambda sum_i [KL(s(E1^i/tau) || s(E2^i/tau)) + KL(s(E2^i/tau) || s(E1^i/tau))]``, ``s`` the
  softmax over the class dimension, ``E^i`` row ``i`` of a scale's ``(Z, Z)`` correlation matrix.

:class:`LSSCLoss` consumes two outputs of :meth:`common.networks.lssc.LSSCSwinUnet.forward_train` (one unpaired batch
per modality) and their labels. Its switches give the paper's variants (Sec. 4.3); :func:`lssc_loss_kwargs` maps
the variant names to them:

==============================  =======  =======  =======
variant                         aux      mcr      icr
==============================  =======  =======  =======
backbone                        no       no       no
baseline, joint_v1/v2/v3        yes      no       no
joint_v1/v2/v3 + CR, full       yes      yes      yes
==============================  =======  =======  =======

Choices the paper does not state
--------------------------------
1. ``Lseg`` and each scale of ``Laux`` use MONAI's ``DiceCELoss`` with softmax, one-hot labels, background
   included, Dice pooled over the batch (``dice_reduction="batch"``, MONAI's ``batch=True``: one soft Dice per
   class over all slices of the batch, so a structure absent from one slice does not yield a Dice of 0 for that
   slice alone), ``lambda_ce = lambda_dice = 1`` and MONAI's smoothing (1e-5). ``dice_reduction="sample"`` computes
   one Dice per slice and class and averages them (``batch=False``); the cross entropy is the mean over every
   pixel of the batch in both cases.
2. Auxiliary labels are downsampled with ``nearest-exact`` interpolation, i.e. the label at the centre of each
   token's footprint; ``Laux`` sums (not averages) its three scales, as Eq. 12 writes.
3. ``Lmcr`` compares the raw modality-specific class embeddings ``Q_M in R^{Z x 4C}`` (before any EAM) and sums
   over classes; cosine with eps 1e-8.
4. ``Licr`` pairing: the paper computes Eq. 14 for "any two images from different modalities", generating "many
   sample pairs". The default ``icr_pairing="all_pairs"`` therefore averages Eq. 14 over all ``B1 x B2`` pairs of
   images of the two batches (``icr_reduction="mean"``; ``"sum"`` sums over the pairs, i.e. multiplies the term,
   and so the effective ``gamma``, by ``B1 x B2``). ``icr_pairing="mean"`` instead averages each modality's
   correlation matrices over its batch first and evaluates Eq. 14 once (cheaper; the two agree when each batch
   has one image; the reduction has nothing to reduce there and must stay ``"mean"``). Gradients
   flow into both modalities' correlations (no stop-gradient); Eq. 14 is summed over the three scales and the
   ``Z`` rows.
5. Only one modality given (Backbone/Baseline trained per modality): ``L = Lseg + alpha Laux``; the consistency
   terms need both modalities and are then 0.
6. Labels may be ``(B, H, W)`` or ``(B, 1, H, W)``, integer class indices ``0..Z-1``; in the 3D configuration
   (:mod:`common.networks.lssc3d`) every term is the same with a third spatial axis (``(B, Z, H, W, D)`` logits,
   Dice pooled over the voxels of the batch's patches, labels downsampled per axis for ``Laux``).

Effective weights
-----------------
With the defaults every term of Eq. 15 is a per-batch mean except where Eq. 12-14 write a sum: ``Lseg`` = CE
(mean over pixels and slices) + Dice (mean over the ``Z`` classes, background included, each pooled over the
batch); ``Laux`` sums three such terms, so each scale has weight ``alpha`` = 0.5 and the auxiliary task as a whole
``3 alpha`` = 1.5 per modality; ``Lmcr`` sums ``Z`` cosine distances (``beta`` = 0.5 per class); ``Licr`` sums three
scales and ``Z`` rows and averages over the ``B1 B2`` image pairs, so read as a sum over pairs (as "generating many
sample pairs" could mean) its weight is ``gamma / (B1 B2)`` = 0.5 / 144 = 0.0035 per pair at batch 12 + 12, and
``icr_reduction="sum"`` restores ``gamma`` = 0.5 per pair. With the background included, the four cardiac
structures carry 4/5 of the Dice term (``include_background=False`` gives them all of it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor

__all__ = [
    "LSSCLoss",
    "downsample_labels",
    "image_consistency_loss",
    "lssc_loss_kwargs",
    "modality_consistency_loss",
    "symmetric_kl_rows",
]

_LOSS_VARIANTS: dict[str, dict[str, bool]] = {
    "backbone": {"use_aux": False, "use_mcr": False, "use_icr": False},
    "baseline": {"use_aux": True, "use_mcr": False, "use_icr": False},
    "joint_v1": {"use_aux": True, "use_mcr": False, "use_icr": False},
    "joint_v2": {"use_aux": True, "use_mcr": False, "use_icr": False},
    "joint_v3": {"use_aux": True, "use_mcr": False, "use_icr": False},
    "joint_v1+cr": {"use_aux": True, "use_mcr": True, "use_icr": True},
    "joint_v2+cr": {"use_aux": True, "use_mcr": True, "use_icr": True},
    "joint_v3+cr": {"use_aux": True, "use_mcr": True, "use_icr": True},
    "full": {"use_aux": True, "use_mcr": True, "use_icr": True},
}


def lssc_loss_kwargs(name: str) -> dict[str, bool]:
    """``use_aux``/``use_mcr``/``use_icr`` of :class:`LSSCLoss` for a paper variant.

    Args:
        name: ``"backbone"``, ``"baseline"``, ``"joint_v1"``, ``"joint_v2"``, ``"joint_v3"``, the same with
            ``"+cr"`` (or ``"_cr"``), or ``"full"`` (= ``"joint_v3+cr"``). Case-insensitive.

    Raises:
        ValueError: unknown name.
    """
    key = name.strip().lower().replace("-", "_").replace(" ", "")
    if key.endswith("_cr"):
        key = key[:-3] + "+cr"
    if key not in _LOSS_VARIANTS:
        raise ValueError(f"unknown LSSC variant {name!r}; expected one of {sorted(_LOSS_VARIANTS)}")
    return dict(_LOSS_VARIANTS[key])


def _as_label_map(label: Tensor, spatial_dims: int = 2) -> Tensor:
    """``(B, *S)`` or ``(B, 1, *S)`` class indices with ``len(S) == spatial_dims`` -> ``(B, 1, *S)``."""
    if label.dim() == spatial_dims + 1:
        label = label.unsqueeze(1)
    if label.dim() != spatial_dims + 2 or label.shape[1] != 1:
        sp = ("H", "W", "D")[:spatial_dims]
        raise ValueError(f"label must be (B, {', '.join(sp)}) or (B, 1, {', '.join(sp)}) class indices, "
                         f"got {tuple(label.shape)}")
    return label


def downsample_labels(label: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour (``nearest-exact``: the label at each target cell's centre) downsampling of class maps.

    Args:
        label: ``(B, H, W)`` or ``(B, 1, H, W)`` class indices (or ``(B, [1,] H, W, D)`` with a 3D ``size``).
        size: target ``(h, w)`` (or ``(h, w, d)``).

    Returns:
        ``(B, 1, h, w[, d])`` labels of the input dtype.
    """
    label = _as_label_map(label, len(size))
    if tuple(label.shape[2:]) == tuple(size):
        return label
    # float for interpolate; class indices < 2^24 are exact in float32
    return F.interpolate(label.float(), size=tuple(size), mode="nearest-exact").to(label.dtype)


def modality_consistency_loss(q_m1: Tensor, q_m2: Tensor) -> Tensor:
    """Eq. 13: ``sum_i (1 - cos(Q_M1^i, Q_M2^i))`` for class embeddings ``(Z, D)`` (or ``(..., Z, D)``, summed)."""
    if q_m1.shape != q_m2.shape:
        raise ValueError(f"class embeddings differ in shape: {tuple(q_m1.shape)} vs {tuple(q_m2.shape)}")
    return (1.0 - F.cosine_similarity(q_m1, q_m2, dim=-1, eps=1e-8)).sum()


def symmetric_kl_rows(e1: Tensor, e2: Tensor, tau: float = 4.0) -> Tensor:
    """Symmetric KL between the row-wise softmax distributions of ``e1 / tau`` and ``e2 / tau``.

    Args:
        e1, e2: ``(..., Z, Z)`` correlation matrices (broadcastable against each other).
        tau: temperature.

    Returns:
        ``(...)``: ``sum_i KL(p1^i || p2^i) + KL(p2^i || p1^i)`` with ``p^i = softmax(e^i / tau)``.
    """
    lp1 = torch.log_softmax(e1 / tau, dim=-1)
    lp2 = torch.log_softmax(e2 / tau, dim=-1)
    # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)
    return ((lp1.exp() - lp2.exp()) * (lp1 - lp2)).sum(dim=(-2, -1))


def _check_icr_reduction(pairing: str, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"icr_reduction must be 'mean' or 'sum', got {reduction!r}")
    if pairing == "mean" and reduction != "mean":
        raise ValueError(
            f"icr_reduction={reduction!r} needs icr_pairing='all_pairs': icr_pairing='mean' evaluates Eq. 14 once "
            "(between batch-mean correlations), there are no pairs to sum"
        )


def image_consistency_loss(
    corr_m1: Sequence[Tensor],
    corr_m2: Sequence[Tensor],
    tau: float = 4.0,
    pairing: Literal["all_pairs", "mean"] = "all_pairs",
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Eq. 14 summed over scales.

    Args:
        corr_m1, corr_m2: per scale, the correlation matrices ``(B1, Z, Z)`` / ``(B2, Z, Z)`` of each modality's
            batch (``forward_train(...)["correlations"]``).
        tau: temperature (4 in the paper).
        pairing: ``"all_pairs"`` (mean of Eq. 14 over every cross-modal image pair) or ``"mean"`` (Eq. 14 between
            the batch-mean correlation matrices), see choice 4 of the module docstring.
        reduction: with ``"all_pairs"``, ``"mean"`` (default) or ``"sum"`` of Eq. 14 over the ``B1 x B2`` pairs;
            ``"mean"`` pairing evaluates Eq. 14 once and accepts only ``"mean"``.

    Returns:
        Scalar loss.
    """
    if len(corr_m1) != len(corr_m2) or len(corr_m1) == 0:
        raise ValueError(f"need the same non-zero number of scales, got {len(corr_m1)} and {len(corr_m2)}")
    if pairing not in ("all_pairs", "mean"):
        raise ValueError(f"pairing must be 'all_pairs' or 'mean', got {pairing!r}")
    _check_icr_reduction(pairing, reduction)
    total = corr_m1[0].new_zeros(())
    for e1, e2 in zip(corr_m1, corr_m2):
        if e1.dim() != 3 or e2.dim() != 3 or e1.shape[1:] != e2.shape[1:] or e1.shape[1] != e1.shape[2]:
            raise ValueError(f"correlations must be (B, Z, Z) with equal Z, got {tuple(e1.shape)}, {tuple(e2.shape)}")
        if pairing == "mean":
            total = total + symmetric_kl_rows(e1.mean(0), e2.mean(0), tau)
        else:
            per_pair = symmetric_kl_rows(e1.unsqueeze(1), e2.unsqueeze(0), tau)  # (B1, B2)
            total = total + (per_pair.sum() if reduction == "sum" else per_pair.mean())
    return total


class LSSCLoss(nn.Module):
    """Eq. 15 on two unpaired batches (one per modality).

    ``forward(out_m1, label_m1, out_m2=None, label_m2=None)``: ``out_*`` are dicts of
    ``LSSCSwinUnet.forward_train`` (keys ``logits``, ``aux_logits``, ``correlations``, ``class_embeddings``,
    ``modality``), labels ``(B, H, W)`` or ``(B, 1, H, W)``. Returns a dict of scalars: ``"loss"`` (the total) and
    the components ``"seg_m1"``, ``"seg_m2"``, ``"aux_m1"``, ``"aux_m2"``, ``"mcr"``, ``"icr"`` (0 when switched off
    or not applicable, unweighted).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        gamma: float = 0.5,
        tau: float = 4.0,
        use_aux: bool = True,
        use_mcr: bool = True,
        use_icr: bool = True,
        include_background: bool = True,
        icr_pairing: Literal["all_pairs", "mean"] = "all_pairs",
        icr_reduction: Literal["mean", "sum"] = "mean",
        dice_reduction: Literal["batch", "sample"] = "batch",
    ) -> None:
        """
        Args:
            alpha, beta, gamma: weights of ``Laux``, ``Lmcr``, ``Licr`` (0.5 each in the paper).
            tau: temperature of ``Licr`` (4 in the paper).
            use_aux, use_mcr, use_icr: loss switches of the variants (:func:`lssc_loss_kwargs`).
            include_background: Dice over the background channel too.
            icr_pairing: ``"all_pairs"`` or ``"mean"``, see :func:`image_consistency_loss`.
            icr_reduction: ``"mean"`` (default) or ``"sum"`` of ``Licr`` over the image pairs
                (:func:`image_consistency_loss`); ``"sum"`` multiplies the effective ``gamma`` by ``B1 x B2``.
            dice_reduction: ``"batch"`` (default: one Dice per class pooled over the batch's slices) or
                ``"sample"`` (one Dice per slice and class, averaged), for ``Lseg`` and ``Laux``.
        """
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if icr_pairing not in ("all_pairs", "mean"):
            raise ValueError(f"icr_pairing must be 'all_pairs' or 'mean', got {icr_pairing!r}")
        _check_icr_reduction(icr_pairing, icr_reduction)
        if dice_reduction not in ("batch", "sample"):
            raise ValueError(f"dice_reduction must be 'batch' or 'sample', got {dice_reduction!r}")
        self.alpha, self.beta, self.gamma, self.tau = alpha, beta, gamma, tau
        self.use_aux, self.use_mcr, self.use_icr = use_aux, use_mcr, use_icr
        self.icr_pairing, self.icr_reduction, self.dice_reduction = icr_pairing, icr_reduction, dice_reduction
        self.dice_ce = DiceCELoss(
            include_background=include_background, to_onehot_y=True, softmax=True, batch=dice_reduction == "batch"
        )

    def segmentation_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        """CE + Dice of ``(B, Z, H, W)`` logits against ``(B, [1,] H, W)`` labels (or ``(B, Z, H, W, D)`` against
        ``(B, [1,] H, W, D)``: the 3D configuration)."""
        label = _as_label_map(label, logits.dim() - 2)
        if label.shape[0] != logits.shape[0] or label.shape[2:] != logits.shape[2:]:
            raise ValueError(f"label {tuple(label.shape)} does not match logits {tuple(logits.shape)}")
        return self.dice_ce(logits, label)

    def aux_loss(self, aux_logits: Sequence[Tensor], label: Tensor) -> Tensor:
        """Eq. 12: sum over scales of CE + Dice against the labels downsampled to each scale."""
        if len(aux_logits) == 0:
            raise ValueError("use_aux is on but the network output has no aux_logits (built with use_eam=False?)")
        return sum(self.dice_ce(a, downsample_labels(label, a.shape[2:])) for a in aux_logits)

    @staticmethod
    def _modality_of(out: Mapping[str, Any]) -> int:
        idx = out["modality"]
        first = int(idx[0])
        if bool((idx != first).any()):
            raise ValueError("each batch given to LSSCLoss must hold one modality; got mixed modality indices")
        return first

    def forward(
        self,
        out_m1: Mapping[str, Any],
        label_m1: Tensor,
        out_m2: Mapping[str, Any] | None = None,
        label_m2: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if (out_m2 is None) != (label_m2 is None):
            raise ValueError("give both out_m2 and label_m2, or neither")
        logits = out_m1["logits"]
        zero = logits.new_zeros(())
        parts = {k: zero for k in ("seg_m1", "seg_m2", "aux_m1", "aux_m2", "mcr", "icr")}
        parts["seg_m1"] = self.segmentation_loss(logits, label_m1)
        if self.use_aux:
            parts["aux_m1"] = self.aux_loss(out_m1["aux_logits"], label_m1)
        if out_m2 is not None:
            parts["seg_m2"] = self.segmentation_loss(out_m2["logits"], label_m2)
            if self.use_aux:
                parts["aux_m2"] = self.aux_loss(out_m2["aux_logits"], label_m2)
            if self.use_mcr or self.use_icr:
                m1, m2 = self._modality_of(out_m1), self._modality_of(out_m2)
                if m1 == m2:
                    raise ValueError(f"consistency terms need two different modalities, both batches are {m1}")
            if self.use_mcr:
                q = out_m1["class_embeddings"]
                if q is None:
                    raise ValueError("use_mcr is on but the network has no class embeddings")
                parts["mcr"] = modality_consistency_loss(q[m1], q[m2])
            if self.use_icr:
                if not out_m1["correlations"] or not out_m2["correlations"]:
                    raise ValueError(
                        "use_icr is on but the network output has no correlations (built with use_eam=False or "
                        "use_correlations=False?)"
                    )
                parts["icr"] = image_consistency_loss(
                    out_m1["correlations"], out_m2["correlations"], self.tau, self.icr_pairing, self.icr_reduction
                )
        total = (
            parts["seg_m1"]
            + parts["seg_m2"]
            + self.alpha * (parts["aux_m1"] + parts["aux_m2"])
            + self.beta * parts["mcr"]
            + self.gamma * parts["icr"]
        )
        return {"loss": total, **parts}
