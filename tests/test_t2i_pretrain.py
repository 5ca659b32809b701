"""Text-to-image pretraining on the shapes world: it learns, writes its outputs, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from rlflow.config import ConfigError, config_from_dict
from rlflow.testing import TINY_SHAPES_SIZES
from rlflow.trainers.t2i_pretrain import T2IPretrainConfig, T2IPretrainTrainer, train
from rlflow.utils.run import read_metrics
from rlflow.worlds.shapes.model import load_shapes_model
from tests.resume_helpers import interrupt_and_resume

TINY_MODEL = dict(TINY_SHAPES_SIZES)


def _config(tmp_path, **overrides) -> T2IPretrainConfig:
    data = {
        "output_dir": str(tmp_path / "run"),
        "num_threads": 1,
        "model": TINY_MODEL,
        "steps": 30,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "warmup_steps": 3,
        "logging_steps": 5,
        "eval_steps": 1000,
        "eval_prompts": 8,
        "eval_samples_per_prompt": 1,
        "eval_num_steps": 3,
        "eval_loss_samples": 32,
        "grid_size": 8,
        "save_steps": 1000,
        "report_to": "none",
        "plot_curves": False,  # matplotlib curves take seconds; the sample grids are still written
        **overrides,
    }
    return config_from_dict(T2IPretrainConfig, data, source="test")


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path):
    config = _config(tmp_path, eval_steps=20)
    trainer = T2IPretrainTrainer(config)
    before = trainer.fixed_batch_loss(trainer.model)
    summary = trainer.train()
    after = trainer.fixed_batch_loss(trainer.model)
    # A tiny model at 30 steps: loss 2.3 -> ~1.0 when written (the prior alone scores ~2: E|x1 - x0|^2).
    assert after < 0.7 * before

    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.jsonl")
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert losses[-1] < losses[0]
    evals = [row for row in rows if "eval/accuracy" in row]
    assert [row["step"] for row in evals] == [20, 30]
    for category in ("single", "counting", "two_objects", "position"):
        assert 0.0 <= evals[-1][f"eval/accuracy/{category}"] <= 1.0
    assert json.loads((run / "summary.json").read_text())["steps"] == 30
    assert summary["accuracy"] == evals[-1]["eval/accuracy"]
    assert (run / "plots" / "samples.png").stat().st_size > 0
    assert (run / "plots" / "samples_step_0000020.png").is_file()
    final = load_shapes_model(run / "final")
    for key, value in trainer.ema.model.state_dict().items():
        assert torch.equal(value, final.state_dict()[key]), key


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    common = dict(steps=8, save_steps=4, logging_steps=2, prompt_dropout=0.2)
    straight = T2IPretrainTrainer(_config(tmp_path / "a", **common))
    straight.train()

    config = _config(tmp_path / "b", **common)
    # A killed run: the last checkpoint is step 4.
    resumed = interrupt_and_resume(T2IPretrainTrainer, config, 6, monkeypatch)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in straight.ema.model.state_dict().items():
        assert torch.equal(value, resumed.ema.model.state_dict()[key]), key
    rows_a = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]  # no duplicated rows
    assert [r.get("train/loss") for r in rows_b] == [r.get("train/loss") for r in rows_a]
    # A finished run is not trained again.
    assert train(config)["steps"] == 8


def test_guided_sampling_is_seeded_and_batch_size_independent(tmp_path):
    trainer = T2IPretrainTrainer(
        _config(tmp_path, prompt_dropout=0.1, eval_guidance_scale=3.0, eval_batch_size=2)
    )
    prompts = ["a red circle", "two blue squares", "a white square above a green circle"]
    images = trainer.sample(trainer.model, prompts, seed=5)
    trainer.config.eval_batch_size = 8
    # Same noise per prompt whatever the chunking (matmuls of other batch sizes round differently).
    torch.testing.assert_close(images, trainer.sample(trainer.model, prompts, seed=5), atol=1e-5, rtol=0)
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert trainer.model.guidance_scale == 1.0  # restored after sampling


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval_guidance_scale": 2.0, "prompt_dropout": 0.0}, "prompt_dropout"),
        ({"categories": ["counting", "colours"]}, "colours"),
        ({"warmup_steps": 30}, "warmup_steps"),
    ],
)
def test_bad_configs_are_rejected_early(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)
