"""Image I/O with clear errors: every format through :mod:`common.data.loading` (MONAI ``LoadImage`` readers, DICOM).

Every reader names the file it failed on and says what is wrong, so batch jobs can record the error and go on.
Arrays follow the one axis convention of :mod:`common.data.loading`: spatial axes in index order ``(x, y[, z|t])``
for every format, with a RAS affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.loading import DataError, ReadLimits, check_image_array, load_image, require_input

__all__ = ["ImageData", "DataError", "read_image", "write_nifti", "write_mhd", "check_finite"]


@dataclass
class ImageData:
    """An image array with its geometry.

    ``array`` is in index order ``(x, y[, z|t])`` (see :mod:`common.data.loading`); ``spacing`` is in mm per
    array axis (same order; NIfTI: the header's zooms, so a time axis has its time step); ``affine`` is the 4x4
    voxel-to-RAS matrix (origin and direction included, for every format); ``meta`` holds the reader's metadata
    (``format``; for DICOM ``modality``, ``n_frames``, ``frame_axis``, ...).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def check_finite(array: np.ndarray, path: str | Path) -> np.ndarray:
    """Raise :class:`DataError` naming ``path`` when a float ``array`` holds NaN/Inf; return it unchanged."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n_bad = int((~np.isfinite(array)).sum())
        raise DataError(f"{path}: image contains {n_bad} NaN/Inf values")
    return array


def _require_file(path: str | Path) -> Path:
    return require_input(path)


def read_image(path: str | Path, dtype: np.dtype | None = None, *, ndims: int | tuple[int, ...] | None = None,
               allow_constant: bool = True, limits: ReadLimits | None = None,
               require_geometry: bool | None = None) -> ImageData:
    """Read a NIfTI, MetaImage/NRRD, DICOM (file or one-series folder), PNG/TIFF or ``.npy`` image.

    The array is in index order ``(x, y[, z|t])`` whatever the format (NIfTI as nibabel gives it, MetaImage as
    ITK indexes it -- the transpose of SimpleITK's array --, PNG as ``(W, H)``, DICOM as ``(Columns, Rows[,
    n])``). Sizes are checked from the header before reading; non-real dtypes, NaN/Inf, degenerate sizes, a
    dimensionality outside ``ndims`` and (``allow_constant=False``) constant images raise. Raises
    ``FileNotFoundError``/``DataError`` naming the file on any failure.
    """
    img = load_image(path, limits=limits, ndims=ndims, allow_constant=allow_constant,
                     require_geometry=require_geometry)
    arr = img.numpy()
    affine = np.asarray(img.affine, dtype=np.float64)
    meta: dict[str, Any] = dict(img.meta)
    spacing = _spacing(path, arr.ndim, affine, meta)
    if dtype is not None:
        arr = arr.astype(dtype)
        check_image_array(arr, path, limits=limits)  # a cast (e.g. to float16) may overflow to Inf
    return ImageData(arr, spacing, affine, meta)


def _spacing(path: str | Path, ndim: int, affine: np.ndarray, meta: dict) -> tuple[float, ...]:
    """mm per array axis: NIfTI header zooms (keeps the time step of 2D+t/4D files), else the affine's columns."""
    if meta.get("format") == "nifti" and "zooms" in meta:
        zooms = [float(z) for z in meta["zooms"][:ndim]]  # the header's pixdim, time step included
        if len(zooms) == ndim and all(z > 0 for z in zooms):
            return tuple(zooms)
    cols = np.linalg.norm(affine[:3, :3], axis=0)
    return tuple(float(cols[i]) if i < 3 else 1.0 for i in range(ndim))


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None,
                spacing: tuple[float, ...] | None = None) -> Path:
    """Write ``array`` (nibabel axis order) as NIfTI; ``affine`` wins over ``spacing`` (a diagonal affine)."""
    import nibabel as nib

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.eye(4)
        if spacing is not None:
            for i, s in enumerate(spacing[:3]):
                affine[i, i] = float(s)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    if spacing is not None and array.ndim > 3:
        zooms = list(img.header.get_zooms())
        zooms[: len(spacing)] = spacing
        img.header.set_zooms(zooms)
    nib.save(img, str(p))
    return p


def write_mhd(path: str | Path, array: np.ndarray, spacing: tuple[float, ...],
              origin: tuple[float, ...] | None = None, direction: tuple[float, ...] | None = None) -> Path:
    """Write ``array`` given in SimpleITK's array order (z|t, y, x) as MetaImage ``.mhd`` + ``.raw``.

    ``spacing`` is per array axis (same order); ``origin`` (LPS mm) and ``direction`` (row-major cosine matrix)
    are in ITK's (x, y[, z]) order, as ``SimpleITK.Image.SetOrigin``/``SetDirection`` take them.
    :func:`read_image` returns the array in index order, i.e. transposed.
    """
    import SimpleITK as sitk

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(array))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    if origin is not None:
        img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in direction))
    sitk.WriteImage(img, str(p), useCompression=False)
    return p
