"""Exact resume for every trainer: killed part-way and restarted with the same command, a run ends with the
same weights (bitwise), the same ``metrics.jsonl`` rows and the same ``summary.json`` as the uninterrupted
run, wall-clock fields (:data:`TIME_KEYS`) aside.

Each test runs a tiny config (:data:`CASES`: every trainer and variant) to the end in ``a/``, runs it again
in ``b/`` killed (see :mod:`tests.resume_helpers`: the directory is left as a kill leaves it, with nothing
a ``finally`` wrote), resumes in a fresh trainer, and compares (:func:`assert_same_run`). Two kill points:
after a checkpoint and before the next one with logged work in between, and right after the last
checkpoint (before the final model and summary). The last test kills a real ``python -m rlflow grpo``
process with SIGKILL and reruns the same command.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rlflow.config import config_from_dict, load_yaml
from rlflow.utils.checkpoint import list_checkpoints, load_state_dict
from rlflow.utils.run import RunLogger, read_metrics
from tests.resume_helpers import fresh_process_rng, interrupt_and_resume

REPO = Path(__file__).resolve().parents[1]

#: The wall-clock fields left out of the comparison, by name (metrics rows, summary.json and
#: training_state.pt). Every other field must be equal; a new key that looks like a time
#: (:data:`TIME_LIKE`) must be added here or to :data:`COMPARED_TIME_LIKE`, or the test fails.
TIME_KEYS = frozenset(
    {
        "time/steps_per_second",  # step-loop trainers: steps per second of the log window
        "time/eval_seconds",  # pretrain-t2i: the periodic evaluation
        "pretrain/wall_seconds",  # reward-model summary: the renderer pretraining stage
        "time/collect_seconds",  # iteration loop and PPO: rollout / data collection time
        "time/iteration_seconds",  # iteration loop and PPO: the whole iteration
        "time/env_steps_per_second",  # PPO: environment throughput
        "time/wall_seconds",  # PPO: the run's wall clock so far
        "wall_seconds",  # summary.json of every trainer; PPO's training_state.pt
    }
)
#: What a key that is a wall-clock time looks like.
TIME_LIKE = re.compile(r"time|second|wall|per_sec|fps|elapsed|duration", re.IGNORECASE)
#: Keys that look like times but are not wall-clock (compared like everything else): model sizes.
COMPARED_TIME_LIKE = frozenset({"time_embed_dim", "time_dim", "time_shift"})


@pytest.fixture(autouse=True)
def _quiet_and_cheap(tmp_path, monkeypatch):
    # Metric plots cost seconds of matplotlib per run (and are not outputs compared here); MuJoCo writes
    # MUJOCO_LOG.TXT into the working directory.
    monkeypatch.setattr(RunLogger, "plot", lambda self: [])
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- comparison
def _drop_time(obj: Any, where: str) -> Any:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if isinstance(key, str) and key in TIME_KEYS:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and isinstance(key, str) and TIME_LIKE.search(key) and key not in COMPARED_TIME_LIKE:
                raise AssertionError(f"{where}: {key!r} looks like a wall-clock time: name it in TIME_KEYS")
            out[key] = _drop_time(value, where)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_drop_time(v, where) for v in obj)
    return obj


def _same(a: Any, b: Any, where: str) -> None:
    """Exact equality of nested containers; tensors bitwise (``torch.equal``), NaN equal to NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        pass
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _relative_paths(obj: Any, run_dir: Path) -> Any:
    """Paths into the run directory (e.g. ``model_dir``) as ``<run>/...`` so two runs compare."""
    if isinstance(obj, str):
        return obj.replace(str(run_dir), "<run>")
    if isinstance(obj, dict):
        return {k: _relative_paths(v, run_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_paths(v, run_dir) for v in obj]
    return obj


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise-equal safetensors (final model, EMA, checkpoints), equal metrics rows, summary and other JSON
    (time keys aside), and an equal final training state (optimizer, scheduler, RNG, counters, extra
    state)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    files_b = sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    assert files_a and files_a == files_b
    for name in files_a:
        wa, wb = load_state_dict(a / name), load_state_dict(b / name)
        assert set(wa) == set(wb), name
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}: {key} differs"

    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]  # no duplicated or missing rows
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        _same(_drop_time(row_a, "metrics"), _drop_time(row_b, "metrics"), f"metrics step {row_a['step']}")

    # summary.json, and the JSON beside the weights (model configs: e.g. PPO's annealed noise bounds).
    json_a = sorted(p.relative_to(a) for p in a.rglob("*.json"))
    assert Path("summary.json") in json_a and json_a == sorted(p.relative_to(b) for p in b.rglob("*.json"))
    for name in json_a:
        _same(
            _relative_paths(_drop_time(json.loads((a / name).read_text()), str(name)), a),
            _relative_paths(_drop_time(json.loads((b / name).read_text()), str(name)), b),
            str(name),
        )

    checkpoints_a, checkpoints_b = list_checkpoints(a), list_checkpoints(b)
    assert [s for s, _ in checkpoints_a] == [s for s, _ in checkpoints_b]
    last_a, last_b = checkpoints_a[-1][1], checkpoints_b[-1][1]
    states = sorted(p.name for p in last_a.glob("*.pt"))
    assert states == sorted(p.name for p in last_b.glob("*.pt"))
    for name in states:
        state_a = torch.load(last_a / name, weights_only=True)
        state_b = torch.load(last_b / name, weights_only=True)
        _same(_drop_time(state_a, name), _drop_time(state_b, name), f"{last_a.name}/{name}")


def check_exact_resume(trainer_cls, make, tmp_path: Path, crash_at: int, monkeypatch, **kill_point) -> None:
    """``make(run_dir)`` builds the trainer for a run in ``run_dir``: straight in ``a``, killed at
    ``crash_at`` and resumed in ``b``; then :func:`assert_same_run`. ``kill_point``: ``method`` / ``after``
    of :func:`tests.resume_helpers.kill_at` (default: between two checkpoints, with logged work lost)."""
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    fresh_process_rng()
    make(a).train()
    interrupt_and_resume(
        trainer_cls,
        None,
        crash_at,
        monkeypatch,
        make=lambda: make(b),
        output_dir=b,
        require_lost_work=not kill_point,
        **kill_point,
    )
    assert_same_run(a, b)


# ------------------------------------------------------------------------------------------- the runs
# Each factory builds the trainer of a tiny run in ``run`` (inputs it needs go to ``tmp``, made once).
# Step-loop runs: 6 steps, checkpoints at 2, 4 and 6, training rows every 3 steps, an evaluation at 4;
# killed in step 4, after the step-3 row whose loss window spans the checkpoint.
STEP_LOOP = dict(steps=6, save_steps=2, logging_steps=3, eval_steps=4, warmup_steps=1, num_threads=1)
STEP_KILL = 3


def pretrain(run: Path, tmp: Path):
    from rlflow.trainers.pretrain import PretrainConfig, PretrainTrainer

    data = load_yaml(REPO / "recipes" / "toy" / "flow_matching_2d.yaml")
    data["model"]["hidden_dims"] = [16, 16]
    data["data"]["num_samples"] = 400
    data.update(STEP_LOOP, output_dir=str(run), report_to="none", batch_size=16, eval_samples=64)
    return PretrainTrainer(config_from_dict(PretrainConfig, data, source="test"))


def pretrain_t2i(run: Path, tmp: Path):
    from rlflow.testing import TINY_SHAPES_SIZES
    from rlflow.trainers.t2i_pretrain import T2IPretrainConfig, T2IPretrainTrainer

    data = dict(
        STEP_LOOP,
        output_dir=str(run),
        model=dict(TINY_SHAPES_SIZES),
        batch_size=8,
        learning_rate=3e-3,
        prompt_dropout=0.2,
        eval_prompts=4,
        eval_samples_per_prompt=1,
        eval_num_steps=2,
        eval_loss_samples=8,
        grid_size=4,
        report_to="none",
        plot_curves=False,
    )
    return T2IPretrainTrainer(config_from_dict(T2IPretrainConfig, data, source="test"))


def pretrain_vae(run: Path, tmp: Path):
    from rlflow.trainers.vae_pretrain import VAEPretrainConfig, VAEPretrainTrainer

    data = dict(
        STEP_LOOP,
        output_dir=str(run),
        vae={"image_size": 32, "block_out_channels": [8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4},
        batch_size=8,
        learning_rate=3e-3,
        eval_images=8,
        calibration_images=16,
        grid_size=4,
        report_to="none",
    )
    return VAEPretrainTrainer(config_from_dict(VAEPretrainConfig, data, source="test"))


def reward_model(kind: str):
    def make(run: Path, tmp: Path):
        from rlflow.data.preferences import save_preferences
        from rlflow.trainers.reward_model import RewardModelTrainConfig, RewardModelTrainer
        from tests.test_reward_model import TINY_IMAGE, _image_set, _segment_set

        prefs = tmp / "prefs"
        if not prefs.exists():
            if kind == "image":
                pairs = _image_set(48, seed=2, size=32)
                pairs.latents_a, pairs.latents_b = pairs.a * 2 - 1, pairs.b * 2 - 1
            else:
                pairs = _segment_set(48, seed=0)
            save_preferences(pairs, prefs)
        # image: noise-aware (random t and noise per pair) after a renderer pretraining stage, whose
        # metrics are summary fields of their own.
        specific = (
            dict(noise_aware=True, pretrain_steps=2, pretrain_batch_size=4)
            if kind == "image"
            else dict(loss="bt", center_coef=0.01)
        )
        data = dict(
            STEP_LOOP,
            data_dir=str(prefs),
            output_dir=str(run),
            model={**TINY_IMAGE, "conv_channels": [8, 16], "stem_channels": 4},
            batch_size=8,
            learning_rate=3e-3,
            eval_train_pairs=16,
            heldout_fraction=0.25,
            report_to="none",
            plot_curves=False,
            **specific,
        )
        return RewardModelTrainer(config_from_dict(RewardModelTrainConfig, data, source="test"))

    return make


# Iteration-loop runs: 4 iterations, checkpoints at 2 and 4, evaluations at 0 (base), 3 and 4; killed in
# the update of iteration 4, after the row (and evaluation) of iteration 3.
ONLINE = dict(
    iterations=4,
    save_steps=2,
    eval_steps=3,
    save_total_limit=2,
    report_to="none",
    num_threads=1,
    num_eval_prompts=2,
    eval_num_steps=2,
    allow_eval_overlap=True,
    rewards={"brightness": 1.0},
    grid_size=2,
)
ONLINE_KILL = 3
#: Shapes-world prompts the tiny model's tokenizer knows (a file source: sampled with the run's generator).
PROMPTS = ["a red circle", "a blue square", "a green triangle", "two red circles"]


def prompt_file(tmp: Path) -> Path:
    path = tmp / "prompts.txt"
    if not path.exists():
        path.write_text("\n".join(PROMPTS) + "\n")
    return path


def tiny_shapes_model(seed: int = 0):
    """A 1-layer shapes model on 3x8x8 images (~10k parameters), built the same way every time."""
    from rlflow.testing import tiny_shapes_config
    from rlflow.worlds.shapes.model import build_shapes_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_shapes_model(tiny_shapes_config(image_size=8, patch_size=4))


def online_values(run: Path, tmp: Path, **overrides) -> dict[str, Any]:
    values = dict(
        ONLINE,
        output_dir=str(run),
        prompts=str(prompt_file(tmp)),
        prompts_per_iteration=2,
        samples_per_prompt=3,
        num_steps=2,
        minibatch_size=4,
        learning_rate=3e-3,
    )
    values.update(overrides)
    return values


GRPO_VARIANTS = {
    # A full fine-tune with a KL to the frozen copy, random trained steps, an EMA, a cosine schedule.
    "flow_grpo": dict(kl_beta=0.01, ema_decay=0.5, lr_scheduler_type="cosine", timestep_fraction=0.5),
    # A random window per iteration (drawn from the run's generator).
    "fast": dict(variant="fast", num_steps=4, window_size=2),
    "tempflow": dict(variant="tempflow", num_steps=4, branch_steps=[0, 2]),
}


def grpo(variant: str):
    def make(run: Path, tmp: Path):
        from rlflow.trainers.grpo import GRPOConfig, GRPOTrainer
        from rlflow.trainers.text_to_image import ModelConfig

        values = dict(
            ONLINE,
            output_dir=str(run),
            prompts=str(prompt_file(tmp)),
            model=ModelConfig(lora_r=0),
            prompts_per_iteration=2,
            group_size=3,
            num_steps=2,
            minibatch_size=4,
            kl_beta=0.0,
            learning_rate=3e-3,
            clip_range=0.2,
        )
        values.update(GRPO_VARIANTS[variant])
        return GRPOTrainer(GRPOConfig(**values), model=tiny_shapes_model())

    return make


def rwr(run: Path, tmp: Path):
    from rlflow.trainers.rwr import RWRConfig, RWRTrainer

    config = RWRConfig(**online_values(run, tmp, temperature=0.05, ema_decay=0.5))
    config.model.lora_r = 0
    return RWRTrainer(config, model=tiny_shapes_model())


def nft(run: Path, tmp: Path):
    from rlflow.trainers.nft import NFTConfig, NFTTrainer

    # A soft old-policy update from the first step (the old policy is state of its own) and a KL term.
    values = online_values(run, tmp, gradient_steps_per_iteration=2, old_policy_decay_ramp=0.1, kl_beta=0.01)
    config = NFTConfig(**values)
    config.model.lora_r = 0
    return NFTTrainer(config, model=tiny_shapes_model())


def actor_critic(use_critic: bool):
    def make(run: Path, tmp: Path):
        from rlflow.trainers.actor_critic import ActorCriticConfig, ActorCriticTrainer

        # With the critic: one warm-up iteration (reward-weighted actor), then critic advantages; the
        # running reward normaliser and the W2 term to the frozen base either way.
        values = online_values(
            run,
            tmp,
            use_critic=use_critic,
            critic_width=8,
            critic_minibatch_size=4,
            critic_warmup_iterations=1,
            warmup_actor="reward",
            w2_alpha=0.5,
        )
        config = ActorCriticConfig(**values)
        config.model.lora_r = 0
        return ActorCriticTrainer(config, model=tiny_shapes_model())

    return make


def dpo(mode: str):
    def make(run: Path, tmp: Path):
        from rlflow.data.preferences import save_preferences
        from rlflow.trainers.dpo import DPOConfig, DPOTrainer
        from rlflow.trainers.text_to_image import ModelConfig
        from tests.test_dpo import preference_set

        if mode == "offline":
            prefs = tmp / "prefs"
            if not prefs.exists():
                pairs = preference_set(16)
                pairs.latents_a = torch.nn.functional.avg_pool2d(pairs.latents_a, 4)  # the model's 3x8x8
                pairs.latents_b = torch.nn.functional.avg_pool2d(pairs.latents_b, 4)
                save_preferences(pairs, prefs)
            specific = dict(
                mode="offline",
                preferences=str(prefs),
                dimension="alignment",
                heldout_fraction=0.25,
                pairs_per_iteration=4,
                timesteps_per_pair=2,
            )
        else:
            specific = dict(prompts_per_iteration=2, samples_per_prompt=3, num_steps=2)
        values = dict(
            ONLINE,
            output_dir=str(run),
            prompts=str(prompt_file(tmp)),
            model=ModelConfig(lora_r=0),
            minibatch_size=4,
            learning_rate=1e-3,
            beta=100.0,
            ema_decay=0.5,
            plots=False,
            **specific,
        )
        return DPOTrainer(DPOConfig(**values), model=tiny_shapes_model())

    return make


def ppo(policy: str):
    def make(run: Path, tmp: Path):
        pytest.importorskip("gymnasium")
        pytest.importorskip("mujoco")
        from rlflow.trainers.ppo import PPOTrainer
        from tests.test_ppo import tiny_flow_config, tiny_gaussian_config

        # As the iteration loop: 4 iterations, checkpoints at 2 and 4, evaluations at 0, 3 and 4.
        common = dict(
            iterations=4, save_steps=2, eval_steps=3, num_threads=1, rollout_steps=8, minibatch_size=8
        )
        if policy == "gaussian":
            common.update(reward_scaling=True, lr_scheduler_type="cosine")
            return PPOTrainer(tiny_gaussian_config(run, **common))
        common.update(final_max_std=0.12, critic_warmup_iterations=1)  # annealed noise bounds
        return PPOTrainer(tiny_flow_config(run, **common))

    return make


def _trainer_class(module: str, name: str):
    def load() -> type:
        import importlib

        return getattr(importlib.import_module(f"rlflow.trainers.{module}"), name)

    return load


#: name -> (trainer class loader, factory, kill point between checkpoints, the run's last step/iteration)
CASES: dict[str, tuple[Any, Any, int, int]] = {
    "pretrain": (_trainer_class("pretrain", "PretrainTrainer"), pretrain, STEP_KILL, 6),
    "pretrain-t2i": (_trainer_class("t2i_pretrain", "T2IPretrainTrainer"), pretrain_t2i, STEP_KILL, 6),
    "pretrain-vae": (_trainer_class("vae_pretrain", "VAEPretrainTrainer"), pretrain_vae, STEP_KILL, 6),
    **{
        f"reward-model-{kind}": (
            _trainer_class("reward_model", "RewardModelTrainer"),
            reward_model(kind),
            STEP_KILL,
            6,
        )
        for kind in ("image", "segment")
    },
    **{
        f"grpo-{variant}": (_trainer_class("grpo", "GRPOTrainer"), grpo(variant), ONLINE_KILL, 4)
        for variant in GRPO_VARIANTS
    },
    "nft": (_trainer_class("nft", "NFTTrainer"), nft, ONLINE_KILL, 4),
    "rwr": (_trainer_class("rwr", "RWRTrainer"), rwr, ONLINE_KILL, 4),
    **{
        f"dpo-{mode}": (_trainer_class("dpo", "DPOTrainer"), dpo(mode), ONLINE_KILL, 4)
        for mode in ("online", "offline")
    },
    "actor-critic": (
        _trainer_class("actor_critic", "ActorCriticTrainer"),
        actor_critic(True),
        ONLINE_KILL,
        4,
    ),
    "actor-critic-no-critic": (
        _trainer_class("actor_critic", "ActorCriticTrainer"),
        actor_critic(False),
        ONLINE_KILL,
        4,
    ),
    **{
        f"ppo-{policy}": (_trainer_class("ppo", "PPOTrainer"), ppo(policy), 3, 4)
        for policy in ("gaussian", "flow")
    },
}


@pytest.mark.parametrize("name", list(CASES))
def test_killed_between_checkpoints(tmp_path, monkeypatch, name):
    """Killed after a checkpoint with logged work after it (rows to drop, a log window to restore)."""
    trainer_class, make, kill, _ = CASES[name]
    check_exact_resume(trainer_class(), lambda run: make(run, tmp_path), tmp_path, kill, monkeypatch)


@pytest.mark.parametrize("name", list(CASES))
def test_killed_after_the_last_checkpoint(tmp_path, monkeypatch, name):
    """Killed when the last checkpoint is written but the final model and summary.json are not."""
    trainer_class, make, _, last = CASES[name]
    check_exact_resume(
        trainer_class(),
        lambda run: make(run, tmp_path),
        tmp_path,
        last,
        monkeypatch,
        method="save_checkpoint",
        after=True,
    )


# ------------------------------------------------------------------------------------- a real kill -9
def test_sigkill_a_real_grpo_run_and_rerun_the_same_command(tmp_path):
    """``python -m rlflow grpo`` killed with SIGKILL once its first checkpoint exists, then the same
    command again: the same outputs as an uninterrupted process (run alongside, to save wall time)."""
    import yaml

    from rlflow.worlds.shapes.model import save_shapes_model

    base = save_shapes_model(tiny_shapes_model(), tmp_path / "base")
    recipe = dict(
        ONLINE,
        iterations=6,
        model={"path": str(base), "lora_r": 0},
        prompts=str(prompt_file(tmp_path)),
        prompts_per_iteration=2,
        group_size=3,
        num_steps=2,
        minibatch_size=4,
        learning_rate=3e-3,
        clip_range=0.2,
        kl_beta=0.01,
        ema_decay=0.5,
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # One thread each (two processes share the cores) and a fixed hash seed (set iteration order is not
    # what this test is about).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

    processes: list[subprocess.Popen] = []

    def start(run: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "rlflow", "grpo", "--config", str(tmp_path / "recipe.yaml")]
        process = subprocess.Popen(
            [*command, "--output_dir", str(run)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        return process

    # A hang guard for the whole test (three processes; ~35 s on two busy cores, most of it imports).
    deadline = time.monotonic() + 120

    def finish(process: subprocess.Popen) -> None:
        _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert process.returncode == 0, stderr.decode()[-3000:]

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    try:
        straight, killed = start(a), start(b)
        while not list_checkpoints(b):  # the first checkpoint (iteration 2) is complete
            assert killed.poll() is None, killed.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        assert killed.returncode == -signal.SIGKILL
        assert not (b / "summary.json").exists()  # killed part-way, not after the end
        finish(start(b))  # the same command again
        finish(straight)
    finally:
        for process in processes:  # only after a failure: the ones this test started, by handle
            if process.poll() is None:
                process.kill()
                process.wait()
    assert_same_run(a, b)
