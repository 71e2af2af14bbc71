"""tools.bench cost_volume_window: the documented command runs (quick size) and writes its side-by-side report."""

from __future__ import annotations

import json
import subprocess
import sys


def test_windowed_benchmark_writes_json_markdown_and_png(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "cost_volume_window", "--quick", "--repeats", "1",
                           "--out_dir", str(tmp_path)], cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("cost_volume_window*.json")).read_text())
    text = json.dumps(report)
    for method in ("global", "chained", "coarse_to_fine"):
        assert f'"{method}"' in text, method
    assert next(tmp_path.glob("cost_volume_window*.md")).read_text().count("|") > 10
    assert next(tmp_path.glob("cost_volume_window*.png")).stat().st_size > 1000
