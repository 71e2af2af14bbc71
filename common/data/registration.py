"""Readers for the registration-pair layout (``pairs/pairNNNN_{source,target,source_myo,target_myo,disp,lost}``) and
the 3D volume-pair layout of real 3D echo datasets (one folder per case: ``<case>_ED.nii.gz``, ``<case>_ES.nii.gz``,
``<case>_ED_gt.nii.gz``, ``<case>_ES_gt.nii.gz``, optionally ``<case>_lost.nii.gz`` and ``<case>_ED2ES_disp.nii.gz``).

See :mod:`common.data.synthetic.registration` and :mod:`common.data.synthetic.registration3d` for what each file
holds. Displacements are stored channel-last
(``(X, Y, 2)`` or ``(X, Y, Z, 3)``, voxels, pull-back ``target(x) = source(x + d(x))``); :func:`read_displacement`
returns them channel-first, the layout MONAI's ``Warp`` takes as ``ddf``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.acdc import nifti_header, select_split
from common.data.cases import FailureRecorder, build_cases
from common.data.io import DataError, read_image

__all__ = ["PAIR_KEYS", "VOLUME_KEYS", "read_displacement", "find_registration_pairs", "registration_pairs_datalist",
           "find_volume_cases", "volume_pairs_datalist"]

PAIR_KEYS = ("source", "target", "source_myo", "target_myo", "disp", "lost")
# datalist key -> file suffix of the 3D volume-pair layout; the last two are optional (synthetic data has them)
VOLUME_KEYS = {"source": "ED", "target": "ES", "source_label": "ED_gt", "target_label": "ES_gt", "lost": "lost",
               "disp": "ED2ES_disp"}
_VOLUME_OPTIONAL = ("lost", "disp")
_SRC = re.compile(r"^(?P<name>pair\d+)_source\.nii(\.gz)?$")


def read_displacement(path: str | Path) -> np.ndarray:
    """Channel-first float32 displacement ``(D, *spatial)`` from a channel-last file ``(*spatial, D)``, D = ndim - 1."""
    arr = read_image(path).array
    if arr.ndim not in (3, 4) or arr.shape[-1] != arr.ndim - 1:
        raise DataError(f"{path}: displacement must have shape (X, Y, 2) or (X, Y, Z, 3), got {arr.shape}")
    return np.ascontiguousarray(np.moveaxis(arr.astype(np.float32), -1, 0))


def _pair_files(root: str | Path) -> list[tuple[str, dict[str, Path]]]:
    """``(name, {key: path})`` of every pair with a source image under ``root/pairs`` (or ``root``), sorted by name;
    the other files are named, not checked."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: registration-pair folder not found")
    folder = root / "pairs" if (root / "pairs").is_dir() else root
    out = []
    for p in sorted(folder.iterdir()):
        m = _SRC.match(p.name)
        if not m:
            continue
        ext = p.name[len(m["name"]) + len("_source"):]
        out.append((m["name"], {k: folder / f"{m['name']}_{k}{ext}" for k in PAIR_KEYS}))
    if not out:
        raise DataError(f"{folder}: no registration pairs (pairNNNN_source.nii.gz)")
    return out


def _check_complete(name: str, files: dict[str, Path]) -> None:
    for k, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(f"{f}: file not found ({k} of {name})")


def find_registration_pairs(root: str | Path) -> list[tuple[str, dict[str, Path]]]:
    """``(name, {key: path})`` of every complete pair under ``root/pairs`` (or ``root`` itself), sorted by name."""
    pairs = _pair_files(root)
    for name, files in pairs:
        _check_complete(name, files)
    return pairs


def registration_pairs_datalist(root: str | Path, split: str | None = None,
                                fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                                verify: bool = False, ledger: FailureRecorder | None = None) -> list[dict]:
    """MONAI datalist ``[{source, target, source_myo, target_myo, disp, lost, pair, spacing}]`` split by pair.

    Every pair is its own patient, so the split is at pair level (by name, before any file is read). Header shapes
    must agree across a pair's files. With ``ledger`` (evaluation) a pair of the subset with a missing or unreadable
    file is recorded there (stage ``datalist``, input its source image) and left out instead of raising
    (:func:`common.data.cases.build_cases`).
    """
    pairs = _pair_files(root)
    keep = {e["pair"] for e in select_split([{"pair": n} for n, _ in pairs], split, fractions, seed, key="pair")}

    def build(pair: tuple[str, dict[str, Path]]) -> dict:
        name, files = pair
        _check_complete(name, files)
        shape, spacing = nifti_header(files["source"])
        for k in PAIR_KEYS[1:]:
            s, _ = nifti_header(files[k])
            if s[:2] != shape[:2]:
                raise DataError(f"{files[k]}: shape {s} does not match {files['source'].name} shape {shape}")
        if verify:
            for k in PAIR_KEYS:
                read_displacement(files[k]) if k == "disp" else read_image(files[k])
        return {**{k: str(v) for k, v in files.items()}, "pair": name, "spacing": [float(v) for v in spacing[:2]]}

    return build_cases([p for p in pairs if p[0] in keep], build, lambda p: p[1]["source"], ledger, root)


def find_volume_cases(root: str | Path) -> list[tuple[str, dict[str, Path]]]:
    """``(case, {key: path})`` of every case folder under ``root`` holding a ``<case>_ED.nii[.gz]`` file, sorted by
    name; the other files of :data:`VOLUME_KEYS` are named (``.nii.gz`` or ``.nii`` like the ED file), not checked."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: 3D volume-pair folder not found")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for ext in (".nii.gz", ".nii"):
            if (d / f"{d.name}_ED{ext}").is_file():
                out.append((d.name, {k: d / f"{d.name}_{v}{ext}" for k, v in VOLUME_KEYS.items()}))
                break
    if not out:
        raise DataError(f"{root}: no 3D volume pairs (caseNNN/caseNNN_ED.nii.gz with _ES, _ED_gt, _ES_gt)")
    return out


def volume_pairs_datalist(root: str | Path, split: str | None = None, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                          seed: int = 0, ledger: FailureRecorder | None = None) -> list[dict]:
    """MONAI datalist ``[{case, source, target, source_label, target_label[, lost, disp], spacing}]`` split by case.

    Every case is its own patient (split by folder name before any file is read). The four ED/ES image and label
    files are required and must share one 3D shape (header only); ``lost``/``disp`` are listed when present. With
    ``ledger`` (evaluation) a case of the subset with a missing or malformed file is recorded there and left out.
    """
    cases = find_volume_cases(root)
    keep = {e["case"] for e in select_split([{"case": n} for n, _ in cases], split, fractions, seed, key="case")}

    def build(case: tuple[str, dict[str, Path]]) -> dict:
        name, files = case
        present = {k: f for k, f in files.items() if k not in _VOLUME_OPTIONAL or f.is_file()}
        _check_complete(name, present)
        shape, spacing = nifti_header(present["source"])
        if len(shape) != 3:
            raise DataError(f"{present['source']}: expected a 3D volume (X, Y, Z), got shape {shape}")
        for f in present.values():
            s, _ = nifti_header(f)
            if s[:3] != shape:
                raise DataError(f"{f}: shape {s} does not match {present['source'].name} shape {shape}")
        return {**{k: str(v) for k, v in present.items()}, "case": name, "spacing": [float(v) for v in spacing[:3]]}

    return build_cases([c for c in cases if c[0] in keep], build, lambda c: c[1]["source"], ledger, root)
