"""Every ``python -m tools.reproduce ...`` command that ``README.md`` and ``docs/claims.md`` show runs, at CI size.

Rules (the same for every documented command): commands are found in fenced blocks and inline code spans; optional
groups ``[--x y]`` are kept (brackets removed); the placeholder ``<claim>`` stands for every claim, so it becomes
``all``; the size flag becomes ``--smoke`` (the plumbing size), ``--seeds`` becomes 1 and ``--out_dir`` a temporary
folder. Identical commands after that run once, each as the real CLI subprocess a user types. The run must exit 0
and write, for each claim it names, a strict JSON report with the contract's fields, plus its Markdown and PNG.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tools.reproduce import CLAIMS

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "docs" / "claims.md"]
FIELDS = {"claim": str, "metric": str, "method": str, "baseline": str, "method_values": list,
          "baseline_values": list, "n": int, "holds": bool, "test": str}


def documented_commands() -> list[list[str]]:
    """The documented ``tools.reproduce`` commands, normalised to CI size, without duplicates."""
    found: list[list[str]] = []
    for doc in DOCS:
        text = doc.read_text()
        spans = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
        for span in spans:
            for line in span.splitlines():
                m = re.search(r"python -m tools\.reproduce\s+(.*)", line.split(" #")[0])
                if not m:
                    continue
                argv = shlex.split(m.group(1).replace("[", " ").replace("]", " "))
                out, skip = [], False
                for tok in argv:
                    if skip:
                        skip = False
                        continue
                    if tok in ("--seeds", "--out_dir", "--device"):
                        skip = True
                        continue
                    if tok in ("--quick", "--smoke"):
                        continue
                    out.append("all" if tok == "<claim>" else tok)
                cmd = [*out, "--smoke", "--seeds", "1"]
                if cmd not in found:
                    found.append(cmd)
    return found


COMMANDS = documented_commands()


def test_the_docs_show_the_contract_commands():
    heads = {c[0] for c in COMMANDS}
    assert "all" in heads, f"docs should show `python -m tools.reproduce all --quick`; found {COMMANDS}"
    unknown = heads - set(CLAIMS) - {"all"}
    assert not unknown, f"documented claims that do not exist: {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_documented_reproduce_command_runs_at_smoke_size(argv, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CARDIAC_DATA_DIR": str(tmp_path / "data")}
    out_dir = tmp_path / "reproduce"
    proc = subprocess.run([sys.executable, "-m", "tools.reproduce", *argv, "--out_dir", str(out_dir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    claims = list(CLAIMS) if argv[0] == "all" else [argv[0]]
    for claim in claims:
        text = (out_dir / f"{claim}.json").read_text()
        assert not re.search(r"\b(NaN|-?Infinity)\b", text), f"{claim}.json is not strict JSON"
        data = json.loads(text)
        for key, kind in FIELDS.items():
            assert isinstance(data[key], kind), f"{claim}.json: {key} should be {kind.__name__}, got {data[key]!r}"
        assert data["claim"] == claim and data["n"] == len(data["method_values"]) == len(data["baseline_values"]) > 0
        assert data["p_value"] is None or 0.0 <= data["p_value"] <= 1.0
        assert data["size"] == "smoke" and data["details"]["smoke_note"]
        assert (out_dir / f"{claim}.md").read_text().startswith(f"# Claim `{claim}`")
        assert (out_dir / f"{claim}.png").stat().st_size > 1000
    if argv[0] == "all":
        assert (out_dir / "summary.md").exists()
