"""What data parallelism and DeepSpeed ZeRO change for the trainers, in one place.

The generative trainers (``grpo``, ``dpo``, ``rwr``, ``actor-critic``, ``reward-model``) run unchanged in
one process, under DDP (``accelerate launch`` with several processes) and under DeepSpeed ZeRO stages 1-3
(``accelerate launch --config_file recipes/accelerate/zero2.yaml``). They talk to the hardware through a
:class:`DistributedRuntime`, which hides what differs:

- **The optimizer step.** Under DDP the trainer back-propagates each minibatch, clips the gradient norm and
  steps. DeepSpeed owns the (partitioned) gradients and the fp32 master weights: the engine reduces,
  clips (``gradient_clipping`` in its config, set from the trainer's ``max_grad_norm``) and steps inside
  the last ``backward`` of an update. :meth:`DistributedRuntime.backward` marks that last minibatch
  (``boundary``) and :meth:`DistributedRuntime.step` returns the pre-clip gradient norm either way.
- **Where a parameter's values live.** ZeRO-3 partitions every parameter: ``param.data`` is empty and each
  rank holds a flat shard (``param.ds_tensor``). Code that reads or writes weights outside a forward pass
  (EMA, checkpoints, ``save_pretrained``, checksums) goes through :meth:`local_tensors` (this rank's
  values: an EMA of shards is an EMA of the whole) or :meth:`full_parameters` (gather, collectively).
- **Checkpoints.** DeepSpeed's optimizer state is sharded across ranks: every rank writes its shard into
  the same checkpoint directory (:func:`shared_atomic_directory` publishes it in one rename), and every
  rank keeps its own RNG state, so that a resumed run samples what the uninterrupted one would have.

Everything a trainer does in every process must also be *collective* under ZeRO-3: a forward pass
gathers each layer's shards from all ranks, so all ranks run the same number of forwards (they sample the
same number of chunks and all evaluate), and gathering for a save happens on all ranks.

CPU processes (no GPU) use the gloo backend; DeepSpeed on CPU needs ``DS_ACCELERATOR=cpu`` (see
docs/scale.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rlflow.config import ConfigError, option

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedRuntime",
    "MemoryConfig",
    "make_optimizer",
    "shared_atomic_directory",
]

#: The tag DeepSpeed checkpoints are written under inside a ``checkpoints/step_N`` directory.
DEEPSPEED_TAG = "deepspeed"


@dataclass
class MemoryConfig:
    """Memory features for large models (mostly for GPUs): mixed precision, activation checkpointing,
    8-bit optimizer states. Sharding itself is chosen by the accelerate launch config."""

    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto",
        help="auto: the accelerate launch config's choice (no if launched without one); bf16/fp16: the "
        "network's matmuls in half precision. Latents, log-probs and losses always stay float32.",
    )
    gradient_checkpointing: bool = option(
        False, help="Recompute transformer activations in the backward pass (less memory, ~30% slower)."
    )
    optimizer: Literal["adamw", "adamw_8bit"] = option(
        "adamw", help="adamw (torch) or adamw_8bit (bitsandbytes: 8-bit optimizer states, GPU only)."
    )


def make_optimizer(
    params: Sequence[nn.Parameter], *, kind: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over ``params``: torch's, or bitsandbytes' 8-bit one (states quantised block-wise)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError(
                "memory.optimizer: adamw_8bit needs bitsandbytes (pip install bitsandbytes, on a CUDA "
                "machine); or use memory.optimizer: adamw"
            ) from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"memory.optimizer must be adamw or adamw_8bit, got {kind!r}")


def _use_cpu(device: str) -> bool:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


class DistributedRuntime:
    """The accelerator of a run and the operations whose implementation depends on how it is sharded.

    Args:
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        memory: mixed precision / activation checkpointing / optimizer choice.
        max_grad_norm: gradient clipping norm (DeepSpeed clips inside its step; it is written into the
            engine's config).
        micro_batch_size: samples per forward/backward, recorded in DeepSpeed's config (it only uses it
            for its own batch-size bookkeeping: the trainers feed their own batches).
    """

    def __init__(
        self,
        *,
        device: str,
        memory: MemoryConfig,
        max_grad_norm: float,
        micro_batch_size: int = 1,
    ):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, InitProcessGroupKwargs

        cpu = _use_cpu(device)
        self.memory = memory
        self.max_grad_norm = float(max_grad_norm)
        kwargs: dict[str, Any] = {}
        if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Several CPU processes talk over gloo; without it accelerate + DeepSpeed on CPU would start
            # every process as rank 0 of 1.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        if memory.mixed_precision != "auto":
            kwargs["mixed_precision"] = memory.mixed_precision
        plugin = self._deepspeed_plugin(micro_batch_size)
        if plugin is not None:
            kwargs["deepspeed_plugin"] = plugin
        self.accelerator = Accelerator(cpu=cpu and plugin is None, **kwargs)
        self.is_deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.zero_stage = int(self.accelerator.state.deepspeed_plugin.zero_stage) if self.is_deepspeed else 0
        self.engine: Any = None
        if self.is_deepspeed:
            # accelerate registers the DeepSpeed config with transformers, whose from_pretrained then builds
            # every model under zero.Init, partitioned -- the frozen text encoders and VAE too, which the
            # engine never gathers. rlflow loads models whole and lets the engine partition the trained one.
            try:
                from transformers.integrations import unset_hf_deepspeed_config
            except ImportError:  # no transformers: nothing registered
                pass
            else:
                unset_hf_deepspeed_config()

    def _deepspeed_plugin(self, micro_batch_size: int) -> Any:
        """The DeepSpeed plugin ``accelerate launch`` asked for (``None`` without DeepSpeed), completed with
        what the trainers decide themselves: micro batch, clipping, one micro step per ``backward``."""
        from accelerate.utils import DeepSpeedPlugin
        from accelerate.utils.environment import str_to_bool

        if not str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
            return None
        plugin = DeepSpeedPlugin()
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
        ds.pop("train_batch_size", None)
        # The trainers accumulate over their own minibatches and mark the last one (see backward).
        ds["gradient_accumulation_steps"] = 1
        plugin.gradient_accumulation_steps = 1
        ds["gradient_clipping"] = self.max_grad_norm
        plugin.gradient_clipping = self.max_grad_norm
        offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload not in (None, "none"):
            # The trainers build torch's AdamW; DeepSpeed would insist on its compiled CPU Adam otherwise.
            ds["zero_force_ds_cpu_optimizer"] = False
        return plugin

    # ------------------------------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def mode(self) -> str:
        """``single``, ``ddp`` or ``zero1`` / ``zero2`` / ``zero3`` (for logs and summaries)."""
        if self.is_deepspeed:
            return f"zero{self.zero_stage}"
        return "ddp" if self.world_size > 1 else "single"

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def finish(self) -> None:
        """End the run on every rank together: no rank tears down the process group while another is
        still inside a collective (a gloo peer then aborts)."""
        self.wait()
        self.accelerator.end_training()

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Wrap the trained module (DDP or a DeepSpeed engine) and its optimizer. One per runtime under
        DeepSpeed (an engine owns one model); other trained modules go through :meth:`prepare_extra`."""
        if self.memory.gradient_checkpointing:
            enable_gradient_checkpointing(module)
        module, optimizer = self.accelerator.prepare(module, optimizer)
        if self.is_deepspeed:
            self.engine = self.accelerator.deepspeed_engine_wrapped.engine
            logger.info("DeepSpeed ZeRO stage %d on %d processes", self.zero_stage, self.world_size)
        return module, optimizer

    def prepare_extra(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """A second trained module (e.g. a critic): DDP-wrapped as usual; under DeepSpeed it stays a plain
        replica and :meth:`step_extra` averages its gradients across ranks by hand."""
        if self.is_deepspeed:
            return module.to(self.device), optimizer
        return self.accelerator.prepare(module, optimizer)

    # ------------------------------------------------------------------------------------- optimisation
    def zero_grad(self, optimizer: Any) -> None:
        if not self.is_deepspeed:  # the engine clears its gradients after each step
            optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: Tensor, *, boundary: bool = True) -> None:
        """Back-propagate one minibatch's (already weighted) loss; ``boundary``: the update's last one.

        DeepSpeed accumulates the micro-steps before a boundary and steps the optimizer at it (reduce,
        clip, update, zero), so the trainer's later :meth:`step` only reads the gradient norm.
        """
        if self.engine is None:
            self.accelerator.backward(loss)
            return
        self.engine.set_gradient_accumulation_boundary(boundary)
        # scale_wrt_gas=False: the trainers already weight each minibatch's loss by its share.
        self.engine.backward(loss, scale_wrt_gas=False)
        if boundary:
            self.engine.step()

    def step(self, optimizer: Any, params: Sequence[nn.Parameter]) -> float:
        """Clip and step (DDP / one process); returns the pre-clip global gradient norm."""
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        optimizer.step()
        return float(norm)

    def backward_extra(self, loss: Tensor) -> None:
        """Back-propagate the loss of a module from :meth:`prepare_extra` (not through the engine)."""
        if self.is_deepspeed:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def step_extra(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
        """Step a module from :meth:`prepare_extra` (averaging its gradients by hand under DeepSpeed)."""
        if self.is_deepspeed and self.world_size > 1:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                flat = self.accelerator.reduce(flat, reduction="mean")
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        optimizer.step()

    # ------------------------------------------------------------------------------------- weights
    def local_tensors(self, params: Sequence[nn.Parameter]) -> list[Tensor]:
        """This rank's values of ``params``: the parameters themselves, or their ZeRO-3 shards."""
        if self.zero_stage == 3:
            return [p.ds_tensor for p in params]
        return [p.data for p in params]

    def local_view(self, params: Sequence[nn.Parameter]) -> nn.ParameterList:
        """``local_tensors`` as a ParameterList sharing storage (what an :class:`~rlflow.utils.ema.EMA`
        tracks): under ZeRO-3 an EMA of every rank's shard is a sharded EMA of the whole."""
        if self.zero_stage != 3:
            return nn.ParameterList(params)
        return nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in self.local_tensors(params)])

    @contextlib.contextmanager
    def full_parameters(self, params: Sequence[nn.Parameter]) -> Iterator[None]:
        """Within the block ``params`` hold their full values on every rank, read-only (ZeRO-3 gathers
        them: a collective call)."""
        if self.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield

    def sync_report(self, params: Sequence[nn.Parameter]) -> dict[str, Any]:
        """Summary entries: the launch mode and every process's checksum of the trained weights (equal
        when the replicas stayed in sync; collective)."""
        with self.full_parameters(params):
            checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        checksums = self.accelerator.gather(checksum.to(self.device)).cpu().tolist()
        return {
            "distributed": {"mode": self.mode, "processes": self.world_size},
            "process_param_checksums": checksums,
        }

    # ------------------------------------------------------------------------------------- checkpoints
    def save_engine(self, directory: Path) -> None:
        """Write DeepSpeed's sharded state (optimizer, fp32 master weights) into ``directory`` (all ranks)."""
        if self.engine is not None:
            # Frozen weights (the base model under LoRA) are the base model's: not repeated per checkpoint.
            self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)

    def load_engine(self, directory: Path) -> None:
        """Restore what :meth:`save_engine` wrote (all ranks)."""
        if self.engine is None:
            return
        if not (directory / DEEPSPEED_TAG).is_dir():
            raise ConfigError(
                f"checkpoint {directory} has no DeepSpeed state ({DEEPSPEED_TAG}/): it was written without "
                "DeepSpeed; resume it with the launch config it was trained with, or start a new output_dir"
            )
        self.engine.load_checkpoint(
            str(directory),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )

    def check_checkpoint_mode(self, directory: Path) -> None:
        """A checkpoint written under DeepSpeed holds the optimizer state only in its shards."""
        if self.engine is None and (directory / DEEPSPEED_TAG).is_dir():
            raise ConfigError(
                f"checkpoint {directory} was written under DeepSpeed (its optimizer state is sharded); resume "
                "with the same accelerate launch config (recipes/accelerate/zero*.yaml) or a new output_dir"
            )


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Activation checkpointing for diffusers / transformers models (``enable_gradient_checkpointing`` or
    ``gradient_checkpointing_enable``)."""
    for name in ("enable_gradient_checkpointing", "gradient_checkpointing_enable"):
        method = getattr(module, name, None)
        if callable(method):
            method()
            return
    raise ConfigError(
        f"memory.gradient_checkpointing: {type(module).__name__} supports no activation checkpointing; "
        "set memory.gradient_checkpointing: false"
    )


@contextlib.contextmanager
def shared_atomic_directory(final_dir: Path, runtime: DistributedRuntime) -> Iterator[Path]:
    """:func:`~rlflow.utils.checkpoint.atomic_directory` written by every rank: the main process creates
    the temporary directory, all ranks write into it, and the main process publishes it once all are done.
    Call it on every rank."""
    from accelerate.utils import broadcast_object_list

    from rlflow.utils.checkpoint import atomic_directory

    if runtime.world_size == 1:
        with atomic_directory(final_dir) as tmp:
            yield tmp
        return
    if runtime.is_main:
        with atomic_directory(final_dir) as tmp:
            broadcast_object_list([str(tmp)], from_process=0)
            yield tmp
            runtime.wait()  # every rank finished writing before the rename publishes it
    else:
        shared = [None]
        broadcast_object_list(shared, from_process=0)
        yield Path(str(shared[0]))
        runtime.wait()
    runtime.wait()  # nobody reads the checkpoint before it is published
