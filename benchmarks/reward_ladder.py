"""The reward ladder: where on the way from a dense image statistic to spatial relations a method stops learning.

Rungs of rising difficulty on the latent shapes world, each a short run from the shipped base with one
method's recipe (``--methods``: Flow-GRPO, DiffusionNFT) on its own prompts and reward:

============  ===========================================  ===========================================
rung          training prompts / reward                    held-out metric
============  ===========================================  ===========================================
brightness    every category / mean luma (dense)           mean brightness of held-out samples
single        single objects / verifier                    held-out accuracy on single objects
counting      counts / verifier                            held-out accuracy on counting prompts
two_objects   two objects / verifier                       held-out accuracy on two-object prompts
position      relations / verifier                         held-out accuracy on position prompts
============  ===========================================  ===========================================

Per rung and method it reports the held-out metric before and after (with its standard error), and the
rollout diagnostics that say why a rung fails: the fraction of groups whose samples all scored the same
(``zero_std_group_fraction``: no group-relative signal), the mean within-group reward std (diversity of
samples within a group, in reward units) and the mean reward of the training samples. Gradient
signal-to-noise is measured separately by ``benchmarks/grpo_gradient_noise.py`` (same world, same recipe).

Run:  OMP_NUM_THREADS=1 python benchmarks/reward_ladder.py --samples 6000 --jobs 2
      -> benchmarks/results/reward_ladder.json   (summarised in docs/alignment.md, "The reward ladder")
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/alignment.py: recipes and sample counts
ROOT = Path(__file__).resolve().parents[1]
RUNGS: dict[str, tuple[str | None, dict]] = {
    "brightness": (None, {"brightness": 1.0}),
    "single": ("single", {"shapes_verifier": 1.0}),
    "counting": ("counting", {"shapes_verifier": 1.0}),
    "two_objects": ("two_objects", {"shapes_verifier": 1.0}),
    "position": ("position", {"shapes_verifier": 1.0}),
}
METHODS = {"flow_grpo": "grpo", "diffusion_nft": "nft"}


def run_rung(rung: str, method: str, output_dir: str, samples: int, seed: int, threads: int) -> dict:
    import torch
    from alignment import METHODS as RECIPES
    from alignment import samples_per_iteration

    from rlflow.cli import COMMANDS, _load
    from rlflow.config import config_from_dict, load_yaml
    from rlflow.utils.run import read_metrics
    from rlflow.worlds.shapes.prompts import ShapesPrompts

    torch.set_num_threads(threads)
    command, recipe = RECIPES[method]
    category, rewards = RUNGS[rung]
    data = load_yaml(ROOT / recipe)
    data.update(output_dir=output_dir, rewards=rewards, report_to="none", resume=False, seed=seed)
    config_class = _load(COMMANDS[command].config)
    probe = config_from_dict(config_class, data, source=recipe)
    per_iteration = samples_per_iteration(command, probe)
    iterations = max(2, -(-samples // per_iteration))
    data.update(iterations=iterations, eval_steps=iterations, save_steps=iterations)
    config = config_from_dict(config_class, data, source=recipe)
    prompts = ShapesPrompts(
        num_eval=config.num_eval_prompts, categories=None if category is None else (category,)
    )
    trainer_class = {"grpo": "rlflow.trainers.grpo:GRPOTrainer", "nft": "rlflow.trainers.nft:NFTTrainer"}
    start = time.perf_counter()
    _load(trainer_class[command])(config, prompts=prompts).train()
    wall = time.perf_counter() - start
    rows = read_metrics(Path(output_dir) / "metrics.jsonl")
    evals = [row for row in rows if "eval/reward_mean" in row]
    base, final = evals[0], evals[-1]
    key = "eval/reward_mean" if category is None else f"eval/accuracy/{category}"
    stderr_key = None if category is None else f"eval/accuracy_stderr/{category}"
    train_rows = [row for row in rows if "rollout/reward_mean" in row]

    def mean(name: str) -> float | None:
        values = [row[name] for row in train_rows if name in row]
        return sum(values) / len(values) if values else None

    first = train_rows[0] if train_rows else {}
    return {
        "metric": key.removeprefix("eval/"),
        "base": base[key],
        "base_stderr": base.get(stderr_key) if stderr_key else None,
        "final": final[key],
        "final_stderr": final.get(stderr_key) if stderr_key else None,
        "first_iteration": {
            "zero_std_group_fraction": first.get("rollout/zero_std_group_fraction"),
            "group_reward_std_mean": first.get("rollout/group_reward_std_mean"),
            "reward_mean": first.get("rollout/reward_mean"),
        },
        "mean_over_run": {
            "zero_std_group_fraction": mean("rollout/zero_std_group_fraction"),
            "group_reward_std_mean": mean("rollout/group_reward_std_mean"),
            "reward_mean": mean("rollout/reward_mean"),
        },
        "samples": iterations * per_iteration,
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=6000, help="training samples per rung and method")
    parser.add_argument("--rungs", nargs="+", default=list(RUNGS), choices=list(RUNGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/reward_ladder")
    parser.add_argument("--output", default="benchmarks/results/reward_ladder.json")
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "benchmark": "reward_ladder",
        "command": (
            f"OMP_NUM_THREADS={threads} python benchmarks/reward_ladder.py --samples {args.samples} "
            f"--jobs {args.jobs} --rungs {' '.join(args.rungs)} --methods {' '.join(args.methods)}"
        ),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads},
        "samples": args.samples,
        "rungs": {rung: {} for rung in args.rungs},
    }
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {
            pool.submit(
                run_rung,
                rung,
                method,
                str(Path(args.runs) / f"{rung}_{method}"),
                args.samples,
                args.seed,
                threads,
            ): (rung, method)
            for rung in args.rungs
            for method in args.methods
        }
        for future in concurrent.futures.as_completed(futures):
            rung, method = futures[future]
            results["rungs"][rung][method] = future.result()
            output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
