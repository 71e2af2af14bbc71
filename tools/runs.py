"""Run a bundle's workflows: in-process (``ConfigWorkflow``, for the comparison tools) or as the
``python -m monai.bundle <command>`` subprocess a user types (for CLI tests and drivers)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["config_list", "override_args", "run_bundle_cli", "run_workflow"]


def run_workflow(configs_dir: str | Path, files: Sequence[str | Path], workflow_type: str = "train",
                 **overrides: Any) -> None:
    """``ConfigWorkflow`` on ``files`` (names in ``configs_dir`` or paths) with the bundle's metadata and logging
    config: initialize, run, finalize. ``overrides`` are config ids and values, as ``--key value`` on the CLI."""
    from monai.bundle import ConfigWorkflow

    configs_dir = Path(configs_dir)
    wf = ConfigWorkflow(config_file=[str(configs_dir / f) for f in files], meta_file=str(configs_dir / "metadata.json"),
                        logging_file=str(configs_dir / "logging.conf"), workflow_type=workflow_type, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def config_list(configs_dir: str | Path, *files: str | Path) -> str:
    """MONAI's list syntax for ``--config_file``: names in ``configs_dir``, or absolute paths."""
    paths = [str(f) if Path(str(f)).is_absolute() else str(Path(configs_dir) / f) for f in files]
    return "[" + ",".join(f"'{p}'" for p in paths) + "]"


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``{"epochs": 2}`` -> ``["--epochs", "2"]``."""
    return [a for k, v in overrides.items() for a in (f"--{k}", str(v))]


def run_bundle_cli(command: str, config_file: str, *args: Any, env: Mapping[str, str] | None = None,
                   cwd: str | Path | None = None, check: bool = True,
                   timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <command> --config_file <config_file> <args>`` in a subprocess; the result carries
    ``elapsed`` (seconds). With ``check``, a non-zero exit raises ``AssertionError`` with the command and the tail
    of its output."""
    cmd = [sys.executable, "-m", "monai.bundle", command, "--config_file", config_file, *map(str, args)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=None if env is None else dict(env), capture_output=True, text=True,
                          timeout=timeout)
    proc.elapsed = time.time() - t0
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc
