"""Paired-frame transforms (BOTM): one parameter draw for both frames and both labels (MONAI RandFlipd/RandRotated,
shown equal to our warp); our shared affine with points; severity corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, ScaleIntensityd
from monai.utils import set_determinism
from scipy.ndimage import gaussian_filter, map_coordinates

from common.transforms import (
    AffineParams,
    RandPairedAffined,
    SeverityBlurd,
    SeverityGaussNoised,
    affine_matrix,
    paired_frame_augmentation,
    severity_blur_sigma,
    warp_affine,
)

H, W = 64, 80


def smooth_image(rng: np.random.Generator, sigma: float = 3.0) -> np.ndarray:
    img = gaussian_filter(rng.standard_normal((H, W)), sigma, mode="wrap")
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def labels_from(img: np.ndarray) -> np.ndarray:
    """Integer label map (0..3) by thresholding the image, so image and label must move together."""
    return np.digitize(img, [0.35, 0.55, 0.75]).astype(np.int64)


def pair_sample(rng: np.random.Generator, identical: bool = True) -> dict:
    f0 = smooth_image(rng)
    f1 = f0.copy() if identical else smooth_image(rng)
    image = np.stack([f0, f1])
    return {"image": image, "label": labels_from(image)}


def flip_only(prob: float = 1.0) -> Compose:
    return paired_frame_augmentation(("image",), ("label",), flip_prob=prob, rotate_prob=0.0)


def rotate_only(prob: float = 1.0, deg: float = 20.0) -> Compose:
    return paired_frame_augmentation(("image",), ("label",), flip_prob=0.0, rotate_prob=prob, rotate_deg=deg)


def test_flip_is_exact_and_shared_by_both_frames_and_labels():
    rng = np.random.default_rng(0)
    d = pair_sample(rng, identical=False)
    out = flip_only(1.0)(d)
    np.testing.assert_array_equal(np.asarray(out["image"]), d["image"][..., ::-1])
    np.testing.assert_array_equal(np.asarray(out["label"]), d["label"][..., ::-1])
    same = flip_only(0.0)(d)
    np.testing.assert_array_equal(np.asarray(same["image"]), d["image"])
    np.testing.assert_array_equal(np.asarray(same["label"]), d["label"])

    tr = flip_only(0.5)
    tr.set_random_state(0)
    flips = 0
    for _ in range(400):
        o = tr(d)
        img, lab = np.asarray(o["image"]), np.asarray(o["label"])
        flipped = np.array_equal(img, d["image"][..., ::-1])
        assert flipped or np.array_equal(img, d["image"])
        assert np.array_equal(lab, d["label"][..., ::-1] if flipped else d["label"])  # label follows image
        flips += flipped
    assert 0.42 < flips / 400 < 0.58


def test_separate_frame_keys_get_the_same_draw():
    rng = np.random.default_rng(1)
    f = smooth_image(rng)
    lab = labels_from(f)
    d = {"image_ed": f[None], "image_es": f[None].copy(), "label_ed": lab[None], "label_es": lab[None].copy()}
    keys = ("image_ed", "image_es", "label_ed", "label_es")
    tr = RandPairedAffined(keys, mode=("bilinear", "bilinear", "nearest", "nearest"), rotate_range=30.0,
                           scale_range=(0.8, 1.2), translate_range=0.1, shear_range=10.0, hflip_prob=0.5)
    tr.set_random_state(0)
    changed = 0
    for _ in range(10):
        out = tr(d)
        np.testing.assert_array_equal(out["image_ed"], out["image_es"])
        np.testing.assert_array_equal(out["label_ed"], out["label_es"])
        changed += not np.array_equal(out["image_ed"], d["image_ed"])
    assert changed >= 8


@pytest.mark.parametrize("seed", range(5))
def test_rotation_shared_by_frames_and_labels_stay_integer(seed):
    rng = np.random.default_rng(seed)
    d = pair_sample(rng, identical=True)
    tr = rotate_only(1.0, 20.0)
    tr.set_random_state(seed)
    out = tr(d)
    deg = float(np.rad2deg(tr.transforms[1].rand_rotate.x))
    assert deg != 0.0 and abs(deg) <= 20.0
    img, lab = np.asarray(out["image"]), np.asarray(out["label"])
    np.testing.assert_array_equal(img[0], img[1])
    np.testing.assert_array_equal(lab[0], lab[1])
    assert set(np.unique(lab)) <= {0, 1, 2, 3}
    # MONAI's rotation is our pixel-centre warp at the same angle (which is why paired_frame_augmentation uses it)
    m = affine_matrix((H, W), rotate_deg=deg)
    np.testing.assert_allclose(img, warp_affine(d["image"], m, mode="bilinear"), atol=1e-4)  # float32 sampling
    np.testing.assert_array_equal(lab, warp_affine(d["label"], m, mode="nearest"))
    inv = np.linalg.inv(m)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    sx, sy = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    interior = (sx > 1) & (sx < W - 2) & (sy > 1) & (sy < H - 2)  # sources away from the zero padding
    # label moved with the image: thresholding the rotated image reproduces the rotated label away from class
    # boundaries (there nearest and bilinear sampling may legitimately disagree)
    rot = img[0]
    away = interior & (np.min(np.abs(rot[..., None] - np.array([0.35, 0.55, 0.75])), axis=-1) > 0.05)
    agree = (labels_from(rot) == lab[0])[away].mean()
    assert away.mean() > 0.35 and agree > 0.995, (away.mean(), agree)
    # and the labels are the nearest-neighbour samples of the original at the inverse-mapped pixel centres
    ref = map_coordinates(d["label"][0].astype(float), [sy, sx], order=0, mode="constant", cval=0.0)
    assert (ref[interior] == lab[0][interior]).mean() > 0.995


def test_rotation_probability_and_range():
    tr = rotate_only(0.5, 20.0).transforms[1]
    tr.set_random_state(0)
    angles = []
    for _ in range(2000):
        tr.randomize(None)
        tr.rand_rotate.randomize()
        angles.append(np.rad2deg(tr.rand_rotate.x) if tr._do_transform else 0.0)
    angles = np.array(angles)
    assert 0.45 < (angles != 0).mean() < 0.55
    assert np.abs(angles).max() <= 20.0 and np.abs(angles).max() > 19.0


def test_paired_affine_moves_points_with_the_frames():
    rng = np.random.default_rng(2)
    image = np.stack([smooth_image(rng), smooth_image(rng)])
    pts = np.stack([rng.uniform(3, W - 4, 200), rng.uniform(3, H - 4, 200)], -1).astype(np.float32)
    d = {"image": image, "points": np.stack([pts, pts]), "visible": np.ones((2, 200), bool)}
    tr = RandPairedAffined("image", point_keys="points", visible_keys="visible", rotate_range=60.0, rotate_prob=1.0,
                           shear_range=10.0, shear_prob=1.0, scale_range=(0.9, 1.1), scale_prob=1.0)
    tr.set_random_state(3)
    out = tr(d)
    for f in range(2):
        p = out["points"][f].astype(np.float64)
        sel = out["visible"][f] & (p[:, 0] > 2) & (p[:, 0] < W - 3) & (p[:, 1] > 2) & (p[:, 1] < H - 3)
        assert sel.sum() > 100
        a = map_coordinates(image[f].astype(float), [pts[sel, 1], pts[sel, 0]], order=1)
        b = map_coordinates(out["image"][f].astype(float), [p[sel, 1], p[sel, 0]], order=1)
        assert np.abs(a - b).max() < 0.03


def test_types_and_metadata_are_preserved():
    rng = np.random.default_rng(3)
    d = pair_sample(rng)
    meta_img = MetaTensor(torch.as_tensor(d["image"]), meta={"filename_or_obj": "pair.nii.gz"})
    tr = RandPairedAffined(("image", "label"), rotate_range=20.0, rotate_prob=1.0, mode=("bilinear", "nearest"))
    tr.set_random_state(0)
    out = tr({"image": meta_img, "label": torch.as_tensor(d["label"], dtype=torch.uint8)})
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "pair.nii.gz"
    assert out["label"].dtype == torch.uint8 and not isinstance(out["label"], MetaTensor)
    tr.set_random_state(0)
    ref = tr(d)
    np.testing.assert_allclose(out["image"].numpy(), ref["image"], atol=1e-6)
    np.testing.assert_array_equal(out["label"].numpy(), ref["label"])


def test_errors_name_the_problem():
    d = {"image": np.zeros((2, H, W), np.float32), "label": np.zeros((2, H + 1, W), np.int64)}
    with pytest.raises(ValueError, match="different spatial sizes"):
        RandPairedAffined(("image", "label"), rotate_range=20.0, rotate_prob=1.0)(d)
    with pytest.raises(KeyError):
        RandPairedAffined(("image", "missing"), prob=0.0)({"image": d["image"]})
    with pytest.raises(ValueError, match="rotate_prob"):
        paired_frame_augmentation(rotate_prob=1.5)
    with pytest.raises(ValueError, match="rotate_deg"):
        paired_frame_augmentation(rotate_deg=-5.0)
    with pytest.raises(ValueError):
        RandPairedAffined("image", mode="cubic")
    with pytest.raises(ValueError):
        warp_affine(np.zeros((1, 5)), np.eye(3))


def test_composes_with_monai_and_is_deterministic():
    rng = np.random.default_rng(4)
    d = pair_sample(rng, identical=False)

    def pipeline() -> Compose:
        return Compose([ScaleIntensityd("image"), paired_frame_augmentation(("image",), ("label",))])

    outs = []
    for _ in range(2):
        c = pipeline()
        c.set_random_state(11)
        outs.append([c(d) for _ in range(6)])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
    assert len({np.asarray(o["image"]).tobytes() for o in outs[0]}) > 1  # it is random across samples

    results = []
    for _ in range(2):
        set_determinism(seed=5)
        try:
            results.append(pipeline()(d))
        finally:
            set_determinism(seed=None)
    np.testing.assert_array_equal(np.asarray(results[0]["image"]), np.asarray(results[1]["image"]))


def grad_energy(x: np.ndarray) -> float:
    return float(np.mean(np.diff(x, axis=-1) ** 2) + np.mean(np.diff(x, axis=-2) ** 2))


def test_severity_blur_gets_stronger_and_follows_the_documented_sigma():
    rng = np.random.default_rng(5)
    # at the BOTM input size a severity of 0.1 is a ~1 px blur; on a tiny image it would be a no-op (sigma << 1 px)
    img = gaussian_filter(rng.standard_normal((2, 200, 240)), (0, 1.0, 1.0)).astype(np.float32)
    d = {"image": img, "label": np.ones((2, 200, 240), np.int64)}
    energies = [grad_energy(d["image"])]
    for s in (0.1, 0.3, 0.5):
        out = SeverityBlurd("image", severity=s)(d)
        energies.append(grad_energy(out["image"]))
        assert out["label"] is d["label"]
    assert energies[0] > energies[1] > energies[2] > energies[3]
    np.testing.assert_array_equal(SeverityBlurd("image", 0.0)(d)["image"], d["image"])
    # impulse response: the spatial variance of a blurred delta is sigma^2 = (s * 0.02 * min(H, W))^2 per axis,
    # and frames are blurred separately (frame 1 stays zero)
    delta = np.zeros((2, 101, 121), np.float64)
    delta[0, 50, 60] = 1.0
    out = SeverityBlurd("x", severity=0.5)({"x": delta})["x"]
    sigma = severity_blur_sigma(0.5, (101, 121))
    assert sigma == pytest.approx(0.5 * 0.02 * 101)
    ys, xs = np.mgrid[0:101, 0:121]
    w = out[0] / out[0].sum()
    var_y, var_x = (w * (ys - 50) ** 2).sum(), (w * (xs - 60) ** 2).sum()
    np.testing.assert_allclose([var_y, var_x], [sigma**2, sigma**2], rtol=0.05)
    assert np.abs(out[1]).max() == 0


def test_severity_noise_gets_stronger_and_follows_the_documented_std():
    rng = np.random.default_rng(6)
    img = np.stack([smooth_image(rng), smooth_image(rng)]) * 2.0 - 1.0  # range 2
    d = {"image": img}
    stds = []
    for s in (0.1, 0.3, 0.5):
        tr = SeverityGaussNoised("image", severity=s)
        tr.set_random_state(0)
        resid = tr(d)["image"] - img
        stds.append(resid.std())
        np.testing.assert_allclose(resid.std(), s * 0.5 * 2.0, rtol=0.05)
        tr.set_random_state(0)
        np.testing.assert_array_equal(tr(d)["image"], img + resid)  # reproducible under set_random_state
    assert stds[0] < stds[1] < stds[2]
    with pytest.raises(ValueError):
        SeverityGaussNoised("image", severity=1.5)


def test_warp_identity_and_pure_flip_are_exact():
    rng = np.random.default_rng(7)
    img = rng.integers(0, 4, (3, H, W)).astype(np.uint8)
    assert warp_affine(img, np.eye(3)) is img
    m = AffineParams(hflip=True, vflip=True).matrix((H, W))
    np.testing.assert_array_equal(warp_affine(img, m), img[:, ::-1, ::-1])
    # a 90-degree rotation of a square image permutes pixel centres exactly, bilinear and nearest alike
    sq = rng.standard_normal((2, 32, 32)).astype(np.float32)
    rot = warp_affine(sq, AffineParams(rotate_deg=90.0).matrix((32, 32)), mode="bilinear")
    # positive angle turns clockwise on screen (y down): the old left column becomes the top row
    np.testing.assert_allclose(rot, np.rot90(sq, k=-1, axes=(1, 2)), atol=1e-5)
