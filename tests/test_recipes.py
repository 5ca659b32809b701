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
}


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
def test_recipe_runs_through_the_cli(recipe, tmp_path):
    command = _declared_command(recipe)
    out = tmp_path / "run"
    result = _rlflow(
        command, "--config", str(recipe.relative_to(ROOT)), "--output_dir", str(out), *TINY[command]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if command == "pretrain":
        assert summary["steps"] == 12
        assert [r["step"] for r in rows if "train/loss" in r] == [3, 6, 9, 12]
    else:
        assert summary["final_return_mean"] > 0 and summary["env_steps"] > 0
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert all(r["train/first_log_ratio_max"] < 1e-4 for r in rows[1:])
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)
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
