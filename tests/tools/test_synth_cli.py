"""tools.synth: the command-line generators write the layouts the readers load, and bad options fail clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.data.acdc import acdc_datalist
from common.data.default import ensure_dataset, generate_dataset
from common.data.registration import registration_pairs_datalist


def _synth(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.synth", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_writes_readable_layouts(tmp_path, repo_root):
    proc = _synth("acdc", "--out", str(tmp_path / "acdc"), "--patients", "2", "--seed", "1", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert len(acdc_datalist(tmp_path / "acdc")) == 2
    proc = _synth("registration", "--out", str(tmp_path / "pairs"), "--patients", "3", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert len(registration_pairs_datalist(tmp_path / "pairs")) == 3


def test_cli_rejects_unknown_options_and_layouts(tmp_path, repo_root):
    proc = _synth("acdc", "--out", str(tmp_path / "a"), "--patients", "1", "--colour", "red", cwd=repo_root)
    assert proc.returncode == 2 and "colour" in proc.stderr
    proc = _synth("echo", "--layout", "camus2", "--out", str(tmp_path / "b"), cwd=repo_root)
    assert proc.returncode == 2 and "camus2" in proc.stderr


def test_default_dataset_is_generated_once_and_user_folders_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("CARDIAC_DATA_DIR", str(tmp_path / "cache"))
    first = ensure_dataset(None, "registration", n_pairs=2)
    marker_time = (tmp_path / "cache" / "registration-seed0" / ".synthetic-complete").stat().st_mtime_ns
    assert ensure_dataset(first, "registration", n_pairs=2) == first
    assert (tmp_path / "cache" / "registration-seed0" / ".synthetic-complete").stat().st_mtime_ns == marker_time
    assert len(registration_pairs_datalist(first)) == 2
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ensure_dataset(tmp_path / "no_such_dir", "registration")
    with pytest.raises(ValueError, match="unknown synthetic dataset kind"):
        ensure_dataset(None, "camus3d")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileExistsError, match="half"):
        generate_dataset("registration", tmp_path / "half")


def test_cli_echo_layouts_and_preview(tmp_path, repo_root):
    from common.data.camus import camus_datalist
    from common.data.ted import ted_datalist

    proc = _synth("echo", "--layout", "camus_mhd", "--out", str(tmp_path / "camus"), "--patients", "2",
                  "--image_size", "[96,96]", "--n_frames", "6", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert {d["view"] for d in camus_datalist(tmp_path / "camus")} == {"2CH", "4CH"}
    proc = _synth("echo", "--layout", "ted", "--out", str(tmp_path / "ted"), "--patients", "1",
                  "--image_size", "[96,96]", "--n_frames", "6", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert len(ted_datalist(tmp_path / "ted")) == 1
    png = tmp_path / "preview.png"
    proc = _synth("preview", "--out", str(png), "--n_frames", "6", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_phantom_writes_tracking_files_and_rejects_bad_knobs(tmp_path, repo_root):
    from common.data.tracking import read_tracking_h5, tracking_datalist

    proc = _synth("phantom", "--out", str(tmp_path / "ph"), "--videos", "2", "--seed", "3", "--motion", "rotation",
                  "--amplitude", "[4,6]", "--image_size", "[64,64]", "--n_frames", "5", "--n_points", "6",
                  cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    dl = tracking_datalist(tmp_path / "ph", split=None)
    assert len(dl) == 2 and all(d["view"] == "phantom" for d in dl)
    attrs = read_tracking_h5(dl[0]["video"])
    assert attrs["motion"] == "rotation" and 4.0 <= attrs["amplitude_px"] <= 6.0
    proc = _synth("phantom", "--out", str(tmp_path / "bad"), "--motion", "spin", cwd=repo_root)
    assert proc.returncode == 2 and "spin" in proc.stderr
    proc = _synth("phantom", "--out", str(tmp_path / "bad"), "--colour", "red", cwd=repo_root)
    assert proc.returncode == 2 and "colour" in proc.stderr
