"""Who owns an output directory: refuse someone else's files or another command's run before writing.

Every command that writes a directory checks it here first (before any expensive work): trainers through
:func:`rlflow.utils.checkpoint.checkpoint_to_resume` (:func:`claim_output_dir`), ``rlflow sample`` and
``rlflow eval`` directly, the dataset builders with :func:`check_output_dir` and their ``overwrite`` field.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rlflow.utils.checkpoint import _MAX_KEYS_IN_MESSAGE, PathLike, atomic_write_text

__all__ = [
    "RUN_KIND_FILE",
    "RUN_MARKERS",
    "check_output_dir",
    "claim_output_dir",
    "command_of",
    "overwrite_option",
    "refuse_foreign_output_dir",
]

logger = logging.getLogger(__name__)


def overwrite_option() -> Any:
    """The ``overwrite`` field of the commands that write a preference set into ``output_dir``."""
    from rlflow.config import option

    return option(
        False,
        help="Replace the preference set already in output_dir, or write into a non-empty output_dir that "
        "holds none (its files named like ours are replaced, all others kept).",
    )


def check_output_dir(
    directory: PathLike,
    *,
    is_ours: Any,
    overwrite: bool,
    what: str,
    writes: tuple[str, ...] | list[str] = (),
    field: str = "output_dir",
) -> Path:
    """Refuse to write into a non-empty ``directory`` that is not one of our own outputs.

    Call it before any expensive work. An absent or empty directory, or one that ``is_ours(directory)``
    recognises as an earlier output of the same command, is fine (the command then replaces only the
    files it writes). Anything else raises :class:`~rlflow.config.ConfigError` naming the path, a few of
    its entries and the fix, unless ``overwrite`` is set: then the command replaces its own files (named
    in ``writes``) and leaves every other file alone.

    Args:
        directory: the configured output directory.
        is_ours: ``directory -> bool``, whether it holds an output of this command.
        overwrite: the config's ``overwrite`` field.
        what: what the command writes, for the message (e.g. ``"a preference set"``).
        writes: the names the command writes (for the messages).
        field: the config field holding ``directory``.
    """
    from rlflow.config import ConfigError

    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field} {path} is a file, not a directory; choose a directory for {what}")
    if not path.is_dir():
        return path
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return path
    if is_ours(path):
        if overwrite:
            return path
        # An earlier output of this command is a result someone may still want: replace it only on request.
        raise ConfigError(
            f"{field} {path} already holds {what}; set overwrite: true to replace it, or choose a new {field}"
        )
    replaced = f" (it replaces only {', '.join(writes)})" if writes else ""
    if overwrite:
        logger.warning(
            "%s %s is not empty and holds no %s; overwrite: true, so its files of the same names%s are "
            "replaced and everything else is kept",
            field,
            path,
            what,
            replaced,
        )
        return path
    listing = ", ".join(entries[:_MAX_KEYS_IN_MESSAGE]) + (
        f", ... ({len(entries) - _MAX_KEYS_IN_MESSAGE} more)" if len(entries) > _MAX_KEYS_IN_MESSAGE else ""
    )
    raise ConfigError(
        f"{field} {path} is not empty ({listing}) and does not hold {what}, so nothing was written: choose "
        f"an empty {field} or set overwrite: true to write into it anyway{replaced}; other files are never "
        "deleted"
    )


# What every trainer writes first into its output_dir: a directory holding one of these is a run of ours.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")


def refuse_foreign_output_dir(run_dir: PathLike) -> None:
    """Refuse an ``output_dir`` that holds files but is not an rlflow run (ConfigError naming a few).

    A trainer writes config.yaml, metrics.jsonl, plots/, checkpoints/ and its model into the directory;
    in a directory of someone else's files those names could replace theirs, and a later cleanup could
    not tell the two apart. An empty or missing directory, or an earlier run of ours, is fine.
    """
    from rlflow.config import ConfigError

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any((run_dir / marker).exists() for marker in RUN_MARKERS):
        return
    entries = sorted(entry.name for entry in run_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ConfigError(
            f"output_dir {run_dir} is not empty and is not an rlflow run (it holds {shown}); a run writes "
            "config.yaml, metrics.jsonl, plots/, checkpoints/ and its model there: choose a new or empty "
            "output_dir"
        )


RUN_KIND_FILE = ".rlflow_run.json"


def command_of(config: Any) -> str:
    """The ``rlflow`` command whose config ``config`` is (``grpo``, ``nft``, ...), else its class name."""
    from rlflow.cli import COMMANDS

    spec = f"{type(config).__module__}:{type(config).__name__}"
    return next((name for name, command in COMMANDS.items() if command.config == spec), type(config).__name__)


def claim_output_dir(run_dir: PathLike, command: str) -> None:
    """Make ``run_dir`` this command's output directory, or refuse it (ConfigError).

    A directory records the command that first wrote it (``.rlflow_run.json``), so ``rlflow rwr`` pointed at a
    GRPO run does not take over its checkpoints, and ``rlflow sample`` or ``rlflow eval`` pointed at a training
    run does not replace its config.yaml and summary.json. A directory without the record must be empty, or an
    earlier rlflow run (:func:`refuse_foreign_output_dir`), which then gets the record.
    """
    from rlflow.config import ConfigError

    run_dir = Path(run_dir)
    record = run_dir / RUN_KIND_FILE
    if record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8")).get("command")
        except (OSError, ValueError, AttributeError):
            recorded = None  # an unreadable record is rewritten below
        if recorded == command:
            return
        if recorded is not None:
            raise ConfigError(
                f"output_dir {run_dir} holds an `rlflow {recorded}` run; `rlflow {command}` would mix its files "
                "with that run's: choose a new output_dir"
            )
    else:
        refuse_foreign_output_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps({"command": command}) + "\n")
