"""common.data.loading: one axis convention and geometry for every format, DICOM in, checks and limits.

References are independent of the code under test: nibabel's own reading of its test NIfTI files, SimpleITK/GDCM's
reading of pydicom-data's DICOM files and of our MetaImage/DICOM series, pydicom's ``pixel_array``.
"""

from __future__ import annotations

import copy
import gzip
import math

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path as NIB_DATA
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from common.data.io import DataError, read_image, write_mhd, write_nifti
from common.data.loading import (
    ReadLimits,
    check_image_array,
    dicom_modality,
    from_frames,
    get_limits,
    header_shape,
    image_geometry,
    load_image,
    read_dicom,
    set_limits,
    to_frames,
    write_like,
)
from tests.dicom_geometry import sitk_ras


def _sitk_index_array(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img).T  # SimpleITK arrays are (z, y, x): index order is the transpose


def assert_same_world_image(a: np.ndarray, aff_a: np.ndarray, b: np.ndarray, aff_b: np.ndarray,
                            atol: float = 1e-4) -> None:
    """Two arrays show the same values at the same world points (axis flips/permutations allowed)."""
    a3 = a.reshape(a.shape + (1,) * (3 - a.ndim))
    b3 = b.reshape(b.shape + (1,) * (3 - b.ndim))
    m = np.linalg.inv(aff_b) @ aff_a  # index in a -> index in b
    if a3.shape[2] == 1 and b3.shape[2] == 1:
        m[:3, 2] = [0.0, 0.0, 1.0]  # one slice: its thickness is not part of the grid
    perm = np.round(m[:3, :3])
    assert np.allclose(m[:3, :3], perm, atol=1e-4), f"grids are not aligned: index map\n{m}"
    assert (np.abs(perm).sum(axis=1) == 1).all(), f"not an axis permutation:\n{perm}"
    shift = np.round(m[:3, 3])
    assert np.allclose(m[:3, 3], shift, atol=1e-3), f"grids are offset by a fraction of a voxel: {m[:3, 3]}"
    idx = np.indices(a3.shape).reshape(3, -1)
    idx_b = (perm @ idx + shift[:, None]).astype(int)
    assert all((0 <= idx_b[k]).all() and (idx_b[k] < b3.shape[k]).all() for k in range(3)), "b does not cover a"
    np.testing.assert_allclose(a3.reshape(-1).astype(np.float64), b3[tuple(idx_b)].astype(np.float64), atol=atol)


# ------------------------------------------------------------------------------------------------ NIfTI (nibabel)
@pytest.mark.parametrize("name", ["example4d.nii.gz", "anatomical.nii", "example_nifti2.nii.gz"])
def test_nibabel_test_files_keep_array_and_oblique_affine(name):
    path = f"{NIB_DATA}/{name}"
    ref = nib.load(path)
    img = read_image(path)
    np.testing.assert_array_equal(img.array, np.asarray(ref.dataobj))
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
    assert img.spacing == pytest.approx(ref.header.get_zooms()[: img.array.ndim])
    if name == "example4d.nii.gz":  # the oblique one: off-diagonal direction terms must survive
        assert abs(img.affine[2, 1]) > 0.3


# ----------------------------------------------------------------------------------------- MetaImage geometry
def _oblique_direction(a: float = 0.4, b: float = -0.3) -> np.ndarray:
    ca, sa, cb, sb = math.cos(a), math.sin(a), math.cos(b), math.sin(b)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    return rz @ rx


def test_metaimage_keeps_origin_and_direction(tmp_path):
    arr = np.random.default_rng(0).integers(0, 1000, (5, 7, 9)).astype(np.int16)  # SimpleITK order (z, y, x)
    d = _oblique_direction()
    p = write_mhd(tmp_path / "oblique.mhd", arr, spacing=(2.5, 0.8, 0.6), origin=(-12.0, 30.5, 7.25),
                  direction=tuple(d.ravel()))
    ref = sitk.ReadImage(str(p))
    img = read_image(p)
    np.testing.assert_array_equal(img.array, arr.T)  # index order
    np.testing.assert_allclose(img.affine, sitk_ras(ref), atol=1e-6)
    assert img.spacing == pytest.approx((0.6, 0.8, 2.5))
    rotation = img.affine[:3, :3]
    assert not np.allclose(img.affine[:3, 3], 0) and not np.allclose(rotation, np.diag(np.diag(rotation)))


def test_metaimage_missing_or_short_raw_is_refused_before_reading(tmp_path):
    p = write_mhd(tmp_path / "a.mhd", np.ones((4, 6, 8), np.uint8), spacing=(1, 1, 1))
    raw = tmp_path / "a.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DataError, match=r"a\.mhd: data file a\.raw is truncated"):
        read_image(p)
    raw.unlink()
    with pytest.raises(DataError, match=r"a\.mhd: its data file a\.raw .*missing"):
        read_image(p)


# ---------------------------------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_single_frame_dicom_matches_gdcm_geometry_and_pixels(name):
    path = get_testdata_file(name)
    ref = sitk.ReadImage(path)
    img = load_image(path)
    assert img.meta["modality"] == name[:2]
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_allclose(img.numpy(), expected.T)  # (Columns, Rows): index order
    assert_same_world_image(img.numpy(), img.affine.numpy(), _sitk_index_array(ref), sitk_ras(ref))


def test_dicom_modality_from_the_header():
    assert dicom_modality(get_testdata_file("emri_small.dcm")) == "mr"  # an enhanced MR, no hint in its name
    assert dicom_modality(get_testdata_file("CT_small.dcm")) == "ct"
    assert dicom_modality(get_testdata_file("US1_J2KR.dcm")) == "us"
    assert dicom_modality(f"{NIB_DATA}/anatomical.nii") is None


def test_ct_mr_without_patient_geometry_is_refused_with_the_reason():
    # emri_small is an enhanced MR stripped of its functional groups: no position, orientation or spacing
    with pytest.raises(DataError, match=r"emri_small\.dcm: MR image lacks patient geometry tag\(s\)"):
        load_image(get_testdata_file("emri_small.dcm"))
    arr, affine, meta = read_dicom(get_testdata_file("emri_small.dcm"), require_geometry=False)
    assert arr.shape == (64, 64, 10) and meta["modality"] == "MR" and meta["geometry"] == "none"


def test_enhanced_ct_frames_ordered_by_position_match_gdcm():
    path = get_testdata_file("eCT_Supplemental.dcm")  # 2 frames whose positions run against the normal
    img = load_image(path)
    ref = sitk.ReadImage(path)
    assert img.shape == (512, 512, 2) and img.meta["frame_axis"] == "slice"
    assert_same_world_image(img.numpy(), img.affine.numpy(), _sitk_index_array(ref), sitk_ras(ref))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm"])
def test_compressed_transfer_syntaxes_decode_to_the_native_pixels(name):
    native = load_image(get_testdata_file("MR_small.dcm")).numpy()
    np.testing.assert_array_equal(load_image(get_testdata_file(name)).numpy(), native)


def test_jpeg_baseline_colour_becomes_luma():
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).pixel_array.astype(np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    got = load_image(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).numpy().astype(np.float64)  # YBR JPEG baseline
    assert np.abs(got - luma.T).mean() < 3.0  # lossy JPEG of the same picture


def test_monochrome1_is_inverted_like_the_video_reader():
    path = get_testdata_file("RG1_UNCI.dcm")  # a real CR image stored MONOCHROME1
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = ds.pixel_array.astype(np.int64)
    got = load_image(path).numpy()
    np.testing.assert_array_equal(got, (2 ** int(ds.BitsStored) - 1 - stored).T)


def test_unsupported_transfer_syntax_fails_with_its_name(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists in pydicom
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    out = tmp_path / "mpeg2.dcm"
    ds.save_as(out, enforce_file_format=False)
    with pytest.raises(DataError, match=r"mpeg2\.dcm: unsupported transfer syntax MPEG2"):
        load_image(out)


def test_dicom_without_pixel_data_or_truncated_names_the_reason(tmp_path):
    with pytest.raises(DataError, match=r"rtplan\.dcm: DICOM file has no pixel data"):
        load_image(get_testdata_file("rtplan.dcm"))
    with pytest.raises(DataError, match=r"MR_truncated\.dcm: DICOM pixel data is truncated"):
        load_image(get_testdata_file("MR_truncated.dcm"))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(DataError, match=r"junk\.dcm: not a readable DICOM"):
        load_image(junk)


def _write_series(folder, volume: np.ndarray, direction: np.ndarray, origin, spacing=(0.9, 0.7), step=2.5,
                  names=None) -> None:
    """Slices of ``volume`` (Z, rows, cols) as single-frame MR files built on pydicom-data's MR_small header."""
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    row, col, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    series = generate_uid()
    z = volume.shape[0]
    names = names or [f"IM{k:04d}" for k in range(z)]
    for k in range(z):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * step * normal]
        ds.InstanceNumber = (5 * k + 3) % z + 1  # scrambled on purpose: slices must be ordered by position
        ds.PixelData = volume[k].astype(np.int16).tobytes()
        ds.save_as(folder / names[k], enforce_file_format=True)


def test_dicom_series_folder_is_ordered_by_geometry_not_by_name(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 2000, (6, 12, 10)).astype(np.int16)  # (Z, rows, cols)
    d = _oblique_direction(0.3, 0.5)
    names = [f"slice_{n}.dcm" for n in "fbdace"]  # alphabetical order is not the slice order
    _write_series(tmp_path / "series", volume, d, origin=(-40.0, 12.0, 85.0), names=names)
    img = load_image(tmp_path / "series")
    assert img.shape == (10, 12, 6) and img.meta["modality"] == "MR" and dicom_modality(tmp_path / "series") == "mr"
    np.testing.assert_array_equal(img.numpy(), volume.transpose(2, 1, 0))
    # GDCM's own series ordering and geometry
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    ref = reader.Execute()
    assert_same_world_image(img.numpy(), img.affine.numpy(), _sitk_index_array(ref), sitk_ras(ref))
    assert header_shape(tmp_path / "series") == ((10, 12, 6), 1)


def test_series_with_a_missing_slice_or_two_series_is_refused(tmp_path):
    volume = np.random.default_rng(2).integers(0, 100, (5, 8, 8)).astype(np.int16)
    _write_series(tmp_path / "gap", volume, np.eye(3), origin=(0, 0, 0))
    sorted(p for p in (tmp_path / "gap").iterdir())[2].unlink()
    with pytest.raises(DataError, match=r"gap: uneven slice spacing"):
        load_image(tmp_path / "gap")
    _write_series(tmp_path / "two", volume[:2], np.eye(3), origin=(0, 0, 0), names=["a1", "a2"])
    _write_series(tmp_path / "two", volume[:2], np.eye(3), origin=(0, 0, 0), names=["b1", "b2"])
    with pytest.raises(DataError, match=r"two: folder holds 2 DICOM series"):
        load_image(tmp_path / "two")


# ------------------------------------------------------------------------------------------ checks and limits
def test_crafted_headers_are_refused_before_allocation(tmp_path):
    # a NIfTI header claiming 30000 x 30000 x 3000 voxels (5 TB as int16) over a few hundred bytes
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 3000))
    hdr.set_data_dtype(np.int16)
    big = tmp_path / "huge.nii.gz"  # compressed: only the header can tell the size
    with gzip.open(big, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + b"\1" * 64)
    with pytest.raises(DataError, match=r"huge\.nii\.gz: header declares \(30000, 30000, 3000\).*max_pixels"):
        read_image(big)
    # a DICOM header claiming 65535 x 65535 pixels x 50000 frames
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 50000
    ds.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"huge\.dcm: header declares .*refused before reading"):
        load_image(tmp_path / "huge.dcm")
    # a MetaImage declaring too many frames for a configured limit
    p = write_mhd(tmp_path / "long.mhd", np.ones((30, 4, 4), np.uint8), spacing=(1, 1, 1))
    old = set_limits(max_frames=20)
    try:
        with pytest.raises(DataError, match=r"long\.mhd: header declares 30 frames/slices.*max_frames=20"):
            read_image(p)
    finally:
        set_limits(**vars(old))
    assert get_limits() == ReadLimits()


@pytest.mark.parametrize("case", ["complex", "nan", "one_pixel", "strip", "empty_axis", "object_npy", "constant",
                                  "four_d"])
def test_bad_arrays_are_refused_with_a_named_reason(tmp_path, case):
    match, kwargs = {"complex": ("complex dtype", {}), "nan": ("NaN/Inf", {}), "one_pixel": ("degenerate", {}),
                     "strip": ("degenerate strip", {}), "empty_axis": ("empty", {}),
                     "object_npy": ("Python objects", {}), "constant": ("constant", {"allow_constant": False}),
                     "four_d": ("expected a 2 or 3D image", {"ndims": (2, 3)})}[case]
    if case == "object_npy":
        path = tmp_path / "obj.npy"
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    else:
        arr = {"complex": np.ones((8, 8), np.complex64), "nan": np.full((8, 8), np.nan, np.float32),
               "one_pixel": np.ones((1, 1), np.float32), "strip": np.arange(15000, dtype=np.float32).reshape(5000, 3),
               "empty_axis": np.ones((8, 8, 0), np.float32), "constant": np.full((8, 8), 7, np.int16),
               "four_d": np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(4, 5, 3, 2)}[case]
        path = tmp_path / f"{case}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    with pytest.raises(DataError, match=rf"{path.name}: .*{match}"):
        read_image(path, **kwargs)


def test_check_image_array_accepts_a_good_image_and_limits_validate():
    check_image_array(np.arange(64, dtype=np.float32).reshape(8, 8), "x", ndims=2, allow_constant=False)
    with pytest.raises(ValueError, match="unknown read limit"):
        set_limits(max_voxels=3)
    with pytest.raises(ValueError, match="must be positive"):
        set_limits(max_pixels=0)


# ----------------------------------------------------------------------------------------------- frames, writing
def test_frames_round_trip_and_write_like_restores_each_grid(tmp_path):
    arr = np.random.default_rng(3).integers(0, 9, (6, 5, 4)).astype(np.uint8)  # index order (W, H, T)
    frames = to_frames(arr)
    assert frames.shape == (4, 5, 6) and frames[2, 1, 3] == arr[3, 1, 2]
    np.testing.assert_array_equal(from_frames(frames, arr.shape), arr)
    np.testing.assert_array_equal(from_frames(to_frames(arr[..., :1]), (6, 5, 1)), arr[..., :1])
    # a prediction written like an oblique MetaImage / a NIfTI / a DICOM series lands on the same world grid
    d = _oblique_direction()
    mhd = write_mhd(tmp_path / "in.mha", arr.T, spacing=(3.0, 0.5, 0.7), origin=(1.0, -2.0, 3.0),
                    direction=tuple(d.ravel()))
    nii = write_nifti(tmp_path / "in.nii.gz", arr, affine=nib.load(f"{NIB_DATA}/example4d.nii.gz").affine)
    _write_series(tmp_path / "dcm", arr.transpose(2, 1, 0).astype(np.int16), d, origin=(5.0, 6.0, 7.0))
    for ref in (mhd, nii, tmp_path / "dcm"):
        out = write_like(tmp_path / f"pred_{ref.name}.nii.gz", arr, reference=ref)
        shape, affine = image_geometry(ref)
        written = nib.load(str(out))
        assert written.shape == tuple(shape)
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)
        back = sitk.ReadImage(str(out))  # ITK sees the same spacing, origin and direction
        if ref == mhd:
            src = sitk.ReadImage(str(mhd))
            np.testing.assert_allclose(back.GetSpacing(), src.GetSpacing(), atol=1e-5)
            np.testing.assert_allclose(back.GetOrigin(), src.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(back.GetDirection(), src.GetDirection(), atol=1e-5)
        np.testing.assert_allclose(sitk_ras(back), affine, atol=1e-4)
