"""How noisy is one GRPO iteration's policy gradient? Cosine between the gradients of independent iterations.

For each setting, the trainer collects ``--batches`` independent rollout batches (one iteration's worth each,
from the same starting weights) and computes the GRPO loss gradient of each; the mean pairwise cosine is
the figure (1: every iteration points the same way; 0: the updates are noise). With Adam, an update moves
every parameter by about the learning rate whatever the gradient's size, so a low cosine means each step is
mostly a random walk, which degrades a trained model unless the step size is small.

Pooling: with ``--batches 2k`` or more, the cosine between the *means* of two disjoint sets of ``k`` batches
is also reported (``pooled``: averaged over random splits). If every batch gradient is ``signal + independent
noise``, the pooled cosine is ``k rho / (1 + k rho)`` with ``rho = |signal|^2 / E|noise_1|^2`` (one batch's
signal-to-noise ratio), so the pooled curve tests the noise reading and tells how many samples an update
needs: ``cos = 0.5`` at ``k = 1 / rho`` batches (``samples_for_cosine_0.5``).

Run:  OMP_NUM_THREADS=2 python benchmarks/grpo_gradient_noise.py
      -> benchmarks/results/grpo_gradient_noise.json   (summarised in docs/alignment.md, "Tuning notes")
      OMP_NUM_THREADS=2 python benchmarks/grpo_gradient_noise.py --settings flow_grpo --batches 16 \
          --output benchmarks/results/grpo_gradient_noise_pooled.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlflow.config import config_from_dict, load_yaml
from rlflow.trainers.grpo import GRPOConfig, GRPOTrainer

ROOT = Path(__file__).resolve().parents[1]

# Name -> (recipe, overrides). "flow_grpo_reference" is Flow-GRPO's own layout: independent initial noise.
SETTINGS: dict[str, tuple[str, dict]] = {
    "flow_grpo_reference": ("recipes/alignment/shapes_grpo.yaml", {"shared_noise": False}),
    "flow_grpo": ("recipes/alignment/shapes_grpo.yaml", {}),
    "fast": ("recipes/alignment/shapes_grpo_fast.yaml", {}),
    "tempflow": ("recipes/alignment/shapes_tempflow.yaml", {}),
    # A control: the same recipe with a dense, easy reward (mean luma), to tell estimator noise apart from
    # a verifier reward that gives little to climb.
    "flow_grpo_brightness": ("recipes/alignment/shapes_grpo.yaml", {"rewards": {"brightness": 1.0}}),
}


def gradient(trainer: GRPOTrainer) -> torch.Tensor:
    """The flattened gradient of one freshly collected iteration's GRPO loss (all its transitions)."""
    batch = trainer.collect()
    transitions = trainer.transitions(batch)
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    for rows in torch.arange(len(transitions)).split(trainer.config.minibatch_size):
        loss, _ = trainer.loss(batch, transitions.select(rows))
        (loss * (len(rows) / len(transitions))).backward()
    return torch.cat([p.grad.flatten() for p in trainer.trainable if p.grad is not None]).clone()


def measure(name: str, batches: int, seed: int, workdir: Path) -> dict:
    recipe, overrides = SETTINGS[name]
    data = load_yaml(ROOT / recipe)
    data.update(overrides)
    data.update(output_dir=str(workdir / name), seed=seed, report_to="none", resume=False, num_eval_prompts=4)
    config = config_from_dict(GRPOConfig, data, source=recipe)
    trainer = GRPOTrainer(config)
    start = time.perf_counter()
    grads = [gradient(trainer) for _ in range(batches)]
    cosines = [
        torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(grads, 2)
    ]
    mean = sum(cosines) / len(cosines)
    spread = (sum((c - mean) ** 2 for c in cosines) / max(1, len(cosines) - 1)) ** 0.5
    samples = config.prompts_per_iteration * config.group_size
    if config.variant == "tempflow":
        samples *= len(config.resolved_branch_steps())
    return {
        "recipe": recipe,
        "overrides": overrides,
        "samples_per_iteration": samples,
        "mean_cosine": mean,
        "cosine_std": spread,
        "cosines": cosines,
        "pooled": pooled_cosines(grads, samples, seed),
        "seconds": time.perf_counter() - start,
    }


def pooled_cosines(grads: list[torch.Tensor], samples: int, seed: int, splits: int = 32) -> list[dict]:
    """Cosine between the means of two disjoint random sets of ``k`` batch gradients, for k = 1, 2, 4, ...
    (mean over ``splits`` random splits), with the implied one-batch signal-to-noise ratio
    ``rho = cos / (k (1 - cos))`` and the samples an update needs for a cosine of 0.5 (``1 / rho`` batches)."""
    stacked = torch.stack(grads)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    k = 1
    while 2 * k <= len(grads):
        values = []
        for _ in range(splits):
            order = torch.randperm(len(grads), generator=generator)
            first, second = stacked[order[:k]].mean(0), stacked[order[k : 2 * k]].mean(0)
            values.append(torch.nn.functional.cosine_similarity(first, second, dim=0).item())
        cosine = sum(values) / len(values)
        rho = cosine / (k * (1 - cosine)) if 0 < cosine < 1 else None
        rows.append(
            {
                "batches": k,
                "samples": k * samples,
                "mean_cosine": cosine,
                "rho": rho,
                "samples_for_cosine_0.5": samples / rho if rho else None,
            }
        )
        k *= 2
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS)[:4], choices=list(SETTINGS))
    parser.add_argument("--batches", type=int, default=4, help="independent iterations per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/grpo_gradient_noise.json")
    args = parser.parse_args()
    results: dict = {
        "command": "python benchmarks/grpo_gradient_noise.py " + " ".join(sys.argv[1:]),
        "batches": args.batches,
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "settings": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.settings:
            results["settings"][name] = measure(name, args.batches, args.seed, Path(workdir))
            print(f"{name}: mean cosine {results['settings'][name]['mean_cosine']:.3f}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
