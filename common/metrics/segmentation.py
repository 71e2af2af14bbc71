"""Per-class segmentation metrics on label maps: Dice, IoU, specificity, HD, HD95, ASD (mm), MAE.

Every ``*_per_class`` function takes a predicted and a reference label map of the same spatial shape (2D or 3D,
numpy or torch, integer class ids ``0..num_classes-1``; ``0`` is the background) and returns a float64 numpy array
with one value per class: classes ``1..Z-1`` by default, ``0..Z-1`` with ``include_background=True``. Overlap and
distance metrics wrap MONAI's metric functions (``compute_dice``, ``compute_iou``, ``get_confusion_matrix`` +
``compute_confusion_matrix_metric``, ``compute_hausdorff_distance``, ``compute_average_surface_distance``).

Levels: the functions are volume-level (one value per class for the whole map). :func:`per_slice_metrics` gives
slice-level values ``(S, C)`` (each slice of a 3D map scored as a 2D map, with the in-plane spacing), and
:func:`mean_over_slices` averages them over the slices where they are defined.

Conventions (the choices MONAI leaves to the caller):

- A class absent from the reference has no defined overlap or surface score: Dice, IoU, HD, HD95 and ASD are NaN
  for it (``ignore_empty=True``, MONAI's default for Dice). With ``ignore_empty=False`` Dice and IoU follow MONAI
  instead (1 when both maps lack the class, 0 when only the prediction has it); distances stay NaN.
- A class present in the reference but missing from the prediction has an infinite surface distance (MONAI's
  value); summaries must decide how to count it (:func:`finite_mean_std` excludes and counts such values).
- Distances are in the units of ``spacing`` (mm per pixel/voxel, one number or one per spatial axis); without
  spacing they are in pixels.
- Specificity is ``TN / (TN + FP)`` per class over all pixels; MAE is the mean absolute difference between the
  predicted class mask (or class probability) and the reference mask over all pixels, per class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SEGMENTATION_METRICS",
    "asd_per_class",
    "dice_per_class",
    "finite_mean_std",
    "hausdorff_per_class",
    "hd95_per_class",
    "iou_per_class",
    "mae_per_class",
    "mean_over_slices",
    "monai_distance_notices_ignored",
    "one_hot_labels",
    "per_slice_metrics",
    "segmentation_metrics",
    "specificity_per_class",
    "voxel_spacing",
]


def _as_long_tensor(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    if t.is_floating_point():
        r = torch.round(t)
        if not torch.allclose(r, t, atol=1e-3):
            raise ValueError(f"{name} must be a label map of integer class ids, got non-integer values")
        t = r
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.long()


def _check_pair(pred: Any, label: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    p = _as_long_tensor(pred, "pred")
    y = _as_long_tensor(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} differs from label shape {tuple(y.shape)}")
    if p.dim() not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D (spatial axes only), got shape {tuple(p.shape)}")
    for name, t in (("pred", p), ("label", y)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} holds class ids outside [0, {num_classes}): [{int(t.min())}, {int(t.max())}]")
    return p, y


def one_hot_labels(label: Any, num_classes: int) -> torch.Tensor:
    """``(*spatial)`` class ids -> ``(1, Z, *spatial)`` float one-hot (MONAI's batch-first, channel-first layout)."""
    t = _as_long_tensor(label, "label")
    return F.one_hot(t, num_classes).movedim(-1, 0).unsqueeze(0).float()


def _select(values: torch.Tensor) -> np.ndarray:
    """MONAI output ``(1, Z or Z-1)`` -> float64 numpy ``(C,)``."""
    return values.reshape(-1).double().numpy()


def _reference_present(label: torch.Tensor, num_classes: int, include_background: bool) -> np.ndarray:
    present = np.array([bool((label == c).any()) for c in range(num_classes)])
    return present if include_background else present[1:]


def voxel_spacing(spacing: float | Sequence[float] | None, ndim: int) -> list[float] | None:
    """Normalise ``spacing`` to one positive number per spatial axis (``None`` stays ``None``: pixel units)."""
    if spacing is None:
        return None
    s = [float(spacing)] * ndim if np.isscalar(spacing) else [float(v) for v in spacing]
    if len(s) != ndim:
        raise ValueError(f"spacing {list(s)} must have one value per spatial axis ({ndim})")
    if any(not np.isfinite(v) or v <= 0 for v in s):
        raise ValueError(f"spacing must be positive and finite, got {s}")
    return s


def dice_per_class(pred: Any, label: Any, num_classes: int, include_background: bool = False,
                   ignore_empty: bool = True) -> np.ndarray:
    """Dice ``2|P n G| / (|P| + |G|)`` per class (in [0, 1]); see the module docstring for absent classes."""
    from monai.metrics import compute_dice

    p, y = _check_pair(pred, label, num_classes)
    out = compute_dice(one_hot_labels(p, num_classes), one_hot_labels(y, num_classes),
                       include_background=include_background, ignore_empty=ignore_empty)
    return _select(out)


def iou_per_class(pred: Any, label: Any, num_classes: int, include_background: bool = False,
                  ignore_empty: bool = True) -> np.ndarray:
    """Intersection over union per class (in [0, 1]); absent classes as :func:`dice_per_class`."""
    from monai.metrics import compute_iou

    p, y = _check_pair(pred, label, num_classes)
    out = compute_iou(one_hot_labels(p, num_classes), one_hot_labels(y, num_classes),
                      include_background=include_background, ignore_empty=ignore_empty)
    return _select(out)


def specificity_per_class(pred: Any, label: Any, num_classes: int, include_background: bool = False) -> np.ndarray:
    """``TN / (TN + FP)`` per class over all pixels (NaN only when every pixel belongs to the class)."""
    from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix

    p, y = _check_pair(pred, label, num_classes)
    cm = get_confusion_matrix(one_hot_labels(p, num_classes), one_hot_labels(y, num_classes),
                              include_background=include_background)
    return _select(compute_confusion_matrix_metric("specificity", cm))


@contextmanager
def monai_distance_notices_ignored(empty_class: bool = True) -> Iterator[None]:
    """Silence exactly the notices MONAI 1.6's surface-distance functions give on every call; any other warning
    still shows.

    * ``UserWarning`` "the prediction/ground truth of class N is all 0, this may result in nan/inf distance"
      (only with ``empty_class``): an absent class is handled by this module's convention (NaN or inf, see the
      module docstring).
    * ``FutureWarning`` about ``get_mask_edges``' deprecated ``always_return_as_numpy`` argument, which MONAI's own
      metric code passes: nothing the caller can change.
    """
    with warnings.catch_warnings():
        if empty_class:
            warnings.filterwarnings("ignore", message=r"the (prediction|ground truth) of class \d+ is all 0",
                                    category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)
        yield


def _distance(fn: Callable[..., torch.Tensor], pred: Any, label: Any, num_classes: int, spacing: Any,
              include_background: bool, **kwargs: Any) -> np.ndarray:
    p, y = _check_pair(pred, label, num_classes)
    sp = voxel_spacing(spacing, p.dim())
    with monai_distance_notices_ignored():
        out = fn(one_hot_labels(p, num_classes), one_hot_labels(y, num_classes),
                 include_background=include_background, spacing=sp, **kwargs)
    values = _select(out)
    values[~_reference_present(y, num_classes, include_background)] = np.nan
    return values


def hausdorff_per_class(pred: Any, label: Any, num_classes: int, spacing: float | Sequence[float] | None = None,
                        include_background: bool = False) -> np.ndarray:
    """Symmetric (maximum) Hausdorff distance between the class surfaces, in units of ``spacing``."""
    from monai.metrics import compute_hausdorff_distance

    return _distance(compute_hausdorff_distance, pred, label, num_classes, spacing, include_background)


def hd95_per_class(pred: Any, label: Any, num_classes: int, spacing: float | Sequence[float] | None = None,
                   include_background: bool = False) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance (MONAI's ``percentile=95``), in units of ``spacing``."""
    from monai.metrics import compute_hausdorff_distance

    return _distance(compute_hausdorff_distance, pred, label, num_classes, spacing, include_background,
                     percentile=95)


def asd_per_class(pred: Any, label: Any, num_classes: int, spacing: float | Sequence[float] | None = None,
                  include_background: bool = False) -> np.ndarray:
    """Average symmetric surface distance (mean over both surfaces' points), in units of ``spacing``."""
    from monai.metrics import compute_average_surface_distance

    return _distance(compute_average_surface_distance, pred, label, num_classes, spacing, include_background,
                     symmetric=True)


def mae_per_class(pred: Any, label: Any, num_classes: int, include_background: bool = False) -> np.ndarray:
    """Mean absolute error between the predicted and the reference class masks, per class, in [0, 1].

    ``pred`` is a label map of ``label``'s shape, or class probabilities ``(Z, *spatial)`` (then the error is
    ``mean |p_c - [label == c]|``).
    """
    y = _as_long_tensor(label, "label")
    p_raw = pred.detach().cpu() if isinstance(pred, torch.Tensor) else torch.as_tensor(np.asarray(pred))
    if p_raw.dim() == y.dim() + 1:
        if p_raw.shape[0] != num_classes or p_raw.shape[1:] != y.shape:
            raise ValueError(f"probabilities {tuple(p_raw.shape)} must be ({num_classes}, *{tuple(y.shape)})")
        _check_pair(y, y, num_classes)
        p_map = p_raw.double()
    else:
        p, y = _check_pair(p_raw, y, num_classes)
        p_map = one_hot_labels(p, num_classes)[0].double()
    y_map = one_hot_labels(y, num_classes)[0].double()
    err = (p_map - y_map).abs().reshape(num_classes, -1).mean(dim=1).numpy()
    return err if include_background else err[1:]


SEGMENTATION_METRICS: dict[str, Callable[..., np.ndarray]] = {
    "dice": dice_per_class,
    "iou": iou_per_class,
    "specificity": specificity_per_class,
    "hd": hausdorff_per_class,
    "hd95": hd95_per_class,
    "asd": asd_per_class,
    "mae": mae_per_class,
}
"""Metric name -> per-class function; the distance metrics (``hd``, ``hd95``, ``asd``) take ``spacing``."""

_DISTANCE_METRICS = ("hd", "hd95", "asd")


def segmentation_metrics(pred: Any, label: Any, num_classes: int, metrics: Sequence[str] = ("dice", "asd"),
                         spacing: float | Sequence[float] | None = None,
                         include_background: bool = False) -> dict[str, np.ndarray]:
    """Volume-level (whole-map) metrics: ``{name: (C,) array}`` for the names of :data:`SEGMENTATION_METRICS`."""
    unknown = [m for m in metrics if m not in SEGMENTATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(SEGMENTATION_METRICS)}")
    out = {}
    for m in metrics:
        kw: dict[str, Any] = {"include_background": include_background}
        if m in _DISTANCE_METRICS:
            kw["spacing"] = spacing
        out[m] = SEGMENTATION_METRICS[m](pred, label, num_classes, **kw)
    return out


def per_slice_metrics(pred: Any, label: Any, num_classes: int, slice_axis: int = -1,
                      metrics: Sequence[str] = ("dice", "asd"), spacing: float | Sequence[float] | None = None,
                      include_background: bool = False) -> dict[str, np.ndarray]:
    """Slice-level metrics of 3D label maps: ``{name: (S, C) array}``, slice ``s`` taken along ``slice_axis``.

    ``spacing`` is the 3D spacing (or one number); each slice uses the spacing of its two in-plane axes.
    """
    p, y = _check_pair(pred, label, num_classes)
    if p.dim() != 3:
        raise ValueError(f"per_slice_metrics needs 3D label maps, got shape {tuple(p.shape)}")
    axis = slice_axis % 3
    sp = voxel_spacing(spacing, 3)
    sp2 = None if sp is None else [s for i, s in enumerate(sp) if i != axis]
    p, y = p.movedim(axis, 0), y.movedim(axis, 0)
    rows = [segmentation_metrics(p[s], y[s], num_classes, metrics, sp2, include_background) for s in range(p.shape[0])]
    n_cls = num_classes if include_background else num_classes - 1
    return {m: np.stack([r[m] for r in rows]) if rows else np.zeros((0, n_cls)) for m in metrics}


def mean_over_slices(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{name: (S, C)}`` -> ``{name: (C,)}``: mean over the slices with a finite value (NaN when there is none)."""
    out = {}
    for k, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        ok = np.isfinite(v)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(ok.any(0), np.where(ok, v, 0.0).sum(0) / ok.sum(0), np.nan)
    return out


def finite_mean_std(values: Sequence[float] | np.ndarray) -> dict[str, float | int | None]:
    """Mean and (population) standard deviation of the finite values, and how many values were not finite.

    Returns ``{"mean", "std", "n", "n_nan", "n_inf"}``; ``mean``/``std`` are ``None`` when no value is finite.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = np.isfinite(v)
    f = v[ok]
    return {
        "mean": float(f.mean()) if f.size else None,
        "std": float(f.std()) if f.size else None,
        "n": int(f.size),
        "n_nan": int(np.isnan(v).sum()),
        "n_inf": int(np.isinf(v).sum()),
    }
