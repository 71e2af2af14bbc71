"""Label remapping that depends on each item's modality (unpaired tasks whose modalities come from different
datasets, e.g. BTCV CT codes vs CHAOS MRI ids): MONAI's ``MapLabelValue`` with one table per modality."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapLabelValue, MapTransform

__all__ = ["MapLabelByModalityd"]


class MapLabelByModalityd(MapTransform):
    """Map label values with the table of the item's modality (MONAI ``MapLabelValue`` per table).

    Args:
        keys: keys of the label maps to remap.
        mapping: ``{modality: (orig_labels, target_labels)}``, e.g.
            :func:`common.data.slices.unpaired_label_mapping`; values absent from ``orig_labels`` are kept as they
            are (as MONAI's ``MapLabelValue`` does), so a table should list every code of its dataset.
        modality_key: the item key naming the modality.
        dtype: dtype of the remapped labels.
        allow_missing_keys: as MONAI's ``MapTransform``.

    An item without ``modality_key`` is mapped when every modality has the same table (MM-WHS: one code table for CT
    and MRI), so single-dataset pipelines need no modality.

    Raises:
        ValueError: at construction for an empty or malformed table; on call for a modality without a table, or an
            item without a modality when the tables differ (the message names the label file).
    """

    def __init__(self, keys: KeysCollection, mapping: Mapping[str, tuple[Sequence[int], Sequence[int]]],
                 modality_key: str = "modality", dtype: Any = torch.uint8, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(mapping, Mapping) or not mapping:
            raise ValueError(f"mapping must be a non-empty {{modality: (orig_labels, target_labels)}}, got {mapping!r}")
        self.modality_key = modality_key
        self.mappers: dict[str, MapLabelValue] = {}
        tables = set()
        for modality, pair in mapping.items():
            if len(pair) != 2 or len(pair[0]) != len(pair[1]):
                raise ValueError(f"mapping[{modality!r}] must be (orig_labels, target_labels) of equal length")
            tables.add((tuple(pair[0]), tuple(pair[1])))
            self.mappers[str(modality)] = MapLabelValue(orig_labels=list(pair[0]), target_labels=list(pair[1]),
                                                        dtype=dtype)
        self.shared = next(iter(self.mappers.values())) if len(tables) == 1 else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = d.get(self.modality_key)
        if modality is None and self.shared is not None:
            mapper = self.shared
        elif str(modality) not in self.mappers:
            # after LoadImaged the paths live in the tensors' metadata
            first = next(iter(self.key_iterator(d)), None)
            what = getattr(d.get(first), "meta", {}).get("filename_or_obj", d.get(first, "item"))
            raise ValueError(f"{what}: modality {modality!r} (key {self.modality_key!r}) has no label table; "
                             f"tables exist for {sorted(self.mappers)}")
        else:
            mapper = self.mappers[str(modality)]
        for key in self.key_iterator(d):
            d[key] = mapper(d[key])
        return d
