"""Inference for paired-frame echocardiography segmentation (BOTM): frames, pairs and whole 2D+t sequences.

The annotators' and PACS users' view: give a file, a folder or a list of files; get one mask per frame, written as
NIfTI with the input's geometry at the input's resolution, optionally with an uncertainty map (softmax entropy, the
paper's Fig. 7) and a PNG preview.

* :func:`echo_inference_datalist` -- inputs -> cases. A 2D frame is a case of one frame (it is paired with itself);
  a 2D+t file (NIfTI, MetaImage, a multi-frame DICOM cine, or a NumPy ``(T, H, W)`` array) is a sequence; files named
  ``<prefix>_ED.<ext>`` and ``<prefix>_ES.<ext>`` in one folder form an ED/ES pair; a list of 2D frame files is one
  case (a pair when two). ``*_gt.*`` files (CAMUS/TED reference labels) are skipped in folders.
* :class:`LoadEchoFramesd` -- loads a case as ``(T, H, W)`` (frames as channels), apex at the top, and records
  where every frame came from (``frame_info``, a JSON string, so it survives collation unchanged).
* :class:`EchoSequenceInferer` -- a MONAI inferer: ``(B, T, H, W)`` -> per-frame logits ``(B, T C, H, W)``. It
  resizes the frames to the network size, runs the network on frame pairs (:func:`frame_pairs`: the frame with
  itself for one frame, the pair for two, consecutive pairs ``(t, t+1)`` cyclically for a sequence, as in TED
  training), averages the logits each frame receives from the pairs it is in, and resizes them back.
* :class:`FrameArgmaxd` -- logits ``(T C, H, W)`` -> label maps ``(T, H, W)`` (+ normalised entropy ``(T, H, W)``).
* :class:`SaveEchoPredictiond` -- writes the masks (and entropy maps) per input file on that file's grid (its shape
  and affine, :func:`common.data.loading.write_like`), a PNG preview per case and ``predictions.json`` (inputs,
  outputs, per-frame class areas in mm^2).
* :func:`plot_echo_overlay` -- image with reference (dashed) and predicted (solid) contours, and the entropy map.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from common.data.io import DataError, read_image
from common.data.loading import check_image_array, from_frames, read_npy, to_frames, write_like

__all__ = [
    "ECHO_SUFFIXES",
    "CLASS_COLOURS",
    "EchoSequenceInferer",
    "FrameArgmaxd",
    "LoadEchoFramesd",
    "SaveEchoPredictiond",
    "as_flag",
    "echo_inference_datalist",
    "frame_pairs",
    "load_frames",
    "normalised_entropy",
    "plot_echo_overlay",
]

ECHO_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".dcm", ".dicom", ".npy")
# LV red, Myo green, LA blue (the colours of common.data.synthetic.echo previews)
CLASS_COLOURS = {1: "#ff4040", 2: "#40ff60", 3: "#4090ff", 4: "#ffd040", 5: "#ff40ff"}
_PAIRINGS = ("auto", "cyclic", "self")


def as_flag(value: Any, name: str = "flag") -> bool:
    """A command-line flag as a bool: ``True``/``False`` or the strings true/false/yes/no/1/0 (any case).

    ``python -m monai.bundle run --save_png false`` passes the string ``"false"``, which plain ``bool()`` would take
    as true.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off", "none", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


# ------------------------------------------------------------------------------------------------------- loading
def _suffix(path: str | Path) -> str:
    name = str(path).lower()
    return next((s for s in ECHO_SUFFIXES if name.endswith(s)), "")


_KINDS = {"nifti": "nifti", "itk": "mhd", "dicom": "dicom", "dicom_series": "dicom"}


def _read_echo(path: str | Path) -> tuple[np.ndarray, tuple[float, float], str, tuple[int, ...], np.ndarray]:
    """``(frames (T, H, W), (row_mm, col_mm), kind, file shape in index order, 4x4 RAS affine)`` of one file.

    NIfTI, MetaImage and DICOM (a frame or a cine) are read by :func:`common.data.io.read_image` in the index
    order of :mod:`common.data.loading` and turned into frames by one rule (:func:`~common.data.loading.to_frames`);
    the file's shape and affine are kept so the writer restores its grid. ``.npy`` arrays are frames already
    (``(H, W)`` or ``(T, H, W)``, no geometry: unit spacing). Every check of
    :func:`~common.data.loading.check_image_array` applies (complex, NaN/Inf, degenerate sizes, ...).
    """
    p = Path(path)
    suffix = _suffix(p)
    if not suffix:
        raise DataError(f"{p}: unsupported echo file (expected one of {', '.join(ECHO_SUFFIXES)})")
    if suffix == ".npy":
        arr = read_npy(p)
        if arr.ndim not in (2, 3):
            raise DataError(f"{p}: expected a numeric (H, W) frame or (T, H, W) sequence, got {arr.dtype} {arr.shape}")
        frames = arr[None] if arr.ndim == 2 else arr
        shape = tuple(reversed(arr.shape))  # the index order the written mask will have: (W, H[, T])
        check_image_array(frames.transpose(2, 1, 0), p)
        return frames, (1.0, 1.0), "npy", shape, np.eye(4)
    img = read_image(p)
    arr = np.asarray(img.array)
    if arr.ndim == 4 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise DataError(f"{p}: expected a 2D image or a 2D+t sequence, got shape {img.array.shape}")
    spacing = (float(img.spacing[1]), float(img.spacing[0]))
    kind = _KINDS.get(str(img.meta.get("format")), "nifti")
    return to_frames(arr), spacing, kind, tuple(int(s) for s in img.array.shape), np.asarray(img.affine)


def _load_one(path: str | Path) -> tuple[np.ndarray, tuple[float, float], str]:
    """``(frames (T, H, W), (row_mm, col_mm), kind)`` of one file; ``kind`` is nifti, mhd, dicom or npy."""
    frames, spacing, kind, _, _ = _read_echo(path)
    return frames, spacing, kind


def load_frames(paths: str | Path | Sequence[str | Path], frames: Sequence[int] | None = None
                ) -> tuple[np.ndarray, tuple[float, float], list[dict]]:
    """Load one file or several (their frames concatenated in order) and pick ``frames`` of the result.

    Returns ``(array (T, H, W) float32, spacing (row, col) mm, sources)`` where ``sources`` lists, per file, its
    ``path``, ``kind`` and ``positions`` (indices into the returned stack of the frames taken from it),
    ``source_frames`` (their indices in the file), ``shape`` (the file's array shape in index order) and
    ``affine`` (its 4x4 RAS affine, a nested list) -- what the writer needs to restore the file's grid. Raises
    ``FileNotFoundError``/``DataError`` naming the file.
    """
    plist = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not plist:
        raise DataError("no input file given")
    stacks, sources, spacing, shape = [], [], None, None
    offset = 0
    for p in plist:
        arr, sp, kind, file_shape, affine = _read_echo(p)
        if shape is None:
            shape, spacing = arr.shape[-2:], sp
        elif arr.shape[-2:] != shape:
            raise DataError(f"{p}: frame size {arr.shape[-2:]} differs from {Path(plist[0]).name} {shape}")
        stacks.append(arr)
        sources.append({"path": str(p), "kind": kind, "n_frames": int(arr.shape[0]),
                        "range": (offset, offset + int(arr.shape[0])), "shape": list(file_shape),
                        "affine": np.asarray(affine, dtype=np.float64).tolist()})
        offset += int(arr.shape[0])
    stack = np.concatenate(stacks, axis=0)
    idx = list(range(stack.shape[0])) if frames is None else [int(f) for f in frames]
    bad = [f for f in idx if not 0 <= f < stack.shape[0]]
    if bad or not idx:
        raise DataError(f"{plist[0]}: frame indices {bad or idx} out of range 0..{stack.shape[0] - 1}")
    out_sources = []
    for s in sources:
        lo, hi = s.pop("range")
        pos = [k for k, f in enumerate(idx) if lo <= f < hi]
        if pos:
            out_sources.append({**s, "positions": pos, "source_frames": [idx[k] - lo for k in pos]})
    return np.ascontiguousarray(stack[idx], dtype=np.float32), spacing, out_sources  # type: ignore[return-value]


class LoadEchoFramesd(MapTransform):
    """Load echo cases as ``(T, H, W)`` MetaTensors (frames as channels) for every key (image, label).

    Each key holds a path or a list of paths (frames concatenated in order). ``data[frames_key]`` (optional, a list
    of frame indices into the concatenated stack; removed from the output) selects the frames -- e.g. ``[t, t+1]``
    of a TED sequence. Every key must give the same ``(T, H, W)``. The first key's sources go to
    ``data[info_key]`` as a JSON string ``{"sources": [...], "spacing": [row, col], "shape": [H, W], "frames":
    [...]}`` (see :func:`load_frames`), which the metrics and the writer use; the MetaTensor's affine carries the
    spacing. Raises ``FileNotFoundError``/``DataError`` naming the file.
    """

    def __init__(self, keys: KeysCollection, frames_key: str = "frames", info_key: str = "frame_info",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frames_key = frames_key
        self.info_key = info_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        frames = d.pop(self.frames_key, None)
        if isinstance(frames, str):
            frames = json.loads(frames)
        first_shape, first_key = None, None
        for key in self.key_iterator(d):
            arr, (sr, sc), sources = load_frames(d[key], frames)
            if first_shape is None:
                first_shape, first_key = arr.shape, key
                frame_ids = [f for s in sources for f in s["source_frames"]]
                d[self.info_key] = json.dumps({"sources": sources, "spacing": [sr, sc], "shape": list(arr.shape[1:]),
                                               "frames": frame_ids})
            elif arr.shape != first_shape:
                raise DataError(f"{sources[0]['path']}: {key} shape {arr.shape} differs from {first_key} shape "
                                f"{first_shape}")
            affine = torch.as_tensor(np.diag([sr, sc, 1.0, 1.0]))
            src = sources[0]["path"]
            d[key] = MetaTensor(torch.from_numpy(arr), affine=affine,
                                meta={"filename_or_obj": src, "spacing": (sr, sc), "original_channel_dim": 0})
        return d


# -------------------------------------------------------------------------------------------------------- datalist
def _is_echo_file(p: Path) -> bool:
    return p.is_file() and bool(_suffix(p)) and not p.name.endswith(".raw")


def _stem(p: Path) -> str:
    return p.name[: -len(_suffix(p))] if _suffix(p) else p.stem


def _n_frames(p: Path) -> int:
    """Frames in a file, from the header where possible (a 2D image counts as one)."""
    if _suffix(p) == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise DataError(f"{p}: cannot read NumPy array ({type(e).__name__}: {e})") from e
        return 1 if arr.ndim == 2 else int(arr.shape[0])
    from common.data.camus import image_header

    shape, _ = image_header(p)
    return 1 if len(shape) == 2 else int(shape[0])


def _single_frames(*paths: Path) -> bool:
    """True when every file is one 2D frame; an unreadable header counts as not (the file then becomes a case of its
    own, and screening reports why it cannot be read instead of the folder failing)."""
    try:
        return all(_n_frames(p) == 1 for p in paths)
    except Exception:  # header readers raise many types for corrupt files
        return False


def echo_inference_datalist(input_path: str | Path | Sequence[str | Path]) -> list[dict]:
    """Cases to segment from a file, a folder (searched recursively) or a list of files (module docstring).

    Each case: ``{"image": path or [paths], "case": name, "output_stems": JSON list}`` -- ``output_stems`` gives, per
    input file, its output name without extension, relative to the output folder (a folder input keeps its
    sub-folders). Raises ``FileNotFoundError``/``DataError`` naming the input.
    """
    if isinstance(input_path, (list, tuple)):
        files = [Path(p) for p in input_path]
        for p in files:
            if not p.is_file():
                raise FileNotFoundError(f"input file {p} not found")
            if not _suffix(p):
                raise DataError(f"{p}: unsupported echo file (expected one of {', '.join(ECHO_SUFFIXES)})")
        if len(files) == 1:
            return echo_inference_datalist(files[0])
        multi = [p for p in files if _n_frames(p) != 1]
        if multi:
            raise DataError(f"{multi[0]}: a list input must be 2D frames forming one case (a pair when two); "
                            "give a sequence file on its own")
        return [{"image": [str(p) for p in files], "case": "_".join(_stem(p) for p in files),
                 "output_stems": json.dumps([_stem(p) for p in files])}]
    root = Path(str(input_path)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"input_path {root} not found")
    if root.is_file():
        if not _suffix(root):
            raise DataError(f"{root}: unsupported echo file (expected one of {', '.join(ECHO_SUFFIXES)})")
        return [{"image": str(root), "case": _stem(root), "output_stems": json.dumps([_stem(root)])}]
    files = sorted(p for p in root.rglob("*") if _is_echo_file(p) and not _stem(p).lower().endswith("_gt"))
    if not files:
        raise DataError(f"{root}: no echo images found (looked for {', '.join(ECHO_SUFFIXES)}, *_gt files excluded)")
    by_name = {str(p.relative_to(root)): p for p in files}
    cases, used = [], set()
    for rel, p in by_name.items():
        stem = _stem(p)
        if stem.upper().endswith("_ED") and rel not in used:
            partner = p.with_name(stem[:-3] + stem[-3:].replace("ED", "ES").replace("ed", "es") + _suffix(p))
            prel = str(partner.relative_to(root))
            if prel in by_name and _single_frames(p, partner):
                used.update({rel, prel})
                rel_dir = p.parent.relative_to(root)
                cases.append({"image": [str(p), str(partner)], "case": str(rel_dir / stem[:-3]),
                              "output_stems": json.dumps([str(rel_dir / _stem(p)), str(rel_dir / _stem(partner))])})
    for rel, p in by_name.items():
        if rel in used:
            continue
        rel_stem = str(p.parent.relative_to(root) / _stem(p))
        cases.append({"image": str(p), "case": rel_stem, "output_stems": json.dumps([rel_stem])})
    return cases


# --------------------------------------------------------------------------------------------------------- inferer
def frame_pairs(n_frames: int, pairing: str = "auto") -> list[tuple[int, int]]:
    """The (source, target) frame pairs the network sees for a case of ``n_frames`` frames.

    ``"auto"``: ``[(0, 0)]`` for one frame, ``[(0, 1)]`` for two (an ED/ES pair), consecutive pairs ``(t, t+1)``
    with ``(T-1, 0)`` closing the cycle for three or more (TED's training pairs). ``"cyclic"``: consecutive pairs
    for any ``T >= 2``. ``"self"``: every frame paired with itself (single-frame segmentation).
    """
    if n_frames < 1:
        raise ValueError(f"a case needs at least one frame, got {n_frames}")
    if pairing not in _PAIRINGS:
        raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}")
    if pairing == "self" or n_frames == 1:
        return [(t, t) for t in range(n_frames)]
    if pairing == "auto" and n_frames == 2:
        return [(0, 1)]
    return [(t, (t + 1) % n_frames) for t in range(n_frames)]


def _size_multiple(network: Any) -> int | None:
    net = getattr(network, "module", network)  # DistributedDataParallel / DataParallel
    m = getattr(net, "size_multiple", None)
    return int(m) if isinstance(m, int) else None


class EchoSequenceInferer(Inferer):
    """Per-frame logits of echo cases from a paired-frame network (see the module docstring).

    Args:
        spatial_size: ``(h, w)`` the network runs at (BOTM: 672x672); None keeps the input size.
        pairing: see :func:`frame_pairs`.
        batch_size: frame pairs per network call.
        mode: interpolation of the frames to the network size and of the logits back (``bilinear``, as the
            training ``Resized``; ``align_corners=False``).

    ``__call__(inputs, network)``: ``inputs`` ``(B, T, H, W)`` (a pair is ``T = 2``) -> ``(B, T C, H, W)`` float
    logits, frame ``t``'s classes in channels ``[t C, (t + 1) C)``. ``network`` maps ``(n, 2, h, w)`` to
    ``(n, 2 C, h, w)``.
    """

    def __init__(self, spatial_size: Sequence[int] | None = (672, 672), pairing: str = "auto", batch_size: int = 8,
                 mode: str = "bilinear") -> None:
        super().__init__()
        if pairing not in _PAIRINGS:
            raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if spatial_size is not None:
            spatial_size = tuple(int(s) for s in spatial_size)
            if len(spatial_size) != 2 or min(spatial_size) < 1:
                raise ValueError(f"spatial_size must be (h, w) with positive sizes, got {spatial_size}")
        self.spatial_size = spatial_size
        self.pairing = pairing
        self.batch_size = int(batch_size)
        self.mode = mode

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        if x.ndim != 4:
            raise ValueError(f"echo inferer input must be (B, frames, H, W), got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"echo inferer input holds {int((~torch.isfinite(x)).sum())} NaN/Inf values")
        b, t, h, w = x.shape
        size = self.spatial_size or (h, w)
        multiple = _size_multiple(network)
        if multiple and (size[0] % multiple or size[1] % multiple):
            raise ValueError(f"network input size {size[0]}x{size[1]} must be a multiple of {multiple}; set "
                             "spatial_size accordingly")
        x = x.float()
        if (h, w) != tuple(size):
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False)
        pairs = torch.tensor(frame_pairs(t, self.pairing), device=x.device)  # (P, 2) frame indices
        count = torch.zeros(t, device=x.device)
        count.index_add_(0, pairs.reshape(-1), torch.ones(pairs.numel(), device=x.device))
        # (source, target) frame of every network call, as indices into the flattened (B T) frames
        src = (torch.arange(b, device=x.device)[:, None] * t + pairs[None, :, 0]).reshape(-1)
        tgt = (torch.arange(b, device=x.device)[:, None] * t + pairs[None, :, 1]).reshape(-1)
        frames = x.reshape(b * t, 1, *size)
        total = None
        # logits are added into their frames chunk by chunk: a long video never holds all pair outputs at once
        for start in range(0, src.numel(), self.batch_size):
            s_idx, t_idx = src[start : start + self.batch_size], tgt[start : start + self.batch_size]
            out = network(torch.cat([frames[s_idx], frames[t_idx]], dim=1), *args, **kwargs).float()
            if out.ndim != 4 or out.shape[0] != s_idx.numel() or out.shape[1] % 2 or out.shape[-2:] != tuple(size):
                raise RuntimeError(f"the network returned shape {tuple(out.shape)} for {s_idx.numel()} pairs of "
                                   f"{size[0]}x{size[1]} frames; expected (n, 2 * classes, h, w)")
            c = out.shape[1] // 2
            if total is None:
                total = torch.zeros(b * t, c, *size, device=out.device)
            total.index_add_(0, s_idx, out[:, :c])
            total.index_add_(0, t_idx, out[:, c:])
        logits = (total.reshape(b, t, -1, *size) / count.view(1, t, 1, 1, 1)).reshape(b, -1, *size)
        if (h, w) != tuple(size):
            logits = F.interpolate(logits, size=(h, w), mode=self.mode, align_corners=False)
        return logits


# ------------------------------------------------------------------------------------------------ postprocessing
def normalised_entropy(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Softmax entropy along ``dim`` divided by ``log(C)``: 0 = certain, 1 = uniform over the ``C`` classes."""
    logp = torch.log_softmax(logits.float(), dim=dim)
    ent = -(logp.exp() * logp).sum(dim=dim)
    return ent / math.log(logits.shape[dim])


class FrameArgmaxd(MapTransform):
    """Per-frame class maps from stacked logits: ``(T C, H, W)`` -> ``(T, H, W)`` (uint8 class ids).

    Args:
        keys: logits keys.
        num_classes: ``C``.
        uncertainty_key: if set, ``(T, H, W)`` float32 normalised softmax entropy (:func:`normalised_entropy`) is
            stored under it.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, uncertainty_key: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.uncertainty_key = uncertainty_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
            if x.ndim != 3 or x.shape[0] % self.num_classes:
                raise ValueError(f"{key}: expected (frames * {self.num_classes}, H, W) logits, got {tuple(x.shape)}")
            frames = x.reshape(-1, self.num_classes, *x.shape[1:])
            d[key] = frames.argmax(dim=1).to(torch.uint8)
            if self.uncertainty_key:
                d[self.uncertainty_key] = normalised_entropy(frames, dim=1)
        return d


# ------------------------------------------------------------------------------------------------------ plotting
def _np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def plot_echo_overlay(image: Any, pred: Any, out_png: str | Path, label: Any = None, uncertainty: Any = None,
                      frames: Sequence[int] | None = None, titles: Sequence[str] | None = None,
                      class_names: Sequence[str] = ("LV", "Myo", "LA"), title: str = "") -> Path:
    """PNG of up to 4 frames: the image with reference (dashed) and predicted (solid) contours; below it the
    normalised entropy map when ``uncertainty`` is given. Arrays are ``(T, H, W)`` (or ``(H, W)``)."""
    from matplotlib.lines import Line2D

    from common.plotting import save_figure, subplots

    img, prd, lab, unc = (_np(a) for a in (image, pred, label, uncertainty))
    img = img[None] if img.ndim == 2 else img
    prd = prd[None] if prd.ndim == 2 else prd
    lab = lab[None] if lab is not None and lab.ndim == 2 else lab
    unc = unc[None] if unc is not None and unc.ndim == 2 else unc
    t = img.shape[0]
    frames = list(range(min(t, 4))) if frames is None else [int(f) for f in frames][:4]
    titles = [f"frame {f}" for f in frames] if titles is None else list(titles)
    rows = 2 if unc is not None else 1
    h, w = img.shape[-2:]
    fig, axes = subplots(rows, len(frames), figsize=(3.2 * len(frames) * w / h + 0.6, 3.4 * rows),
                             squeeze=False)
    lo, hi = float(np.min(img)), float(np.max(img))
    for col, (f, ttl) in enumerate(zip(frames, titles)):
        ax = axes[0, col]
        ax.imshow(img[f], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        # the LV (1) last: its border is also the myocardium's inner border and would be drawn over
        for k in [*range(2, len(class_names) + 1), 1]:
            colour = CLASS_COLOURS.get(k, "white")
            if lab is not None and (lab[f] == k).any():
                ax.contour((lab[f] == k).astype(float), levels=[0.5], colors=[colour], linewidths=1.0,
                           linestyles="dashed")
            if (prd[f] == k).any():
                ax.contour((prd[f] == k).astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
        ax.set_title(ttl, fontsize=8)
        ax.set_axis_off()
        if unc is not None:
            im = axes[1, col].imshow(unc[f], cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            axes[1, col].set_title("entropy", fontsize=8)
            axes[1, col].set_axis_off()
    if unc is not None:
        fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.03)
    handles = [Line2D([], [], color=CLASS_COLOURS.get(k + 1, "white"), label=n) for k, n in enumerate(class_names)]
    if lab is not None:
        handles += [Line2D([], [], color="gray", ls="dashed", label="reference"),
                    Line2D([], [], color="gray", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png, dpi=100, tight=False)


# --------------------------------------------------------------------------------------------------------- saving
def _write_like(source: Mapping[str, Any], masks: np.ndarray, out_stem: Path, dtype: Any) -> Path:
    """Write ``masks`` (n, H, W) -- the frames of one input file -- as NIfTI on that file's grid.

    When every frame of the file was predicted, the masks go back to the file's own shape (index order) with its
    affine (spacing, origin and direction; a NIfTI input also passes on its header), whatever its format --
    :func:`common.data.loading.write_like`. A subset of frames keeps the file's in-plane geometry, ``(W, H, n)``.
    """
    out = out_stem.with_name(out_stem.name + ".nii.gz")
    arr = np.asarray(masks).astype(dtype)
    affine = np.asarray(source.get("affine", np.eye(4)), dtype=np.float64)
    whole = len(source["source_frames"]) == source["n_frames"]
    if whole and "shape" in source:
        data = from_frames(arr, source["shape"])
        nifti = source["kind"] == "nifti"
        return write_like(out, data, reference=source["path"] if nifti else None, affine=None if nifti else affine)
    data = arr.transpose(2, 1, 0)
    return write_like(out, data[..., 0] if data.shape[2] == 1 else data, affine=affine)


class SaveEchoPredictiond(MapTransform):
    """Write a case's per-frame masks (and entropy maps) per input file, a PNG preview, and ``predictions.json``.

    Args:
        keys: the label-map key (``(T, H, W)``, from :class:`FrameArgmaxd`).
        output_dir: output folder; masks go to ``<output_dir>/<stem>_seg.nii.gz``, entropy maps to
            ``<stem>_entropy.nii.gz``, previews to ``<case>_overlay.png``.
        class_names: foreground classes (areas in ``predictions.json``, PNG legend).
        uncertainty_key: key of the entropy maps to write (None: none).
        image_key: key of the input frames (PNG preview).
        png: write the PNG preview.
        info_key, stems_key, case_key: keys of the loader's ``frame_info`` and the datalist's ``output_stems`` and
            ``case``.

    A re-run on the same input replaces its own outputs only; ``predictions.json`` keeps the records of other cases
    already in the folder.
    """

    def __init__(self, keys: KeysCollection, output_dir: str, class_names: Sequence[str] = ("LV", "Myo", "LA"),
                 uncertainty_key: str | None = None, image_key: str = "image", png: bool = True,
                 info_key: str = "frame_info", stems_key: str = "output_stems", case_key: str = "case",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.uncertainty_key = uncertainty_key
        self.image_key = image_key
        self.png = as_flag(png, "png")
        self.info_key, self.stems_key, self.case_key = info_key, stems_key, case_key
        self.records: list[dict] | None = None

    def _load_records(self) -> list[dict]:
        # keep the cases an earlier run wrote to the same folder; a case predicted again replaces its old record
        path = self.output_dir / "predictions.json"
        try:
            cases = json.loads(path.read_text()).get("cases", []) if path.is_file() else []
        except (json.JSONDecodeError, AttributeError, OSError):
            cases = []
        return [c for c in cases if isinstance(c, dict) and "case" in c]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from common.engines.handlers import write_json_atomic

        d = dict(data)
        info = json.loads(d[self.info_key])
        stems = json.loads(d[self.stems_key]) if self.stems_key in d else \
            [_stem(Path(s["path"])) for s in info["sources"]]
        if len(stems) != len(info["sources"]):
            raise ValueError(f"{len(stems)} output names for {len(info['sources'])} input files")
        sr, sc = info["spacing"]
        for key in self.key_iterator(d):
            masks = _np(d[key]).astype(np.uint8)
            unc = _np(d.get(self.uncertainty_key)) if self.uncertainty_key else None
            record: dict[str, Any] = {"case": d.get(self.case_key, stems[0]), "n_frames": int(masks.shape[0]),
                                      "spacing_mm": [sr, sc], "inputs": [], "masks": [], "uncertainty": []}
            for src, stem in zip(info["sources"], stems):
                src = {**src, "spacing": (sr, sc)}
                pos = src["positions"]
                record["inputs"].append(src["path"])
                record["masks"].append(str(_write_like(src, masks[pos], self.output_dir / f"{stem}_seg", np.uint8)))
                if unc is not None:
                    record["uncertainty"].append(str(_write_like(src, unc[pos].astype(np.float32),
                                                                 self.output_dir / f"{stem}_entropy", np.float32)))
            areas = {name: [float((m == k).sum()) * sr * sc for m in masks]
                     for k, name in enumerate(self.class_names, start=1)}
            record["area_mm2"] = areas
            if self.png:
                img = _np(d.get(self.image_key))
                frames = list(range(masks.shape[0]))
                if len(frames) > 4:
                    frames = [round(x) for x in np.linspace(0, len(frames) - 1, 4)]
                # name each panel by its file when the case comes from several files (an ED/ES pair)
                names = [""] * masks.shape[0]
                for src, stem in zip(info["sources"], stems):
                    for pos, f in zip(src["positions"], src["source_frames"]):
                        names[pos] = Path(stem).name if len(info["sources"]) > 1 else f"frame {f}"
                png = self.output_dir / f"{record['case']}_overlay.png"
                plot_echo_overlay(img, masks, png, uncertainty=unc, frames=frames, titles=[names[f] for f in frames],
                                  class_names=self.class_names, title=str(record["case"]))
                record["png"] = str(png)
            if self.records is None:
                self.records = self._load_records()
            self.records = [r for r in self.records if r["case"] != record["case"]] + [record]
            write_json_atomic(self.output_dir / "predictions.json", {"cases": self.records})
        return d
