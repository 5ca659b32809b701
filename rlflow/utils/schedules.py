"""Learning-rate schedules: linear warmup followed by constant, cosine or linear decay."""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["SCHEDULE_NAMES", "lr_factor", "make_lr_scheduler"]

ScheduleName = Literal["constant", "cosine", "linear"]
SCHEDULE_NAMES: tuple[str, ...] = ("constant", "cosine", "linear")


def _validate(name: str, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown LR schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")


def lr_factor(
    step: int, name: ScheduleName, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    * ``step < warmup_steps``: ``step / warmup_steps`` (starts at 0, reaches 1 at ``warmup_steps``);
    * afterwards, with ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to ``[0, 1]``:
      ``constant``: 1; ``cosine``: ``r + (1 - r) * (1 + cos(pi p)) / 2``; ``linear``: ``1 - (1 - r) p``,
      where ``r = min_lr_ratio``. Steps past ``total_steps`` stay at the final value.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if name == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    if name == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: ScheduleName,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` implementing :func:`lr_factor` on top of each param group's initial LR.

    Call ``scheduler.step()`` once after every ``optimizer.step()``. The LR used by optimizer step ``k``
    (0-based) is ``peak * lr_factor(k, ...)``; note that with warmup the very first step uses LR 0.

    Raises:
        ValueError: unknown ``name``, ``total_steps < 1``, ``warmup_steps`` outside ``[0, total_steps]``
            or ``min_lr_ratio`` outside ``[0, 1]``.
    """
    _validate(name, total_steps, warmup_steps, min_lr_ratio)

    # A plain closure: LambdaLR's state_dict stores ``None`` for functions, so the scheduler state
    # stays loadable with torch.load(weights_only=True); the schedule is rebuilt from the config.
    def factor(step: int) -> float:
        return lr_factor(
            step, name, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
