"""Memory features for large models (one process): mixed precision keeps the log-prob arithmetic in float32,
activation checkpointing leaves gradients unchanged, the 8-bit optimizer is optional with a clear error."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from rlflow.config import ConfigError  # noqa: E402
from rlflow.flows.kernels import make_kernel  # noqa: E402
from rlflow.flows.sampling import sample_chain, score_chain  # noqa: E402
from rlflow.flows.time import time_grid  # noqa: E402
from rlflow.utils.distributed import MemoryConfig, enable_gradient_checkpointing, make_optimizer  # noqa: E402
from tests.test_grpo import PROMPTS, pixel_model  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _chain(model, generator_seed: int = 0, steps: int = 6):
    generator = torch.Generator().manual_seed(generator_seed)
    x0 = torch.randn(4, *model.latent_shape, generator=generator)
    cond = model.encode_prompts(PROMPTS)
    kernel = make_kernel("flow_sde", noise_level=0.7)
    return kernel, sample_chain(model, kernel, x0, time_grid(steps), cond, generator=generator)


def test_bf16_autocast_keeps_log_probs_float32_and_the_first_ratio_one():
    """Under bf16 autocast (what `memory.mixed_precision: bf16` does without DeepSpeed) the network runs in
    bf16 but the velocity comes back float32 and the Gaussian log-densities are computed in float32: finite,
    re-scored identically (ratio 1), and close to the float32 model's."""
    model = pixel_model().eval()
    with torch.no_grad():
        kernel, exact = _chain(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, mixed = _chain(model)
            rescored = score_chain(model, kernel, mixed).log_probs
    assert mixed.log_probs.dtype == torch.float32 and mixed.chain.dtype == torch.float32
    assert torch.isfinite(mixed.log_probs).all()
    # Sampling and re-scoring agree: the first PPO/GRPO ratio is 1 under mixed precision too.
    elements = mixed.chain[0, 0].numel()
    assert ((rescored - mixed.log_probs).abs() / elements).max() < 1e-4
    # bf16 rounding of the velocity moves the per-element log-density only slightly.
    assert ((mixed.log_probs - exact.log_probs).abs() / elements).max() < 0.05


def test_reference_copy_runs_in_its_own_dtype():
    """Full fine-tuning under DeepSpeed bf16: the engine casts the trained transformer to bf16 while the
    frozen reference copy stays float32. Each forward gets inputs in the dtype of the module that runs it
    (found on a GPU: feeding the reference bf16 inputs failed in its first conv)."""
    model = pixel_model()
    model.enable_reference_copy()
    model.transformer.to(torch.bfloat16)  # what the engine does to the trained module
    x = torch.randn(2, *model.latent_shape)
    t = torch.full((2,), 0.3)
    cond = model.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        trained = model.velocity(x, t, cond)
        with model.reference():
            reference = model.velocity(x, t, cond)
    assert trained.dtype == reference.dtype == torch.float32
    assert next(model.reference_transformer.parameters()).dtype == torch.float32
    torch.testing.assert_close(trained, reference, rtol=0.05, atol=0.05)  # the same weights, bf16 vs fp32


def test_gradient_checkpointing_leaves_gradients_unchanged():
    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)  # PEFT draws LoRA A from the global generator
        model = pixel_model()
        model.add_lora(4, 4.0)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model.transformer)
        with torch.no_grad():  # move B off zero so that every adapter gets a gradient
            for p in model.trainable_parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        x = torch.randn(4, *model.latent_shape, generator=torch.Generator().manual_seed(1))
        t = torch.linspace(0.1, 0.9, 4)
        model.velocity(x, t, model.encode_prompts(PROMPTS)).square().mean().backward()
        return [p.grad.clone() for p in model.trainable_parameters()]

    plain, checkpointed = gradients(False), gradients(True)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_eight_bit_optimizer_is_optional_with_a_clear_error():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer(params, kind="adamw", lr=1e-3, weight_decay=0.0), torch.optim.AdamW)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="bitsandbytes"):
            make_optimizer(params, kind="adamw_8bit", lr=1e-3, weight_decay=0.0)
    with pytest.raises(ConfigError, match="adamw"):
        make_optimizer(params, kind="sgd", lr=1e-3, weight_decay=0.0)
    assert MemoryConfig().mixed_precision == "auto"


def test_a_bf16_reward_model_scores_float32_inputs(tmp_path):
    """A DeepSpeed bf16 engine casts the reward model's weights: the trainer feeds inputs (and noise-aware
    times) in the weights' dtype and returns float32 scores (found on a GPU)."""
    from rlflow.data.preferences import save_preferences
    from rlflow.trainers.reward_model import RewardModelTrainer
    from tests.test_reward_model import _config, _image_set

    save_preferences(_image_set(16, seed=0), tmp_path / "prefs")
    for noise_aware in (False, True):
        trainer = RewardModelTrainer(_config(tmp_path, noise_aware=noise_aware, eval_train_pairs=0))
        trainer.model.to(torch.bfloat16)
        r_a, r_b, _ = trainer.score_set(trainer.heldout_set, seed=0)
        assert r_a.dtype == r_b.dtype == torch.float32 and torch.isfinite(r_a).all()
