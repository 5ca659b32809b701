"""(condition, target) datasets for flow matching / behaviour cloning."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rlflow.data.toy2d import Toy2D, sample_toy_2d


@dataclass
class FlowMatchingData:
    """Targets ``[N, horizon, act_dim]`` to generate, optionally conditioned on ``[N, obs_dim]``."""

    targets: Tensor
    conditions: Tensor | None = None

    def __post_init__(self) -> None:
        if self.targets.ndim != 3:
            raise ValueError(
                f"targets must have shape [N, horizon, act_dim], got {tuple(self.targets.shape)}"
            )
        if self.conditions is not None:
            if self.conditions.ndim != 2 or self.conditions.shape[0] != self.targets.shape[0]:
                raise ValueError(
                    f"conditions must have shape [N, obs_dim] with N = {self.targets.shape[0]} (the number of "
                    f"targets), got {tuple(self.conditions.shape)}"
                )
        for name, tensor in (("targets", self.targets), ("conditions", self.conditions)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).any(dim=tuple(range(1, tensor.ndim))).sum())
                raise ValueError(
                    f"{name} contain NaN or inf in {bad} rows; clean the dataset before training"
                )

    def __len__(self) -> int:
        return self.targets.shape[0]

    @property
    def event_shape(self) -> tuple[int, int]:
        return (self.targets.shape[1], self.targets.shape[2])

    @property
    def obs_dim(self) -> int:
        return 0 if self.conditions is None else self.conditions.shape[1]

    def subset(self, index: Tensor) -> FlowMatchingData:
        conditions = None if self.conditions is None else self.conditions[index]
        return FlowMatchingData(self.targets[index], conditions)

    def split(
        self, holdout_fraction: float, *, generator: torch.Generator
    ) -> tuple[FlowMatchingData, FlowMatchingData]:
        """Random (train, held-out) split; the held-out part has at least one row."""
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        permutation = torch.randperm(len(self), generator=generator)
        num_holdout = max(1, int(round(holdout_fraction * len(self))))
        if num_holdout >= len(self):
            raise ValueError(f"dataset of {len(self)} rows is too small to hold out {holdout_fraction:.0%}")
        return self.subset(permutation[num_holdout:]), self.subset(permutation[:num_holdout])


def toy_2d_data(name: Toy2D, num_samples: int, *, seed: int) -> FlowMatchingData:
    """An unconditional 2-D toy dataset, shaped as chunks of one 2-D action."""
    points = sample_toy_2d(name, num_samples, generator=torch.Generator().manual_seed(seed))
    return FlowMatchingData(points.reshape(num_samples, 1, 2))


def load_npz_data(
    path: str | os.PathLike, *, target_key: str = "actions", condition_key: str | None = "observations"
) -> FlowMatchingData:
    """Load ``targets`` (``[N, act_dim]`` or ``[N, horizon, act_dim]``) and optional conditions ``[N, obs_dim]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with np.load(path, allow_pickle=False) as arrays:
        keys = sorted(arrays.files)
        if target_key not in arrays:
            raise KeyError(f"{path} has no array {target_key!r} (arrays: {keys}); set data.target_key")
        targets = torch.as_tensor(arrays[target_key], dtype=torch.float32)
        conditions = None
        if condition_key is not None:
            if condition_key not in arrays:
                raise KeyError(
                    f"{path} has no array {condition_key!r} (arrays: {keys}); set data.condition_key "
                    "(or null for unconditional data)"
                )
            conditions = torch.as_tensor(arrays[condition_key], dtype=torch.float32)
    if targets.ndim == 2:
        targets = targets.unsqueeze(1)
    return FlowMatchingData(targets, conditions)
