"""Pretraining of the shapes world's text-to-image base model: ``rlflow pretrain-t2i --config recipe.yaml``.

Flow matching (``x_t = (1 - t) x0 + t x1``, target ``x1 - x0``) of a tiny pixel-space SD3 transformer and
its word-level text encoder (trained jointly) on freshly rendered images of the built-in shapes world
(:mod:`rlflow.worlds.shapes`). Evaluation samples a fixed set of prompts with the deterministic Euler ODE
from seeded noise and scores the images with the programmatic verifier
(:class:`rlflow.worlds.shapes.verifier.ShapesVerifier`): GenEval-style accuracy overall and per
prompt category. The result is the base model that GRPO and the other alignment trainers start from.

Reading order: :class:`T2IPretrainConfig` -> :class:`T2IPretrainTrainer` (``__init__`` -> ``loss`` ->
``update`` -> ``evaluate`` -> ``save_checkpoint`` / ``resume`` -> ``train``).

Run directory (``output_dir``)::

    config.yaml, metrics.jsonl, summary.json, plots/*.png (curves, sample grids), tensorboard/, wandb/
    checkpoints/step_XXXXXXXX/{model/, ema/, training_state.pt}   (resumable; written atomically)
    models/step_XXXXXXXX/                                         (save_eval_models: the evaluated weights)
    final/                                                        (the model to load: EMA if enabled)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from rlflow.config import ConfigError, option
from rlflow.flows import flow_matching_loss, linear_path, sample_chain, sample_training_times, time_grid
from rlflow.flows.kernels import EulerStep
from rlflow.flows.time import TimeDistribution
from rlflow.generators.families import PromptEmbeddings
from rlflow.rollout.prompts import accuracy_metrics
from rlflow.trainers.step_loop import StepLoopTrainer, StepTrainingConfig
from rlflow.utils.ema import EMA
from rlflow.utils.seeding import prepare_run
from rlflow.worlds.shapes.model import (
    ShapesModelConfig,
    build_shapes_model,
    load_shapes_model,
    save_shapes_model,
    shapes_config_of,
)
from rlflow.worlds.shapes.prompts import CATEGORIES, eval_prompts, heldout_eval_prompts, parse_prompt
from rlflow.worlds.shapes.render import shapes_batches
from rlflow.worlds.shapes.vae import encode_images

if TYPE_CHECKING:
    from rlflow.generators.diffusers_flow import DiffusersFlowModel

logger = logging.getLogger(__name__)

# The empty prompt is the unconditional prompt of classifier-free guidance (all padding).
UNCONDITIONAL_PROMPT = ""


@dataclass
class T2IPretrainConfig(StepTrainingConfig):
    """Flow-matching pretraining of the shapes text-to-image model (defaults: the shipped base model's recipe)."""

    output_dir: str = option(
        "runs/shapes_pretrain", help="Run directory (metrics, grids, checkpoints, final model)."
    )
    model: ShapesModelConfig = option(default_factory=ShapesModelConfig, help="The model architecture.")
    vae_path: str | None = option(
        None,
        help="model.latent_space vae: the trained AutoencoderKL (an `rlflow pretrain-vae` run's final/); "
        "images are rendered at its resolution, encoded, and the saved model carries it in vae/.",
    )
    categories: list[str] | None = option(
        None, help="Prompt categories to train on (single, counting, two_objects, position); null: all."
    )
    batch_size: int = option(32, help="Rendered (image, prompt) pairs per optimizer step (fresh every step).")
    warmup_steps: int = option(200, help="Linear learning-rate warm-up steps.")
    ema_decay: float = option(0.998, help="EMA decay of the weights used for eval/saving (0: off).")
    ema_warmup: bool = option(
        True, help="EMA decay min(decay, (1 + n) / (10 + n)) at update n, so early weights fade quickly."
    )
    time_distribution: TimeDistribution = option(
        "logit_normal", help="Training-time distribution: uniform, logit_normal (SD3), beta or u_shaped."
    )
    logit_mean: float = option(
        -0.8, help="logit_normal: mean m of t = sigmoid(N(m, s)); m > 0 favours the data end."
    )
    logit_std: float = option(0.8, help="logit_normal: std s (JiT: t ~ sigmoid(N(-0.8, 0.8)), mostly noisy).")
    u_shape_a: float = option(4.0, help="u_shaped: a in p(t) ~ cosh(a (t - 1/2)).")
    prompt_dropout: float = option(
        0.1,
        help="Probability of training on the empty prompt instead of the real one (needed for "
        "classifier-free guidance; 0 trains a purely conditional model).",
    )
    latent_cache_size: int = option(
        0,
        help="VAE worlds: encode this many rendered images once and draw every batch from them (latent "
        "caching; saves the encoder pass per step on CPUs); 0 renders and encodes fresh batches every step.",
    )
    eval_split: Literal["held_out", "all"] = option(
        "held_out",
        help="Evaluation prompts: held_out (rlflow.worlds.shapes.prompts.heldout_eval_prompts: the prompts the alignment "
        "trainers evaluate on and never train on) or all (rlflow.worlds.shapes.prompts.eval_prompts, the whole grammar).",
    )
    eval_prompts: int = option(256, help="Distinct evaluation prompts, spread over the categories.")
    eval_prompt_seed: int = option(0, help="Seed of the evaluation prompt set.")
    eval_samples_per_prompt: int = option(1, help="Images sampled per evaluation prompt.")
    eval_num_steps: int = option(20, help="Euler ODE steps K for evaluation samples.")
    eval_time_shift: float = option(1.0, help="SD3-style shift of the evaluation time grid (1: uniform).")
    eval_guidance_scale: float = option(
        1.0,
        help="Classifier-free guidance scale at evaluation (1: none; other values need prompt_dropout > 0).",
    )
    eval_batch_size: int = option(
        128,
        help="Images denoised together at evaluation (each keeps its seeded noise; results equal up to round-off).",
    )
    eval_loss_samples: int = option(256, help="Size of the fixed rendered batch for eval/fm_loss.")
    grid_size: int = option(32, help="Samples in each image grid PNG (evenly spread over the eval prompts).")
    save_eval_models: bool = option(
        False, help="Also save the evaluated weights at every evaluation to models/step_N (to pick a step)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.eval_guidance_scale != 1.0 and self.prompt_dropout == 0:
            raise ConfigError(
                f"eval_guidance_scale={self.eval_guidance_scale} needs an unconditional model: set "
                "prompt_dropout > 0 (e.g. 0.1) or eval_guidance_scale: 1.0"
            )
        if self.eval_time_shift <= 0:
            raise ConfigError(f"eval_time_shift must be > 0, got {self.eval_time_shift}")
        if self.latent_cache_size < 0:
            raise ConfigError(f"latent_cache_size must be >= 0 (0: no cache), got {self.latent_cache_size}")
        if (self.model.latent_space == "vae") != (self.vae_path is not None):
            raise ConfigError(
                "model.latent_space vae needs vae_path (an `rlflow pretrain-vae` run's final/ directory)"
                if self.vae_path is None
                else "vae_path is set but model.latent_space is pixels; set model.latent_space: vae"
            )
        if self.categories is not None:
            unknown = [c for c in self.categories if c not in CATEGORIES]
            if unknown or not self.categories:
                raise ConfigError(
                    f"unknown prompt categories {unknown}; choose from {', '.join(CATEGORIES)} (or null for all)"
                )


class T2IPretrainTrainer(StepLoopTrainer):
    """Flow matching of the shapes model on rendered batches; see the module docstring for outputs."""

    def __init__(self, config: T2IPretrainConfig):
        from rlflow.worlds.shapes.verifier import ShapesVerifier

        self.config = config
        self.output_dir = Path(config.output_dir)
        self.device = torch.device(config.device)
        # One generator drives prompts, rendering, noise, times and prompt dropout: a resumed run replays.
        self.generator = prepare_run(config.seed, config.num_threads)
        self.vae = None
        self.render_size = config.model.image_size
        if config.vae_path is not None:
            from rlflow.worlds.shapes.vae import load_shapes_vae, vae_scale_factor

            self.vae = load_shapes_vae(config.vae_path, device=self.device)
            self.render_size = config.model.image_size * vae_scale_factor(self.vae)
        if self.vae is not None and config.latent_cache_size > 0:
            self.batches = self._cached_latent_batches()
        else:
            self.batches = map(
                self._to_data,
                shapes_batches(
                    config.batch_size,
                    self.generator,
                    image_size=self.render_size,
                    categories=config.categories,
                ),
            )

        # The text encoder learns jointly here; the saved model freezes it (alignment adapts the transformer).
        try:
            model = build_shapes_model(config.model, train_text_encoder=True, vae=self.vae)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.model = model.to(self.device).train()
        self.setup_optimization([p for p in self.model.parameters() if p.requires_grad])
        self.ema = (
            EMA(self.model, decay=config.ema_decay, warmup=config.ema_warmup)
            if config.ema_decay > 0
            else None
        )
        self.verifier = ShapesVerifier()
        self.eval_prompt_list = (
            heldout_eval_prompts(config.eval_prompts, seed=config.eval_prompt_seed)
            if config.eval_split == "held_out"
            else eval_prompts(config.eval_prompts, seed=config.eval_prompt_seed)
        )
        self._fixed_batch = self._make_fixed_batch()
        self.step = 0

    # ------------------------------------------------------------------------------------------ loss
    def encode(self, model: DiffusersFlowModel, prompts: Sequence[str]) -> PromptEmbeddings:
        """Prompt embeddings with gradients (the model's own cache would go stale as the encoder trains)."""
        return model.prompt_encoder(prompts)

    @torch.no_grad()
    def _to_data(self, batch: tuple[torch.Tensor, list[str]]) -> tuple[torch.Tensor, list[str]]:
        """A rendered batch (images in [-1, 1]) as the model's data: the images, or their VAE latents."""
        images, prompts = batch
        if self.vae is None:
            return images, prompts
        return encode_images(self.vae, images.to(self.device)), prompts

    def _cached_latent_batches(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Batches drawn (with replacement, by the trainer's generator) from ``latent_cache_size`` rendered
        images encoded once (their own seed), as latent-diffusion training caches VAE latents."""
        config = self.config
        cache_generator = torch.Generator().manual_seed(config.seed + 4)
        renders = shapes_batches(
            256, cache_generator, image_size=self.render_size, categories=config.categories
        )
        latents, prompts = [], []
        for _ in range(-(-config.latent_cache_size // 256)):
            chunk_latents, chunk_prompts = self._to_data(next(renders))
            latents.append(chunk_latents.cpu())
            prompts.extend(chunk_prompts)
        pool = torch.cat(latents)[: config.latent_cache_size]
        while True:
            rows = torch.randint(len(pool), (config.batch_size,), generator=self.generator)
            yield pool[rows], [prompts[i] for i in rows.tolist()]

    def loss(
        self,
        model: DiffusersFlowModel,
        images: torch.Tensor,
        prompts: Sequence[str],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Flow-matching loss on data ``x1 = images`` (the images in [-1, 1], or their VAE latents) with
        fresh noise ``x0`` and times ``t``."""
        config = self.config
        noise = torch.randn(images.shape, generator=generator).to(self.device)
        t = sample_training_times(
            images.shape[0],
            config.time_distribution,
            generator=generator,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            u_shape_a=config.u_shape_a,
        ).to(self.device)
        path = linear_path(noise, images.to(self.device), t)
        return flow_matching_loss(model.velocity(path.x_t, t, self.encode(model, prompts)), path.velocity)

    def update(self) -> dict[str, float]:
        """One optimizer step on a freshly rendered batch."""
        images, prompts = next(self.batches)
        if self.config.prompt_dropout > 0:
            drop = (torch.rand(len(prompts), generator=self.generator) < self.config.prompt_dropout).tolist()
            prompts = [UNCONDITIONAL_PROMPT if d else p for p, d in zip(prompts, drop, strict=True)]
        loss = self.loss(self.model, images, prompts, self.generator)
        return self.optimizer_step(loss, self.model)

    # ------------------------------------------------------------------------------------ evaluation
    @property
    def eval_model(self) -> DiffusersFlowModel:
        """The weights used for evaluation and saving: the EMA if enabled."""
        return self.ema.model if self.ema is not None else self.model  # type: ignore[return-value]

    def _make_fixed_batch(self) -> tuple[torch.Tensor, list[str]]:
        """A fixed rendered batch for ``eval/fm_loss`` (its own seed: independent of training draws)."""
        g = torch.Generator().manual_seed(self.config.seed + 2)
        return self._to_data(
            next(shapes_batches(self.config.eval_loss_samples, g, image_size=self.render_size))
        )

    @torch.no_grad()
    def fixed_batch_loss(self, model: DiffusersFlowModel | None = None) -> float:
        """Flow-matching loss of ``model`` (default: the eval weights) on the fixed batch, fixed noise and times."""
        images, prompts = self._fixed_batch
        g = torch.Generator().manual_seed(self.config.seed + 3)
        return self.loss(model if model is not None else self.eval_model, images, prompts, g).item()

    @torch.no_grad()
    def sample(self, model: DiffusersFlowModel, prompts: Sequence[str], *, seed: int) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [0, 1]: Euler ODE from seeded noise (the same per prompt at any eval_batch_size)."""
        config = self.config
        noise = torch.randn(len(prompts), *model.latent_shape, generator=torch.Generator().manual_seed(seed))
        times = time_grid(config.eval_num_steps, shift=config.eval_time_shift, device=self.device)
        guided = config.eval_guidance_scale != 1.0
        previous_scale, model.guidance_scale = model.guidance_scale, config.eval_guidance_scale
        images = []
        try:
            for start in range(0, len(prompts), config.eval_batch_size):
                chunk = list(prompts[start : start + config.eval_batch_size])
                cond = self.encode(model, chunk)
                if guided:
                    negative = self.encode(model, [UNCONDITIONAL_PROMPT] * len(chunk))
                    cond = dataclasses.replace(
                        cond, negative_hidden_states=negative.hidden_states, negative_pooled=negative.pooled
                    )
                x0 = noise[start : start + len(chunk)].to(self.device)
                traj = sample_chain(model, EulerStep(), x0, times, cond, deterministic=True)
                images.append(model.decode(traj.sample).cpu())
        finally:
            model.guidance_scale = previous_scale
        return torch.cat(images)

    @torch.no_grad()
    def evaluate(self, *, grid_path: Path | None = None) -> dict[str, float]:
        """Verifier accuracy / score of ODE samples of the fixed eval prompts (overall and per category),
        plus the flow-matching loss on a fixed rendered batch; optionally an image grid PNG."""
        config, model = self.config, self.eval_model
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        prompts = [p for p in self.eval_prompt_list for _ in range(config.eval_samples_per_prompt)]
        images = self.sample(model, prompts, seed=config.seed + 1)
        result = self.verifier.evaluate(images, prompts)
        correct, score = result["correct"].float(), result["score"].float()
        categories = [parse_prompt(p).category for p in prompts]
        metrics: dict[str, float] = {
            **accuracy_metrics(correct, categories),
            "eval/score": score.mean().item(),
            "eval/fm_loss": self.fixed_batch_loss(model),
        }
        for category in CATEGORIES:
            rows = torch.tensor([c == category for c in categories])
            if bool(rows.any()):
                metrics[f"eval/score/{category}"] = score[rows].mean().item()
        for check in ("colors_present", "objects_present", "counts_correct", "relation_correct", "no_extra"):
            if check in result:
                metrics[f"eval/check/{check}"] = result[check].float().mean().item()
        metrics["time/eval_seconds"] = time.perf_counter() - start
        if grid_path is not None:
            self._save_grid(grid_path, images, prompts, result["correct"], metrics["eval/accuracy"])
        model.train(was_training)
        return metrics

    def _save_grid(
        self, path: Path, images: torch.Tensor, prompts: list[str], correct: torch.Tensor, accuracy: float
    ) -> None:
        from rlflow.utils.plotting import save_image_grid

        per_prompt = self.config.eval_samples_per_prompt
        num_prompts = len(self.eval_prompt_list)
        count = min(self.config.grid_size, num_prompts)
        # Evenly spaced prompts (the eval set is ordered by category), first sample of each.
        picks = torch.linspace(0, num_prompts - 1, count).round().long().tolist()
        rows = [p * per_prompt for p in picks]
        save_image_grid(
            images[rows],
            [prompts[r] for r in rows],
            path,
            ncols=8,
            title=f"step {self.step}: verifier accuracy {accuracy:.2f} (green: correct, red: wrong)",
            caption_colors=["tab:green" if bool(correct[r]) else "tab:red" for r in rows],
        )

    # ----------------------------------------------------------------------------------- checkpoints
    # save_checkpoint / resume are StepLoopTrainer's; these are the model-specific parts.
    @property
    def trained_model(self) -> DiffusersFlowModel:
        return self.model

    def save_weights(self, model: nn.Module, directory: Path) -> None:
        save_shapes_model(model, directory)  # type: ignore[arg-type]

    def load_weights(self, directory: Path) -> tuple[DiffusersFlowModel, dict[str, Any]]:
        saved = load_shapes_model(directory)
        return saved, asdict(shapes_config_of(saved))

    def model_config_dict(self) -> dict[str, Any]:
        return asdict(self.config.model)

    # ----------------------------------------------------------------------------------------- train
    # The loop itself is StepLoopTrainer.train; these are its text-to-image-specific parts.
    progress_name = "pretrain-t2i"
    summary_results = (("accuracy", "final verifier accuracy"), ("fm_loss", "held-out flow-matching loss"))

    def evaluation_image(self, plots: Path, *, final: bool) -> Path:
        return plots / ("samples.png" if final else f"samples_step_{self.step:07d}.png")

    def periodic_evaluation(self, plots: Path) -> dict[str, float]:
        evaluation = self.evaluate(grid_path=self.evaluation_image(plots, final=False))
        if self.config.save_eval_models:
            save_shapes_model(self.eval_model, self.output_dir / "models" / f"step_{self.step:08d}")
        return evaluation

    def final_evaluation(self, plots: Path) -> dict[str, float]:
        return self.evaluate(grid_path=self.evaluation_image(plots, final=True))

    def final_outputs(self, final: dict[str, float]) -> dict[str, Any]:
        model_dir = save_shapes_model(self.eval_model, self.output_dir / "final", card=self.model_card(final))
        return {"model_dir": str(model_dir), "grid": str(self.output_dir / "plots" / "samples.png")}




def train(config: T2IPretrainConfig) -> dict[str, Any]:
    """CLI entry point: ``rlflow pretrain-t2i --config recipe.yaml``."""
    return T2IPretrainTrainer(config).train()
