"""Seen vs held-out prompts: does an aligned shapes model's gain on its training prompts carry over?

Scores saved text-to-image models (a base, or runs' ``model/`` directories) on two evaluation sets of the same
make-up, sampled with the same deterministic ODE and seeded noise: the held-out prompts every trainer evaluates
on (``rlflow.worlds.shapes.prompts.heldout_eval_prompts``: a colour-shape pair training never draws) and as many
*training* prompts per category (prompts the trainers do draw). Accuracy is GenEval's mean over categories
with its standard error.

Run:  OMP_NUM_THREADS=2 python benchmarks/heldout_gap.py recipes/alignment/artifacts/shapes_latent_base \\
          runs/benchmark_alignment/diffusion_nft/model --output benchmarks/results/heldout_gap.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlflow.generators.loading import load_text_to_image_model
from rlflow.rollout.prompts import accuracy_metrics
from rlflow.trainers.flow_objectives import decode_in_chunks, ode_sample
from rlflow.worlds.shapes.prompts import (
    CATEGORIES,
    heldout_eval_prompts,
    parse_prompt,
    training_prompts_by_category,
)
from rlflow.worlds.shapes.verifier import ShapesVerifier


def seen_prompts(heldout: list[str], seed: int = 0) -> list[str]:
    """Training prompts with the held-out set's per-category counts (distinct where the category allows)."""
    groups = training_prompts_by_category()
    generator = torch.Generator().manual_seed(seed)
    out: list[str] = []
    for category in CATEGORIES:
        count = sum(parse_prompt(p).category == category for p in heldout)
        distinct = len({p for p in heldout if parse_prompt(p).category == category})
        order = torch.randperm(len(groups[category]), generator=generator).tolist()[:distinct]
        out.extend(groups[category][order[j % len(order)]] for j in range(count))
    return out


@torch.no_grad()
def score(model, prompts: list[str], num_steps: int, seed: int) -> dict[str, float]:
    latents = ode_sample(
        model,
        prompts,
        num_steps=num_steps,
        time_shift=1.0,
        generator=torch.Generator().manual_seed(seed),
        chunk_size=128,
        device=torch.device("cpu"),
    )
    images = decode_in_chunks(model, latents, chunk_size=128, device=torch.device("cpu"))
    correct = ShapesVerifier().evaluate(images, prompts)["correct"]
    return accuracy_metrics(correct, [parse_prompt(p).category for p in prompts], prefix="accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="model directories (a shapes model or a run's model/)")
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--output", default="benchmarks/results/heldout_gap.json")
    args = parser.parse_args()
    heldout = heldout_eval_prompts()
    seen = seen_prompts(heldout)
    results = {"command": "python benchmarks/heldout_gap.py " + " ".join(args.models), "models": {}}
    for directory in args.models:
        model = load_text_to_image_model(directory).eval()
        results["models"][directory] = {
            "held_out": score(model, heldout, args.num_steps, args.seed),
            "seen": score(model, seen, args.num_steps, args.seed),
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
