"""Writers and readers of the echo layouts: CAMUS (NIfTI and MetaImage releases), TED, tracking HDF5."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from common.data.camus import (
    CAMUS_TEST_PATIENTS,
    camus_datalist,
    camus_patient_split,
    load_echo_frame,
    read_info_cfg,
)
from common.data.io import DataError
from common.data.synthetic.echo import plot_echo_sequence, simulate_echo_sequence
from common.data.synthetic.echo_layouts import write_camus, write_ted, write_tracking_h5
from common.data.ted import ted_datalist
from common.data.tracking import read_tracking_h5, tracking_datalist
from common.metrics.tracking import global_longitudinal_strain

SIZE = (256, 240)  # non-square, so a transposition error cannot hide
N_FRAMES = 16
IMAGE_KEYS = ("image_ed", "label_ed", "image_es", "label_es", "sequence", "sequence_label")


@pytest.fixture(scope="module")
def camus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("echo_layouts")
    t0 = time.perf_counter()
    nifti = write_camus(root / "camus_nifti", n_patients=3, seed=5, release="nifti", image_size=SIZE,
                        n_frames=N_FRAMES, progress=False)
    seconds = time.perf_counter() - t0
    # same seed: patients 0001-0002 are the same hearts as in the NIfTI set
    mhd = write_camus(root / "camus_mhd", n_patients=2, seed=5, release="mhd", image_size=SIZE, n_frames=N_FRAMES,
                      progress=False)
    return {"nifti": nifti, "mhd": mhd, "seconds": seconds, "root": root}


@pytest.fixture(scope="module")
def ted(tmp_path_factory) -> Path:
    return write_ted(tmp_path_factory.mktemp("ted"), n_patients=3, seed=1, image_size=(160, 144), n_frames=12,
                     progress=False)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> Path:
    return write_tracking_h5(tmp_path_factory.mktemp("trk"), n_videos=2, seed=2, image_size=(128, 128), n_frames=24,
                             n_points=16, progress=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- CAMUS
def test_camus_nifti_layout_on_disk(camus):
    pdir = camus["nifti"] / "patient0001"
    names = sorted(p.name for p in pdir.iterdir())
    for view in ("2CH", "4CH"):
        for suffix in ("ED", "ED_gt", "ES", "ES_gt", "half_sequence", "half_sequence_gt"):
            assert f"patient0001_{view}_{suffix}.nii.gz" in names
        assert f"Info_{view}.cfg" in names
    # stored width first, spacing in the header
    H, W = SIZE
    ed = nib.load(pdir / "patient0001_4CH_ED.nii.gz")
    seq = nib.load(pdir / "patient0001_4CH_half_sequence.nii.gz")
    assert ed.shape == (W, H) and seq.shape == (W, H, N_FRAMES)
    assert ed.get_data_dtype() == np.uint8 and ed.header.get_zooms()[0] > 0.3
    cfg = read_info_cfg(pdir / "Info_4CH.cfg")
    assert cfg["ED"] == 1 and cfg["ES"] == N_FRAMES and cfg["NbFrame"] == N_FRAMES
    assert cfg["Sex"] in ("F", "M") and 20 <= cfg["Age"] <= 90 and cfg["ImageQuality"] in ("Good", "Medium", "Poor")
    assert 20 <= cfg["EF"] <= 80 and cfg["FrameRate"] > 10


def test_camus_mhd_layout_on_disk(camus):
    pdir = camus["mhd"] / "patient0002"
    H, W = SIZE
    ed = sitk.GetArrayFromImage(sitk.ReadImage(str(pdir / "patient0002_2CH_ED.mhd")))
    seq = sitk.GetArrayFromImage(sitk.ReadImage(str(pdir / "patient0002_2CH_sequence_gt.mhd")))
    assert ed.shape == (1, H, W) and seq.shape == (N_FRAMES, H, W)
    assert (pdir / "patient0002_2CH_ED.raw").is_file()
    assert set(read_info_cfg(pdir / "Info_2CH.cfg")) >= {"ED", "ES", "NbFrame", "LVef", "ImageQuality"}


def test_camus_releases_read_identically(camus):
    a = camus_datalist(camus["nifti"])[:4]
    b = camus_datalist(camus["mhd"])
    assert len(b) == 4
    assert [(e["patient"], e["view"]) for e in a] == [(e["patient"], e["view"]) for e in b]
    for x, y in zip(a, b):
        assert (x["release"], y["release"]) == ("nifti", "mhd")
        for key in ("ed", "es", "n_frames", "quality"):
            assert x[key] == y[key], key
        np.testing.assert_allclose(x["spacing"], y["spacing"], rtol=1e-6)
        assert abs(x["ef"] - y["ef"]) <= 0.5
        for key in IMAGE_KEYS:
            ia, sa = load_echo_frame(x[key])
            ib, sb = load_echo_frame(y[key])
            assert ia.shape == ib.shape and ia.dtype == ib.dtype == np.uint8, key
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_allclose(sa, sb, rtol=1e-6)


def test_camus_images_match_the_simulation(camus):
    """Round trip: the reader returns the simulator's frames, apex at the top, with the right ED/ES."""
    from common.data.synthetic.echo_layouts import _patient_seed, patient_acquisition

    seed = _patient_seed(5, 1, 1)
    acq = patient_acquisition(seed)
    sim = simulate_echo_sequence(seed, view="4CH", n_frames=N_FRAMES, image_size=SIZE, half_cycle=True,
                                 pathology=acq["pathology"], noise=acq["noise"], blur=acq["blur"],
                                 dropout=acq["dropout"])
    entry = next(e for e in camus_datalist(camus["nifti"]) if e["patient"] == "patient0001" and e["view"] == "4CH")
    seq, spacing = load_echo_frame(entry["sequence"])
    lab, _ = load_echo_frame(entry["sequence_label"])
    assert seq.shape == (N_FRAMES, *SIZE)
    np.testing.assert_allclose(spacing, sim.spacing, rtol=1e-5)
    np.testing.assert_array_equal(lab, sim.labels)
    assert np.abs(seq.astype(np.float32) / 255.0 - sim.images).max() <= 0.5 / 255 + 1e-6
    ed, es = load_echo_frame(entry["image_ed"])[0], load_echo_frame(entry["label_es"])[0]
    np.testing.assert_array_equal(ed, seq[entry["ed"]])
    np.testing.assert_array_equal(es, lab[entry["es"]])
    assert entry["es"] == sim.es_frame
    # apex at the top: the image is dark above the sector apex row and lit near the top centre
    assert seq[0, :3].mean() < seq[0, 3:40, 100:140].mean()


def test_camus_splits(camus, tmp_path):
    root = camus["nifti"]
    parts = camus_patient_split(root, val_fraction=0.34, test_fraction=0.33, seed=0)
    ids = sum(parts.values(), [])
    assert sorted(ids) == ["patient0001", "patient0002", "patient0003"] and all(parts.values())
    assert parts == camus_patient_split(root, val_fraction=0.34, test_fraction=0.33, seed=0)
    for name in ("train", "val", "test"):
        sub = camus_datalist(root, split=name, val_fraction=0.34, test_fraction=0.33, validate=False)
        assert {e["patient"] for e in sub} == set(parts[name]) and all(e["split"] == name for e in sub)
    # official test split: a folder with all 500 patients holds out 0451-0500
    big = tmp_path / "camus500"
    for i in range(1, 501):
        (big / f"patient{i:04d}").mkdir(parents=True)
    official = camus_patient_split(big, val_fraction=0.1, seed=3)
    assert official["test"] == list(CAMUS_TEST_PATIENTS)
    assert len(official["val"]) == 45 and len(official["train"]) == 405
    assert not set(official["train"]) & set(official["val"])
    # the release's split lists win when present
    lists = tmp_path / "CAMUS_public"
    _copy(root, lists / "database_nifti")
    (lists / "database_split").mkdir()
    (lists / "database_split" / "subgroup_training.txt").write_text("patient0003\npatient0001\n")
    (lists / "database_split" / "subgroup_validation.txt").write_text("patient0002\n")
    (lists / "database_split" / "subgroup_testing.txt").write_text("")
    assert camus_patient_split(lists) == {"train": ["patient0001", "patient0003"], "val": ["patient0002"],
                                          "test": []}


def test_camus_real_folder_variants(camus, tmp_path):
    """Real downloads: database_nifti parent, training/testing folders, `_half_sequence` MHD names, loose cfg."""
    parent = tmp_path / "release"
    _copy(camus["nifti"], parent / "database_nifti")
    assert len(camus_datalist(parent)) == 6

    orig = tmp_path / "orig"
    _copy(camus["mhd"] / "patient0001", orig / "training" / "patient0001")
    _copy(camus["mhd"] / "patient0002", orig / "testing" / "patient0001")  # the test folder's numbering restarts
    fix = orig / "testing" / "patient0001"
    for p in fix.iterdir():
        p.rename(p.with_name(p.name.replace("patient0002", "patient0001")))
    for mhd in fix.glob("*.mhd"):  # headers name their .raw file
        mhd.write_text(mhd.read_text().replace("patient0002", "patient0001"))
    d = camus_datalist(orig)
    test = [e for e in d if e["split"] == "test"]
    assert {e["patient"] for e in test} == {"testing/patient0001"} and len(d) == 4
    np.testing.assert_array_equal(load_echo_frame(test[0]["image_ed"])[0],
                                  load_echo_frame(camus["mhd"] / "patient0002" / "patient0002_2CH_ED.mhd")[0])

    renamed = _copy(camus["mhd"], tmp_path / "half")
    for p in renamed.glob("patient*/*_sequence*"):
        p.rename(p.with_name(p.name.replace("_sequence", "_half_sequence")))
    for mhd in renamed.glob("patient*/*_half_sequence*.mhd"):
        mhd.write_text(mhd.read_text().replace("_sequence", "_half_sequence"))
    assert all("half_sequence" in e["sequence"] for e in camus_datalist(renamed))

    cfg = tmp_path / "Info_2CH.cfg"
    cfg.write_text("\n  ED : 3 \n# comment\nES:12\nNbFrame: 14\nSex: F\n Age: 61 \nImageQuality: Poor\n"
                   "EF: 48.5\nFrameRate: 33\nSomethingNew: hello world\n\n")
    c = read_info_cfg(cfg)
    assert (c["ED"], c["ES"], c["Age"], c["EF"], c["ImageQuality"], c["SomethingNew"]) == (3, 12, 61, 48.5, "Poor",
                                                                                          "hello world")


def test_camus_bad_folders(camus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        camus_datalist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no patientNNNN"):
        camus_datalist(tmp_path / "empty")

    broken = _copy(camus["nifti"], tmp_path / "missing")
    (broken / "patient0002" / "patient0002_4CH_ES_gt.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="patient0002_4CH_ES_gt.nii.gz"):
        camus_datalist(broken)

    corrupt = _copy(camus["nifti"], tmp_path / "corrupt")
    bad = corrupt / "patient0003" / "patient0003_2CH_ED.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(DataError, match="patient0003_2CH_ED.nii.gz"):
        camus_datalist(corrupt)
    with pytest.raises(DataError, match="patient0003_2CH_ED.nii.gz"):
        load_echo_frame(bad)

    trunc = _copy(camus["mhd"], tmp_path / "trunc")
    raw = trunc / "patient0001" / "patient0001_4CH_sequence.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(DataError, match="patient0001_4CH_sequence.raw"):
        camus_datalist(trunc)

    nocfg = _copy(camus["mhd"], tmp_path / "nocfg")
    (nocfg / "patient0001" / "Info_2CH.cfg").write_text("ES: 4\nNbFrame: 16\n")
    with pytest.raises(DataError, match="Info_2CH.cfg.*'ED'"):
        camus_datalist(nocfg)

    with pytest.raises(ValueError, match="split"):
        camus_datalist(camus["nifti"], split="training")


# ------------------------------------------------------------------------------------------------------ TED
def test_ted_round_trip(ted):
    d = ted_datalist(ted)
    assert [e["patient"] for e in d] == ["patient0001", "patient0002", "patient0003"]
    e = d[0]
    img, spacing = load_echo_frame(e["image"])
    lab, _ = load_echo_frame(e["label"])
    assert img.shape == lab.shape == (12, 160, 144) and img.dtype == np.uint8
    assert set(np.unique(lab)) == {0, 1, 2}  # the LA is background in TED
    assert e["ed"] == 0 and 0 < e["es"] < 11 and e["n_frames"] == 12 and e["view"] == "4CH"
    assert spacing[0] == pytest.approx(e["spacing"][0]) and e["fps"] > 5
    # one full cycle: the last frame is the next ED, the ES frame has the smallest LV
    lv = (lab == 1).sum((1, 2))
    assert lv.argmin() == e["es"] and abs(int(lv[-1]) - int(lv[0])) < 0.02 * lv[0]
    assert {x["split"] for x in d} == {"train", "val", "test"}
    assert ted_datalist(ted, split="test") == [x for x in d if x["split"] == "test"]


def test_ted_bad_folders(ted, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no patientNNNN"):
        ted_datalist(tmp_path / "empty")
    broken = _copy(ted, tmp_path / "broken")
    (broken / "patient0002" / "patient0002_4CH_sequence_gt.mhd").unlink()
    with pytest.raises(FileNotFoundError, match="patient0002_4CH_sequence_gt.mhd"):
        ted_datalist(broken)
    assert len(ted_datalist(broken, require_labels=False)) == 3
    (broken / "patient0003" / "patient0003_4CH_info.cfg").unlink()
    with pytest.raises(FileNotFoundError, match="patient0003_4CH_info.cfg"):
        ted_datalist(broken, require_labels=False)


# ------------------------------------------------------------------------------------------------- tracking
def test_tracking_round_trip(tracking):
    d = tracking_datalist(tracking)
    assert [e["id"] for e in d] == ["video0001", "video0002"]
    for e in d:
        v = read_tracking_h5(e["video"])
        T = v["video"].shape[0]
        assert v["video"].shape == (24, 128, 128) and v["video"].dtype == np.uint8
        assert v["tracks"].shape == (T, 16, 2) and v["tracks"].dtype == np.float32
        assert v["visible"].shape == (T, 16) and v["visible"].dtype == bool
        assert v["labels"].shape == v["video"].shape
        assert v["view"] in ("2CH", "4CH") and v["ed_frame"] == 0 and 0 < v["es_frame"] < T
        assert v["fps"] == e["fps"] and v["pixel_spacing_mm"] == e["spacing"][0]
        # the stored reference GLS (continuous centre line) agrees with the GLS of the stored 16 tracks up to the
        # polyline's discretisation
        gls = global_longitudinal_strain(v["tracks"], v["ed_frame"], v["es_frame"], v["pixel_spacing_mm"]).gls
        assert gls == pytest.approx(v["gls_reference"], abs=1.0) and -26 < gls < -5
        # visible points sit on the myocardium label
        t, i = np.nonzero(v["visible"])
        x, y = np.round(v["tracks"][t, i, 0]).astype(int), np.round(v["tracks"][t, i, 1]).astype(int)
        assert (v["labels"][t, y, x] == 2).mean() > 0.95


def test_tracking_writer_is_deterministic(tracking, tmp_path):
    again = write_tracking_h5(tmp_path / "again", n_videos=1, seed=2, image_size=(128, 128), n_frames=24,
                              n_points=16, progress=False)
    a, b = read_tracking_h5(tracking / "video0001.h5"), read_tracking_h5(again / "video0001.h5")
    for k in ("video", "tracks", "visible", "labels"):
        np.testing.assert_array_equal(a[k], b[k])


def test_tracking_bad_files(tracking, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .h5"):
        tracking_datalist(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_tracking_h5(tmp_path / "nope.h5")
    junk = tmp_path / "junk" / "video9.h5"
    junk.parent.mkdir()
    junk.write_bytes(b"not hdf5" * 100)
    with pytest.raises(DataError, match="video9.h5"):
        tracking_datalist(junk.parent)
    bad = tmp_path / "bad.h5"
    shutil.copy(tracking / "video0001.h5", bad)
    with h5py.File(bad, "a") as f:
        del f["visible"]
        f["visible"] = np.ones((3, 16), dtype=bool)
    with pytest.raises(DataError, match="bad.h5.*visible"):
        read_tracking_h5(bad)
    with h5py.File(bad, "a") as f:
        del f.attrs["fps"]
    with pytest.raises(DataError, match="fps"):
        read_tracking_h5(bad)


# ----------------------------------------------------------------------------------------------------- plots
def test_plot_from_files(camus, tracking, tmp_path):
    entry = camus_datalist(camus["nifti"], views=("4CH",))[0]
    out1 = plot_echo_sequence((entry["sequence"], entry["sequence_label"]), tmp_path / "camus.png")
    out2 = plot_echo_sequence(tracking / "video0002.h5", tmp_path / "trk.png", frames=[0, 5])
    out3 = plot_echo_sequence(entry, tmp_path / "entry.png")
    for out in (out1, out2, out3):
        assert out.is_file() and out.stat().st_size > 10_000
