"""Synthetic abdomen: BTCV CT (NIfTI) and CHAOS T2-SPIR MRI (DICOM + PNG): round trips, DICOM order and geometry,
label remapping, unpaired intensities and clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from common.data.abdomen import (
    ABDOMEN_STRUCTURES,
    btcv_datalist,
    btcv_label_mapping,
    chaos_datalist,
    find_chaos_cases,
    load_chaos_case,
    read_dicom_series,
    remap_btcv_labels,
    remap_chaos_labels,
)
from common.data.io import DataError, read_image
from common.data.synthetic.abdomen import (
    chaos_label_lut,
    plot_abdomen,
    simulate_abdomen_volume,
    write_abdomen,
    write_chaos,
)
from common.data.synthetic.anatomy3d import lps_to_ras_affine

MR_SHAPE, MR_SPACING = (56, 56, 18), (6.0, 6.0, 10.0)
SMALL = {"ct_shape": (56, 56, 30), "ct_spacing": (6.5, 6.5, 8.0), "mr_shape": MR_SHAPE, "mr_spacing": MR_SPACING,
         "progress": False}


@pytest.fixture(scope="module")
def abd_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("abdomen")
    write_abdomen(root, n_ct=2, n_mr=3, seed=0, **SMALL)
    return root


def _expected_chaos(case_id: int, seed: int = 0):
    """What write_chaos stored for a case, recomputed from the generator's own random stream."""
    rng = np.random.default_rng([seed, 1, case_id])
    img, tissue, aff = simulate_abdomen_volume(rng, "mr", MR_SHAPE, MR_SPACING, slice_thickness=MR_SPACING[2] - 1)
    rng.integers(2, 30)  # series number
    gain = rng.uniform(600, 1400)
    return img * gain, remap_chaos_labels(chaos_label_lut()[tissue]), aff


def test_btcv_roundtrip_and_remap(abd_root):
    dl = btcv_datalist(abd_root, verify=True)
    assert [e["patient"] for e in dl] == ["btcv_0001", "btcv_0002"]
    for e in dl:
        img, lab = read_image(e["image"]).array, read_image(e["label"]).array
        assert img.shape == lab.shape == (56, 56, 30) and e["spacing"] == pytest.approx([6.5, 6.5, 8.0])
        assert {1, 2, 3, 6} <= set(np.unique(lab).tolist()) <= {0, 1, 2, 3, 4, 6, 7, 8, 9}
        ids = remap_btcv_labels(lab)
        assert set(np.unique(ids).tolist()) == {0, 1, 2, 3, 4}
        np.testing.assert_array_equal(ids == 1, lab == 6)  # liver first, as in the CHAOS ids
        np.testing.assert_array_equal(ids == 4, lab == 1)
        # anatomical sides: the right kidney lies on the patient's right (RAS +x = right)
        aff = read_image(e["label"]).affine
        xr = [(aff @ [*np.argwhere(lab == k).mean(0), 1])[0] for k in (2, 3)]
        assert xr[0] > xr[1]
    orig, target = btcv_label_mapping()
    assert len(orig) == 13 and dict(zip(orig, target))[6] == 1 and dict(zip(orig, target))[8] == 0


def test_chaos_dicom_series_matches_simulation(abd_root):
    cases = find_chaos_cases(abd_root)
    assert [n for n, _ in cases] == ["chaos_1", "chaos_2", "chaos_3"]
    img, lab = load_chaos_case(cases[0][1])
    exp_img, exp_lab, aff = _expected_chaos(1)
    assert img.array.shape == lab.array.shape == MR_SHAPE
    np.testing.assert_allclose(img.array, np.round(exp_img), atol=0.5)
    np.testing.assert_array_equal(lab.array, exp_lab)
    assert set(np.unique(lab.array).tolist()) == {0, 1, 2, 3, 4}
    # geometry from the headers: spacing from positions (SliceThickness is 1 mm thinner), affine in RAS
    assert img.spacing == pytest.approx(MR_SPACING)
    np.testing.assert_allclose(img.affine, lps_to_ras_affine(aff), atol=1e-3)
    ds = pydicom.dcmread(img.meta["files"][0])
    assert ds.Modality == "MR" and ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert float(ds.SliceThickness) == pytest.approx(MR_SPACING[2] - 1)
    assert int(ds.InstanceNumber) == MR_SHAPE[2]  # instance 1 is the top slice, so file order != slice order
    with open(img.meta["files"][0], "rb") as f:
        assert f.read(132)[128:] == b"DICM"  # a real DICOM file with preamble


def test_dicom_order_does_not_depend_on_file_names(abd_root, tmp_path):
    _, case = find_chaos_cases(abd_root)[1]
    ref_img, ref_lab = load_chaos_case(case)
    copy = tmp_path / "MR" / "2"
    shutil.copytree(case, copy)
    dcm, gnd = copy / "T2SPIR" / "DICOM_anon", copy / "T2SPIR" / "Ground"
    stems = sorted(p.stem for p in dcm.iterdir())
    perm = np.random.default_rng(0).permutation(len(stems))
    for i, s in enumerate(stems):  # shuffle names, keeping each PNG with its DICOM
        (dcm / f"{s}.dcm").rename(dcm / f"tmp{perm[i]:03d}.dcm")
        (gnd / f"{s}.png").rename(gnd / f"tmp{perm[i]:03d}.png")
    img, lab = load_chaos_case(copy)
    np.testing.assert_array_equal(img.array, ref_img.array)
    np.testing.assert_array_equal(lab.array, ref_lab.array)


def test_rescale_slope_intercept_applied(tmp_path):
    write_chaos(tmp_path, n_cases=1, seed=0, shape=MR_SHAPE, spacing=MR_SPACING, rescale=(2.0, -100.0),
                progress=False)
    img, _ = load_chaos_case(tmp_path / "MR" / "1")
    exp, _, _ = _expected_chaos(1)
    assert np.abs(img.array - exp).max() <= 1.0 + 1e-3  # quantisation step 2
    assert float(pydicom.dcmread(img.meta["files"][0]).RescaleSlope) == 2.0


def test_chaos_datalist_cache(abd_root, tmp_path):
    dl = chaos_datalist(abd_root, cache_dir=tmp_path / "cache")
    assert [e["patient"] for e in dl] == ["chaos_1", "chaos_2", "chaos_3"]
    img, lab = load_chaos_case(find_chaos_cases(abd_root)[0][1])
    np.testing.assert_array_equal(read_image(dl[0]["label"]).array, lab.array)
    np.testing.assert_allclose(read_image(dl[0]["image"]).array, img.array)
    np.testing.assert_allclose(read_image(dl[0]["image"]).affine, img.affine, atol=1e-4)
    assert dl[0]["spacing"] == pytest.approx(MR_SPACING)
    mtime = (tmp_path / "cache" / "chaos_1_image.nii.gz").stat().st_mtime
    chaos_datalist(abd_root, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "chaos_1_image.nii.gz").stat().st_mtime == mtime  # reused, not rewritten
    parts = [chaos_datalist(abd_root, s, cache_dir=tmp_path / "cache") for s in ("train", "val", "test")]
    assert sorted(e["patient"] for p in parts for e in p) == ["chaos_1", "chaos_2", "chaos_3"]


def test_remap_chaos_ranges():
    png = np.array([0, 63, 60, 126, 189, 252, 245, 100, 255], dtype=np.uint8)
    np.testing.assert_array_equal(remap_chaos_labels(png), [0, 1, 1, 2, 3, 4, 4, 0, 4])
    np.testing.assert_array_equal(remap_chaos_labels(png, ("spleen", "liver")), [0, 2, 2, 0, 0, 1, 1, 0, 1])
    assert ABDOMEN_STRUCTURES == ("liver", "right_kidney", "left_kidney", "spleen")
    with pytest.raises(ValueError, match="pancreas"):
        remap_chaos_labels(png, ("pancreas",))


def test_unpaired_ct_and_mr_intensities(abd_root):
    e = btcv_datalist(abd_root)[0]
    ct, ct_lab = read_image(e["image"]).array.astype(float), remap_btcv_labels(read_image(e["label"]).array)
    mr, mr_lab = load_chaos_case(find_chaos_cases(abd_root)[0][1])
    mr, mr_lab = mr.array, mr_lab.array
    assert ct.min() < -800 and mr.min() >= 0
    # T2-SPIR: spleen and kidneys far brighter than liver; portal-venous CT: spleen close to liver
    assert mr[mr_lab == 4].mean() > 1.3 * mr[mr_lab == 1].mean()
    assert mr[mr_lab == 2].mean() > 1.3 * mr[mr_lab == 1].mean()
    assert abs(ct[ct_lab == 4].mean() - ct[ct_lab == 1].mean()) < 60
    assert ct[ct_lab == 1].mean() > 60


def test_determinism():
    a = simulate_abdomen_volume(3, "ct", (24, 24, 12), (12.0, 12.0, 16.0))
    b = simulate_abdomen_volume(3, "ct", (24, 24, 12), (12.0, 12.0, 16.0))
    c = simulate_abdomen_volume(4, "ct", (24, 24, 12), (12.0, 12.0, 16.0))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_dicom_errors(abd_root, tmp_path):
    _, case = find_chaos_cases(abd_root)[2]
    bad = tmp_path / "MR" / "3"
    shutil.copytree(case, bad)
    dcm = bad / "T2SPIR" / "DICOM_anon"
    victim = sorted(dcm.iterdir())[4]
    ds = pydicom.dcmread(victim)
    del ds.ImagePositionPatient
    ds.save_as(victim, enforce_file_format=True)
    with pytest.raises(DataError, match=rf"{victim.name}.*ImagePositionPatient"):
        read_dicom_series(dcm)
    with pytest.raises(DataError, match="ImagePositionPatient"):
        chaos_datalist(tmp_path, cache_dir=tmp_path / "cache")
    victim.write_bytes(b"garbage, not DICOM")
    with pytest.raises(DataError, match=victim.name):
        read_dicom_series(dcm)
    victim.unlink()
    with pytest.raises(DataError, match="uneven slice spacing"):  # a missing slice leaves a gap
        read_dicom_series(dcm)
    shutil.rmtree(bad / "T2SPIR" / "Ground")
    with pytest.raises(FileNotFoundError, match="Ground"):
        chaos_datalist(tmp_path, cache_dir=tmp_path / "cache")
    for p in dcm.iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no DICOM files"):
        read_dicom_series(dcm)
    with pytest.raises(FileNotFoundError, match="DICOM_anon_missing"):
        read_dicom_series(tmp_path / "DICOM_anon_missing")


def test_png_and_layout_errors(abd_root, tmp_path):
    _, case = find_chaos_cases(abd_root)[0]
    bad = tmp_path / "MR" / "1"
    shutil.copytree(case, bad)
    png = sorted((bad / "T2SPIR" / "Ground").iterdir())[0]
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(png)
    with pytest.raises(DataError, match=png.name):
        load_chaos_case(bad)
    png.unlink()
    with pytest.raises(DataError, match="PNG files"):
        load_chaos_case(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="BTCV"):
        btcv_datalist(tmp_path / "empty")
    with pytest.raises(DataError, match="CHAOS"):
        chaos_datalist(tmp_path / "empty")
    btcv = tmp_path / "btcv"
    shutil.copytree(abd_root / "RawData" / "Training", btcv)
    (btcv / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="label0002"):
        btcv_datalist(btcv)


def test_plot(abd_root, tmp_path):
    assert plot_abdomen(abd_root, tmp_path / "abd.png").stat().st_size > 10_000
