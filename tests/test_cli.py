"""Tests for the ``rlflow`` command line (rlflow.cli).

Most tests call ``main([...], commands=...)`` in-process with a toy command defined here; only
the real ``rlflow --help`` / ``rlflow pretrain --help`` surface runs in a subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from rlflow.cli import COMMANDS, Command, main
from rlflow.config import ConfigError, option

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ToyOptim:
    lr: float = option(1e-3, help="Toy learning rate.")
    kind: Literal["adam", "sgd"] = option("adam", help="Toy optimiser.")


@dataclass
class ToyConfig:
    steps: int = option(10, help="How many toy steps to take.")
    dims: list[int] = option(default_factory=lambda: [4, 4], help="Toy layer widths.")
    fail_with: str = option("", help="Make the entry raise: 'config' or 'interrupt'.")
    optim: ToyOptim = option(default_factory=ToyOptim, help="Toy optimiser section.")


CALLS: list[ToyConfig] = []


def toy_train(config: ToyConfig) -> dict[str, Any]:
    if config.fail_with == "config":
        raise ConfigError("data file toy.npz has no 'target' array")
    if config.fail_with == "interrupt":
        raise KeyboardInterrupt
    CALLS.append(config)
    return {"steps": config.steps}


# ``__name__`` is whatever pytest's import mode called this module, so the lazy import in the
# CLI finds this very module (and its CALLS list) again.
TOY = {
    "toy": Command(config=f"{__name__}:ToyConfig", entry=f"{__name__}:toy_train", summary="A toy command."),
    "other": Command(config=f"{__name__}:ToyConfig", entry=f"{__name__}:toy_train", summary="Another one."),
}


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    CALLS.clear()


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "rlflow", *args],
        cwd=REPO_ROOT,  # so ``-m rlflow`` finds the package even when it is not installed
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


# ----------------------------------------------------------------------------------------------
# Top level
# ----------------------------------------------------------------------------------------------


def test_registry_has_pretrain_with_lazy_import_strings() -> None:
    assert {"pretrain", "ppo", "collect"} <= set(COMMANDS)
    pretrain = COMMANDS["pretrain"]
    assert pretrain.config == "rlflow.trainers.pretrain:PretrainConfig"
    assert pretrain.entry == "rlflow.trainers.pretrain:train"


def test_help_lists_commands_with_summaries(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--help", "-h"):
        assert main([flag], commands=TOY) == 0
        out = capsys.readouterr().out
        assert "toy" in out and "A toy command." in out
        assert "other" in out and "Another one." in out
        assert "rlflow <command> --help" in out


def test_no_arguments_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([], commands=TOY) == 2
    err = capsys.readouterr().err
    assert "usage: rlflow <command>" in err
    assert "A toy command." in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import rlflow

    assert main(["--version"], commands=TOY) == 0
    assert capsys.readouterr().out.strip() == f"rlflow {rlflow.__version__}"


def test_unknown_command_names_it_and_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tyo"], commands=TOY) == 2
    err = capsys.readouterr().err
    assert "unknown command 'tyo'" in err
    assert "did you mean 'toy'?" in err
    assert "toy, other" in err


def test_unknown_top_level_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--verbose"], commands=TOY) == 2
    assert "unknown option '--verbose'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Running a command
# ----------------------------------------------------------------------------------------------


def test_run_calls_entry_with_resolved_config(tmp_path: Path) -> None:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("steps: 5\noptim:\n  lr: 1e-2\n  kind: sgd\n")
    code = main(["toy", "--config", str(recipe), "--optim.lr", "3e-4", "--dims", "[8, 2]"], commands=TOY)
    assert code == 0
    assert CALLS == [ToyConfig(steps=5, dims=[8, 2], optim=ToyOptim(lr=3e-4, kind="sgd"))]


def test_run_without_config_uses_defaults() -> None:
    assert main(["toy"], commands=TOY) == 0
    assert CALLS == [ToyConfig()]


def test_command_help_shows_field_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["toy", "--help"], commands=TOY) == 0
    out = capsys.readouterr().out
    assert "usage: rlflow toy" in out
    assert "A toy command." in out
    assert "How many toy steps to take." in out
    assert "--optim.lr" in out and "Toy learning rate." in out
    assert "optim options:" in out
    assert "--print-config" in out and "without running" in out
    assert CALLS == []


def test_unknown_cli_option_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy", "--optim.lrr", "1"], commands=TOY) == 2
    err = capsys.readouterr().err
    assert "--optim.lrr" in err
    assert "did you mean" in err and "--optim.lr" in err
    assert CALLS == []


def test_wrong_type_exits_2_naming_key_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy", "--steps", "lots"], commands=TOY) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlflow toy: error: command line: 'steps' must be an integer, got 'lots' (str)")
    assert "Traceback" not in err
    assert CALLS == []


def test_literal_error_from_yaml_names_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("optim:\n  kind: adma\n")
    assert main(["toy", "--config", str(recipe)], commands=TOY) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: 'optim.kind' must be one of 'adam', 'sgd'" in err
    assert "did you mean 'adam'?" in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["toy", "--config", str(missing)], commands=TOY) == 2
    err = capsys.readouterr().err
    assert f"rlflow toy: error: config file not found: {missing}" in err
    assert CALLS == []


def test_print_config_prints_resolved_yaml_and_does_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("steps: 7\n")
    assert main(["toy", "--config", str(recipe), "--optim.kind", "sgd", "--print-config"], commands=TOY) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == {"steps": 7, "dims": [4, 4], "fail_with": "", "optim": {"lr": 0.001, "kind": "sgd"}}
    assert CALLS == []


def test_print_config_output_is_a_valid_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy", "--steps", "3", "--print-config"], commands=TOY) == 0
    recipe = tmp_path / "saved.yaml"
    recipe.write_text(capsys.readouterr().out)
    assert main(["toy", "--config", str(recipe)], commands=TOY) == 0
    assert CALLS == [ToyConfig(steps=3)]


def test_config_error_raised_by_entry_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy", "--fail_with", "config"], commands=TOY) == 2
    assert "rlflow toy: error: data file toy.npz has no 'target' array" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["toy", "--fail_with", "interrupt"], commands=TOY) == 130
    assert "interrupted" in capsys.readouterr().err


def test_unimportable_command_reports_module(capsys: pytest.CaptureFixture[str]) -> None:
    broken = {
        "broken": Command(config="rlflow_no_such_module:Cfg", entry="rlflow_no_such_module:run", summary="x")
    }
    assert main(["broken"], commands=broken) == 1
    err = capsys.readouterr().err
    assert "rlflow broken: error: cannot load" in err
    assert "rlflow_no_such_module" in err


def test_missing_optional_dependency_suggests_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command's module exists but imports a package that is not installed (a missing extra).
    (tmp_path / "rlflow_test_cmd_with_extra.py").write_text("import rlflow_fake_extra_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cmd = {
        "needs": Command(
            config="rlflow_test_cmd_with_extra:Cfg", entry="rlflow_test_cmd_with_extra:run", summary="x"
        )
    }
    assert main(["needs"], commands=cmd) == 1
    err = capsys.readouterr().err
    assert "'rlflow_fake_extra_pkg', which is not installed" in err
    assert "pip install 'rlflow[" in err


# ----------------------------------------------------------------------------------------------
# The real entry point, in a subprocess
# ----------------------------------------------------------------------------------------------


def test_real_rlflow_help_lists_pretrain() -> None:
    result = _run_module("--help")
    assert result.returncode == 0, result.stderr
    assert "pretrain" in result.stdout
    assert COMMANDS["pretrain"].summary in result.stdout
    assert "rlflow <command> --help" in result.stdout


def test_real_unknown_command_exits_2() -> None:
    result = _run_module("pretrian")
    assert result.returncode == 2
    assert "unknown command 'pretrian'" in result.stderr
    assert "did you mean 'pretrain'?" in result.stderr


def test_top_level_help_imports_no_command_modules() -> None:
    # `rlflow --help` must stay fast: the CLI itself may not import torch or any command module
    # (whatever `import rlflow` pulls in is the package's business, so it is subtracted).
    code = (
        "import sys, rlflow; before = set(sys.modules); "
        "from rlflow.cli import main; main(['--help']); "
        "new = set(sys.modules) - before; "
        "bad = sorted(m for m in new if m.split('.')[0] == 'torch' or m.startswith('rlflow.trainers')); "
        "print('BAD', bad, file=sys.stderr); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def _pretrain_available() -> bool:
    try:
        return importlib.util.find_spec("rlflow.trainers.pretrain") is not None
    except ModuleNotFoundError:  # rlflow.trainers itself missing
        return False


@pytest.mark.skipif(not _pretrain_available(), reason="rlflow.trainers.pretrain is not written yet")
def test_real_pretrain_help() -> None:
    result = _run_module("pretrain", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: rlflow pretrain" in result.stdout
    assert "--config PATH" in result.stdout
    assert "--print-config" in result.stdout
