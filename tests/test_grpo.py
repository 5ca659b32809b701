"""GRPO trainer: a full tiny SD3 pipeline end to end, learning on a pixel-space model, variants, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from rlflow.flows.time import time_grid  # noqa: E402
from rlflow.generators.diffusers_flow import DiffusersFlowModel  # noqa: E402
from rlflow.generators.families import PromptEmbeddings  # noqa: E402
from rlflow.rollout.prompts import FilePrompts  # noqa: E402
from rlflow.testing import TINY_JOINT_DIM, TINY_POOLED_DIM, build_tiny_sd3_pipeline, tiny_sd3_transformer  # noqa: E402
from rlflow.trainers.grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from tests.toy_t2i import brightness, prompt_vector  # noqa: E402

PROMPTS = ["a cat", "a dog", "a red car", "a blue house"]


class HashPromptEncoder:
    """Fixed pseudo-embeddings per prompt with the tiny SD3 transformer's widths."""

    def __call__(self, prompts):
        hidden = torch.stack(
            [prompt_vector(p, 3 * TINY_JOINT_DIM).reshape(3, TINY_JOINT_DIM) for p in prompts]
        )
        pooled = torch.stack([prompt_vector(p + "/pooled", TINY_POOLED_DIM) for p in prompts])
        return PromptEmbeddings(hidden_states=hidden, pooled=pooled)


def pixel_model(seed: int = 0) -> DiffusersFlowModel:
    """A tiny SD3 transformer on 3x8x8 images (no VAE)."""
    return DiffusersFlowModel(
        tiny_sd3_transformer(seed, in_channels=3, sample_size=8), HashPromptEncoder(), latent_shape=(3, 8, 8)
    )


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def tiny_config(tmp_path: Path, prompt_file: Path, **overrides) -> GRPOConfig:
    values = dict(
        output_dir=str(tmp_path / "run"),
        prompts=str(prompt_file),
        rewards={"brightness": 1.0},
        iterations=2,
        prompts_per_iteration=2,
        group_size=4,
        num_steps=4,
        eval_num_steps=4,
        num_eval_prompts=4,
        allow_eval_overlap=True,  # four prompts: the evaluation prompts are the training prompts here
        eval_steps=1,
        save_steps=1,
        minibatch_size=16,
        report_to="none",
        num_threads=2,
    )
    values.update(overrides)
    values["model"] = values.get("model") or GRPOConfig().model
    return GRPOConfig(**values)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_on_a_saved_tiny_sd3_pipeline(tmp_path, prompt_file):
    """The real loading path: a full StableDiffusion3Pipeline on disk -> LoRA GRPO -> saved adapters."""
    from rlflow.generators.loading import load_text_to_image_model
    from rlflow.trainers.text_to_image import ModelConfig

    pipe = build_tiny_sd3_pipeline(tmp_path / "pipe")
    config = tiny_config(
        tmp_path, prompt_file, model=ModelConfig(path=str(pipe), lora_r=4, lora_alpha=4.0)
    )
    trainer = GRPOTrainer(config)
    # time_grid: auto -> an SD3 pipeline samples (and is re-scored) on the grid StableDiffusion3Pipeline uses.
    assert trainer.model.native_time_grid == "sd3"
    torch.testing.assert_close(trainer.times, time_grid(config.num_steps, shift=config.time_shift, kind="sd3"))
    summary = trainer.train()
    run = Path(config.output_dir)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["train/first_log_ratio_per_element"] < 1e-4 for r in rows[1:])  # ratio 1 on that grid too
    assert summary["iterations"] == 2 and summary["nfe"] > 0
    assert (run / "images" / "eval_00002.png").is_file() and list((run / "plots").glob("*.png"))
    # The saved adapters reload onto the base pipeline and reproduce the trained velocity.
    reloaded = load_text_to_image_model(summary["model_dir"])
    x, t = torch.randn(2, *trainer.model.latent_shape), torch.tensor([0.3, 0.8])
    cond = trainer.model.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.velocity(x, t, cond), trainer.model.velocity(x, t, cond))


@pytest.mark.slow
def test_grpo_raises_the_reward(tmp_path, prompt_file):
    """Flow-GRPO (full fine-tune, KL to the frozen copy) on a pixel-space tiny model makes images brighter.

    (LoRA on the attention projections of this 2-layer, 16-wide model barely moves its output: a global
    brightness shift is not something attention adapters express; real models are a different matter.)"""
    config = tiny_config(
        tmp_path,
        prompt_file,
        iterations=12,
        eval_steps=12,
        save_steps=12,
        prompts_per_iteration=4,
        num_eval_prompts=4,
        minibatch_size=32,
        learning_rate=1e-3,
        kl_beta=0.01,
        clip_range=1e-3,
        seed=1,
    )
    config.model.lora_r = 0
    prompts = FilePrompts(str(prompt_file), num_eval=4)
    summary = GRPOTrainer(config, model=pixel_model(), reward=brightness, prompts=prompts).train()
    rows = _rows(Path(config.output_dir))
    rollout = [r["rollout/reward_mean"] for r in rows[1:]]
    assert summary["final_reward_mean"] > summary["base_reward_mean"] + 0.015, summary
    assert sum(rollout[-3:]) / 3 > sum(rollout[:3]) / 3


@pytest.mark.parametrize("variant", ["fast", "tempflow"])
def test_variants_run_with_ratio_one(tmp_path, prompt_file, variant):
    config = tiny_config(tmp_path, prompt_file, variant=variant, window_size=2, branch_steps=[0, 2])
    prompts = FilePrompts(str(prompt_file), num_eval=4)
    trainer = GRPOTrainer(config, model=pixel_model(), reward=brightness, prompts=prompts)
    trainer.train()
    rows = _rows(Path(config.output_dir))
    assert all(r["train/first_log_ratio_per_element"] < 1e-4 for r in rows[1:])
    if variant == "fast":  # only the window's 2 steps are trained: 8 samples x 2
        assert rows[1]["train/transitions"] == 16
    else:  # 2 prompts x 2 branch steps x 4 siblings, one transition each
        assert rows[1]["train/transitions"] == 16


def test_noise_aware_weights_and_window_schedules(tmp_path, prompt_file):
    config = tiny_config(tmp_path, prompt_file, variant="tempflow", num_steps=6)
    trainer = GRPOTrainer(
        config, model=pixel_model(), reward=brightness, prompts=FilePrompts(str(prompt_file))
    )
    steps = torch.tensor([0, 1, 2, 3, 4, 5])
    weights = trainer._noise_aware_weights(steps)
    assert weights.mean().item() == pytest.approx(1.0)
    # sigma_t * sqrt(dt) = a * sqrt((1 - t) / t) * sqrt(dt) (t = 0 replaced by the next grid point).
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    t_eff = torch.where(t[:-1] > 0, t[:-1], t[1:])
    expected = torch.sqrt((1 - t[:-1]) / t_eff) * torch.sqrt(t[1:] - t[:-1])
    torch.testing.assert_close(weights.double(), expected / expected.mean(), rtol=1e-5, atol=1e-6)
    assert config.resolved_branch_steps() == [0, 1, 3, 4]  # evenly over [0, 3K/4]
    assert GRPOConfig(num_steps=10).resolved_branch_steps() == [0, 2, 5, 7]
    sliding = GRPOConfig(
        variant="fast", num_steps=10, window_size=2, window_schedule="sliding", window_shift_every=3
    )
    starts = [sliding.window_start(i, torch.Generator()) for i in range(21)]
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 0, 0, 0]


def test_resume_gives_the_same_weights(tmp_path, prompt_file):
    def run(out: Path, iterations: int) -> GRPOTrainer:
        config = tiny_config(
            tmp_path, prompt_file, output_dir=str(out), iterations=iterations, eval_steps=100
        )
        trainer = GRPOTrainer(
            config, model=pixel_model(), reward=brightness, prompts=FilePrompts(str(prompt_file))
        )
        trainer.train()
        return trainer

    straight = run(tmp_path / "straight", 3)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 3)
    for a, b in zip(straight.trainable, resumed.trainable, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["step"] for r in _rows(tmp_path / "resumed")] == [0, 1, 2, 3]


def test_bad_inputs_are_config_errors(tmp_path, prompt_file):
    from rlflow.config import ConfigError

    with pytest.raises(ConfigError, match="group_size"):
        tiny_config(tmp_path, prompt_file, group_size=1)
    with pytest.raises(ConfigError, match="branch_steps"):
        tiny_config(tmp_path, prompt_file, branch_steps=[9])
    with pytest.raises(ConfigError, match="shared_noise"):
        tiny_config(tmp_path, prompt_file, variant="tempflow", shared_noise=True)
    with pytest.raises(ConfigError, match="rewards"):
        GRPOTrainer(tiny_config(tmp_path, prompt_file, rewards={"brightnes": 1.0}), model=pixel_model())
    with pytest.raises(ConfigError, match="prompts"):
        GRPOTrainer(
            tiny_config(tmp_path, prompt_file, prompts=str(tmp_path / "none.txt")), model=pixel_model()
        )


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_in_sync(tmp_path, prompt_file):
    """`torchrun --nproc_per_node 2` (accelerate on CPU processes, gloo): each rank samples its own groups,
    DDP averages gradients, and the trained weights stay identical on both ranks."""
    import os
    import subprocess
    import sys

    pipe = build_tiny_sd3_pipeline(tmp_path / "pipe")
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "rlflow", "grpo", "--model.path", str(pipe), "--prompts", str(prompt_file),
        "--rewards", "{brightness: 1.0}", "--iterations", "2", "--prompts_per_iteration", "2",
        "--group_size", "2", "--num_steps", "4", "--eval_num_steps", "4", "--num_eval_prompts", "2",
        "--model.lora_r", "4", "--learning_rate", "1e-2", "--output_dir", str(out), "--report_to", "none",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    first, second = summary["process_param_checksums"]
    assert first == second
    # ... and training did move the adapters (LoRA B starts at zero: a checksum of A only would not move).
    rows = _rows(out)
    assert rows[-1]["train/grad_norm"] > 0


def test_grpo_with_a_remote_reward_server(tmp_path, prompt_file):
    """Rewards computed by another process's HTTP server give the same training as the local reward."""
    from rlflow.reward_models import Brightness, RewardServer, RewardServerError

    from rlflow.trainers.text_to_image import build_reward

    with RewardServer(Brightness(), port=0) as server:
        config = tiny_config(
            tmp_path, prompt_file, iterations=1, rewards={"remote": {"url": server.url, "weight": 1.0}}
        )
        prompts = FilePrompts(str(prompt_file), num_eval=4)
        summary = GRPOTrainer(config, model=pixel_model(), prompts=prompts).train()
    local = tiny_config(
        tmp_path, prompt_file, iterations=1, output_dir=str(tmp_path / "local"), rewards={"brightness": 1.0}
    )
    local_summary = GRPOTrainer(local, model=pixel_model(), prompts=prompts).train()
    # Images travel as uint8, so the remote reward sees 8-bit-rounded pixels: equal to ~1/255.
    assert abs(summary["final_reward_mean"] - local_summary["final_reward_mean"]) < 5e-3
    # An unreachable server fails before any training, naming the URL.
    with pytest.raises(RewardServerError, match="127.0.0.1:9"):
        build_reward({"remote": {"url": "http://127.0.0.1:9", "timeout_s": 0.5, "retries": 0}})


def test_a_reward_that_never_separates_a_group_stops_the_run(tmp_path, prompt_file):
    from rlflow.config import ConfigError

    config = tiny_config(tmp_path, prompt_file, iterations=6, max_flat_iterations=2, save_steps=100)
    trainer = GRPOTrainer(
        config, model=pixel_model(), reward=lambda images, prompts: torch.ones(len(prompts))
    )
    with pytest.raises(ConfigError, match="no learning signal: every group scored the same for 2 iterations"):
        trainer.train()
    assert [row["step"] for row in _rows(tmp_path / "run")] == [
        0,
        1,
    ]  # the base evaluation, one flat iteration
    with pytest.raises(ConfigError, match="max_flat_iterations"):
        tiny_config(tmp_path, prompt_file, max_flat_iterations=-1)


def test_a_non_finite_loss_stops_before_the_optimizer_step(tmp_path, prompt_file, monkeypatch):
    trainer = GRPOTrainer(
        tiny_config(tmp_path, prompt_file, iterations=1), model=pixel_model(), reward=brightness
    )
    before = [p.detach().clone() for p in trainer.trainable]
    monkeypatch.setattr(trainer, "loss", lambda batch, chunk: (torch.tensor(float("nan")), {}))
    with pytest.raises(FloatingPointError, match="iteration 1"):
        trainer.train()
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.trainable, strict=True))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
