"""Slice-level training data built from volumes, and unpaired multi-modality datalists (MM-WHS layout).

:class:`VolumeSliceDataset` preprocesses every volume once with a MONAI transform chain (load, reorient, resample,
crop, normalise; deterministic, so it is cached in memory), indexes the chosen slices of every volume and returns
one slice stack per item (consecutive slices as channels, :mod:`common.transforms.slices`), followed by an optional
per-slice (random) transform. Items keep the volume entry's other keys (``modality``, ``patient``), so one dataset
can hold several modalities and :meth:`VolumeSliceDataset.indices_by` splits it for unpaired sampling.

:func:`unpaired_datalist` builds the volume datalist of several modalities from one dataset folder of a task
(:data:`UNPAIRED_TASKS`: ``mmwhs`` = MM-WHS CT + MRI, ``abdomen`` = BTCV CT + CHAOS T2-SPIR MRI) with the
per-modality 70/10/20 patient split, and implements the few-shot protocol (only ``k`` labelled training volumes of a
modality). :func:`unpaired_label_mapping` gives each modality's label-file codes -> class ids of the task.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.abdomen import ABDOMEN_MODALITIES, BTCV_CODES, abdomen_datalist, abdomen_label_mapping
from common.data.cases import FailureRecorder
from common.data.mmwhs import MMWHS_CODES, MMWHS_MODALITIES, mmwhs_datalist, mmwhs_label_mapping
from common.data.splits import resolve_split
from common.transforms.slices import consecutive_slices, foreground_slices, slice_axis_index

__all__ = ["SLICE_SELECTIONS", "UNPAIRED_TASKS", "VolumeSliceDataset", "unpaired_datalist", "unpaired_label_mapping",
           "unpaired_output_codes"]

SLICE_SELECTIONS = ("foreground", "all")

UNPAIRED_TASKS: dict[str, tuple[tuple[str, ...], Callable[..., list[dict]]]] = {
    "mmwhs": (MMWHS_MODALITIES, mmwhs_datalist),
    "abdomen": (ABDOMEN_MODALITIES, abdomen_datalist),
}
"""``task: (modalities, per-modality reader(root, modality, split, fractions=, seed=, ledger=))``; the task name is
also the kind of its synthetic default (:mod:`common.data.default`)."""


def _task(task: str) -> tuple[tuple[str, ...], Callable[..., list[dict]]]:
    if task not in UNPAIRED_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(UNPAIRED_TASKS)}")
    return UNPAIRED_TASKS[task]


def unpaired_label_mapping(task: str, structures: Sequence[str]) -> dict[str, tuple[list[int], list[int]]]:
    """``{modality: (orig_labels, target_ids)}`` for :class:`common.transforms.labels.MapLabelByModalityd`: the label
    files of each modality of ``task`` -> ids ``1..K`` of ``structures`` (everything else 0). MM-WHS CT and MRI share
    one code table; BTCV and CHAOS do not (:func:`common.data.abdomen.abdomen_label_mapping`)."""
    _task(task)
    if task == "abdomen":
        return abdomen_label_mapping(structures)
    mapping = mmwhs_label_mapping(structures)
    return {m: mapping for m in MMWHS_MODALITIES}


def unpaired_output_codes(task: str, structures: Sequence[str]) -> list[int]:
    """The dataset codes of ``structures`` written by inference with ``output_codes``: MM-WHS codes, or for the
    abdomen the BTCV codes (one code table for both modalities; CHAOS grey values are PNG-only)."""
    _task(task)
    table = BTCV_CODES if task == "abdomen" else MMWHS_CODES
    unknown = [s for s in structures if s not in table]
    if unknown:
        raise ValueError(f"structures {unknown} have no {task} code; choose from {sorted(table)}")
    return [int(table[s]) for s in structures]


def unpaired_datalist(root: str | Path, modalities: Sequence[str] = MMWHS_MODALITIES, split: str | None = "train",
                      labelled: Mapping[str, int] | None = None, seed: int = 0,
                      fractions: Sequence[float] = (0.7, 0.1, 0.2), ledger: FailureRecorder | None = None,
                      task: str = "mmwhs") -> list[dict]:
    """Volume entries ``{image, label, patient, modality, spacing}`` of every modality, each modality split on its
    own (the CT and MRI patients are different people, so the splits are independent).

    Args:
        root: the task's dataset folder: MM-WHS (``ct_train/``, ``mr_train/`` or the files directly in it), or for
            ``task="abdomen"`` BTCV (``RawData/Training/{img,label}``) and CHAOS (``Train_Sets/MR/<id>/T2SPIR``).
        modalities: which modalities to list (``"ct"``, ``"mr"``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``/``None`` (all cases, no split).
        labelled: few-shot protocol, ``{modality: k}``: keep only ``k`` training volumes of that modality, drawn
            with ``seed`` (paper Sec. 4.4: 1 or 3 labelled volumes of one modality + all of the other). Only
            applies to ``split="train"``; the validation and test splits are never reduced.
        seed: seed of the patient split and of the few-shot draw.
        fractions: train/val/test fractions (70/10/20 as in the paper).
        ledger: evaluation's :class:`common.engines.screening.BatchLedger`: a volume of the subset whose files
            cannot be read is recorded there (stage ``datalist``) and left out; without it (training) the first such
            volume stops with an error naming the file (:func:`common.data.cases.build_cases`).
        task: a key of :data:`UNPAIRED_TASKS` (``"mmwhs"`` or ``"abdomen"``).

    Raises:
        ValueError: unknown modality, a few-shot modality that is not listed, or ``k`` outside ``1..n_train``.
    """
    split = resolve_split(split)
    task_modalities, reader = _task(task)
    mods = [str(m) for m in modalities]
    if not mods or len(set(mods)) != len(mods):
        raise ValueError(f"modalities must be non-empty and unique, got {list(modalities)}")
    for m in mods:
        if m not in task_modalities:
            raise ValueError(f"unknown modality {m!r}; task {task!r} has {task_modalities}")
    labelled = dict(labelled or {})
    for m in labelled:
        if m not in mods:
            raise ValueError(f"few-shot modality {m!r} is not among the training modalities {mods}")
    out = []
    for m in mods:
        entries = reader(root, m, split, fractions=fractions, seed=seed, ledger=ledger)
        if split == "train" and m in labelled:
            k = int(labelled[m])
            if not 1 <= k <= len(entries):
                raise ValueError(f"few-shot: {k} labelled {m} volumes requested, the training split has {len(entries)}")
            # seeded draw independent of the split permutation, so 1 labelled volume is a subset of 3
            order = np.random.default_rng([seed, 7919, task_modalities.index(m)]).permutation(len(entries))
            entries = [entries[i] for i in sorted(order[:k])]
        out.extend(entries)
    return out


class VolumeSliceDataset(Dataset):
    """Slice stacks of preprocessed volumes.

    Item ``i`` is a dict with ``image_key`` ``(C * num_slices, h, w)`` float32, ``label_key`` ``(1, h, w)`` int64
    (the central slice; absent when the volumes have no label), ``"slice"`` (index along the slicing axis),
    ``"volume"`` (index into ``data``) and the volume entry's remaining plain keys (e.g. ``modality``, ``patient``),
    then ``transform`` is applied.

    Args:
        data: volume entries (MONAI datalist), e.g. from :func:`unpaired_datalist`.
        volume_transform: deterministic chain applied once per volume; must return channel-first ``(C, X, Y, Z)``
            arrays under ``image_key`` (and ``label_key``).
        slice_axis: ``"sagittal"``, ``"coronal"``, ``"axial"`` or a spatial axis of the transformed volume.
        num_slices: consecutive slices per stack (odd; 3 in the paper).
        transform: per-slice transform (augmentation), applied on every access.
        slice_selection: ``"foreground"``: the slices within the labelled structures' extent along the slicing
            axis (plus ``margin``), i.e. the slices of a 3D bounding box of the heart; ``"all"``: every slice.
            Volumes without a label always use every slice.
        margin: extra slices on each side of the foreground extent.
        image_key, label_key: keys of the volumes.
    """

    def __init__(
        self,
        data: Sequence[Mapping[Hashable, Any]],
        volume_transform: Callable[[dict], Mapping[Hashable, Any]],
        slice_axis: str | int = "coronal",
        num_slices: int = 3,
        transform: Callable[[dict], Any] | None = None,
        slice_selection: str = "foreground",
        margin: int = 0,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        if slice_selection not in SLICE_SELECTIONS:
            raise ValueError(f"slice_selection must be one of {SLICE_SELECTIONS}, got {slice_selection!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.data = list(data)
        if not self.data:
            raise ValueError("VolumeSliceDataset got an empty datalist")
        self.slice_axis = slice_axis_index(slice_axis)
        self.num_slices = num_slices
        self.transform = transform
        self.image_key, self.label_key = image_key, label_key
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor | None] = []
        self.samples: list[tuple[int, int]] = []
        for v, entry in enumerate(self.data):
            out = volume_transform(dict(entry))
            image = self._plain(out[image_key], f"{entry.get(image_key)}: transformed image", torch.float32)
            label = out.get(label_key)
            label = None if label is None else self._plain(label, f"{entry.get(label_key)}: transformed label",
                                                           torch.uint8)
            if label is not None and label.shape[1:] != image.shape[1:]:
                raise ValueError(f"{entry.get(label_key)}: label {tuple(label.shape)} and image {tuple(image.shape)} "
                                 "differ in size after the volume transform")
            self.images.append(image)
            self.labels.append(label)
            if label is not None and slice_selection == "foreground":
                indices = foreground_slices(label, self.slice_axis, margin)
            else:
                indices = list(range(image.shape[self.slice_axis + 1]))
            self.samples.extend((v, s) for s in indices)
        if not self.samples:
            raise ValueError("VolumeSliceDataset: no slice selected (do the labels hold any foreground?)")

    @staticmethod
    def _plain(x: Any, what: str, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if hasattr(t, "as_tensor"):  # MetaTensor: the slices need no geometry, and plain tensors collate faster
            t = t.as_tensor()
        if t.dim() != 4:
            raise ValueError(f"{what} must be channel-first 3D (C, X, Y, Z), got shape {tuple(t.shape)}")
        if dtype == torch.uint8:
            if t.is_floating_point():
                t = torch.round(t)
            if t.numel() and (int(t.min()) < 0 or int(t.max()) > 255):
                raise ValueError(f"{what} holds class ids outside [0, 255]")
        return t.to(dtype).contiguous()

    def __len__(self) -> int:
        return len(self.samples)

    def sample_key(self, index: int, key: str) -> Any:
        """``data[volume][key]`` of item ``index`` without building the item."""
        return self.data[self.samples[index][0]].get(key)

    def indices_by(self, key: str = "modality") -> dict[Any, list[int]]:
        """Item indices grouped by the volume entries' ``key`` (e.g. per modality), in item order."""
        groups: dict[Any, list[int]] = {}
        for i, (v, _) in enumerate(self.samples):
            if key not in self.data[v]:
                raise KeyError(f"volume entry {v} has no {key!r} key")
            groups.setdefault(self.data[v][key], []).append(i)
        return groups

    def __getitem__(self, index: int) -> Any:
        v, s = self.samples[index]
        entry = self.data[v]
        item: dict[Hashable, Any] = {
            k: val for k, val in entry.items() if k not in (self.image_key, self.label_key) and _plain_value(val)
        }
        item[self.image_key] = consecutive_slices(self.images[v], s, self.slice_axis, self.num_slices)
        label = self.labels[v]
        if label is not None:
            item[self.label_key] = consecutive_slices(label, s, self.slice_axis, 1).long()
        item["slice"] = s
        item["volume"] = v
        return self.transform(item) if self.transform is not None else item


def _plain_value(x: Any) -> bool:
    """Entry values that collate cleanly next to the slice tensors (strings and numbers)."""
    return isinstance(x, (str, int, float, bool))
