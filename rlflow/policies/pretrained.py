"""``save_pretrained`` / ``from_pretrained`` for policies built from one config dataclass.

A saved directory holds ``config.json`` (``{"model_type", "config"}``) and ``model.safetensors``, plus
any extra JSON files a trainer asks for (e.g. ``normalization.json`` for robot policies). Each file is
replaced atomically; other files in the directory are left alone.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from rlflow.config import config_from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class PretrainedMixin:
    """Mixin for ``nn.Module`` policies with ``self.config`` (a dataclass) and ``__init__(config)``."""

    config_class: ClassVar[type]
    model_type: ClassVar[str]

    def save_pretrained(
        self, directory: str | os.PathLike, *, extra_json: dict[str, Any] | None = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``<name>.json`` per ``extra_json`` entry).

        Only these files are replaced (each atomically, the config last); anything else in ``directory``
        (a user's notes, other outputs) is kept.
        """
        from rlflow.utils.checkpoint import atomic_update, save_state_dict, write_json

        directory = Path(directory)
        with atomic_update(directory) as tmp:
            write_json(tmp / CONFIG_NAME, {"model_type": self.model_type, "config": asdict(self.config)})
            save_state_dict(self.state_dict(), tmp / WEIGHTS_NAME)
            for name, payload in (extra_json or {}).items():
                write_json(tmp / f"{name}.json", payload)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any):
        """Load a directory written by :meth:`save_pretrained`; ``overrides`` replace config fields that
        do not change parameter shapes (e.g. the sampler of a flow policy)."""
        from rlflow.utils.checkpoint import CheckpointError, load_state_dict, load_weights_into, read_json

        directory = Path(directory)
        meta = read_json(directory / CONFIG_NAME, what=f"{cls.__name__} config")
        if not isinstance(meta, dict) or meta.get("model_type") != cls.model_type or "config" not in meta:
            found = meta.get("model_type") if isinstance(meta, dict) else None
            raise CheckpointError(
                f"{directory / CONFIG_NAME} is not a {cls.__name__} config (model_type={found!r}); "
                f"point to a directory written by {cls.__name__}.save_pretrained"
            )
        config = config_from_dict(
            cls.config_class, {**meta["config"], **overrides}, source=str(directory / CONFIG_NAME)
        )
        model = cls(config)
        load_weights_into(
            model, load_state_dict(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME)
        )
        return model
