"""common.data.io readers/writers and patient-level splits."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.io import DataError, read_image, write_mhd, write_nifti
from common.data.splits import patient_split


def test_nifti_roundtrip_keeps_array_and_spacing(tmp_path):
    arr = np.random.default_rng(0).random((7, 5, 3)).astype(np.float32)
    p = write_nifti(tmp_path / "a.nii.gz", arr, spacing=(0.3, 0.4, 2.0))
    img = read_image(p)
    np.testing.assert_array_equal(img.array, arr)
    assert img.spacing == pytest.approx((0.3, 0.4, 2.0))


def test_mhd_roundtrip_keeps_array_and_spacing(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = write_mhd(tmp_path / "a.mhd", arr, spacing=(1.0, 0.5, 0.25))
    img = read_image(p)
    # index order (x, y, z) for every format: the transpose of SimpleITK's (z, y, x) array
    np.testing.assert_array_equal(img.array, arr.T)
    assert img.spacing == pytest.approx((0.25, 0.5, 1.0))


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_image(tmp_path / "nope.nii.gz")
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match="corrupt.nii.gz"):
        read_image(bad)
    empty = tmp_path / "empty.mhd"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_image(empty)
    nan = write_nifti(tmp_path / "nan.nii.gz", np.full((3, 3), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        read_image(nan)
    with pytest.raises(DataError, match="unsupported"):
        (tmp_path / "x.xyz").write_text("x")
        read_image(tmp_path / "x.xyz")


def test_patient_split_is_disjoint_seeded_and_complete():
    ids = [f"patient{i:04d}" for i in range(50)]
    s1 = patient_split(ids, (0.7, 0.1, 0.2), seed=3)
    s2 = patient_split(ids, (0.7, 0.1, 0.2), seed=3)
    s3 = patient_split(ids, (0.7, 0.1, 0.2), seed=4)
    assert s1 == s2 and s1 != s3
    assert sorted(sum(s1.values(), [])) == sorted(ids)
    assert [len(s1[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    small = patient_split(ids[:3], (0.9, 0.1), seed=0)
    assert len(small["val"]) == 1 and len(small["train"]) == 2
    with pytest.raises(ValueError):
        patient_split([], (0.9, 0.1))
