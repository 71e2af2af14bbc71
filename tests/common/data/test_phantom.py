"""Speckle phantom generator: deterministic, exact trajectories of the motion model, fully developed speckle that
moves with the tracks, and files the tracking reader loads."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.synthetic.phantom import PhantomParams, draw_phantom_params, simulate_phantom, write_phantom_h5
from common.data.tracking import read_tracking_h5, tracking_datalist

SIZE = (96, 96)


def _centre(p: PhantomParams) -> np.ndarray:
    return np.array([(SIZE[1] - 1) / 2 + p.centre_offset[0], (SIZE[0] - 1) / 2 + p.centre_offset[1]])


def _s(p: PhantomParams, times: np.ndarray) -> np.ndarray:
    return 0.5 * (1 - np.cos(2 * np.pi * p.motion_hz * times))


def test_deterministic_per_seed_and_video_index(tmp_path):
    kw = dict(image_size=SIZE, n_frames=6, n_points=8, progress=False)
    write_phantom_h5(tmp_path / "a", n_videos=2, seed=3, **kw)
    write_phantom_h5(tmp_path / "b", n_videos=1, seed=3, **kw)
    write_phantom_h5(tmp_path / "c", n_videos=1, seed=4, **kw)
    a, b, c = (read_tracking_h5(tmp_path / d / "phantom0001.h5") for d in "abc")
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_array_equal(a["tracks"], b["tracks"])
    assert not np.array_equal(a["video"], c["video"])
    assert not np.array_equal(a["video"], read_tracking_h5(tmp_path / "a" / "phantom0002.h5")["video"])


@pytest.mark.parametrize("motion", ["rotation", "contraction", "translation"])
def test_trajectories_follow_the_motion_model(motion):
    p = draw_phantom_params(5, motion, amplitude=8.0, fps=30.0)
    sim = simulate_phantom(5, p, n_frames=12, image_size=SIZE, n_points=10)
    tr = sim["tracks"].astype(np.float64)
    s = _s(p, np.arange(12) / 30.0)[:, None]
    r_ref = 0.3 * min(SIZE)
    rel = tr - _centre(p)
    r, ang = np.hypot(rel[..., 0], rel[..., 1]), np.arctan2(rel[..., 1], rel[..., 0])
    dang = np.angle(np.exp(1j * (ang - ang[:1])))
    if motion == "rotation":  # radius kept, angle grows by amplitude / r_ref * s(t)
        np.testing.assert_allclose(r, np.broadcast_to(r[:1], r.shape), atol=1e-3)
        np.testing.assert_allclose(dang, np.broadcast_to(8.0 / r_ref * s, dang.shape), atol=1e-4)
    elif motion == "contraction":  # angle kept, radius scaled by 1 - amplitude / r_ref * s(t)
        np.testing.assert_allclose(dang, 0.0, atol=1e-4)
        np.testing.assert_allclose(r / r[:1], np.broadcast_to(1 - 8.0 / r_ref * s, r.shape), atol=1e-5)
    else:  # every point moves by the same vector, of length amplitude * s(t)
        d = tr - tr[:1]
        np.testing.assert_allclose(d, np.broadcast_to(d[:, :1], d.shape), atol=1e-4)
        np.testing.assert_allclose(np.hypot(d[:, 0, 0], d[:, 0, 1]), 8.0 * s[:, 0], atol=1e-4)
    assert np.abs(tr[-1] - tr[0]).max() > 1.0  # it does move


def test_speckle_is_fully_developed_rayleigh():
    # dense scatterers: the envelope is Rayleigh, whose mean / std is sqrt(pi / (4 - pi)) = 1.913
    p = draw_phantom_params(2, "rotation", amplitude=2.0, density=4.0)
    env = simulate_phantom(2, p, n_frames=2, image_size=(128, 128), n_points=4, return_envelope=True)["envelope"]
    inner = env[:, 16:-16, 16:-16].astype(np.float64)
    snr = inner.mean() / inner.std()
    assert abs(snr - np.sqrt(np.pi / (4 - np.pi))) < 0.1, snr
    # a sparse field is not fully developed: its envelope is far more variable
    sparse = draw_phantom_params(2, "rotation", amplitude=2.0, density=0.01)
    env = simulate_phantom(2, sparse, n_frames=2, image_size=(128, 128), n_points=4, return_envelope=True)
    inner = env["envelope"][:, 16:-16, 16:-16].astype(np.float64)
    assert inner.mean() / inner.std() < 1.5


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_speckle_moves_with_the_true_tracks():
    p = draw_phantom_params(9, "mixed", amplitude=10.0, fps=30.0)
    sim = simulate_phantom(9, p, n_frames=8, image_size=SIZE, n_points=12)
    v, tr = sim["video"].astype(np.float64), sim["tracks"]
    on, off = [], []
    for t in range(1, 8):
        for k in range(12):
            x0, y0 = np.round(tr[t - 1, k]).astype(int)
            x1, y1 = np.round(tr[t, k]).astype(int)
            patch = v[t - 1, y0 - 6:y0 + 7, x0 - 6:x0 + 7]
            on.append(_ncc(patch, v[t, y1 - 6:y1 + 7, x1 - 6:x1 + 7]))
            off.append(_ncc(patch, v[t, y1 - 6 + 4:y1 + 7 + 4, x1 - 6 + 4:x1 + 7 + 4]))
    assert np.mean(on) > 0.8 and np.mean(off) < 0.2, (np.mean(on), np.mean(off))


def test_files_read_back_through_the_tracking_reader(tmp_path):
    write_phantom_h5(tmp_path, n_videos=2, seed=0, motion="contraction", amplitude=6.0, image_size=SIZE,
                     n_frames=5, n_points=7, progress=False)
    dl = tracking_datalist(tmp_path, split=None)
    assert [d["id"] for d in dl] == ["phantom0001", "phantom0002"]
    assert all(d["n_frames"] == 5 and d["n_points"] == 7 and d["gls_reference"] is None for d in dl)
    data = read_tracking_h5(dl[0]["video"])
    assert data["video"].shape == (5, *SIZE) and data["tracks"].shape == (5, 7, 2) and data["visible"].all()
    assert data["centreline_ordered"] is False and data["motion"] == "contraction" and data["amplitude_px"] == 6.0
    # es_frame is the frame of peak motion: where the points are farthest from their frame-0 positions
    disp = np.abs(data["tracks"] - data["tracks"][:1]).sum(axis=(1, 2))
    assert data["es_frame"] == int(np.argmax(disp))


def test_bad_knobs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown motion 'spin'"):
        write_phantom_h5(tmp_path, n_videos=1, motion="spin", progress=False)
    with pytest.raises(ValueError, match="amplitude"):
        draw_phantom_params(0, "rotation", amplitude=(5.0, 1.0))
