"""Reader of the CAMUS echocardiography dataset, both public releases, as MONAI datalists.

Layouts accepted (real downloads load unchanged):

* NIfTI release (2023, ``CAMUS_public/database_nifti``): ``patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}[_gt].nii.gz``,
  ``..._half_sequence[_gt].nii.gz`` and ``Info_{2CH,4CH}.cfg``; arrays stored width first, (W, H[, T]).
  An optional ``database_split/`` folder beside it with ``*train*``/``*val*``/``*test*`` ``.txt`` lists is used as
  the split.
* Original MetaImage release (2019): the same names with ``.mhd`` + ``.raw``, SimpleITK arrays (1, H, W) for ED/ES
  and (T, H, W) for ``..._sequence.mhd`` (``..._half_sequence.mhd`` is accepted too); possibly split into
  ``training/`` and ``testing/`` folders (``testing`` is then the test split).

``root`` may be the folder holding the patient folders, or its parent holding ``database_nifti`` or
``training``/``testing``. Images are always presented as (H, W) (or (T, H, W)) with the apex of the sector at the
top (row 0), as a clinician sees them, and spacing (row, col) in mm, whichever release the folder holds.

Splits are patient level: the split lists when present; otherwise the official CAMUS test set (patients
0451-0500) when the folder has all 500 patients, with a seeded train/val split of 0001-0450; otherwise a seeded
train/val/test split (:func:`common.data.splits.patient_split`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.cases import FailureRecorder, build_cases
from common.data.io import DataError, read_image
from common.data.loading import header_shape, image_format, image_geometry, to_frames
from common.data.splits import patient_split

__all__ = [
    "CAMUS_LABELS",
    "CAMUS_TEST_PATIENTS",
    "camus_datalist",
    "camus_patient_split",
    "find_camus_patients",
    "load_echo_frame",
    "read_info_cfg",
    "image_header",
]

CAMUS_LABELS = {"background": 0, "LV": 1, "Myo": 2, "LA": 3}
# the challenge's held-out test patients in the 500-patient numbering of the NIfTI release
CAMUS_TEST_PATIENTS = tuple(f"patient{i:04d}" for i in range(451, 501))

_PATIENT_RE = re.compile(r"^patient(\d+)$")
_NIFTI_EXT = (".nii.gz", ".nii")
_MHD_EXT = (".mhd", ".mha")


# ---------------------------------------------------------------------------------------------------------- files
def _convert(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def read_info_cfg(path: str | Path) -> dict:
    """Parse a CAMUS/TED ``Info_*.cfg`` (``Key: value`` lines) into a dict; numbers become int/float.

    Blank lines, comments (``#``), surrounding whitespace, ``=`` separators and unknown keys are tolerated.
    Raises ``FileNotFoundError`` when missing and ``DataError`` naming the file when it has no ``key: value`` line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    try:
        text = p.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not a text cfg file ({e})") from e
    out: dict = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_][\w ]*?)\s*[:=]\s*(.*)$", line)
        if m:
            out[m.group(1).strip()] = _convert(m.group(2).strip())
    if not out:
        raise DataError(f"{p}: no 'key: value' lines found")
    return out


def image_header(path: str | Path) -> tuple[tuple[int, ...], tuple[float, float]]:
    """Check an image file cheaply (header, and the data file size for MetaImage) without reading the pixels.

    Returns the array shape as :func:`load_echo_frame` will present it ((H, W) or (T, H, W)) and the in-plane
    spacing (row, col) in mm. Raises ``FileNotFoundError``/``DataError`` naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    name = p.name.lower()
    if name.endswith(_NIFTI_EXT):
        import nibabel as nib

        try:
            img = nib.load(str(p))
            shape, zooms = tuple(int(s) for s in img.shape), img.header.get_zooms()
        except Exception as e:  # nibabel raises several unrelated types on corrupt files
            raise DataError(f"{p}: cannot read NIfTI header ({type(e).__name__}: {e})") from e
        if len(shape) == 3 and shape[2] == 1:
            shape = shape[:2]
        if len(shape) not in (2, 3):
            raise DataError(f"{p}: expected a 2D image or a 2D+t sequence, got shape {shape}")
        out_shape = (shape[1], shape[0]) if len(shape) == 2 else (shape[2], shape[1], shape[0])
        return out_shape, (float(zooms[1]), float(zooms[0]))
    if name.endswith(_MHD_EXT):
        # the shared header check (ITK reads the header; a missing or short .raw is refused), spacing from ITK too
        import SimpleITK as sitk

        dims = list(header_shape(p)[0])
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        spacing = [float(v) for v in reader.GetSpacing()]
        if len(dims) == 3 and dims[2] == 1:
            dims = dims[:2]
        if len(dims) not in (2, 3) or len(spacing) < 2:
            raise DataError(f"{p}: expected a 2D image or a 2D+t sequence, got DimSize {dims}")
        out_shape = (dims[1], dims[0]) if len(dims) == 2 else (dims[2], dims[1], dims[0])
        return out_shape, (spacing[1], spacing[0])
    if image_format(p) == "dicom":
        # DICOM (a frame or a cine): header only; frame shape and (row, col) spacing from the geometry
        shape, _ = header_shape(p)
        _, affine = image_geometry(p)
        cols = np.linalg.norm(affine[:3, :2], axis=0)
        out_shape = (shape[1], shape[0]) if len(shape) == 2 else (shape[2], shape[1], shape[0])
        return out_shape, (float(cols[1]), float(cols[0]))
    raise DataError(f"{p}: unsupported echo image format (expected .nii.gz/.nii, .mhd/.mha or DICOM)")


def load_echo_frame(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Load any CAMUS/TED image or label file, either release (or a DICOM frame/cine), apex of the sector at the top.

    Every format is read in the index order of :mod:`common.data.loading` -- (W, H), (W, H, 1) or (W, H, T) --
    and turned into frames the same way (:func:`common.data.loading.to_frames`), so NIfTI, MetaImage and DICOM
    need no per-format transpose. Returns ``(array, (row_mm, col_mm))`` with ``array`` (H, W) for a single frame
    or (T, H, W) for a sequence, in the file's dtype. Raises ``FileNotFoundError``/``DataError`` naming the file.
    """
    p = Path(path)
    name = p.name.lower()
    if not name.endswith(_NIFTI_EXT + _MHD_EXT) and image_format(p) != "dicom":
        raise DataError(f"{p}: unsupported echo image format (expected .nii.gz/.nii, .mhd/.mha or DICOM)")
    img = read_image(p)
    arr = np.asarray(img.array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise DataError(f"{p}: expected a 2D image or a 2D+t sequence, got shape {arr.shape}")
    frames = to_frames(arr)
    spacing = (float(img.spacing[1]), float(img.spacing[0]))
    return np.ascontiguousarray(frames[0] if arr.ndim == 2 else frames), spacing


# ------------------------------------------------------------------------------------------------- discovery
def find_camus_patients(root: str | Path) -> list[tuple[str, Path, str | None]]:
    """Patient folders under ``root``: ``(patient key, folder, forced subset or None)`` sorted by key.

    The key is the folder name (``patient0001``), or ``testing/patient0001`` for the test folder of the original
    release (whose numbering restarts). Raises ``FileNotFoundError``/``DataError`` for a missing or empty root.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset folder, found a file")

    def patients(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir() and _PATIENT_RE.match(p.name)) if folder.is_dir() \
            else []

    direct = patients(root)
    if direct:
        return [(p.name, p, None) for p in direct]
    nifti = patients(root / "database_nifti")
    if nifti:
        return [(p.name, p, None) for p in nifti]
    train, test = patients(root / "training"), patients(root / "testing")
    if train or test:
        return [(p.name, p, None) for p in train] + [(f"testing/{p.name}", p, "test") for p in test]
    raise DataError(f"{root}: no patientNNNN folders (looked in {root}, {root / 'database_nifti'}, "
                    f"{root / 'training'} and {root / 'testing'})")


def _split_lists(root: Path, patient_dirs: Sequence[Path]) -> dict[str, list[str]] | None:
    """The release's ``database_split`` lists (train/val/test), if a folder beside the patients holds them."""
    parent = patient_dirs[0].parent if patient_dirs else root
    for cand in (root / "database_split", parent / "database_split", parent.parent / "database_split"):
        if not cand.is_dir():
            continue
        lists: dict[str, list[str]] = {}
        for f in sorted(cand.glob("*.txt")):
            n = f.name.lower()
            subset = "train" if "train" in n else "val" if "val" in n else "test" if "test" in n else None
            if subset:
                ids = [m.group(0) for m in re.finditer(r"patient\d+", f.read_text(errors="replace"))]
                lists.setdefault(subset, []).extend(ids)
        if lists:
            return lists
    return None


def camus_patient_split(root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1,
                        seed: int = 0) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` -> patient keys of a CAMUS folder (rules in the module docstring)."""
    pats = find_camus_patients(root)
    keys = [k for k, _, _ in pats]
    lists = _split_lists(Path(root), [p for _, p, _ in pats])
    if lists is not None:
        present = set(keys)
        return {s: sorted(set(lists.get(s, [])) & present) for s in ("train", "val", "test")}
    forced_test = [k for k, _, forced in pats if forced == "test"]
    rest = [k for k, _, forced in pats if forced != "test"]
    numbers = {int(_PATIENT_RE.match(k).group(1)) for k in rest if _PATIENT_RE.match(k)}
    if not forced_test and len(rest) >= 500 and set(range(1, 501)) <= numbers:
        forced_test = [k for k in rest if k in CAMUS_TEST_PATIENTS]
        rest = [k for k in rest if k not in CAMUS_TEST_PATIENTS]
    if forced_test:
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        parts = patient_split(rest, (1.0 - val_fraction, val_fraction), seed, names=("train", "val")) if rest else \
            {"train": [], "val": []}
        return {"train": parts["train"], "val": parts["val"], "test": sorted(forced_test)}
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"invalid fractions val={val_fraction}, test={test_fraction}")
    return patient_split(rest, (1.0 - val_fraction - test_fraction, val_fraction, test_fraction), seed,
                         names=("train", "val", "test"))


# -------------------------------------------------------------------------------------------------- datalist
def _find_one(folder: Path, stems: Sequence[str], exts: Sequence[str]) -> Path | None:
    for stem in stems:
        for ext in exts:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def _frame_indices(cfg: dict, cfg_path: Path, n_frames: int | None) -> tuple[int, int]:
    try:
        ed, es = int(cfg["ED"]) - 1, int(cfg["ES"]) - 1
    except KeyError as e:
        raise DataError(f"{cfg_path}: missing key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise DataError(f"{cfg_path}: ED/ES are not frame numbers ({e})") from e
    limit = n_frames if n_frames is not None else cfg.get("NbFrame")
    if ed < 0 or es < 0 or (isinstance(limit, int) and (ed >= limit or es >= limit)):
        raise DataError(f"{cfg_path}: ED={ed + 1}/ES={es + 1} out of range 1..{limit}")
    return ed, es


def _view_entry(pdir: Path, pid: str, view: str, sequences: bool, require_labels: bool, validate: bool) -> dict:
    ed_img = _find_one(pdir, [f"{pid}_{view}_ED"], _NIFTI_EXT + _MHD_EXT)
    if ed_img is None:
        raise FileNotFoundError(f"{pdir / f'{pid}_{view}_ED.nii.gz'}: file not found (nor .nii/.mhd)")
    ext = next(e for e in _NIFTI_EXT + _MHD_EXT if ed_img.name.endswith(e))
    release = "nifti" if ext in _NIFTI_EXT else "mhd"
    entry: dict = {"patient": pid, "view": view, "release": release, "image_ed": str(ed_img)}
    names = {"image_es": f"{pid}_{view}_ES", "label_ed": f"{pid}_{view}_ED_gt", "label_es": f"{pid}_{view}_ES_gt"}
    for key, stem in names.items():
        p = pdir / f"{stem}{ext}"
        if not p.is_file():
            if key.startswith("label") and not require_labels:
                continue
            raise FileNotFoundError(f"{p}: file not found")
        entry[key] = str(p)
    seq_stems = [f"{pid}_{view}_half_sequence"] + ([f"{pid}_{view}_sequence"] if release == "mhd" else [])
    seq = _find_one(pdir, seq_stems, (ext,)) if sequences else None
    if seq is not None:
        entry["sequence"] = str(seq)
        seq_gt = pdir / seq.name.replace(ext, f"_gt{ext}")
        if seq_gt.is_file():
            entry["sequence_label"] = str(seq_gt)
    cfg_path = pdir / f"Info_{view}.cfg"
    cfg = read_info_cfg(cfg_path)
    n_frames = None
    if validate:
        shape, spacing = image_header(ed_img)
        for key in ("image_es", "label_ed", "label_es"):
            if key in entry:
                other, _ = image_header(entry[key])
                if other != shape:
                    raise DataError(f"{entry[key]}: shape {other} differs from {ed_img.name} {shape}")
        if "sequence" in entry:
            sshape, _ = image_header(entry["sequence"])
            if len(sshape) != 3:
                raise DataError(f"{entry['sequence']}: expected a (T, H, W) sequence, got shape {sshape}")
            n_frames = sshape[0]
            if "sequence_label" in entry and image_header(entry["sequence_label"])[0] != sshape:
                raise DataError(f"{entry['sequence_label']}: shape differs from {Path(entry['sequence']).name}")
        entry["spacing"] = [spacing[0], spacing[1]]
    ed, es = _frame_indices(cfg, cfg_path, n_frames)
    ef = cfg.get("EF", cfg.get("LVef"))
    entry.update({"ed": ed, "es": es, "n_frames": int(n_frames if n_frames is not None else cfg.get("NbFrame", 0)),
                  "quality": cfg.get("ImageQuality"), "ef": float(ef) if isinstance(ef, (int, float)) else None,
                  "fps": float(cfg["FrameRate"]) if isinstance(cfg.get("FrameRate"), (int, float)) else None})
    return entry


def camus_datalist(root: str | Path, views: Sequence[str] = ("2CH", "4CH"), split: str | None = None,
                   val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.1, sequences: bool = True,
                   require_labels: bool = True, validate: bool = True, ledger: FailureRecorder | None = None
                   ) -> list[dict]:
    """MONAI datalist of a CAMUS folder (either release): one dict per patient and view.

    Keys: ``image_ed``, ``label_ed``, ``image_es``, ``label_es`` (paths), ``sequence``/``sequence_label`` (ED -> ES
    half sequence, when present and ``sequences``), ``patient``, ``view``, ``release`` (``nifti``/``mhd``), ``ed``,
    ``es`` (0-based frame indices in the sequence), ``n_frames``, ``spacing`` ([row, col] mm, when ``validate``),
    ``quality``, ``ef``, ``fps`` (None when the cfg lacks them) and ``split``.
    ``split``: None for every patient, else ``"train"``, ``"val"`` or ``"test"`` (see :func:`camus_patient_split`).
    ``validate`` checks every header (and MetaImage data sizes) and that ED/ES images and labels have equal shapes.
    Raises ``FileNotFoundError``/``DataError`` naming the first missing or corrupt file; with ``ledger``
    (evaluation) a patient view whose files cannot be read is recorded there instead (stage ``datalist``, input
    ``<patient folder>/<patient>_<view>``) and left out (:func:`common.data.cases.build_cases`).
    """
    if split not in (None, "train", "val", "test"):
        raise ValueError(f"split must be None, 'train', 'val' or 'test', got {split!r}")
    bad = [v for v in views if v not in ("2CH", "4CH")]
    if bad or not views:
        raise ValueError(f"views must be a non-empty subset of ('2CH', '4CH'), got {tuple(views)}")
    pats = find_camus_patients(root)
    subsets = camus_patient_split(root, val_fraction, test_fraction, seed)
    subset_of = {k: s for s, ks in subsets.items() for k in ks}
    cases = [(key, pdir, view) for key, pdir, _ in pats if split is None or subset_of.get(key) == split
             for view in views]

    def build(case: tuple[str, Path, str]) -> dict:
        key, pdir, view = case
        entry = _view_entry(pdir, pdir.name, view, sequences, require_labels, validate)
        entry["patient"], entry["split"] = key, subset_of.get(key)
        return entry

    out = build_cases(cases, build, lambda c: c[1] / f"{c[1].name}_{c[2]}", ledger, root)
    if not out:
        raise DataError(f"{root}: no CAMUS patients in split {split!r}")
    return out
