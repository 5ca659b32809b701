"""``rlflow.load_pretrained(path)``: one function that loads any model directory rlflow writes.

Which loader runs is decided by the directory's metadata file, so a user never has to know which trainer
wrote a directory:

==============================================  =================================================  ==========
metadata in the directory                       what it is (written by)                            loader
==============================================  =================================================  ==========
``config.json`` with a policy ``model_type``    ``FlowPolicy`` / ``GaussianPolicy`` (pretrain,     ``load_policy``
                                                ppo, collect's saved policies)
``config.json`` with ``format:                  an image or trajectory-segment reward model        ``load_reward_model``
rlflow-reward-model``                           (``rlflow reward-model``)
``rlflow_model.json``                           a shapes-world text-to-image model (pretrain-t2i)  ``load_text_to_image_model``
``rlflow_diffusers.json``                       a text-to-image fine-tune: LoRA adapters or a      ``load_text_to_image_model``
                                                full transformer (grpo, nft, dpo, rwr, ...)
``model_index.json``                            a diffusers pipeline                               ``load_text_to_image_model``
``config.json`` with ``_class_name:             a diffusers VAE (``rlflow pretrain-vae``)          ``load_shapes_vae``
AutoencoderKL``
==============================================  =================================================  ==========

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
    if any(
        (directory / name).is_file()
        for name in ("rlflow_model.json", "rlflow_diffusers.json", "model_index.json")
    ):
        from rlflow.generators.loading import load_text_to_image_model

        return load_text_to_image_model(directory).to(device).eval()
    config_path = directory / "config.json"
    if config_path.is_file():
        meta = read_json(config_path, what="model config")
        if isinstance(meta, dict):
            from rlflow.policies.loading import POLICY_CLASSES

            if meta.get("model_type") in POLICY_CLASSES:
                from rlflow.policies.loading import load_policy

                policy, normalization = load_policy(directory, device=device)
                policy.normalization = normalization
                return policy
            from rlflow.reward_models.learned import FORMAT_NAME

            if meta.get("format") == FORMAT_NAME:
                from rlflow.reward_models.learned import load_reward_model

                return load_reward_model(directory, device=device)
            if meta.get("_class_name") == "AutoencoderKL":
                from rlflow.worlds.shapes.vae import load_shapes_vae

                return load_shapes_vae(directory, device=device)
    raise CheckpointError(
        f"{directory} is not a model directory rlflow recognises: it needs config.json (a policy or a reward "
        "model), rlflow_model.json (a shapes model), rlflow_diffusers.json (a fine-tune), model_index.json (a "
        "diffusers pipeline) or a diffusers AutoencoderKL config.json; point to the model/ or policy/ folder "
        "of a finished run"
    )
