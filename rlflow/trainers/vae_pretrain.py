"""Autoencoder pretraining for the latent shapes world: ``rlflow pretrain-vae --config recipe.yaml``.

Trains a small diffusers ``AutoencoderKL`` (:mod:`rlflow.worlds.shapes.vae`) on freshly rendered shapes
images with the usual VAE objective of latent diffusion (Rombach et al. 2022) minus the perceptual and GAN
terms, which flat-coloured 32x32 shapes do not need::

    loss = mean |x - D(z)| + mse_weight * mean (x - D(z))^2 + kl_weight * KL(q(z | x) || N(0, I)) / elements

with ``z`` a posterior sample. The KL weight is tiny (1e-6 as in SD's autoencoders): the latent stays close
to deterministic and its scale is fixed afterwards by calibration, not by the prior.

Evaluation reconstructs a fixed set of rendered images through the posterior mean and scores the decoded
images with the shapes verifier: ``eval/verifier_accuracy`` is the fraction of decoded ground-truth renders
the verifier still judges correct (the renders themselves score 1.0), the bar a latent world must pass
before rewards computed on decoded samples mean what they mean on pixels. The end of training calibrates
``shift_factor`` / ``scaling_factor`` on rendered images and saves ``final/`` in diffusers' format.

Run directory (``output_dir``)::

    config.yaml, metrics.jsonl, summary.json, plots/*.png (curves, reconstructions), tensorboard/, wandb/
    checkpoints/step_XXXXXXXX/{model/, training_state.pt}   (resumable; written atomically)
    final/                                                  (AutoencoderKL.from_pretrained loads it)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlflow.config import ConfigError, option
from rlflow.trainers.step_loop import StepLoopTrainer, StepTrainingConfig
from rlflow.utils.seeding import prepare_run
from rlflow.worlds.shapes.render import shapes_batches
from rlflow.worlds.shapes.vae import (
    ShapesVAEConfig,
    build_shapes_vae,
    calibrate_latent_scale,
    load_shapes_vae,
    save_shapes_vae,
)

logger = logging.getLogger(__name__)


@dataclass
class VAEPretrainConfig(StepTrainingConfig):
    """Autoencoder pretraining on rendered shapes images (defaults: the shipped VAE's recipe)."""

    output_dir: str = option(
        "runs/shapes_vae", help="Run directory (metrics, grids, checkpoints, final VAE)."
    )
    vae: ShapesVAEConfig = option(default_factory=ShapesVAEConfig, help="The autoencoder architecture.")
    batch_size: int = option(64, help="Rendered images per optimizer step (fresh every step).")
    min_lr_ratio: float = option(0.05, help="Final learning rate as a fraction of lr.")
    mse_weight: float = option(1.0, help="Weight of the squared reconstruction error (beside the L1 term).")
    kl_weight: float = option(1e-6, help="Weight of the posterior's KL to N(0, I) per latent element.")
    eval_images: int = option(512, help="Rendered images reconstructed at every evaluation (a fixed set).")
    calibration_images: int = option(
        2048, help="Rendered images whose latents set shift and scale at the end."
    )
    grid_size: int = option(16, help="Image pairs (render, reconstruction) in each grid PNG.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ConfigError(f"lr must be > 0, got {self.learning_rate}")
        if self.mse_weight < 0 or self.kl_weight < 0:
            raise ConfigError(
                f"mse_weight and kl_weight must be >= 0, got {self.mse_weight} and {self.kl_weight}"
            )


class VAEPretrainTrainer(StepLoopTrainer):
    """Reconstruction + KL training of the shapes ``AutoencoderKL``; see the module docstring for outputs."""

    progress_name = "pretrain-vae"
    summary_results = (
        ("psnr", "final held-out PSNR (dB)"),
        ("verifier_accuracy", "verifier accuracy of decoded renders"),
    )
    ema = None

    def __init__(self, config: VAEPretrainConfig):
        from rlflow.worlds.shapes.verifier import ShapesVerifier

        self.config = config
        self.output_dir = Path(config.output_dir)
        self.device = torch.device(config.device)
        self.generator = prepare_run(config.seed, config.num_threads)
        self.batches = shapes_batches(config.batch_size, self.generator, image_size=config.vae.image_size)
        self.vae = build_shapes_vae(config.vae).to(self.device).train()
        self.setup_optimization(list(self.vae.parameters()))
        self.verifier = ShapesVerifier()
        # A fixed evaluation set, independent of the training draws (its own seed).
        self.eval_images, self.eval_prompts = next(
            shapes_batches(
                config.eval_images,
                torch.Generator().manual_seed(config.seed + 1),
                image_size=config.vae.image_size,
            )
        )
        self.step = 0

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, images: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        """The VAE objective on ``images`` ([-1, 1]); a posterior sample when ``generator`` is given."""
        config = self.config
        x = images.to(self.device)
        posterior = self.vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(self.device) if generator else 0.0
        z = posterior.mean + posterior.std * noise
        reconstruction = self.vae.decode(z).sample
        l1 = (reconstruction - x).abs().mean()
        mse = (reconstruction - x).square().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = l1 + config.mse_weight * mse + config.kl_weight * kl
        return loss, {"train/l1": l1.item(), "train/mse": mse.item(), "train/kl": kl.item()}

    def update(self) -> dict[str, float]:
        images, _ = next(self.batches)
        loss, parts = self.loss(images, self.generator)
        return {**self.optimizer_step(loss, self.vae), **parts}

    # ------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Posterior-mean reconstructions in [0, 1] of ``images`` in [-1, 1]."""
        out = []
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk].to(self.device)
            z = self.vae.encode(x).latent_dist.mean
            out.append(((self.vae.decode(z).sample + 1.0) / 2.0).clamp(0.0, 1.0).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, *, grid_path: Path | None = None) -> dict[str, float]:
        """Verifier accuracy and pixel errors of decoded renders; optionally a render/reconstruction grid."""
        was_training = self.vae.training
        self.vae.eval()
        originals = (self.eval_images + 1.0) / 2.0
        decoded = self.reconstruct(self.eval_images)
        verdict = self.verifier.evaluate(decoded, self.eval_prompts)
        mse = float((decoded - originals).square().mean())
        metrics = {
            "eval/verifier_accuracy": float(verdict["correct"].float().mean()),
            "eval/verifier_score": float(verdict["score"].float().mean()),
            "eval/mse": mse,
            "eval/psnr": float(10.0 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12)))),
            "eval/max_abs_error": float((decoded - originals).abs().amax(dim=(1, 2, 3)).mean()),
        }
        if grid_path is not None:
            from rlflow.utils.plotting import save_image_grid

            n = min(self.config.grid_size, len(decoded))
            pairs = torch.stack([originals[:n], decoded[:n]], dim=1).flatten(0, 1)
            captions = [c for p in self.eval_prompts[:n] for c in (p, "reconstruction")]
            save_image_grid(
                pairs, captions, grid_path, ncols=8, title=f"step {self.step}: renders and decodes"
            )
        self.vae.train(was_training)
        return metrics

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def trained_model(self) -> nn.Module:
        return self.vae

    def save_weights(self, model: nn.Module, directory: Path) -> None:
        save_shapes_vae(model, directory)  # replaces only the files diffusers writes, and the card

    def load_weights(self, directory: Path) -> tuple[nn.Module, dict[str, Any]]:
        return load_shapes_vae(directory), asdict(self.config.vae)

    def model_config_dict(self) -> dict[str, Any]:
        return asdict(self.config.vae)

    # ----------------------------------------------------------------------------------------- train
    evaluation_image_tag = "eval/reconstructions"

    def evaluation_image(self, plots: Path, *, final: bool) -> Path:
        return plots / ("reconstructions.png" if final else f"reconstructions_step_{self.step:07d}.png")

    def periodic_evaluation(self, plots: Path) -> dict[str, float]:
        return self.evaluate(grid_path=self.evaluation_image(plots, final=False))

    def final_evaluation(self, plots: Path) -> dict[str, float]:
        return self.evaluate(grid_path=self.evaluation_image(plots, final=True))

    def final_outputs(self, final: dict[str, float]) -> dict[str, Any]:
        images, _ = next(
            shapes_batches(
                self.config.calibration_images,
                torch.Generator().manual_seed(self.config.seed + 2),
                image_size=self.config.vae.image_size,
            )
        )
        self.vae.eval()
        shift, scale = calibrate_latent_scale(self.vae, images.to(self.device))
        final_dir = self.output_dir / "final"
        card = self.model_card(final, shift_factor=shift, scaling_factor=scale)
        save_shapes_vae(self.vae, final_dir, card=card)
        logger.info("calibrated latents: shift_factor %.4f, scaling_factor %.4f", shift, scale)
        return {"model_dir": str(final_dir), "shift_factor": shift, "scaling_factor": scale}

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        postfix = super().progress_postfix(metrics)
        if "eval/verifier_accuracy" in metrics:
            postfix["verifier"] = f"{metrics['eval/verifier_accuracy']:.3f}"
        return postfix



def train(config: VAEPretrainConfig) -> dict[str, Any]:
    """CLI entry point: ``rlflow pretrain-vae --config recipe.yaml``."""
    return VAEPretrainTrainer(config).train()
