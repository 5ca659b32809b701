"""Re-scoring a stored chain: one batched velocity call (score_chain) vs a Python loop over steps.

Both compute the same [B, K] log-probs (asserted) with forward + backward, as a PPO/GRPO update does.
Run:  OMP_NUM_THREADS=2 python benchmarks/rescoring.py   -> benchmarks/results/rescoring.json
Timings alternate between the two methods in one process, and we report the ratio (the machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rlflow.flows import EulerStep, gaussian_log_prob, score_chain
from rlflow.policies import FlowPolicy, FlowPolicyConfig


def loop_over_steps(policy: FlowPolicy, traj) -> torch.Tensor:
    """The straightforward alternative: one velocity call per denoising step."""
    columns = []
    batch = traj.chain.shape[0]
    for k in range(traj.num_steps):
        x, x_next = traj.chain[:, k], traj.chain[:, k + 1]
        t, t_next = traj.times[k].expand(batch), traj.times[k + 1].expand(batch)
        velocity = policy.velocity(x, t, traj.cond)
        kernel = policy.kernel if traj.stochastic_steps[k] else EulerStep()
        mean, std = kernel.mean_and_std(x, velocity, t, t_next, traj.cond)
        columns.append(gaussian_log_prob(x_next, mean, std))
    return torch.stack(columns, dim=1)


def time_it(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default="benchmarks/results/rescoring.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    # ReinFlow's Hopper-sized policy (obs 11, chunk 4 x 3, hidden 3 x 512), then smaller, overhead-bound cases.
    cases = [
        ([512, 512, 512], 1024, 4),
        ([512, 512, 512], 1024, 10),
        ([256, 256], 4096, 4),
        ([256, 256], 64, 10),
        ([64, 64], 16, 10),
    ]
    for hidden, batch, steps in cases:
        policy = FlowPolicy(
            FlowPolicyConfig(obs_dim=11, act_dim=3, horizon=4, hidden_dims=hidden, kernel="reinflow")
        )
        obs = torch.randn(batch, 11)
        traj = policy.sample(obs, num_steps=steps)

        def batched(policy=policy, traj=traj):
            policy.zero_grad()
            score_chain(policy, policy.kernel, traj).log_probs.sum().backward()

        def looped(policy=policy, traj=traj):
            policy.zero_grad()
            loop_over_steps(policy, traj).sum().backward()

        torch.testing.assert_close(
            score_chain(policy, policy.kernel, traj).log_probs,
            loop_over_steps(policy, traj),
            atol=1e-5,
            rtol=0,
        )
        batched(), looped()  # warm-up
        t_batched, t_looped = [], []
        for _ in range(args.repeats):  # interleave so drift in machine load hits both equally
            t_batched += time_it(batched, 1)
            t_looped += time_it(looped, 1)
        row = {
            "hidden_dims": hidden,
            "batch": batch,
            "num_steps": steps,
            "batched_ms_median": 1e3 * statistics.median(t_batched),
            "looped_ms_median": 1e3 * statistics.median(t_looped),
        }
        row["speedup_batched_over_looped"] = row["looped_ms_median"] / row["batched_ms_median"]
        results.append(row)
        print(json.dumps(row))
    payload = {
        "benchmark": "rescoring",
        "command": "OMP_NUM_THREADS=2 python benchmarks/rescoring.py",
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
