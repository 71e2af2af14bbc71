"""Registration pairs with lost correspondence: layout, true motion, lost map exactness, determinism, errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage

from common.data.io import DataError, read_image, write_nifti
from common.data.registration import read_displacement, registration_pairs_datalist
from common.data.synthetic.registration import (
    LOST_DELTA,
    plot_registration_pairs,
    simulate_registration_pair,
    write_registration_pairs,
)


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_registration_pairs(root, n_pairs=8, seed=0, shape=(96, 96), clean_fraction=0.25, progress=False)
    return root


def _warp(img: np.ndarray, d: np.ndarray, order: int = 1) -> np.ndarray:
    """Independent reference warp: img sampled at x + d(x)."""
    g = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    return ndimage.map_coordinates(img, [g[0] + d[0], g[1] + d[1]], order=order, mode="nearest")


def _load(e):
    s, t = read_image(e["source"]).array, read_image(e["target"]).array
    return s, t, read_displacement(e["disp"]), read_image(e["lost"]).array.astype(bool)


def test_layout_and_datalist(pairs_root):
    dl = registration_pairs_datalist(pairs_root, verify=True)
    assert [e["pair"] for e in dl] == [f"pair{i:04d}" for i in range(1, 9)]
    rows = list(csv.DictReader(open(pairs_root / "pairs" / "manifest.csv")))
    assert [r["pair"] for r in rows] == [e["pair"] for e in dl]
    assert {r["modality"] for r in rows} == {"mri", "echo"}
    for e in dl:
        s, t, d, lost = _load(e)
        assert s.shape == t.shape == lost.shape == (96, 96) and d.shape == (2, 96, 96)
        assert s.dtype == np.float32 and 0 <= s.min() and s.max() < 3
        assert set(np.unique(read_image(e["target_myo"]).array)) == {0, 1}
    assert registration_pairs_datalist(pairs_root / "pairs")[0]["pair"] == "pair0001"  # the folder itself works
    parts = [registration_pairs_datalist(pairs_root, s) for s in ("train", "val", "test")]
    assert sorted(e["pair"] for p in parts for e in p) == [e["pair"] for e in dl] and all(parts)


def test_true_displacement_moves_the_myocardium(pairs_root):
    for e in registration_pairs_datalist(pairs_root):
        sm, tm = read_image(e["source_myo"]).array, read_image(e["target_myo"]).array
        d = read_displacement(e["disp"])
        warped = _warp(sm.astype(float), d) >= 0.5
        dice = 2 * (warped & (tm > 0)).sum() / (warped.sum() + tm.sum())
        raw = 2 * ((sm > 0) & (tm > 0)).sum() / (sm.sum() + tm.sum())
        assert dice >= 0.9 and raw < dice - 0.1, e["pair"]


def test_lost_map_marks_the_corrupted_regions(pairs_root):
    rows = {r["pair"]: r for r in csv.DictReader(open(pairs_root / "pairs" / "manifest.csv"))}
    n_corrupt = 0
    for e in registration_pairs_datalist(pairs_root):
        s, t, d, lost = _load(e)
        diff = np.abs(t - _warp(s, d))
        row = rows[e["pair"]]
        if not row["corruptions"]:  # clean control pair
            if row["modality"] == "mri":
                assert diff.mean() < 0.04 and not lost.any()
            else:  # speckle resampled at sub-pixel shifts differs more, and sector edges lose tissue
                assert diff.mean() < 0.1 and lost.mean() < 0.05
            continue
        n_corrupt += 1
        assert lost.any()
        assert diff[lost].mean() > 3 * diff[~lost].mean(), e["pair"]
        assert np.percentile(diff[~lost], 95) < (0.12 if row["modality"] == "mri" else 0.2), e["pair"]
    assert n_corrupt >= 4


def test_lost_map_is_exactly_where_the_target_changed():
    kw = {"modality": "mri", "shape": (80, 80), "corruptions": ("dropout",), "max_regions": 1, "p_source": 0.0}
    for seed in (1, 2, 3):
        clean = simulate_registration_pair(seed, clean=True, **{k: v for k, v in kw.items() if k != "corruptions"})
        bad = simulate_registration_pair(seed, **kw)
        np.testing.assert_array_equal(clean.source, bad.source)
        change = np.abs(bad.target - clean.target)
        lost = bad.lost.astype(bool)
        assert lost.any() and not clean.lost.any()
        assert (change[lost] > 0.01).mean() > 0.97  # lost only where the corruption acted
        assert lost[change > 3 * LOST_DELTA].mean() > 0.95  # and everywhere it changed a lot


def test_source_corruption_is_carried_to_the_target_grid():
    kw = {"modality": "mri", "shape": (80, 80), "corruptions": ("noise",), "max_regions": 1, "p_source": 1.0}
    pair = simulate_registration_pair(4, **kw)
    clean = simulate_registration_pair(4, modality="mri", shape=(80, 80), clean=True)
    np.testing.assert_array_equal(pair.target, clean.target)
    changed = np.abs(pair.source - clean.source) > 0
    d = np.moveaxis(pair.disp, -1, 0)
    on_target = _warp(changed.astype(float), d) > 0.5
    lost = pair.lost.astype(bool)
    assert (lost & on_target).sum() > 0.8 * lost.sum()


def test_determinism_and_arguments():
    a = simulate_registration_pair(9, "echo", (64, 64))
    b = simulate_registration_pair(9, "echo", (64, 64))
    c = simulate_registration_pair(10, "echo", (64, 64))
    for k in ("source", "target", "disp", "lost"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert not np.array_equal(a.source, c.source)
    with pytest.raises(ValueError, match="modality"):
        simulate_registration_pair(0, "ct")
    with pytest.raises(ValueError, match="corruption"):
        simulate_registration_pair(0, "mri", corruptions=("blur",))


def test_clear_errors(pairs_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        registration_pairs_datalist(tmp_path / "nothing_here")
    (tmp_path / "empty" / "pairs").mkdir(parents=True)
    with pytest.raises(DataError, match="no registration pairs"):
        registration_pairs_datalist(tmp_path / "empty")
    import shutil

    shutil.copytree(pairs_root / "pairs", tmp_path / "bad" / "pairs")
    (tmp_path / "bad" / "pairs" / "pair0003_lost.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="pair0003_lost"):
        registration_pairs_datalist(tmp_path / "bad")
    wrong = write_nifti(tmp_path / "disp.nii.gz", np.zeros((8, 8, 3), np.float32))
    with pytest.raises(DataError, match="disp.nii.gz"):
        read_displacement(wrong)
    with pytest.raises(FileExistsError):
        write_registration_pairs(pairs_root, n_pairs=1, progress=False)


def test_plot(pairs_root, tmp_path):
    assert plot_registration_pairs(pairs_root, tmp_path / "pairs.png", n=2).stat().st_size > 10_000


def test_pair_datalist_split_knobs(pairs_root):
    """The bundles' split knobs: ``split="all"`` is every pair, no split; ``val_fraction``/``test_fraction`` replace
    the layout's default 60:20:20 (8 pairs: 6/1/1 by default, 2/4/2 with 0.5/0.25)."""
    from common.data.pairs import pair_datalist

    names = {s: [e["name"] for e in pair_datalist(pairs_root, s)] for s in ("train", "val", "test", "all")}
    assert [len(names[s]) for s in ("train", "val", "test")] == [6, 1, 1]
    assert sorted(names["train"] + names["val"] + names["test"]) == sorted(names["all"]) and len(names["all"]) == 8
    sizes = [len(pair_datalist(pairs_root, s, val_fraction=0.5, test_fraction=0.25)) for s in ("train", "val", "test")]
    assert sizes == [2, 4, 2]
    with pytest.raises(ValueError, match="split must be one of"):
        pair_datalist(pairs_root, "validation")
    with pytest.raises(ValueError, match="invalid split fractions"):
        pair_datalist(pairs_root, "train", val_fraction=0.7, test_fraction=0.5)
