"""tools.bench.registration3d: the command the adacs_registration README documents runs (quick size) and reports
every available 3D estimator side by side."""

from __future__ import annotations

import json
import subprocess
import sys


def test_registration3d_benchmark_command_writes_json_markdown_and_png(tmp_path, repo_root):
    from common.networks.registration import ESTIMATORS

    readme = (repo_root / "bundles/adacs_registration/docs/README.md").read_text()
    assert "python -m tools.bench.registration3d --repeats 3 --threads 1" in readme
    proc = subprocess.run([sys.executable, "-m", "tools.bench.registration3d", "--repeats", "1", "--threads", "1",
                           "--quick", "--out_dir", str(tmp_path)], cwd=repo_root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "registration3d.json").read_text())
    expected = [n for n in ("voxelmorph", "transmorph", "diffusemorph") if n in ESTIMATORS]
    assert [r["method"] for r in report["rows"]] == expected and len(expected) >= 2
    assert report["size"] == [32, 32, 32]
    for r in report["rows"]:
        assert r["median_s"] > 0 and r["forward_eval_s"] > 0 and r["params_m"] > 0 and r["peak_mb"] > 0
    # one 32^3 training step of the paper's VoxelMorph holds at least its activations (16 channels x 32^3 float32)
    assert report["rows"][0]["peak_mb"] > 16 * 32**3 * 4 / 2**20
    assert (tmp_path / "registration3d.md").read_text().count("|") > 10
    assert (tmp_path / "registration3d.png").stat().st_size > 1000
