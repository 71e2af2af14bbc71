"""The model zoo's submission check (tools/verify_bundle.py, the equivalent of the zoo's ``ci/verify_bundle.py`` in
``full`` mode) passes for every bundle, and it fails, with the reason, when a bundle breaks one of its rules.

Steps 1-5 run on the bundles as shipped: ``verify_net_in_out`` with default arguments on the default networks. The
export step runs ``python -m monai.bundle ckpt_export`` as a subprocess (scripting, or ``--use_trace`` where the
README says so) on untrained weights saved in tmp and compares the exported file with the eager network; to stay
within the CI budget it exports a reduced BOTM/LSSC network (the export path does not depend on the width).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.check_bundle import discover_bundles
from tools.verify_bundle import STEPS, TRACE_EXPORT, fake_input_shape, verify_bundle

REPO = Path(__file__).resolve().parents[2]
# reduced networks for the export step only; network knobs of each bundle's inference config
EXPORT_TINY = {
    "botm_seg": {
        "network_def#widths": [8, 16, 24, 32], "network_def#depths": [1, 1, 1, 1],
        "network_def#num_heads": [1, 1, 2, 2], "network_def#decoder_width": 16, "network_def#sinkhorn_iters": 5,
        "network_def#botm_reductions": [2, 1, 1, 1],
        # trace at 64x64 instead of the metadata's 672x672
        "_meta_#network_data_format#inputs#image#spatial_shape": [64, 64],
    },
    "lssc_multimodal": {"embed_dim": 32, "num_heads": [2, 4, 8, 16], "depths": [1, 1, 1, 1],
                        "decoder_depths": [1, 1, 1], "window_size": 4},
}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _copy(bundle: str, dest: Path) -> Path:
    """A copy of a repository bundle (same folder name), without run-time outputs."""
    return Path(shutil.copytree(REPO / "bundles" / bundle, dest / bundle,
                                ignore=shutil.ignore_patterns("models", "eval", "__pycache__")))


def _by_step(results) -> dict:
    return {r.step: r for r in results}


@pytest.mark.parametrize("bundle", [b.name for b in discover_bundles()])
def test_every_bundle_passes_the_model_zoo_check(bundle, tmp_path):
    folder = REPO / "bundles" / bundle
    before = _files(folder)
    results = verify_bundle(folder, mode="full", work_dir=tmp_path, export_overrides=EXPORT_TINY.get(bundle))
    assert [r.step for r in results] == list(STEPS)
    failed = [str(r) for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    steps = _by_step(results)
    # the zoo's default fake input, from the shipped metadata (n = p = any = 1)
    assert str(fake_input_shape(folder / "configs" / "metadata.json")) in steps["net_in_out"].detail
    assert ("traced" if bundle in TRACE_EXPORT else "scripted") in steps["export"].detail
    assert (tmp_path / "export" / f"{bundle}.ts").is_file()
    assert _files(folder) == before, "the check wrote into the bundle folder"


def test_each_step_fails_with_its_reason(tmp_path):
    """Negative controls on broken copies: each rule of the zoo's check can fail, and says why."""
    missing_license = _copy("adacs_registration", tmp_path / "a")
    (missing_license / "LICENSE").unlink()
    results = verify_bundle(missing_license, work_dir=tmp_path / "wa")
    assert len(results) == 1 and not results[0].ok and "LICENSE" in results[0].detail  # nothing else can be read

    stale = _copy("adacs_registration", tmp_path / "b")
    meta_file = stale / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["changelog"]["99.0.0"] = "a later entry than the version"
    del meta["network_data_format"]["inputs"]["image"]["dtype"]  # required by the zoo's schema
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 3  # the network gives 2
    meta_file.write_text(json.dumps(meta))
    steps = _by_step(verify_bundle(stale, work_dir=tmp_path / "wb", steps=["version", "metadata", "net_in_out"]))
    assert not steps["version"].ok and "older than changelog entry 99.0.0" in steps["version"].detail
    assert not steps["metadata"].ok and "dtype" in steps["metadata"].detail
    assert not steps["net_in_out"].ok and "output channel number" in steps["net_in_out"].detail

    # a bundle exported by tracing must say so in its README (as the zoo's excluded bundles do)
    undocumented = _copy("botm_seg", tmp_path / "c")
    readme = undocumented / "docs" / "README.md"
    readme.write_text(readme.read_text().replace("## Export", "## Exporting is not documented here"))
    steps = _by_step(verify_bundle(undocumented, work_dir=tmp_path / "wc", steps=["export"]))
    assert not steps["export"].ok and "'## Export' section" in steps["export"].detail


def test_cli_exit_status_and_report(tmp_path):
    good = _copy("adacs_registration", tmp_path / "good")
    bad = _copy("adacs_registration", tmp_path / "bad")
    meta_file = bad / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = "0.2"
    meta_file.write_text(json.dumps(meta))
    proc = subprocess.run([sys.executable, "-m", "tools.verify_bundle", str(good), str(bad), "--mode", "min"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("version     OK") == 1 and "version     FAIL" in out and "'0.2' is not MAJOR.MINOR.PATCH" in out
    assert f"FAILED: {bad.name}" in out and "net_in_out" not in out  # min mode stops after the metadata
