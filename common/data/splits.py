"""Patient-level, seeded dataset splits (no patient appears in two subsets)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SPLITS", "patient_split", "resolve_split"]

# the values of a bundle's `eval_split`/`split` knob; "all" = every case of the folder, no split
SPLITS = ("train", "val", "test", "all")


def resolve_split(split: str | None) -> str | None:
    """The datalist functions' ``split`` argument for a bundle knob value: ``"all"`` (or None) -> None (every case,
    no split), ``"train"``/``"val"``/``"test"`` unchanged; anything else is a ``ValueError`` naming the value."""
    if split is None or split == "all":
        return None
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def patient_split(patient_ids: Sequence[str], fractions: Sequence[float] = (0.9, 0.1), seed: int = 0,
                  names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Split unique patient ids into subsets of the given fractions with a seeded permutation.

    Every subset with a positive fraction gets at least one patient when there are enough patients;
    rounding leftovers go to the first subset. Returns ``{name: sorted ids}``; default names are
    ``train``, ``val``, ``test`` (as many as fractions).
    """
    ids = sorted(set(patient_ids))
    if not ids:
        raise ValueError("patient_split: no patient ids given")
    fr = np.asarray(fractions, dtype=float)
    if (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"patient_split: invalid fractions {list(fractions)}")
    fr = fr / fr.sum()
    names = list(names) if names is not None else ["train", "val", "test"][: len(fr)]
    if len(names) != len(fr):
        raise ValueError(f"patient_split: {len(names)} names for {len(fr)} fractions")
    perm = np.random.default_rng(seed).permutation(len(ids))
    counts = np.floor(fr * len(ids)).astype(int)
    for i in range(1, len(fr)):
        if fr[i] > 0 and counts[i] == 0 and len(ids) - counts.sum() + counts[0] > 1:
            counts[i] = 1
    counts[0] = len(ids) - counts[1:].sum()
    out, start = {}, 0
    for name, c in zip(names, counts):
        out[name] = sorted(ids[j] for j in perm[start : start + c])
        start += c
    return out
