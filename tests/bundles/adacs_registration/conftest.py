"""Shared fixtures of the adacs_registration bundle tests: small synthetic defaults and one tiny CLI training run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import runs

REPO = Path(__file__).resolve().parents[3]
BUNDLE = REPO / "bundles" / "adacs_registration"
CONFIGS = BUNDLE / "configs"

# a small but complete network: every level, the 3-step integration and the scoring U-Net are exercised
TINY_NETS = {
    "network_def#estimator#enc_channels": "[8, 8, 8, 8]",
    "network_def#estimator#dec_channels": "[8, 8, 8, 8, 8, 8, 8]",
    "network_def#estimator#integration_steps": "3",
    "scoring_def#enc_channels": "[8, 8, 8, 8]",
    "scoring_def#dec_channels": "[8, 8, 8, 8, 8, 8, 8]",
    "spatial_size": "[64, 64]",
}
TINY_TRAIN = {**TINY_NETS, "epochs": "1", "batch_size": "4"}


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
def adacs_env(tmp_path_factory) -> dict[str, str]:
    """Environment with ``CARDIAC_DATA_DIR`` on a temp folder holding small synthetic defaults (generated once).

    The defaults are generated through ``common.data.default`` with fewer cases, so the bundle finds a complete
    default folder exactly where it would generate its own.
    """
    from common.data.default import default_dataset_dir, generate_dataset

    cache = tmp_path_factory.mktemp("adacs_cache")
    env = {**os.environ, "CARDIAC_DATA_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    old = os.environ.get("CARDIAC_DATA_DIR")
    os.environ["CARDIAC_DATA_DIR"] = str(cache)
    try:
        generate_dataset("acdc", default_dataset_dir("acdc"), n_patients=4, progress=False)
        generate_dataset("registration", default_dataset_dir("registration"), n_pairs=4, progress=False)
    finally:
        if old is None:
            os.environ.pop("CARDIAC_DATA_DIR", None)
        else:
            os.environ["CARDIAC_DATA_DIR"] = old
    env["ADACS_CACHE"] = str(cache)
    return env


@pytest.fixture(scope="session")
def trained_bundle(adacs_env, tmp_path_factory) -> Path:
    """``bundle_root`` of one tiny AdaCS training run from the CLI on the synthetic ACDC default."""
    root = tmp_path_factory.mktemp("adacs_bundle")
    run_bundle(["train.json"], {**TINY_TRAIN, "bundle_root": str(root), "output_dir": str(root / "eval")},
               adacs_env, cwd=root)
    return root


@pytest.fixture(scope="session")
def adacs():
    """The helpers above for the test modules (pytest's importlib mode gives test folders no package imports)."""
    return SimpleNamespace(REPO=REPO, BUNDLE=BUNDLE, CONFIGS=CONFIGS, TINY_NETS=TINY_NETS, TINY_TRAIN=TINY_TRAIN,
                           config_list=config_list, cli_args=cli_args, run_bundle=run_bundle)
