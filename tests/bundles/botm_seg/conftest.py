"""Shared fixtures of the botm_seg bundle tests: small synthetic datasets in the official layouts, a tiny network
configuration, an in-process bundle runner and one trained tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
BUNDLE = REPO_ROOT / "bundles" / "botm_seg"
CONFIGS = BUNDLE / "configs"

# a BOTM small enough for CPU tests (all BOTM blocks, importance policy and Sinkhorn still on) at 64x64
TINY_NETWORK = {
    "network_def#widths": [8, 16, 24, 32],
    "network_def#depths": [1, 1, 1, 1],
    "network_def#num_heads": [1, 1, 2, 2],
    "network_def#decoder_width": 16,
    "network_def#sinkhorn_iters": 5,
    "network_def#botm_reductions": [2, 1, 1, 1],
}
TINY = {**TINY_NETWORK, "spatial_size": [64, 64], "num_workers": 0, "batch_size": 4, "epochs": 1, "cache_rate": 1.0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_module(one_torch_thread):
    """Every test module here runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_json(tmp_path_factory) -> Path:
    """The TINY overrides as a config file (for CLI runs)."""
    path = tmp_path_factory.mktemp("botm_cfg") / "tiny.json"
    path.write_text(json.dumps(TINY, indent=1))
    return path


@pytest.fixture(scope="session")
def botm_data(tmp_path_factory) -> dict[str, Path]:
    """Small synthetic datasets: CAMUS NIfTI release, CAMUS MetaImage release, TED (non-square frames)."""
    from common.data.synthetic.echo_layouts import write_camus, write_ted

    root = tmp_path_factory.mktemp("botm_data")
    return {
        "camus": write_camus(root / "camus_nifti", n_patients=5, seed=3, image_size=(72, 64), n_frames=3,
                             progress=False),
        "camus_mhd": write_camus(root / "CAMUS_2019", n_patients=5, seed=4, release="mhd", image_size=(72, 64),
                                 n_frames=4, progress=False),
        "ted": write_ted(root / "TED", n_patients=4, seed=5, image_size=(64, 72), n_frames=5, progress=False),
    }


def _run(configs: list[str], bundle_root: Path, **overrides):
    from monai.bundle import run

    files = [str(c) if os.path.isabs(str(c)) else str(CONFIGS / c) for c in configs]
    run(config_file=files, bundle_root=str(bundle_root), **overrides)


@pytest.fixture(scope="session")
def run_bundle():
    """``run_bundle(["train.json", ...], bundle_root, **overrides)``: run the bundle in this process."""
    return _run


@pytest.fixture(scope="session")
def trained(tmp_path_factory, botm_data) -> Path:
    """A bundle root with models/model.pt: the tiny BOTM trained for 2 epochs on the small CAMUS NIfTI set."""
    root = tmp_path_factory.mktemp("botm_trained")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(["train.json"], root, dataset_dir=str(botm_data["camus"]), **{**TINY, "epochs": 2})
    finally:
        torch.set_num_threads(n)
    assert (root / "models" / "model.pt").is_file()
    return root
