"""ED -> ES registration pairs for AdaCS (``METHODS.md`` §3): one datalist over three layouts, loaders, inference input.

Layouts (:func:`detect_pair_layout` tells them apart; real downloads load unchanged):

* ``"acdc"`` — the ACDC cine-MRI layout (:mod:`common.data.acdc`, official ``training/``/``testing/`` folders or a
  flat folder of ``patientNNN``): **one pair per short-axis slice** whose ED and ES labels both contain myocardium
  (label 2), like the paper's slice-by-slice pairs. Each slice pair is cropped to ``spatial_size`` (128x128) around
  the centroid of the ED myocardium of that slice, at the native pixel size (the paper's centre crop); parts of the
  window outside the image are filled with the image minimum.
* ``"camus"`` — the CAMUS echo layout (:mod:`common.data.camus`, either release): one pair per patient and view
  (ED -> ES), images and masks **resized** to ``spatial_size`` (bilinear with antialiasing; masks resized as floats
  and thresholded at 0.5), myocardium = label 2.
* ``"pairs"`` — this repository's registration-pair layout (:mod:`common.data.registration`, synthetic pairs with
  ``lost`` maps): used as is when already ``spatial_size``, else resized like CAMUS; the ``lost`` map is carried.
* ``"volumes"`` — the 3D layout of real 3D echo datasets (:func:`common.data.registration.volume_pairs_datalist`:
  ``caseNNN/caseNNN_ED.nii.gz``, ``_ES``, ``_ED_gt``, ``_ES_gt``, optional ``_lost``): one pair per case, 3D only,
  myocardium = label 2.

3D (``spatial_dims=3``, a three-entry ``spatial_size``): every pair is a whole volume resized to ``spatial_size``
(trilinear; masks resized as floats and thresholded at 0.5), as the AdaCS supplementary resizes its 3D echo
volumes; ACDC then gives **one pair per patient** (the whole short-axis stack of ED and ES, not one slice).

Every image is min-max normalised to [0, 1] after cropping/resizing. :class:`LoadRegistrationPaird` turns a datalist
entry into ``image`` ``(2, H, W)`` (``(2, X, Y, Z)`` in 3D; channel 0 source = ED, channel 1 target = ES),
``label`` ``(2, H, W)`` (binary myocardium of source and target) and, for the ``pairs`` and ``volumes`` layouts,
``lost`` ``(1, H, W)``. Arrays keep the reader's axis
order (NIfTI ``(X, Y)``, CAMUS ``(H, W)`` apex at the top); displacements live in that order.

Splits (patient level): ACDC official folders: ``testing/`` is the test set and ``training/`` is split 80:20 into
train/val (the paper's 80/20/50 patients); flat ACDC folders: 80:20:50 of all patients; CAMUS: the CAMUS reader's
rules with 20 % val and 20 % test (the paper's 300/100/100); pairs and volumes: 60:20:20 of the pairs (the
supplementary's 60/19/20 3D echo cases). All seeded.

Inference input (:func:`inference_pairs`, :class:`LoadInferencePaird`): one source/target pair of 2D images (NIfTI,
MetaImage, DICOM or PNG) or a folder of pairs named ``<name>_source.<ext>`` / ``<name>_target.<ext>`` with an
optional ``<name>_source_mask.<ext>`` (or ``_source_myo``) myocardium mask; for a 3D model also 3D volumes: an
``<case>_ED`` / ``<case>_ES`` pair (optional ``<case>_ED_gt`` labels) or a folder of such case folders. Images
are min-max normalised and resized to ``spatial_size`` for the network; the writer maps the displacement back onto
the input grid.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Transform

from common.data.acdc import acdc_datalist, find_acdc_patients
from common.data.camus import camus_datalist, find_camus_patients, load_echo_frame
from common.data.cases import FailureRecorder, build_cases
from common.data.io import DataError, check_finite, read_image
from common.data.registration import registration_pairs_datalist, volume_pairs_datalist
from common.data.splits import resolve_split

__all__ = [
    "PAIR_LAYOUTS",
    "MYO_LABELS",
    "IMAGE_SUFFIXES",
    "detect_pair_layout",
    "pair_datalist",
    "min_max_normalise",
    "crop_around",
    "resize_2d",
    "resize_nd",
    "read_pair_image",
    "LoadRegistrationPaird",
    "inference_pairs",
    "LoadInferencePaird",
]

PAIR_LAYOUTS = ("acdc", "camus", "pairs", "volumes")
MYO_LABELS = {"acdc": 2, "camus": 2, "pairs": 1, "volumes": 2}
LAYOUTS_3D_ONLY = ("volumes",)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
ACDC_OFFICIAL_FRACTIONS = (80, 20)  # train/val of the 100 training patients (paper: 80/20, test = testing/)
ACDC_FLAT_FRACTIONS = (80, 20, 50)  # the paper's proportions when the folder has no official split
PAIRS_FRACTIONS = (0.6, 0.2, 0.2)
CAMUS_VAL_TEST = (0.2, 0.2)  # paper: 300/100/100 of 500 patients


# --------------------------------------------------------------------------------------------------- layouts
def _dataset_root(root: str | Path) -> Path:
    """The folder itself, or its ``CAMUS_public`` subfolder (how the CAMUS NIfTI release unpacks)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    return root / "CAMUS_public" if (root / "CAMUS_public").is_dir() else root


def detect_pair_layout(root: str | Path) -> str:
    """``"acdc"``, ``"camus"``, ``"pairs"`` or ``"volumes"`` for a dataset folder; ``DataError`` naming the folder
    otherwise."""
    root = _dataset_root(root)
    # any source image of the pair layout decides it; an incomplete pair is then reported by the datalist
    if any((root / "pairs").glob("*_source.nii*")) or any(root.glob("pair*_source.nii*")):
        return "pairs"
    # a case folder holding <case>_ED.nii[.gz] (ACDC names its frames patientNNN_frameNN, CAMUS <patient>_<view>_ED)
    if any(d.is_dir() and any(d.glob(f"{d.name}_ED.nii*")) for d in root.iterdir()):
        return "volumes"
    # ACDC and CAMUS both name folders patientNNN...: the config files inside tell them apart
    for finder, layout, marker in ((find_acdc_patients, "acdc", "Info.cfg"), (find_camus_patients, "camus", None)):
        try:
            found = finder(root)
        except (DataError, FileNotFoundError):
            continue
        dirs = [d for v in found.values() for d in v] if isinstance(found, dict) else [p for _, p, _ in found]
        if not dirs:
            continue
        first = dirs[0]
        if marker is not None and (first / marker).is_file():
            return layout
        if marker is None and any(first.glob("Info_*.cfg")):
            return layout
    raise DataError(
        f"{root}: not a registration dataset; expected the ACDC layout (patientNNN/Info.cfg), the CAMUS layout "
        f"(patientNNNN/Info_2CH.cfg), registration pairs (pairs/pairNNNN_source.nii.gz) or 3D volume pairs "
        f"(caseNNN/caseNNN_ED.nii.gz)"
    )


def _fractions(default: Sequence[float], val_fraction: float | None, test_fraction: float | None) -> list[float]:
    """(train, val, test) fractions: the layout's default, with the val/test fractions replaced where given."""
    if val_fraction is None and test_fraction is None:
        return [float(f) for f in default]  # unchanged, so default splits stay exactly as before
    total = float(sum(default))
    val = float(default[1]) / total if val_fraction is None else float(val_fraction)
    test = (float(default[2]) / total if len(default) > 2 else 0.0) if test_fraction is None else float(test_fraction)
    if val < 0 or test < 0 or val + test > 1:
        raise ValueError(f"invalid split fractions val_fraction={val_fraction}, test_fraction={test_fraction}")
    return [1.0 - val - test, val, test]


def _acdc_entries(root: Path, split: str | None, seed: int, slices: str, val_fraction: float | None = None,
                  test_fraction: float | None = None, ledger: FailureRecorder | None = None,
                  spatial_dims: int = 2) -> list[dict]:
    found = find_acdc_patients(root)
    if "all" in found:
        fractions = _fractions(ACDC_FLAT_FRACTIONS, val_fraction, test_fraction)
    else:  # official folders: testing/ is the test set, the fractions split training/ into train/val
        fractions = _fractions((*ACDC_OFFICIAL_FRACTIONS, 0), val_fraction, None if val_fraction is None else 0.0)[:2]

    def slice_pairs(p: dict) -> list[dict]:
        # the labels are read here to find the slices with myocardium: an unreadable label is this patient's failure
        lab_ed = read_image(p["label_ed"]).array
        lab_es = read_image(p["label_es"]).array
        if lab_ed.ndim == 2:
            lab_ed, lab_es = lab_ed[..., None], lab_es[..., None]
        myo = MYO_LABELS["acdc"]
        if spatial_dims == 3:  # the whole short-axis stack of ED and ES is one pair
            if not ((lab_ed == myo).any() and (lab_es == myo).any()):
                return []
            return [{"name": p["patient"], "layout": "acdc", "patient": p["patient"], "source": p["image_ed"],
                     "target": p["image_es"], "source_label": p["label_ed"], "target_label": p["label_es"],
                     "slice": -1}]
        valid = [z for z in range(lab_ed.shape[2]) if (lab_ed[..., z] == myo).any() and (lab_es[..., z] == myo).any()]
        if slices == "mid" and valid:
            valid = [valid[len(valid) // 2]]
        return [{"name": f"{p['patient']}_slice{z:02d}", "layout": "acdc", "patient": p["patient"],
                 "source": p["image_ed"], "target": p["image_es"], "source_label": p["label_ed"],
                 "target_label": p["label_es"], "slice": z} for z in valid]

    patients = acdc_datalist(root, split=split, fractions=fractions, seed=seed, ledger=ledger)
    per_patient = build_cases(patients, slice_pairs, lambda p: Path(p["image_ed"]).parent, ledger, root)
    return [e for entries in per_patient for e in entries]


def _camus_entries(root: Path, split: str | None, seed: int, val_fraction: float | None = None,
                   test_fraction: float | None = None, ledger: FailureRecorder | None = None) -> list[dict]:
    _, val, test = _fractions((1 - sum(CAMUS_VAL_TEST), *CAMUS_VAL_TEST), val_fraction, test_fraction)
    out = []
    for e in camus_datalist(root, split=split, val_fraction=val, test_fraction=test, seed=seed, sequences=False,
                            ledger=ledger):
        out.append({"name": f"{e['patient'].replace('/', '_')}_{e['view']}", "layout": "camus",
                    "patient": e["patient"], "source": e["image_ed"], "target": e["image_es"],
                    "source_label": e["label_ed"], "target_label": e["label_es"], "slice": -1})
    return out


def _pairs_entries(root: Path, split: str | None, seed: int, val_fraction: float | None = None,
                   test_fraction: float | None = None, ledger: FailureRecorder | None = None) -> list[dict]:
    return [{"name": e["pair"], "layout": "pairs", "patient": e["pair"], "source": e["source"], "target": e["target"],
             "source_label": e["source_myo"], "target_label": e["target_myo"], "lost": e["lost"], "slice": -1}
            for e in registration_pairs_datalist(root, split=split, seed=seed,
                                                 fractions=_fractions(PAIRS_FRACTIONS, val_fraction, test_fraction),
                                                 ledger=ledger)]


def _volumes_entries(root: Path, split: str | None, seed: int, val_fraction: float | None = None,
                     test_fraction: float | None = None, ledger: FailureRecorder | None = None) -> list[dict]:
    out = []
    for e in volume_pairs_datalist(root, split=split, seed=seed, ledger=ledger,
                                   fractions=_fractions(PAIRS_FRACTIONS, val_fraction, test_fraction)):
        entry = {"name": e["case"], "layout": "volumes", "patient": e["case"], "source": e["source"],
                 "target": e["target"], "source_label": e["source_label"], "target_label": e["target_label"],
                 "slice": -1}
        if "lost" in e:
            entry["lost"] = e["lost"]
        out.append(entry)
    return out


def pair_datalist(root: str | Path, split: str | None = None, layout: str = "auto", seed: int = 0,
                  slices: str = "all", val_fraction: float | None = None,
                  test_fraction: float | None = None, ledger: FailureRecorder | None = None,
                  spatial_dims: int = 2) -> list[dict]:
    """MONAI datalist of ED -> ES pairs of a dataset folder (see the module docstring for layouts and splits).

    Args:
        root: dataset folder (ACDC, CAMUS or registration-pair layout).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``/``None`` (every pair, no split).
        layout: one of :data:`PAIR_LAYOUTS` or ``"auto"``.
        seed: split seed.
        slices: ACDC only — ``"all"`` slices with myocardium in both frames (default) or the ``"mid"`` one.
        val_fraction, test_fraction: patient fractions of the validation and test subsets; None keeps the layout's
            default (module docstring). Official ACDC folders keep ``testing/`` as the test set (``test_fraction``
            is not used) and split ``training/`` by ``val_fraction``.
        ledger: evaluation's :class:`common.engines.screening.BatchLedger`: a patient (or pair) of the subset whose
            files cannot be read is recorded there (stage ``datalist``) and left out; without it (training) the first
            such case stops with an error naming the file (:func:`common.data.cases.build_cases`).
        spatial_dims: 2 (slices / 2D images) or 3 (whole volumes: ACDC's ED/ES stacks, the ``volumes`` layout).

    Returns:
        ``[{name, layout, patient, source, target, source_label, target_label, slice[, lost]}]``; ``slice`` is the
        ACDC slice index (-1 for 2D layouts and for volumes). Raises ``DataError`` when the split holds no pair.
    """
    split = resolve_split(split)
    root = _dataset_root(root)
    layout = detect_pair_layout(root) if layout == "auto" else layout
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {PAIR_LAYOUTS}, got {layout!r}")
    if slices not in ("all", "mid"):
        raise ValueError(f"slices must be 'all' or 'mid', got {slices!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if layout in LAYOUTS_3D_ONLY and spatial_dims != 3:
        raise DataError(f"{root}: the {layout!r} layout holds 3D volumes; register them with spatial_dims 3 (a "
                        "three-entry spatial_size, e.g. --spatial_size [64,64,64])")
    if layout == "camus" and spatial_dims == 3:
        raise DataError(f"{root}: the CAMUS layout holds 2D frames; register them with a two-entry spatial_size")
    if layout == "acdc":
        out = _acdc_entries(root, split, seed, slices, val_fraction, test_fraction, ledger, spatial_dims)
    elif layout == "camus":
        out = _camus_entries(root, split, seed, val_fraction, test_fraction, ledger)
    elif layout == "volumes":
        out = _volumes_entries(root, split, seed, val_fraction, test_fraction, ledger)
    else:
        out = _pairs_entries(root, split, seed, val_fraction, test_fraction, ledger)
    if not out:
        raise DataError(f"{root}: no {layout} pairs with myocardium in split {split!r}")
    return out


# -------------------------------------------------------------------------------------------- array helpers
def min_max_normalise(image: np.ndarray, name: str | Path = "image") -> np.ndarray:
    """``(x - min) / (max - min)`` as float32; a constant or non-finite image is a ``DataError`` naming ``name``."""
    arr = np.asarray(image, dtype=np.float32)
    check_finite(arr, name)
    lo, hi = float(arr.min()), float(arr.max())
    if not hi > lo:
        raise DataError(f"{name}: image is constant (all pixels {lo}); it cannot be min-max normalised")
    return (arr - lo) / (hi - lo)


def crop_around(array: np.ndarray, center: Sequence[float], size: Sequence[int],
                fill: float) -> tuple[np.ndarray, tuple]:
    """A ``size`` window of a 2D ``array`` centred on ``center`` (pixels), ``fill`` outside; also the window start."""
    start = tuple(int(round(c)) - s // 2 for c, s in zip(center, size))
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for a, (st, s, n) in enumerate(zip(start, size, array.shape)):
        lo, hi = max(st, 0), min(st + s, n)
        if hi <= lo:
            raise DataError(f"crop window {start} + {tuple(size)} misses the image of shape {array.shape} (axis {a})")
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[tuple(dst)] = array[tuple(src)]
    return out, start


def resize_2d(array: np.ndarray, size: Sequence[int], mask: bool = False) -> np.ndarray:
    """Resize a 2D array: bilinear (antialiased when shrinking, ``align_corners=False``); masks thresholded at 0.5."""
    size = tuple(int(s) for s in size)
    if tuple(array.shape) == size:
        return np.asarray(array, dtype=np.float32)
    t = torch.as_tensor(np.asarray(array, dtype=np.float32))[None, None]
    shrink = any(s < n for s, n in zip(size, array.shape))
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)[0, 0].numpy()
    return (out >= 0.5).astype(np.float32) if mask else out


# ------------------------------------------------------------------------------------------------ readers
def read_pair_image(path: str | Path, spatial_dims: int = 2) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read one image of a pair: ``(array float32, 4x4 RAS affine, spacing)``.

    Every format (NIfTI, MetaImage, DICOM with rescale slope/intercept and its patient geometry, PNG/JPEG/TIFF as
    grayscale) comes through :func:`common.data.io.read_image` in one index order ``(x, y[, z])`` with its affine.
    ``spatial_dims`` 2 (default): one 2D frame, a trailing singleton axis is dropped. ``spatial_dims`` 3: one 3D
    volume with more than one slice (a 2D image cannot feed a 3D model). Anything else, or NaN/Inf pixels, raises
    ``DataError`` naming the file.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    img = read_image(path)
    arr = np.asarray(img.array)
    if spatial_dims == 3:
        if arr.ndim != 3 or min(arr.shape) < 2:
            raise DataError(f"{path}: expected one 3D volume for a 3D model (three-entry spatial_size), got an array "
                            f"of shape {tuple(arr.shape)} (register 2D images with a two-entry spatial_size)")
    else:
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise DataError(f"{path}: expected one 2D image, got an array of shape {tuple(arr.shape)} (register 3D "
                            "volumes with a three-entry spatial_size, sequences frame by frame)")
    arr = arr.astype(np.float32)
    check_finite(arr, path)
    spacing = tuple(float(img.spacing[k]) for k in range(spatial_dims))
    return arr, np.asarray(img.affine, dtype=np.float64), spacing


def _shift_affine(affine: np.ndarray, start: Sequence[float], scale: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Affine of a window starting at voxel ``start`` whose pixels are ``scale`` times the original ones (2 or 3
    axes). A grid resized with ``align_corners=False`` keeps the field of view, so its first voxel centre lies at
    ``(scale - 1) / 2`` original voxels: the 3D resize passes that as ``start``."""
    a = np.asarray(affine, dtype=np.float64).copy()
    for k in range(len(start)):
        a[:3, 3] = a[:3, 3] + a[:3, k] * start[k]
    for k in range(len(scale)):
        a[:3, k] *= scale[k]
    return a


def resize_nd(array: np.ndarray, size: Sequence[int], mask: bool = False) -> np.ndarray:
    """Resize a 2D or 3D array (:func:`resize_2d` in 2D; trilinear with ``align_corners=False`` in 3D, without
    antialiasing, which PyTorch offers only in 2D); masks thresholded at 0.5."""
    if np.ndim(array) == 2:
        return resize_2d(array, size, mask)
    size = tuple(int(s) for s in size)
    if tuple(array.shape) == size:
        return np.asarray(array, dtype=np.float32)
    t = torch.as_tensor(np.asarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
    return (out >= 0.5).astype(np.float32) if mask else out


# ---------------------------------------------------------------------------------------------- transforms
@functools.lru_cache(maxsize=8)
def _read_volume(path: str):
    """One read per ACDC volume while its slices are loaded one after the other (the arrays are never modified)."""
    img = read_image(path)
    img.array.setflags(write=False)
    return img


class LoadRegistrationPaird(Transform):
    """Datalist entry (:func:`pair_datalist`) -> ``{image (2, H, W), label (2, H, W)[, lost (1, H, W)], name}``
    (``(2, X, Y, Z)``, ``(1, X, Y, Z)`` with a three-entry ``spatial_size``).

    ``image`` is a ``MetaTensor`` (channel 0 source, channel 1 target, each min-max normalised) whose meta holds
    ``filename_or_obj`` (the pair name), ``spacing`` of the output grid and the affine; ``label`` stacks the binary
    myocardium masks of source and target. See the module docstring for the per-layout crop/resize.

    In 3D the whole volumes are resized to ``spatial_size`` and ``image.meta`` also holds ``original_shape``,
    ``original_affine`` and ``original_spacing`` of the source file, so evaluation can map the displacement back
    onto the input grid.

    Args:
        spatial_size: output size ``(H, W)`` (2D) or ``(X, Y, Z)`` (3D); default ``(128, 128)``.
    """

    def __init__(self, spatial_size: Sequence[int] = (128, 128)) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if len(self.spatial_size) not in (2, 3) or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be two (2D) or three (3D) positive ints, got {spatial_size}")

    def _read(self, entry: Mapping, key: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
        path = entry[key]
        if entry["layout"] == "camus":
            arr, (sr, sc) = load_echo_frame(path)
            return arr.astype(np.float32), np.diag([sr, sc, 1.0, 1.0]), (sr, sc)
        img = _read_volume(str(path))
        arr = img.array
        if len(self.spatial_size) == 3:
            if arr.ndim != 3:
                raise DataError(f"{path}: expected a 3D volume for a three-entry spatial_size, got shape {arr.shape}")
            affine = img.affine if img.affine is not None else np.eye(4)
            return arr.astype(np.float32), affine, tuple(float(v) for v in img.spacing[:3])
        if entry["layout"] in LAYOUTS_3D_ONLY or int(entry.get("slice", -1)) < 0 and entry["layout"] == "acdc":
            raise DataError(f"{path}: pair {entry.get('name')} is a whole volume; use a three-entry spatial_size")
        if entry["layout"] == "acdc" and arr.ndim == 3:
            z = int(entry["slice"])
            if not 0 <= z < arr.shape[2]:
                raise DataError(f"{path}: slice {z} out of range for shape {arr.shape}")
            arr = arr[..., z]
        if arr.ndim != 2:
            raise DataError(f"{path}: expected a 2D slice, got shape {arr.shape}")
        affine = img.affine if img.affine is not None else np.eye(4)
        return arr.astype(np.float32), affine, (float(img.spacing[0]), float(img.spacing[1]))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        e = dict(data)
        for k in ("layout", "source", "target", "source_label", "target_label", "name"):
            if k not in e:
                raise KeyError(f"registration pair entry {e.get('name', e)} has no {k!r}")
        layout = e["layout"]
        myo = MYO_LABELS[layout]
        src, affine, spacing = self._read(e, "source")
        tgt, _, _ = self._read(e, "target")
        src_lab, _, _ = self._read(e, "source_label")
        tgt_lab, _, _ = self._read(e, "target_label")
        arrays = {"source": src, "target": tgt, "source_label": (np.rint(src_lab) == myo).astype(np.float32),
                  "target_label": (np.rint(tgt_lab) == myo).astype(np.float32)}
        if layout in ("pairs", "volumes") and e.get("lost"):
            arrays["lost"] = (read_image(e["lost"]).array > 0).astype(np.float32)
        shapes = {k: v.shape for k, v in arrays.items()}
        if len(set(shapes.values())) != 1:
            raise DataError(f"pair {e['name']}: source/target/labels differ in shape {shapes}")
        size = self.spatial_size
        original = {}
        if len(size) == 3:
            scale = tuple(n / s for n, s in zip(src.shape, size))
            out = {k: resize_nd(v, size, mask=k not in ("source", "target")) for k, v in arrays.items()}
            original = {"original_shape": np.asarray(src.shape), "original_affine": np.asarray(affine, np.float64),
                        "original_spacing": np.asarray(spacing, dtype=np.float64)}
            affine = _shift_affine(affine, tuple((f - 1) / 2 for f in scale), scale)
            spacing = tuple(sp * f for sp, f in zip(spacing, scale))
        elif layout == "acdc":
            ys, xs = np.nonzero(arrays["source_label"])
            if ys.size == 0:
                raise DataError(f"{e['source_label']}: slice {e['slice']} has no myocardium to centre the crop on")
            center = (float(ys.mean()), float(xs.mean()))
            out = {}
            for k, v in arrays.items():
                fill = float(v.min()) if k in ("source", "target") else 0.0
                out[k], start = crop_around(v, center, size, fill)
            affine = _shift_affine(affine, start)
        else:
            scale = tuple(n / s for n, s in zip(src.shape, size))
            out = {k: resize_2d(v, size, mask=k not in ("source", "target")) for k, v in arrays.items()}
            affine = _shift_affine(affine, (0.0, 0.0), scale)
            spacing = tuple(sp * f for sp, f in zip(spacing, scale))
        image = np.stack([min_max_normalise(out["source"], e["source"]), min_max_normalise(out["target"], e["target"])])
        meta = {"filename_or_obj": e["name"], "spacing": np.asarray(spacing, dtype=np.float64),
                "original_channel_dim": 0, **original}
        result = {k: v for k, v in e.items() if k not in ("lost",)}
        result["image"] = MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine), meta=meta)
        result["label"] = torch.from_numpy(np.stack([out["source_label"], out["target_label"]]))
        if "lost" in out:
            result["lost"] = torch.from_numpy(out["lost"][None])
        result["spacing"] = torch.as_tensor(spacing, dtype=torch.float64)
        return result


# --------------------------------------------------------------------------------------------- inference
_SOURCE_RE = re.compile(r"^(?P<name>.+)_source(?P<ext>\.[A-Za-z.]+)$")
# the 3D volume-pair layout's frame names: <case>_ED.<ext> (source), <case>_ES (target), <case>_ED_gt (source labels)
_ED_RE = re.compile(r"^(?P<name>.+)_ED(?P<ext>\.[A-Za-z.]+)$")


def _image_ext(name: str) -> str | None:
    low = name.lower()
    return next((s for s in IMAGE_SUFFIXES if low.endswith(s)), None)


def _sibling(source: Path, role: str, pattern: re.Pattern = _SOURCE_RE) -> Path | None:
    """``<name>_<role>.<any image ext>`` beside ``<name>_source.<ext>`` (``pattern`` :data:`_ED_RE`:
    ``<name>_ED.<ext>``), if there is one."""
    m = pattern.match(source.name)
    if not m:
        return None
    for ext in (m["ext"], *IMAGE_SUFFIXES):
        cand = source.with_name(f"{m['name']}_{role}{ext}")
        if cand.is_file():
            return cand
    return None


def _case_pairs(folder: Path, ledger: Any = None) -> list[dict]:
    """Pairs of a folder of 3D volume-pair cases (``<case>/<case>_ED.<ext>``, ``_ES``, optional ``_ED_gt``)."""
    out = []
    for d in sorted(c for c in folder.iterdir() if c.is_dir()):
        src = next((f for f in sorted(d.iterdir()) if f.name.startswith(f"{d.name}_ED.") and f.is_file()
                    and _image_ext(f.name) is not None), None)
        if src is None:
            continue
        tgt = _sibling(src, "ES", _ED_RE)
        if tgt is None:
            missing = f"{src}: no matching {d.name}_ES image beside it"
            if ledger is None:
                raise FileNotFoundError(missing)
            ledger.fail(str(src), missing, "datalist")
            continue
        mask = _sibling(src, "ED_gt", _ED_RE)
        out.append({"name": d.name, "source": str(src), "target": str(tgt), "source_mask": str(mask) if mask else ""})
    return out


def inference_pairs(input_path: str | Path, target_path: str | Path | None = None,
                    source_mask_path: str | Path | None = None, ledger: Any = None) -> list[dict]:
    """Pairs to register: ``[{name, source, target, source_mask}]`` (``source_mask`` is ``""`` when absent).

    ``input_path`` is either a folder (or a folder holding ``pairs/``) of ``<name>_source.<ext>`` files with their
    ``<name>_target.<ext>`` (and optionally ``<name>_source_mask.<ext>`` or ``<name>_source_myo.<ext>``), or one
    source image; its target is ``target_path`` or the ``_target`` sibling of a ``*_source.*`` file, its mask
    ``source_mask_path`` or the ``_source_mask``/``_source_myo`` sibling. The 3D volume-pair layout is read too: a
    folder without ``*_source.*`` files whose case folders hold ``<case>_ED.<ext>`` (source), ``<case>_ES.<ext>``
    (target) and optionally ``<case>_ED_gt.<ext>`` (source labels), or one ``<case>_ED.<ext>`` file with those
    siblings. Missing files raise errors naming them; with ``ledger`` (a
    :class:`common.engines.screening.BatchLedger`) a folder's source without its target is recorded there (stage
    ``datalist``) and left out instead.
    """
    p = Path(input_path)
    if not p.exists():
        raise FileNotFoundError(f"input_path {str(p)!r} does not exist")
    if p.is_dir():
        if target_path or source_mask_path:
            raise ValueError("target_path/source_mask_path go with a single source image, not with a folder")
        folder = p / "pairs" if (p / "pairs").is_dir() else p
        out = []
        for src in sorted(folder.iterdir()):
            m = _SOURCE_RE.match(src.name)
            if not m or _image_ext(src.name) is None or not src.is_file():
                continue
            tgt = _sibling(src, "target")
            if tgt is None:
                missing = f"{src}: no matching {m['name']}_target{m['ext']} beside it"
                if ledger is None:
                    raise FileNotFoundError(missing)
                ledger.fail(str(src), missing, "datalist")
                continue
            mask = _sibling(src, "source_mask") or _sibling(src, "source_myo")
            out.append({"name": m["name"], "source": str(src), "target": str(tgt),
                        "source_mask": str(mask) if mask else ""})
        if not out and not any(_SOURCE_RE.match(f.name) for f in folder.iterdir()):
            out = _case_pairs(p, ledger)
        if not out:
            raise DataError(f"{folder}: no image pairs found (expected <name>_source.<ext> and <name>_target.<ext>, "
                            f"or case folders <case>/<case>_ED.<ext> and <case>_ES.<ext>; ext one of "
                            f"{', '.join(IMAGE_SUFFIXES)})")
        return out
    if _image_ext(p.name) is None:
        raise DataError(f"{p}: unsupported image format (expected one of {', '.join(IMAGE_SUFFIXES)})")
    tgt = Path(target_path) if target_path else (_sibling(p, "target") or _sibling(p, "ES", _ED_RE))
    if tgt is None:
        raise ValueError(f"{p}: give target_path (the image to register to), or name the pair *_source / *_target "
                         "(or *_ED / *_ES)")
    if not tgt.is_file():
        raise FileNotFoundError(f"target image {tgt} not found")
    mask = Path(source_mask_path) if source_mask_path else (_sibling(p, "source_mask") or _sibling(p, "source_myo")
                                                            or _sibling(p, "ED_gt", _ED_RE))
    if mask is not None and not mask.is_file():
        raise FileNotFoundError(f"source mask {mask} not found")
    m = _SOURCE_RE.match(p.name) or _ED_RE.match(p.name)
    ext = _image_ext(p.name) or ""
    name = m["name"] if m else p.name[: len(p.name) - len(ext)]
    return [{"name": name, "source": str(p), "target": str(tgt), "source_mask": str(mask) if mask else ""}]


class LoadInferencePaird(Transform):
    """Inference entry -> ``{image (2, h, w), name, source, target, source_mask}`` for the displacement network
    (``(2, x, y, z)`` for a 3D model).

    Source and target are read with :func:`read_pair_image`, must have one shape, are min-max normalised and resized
    to ``spatial_size`` (:func:`resize_nd`; ``None`` keeps the input size, which must then suit the network) -- in
    3D resized first and then normalised, exactly as :class:`LoadRegistrationPaird` prepares training and evaluation
    volumes. The affine of the target (the grid of every output) and the input shape go into ``image.meta``.

    Args:
        spatial_size: network input size, two entries (2D) or three (3D: the inputs must be volumes).
        spatial_dims: 2 or 3; default the length of ``spatial_size`` (2 when it is ``None``).
    """

    def __init__(self, spatial_size: Sequence[int] | None = (128, 128), spatial_dims: int | None = None) -> None:
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        dims = spatial_dims if spatial_dims is not None else len(self.spatial_size or (0, 0))
        if dims not in (2, 3) or (self.spatial_size is not None and len(self.spatial_size) != dims):
            raise ValueError(f"spatial_size {spatial_size} and spatial_dims {spatial_dims} must agree on 2 or 3 dims")
        self.spatial_dims = int(dims)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        src, _, _ = read_pair_image(d["source"], self.spatial_dims)
        tgt, affine, spacing = read_pair_image(d["target"], self.spatial_dims)
        if src.shape != tgt.shape:
            raise DataError(f"{d['source']} has shape {src.shape} but {d['target']} has {tgt.shape}; a pair must "
                            "share one grid")
        size = self.spatial_size or src.shape
        if self.spatial_dims == 3:
            # as LoadRegistrationPaird (training, evaluation): resize, then normalise, so the network sees the
            # intensities it was trained on (a resize changes the min/max of speckle volumes)
            image = np.stack([min_max_normalise(resize_nd(src, size), d["source"]),
                              min_max_normalise(resize_nd(tgt, size), d["target"])])
        else:  # 2D normalises first, as it always has (its outputs stay as they were)
            image = np.stack([resize_nd(min_max_normalise(src, d["source"]), size),
                              resize_nd(min_max_normalise(tgt, d["target"]), size)])
        meta = {"filename_or_obj": d["name"], "original_shape": np.asarray(src.shape),
                "original_affine": affine, "spacing": np.asarray(spacing)}
        d["image"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), meta=meta)
        return d
