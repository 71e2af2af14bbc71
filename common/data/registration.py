"""Reader for the registration-pair layout (``pairs/pairNNNN_{source,target,source_myo,target_myo,disp,lost}``).

See :mod:`common.data.synthetic.registration` for what each file holds. Displacements are stored channel-last
(``(X, Y, 2)`` or ``(X, Y, Z, 3)``, voxels, pull-back ``target(x) = source(x + d(x))``); :func:`read_displacement`
returns them channel-first, the layout MONAI's ``Warp`` takes as ``ddf``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.acdc import nifti_header, select_split
from common.data.io import DataError, read_image

__all__ = ["PAIR_KEYS", "read_displacement", "find_registration_pairs", "registration_pairs_datalist"]

PAIR_KEYS = ("source", "target", "source_myo", "target_myo", "disp", "lost")
_SRC = re.compile(r"^(?P<name>pair\d+)_source\.nii(\.gz)?$")


def read_displacement(path: str | Path) -> np.ndarray:
    """Channel-first float32 displacement ``(D, *spatial)`` from a channel-last file ``(*spatial, D)``, D = ndim - 1."""
    arr = read_image(path).array
    if arr.ndim not in (3, 4) or arr.shape[-1] != arr.ndim - 1:
        raise DataError(f"{path}: displacement must have shape (X, Y, 2) or (X, Y, Z, 3), got {arr.shape}")
    return np.ascontiguousarray(np.moveaxis(arr.astype(np.float32), -1, 0))


def find_registration_pairs(root: str | Path) -> list[tuple[str, dict[str, Path]]]:
    """``(name, {key: path})`` of every complete pair under ``root/pairs`` (or ``root`` itself), sorted by name."""
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
        files = {k: folder / f"{m['name']}_{k}{ext}" for k in PAIR_KEYS}
        for k, f in files.items():
            if not f.is_file():
                raise FileNotFoundError(f"{f}: file not found ({k} of {m['name']})")
        out.append((m["name"], files))
    if not out:
        raise DataError(f"{folder}: no registration pairs (pairNNNN_source.nii.gz)")
    return out


def registration_pairs_datalist(root: str | Path, split: str | None = None,
                                fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                                verify: bool = False) -> list[dict]:
    """MONAI datalist ``[{source, target, source_myo, target_myo, disp, lost, pair, spacing}]`` split by pair.

    Every pair is its own patient, so the split is at pair level. Header shapes must agree across a pair's files.
    """
    entries = []
    for name, files in find_registration_pairs(root):
        shape, spacing = nifti_header(files["source"])
        for k in PAIR_KEYS[1:]:
            s, _ = nifti_header(files[k])
            if s[:2] != shape[:2]:
                raise DataError(f"{files[k]}: shape {s} does not match {files['source'].name} shape {shape}")
        entries.append({**{k: str(v) for k, v in files.items()}, "pair": name,
                        "spacing": [float(v) for v in spacing[:2]]})
    entries = select_split(entries, split, fractions, seed, key="pair")
    if verify:
        for e in entries:
            for k in PAIR_KEYS:
                read_displacement(e[k]) if k == "disp" else read_image(e[k])
    return entries
