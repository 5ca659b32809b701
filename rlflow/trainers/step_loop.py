"""The supervised trainers' side of the one training loop (``pretrain``, ``pretrain-t2i``, ``pretrain-vae``,
``reward-model``): :class:`StepLoopTrainer` is a :class:`~rlflow.trainers.loop.TrainingLoop` whose
iteration is one optimizer step on a batch, called a step (``self.step``, ``config.steps``).

What it adds to the loop: a training loss averaged over the ``logging_steps`` steps since the last row
(the window is checkpointed, so a resumed run logs the same mean), no evaluation of the starting model, a
final evaluation that the last checkpoint saves (a run resumed from there does not evaluate again), and
the shared weight / optimizer / EMA / RNG checkpoint. A trainer supplies the parts that differ:
:meth:`update` (which ends with the shared :meth:`optimizer_step`), its weight I/O for the shared
:meth:`save_checkpoint` / :meth:`resume` (:attr:`trained_model`, :meth:`save_weights`, :meth:`load_weights`,
:meth:`model_config_dict`), :meth:`periodic_evaluation`, :meth:`final_evaluation` and :meth:`final_outputs`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rlflow.config import ConfigError, option
from rlflow.trainers.loop import TrainingConfig, TrainingLoop
from rlflow.utils.checkpoint import (
    CheckpointError,
    atomic_directory,
    check_finite_checkpoint,
    checkpoint_dir,
    load_training_state,
    prune_checkpoints,
    save_training_state,
)
from rlflow.utils.model_card import ModelCardInfo, model_card_info
from rlflow.utils.run import NullRunLogger, RunLogger
from rlflow.utils.seeding import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)


@dataclass
class StepTrainingConfig(TrainingConfig):
    """The fields of the supervised trainers' configs (``pretrain``, ``pretrain-t2i``, ``pretrain-vae``,
    ``reward-model``) besides :class:`~rlflow.trainers.loop.TrainingConfig`'s: the optimizer and its
    schedule, and how often a row is logged. Each command re-declares a field only to change its default
    (and declares ``batch_size``, whose unit is its own)."""

    steps: int = option(3000, help="Number of optimizer steps.")
    learning_rate: float = option(1e-3, help="Peak learning rate (AdamW).")
    lr_scheduler_type: Literal["constant", "cosine", "linear"] = option("cosine", help="Decay after warm-up.")
    warmup_steps: int = option(100, help="Linear learning-rate warm-up steps.")
    min_lr_ratio: float = option(0.1, help="Final learning rate as a fraction of learning_rate.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    max_grad_norm: float | None = option(1.0, help="Clip the global gradient norm (null: no clipping).")
    logging_steps: int = option(
        50, help="Log training metrics (the loss averaged since the last row) every N steps."
    )
    eval_steps: int = option(500, help="Evaluate every N steps (and at the end).")
    save_steps: int = option(500, help="Write a resumable checkpoint every N steps (and at the end).")
    plot_curves: bool = option(True, help="Render plots/<prefix>.png metric curves when the run ends.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


class StepLoopTrainer(TrainingLoop):
    """Base class: ``self.config`` (``steps``, ``logging_steps``, ``eval_steps``, ``save_steps``,
    ``resume``, ``report_to``), ``self.output_dir``, ``self.step``, ``self.ema``, ``self.trainable``."""

    #: The progress bar's label.
    progress_name: str = "train"
    unit = "step"
    evaluates_base = False
    skip_finished_run = True
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

    @property
    def step(self) -> int:
        """Optimizer steps taken: the loop's iteration count."""
        return self.iteration

    @step.setter
    def step(self, value: int) -> None:
        self.iteration = value

    @property
    def total(self) -> int:
        return self.config.steps

    @property
    def write_plots(self) -> bool:  # type: ignore[override]
        return self.config.plot_curves

    def setup_optimization(self, trainable: list, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``self.trainable``, ``self.optimizer`` (AdamW with the config's ``learning_rate`` and
        ``weight_decay`` unless one is given) and ``self.scheduler`` (``lr_scheduler_type`` with warm-up,
        over ``steps``)."""
        from rlflow.utils.schedules import make_lr_scheduler

        config = self.config
        self.trainable = trainable
        self.optimizer = optimizer or torch.optim.AdamW(
            trainable, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.scheduler = make_lr_scheduler(
            self.optimizer,
            config.lr_scheduler_type,
            total_steps=config.steps,
            warmup_steps=config.warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
        )

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
        """One optimizer step (the loop then counts it in ``self.step``); returns metrics incl. ``train/loss``."""

    # ------------------------------------------------------------------- the loop's parts, as steps
    def collect(self) -> None:
        """Nothing: :meth:`update` draws its own batch."""
        return None

    def learn(self, collected: None) -> dict[str, float]:
        return self.update()

    def iteration_timings(self, collect_seconds: float, iteration_seconds: float) -> dict[str, float]:
        return {}  # the logged rows carry the step rate over the window instead

    def started(self) -> None:
        # The log window may have begun before the checkpoint resumed from (its losses come with it);
        # the step rate counts only this process's steps.
        self._window_start, self._window_steps = time.perf_counter(), 0

    def logged_row(self, metrics: dict[str, float]) -> dict[str, float] | None:
        """Every ``logging_steps`` steps: the metrics with the training loss averaged since the last row."""
        self.loss_window.append(metrics["train/loss"])
        self._window_steps += 1
        if self.step % self.config.logging_steps:
            return None
        elapsed = time.perf_counter() - self._window_start
        row = {
            **metrics,
            "train/loss": sum(self.loss_window) / len(self.loss_window),
            "time/steps_per_second": self._window_steps / max(elapsed, 1e-9),
        }
        self.loss_window.clear()
        self._window_start, self._window_steps = time.perf_counter(), 0
        return row

    def evaluation(self, *, final: bool) -> tuple[dict[str, float], Path | None]:
        plots = self.output_dir / "plots"
        image = self.evaluation_image(plots, final=final)
        metrics = self.final_evaluation(plots) if final else self.periodic_evaluation(plots)
        return metrics, image

    def finish(self, run: RunLogger | NullRunLogger, final: dict[str, float], wall: float) -> dict[str, Any]:
        return {
            "steps": self.step,
            "wall_seconds": wall,
            "num_parameters": sum(p.numel() for p in self.trainable),
            **self.final_outputs(final),
            "weights": "ema" if self.ema is not None else "raw",
            **{key.removeprefix("eval/"): value for key, value in final.items()},
        }

    def succeeded(self) -> None:
        if self.runtime is not None:
            self.runtime.finish()

    def train(self) -> dict[str, Any]:
        """Run (or resume) training, then write the final model, plots and ``summary.json``."""
        self.loss_window = []
        return super().train()

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

    def evaluation_image(self, plots: Path, *, final: bool) -> Path | None:
        """The image file the periodic (or final) evaluation at this step writes, if any; the loop sends it
        to the trackers of ``report_to`` under :attr:`evaluation_image_tag`."""
        return None

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
        self.last_losses = {"train/loss": loss.item()}
        return {
            "train/loss": self.last_losses["train/loss"],
            "train/grad_norm": grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
        }

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        postfix = {"loss": f"{metrics['train/loss']:.4f}"}
        if "eval/accuracy" in metrics:
            postfix["acc"] = f"{metrics['eval/accuracy']:.3f}"
        return postfix

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
