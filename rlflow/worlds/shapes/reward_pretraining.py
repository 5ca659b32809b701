"""The renderer pretraining stage of a shapes-world image reward model (``rlflow reward-model``'s
``pretrain_steps``).

Before it sees a single labelled preference, the model learns comparisons whose winner is known by
construction (:func:`~rlflow.worlds.shapes.augmentation.pretraining_batch`): a render of the prompt beats a
render of a perturbed prompt (``match``: what alignment heads learn) and a render beats a more degraded copy
of itself (``clean``: what quality heads learn). Never labelled by the oracle, so it cannot leak the
held-out labels. A noise-aware model sees the three images noised with one shared time and noise (in the
latent space of the world's VAE when the preference set's latents are a VAE's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.functional import logsigmoid

from rlflow.config import ConfigError
from rlflow.flows import linear_path
from rlflow.utils.schedules import make_lr_scheduler
from rlflow.worlds.shapes.augmentation import PretrainBatch, pretraining_batch

if TYPE_CHECKING:
    from rlflow.data.preferences import PreferenceSet

__all__ = ["RendererPretraining", "has_vae_latents", "preference_set_vae"]

logger = logging.getLogger(__name__)


@dataclass
class RendererPretraining:
    """What the stage needs to know about the model it pretrains.

    Attributes:
        dimensions: the model's heads, in output order.
        objectives: ``{dimension: match | clean}``; ``None``: ``alignment`` learns ``match`` and ``quality``
            learns ``clean`` (those of them the model has).
        render_size: the side of the renders, that of the preference set's images.
        noise_aware: whether the model scores noised latents ``x_t`` at a time ``t``.
        training_times: ``(n, generator) -> [n]`` times for a noise-aware model (the trainer's distribution).
        vae: encodes renders for a noise-aware model of a latent world (``None``: pixels, ``images * 2 - 1``).
        device: where the model is.
    """

    dimensions: list[str]
    objectives: Mapping[str, str] | None
    render_size: int
    noise_aware: bool
    training_times: Callable[[int, torch.Generator], Tensor]
    vae: nn.Module | None = None
    device: torch.device = torch.device("cpu")

    def head_objectives(self) -> dict[int, str]:
        """``{head index: match | clean}`` (a :class:`ConfigError` names the model's dimensions)."""
        spec = self.objectives
        if spec is None:
            spec = {d: o for d, o in (("alignment", "match"), ("quality", "clean")) if d in self.dimensions}
        unknown = [d for d in spec if d not in self.dimensions]
        if unknown or not spec:
            raise ConfigError(
                f"pretrain_objectives {dict(spec)} must name some of this model's dimensions {self.dimensions} "
                "(e.g. {alignment: match, quality: clean})"
            )
        return {self.dimensions.index(d): o for d, o in spec.items()}

    def step_loss(
        self, model: nn.Module, batch: PretrainBatch, objectives: dict[int, str], generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        """Bradley-Terry loss of one batch (positive beats negative / degraded) on the heads of
        ``objectives``, and each head's accuracy."""
        images = torch.cat([batch.positive, batch.negative, batch.degraded]).to(self.device)
        n = batch.positive.shape[0]
        t = None
        if self.noise_aware:
            if self.vae is not None:
                from rlflow.worlds.shapes.vae import encode_images

                with torch.no_grad():
                    x1 = encode_images(self.vae, images * 2.0 - 1.0)
            else:
                x1 = images * 2.0 - 1.0
            t1 = self.training_times(n, generator)
            noise = torch.randn(x1[:n].shape, generator=generator).to(self.device)
            t = t1.repeat(3)
            images = linear_path(noise.repeat(3, 1, 1, 1), x1, t).x_t
        pos, neg, deg = model(images, batch.prompts * 3, t).chunk(3)
        losses, metrics = [], {}
        for head, objective in objectives.items():
            other = neg if objective == "match" else deg
            diff = pos[:, head] - other[:, head]
            losses.append(-logsigmoid(diff).mean())
            name = self.dimensions[head]
            metrics[f"pretrain/{name}/{objective}_accuracy"] = (diff > 0).float().mean().item()
        return torch.stack(losses).mean(), metrics

    def run(
        self,
        model: nn.Module,
        *,
        steps: int,
        batch_size: int,
        learning_rate: float,
        weight_decay: float,
        warmup_steps: int,
        min_lr_ratio: float,
        max_grad_norm: float | None,
        seed: int,
        logging_steps: int,
    ) -> dict[str, float]:
        """Pretrain ``model`` for ``steps`` steps (AdamW, cosine schedule, its own generator: the preference
        training after it is unaffected). Returns the last 10% of steps' mean metrics (``pretrain/...``)."""
        objectives = self.head_objectives()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
        scheduler = make_lr_scheduler(
            optimizer,
            "cosine",
            total_steps=steps,
            warmup_steps=min(warmup_steps, steps - 1),
            min_lr_ratio=min_lr_ratio,
        )
        generator = torch.Generator().manual_seed(seed * 7_919 + 17)
        history: list[dict[str, float]] = []
        model.train()
        for step in range(steps):
            batch = pretraining_batch(batch_size, generator, self.render_size)
            loss, metrics = self.step_loss(model, batch, objectives, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            scheduler.step()
            metrics["pretrain/loss"] = loss.item()
            history.append(metrics)
            if (step + 1) % max(1, logging_steps) == 0:
                logger.info("pretrain step %d: %s", step + 1, metrics)
        last = history[-max(1, steps // 10) :]
        return {key: sum(m[key] for m in last) / len(last) for key in last[0]} if last else {}


def has_vae_latents(data: PreferenceSet) -> bool:
    """Whether the set's model-space latents are a VAE's (another shape than the images), not images * 2 - 1."""
    return data.latents_a is not None and tuple(data.latents_a.shape[1:]) != tuple(data.a.shape[1:])


def preference_set_vae(data: PreferenceSet, data_dir: str) -> nn.Module:
    """The VAE of the model that generated a latent world's preference set (its meta's ``model_path``)."""
    from rlflow.worlds.shapes.model import load_shapes_model

    model_path = data.meta.get("model_path")
    if not isinstance(model_path, str) or not Path(model_path).is_dir():
        raise ConfigError(
            f"preference set {data_dir} holds VAE latents but its meta names no readable model_path "
            f"({model_path!r}) to encode renders for pretraining; set pretrain_steps: 0 or rebuild the set"
        )
    vae = load_shapes_model(model_path).vae
    if vae is None:
        raise ConfigError(
            f"preference set {data_dir}: model {model_path} has no VAE, yet the set's latents "
            f"{tuple(data.latents_a.shape[1:])} are not images; rebuild the set with `rlflow preferences`"
        )
    return vae.requires_grad_(False).eval()
