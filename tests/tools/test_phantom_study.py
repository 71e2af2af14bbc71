"""tools.phantom_study: the README's two commands run (tiny sizes) and write the study files; the held-out test set
is refused when its ranges overlap the training ranges."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch

from common.data.tracking import tracking_datalist
from common.networks.specknet import SpeckNetBundleAdapter
from tools import phantom_study

README = "bundles/specknet_tracking/docs/README.md"


def _documented_commands(repo_root) -> list[list[str]]:
    """``python -m tools.phantom_study`` commands of the README, continuation lines joined."""
    text = (repo_root / README).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines()]
    return [shlex.split(ln) for ln in lines if ln.startswith("python -m tools.phantom_study")]


@pytest.mark.slow
def test_documented_study_commands_run(tmp_path, repo_root):
    cmds = _documented_commands(repo_root)
    assert [c[3] for c in cmds] == ["generate", "run"], cmds
    ckpt = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(SpeckNetBundleAdapter().state_dict(), ckpt)
    subs = {"data/phantom_test": str(tmp_path / "phantom"), "output/phantom_study": str(tmp_path / "study"),
            "bundles/specknet_tracking/models/model.pt": str(ckpt)}
    tiny = {"generate": ["--amplitudes", "[4,12]", "--videos_per_motion", "1", "--n_frames", "6",
                         "--image_size", "64", "--n_points", "4"], "run": ["--overrides", "{'spatial_size': 64}"]}
    for cmd in cmds:
        args = [subs.get(a, a) for a in cmd[2:]]
        proc = subprocess.run([sys.executable, "-m", *args, *tiny[cmd[3]]], cwd=repo_root, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # 2 amplitudes x 4 motions, one sub-folder per amplitude (= one dataset of the per-dataset table)
    assert len(tracking_datalist(tmp_path / "phantom")) == 8
    result = json.loads((tmp_path / "study" / "phantom_study.json").read_text())
    assert set(result["per_amplitude"]) == {"amp04", "amp12"}
    assert list(result["overall"]) == ["zero_motion", *phantom_study.TRACKERS]
    for name, row in result["overall"].items():
        assert 0.0 <= row["delta_avg"] <= 100.0 and row["n_videos"] == 8, (name, row)
    # the zero-motion row is the evaluation's own predictor; NCC tracks the rigidly moving speckle far better
    assert result["overall"]["ncc"]["delta_avg"] > result["overall"]["zero_motion"]["delta_avg"]
    md = (tmp_path / "study" / "phantom_study.md").read_text()
    assert "| amp04 |" in md and "NCC block matching" in md
    assert (tmp_path / "study" / "phantom_study.png").stat().st_size > 1000


def test_test_ranges_must_lie_outside_the_training_ranges():
    phantom_study._check_disjoint(phantom_study.TEST_RANGES)
    with pytest.raises(ValueError, match="density .* overlaps the training range"):
        phantom_study._check_disjoint({"density": (3.0, 6.0)})


def test_unknown_tracker_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tracker"):
        phantom_study.run(str(tmp_path), "m.pt", trackers=["cotracker"])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        phantom_study.run(str(tmp_path / "nope"), "m.pt", trackers=["ncc"])
