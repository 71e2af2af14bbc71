"""Reader for the ACDC cine-MRI layout (``patientNNN/patientNNN_frameNN[_gt].nii.gz`` + ``Info.cfg``).

Accepts the official release (``training/`` and ``testing/`` folders, optionally under ``database/``) or a folder of
patient folders (the synthetic writer's layout). Labels follow ACDC: 0 background, 1 RV cavity, 2 LV myocardium,
3 LV cavity. The synthetic data adds ``patientNNN_ed2es_disp.nii.gz`` (ED->ES displacement); real ACDC has none, and
entries then have no ``disp`` key.

Also holds the small helpers the other layout readers share (split selection, NIfTI header geometry).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.data.cases import FailureRecorder, build_cases
from common.data.io import DataError, read_image
from common.data.splits import patient_split

__all__ = [
    "SPLIT_NAMES",
    "select_split",
    "nifti_header",
    "read_acdc_info",
    "find_acdc_patients",
    "load_acdc_patient",
    "acdc_datalist",
]

SPLIT_NAMES = ("train", "val", "test")


def select_split(entries: list[dict], split: str | None, fractions: Sequence[float], seed: int,
                 key: str = "patient") -> list[dict]:
    """Entries of one patient-level subset (``split`` in train/val/test; ``None`` keeps all).

    Subsets come from :func:`common.data.splits.patient_split` over the unique ``entry[key]`` values.
    """
    if split is None:
        return entries
    names = SPLIT_NAMES[: len(fractions)]
    if split not in names:
        raise ValueError(f"split must be one of {names} or None, got {split!r}")
    if not entries:
        return []
    keep = set(patient_split([e[key] for e in entries], fractions, seed, names)[split])
    return [e for e in entries if e[key] in keep]


def nifti_header(path: str | Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and voxel spacing of a NIfTI file from its header only; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    try:
        import nibabel as nib

        img = nib.load(str(p))
        shape = tuple(int(s) for s in img.shape)
        return shape, tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    except Exception as e:  # nibabel raises several unrelated types for corrupt files
        raise DataError(f"{p}: cannot read NIfTI header ({type(e).__name__}: {e})") from e


def read_acdc_info(path: str | Path) -> dict:
    """Parse an ACDC ``Info.cfg`` (``Key: value`` lines) into a dict; ``ED``/``ES``/``NbFrame`` become ints."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: Info.cfg not found")
    info: dict = {}
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if ":" not in line:
            raise DataError(f"{p}: line {n} is not 'Key: value': {line!r}")
        k, v = (s.strip() for s in line.split(":", 1))
        info[k] = v
    for k in ("ED", "ES"):
        if k not in info:
            raise DataError(f"{p}: missing '{k}:' line")
    try:
        for k in ("ED", "ES", "NbFrame"):
            if k in info:
                info[k] = int(float(info[k]))
        for k in ("Height", "Weight"):
            if k in info:
                info[k] = float(info[k])
    except ValueError as e:
        raise DataError(f"{p}: bad number ({e})") from e
    return info


def _patient_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and d.name.startswith("patient"))


def find_acdc_patients(root: str | Path) -> dict[str, list[Path]]:
    """Patient folders by official subset: ``{"training": [...], "testing": [...]}`` or ``{"all": [...]}``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: ACDC folder not found")
    if (root / "database").is_dir() and not _patient_dirs(root):
        root = root / "database"
    official = {s: _patient_dirs(root / s) for s in ("training", "testing") if (root / s).is_dir()}
    if any(official.values()):
        return {k: v for k, v in official.items() if v}
    flat = _patient_dirs(root)
    if not flat:
        raise DataError(f"{root}: no ACDC patient folders (patientNNN/ or training/ and testing/) found")
    return {"all": flat}


def load_acdc_patient(patient_dir: str | Path, load_arrays: bool = False) -> dict:
    """Paths and metadata of one patient; with ``load_arrays`` also ``image_ed_array`` etc. ``(X, Y, Z)``.

    Keys: ``patient, image_ed, label_ed, image_es, label_es, ed, es, spacing, group, n_frames`` and, when present,
    ``image_4d`` and ``disp``. Missing files raise ``FileNotFoundError`` naming them; unreadable headers or frames that
    disagree in shape raise ``DataError``.
    """
    d = Path(patient_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: patient folder not found")
    pid = d.name
    info = read_acdc_info(d / "Info.cfg")
    e: dict = {"patient": pid, "ed": info["ED"], "es": info["ES"], "group": str(info.get("Group", "")),
               "n_frames": int(info.get("NbFrame", 0))}
    shape0 = None
    for key, f in (("ed", info["ED"]), ("es", info["ES"])):
        for kind, suffix in (("image", ""), ("label", "_gt")):
            p = d / f"{pid}_frame{f:02d}{suffix}.nii.gz"
            if not p.is_file():
                raise FileNotFoundError(f"{p}: file not found (Info.cfg of {pid} says {key.upper()}: {f})")
            shape, spacing = nifti_header(p)
            if shape0 is None:
                shape0, e["spacing"] = shape, [float(s) for s in spacing[:3]]
            elif shape != shape0:
                raise DataError(f"{p}: shape {shape} differs from {shape0} of the other frames of {pid}")
            e[f"{kind}_{key}"] = str(p)
    p4 = d / f"{pid}_4d.nii.gz"
    if p4.is_file():
        e["image_4d"] = str(p4)
    pd = d / f"{pid}_ed2es_disp.nii.gz"
    if pd.is_file():
        e["disp"] = str(pd)
    if load_arrays:
        for k in ("image_ed", "label_ed", "image_es", "label_es"):
            e[f"{k}_array"] = read_image(e[k]).array
    return e


def _select_dirs(dirs: Sequence[Path], split: str | None, fractions: Sequence[float], seed: int) -> list[Path]:
    """The patient folders of one subset, split by folder name (as :func:`select_split` splits the entries, whose
    ``patient`` is the folder name), before any file of a patient is read."""
    keep = {e["patient"] for e in select_split([{"patient": d.name} for d in dirs], split, fractions, seed)}
    return [d for d in dirs if d.name in keep]


def acdc_datalist(root: str | Path, split: str | None = None, fractions: Sequence[float] = (0.7, 0.1, 0.2),
                  seed: int = 0, verify: bool = False, ledger: FailureRecorder | None = None) -> list[dict]:
    """MONAI datalist of ED/ES pairs: one dict per patient (see :func:`load_acdc_patient` for the keys).

    With the official ``training/``/``testing/`` folders, ``split="test"`` is the official test set and train/val
    split the training patients by ``fractions[:2]``; otherwise ``fractions`` (train, val, test) split all patients
    at patient level with ``seed``. ``verify`` reads every image fully (catches truncated files up front).
    With ``ledger`` (evaluation) a patient of the subset whose files cannot be read is recorded there (stage
    ``datalist``, input the patient folder) and left out instead of raising (:func:`common.data.cases.build_cases`).
    """
    found = find_acdc_patients(root)
    if "all" in found:
        dirs = _select_dirs(found["all"], split, fractions, seed)
    elif split is None:
        dirs = [d for k in ("training", "testing") for d in found.get(k, [])]
    elif split == "test":
        dirs = list(found.get("testing", []))
    else:
        dirs = _select_dirs(found.get("training", []), split,
                            list(fractions[:2]) if len(fractions) > 2 else fractions, seed)

    def build(d: Path) -> dict:
        e = load_acdc_patient(d)
        if verify:
            for k in ("image_ed", "label_ed", "image_es", "label_es", "disp"):
                if k in e:
                    read_image(e[k])
        return e

    return build_cases(dirs, build, str, ledger, root)

