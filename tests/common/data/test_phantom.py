"""Speckle phantom generator: deterministic, exact trajectories of the motion model, fully developed speckle that
moves with the tracks, and files the tracking reader loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.synthetic.phantom import (
    PhantomParams,
    draw_phantom_params,
    phantom_training_datalist,
    phantom_training_set,
    simulate_phantom,
    write_phantom_h5,
)
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


# ----------------------------------------------------------------------------------------------------------------
# the cached training set (phantoms mixed into SpeckNet training) and the cache it shares with the synthetic default


def test_training_set_is_cached_deterministic_and_redone_after_an_interruption(tmp_path, monkeypatch):
    import common.data.synthetic.phantom as phantom

    kw = dict(image_size=32, n_frames=5, n_points=4)
    root = phantom_training_set(2, seed=0, cache_dir=tmp_path / "a", **kw)
    assert sorted(p.name for p in root.glob("*.h5")) == ["phantom0001.h5", "phantom0002.h5"]
    marker = root / ".synthetic-complete"
    stamp = marker.stat().st_mtime_ns
    assert phantom_training_set(2, seed=0, cache_dir=tmp_path / "a", **kw) == root
    assert marker.stat().st_mtime_ns == stamp  # reused, not regenerated
    again = phantom_training_set(2, seed=0, cache_dir=tmp_path / "b", **kw)
    np.testing.assert_array_equal(read_tracking_h5(again / "phantom0002.h5")["video"],
                                  read_tracking_h5(root / "phantom0002.h5")["video"])
    assert phantom_training_set(3, seed=0, cache_dir=tmp_path / "a", **kw) != root  # (n, seed, size, frames) name it

    real_writer = phantom.write_phantom_h5

    def interrupted(out, **kwargs):
        real_writer(out, **{**kwargs, "n_videos": 1})
        raise KeyboardInterrupt  # killed after the first video

    monkeypatch.setattr(phantom, "write_phantom_h5", interrupted)
    with pytest.raises(KeyboardInterrupt):
        phantom_training_set(2, seed=0, cache_dir=tmp_path / "c", **kw)
    assert not any(p.name.startswith("phantom-train") for p in (tmp_path / "c").iterdir())  # nothing half-final
    monkeypatch.setattr(phantom, "write_phantom_h5", real_writer)
    redone = phantom_training_set(2, seed=0, cache_dir=tmp_path / "c", **kw)
    assert len(list(redone.glob("*.h5"))) == 2 and (redone / ".synthetic-complete").is_file()
    assert phantom_training_datalist(0) == []
    with pytest.raises(ValueError, match="phantom_videos must be >= 0"):
        phantom_training_datalist(-1)


def test_an_older_cache_layout_is_regenerated(tmp_path, monkeypatch):
    """A synthetic tracking default cached before files carried ``centreline_ordered`` is rebuilt, not trusted."""
    import h5py

    from common.data.default import CACHE_VERSIONS, default_dataset_dir, ensure_dataset, generate_once

    monkeypatch.setenv("CARDIAC_DATA_DIR", str(tmp_path / "cache"))
    tiny = dict(n_videos=1, image_size=(32, 32), n_frames=4, n_points=4)
    root = Path(ensure_dataset(None, "tracking", **tiny))
    assert root == Path(default_dataset_dir("tracking")) and CACHE_VERSIONS["tracking"] >= 2
    # turn it into what the previous release left: no attribute, a marker without a version
    with h5py.File(root / "video0001.h5", "a") as f:
        del f.attrs["centreline_ordered"]
    (root / ".synthetic-complete").write_text("tracking seed=0 {}\n")
    assert "centreline_ordered" not in read_tracking_h5(root / "video0001.h5")
    assert Path(ensure_dataset(None, "tracking", **tiny)) == root
    assert read_tracking_h5(root / "video0001.h5")["centreline_ordered"] is True
    assert f"version={CACHE_VERSIONS['tracking']}" in (root / ".synthetic-complete").read_text()

    calls = []
    generate_once(tmp_path / "x", lambda d: (d.mkdir(), calls.append(1)), "x", version=3)
    generate_once(tmp_path / "x", lambda d: (d.mkdir(), calls.append(2)), "x", version=3)  # current: reused
    assert calls == [1]
    (tmp_path / "foreign").mkdir()
    with pytest.raises(FileExistsError, match="foreign"):
        generate_once(tmp_path / "foreign", lambda d: d.mkdir(), "x")


def test_phantom_videos_join_the_training_datalist_only(tmp_path, monkeypatch, repo_root):
    """``--phantom_videos 2``: two more training entries that go through the training preprocessing; validation and
    test are unchanged."""
    from monai.bundle import ConfigParser

    from common.data.default import default_dataset_dir, generate_dataset

    monkeypatch.setenv("CARDIAC_DATA_DIR", str(tmp_path / "cache"))
    generate_dataset("tracking", default_dataset_dir("tracking"), n_videos=5, image_size=(48, 48), n_frames=10,
                     n_points=6, progress=False)

    def parsed(**overrides):
        parser = ConfigParser()
        parser.read_config(str(repo_root / "bundles" / "specknet_tracking" / "configs" / "train.json"))
        parser.update({"spatial_size": 32, "clip_len": 8, **overrides})
        return parser

    base = parsed()
    mixed = parsed(phantom_videos=2, phantom_size=40, phantom_frames=10)
    train0, train2 = base.get_parsed_content("train#datalist"), mixed.get_parsed_content("train#datalist")
    assert len(train2) == len(train0) + 2 and train2[: len(train0)] == train0
    extra = train2[len(train0):]
    assert all(e["id"].startswith("phantom/") and e["split"] == "train" for e in extra)
    assert Path(extra[0]["video"]).is_relative_to(tmp_path / "cache")  # cached beside the synthetic default
    assert mixed.get_parsed_content("validate#datalist") == base.get_parsed_content("validate#datalist")
    assert not any("phantom" in e["id"] for e in mixed.get_parsed_content("validate#datalist"))
    from common.transforms.video import overlapping_segments

    n_clips = len(base.get_parsed_content("train#clips")) + sum(len(overlapping_segments(10, 8, 0.5)) for _ in extra)
    assert len(mixed.get_parsed_content("train#clips")) == n_clips
    pre = mixed.get_parsed_content("train#preprocessing")
    for e in extra:
        out = pre(dict(e))
        assert out["image"].shape == (1, 8, 32, 32) and np.abs(out["image"]).max() <= 1.0
        assert out["label"].shape == (8, 32, 3) and np.isfinite(out["label"]).all() and out["label"][..., 2].sum() > 0
        assert out["query_points"].shape == (32, 2) and out["dataset"] == "phantom"
