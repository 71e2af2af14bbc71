"""Reader of the open speckle-tracking HDF5 layout (``METHODS.md`` §4): one file per video.

Per file::

    video     (T, H, W) uint8          B-mode frames, apex at the top
    tracks    (T, N, 2) float32        (x, y) pixels; pixel (i, j) has its centre at x = j, y = i
    visible   (T, N) bool
    attrs     fps, pixel_spacing_mm, view, ed_frame, es_frame  [gls_reference (%), patient, centreline_ordered,
              ... optional]
    labels    (T, H, W) uint8          optional (simulated data): 0 bg / 1 LV / 2 Myo / 3 LA

``centreline_ordered`` (bool) declares that the N tracks are myocardial centre-line points in order along the line
(base -> apex -> base), the only case in which the length of the polyline through them, and so GLS, means anything.
Missing or false: GLS is not applicable to the file (evaluation reports it as such); see :func:`centreline_ordered`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.data.cases import FailureRecorder, build_cases
from common.data.io import DataError
from common.data.splits import patient_split, resolve_split

__all__ = ["read_tracking_h5", "tracking_datalist", "centreline_ordered", "TRACKING_REQUIRED_ATTRS",
           "CENTRELINE_ATTR"]

TRACKING_REQUIRED_ATTRS = ("fps", "pixel_spacing_mm", "view", "ed_frame", "es_frame")
CENTRELINE_ATTR = "centreline_ordered"


def centreline_ordered(attrs: Mapping[str, Any]) -> bool:
    """Whether a tracking file's attributes declare its tracks ordered centre-line points (``centreline_ordered``).

    Only an explicit true value counts (bool, 0/1, or the strings ``true``/``false`` some writers store); a missing
    attribute means "not declared", so GLS is not computed from arbitrary points.
    """
    value = attrs.get(CENTRELINE_ATTR)
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return bool(value)
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return False


def _attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from e


def _check_layout(f, path: Path) -> dict:
    """Shapes and attributes of an open tracking file; raises ``DataError`` naming the file and the problem."""
    for name in ("video", "tracks", "visible"):
        if name not in f:
            raise DataError(f"{path}: missing dataset {name!r}")
    missing = [a for a in TRACKING_REQUIRED_ATTRS if a not in f.attrs]
    if missing:
        raise DataError(f"{path}: missing attribute(s) {missing}")
    v, tr, vis = f["video"].shape, f["tracks"].shape, f["visible"].shape
    if len(v) != 3:
        raise DataError(f"{path}: 'video' must be (T, H, W), got {v}")
    if len(tr) != 3 or tr[2] != 2 or tr[0] != v[0]:
        raise DataError(f"{path}: 'tracks' must be (T={v[0]}, N, 2), got {tr}")
    if vis != tr[:2]:
        raise DataError(f"{path}: 'visible' must be {tr[:2]}, got {vis}")
    attrs = {k: _attr(f.attrs[k]) for k in f.attrs}
    for k in ("ed_frame", "es_frame"):
        if not isinstance(attrs[k], int) or not 0 <= attrs[k] < v[0]:
            raise DataError(f"{path}: attribute {k}={attrs[k]!r} is not a frame index in 0..{v[0] - 1}")
    for k in ("fps", "pixel_spacing_mm"):
        if not isinstance(attrs[k], (int, float)) or not attrs[k] > 0:
            raise DataError(f"{path}: attribute {k}={attrs[k]!r} must be a positive number")
    return {"n_frames": v[0], "height": v[1], "width": v[2], "n_points": tr[1], "attrs": attrs}


def read_tracking_h5(path: str | Path) -> dict:
    """Read one tracking file.

    Returns ``video`` (T, H, W) uint8, ``tracks`` (T, N, 2) float32 (x, y) px, ``visible`` (T, N) bool,
    ``labels`` (T, H, W) uint8 when present, and the attributes as plain Python values (``fps``,
    ``pixel_spacing_mm``, ``view``, ``ed_frame``, ``es_frame``, ``gls_reference`` when present, ...).
    Raises ``FileNotFoundError``/``DataError`` naming the file for a missing, corrupt or malformed file.
    """
    p = Path(path)
    with _open(p) as f:
        info = _check_layout(f, p)
        try:
            out = {"video": np.asarray(f["video"][()]), "tracks": np.asarray(f["tracks"][()], dtype=np.float32),
                   "visible": np.asarray(f["visible"][()]).astype(bool)}
            if "labels" in f:
                out["labels"] = np.asarray(f["labels"][()])
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: cannot read datasets ({e})") from e
    if out["video"].dtype != np.uint8:
        raise DataError(f"{p}: 'video' must be uint8, got {out['video'].dtype}")
    if not np.isfinite(out["tracks"]).all():
        raise DataError(f"{p}: 'tracks' contains NaN/Inf")
    out.update(info["attrs"])
    return out


def tracking_datalist(root: str | Path, split: str | None = None, val_fraction: float = 0.1,
                      test_fraction: float = 0.1, seed: int = 0, validate: bool = True,
                      ledger: FailureRecorder | None = None) -> list[dict]:
    """MONAI datalist of a folder of tracking files (``*.h5``/``*.hdf5``, searched recursively).

    Keys: ``video`` (path), ``id`` (file stem relative to ``root``), ``patient`` (attribute ``patient`` or the id;
    the seeded split is by patient), ``n_frames``, ``n_points``, ``fps``, ``spacing`` ([s, s] mm), ``view``,
    ``ed``, ``es``, ``gls_reference`` (None when absent), ``centreline_ordered`` (bool) and ``split``.
    ``validate`` opens every file and checks its layout. Raises ``FileNotFoundError``/``DataError`` for a
    missing/empty folder or a bad file (named).

    With ``ledger`` (evaluation) a file of the requested subset that cannot be opened or checked is recorded there
    (stage ``datalist``, input the file) and left out instead (:func:`common.data.cases.build_cases`). Its patient
    attribute cannot be read, so it takes part in the split under its id; files of other subsets are not recorded.
    """
    split = resolve_split(split)
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"invalid fractions val={val_fraction}, test={test_fraction}")
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset folder, found a file")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".h5", ".hdf5") and p.is_file())
    if not files:
        raise DataError(f"{root}: no .h5/.hdf5 tracking files found")

    def build(p: Path) -> dict:
        vid = str(p.relative_to(root).with_suffix(""))
        entry = {"video": str(p), "id": vid, "patient": vid}
        if validate:
            with _open(p) as f:
                info = _check_layout(f, p)
            a = info["attrs"]
            gls = a.get("gls_reference")
            entry.update({"patient": str(a.get("patient", vid)), "n_frames": info["n_frames"],
                          "n_points": info["n_points"], "fps": float(a["fps"]),
                          "spacing": [float(a["pixel_spacing_mm"])] * 2, "view": str(a["view"]),
                          "ed": int(a["ed_frame"]), "es": int(a["es_frame"]),
                          "gls_reference": float(gls) if gls is not None else None,
                          "centreline_ordered": centreline_ordered(a)})
        return entry

    # the split needs every file's patient (a header attribute): unreadable files are set aside with their error
    # and placed in the split under their id; only those of the requested subset are reported
    entries: list[dict] = []
    for p in files:
        try:
            entries.append(build(p))
        except Exception as e:  # readers of corrupt files raise many unrelated types; reported below if in the split
            if ledger is None:
                raise
            vid = str(p.relative_to(root).with_suffix(""))
            entries.append({"video": str(p), "id": vid, "patient": vid, "error": e})
    subsets = patient_split([e["patient"] for e in entries], (1.0 - val_fraction - test_fraction, val_fraction,
                                                                test_fraction), seed, names=("train", "val", "test"))
    subset_of = {k: s for s, ks in subsets.items() for k in ks}
    for e in entries:
        e["split"] = subset_of[e["patient"]]

    def keep(e: dict) -> dict:
        if "error" in e:
            raise e["error"]
        return e

    out = build_cases([e for e in entries if split is None or e["split"] == split], keep, lambda e: e["video"],
                      ledger, root)
    if not out:
        raise DataError(f"{root}: no tracking videos in split {split!r}")
    return out
