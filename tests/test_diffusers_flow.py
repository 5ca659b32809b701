"""The diffusers adapters: convention conversion, FLUX packing, CFG, LoRA / reference models, loading.

All models are the tiny random ones of ``rlflow.testing`` (CPU, a few ms per forward).
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rlflow import testing as tiny  # noqa: E402
from rlflow.flows.kernels import FlowSDEStep  # noqa: E402
from rlflow.flows.sampling import sample_chain  # noqa: E402
from rlflow.generators.diffusers_flow import DiffusersFlowModel, PipelineTextEncoder  # noqa: E402
from rlflow.generators.families import PromptEmbeddings, pack_latents, unpack_latents  # noqa: E402
from rlflow.utils.checkpoint import CheckpointError  # noqa: E402

SD3_SHAPE = (4, 8, 8)
FLUX_SHAPE = (4, 8, 8)
WAN_SHAPE = (4, 3, 8, 8)


def _no_encoder(prompts):
    raise AssertionError("these tests pass embeddings directly")


def _model(family: str, guidance_scale: float = 1.0, **kwargs) -> DiffusersFlowModel:
    if family == "sd3":
        transformer, shape = tiny.tiny_sd3_transformer(), SD3_SHAPE
    elif family == "flux":
        transformer, shape = tiny.tiny_flux_transformer(**kwargs), FLUX_SHAPE
    else:
        transformer, shape = tiny.tiny_wan_transformer(), WAN_SHAPE
    return DiffusersFlowModel(transformer, _no_encoder, latent_shape=shape, guidance_scale=guidance_scale)


def _inputs(model: DiffusersFlowModel, batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.latent_shape, generator=gen)
    t = torch.rand(batch, generator=gen)
    cond = tiny.random_prompt_embeddings(model.transformer, batch, generator=gen)
    return x, t, cond


# -- convention conversion, per family --------------------------------------------------------------------


@torch.no_grad()
def test_sd3_velocity_is_negated_prediction_at_sigma_one_minus_t():
    model = _model("sd3")
    x, t, cond = _inputs(model)
    raw = model.transformer(
        hidden_states=x,
        encoder_hidden_states=cond.hidden_states,
        pooled_projections=cond.pooled,
        timestep=(1.0 - t) * 1000.0,
        return_dict=False,
    )[0]
    assert raw.abs().mean() > 1e-3  # a non-trivial model, so the comparison means something
    torch.testing.assert_close(model.velocity(x, t, cond), -raw, rtol=0, atol=0)
    # A scalar t broadcasts over the batch.
    t0 = torch.tensor(0.25)
    torch.testing.assert_close(model.velocity(x, t0, cond), model.velocity(x, t0.expand(3), cond))


@torch.no_grad()
def test_wan_velocity_is_negated_prediction_on_video_latents():
    model = _model("wan")
    x, t, cond = _inputs(model)
    assert cond.pooled is None
    raw = model.transformer(
        hidden_states=x,
        timestep=(1.0 - t) * 1000.0,
        encoder_hidden_states=cond.hidden_states,
        return_dict=False,
    )[0]
    assert raw.shape == x.shape and raw.abs().mean() > 1e-3
    torch.testing.assert_close(model.velocity(x, t, cond), -raw, rtol=0, atol=0)


def test_flux_pack_unpack_match_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x, rtol=0, atol=0)
    # The pipeline unpacks from pixel sizes: latent 6x8 at VAE factor 8 is 48x64 pixels.
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 64, 8), x, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_velocity_is_negated_unpacked_prediction(guidance_embeds):
    from diffusers import FluxPipeline

    model = _model("flux", guidance_scale=3.5 if guidance_embeds else 1.0, guidance_embeds=guidance_embeds)
    x, t, cond = _inputs(model)
    seq = cond.hidden_states.shape[1]
    raw = model.transformer(
        hidden_states=FluxPipeline._pack_latents(x, 3, 4, 8, 8),
        encoder_hidden_states=cond.hidden_states,
        pooled_projections=cond.pooled,
        timestep=1.0 - t,  # FluxPipeline passes timestep / 1000 = sigma
        guidance=torch.full((3,), 3.5) if guidance_embeds else None,
        txt_ids=torch.zeros(seq, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32),
        return_dict=False,
    )[0]
    expected = -FluxPipeline._unpack_latents(raw, 16, 16, 2)  # 8x8 latents at VAE factor 2
    assert raw.abs().mean() > 1e-3
    # Guidance-distilled FLUX embeds the scale and runs no CFG pass, even with negatives present.
    assert cond.negative_hidden_states is not None
    torch.testing.assert_close(model.velocity(x, t, cond), expected, rtol=0, atol=0)


@torch.no_grad()
def test_flux_pipeline_text_encoder_and_decode():
    pipe = tiny.build_tiny_flux_pipeline()
    encoder = PipelineTextEncoder(pipe, negative_prompt=None, max_sequence_length=6)
    cond = encoder(["a cat", "red dog"])
    embeds, pooled, _ = pipe.encode_prompt(prompt=["a cat", "red dog"], prompt_2=None, max_sequence_length=6)
    torch.testing.assert_close(cond.hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert cond.negative_hidden_states is None  # guidance-distilled: no unconditional branch
    model = DiffusersFlowModel(
        pipe.transformer, encoder, latent_shape=FLUX_SHAPE, vae=pipe.vae, guidance_scale=3.5
    )
    x = torch.randn(2, *FLUX_SHAPE)
    assert model.velocity(x, torch.rand(2), cond).shape == x.shape
    images = model.decode(x)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


@torch.no_grad()
def test_bf16_transformer_keeps_float32_latents():
    model = _model("sd3", guidance_scale=2.0)
    x, t, cond = _inputs(model)
    v32 = model.velocity(x, t, cond)
    model.transformer.to(torch.bfloat16)
    v16 = model.velocity(x, t, cond)
    assert v16.dtype == torch.float32
    torch.testing.assert_close(v16, v32, rtol=0.1, atol=0.1)


# -- classifier-free guidance --------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd3", "wan", "flux"])
def test_cfg_is_uncond_plus_scale_times_difference(family):
    kwargs = {"guidance_embeds": False} if family == "flux" else {}
    guided = _model(family, guidance_scale=4.5, **kwargs)
    plain = _model(family, guidance_scale=1.0, **kwargs)
    x, t, cond = _inputs(guided)
    negative = PromptEmbeddings(cond.negative_hidden_states, cond.negative_pooled)
    v_cond = plain.velocity(x, t, PromptEmbeddings(cond.hidden_states, cond.pooled))
    v_uncond = plain.velocity(x, t, negative)
    assert (v_cond - v_uncond).abs().max() > 1e-3
    expected = v_uncond + 4.5 * (v_cond - v_uncond)
    torch.testing.assert_close(guided.velocity(x, t, cond), expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    model = _model("sd3", guidance_scale=3.0)
    x, t, cond = _inputs(model)
    with pytest.raises(ValueError, match="needs negative embeddings"):
        model.velocity(x, t, PromptEmbeddings(cond.hidden_states, cond.pooled))
    with pytest.raises(ValueError, match="latent_shape"):
        model.velocity(torch.randn(3, 4, 6, 6), t, cond)
    with pytest.raises(TypeError, match="unsupported transformer class Linear"):
        DiffusersFlowModel(nn.Linear(2, 2), _no_encoder, latent_shape=(4, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        DiffusersFlowModel(tiny.tiny_flux_transformer(), _no_encoder, latent_shape=(16, 8, 8))
    with pytest.raises(RuntimeError, match="enable_reference_copy"), model.reference():
        pass


# -- LoRA and reference models -------------------------------------------------------------------------------


class _Wrapper(nn.Module):
    """Stands in for DDP / accelerate's wrapper: forwards through ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def _train_step(model: DiffusersFlowModel, x, t, cond, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    loss = model.velocity(x, t, cond).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_lora_trains_only_adapters_and_reference_is_the_base_model():
    model = _model("sd3", guidance_scale=2.0)
    x, t, cond = _inputs(model)
    with torch.no_grad():
        v_base = model.velocity(x, t, cond)
    model.add_lora(rank=4, alpha=8.0)
    trainable = {n for n, p in model.unwrapped_transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for n, p in model.unwrapped_transformer.named_parameters() if n in trainable
    }
    with torch.no_grad():  # B = 0 at init: the adapted model starts at the base model
        torch.testing.assert_close(model.velocity(x, t, cond), v_base, rtol=0, atol=0)
        with model.reference():
            torch.testing.assert_close(model.velocity(x, t, cond), v_base, rtol=0, atol=0)

    # The trainer wraps the transformer (DDP): the policy forward must go through the wrapper.
    model.transformer = _Wrapper(model.transformer)
    before = {n: p.detach().clone() for n, p in model.unwrapped_transformer.named_parameters()}
    _train_step(model, x, t, cond)
    assert model.transformer.calls == 1
    changed = {n for n, p in model.unwrapped_transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable

    with torch.no_grad():
        assert (model.velocity(x, t, cond) - v_base).abs().max() > 1e-4
        with model.reference():
            torch.testing.assert_close(model.velocity(x, t, cond), v_base, rtol=0, atol=0)
        assert model.transformer.calls == 2  # the reference forward bypassed the wrapper
        assert (model.velocity(x, t, cond) - v_base).abs().max() > 1e-4
    # PEFT clears requires_grad when disabling adapters; reference() restores it.
    assert {n for n, p in model.unwrapped_transformer.named_parameters() if p.requires_grad} == trainable


def test_full_finetune_reference_copy_is_frozen_and_unchanged():
    model = _model("sd3")
    x, t, cond = _inputs(model)
    with torch.no_grad():
        v_base = model.velocity(x, t, cond)
    model.enable_reference_copy()
    reference = model.reference_transformer
    assert reference is not None and reference is not model.transformer
    assert all(not p.requires_grad for p in reference.parameters())
    own = {id(p) for p in model.parameters()}
    assert not own & {id(p) for p in reference.parameters()}  # not in optimizers / state_dict
    assert not any(k.startswith("_reference") for k in model.state_dict())
    snapshot = {n: p.detach().clone() for n, p in reference.named_parameters()}

    _train_step(model, x, t, cond)
    assert all(torch.equal(p, snapshot[n]) for n, p in reference.named_parameters())
    with torch.no_grad():
        assert (model.velocity(x, t, cond) - v_base).abs().max() > 1e-4
        with model.reference():
            torch.testing.assert_close(model.velocity(x, t, cond), v_base, rtol=0, atol=0)
    model.to(torch.float64)  # .to() moves the unregistered copy along
    assert next(reference.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="no copy is needed"):
        lora = _model("sd3")
        lora.add_lora(2, 2.0)
        lora.enable_reference_copy()


# -- a real (tiny) pipeline: loading, prompts, sampling, decoding, checkpoints --------------------------------


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_rslora_and_dora_start_at_the_base_model_train_and_round_trip(variant, tmp_path):
    """trl.ModelConfig's use_rslora / use_dora reach PEFT: rsLoRA scales by alpha / sqrt(r), DoRA adds a
    magnitude per output feature; both equal the base at step 0, train, and load back with their setting."""
    model = _model("sd3")
    x, t, cond = _inputs(model)
    with torch.no_grad():
        v_base = model.velocity(x, t, cond)
    model.add_lora(rank=4, alpha=8.0, use_rslora=variant == "rslora", use_dora=variant == "dora")
    layer = next(m for n, m in model.unwrapped_transformer.named_modules() if n.endswith("attn.to_q"))
    if variant == "rslora":
        assert layer.scaling["default"] == pytest.approx(8.0 / 4**0.5)  # not 8 / 4
    else:
        assert any("lora_magnitude_vector" in n for n, _ in model.unwrapped_transformer.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, t, cond), v_base, rtol=0, atol=1e-6)
    _train_step(model, x, t, cond)
    with torch.no_grad():
        trained = model.velocity(x, t, cond)
    assert not torch.allclose(trained, v_base)
    model.save_pretrained(tmp_path / "adapters")
    fresh = _model("sd3")
    fresh.load_lora(tmp_path / "adapters")
    assert fresh.lora == model.lora and (fresh.lora.use_rslora, fresh.lora.use_dora) == (
        variant == "rslora",
        variant == "dora",
    )
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, t, cond), trained, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return tiny.build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


def _load(path, **kwargs) -> DiffusersFlowModel:
    return DiffusersFlowModel.from_pretrained(path, max_sequence_length=4, **kwargs)


def test_pipeline_load_encode_sample_decode(pipeline_dir):
    model = _load(pipeline_dir, guidance_scale=3.0)
    assert model.latent_shape == (4, 8, 8)  # 16 px images, VAE factor 2
    assert isinstance(model.prompt_encoder, PipelineTextEncoder)

    calls = []
    encoder = model.prompt_encoder
    model.prompt_encoder = lambda prompts: calls.append(list(prompts)) or encoder(prompts)
    prompts = ["a red cat", "a dog", "a red cat"]
    first = model.encode_prompts(prompts)
    assert calls == [
        ["a red cat"],
        ["a dog"],
    ]  # duplicates encoded once, one prompt per call (batch-independent)
    assert first.hidden_states.shape == (3, 8 + 4, 32) and first.pooled.shape == (3, 32)
    assert first.negative_hidden_states.shape == (3, 12, 32)
    assert torch.equal(first.hidden_states[0], first.hidden_states[2])
    assert not torch.equal(first.hidden_states[0], first.hidden_states[1])
    again = model.encode_prompts(prompts)
    assert calls == [["a red cat"], ["a dog"]]  # cache hit
    for a, b in zip(first._fields(), again._fields(), strict=True):
        assert torch.equal(a, b)
    model.prompt_cache_size = 2
    model.encode_prompts(["x", "a dog"])  # evicts the least recently used "a red cat"
    assert list(model._prompt_cache) == ["x", "a dog"]

    # Same embeddings as the pipeline's own encode_prompt.
    pipe_embeds, pipe_negative, pipe_pooled, _ = encoder.pipeline.encode_prompt(
        prompt=["a dog"], prompt_2=None, prompt_3=None, device="cpu", max_sequence_length=4
    )
    # (batch 2 vs 1: matmul blocking differs in the last bit)
    torch.testing.assert_close(first.hidden_states[1:2], pipe_embeds)
    torch.testing.assert_close(first.pooled[1:2], pipe_pooled)

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, *model.latent_shape, generator=gen)
    with torch.no_grad():
        traj = sample_chain(model, FlowSDEStep(0.7), noise, torch.linspace(0, 1, 5), first, generator=gen)
    assert traj.chain.shape == (3, 5, *model.latent_shape)
    assert torch.isfinite(traj.log_probs).all()
    images = model.decode(traj.sample)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1

    # decode follows the pipeline: latents / scaling_factor + shift_factor, then [-1, 1] -> [0, 1].
    vae = model.vae
    raw = vae.decode(traj.sample / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))


def test_lora_save_load_round_trip(pipeline_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    model = _load(pipeline_dir)
    model.add_lora(rank=4, alpha=4.0)
    x, t, _ = _inputs(model)
    cond = model.encode_prompts(["a red cat", "a dog", "x"])
    _train_step(model, x, t, cond, lr=5e-2)
    with torch.no_grad():
        expected = model.velocity(x, t, cond)
    saved = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in saved.iterdir()) == [
        "README.md",  # the model card
        "config.json",  # rlflow's model format: model_type rlflow.DiffusersFineTune
        "pytorch_lora_weights.safetensors",
    ]
    assert not list(tmp_path.glob(".*"))  # atomic write left no temporaries

    fresh = _load(pipeline_dir)
    fresh.load_lora(saved)
    reloaded = _load(saved)  # rlflow directory: base pipeline from the json + adapters
    assert reloaded.lora == model.lora and reloaded.guidance_scale == model.guidance_scale
    with torch.no_grad():
        for other in (fresh, reloaded):
            torch.testing.assert_close(other.velocity(x, t, cond), expected, rtol=0, atol=0)
            assert all(
                "lora_" in n for n, p in other.unwrapped_transformer.named_parameters() if p.requires_grad
            )

        # The file is diffusers' LoRA format: a stock pipeline loads it too.
        pipe = StableDiffusion3Pipeline.from_pretrained(pipeline_dir, text_encoder_3=None, tokenizer_3=None)
        pipe.load_lora_weights(saved)
        stock = DiffusersFlowModel(pipe.transformer, _no_encoder, latent_shape=(4, 8, 8), guidance_scale=4.5)
        torch.testing.assert_close(stock.velocity(x, t, cond), expected, rtol=1e-5, atol=1e-6)

    with pytest.raises(CheckpointError, match="already has"):
        other = _load(pipeline_dir)
        other.add_lora(rank=2, alpha=2.0)
        other.load_lora(saved)


def test_full_finetune_save_load_round_trip(pipeline_dir, tmp_path):
    model = _load(pipeline_dir)
    model.enable_reference_copy()
    x, t, _ = _inputs(model)
    cond = model.encode_prompts(["a red cat", "a dog", "x"])
    _train_step(model, x, t, cond)
    with torch.no_grad():
        expected = model.velocity(x, t, cond)
    saved = model.save_pretrained(tmp_path / "full")
    assert (saved / "transformer" / "config.json").is_file()

    # Resume: base model + its reference copy, then the fine-tuned weights in place.
    resumed = _load(pipeline_dir)
    resumed.enable_reference_copy()
    resumed.load_transformer(saved)
    reloaded = _load(saved)
    with torch.no_grad():
        for other in (resumed, reloaded):
            torch.testing.assert_close(other.velocity(x, t, cond), expected, rtol=0, atol=0)
        with model.reference(), resumed.reference():
            torch.testing.assert_close(
                resumed.velocity(x, t, cond), model.velocity(x, t, cond), rtol=0, atol=0
            )
    with pytest.raises(CheckpointError, match="full fine-tune"):
        _load(pipeline_dir).load_lora(saved)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(OSError, match="model_index.json"):
        DiffusersFlowModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="multiples"):
        # resolution 18 is not a multiple of VAE factor 2 x patch 2
        DiffusersFlowModel.from_pretrained(tiny.build_tiny_sd3_pipeline(tmp_path / "p"), resolution=18)
