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
from rlflow.errors import CheckpointError  # noqa: F401

__all__ = [
    "CheckpointError",
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "checkpoint_to_resume",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_state_dict",
    "load_training_state",
    "load_weights_into",
    "prune_checkpoints",
    "read_json",
    "read_safetensors_metadata",
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


@contextlib.contextmanager
def atomic_directory(final_dir: PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and publish it as ``final_dir`` in one rename.

    Yields a fresh, empty sibling directory (``.<name>.tmp-<id>``). On clean exit every file in it is
    fsynced and it is swapped into place: an existing ``final_dir`` is first renamed aside
    (``.<name>.old-<id>``), the new directory is renamed to ``final_dir`` and the old one is deleted.
    If the body raises, the temporary directory is deleted and an existing ``final_dir`` is untouched.

    A concurrent reader therefore sees the old complete directory, briefly no directory, or the new
    complete directory; never a half-written one.
    """
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        # Make the contents durable *before* the rename publishes them, otherwise a power cut could
        # leave a published directory with empty files.
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_path(Path(root) / name)
            _fsync_path(Path(root))
        old: Path | None = None
        if final.exists():
            # os.replace cannot overwrite a non-empty directory, so move the old one aside first.
            old = _temp_sibling(final, "old")
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)  # put the previous version back
            raise
        _fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def checkpoint_to_resume(run_dir: PathLike, *, resume: bool) -> Path | None:
    """The latest checkpoint of ``run_dir`` to resume from, or None for a fresh run.

    With ``resume=False`` an existing checkpoint is an error rather than being mixed with a new run.
    """
    from rlflow.config import ConfigError

    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise ConfigError(
            f"output_dir {run_dir} already has checkpoints ({existing.name}); set resume: true to continue that "
            "run or choose a new output_dir"
        )
    return existing


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
