"""Per-class segmentation metrics against independent float64 references (set counting, brute-force surfaces)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.metrics.segmentation import (
    SEGMENTATION_METRICS,
    asd_per_class,
    dice_per_class,
    finite_mean_std,
    hausdorff_per_class,
    hd95_per_class,
    iou_per_class,
    mae_per_class,
    mean_over_slices,
    monai_distance_notices_ignored,
    one_hot_labels,
    per_slice_metrics,
    segmentation_metrics,
    specificity_per_class,
    voxel_spacing,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_maps(rng: np.random.Generator, shape=(12, 14, 9), z: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Blobby label maps (smoothed noise, arg-max over classes) so that surfaces are non-trivial."""
    def blobs():
        noise = rng.normal(size=(z,) + shape)
        return np.argmax(np.stack([ndimage.gaussian_filter(n, 1.2) for n in noise]), axis=0)

    return blobs(), blobs()


def _ref_overlap(pred: np.ndarray, label: np.ndarray, c: int) -> dict[str, float]:
    p, g = pred == c, label == c
    tp, fp, fn, tn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum(), (~p & ~g).sum()
    return {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "specificity": tn / (tn + fp),
        "mae": np.abs(p.astype(float) - g.astype(float)).mean(),
    }


def _edges(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _ref_surface(pred: np.ndarray, label: np.ndarray, c: int, spacing) -> dict[str, float]:
    """Brute-force directed surface distances between the edge voxels (all pairs, float64)."""
    sp = np.asarray(spacing, dtype=np.float64)
    a = np.argwhere(_edges(pred == c)) * sp
    b = np.argwhere(_edges(label == c)) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    ab, ba = d.min(axis=1), d.min(axis=0)
    return {
        "hd": max(ab.max(), ba.max()),
        "hd95": max(np.percentile(ab, 95), np.percentile(ba, 95)),
        "asd": (ab.sum() + ba.sum()) / (len(ab) + len(ba)),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_overlap_metrics_match_set_counting(seed):
    pred, label = _random_maps(np.random.default_rng(seed))
    out = segmentation_metrics(pred, label, 4, ("dice", "iou", "specificity", "mae"))
    for name, values in out.items():
        assert values.shape == (3,) and values.dtype == np.float64
        ref = [_ref_overlap(pred, label, c)[name] for c in (1, 2, 3)]
        np.testing.assert_allclose(values, ref, rtol=1e-6, atol=1e-9, err_msg=name)


def test_single_metric_functions_equal_the_combined_call():
    pred, label = _random_maps(np.random.default_rng(8))
    combined = segmentation_metrics(pred, label, 4, ("iou", "specificity"))
    np.testing.assert_array_equal(iou_per_class(pred, label, 4), combined["iou"])
    np.testing.assert_array_equal(specificity_per_class(pred, label, 4), combined["specificity"])
    assert specificity_per_class(pred, label, 4, include_background=True).shape == (4,)


def test_include_background_adds_class_zero():
    pred, label = _random_maps(np.random.default_rng(2))
    d = dice_per_class(pred, label, 4, include_background=True)
    assert d.shape == (4,)
    np.testing.assert_allclose(d[0], _ref_overlap(pred, label, 0)["dice"], rtol=1e-6)
    np.testing.assert_allclose(d[1:], dice_per_class(pred, label, 4), rtol=1e-12)


@pytest.mark.parametrize("spacing", [None, (1.0, 2.0, 0.5)])
def test_surface_distances_match_brute_force(spacing):
    pred, label = _random_maps(np.random.default_rng(3), shape=(10, 11, 8))
    sp = (1.0, 1.0, 1.0) if spacing is None else spacing
    for name, fn in (("hd", hausdorff_per_class), ("hd95", hd95_per_class), ("asd", asd_per_class)):
        got = fn(pred, label, 4, spacing=spacing)
        ref = [_ref_surface(pred, label, c, sp)[name] for c in (1, 2, 3)]
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=name)


def test_anisotropic_spacing_scales_distances():
    label = np.zeros((16, 16, 6), dtype=int)
    label[4:10, 4:10, 1:5] = 1
    pred = np.roll(label, 2, axis=0)  # the prediction is shifted by 2 voxels along axis 0
    d1 = hausdorff_per_class(pred, label, 2, spacing=(1.0, 1.0, 1.0))
    d3 = hausdorff_per_class(pred, label, 2, spacing=(3.0, 1.0, 1.0))
    np.testing.assert_allclose(d1, [2.0])
    np.testing.assert_allclose(d3, [6.0])
    np.testing.assert_allclose(hausdorff_per_class(pred, label, 2, spacing=2.5), [5.0])


def test_perfect_prediction():
    _, label = _random_maps(np.random.default_rng(4))
    m = segmentation_metrics(label, label, 4, tuple(SEGMENTATION_METRICS), spacing=(1.5, 1.5, 2.0))
    np.testing.assert_allclose(m["dice"], 1.0)
    np.testing.assert_allclose(m["iou"], 1.0)
    np.testing.assert_allclose(m["specificity"], 1.0)
    np.testing.assert_allclose(m["mae"], 0.0)
    for k in ("hd", "hd95", "asd"):
        np.testing.assert_allclose(m[k], 0.0)


def test_absent_and_missed_classes():
    label = np.zeros((8, 8), dtype=int)
    label[2:5, 2:5] = 1  # class 1 present, class 2 absent from the reference
    pred = np.zeros_like(label)
    pred[0:2, 6:8] = 2  # class 1 missed, class 2 predicted where the reference has none
    assert dice_per_class(pred, label, 3)[0] == 0.0
    assert np.isnan(dice_per_class(pred, label, 3)[1])
    np.testing.assert_array_equal(dice_per_class(pred, label, 3, ignore_empty=False), [0.0, 0.0])
    asd = asd_per_class(pred, label, 3)
    assert np.isinf(asd[0]) and np.isnan(asd[1])
    s = finite_mean_std([1.0, 3.0, np.inf, np.nan])
    assert s == {"mean": 2.0, "std": 1.0, "n": 2, "n_nan": 1, "n_inf": 1}
    assert finite_mean_std([np.nan])["mean"] is None


def test_mae_with_probabilities():
    rng = np.random.default_rng(5)
    label = rng.integers(0, 3, size=(6, 7))
    probs = rng.dirichlet(np.ones(3), size=(6, 7)).transpose(2, 0, 1)
    ref = [np.abs(probs[c] - (label == c)).mean() for c in (1, 2)]
    np.testing.assert_allclose(mae_per_class(probs, label, 3), ref, rtol=1e-12)
    np.testing.assert_allclose(mae_per_class(torch.from_numpy(probs), torch.from_numpy(label), 3), ref, rtol=1e-12)


def test_slice_level_metrics():
    pred, label = _random_maps(np.random.default_rng(6), shape=(9, 10, 5))
    spacing = (1.0, 2.0, 3.0)
    per = per_slice_metrics(pred, label, 4, slice_axis=1, metrics=("dice", "asd"), spacing=spacing)
    assert per["dice"].shape == (10, 3) and per["asd"].shape == (10, 3)
    for s in (0, 4, 9):
        p2, y2 = pred[:, s, :], label[:, s, :]
        np.testing.assert_allclose(per["dice"][s], dice_per_class(p2, y2, 4), rtol=1e-12)
        np.testing.assert_allclose(per["asd"][s], asd_per_class(p2, y2, 4, spacing=(1.0, 3.0)), rtol=1e-12)
    mean = mean_over_slices(per)
    col = per["dice"][:, 0]
    np.testing.assert_allclose(mean["dice"][0], col[np.isfinite(col)].mean())
    np.testing.assert_array_equal(mean_over_slices({"x": np.array([[np.nan], [np.inf]])})["x"], [np.nan])


def test_torch_and_float_inputs_agree_with_numpy():
    pred, label = _random_maps(np.random.default_rng(7))
    a = dice_per_class(pred, label, 4)
    b = dice_per_class(torch.from_numpy(pred), torch.from_numpy(label).float(), 4)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_bad_inputs_name_the_problem():
    label = np.zeros((6, 6), dtype=int)
    with pytest.raises(ValueError, match="differs from label shape"):
        dice_per_class(np.zeros((6, 5), dtype=int), label, 3)
    with pytest.raises(ValueError, match="outside"):
        dice_per_class(np.full((6, 6), 3), label, 3)
    with pytest.raises(ValueError, match="non-integer"):
        dice_per_class(np.full((6, 6), 0.5), label, 3)
    with pytest.raises(ValueError, match="2D or 3D"):
        dice_per_class(np.zeros(6, dtype=int), np.zeros(6, dtype=int), 3)
    with pytest.raises(ValueError, match="one value per spatial axis"):
        asd_per_class(label, label, 3, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        voxel_spacing((1.0, 0.0), 2)
    with pytest.raises(ValueError, match="unknown metrics"):
        segmentation_metrics(label, label, 3, ("dice", "volume"))
    with pytest.raises(ValueError, match="num_classes"):
        dice_per_class(label, label, 1)


def test_distance_metrics_silence_only_monais_per_call_notices():
    pred, label = np.zeros((16, 16), np.int64), np.zeros((16, 16), np.int64)
    pred[2:8, 2:8], label[3:9, 3:9], label[10:14, 10:14] = 1, 1, 2  # class 2 missed, class 3 absent from both
    with warnings.catch_warnings(record=True) as monai_notices:
        warnings.simplefilter("always")
        from monai.metrics import compute_hausdorff_distance

        compute_hausdorff_distance(one_hot_labels(pred, 4), one_hot_labels(label, 4), spacing=[1.0, 1.0])
    kinds = {w.category for w in monai_notices}
    assert {UserWarning, FutureWarning} <= kinds  # MONAI does give the notices the module silences
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in (hausdorff_per_class, hd95_per_class, asd_per_class):
            fn(pred, label, 4, spacing=1.0)
    assert [str(w.message) for w in caught] == []
    # any other warning raised under the filter still reaches the caller, as does the same text in another category
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monai_distance_notices_ignored():
            warnings.warn("the ground truth of class 3 is all 0, this may result in nan/inf distance.", UserWarning,
                          stacklevel=1)
            warnings.warn("get_mask_edges:always_return_as_numpy: Argument deprecated", FutureWarning, stacklevel=1)
            warnings.warn("spacing looks wrong", UserWarning, stacklevel=1)
            warnings.warn("the prediction of class 2 is all 0", RuntimeWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "spacing looks wrong"), (RuntimeWarning, "the prediction of class 2 is all 0")]
