"""DeepSpeed ZeRO-2 / ZeRO-3 runs of the generative trainers on two CPU processes (gloo), launched through
``accelerate launch`` with the shipped configs in ``recipes/accelerate/``.

Each launch takes ~20-30 s here (imports in two processes; the first DeepSpeed init also compiles its
shared-memory op once, ~50 s, cached in ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

from rlflow.testing import build_tiny_sd3_pipeline  # noqa: E402
from rlflow.utils.checkpoint import load_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

_PORTS = iter(range(29620, 29700))


def _env(**extra: str) -> dict[str, str]:
    # One torch thread per process (2 processes on 2 cores); DeepSpeed on the CPU accelerator.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **extra}


def launch(config: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file recipes/accelerate/<config>.yaml <args>`` on two CPU processes."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"),
        "--main_process_port", str(next(_PORTS)),
        *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distributed")
    pipeline = build_tiny_sd3_pipeline(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\na blue circle\ntwo green triangles\na yellow star\n")
    return pipeline, prompts


@pytest.fixture(scope="module")
def single_process_update(tiny_world, tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("single")
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "distributed_update.py"), str(out), *map(str, tiny_world)],
        env=_env(),
        check=True,
        capture_output=True,
        timeout=300,
        cwd=ROOT,
    )
    return json.loads((out / "result.json").read_text()), load_state_dict(out / "weights.safetensors")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_update_matches_a_single_process_on_the_same_data(
    stage, tiny_world, single_process_update, tmp_path
):
    """Two ranks, each with half of the groups of one fixed batch, take two GRPO updates under ZeRO-`stage`;
    the loss (mean over ranks), the global gradient norm and the updated weights equal one process's on
    the whole batch: DeepSpeed reduces, clips and steps exactly as the plain optimizer does."""
    launch(
        f"zero{stage}", str(ROOT / "tests" / "distributed_update.py"), str(tmp_path), *map(str, tiny_world)
    )
    single, single_weights = single_process_update
    sharded = json.loads((tmp_path / "result.json").read_text())
    assert sharded["mode"] == f"zero{stage}" and sharded["processes"] == 2
    assert single["mode"] == "single"
    assert sharded["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
    assert sharded["kl"] == pytest.approx(single["kl"], rel=1e-3)
    # The second update's policy loss is ~1e-5: compare it on the scale of the KL-free loss itself.
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-2)
    weights = load_state_dict(tmp_path / "weights.safetensors")
    assert set(weights) == set(single_weights)
    for name, value in weights.items():
        torch.testing.assert_close(value, single_weights[name], rtol=0, atol=1e-6)
    moved = max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k)
    assert moved > 1e-4  # LoRA B starts at 0: the update did move the adapters


def _grpo_args(pipeline: Path, prompts: Path, out: Path, iterations: int) -> list[str]:
    return [
        "-m", "rlflow", "grpo", "--model.path", str(pipeline), "--prompts", str(prompts),
        "--rewards", "{brightness: 1.0}", "--iterations", str(iterations), "--prompts_per_iteration", "2",
        "--group_size", "2", "--num_steps", "4", "--eval_num_steps", "4", "--num_eval_prompts", "2",
        "--model.lora_r", "4", "--model.lora_alpha", "4", "--learning_rate", "1e-2", "--ema_decay", "0.5",
        "--save_steps", "1", "--eval_steps", "1", "--output_dir", str(out), "--report_to", "none",
    ]  # fmt: skip


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_grpo_run_stays_in_sync_resumes_and_saves_full_weights(stage, tiny_world, tmp_path):
    """`rlflow grpo` under ZeRO-`stage` (with EMA): both ranks end with the same weights; a run stopped
    after one iteration and resumed from its sharded checkpoint ends exactly where an uninterrupted run
    does; and `save_pretrained` writes the full (gathered) LoRA weights, loadable in one process."""
    pipeline, prompts = tiny_world
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(f"zero{stage}", *_grpo_args(pipeline, prompts, straight, iterations=2))
    launch(f"zero{stage}", *_grpo_args(pipeline, prompts, resumed, iterations=1))
    launch(f"zero{stage}", *_grpo_args(pipeline, prompts, resumed, iterations=2))

    summary = json.loads((straight / "summary.json").read_text())
    assert summary["distributed"] == {"mode": f"zero{stage}", "processes": 2}
    first, second = summary["process_param_checksums"]
    assert first == second

    checkpoint = straight / "checkpoints" / "step_00000002"
    assert {"rank_0.pt", "rank_1.pt", "deepspeed", "trainable.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }
    raw_straight = load_state_dict(checkpoint / "trainable.safetensors")
    raw_resumed = load_state_dict(resumed / "checkpoints" / "step_00000002" / "trainable.safetensors")
    for name, value in raw_straight.items():  # equal up to float32 summation order
        torch.testing.assert_close(raw_resumed[name], value, rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]  # the resumed run continued at iteration 2

    # The saved model: full-size LoRA tensors (not ZeRO-3 shards), the EMA of both runs identical.
    from rlflow.generators.diffusers_flow import LORA_WEIGHT_NAME

    saved = load_state_dict(straight / "model" / LORA_WEIGHT_NAME)
    saved_resumed = load_state_dict(resumed / "model" / LORA_WEIGHT_NAME)
    assert len(saved) == len(raw_straight)
    full_shapes = sorted(tuple(v.shape) for v in raw_straight.values())
    assert sorted(tuple(v.shape) for v in saved.values()) == full_shapes
    for name, value in saved.items():
        torch.testing.assert_close(saved_resumed[name], value, rtol=1e-5, atol=1e-6)
    ema_moved = max(float(v.abs().max()) for k, v in saved.items() if "lora_B" in k)
    assert ema_moved > 0


def _online_args(trainer: str, pipeline: Path, prompts: Path, out: Path) -> list[str]:
    return [
        "-m", "rlflow", trainer, "--model.path", str(pipeline), "--prompts", str(prompts),
        "--rewards", "{brightness: 1.0}", "--iterations", "2", "--prompts_per_iteration", "2",
        "--samples_per_prompt", "2", "--num_steps", "4", "--eval_num_steps", "4", "--num_eval_prompts", "2",
        "--minibatch_size", "4", "--model.lora_r", "4", "--model.lora_alpha", "4",
        "--output_dir", str(out), "--report_to", "none",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("trainer", "stage"), [("dpo", 3), ("rwr", 2), ("actor-critic", 2), ("nft", 2), ("reward-model", 3)]
)
def test_every_generative_trainer_runs_under_zero(trainer, stage, tiny_world, tmp_path):
    """dpo (online pairs), rwr, actor-critic (its critic outside the engine, gradients averaged by hand), nft
    (its old policy a soft copy of each rank's trainable tensors) and reward-model (each rank trains on its share of every batch) finish under two-process ZeRO with the
    replicas in sync and a full-size saved model."""
    pipeline, prompts = tiny_world
    out = tmp_path / "run"
    if trainer == "reward-model":
        from rlflow.data.preferences import save_preferences
        from tests.test_reward_model import _segment_set

        save_preferences(_segment_set(48, seed=1), tmp_path / "prefs")
        args = [
            "-m", "rlflow", "reward-model", "--data_dir", str(tmp_path / "prefs"), "--output_dir", str(out),
            "--steps", "6", "--batch_size", "8", "--warmup_steps", "1", "--logging_steps", "2", "--eval_steps", "3",
            "--save_steps", "3", "--report_to", "none", "--plot_curves", "false",
        ]  # fmt: skip
    else:
        args = _online_args(trainer, pipeline, prompts, out)
        if trainer == "dpo":
            args += ["--mode", "online"]
        if trainer == "actor-critic":
            args += ["--critic_warmup_iterations", "1", "--critic_minibatch_size", "4"]
    launch(f"zero{stage}", *args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"] == {"mode": f"zero{stage}", "processes": 2}
    first, second = summary["process_param_checksums"]
    assert first == pytest.approx(second, rel=1e-6)
    model_dir = out / "model"
    weights = [p for p in model_dir.rglob("*.safetensors")]
    assert weights and all(load_state_dict(p) for p in weights)
    if trainer == "reward-model":
        from rlflow.reward_models.learned import load_reward_model

        load_reward_model(model_dir)  # the gathered weights load into a fresh single-process model
