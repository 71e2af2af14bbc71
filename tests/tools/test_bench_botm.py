"""tools.bench.botm: the command the botm_seg README documents runs (quick size) and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys


def test_botm_benchmark_command_writes_json_markdown_and_png(tmp_path, repo_root):
    readme = (repo_root / "bundles/botm_seg/docs/README.md").read_text()
    assert "python -m tools.bench.botm --repeats 7 --threads 1" in readme
    proc = subprocess.run([sys.executable, "-m", "tools.bench.botm", "--repeats", "1", "--threads", "1", "--quick",
                           "--out_dir", str(tmp_path)], cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "botm.json").read_text())
    configs = json.dumps(report)
    assert "OT off (single)" in configs and "keys" in configs
    assert (tmp_path / "botm.md").read_text().count("|") > 10
    assert (tmp_path / "botm.png").stat().st_size > 1000
