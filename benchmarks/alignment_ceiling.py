"""How far could alignment on the training prompts go? Flow matching on perfect data, from the same base.

The alignment trainers only ever see the training prompts (no prompt with a held-out colour-shape pair) and
learn from the base's own samples. This benchmark asks what the *best possible* data for those prompts does to
the held-out accuracy: it fine-tunes the shipped latent base by plain flow matching (the pretraining's loss,
logit-normal times, AdamW with warm-up, EMA evaluated) on

- ``rendered_training_prompts``: freshly rendered, always-correct images of the training prompts: every sample
  a perfect reward model would accept, as many as wanted, for free. No reward-driven trainer on these prompts
  can expect to get more out of them;
- ``rendered_all_prompts``: the same for every prompt of the grammar, held-out pairs included (pretraining
  continued): what the same steps do when the evaluation's combinations are in the data;
- ``rendered_training_prompts_prompt_split``: as the first, under the other held-out split (``prompts``: a
  quarter of the prompts held out, every colour-shape pair in training);
- ``filtered_base_samples``: samples of the frozen base for the training prompts (10 Heun steps) that the
  verifier passes, drawn once (``--pool`` samples) and reused (RAFT / ReST's "filter, then fine-tune").

It reports the held-out evaluation of the alignment benchmark (256 held-out prompts, 553 images, GenEval's
category mean with its standard error, 20-step Euler samples with fixed noise) every ``--eval-every`` steps,
with the training time spent so far.

    OMP_NUM_THREADS=1 python benchmarks/alignment_ceiling.py --steps 2500 --jobs 2 \
        --settings rendered_training_prompts rendered_all_prompts

writes benchmarks/results/alignment_ceiling.json (one thread per setting).
"""

from __future__ import annotations

import argparse
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
# setting -> held-out split of the evaluation (and of the training prompts)
SETTINGS = {
    "rendered_training_prompts": "pairs",
    "rendered_all_prompts": "pairs",
    "filtered_base_samples": "pairs",
    "rendered_training_prompts_prompt_split": "prompts",
}


def run_setting(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    from rlflow.flows.time import sample_training_times
    from rlflow.generators.loading import load_text_to_image_model
    from rlflow.rollout.prompts import accuracy_metrics
    from rlflow.trainers.flow_objectives import decode_in_chunks, flow_matching_errors, ode_sample
    from rlflow.utils.ema import EMA
    from rlflow.worlds.shapes.prompts import ShapesPrompts, heldout_eval_prompts, sample_prompts
    from rlflow.worlds.shapes.render import render
    from rlflow.worlds.shapes.vae import encode_images
    from rlflow.worlds.shapes.verifier import ShapesVerifier

    model = load_text_to_image_model(str(BASE))
    verifier = ShapesVerifier()
    split = SETTINGS[name]
    held_out = heldout_eval_prompts(256, split=split)
    categories = [ShapesPrompts.category(p) for p in held_out]
    generator = torch.Generator().manual_seed(args.seed)

    def samples(m: torch.nn.Module, prompts: list[str], *, steps: int, method: str, gen: torch.Generator):
        m.eval()
        with torch.no_grad():
            latents = ode_sample(
                m,
                prompts,
                num_steps=steps,
                time_shift=1.0,
                generator=gen,
                chunk_size=256,
                device="cpu",
                method=method,
            )
        return latents

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        latents = samples(m, held_out, steps=20, method="euler", gen=torch.Generator().manual_seed(0))
        with torch.no_grad():
            images = decode_in_chunks(m, latents, chunk_size=256, device="cpu")
        return accuracy_metrics(verifier.evaluate(images, held_out)["correct"], categories, prefix="accuracy")

    result: dict = {"setting": name, "split": split, "eval_images": len(held_out)}
    start = time.perf_counter()
    if name == "filtered_base_samples":
        prompts = sample_prompts(args.pool, generator, include_held_out=False, split=split)
        latents = torch.cat(
            [
                samples(model, prompts[i : i + 512], steps=10, method="heun", gen=generator)
                for i in range(0, args.pool, 512)
            ]
        )
        with torch.no_grad():
            correct = verifier.evaluate(
                decode_in_chunks(model, latents, chunk_size=512, device="cpu"), prompts
            )["correct"]
        pool_latents = latents[correct]
        pool_prompts = [p for p, keep in zip(prompts, correct.tolist(), strict=True) if keep]
        pool_categories = [ShapesPrompts.category(p) for p in prompts]
        result["pool"] = {
            "samples": args.pool,
            "accepted": len(pool_prompts),
            "accepted_by_category": {
                c: [
                    sum(k == c for k in pool_categories),
                    sum(k == c and ok for k, ok in zip(pool_categories, correct.tolist(), strict=True)),
                ]
                for c in dict.fromkeys(pool_categories)
            },
            "seconds": time.perf_counter() - start,
        }

    ema = EMA(model, decay=args.ema_decay, warmup=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    curve = [{"step": 0, "training_seconds": 0.0, **evaluate(model)}]
    training_seconds = time.perf_counter() - start  # the pool counts as training time
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        if name == "filtered_base_samples":
            rows = torch.randint(len(pool_prompts), (args.batch_size,), generator=generator)
            x1, prompts = pool_latents[rows], [pool_prompts[i] for i in rows.tolist()]
        else:
            prompts = sample_prompts(
                args.batch_size, generator, include_held_out=name == "rendered_all_prompts", split=split
            )
            with torch.no_grad():
                x1 = encode_images(model.vae, render(prompts, generator) * 2 - 1)
        model.train()
        t = sample_training_times(
            args.batch_size, "logit_normal", generator=generator, logit_mean=-0.8, logit_std=0.8
        )
        noise = torch.randn(x1.shape, generator=generator)
        loss = flow_matching_errors(model, x1, model.encode_prompts(prompts), t, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.update(model)
        training_seconds += time.perf_counter() - tick
        if step % args.eval_every == 0 or step == args.steps:
            curve.append(
                {
                    "step": step,
                    "training_seconds": training_seconds,
                    "fm_loss": loss.item(),
                    **evaluate(ema.model),
                }
            )
            print(name, {k: round(v, 3) for k, v in curve[-1].items() if "/" not in k}, flush=True)
    result["curve"] = curve
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--pool", type=int, default=16384, help="base samples drawn for filtered_base_samples"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/alignment_ceiling.json"))
    args = parser.parse_args()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(run_setting, name, args) for name in args.settings}
        results = {name: future.result() for name, future in futures.items()}
    out = {
        "benchmark": "alignment_ceiling",
        "command": "OMP_NUM_THREADS=1 python benchmarks/alignment_ceiling.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch_threads_per_setting": 1, "jobs": args.jobs},
        "base": str(BASE.relative_to(ROOT)),
        "optimizer": {
            "learning_rate": args.learning_rate,
            "warmup_steps": args.warmup_steps,
            "ema_decay": args.ema_decay,
            "batch_size": args.batch_size,
            "times": "logit_normal(-0.8, 0.8)",
        },
        "eval": {
            "prompts": 256,
            "held_out": True,
            "metric": "GenEval category-mean accuracy, EMA weights",
        },
        "settings": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    for name, result in results.items():
        points = ", ".join(f"{p['step']}: {p['accuracy']:.3f}" for p in result["curve"])
        print(f"{name:28s} {points}")


if __name__ == "__main__":
    main()
