"""Volume <-> 2D slice-stack transforms for slice-wise (2.5D) networks: consecutive slices as channels.

Volumes are channel-first ``(C, X, Y, Z)`` (MONAI's layout after ``EnsureChannelFirstd``). The slicing axis is a
spatial axis ``0..2`` or a name, assuming the volume was reoriented to RAS (``Orientationd(axcodes="RAS")``):
``"sagittal"`` = X, ``"coronal"`` = Y, ``"axial"`` = Z. A slice stack of slice ``s`` holds slices
``s - k .. s + k`` (``num_slices = 2k + 1``) of every channel, channel-major (``C * num_slices`` channels); near the
first and last slice the missing neighbours repeat the edge slice (replicate padding), so every slice of the volume
has a stack and the volume size is unchanged.

The intensity steps of the LSSC pipeline are MONAI transforms used directly in the bundle configs
(``ClipIntensityPercentilesd(upper=98)``, ``NormalizeIntensityd``, ``SpatialPadd`` with the in-plane size of
:func:`inplane_size`); this module adds what MONAI lacks: the paper's in-plane crop around the heart
(:class:`HeartBoxCropd`, invertible, so predictions map back with ``Invertd``), slice stacks with context
(:class:`ConsecutiveSlicesd`, :func:`volume_to_slice_stacks`), their reassembly into a volume
(:func:`stacks_to_volume`) and the choice of training slices (:func:`foreground_slices`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Cropd, CropForeground, MapTransform

__all__ = [
    "SLICE_AXES",
    "CROP_MODES",
    "ConsecutiveSlicesd",
    "HeartBoxCropd",
    "NetworkHeartLocator",
    "crop_window",
    "foreground_box",
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


CROP_MODES = ("heart_box", "centre")
"""In-plane crop of :class:`HeartBoxCropd`: around the heart's box (the paper's) or at the volume centre."""


def foreground_box(mask: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box ``(start, end)`` (voxel indices, end exclusive) of ``mask > 0`` over the spatial axes of a
    channel-first ``(C, X, Y, Z)`` array; ``None`` when nothing is foreground."""
    _check_volume(mask, "mask")
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    fg = (m > 0).any(axis=0)
    if not fg.any():
        return None
    start = np.array([int(np.flatnonzero(fg.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)])
    end = np.array([int(np.flatnonzero(fg.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1
                    for a in range(3)])
    return start, end


def crop_window(centre: float, size: int, dim: int) -> tuple[int, int]:
    """``(start, end)`` of a ``size``-voxel window centred at ``centre`` along an axis of ``dim`` voxels, shifted to
    lie inside the volume (so no image content is replaced by padding); the whole axis when ``dim <= size`` (the
    bundle's ``SpatialPadd`` then pads it, after the intensity normalisation, as for the centre crop)."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    start = int(np.clip(np.floor(centre - size / 2 + 0.5), 0, max(dim - size, 0)))
    return start, min(start + size, dim)


class HeartBoxCropd(Cropd):
    """In-plane crop of channel-first ``(C, X, Y, Z)`` volumes around the heart (LSSC paper Sec. 4.1: "crop their
    central heart region by a 3D bounding box which has a fixed coronal plane size of 256 x 256", then the 224 x 224
    centre of it), or at the volume centre (``mode="centre"``, the former behaviour).

    The heart's position is, in this order of preference: a box given per case in ``data[box_key]`` or for every
    case in ``box`` (voxel indices ``[x0, y0, z0, x1, y1, z1]`` of the input file as read, end exclusive; mapped
    through the file's and the current affine, so it survives reorientation and resampling), else the bounding box
    of ``data[source_key] > 0`` (the labels: training and the paper's evaluation protocol). Without either,
    ``missing="centre"`` crops the centre and logs it, ``missing="error"`` raises a ``ValueError`` naming the file.

    Without a given box or a label, ``locator`` (e.g. :class:`NetworkHeartLocator`), called as
    ``locator(image, data.get("modality"))``, returns a foreground mask on the current grid whose box is used.

    The crop window has ``roi_size`` (``-1`` keeps an axis, e.g. the slicing axis, see :func:`inplane_size`). With
    ``box_size`` (the paper's 256), a ``box_size`` box is centred on the heart first and the window is the centre of
    that box; every window is shifted to lie inside the volume (:func:`crop_window`), so axes smaller than the
    window are kept whole and padded later. Invertible (MONAI ``CropForeground.inverse``), so ``Invertd`` maps
    predictions back to the original grid.
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        source_key: str | None = "label",
        box_key: str | None = "heart_box",
        mode: str = "heart_box",
        box_size: Sequence[int] | int | None = None,
        missing: str = "error",
        box: Sequence[float] | None = None,
        locator: Callable[[Any, Any], Any] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, cropper=CropForeground(allow_smaller=True), allow_missing_keys=allow_missing_keys)
        if mode not in CROP_MODES:
            raise ValueError(f"HeartBoxCropd mode must be one of {CROP_MODES}, got {mode!r}")
        if missing not in ("error", "centre"):
            raise ValueError(f"HeartBoxCropd missing must be 'error' or 'centre', got {missing!r}")
        self.roi_size = [int(r) for r in roi_size]
        if len(self.roi_size) != 3 or any(r == 0 or r < -1 for r in self.roi_size):
            raise ValueError(f"roi_size must be 3 sizes (> 0, or -1 to keep an axis), got {list(roi_size)}")
        if box_size is None:
            self.box_size = None
        else:
            b = [int(box_size)] * 3 if isinstance(box_size, (int, np.integer)) else [int(v) for v in box_size]
            if len(b) == 2:  # in-plane sizes: keep the axes where roi_size keeps everything
                it = iter(b)
                b = [-1 if r == -1 else next(it) for r in self.roi_size]
            if len(b) != 3:
                raise ValueError(f"box_size must be one, two (in-plane) or three sizes, got {box_size!r}")
            self.box_size = b
        self.source_key, self.box_key, self.mode, self.missing = source_key, box_key, mode, missing
        self.box = None if box is None or len(box) == 0 else list(box)
        self.locator = locator

    @staticmethod
    def _name(d: Mapping[Hashable, Any], key: Hashable) -> str:
        meta = getattr(d.get(key), "meta", {}) or {}
        return str(meta.get("filename_or_obj", key))

    def _given_box(self, d: Mapping[Hashable, Any], ref: Any) -> tuple[np.ndarray, np.ndarray] | None:
        given = d.get(self.box_key) if self.box_key is not None else None
        given = self.box if given is None or len(given) == 0 else given
        if given is None:
            return None
        box = np.asarray(given, dtype=np.float64).reshape(-1)
        if box.size == 0:
            return None
        name = self._name(d, next(iter(self.keys)))
        if box.size != 6 or not np.all(np.isfinite(box)) or np.any(box[3:] <= box[:3]):
            raise ValueError(f"{name}: {self.box_key} must be [x0, y0, z0, x1, y1, z1] voxel indices of the input "
                             f"file with x0 < x1, y0 < y1, z0 < z1; got {given!r}")
        if not isinstance(ref, MetaTensor) or "original_affine" not in ref.meta:
            raise ValueError(f"{name}: a given {self.box_key} needs the image loaded by LoadImaged (its affines)")
        to_now = np.linalg.inv(np.asarray(ref.affine, np.float64)) @ np.asarray(ref.meta["original_affine"],
                                                                                np.float64)
        corners = np.array([[box[3 * ends[k] + k] for k in range(3)]
                            for ends in np.ndindex(2, 2, 2)], dtype=np.float64)
        # the box edges are voxel borders: corners at -0.5 / +0.5 around the voxel centres they enclose
        corners = corners - 0.5
        now = (to_now[:3, :3] @ corners.T + to_now[:3, 3:4]).T + 0.5
        return np.floor(now.min(axis=0)), np.ceil(now.max(axis=0))

    def heart_box(self, d: Mapping[Hashable, Any]) -> tuple[np.ndarray, np.ndarray] | None:
        """The heart's box ``(start, end)`` on the current grid, from ``box_key`` or ``source_key``; ``None`` if
        neither is there."""
        ref = d[next(k for k in self.keys if k in d)]
        given = self._given_box(d, ref)
        if given is not None:
            return given
        if self.source_key is not None and self.source_key in d:
            box = foreground_box(d[self.source_key])
            if box is None:
                raise ValueError(f"{self._name(d, self.source_key)}: no labelled structure to place the heart box "
                                 "on (the label is all background); use --crop_mode centre or check the label")
            return box
        if self.locator is not None:
            # a located box is a prediction: when it finds nothing the crop falls back to the centre (logged)
            return foreground_box(self.locator(ref, d.get("modality")))
        return None

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        keys = [k for k in self.key_iterator(d)]
        if not keys:
            return d
        dims = np.asarray(d[keys[0]].shape[1:])
        centre = dims / 2.0
        if self.mode == "heart_box":
            box = self.heart_box(d)
            if box is None:
                if self.missing == "error":
                    raise ValueError(f"{self._name(d, keys[0])}: no heart box (no {self.box_key!r} given and no "
                                     f"{self.source_key!r}); give one or use --crop_mode centre")
                logging.getLogger(__name__).warning("%s: no heart box given; cropping the volume centre",
                                                 self._name(d, keys[0]))
            else:
                centre = (box[0] + box[1]) / 2.0
        start, end = np.zeros(3, dtype=int), dims.astype(int).copy()
        for a in range(3):
            c = float(centre[a])
            if self.box_size is not None and self.box_size[a] > 0:
                b0, b1 = crop_window(c, self.box_size[a], int(dims[a]))
                c = (b0 + b1) / 2.0
            if self.roi_size[a] > 0:
                start[a], end[a] = crop_window(c, self.roi_size[a], int(dims[a]))
        for key in keys:
            d[key] = self.cropper.crop_pad(img=d[key], box_start=start, box_end=end)
        return d


class NetworkHeartLocator:
    """Coarse heart localisation for the crop at inference: a first pass of the segmentation network over the whole
    in-plane field of a volume, on every ``slice_step``-th slice (a coarse, cheap pass), returning the predicted
    foreground ``(1, X, Y, Z)`` (slices between the sampled ones repeat the nearest sampled one).

    The volume is normalised as the bundle's chain does after its crop (top ``clip_percentile`` % clipped, z-score),
    but over the whole field; ``inferer`` is the bundle's :class:`common.engines.inference.SliceStackInferer` (it pads
    the plane to the network's size multiple), so the network must accept in-plane sizes other than its training
    crop (the Swin-Unet does: windowed attention, no absolute positions). The network is put in eval mode and run
    without gradients; run it in the main process (``num_workers=0``) so it holds the loaded weights.

    Args:
        network: the segmentation network (weights loaded before the first volume is read).
        inferer: called as ``inferer(volume (1, C, X, Y, Z), network, modality=...)`` -> ``(1, K, X, Y, Z)``.
        slice_axis: slicing axis of the volume.
        slice_step: use every ``slice_step``-th slice for the coarse pass.
        clip_percentile: upper intensity percentile clipped before the z-score.
        device: where the network runs (default: where its parameters are).
    """

    def __init__(self, network: torch.nn.Module, inferer: Callable[..., torch.Tensor],
                 slice_axis: str | int = "coronal",
                 slice_step: int = 4, clip_percentile: float = 98.0, device: torch.device | str | None = None) -> None:
        if slice_step < 1:
            raise ValueError(f"slice_step must be >= 1, got {slice_step}")
        self.network, self.inferer = network, inferer
        self.slice_axis = slice_axis_index(slice_axis)
        self.slice_step, self.clip_percentile, self.device = int(slice_step), float(clip_percentile), device

    def __call__(self, image: Any, modality: Any = None) -> torch.Tensor:
        _check_volume(image, "image")
        vol = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image, dtype=torch.float32)
        axis = self.slice_axis + 1
        idx = torch.arange(0, vol.shape[axis], self.slice_step)
        sub = vol.index_select(axis, idx)
        hi = float(np.percentile(sub.numpy(), self.clip_percentile))
        sub = sub.clamp(max=hi)
        sub = (sub - sub.mean()) / sub.std().clamp_min(1e-8)
        device = self.device or next(self.network.parameters()).device
        self.network.eval()
        kwargs = {} if modality is None else {"modality": modality}
        with torch.no_grad():
            pred = self.inferer(sub[None].to(device), self.network, **kwargs)
        fg = (pred[0].argmax(0, keepdim=True) > 0).cpu()
        nearest = torch.clamp(torch.round(torch.arange(vol.shape[axis]) / self.slice_step).long(), max=len(idx) - 1)
        return fg.index_select(axis, nearest)
