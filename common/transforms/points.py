"""Point geometry shared by the spatial transforms, and array-type helpers.

Coordinate convention (used by every transform in ``common.transforms``): a point is ``(x, y)`` in pixels with
``x`` the column index and ``y`` the row index of a pixel centre, so pixel ``[r, c]`` of an ``(H, W)`` image sits
at ``(x=c, y=r)``. An image therefore spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``; we call a point *inside* when it
lies in the hull of the pixel centres, ``[0, W - 1] x [0, H - 1]``, because there it can be sampled bilinearly without
extrapolation (what a tracker does with query features).

Affine maps are 3x3 matrices acting on column vectors ``(x, y, 1)``: ``p_new = M @ p_old``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_dst_type, convert_to_numpy

__all__ = [
    "affine_matrix",
    "apply_affine_to_points",
    "inside_image",
    "update_visibility",
    "to_numpy",
    "restore_type",
]


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    if np.isscalar(value):
        return float(value), float(value)  # type: ignore[arg-type]
    vals = tuple(float(v) for v in value)  # type: ignore[union-attr]
    if len(vals) != 2:
        raise ValueError(f"{name}: expected a scalar or a pair, got {value!r}")
    return vals  # type: ignore[return-value]


def affine_matrix(
    spatial_size: Sequence[int],
    rotate_deg: float = 0.0,
    scale: float | Sequence[float] = 1.0,
    shear_deg: float | Sequence[float] = 0.0,
    translate: Sequence[float] = (0.0, 0.0),
    hflip: bool = False,
    vflip: bool = False,
) -> np.ndarray:
    """Forward 3x3 affine (float64) about the image centre, in the pixel-centre ``(x, y)`` convention.

    ``p_new = c + t + F @ R @ Sh @ S @ (p - c)`` with ``c = ((W - 1) / 2, (H - 1) / 2)``:

    - ``S = diag(sx, sy)`` (``scale`` scalar = isotropic),
    - ``Sh = [[1, tan(shx)], [tan(shy), 1]]`` (``shear_deg = (shx, shy)``; ``x += tan(shx) * y`` skews vertical
      motion into diagonal motion),
    - ``R`` rotation by ``rotate_deg``; the y axis points down, so a positive angle turns clockwise on screen,
    - ``F = diag(-1 if hflip, -1 if vflip)``; a horizontal flip maps ``x -> W - 1 - x`` exactly,
    - ``t = translate`` in pixels ``(tx, ty)``.

    Args:
        spatial_size: ``(H, W)``.

    Returns:
        ``(3, 3)`` float64 matrix mapping original points to transformed points.
    """
    if len(spatial_size) != 2:
        raise ValueError(f"affine_matrix: spatial_size must be (H, W), got {tuple(spatial_size)}")
    h, w = (int(s) for s in spatial_size)
    sx, sy = _pair(scale, "scale")
    if sx <= 0 or sy <= 0:
        raise ValueError(f"affine_matrix: scale must be positive, got {(sx, sy)}")
    shx, shy = (np.deg2rad(a) for a in _pair(shear_deg, "shear_deg"))
    tx, ty = _pair(translate, "translate")
    theta = np.deg2rad(float(rotate_deg))
    cos, sin = np.cos(theta), np.sin(theta)
    lin = (
        np.diag([-1.0 if hflip else 1.0, -1.0 if vflip else 1.0])
        @ np.array([[cos, -sin], [sin, cos]])
        @ np.array([[1.0, np.tan(shx)], [np.tan(shy), 1.0]])
        @ np.diag([sx, sy])
    )
    if abs(np.linalg.det(lin)) < 1e-8:
        raise ValueError("affine_matrix: the shear/scale combination is singular")
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    mat = np.eye(3)
    mat[:2, :2] = lin
    mat[:2, 2] = centre + np.array([tx, ty]) - lin @ centre
    return mat


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Any array-like (numpy, torch, MetaTensor) as a numpy array, without metadata."""
    return np.asarray(convert_to_numpy(x), dtype=dtype)


def restore_type(out: np.ndarray | torch.Tensor, like: Any) -> Any:
    """Return ``out`` as the container type, dtype and device of ``like`` (MetaTensor metadata is copied).

    Integer/bool targets get values rounded and clipped to the dtype range first, because a plain cast would wrap
    (e.g. 256 -> 0 for uint8) or truncate.
    """
    if isinstance(like, torch.Tensor):
        t = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(out))
        t = t.to(like.device)
        if like.dtype == torch.bool:
            t = t > 0.5
        elif not (like.dtype.is_floating_point or like.dtype.is_complex) and t.dtype.is_floating_point:
            info = torch.iinfo(like.dtype)
            t = t.round().clamp(info.min, info.max)
        return convert_to_dst_type(t, dst=like)[0]
    out_np = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    np_dtype = np.dtype(like.dtype) if hasattr(like, "dtype") else out_np.dtype
    if np_dtype == np.bool_:
        out_np = out_np > 0.5
    elif np.issubdtype(np_dtype, np.integer) and not np.issubdtype(out_np.dtype, np.integer):
        info = np.iinfo(np_dtype)
        out_np = np.clip(np.rint(out_np), info.min, info.max)
    return convert_to_dst_type(np.ascontiguousarray(out_np), dst=like)[0]


def apply_affine_to_points(points: Any, matrix: np.ndarray) -> Any:
    """Map points ``(..., 2)`` (x, y) by a 3x3 affine; returns the same type/dtype as ``points``."""
    pts = to_numpy(points, dtype=np.float64)
    if pts.shape[-1] != 2:
        raise ValueError(f"apply_affine_to_points: points must have shape (..., 2), got {pts.shape}")
    mat = np.asarray(matrix, dtype=np.float64)
    out = pts @ mat[:2, :2].T + mat[:2, 2]
    return restore_type(out, points)


def inside_image(points: Any, spatial_size: Sequence[int]) -> np.ndarray:
    """Boolean mask ``(...)`` of points ``(..., 2)`` inside the pixel-centre hull ``[0, W-1] x [0, H-1]``.

    Non-finite coordinates are outside.
    """
    pts = to_numpy(points, dtype=np.float64)
    h, w = (int(s) for s in spatial_size)
    x, y = pts[..., 0], pts[..., 1]
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def update_visibility(visible: Any, points: Any, spatial_size: Sequence[int]) -> Any:
    """``visible & inside_image(points)``: a point that leaves the image becomes invisible, never the reverse.

    Args:
        visible: ``(...)`` bool, the shape of ``points`` without its last axis.
        points: ``(..., 2)`` transformed points.

    Returns:
        Visibility of the same type as ``visible``.
    """
    vis = to_numpy(visible).astype(bool)
    inside = inside_image(points, spatial_size)
    if vis.shape != inside.shape:
        raise ValueError(f"update_visibility: visibility shape {vis.shape} does not match points {inside.shape} + (2,)")
    return restore_type(vis & inside, visible)
