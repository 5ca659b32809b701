"""Robotics benchmark: ReinFlow vs Gaussian PPO fine-tuning at equal env steps, plus rollout throughput.

Side by side in one run (same machine state, same seeds):
  - ReinFlow (K=4, chunk 4) fine-tuning the shipped Hopper base flow policy;
  - Gaussian PPO fine-tuning a Gaussian policy behaviour-cloned on the same shipped demonstrations;
  - Stable-Baselines3 PPO from scratch, if stable_baselines3 is installed (optional peer);
  - rollout throughput: env steps/s of the engine with the K=4 flow policy vs the same vector env driven
    by random actions (the simulator's limit), as a ratio.

Every method runs for ``--seeds`` seeds (0, 1, ...): one seed of RL on Hopper says little (SB3's PPO from scratch
ended at 888, 1740 and, on another MuJoCo version, 3210 at 320k env steps), so the results give each method's
mean final return over seeds with its standard error, and every seed's run. ``--jobs`` runs that many at a
time (one torch thread each), after the throughput measurement, which runs alone.

Run:  OMP_NUM_THREADS=1 python benchmarks/robotics.py --env-steps 320000 --seeds 3 --jobs 2
      -> benchmarks/results/robotics_hopper.json   (summarised in docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from rlflow.envs import make_vector_env

from rlflow.config import config_from_dict, load_yaml
from rlflow.data.demonstrations import bc_data_from_demonstrations
from rlflow.policies.gaussian import GaussianPolicy, GaussianPolicyConfig
from rlflow.policies.loading import load_policy
from rlflow.rollout import collect_gym_rollout
from rlflow.trainers.ppo import PPOConfig, PPOTrainer

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "recipes/robotics/artifacts"


def behaviour_clone_gaussian(
    output: Path,
    *,
    demonstrations: Path = ARTIFACTS / "hopper_medium.npz",
    horizon: int = 1,
    hidden_dims: tuple[int, ...] = (256, 256),
    steps: int = 3000,
    seed: int = 0,
) -> Path:
    """Gaussian BC baseline: fit the mean to the normalised demonstration actions (MSE = Gaussian MLE
    with a fixed std), then save it with the data's normalisation, like the flow policy's pretraining."""
    data, normalization = bc_data_from_demonstrations(demonstrations, horizon=horizon)
    torch.manual_seed(seed)
    config = GaussianPolicyConfig(
        obs_dim=data.obs_dim, act_dim=data.event_shape[1], horizon=horizon, hidden_dims=list(hidden_dims)
    )
    policy = GaussianPolicy(config)
    optimizer = torch.optim.Adam(policy.mean_net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(data), (256,), generator=generator)
        loss = (policy.mean(data.conditions[index]) - data.targets[index]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.save_pretrained(output, extra_json={"normalization": normalization.to_dict()})
    return output


def fine_tune(recipe: str, output_dir: Path, iterations: int, **overrides) -> dict:
    data = load_yaml(ROOT / recipe)
    data.update(output_dir=str(output_dir), iterations=iterations, report_to="none", video=False, **overrides)
    config = config_from_dict(PPOConfig, data, source=recipe)
    start = time.perf_counter()
    summary = PPOTrainer(config).train()
    return {
        "base_return_mean": summary["base_return_mean"],
        "final_return_mean": summary["final_return_mean"],
        "final_return_std": summary["final_return_std"],
        "env_steps": summary["env_steps"],
        "wall_seconds": time.perf_counter() - start,
        "recipe": recipe,
        "overrides": overrides,
    }


def sb3_from_scratch(env_steps: int, *, seed: int = 0, eval_episodes: int = 10) -> dict:
    """Stable-Baselines3 PPO with its defaults (one env, 2048-step rollouts, no observation normalisation)
    from scratch on Hopper-v5: a widely used peer; evaluated with deterministic actions like ours."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    def evaluate(model: PPO) -> tuple[float, float]:
        env = gym.make("Hopper-v5")
        returns = []
        for episode in range(eval_episodes):
            obs, _ = env.reset(seed=10_000 + episode)
            done, total = False, 0.0
            while not done:
                action, _ = model.predict(obs, deterministic=True)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
        env.close()
        return float(np.mean(returns)), float(np.std(returns))

    start = time.perf_counter()
    model = PPO("MlpPolicy", "Hopper-v5", seed=seed, device="cpu", verbose=0)
    base_mean, _ = evaluate(model)
    model.learn(total_timesteps=env_steps)
    final_mean, final_std = evaluate(model)
    return {
        "base_return_mean": base_mean,
        "final_return_mean": final_mean,
        "final_return_std": final_std,
        "env_steps": int(model.num_timesteps),
        "wall_seconds": time.perf_counter() - start,
        "settings": "stable_baselines3.PPO('MlpPolicy', 'Hopper-v5') defaults",
    }


def throughput(num_envs: int = 8, decisions: int = 250, repeats: int = 3) -> dict:
    # decisions x num_envs x 4 env steps per measurement (2000 x 4 = 8000 by default from main()).
    """Env steps/s with the K=4 flow policy (chunks of 4) vs random chunks through the same vector env."""
    policy, normalization = load_policy(ARTIFACTS / "hopper_medium_flow")
    envs = make_vector_env("hopper", num_envs, horizon=4, normalization=normalization)

    class RandomActor:
        def explore(self, obs, *, generator=None):
            from rlflow.policies.actor import ActorOutput

            action = torch.rand(obs.shape[0], 4, 3, generator=generator) * 2 - 1
            return ActorOutput(action=action, record=action, log_prob=torch.zeros(obs.shape[0]))

    rates: dict[str, list[float]] = {"flow": [], "random": []}
    for repeat in range(repeats):  # interleaved, so machine-load drift hits both alike
        for name, actor in (("flow", policy), ("random", RandomActor())):
            start = time.perf_counter()
            batch = collect_gym_rollout(
                actor, envs, decisions, seed=repeat, generator=torch.Generator().manual_seed(0)
            )
            rates[name].append(batch.env_steps / (time.perf_counter() - start))
    flow, random = float(np.median(rates["flow"])), float(np.median(rates["random"]))
    return {
        "flow_env_steps_per_second": flow,
        "random_env_steps_per_second": random,
        "rollout_throughput_ratio": flow / random,
        "num_envs": num_envs,
    }


def measure_throughput(results: dict) -> None:
    """At the recipe's 8 envs, and at 16, where the policy's per-call overhead is spread over more envs."""
    results["throughput"] = {f"{n}_envs": throughput(num_envs=n, decisions=2000 // n) for n in (8, 16)}
    results["rollout_throughput_ratio"] = results["throughput"]["8_envs"]["rollout_throughput_ratio"]
    results["rollout_throughput_ratio_16_envs"] = results["throughput"]["16_envs"]["rollout_throughput_ratio"]


STEPS_PER_ITERATION = 8 * 250 * 4  # both recipes: 8 envs x 250 decisions x chunk 4 (Gaussian: 8 x 1000 x 1)


def run_method(method: str, seed: int, env_steps: int, workdir: str) -> dict:
    """One method for one seed (in a worker process, one torch thread)."""
    torch.set_num_threads(1)
    iterations = max(1, env_steps // STEPS_PER_ITERATION)
    workdir_path = Path(workdir)
    if method == "reinflow":
        result = fine_tune(
            "recipes/robotics/hopper_reinflow.yaml",
            workdir_path / f"reinflow_seed{seed}",
            iterations,
            seed=seed,
        )
    elif method == "gaussian_ppo":
        base = behaviour_clone_gaussian(workdir_path / f"gaussian_bc_seed{seed}", seed=seed)
        result = fine_tune(
            "recipes/robotics/hopper_gaussian_ppo.yaml",
            workdir_path / f"gaussian_ppo_seed{seed}",
            iterations,
            pretrained=str(base),
            actor_lr=1e-4,
            lr_scheduler_type="constant",
            critic_warmup_iterations=3,
            seed=seed,
        )
    else:
        result = sb3_from_scratch(iterations * STEPS_PER_ITERATION, seed=seed)
    return {"seed": seed, **result}


def over_seeds(runs: list[dict]) -> dict:
    """A method's runs summarised: mean final / base return over seeds, the s.e. of the final mean."""
    finals = np.array([run["final_return_mean"] for run in runs])
    stderr = float(finals.std(ddof=1) / np.sqrt(len(finals))) if len(finals) > 1 else None
    return {
        "base_return_mean": float(np.mean([run["base_return_mean"] for run in runs])),
        "final_return_mean": float(finals.mean()),
        "final_return_stderr_over_seeds": stderr,
        "final_return_per_seed": finals.tolist(),
        "env_steps": int(np.mean([run["env_steps"] for run in runs])),
        "wall_seconds": float(np.mean([run["wall_seconds"] for run in runs])),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env-steps", type=int, default=320_000, help="Fine-tuning budget per method.")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per method (0, 1, ...).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time (one torch thread each).")
    parser.add_argument("--workdir", default="runs/benchmark_robotics")
    parser.add_argument("--output", default="benchmarks/results/robotics_hopper.json")
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="Re-measure only the rollout throughput and update it in an existing results file.",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.throughput_only:
        results = json.loads(Path(args.output).read_text())
        measure_throughput(results)
        results["throughput_command"] = "OMP_NUM_THREADS=1 python benchmarks/robotics.py --throughput-only"
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        return
    results: dict = {
        "benchmark": "robotics_hopper",
        "command": f"OMP_NUM_THREADS=1 python benchmarks/robotics.py --env-steps {args.env_steps} "
        f"--seeds {args.seeds} --jobs {args.jobs}",
        "seeds": list(range(args.seeds)),
    }
    measure_throughput(results)  # alone, before the training runs share the cores
    methods = ["reinflow", "gaussian_ppo"]
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        results["sb3_ppo"] = "not installed (pip install stable-baselines3 to add this peer)"
    else:
        methods.append("sb3_ppo")
    jobs = [(method, seed) for seed in range(args.seeds) for method in methods]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {job: pool.submit(run_method, job[0], job[1], args.env_steps, args.workdir) for job in jobs}
        for method in methods:
            results[method] = over_seeds([futures[(method, seed)].result() for seed in range(args.seeds)])
    for key in ("base_return_mean", "final_return_mean", "env_steps", "wall_seconds"):
        results[key] = results["reinflow"][key]
    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per run, "
        f"{args.jobs} runs at a time"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
