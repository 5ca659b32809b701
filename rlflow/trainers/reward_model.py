"""Reward models from pairwise preferences: ``rlflow reward-model --config recipe.yaml``.

Trains a :mod:`rlflow.reward_models.learned` model (image or trajectory-segment kind, one head per label
dimension) on a preference set (:mod:`rlflow.data.preferences`) with a Bradley-Terry loss, ``bt`` or
``bt_ties`` (Bradley-Terry with ties; the losses and metrics live in :mod:`rlflow.reward_models.losses`).

Multi-head: scores are ``[B, D]``; each dimension's loss is the mean over the pairs that count for it (for
``bt``: its decided pairs), and the training loss is the mean over dimensions (so the learning rate does
not depend on ``D``).

Noise-aware models (``noise_aware: true``) train on noised pairs: both members get the SAME time ``t`` and
the SAME noise ``x0``, ``x_t = (1 - t) x0 + t x1`` with ``x1`` their model-space latents, so the only
difference the model sees between them is the data, at the noise level it will later be used at.

Shapes-world image models can first be pretrained on the renderer (``pretrain_steps``): comparisons whose
winner is known by construction (a render of the prompt beats a render of a perturbed prompt; a render
beats a more degraded copy), never labelled by the oracle; see
:mod:`rlflow.worlds.shapes.reward_pretraining`. ``symmetry_augment``
adds label-preserving flips (left/right swapped in the prompt) and red/green swaps.

Reading order: :class:`RewardModelTrainConfig` -> :class:`RewardModelTrainer`
(``__init__`` -> ``scores`` -> ``loss`` -> ``update`` -> ``evaluate``) -> :func:`train`.

Run directory (``output_dir``)::

    config.yaml, metrics.jsonl, summary.json, plots/*.png (metric curves), tensorboard/, wandb/ (report_to)
    checkpoints/step_XXXXXXXX/{model/, training_state.pt}   (resumable; written atomically)
    model/                                                   (the trained reward model: config.json + safetensors)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from rlflow.config import ConfigError, option
from rlflow.flows import sample_training_times
from rlflow.flows.time import TimeDistribution
from rlflow.reward_models.architecture import RewardModelSizes, reward_model_for
from rlflow.reward_models.learned import (
    RewardModelConfig,
    load_reward_model,
    save_reward_model,
)
from rlflow.reward_models.losses import (
    accuracy_without_ties,
    noised_pair,
    preference_loss,
    preference_metrics,
)
from rlflow.trainers.step_loop import StepLoopTrainer, StepTrainingConfig
from rlflow.utils.checkpoint import checkpoint_to_resume
from rlflow.utils.distributed import DistributedRuntime, MemoryConfig, make_optimizer
from rlflow.utils.seeding import prepare_run
from rlflow.worlds.shapes.augmentation import PRETRAIN_OBJECTIVES, symmetry_augment
from rlflow.worlds.shapes.reward_pretraining import RendererPretraining, has_vae_latents, preference_set_vae

if TYPE_CHECKING:
    from rlflow.data.preferences import PreferenceSet

logger = logging.getLogger(__name__)

__all__ = ["RewardModelSizes", "RewardModelTrainConfig", "RewardModelTrainer", "train"]

# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RewardModelTrainConfig(StepTrainingConfig):
    """Bradley-Terry (optionally with ties) training of a learned reward model on a preference set."""

    data_dir: str = option(
        "runs/preferences/shapes", help="Preference set directory (rlflow.data.preferences)."
    )
    output_dir: str = option("runs/reward_model", help="Run directory (metrics, checkpoints, model/).")
    dimensions: list[str] | None = option(
        None, help="Label dimensions to learn, one head each (null: all dimensions of the data)."
    )
    loss: Literal["bt", "bt_ties"] = option(
        "bt_ties", help="bt: Bradley-Terry on decided pairs (ties skipped); bt_ties: BT with ties (theta)."
    )
    theta: float = option(
        5.0, bounds="(1, inf)", help="Tie parameter theta > 1 of bt_ties (and of the 3-way accuracy metric)."
    )
    margin: float = option(0.0, help="bt only: required score margin, -log sigmoid(r_w - r_l - margin).")
    center_coef: float = option(0.0, help="Centring term center_coef * mean((r_a + r_b)^2) (TRL; 0: off).")
    noise_aware: bool = option(
        False, help="Image kind: train on noised pairs x_t at time t (guidance model)."
    )
    time_distribution: TimeDistribution = option(
        "uniform", help="Noise-aware: distribution of t (uniform, logit_normal, beta, u_shaped)."
    )
    logit_mean: float = option(0.0, help="Noise-aware logit_normal: mean of t = sigmoid(N(m, s)).")
    logit_std: float = option(1.0, help="Noise-aware logit_normal: std s.")
    clean_fraction: float = option(
        0.0,
        help="Noise-aware: fraction of training pairs (and pretraining comparisons) scored clean at t = 1, "
        "where the model is used as a plain reward (LearnedReward) and where quality defects are visible.",
    )
    model: RewardModelSizes = option(default_factory=RewardModelSizes, help="Network sizes.")
    heldout_fraction: float = option(0.1, help="Fraction of pairs held out for evaluation (seeded split).")
    split_seed: int = option(0, help="Seed of the train / held-out split.")
    steps: int = option(2000, help="Optimizer steps (ignored when epochs is set).")
    epochs: float | None = option(
        None, help="Train for this many passes over the training pairs instead of steps."
    )
    batch_size: int = option(64, help="Pairs per optimizer step.")
    warmup_steps: int = option(50, help="Linear learning-rate warm-up steps.")
    weight_decay: float = option(1e-4, help="AdamW weight decay.")
    flip_augment: bool = option(
        False,
        help="Image kind: random horizontal flips (only if the labels are invariant, e.g. no left/right).",
    )
    symmetry_augment: bool = option(
        False,
        help="Shapes world: label-preserving flips (left/right swapped in the prompt) and red/green swaps.",
    )
    pretrain_steps: int = option(
        0, help="Shapes world: renderer pretraining steps before preference training (0: off)."
    )
    pretrain_batch_size: int = option(64, help="Prompts per pretraining step (3 images each).")
    pretrain_lr: float | None = option(None, help="Pretraining peak learning rate (null: lr).")
    pretrain_objectives: dict[str, str] | None = option(
        None,
        help="{dimension: match | clean}: the pretraining comparison of each head (null: alignment -> "
        "match, quality -> clean, for those present).",
    )
    device: str = option(
        "cpu", help="cpu, cuda or auto (CUDA if available); under accelerate launch, one per process."
    )
    memory: MemoryConfig = option(
        default_factory=MemoryConfig, help="Mixed precision, activation checkpointing, 8-bit optimizer."
    )
    logging_steps: int = option(25, help="Log training metrics every N steps.")
    eval_steps: int = option(200, help="Evaluate on the held-out pairs every N steps (and at the end).")
    eval_batch_size: int = option(256, help="Pairs scored together at evaluation.")
    eval_train_pairs: int = option(
        512, help="Training pairs also evaluated (train_eval/*) to show overfitting."
    )
    eval_noise_samples: int = option(
        1, help="Noise-aware: (t, noise) draws per held-out pair at evaluation (fixed seed)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("bt", "bt_ties"):
            raise ConfigError(f"loss must be bt or bt_ties, got {self.loss!r}")
        if self.margin and self.loss != "bt":
            raise ConfigError(f"margin={self.margin} applies to loss: bt only; set margin: 0 or loss: bt")
        if self.center_coef < 0:
            raise ConfigError(f"center_coef must be >= 0, got {self.center_coef}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0 (or null to use steps), got {self.epochs}")
        if self.eval_train_pairs < 0 or self.warmup_steps < 0:
            raise ConfigError("eval_train_pairs and warmup_steps must be >= 0")
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ConfigError(f"clean_fraction must be in [0, 1], got {self.clean_fraction}")
        if self.pretrain_steps < 0 or self.pretrain_batch_size < 1:
            raise ConfigError(
                f"pretrain_steps must be >= 0 and pretrain_batch_size >= 1, got {self.pretrain_steps}, "
                f"{self.pretrain_batch_size}"
            )
        bad = {k: v for k, v in (self.pretrain_objectives or {}).items() if v not in PRETRAIN_OBJECTIVES}
        if bad:
            raise ConfigError(f"pretrain_objectives values must be match or clean, got {bad}")
        if self.dimensions is not None and (
            not self.dimensions or len(set(self.dimensions)) != len(self.dimensions)
        ):
            raise ConfigError(
                f"dimensions must be a non-empty list of distinct names or null, got {self.dimensions}"
            )


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """A batch of comparisons as the model consumes it: inputs of both members, prompts, labels [B, D]."""

    a: Tensor
    b: Tensor
    prompts: list[str]
    labels: Tensor


class RewardModelTrainer(StepLoopTrainer):
    """Bradley-Terry training of a learned reward model; see the module docstring for outputs."""

    progress_name = "reward-model"
    summary_results = (("accuracy", "final held-out accuracy"), ("loss", "held-out loss"))

    def __init__(self, config: RewardModelTrainConfig, pairs: PreferenceSet | None = None):
        """``pairs``: an in-memory preference set (tests, notebooks); default: ``load_preferences(data_dir)``."""
        from rlflow.data.preferences import load_preferences

        self.output_dir = Path(config.output_dir)
        # Under accelerate launch every process draws the same batches (the same seed) and trains on its
        # share of each; DDP / DeepSpeed average the gradients.
        self.runtime = DistributedRuntime(
            device=config.device,
            memory=config.memory,
            max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else float("inf"),
            micro_batch_size=max(1, config.batch_size // max(1, int(os.environ.get("WORLD_SIZE", "1")))),
        )
        if config.batch_size % self.runtime.world_size:
            raise ConfigError(
                f"batch_size {config.batch_size} must divide evenly over the {self.runtime.world_size} "
                "processes (each trains on an equal share of a batch)"
            )
        self.device = self.runtime.device
        self.generator = prepare_run(config.seed, config.num_threads)
        data = pairs if pairs is not None else load_preferences(config.data_dir)
        self.dimensions = list(config.dimensions) if config.dimensions is not None else list(data.dimensions)
        columns = [data.label_index(d) for d in self.dimensions]  # raises naming the known dimensions
        self.train_set, self.heldout_set = data.split(config.heldout_fraction, config.split_seed)
        self.columns = torch.tensor(columns)

        if config.noise_aware and data.kind != "image":
            raise ConfigError("noise_aware applies to image preference sets only; set noise_aware: false")
        if config.flip_augment and data.kind != "image":
            raise ConfigError("flip_augment applies to image preference sets only; set flip_augment: false")
        if (config.symmetry_augment or config.pretrain_steps) and data.kind != "image":
            raise ConfigError(
                "symmetry_augment and pretrain_steps apply to shapes-world image preference sets only; "
                "set symmetry_augment: false, pretrain_steps: 0"
            )
        # Noise-aware models of a latent world (the preference set's latents are a VAE's, not images * 2 - 1)
        # pretrain on VAE-encoded renders; pixel symmetries do not act on VAE latents.
        self.pretrain_vae = None
        if config.noise_aware and data.kind == "image" and has_vae_latents(data):
            if config.symmetry_augment:
                raise ConfigError(
                    f"symmetry_augment flips and swaps colour channels, which does not map VAE latents "
                    f"{tuple(data.latents_a.shape[1:])} onto the latents of the flipped image; set "
                    "symmetry_augment: false for a noise-aware model of a latent world"
                )
            if config.pretrain_steps:
                self.pretrain_vae = preference_set_vae(data, config.data_dir)
        if config.epochs is not None:
            steps = max(1, math.ceil(config.epochs * len(self.train_set) / config.batch_size))
            config = dataclasses.replace(config, steps=steps)
        if not 0 <= config.warmup_steps < config.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={config.steps}), got {config.warmup_steps}")
        self.config = config
        # The transformer architecture starts from its flow model's weights (a resumed run then loads its
        # checkpoint over them); the CNN and segment models start fresh.
        initial = reward_model_for(
            data,
            config.model,
            dimensions=self.dimensions,
            noise_aware=config.noise_aware,
            source=config.data_dir,
        )
        self.model_config: RewardModelConfig = initial.config
        self.model = initial.to(self.device).train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.setup_optimization(
            trainable,
            make_optimizer(
                trainable,
                kind=config.memory.optimizer,
                lr=config.learning_rate,
                weight_decay=config.weight_decay,
            ),
        )
        self.ema = None
        self.step = 0
        self.pretrain_metrics: dict[str, float] = {}
        # Renders for pretraining at the images' resolution (a VAE encodes them to the model's latent size).
        self.render_size = int(data.a.shape[-1]) if data.kind == "image" else 0
        logger.info(
            "reward model (%s, dimensions %s): %d train / %d held-out pairs, %d parameters",
            data.kind,
            self.dimensions,
            len(self.train_set),
            len(self.heldout_set),
            sum(p.numel() for p in self.trainable),
        )

    # ------------------------------------------------------------------------------------------ data
    def batch_indices(self, step: int) -> Tensor:
        """Training-pair indices of ``step``: consecutive slices of per-epoch seeded permutations, a pure
        function of the step (so a resumed run sees exactly the batches the uninterrupted one would)."""
        n, size = len(self.train_set), self.config.batch_size
        positions = step * size + torch.arange(size)
        epochs = positions // n
        out = torch.empty(size, dtype=torch.long)
        for epoch in epochs.unique().tolist():  # at most a few epochs per batch
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            )
            rows = epochs == epoch
            out[rows] = perm[positions[rows] % n]
        return out

    def model_inputs(self, pairs: PreferenceSet) -> tuple[Tensor, Tensor]:
        """What the model scores for members a and b: images / segments, or noise-aware latents ``x1``."""
        if not self.config.noise_aware:
            return pairs.a, pairs.b
        if pairs.latents_a is None or pairs.latents_b is None:
            # Pixel-space worlds (the shapes world) define latents = images * 2 - 1.
            return pairs.a * 2.0 - 1.0, pairs.b * 2.0 - 1.0
        return pairs.latents_a, pairs.latents_b

    def make_batch(self, pairs: PreferenceSet, generator: torch.Generator | None) -> PairBatch:
        a, b = self.model_inputs(pairs)
        if self.config.flip_augment and generator is not None:
            # The same flip for both members: a flip must not itself be a difference between them.
            flip = torch.rand(a.shape[0], generator=generator) < 0.5
            a = torch.where(flip[:, None, None, None], a.flip(-1), a)
            b = torch.where(flip[:, None, None, None], b.flip(-1), b)
        prompts = list(pairs.prompts)
        if self.config.symmetry_augment and generator is not None:
            a, b, prompts = symmetry_augment(a, b, prompts, generator)
        return PairBatch(a=a, b=b, prompts=prompts, labels=pairs.labels[:, self.columns])

    # ---------------------------------------------------------------------------------------- scores
    def scores(
        self,
        model: nn.Module,
        batch: PairBatch,
        generator: torch.Generator | None,
        *,
        clean: bool = False,
        train: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``(r_a, r_b)`` ``[B, D]``; noise-aware: both members noised with one shared ``t`` and noise per pair
        (``clean``: scored as clean data, ``t = 1``; ``train``: times from :meth:`training_times`)."""
        a, b = batch.a.to(self.device), batch.b.to(self.device)
        # Inputs in the weights' dtype (a DeepSpeed bf16 engine casts the model), scores back in float32.
        dtype = next(self.trained_model.parameters()).dtype
        if self.model_config.kind == "segment":
            return model(torch.cat([a, b]).to(dtype)).float().chunk(2)
        t = None
        if self.config.noise_aware and clean:
            t = torch.ones(2 * a.shape[0], device=self.device)
        elif self.config.noise_aware and train:
            t = self.training_times(a.shape[0], generator)
            noise = torch.randn(a.shape, generator=generator).to(self.device)
            a, b = noised_pair(a, b, t, noise)
            t = torch.cat([t, t])
        elif self.config.noise_aware:
            t = sample_training_times(
                a.shape[0],
                self.config.time_distribution,
                generator=generator,
                logit_mean=self.config.logit_mean,
                logit_std=self.config.logit_std,
            ).to(self.device)
            noise = torch.randn(a.shape, generator=generator).to(self.device)
            a, b = noised_pair(a, b, t, noise)
            t = torch.cat([t, t])
        # One forward pass over both members (batch statistics-free model, so this equals two passes).
        out = model(
            torch.cat([a, b]).to(dtype), batch.prompts + batch.prompts, None if t is None else t.to(dtype)
        )
        return out.float().chunk(2)

    def training_times(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n]`` training times: ``time_distribution``, with a ``clean_fraction`` of them set to 1."""
        config = self.config
        t = sample_training_times(
            n,
            config.time_distribution,
            generator=generator,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
        )
        if config.clean_fraction > 0:
            t = torch.where(torch.rand(n, generator=generator) < config.clean_fraction, torch.ones_like(t), t)
        return t.to(self.device)

    def loss(self, r_a: Tensor, r_b: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        config = self.config
        return preference_loss(
            r_a,
            r_b,
            labels.to(r_a.device),
            loss=config.loss,
            theta=config.theta,
            margin=config.margin,
            center_coef=config.center_coef,
        )

    def update(self) -> dict[str, float]:
        """One optimizer step on the step's batch of training pairs."""
        runtime = self.runtime
        pairs = self.train_set.select(self.batch_indices(self.step).chunk(runtime.world_size)[runtime.rank])
        batch = self.make_batch(pairs, self.generator)
        r_a, r_b = self.scores(self.model, batch, self.generator, train=True)
        total, per_dimension = self.loss(r_a, r_b, batch.labels)
        metrics = self.optimizer_step(total, self.model)
        r_a, r_b, labels = r_a.detach().cpu(), r_b.detach().cpu(), batch.labels
        for d, name in enumerate(self.dimensions):
            metrics[f"train/{name}/loss"] = per_dimension[d].item()
            metrics[f"train/{name}/accuracy"] = accuracy_without_ties(r_a[:, d], r_b[:, d], labels[:, d])
        return metrics

    # ----------------------------------------------------------------------------------- pretraining
    @property
    def renderer_pretraining(self) -> RendererPretraining:
        """The renderer pretraining stage for this model (:mod:`rlflow.worlds.shapes.reward_pretraining`)."""
        return RendererPretraining(
            dimensions=self.dimensions,
            objectives=self.config.pretrain_objectives,
            render_size=self.render_size,
            noise_aware=self.config.noise_aware,
            training_times=self.training_times,
            vae=self.pretrain_vae,
            device=self.device,
        )

    def pretrain(self) -> dict[str, float]:
        """Run the renderer pretraining stage (``pretrain_steps``); returns its last 10% of steps' metrics."""
        config = self.config
        return self.renderer_pretraining.run(
            self.model,
            steps=config.pretrain_steps,
            batch_size=config.pretrain_batch_size,
            learning_rate=config.pretrain_lr or config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            min_lr_ratio=config.min_lr_ratio,
            max_grad_norm=config.max_grad_norm,
            seed=config.seed,
            logging_steps=config.logging_steps,
        )

    # ------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def score_set(
        self, pairs: PreferenceSet, *, seed: int, clean: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Scores ``(r_a, r_b, labels)`` ``[N * k, D]`` of a whole set (noise-aware: ``k`` fixed (t, noise)
        draws, or clean latents at ``t = 1`` with ``clean``)."""
        config = self.config
        generator = torch.Generator().manual_seed(seed)
        repeats = config.eval_noise_samples if config.noise_aware and not clean else 1
        outputs_a, outputs_b, labels = [], [], []
        for _ in range(repeats):
            for start in range(0, len(pairs), config.eval_batch_size):
                index = torch.arange(start, min(start + config.eval_batch_size, len(pairs)))
                batch = self.make_batch(pairs.select(index), None)
                r_a, r_b = self.scores(self.model, batch, generator, clean=clean)
                outputs_a.append(r_a.float().cpu())
                outputs_b.append(r_b.float().cpu())
                labels.append(batch.labels)
        return torch.cat(outputs_a), torch.cat(outputs_b), torch.cat(labels)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-dimension loss and accuracies on the held-out pairs (``eval/``) and on a fixed subset of the
        training pairs (``train_eval/``); noise-aware models also on clean held-out latents at t = 1."""
        was_training = self.model.training
        self.model.eval()
        subsets = {"eval": self.heldout_set}
        if self.config.eval_train_pairs:
            count = min(self.config.eval_train_pairs, len(self.train_set))
            subsets["train_eval"] = self.train_set.select(torch.arange(count))
        metrics: dict[str, float] = {}
        for prefix, pairs in subsets.items():
            metrics.update(self._set_metrics(prefix, *self.score_set(pairs, seed=self.config.seed + 1)))
        if self.config.noise_aware:
            clean = self.score_set(self.heldout_set, seed=self.config.seed + 1, clean=True)
            metrics.update(self._set_metrics("eval_clean", *clean))
        self.model.train(was_training)
        return metrics

    def _set_metrics(self, prefix: str, r_a: Tensor, r_b: Tensor, labels: Tensor) -> dict[str, float]:
        total, per_dimension = self.loss(r_a, r_b, labels)
        metrics = {f"{prefix}/loss": total.item()}
        accuracies = []
        for d, name in enumerate(self.dimensions):
            values = preference_metrics(r_a[:, d], r_b[:, d], labels[:, d], self.config.theta)
            metrics[f"{prefix}/{name}/loss"] = per_dimension[d].item()
            metrics.update({f"{prefix}/{name}/{key}": value for key, value in values.items()})
            accuracies.append(values["accuracy"])
        finite = [a for a in accuracies if math.isfinite(a)]
        metrics[f"{prefix}/accuracy"] = sum(finite) / len(finite) if finite else math.nan
        return metrics

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def trained_model(self) -> nn.Module:
        return self.runtime.accelerator.unwrap_model(self.model)

    def save_weights(self, model: nn.Module, directory: Path) -> None:
        save_reward_model(model, directory)

    def load_weights(self, directory: Path) -> tuple[nn.Module, dict[str, Any]]:
        saved = load_reward_model(directory)
        return saved, dataclasses.asdict(saved.config)

    def model_config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.model_config)

    # ----------------------------------------------------------------------------------------- train
    def periodic_evaluation(self, plots: Path) -> dict[str, float]:
        return self.evaluate()

    def final_evaluation(self, plots: Path) -> dict[str, float]:
        return self.evaluate()

    def final_outputs(self, final: dict[str, float]) -> dict[str, Any]:
        model_dir = self.output_dir / "model"
        with self.full_weights():
            if self.is_main:
                card = self.model_card(
                    final,
                    **self.pretrain_metrics,
                    train_pairs=len(self.train_set),
                    heldout_pairs=len(self.heldout_set),
                )
                save_reward_model(self.trained_model, model_dir, card=card)
        return {
            **self.pretrain_metrics,
            "model_dir": str(model_dir),
            "kind": self.model_config.kind,
            "dimensions": list(self.dimensions),
            "noise_aware": self.model_config.noise_aware,
            "train_pairs": len(self.train_set),
            "heldout_pairs": len(self.heldout_set),
            **self.runtime.sync_report(self.trainable),
        }

    def extra_checkpoint_state(self) -> dict[str, Any]:
        # The renderer pretraining runs only on a fresh start: a resumed run's summary needs its metrics.
        return {"pretrain_metrics": dict(self.pretrain_metrics)}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        saved = state.get("pretrain_metrics", {})
        self.pretrain_metrics = {key: float(value) for key, value in saved.items()}

    def train(self) -> dict[str, Any]:
        """Pretrain on the renderer (fresh runs with ``pretrain_steps``), then train on the preferences."""
        fresh = checkpoint_to_resume(self.output_dir, resume=self.config.resume) is None
        if self.config.pretrain_steps and fresh:
            start = time.perf_counter()
            self.pretrain_metrics = self.pretrain()
            self.pretrain_metrics["pretrain/wall_seconds"] = time.perf_counter() - start
            logger.info("pretraining done: %s", self.pretrain_metrics)
        # Wrapped (DDP / DeepSpeed) only now: pretraining has its own optimizer and needs no communication
        # (every process runs the same seeded pretraining and ends with the same weights).
        self.model, self.optimizer = self.runtime.prepare(self.model, self.optimizer)
        return super().train()


def train(config: RewardModelTrainConfig) -> dict[str, Any]:
    """CLI entry point: ``rlflow reward-model --config recipe.yaml``."""
    return RewardModelTrainer(config).train()
