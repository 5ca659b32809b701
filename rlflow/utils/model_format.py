"""The one save format of rlflow's own models: ``config.json`` + safetensors + a ``README.md`` model card.

Every native model directory (robot policies, reward models, shapes-world models, text-to-image
fine-tunes) carries the same metadata file::

    config.json    {"model_type": "rlflow.FlowPolicy", "format_version": 1, "config": {...}}

``model_type`` names what the directory holds (one of :data:`MODEL_TYPES`, which
:func:`rlflow.load_pretrained` dispatches on) and ``config`` is everything needed to rebuild it: the
architecture dataclass of a policy, reward model or shapes model, or the base model and LoRA settings of a
fine-tune. The weights sit beside it as safetensors (``model.safetensors`` for the small modules; diffusers'
``transformer/`` or ``pytorch_lora_weights.safetensors`` for diffusers transformers, so plain diffusers reads
them too). This is transformers' layout, so the Hub shows such a folder like any other model.

Directories written before this format (``rlflow_model.json``, ``rlflow_diffusers.json``, a reward model's
flat ``config.json``) are read through :func:`read_model_config` as well; saving into one replaces the
old file (see :data:`LEGACY_FILES`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlflow.errors import CheckpointError

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "LEGACY_FILES",
    "MODEL_TYPES",
    "WEIGHTS_NAME",
    "SavedModelConfig",
    "find_model_config",
    "peek_model_type",
    "read_model_config",
    "write_model_config",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

#: Every ``model_type`` rlflow writes, with what it is (for error messages and ``load_pretrained``).
MODEL_TYPES: dict[str, str] = {
    "rlflow.FlowPolicy": "a flow-matching robot policy",
    "rlflow.GaussianPolicy": "a Gaussian robot policy",
    "rlflow.RewardModel": "a learned reward model",
    "rlflow.ShapesModel": "a shapes-world text-to-image flow model",
    "rlflow.DiffusersFineTune": "a text-to-image fine-tune (LoRA adapters or a full transformer)",
}

#: Metadata files of the formats before this one: saving in the new format removes them.
LEGACY_FILES = ("rlflow_model.json", "rlflow_diffusers.json")

# What each legacy file held, as (file, key, value) -> new model_type.
_LEGACY_SHAPES = ("rlflow_model.json", "model_type", "shapes_t2i", "rlflow.ShapesModel")
_LEGACY_FINETUNE = ("rlflow_diffusers.json", "format", "rlflow.diffusers_flow", "rlflow.DiffusersFineTune")
_LEGACY_REWARD = ("config.json", "format", "rlflow-reward-model", "rlflow.RewardModel")


@dataclass(frozen=True)
class SavedModelConfig:
    """What a model directory's metadata says: its ``model_type`` and ``config`` and the file read."""

    model_type: str
    config: dict[str, Any]
    path: Path


def write_model_config(directory: str | os.PathLike[str], model_type: str, config: Mapping[str, Any]) -> None:
    """Write ``directory/config.json`` (atomically) for a model of ``model_type``."""
    from rlflow.utils.checkpoint import write_json

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; rlflow writes {sorted(MODEL_TYPES)}")
    write_json(
        Path(directory) / CONFIG_NAME,
        {"model_type": model_type, "format_version": FORMAT_VERSION, "config": dict(config)},
    )


def _parse(data: Any, path: Path) -> SavedModelConfig | None:
    """The metadata in ``data`` (read from ``path``), or None when it is not an rlflow model's."""
    if not isinstance(data, dict):
        return None
    model_type = data.get("model_type")
    if model_type in MODEL_TYPES and isinstance(data.get("config"), dict):
        version = data.get("format_version", 1)  # policies' config.json predates the version field
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} was written by a newer rlflow (format_version {version!r} > {FORMAT_VERSION}); "
                "upgrade rlflow"
            )
        return SavedModelConfig(model_type, dict(data["config"]), path)
    for name, key, value, new_type in (_LEGACY_SHAPES, _LEGACY_FINETUNE, _LEGACY_REWARD):
        if path.name == name and data.get(key) == value:
            if new_type == "rlflow.ShapesModel":
                config = data.get("config")
                return SavedModelConfig(new_type, dict(config), path) if isinstance(config, dict) else None
            return SavedModelConfig(
                new_type, {k: v for k, v in data.items() if k not in (key, "version")}, path
            )
    return None


def _candidate_files(directory: Path) -> list[Path]:
    return [directory / name for name in (CONFIG_NAME, *LEGACY_FILES) if (directory / name).is_file()]


def find_model_config(directory: str | os.PathLike[str], *, strict: bool = False) -> SavedModelConfig | None:
    """The metadata of an rlflow model directory, or None (no such directory, not an rlflow model).

    A metadata file that is not valid JSON counts as "not an rlflow model" unless ``strict``, when it
    raises :class:`CheckpointError` naming the file (loaders want that; a writer replacing it does not).
    """
    from rlflow.utils.checkpoint import read_json

    for path in _candidate_files(Path(directory)):
        try:
            saved = _parse(read_json(path, what="model config"), path)
        except CheckpointError:
            if strict:
                raise
            return None
        if saved is not None:
            return saved
    return None


def peek_model_type(directory: str | os.PathLike[str], *, strict: bool = False) -> str | None:
    """The ``model_type`` of :func:`find_model_config`'s metadata, or None."""
    saved = find_model_config(directory, strict=strict)
    return None if saved is None else saved.model_type


def read_model_config(
    directory: str | os.PathLike[str], *, expected: str | Collection[str], writer: str
) -> SavedModelConfig:
    """The metadata of the model saved in ``directory``, which must be one of ``expected``.

    ``writer`` says what writes such directories, for the fix in an error message (e.g.
    ``"FlowPolicy.save_pretrained (rlflow pretrain)"``). Raises :class:`CheckpointError` for a missing
    directory, missing or corrupt metadata, a model of another type, or a newer format.
    """
    from rlflow.utils.checkpoint import read_json

    directory = Path(directory)
    wanted = {expected} if isinstance(expected, str) else set(expected)
    what = " or ".join(MODEL_TYPES.get(name, name) for name in sorted(wanted))
    if not directory.is_dir():
        raise CheckpointError(
            f"model directory {directory} does not exist; point to a directory written by {writer}"
        )
    candidates = _candidate_files(directory)
    if not candidates:
        raise CheckpointError(
            f"{directory} has no {CONFIG_NAME}, so it is not {what}; point to a directory written by {writer}"
        )
    found: list[str] = []
    for path in candidates:
        data = read_json(path, what="model config")
        saved = _parse(data, path)
        if saved is None:
            if isinstance(data, dict) and "model_type" in data:
                found.append(f"model_type={data['model_type']!r} (not an rlflow model)")
            continue
        if saved.model_type in wanted:
            return saved
        found.append(f"{saved.model_type} ({MODEL_TYPES[saved.model_type]})")
    holds = f"holds {found[0]}" if found else "holds no rlflow model_type"
    raise CheckpointError(
        f"{candidates[0]} {holds}, not {what}; point to a directory written by {writer}, or load any rlflow "
        "model with rlflow.load_pretrained"
    )
