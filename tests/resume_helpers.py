"""Kill a training run part-way and resume it: the shared body of the resume tests.

:func:`interrupt_and_resume` serves every trainer: the step-loop trainers (``pretrain``, ``pretrain-t2i``,
``pretrain-vae``, ``reward-model``: killed in ``update`` at ``step``), the iteration-loop trainers (``grpo``,
``nft``, ``dpo``, ``rwr``, ``actor-critic``: killed in ``learn`` at ``iteration``, i.e. after the
iteration's data was collected) and ``ppo`` (killed in ``update`` at ``iteration``).

A kill runs no cleanup, but an exception raised in-process does (``finally`` blocks, ``__exit__``,
atexit-free handlers that close loggers or write files). So at the moment of the kill the run directory is
copied aside, the exception is let through, and the directory is then replaced by that copy: whatever the
trainer wrote while unwinding is dropped, exactly as after ``kill -9``. A fresh process is mimicked too:
the global RNGs are put back to a fixed state before each trainer is built, so a trainer that relied on
global random state it does not checkpoint would show a difference.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

#: torch's default seed of a fresh interpreter (what an unseeded process starts from).
FRESH_PROCESS_TORCH_SEED = 67280421310721


class SimulatedKill(BaseException):
    """Raised at the kill point; a ``BaseException`` so no ``except Exception`` in a trainer catches it."""


def fresh_process_rng() -> None:
    """Put Python's, numpy's and torch's global RNGs in the same state as at every other trainer start."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(FRESH_PROCESS_TORCH_SEED)


def loop_hook(trainer_cls: type) -> tuple[str, str]:
    """``(method killed, counter it checks)`` for a trainer class: the per-step/-iteration update method
    of its training loop and the attribute counting the finished steps/iterations."""
    from rlflow.trainers.iteration_loop import IterationLoopTrainer
    from rlflow.trainers.step_loop import StepLoopTrainer

    if issubclass(trainer_cls, StepLoopTrainer):
        return "update", "step"
    if issubclass(trainer_cls, IterationLoopTrainer):
        return "learn", "iteration"
    return "update", "iteration"  # PPO's own loop: update(batch, advantages, returns) per iteration


def checkpoint_steps(run_dir: Path) -> list[int]:
    from rlflow.utils.checkpoint import list_checkpoints

    return [step for step, _ in list_checkpoints(run_dir)]


@dataclass
class Killed:
    """What the killed run left: its checkpoints (by step / iteration) and its metrics rows' steps."""

    checkpoints: list[int]
    metric_steps: list[int]


def kill_at(
    trainer_cls: type,
    make: Callable[[], Any],
    output_dir: Path,
    crash_at: int,
    monkeypatch: pytest.MonkeyPatch,
    *,
    method: str | None = None,
    after: bool = False,
) -> Killed:
    """Train ``make()`` until its loop is about to update with ``crash_at`` steps / iterations done, then
    'kill' it: the run directory is left exactly as it was at that moment (see the module docstring).

    ``method`` (default: the loop's update, :func:`loop_hook`) names another kill point, e.g.
    ``save_checkpoint``; ``after``: kill when that call has returned rather than when it begins."""
    from rlflow.utils.run import read_metrics

    default_method, counter = loop_hook(trainer_cls)
    method = method or default_method
    original = getattr(trainer_cls, method)
    output_dir = Path(output_dir)
    at_kill = output_dir.with_name(output_dir.name + ".at_kill")

    def kill() -> None:
        shutil.copytree(output_dir, at_kill)  # what survives a kill: the files as they are now
        raise SimulatedKill

    def crash(self, *args, **kwargs):
        if not after and getattr(self, counter) == crash_at:
            kill()
        result = original(self, *args, **kwargs)
        if after and getattr(self, counter) == crash_at:
            kill()
        return result

    monkeypatch.setattr(trainer_cls, method, crash)
    try:
        fresh_process_rng()
        trainer = make()
        with pytest.raises(SimulatedKill):
            trainer.train()
    finally:
        monkeypatch.setattr(trainer_cls, method, original)
    del trainer
    shutil.rmtree(output_dir)  # drop whatever the unwinding wrote (closing loggers, plots, ...)
    at_kill.rename(output_dir)
    return Killed(
        checkpoints=checkpoint_steps(output_dir),
        metric_steps=[row["step"] for row in read_metrics(output_dir / "metrics.jsonl")],
    )


def interrupt_and_resume(
    trainer_cls: type,
    config: Any,
    crash_at_step: int,
    monkeypatch: pytest.MonkeyPatch,
    *,
    make: Callable[[], Any] | None = None,
    output_dir: Path | None = None,
    require_lost_work: bool = False,
    method: str | None = None,
    after: bool = False,
):
    """Train ``trainer_cls(config)`` (or ``make()``) until its update is about to run with
    ``crash_at_step`` steps / iterations done (a killed run: only the files written so far survive), then
    train a fresh trainer on the same config, which resumes from the last checkpoint. Returns the resumed,
    finished trainer.

    ``require_lost_work``: check the kill came after at least one checkpoint and before the next, with
    logged work after that checkpoint (metrics rows the resume has to drop and log again). ``method`` /
    ``after``: another kill point (see :func:`kill_at`)."""
    make = make if make is not None else (lambda: trainer_cls(config))
    output_dir = Path(output_dir if output_dir is not None else config.output_dir)
    killed = kill_at(trainer_cls, make, output_dir, crash_at_step, monkeypatch, method=method, after=after)
    if require_lost_work:
        assert killed.checkpoints, f"killed at {crash_at_step} before the first checkpoint"
        assert killed.checkpoints[-1] < crash_at_step, (
            f"killed right at checkpoint {killed.checkpoints[-1]}: no work after it is lost"
        )
        assert max(killed.metric_steps) > killed.checkpoints[-1], (
            f"no metrics row after checkpoint {killed.checkpoints[-1]} (rows: {killed.metric_steps})"
        )
    fresh_process_rng()
    resumed = make()
    resumed.train()
    return resumed
