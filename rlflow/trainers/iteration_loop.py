"""The iteration loop shared by the online fine-tuning trainers (``grpo``, ``dpo``, ``rwr``, ``actor-critic``).

One iteration collects data with the current policy (rollouts, preference pairs) and updates on it. The
loop resumes from the latest checkpoint, evaluates the base model at step 0, then per iteration logs the
update's metrics with the collect / iteration timings, evaluates (with an image grid) every
``eval_steps`` iterations and at the end, checkpoints every ``save_steps`` iterations and at the
end, and finally saves the model (EMA weights if enabled, with a model card) and writes ``summary.json``
(then pushes the model to the Hugging Face Hub if ``push_to_hub``). Under ``accelerate
launch`` every process runs the loop; only the main process logs and writes grids. Checkpoints and the
final save are collective (every rank writes its DeepSpeed shard and its own RNG state; ZeRO-3 gathers the
weights): see :mod:`rlflow.utils.distributed`.

A trainer subclasses :class:`IterationLoopTrainer`, sets the attributes below in its ``__init__`` (the
accelerator through :meth:`IterationLoopTrainer.setup_runtime`) and
supplies the parts that differ: :meth:`collect`, :meth:`learn` (the update plus the iteration's
trainer-specific metrics), :meth:`evaluate`, :meth:`summary_fields` and :attr:`progress_name`; optional
hooks: :meth:`finished` (e.g. a compute budget), :meth:`progress_postfix`, :meth:`extra_checkpoint_state`
/ :meth:`load_extra_checkpoint_state`, :attr:`tracks_nfe`, :attr:`skip_finished_run` and
:attr:`write_plots`.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rlflow.config import ConfigError
from rlflow.utils.checkpoint import (
    check_finite_checkpoint,
    checkpoint_dir,
    checkpoint_to_resume,
    load_state_dict,
    load_training_state,
    prune_checkpoints,
    read_json,
    save_state_dict,
    save_training_state,
)
from rlflow.utils.distributed import DistributedRuntime, MemoryConfig, make_optimizer, shared_atomic_directory
from rlflow.utils.ema import EMA
from rlflow.utils.model_card import model_card_info, push_run_to_hub
from rlflow.utils.output_dirs import command_of
from rlflow.utils.run import NullRunLogger, RunLogger, open_run_logger
from rlflow.utils.seeding import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)


class IterationLoopTrainer(abc.ABC):
    """Base class: ``self.config`` (``iterations``, ``eval_steps``, ``save_steps``,
    ``save_total_limit``, ``resume``, ``report_to``, ``seed``), ``self.runtime`` / ``self.accelerator``,
    ``self.model`` (whose
    ``transformer`` holds the trainable parameters), ``self.trainable``, ``self.optimizer``,
    ``self.scheduler``, ``self.ema`` (or ``None``), ``self.generator``, ``self.output_dir`` and
    ``self.iteration`` (and ``self.nfe`` where :attr:`tracks_nfe`)."""

    config: Any
    runtime: DistributedRuntime
    accelerator: Any
    model: Any
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any
    generator: torch.Generator
    output_dir: Path
    iteration: int
    nfe: int
    #: The trainer counts velocity evaluations in ``self.nfe``: checkpointed, and logged as
    #: ``rollout/nfe_total`` every iteration (0 at the base evaluation).
    tracks_nfe: bool = False
    #: Resuming a run that already finished returns its ``summary.json`` instead of evaluating again.
    skip_finished_run: bool = False
    #: The last iteration's metrics (set by the loop): their losses are named when a checkpoint is refused.
    last_metrics: dict[str, Any] | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ------------------------------------------------------------------------------------- setup
    def setup_runtime(
        self, *, device: str, memory: MemoryConfig, max_grad_norm: float, micro_batch_size: int
    ):
        """Create ``self.runtime`` (accelerate; DeepSpeed when launched with a ZeRO config) and ``self.accelerator``."""
        self.runtime = DistributedRuntime(
            device=device, memory=memory, max_grad_norm=max_grad_norm, micro_batch_size=micro_batch_size
        )
        self.accelerator = self.runtime.accelerator
        return self.runtime

    def setup_optimization(
        self,
        *,
        learning_rate: float,
        weight_decay: float,
        lr_scheduler_type: str,
        total_updates: int,
        warmup_steps: int,
        ema_decay: float,
    ) -> None:
        """The optimizer over ``self.trainable`` and its LR scheduler, the transformer wrapped (DDP /
        DeepSpeed engine) with them, and the EMA (of this rank's shards under ZeRO-3). Call after the
        adapters (or the frozen reference copy) exist: wrapping registers the trainable parameters."""
        from rlflow.utils.schedules import make_lr_scheduler

        if not self.trainable:
            raise ConfigError("the model has no trainable parameters (check model.lora_r / lora_targets)")
        self.optimizer = make_optimizer(
            self.trainable,
            kind=self.runtime.memory.optimizer,
            lr=learning_rate,
            weight_decay=weight_decay,
        )
        # The scheduler drives the raw optimizer's param groups, which DeepSpeed's ZeRO optimizer shares.
        self.scheduler = make_lr_scheduler(
            self.optimizer, lr_scheduler_type, total_steps=max(1, total_updates), warmup_steps=warmup_steps
        )
        # Only the transformer is wrapped: its forward is the velocity's forward.
        self.model.transformer, self.optimizer = self.runtime.prepare(self.model.transformer, self.optimizer)
        self.ema = EMA(self.runtime.local_view(self.trainable), decay=ema_decay) if ema_decay > 0 else None

    def update_ema(self) -> None:
        """Move the EMA (if any) towards the current weights; call after each optimizer step."""
        if self.ema is not None:
            self.ema.update(self.runtime.local_view(self.trainable))

    @property
    @abc.abstractmethod
    def progress_name(self) -> str:
        """The progress bar's label."""

    @property
    def write_plots(self) -> bool:
        """Whether closing the run logger plots the metric curves."""
        return True

    @abc.abstractmethod
    def collect(self) -> Any:
        """This iteration's data, sampled with the current policy (or drawn from a fixed set)."""

    @abc.abstractmethod
    def learn(self, collected: Any) -> dict[str, float]:
        """Update on what :meth:`collect` returned; returns the iteration's metrics (the loop adds the
        timings, ``rollout/nfe_total`` and the evaluation). Runs before ``self.iteration`` is counted."""

    @abc.abstractmethod
    def evaluate(self, *, grid_path: Path | None = None) -> dict[str, float]:
        """Evaluation metrics (``eval/...``) of the current (EMA) weights; saves an image grid to
        ``grid_path`` on the main process."""

    @abc.abstractmethod
    def summary_fields(
        self, final: dict[str, float], wall: float, base: dict[str, Any] | None, model_dir: Path
    ) -> dict[str, Any]:
        """The ``summary.json`` entries; ``base`` is the step-0 metrics row (main process only)."""

    def finished(self) -> bool:
        """Whether training is over (after all iterations; a trainer may add a budget)."""
        return self.iteration >= self.config.iterations

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after an iteration (an empty dict keeps the last one)."""
        return {"reward": f"{metrics['rollout/reward_mean']:.3f}"}

    def extra_checkpoint_state(self) -> dict[str, Any]:
        """Entries added to ``training_state.pt`` besides the loop's own."""
        return {}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_checkpoint_state` saved (called before the RNG state is restored)."""
        return None

    # ------------------------------------------------------------------------------------- EMA
    def _swap_in_ema(self) -> list[Tensor] | None:
        """Copy the EMA weights into the trained parameters (every rank: its shards under ZeRO-3; DeepSpeed's
        fp32 master weights are separate and untouched); returns the raw weights for :meth:`_restore`."""
        if self.ema is None:
            return None
        backup = [t.detach().clone() for t in self.runtime.local_tensors(self.trainable)]
        self.ema.copy_to(self.runtime.local_view(self.trainable))
        return backup

    @torch.no_grad()
    def _restore(self, backup: list[Tensor] | None) -> None:
        if backup is not None:
            for tensor, saved in zip(self.runtime.local_tensors(self.trainable), backup, strict=True):
                tensor.copy_(saved)

    # ------------------------------------------------------------------------------------- checkpoints
    def _trainable_names(self) -> dict[int, str]:
        # Names from the unwrapped transformer, so a checkpoint written under DDP loads without it.
        return {id(p): n for n, p in self.accelerator.unwrap_model(self.model.transformer).named_parameters()}

    def trainable_name_list(self) -> list[str]:
        """The names of ``self.trainable`` in order (checkpoint keys of per-parameter state)."""
        names = self._trainable_names()
        return [names[id(p)] for p in self.trainable]

    def _trainable_state(self) -> dict[str, Tensor]:
        """The full trainable weights (gathered under ZeRO-3: call on every rank)."""
        names = self._trainable_names()
        with self.runtime.full_parameters(self.trainable):
            return {names[id(p)]: p.detach().clone() for p in self.trainable}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_N`` atomically (call on every rank): the full trainable weights as
        safetensors, the loop's state as a torch file, each rank's RNG (and ZeRO-3 EMA shard) in
        ``rank_R.pt``, and under DeepSpeed the engine's sharded optimizer state."""
        path = checkpoint_dir(self.output_dir, self.iteration)
        trainable = self._trainable_state()
        sharded_ema = self.ema is not None and self.runtime.zero_stage == 3
        self._check_finite(path, trainable, sharded_ema)
        with shared_atomic_directory(path, self.runtime) as tmp:
            if self.is_main:
                save_state_dict(trainable, tmp / "trainable.safetensors")
                state = {
                    "iteration": self.iteration,
                    **({"nfe": self.nfe} if self.tracks_nfe else {}),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": capture_rng_state(self.generator),
                    "world_size": self.runtime.world_size,
                    "mode": self.runtime.mode,
                    **self.extra_checkpoint_state(),
                }
                if not self.runtime.is_deepspeed:
                    state["optimizer"] = self.optimizer.state_dict()
                if self.ema is not None and not sharded_ema:
                    state["ema"] = self.ema.state_dict()
                save_training_state(tmp / "training_state.pt", state)
            rank_state: dict[str, Any] = {"rng": capture_rng_state(self.generator)}
            if sharded_ema:
                rank_state["ema"] = self.ema.state_dict()
            save_training_state(tmp / f"rank_{self.runtime.rank}.pt", rank_state)
            self.runtime.save_engine(tmp)
        if self.is_main:
            prune_checkpoints(self.output_dir, self.config.save_total_limit)
        return path

    def _check_finite(self, path: Path, trainable: dict[str, Tensor], sharded_ema: bool) -> None:
        """Refuse (:class:`~rlflow.errors.NonFiniteError`) to checkpoint NaN/inf weights or optimizer state.

        Runs on every rank before anything is created, on what every rank holds alike (the gathered
        trainable weights; the replicated optimizer, EMA and extra state), so all ranks stop together and
        none waits in the collective write. A ZeRO-3 EMA shard is not checked: it is an average of the
        weights, which are.
        """
        losses = {
            key: value
            for key, value in (self.last_metrics or {}).items()
            if "loss" in key
            and (isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1))
        }
        check_finite_checkpoint(
            path,
            where=f"iteration {self.iteration}",
            weights={
                "trainable": trainable,
                **({"ema": self.ema.state_dict()} if self.ema is not None and not sharded_ema else {}),
            },
            optimizers={} if self.runtime.is_deepspeed else {"optimizer": self.optimizer},
            state={"extra": self.extra_checkpoint_state()},
            losses={key: float(value) for key, value in losses.items()},
            config=self.config,
        )

    def resume(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, EMA, extra state, RNG and counters from a checkpoint
        (every rank)."""
        self.runtime.check_checkpoint_mode(path)
        saved = load_state_dict(path / "trainable.safetensors")
        names = self._trainable_names()
        current = {names[id(p)]: p for p in self.trainable}
        if set(saved) != set(current) or any(
            saved[k].shape != getattr(current[k], "ds_shape", current[k].shape) for k in saved
        ):
            raise ConfigError(
                f"checkpoint {path} was written for different trainable parameters (another model or LoRA "
                "config); use a new output_dir"
            )
        state = load_training_state(path / "training_state.pt")
        if self.runtime.is_deepspeed:
            self.runtime.load_engine(path)  # weights (from the fp32 master copy) and optimizer shards
        else:
            with torch.no_grad():
                for name, param in current.items():
                    param.copy_(saved[name])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rank_file = path / f"rank_{self.runtime.rank}.pt"
        rank_state = load_training_state(rank_file) if rank_file.is_file() else None
        if self.ema is not None:
            ema_state = state.get("ema") or (rank_state or {}).get("ema")
            if ema_state is not None:
                self.ema.load_state_dict(ema_state)
        self.load_extra_checkpoint_state(state)
        if rank_state is not None:
            restore_rng_state(rank_state["rng"], self.generator)
        elif self.runtime.rank == 0:
            restore_rng_state(state["rng"], self.generator)  # a checkpoint from before rank files
        else:
            # More processes than the checkpoint had: a fresh stream per rank (not rank 0's again).
            logger.warning("%s has no RNG state for rank %d; reseeding it", path, self.runtime.rank)
            self.generator.manual_seed(
                self.config.seed + self.runtime.rank + 1_000_003 * int(state["iteration"])
            )
        self.iteration = int(state["iteration"])
        if self.tracks_nfe:
            self.nfe = int(state["nfe"])
        logger.info("resumed from %s at iteration %d", path, self.iteration)

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
                logger.info(
                    "%s already finished %d iterations; nothing to do", self.output_dir, self.iteration
                )
                summary = read_json(self.output_dir / "summary.json", what="run summary")
                if self.is_main:
                    logger.info("%s", self.done_line(summary))
                    push_run_to_hub(config, summary)  # e.g. the upload of the finished run had failed
                return summary
        run = open_run_logger(
            self.output_dir,
            config,
            resumed_at=self.iteration if existing is not None else None,
            main=self.is_main,
        )
        grids = self.output_dir / "images"
        start_time = time.perf_counter()
        summary: dict[str, Any] = {}
        try:
            if existing is None:
                base = self.evaluate(grid_path=grids / "eval_00000.png")
                run.log(0, {**base, **({"rollout/nfe_total": 0} if self.tracks_nfe else {})})
                _log_grid(run, 0, grids / "eval_00000.png")
            last_eval: dict[str, float] | None = None
            with tqdm(
                total=config.iterations,
                initial=self.iteration,
                desc=self.progress_name,
                unit="it",
                disable=None if self.is_main else True,
            ) as bar:
                while not self.finished():
                    tick = time.perf_counter()
                    collected = self.collect()
                    collect_seconds = time.perf_counter() - tick
                    metrics = self.learn(collected)
                    self.iteration += 1
                    if self.tracks_nfe:
                        metrics["rollout/nfe_total"] = self.nfe
                    metrics["time/collect_seconds"] = collect_seconds
                    metrics["time/iteration_seconds"] = time.perf_counter() - tick
                    done = self.finished()
                    grid = None
                    if self.iteration % config.eval_steps == 0 or done:
                        grid = grids / f"eval_{self.iteration:05d}.png"
                        last_eval = self.evaluate(grid_path=grid)
                        metrics.update(last_eval)
                    run.log(self.iteration, metrics)
                    if grid is not None:
                        _log_grid(run, self.iteration, grid)
                    self.last_metrics = metrics
                    bar.update(1)
                    postfix = self.progress_postfix(metrics)
                    if postfix:
                        bar.set_postfix(postfix)
                    if self.iteration % config.save_steps == 0 or done:
                        self.save_checkpoint()  # collective: every rank writes its part
            final = last_eval if last_eval is not None else self.evaluate()
            summary = self._summary(final, time.perf_counter() - start_time)
            run.write_summary(summary)
        finally:
            run.close(plot=self.write_plots)
        self.runtime.finish()  # on success only: a barrier after an error on one rank would hang the others
        if self.is_main:
            logger.info("%s", self.done_line(summary))
            push_run_to_hub(config, summary)  # after the local save: a failed upload loses nothing
        return summary

    def done_line(self, summary: dict[str, Any]) -> str:
        """The run's last log line, e.g. ``done: 40 iterations in 3.2 min; verifier accuracy (base -> final)
        0.278 -> 0.360 +- 0.030; reward (base -> final) 0.410 -> 0.520; model saved to runs/x/model``."""
        from rlflow.utils.run import done_line, plural, result_phrase

        final = summary.get("final") if isinstance(summary.get("final"), dict) else {}

        def phrase(label: str, name: str, stderr: Any = None) -> str | None:
            base = summary.get(f"base_{name}")
            label = f"{label} (base -> final)" if isinstance(base, (int, float)) else f"final {label}"
            return result_phrase(label, summary.get(f"final_{name}"), base=base, stderr=stderr)

        results = [
            phrase("verifier accuracy", "accuracy", stderr=final.get("eval/accuracy_stderr")),
            phrase("held-out implicit preference accuracy", "heldout_implicit_accuracy"),
            phrase("reward", "reward_mean"),
        ]
        saved = summary.get("model_dir")
        return done_line(
            plural(int(summary.get("iterations", self.iteration)), "iteration"),
            summary.get("wall_seconds"),
            results,
            None if saved is None else f"model saved to {saved}",
        )

    def _summary(self, final: dict[str, float], wall: float) -> dict[str, Any]:
        """Save the final model (EMA weights if enabled) to ``model/`` with a model card of the
        :meth:`summary_fields`; returns them."""
        model_dir = self.output_dir / "model"
        base = None
        if self.is_main:
            from rlflow.utils.run import read_metrics

            rows = read_metrics(self.output_dir / "metrics.jsonl")
            base = next((row for row in rows if row["step"] == 0), None)
        fields = self.summary_fields(final, wall, base, model_dir)
        self.accelerator.wait_for_everyone()
        backup = self._swap_in_ema()
        try:
            # Full weights for save_pretrained: ZeRO-3 gathers them on every rank, the main one writes.
            transformer = self.accelerator.unwrap_model(self.model.transformer)
            with self.runtime.full_parameters(list(transformer.parameters())):
                if self.is_main:
                    self.model.save_pretrained(model_dir, card=model_card_info(self.config, fields))
        finally:
            self._restore(backup)
        self.accelerator.wait_for_everyone()
        return {**fields, **self.runtime.sync_report(self.trainable)}


def _log_grid(run: RunLogger | NullRunLogger, step: int, path: Path) -> None:
    """Send an evaluation grid the main process wrote to the trackers (``eval/samples``)."""
    if isinstance(run, RunLogger) and path.is_file():
        run.log_image(step, "eval/samples", path)


def final_and_base(
    final: dict[str, float], base: dict[str, Any] | None, keys: Iterable[str]
) -> dict[str, Any]:
    """``final_X`` / ``base_X`` summary entries for each ``eval/X`` of ``keys`` that the final evaluation has."""
    out: dict[str, Any] = {}
    for key in keys:
        if key in final:
            name = key.removeprefix("eval/")
            out[f"final_{name}"] = final[key]
            out[f"base_{name}"] = None if base is None else base.get(key)
    return out
