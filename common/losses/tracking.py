"""Point-tracking training loss: weighted L1 between predicted and reference tracks on visible points.

SpeckNet paper, Sec. 4.4 ("trained end-to-end using a weighted L1 loss between the estimated and reference
trajectories", after Zheng et al., PointOdyssey / PIPs++); METHODS.md §4.

``loss = sum_{b,t,n} w[b,t,n] * (|dx| + |dy|) / 2  /  max(sum_{b,t,n} w[b,t,n], eps)``

with ``w`` the visibility mask (bool, or float weights in ``[0, 1]``), optionally zeroed on each point's query frame.
The loss is in input pixels per coordinate, so its scale follows the training resolution.

Choices the paper does not state
--------------------------------
1. Normalisation: a masked mean over the whole batch (sum of weighted errors divided by the sum of weights), as the
   PIPs/PIPs++ ``reduce_masked_mean``; every visible point of every frame counts the same, so long clips and many
   points are not down-weighted relative to short ones. ``reduction="sum"`` returns the numerator instead.
2. Coordinates: the absolute error is averaged over ``x`` and ``y`` (PIPs convention), not summed.
3. Query frames: with ``query_frames`` given, the query frame of each point gets weight 0. Its prediction is the query
   point itself (zero error, zero gradient), so counting it would only shrink the loss by ``1 / T``.
4. No visible point at all: the loss is 0 (still connected to ``pred`` so ``backward`` works), because
   ``sum w = 0`` makes the masked mean undefined and such a clip carries no supervision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["tracking_l1_loss", "TrackingL1Loss"]

_EPS = 1e-8


def _query_frame_mask(query_frames: Tensor | int, b: int, t: int, n: int, device: torch.device) -> Tensor:
    """(B, T, N) True on each point's query frame; ``query_frames`` int, (B,) or (B, N)."""
    qf = torch.as_tensor(query_frames, device=device)
    if qf.is_floating_point():
        raise ValueError(f"tracking_l1_loss: query_frames must be integers, got {qf.dtype}")
    qf = qf.long()
    if qf.ndim == 0:
        qf = qf.expand(b, n)
    elif qf.ndim == 1 and qf.shape[0] == b:
        qf = qf[:, None].expand(b, n)
    if qf.shape != (b, n):
        raise ValueError(f"tracking_l1_loss: query_frames must be an int, (B,) or (B, N) = {(b, n)}, got "
                         f"{tuple(qf.shape)}")
    return torch.arange(t, device=device)[None, :, None] == qf[:, None, :]


def tracking_l1_loss(
    pred: Tensor,
    target: Tensor,
    visible: Tensor,
    query_frames: Tensor | int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Weighted L1 track loss (see the module docstring for the formula and normalisation).

    Args:
        pred: (B, T, N, 2) predicted ``(x, y)``.
        target: (B, T, N, 2) reference ``(x, y)``.
        visible: (B, T, N) bool visibility or float weights ``>= 0``.
        query_frames: optional int, (B,) or (B, N) query frame(s) whose entries get weight 0.
        reduction: ``"mean"`` (masked mean) or ``"sum"`` (weighted sum).

    Returns:
        Scalar loss.
    """
    if pred.ndim != 4 or pred.shape[-1] != 2:
        raise ValueError(f"tracking_l1_loss: pred must have shape (B, T, N, 2), got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"tracking_l1_loss: target shape {tuple(target.shape)} != pred shape {tuple(pred.shape)}")
    if visible.shape != pred.shape[:3]:
        raise ValueError(f"tracking_l1_loss: visible must have shape {tuple(pred.shape[:3])}, got "
                         f"{tuple(visible.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"tracking_l1_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    weights = visible.to(device=pred.device, dtype=pred.dtype)
    if query_frames is not None:
        b, t, n = pred.shape[:3]
        weights = weights.masked_fill(_query_frame_mask(query_frames, b, t, n, pred.device), 0.0)
    err = (pred - target.to(pred.dtype)).abs().mean(-1)  # (B, T, N)
    total = (weights * err).sum()
    if reduction == "sum":
        return total
    return total / weights.sum().clamp_min(_EPS)


class TrackingL1Loss(nn.Module):
    """Module form of :func:`tracking_l1_loss`.

    Args:
        reduction: ``"mean"`` (masked mean over visible points, default) or ``"sum"``.
        exclude_query_frame: zero the weight of each point's query frame when ``query_frames`` is passed.

    Shapes: ``forward(pred (B, T, N, 2), target (B, T, N, 2), visible (B, T, N), query_frames=None)`` -> scalar.
    """

    def __init__(self, reduction: str = "mean", exclude_query_frame: bool = True) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"TrackingL1Loss: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.exclude_query_frame = bool(exclude_query_frame)

    def forward(
        self, pred: Tensor, target: Tensor, visible: Tensor, query_frames: Tensor | int | None = None
    ) -> Tensor:
        qf = query_frames if self.exclude_query_frame else None
        return tracking_l1_loss(pred, target, visible, qf, self.reduction)
