"""Shared fixtures. Tests run on CPU with few threads: they must fit a 2-core machine."""

from __future__ import annotations

import os

import pytest
import torch


def _test_threads() -> int:
    """``OMP_NUM_THREADS`` (`make test` sets min(cores, 2)); a plain `pytest` uses that same rule."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return min(2, os.cpu_count() or 1)


torch.set_num_threads(_test_threads())


@pytest.fixture()
def one_thread():
    """For tests of small tensors: a second intra-op thread only adds contention on a shared 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
