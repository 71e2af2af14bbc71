"""Image I/O with clear errors: NIfTI, MetaImage and other SimpleITK formats, PNG, and NIfTI writing with geometry.

Every reader names the file it failed on and says what is wrong, so batch jobs can record the error and go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ImageData", "DataError", "read_image", "write_nifti", "write_mhd", "check_finite"]


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or not what the reader expects."""


@dataclass
class ImageData:
    """An image array with its geometry.

    ``array`` keeps the axis order the reader documents; ``spacing`` is in mm per array axis (same order);
    ``affine`` is the 4x4 voxel-to-world matrix when the format has one.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def check_finite(array: np.ndarray, path: str | Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n_bad = int((~np.isfinite(array)).sum())
        raise DataError(f"{path}: image contains {n_bad} NaN/Inf values")
    return array


def _require_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: expected a file, found a directory")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    return p


def read_image(path: str | Path, dtype: np.dtype | None = None) -> ImageData:
    """Read a NIfTI (``.nii``/``.nii.gz``), MetaImage (``.mhd``/``.mha``) or PNG file.

    NIfTI arrays come in nibabel's axis order (x, y[, z|t]); MetaImage arrays in SimpleITK's (z|t, y, x) order;
    PNG as (H, W) grayscale. Raises ``FileNotFoundError``/``DataError`` naming the file on any failure.
    """
    p = _require_file(path)
    name = p.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(str(p))
            arr = np.asarray(img.dataobj)
            spacing = tuple(float(s) for s in img.header.get_zooms()[: arr.ndim])
            out = ImageData(arr, spacing, np.asarray(img.affine, dtype=np.float64))
        elif name.endswith((".mhd", ".mha", ".nrrd")):
            import SimpleITK as sitk

            img = sitk.ReadImage(str(p))
            arr = sitk.GetArrayFromImage(img)
            spacing = tuple(float(s) for s in reversed(img.GetSpacing()))
            meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
            out = ImageData(arr, spacing[-arr.ndim :], None, meta)
        elif name.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
            from PIL import Image

            with Image.open(p) as im:
                arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16") else im)
            out = ImageData(arr, (1.0, 1.0))
        else:
            raise DataError(f"{p}: unsupported image format (expected .nii/.nii.gz, .mhd/.mha or .png)")
    except (DataError, FileNotFoundError):
        raise
    except Exception as e:  # the format libraries raise many unrelated types for corrupt files
        raise DataError(f"{p}: cannot read image ({type(e).__name__}: {e})") from e
    if dtype is not None:
        out.array = out.array.astype(dtype)
    check_finite(out.array, p)
    return out


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


def write_mhd(path: str | Path, array: np.ndarray, spacing: tuple[float, ...]) -> Path:
    """Write ``array`` in SimpleITK order (z|t, y, x) as MetaImage ``.mhd`` + ``.raw``; ``spacing`` per array axis."""
    import SimpleITK as sitk

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(array))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    sitk.WriteImage(img, str(p), useCompression=False)
    return p
