"""The shapes world's autoencoder: a small diffusers ``AutoencoderKL`` that maps 32x32 images to a latent.

The latent text-to-image world is built like SD3: a VAE compresses the image (``[3, 32, 32]`` in ``[-1, 1]``)
to a latent (``[4, 8, 8]`` with the default three encoder blocks), the MM-DiT denoises latents, and rewards
score the VAE-decoded image through the same ``latents / scaling_factor + shift_factor -> vae.decode`` path
an SD3 pipeline takes (:meth:`rlflow.generators.families.TransformerFamily.decode`).

The VAE is trained by ``rlflow pretrain-vae`` (:mod:`rlflow.trainers.vae_pretrain`) and saved in diffusers'
own format (``config.json`` + ``diffusion_pytorch_model.safetensors``), so ``AutoencoderKL.from_pretrained``
loads it. Its ``scaling_factor`` and ``shift_factor`` are set from the latents of rendered images at the end
of training (``shift = mean``, ``scale = 1 / std``, as SD3's VAE was calibrated), so the diffusion model
sees latents of unit scale. diffusers is imported inside functions only: ``import rlflow`` stays light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rlflow.config import ConfigError, option, validate_config
from rlflow.errors import CheckpointError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from rlflow.utils.model_card import ModelCardInfo

__all__ = [
    "ShapesVAEConfig",
    "build_shapes_vae",
    "calibrate_latent_scale",
    "encode_images",
    "load_shapes_vae",
    "save_shapes_vae",
    "vae_scale_factor",
]


@dataclass
class ShapesVAEConfig:
    """Architecture of the shapes autoencoder (a diffusers ``AutoencoderKL``)."""

    image_size: int = option(32, help="Image side in px.")
    block_out_channels: list[int] = option(
        default_factory=lambda: [32, 64, 64],
        help="Channels per encoder block; each block after the first halves the side (3 blocks: 32 -> 8).",
    )
    layers_per_block: int = option(1, help="ResNet layers per block.")
    latent_channels: int = option(4, help="Latent channels (SD3's VAE has 16, SD1/2's 4).")
    norm_num_groups: int = option(32, help="GroupNorm groups (must divide every block's channels).")

    def __post_init__(self) -> None:
        validate_config(self)
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ConfigError(
                f"block_out_channels must be positive channel counts, got {self.block_out_channels}"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"norm_num_groups {self.norm_num_groups} does not divide block channels {bad}; "
                "choose a divisor of every entry of block_out_channels"
            )
        if self.image_size % self.scale_factor:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of the downsampling factor {self.scale_factor}"
            )

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.scale_factor
        return (self.latent_channels, side, side)


def build_shapes_vae(config: ShapesVAEConfig) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` for ``config`` (scaling 1, no shift until calibrated)."""
    from diffusers import AutoencoderKL

    blocks = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell along a side (diffusers pipelines' ``vae_scale_factor``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_images(
    vae: torch.nn.Module, images: Tensor, *, generator: torch.Generator | None = None
) -> Tensor:
    """Diffusion-space latents of ``images`` (``[B, 3, H, W]`` in ``[-1, 1]``): ``(z - shift) * scale``.

    ``z`` is the posterior mean, or a posterior sample when a ``generator`` is given. The inverse of the
    pipeline's decode path (``latents / scale + shift``).
    """
    posterior = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
    z = posterior.mean if generator is None else posterior.sample(generator=generator)
    shift = vae.config.shift_factor or 0.0
    return (z.float() - shift) * vae.config.scaling_factor


@torch.no_grad()
def calibrate_latent_scale(vae: torch.nn.Module, images: Tensor) -> tuple[float, float]:
    """Set the VAE's ``shift_factor`` / ``scaling_factor`` to the mean / inverse std of ``images``' latents.

    Returns ``(shift, scale)``; the values are written into the VAE's config (and so into its
    ``config.json`` when it is saved).
    """
    posterior = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
    z = posterior.mean.float()
    shift, std = float(z.mean()), float(z.std())
    if not std > 0:
        raise FloatingPointError(f"the VAE's latents have std {std}; the autoencoder did not train")
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return shift, 1.0 / std


def save_shapes_vae(
    vae: torch.nn.Module, directory: str | os.PathLike[str], *, card: ModelCardInfo | None = None
) -> Path:
    """Write ``vae`` in diffusers' format (``config.json`` + ``diffusion_pytorch_model.safetensors``) with
    a model card ``README.md`` into ``directory``, each entry atomically; other files there are kept (a
    ``README.md`` that is not an rlflow card too). ``card``: how it was trained
    (:mod:`rlflow.utils.model_card`). Returns the path."""
    from rlflow.utils.checkpoint import atomic_update
    from rlflow.utils.model_card import ModelDescription, write_model_card

    directory = Path(directory)
    config = dict(getattr(vae, "config", {}))
    channels = config.get("block_out_channels", [])
    description = ModelDescription(
        model_type="AutoencoderKL",
        summary=(
            "The autoencoder (a diffusers `AutoencoderKL`) of rlflow's latent shapes world: it maps "
            f"{config.get('sample_size', '?')}px images to {config.get('latent_channels', '?')}-channel latents "
            f"({2 ** max(len(channels) - 1, 0)}x smaller per side); scaling_factor and shift_factor are "
            "calibrated on rendered images."
        ),
        loader="rlflow.worlds.shapes.vae.load_shapes_vae",
        returns="vae",
        config={key: value for key, value in config.items() if not key.startswith("_")},
        tags=("autoencoder", "diffusers", "shapes-world"),
        usage_notes=("`diffusers.AutoencoderKL.from_pretrained(folder)` loads it too.",),
    )
    with atomic_update(directory) as tmp:  # replaces only the files diffusers writes, and the card
        vae.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
        write_model_card(tmp, directory, description, card)
    return directory


def load_shapes_vae(
    directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` saved by ``rlflow pretrain-vae`` (or any diffusers VAE directory), frozen."""
    from diffusers import AutoencoderKL

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{directory} is not a VAE directory (no config.json); point to the final/ directory of an "
            "`rlflow pretrain-vae` run, e.g. recipes/alignment/artifacts/shapes_vae"
        )
    try:
        vae = AutoencoderKL.from_pretrained(directory)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"could not load the VAE in {directory}: {exc}") from exc
    return vae.to(device).requires_grad_(False).eval()
