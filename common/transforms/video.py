"""Video + trajectory transforms for point tracking (SpeckNet impartial-motion training, METHODS.md §4).

Sample dict (time is always axis 0):

- ``video``: ``(T, H, W)`` frames (numpy or torch, any dtype),
- ``tracks``: ``(T, N, 2)`` float32 point positions ``(x, y)`` in pixels, pixel-centre convention (x = column index,
  y = row index of a pixel centre; see :mod:`common.transforms.points`),
- ``visible``: ``(T, N)`` bool,
- ``query_frame`` (optional): int, the frame on which the N query points are given.

Temporal transforms slice every time-major key identically and keep ``query_frame`` pointing at the same frame
content when it is present (set the query frame last, as :func:`impartial_motion_augmentation` does).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import CastToTyped, Compose, MapTransform, Randomizable, RandomizableTransform
from monai.utils import ensure_tuple

from common.transforms.intensity import (
    RandBrightnessContrastd,
    RandEmbossd,
    RandJPEGCompressiond,
    RandMotionBlurd,
    RandRelativeGaussianNoised,
    RandSharpend,
)
from common.transforms.paired import RandPairedAffined
from common.transforms.points import restore_type, to_numpy

__all__ = [
    "RandImpartialAffined",
    "RandFrameSkipd",
    "RandReverseSequenced",
    "overlapping_segments",
    "SampleClipd",
    "RandQueryFramed",
    "QueryFramed",
    "diastasis_frame",
    "impartial_motion_augmentation",
]

TIME_KEYS = ("video", "tracks", "visible")


def _index_time(x: Any, index: np.ndarray) -> Any:
    """``x[index]`` along axis 0 for numpy or torch (MetaTensor metadata kept), as a contiguous copy."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(index, dtype=torch.long, device=x.device)].clone()
    return np.ascontiguousarray(np.asarray(x)[index])


def _num_frames(d: Mapping, keys: Sequence[Hashable], name: str) -> int:
    lengths = {k: int(d[k].shape[0]) for k in keys if k in d}
    if not lengths:
        raise KeyError(f"{name}: none of the time-major keys {tuple(keys)} is in the data")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{name}: time-major keys disagree on the number of frames: {lengths}")
    t = next(iter(lengths.values()))
    if t < 1:
        raise ValueError(f"{name}: the sequence has no frames")
    return t


class _TimeMapTransform(MapTransform):
    """Common frame of the temporal transforms: resample every time-major key with one frame index array."""

    def __init__(self, keys: KeysCollection, query_key: Hashable | None, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.query_key = query_key

    def _take(self, d: dict, index: np.ndarray, invalid: np.ndarray | None = None,
              visible_keys: Sequence[Hashable] = ()) -> dict:
        """Replace each key by ``key[index]``; frames flagged in ``invalid`` are marked invisible in visible keys."""
        for key in self.key_iterator(d):
            out = _index_time(d[key], index)
            if key in visible_keys and invalid is not None and invalid.any():
                vis = to_numpy(out).astype(bool)
                vis[invalid] = False
                out = restore_type(vis, out)
            d[key] = out
        return d

    def _remap_query(self, d: dict, index: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Point the query frame at the output frame showing the same source frame (nearest one if dropped)."""
        if self.query_key is None or self.query_key not in d:
            return
        q = int(d[self.query_key])
        cand = np.arange(len(index)) if valid is None else np.flatnonzero(valid)
        if cand.size == 0:
            cand = np.arange(len(index))
        d[self.query_key] = int(cand[np.argmin(np.abs(index[cand] - q))])


class RandImpartialAffined(RandPairedAffined):
    """The impartial-motion affine set: one draw per clip, applied to every frame and to the trajectories.

    Scale, translation, shear, rotation (up to ±``rotate_range`` degrees), horizontal flip and vertical flip are each
    switched on with probability ``component_prob`` (paper: 0.5). Points that leave the image become invisible.
    Ranges other than the rotation are not given in the paper; the defaults are our choice (the ``specknet_tracking``
    bundle sets all of them from its config: ``scale_range``, ``translate_range``, ``shear_range``,
    ``rotate_range``, ``affine_prob``).

    Args:
        keys: video keys ``(T, H, W)`` (or any ``(..., H, W)``).
        tracks_key: ``(T, N, 2)`` ``(x, y)`` trajectories. visible_key: ``(T, N)`` bool.
        component_prob: probability of each component.
        rotate_range: degrees, uniform in ``(-rotate_range, rotate_range)``.
        scale_range: zoom ``(low, high)``, log-uniform. translate_range: fraction of (W, H) per axis.
        shear_range: degrees, in x and y.
        mode / padding_mode: resampling of the video (``"bilinear"``, ``"zeros"``: outside the image is black, as
            outside an ultrasound sector).
    """

    def __init__(
        self,
        keys: KeysCollection = ("video",),
        tracks_key: Hashable = "tracks",
        visible_key: Hashable | None = "visible",
        prob: float = 1.0,
        component_prob: float = 0.5,
        rotate_range: float = 120.0,
        scale_range: Sequence[float] = (0.8, 1.25),
        translate_range: float = 0.1,
        shear_range: float = 15.0,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys,
            point_keys=(tracks_key,),
            visible_keys=() if visible_key is None else (visible_key,),
            mode=mode,
            padding_mode=padding_mode,
            prob=prob,
            rotate_range=rotate_range,
            rotate_prob=component_prob,
            scale_range=scale_range,
            scale_prob=component_prob,
            translate_range=translate_range,
            translate_prob=component_prob,
            shear_range=shear_range,
            shear_prob=component_prob,
            hflip_prob=component_prob,
            vflip_prob=component_prob,
            allow_missing_keys=allow_missing_keys,
        )


class RandFrameSkipd(Randomizable, _TimeMapTransform):
    """Frame skipping: drop ``k`` frames between kept frames (keep every ``(k+1)``-th), ``k`` uniform in 0..max_skip.

    Simulates lower frame rates (larger motion between frames). The first kept frame is drawn in ``0..k`` so every
    frame can survive. By default (``min_frames=None``, the paper's setting) ``k`` is not capped: a short video may
    keep only a few frames, and :class:`SampleClipd` pads the clip with frames marked invisible. With
    ``min_frames`` the skip is capped so at least ``min(min_frames, T)`` frames remain (an option, not the paper).

    Args:
        keys: time-major keys (axis 0 = time), e.g. ``("video", "tracks", "visible")``.
        max_skip: largest number of dropped frames between kept ones (paper: 5).
        min_frames: optional lower bound on the number of kept frames.
        query_key: optional query frame key, remapped to the kept frame nearest to it.
    """

    def __init__(
        self,
        keys: KeysCollection = TIME_KEYS,
        max_skip: int = 5,
        min_frames: int | None = None,
        query_key: Hashable | None = "query_frame",
        allow_missing_keys: bool = False,
    ) -> None:
        _TimeMapTransform.__init__(self, keys, query_key, allow_missing_keys)
        if max_skip < 0:
            raise ValueError(f"RandFrameSkipd: max_skip must be >= 0, got {max_skip}")
        if min_frames is not None and min_frames < 1:
            raise ValueError(f"RandFrameSkipd: min_frames must be >= 1, got {min_frames}")
        self.max_skip, self.min_frames = int(max_skip), min_frames
        self.skip, self.offset = 0, 0

    def randomize(self, num_frames: int) -> None:
        """Draw ``self.skip`` and ``self.offset`` for a sequence of ``num_frames`` frames."""
        raw_skip = int(self.R.randint(0, self.max_skip + 1))
        u = self.R.rand()
        need = 1 if self.min_frames is None else min(self.min_frames, num_frames)
        # `need` frames starting at `offset` with step `s` require offset + (need - 1) * s <= T - 1
        max_step = (num_frames - 1) // (need - 1) if need > 1 else raw_skip + 1
        skip = max(0, min(raw_skip, max_step - 1))
        max_offset = max(0, min(skip, num_frames - 1 - (need - 1) * (skip + 1)))
        self.skip, self.offset = skip, int(u * (max_offset + 1))

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        d = dict(data)
        t = _num_frames(d, self.keys, type(self).__name__)
        if randomize:
            self.randomize(t)
        index = np.arange(self.offset, t, self.skip + 1)
        self._remap_query(d, index)
        return self._take(d, index)


class RandReverseSequenced(RandomizableTransform, _TimeMapTransform):
    """Reverse the whole sequence in time with probability ``prob`` (paper: 0.2), trajectories and visibility too.

    Cardiac motion is cyclic, so a reversed clip is a plausible clip with opposite motion.
    """

    def __init__(
        self,
        keys: KeysCollection = TIME_KEYS,
        prob: float = 0.2,
        query_key: Hashable | None = "query_frame",
        allow_missing_keys: bool = False,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandReverseSequenced: prob must be in [0, 1], got {prob}")
        RandomizableTransform.__init__(self, prob)
        _TimeMapTransform.__init__(self, keys, query_key, allow_missing_keys)

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        d = dict(data)
        t = _num_frames(d, self.keys, type(self).__name__)
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return d
        index = np.arange(t - 1, -1, -1)
        self._remap_query(d, index)
        return self._take(d, index)


def overlapping_segments(num_frames: int, clip_len: int = 36, overlap: float = 0.5) -> list[tuple[int, int]]:
    """Segments ``[(start, stop), ...]`` of ``clip_len`` frames covering ``0..num_frames`` with ~``overlap`` overlap.

    Starts advance by ``round(clip_len * (1 - overlap))`` (at least 1); a last segment ending exactly at
    ``num_frames`` is added when the regular ones stop short, so every frame is covered (its overlap with the
    previous segment can then exceed ``overlap``). A sequence not longer than ``clip_len`` gives
    ``[(0, num_frames)]`` (shorter than ``clip_len``; :class:`SampleClipd` pads it).
    """
    if num_frames < 1:
        raise ValueError(f"overlapping_segments: num_frames must be >= 1, got {num_frames}")
    if clip_len < 1:
        raise ValueError(f"overlapping_segments: clip_len must be >= 1, got {clip_len}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlapping_segments: overlap must be in [0, 1), got {overlap}")
    if num_frames <= clip_len:
        return [(0, num_frames)]
    stride = max(1, int(round(clip_len * (1.0 - overlap))))
    segments = [(s, s + clip_len) for s in range(0, num_frames - clip_len + 1, stride)]
    if segments[-1][1] < num_frames:
        segments.append((num_frames - clip_len, num_frames))
    return segments


class SampleClipd(Randomizable, _TimeMapTransform):
    """Pick one of :func:`overlapping_segments` at random and cut every time-major key to it.

    A sequence shorter than ``clip_len`` is padded by repeating its last frame (video, tracks); the padded frames
    are marked invisible in ``visible_keys`` so losses and metrics ignore them. The chosen ``(start, stop)`` is in
    ``self.segment``. Output time length is always ``clip_len``.

    Args:
        keys: time-major keys. visible_keys: the subset holding visibility ``(T, N)``.
        clip_len: frames per clip (paper: 36). overlap: overlap of consecutive candidate segments (paper: ~0.5).
        query_key: optional query frame key, remapped into the clip (nearest non-padded frame if cut away).
    """

    def __init__(
        self,
        keys: KeysCollection = TIME_KEYS,
        clip_len: int = 36,
        overlap: float = 0.5,
        visible_keys: KeysCollection = ("visible",),
        query_key: Hashable | None = "query_frame",
        allow_missing_keys: bool = False,
    ) -> None:
        _TimeMapTransform.__init__(self, keys, query_key, allow_missing_keys)
        overlapping_segments(clip_len + 1, clip_len, overlap)  # validates the arguments early
        self.clip_len, self.overlap = int(clip_len), float(overlap)
        self.visible_keys = ensure_tuple(visible_keys)
        self.segment = (0, 0)

    def randomize(self, num_frames: int) -> None:
        segments = overlapping_segments(num_frames, self.clip_len, self.overlap)
        self.segment = segments[int(self.R.randint(len(segments)))]

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        d = dict(data)
        t = _num_frames(d, self.keys, type(self).__name__)
        if randomize:
            self.randomize(t)
        start, stop = self.segment
        if stop > t:
            raise ValueError(f"SampleClipd: segment {self.segment} does not fit a {t}-frame sequence; randomize again")
        index = np.arange(start, stop)
        pad = self.clip_len - len(index)
        invalid = np.zeros(self.clip_len, dtype=bool)
        if pad > 0:
            invalid[len(index) :] = True
            index = np.concatenate([index, np.full(pad, stop - 1)])
        self._remap_query(d, index, valid=~invalid)
        return self._take(d, index, invalid, self.visible_keys)


def _query_candidates(visible: np.ndarray) -> np.ndarray:
    """Frames where all points are visible; else the frames with the most visible points."""
    if visible.ndim != 2:
        raise ValueError(f"visibility must be (T, N), got shape {visible.shape}")
    counts = visible.sum(axis=1)
    return np.flatnonzero(counts == counts.max())


class RandQueryFramed(Randomizable, MapTransform):
    """Random query frame among the frames where the points are visible (training: temporal-phase invariance).

    Candidates are the frames where all N points are visible; if there are none, the frames where the most points
    are visible. Writes an int to ``query_key``.

    Args:
        visible_key: ``(T, N)`` bool visibility.
        query_key: output key.
    """

    def __init__(
        self, visible_key: Hashable = "visible", query_key: Hashable = "query_frame", allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, visible_key, allow_missing_keys)
        self.visible_key, self.query_key = visible_key, query_key
        self.query = 0

    def randomize(self, visible: np.ndarray) -> None:
        cand = _query_candidates(visible)
        self.query = int(cand[self.R.randint(len(cand))])

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if randomize:
                self.randomize(to_numpy(d[key]).astype(bool))
            d[self.query_key] = self.query
        return d


def diastasis_frame(num_frames: int, fraction: float = 0.72) -> int:
    """Validation/inference query frame ``int(fraction * T)`` (≈ diastasis, the calmest phase of the cycle)."""
    if num_frames < 1:
        raise ValueError(f"diastasis_frame: num_frames must be >= 1, got {num_frames}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"diastasis_frame: fraction must be in [0, 1], got {fraction}")
    return min(int(fraction * num_frames), num_frames - 1)


class QueryFramed(MapTransform):
    """Deterministic query frame ``int(fraction * T)`` (validation: 0.72; ``fraction=0`` gives the first frame).

    Reads ``T`` from ``visible_key`` (axis 0) and writes an int to ``query_key``.
    """

    def __init__(
        self,
        visible_key: Hashable = "visible",
        query_key: Hashable = "query_frame",
        fraction: float = 0.72,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, visible_key, allow_missing_keys)
        diastasis_frame(1, fraction)  # validates fraction
        self.query_key, self.fraction = query_key, float(fraction)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.query_key] = diastasis_frame(int(d[key].shape[0]), self.fraction)
        return d


def impartial_motion_augmentation(
    enabled: bool = True,
    clip_len: int = 36,
    overlap: float = 0.5,
    max_skip: int = 5,
    skip_min_frames: int | None = None,
    reverse_prob: float = 0.2,
    affine_prob: float = 0.5,
    rotate_range: float = 120.0,
    scale_range: Sequence[float] = (0.8, 1.25),
    translate_range: float = 0.1,
    shear_range: float = 15.0,
    image_prob: float = 0.3,
    query: str | None = None,
    video_key: Hashable = "video",
    tracks_key: Hashable = "tracks",
    visible_key: Hashable = "visible",
    query_key: Hashable = "query_frame",
    cast_float: bool = True,
) -> Compose:
    """SpeckNet training augmentation (METHODS.md §4) as a MONAI ``Compose``.

    ``enabled=True`` (impartial-motion training), in this order:

    1. (``cast_float``) video to float32, so later steps do not re-quantise an 8-bit video,
    2. :class:`RandFrameSkipd` ``k`` uniform in 0..``max_skip`` (paper: 0-5; not capped unless ``skip_min_frames``
       is given),
    3. :class:`SampleClipd` a random ~``overlap`` segment of ``clip_len`` frames (a shorter sequence is padded with
       frames marked invisible, so they carry no loss and are never the query frame),
    4. :class:`RandReverseSequenced` with ``reverse_prob``,
    5. :class:`RandImpartialAffined`: scale, translate, shear, rotation ±``rotate_range``°, h/v flip, each with
       ``affine_prob``; same for every frame and the tracks; points leaving the image become invisible,
    6. image augmentations, each with ``image_prob`` (< 0.5) and one parameter set per clip: motion blur, sharpen,
       emboss, brightness/contrast, JPEG-like compression, Gaussian noise,
    7. query frame (last, so it sees the final visibility): ``query="random"`` (default) → :class:`RandQueryFramed`.

    ``enabled=False`` is the paper's baseline training (Azad et al.): only step 1, clip sampling (step 3) and the
    query frame, with ``query="first"`` by default (the baselines query on the first frame only). ``query`` may be
    ``"random"``, ``"first"`` or ``"diastasis"`` (``int(0.72 T)``) in either mode.

    The sample dict holds ``video`` (T, H, W), ``tracks`` (T, N, 2) float32 ``(x, y)``, ``visible`` (T, N) bool; the
    output has ``clip_len`` frames and an int ``query_frame``.
    """
    if not 0.0 <= image_prob < 0.5:
        raise ValueError(f"impartial_motion_augmentation: image_prob must be in [0, 0.5), got {image_prob}")
    query = query if query is not None else ("random" if enabled else "first")
    time_keys = (video_key, tracks_key, visible_key)
    transforms: list = []
    if cast_float:
        transforms.append(CastToTyped(keys=video_key, dtype=np.float32))
    if enabled:
        transforms.append(RandFrameSkipd(time_keys, max_skip=max_skip, min_frames=skip_min_frames, query_key=query_key))
    transforms.append(SampleClipd(time_keys, clip_len=clip_len, overlap=overlap, visible_keys=(visible_key,),
                                  query_key=query_key))
    if enabled:
        img = (video_key,)
        transforms += [
            RandReverseSequenced(time_keys, prob=reverse_prob, query_key=query_key),
            RandImpartialAffined(
                img,
                tracks_key=tracks_key,
                visible_key=visible_key,
                component_prob=affine_prob,
                rotate_range=rotate_range,
                scale_range=scale_range,
                translate_range=translate_range,
                shear_range=shear_range,
            ),
            RandMotionBlurd(img, prob=image_prob),
            RandSharpend(img, prob=image_prob),
            RandEmbossd(img, prob=image_prob),
            RandBrightnessContrastd(img, prob=image_prob),
            RandJPEGCompressiond(img, prob=image_prob),
            RandRelativeGaussianNoised(img, prob=image_prob),
        ]
    if query == "random":
        transforms.append(RandQueryFramed(visible_key, query_key))
    elif query == "first":
        transforms.append(QueryFramed(visible_key, query_key, fraction=0.0))
    elif query == "diastasis":
        transforms.append(QueryFramed(visible_key, query_key, fraction=0.72))
    else:
        raise ValueError(
            f"impartial_motion_augmentation: query must be 'random', 'first' or 'diastasis', got {query!r}"
        )
    return Compose(transforms)
