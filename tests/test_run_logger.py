"""Tests for rlflow.utils.run.RunLogger and the plotting helpers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rlflow.utils.plotting import metric_group, plot_metric_curves, scatter_2d
from rlflow.utils.run import RunLogger, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_run_logger_writes_all_artifacts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = {"lr": 1e-3, "dims": (2, 64), "out": tmp_path / "x", "name": "toy"}
    with RunLogger(run, config=config) as log:
        for step in range(5):
            log.log(
                step,
                {
                    "train/loss": torch.tensor(1.0 / (step + 1)),
                    "train/reward": np.float32(step),
                    "train/episodes": 4 * step,
                    "eval/sliced_w2": 0.5,
                    "time/step_seconds": 0.01,
                },
            )
        log.write_summary({"final/loss": 0.2, "steps": 5})

    assert yaml.safe_load((run / "config.yaml").read_text()) == {
        "lr": 1e-3,
        "dims": [2, 64],
        "out": str(tmp_path / "x"),
        "name": "toy",
    }
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["train/loss"] == pytest.approx(0.5) and rows[3]["train/episodes"] == 12
    assert json.loads((run / "summary.json").read_text()) == {"final/loss": 0.2, "steps": 5}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    # close() plotted one PNG per prefix
    for prefix in ("train", "eval", "time"):
        assert _is_png(run / "plots" / f"{prefix}.png")


def test_tensorboard_events_contain_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, report_to="tensorboard") as log:
        log.log(3, {"train/loss": 2.5})
        log.log(4, {"train/loss": float("nan")})  # skipped in TB
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(3, 2.5)]


def test_nonfinite_written_as_null_with_single_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rlflow.utils.run"):
        with RunLogger(tmp_path, report_to="none") as log:
            log.log(0, {"train/loss": float("nan"), "train/ok": 1.0})
            log.log(1, {"train/loss": float("inf")})
            log.log(2, {"train/loss": 3.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 0, "train/loss": None, "train/ok": 1.0}
    assert json.loads(lines[1]) == {"step": 1, "train/loss": None}
    assert "NaN" not in lines[0] and "Infinity" not in lines[1]  # strict JSON
    warnings = [r for r in caplog.records if "train/loss" in r.getMessage()]
    assert len(warnings) == 1


def test_resume_truncates_metrics(tmp_path: Path) -> None:
    with RunLogger(tmp_path, report_to="none") as log:
        for step in range(10):
            log.log(step, {"train/loss": float(step)})
    # Simulate a crash that cut the last line short.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "train/lo')

    with RunLogger(tmp_path, report_to="none", resume_step=6) as log:
        for step in range(7, 9):
            log.log(step, {"train/loss": -float(step)})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert rows[7]["train/loss"] == -7.0


def test_append_after_partial_line_keeps_new_rows(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "train/loss": 1.0}\n{"step": 1, "tr')
    with RunLogger(tmp_path, report_to="none") as log:
        log.log(2, {"train/loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 2]


def test_log_rejects_bad_input(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, report_to="none")
    with pytest.raises(ValueError, match="elements"):
        log.log(0, {"train/x": torch.ones(3)})
    with pytest.raises(TypeError, match="non-numeric"):
        log.log(0, {"train/x": "high"})
    with pytest.raises(ValueError, match="invalid metric name"):
        log.log(0, {"step": 1.0})
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.log(1, {"train/x": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == []  # nothing half-written by the failed calls


def test_plot_metric_curves_groups_by_prefix(tmp_path: Path) -> None:
    rows = [{"step": s, "train/a": s, "train/b": None if s == 1 else 2.0 * s, "loss": 1.0} for s in range(4)]
    paths = plot_metric_curves(rows, tmp_path / "plots")
    assert [p.name for p in paths] == ["train.png", "other.png"]
    assert all(_is_png(p) for p in paths)
    assert metric_group("eval/sliced_w2") == "eval" and metric_group("loss") == "other"
    assert plot_metric_curves([], tmp_path / "empty") == []


def test_scatter_2d_writes_png(tmp_path: Path) -> None:
    samples = torch.randn(500, 2)
    samples[0] = torch.tensor([1e6, float("nan")])  # diverged samples must not break the plot
    out = scatter_2d(samples, np.random.default_rng(0).normal(size=(300, 2)), tmp_path / "s.png", title="t")
    assert _is_png(out)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        scatter_2d(torch.randn(5, 3), torch.randn(5, 2), tmp_path / "bad.png", title="t")


# ------------------------------------------------------------------------------------ final log line
def test_done_line_is_one_readable_sentence():
    from rlflow.utils.run import done_line, format_duration, result_phrase

    assert [format_duration(s) for s in (3.21, 192.0, 7200.0)] == ["3.2 s", "3.2 min", "2.0 h"]
    assert result_phrase("accuracy", 0.36, base=0.278, stderr=0.03) == "accuracy 0.278 -> 0.360 +- 0.030"
    assert result_phrase("loss", float("nan")) is None and result_phrase("loss", None) is None
    assert result_phrase("return", 2359.4, base=None, fmt=".0f") == "return 2359"
    line = done_line("40 iterations", 192.0, ["accuracy 0.360", None], "model saved to runs/x/final")
    assert line == "done: 40 iterations in 3.2 min; accuracy 0.360; model saved to runs/x/final"


def test_iteration_loop_done_line_reads_the_summary():
    from types import SimpleNamespace

    from rlflow.trainers.iteration_loop import IterationLoopTrainer

    summary = {
        "iterations": 40,
        "wall_seconds": 192.0,
        "final": {"eval/accuracy": 0.36, "eval/accuracy_stderr": 0.03},
        "final_accuracy": 0.36,
        "base_accuracy": 0.278,
        "final_reward_mean": 0.52,
        "base_reward_mean": None,
        "model_dir": "runs/x/model",
    }
    line = IterationLoopTrainer.done_line(SimpleNamespace(iteration=40), summary)
    assert line == (
        "done: 40 iterations in 3.2 min; verifier accuracy (base -> final) 0.278 -> 0.360 +- 0.030; "
        "final reward 0.520; model saved to runs/x/model"
    )
