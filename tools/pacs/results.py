"""Results as DICOM a PACS viewer shows: a multi-frame DICOM SEG and a TID 1500 measurement report (SR).

:func:`echo_seg` encodes per-frame label maps of an ultrasound cine ``(T, H, W)`` as one BINARY DICOM SEG with
``highdicom``: one segment per class with coded anatomy (SNOMED CT: left ventricle, left ventricle myocardium, left
atrium), algorithm identification (bundle name and version), the source's patient/study modules, its pixel spacing
and, per SEG frame, a reference to the source instance *and frame* it was derived from. highdicom only writes
multi-frame SEGs of sources with patient plane positions (a cine has none per frame: every frame lies in the same
plane), so the SEG is built for the cine's first frame and extended frame by frame: every segment gets one SEG
frame per cine frame, indexed by ``(ReferencedSegmentNumber, TemporalPositionIndex)`` and referencing
``ReferencedFrameNumber`` of the source -- the same structure highdicom writes for one frame, repeated.

:func:`echo_area_report` writes a Comprehensive 3D SR following TID 1500 with ``highdicom.sr``: one measurement
group per frame (LV and LA areas in mm^2, the source frame referenced) plus ED and ES groups (ED = largest LV area,
ES = smallest), the algorithm named, marked research use / not for diagnostic use in its series description.
:func:`decode_seg_frames` decodes a SEG written by :func:`echo_seg` back to ``(T, H, W)`` label maps (tests, QA).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from common.data.loading import dicom_inplane_spacing

__all__ = ["ANATOMY", "decode_seg_frames", "echo_area_report", "echo_seg", "label_areas_mm2"]

_US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
_NOT_DIAGNOSTIC = "research use only, not for diagnostic use"
# class name -> (SNOMED CT code, meaning) of the segmented structure
ANATOMY = {
    "LV": ("87878005", "Left ventricle"),
    "Myo": ("49848007", "Left ventricle myocardium"),
    "LA": ("82471001", "Left atrium"),
    "RV": ("53085002", "Right ventricle"),
    "RA": ("73829009", "Right atrium"),
}
_TEMPORAL_POSITION_INDEX = Tag(0x0020, 0x9128)
_FRAME_CONTENT_SEQUENCE = Tag(0x0020, 0x9111)


def _algorithm(bundle: str, version: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=bundle, version=str(version),
                                              family=codes.DCM.ArtificialIntelligence,
                                              source="cardiac-bundles")


def _segment(number: int, name: str, bundle: str, version: str) -> hd.seg.SegmentDescription:
    code, meaning = ANATOMY.get(name, ("85756007", "Tissue"))
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=name,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(bundle, version))


def _single_frame_proxy(source: Dataset) -> Dataset:
    """The cine's header as a one-frame US image (same UIDs, no pixels, no plane geometry) for highdicom."""
    proxy = Dataset()
    for elem in source:
        if elem.tag.group != 0x7FE0:
            proxy.add(elem)
    proxy.SOPClassUID = _US_IMAGE
    spacing = dicom_inplane_spacing(source)
    if "PixelSpacing" not in proxy and spacing is not None:
        # a cine calibrated only by its ultrasound regions: the SEG's pixel measures carry that spacing (mm)
        proxy.PixelSpacing = [f"{spacing[0]:.10g}", f"{spacing[1]:.10g}"]
    for kw in ("NumberOfFrames", "FrameIncrementPointer", "FrameOfReferenceUID", "ImagePositionPatient",
               "ImageOrientationPatient", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        if kw in proxy:
            delattr(proxy, kw)
    return proxy


def echo_seg(source: Dataset, labels: np.ndarray, class_names: Sequence[str], bundle: str, version: str,
             series_uid: str, sop_uid: str, series_number: int = 9001,
             frame_sources: Sequence[Dataset] | None = None) -> hd.seg.Segmentation:
    """A multi-frame BINARY SEG of ``labels`` ``(T, H, W)`` (class ids; ``k`` = ``class_names[k - 1]``) over the
    cine ``source`` (module docstring). ``frame_sources``: for a cine stacked from single-frame instances
    (:func:`tools.pacs.cine.as_cine`), frame ``t``'s own instance, referenced instead of frame ``t`` of ``source``.
    Raises ``ValueError`` if the label grid differs from the source."""
    lab = np.asarray(labels)
    n_src = int(source.get("NumberOfFrames", 1) or 1)
    if lab.ndim != 3 or lab.shape != (n_src, int(source.Rows), int(source.Columns)):
        raise ValueError(f"SEG labels shape {lab.shape} does not match the source cine "
                         f"({n_src}, {source.Rows}, {source.Columns})")
    names = list(class_names)
    if lab.max(initial=0) > len(names):
        raise ValueError(f"label value {int(lab.max())} has no class name (classes: {names})")
    segments = [_segment(k + 1, n, bundle, version) for k, n in enumerate(names)]
    template = hd.seg.Segmentation(
        source_images=[_single_frame_proxy(source)], pixel_array=np.zeros((1, *lab.shape[1:]), np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=series_uid, series_number=series_number, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer="cardiac-bundles", manufacturer_model_name=bundle, software_versions=str(version),
        device_serial_number="0", omit_empty_frames=False, content_label="AUTOSEG",
        content_description=f"{bundle} {version}"[:64],
        series_description=f"{bundle} {version} SEG ({_NOT_DIAGNOSTIC})"[:64])
    seg = template  # extended in place below
    src_class = str(source.SOPClassUID)
    for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence:
        ref.ReferencedSOPClassUID = src_class
    if "FrameOfReferenceUID" in source:
        seg.FrameOfReferenceUID = source.FrameOfReferenceUID
    dim = Dataset()
    dim.DimensionOrganizationUID = seg.DimensionIndexSequence[0].DimensionOrganizationUID
    dim.DimensionIndexPointer = _TEMPORAL_POSITION_INDEX
    dim.FunctionalGroupPointer = _FRAME_CONTENT_SEQUENCE
    dim.DimensionDescriptionLabel = "Temporal Position Index"
    seg.DimensionIndexSequence.append(dim)
    per_segment = {int(it.SegmentIdentificationSequence[0].ReferencedSegmentNumber): it
                   for it in seg.PerFrameFunctionalGroupsSequence}
    items, planes = [], []
    for s in range(1, len(names) + 1):
        for t in range(n_src):
            item = copy.deepcopy(per_segment[s])
            src_ref = item.DerivationImageSequence[0].SourceImageSequence[0]
            src_ref.ReferencedSOPClassUID = src_class
            src_ref.ReferencedFrameNumber = t + 1
            if frame_sources is not None:  # a single-frame instance per cine frame: reference it, no frame number
                src_ref.ReferencedSOPClassUID = str(frame_sources[t].SOPClassUID)
                src_ref.ReferencedSOPInstanceUID = str(frame_sources[t].SOPInstanceUID)
                del src_ref.ReferencedFrameNumber
            fc = item.FrameContentSequence[0]
            fc.DimensionIndexValues = [s, t + 1]
            fc.TemporalPositionIndex = t + 1
            items.append(item)
            planes.append(lab[t] == s)
    seg.PerFrameFunctionalGroupsSequence = items
    seg.NumberOfFrames = len(items)
    if frame_sources is not None:
        refs = []
        for d in frame_sources:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = str(d.SOPClassUID), str(d.SOPInstanceUID)
            refs.append(ref)
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence = refs
    bits = np.packbits(np.stack(planes).reshape(-1).astype(np.uint8), bitorder="little").tobytes()
    seg.PixelData = bits + (b"\0" if len(bits) % 2 else b"")
    return seg


def decode_seg_frames(seg: Dataset, n_frames: int) -> np.ndarray:
    """``(T, H, W)`` uint8 label maps of a SEG written by :func:`echo_seg` (frames placed by their referenced
    segment and source frame numbers, so it works whatever order the frames are stored in)."""
    rows, cols, n = int(seg.Rows), int(seg.Columns), int(seg.NumberOfFrames)
    bits = np.unpackbits(np.frombuffer(seg.PixelData, np.uint8), bitorder="little")[: n * rows * cols]
    planes = bits.reshape(n, rows, cols)
    out = np.zeros((n_frames, rows, cols), np.uint8)
    for k, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        s = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        # the temporal position (always written by echo_seg): a SEG over single-frame instances has no frame numbers
        fc = item.get("FrameContentSequence")
        t = (int(fc[0].TemporalPositionIndex) if fc and "TemporalPositionIndex" in fc[0] else
             int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)) - 1
        out[t][planes[k] > 0] = s
    return out


def label_areas_mm2(labels: np.ndarray, spacing: tuple[float, float]) -> dict[int, np.ndarray]:
    """Per class id (> 0) present in ``labels`` ``(T, H, W)``: the area of each frame in mm^2."""
    lab = np.asarray(labels)
    px = float(spacing[0]) * float(spacing[1])
    return {int(c): (lab == c).reshape(lab.shape[0], -1).sum(1) * px for c in range(1, int(lab.max(initial=0)) + 1)}


def _area(name: str, value: float, bundle: str, version: str) -> hd.sr.Measurement:
    code, meaning = ANATOMY.get(name, ("85756007", "Tissue"))
    return hd.sr.Measurement(name=codes.SCT.Area, value=float(value), unit=codes.UCUM.SquareMillimeter,
                             finding_sites=[hd.sr.FindingSite(hd.sr.CodedConcept(code, "SCT", meaning))],
                             algorithm_id=hd.sr.AlgorithmIdentification(name=bundle, version=str(version)))


def echo_area_report(source: Dataset, labels: np.ndarray, class_names: Sequence[str],
                     spacing: tuple[float, float], bundle: str, version: str, series_uid: str, sop_uid: str,
                     tracking_uid: str, series_number: int = 9002,
                     frame_sources: Sequence[Dataset] | None = None) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 SR of LV and LA areas per frame of the cine ``source`` and at ED/ES (module docstring);
    ``frame_sources`` as in :func:`echo_seg` (each group then references its frame's own instance).
    ``tracking_uid`` seeds the groups' tracking UIDs (deterministic). ``ValueError`` if LV is not a class."""
    names = list(class_names)
    if "LV" not in names:
        raise ValueError(f"{bundle}: the area report needs an LV class, got classes {names}")
    areas = label_areas_mm2(labels, spacing)
    n = int(np.asarray(labels).shape[0])
    per_class = {name: areas.get(k + 1, np.zeros(n)) for k, name in enumerate(names) if name in ("LV", "LA")}
    lv = per_class["LV"]
    ed, es = int(np.argmax(lv)), int(np.argmin(lv))
    src_class, src_uid = str(source.SOPClassUID), str(source.SOPInstanceUID)
    groups = []
    frames = [(t, f"frame {t + 1}") for t in range(n)] + [(ed, f"ED (frame {ed + 1})"), (es, f"ES (frame {es + 1})")]
    for k, (t, label) in enumerate(frames):
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[tracking_uid, str(k)]), identifier=label),
            algorithm_id=hd.sr.AlgorithmIdentification(name=bundle, version=str(version)),
            measurements=[_area(name, a[t], bundle, version) for name, a in per_class.items()],
            source_images=[hd.sr.SourceImageForMeasurementGroup(src_class, src_uid, referenced_frame_numbers=[t + 1])
                           if frame_sources is None else hd.sr.SourceImageForMeasurementGroup(
                               str(frame_sources[t].SOPClassUID), str(frame_sources[t].SOPInstanceUID))],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=hd.sr.CodedConcept("40701008", "SCT", "Echocardiography"),
        imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=list(frame_sources) if frame_sources is not None else [source], content=report[0],
        series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="cardiac-bundles", is_complete=True,
        series_description=f"{bundle} {version} areas ({_NOT_DIAGNOSTIC})"[:64])
