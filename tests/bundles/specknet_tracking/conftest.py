"""Shared fixtures of the specknet_tracking bundle tests: a small synthetic default and one tiny CLI training run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import runs

REPO = Path(__file__).resolve().parents[3]
BUNDLE = REPO / "bundles" / "specknet_tracking"
CONFIGS = BUNDLE / "configs"

# the whole network at a small input size, short clips without overlap: every code path, seconds per epoch
TINY = {"spatial_size": "64", "clip_len": "12", "segment_overlap": "0.0", "batch_size": "2"}
TINY_TRAIN = {**TINY, "epochs": "1", "val_interval": "1"}


def config_list(*names: str) -> str:
    return runs.config_list(CONFIGS, *names)


cli_args = runs.override_args


def run_bundle(configs: list[str], overrides: dict[str, str], env: dict[str, str], cwd: Path,
               check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of this bundle in a subprocess."""
    return runs.run_bundle_cli("run", config_list(*configs), "--meta_file", CONFIGS / "metadata.json",
                               "--logging_file", CONFIGS / "logging.conf", *cli_args(overrides), env=env, cwd=cwd,
                               check=check, timeout=timeout)


@pytest.fixture(scope="session")
def specknet_env(tmp_path_factory) -> dict[str, str]:
    """Environment with ``CARDIAC_DATA_DIR`` on a temp folder holding a small synthetic tracking default.

    The default is generated through ``common.data.default`` with fewer, smaller videos, so the bundle finds a
    complete default folder exactly where it would generate its own (same layout, same code path).
    """
    from common.data.default import default_dataset_dir, generate_dataset

    cache = tmp_path_factory.mktemp("specknet_cache")
    env = {**os.environ, "CARDIAC_DATA_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    old = os.environ.get("CARDIAC_DATA_DIR")
    os.environ["CARDIAC_DATA_DIR"] = str(cache)
    try:
        generate_dataset("tracking", default_dataset_dir("tracking"), n_videos=4, image_size=(96, 96), n_frames=24,
                         n_points=10, progress=False)
    finally:
        if old is None:
            os.environ.pop("CARDIAC_DATA_DIR", None)
        else:
            os.environ["CARDIAC_DATA_DIR"] = old
    env["SPECKNET_DEFAULT"] = str(cache / "tracking-seed0")
    return env


@pytest.fixture(scope="session")
def trained_bundle(specknet_env, tmp_path_factory) -> Path:
    """``bundle_root`` of one tiny SpeckNet training run from the CLI on the synthetic default."""
    root = tmp_path_factory.mktemp("specknet_bundle")
    run_bundle(["train.json"], {**TINY_TRAIN, "bundle_root": str(root), "output_dir": str(root / "eval")},
               specknet_env, cwd=root)
    return root


@pytest.fixture(scope="session")
def specknet():
    """The helpers above for the test modules (pytest's importlib mode gives test folders no package imports)."""
    return SimpleNamespace(REPO=REPO, BUNDLE=BUNDLE, CONFIGS=CONFIGS, TINY=TINY, TINY_TRAIN=TINY_TRAIN,
                           config_list=config_list, cli_args=cli_args, run_bundle=run_bundle)
