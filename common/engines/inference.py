"""Slice-wise volume prediction for 2D (2.5D) networks, and modality-tagged inference datalists.

:class:`SliceStackInferer` is a MONAI ``Inferer``: it turns each volume ``(C, X, Y, Z)`` of a batch into slice stacks
(consecutive slices as channels, :func:`common.transforms.slices.volume_to_slice_stacks`), runs the network on them
in chunks and reassembles the per-slice outputs into a volume of the input's size along the same axis. The output
carries the input's metadata (MONAI ``MetaTensor``), so ``Invertd`` maps predictions back to the geometry of the
original file and ``SaveImaged`` writes them with it.

:func:`modality_datalist` turns a file, a folder, a list of files or a JSON datalist into entries
``{"image": path, "modality": name}``: the modality comes from the argument, else from the JSON entry, else from
the DICOM header (``Modality``) of a DICOM file or series folder, else from the file name (``ct_...``,
``..._mr_...``, ``mri``); when none of them gives it, the error names the file. A folder of DICOM slices is one
series (one volume), read ordered by geometry (:mod:`common.data.loading`).

Screening of the inputs before a batch job (unreadable, NaN-holding or wrongly shaped files recorded in
``failed_inputs.json`` and left out) is shared by every bundle: :mod:`common.engines.screening`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

from common.data.loading import dicom_modality
from common.transforms.slices import slice_axis_index, stacks_to_volume, volume_to_slice_stacks

__all__ = ["IMAGE_SUFFIXES", "SliceStackInferer", "modality_datalist", "modality_from_name", "predict_each_volume",
           "refuse_shared_output_names"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".dcm", ".dicom")
_MODALITY_ALIASES = {"ct": "ct", "mr": "mr", "mri": "mr"}
_NAME_TOKEN = re.compile(r"(?:^|[^a-z0-9])(ct|mri|mr)(?=$|[^a-z0-9])", re.IGNORECASE)


class SliceStackInferer(Inferer):
    """Predict a batch of volumes slice by slice with a 2D network taking consecutive slices as channels.

    ``__call__(inputs, network, *args, modality=None, **kwargs)``:

    - ``inputs``: ``(B, C, X, Y, Z)`` volumes (tensor or MetaTensor).
    - ``network``: called as ``network(stacks, *args, [modality=...], **kwargs)`` on ``(n, C * num_slices, h, w)``
      stacks; must return ``(n, K, h, w)``.
    - ``modality``: ``None`` (not passed on), one value for the whole batch, or a sequence of ``B`` values (e.g. the
      collated ``"modality"`` strings of the batch); each volume's value is passed to the network as ``modality``.

    Returns ``(B, K, X, Y, Z)`` (a MetaTensor with the input's metadata when the input is one).

    Args:
        slice_axis: slicing axis (name or spatial axis, see :mod:`common.transforms.slices`).
        num_slices: consecutive slices per stack (3 in LSSC).
        batch_size: slice stacks per network call.
        size_multiple: the in-plane size is zero-padded up to a multiple of this (e.g. ``patch_size * 8`` = 32 for
            a 4-stage Swin-Unet with patch 4) and the output cropped back; 1 disables padding.
        progress: show a tqdm bar over the slice chunks.
    """

    def __init__(self, slice_axis: str | int = "coronal", num_slices: int = 3, batch_size: int = 16,
                 size_multiple: int = 32, progress: bool = False) -> None:
        super().__init__()
        self.slice_axis = slice_axis_index(slice_axis)
        if num_slices < 1 or num_slices % 2 == 0:
            raise ValueError(f"num_slices must be odd and >= 1, got {num_slices}")
        if batch_size < 1 or size_multiple < 1:
            raise ValueError(f"batch_size and size_multiple must be >= 1, got {batch_size}, {size_multiple}")
        self.num_slices = num_slices
        self.batch_size = batch_size
        self.size_multiple = size_multiple
        self.progress = progress

    def _predict_volume(self, volume: torch.Tensor, network: Callable[..., torch.Tensor], args: tuple,
                        kwargs: dict) -> torch.Tensor:
        stacks = volume_to_slice_stacks(volume, self.slice_axis, self.num_slices)  # (S, C*n, h, w)
        h, w = stacks.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            # z-scored inputs: zero is the mean intensity, the value the bundle's SpatialPadd also pads with
            stacks = F.pad(stacks, (0, pad_w, 0, pad_h))
        chunks = range(0, stacks.shape[0], self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="slices", leave=False)
        outs = [network(stacks[i : i + self.batch_size], *args, **kwargs) for i in chunks]
        out = torch.cat(outs, dim=0)[..., :h, :w]
        return stacks_to_volume(out, self.slice_axis)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 modality: Any = None, **kwargs: Any) -> torch.Tensor:
        return predict_each_volume(inputs, modality, kwargs, lambda vol, kw: self._predict_volume(
            vol[0], network, args, kw).unsqueeze(0), "SliceStackInferer")


def predict_each_volume(inputs: torch.Tensor, modality: Any, kwargs: dict[str, Any],
                        predict: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor], name: str) -> torch.Tensor:
    """Run ``predict(volume (1, C, X, Y, Z), kwargs)`` on each volume of a batch with that volume's modality.

    ``modality`` is one name for the batch, ``None``, or one value per volume (list or tensor); each volume's value
    goes to ``predict`` as ``kwargs["modality"]``. The outputs are concatenated along the batch and keep the input's
    MetaTensor metadata (the writer needs its affine). ``name`` is the inferer named in errors."""
    if inputs.dim() != 5:
        raise ValueError(f"{name} expects (B, C, X, Y, Z) volumes, got shape {tuple(inputs.shape)}")
    b = inputs.shape[0]
    if modality is None or isinstance(modality, str):
        per_item = [modality] * b
    else:
        per_item = list(modality.tolist() if isinstance(modality, torch.Tensor) else modality)
        if len(per_item) != b:
            raise ValueError(f"got {len(per_item)} modality values for a batch of {b} volumes")
    plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
    preds = []
    for i in range(b):
        kw = dict(kwargs)
        if per_item[i] is not None:
            kw["modality"] = per_item[i]
        out = predict(plain[i : i + 1], kw)
        preds.append(out.as_tensor() if isinstance(out, MetaTensor) else out)
    out = torch.cat(preds, dim=0)
    if isinstance(inputs, MetaTensor):
        out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
        out.is_batch = inputs.is_batch
    return out


def modality_from_name(path: str | Path, modalities: Sequence[str] = ("ct", "mr")) -> str | None:
    """The modality named in a file name (``ct``, ``mr`` or ``mri`` as a separate token), or ``None``."""
    found = {_MODALITY_ALIASES[m.lower()] for m in _NAME_TOKEN.findall(Path(path).name)}
    found &= set(modalities)
    return found.pop() if len(found) == 1 else None


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and name.endswith(IMAGE_SUFFIXES) and "_label" not in name and "_seg" not in name


def _folder_inputs(folder: Path) -> list[Path]:
    """Volumes in a folder: a folder holding the slices of one DICOM series (and nothing else) is one volume;
    otherwise its image files (DICOM files each on their own) and each sub-folder holding DICOM files (read as one
    series each; a sub-folder that is not one fails with the reason when it is read)."""
    from common.data.loading import dicom_files, is_dicom_series_dir

    files = sorted(p for p in folder.iterdir() if _is_image(p))
    if is_dicom_series_dir(folder) and all(f in dicom_files(folder) for f in files):
        return [folder]
    series = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and dicom_files(d))
    return files + series


def _check_modality(modality: str, modalities: Sequence[str], source: str) -> str:
    m = _MODALITY_ALIASES.get(str(modality).strip().lower(), str(modality))
    if m not in modalities:
        raise ValueError(f"unknown modality {modality!r} for {source}; this network knows {tuple(modalities)}")
    return m


def modality_datalist(input_path: str | Path | Sequence[str | Path], modality: str | None = None,
                      modalities: Sequence[str] = ("ct", "mr"), ledger: Any = None) -> list[dict[str, str]]:
    """Inference entries ``[{"image": path, "modality": name}]``.

    Args:
        input_path: an image file, a folder (every image file in it, label/segmentation files skipped), a JSON
            datalist (a list of ``{"image", ["modality"]}`` or ``{"data": [...]}``, relative paths resolved against
            the JSON's folder), or a list of image files or of ``{"image", ["modality"]}`` entries.
        modality: one modality for every input (overrides the JSON and the file names); ``None`` or ``""`` to take
            it per input.
        modalities: the modalities the network knows.
        ledger: a :class:`common.engines.screening.BatchLedger`: an input that is missing or whose modality cannot
            be told is recorded there (stage ``datalist``) and left out instead of stopping the job.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without image files.
        ValueError: an unknown modality, or an input whose modality cannot be told (without ``ledger``).
    """
    given = None if modality in (None, "") else _check_modality(modality, modalities, "all inputs")
    entries: list[dict[str, Any]] = []
    if isinstance(input_path, (list, tuple)):
        # items are paths, or datalist entries ({"image", "modality"}: inputs whose names do not tell the modality)
        entries = [{**p, "image": str(p["image"])} if isinstance(p, Mapping) else {"image": str(p)} for p in input_path]
    else:
        path = Path(input_path).expanduser()
        if str(input_path) == "" or not path.exists():
            raise FileNotFoundError(f"input_path {str(input_path)!r} does not exist")
        if path.is_dir():
            entries = [{"image": str(p)} for p in _folder_inputs(path)]
            if not entries:
                raise FileNotFoundError(f"input_path {str(path)!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) "
                                        "or DICOM series folders")
        elif path.name.lower().endswith(".json"):
            try:
                content = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a valid JSON datalist ({e})") from e
            items = content.get("data", content.get("testing")) if isinstance(content, dict) else content
            if not isinstance(items, list) or not all(isinstance(e, dict) and "image" in e for e in items):
                raise ValueError(f"{path}: a JSON datalist must be a list of {{'image': ...}} entries "
                                 "(or such a list under 'data')")
            entries = [{**e, "image": str(p if (p := Path(e["image"])).is_absolute() else path.parent / p)}
                       for e in items]
        else:
            entries = [{"image": str(path)}]
    out = []
    for e in entries:
        p = Path(e["image"])
        try:
            if not p.exists():
                raise FileNotFoundError(f"{p}: image file not found")
            if given is not None:
                mod = given
            elif e.get("modality"):
                mod = _check_modality(e["modality"], modalities, str(p))
            else:
                # DICOM says it in its header (Modality tag); other formats may say it in their file name
                header = dicom_modality(p)
                mod = _check_modality(header, modalities, str(p)) if header else modality_from_name(p, modalities)
                if mod is None:
                    raise ValueError(f"cannot tell the modality of {p}: name it in the file name (ct_/mr_), in a "
                                     f"JSON datalist ('modality'), or pass --modality (one of {tuple(modalities)})")
        except (FileNotFoundError, ValueError) as err:
            if ledger is None:
                raise
            ledger.fail(str(p), str(err), "datalist")
            continue
        # a JSON entry's heart box (LSSC's crop, common.transforms.slices.HeartBoxCropd) travels with its image
        out.append({"image": str(p), "modality": mod, **({"heart_box": e["heart_box"]} if "heart_box" in e else {})})
    return out


def refuse_shared_output_names(entries: Sequence[dict[str, Any]], ledger: Any = None,
                               key: str = "image") -> list[dict[str, Any]]:
    """Drop the inputs whose prediction would overwrite an earlier input's (same file-name stem).

    ``SaveImaged`` names a prediction after its input's stem, so ``ct_x.nii.gz`` and ``ct_x.mha`` would both be
    written as ``ct_x_seg.nii.gz``. Applied after screening (an input that fails anyway keeps its own reason): the
    first input keeps the name, each later one is recorded in ``ledger`` (stage ``datalist``) and left out, or, with
    no ledger, raises ``ValueError`` naming both inputs.
    """
    kept: list[dict[str, Any]] = []
    owners: dict[str, str] = {}
    for e in entries:
        p = Path(e[key])
        stem = _output_stem(p)
        if stem in owners:
            reason = (f"{p}: its prediction would overwrite that of {owners[stem]} (same name {stem!r}); rename one "
                      "of them or run them separately")
            if ledger is None:
                raise ValueError(reason)
            ledger.fail(str(p), reason, "datalist")
            continue
        owners[stem] = str(p)
        kept.append(e)
    return kept


def _output_stem(path: Path) -> str:
    """The file-name stem ``SaveImaged`` derives a prediction's name from (``ct_x.nii.gz`` -> ``ct_x``)."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
