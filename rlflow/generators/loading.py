"""Load any text-to-image flow model rlflow can train, from one path: the dispatcher behind ``model.path``.

- an rlflow shapes model directory (``model_type: rlflow.ShapesModel``: the built-in world's base model);
- a directory written by ``DiffusersFlowModel.save_pretrained`` (``model_type: rlflow.DiffusersFineTune``:
  LoRA adapters or a full fine-tune) whose base is a shapes model or a diffusers pipeline;
- a diffusers pipeline directory or hub id (``DiffusersFlowModel.from_pretrained``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlflow.config import ConfigError
from rlflow.utils.model_format import find_model_config, peek_model_type

SHAPES_MODEL = "rlflow.ShapesModel"
FINE_TUNE = "rlflow.DiffusersFineTune"


def looks_local(source: str) -> bool:
    """Whether a model source can only be a local path: hub ids are exactly ``owner/name``."""
    if source.startswith(("/", ".", "~")) or "\\" in source or os.sep != "/" and os.sep in source:
        return True
    parts = source.split("/")
    # "runs/base" is shaped like a hub id, but when ./runs exists the user meant the local directory.
    return len(parts) != 2 or not all(parts) or Path(parts[0]).is_dir()


def load_text_to_image_model(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """A :class:`~rlflow.generators.diffusers_flow.DiffusersFlowModel` from ``path`` (see the module doc).

    ``kwargs`` go to ``DiffusersFlowModel.from_pretrained`` for pipelines (``guidance_scale``,
    ``resolution``, ``torch_dtype``, ...); shapes models take only ``guidance_scale``.
    """
    from rlflow.generators.diffusers_flow import DiffusersFlowModel

    directory = Path(path)
    if not directory.exists() and looks_local(str(path)):
        # Not a hub id: trying it on the hub would only wait for a network time-out and then blame the hub.
        raise ConfigError(
            f"model path {str(path)!r} does not exist; check the path (relative paths start from "
            f"{Path.cwd()}), or give a hub id such as 'stabilityai/stable-diffusion-3.5-medium'"
        )
    saved = find_model_config(directory, strict=True)
    model_type = None if saved is None else saved.model_type
    if model_type == SHAPES_MODEL:
        from rlflow.worlds.shapes.model import load_shapes_model

        model = load_shapes_model(directory)
        model.base_model = str(directory)  # recorded by save_pretrained, so fine-tunes find their base
        if kwargs.get("guidance_scale") is not None:
            model.guidance_scale = float(kwargs["guidance_scale"])
        return model
    if model_type == FINE_TUNE:
        meta = saved.config
        base = meta.get("base_model")
        if base is not None and peek_model_type(base) == SHAPES_MODEL:
            model = load_text_to_image_model(base, **kwargs)
            if meta.get("lora") is not None:
                model.load_lora(directory)
            else:
                model.load_transformer(directory)
            return model
    return DiffusersFlowModel.from_pretrained(str(path), **kwargs)
