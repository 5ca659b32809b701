"""Tiny, seeded, random diffusers models for tests and CPU smoke runs (needs the ``[diffusers]`` extra).

Everything is built locally (nothing is downloaded): a few-thousand-parameter SD3 / FLUX / Wan
transformer, a two-level ``AutoencoderKL`` (scale factor 2), CLIP text encoders with a byte-level BPE
tokenizer written from a hand-made ``vocab.json`` / ``merges.txt``, and a complete
``StableDiffusion3Pipeline`` saved to disk (:func:`build_tiny_sd3_pipeline`) that
``DiffusersFlowModel.from_pretrained`` loads like a real one. A forward at batch 4 takes a few ms on CPU.

Builders are deterministic in ``seed`` and leave the global torch RNG untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlflow.generators.families import PromptEmbeddings, family_of

if TYPE_CHECKING:
    from rlflow.worlds.shapes.model import ShapesModelConfig

#: Text-side sizes of the tiny models (two CLIP encoders of width 16 -> joint width 32, pooled 2 x 16).
TINY_CLIP_HIDDEN = 16
TINY_CLIP_PROJECTION = 16
TINY_JOINT_DIM = 2 * TINY_CLIP_HIDDEN
TINY_POOLED_DIM = 2 * TINY_CLIP_PROJECTION
#: CLIP token length of the tiny tokenizer (real CLIP: 77).
TINY_TOKENIZER_LENGTH = 8
#: Extra merges so that a few common prompt words become single tokens (the rest falls back to bytes).
_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a builder under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_sd3_transformer(seed: int = 0, *, in_channels: int = 4, sample_size: int = 8) -> nn.Module:
    """An ``SD3Transformer2DModel`` with 2 joint blocks, 2 heads of width 8, patch 2."""
    from diffusers import SD3Transformer2DModel

    with _seeded(seed):
        return SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=in_channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TINY_JOINT_DIM,
            caption_projection_dim=16,
            pooled_projection_dim=TINY_POOLED_DIM,
            out_channels=in_channels,
            pos_embed_max_size=16,
        )


def tiny_flux_transformer(
    seed: int = 0, *, guidance_embeds: bool = True, latent_channels: int = 4
) -> nn.Module:
    """A ``FluxTransformer2DModel`` (1 double + 1 single block) over ``latent_channels`` unpacked channels.

    ``guidance_embeds=True`` mimics FLUX.1-dev (guidance-distilled), ``False`` FLUX.1-schnell.
    """
    from diffusers import FluxTransformer2DModel

    with _seeded(seed):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # 2x2 packing
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TINY_JOINT_DIM,
            pooled_projection_dim=TINY_CLIP_PROJECTION,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),  # must sum to attention_head_dim
        )


def tiny_wan_transformer(seed: int = 0, *, in_channels: int = 4) -> nn.Module:
    """A ``WanTransformer3DModel`` (2 blocks, 2 heads of width 8, patch (1, 2, 2))."""
    from diffusers import WanTransformer3DModel

    with _seeded(seed):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=in_channels,
            out_channels=in_channels,
            text_dim=TINY_JOINT_DIM,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        )


def tiny_autoencoder(seed: int = 0, *, latent_channels: int = 4) -> nn.Module:
    """An ``AutoencoderKL`` with two levels (``vae_scale_factor = 2``) and SD3's scaling/shift factors."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=16,
            scaling_factor=1.5305,  # SD3's values, so decode exercises both
            shift_factor=0.0609,
        )


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable-character table (the base alphabet of byte-level BPE)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_clip_vocab(directory: str | os.PathLike[str]) -> Path:
    """Write a byte-level CLIP ``vocab.json`` + ``merges.txt`` (518 tokens) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for char in _bytes_to_unicode():
        vocab[char] = len(vocab)
    for char in _bytes_to_unicode():
        vocab[char + "</w>"] = len(vocab)  # CLIP marks the end of a word on its last symbol
    for left, right in _MERGES:
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in _MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    return directory


def tiny_clip_tokenizer() -> Any:
    """A ``CLIPTokenizer`` over the tiny byte-level vocabulary, ``model_max_length = 8``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(
            write_tiny_clip_vocab(tmp), model_max_length=TINY_TOKENIZER_LENGTH
        )


def _tiny_clip_config() -> Any:
    from transformers import CLIPTextConfig

    tokens = len(_bytes_to_unicode()) * 2 + len(_MERGES)
    return CLIPTextConfig(
        vocab_size=tokens + 2,
        hidden_size=TINY_CLIP_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_TOKENIZER_LENGTH,
        projection_dim=TINY_CLIP_PROJECTION,
        bos_token_id=tokens,
        eos_token_id=tokens + 1,  # pooled output is read at the first eos token
        pad_token_id=tokens + 1,
    )


def tiny_clip_text_encoder(seed: int = 0) -> nn.Module:
    """A ``CLIPTextModelWithProjection`` (2 layers, width 16) matching :func:`tiny_clip_tokenizer`."""
    from transformers import CLIPTextModelWithProjection

    with _seeded(seed):
        return CLIPTextModelWithProjection(_tiny_clip_config()).eval()


def build_tiny_sd3_pipeline(directory: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a complete tiny ``StableDiffusion3Pipeline`` (no T5: ``text_encoder_3=None``) to ``directory``.

    Images are 16x16 (latents ``(4, 8, 8)``); prompts embed to ``[B, 8 + max_sequence_length, 32]``
    (CLIP tokens, then T5 zeros as diffusers does without T5).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer = tiny_clip_tokenizer()
    pipeline = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_autoencoder(seed + 1),
        text_encoder=tiny_clip_text_encoder(seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(seed + 3),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    directory = Path(directory)
    pipeline.save_pretrained(directory)
    return directory


def random_prompt_embeddings(
    transformer: nn.Module,
    batch: int,
    *,
    seq_len: int = 8,
    negative: bool = True,
    generator: torch.Generator | None = None,
) -> PromptEmbeddings:
    """Random :class:`PromptEmbeddings` shaped for ``transformer`` (pooled only where its family uses it)."""
    config = transformer.config
    family = family_of(transformer)
    width = int(config.text_dim if family.name == "wan" else config.joint_attention_dim)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    pooled_dim = int(getattr(config, "pooled_projection_dim", 0) or 0)
    pooled = draw(batch, pooled_dim) if family.uses_pooled else None
    return PromptEmbeddings(
        hidden_states=draw(batch, seq_len, width),
        pooled=pooled,
        negative_hidden_states=draw(batch, seq_len, width) if negative else None,
        negative_pooled=draw(batch, pooled_dim) if negative and family.uses_pooled else None,
    )


def build_tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = True) -> Any:
    """An in-memory tiny ``FluxPipeline`` (CLIP pooled + a 1-layer T5 encoder; latents ``(4, 8, 8)`` at 16 px).

    The T5 side reuses the byte-level CLIP tokenizer (FluxPipeline only calls it like any tokenizer).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer()
    clip_config = _tiny_clip_config()
    with _seeded(seed + 2):
        # FluxPipeline reads CLIPTextModel's pooler_output (width TINY_CLIP_HIDDEN = the pooled dim).
        text_encoder = CLIPTextModel(clip_config).eval()
    with _seeded(seed + 3):
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=clip_config.vocab_size,
                d_model=TINY_JOINT_DIM,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
            )
        ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_autoencoder(seed + 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=tiny_flux_transformer(seed, guidance_embeds=guidance_embeds),
    )


#: The tiny shapes model's sizes (as a recipe's ``model:`` section would give them).
TINY_SHAPES_SIZES: dict[str, int] = {
    "num_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "text_dim": 16,
    "text_layers": 1,
    "text_heads": 2,
    "text_ff_dim": 32,
    "pooled_dim": 16,
}


def tiny_shapes_config(**overrides: Any) -> ShapesModelConfig:
    """A :class:`~rlflow.worlds.shapes.model.ShapesModelConfig` small enough for unit tests (one MM-DiT
    block of 2 heads x 8, a 16-wide one-layer text encoder); ``overrides`` replace any field."""
    from rlflow.worlds.shapes.model import ShapesModelConfig

    return ShapesModelConfig(**{**TINY_SHAPES_SIZES, **overrides})
