"""Shared fixtures. Tests run on CPU with few threads: they must fit a 2-core machine."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture()
def one_thread():
    """For tests of small tensors: a second intra-op thread only adds contention on a shared 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
