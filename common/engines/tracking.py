"""Point-tracking workflow for SpeckNet on MONAI/ignite engines (METHODS.md §4, the ``specknet_tracking`` bundle).

Training (paper Sec. 4.4 and 5.1): clips of ``clip_len = 36`` frames, a random query frame per clip, weighted L1 on
visible points (:class:`TrackingPredLoss` over :mod:`common.losses.tracking`), AdamW lr 5e-4 / weight decay 1e-6, a
one-cycle schedule stepped every iteration, gradient-norm clipping at 5 (:class:`GradientClipping`). The
impartial-motion augmentation (:func:`common.transforms.video.impartial_motion_augmentation`) is switched by
``augment``; ``augment=False`` is the paper's baseline training (clips and query frame only). Validation queries
every video at ``int(0.72 T)`` (diastasis).

Evaluation lives in :mod:`common.engines.tracking_eval` (its public names are re-exported here, so configs name
``common.engines.tracking.TrackingEvaluator`` etc.). Evaluation (:class:`TrackingEvaluator` +
:class:`TrackingMetrics` + :class:`TrackingReport`): per video the
features are computed once and tracked from the validation query frame (timed: AIT; peak memory: PGM) and, for the
temporal-invariance curve, from query frames at phases ``0 .. 100 %`` of the video. TAP-Vid ``delta_x`` for
``x in (1, 2, 4, 8, 16)`` at 256 x 256, ``delta_avg`` and MTE (query frame excluded) in the original video's pixel
grid, the zero-motion baseline (tracks = query points), GLS against the reference GLS stored with each video (MAD)
for the videos whose files declare ordered centre-line points (attribute ``centreline_ordered``; otherwise GLS is
reported as not applicable), per dataset and overall. For a SpeckNet, the same encoding is also tracked with the
soft-argmax radius of 5 read in the other unit (5 finest-grid cells vs 5 input pixels), reported as
``radius_variants`` (:data:`RADIUS_VARIANTS`).

Inference (:class:`LoadVideod`, :class:`QueryPointsd`, :class:`TrackingPredictionWriter`): a video (HDF5, NIfTI
2D+t, MetaImage, multi-frame DICOM) and query points given in a JSON/CSV file, or derived as ``n_points``
equidistant points on the myocardial centre line of a mask (a file, e.g. a ``botm_seg`` prediction, or the
``labels`` of a tracking HDF5 file) at the query frame ``int(0.72 T)``; outputs tracks + confidence + visibility in
HDF5 and JSON, GLS and the strain curve in JSON, and PNGs of the tracks over the first frame and of the strain curve.

Sample keys (one video): ``image`` (1, T, S, S) float32 in [-1, 1] (network input, ``S = image_size``);
``query_points`` (N, 2) and ``query_frames`` (N,) in network pixels; ``label`` (T, N, 3) = network-pixel reference
``(x, y)`` and a loss weight (visible, not on the query frame, visible on the query frame); ``tracks`` (T, N, 2) /
``visible`` (T, N) the reference in original pixels; ``orig_size`` (H, W). Coordinates follow the data pipeline's
pixel-centre convention (pixel ``[r, c]`` at ``(x=c, y=r)``); resizing maps ``x -> (x + 0.5) * S / W - 0.5``.

Choices the paper does not state
--------------------------------
1. Epoch: every training video contributes as many clips per epoch as it has ~50 %-overlap segments (the paper's
   "8,620 clips" from 1,922 videos); each draw picks one segment at random (:func:`expand_by_segments`).
2. Frame skipping is uniform in ``0..max_skip`` (5) and not capped, as the paper specifies: a skip of 5 leaves a
   40-frame video with 7 frames, and the clip is padded with invisible frames (no loss there). An optional cap,
   ``skip_min_frames``, keeps at least that many real frames (off by default).
3. Points not visible on their query frame get no loss and no metric (their query location is not tissue).
4. Videos are resized to ``image_size`` (512 in the paper) after augmentation (cheaper for upsampled clips); the
   intensities of 8-bit videos map to ``[-1, 1]`` as ``2 u / 255 - 1``, other dtypes by the video's min/max.
5. Metrics are computed in the original pixel grid of each video, then scaled to 256 x 256 (TAP-Vid); the
   temporal-invariance phases are ``int(p T)`` for ``p = 0, 0.1, ..., 1`` (capped at ``T - 1``).
6. PGM: CUDA max allocated during the timed forward on GPU; on CPU the process peak RSS (``ru_maxrss``), which also
   holds the Python runtime, the model and the data.
7. Inference visibility: ``confidence >= visibility_threshold`` (0.5), the network's fraction of matching weight
   inside the soft-argmax window; SpeckNet has no visibility head.
8. "72 % of the cycle" is ``int(0.72 T)`` of the video, which assumes the video spans one cycle (ED to ED) as the
   paper's recordings do; other recordings pass an explicit query frame.
9. GLS is the length change of the polyline through the points, so it needs ordered myocardial centre-line points.
   Evaluation computes it only for files with ``centreline_ordered`` true; elsewhere ``gls_mad`` is null with a
   ``gls_note``. Inference computes it for automatic centre-line points (mask, labels), for a file's ``tracks`` only
   when the file declares them ordered, and for a user's points file with a note that it assumes ordered centre-line
   points (the user chose the points; nothing can check their order).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.engines.utils import IterationEvents
from monai.transforms import MapTransform
from monai.utils import CommonKeys as Keys
from torch import Tensor, nn

from common.data.centreline import centreline_points_from_mask
from common.data.io import DataError
from common.data.tracking import CENTRELINE_ATTR, centreline_ordered, read_tracking_h5
from common.data.video_io import (
    check_query_points,
    find_videos,
    read_mask_frame,
    read_query_points,
    read_video,
)
from common.engines.handlers import write_json_atomic
from common.losses.tracking import tracking_l1_loss
from common.metrics.tracking import (
    global_longitudinal_strain,
)
from common.networks.specknet import split_pred
from common.transforms.video import diastasis_frame, overlapping_segments

__all__ = [
    "as_bool",
    "video_to_unit",
    "scale_points",
    "expand_by_segments",
    "inference_datalist",
    "LoadTrackingVideod",
    "LoadVideod",
    "QueryPointsd",
    "ResizeVideod",
    "TrackingInputsd",
    "tracking_collate",
    "TrackingPredLoss",
    "GradientClipping",
    "one_cycle_scheduler",
    "TrackingPredictionWriter",
    "plot_tracks_on_frame",
    "plot_strain_curve",
    "export_tracker",
    "trace_tracker",
    "load_exported_tracker",
]

# the evaluation half (common.engines.tracking_eval) imports helpers from this module, so it cannot be imported at
# the top here; its public names are resolved on first access instead (PEP 562), which keeps every config's
# ``common.engines.tracking.<name>`` and every ``from common.engines.tracking import <name>`` working
_EVAL_NAMES = ("DEFAULT_PHASES", "RADIUS_VARIANTS", "RADIUS_UNITS", "GLS_NOT_APPLICABLE", "radius_label",
               "TrackingEvaluator", "TrackingMetrics", "TrackingReport", "summarise_rows", "plot_temporal_invariance")
__all__ += list(_EVAL_NAMES)


def __getattr__(name: str) -> Any:
    """Public names of :mod:`common.engines.tracking_eval`, re-exported lazily (see the comment above)."""
    if name in _EVAL_NAMES:
        from common.engines import tracking_eval

        return getattr(tracking_eval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def as_bool(value: Any, name: str = "value") -> bool:
    """A config switch as a bool: ``True``/``False``, 0/1, or the strings ``true/false/yes/no/on/off/1/0``.

    ``python -m monai.bundle run ... --augment false`` passes the *string* ``"false"``, which Python treats as true;
    this turns it into ``False`` and rejects anything else instead of silently switching the feature on.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"{name} must be true or false, got {value!r}")


def video_to_unit(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) frames -> float32 in [0, 1]: ``u / 255`` for uint8, the video's min/max range otherwise."""
    arr = np.asarray(frames)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr)
    return (arr - lo) / (hi - lo)


def scale_points(points: Any, src_size: Sequence[int], dst_size: Sequence[int]) -> Any:
    """Map ``(..., 2)`` ``(x, y)`` points from an ``src_size`` (H, W) image to a resized ``dst_size`` one.

    Pixel-centre convention: ``x' = (x + 0.5) * W' / W - 0.5`` (what bilinear resizing with half-pixel centres does
    to the image content). Works on numpy arrays and torch tensors.
    """
    sh, sw = float(src_size[0]), float(src_size[1])
    dh, dw = float(dst_size[0]), float(dst_size[1])
    if isinstance(points, Tensor):
        factor = points.new_tensor([dw / sw, dh / sh])
    else:
        points = np.asarray(points, dtype=np.float64)
        factor = np.array([dw / sw, dh / sh])
    out = (points + 0.5) * factor - 0.5
    return out if isinstance(points, Tensor) else out.astype(np.float32)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    vals = tuple(int(s) for s in size)
    if len(vals) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {size!r}")
    return vals  # type: ignore[return-value]


def _dataset_name(entry_id: str, attrs: Mapping, root_name: str) -> str:
    """Dataset a video belongs to: its ``dataset`` attribute, else its top sub-folder, else the root folder."""
    if attrs.get("dataset"):
        return str(attrs["dataset"])
    parts = Path(entry_id).parts
    return parts[0] if len(parts) > 1 else root_name


def expand_by_segments(datalist: Sequence[dict], clip_len: int = 36, overlap: float = 0.5) -> list[dict]:
    """Repeat each entry once per ~``overlap`` segment of ``clip_len`` frames (needs ``n_frames`` in the entries).

    One epoch then draws as many clips as the videos have segments (the paper's clip count); which segment a draw
    uses is left to :class:`~common.transforms.video.SampleClipd` (random).
    """
    out = []
    for e in datalist:
        if "n_frames" not in e:
            raise ValueError(f"expand_by_segments: entry {e.get('id', e)} has no 'n_frames' (build the datalist "
                             "with validate=True)")
        out += [dict(e) for _ in overlapping_segments(int(e["n_frames"]), clip_len, overlap)]
    return out


def inference_datalist(input_path: str | Path) -> list[dict]:
    """``[{"image": path}, ...]`` for a video file or every video file under a folder (named errors)."""
    return [{"image": str(p)} for p in find_videos(input_path)]


# ----------------------------------------------------------------------------------------------------------------
# transforms


class LoadTrackingVideod(MapTransform):
    """Load a tracking-layout HDF5 file named by ``data[key]`` (a datalist entry of
    :func:`common.data.tracking.tracking_datalist`).

    Writes ``video`` (T, H, W) float32 in [0, 1], ``tracks`` (T, N, 2) float32, ``visible`` (T, N) bool,
    ``orig_size`` (2,) int64 (H, W), ``ed``/``es`` ints, ``spacing`` (2,) float32 mm, ``gls_reference`` float (NaN
    when absent), ``centreline_ordered`` bool (GLS applies), ``n_frames`` int, ``dataset`` str, ``id`` str and
    ``path`` str. Other entry keys are dropped so
    that every sample collates the same way.

    Args:
        keys: the datalist key holding the file path.
        root: the dataset folder; its name is the dataset of videos that are neither in a sub-folder nor carry a
            ``dataset`` attribute (per-dataset metrics).
    """

    def __init__(self, keys: KeysCollection = "video", root: str | None = None) -> None:
        super().__init__(keys)
        self.root_name = Path(root).name if root else "dataset"

    def __call__(self, data: Mapping) -> dict:
        key = self.first_key(data)
        path = str(data[key])
        v = read_tracking_h5(path)
        t, h, w = v["video"].shape
        gls = v.get("gls_reference")
        entry_id = str(data.get("id", Path(path).stem))
        return {
            "video": video_to_unit(v["video"]),
            "tracks": v["tracks"].astype(np.float32),
            "visible": v["visible"].astype(bool),
            "orig_size": np.array([h, w], dtype=np.int64),
            "ed": int(v["ed_frame"]),
            "es": int(v["es_frame"]),
            "spacing": np.array([float(v["pixel_spacing_mm"])] * 2, dtype=np.float32),
            "gls_reference": float(gls) if isinstance(gls, (int, float)) else float("nan"),
            "centreline_ordered": centreline_ordered(v),
            "n_frames": int(t),
            "dataset": _dataset_name(entry_id, v, self.root_name),
            "id": entry_id,
            "path": path,
        }


class LoadVideod(MapTransform):
    """Inference loader: read the video file named by ``data[key]`` with :func:`common.data.video_io.read_video`.

    Writes ``video`` (T, H, W) float32 in [0, 1], ``first_frame`` (H, W) float32 (for the overlay PNG),
    ``orig_size``, ``n_frames``, ``fps`` (NaN if unknown), ``spacing`` (2,) (NaN if unknown), ``ed``/``es`` (-1 if
    unknown), ``gls_reference`` (NaN if absent), ``id`` (file stem), ``path`` and ``source``; the HDF5 extras
    ``tracks``/``visible``/``labels`` are kept under ``ref_tracks``/``ref_visible``/``ref_labels`` and the file's
    ``centreline_ordered`` declaration under ``ref_centreline_ordered`` for :class:`QueryPointsd`, which removes
    them.
    """

    def __init__(self, keys: KeysCollection = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping) -> dict:
        key = self.first_key(data)
        vid = read_video(data[key])
        unit = video_to_unit(vid.frames)
        ex = vid.extras
        name = vid.path.name
        stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else vid.path.stem
        gls = ex.get("gls_reference")
        out = {
            "video": unit,
            "first_frame": unit[0].copy(),
            "orig_size": np.array(vid.image_size, dtype=np.int64),
            "n_frames": vid.n_frames,
            "fps": float(vid.fps) if vid.fps else float("nan"),
            "spacing": np.array(vid.spacing if vid.spacing else (np.nan, np.nan), dtype=np.float32),
            "ed": int(ex["ed_frame"]) if isinstance(ex.get("ed_frame"), int) else -1,
            "es": int(ex["es_frame"]) if isinstance(ex.get("es_frame"), int) else -1,
            "gls_reference": float(gls) if isinstance(gls, (int, float)) else float("nan"),
            "id": stem,
            "path": str(vid.path),
            "source": vid.source,
            "ref_centreline_ordered": centreline_ordered(ex),
        }
        for k in ("tracks", "visible", "labels"):
            if k in ex:
                out[f"ref_{k}"] = ex[k]
        return out


def _sidecar(folder: Path, stem: str, suffixes: Sequence[str]) -> Path | None:
    for s in suffixes:
        for cand in (folder / f"{stem}{s}", *sorted(folder.glob(f"{stem}*{s}"))):
            if cand.is_file():
                return cand
    return None


def _gls_basis(source: str, declared: bool) -> tuple[bool, str]:
    """``(gls_applicable, gls_note)`` for query points from ``source`` (see :class:`QueryPointsd`)."""
    if source in ("mask", "labels"):
        return True, "centre-line points derived from the myocardium mask, ordered base -> apex -> base"
    if source == "tracks":
        if declared:
            return True, f"the file's tracks, declared ordered centre-line points ({CENTRELINE_ATTR} = true)"
        return False, (f"not applicable: the file's tracks are not declared ordered centre-line points "
                       f"({CENTRELINE_ATTR} missing or false)")
    return True, ("assumes the given query points are ordered along the myocardial centre line (base -> apex -> "
                  "base); not checked")


class QueryPointsd(MapTransform):
    """Resolve the query points of an inference video (original pixels) into ``query_points_orig`` (N, 2) and
    ``query_frames_orig`` (N,), plus ``query_source`` (a description for the outputs) and the GLS basis:
    ``gls_applicable`` (bool) and ``gls_note`` (why GLS of these points means what it says, or why it is not
    computed): automatic centre-line points (mask, labels) are ordered base -> apex -> base; a file's ``tracks``
    only when the file declares them ordered (``centreline_ordered``), else GLS is not applicable; a user's points
    file is taken as ordered centre-line points, and the note says that this is assumed.

    Sources, in this order with ``source="auto"``:

    1. ``points_path``: a JSON/CSV file (used for every video) or a folder with ``<video stem>.json|.csv``;
       a file without a frame uses the default query frame;
    2. ``mask_path``: a mask file or a folder with ``<video stem>*.nii.gz|.nii|.png`` (e.g. ``botm_seg``
       predictions): ``n_points`` equidistant centre-line points of label ``myo_label`` at the query frame;
    3. the ``labels`` stored in a tracking HDF5 file: the same centre-line rule;
    4. the reference ``tracks`` stored in a tracking HDF5 file, at the query frame (visible points).

    ``source`` may force one of ``"points"``, ``"mask"``, ``"labels"``, ``"tracks"``. The default query frame is
    ``query_frame`` if >= 0, else ``int(query_fraction * T)`` (0.72: diastasis). Points outside the image or frames
    outside the video raise a ``DataError`` naming the file.
    """

    def __init__(self, points_path: str | None = None, mask_path: str | None = None, n_points: int = 32,
                 query_fraction: float = 0.72, query_frame: int = -1, myo_label: int = 2,
                 source: str = "auto") -> None:
        super().__init__(keys=("video",))
        if source not in ("auto", "points", "mask", "labels", "tracks"):
            raise ValueError(f"QueryPointsd: source must be auto/points/mask/labels/tracks, got {source!r}")
        if int(n_points) < 2:
            raise ValueError(f"QueryPointsd: n_points must be >= 2, got {n_points}")
        diastasis_frame(1, query_fraction)  # validates the fraction
        self.points_path = Path(points_path) if points_path else None
        self.mask_path = Path(mask_path) if mask_path else None
        self.n_points, self.query_fraction, self.query_frame = int(n_points), float(query_fraction), int(query_frame)
        self.myo_label, self.source = int(myo_label), source
        for name, p in (("query_points_path", self.points_path), ("mask_path", self.mask_path)):
            if p is not None and not p.exists():
                raise FileNotFoundError(f"{name} {str(p)!r} does not exist")

    def _default_frame(self, t: int, path: str) -> int:
        if self.query_frame >= 0:
            if self.query_frame >= t:
                raise DataError(f"{path}: query_frame {self.query_frame} is outside the video's {t} frames")
            return self.query_frame
        return diastasis_frame(t, self.query_fraction)

    def _from_points(self, d: dict, t: int) -> tuple[np.ndarray, np.ndarray, str] | None:
        if self.points_path is None:
            return None
        f = self.points_path
        if f.is_dir():
            f = _sidecar(f, d["id"], (".json", ".csv"))
            if f is None:
                return None
        qp = read_query_points(f)
        frames = qp.frames if qp.frames is not None else np.full(len(qp.points), self._default_frame(t, d["path"]))
        return qp.points, frames, str(f)

    def _centreline(self, mask: np.ndarray, where: str) -> np.ndarray:
        try:
            return centreline_points_from_mask(mask, self.n_points, myo_label=self.myo_label)
        except ValueError as e:
            raise DataError(f"{where}: cannot derive centre-line query points: {e}") from e

    def _from_mask(self, d: dict, t: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str] | None:
        if self.mask_path is None:
            return None
        f = self.mask_path
        if f.is_dir():
            f = _sidecar(f, d["id"], (".nii.gz", ".nii", ".png", ".mhd"))
            if f is None:
                return None
        q = self._default_frame(t, d["path"])
        pts = self._centreline(read_mask_frame(f, q, size), str(f))
        return pts, np.full(len(pts), q), f"{f} (centre line, frame {q})"

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        t = int(d["n_frames"])
        size = (int(d["orig_size"][0]), int(d["orig_size"][1]))
        path = d["path"]
        order = ("points", "mask", "labels", "tracks") if self.source == "auto" else (self.source,)
        found = None
        used = ""
        for src in order:
            if src == "points":
                found = self._from_points(d, t)
            elif src == "mask":
                found = self._from_mask(d, t, size)
            elif src == "labels" and "ref_labels" in d:
                q = self._default_frame(t, path)
                pts = self._centreline(d["ref_labels"][q], f"{path} ('labels' frame {q})")
                found = (pts, np.full(len(pts), q), f"{path} labels (centre line, frame {q})")
            elif src == "tracks" and "ref_tracks" in d:
                q = self._default_frame(t, path)
                vis = d["ref_visible"][q]
                if not vis.any():
                    raise DataError(f"{path}: no reference point is visible on the query frame {q}")
                pts = d["ref_tracks"][q][vis]
                found = (pts, np.full(len(pts), q), f"{path} tracks (frame {q})")
            if found is not None:
                used = src
                break
        if found is None:
            raise DataError(
                f"{path}: no query points for this video (source {self.source!r}); pass --query_points_path (JSON/CSV) "
                "or --mask_path (a myocardium mask), or use a tracking HDF5 file with 'labels' or 'tracks'"
            )
        pts, frames, desc = found
        check_query_points(pts, frames, t, size, desc)
        declared = bool(d.get("ref_centreline_ordered", False))
        for k in ("ref_tracks", "ref_visible", "ref_labels", "ref_centreline_ordered"):
            d.pop(k, None)
        d["gls_applicable"], d["gls_note"] = _gls_basis(used, declared)
        d["query_points_orig"] = np.asarray(pts, dtype=np.float32)
        d["query_frames_orig"] = np.asarray(frames, dtype=np.int64)
        d["query_source"] = desc
        return d


class ResizeVideod(MapTransform):
    """Resize ``video`` (T, H, W) to ``image_size`` (bilinear, half-pixel centres, antialiased when shrinking) and
    map point arrays accordingly (:func:`scale_points`).

    Args:
        image_size: int or (H', W') network input size (multiples of 16 for SpeckNet).
        point_keys: ``(..., 2)`` point arrays to map: a sequence (mapped in place) or ``{source: destination}``.
    """

    def __init__(self, image_size: int | Sequence[int], keys: KeysCollection = "video",
                 point_keys: Sequence[Hashable] | Mapping[Hashable, Hashable] = ("tracks",),
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size = _size2(image_size)
        self.point_keys = dict(point_keys) if isinstance(point_keys, Mapping) else {k: k for k in point_keys}

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            v = torch.as_tensor(np.asarray(d[key], dtype=np.float32))
            if v.ndim != 3:
                raise ValueError(f"ResizeVideod: {key!r} must be (T, H, W), got {tuple(v.shape)}")
            src = (int(v.shape[1]), int(v.shape[2]))
            if src != self.size:
                shrink = self.size[0] < src[0] or self.size[1] < src[1]
                v = F.interpolate(v[None], size=self.size, mode="bilinear", align_corners=False, antialias=shrink)[0]
            d[key] = v.numpy()
            for src_key, dst_key in self.point_keys.items():
                if src_key in d:
                    d[dst_key] = scale_points(d[src_key], src, self.size)
        return d


class TrackingInputsd(MapTransform):
    """Build the network inputs (and the loss target) of one sample.

    Reads ``video`` (T, S, S) in [0, 1] and either ``tracks_key`` (network-pixel tracks) + ``visible`` +
    ``query_frame`` (training/evaluation: the query points are the reference tracks on the query frame) or
    ``query_points`` (network pixels) + ``query_frames_orig`` (inference). Writes ``image`` (1, T, S, S) float32 in
    [-1, 1], ``query_points`` (N, 2) float32, ``query_frames`` (N,) int64 and, with reference tracks, ``label``
    (T, N, 3) float32 ``(x, y, weight)``, the weight being 1 where the point is visible, visible on the query frame
    and not on the query frame itself.

    Args:
        tracks_key: network-pixel reference tracks (T, N, 2).
        drop: keys removed afterwards (the large ``video`` once ``image`` exists; the references in training).
    """

    def __init__(self, tracks_key: Hashable = "tracks", drop: Sequence[Hashable] = ("video",)) -> None:
        super().__init__(keys=("video",))
        self.tracks_key = tracks_key
        self.drop = tuple(drop)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        video = np.asarray(d["video"], dtype=np.float32)
        t = video.shape[0]
        d["image"] = np.clip(2.0 * video - 1.0, -1.0, 1.0)[None]
        if self.tracks_key in d:
            tracks = np.asarray(d[self.tracks_key], dtype=np.float32)
            visible = np.asarray(d["visible"], dtype=bool)
            q = int(d["query_frame"])
            if tracks.shape[0] != t or visible.shape != tracks.shape[:2]:
                raise ValueError(f"TrackingInputsd: tracks {tracks.shape} / visible {visible.shape} do not match a "
                                 f"{t}-frame video")
            weight = visible & visible[q][None, :]
            weight[q] = False  # the query point is an input, not a prediction (its error is 0 by construction)
            d["query_points"] = tracks[q].copy()
            d["query_frames"] = np.full(tracks.shape[1], q, dtype=np.int64)
            d["label"] = np.concatenate([tracks, weight[..., None].astype(np.float32)], axis=-1)
        else:
            if "query_points" not in d or "query_frames_orig" not in d:
                raise KeyError("TrackingInputsd: needs reference tracks or 'query_points' + 'query_frames_orig'")
            d["query_points"] = np.asarray(d["query_points"], dtype=np.float32)
            d["query_frames"] = np.asarray(d["query_frames_orig"], dtype=np.int64)
        for k in self.drop:
            d.pop(k, None)
        return d


# point-axis position of the keys that tracking_collate pads to the largest N of a batch
_POINT_AXIS = {"query_points": 0, "query_frames": 0, "label": 1, "tracks": 1, "visible": 1,
               "query_points_orig": 0, "query_frames_orig": 0, "tracks_net": 1}


def tracking_collate(batch: Sequence[Mapping]) -> dict:
    """Collate samples whose point count ``N`` differs: point arrays are zero-padded to the largest ``N`` (padded
    points get loss/metric weight 0 through ``label`` and ``visible``); ``n_points`` holds the true counts.

    Arrays and numbers become stacked tensors, strings lists; keys must be the same in every sample.
    """
    if not batch:
        raise ValueError("tracking_collate: empty batch")
    keys = list(batch[0].keys())
    for i, s in enumerate(batch):
        if list(s.keys()) != keys:
            raise ValueError(f"tracking_collate: sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    out: dict[str, Any] = {}
    n_points = None
    for k in keys:
        vals = [s[k] for s in batch]
        if isinstance(vals[0], str):
            out[k] = list(vals)
            continue
        if isinstance(vals[0], (bool, int, float, np.integer, np.floating)):
            out[k] = torch.as_tensor(np.asarray(vals))
            continue
        arrs = [torch.as_tensor(np.asarray(v)) for v in vals]
        if k in _POINT_AXIS:
            ax = _POINT_AXIS[k]
            counts = [a.shape[ax] for a in arrs]
            n_max = max(counts)
            if n_points is None and k in ("query_points", "query_points_orig"):
                n_points = counts
            padded = []
            for a in arrs:
                if a.shape[ax] < n_max:
                    shape = list(a.shape)
                    shape[ax] = n_max - a.shape[ax]
                    a = torch.cat([a, a.new_zeros(shape)], dim=ax)
                padded.append(a)
            arrs = padded
        try:
            out[k] = torch.stack(arrs, 0)
        except RuntimeError as e:
            raise ValueError(f"tracking_collate: key {k!r} has shapes {[tuple(a.shape) for a in arrs]} in one batch "
                             "(videos of different length need batch_size 1)") from e
    if n_points is not None:
        out["n_points"] = torch.as_tensor(n_points)
    return out


# ----------------------------------------------------------------------------------------------------------------
# training pieces


class TrackingPredLoss(nn.Module):
    """Weighted L1 on the bundle's packed tensors: the adapter's channel-first ``pred (B, 3, T, N)`` = (x, y,
    confidence) against ``label (B, T, N, 3)`` = (x, y, weight); see
    :func:`common.losses.tracking.tracking_l1_loss` (masked mean)."""

    def forward(self, pred: Tensor, label: Tensor) -> Tensor:
        if pred.ndim != 4 or pred.shape[1] != 3 or label.ndim != 4 or label.shape != pred.movedim(1, -1).shape:
            raise ValueError(f"TrackingPredLoss: pred must be (B, 3, T, N) and label (B, T, N, 3) of the same B, T, "
                             f"N; got {tuple(pred.shape)} and {tuple(label.shape)}")
        tracks, _ = split_pred(pred)
        return tracking_l1_loss(tracks, label[..., :2], label[..., 2])


class GradientClipping:
    """Clip the gradient norm after every backward pass of a MONAI trainer (paper: 5), before the optimizer step.

    Attaches to ``IterationEvents.BACKWARD_COMPLETED``; with AMP the gradients are unscaled first.
    """

    def __init__(self, max_norm: float = 5.0) -> None:
        if not max_norm > 0:
            raise ValueError(f"GradientClipping: max_norm must be positive, got {max_norm}")
        self.max_norm = float(max_norm)

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


def one_cycle_scheduler(optimizer: torch.optim.Optimizer, max_lr: float, epochs: int, steps_per_epoch: int,
                        pct_start: float = 0.3) -> torch.optim.lr_scheduler.OneCycleLR:
    """One-cycle schedule (Smith & Topin) over ``epochs * steps_per_epoch`` iterations, stepped per iteration."""
    total = int(epochs) * int(steps_per_epoch)
    if total < 1:
        raise ValueError(f"one_cycle_scheduler: epochs * steps_per_epoch must be >= 1, got {epochs} * "
                         f"{steps_per_epoch} (is the training set empty?)")
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=float(max_lr), total_steps=total,
                                               pct_start=pct_start)


# ----------------------------------------------------------------------------------------------------------------
# reports and plots


def _write_compact_json(path: str | Path, payload: Any) -> None:
    """One-line JSON via a temporary file + rename (track arrays pretty-printed would be one number per line)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(payload, allow_nan=False))
    tmp.replace(p)


def plot_tracks_on_frame(frame: np.ndarray, tracks: np.ndarray, out_png: str | Path, query_frame: int | None = None,
                         reference: np.ndarray | None = None, title: str = "") -> Path:
    """PNG of the first frame with every trajectory (coloured by point index) and its query position.

    Args:
        frame: (H, W) image in [0, 1].
        tracks: (T, N, 2) predicted ``(x, y)`` pixels.
        query_frame: marks the query positions ``tracks[query_frame]`` with white rings.
        reference: optional (T, N, 2) reference tracks, drawn dashed in green.
    """
    from common.plotting import colormap, save_figure, subplots
    h, w = frame.shape
    fig, ax = subplots(figsize=(6.0 * w / max(h, w) + 0.5, 6.0 * h / max(h, w) + 0.5))
    ax.imshow(frame, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    cmap = colormap("turbo")
    n = tracks.shape[1]
    if reference is not None:
        for k in range(reference.shape[1]):
            ax.plot(reference[:, k, 0], reference[:, k, 1], "--", color="lime", lw=0.8, alpha=0.8)
    for k in range(n):
        c = cmap(k / max(n - 1, 1))
        ax.plot(tracks[:, k, 0], tracks[:, k, 1], "-", color=c, lw=1.0)
        ax.plot(tracks[0, k, 0], tracks[0, k, 1], "o", color=c, ms=2.5)
    if query_frame is not None:
        qp = tracks[query_frame]
        ax.scatter(qp[:, 0], qp[:, 1], s=22, facecolors="none", edgecolors="white", linewidths=0.8, zorder=3)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    label = "tracks over frame 0" + (f" (query frame {query_frame}, white rings)" if query_frame is not None else "")
    ax.set_title(f"{title}\n{label}" if title else label, fontsize=8)
    return save_figure(fig, out_png, dpi=120)


def plot_strain_curve(strain: np.ndarray, out_png: str | Path, fps: float | None = None, ed: int = 0,
                      es: int | None = None, gls: float | None = None, reference_gls: float | None = None,
                      title: str = "") -> Path:
    """PNG of the longitudinal strain curve (%) over time (s, or frames without a frame rate)."""
    from common.plotting import save_figure, subplots
    t = np.arange(len(strain), dtype=np.float64)
    x = t / fps if fps and math.isfinite(fps) and fps > 0 else t
    fig, ax = subplots(figsize=(6.5, 3.6))
    ax.plot(x, strain, "-o", ms=2.5, color="tab:red", label="strain (tracked centre line)")
    ax.axhline(0.0, color="gray", lw=0.6)
    ax.axvline(x[ed], color="tab:blue", lw=0.8, ls="--", label=f"ED (frame {ed})")
    if es is not None:
        ax.axvline(x[es], color="tab:green", lw=0.8, ls="--", label=f"ES (frame {es})")
    if reference_gls is not None and math.isfinite(reference_gls):
        ax.axhline(reference_gls, color="black", lw=0.8, ls=":", label=f"reference GLS {reference_gls:.1f} %")
    ax.set_xlabel("time (s)" if x is not t else "frame")
    ax.set_ylabel("longitudinal strain (%)")
    head = f"GLS {gls:.1f} %" if gls is not None and math.isfinite(gls) else "GLS n/a"
    ax.set_title(f"{title}  {head}" if title else head, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, out_png, dpi=120)


class TrackingPredictionWriter:
    """Inference outputs per video under ``output_dir/<video stem>/``:

    * ``<stem>_tracks.h5``: ``tracks`` (T, N, 2) float32 ``(x, y)`` pixels of the input video, ``confidence``
      (T, N) float32, ``visible`` (T, N) bool (``confidence >= visibility_threshold``), ``query_points`` (N, 2),
      ``query_frames`` (N,), ``strain`` (T,) and attributes (GLS, ED/ES, fps, spacing, source, query source);
    * ``<stem>_tracks.json``: the same content, plus GLS, the strain curve over time and the centre-line lengths;
    * ``<stem>_tracks.png`` (tracks over the first frame) and ``<stem>_strain.png`` (strain curve).

    At the end ``output_dir/inference_summary.json`` lists every video with its GLS and files.
    GLS assumes the points are ordered along the myocardial centre line (as the automatic query points are): it is
    computed when the sample's ``gls_applicable`` is true (:class:`QueryPointsd`; a pipeline without it is treated as
    applicable) and ``gls_note`` (JSON, HDF5 attribute) says on what basis, or why it is null.

    Args:
        output_dir: output folder.
        visibility_threshold: confidence threshold of ``visible``.
        save_png: write the PNGs.
        ledger: a :class:`common.engines.screening.BatchLedger`: a video whose outputs cannot be written is recorded
            there (stage ``writing``) and the run goes on; written videos are recorded with their files. Without it,
            a writing error stops the run.
    """

    def __init__(self, output_dir: str, visibility_threshold: float = 0.5, save_png: bool = True,
                 ledger: Any = None) -> None:
        if not 0.0 <= visibility_threshold <= 1.0:
            raise ValueError(f"visibility_threshold must be in [0, 1], got {visibility_threshold}")
        self.output_dir = Path(output_dir)
        self.threshold = float(visibility_threshold)
        self.save_png = as_bool(save_png, "save_png")
        self.ledger = ledger
        self.results: list[dict] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self.results.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def __call__(self, engine: Any) -> None:
        from common.engines.screening import INPUT_ID_KEY, describe_error

        batch, out = engine.state.batch, engine.state.output
        if not out:
            return  # a case that failed before (recorded by common.engines.screening.CaseGuard)
        pred_all = out[Keys.PRED]
        size_net = (int(batch["image"].shape[-2]), int(batch["image"].shape[-1]))
        for b in range(pred_all.shape[0]):
            n = int(batch["n_points"][b]) if "n_points" in batch else pred_all.shape[2]
            input_id = str(batch[INPUT_ID_KEY][b]) if INPUT_ID_KEY in batch else str(batch["path"][b])
            try:
                result = self._write_one(batch, b, pred_all[b, :, :n], size_net, float(out["time_s"]))
            except Exception as e:  # one video's writing failure (disk, strain of degenerate tracks) is its own
                if self.ledger is None or self.ledger.strict:
                    raise
                self.ledger.fail(input_id, describe_error(e), "writing")
                continue
            self.results.append(result)
            if self.ledger is not None:
                self.ledger.succeed(input_id, {"outputs": result["files"], "gls_percent": result["gls_percent"]})
            engine.logger.info(f"tracks written to {self.results[-1]['files']['json']}")

    def _write_one(self, batch: Mapping, b: int, pred: Tensor, size_net: tuple[int, int], time_s: float) -> dict:
        import h5py

        vid = str(batch["id"][b])
        orig = [int(v) for v in batch["orig_size"][b]]
        tracks = scale_points(pred[..., :2].double().numpy(), size_net, orig)
        # the query points are returned exactly (the network writes them back; undo the resize rounding too)
        qpo = batch["query_points_orig"][b, : pred.shape[1]].numpy()
        qfo = batch["query_frames_orig"][b, : pred.shape[1]].numpy().astype(np.int64)
        tracks[qfo, np.arange(len(qfo))] = qpo
        conf = pred[..., 2].float().numpy()
        visible = conf >= self.threshold
        fps = float(batch["fps"][b])
        fps = fps if math.isfinite(fps) and fps > 0 else None
        sp = [float(s) for s in batch["spacing"][b]]
        spacing = sp if all(math.isfinite(s) and s > 0 for s in sp) else None
        ed = int(batch["ed"][b]) if int(batch["ed"][b]) >= 0 else 0
        es_known = int(batch["es"][b]) if int(batch["es"][b]) >= 0 else None
        gls_ref = float(batch["gls_reference"][b])
        strain = lengths = None
        gls = es = None
        applicable = bool(batch["gls_applicable"][b]) if "gls_applicable" in batch else True
        gls_note = str(batch["gls_note"][b]) if "gls_note" in batch else (
            "assumes the points are ordered along the myocardial centre line; not checked")
        if applicable and tracks.shape[1] >= 2:
            try:
                res = global_longitudinal_strain(tracks, ed_frame=ed, es_frame=es_known, spacing=spacing or 1.0)
                gls, es, strain, lengths = res.gls, res.es_frame, res.strain, res.lengths
            except ValueError:
                pass  # a zero-length centre line (all points on one spot) has no strain; reported as null
        folder = self.output_dir / Path(vid).name
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(vid).name
        files = {"h5": str(folder / f"{stem}_tracks.h5"), "json": str(folder / f"{stem}_tracks.json")}
        meta = {
            "video": str(batch["path"][b]), "source_format": str(batch["source"][b]),
            "query_source": str(batch["query_source"][b]), "n_frames": int(tracks.shape[0]),
            "n_points": int(tracks.shape[1]), "image_size_hw": orig, "network_input_hw": list(size_net),
            "fps": fps, "pixel_spacing_mm": spacing, "ed_frame": ed, "es_frame": es,
            "es_frame_source": "file" if es_known is not None else ("minimal centre-line length" if es is not None
                                                                     else None),
            "gls_percent": gls, "gls_reference_percent": gls_ref if math.isfinite(gls_ref) else None,
            "gls_note": gls_note, "visibility_threshold": self.threshold, "inference_time_s": time_s,
            "coordinates": "(x, y) pixels of the input video; pixel [row, col] is centred at (x=col, y=row)",
        }
        tmp = Path(files["h5"] + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tracks", data=tracks.astype(np.float32))
            f.create_dataset("confidence", data=conf.astype(np.float32))
            f.create_dataset("visible", data=visible)
            f.create_dataset("query_points", data=qpo.astype(np.float32))
            f.create_dataset("query_frames", data=qfo)
            if strain is not None:
                f.create_dataset("strain", data=np.asarray(strain, dtype=np.float32))
            for k, v in meta.items():
                if v is not None:
                    f.attrs[k] = json.dumps(v) if isinstance(v, list) else v
        tmp.replace(files["h5"])
        payload = dict(meta)
        payload.update({
            "query_points": qpo.tolist(), "query_frames": qfo.tolist(),
            "tracks": np.round(tracks, 4).tolist(), "confidence": np.round(conf, 5).tolist(),
            "visible": visible.tolist(),
            "strain_curve": None if strain is None else {
                "frame": list(range(len(strain))),
                "time_s": [i / fps for i in range(len(strain))] if fps else None,
                "strain_percent": np.round(strain, 4).tolist(),
                "centre_line_length": np.round(lengths, 4).tolist(),
                "length_unit": "mm" if spacing else "px"},
        })
        if self.save_png:
            frame = batch["first_frame"][b].numpy()
            files["tracks_png"] = str(plot_tracks_on_frame(frame, tracks, folder / f"{stem}_tracks.png",
                                                           int(qfo[0]) if len(set(qfo.tolist())) == 1 else None,
                                                           title=stem))
            if strain is not None:
                files["strain_png"] = str(plot_strain_curve(strain, folder / f"{stem}_strain.png", fps, ed, es, gls,
                                                            gls_ref if math.isfinite(gls_ref) else None, title=stem))
        payload["files"] = files
        _write_compact_json(files["json"], payload)
        return {"id": vid, "video": meta["video"], "gls_percent": gls,
                "gls_reference_percent": meta["gls_reference_percent"], "gls_note": gls_note,
                "n_points": meta["n_points"], "query_source": meta["query_source"], "inference_time_s": time_s,
                "files": files}

    def finish(self, engine: Any) -> None:
        path = self.output_dir / "inference_summary.json"
        write_json_atomic(path, {"videos": self.results, "n_videos": len(self.results)})
        engine.logger.info(f"inference summary written to {path}")


# ----------------------------------------------------------------------------------------------------------------
# export with one's own query points (ckpt_export traces the image alone, i.e. the adapter's default query grid)


def export_tracker(network: nn.Module, path: str | Path, n_frames: int, image_size: int | Sequence[int],
                   n_points: int, query_frame: int = 0) -> Path:
    """Capture a SpeckNet bundle adapter with ``torch.export`` at fixed shapes and save it (``.pt2``).

    The program takes ``(image (1, 1, T, H, W), query_points (1, N, 2), query_frames (1, N))`` and returns
    ``pred (1, 3, T, N)``; it is specialised to ``(T, H, W, N)`` (the cost-volume op's chunk loops are unrolled), so
    each video length needs its own export.
    """
    h, w = _size2(image_size)
    network = network.eval()
    example = (torch.zeros(1, 1, int(n_frames), h, w), torch.full((1, int(n_points), 2), min(h, w) / 2.0),
               torch.full((1, int(n_points)), int(query_frame), dtype=torch.long))
    with torch.no_grad():
        program = torch.export.export(network, example)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out))
    return out


def trace_tracker(network: nn.Module, path: str | Path, n_frames: int, image_size: int | Sequence[int],
                  n_points: int, query_frame: int = 0, meta_file: str | Path | None = None) -> Path:
    """TorchScript of a SpeckNet bundle adapter by ``torch.jit.trace`` with all three inputs, saved like MONAI's
    ``ckpt_export`` (``metadata.json`` of the bundle stored inside the ``.ts`` file when ``meta_file`` is given).

    ``ckpt_export`` cannot produce it: its scripting path is rejected by the TorchScript compiler and its tracing
    path feeds a single random ``image``, so it captures the adapter's default query grid only. Like
    :func:`export_tracker` the program is specialised to ``(T, H, W, N)``; load it with ``torch.jit.load`` (or MONAI's
    ``load_net_with_metadata``) and call it as ``ts(image, query_points, query_frames)``.
    """
    import warnings

    from monai.data import save_net_with_metadata

    h, w = _size2(image_size)
    network = network.eval()
    example = (torch.zeros(1, 1, int(n_frames), h, w), torch.full((1, int(n_points), 2), min(h, w) / 2.0),
               torch.full((1, int(n_points)), int(query_frame), dtype=torch.long))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # expected: shapes are specialised (documented)
        traced = torch.jit.trace(network, example, check_trace=False)
    meta = json.loads(Path(meta_file).read_text()) if meta_file is not None else {}
    meta["traced_input_shapes"] = {"image": list(example[0].shape), "query_points": list(example[1].shape),
                                   "query_frames": list(example[2].shape)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_net_with_metadata(traced, str(out), include_config_vals=True, meta_values=meta)
    return out if out.suffix else out.with_suffix(".ts")


def load_exported_tracker(path: str | Path) -> Callable[..., Tensor]:
    """Load a program written by :func:`export_tracker`; call it as ``program(image, query_points, query_frames)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: exported tracker not found")
    return torch.export.load(str(p)).module()
