"""The iteration loop every RL-style trainer runs: ``ppo``, ``grpo``, ``nft``, ``dpo``, ``rwr``, ``actor-critic``.

One iteration collects data with the current policy (env rollouts, prompt groups, preference pairs) and
learns from it. :meth:`TrainingLoop.train` resumes from the latest checkpoint (or starts fresh and evaluates
the base model at step 0), then per iteration logs the update's metrics with the collect / iteration
timings, evaluates every ``eval_steps`` iterations and at the end, checkpoints every ``save_steps``
iterations and at the end, and finally lets the trainer save its model and returns ``summary.json``'s
contents (pushing the model to the Hugging Face Hub if ``push_to_hub``).

A trainer supplies what differs - :meth:`~TrainingLoop.collect`, :meth:`~TrainingLoop.learn`,
:meth:`~TrainingLoop.evaluate`, :meth:`~TrainingLoop.save_checkpoint` / :meth:`~TrainingLoop.resume` and
:meth:`~TrainingLoop.finish` (the final save and the summary) - and may override the hooks (each says
what it defaults to). PPO implements them directly (:mod:`rlflow.trainers.ppo`); the text-to-image trainers
through :class:`~rlflow.trainers.iteration_loop.IterationLoopTrainer`, which adds accelerate / DeepSpeed
checkpoints, the EMA swap and image grids.
"""

from __future__ import annotations

import abc
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlflow.utils.checkpoint import checkpoint_to_resume, read_json
from rlflow.utils.model_card import push_run_to_hub
from rlflow.utils.output_dirs import command_of
from rlflow.utils.run import NullRunLogger, RunLogger, open_run_logger

logger = logging.getLogger(__name__)


class TrainingLoop(abc.ABC):
    """Base class: ``self.config`` (``iterations``, ``eval_steps``, ``save_steps``, ``resume``, ``report_to``,
    ``push_to_hub``), ``self.output_dir`` and ``self.iteration`` (the number of finished iterations)."""

    config: Any
    output_dir: Path
    iteration: int
    #: Resuming a run that already finished returns its ``summary.json`` instead of evaluating again.
    skip_finished_run: bool = False
    #: Whether closing the run logger plots the metric curves.
    write_plots: bool = True
    #: The last iteration's metrics (set by the loop): their losses are named when a checkpoint is refused.
    last_metrics: dict[str, Any] | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (all of them, outside distributed runs)."""
        return True

    @property
    @abc.abstractmethod
    def progress_name(self) -> str:
        """The progress bar's label."""

    # ----------------------------------------------------------------------------- what differs
    @abc.abstractmethod
    def collect(self) -> Any:
        """This iteration's data, sampled with the current policy (or drawn from a fixed set)."""

    @abc.abstractmethod
    def learn(self, collected: Any) -> dict[str, float]:
        """Update on what :meth:`collect` returned; returns the iteration's metrics. Runs before
        ``self.iteration`` is counted."""

    @abc.abstractmethod
    def evaluate(self, *, grid_path: Path | None = None) -> dict[str, float]:
        """Evaluation metrics (``eval/...``) of the current weights (writing an image grid to ``grid_path``
        where the trainer makes one)."""

    @abc.abstractmethod
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_<iteration>`` atomically (every process of a distributed run calls it)."""

    @abc.abstractmethod
    def resume(self, path: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote, ``self.iteration`` included."""

    @abc.abstractmethod
    def finish(self, run: RunLogger | NullRunLogger, final: dict[str, float], wall: float) -> dict[str, Any]:
        """Save the final model (with its model card) and return the summary (``wall``: seconds since the
        loop started in this process)."""

    @abc.abstractmethod
    def done_line(self, summary: dict[str, Any]) -> str:
        """The run's last log line: what was trained, how long it took, the result and where it went."""

    # ------------------------------------------------------------------------------------ hooks
    def finished(self) -> bool:
        """Whether training is over (after all iterations; a trainer may add a budget)."""
        return self.iteration >= self.config.iterations

    def started(self) -> None:
        """Called once the run logger is open, before the base evaluation (e.g. to start a wall clock)."""
        return None

    def before_iteration(self) -> None:
        """Called before each :meth:`collect` (e.g. this iteration's learning rates)."""
        return None

    def counters(self) -> dict[str, float]:
        """Running totals logged at the base evaluation and after every iteration (env steps, NFEs)."""
        return {}

    def base_summary(self, base: dict[str, float]) -> dict[str, Any] | None:
        """What ``summary.json`` holds while the first iterations run (``None``: nothing yet)."""
        return None

    def grid_path(self, step: int) -> Path | None:
        """Where the evaluation at ``step`` writes its image grid (``None``: no grid)."""
        return None

    def iteration_metrics(self, metrics: dict[str, float], collected: Any) -> dict[str, float]:
        """Metrics added after the iteration's evaluation (e.g. the wall time including it)."""
        return {}

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after an iteration (an empty dict keeps the last one)."""
        return {}

    def succeeded(self) -> None:
        """Called on every process after a successful run, before the done line and the Hub upload."""
        return None

    # ------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        """Run (or resume) training, then save the final model and write ``summary.json``."""
        config = self.config
        existing = checkpoint_to_resume(
            self.output_dir, resume=config.resume, main=self.is_main, command=command_of(config)
        )
        if existing is not None:
            self.resume(existing)
            if self.skip_finished_run and self.finished() and (self.output_dir / "summary.json").is_file():
                return finished_run_summary(self, f"{self.iteration} iterations")
        run = open_run_logger(
            self.output_dir,
            config,
            resumed_at=self.iteration if existing is not None else None,
            main=self.is_main,
        )
        self.started()
        start_time = time.perf_counter()
        summary: dict[str, Any] = {}
        try:
            if existing is None:
                grid = self.grid_path(0)
                base = self.evaluate(grid_path=grid)
                run.log(0, {**base, **self.counters()})
                _log_grid(run, 0, grid)
                early = self.base_summary(base)
                if early is not None:
                    run.write_summary(early)
            last_eval: dict[str, float] | None = None
            with tqdm(
                total=config.iterations,
                initial=self.iteration,
                desc=self.progress_name,
                unit="it",
                disable=None if self.is_main else True,
            ) as bar:
                while not self.finished():
                    self.before_iteration()
                    tick = time.perf_counter()
                    collected = self.collect()
                    collect_seconds = time.perf_counter() - tick
                    metrics = self.learn(collected)
                    self.iteration += 1
                    metrics.update(self.counters())
                    metrics["time/collect_seconds"] = collect_seconds
                    metrics["time/iteration_seconds"] = time.perf_counter() - tick
                    done = self.finished()
                    grid = None
                    if self.iteration % config.eval_steps == 0 or done:
                        grid = self.grid_path(self.iteration)
                        last_eval = self.evaluate(grid_path=grid)
                        metrics.update(last_eval)
                    metrics.update(self.iteration_metrics(metrics, collected))
                    run.log(self.iteration, metrics)
                    _log_grid(run, self.iteration, grid)
                    self.last_metrics = metrics
                    bar.update(1)
                    postfix = self.progress_postfix(metrics)
                    if postfix:
                        bar.set_postfix(postfix)
                    if self.iteration % config.save_steps == 0 or done:
                        self.save_checkpoint()
            # The last iteration always evaluates; evaluate again only if no iteration ran (already finished).
            final = last_eval if last_eval is not None else self.evaluate()
            summary = self.finish(run, final, time.perf_counter() - start_time)
            run.write_summary(summary)
        finally:
            run.close(plot=self.write_plots)
        # On success only: a barrier after an error on one rank would hang the others.
        self.succeeded()
        announce_and_push(self, summary)
        return summary


def finished_run_summary(trainer: Any, done: str) -> dict[str, Any]:
    """The ``summary.json`` of a run that had already finished (``done``: e.g. "40 iterations"), announced and
    pushed again (e.g. the upload of the finished run had failed) instead of training or evaluating again."""
    logger.info("%s already finished %s; nothing to do", trainer.output_dir, done)
    summary = read_json(trainer.output_dir / "summary.json", what="run summary")
    announce_and_push(trainer, summary)
    return summary


def announce_and_push(trainer: Any, summary: dict[str, Any]) -> None:
    """On the main process: the run's last log line, then the Hub upload if ``push_to_hub`` (after the local
    save, so a failed upload loses nothing)."""
    if trainer.is_main:
        logger.info("%s", trainer.done_line(summary))
        push_run_to_hub(trainer.config, summary)


def _log_grid(run: RunLogger | NullRunLogger, step: int, path: Path | None) -> None:
    """Send an evaluation grid the main process wrote to the trackers (``eval/samples``)."""
    if path is not None and isinstance(run, RunLogger) and path.is_file():
        run.log_image(step, "eval/samples", path)
