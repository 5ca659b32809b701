"""Every recipe runs end to end through the real `rlflow` CLI (subprocess) with a tiny budget."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
# Tiny budgets per command: enough to exercise every stage (train, eval, checkpoint, outputs).
TINY = {
    "pretrain": [
        "--steps",
        "12",
        "--warmup_steps",
        "2",
        "--eval_every",
        "6",
        "--log_every",
        "3",
        "--checkpoint_every",
        "6",
        "--batch_size",
        "32",
    ],
    "ppo": [
        "--iterations",
        "2",
        "--num_envs",
        "2",
        "--rollout_steps",
        "8",
        "--eval_episodes",
        "2",
        "--eval_every",
        "1",
        "--minibatch_size",
        "8",
        "--update_epochs",
        "1",
        "--critic_warmup_iterations",
        "1",
        "--video",
        "false",
        "--max_episode_steps",
        "100",
    ],
    "pretrain-t2i": [
        "--steps", "4", "--warmup_steps", "1", "--batch_size", "8", "--log_every", "2", "--eval_every", "4",
        "--checkpoint_every", "4", "--eval_prompts", "4", "--eval_samples_per_prompt", "1",
        "--eval_num_steps", "2", "--eval_loss_samples", "8", "--grid_size", "4", "--plot_curves", "false",
    ],
    "grpo": [
        "--iterations", "2", "--prompts_per_iteration", "2", "--group_size", "2", "--num_steps", "3",
        "--eval_num_steps", "3", "--num_eval_prompts", "4", "--eval_every", "1", "--checkpoint_every", "1",
        "--minibatch_size", "8", "--sample_chunk_size", "8", "--grid_size", "4",
    ],
}  # fmt: skip


def _rlflow(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlflow", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _declared_command(recipe: Path) -> str:
    """Every recipe's header shows how to run it: '#   rlflow <command> --config <this file>'."""
    match = re.search(
        r"rlflow (\w[\w-]*) --config " + re.escape(str(recipe.relative_to(ROOT))), recipe.read_text()
    )
    assert match, (
        f"{recipe} must document its command as 'rlflow <command> --config {recipe.relative_to(ROOT)}'"
    )
    return match.group(1)


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def _hub_model_override(recipe: Path, command: str, tmp_path: Path) -> list[str]:
    """Recipes for hub models (e.g. SD3.5) run on a tiny random pipeline of the same class, saved locally."""
    model_path = (yaml.safe_load(recipe.read_text()).get("model") or {}).get("path")
    if command != "grpo" or model_path is None or (ROOT / model_path).exists():
        return []
    from rlflow.testing import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(tmp_path / "tiny_pipeline")
    return ["--model.path", str(pipe), "--model.resolution", "null", "--model.dtype", "float32"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_runs_through_the_cli(recipe, tmp_path):
    command = _declared_command(recipe)
    out = tmp_path / "run"
    result = _rlflow(
        command,
        "--config",
        str(recipe.relative_to(ROOT)),
        "--output_dir",
        str(out),
        *TINY[command],
        *_hub_model_override(recipe, command, tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)
    if command == "grpo":
        assert summary["iterations"] == 2 and summary["nfe"] > 0
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert all(r["train/first_log_ratio_per_element"] < 1e-4 for r in rows[1:])
        assert (out / "model" / "rlflow_diffusers.json").is_file()
        assert (out / "images" / "eval_00002.png").is_file()
        return
    if command == "pretrain-t2i":
        assert (out / "final" / "rlflow_model.json").is_file()
        assert any("eval/accuracy" in r for r in rows)
        return
    if command == "pretrain":
        assert summary["steps"] == 12
        assert [r["step"] for r in rows if "train/loss" in r] == [3, 6, 9, 12]
    else:
        assert summary["final_return_mean"] > 0 and summary["env_steps"] > 0
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert all(r["train/first_log_ratio_max"] < 1e-4 for r in rows[1:])
    assert (out / "policy" / "model.safetensors").is_file()
    assert list((out / "plots").glob("*.png"))


def test_cli_bad_inputs_exit_2_with_a_named_reason(tmp_path):
    recipe = str(ROOT / "recipes/toy/flow_matching_2d.yaml")
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["--config", recipe, "--stepz", "5"], "--stepz"),
        (["--config", recipe, "--steps", "many"], "steps"),
        (["--config", recipe, "--model.kernel", "ddim"], "model.kernel"),
    ]
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("model:\n  hiden_dims: [8]\n")
    cases.append((["--config", str(bad_key)], "model.hiden_dims"))
    for args, named in cases:
        result = _rlflow("pretrain", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert named in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_model_data_mismatch_is_reported_before_training(tmp_path):
    recipe = str(ROOT / "recipes/toy/flow_matching_2d.yaml")
    result = _rlflow(
        "pretrain", "--config", recipe, "--output_dir", str(tmp_path / "r"), "--model.act_dim", "3"
    )
    assert result.returncode == 2
    assert "model.act_dim: 2" in result.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
