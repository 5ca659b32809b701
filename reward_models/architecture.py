"""Which reward model a preference set needs: :class:`RewardModelSizes` (the ``model:`` section of
``rlflow reward-model``'s config) and :func:`reward_model_for`, which builds the model from them and the set.

The kind, the heads and the input shapes come from the data (a segment set's ``obs_dim`` / ``act_dim``, an
image set's image or, for noise-aware models, latent shape); the sizes only set the network's widths. The
transformer architecture starts from the MM-DiT of a shapes flow model (``init_from``); the CNN and segment
models start from random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import nn

from rlflow.config import ConfigError, option

from .learned import RewardModelConfig, TransformerRewardModel, build_reward_model

if TYPE_CHECKING:
    from rlflow.data.preferences import PreferenceSet

__all__ = ["RewardModelSizes", "reward_model_for"]


@dataclass
class RewardModelSizes:
    """Network sizes (the kind, dimensions and input shapes come from the preference data)."""

    conv_channels: list[int] = option(
        default_factory=lambda: [16, 32, 64], help="Image kind: CNN widths; each stage halves the resolution."
    )
    text_dim: int = option(32, help="Image kind: prompt-embedding width (hashed words + bigrams).")
    text_buckets: int = option(2048, help="Image kind: hash buckets of the prompt encoder.")
    time_dim: int = option(32, help="Noise-aware image kind: time-embedding width.")
    hidden_dim: int = option(64, help="MLP width (image: on pooled features; segment: per step).")
    segment_layers: int = option(2, help="Segment kind: hidden layers of the per-step MLP.")
    stem_channels: int = option(0, help="Image kind: per-pixel MLP width before the CNN (0: none).")
    dropout: float = option(0.0, help="Image kind: dropout on the pooled features.")
    coord_channels: bool = option(False, help="Image kind: x/y coordinate maps as extra CNN inputs.")
    architecture: Literal["cnn", "transformer"] = option(
        "cnn",
        help="Image kind: cnn (the FiLM CNN above, from scratch) or transformer (the MM-DiT of the flow model "
        "in init_from, fine-tuned with a pooled readout; hidden_dim and dropout apply to the readout).",
    )
    init_from: str | None = option(
        None,
        help="Transformer architecture: a saved shapes flow model directory (e.g. "
        "recipes/alignment/artifacts/shapes_base) whose text encoder and transformer initialise the model.",
    )


def reward_model_for(
    data: PreferenceSet, sizes: RewardModelSizes, *, dimensions: list[str], noise_aware: bool, source: str
) -> nn.Module:
    """A fresh reward model for preference set ``data`` (read from ``source``, named in errors) with one head
    per ``dimensions`` entry; :class:`ConfigError` when the set and the sizes do not fit together."""
    common = {"dimensions": dimensions, "hidden_dim": sizes.hidden_dim}
    if data.kind == "segment":
        obs_dim, act_dim = data.meta.get("obs_dim"), data.meta.get("act_dim")
        if not isinstance(obs_dim, int) or not isinstance(act_dim, int):
            raise ConfigError(
                f"segment preference set {source} has no integer obs_dim/act_dim in its meta "
                f"(got {obs_dim!r}, {act_dim!r}); rebuild it with save_preferences and meta obs_dim/act_dim"
            )
        return build_reward_model(
            RewardModelConfig(
                kind="segment",
                obs_dim=obs_dim,
                act_dim=act_dim,
                segment_layers=sizes.segment_layers,
                **common,
            )
        )
    # A noise-aware model sees model-space latents (the shape of a VAE's latents, not of the images).
    inputs = data.latents_a if noise_aware and data.latents_a is not None else data.a
    if inputs.ndim != 4 or inputs.shape[2] != inputs.shape[3]:
        raise ConfigError(f"image reward models take square [N, C, H, H] inputs, got {tuple(inputs.shape)}")
    _, channels, height, _ = inputs.shape
    if sizes.architecture == "transformer":
        if not sizes.init_from:
            raise ConfigError(
                "model.architecture: transformer needs model.init_from, a saved shapes flow model directory "
                "(e.g. recipes/alignment/artifacts/shapes_base)"
            )
        from rlflow.worlds.shapes.model import load_shapes_model, shapes_config_of

        flow = load_shapes_model(sizes.init_from)
        backbone = shapes_config_of(flow)
        if (backbone.channels, backbone.image_size) != (channels, height):
            raise ConfigError(
                f"model.init_from {sizes.init_from} generates [{backbone.channels}, {backbone.image_size}, "
                f"{backbone.image_size}] samples but the preference set holds [{channels}, {height}, {height}] "
                "inputs; initialise from the flow model of the preference set's world"
            )
        return TransformerRewardModel.from_flow_model(
            flow, dimensions, noise_aware=noise_aware, hidden_dim=sizes.hidden_dim, dropout=sizes.dropout
        )
    return build_reward_model(
        RewardModelConfig(
            kind="image",
            noise_aware=noise_aware,
            image_size=height,
            channels=channels,
            conv_channels=list(sizes.conv_channels),
            text_dim=sizes.text_dim,
            text_buckets=sizes.text_buckets,
            time_dim=sizes.time_dim,
            stem_channels=sizes.stem_channels,
            dropout=sizes.dropout,
            coord_channels=sizes.coord_channels,
            **common,
        )
    )
