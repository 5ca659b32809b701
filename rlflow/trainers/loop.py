"""The one training loop every trainer runs: ``ppo``, ``grpo``, ``nft``, ``dpo``, ``rwr``, ``actor-critic``,
``pretrain``, ``pretrain-t2i``, ``pretrain-vae`` and ``reward-model``.

One iteration collects data with the current policy (env rollouts, prompt groups, preference pairs; a
supervised trainer draws a batch) and learns from it. :meth:`TrainingLoop.train` resumes from the latest
checkpoint (or returns a finished run's summary, or starts fresh and evaluates the base model at step 0),
then per iteration logs the update's metrics, evaluates every ``eval_steps`` iterations and at the end,
checkpoints every ``save_steps`` iterations and after the final evaluation, and finally lets the trainer
save its model and returns ``summary.json``'s contents (pushing the model to the Hugging Face Hub if
``push_to_hub``).

A trainer supplies what differs - :meth:`~TrainingLoop.collect`, :meth:`~TrainingLoop.learn`,
:meth:`~TrainingLoop.evaluate`, :meth:`~TrainingLoop.save_checkpoint` / :meth:`~TrainingLoop.resume` and
:meth:`~TrainingLoop.finish` (the final save and the summary) - and may override the hooks (each says
what it defaults to). PPO implements them directly (:mod:`rlflow.trainers.ppo`); the text-to-image RL
trainers through :class:`~rlflow.trainers.iteration_loop.IterationLoopTrainer` (accelerate / DeepSpeed
checkpoints, the EMA swap, image grids); the supervised trainers through
:class:`~rlflow.trainers.step_loop.StepLoopTrainer` (one optimizer step per iteration, called a step, with
a loss averaged over ``logging_steps``).
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlflow.config import option, validate_config
from rlflow.utils.checkpoint import checkpoint_to_resume, read_json
from rlflow.utils.model_card import (
    check_hub_fields,
    hub_model_id_option,
    push_run_to_hub,
    push_to_hub_option,
)
from rlflow.utils.output_dirs import command_of
from rlflow.utils.run import (
    NullRunLogger,
    ReportTo,
    RunLogger,
    normalize_report_to,
    open_run_logger,
    report_to_option,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    """The fields every trainer's config has: the run directory, seeding and device, the evaluation and
    checkpoint schedules the loop reads, trackers and the Hub upload (transformers' names).

    Each command's config subclasses it (the text-to-image trainers through
    :class:`~rlflow.trainers.text_to_image.TextToImageConfig`), re-declares a field only to change its
    default (``output_dir``, ``eval_steps``, ...), and calls ``super().__post_init__()`` first in its own
    ``__post_init__``. An iteration is a collect-and-update round (RL trainers) or one optimizer step
    (supervised trainers).
    """

    output_dir: str = option("runs/run", help="Run directory (metrics, plots, checkpoints, the final model).")
    seed: int = option(0, help="Seed for python, numpy, torch and the trainer's own generator.")
    device: str = option("cpu", help="Torch device, e.g. cpu or cuda.")
    num_threads: int | None = option(None, help="torch.set_num_threads for CPU runs (null: torch's default).")
    eval_steps: int = option(10, help="Evaluate every N iterations (and at the end).")
    save_steps: int = option(10, help="Write a resumable checkpoint every N iterations (and at the end).")
    save_total_limit: int = option(2, help="How many recent checkpoints to keep.")
    resume: bool = option(True, help="Resume from the latest checkpoint in output_dir if there is one.")
    report_to: ReportTo = report_to_option()
    push_to_hub: bool = push_to_hub_option()
    hub_model_id: str | None = hub_model_id_option()

    def __post_init__(self) -> None:
        validate_config(self)
        self.report_to = normalize_report_to(self.report_to)
        check_hub_fields(self)


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
    #: What one iteration is called in the progress bar and the "already finished" line.
    unit: str = "iteration"
    #: Whether a fresh run evaluates the model it starts from (logged at step 0).
    evaluates_base: bool = True
    #: The tracker tag of the evaluation's image (a sample grid).
    evaluation_image_tag: str = "eval/samples"
    #: The final evaluation once it ran (a trainer whose last checkpoint saves it is not evaluated again
    #: when a run resumes from there).
    final_metrics: dict[str, float] | None = None

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
    @property
    def total(self) -> int:
        """The number of iterations of a full run (the progress bar's length)."""
        return self.config.iterations

    def finished(self) -> bool:
        """Whether training is over (after all iterations; a trainer may add a budget)."""
        return self.iteration >= self.total

    def evaluation(self, *, final: bool) -> tuple[dict[str, float], Path | None]:
        """Evaluate now (``final``: the evaluation after the last iteration); returns the metrics and the
        image it wrote, if any. Defaults to :meth:`evaluate` with :meth:`grid_path`."""
        grid = self.grid_path(self.iteration)
        return self.evaluate(grid_path=grid), grid

    def logged_row(self, metrics: dict[str, float]) -> dict[str, float] | None:
        """What this iteration logs (``None``: nothing, unless it evaluates); defaults to all its metrics."""
        return metrics

    def iteration_timings(self, collect_seconds: float, iteration_seconds: float) -> dict[str, float]:
        """Timing metrics of the iteration (defaults to the collection and the whole iteration's seconds)."""
        return {"time/collect_seconds": collect_seconds, "time/iteration_seconds": iteration_seconds}

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
        self.final_metrics = None
        existing = checkpoint_to_resume(
            self.output_dir, resume=config.resume, main=self.is_main, command=command_of(config)
        )
        if existing is not None:
            self.resume(existing)
            if not self.finished():  # a finished run given more iterations: its final evaluation is stale
                self.final_metrics = None
            elif self.skip_finished_run and (self.output_dir / "summary.json").is_file():
                return finished_run_summary(self, f"{self.iteration} {self.unit}s")
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
            if existing is None and self.evaluates_base:
                base, image = self.evaluation(final=False)
                run.log(0, {**base, **self.counters()})
                self._log_image(run, 0, image)
                early = self.base_summary(base)
                if early is not None:
                    run.write_summary(early)
            with tqdm(
                total=self.total,
                initial=self.iteration,
                desc=self.progress_name,
                unit="it" if self.unit == "iteration" else self.unit,
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
                    metrics.update(self.iteration_timings(collect_seconds, time.perf_counter() - tick))
                    done = self.finished()
                    row = self.logged_row(metrics)
                    image = None
                    if self.iteration % config.eval_steps == 0 or done:
                        evaluation, image = self.evaluation(final=done)
                        if done:
                            self.final_metrics = evaluation
                        row = {**(row or {}), **evaluation}
                    if row is not None:
                        row.update(self.iteration_metrics(row, collected))
                        run.log(self.iteration, row)
                        postfix = self.progress_postfix({**metrics, **row})
                        if postfix:
                            bar.set_postfix(postfix)
                    self._log_image(run, self.iteration, image)
                    self.last_metrics = {**metrics, **(row or {})}
                    bar.update(1)
                    if self.iteration % config.save_steps == 0 or done:
                        self.save_checkpoint()
            # Evaluate again only if no iteration ran (resumed from the last checkpoint of a run whose
            # summary was not written) and that checkpoint does not hold the final evaluation.
            final = self.final_metrics if self.final_metrics is not None else self.evaluation(final=True)[0]
            summary = self.finish(run, final, time.perf_counter() - start_time)
            run.write_summary(summary)
        finally:
            run.close(plot=self.write_plots)
        # On success only: a barrier after an error on one rank would hang the others.
        self.succeeded()
        announce_and_push(self, summary)
        return summary

    def _log_image(self, run: RunLogger | NullRunLogger, step: int, path: Path | None) -> None:
        """Send an evaluation image the main process wrote to the trackers."""
        if path is not None and isinstance(run, RunLogger) and path.is_file():
            run.log_image(step, self.evaluation_image_tag, path)


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
