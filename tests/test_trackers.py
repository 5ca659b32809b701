"""``report_to`` (issue 18): the trackers a run reports to, TensorBoard and Weights & Biases.

The W&B logic is tested against a fake ``wandb`` module (what ``wandb.init`` / ``log`` / ``finish`` were
called with); one test runs the real package offline (``WANDB_MODE=offline``) when it is installed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rlflow.config import ConfigError, config_from_dict, config_to_dict, parse_config
from rlflow.trainers.pretrain import PretrainConfig, PretrainTrainer
from rlflow.utils.run import NullRunLogger, ReportTo, RunLogger, normalize_report_to, read_metrics

# Every trainer config and its module (those needing an optional extra are skipped where it is missing).
TRAINER_CONFIGS = [
    ("rlflow.trainers.pretrain", "PretrainConfig"),
    ("rlflow.trainers.t2i_pretrain", "T2IPretrainConfig"),
    ("rlflow.trainers.vae_pretrain", "VAEPretrainConfig"),
    ("rlflow.trainers.ppo", "PPOConfig"),
    ("rlflow.trainers.grpo", "GRPOConfig"),
    ("rlflow.trainers.nft", "NFTConfig"),
    ("rlflow.trainers.dpo", "DPOConfig"),
    ("rlflow.trainers.rwr", "RWRConfig"),
    ("rlflow.trainers.actor_critic", "ActorCriticConfig"),
    ("rlflow.trainers.reward_model", "RewardModelTrainConfig"),
]


class FakeWandb(types.ModuleType):
    """Records the calls the run logger makes; ``Image`` / ``Video`` keep what they were given."""

    class Image:
        def __init__(self, data: Any) -> None:
            self.data = data

    class Video:
        def __init__(self, path: str) -> None:
            self.path = path

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # importlib.util.find_spec reads it
        self.inits: list[dict[str, Any]] = []
        self.logs: list[tuple[dict[str, Any], int]] = []
        self.finished = 0

    def init(self, **kwargs: Any) -> Any:
        self.inits.append(kwargs)
        self.run = types.SimpleNamespace(id=kwargs["id"], project=kwargs["project"])
        return self.run

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self.logs.append((dict(data), step))

    def finish(self) -> None:
        self.finished += 1

    def scalars(self, key: str) -> list[tuple[int, Any]]:
        return [(step, data[key]) for data, step in self.logs if key in data]


@pytest.fixture()
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return fake


def _png(path: Path, size: int = 12) -> Path:
    from PIL import Image

    pixels = (np.arange(size * size * 3) % 256).astype(np.uint8).reshape(size, size, 3)
    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------------------- the field
def test_report_to_takes_a_name_or_a_list(fake_wandb: FakeWandb) -> None:
    def report_to(value: Any) -> list[str]:
        return config_from_dict(PretrainConfig, {"report_to": value}, source="r.yaml").report_to

    assert PretrainConfig().report_to == ["tensorboard"]
    assert report_to("wandb") == ["wandb"]
    assert report_to(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    assert report_to("none") == [] and report_to(["none"]) == [] and report_to([]) == []
    assert report_to(["wandb", "wandb"]) == ["wandb"]
    assert PretrainConfig(report_to="none").report_to == []  # built in Python: the same normalisation

    def cli(*argv: str) -> list[str]:
        return parse_config(PretrainConfig, list(argv), prog="rlflow pretrain").report_to

    assert cli("--report_to", "wandb") == ["wandb"]
    assert cli("--report_to", "[tensorboard, wandb]") == ["tensorboard", "wandb"]
    assert cli("--report_to", "none") == []
    # The resolved config (config.yaml, the W&B config) holds the list, which loads back as it is.
    saved = yaml.safe_load(yaml.safe_dump(config_to_dict(PretrainConfig(report_to="wandb"))))
    assert saved["report_to"] == ["wandb"]
    assert config_from_dict(PretrainConfig, saved).report_to == ["wandb"]


def test_report_to_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises(
        ConfigError, match=r"r\.yaml: 'report_to' must be .*'tensorboard' \| 'wandb' \| 'none'"
    ):
        config_from_dict(PretrainConfig, {"report_to": "wandbb"}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"'none' turns every tracker off"):
        config_from_dict(PretrainConfig, {"report_to": ["none", "tensorboard"]}, source="r.yaml")
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        normalize_report_to(["mlflow"])
    # The boolean it replaced: a clear error, not "unknown key".
    with pytest.raises(ConfigError) as info:
        config_from_dict(PretrainConfig, {"tensorboard": False}, source="old.yaml")
    assert str(info.value) == (
        "old.yaml: 'tensorboard' was replaced by 'report_to' (e.g. report_to: [tensorboard] or report_to: none)"
    )
    with pytest.raises(SystemExit):
        parse_config(PretrainConfig, ["--tensorboard", "false"], prog="rlflow pretrain")
    assert "--tensorboard -> --report_to (replaced" in capsys.readouterr().err
    # wandb asked for but not installed: said when the config is read, and by the logger itself.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"'report_to' = 'wandb' needs `pip install wandb`"):
        config_from_dict(PretrainConfig, {"report_to": "wandb"}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"report_to wandb needs `pip install wandb`"):
        RunLogger(Path("unused"), report_to="wandb")
    assert not Path("unused").exists()


@pytest.mark.parametrize(("module", "name"), TRAINER_CONFIGS)
def test_every_trainer_config_has_report_to(module: str, name: str) -> None:
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:  # an optional extra (diffusers, mujoco) that is not installed here
        pytest.skip(str(exc))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert "tensorboard" not in fields
    assert fields["report_to"].default_factory() == ["tensorboard"]
    import typing

    assert typing.get_type_hints(cls)["report_to"] == ReportTo


# ----------------------------------------------------------------------------------- the logger itself
def test_wandb_run_gets_config_scalars_images_and_videos(tmp_path: Path, fake_wandb: FakeWandb) -> None:
    run_dir = tmp_path / "my_run"
    config = {"learning_rate": 1e-3, "dims": (2, 64), "report_to": ["wandb"]}
    with RunLogger(run_dir, config=config, report_to="wandb", resume_step=-1) as log:
        log.log(1, {"train/loss": 0.5, "train/bad": float("nan"), "train/count": 3})
        log.log_image(1, "eval/samples", _png(tmp_path / "grid.png"))
        log.log_image(2, "eval/array", np.full((4, 5, 3), 0.5, dtype=np.float32))
        log.log_video(2, "eval/video", tmp_path / "final.mp4")
        assert fake_wandb.finished == 0
    assert fake_wandb.finished == 1
    assert not (run_dir / "tensorboard").exists()  # TensorBoard was not asked for

    (init,) = fake_wandb.inits
    run_id = (run_dir / "wandb" / "run_id.txt").read_text().strip()
    assert init == {
        "project": "rlflow",
        "name": "my_run",
        "dir": str(run_dir),
        "config": {"learning_rate": 1e-3, "dims": [2, 64], "report_to": ["wandb"]},
        "id": run_id,
        "resume": "allow",
    }
    # Scalars with their step; non-finite values are left out (metrics.jsonl has them as null).
    assert fake_wandb.logs[0] == ({"train/loss": 0.5, "train/count": 3}, 1)
    grid = fake_wandb.logs[1][0]["eval/samples"]
    assert fake_wandb.logs[1][1] == 1 and grid.data.shape == (12, 12, 3) and grid.data.dtype == np.uint8
    array = fake_wandb.logs[2][0]["eval/array"].data
    assert array.dtype == np.uint8 and int(array[0, 0, 0]) == 128
    video = fake_wandb.logs[3]
    assert video[1] == 2 and video[0]["eval/video"].path == str(tmp_path / "final.mp4")
    assert read_metrics(run_dir / "metrics.jsonl")[0]["train/bad"] is None

    # Resuming from a checkpoint (or appending) continues the same W&B run; a fresh start begins a new one.
    RunLogger(run_dir, report_to=["wandb"], resume_step=1).close(plot=False)
    RunLogger(run_dir, report_to=["wandb"]).close(plot=False)
    assert [i["id"] for i in fake_wandb.inits[1:]] == [run_id, run_id]
    RunLogger(run_dir, report_to=["wandb"], resume_step=-1).close(plot=False)
    assert fake_wandb.inits[-1]["id"] != run_id
    assert (run_dir / "wandb" / "run_id.txt").read_text().strip() == fake_wandb.inits[-1]["id"]
    assert fake_wandb.finished == 4


def test_wandb_project_comes_from_the_environment(
    tmp_path: Path, fake_wandb: FakeWandb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "shapes-alignment")
    RunLogger(tmp_path / "r", report_to=["tensorboard", "wandb"]).close(plot=False)
    assert fake_wandb.inits[0]["project"] == "shapes-alignment"
    assert (tmp_path / "r" / "tensorboard").is_dir()


def test_no_tracker_and_other_ranks_log_nothing(tmp_path: Path, fake_wandb: FakeWandb) -> None:
    with RunLogger(tmp_path, report_to="none") as log:
        log.log(0, {"train/loss": 1.0})
        log.log_image(0, "eval/samples", _png(tmp_path / "grid.png"))
        log.log_video(0, "eval/video", tmp_path / "final.mp4")
        with pytest.raises(ValueError, match="invalid tag"):
            log.log_image(0, "", tmp_path / "grid.png")
    assert fake_wandb.inits == [] and fake_wandb.logs == []
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()
    with pytest.raises(RuntimeError, match="closed"):
        log.log_image(1, "eval/samples", tmp_path / "grid.png")
    null = NullRunLogger()  # what the non-main processes of a multi-process run get
    for method in ("log", "log_image", "log_video", "write_summary", "close"):
        assert callable(getattr(null, method))
    null.log_image(0, "eval/samples", tmp_path / "grid.png")
    null.log_video(0, "eval/video", tmp_path / "final.mp4")


def test_tensorboard_gets_the_images(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, report_to="tensorboard") as log:
        log.log_image(5, "eval/samples", _png(tmp_path / "grid.png"))
        log.log_image(6, "eval/samples", np.zeros((3, 4, 3), dtype=np.float32))
        log.log_video(6, "eval/video", tmp_path / "final.mp4")  # no video in TensorBoard; no error either
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("eval/samples")
    assert [(e.step, e.width, e.height) for e in images] == [(5, 12, 12), (6, 4, 3)]


def test_real_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run_dir = tmp_path / "run"
    with RunLogger(
        run_dir, config={"learning_rate": 3e-4, "task": "shapes"}, report_to="wandb", resume_step=-1
    ) as log:
        for step in range(3):
            log.log(step, {"train/loss": 1.0 / (step + 1)})
        log.log_image(2, "eval/samples", _png(tmp_path / "grid.png"))
    run_id = (run_dir / "wandb" / "run_id.txt").read_text().strip()
    (first,) = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    record = first.read_bytes()  # the offline run's record log: history, config and run id in it
    for needle in (b"train/loss", b"eval/samples", b"learning_rate", b"shapes", run_id.encode()):
        assert needle in record, needle
    assert list(first.parent.glob("files/media/images/eval/samples_2_*.png"))
    # A resumed run continues the same W&B run (a second offline directory for the same id, synced into one).
    # wandb names offline directories by the second they start in: a resume within the same second would
    # share the first one's directory, so wait for the next second.
    time.sleep(1.05 - time.time() % 1.0)
    with RunLogger(run_dir, report_to="wandb", resume_step=2) as log:
        log.log(3, {"train/loss": 0.2})
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) == 2


# ------------------------------------------------------------------------------------- the trainers
def test_step_loop_reports_scalars_and_sample_plots(tmp_path: Path, fake_wandb: FakeWandb) -> None:
    config = config_from_dict(
        PretrainConfig,
        {
            **yaml.safe_load(Path("recipes/toy/flow_matching_2d.yaml").read_text()),
            "output_dir": str(tmp_path / "run"),
            "steps": 20,
            "batch_size": 32,
            "eval_steps": 10,
            "logging_steps": 5,
            "warmup_steps": 2,
            "eval_samples": 200,
            "report_to": ["tensorboard", "wandb"],
        },
        source="test",
    )
    PretrainTrainer(config).train()
    (init,) = fake_wandb.inits
    assert init["config"] == config_to_dict(config) and init["config"]["report_to"] == [
        "tensorboard",
        "wandb",
    ]
    assert [step for step, _ in fake_wandb.scalars("train/loss")] == [5, 10, 15, 20]
    assert [step for step, value in fake_wandb.scalars("eval/sliced_w2") if math.isfinite(value)] == [10, 20]
    assert [step for step, _ in fake_wandb.scalars("eval/samples")] == [
        10,
        20,
    ]  # the 2-D sample scatter plots
    assert fake_wandb.finished == 1
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_iteration_loop_reports_evaluation_grids(tmp_path: Path, fake_wandb: FakeWandb) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    from rlflow.rollout.prompts import FilePrompts
    from rlflow.trainers.grpo import GRPOTrainer
    from tests.test_grpo import PROMPTS, pixel_model, tiny_config
    from tests.toy_t2i import brightness

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    config = tiny_config(tmp_path, prompt_file, variant="tempflow", report_to="wandb", iterations=1)
    prompts = FilePrompts(str(prompt_file), num_eval=4)
    GRPOTrainer(config, model=pixel_model(), reward=brightness, prompts=prompts).train()
    assert [step for step, _ in fake_wandb.scalars("eval/samples")] == [0, 1]
    assert [step for step, _ in fake_wandb.scalars("eval/reward_mean")] == [0, 1]
    assert fake_wandb.finished == 1 and fake_wandb.inits[0]["config"]["report_to"] == ["wandb"]
