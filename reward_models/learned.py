"""Learned reward models: trained from pairwise preferences by ``rlflow reward-model``.

Two kinds, one head (output) per preference dimension:

* :class:`ImageRewardModel` — ``r(x, prompt) -> [B, D]``: a small CNN over the image whose feature maps
  are modulated (FiLM) by a prompt embedding, so a head can express "is this image consistent with the
  prompt" (e.g. "is the circle the prompt's colour?") and not only prompt-independent quality.
  The *noise-aware* variant scores a noised sample ``x_t = (1 - t) x0 + t x1`` in model space at time
  ``t`` (``t = 1`` is clean data); it is differentiable in ``x`` so a sampler can follow
  ``grad_x r(x_t, t)`` (:func:`reward_gradient`).
* :class:`SegmentRewardModel` — per-step ``r(obs, act) -> [D]``; a segment's score is the sum over its
  steps (Christiano et al. 2017, "Deep RL from human preferences").

The prompt encoder is a hashed bag of words *and word bigrams* (stable CRC32 hashes into
``text_buckets`` embedding rows): any prompt works (no vocabulary to match), and bigrams such as
"red circle" keep which colour goes with which shape in "a red circle and a green square".

Checkpoints are directories ``config.json`` + ``model.safetensors`` + a model card ``README.md`` written
atomically (:func:`save_reward_model` / ``model.save_pretrained``; :func:`load_reward_model` dispatches on ``kind``).
:class:`LearnedReward` wraps an image model in the reward protocol (registered as ``learned``)::

    rewards:
      learned: {path: runs/reward_model/model, head: alignment}
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from rlflow.config import option
from rlflow.errors import CheckpointError
from rlflow.utils.checkpoint import (
    atomic_update,
    load_state_dict,
    load_weights_into,
    save_state_dict,
)
from rlflow.utils.model_format import (
    CONFIG_NAME,
    LEGACY_FILES,
    WEIGHTS_NAME,
    read_model_config,
    write_model_config,
)

from .base import check_reward_inputs

if TYPE_CHECKING:
    from rlflow.utils.model_card import ModelCardInfo, ModelDescription

__all__ = [
    "CONFIG_FILE",
    "MODEL_TYPE",
    "WEIGHTS_FILE",
    "ImageRewardModel",
    "LearnedReward",
    "RewardModelConfig",
    "SegmentRewardModel",
    "TransformerRewardModel",
    "head_weight_vector",
    "load_reward_model",
    "reward_gradient",
    "save_reward_model",
]

CONFIG_FILE = CONFIG_NAME
WEIGHTS_FILE = WEIGHTS_NAME
#: The ``model_type`` in a saved reward model's ``config.json`` (:mod:`rlflow.utils.model_format`).
MODEL_TYPE = "rlflow.RewardModel"

PathLike = str | os.PathLike[str]


@dataclass
class RewardModelConfig:
    """Architecture of a learned reward model (saved as ``config.json``)."""

    kind: Literal["image", "segment"] = option(
        "image", help="image (images + prompts) or segment (obs, act)."
    )
    dimensions: list[str] = option(
        default_factory=lambda: ["alignment"], help="Preference dimensions: one output head each."
    )
    noise_aware: bool = option(
        False, help="Image kind only: score x_t in model space at time t (for guidance) instead of images."
    )
    architecture: Literal["cnn", "transformer"] = option(
        "cnn",
        help="Image kind: cnn (a small FiLM CNN, trained from scratch) or transformer (the MM-DiT of a shapes "
        "flow model, whose prompt tokens and image patches attend to each other, with a pooled readout).",
    )
    backbone: dict[str, Any] | None = option(
        None,
        help="Transformer architecture: the backbone's ShapesModelConfig fields (the trainer copies them from "
        "the flow model it initialises from).",
    )
    # image kind
    image_size: int = option(32, help="Image side in pixels (images are square).")
    channels: int = option(3, help="Image channels.")
    conv_channels: list[int] = option(
        default_factory=lambda: [16, 32, 64], help="CNN widths; each stage halves the resolution."
    )
    text_dim: int = option(32, help="Width of the prompt embedding.")
    text_buckets: int = option(2048, help="Hash buckets of the bag-of-words/bigrams prompt encoder.")
    time_dim: int = option(32, help="Width of the time embedding (noise-aware models).")
    stem_channels: int = option(
        0,
        help="Image kind: width of a per-pixel MLP (two 1x1 convs) before the CNN; 0 = none. Lets the "
        "model compute per-pixel colour features (e.g. 'how far from a palette colour') before pooling.",
    )
    dropout: float = option(0.0, help="Image kind: dropout on the pooled features (regularisation).")
    coord_channels: bool = option(
        False,
        help="Image kind: append x and y coordinate maps to the CNN input (CoordConv), so pooled features "
        "can say where things are (left of / above).",
    )
    # both kinds
    hidden_dim: int = option(64, help="Width of the MLP on pooled features (image) / per step (segment).")
    # segment kind
    obs_dim: int = option(0, help="Segment kind: observation size.")
    act_dim: int = option(0, help="Segment kind: action size.")
    segment_layers: int = option(2, help="Segment kind: hidden layers of the per-step MLP.")

    def __post_init__(self) -> None:
        if self.kind not in ("image", "segment"):
            raise ValueError(f"reward model kind must be 'image' or 'segment', got {self.kind!r}")
        if isinstance(self.dimensions, str) or not self.dimensions:
            raise ValueError(f"dimensions must be a non-empty list of names, got {self.dimensions!r}")
        if len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"dimensions must be distinct, got {self.dimensions!r}")
        self.dimensions = list(self.dimensions)
        self.conv_channels = list(self.conv_channels)
        if self.kind == "segment":
            if self.noise_aware or self.architecture != "cnn":
                raise ValueError(
                    "noise_aware and architecture apply to image reward models only; set noise_aware: false "
                    "and leave architecture out"
                )
            if self.obs_dim < 1 or self.act_dim < 0:
                raise ValueError(
                    f"segment reward models need obs_dim >= 1 and act_dim >= 0, got obs_dim={self.obs_dim}, "
                    f"act_dim={self.act_dim} (the preference set's meta gives them)"
                )
            if self.segment_layers < 1:
                raise ValueError(f"segment_layers must be >= 1, got {self.segment_layers}")
        elif self.architecture == "transformer":
            if not isinstance(self.backbone, dict):
                raise ValueError(
                    "architecture: transformer needs backbone (the shapes model config it is built from); "
                    "rlflow reward-model fills it from model.init_from"
                )
        elif self.architecture != "cnn":
            raise ValueError(f"architecture must be cnn or transformer, got {self.architecture!r}")
        else:
            if not self.conv_channels or min(self.conv_channels) < 1:
                raise ValueError(
                    f"conv_channels must be a non-empty list of positive ints, got {self.conv_channels}"
                )
            if self.image_size < 2 ** len(self.conv_channels):
                raise ValueError(
                    f"image_size={self.image_size} is too small for {len(self.conv_channels)} downsampling "
                    "stages; use fewer conv_channels"
                )
        if self.stem_channels < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"stem_channels must be >= 0 and dropout in [0, 1), got {self.stem_channels}, {self.dropout}"
            )
        for name in ("hidden_dim", "text_dim", "text_buckets", "time_dim", "channels", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------------------
# Image reward model
# ---------------------------------------------------------------------------------------------------------


def _prompt_tokens(prompt: str) -> list[str]:
    words = re.sub(r"[^\w\s]", " ", prompt.lower()).split()
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def _bucket(token: str, buckets: int) -> int:
    # CRC32, not hash(): Python salts str hashes per process, which would scramble a saved model.
    return zlib.crc32(token.encode("utf-8")) % buckets


class HashedPromptEncoder(nn.Module):
    """Mean of hashed word + bigram embeddings -> MLP: ``[B, text_dim]``; the empty prompt maps to a learned
    ``empty`` vector (so it is a valid, distinct input)."""

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.buckets = buckets
        self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.empty = nn.Parameter(torch.zeros(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.embedding.weight, std=0.5)

    def forward(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts (one per image), not a single string")
        device = self.empty.device
        ids: list[int] = []
        offsets: list[int] = []
        for prompt in prompts:  # tokenising strings is inherently per prompt; the maths below is batched
            offsets.append(len(ids))
            ids.extend(_bucket(token, self.buckets) for token in _prompt_tokens(prompt))
        if not prompts:
            return torch.zeros(0, self.empty.numel(), device=device)
        bag = self.embedding(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(offsets, dtype=torch.long, device=device),
        )
        lengths = torch.diff(torch.tensor([*offsets, len(ids)], device=device))
        bag = torch.where((lengths == 0)[:, None], self.empty.expand_as(bag), bag)
        return self.mlp(bag)


def time_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features ``[B, dim]`` of times ``t`` in [0, 1]: sin and cos of ``1000 t f`` for ``dim / 2``
    frequencies ``f`` spaced geometrically from 1 down to 1/1000 (fine and coarse resolution in ``t``)."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(1000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / max(half, 1)
    )
    angles = (t[:, None] * 1000.0) * frequencies[None]
    features = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(features, (0, dim - 2 * half))


class FiLMBlock(nn.Module):
    """conv3x3 -> GroupNorm -> FiLM(gamma, beta from the condition) -> SiLU -> strided conv (halves H, W)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.GroupNorm(1, out_channels)
        self.film = nn.Linear(cond_dim, 2 * out_channels)
        self.down = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        # Start as the identity modulation (gamma = 1, beta = 0): training begins from a plain CNN.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        gamma, beta = self.film(cond).chunk(2, dim=1)
        h = self.norm(self.conv(x)) * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return self.down(torch.nn.functional.silu(h))


class _SaveMixin:
    config: RewardModelConfig

    def save_pretrained(self, directory: PathLike, *, card: ModelCardInfo | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + the model card ``README.md`` to ``directory``
        (other files there are kept); ``card``: how it was trained (:mod:`rlflow.utils.model_card`)."""
        return save_reward_model(self, directory, card=card)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, directory: PathLike, device: str | torch.device = "cpu") -> Any:
        model = load_reward_model(directory, device=device)
        if not isinstance(model, cls):
            raise CheckpointError(
                f"{directory} holds a {type(model).__name__} ({model.config.kind} kind), not a {cls.__name__}; "
                "use load_reward_model to load any kind"
            )
        return model


class _ImageScorer(_SaveMixin, nn.Module):
    """What both image architectures share: the heads' names and the input checks."""

    config: RewardModelConfig

    @property
    def dimensions(self) -> list[str]:
        return list(self.config.dimensions)

    def _check(self, x: Tensor, prompts: Sequence[str], t: Tensor | None) -> Tensor | None:
        config = self.config
        expected = (config.channels, config.image_size, config.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"reward model expects x of shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}"
            )
        if isinstance(prompts, str) or len(prompts) != x.shape[0]:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"reward model expects one prompt per sample ({x.shape[0]}), got {got}")
        if not config.noise_aware:
            if t is not None:
                raise ValueError("this reward model is not noise-aware: call it on clean images without t")
            return None
        if t is None:
            raise ValueError("this reward model is noise-aware: pass t ([B] times in [0, 1]; 1 = clean data)")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape [{x.shape[0]}], got {tuple(t.shape)}")
        return t


class ImageRewardModel(_ImageScorer):
    """``forward(x, prompts, t=None) -> [B, D]`` scores, one column per ``config.dimensions``.

    * clean model (``noise_aware=False``): ``x`` are images ``[B, C, H, W]`` in [0, 1]; ``t`` must be None.
    * noise-aware model: ``x`` is ``x_t`` in model space (shapes world: ``images * 2 - 1`` at ``t = 1``,
      Gaussian noise at ``t = 0``), ``t`` is ``[B]`` (or a scalar) in [0, 1]. Differentiable in ``x``.

    Architecture: the prompt embedding (and for noise-aware models the time embedding) forms a condition
    that modulates every CNN stage (FiLM) and is concatenated with the globally mean- and max-pooled
    features before an MLP; beside it, the product of an image and a text projection of the same width
    (CLIP-like match features). The last linear layer has one output (head) per dimension.
    Optional (config): a per-pixel MLP stem (``stem_channels``), x/y coordinate input maps
    (``coord_channels``) and dropout on the pooled features (``dropout``).
    """

    def __init__(self, config: RewardModelConfig):
        super().__init__()
        if config.kind != "image":
            raise ValueError(f"ImageRewardModel needs kind='image', got {config.kind!r}")
        self.config = config
        self.text = HashedPromptEncoder(config.text_buckets, config.text_dim)
        cond_dim = config.text_dim + (config.time_dim if config.noise_aware else 0)
        self.time_mlp = (
            nn.Sequential(
                nn.Linear(config.time_dim, config.time_dim),
                nn.SiLU(),
                nn.Linear(config.time_dim, config.time_dim),
            )
            if config.noise_aware
            else None
        )
        # Optional per-pixel MLP: colour-space nonlinearities at full resolution, cheap (1x1 convs).
        self.stem = (
            nn.Sequential(
                nn.Conv2d(config.channels, config.stem_channels, 1),
                nn.SiLU(),
                nn.Conv2d(config.stem_channels, config.stem_channels, 1),
                nn.SiLU(),
            )
            if config.stem_channels
            else None
        )
        first = (config.stem_channels if config.stem_channels else config.channels) + (
            2 if config.coord_channels else 0
        )
        widths = [first, *config.conv_channels]
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            FiLMBlock(widths[i], widths[i + 1], cond_dim) for i in range(len(config.conv_channels))
        )
        self.mlp = nn.Sequential(
            nn.Linear(2 * widths[-1] + cond_dim, config.hidden_dim),
            nn.SiLU(),
            nn.Linear(config.hidden_dim, config.hidden_dim),
            nn.SiLU(),
        )
        # CLIP-like match features: the product of an image and a text projection gives the heads direct
        # multiplicative image x prompt interactions ("is the object the colour the prompt names?"),
        # which an MLP on concatenated features learns only slowly.
        self.image_projection = nn.Linear(2 * widths[-1], config.hidden_dim)
        self.text_projection = nn.Linear(cond_dim, config.hidden_dim)
        self.heads = nn.Linear(2 * config.hidden_dim, len(config.dimensions))

    def forward(self, x: Tensor, prompts: Sequence[str], t: Tensor | None = None) -> Tensor:
        t = self._check(x, prompts, t)
        cond = self.text(prompts)
        if self.time_mlp is not None and t is not None:
            cond = torch.cat([cond, self.time_mlp(time_features(t, self.config.time_dim))], dim=1)
            h = x
        else:
            h = x * 2.0 - 1.0  # images [0, 1] -> the [-1, 1] range the noise-aware model also sees at t = 1
        if self.stem is not None:
            h = self.stem(h)
        if self.config.coord_channels:
            # x (left -1 .. right 1) and y (top -1 .. bottom 1) maps, the same for every sample
            axis = torch.linspace(-1.0, 1.0, h.shape[-1], device=h.device, dtype=h.dtype)
            grid = torch.stack([axis[None, :].expand(h.shape[-2], -1), axis[:, None].expand(-1, h.shape[-1])])
            h = torch.cat([h, grid.expand(h.shape[0], -1, -1, -1)], dim=1)
        for block in self.blocks:
            h = block(h, cond)
        pooled = self.dropout(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))
        match = self.image_projection(pooled) * self.text_projection(cond)
        return self.heads(torch.cat([self.mlp(torch.cat([pooled, cond], dim=1)), match], dim=1))


class TransformerRewardModel(_ImageScorer):
    """``forward(x, prompts, t=None) -> [B, D]`` on the MM-DiT of a shapes flow model (same interface as
    :class:`ImageRewardModel`).

    Real reward models are fine-tuned from a pretrained image-text backbone; the diffusion model itself is one
    (LPO, Zhang et al. 2025, "Diffusion Model as a Noise-Aware Latent Reward Model"): its joint-attention
    blocks already relate prompt tokens to image patches ("which colour goes with which shape, where"), which
    a small CNN conditioned on a pooled prompt vector extracts poorly. This model keeps the backbone's text
    encoder, patch embedding, time/text embedding and MM-DiT blocks, drops its output layers, and reads the
    scores from the mean- and max-pooled image tokens and the time/text embedding through an MLP.

    Inputs as for :class:`ImageRewardModel`: clean images in [0, 1] (scored as ``x_1 = 2 x - 1`` at
    ``t = 1``) or, noise-aware, model-space ``x_t`` at ``t``; the backbone gets diffusers' timestep
    ``1000 (1 - t)``. Build it from a saved flow model with :meth:`from_flow_model`.
    """

    def __init__(self, config: RewardModelConfig):
        super().__init__()
        from rlflow.config import ConfigError, config_from_dict
        from rlflow.worlds.shapes.model import (
            ShapesModelConfig,
            ShapesTextEncoder,
            build_shapes_transformer,
        )

        if config.kind != "image" or config.architecture != "transformer" or config.backbone is None:
            raise ValueError(
                "TransformerRewardModel needs kind='image', architecture='transformer' and a backbone"
            )
        try:
            backbone = config_from_dict(ShapesModelConfig, config.backbone, source="reward model backbone")
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        if (backbone.channels, backbone.image_size) != (config.channels, config.image_size):
            raise ValueError(
                f"the backbone takes [{backbone.channels}, {backbone.image_size}, {backbone.image_size}] inputs but "
                f"the reward model scores [{config.channels}, {config.image_size}, {config.image_size}]; "
                "initialise from a flow model of the preference set's world"
            )
        self.config = config
        self.text_encoder = ShapesTextEncoder(backbone)
        transformer = build_shapes_transformer(backbone)
        # The readout replaces the output layers; removing them keeps every parameter in the loss (DDP
        # refuses parameters without gradients).
        transformer.norm_out = None
        transformer.proj_out = None
        self.transformer = transformer
        width = backbone.num_attention_heads * backbone.attention_head_dim
        self.dropout = nn.Dropout(config.dropout)
        self.readout = nn.Sequential(
            nn.LayerNorm(3 * width),
            nn.Linear(3 * width, config.hidden_dim),
            nn.SiLU(),
            nn.Linear(config.hidden_dim, config.hidden_dim),
            nn.SiLU(),
        )
        self.heads = nn.Linear(config.hidden_dim, len(config.dimensions))

    @classmethod
    def from_flow_model(cls, flow: Any, dimensions: Sequence[str], **config: Any) -> TransformerRewardModel:
        """A reward model whose backbone (architecture and weights) is a shapes flow model: a loaded one or
        its directory (written by ``save_shapes_model``); the readout and heads start fresh. ``config``:
        other :class:`RewardModelConfig` fields (``noise_aware``, ``hidden_dim``, ``dropout``)."""
        from rlflow.worlds.shapes.model import load_shapes_model, shapes_config_of

        if isinstance(flow, (str, os.PathLike)):
            flow = load_shapes_model(flow)
        backbone = shapes_config_of(flow)
        model = cls(
            RewardModelConfig(
                kind="image",
                dimensions=list(dimensions),
                architecture="transformer",
                backbone=dataclasses.asdict(backbone),
                image_size=backbone.image_size,
                channels=backbone.channels,
                **config,
            )
        )
        model.text_encoder.load_state_dict(flow.prompt_encoder.state_dict())
        weights = {
            key: value
            for key, value in flow.transformer.state_dict().items()
            if not key.startswith(("norm_out.", "proj_out."))
        }
        model.transformer.load_state_dict(weights)
        return model

    def forward(self, x: Tensor, prompts: Sequence[str], t: Tensor | None = None) -> Tensor:
        t = self._check(x, prompts, t)
        if t is None:  # a clean model: images in [0, 1] are the data end of the path
            x, t = x * 2.0 - 1.0, torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        text = self.text_encoder(list(prompts))
        backbone = self.transformer
        dtype = x.dtype
        tokens = backbone.pos_embed(x).contiguous()
        temb = backbone.time_text_embed((1.0 - t) * 1000.0, text.pooled.to(dtype))
        context = backbone.context_embedder(text.hidden_states.to(dtype))
        for block in backbone.transformer_blocks:
            context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
        pooled = torch.cat([tokens.mean(dim=1), tokens.amax(dim=1), temb], dim=1)
        return self.heads(self.readout(self.dropout(pooled)))


# ---------------------------------------------------------------------------------------------------------
# Segment reward model
# ---------------------------------------------------------------------------------------------------------


class SegmentRewardModel(_SaveMixin, nn.Module):
    """Per-step MLP ``r(obs, act) -> [..., D]``; ``forward(segments [B, L, obs+act]) -> [B, D]`` sums over steps."""

    def __init__(self, config: RewardModelConfig):
        super().__init__()
        if config.kind != "segment":
            raise ValueError(f"SegmentRewardModel needs kind='segment', got {config.kind!r}")
        self.config = config
        layers: list[nn.Module] = []
        width = config.obs_dim + config.act_dim
        for _ in range(config.segment_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.SiLU()]
            width = config.hidden_dim
        layers.append(nn.Linear(width, len(config.dimensions)))
        self.mlp = nn.Sequential(*layers)

    @property
    def dimensions(self) -> list[str]:
        return list(self.config.dimensions)

    def step_rewards(self, obs: Tensor, act: Tensor) -> Tensor:
        """Per-step rewards ``[..., D]`` for observations ``[..., obs_dim]`` and actions ``[..., act_dim]``."""
        config = self.config
        if obs.shape[-1] != config.obs_dim or act.shape[-1] != config.act_dim:
            raise ValueError(
                f"segment reward model expects obs [..., {config.obs_dim}] and act [..., {config.act_dim}], "
                f"got {tuple(obs.shape)} and {tuple(act.shape)}"
            )
        return self.mlp(torch.cat([obs, act], dim=-1))

    def forward(self, segments: Tensor) -> Tensor:
        width = self.config.obs_dim + self.config.act_dim
        if segments.ndim != 3 or segments.shape[-1] != width:
            raise ValueError(
                f"segments must have shape [B, L, {width}] (obs then act), got {tuple(segments.shape)}"
            )
        obs, act = segments.split([self.config.obs_dim, self.config.act_dim], dim=-1)
        return self.step_rewards(obs, act).sum(dim=1)


RewardModel = ImageRewardModel | TransformerRewardModel | SegmentRewardModel
IMAGE_REWARD_MODELS = (ImageRewardModel, TransformerRewardModel)


def build_reward_model(config: RewardModelConfig) -> RewardModel:
    """A freshly initialised model of ``config.kind`` (and, for images, ``config.architecture``)."""
    if config.kind == "segment":
        return SegmentRewardModel(config)
    return (
        TransformerRewardModel(config) if config.architecture == "transformer" else ImageRewardModel(config)
    )


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def save_reward_model(model: nn.Module, directory: PathLike, *, card: ModelCardInfo | None = None) -> Path:
    """Write ``directory/config.json`` + ``directory/model.safetensors`` + the model card ``README.md``, each
    atomically (weights first, config last); other files in ``directory`` are kept (a ``README.md`` that
    is not an rlflow card too). ``card``: how it was trained (:mod:`rlflow.utils.model_card`). Returns
    ``directory``."""
    from rlflow.utils.model_card import write_model_card
    config = getattr(model, "config", None)
    if not isinstance(config, RewardModelConfig):
        raise TypeError(
            f"save_reward_model expects a reward model of this module (ImageRewardModel, TransformerRewardModel, "
            f"SegmentRewardModel), got {type(model).__name__}"
        )
    directory = Path(directory)
    with atomic_update(directory, owned=LEGACY_FILES) as tmp:
        write_model_config(tmp, MODEL_TYPE, dataclasses.asdict(config))
        save_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / WEIGHTS_FILE)
        write_model_card(tmp, directory, _card_description(config), card)
    return directory


def _card_description(config: RewardModelConfig) -> ModelDescription:
    """What the model card says about a reward model (see :mod:`rlflow.utils.model_card`)."""
    from rlflow.utils.model_card import ModelDescription

    heads = ", ".join(config.dimensions)
    if config.kind == "segment":
        summary = (
            f"A learned per-step reward r(obs, act) ({config.obs_dim}-dimensional observations, "
            f"{config.act_dim}-dimensional actions; heads: {heads}), trained by Bradley-Terry on preferences "
            "between trajectory segments (a segment scores the sum of its steps)."
        )
        notes = ("Train a policy on it: `rlflow ppo --learned_reward <this folder>`.",)
    else:
        inputs = "a noised sample x_t at time t and a prompt (for reward guidance)" if config.noise_aware else (
            "an image and its prompt"
        )
        summary = (
            f"A learned reward model ({config.architecture}) that scores {inputs}, one score per preference "
            f"dimension ({heads}), trained by Bradley-Terry on pairwise preferences."
        )
        notes = (
            "Use it as a reward in the alignment trainers: `rewards: {learned: {path: <this folder>, head: "
            f"{config.dimensions[0]}}}`.",
        )
    return ModelDescription(
        model_type=MODEL_TYPE,
        summary=summary,
        loader="rlflow.reward_models.learned.load_reward_model",
        config=dataclasses.asdict(config),
        tags=("reward-model",),
        usage_notes=notes,
    )


def read_reward_model_config(directory: PathLike) -> RewardModelConfig:
    """The :class:`RewardModelConfig` stored in ``directory/config.json`` (``CheckpointError`` if unusable)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"reward model directory {directory} does not exist; pass the model/ directory a reward-model run "
            "wrote (output_dir/model)"
        )
    saved = read_model_config(
        directory, expected=MODEL_TYPE, writer="an `rlflow reward-model` run (its output_dir/model)"
    )
    data = saved.config
    fields = {f.name for f in dataclasses.fields(RewardModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise CheckpointError(
            f"{saved.path} has unknown fields {unknown}; it was written by a newer rlflow — upgrade rlflow"
        )
    try:
        return RewardModelConfig(**data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{saved.path} holds an invalid reward model config: {exc}") from exc


def load_reward_model(directory: PathLike, device: str | torch.device = "cpu") -> RewardModel:
    """Load a saved reward model of either kind (in eval mode) onto ``device``.

    Raises:
        CheckpointError: the directory, ``config.json`` or ``model.safetensors`` is missing or corrupt, or
            the weights do not match the config.
    """
    directory = Path(directory)
    config = read_reward_model_config(directory)
    model = build_reward_model(config)
    load_weights_into(model, load_state_dict(directory / WEIGHTS_FILE), source=str(directory / WEIGHTS_FILE))
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Using a trained model: the reward protocol and guidance
# ---------------------------------------------------------------------------------------------------------


def head_weight_vector(
    dimensions: Sequence[str], head: str | Mapping[str, float] | None, weights: Mapping[str, float] | None
) -> Tensor:
    """``[D]`` weights combining the heads: one-hot for a head name, or ``{dimension: weight}``."""
    if head is not None and weights is not None:
        raise ValueError("pass either head (one dimension) or weights ({dimension: weight}), not both")
    spec: str | Mapping[str, float] | None = head if head is not None else weights
    if spec is None:
        if len(dimensions) != 1:
            raise ValueError(
                f"this reward model has heads {list(dimensions)}; choose one with head: <name> or combine them "
                "with weights: {name: weight, ...}"
            )
        spec = dimensions[0]
    if isinstance(spec, str):
        spec = {spec: 1.0}
    unknown = [name for name in spec if name not in dimensions]
    if unknown or not spec:
        raise ValueError(f"unknown reward model head(s) {unknown}; this model has {list(dimensions)}")
    for name, value in spec.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"weight of head {name!r} must be a finite number, got {value!r}")
    return torch.tensor([float(spec.get(name, 0.0)) for name in dimensions], dtype=torch.float32)


_head_weights = head_weight_vector  # older private name, still imported by envs/learned_reward.py


class LearnedReward:
    """A trained image reward model as a reward: ``reward(images [B,3,H,W] in [0,1], prompts) -> [B]``.

    Args:
        path: the model directory (``output_dir/model`` of a reward-model run).
        head: the dimension to score (required when the model has several heads), or ``{dimension: weight}``.
        weights: alternatively ``{dimension: weight}``: the reward is ``sum_d w_d r_d``.
        device: where the model runs; the result is always float32 on the CPU.
        batch_size: images scored per forward pass.

    A noise-aware model scores clean images as ``x_1 = images * 2 - 1`` at ``t = 1`` (the shapes world's
    pixel-space latents).
    """

    def __init__(
        self,
        path: PathLike,
        head: str | Mapping[str, float] | None = None,
        weights: Mapping[str, float] | None = None,
        device: str = "cpu",
        batch_size: int = 256,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model = load_reward_model(path, device=device)
        if not isinstance(model, IMAGE_REWARD_MODELS):
            raise ValueError(
                f"{path} is a {model.config.kind} reward model; LearnedReward scores images (use "
                "SegmentRewardModel directly for segments)"
            )
        self.model = model
        self.path = str(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.head_weights = head_weight_vector(model.dimensions, head, weights)
        self.name = f"learned({Path(path).name})"

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts, self.name)
        scores = []
        for start in range(0, images.shape[0], self.batch_size):  # chunks bound memory, not per-sample work
            x = images[start : start + self.batch_size].to(self.device, torch.float32)
            chunk = list(prompts[start : start + self.batch_size])
            if self.model.config.noise_aware:
                out = self.model(x * 2.0 - 1.0, chunk, torch.ones(x.shape[0], device=self.device))
            else:
                out = self.model(x, chunk)
            scores.append(out.float().cpu())
        if not scores:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(scores) @ self.head_weights

    def __repr__(self) -> str:
        return f"LearnedReward({self.path!r}, weights={dict(zip(self.model.dimensions, self.head_weights.tolist(), strict=True))})"


def reward_gradient(
    model: ImageRewardModel | TransformerRewardModel,
    x: Tensor,
    prompts: Sequence[str],
    t: Tensor | None = None,
    *,
    head: str | Mapping[str, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(r [B], grad_x r [B, ...])`` of the (weighted) head(s) at ``x`` (and ``t`` for noise-aware models).

    For reward guidance: a sampler adds ``scale * grad`` to its velocity / sample. Each sample's reward
    depends only on its own ``x``, so the gradient of the summed reward is the per-sample gradient. The
    model's parameters get no gradient.
    """
    weights = head_weight_vector(model.dimensions, head, None).to(x.device)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        reward = model(x, prompts, t) @ weights.to(dtype=x.dtype)
        (grad,) = torch.autograd.grad(reward.sum(), x)
    return reward.detach(), grad
