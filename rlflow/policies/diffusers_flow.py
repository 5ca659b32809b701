"""diffusers transformers as velocity fields for rlflow's shared kernels (the ONE convention converter).

diffusers' flow-matching models run on sigma (1 = noise, 0 = data) and predict ``v_d = noise - data``.
rlflow runs on t (0 = noise, 1 = data) and predicts ``v = data - noise``. This module is the only place
that converts: ``sigma = 1 - t`` and ``v = -v_d``. A test pins the conversion against the raw model.

A :class:`DiffusersFlowModel` is a :class:`~rlflow.flows.sampling.VelocityModel` whose condition is a
:class:`PromptEmbeddings` batch; it also encodes prompts (cached), decodes latents to images, and
switches to the reference model (LoRA adapters disabled, or a frozen copy) for KL terms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn


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


def sigma_from_t(t: Tensor) -> Tensor:
    """diffusers' noise level ``sigma = 1 - t``."""
    return 1.0 - t


def velocity_from_diffusers(model_output: Tensor) -> Tensor:
    """rlflow velocity (data - noise) from a diffusers prediction (noise - data)."""
    return -model_output


class DiffusersFlowModel(nn.Module):
    """A diffusers flow transformer (+ prompt encoder, + optional VAE) as an rlflow velocity model.

    ``latent_shape`` is the per-sample latent shape ``(C, H, W)`` (``(C, F, H, W)`` for video). With
    ``vae=None`` the latents are the images themselves in ``[-1, 1]`` (the built-in shapes world).
    """

    def __init__(
        self,
        transformer: nn.Module,
        prompt_encoder: PromptEncoder,
        *,
        latent_shape: Sequence[int],
        vae: nn.Module | None = None,
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        self.transformer = transformer
        self.prompt_encoder = prompt_encoder
        self.vae = vae
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.guidance_scale = float(guidance_scale)
        self._prompt_cache: dict[str, PromptEmbeddings] = {}

    # -- conditioning ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """Embeddings for ``prompts`` (cached per prompt string; the encoder is frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                encoded = self.prompt_encoder(missing)
            for i, prompt in enumerate(missing):
                self._prompt_cache[prompt] = encoded.index(slice(i, i + 1))
        return PromptEmbeddings.cat([self._prompt_cache[p] for p in prompts])

    # -- the velocity field ---------------------------------------------------------------------
    def velocity(self, x: Tensor, t: Tensor, cond: PromptEmbeddings) -> Tensor:
        """``dx/dt`` in rlflow's convention for latents ``x: [B, *latent_shape]`` at times ``t: [B]``."""
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        sigma = sigma_from_t(t)
        guided = self.guidance_scale != 1.0 and cond.negative_hidden_states is not None
        if guided:
            x_in = torch.cat([x, x])
            sigma_in = torch.cat([sigma, sigma])
            hidden = torch.cat([cond.negative_hidden_states, cond.hidden_states])
            pooled = None if cond.pooled is None else torch.cat([cond.negative_pooled, cond.pooled])
        else:
            x_in, sigma_in, hidden, pooled = x, sigma, cond.hidden_states, cond.pooled
        out = self._transformer_forward(x_in, sigma_in, hidden, pooled)
        if guided:
            uncond, conditional = out.chunk(2)
            out = uncond + self.guidance_scale * (conditional - uncond)
        return velocity_from_diffusers(out).to(x.dtype)

    def _transformer_forward(self, x: Tensor, sigma: Tensor, hidden: Tensor, pooled: Tensor | None) -> Tensor:
        """The raw diffusers prediction ``noise - data`` (per model family)."""
        dtype = next(self.transformer.parameters()).dtype
        out = self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=hidden.to(dtype),
            pooled_projections=None if pooled is None else pooled.to(dtype),
            timestep=(sigma * 1000.0).to(dtype),
            return_dict=False,
        )[0]
        return out

    # -- images -----------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from latents."""
        if self.vae is None:
            return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)
        raise NotImplementedError  # filled in with the VAE path

    # -- reference model ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within the block, :meth:`velocity` is the reference model's (LoRA adapters disabled)."""
        raise NotImplementedError
        yield
