"""Video + trajectory transforms: image content and points move together, temporal transforms keep keys aligned."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from monai.transforms import CastToTyped, Compose
from monai.utils import set_determinism
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates

from common.transforms import (
    AffineParams,
    QueryFramed,
    RandBrightnessContrastd,
    RandEmbossd,
    RandFrameSkipd,
    RandImpartialAffined,
    RandJPEGCompressiond,
    RandMotionBlurd,
    RandQueryFramed,
    RandRelativeGaussianNoised,
    RandReverseSequenced,
    RandSharpend,
    SampleClipd,
    SharedAffined,
    diastasis_frame,
    impartial_motion_augmentation,
    jpeg_like_compress,
    overlapping_segments,
)

H, W = 72, 88  # non-square so an x/y swap cannot pass


def smooth_image(rng: np.random.Generator, h: int = H, w: int = W, sigma: float = 3.0) -> np.ndarray:
    """Smooth random image in [0, 1] so bilinear sampling between pixel centres is meaningful."""
    img = gaussian_filter(rng.standard_normal((h, w)), sigma, mode="wrap")
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def make_sample(rng: np.random.Generator, t: int = 3, n: int = 300, margin: float = 3.0) -> dict:
    video = np.stack([smooth_image(rng) for _ in range(t)])
    pts = np.stack([rng.uniform(margin, W - 1 - margin, n), rng.uniform(margin, H - 1 - margin, n)], -1)
    tracks = np.repeat(pts[None], t, axis=0).astype(np.float32)
    tracks += rng.normal(0, 1.0, tracks.shape).astype(np.float32)  # points differ per frame, as real tracks do
    tracks = np.clip(tracks, margin, [W - 1 - margin, H - 1 - margin]).astype(np.float32)
    return {"video": video, "tracks": tracks, "visible": np.ones((t, n), dtype=bool)}


def bilinear(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Independent reference sampler: scipy, coordinates (row=y, col=x)."""
    return map_coordinates(img.astype(np.float64), [pts[:, 1], pts[:, 0]], order=1, mode="constant", cval=np.nan)


def consistency_errors(before: dict, after: dict, margin: float = 2.0) -> np.ndarray:
    """|after.video sampled at after.tracks - before.video sampled at before.tracks| for visible interior points."""
    errs = []
    for t in range(before["video"].shape[0]):
        p0, p1 = np.asarray(before["tracks"][t], np.float64), np.asarray(after["tracks"][t], np.float64)
        vis = np.asarray(after["visible"][t], bool)
        lo, hi = np.array([margin, margin]), np.array([W - 1 - margin, H - 1 - margin])
        sel = vis & np.all((p1 >= lo) & (p1 <= hi), axis=-1)
        a = bilinear(np.asarray(before["video"][t]), p0[sel])
        b = bilinear(np.asarray(after["video"][t]), p1[sel])
        errs.append(np.abs(a - b))
    return np.concatenate(errs)


AFFINE_CASES = {
    "rot+120": AffineParams(rotate_deg=120.0),
    "rot-120": AffineParams(rotate_deg=-120.0),
    "rot37": AffineParams(rotate_deg=37.0),
    "hflip": AffineParams(hflip=True),
    "vflip": AffineParams(vflip=True),
    "shear": AffineParams(shear_deg=(15.0, -10.0)),
    "zoom_in": AffineParams(scale=(1.25, 1.25)),
    "zoom_out": AffineParams(scale=(0.8, 0.8)),
    "translate": AffineParams(translate=(7.3, -5.6)),
    "all": AffineParams(rotate_deg=-95.0, scale=(1.1, 1.1), shear_deg=(-12.0, 8.0), translate=(-4.0, 3.0),
                        hflip=True, vflip=True),
}


@pytest.mark.parametrize("name", list(AFFINE_CASES))
def test_affine_moves_image_and_points_consistently(name):
    rng = np.random.default_rng(1)
    before = make_sample(rng)
    tr = SharedAffined("video", AFFINE_CASES[name], point_keys="tracks", visible_keys="visible")
    after = tr(before)
    err = consistency_errors(before, after)
    assert err.size > 200, f"{name}: too few points left to compare ({err.size})"
    # bilinear-of-bilinear on a sigma=3 image: a few 1e-3 at most; a misplaced point is off by ~0.1 (image std ~0.15)
    assert err.max() < 0.03 and err.mean() < 0.005, (name, err.max(), err.mean())
    assert after["tracks"].dtype == np.float32 and after["visible"].dtype == bool


def test_consistency_check_detects_a_wrong_point_map():
    """Negative control: moving the points by the inverse rotation must fail the same criterion."""
    rng = np.random.default_rng(2)
    before = make_sample(rng)
    after = SharedAffined("video", AffineParams(rotate_deg=120.0), point_keys="tracks", visible_keys="visible")(before)
    wrong = dict(after)
    wrong["tracks"] = SharedAffined("video", AffineParams(rotate_deg=-120.0), point_keys="tracks")(before)["tracks"]
    wrong["visible"] = np.ones_like(before["visible"])
    err = consistency_errors(before, wrong)
    assert err.mean() > 0.05


@pytest.mark.parametrize("seed", range(6))
def test_random_impartial_affine_is_consistent_and_shared_by_all_frames(seed):
    rng = np.random.default_rng(10 + seed)
    before = make_sample(rng, t=4)
    before["video"][:] = before["video"][0]  # identical frames must stay identical: one warp for the whole clip
    before["tracks"][:] = before["tracks"][0]
    tr = RandImpartialAffined(component_prob=0.5)
    tr.set_random_state(seed)
    after = tr(before)
    for t in range(1, 4):
        np.testing.assert_array_equal(after["video"][t], after["video"][0])
        np.testing.assert_array_equal(after["tracks"][t], after["tracks"][0])
    err = consistency_errors(before, after)
    if err.size:  # a large zoom/shift may push every point out; visibility is tested separately
        assert err.max() < 0.03, (tr.params, err.max())


def test_points_leaving_the_image_become_invisible():
    rng = np.random.default_rng(3)
    before = make_sample(rng, t=2, n=400)
    before["visible"][1, :50] = False  # already invisible points must stay invisible
    after = SharedAffined(
        "video", AffineParams(translate=(30.0, -20.0)), point_keys="tracks", visible_keys="visible"
    )(before)
    p = after["tracks"].astype(np.float64)
    expected_inside = (p[..., 0] >= 0) & (p[..., 0] <= W - 1) & (p[..., 1] >= 0) & (p[..., 1] <= H - 1)
    np.testing.assert_allclose(p, before["tracks"] + np.array([30.0, -20.0]), atol=1e-4)
    np.testing.assert_array_equal(after["visible"], before["visible"] & expected_inside)
    assert 0.2 < expected_inside.mean() < 0.8  # both outcomes occur
    assert not after["visible"][1, :50].any()


def test_impartial_component_probabilities_and_ranges():
    tr = RandImpartialAffined(component_prob=0.5, rotate_range=120.0)
    tr.set_random_state(0)
    n = 2000
    fired = {k: 0 for k in ("rotate", "scale", "shear", "translate", "hflip", "vflip")}
    angles = []
    for _ in range(n):
        tr.randomize(None, (H, W))
        p = tr.params
        fired["rotate"] += p.rotate_deg != 0.0
        fired["scale"] += p.scale != (1.0, 1.0)
        fired["shear"] += p.shear_deg != (0.0, 0.0)
        fired["translate"] += p.translate != (0.0, 0.0)
        fired["hflip"] += p.hflip
        fired["vflip"] += p.vflip
        if p.rotate_deg:
            angles.append(p.rotate_deg)
        assert 0.8 <= p.scale[0] <= 1.25 and abs(p.translate[0]) <= 0.1 * W and abs(p.translate[1]) <= 0.1 * H
    for k, v in fired.items():
        assert 0.45 < v / n < 0.55, (k, v / n)
    angles = np.abs(angles)
    assert angles.max() <= 120.0 and (angles > 100.0).mean() > 0.1


def test_reverse_sequence_reverses_every_time_key():
    rng = np.random.default_rng(4)
    d = make_sample(rng, t=5, n=10)
    d["visible"][2, 3] = False
    d["query_frame"] = 1
    out = RandReverseSequenced(prob=1.0)(d)
    np.testing.assert_array_equal(out["video"], d["video"][::-1])
    np.testing.assert_array_equal(out["tracks"], d["tracks"][::-1])
    np.testing.assert_array_equal(out["visible"], d["visible"][::-1])
    assert out["query_frame"] == 3  # same frame content: 5 - 1 - 1
    untouched = RandReverseSequenced(prob=0.0)(d)
    np.testing.assert_array_equal(untouched["tracks"], d["tracks"])

    tr = RandReverseSequenced(prob=0.2)
    tr.set_random_state(0)
    small = {"video": np.arange(4)[:, None, None] * np.ones((4, 2, 2)), "tracks": np.zeros((4, 1, 2), np.float32),
             "visible": np.ones((4, 1), bool)}
    rate = np.mean([tr(small)["video"][0, 0, 0] == 3 for _ in range(2000)])
    assert 0.17 < rate < 0.23


def time_coded_sample(t: int, n: int = 5) -> dict:
    """Frame i of the video is filled with i and every track of frame i sits at x = i, so alignment is checkable."""
    video = np.broadcast_to(np.arange(t, dtype=np.float32)[:, None, None], (t, 8, 8)).copy()
    tracks = np.zeros((t, n, 2), np.float32)
    tracks[..., 0] = np.arange(t)[:, None]
    visible = (np.arange(t)[:, None] + np.arange(n)[None]) % 3 != 0
    return {"video": video, "tracks": tracks, "visible": visible}


def test_frame_skip_keeps_tracks_aligned_with_frames():
    d = time_coded_sample(60)
    tr = RandFrameSkipd(max_skip=5)
    tr.set_random_state(0)
    seen = set()
    for _ in range(300):
        out = tr(d)
        kept = out["video"][:, 0, 0].astype(int)
        np.testing.assert_array_equal(out["tracks"][:, 0, 0].astype(int), kept)
        np.testing.assert_array_equal(out["visible"], d["visible"][kept])
        steps = np.unique(np.diff(kept))
        assert steps.size == 1 and steps[0] == tr.skip + 1  # keep every (k+1)-th frame
        assert 0 <= kept[0] <= tr.skip and kept[-1] + tr.skip + 1 >= 60
        seen.add(tr.skip)
    assert seen == set(range(6))


def test_frame_skip_min_frames_and_query_remap():
    d = time_coded_sample(40)
    tr = RandFrameSkipd(max_skip=5, min_frames=18)
    tr.set_random_state(1)
    for _ in range(200):
        assert tr(d)["video"].shape[0] >= 18
    d["query_frame"] = 13
    tr = RandFrameSkipd(max_skip=5)
    tr.set_random_state(2)
    for _ in range(50):
        out = tr(d)
        kept = out["video"][:, 0, 0]
        assert abs(kept[out["query_frame"]] - 13) == np.abs(kept - 13).min()


def test_overlapping_segments_overlap_half_and_cover_everything():
    segs = overlapping_segments(200, clip_len=36, overlap=0.5)
    assert all(stop - start == 36 for start, stop in segs)
    overlaps = [(a[1] - b[0]) / 36 for a, b in zip(segs[:-1], segs[1:])]
    assert all(o == 0.5 for o in overlaps[:-1]) and 0.5 <= overlaps[-1] < 1.0
    covered = np.zeros(200, bool)
    for start, stop in segs:
        covered[start:stop] = True
    assert covered.all() and segs[0][0] == 0 and segs[-1][1] == 200
    assert overlapping_segments(36, 36) == [(0, 36)]
    assert overlapping_segments(10, 36) == [(0, 10)]
    assert overlapping_segments(37, 36) == [(0, 36), (1, 37)]
    segs = overlapping_segments(100, clip_len=20, overlap=0.25)
    assert segs[1][0] - segs[0][0] == 15
    for bad in [(0, 36, 0.5), (10, 0, 0.5), (10, 5, 1.0), (10, 5, -0.1)]:
        with pytest.raises(ValueError):
            overlapping_segments(*bad)


def test_sample_clip_picks_segments_and_pads_short_videos():
    d = time_coded_sample(100)
    tr = SampleClipd(clip_len=36, overlap=0.5)
    tr.set_random_state(0)
    segs = set(overlapping_segments(100, 36, 0.5))
    chosen = set()
    for _ in range(100):
        out = tr(d)
        kept = out["video"][:, 0, 0].astype(int)
        assert (kept[0], kept[-1] + 1) in segs and np.all(np.diff(kept) == 1)
        np.testing.assert_array_equal(out["tracks"][:, 0, 0].astype(int), kept)
        np.testing.assert_array_equal(out["visible"], d["visible"][kept])
        chosen.add(tr.segment)
    assert chosen == segs

    short = time_coded_sample(20)
    short["query_frame"] = 7
    out = tr(short)
    assert out["video"].shape == (36, 8, 8) and out["tracks"].shape == (36, 5, 2) and out["visible"].shape == (36, 5)
    np.testing.assert_array_equal(out["video"][:20], short["video"])
    np.testing.assert_array_equal(out["video"][20:], np.broadcast_to(short["video"][19], (16, 8, 8)))
    np.testing.assert_array_equal(out["tracks"][20:], np.broadcast_to(short["tracks"][19], (16, 5, 2)))
    np.testing.assert_array_equal(out["visible"][:20], short["visible"])
    assert not out["visible"][20:].any()
    assert out["query_frame"] == 7


def test_sample_clip_works_on_torch_tensors():
    d = {k: torch.as_tensor(v) for k, v in time_coded_sample(50).items()}
    tr = SampleClipd(clip_len=36)
    tr.set_random_state(3)
    out = tr(d)
    assert isinstance(out["video"], torch.Tensor) and out["visible"].dtype == torch.bool
    kept = out["video"][:, 0, 0].long()
    assert torch.equal(out["tracks"][:, 0, 0].long(), kept)


def test_random_query_frame_only_where_points_are_visible():
    vis = np.zeros((10, 4), bool)
    vis[:, :2] = True
    vis[3] = vis[7] = True
    tr = RandQueryFramed()
    tr.set_random_state(0)
    picks = {tr({"visible": vis})["query_frame"] for _ in range(100)}
    assert picks == {3, 7}
    vis[3, 0] = vis[7, 1] = False  # no frame has all points: the frames with the most visible points win
    vis[5, 2] = True
    picks = {tr({"visible": vis})["query_frame"] for _ in range(100)}
    assert picks == {3, 5, 7}


def test_validation_query_frame_is_diastasis():
    assert diastasis_frame(36) == 25 == int(0.72 * 36)
    assert diastasis_frame(100) == 72
    out = QueryFramed()({"visible": np.ones((36, 3), bool)})
    assert out["query_frame"] == 25
    assert QueryFramed(fraction=0.0)({"visible": np.ones((36, 3), bool)})["query_frame"] == 0


def video_sample(rng: np.random.Generator, t: int = 50, n: int = 40) -> dict:
    d = make_sample(rng, t=1, n=n)
    d["video"] = np.repeat((d["video"] * 255).round().astype(np.uint8), t, axis=0)
    d["tracks"] = np.repeat(d["tracks"], t, axis=0)
    d["visible"] = np.ones((t, n), bool)
    return d


def test_factory_is_deterministic_under_seeds():
    rng = np.random.default_rng(5)
    d = video_sample(rng)
    outs = []
    for seed in (7, 7, 8):
        c = impartial_motion_augmentation(clip_len=16)
        c.set_random_state(seed)
        outs.append([c(d) for _ in range(3)])
    for a, b in zip(outs[0], outs[1]):
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert any(not np.array_equal(a["video"], b["video"]) for a, b in zip(outs[0], outs[2]))

    results = []
    for _ in range(2):
        set_determinism(seed=123)
        try:
            results.append(impartial_motion_augmentation(clip_len=16)(d))
        finally:
            set_determinism(seed=None)
    for k in results[0]:
        np.testing.assert_array_equal(np.asarray(results[0][k]), np.asarray(results[1][k]))


def test_factory_pipeline_keeps_points_on_their_content():
    """Full impartial-motion schedule (image augmentations off): every output frame, sampled at its tracks, shows
    the content the points had in the original (all frames identical, so time transforms cannot hide an error)."""
    rng = np.random.default_rng(6)
    d = make_sample(rng, t=1, n=300)
    ref_img, ref_pts = d["video"][0], d["tracks"][0].astype(np.float64)
    t = 40
    d = {"video": np.repeat(d["video"], t, 0), "tracks": np.repeat(d["tracks"], t, 0),
         "visible": np.ones((t, 300), bool)}
    c = impartial_motion_augmentation(clip_len=16, image_prob=0.0, affine_prob=0.5)
    c.set_random_state(0)
    ref = bilinear(ref_img, ref_pts)
    checked = 0
    for _ in range(6):
        out = c(d)
        assert out["video"].shape == (16, H, W) and out["video"].dtype == np.float32
        q = out["query_frame"]
        assert out["visible"][q].sum() == out["visible"].sum(axis=1).max()
        for f in range(16):
            p = out["tracks"][f].astype(np.float64)
            sel = out["visible"][f] & (p[:, 0] >= 2) & (p[:, 0] <= W - 3) & (p[:, 1] >= 2) & (p[:, 1] <= H - 3)
            err = np.abs(bilinear(out["video"][f], p[sel]) - ref[sel])
            checked += sel.sum()
            assert err.size == 0 or err.max() < 0.03
    assert checked > 1000


def test_factory_baseline_has_no_impartial_motion():
    rng = np.random.default_rng(7)
    d = video_sample(rng, t=60)
    d["video"] = (np.arange(60, dtype=np.uint8)[:, None, None] + d["video"]).astype(np.uint8)
    c = impartial_motion_augmentation(enabled=False, clip_len=36)
    assert [type(x) for x in c.transforms] == [CastToTyped, SampleClipd, QueryFramed]
    c.set_random_state(0)
    for _ in range(5):
        out = c(d)
        start = int(np.argmax([np.array_equal(out["video"][0], d["video"][i].astype(np.float32)) for i in range(60)]))
        np.testing.assert_array_equal(out["video"], d["video"][start : start + 36].astype(np.float32))
        np.testing.assert_array_equal(out["tracks"], d["tracks"][start : start + 36])
        assert out["query_frame"] == 0
    enabled = impartial_motion_augmentation(enabled=True)
    names = [type(x).__name__ for x in enabled.transforms]
    assert names.index("RandFrameSkipd") < names.index("SampleClipd") < names.index("RandImpartialAffined")
    assert names[-1] == "RandQueryFramed" and "RandReverseSequenced" in names
    with pytest.raises(ValueError):
        impartial_motion_augmentation(image_prob=0.5)
    assert isinstance(enabled, Compose)


def test_factory_frame_skip_is_uniform_and_uncapped_by_default():
    """The paper's frame skipping: k uniform in 0..5 with no cap, short segments padded with invisible frames."""
    d = time_coded_sample(40)
    # affine, reversal and image augmentations off, so the time code of the frames survives the pipeline
    c = impartial_motion_augmentation(clip_len=36, affine_prob=0.0, reverse_prob=0.0, image_prob=0.0)
    skip = next(x for x in c.transforms if isinstance(x, RandFrameSkipd))
    assert skip.min_frames is None
    c.set_random_state(0)
    counts = np.zeros(6)
    for _ in range(600):
        out = c(d)
        real = out["visible"].any(axis=1)  # every real frame of time_coded_sample has visible points
        n_real = int(real.sum())
        kept = out["video"][:n_real, 0, 0].astype(int)
        assert np.all(np.diff(kept) == skip.skip + 1)  # the kept frames are every (k+1)-th of the video
        n_kept = len(range(skip.offset, 40, skip.skip + 1))  # frames left by the skip, before the clip is cut
        assert n_real == min(36, n_kept) and real[:n_real].all() and not real[n_real:].any()
        np.testing.assert_array_equal(out["video"][n_real:], kept[-1])  # padding repeats the last real frame
        assert out["query_frame"] < n_real
        counts[skip.skip] += 1
    freq = counts / counts.sum()
    assert np.all(freq > 0.12) and np.all(freq < 0.22), freq  # uniform 1/6 each; a cap at 18 frames allows k <= 1
    assert counts[5] > 0 and min(len(range(o, 40, 6)) for o in range(6)) == 6  # k = 5 leaves 6-7 real frames

    capped = impartial_motion_augmentation(clip_len=36, skip_min_frames=18, affine_prob=0.0, reverse_prob=0.0,
                                           image_prob=0.0)
    capped.set_random_state(0)
    assert all(capped(d)["visible"].any(axis=1).sum() >= 18 for _ in range(100))


def test_config_affine_ranges_and_skip_cap_reach_the_transform(repo_root):
    """specknet_tracking's train.json knobs (not constants in code) build the transform; overrides reach it."""
    from monai.bundle import ConfigParser

    def built(overrides: dict) -> tuple[RandImpartialAffined, RandFrameSkipd]:
        parser = ConfigParser()
        parser.read_config(str(repo_root / "bundles" / "specknet_tracking" / "configs" / "train.json"))
        parser.update(overrides)
        c = parser.get_parsed_content("train#augmentation")
        return (next(x for x in c.transforms if isinstance(x, RandImpartialAffined)),
                next(x for x in c.transforms if isinstance(x, RandFrameSkipd)))

    aff, skip = built({})
    assert aff.scale_range == (0.8, 1.25) and aff.translate_range == (-0.1, 0.1)
    assert aff.shear_range == (-15.0, 15.0) and aff.rotate_range == (-120.0, 120.0)
    assert set(aff.component_probs.values()) == {0.5} and skip.min_frames is None and skip.max_skip == 5
    aff, skip = built({"scale_range": [0.9, 1.1], "translate_range": 0.05, "shear_range": 7.0, "rotate_range": 30.0,
                       "affine_prob": 0.25, "skip_min_frames": 6, "max_skip": 3})
    assert aff.scale_range == (0.9, 1.1) and aff.translate_range == (-0.05, 0.05)
    assert aff.shear_range == (-7.0, 7.0) and aff.rotate_range == (-30.0, 30.0)
    assert set(aff.component_probs.values()) == {0.25} and skip.min_frames == 6 and skip.max_skip == 3


IMAGE_AUGS = {
    "motion_blur": lambda p: RandMotionBlurd("video", prob=p),
    "sharpen": lambda p: RandSharpend("video", prob=p),
    "emboss": lambda p: RandEmbossd("video", prob=p),
    "brightness_contrast": lambda p: RandBrightnessContrastd("video", prob=p),
    "jpeg": lambda p: RandJPEGCompressiond("video", prob=p, quality=(10, 30)),
    "noise": lambda p: RandRelativeGaussianNoised("video", prob=p),
}


@pytest.mark.parametrize("name", list(IMAGE_AUGS))
def test_image_augmentations_share_parameters_keep_range_and_type(name):
    rng = np.random.default_rng(8)
    frame = (smooth_image(rng) * 200 + 20).round().astype(np.uint8)
    video = np.repeat(frame[None], 4, axis=0)
    tr = IMAGE_AUGS[name](1.0)
    tr.set_random_state(0)
    out = tr({"video": video})["video"]
    assert out.dtype == np.uint8 and out.shape == video.shape
    assert out.min() >= 20 and out.max() <= 220  # clipped into the clip's own range
    assert np.abs(out.astype(float) - video).mean() > 0.3, "augmentation did nothing"
    if name == "noise":
        assert not np.array_equal(out[0], out[1])  # fresh noise per frame, same level
        stds = (out.astype(float) - video).std(axis=(1, 2))
        assert stds.max() < 1.3 * stds.min()
    else:
        for t in range(1, 4):
            np.testing.assert_array_equal(out[t], out[0])
    # torch float in, torch float out, same values as the numpy path up to rounding
    tr.set_random_state(0)
    out_t = tr({"video": torch.as_tensor(video, dtype=torch.float32)})["video"]
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out, atol=0.51)
    off = IMAGE_AUGS[name](0.0)
    np.testing.assert_array_equal(off({"video": video})["video"], video)


def test_image_augmentation_effects():
    rng = np.random.default_rng(9)
    img = smooth_image(rng, sigma=1.5)[None]
    tv = lambda x: np.abs(np.diff(x, axis=-1)).mean() + np.abs(np.diff(x, axis=-2)).mean()  # noqa: E731
    for seed in range(3):
        blur = RandMotionBlurd("x", prob=1.0, kernel_size=(9, 9))
        blur.set_random_state(seed)
        assert tv(blur({"x": img})["x"]) < 0.8 * tv(img)
        sharp = RandSharpend("x", prob=1.0, amount=(1.0, 1.0))
        sharp.set_random_state(seed)
        assert tv(sharp({"x": img * 0.5 + 0.25})["x"]) > 1.3 * tv(img * 0.5 + 0.25)
    bc = RandBrightnessContrastd("x", prob=1.0, brightness=0.1, contrast=0.3, value_range=(-10, 10))
    bc.set_random_state(1)
    out = bc({"x": img})["x"]
    slope, intercept = np.polyfit(img.ravel(), out.ravel(), 1)
    np.testing.assert_allclose(slope, bc.contrast, rtol=1e-4)
    np.testing.assert_allclose(out, (img - img.mean()) * bc.contrast + img.mean() + bc.brightness * 20, atol=1e-5)
    noise = RandRelativeGaussianNoised("x", prob=1.0, std=(0.05, 0.05), value_range=(-10, 10))
    noise.set_random_state(2)
    resid = noise({"x": img})["x"] - img
    np.testing.assert_allclose(resid.std(), 0.05 * 20, rtol=0.05)


def test_jpeg_like_compression_matches_a_real_jpeg_codec():
    """Independent reference: Pillow's libjpeg at the same quality (standard tables, IJG quality scaling)."""
    rng = np.random.default_rng(10)
    img = (smooth_image(rng, 64, 96, sigma=1.2) * 255).round().astype(np.uint8)
    errs = {}
    for q in (15, 50, 85):
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=q)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float64)
        ours = jpeg_like_compress(img.astype(np.float32), q, 0.0, 255.0).astype(np.float64)
        codec_err = np.sqrt(np.mean((ref - img) ** 2))
        ours_err = np.sqrt(np.mean((ours - img) ** 2))
        assert np.sqrt(np.mean((ours - ref) ** 2)) < 0.35 * codec_err, q
        assert abs(ours_err - codec_err) < 0.25 * codec_err, q
        errs[q] = ours_err
    assert errs[15] > errs[50] > errs[85] > 0
