"""Win rates of saved text-to-image models against the shapes base under the hidden oracle.

The same protocol as ``benchmarks/preference.py`` (its :class:`Evaluator`): 256 fixed evaluation prompts,
base and tuned model sampled from the same initial noise with 20 Euler steps, the oracle's noiseless
alignment and quality scores compared pair by pair (ties 1/2), plus the fractions of prompts where the
tuned model scores better / the same / worse, and verifier accuracies. Use it on any trainer's ``model/``
directory, e.g. the GRPO benchmark's final models, to put them on the preference benchmark's scale, and
(``--nrg DIR``) to Flow-NRG guided sampling of the base with a noise-aware reward model at several
``(w_alignment, w_quality)`` weights.

Run:  OMP_NUM_THREADS=2 python benchmarks/win_rate.py flow_grpo=runs/benchmark_alignment/flow_grpo/model \\
          fast=runs/benchmark_alignment/fast/model tempflow=runs/benchmark_alignment/tempflow/model
      OMP_NUM_THREADS=2 python benchmarks/win_rate.py --nrg runs/reward_models/shapes_noise_aware/model \\
          --nrg-weights 1,0 2,0 1,1 --output benchmarks/results/win_rate_nrg.json
      -> benchmarks/results/win_rate.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preference import Evaluator, parse_weights  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", help="name=path of a saved model directory")
    parser.add_argument("--nrg", default=None, help="a noise-aware reward model directory: guide the base")
    parser.add_argument(
        "--nrg-weights", type=parse_weights, nargs="+", default=[(1.0, 0.0), (2.0, 0.0), (1.0, 1.0)]
    )
    parser.add_argument("--base", default="recipes/alignment/artifacts/shapes_base")
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/results/win_rate.json")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    start = time.perf_counter()
    evaluator = Evaluator(args.base, args.eval_prompts, args.seed)
    results = {
        "benchmark": "win_rate",
        "command": "python benchmarks/win_rate.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "base": args.base,
        "base_verifier_accuracy": evaluator.base_accuracy,
        "models": {},
    }
    for name, path in models.items():
        results["models"][name] = {"path": path, **evaluator.evaluate_model_dir(path)}
        print(name, json.dumps(results["models"][name]["win_rate"]), flush=True)
    if args.nrg:
        results["nrg"] = {"reward_model": args.nrg, "runs": []}
        for weights in args.nrg_weights:
            result = {"weights": dict(zip(("alignment", "quality"), weights, strict=True))}
            result.update(evaluator.guided(args.nrg, weights))
            results["nrg"]["runs"].append(result)
            print("nrg", weights, json.dumps(result["win_rate"]), flush=True)
    results["total_seconds"] = time.perf_counter() - start
    output = ROOT / args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
