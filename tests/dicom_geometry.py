"""Shared helpers of the geometry tests: an independent (SimpleITK) view of an image's geometry, and DICOM series
written from pydicom-data's real MR header with a chosen orientation, origin and file names against slice order."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from common.data.loading import save_dicom

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def sitk_ras(img: sitk.Image) -> np.ndarray:
    """Index -> RAS affine of a SimpleITK image, from its own origin/spacing/direction (LPS)."""
    dim = img.GetDimension()
    a = np.eye(4)
    a[:dim, :dim] = np.asarray(img.GetDirection()).reshape(dim, dim) @ np.diag(img.GetSpacing())
    a[:dim, 3] = img.GetOrigin()
    return LPS_TO_RAS @ a


def write_mr_series(folder: Path, volume: np.ndarray, rotation: np.ndarray, origin, spacing=(1.1, 0.9), step=2.0,
                    name: str = "z{n:03d}.dcm", instance_numbers: bool = True, template: str = "MR_small.dcm") -> None:
    """``volume`` (Z, rows, cols) as single-frame MR files on pydicom-data's ``MR_small`` header.

    Slice ``k`` lies at ``origin + k * step * rotation[:, 2]``; file names (``name`` formatted with ``n``) run against
    the slice order, so a reader that sorts by name gets the volume backwards. ``instance_numbers=False`` leaves
    ``InstanceNumber`` as the template has it (the same in every file), as some exports do. ``template``: another
    pydicom-data file of 16-bit pixels (``"CT_small.dcm"`` for a CT series).
    """
    template = pydicom.dcmread(get_testdata_file(template))
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    for k in range(volume.shape[0]):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*rotation[:, 0], *rotation[:, 1])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * step * rotation[:, 2]]
        if instance_numbers:
            ds.InstanceNumber = volume.shape[0] - k
        ds.PixelData = volume[k].astype(np.int16).tobytes()
        save_dicom(ds, folder / name.format(n=volume.shape[0] - k))
