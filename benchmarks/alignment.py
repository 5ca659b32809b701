"""Alignment benchmark: the online generative trainers side by side on the latent shapes world.

Every method starts from the same base model with its shipped recipe and the verifier reward, trains on the
same number of *samples* (images drawn for training, whatever each method does with them), and is scored on
the same held-out evaluation prompts (``--prompts shapes``: prompts with a colour-shape pair training never
draws; ``--prompts shapes_prompt_split``: a held-out quarter of the prompts; ``rlflow.worlds.shapes.
heldout_eval_prompts``) with the same ODE noise. Accuracy is GenEval's (every object,
count and relation right), the mean over the four prompt categories, with its standard error.

Methods and recipes (``recipes/alignment/``):

==================  ============================  =======================================
flow_grpo           shapes_grpo.yaml              Flow-GRPO (SDE chains, exact log-probs)
flow_grpo_fast      shapes_grpo_fast.yaml         Flow-GRPO-Fast (SDE window)
tempflow_grpo       shapes_tempflow.yaml          TempFlow-GRPO (branching, noise-aware)
diffusion_nft       shapes_nft.yaml               DiffusionNFT (forward process)
flow_rwr            shapes_rwr.yaml               Flow-RWR (reward-weighted regression)
actor_critic        shapes_actor_critic.yaml      actor-critic weighted flow matching
==================  ============================  =======================================

Methods run ``--jobs`` at a time, each in its own process with ``OMP_NUM_THREADS`` threads (wall times of
methods that ran together are comparable; say which ran together when you quote them).

Run:  OMP_NUM_THREADS=1 python benchmarks/alignment.py --samples 40000 --jobs 2 --methods flow_grpo diffusion_nft
      -> benchmarks/results/shapes_alignment.json + shapes_alignment.png  (summarised in docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS: dict[str, tuple[str, str]] = {
    "flow_grpo": ("grpo", "recipes/alignment/shapes_grpo.yaml"),
    "flow_grpo_fast": ("grpo", "recipes/alignment/shapes_grpo_fast.yaml"),
    "tempflow_grpo": ("grpo", "recipes/alignment/shapes_tempflow.yaml"),
    "diffusion_nft": ("nft", "recipes/alignment/shapes_nft.yaml"),
    "flow_rwr": ("rwr", "recipes/alignment/shapes_rwr.yaml"),
    "actor_critic": ("actor-critic", "recipes/alignment/shapes_actor_critic.yaml"),
}


def samples_per_iteration(command: str, config: Any) -> int:
    """Training images one iteration draws (TempFlow-GRPO: a group per branch point per prompt)."""
    if command == "grpo":
        branches = len(config.resolved_branch_steps()) if config.variant == "tempflow" else 1
        return config.prompts_per_iteration * config.group_size * branches
    return config.prompts_per_iteration * config.samples_per_prompt


def parse_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.KEY=VALUE`` (VALUE read as YAML) -> {method: {key: value}}; a method not run is an error."""
    import yaml

    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. flow_rwr.learning_rate=1e-4")
        if method not in methods:
            raise SystemExit(f"--set {item!r}: method {method!r} is not run; choose from {', '.join(methods)}")
        overrides.setdefault(method, {})[key] = yaml.safe_load(value)
    return overrides


def run_method(
    name: str,
    output_dir: str,
    samples: int,
    evaluations: int,
    seed: int,
    threads: int,
    prompts: str,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Train one method for ``samples`` training samples; its curve, final numbers and wall time.
    ``overrides``: recipe fields changed for this run (recorded in the result)."""
    import torch

    from rlflow.cli import COMMANDS, _load
    from rlflow.config import config_from_dict, load_yaml
    from rlflow.utils.run import read_metrics

    torch.set_num_threads(threads)
    command, recipe = METHODS[name]
    config_class = _load(COMMANDS[command].config)
    data = load_yaml(ROOT / recipe)
    data.update(overrides or {})
    probe = config_from_dict(config_class, data, source=recipe)
    per_iteration = samples_per_iteration(command, probe)
    iterations = max(1, -(-samples // per_iteration))
    eval_steps = max(1, iterations // evaluations)
    data.update(
        output_dir=output_dir,
        iterations=iterations,
        eval_steps=eval_steps,
        save_steps=eval_steps,
        report_to="none",
        resume=False,
        seed=seed,
        num_threads=threads,
        prompts=prompts,
    )
    config = config_from_dict(config_class, data, source=recipe)
    start = time.perf_counter()
    summary = _load(COMMANDS[command].entry)(config)
    wall = time.perf_counter() - start
    rows = read_metrics(Path(output_dir) / "metrics.jsonl")
    # Training wall time up to each evaluation (sampling + updates; the evaluations themselves excluded).
    elapsed, training_seconds = 0.0, {}
    for row in rows:
        elapsed += row.get("time/iteration_seconds", 0.0)
        training_seconds[row["step"]] = elapsed
    curve = [
        {
            "iteration": row["step"],
            "samples": row["step"] * per_iteration,
            "training_seconds": training_seconds[row["step"]],
            "accuracy": row["eval/accuracy"],
            "accuracy_stderr": row.get("eval/accuracy_stderr"),
        }
        for row in rows
        if "eval/accuracy" in row
    ]
    final = summary["final"]
    return {
        "recipe": recipe,
        "recipe_overrides": overrides or {},
        "command": command,
        "base_accuracy": summary.get("base_accuracy"),
        "final_accuracy": final["eval/accuracy"],
        "final_accuracy_stderr": final.get("eval/accuracy_stderr"),
        "final_per_category": {
            key.removeprefix("eval/accuracy/"): value
            for key, value in final.items()
            if key.startswith("eval/accuracy/")
        },
        "best_accuracy": max(point["accuracy"] for point in curve),
        "final_reward_mean": final.get("eval/reward_mean"),
        "samples": iterations * per_iteration,
        "samples_per_iteration": per_iteration,
        "iterations": iterations,
        "wall_seconds": wall,
        "accuracy_curve": curve,
    }


def samples_to_reach(curve: list[dict], level: float) -> int | None:
    """Training samples spent when the evaluated accuracy first reached ``level`` after training started
    (None: never; the base model's own point at 0 samples does not count)."""
    return next((p["samples"] for p in curve if p["samples"] > 0 and p["accuracy"] >= level), None)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in results["methods"].items():
        curve = result["accuracy_curve"]
        xs = [p["samples"] for p in curve]
        ys = [p["accuracy"] for p in curve]
        errs = [p["accuracy_stderr"] or 0.0 for p in curve]
        ax.errorbar(
            xs, ys, yerr=errs, marker="o", capsize=2, label=f"{name} ({result['wall_seconds'] / 60:.0f} min)"
        )
    ax.set_xlabel("training samples")
    ax.set_ylabel("held-out verifier accuracy (GenEval mean over categories)")
    split = results["eval"].get("split", "pairs")
    ax.set_title(
        f"{results['world']}\n{results['eval']['prompts']} held-out prompts ({split} split)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=40_000, help="training samples per method")
    parser.add_argument("--evaluations", type=int, default=6, help="evaluations along each run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="methods trained at the same time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompts",
        default="shapes",
        choices=["shapes", "shapes_prompt_split"],
        help="held-out split: shapes (colour-shape pairs training never draws) or shapes_prompt_split "
        "(a held-out quarter of the prompts)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="change a recipe field for one method, e.g. flow_rwr.learning_rate=1e-4 (recorded in the JSON)",
    )
    parser.add_argument("--runs", default="runs/benchmark_alignment")
    parser.add_argument("--output", default="benchmarks/results/shapes_alignment.json")
    args = parser.parse_args()
    overrides = parse_overrides(args.set, args.methods)

    from rlflow.rollout.prompts import SHAPES_PROMPT_SOURCES
    from rlflow.worlds.shapes.prompts import heldout_eval_prompts

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    split = SHAPES_PROMPT_SOURCES[args.prompts]
    eval_prompts = heldout_eval_prompts(split=split)
    results: dict = {
        "benchmark": "shapes_alignment",
        "world": "latent shapes (AutoencoderKL 4x8x8 + SD3 MM-DiT)",
        "command": (
            f"OMP_NUM_THREADS={threads} python benchmarks/alignment.py --samples {args.samples} "
            f"--evaluations {args.evaluations} "
            f"--jobs {args.jobs} --methods {' '.join(args.methods)} --prompts {args.prompts}"
            + (f" --set {' '.join(args.set)}" if args.set else "")
        ),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads},
        "eval": {
            "prompts": len(set(eval_prompts)),
            "images": len(eval_prompts),
            "held_out": True,
            "split": split,
        },
        "samples": args.samples,
        "jobs": args.jobs,
        "methods": {},
    }
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {
            pool.submit(
                run_method,
                name,
                str(Path(args.runs) / name),
                args.samples,
                args.evaluations,
                args.seed,
                threads,
                args.prompts,
                overrides.get(name),
            ): name
            for name in args.methods
        }
        for future in concurrent.futures.as_completed(futures):
            name = futures[future]
            result = future.result()
            results["methods"][name] = result
            results["base_accuracy"] = result["base_accuracy"]
            output.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a kill
    results["methods"] = {name: results["methods"][name] for name in args.methods}
    grpo = results["methods"].get("flow_grpo")
    if grpo is not None and grpo["final_accuracy"] > results["base_accuracy"]:
        # Sample efficiency against Flow-GRPO: samples each method needed to reach Flow-GRPO's final accuracy
        # (only meaningful when Flow-GRPO ended above the base: otherwise the base itself "reaches" it).
        for name, result in results["methods"].items():
            if name == "flow_grpo":
                continue  # its own first crossing of its final level says nothing about efficiency
            needed = samples_to_reach(result["accuracy_curve"], grpo["final_accuracy"])
            result["samples_to_flow_grpo_final"] = needed
            result["sample_ratio_vs_flow_grpo"] = grpo["samples"] / needed if needed else None
    output.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
