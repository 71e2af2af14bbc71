"""Tests of the tracking-inference readers (common/data/video_io.py): HDF5, NIfTI 2D+t, DICOM, query points, masks.

The real multi-frame ultrasound DICOM is pydicom-data's ``color3d_jpeg_baseline.dcm`` (120 RGB frames, JPEG
baseline, YBR_FULL_422); synthetic DICOMs are built here with known pixels so the conversions can be checked exactly.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from common.data.io import DataError, write_nifti
from common.data.video_io import (
    check_query_points,
    find_videos,
    read_dicom_video,
    read_mask_frame,
    read_query_points,
    read_video,
    to_grayscale,
)


@pytest.fixture(scope="module")
def us_dicom_path():
    from pydicom.data import get_testdata_file

    return get_testdata_file("color3d_jpeg_baseline.dcm")


@pytest.fixture(scope="module")
def us_video(us_dicom_path):
    return read_video(us_dicom_path)


def _native_dicom(path, frames: np.ndarray, photometric: str = "MONOCHROME2", frame_time: float | None = 40.0,
                  drop: tuple[str, ...] = ()):
    """Write an uncompressed multi-frame DICOM with the given (T, H, W[, 3]) uint8 pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    t, h, w = frames.shape[:3]
    ds.NumberOfFrames = t
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
    ds.PhotometricInterpretation = photometric
    if frames.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frame_time is not None:
        ds.FrameTime = frame_time
    ds.PixelSpacing = [0.3, 0.4]
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    for tag in drop:
        delattr(ds, tag)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# DICOM


def test_real_ultrasound_dicom_is_a_gray_video(us_video, us_dicom_path):
    from pydicom.pixels import pixel_array

    v = us_video
    assert v.source == "dicom" and v.frames.shape == (120, 480, 640) and v.frames.dtype == np.uint8
    assert v.fps == pytest.approx(1000 / 33.333, rel=1e-6)  # FrameTime 33.333 ms
    # SequenceOfUltrasoundRegions: PhysicalDeltaX/Y 0.05105 cm -> 0.5105 mm
    assert v.spacing == pytest.approx((0.5104970559477806, 0.5104970559477806))
    # independent reference: BT.601 luma of pydicom's RGB conversion of the same frame (rounding of the colour
    # conversion and the chroma upsampling differ by a few grey levels)
    for idx in (0, 77):
        rgb = pixel_array(us_dicom_path, index=idx).astype(np.float64)
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        diff = np.abs(v.frames[idx].astype(np.float64) - luma)
        assert diff.mean() < 1.0 and diff.max() <= 8.0
    assert v.frames.std() > 10  # a real image, not a blank conversion


def test_native_dicoms_monochrome_inverted_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (4, 8, 10), dtype=np.uint8)
    v = read_dicom_video(_native_dicom(tmp_path / "m2.dcm", gray))
    np.testing.assert_array_equal(v.frames, gray)
    assert v.fps == pytest.approx(25.0) and v.spacing == pytest.approx((0.3, 0.4))
    v1 = read_dicom_video(_native_dicom(tmp_path / "m1.dcm", gray, "MONOCHROME1"))
    np.testing.assert_array_equal(v1.frames.astype(int), 255 - gray.astype(int))
    rgb = rng.integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    vr = read_dicom_video(_native_dicom(tmp_path / "rgb.dcm", rgb, "RGB", frame_time=None))
    expect = np.clip(np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])), 0, 255)
    np.testing.assert_array_equal(vr.frames, expect.astype(np.uint8))
    assert vr.fps is None
    # a DICOM without a suffix is recognised by its preamble
    plain = tmp_path / "IM0001"
    plain.write_bytes((tmp_path / "m2.dcm").read_bytes())
    assert read_video(plain).frames.shape == (4, 8, 10)


@pytest.mark.parametrize("tag", ["NumberOfFrames", "PhotometricInterpretation", "PixelData"])
def test_dicom_missing_required_tag_names_file_and_tag(tmp_path, tag):
    path = _native_dicom(tmp_path / f"no_{tag}.dcm", np.zeros((3, 8, 8), np.uint8), drop=(tag,))
    with pytest.raises(DataError, match=rf"no_{tag}\.dcm.*{tag}"):
        read_video(path)


def test_real_dicom_missing_tag_and_corrupt_files(tmp_path, us_dicom_path):
    import pydicom

    ds = pydicom.dcmread(us_dicom_path)
    del ds.NumberOfFrames
    ds.save_as(tmp_path / "us_no_frames.dcm")
    with pytest.raises(DataError, match=r"us_no_frames\.dcm.*NumberOfFrames"):
        read_video(tmp_path / "us_no_frames.dcm")
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"this is not a dicom file" * 10)
    with pytest.raises(DataError, match=r"garbage\.dcm: not a readable DICOM"):
        read_video(garbage)
    # cut inside the compressed pixel data: the decode error names the file and the transfer syntax
    raw = open(us_dicom_path, "rb").read()
    cut = tmp_path / "truncated.dcm"
    cut.write_bytes(raw[: len(raw) // 2])
    with warnings.catch_warnings(), pytest.raises(DataError, match=r"truncated\.dcm"):
        warnings.simplefilter("ignore")  # pydicom warns about the missing sequence delimiter before failing
        read_video(cut)


def test_single_frame_dicom_is_rejected(tmp_path):
    path = _native_dicom(tmp_path / "one.dcm", np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"one\.dcm.*NumberOfFrames is 1"):
        read_video(path)


# ----------------------------------------------------------------------------------------------------------------
# HDF5 and NIfTI


def test_hdf5_video_with_and_without_references(tmp_path):
    import h5py

    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (5, 12, 16), dtype=np.uint8)
    tracks = rng.uniform(0, 10, (5, 3, 2)).astype(np.float32)
    with h5py.File(tmp_path / "full.h5", "w") as f:
        f["video"], f["tracks"], f["visible"] = video, tracks, np.ones((5, 3), bool)
        f.attrs.update({"fps": 50.0, "pixel_spacing_mm": 0.5, "ed_frame": 0, "es_frame": 2, "gls_reference": -18.0})
    v = read_video(tmp_path / "full.h5")
    np.testing.assert_array_equal(v.frames, video)
    np.testing.assert_array_equal(v.extras["tracks"], tracks)
    assert v.fps == 50.0 and v.spacing == (0.5, 0.5) and v.extras["es_frame"] == 2
    assert v.extras["gls_reference"] == -18.0
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f["video"] = video
    bare = read_video(tmp_path / "bare.h5")
    assert bare.fps is None and bare.spacing is None and "tracks" not in bare.extras
    rgb = rng.integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "rgb.h5", "w") as f:
        f["video"] = rgb
    gray = read_video(tmp_path / "rgb.h5").frames
    expect = np.clip(np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])), 0, 255)
    assert gray.dtype == np.uint8 and np.array_equal(gray, expect.astype(np.uint8))
    with h5py.File(tmp_path / "novideo.h5", "w") as f:
        f["frames"] = video
    with pytest.raises(DataError, match=r"novideo\.h5: missing dataset 'video'"):
        read_video(tmp_path / "novideo.h5")
    with h5py.File(tmp_path / "wrong.h5", "w") as f:
        f["video"] = video[0]
    with pytest.raises(DataError, match=r"wrong\.h5.*\(T, H, W\)"):
        read_video(tmp_path / "wrong.h5")
    (tmp_path / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(DataError, match=r"broken\.h5: not a readable HDF5"):
        read_video(tmp_path / "broken.h5")


def test_nifti_2d_t_orientation_and_frame_rate(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(2)
    xyt = rng.integers(0, 256, (16, 12, 6), dtype=np.uint8)  # (X=W, Y=H, T), width first as CAMUS
    write_nifti(tmp_path / "cine.nii.gz", xyt, spacing=(0.4, 0.3, 1.0))
    v = read_video(tmp_path / "cine.nii.gz")
    assert v.frames.shape == (6, 12, 16)
    t, r, c = 3, 5, 11
    assert v.frames[t, r, c] == xyt[c, r, t]
    assert v.spacing == pytest.approx((0.3, 0.4)) and v.fps is None
    img = nib.Nifti1Image(xyt[:, :, None, :], np.diag([0.4, 0.3, 1.0, 1.0]))
    img.header.set_xyzt_units("mm", "msec")
    img.header["pixdim"][4] = 20.0
    nib.save(img, tmp_path / "cine4d.nii")
    v4 = read_video(tmp_path / "cine4d.nii")
    np.testing.assert_array_equal(v4.frames, v.frames)
    assert v4.fps == pytest.approx(50.0)
    write_nifti(tmp_path / "still.nii.gz", xyt[:, :, :1])
    with pytest.raises(DataError, match=r"still\.nii\.gz.*1 frame"):
        read_video(tmp_path / "still.nii.gz")
    write_nifti(tmp_path / "vol.nii.gz", np.zeros((4, 4, 3, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"vol\.nii\.gz.*2D\+t"):
        read_video(tmp_path / "vol.nii.gz")


def test_find_videos_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        find_videos(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no video files"):
        find_videos(tmp_path)
    with pytest.raises(DataError, match=r"notes\.txt: unsupported video format"):
        read_video(tmp_path / "notes.txt")
    write_nifti(tmp_path / "sub" / "a.nii.gz", np.zeros((8, 8, 3), np.uint8))
    assert [p.name for p in find_videos(tmp_path)] == ["a.nii.gz"]


def test_to_grayscale_rules():
    px = np.array([[[10, 200, 30]]], dtype=np.uint8)
    assert to_grayscale(px, "YBR_FULL_422")[0, 0] == 10  # the Y plane
    assert to_grayscale(px, "RGB")[0, 0] == pytest.approx(0.299 * 10 + 0.587 * 200 + 0.114 * 30, abs=1e-4)
    with pytest.raises(ValueError, match="3 channels"):
        to_grayscale(np.zeros((2, 2)), "RGB")


# ----------------------------------------------------------------------------------------------------------------
# query points and masks


def test_query_point_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"query_frame": 7, "points": [[1.5, 2.0], [3, 4]]}))
    q = read_query_points(tmp_path / "a.json")
    np.testing.assert_allclose(q.points, [[1.5, 2.0], [3, 4]])
    np.testing.assert_array_equal(q.frames, [7, 7])
    entries = [{"x": 1, "y": 2, "frame": 3}, {"x": 5, "y": 6, "frame": 4}]
    (tmp_path / "b.json").write_text(json.dumps({"points": entries}))
    np.testing.assert_array_equal(read_query_points(tmp_path / "b.json").frames, [3, 4])
    (tmp_path / "c.json").write_text(json.dumps([[1, 2], [3, 4]]))
    assert read_query_points(tmp_path / "c.json").frames is None
    (tmp_path / "d.csv").write_text("frame,x,y\n2,10.5,20\n2,11,21\n")
    qd = read_query_points(tmp_path / "d.csv")
    np.testing.assert_allclose(qd.points, [[10.5, 20], [11, 21]])
    np.testing.assert_array_equal(qd.frames, [2, 2])
    (tmp_path / "e.csv").write_text("10,20\n11,21\n")
    qe = read_query_points(tmp_path / "e.csv")
    assert qe.frames is None and qe.points.shape == (2, 2)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("bad.json", "{not json", "not valid JSON"),
        ("nokey.json", json.dumps({"pts": [[1, 2]]}), "'points'"),
        ("noy.json", json.dumps({"points": [{"x": 1}]}), "point 0 needs 'x' and 'y'"),
        ("mixed.json", json.dumps({"points": [[1, 2, 3], [4, 5]]}), "some points have a frame"),
        ("nan.csv", "x,y\n1,nan\n", "line 2.*not finite"),
        ("frac.csv", "x,y,frame\n1,2,3.5\n", "not an integer"),
        ("head.csv", "x,z\n1,2\n", "'x' and 'y'"),
        ("pts.txt2", "1,2", "must be a .json or .csv"),
    ],
)
def test_query_point_errors_name_the_file(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name.replace('.', chr(92) + '.')}.*{match}"):
        read_query_points(tmp_path / name)


def test_check_query_points_bounds():
    check_query_points(np.array([[-0.5, -0.5], [15.5, 9.5]]), np.array([0, 4]), 5, (10, 16), "q.json")
    with pytest.raises(DataError, match=r"q\.json: 1 query point\(s\) lie outside the 16 x 10.*point 1 at \(x=16"):
        check_query_points(np.array([[1.0, 1.0], [16.0, 3.0]]), np.array([0, 0]), 5, (10, 16), "q.json")
    with pytest.raises(DataError, match=r"q\.json: query frame 5 is outside the video's 5 frames"):
        check_query_points(np.array([[1.0, 1.0]]), np.array([5]), 5, (10, 16), "q.json")


def test_mask_frames_follow_the_video_conventions(tmp_path):
    hw = np.zeros((10, 14), np.uint8)
    hw[2:5, 3:9] = 2
    write_nifti(tmp_path / "m2d.nii.gz", hw.T)  # NIfTI masks are stored width first like the videos
    np.testing.assert_array_equal(read_mask_frame(tmp_path / "m2d.nii.gz", 0, (10, 14)), hw)
    seq = np.stack([hw * 0, hw], 0)  # (T, H, W)
    write_nifti(tmp_path / "mseq.nii.gz", seq.transpose(2, 1, 0))
    np.testing.assert_array_equal(read_mask_frame(tmp_path / "mseq.nii.gz", 1, (10, 14)), hw)
    with pytest.raises(DataError, match=r"mseq\.nii\.gz.*query frame 2 is outside"):
        read_mask_frame(tmp_path / "mseq.nii.gz", 2, (10, 14))
    with pytest.raises(DataError, match=r"m2d\.nii\.gz: mask frame size \(10, 14\).*\(20, 28\)"):
        read_mask_frame(tmp_path / "m2d.nii.gz", 0, (20, 28))
