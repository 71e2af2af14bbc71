"""Test configuration shared by the whole suite.

``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is imported anywhere,
so the Triton kernels of ``common.ops`` run on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYTHONHASHSEED", "0")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Synthetic defaults that bundles generate on first use go to a per-run folder, never the user's cache.
    # Set in the controller before xdist workers start, so all workers share (and lock) one folder.
    if "CARDIAC_DATA_DIR" not in os.environ:
        import tempfile

        os.environ["CARDIAC_DATA_DIR"] = tempfile.mkdtemp(prefix="cardiac-test-data-")


def pytest_collection_modifyitems(config, items):
    # slow tests run by default (CI runs everything); `-m "not slow"` gives a quick pass
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(pytest.mark.timeout(600))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A session-wide folder for synthetic datasets, so generators run once per test session."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def seeded():
    """Seed torch, numpy and random for a test; returns the seed."""
    from monai.utils import set_determinism

    set_determinism(seed=0)
    yield 0
    set_determinism(seed=None)


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def which(cmd: str) -> str | None:
    return shutil.which(cmd)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests: on the shared 2-core machine OpenMP threads mostly wait
    for each other. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def run_training():
    """``run_training(configs_dir, files, stop_after_epoch=None, **overrides)``: a bundle's training workflow in this
    process (MONAI ``ConfigWorkflow``: initialize, run, finalize; ``overrides`` as ``--key value``). With
    ``stop_after_epoch`` the trainer (``train#trainer``) terminates at the end of that epoch, as a run killed there
    stops: the epoch's handlers (validation, epoch checkpoint) have run, later epochs never start."""

    def run(configs_dir: str | Path, files: list[str], stop_after_epoch: int | None = None, **overrides) -> None:
        from ignite.engine import Events
        from monai.bundle import ConfigWorkflow

        configs_dir = Path(configs_dir)
        wf = ConfigWorkflow(config_file=[str(configs_dir / f) for f in files],
                            meta_file=str(configs_dir / "metadata.json"), logging_file=False, workflow_type="train",
                            **overrides)
        wf.initialize()
        if stop_after_epoch is not None:
            trainer = wf.parser.get_parsed_content("train#trainer")  # the instance `run` uses (resolved once)
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=int(stop_after_epoch)), lambda e: e.terminate())
        wf.run()
        wf.finalize()

    return run
