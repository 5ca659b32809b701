"""Bad input through the public CLI: exit status 2, a message naming the field, no traceback, no file changed.

Each case runs ``rlflow.cli.main`` in-process (the same function the ``rlflow`` script calls; one real
subprocess at the end checks the script itself) against an output directory that already holds a
user's files, and checks that every one of them is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlflow.cli import COMMANDS, main
from rlflow.config import config_from_dict, validate_config
from rlflow.validation import parse_bounds

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "recipes/toy/flow_matching_2d.yaml")


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def existing_run(tmp_path: Path) -> Path:
    """An output directory a user already has: a finished run's files and a file of their own."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "checkpoints" / "step_00000010" / "model.safetensors").write_bytes(b"weights" * 100)
    (run / "metrics.jsonl").write_text('{"step": 10, "train/loss": 0.5}\n')
    (run / "notes.txt").write_text("my notes\n")
    return run


# (command, arguments, text the error must contain: the field, and for ranges what is allowed)
CASES = [
    ("pretrain", ["--config", TOY, "--learning_rate", "nan"], ["'learning_rate'", "finite"]),
    ("pretrain", ["--config", TOY, "--learning_rate", "-1e-3"], ["'learning_rate'", "> 0", "-0.001"]),
    ("pretrain", ["--config", TOY, "--steps", "-1"], ["'steps'", ">= 1"]),
    ("pretrain", ["--config", TOY, "--weight_decay", "-0.1"], ["'weight_decay'", ">= 0"]),
    ("pretrain", ["--config", TOY, "--ema_decay", "1.5"], ["'ema_decay'", "[0, 1)"]),
    ("pretrain", ["--config", TOY, "--num_threads", "0"], ["'num_threads'", "[1, 1024]"]),
    ("pretrain", ["--config", TOY, "--model.noise_level", "-0.5"], ["'model.noise_level'", ">= 0"]),
    ("pretrain", ["--config", TOY, "--model.hidden_dims", "[64, 0]"], ["'model.hidden_dims[1]'", ">= 1"]),
    ("ppo", ["--max_grad_norm", "0"], ["'max_grad_norm'", "> 0"]),
    ("ppo", ["--gamma", "1.5"], ["'gamma'", "[0, 1]"]),
    ("ppo", ["--clip_range", "-0.2"], ["'clip_range'", "> 0"]),
    ("ppo", ["--actor_lr", "inf"], ["'actor_lr'", "finite"]),
    ("ppo", ["--device", "gpu7"], ["'device'", "cuda:N"]),
    ("grpo", ["--clip_range", "nan"], ["'clip_range'", "finite"]),
    ("grpo", ["--kl_beta", "nan"], ["'kl_beta'", "finite"]),
    ("grpo", ["--group_size", "1"], ["'group_size'", ">= 2"]),
    ("grpo", ["--learning_rate", "0"], ["'learning_rate'", "> 0"]),
    ("nft", ["--learning_rate", "-1e-4"], ["'learning_rate'", "> 0"]),
    ("rwr", ["--temperature", "0"], ["'temperature'", "> 0"]),
    ("dpo", ["--beta", "nan"], ["'beta'", "finite"]),
    ("actor-critic", ["--max_grad_norm", "-1"], ["'max_grad_norm'", "> 0"]),
    ("reward-model", ["--theta", "1"], ["'theta'", "> 1"]),
    ("sample", ["--t_min", "2"], ["'t_min'", "(0, 1)"]),
    ("reward-server", ["--port", "70000"], ["'port'", "[0, 65535]"]),
]


@pytest.mark.parametrize(("command", "args", "named"), CASES, ids=[f"{c[0]} {' '.join(c[1][-2:])}" for c in CASES])
def test_a_bad_value_exits_2_naming_the_field(command, args, named, existing_run, capsys):
    before = _snapshot(existing_run)
    status = main([command, *args, "--output_dir", str(existing_run)] if command != "reward-server" else [command, *args])
    err = capsys.readouterr().err
    assert status == 2, err
    for text in named:
        assert text in err, (text, err)
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err  # one line
    assert _snapshot(existing_run) == before


def test_cuda_on_a_machine_without_it_is_refused(existing_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status = main(["ppo", "--device", "cuda", "--output_dir", str(existing_run)])
    err = capsys.readouterr().err
    assert status == 2 and "'device'" in err and "no CUDA device" in err


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_an_output_dir_that_cannot_be_a_directory_is_refused(where, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me\n")
    target = a_file if where == "file" else a_file / "run"
    status = main(["pretrain", "--config", TOY, "--output_dir", str(target)])
    err = capsys.readouterr().err
    assert status == 2 and "'output_dir'" in err, err
    assert a_file.read_text() == "keep me\n"


def test_an_empty_recipe_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(["pretrain", "--config", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_a_missing_local_model_path_is_not_tried_on_the_hub(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    status = main(["sample", "--model", str(missing), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "does not exist" in err and str(missing) in err


def test_help_with_a_recipe_shows_the_recipe_values(capsys):
    recipe = ROOT / "recipes/alignment/shapes_grpo.yaml"
    assert main(["grpo", "--config", str(recipe), "--help"]) == 0
    out = capsys.readouterr().out
    assert "recipe: " in out and ">= 2" in out  # a recipe value and a declared range


def test_every_numeric_field_of_every_command_declares_its_range():
    """A field without a range would silently accept 0, negative or absurd values: declare one (on the
    field with ``option(..., bounds=...)`` or for a shared name in rlflow/validation.py)."""
    import dataclasses
    import importlib
    import typing

    from rlflow.config import _init_fields, _section_type, field_bounds
    from rlflow.validation import UNBOUNDED_NAMES

    def unbounded(cls: type, prefix: str = ""):
        hints = typing.get_type_hints(cls)
        for f in _init_fields(cls):
            section = _section_type(hints[f.name])
            if section is not None:
                yield from unbounded(section, f"{prefix}{f.name}.")
                continue
            text = str(hints[f.name])
            numeric = ("int" in text or "float" in text) and "Literal" not in text
            if numeric and field_bounds(f) is None and f.name not in UNBOUNDED_NAMES:
                yield prefix + f.name

    missing = []
    for name, command in COMMANDS.items():
        module, cls_name = command.config.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        assert dataclasses.is_dataclass(cls)
        missing += [f"{name}: {key}" for key in unbounded(cls)]
    assert not missing, missing


def test_defaults_are_inside_their_ranges():
    import importlib

    for name, command in COMMANDS.items():
        module, cls_name = command.config.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        if name in ("eval", "collect"):  # required fields (a policy, a task)
            continue
        validate_config(cls())


def test_a_config_built_in_python_is_checked_too():
    from rlflow.config import ConfigError
    from rlflow.trainers.grpo import GRPOConfig

    with pytest.raises(ConfigError, match="learning_rate"):
        GRPOConfig(learning_rate=float("nan"))
    with pytest.raises(ConfigError, match="clip_range"):
        config_from_dict(GRPOConfig, {"clip_range": -1.0})


def test_interval_notation():
    unit = parse_bounds("[0, 1)")
    assert unit.contains(0.0) and unit.contains(0.5) and not unit.contains(1.0) and not unit.contains(-1e-9)
    assert unit.describe() == "in [0, 1)"
    positive = parse_bounds("(0, inf)")
    assert positive.describe() == "> 0" and positive.contains(1e300) and not positive.contains(0)
    for bad in ("[0, 1", "(1, 0)", "[0, inf]", "0..1"):
        with pytest.raises(TypeError):
            parse_bounds(bad)


def test_the_installed_script_ends_with_one_sentence(tmp_path):
    """The real ``rlflow`` entry point (a subprocess), a value argparse used to misread as an option."""
    result = subprocess.run(
        [sys.executable, "-m", "rlflow", "pretrain", "--config", TOY, "--learning_rate", "-1e-3",
         "--output_dir", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("rlflow pretrain: error: command line: 'learning_rate'")
    assert not (tmp_path / "r").exists()


def test_every_shipped_recipe_is_inside_the_declared_ranges():
    import importlib
    import re

    from rlflow.config import parse_config

    recipes = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
    assert recipes
    for recipe in recipes:
        relative = str(recipe.relative_to(ROOT))
        match = re.search(r"rlflow (\w[\w-]*) --config " + re.escape(relative), recipe.read_text())
        assert match, relative
        module, cls_name = COMMANDS[match.group(1)].config.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        # required fields of eval / collect (policy, task) come from the recipe itself
        parse_config(cls, ["--config", str(recipe)], prog="t")


# Commands that fail the way the outside world makes commands fail (injected into the CLI's registry).
def _disk_full(config):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device", "/data/run/checkpoints/step_10/model.safetensors")


def _permission_denied(config):
    import errno

    raise PermissionError(errno.EACCES, "Permission denied", "/data/run/metrics.jsonl")


def _a_bug(config):
    return {}["missing"]


@pytest.mark.parametrize(
    ("entry", "status", "says"),
    [
        ("_disk_full", 2, "the disk is full (/data/run/checkpoints/step_10/model.safetensors); free some space"),
        ("_permission_denied", 2, "permission denied (/data/run/metrics.jsonl)"),
        ("_a_bug", 1, "unexpected KeyError: 'missing'; this is a bug in rlflow"),
    ],
)
def test_failures_from_outside_end_with_one_sentence(entry, status, says, capsys):
    from rlflow.cli import Command

    commands = {"job": Command(config="rlflow.sample:SampleConfig", entry=f"{__name__}:{entry}", summary="x")}
    assert main(["job"], commands=commands) == status
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("rlflow job: error: ") and says in last_line, last_line


def test_a_trainer_refuses_a_directory_of_someone_elses_files(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8" * 50)
    (foreign / "plots").mkdir()
    (foreign / "plots" / "mine.png").write_bytes(b"png")
    before = _snapshot(foreign)
    status = main(["pretrain", "--config", TOY, "--steps", "2", "--warmup_steps", "0", "--output_dir", str(foreign)])
    err = capsys.readouterr().err
    assert status == 2 and "is not an rlflow run" in err and "holiday.jpg" in err, err
    assert _snapshot(foreign) == before


@pytest.mark.parametrize(
    ("old", "new"),
    [("lr", "learning_rate"), ("grad_clip_norm", "max_grad_norm"), ("eval_every", "eval_steps"),
     ("checkpoint_every", "save_steps"), ("log_every", "logging_steps"), ("keep_checkpoints", "save_total_limit")],
)  # fmt: skip
def test_an_old_key_name_gets_an_error_giving_the_new_one(old, new, tmp_path, capsys):
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"{old}: 1\n")
    assert main(["pretrain", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"'{old}' was renamed to '{new}'" in err, err
    assert main(["pretrain", f"--{old}", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--{old} -> --{new} (renamed)" in err, err


def test_old_names_in_nested_sections_and_other_commands(capsys):
    assert main(["ppo", "--clip_eps", "0.2"]) == 2
    assert "--clip_eps -> --clip_range (renamed)" in capsys.readouterr().err
    assert main(["grpo", "--model.lora_rank", "8"]) == 2
    assert "--model.lora_rank -> --model.lora_r (renamed)" in capsys.readouterr().err
    assert main(["nft", "--model.lora_targets", "[to_q]"]) == 2
    assert "--model.lora_targets -> --model.lora_target_modules (renamed)" in capsys.readouterr().err


def test_a_command_does_not_take_over_another_commands_run(tmp_path, capsys):
    """A run directory remembers its command: another trainer, `sample` or `eval` pointed at it is refused."""
    run = tmp_path / "run"
    args = ["--config", TOY, "--steps", "2", "--warmup_steps", "0", "--eval_steps", "1", "--eval_samples", "50",
            "--save_steps", "1", "--data.num_samples", "500", "--report_to", "none", "--output_dir", str(run)]
    assert main(["pretrain", *args]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    status = main(["rwr", "--iterations", "1", "--output_dir", str(run)])
    err = capsys.readouterr().err
    assert status == 2 and "holds an `rlflow pretrain` run" in err, err
    status = main(["eval", "--policy", "recipes/robotics/artifacts/hopper_medium_flow", "--task", "hopper",
                   "--episodes", "1", "--video", "false", "--max_episode_steps", "5", "--output_dir", str(run)])
    err = capsys.readouterr().err
    assert status == 2 and "holds an `rlflow pretrain` run" in err, err
    assert _snapshot(run) == before
    assert main(["pretrain", *args]) == 0  # the same command resumes (here: finds the run finished)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--steps", "99999999999999999999999"], "is too large"),
        (["--num_threads", "100000"], "[1, 1024]"),
        (["--output_dir", ""], "is empty"),
    ],
)
def test_absurd_values_are_refused(args, says, capsys):
    assert main(["pretrain", "--config", TOY, *args]) == 2
    assert says in capsys.readouterr().err


def test_zero_reward_weights_and_a_missing_policy(tmp_path, capsys):
    from reward_models.combine import build_rewards

    with pytest.raises(Exception, match="every reward weight is 0"):
        build_rewards({"brightness": 0.0})
    status = main(["eval", "--policy", str(tmp_path / "nope"), "--task", "hopper"])
    err = capsys.readouterr().err
    assert status == 2 and "policy directory" in err and "does not exist" in err, err
