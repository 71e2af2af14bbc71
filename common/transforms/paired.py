"""Spatial transforms that draw ONE set of random parameters per sample and apply it to every key.

BOTM trains on a pair of frames (ED/ES, or t/t+1) with their labels; flipping or rotating one frame but not the other
would break the correspondence the optimal-transport blocks learn from. :func:`paired_frame_augmentation` uses
MONAI's ``RandFlipd``/``RandRotated``, which already share one draw across all their keys (tested equal to
:func:`warp_affine`). :class:`RandPairedAffined` is kept for what MONAI's dictionary transforms do not do: moving
point trajectories and their visibility with the image (the tracking transforms in :mod:`common.transforms.video`).

Arrays are ``(..., H, W)``: the last two axes are spatial and every leading axis (frames stacked as channels, time)
receives the same warp. Typical BOTM sample: ``image`` ``(2, H, W)`` float and ``label`` ``(2, H, W)`` int, or
separate keys ``image_ed``/``image_es``/``label_ed``/``label_es`` of ``(1, H, W)`` or ``(H, W)``. Points follow the
pixel-centre ``(x, y)`` convention of :mod:`common.transforms.points`. Outputs keep each input's type (numpy, torch,
MetaTensor with its metadata) and dtype.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor, ensure_tuple, ensure_tuple_rep

from common.transforms.points import (
    affine_matrix,
    apply_affine_to_points,
    restore_type,
    update_visibility,
)

__all__ = [
    "AffineParams",
    "warp_affine",
    "SharedAffined",
    "RandPairedAffined",
    "paired_frame_augmentation",
]

_MODES = ("bilinear", "nearest")
_PADDING = ("zeros", "border", "reflection")


@dataclass(frozen=True)
class AffineParams:
    """One draw of affine parameters (see :func:`common.transforms.points.affine_matrix` for the composition).

    ``translate`` is in pixels ``(tx, ty)``; ``scale`` and ``shear_deg`` are ``(x, y)`` pairs.
    """

    rotate_deg: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    shear_deg: tuple[float, float] = (0.0, 0.0)
    translate: tuple[float, float] = (0.0, 0.0)
    hflip: bool = False
    vflip: bool = False

    def is_identity(self) -> bool:
        return (
            self.rotate_deg == 0.0
            and tuple(self.scale) == (1.0, 1.0)
            and tuple(self.shear_deg) == (0.0, 0.0)
            and tuple(self.translate) == (0.0, 0.0)
            and not self.hflip
            and not self.vflip
        )

    def matrix(self, spatial_size: Sequence[int]) -> np.ndarray:
        """``(3, 3)`` float64 forward map for an image of size ``(H, W)``."""
        return affine_matrix(
            spatial_size, self.rotate_deg, self.scale, self.shear_deg, self.translate, self.hflip, self.vflip
        )


def _exact_flip_axes(matrix: np.ndarray, spatial_size: Sequence[int]) -> tuple[int, ...] | None:
    """Array axes to flip when ``matrix`` is a pure flip/identity, so the warp can be done by exact indexing."""
    h, w = spatial_size
    lin, off = matrix[:2, :2], matrix[:2, 2]
    diag = np.diag(lin)
    if not np.allclose(lin, np.diag(diag), atol=1e-9) or not np.allclose(np.abs(diag), 1.0, atol=1e-9):
        return None
    expected = np.where(diag < 0, [w - 1.0, h - 1.0], 0.0)
    if not np.allclose(off, expected, atol=1e-6):
        return None
    # x is the last array axis, y the one before it
    return tuple(ax for ax, flipped in ((-1, diag[0] < 0), (-2, diag[1] < 0)) if flipped)


def warp_affine(img: Any, matrix: np.ndarray, mode: str = "bilinear", padding_mode: str = "zeros") -> Any:
    """Resample ``img`` ``(..., H, W)`` so content at ``p`` moves to ``matrix @ p`` (pixel-centre convention).

    All leading axes share the warp. Output pixel ``q`` takes the value at ``inverse(matrix) @ q`` of the input,
    interpolated with ``mode`` (``"bilinear"`` or ``"nearest"``; use nearest for labels) and ``padding_mode``
    outside (``"zeros"``, ``"border"``, ``"reflection"``). Pure flips are done by exact indexing. Returns the
    input's type and dtype (integer outputs are rounded and clipped).
    """
    if mode not in _MODES:
        raise ValueError(f"warp_affine: mode must be one of {_MODES}, got {mode!r}")
    if padding_mode not in _PADDING:
        raise ValueError(f"warp_affine: padding_mode must be one of {_PADDING}, got {padding_mode!r}")
    shape = tuple(img.shape)
    if len(shape) < 2 or min(shape[-2:]) < 2:
        raise ValueError(f"warp_affine: expected an array (..., H, W) with H, W >= 2, got shape {shape}")
    h, w = shape[-2:]
    matrix = np.asarray(matrix, dtype=np.float64)
    flip_axes = _exact_flip_axes(matrix, (h, w))
    if flip_axes is not None:
        if not flip_axes:
            return img
        if isinstance(img, torch.Tensor):
            return restore_type(torch.flip(img, dims=flip_axes), img)
        return np.ascontiguousarray(np.flip(img, axis=flip_axes))

    data = convert_to_tensor(img, track_meta=False)
    work_dtype = torch.float64 if data.dtype == torch.float64 else torch.float32
    data = data.to(work_dtype).reshape(1, -1, h, w)
    # source position (inverse map) of every output pixel centre, normalised for align_corners=True where -1 and +1
    # are the centres of the first and last pixel, matching the pixel-centre point convention
    inv = np.linalg.inv(matrix)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_x = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    src_y = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    grid = np.stack([2.0 * src_x / (w - 1) - 1.0, 2.0 * src_y / (h - 1) - 1.0], axis=-1)[None]
    grid_t = torch.as_tensor(grid, dtype=work_dtype, device=data.device)
    out = F.grid_sample(data, grid_t, mode=mode, padding_mode=padding_mode, align_corners=True)
    return restore_type(out.reshape(shape), img)


class SharedAffined(MapTransform):
    """Apply one fixed :class:`AffineParams` to image keys, point keys and their visibility (deterministic).

    Args:
        keys: image keys, each ``(..., H, W)`` with the same ``(H, W)``.
        params: the affine parameters.
        point_keys: keys of point arrays ``(..., 2)`` in ``(x, y)`` pixels.
        visible_keys: visibility ``(...)`` bool, one per point key (same order); points that leave the image become
            invisible. May be empty.
        mode: ``"bilinear"``/``"nearest"``, one for all keys or one per key (nearest for labels).
        padding_mode: ``"zeros"``/``"border"``/``"reflection"``, one or one per key.
        spatial_size: ``(H, W)``; needed only when no image key is present.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        params: AffineParams | None = None,
        point_keys: KeysCollection = (),
        visible_keys: KeysCollection = (),
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "zeros",
        spatial_size: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.params = params if params is not None else AffineParams()
        self.point_keys: tuple[Hashable, ...] = ensure_tuple(point_keys)
        self.visible_keys: tuple[Hashable, ...] = ensure_tuple(visible_keys)
        if self.visible_keys and len(self.visible_keys) != len(self.point_keys):
            raise ValueError(
                f"visible_keys {self.visible_keys} must pair one-to-one with point_keys {self.point_keys}"
            )
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        for m in self.mode:
            if m not in _MODES:
                raise ValueError(f"mode must be one of {_MODES}, got {m!r}")
        for p in self.padding_mode:
            if p not in _PADDING:
                raise ValueError(f"padding_mode must be one of {_PADDING}, got {p!r}")
        self.spatial_size = tuple(spatial_size) if spatial_size is not None else None

    def _spatial_size(self, d: Mapping) -> tuple[int, int]:
        sizes = {tuple(int(s) for s in d[k].shape[-2:]) for k in self.keys if k in d}
        if len(sizes) > 1:
            raise ValueError(f"{type(self).__name__}: image keys {self.keys} have different spatial sizes {sizes}")
        if sizes:
            size = sizes.pop()
            if self.spatial_size is not None and size != self.spatial_size:
                raise ValueError(
                    f"{type(self).__name__}: image size {size} differs from spatial_size {self.spatial_size}"
                )
            return size  # type: ignore[return-value]
        if self.spatial_size is None:
            raise ValueError(f"{type(self).__name__}: none of the image keys {self.keys} is present; give spatial_size")
        return self.spatial_size  # type: ignore[return-value]

    def apply_params(self, data: Mapping, params: AffineParams) -> dict:
        d = dict(data)
        if params.is_identity():
            # skip resampling entirely: an identity bilinear warp would still cost time and round integer dtypes;
            # iterating the keys still raises for a missing key, so errors do not depend on the random draw
            _ = list(self.key_iterator(d))
            return d
        size = self._spatial_size(d)
        mat = params.matrix(size)
        for key, mode, pad in self.key_iterator(d, self.mode, self.padding_mode):
            d[key] = warp_affine(d[key], mat, mode=mode, padding_mode=pad)
        for i, pkey in enumerate(self.point_keys):
            if pkey not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"{type(self).__name__}: point key {pkey!r} not in data")
            d[pkey] = apply_affine_to_points(d[pkey], mat)
            if self.visible_keys:
                vkey = self.visible_keys[i]
                if vkey not in d:
                    if self.allow_missing_keys:
                        continue
                    raise KeyError(f"{type(self).__name__}: visibility key {vkey!r} not in data")
                d[vkey] = update_visibility(d[vkey], d[pkey], size)
        return d

    def __call__(self, data: Mapping) -> dict:
        return self.apply_params(data, self.params)


def _range(value: float | Sequence[float], name: str, symmetric: bool = True) -> tuple[float, float]:
    if np.isscalar(value):
        v = float(value)  # type: ignore[arg-type]
        if v < 0:
            raise ValueError(f"{name}: a scalar range must be >= 0, got {v}")
        return (-v, v) if symmetric else (v, v)
    lo, hi = (float(x) for x in value)  # type: ignore[union-attr]
    if lo > hi:
        raise ValueError(f"{name}: expected (low, high) with low <= high, got {value!r}")
    return lo, hi


def _check_prob(p: float, name: str) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return float(p)


class RandPairedAffined(RandomizableTransform, SharedAffined):
    """Random affine, one draw per sample, applied identically to every image key, point key and visibility.

    With probability ``prob`` the transform is active; then each component is switched on independently with its
    own probability: rotation (``rotate_range`` degrees, uniform), isotropic scale (``scale_range``, log-uniform so
    zoom in and out are equally likely), translation (``translate_range`` as a fraction of (W, H), uniform per
    axis), shear (``shear_range`` degrees, uniform, in x and y), horizontal flip, vertical flip. All random numbers
    are drawn on every call whatever the outcome, so the random stream does not depend on which components fired.
    The last draw is in ``self.params``.

    Args:
        keys: image keys ``(..., H, W)``; see :class:`SharedAffined` for ``point_keys``, ``visible_keys``, ``mode``,
            ``padding_mode``, ``spatial_size``.
        rotate_range: degrees; scalar ``a`` means ``(-a, a)``.
        scale_range: ``(low, high)`` zoom factors (> 0).
        translate_range: fraction of the image size; scalar ``f`` means ``(-f, f)``.
        shear_range: degrees; scalar ``a`` means ``(-a, a)``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        point_keys: KeysCollection = (),
        visible_keys: KeysCollection = (),
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "zeros",
        prob: float = 1.0,
        rotate_range: float | Sequence[float] = 0.0,
        rotate_prob: float = 0.5,
        scale_range: Sequence[float] = (1.0, 1.0),
        scale_prob: float = 0.5,
        translate_range: float | Sequence[float] = 0.0,
        translate_prob: float = 0.5,
        shear_range: float | Sequence[float] = 0.0,
        shear_prob: float = 0.5,
        hflip_prob: float = 0.0,
        vflip_prob: float = 0.0,
        spatial_size: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, _check_prob(prob, "prob"))
        SharedAffined.__init__(
            self, keys, None, point_keys, visible_keys, mode, padding_mode, spatial_size, allow_missing_keys
        )
        self.rotate_range = _range(rotate_range, "rotate_range")
        self.scale_range = _range(scale_range, "scale_range", symmetric=False)
        if self.scale_range[0] <= 0:
            raise ValueError(f"scale_range must be positive, got {scale_range!r}")
        self.translate_range = _range(translate_range, "translate_range")
        self.shear_range = _range(shear_range, "shear_range")
        if max(abs(a) for a in self.shear_range) >= 60:
            raise ValueError(f"shear_range must stay within (-60, 60) degrees, got {shear_range!r}")
        self.component_probs = {
            "rotate": _check_prob(rotate_prob, "rotate_prob"),
            "scale": _check_prob(scale_prob, "scale_prob"),
            "translate": _check_prob(translate_prob, "translate_prob"),
            "shear": _check_prob(shear_prob, "shear_prob"),
            "hflip": _check_prob(hflip_prob, "hflip_prob"),
            "vflip": _check_prob(vflip_prob, "vflip_prob"),
        }

    def randomize(self, data: Any = None, spatial_size: Sequence[int] | None = None) -> None:
        """Draw ``self.params``; ``spatial_size`` ``(H, W)`` converts the translation fraction to pixels."""
        super().randomize(None)
        gates = {name: self.R.rand() < p for name, p in self.component_probs.items()}
        angle = self.R.uniform(*self.rotate_range)
        log_lo, log_hi = np.log(self.scale_range[0]), np.log(self.scale_range[1])
        zoom = float(np.exp(self.R.uniform(log_lo, log_hi)))
        shift = self.R.uniform(*self.translate_range, size=2)
        shear = self.R.uniform(*self.shear_range, size=2)
        if not self._do_transform:
            self.params = AffineParams()
            return
        h, w = spatial_size if spatial_size is not None else (0, 0)
        self.params = AffineParams(
            rotate_deg=float(angle) if gates["rotate"] else 0.0,
            scale=(zoom, zoom) if gates["scale"] else (1.0, 1.0),
            shear_deg=(float(shear[0]), float(shear[1])) if gates["shear"] else (0.0, 0.0),
            translate=(float(shift[0] * w), float(shift[1] * h)) if gates["translate"] else (0.0, 0.0),
            hflip=bool(gates["hflip"]),
            vflip=bool(gates["vflip"]),
        )

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        """Transform a sample dict; ``randomize=False`` reuses the previous draw (e.g. for a second sample)."""
        if randomize:
            # the translation fraction needs the image size; without any image key only spatial_size can give it
            size = self._spatial_size(data) if any(k in data for k in self.keys) else self.spatial_size
            self.randomize(None, size)
        return self.apply_params(data, self.params)


def paired_frame_augmentation(
    image_keys: KeysCollection = ("image",),
    label_keys: KeysCollection = ("label",),
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
    rotate_deg: float = 20.0,
    allow_missing_keys: bool = False,
) -> Compose:
    """BOTM training augmentation: horizontal flip (paper, p = 0.5), then rotation ±``rotate_deg`` (authors' code).

    MONAI's ``RandFlipd`` (last spatial axis, exact index reversal) and ``RandRotated`` (angle uniform in
    ``[-rotate_deg, rotate_deg]`` about the image centre, zeros outside, same size); each draws once per sample for
    all keys, so both frames and both labels always share the parameters. Images are interpolated bilinearly,
    labels by nearest neighbour (they stay integer-valued; MONAI returns them as float32 tensors). Arrays are
    channel first: ``(C, H, W)`` with the frames as channels, or one ``(1, H, W)`` key per frame.
    ``rotate_prob=0`` gives the paper-only form.
    """
    from monai.transforms import RandFlipd, RandRotated

    if not 0.0 <= float(rotate_deg) < 180.0:
        raise ValueError(f"rotate_deg must be in [0, 180), got {rotate_deg}")
    img, lab = ensure_tuple(image_keys), ensure_tuple(label_keys)
    keys = img + lab
    modes = ("bilinear",) * len(img) + ("nearest",) * len(lab)
    return Compose(
        [
            RandFlipd(keys, prob=_check_prob(flip_prob, "flip_prob"), spatial_axis=-1,
                      allow_missing_keys=allow_missing_keys),
            RandRotated(keys, range_x=float(np.deg2rad(rotate_deg)), prob=_check_prob(rotate_prob, "rotate_prob"),
                        keep_size=True, mode=modes, padding_mode="zeros", allow_missing_keys=allow_missing_keys),
        ]
    )
