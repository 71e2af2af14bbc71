"""Registration metrics of AdaCS (``METHODS.md`` §3, paper Sec. 5.2): warp the source mask, compare with the target.

* :func:`warp_mask` resamples a source label map with a displacement ``û`` (``(B, spatial_dims, *spatial)`` in
  pixels, channel ``k`` along spatial axis ``k``, pull convention ``warped(x) = mask(x + û(x))``, zeros outside — the
  :mod:`common.networks.registration` conventions).

  - ``mode="linear"`` (default): one-hot encode all labels, warp every channel with bilinear (trilinear)
    interpolation, take the argmax per pixel (ties and pixels pulled from outside the image go to background, label
    0). Sub-pixel motion moves boundaries smoothly and no label can win by interpolation artefacts.
  - ``mode="linear_any"``: the AdaCS authors' evaluation — warp the (one-hot) mask bilinearly and count every
    pixel whose warped foreground value is ``> 0`` as foreground (with several labels, the largest positive warped
    foreground value wins). Every pixel whose interpolation stencil touches the source mask counts, so the warped
    mask is up to one pixel larger than with ``"linear"``.
  - ``mode="nearest"``: nearest-neighbour resampling of the label map.

* :func:`mask_overlap_metrics` for one foreground ``label`` (e.g. the myocardium), per image of the batch, with
  MONAI's metric functions on one-hot masks:

  - ``dice``: ``2 |A ∩ B| / (|A| + |B|)`` (``monai.metrics.compute_dice``; 1 when both masks are empty).
  - ``hd``: symmetric Hausdorff distance between the mask boundaries; ``hd95``: the larger of the two directed
    95th percentiles (``monai.metrics.compute_hausdorff_distance``).
  - ``asd``: average surface distance (``monai.metrics.compute_average_surface_distance``). By default it is
    directed *from the target boundary to the warped boundary* — the AdaCS authors' evaluation calls
    ``medpy.metric.binary.asd(target, warped)``; ``symmetric_asd=True`` pools the distances of both directions.

  Boundaries are the mask pixels removed by a binary erosion with the 4-neighbourhood (6 in 3D) cross, distances are
  Euclidean between boundary-pixel centres scaled by ``spacing`` (pixels when ``spacing`` is ``None``, else the
  spacing's unit, e.g. mm). With an empty mask MONAI warns and returns ``inf`` (one empty) or ``nan`` (both).

* :func:`jacobian_determinant` of ``φ(x) = x + û(x)`` with ``torch.gradient`` (central differences inside the
  image, one-sided at the border) and :func:`nonpositive_jacobian_percent`, the percentage of pixels with
  ``det J_φ ≤ 0`` (folding).

:func:`registration_metrics` bundles all of it for one pair batch: warp, overlap metrics, folding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from monai.networks.blocks.warp import Warp
from torch import Tensor

from common.metrics.segmentation import monai_distance_notices_ignored

__all__ = [
    "MASK_BINARIZATIONS",
    "MASK_WARP_MODES",
    "jacobian_determinant",
    "mask_overlap_metrics",
    "nonpositive_jacobian_percent",
    "registration_metrics",
    "warp_mask",
]

MASK_WARP_MODES = ("linear", "linear_any", "nearest")
# evaluation option -> warp_mask mode: "argmax" (ours) or "any" (the AdaCS authors': bilinear, every value > 0)
MASK_BINARIZATIONS = {"argmax": "linear", "any": "linear_any"}
Spacing = float | Sequence[float] | None


def _check_displacement(displacement: Tensor) -> int:
    spatial_dims = displacement.ndim - 2
    if spatial_dims not in (2, 3) or displacement.shape[1] != spatial_dims:
        raise ValueError(
            "displacement must be (B, spatial_dims, *spatial) with spatial_dims 2 or 3, "
            f"got {tuple(displacement.shape)}"
        )
    return spatial_dims


def warp_mask(mask: Tensor, displacement: Tensor, mode: str = "linear", num_labels: int | None = None) -> Tensor:
    """Warp a label map with a displacement.

    Args:
        mask: ``(B, 1, *spatial)`` integer (or integer-valued float/bool) labels, 0 = background.
        displacement: ``(B, spatial_dims, *spatial)`` in pixels.
        mode: ``"linear"`` (one-hot, bilinear, argmax), ``"linear_any"`` (one-hot, bilinear, every value > 0 is
            foreground: the AdaCS authors' evaluation) or ``"nearest"``; see the module docstring.
        num_labels: number of labels including background for the linear modes; default ``max(mask) + 1``.

    Returns:
        ``(B, 1, *spatial)`` ``torch.long`` label map.
    """
    spatial_dims = _check_displacement(displacement)
    if mask.ndim != spatial_dims + 2 or mask.shape[1] != 1 or mask.shape[0] != displacement.shape[0]:
        raise ValueError(
            f"mask must be (B, 1, *spatial) for displacement {tuple(displacement.shape)}, got {tuple(mask.shape)}"
        )
    if mask.shape[2:] != displacement.shape[2:]:
        raise ValueError(f"mask size {tuple(mask.shape[2:])} != displacement size {tuple(displacement.shape[2:])}")
    if mode not in MASK_WARP_MODES:
        raise ValueError(f"mask warp mode must be one of {MASK_WARP_MODES}, got {mode!r}")
    labels = mask.round().long() if mask.is_floating_point() else mask.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("mask labels must be >= 0")
    ddf = displacement.detach().float()
    with warnings.catch_warnings():
        # MONAI announces its pure-PyTorch resampler on every construction
        warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp: Using PyTorch native grid_sample",
                                category=UserWarning)
        warper = Warp(mode="nearest" if mode == "nearest" else "bilinear", padding_mode="zeros")
    if mode == "nearest":
        return warper(labels.float(), ddf).round().long()
    n = int(labels.max()) + 1 if num_labels is None else int(num_labels)
    if labels.numel() and int(labels.max()) >= n:
        raise ValueError(f"mask has label {int(labels.max())} but num_labels={n}")
    onehot = F.one_hot(labels[:, 0], n).movedim(-1, 1).float()
    warped = warper(onehot, ddf)
    if mode == "linear":
        return warped.argmax(dim=1, keepdim=True)
    # "linear_any": background only where no foreground channel received any weight
    if n == 1:
        return torch.zeros_like(labels)
    fg = warped[:, 1:]
    best = fg.argmax(dim=1, keepdim=True) + 1
    return torch.where(fg.amax(dim=1, keepdim=True) > 0, best, torch.zeros_like(best))


def _onehot_binary(mask: Tensor, label: int) -> Tensor:
    fg = (mask[:, 0] == label).float()
    return torch.stack([1.0 - fg, fg], dim=1)


def mask_overlap_metrics(
    pred_mask: Tensor, target_mask: Tensor, label: int = 1, spacing: Spacing = None, symmetric_asd: bool = False
) -> dict[str, Tensor]:
    """Dice, HD, HD95 and ASD of ``label`` between a warped mask and the target mask.

    Args:
        pred_mask: ``(B, 1, *spatial)`` label map (e.g. from :func:`warp_mask`).
        target_mask: ``(B, 1, *spatial)`` label map.
        label: the foreground label compared (e.g. the myocardium's label).
        spacing: pixel size per spatial axis (or one number, or one entry per image), ``None`` = 1.
        symmetric_asd: pool both directions for ASD instead of target -> warped.

    Returns:
        ``{"dice", "hd", "hd95", "asd"}`` -> ``(B,)`` float tensors.
    """
    if pred_mask.shape != target_mask.shape or pred_mask.ndim not in (4, 5) or pred_mask.shape[1] != 1:
        raise ValueError(
            f"pred_mask and target_mask must be (B, 1, *spatial) of one shape, got {tuple(pred_mask.shape)} and "
            f"{tuple(target_mask.shape)}"
        )
    pred = _onehot_binary(pred_mask.detach().cpu(), label)
    gt = _onehot_binary(target_mask.detach().cpu(), label)
    dice = compute_dice(pred, gt, include_background=False, ignore_empty=False)[:, 0]
    # an empty mask is worth MONAI's notice here (no NaN/inf convention of our own), its deprecation notice is not
    with monai_distance_notices_ignored(empty_class=False):
        hd = compute_hausdorff_distance(pred, gt, include_background=False, spacing=spacing)[:, 0]
        hd95 = compute_hausdorff_distance(pred, gt, include_background=False, percentile=95, spacing=spacing)[:, 0]
        if symmetric_asd:
            asd = compute_average_surface_distance(pred, gt, include_background=False, symmetric=True,
                                                   spacing=spacing)
        else:
            # MONAI measures from y_pred's boundary to y's: the target goes first for target -> warped
            asd = compute_average_surface_distance(gt, pred, include_background=False, symmetric=False,
                                                   spacing=spacing)
    return {"dice": dice.float(), "hd": hd.float(), "hd95": hd95.float(), "asd": asd[:, 0].float()}


def jacobian_determinant(displacement: Tensor) -> Tensor:
    """``det J_φ`` of ``φ(x) = x + û(x)``, ``J_ij = δ_ij + ∂û_i/∂x_j``: ``(B, n, *spatial)`` -> ``(B, *spatial)``."""
    spatial_dims = _check_displacement(displacement)
    u = displacement.detach().double()
    # grads[j][:, i] = ∂u_i / ∂x_j
    grads = torch.gradient(u, dim=tuple(range(2, 2 + spatial_dims)))
    jac = torch.stack(grads, dim=2)  # (B, i, j, *spatial)
    jac = jac + torch.eye(spatial_dims, dtype=jac.dtype, device=jac.device).view(
        1, spatial_dims, spatial_dims, *([1] * spatial_dims)
    )
    return torch.linalg.det(jac.movedim(1, -1).movedim(1, -1))


def nonpositive_jacobian_percent(displacement: Tensor) -> Tensor:
    """Percentage (0-100) of pixels with ``det J_φ ≤ 0``, per image: ``(B, n, *spatial)`` -> ``(B,)`` float64."""
    det = jacobian_determinant(displacement)
    return 100.0 * (det <= 0).flatten(1).double().mean(dim=1)


def registration_metrics(
    source_mask: Tensor,
    target_mask: Tensor,
    displacement: Tensor,
    label: int = 1,
    spacing: Spacing = None,
    mask_mode: str = "linear",
    symmetric_asd: bool = False,
) -> dict[str, Tensor]:
    """Warp ``source_mask`` with ``displacement`` and score it against ``target_mask``.

    Args:
        source_mask, target_mask: ``(B, 1, *spatial)`` label maps.
        displacement: ``(B, spatial_dims, *spatial)`` in pixels.
        label: foreground label compared (the myocardium's).
        spacing: pixel size (see :func:`mask_overlap_metrics`).
        mask_mode: :func:`warp_mask` mode.
        symmetric_asd: see :func:`mask_overlap_metrics`.

    Returns:
        ``{"dice", "hd", "hd95", "asd", "nonpositive_jacobian_percent"}`` -> ``(B,)`` tensors, and
        ``"warped_mask"`` -> ``(B, 1, *spatial)``.
    """
    num_labels = int(max(source_mask.max(), target_mask.max(), label)) + 1
    warped = warp_mask(source_mask, displacement, mode=mask_mode, num_labels=num_labels)
    out = mask_overlap_metrics(warped, target_mask, label=label, spacing=spacing, symmetric_asd=symmetric_asd)
    out["nonpositive_jacobian_percent"] = nonpositive_jacobian_percent(displacement).float().cpu()
    out["warped_mask"] = warped
    return out
