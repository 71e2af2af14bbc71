"""One reading and writing layer for every bundle: MONAI ``LoadImage`` readers, DICOM, input checks, geometry.

Axis convention (every format, every caller)
--------------------------------------------
Arrays come in MONAI's reader convention: spatial axes first in *index order* ``(x, y[, z|t])`` -- array axis 0
runs along an image row (the column index), axis 1 down the rows, axis 2 over slices or frames -- and a 4x4
``affine`` maps voxel indices to RAS world millimetres (NIfTI's world; DICOM/ITK's LPS is converted). NIfTI
(``NibabelReader``), MetaImage/NRRD (``ITKReader``, origin and direction kept), PNG/TIFF (``PILReader``), NumPy and
DICOM all come this way, so a caller never transposes per format. Frame-based code (echo, tracking) that wants
``(T, H, W)`` converts once with :func:`to_frames` and back with :func:`from_frames`.

DICOM
-----
:func:`read_dicom` reads a single file (one frame, a multi-frame US cine, an enhanced CT/MR volume) or a folder
holding one series. Slices of a series are ordered by geometry -- ``ImagePositionPatient`` projected on the slice
normal (the cross product of the ``ImageOrientationPatient`` cosines) -- never by file name or ``InstanceNumber``;
so are the frames of an enhanced multi-frame file with per-frame positions. Pixel data decode through pydicom's
decoders (JPEG baseline/lossless, JPEG-LS, JPEG 2000 and RLE with pylibjpeg/Pillow installed); a transfer syntax
without an installed decoder fails with a message naming the syntax and the missing plugin. Grayscale rules:
``MONOCHROME1`` is inverted (``max - x`` over the stored range) so bright means high signal as in ``MONOCHROME2``;
YBR data keep their ``Y`` plane; RGB becomes ITU-R BT.601 luma; ``PALETTE COLOR`` goes through its look-up table
then luma. Rescale slope/intercept are applied (CT in HU). CT/MR/PET data without patient geometry
(``ImageOrientationPatient``/``ImagePositionPatient``/``PixelSpacing`` or their functional-group equivalents)
are refused by default: a segmentation written without it cannot be placed back on the patient. MONAI's own
``PydicomReader`` is not used because it orders series by ``InstanceNumber`` and ignores ``MONOCHROME1`` and the
geometry of multi-frame files; the result has the same layout and meta keys as ``LoadImage`` gives.

Checks and limits against hostile input
---------------------------------------
Before any pixel is allocated, the header's size is checked against :class:`ReadLimits` (``max_pixels`` per input,
``max_frames`` per input = product of the axes after the first two), so a crafted header cannot make a job
allocate tens of GB. The defaults can be set once per process with :func:`set_limits` (e.g. from a bundle config's
``initialize``). After reading, :func:`check_image_array` refuses non-real dtypes (complex, object, strings),
NaN/Inf, empty axes, degenerate in-plane sizes (a side below ``min_size`` or an in-plane aspect ratio above
``max_aspect``), unexpected dimensionality and, when asked, constant images. Object ``.npy`` files are refused
(``allow_pickle`` is never used). Every failure raises :class:`DataError` (a ``ValueError``) or
``FileNotFoundError`` whose message starts with the path and says what is wrong; no reader lets a bare
numpy/ITK/pydicom exception through.

Writing
-------
:func:`write_like` writes a prediction on the grid of its input: the same shape (index order) and the input's
affine (spacing, origin and direction), as NIfTI; for a NIfTI input the input's header is kept (units, qform/sform
codes, time step). :func:`image_geometry` gives an input's ``(shape, affine)`` from its header alone.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "ReadLimits",
    "get_limits",
    "set_limits",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "PIL_SUFFIXES",
    "DICOM_SUFFIXES",
    "image_format",
    "is_dicom_file",
    "require_input",
    "header_shape",
    "check_size",
    "check_image_array",
    "load_image",
    "read_npy",
    "read_dicom",
    "dicom_files",
    "is_dicom_series_dir",
    "read_dicom_dataset",
    "save_dicom",
    "check_dicom_pixel_data",
    "dicom_modality",
    "dicom_inplane_spacing",
    "decode_dicom_frames",
    "to_grayscale",
    "to_frames",
    "from_frames",
    "image_geometry",
    "write_like",
    "LoadImageChecked",
    "LoadImageCheckedd",
]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or not what the reader expects (message names the file)."""


NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# modalities whose images are placed in patient space by their consumers (3D segmentation written back)
_GEOMETRY_MODALITIES = ("CT", "MR", "PT")
_MET_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
              "MET_ULONG": 8, "MET_LONG": 8, "MET_ULONG_LONG": 8, "MET_LONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


# ------------------------------------------------------------------------------------------------------ limits
@dataclass(frozen=True)
class ReadLimits:
    """Limits every reader checks.

    Attributes:
        max_pixels: most voxels (times colour samples) one input may hold, checked from the header before reading.
            The default, 2**29 (2 GiB as float32), admits a 512 x 512 x 2000 CT.
        max_frames: most frames/slices (product of the axes after the first two) one input may hold.
        max_aspect: largest in-plane aspect ratio (longer / shorter of the first two axes); a 5000 x 3 strip is
            not an image any of the networks can segment.
        min_size: smallest side of the first two axes.
    """

    max_pixels: int = 2**29
    max_frames: int = 10_000
    max_aspect: float = 32.0
    min_size: int = 2


_LIMITS = [ReadLimits()]  # one-element holder: set_limits replaces the process-wide default explicitly


def get_limits() -> ReadLimits:
    """The process-wide default :class:`ReadLimits` (see :func:`set_limits`)."""
    return _LIMITS[0]


def set_limits(**changes: Any) -> ReadLimits:
    """Change the process-wide default limits (e.g. ``max_pixels=10**9``) and return the previous ones.

    A bundle config calls this once in ``initialize`` so every reader of the run, deep inside MONAI transforms,
    applies the configured limits without threading them through each call.
    """
    unknown = set(changes) - set(ReadLimits.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown read limit(s) {sorted(unknown)}; known: {sorted(ReadLimits.__dataclass_fields__)}")
    for k, v in changes.items():
        if v is None or float(v) <= 0:
            raise ValueError(f"read limit {k} must be positive, got {v!r}")
    old = _LIMITS[0]
    _LIMITS[0] = replace(old, **{k: (float(v) if k == "max_aspect" else int(v)) for k, v in changes.items()})
    return old


# ------------------------------------------------------------------------------------------------- dispatching
def _name(path: Path) -> str:
    return path.name.lower()


def is_dicom_file(path: str | Path) -> bool:
    """True for a file with the DICOM ``DICM`` preamble, or a ``.dcm``/``.dicom`` file (headerless DICOM)."""
    p = Path(path)
    if not p.is_file():
        return False
    if _name(p).endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def image_format(path: str | Path) -> str | None:
    """``"nifti"``, ``"itk"``, ``"pil"``, ``"npy"``, ``"dicom"`` (file), ``"dicom_series"`` (folder), else None."""
    p = Path(path)
    if p.is_dir():
        return "dicom_series"
    name = _name(p)
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(PIL_SUFFIXES):
        return "pil"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(DICOM_SUFFIXES) or (p.suffix == "" and is_dicom_file(p)):
        return "dicom"
    return None


def require_input(path: str | Path, allow_dir: bool = False) -> Path:
    """``path`` as a ``Path`` if it is a non-empty file (or, with ``allow_dir``, a folder); raise naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: file not found")
    if p.is_dir():
        if allow_dir:
            return p
        raise DataError(f"{p}: expected a file, found a directory")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty (0 bytes)")
    return p


# ------------------------------------------------------------------------------------------------------- checks
def check_size(shape: Sequence[int], path: str | Path, limits: ReadLimits | None = None, samples: int = 1) -> None:
    """Raise :class:`DataError` when a header's ``shape`` (index order) exceeds ``limits`` -- before any reading."""
    lim = limits or get_limits()
    dims = [int(s) for s in shape]
    if any(s < 0 for s in dims):
        raise DataError(f"{path}: header declares a negative size {tuple(dims)}")
    n = math.prod(dims) * max(int(samples), 1)
    if n > lim.max_pixels:
        raise DataError(f"{path}: header declares {tuple(dims)}{f' x {samples} samples' if samples > 1 else ''} = "
                        f"{n:,} voxels, more than the limit max_pixels={lim.max_pixels:,} (refused before reading; "
                        "raise the limit with common.data.loading.set_limits if the image is genuine)")
    frames = math.prod(dims[2:]) if len(dims) > 2 else 1
    if frames > lim.max_frames:
        raise DataError(f"{path}: header declares {frames:,} frames/slices, more than the limit "
                        f"max_frames={lim.max_frames:,} (refused before reading)")


def check_image_array(array: Any, path: str | Path, *, ndims: int | Sequence[int] | None = None,
                      allow_constant: bool = True, limits: ReadLimits | None = None, what: str = "image") -> None:
    """Raise :class:`DataError` naming ``path`` unless ``array`` is a usable image.

    Refuses: non-real dtypes (complex, object, strings, structured), a dimensionality not in ``ndims``, an empty
    axis, first two axes below ``limits.min_size`` or with an aspect ratio above ``limits.max_aspect``, NaN/Inf,
    and (``allow_constant=False``) an image whose every value is the same (nothing to segment or track).
    """
    lim = limits or get_limits()
    arr = np.asarray(array)
    kind = arr.dtype.kind
    if kind == "c":
        raise DataError(f"{path}: {what} has complex dtype {arr.dtype}; expected real values (take the magnitude "
                        "first if the data are complex MR)")
    if kind not in "biuf":
        raise DataError(f"{path}: {what} has non-numeric dtype {arr.dtype}")
    if ndims is not None:
        allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
        if arr.ndim not in allowed:
            raise DataError(f"{path}: expected a {' or '.join(map(str, allowed))}D {what}, got shape {arr.shape}")
    if 0 in arr.shape:
        raise DataError(f"{path}: {what} is empty (shape {arr.shape} has a zero-length axis)")
    if arr.ndim < 2:
        raise DataError(f"{path}: {what} must have at least 2 axes, got shape {arr.shape}")
    a, b = int(arr.shape[0]), int(arr.shape[1])
    if min(a, b) < lim.min_size:
        raise DataError(f"{path}: {what} of {a} x {b} pixels in-plane is degenerate (sides must be >= "
                        f"{lim.min_size})")
    if max(a, b) / min(a, b) > lim.max_aspect:
        raise DataError(f"{path}: {what} of {a} x {b} pixels in-plane is a degenerate strip (aspect ratio "
                        f"{max(a, b) / min(a, b):.0f} > {lim.max_aspect:g})")
    if kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{path}: {what} contains {int((~np.isfinite(arr)).sum())} NaN/Inf values")
    if not allow_constant:
        lo = arr.min()
        if lo == arr.max():
            raise DataError(f"{path}: {what} is constant (every value is {lo.item():g}); nothing to process")


# ------------------------------------------------------------------------------------------------------ headers
def _mhd_fields(p: Path) -> dict[str, str]:
    """Key/value lines of a MetaImage header (``.mhd`` text, or the text head of a ``.mha``)."""
    with open(p, "rb") as f:
        head = f.read(64 * 1024)
    fields: dict[str, str] = {}
    for line in head.split(b"\n"):
        if b"=" not in line:
            continue
        k, _, v = line.partition(b"=")
        key = k.strip().decode("latin-1")
        fields[key] = v.strip().decode("latin-1", errors="replace")
        if key == "ElementDataFile":
            break  # binary data may follow in a .mha
    return fields


def _check_mhd_data(p: Path, shape: Sequence[int], components: int) -> None:
    """A MetaImage's external ``.raw`` must exist and hold the bytes the header promises (uncompressed data)."""
    fields = _mhd_fields(p)
    datafile = fields.get("ElementDataFile", "")
    need = math.prod(int(s) for s in shape) * components * _MET_BYTES.get(fields.get("ElementType", ""), 1)
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if datafile == "LOCAL" and not compressed:
        # .mha: the data follow the header line "ElementDataFile = LOCAL"
        with open(p, "rb") as f:
            head = f.read(64 * 1024)
        start = head.find(b"ElementDataFile")
        start = head.find(b"\n", start) + 1 if start >= 0 else 0
        have = p.stat().st_size - start
        if have < need:
            raise DataError(f"{p}: MetaImage data are truncated: {have:,} bytes where the header needs {need:,}")
        return
    if not datafile or datafile == "LOCAL" or datafile.startswith("LIST") or "%" in datafile:
        return
    raw = p.parent / datafile
    if not raw.is_file():
        raise DataError(f"{p}: its data file {raw.name} ({raw}) is missing")
    if compressed:
        return
    have = raw.stat().st_size
    if have < need:
        raise DataError(f"{p}: data file {raw.name} is truncated: {have:,} bytes where the header needs {need:,}")


def _nifti_header(p: Path) -> tuple[tuple[int, ...], Any]:
    """``(shape, nibabel image)`` of a NIfTI file from its header (the image is lazy: no pixel read)."""
    import nibabel as nib

    try:
        img = nib.load(str(p))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises ImageFileError, HeaderDataError, EOFError, gzip errors ...
        raise DataError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if not _name(p).endswith(".gz"):
        # an uncompressed .nii must hold vox_offset + every voxel; a shorter file is truncated
        hdr = img.header
        need = int(hdr.get_data_offset()) + math.prod(shape) * np.dtype(hdr.get_data_dtype()).itemsize
        have = p.stat().st_size
        if have < need:
            raise DataError(f"{p}: truncated NIfTI, {have:,} bytes where the header needs {need:,}")
    return shape, img


def header_shape(path: str | Path) -> tuple[tuple[int, ...], int]:
    """``(shape in index order, colour samples)`` of an input from its header alone (no pixel data read).

    A DICOM file gives ``(Columns, Rows[, frames])``; a DICOM folder ``(Columns, Rows, slices)``. Raises
    :class:`DataError`/``FileNotFoundError`` naming the input for unreadable or inconsistent headers.
    """
    p = require_input(path, allow_dir=True)
    fmt = image_format(p)
    if fmt == "nifti":
        return _nifti_header(p)[0], 1
    if fmt == "itk":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise DataError(f"{p}: not a readable {p.suffix} image header ({_first_line(e)})") from e
        shape = tuple(int(s) for s in reader.GetSize())
        comps = int(reader.GetNumberOfComponents())
        if _name(p).endswith((".mhd", ".mha")):
            _check_mhd_data(p, shape, comps)
        return shape, comps
    if fmt == "pil":
        from PIL import Image

        try:
            with Image.open(p) as im:
                w, h = im.size
                bands = len(im.getbands())
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, DecompressionBombError ...
            raise DataError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
        return (int(w), int(h)), bands
    if fmt == "npy":
        arr = _npy_map(p)
        return tuple(int(s) for s in arr.shape), 1
    if fmt in ("dicom", "dicom_series"):
        layout = _dicom_layout(p, None)
        return layout.shape, 1
    raise DataError(f"{p}: unsupported image format (expected NIfTI .nii/.nii.gz, MetaImage .mhd/.mha, NRRD, "
                    "DICOM .dcm or a DICOM series folder, PNG/TIFF or .npy)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    # ITK messages start with a file:line location; the last line says what went wrong
    return (text[-1] if text else type(e).__name__)[:300]


# ---------------------------------------------------------------------------------------------------- NumPy
def _npy_map(p: Path) -> np.ndarray:
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "object" in str(e).lower() or "pickle" in str(e).lower():
            raise DataError(f"{p}: NumPy file holds Python objects (pickled); refused, only numeric arrays are "
                            "read") from e
        raise DataError(f"{p}: not a readable NumPy array ({type(e).__name__}: {e})") from e
    except Exception as e:  # numpy raises OSError/EOFError/UnpicklingError for corrupt files
        raise DataError(f"{p}: not a readable NumPy array ({type(e).__name__}: {e})") from e


def read_npy(path: str | Path, limits: ReadLimits | None = None) -> np.ndarray:
    """A ``.npy`` array (never unpickled), its size checked from the header before it is read into memory."""
    p = require_input(path)
    mapped = _npy_map(p)
    check_size(mapped.shape, p, limits)
    try:
        return np.array(mapped)
    except Exception as e:  # a file shorter than its header says fails here
        raise DataError(f"{p}: NumPy array data unreadable ({type(e).__name__}: {e})") from e


# -------------------------------------------------------------------------------------------------------- DICOM
def to_grayscale(frames: np.ndarray, photometric: str = "RGB") -> np.ndarray:
    """(..., H, W, 3) colour frames -> (..., H, W) float32 gray: the Y plane for YBR data, BT.601 luma for RGB."""
    arr = np.asarray(frames)
    if arr.shape[-1] != 3:
        raise ValueError(f"to_grayscale: expected 3 channels last, got shape {arr.shape}")
    if photometric.upper().startswith("YBR"):
        return arr[..., 0].astype(np.float32)  # Y is the luma plane already
    return (arr.astype(np.float32) @ _LUMA).astype(np.float32)


def save_dicom(ds: Any, path: str | Path, file_format: bool = True) -> None:
    """Write ``ds`` to ``path`` with pydicom 3 or 2 (the MONAI Label environment pins ``pydicom<3``).

    ``file_format=True`` writes a conformant DICOM file (preamble, file meta); ``False`` writes the dataset as it is.
    pydicom 3 calls this ``enforce_file_format``; pydicom 2 said the opposite, ``write_like_original``.
    """
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), enforce_file_format=file_format)
    else:
        ds.save_as(str(path), write_like_original=not file_format)


def read_dicom_dataset(p: Path, header_only: bool) -> Any:
    """``pydicom.dcmread`` with :class:`DataError` naming ``p`` for anything unreadable (``header_only``: pixel
    data and other large values are left on disk, their presence still known)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd VR; the checks below decide
            # header_only: large values (the pixel data) are left on disk but their presence is still known
            ds = pydicom.dcmread(str(p), defer_size="64 KB" if header_only else None)
    except InvalidDicomError as e:
        raise DataError(f"{p}: not a readable DICOM file (no DICM preamble or file meta: {e})") from e
    except Exception as e:  # truncated/corrupt files raise EOFError, OSError, ValueError, KeyError, struct.error ...
        raise DataError(f"{p}: not a readable DICOM file ({type(e).__name__}: {e})") from e
    return ds


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (DICM preamble or ``.dcm``/``.dicom``), ``DICOMDIR`` excluded."""
    p = Path(folder)
    return sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.name.upper() != "DICOMDIR"
                  and is_dicom_file(f))


def is_dicom_series_dir(folder: str | Path) -> bool:
    """True when ``folder`` directly holds two or more single-frame DICOM files of one series (one volume).

    Decided from the headers (one ``SeriesInstanceUID``, distinct ``SOPInstanceUID``, single frames); a folder of
    unrelated DICOM files (other series, copies of one image, multi-frame or unreadable files) is not one, so a
    batch job takes its files one by one.
    """
    p = Path(folder)
    files = dicom_files(p) if p.is_dir() else []
    if len(files) < 2:
        return False
    series, instances = set(), set()
    for f in files:
        try:
            ds = read_dicom_dataset(f, header_only=True)
            if int(ds.get("NumberOfFrames", 1) or 1) != 1:
                return False
            series.add(str(ds.get("SeriesInstanceUID", "")))
            instances.add(str(ds.get("SOPInstanceUID", "")))
        except Exception:  # an unreadable file: not a clean series; the caller reads files one by one
            return False
        if len(series) > 1:
            return False
    # copies of one image (same SOPInstanceUID) are not slices of a volume
    return len(instances) == len(files)


def dicom_modality(path: str | Path) -> str | None:
    """The DICOM ``Modality`` of a file or series folder, lower case (``"ct"``, ``"mr"``, ``"us"``, ...).

    None when the input is not DICOM or the tag is empty. Raises :class:`DataError` for an unreadable DICOM.
    """
    p = Path(path)
    if p.is_dir():
        files = dicom_files(p)
        if not files:
            return None
        p = files[0]
    elif image_format(p) != "dicom":
        return None
    ds = read_dicom_dataset(require_input(p), header_only=True)
    try:
        value = str(ds.get("Modality", "") or "").strip().lower()
    except Exception as e:  # a malformed element read lazily
        raise DataError(f"{p}: malformed DICOM header ({type(e).__name__}: {e})") from e
    return value or None


def _seq_item(ds: Any, *names: str) -> Any:
    """``ds.<names[0]>[0].<names[1]>[0]...`` or None (functional-group lookups)."""
    cur = ds
    for n in names:
        seq = cur.get(n) if cur is not None else None
        if not seq:
            return None
        cur = seq[0]
    return cur


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def dicom_inplane_spacing(ds: Any) -> tuple[float, float] | None:
    """(row, col) mm from the ultrasound region calibration or (Imager)PixelSpacing, None when absent."""
    regions = ds.get("SequenceOfUltrasoundRegions")
    if regions:
        r = regions[0]
        dx, dy = r.get("PhysicalDeltaX"), r.get("PhysicalDeltaY")
        # units code 3 = cm (DICOM PS3.3 C.8.5.5.1.15); other codes (seconds, Hz, ...) are not lengths
        if dx is not None and dy is not None and r.get("PhysicalUnitsXDirection") == 3 and \
                r.get("PhysicalUnitsYDirection") == 3 and float(dx) > 0 and float(dy) > 0:
            return 10.0 * abs(float(dy)), 10.0 * abs(float(dx))
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        ps = _floats(ds.get(key) or [], 2)
        if ps is not None and (ps > 0).all():
            return float(ps[0]), float(ps[1])
    return None


@dataclass
class _DicomLayout:
    """What the headers say: files (one per slice, or one multi-frame file), frame order, shape and affine."""

    files: list[Path]
    order: list[int]  # frame (multi-frame) or file (series) indices in output order
    shape: tuple[int, ...]  # index order (Columns, Rows[, n])
    affine: np.ndarray  # RAS
    meta: dict
    header: Any  # the first (or only) dataset, header only


def _lps_to_ras_affine(row: np.ndarray, col: np.ndarray, normal: np.ndarray, spacing: Sequence[float],
                       origin: np.ndarray) -> np.ndarray:
    """Index (x = column, y = row, z = slice) -> RAS affine from DICOM LPS cosines, (col, row, slice) spacing."""
    a = np.eye(4)
    a[:3, 0] = row * spacing[0]  # along a row: the column index advances, step = column spacing
    a[:3, 1] = col * spacing[1]
    a[:3, 2] = normal * spacing[2]
    a[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


def _check_pixel_tags(ds: Any, p: Path) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{p}: DICOM file has no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')}, "
                        f"modality {ds.get('Modality', 'unknown')}): not an image")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if ds.get(k) in (None, "")]
    if missing:
        raise DataError(f"{p}: DICOM image lacks required tag(s) {missing}")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise DataError(f"{p}: DICOM file meta lacks the required tag TransferSyntaxUID")


def _n_frames(ds: Any, p: Path) -> int:
    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{p}: DICOM NumberOfFrames {ds.get('NumberOfFrames')!r} is not a number") from e
    if n < 1:
        raise DataError(f"{p}: DICOM NumberOfFrames is {n}; the image has no frame")
    return n


def _needs_geometry(ds: Any, require_geometry: bool | None) -> bool:
    if require_geometry is not None:
        return bool(require_geometry)
    return str(ds.get("Modality", "")).upper() in _GEOMETRY_MODALITIES


def _dicom_file_layout(p: Path, ds: Any, require_geometry: bool | None) -> _DicomLayout:
    _check_pixel_tags(ds, p)
    rows, cols, n = int(ds.Rows), int(ds.Columns), _n_frames(ds, p)
    modality = str(ds.get("Modality", "") or "")
    meta: dict[str, Any] = {"modality": modality, "photometric_interpretation": str(ds.PhotometricInterpretation),
                            "n_frames": n, "series_description": str(ds.get("SeriesDescription", "") or "")}
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")

    def _group(item: Any, seq: str, key: str, size: int) -> np.ndarray | None:
        v = _seq_item(item, seq)
        return _floats(v.get(key) or [], size) if v is not None else None

    iop = _floats(ds.get("ImageOrientationPatient") or [], 6)
    ipp = _floats(ds.get("ImagePositionPatient") or [], 3)
    ps = _floats(ds.get("PixelSpacing") or [], 2)
    positions = None
    if per_frame is not None or shared is not None:  # enhanced multi-frame: geometry in the functional groups
        first = per_frame[0] if per_frame else None
        iop = _group(shared, "PlaneOrientationSequence", "ImageOrientationPatient", 6) if iop is None else iop
        iop = _group(first, "PlaneOrientationSequence", "ImageOrientationPatient", 6) if iop is None else iop
        ps = _group(shared, "PixelMeasuresSequence", "PixelSpacing", 2) if ps is None else ps
        ps = _group(first, "PixelMeasuresSequence", "PixelSpacing", 2) if ps is None else ps
        if per_frame is not None and len(per_frame) == n:
            pos = [_group(f, "PlanePositionSequence", "ImagePositionPatient", 3) for f in per_frame]
            if all(x is not None for x in pos):
                positions = np.stack(pos)
    elif ipp is not None:
        positions = ipp[None]
    have_geometry = iop is not None and positions is not None and ps is not None and (ps > 0).all()
    if not have_geometry and _needs_geometry(ds, require_geometry):
        missing = [k for k, v in (("ImageOrientationPatient", iop), ("ImagePositionPatient", positions),
                                  ("PixelSpacing", ps)) if v is None]
        raise DataError(f"{p}: {modality or 'DICOM'} image lacks patient geometry tag(s) {missing}; without them a "
                        "prediction cannot be placed back on the patient")
    order = list(range(n))
    if have_geometry:
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
            raise DataError(f"{p}: ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
        slice_step = 1.0
        if n > 1 and len(positions) == n:
            along = positions @ normal
            order = [int(i) for i in np.argsort(along, kind="stable")]
            gaps = np.diff(along[order])
            if np.allclose(gaps, 0.0, atol=1e-4):
                meta["frame_axis"] = "time"  # a cine at one position: frames are time, not slices
                order = list(range(n))
            else:
                slice_step = _regular_step(gaps, p, "frames")
                meta["frame_axis"] = "slice"
        else:
            thick = _floats([ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0], 1)
            slice_step = float(thick[0]) if thick is not None and thick[0] > 0 else 1.0
            meta["frame_axis"] = "time" if n > 1 else "slice"
        affine = _lps_to_ras_affine(row, col, normal, (ps[1], ps[0], slice_step), positions[order[0]])
    else:
        sr, sc = dicom_inplane_spacing(ds) or (1.0, 1.0)
        # no patient geometry (ultrasound, secondary capture): LPS identity in RAS, as MONAI's readers do
        affine = np.diag([-sc, -sr, 1.0, 1.0])
        meta["frame_axis"] = "time" if n > 1 else "slice"
        meta["geometry"] = "none"
    shape = (cols, rows) if n == 1 else (cols, rows, n)
    return _DicomLayout([p], order, shape, affine, meta, ds)


def _regular_step(gaps: np.ndarray, p: Path, what: str) -> float:
    gaps = np.asarray(gaps, dtype=np.float64)
    if (gaps < 1e-4).any():
        raise DataError(f"{p}: two {what} lie at the same position along the slice normal (duplicate slice?)")
    step = float(np.median(gaps))
    if np.abs(gaps - step).max() > 0.1 * step + 1e-3:
        raise DataError(f"{p}: uneven slice spacing of the {what} along the slice normal (gaps {gaps.min():.3g} "
                        f"to {gaps.max():.3g} mm; a missing slice?)")
    return step


def _dicom_series_layout(folder: Path, require_geometry: bool | None) -> _DicomLayout:
    files = dicom_files(folder)
    if not files:
        raise DataError(f"{folder}: folder holds no DICOM files")
    if len(files) == 1:
        only = require_input(files[0])
        return _dicom_file_layout(only, read_dicom_dataset(only, header_only=True), require_geometry)
    headers = [read_dicom_dataset(require_input(f), header_only=True) for f in files]
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise DataError(f"{folder}: folder holds {len(series)} DICOM series; give one series per folder")
    geo = []
    for f, h in zip(files, headers):
        _check_pixel_tags(h, f)
        if _n_frames(h, f) != 1:
            raise DataError(f"{f}: a multi-frame file inside a series folder; give it on its own")
        iop = _floats(h.get("ImageOrientationPatient") or [], 6)
        ipp = _floats(h.get("ImagePositionPatient") or [], 3)
        ps = _floats(h.get("PixelSpacing") or [], 2)
        missing = [k for k, v in (("ImageOrientationPatient", iop), ("ImagePositionPatient", ipp),
                                  ("PixelSpacing", ps)) if v is None]
        if missing:
            raise DataError(f"{f}: slice lacks geometry tag(s) {missing} needed to order the series by position")
        geo.append((iop, ipp, ps, int(h.Rows), int(h.Columns)))
    iop0, _, ps0, rows, cols = geo[0]
    for f, (iop, _, ps, r, c) in zip(files, geo):
        if (r, c) != (rows, cols):
            raise DataError(f"{f}: slice of {r} x {c} pixels in a series of {rows} x {cols}")
        if not np.allclose(iop, iop0, atol=1e-4) or not np.allclose(ps, ps0, rtol=1e-4):
            raise DataError(f"{f}: slice orientation/pixel spacing differs from {files[0].name}; not one volume")
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DataError(f"{files[0]}: ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors")
    along = np.array([g[1] @ normal for g in geo])
    order = [int(i) for i in np.argsort(along, kind="stable")]
    step = _regular_step(np.diff(along[order]), folder, "slices")
    affine = _lps_to_ras_affine(row, col, normal, (ps0[1], ps0[0], step), geo[order[0]][1])
    h0 = headers[0]
    meta = {"modality": str(h0.get("Modality", "") or ""), "photometric_interpretation":
            str(h0.PhotometricInterpretation), "n_frames": len(files), "frame_axis": "slice",
            "series_description": str(h0.get("SeriesDescription", "") or "")}
    return _DicomLayout(files, order, (cols, rows, len(files)), affine, meta, h0)


def _dicom_layout(p: Path, require_geometry: bool | None) -> _DicomLayout:
    try:
        if p.is_dir():
            return _dicom_series_layout(p, require_geometry)
        return _dicom_file_layout(p, read_dicom_dataset(p, header_only=True), require_geometry)
    except (DataError, FileNotFoundError):
        raise
    except Exception as e:  # malformed values (a DS that is not a number, a broken sequence) surface lazily
        raise DataError(f"{p}: malformed DICOM header ({type(e).__name__}: {e})") from e


def check_dicom_pixel_data(ds: Any, path: str | Path) -> int:
    """Check a fully read DICOM image before decoding: pixel/geometry-independent tags, transfer syntax, size
    limits and (native syntaxes) that the pixel data hold every declared frame. Returns the number of frames."""
    p = Path(path)
    _check_pixel_tags(ds, p)
    n = _n_frames(ds, p)
    check_size((int(ds.Columns), int(ds.Rows), n), p, samples=int(ds.get("SamplesPerPixel", 1) or 1))
    _native_size_check(ds, p, n)
    return n


def _native_size_check(ds: Any, p: Path, n_frames: int) -> None:
    """Native (uncompressed) pixel data must hold every frame the header declares."""
    if ds.file_meta.TransferSyntaxUID.is_compressed or "PixelData" not in ds:
        return
    bits = int(ds.BitsAllocated)
    n = int(ds.Rows) * int(ds.Columns) * n_frames * int(ds.get("SamplesPerPixel", 1) or 1)
    need = (n + 7) // 8 if bits == 1 else n * (bits // 8)
    have = len(ds.PixelData)
    if have < need:
        raise DataError(f"{p}: DICOM pixel data is truncated: {have:,} bytes where the header needs {need:,}")


def decode_dicom_frames(ds: Any, path: str | Path) -> np.ndarray:
    """Every frame of a DICOM dataset as ``(T, Rows, Columns)`` grayscale (module docstring's rules).

    Frames are decoded and converted one at a time, so at most one colour frame is in memory beside the output.
    Raises :class:`DataError` naming ``path`` for an unsupported transfer syntax, a missing decoder plugin or
    undecodable pixel data.
    """
    p = Path(path)
    tsyntax = ds.file_meta.TransferSyntaxUID
    photometric = str(ds.PhotometricInterpretation).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    # unsigned [0, 2^b - 1] -> 2^b - 1 - x; signed [-2^(b-1), 2^(b-1) - 1] -> -1 - x
    invert_max = -1 if signed else 2**bits - 1
    try:
        from pydicom.pixels import apply_color_lut, get_decoder
    except ImportError:  # pydicom 2.x (the MONAI Label venv): the whole array through the handlers
        frames = _decode_pydicom2(ds, p, photometric, samples, invert_max)
        return _stack_frames(list(frames), bits, signed)  # the same dtypes as with pydicom 3
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise DataError(f"{p}: unsupported transfer syntax {tsyntax.name} ({tsyntax}): no pixel-data decoder") from e
    if not decoder.is_available:
        raise DataError(f"{p}: transfer syntax {tsyntax.name} needs a decoder plugin that is not installed "
                        f"(missing: {decoder.missing_dependencies})")
    # Pillow decodes JPEG baseline ~3x faster than pylibjpeg here; any available plugin gives the same pixels
    plugin = "pillow" if "pillow" in decoder.available_plugins else ""
    out: list[np.ndarray] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # as_rgb=False: YBR data stay as stored, their Y plane is the gray image (no colour conversion needed)
            for arr, meta in decoder.iter_array(ds, as_rgb=False, decoding_plugin=plugin):
                pi = str(meta.get("photometric_interpretation", photometric)).upper()
                out.append(_gray_frame(arr, pi, samples, invert_max, ds, apply_color_lut))
    except DataError:
        raise
    except Exception as e:  # decoders raise many unrelated types for corrupt or truncated pixel data
        raise DataError(f"{p}: cannot decode the pixel data (transfer syntax {tsyntax.name}, frame {len(out)}): "
                        f"{type(e).__name__}: {e}") from e
    if not out:
        raise DataError(f"{p}: the pixel data hold no frame")
    return _stack_frames(out, bits, signed)


def _gray_frame(arr: np.ndarray, pi: str, samples: int, invert_max: int, ds: Any, apply_color_lut: Any) -> np.ndarray:
    if pi == "PALETTE COLOR":
        return to_grayscale(apply_color_lut(arr, ds), "RGB")
    if samples == 3 or (arr.ndim == 3 and arr.shape[-1] == 3):
        return to_grayscale(arr, pi)
    if pi == "MONOCHROME1":
        return invert_max - arr.astype(np.int64)  # low values are bright; mirror the stored value range
    return arr


def _stack_frames(out: list[np.ndarray], bits: int, signed: bool) -> np.ndarray:
    frames = np.stack(out, 0)
    if frames.dtype == np.int64 and bits <= 16:  # MONOCHROME1 inversion widened the type; the range fits back
        small = (np.int8, np.int16) if signed else (np.uint8, np.uint16)
        frames = frames.astype(small[0] if bits <= 8 else small[1])
    elif bits <= 8 and not signed and frames.dtype != np.uint8:
        frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)  # 8-bit data stay 8-bit after conversions
    return frames


def _decode_pydicom2(ds: Any, p: Path, photometric: str, samples: int, invert_max: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
            if photometric == "PALETTE COLOR":
                from pydicom.pixel_data_handlers.util import apply_color_lut as lut

                arr = lut(arr, ds)
    except Exception as e:  # pydicom 2 raises NotImplementedError/RuntimeError/ValueError for undecodable data
        raise DataError(f"{p}: cannot decode the pixel data (transfer syntax "
                        f"{ds.file_meta.TransferSyntaxUID.name}): {type(e).__name__}: {e}") from e
    n = _n_frames(ds, p)
    if n == 1:
        arr = arr[None]
    if samples == 3 or photometric == "PALETTE COLOR":
        return to_grayscale(arr, "RGB" if photometric == "PALETTE COLOR" else photometric)
    if photometric == "MONOCHROME1":
        return invert_max - arr.astype(np.int64)
    return arr


def _rescale(ds: Any) -> tuple[float, float]:
    """Rescale slope and intercept, top level or in the shared functional groups (enhanced CT/MR)."""
    src = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        src = _seq_item(ds, "SharedFunctionalGroupsSequence", "PixelValueTransformationSequence") or ds
    try:
        slope = float(src.get("RescaleSlope", 1.0) or 1.0)
        inter = float(src.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError):
        return 1.0, 0.0
    return slope, inter


def _frames_of(p: Path, layout_ds: Any, n_expected: int) -> tuple[np.ndarray, Any]:
    ds = read_dicom_dataset(p, header_only=False)
    _check_pixel_tags(ds, p)
    if (int(ds.Rows), int(ds.Columns)) != (int(layout_ds.Rows), int(layout_ds.Columns)):
        raise DataError(f"{p}: header changed between reads")
    _native_size_check(ds, p, n_expected)
    frames = decode_dicom_frames(ds, p)
    if frames.shape[0] != n_expected:
        raise DataError(f"{p}: NumberOfFrames says {n_expected} but the pixel data hold {frames.shape[0]} frames")
    if frames.shape[1:] != (int(ds.Rows), int(ds.Columns)):
        raise DataError(f"{p}: decoded frames of {frames.shape[1:]} where the header says "
                        f"{(int(ds.Rows), int(ds.Columns))}")
    return frames, ds


def read_dicom(path: str | Path, limits: ReadLimits | None = None, require_geometry: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a DICOM file or a one-series folder: ``(array in index order, RAS affine, meta)``.

    ``array`` is ``(Columns, Rows)`` for one frame, ``(Columns, Rows, n)`` for a multi-frame file or a series
    (slices ordered by position along the normal; the frames of a cine in acquisition order). ``meta`` holds
    ``modality``, ``photometric_interpretation``, ``n_frames``, ``frame_axis`` ("slice"/"time") and, for inputs
    without patient geometry, ``geometry: "none"``. ``require_geometry``: refuse inputs without patient
    geometry (default: for CT, MR and PET). Sizes are checked against ``limits`` before decoding.
    """
    p = require_input(path, allow_dir=True)
    try:
        return _read_dicom(p, limits, require_geometry)
    except (DataError, FileNotFoundError):
        raise
    except Exception as e:  # malformed values surface lazily in pydicom; never let them out bare
        raise DataError(f"{p}: malformed DICOM data ({type(e).__name__}: {e})") from e


def _read_dicom(p: Path, limits: ReadLimits | None, require_geometry: bool | None
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    layout = _dicom_layout(p, require_geometry)
    samples = int(layout.header.get("SamplesPerPixel", 1) or 1)
    check_size(layout.shape, p, limits, samples)
    if len(layout.files) == 1:
        frames, ds = _frames_of(layout.files[0], layout.header, int(layout.meta["n_frames"]))
        frames = frames[layout.order]
        slope, inter = _rescale(ds)
        if (slope, inter) != (1.0, 0.0):
            frames = frames.astype(np.float32) * np.float32(slope) + np.float32(inter)
    else:
        slices = []
        for i in layout.order:
            f, ds = _frames_of(layout.files[i], layout.header, 1)
            slope, inter = _rescale(ds)
            # slopes may differ per slice (PET, some MR): apply each slice's own
            slices.append(f[0] if (slope, inter) == (1.0, 0.0) else f[0].astype(np.float32) * slope + inter)
        dtype = np.result_type(*[s.dtype for s in slices])
        frames = np.stack([s.astype(dtype, copy=False) for s in slices])
    array = np.ascontiguousarray(frames.transpose(2, 1, 0))  # (T, rows, cols) -> (cols, rows, T), index order
    if len(layout.shape) == 2:
        array = array[..., 0]
    meta = dict(layout.meta)
    meta["files"] = [str(layout.files[i]) for i in layout.order] if len(layout.files) > 1 else [str(layout.files[0])]
    return array, layout.affine, meta


# ---------------------------------------------------------------------------------------------------- loading
def _monai_load(p: Path, fmt: str, limits: ReadLimits | None) -> Any:
    """Read with MONAI's reader of ``fmt`` (``NibabelReader``/``ITKReader``/``PILReader``, as ``LoadImage`` picks
    them) into a MetaTensor; the file's dtype is kept (labels stay integers), in native byte order. The size is
    checked against ``limits`` from the header before any pixel is read."""
    import torch
    from monai.data import ITKReader, MetaTensor, NibabelReader, PILReader

    if fmt == "nifti":
        reader = NibabelReader()
    elif fmt == "itk":
        reader = ITKReader()
    else:
        def _gray(im: Any) -> Any:
            return im if im.mode in ("L", "I", "I;16", "F") else im.convert("L")

        reader = PILReader(converter=_gray)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # reader.read + get_data is what LoadImage does; done here so big-endian data (torch cannot hold them,
        # LoadImage fails on them) are swapped to native order first
        zooms = None
        if fmt == "nifti":
            shape, raw = _nifti_header(p)  # lazy: header only
            # the file's own pixdim: MONAI's reader rewrites the header's zooms from the affine (time step lost)
            zooms = tuple(float(z) for z in raw.header.get_zooms())
            samples = 1
        else:
            shape, samples = header_shape(p)
        check_size(shape, p, limits, samples)
        arr, meta = reader.get_data(reader.read(str(p)))
    meta = dict(meta)
    if zooms is not None:
        meta["zooms"] = zooms  # the header's pixdim (time step of 2D+t files included), for ImageData.spacing
    affine = np.asarray(meta.pop("affine", np.eye(4)))  # PILReader gives none: LoadImage's default identity
    img = MetaTensor(torch.from_numpy(_torch_safe(np.asarray(arr))), affine=torch.tensor(affine, dtype=torch.float64),
                     meta=meta)
    return img


def load_image(path: str | Path, *, limits: ReadLimits | None = None, ndims: int | Sequence[int] | None = None,
               allow_constant: bool = True, require_geometry: bool | None = None) -> Any:
    """Read any supported image into a ``monai.data.MetaTensor`` in the module's axis convention.

    Formats: NIfTI (``NibabelReader``), MetaImage/NRRD (``ITKReader``), PNG/JPEG/BMP/TIFF (``PILReader``, as
    grayscale), ``.npy`` (numeric only), DICOM file or one-series folder (:func:`read_dicom`). The MetaTensor has
    no channel axis (``original_channel_dim = "no_channel"``) and MONAI's meta keys (``affine``,
    ``original_affine``, ``spatial_shape``, ``filename_or_obj``, ``space``), plus ``format`` and, for DICOM,
    ``modality``, ``n_frames``, ``frame_axis``. The size is checked from the header before reading
    (:func:`check_size`), the array after (:func:`check_image_array` with ``ndims``/``allow_constant``).

    Raises:
        FileNotFoundError: missing input.
        DataError: anything else, the message naming the input and the reason.
    """
    import torch
    from monai.data import MetaTensor
    from monai.utils import SpaceKeys

    p = require_input(path, allow_dir=True)
    fmt = image_format(p)
    if fmt is None:
        raise DataError(f"{p}: unsupported image format (expected NIfTI .nii/.nii.gz, MetaImage .mhd/.mha, NRRD, "
                        "DICOM .dcm or a DICOM series folder, PNG/TIFF or .npy)")
    extra: dict[str, Any] = {}
    if fmt in ("dicom", "dicom_series"):
        arr, affine, extra = read_dicom(p, limits, require_geometry)
        img = MetaTensor(torch.from_numpy(_torch_safe(arr)), affine=torch.tensor(affine, dtype=torch.float64))
        img.meta["original_affine"] = affine.copy()
        img.meta["spatial_shape"] = np.asarray(arr.shape)
        img.meta["space"] = SpaceKeys.RAS
    elif fmt == "npy":
        arr = read_npy(p, limits)
        check_image_array(arr, p, ndims=ndims, allow_constant=allow_constant, limits=limits)
        affine = np.eye(4)
        img = MetaTensor(torch.from_numpy(_torch_safe(arr)), affine=torch.tensor(affine, dtype=torch.float64))
        img.meta["original_affine"] = affine.copy()
        img.meta["spatial_shape"] = np.asarray(arr.shape)
        img.meta["space"] = SpaceKeys.RAS
    else:
        try:
            img = _monai_load(p, fmt, limits)
        except DataError:
            raise
        except Exception as e:  # nibabel/ITK/PIL raise many unrelated types for corrupt or truncated data
            raise DataError(f"{p}: cannot read image data ({type(e).__name__}: {_first_line(e)})") from e
    img.meta["filename_or_obj"] = str(p)
    img.meta["original_channel_dim"] = float("nan")  # MONAI's "no_channel"
    affine4 = np.asarray(img.affine, dtype=np.float64)
    if affine4.shape != (4, 4):
        from monai.data.utils import to_affine_nd

        # ITK gives 2D images a 3x3 affine; one 4x4 form for every input (as NIfTI and DICOM have) keeps callers simple
        affine4 = to_affine_nd(3, affine4)
        img.meta["original_affine"] = affine4.copy()
    # set last, with "no_channel" known: MetaTensor caches its spatial rank from the affine and the channel flag
    # when the affine is set (a rank cached too low makes SpatialPad/Invertd move the wrong axes)
    img.affine = torch.tensor(affine4, dtype=torch.float64)
    img.meta["format"] = fmt
    img.meta.update(extra)
    if fmt != "npy":
        check_image_array(img.numpy() if img.dtype != torch.bool else img.numpy().astype(np.uint8), p, ndims=ndims,
                          allow_constant=allow_constant, limits=limits)
    return img


def _torch_safe(arr: np.ndarray) -> np.ndarray:
    """numpy dtypes torch cannot hold (uint32/uint64 on older torch, big-endian) as the nearest safe ones."""
    arr = np.asarray(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype in (np.uint32, np.uint64):
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------- frame conversions
def to_frames(array: np.ndarray, path: str | Path = "array") -> np.ndarray:
    """Index-order ``(W, H)``, ``(W, H, T)`` or ``(W, H, 1, T)`` -> ``(T, H, W)`` frames (row 0 at the top)."""
    arr = np.asarray(array)
    if arr.ndim == 4 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return arr.T[None]
    if arr.ndim == 3:
        return arr.transpose(2, 1, 0)
    raise DataError(f"{path}: expected a 2D image or a 2D+t sequence, got shape {arr.shape}")


def from_frames(frames: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`to_frames`: ``(T, H, W)`` -> the index-order ``shape`` it came from."""
    arr = np.asarray(frames).transpose(2, 1, 0)  # (W, H, T)
    return np.ascontiguousarray(arr.reshape(tuple(int(s) for s in shape)))


# ------------------------------------------------------------------------------------------------------ writing
def image_geometry(path: str | Path) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape in index order, 4x4 RAS affine)`` of an input from its header (DICOM: headers of the series)."""
    p = require_input(path, allow_dir=True)
    fmt = image_format(p)
    if fmt == "nifti":
        shape, img = _nifti_header(p)
        return shape, np.asarray(img.affine, dtype=np.float64)
    if fmt in ("dicom", "dicom_series"):
        layout = _dicom_layout(p, None)
        return layout.shape, layout.affine
    if fmt == "npy":
        return tuple(int(s) for s in _npy_map(p).shape), np.eye(4)
    img = load_image(p)  # ITK/PIL: MONAI's affine needs the reader; the images are small next to a volume
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def write_like(path: str | Path, array: np.ndarray, reference: str | Path | None = None,
               affine: np.ndarray | None = None, dtype: Any = None) -> Path:
    """Write ``array`` (index order) as NIfTI on the grid of ``reference`` (or with ``affine``).

    With a ``reference`` input (any readable format) the array must have its shape (a trailing/leading
    singleton difference is reshaped) and gets its affine, so spacing, origin and direction equal the input's;
    a NIfTI reference also passes on its header (units, time step, qform/sform codes). Without a reference,
    ``affine`` (default identity) is used. Returns the written path.
    """
    import nibabel as nib

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    header = None
    if reference is not None:
        ref = Path(reference)
        shape, ref_affine = image_geometry(ref)
        if arr.shape != tuple(shape):
            if arr.size != math.prod(shape):
                raise DataError(f"{out}: prediction of shape {arr.shape} does not fit the grid {tuple(shape)} of "
                                f"{ref}")
            arr = arr.reshape(shape)
        affine = ref_affine
        if image_format(ref) == "nifti":
            header = nib.load(str(ref)).header.copy()
            header.set_data_dtype(arr.dtype)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if isinstance(header, nib.Nifti2Header):
        img = nib.Nifti2Image(arr, affine, header)
    else:
        img = nib.Nifti1Image(arr, affine, header)
    if header is None:
        img.set_qform(affine, code=1)  # both forms "scanner": nibabel, ITK and MONAI then read the same geometry
        img.set_sform(affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)  # class ids and probabilities are stored unscaled
    nib.save(img, str(out))
    return out


# --------------------------------------------------------------------------------------------- MONAI transforms
# Plain callables rather than monai.transforms subclasses: importing monai.transforms costs seconds, and this module
# is imported by every reader (common.data.io); MONAI's Compose/Invertd accept any callable and skip non-invertible
# ones.
class LoadImageChecked:
    """Array transform: a path -> :func:`load_image`'s MetaTensor (a drop-in for ``LoadImage(image_only=True)``)."""

    def __init__(self, ndims: int | Sequence[int] | None = None, allow_constant: bool = True,
                 require_geometry: bool | None = None) -> None:
        self.ndims, self.allow_constant, self.require_geometry = ndims, allow_constant, require_geometry

    def __call__(self, path: str | os.PathLike) -> Any:
        return load_image(path, ndims=self.ndims, allow_constant=self.allow_constant,
                          require_geometry=self.require_geometry)


class LoadImageCheckedd:
    """Dictionary version of :class:`LoadImageChecked`: a drop-in for ``LoadImaged(keys, image_only=True)``.

    Unlike ``LoadImaged`` it reads DICOM series ordered by geometry, honours MONOCHROME1, checks sizes before
    reading and raises :class:`DataError` naming the file. Use ``EnsureChannelFirstd`` after it as usual; the
    loaded MetaTensor's meta make ``Invertd`` + ``SaveImaged`` write predictions on the input grid.
    """

    def __init__(self, keys: str | Sequence[str], ndims: int | Sequence[int] | None = None,
                 allow_constant: bool = True, require_geometry: bool | None = None,
                 allow_missing_keys: bool = False) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.loader = LoadImageChecked(ndims, allow_constant, require_geometry)
        self.allow_missing_keys = allow_missing_keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"key {key!r} not found in the data (keys: {sorted(map(str, d))})")
            d[key] = self.loader(d[key])
        return d
