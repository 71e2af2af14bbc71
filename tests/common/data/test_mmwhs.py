"""Synthetic MM-WHS CT/MRI: layout, reader round trip, label remapping, unpaired modalities, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from common.data.io import DataError, read_image, write_nifti
from common.data.mmwhs import (
    MMWHS_CODES,
    find_mmwhs_cases,
    mmwhs_datalist,
    mmwhs_label_mapping,
    remap_mmwhs_labels,
)
from common.data.synthetic.mmwhs import plot_mmwhs, simulate_mmwhs_volume, write_mmwhs

SMALL = {"ct_shape": (56, 56, 40), "ct_spacing": (2.6, 2.6, 3.2), "mr_shape": (48, 48, 36),
         "mr_spacing": (3.0, 3.0, 3.6), "progress": False}


@pytest.fixture(scope="module")
def mmwhs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmwhs")
    write_mmwhs(root, n_ct=3, n_mr=3, seed=0, **SMALL)
    return root


def test_layout_and_roundtrip(mmwhs_root):
    for mod, shape, sp in (("ct", (56, 56, 40), (2.6, 2.6, 3.2)), ("mr", (48, 48, 36), (3.0, 3.0, 3.6))):
        dl = mmwhs_datalist(mmwhs_root, mod, verify=True)
        assert [e["patient"] for e in dl] == [f"{mod}_train_{i}" for i in (1001, 1002, 1003)]
        for e in dl:
            assert e["image"].endswith(f"{mod}_train/{e['patient']}_image.nii.gz") and e["modality"] == mod
            img, lab = read_image(e["image"]), read_image(e["label"])
            assert img.array.shape == lab.array.shape == shape
            assert e["spacing"] == pytest.approx(sp, abs=1e-4)
            codes = set(np.unique(lab.array).tolist())
            assert codes <= {0, *MMWHS_CODES.values()}
            assert {205, 420, 500, 600} <= codes  # the chambers are always in view
        union = set().union(*(np.unique(read_image(e["label"]).array).tolist() for e in dl))
        assert union == {0, *MMWHS_CODES.values()}


def test_flat_layout_and_splits(mmwhs_root, tmp_path):
    for p in (mmwhs_root / "ct_train").iterdir():
        shutil.copy(p, tmp_path / p.name)  # the files directly in the root also load
    assert len(mmwhs_datalist(tmp_path, "ct")) == 3
    parts = [mmwhs_datalist(mmwhs_root, "mr", s) for s in ("train", "val", "test")]
    names = [e["patient"] for p in parts for e in p]
    assert sorted(names) == ["mr_train_1001", "mr_train_1002", "mr_train_1003"] and all(parts)
    assert mmwhs_datalist(mmwhs_root, "mr", "train", seed=0) == mmwhs_datalist(mmwhs_root, "mr", "train", seed=0)


def test_remap_labels():
    arr = np.array([0, 205, 420, 500, 550, 600, 820, 850, 421, 7], dtype=np.int16)
    np.testing.assert_array_equal(remap_mmwhs_labels(arr), [0, 1, 2, 3, 0, 0, 4, 0, 0, 0])
    np.testing.assert_array_equal(remap_mmwhs_labels(arr, ("AA", "LVM")), [0, 2, 0, 0, 0, 0, 1, 0, 0, 0])
    all7 = remap_mmwhs_labels(arr.astype(np.float32), tuple(MMWHS_CODES))
    np.testing.assert_array_equal(all7, [0, 1, 2, 3, 4, 5, 6, 7, 0, 0])
    assert remap_mmwhs_labels(arr).dtype == np.uint8
    with pytest.raises(ValueError, match="XYZ"):
        remap_mmwhs_labels(arr, ("LVM", "XYZ"))
    with pytest.raises(ValueError, match="non-integer"):
        remap_mmwhs_labels(np.array([0.5, 205.0]))
    # the (orig, target) lists for MONAI's MapLabelValued cover every code and agree with the remap
    orig, target = mmwhs_label_mapping()
    assert sorted(orig) == sorted(MMWHS_CODES.values())
    lookup = dict(zip(orig, target))
    np.testing.assert_array_equal([lookup.get(int(v), 0) for v in arr], remap_mmwhs_labels(arr))


def test_unpaired_modalities_share_labels_not_intensities(mmwhs_root):
    ct = [(read_image(i).array.astype(float), read_image(lb).array) for _, i, lb in find_mmwhs_cases(mmwhs_root, "ct")]
    mr = [(read_image(i).array.astype(float), read_image(lb).array) for _, i, lb in find_mmwhs_cases(mmwhs_root, "mr")]
    for img, lab in ct:
        blood, myo = img[lab == 500].mean(), img[lab == 205].mean()
        assert 200 < blood < 500 and 60 < myo < 180  # contrast-enhanced HU
        assert img.min() < -800  # lung air
    for img, lab in mr:
        blood, myo = img[lab == 500].mean(), img[lab == 205].mean()
        assert img.min() >= 0 and blood > 2.5 * myo
    # same structures in both modalities, different patients (unpaired): LV volumes differ
    assert set(np.unique(ct[0][1])) & {205, 420, 500, 600} == set(np.unique(mr[0][1])) & {205, 420, 500, 600}
    v_ct = [(lab == 500).sum() * 2.6 * 2.6 * 3.2 for _, lab in ct]
    v_mr = [(lab == 500).sum() * 3.0 * 3.0 * 3.6 for _, lab in mr]
    assert min(abs(a - b) for a in v_ct for b in v_mr) > 0
    # intensity statistics differ beyond a linear rescale: the myocardium/blood contrast inverts relative to fat
    ct_img, ct_lab = ct[0]
    mr_img, mr_lab = mr[0]
    ct_rel = (ct_img[ct_lab == 205].mean() - ct_img.min()) / (ct_img[ct_lab == 500].mean() - ct_img.min())
    mr_rel = mr_img[mr_lab == 205].mean() / mr_img[mr_lab == 500].mean()
    assert ct_rel > 0.75 and mr_rel < 0.45


def test_determinism():
    a = simulate_mmwhs_volume(4, "mr", (32, 32, 24), (4.0, 4.0, 5.0))
    b = simulate_mmwhs_volume(4, "mr", (32, 32, 24), (4.0, 4.0, 5.0))
    c = simulate_mmwhs_volume(5, "mr", (32, 32, 24), (4.0, 4.0, 5.0))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="modality"):
        simulate_mmwhs_volume(0, "pet")


def test_clear_errors(mmwhs_root, tmp_path):
    with pytest.raises(ValueError, match="modality"):
        mmwhs_datalist(mmwhs_root, "us")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        mmwhs_datalist(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MM-WHS ct images"):
        mmwhs_datalist(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(mmwhs_root / "ct_train", bad / "ct_train")
    lab = bad / "ct_train" / "ct_train_1002_label.nii.gz"
    lab.unlink()
    with pytest.raises(FileNotFoundError, match="ct_train_1002_label"):
        mmwhs_datalist(bad)
    lab.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="ct_train_1002_label"):
        mmwhs_datalist(bad)
    write_nifti(lab, np.zeros((5, 5, 5), np.uint16))
    with pytest.raises(DataError, match="does not match"):
        mmwhs_datalist(bad)
    with pytest.raises(FileExistsError):
        write_mmwhs(mmwhs_root, 1, 0, **SMALL)


def test_plot(mmwhs_root, tmp_path):
    assert plot_mmwhs(mmwhs_root, tmp_path / "mmwhs.png", 1).stat().st_size > 10_000
