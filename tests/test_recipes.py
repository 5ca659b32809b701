"""Every recipe runs end to end through the `rlflow` CLI with a tiny budget.

The first recipe of each command runs as a real subprocess (``python -m rlflow ...``, the CLI as a user starts
it); the others call the same ``rlflow.cli.main`` in this process, which parses, validates and runs exactly as
the subprocess does without paying ~4 s of interpreter and import start-up each."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# recipes/accelerate/ holds accelerate launch configs, not rlflow recipes (tested below).
ALL_RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
# The four Meta-World pipelines differ only in their task, noise level and paths: button_press's recipes run
# through the CLI below, the other tasks' are loaded, validated and compared with them (saves ~2 minutes).
MANIPULATION_TWINS = [
    p for p in ALL_RECIPES if p.parent.name == "manipulation" and not p.name.startswith("button_press_")
]
RECIPES = [p for p in ALL_RECIPES if p not in MANIPULATION_TWINS]
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
# Tiny budgets per command: enough to exercise every stage (train, eval, checkpoint, outputs).
TINY = {
    "pretrain": [
        "--steps",
        "12",
        "--warmup_steps",
        "2",
        "--eval_steps",
        "6",
        "--logging_steps",
        "3",
        "--save_steps",
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
        "--eval_steps",
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
        "--steps", "4", "--warmup_steps", "1", "--batch_size", "8", "--logging_steps", "2", "--eval_steps", "4",
        "--save_steps", "4", "--eval_prompts", "4", "--eval_samples_per_prompt", "1",
        "--eval_num_steps", "2", "--eval_loss_samples", "8", "--grid_size", "4", "--plot_curves", "false",
        "--latent_cache_size", "64",  # VAE recipes encode a small cache (pixel recipes ignore it)
    ],
    "pretrain-vae": [
        "--steps", "4", "--warmup_steps", "1", "--batch_size", "8", "--logging_steps", "2", "--eval_steps", "4",
        "--save_steps", "4", "--eval_images", "8", "--calibration_images", "16", "--grid_size", "2",
    ],
    "grpo": [
        "--iterations", "2", "--prompts_per_iteration", "2", "--group_size", "2", "--num_steps", "3",
        "--eval_num_steps", "3", "--num_eval_prompts", "4", "--eval_steps", "1", "--save_steps", "1",
        "--minibatch_size", "8", "--sample_chunk_size", "8", "--grid_size", "4",
    ],
    "preferences": ["--num_pairs", "8", "--num_steps_choices", "[1, 2]", "--grid_pairs", "2"],
    "segment-preferences": [
        "--episodes", "[1, 1, 1]", "--num_envs", "1", "--max_episode_steps", "60", "--segment_length", "10",
        "--num_pairs", "16",
    ],
    "reward-model": [
        "--steps", "6", "--warmup_steps", "1", "--eval_steps", "3", "--logging_steps", "2", "--save_steps", "3",
        "--batch_size", "16",
    ],
    "dpo": [
        "--iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--num_steps", "2",
        "--pairs_per_iteration", "4", "--eval_num_steps", "2", "--num_eval_prompts", "4", "--eval_steps", "1",
        "--save_steps", "1", "--minibatch_size", "8", "--sample_chunk_size", "8", "--grid_size", "4",
        "--plots", "false",
    ],
    "rwr": [
        "--iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--num_steps", "3",
        "--eval_num_steps", "3", "--num_eval_prompts", "4", "--eval_steps", "1", "--save_steps", "1",
        "--minibatch_size", "4", "--sample_chunk_size", "8", "--grid_size", "4",
    ],
    "nft": [
        "--iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--num_steps", "3",
        "--eval_num_steps", "3", "--num_eval_prompts", "4", "--eval_steps", "1", "--save_steps", "1",
        "--minibatch_size", "2", "--sample_chunk_size", "8", "--grid_size", "4",
    ],
    "actor-critic": [
        "--iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--num_steps", "3",
        "--eval_num_steps", "3", "--num_eval_prompts", "4", "--eval_steps", "1", "--save_steps", "1",
        "--minibatch_size", "4", "--sample_chunk_size", "8", "--grid_size", "4", "--critic_warmup_iterations", "1",
    ],
    "eval": ["--episodes", "1", "--max_episode_steps", "30", "--video", "false"],
    "sample": ["--num_prompts", "2", "--samples_per_prompt", "2", "--num_steps", "3", "--grid_size", "2"],
}  # fmt: skip


@pytest.fixture(scope="module")
def recipe_inputs(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins for what the upstream recipes of a pipeline write (preference sets, reward models)."""
    from rlflow.reward_models.learned import RewardModelConfig, build_reward_model, save_reward_model

    from rlflow.data.collect import collect_demonstrations
    from rlflow.data.preferences import PreferenceSet, save_preferences

    root = tmp_path_factory.mktemp("recipe_inputs")
    g = torch.Generator().manual_seed(0)
    n = 16
    latents = torch.randn(2, n, 3, 32, 32, generator=g).clamp(-1, 1)
    images = PreferenceSet(
        kind="image",
        dimensions=["alignment", "quality"],
        prompts=["a red circle"] * n,
        a=(latents[0] + 1) / 2,
        b=(latents[1] + 1) / 2,
        labels=torch.randint(0, 3, (n, 2), generator=g),
        latents_a=latents[0],
        latents_b=latents[1],
    )
    hopper_obs, hopper_act = 11, 3
    segments = PreferenceSet(
        kind="segment",
        dimensions=["return"],
        prompts=[""] * n,
        a=torch.randn(n, 5, hopper_obs + hopper_act, generator=g),
        b=torch.randn(n, 5, hopper_obs + hopper_act, generator=g),
        labels=torch.randint(0, 3, (n, 1), generator=g),
        meta={"obs_dim": hopper_obs, "act_dim": hopper_act},
    )
    tiny = {"conv_channels": [4], "hidden_dim": 8, "text_dim": 8, "text_buckets": 64, "time_dim": 8}
    noise_aware = build_reward_model(
        RewardModelConfig(kind="image", dimensions=["alignment", "quality"], noise_aware=True, **tiny)
    )
    segment_model = build_reward_model(
        RewardModelConfig(
            kind="segment", dimensions=["return"], obs_dim=hopper_obs, act_dim=hopper_act, hidden_dim=8
        )
    )
    paths = {
        # The Walker2d / HalfCheetah / Ant demonstrations are not shipped (their collect recipes write them).
        **{
            f"robotics/{task}_pretrain.yaml": collect_demonstrations(
                ROOT / f"recipes/robotics/artifacts/{task}_medium_gaussian",
                task,
                episodes=2,
                num_envs=2,
                max_episode_steps=30,
            ).save_npz(root / f"{task}_medium.npz")
            for task in ("walker2d", "halfcheetah", "ant")
        },
        "manipulation/button_press_pretrain.yaml": collect_demonstrations(
            "scripted", "button_press", episodes=2, num_envs=2, max_episode_steps=30, action_noise_std=1.0
        ).save_npz(root / "button_press_demos.npz"),
        "image_preferences": save_preferences(images, root / "image_preferences"),
        "segment_preferences": save_preferences(segments, root / "segment_preferences"),
        "noise_aware_model": save_reward_model(noise_aware, root / "noise_aware_model"),
        "segment_model": save_reward_model(segment_model, root / "segment_model"),
    }
    return {k: Path(v) for k, v in paths.items()}


def _input_overrides(recipe: Path, inputs: dict[str, Path]) -> list[str]:
    """Point a recipe that consumes an upstream recipe's output at the tiny stand-in."""
    name = str(recipe.relative_to(ROOT / "recipes"))
    if name.startswith("reward_models/shapes_reward_model"):  # renderer pretraining: a few steps, not 500
        return [
            "--data_dir",
            str(inputs["image_preferences"]),
            "--pretrain_steps",
            "2",
            "--pretrain_batch_size",
            "4",
        ]
    if name == "reward_models/hopper_reward_model.yaml":
        return ["--data_dir", str(inputs["segment_preferences"])]
    if name == "alignment/shapes_dpo_offline.yaml":
        return ["--preferences", str(inputs["image_preferences"])]
    if name in inputs:  # keyed by the recipe that reads it (the unshipped robotics demonstrations)
        return ["--data.path", str(inputs[name])]
    if name == "robotics/hopper_reinflow_learned_reward.yaml":
        return ["--learned_reward", str(inputs["segment_model"])]
    if name == "alignment/shapes_nrg.yaml":
        model = inputs["noise_aware_model"]
        return ["--guidance", f"[{{path: {model}, head: alignment, weight: 1.0}}]"]
    return []


def _rlflow(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlflow", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


#: Commands whose CLI already ran as a subprocess in this session (the rest of their recipes run in-process).
_SUBPROCESS_SEEN: set[str] = set()


@pytest.fixture
def run_recipe_cli(caplog, capsys, monkeypatch):
    """``run(*argv) -> (exit status, rlflow's log lines, stderr)``: a subprocess for a command's first recipe,
    ``rlflow.cli.main`` in this process (from the repository root, torch's thread count restored) after."""

    def run(*argv: str) -> tuple[int, list[str], str]:
        if argv[0] not in _SUBPROCESS_SEEN:
            _SUBPROCESS_SEEN.add(argv[0])
            result = _rlflow(*argv)
            lines = [m.group(2) for m in map(_LOG_LINE.match, result.stderr.splitlines()) if m]
            return result.returncode, lines, result.stderr
        from rlflow.cli import main

        monkeypatch.chdir(ROOT)
        threads = torch.get_num_threads()
        caplog.clear()
        try:
            with caplog.at_level(logging.INFO):
                code = main(list(argv))
        finally:
            torch.set_num_threads(threads)
        records = [r for r in caplog.records if r.name.startswith("rlflow") and r.levelno == logging.INFO]
        lines = [r.getMessage() for r in records]
        return code, lines, capsys.readouterr().err

    return run


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO (rlflow[\w.]*): (.*)$")


def _assert_done_line(stderr: str) -> None:
    """Every command's last log line (of rlflow's INFO lines) is its human-readable summary: 'done: ...'."""
    lines = [m.group(2) for m in map(_LOG_LINE.match, stderr.splitlines()) if m]
    _assert_done(lines)


def _assert_done(lines: list[str]) -> None:
    assert lines and lines[-1].startswith("done: "), lines[-3:]


def _model_type(directory: Path) -> str:
    """The ``model_type`` of a saved model (every rlflow model directory has the same ``config.json``)."""
    return json.loads((directory / "config.json").read_text())["model_type"]


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
    model = yaml.safe_load(recipe.read_text()).get("model")
    model_path = model.get("path") if isinstance(model, dict) else model
    if command not in ("grpo", "nft") or model_path is None or (ROOT / model_path).exists():
        return []
    from rlflow.testing import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(tmp_path / "tiny_pipeline")
    return ["--model.path", str(pipe), "--model.resolution", "null", "--model.dtype", "float32"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_runs_through_the_cli(recipe, tmp_path, recipe_inputs, run_recipe_cli):
    command = _declared_command(recipe)
    if command == "collect":  # writes a dataset, not a run directory
        output = tmp_path / "demos.npz"
        code, lines, stderr = run_recipe_cli(
            "collect", "--config", str(recipe.relative_to(ROOT)), "--output", str(output),
            "--episodes", "2", "--num_envs", "2", "--max_episode_steps", "30",
        )  # fmt: skip
        assert code == 0, stderr[-3000:]
        _assert_done(lines)
        with np.load(output) as data:
            assert len(np.unique(data["episode_ids"])) == 2
        return
    out = tmp_path / "run"
    code, lines, stderr = run_recipe_cli(
        command,
        "--config",
        str(recipe.relative_to(ROOT)),
        "--output_dir",
        str(out),
        *TINY[command],
        *_hub_model_override(recipe, command, tmp_path),
        *_input_overrides(recipe, recipe_inputs),
    )
    assert code == 0, stderr[-3000:]
    _assert_done(lines)
    summary = json.loads((out / "summary.json").read_text())
    if command == "segment-preferences":  # a data-building command: no training curve to log
        assert summary["pairs"] == 16 and (out / "pairs.jsonl").is_file()
        return
    if command == "sample":
        assert summary["num_samples"] == 4 and (out / "grid.png").is_file()
        return
    if command == "eval":
        assert summary["episodes"] == 1 and np.isfinite(summary["return_mean"])
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert yaml.safe_load((out / "config.yaml").read_text())["output_dir"] == str(out)
    if command == "grpo":
        assert summary["iterations"] == 2 and summary["nfe"] > 0
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert all(r["train/first_log_ratio_per_element"] < 1e-4 for r in rows[1:])
        assert _model_type(out / "model") == "rlflow.DiffusersFineTune"
        assert (out / "images" / "eval_00002.png").is_file()
        return
    if command in ("dpo", "rwr", "actor-critic", "nft"):
        assert summary["iterations"] == 2
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert _model_type(out / "model") == "rlflow.DiffusersFineTune"
        assert (out / "images" / "eval_00002.png").is_file()
        if command == "actor-critic":
            assert (out / "critic" / "critic.safetensors").is_file()
        return
    if command == "preferences":
        assert summary["num_pairs"] == 8
        assert (out / "pairs.jsonl").is_file()
        return
    if command == "reward-model":
        assert _model_type(out / "model") == "rlflow.RewardModel"
        assert any(key.startswith("eval") for r in rows for key in r)
        return
    if command == "pretrain-vae":
        assert summary["steps"] == 4 and 0.0 <= summary["verifier_accuracy"] <= 1.0
        assert (out / "final" / "config.json").is_file()
        return
    if command == "pretrain-t2i":
        assert _model_type(out / "final") == "rlflow.ShapesModel"
        assert any("eval/accuracy" in r for r in rows)
        return
    if command == "pretrain":
        assert summary["steps"] == 12
        assert [r["step"] for r in rows if "train/loss" in r] == [3, 6, 9, 12]
    else:
        # Sparse manipulation rewards: a 2-episode evaluation may well see no success.
        minimum = 0 if recipe.parent.name == "manipulation" else 1e-12
        assert summary["final_return_mean"] >= minimum and summary["env_steps"] > 0
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert all(r["train/first_log_ratio_max"] < 1e-4 for r in rows[1:])
    assert (out / "policy" / "model.safetensors").is_file()
    assert list((out / "plots").glob("*.png"))


@pytest.mark.parametrize("recipe", MANIPULATION_TWINS, ids=[p.name for p in MANIPULATION_TWINS])
def test_manipulation_recipes_are_button_press_ones_for_their_task(recipe):
    import importlib

    from rlflow.cli import COMMANDS
    from rlflow.config import config_from_dict, config_to_dict, load_yaml

    task = recipe.name.rsplit("_", 1)[0]
    twin = recipe.with_name(recipe.name.replace(task, "button_press"))
    command = _declared_command(recipe)
    assert command == _declared_command(twin)
    module, name = COMMANDS[command].config.split(":")
    config_class = getattr(importlib.import_module(module), name)
    ours = config_to_dict(config_from_dict(config_class, load_yaml(recipe), source=str(recipe)))
    theirs = config_to_dict(config_from_dict(config_class, load_yaml(twin), source=str(twin)))
    differing = {key for key in ours if ours[key] != theirs[key]}
    allowed = {"task", "output", "output_dir", "pretrained", "policy", "action_noise_std", "data", "iterations"}
    assert differing <= allowed, differing
    for key in differing - {"action_noise_std", "iterations"}:  # every path and name is this task's
        assert task in json.dumps(ours[key]), (key, ours[key])
    if "pretrained" in ours:
        assert (ROOT / ours["pretrained"] / "model.safetensors").is_file()


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


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_launch_configs_load(path):
    """The shipped launch configs parse as accelerate configs with the sharding their names promise (the
    two-process runs in tests/test_distributed.py launch with them)."""
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = {"single_process": "NO", "multi_gpu": "MULTI_GPU"}.get(path.stem, "DEEPSPEED")
    assert str(config.distributed_type).split(".")[-1] == expected
    if expected == "DEEPSPEED":
        stage = 3 if path.stem.startswith("zero3") else 2
        assert config.deepspeed_config["zero_stage"] == stage
        offload = config.deepspeed_config["offload_optimizer_device"]
        assert offload == ("cpu" if "offload" in path.stem else "none")
