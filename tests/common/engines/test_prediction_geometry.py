"""Prediction geometry equals input geometry, through each bundle's own inference writer.

For NIfTI (nibabel's oblique test file), MetaImage with a non-identity direction and a non-zero origin, and DICOM
(pydicom-data files and a series written from pydicom-data's MR header): the written prediction has the input's
shape, and its affine equals the input's geometry as an independent reader (nibabel, SimpleITK/GDCM) sees it; the
prediction is a threshold of the input, so its voxels must also line up with the input's voxels (no flip, no
transpose). botm_seg: ``LoadEchoFramesd`` + ``SaveEchoPredictiond``; lssc_multimodal: the bundle's
``inference.json`` preprocessing + ``Invertd``/``SaveImaged`` postprocessing; adacs_registration:
``RegistrationInferenceWriter``. (specknet_tracking writes tracks in pixel coordinates, no image.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from nibabel.testing import data_path as NIB_DATA
from pydicom.data import get_testdata_file

from common.data.io import write_mhd, write_nifti
from tests.dicom_geometry import sitk_ras, write_mr_series

ROOT = Path(__file__).resolve().parents[3]
OBLIQUE = nib.load(f"{NIB_DATA}/example4d.nii.gz").affine  # a real oblique scanner affine


def _rotation(a: float, b: float) -> np.ndarray:
    ca, sa, cb, sb = math.cos(a), math.sin(a), math.cos(b), math.sin(b)
    return np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])


def _blob(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth off-centre blob (so a threshold survives resampling) with a little noise, in index order."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = [0.3, -0.2, 0.1, 0.0][: len(shape)]
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    rng = np.random.default_rng(seed)
    return (1000 * np.exp(-r2 / 0.3) + 50 * rng.random(shape)).astype(np.int16)


def _series_reference(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


# ------------------------------------------------------------------------------------------------------ botm_seg
def test_botm_writer_restores_nifti_metaimage_and_dicom_grids(tmp_path):
    from common.engines.echo_inference import LoadEchoFramesd, SaveEchoPredictiond

    seq = _blob((24, 20, 3))  # index order (W, H, T)
    nii = write_nifti(tmp_path / "oblique_seq.nii.gz", seq, affine=OBLIQUE)
    rot = _rotation(0.5, -0.4)
    mha = write_mhd(tmp_path / "rotated_seq.mha", seq.T, spacing=(1.0, 0.45, 0.3), origin=(-31.0, 12.5, 4.0),
                    direction=tuple(rot.ravel()))
    us = Path(get_testdata_file("OBXXXX1A_rle_2frame.dcm"))  # a real 2-frame ultrasound (RLE, palette colour)
    references = {
        nii: (nib.load(str(nii)).affine, np.asarray(nib.load(str(nii)).dataobj)),
        mha: (sitk_ras(sitk.ReadImage(str(mha))), sitk.GetArrayFromImage(sitk.ReadImage(str(mha))).T),
    }
    loader = LoadEchoFramesd(keys="image")
    for path in (nii, mha, us):
        d = loader({"image": str(path), "case": path.stem, "output_stems": json.dumps([path.stem])})
        frames = d["image"].numpy()
        masks = (frames > np.median(frames)).astype(np.uint8)  # a "prediction" that follows the image
        out_dir = tmp_path / f"out_{path.stem}"
        SaveEchoPredictiond(keys="pred", output_dir=str(out_dir), png=False)({**d, "pred": masks})
        written = nib.load(str(out_dir / f"{path.stem}_seg.nii.gz"))
        got = np.asarray(written.dataobj)
        if path in references:
            affine, image = references[path]
            assert got.shape == image.shape
            np.testing.assert_allclose(written.affine, affine, atol=1e-5)
            np.testing.assert_array_equal(got, (image > np.median(image)).astype(np.uint8))
            back = sitk.ReadImage(str(out_dir / f"{path.stem}_seg.nii.gz"))
            if path == mha:  # ITK reads the prediction with the input's spacing, origin and direction
                src = sitk.ReadImage(str(mha))
                np.testing.assert_allclose(back.GetOrigin(), src.GetOrigin(), atol=1e-4)
                np.testing.assert_allclose(back.GetSpacing(), src.GetSpacing(), atol=1e-5)
                np.testing.assert_allclose(back.GetDirection(), src.GetDirection(), atol=1e-5)
        else:
            ds = pydicom.dcmread(path)
            assert got.shape == (int(ds.Columns), int(ds.Rows), int(ds.NumberOfFrames))
            # the palette-coloured frames' gray level, computed here with pydicom's own LUT, lines up pixel for pixel
            rgb = pydicom.pixels.apply_color_lut(ds.pixel_array, ds).astype(np.float64)
            gray = rgb @ np.array([0.299, 0.587, 0.114])  # (T, rows, cols)
            expected = (np.clip(np.rint(gray), 0, 255) > np.median(frames)).astype(np.uint8)
            assert (got.transpose(2, 1, 0) == expected).mean() > 0.999


# ------------------------------------------------------------------------------------------------ lssc_multimodal
@pytest.fixture(scope="module")
def lssc_transforms(tmp_path_factory):
    """The preprocessing and postprocessing of lssc's inference.json, as the bundle defines them."""
    from monai.bundle import ConfigParser

    out = tmp_path_factory.mktemp("lssc_pred")
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles/lssc_multimodal/configs/inference.json"))
    parser.update({"bundle_root": str(ROOT / "bundles/lssc_multimodal"), "output_dir": str(out),
                   "prediction_dir": str(out), "spatial_size": 64})
    return parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing"), out


def _lssc_predict(path: Path, pre, post, out: Path) -> nib.Nifti1Image:
    d = pre({"image": str(path), "modality": "mr"})
    image = d["image"]
    fg = (image[0] > 0.5).float()  # z-scored image: the bright blob
    logits = torch.stack([1 - fg, fg, torch.zeros_like(fg), torch.zeros_like(fg), torch.zeros_like(fg)])
    # the inferer's output carries the input's meta and transform history (common.engines.inference)
    d["pred"] = MetaTensor(logits, meta=image.meta, applied_operations=image.applied_operations)
    post(d)
    name = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    return nib.load(str(out / f"{name}_seg.nii.gz"))


def _agreement(pred: np.ndarray, image: np.ndarray) -> float:
    expected = image > image.mean() + 0.5 * image.std()
    return float(((pred > 0) == expected).mean())


def test_lssc_inference_restores_oblique_nifti_grid(tmp_path, lssc_transforms):
    pre, post, out = lssc_transforms
    vol = _blob((30, 26, 12))
    nii = write_nifti(tmp_path / "oblique.nii.gz", vol, affine=OBLIQUE)
    written = _lssc_predict(nii, pre, post, out)
    assert written.shape == vol.shape
    np.testing.assert_allclose(written.affine, OBLIQUE, atol=1e-4)
    assert _agreement(np.asarray(written.dataobj), vol.astype(float)) > 0.9


def test_lssc_inference_restores_rotated_metaimage_grid(tmp_path, lssc_transforms):
    pre, post, out = lssc_transforms
    vol = _blob((28, 24, 10), seed=1)
    mha = write_mhd(tmp_path / "rotated.mha", vol.T, spacing=(2.0, 0.9, 0.8), origin=(15.0, -40.0, 22.0),
                    direction=tuple(_rotation(-0.6, 0.35).ravel()))
    src = sitk.ReadImage(str(mha))
    written = _lssc_predict(mha, pre, post, out)
    assert written.shape == vol.shape
    np.testing.assert_allclose(written.affine, sitk_ras(src), atol=1e-4)
    back = sitk.ReadImage(str(out / "rotated_seg.nii.gz"))
    np.testing.assert_allclose(back.GetOrigin(), src.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetDirection(), src.GetDirection(), atol=1e-5)
    assert _agreement(np.asarray(written.dataobj), vol.astype(float)) > 0.9


def test_lssc_inference_reads_a_dicom_series_and_restores_its_grid(tmp_path, lssc_transforms):
    pre, post, out = lssc_transforms
    vol = _blob((9, 24, 28), seed=2)  # (Z, rows, cols) as DICOM stores it
    series = tmp_path / "mr_series"
    write_mr_series(series, vol, _rotation(0.25, 0.6), origin=(-20.0, 35.0, 60.0))
    ref = _series_reference(series)
    written = _lssc_predict(series, pre, post, out)
    assert written.shape == (28, 24, 9)  # (Columns, Rows, slices)
    ras = sitk_ras(ref)
    np.testing.assert_allclose(written.affine, ras, atol=1e-4)
    image = sitk.GetArrayFromImage(ref).T.astype(float)  # GDCM's slice order, index order
    assert _agreement(np.asarray(written.dataobj), image) > 0.9


def test_lssc_datalist_takes_the_modality_from_the_dicom_header(tmp_path):
    from common.engines.inference import modality_datalist

    emri, ct = get_testdata_file("emri_small.dcm"), get_testdata_file("CT_small.dcm")  # no modality in the names
    assert modality_datalist([emri, ct]) == [{"image": emri, "modality": "mr"}, {"image": ct, "modality": "ct"}]
    series = tmp_path / "study" / "series_a"
    write_mr_series(series, _blob((3, 8, 8)), np.eye(3), origin=(0.0, 0.0, 0.0))
    # a folder holding one series is one volume; a folder of series folders gives one entry per series
    assert modality_datalist(series) == [{"image": str(series), "modality": "mr"}]
    assert modality_datalist(tmp_path / "study") == [{"image": str(series), "modality": "mr"}]
    with pytest.raises(ValueError, match="unknown modality 'us'"):
        modality_datalist(get_testdata_file("US1_J2KR.dcm"))


# --------------------------------------------------------------------------------------------- adacs_registration
def test_adacs_writer_puts_the_warped_image_on_the_target_grid(tmp_path):
    from common.engines.registration import RegistrationInferenceWriter

    img2d = _blob((40, 36))
    nii = write_nifti(tmp_path / "t.nii.gz", img2d[..., None], affine=OBLIQUE)  # (X, Y, 1): shape kept as is
    mha = write_mhd(tmp_path / "t.mha", img2d.T, spacing=(0.6, 0.4), origin=(7.0, -3.0), direction=(0, -1, 1, 0))
    mr = get_testdata_file("MR_small.dcm")  # real MR slice with patient geometry
    cases = {
        "nifti": (nii, nib.load(str(nii)).affine, np.asarray(nib.load(str(nii)).dataobj)),
        "mhd": (mha, sitk_ras(sitk.ReadImage(str(mha))), sitk.GetArrayFromImage(sitk.ReadImage(str(mha))).T),
        "dicom": (mr, None, pydicom.dcmread(mr).pixel_array.T),
    }
    writer = RegistrationInferenceWriter(str(tmp_path / "out"))
    for name, (path, affine, image) in cases.items():
        h, w = image.shape[:2]
        rec = writer._write_pair({"name": name, "source": str(path), "target": str(path)},
                                 {"pred": torch.zeros(2, h, w)})  # identity registration
        written = nib.load(rec["warped"])
        assert written.shape == image.shape
        np.testing.assert_allclose(np.asarray(written.dataobj), image.astype(np.float32), atol=1e-3)
        if affine is None:  # DICOM: GDCM's reading of the same slice
            ref = sitk.ReadImage(str(path))
            affine = sitk_ras(ref)
            np.testing.assert_allclose(written.affine[:3, [0, 1, 3]], affine[:3, [0, 1, 3]], atol=1e-4)
        else:
            np.testing.assert_allclose(written.affine, affine, atol=1e-5)
