"""CT/MR series (lssc_multimodal) and cine ED/ES registration (adacs_registration) through the PACS path.

:func:`process_series` is what :func:`tools.pacs.run._process` calls for these two bundles:

* ``lssc_multimodal``: the retrieved single-frame CT or MR slices are written to a temporary folder, which
  ``common.data.loading`` reads as one series (slices sorted by geometry); the bundle's own ``inference.json``
  pieces run with the modality from the DICOM header (``Modality`` CT -> ``ct``, MR -> ``mr``); its ``Invertd``
  puts the labels back on the series' grid; every source slice's pixels are located in that grid through its own
  ``ImagePositionPatient``/``ImageOrientationPatient``/``PixelSpacing`` (:func:`labels_per_slice`), so the SEG
  frame of a slice is exactly that slice whatever the file or instance order. The SEG (:func:`volume_seg`, highdicom)
  references every source slice, carries the series' plane positions and orientation, and codes the MM-WHS
  structures the bundle segments (its ``structures``) in SNOMED CT (:data:`MMWHS_ANATOMY`).
* ``adacs_registration``: the ED and ES frames of a US cine (:func:`ed_es_frames`: ED from the header's R wave --
  ``RWaveTimeVector`` with the frame times, or ``RWavePointer`` -- else frame 1; ES the frame of that cycle that
  differs most from ED) are registered ED -> ES with the bundle's own pieces, and a TID 1500 SR
  (:func:`registration_report`) gives the Dice-free summary: % non-positive Jacobian determinants, mean
  displacement magnitude (mm), the ED/ES frame numbers, marked not for diagnostic use.

Result UIDs are the deterministic ones of :class:`tools.pacs.run._Job`; the destination is asked for them first.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from common.data.loading import save_dicom
from tools.pacs.ledger import TIMINGS
from tools.pacs.results import ANATOMY

__all__ = ["MMWHS_ANATOMY", "PACS_VOLUME_BUNDLES", "ed_es_frames", "labels_per_slice", "process_series",
           "registration_report", "volume_seg"]

PACS_VOLUME_BUNDLES = ("lssc_multimodal", "adacs_registration")
# short enough that "<bundle> <version> <kind> (...)" fits the 64 characters of a LO SeriesDescription
_NOT_DIAGNOSTIC = "not for diagnostic use"
# MM-WHS structure -> (SNOMED CT code, meaning); the blood pools are coded by their chamber
MMWHS_ANATOMY = {
    "LVM": ("49848007", "Left ventricle myocardium"),
    "LVC": ANATOMY["LV"],
    "LAC": ANATOMY["LA"],
    "RVC": ANATOMY["RV"],
    "RAC": ANATOMY["RA"],
    "AA": ("54247002", "Ascending aorta"),
    "PA": ("81040000", "Pulmonary artery"),
}
_MODALITY = {"CT": "ct", "MR": "mr"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# Dice-free summary concepts: no standard code exists, so a local coding scheme (DICOM allows 99-prefixed ones)
_SCHEME = "99CARDBNDL"
_FOLDING = hd.sr.CodedConcept("NONPOSJAC", _SCHEME, "Non-positive Jacobian determinant fraction")
_MEAN_DISP = hd.sr.CodedConcept("MEANDISP", _SCHEME, "Mean displacement magnitude")
_ED_FRAME = hd.sr.CodedConcept("EDFRAME", _SCHEME, "End-diastolic frame number")
_ES_FRAME = hd.sr.CodedConcept("ESFRAME", _SCHEME, "End-systolic frame number")
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


# ------------------------------------------------------------------------------------------- lssc_multimodal
def labels_per_slice(labels: np.ndarray, affine: np.ndarray, slices: Sequence[Dataset]) -> np.ndarray:
    """``(n, Rows, Columns)`` labels of each source slice, read from ``labels`` (index order ``(x, y, z)`` with the
    4x4 RAS ``affine`` of the series as ``common.data.loading`` reads it) at the slice's own pixel centres.

    Raises ``ValueError`` naming the slice (by instance number) if a pixel centre is not on the label grid -- the
    prediction would then not be on the series' grid."""
    lab = np.asarray(labels)
    if lab.ndim == 4 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 3:
        raise ValueError(f"expected (x, y, z) labels, got shape {lab.shape}")
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    out = []
    for k, ds in enumerate(slices):
        rows, cols = int(ds.Rows), int(ds.Columns)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        d_row, d_col = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = ipp + c[..., None] * d_col * iop[:3] + r[..., None] * d_row * iop[3:]
        ijk = (lps @ _LPS_TO_RAS.T) @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(ijk).astype(np.int64)
        if np.abs(ijk - idx).max() > 1e-2 or (idx < 0).any() or (idx >= np.asarray(lab.shape)).any():
            raise ValueError(f"slice {k + 1} (InstanceNumber {ds.get('InstanceNumber', '?')}) is not on the "
                             f"prediction's grid {lab.shape}")
        out.append(lab[idx[..., 0], idx[..., 1], idx[..., 2]])
    return np.stack(out).astype(np.uint8)


def _segment(number: int, name: str, bundle: str, version: str) -> hd.seg.SegmentDescription:
    code, meaning = MMWHS_ANATOMY.get(name, ANATOMY.get(name, ("85756007", "Tissue")))
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=name, segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=bundle, version=str(version), family=codes.DCM.ArtificialIntelligence, source="cardiac-bundles"))


def volume_seg(slices: Sequence[Dataset], labels: np.ndarray, class_names: Sequence[str], bundle: str,
               version: str, series_uid: str, sop_uid: str, series_number: int = 9003) -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of ``labels`` ``(n, Rows, Columns)`` (class ids, ``k`` = ``class_names[k - 1]``) over the
    single-frame ``slices`` (same order): one frame per slice and segment, each referencing its source slice, with
    the slices' plane positions, orientation and pixel spacing (highdicom takes them from the sources)."""
    lab = np.asarray(labels)
    if lab.shape != (len(slices), int(slices[0].Rows), int(slices[0].Columns)):
        raise ValueError(f"SEG labels shape {lab.shape} does not match {len(slices)} slices of "
                         f"{slices[0].Rows}x{slices[0].Columns}")
    names = list(class_names)
    if lab.max(initial=0) > len(names):
        raise ValueError(f"label value {int(lab.max())} has no class name (classes: {names})")
    return hd.seg.Segmentation(
        source_images=list(slices), pixel_array=lab, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(k + 1, n, bundle, version) for k, n in enumerate(names)],
        series_instance_uid=series_uid, series_number=series_number, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer="cardiac-bundles", manufacturer_model_name=bundle, software_versions=str(version),
        device_serial_number="0", omit_empty_frames=False, content_label="AUTOSEG",
        content_description=f"{bundle} {version}"[:64],
        series_description=f"{bundle} {version} SEG ({_NOT_DIAGNOSTIC})"[:64])


def _lssc(job: Any, model: Any, instances: list[Dataset], tmp: Path, timings: dict[str, float]) -> list[Dataset]:
    modalities = {str(d.get("Modality", "")) for d in instances}
    if len(modalities) != 1 or next(iter(modalities)) not in _MODALITY:
        raise ValueError(f"lssc_multimodal runs on one CT or MR series, got modalities {sorted(modalities)}")
    modality = _MODALITY[modalities.pop()]
    missing = [kw for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if any(kw not in d for d in instances)]
    if missing:
        raise ValueError(f"slices without {missing}: a series needs its patient geometry")
    t = time.perf_counter()
    folder = tmp / "series"
    folder.mkdir(parents=True)
    for k, ds in enumerate(instances):
        save_dicom(ds, folder / f"{k:05d}.dcm", file_format=False)
    timings["retrieve"] += time.perf_counter() - t
    pred, data = model.predict(folder, timings, modality=modality)
    affine = np.asarray(data["pred"].affine if hasattr(data["pred"], "affine") else data["image"].affine)
    t = time.perf_counter()
    per_slice = labels_per_slice(pred, affine, instances)
    structures = list(model.parser.get_parsed_content("structures"))
    seg = volume_seg(instances, per_slice, structures, model.name, model.version, job.seg_series, job.seg_uid)
    timings["encode"] += time.perf_counter() - t
    return [seg]


# ---------------------------------------------------------------------------------------- adacs_registration
def _values(ds: Dataset, keyword: str) -> list[float]:
    """A multi-valued element as a list (pydicom gives a single value as a scalar)."""
    v = ds.get(keyword)
    if v is None or v == "":
        return []
    return [float(x) for x in v] if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") and \
        not isinstance(v, str) else [float(v)]


def _frame_times_ms(ds: Dataset, n: int) -> np.ndarray | None:
    """Start time (ms) of each frame from ``FrameTimeVector`` (increments) or ``FrameTime``; None if neither."""
    vector = _values(ds, "FrameTimeVector")
    if len(vector) == n:
        return np.cumsum(vector)  # first entry is 0 by definition
    if ds.get("FrameTime"):
        return np.arange(n) * float(ds.FrameTime)
    return None


def ed_es_frames(ds: Dataset, frames: np.ndarray) -> tuple[int, int, str]:
    """``(ED, ES, how)`` 0-based frame indices of the cine ``ds`` with ``frames`` ``(T, H, W)``.

    ED: the first R wave -- ``RWaveTimeVector`` (ms from the first frame) mapped through the frame times
    (``FrameTimeVector``/``FrameTime``), or ``RWavePointer`` (frame numbers) -- else frame 1 (echo cines are
    usually triggered on the R wave). ES: within that cardiac cycle (up to the next R wave, or the cine's end), the
    frame that differs most from ED (mean squared difference of the min-max normalised frames): end-systole is the
    largest deformation from end-diastole. The ``how`` string says which sources were used."""
    arr = np.asarray(frames, dtype=np.float64)
    n = arr.shape[0]
    if n < 2:
        raise ValueError(f"a cine of {n} frame(s) has no ED/ES pair")
    r_frames: list[int] = []
    how = "ED = frame 1 (no R wave in the header)"
    times = _frame_times_ms(ds, n)
    if _values(ds, "RWaveTimeVector") and times is not None:
        r_frames = sorted({int(np.argmin(np.abs(times - v))) for v in _values(ds, "RWaveTimeVector")})
        how = "ED from RWaveTimeVector and the frame times"
    elif _values(ds, "RWavePointer"):
        r_frames = sorted({int(v) - 1 for v in _values(ds, "RWavePointer") if 1 <= int(v) <= n})
        how = "ED from RWavePointer"
    ed = r_frames[0] if r_frames else 0
    end = next((r for r in r_frames if r > ed + 1), n)
    lo, hi = arr.min(), arr.max()
    norm = (arr - lo) / (hi - lo) if hi > lo else arr * 0
    diffs = ((norm[ed + 1:end] - norm[ed]) ** 2).reshape(max(end - ed - 1, 0), -1).mean(1)
    if diffs.size == 0:
        raise ValueError(f"no frame after ED (frame {ed + 1}) in its cardiac cycle")
    es = ed + 1 + int(np.argmax(diffs))
    return ed, es, how + "; ES = frame of the cycle most different from ED"


def registration_report(source: Dataset, ed: int, es: int, folding_percent: float, mean_disp_mm: float,
                        bundle: str, version: str, series_uid: str, sop_uid: str, tracking_uid: str,
                        series_number: int = 9004) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 SR of the ED -> ES registration of the cine ``source``: % non-positive Jacobian determinants,
    mean displacement magnitude (mm), ED and ES frame numbers (1-based), both frames referenced; marked research
    use / not for diagnostic use."""
    algo = hd.sr.AlgorithmIdentification(name=bundle, version=str(version))
    values = [(_FOLDING, folding_percent, hd.sr.CodedConcept("%", "UCUM", "percent")),
              (_MEAN_DISP, mean_disp_mm, codes.UCUM.Millimeter),
              (_ED_FRAME, ed + 1, _NO_UNITS), (_ES_FRAME, es + 1, _NO_UNITS)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[tracking_uid, "ed-es"]),
                                                     identifier=f"ED (frame {ed + 1}) to ES (frame {es + 1})"),
        algorithm_id=algo,
        measurements=[hd.sr.Measurement(name=name, value=float(v), unit=unit, algorithm_id=algo)
                      for name, v, unit in values],
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), str(source.SOPInstanceUID),
                                                            referenced_frame_numbers=[ed + 1, es + 1])])
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=hd.sr.CodedConcept("40701008", "SCT", "Echocardiography"), imaging_measurements=[group])
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0], series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="cardiac-bundles", is_complete=True,
        series_description=f"{bundle} {version} ED-ES ({_NOT_DIAGNOSTIC})"[:64])


def _adacs(job: Any, model: Any, instances: list[Dataset], tmp: Path, timings: dict[str, float]) -> list[Dataset]:
    import torch

    from common.data.io import read_image, write_nifti
    from common.data.loading import to_frames
    from common.engines.registration import displacement_on_grid
    from common.metrics.registration import nonpositive_jacobian_percent

    if len(instances) != 1:
        raise ValueError(f"expected one cine instance in the series, retrieved {len(instances)}")
    ds = instances[0]
    t = time.perf_counter()
    path = tmp / "cine.dcm"
    save_dicom(ds, path, file_format=False)
    timings["retrieve"] += time.perf_counter() - t
    t = time.perf_counter()
    img = read_image(path)
    frames = to_frames(np.asarray(img.array), path)  # (T, H, W)
    ed, es, _ = ed_es_frames(ds, frames)
    spacing = (float(img.spacing[0]), float(img.spacing[1]))  # along x (columns), y (rows)
    # the pair as 2D images in index order (x, y), the form the bundle's own reader takes
    pair = {"name": "ed_es", "source_mask": ""}
    for key, k in (("source", ed), ("target", es)):
        pair[key] = str(write_nifti(tmp / f"{key}.nii.gz", np.ascontiguousarray(frames[k].T.astype(np.float32)),
                                    spacing=spacing))
    timings["decode"] += time.perf_counter() - t
    ddf_net, _ = model.predict(pair, timings)
    t = time.perf_counter()
    ddf = displacement_on_grid(torch.as_tensor(ddf_net), frames[0].T.shape)  # (1, 2, W, H) pixels
    folding = float(nonpositive_jacobian_percent(ddf)[0])
    mm = ddf[0] * torch.tensor(spacing, dtype=ddf.dtype).view(2, 1, 1)
    mean_mm = float(mm.norm(dim=0).mean())
    sr = registration_report(ds, ed, es, folding, mean_mm, model.name, model.version, job.sr_series, job.sr_uid,
                             job.tracking_uid)
    timings["model"] += time.perf_counter() - t
    return [sr]


# --------------------------------------------------------------------------------------------------- dispatch
def process_series(job: Any, model: Any, source: Any, dest: Any, tmp_dir: Path) -> tuple[list[str],
                                                                                          dict[str, float], str]:
    """Compute and store the result of one series for ``lssc_multimodal`` (a SEG) or ``adacs_registration`` (an
    SR); ``(result UIDs, timings, note)`` like :func:`tools.pacs.run._process`. Nothing is computed when the
    result is at ``dest`` already."""
    timings = dict.fromkeys(TIMINGS, 0.0)
    lssc = model.name == "lssc_multimodal"
    uid, series = (job.seg_uid, job.seg_series) if lssc else (job.sr_uid, job.sr_series)
    if dest.exists(job.info.study_uid, series, uid):
        return [uid], timings, "already at the destination"
    t = time.perf_counter()
    instances = source.retrieve(job.info.study_uid, job.info.series_uid)
    timings["retrieve"] = time.perf_counter() - t
    tmp = tmp_dir / job.seg_uid
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        out = (_lssc if lssc else _adacs)(job, model, instances, tmp, timings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = time.perf_counter()
    dest.store(out)
    timings["store"] = time.perf_counter() - t
    return [uid], timings, ""
