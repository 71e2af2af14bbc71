"""common.data.pairs: layout detection, ED->ES pair datalists, crop/resize/normalisation, inference inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.io import DataError, read_image, write_nifti
from common.data.pairs import (
    LoadInferencePaird,
    LoadRegistrationPaird,
    detect_pair_layout,
    inference_pairs,
    min_max_normalise,
    pair_datalist,
    resize_2d,
)


@pytest.fixture(scope="module")
def acdc_root(adacs_env) -> Path:
    return Path(adacs_env["ADACS_CACHE"]) / "acdc-seed0"


def test_acdc_pairs_are_myocardium_slices_cropped_around_the_ed_centroid(acdc_root):
    assert detect_pair_layout(acdc_root) == "acdc"
    entries = pair_datalist(acdc_root)
    splits = {s: {e["patient"] for e in pair_datalist(acdc_root, s)} for s in ("train", "val", "test")}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])  # patient level
    assert sum(len(pair_datalist(acdc_root, s)) for s in splits) == len(entries)
    e = entries[len(entries) // 2]
    ed = read_image(e["source_label"]).array[..., e["slice"]] == 2
    es = read_image(e["target_label"]).array[..., e["slice"]] == 2
    assert ed.any() and es.any()
    out = LoadRegistrationPaird((64, 64))(e)
    img, lab = out["image"], out["label"].numpy()
    assert tuple(img.shape) == (2, 64, 64) and float(img.min()) == 0.0 and float(img.max()) == 1.0
    ys, xs = np.nonzero(lab[0])
    assert abs(ys.mean() - 31.5) < 1.0 and abs(xs.mean() - 31.5) < 1.0  # centred on the ED myocardium
    assert lab[0].sum() == ed.sum()  # nothing of the myocardium cut away (it fits in 96 mm)
    # same window for the ES frame: the crop of the raw ES slice around the ED centroid
    full = read_image(e["target"]).array[..., e["slice"]].astype(np.float32)
    cy, cx = np.nonzero(ed)
    y0, x0 = int(round(cy.mean())) - 32, int(round(cx.mean())) - 32
    np.testing.assert_allclose(img[1].numpy(), min_max_normalise(full[y0:y0 + 64, x0:x0 + 64]), atol=1e-6)
    np.testing.assert_allclose(out["image"].affine[:3, 3].numpy(),
                               (read_image(e["target"]).affine @ np.array([y0, x0, 0, 1.0]))[:3], atol=1e-5)


def test_pairs_layout_resize_and_lost_map(tmp_path):
    from common.data.synthetic.registration import write_registration_pairs

    write_registration_pairs(tmp_path, n_pairs=3, seed=1, shape=(96, 96), progress=False)
    assert detect_pair_layout(tmp_path) == "pairs"
    e = pair_datalist(tmp_path)[0]
    out = LoadRegistrationPaird((64, 64))(e)
    lost = read_image(e["lost"]).array.astype(np.float32)
    np.testing.assert_array_equal(out["lost"][0].numpy(), resize_2d(lost, (64, 64), mask=True))
    np.testing.assert_allclose(out["spacing"].numpy(), np.array(read_image(e["source"]).spacing[:2]) * 1.5)
    assert set(np.unique(out["label"].numpy())) <= {0.0, 1.0}


def test_layout_and_input_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not a registration dataset"):
        detect_pair_layout(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        pair_datalist(tmp_path / "missing")
    with pytest.raises(DataError, match="flat.nii.gz: image is constant"):
        min_max_normalise(np.ones((4, 4)), "flat.nii.gz")
    write_nifti(tmp_path / "a_source.nii.gz", np.random.default_rng(0).random((32, 32)).astype(np.float32))
    with pytest.raises(FileNotFoundError, match="no matching a_target"):
        inference_pairs(tmp_path)
    with pytest.raises(ValueError, match="give target_path"):
        inference_pairs(tmp_path / "a_source.nii.gz")
    write_nifti(tmp_path / "a_target.nii.gz", np.zeros((32, 32, 5), np.float32))
    entry = inference_pairs(tmp_path)[0]
    assert entry["source_mask"] == ""
    with pytest.raises(DataError, match=r"a_target.nii.gz: expected one 2D image, got an array of shape \(32, 32, 5\)"):
        LoadInferencePaird((32, 32))(entry)
