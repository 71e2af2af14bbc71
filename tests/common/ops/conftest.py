"""Shared fixtures of the op tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread: the cost-volume tests use tiny tensors, and with 2 OpenMP threads on a
    shared 2-core machine every op waits for its partner thread (gradcheck ran 7x slower); results do not depend on
    the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
