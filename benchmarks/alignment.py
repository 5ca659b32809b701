"""Alignment benchmark: Flow-GRPO, Flow-GRPO-Fast and TempFlow-GRPO on the shapes world at equal NFEs.

Side by side in one run (same machine, same base model, same evaluation prompts and noise): each variant
starts from the shipped base model (recipes/alignment/artifacts/shapes_base) with its recipe
(recipes/alignment/shapes_grpo.yaml, shapes_grpo_fast.yaml, shapes_tempflow.yaml) and stops once it has
spent the same budget of velocity evaluations (sampling + training forward passes, `nfe_budget`). The
verifier accuracy (GenEval-style: every object, count and relation right) is measured on the fixed
evaluation prompts with deterministic ODE sampling.

Run:  OMP_NUM_THREADS=2 python benchmarks/alignment.py --nfe-budget 600000
      -> benchmarks/results/shapes_grpo.json   (summarised in docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from rlflow.config import config_from_dict, load_yaml
from rlflow.trainers.grpo import GRPOConfig, GRPOTrainer
from rlflow.utils.run import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "flow_grpo": "recipes/alignment/shapes_grpo.yaml",
    "fast": "recipes/alignment/shapes_grpo_fast.yaml",
    "tempflow": "recipes/alignment/shapes_tempflow.yaml",
}


def run_variant(name: str, output_dir: Path, nfe_budget: int, eval_every: int, seed: int) -> dict:
    data = load_yaml(ROOT / RECIPES[name])
    data.update(
        output_dir=str(output_dir),
        nfe_budget=nfe_budget,
        iterations=10**6,  # the NFE budget ends the run
        eval_every=eval_every,
        checkpoint_every=10**6,
        tensorboard=False,
        resume=False,
        seed=seed,
    )
    config = config_from_dict(GRPOConfig, data, source=RECIPES[name])
    start = time.perf_counter()
    summary = GRPOTrainer(config).train()
    wall = time.perf_counter() - start
    rows = read_metrics(output_dir / "metrics.jsonl")
    curve = [
        {"nfe": row.get("rollout/nfe_total", 0), "iteration": row["step"], "accuracy": row["eval/accuracy"]}
        for row in rows
        if "eval/accuracy" in row
    ]
    return {
        "recipe": RECIPES[name],
        "base_accuracy": summary["base_accuracy"],
        "base_reward_mean": summary["base_reward_mean"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": max(point["accuracy"] for point in curve),
        "final_reward_mean": summary["final_reward_mean"],
        "final_per_category": {
            key.removeprefix("eval/accuracy/"): value
            for key, value in summary["final"].items()
            if key.startswith("eval/accuracy/")
        },
        "nfe": summary["nfe"],
        "iterations": summary["iterations"],
        "wall_seconds": wall,
        "accuracy_curve": curve,
    }


def nfe_to_reach(curve: list[dict], level: float) -> int | None:
    """The NFEs spent when the evaluated accuracy first reached ``level`` (None: never)."""
    return next((point["nfe"] for point in curve if point["accuracy"] >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nfe-budget", type=int, default=600_000, help="velocity evaluations per variant")
    parser.add_argument("--eval-every", type=int, default=5, help="iterations between evaluations")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.9, help="accuracy level for nfe_to_threshold")
    parser.add_argument("--runs", default="runs/benchmark_alignment")
    parser.add_argument("--output", default="benchmarks/results/shapes_grpo.json")
    args = parser.parse_args()

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    results: dict = {
        "benchmark": "shapes_grpo",
        "command": f"OMP_NUM_THREADS={threads} python benchmarks/alignment.py --nfe-budget {args.nfe_budget}",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads},
        "nfe_budget": args.nfe_budget,
        "threshold": args.threshold,
        "methods": {},
    }
    for name in args.methods:
        result = run_variant(name, Path(args.runs) / name, args.nfe_budget, args.eval_every, args.seed)
        result["nfe_to_threshold"] = nfe_to_reach(result["accuracy_curve"], args.threshold)
        results["methods"][name] = result
        results["base_accuracy"] = result["base_accuracy"]
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a kill
    # The highest level every method reached, and what each paid to reach it first (TempFlow's claim).
    common = min(m["best_accuracy"] for m in results["methods"].values())
    results["common_level"] = common
    for result in results["methods"].values():
        result["nfe_to_common_level"] = nfe_to_reach(result["accuracy_curve"], common)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
