"""What the text-to-image trainers share (``grpo``, ``dpo``, ``rwr``, ``actor-critic``, ``nft``): their base
config, the model section, model loading, the reward spec and the verifier's evaluation metrics.

:class:`TextToImageConfig` (a :class:`~rlflow.trainers.loop.TrainingConfig`: the run, ``output_dir``, ``seed``,
``device``, ``report_to``, Hub upload) holds the fields every one of them has - the world (``model``, ``prompts``, ``rewards``), the optimizer (``learning_rate``,
``lr_scheduler_type``, ``warmup_steps``, ``max_grad_norm``, ``ema_decay``), sampling for evaluation
(``time_shift``, ``time_grid``, ``eval_num_steps``) and the schedules (``iterations``, ``eval_steps``,
``save_steps``) - with TRL's / transformers' names. A trainer's config subclasses it, re-declares a field only
to change its default (``output_dir``, ``learning_rate``, ...) and adds its algorithm's fields after these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rlflow.config import ConfigError, option
from rlflow.flows.time import TIME_GRID_HELP, TimeGridSetting
from rlflow.rollout.prompts import PROMPT_SOURCE_HELP, accuracy_metrics
from rlflow.trainers.loop import TrainingConfig
from rlflow.utils.distributed import MemoryConfig

__all__ = [
    "ModelConfig",
    "TextToImageConfig",
    "build_reward",
    "load_model",
    "output_dir_option",
    "verifier_metrics",
]


@dataclass
class ModelConfig:
    """Which model to align and how it is adapted."""

    path: str = option(
        "recipes/alignment/artifacts/shapes_base",
        help="Base model: an rlflow shapes model directory, a diffusers SD3 pipeline directory, or a hub id.",
    )
    lora_r: int = option(32, help="LoRA rank (0: fine-tune the whole transformer, reference = frozen copy).")
    lora_alpha: float = option(64.0, help="LoRA alpha (the adapter's output is scaled by alpha / rank).")
    lora_target_modules: list[str] = option(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        help="Module names that get LoRA adapters (PEFT target_modules).",
    )
    lora_dropout: float = option(0.0, bounds="[0, 1)", help="Dropout on the LoRA adapters' input.")
    use_rslora: bool = option(False, help="Rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r.")
    use_dora: bool = option(
        False,
        help="DoRA: weight-decomposed LoRA (a trained magnitude per output feature of each adapted layer).",
    )
    guidance_scale: float | None = option(
        None, help="Classifier-free guidance scale (1: none; null: the model's default, SD3: 4.5, shapes: 1)."
    )
    resolution: int | None = option(None, help="Image resolution for pipelines (null: the model's default).")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32",
        help="Weights dtype of a diffusers pipeline (GPU: bfloat16). Latents, log-probs and LoRA stay float32.",
    )


def output_dir_option(default: str) -> Any:
    """The ``output_dir`` field with a trainer's default run directory."""
    return option(default, help="Run directory (metrics, plots, image grids, checkpoints, model).")


@dataclass
class TextToImageConfig(TrainingConfig):
    """The fields every text-to-image trainer's config has (subclassed by each; see the module docs)."""

    output_dir: str = output_dir_option("runs/t2i")
    seed: int = option(0, help="Seed (each process adds its rank).")
    device: str = option("auto", help="auto (accelerate's choice), cpu or cuda.")
    num_threads: int | None = option(None, help="torch.set_num_threads (null: torch's default).")
    memory: MemoryConfig = option(
        default_factory=MemoryConfig, help="Mixed precision, activation checkpointing, 8-bit optimizer."
    )

    model: ModelConfig = option(default_factory=ModelConfig, help="The model and its adapters.")
    prompts: str = option("shapes", help=PROMPT_SOURCE_HELP)
    num_eval_prompts: int = option(
        256, help="Evaluation prompts (the source's fixed evaluation set; shapes: distinct held-out prompts)."
    )
    allow_eval_overlap: bool = option(
        False, help="Allow evaluation prompts that are also training prompts (shapes_all, a file's lines)."
    )
    rewards: dict[str, Any] = option(
        default_factory=lambda: {"shapes_verifier": 1.0},
        help="Reward components and weights, e.g. {shapes_verifier: 1.0, jpeg_compressibility: 0.1}; "
        "a remote server: {remote: {url: 'http://127.0.0.1:8765', weight: 1.0}}.",
    )

    iterations: int = option(100, help="Training iterations (collect, then update).")
    learning_rate: float = option(1e-4, help="AdamW learning rate.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    lr_scheduler_type: Literal["constant", "cosine", "linear"] = option("constant", help="LR schedule.")
    warmup_steps: int = option(0, help="LR warm-up in optimizer updates.")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm.")
    ema_decay: float = option(0.0, help="EMA of the trained weights for evaluation (0: off).")

    time_shift: float = option(1.0, help="Time-grid shift of the sampler (SD3: 3.0; 1.0 is uniform).")
    time_grid: TimeGridSetting = option("auto", help=TIME_GRID_HELP)
    eval_num_steps: int = option(20, help="ODE steps for evaluation.")
    sample_chunk_size: int = option(64, help="Samples per sampling call (memory knob).")

    eval_steps: int = option(10, help="Evaluate every this many iterations (and at the end).")
    save_steps: int = option(10, help="Checkpoint every this many iterations (and at the end).")
    save_total_limit: int = option(2, help="How many checkpoints to keep.")
    grid_size: int = option(16, help="Images in each evaluation grid PNG.")

    def __post_init__(self) -> None:
        super().__post_init__()


def load_model(config: ModelConfig) -> Any:
    """The model of a :class:`ModelConfig` (a shapes model, an rlflow fine-tune or a diffusers pipeline)."""
    from rlflow.generators.loading import load_text_to_image_model

    kwargs: dict[str, Any] = {}
    if config.guidance_scale is not None:
        kwargs["guidance_scale"] = config.guidance_scale
    if config.resolution is not None:
        kwargs["resolution"] = config.resolution
    if config.dtype != "float32":
        kwargs["torch_dtype"] = getattr(torch, config.dtype)
    return load_text_to_image_model(config.path, **kwargs)


def prepare_model(config: ModelConfig, *, model: Any | None = None, reference: bool = True) -> Any:
    """Load the model of ``config`` (unless ``model`` is given) and set up its adapters and reference.

    ``lora_r > 0``: PEFT LoRA adapters on ``lora_target_modules`` (reference = adapters disabled, free), with
    ``lora_dropout``, ``use_rslora`` and ``use_dora`` as in ``trl.ModelConfig`` / PEFT's ``LoraConfig``.
    ``lora_r == 0``: the whole transformer is trained; with ``reference`` a frozen copy of the base is
    kept as the reference (one more transformer in memory). Call before the optimizer is built and before
    the transformer is wrapped (DDP): adapters cannot be added after.
    """
    if model is None:
        model = load_model(config)
    if config.lora_r > 0:
        model.add_lora(
            config.lora_r,
            config.lora_alpha,
            target_modules=config.lora_target_modules,
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
    elif reference:
        model.enable_reference_copy()
    return model


def build_reward(spec: dict[str, Any]) -> Any:
    """The weighted reward of a ``rewards`` mapping; a bad spec is a :class:`~rlflow.config.ConfigError`."""
    from rlflow.reward_models import build_rewards

    try:
        return build_rewards(spec)
    except ValueError as exc:
        raise ConfigError(f"rewards: {exc}") from exc


def verifier_metrics(reward: Any, images: Tensor, prompts: Sequence[str], source: Any) -> dict[str, float]:
    """Accuracy of any reward component that can verify prompts (``evaluate(images, prompts)['correct']``),
    with its standard error, overall (GenEval's mean over categories) and per prompt category."""
    components = getattr(reward, "components", None)
    candidates = dict(components) if isinstance(components, dict) else {"reward": reward}
    categorise = getattr(source, "category", None)
    categories = [categorise(p) for p in prompts] if categorise is not None else None
    metrics: dict[str, float] = {}
    for fn in candidates.values():
        if hasattr(fn, "evaluate"):
            result = fn.evaluate(images, list(prompts))
            if not (isinstance(result, dict) and "correct" in result):
                continue  # e.g. a remote reward's evaluate() returns its components, not a verdict
            metrics.update(accuracy_metrics(torch.as_tensor(result["correct"]), categories))
    return metrics
