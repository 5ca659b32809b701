"""Crash-safe checkpoint I/O: atomic files and directories, safetensors weights, JSON, training state.

Design rules
------------
* Every write goes to a temporary sibling first, is fsynced, and is then moved into place with
  ``os.replace``, so a reader (or a resumed run after a crash) sees either the old file or the new one,
  never a half-written one. Temporaries are "hidden" names starting with ``.`` that the checkpoint
  discovery functions ignore.
* Model weights are stored as safetensors (no pickle). Optimizer / scheduler / RNG state is stored with
  ``torch.save`` but is always read back with ``torch.load(weights_only=True)``; :func:`save_training_state`
  refuses to write anything that such a load could not read back.
* Every failure to read a checkpoint raises :class:`CheckpointError` whose message names the file and
  says what to do about it.
* Nothing a user put in a directory is deleted: :func:`atomic_directory` (whole-directory replace) is only
  for ``checkpoints/step_N``, which rlflow owns; ``save_pretrained`` and data writers use
  :func:`atomic_update`, which replaces only the entries it writes; commands check a user-chosen output
  directory first with :func:`check_output_dir`. Stale temporaries are removed by their exact name only.
* No NaN/inf reaches a checkpoint: the trainers call :func:`check_finite_checkpoint` before publishing one
  (:class:`NonFiniteError` names the step, the tensors and the likely cause).

Checkpoint layout used by the trainers::

    run_dir/checkpoints/step_00001000/   <- one complete, atomically published directory per save
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# Re-exported: defined without torch so the CLI can catch it without importing this module.
from rlflow.errors import CheckpointError, NonFiniteError  # noqa: F401

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "atomic_directory",
    "atomic_file",
    "atomic_update",
    "atomic_write_bytes",
    "atomic_write_text",
    "checkpoint_to_resume",
    "check_finite_checkpoint",
    "check_finite_loss",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_state_dict",
    "load_training_state",
    "load_weights_into",
    "prune_checkpoints",
    "read_json",
    "read_safetensors_metadata",
    "remove_stale_checkpoint_temporaries",
    "remove_stale_temporaries",
    "save_state_dict",
    "save_training_state",
    "to_builtin",
    "write_json",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Complete checkpoint directories are named exactly like this; temporaries created by
# ``atomic_directory`` start with "." and therefore never match.
_STEP_DIR_RE = re.compile(r"step_(\d+)")
# The exact tail of every temporary name made by ``_temp_sibling`` (``.<name>.<tag>-<12 hex>``): stale
# temporaries are recognised by it, so cleaning up can never touch a file we did not create.
_TEMP_TAGS = ("tmp", "old", "del")
_TEMP_TAIL = r"\.(?:tmp|old|del)-[0-9a-f]{12}"
# The staging directory of ``atomic_update``, created inside the directory it updates.
_STAGING_NAME = "rlflow-staging"
# How many offending keys an error message lists per category before eliding the rest.
_MAX_KEYS_IN_MESSAGE = 5


# ---------------------------------------------------------------------------------------------------------
# Atomic file-system primitives
# ---------------------------------------------------------------------------------------------------------


def _temp_sibling(path: Path, tag: str) -> Path:
    """A unique hidden name next to ``path`` (same directory => same file system => rename is atomic)."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory by path; best effort where the OS does not support it.

    Directories must be fsynced on POSIX for a rename inside them to be durable. Windows cannot open
    directories, and fsync there needs a writable handle, hence the flag choice and the suppression.
    """
    flags = os.O_RDONLY if os.name == "posix" else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; publish it atomically on clean exit.

    The yielded path exists (empty); the body overwrites it with the complete content (with any
    library: ``safetensors``, ``torch.save``, ``savefig`` ...). On clean exit the file is fsynced and
    ``os.replace``-d onto ``path``; if the body raises, the temporary is removed and an existing
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    # Pre-create the temporary (exclusive create reserves the name) to learn the default permissions
    # (0o666 & ~umask): some writers (e.g. safetensors 0.8) create 0o600 files, which would make
    # checkpoints unreadable to the rest of a team sharing a run directory.
    with open(tmp, "xb"):
        pass
    default_mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_file body did not write {tmp} (destination {path})")
        if tmp.stat().st_mode & 0o777 != default_mode:
            os.chmod(tmp, default_mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_path(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (temp file in the same directory, fsync, ``os.replace``)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text``."""
    atomic_write_bytes(path, text.encode(encoding))


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: contents must be durable *before* a rename publishes
    them, otherwise a power cut could leave a published directory with empty files."""
    for parent, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(parent) / name)
        _fsync_path(Path(parent))


def _swap_directory(new: Path, final: Path) -> None:
    """Rename the complete directory ``new`` to ``final``, replacing an existing ``final`` directory.

    ``os.replace`` cannot overwrite a non-empty directory, so the old one is renamed aside first and deleted
    only once the new one is in place (it is put back if the second rename fails).
    """
    old: Path | None = None
    if final.is_dir() and not final.is_symlink():
        old = _temp_sibling(final, "old")
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)  # put the previous version back
        raise
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final_dir: PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and publish it as ``final_dir`` in one rename.

    Yields a fresh, empty sibling directory (``.<name>.tmp-<id>``). On clean exit every file in it is
    fsynced and it is swapped into place: an existing ``final_dir`` is first renamed aside
    (``.<name>.old-<id>``), the new directory is renamed to ``final_dir`` and the old one is deleted.
    If the body raises, the temporary directory is deleted and an existing ``final_dir`` is untouched.

    A concurrent reader therefore sees the old complete directory, briefly no directory, or the new
    complete directory; never a half-written one.

    Because the whole of an existing ``final_dir`` is replaced, use this only for directories that
    rlflow owns entirely (``checkpoints/step_N``); to write files into a directory a user may share with
    other files (``save_pretrained``, an ``output_dir``) use :func:`atomic_update`.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_order(entry: Path) -> tuple[bool, str]:
    # JSON files are the manifests of every format written this way (a model's config.json, a
    # checkpoint's meta.json): publishing them last means an interrupted update never announces weights
    # that are not in place yet.
    return (entry.suffix == ".json", entry.name)


def _remove_entry(path: Path) -> None:
    """Delete a file, link or directory (a directory is renamed to a hidden name first, so nobody sees it
    half deleted)."""
    if path.is_dir() and not path.is_symlink():
        doomed = _temp_sibling(path, "del")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_update(directory: PathLike, *, owned: tuple[str, ...] | list[str] = ()) -> Iterator[Path]:
    """Write entries into ``directory``, replacing only the entries written; every other file stays.

    Yields an empty staging directory (hidden, inside ``directory``, so every rename stays on one file
    system). Write the new files and sub-directories there. On clean exit each top-level entry of the
    staging directory replaces the entry of the same name in ``directory`` atomically (a file with one
    ``os.replace``, a sub-directory with the swap of :func:`atomic_directory`), JSON manifests last. If the
    body raises, the staging directory is deleted and ``directory`` is untouched.

    Args:
        directory: created if missing; may hold other files (a user's notes, other runs), which are never
            touched.
        owned: further names that belong to this format but were not written this time (e.g. the
            ``transformer/`` of a full fine-tune when LoRA adapters are saved instead); existing entries
            of these names are removed so the directory does not describe two models at once.

    Each entry is replaced atomically, not the set: a reader racing the update can see new weights next
    to the previous manifest, which the loaders reject with a mismatch error rather than loading garbage.
    """
    final = Path(directory)
    final.mkdir(parents=True, exist_ok=True)
    staging = final / f".{_STAGING_NAME}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    written: set[str] = set()
    try:
        yield staging
        entries = sorted(staging.iterdir(), key=_publish_order)
        _fsync_tree(staging)
        for entry in entries:
            target = final / entry.name
            if entry.is_dir() and not entry.is_symlink():
                if target.exists() and not target.is_dir():
                    raise FileExistsError(
                        f"{target} is a file, but this writer puts a directory there; move that file away"
                    )
                _swap_directory(entry, target)
            else:
                if target.is_dir() and not target.is_symlink():
                    raise IsADirectoryError(
                        f"{target} is a directory, but this writer puts a file there; move that directory away"
                    )
                os.replace(entry, target)
            written.add(entry.name)
        for name in owned:
            if name not in written and (final / name).exists():
                _remove_entry(final / name)
        _fsync_path(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Temporaries an earlier, interrupted update of this directory left behind (ours only, by exact name).
    remove_stale_temporaries(final, names=[_STAGING_NAME, *written, *owned])


def remove_stale_temporaries(
    directory: PathLike, *, names: Any = None, pattern: str | None = None
) -> list[Path]:
    """Delete the temporaries that an interrupted write of ours left in ``directory``; returns them.

    Only entries named exactly like our temporaries are removed: ``.<name>.tmp-<12 hex>`` (and ``.old-`` /
    ``.del-``) where ``<name>`` is one of ``names`` or fully matches the regular expression ``pattern``.
    Call it when nothing else writes to ``directory`` (a run directory belongs to one run at a time): an
    in-progress write of another process would look stale too.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    alternatives = [re.escape(name) for name in (names or ())]
    if pattern is not None:
        alternatives.append(f"(?:{pattern})")
    if not alternatives:
        return []
    stale_re = re.compile(rf"\.(?:{'|'.join(alternatives)}){_TEMP_TAIL}")
    removed = []
    for entry in directory.iterdir():
        if stale_re.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
            logger.info("removed %s, left behind by an interrupted write", entry)
    return removed


# ---------------------------------------------------------------------------------------------------------
# safetensors weights
# ---------------------------------------------------------------------------------------------------------


def _prepare_for_safetensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors rejects views and shared storage)."""
    out: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {type(key).__name__} ({key!r})")
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a torch.Tensor")
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # Clone when the storage is shared with another entry (tied weights) or when the tensor is a
        # slice of a bigger storage: both make safetensors refuse to save.
        if (ptr in seen_storages and t.numel() > 0) or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen_storages.add(ptr)
        out[key] = t
    return out


def save_state_dict(
    state_dict: Mapping[str, Tensor], path: PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically save tensors to a ``.safetensors`` file.

    Args:
        state_dict: name -> tensor of any shape/dtype/device; non-contiguous tensors, views and tensors
            sharing storage (tied weights) are copied so that each entry is stored independently.
        path: destination file (parent directories are created).
        metadata: optional string -> string header metadata (e.g. ``{"format": "pt", "step": "100"}``).
    """
    from safetensors.torch import save_file

    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise TypeError(f"safetensors metadata must map str -> str; offending entries: {bad!r}")
    tensors = _prepare_for_safetensors(state_dict)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _corrupt_message(path: Path, exc: BaseException) -> str:
    return (
        f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); the checkpoint cannot be used "
        "— re-save it or point to another checkpoint"
    )


def load_state_dict(path: PathLike, *, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load every tensor of a ``.safetensors`` file.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"weights file {path} does not exist; check the checkpoint path (was the run saved there?)"
        )
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # SafetensorError, OSError, ... : all mean "this file is unusable"
        raise CheckpointError(_corrupt_message(path, exc)) from exc


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata stored in a ``.safetensors`` header (empty dict when none), without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; check the checkpoint path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(_corrupt_message(path, exc)) from exc


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _prefix_hint(unexpected: list[str], missing: list[str]) -> str:
    """Recognise the usual wrapper prefixes (DDP / torch.compile) so the message can name the fix."""
    for prefix in ("module.", "_orig_mod."):
        if unexpected and all(k.startswith(prefix) for k in unexpected):
            stripped = {k[len(prefix) :] for k in unexpected}
            if stripped & set(missing):
                return (
                    f" Hint: the checkpoint keys carry a {prefix!r} prefix (saved from a wrapped model); "
                    "save the unwrapped module's state_dict instead."
                )
    return ""


def load_weights_into(module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str) -> None:
    """Strictly load ``state_dict`` into ``module``, with an actionable error when they do not match.

    Args:
        module: the freshly built model.
        state_dict: name -> tensor, e.g. from :func:`load_state_dict`.
        source: where the weights come from (a path or description), quoted in error messages.

    Raises:
        CheckpointError: listing (up to 5 of each) missing keys, unexpected keys and shape mismatches
            (with both shapes), and saying that the checkpoint does not match the model's config.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise CheckpointError(
            f"checkpoint {source} does not match the model's config — "
            + "; ".join(parts)
            + ". Build the model with the config the checkpoint was saved with (its config.yaml), "
            "or point to a checkpoint of this model." + _prefix_hint(unexpected, missing)
        )
    try:
        module.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied; keys/shapes were checked above
        raise CheckpointError(f"could not load checkpoint {source} into the model: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------


def to_builtin(obj: Any, *, nonfinite_to_none: bool = True, _where: str = "value") -> Any:
    """Convert ``obj`` to plain JSON/YAML-safe Python data (dict/list/str/int/float/bool/None).

    Handles mappings, sequences, sets, dataclasses, enums, ``Path``, numpy arrays/scalars and tensors
    (single-element tensors become scalars, others nested lists). Non-finite floats become ``None`` when
    ``nonfinite_to_none`` (strict JSON has no NaN/Infinity). Anything else raises ``TypeError`` naming
    where it was found, instead of silently writing ``repr`` strings.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if nonfinite_to_none and not math.isfinite(obj):
            return None
        return float(obj)
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu()
        return to_builtin(
            obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist(),
            nonfinite_to_none=nonfinite_to_none,
            _where=_where,
        )
    if isinstance(obj, (np.ndarray, np.generic)):
        return to_builtin(obj.tolist(), nonfinite_to_none=nonfinite_to_none, _where=_where)
    if isinstance(obj, enum.Enum):
        return to_builtin(obj.value, nonfinite_to_none=nonfinite_to_none, _where=_where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            key = to_builtin(k, nonfinite_to_none=False, _where=f"{_where} key")
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{_where}: mapping key {k!r} is not a scalar")
            out[key] = to_builtin(v, nonfinite_to_none=nonfinite_to_none, _where=f"{_where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [
            to_builtin(v, nonfinite_to_none=nonfinite_to_none, _where=f"{_where}[{i}]")
            for i, v in enumerate(obj)
        ]
    if isinstance(obj, (set, frozenset)):
        items = [to_builtin(v, nonfinite_to_none=nonfinite_to_none, _where=f"{_where} item") for v in obj]
        try:
            return sorted(items)  # deterministic output for reproducible files
        except TypeError:
            return items
    raise TypeError(f"{_where} has type {type(obj).__name__}, which cannot be written as JSON/YAML")


def write_json(path: PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """Atomically write ``obj`` as indented (2 spaces) strict JSON.

    ``obj`` goes through :func:`to_builtin` first, so tensors / numpy scalars / Paths are accepted and
    NaN/inf are written as ``null`` (keeping the file readable by any JSON parser).
    """
    text = json.dumps(to_builtin(obj), indent=2, sort_keys=sort_keys, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: PathLike, *, what: str) -> Any:
    """Read a JSON file; ``what`` describes it for error messages (e.g. ``"run summary"``).

    Raises:
        CheckpointError: the file is missing or is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist; check the path (was the run saved there?)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{what} file {path} is not valid JSON ({exc}); it is truncated or was edited by hand — "
            "fix or regenerate it"
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# Training state (optimizer / scheduler / RNG / counters)
# ---------------------------------------------------------------------------------------------------------


def save_training_state(path: PathLike, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a training-state dict that :func:`load_training_state` can read back.

    ``state`` may contain tensors, optimizer / LR-scheduler ``state_dict()``s, Python scalars, strings,
    lists/tuples/dicts and RNG states from :func:`rlflow.utils.seeding.capture_rng_state`.

    Raises:
        TypeError: ``state`` contains an object that ``torch.load(weights_only=True)`` would refuse
            (e.g. a numpy array or a custom class); nothing is written in that case.
    """
    if not isinstance(state, dict):
        raise TypeError(f"training state must be a dict, got {type(state).__name__}")
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        # Fail at save time rather than at resume time, when the run that produced it is long gone.
        find_unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        if find_unsafe is not None:
            unsafe = find_unsafe(str(tmp))
            if unsafe:
                raise TypeError(
                    f"training state for {path} contains objects that torch.load(weights_only=True) "
                    f"cannot load: {sorted(unsafe)}; convert them to tensors / Python scalars / lists "
                    "(for RNG states use rlflow.utils.seeding.capture_rng_state)"
                )


def load_training_state(path: PathLike) -> dict[str, Any]:
    """Load a training-state dict with ``torch.load(weights_only=True, map_location="cpu")``.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or holds non-allowlisted objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"training state {path} does not exist; the checkpoint is incomplete — resume from another "
            "checkpoint or start a fresh run"
        )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except torch.serialization.pickle.UnpicklingError as exc:  # weights_only refused an object
        raise CheckpointError(
            f"{path} cannot be loaded with weights_only=True ({exc}); it was not written by "
            "save_training_state or holds arbitrary Python objects — re-save it or point to another checkpoint"
        ) from exc
    except Exception as exc:  # truncated zip, garbage bytes, ...
        raise CheckpointError(_corrupt_message(path, exc)) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a training-state dict")
    return state


# ---------------------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------------------


def checkpoint_to_resume(
    run_dir: PathLike, *, resume: bool, main: bool = True, command: str | None = None
) -> Path | None:
    """The latest checkpoint of ``run_dir`` to resume from, or None for a fresh run.

    With ``resume=False`` an existing checkpoint is an error rather than being mixed with a new run.
    Every trainer calls this when it starts, so this is where the main process (``main``) removes the
    temporary checkpoint directories an interrupted run left in ``run_dir/checkpoints``
    (:func:`remove_stale_checkpoint_temporaries`); other processes of a distributed run leave them.
    """
    from rlflow.config import ConfigError

    if main:
        from rlflow.utils.output_dirs import claim_output_dir, refuse_foreign_output_dir

        if command is not None:
            claim_output_dir(run_dir, command)
        else:
            refuse_foreign_output_dir(run_dir)
        remove_stale_checkpoint_temporaries(run_dir)
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise ConfigError(
            f"output_dir {run_dir} already has checkpoints ({existing.name}); set resume: true to continue that "
            "run or choose a new output_dir"
        )
    return existing


def remove_stale_checkpoint_temporaries(run_dir: PathLike) -> list[Path]:
    """Delete ``run_dir/checkpoints/.step_<N>.{tmp,old,del}-<id>``: what :func:`atomic_directory` and
    :func:`prune_checkpoints` leave when the process dies mid-write (they are never resumed from, and a
    checkpoint can be gigabytes). Nothing else is touched. Returns the removed paths."""
    return remove_stale_temporaries(Path(run_dir) / "checkpoints", pattern=_STEP_DIR_RE.pattern)


def checkpoint_dir(run_dir: PathLike, step: int) -> Path:
    """``run_dir/checkpoints/step_{step:08d}`` (zero padding keeps lexicographic == numeric order)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: PathLike) -> list[tuple[int, Path]]:
    """All complete checkpoint directories of a run as ``(step, path)``, sorted by increasing step.

    Only directories named ``step_<digits>`` count: the hidden temporaries of :func:`atomic_directory`
    (in-progress or left by a crash) and directories being deleted are ignored.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR_RE.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    found.sort(key=lambda item: item[0])
    return found


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The complete checkpoint directory with the highest step, or ``None`` if there is none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns the deleted directories."""
    if keep_last < 1:
        raise ValueError(
            f"keep_last must be >= 1 (deleting every checkpoint is never intended), got {keep_last}"
        )
    removed = []
    for _step, path in list_checkpoints(run_dir)[:-keep_last]:
        # Rename to a hidden name first so that readers never see a partly deleted checkpoint.
        doomed = _temp_sibling(path, "del")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
        logger.debug("pruned checkpoint %s", path)
    return removed


# ---------------------------------------------------------------------------------------------------------
# Finiteness: a checkpoint is never written with NaN/inf in it
# ---------------------------------------------------------------------------------------------------------


def _named_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
    """Every floating-point tensor in a module / (nested) state dict / list, with a readable name."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _named_tensors(value, f"{prefix}[{index}]")


def _scan(
    named: list[tuple[str, Tensor]], limit: float | None = None
) -> tuple[list[str], list[tuple[str, float]]]:
    """``(names of the tensors holding a NaN/inf, [(name, max |value|)] of finite ones above limit)``.

    One reduction per tensor (max |value|, which is NaN/inf exactly when the tensor holds one) and one
    device-to-host copy per device for all of them, so checking a large model costs one sync, not one per
    tensor.
    """
    named = [(name, t) for name, t in named if t.numel()]
    peaks = [0.0] * len(named)
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append(index)
    with torch.no_grad():
        for indices in by_device.values():
            maxima = torch.stack(
                [torch.linalg.vector_norm(named[i][1].detach(), ord=math.inf).float() for i in indices]
            )
            for index, value in zip(indices, maxima.cpu().tolist(), strict=True):
                peaks[index] = value
    nonfinite = [name for (name, _), peak in zip(named, peaks, strict=True) if not math.isfinite(peak)]
    exploded = [
        (name, peak)
        for (name, _), peak in zip(named, peaks, strict=True)
        if limit is not None and math.isfinite(peak) and peak > limit
    ]
    return nonfinite, exploded


def _nonfinite_settings(obj: Any, prefix: str = "") -> list[str]:
    """``field=value`` for every NaN/inf float of a (nested) config dataclass."""
    out: list[str] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out += _nonfinite_settings(getattr(obj, f.name), f"{prefix}{f.name}")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            out += _nonfinite_settings(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            out += _nonfinite_settings(value, f"{prefix}[{index}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        out.append(f"{prefix}={obj}")
    return out


#: |weight| above which finite weights are not checkpointed: no trained network has weights anywhere near
#: this, while one diverged update (Adam moves each weight by about the learning rate) reaches it, and the
#: next forward pass overflows: a checkpoint of such weights would fail on every resume.
EXPLODED_WEIGHT = 1e20
#: Lower bar used only to explain a non-finite loss (three layers of 1e12 weights already overflow float32).
_SUSPECT_WEIGHT = 1e12


def _config_cause(config: Any) -> str | None:
    settings = _nonfinite_settings(config) if config is not None else []
    if not settings:
        return None
    return (
        f"the config has non-finite values ({_listing(settings)}): set them to finite numbers (a NaN/inf "
        "learning rate, kl_beta or max_grad_norm makes the weights NaN at the first update)"
    )


_DIVERGED_FIX = "lower the learning rate (and keep gradient clipping, max_grad_norm, finite)"


def check_finite_checkpoint(
    checkpoint: PathLike,
    *,
    where: str,
    weights: Mapping[str, Any],
    optimizers: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    losses: Mapping[str, Any] | None = None,
    config: Any = None,
) -> None:
    """Raise :class:`NonFiniteError` (and write nothing) if the checkpoint about to be written holds NaN/inf.

    Every trainer calls this before it publishes ``checkpoints/step_N`` (the step loop, the iteration loop
    and PPO), so a diverged run stops with the previous checkpoint intact instead of making it the latest
    one, which every later resume would load and crash on again.

    Args:
        checkpoint: the checkpoint directory that would be written (named in the message).
        where: the loop position, e.g. ``"step 200"`` or ``"iteration 3"``.
        weights: label -> module, state dict or (nested) tensors: what the checkpoint stores as weights
            (the model, the EMA, a critic).
        optimizers: label -> ``torch.optim.Optimizer`` (or its ``state_dict()``): moments and the
            param groups' learning rates.
        state: label -> other (nested) tensors saved with the checkpoint (e.g. a reward normaliser).
        losses: name -> the last update's loss values (``None`` entries ignored); a non-finite one also
            stops the checkpoint, and finite ones tell a diverged update from bad rewards.
        config: the run's config dataclass: its NaN/inf fields are named as the likely cause.
    """
    groups: dict[str, list[tuple[str, Tensor]]] = {"weights": [], "optimizer state": [], "state": []}
    for label, obj in weights.items():
        groups["weights"] += list(_named_tensors(obj, label))
    bad_lrs: list[str] = []
    for label, optimizer in (optimizers or {}).items():
        saved = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        groups["optimizer state"] += list(_named_tensors(saved.get("state", {}), f"{label}.state"))
        for index, group in enumerate(saved.get("param_groups", [])):
            lr = group.get("lr")
            if isinstance(lr, float) and not math.isfinite(lr):
                bad_lrs.append(f"{label}.param_groups[{index}].lr={lr}")
    for label, obj in (state or {}).items():
        groups["state"] += list(_named_tensors(obj, label))
    finite_losses = {k: float(v) for k, v in (losses or {}).items() if v is not None}
    bad_losses = {k: v for k, v in finite_losses.items() if not math.isfinite(v)}
    bad: dict[str, list[str]] = {}
    exploded: list[tuple[str, float]] = []
    for kind, named in groups.items():
        bad[kind], large = _scan(named, EXPLODED_WEIGHT if kind == "weights" else None)
        exploded += large
    if not any(bad.values()) and not exploded and not bad_lrs and not bad_losses:
        return
    found = [f"NaN/inf in {kind} ({len(names)}): {_listing(names)}" for kind, names in bad.items() if names]
    if exploded:
        shown = [f"{name} (max |w| {peak:.3g})" for name, peak in exploded]
        found.append(f"exploded weights above {EXPLODED_WEIGHT:.0e} ({len(shown)}): {_listing(shown)}")
    if bad_lrs:
        found.append(f"NaN/inf learning rates: {_listing(bad_lrs)}")
    if bad_losses:
        found.append("NaN/inf last loss: " + ", ".join(f"{k}={v}" for k, v in bad_losses.items()))
    cause = _config_cause(config)
    if cause is None and bad_lrs:
        cause = "the learning rate is non-finite: set a finite learning rate (and check its schedule)"
    elif cause is None and bad_losses:
        cause = (
            "the loss was non-finite: NaN/inf rewards (check the reward model or the environment) or an "
            "extreme loss coefficient (kl_beta / beta)"
        )
    elif cause is None and (bad["weights"] or exploded):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in finite_losses.items())
        cause = (
            "the weights became non-finite or exploded in an update"
            + (f" whose loss was finite ({shown})" if shown else "")
            + f": the update diverged; {_DIVERGED_FIX}"
        )
    elif cause is None:
        cause = (
            "the optimizer state overflowed (huge or non-finite gradients) while the weights are still "
            f"finite; {_DIVERGED_FIX}"
        )
    checkpoint = Path(checkpoint)
    previous = latest_checkpoint(checkpoint.parent.parent)
    kept = (
        f"the latest good checkpoint {previous} is untouched: fix the cause and resume from it"
        if previous is not None
        else "there is no earlier checkpoint: fix the cause and start again"
    )
    raise NonFiniteError(
        f"training stopped at {where}: {'; '.join(found)}. Likely cause: "
        f"{cause}. Checkpoint {checkpoint} was not written; {kept}."
    )


def check_finite_loss(
    loss: Tensor, *, where: str, weights: Mapping[str, Any], config: Any = None, name: str = "loss"
) -> None:
    """Raise :class:`NonFiniteError` before ``loss`` touches the weights if it is NaN/inf.

    The cause is read from the weights the loss was computed with: non-finite or exploded weights mean
    the *previous* update diverged (with a finite loss: learning rate / gradient clipping); finite,
    ordinary weights mean the loss's inputs were bad (rewards, advantages, a coefficient). Only the check
    of ``loss`` runs on the normal path (one scalar sync); the weights are inspected on failure.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    value = loss.detach().float().cpu().reshape(-1)[0].item()
    named = [item for label, obj in weights.items() for item in _named_tensors(obj, label)]
    bad, large = _scan(named, _SUSPECT_WEIGHT)
    cause = _config_cause(config)
    if cause is None and bad:
        cause = (
            f"the weights were already non-finite ({len(bad)} tensors: {_listing(bad)}): the previous "
            f"optimizer step diverged although its loss was finite; {_DIVERGED_FIX}"
        )
    if cause is None:
        if large:
            tensor_name, peak = max(large, key=lambda item: item[1])
            cause = (
                f"the weights exploded (|{tensor_name}| reaches {peak:.3g}), so the forward pass overflowed: an "
                f"earlier update diverged; {_DIVERGED_FIX}"
            )
        else:
            cause = (
                "the weights are finite, so the loss's inputs were not: NaN/inf rewards, advantages or returns "
                "(check the reward model or the environment) or an extreme loss coefficient (kl_beta / beta)"
            )
    raise NonFiniteError(
        f"the {name} is {value} at {where}, before the update. Likely cause: {cause}. No weight was changed "
        "by it and the last checkpoint is intact."
    )
