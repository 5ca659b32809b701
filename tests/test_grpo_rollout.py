"""Prompt-world rollouts: group layout, SDE windows, TempFlow branching, re-scoring, async rewards."""

from __future__ import annotations

import pytest
import torch

from rlflow.flows.kernels import EulerStep, FlowSDEStep
from rlflow.flows.sampling import sample_chain, score_chain, score_transitions
from rlflow.flows.time import time_grid
from rlflow.rollout.prompts import (
    FilePrompts,
    collect_branched_groups,
    collect_prompt_groups,
    evaluate_reward,
)
from tests.toy_t2i import ToyTextToImage, brightness

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def _groups(model, *, stochastic, train_steps, shared_noise=False, asynchronous=True, chunk=4, seed=0):
    return collect_prompt_groups(
        model,
        FlowSDEStep(0.7),
        brightness,
        PROMPTS,
        group_size=4,
        times=time_grid(6),
        stochastic_steps=stochastic,
        train_steps=train_steps,
        generator=torch.Generator().manual_seed(seed),
        chunk_size=chunk,
        shared_noise=shared_noise,
        asynchronous_rewards=asynchronous,
    )


def test_group_rollout_layout_and_rescoring():
    model = ToyTextToImage()
    stochastic = torch.ones(6, dtype=torch.bool)
    train = torch.arange(5).expand(12, -1)
    batch = _groups(model, stochastic=stochastic, train_steps=train)
    assert batch.prompts == [p for p in PROMPTS for _ in range(4)]
    assert batch.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batch.trajectory.chain.shape == (12, 7, 3, 4, 4)
    assert batch.images.shape == (12, 3, 4, 4) and batch.rewards.shape == (12,)
    torch.testing.assert_close(batch.rewards, brightness(batch.images, batch.prompts))
    assert batch.nfe == 12 * 6
    # Re-scoring every (sample, step) pair in one call reproduces the sampled log-probs: ratio 1.
    samples = torch.arange(12).repeat_interleave(6)
    steps = torch.arange(6).repeat(12)
    scores = score_transitions(model, FlowSDEStep(0.7), batch.trajectory, samples, steps)
    torch.testing.assert_close(scores.log_probs.reshape(12, 6), batch.trajectory.log_probs, rtol=0, atol=1e-4)
    # ... and agrees with score_chain (which is built on it).
    chain_scores = score_chain(model, FlowSDEStep(0.7), batch.trajectory)
    torch.testing.assert_close(chain_scores.log_probs, batch.trajectory.log_probs, rtol=0, atol=1e-4)


def test_sde_window_is_ode_elsewhere_and_async_equals_sync():
    model = ToyTextToImage()
    stochastic = torch.zeros(6, dtype=torch.bool)
    stochastic[2:4] = True
    train = torch.tensor([2, 3]).expand(12, -1)
    a = _groups(model, stochastic=stochastic, train_steps=train, asynchronous=True)
    b = _groups(model, stochastic=stochastic, train_steps=train, asynchronous=False)
    torch.testing.assert_close(a.rewards, b.rewards)
    torch.testing.assert_close(a.trajectory.chain, b.trajectory.chain)
    assert (a.trajectory.log_probs[:, [0, 1, 4, 5]] == 0).all()
    assert (a.trajectory.log_probs[:, 2:4] != 0).all()
    with pytest.raises(ValueError, match="stochastic"):
        _groups(model, stochastic=stochastic, train_steps=torch.tensor([0, 2]).expand(12, -1))


def test_shared_noise_within_groups():
    model = ToyTextToImage()
    batch = _groups(
        model, stochastic=torch.ones(6, dtype=torch.bool), train_steps=torch.zeros(12, 1), shared_noise=True
    )
    x0 = batch.trajectory.chain[:, 0]
    assert torch.equal(x0[0], x0[3]) and not torch.equal(x0[0], x0[4])
    assert not torch.equal(batch.trajectory.chain[0, -1], batch.trajectory.chain[1, -1])  # SDE diverges


def test_tempflow_branching():
    model = ToyTextToImage()
    times = time_grid(6)
    kernel = FlowSDEStep(0.7)
    model.calls = 0
    batch = collect_branched_groups(
        model,
        kernel,
        brightness,
        PROMPTS,
        group_size=3,
        times=times,
        branch_steps=[1, 4],
        generator=torch.Generator().manual_seed(0),
        chunk_size=5,
    )
    calls = model.calls
    n = len(PROMPTS) * 2 * 3
    assert len(batch) == n and batch.trajectory.chain.shape == (n, 7, 3, 4, 4)
    assert batch.group_ids.tolist() == [g for g in range(6) for _ in range(3)]
    steps = batch.train_steps.flatten()
    assert steps.tolist() == ([1] * 3 + [4] * 3) * 3
    # Only the branch step is stochastic; everything before it is the prompt's main ODE chain.
    nonzero = batch.trajectory.log_probs != 0
    assert nonzero.sum(dim=1).tolist() == [1] * n
    assert torch.equal(nonzero.float().argmax(dim=1), steps)
    main = sample_chain(
        model,
        EulerStep(),
        batch.trajectory.chain[::6, 0],
        times,
        model.encode_prompts(PROMPTS),
        deterministic=True,
    )
    for row in range(n):
        prompt, b = row // 6, int(steps[row])
        torch.testing.assert_close(batch.trajectory.chain[row, : b + 1], main.chain[prompt, : b + 1])
    # Siblings differ after the branch; after it the chain follows the ODE (re-scored Euler steps match).
    assert not torch.equal(batch.trajectory.chain[0, 2], batch.trajectory.chain[1, 2])
    ode = score_transitions(
        model,
        kernel,
        batch.trajectory,
        torch.zeros(4, dtype=torch.long),
        torch.tensor([2, 3, 4, 5]),
        stochastic=torch.zeros(4, dtype=torch.bool),
    )
    torch.testing.assert_close(ode.means, batch.trajectory.chain[0, 3:])
    # Re-scored branch transitions give the sampled log-probs.
    scores = score_transitions(model, kernel, batch.trajectory, torch.arange(n), steps)
    torch.testing.assert_close(
        scores.log_probs, batch.trajectory.log_probs[torch.arange(n), steps], rtol=0, atol=1e-4
    )
    # NFE: per prompt 6 (main) + 3 siblings x ((6 - 1) + (6 - 4)); velocity calls match exactly.
    assert batch.nfe == 3 * (6 + 3 * (5 + 2)) == calls


def test_file_prompts_and_reward_validation(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na cat\n\na dog\na bird\n")
    source = FilePrompts(str(path), num_eval=2)
    assert source.eval_prompts() == ["a cat", "a dog"]
    drawn = source.sample(50, torch.Generator().manual_seed(0))
    assert set(drawn) == {"a cat", "a dog", "a bird"}
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        FilePrompts(str(tmp_path / "missing.txt"))
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_reward(lambda im, p: torch.tensor([1.0, float("nan")]), images, ["a", "b"])
    with pytest.raises(ValueError, match="3 values for 2 samples"):
        evaluate_reward(lambda im, p: torch.zeros(3), images, ["a", "b"])
