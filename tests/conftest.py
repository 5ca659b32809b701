"""Shared fixtures. Tests run on CPU with few threads: they must fit a 2-core machine."""

from __future__ import annotations

import torch

torch.set_num_threads(2)
