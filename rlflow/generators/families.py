"""The diffusers transformer families rlflow trains (SD3 / SD3.5, FLUX, Wan) and the text conditioning they share.

A :class:`TransformerFamily` knows how to call one family's transformer (timestep scale, pooled projections,
FLUX's packed latents, image ids and embedded guidance), decode its latents with its VAE, size latents for a
resolution, and encode prompts through its pipeline. :func:`family_of` picks the family from the
transformer's class. :class:`~rlflow.generators.diffusers_flow.DiffusersFlowModel` holds one and converts
between diffusers' and rlflow's time / velocity conventions; the families only see diffusers' side (sigma).

=======  ==============================  ============================  ====================================
family   diffusers class                 latents (rlflow side)          forward call
=======  ==============================  ============================  ====================================
sd3      ``SD3Transformer2DModel``       ``[B, C, H, W]``               ``timestep = sigma * 1000``, pooled
flux     ``FluxTransformer2DModel``      ``[B, C, H, W]`` (packed 2x2   ``timestep = sigma``, pooled, ids,
                                         to ``[B, HW/4, 4C]`` inside)   ``guidance`` if guidance-distilled
wan      ``WanTransformer3DModel``       ``[B, C, F, H, W]``            ``timestep = sigma * 1000``, no pooled
=======  ==============================  ============================  ====================================
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "FAMILIES",
    "FluxFamily",
    "PromptEmbeddings",
    "PromptEncoder",
    "SD3Family",
    "TransformerFamily",
    "WanFamily",
    "diffusers_config",
    "family_of",
    "unwrap_module",
]


# ---------------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeddings:
    """Batch-aligned text conditioning (``repeat_batch`` and indexing follow every tensor field)."""

    hidden_states: Tensor  # [B, L, D]  per-token embeddings (diffusers' encoder_hidden_states)
    pooled: Tensor | None = None  # [B, P]  pooled embedding (SD3 / FLUX pooled_projections)
    # The negative (unconditional) embeddings for classifier-free guidance, batch-aligned as well.
    negative_hidden_states: Tensor | None = None
    negative_pooled: Tensor | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def index(self, index: Tensor | slice) -> PromptEmbeddings:
        """Select batch rows (``index`` as for a tensor)."""
        return PromptEmbeddings(*(None if f is None else f[index] for f in self._fields()))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeddings:
        return PromptEmbeddings(*(None if f is None else f.to(device, dtype) for f in self._fields()))

    @staticmethod
    def cat(items: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        fields = list(zip(*(item._fields() for item in items), strict=True))
        return PromptEmbeddings(*(None if f[0] is None else torch.cat(f, dim=0) for f in fields))

    def _fields(self) -> tuple[Tensor | None, ...]:
        return (self.hidden_states, self.pooled, self.negative_hidden_states, self.negative_pooled)


class PromptEncoder(Protocol):
    """Turns prompts into :class:`PromptEmbeddings` (without gradients; text encoders stay frozen)."""

    def __call__(self, prompts: Sequence[str]) -> PromptEmbeddings: ...


# ---------------------------------------------------------------------------------------------------------
# Model families: how to call each diffusers transformer, decode its latents and encode its prompts
# ---------------------------------------------------------------------------------------------------------


def diffusers_config(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    if config is None:
        raise TypeError(f"{type(module).__name__} has no diffusers `config`; pass a diffusers transformer")
    return config


class TransformerFamily(abc.ABC):
    """Strategy for one diffusers transformer family (stateless; one instance per family)."""

    name: ClassVar[str]
    transformer_class: ClassVar[str]  # diffusers class name
    pipeline_class: ClassVar[str]  # diffusers pipeline class (LoRA file format, prompt encoding)
    latent_ndim: ClassVar[int]  # per-sample latent dims: 3 = (C, H, W), 4 = (C, F, H, W)
    uses_pooled: ClassVar[bool]

    def embedded_guidance(self, config: Any) -> bool:
        """True for guidance-distilled models that take the guidance scale as an input (no CFG)."""
        return False

    def check_latent_shape(self, config: Any, latent_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` when ``latent_shape`` cannot be fed to a transformer with ``config``."""
        if len(latent_shape) != self.latent_ndim:
            raise ValueError(
                f"latent_shape {latent_shape} has {len(latent_shape)} dims but a {self.name} transformer "
                f"takes {self.latent_ndim} per sample ({self._layout})"
            )
        channels = self.latent_channels(config)
        if latent_shape[0] != channels:
            raise ValueError(
                f"latent_shape {latent_shape} has {latent_shape[0]} channels but the {self.name} transformer "
                f"expects {channels}; build latent_shape from its config"
            )
        patch = self.spatial_multiple(config)
        if latent_shape[-1] % patch or latent_shape[-2] % patch:
            raise ValueError(
                f"latent height/width {latent_shape[-2:]} must be multiples of {patch} for this {self.name} "
                "transformer (its patch size); choose a resolution divisible by vae_scale_factor * "
                f"{patch}"
            )

    _layout: ClassVar[str] = "C, H, W"

    @abc.abstractmethod
    def latent_channels(self, config: Any) -> int:
        """Latent channels on the rlflow side (unpacked)."""

    @abc.abstractmethod
    def spatial_multiple(self, config: Any) -> int:
        """Latent height and width must be multiples of this."""

    @abc.abstractmethod
    def forward(
        self,
        module: nn.Module,
        config: Any,
        x: Tensor,
        sigma: Tensor,
        hidden: Tensor,
        pooled: Tensor | None,
        guidance_scale: float,
    ) -> Tensor:
        """The raw diffusers prediction ``noise - data`` for latents ``x`` (rlflow layout, model dtype)."""

    def decode(self, vae: nn.Module, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` (float32) from latents, as the family's pipeline does."""
        vae_config = diffusers_config(vae)
        # Pipeline: latents / scaling_factor + shift_factor (SD3/FLUX VAEs have a shift; SD1-style do not).
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        z = latents / vae_config.scaling_factor + shift
        dtype = next(vae.parameters()).dtype
        image = vae.decode(z.to(dtype), return_dict=False)[0]
        return (image.float() / 2.0 + 0.5).clamp(0.0, 1.0)

    def latent_shape_for(self, pipeline: Any, resolution: int | tuple[int, int] | None) -> tuple[int, ...]:
        """Per-sample latent shape for images of ``resolution`` (default: the transformer's sample size)."""
        factor = int(pipeline.vae_scale_factor)
        config = pipeline.transformer.config
        if resolution is None:
            height = width = int(config.sample_size) * factor
        elif isinstance(resolution, int):
            height = width = resolution
        else:
            height, width = (int(r) for r in resolution)
        multiple = factor * self.spatial_multiple(config)
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"resolution {(height, width)} must be positive multiples of {multiple} for this {self.name} "
                f"pipeline (VAE scale factor {factor} x patch {self.spatial_multiple(config)})"
            )
        return (self.latent_channels(config), height // factor, width // factor)

    @abc.abstractmethod
    def encode(
        self,
        pipeline: Any,
        prompts: list[str],
        *,
        negative_prompt: str | None,
        max_sequence_length: int,
        device: torch.device,
    ) -> PromptEmbeddings:
        """Encode ``prompts`` with the pipeline's own ``encode_prompt``."""


class SD3Family(TransformerFamily):
    name = "sd3"
    transformer_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    latent_ndim = 3
    uses_pooled = True

    def latent_channels(self, config: Any) -> int:
        return int(config.in_channels)

    def spatial_multiple(self, config: Any) -> int:
        return int(config.patch_size)

    def forward(self, module, config, x, sigma, hidden, pooled, guidance_scale):
        # StableDiffusion3Pipeline passes the scheduler's timesteps (sigma * 1000) in float32; the model
        # projects them sinusoidally in float32 itself, so we keep float32 even for a bf16 transformer
        # (bf16 cannot even represent 999.5).
        return module(
            hidden_states=x,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            timestep=sigma * 1000.0,
            return_dict=False,
        )[0]

    def encode(self, pipeline, prompts, *, negative_prompt, max_sequence_length, device):
        with_negative = negative_prompt is not None
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=with_negative,
            negative_prompt=negative_prompt if with_negative else None,
            max_sequence_length=max_sequence_length,
        )
        return PromptEmbeddings(embeds, pooled, negative, negative_pooled)


def pack_latents(latents: Tensor) -> Tensor:
    """FLUX packing ``[B, C, H, W] -> [B, (H/2)(W/2), 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return packed.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latent ``height`` x ``width`` (``FluxPipeline._unpack_latents``)."""
    b, _, channels = packed.shape
    latents = packed.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def flux_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Position ids ``[(H/2)(W/2), 3]`` = (0, row, col) of the packed latent grid (FluxPipeline's)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(TransformerFamily):
    name = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    latent_ndim = 3
    uses_pooled = True

    def embedded_guidance(self, config: Any) -> bool:
        # FLUX.1-dev is guidance-distilled: the scale is an input (`guidance`), there is no CFG pass.
        return bool(getattr(config, "guidance_embeds", False))

    def latent_channels(self, config: Any) -> int:
        # The transformer sees 2x2 patches packed into channels: in_channels = 4 * C.
        return int(config.in_channels) // 4

    def spatial_multiple(self, config: Any) -> int:
        return 2

    def forward(self, module, config, x, sigma, hidden, pooled, guidance_scale):
        batch, _, height, width = x.shape
        guidance = None
        if self.embedded_guidance(config):
            # FluxPipeline: torch.full([1], guidance_scale, dtype=float32).expand(B); the model scales by 1000.
            guidance = torch.full((batch,), float(guidance_scale), device=x.device, dtype=torch.float32)
        out = module(
            hidden_states=pack_latents(x),
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            # FluxPipeline passes `timestep / 1000` = sigma; the model multiplies by 1000 internally.
            timestep=sigma,
            guidance=guidance,
            # Text ids are all zeros in FluxPipeline.encode_prompt; 2-D ids (3-D is deprecated).
            txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=flux_image_ids(height, width, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    def encode(self, pipeline, prompts, *, negative_prompt, max_sequence_length, device):
        embeds, pooled, _text_ids = pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        negative = negative_pooled = None
        if negative_prompt is not None:
            negative, negative_pooled, _ = pipeline.encode_prompt(
                prompt=[negative_prompt] * len(prompts),
                prompt_2=None,
                device=device,
                max_sequence_length=max_sequence_length,
            )
        return PromptEmbeddings(embeds, pooled, negative, negative_pooled)


class WanFamily(TransformerFamily):
    name = "wan"
    transformer_class = "WanTransformer3DModel"
    pipeline_class = "WanPipeline"
    latent_ndim = 4
    uses_pooled = False
    _layout = "C, F, H, W"

    def latent_channels(self, config: Any) -> int:
        return int(config.in_channels)

    def spatial_multiple(self, config: Any) -> int:
        return int(config.patch_size[1])

    def forward(self, module, config, x, sigma, hidden, pooled, guidance_scale):
        # WanPipeline passes the scheduler timesteps (sigma * 1000) as [B] (Wan2.1 / Wan2.2 T2V; the
        # ti2v "expand_timesteps" per-token form is not supported).
        return module(
            hidden_states=x, timestep=sigma * 1000.0, encoder_hidden_states=hidden, return_dict=False
        )[0]

    def decode(self, vae: nn.Module, latents: Tensor) -> Tensor:
        """Videos ``[B, 3, F, H, W]`` in ``[0, 1]``: ``latents * latents_std + latents_mean`` (WanPipeline)."""
        vae_config = diffusers_config(vae)
        shape = (1, int(vae_config.z_dim), 1, 1, 1)
        mean = torch.tensor(vae_config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae_config.latents_std, device=latents.device).view(shape)
        dtype = next(vae.parameters()).dtype
        video = vae.decode((latents * std + mean).to(dtype), return_dict=False)[0]
        return (video.float() / 2.0 + 0.5).clamp(0.0, 1.0)

    def latent_shape_for(self, pipeline, resolution):
        raise ValueError(
            "from_pretrained does not load Wan pipelines (the latent shape also needs num_frames); build "
            "DiffusersFlowModel(transformer, PipelineTextEncoder(pipe), latent_shape=(C, F, H, W), vae=pipe.vae)"
        )

    def encode(self, pipeline, prompts, *, negative_prompt, max_sequence_length, device):
        with_negative = negative_prompt is not None
        embeds, negative = pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=negative_prompt if with_negative else None,
            do_classifier_free_guidance=with_negative,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        return PromptEmbeddings(embeds, None, negative, None)


FAMILIES: dict[str, TransformerFamily] = {f.name: f for f in (SD3Family(), FluxFamily(), WanFamily())}


def family_of(transformer: nn.Module) -> TransformerFamily:
    """The :class:`TransformerFamily` of a (possibly subclassed) diffusers transformer."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for family in FAMILIES.values():
        if family.transformer_class in names:
            return family
    supported = ", ".join(f.transformer_class for f in FAMILIES.values())
    raise TypeError(
        f"unsupported transformer class {type(transformer).__name__}; DiffusersFlowModel supports {supported} "
        "(pass the unwrapped diffusers transformer, not a DDP/accelerate wrapper)"
    )


def unwrap_module(module: nn.Module) -> nn.Module:
    """Strip DDP / accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner
