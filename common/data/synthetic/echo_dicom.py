"""Synthetic echo cines written as real DICOM: Ultrasound Multi-frame Image Storage files a PACS accepts.

:func:`echo_dicom_dataset` turns a simulated :class:`~common.data.synthetic.echo.EchoSequence` (or any ``(T, H, W)``
frames in ``[0, 1]``) into a pydicom dataset with the modules the US Multi-frame Image IOD requires -- Patient,
General Study, General Series, Frame of Reference, General Equipment, General/Image Pixel, Cine, Multi-frame, US
Region Calibration -- 8-bit ``MONOCHROME2`` pixels, ``FrameTime`` from the frame rate and the pixel size twice: in
``SequenceOfUltrasoundRegions`` (cm, as scanners write it) and as ``PixelSpacing`` (mm). Patients are synthetic
(``SYNTH^PATIENT<n>``, IDs ``SYN<n>``) so tests can check that no patient identifier reaches a log.
:func:`write_echo_dicom_study` writes ``n_studies`` simulated patients, one cine each, as ``.dcm`` files.

UIDs are derived from the seed (``pydicom.uid.generate_uid`` with entropy sources), so the same call writes the same
files: a test can upload, delete and re-upload them and a PACS sees the same instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from common.data.loading import save_dicom

__all__ = ["US_MULTIFRAME_SOP_CLASS", "echo_dicom_dataset", "write_echo_dicom_study"]

US_MULTIFRAME_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
_FRAME_TIME_TAG = 0x00181063  # FrameTime: the Frame Increment Pointer of a cine


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["cardiac-bundles synthetic echo", *[str(p) for p in parts]])


def echo_dicom_dataset(frames: np.ndarray, spacing: Sequence[float], fps: float, patient_index: int, seed: int,
                       series_number: int = 1, study_date: str = "20260101", view: str = "4CH",
                       ed_frame: int | None = None, es_frame: int | None = None) -> Dataset:
    """A US multi-frame DICOM dataset of ``frames`` ``(T, H, W)`` (values in ``[0, 1]``, row 0 at the top).

    ``spacing``: ``(row, col)`` mm per pixel; ``fps``: frames per second (``FrameTime = 1000 / fps`` ms);
    ``patient_index`` names the synthetic patient; ``seed`` makes the UIDs (same arguments -> same UIDs);
    ``ed_frame``/``es_frame`` (0-based) are noted in ``ImageComments`` (the US Multi-frame IOD has no standard
    per-frame ED/ES slot).
    Raises ``ValueError`` naming the problem for a wrong shape, non-finite values or a non-positive spacing/fps.
    """
    arr = np.asarray(frames)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"echo_dicom_dataset: frames must be (T, H, W), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("echo_dicom_dataset: frames hold NaN/Inf values")
    sr, sc = (float(s) for s in spacing)
    if sr <= 0 or sc <= 0 or fps <= 0:
        raise ValueError(f"echo_dicom_dataset: spacing {spacing} and fps {fps} must be positive")
    t, h, w = arr.shape
    pixels = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)

    study_uid = _uid("study", seed, patient_index)
    series_uid = _uid("series", seed, patient_index, series_number)
    sop_uid = _uid("instance", seed, patient_index, series_number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_MULTIFRAME_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient module: synthetic identities only
    ds.PatientName = f"SYNTH^PATIENT{patient_index:04d}"
    ds.PatientID = f"SYN{seed:04d}{patient_index:04d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"S{patient_index:04d}"
    ds.AccessionNumber = f"ACC{seed:03d}{patient_index:04d}"
    ds.StudyDescription = "Synthetic transthoracic echo"
    # General Series
    ds.Modality = "US"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = f"Apical {view} cine"
    ds.Laterality = ""
    # Frame of Reference: lets a DICOM SEG of the cine carry plane positions (highdicom needs them for multi-frame)
    ds.FrameOfReferenceUID = _uid("for", seed, patient_index, series_number)
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "cardiac-bundles synthetic echo simulator"
    ds.ManufacturerModelName = "common.data.synthetic.echo"
    # General Image
    ds.InstanceNumber = 1
    ds.ContentDate = study_date
    ds.ContentTime = "120000"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    comments = [f"synthetic apical {view}"]
    if ed_frame is not None and es_frame is not None:
        comments.append(f"ED frame {int(ed_frame) + 1}, ES frame {int(es_frame) + 1} (1-based)")
    ds.ImageComments = "; ".join(comments)
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(h), int(w)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # Multi-frame + Cine
    ds.NumberOfFrames = int(t)
    ds.FrameIncrementPointer = _FRAME_TIME_TAG
    ds.FrameTime = f"{1000.0 / fps:.4f}"
    ds.CineRate = int(round(fps))
    ds.RecommendedDisplayFrameRate = int(round(fps))
    # Geometry: the plane of the image in its own frame of reference (rows along x, columns along y, z = 0)
    ds.PixelSpacing = [f"{sr:.6g}", f"{sc:.6g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    # US Region Calibration (cm per pixel, units code 3 = cm)
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = int(w - 1), int(h - 1)
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = sc / 10.0
    region.PhysicalDeltaY = sr / 10.0
    ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    ds.PixelData = pixels.tobytes()
    return ds


def write_echo_dicom_study(out_dir: str | Path, n_studies: int = 2, seed: int = 0, n_frames: int = 8,
                           image_size: tuple[int, int] = (64, 64), view: str = "4CH",
                           study_date: str = "20260101") -> list[Path]:
    """Simulate ``n_studies`` patients (seeds ``seed * 1000 + i``) and write one US cine per study as
    ``<out_dir>/synth_<i>.dcm``; returns the paths. Same arguments -> identical files (pixels and UIDs)."""
    from common.data.synthetic.echo import simulate_echo_sequence

    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_studies):
        seq = simulate_echo_sequence(seed=seed * 1000 + i, view=view, n_frames=n_frames, image_size=image_size)
        ds = echo_dicom_dataset(seq.images, seq.spacing, seq.fps, patient_index=i, seed=seed, view=view,
                                study_date=study_date, ed_frame=seq.ed_frame, es_frame=seq.es_frame)
        path = out / f"synth_{i}.dcm"
        save_dicom(ds, path, file_format=True)
        paths.append(path)
    return paths
