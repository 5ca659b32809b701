"""Model cards for every saved rlflow model, and the upload of a saved model to the Hugging Face Hub.

Every native ``save_pretrained`` (flow and Gaussian policies, diffusers fine-tunes, shapes world models,
the shapes VAE, reward models) writes ``README.md`` next to its weights, inside the same
:func:`~rlflow.utils.checkpoint.atomic_update` as the weights. The card is a Hugging Face Hub model card:
YAML front matter (``library_name: rlflow``, ``tags``, ``base_model`` when it is a Hub id,
``pipeline_tag`` where one applies, and rlflow's own fields ``method``, ``reward`` and ``final_metrics``),
then a short Markdown body: what the model is, how to load it, the final metrics and the resolved
training recipe. What the card says about training comes from a :class:`ModelCardInfo`, which the
trainers build with :func:`model_card_info` from their config and summary when they save the final
model; a save without one (from Python) writes a minimal card: the model type, its config and how to load
it.

``final_metrics`` is not the Hub's ``metrics`` field: that one is a list of metric ids, and the Hub
rejects other shapes. ``base_model`` is written only for Hub ids (a local path goes in the body): the
Hub also rejects a ``base_model`` that is not a repository id.

A ``README.md`` that is not an rlflow card (no ``library_name: rlflow`` in its front matter) is a user's
file: it is kept, and that save writes no card.

``push_to_hub: true`` + ``hub_model_id`` in a trainer's config uploads the final model folder after it is
saved locally (:func:`push_run_to_hub` -> :func:`push_folder_to_hub`); a missing token or an unreachable
Hub is a one-line :class:`HubError` (a :class:`~rlflow.config.ConfigError`) that names the local folder,
which is complete either way.

Importing this module imports neither torch nor ``huggingface_hub`` (configs call
:func:`check_hub_fields` from ``__post_init__``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlflow.config import ConfigError, option

__all__ = [
    "CARD_NAME",
    "HubError",
    "ModelCardInfo",
    "ModelDescription",
    "check_hub_fields",
    "hub_model_id_option",
    "is_rlflow_card",
    "model_card_info",
    "push_folder_to_hub",
    "push_run_to_hub",
    "push_to_hub_option",
    "read_front_matter",
    "render_model_card",
    "saved_model_dir",
    "training_method",
    "write_model_card",
]

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
LIBRARY_NAME = "rlflow"

#: Summary entries that describe the run rather than the model's quality: shown as "Training", not metrics.
RUN_FACTS = (
    "steps",
    "iterations",
    "env_steps",
    "nfe",
    "num_parameters",
    "wall_seconds",
    "train_pairs",
    "heldout_pairs",
    "ties_dropped",
)
#: Methods that are reinforcement learning (tagged so on the Hub).
RL_METHODS = ("grpo", "nft", "rwr", "actor-critic", "ppo", "reinflow")
#: Config keys whose values never go into a card (a remote reward server's token, ...).
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api_key|apikey|credential", re.IGNORECASE)
# Hub repository ids: "name" or "owner/name", letters, digits, "-", "_", "." (at most 96 each).
_REPO_ID = re.compile(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}")


class HubError(ConfigError):
    """Uploading a saved model to the Hugging Face Hub failed (no token, Hub unreachable, refused).

    Raised only after the local save: the message names the local folder, which is complete, and how to
    retry. A :class:`~rlflow.config.ConfigError`, so the CLI prints it as one line (exit status 2).
    """


# ---------------------------------------------------------------------------------------------------------
# What a card says
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelCardInfo:
    """What a card says about how a model was trained (built by :func:`model_card_info` in the trainers).

    Attributes:
        method: the training method: the rlflow command (``grpo``, ``nft``, ``dpo``, ``rwr``,
            ``actor-critic``, ``pretrain``, ``pretrain-t2i``, ``pretrain-vae``, ``reward-model``), or
            ``reinflow`` / ``ppo`` for PPO on a flow / Gaussian policy.
        base_model: the model it was fine-tuned from (a Hub id or a local path), if any.
        reward: the reward it was trained on (the config's ``rewards``, a preference set, ...).
        metrics: the final metrics (``summary.json``'s numbers).
        training: facts about the run (``steps`` / ``iterations``, ``wall_seconds``, ...).
        recipe: the resolved training config (``config.yaml``'s content).
        tags: extra Hub tags (e.g. the method's family).
        hub_model_id: the Hub repository the model is pushed to (the card's load snippet downloads it).
        notes: free text added to the card's body.
    """

    method: str | None = None
    base_model: str | None = None
    reward: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    tags: list[str] = field(default_factory=list)
    hub_model_id: str | None = None
    notes: str | None = None


@dataclass(frozen=True)
class ModelDescription:
    """What a saved model says about itself (filled in by its ``save_pretrained``).

    ``loader`` is the dotted path of the function that loads the directory (``rlflow.policies.loading.
    load_policy``); ``returns`` is what the card's snippet assigns its result to.
    """

    model_type: str
    summary: str
    loader: str
    returns: str = "model"
    config: dict[str, Any] | None = None
    tags: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    base_model: str | None = None
    usage_notes: tuple[str, ...] = ()


def training_method(config: Any) -> str:
    """The method a trainer config trains with: its ``rlflow`` command (``grpo``, ``pretrain-t2i``, ...),
    except PPO: ``reinflow`` for a flow policy, ``ppo`` for the Gaussian baseline."""
    from rlflow.cli import COMMANDS

    cls = type(config)
    name = f"{cls.__module__}:{cls.__qualname__}"
    method = next((command for command, spec in COMMANDS.items() if spec.config == name), None)
    if method is None:
        method = re.sub(r"(?<!^)(?=[A-Z])", "-", cls.__name__.removesuffix("Config")).lower()
    if method == "ppo":
        return "reinflow" if getattr(config, "policy_type", None) == "flow" else "ppo"
    return method


def _method_tags(config: Any, method: str) -> list[str]:
    tags = [method]
    if method in RL_METHODS:
        tags.append("reinforcement-learning")
    if method == "dpo":
        tags.append("preference-optimization")
    variant = getattr(config, "variant", None)
    if isinstance(variant, str) and method == "grpo":
        tags.append(variant.replace("_", "-"))
    if method == "actor-critic" and getattr(config, "use_critic", True) is False:
        tags.append("orw-cfm-w2")
    return tags


def _base_model(config: Any) -> str | None:
    """What a config fine-tunes: ``model.path`` (text-to-image trainers) or ``pretrained`` (PPO); ``None``
    when it trains from scratch."""
    model = getattr(config, "model", None)
    for value in (getattr(model, "path", None), getattr(config, "pretrained", None)):
        if isinstance(value, str) and value:
            return value
    return None


def _reward(config: Any) -> Any:
    """The reward a config trains on, when it has one."""
    if getattr(config, "mode", None) == "offline" and getattr(config, "preferences", None):
        return {"preferences": config.preferences, "dimension": getattr(config, "dimension", None)}
    if getattr(config, "learned_reward", None):  # PPO on a learned reward model
        return {"learned_reward": config.learned_reward, "head": getattr(config, "learned_reward_head", None)}
    rewards = getattr(config, "rewards", None)
    if rewards:
        return rewards
    task = getattr(config, "task", None)
    if isinstance(task, str):
        return f"{task} environment return"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_card_info(config: Any, summary: Mapping[str, Any]) -> ModelCardInfo:
    """The :class:`ModelCardInfo` of a trainer's final model from its config and its summary.

    Every trainer calls this one helper: the summary's numbers become the card's metrics (those in
    :data:`RUN_FACTS`, such as ``steps``, its "Training" line), nested entries and strings are left out;
    the recipe is the resolved config.
    """
    from rlflow.config import config_to_dict

    method = training_method(config)
    metrics = {
        key: float(value) for key, value in summary.items() if _is_number(value) and key not in RUN_FACTS
    }
    training = {key: summary[key] for key in RUN_FACTS if _is_number(summary.get(key))}
    return ModelCardInfo(
        method=method,
        base_model=_base_model(config),
        reward=_reward(config),
        metrics=metrics,
        training=training,
        recipe=config_to_dict(config),
        tags=_method_tags(config, method),
        hub_model_id=getattr(config, "hub_model_id", None),
    )


# ---------------------------------------------------------------------------------------------------------
# Rendering and writing
# ---------------------------------------------------------------------------------------------------------


def _redact(value: Any) -> Any:
    """``value`` with every secret-looking key's value replaced (cards are meant to be published)."""
    if isinstance(value, Mapping):
        return {
            key: "<redacted>" if _SECRET_KEY.search(str(key)) and item is not None else _redact(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redact(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    """YAML-safe builtins (numpy scalars -> float, tuples -> lists, paths -> str)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (str, bool, int, type(None))):
        return value
    if isinstance(value, numbers.Real):  # float, numpy scalars
        return float(value)
    return str(value)


def _hub_id(model: str | None) -> str | None:
    """``model`` when it is a Hub repository id (not a local path), else ``None``."""
    if not model:
        return None
    from rlflow.generators.loading import looks_local

    return None if looks_local(model) or Path(model).exists() else model


def _location(directory: Path, info: ModelCardInfo | None) -> tuple[str, str | None]:
    """``(the loader's argument, an import it needs)`` for the card's snippet."""
    if info is not None and info.hub_model_id:
        return f'snapshot_download("{info.hub_model_id}")', "from huggingface_hub import snapshot_download"
    # A save staged under a hidden temporary name (a checkpoint being written) has no useful path yet.
    if any(part.startswith(".") and part not in (".", "..") for part in directory.parts):
        return '"path/to/this/folder"', None
    return f'"{directory.as_posix()}"', None


def _command(method: str | None) -> str | None:
    """The ``rlflow`` command of a method (PPO trains both ``reinflow`` and ``ppo``)."""
    return "ppo" if method in ("reinflow", "ppo") else method


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _front_matter(description: ModelDescription, info: ModelCardInfo | None) -> dict[str, Any]:
    tags = [LIBRARY_NAME, *description.tags, *(info.tags if info is not None else ())]
    base = (info.base_model if info is not None else None) or description.base_model
    data: dict[str, Any] = {
        "library_name": LIBRARY_NAME,
        "tags": list(dict.fromkeys(tags)),  # in order, once each
        "base_model": _hub_id(base),
        "pipeline_tag": description.pipeline_tag,
    }
    if info is not None:
        data["method"] = info.method
        data["reward"] = _plain(_redact(info.reward)) if info.reward is not None else None
        data["final_metrics"] = _plain(info.metrics) if info.metrics else None
    return {key: value for key, value in data.items() if value is not None}


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _body(description: ModelDescription, info: ModelCardInfo | None, directory: Path) -> str:
    from rlflow import __version__

    # The Hub repository's name, else the run's (output_dir): a final model's folder is just "policy"/"model".
    run = (info.recipe or {}).get("output_dir") if info is not None else None
    if info is not None and info.hub_model_id:
        title = info.hub_model_id.split("/")[-1]
    elif isinstance(run, str) and Path(run).name:
        title = Path(run).name
    else:
        title = directory.name
    lines = [f"# {title or description.model_type}", "", description.summary]
    command = _command(info.method) if info is not None else None
    if info is not None and info.method:
        trained = f"Trained with `rlflow {command}`" + (" (ReinFlow)" if info.method == "reinflow" else "")
        base = info.base_model or description.base_model
        if base:
            trained += f", starting from `{base}`"
        if isinstance(info.reward, str):
            trained += f"; reward: {info.reward}"
        lines += ["", trained + "."]
        facts = []
        for key in ("steps", "iterations", "env_steps"):
            if key in info.training:
                count = int(info.training[key])
                noun = key.replace("_", " ")
                facts.append(f"{count:,} {noun if count != 1 else noun.removesuffix('s')}")
        if "wall_seconds" in info.training:
            facts.append(f"{_duration(float(info.training['wall_seconds']))} of wall time")
        if "num_parameters" in info.training:
            facts.append(f"{int(info.training['num_parameters']):,} trained parameters")
        if facts:
            lines += ["", "Training: " + ", ".join(facts) + "."]
    elif description.base_model:
        lines += ["", f"Base model: `{description.base_model}`."]
    if info is not None and info.notes:
        lines += ["", info.notes]

    argument, extra_import = _location(directory, info)
    module, _, function = description.loader.rpartition(".")
    imports = [line for line in (extra_import, f"from {module} import {function}") if line]
    lines += [
        "",
        "## How to load it",
        "",
        "```python",
        *imports,
        "",
        f"{description.returns} = {function}({argument})",
        "```",
    ]
    for note in description.usage_notes:
        lines += ["", note]

    if info is not None and info.metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_number(value)} |" for key, value in info.metrics.items()]
    if info is not None and info.reward is not None and isinstance(info.reward, Mapping):
        lines += ["", "## Reward", "", "```yaml", _yaml(_plain(_redact(info.reward))).rstrip(), "```"]
    if info is not None and info.recipe is not None:
        lines += [
            "",
            "## Training recipe",
            "",
            f"The resolved config (`rlflow {command} --config recipe.yaml` reruns it):"
            if command
            else "The resolved config:",
            "",
            "```yaml",
            _yaml(_plain(_redact(info.recipe))).rstrip(),
            "```",
        ]
    elif description.config is not None:
        lines += [
            "",
            "## Model config",
            "",
            "```yaml",
            _yaml(_plain(_redact(description.config))).rstrip(),
            "```",
        ]
    lines += ["", f"Saved by rlflow {__version__} (model type `{description.model_type}`)."]
    return "\n".join(lines) + "\n"


def render_model_card(
    description: ModelDescription, info: ModelCardInfo | None = None, *, directory: str | Path = "."
) -> str:
    """The text of ``README.md``: Hub front matter, then the body (see the module docstring).

    Rendered through ``huggingface_hub.ModelCard`` / ``ModelCardData`` when that package is installed
    (it is with the ``diffusers`` extra), else written directly in the same format.
    """
    data = _front_matter(description, info)
    body = _body(description, info, Path(directory))
    if importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub import ModelCard, ModelCardData

        card_data = ModelCardData(**data)
        return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}", ignore_metadata_errors=True))
    return f"---\n{_yaml(data)}---\n\n{body}"


def read_front_matter(text: str) -> dict[str, Any] | None:
    """The YAML between a card's first two ``---`` lines (``None`` when there is none or it is not YAML)."""
    import yaml

    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        return None
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def is_rlflow_card(path: Path) -> bool:
    """Whether ``path`` is a card an rlflow save wrote (front matter with ``library_name: rlflow``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    data = read_front_matter(text)
    return data is not None and data.get("library_name") == LIBRARY_NAME


def write_model_card(
    staging: Path, directory: Path, description: ModelDescription, info: ModelCardInfo | None
) -> bool:
    """Write ``README.md`` into ``staging`` (an :func:`~rlflow.utils.checkpoint.atomic_update` staging
    directory of ``directory``), so the card is published with the weights; returns whether it was.

    A ``README.md`` already in ``directory`` that is not an rlflow card is the user's: it is kept and no
    card is written.
    """
    existing = directory / CARD_NAME
    if existing.exists() and not is_rlflow_card(existing):
        logger.warning(
            "%s is not an rlflow model card (no library_name: rlflow); keeping it, so no card is written",
            existing,
        )
        return False
    (staging / CARD_NAME).write_text(
        render_model_card(description, info, directory=directory), encoding="utf-8"
    )
    return True


# ---------------------------------------------------------------------------------------------------------
# The Hugging Face Hub
# ---------------------------------------------------------------------------------------------------------


def push_to_hub_option() -> Any:
    """The ``push_to_hub`` field every trainer config declares (transformers' name)."""
    return option(
        False,
        help="After the final save, upload the model folder (weights + README.md model card) to the "
        "Hugging Face Hub repository hub_model_id (needs a token: `hf auth login` or HF_TOKEN).",
    )


def hub_model_id_option() -> Any:
    """The ``hub_model_id`` field every trainer config declares (transformers' name)."""
    return option(None, help="push_to_hub: the Hub repository, 'owner/name' or 'name' (created if missing).")


def check_hub_fields(config: Any) -> None:
    """The checks of ``push_to_hub`` / ``hub_model_id`` every trainer config runs in ``__post_init__``:
    pushing needs a repository id (and ``huggingface_hub``), and the id must be one the Hub accepts, so a
    long run does not fail only at its upload."""
    repo_id = getattr(config, "hub_model_id", None)
    if getattr(config, "push_to_hub", False) and not repo_id:
        raise ConfigError(
            "push_to_hub: true needs hub_model_id (the Hub repository to push to, e.g. your-name/my-model); "
            "set hub_model_id, or push_to_hub: false"
        )
    if repo_id is not None and (
        not _REPO_ID.fullmatch(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or any(part[0] in "-." or part[-1] in "-." for part in repo_id.split("/"))
    ):
        raise ConfigError(
            f"hub_model_id {repo_id!r} is not a Hub repository id; use 'name' or 'owner/name' (letters, "
            "digits, '-', '_' and '.', not starting or ending with '-' or '.')"
        )
    if getattr(config, "push_to_hub", False) and importlib.util.find_spec("huggingface_hub") is None:
        raise ConfigError(
            "push_to_hub: true needs the huggingface_hub package: pip install huggingface_hub (or set "
            "push_to_hub: false)"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def push_folder_to_hub(folder: str | Path, repo_id: str, commit_message: str) -> str:
    """Upload ``folder`` (a saved model, its ``README.md`` included) to the Hub repository ``repo_id``,
    creating the repository if needed; returns its URL.

    ``HfApi().create_repo(repo_id, exist_ok=True)`` then ``upload_folder`` (hidden files, such as
    interrupted-write temporaries, are left out). Raises :class:`HubError` (one line, naming the local
    folder, which stays complete) when ``huggingface_hub`` is missing, there is no token, the Hub is
    unreachable or it refuses the upload.
    """
    folder = Path(folder)
    retry = (
        f"the model is saved in {folder}: rerun the same command to retry the upload (a finished run is not "
        f"trained again), or upload it yourself with `hf upload {repo_id} {folder}`"
    )
    if not folder.is_dir():
        raise HubError(f"cannot push {folder} to the Hub: it is not a directory")
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(
            f"push_to_hub needs the huggingface_hub package (pip install huggingface_hub); {retry}"
        ) from None
    if huggingface_hub.get_token() is None:
        raise HubError(
            f"no Hugging Face token to push {repo_id} with: run `hf auth login` or set HF_TOKEN; {retry}"
        )
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=commit_message,
            ignore_patterns=[".*", "*/.*"],
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, refusal: every failure is the same one line
        raise HubError(
            f"pushing {folder} to the Hub as {repo_id} failed ({_one_line(exc)}); {retry}"
        ) from exc
    return str(url)


def saved_model_dir(summary: Mapping[str, Any]) -> str | None:
    """The final model's folder a trainer's summary names (``policy_dir`` or ``model_dir``)."""
    return next((summary[key] for key in ("policy_dir", "model_dir") if summary.get(key)), None)


def push_run_to_hub(config: Any, summary: Mapping[str, Any]) -> str | None:
    """After a trainer's final save: push the folder its summary names (:func:`saved_model_dir`) to
    ``config.hub_model_id`` if ``config.push_to_hub``; returns the repository URL (``None`` when not
    pushing). Every trainer calls this once its final model and ``summary.json`` are written."""
    if not getattr(config, "push_to_hub", False):
        return None
    check_hub_fields(config)
    folder = saved_model_dir(summary)
    if folder is None:
        raise HubError("push_to_hub: this run's summary names no saved model folder to push")
    method = training_method(config)
    message = f"rlflow {method}: {Path(getattr(config, 'output_dir', folder)).name}"
    url = push_folder_to_hub(folder, config.hub_model_id, message)
    logger.info("pushed %s to %s", folder, url)
    return url
