"""Prompt-independent image rewards (the classic DDPO / Flow-GRPO sanity-check objectives).

All follow the reward protocol ``reward(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]`` (float32,
CPU); the prompts are only checked for length.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import check_reward_inputs

__all__ = ["Brightness", "Colorfulness", "JpegCompressibility", "to_uint8_hwc"]


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] -> ``[B, H, W, 3]`` uint8 (round to nearest)."""
    return (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )


@dataclass
class JpegCompressibility:
    """DDPO's compressibility reward: minus the JPEG-encoded size of each image, in kB (1 kB = 1000 bytes).

    Images are quantised to uint8 and encoded with Pillow at ``quality`` (DDPO uses 95). Flat images score
    highest (a black 32x32 image is about -0.64 kB, mostly JPEG header; uniform noise about -1.8 kB);
    with ``sign=-1`` it becomes DDPO's *in*compressibility reward. The per-image encode is a Python loop (Pillow has no batch
    API), ~0.1 ms per 32x32 image.
    """

    quality: int = 95
    """JPEG quality passed to Pillow (1-95)."""
    sign: float = 1.0
    """1: reward compressibility (-kB); -1: reward incompressibility (+kB)."""

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 95:
            raise ValueError(f"quality must be in [1, 95] (Pillow's useful range), got {self.quality}")
        if self.sign not in (1.0, -1.0):
            raise ValueError(f"sign must be 1 or -1, got {self.sign}")

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts, type(self).__name__)
        sizes = []
        for array in to_uint8_hwc(images):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return -self.sign * torch.tensor(sizes, dtype=torch.float32)


@dataclass
class Colorfulness:
    """Hasler & Suesstrunk (2003) colourfulness ``sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2)``.

    ``rg = R - G``, ``yb = (R + G) / 2 - B``; means and standard deviations over each image's pixels,
    computed on the [0, 1] scale (the paper's 0-255 values divided by 255): any grey image (white shapes
    on black included) is 0, one saturated shape on black about 0.3-0.4. Vectorised over the batch.
    """

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts, type(self).__name__)
        x = images.detach().float()
        r, g, b = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
        rg, yb = r - g, 0.5 * (r + g) - b
        std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
        mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
        return (std + 0.3 * mean).cpu()


@dataclass
class Brightness:
    """Mean luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B) of each image, in [0, 1]."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_reward_inputs(images, prompts, type(self).__name__)
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        return (images.detach().float() * weights).sum(dim=1).flatten(1).mean(dim=1).cpu()
