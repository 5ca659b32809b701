"""How much of the shapes oracle can a reward-model architecture learn from the preference set's images?

The preference recipes (``recipes/reward_models/shapes_reward_model*.yaml``) learn from noisy pairwise labels.
This benchmark asks what the same network reaches with the *best possible supervision on the same images*:
it regresses the oracle's noiseless per-image scores (alignment and quality, mean squared error) of every
training image of the set, with the recipe's network, split, label symmetries, optimiser and (optionally) its
renderer pretraining. No real reward model could be trained like this (the oracle stands for human raters,
who give comparisons, not scores); it is a learnability reference. If the score-supervised model generalises
no better than the preference-trained one, the preference loss is not what holds the reward model back: the
images and the network are. (Not a strict bound: absolute scores across prompts are a different target from
orderings within a prompt, and a network can do better on the latter.)

Reported on the held-out pairs of the recipe's split, for the regressed model at several steps and for saved
preference-trained models (``--trained``) alike:

* ``accuracy``: accuracy without ties against the sampled rater labels (the preference recipes' metric),
  next to the raters' ceiling;
* ``sign_agreement``: the fraction of pairs whose noiseless scores differ where the model orders the two
  images the same way (no label noise: the quantity a better model must raise; a model that orders every
  such pair correctly reaches the ceiling), also by how far apart the two scores are.

Run:  OMP_NUM_THREADS=1 python benchmarks/reward_model_bound.py \\
          --recipe recipes/reward_models/shapes_reward_model.yaml --pretrain --steps 3000 \\
          --trained runs/reward_models/shapes/model --name cnn
      -> benchmarks/results/reward_model_bound.json (one entry per --name; existing entries are kept)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rlflow.reward_models.learned import load_reward_model
from rlflow.reward_models.losses import accuracy_without_ties
from torch import Tensor

from rlflow.config import load_yaml, parse_config
from rlflow.data.preferences import PreferenceSet
from rlflow.trainers.reward_model import RewardModelTrainConfig, RewardModelTrainer
from rlflow.worlds.shapes.augmentation import symmetry_augment
from rlflow.worlds.shapes.oracle import ShapesOracle, agreement_ceiling

ROOT = Path(__file__).resolve().parents[1]
# Bands of the noiseless score difference within a pair (alignment moves in steps of a prompt's checks).
SCORE_GAPS = ((0.0, 0.15), (0.15, 0.3), (0.3, 0.5), (0.5, 1.01))


def oracle_of(pairs: PreferenceSet) -> ShapesOracle:
    """The oracle that labelled the set (its scale, theta and quality temperature are in the set's meta)."""
    return ShapesOracle(dimensions=tuple(pairs.dimensions), **pairs.meta.get("oracle", {}))


@torch.no_grad()
def held_out_metrics(
    score: Callable[[Tensor, list[str]], Tensor],
    pairs: PreferenceSet,
    true_a: Tensor,
    true_b: Tensor,
    dimensions: list[str],
) -> dict[str, dict[str, float]]:
    """``{dimension: {accuracy, sign_agreement}}`` of a scoring function ``score(images, prompts) -> [N, D]``."""
    r_a, r_b = score(pairs.a, pairs.prompts), score(pairs.b, pairs.prompts)
    out = {}
    for d, name in enumerate(dimensions):
        differ = true_a[:, d] != true_b[:, d]
        same_order = (r_a[:, d] > r_b[:, d]) == (true_a[:, d] > true_b[:, d])
        gap = (true_a[:, d] - true_b[:, d]).abs()
        out[name] = {
            "accuracy": accuracy_without_ties(r_a[:, d], r_b[:, d], pairs.labels_for(name)),
            "sign_agreement": float(same_order[differ].float().mean()),
            "pairs_with_different_scores": int(differ.sum()),
            "sign_agreement_by_score_gap": {
                f"{low}-{high}": float(same_order[band].float().mean()) if band.any() else None
                for low, high in SCORE_GAPS
                for band in [differ & (gap >= low) & (gap < high)]
            },
        }
    return out


def batched(model: torch.nn.Module, batch_size: int = 256) -> Callable[[Tensor, list[str]], Tensor]:
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        was_training = model.training
        model.eval()
        out = [
            model(images[i : i + batch_size], prompts[i : i + batch_size]).float()
            for i in range(0, len(prompts), batch_size)
        ]
        model.train(was_training)
        return torch.cat(out)

    return score


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipe", required=True, help="a shapes reward-model recipe (clean, not noise-aware)"
    )
    parser.add_argument("--data-dir", default=None, help="override the recipe's preference set")
    parser.add_argument("--name", required=True, help="the entry's name in the results file")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides as rlflow reward-model takes them, e.g. model.conv_channels=[32,64,128]",
    )
    parser.add_argument("--steps", type=int, default=3000, help="regression steps (0: only --trained)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per regression step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--pretrain", action="store_true", help="run the recipe's renderer pretraining first")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--trained", nargs="*", default=[], help="saved preference-trained model dirs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/reward_model_bound.json")
    args = parser.parse_args()

    if load_yaml(args.recipe).get("noise_aware"):
        sys.exit("the bound is for clean reward models: pass a recipe with noise_aware: false")
    # The recipe with this run's settings as ordinary CLI overrides (validated like `rlflow reward-model`'s);
    # the trainer's optimiser and lr schedule then run the regression for `steps`.
    overrides = {
        "num_threads": args.threads,
        "output_dir": tempfile.mkdtemp(prefix="rm_bound_"),
        **({"steps": args.steps} if args.steps else {}),
        **({"learning_rate": args.lr} if args.lr else {}),
        **({"data_dir": args.data_dir} if args.data_dir else {}),
        **dict(item.partition("=")[::2] for item in args.set),
    }
    argv = ["--config", args.recipe, *(f"--{k}={v}" for k, v in overrides.items())]
    config = parse_config(RewardModelTrainConfig, argv, prog="reward_model_bound")
    start = time.perf_counter()
    trainer = RewardModelTrainer(config)  # the recipe's network, split and seeds
    dims = trainer.dimensions
    oracle = oracle_of(trainer.train_set)

    def true_scores(images: Tensor, prompts: list[str]) -> Tensor:
        scores = oracle.scores(images, prompts)
        return torch.stack([scores[d] for d in dims], dim=1)

    train, held = trainer.train_set, trainer.heldout_set
    images = torch.cat([train.a, train.b])
    prompts = train.prompts * 2
    targets = true_scores(images, prompts)
    held_a, held_b = true_scores(held.a, held.prompts), true_scores(held.b, held.prompts)
    probabilities = oracle.probabilities_from_scores(held_a, held_b)
    result: dict = {
        "recipe": args.recipe,
        "data_dir": config.data_dir,
        "train_images": len(prompts),
        "heldout_pairs": len(held),
        "ceiling_without_ties": {
            d: v["without_ties"] for d, v in agreement_ceiling(probabilities, dims).items()
        },
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": config.learning_rate,
            "pretrain_steps": config.pretrain_steps if args.pretrain else 0,
            "symmetry_augment": config.symmetry_augment,
            "num_parameters": sum(p.numel() for p in trainer.trainable),
        },
        "trained": {
            path: held_out_metrics(batched(load_reward_model(path)), held, held_a, held_b, dims)
            for path in args.trained
        },
        "regression": [],
    }
    for path, metrics in result["trained"].items():
        print("trained", path, json.dumps(metrics), flush=True)
    if args.pretrain and config.pretrain_steps:
        result["pretrain"] = trainer.pretrain()

    model, generator = trainer.model, trainer.generator
    model.train()
    for step in range(1, args.steps + 1):  # no step at all with --steps 0 (only --trained)
        index = torch.randint(len(prompts), (args.batch_size,), generator=generator)
        x, batch_prompts = images[index], [prompts[i] for i in index.tolist()]
        if config.symmetry_augment:  # the oracle's exact symmetries, as in preference training
            x, _, batch_prompts = symmetry_augment(x, x, batch_prompts, generator)
        loss = (model(x, batch_prompts).float() - targets[index]).square().mean()
        trainer.optimizer_step(loss, model)  # clip, AdamW, the recipe's lr schedule over `steps`
        if step % args.eval_steps == 0 or step == args.steps:
            with torch.no_grad():
                fit = batched(model)(images[:2000], prompts[:2000]) - targets[:2000]
            entry = {
                "step": step,
                "train_mse": fit.square().mean(0).tolist(),
                "target_variance": targets[:2000].var(0).tolist(),
                "heldout": held_out_metrics(batched(model), held, held_a, held_b, dims),
            }
            result["regression"].append(entry)
            print(json.dumps(entry), flush=True)
    result["wall_seconds"] = time.perf_counter() - start

    output = ROOT / args.output
    existing = json.loads(output.read_text()) if output.exists() else {}
    existing.setdefault("benchmark", "reward_model_bound")
    existing["machine"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    existing.setdefault("runs", {})[args.name] = {
        "command": "python benchmarks/reward_model_bound.py " + " ".join(sys.argv[1:]),
        **result,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(existing, indent=2) + "\n")


if __name__ == "__main__":
    main()
