"""Manipulation benchmark (Meta-World v3, sparse success reward): fine-tuning from demonstrations vs PPO from scratch.

Per task, every method starts from the same noisy scripted demonstrations (recipes/manipulation/<task>_collect.yaml)
and gets the same env-step budget: the ReinFlow recipe's iterations x 8 envs x 100 chunks x 4 env steps (60 iterations:
192k env steps):

  - base:                the shipped BC flow policy (recipes/manipulation/artifacts/<task>_bc_flow);
  - reinflow:            ReinFlow fine-tuning of that base (recipes/manipulation/<task>_reinflow.yaml);
  - gaussian_ppo_from_bc: a Gaussian policy behaviour-cloned on the same demonstrations (chunks of 4, the same
                         3 x 256 widths), then PPO with the standard Gaussian settings (clip 0.2 on the summed
                         log-ratio) and otherwise the ReinFlow recipe's;
  - ppo_scratch:         Stable-Baselines3 PPO('MlpPolicy') with its defaults from scratch on the sparse task, and
                         beside it (ppo_scratch_shaped) on Meta-World's shaped reward.

Success rates are measured on the same 50 held-out episodes for every method (fresh object/goal placements; the
env resets of rlflow's evaluations, `rlflow.trainers.ppo.evaluation_seeds(0)`), deterministic actions, with 95%
Wilson intervals. The throughput ratio is read from benchmarks/results/rollout_throughput.json (its own benchmark).

Run:  OMP_NUM_THREADS=1 python benchmarks/manipulation.py --jobs 2
      -> benchmarks/results/manipulation.json   (summarised in docs/robotics.md and docs/benchmarks.md)
Each (task, method) job is a subprocess with one torch thread; --jobs sets how many run at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

TASKS = ("button_press", "drawer_open", "pick_place", "peg_insert_side")
METHODS = ("reinflow", "gaussian_ppo_from_bc", "ppo_scratch", "ppo_scratch_shaped")
EVAL_EPISODES = 50


def _success(successes: list[float]) -> dict:
    """Success rate of 0/1 episode outcomes with its 95% Wilson interval."""
    from rlflow.utils.stats import wilson_interval

    k, n = int(round(sum(successes))), len(successes)
    low, high = wilson_interval(k, n)
    return {"success": k / n, "ci95": [low, high], "episodes": n}


def _curve(run_dir: Path) -> list[list[float]]:
    """``[[env_steps, deterministic success], ...]`` from a run's evaluations (sparse reward: return = success)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [[r.get("rollout/env_steps", 0), r["eval/return_mean"]] for r in rows if "eval/return_mean" in r]


def run_rlflow(task: str, method: str, workdir: Path, iterations: int) -> dict:
    from robotics import behaviour_clone_gaussian

    from rlflow.config import config_from_dict, load_yaml
    from rlflow.trainers.ppo import PPOConfig, PPOTrainer

    data = load_yaml(ROOT / f"recipes/manipulation/{task}_reinflow.yaml")
    output_dir = workdir / f"{task}_{method}"
    data.update(output_dir=str(output_dir), iterations=iterations, report_to="none", video=False)
    data["pretrained"] = str(ROOT / data["pretrained"])
    if method == "gaussian_ppo_from_bc":
        demos = workdir / f"{task}_demos.npz"
        if not demos.exists():
            from rlflow.config import config_from_dict as build
            from rlflow.data.collect import CollectConfig, collect

            recipe = load_yaml(ROOT / f"recipes/manipulation/{task}_collect.yaml")
            recipe["output"] = str(demos)
            collect(build(CollectConfig, recipe))
        base = behaviour_clone_gaussian(
            workdir / f"{task}_gaussian_bc", demonstrations=demos, horizon=4, hidden_dims=(256, 256, 256)
        )
        data.update(policy_type="gaussian", pretrained=str(base), clip_range=0.2, logprob_reduction="sum")
    start = time.perf_counter()
    summary = PPOTrainer(config_from_dict(PPOConfig, data)).train()
    wall = time.perf_counter() - start
    curve = _curve(output_dir)
    episodes, final = int(data["eval_episodes"]), float(summary["final_return_mean"])
    return {
        # Sparse reward: an episode's return is its success (0 or 1), so the mean return is the success rate.
        "base": _success(
            [1.0] * round(curve[0][1] * episodes) + [0.0] * (episodes - round(curve[0][1] * episodes))
        ),
        "final": _success([1.0] * round(final * episodes) + [0.0] * (episodes - round(final * episodes))),
        "env_steps": summary["env_steps"],
        "wall_seconds": wall,
        "curve": curve,
        "first_env_steps_at_0.9": next((steps for steps, success in curve if success >= 0.9), None),
    }


def run_sb3(task: str, shaped: bool, env_steps: int, seed: int = 0) -> dict:
    """SB3 PPO('MlpPolicy') with its defaults, trained from scratch for ``env_steps`` env steps."""
    import gymnasium as gym
    from rlflow.envs import resolve_task
    from stable_baselines3 import PPO

    from rlflow.trainers.ppo import evaluation_seeds

    gym_id = resolve_task(f"{task}_dense" if shaped else task)
    start = time.perf_counter()
    model = PPO("MlpPolicy", gym.make(gym_id), seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=env_steps)
    wall = time.perf_counter() - start
    env = gym.make(resolve_task(task))  # success is judged on the sparse task (same success flag)
    first_seed, _ = evaluation_seeds(0)
    successes = []
    for episode in range(EVAL_EPISODES):
        obs, _ = env.reset(seed=first_seed + episode)
        done, info = False, {}
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        successes.append(float(info["is_success"]))
    env.close()
    return {
        "final": _success(successes),
        "env_steps": int(model.num_timesteps),
        "wall_seconds": wall,
        "settings": f"stable_baselines3.PPO('MlpPolicy', '{gym_id}') defaults",
    }


def _recipe_iterations(task: str) -> int:
    from rlflow.config import load_yaml

    return int(load_yaml(ROOT / f"recipes/manipulation/{task}_reinflow.yaml")["iterations"])


def run_job(task: str, method: str, workdir: Path, iterations: int, env_steps: int) -> dict:
    torch.set_num_threads(1)
    if method in ("reinflow", "gaussian_ppo_from_bc"):
        return run_rlflow(task, method, workdir, iterations)
    return run_sb3(task, shaped=method == "ppo_scratch_shaped", env_steps=env_steps)


def plot(results: dict, path: Path) -> None:
    """Success against env steps per task: the two fine-tuning curves, SB3's final points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        entry = results["tasks"][task]
        for method, colour in (("reinflow", "C0"), ("gaussian_ppo_from_bc", "C1")):
            if method in entry:
                steps, success = zip(*entry[method]["curve"], strict=True)
                ax.plot(np.array(steps) / 1e3, success, color=colour, label=method.replace("_", " "))
        for method, marker in (("ppo_scratch", "x"), ("ppo_scratch_shaped", "+")):
            if method in entry:
                job = entry[method]
                ax.scatter([job["env_steps"] / 1e3], [job["final"]["success"]], marker=marker, s=60, color="k",
                           label=f"SB3 PPO from scratch ({'shaped' if 'shaped' in method else 'sparse'})")  # fmt: skip
        ax.set_title(task)
        ax.set_xlabel("env steps (thousands)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("success, 50 held-out episodes")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_images(path: Path) -> None:
    """The four tasks' first frames (seed 0), side by side, as the recipes' videos show them."""
    from PIL import Image
    from rlflow.envs import make_raw_env

    frames = []
    for task in TASKS:
        env = make_raw_env(task, render_mode="rgb_array")
        env.reset(seed=0)
        frames.append(env.render())
        env.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(frames, axis=1)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="ReinFlow / Gaussian PPO iterations (default: each recipe's).",
    )
    parser.add_argument("--jobs", type=int, default=2, help="Jobs (one thread each) at a time.")
    parser.add_argument("--workdir", default="runs/benchmark_manipulation")
    parser.add_argument("--output", default="benchmarks/results/manipulation.json")
    parser.add_argument("--job", nargs=2, metavar=("TASK", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", action="store_true", help="Redraw the PNG from an existing results file.")
    parser.add_argument(
        "--task-images", action="store_true", help="Write docs/images/manipulation_tasks.png (first frames) and stop."
    )
    args = parser.parse_args()
    if args.task_images:
        task_images(ROOT / "docs/images/manipulation_tasks.png")
        return
    if args.plot_only:
        output = Path(args.output)
        plot(json.loads(output.read_text()), output.with_suffix(".png"))
        return
    workdir = Path(args.workdir)
    if args.job:
        task, method = args.job
        iterations = args.iterations or _recipe_iterations(task)
        env_steps = iterations * 8 * 100 * 4  # the recipe's budget: 8 envs x 100 chunks x 4 env steps
        result = run_job(task, method, workdir, iterations, env_steps)
        (workdir / f"{task}_{method}.json").write_text(json.dumps(result, indent=2) + "\n")
        return

    workdir.mkdir(parents=True, exist_ok=True)
    jobs = [(task, method) for task in args.tasks for method in args.methods]
    running: list[tuple[subprocess.Popen, str, str, float]] = []
    environment = dict(os.environ, OMP_NUM_THREADS="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    started = time.perf_counter()
    while jobs or running:
        while jobs and len(running) < args.jobs:
            task, method = jobs.pop(0)
            command = [sys.executable, __file__, "--job", task, method, "--workdir", str(workdir)]
            command += [] if args.iterations is None else ["--iterations", str(args.iterations)]
            log = open(workdir / f"{task}_{method}.log", "w")  # noqa: SIM115 (closed with the process)
            running.append((subprocess.Popen(command, env=environment, stdout=log, stderr=log), task, method,
                            time.perf_counter()))  # fmt: skip
        time.sleep(2)
        for entry in list(running):
            process, task, method, since = entry
            if process.poll() is not None:
                running.remove(entry)
                state = "ok" if process.returncode == 0 else f"FAILED ({process.returncode}, see its .log)"
                print(f"[{time.perf_counter() - started:7.0f} s] {task} {method}: {state} "
                      f"in {time.perf_counter() - since:.0f} s", flush=True)  # fmt: skip

    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}
    results.update(
        benchmark="manipulation",
        command="OMP_NUM_THREADS=1 python benchmarks/manipulation.py " + " ".join(sys.argv[1:]),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per job, "
        f"{args.jobs} jobs at a time",
        eval_episodes=EVAL_EPISODES,
    )
    tasks = results.setdefault("tasks", {})
    for task in args.tasks:
        entry = tasks.setdefault(task, {})
        for method in args.methods:
            path = workdir / f"{task}_{method}.json"
            if not path.exists():
                continue
            job = json.loads(path.read_text())
            entry[method] = job
            entry[f"{method}_success"] = job["final"]["success"]
            if method == "reinflow":
                entry["base_success"] = job["base"]["success"]
                entry["env_steps"] = job["env_steps"]
                entry["wall_seconds"] = job["wall_seconds"]
                entry["episodes"] = job["final"]["episodes"]
    throughput = ROOT / "benchmarks/results/rollout_throughput.json"
    if throughput.exists():
        results["rollout_throughput_ratio_8_envs"] = json.loads(throughput.read_text()).get(
            "rollout_throughput_ratio_8_envs"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
