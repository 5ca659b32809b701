"""Why regressing a flow model on its own samples collapses it, and what does not.

Every sample-regression trainer (Flow-RWR, DiffusionNFT, the actor-critic) fits the model by flow matching
on samples it drew itself. This probe isolates that loop from any reward: starting from the shipped latent
shapes base, it takes plain flow-matching steps (AdamW, batch 64, no weighting) on

- ``real``: freshly rendered images (VAE latents), the pretraining data: the control;
- ``own``: fresh ODE samples of the weights being trained (drawn anew before every step);
- ``frozen``: fresh ODE samples of a frozen copy of the base;
- ``own_reflow``: as ``own``, but each sample paired with the noise it was drawn from (rectified-flow
  coupling) instead of fresh noise;
- ``own_roundtrip``: as ``own``, with each sample projected through the VAE (decode, re-encode) first;

with training times uniform, or logit-normal(-0.8, 0.8) as in pretraining, and samples from Euler (10 steps)
or Heun (10 steps, 20 evaluations: as exact as an 80-step Euler sample on this base). It reports the
verifier accuracy of deterministic 20-step samples (the evaluation sampler) on 256 held-out and 256 training
prompts after 0, 10, 20, 40, 80, ... steps.

    OMP_NUM_THREADS=1 python benchmarks/self_training_drift.py --steps 160 --jobs 2

writes benchmarks/results/self_training_drift.json (one thread per setting; ~3 min per setting).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ROOT / "recipes/alignment/artifacts/shapes_latent_base"

# name -> (data source, training times, sampler of the training samples)
SETTINGS: dict[str, tuple[str, str, str]] = {
    "real_uniform": ("real", "uniform", "-"),
    "real_logit_normal": ("real", "logit_normal", "-"),
    "own_uniform_euler": ("own", "uniform", "euler"),
    "own_uniform_heun": ("own", "uniform", "heun"),
    "own_logit_normal_heun": ("own", "logit_normal", "heun"),
    "own_reflow_uniform_heun": ("own_reflow", "uniform", "heun"),
    "own_roundtrip_uniform_heun": ("own_roundtrip", "uniform", "heun"),
    "frozen_logit_normal_heun": ("frozen", "logit_normal", "heun"),
    "frozen_uniform_heun": ("frozen", "uniform", "heun"),
}


def run_setting(name: str, steps: int, learning_rate: float, batch_size: int, seed: int) -> dict:
    torch.set_num_threads(1)
    from rlflow.flows.time import sample_training_times
    from rlflow.generators.loading import load_text_to_image_model
    from rlflow.trainers.flow_objectives import decode_in_chunks, flow_matching_errors, ode_sample
    from rlflow.worlds.shapes.prompts import heldout_eval_prompts, sample_prompts
    from rlflow.worlds.shapes.render import shapes_batches
    from rlflow.worlds.shapes.vae import encode_images
    from rlflow.worlds.shapes.verifier import ShapesVerifier

    source, times, sampler = SETTINGS[name]
    model = load_text_to_image_model(str(BASE))
    frozen = copy.deepcopy(model).eval() if source == "frozen" else None
    verifier = ShapesVerifier()
    held_out = heldout_eval_prompts(256)
    seen = sample_prompts(256, torch.Generator().manual_seed(5), include_held_out=False)

    def accuracy(prompts: list[str]) -> float:
        model.eval()
        with torch.no_grad():
            latents = ode_sample(
                model,
                prompts,
                num_steps=20,
                time_shift=1.0,
                generator=torch.Generator().manual_seed(0),
                chunk_size=128,
                device="cpu",
            )
            images = decode_in_chunks(model, latents, chunk_size=128, device="cpu")
        return float(verifier.evaluate(images, prompts)["correct"].float().mean())

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    renders = shapes_batches(batch_size, generator)
    checkpoints = sorted({0, 10, 20, *range(40, steps + 1, 40), steps})
    curve = [{"step": 0, "held_out": accuracy(held_out), "seen": accuracy(seen), "fm_loss": None}]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if source == "real":
            images, prompts = next(renders)
            with torch.no_grad():
                x1 = encode_images(model.vae, images)
            noise = torch.randn(x1.shape, generator=generator)
        else:
            prompts = sample_prompts(batch_size, generator, include_held_out=False)
            state = generator.get_state()  # the sampler's initial noise, for the reflow coupling
            drawn = torch.randn((batch_size, *model.latent_shape), generator=generator)
            generator.set_state(state)
            model.eval()
            x1 = ode_sample(
                frozen if frozen is not None else model,
                prompts,
                num_steps=10,
                time_shift=1.0,
                generator=generator,
                chunk_size=batch_size,
                device="cpu",
                method=sampler,
            )
            noise = drawn if source == "own_reflow" else torch.randn(x1.shape, generator=generator)
            if source == "own_roundtrip":
                with torch.no_grad():
                    x1 = encode_images(model.vae, model.decode(x1) * 2 - 1)
        model.train()
        t = sample_training_times(
            batch_size,
            times,
            generator=generator,
            **({"logit_mean": -0.8, "logit_std": 0.8} if times == "logit_normal" else {}),
        )
        loss = flow_matching_errors(model, x1, model.encode_prompts(prompts), t, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step in checkpoints:
            curve.append(
                {"step": step, "held_out": accuracy(held_out), "seen": accuracy(seen), "fm_loss": loss.item()}
            )
    return {
        "source": source,
        "times": times,
        "sampler": sampler,
        "curve": curve,
        "wall_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/self_training_drift.json"))
    args = parser.parse_args()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            name: pool.submit(run_setting, name, args.steps, args.learning_rate, args.batch_size, args.seed)
            for name in args.settings
        }
        results = {name: future.result() for name, future in futures.items()}
    out = {
        "benchmark": "self_training_drift",
        "command": "OMP_NUM_THREADS=1 python benchmarks/self_training_drift.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch_threads": 1, "jobs": args.jobs},
        "base": str(BASE.relative_to(ROOT)),
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "metric": "verifier accuracy (micro) of 20-step Euler samples, fixed noise; 256 held-out / 256 seen prompts",
        "settings": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    for name, result in results.items():
        points = ", ".join(f"{p['step']}: {p['held_out']:.3f}/{p['seen']:.3f}" for p in result["curve"])
        print(f"{name:28s} {points}")


if __name__ == "__main__":
    main()
