"""Tests for rlflow.config: typed dataclass configs from YAML + command line."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from rlflow.config import (
    ConfigError,
    build_parser,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_yaml,
    option,
    parse_config,
)

# Module-level dataclasses: ``from __future__ import annotations`` turns annotations into strings,
# which config_from_dict must resolve with typing.get_type_hints.


@dataclass
class ModelCfg:
    hidden_dims: list[int] = option(default_factory=lambda: [256, 256], help="Widths of the MLP layers.")
    activation: Literal["relu", "silu", "gelu"] = option("silu", help="Hidden activation.")
    dropout: float = option(0.0, help="Dropout probability.")

    def __post_init__(self) -> None:
        if not self.hidden_dims:
            raise ValueError("hidden_dims must not be empty")


@dataclass
class TrainCfg:
    lr: float = option(1e-3, help="Peak learning rate.")
    steps: int = option(1000, help="Number of optimiser steps.")
    use_ema: bool = option(True, help="Keep an exponential moving average of the weights.")


@dataclass
class RootCfg:
    name: str = option("run", help="Run name; 100% free text.")
    seed: int = option(0, help="Random seed.")
    out_dir: Optional[Path] = option(None, help="Where to write outputs.")  # noqa: UP045 - tests Optional[X]
    tags: tuple[str, ...] = option(default=(), help="Free-form tags.")
    image_size: tuple[int, int] = option(default=(32, 32), help="Height and width.")
    weights: dict[str, float] = option(default_factory=dict, help="Loss weights by name.")
    extra: Any = option(None, help="Anything at all.")
    model: ModelCfg = option(default_factory=ModelCfg, help="Velocity network.")
    train: TrainCfg = option(default_factory=TrainCfg, help="Optimisation.")


@dataclass
class RequiredCfg:
    data_path: Path = option(help="Dataset file.")
    batch_size: int = option(64, help="Batch size.")


@dataclass
class WithRequiredSection:
    data: RequiredCfg = option(help="Data section (has a required key).")


@dataclass
class CustomDefaultCfg:
    # The parent's default overrides the nested class's own default (hidden_dims=[256, 256]).
    model: ModelCfg = option(default_factory=lambda: ModelCfg(hidden_dims=[8]), help="Small net.")


@dataclass
class OptionalSectionCfg:
    teacher: ModelCfg | None = option(None, help="Optional teacher network.")


# ----------------------------------------------------------------------------------------------
# option()
# ----------------------------------------------------------------------------------------------


def test_option_stores_help_and_defaults() -> None:
    fields = {f.name: f for f in dataclasses.fields(ModelCfg)}
    assert fields["dropout"].metadata["help"] == "Dropout probability."
    assert fields["dropout"].default == 0.0
    # default_factory gives every instance its own list.
    a, b = ModelCfg(), ModelCfg()
    a.hidden_dims.append(1)
    assert b.hidden_dims == [256, 256]


def test_option_rejects_default_and_factory_together() -> None:
    with pytest.raises(TypeError, match="not both"):
        option(1, default_factory=lambda: 1, help="x")


# ----------------------------------------------------------------------------------------------
# config_from_dict: values and coercion
# ----------------------------------------------------------------------------------------------


def test_defaults_and_nested_partial_override() -> None:
    cfg = config_from_dict(RootCfg, {"train": {"lr": 0.5}})
    assert cfg.train.lr == 0.5
    assert cfg.train.steps == 1000  # untouched sibling keeps its default
    assert cfg.model == ModelCfg()
    assert cfg.name == "run"


def test_partial_section_keeps_parent_default_instance() -> None:
    cfg = config_from_dict(CustomDefaultCfg, {"model": {"activation": "relu"}})
    assert cfg.model.hidden_dims == [8]
    assert cfg.model.activation == "relu"


@pytest.mark.parametrize(("raw", "expected"), [("1e-3", 1e-3), ("3E-4", 3e-4), (2, 2.0), ("0.5", 0.5)])
def test_float_accepts_numeric_strings_and_ints(raw: Any, expected: float) -> None:
    cfg = config_from_dict(TrainCfg, {"lr": raw})
    assert cfg.lr == pytest.approx(expected)
    assert type(cfg.lr) is float


def test_pyyaml_reads_1e_minus_3_as_string_and_we_fix_it(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    assert load_yaml(path) == {"train": {"lr": "1e-3"}}  # the PyYAML quirk this guards against
    assert config_from_dict(RootCfg, load_yaml(path)).train.lr == pytest.approx(1e-3)


def test_int_accepts_integral_strings_and_scientific_whole_numbers() -> None:
    assert config_from_dict(TrainCfg, {"steps": "12"}).steps == 12
    assert config_from_dict(TrainCfg, {"steps": "1e6"}).steps == 1_000_000


@pytest.mark.parametrize("bad", [True, 2.5, "ten", None])
def test_int_rejects_bool_fraction_text_and_null(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"'train\.steps' must be an integer"):
        config_from_dict(RootCfg, {"train": {"steps": bad}}, source="r.yaml")


def test_wrong_type_message_names_source_key_value_and_type() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(RootCfg, {"train": {"lr": "abc"}}, source="recipe.yaml")
    message = str(err.value)
    assert message.startswith("recipe.yaml: 'train.lr' must be a float, got 'abc' (str)")
    assert "1e-3" in message  # the fix: an example of a valid value


@pytest.mark.parametrize(
    ("raw", "expected"), [(True, True), (False, False), ("true", True), ("FALSE", False)]
)
def test_bool_accepts_real_bools_and_true_false_strings(raw: Any, expected: bool) -> None:
    assert config_from_dict(TrainCfg, {"use_ema": raw}).use_ema is expected


@pytest.mark.parametrize("bad", ["yes", "no", "1", 1, 0, "on"])
def test_bool_is_strict_about_strings_and_numbers(bad: Any) -> None:
    # Decision: only true/false spellings; "yes"/1 are ambiguous enough to be mistakes.
    # (Unquoted yes/no in YAML files are already booleans for PyYAML, so they never reach here.)
    with pytest.raises(ConfigError, match=r"'use_ema' must be a boolean.*write true or false"):
        config_from_dict(TrainCfg, {"use_ema": bad})


def test_str_rejects_numbers_with_quoting_hint() -> None:
    with pytest.raises(ConfigError, match=r"'name' must be a string, got 123 \(int\); quote the value"):
        config_from_dict(RootCfg, {"name": 123})


def test_literal_rejection_lists_choices_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(RootCfg, {"model": {"activation": "rellu"}}, source="r.yaml")
    message = str(err.value)
    assert "'model.activation' must be one of 'relu', 'silu', 'gelu', got 'rellu'" in message
    assert "did you mean 'relu'?" in message


def test_optional_accepts_null_and_converts_path() -> None:
    assert config_from_dict(RootCfg, {"out_dir": None}).out_dir is None
    cfg = config_from_dict(RootCfg, {"out_dir": "runs/a"})
    assert cfg.out_dir == Path("runs/a")
    assert isinstance(cfg.out_dir, Path)


def test_null_for_non_optional_field_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'train\.lr' must be a float, got None.*cannot be null"):
        config_from_dict(RootCfg, {"train": {"lr": None}})


def test_lists_tuples_and_dicts_are_checked_elementwise() -> None:
    cfg = config_from_dict(
        RootCfg,
        {
            "model": {"hidden_dims": ["64", 32]},
            "tags": ["a", "b"],
            "image_size": [8, 16],
            "weights": {"bc": 1},
        },
    )
    assert cfg.model.hidden_dims == [64, 32]
    assert cfg.tags == ("a", "b")
    assert cfg.image_size == (8, 16)
    assert cfg.weights == {"bc": 1.0}

    with pytest.raises(ConfigError, match=r"'model\.hidden_dims\[1\]' must be an integer, got 'x'"):
        config_from_dict(RootCfg, {"model": {"hidden_dims": [1, "x"]}})
    with pytest.raises(ConfigError, match=r"'image_size' must have exactly 2 items"):
        config_from_dict(RootCfg, {"image_size": [1, 2, 3]})
    with pytest.raises(ConfigError, match=r"'model\.hidden_dims' must be a list\[int\], got 64"):
        config_from_dict(RootCfg, {"model": {"hidden_dims": 64}})
    with pytest.raises(ConfigError, match=r"'weights\.bc' must be a float"):
        config_from_dict(RootCfg, {"weights": {"bc": "high"}})


def test_any_field_accepts_anything() -> None:
    assert config_from_dict(RootCfg, {"extra": {"a": [1, None]}}).extra == {"a": [1, None]}


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"'train' must be a mapping.*lr, steps, use_ema"):
        config_from_dict(RootCfg, {"train": 5})


def test_optional_section() -> None:
    assert config_from_dict(OptionalSectionCfg, {}).teacher is None
    assert config_from_dict(OptionalSectionCfg, {"teacher": None}).teacher is None
    cfg = config_from_dict(OptionalSectionCfg, {"teacher": {"hidden_dims": [4]}})
    assert cfg.teacher == ModelCfg(hidden_dims=[4])


# ----------------------------------------------------------------------------------------------
# config_from_dict: keys
# ----------------------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(RootCfg, {"sed": 1}, source="recipe.yaml")
    message = str(err.value)
    assert "recipe.yaml: unknown key 'sed'" in message
    assert "did you mean 'seed'?" in message
    assert "Valid keys: name, seed, out_dir" in message


def test_unknown_nested_key_names_dotted_path_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(RootCfg, {"model": {"hiden_dims": [1]}}, source="recipe.yaml")
    message = str(err.value)
    assert "recipe.yaml: unknown key 'model.hiden_dims'" in message
    assert "did you mean 'model.hidden_dims'?" in message
    assert "Valid keys under 'model': hidden_dims, activation, dropout" in message


def test_missing_required_field_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(RequiredCfg, {"batch_size": 8}, source="recipe.yaml")
    message = str(err.value)
    assert "recipe.yaml: missing required key 'data_path'" in message
    assert "--data_path" in message


def test_missing_required_section_reports_the_missing_leaf() -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'data\.data_path'"):
        config_from_dict(WithRequiredSection, {})
    cfg = config_from_dict(WithRequiredSection, {"data": {"data_path": "d.npz"}})
    assert cfg.data == RequiredCfg(data_path=Path("d.npz"))


def test_post_init_value_error_becomes_config_error_with_source() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(RootCfg, {"model": {"hidden_dims": []}}, source="recipe.yaml")
    message = str(err.value)
    assert message == "recipe.yaml (section 'model'): hidden_dims must not be empty"
    assert isinstance(err.value.__cause__, ValueError)


def test_non_mapping_data_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict(RootCfg, [1, 2])  # type: ignore[arg-type]


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------


def test_config_to_dict_is_plain_and_round_trips() -> None:
    cfg = config_from_dict(
        RootCfg, {"out_dir": "o", "tags": ["x"], "model": {"hidden_dims": [3]}, "weights": {"a": 0.5}}
    )
    data = config_to_dict(cfg)
    assert data["out_dir"] == "o"
    assert data["tags"] == ["x"]
    assert data["image_size"] == [32, 32]
    assert data["model"] == {"hidden_dims": [3], "activation": "silu", "dropout": 0.0}
    # Plain types only: safe_dump would raise on Path/tuple objects.
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert config_from_dict(RootCfg, data) == cfg


def test_dump_yaml_round_trip_and_atomic_write(tmp_path: Path) -> None:
    cfg = config_from_dict(RootCfg, {"train": {"lr": "1e-5"}, "out_dir": "runs/x", "image_size": [4, 5]})
    target = tmp_path / "nested" / "config.yaml"
    assert dump_yaml(cfg, target) == target
    assert config_from_dict(RootCfg, load_yaml(target), source=str(target)) == cfg
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]  # no temp file left behind

    cfg2 = dataclasses.replace(cfg, seed=7)
    dump_yaml(cfg2, target)  # overwrite in place
    assert load_yaml(target)["seed"] == 7


# ----------------------------------------------------------------------------------------------
# load_yaml
# ----------------------------------------------------------------------------------------------


def test_load_yaml_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_yaml(missing)
    message = str(err.value)
    assert f"config file not found: {missing}" in message
    assert "current directory" in message


def test_load_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 0.1\n  steps: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid YAML at line ")
    assert "column" in message


def test_load_yaml_bad_indentation_reports_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: 2\n  c: 3\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3"):
        load_yaml(path)


def test_load_yaml_empty_and_comment_only_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    comments = tmp_path / "c.yaml"
    comments.write_text("# nothing here\n")
    assert load_yaml(empty) == {}
    assert load_yaml(comments) == {}


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_load_yaml_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"top level of a config file must be a mapping"):
        load_yaml(path)


def test_load_yaml_rejects_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'lr' \(first defined on line 2\)"):
        load_yaml(path)


def test_load_yaml_allows_merge_keys_overridden_explicitly(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {lr: 0.1, steps: 5}\ntrain:\n  <<: *b\n  lr: 0.2\n")
    assert load_yaml(path)["train"] == {"lr": 0.2, "steps": 5}


def test_load_yaml_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_yaml(tmp_path)


# ----------------------------------------------------------------------------------------------
# parse_config: YAML + command line
# ----------------------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_then_yaml_then_cli(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "seed: 1\ntrain:\n  lr: 1e-2\n  steps: 50\nmodel:\n  activation: relu\n")
    cfg = parse_config(RootCfg, ["--config", str(recipe), "--train.lr", "3e-4", "--seed=9"], prog="t")
    assert cfg.seed == 9  # CLI beats YAML
    assert cfg.train.lr == pytest.approx(3e-4)  # CLI beats YAML, float string parsed
    assert cfg.train.steps == 50  # YAML beats default, not clobbered by a sibling CLI override
    assert cfg.model.activation == "relu"  # YAML only
    assert cfg.model.hidden_dims == [256, 256]  # default only
    assert cfg.train.use_ema is True


def test_cli_only_without_config_file() -> None:
    cfg = parse_config(RootCfg, ["--model.activation", "gelu"], prog="t")
    assert cfg.model.activation == "gelu"
    assert parse_config(RootCfg, [], prog="t") == RootCfg()


def test_cli_lists_tuples_bools_and_null() -> None:
    cfg = parse_config(
        RootCfg,
        [
            "--model.hidden_dims", "[64, 64]",
            "--image_size=[3, 4]",
            "--tags", "[a, b]",
            "--train.use_ema", "false",
            "--out_dir", "null",
            "--weights", "{bc: 0.5}",
        ],
        prog="t",
    )  # fmt: skip
    assert cfg.model.hidden_dims == [64, 64]
    assert cfg.image_size == (3, 4)
    assert cfg.tags == ("a", "b")
    assert cfg.train.use_ema is False
    assert cfg.out_dir is None
    assert cfg.weights == {"bc": 0.5}


def test_cli_string_fields_keep_text_yaml_would_reinterpret() -> None:
    # YAML would read these as bool / int / date; for a str field the typed text is what was meant.
    for text in ("yes", "007", "2024-01-01", "null"):
        assert parse_config(RootCfg, ["--name", text], prog="t").name == text


def test_cli_wrong_type_names_key_value_and_source() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(RootCfg, ["--train.steps", "many"], prog="t")
    assert str(err.value).startswith("command line: 'train.steps' must be an integer, got 'many' (str)")


def test_cli_bool_rejects_numbers() -> None:
    with pytest.raises(ConfigError, match=r"command line: 'train\.use_ema' must be a boolean, got 1 \(int\)"):
        parse_config(RootCfg, ["--train.use_ema", "1"], prog="t")


def test_yaml_error_is_attributed_to_the_file(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{recipe}: 'train.lr' must be a float")):
        parse_config(RootCfg, ["--config", str(recipe), "--seed", "1"], prog="t")


def test_bad_yaml_value_overridden_on_cli_is_fine(tmp_path: Path) -> None:
    # Only the resolved value is checked: the CLI fixes a bad recipe value without editing it.
    recipe = _write(tmp_path, "train:\n  lr: fast\n")
    cfg = parse_config(RootCfg, ["--config", str(recipe), "--train.lr", "0.1"], prog="t")
    assert cfg.train.lr == 0.1


def test_unknown_key_in_yaml_via_parse_config(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "train:\n  lr: 0.1\n  stpes: 3\n")
    with pytest.raises(
        ConfigError,
        match="^" + re.escape(f"{recipe}: unknown key 'train.stpes'; did you mean 'train.steps'?"),
    ):
        parse_config(RootCfg, ["--config", str(recipe)], prog="t")


def test_required_field_from_cli_or_yaml(tmp_path: Path) -> None:
    assert parse_config(RequiredCfg, ["--data_path", "x.npz"], prog="t").data_path == Path("x.npz")
    recipe = _write(tmp_path, "data_path: y.npz\n")
    assert parse_config(RequiredCfg, ["--config", str(recipe)], prog="t").data_path == Path("y.npz")
    with pytest.raises(ConfigError, match=r"^command line: missing required key 'data_path'"):
        parse_config(RequiredCfg, [], prog="t")


def test_missing_config_file_via_parse_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(RootCfg, ["--config", str(tmp_path / "missing.yaml")], prog="t")


def test_post_init_error_via_cli_names_both_sources(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "seed: 1\n")
    with pytest.raises(ConfigError, match=r"with command-line overrides\) \(section 'model'\): hidden_dims"):
        parse_config(RootCfg, ["--config", str(recipe), "--model.hidden_dims", "[]"], prog="t")


def test_cli_overrides_a_null_optional_section(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "teacher: null\n")
    cfg = parse_config(OptionalSectionCfg, ["--config", str(recipe), "--teacher.dropout", "0.1"], prog="t")
    assert cfg.teacher == ModelCfg(dropout=0.1)


def test_unknown_cli_option_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(RootCfg, ["--train.lrr", "1"], prog="t")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--train.lrr" in err
    assert "--train.lr" in err.split("did you mean")[1]


def test_cli_abbreviations_are_not_expanded(capsys: pytest.CaptureFixture[str]) -> None:
    # With argparse's default allow_abbrev=True, "--see" would silently mean "--seed".
    with pytest.raises(SystemExit) as exc:
        parse_config(RootCfg, ["--see", "1"], prog="t")
    assert exc.value.code == 2
    assert "--see" in capsys.readouterr().err


def test_help_lists_every_leaf_with_help_type_default_and_groups(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps help text to the terminal width
    with pytest.raises(SystemExit) as exc:
        parse_config(RootCfg, ["--help"], prog="rlflow demo", description="Demo command.")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rlflow demo" in out
    assert "Demo command." in out
    assert "--config PATH" in out
    for key in ("--name", "--seed", "--out_dir", "--model.hidden_dims", "--model.activation", "--train.lr"):
        assert key in out
    # Help text, type and default (with '%' in help surviving argparse's %-formatting).
    assert "Run name; 100% free text." in out
    assert "Peak learning rate. [float; default: 0.001]" in out
    assert "[list[int], >= 1; default: [256, 256]]" in out
    assert "'relu' | 'silu' | 'gelu'" in out
    # Grouped by nested section, with the section's help text.
    assert "model options:" in out
    assert "train options:" in out
    assert out.index("model options:") < out.index("--model.hidden_dims") < out.index("train options:")
    assert "Velocity network." in out


def test_help_shows_required_and_parent_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit):
        parse_config(RequiredCfg, ["-h"], prog="t")
    assert "[path; required]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_config(CustomDefaultCfg, ["-h"], prog="t")
    assert "default: [8]" in capsys.readouterr().out


def test_build_parser_rejects_non_dataclass() -> None:
    with pytest.raises(TypeError):
        build_parser(dict, prog="t")
