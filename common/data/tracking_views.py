"""Rotated and flipped copies of tracking HDF5 files: the non-standard views (probe rotations, apex at the bottom)
on which the impartial-motion claim of ``specknet_tracking`` is tested.

Every frame is rotated by quarter turns (``np.rot90``: exact, no interpolation) and optionally flipped top to bottom;
``tracks`` and ``labels`` follow the frames exactly, so the copies carry the same ground truth as the originals.
Lengths are unchanged by these rigid maps, so ``gls_reference`` and every other attribute stay true.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["VIEWS", "rotate_flip_tracking_h5", "write_tracking_views"]

# view name -> (quarter turns counter-clockwise, flip top to bottom afterwards)
VIEWS: dict[str, tuple[int, bool]] = {"upright": (0, False), "rot90": (1, False), "vflip": (0, True)}


def rotate_flip_tracking_h5(src: str | Path, dst: str | Path, quarter_turns: int = 0, vflip: bool = False) -> Path:
    """Write a copy of tracking file ``src`` at ``dst`` with every frame rotated by ``quarter_turns`` x 90°
    counter-clockwise (``np.rot90`` on the ``(H, W)`` axes) and then, with ``vflip``, flipped top to bottom.

    ``tracks`` ``(x, y)`` (pixel ``[r, c]`` centred at ``x = c, y = r``) and ``labels`` follow the frames exactly;
    ``visible`` and every attribute are kept (lengths are unchanged, so ``gls_reference`` stays true). Returns ``dst``.
    """
    import h5py

    src, dst = Path(src), Path(dst)
    with h5py.File(src, "r") as f:
        for key in ("video", "tracks", "visible"):
            if key not in f:
                raise ValueError(f"{src}: not a tracking file, dataset {key!r} is missing")
        video = f["video"][()]
        tracks = f["tracks"][()].astype(np.float64)
        visible = f["visible"][()]
        labels = f["labels"][()] if "labels" in f else None
        attrs = dict(f.attrs)
    if video.ndim != 3:
        raise ValueError(f"{src}: 'video' must be (T, H, W), got {video.shape}")
    for _ in range(int(quarter_turns) % 4):
        width = video.shape[2]
        # np.rot90 puts input pixel [r, c] at [W - 1 - c, r]: x' = y, y' = W - 1 - x
        video = np.rot90(video, 1, axes=(1, 2))
        labels = None if labels is None else np.rot90(labels, 1, axes=(1, 2))
        tracks = np.stack([tracks[..., 1], (width - 1) - tracks[..., 0]], axis=-1)
    if vflip:
        height = video.shape[1]
        video, labels = video[:, ::-1], None if labels is None else labels[:, ::-1]
        tracks = np.stack([tracks[..., 0], (height - 1) - tracks[..., 1]], axis=-1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(dst, "w") as f:
        f.create_dataset("video", data=np.ascontiguousarray(video))
        f.create_dataset("tracks", data=tracks.astype(np.float32))
        f.create_dataset("visible", data=visible)
        if labels is not None:
            f.create_dataset("labels", data=np.ascontiguousarray(labels))
        f.attrs.update(attrs)
    return dst


def write_tracking_views(src_dir: str | Path, out_dir: str | Path,
                         views: Mapping[str, tuple[int, bool]] | None = None) -> Path:
    """Write every ``*.h5`` of ``src_dir`` in each view of ``views`` (default :data:`VIEWS`) to
    ``out_dir/<view>/<name>.h5``; the sub-folders are the evaluation report's datasets. Returns ``out_dir``."""
    files = sorted(Path(src_dir).glob("*.h5"))
    if not files:
        raise FileNotFoundError(f"{src_dir}: no tracking .h5 files to rotate or flip")
    for name, (turns, vflip) in (VIEWS if views is None else views).items():
        for p in files:
            rotate_flip_tracking_h5(p, Path(out_dir) / name / p.name, turns, vflip)
    return Path(out_dir)
