"""Synthetic ACDC cine MRI: layout, reader round trip, ground-truth motion, determinism and clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy import ndimage

from common.data.acdc import acdc_datalist, load_acdc_patient, read_acdc_info
from common.data.io import DataError, read_image
from common.data.synthetic.acdc import (
    ACDC_GROUPS,
    SaxRenderer,
    acdc_displacement,
    plot_acdc,
    sax_geometry,
    simulate_acdc_patient,
    write_acdc,
)
from common.data.synthetic.anatomy3d import HeartModel, ThoraxPhantom, Tissue, bssfp_table

SMALL = {"shape": (96, 96), "spacing": (1.8, 1.8), "n_frames": 8, "progress": False}


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("acdc")
    write_acdc(root, n_patients=3, seed=0, **SMALL)
    return root


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _warp_labels(lab: np.ndarray, disp: np.ndarray, n: int = 4) -> np.ndarray:
    """Independent reference: trilinear warp of the one-hot labels at x + disp(x), then argmax."""
    grid = np.meshgrid(*[np.arange(s) for s in lab.shape], indexing="ij")
    coords = [g + disp[..., i] for i, g in enumerate(grid)]
    onehot = [ndimage.map_coordinates((lab == k).astype(np.float64), coords, order=1, mode="nearest")
              for k in range(n)]
    return np.argmax(np.stack(onehot), 0)


def test_layout_info_and_frames(acdc_root):
    pdirs = sorted(acdc_root.iterdir())
    assert [p.name for p in pdirs] == ["patient001", "patient002", "patient003"]
    for d in pdirs:
        info = read_acdc_info(d / "Info.cfg")
        assert info["ED"] == 1 and 1 < info["ES"] <= 8 and info["NbFrame"] == 8
        assert info["Group"] in ACDC_GROUPS and 120 < info["Height"] < 230 and info["Weight"] > 30
        four = read_image(d / f"{d.name}_4d.nii.gz").array
        assert four.shape[:2] == (96, 96) and four.shape[3] == 8 and 5 <= four.shape[2] <= 16
        for f in (info["ED"], info["ES"]):
            frame = read_image(d / f"{d.name}_frame{f:02d}.nii.gz").array
            np.testing.assert_array_equal(frame, four[..., f - 1])
            gt = read_image(d / f"{d.name}_frame{f:02d}_gt.nii.gz").array
            assert gt.dtype == np.uint8 and set(np.unique(gt)) == {0, 1, 2, 3}
    # groups cycle through the ACDC pathologies
    assert [read_acdc_info(d / "Info.cfg")["Group"] for d in pdirs] == list(ACDC_GROUPS[:3])


def test_mri_appearance(acdc_root):
    e = load_acdc_patient(acdc_root / "patient001", load_arrays=True)
    img, lab = e["image_ed_array"].astype(float), e["label_ed_array"]
    blood, myo = img[lab == 3].mean(), img[lab == 2].mean()
    assert blood > 2.0 * myo  # bright-blood cine: myocardium is dark
    assert img.min() >= 0  # magnitude images


def test_datalist_roundtrip_and_splits(acdc_root, tmp_path):
    dl = acdc_datalist(acdc_root, verify=True)
    assert [e["patient"] for e in dl] == ["patient001", "patient002", "patient003"]
    for e in dl:
        assert {"image_ed", "label_ed", "image_es", "label_es", "image_4d", "disp", "ed", "es", "spacing",
                "group"} <= set(e)
        assert e["spacing"] == pytest.approx([1.8, 1.8, 10.0], abs=1e-4)
    parts = [acdc_datalist(acdc_root, s, seed=1) for s in ("train", "val", "test")]
    ids = [e["patient"] for p in parts for e in p]
    assert sorted(ids) == ["patient001", "patient002", "patient003"] and all(parts)
    # the official release layout: training/ + testing/, the test split is the official one
    off = tmp_path / "database"
    shutil.copytree(acdc_root / "patient001", off / "training" / "patient001")
    shutil.copytree(acdc_root / "patient002", off / "training" / "patient002")
    shutil.copytree(acdc_root / "patient003", off / "testing" / "patient003")
    (off / "training" / "patient001" / "patient001_ed2es_disp.nii.gz").unlink()  # real ACDC has no motion file
    assert [e["patient"] for e in acdc_datalist(tmp_path, "test")] == ["patient003"]
    train_val = acdc_datalist(tmp_path, "train") + acdc_datalist(tmp_path, "val")
    assert sorted(e["patient"] for e in train_val) == ["patient001", "patient002"]
    assert "disp" not in load_acdc_patient(off / "training" / "patient001")
    with pytest.raises(ValueError, match="split"):
        acdc_datalist(acdc_root, "holdout")


def test_ground_truth_motion_reproduces_es(acdc_root):
    for e in acdc_datalist(acdc_root):
        led, les = read_image(e["label_ed"]).array, read_image(e["label_es"]).array
        disp = read_image(e["disp"]).array
        assert disp.shape == (*led.shape, 3) and np.all(disp[..., 2] == 0)
        warped = _warp_labels(led, disp)
        for k in (1, 2, 3):
            assert _dice(warped == k, les == k) >= 0.9, (e["patient"], k)
        # the motion is real: without it ED and ES myocardium overlap much less
        assert _dice(led == 2, les == 2) < 0.85
        assert (les == 3).sum() < 0.8 * (led == 3).sum()  # the LV ejects


def test_motion_model_is_exact_and_physiological():
    rng = np.random.default_rng(3)
    hm = HeartModel.sample(rng, "NOR")
    pts = rng.uniform([-80, -80, -30], [80, 80, 110], size=(20000, 3))
    for phase in (0.4, 1.0):
        back = hm.forward_motion(hm.inverse_motion(pts, phase), phase)
        np.testing.assert_allclose(back, pts, atol=1e-6)
    # far from the heart nothing moves
    far = np.array([[200.0, 0.0, 40.0], [0.0, 0.0, -80.0]])
    np.testing.assert_allclose(hm.inverse_motion(far, 1.0), far)

    def lv_ef(group: str) -> float:
        ph = ThoraxPhantom.sample(np.random.default_rng(11), group)
        geom = sax_geometry(ph, np.random.default_rng(1), (80, 80), (2.0, 2.0), 10.0, 8.0)
        r = SaxRenderer(ph, geom, bssfp_table(np.random.default_rng(0)), n_sub=1)
        ed = np.isin(r.render(0.0)[1], (Tissue.LV_BLOOD, Tissue.PAPILLARY)).sum()
        es = np.isin(r.render(1.0)[1], (Tissue.LV_BLOOD, Tissue.PAPILLARY)).sum()
        return 1 - es / ed

    nor, dcm = lv_ef("NOR"), lv_ef("DCM")
    assert 0.45 < nor < 0.75 and dcm < nor - 0.2


def test_renderer_cache_equals_full_evaluation():
    rng = np.random.default_rng(5)
    ph = ThoraxPhantom.sample(rng)
    geom = sax_geometry(ph, rng, (48, 48), (3.0, 3.0), 10.0, 8.0)
    r = SaxRenderer(ph, geom, bssfp_table(rng), n_sub=3)
    _, tissue = r.render(0.7)
    full, _ = ph.tissues(ph.heart.to_world(geom.heart_points(0.0)), 0.7)
    np.testing.assert_array_equal(tissue.ravel(), full)


def test_determinism_and_displacement_api():
    kw = {"shape": (48, 48), "spacing": (3.0, 3.0), "n_frames": 5}
    a = simulate_acdc_patient(7, **kw)
    b = simulate_acdc_patient(7, **kw)
    c = simulate_acdc_patient(8, **kw)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.disp, b.disp)
    assert a.frames.shape != c.frames.shape or not np.array_equal(a.frames, c.frames)
    np.testing.assert_allclose(acdc_displacement(a), a.disp)
    assert np.abs(acdc_displacement(a, 1, 1)).max() == 0
    with pytest.raises(ValueError, match="frame"):
        acdc_displacement(a, 1, 99)


def test_writer_refuses_to_overwrite(acdc_root):
    with pytest.raises(FileExistsError, match="patient001"):
        write_acdc(acdc_root, n_patients=1, **SMALL)


def test_clear_errors(acdc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        acdc_datalist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no ACDC patient"):
        acdc_datalist(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(acdc_root / "patient001", bad / "patient001")
    p = bad / "patient001"
    info = read_acdc_info(p / "Info.cfg")
    gt = p / f"patient001_frame{info['ES']:02d}_gt.nii.gz"
    gt.unlink()
    with pytest.raises(FileNotFoundError, match=gt.name):
        acdc_datalist(bad)
    gt.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=gt.name):
        acdc_datalist(bad)
    (p / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")
    with pytest.raises(DataError, match="ES"):
        acdc_datalist(bad)
    (p / "Info.cfg").unlink()
    with pytest.raises(FileNotFoundError, match="Info.cfg"):
        acdc_datalist(bad)


def test_plot(acdc_root, tmp_path):
    out = plot_acdc(acdc_root / "patient002", tmp_path / "acdc.png")
    assert out.stat().st_size > 10_000
