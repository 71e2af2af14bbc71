"""A retrieved ultrasound series as one cine: its multi-frame instance, or its single-frame instances stacked in
``InstanceNumber`` order (scanners that store a loop as one US Image per frame).

:func:`as_cine` returns the dataset the bundle reads (a multi-frame US dataset) and, for a stacked series, the
source instance of every frame, so the SEG and SR reference each frame's own instance (``frame_sources`` of
:func:`tools.pacs.results.echo_seg` / :func:`~tools.pacs.results.echo_area_report`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["as_cine"]

_US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


def as_cine(instances: Sequence[Dataset]) -> tuple[Dataset, list[Dataset] | None]:
    """``(cine dataset, frame sources)``: one instance -> ``(it, None)``; several single-frame instances -> a
    multi-frame US dataset (the first instance's header, decoded pixels stacked in ``InstanceNumber`` order, native
    little endian) and the instances in that order. ``ValueError`` naming the problem for an empty series, several
    multi-frame instances, missing or repeated ``InstanceNumber`` values, or frames of different sizes."""
    if not instances:
        raise ValueError("the series has no instances")
    if len(instances) == 1:
        return instances[0], None
    multi = [d for d in instances if int(d.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        raise ValueError(f"{len(instances)} instances of which {len(multi)} multi-frame: not one cine")
    numbers = [d.get("InstanceNumber") for d in instances]
    if any(n is None or str(n) == "" for n in numbers):
        raise ValueError(f"{sum(n is None or str(n) == '' for n in numbers)} of {len(instances)} single-frame "
                         "instances have no InstanceNumber: the frame order is unknown")
    numbers = [int(n) for n in numbers]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"repeated InstanceNumber values in a series of {len(instances)} single-frame instances: "
                         "the frame order is ambiguous")
    ordered = [d for _, d in sorted(zip(numbers, instances, strict=True), key=lambda x: x[0])]
    frames = []
    for d in ordered:
        try:
            frames.append(d.pixel_array)
        except Exception as e:
            raise ValueError(f"instance {d.get('InstanceNumber')} of the series: cannot decode its pixel data "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"single-frame instances of different sizes {sorted(shapes)}: not one cine")
    cine = copy.deepcopy(Dataset({e.tag: e for e in ordered[0] if e.tag.group != 0x7FE0}))
    stack = np.ascontiguousarray(np.stack(frames))
    cine.NumberOfFrames = len(frames)
    cine.SOPClassUID = _US_MULTIFRAME
    if stack.ndim == 4:  # colour frames come out of pydicom as RGB, interleaved
        cine.PhotometricInterpretation, cine.PlanarConfiguration = "RGB", 0
    cine.PixelData = stack.tobytes()
    cine["PixelData"].VR = "OB" if stack.itemsize == 1 else "OW"
    cine.file_meta = FileMetaDataset()
    cine.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    cine.file_meta.MediaStorageSOPClassUID = _US_MULTIFRAME
    cine.file_meta.MediaStorageSOPInstanceUID = cine.SOPInstanceUID
    cine.preamble = b"\0" * 128
    return cine, ordered
