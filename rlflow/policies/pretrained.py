"""``save_pretrained`` / ``from_pretrained`` for policies built from one config dataclass.

A saved directory is in rlflow's one model format (:mod:`rlflow.utils.model_format`): ``config.json``
(``{"model_type", "format_version", "config"}``), ``model.safetensors`` and a model card ``README.md``
(:mod:`rlflow.utils.model_card`), plus any extra JSON files a trainer asks for (e.g.
``normalization.json`` for robot policies). Each file is replaced atomically; other files in the directory
are left alone.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rlflow.config import config_from_dict
from rlflow.utils.model_format import WEIGHTS_NAME, read_model_config, write_model_config

if TYPE_CHECKING:
    from rlflow.utils.model_card import ModelCardInfo, ModelDescription


class PretrainedMixin:
    """Mixin for ``nn.Module`` policies with ``self.config`` (a dataclass) and ``__init__(config)``."""

    config_class: ClassVar[type]
    model_type: ClassVar[str]
    #: The model card's first sentence and its Hub tags (besides ``rlflow`` and the training method's).
    card_summary: ClassVar[str] = "An rlflow policy."
    card_tags: ClassVar[tuple[str, ...]] = ()

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        extra_json: dict[str, Any] | None = None,
        card: ModelCardInfo | None = None,
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + the model card ``README.md`` (+ ``<name>.json``
        per ``extra_json`` entry).

        ``card``: how the model was trained (method, reward, final metrics, recipe), from the trainers;
        without it the card says what the model is and how to load it. Only these files are replaced
        (each atomically, the config last); anything else in ``directory`` (a user's notes, a README.md
        that is not an rlflow card, other outputs) is kept.
        """
        from rlflow.utils.checkpoint import atomic_update, save_state_dict, write_json
        from rlflow.utils.model_card import write_model_card
        from rlflow.utils.model_format import LEGACY_FILES

        directory = Path(directory)
        with atomic_update(directory, owned=LEGACY_FILES) as tmp:
            write_model_config(tmp, self.model_type, asdict(self.config))
            save_state_dict(self.state_dict(), tmp / WEIGHTS_NAME)
            for name, payload in (extra_json or {}).items():
                write_json(tmp / f"{name}.json", payload)
            write_model_card(tmp, directory, self.model_card_description(), card)
        return directory

    def model_card_description(self) -> ModelDescription:
        """What the model card says about this policy (see :mod:`rlflow.utils.model_card`)."""
        from rlflow.utils.model_card import ModelDescription

        config = asdict(self.config)
        obs_dim = int(config.get("obs_dim", 0))
        shape = f"[{config.get('horizon', 1)}, {config.get('act_dim')}]"
        what = (
            f"It maps {obs_dim}-dimensional observations to action chunks of shape {shape}."
            if obs_dim
            else f"It is unconditional: it samples arrays of shape {shape}."
        )
        return ModelDescription(
            model_type=self.model_type,
            summary=f"{self.card_summary} {what}",
            loader="rlflow.policies.loading.load_policy",
            returns="policy, normalization",
            config=config,
            tags=self.card_tags,
            # A policy acting on observations is a robot / control policy; an unconditional one is not.
            pipeline_tag="reinforcement-learning" if obs_dim else None,
            usage_notes=(
                "`normalization` holds the observation/action scaling the policy was trained with "
                "(`normalization.json`; `None` when there is none): `rlflow eval` and `rlflow collect` apply it.",
            )
            if obs_dim
            else (),
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any):
        """Load a directory written by :meth:`save_pretrained`; ``overrides`` replace config fields that
        do not change parameter shapes (e.g. the sampler of a flow policy)."""
        from rlflow.utils.checkpoint import load_state_dict, load_weights_into

        directory = Path(directory)
        saved = read_model_config(
            directory, expected=cls.model_type, writer=f"{cls.__name__}.save_pretrained"
        )
        config = config_from_dict(cls.config_class, {**saved.config, **overrides}, source=str(saved.path))
        model = cls(config)
        load_weights_into(
            model, load_state_dict(directory / WEIGHTS_NAME), source=str(directory / WEIGHTS_NAME)
        )
        return model
