"""Volume <-> 2D slice-stack transforms for slice-wise (2.5D) networks: consecutive slices as channels.

Volumes are channel-first ``(C, X, Y, Z)`` (MONAI's layout after ``EnsureChannelFirstd``). The slicing axis is a
spatial axis ``0..2`` or a name, assuming the volume was reoriented to RAS (``Orientationd(axcodes="RAS")``):
``"sagittal"`` = X, ``"coronal"`` = Y, ``"axial"`` = Z. A slice stack of slice ``s`` holds slices
``s - k .. s + k`` (``num_slices = 2k + 1``) of every channel, channel-major (``C * num_slices`` channels); near the
first and last slice the missing neighbours repeat the edge slice (replicate padding), so every slice of the volume
has a stack and the volume size is unchanged.

The intensity and cropping steps of the LSSC pipeline are MONAI transforms used directly in the bundle configs
(``ClipIntensityPercentilesd(upper=98)``, ``NormalizeIntensityd``, ``CenterSpatialCropd`` / ``SpatialPadd`` with the
in-plane size of :func:`inplane_size`); this module adds what MONAI lacks: slice stacks with context
(:class:`ConsecutiveSlicesd`, :func:`volume_to_slice_stacks`), their reassembly into a volume
(:func:`stacks_to_volume`) and the choice of training slices (:func:`foreground_slices`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = [
    "SLICE_AXES",
    "ConsecutiveSlicesd",
    "consecutive_slices",
    "foreground_slices",
    "inplane_size",
    "slice_axis_index",
    "stacks_to_volume",
    "volume_to_slice_stacks",
]

SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
"""Slicing axis name -> spatial axis of a RAS-oriented ``(C, X, Y, Z)`` volume."""


def slice_axis_index(axis: str | int) -> int:
    """Spatial axis ``0..2`` of a slicing axis given by name (:data:`SLICE_AXES`) or index."""
    if isinstance(axis, str):
        key = axis.strip().lower()
        if key not in SLICE_AXES:
            raise ValueError(f"unknown slice axis {axis!r}; use one of {sorted(SLICE_AXES)} or 0, 1, 2")
        return SLICE_AXES[key]
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= int(axis) <= 2:
        return int(axis)
    raise ValueError(f"slice axis must be a name in {sorted(SLICE_AXES)} or a spatial axis 0, 1, 2; got {axis!r}")


def inplane_size(size: int | Sequence[int], slice_axis: str | int) -> list[int]:
    """3D ``spatial_size``/``roi_size`` that sets the two in-plane axes to ``size`` and keeps the slicing axis
    (``-1``, MONAI's "keep this dimension"), e.g. ``inplane_size(224, "coronal") == [224, -1, 224]``."""
    axis = slice_axis_index(slice_axis)
    sizes = [int(size)] * 2 if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    if len(sizes) != 2 or any(s <= 0 for s in sizes):
        raise ValueError(f"in-plane size must be one or two positive ints, got {size!r}")
    out = list(sizes)
    out.insert(axis, -1)
    return out


def _check_volume(volume: Any, name: str = "volume") -> None:
    if volume.ndim != 4:
        raise ValueError(f"{name} must be channel-first 3D (C, X, Y, Z), got shape {tuple(volume.shape)}")


def _check_num_slices(num_slices: int) -> int:
    if num_slices < 1 or num_slices % 2 == 0:
        raise ValueError(f"num_slices must be odd and >= 1 (the slice between its neighbours), got {num_slices}")
    return num_slices // 2


def consecutive_slices(volume: Any, index: int, slice_axis: str | int = "coronal", num_slices: int = 3) -> Any:
    """Slice stack of slice ``index``: ``(C, X, Y, Z)`` -> ``(C * num_slices, h, w)`` (numpy or torch, same type).

    Channels are ordered channel-major: for one input channel, ``[s - k, ..., s, ..., s + k]``; out-of-volume
    neighbours repeat the edge slice.
    """
    _check_volume(volume)
    axis = slice_axis_index(slice_axis) + 1
    half = _check_num_slices(num_slices)
    depth = volume.shape[axis]
    if not 0 <= index < depth:
        raise IndexError(f"slice index {index} outside [0, {depth}) along axis {slice_axis!r}")
    idx = np.clip(np.arange(index - half, index + half + 1), 0, depth - 1)
    if isinstance(volume, torch.Tensor):
        sl = volume.index_select(axis, torch.as_tensor(idx, device=volume.device)).movedim(axis, 1)
    else:
        sl = np.moveaxis(np.take(volume, idx, axis=axis), axis, 1)
    return sl.reshape((volume.shape[0] * num_slices,) + tuple(sl.shape[2:]))


def volume_to_slice_stacks(volume: torch.Tensor, slice_axis: str | int = "coronal",
                           num_slices: int = 3) -> torch.Tensor:
    """Every slice stack of a volume: ``(C, X, Y, Z)`` -> ``(S, C * num_slices, h, w)``, ``S`` slices along the axis.

    ``stacks[s]`` equals ``consecutive_slices(volume, s, slice_axis, num_slices)``.
    """
    _check_volume(volume)
    axis = slice_axis_index(slice_axis) + 1
    half = _check_num_slices(num_slices)
    v = torch.as_tensor(volume).movedim(axis, 1)  # (C, S, h, w)
    c, s = v.shape[:2]
    idx = (torch.arange(s).unsqueeze(1) + torch.arange(-half, half + 1).unsqueeze(0)).clamp(0, s - 1)  # (S, n)
    stacks = v[:, idx.to(v.device)]  # (C, S, n, h, w)
    return stacks.movedim(1, 0).reshape(s, c * num_slices, *v.shape[2:])


def stacks_to_volume(slices: torch.Tensor, slice_axis: str | int = "coronal") -> torch.Tensor:
    """Reassemble per-slice outputs ``(S, K, h, w)`` into a volume ``(K, X, Y, Z)`` (``S`` along the slicing axis)."""
    if slices.dim() != 4:
        raise ValueError(f"slices must be (S, K, h, w), got shape {tuple(slices.shape)}")
    axis = slice_axis_index(slice_axis) + 1
    return slices.movedim(0, 1).movedim(1, axis)


def foreground_slices(label: Any, slice_axis: str | int = "coronal", margin: int = 0) -> list[int]:
    """Indices of the slices between the first and the last slice holding a foreground label (``> 0``), widened
    by ``margin`` slices on each side and clipped to the volume: the extent of a bounding box of the labelled
    structures along the slicing axis. Empty when the label has no foreground."""
    _check_volume(label, "label")
    axis = slice_axis_index(slice_axis) + 1
    lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    other = tuple(a for a in range(4) if a != axis)
    present = np.flatnonzero((lab > 0).any(axis=other))
    if present.size == 0:
        return []
    lo = max(int(present[0]) - margin, 0)
    hi = min(int(present[-1]) + margin, lab.shape[axis] - 1)
    return list(range(lo, hi + 1))


class ConsecutiveSlicesd(MapTransform):
    """Cut one slice out of channel-first volumes: ``keys`` get the slice stack with its neighbours as channels
    (``(C * num_slices, h, w)``), ``label_keys`` only the slice itself (``(C, h, w)``).

    The slice index is read from ``data[index_key]``. Other entries pass through unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = (),
        index_key: str = "slice",
        slice_axis: str | int = "coronal",
        num_slices: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
        self.index_key = index_key
        self.slice_axis = slice_axis_index(slice_axis)
        _check_num_slices(num_slices)
        self.num_slices = num_slices

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.index_key not in d:
            raise KeyError(f"ConsecutiveSlicesd needs the slice index in data[{self.index_key!r}]")
        index = int(d[self.index_key])
        for key in self.key_iterator(d):
            d[key] = consecutive_slices(d[key], index, self.slice_axis, self.num_slices)
        for key in self.label_keys:
            if key in d:
                d[key] = consecutive_slices(d[key], index, self.slice_axis, 1)
            elif not self.allow_missing_keys:
                raise KeyError(f"ConsecutiveSlicesd: label key {key!r} not in data")
        return d
