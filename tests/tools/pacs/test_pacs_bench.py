"""``python -m tools.bench pacs --quick``: a real batch against Orthanc whose per-step split is reported as JSON,
Markdown and PNG (a smoke run of the benchmark; no timing is asserted)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.server


def test_pacs_bench_quick(tmp_path):
    from tools.bench.pacs import STEPS, run

    summary = run(out_dir=str(tmp_path), quick=True, repeats=1)
    assert summary["node"].startswith("Orthanc")
    payload = json.loads((tmp_path / "pacs.json").read_text())
    assert len(payload["rows"]) == 2 and (tmp_path / "pacs.png").stat().st_size > 1000
    for row in payload["rows"]:
        assert all(row[f"{s}_s"] > 0 for s in STEPS)  # every step was measured
        assert row["total_s"] == pytest.approx(sum(row[f"{s}_s"] for s in STEPS))
    assert "| study |" in (tmp_path / "pacs.md").read_text()
