"""Run a bundle's ConfigWorkflow in-process (the ``python -m monai.bundle run`` path), for the comparison tools."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_workflow"]


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
