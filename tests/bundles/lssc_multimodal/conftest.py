"""Shared fixtures of the lssc_multimodal bundle tests: the synthetic default generated once into a temporary
CARDIAC_DATA_DIR, reduced network configurations and a CLI runner (``python -m monai.bundle ...`` subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tools import runs

REPO_ROOT = Path(__file__).resolve().parents[3]
BUNDLE = REPO_ROOT / "bundles" / "lssc_multimodal"
CONFIGS = BUNDLE / "configs"

# every LSSC part on (image embeddings, channel-wise multiplication, EAMs, correlations), at toy size
TINY = {
    "spatial_size": 64,
    "pixdim": [2.4, 2.4, 2.4],
    "embed_dim": 12,
    "num_heads": [1, 2, 4, 8],
    "depths": [1, 1, 1, 1],
    "decoder_depths": [1, 1, 1],
    "window_size": 4,
    "batch_size": 2,
    "epochs": 1,
    "epoch_length": 2,
    "val_interval": 1,
    "augment_prob": 0.0,
    "torch_threads": 1,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_module(one_torch_thread):
    """Every test module here runs with one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def lssc_env() -> dict[str, str]:
    """Environment of the CLI runs: the test session's CARDIAC_DATA_DIR (tests/conftest.py) holding the synthetic
    default (20 CT + 20 MRI volumes in the MM-WHS layout), generated once and shared with the conformance test."""
    from common.data.default import default_dataset_dir, ensure_dataset

    ensure_dataset(default_dataset_dir("mmwhs"), "mmwhs", progress=False)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lssc_cfg") / "tiny.json"
    path.write_text(json.dumps(TINY, indent=1))
    return path


def config_list(*files: str | Path) -> str:
    """MONAI's list syntax for ``--config_file``: bundle config names or paths."""
    return runs.config_list(CONFIGS, *files)


def run_cli(command: str, configs: list, env: dict, *args: str, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <command> --config_file [...] <args>`` in the repository root."""
    return runs.run_bundle_cli(command, config_list(*configs), *args, env=env, cwd=REPO_ROOT, check=check,
                               timeout=timeout)
