"""Rollout throughput of the shipped Hopper flow policy (K=4, chunks of 4) against the simulator's limit.

Every actor drives gymnasium vector envs through ``collect_gym_rollout``, all of them interleaved per
repeat so machine-load drift hits all alike. Actors:

- ``random``: uniform random action chunks, no network (the simulator's limit);
- ``flow_old``: the policy's sampling as it was before the throughput work (commit f5fb414): per step,
  ``velocity()`` with its own time embedding through ``nn.Module`` calls and the kernel scoring its own
  Gaussian log-prob, outside ``torch.inference_mode``; the same numbers (checked at start), the old costs;
- ``flow_no_inference_mode``: today's sampling (``FlowPolicy.chain_velocity``: the grid's time embeddings
  once per chain; all K steps' log-probs in one call; the MLP without module dispatch), outside inference
  mode;
- ``flow``: today's sampling under ``torch.inference_mode``, which ``collect_gym_rollout`` now uses: the
  default path (PPO's ``rollout_overlap: false``).

Vector envs (the same sub-envs and seeds; each actor's rate is compared with ``random`` through the same
kind, and with ``random`` through ``sync``, the issue's ratio):

- ``sync``: ``make_vector_env`` (a ``SyncVectorEnv``, the default);
- ``split_thread``: ``SplitVectorEnv`` of two ``SyncVectorEnv`` halves, one half stepping in a background
  thread while the policy acts for the other (PPO's ``rollout_overlap: true``);
- ``async``: gymnasium's ``AsyncVectorEnv`` (one worker process per sub-env), not split;
- ``split_async``: ``SplitVectorEnv`` of two ``AsyncVectorEnv`` halves.

Overlap needs a second free core: the JSON records the cores the process may use (``cpus``). Rates swing
by +-20% between repeats on this machine, so the policy's own cost is also timed without the simulator
(``policy_ms_per_decision``: ``explore`` on a fixed observation batch, the variants interleaved).

Writes ``benchmarks/results/rollout_throughput.json``; the ratio of interest is ``flow / random`` through
the same vector env at 8 envs (issue 17 asks for >= 0.85)::

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/rollout_throughput.py        # one core
    OMP_NUM_THREADS=1 taskset -c 0,1 python benchmarks/rollout_throughput.py      # two cores (overlap)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from rlflow.envs import make_env, make_vector_env

from rlflow.policies.actor import ActorOutput
from rlflow.policies.loading import load_policy
from rlflow.rollout import SplitVectorEnv, collect_gym_rollout

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "recipes/robotics/artifacts/hopper_medium_flow"
OLD_COMMIT = "f5fb414"


class RandomActor:
    """Uniform random action chunks ``[B, 4, 3]`` in [-1, 1]: no network at all."""

    def explore(self, obs, *, generator=None):
        action = torch.rand(obs.shape[0], 4, 3, generator=generator) * 2 - 1
        return ActorOutput(action=action, record=action, log_prob=torch.zeros(obs.shape[0]))


class OldPath:
    """``FlowPolicy.explore`` as of commit f5fb414: one ``velocity()`` per step (its time embedding
    included) through ``nn.Module`` calls, the kernel scoring each step where it is drawn, and autograd
    metadata on every output (no inference mode). The noise network's one call per decision uses today's
    MLP (a ~2% part of the cost)."""

    def __init__(self, policy):
        self.policy = policy

    def velocity(self, x, t, obs):
        policy, net = self.policy, self.policy.velocity_net
        policy._check_inputs(x, obs)
        h = torch.cat([x.reshape(x.shape[0], -1), obs, policy.time_embedding(t.expand(x.shape[0]))], dim=-1)
        for layer, skip in zip(net.hidden, net.residual, strict=True):
            a = net.activation(layer(h))
            h = h + a if skip else a
        return net.output(h).reshape(x.shape)

    def explore(self, obs, *, generator=None):
        with torch.inference_mode(False):
            policy, batch = self.policy, obs.shape[0]
            times = policy.grid(device=obs.device)
            x = policy._initial_noise(batch, generator)
            stds = policy.kernel.chain_stds(obs, times, batch)
            chain, log_probs = [x], []
            for k in range(times.shape[0] - 1):
                t, t_next = times[k].expand(batch), times[k + 1].expand(batch)
                out = policy.kernel.step(
                    x, self.velocity(x, t, obs), t, t_next, obs, generator=generator, std=stds[k]
                )
                x = out.sample
                chain.append(x)
                log_probs.append(out.log_prob)
            return ActorOutput(
                action=x, record=torch.stack(chain, dim=1), log_prob=torch.stack(log_probs, dim=1).sum(dim=1)
            )


class NoInferenceMode:
    """Today's ``explore`` with inference mode switched off inside the rollout's."""

    def __init__(self, policy):
        self.policy = policy

    def explore(self, obs, *, generator=None):
        with torch.inference_mode(False):
            return self.policy.explore(obs, generator=generator)


class InferenceMode(NoInferenceMode):
    """Today's ``explore`` under inference mode (as ``collect_gym_rollout`` calls it)."""

    def explore(self, obs, *, generator=None):
        with torch.inference_mode():
            return self.policy.explore(obs, generator=generator)


def check_old_path_is_exact(policy) -> None:
    """The old path samples what today's does, bit for bit (so only the costs are compared)."""
    obs = torch.randn(8, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = OldPath(policy).explore(obs, generator=torch.Generator().manual_seed(1))
        new = policy.explore(obs, generator=torch.Generator().manual_seed(1))
    for name in ("action", "record", "log_prob"):
        if not torch.equal(getattr(old, name), getattr(new, name)):
            raise RuntimeError(f"the old sampling path no longer matches today's ({name} differs)")


@torch.no_grad()
def policy_cost(actors: dict, batch: int, calls: int = 200, repeats: int = 30) -> dict:
    """Milliseconds per ``explore`` call on ``batch`` observations, the actors interleaved."""
    obs = torch.randn(batch, 11, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name in actors}
    for _ in range(repeats):
        for name, actor in actors.items():
            start = time.perf_counter()
            for _ in range(calls):
                actor.explore(obs, generator=generator)
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: {"median": float(np.median(v)), "min": float(min(v))} for name, v in times.items()}


def vector_envs(num_envs: int, normalization) -> dict:
    sync = functools.partial(make_vector_env, "hopper", horizon=4, normalization=normalization)
    factory = functools.partial(make_env, "hopper", horizon=4, normalization=normalization)

    def async_env(n: int):
        return gym.vector.AsyncVectorEnv([factory] * n, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    return {
        "sync": sync(num_envs),
        "split_thread": SplitVectorEnv.build(sync, num_envs, groups=2),
        "async": async_env(num_envs),
        "split_async": SplitVectorEnv.build(async_env, num_envs, groups=2),
    }


def measure(num_envs: int, decisions: int, repeats: int) -> dict:
    policy, normalization = load_policy(POLICY)
    check_old_path_is_exact(policy)
    variants = {"flow_old": OldPath(policy), "flow_no_inference_mode": NoInferenceMode(policy)}
    cost = policy_cost({**variants, "flow": InferenceMode(policy)}, num_envs)
    cost_half = policy_cost({"flow": InferenceMode(policy)}, num_envs // 2)["flow"]
    envs = vector_envs(num_envs, normalization)
    runs = [(name, "sync", actor) for name, actor in variants.items()]
    runs += [
        (name, kind, actor) for kind in envs for name, actor in (("random", RandomActor()), ("flow", policy))
    ]
    rates: dict[str, list[float]] = {}
    for repeat in range(repeats):
        for actor_name, kind, actor in runs:
            start = time.perf_counter()
            batch = collect_gym_rollout(
                actor, envs[kind], decisions, seed=repeat, generator=torch.Generator().manual_seed(0)
            )
            rates.setdefault(f"{actor_name}@{kind}", []).append(
                batch.env_steps / (time.perf_counter() - start)
            )
    for vector_env in envs.values():
        vector_env.close()
    median = {name: float(np.median(values)) for name, values in rates.items()}
    flows = [name for name in median if not name.startswith("random@")]
    return {
        "num_envs": num_envs,
        "env_steps_per_measurement": decisions * num_envs * 4,
        "env_steps_per_second": median,
        # The ratio: the default rollout path against random actions through the same (sync) env.
        "rollout_throughput_ratio": median["flow@sync"] / median["random@sync"],
        "rollout_throughput_ratio_old_path": median["flow_old@sync"] / median["random@sync"],
        "ratio_vs_random_sync": {name: median[name] / median["random@sync"] for name in flows},
        "ratio_vs_random_same_env": {
            name: median[name] / median["random@" + name.split("@")[1]] for name in flows
        },
        "policy_ms_per_decision": {**cost, f"flow_batch_{num_envs // 2}": cost_half},
        "policy_speedup_vs_old": cost["flow_old"]["median"] / cost["flow"]["median"],
        "all_rates": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--env-steps", type=int, default=8000, help="Env steps per measurement.")
    parser.add_argument("--output", default="benchmarks/results/rollout_throughput.json")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="Intra-op threads of the policy's matrix products (2 on two free cores: the policy's share of a "
        "second core, where the simulator cannot use it).",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    cpus = sorted(os.sched_getaffinity(0))
    by_envs = {f"{n}_envs": measure(n, args.env_steps // (4 * n), args.repeats) for n in (8, 16)}
    results = {
        "benchmark": "rollout throughput: ReinFlow flow policy (K=4, chunk 4) vs random actions, Hopper-v5",
        "command": f"OMP_NUM_THREADS={args.torch_threads} taskset -c {','.join(map(str, cpus))} python "
        f"benchmarks/rollout_throughput.py --torch-threads {args.torch_threads} --repeats {args.repeats} "
        f"--output {args.output}",
        "cpus": len(cpus),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "old_path_commit": OLD_COMMIT,
        "rollout_throughput_ratio_8_envs": by_envs["8_envs"]["rollout_throughput_ratio"],
        "rollout_throughput_ratio_16_envs": by_envs["16_envs"]["rollout_throughput_ratio"],
        "by_envs": by_envs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    for name, row in by_envs.items():
        cost = row["policy_ms_per_decision"]
        print(
            f"{name} ({len(cpus)} cpu): flow/random {row['rollout_throughput_ratio']:.3f} "
            f"(old path {row['rollout_throughput_ratio_old_path']:.3f}); policy alone "
            f"{cost['flow_old']['median']:.2f} -> {cost['flow']['median']:.2f} ms per decision"
        )
        for lever, ratio in row["ratio_vs_random_sync"].items():
            same = row["ratio_vs_random_same_env"][lever]
            print(f"  {lever:32s} vs random@sync {ratio:.3f}   vs random through the same env {same:.3f}")


if __name__ == "__main__":
    main()
