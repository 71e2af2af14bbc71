"""Video and query-point readers for point-tracking inference (SpeckNet bundle, METHODS.md §4).

Videos are returned as :class:`VideoData` with ``frames`` ``(T, H, W)`` grayscale (row 0 at the top, as a clinician
sees them), whatever the file format:

* HDF5 (``.h5``/``.hdf5``): the open tracking layout of :mod:`common.data.tracking` (``video`` (T, H, W), attributes
  ``fps``, ``pixel_spacing_mm``, ...). Only ``video`` is required here; ``tracks``, ``visible``, ``labels`` and the
  attributes are passed on when present (reference tracks, masks for automatic query points, ED/ES, reference GLS).
* NIfTI 2D+t (``.nii``/``.nii.gz``) ``(X=W, Y=H, T)`` or ``(X, Y, 1, T)``, MetaImage (``.mhd``/``.mha``): read by
  :func:`common.data.io.read_image` in the one index-order convention of :mod:`common.data.loading` and turned into
  ``(T, H, W)`` by :func:`common.data.loading.to_frames` (no per-format transpose).
* DICOM (``.dcm``, ``.dicom`` or any file with the ``DICM`` preamble): a multi-frame image (e.g. Ultrasound
  Multi-frame Image Storage), native or compressed (JPEG baseline/lossless, JPEG 2000, RLE through pydicom's
  decoders), MONOCHROME1/2, RGB, YBR_FULL(_422) or PALETTE COLOR, converted to grayscale.

Grayscale conversion (colour ultrasound files store a gray B-mode image in three channels; implemented once in
:func:`common.data.loading.decode_dicom_frames`, shared with the image readers):

* YBR_FULL / YBR_FULL_422 / YBR_PARTIAL_*: the ``Y`` (luma) plane as decoded, so the colour conversion is skipped;
* RGB (and any decoder output already converted to RGB): ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` -- the
  same weights that define ``Y``, so both paths agree up to the rounding of the colour conversion;
* MONOCHROME1: inverted (``max - x``), so bright means echogenic as in MONOCHROME2;
* PALETTE COLOR: the colour look-up table, then luma.

Query points (pixel coordinates ``(x, y)`` with pixel ``[r, c]`` centred at ``(x=c, y=r)``, the data pipeline's
convention) are read by :func:`read_query_points` from JSON or CSV:

* JSON: ``{"query_frame": 20, "points": [[x, y], ...]}``, or ``"points": [{"x": .., "y": .., "frame": ..}, ...]``,
  or a bare list ``[[x, y], ...]``. ``query_frame`` may be omitted (the caller's default then applies).
* CSV: a header with columns ``x`` and ``y`` (and optionally ``frame``); or headerless rows ``x,y`` / ``x,y,frame``.

Every reader raises ``FileNotFoundError`` or :class:`~common.data.io.DataError` (a ``ValueError``) naming the file
and what is wrong (missing DICOM tag, undecodable pixel data, wrong shape, points outside the image, ...). Sizes
are checked from the header against :class:`common.data.loading.ReadLimits` before any frame is decoded.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.io import DataError, read_image
from common.data.loading import (
    check_dicom_pixel_data,
    check_size,
    decode_dicom_frames,
    dicom_inplane_spacing,
    read_dicom_dataset,
    require_input,
    to_frames,
    to_grayscale,
)

__all__ = [
    "VIDEO_SUFFIXES",
    "VideoData",
    "QueryPoints",
    "is_video_file",
    "find_videos",
    "read_video",
    "read_hdf5_video",
    "read_nifti_video",
    "read_dicom_video",
    "to_grayscale",
    "read_query_points",
    "check_query_points",
    "read_mask_frame",
    "DICOM_REQUIRED_TAGS",
]

VIDEO_SUFFIXES = (".h5", ".hdf5", ".nii", ".nii.gz", ".mhd", ".mha", ".dcm", ".dicom")
# tags without which a multi-frame DICOM image cannot be turned into a (T, H, W) video
DICOM_REQUIRED_TAGS = ("PixelData", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                       "BitsAllocated", "NumberOfFrames")


@dataclass
class VideoData:
    """A grayscale video and what the file says about it.

    Attributes:
        frames: (T, H, W) grayscale frames, the file's dtype for grayscale input (uint8 for 8-bit data), float32
            after a colour conversion.
        path: the file.
        fps: frames per second, None when the file does not say.
        spacing: (row, col) mm per pixel, None when the file does not say.
        source: "hdf5", "nifti", "mhd" or "dicom".
        extras: format-specific arrays/values: for HDF5 ``tracks`` (T, N, 2), ``visible`` (T, N), ``labels``
            (T, H, W) and the attributes (``ed_frame``, ``es_frame``, ``gls_reference``, ...) when present.
    """

    frames: np.ndarray
    path: Path
    fps: float | None = None
    spacing: tuple[float, float] | None = None
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])


@dataclass
class QueryPoints:
    """Query points read from a file.

    Attributes:
        points: (N, 2) float32 ``(x, y)`` pixels.
        frames: (N,) int64 query frame of each point, or None when the file gives none (caller's default).
        path: the file.
    """

    points: np.ndarray
    frames: np.ndarray | None
    path: Path | None = None


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _require_file(path: str | Path) -> Path:
    return require_input(path)


def _check_video_array(frames: np.ndarray, path: Path, what: str) -> np.ndarray:
    if frames.ndim != 3:
        raise DataError(f"{path}: {what} must be a 2D+t video (T, H, W), got shape {frames.shape}")
    t, h, w = frames.shape
    if t < 2:
        raise DataError(f"{path}: {what} has {t} frame(s); tracking needs a video of at least 2 frames")
    if h < 2 or w < 2:
        raise DataError(f"{path}: {what} frames of {h} x {w} pixels are too small")
    if frames.dtype.kind == "c":
        raise DataError(f"{path}: {what} has complex dtype {frames.dtype}; expected real gray values")
    if frames.dtype.kind not in "buif":
        raise DataError(f"{path}: {what} has non-numeric dtype {frames.dtype}")
    if frames.dtype.kind == "f" and not np.isfinite(frames).all():
        raise DataError(f"{path}: {what} contains {int((~np.isfinite(frames)).sum())} NaN/Inf values")
    return np.ascontiguousarray(frames)


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ----------------------------------------------------------------------------------------------------------------
# HDF5


def read_hdf5_video(path: str | Path) -> VideoData:
    """Read ``video`` (T, H, W) (or (T, H, W, 3) RGB) and, when present, ``tracks``/``visible``/``labels`` and
    the attributes of a tracking-layout HDF5 file."""
    import h5py

    p = _require_file(path)
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise DataError(f"{p}: not a readable HDF5 file ({e})") from e
    with f:
        if "video" not in f:
            raise DataError(f"{p}: missing dataset 'video' (T, H, W); found {sorted(f.keys())}")
        video = f["video"]
        if not hasattr(video, "shape") or video.ndim not in (3, 4):
            raise DataError(f"{p}: 'video' must be a (T, H, W) dataset, got {getattr(video, 'shape', type(video))}")
        t0, h0, w0 = (int(x) for x in video.shape[:3])
        check_size((w0, h0, t0), p, samples=int(video.shape[3]) if video.ndim == 4 else 1)
        try:
            frames = np.asarray(video[()])
            extras: dict[str, Any] = {k: np.asarray(f[k][()]) for k in ("tracks", "visible", "labels") if k in f}
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: cannot read datasets ({e})") from e
        attrs = {k: _attr(f.attrs[k]) for k in f.attrs}
    if frames.ndim == 4 and frames.shape[-1] == 3:
        rgb8 = frames.dtype == np.uint8
        frames = to_grayscale(frames, "RGB")
        if rgb8:
            frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)  # 8-bit data stays 8-bit
    frames = _check_video_array(frames, p, "'video'")
    t, h, w = frames.shape
    if "tracks" in extras:
        tr = extras["tracks"]
        if tr.ndim != 3 or tr.shape[0] != t or tr.shape[2] != 2:
            raise DataError(f"{p}: 'tracks' must be (T={t}, N, 2), got {tr.shape}")
        extras["tracks"] = tr.astype(np.float32)
        vis = extras.get("visible")
        if vis is not None and vis.shape != tr.shape[:2]:
            raise DataError(f"{p}: 'visible' must be {tr.shape[:2]}, got {vis.shape}")
        extras["visible"] = (vis if vis is not None else np.ones(tr.shape[:2])).astype(bool)
    elif "visible" in extras:
        del extras["visible"]
    if "labels" in extras and extras["labels"].shape != (t, h, w):
        raise DataError(f"{p}: 'labels' must be {(t, h, w)} like 'video', got {extras['labels'].shape}")
    extras.update(attrs)
    fps = attrs.get("fps")
    sp = attrs.get("pixel_spacing_mm")
    spacing = None
    if isinstance(sp, (int, float)) and sp > 0:
        spacing = (float(sp), float(sp))
    elif isinstance(sp, list) and len(sp) == 2:
        spacing = (float(sp[0]), float(sp[1]))
    return VideoData(frames, p, float(fps) if isinstance(fps, (int, float)) and fps > 0 else None, spacing, "hdf5",
                     extras)


# ----------------------------------------------------------------------------------------------------------------
# NIfTI / MetaImage


def read_nifti_video(path: str | Path) -> VideoData:
    """Read a 2D+t NIfTI ((X, Y, T) or (X, Y, 1, T), width first) or MetaImage video as (T, H, W) frames."""
    p = _require_file(path)
    suffix = _suffix(p)
    img = read_image(p)  # names the file on any format error; index order (W, H, [1,] T) for both formats
    arr = np.asarray(img.array)
    if arr.ndim == 4 and arr.shape[2] == 1:
        arr, spacing_wh = arr[:, :, 0], (img.spacing[0], img.spacing[1])
    else:
        spacing_wh = (img.spacing[0], img.spacing[1]) if arr.ndim >= 2 else (1.0, 1.0)
    if arr.ndim != 3:
        raise DataError(f"{p}: a video must be 2D+t with shape (X, Y, T) or (X, Y, 1, T) in index order, got "
                        f"{arr.shape}")
    frames = _check_video_array(to_frames(arr), p, "the image")
    spacing = (float(spacing_wh[1]), float(spacing_wh[0]))
    is_nifti = suffix in (".nii", ".nii.gz")
    fps = _nifti_fps(p) if is_nifti else None
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        spacing = None
    return VideoData(frames, p, fps, spacing, "nifti" if is_nifti else "mhd")


def _nifti_fps(path: Path) -> float | None:
    """Frame rate from a 4D NIfTI header (pixdim[4] with its time unit); None for 3D files (no time axis)."""
    import nibabel as nib

    hdr = nib.load(str(path)).header
    if int(hdr["dim"][0]) < 4:
        return None
    step = float(hdr["pixdim"][4])
    unit = hdr.get_xyzt_units()[1]
    scale = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(unit)
    if scale is None or not step > 0:
        return None
    return 1.0 / (step * scale)


# ----------------------------------------------------------------------------------------------------------------
# DICOM


def _dicom_fps(ds: Any) -> float | None:
    ft = ds.get("FrameTime")
    if ft is not None and float(ft) > 0:
        return 1000.0 / float(ft)  # FrameTime is in ms
    for key in ("CineRate", "RecommendedDisplayFrameRate"):
        v = ds.get(key)
        if v is not None and float(v) > 0:
            return float(v)
    ftv = ds.get("FrameTimeVector")
    if ftv is not None and len(ftv) > 1:
        steps = np.asarray([float(x) for x in ftv[1:]])
        if (steps > 0).all():
            return float(1000.0 / steps.mean())
    return None


def _dicom_spacing(ds: Any) -> tuple[float, float] | None:
    return dicom_inplane_spacing(ds)


def read_dicom_video(path: str | Path) -> VideoData:
    """Read a multi-frame DICOM image as a (T, H, W) grayscale video (see the module docstring)."""
    p = _require_file(path)
    try:
        return _read_dicom_video(p)
    except (DataError, FileNotFoundError):
        raise
    except Exception as e:  # malformed values surface lazily in pydicom; never let them out bare
        raise DataError(f"{p}: malformed DICOM data ({type(e).__name__}: {e})") from e


def _read_dicom_video(p: Path) -> VideoData:
    ds = read_dicom_dataset(p, header_only=False)
    missing = [tag for tag in DICOM_REQUIRED_TAGS if tag not in ds]
    if missing:
        raise DataError(
            f"{p}: DICOM file lacks required tag(s) {missing} for a multi-frame video "
            f"(SOP class {ds.get('SOPClassUID', 'unknown')}, modality {ds.get('Modality', 'unknown')})"
        )
    n_frames = check_dicom_pixel_data(ds, p)  # tags, transfer syntax, size limits, truncation: before decoding
    if n_frames < 2:
        raise DataError(f"{p}: NumberOfFrames is {n_frames}; tracking needs a multi-frame video")
    photometric = str(ds.PhotometricInterpretation).upper()
    frames = decode_dicom_frames(ds, p)
    if frames.shape[0] != n_frames:
        raise DataError(f"{p}: NumberOfFrames says {n_frames} but the pixel data holds {frames.shape[0]} frames")
    frames = _check_video_array(frames, p, "the DICOM pixel data")
    extras = {k: str(ds.get(k)) for k in ("Modality", "SOPClassUID", "PatientID", "StudyInstanceUID",
                                          "SeriesInstanceUID", "SOPInstanceUID") if k in ds}
    extras["photometric_interpretation"] = photometric
    return VideoData(frames, p, _dicom_fps(ds), _dicom_spacing(ds), "dicom", extras)


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def is_video_file(path: str | Path) -> bool:
    """True for the suffixes in :data:`VIDEO_SUFFIXES` and for suffix-less DICOM files (``DICM`` preamble)."""
    p = Path(path)
    if not p.is_file() or p.name.startswith("."):
        return False
    return _suffix(p) in VIDEO_SUFFIXES or (p.suffix == "" and _has_dicom_preamble(p))


def find_videos(path: str | Path) -> list[Path]:
    """A video file, or every video file under a folder (recursively, sorted). Raises naming ``path``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: input video file or folder not found")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if is_video_file(f))
    if not files:
        raise DataError(f"{p}: no video files found (expected {', '.join(VIDEO_SUFFIXES)} or DICOM files)")
    return files


def read_video(path: str | Path) -> VideoData:
    """Read a video in any supported format (dispatch on the suffix; suffix-less files must be DICOM)."""
    p = _require_file(path)
    suffix = _suffix(p)
    if suffix in (".h5", ".hdf5"):
        return read_hdf5_video(p)
    if suffix in (".nii", ".nii.gz", ".mhd", ".mha"):
        return read_nifti_video(p)
    if suffix in (".dcm", ".dicom") or _has_dicom_preamble(p):
        return read_dicom_video(p)
    raise DataError(f"{p}: unsupported video format {suffix or '(no suffix)'}; expected one of {VIDEO_SUFFIXES}")


# ----------------------------------------------------------------------------------------------------------------
# query points


def _float(value: Any, path: Path, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {where}: {value!r} is not a number") from e
    if not math.isfinite(v):
        raise DataError(f"{path}: {where}: {value!r} is not finite")
    return v


def _frame(value: Any, path: Path, where: str) -> int:
    v = _float(value, path, where)
    if v != int(v):
        raise DataError(f"{path}: {where}: frame {value!r} is not an integer")
    return int(v)


def _points_from_json(obj: Any, path: Path) -> tuple[list[list[float]], list[int] | None]:
    default_frame = None
    if isinstance(obj, dict):
        if "points" not in obj:
            raise DataError(f"{path}: JSON query points need a 'points' list, got keys {sorted(obj)}")
        if obj.get("query_frame") is not None:
            default_frame = _frame(obj["query_frame"], path, "query_frame")
        items = obj["points"]
    else:
        items = obj
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: 'points' must be a non-empty list of [x, y] or {{'x', 'y'}} entries")
    pts, frames = [], []
    for i, it in enumerate(items):
        where = f"point {i}"
        if isinstance(it, dict):
            if "x" not in it or "y" not in it:
                raise DataError(f"{path}: {where} needs 'x' and 'y', got {sorted(it)}")
            pts.append([_float(it["x"], path, where), _float(it["y"], path, where)])
            f = it.get("frame", default_frame)
        elif isinstance(it, (list, tuple)) and len(it) in (2, 3):
            pts.append([_float(it[0], path, where), _float(it[1], path, where)])
            f = it[2] if len(it) == 3 else default_frame
        else:
            raise DataError(f"{path}: {where} must be [x, y], [x, y, frame] or {{'x', 'y'}}, got {it!r}")
        frames.append(None if f is None else _frame(f, path, where))
    if all(f is None for f in frames):
        return pts, None
    if any(f is None for f in frames):
        raise DataError(f"{path}: some points have a frame and others do not; give 'query_frame' for all")
    return pts, frames


def _points_from_csv(text: str, path: Path) -> tuple[list[list[float]], list[int] | None]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: the CSV file has no rows")
    head = [c.strip().lower() for c in rows[0]]
    if "x" in head or "y" in head:
        if "x" not in head or "y" not in head:
            raise DataError(f"{path}: CSV header needs columns 'x' and 'y', got {rows[0]}")
        ix, iy = head.index("x"), head.index("y")
        fcol = next((head.index(k) for k in ("frame", "query_frame", "t") if k in head), None)
        body, first = rows[1:], 2
    else:
        if len(head) not in (2, 3):
            raise DataError(f"{path}: headerless CSV rows must be 'x,y' or 'x,y,frame', got {rows[0]}")
        ix, iy, fcol = 0, 1, (2 if len(head) == 3 else None)
        body, first = rows, 1
    if not body:
        raise DataError(f"{path}: the CSV file has a header but no points")
    pts, frames = [], []
    for k, r in enumerate(body):
        where = f"line {k + first}"
        need = max(ix, iy, fcol if fcol is not None else 0)
        if len(r) <= need:
            raise DataError(f"{path}: {where} has {len(r)} column(s), expected at least {need + 1}")
        pts.append([_float(r[ix], path, where), _float(r[iy], path, where)])
        if fcol is not None:
            frames.append(_frame(r[fcol], path, where))
    return pts, (frames if fcol is not None else None)


def read_query_points(path: str | Path) -> QueryPoints:
    """Read query points from a ``.json`` or ``.csv`` file (formats in the module docstring)."""
    p = _require_file(path)
    suffix = _suffix(p)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read query points ({e})") from e
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e})") from e
        pts, frames = _points_from_json(obj, p)
    elif suffix in (".csv", ".txt"):
        pts, frames = _points_from_csv(text, p)
    else:
        raise DataError(f"{p}: query points must be a .json or .csv file")
    points = np.asarray(pts, dtype=np.float32).reshape(-1, 2)
    return QueryPoints(points, None if frames is None else np.asarray(frames, dtype=np.int64), p)


def check_query_points(points: np.ndarray, frames: np.ndarray, n_frames: int, image_size: tuple[int, int],
                       source: str | Path) -> None:
    """Raise a ``DataError`` naming ``source`` when a point lies outside the image or a frame outside the video.

    A pixel ``[r, c]`` covers ``[c - 0.5, c + 0.5) x [r - 0.5, r + 0.5)``, so the image spans
    ``x in [-0.5, W - 0.5]`` and ``y in [-0.5, H - 0.5]``.
    """
    h, w = image_size
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 1:
        raise DataError(f"{source}: query points must have shape (N, 2) with N >= 1, got {pts.shape}")
    if not np.isfinite(pts).all():
        raise DataError(f"{source}: query points contain NaN/Inf")
    outside = (pts[:, 0] < -0.5) | (pts[:, 0] > w - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > h - 0.5)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"{source}: {int(outside.sum())} query point(s) lie outside the {w} x {h} (W x H) image, e.g. point {i} "
            f"at (x={pts[i, 0]:g}, y={pts[i, 1]:g}); coordinates are pixels with x in [-0.5, {w - 0.5}] and y in "
            f"[-0.5, {h - 0.5}]"
        )
    fr = np.asarray(frames)
    bad = (fr < 0) | (fr >= n_frames)
    if bad.any():
        raise DataError(
            f"{source}: query frame {int(fr[bad][0])} is outside the video's {n_frames} frames (0..{n_frames - 1})"
        )


def read_mask_frame(path: str | Path, frame: int, image_size: tuple[int, int]) -> np.ndarray:
    """The (H, W) label map of a mask file at ``frame``.

    Accepts a 2D mask (any format :func:`common.data.io.read_image` reads, e.g. NIfTI, MetaImage, PNG) used as it
    is, or a 2D+t mask in the video conventions of :func:`read_nifti_video` from which ``frame`` is taken. The
    mask must have the video's frame size ``image_size`` (H, W): a mask on another grid would put the points in
    the wrong place.
    """
    p = _require_file(path)
    img = read_image(p)
    arr = np.asarray(img.array)  # index order (W, H[, 1][, T]) for every format
    if arr.ndim == 4 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim in (2, 3):
        arr = to_frames(arr)
        arr = arr[0] if arr.shape[0] == 1 else arr
    if arr.ndim == 3:
        if not 0 <= frame < arr.shape[0]:
            raise DataError(f"{p}: the mask sequence has {arr.shape[0]} frames, query frame {frame} is outside it")
        arr = arr[frame]
    if arr.ndim != 2:
        raise DataError(f"{p}: a mask must be 2D (H, W) or 2D+t, got shape {arr.shape}")
    if tuple(arr.shape) != tuple(image_size):
        raise DataError(
            f"{p}: mask frame size {tuple(arr.shape)} (H, W) differs from the video's {tuple(image_size)}; "
            "resample the mask to the video grid first"
        )
    return np.ascontiguousarray(arr)
