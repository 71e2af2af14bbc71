"""NCC block-matching baseline: tracks speckle phantoms far better than zero motion, sub-pixel accurate, same
calling convention as the SpeckNet bundle adapter, and selectable with ``--tracker ncc`` in the bundle configs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.data.synthetic.phantom import (
    draw_phantom_params,
    log_compress,
    render_envelope,
    simulate_phantom,
    write_phantom_h5,
)
from common.engines.ncc_tracker import NCCTracker, TrackerCheckpoint, ncc_track_video, select_tracker
from common.metrics.tracking import tracking_metrics


@pytest.mark.parametrize("motion", ["rotation", "contraction", "translation", "mixed"])
def test_ncc_beats_zero_motion_on_phantoms(motion):
    p = draw_phantom_params(11, motion, amplitude=14.0, fps=25.0)
    sim = simulate_phantom(11, p, n_frames=20, image_size=(128, 128), n_points=16)
    q = 10
    tracks, conf = ncc_track_video(torch.from_numpy(sim["video"]).float(), torch.from_numpy(sim["tracks"][q]), q)
    zero = np.broadcast_to(sim["tracks"][q], sim["tracks"].shape)
    m = tracking_metrics(tracks.numpy(), sim["tracks"], sim["visible"], q, (128, 128))
    mz = tracking_metrics(zero, sim["tracks"], sim["visible"], q, (128, 128))
    assert m["delta_avg"] > mz["delta_avg"] + 15 and m["mte"] < 0.25 * mz["mte"], (m, mz)
    assert float(conf[q].min()) == 1.0 and float(conf.mean()) > 0.5


def _shifted_pair(shift: tuple[float, float]) -> np.ndarray:
    p = draw_phantom_params(1, "translation", amplitude=0.0)
    rng = np.random.default_rng(0)
    xy = rng.uniform(-20, 148, size=(60000, 2))
    amp = rng.standard_normal(60000)
    envs = [render_envelope(xy + np.array(d), amp, (128, 128), p) for d in ((0.0, 0.0), shift)]
    ref = float(np.quantile(envs[0], 0.995))
    return np.stack([log_compress(e, 40.0, ref) for e in envs])


@pytest.mark.parametrize("shift", [(0.3, 0.0), (0.0, -0.3)])
def test_subpixel_translation(shift):
    video = torch.from_numpy(_shifted_pair(shift)).float()
    g = torch.linspace(30, 98, 5)
    pts = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    tracks, _ = ncc_track_video(video, pts, 0)
    err = (tracks[1] - pts - torch.tensor(shift)).norm(dim=-1)
    # zero motion would be 0.3 px off, integer block matching too: the parabolic peak gets well below that
    assert float(err.mean()) < 0.08, err


def test_module_convention_matches_the_function_and_mixed_query_frames():
    sim = simulate_phantom(3, draw_phantom_params(3, "rotation", amplitude=6.0), n_frames=6, image_size=(64, 64),
                           n_points=4)
    video = torch.from_numpy(sim["video"]).float()
    pts = torch.from_numpy(sim["tracks"])
    qf = torch.tensor([[0, 0, 5, 5]])
    qp = torch.stack([pts[0, :2], pts[5, 2:]]).reshape(1, 4, 2)
    pred = NCCTracker()(video[None, None], qp, qf)
    assert pred.shape == (1, 3, 6, 4)
    t0, _ = ncc_track_video(video, qp[0, :2], 0)
    t5, _ = ncc_track_video(video, qp[0, 2:], 5)
    torch.testing.assert_close(pred[0, :2].permute(1, 2, 0), torch.cat([t0, t5], 1))
    assert NCCTracker(default_grid=2)(video[None, None]).shape == (1, 3, 6, 4)  # verify_net_in_out's call


def test_selection_and_checkpoint_switch(tmp_path):
    net = torch.nn.Linear(1, 1)
    assert select_tracker("specknet", net) is net
    assert isinstance(select_tracker("ncc", net), NCCTracker)
    with pytest.raises(ValueError, match="unknown tracker 'klt'"):
        select_tracker("klt", net)
    with pytest.raises(ValueError, match="unknown tracker 'klt'"):
        TrackerCheckpoint("klt", str(tmp_path / "model.pt"), net)

    from ignite.engine import Engine

    engine = Engine(lambda e, b: None)
    TrackerCheckpoint("ncc", str(tmp_path / "missing.pt"), net).attach(engine)
    engine.run([0], max_epochs=1)  # no checkpoint needed
    engine = Engine(lambda e, b: None)
    TrackerCheckpoint("specknet", str(tmp_path / "missing.pt"), net).attach(engine)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        engine.run([0], max_epochs=1)


@pytest.mark.slow
def test_bundle_evaluates_the_ncc_baseline_on_phantoms(tmp_path, repo_root):
    data = write_phantom_h5(tmp_path / "phantom", n_videos=2, seed=5, amplitude=12.0, image_size=(96, 96),
                            n_frames=12, n_points=8, progress=False)
    cfg = "['bundles/specknet_tracking/configs/train.json','bundles/specknet_tracking/configs/evaluate.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg, "--tracker", "ncc", "--dataset_dir",
           str(data), "--eval_split", "all", "--spatial_size", "96", "--bundle_root", str(tmp_path / "b"),
           "--output_dir", str(tmp_path / "eval")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert m["n_videos"] == 2 and m["delta_avg"] > m["zero_motion_delta_avg"] + 10, m
