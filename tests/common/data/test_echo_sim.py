"""Tests of the echocardiography simulator: ground-truth consistency, physiology, speckle, knobs, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from common.data.synthetic.echo import (
    EchoSequence,
    plot_echo_sequence,
    simulate_echo_sequence,
)
from common.data.synthetic.echo_anatomy import EchoAnatomy, contraction, sample_patient_params, sample_view_params
from common.metrics.tracking import global_longitudinal_strain, polyline_length

SIZE = (224, 256)  # non-square, so any H/W mix-up shows


@pytest.fixture(scope="module")
def seqs() -> dict[str, EchoSequence]:
    return {view: simulate_echo_sequence(3, view=view, n_frames=20, image_size=SIZE) for view in ("2CH", "4CH")}


@pytest.fixture(scope="module")
def sick() -> EchoSequence:
    return simulate_echo_sequence(3, view="4CH", n_frames=20, image_size=SIZE, pathology=1.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _sector_mask(seq: EchoSequence) -> np.ndarray:
    return seq._sim.sector


def test_shapes_types_and_geometry(seqs):
    for view, s in seqs.items():
        T, (H, W) = 20, SIZE
        assert s.view == view and s.n_frames == T
        assert s.images.shape == (T, H, W) and s.images.dtype == np.float32
        assert s.labels.shape == (T, H, W) and s.labels.dtype == np.uint8
        assert s.tracks.shape == (T, 32, 2) and s.tracks.dtype == np.float32
        assert s.visible.shape == (T, 32) and s.visible.dtype == bool
        assert 0.0 <= s.images.min() and s.images.max() <= 1.0
        assert set(np.unique(s.labels)) == {0, 1, 2, 3}
        sector = _sector_mask(s)
        assert (s.images[:, ~sector] == 0).all() and (s.labels[:, ~sector] == 0).all()
        assert s.images[:, sector].mean() > 0.1
        # sector apex at the top centre: the first rows are only lit near the middle column
        lit_cols = np.flatnonzero(sector[2])
        assert abs(lit_cols.mean() - (W - 1) / 2) < 2 and lit_cols.size < 12
        # apex at the top: the myocardium starts above the LV, the LV above the LA
        rows = {k: np.flatnonzero((s.labels[0] == k).any(1)) for k in (1, 2, 3)}
        assert rows[2].min() < rows[1].min() < rows[3].min() and rows[1].max() < rows[3].max()
        assert s.spacing[0] == s.spacing[1] and 0.3 < s.spacing[0] < 1.5
        assert s.ed_frame == 0 and 0 < s.es_frame < T - 1
        json.dumps(s.params)  # JSON-serialisable
        assert s.params["patient"]["heart_rate"] > 0


def test_both_views_share_the_patient(seqs):
    a, b = seqs["2CH"].params["patient"], seqs["4CH"].params["patient"]
    assert a == b
    assert abs(seqs["2CH"].gls - seqs["4CH"].gls) < 1.5


def test_determinism():
    a = simulate_echo_sequence(11, view="2CH", n_frames=4, image_size=(96, 96), noise=0.3, dropout=0.5)
    b = simulate_echo_sequence(11, view="2CH", n_frames=4, image_size=(96, 96), noise=0.3, dropout=0.5)
    c = simulate_echo_sequence(12, view="2CH", n_frames=4, image_size=(96, 96), noise=0.3, dropout=0.5)
    for name in ("images", "labels", "tracks", "visible"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.gls == b.gls and a.params == b.params
    assert not np.array_equal(a.images, c.images) and a.gls != c.gls


@pytest.mark.parametrize("which", ["2CH", "4CH", "sick"])
def test_true_displacement_warps_masks(seqs, sick, which):
    s = sick if which == "sick" else seqs[which]
    T, H, W = s.labels.shape
    gy, gx = np.mgrid[0:H, 0:W].astype(np.float64)

    def warp(t_from: int, t_to: int) -> np.ndarray:
        # backward warping: the pixel x of frame t_to comes from x + disp(t_to -> t_from) in frame t_from
        d = s.displacement(t_to, t_from)
        return ndimage.map_coordinates(s.labels[t_from], [gy + d[1], gx + d[0]], order=0)

    pairs = [(t, t + 1) for t in range(T - 1)] + [(0, s.es_frame), (s.es_frame, T - 1)]
    for t0, t1 in pairs:
        w = warp(t0, t1)
        for k in (1, 2, 3):
            assert _dice(w == k, s.labels[t1] == k) >= 0.95, (which, t0, t1, k)
    # the test can fail: without the displacement ED and ES masks differ clearly
    assert _dice(s.labels[0] == 1, s.labels[s.es_frame] == 1) < 0.9
    np.testing.assert_array_equal(s.displacement(5, 5), 0.0)


def test_displacement_agrees_with_tracks(seqs):
    s = seqs["4CH"]
    for t0, t1 in [(0, 1), (3, 9), (0, s.es_frame), (s.es_frame, 0)]:
        d = s.displacement(t0, t1)
        p = s.tracks[t0].astype(np.float64)
        moved = np.stack([ndimage.map_coordinates(d[c], [p[:, 1], p[:, 0]], order=1) for c in (0, 1)], 1)
        err = np.abs(p + moved - s.tracks[t1]).max()
        assert err < 0.15, (t0, t1, err)
        assert np.abs(s.tracks[t1] - s.tracks[t0]).max() > 0.5 or t0 == t1


def test_tracks_stay_in_the_myocardium(seqs, sick):
    for s in (*seqs.values(), sick):
        on_myo = []
        for t in range(s.n_frames):
            v = s.visible[t]
            x = np.round(s.tracks[t, v, 0]).astype(int)
            y = np.round(s.tracks[t, v, 1]).astype(int)
            on_myo.append(s.labels[t][y, x] == 2)
        frac = np.concatenate(on_myo).mean()
        assert frac >= 0.97, frac
        assert s.visible.mean() > 0.8
        # ordering: base (left) -> apex -> base (right); the apex point is the shallowest
        mid = s.tracks[0, :, 1].argmin()
        assert 0.3 * s.tracks.shape[1] < mid < 0.7 * s.tracks.shape[1]


def test_visibility_follows_the_sector():
    s = simulate_echo_sequence(5, view="2CH", n_frames=6, image_size=(128, 128), dropout=1.0)
    sector = s._sim.sector
    x = np.round(s.tracks[..., 0]).astype(int).clip(0, 127)
    y = np.round(s.tracks[..., 1]).astype(int).clip(0, 127)
    assert sector[y[s.visible], x[s.visible]].all()
    # moving points out of the sector by construction: shift the whole set sideways and re-test the rule
    shifted = s.tracks[0] + np.array([200.0, 0.0], dtype=np.float32)
    assert not s._sim.in_sector(shifted[:, 0], shifted[:, 1]).any()


def test_gls_normal_range_and_pathology(seqs):
    normal, sick = [], []
    for seed in range(4):
        a = simulate_echo_sequence(seed, view="4CH", n_frames=12, image_size=(96, 96))
        b = simulate_echo_sequence(seed, view="4CH", n_frames=12, image_size=(96, 96), pathology=1.0)
        normal.append(a.gls)
        sick.append(b.gls)
        assert -25.0 <= a.gls <= -10.0, (seed, a.gls)
        assert b.gls > a.gls + 1.5, (seed, a.gls, b.gls)
        assert 40.0 < a.ef < 75.0 and b.ef < a.ef
    assert np.std(normal) > 0.3  # patients differ
    s = seqs["2CH"]
    # the true GLS is that of the continuous centre line; the 32 tracked points' polyline differs from it by its
    # discretisation only (a few tenths of a point, see test_true_gls_is_the_arc_length_of_the_deformed_centre_line)
    tracked = global_longitudinal_strain(s.tracks, s.ed_frame, s.es_frame, s.spacing).gls
    assert 0.0 < abs(tracked - s.gls) < 0.5, (tracked, s.gls)
    lengths = polyline_length(s.tracks, s.spacing)
    assert lengths.argmin() == s.es_frame and lengths[-1] == pytest.approx(lengths[0], rel=1e-3)  # 1 cycle


def _anatomy(seed: int, view: str, pathology: float) -> EchoAnatomy:
    rng = np.random.default_rng(seed)
    patient = sample_patient_params(rng)
    return EchoAnatomy(patient, sample_view_params(rng, view, patient), pathology)


@pytest.mark.parametrize("view,pathology", [("2CH", 0.0), ("4CH", 1.0)])
def test_true_gls_is_the_arc_length_of_the_deformed_centre_line(view, pathology):
    """The reference GLS comes from the motion model (quadrature along the continuous line), not from tracks: it
    matches closed-form elliptic arcs at ED, a very dense polyline of the simulated tracks, and differs from the
    n-point polyline by exactly the discretisation a polyline has (chords shorter than arcs)."""
    from scipy.special import ellipeinc

    anat = _anatomy(7, view, pathology)
    a_l, b, t_end = anat._centre_line_shape()
    # ED (c = 0, Φ = identity): two elliptic arcs l = cL - a cos t, r = ±b sin t, t in [0, t_end]; with u = π/2 - t
    # the speed is a sqrt(1 - m sin² u), m = 1 - b²/a², so each arc is an incomplete elliptic integral
    m = {s: 1.0 - (b[s] / a_l) ** 2 for s in (-1, 1)}
    exact_ed = sum(a_l * (ellipeinc(np.pi / 2, m[s]) - ellipeinc(np.pi / 2 - t_end, m[s])) for s in (-1, 1))
    length_ed = anat.centre_line_length(0.0)
    assert length_ed == pytest.approx(exact_ed, rel=1e-9)
    length_es = anat.centre_line_length(1.0)
    assert length_es < 0.9 * length_ed  # the line shortens in systole

    # n-point polylines: shorter than the arc; at ED (a smooth curve) by sum(κ² h³ / 24), the chord error of each
    # segment; at ES the deformed line has kinks (the piecewise-linear longitudinal map), so the error shrinks more
    # slowly, but it shrinks towards the quadrature as n grows
    shortfall_es, gls_gap = [], []
    for n in (32, 64, 128):
        l, r = anat.centre_line(n)
        chord_ed = polyline_length(np.stack([l, r], -1))
        bm = np.where(0.5 * (r[1:] + r[:-1]) >= 0, b[1], b[-1])
        t = np.arccos((anat.cL - l) / a_l)
        tm = np.where(np.sign(r[1:]) != np.sign(r[:-1]), 0.0, 0.5 * (t[1:] + t[:-1]))  # the segment over the apex
        kappa = a_l * bm / (a_l**2 * np.sin(tm) ** 2 + bm**2 * np.cos(tm) ** 2) ** 1.5
        predicted = np.sum(kappa**2 * np.hypot(np.diff(l), np.diff(r)) ** 3 / 24.0)
        assert length_ed - chord_ed == pytest.approx(predicted, rel=0.05), n
        chord_es = polyline_length(np.stack(anat.forward(l, r, 1.0), -1))
        shortfall_es.append(1.0 - chord_es / length_es)
        gls_gap.append(100.0 * (chord_es / chord_ed - length_es / length_ed))
    assert all(v > 0 for v in shortfall_es) and shortfall_es[0] > shortfall_es[1] > shortfall_es[2]
    assert 1e-2 < abs(gls_gap[0]) < 1.0 and abs(gls_gap[0]) > abs(gls_gap[1]) > abs(gls_gap[2])

    # the simulator stores that reference: a very dense polyline of its own tracks gives the same GLS to ~0.1 %,
    # the default 32 tracks differ by their discretisation
    dense = simulate_echo_sequence(7, view=view, n_frames=8, image_size=(64, 64), n_track_points=4000,
                                   pathology=pathology)
    dense_gls = global_longitudinal_strain(dense.tracks, dense.ed_frame, dense.es_frame, dense.spacing).gls
    assert dense_gls == pytest.approx(dense.gls, rel=1e-3)
    c_es = float(contraction(dense.es_frame / (dense.n_frames - 1), dense.params["patient"]["systole"]))
    sim_anat = dense._sim.anat
    assert dense.gls == pytest.approx(
        100.0 * (sim_anat.centre_line_length(c_es) / sim_anat.centre_line_length(0.0) - 1.0), abs=1e-9)
    coarse = simulate_echo_sequence(7, view=view, n_frames=8, image_size=(64, 64), pathology=pathology)
    coarse_gls = global_longitudinal_strain(coarse.tracks, coarse.ed_frame, coarse.es_frame, coarse.spacing).gls
    assert coarse.gls == dense.gls and 1e-2 < abs(coarse_gls - coarse.gls) < 1.0


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


def _patch(img: np.ndarray, x: float, y: float, r: int = 7) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ndimage.map_coordinates(img, [yy + y, xx + x], order=1)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_speckle_is_trackable(seqs, noise):
    s = seqs["4CH"] if noise == 0.0 else simulate_echo_sequence(3, view="4CH", n_frames=20, image_size=SIZE,
                                                                noise=noise)
    on, off, moved, stayed = [], [], [], []
    for t in range(s.n_frames - 1):
        for i in np.flatnonzero(s.visible[t] & s.visible[t + 1]):
            ref = _patch(s.images[t], *s.tracks[t, i])
            x1, y1 = s.tracks[t + 1, i]
            on.append(_ncc(ref, _patch(s.images[t + 1], x1, y1)))
            off.append(np.mean([_ncc(ref, _patch(s.images[t + 1], x1 + dx, y1 + dy))
                                for dx, dy in ((5, 0), (-5, 0), (0, 5), (0, -5))]))
            if np.hypot(*(s.tracks[t + 1, i] - s.tracks[t, i])) > 1.5:
                # the speckle follows the point, it does not stay where the point was
                moved.append(on[-1])
                stayed.append(_ncc(ref, _patch(s.images[t + 1], *s.tracks[t, i])))
    on, off = np.mean(on), np.mean(off)
    assert on > 0.6 and on > off + 0.3, (on, off)
    assert len(moved) > 50 and np.mean(moved) > np.mean(stayed) + 0.3, (np.mean(moved), np.mean(stayed))


def test_speckle_moves_with_the_tissue(seqs):
    """Frame t+1 matches frame t warped by the true motion much better than frame t itself (inside the heart)."""
    s = seqs["2CH"]
    H, W = SIZE
    gy, gx = np.mgrid[0:H, 0:W].astype(np.float64)
    t0, t1 = 2, 3
    d = s.displacement(t1, t0)
    warped = ndimage.map_coordinates(s.images[t0], [gy + d[1], gx + d[0]], order=1)
    myo = ndimage.binary_erosion(s.labels[t1] == 2, iterations=2)
    assert _ncc(warped[myo], s.images[t1][myo]) > _ncc(s.images[t0][myo], s.images[t1][myo]) + 0.2


def test_severity_knobs():
    kw = dict(view="4CH", n_frames=3, image_size=(160, 160))
    base = simulate_echo_sequence(21, **kw)
    noisy = simulate_echo_sequence(21, noise=1.0, **kw)
    blurred = simulate_echo_sequence(21, blur=1.0, **kw)
    dropped = simulate_echo_sequence(21, dropout=1.0, **kw)
    lv = base.labels[0] == 1
    assert noisy.images[0][lv].mean() > base.images[0][lv].mean() + 0.05  # noise fills the blood pool
    myo = base.labels[0] == 2
    grad = [np.abs(np.diff(s.images[0], axis=1))[myo[:, 1:]].mean() for s in (base, blurred)]
    assert grad[1] < 0.8 * grad[0]  # wider PSF, smoother speckle
    sector = base._sim.sector
    assert dropped.images[0][sector].mean() < base.images[0][sector].mean() - 0.02  # rib shadow, weak walls
    np.testing.assert_array_equal(noisy.labels, base.labels)  # knobs change the appearance only


def test_half_cycle_ends_at_es():
    s = simulate_echo_sequence(4, view="2CH", n_frames=10, image_size=(96, 96), half_cycle=True)
    assert s.es_frame == 9
    lengths = polyline_length(s.tracks, s.spacing)
    assert np.all(np.diff(lengths) < 0)  # systole: the centre line shortens monotonically
    hr = s.params["patient"]["heart_rate"]
    assert s.fps == pytest.approx(9 / (s.params["patient"]["systole"] * 60.0 / hr))


def test_bad_arguments():
    with pytest.raises(ValueError, match="view"):
        simulate_echo_sequence(0, view="3CH")
    with pytest.raises(ValueError, match="n_frames"):
        simulate_echo_sequence(0, n_frames=1)
    with pytest.raises(ValueError, match="noise"):
        simulate_echo_sequence(0, noise=1.5)
    with pytest.raises(ValueError, match="pathology"):
        simulate_echo_sequence(0, pathology=-0.1, n_frames=2, image_size=(64, 64))
    s = simulate_echo_sequence(0, n_frames=2, image_size=(64, 64))
    with pytest.raises(ValueError, match="out of range"):
        s.displacement(0, 2)


def test_plot_writes_png(seqs, tmp_path):
    out = plot_echo_sequence(seqs["4CH"], tmp_path / "fig" / "echo.png")
    assert out.is_file() and out.stat().st_size > 20_000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="out of range"):
        plot_echo_sequence(seqs["4CH"], tmp_path / "bad.png", frames=[0, 99])
