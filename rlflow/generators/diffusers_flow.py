"""diffusers transformers as velocity fields for rlflow's shared kernels (the ONE convention converter).

diffusers' flow-matching models run on sigma (1 = noise, 0 = data) and predict ``v_d = noise - data``.
rlflow runs on t (0 = noise, 1 = data) and predicts ``v = data - noise``. This module is the only place
that converts: ``sigma = 1 - t`` and ``v = -v_d``. A test pins the conversion against the raw model.

A :class:`DiffusersFlowModel` is a :class:`~rlflow.flows.sampling.VelocityModel` whose condition is a
:class:`PromptEmbeddings` batch; it also encodes prompts (cached), decodes latents to images, switches to
the reference model (LoRA adapters disabled, or a frozen copy) for KL terms, and saves/loads itself.

The transformer families (SD3 / SD3.5, FLUX, Wan: how each is called, decoded and prompted) live in
:mod:`rlflow.generators.families`; the family is chosen from the transformer's class.

Loading: :meth:`DiffusersFlowModel.from_pretrained` loads SD3 and FLUX pipelines (hub id or local
directory) and rlflow directories written by :meth:`DiffusersFlowModel.save_pretrained`. Wan (and any
other assembly) is built by passing the pieces to the constructor, with a :class:`PipelineTextEncoder`
around the ``WanPipeline`` for the text side.

This module imports diffusers/peft lazily (inside functions), but it is only meant to be imported when the
``[diffusers]`` extra is installed; ``rlflow.generators`` does not import it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rlflow.generators.families import (
    PromptEmbeddings,
    PromptEncoder,
    diffusers_config,
    family_of,
    unwrap_module,
)
from rlflow.utils.checkpoint import (
    CheckpointError,
    atomic_update,
    load_state_dict,
    load_weights_into,
)
from rlflow.utils.model_format import LEGACY_FILES, find_model_config, read_model_config, write_model_config

if TYPE_CHECKING:
    from rlflow.utils.model_card import ModelCardInfo, ModelDescription

#: The ``model_type`` of a saved fine-tune's ``config.json`` (rlflow's model format,
#: :mod:`rlflow.utils.model_format`), next to the LoRA / transformer weights.
MODEL_TYPE = "rlflow.DiffusersFineTune"
#: diffusers' standard LoRA file name, so ``pipeline.load_lora_weights(dir)`` reads our adapters too.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_ADAPTER = "default"
#: Attention projections targeted by default (present in SD3, FLUX and Wan attention blocks).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def sigma_from_t(t: Tensor) -> Tensor:
    """diffusers' noise level ``sigma = 1 - t``."""
    return 1.0 - t


def velocity_from_diffusers(model_output: Tensor) -> Tensor:
    """rlflow velocity (data - noise) from a diffusers prediction (noise - data)."""
    return -model_output


# ---------------------------------------------------------------------------------------------------------
# Prompt encoding through a diffusers pipeline
# ---------------------------------------------------------------------------------------------------------


class PipelineTextEncoder:
    """A :class:`PromptEncoder` that calls a diffusers pipeline's own ``encode_prompt`` (frozen, no grad).

    Works with ``StableDiffusion3Pipeline`` (CLIP x2 [+ T5]; ``text_encoder_3=None`` gives T5 zeros as
    diffusers does), ``FluxPipeline`` (CLIP pooled + T5) and ``WanPipeline`` (UMT5, no pooled). Only the
    text encoders and tokenizers of the pipeline are used.

    Args:
        pipeline: the diffusers pipeline holding text encoders and tokenizers.
        negative_prompt: the prompt of the unconditional branch for classifier-free guidance (``""`` as
            in diffusers); ``None`` skips negative embeddings (guidance-distilled FLUX, or no CFG).
        max_sequence_length: T5/UMT5 token length (diffusers defaults: SD3 256, FLUX 512, Wan 226).
        device: where to run the encoders; default: the device of the first text encoder.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        negative_prompt: str | None = "",
        max_sequence_length: int | None = None,
        device: torch.device | str | None = None,
    ):
        self.pipeline = pipeline
        transformer = getattr(pipeline, "transformer", None)
        if transformer is None:
            raise ValueError(
                f"{type(pipeline).__name__} has no transformer; PipelineTextEncoder needs it to pick the family"
            )
        self.family = family_of(transformer)
        self.negative_prompt = negative_prompt
        default_length = {"sd3": 256, "flux": 512, "wan": 226}[self.family.name]
        self.max_sequence_length = int(max_sequence_length or default_length)
        self._device = None if device is None else torch.device(device)
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).eval()  # frozen: encode_prompt runs without gradients anyway

    @property
    def text_encoders(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if isinstance(m, nn.Module)]

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        encoders = self.text_encoders
        return next(encoders[0].parameters()).device if encoders else torch.device("cpu")

    def to(self, device: torch.device | str) -> PipelineTextEncoder:
        """Move the text encoders to ``device`` (and run there)."""
        for encoder in self.text_encoders:
            encoder.to(device)
        self._device = torch.device(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> PromptEmbeddings:
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a sequence of strings, got the single string {prompts!r}")
        return self.family.encode(
            self.pipeline,
            list(prompts),
            negative_prompt=self.negative_prompt,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter hyper-parameters (stored in the rlflow json of a saved directory)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dropout: float = 0.0
    init: str | bool = "gaussian"
    use_rslora: bool = False
    use_dora: bool = False


class DiffusersFlowModel(nn.Module):
    """A diffusers flow transformer (+ prompt encoder, + optional VAE) as an rlflow velocity model.

    ``latent_shape`` is the per-sample latent shape ``(C, H, W)`` (``(C, F, H, W)`` for video). With
    ``vae=None`` the latents are the images themselves in ``[-1, 1]`` (the built-in shapes world).

    Guidance: for SD3 / Wan / non-distilled FLUX, ``guidance_scale != 1`` runs classifier-free guidance
    ``uncond + g * (cond - uncond)`` with the negative embeddings of the condition (one batched forward of
    size 2B). For guidance-distilled FLUX (``config.guidance_embeds``, FLUX.1-dev) the scale is fed as the
    ``guidance`` input and there is no CFG pass.

    Distributed training: the trainer may replace ``model.transformer`` by a wrapped module
    (``model.transformer = accelerator.prepare(model.transformer)``). The policy forward goes through
    ``self.transformer`` (so DDP hooks run); config, PEFT and adapter switching go through
    :attr:`unwrapped_transformer`; reference forwards (no gradients wanted) call the unwrapped module or
    the frozen copy directly, bypassing DDP's gradient bookkeeping. Call :meth:`add_lora` /
    :meth:`enable_reference_copy` *before* wrapping.

    Args:
        transformer: an ``SD3Transformer2DModel``, ``FluxTransformer2DModel`` or ``WanTransformer3DModel``.
        prompt_encoder: turns prompts into :class:`PromptEmbeddings` (e.g. :class:`PipelineTextEncoder`).
        latent_shape: per-sample latent shape (rlflow layout; FLUX latents are unpacked ``(C, H, W)``).
        vae: the pipeline's VAE for :meth:`decode` (frozen here), or ``None`` when latents are images.
        guidance_scale: CFG scale (or FLUX embedded guidance); 1.0 = no guidance.
        base_model: where the base pipeline comes from (hub id or path), recorded by
            :meth:`save_pretrained` so that :meth:`from_pretrained` can rebuild the model.
        prompt_cache_size: how many prompts :meth:`encode_prompts` keeps (least recently used evicted).
    """

    def __init__(
        self,
        transformer: nn.Module,
        prompt_encoder: PromptEncoder,
        *,
        latent_shape: Sequence[int],
        vae: nn.Module | None = None,
        guidance_scale: float = 1.0,
        base_model: str | None = None,
        prompt_cache_size: int = 256,
    ):
        super().__init__()
        self.family = family_of(transformer)
        self.transformer = transformer
        self.prompt_encoder = prompt_encoder
        if vae is not None:
            vae.requires_grad_(False).eval()  # frozen; gradients may still flow *through* decode
        self.vae = vae
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.family.check_latent_shape(diffusers_config(transformer), self.latent_shape)
        self.guidance_scale = float(guidance_scale)
        self.base_model = base_model
        self.lora: LoraSettings | None = None
        # The time grid the model's own pipeline samples on (``time_grid: auto``); from_pretrained sets
        # "sd3" for SD3 pipelines. Models built from pieces (rlflow's shapes worlds) sample on the uniform grid.
        self.native_time_grid = "uniform"
        if prompt_cache_size < 0:
            raise ValueError(f"prompt_cache_size must be >= 0, got {prompt_cache_size}")
        self.prompt_cache_size = int(prompt_cache_size)
        self._prompt_cache: OrderedDict[str, PromptEmbeddings] = OrderedDict()
        # Set without registering it as a submodule: the frozen reference must not show up in
        # parameters()/state_dict() (optimizers, checkpoints); _apply below keeps it on the same device.
        object.__setattr__(self, "_reference_copy", None)
        self._in_reference = False

    # -- wrappers -----------------------------------------------------------------------------------
    @property
    def unwrapped_transformer(self) -> nn.Module:
        """The diffusers transformer itself (without a DDP / accelerate / torch.compile wrapper)."""
        return unwrap_module(self.transformer)

    @property
    def transformer_config(self) -> Any:
        return diffusers_config(self.unwrapped_transformer)

    def train(self, mode: bool = True) -> DiffusersFlowModel:
        """Train/eval mode for the transformer; the frozen VAE and reference copy always stay in eval."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        if self._reference_copy is not None:
            self._reference_copy.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> DiffusersFlowModel:
        super()._apply(fn, recurse)
        if self._reference_copy is not None:
            self._reference_copy._apply(fn, recurse)
        return self

    # -- conditioning ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """Embeddings for ``prompts`` (cached per prompt string; the encoder is frozen).

        The cache keeps the ``prompt_cache_size`` most recently used prompts: SD3's embeddings are
        ~2.7 MB per prompt in bf16 (5.5 MB with the negative), so an unbounded cache over a large prompt
        set would fill the GPU.
        """
        # One prompt per encoder call: a batched call's results differ in the last bits with the batch's
        # make-up, and a prompt's embedding must not depend on which batch first met it (a resumed run meets
        # prompts in other batches than the uninterrupted one, and must compute the same numbers).
        # Nor on the mode the model was in then: in train mode torch's TransformerEncoder takes another path
        # than its fused eval-mode one (the last bits differ), so the frozen encoder always runs in eval mode.
        encoder = self.prompt_encoder
        training = isinstance(encoder, nn.Module) and encoder.training
        for prompt in (p for p in dict.fromkeys(prompts) if p not in self._prompt_cache):
            with torch.no_grad():
                if training:
                    encoder.eval()
                try:
                    self._prompt_cache[prompt] = encoder([prompt])
                finally:
                    if training:
                        encoder.train()
        result = PromptEmbeddings.cat([self._prompt_cache[p] for p in prompts])
        for prompt in dict.fromkeys(prompts):
            self._prompt_cache.move_to_end(prompt)
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return result

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    # -- the velocity field ---------------------------------------------------------------------
    def velocity(self, x: Tensor, t: Tensor, cond: PromptEmbeddings) -> Tensor:
        """``dx/dt`` in rlflow's convention for latents ``x: [B, *latent_shape]`` at times ``t: [B]``."""
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(x.shape)} but this model's latent_shape is {self.latent_shape}; "
                "sample noise of shape [B, *model.latent_shape]"
            )
        batch, out_dtype = x.shape[0], x.dtype
        t = t.expand(batch) if t.dim() == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
        if len(cond) != batch:
            raise ValueError(f"condition has {len(cond)} rows but the latents have {batch}")
        sigma = sigma_from_t(t.float())
        config = self.transformer_config
        embedded = self.family.embedded_guidance(config)
        cfg = not embedded and self.guidance_scale != 1.0
        hidden, pooled = cond.hidden_states, cond.pooled
        if cfg:
            if cond.negative_hidden_states is None or (
                self.family.uses_pooled and cond.negative_pooled is None
            ):
                raise ValueError(
                    f"guidance_scale={self.guidance_scale} needs negative embeddings in the condition; encode "
                    "prompts with a negative prompt (PipelineTextEncoder(negative_prompt='')) or set "
                    "guidance_scale=1.0"
                )
            # One batched forward [uncond; cond], as the diffusers pipelines do.
            x = torch.cat([x, x])
            sigma = torch.cat([sigma, sigma])
            hidden = torch.cat([cond.negative_hidden_states, hidden])
            pooled = None if pooled is None else torch.cat([cond.negative_pooled, pooled])
        if self.family.uses_pooled and pooled is None:
            raise ValueError(
                f"a {self.family.name} transformer needs pooled embeddings (cond.pooled is None)"
            )

        module = self._forward_module()
        # The dtype of the module actually run: under DeepSpeed bf16 the trained transformer is cast while
        # a full fine-tune's frozen reference copy stays float32.
        dtype = next(unwrap_module(module).parameters()).dtype
        out = self.family.forward(
            module,
            config,
            x.to(dtype),
            sigma,
            hidden.to(x.device, dtype),
            None if pooled is None or not self.family.uses_pooled else pooled.to(x.device, dtype),
            self.guidance_scale,
        ).float()  # guidance arithmetic and the sign flip in float32 (bf16 outputs otherwise lose bits)
        if cfg:
            uncond, conditional = out.chunk(2)
            out = uncond + self.guidance_scale * (conditional - uncond)
        return velocity_from_diffusers(out).to(out_dtype)

    def _forward_module(self) -> nn.Module:
        if not self._in_reference:
            return self.transformer  # through DDP, so gradient hooks run
        if self._reference_copy is not None:
            return self._reference_copy
        return self.unwrapped_transformer  # adapters are disabled; no gradient sync wanted

    # -- images -----------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` (video: ``[B, 3, F, H, W]``) in ``[0, 1]``, float32, from latents.

        Not wrapped in ``no_grad``: differentiable rewards may back-propagate through the frozen VAE.
        """
        if self.vae is None:
            return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)
        return self.family.decode(self.vae, latents)

    # -- LoRA ---------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return self.lora is not None

    def add_lora(
        self,
        rank: int,
        alpha: float,
        target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        dropout: float = 0.0,
        *,
        init: str | bool = "gaussian",
        use_rslora: bool = False,
        use_dora: bool = False,
        adapter_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        """Freeze the transformer and inject trainable PEFT LoRA adapters (adapter name ``"default"``).

        Args:
            rank, alpha: LoRA rank ``r`` and ``lora_alpha`` (scale ``alpha / r``; Flow-GRPO: 32, 64).
            target_modules: module-name suffixes to adapt. Flow-GRPO on SD3 also adapts the context
                stream: ``("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out")``.
            dropout: LoRA dropout.
            init: PEFT ``init_lora_weights`` (``"gaussian"`` as diffusers' training scripts; every choice
                starts with ``B = 0``, so the adapted model equals the reference at step 0).
            use_rslora: rank-stabilised LoRA (scale ``alpha / sqrt(r)`` instead of ``alpha / r``; PEFT).
            use_dora: weight-decomposed LoRA (DoRA: a trained magnitude per output feature; PEFT). It also
                equals the base model at step 0.
            adapter_dtype: dtype of the adapter weights (float32 keeps optimizer updates precise on a
                bf16 base, as diffusers' ``cast_training_params`` does); ``None`` keeps the base dtype.
        """
        if self.has_lora:
            raise ValueError(f"a LoRA adapter is already attached ({self.lora}); load or train that one")
        if self._reference_copy is not None:
            raise ValueError(
                "this model already has a frozen reference copy (full fine-tuning); with LoRA the reference "
                "is the adapter-disabled model, so build a fresh model for LoRA training"
            )
        if self.transformer is not self.unwrapped_transformer:
            raise RuntimeError(
                "add_lora must be called before the transformer is wrapped (accelerator.prepare / DDP): "
                "wrapping registers the trainable parameters"
            )
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        from peft import LoraConfig

        settings = LoraSettings(
            int(rank),
            float(alpha),
            tuple(target_modules),
            float(dropout),
            init,
            bool(use_rslora),
            bool(use_dora),
        )
        transformer = self.unwrapped_transformer
        transformer.requires_grad_(False)
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            target_modules=list(settings.target_modules),
            lora_dropout=settings.dropout,
            init_lora_weights=settings.init,
            use_rslora=settings.use_rslora,
            use_dora=settings.use_dora,
        )
        try:
            transformer.add_adapter(config, adapter_name=_ADAPTER)
        except ValueError as exc:
            raise ValueError(
                f"could not add LoRA with target_modules={list(settings.target_modules)} to "
                f"{type(transformer).__name__}: {exc}. Use module names of this transformer's attention "
                "layers (e.g. to_q, to_k, to_v, to_out.0)"
            ) from exc
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
                if adapter_dtype is not None:
                    param.data = param.data.to(adapter_dtype)
            else:
                param.requires_grad_(False)
        self.lora = settings

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer should update: the LoRA adapters, or the whole transformer."""
        return [p for p in self.unwrapped_transformer.parameters() if p.requires_grad]

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The adapter weights, keyed as PEFT's ``get_peft_model_state_dict`` (no ``transformer.`` prefix)."""
        if not self.has_lora:
            raise ValueError("this model has no LoRA adapter; call add_lora(...) first")
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unwrapped_transformer, adapter_name=_ADAPTER)
        return {k: v.detach().clone() for k, v in state.items()}

    # -- reference model ----------------------------------------------------------------------------
    def enable_reference_copy(self) -> None:
        """For full fine-tuning: snapshot the current transformer as the frozen reference model.

        Made eagerly and explicitly (never lazily) so the reference is the model *before* training:
        call it before the first optimizer step and before wrapping. It doubles the transformer's memory
        and is kept out of ``parameters()`` / ``state_dict()``; ``model.to(...)`` moves it along.
        """
        if self.has_lora:
            raise ValueError("with LoRA the reference is the adapter-disabled model; no copy is needed")
        reference = copy.deepcopy(self.unwrapped_transformer)
        reference.requires_grad_(False).eval()
        object.__setattr__(self, "_reference_copy", reference)

    @property
    def reference_transformer(self) -> nn.Module | None:
        """The frozen copy made by :meth:`enable_reference_copy` (``None`` with LoRA or before)."""
        return self._reference_copy

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within the block, :meth:`velocity` is the reference model's.

        With LoRA: the adapters are disabled (diffusers' ``disable_adapters``) and re-enabled on exit,
        restoring every ``requires_grad`` flag (PEFT clears them when disabling). Without LoRA: the frozen
        copy made by :meth:`enable_reference_copy`. Nested blocks are allowed. Run reference forwards
        under ``torch.no_grad()``; they bypass the DDP wrapper.
        """
        if self._in_reference:
            yield
            return
        if self.has_lora:
            transformer = self.unwrapped_transformer
            flags = [(p, p.requires_grad) for p in transformer.parameters()]
            transformer.disable_adapters()
            self._in_reference = True
            try:
                yield
            finally:
                self._in_reference = False
                transformer.enable_adapters()
                for param, flag in flags:
                    param.requires_grad_(flag)
        elif self._reference_copy is not None:
            self._in_reference = True
            try:
                yield
            finally:
                self._in_reference = False
        else:
            raise RuntimeError(
                "no reference model: call model.add_lora(...) (reference = adapters disabled) or "
                "model.enable_reference_copy() before training (full fine-tuning)"
            )

    # -- checkpoints ----------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "transformer_class": type(self.unwrapped_transformer).__name__,
            "base_model": self.base_model,
            "latent_shape": list(self.latent_shape),
            "guidance_scale": self.guidance_scale,
            "lora": None if self.lora is None else asdict(self.lora),
        }

    def save_pretrained(
        self, directory: str | os.PathLike[str], *, card: ModelCardInfo | None = None
    ) -> Path:
        """Write the trained weights, ``config.json`` and the model card ``README.md`` into
        ``directory``, each entry atomically (the json last); other files in ``directory`` are kept (a
        ``README.md`` that is not an rlflow card too).

        LoRA: only the adapters, as diffusers' ``pytorch_lora_weights.safetensors`` (keys prefixed
        ``transformer.``, PEFT config in its metadata), so ``pipeline.load_lora_weights(directory)`` works
        in plain diffusers too. Full fine-tuning: ``transformer/`` via ``save_pretrained`` (safetensors).
        Text encoders and VAE are not saved: they are the base model's (``base_model`` in the json).
        ``card``: how the model was trained, for the card (:mod:`rlflow.utils.model_card`).
        """
        from rlflow.utils.model_card import write_model_card

        directory = Path(directory)
        transformer = self.unwrapped_transformer
        # The weights of an earlier save of ours in the other mode go (they can be gigabytes, and a
        # directory must not hold adapters next to a full transformer); its json says which they were.
        # Anything else, e.g. the transformer/ of a diffusers pipeline saved there, is not ours to delete.
        owned: tuple[str, ...] = LEGACY_FILES
        previous = find_model_config(directory)
        if previous is not None and previous.model_type == MODEL_TYPE:
            owned += (LORA_WEIGHT_NAME,) if previous.config.get("lora") is not None else ("transformer",)
        with atomic_update(directory, owned=owned) as tmp:
            if self.has_lora:
                import diffusers

                pipeline_class = getattr(diffusers, self.family.pipeline_class)
                peft_config = transformer.peft_config[_ADAPTER].to_dict()
                pipeline_class.save_lora_weights(
                    save_directory=tmp,
                    transformer_lora_layers=self.lora_state_dict(),
                    transformer_lora_adapter_metadata=peft_config,
                    weight_name=LORA_WEIGHT_NAME,
                )
            else:
                transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            write_model_config(tmp, MODEL_TYPE, self._metadata())
            write_model_card(tmp, directory, self.model_card_description(), card)
        return directory

    def model_card_description(self) -> ModelDescription:
        """What the model card says about this model (see :mod:`rlflow.utils.model_card`)."""
        from rlflow.utils.model_card import ModelDescription

        transformer = type(self.unwrapped_transformer).__name__
        base = f" `{self.base_model}`" if self.base_model else ""
        if self.lora is not None:
            what = (
                f"LoRA adapters (rank {self.lora.rank}) for the {transformer} of a text-to-image flow model"
            )
        else:
            what = f"A full fine-tune of the {transformer} of a text-to-image flow model"
        notes = [
            f"The text encoders and the VAE are not in this folder: they are the base model's{base}, which "
            "loading needs."
        ]
        if self.lora is not None and self.family.name in ("sd3", "flux"):
            notes.append(
                f"The adapters are in diffusers' format: `{self.family.pipeline_class}.from_pretrained(base)"
                ".load_lora_weights(folder)` reads them in plain diffusers too."
            )
        return ModelDescription(
            model_type=MODEL_TYPE,
            summary=f"{what[0].upper()}{what[1:]} ({self.family.name} family), fine-tuned with rlflow.",
            loader="rlflow.generators.loading.load_text_to_image_model",
            config=self._metadata(),
            tags=(
                "flow-matching",
                "text-to-image",
                "diffusers",
                *(("lora",) if self.lora is not None else ()),
            ),
            pipeline_tag="text-to-image",
            base_model=self.base_model,
            usage_notes=tuple(notes),
        )

    def load_lora(self, directory: str | os.PathLike[str]) -> None:
        """Load LoRA adapters saved by :meth:`save_pretrained` onto this (base) model.

        Adds the adapter with the saved settings if the model has none; an existing adapter must have the
        same settings (its weights are overwritten).
        """
        from peft.utils import set_peft_model_state_dict

        directory = Path(directory)
        meta = _read_metadata(directory)
        if meta.get("lora") is None:
            raise CheckpointError(
                f"{directory} holds a full fine-tune, not LoRA adapters; load it with "
                "DiffusersFlowModel.from_pretrained instead"
            )
        saved = meta["lora"]
        settings = LoraSettings(
            rank=int(saved["rank"]),
            alpha=float(saved["alpha"]),
            target_modules=tuple(saved["target_modules"]),
            dropout=float(saved["dropout"]),
            init=saved.get("init", "gaussian"),
            use_rslora=bool(saved.get("use_rslora", False)),
            use_dora=bool(saved.get("use_dora", False)),
        )
        if meta.get("family") != self.family.name:
            raise CheckpointError(
                f"{directory} has LoRA adapters for a {meta.get('family')} transformer but this model is "
                f"{self.family.name}; load them onto the base model they were trained from"
            )
        if self.lora is None:
            self.add_lora(
                settings.rank,
                settings.alpha,
                settings.target_modules,
                settings.dropout,
                init=settings.init,
                use_rslora=settings.use_rslora,
                use_dora=settings.use_dora,
            )
        elif (
            self.lora.rank,
            self.lora.alpha,
            self.lora.target_modules,
            self.lora.use_rslora,
            self.lora.use_dora,
        ) != (
            settings.rank,
            settings.alpha,
            settings.target_modules,
            settings.use_rslora,
            settings.use_dora,
        ):
            raise CheckpointError(
                f"{directory} has LoRA {settings} but this model already has {self.lora}; load it onto a "
                "model without adapters"
            )
        prefix = "transformer."
        raw = load_state_dict(directory / LORA_WEIGHT_NAME)
        state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in raw.items()}
        expected = self.lora_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"LoRA weights in {directory} do not match this transformer (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}); load them onto the base "
                "model they were trained from"
            )
        dtype = next(p for n, p in self.unwrapped_transformer.named_parameters() if "lora_" in n).dtype
        set_peft_model_state_dict(
            self.unwrapped_transformer, {k: v.to(dtype) for k, v in state.items()}, adapter_name=_ADAPTER
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str],
        *,
        torch_dtype: torch.dtype = torch.float32,
        guidance_scale: float | None = None,
        resolution: int | tuple[int, int] | None = None,
        negative_prompt: str | None = "",
        max_sequence_length: int | None = None,
        device: torch.device | str | None = None,
        base_model: str | os.PathLike[str] | None = None,
        **pipeline_kwargs: Any,
    ) -> DiffusersFlowModel:
        """Load an SD3 / FLUX diffusers pipeline, or an rlflow directory written by :meth:`save_pretrained`.

        Args:
            path_or_hub_id: a local pipeline directory or a Hub id (``stabilityai/stable-diffusion-3.5-
                medium``), or a fine-tune directory written by :meth:`save_pretrained` (LoRA or full fine-tune; its base
                pipeline is loaded from the recorded ``base_model`` unless ``base_model`` is given).
            torch_dtype: dtype of every pipeline module (``torch.bfloat16`` on GPUs; LoRA adapters stay
                float32, see :meth:`add_lora`).
            guidance_scale: CFG scale (FLUX.1-dev: embedded guidance). Default: the saved one, else 4.5 for
                SD3 (Flow-GRPO's training setting) and 3.5 for FLUX (FluxPipeline's default).
            resolution: image size (int or ``(H, W)``); default: the saved latent shape, else the
                transformer's ``sample_size * vae_scale_factor``.
            negative_prompt: unconditional prompt for CFG (``None``: no negative embeddings).
            max_sequence_length: T5 tokens (default: the pipeline's default).
            device: move the transformer, VAE and text encoders there.
            pipeline_kwargs: passed to the pipeline's ``from_pretrained`` (e.g. ``text_encoder_3=None,
                tokenizer_3=None`` to drop SD3's T5, ``variant``, ``revision``).
        """
        path = Path(path_or_hub_id)
        saved = find_model_config(path)
        meta = saved.config if saved is not None and saved.model_type == MODEL_TYPE else None
        if meta is not None:
            source = base_model or meta.get("base_model")
            if source is None:
                raise CheckpointError(
                    f"{path} records no base_model (the model was built from pieces); rebuild the base model "
                    "and call model.load_lora(dir), or pass base_model=<pipeline path or hub id>"
                )
            model = cls.from_pretrained(
                source,
                torch_dtype=torch_dtype,
                guidance_scale=meta["guidance_scale"] if guidance_scale is None else guidance_scale,
                resolution=resolution,
                negative_prompt=negative_prompt,
                max_sequence_length=max_sequence_length,
                device=device,
                **pipeline_kwargs,
            )
            if resolution is None:  # the resolution the model was trained at
                model.latent_shape = tuple(int(s) for s in meta["latent_shape"])
                model.family.check_latent_shape(model.transformer_config, model.latent_shape)
            if meta.get("lora") is not None:
                model.load_lora(path)
                if device is not None:
                    model.transformer.to(device)
            else:
                model.load_transformer(path)
            return model

        pipeline = _load_pipeline(str(path_or_hub_id), torch_dtype, pipeline_kwargs)
        family = family_of(pipeline.transformer)
        if family.name == "wan":
            family.latent_shape_for(pipeline, resolution)  # raises with the constructor recipe
        if device is not None:
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(pipeline, name, None)
                if isinstance(module, nn.Module):
                    module.to(device)
        default_scale = {"sd3": 4.5, "flux": 3.5}[family.name]
        encoder = PipelineTextEncoder(
            pipeline,
            # Guidance-distilled FLUX never uses the unconditional branch: skip encoding it.
            negative_prompt=None
            if family.embedded_guidance(pipeline.transformer.config)
            else negative_prompt,
            max_sequence_length=max_sequence_length,
        )
        model = cls(
            pipeline.transformer,
            encoder,
            latent_shape=family.latent_shape_for(pipeline, resolution),
            vae=pipeline.vae,
            guidance_scale=default_scale if guidance_scale is None else guidance_scale,
            # A local base is recorded as an absolute path so saved directories work from any cwd.
            base_model=str(path.resolve()) if path.exists() else str(path_or_hub_id),
        )
        # StableDiffusion3Pipeline samples on its scheduler's grid (FLUX and Wan pipelines use their own
        # schedules, which rlflow approximates with the uniform grid and time_shift).
        model.native_time_grid = "sd3" if family.name == "sd3" else "uniform"
        return model

    def load_transformer(self, directory: str | os.PathLike[str]) -> None:
        """Load full fine-tuned transformer weights saved by :meth:`save_pretrained` (``directory/transformer``).

        The weights are copied *into* the existing transformer (in place), so an optimizer, a DDP wrapper
        and a reference copy made earlier by :meth:`enable_reference_copy` (the base model, as a resumed
        full fine-tune needs) all stay valid. Holds a second copy of the weights on CPU while loading.
        """
        source = Path(directory) / "transformer"
        if not source.is_dir():
            raise CheckpointError(
                f"{source} is missing: {directory} is not a full fine-tune written by save_pretrained "
                "(LoRA checkpoints load with load_lora)"
            )
        target = self.unwrapped_transformer
        loaded = type(target).from_pretrained(source, **_dtype_kwarg(next(target.parameters()).dtype))
        load_weights_into(target, loaded.state_dict(), source=str(source))


def _read_metadata(directory: Path) -> dict[str, Any]:
    """The saved fine-tune's settings: ``base_model``, ``family``, ``latent_shape``, ``lora``, ..."""
    return read_model_config(
        directory, expected=MODEL_TYPE, writer="DiffusersFlowModel.save_pretrained (rlflow grpo, dpo, ...)"
    ).config


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": ...}`` for diffusers that renamed ``torch_dtype`` (and warn on it), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


def _load_pipeline(source: str, torch_dtype: torch.dtype, pipeline_kwargs: dict[str, Any]) -> Any:
    """Load a diffusers SD3 / FLUX pipeline, with components saved as ``None`` passed as ``None``."""
    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as exc:
        local = Path(source).exists()
        hint = (
            "the directory has no model_index.json: point to a diffusers pipeline directory"
            if local
            else "it is neither a local directory nor reachable on the Hugging Face Hub (offline? wrong id? "
            "gated model without a token?): download it first (`huggingface-cli download <id> --local-dir "
            "DIR`) and pass DIR"
        )
        raise OSError(f"could not load the diffusers pipeline {source!r}: {hint} ({exc})") from exc
    class_name = index.get("_class_name")
    supported = {"StableDiffusion3Pipeline", "FluxPipeline"}
    if class_name not in supported:
        raise ValueError(
            f"{source!r} is a {class_name}; from_pretrained loads {sorted(supported)}. For Wan or other "
            "pipelines build DiffusersFlowModel(pipe.transformer, PipelineTextEncoder(pipe), latent_shape=..., "
            "vae=pipe.vae) yourself"
        )
    # Components saved as None (e.g. SD3 without T5) must be passed as None explicitly, or diffusers
    # refuses to load the pipeline.
    absent = {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is None
    }
    kwargs = {**absent, **pipeline_kwargs}
    pipeline_class = getattr(diffusers, class_name)
    pipeline = pipeline_class.from_pretrained(source, **_dtype_kwarg(torch_dtype), **kwargs)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipeline, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(name == "transformer")
            module.train(False)
    return pipeline
