"""The shapes world's base text-to-image model: a tiny SD3 transformer in pixel space + a word-level text encoder.

Latents are the images themselves (``[B, 3, 32, 32]`` in ``[-1, 1]``, no VAE), or, with ``latent_space: vae``,
the latents of a small ``AutoencoderKL`` (:mod:`rlflow.worlds.shapes.vae`; ``[B, 4, 8, 8]``), decoded for
rewards through the pipeline's path, as in SD3. The text encoder is a
small transformer over the world's fixed vocabulary (:data:`rlflow.worlds.shapes.prompts.VOCAB`); it is trained
jointly with the transformer by ``rlflow pretrain-t2i`` and frozen afterwards (GRPO and the other
alignment trainers only adapt the image transformer).

A saved model directory::

    config.json                {"model_type": "rlflow.ShapesModel", "format_version": 1,
                                "config": {...ShapesModelConfig...}} (rlflow's model format)
    transformer/               diffusers format (config.json + diffusion_pytorch_model.safetensors)
    text_encoder.safetensors   ShapesTextEncoder weights
    vae/                       latent_space: vae only: the AutoencoderKL (diffusers format, as a pipeline's)

The vocabulary and prompt length are stored in the config, so a saved model keeps its tokenizer even if
the world's grammar grows later. diffusers is imported inside functions only: ``import rlflow`` stays
light.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from rlflow.config import ConfigError, config_from_dict, option, validate_config
from rlflow.errors import CheckpointError
from rlflow.generators.diffusers_flow import DiffusersFlowModel
from rlflow.generators.families import PromptEmbeddings
from rlflow.worlds.shapes.prompts import MAX_PROMPT_WORDS, VOCAB

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel

    from rlflow.utils.model_card import ModelCardInfo, ModelDescription

__all__ = [
    "MODEL_TYPE",
    "PAD_TOKEN",
    "ShapesModelConfig",
    "ShapesTextEncoder",
    "build_shapes_model",
    "build_shapes_transformer",
    "data_prediction_transformer_class",
    "load_shapes_model",
    "save_shapes_model",
]

MODEL_TYPE = "rlflow.ShapesModel"
PAD_TOKEN = "<pad>"
TRANSFORMER_DIR = "transformer"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"
VAE_DIR = "vae"


@dataclass
class ShapesModelConfig:
    """Architecture of the shapes text-to-image model (saved in ``config.json``)."""

    image_size: int = option(32, help="Image side in px (the latent is the image: [channels, size, size]).")
    channels: int = option(3, help="Image channels (in and out channels of the transformer).")
    patch_size: int = option(4, help="Transformer patch side; (image_size / patch_size)^2 image tokens.")
    num_layers: int = option(3, help="Joint-attention (MM-DiT) blocks of the SD3 transformer.")
    num_attention_heads: int = option(4, help="Attention heads of the image transformer.")
    attention_head_dim: int = option(24, help="Width per head; the transformer width is heads x head_dim.")
    text_dim: int = option(64, help="Text encoder width (= the transformer's joint_attention_dim).")
    text_layers: int = option(2, help="Transformer-encoder layers of the text encoder.")
    text_heads: int = option(4, help="Attention heads of the text encoder.")
    text_ff_dim: int = option(128, help="Feed-forward width of the text encoder layers.")
    pooled_dim: int = option(64, help="Pooled text embedding size (the transformer's pooled_projection_dim).")
    vocab: list[str] = option(
        default_factory=lambda: list(VOCAB),
        help="Tokenizer vocabulary (default: the shapes world's VOCAB); index 0 is reserved for padding.",
    )
    max_prompt_words: int = option(
        MAX_PROMPT_WORDS, help="Token sequence length; longer prompts are an error (default: the world's)."
    )
    prediction: Literal["data", "velocity"] = option(
        "data",
        help="What the transformer's last layer predicts: data (the clean image; the velocity is derived, as "
        "in JiT, Li & He 2025) or velocity (plain SD3). Pixel patches are easy to predict and noise is "
        "not, so data prediction learns clean shapes in far fewer steps.",
    )
    min_sigma: float = option(
        0.05,
        bounds="(0, 1)",
        help="data prediction: the velocity (x - data) / sigma uses max(sigma, min_sigma) (JiT's clip).",
    )
    latent_space: Literal["pixels", "vae"] = option(
        "pixels",
        help="pixels: the latent is the image in [-1, 1]; vae: the latent is an AutoencoderKL's (SD3's "
        "layout; the model directory holds the VAE in vae/, image_size and channels describe the latent).",
    )

    def __post_init__(self) -> None:
        validate_config(self)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; "
                "choose a patch_size that divides it"
            )
        if self.text_dim % self.text_heads:
            raise ConfigError(f"text_dim {self.text_dim} is not divisible by text_heads {self.text_heads}")
        if not self.vocab:
            raise ConfigError("vocab is empty; leave it out to use the shapes world's VOCAB")
        if len(set(self.vocab)) != len(self.vocab) or PAD_TOKEN in self.vocab:
            raise ConfigError(f"vocab must hold distinct words other than {PAD_TOKEN!r}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


def _words(prompt: str) -> list[str]:
    # The world's own normalisation (rlflow.worlds.shapes.prompts.parse_prompt): case, outer spaces and a final
    # "." do not matter, so the model and the verifier read a prompt the same way.
    return re.sub(r"\.\s*$", "", prompt.strip().lower()).split()


class ShapesTextEncoder(nn.Module):
    """Word tokens + positions -> a small pre-norm transformer encoder -> :class:`PromptEmbeddings`.

    ``hidden_states`` are ``[B, max_prompt_words, text_dim]`` with padding positions set to zero (the SD3
    transformer attends to every text token, so padding must carry no prompt-dependent signal); ``pooled``
    is a linear projection of the masked mean, ``[B, pooled_dim]``. The empty prompt ``""`` (all padding)
    is valid: it is the unconditional prompt of classifier-free guidance.

    Implements :class:`~rlflow.generators.families.PromptEncoder`: call it with a list of prompts;
    the embeddings are on the encoder's device.
    """

    def __init__(self, config: ShapesModelConfig):
        super().__init__()
        self.config = config
        self.token_to_id = {word: i + 1 for i, word in enumerate(config.vocab)}
        self.token_embedding = nn.Embedding(len(config.vocab) + 1, config.text_dim, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_prompt_words, config.text_dim))
        layer = nn.TransformerEncoderLayer(
            d_model=config.text_dim,
            nhead=config.text_heads,
            dim_feedforward=config.text_ff_dim,
            dropout=0.0,  # deterministic embeddings: the cache and resumption rely on it
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.text_dim)
        self.pooled_projection = nn.Linear(config.text_dim, config.pooled_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        with torch.no_grad():
            self.token_embedding.weight[0].zero_()

    @property
    def device(self) -> torch.device:
        return self.position_embedding.device

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids ``[B, max_prompt_words]`` (0 = padding); unknown words and overlong prompts raise ValueError."""
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not a single string")
        length = self.config.max_prompt_words
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = _words(prompt)
            if len(words) > length:
                raise ValueError(
                    f"prompt {prompt!r} has {len(words)} words but the text encoder takes at most {length}"
                )
            for col, word in enumerate(words):
                token = self.token_to_id.get(word)
                if token is None:
                    raise ValueError(
                        f"unknown word {word!r} in prompt {prompt!r}; the shapes text encoder knows only "
                        f"{', '.join(self.config.vocab)}"
                    )
                ids[row, col] = token
        return ids

    def forward(self, prompts: Sequence[str]) -> PromptEmbeddings:
        ids = self.tokenize(prompts).to(self.device)
        mask = ids != 0  # [B, L] True for words
        x = self.token_embedding(ids) + self.position_embedding
        # A row of padding only (the empty prompt) would make every attention score -inf (NaN); let it
        # attend to its first position instead: its output is zeroed below anyway.
        attend = mask.clone()
        attend[:, 0] |= ~mask.any(dim=1)
        x = self.final_norm(self.encoder(x, src_key_padding_mask=~attend))
        weights = mask.unsqueeze(-1).to(x.dtype)
        hidden = x * weights
        mean = hidden.sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return PromptEmbeddings(hidden_states=hidden, pooled=self.pooled_projection(mean))


def _transformer_kwargs(config: ShapesModelConfig) -> dict[str, Any]:
    width = config.num_attention_heads * config.attention_head_dim
    return {
        "sample_size": config.image_size,
        "patch_size": config.patch_size,
        "in_channels": config.channels,
        "out_channels": config.channels,
        "num_layers": config.num_layers,
        "attention_head_dim": config.attention_head_dim,
        "num_attention_heads": config.num_attention_heads,
        "joint_attention_dim": config.text_dim,
        # SD3's joint blocks run text and image tokens at the same width.
        "caption_projection_dim": width,
        "pooled_projection_dim": config.pooled_dim,
        # The positional-embedding table only needs to cover this image's patch grid.
        "pos_embed_max_size": config.image_size // config.patch_size,
    }


@functools.lru_cache(maxsize=1)
def data_prediction_transformer_class() -> type[SD3Transformer2DModel]:
    """``SD3Transformer2DModel`` whose network predicts the clean image; ``forward`` returns diffusers' target.

    The subclass keeps SD3's interface and output convention (``noise - data`` at noise level
    ``sigma = timestep / 1000``), so :class:`DiffusersFlowModel`, LoRA adapters and ``save_pretrained`` work
    unchanged: with ``x = sigma * noise + (1 - sigma) * data`` the target is ``(x - data) / sigma``, computed
    from the network's data estimate with ``sigma`` clipped below at ``min_sigma``. Defined lazily so that
    ``import rlflow`` never imports diffusers.
    """
    from diffusers import SD3Transformer2DModel
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    class DataPredictionSD3Transformer2DModel(SD3Transformer2DModel):
        min_sigma: float = 0.05  # set from ShapesModelConfig.min_sigma by build_shapes_transformer

        def forward(  # type: ignore[override]
            self,
            hidden_states: Tensor,
            encoder_hidden_states: Tensor | None = None,
            pooled_projections: Tensor | None = None,
            timestep: Tensor | None = None,
            *args: Any,
            return_dict: bool = True,
            **kwargs: Any,
        ) -> Any:
            if timestep is None:
                raise ValueError("a data-prediction transformer needs the timestep (sigma * 1000)")
            data = super().forward(
                hidden_states,
                encoder_hidden_states,
                pooled_projections,
                timestep,
                *args,
                return_dict=False,
                **kwargs,
            )[0]
            sigma = (timestep.to(data.dtype) / 1000.0).clamp_min(self.min_sigma)
            out = (hidden_states.to(data.dtype) - data) / sigma.view(-1, *([1] * (data.dim() - 1)))
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    return DataPredictionSD3Transformer2DModel


def build_shapes_transformer(config: ShapesModelConfig) -> SD3Transformer2DModel:
    """A freshly initialised SD3 transformer for ``config`` (pixel space, 3 channels in and out)."""
    from diffusers import SD3Transformer2DModel

    if config.prediction == "velocity":
        return SD3Transformer2DModel(**_transformer_kwargs(config))
    transformer = data_prediction_transformer_class()(**_transformer_kwargs(config))
    transformer.min_sigma = config.min_sigma
    return transformer


def build_shapes_model(
    config: ShapesModelConfig, *, train_text_encoder: bool = False, vae: nn.Module | None = None
) -> DiffusersFlowModel:
    """A freshly initialised shapes model (the text encoder frozen unless ``train_text_encoder``).

    ``latent_space: vae`` needs the (trained, frozen) ``vae`` whose latents the model denoises.
    """
    if (config.latent_space == "vae") != (vae is not None):
        raise ValueError(
            f"latent_space {config.latent_space!r} "
            + ("needs a VAE (pass vae=...)" if vae is None else "takes no VAE (set latent_space: vae)")
        )
    if vae is not None:
        from rlflow.worlds.shapes.vae import vae_scale_factor

        channels, side = int(vae.config.latent_channels), int(vae.config.sample_size) // vae_scale_factor(vae)
        if (config.channels, config.image_size) != (channels, side):
            raise ValueError(
                f"the model's latent ({config.channels} channels, side {config.image_size}) does not match the "
                f"VAE's ({channels} channels, side {side}); set model.channels: {channels} and "
                f"model.image_size: {side}"
            )
    text_encoder = ShapesTextEncoder(config)
    if not train_text_encoder:
        text_encoder.requires_grad_(False).eval()
    return DiffusersFlowModel(
        build_shapes_transformer(config), text_encoder, latent_shape=config.latent_shape, vae=vae
    )


def shapes_config_of(model: DiffusersFlowModel) -> ShapesModelConfig:
    """The :class:`ShapesModelConfig` of a model built by :func:`build_shapes_model`."""
    encoder = model.prompt_encoder
    if not isinstance(encoder, ShapesTextEncoder):
        raise TypeError(
            f"not a shapes model: its prompt encoder is a {type(encoder).__name__}, not a ShapesTextEncoder"
        )
    return encoder.config


def save_shapes_model(
    model: DiffusersFlowModel, directory: str | os.PathLike[str], *, card: ModelCardInfo | None = None
) -> Path:
    """Write ``model`` to ``directory`` (layout in the module docstring) with its model card ``README.md``,
    each entry atomically; other files in ``directory`` are kept (a ``README.md`` that is not an rlflow
    card too). ``card``: how it was trained (:mod:`rlflow.utils.model_card`). Returns the path."""
    from rlflow.utils.checkpoint import atomic_update, save_state_dict
    from rlflow.utils.model_card import write_model_card
    from rlflow.utils.model_format import LEGACY_FILES, find_model_config, write_model_config

    config = shapes_config_of(model)
    expected = _transformer_kwargs(config)
    actual = {key: model.transformer.config[key] for key in expected}
    if actual != expected:
        raise ValueError(f"the transformer's config {actual} does not match the model config {expected}")
    directory = Path(directory)
    # A pixel-space model does not leave the vae/ of an earlier latent-space save of ours next to its
    # weights (that save's json says it wrote one); any other vae/ is not ours to delete.
    previous = find_model_config(directory)
    saved_vae = (
        previous is not None
        and previous.model_type == MODEL_TYPE
        and previous.config.get("latent_space") == "vae"
    )
    owned = (*LEGACY_FILES, *((VAE_DIR,) if saved_vae else ()))
    with atomic_update(directory, owned=owned) as tmp:
        write_model_config(tmp, MODEL_TYPE, asdict(config))
        model.transformer.save_pretrained(tmp / TRANSFORMER_DIR, safe_serialization=True)
        save_state_dict(model.prompt_encoder.state_dict(), tmp / TEXT_ENCODER_WEIGHTS)
        if model.vae is not None:
            model.vae.save_pretrained(tmp / VAE_DIR, safe_serialization=True)
        write_model_card(tmp, directory, _card_description(config), card)
    return directory


def _card_description(config: ShapesModelConfig) -> ModelDescription:
    """What the model card says about a shapes world model (see :mod:`rlflow.utils.model_card`)."""
    from rlflow.utils.model_card import ModelDescription

    space = (
        f"in the latent space of its VAE (vae/, latents [{config.channels}, {config.image_size}, {config.image_size}])"
        if config.latent_space == "vae"
        else f"in pixel space ({config.image_size}x{config.image_size} images)"
    )
    return ModelDescription(
        model_type=MODEL_TYPE,
        summary=(
            "A text-to-image flow model of rlflow's built-in shapes world: a small SD3 transformer "
            f"({config.num_layers} MM-DiT blocks, {config.prediction} prediction) {space}, with a word-level "
            f"text encoder over the world's {len(config.vocab)}-word vocabulary."
        ),
        loader="rlflow.generators.loading.load_text_to_image_model",
        # The vocabulary is long and is the world's own: the card shows the architecture.
        config={key: value for key, value in asdict(config).items() if key != "vocab"},
        tags=("flow-matching", "text-to-image", "shapes-world"),
        pipeline_tag="text-to-image",
    )


def load_shapes_model(
    directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> DiffusersFlowModel:
    """Load a directory written by :func:`save_shapes_model`: eval mode, text encoder frozen.

    Raises :class:`CheckpointError` (naming the file and the fix) for a missing directory, a wrong
    ``model_type``, an invalid config, or missing, corrupt or mismatching weights.
    """
    from rlflow.utils.checkpoint import load_state_dict, load_weights_into, read_json
    from rlflow.utils.model_format import read_model_config

    directory = Path(directory)
    saved = read_model_config(
        directory,
        expected=MODEL_TYPE,
        writer="save_shapes_model / rlflow pretrain-t2i (e.g. recipes/alignment/artifacts/shapes_base)",
    )
    meta_path = saved.path
    try:
        config = config_from_dict(ShapesModelConfig, saved.config, source=str(meta_path))
    except ConfigError as exc:
        raise CheckpointError(f"{meta_path} holds an invalid model config: {exc}") from exc

    transformer_config = read_json(
        directory / TRANSFORMER_DIR / "config.json", what="diffusers transformer config"
    )
    expected = _transformer_kwargs(config)
    mismatched = {
        key: transformer_config.get(key) if isinstance(transformer_config, dict) else None
        for key, value in expected.items()
        if not isinstance(transformer_config, dict) or transformer_config.get(key) != value
    }
    if mismatched:
        raise CheckpointError(
            f"{directory / TRANSFORMER_DIR / 'config.json'} disagrees with {meta_path} on {mismatched} "
            f"(expected {expected}); the directory was edited or mixes two models — re-save it"
        )

    vae = None
    if config.latent_space == "vae":
        from rlflow.worlds.shapes.vae import load_shapes_vae

        vae = load_shapes_vae(directory / VAE_DIR)
    try:
        model = build_shapes_model(config, vae=vae)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}; the directory mixes two models — re-save it") from exc
    weights = directory / TRANSFORMER_DIR / TRANSFORMER_WEIGHTS
    load_weights_into(model.transformer, load_state_dict(weights), source=str(weights))
    text_weights = directory / TEXT_ENCODER_WEIGHTS
    load_weights_into(model.prompt_encoder, load_state_dict(text_weights), source=str(text_weights))
    return model.to(device).eval()
