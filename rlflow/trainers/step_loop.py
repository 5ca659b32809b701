"""The step loop shared by the supervised flow-matching trainers (``pretrain``, ``pretrain-t2i``).

Resume from the latest checkpoint (or return a finished run's summary), log a windowed training loss
every ``logging_steps`` steps, evaluate every ``eval_steps`` steps, checkpoint every ``save_steps``
steps, then evaluate a last time, checkpoint, and write the final model and ``summary.json``. A trainer
subclasses :class:`StepLoopTrainer` and supplies the parts that differ: :meth:`update` (which ends with
the shared :meth:`optimizer_step`), its weight I/O for the shared :meth:`save_checkpoint` / :meth:`resume`
(:attr:`trained_model`, :meth:`save_weights`, :meth:`load_weights`, :meth:`model_config_dict`),
:meth:`periodic_evaluation`, :meth:`final_evaluation` and :meth:`final_outputs`.

A trainer that runs under ``accelerate launch`` (``reward-model``) sets ``self.runtime``
(:class:`~rlflow.utils.distributed.DistributedRuntime`): the optimizer step then goes through it (DDP or a
DeepSpeed engine), checkpoints are written by every rank (DeepSpeed's optimizer shards), weights are
gathered under ZeRO-3 before they are saved, and only the main process logs and writes files.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rlflow.trainers.loop import announce_and_push, finished_run_summary
from rlflow.utils.checkpoint import (
    CheckpointError,
    atomic_directory,
    check_finite_checkpoint,
    checkpoint_dir,
    checkpoint_to_resume,
    load_training_state,
    prune_checkpoints,
    save_training_state,
)
from rlflow.utils.model_card import ModelCardInfo, model_card_info
from rlflow.utils.output_dirs import command_of
from rlflow.utils.run import NullRunLogger, RunLogger, open_run_logger
from rlflow.utils.seeding import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)


class StepLoopTrainer(abc.ABC):
    """Base class: ``self.config`` (``steps``, ``logging_steps``, ``eval_steps``, ``save_steps``,
    ``resume``, ``report_to``), ``self.output_dir``, ``self.step``, ``self.ema``, ``self.trainable``."""

    #: The progress bar's label.
    progress_name: str = "train"
    config: Any
    output_dir: Path
    step: int
    ema: Any
    trainable: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    #: Sub-directory of a checkpoint holding the trained weights (``ema/`` holds the EMA's).
    weights_name: str = "model"
    #: Set by trainers that run under accelerate (DDP / DeepSpeed); ``None``: one plain process.
    runtime: Any = None
    #: The last optimizer step's loss (``{"train/loss": value}``), named by a non-finite checkpoint's error.
    last_losses: dict[str, float] | None = None
    #: The training losses since the last ``logging_steps`` row (checkpointed: a resumed run logs the same mean).
    loss_window: list[float]
    #: The final evaluation once it ran (saved by the last checkpoint: a run resumed from there neither
    #: evaluates nor logs it again).
    final_metrics: dict[str, float] | None = None

    @property
    def is_main(self) -> bool:
        return self.runtime is None or self.runtime.is_main

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """The trained model's full weights within the block (gathered under ZeRO-3; call on every rank)."""
        if self.runtime is None:
            yield
            return
        with self.runtime.full_parameters(list(self.trained_model.parameters())):
            yield

    @abc.abstractmethod
    def update(self) -> dict[str, float]:
        """One optimizer step (increments ``self.step``); returns metrics incl. ``train/loss``."""

    @property
    @abc.abstractmethod
    def trained_model(self) -> nn.Module:
        """The module being trained (whose weights a checkpoint saves)."""

    @abc.abstractmethod
    def save_weights(self, model: nn.Module, directory: Path) -> None:
        """Write ``model``'s weights and config (safetensors + JSON) to ``directory``."""

    @abc.abstractmethod
    def load_weights(self, directory: Path) -> tuple[nn.Module, dict[str, Any]]:
        """Load what :meth:`save_weights` wrote: the module and its model config as a dict."""

    @abc.abstractmethod
    def model_config_dict(self) -> dict[str, Any]:
        """This run's model config as a dict (compared with a checkpoint's before resuming)."""

    # ----------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically: weights as safetensors, optimizer/RNG as a torch file
        (under DeepSpeed the optimizer state is the engine's shards, written by every rank)."""
        from rlflow.utils.distributed import shared_atomic_directory

        path = checkpoint_dir(self.output_dir, self.step)
        deepspeed = self.runtime is not None and self.runtime.is_deepspeed
        directory = (
            atomic_directory(path) if self.runtime is None else shared_atomic_directory(path, self.runtime)
        )
        with directory as tmp:
            with self.full_weights():
                # Every rank checks the same (gathered) weights, so all stop together; raising here
                # deletes the temporary directory and leaves the previous checkpoint the latest.
                check_finite_checkpoint(
                    path,
                    where=f"step {self.step}",
                    weights={
                        self.weights_name: self.trained_model,
                        **({"ema": self.ema.model} if self.ema is not None else {}),
                    },
                    optimizers={} if deepspeed else {"optimizer": self.optimizer},
                    losses=self.last_losses,
                    config=self.config,
                )
                if self.is_main:
                    self.save_weights(self.trained_model, tmp / self.weights_name)
                    if self.ema is not None:
                        self.save_weights(self.ema.model, tmp / "ema")
                    save_training_state(
                        tmp / "training_state.pt",
                        {
                            "step": self.step,
                            **({} if deepspeed else {"optimizer": self.optimizer.state_dict()}),
                            "scheduler": self.scheduler.state_dict(),
                            "ema_num_updates": self.ema.num_updates if self.ema is not None else 0,
                            "rng": capture_rng_state(self.generator),
                            "loss_window": list(getattr(self, "loss_window", ())),
                            "final_metrics": self.final_metrics,
                            **self.extra_checkpoint_state(),
                        },
                    )
            if deepspeed:
                self.runtime.save_engine(tmp)
        if self.is_main:
            prune_checkpoints(self.output_dir, self.config.save_total_limit)
        return path

    def resume(self, path: Path) -> None:
        """Restore weights, EMA, optimizer, scheduler, RNG and step from a checkpoint directory."""
        saved, saved_config = self.load_weights(path / self.weights_name)
        config = self.model_config_dict()
        if saved_config != config:
            changed = [key for key, value in config.items() if saved_config.get(key) != value]
            raise CheckpointError(
                f"checkpoint {path} was written with a different model config (fields: {', '.join(changed)}); "
                "pass a new --output_dir for this model (or delete the old run directory)"
            )
        state = load_training_state(path / "training_state.pt")
        if self.runtime is not None:
            self.runtime.check_checkpoint_mode(path)
        if self.runtime is not None and self.runtime.is_deepspeed:
            self.runtime.load_engine(path)  # weights (from the fp32 master copy) and optimizer shards
        else:
            self.trained_model.load_state_dict(saved.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if not (path / "ema").is_dir():
                raise CheckpointError(
                    f"checkpoint {path} has no ema/ weights but ema_decay is set; set ema_decay: 0"
                )
            self.ema.model.load_state_dict(self.load_weights(path / "ema")[0].state_dict())
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.num_updates = int(state["ema_num_updates"])
        restore_rng_state(state["rng"], self.generator)
        self.step = int(state["step"])
        self.loss_window = [float(loss) for loss in state.get("loss_window", [])]
        self.final_metrics = state.get("final_metrics")
        self.load_extra_checkpoint_state(state)
        logger.info("resumed from %s at step %d", path, self.step)

    def extra_checkpoint_state(self) -> dict[str, Any]:
        """Entries added to ``training_state.pt`` besides the loop's own (state a resume needs that the
        weights, optimizer, scheduler and RNG do not hold, e.g. summary fields computed before step 0)."""
        return {}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_checkpoint_state` saved."""
        return None

    @abc.abstractmethod
    def periodic_evaluation(self, plots: Path) -> dict[str, float]:
        """Evaluate during training (and save what goes with it, e.g. a sample grid under ``plots``)."""

    @abc.abstractmethod
    def final_evaluation(self, plots: Path) -> dict[str, float]:
        """The last evaluation, after training."""

    #: The tracker tag of the image :meth:`evaluation_image` names.
    evaluation_image_tag = "eval/samples"

    def evaluation_image(self, plots: Path, *, final: bool) -> Path | None:
        """The image file the periodic (or final) evaluation at this step writes, if any; the loop sends it
        to the trackers of ``report_to``."""
        return None

    def _log_evaluation_image(self, run: RunLogger | NullRunLogger, plots: Path, *, final: bool) -> None:
        path = self.evaluation_image(plots, final=final)
        if isinstance(run, RunLogger) and path is not None and path.is_file():
            run.log_image(self.step, self.evaluation_image_tag, path)

    @abc.abstractmethod
    def final_outputs(self, final: dict[str, float]) -> dict[str, Any]:
        """Save the final model (with ``card=self.model_card(final, ...)``); returns the summary entries that
        are specific to the trainer."""

    def model_card(self, final: dict[str, float], **outputs: Any) -> ModelCardInfo:
        """The final model's card (:func:`rlflow.utils.model_card.model_card_info`) from the numbers
        ``summary.json`` gets: ``steps``, ``num_parameters``, the trainer's own ``outputs`` and the final
        evaluation without its ``eval/`` prefix."""
        return model_card_info(
            self.config,
            {
                "steps": self.step,
                "num_parameters": sum(p.numel() for p in self.trainable),
                **outputs,
                **{key.removeprefix("eval/"): value for key, value in final.items()},
            },
        )

    def optimizer_step(self, loss: Tensor, averaged: nn.Module) -> dict[str, float]:
        """Backward, clip, step the optimizer and the lr schedule, update the EMA of ``averaged``, count
        the step; a non-finite loss stops the run before the weights are touched."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.step}; lower lr or check the data for outliers"
            )
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        if self.runtime is None:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
            self.optimizer.step()
        else:  # DDP averages the gradients; a DeepSpeed engine also clips and steps inside backward
            self.runtime.zero_grad(self.optimizer)
            self.runtime.backward(loss)
            grad_norm = self.runtime.step(self.optimizer, self.trainable)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(averaged)
        self.step += 1
        self.last_losses = {"train/loss": loss.item()}
        return {
            "train/loss": self.last_losses["train/loss"],
            "train/grad_norm": grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
        }

    def close_run(self, run: RunLogger | NullRunLogger) -> None:
        run.close()

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.4f}"}

    def train(self) -> dict[str, Any]:
        """Run (or resume) training, then write the final model, plots and ``summary.json``."""
        config = self.config
        self.loss_window, self.final_metrics = [], None
        existing = checkpoint_to_resume(
            self.output_dir, resume=config.resume, main=self.is_main, command=command_of(config)
        )
        if existing is not None:
            self.resume(existing)
            if self.step < config.steps:  # a finished run given more steps: its final evaluation is stale
                self.final_metrics = None
            if self.step >= config.steps and (self.output_dir / "summary.json").is_file():
                return finished_run_summary(self, f"{self.step} steps")
        run = open_run_logger(
            self.output_dir,
            config,
            resumed_at=self.step if existing is not None else None,
            main=self.is_main,
        )
        plots = self.output_dir / "plots"
        # The log window may have begun before the checkpoint resumed from (its losses come with it);
        # the step rate counts only this process's steps.
        start_time, window_start = time.perf_counter(), time.perf_counter()
        window, window_steps = self.loss_window, 0
        try:
            with tqdm(
                total=config.steps,
                initial=self.step,
                desc=self.progress_name,
                unit="step",
                disable=None if self.is_main else True,
            ) as bar:
                while self.step < config.steps:
                    metrics = self.update()
                    window.append(metrics["train/loss"])
                    window_steps += 1
                    bar.update(1)
                    if self.step % config.logging_steps == 0:
                        elapsed = time.perf_counter() - window_start
                        metrics["train/loss"] = sum(window) / len(window)
                        metrics["time/steps_per_second"] = window_steps / max(elapsed, 1e-9)
                        run.log(self.step, metrics)
                        bar.set_postfix(self.progress_postfix(metrics))
                        window.clear()  # the same list as self.loss_window, which checkpoints save
                        window_start, window_steps = time.perf_counter(), 0
                    if self.step % config.eval_steps == 0 and self.step < config.steps:
                        evaluation = self.periodic_evaluation(plots)
                        run.log(self.step, evaluation)
                        self._log_evaluation_image(run, plots, final=False)
                        bar.set_postfix(
                            self.progress_postfix({"train/loss": metrics["train/loss"], **evaluation})
                        )
                    if self.step % config.save_steps == 0 and self.step < config.steps:
                        self.save_checkpoint()
            final = self.final_metrics
            if final is None:  # else resumed from the last checkpoint: evaluated and logged already
                final = self.final_evaluation(plots)
                run.log(self.step, final)
                self._log_evaluation_image(run, plots, final=True)
                self.final_metrics = final
                self.save_checkpoint()
            summary: dict[str, Any] = {
                "steps": self.step,
                "wall_seconds": time.perf_counter() - start_time,
                "num_parameters": sum(p.numel() for p in self.trainable),
                **self.final_outputs(final),
                "weights": "ema" if self.ema is not None else "raw",
                **{key.removeprefix("eval/"): value for key, value in final.items()},
            }
            run.write_summary(summary)
        finally:
            self.close_run(run)
        if self.runtime is not None:
            self.runtime.finish()
        announce_and_push(self, summary)
        return summary

    #: ``(summary key, label)`` of the results the last log line reports, where the summary has them.
    summary_results: tuple[tuple[str, str], ...] = ()

    def done_line(self, summary: dict[str, Any]) -> str:
        """The run's last log line, e.g. ``done: 3000 steps in 41.2 s; final held-out sliced W2 0.031;
        policy saved to runs/toy/policy`` (from ``summary.json``'s entries)."""
        from rlflow.utils.run import done_line, plural, result_phrase

        saved = next((summary[key] for key in ("policy_dir", "model_dir") if summary.get(key)), None)
        return done_line(
            plural(int(summary.get("steps", self.step)), "step"),
            summary.get("wall_seconds"),
            [
                result_phrase(label, summary.get(key), stderr=summary.get(f"{key}_stderr"))
                for key, label in self.summary_results
            ],
            None if saved is None else f"saved to {saved}",
        )
