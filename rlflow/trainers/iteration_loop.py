"""The text-to-image trainers' side of the shared loop (``grpo``, ``nft``, ``dpo``, ``rwr``, ``actor-critic``).

:class:`IterationLoopTrainer` runs :class:`~rlflow.trainers.loop.TrainingLoop` (resume, base evaluation,
collect -> learn per iteration, evaluation and checkpoint schedules, final save, ``summary.json``, Hub push)
for a :class:`~rlflow.generators.diffusers_flow.DiffusersFlowModel` under accelerate: it sets up the runtime
(DDP, or DeepSpeed when launched with a ZeRO config), the optimizer, LR scheduler and EMA, writes
checkpoints collectively (every rank writes its DeepSpeed shard and its own RNG state; ZeRO-3 gathers the
weights; see :mod:`rlflow.utils.distributed`), swaps the EMA weights in for the final save, writes an image
grid at every evaluation and counts velocity evaluations (:attr:`tracks_nfe`). Under ``accelerate launch``
every process runs the loop; only the main process logs and writes grids.

A trainer subclasses :class:`IterationLoopTrainer`, sets the attributes below in its ``__init__`` (the
accelerator through :meth:`IterationLoopTrainer.setup_runtime`) and supplies the parts that differ:
:meth:`~rlflow.trainers.loop.TrainingLoop.collect`, :meth:`~rlflow.trainers.loop.TrainingLoop.learn` (the
update plus the iteration's trainer-specific metrics), :meth:`~rlflow.trainers.loop.TrainingLoop.evaluate`,
:meth:`summary_fields` and :attr:`~rlflow.trainers.loop.TrainingLoop.progress_name`; optional hooks: the
loop's (``finished`` for a compute budget, ``progress_postfix``, ``skip_finished_run``, ``write_plots``),
:meth:`extra_checkpoint_state` / :meth:`load_extra_checkpoint_state` and :attr:`tracks_nfe`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlflow.config import ConfigError
from rlflow.flows.time import resolve_time_grid
from rlflow.rollout.prompts import build_prompt_source, evaluate_reward
from rlflow.trainers.loop import TrainingLoop
from rlflow.trainers.text_to_image import build_reward, load_model, prepare_model, verifier_metrics
from rlflow.utils.checkpoint import (
    check_finite_checkpoint,
    checkpoint_dir,
    load_state_dict,
    load_training_state,
    prune_checkpoints,
    save_state_dict,
    save_training_state,
)
from rlflow.utils.distributed import DistributedRuntime, MemoryConfig, make_optimizer, shared_atomic_directory
from rlflow.utils.ema import EMA
from rlflow.utils.model_card import model_card_info
from rlflow.utils.run import NullRunLogger, RunLogger
from rlflow.utils.seeding import capture_rng_state, prepare_run, restore_rng_state

logger = logging.getLogger(__name__)


class IterationLoopTrainer(TrainingLoop):
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

    def setup_text_to_image(
        self,
        config: Any,
        *,
        model: Any | None,
        prompts: Any | None,
        reward: Any | None,
        micro_batch_size: int,
        reference: bool,
        reward_required: bool = True,
    ) -> None:
        """What every text-to-image trainer sets up first, in this order: the runtime, this rank's generator
        (seed + rank; every global RNG seeded), the run directory, the model (given or loaded from
        ``config.model``) on the device with its LoRA adapters or - for a full fine-tune with ``reference`` - a
        frozen reference copy, the time-grid kind, the prompt source and the reward (``None`` when
        ``config.rewards`` is empty and not ``reward_required``). Adapters come before the optimizer and the
        wrapping (:meth:`setup_optimization`)."""
        self.config = config
        self.setup_runtime(
            device=config.device,
            memory=config.memory,
            max_grad_norm=config.max_grad_norm,
            micro_batch_size=micro_batch_size,
        )
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.generator = prepare_run(config.seed + self.rank, config.num_threads)
        self.output_dir = Path(config.output_dir)
        self.model = model if model is not None else load_model(config.model)
        self.model.to(self.device)
        prepare_model(config.model, model=self.model, reference=reference)
        self.time_grid_kind = resolve_time_grid(config.time_grid, self.model)
        self.prompts = prompts if prompts is not None else build_prompt_source(config)
        if reward is None and (config.rewards or reward_required):
            reward = build_reward(config.rewards)
        self.reward = reward

    def sample_prompt_groups(self, method: str = "euler") -> Any:
        """This iteration's ``prompts_per_iteration`` prompts (drawn with ``self.generator``), each with
        ``samples_per_prompt`` ODE samples (``num_steps`` steps of ``method``) of the current weights, decoded
        and scored by ``self.reward``: an :class:`~rlflow.trainers.flow_objectives.OnlineGroups`."""
        from rlflow.trainers.flow_objectives import sample_groups

        config = self.config
        prompts = self.prompts.sample(config.prompts_per_iteration, self.generator)
        self.model.eval()
        return sample_groups(
            self.model,
            prompts,
            config.samples_per_prompt,
            self.reward,
            num_steps=config.num_steps,
            time_shift=config.time_shift,
            grid=self.time_grid_kind,
            generator=self.generator,
            chunk_size=config.sample_chunk_size,
            device=self.device,
            method=method,
        )

    @torch.no_grad()
    def evaluation_images(self) -> tuple[list[str], Tensor]:
        """The evaluation prompts and their deterministic ODE samples (``eval_num_steps`` Euler steps) of the
        current (EMA) weights, decoded; the same noise every evaluation."""
        from rlflow.trainers.flow_objectives import decode_in_chunks, ode_sample

        config = self.config
        prompts = self.prompts.eval_prompts()
        backup = self._swap_in_ema()
        self.model.eval()
        try:
            latents = ode_sample(
                self.model,
                prompts,
                num_steps=config.eval_num_steps,
                time_shift=config.time_shift,
                grid=self.time_grid_kind,
                generator=torch.Generator().manual_seed(config.seed + 12345),
                chunk_size=config.sample_chunk_size,
                device=self.device,
            )
            images = decode_in_chunks(
                self.model, latents, chunk_size=config.sample_chunk_size, device=self.device
            )
        finally:
            self._restore(backup)
        return prompts, images

    def image_metrics(
        self, images: Tensor, prompts: Sequence[str], grid_path: Path | None
    ) -> dict[str, float]:
        """``eval/reward_mean``, each reward component's mean and the verifier's accuracy (when ``self.reward``
        verifies prompts) of evaluation images; their grid goes to ``grid_path`` on the main process."""
        metrics: dict[str, float] = {}
        if self.reward is not None:
            result = evaluate_reward(self.reward, images, list(prompts))
            metrics["eval/reward_mean"] = float(result.total.mean())
            for name, value in result.components.items():
                metrics[f"eval/{name}_mean"] = float(value.mean())
            metrics.update(verifier_metrics(self.reward, images, prompts, self.prompts))
        if grid_path is not None and self.is_main:
            from rlflow.utils.plotting import save_image_grid

            n = min(self.config.grid_size, len(prompts))
            save_image_grid(images[:n], list(prompts[:n]), grid_path)
        return metrics

    def setup_optimization(self, *, total_updates: int) -> None:
        """``self.trainable`` (the model's trainable parameters), the optimizer over them with the config's
        ``learning_rate`` / ``weight_decay``, its LR scheduler (``lr_scheduler_type``, ``warmup_steps``, over
        ``total_updates`` optimizer steps), the transformer wrapped (DDP / DeepSpeed engine) with them, and the
        EMA (``ema_decay``; of this rank's shards under ZeRO-3). Call after the adapters (or the frozen reference
        copy) exist: wrapping registers the trainable parameters."""
        from rlflow.utils.schedules import make_lr_scheduler

        config = self.config
        self.trainable = list(self.model.trainable_parameters())
        if not self.trainable:
            raise ConfigError("the model has no trainable parameters (check model.lora_r / lora_target_modules)")
        self.optimizer = make_optimizer(
            self.trainable,
            kind=self.runtime.memory.optimizer,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        # The scheduler drives the raw optimizer's param groups, which DeepSpeed's ZeRO optimizer shares.
        self.scheduler = make_lr_scheduler(
            self.optimizer,
            config.lr_scheduler_type,
            total_steps=max(1, total_updates),
            warmup_steps=config.warmup_steps,
        )
        # Only the transformer is wrapped: its forward is the velocity's forward.
        self.model.transformer, self.optimizer = self.runtime.prepare(self.model.transformer, self.optimizer)
        decay = config.ema_decay
        self.ema = EMA(self.runtime.local_view(self.trainable), decay=decay) if decay > 0 else None

    def update_ema(self) -> None:
        """Move the EMA (if any) towards the current weights; call after each optimizer step."""
        if self.ema is not None:
            self.ema.update(self.runtime.local_view(self.trainable))

    def summary_fields(
        self, final: dict[str, float], wall: float, base: dict[str, Any] | None, model_dir: Path
    ) -> dict[str, Any]:
        """The ``summary.json`` entries (``base``: the step-0 metrics row, main process only): iterations, NFEs
        where tracked, wall time, the final evaluation with base -> final reward and accuracy, the model."""
        return {
            "iterations": self.iteration,
            **({"nfe": self.nfe} if self.tracks_nfe else {}),
            "wall_seconds": wall,
            "final": final,
            **final_and_base(final, base, ["eval/reward_mean"]),
            "model_dir": str(model_dir),
            **final_and_base(final, base, ["eval/accuracy"]),
        }

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

    # ------------------------------------------------------------------------------- loop hooks
    def counters(self) -> dict[str, float]:
        return {"rollout/nfe_total": self.nfe} if self.tracks_nfe else {}

    def grid_path(self, step: int) -> Path | None:
        return self.output_dir / "images" / f"eval_{step:05d}.png"

    def finish(self, run: RunLogger | NullRunLogger, final: dict[str, float], wall: float) -> dict[str, Any]:
        return self._summary(final, wall)

    def succeeded(self) -> None:
        self.runtime.finish()

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
