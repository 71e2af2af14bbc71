"""Readers for the abdominal CT/MRI layouts: BTCV (NIfTI) and CHAOS T2-SPIR MRI (DICOM series + PNG ground truth).

BTCV: ``img/img0001.nii.gz`` + ``label/label0001.nii.gz`` (found in the given folder or its ``Training/`` or
``RawData/Training/``), codes 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver,
7 stomach, 8 aorta, 9 IVC, 10 portal/splenic veins, 11 pancreas, 12/13 right/left adrenal.

CHAOS: ``MR/<id>/T2SPIR/DICOM_anon/*.dcm`` + ``MR/<id>/T2SPIR/Ground/*.png`` (found in the given folder or its
``Train_Sets/`` or ``CHAOS_Train_Sets/Train_Sets/``); PNG values 63 liver, 126 right kidney, 189 left kidney,
252 spleen (the challenge's ranges 55-70, 110-135, 175-200, 240-255 are accepted). Slices are ordered by their
position along the slice normal, not by file name; each PNG belongs to the DICOM file of the same stem.

Both map to one contiguous id set so CT and MR train one network: 0 background, then ``ABDOMEN_STRUCTURES`` order
(1 liver, 2 right kidney, 3 left kidney, 4 spleen). CHAOS cases are converted once to NIfTI in a cache folder so
MONAI's ``LoadImaged`` can read them; the dataset folder is never written to.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.acdc import nifti_header, select_split
from common.data.cases import FailureRecorder, build_cases
from common.data.io import DataError, ImageData, read_image, write_nifti

__all__ = [
    "BTCV_CODES",
    "CHAOS_CODES",
    "CHAOS_RANGES",
    "ABDOMEN_STRUCTURES",
    "DICOM_REQUIRED_TAGS",
    "btcv_label_mapping",
    "remap_btcv_labels",
    "remap_chaos_labels",
    "read_dicom_series",
    "load_chaos_case",
    "find_btcv_cases",
    "find_chaos_cases",
    "btcv_datalist",
    "chaos_datalist",
    "ABDOMEN_MODALITIES",
    "abdomen_datalist",
    "abdomen_label_mapping",
]

BTCV_CODES = {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5, "liver": 6,
              "stomach": 7, "aorta": 8, "ivc": 9, "portal_splenic_veins": 10, "pancreas": 11, "right_adrenal": 12,
              "left_adrenal": 13}
CHAOS_CODES = {"liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252}
CHAOS_RANGES = {"liver": (55, 70), "right_kidney": (110, 135), "left_kidney": (175, 200), "spleen": (240, 255)}
ABDOMEN_STRUCTURES = ("liver", "right_kidney", "left_kidney", "spleen")
ABDOMEN_MODALITIES = ("ct", "mr")
"""Modality names of the abdominal task: ``ct`` = BTCV, ``mr`` = CHAOS T2-SPIR (the MM-WHS task's names)."""
DICOM_REQUIRED_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                       "PixelData")


def _check_structures(structures: Sequence[str], known: dict) -> None:
    for s in structures:
        if s not in known:
            raise ValueError(f"unknown structure {s!r}; choose from {sorted(known)}")
    if len(set(structures)) != len(structures):
        raise ValueError(f"structures repeat: {list(structures)}")


def btcv_label_mapping(structures: Sequence[str] = ABDOMEN_STRUCTURES) -> tuple[list[int], list[int]]:
    """``(orig_codes, target_ids)`` over all 13 BTCV codes for MONAI ``MapLabelValued``; unlisted organs -> 0."""
    _check_structures(structures, BTCV_CODES)
    ids = {s: i + 1 for i, s in enumerate(structures)}
    return list(BTCV_CODES.values()), [ids.get(s, 0) for s in BTCV_CODES]


def remap_btcv_labels(array: np.ndarray, structures: Sequence[str] = ABDOMEN_STRUCTURES) -> np.ndarray:
    """BTCV codes -> contiguous uint8 ids (``structures`` 1..K in order, everything else 0), same shape."""
    a = np.rint(np.asarray(array)).astype(np.int64)
    out = np.zeros(a.shape, dtype=np.uint8)
    for code, tid in zip(*btcv_label_mapping(structures)):
        if tid:
            out[a == code] = tid
    return out


def remap_chaos_labels(array: np.ndarray, structures: Sequence[str] = ABDOMEN_STRUCTURES) -> np.ndarray:
    """CHAOS PNG grey values -> contiguous uint8 ids by the challenge's value ranges (others 0), same shape."""
    _check_structures(structures, CHAOS_CODES)
    a = np.asarray(array)
    out = np.zeros(a.shape, dtype=np.uint8)
    for i, s in enumerate(structures):
        lo, hi = CHAOS_RANGES[s]
        out[(a >= lo) & (a <= hi)] = i + 1
    return out


# ----------------------------------------------------------------------------------------------------------------
# DICOM


def _dicom_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: DICOM folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".dcm", ""))
    if not files:
        raise DataError(f"{folder}: no DICOM files (*.dcm)")
    return files


def read_dicom_series(folder: str | Path) -> ImageData:
    """Read one DICOM series into ``(X, Y, Z)`` float32 (columns, rows, slices) with rescale applied.

    Slices are sorted by ``ImagePositionPatient`` along the normal of ``ImageOrientationPatient`` (file names and
    instance numbers are not trusted); the slice spacing comes from the positions. ``affine`` is the RAS voxel ->
    world matrix; ``spacing`` is (column spacing, row spacing, slice spacing); ``meta["files"]`` lists the files in
    slice order. Raises ``DataError`` naming the file for unreadable files, a missing required tag
    (:data:`DICOM_REQUIRED_TAGS`), mixed series or geometry, and duplicate or uneven slice positions.
    """
    from common.data.loading import read_dicom

    folder = Path(folder)
    _dicom_files(folder)  # the CHAOS layout's own checks: the folder exists and holds *.dcm files
    # one DICOM series reader for the whole repository (common.data.loading): geometry order, checks, limits
    arr, aff, info = read_dicom(folder, require_geometry=True)
    if arr.ndim == 2:
        arr = arr[..., None]
    spacing = tuple(float(s) for s in np.linalg.norm(aff[:3, :3], axis=0))
    meta = {k: info[k] for k in ("files", "modality", "series_description")}
    return ImageData(arr.astype(np.float32), spacing, aff, meta)


def load_chaos_case(case_dir: str | Path,
                    structures: Sequence[str] = ABDOMEN_STRUCTURES) -> tuple[ImageData, ImageData]:
    """One CHAOS T2-SPIR case: ``(image (X, Y, Z) float32, label (X, Y, Z) uint8 contiguous ids)``, same geometry.

    ``case_dir`` is ``MR/<id>`` (or its ``T2SPIR`` folder). PNGs are matched to DICOM files by file stem; when the
    stems differ but the counts agree they are paired in file-name order (the challenge's convention).
    """
    case_dir = Path(case_dir)
    t2 = case_dir if case_dir.name == "T2SPIR" else case_dir / "T2SPIR"
    img = read_dicom_series(t2 / "DICOM_anon")
    ground = t2 / "Ground"
    if not ground.is_dir():
        raise FileNotFoundError(f"{ground}: CHAOS ground-truth folder not found")
    pngs = sorted(p for p in ground.iterdir() if p.suffix.lower() == ".png")
    if not pngs:
        raise DataError(f"{ground}: no ground-truth PNG files")
    by_stem = {p.stem: p for p in pngs}
    files = [Path(f) for f in img.meta["files"]]
    if all(f.stem in by_stem for f in files):
        matched = [by_stem[f.stem] for f in files]
    elif len(pngs) == len(files):
        name_order = sorted(files, key=lambda f: f.name)
        pair = dict(zip(name_order, pngs))
        matched = [pair[f] for f in files]
    else:
        raise DataError(f"{ground}: {len(pngs)} PNG files for {len(files)} DICOM slices and stems do not match")
    planes = []
    for f, p in zip(files, matched):
        a = read_image(p).array  # index order (W, H), like the DICOM slices: no transpose
        if a.ndim != 2 or a.shape != img.array.shape[:2]:
            raise DataError(f"{p}: mask of {a.shape[0]}x{a.shape[1]} (W x H) does not match DICOM slice {f.name} "
                            f"({img.array.shape[0]}x{img.array.shape[1]})")
        planes.append(remap_chaos_labels(a, structures))
    lab = ImageData(np.stack(planes, -1), img.spacing, img.affine.copy(), {"files": [str(p) for p in matched]})
    return img, lab


# ----------------------------------------------------------------------------------------------------------------
# layouts

_BTCV_IMG = re.compile(r"^img(?P<id>\d+)\.nii(\.gz)?$")


def find_btcv_cases(root: str | Path) -> list[tuple[str, Path, Path]]:
    """``(name, image, label)`` of every BTCV training case, sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: BTCV folder not found")
    for base in (root, root / "Training", root / "RawData" / "Training", root / "Abdomen" / "RawData" / "Training"):
        if (base / "img").is_dir():
            break
    else:
        raise DataError(f"{root}: no BTCV img/ folder (looked in ., Training/, RawData/Training/)")
    out = []
    for p in sorted((base / "img").iterdir()):
        m = _BTCV_IMG.match(p.name)
        if not m:
            continue
        lab = base / "label" / p.name.replace("img", "label", 1)
        if not lab.is_file():
            raise FileNotFoundError(f"{lab}: label file not found for {p.name}")
        out.append((f"btcv_{m['id']}", p, lab))
    if not out:
        raise DataError(f"{base / 'img'}: no imgNNNN.nii.gz files")
    return out


def find_chaos_cases(root: str | Path) -> list[tuple[str, Path]]:
    """``(name, case_dir)`` of every CHAOS MR case with a T2SPIR series, sorted by numeric id."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: CHAOS folder not found")
    cands = [root / "MR", root / "Train_Sets" / "MR", root / "CHAOS_Train_Sets" / "Train_Sets" / "MR"]
    if root.name == "MR":
        cands.insert(0, root)
    mr = next((c for c in cands if c.is_dir()), None)
    if mr is None:
        raise DataError(f"{root}: no CHAOS MR/ folder (looked in ., Train_Sets/, CHAOS_Train_Sets/Train_Sets/)")
    cases = sorted((d for d in mr.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    if not cases:
        raise DataError(f"{mr}: no case folders (MR/<id>/T2SPIR)")
    for d in cases:
        for sub in ("DICOM_anon", "Ground"):
            if not (d / "T2SPIR" / sub).is_dir():
                raise FileNotFoundError(f"{d / 'T2SPIR' / sub}: folder not found")
    return [(f"chaos_{int(d.name)}", d) for d in cases]


def btcv_datalist(root: str | Path, split: str | None = None, fractions: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int = 0, verify: bool = False, ledger: FailureRecorder | None = None) -> list[dict]:
    """MONAI datalist ``[{image, label, patient, modality "ct", spacing}]`` of BTCV CT (labels keep BTCV codes on
    disk).

    Remap with :func:`remap_btcv_labels` or ``MapLabelValued`` fed by :func:`btcv_label_mapping`. The split is by
    case name, before any file is read; with ``ledger`` (evaluation) a case of the subset whose header cannot be read
    is recorded there and left out instead of raising (:func:`common.data.cases.build_cases`).
    """
    cases = find_btcv_cases(root)
    keep = {e["patient"] for e in select_split([{"patient": n} for n, _, _ in cases], split, fractions, seed)}

    def build(case: tuple[str, Path, Path]) -> dict:
        name, img, lab = case
        shape, spacing = nifti_header(img)
        lshape, _ = nifti_header(lab)
        if lshape[:3] != shape[:3]:
            raise DataError(f"{lab}: label shape {lshape} does not match image {img.name} shape {shape}")
        if verify:
            read_image(img)
            read_image(lab)
        return {"image": str(img), "label": str(lab), "patient": name, "modality": "ct",
                "spacing": [float(s) for s in spacing[:3]]}

    return build_cases([c for c in cases if c[0] in keep], build, lambda c: c[1], ledger, root)


def _default_cache(root: Path, structures: Sequence[str]) -> Path:
    key = hashlib.sha1(f"{root.resolve()}|{','.join(structures)}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "cardiac-bundles-chaos" / key


def _newest_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)


def chaos_datalist(root: str | Path, split: str | None = None, fractions: Sequence[float] = (0.7, 0.1, 0.2),
                   seed: int = 0, cache_dir: str | Path | None = None,
                   structures: Sequence[str] = ABDOMEN_STRUCTURES, ledger: FailureRecorder | None = None) -> list[dict]:
    """MONAI datalist ``[{image, label, patient, modality "mr", spacing, dicom_dir, ground_dir}]`` of CHAOS T2-SPIR.

    Each selected case is read (:func:`load_chaos_case`) and written as NIfTI (image float32, label uint8 with
    contiguous ids) into ``cache_dir`` (default: a per-root folder under the system temp dir); a cached case is
    reused while it is newer than every file of the case. Writes are atomic (temp file + rename). The split is by
    case name, before any file is read; with ``ledger`` (evaluation) a case of the subset that cannot be read is
    recorded there (input: its DICOM folder) and left out instead of raising.
    """
    _check_structures(structures, CHAOS_CODES)
    root = Path(root)
    cases = find_chaos_cases(root)
    keep = {e["patient"] for e in select_split([{"patient": n} for n, _ in cases], split, fractions, seed)}
    cache = Path(cache_dir) if cache_dir is not None else _default_cache(root, structures)
    cache.mkdir(parents=True, exist_ok=True)

    def build(case: tuple[str, Path]) -> dict:
        name, d = case
        ip, lp = cache / f"{name}_image.nii.gz", cache / f"{name}_label.nii.gz"
        fresh = ip.is_file() and lp.is_file() and min(ip.stat().st_mtime, lp.stat().st_mtime) > _newest_mtime(
            d / "T2SPIR")
        if fresh:
            _, spacing = nifti_header(ip)
        else:
            img, lab = load_chaos_case(d, structures)
            for path, arr in ((ip, img.array.astype(np.float32)), (lp, lab.array)):
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
                write_nifti(tmp, arr, img.affine)
                os.replace(tmp, path)
            spacing = img.spacing
        return {"image": str(ip), "label": str(lp), "patient": name, "modality": "mr",
                "dicom_dir": str(d / "T2SPIR" / "DICOM_anon"), "ground_dir": str(d / "T2SPIR" / "Ground"),
                "spacing": [float(s) for s in spacing[:3]]}

    return build_cases([c for c in cases if c[0] in keep], build, lambda c: c[1] / "T2SPIR" / "DICOM_anon", ledger,
                       root)


def abdomen_datalist(root: str | Path, modality: str = "ct", split: str | None = None,
                     fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                     ledger: FailureRecorder | None = None) -> list[dict]:
    """One modality of the abdominal task: ``"ct"`` = :func:`btcv_datalist`, ``"mr"`` = :func:`chaos_datalist`.

    ``root`` holds the BTCV layout for CT and the CHAOS layout for MRI (one folder with both releases' own
    sub-folders, as :func:`common.data.synthetic.abdomen.write_abdomen` writes them, or a folder of one release).
    Label files keep BTCV codes (CT) or the ids of all four :data:`ABDOMEN_STRUCTURES` (MRI, cached by
    :func:`chaos_datalist`); :func:`abdomen_label_mapping` brings both to the ids of the chosen structures.
    """
    if modality == "ct":
        return btcv_datalist(root, split, fractions, seed, ledger=ledger)
    if modality == "mr":
        return chaos_datalist(root, split, fractions, seed, ledger=ledger)
    raise ValueError(f"unknown abdominal modality {modality!r}; the task has {ABDOMEN_MODALITIES} "
                     "(ct = BTCV, mr = CHAOS T2-SPIR)")


def abdomen_label_mapping(structures: Sequence[str] = ABDOMEN_STRUCTURES) -> dict[str, tuple[list[int], list[int]]]:
    """``{modality: (orig_labels, target_ids)}`` that brings the label files of :func:`abdomen_datalist` to the ids
    ``1..K`` of ``structures`` in their order (0 background and every other organ): BTCV codes through
    :func:`btcv_label_mapping`; CHAOS files hold the ids of all four :data:`ABDOMEN_STRUCTURES`, re-indexed here."""
    _check_structures(structures, CHAOS_CODES)
    ids = {s: i + 1 for i, s in enumerate(structures)}
    cached = list(range(1, len(ABDOMEN_STRUCTURES) + 1))
    return {"ct": btcv_label_mapping(structures), "mr": (cached, [ids.get(s, 0) for s in ABDOMEN_STRUCTURES])}
