"""A tiny text-to-image velocity model without diffusers, for rollout-engine unit tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rlflow.generators.families import PromptEmbeddings


def prompt_vector(prompt: str, dim: int) -> Tensor:
    """A deterministic pseudo-embedding of a prompt (hash-seeded)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class ToyTextToImage(nn.Module):
    """``v(x, t, c) = A x + b(c) * (1 + t)``: latents ``[3, 4, 4]`` decoded as images in [0, 1]."""

    def __init__(self, channels: int = 3, size: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.latent_shape = (channels, size, size)
        self.mix = nn.Parameter(0.1 * torch.randn(channels, channels, generator=g))
        self.embed_dim = channels
        self.calls = 0

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        vectors = torch.stack([prompt_vector(p, self.embed_dim) for p in prompts])
        return PromptEmbeddings(hidden_states=vectors.unsqueeze(1), pooled=vectors)

    def velocity(self, x: Tensor, t: Tensor, cond: PromptEmbeddings) -> Tensor:
        self.calls += x.shape[0]
        mixed = torch.einsum("oc,bchw->bohw", self.mix, x)
        bias = cond.pooled[:, :, None, None] * (1.0 + t.reshape(-1, 1, 1, 1))
        return mixed + bias

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)


def brightness(images: Tensor, prompts: Sequence[str]) -> Tensor:
    """Mean pixel value: a reward every model can raise."""
    return images.flatten(1).mean(dim=1)
