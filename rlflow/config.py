"""Typed dataclass configs: declared with :func:`option`, loaded from YAML, overridden on the command line.

Every config in rlflow is a (possibly nested) dataclass whose fields carry help text::

    @dataclass
    class ModelConfig:
        hidden_dims: list[int] = option(default_factory=lambda: [256, 256], help="MLP widths.")

    @dataclass
    class PretrainConfig:
        learning_rate: float = option(1e-3, help="Peak learning rate.")
        model: ModelConfig = option(default_factory=ModelConfig, help="Velocity network.")

Values are resolved with the precedence *dataclass defaults < YAML recipe < command line*::

    rlflow pretrain --config recipe.yaml --learning_rate 3e-4 --model.hidden_dims "[64, 64]"

Every problem a user can cause is reported as a :class:`ConfigError` whose message names the dotted
key, the offending value, where it came from (file path or "command line") and how to fix it.

This module deliberately imports nothing heavy (no torch) so ``rlflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import enum
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

from rlflow.validation import BOUNDS_BY_NAME, CHECKS_BY_NAME, Bounds, parse_bounds

__all__ = [
    "ConfigError",
    "build_parser",
    "config_from_dict",
    "config_from_namespace",
    "config_to_dict",
    "dump_yaml",
    "load_yaml",
    "option",
    "parse_config",
    "validate_config",
]

T = TypeVar("T")

MISSING: Any = dataclasses.MISSING
COMMAND_LINE = "command line"

# argparse destinations of config leaves get this prefix so they can never collide with other
# attributes of the namespace (``config``, or options a caller adds such as ``print_config``).
_DEST_PREFIX = "field:"


class ConfigError(ValueError):
    """A user-facing configuration problem (bad key, bad value, unreadable file, ...)."""


# Config keys renamed to the names TRL and transformers users know (issue 18's one vocabulary). An old
# name is an error that gives the new one, never silently accepted, so a recipe cannot half-migrate.
RENAMED_KEYS: dict[str, str] = {
    "lr": "learning_rate",
    "grad_clip_norm": "max_grad_norm",
    "clip_eps": "clip_range",
    "log_prob_reduction": "logprob_reduction",
    "warmup_updates": "warmup_steps",
    "lr_schedule": "lr_scheduler_type",
    "eval_every": "eval_steps",
    "checkpoint_every": "save_steps",
    "log_every": "logging_steps",
    "keep_checkpoints": "save_total_limit",
    "lora_rank": "lora_r",
    "lora_targets": "lora_target_modules",
}

# Config keys replaced by a key whose value has another type, so a rename hint would mislead: the old key is
# an error that names the new one and shows its values.
REPLACED_KEYS: dict[str, tuple[str, str]] = {
    "tensorboard": ("report_to", "e.g. report_to: [tensorboard] or report_to: none"),
}


# ----------------------------------------------------------------------------------------------
# Declaring fields
# ----------------------------------------------------------------------------------------------


def option(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Any = MISSING,
    bounds: str | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """Declare a config field with help text (shown by ``--help``).

    Use ``default_factory`` for mutable defaults (lists, dicts, nested configs). Omitting both
    ``default`` and ``default_factory`` makes the field required.

    ``bounds`` is the allowed interval of a numeric field (or of each number in a list), in interval
    notation: ``"[0, 1)"``, ``"(0, inf)"``. Fields named as in the shared vocabulary
    (:data:`rlflow.validation.BOUNDS_BY_NAME`: ``learning_rate``, ``seed``, ``ema_decay``, ...) get
    their bounds from there; ``bounds`` here overrides it. ``check`` is a function of the value that
    returns None when it is fine, else what is wrong and how to fix it (e.g. an unavailable device).
    Both are checked whenever a user gives the value, before any work starts.
    """
    if default is not MISSING and default_factory is not MISSING:
        raise TypeError("option(): pass either a default or a default_factory, not both")
    if not isinstance(help, str) or not help.strip():
        raise TypeError("option(): help must be a non-empty string")
    metadata: dict[str, Any] = {"help": help}
    if bounds is not None:
        metadata["bounds"] = parse_bounds(bounds)
    if check is not None:
        metadata["check"] = check
    # dataclasses.field refuses ``default=MISSING`` together with a factory only by identity,
    # so forwarding the sentinels as they are is correct.
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def field_bounds(f: dataclasses.Field) -> Bounds | None:
    """The allowed interval of a field: its own ``bounds``, else the shared vocabulary's for its name."""
    declared = f.metadata.get("bounds")
    return declared if declared is not None else BOUNDS_BY_NAME.get(f.name)


def field_check(f: dataclasses.Field) -> Callable[[Any], str | None] | None:
    """The field's own ``check``, else the shared one for its name (``device``, ``output_dir``)."""
    return f.metadata.get("check") or CHECKS_BY_NAME.get(f.name)


# ----------------------------------------------------------------------------------------------
# Type helpers
# ----------------------------------------------------------------------------------------------

_NONE_TYPE = type(None)
_HINT_CACHE: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (works with ``from __future__ import annotations``)."""
    hints = _HINT_CACHE.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except NameError as exc:  # developer error: an annotation refers to an unknown name
            raise TypeError(
                f"cannot resolve the type annotations of {cls.__qualname__}: {exc}; "
                "config dataclasses (and the types they use) must be defined at module level"
            ) from exc
        _HINT_CACHE[cls] = hints
    return hints


def _init_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a user can set (``init=False`` fields are computed, not configured)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _section_type(tp: Any) -> type | None:
    """The dataclass behind a nested-section annotation (``Sub`` or ``Sub | None``), else None."""
    if _is_dataclass_type(tp):
        return tp
    if _is_union(tp):
        arms = [a for a in typing.get_args(tp) if a is not _NONE_TYPE]
        if len(arms) == 1 and _is_dataclass_type(arms[0]):
            return arms[0]
    return None


def _type_name(tp: Any) -> str:
    """A short, user-readable spelling of an annotation, e.g. ``list[int]`` or ``'adam' | 'sgd'``."""
    if tp is Any:
        return "any"
    if tp is _NONE_TYPE:
        return "null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"tuple[{_type_name(args[0])}, ...]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if isinstance(tp, type):
        if issubclass(tp, PurePath):
            return "path"
        return tp.__name__
    return str(tp)


def _metavar(tp: Any) -> str:
    """The placeholder shown after ``--key`` in ``--help``."""
    arms = [a for a in typing.get_args(tp) if a is not _NONE_TYPE] if _is_union(tp) else [tp]
    if len(arms) != 1:
        return "VALUE"
    tp = arms[0]
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    simple = {
        bool: "BOOL",
        int: "INT",
        float: "FLOAT",
        str: "STR",
        list: "LIST",
        tuple: "TUPLE",
        dict: "MAPPING",
    }
    key = origin if origin is not None else tp
    if key in simple:
        return simple[key]
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "PATH"
    return "VALUE"


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` of a user value, shortened so error messages stay readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _yaml_inline(value: Any) -> str:
    """A value as the user would type it in YAML or on the command line (``[64, 64]``, ``null``)."""
    try:
        text = yaml.safe_dump(_to_plain(value), default_flow_style=True, width=10**6, sort_keys=False).strip()
    except yaml.YAMLError:  # a default YAML cannot represent (e.g. an arbitrary object)
        return repr(value)
    # Scalars are dumped as a document with an explicit end marker ("0.001\n...").
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text


def _suggest(word: Any, choices: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# ----------------------------------------------------------------------------------------------
# Value checking and coercion
# ----------------------------------------------------------------------------------------------


def _type_error(key: str, source: str, expected: str, value: Any, fix: str = "") -> ConfigError:
    message = f"{source}: '{key}' must be {expected}, got {_show(value)} ({type(value).__name__})"
    if value is None:
        fix = "this key cannot be null; " + (fix or "remove it to use the default")
    return ConfigError(f"{message}; {fix}" if fix else message)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where safe (``"1e-3"`` -> 0.001)."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin is Literal:
        for choice in args:
            # ``type(...) is`` so that True does not match a Literal[1] (and 1 not Literal[True]).
            if value == choice and type(value) is type(choice):
                return choice
        if isinstance(value, str):  # e.g. Literal[1, 2] given "2"
            for choice in args:
                if str(choice) == value:
                    return choice
        allowed = ", ".join(repr(a) for a in args)
        hint = _suggest(value, [str(a) for a in args])
        fix = f"did you mean {hint!r}?" if hint is not None else f"choose one of {allowed}"
        return _raise(_type_error(key, source, f"one of {allowed}", value, fix))

    if _is_union(tp):
        if value is None and _NONE_TYPE in args:
            return None
        arms = [a for a in args if a is not _NONE_TYPE]
        if len(arms) == 1:  # Optional[X]: errors are those of X, which are the most precise
            return _coerce(value, arms[0], key, source)
        for arm in arms:  # an exact type match wins over a coercion (``int | str`` given "5")
            if isinstance(arm, type) and type(value) is arm:
                return value
        for arm in arms:
            try:
                return _coerce(value, arm, key, source)
            except ConfigError:
                continue
        return _raise(_type_error(key, source, f"of type {_type_name(tp)}", value))

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, source=source, prefix=key, base=None)
        names = ", ".join(f.name for f in _init_fields(tp))
        return _raise(
            _type_error(key, source, "a mapping (a section of keys)", value, f"its keys are: {names}")
        )

    if tp is bool:
        if isinstance(value, bool):
            return value
        # CLI values and quoted YAML arrive as strings; accept only the unambiguous spellings.
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return _raise(_type_error(key, source, "a boolean", value, "write true or false"))

    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _parse_number(value)
        # Integral floats are accepted so that ``total_steps: 1e6`` (a string to PyYAML) works.
        if number is not None and math.isfinite(number) and float(number).is_integer():
            return int(number)
        return _raise(_type_error(key, source, "an integer", value, "write a whole number such as 64 or 1e6"))

    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _parse_number(value)
        if number is not None:
            return float(number)
        return _raise(_type_error(key, source, "a float", value, "write a number such as 0.001 or 1e-3"))

    if tp is str:
        if isinstance(value, str):
            return value
        return _raise(
            _type_error(
                key,
                source,
                "a string",
                value,
                f"quote the value, e.g. '{value}'" if value is not None else "",
            )
        )

    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, PurePath) or (isinstance(value, str) and value.strip()):
            return tp(value)
        return _raise(_type_error(key, source, "a path", value, "write a file or directory path as a string"))

    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            return _raise(
                _type_error(key, source, f"a {_type_name(tp)}", value, "write a list such as [64, 64]")
            )
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]

    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _raise(
                _type_error(key, source, f"a {_type_name(tp)}", value, "write a list such as [1, 2]")
            )
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            return tuple(_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            return _raise(
                ConfigError(
                    f"{source}: '{key}' must have exactly {len(args)} items ({_type_name(tp)}), "
                    f"got {len(value)}: {_show(value)}"
                )
            )
        return tuple(
            _coerce(v, t, f"{key}[{i}]", source) for i, (v, t) in enumerate(zip(value, args, strict=True))
        )

    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            return _raise(
                _type_error(key, source, f"a {_type_name(tp)}", value, "write a mapping such as {a: 1}")
            )
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, f"{key} (key {k!r})", source): _coerce(v, val_tp, _join(key, k), source)
            for k, v in value.items()
        }

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value is member or value == member.value or value == member.name:
                return member
        allowed = ", ".join(repr(m.value) for m in tp)
        return _raise(_type_error(key, source, f"one of {allowed}", value))

    # Anything else (e.g. a plain class or an abstract generic): accept instances as they are.
    check = origin if origin is not None else tp
    if isinstance(check, type):
        if isinstance(value, check):
            return value
        return _raise(_type_error(key, source, f"a {_type_name(tp)}", value))
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def _raise(error: ConfigError) -> Any:
    # Helper so the coercion branches read as ``return _raise(...)`` (keeps type checkers happy).
    raise error


def _numbers(value: Any, key: str) -> Iterator[tuple[str, int | float]]:
    """``(dotted key, number)`` for every number in a leaf value: the value, list items, mapping values."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{key}[{i}]")
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from _numbers(item, _join(key, name))


def _purpose(f: dataclasses.Field) -> str:
    """`` (what the field is)``: the first sentence of its help, to say which knob a message is about."""
    text = f.metadata.get("help", "").strip().split(". ")[0].rstrip(".")
    text = text if len(text) <= 70 else text[:67] + "..."
    return f" ({text})" if text else ""


_INT64_MAX = 2**63 - 1


def _check_value(f: dataclasses.Field, value: Any, key: str, source: str) -> None:
    """Check a coerced value against the field's bounds, finiteness and check (ConfigError if bad)."""
    bounds = field_bounds(f)
    for where, number in _numbers(value, key):
        if isinstance(number, int) and abs(number) > _INT64_MAX:  # torch and numpy would overflow
            raise ConfigError(f"{source}: '{where}' = {number} is too large{_purpose(f)}; no setting needs that")
        if isinstance(number, float) and not math.isfinite(number):
            allowed = f"a finite number {bounds.describe()}" if bounds is not None else "a finite number"
            raise ConfigError(
                f"{source}: '{where}' must be {allowed}, got {number}{_purpose(f)}; "
                "NaN and infinity are never valid settings"
            )
        if bounds is not None and not bounds.contains(number):
            raise ConfigError(
                f"{source}: '{where}' must be {bounds.describe()}, got {number!r}{_purpose(f)}; "
                f"set it to a value {bounds.describe()}"
            )
    check = field_check(f)
    if check is not None and value is not None:
        problem = check(value)
        if problem:
            raise ConfigError(f"{source}: '{key}' = {_show(value)} {problem}")


def validate_config(config: Any, *, source: str = "config", prefix: str = "") -> None:
    """Check every leaf of a config instance (e.g. one built in Python, not from YAML) like the loader does.

    Raises :class:`ConfigError` for the first value outside its bounds, non-finite, or failing its check.
    """
    for f in _init_fields(type(config)):
        value = getattr(config, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_config(value, source=source, prefix=key)
        else:
            _check_value(f, value, key, source)


def _parse_number(value: Any) -> float | int | None:
    """Parse a numeric string (``"1e-3"``, ``"64"``); None when it is not one."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        return int(text, 10)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# Building dataclasses from (merged) data
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Sourced:
    """A leaf value tagged with where it came from (used when merging YAML and CLI values).

    ``raw`` is the original command-line string, kept so that a value YAML would mis-read for a
    string field (``--run_name yes`` -> True, ``--tag 123`` -> 123) can fall back to the text.
    """

    value: Any
    source: str
    raw: str | None = None


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its factory), or MISSING for a required field."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        try:
            return f.default_factory()
        except TypeError:
            # e.g. ``default_factory=DataConfig`` where DataConfig has required fields: there is
            # no usable default, the user must supply the section's required keys.
            return MISSING
    return MISSING


def _coerce_leaf(entry: Any, tp: Any, key: str, source: str) -> Any:
    """Coerce a (possibly ``_Sourced``) leaf value; CLI strings get a second chance as plain text."""
    if not isinstance(entry, _Sourced):
        return _coerce(entry, tp, key, source)
    try:
        return _coerce(entry.value, tp, key, entry.source)
    except ConfigError as first_error:
        raw = entry.raw
        if raw is None or (isinstance(entry.value, str) and entry.value == raw):
            raise
        try:
            return _coerce(raw, tp, key, entry.source)
        except ConfigError:
            raise first_error from None


def _build(cls: type[T], data: Mapping[Any, Any], *, source: str, prefix: str, base: Any) -> T:
    """Construct ``cls`` from ``data``; ``base`` (an instance) supplies values for absent keys.

    ``base`` is the parent field's default instance, so that a partially given section keeps the
    parent's customised defaults instead of falling back to the nested class's own defaults.
    """
    hints = _type_hints(cls)
    fields = _init_fields(cls)
    names = [f.name for f in fields]

    for key in data:
        if key not in names:
            entry = data[key]
            where = entry.source if isinstance(entry, _Sourced) else source
            dotted = _join(prefix, key)
            if RENAMED_KEYS.get(key) in names:
                raise ConfigError(
                    f"{where}: '{dotted}' was renamed to '{_join(prefix, RENAMED_KEYS[key])}' (the name TRL and "
                    "transformers use); rename it in your recipe or command line"
                )
            if key in REPLACED_KEYS and REPLACED_KEYS[key][0] in names:
                new, example = REPLACED_KEYS[key]
                raise ConfigError(f"{where}: '{dotted}' was replaced by '{_join(prefix, new)}' ({example})")
            hint = _suggest(key, names)
            message = f"{where}: unknown key '{dotted}'"
            message += f"; did you mean '{_join(prefix, hint)}'?" if hint is not None else "."
            level = f" under '{prefix}'" if prefix else ""
            message += f" Valid keys{level}: {', '.join(names) if names else '(none)'}"
            raise ConfigError(message)

    kwargs: dict[str, Any] = {}
    for f in fields:
        tp = hints[f.name]
        dotted = _join(prefix, f.name)
        if f.name in data:
            entry = data[f.name]
            value = entry.value if isinstance(entry, _Sourced) else entry
            where = entry.source if isinstance(entry, _Sourced) else source
            section = _section_type(tp)
            if section is not None and isinstance(value, Mapping):
                sub_base = getattr(base, f.name) if base is not None else _field_default(f)
                sub_base = sub_base if isinstance(sub_base, section) else None
                kwargs[f.name] = _build(section, value, source=where, prefix=dotted, base=sub_base)
            else:
                kwargs[f.name] = _coerce_leaf(entry, tp, dotted, source)
                _check_value(f, kwargs[f.name], dotted, where)
        elif base is not None:
            kwargs[f.name] = copy.deepcopy(getattr(base, f.name))
        elif f.default is MISSING and f.default_factory is MISSING:
            if _is_dataclass_type(tp):
                # A required section: build it from nothing so the error names the missing leaf.
                kwargs[f.name] = _build(tp, {}, source=source, prefix=dotted, base=None)
            else:
                help_text = f.metadata.get("help", "").strip().rstrip(".")
                described = f"{_type_name(tp)}: {help_text}" if help_text else _type_name(tp)
                raise ConfigError(
                    f"{source}: missing required key '{dotted}' ({described}); "
                    f"set it in the config file or pass --{dotted} VALUE on the command line"
                )

    try:
        return cls(**kwargs)
    except ValueError as exc:  # raised by the dataclass's __post_init__ (checks that relate fields)
        message = str(exc)
        if message.startswith(f"{source}:"):
            raise
        where = f" (section '{prefix}')" if prefix else ""
        raise ConfigError(f"{source}{where}: {message}") from exc


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "config") -> T:
    """Build the (nested) dataclass ``cls`` from a mapping, checking keys and value types.

    ``source`` names where ``data`` came from (a YAML path, "command line") in error messages.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_from_dict() needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: a config must be a mapping of keys to values, got {_show(data)} ({type(data).__name__})"
        )
    return _build(cls, data, source=source, prefix="", base=None)


def _overlay(cls: type, merged: dict[Any, Any], data: Mapping[Any, Any], source: str) -> None:
    """Merge ``data`` into ``merged`` in place: sections merge key by key, leaves are replaced.

    Leaves are wrapped in :class:`_Sourced` so later errors can say which input a value came from.
    """
    hints = _type_hints(cls)
    names = {f.name for f in _init_fields(cls)}
    for key, value in data.items():
        if isinstance(value, _Sourced):
            merged[key] = value
            continue
        section = _section_type(hints[key]) if key in names else None
        if section is not None and isinstance(value, Mapping):
            current = merged.get(key)
            if not isinstance(current, dict):  # absent, or e.g. ``null`` in the YAML
                current = merged[key] = {}
            _overlay(section, current, value, source)
        else:
            merged[key] = _Sourced(value, source)


# ----------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in _init_fields(type(value))}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A nested, YAML/JSON-serialisable dict of a config (Path -> str, tuple -> list)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict() needs a dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def dump_yaml(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config to ``path`` as YAML, atomically (temp file + rename).

    Returns the path written. Parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    # The temp file lives next to the target so os.replace is a same-filesystem atomic rename:
    # a crash never leaves a half-written config behind.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        # mkstemp creates the file private (0600); give it the usual mode of a config file, or
        # keep the mode of the file being replaced.
        os.chmod(tmp_name, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


# ----------------------------------------------------------------------------------------------
# Reading YAML
# ----------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> Any:
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue  # ``<<: *anchor`` merges may legitimately be overridden by explicit keys
        ident = (key_node.tag, key_node.value)
        if ident in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key_node.value!r} (first defined on line {seen[ident] + 1})",
                key_node.start_mark,
            )
        seen[ident] = key_node.start_mark.line
    # Delegate to PyYAML's own (generator-based, recursion-safe) mapping constructor.
    yield from loader.construct_yaml_map(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML recipe; the top level must be a mapping. An empty file gives ``{}``."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file not found: {path} (looked for {file.absolute()}; relative paths are resolved "
            f"from the current directory, {Path.cwd()})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass the path of a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None

    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or str(exc)
        if mark is None:
            raise ConfigError(f"{path}: invalid YAML: {problem}") from None
        lines = text.splitlines()
        snippet = lines[mark.line].strip() if 0 <= mark.line < len(lines) else ""
        raise ConfigError(
            f"{path}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
            + (f" (in: {snippet})" if snippet else "")
            + "; fix the YAML syntax there (check indentation, colons and quotes)"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None

    if data is None:  # empty file, or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level of a config file must be a mapping of keys to values "
            f"(e.g. 'lr: 1e-3'), got a {type(data).__name__}: {_show(data)}"
        )
    return data


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Leaf:
    key: str
    tp: Any
    help: str
    default: Any  # MISSING when required
    bounds: Bounds | None = None


def _walk(
    cls: type, prefix: str, defaults: Any, sections: dict[str, tuple[str, list[_Leaf]]], stack: tuple
) -> None:
    """Collect the leaf fields of ``cls`` grouped by dotted section (``""`` is the top level)."""
    if cls in stack:
        raise TypeError(f"config {cls.__qualname__} is recursive; nested sections must form a tree")
    hints = _type_hints(cls)
    leaves = sections.setdefault(prefix, ("", []))[1]
    for f in _init_fields(cls):
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        key = _join(prefix, f.name)
        section = _section_type(tp)
        if section is not None:
            extra = " (optional section, default: null)" if default is None else ""
            sections[key] = (help_text + extra, [])
            sub_defaults = default if isinstance(default, section) else None
            _walk(section, key, sub_defaults, sections, (*stack, cls))
        else:
            leaves.append(_Leaf(key, tp, help_text, default, field_bounds(f)))


def _leaves_by_section(cls: type) -> dict[str, tuple[str, list[_Leaf]]]:
    sections: dict[str, tuple[str, list[_Leaf]]] = {}
    _walk(cls, "", None, sections, ())
    return sections


class _ArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose "unrecognized arguments" error suggests the closest option."""

    def error(self, message: str) -> typing.NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            hints = []
            for token in message[len(prefix) :].split():
                if token.startswith("--"):
                    option = token.split("=", 1)[0]
                    *section, name = option[2:].split(".")
                    renamed = "--" + ".".join([*section, RENAMED_KEYS.get(name, name)])
                    if renamed != option and renamed in known:
                        hints.append(f"{option} -> {renamed} (renamed)")
                        continue
                    replaced = "--" + ".".join([*section, REPLACED_KEYS.get(name, (name, ""))[0]])
                    if replaced != option and replaced in known:
                        hints.append(f"{option} -> {replaced} (replaced; {REPLACED_KEYS[name][1]})")
                        continue
                    guess = _suggest(option, known)
                    if guess is not None:
                        hints.append(f"{token.split('=', 1)[0]} -> {guess}")
            if hints:
                message += f" (did you mean: {', '.join(hints)}?)"
        super().error(message)


_EPILOG = """\
values are resolved as: dataclass defaults < --config file < command-line options.
command-line values are read as YAML: --lr 3e-4, --flag true, --x null, --dims "[64, 64]".
negative numbers work as values too: --time_shift -1 is read as a number.
"""


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def _recipe_value(recipe: Mapping[str, Any] | None, key: str) -> Any:
    """The value a recipe sets for a dotted key, or MISSING."""
    node: Any = recipe
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def build_parser(
    cls: type, *, prog: str, description: str = "", recipe: Mapping[str, Any] | None = None
) -> argparse.ArgumentParser:
    """An argparse parser with ``--config PATH`` and one ``--dotted.key`` option per leaf field.

    ``recipe`` (a loaded YAML recipe) makes ``--help`` show the recipe's value beside each default.
    Callers may add their own options (e.g. ``--print-config``) before parsing; turn the parsed
    namespace into a config with :func:`config_from_namespace`.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"build_parser() needs a dataclass type, got {cls!r}")
    parser = _ArgumentParser(
        prog=prog,
        description=description or None,
        epilog=_EPILOG,
        usage="%(prog)s [-h] [--config PATH] [--KEY VALUE ...]",
        # Abbreviations would silently expand a typo such as --lr_ to --lr_warmup.
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # argparse reads "-1e-3" as an option (its negative-number pattern knows no exponent), so
    # "--learning_rate -1e-3" failed with "expected one argument" instead of reaching the range check.
    parser._negative_number_matcher = _NEGATIVE_NUMBER
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="YAML recipe; its values override the defaults, and command-line options override it",
    )
    for section, (section_help, leaves) in _leaves_by_section(cls).items():
        if not leaves:
            continue
        group = parser.add_argument_group(f"{section} options", section_help or None) if section else parser
        for leaf in leaves:
            if leaf.default is MISSING:
                detail = f"{_type_name(leaf.tp)}; required"
            else:
                detail = f"{_type_name(leaf.tp)}; default: {_yaml_inline(leaf.default)}"
            if leaf.bounds is not None:
                detail = detail.replace(";", f", {leaf.bounds.describe()};", 1)
            from_recipe = _recipe_value(recipe, leaf.key)
            if from_recipe is not MISSING:
                detail = f"recipe: {_yaml_inline(from_recipe)}; {detail}"
            text = f"{leaf.help} [{detail}]" if leaf.help else f"[{detail}]"
            group.add_argument(
                f"--{leaf.key}",
                dest=_DEST_PREFIX + leaf.key,
                metavar=_metavar(leaf.tp),
                default=argparse.SUPPRESS,  # absent options must not override the YAML file
                help=text.replace("%", "%%"),  # argparse %-formats help strings
            )
    return parser


def _parse_cli_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # e.g. "[1, 2" - type checking will report it against the field's type


def config_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """Resolve a config from a namespace parsed by :func:`build_parser`'s parser."""
    config_path = getattr(namespace, "config", None)
    overrides: dict[str, Any] = {}
    for dest, raw in vars(namespace).items():
        if not dest.startswith(_DEST_PREFIX):
            continue
        *parents, name = dest[len(_DEST_PREFIX) :].split(".")
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = _Sourced(_parse_cli_value(raw), COMMAND_LINE, raw)

    merged: dict[Any, Any] = {}
    if config_path is not None:
        recipe = load_yaml(config_path)
        if not recipe:  # an empty file is a mistake (a wrong path, an unsaved editor), not "all defaults"
            raise ConfigError(
                f"{config_path}: the recipe is empty; give at least one key (e.g. output_dir: runs/x), "
                "or leave out --config to run with the defaults"
            )
        _overlay(cls, merged, recipe, str(config_path))
    _overlay(cls, merged, overrides, COMMAND_LINE)

    if config_path is None:
        source = COMMAND_LINE
    elif overrides:
        source = f"{config_path} (with command-line overrides)"
    else:
        source = str(config_path)
    return _build(cls, merged, source=source, prefix="", base=None)


def parse_config(cls: type[T], argv: Sequence[str], *, prog: str, description: str = "") -> T:
    """Parse ``[--config PATH] [--dotted.key VALUE ...]`` into ``cls``.

    Argparse problems (unknown option, missing value) exit with status 2; value problems raise
    :class:`ConfigError`.
    """
    parser = build_parser(cls, prog=prog, description=description)
    namespace = parser.parse_args(list(argv))
    return config_from_namespace(cls, namespace)
