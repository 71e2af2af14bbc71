"""Declarative series selection: which bundle (if any) runs on a series, decided from its headers alone.

A :class:`Rule` names a bundle and the conditions a series must meet -- modality, SOP classes, number of frames,
image size, body part -- in the spirit of MONAI Deploy's series selector. :func:`select` returns the first rule a
series matches, or the reason none does (the series is then *skipped*, counted in the ledger, not failed).
:data:`DEFAULT_RULES` holds the rules of the bundles ``tools.pacs`` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

__all__ = ["CT_IMAGE", "DEFAULT_RULES", "MR_IMAGE", "US_IMAGE", "US_MULTIFRAME", "Rule", "rules_for", "select"]

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class Rule:
    """Conditions for running ``bundle`` on a series (empty/None = any).

    ``modalities``: DICOM Modality values; ``sop_classes``: SOP Class UIDs every instance must have;
    ``min_frames``/``max_frames``: frames of the series (a multi-frame instance's ``NumberOfFrames``, or the number
    of single-frame instances); ``min_size``/``max_size``: bounds on ``Rows`` and ``Columns``; ``body_parts``:
    ``BodyPartExamined`` values (upper case); ``max_instances``: instances in the series.
    """

    bundle: str
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    min_frames: int = 1
    max_frames: int | None = None
    min_size: int = 16
    max_size: int | None = 4096
    body_parts: tuple[str, ...] = ()
    max_instances: int | None = None

    def mismatch(self, headers: Sequence[Dataset]) -> str | None:
        """None if the series matches, else why not (no patient data in the text)."""
        if not headers:
            return "series has no instances"
        modality = str(headers[0].get("Modality", ""))
        if self.modalities and modality not in self.modalities:
            return f"modality {modality or '?'} not in {list(self.modalities)}"
        classes = {str(h.get("SOPClassUID", "")) for h in headers}
        if self.sop_classes and not classes <= set(self.sop_classes):
            return f"SOP class {sorted(classes - set(self.sop_classes))} not supported"
        if self.max_instances is not None and len(headers) > self.max_instances:
            return f"{len(headers)} instances > {self.max_instances}"
        frames = sum(int(h.get("NumberOfFrames", 1) or 1) for h in headers)
        if frames < self.min_frames or (self.max_frames is not None and frames > self.max_frames):
            return f"{frames} frames outside [{self.min_frames}, {self.max_frames}]"
        for h in headers:
            rows, cols = int(h.get("Rows", 0) or 0), int(h.get("Columns", 0) or 0)
            if min(rows, cols) < self.min_size or (self.max_size is not None and max(rows, cols) > self.max_size):
                return f"image size {rows}x{cols} outside [{self.min_size}, {self.max_size}]"
        if self.body_parts:
            part = str(headers[0].get("BodyPartExamined", "")).upper()
            if part not in self.body_parts:
                return f"body part {part or '?'} not in {list(self.body_parts)}"
        return None


# botm_seg: an echo cine in one multi-frame instance (the cine's own frames), one single-frame US image, or a series
# of single-frame US images (one per frame)
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("botm_seg", modalities=("US",), sop_classes=(US_MULTIFRAME, US_IMAGE), min_frames=1, max_frames=2000,
         max_instances=1),
    # botm_seg: a cine stored as single-frame US images, one per frame (stacked in InstanceNumber order)
    Rule("botm_seg", modalities=("US",), sop_classes=(US_IMAGE,), min_frames=2, max_frames=2000),
    # the GLS chains track a cine: at least 2 frames in one multi-frame instance (botm_seg seeds the query points)
    Rule("echo_gls", modalities=("US",), sop_classes=(US_MULTIFRAME,), min_frames=2, max_frames=2000,
         max_instances=1),
    Rule("specknet_tracking", modalities=("US",), sop_classes=(US_MULTIFRAME,), min_frames=2, max_frames=2000,
         max_instances=1),
    # lssc_multimodal: a CT or MR series of single-frame slices (>= 3: the network takes 3 consecutive slices)
    Rule("lssc_multimodal", modalities=("CT", "MR"), sop_classes=(CT_IMAGE, MR_IMAGE), min_frames=3, max_frames=2000),
    # adacs_registration: the ED -> ES pair of a cine in one multi-frame instance
    Rule("adacs_registration", modalities=("US",), sop_classes=(US_MULTIFRAME,), min_frames=2, max_frames=2000,
         max_instances=1),
)


def rules_for(bundle: str, rules: Sequence[Rule] = DEFAULT_RULES) -> list[Rule]:
    """The rules of ``bundle``; ``ValueError`` listing the supported bundles if it has none."""
    out = [r for r in rules if r.bundle == bundle]
    if not out:
        raise ValueError(f"bundle {bundle!r} has no PACS selection rule; supported: "
                         f"{sorted({r.bundle for r in rules})}")
    return out


def select(headers: Sequence[Dataset], rules: Sequence[Rule]) -> tuple[Rule | None, str]:
    """``(first matching rule, "")`` or ``(None, reasons)`` for the series' instance ``headers``."""
    reasons = []
    for rule in rules:
        why = rule.mismatch(headers)
        if why is None:
            return rule, ""
        reasons.append(f"{rule.bundle}: {why}")
    return None, "; ".join(reasons) or "no rule"
