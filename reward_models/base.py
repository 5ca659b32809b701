"""The reward protocol shared by every image reward, and the input checks they all run.

A reward is a plain callable (as in TRL)::

    reward(images: Tensor[B, 3, H, W] in [0, 1], prompts: Sequence[str]) -> Tensor[B]  (float32, CPU)

Configurable rewards are factories (classes) returning such callables; see ``combine.REWARDS``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["RANGE_TOLERANCE", "RewardFn", "RewardOutput", "as_reward_vector", "check_reward_inputs"]

# Samples decoded from a model are clamped by the pipeline; allow float round-off, nothing more.
RANGE_TOLERANCE = 1e-3


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


def check_reward_inputs(images: Tensor, prompts: Sequence[str], name: str) -> None:
    """Raise ``ValueError`` (naming the reward ``name``) unless ``images`` / ``prompts`` follow the protocol.

    Images outside [0, 1] are an error rather than clamped: the usual cause is passing model outputs in
    [-1, 1], which would silently score garbage.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(
            f"{name}: images must be floating point in [0, 1], got dtype {images.dtype} "
            "(convert uint8 with images.float() / 255)"
        )
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"{name}: expected one prompt per image ({images.shape[0]}), got {got}")
    if images.numel():
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(f"{name}: images contain NaN or inf at batch indices {bad[:10]}")
        lo, hi = float(images.min()), float(images.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"{name}: images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; map model outputs "
                "in [-1, 1] with (x.clamp(-1, 1) + 1) / 2"
            )


@dataclass
class RewardOutput:
    """A batch of rewards: ``total`` [B] and the named (unweighted) ``components`` [B] it was made of."""

    total: Tensor
    components: dict[str, Tensor]

    def metrics(self, prefix: str = "rewards") -> dict[str, float]:
        """``{prefix}/<name>/mean`` and ``/std`` for every component, and ``{prefix}/total/...``."""
        out: dict[str, float] = {}
        for name, values in {**self.components, "total": self.total}.items():
            values = values.float()
            out[f"{prefix}/{name}/mean"] = float(values.mean()) if values.numel() else math.nan
            out[f"{prefix}/{name}/std"] = float(values.std(unbiased=False)) if values.numel() else math.nan
        return out


def as_reward_vector(value: Any, name: str, batch: int) -> Tensor:
    """A reward's output as a float32 CPU vector [B] (a RewardOutput gives its total).

    Raises ``ValueError`` naming the reward ``name`` for a wrong shape, and for NaN/inf naming the first
    offending batch index (a silent NaN would poison every advantage of its GRPO group).
    """
    if isinstance(value, RewardOutput):
        value = value.total
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    tensor = tensor.detach().to(device="cpu", dtype=torch.float32)
    if tensor.shape != (batch,):
        raise ValueError(
            f"reward {name!r} returned shape {tuple(tensor.shape)}, expected ({batch},): one per image"
        )
    bad = (~torch.isfinite(tensor)).nonzero().flatten().tolist()
    if bad:
        more = f" (and {len(bad) - 1} more: {bad[1:10]})" if len(bad) > 1 else ""
        raise ValueError(
            f"reward {name!r} returned a non-finite value ({float(tensor[bad[0]])}) at batch index {bad[0]}{more}"
        )
    return tensor
