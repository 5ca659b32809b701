"""The ``rlflow`` command line: ``rlflow <command> [--config recipe.yaml] [--dotted.key value ...]``.

Commands are registered in :data:`COMMANDS` by *import strings* and imported only when that
command runs (or its ``--help`` is asked), so ``rlflow --help`` never pays for torch or the
optional extras. Adding a command is one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlflow.config import ConfigError, build_parser, config_from_namespace, config_to_dict, load_yaml
from rlflow.errors import CheckpointError, DataError, NonFiniteError, RewardServerError

__all__ = ["COMMANDS", "Command", "main"]

PROG = "rlflow"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Exit statuses: 2 is what argparse uses for usage errors, so config errors match it.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """A subcommand: ``config`` and ``entry`` are ``"module.path:attr"`` strings, imported lazily.

    ``config`` names a dataclass (declared with :func:`rlflow.config.option`); ``entry`` names a
    function ``fn(config) -> dict | None`` that runs the command and returns its summary.
    """

    config: str
    entry: str
    summary: str


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        config="rlflow.trainers.pretrain:PretrainConfig",
        entry="rlflow.trainers.pretrain:train",
        summary="Flow-matching pretraining / behaviour cloning on (condition, target) data.",
    ),
    "ppo": Command(
        config="rlflow.trainers.ppo:PPOConfig",
        entry="rlflow.trainers.ppo:train",
        summary="PPO in MuJoCo: ReinFlow fine-tuning of flow policies, or a Gaussian-policy baseline.",
    ),
    "eval": Command(
        config="rlflow.evaluate:EvalConfig",
        entry="rlflow.evaluate:evaluate",
        summary="Evaluate a saved robot policy: returns (deterministic and stochastic), a video, plots.",
    ),
    "collect": Command(
        config="rlflow.data.collect:CollectConfig",
        entry="rlflow.data.collect:collect",
        summary="Record demonstrations (npz / local Minari) from a saved policy in a MuJoCo task.",
    ),
    "pretrain-vae": Command(
        config="rlflow.trainers.vae_pretrain:VAEPretrainConfig",
        entry="rlflow.trainers.vae_pretrain:train",
        summary="Train the latent shapes world's autoencoder (a diffusers AutoencoderKL) on rendered images.",
    ),
    "pretrain-t2i": Command(
        config="rlflow.trainers.t2i_pretrain:T2IPretrainConfig",
        entry="rlflow.trainers.t2i_pretrain:train",
        summary="Flow-matching pretraining of the built-in text-to-image model on the shapes world.",
    ),
    "grpo": Command(
        config="rlflow.trainers.grpo:GRPOConfig",
        entry="rlflow.trainers.grpo:train",
        summary="GRPO for text-to-image flow models: Flow-GRPO, Flow-GRPO-Fast, TempFlow-GRPO.",
    ),
    "reward-server": Command(
        config="rlflow.reward_models.remote:RewardServerConfig",
        entry="rlflow.reward_models.remote:serve",
        summary="Serve a reward function over HTTP for `rlflow grpo` (rewards: {remote: {url: ...}}).",
    ),
    "preferences": Command(
        config="rlflow.worlds.shapes.preferences:BuildPreferencesConfig",
        entry="rlflow.worlds.shapes.preferences:build_preferences",
        summary="Build a pairwise preference set for the shapes world, labelled by the hidden oracle.",
    ),
    "segment-preferences": Command(
        config="rlflow.data.segment_preferences:SegmentPreferencesConfig",
        entry="rlflow.data.segment_preferences:build_segment_preferences",
        summary="Noisy preferences between trajectory segments of a MuJoCo task (rater on the true return).",
    ),
    "reward-model": Command(
        config="rlflow.trainers.reward_model:RewardModelTrainConfig",
        entry="rlflow.trainers.reward_model:train",
        summary="Train a reward model (Bradley-Terry, optionally with ties) on a preference set.",
    ),
    "dpo": Command(
        config="rlflow.trainers.dpo:DPOConfig",
        entry="rlflow.trainers.dpo:train",
        summary="Flow-DPO for text-to-image flow models: offline preference pairs or online best-vs-worst.",
    ),
    "rwr": Command(
        config="rlflow.trainers.rwr:RWRConfig",
        entry="rlflow.trainers.rwr:train",
        summary="Flow-RWR: online reward-weighted flow matching on the current policy's samples.",
    ),
    "nft": Command(
        config="rlflow.trainers.nft:NFTConfig",
        entry="rlflow.trainers.nft:train",
        summary="DiffusionNFT: online RL on the forward process (old-policy samples, implicit +/- policies).",
    ),
    "actor-critic": Command(
        config="rlflow.trainers.actor_critic:ActorCriticConfig",
        entry="rlflow.trainers.actor_critic:train",
        summary="Actor-critic reward-weighted flow matching (AC-Flow style) or ORW-CFM-W2 (--use_critic false).",
    ),
    "sample": Command(
        config="rlflow.sample:SampleConfig",
        entry="rlflow.sample:sample",
        summary="Sample a text-to-image flow model, optionally with Flow-NRG reward guidance.",
    ),
}


class _LoadError(Exception):
    """A command's module or attribute could not be imported."""


def _load(ref: str) -> Any:
    """Import ``"package.module:attr"``."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise _LoadError(f"bad import string {ref!r}; expected 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if missing == module_name or module_name.startswith(missing + "."):
            raise _LoadError(
                f"module {module_name!r} does not exist (is rlflow installed completely?)"
            ) from exc
        if missing.split(".")[0] == "rlflow":
            raise _LoadError(f"importing {module_name!r} failed: {exc}") from exc
        # A third-party dependency of the command is missing: usually an optional extra.
        raise _LoadError(
            f"it needs the package {missing!r}, which is not installed "
            "(optional features come as extras, e.g. pip install 'rlflow[mujoco]' or 'rlflow[diffusers]')"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise _LoadError(f"module {module_name!r} has no attribute {attr!r}") from None


def _version() -> str:
    import rlflow

    version = getattr(rlflow, "__version__", None)
    if version:
        return str(version)
    from importlib import metadata

    try:
        return metadata.version("rlflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def _usage() -> str:
    return f"usage: {PROG} <command> [--config PATH] [--KEY VALUE ...]\n       {PROG} [--help | --version]\n"


def _overview(commands: Mapping[str, Command]) -> str:
    width = max((len(name) for name in commands), default=0)
    lines = [
        _usage(),
        "Fine-tune and align flow-matching (rectified-flow) models with reinforcement and preference learning.",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {command.summary}" for name, command in commands.items()),
        "",
        "options:",
        "  -h, --help  show this message and exit",
        "  --version   print the rlflow version and exit",
        "",
        f"Run '{PROG} <command> --help' for the options of a command.",
    ]
    return "\n".join(lines)


def _error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, *, commands: Mapping[str, Command] | None = None) -> int:
    """Run the ``rlflow`` command line and return its exit status.

    ``commands`` replaces the registry (tests inject small commands this way).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    registry = COMMANDS if commands is None else commands

    if not args:
        print(_overview(registry), file=sys.stderr)
        return EXIT_USAGE
    first, rest = args[0], args[1:]
    if first in ("-h", "--help"):
        print(_overview(registry))
        return EXIT_OK
    if first == "--version":
        print(f"{PROG} {_version()}")
        return EXIT_OK
    if first.startswith("-"):
        _error(PROG, f"unknown option {first!r}; the command comes first: {PROG} <command> [options]")
        print(_usage(), file=sys.stderr, end="")
        return EXIT_USAGE
    if first not in registry:
        matches = difflib.get_close_matches(first, list(registry), n=1)
        hint = f"; did you mean {matches[0]!r}?" if matches else ""
        _error(PROG, f"unknown command {first!r}{hint} Available commands: {', '.join(registry) or '(none)'}")
        return EXIT_USAGE
    return _run(first, registry[first], rest)


def _recipe_for_help(argv: list[str]) -> dict[str, Any] | None:
    """With ``--help``, the ``--config`` recipe's values, so the help shows what this run would use."""
    if not any(arg in ("-h", "--help") for arg in argv):
        return None
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        return None
    try:
        return load_yaml(path)
    except ConfigError:  # --help still works; the run itself reports the broken recipe
        return None


def _run(name: str, command: Command, argv: list[str]) -> int:
    prog = f"{PROG} {name}"
    try:
        config_cls = _load(command.config)
    except _LoadError as exc:
        _error(prog, f"cannot load the command's config ({command.config}): {exc}")
        return EXIT_FAILURE
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        _error(prog, f"{command.config} is not a dataclass")
        return EXIT_FAILURE

    parser = build_parser(config_cls, prog=prog, description=command.summary, recipe=_recipe_for_help(argv))
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit without running "
        f"(e.g. '{prog} --print-config > my.yaml' gives a recipe to edit)",
    )
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    try:
        config = config_from_namespace(config_cls, namespace)
    except ConfigError as exc:
        _error(prog, str(exc))
        return EXIT_USAGE

    if namespace.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False), end="")
        return EXIT_OK

    try:
        entry: Callable[[Any], Any] = _load(command.entry)
    except _LoadError as exc:
        _error(prog, f"cannot load the command ({command.entry}): {exc}")
        return EXIT_FAILURE

    # basicConfig is a no-op when the host application already configured logging.
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        entry(config)
    except ConfigError as exc:  # a config problem only the command could detect (e.g. a bad data file)
        _error(prog, str(exc))
        return EXIT_USAGE
    except CheckpointError as exc:  # a corrupt or mismatched checkpoint: the message names file and fix
        _error(prog, str(exc))
        return EXIT_FAILURE
    except DataError as exc:  # a malformed data file (e.g. a preference set) is a corrupt artefact: exit 1
        _error(prog, str(exc))
        return EXIT_FAILURE
    except RewardServerError as exc:  # a remote reward server is down or misbehaving: URL, problem, fix
        _error(prog, str(exc))
        return EXIT_USAGE
    except NonFiniteError as exc:  # NaN/inf weights, losses or rewards, stopped before a checkpoint
        _error(prog, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error(prog, "interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:  # the file system or the network: a full disk, a permission, a missing file
        _error(prog, _describe_os_error(exc))
        return EXIT_USAGE
    except MemoryError:
        _error(prog, "out of memory; lower the batch / chunk sizes (e.g. sample_chunk_size, minibatch_size)")
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - a bug: show where, but still end with one sentence
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
            _error(prog, "out of GPU memory; lower the batch / chunk sizes, or use LoRA / DeepSpeed offload")
            return EXIT_USAGE
        logging.getLogger(PROG).error("unexpected error, traceback follows", exc_info=exc)
        _error(
            prog,
            f"unexpected {type(exc).__name__}: {exc}; this is a bug in rlflow, not in your input: "
            "please report it with the traceback above",
        )
        return EXIT_FAILURE
    return EXIT_OK


def _describe_os_error(exc: OSError) -> str:
    """One sentence for an OSError: what failed on which file, and what to do."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        return f"the disk is full{where}; free some space or choose an output_dir on another disk"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: {reason}; choose a writable output_dir or fix the permissions"
    if exc.errno == errno.ENOENT:
        return f"no such file or directory{where}; check the path"
    return f"{reason}{where}" if exc.strerror else str(exc)
