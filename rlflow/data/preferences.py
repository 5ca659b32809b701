"""Pairwise preference data: an in-memory :class:`PreferenceSet` and a validated on-disk format.

A preference set holds ``N`` comparisons. Comparison ``i`` shows two samples ``a[i]`` and ``b[i]`` (for
the same prompt) and records, for each of ``D`` label *dimensions* (e.g. ``alignment`` and ``quality``),
which one a rater preferred: ``A``, ``B`` or ``tie``. Two kinds of samples are supported:

* ``image``: images ``[N, 3, H, W]`` float32 in [0, 1]; optionally the model-space samples they came from
  (``latents_a`` / ``latents_b``, what Flow-DPO trains on; shapes world: ``images * 2 - 1``, unclamped);
* ``segment``: trajectory segments ``[N, L, obs_dim + act_dim]`` float32 (observation then action per
  step), with ``meta = {"obs_dim": ..., "act_dim": ...}``; prompts are ``""``.

On-disk format (``format_version`` 1)
-------------------------------------
A directory written by :func:`save_preferences` (each file atomically, ``meta.json`` last; other files in
the directory are kept)::

    my_preferences/
        meta.json             {"format_version": 1, "kind": "image", "dimensions": ["alignment", "quality"],
                               "num_pairs": N, "num_samples": M, ...provenance (any other keys)...}
        pairs.jsonl           one JSON object per line = per comparison:
                              {"prompt": "a red circle", "a": 0, "b": 1,
                               "labels": {"alignment": "A", "quality": "tie"}}
        samples.safetensors   "samples": [M, ...] float32 (images in [0, 1], or segments)
                              "latents": [M, ...] float32 (optional; row j is the model-space sample of
                              samples[j])

``a`` and ``b`` are 0-based row indices into the sample arrays (so a sample compared several times is
stored once); ``a != b``. Every label dimension listed in ``meta.json`` must appear in every row's
``labels`` and no other. Label values are the strings ``"A"``, ``"B"`` or ``"tie"``; in tensors they are
:data:`LABEL_A` (0), :data:`LABEL_B` (1) and :data:`LABEL_TIE` (2). Segment sets store ``obs_dim`` and
``act_dim`` in ``meta.json`` and ``samples.shape[-1]`` must equal their sum. Any other ``meta.json`` keys
are provenance (generator model, seeds, oracle parameters ...) and come back as :attr:`PreferenceSet.meta`.

:func:`load_preferences` validates everything and raises :class:`PreferenceDataError` naming the file,
the 1-based line (for ``pairs.jsonl``), the field, the offending value and how to fix it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlflow.errors import DataError

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "LABEL_A",
    "LABEL_B",
    "LABEL_NAMES",
    "LABEL_TIE",
    "PreferenceDataError",
    "PreferenceSet",
    "is_preference_set",
    "load_preferences",
    "save_preferences",
]

LABEL_A, LABEL_B, LABEL_TIE = 0, 1, 2
LABEL_NAMES: tuple[str, str, str] = ("A", "B", "tie")  # index = tensor label value
_LABEL_CODES = {name: code for code, name in enumerate(LABEL_NAMES)}
FORMAT_VERSION = 1
KINDS: tuple[str, ...] = ("image", "segment")

PAIRS_FILE = "pairs.jsonl"
SAMPLES_FILE = "samples.safetensors"
META_FILE = "meta.json"
_PAIR_FIELDS = ("prompt", "a", "b", "labels")
# meta.json keys owned by the format; everything else is provenance.
_RESERVED_META = ("format_version", "kind", "dimensions", "num_pairs", "num_samples")
_MAX_VALUE_CHARS = 80  # offending values are quoted in messages, truncated to this length


class PreferenceDataError(DataError):
    """Invalid preference data; the message names the file, row (1-based), field, bad value and the fix."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


@dataclass
class PreferenceSet:
    """``N`` pairwise comparisons with ``D`` label dimensions (see the module docstring for the layout)."""

    kind: str
    dimensions: list[str]
    prompts: list[str]
    a: Tensor
    b: Tensor
    labels: Tensor
    latents_a: Tensor | None = None
    latents_b: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dimensions = list(self.dimensions)
        self.prompts = list(self.prompts)
        self._validate()

    def _validate(self) -> None:
        """Cheap structural checks, so a bad set fails where it is built rather than deep inside a trainer."""
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.dimensions or len(set(self.dimensions)) != len(self.dimensions):
            raise ValueError(f"dimensions must be a non-empty list of unique names, got {self.dimensions!r}")
        if not all(isinstance(d, str) and d for d in self.dimensions):
            raise ValueError(f"dimensions must be non-empty strings, got {self.dimensions!r}")
        n = len(self.prompts)
        for name in ("a", "b"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise ValueError(f"{name} must be a Tensor, got {type(value).__name__}")
            if value.shape[:1] != (n,):
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} but there are {n} prompts (one per pair)"
                )
        if self.a.shape != self.b.shape:
            raise ValueError(f"a {tuple(self.a.shape)} and b {tuple(self.b.shape)} must have the same shape")
        expected_ndim = 4 if self.kind == "image" else 3
        if self.a.ndim != expected_ndim:
            layout = "[N, 3, H, W]" if self.kind == "image" else "[N, L, obs_dim + act_dim]"
            raise ValueError(f"{self.kind} samples must be {layout}, got shape {tuple(self.a.shape)}")
        if self.labels.shape != (n, len(self.dimensions)) or self.labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 [{n}, {len(self.dimensions)}] (pairs x dimensions), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if n and ((self.labels < 0) | (self.labels > LABEL_TIE)).any():
            raise ValueError(
                f"labels must be in {{0 (A), 1 (B), 2 (tie)}}, got values {sorted(set(self.labels.unique().tolist()))}"
            )
        if (self.latents_a is None) != (self.latents_b is None):
            raise ValueError("give both latents_a and latents_b, or neither")
        if self.latents_a is not None and self.latents_b is not None:
            if self.latents_a.shape[:1] != (n,) or self.latents_a.shape != self.latents_b.shape:
                raise ValueError(
                    f"latents_a {tuple(self.latents_a.shape)} and latents_b {tuple(self.latents_b.shape)} must "
                    f"both have {n} rows (one per pair) and the same shape"
                )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_latents(self) -> bool:
        return self.latents_a is not None

    def label_index(self, dimension: str) -> int:
        """Column of ``dimension`` in :attr:`labels`."""
        try:
            return self.dimensions.index(dimension)
        except ValueError:
            from rlflow.config import ConfigError  # a ValueError: callers catching ValueError still do

            raise ConfigError(
                f"unknown label dimension {dimension!r}; this preference set has {self.dimensions}: "
                "choose one of those"
            ) from None

    def labels_for(self, dimension: str) -> Tensor:
        """``[N]`` labels (0 = A, 1 = B, 2 = tie) of one dimension."""
        return self.labels[:, self.label_index(dimension)]

    def select(self, index: Tensor) -> PreferenceSet:
        """The comparisons at ``index`` (1-D integer indices or a boolean mask of length ``N``)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"a boolean mask must have shape ({len(self)},), got {tuple(index.shape)}")
            index = index.nonzero().squeeze(1)
        if index.ndim != 1 or index.is_floating_point():
            raise ValueError(f"index must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}")
        if index.numel() and (index.min() < -len(self) or index.max() >= len(self)):
            raise ValueError(f"index out of range for a preference set of {len(self)} pairs")
        index = index.long()
        positions = index.tolist()

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index.to(t.device)]

        return PreferenceSet(
            kind=self.kind,
            dimensions=list(self.dimensions),
            prompts=[self.prompts[i] for i in positions],
            a=self.a[index.to(self.a.device)],
            b=self.b[index.to(self.b.device)],
            labels=self.labels[index.to(self.labels.device)],
            latents_a=take(self.latents_a),
            latents_b=take(self.latents_b),
            meta=dict(self.meta),
        )

    def split(self, heldout_fraction: float, seed: int) -> tuple[PreferenceSet, PreferenceSet]:
        """A seeded random ``(train, heldout)`` split; ``heldout`` gets ``round(fraction * N)`` pairs.

        Both parts must be non-empty, so ``0 < heldout_fraction < 1`` and ``N >= 2``.
        """
        if not (0.0 < heldout_fraction < 1.0):
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
        n = len(self)
        num_heldout = round(heldout_fraction * n)
        if num_heldout < 1 or num_heldout >= n:
            raise ValueError(
                f"heldout_fraction={heldout_fraction} of {n} pairs leaves {num_heldout} held-out and "
                f"{n - num_heldout} training pairs; both must be >= 1 (use more pairs or another fraction)"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.select(order[num_heldout:].sort().values), self.select(order[:num_heldout].sort().values)

    def label_fractions(self) -> dict[str, dict[str, float]]:
        """``{dimension: {"A": frac, "B": frac, "tie": frac}}`` over the comparisons."""
        n = max(len(self), 1)
        counts = torch.stack([(self.labels == code).sum(0) for code in range(len(LABEL_NAMES))], dim=1)
        return {
            dim: {name: counts[d, code].item() / n for code, name in enumerate(LABEL_NAMES)}
            for d, dim in enumerate(self.dimensions)
        }

    def to(self, device: str | torch.device) -> PreferenceSet:
        """A copy with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return PreferenceSet(
            kind=self.kind,
            dimensions=list(self.dimensions),
            prompts=list(self.prompts),
            a=self.a.to(device),
            b=self.b.to(device),
            labels=self.labels.to(device),
            latents_a=move(self.latents_a),
            latents_b=move(self.latents_b),
            meta=dict(self.meta),
        )


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def is_preference_set(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a preference set's ``meta.json`` (an output of :func:`save_preferences`),
    valid or not: the commands that write sets may write into it again."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and meta.get("kind") in KINDS


def save_preferences(pairs: PreferenceSet, directory: str | os.PathLike[str]) -> Path:
    """Write ``pairs`` to ``directory`` (replacing an existing set's files); returns the path.

    Only ``meta.json``, ``pairs.jsonl`` and ``samples.safetensors`` are written, each atomically with
    ``meta.json`` (which names the counts) last; other files in ``directory`` are kept. Commands writing
    to a user-chosen directory check it first with :func:`rlflow.utils.output_dirs.check_output_dir`.

    Samples are stored as ``samples = cat([a, b])`` (row ``i`` is ``a[i]``, row ``N + i`` is ``b[i]``).
    """
    from rlflow.utils.checkpoint import atomic_update, atomic_write_text, save_state_dict, to_builtin

    directory = Path(directory)
    if len(pairs) == 0:
        raise ValueError("refusing to save an empty preference set (it could not be loaded back)")
    clash = sorted(set(pairs.meta) & set(_RESERVED_META))
    if clash:
        raise ValueError(f"meta keys {clash} are reserved by the preference format; rename them")
    if pairs.kind == "image":
        _check_image_range(torch.cat([pairs.a, pairs.b]), where="PreferenceSet.a/b", exc=ValueError)
    if pairs.kind == "segment":
        _check_segment_meta(pairs.meta, pairs.a.shape[-1], where="PreferenceSet.meta", exc=ValueError)
    n = len(pairs)
    tensors = {"samples": torch.cat([pairs.a, pairs.b]).detach().float().cpu()}
    if pairs.latents_a is not None and pairs.latents_b is not None:
        tensors["latents"] = torch.cat([pairs.latents_a, pairs.latents_b]).detach().float().cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": pairs.kind,
        "dimensions": list(pairs.dimensions),
        "num_pairs": n,
        "num_samples": 2 * n,
        **pairs.meta,
    }
    label_rows = pairs.labels.cpu().tolist()
    lines = [
        json.dumps(
            {
                "prompt": prompt,
                "a": i,
                "b": n + i,
                "labels": {dim: LABEL_NAMES[v] for dim, v in zip(pairs.dimensions, row, strict=True)},
            }
        )
        for i, (prompt, row) in enumerate(zip(pairs.prompts, label_rows, strict=True))
    ]
    with atomic_update(directory, owned=(SAMPLES_FILE, PAIRS_FILE, META_FILE)) as tmp:
        save_state_dict(tensors, tmp / SAMPLES_FILE, metadata={"format": "pt", "kind": pairs.kind})
        atomic_write_text(tmp / PAIRS_FILE, "\n".join(lines) + "\n")
        atomic_write_text(
            tmp / META_FILE,
            json.dumps(to_builtin(meta), indent=2, sort_keys=True, allow_nan=False) + "\n",
        )
    return directory


# ---------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------


def _check_image_range(images: Tensor, *, where: str, exc: type[Exception]) -> None:
    if images.numel() == 0:
        return
    bad = ~((images >= 0.0) & (images <= 1.0))  # also catches NaN
    if bad.any():
        rows = bad.flatten(1).any(1).nonzero().squeeze(1)
        first = int(rows[0])
        values = images[first][bad[first]]
        raise exc(
            f"{where}: images must be float32 in [0, 1], but {rows.numel()} sample row(s) are not (first: row "
            f"{first}, bad value {values[0].item():.4g}); store images as (x + 1) / 2 clamped to [0, 1], keep "
            "the unclamped model-space samples in 'latents'"
        )


def _check_segment_meta(meta: dict[str, Any], width: int, *, where: str, exc: type[Exception]) -> None:
    obs_dim, act_dim = meta.get("obs_dim"), meta.get("act_dim")
    for name, value in (("obs_dim", obs_dim), ("act_dim", act_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise exc(
                f"{where}: field {name!r} must be a non-negative integer for segment preference sets, got "
                f"{_show(value)}; add it (segments are [L, obs_dim + act_dim], observation first)"
            )
    if obs_dim + act_dim != width:
        raise exc(
            f"{where}: obs_dim ({obs_dim}) + act_dim ({act_dim}) = {obs_dim + act_dim} does not match the "
            f"segment width {width}; fix obs_dim/act_dim or the samples"
        )


def _require_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise PreferenceDataError(
            f"{path}: file is missing; a preference set directory needs {META_FILE}, {PAIRS_FILE} and "
            f"{SAMPLES_FILE} (write it with rlflow.data.preferences.save_preferences or `rlflow preferences`)"
        )
    return path


def _load_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreferenceDataError(
            f"{path}: not valid JSON ({exc}); fix the file or rebuild the set"
        ) from None
    if not isinstance(meta, dict):
        raise PreferenceDataError(f"{path}: must hold a JSON object, got {_show(meta)}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PreferenceDataError(
            f"{path}: field 'format_version' is {_show(version)}; this rlflow reads format_version "
            f"{FORMAT_VERSION} (rebuild the set, or set it to {FORMAT_VERSION} if it follows that format)"
        )
    kind = meta.get("kind")
    if kind not in KINDS:
        raise PreferenceDataError(f"{path}: field 'kind' is {_show(kind)}; set it to one of {list(KINDS)}")
    dims = meta.get("dimensions")
    if (
        not isinstance(dims, list)
        or not dims
        or not all(isinstance(d, str) and d for d in dims)
        or len(set(dims)) != len(dims)
    ):
        raise PreferenceDataError(
            f"{path}: field 'dimensions' is {_show(dims)}; it must be a non-empty list of unique label "
            'dimension names, e.g. ["alignment", "quality"]'
        )
    for key in ("num_pairs", "num_samples"):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise PreferenceDataError(
                f"{path}: field {key!r} is {_show(value)}; it must be a non-negative integer (or be left out)"
            )
    return meta


def _parse_pairs(
    path: Path, dimensions: list[str], num_samples: int
) -> tuple[list[str], list[int], list[int], list[list[int]]]:
    """Parse and validate ``pairs.jsonl`` (blank lines are skipped; rows are numbered by line, from 1)."""
    prompts: list[str] = []
    index_a: list[int] = []
    index_b: list[int] = []
    labels: list[list[int]] = []
    dim_set = set(dimensions)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PreferenceDataError(f"{path}: not UTF-8 text ({exc}); rebuild the set") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, row {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PreferenceDataError(
                f"{where}: malformed JSON ({exc.msg} at column {exc.colno}) in {_show(line)}; each line must be "
                'one JSON object like {"prompt": "...", "a": 0, "b": 1, "labels": {"alignment": "A"}}'
            ) from None
        if not isinstance(row, dict):
            raise PreferenceDataError(f"{where}: expected a JSON object, got {_show(row)}")
        for name in _PAIR_FIELDS:
            if name not in row:
                raise PreferenceDataError(
                    f"{where}: field {name!r} is missing (row has {sorted(row)}); every row needs "
                    f"{list(_PAIR_FIELDS)}"
                )
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise PreferenceDataError(
                f"{where}: field 'prompt' must be a string, got {_show(prompt)} (use \"\" for segments)"
            )
        idx = {}
        for name in ("a", "b"):
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise PreferenceDataError(
                    f"{where}: field {name!r} must be an integer row index into {SAMPLES_FILE}, got {_show(value)}"
                )
            if not 0 <= value < num_samples:
                raise PreferenceDataError(
                    f"{where}: field {name!r} = {value} is out of range; {SAMPLES_FILE} has {num_samples} "
                    f"samples, so indices must be in [0, {num_samples - 1}]"
                )
            idx[name] = value
        if idx["a"] == idx["b"]:
            raise PreferenceDataError(
                f"{where}: fields 'a' and 'b' are both {idx['a']}; a pair must compare two different samples "
                "(store a duplicate sample as its own row if you really mean it)"
            )
        row_labels = row["labels"]
        if not isinstance(row_labels, dict):
            raise PreferenceDataError(
                f'{where}: field \'labels\' must be an object {{dimension: "A"|"B"|"tie"}}, got {_show(row_labels)}'
            )
        unknown = sorted(set(row_labels) - dim_set)
        if unknown:
            raise PreferenceDataError(
                f"{where}: field 'labels' has unknown dimension(s) {unknown}; meta.json declares {dimensions} "
                "(add them to meta.json 'dimensions' or drop them)"
            )
        missing = [d for d in dimensions if d not in row_labels]
        if missing:
            raise PreferenceDataError(
                f"{where}: field 'labels' is missing dimension(s) {missing}; every row must label all of "
                f"{dimensions}"
            )
        codes = []
        for dim in dimensions:
            value = row_labels[dim]
            code = _LABEL_CODES.get(value) if isinstance(value, str) else None
            if code is None:
                raise PreferenceDataError(
                    f"{where}: field 'labels.{dim}' is {_show(value)}; a label must be one of "
                    f'"A", "B" or "tie" (case-sensitive)'
                )
            codes.append(code)
        prompts.append(prompt)
        index_a.append(idx["a"])
        index_b.append(idx["b"])
        labels.append(codes)
    if not prompts:
        raise PreferenceDataError(
            f"{path}: contains no pairs; a preference set needs at least one comparison"
        )
    return prompts, index_a, index_b, labels


def _load_samples(path: Path, kind: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: the file is unusable either way
        raise PreferenceDataError(
            f"{path}: cannot be read as safetensors ({type(exc).__name__}: {exc}); it is truncated or "
            "corrupt — rebuild the set"
        ) from None
    unexpected = sorted(set(tensors) - {"samples", "latents"})
    if "samples" not in tensors or unexpected:
        raise PreferenceDataError(
            f"{path}: holds tensors {sorted(tensors)}; it must hold 'samples' and optionally 'latents' "
            "(nothing else)"
        )
    for name, value in tensors.items():
        if value.dtype != torch.float32:
            raise PreferenceDataError(
                f"{path}: tensor {name!r} has dtype {value.dtype}; store it as float32 (tensor.float())"
            )
        if not torch.isfinite(value).all():
            raise PreferenceDataError(f"{path}: tensor {name!r} contains NaN or inf values; fix the data")
    samples = tensors["samples"]
    if kind == "image" and (samples.ndim != 4 or samples.shape[1] != 3):
        raise PreferenceDataError(
            f"{path}: tensor 'samples' has shape {tuple(samples.shape)}; image sets store [M, 3, H, W]"
        )
    if kind == "segment" and samples.ndim != 3:
        raise PreferenceDataError(
            f"{path}: tensor 'samples' has shape {tuple(samples.shape)}; segment sets store "
            "[M, L, obs_dim + act_dim]"
        )
    latents = tensors.get("latents")
    if latents is not None and latents.shape[:1] != samples.shape[:1]:
        raise PreferenceDataError(
            f"{path}: tensor 'latents' has {latents.shape[0]} rows but 'samples' has {samples.shape[0]}; "
            "row j of 'latents' must be the model-space sample of row j of 'samples'"
        )
    if kind == "image":
        _check_image_range(samples, where=f"{path}: tensor 'samples'", exc=PreferenceDataError)
    return tensors


def load_preferences(directory: str | os.PathLike[str]) -> PreferenceSet:
    """Load and validate a preference set written by :func:`save_preferences` (or by hand, same format).

    Raises:
        PreferenceDataError: anything wrong with the directory, its files or their contents.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PreferenceDataError(
            f"{directory}: preference set directory does not exist; build one with `rlflow preferences` "
            "or check the path"
        )
    meta_path = _require_file(directory, META_FILE)
    pairs_path = _require_file(directory, PAIRS_FILE)
    samples_path = _require_file(directory, SAMPLES_FILE)
    meta = _load_meta(meta_path)
    kind, dimensions = meta["kind"], meta["dimensions"]
    tensors = _load_samples(samples_path, kind)
    samples, latents = tensors["samples"], tensors.get("latents")
    num_samples = samples.shape[0]
    if meta.get("num_samples") is not None and meta["num_samples"] != num_samples:
        raise PreferenceDataError(
            f"{meta_path}: field 'num_samples' is {meta['num_samples']} but {SAMPLES_FILE} has {num_samples} "
            "samples; the files are from different sets — rebuild the set"
        )
    if kind == "segment":
        _check_segment_meta(meta, samples.shape[-1], where=str(meta_path), exc=PreferenceDataError)
    prompts, index_a, index_b, label_rows = _parse_pairs(pairs_path, dimensions, num_samples)
    if meta.get("num_pairs") is not None and meta["num_pairs"] != len(prompts):
        raise PreferenceDataError(
            f"{meta_path}: field 'num_pairs' is {meta['num_pairs']} but {PAIRS_FILE} has {len(prompts)} rows; "
            "the files are from different sets (or pairs.jsonl was truncated) — rebuild the set"
        )
    ia, ib = torch.tensor(index_a), torch.tensor(index_b)
    provenance = {k: v for k, v in meta.items() if k not in _RESERVED_META}
    return PreferenceSet(
        kind=kind,
        dimensions=list(dimensions),
        prompts=prompts,
        a=samples[ia],
        b=samples[ib],
        labels=torch.tensor(label_rows, dtype=torch.int64).view(len(prompts), len(dimensions)),
        latents_a=None if latents is None else latents[ia],
        latents_b=None if latents is None else latents[ib],
        meta=provenance,
    )
