"""Tests of the tracking metrics and GLS (common/metrics/tracking.py), the tracking loss (common/losses/tracking.py)
and the centre-line query points (common/data/centreline.py), against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.data.centreline import centreline_points_from_mask
from common.data.synthetic.echo import simulate_echo_sequence
from common.losses.tracking import TrackingL1Loss, tracking_l1_loss
from common.metrics.tracking import (
    evaluation_mask,
    global_longitudinal_strain,
    gls_mad,
    median_trajectory_error,
    polyline_length,
    position_accuracy,
    strain_curve,
    tracking_metrics,
)

# ---------------------------------------------------------------------------------------------------------------
# TAP-Vid position accuracy and MTE
# ---------------------------------------------------------------------------------------------------------------


def offsets_video(errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference tracks and predictions displaced along x by ``errors`` (T, N) pixels (256-scale when W = 256)."""
    t, n = errors.shape
    rng = np.random.default_rng(0)
    target = rng.uniform(20, 200, size=(t, n, 2))
    pred = target.copy()
    pred[..., 0] += errors
    return pred, target


def test_delta_thresholds_hand_computed():
    # query frame 0 for every point; frames 1..2 evaluated; point 3 invisible on frame 2
    errors = np.array([
        [99.0, 99.0, 99.0, 99.0],   # query frame: excluded whatever the error
        [0.5, 1.0, 3.0, 20.0],
        [1.5, 7.99, 16.0, 99.0],   # 99 sits on an invisible entry: excluded
    ])
    pred, target = offsets_video(errors)
    visible = np.ones((3, 4), dtype=bool)
    visible[2, 3] = False
    out = position_accuracy(pred, target, visible, 0, image_size=(256, 256))
    # evaluated errors: 0.5, 1.0, 3.0, 20.0, 1.5, 7.99, 16.0 (7 entries); strict '<'
    expected = {1: 1, 2: 3, 4: 4, 8: 5, 16: 5}
    for thr, count in expected.items():
        assert out[f"delta_{thr}"] == pytest.approx(100 * count / 7)
    assert out["delta_avg"] == pytest.approx(100 * sum(expected.values()) / 35)


def test_coordinates_are_rescaled_to_256():
    # a 512 x 1024 (H x W) video: an x error of 4 px is 1 px at 256 scale, a y error of 4 px is 2 px
    target = np.zeros((2, 2, 2))
    pred = target.copy()
    pred[1, 0, 0] = 4.0
    pred[1, 1, 1] = 4.0
    out = tracking_metrics(pred, target, np.ones((2, 2), bool), 0, image_size=(512, 1024))
    assert out["delta_1"] == 0.0 and out["delta_2"] == 50.0 and out["delta_4"] == 100.0
    assert out["mte"] == pytest.approx(1.5)
    raw = tracking_metrics(pred, target, np.ones((2, 2), bool), 0, image_size=None, tapvid_size=None)
    assert raw["mte"] == pytest.approx(4.0)


def test_mte_is_mean_of_per_trajectory_medians():
    errors = np.array([
        [50.0, 50.0],
        [1.0, 1.0],
        [2.0, 3.0],
        [10.0, 5.0],
        [0.0, 7.0],
    ])
    pred, target = offsets_video(errors)
    visible = np.ones((5, 2), dtype=bool)
    visible[4, 0] = False  # point 0: frames 1-3 -> median of (1, 2, 10) = 2
    # point 1 (query frame 0): frames 1-4 -> median of (1, 3, 5, 7) = 4
    mte = median_trajectory_error(pred, target, visible, 0, image_size=(256, 256))
    assert mte == pytest.approx(3.0)
    # a pooled median over all entries would be 3 as well here; make the trajectories unequal to tell them apart
    visible[1:4, 0] = [True, False, False]  # point 0 now only has error 1 -> median 1; mean(1, 4) = 2.5
    assert median_trajectory_error(pred, target, visible, 0, image_size=(256, 256)) == pytest.approx(2.5)


def test_per_point_query_frames_are_excluded():
    errors = np.full((4, 3), 0.5)
    query = np.array([0, 2, 3])
    for n, q in enumerate(query):
        errors[q, n] = 1000.0  # only the query frames are wrong
    pred, target = offsets_video(errors)
    out = tracking_metrics(pred, target, np.ones((4, 3), bool), query, image_size=(256, 256))
    assert out["delta_1"] == 100.0 and out["mte"] == pytest.approx(0.5)
    mask = evaluation_mask(np.ones((4, 3), bool), query)
    assert mask.sum() == 9 and not mask[query, np.arange(3)].any()
    # wrong query frames would evaluate the bad entries
    assert tracking_metrics(pred, target, np.ones((4, 3), bool), 1, image_size=(256, 256))["delta_16"] < 100.0


def test_invisible_points_are_excluded():
    errors = np.array([[0.0, 0.0], [0.5, 500.0], [0.5, 500.0]])
    pred, target = offsets_video(errors)
    visible = np.array([[True, True], [True, False], [True, False]])
    out = tracking_metrics(pred, target, visible, 0, image_size=(256, 256))
    assert out["delta_avg"] == 100.0 and out["mte"] == pytest.approx(0.5)
    out_all = tracking_metrics(pred, target, np.ones((3, 2), bool), 0, image_size=(256, 256))
    assert out_all["delta_avg"] == 50.0


def test_batch_is_averaged_per_video_and_matches_single_videos():
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 128, size=(2, 5, 4, 2))
    pred = target + rng.normal(0, 2.0, size=target.shape)
    visible = rng.random((2, 5, 4)) > 0.3
    visible[1] = False
    visible[1, :, 0] = True  # video 1 has few evaluated entries: per-video and pooled means differ
    query = np.array([[0, 1, 2, 3], [4, 4, 4, 4]])
    per_video = tracking_metrics(pred, target, visible, query, image_size=(128, 128), reduction="none")
    for b in range(2):
        single = tracking_metrics(pred[b], target[b], visible[b], query[b], image_size=(128, 128))
        for key, value in single.items():
            assert per_video[key][b] == pytest.approx(value)
    mean = tracking_metrics(pred, target, visible, query, image_size=(128, 128))
    for key in mean:
        assert mean[key] == pytest.approx(float(np.mean(per_video[key])))
    # torch inputs give the same numbers
    as_torch = tracking_metrics(torch.tensor(pred), torch.tensor(target), torch.tensor(visible), torch.tensor(query),
                                image_size=(128, 128))
    assert as_torch == pytest.approx(mean)


def test_video_without_evaluated_entries_is_nan():
    target = np.zeros((3, 2, 2))
    visible = np.zeros((3, 2), dtype=bool)
    visible[0] = True  # visible only on the query frame
    out = tracking_metrics(target, target, visible, 0, image_size=(64, 64))
    assert all(math.isnan(v) for v in out.values())


def test_metric_input_errors():
    target = np.zeros((3, 2, 2))
    with pytest.raises(ValueError, match="query_frames must lie"):
        tracking_metrics(target, target, np.ones((3, 2), bool), 3, image_size=(64, 64))
    with pytest.raises(ValueError, match="image_size"):
        tracking_metrics(target, target, np.ones((3, 2), bool), 0, image_size=None)
    with pytest.raises(ValueError, match="visible must have shape"):
        tracking_metrics(target, target, np.ones((2, 2), bool), 0, image_size=(64, 64))


# ---------------------------------------------------------------------------------------------------------------
# GLS and the strain curve
# ---------------------------------------------------------------------------------------------------------------


def centre_line(n: int = 12) -> np.ndarray:
    th = np.linspace(-0.45 * np.pi, 1.45 * np.pi, n)
    return np.stack([100 + 30 * np.cos(th), 120 - 70 * np.sin(th)], axis=-1)  # horseshoe, apex at the top


def test_gls_of_a_uniformly_contracted_polyline():
    base = centre_line()
    centre = np.array([90.0, 110.0])  # contraction about any point scales every length
    scales = np.array([1.0, 0.95, 0.85, 0.9, 1.0])
    tracks = centre + scales[:, None, None] * (base - centre)
    res = global_longitudinal_strain(tracks)
    assert res.gls == pytest.approx(-15.0, abs=1e-9)
    assert res.ed_frame == 0 and res.es_frame == 2
    np.testing.assert_allclose(res.strain, 100 * (scales - 1), atol=1e-9)
    np.testing.assert_allclose(strain_curve(tracks), res.strain)
    assert global_longitudinal_strain(tracks, es_frame=3).gls == pytest.approx(-10.0)
    assert global_longitudinal_strain(tracks, ed_frame=2, es_frame=0).gls == pytest.approx(100 * (1 / 0.85 - 1))
    # isotropic spacing changes lengths, not strain
    assert global_longitudinal_strain(tracks, spacing=0.3).gls == pytest.approx(-15.0)


def test_gls_depends_on_the_order_of_the_points():
    """Why GLS needs declared ordered centre-line points: the same tracked points, listed in another order, give
    another strain under a motion that is not a pure scaling (here the septal wall shortens by 30 % towards the apex,
    the lateral wall stays)."""
    base = centre_line()
    apex_y = base[:, 1].min()
    es = base.copy()
    septum = base[:, 0] < 100
    es[septum, 1] = apex_y + 0.7 * (base[septum, 1] - apex_y)
    tracks = np.stack([base, es])
    ordered = global_longitudinal_strain(tracks, es_frame=1).gls
    shuffled = global_longitudinal_strain(tracks[:, np.random.default_rng(0).permutation(len(base))], es_frame=1).gls
    assert -15.0 < ordered < -8.0 and abs(shuffled - ordered) > 4.0, (ordered, shuffled)


def test_polyline_length_and_anisotropic_spacing():
    pts = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
    assert polyline_length(pts) == pytest.approx(7.0)
    assert polyline_length(pts, spacing=(2.0, 0.5)) == pytest.approx(3 * 0.5 + 4 * 2.0)  # (row, col) mm/px
    assert polyline_length(np.stack([pts, 2 * pts])).tolist() == pytest.approx([7.0, 14.0])
    with pytest.raises(ValueError, match="N >= 2"):
        polyline_length(pts[:1])


def test_gls_mad():
    assert gls_mad([-15.0, -12.0, -20.0], [-14.0, -14.0, -20.0]) == pytest.approx(1.0)
    assert gls_mad(-10.0, -13.5) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="equal length"):
        gls_mad([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------------------


def test_weighted_l1_loss_hand_computed():
    target = torch.zeros(1, 3, 2, 2)
    pred = torch.zeros(1, 3, 2, 2, requires_grad=True)
    with torch.no_grad():
        pred[0, 1, 0] = torch.tensor([2.0, 4.0])  # mean |d| = 3
        pred[0, 2, 1] = torch.tensor([1.0, 0.0])  # 0.5
        pred[0, 2, 0] = torch.tensor([100.0, 100.0])  # invisible
        pred[0, 0, 1] = torch.tensor([8.0, 8.0])  # query frame of point 1
    visible = torch.tensor([[[True, True], [True, True], [False, True]]])
    loss = tracking_l1_loss(pred, target, visible)
    assert loss.item() == pytest.approx((3 + 0.5 + 8) / 5)
    q = torch.tensor([[2, 0]])  # point 0 queried on frame 2 (invisible anyway), point 1 on frame 0
    loss_q = TrackingL1Loss()(pred, target, visible, q)
    assert loss_q.item() == pytest.approx((3 + 0.5) / 4)
    assert tracking_l1_loss(pred, target, visible, reduction="sum").item() == pytest.approx(11.5)
    loss_q.backward()
    assert pred.grad[0, 2, 0].abs().sum() == 0 and pred.grad[0, 0, 1].abs().sum() == 0  # excluded entries
    assert pred.grad[0, 1, 0].abs().sum() > 0


def test_loss_without_visible_points_is_zero_and_differentiable():
    pred = torch.randn(2, 3, 4, 2, requires_grad=True)
    loss = tracking_l1_loss(pred, torch.zeros(2, 3, 4, 2), torch.zeros(2, 3, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    with pytest.raises(ValueError, match="visible must have shape"):
        tracking_l1_loss(pred, pred, torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# centre-line query points from a mask
# ---------------------------------------------------------------------------------------------------------------


def horseshoe(h=160, w=128, c=(64.0, 90.0), inner=(20.0, 60.0), outer=(28.0, 68.0), cut=110):
    """Label map (0 bg, 1 LV, 2 Myo) of an elliptic myocardial horseshoe, apex at the top, open at the base."""
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    ri = ((xx - c[0]) / inner[0]) ** 2 + ((yy - c[1]) / inner[1]) ** 2
    ro = ((xx - c[0]) / outer[0]) ** 2 + ((yy - c[1]) / outer[1]) ** 2
    lab = np.zeros((h, w), np.uint8)
    lab[(ro <= 1) & (ri > 1) & (yy <= cut)] = 2
    lab[(ri <= 1) & (yy <= cut)] = 1
    return lab


def test_centreline_points_lie_mid_wall_ordered_and_equidistant():
    lab = horseshoe()
    pts = centreline_points_from_mask(lab, 20)
    assert pts.shape == (20, 2) and pts.dtype == np.float32
    rows, cols = np.round(pts[:, 1]).astype(int), np.round(pts[:, 0]).astype(int)
    assert (lab[rows, cols] == 2).all()
    # distance to the mid-wall ellipse (semi-axes halfway between endo- and epicardium)
    th = np.linspace(0, 2 * np.pi, 20000)
    mid = np.stack([64 + 24 * np.cos(th), 90 + 64 * np.sin(th)], -1)
    dist = np.sqrt(((pts[:, None] - mid[None]) ** 2).sum(-1)).min(1)
    assert dist.max() < 0.6
    # order: left base -> apex -> right base; the whole wall is covered
    assert pts[0, 0] < 64 < pts[-1, 0]
    assert pts[0, 1] > 95 and pts[-1, 1] > 95
    apex = int(np.argmin(pts[:, 1]))
    assert apex in (9, 10) and pts[apex, 1] < 30
    steps = np.hypot(*np.diff(pts, axis=0).T)
    assert steps.std() / steps.mean() < 0.05
    # mirror symmetry: the mirrored mask gives the mirrored points in the same left-to-right order
    mirrored = centreline_points_from_mask(lab[:, ::-1], 20)
    flipped = np.stack([127 - pts[::-1, 0], pts[::-1, 1]], -1)
    np.testing.assert_allclose(mirrored, flipped, atol=1.0)


def test_centreline_matches_the_simulator_reference_line():
    seq = simulate_echo_sequence(0, view="4CH", n_frames=4, image_size=(128, 128), n_track_points=24)
    label = torch.as_tensor(seq.labels[seq.ed_frame])[None]  # channel-first torch mask works too
    pts = centreline_points_from_mask(label, 24)
    ref = seq.tracks[seq.ed_frame]
    err = np.linalg.norm(pts - ref, axis=-1)  # same index: same ordering and spacing
    assert err.mean() < 1.5 and err.max() < 3.0
    assert (seq.labels[seq.ed_frame][np.round(pts[:, 1]).astype(int), np.round(pts[:, 0]).astype(int)] == 2).all()


def test_centreline_errors():
    with pytest.raises(ValueError, match="myocardium label"):
        centreline_points_from_mask(np.zeros((32, 32), np.uint8), 10)
    with pytest.raises(ValueError, match="n_points"):
        centreline_points_from_mask(horseshoe(), 1)
    with pytest.raises(ValueError, match="2D"):
        centreline_points_from_mask(np.zeros((2, 8, 8, 8)), 10)
