"""The shortcut-model flow policy (Frans et al. 2024, arXiv 2410.12557): the step-size input, its
self-consistency training, exact re-scoring at d = 1/K, save/load, a 1-step learning check on the 2-D
toy, and a ReinFlow PPO smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from rlflow.config import ConfigError, config_from_dict, load_yaml
from rlflow.flows import flow_matching_loss, linear_path, sample_training_times, score_chain
from rlflow.policies import FlowPolicy, FlowPolicyConfig
from rlflow.policies.flow_policy import StepSizeVelocity
from rlflow.trainers.pretrain import PretrainConfig, PretrainTrainer, shortcut_target
from rlflow.utils.checkpoint import CheckpointError
from rlflow.utils.run import RunLogger
from tests.resume_helpers import interrupt_and_resume

RECIPE = "recipes/toy/shortcut_2d.yaml"
TOY_STEPS = 800  # the learning test's budget (both models)


@pytest.fixture(autouse=True)
def _small_and_quiet(one_thread, monkeypatch):
    """Tiny tensors: one thread. Rendering the metric plots costs seconds of matplotlib; not tested here."""
    monkeypatch.setattr(RunLogger, "plot", lambda self: [])


def _config(tmp_path, **overrides) -> PretrainConfig:
    """The shortcut toy recipe on a small budget (the flow_matching_2d recipe with ``shortcut=False``)."""
    data = load_yaml(RECIPE)
    data.update(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        warmup_steps=0,
        num_threads=None,
        steps=20,
        batch_size=64,
        eval_steps=1000,
        eval_samples=500,
    )
    data["model"].update(hidden_dims=[32, 32])
    data["data"].update(num_samples=2000)
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    return config_from_dict(PretrainConfig, data, source="test")


def _shortcut_policy(**overrides) -> FlowPolicy:
    torch.manual_seed(0)
    config = dict(act_dim=3, horizon=2, obs_dim=5, hidden_dims=[32, 32], min_std=0.05, max_std=0.2)
    policy = FlowPolicy(FlowPolicyConfig(shortcut=True, **{**config, **overrides}))
    # Randomise the noise network so the std varies with (obs, t), as in tests/test_rescoring.py.
    torch.nn.init.normal_(policy.noise_std.net.output.weight, std=0.5)
    return policy


def _known_velocity(x, t, cond=None, step_size=None):
    """A hand-checkable s(x, t, d) = x (1 + t) + 3 d (d = None, a plain policy: the same field at d = 0)."""
    d = torch.as_tensor(0.0 if step_size is None else step_size, dtype=x.dtype)
    return x * (1 + t.reshape(-1, 1, 1)) + 3.0 * d.reshape(-1, 1, 1)


class _Recorder:
    """Wraps a velocity function and records every call's inputs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, cond=None, step_size=None):
        self.calls.append(dict(x=x.clone(), t=t.clone(), step_size=torch.as_tensor(step_size).clone()))
        return self.fn(x, t, cond, step_size)


# ------------------------------------------------------------------------ 1. the self-consistency target
def test_self_consistency_target_is_two_small_steps_by_hand():
    class Known:
        velocity = staticmethod(_known_velocity)

    x = torch.tensor([[[1.0, -2.0]], [[0.5, 0.0]]])
    t = torch.tensor([0.0, 0.5])
    d = torch.tensor([0.25, 0.125])
    target = shortcut_target(Known(), x, t, d, None)
    # Row 0: v1 = x + 0.75 = (1.75, -1.25); x' = x + 0.25 v1 = (1.4375, -2.3125); t' = 0.25;
    #        v2 = 1.25 x' + 0.75 = (2.546875, -2.140625); target = (v1 + v2) / 2.
    # Row 1: v1 = 1.5 x + 0.375 = (1.125, 0.375); x' = (0.640625, 0.046875); t' = 0.625;
    #        v2 = 1.625 x' + 0.375 = (1.416015625, 0.451171875).
    expected = torch.tensor([[[2.1484375, -1.6953125]], [[1.2705078125, 0.4130859375]]])
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)
    # query_step_size changes only what the network is asked, not how far the two steps go.
    target0 = shortcut_target(Known(), x, t, d, None, query_step_size=torch.zeros(2))
    v1 = x * (1 + t.reshape(-1, 1, 1))
    v2 = (x + d.reshape(-1, 1, 1) * v1) * (1 + (t + d).reshape(-1, 1, 1))
    torch.testing.assert_close(target0, 0.5 * (v1 + v2), rtol=0, atol=1e-6)


def test_shortcut_loss_draws_and_target_by_hand(tmp_path):
    """The trainer's loss on a known velocity field: FM rows at d = 0, self-consistency rows on the dyadic
    grid with t + 2d <= 1, the finest level queried at d = 0, and the loss value recomputed by hand."""
    trainer = PretrainTrainer(_config(tmp_path, batch_size=400, shortcut_max_steps=8))
    recorder = _Recorder(_known_velocity)
    trainer.policy.velocity = recorder
    batch = trainer.train_data.subset(torch.arange(400))
    state = trainer.generator.get_state()
    parts = trainer.shortcut_loss(batch.targets, batch.conditions)
    first, second, prediction = recorder.calls
    num_fm = 300  # shortcut_fraction 0.25 of 400 rows: the last 100 are self-consistency

    big = prediction["step_size"][num_fm:]
    assert torch.equal(prediction["step_size"][:num_fm], torch.zeros(num_fm))
    assert set(big.tolist()) == {1.0, 0.5, 0.25}  # 2d = 2^-j, j in {0, 1, 2} = log2(8) levels
    t_sc = prediction["t"][num_fm:]
    assert torch.equal(t_sc, torch.floor(t_sc / big) * big)  # multiples of 2d ...
    assert bool((t_sc + big <= 1).all())  # ... with t + 2d <= 1
    assert len(set(t_sc[big == 0.25].tolist())) == 4  # all starts of the finest level are drawn
    half = 0.5 * big
    torch.testing.assert_close(first["t"], t_sc, rtol=0, atol=0)
    torch.testing.assert_close(second["t"], t_sc + half, rtol=0, atol=0)
    # The two small steps are asked at d, except at the finest level (d = 1/8): there at d = 0, the flow.
    assert torch.equal(first["step_size"], torch.where(big == 0.25, 0.0, half))
    assert torch.equal(second["step_size"], first["step_size"])
    torch.testing.assert_close(first["x"], prediction["x"][num_fm:], rtol=0, atol=0)

    x_sc, q = first["x"], first["step_size"]
    v1 = _known_velocity(x_sc, t_sc, None, q)
    v2 = _known_velocity(x_sc + half.reshape(-1, 1, 1) * v1, t_sc + half, None, q)
    sc_target = 0.5 * (v1 + v2)
    predicted = _known_velocity(prediction["x"], prediction["t"], None, prediction["step_size"])
    # FM rows: the noise is the loss's first draw; x_t = (1 - t) x0 + t x1 with the batch's own x1.
    x0 = torch.randn(batch.targets.shape, generator=torch.Generator().set_state(state))[:num_fm]
    x1 = batch.targets[:num_fm]
    t_fm = prediction["t"][:num_fm].reshape(-1, 1, 1)
    torch.testing.assert_close(prediction["x"][:num_fm], (1 - t_fm) * x0 + t_fm * x1, rtol=0, atol=1e-6)
    fm_error = (predicted[:num_fm] - (x1 - x0)).square().mean(dim=(1, 2))
    sc_error = (predicted[num_fm:] - sc_target).square().mean(dim=(1, 2))
    torch.testing.assert_close(parts.flow_matching, fm_error.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.self_consistency, sc_error.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts.loss, torch.cat([fm_error, sc_error]).mean(), rtol=1e-5, atol=1e-6)


def test_stop_gradient_target_and_gradients_reach_the_network(tmp_path):
    trainer = PretrainTrainer(_config(tmp_path, shortcut_fraction=0.5))
    batch = trainer.train_data.subset(torch.arange(64))
    loss = trainer.loss(batch.targets, batch.conditions)
    loss.backward()
    assert trainer.policy.velocity_net.hidden[0].weight.grad.abs().sum() > 0
    x, t = torch.randn(4, 1, 2), torch.rand(4)
    target = shortcut_target(trainer.policy, x, t, torch.full((4,), 0.25), None)
    assert not target.requires_grad


# ---------------------------------------------------------------- 2. the d = 0 part is flow matching
def test_flow_matching_part_equals_the_plain_loss_on_the_same_draws(tmp_path):
    plain = PretrainTrainer(_config(tmp_path / "plain", model={"shortcut": False}))
    shortcut = PretrainTrainer(_config(tmp_path / "shortcut", shortcut_fraction=0.0))
    recorder = _Recorder(_known_velocity)
    plain.policy.velocity = _known_velocity
    shortcut.policy.velocity = recorder
    batch = plain.train_data.subset(torch.arange(64))
    plain.generator.manual_seed(123)
    shortcut.generator.manual_seed(123)
    expected = plain.loss(batch.targets, batch.conditions)
    got = shortcut.loss(batch.targets, batch.conditions)
    assert torch.equal(got, expected)
    assert [torch.equal(c["step_size"], torch.zeros(64)) for c in recorder.calls] == [True]

    # With a self-consistency quarter, the first 3/4 of the rows are still exactly that loss, at d = 0.
    trainer = PretrainTrainer(_config(tmp_path / "mixed"))
    batch = trainer.train_data.subset(torch.arange(64))
    trainer.generator.manual_seed(7)
    parts = trainer.shortcut_loss(batch.targets, batch.conditions)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(batch.targets.shape, generator=g)[:48]
    t = sample_training_times(48, "uniform", generator=g)
    path = linear_path(noise, batch.targets[:48], t)
    with torch.no_grad():
        velocity = trainer.policy.velocity(path.x_t, t, None, step_size=torch.zeros(48))
    torch.testing.assert_close(
        parts.flow_matching, flow_matching_loss(velocity, path.velocity), rtol=1e-6, atol=1e-7
    )


# ---------------------------------------------------------------------------------- 3. config errors
def test_config_errors_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"time_shift=3\.0; set time_shift: 1\.0 or shortcut: false"):
        FlowPolicyConfig(shortcut=True, time_shift=3.0)
    with pytest.raises(ValueError, match="kernel='flow_sde'.*use kernel: reinflow or euler"):
        FlowPolicyConfig(shortcut=True, kernel="flow_sde")
    with pytest.raises(
        ConfigError, match="shortcut_max_steps must be a power of 2.*got 100; use e.g. 64 or 128"
    ):
        _config(tmp_path, shortcut_max_steps=100)
    with pytest.raises(ConfigError, match="shortcut_max_steps must be a power of 2"):
        _config(tmp_path, shortcut_max_steps=1)
    with pytest.raises(ConfigError, match=r"'shortcut_fraction' must be in \[0, 1\), got 1.0"):
        _config(tmp_path, shortcut_fraction=1.0)
    with pytest.raises(ConfigError, match="time_shift"):
        _config(tmp_path, model={"time_shift": 2.0})

    policy = _shortcut_policy()
    x, t, obs = torch.randn(4, 2, 3), torch.rand(4), torch.randn(4, 5)
    with pytest.raises(ValueError, match="shortcut policy.*needs step_size"):
        policy.velocity(x, t, obs)
    with pytest.raises(ValueError, match="step_size must be a scalar or"):
        policy.velocity(x, t, obs, step_size=torch.zeros(3))
    plain = FlowPolicy(FlowPolicyConfig(act_dim=3, horizon=2, obs_dim=5, hidden_dims=[8]))
    with pytest.raises(ValueError, match="only for shortcut policies"):
        plain.velocity(x, t, obs, step_size=0.25)
    assert policy.velocity(x, t, obs, step_size=0.25).shape == x.shape
    torch.testing.assert_close(
        policy.velocity(x, t, obs, step_size=0.25),
        policy.velocity(x, t, obs, step_size=torch.full((4,), 0.25)),
    )


# ------------------------------------------------------------------------------------ 4. save / load
def test_save_load_round_trip_gives_identical_velocities(tmp_path):
    policy = _shortcut_policy(num_steps=2)
    policy.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["config"]["shortcut"] is True
    loaded = FlowPolicy.from_pretrained(tmp_path / "p")
    assert loaded.config == policy.config
    x, t, obs = torch.randn(16, 2, 3), torch.rand(16), torch.randn(16, 5)
    for d in (0.0, 0.125, 0.5, 1.0):
        assert torch.equal(loaded.velocity(x, t, obs, step_size=d), policy.velocity(x, t, obs, step_size=d))
    actions = [p.act(obs, generator=torch.Generator().manual_seed(0)) for p in (loaded, policy)]
    assert torch.equal(*actions)
    # Different step sizes give different velocities: the input is really used.
    assert not torch.allclose(
        policy.velocity(x, t, obs, step_size=0.0), policy.velocity(x, t, obs, step_size=1.0)
    )
    # A shortcut checkpoint does not load as a plain policy (the input layer is wider).
    with pytest.raises(CheckpointError, match="shape mismatch"):
        FlowPolicy.from_pretrained(tmp_path / "p", shortcut=False)


# ------------------------------------------------------------------------------- 5. exact re-scoring
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_sampled_log_probs_equal_rescored_ones(num_steps):
    policy = _shortcut_policy(num_steps=num_steps)
    obs = torch.randn(128, 5, generator=torch.Generator().manual_seed(1))
    traj = policy.sample(obs, generator=torch.Generator().manual_seed(2))
    assert traj.log_probs.abs().min() > 0
    assert torch.equal(policy.log_prob(traj), traj.log_probs)
    assert torch.equal(policy.score(traj, steps=[num_steps - 1]).log_probs, traj.log_probs[:, -1:])
    out = policy.explore(obs, generator=torch.Generator().manual_seed(2))
    log_prob, entropy = policy.evaluate_actions(obs, out.record)
    assert torch.equal(log_prob, out.log_prob) and torch.isfinite(entropy).all()
    # Non-vacuous: re-scoring at another step size than the grid's d = 1/K changes the log-probs.
    wrong = score_chain(StepSizeVelocity(policy, 0.5 / num_steps), policy.kernel, traj).log_probs
    assert (wrong - traj.log_probs).abs().max() > 1e-2
    # The deterministic chain is Euler with s(x, t, 1/K).
    x = policy._initial_noise(128, torch.Generator().manual_seed(3))
    for k in range(num_steps):
        t = torch.full((128,), k / num_steps)
        x = x + policy.velocity(x, t, obs, step_size=1 / num_steps) / num_steps
    actions = policy.act(obs, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(actions, x, rtol=0, atol=1e-6)


def test_a_non_uniform_grid_is_refused_for_shortcut_policies():
    policy = _shortcut_policy(num_steps=4)
    traj = policy.sample(torch.randn(8, 5))
    traj.times = torch.tensor([0.0, 0.5, 0.75, 0.9, 1.0])
    with pytest.raises(ValueError, match="uniform grid"):
        policy.log_prob(traj)


# ------------------------------------------------------------------------------------- 6. resume
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    common = dict(steps=12, save_steps=6, logging_steps=3)
    straight = PretrainTrainer(_config(tmp_path / "a", **common))
    straight.train()
    config = _config(tmp_path / "b", **common)
    resumed = interrupt_and_resume(PretrainTrainer, config, 8, monkeypatch)
    for key, value in straight.policy.state_dict().items():
        assert torch.equal(value, resumed.policy.state_dict()[key]), key


# ----------------------------------------------------------------------------- 7. 1-step learning
def test_shortcut_beats_plain_flow_matching_at_one_step(tmp_path):
    """Same budget (TOY_STEPS x 256 pairs, 3 x 64 MLP), both sampled with ONE Euler step. A plain flow's
    single step lands near the data mean (E[x1] = 0 for the eight Gaussians), a shortcut model's d = 1
    step spreads over the modes. Sliced W2 to 1000 held-out points, measured for seeds 0/1/2: plain 1.77 /
    1.76 / 1.73, shortcut 0.56 / 0.48 / 0.52, data floor 0.16-0.22, N(0, I) prior 1.07-1.08. So the
    shortcut closes 55-65% of the prior-to-floor gap in one step; asserted: it beats the plain flow by
    half the gap and closes at least 40% of it."""
    budget = dict(steps=TOY_STEPS, batch_size=256, eval_steps=10_000, eval_num_steps=1, learning_rate=2e-3)
    budget.update(eval_samples=2000, data={"num_samples": 20_000})
    summaries = {}
    for shortcut in (False, True):
        config = _config(
            tmp_path / str(shortcut), model={"hidden_dims": [64, 64, 64], "shortcut": shortcut}, **budget
        )
        summaries[shortcut] = PretrainTrainer(config).train()
    plain, ours = summaries[False], summaries[True]
    floor, prior = ours["sliced_w2_data_floor"], ours["sliced_w2_prior"]
    assert plain["nfe"] == ours["nfe"] == 1.0
    gap = prior - floor
    assert 0.1 < floor < 0.3 and gap > 0.7, ours  # the yardsticks themselves are sane
    assert ours["sliced_w2"] < plain["sliced_w2"] - 0.5 * gap, (plain, ours)
    assert ours["sliced_w2"] < floor + 0.6 * gap, ours


# ------------------------------------------------------------------------------------- 8. PPO smoke run
def test_reinflow_ppo_runs_with_a_shortcut_policy(tmp_path, monkeypatch):
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    from rlflow.trainers.ppo import PPOTrainer
    from rlflow.utils.run import read_metrics
    from tests.test_ppo import tiny_flow_config

    monkeypatch.chdir(tmp_path)  # MuJoCo writes ./MUJOCO_LOG.TXT
    flow = {"hidden_dims": [32, 32], "noise_hidden_dims": [16], "shortcut": True}
    config = tiny_flow_config(tmp_path / "run", flow=flow, iterations=2, rollout_steps=16, minibatch_size=16)
    trainer = PPOTrainer(config)
    assert trainer.actor.config.shortcut and trainer.actor.config.kernel == "reinflow"
    trainer.train()
    rows = [row for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if row["step"] > 0]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        # PPOTrainer.update raises above 1e-4. Measured 1.0e-6-1.4e-6 here, as for a plain policy in the
        # same setting (1.0e-6-1.9e-6): float32 round-off between the rollout's and the update's batch shapes.
        assert row["train/first_log_ratio_max"] < 1e-5
        assert row["train/actor_updated"] == 1.0
    assert FlowPolicy.from_pretrained(tmp_path / "run" / "policy").config.shortcut

    # The check has teeth for shortcut policies: re-scoring at another step size than sampling fires it.
    original_collect = PPOTrainer.collect

    def collect_then_change_the_step_size(self):
        batch = original_collect(self)
        self.actor.velocity_model = lambda times: StepSizeVelocity(self.actor, 0.5 / (times.shape[0] - 1))
        return batch

    monkeypatch.setattr(PPOTrainer, "collect", collect_then_change_the_step_size)
    sabotaged = PPOTrainer(tiny_flow_config(tmp_path / "sabotaged", flow=flow, iterations=1, eval_episodes=1))
    with pytest.raises(RuntimeError, match="first-update log-ratio"):
        sabotaged.train()
