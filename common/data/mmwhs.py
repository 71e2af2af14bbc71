"""Reader for the MM-WHS 2017 whole-heart layout (CT and MRI) and its label remapping.

Layout: ``ct_train/ct_train_1001_image.nii.gz`` + ``ct_train_1001_label.nii.gz`` and the same under ``mr_train/``
(the release's folders); files directly in the root folder are accepted too. Label codes: 205 LV myocardium (LVM),
420 LA cavity (LAC), 500 LV cavity (LVC), 550 RA cavity (RAC), 600 RV cavity (RVC), 820 ascending aorta (AA),
850 pulmonary artery (PA). Networks need contiguous ids: :func:`remap_mmwhs_labels` maps the chosen structures to
1..K in the given order and everything else (other codes, stray values) to 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.acdc import nifti_header, select_split
from common.data.cases import FailureRecorder, build_cases
from common.data.io import DataError, read_image

__all__ = [
    "MMWHS_CODES",
    "MMWHS_MODALITIES",
    "LSSC_STRUCTURES",
    "mmwhs_label_mapping",
    "remap_mmwhs_labels",
    "find_mmwhs_cases",
    "mmwhs_datalist",
]

MMWHS_CODES = {"LVM": 205, "LAC": 420, "LVC": 500, "RAC": 550, "RVC": 600, "AA": 820, "PA": 850}
MMWHS_MODALITIES = ("ct", "mr")
LSSC_STRUCTURES = ("LVM", "LAC", "LVC", "AA")  # the LSSC paper's 4-structure task


def mmwhs_label_mapping(structures: Sequence[str] = LSSC_STRUCTURES) -> tuple[list[int], list[int]]:
    """``(orig_codes, target_ids)`` over all seven MM-WHS codes, for MONAI ``MapLabelValued``.

    Structures get ids 1..K in the order given; the other codes map to 0 (MONAI leaves unlisted values unchanged,
    so they must be listed).
    """
    for s in structures:
        if s not in MMWHS_CODES:
            raise ValueError(f"unknown MM-WHS structure {s!r}; choose from {sorted(MMWHS_CODES)}")
    if len(set(structures)) != len(structures):
        raise ValueError(f"structures repeat: {list(structures)}")
    ids = {s: i + 1 for i, s in enumerate(structures)}
    orig = list(MMWHS_CODES.values())
    return orig, [ids.get(s, 0) for s in MMWHS_CODES]


def remap_mmwhs_labels(array: np.ndarray, structures: Sequence[str] = LSSC_STRUCTURES) -> np.ndarray:
    """MM-WHS codes -> contiguous uint8 ids (background 0, ``structures`` 1..K, any other value 0), same shape.

    Float label arrays are accepted if their values are integral (some conversions store labels as float).
    """
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.floating):
        r = np.rint(a)
        if not np.allclose(r, a, atol=1e-3):
            raise ValueError("MM-WHS label array has non-integer values; is it an image rather than a label map?")
        a = r.astype(np.int64)
    out = np.zeros(a.shape, dtype=np.uint8)
    orig, target = mmwhs_label_mapping(structures)
    for code, tid in zip(orig, target):
        if tid:
            out[a == code] = tid
    return out


_NAME = re.compile(r"^(?P<mod>ct|mr)_train_(?P<id>\d+)_image\.nii(\.gz)?$")


def _case_files(root: str | Path, modality: str) -> list[tuple[str, Path, Path]]:
    """``(case_name, image, label path)`` of every image of ``modality`` under ``root``, sorted by id; the label
    is named, not checked."""
    if modality not in MMWHS_MODALITIES:
        raise ValueError(f"modality must be one of {MMWHS_MODALITIES}, got {modality!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: MM-WHS folder not found")
    seen: dict[str, Path] = {}
    for folder in (root / f"{modality}_train", root):
        if folder.is_dir():
            for p in folder.iterdir():
                m = _NAME.match(p.name)
                if m and m["mod"] == modality:
                    seen.setdefault(f"{modality}_train_{m['id']}", p)
    if not seen:
        raise DataError(f"{root}: no MM-WHS {modality} images ({modality}_train[/]{modality}_train_NNNN_image.nii.gz)")
    out = []
    for name in sorted(seen, key=lambda n: int(n.rsplit("_", 1)[1])):
        img = seen[name]
        out.append((name, img, img.with_name(img.name.replace("_image.nii", "_label.nii"))))
    return out


def _check_label(img: Path, lab: Path) -> None:
    if not lab.is_file():
        raise FileNotFoundError(f"{lab}: label file not found for {img.name}")


def find_mmwhs_cases(root: str | Path, modality: str = "ct") -> list[tuple[str, Path, Path]]:
    """``(case_name, image, label)`` of every training case of ``modality`` under ``root``, sorted by id."""
    cases = _case_files(root, modality)
    for _, img, lab in cases:
        _check_label(img, lab)
    return cases


def mmwhs_datalist(root: str | Path, modality: str = "ct", split: str | None = None,
                   fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0, verify: bool = False,
                   ledger: FailureRecorder | None = None) -> list[dict]:
    """MONAI datalist ``[{image, label, patient, modality, spacing}]`` of one modality, split 70/10/20 by default.

    Labels keep the MM-WHS codes on disk; remap them with :func:`remap_mmwhs_labels` or ``MapLabelValued`` fed by
    :func:`mmwhs_label_mapping`. Header shapes of image and label must agree (``DataError`` naming both otherwise).
    The split is by case name, before any file is read. With ``ledger`` (evaluation) a case of the subset whose
    image or label cannot be read is recorded there (stage ``datalist``, input the image) and left out instead of
    raising (:func:`common.data.cases.build_cases`).
    """
    cases = _case_files(root, modality)
    keep = {e["patient"] for e in select_split([{"patient": n} for n, _, _ in cases], split, fractions, seed)}

    def build(case: tuple[str, Path, Path]) -> dict:
        name, img, lab = case
        _check_label(img, lab)
        shape, spacing = nifti_header(img)
        lshape, _ = nifti_header(lab)
        if lshape[:3] != shape[:3]:
            raise DataError(f"{lab}: label shape {lshape} does not match image {img.name} shape {shape}")
        if verify:
            read_image(img)
            read_image(lab)
        return {"image": str(img), "label": str(lab), "patient": name, "modality": modality,
                "spacing": [float(s) for s in spacing[:3]]}

    return build_cases([c for c in cases if c[0] in keep], build, lambda c: c[1], ledger, root)
