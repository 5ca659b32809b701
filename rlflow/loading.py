"""``rlflow.load_pretrained(path)``: one function that loads any model directory rlflow writes.

Every model rlflow writes is in one format (:mod:`rlflow.utils.model_format`): ``config.json`` with a
``model_type``, safetensors weights and a ``README.md`` model card. The ``model_type`` picks the loader, so a
user never has to know which trainer wrote a directory:

================================  =====================================================  =============================
``model_type`` / metadata         what it is (written by)                                loader
================================  =====================================================  =============================
``rlflow.FlowPolicy``,            a robot policy (pretrain, ppo, collect's saved         ``load_policy``
``rlflow.GaussianPolicy``         policies)
``rlflow.RewardModel``            an image or trajectory-segment reward model            ``load_reward_model``
                                  (``rlflow reward-model``)
``rlflow.ShapesModel``            a shapes-world text-to-image model (pretrain-t2i)      ``load_text_to_image_model``
``rlflow.DiffusersFineTune``      a text-to-image fine-tune: LoRA adapters or a full     ``load_text_to_image_model``
                                  transformer (grpo, nft, dpo, rwr, actor-critic)
``model_index.json``              a diffusers pipeline                                   ``load_text_to_image_model``
``config.json`` of an             a diffusers VAE (``rlflow pretrain-vae``; diffusers'   ``load_shapes_vae``
``AutoencoderKL``                 own format, so pipelines load it)
================================  =====================================================  =============================

Directories written by older rlflow versions (``rlflow_model.json``, ``rlflow_diffusers.json``) load too.
Every rlflow directory also holds the weights as safetensors and a ``README.md`` model card. A robot policy
comes back with its observation / action normalisation as ``policy.normalization`` (``None`` if it has none).
Imports are lazy: loading a policy never imports diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["load_pretrained"]


def load_pretrained(path: str | os.PathLike[str], *, device: str = "cpu") -> Any:
    """The model saved in ``path``, in eval mode on ``device`` (see the module docs for what is recognised).

    Raises :class:`~rlflow.config.ConfigError` for a path that does not exist and
    :class:`~rlflow.errors.CheckpointError` for a directory no rlflow loader recognises (naming the files
    looked for) or whose files are corrupt.
    """
    from rlflow.config import ConfigError
    from rlflow.errors import CheckpointError
    from rlflow.utils.checkpoint import read_json

    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(
            f"model directory {directory} does not exist; check the path (relative to {Path.cwd()})"
        )
    from rlflow.utils.model_format import MODEL_TYPES, peek_model_type

    model_type = peek_model_type(directory, strict=True)
    if model_type in ("rlflow.FlowPolicy", "rlflow.GaussianPolicy"):
        from rlflow.policies.loading import load_policy

        policy, normalization = load_policy(directory, device=device)
        policy.normalization = normalization
        return policy
    if model_type == "rlflow.RewardModel":
        from rlflow.reward_models.learned import load_reward_model

        return load_reward_model(directory, device=device)
    if (
        model_type in ("rlflow.ShapesModel", "rlflow.DiffusersFineTune")
        or (directory / "model_index.json").is_file()
    ):
        from rlflow.generators.loading import load_text_to_image_model

        return load_text_to_image_model(directory).to(device).eval()
    config_path = directory / "config.json"
    if config_path.is_file():
        meta = read_json(config_path, what="model config")
        if isinstance(meta, dict) and meta.get("_class_name") == "AutoencoderKL":
            from rlflow.worlds.shapes.vae import load_shapes_vae

            return load_shapes_vae(directory, device=device)
    raise CheckpointError(
        f"{directory} is not a model directory rlflow recognises: it needs a config.json whose model_type is "
        f"one of {sorted(MODEL_TYPES)}, a diffusers pipeline's model_index.json or a diffusers AutoencoderKL "
        "config.json; point to the model/ or policy/ folder of a finished run"
    )
