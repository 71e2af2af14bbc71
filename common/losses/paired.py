"""BOTM's training loss: 0.5 cross-entropy + 0.5 Dice on each frame of a pair, summed over the frames.

Paper Sec. 3.1: "the standard Dice and Cross-Entropy loss function with the same weight"; ``METHODS.md`` §1 (from
the authors' code): per frame, summed over both frames. Each frame's term is MONAI's ``DiceCELoss``; this module only
splits the stacked frames and checks the inputs.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn

__all__ = ["PairedDiceCELoss"]


class PairedDiceCELoss(nn.Module):
    """``sum_k [ce_weight CE(logits_k, y_k) + dice_weight Dice(softmax(logits_k), onehot(y_k))]`` over the frames k.

    Args:
        num_classes: classes per frame ``C`` (background included).
        ce_weight, dice_weight: weights of the two terms (0.5 and 0.5 in the paper).
        include_background: Dice over all classes (True, the multi-class Dice of the authors' code) or over the
            foreground classes only.
        smooth: added to the numerator and denominator of the Dice ratio so empty classes give a finite loss.

    ``forward(logits, label)``:

    * ``logits`` ``(B, F C, *spatial)``: frame ``k``'s logits in channels ``[k C, (k + 1) C)`` (BOTM: ``F = 2``);
    * ``label`` ``(B, F, *spatial)`` integer class ids (any numeric dtype holding integers).

    Returns a scalar. Each frame's term is MONAI ``DiceCELoss(softmax=True, to_onehot_y=True)``: the soft Dice of the
    softmax probabilities per sample and class (``batch=False``), averaged over the classes and the batch, plus the
    cross-entropy averaged over pixels and the batch (always over all classes, as in the authors' code).
    """

    def __init__(self, num_classes: int, ce_weight: float = 0.5, dice_weight: float = 0.5,
                 include_background: bool = True, smooth: float = 1e-5) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError(f"weights must be >= 0 and not both 0, got ce={ce_weight}, dice={dice_weight}")
        self.num_classes = int(num_classes)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.include_background = bool(include_background)
        self.smooth = float(smooth)
        self.dice_ce = DiceCELoss(include_background=self.include_background, to_onehot_y=True, softmax=True,
                                  smooth_nr=self.smooth, smooth_dr=self.smooth, lambda_dice=self.dice_weight,
                                  lambda_ce=self.ce_weight)

    def _check(self, logits: Tensor, label: Tensor) -> tuple[int, Tensor]:
        c = self.num_classes
        if logits.ndim < 3 or logits.shape[1] % c:
            raise ValueError(
                f"logits must be (B, frames * {c}, *spatial), got shape {tuple(logits.shape)}"
            )
        n_frames = logits.shape[1] // c
        if label.ndim != logits.ndim or label.shape[0] != logits.shape[0] or label.shape[1] != n_frames \
                or label.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"label must be (B, {n_frames}, *spatial) = {(logits.shape[0], n_frames, *logits.shape[2:])} for "
                f"logits {tuple(logits.shape)}, got {tuple(label.shape)}"
            )
        y = label.detach()
        if y.is_floating_point():
            if not torch.equal(y, torch.round(y)):
                raise ValueError("label must hold integer class ids, got non-integer values")
        y = y.long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
            raise ValueError(f"label holds class ids outside [0, {c}): [{int(y.min())}, {int(y.max())}]")
        return n_frames, y

    def frame_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of one frame: ``logits`` ``(B, C, *spatial)``, ``target`` ``(B, *spatial)`` class ids."""
        # float32 at least: half-precision logits would lose the small Dice smoothing terms
        return self.dice_ce(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                            target.unsqueeze(1))

    def forward(self, logits: Tensor, label: Tensor) -> Tensor:
        """Sum of :meth:`frame_loss` over the frames (see the class docstring for the shapes)."""
        n_frames, y = self._check(logits, label)
        c = self.num_classes
        return sum(self.frame_loss(logits[:, k * c : (k + 1) * c], y[:, k]) for k in range(n_frames))
