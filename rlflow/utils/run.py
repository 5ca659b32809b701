"""Per-run logging: resolved config, JSON-lines metrics, trackers (TensorBoard, Weights & Biases), summary
and plots.

Run directory layout::

    run_dir/config.yaml        resolved config (yaml.safe_dump)
    run_dir/metrics.jsonl      one {"step": int, "<prefix>/<name>": float | null, ...} object per log() call
    run_dir/tensorboard/       TensorBoard event files (report_to includes "tensorboard")
    run_dir/wandb/             Weights & Biases files (report_to includes "wandb"); wandb/run_id.txt holds
                               the W&B run id, so a resumed run continues the same W&B run
    run_dir/summary.json       final summary (write_summary)
    run_dir/plots/<prefix>.png one figure per metric prefix, one subplot per metric

Metric names use a fixed ``prefix/name`` form, e.g. ``train/loss``, ``train/reward_mean``,
``eval/sliced_w2``, ``time/step_seconds``; the prefix selects the plot figure. ``metrics.jsonl`` and the
plots are always written; ``report_to`` (the trainers' config field, the name transformers and TRL use)
chooses the trackers that also get the scalars, the evaluation image grids (:meth:`RunLogger.log_image`) and
videos (:meth:`RunLogger.log_video`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
import yaml

from rlflow.config import ConfigError, option
from rlflow.utils.checkpoint import atomic_write_text, to_builtin, write_json

__all__ = [
    "METRICS_FILE",
    "TRACKERS",
    "NullRunLogger",
    "ReportTo",
    "RunLogger",
    "done_line",
    "format_duration",
    "normalize_report_to",
    "open_run_logger",
    "plural",
    "read_metrics",
    "report_to_option",
    "result_phrase",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
WANDB_ID_FILE = "wandb/run_id.txt"

# ------------------------------------------------------------------------------------------- trackers
#: The trackers a run can report to, as transformers' and TRL's ``report_to`` spells them.
TRACKERS = ("tensorboard", "wandb")
Tracker = Literal["tensorboard", "wandb", "none"]
#: The annotation of a config's ``report_to`` field: a list of trackers, or one tracker as a plain string
#: (``--report_to wandb``, ``report_to: none``). The configs' ``__post_init__`` turns it into a list with
#: :func:`normalize_report_to`, so a built config always holds ``list[str]`` (``[]`` for ``none``).
ReportTo = list[Tracker] | Tracker
WANDB_MISSING = "report_to wandb needs `pip install wandb` (or `pip install 'rlflow[trackers]'`)"


def wandb_available() -> bool:
    """Whether ``import wandb`` can work (without importing it: it is slow)."""
    if "wandb" in sys.modules:
        return sys.modules["wandb"] is not None
    import importlib.util

    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


def normalize_report_to(value: str | Sequence[str]) -> list[str]:
    """``report_to`` as a list of tracker names: ``"wandb"`` -> ``["wandb"]``, ``"none"`` or ``[]`` -> ``[]``,
    duplicates dropped. ``ValueError`` for an unknown name or ``none`` together with a tracker."""
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"report_to must be a tracker name or a list of them, got {value!r}")
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if item not in (*TRACKERS, "none"):
            raise ValueError(
                f"report_to: unknown tracker {item!r}; choose from {', '.join(TRACKERS)} or none "
                "(e.g. report_to: [tensorboard, wandb])"
            )
    trackers = list(dict.fromkeys(item for item in items if item != "none"))
    if trackers and "none" in items:
        raise ValueError(
            f"report_to: 'none' turns every tracker off, so it cannot be listed with {', '.join(trackers)}; "
            "write report_to: none or leave 'none' out"
        )
    return trackers


def _check_report_to(value: Any) -> str | None:
    """``option(check=...)`` of ``report_to``: wandb must be installed before a run asks for it."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    if "wandb" in items and not wandb_available():
        return "needs `pip install wandb` (or `pip install 'rlflow[trackers]'`): wandb is not installed"
    return None


def report_to_option() -> Any:
    """The ``report_to`` field every trainer config declares (``report_to: ReportTo = report_to_option()``)."""
    return option(
        default_factory=lambda: ["tensorboard"],
        help=(
            "Trackers that get the metrics, evaluation images and videos besides metrics.jsonl and plots/: "
            "tensorboard, wandb, both ([tensorboard, wandb]) or none, as in transformers/TRL. wandb logs to "
            "the project $WANDB_PROJECT (default rlflow) and works offline with WANDB_MODE=offline."
        ),
        check=_check_report_to,
    )


def read_metrics(path: PathLike) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file into a list of row dicts (``[]`` if the file does not exist).

    Lines that are not valid JSON objects (e.g. a last line cut short by a crash) are skipped with a
    warning rather than making the whole history unreadable.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if (
                isinstance(row, dict)
                and isinstance(row.get("step"), int)
                and not isinstance(row["step"], bool)
            ):
                rows.append(row)
            else:
                bad += 1
    if bad:
        logger.warning("skipped %d malformed line(s) in %s", bad, path)
    return rows


def _to_metric_value(key: str, value: Any) -> float | int:
    """A Python int/float from a Python number, numpy scalar/array or tensor with one element."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} is a tensor with {value.numel()} elements; log a scalar")
        value = value.item()  # note: synchronises with the GPU
    elif isinstance(value, (np.ndarray, np.generic)):
        if value.size != 1:
            raise ValueError(f"metric {key!r} is an array with {value.size} elements; log a scalar")
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Integral):
        return int(value)  # counts stay exact integers in the JSON
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {key!r} has non-numeric type {type(value).__name__}")


class RunLogger:
    """Logs one run into ``run_dir`` (see the module docstring for the layout).

    Args:
        run_dir: created if needed.
        config: the resolved config; written to ``config.yaml`` (tuples, Paths, numpy scalars are
            converted to plain YAML types) and given to Weights & Biases as the run's config.
        report_to: trackers that also get the metrics (see :func:`normalize_report_to`): ``"tensorboard"``
            writes ``run_dir/tensorboard``; ``"wandb"`` starts a Weights & Biases run in ``run_dir/wandb``
            (project ``$WANDB_PROJECT`` or ``rlflow``, named after ``run_dir``; ``WANDB_MODE=offline`` needs no
            account); ``"none"`` or ``[]``: ``metrics.jsonl`` and the plots only.
        resume_step: when resuming from the checkpoint of this step, rows with a larger step are removed
            from ``metrics.jsonl`` (and hidden from TensorBoard via ``purge_step``), so re-logging the
            steps after the checkpoint does not duplicate them; the W&B run of the earlier attempt (its id
            is kept in ``run_dir/wandb/run_id.txt``) is continued (W&B takes no step twice, so it keeps
            what the interrupted attempt logged after the checkpoint: with exact resume, the same numbers).
            ``-1`` (a fresh start) drops every row and starts a new W&B run; ``None`` appends and continues
            the W&B run if there is one.

    Usable as a context manager; :meth:`close` flushes and plots.
    """

    def __init__(
        self,
        run_dir: PathLike,
        *,
        config: Mapping[str, Any] | None = None,
        report_to: str | Sequence[str] = ("tensorboard",),
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.report_to = normalize_report_to(report_to)
        if "wandb" in self.report_to and not wandb_available():
            raise ConfigError(WANDB_MISSING)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.plots_dir = self.run_dir / "plots"
        self._warned_nonfinite: set[str] = set()
        self._closed = False

        plain_config = None
        if config is not None:
            plain_config = to_builtin(dict(config), nonfinite_to_none=False)
            text = yaml.safe_dump(plain_config, sort_keys=False)
            atomic_write_text(self.run_dir / CONFIG_FILE, text)

        if resume_step is not None:
            self._truncate_metrics(resume_step)
        elif self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0:
            logger.info("appending to existing %s (no resume_step given)", self.metrics_path)
        self._ensure_trailing_newline()
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # closed in close()

        self._tb: Any = None
        self._wandb: Any = None  # the wandb module, once its run is started
        try:
            if "tensorboard" in self.report_to:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:  # tensorboard is a core dependency, but stay usable without it
                    logger.warning("TensorBoard logging disabled: %s (pip install tensorboard)", exc)
                else:
                    # purge_step makes TensorBoard discard events >= it written by the interrupted run.
                    purge = None if resume_step is None else resume_step + 1
                    self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
            if "wandb" in self.report_to:
                self._start_wandb(plain_config, fresh=resume_step is not None and resume_step < 0)
        except BaseException:
            self._metrics_file.close()
            if self._tb is not None:
                self._tb.close()
            raise

    def _start_wandb(self, config: dict[str, Any] | None, *, fresh: bool) -> None:
        """``wandb.init`` for this run directory: the W&B run id lives in ``wandb/run_id.txt``, so a resumed
        run continues its W&B run (``resume="allow"``); a fresh start gets a new id."""
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(f"{WANDB_MISSING} ({exc})") from exc
        id_path = self.run_dir / WANDB_ID_FILE
        run_id = None
        if not fresh and id_path.is_file():
            run_id = id_path.read_text(encoding="utf-8").strip() or None
        if run_id is None:
            run_id = uuid.uuid4().hex[:16]
            id_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(id_path, run_id + "\n")
        project = os.environ.get("WANDB_PROJECT") or "rlflow"
        wandb.init(
            project=project,
            name=self.run_dir.resolve().name,
            dir=str(self.run_dir),
            config=config,
            id=run_id,
            resume="allow",
        )
        self._wandb = wandb
        logger.info("reporting to Weights & Biases run %s (project %s)", run_id, project)

    # ------------------------------------------------------------------------------------------------
    def _truncate_metrics(self, resume_step: int) -> None:
        rows = read_metrics(self.metrics_path)
        kept = [row for row in rows if row["step"] <= resume_step]
        if self.metrics_path.is_file():
            text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in kept)
            atomic_write_text(self.metrics_path, text)
            logger.info(
                "resuming at step %d: kept %d of %d metric rows in %s",
                resume_step,
                len(kept),
                len(rows),
                self.metrics_path,
            )

    def _ensure_trailing_newline(self) -> None:
        # A crash mid-write can leave a partial last line; without a newline the next row would be
        # glued onto it and both would be lost.
        if not self.metrics_path.is_file() or self.metrics_path.stat().st_size == 0:
            return
        with open(self.metrics_path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")

    # ------------------------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to ``metrics.jsonl`` (flushed) and to TensorBoard.

        Values may be Python numbers, numpy scalars or one-element tensors. Non-finite values are written
        as ``null`` (a warning is logged once per metric) and skipped in TensorBoard.
        """
        if self._closed:
            raise RuntimeError(f"RunLogger for {self.run_dir} is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        row: dict[str, Any] = {"step": step}
        finite: list[tuple[str, float | int]] = []
        for key, raw in metrics.items():
            if not isinstance(key, str) or not key or key == "step":
                raise ValueError(f"invalid metric name {key!r} (use 'prefix/name', e.g. 'train/loss')")
            value = _to_metric_value(key, raw)
            if isinstance(value, float) and not math.isfinite(value):
                if key not in self._warned_nonfinite:
                    self._warned_nonfinite.add(key)
                    logger.warning("metric %r is %s at step %d; writing null", key, value, step)
                row[key] = None
                continue
            row[key] = value
            finite.append((key, value))
        # Everything was validated above, so the JSONL row and the trackers never disagree.
        self._metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for key, value in finite:
                self._tb.add_scalar(key, value, global_step=step)
        if self._wandb is not None and finite:
            self._wandb.log(dict(finite), step=step)

    def _check_open(self, step: Any, tag: Any) -> int:
        if self._closed:
            raise RuntimeError(f"RunLogger for {self.run_dir} is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"invalid tag {tag!r} (use 'prefix/name', e.g. 'eval/samples')")
        return int(step)

    def log_image(self, step: int, tag: str, image: PathLike | np.ndarray | torch.Tensor) -> None:
        """Send an image (e.g. an evaluation grid) to the trackers: TensorBoard ``add_image``, a
        ``wandb.Image``. ``image`` is an image file (PNG) or an ``[H, W, C]`` array (uint8, or float in
        ``[0, 1]``). With no tracker this does nothing: the file on disk is the record."""
        step = self._check_open(step, tag)
        if self._tb is None and self._wandb is None:
            return
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as opened:
                array = np.asarray(opened.convert("RGB"))
        else:
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if array.ndim == 2:
                array = array[:, :, None]
            if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
                raise ValueError(f"image {tag!r} must be [H, W, C] with C in 1, 3, 4, got {array.shape}")
            if array.dtype != np.uint8:
                array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if self._tb is not None:
            self._tb.add_image(tag, array, global_step=step, dataformats="HWC")
        if self._wandb is not None:
            self._wandb.log({tag: self._wandb.Image(array)}, step=step)

    def log_video(self, step: int, tag: str, path: PathLike) -> None:
        """Send a video file (an mp4 rollout) to Weights & Biases (``wandb.Video``). TensorBoard gets
        nothing (its ``add_video`` needs decoded frames and moviepy); the file on disk is the record."""
        step = self._check_open(step, tag)
        if self._wandb is not None:
            self._wandb.log({tag: self._wandb.Video(str(path))}, step=step)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Atomically write ``summary.json`` (NaN/inf become null); returns its path."""
        path = self.run_dir / SUMMARY_FILE
        write_json(path, dict(summary))
        return path

    def plot(self) -> list[Path]:
        """Render ``plots/<prefix>.png`` for every metric prefix in ``metrics.jsonl``; returns the paths."""
        from rlflow.utils.plotting import plot_metric_curves

        if not self._closed:
            self._metrics_file.flush()
        rows = read_metrics(self.metrics_path)
        if not rows:
            return []
        return plot_metric_curves(rows, self.plots_dir)

    def close(self, *, plot: bool = True) -> None:
        """Flush and close metrics and the trackers (``wandb.finish``), then plot (plot failures only log a
        warning). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._metrics_file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # a tracker that cannot sync must not lose the run (or mask its error)
                logger.warning("could not finish the Weights & Biases run of %s", self.run_dir, exc_info=True)
        if plot:
            try:
                self.plot()
            except Exception:  # plots are a convenience: never lose a run (or mask its error) over them
                logger.warning("could not plot metrics of %s", self.run_dir, exc_info=True)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NullRunLogger:
    """What a non-main process of a multi-process run logs to: nothing (the main process writes the run's
    files); the same methods as :class:`RunLogger`."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        return None

    def log_image(self, step: int, tag: str, image: Any) -> None:
        return None

    def log_video(self, step: int, tag: str, path: PathLike) -> None:
        return None

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        return None

    def close(self, plot: bool = True) -> None:
        return None


def open_run_logger(
    run_dir: PathLike, config: Any, *, resumed_at: int | None, main: bool = True
) -> RunLogger | NullRunLogger:
    """The run logger of a trainer: ``config`` is the run's dataclass config (its ``report_to`` chooses
    the trackers); ``resumed_at`` the step of the checkpoint the run resumed from (``None``: a fresh
    start, which drops rows an earlier attempt logged before its first checkpoint and starts a new W&B
    run); ``main``: whether this process writes the run's files (only it reports to the trackers)."""
    if not main:
        return NullRunLogger()
    from rlflow.config import config_to_dict

    return RunLogger(
        run_dir,
        config=config_to_dict(config),
        report_to=config.report_to,
        resume_step=resumed_at if resumed_at is not None else -1,
    )


# --------------------------------------------------------------------------------------- final log line
def plural(count: int, noun: str) -> str:
    """``"1 iteration"``, ``"40 iterations"``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def format_duration(seconds: float) -> str:
    """``12.3 s``, ``3.2 min`` or ``1.5 h``."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def result_phrase(
    label: str, final: Any, *, base: Any = None, stderr: Any = None, fmt: str = ".3f"
) -> str | None:
    """``"<label> [<base> -> ]<final>[ +- <stderr>]"``; ``None`` when ``final`` is not a finite number."""

    def number(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return None
        return float(value)

    value = number(final)
    if value is None:
        return None
    before, error = number(base), number(stderr)
    text = f"{label} " + ("" if before is None else f"{before:{fmt}} -> ") + f"{value:{fmt}}"
    return text + ("" if error is None else f" +- {error:{fmt}}")


def done_line(
    work: str, seconds: float | None = None, results: Iterable[str | None] = (), saved: str | None = None
) -> str:
    """The last line a command logs: ``"done: <work> in <duration>; <result>; ...; <saved>"`` (``None``
    results are left out), e.g. ``done: 40 iterations in 3.2 min; verifier accuracy (base -> final) 0.278 ->
    0.360 +- 0.030; model saved to runs/x/model``."""
    head = f"done: {work}" + ("" if seconds is None else f" in {format_duration(seconds)}")
    parts = [head, *(r for r in results if r)]
    if saved:
        parts.append(saved)
    return "; ".join(parts)
