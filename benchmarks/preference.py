"""Preference benchmark: reward models vs the oracle's ceiling; Flow-DPO, Flow-RWR, actor-critic and Flow-NRG
against the base model under the hidden oracle, at equal compute. One run, side by side, one machine.

Stages (run directories under ``--runs``, default runs/benchmark_preference/):

1. Preference set: built with recipes/reward_models/shapes_preferences.yaml (or reused: ``--preferences DIR``).
   Reports pairs, label fractions, the oracle's agreement ceiling (with / without ties, per dimension) and
   the build time.
2. Clean reward model (recipes/reward_models/shapes_reward_model.yaml, read at run time; only data_dir and
   output_dir are overridden): held-out accuracy with / without ties per dimension, next to the oracle's
   ceiling computed on the SAME held-out pairs (the trainer's seeded split, rebuilt here, and the rater
   probabilities of those pairs in oracle.safetensors) and the gap.
3. Noise-aware reward model (shapes_reward_model_noise_aware.yaml): the same, on noised held-out pairs (as
   the trainer evaluates them) and on clean latents at t = 1.
4. Preference alignment at equal compute: Flow-DPO offline on the set's ``alignment`` labels
   (shapes_dpo_offline.yaml), Flow-RWR and actor-critic online (shapes_rwr.yaml, shapes_actor_critic.yaml)
   with the clean reward model's alignment head as their reward. Each method gets the same wall-clock
   budget (``--seconds-per-method``) for its training loop: the trainer runs with an unbounded iteration
   count and, after each iteration, stops once the elapsed training time plus half a mean iteration would
   pass the budget (so the actual time lands within half an iteration of it; the actual seconds are
   reported). The clock starts at the first iteration's sampling and stops after the last update, so model
   loading and the trainers' own evaluations are outside it. Velocity evaluations (rows through the flow
   model: sampling, policy and reference forwards) are counted by wrapping ``model.velocity``.
   The budget covers the alignment training only: building the preference set (DPO's data) and training
   the reward model (RWR's and actor-critic's reward) are shared costs, reported in their own sections.
   Evaluation: win rate against the base model under the oracle's NOISELESS scores per dimension, on
   ``--eval-prompts`` fixed prompts (rlflow.worlds.shapes.prompts.eval_prompts), base and tuned sampled from the same
   initial noise with the same ODE (20 Euler steps, flow_objectives.ode_sample); ties count 1/2. Plus the
   verifier accuracy (every check right) of both.
5. Flow-NRG trade-off (a small VideoAlign Table 5): guided sampling of the base with the noise-aware reward
   model's (alignment, quality) heads at several weight pairs, from the same noise as the unguided base;
   win rates per dimension and sampling seconds. The (0, 0) row must reproduce the base exactly (checked).

Method settings that differ from the recipes (all recorded in the JSON): rlflow's RWR recipe temperature is in
verifier units ([0, 1]); a Bradley-Terry reward model's scores are in rater-logit units, about ``rater_scale``
times the oracle score, so RWR's temperature is multiplied by the preference set's rater scale. The
actor-critic warm-up keeps the recipe's fraction of the run (critic_warmup_iterations / iterations, 10 / 60)
as a fraction of the time budget: the critic alone trains until that share of the budget is spent. Plumbing
overrides (unbounded iterations, no periodic evaluation / checkpoints, 8 prompts for the trainers' own
evaluations, which ours replaces) are listed per method under ``overrides``.

``--base recipes/alignment/artifacts/shapes_latent_base`` runs every stage on the latent world (samples drawn
and DPO trained in the VAE's latent space, rewards on decoded images; the noise-aware reward model scores
latents, pretrains on VAE-encoded renders and skips the pixel symmetries).

Run:  OMP_NUM_THREADS=2 python benchmarks/preference.py     -> benchmarks/results/preference.json
      (about an hour on 2 idle cores; ``--smoke`` runs the whole pipeline with tiny settings in ~2-3 min and
      writes runs/benchmark_preference_smoke/preference_smoke.json unless --output is given)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlflow.config import config_from_dict, load_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "preferences": "recipes/reward_models/shapes_preferences.yaml",
    "reward_model": "recipes/reward_models/shapes_reward_model.yaml",
    "noise_aware_reward_model": "recipes/reward_models/shapes_reward_model_noise_aware.yaml",
    "dpo": "recipes/alignment/shapes_dpo_offline.yaml",
    "rwr": "recipes/alignment/shapes_rwr.yaml",
    "actor_critic": "recipes/alignment/shapes_actor_critic.yaml",
}
DIMENSIONS = ("alignment", "quality")
EVAL_STEPS = 20  # Euler steps of every evaluation sample (base, tuned, guided)
NO_LIMIT = 10**6  # iterations / eval / checkpoint periods that the time budget ends first

# Tiny settings of --smoke: the whole pipeline end to end in a few minutes (numbers mean nothing).
SMOKE = {
    "preferences": {"num_pairs": 160, "chunk_size": 160, "grid_pairs": 0},
    "reward_model": {
        "steps": 30,
        "epochs": None,  # a recipe that counts epochs would otherwise ignore steps
        "batch_size": 32,
        "warmup_steps": 3,
        "eval_steps": 30,
        "logging_steps": 10,
        "save_steps": 30,
        "eval_train_pairs": 32,
    },
    "dpo": {"pairs_per_iteration": 8},
    "online": {"prompts_per_iteration": 2, "samples_per_prompt": 4, "num_steps": 4, "minibatch_size": 8},
    "actor_critic": {"critic_epochs": 1, "critic_minibatch_size": 8},
    "seconds_per_method": 6.0,
    "eval_prompts": 8,
}


# ---------------------------------------------------------------------------------------------- helpers
def recipe(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    data = load_yaml(ROOT / RECIPES[name])
    data.update(overrides)
    return data


def base_has_vae(path: str) -> bool:
    """Whether a shapes model directory is a latent-world model (it carries a ``vae/``)."""
    return (Path(path) / "vae").is_dir()


def fresh_dir(path: Path) -> Path:
    """A benchmark run directory, emptied first (the trainers would otherwise resume an earlier run)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def write_results(results: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=float) + "\n")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class VelocityCounter:
    """Counts rows through ``model.velocity`` (sampling steps, policy and reference training forwards)."""

    def __init__(self, model: Any):
        self.rows = 0
        inner = model.velocity

        def velocity(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            self.rows += x.shape[0]
            return inner(x, t, cond)

        object.__setattr__(model, "velocity", velocity)


class TimeBudget:
    """Ends a trainer's loop once its training time would pass ``seconds`` (see the module docstring).

    Wraps the trainer's ``collect`` (starts the clock at the first iteration) and ``update`` (after each
    iteration's update: stop if ``elapsed + mean_iteration / 2 >= seconds`` by making this iteration the
    last, which the trainers' loops read from ``config.iterations``). ``after_update(elapsed, iterations)``
    runs after each update (the actor-critic warm-up hook).
    """

    def __init__(
        self,
        trainer: Any,
        seconds: float,
        counter: VelocityCounter,
        after_update: Callable[[float, int], None] | None = None,
    ):
        self.trainer, self.seconds, self.counter = trainer, seconds, counter
        self.start: float | None = None
        self.elapsed = 0.0
        self.iterations = 0
        self.nfe_start = 0
        self.nfe = 0
        collect, update = trainer.collect, trainer.update

        def timed_collect() -> Any:
            if self.start is None:
                self.start, self.nfe_start = time.perf_counter(), counter.rows
            return collect()

        def timed_update(batch: Any) -> Any:
            out = update(batch)
            assert self.start is not None
            self.iterations = trainer.iteration + 1  # the loop increments after update()
            self.elapsed = time.perf_counter() - self.start
            self.nfe = counter.rows - self.nfe_start
            if after_update is not None:
                after_update(self.elapsed, self.iterations)
            if self.elapsed + 0.5 * self.elapsed / self.iterations >= self.seconds:
                trainer.config.iterations = self.iterations
            return out

        trainer.collect, trainer.update = timed_collect, timed_update


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Base-model samples of the fixed evaluation prompts, and paired oracle comparisons against them."""

    def __init__(self, base_path: str, num_prompts: int, seed: int, chunk_size: int = 64):
        from rlflow.generators.loading import load_text_to_image_model
        from rlflow.worlds.shapes.oracle import ShapesOracle
        from rlflow.worlds.shapes.prompts import eval_prompts
        from rlflow.worlds.shapes.verifier import ShapesVerifier

        self.prompts = eval_prompts(num_prompts, seed=seed)
        self.seed = seed
        self.chunk_size = chunk_size
        self.oracle = ShapesOracle(dimensions=DIMENSIONS)
        self.verifier = ShapesVerifier()
        self.base_model = load_text_to_image_model(base_path).eval().requires_grad_(False)
        start = time.perf_counter()
        self.base_latents = self.sample(self.base_model)
        self.base_seconds = time.perf_counter() - start
        self.base_images = self.decode(self.base_model, self.base_latents)
        self.base_scores = self.oracle.scores(self.base_images, self.prompts)
        self.base_accuracy = self.accuracy(self.base_images)

    def sample(self, model: Any) -> torch.Tensor:
        from rlflow.trainers.flow_objectives import ode_sample

        generator = torch.Generator().manual_seed(self.seed)  # the same noise for every model
        return ode_sample(
            model,
            self.prompts,
            num_steps=EVAL_STEPS,
            time_shift=1.0,
            generator=generator,
            chunk_size=self.chunk_size,
        )

    def noise(self) -> torch.Tensor:
        """Exactly the initial noise :meth:`sample` draws (ode_sample draws it first, in prompt order)."""
        from rlflow.flows.gaussian import standard_normal

        generator = torch.Generator().manual_seed(self.seed)
        return standard_normal((len(self.prompts), *self.base_model.latent_shape), generator=generator)

    @torch.no_grad()
    def decode(self, model: Any, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                model.decode(latents[i : i + self.chunk_size]).float().cpu()
                for i in range(0, latents.shape[0], self.chunk_size)
            ]
        )

    def accuracy(self, images: torch.Tensor) -> float:
        return float(self.verifier.evaluate(images, self.prompts)["correct"].float().mean())

    def compare(self, images: torch.Tensor) -> dict[str, Any]:
        """Win rates per dimension vs the base (paired by noise), mean scores, verifier accuracies."""
        from rlflow.worlds.shapes.oracle import win_rate

        scores = self.oracle.scores(images, self.prompts)
        return {
            "win_rate": {d: win_rate(scores[d], self.base_scores[d]) for d in DIMENSIONS},
            # Alignment scores are discrete (fractions of the prompt's checks): many pairs tie (1/2 each).
            "tie_fraction": {d: float((scores[d] == self.base_scores[d]).float().mean()) for d in DIMENSIONS},
            # win rate = better + tie / 2 = 1/2 + (better - worse) / 2: 0.7 needs better - worse >= 0.4
            "better_fraction": {
                d: float((scores[d] > self.base_scores[d]).float().mean()) for d in DIMENSIONS
            },
            "worse_fraction": {
                d: float((scores[d] < self.base_scores[d]).float().mean()) for d in DIMENSIONS
            },
            "score_mean": {d: float(scores[d].mean()) for d in DIMENSIONS},
            "base_score_mean": {d: float(self.base_scores[d].mean()) for d in DIMENSIONS},
            "verifier_accuracy": self.accuracy(images),
            "base_verifier_accuracy": self.base_accuracy,
        }

    def evaluate_model_dir(self, path: str) -> dict[str, Any]:
        from rlflow.generators.loading import load_text_to_image_model

        model = load_text_to_image_model(path).eval().requires_grad_(False)
        return self.compare(self.decode(model, self.sample(model)))

    def guided(self, reward_model_dir: str, weights: tuple[float, float]) -> dict[str, Any]:
        from rlflow.flows.kernels import EulerStep
        from rlflow.flows.sampling import sample_chain
        from rlflow.flows.time import time_grid
        from rlflow.guidance import GuidanceSpec, GuidedCondition, GuidedVelocity, build_objectives

        specs = [
            GuidanceSpec(path=reward_model_dir, head=d, weight=w)
            for d, w in zip(DIMENSIONS, weights, strict=True)
        ]
        guided = GuidedVelocity(self.base_model, build_objectives(specs))
        noise, times = self.noise(), time_grid(EVAL_STEPS)
        start = time.perf_counter()
        latents = []
        for i in range(0, len(self.prompts), self.chunk_size):
            part = self.prompts[i : i + self.chunk_size]
            cond = GuidedCondition(self.base_model.encode_prompts(part), part)
            traj = sample_chain(
                guided, EulerStep(), noise[i : i + self.chunk_size], times, cond, deterministic=True
            )
            latents.append(traj.sample.float().cpu())
        seconds = time.perf_counter() - start
        latents_all = torch.cat(latents)
        result = self.compare(self.decode(self.base_model, latents_all))
        result["seconds"] = seconds
        result["max_abs_latent_change"] = float((latents_all - self.base_latents).abs().max())
        return result


# ------------------------------------------------------------------------------------------------ stages
def stage_preferences(args: argparse.Namespace, runs: Path, threads: int) -> tuple[str, dict[str, Any]]:
    from rlflow.utils.checkpoint import load_state_dict
    from rlflow.worlds.shapes.oracle import agreement_ceiling
    from rlflow.worlds.shapes.preferences import BuildPreferencesConfig, build_preferences

    if args.preferences:
        directory = args.preferences
        summary_path = Path(directory) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        result: dict[str, Any] = {
            "reused": True,
            "recipe": None,
            "build_wall_seconds": summary.get("total_seconds"),  # of the original build
        }
    else:
        directory = str(fresh_dir(runs / "preferences"))
        overrides = {"output_dir": directory, "num_threads": threads, "seed": args.seed}
        if args.base:
            overrides["model_path"] = args.base
        if args.smoke:
            overrides.update(SMOKE["preferences"])
        config = config_from_dict(
            BuildPreferencesConfig, recipe("preferences", overrides), source=RECIPES["preferences"]
        )
        start = time.perf_counter()
        summary = build_preferences(config)
        result = {
            "reused": False,
            "recipe": RECIPES["preferences"],
            "build_wall_seconds": time.perf_counter() - start,
        }
    probabilities = load_state_dict(Path(directory) / "oracle.safetensors")["probabilities"]
    from rlflow.data.preferences import load_preferences

    pairs = load_preferences(directory)
    result.update(
        {
            "directory": directory,
            "pairs": len(pairs),
            "dimensions": list(pairs.dimensions),
            "label_fractions": pairs.label_fractions(),
            "ceiling": agreement_ceiling(probabilities, pairs.dimensions),
            "rater": pairs.meta.get("oracle", {}),
            "sampling_seconds": summary.get("sampling_seconds"),
            "total_seconds": summary.get("total_seconds"),
            "dimension_agreement": summary.get("dimension_agreement"),
        }
    )
    return directory, result


def heldout_ceiling(preferences_dir: str, config: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """The oracle's agreement ceiling on exactly the trainer's held-out pairs, and their decided counts."""
    from rlflow.data.preferences import load_preferences
    from rlflow.utils.checkpoint import load_state_dict
    from rlflow.worlds.shapes.oracle import agreement_ceiling

    pairs = load_preferences(preferences_dir)
    n = len(pairs)
    # PreferenceSet.split: held-out = the first round(fraction * n) of a seeded permutation, sorted.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.split_seed))
    index = order[: round(config.heldout_fraction * n)].sort().values
    _, heldout = pairs.split(config.heldout_fraction, config.split_seed)
    if heldout.prompts != [pairs.prompts[i] for i in index.tolist()] or not torch.equal(
        heldout.labels, pairs.labels[index]
    ):
        raise RuntimeError("PreferenceSet.split changed; update heldout_ceiling to rebuild its indices")
    probabilities = load_state_dict(Path(preferences_dir) / "oracle.safetensors")["probabilities"][index]
    decided = {d: int((heldout.labels[:, i] != 2).sum()) for i, d in enumerate(pairs.dimensions)}
    return agreement_ceiling(probabilities, pairs.dimensions), decided


def reward_model_metrics(
    summary: dict[str, Any], ceiling: dict[str, Any], decided: dict[str, int], prefix: str = ""
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in DIMENSIONS:
        acc = summary[f"{prefix}{d}/accuracy"]
        acc_ties = summary[f"{prefix}{d}/accuracy_with_ties"]
        out[d] = {
            "heldout_accuracy_without_ties": acc,
            "heldout_accuracy_with_ties": acc_ties,
            "ceiling_without_ties": ceiling[d]["without_ties"],
            "ceiling_with_ties": ceiling[d]["with_ties"],
            "gap_without_ties": ceiling[d]["without_ties"] - acc,
            "gap_with_ties": ceiling[d]["with_ties"] - acc_ties,
            "heldout_decided_pairs": decided[d],
            # Binomial standard error of the accuracy on that many decided pairs.
            "stderr_without_ties": math.sqrt(max(acc * (1 - acc), 0.0) / max(decided[d], 1)),
        }
    return out


def stage_reward_model(
    name: str, args: argparse.Namespace, runs: Path, preferences_dir: str, threads: int
) -> tuple[str, dict[str, Any]]:
    from rlflow.trainers.reward_model import RewardModelTrainConfig, RewardModelTrainer

    overrides: dict[str, Any] = {
        "data_dir": preferences_dir,
        "output_dir": str(fresh_dir(runs / name)),
        "num_threads": threads,
        "report_to": "none",
    }
    if args.smoke:
        overrides.update(SMOKE["reward_model"])
    if name == "noise_aware_reward_model" and args.base and base_has_vae(args.base):
        overrides["symmetry_augment"] = False  # flips / channel swaps do not act on VAE latents
    reuse = getattr(args, f"{name}_run")
    if reuse:
        # A finished run of the same recipe (e.g. `rlflow reward-model --config <recipe>`): evaluate, don't retrain.
        config = config_from_dict(
            RewardModelTrainConfig, load_yaml(Path(reuse) / "config.yaml"), source=f"{reuse}/config.yaml"
        )
        if Path(config.data_dir).resolve() != Path(preferences_dir).resolve():
            raise SystemExit(
                f"--{name.replace('_', '-')}-run {reuse} was trained on {config.data_dir}, not {preferences_dir}"
            )
        summary = json.loads((Path(reuse) / "summary.json").read_text())
        wall = float(summary.get("wall_seconds", float("nan")))
    else:
        config = config_from_dict(RewardModelTrainConfig, recipe(name, overrides), source=RECIPES[name])
        start = time.perf_counter()
        summary = RewardModelTrainer(config).train()
        wall = time.perf_counter() - start
    ceiling, decided = heldout_ceiling(preferences_dir, config)
    result: dict[str, Any] = {
        # A reused run may come from another recipe (e.g. the transformer one): its config.yaml says which.
        "recipe": RECIPES[name] if not reuse else f"reused run {reuse} (see its config.yaml)",
        "steps": summary["steps"],
        "train_pairs": summary["train_pairs"],
        "heldout_pairs": summary["heldout_pairs"],
        "wall_seconds": wall,
        **reward_model_metrics(summary, ceiling, decided),
    }
    if config.noise_aware:
        result["evaluated_on"] = (
            f"noised held-out pairs: {config.eval_noise_samples} (t, noise) draws per pair, t ~ "
            f"{config.time_distribution}; clean_t1: the clean latents at t = 1"
        )
        if f"eval_clean/{DIMENSIONS[0]}/accuracy" in summary:
            result["clean_t1"] = reward_model_metrics(summary, ceiling, decided, prefix="eval_clean/")
    return summary["model_dir"], result


def run_method(
    name: str,
    args: argparse.Namespace,
    runs: Path,
    preferences_dir: str,
    reward_model_dir: str,
    rater_scale: float,
    base_path: str,
    threads: int,
) -> dict[str, Any]:
    from rlflow.trainers.text_to_image import ModelConfig, load_model

    output_dir = str(fresh_dir(runs / name))
    overrides: dict[str, Any] = {
        "output_dir": output_dir,
        "seed": args.seed,
        "num_threads": threads,
        "device": "cpu",
        "resume": False,
        "report_to": "none",
        "iterations": NO_LIMIT,  # the time budget ends the run
        "eval_steps": NO_LIMIT,
        "save_steps": NO_LIMIT,
        "num_eval_prompts": min(args.eval_prompts, 8),  # the trainer's own evaluations (ours is below)
        "grid_size": 8,
    }
    changed: dict[str, Any] = {}
    if name == "dpo":
        from rlflow.trainers.dpo import DPOConfig as Config
        from rlflow.trainers.dpo import DPOTrainer as Trainer

        overrides.update(preferences=preferences_dir, dimension="alignment", plots=False)
        if args.smoke:
            overrides.update(SMOKE["dpo"])
    else:
        if name == "rwr":
            from rlflow.trainers.rwr import RWRConfig as Config
            from rlflow.trainers.rwr import RWRTrainer as Trainer
        else:
            from rlflow.trainers.actor_critic import ActorCriticConfig as Config
            from rlflow.trainers.actor_critic import ActorCriticTrainer as Trainer
        overrides["rewards"] = {"learned": {"path": reward_model_dir, "head": "alignment"}}
        if args.smoke:
            overrides.update(SMOKE["online"])
            if name == "actor_critic":
                overrides.update(SMOKE["actor_critic"])
    if args.base:
        overrides["model"] = {**load_yaml(ROOT / RECIPES[name])["model"], "path": args.base}
    data = recipe(name, overrides)
    if name == "rwr":
        # Verifier units -> reward-model units (module docstring).
        changed["temperature"] = {"recipe": data["temperature"], "used": data["temperature"] * rater_scale}
        data["temperature"] = changed["temperature"]["used"]
    if data.get("lr_scheduler_type", "constant") != "constant" or data.get("warmup_steps", 0):
        raise SystemExit(f"{RECIPES[name]}: the time budget needs a constant lr schedule without warm-up")
    recipe_iterations = load_yaml(ROOT / RECIPES[name])["iterations"]
    config = config_from_dict(Config, data, source=RECIPES[name])
    if config.model.path != base_path:
        raise SystemExit(
            f"{RECIPES[name]} starts from {config.model.path}, not the evaluated base {base_path}; "
            "win rates against the base need the same starting model"
        )
    model = load_model(ModelConfig(path=config.model.path))
    counter = VelocityCounter(model)
    trainer = Trainer(config, model=model)

    after_update = None
    if name == "actor_critic" and config.use_critic:
        # The recipe's warm-up as a fraction of its run, applied to the time budget: the critic alone
        # trains until that fraction of the budget is spent (at least one iteration).
        fraction = config.critic_warmup_iterations / recipe_iterations
        warmup_seconds = fraction * args.seconds_per_method
        changed["critic_warmup"] = {
            "recipe": f"{config.critic_warmup_iterations} of {recipe_iterations} iterations",
            "used_seconds": warmup_seconds,
        }
        trainer.config.critic_warmup_iterations = NO_LIMIT - 1

        def after_update(elapsed: float, iterations: int) -> None:
            if trainer.config.critic_warmup_iterations > iterations and elapsed >= warmup_seconds:
                trainer.config.critic_warmup_iterations = iterations  # the next iteration trains the actor
                changed["critic_warmup"]["used_iterations"] = iterations

    budget = TimeBudget(trainer, args.seconds_per_method, counter, after_update)
    start = time.perf_counter()
    summary = trainer.train()
    total = time.perf_counter() - start
    result: dict[str, Any] = {
        "recipe": RECIPES[name],
        "changed_from_recipe": changed,
        "overrides": {k: v for k, v in overrides.items() if k not in ("output_dir", "preferences")},
        "wall_seconds": budget.elapsed,
        "budget_seconds": args.seconds_per_method,
        "total_seconds_incl_trainer_evaluations": total,
        "iterations": budget.iterations,
        "velocity_evaluations": budget.nfe,
        "trainer_nfe": summary.get("nfe"),
        "model_dir": summary["model_dir"],
    }
    if name == "dpo":
        result.update(
            train_pairs=summary.get("train_pairs"),
            ties_dropped=summary.get("ties_dropped"),
            heldout_implicit_accuracy=summary.get("final_heldout_implicit_accuracy"),
            base_heldout_implicit_accuracy=summary.get("base_heldout_implicit_accuracy"),
        )
    else:
        result.update(
            reward="learned clean reward model, alignment head",
            final_reward_mean=summary.get("final_reward_mean"),
            base_reward_mean=summary.get("base_reward_mean"),
        )
    return result


# -------------------------------------------------------------------------------------------------- main
def markdown(results: dict[str, Any]) -> str:
    lines = [
        "",
        "| reward model | dim | acc w/o ties | ceiling | gap | acc w/ ties | ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("reward_model", "noise_aware_reward_model"):
        for d in DIMENSIONS:
            m = results[key][d]
            lines.append(
                f"| {key} | {d} | {m['heldout_accuracy_without_ties']:.3f} | {m['ceiling_without_ties']:.3f} | "
                f"{m['gap_without_ties']:+.3f} | {m['heldout_accuracy_with_ties']:.3f} | {m['ceiling_with_ties']:.3f} |"
            )
    lines += [
        "",
        "| method | win alignment | win quality | verifier acc (base) | wall s | iterations | NFE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        lines.append(
            f"| {name} | {m['win_rate']['alignment']:.3f} | {m['win_rate']['quality']:.3f} | "
            f"{m['verifier_accuracy']:.3f} ({m['base_verifier_accuracy']:.3f}) | {m['wall_seconds']:.0f} | "
            f"{m['iterations']} | {m['velocity_evaluations']} |"
        )
    lines += [
        "",
        "| NRG (w_align, w_quality) | win alignment | win quality | verifier acc | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in results["nrg"]:
        lines.append(
            f"| {tuple(row['weights'].values())} | {row['win_rate']['alignment']:.3f} | "
            f"{row['win_rate']['quality']:.3f} | {row['verifier_accuracy']:.3f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def parse_weights(text: str) -> tuple[float, float]:
    try:
        a, q = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"NRG weights must be 'w_alignment,w_quality', got {text!r}"
        ) from None
    return a, q


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preferences", default=None, help="reuse this preference set (else build one)")
    parser.add_argument(
        "--base",
        default=None,
        help="the base model of every stage (default: the recipes' pixel base, recipes/alignment/artifacts/"
        "shapes_base; recipes/alignment/artifacts/shapes_latent_base: the latent world)",
    )
    parser.add_argument("--seconds-per-method", type=float, default=300.0, help="training budget per method")
    parser.add_argument("--eval-prompts", type=int, default=256, help="fixed evaluation prompts")
    parser.add_argument(
        "--nrg-weights",
        type=parse_weights,
        nargs="+",
        default=[(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (0.0, 1.0), (1.0, 1.0), (2.0, 2.0)],
        help="Flow-NRG (w_alignment, w_quality) pairs, e.g. 0,0 2,0 0,2",
    )
    parser.add_argument(
        "--reward-model-run", default=None, help="reuse a finished run of the clean reward-model recipe"
    )
    parser.add_argument(
        "--noise-aware-reward-model-run",
        default=None,
        help="reuse a finished run of the noise-aware reward-model recipe",
    )
    parser.add_argument("--methods", nargs="+", default=["dpo", "rwr", "actor_critic"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny settings: check the pipeline (~2-3 min)")
    parser.add_argument("--runs", default=None, help="run directories (default runs/benchmark_preference)")
    parser.add_argument("--output", default=None, help="results JSON")
    args = parser.parse_args()
    for name in args.methods:
        if name not in ("dpo", "rwr", "actor_critic"):
            parser.error(f"unknown method {name!r}; choose from dpo rwr actor_critic")
    if args.smoke:
        if args.seconds_per_method == parser.get_default("seconds_per_method"):
            args.seconds_per_method = SMOKE["seconds_per_method"]
        if args.eval_prompts == parser.get_default("eval_prompts"):
            args.eval_prompts = SMOKE["eval_prompts"]
    runs = Path(args.runs or ("runs/benchmark_preference" + ("_smoke" if args.smoke else "")))
    # A smoke result never lands where the real one goes.
    output = Path(
        args.output
        or (runs / "preference_smoke.json" if args.smoke else "benchmarks/results/preference.json")
    )

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "preference",
        "command": f"OMP_NUM_THREADS={threads} python "
        + " ".join(["benchmarks/preference.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
        },
        "settings": {
            "smoke": args.smoke,
            "seconds_per_method": args.seconds_per_method,
            "eval_prompts": args.eval_prompts,
            "eval_ode": f"{EVAL_STEPS} Euler steps, uniform grid, the same initial noise for every model",
            "seed": args.seed,
            "base": args.base or "the recipes' base",
            "recipes": RECIPES,
            "smoke_overrides": SMOKE if args.smoke else None,
            "equal_compute": "same wall-clock training budget per method (first sampling -> last update); "
            "iterations stop when elapsed + mean iteration / 2 >= budget",
        },
    }
    stage_seconds: dict[str, float] = {}

    tick = time.perf_counter()
    log("stage 1: preference set")
    preferences_dir, results["preferences"] = stage_preferences(args, runs, threads)
    rater_scale = float(results["preferences"]["rater"].get("scale", 10.0))
    stage_seconds["preferences"] = time.perf_counter() - tick
    write_results(results, output)

    for key in ("reward_model", "noise_aware_reward_model"):
        tick = time.perf_counter()
        log(f"stage: {key}")
        model_dir, results[key] = stage_reward_model(key, args, runs, preferences_dir, threads)
        results[key]["model_dir"] = model_dir
        stage_seconds[key] = time.perf_counter() - tick
        write_results(results, output)
    reward_model_dir = results["reward_model"]["model_dir"]
    noise_aware_dir = results["noise_aware_reward_model"]["model_dir"]

    tick = time.perf_counter()
    base_path = args.base or load_yaml(ROOT / RECIPES["dpo"])["model"]["path"]
    evaluator = Evaluator(base_path, args.eval_prompts, args.seed)
    results["base"] = {
        "model": base_path,
        "verifier_accuracy": evaluator.base_accuracy,
        "score_mean": {d: float(evaluator.base_scores[d].mean()) for d in DIMENSIONS},
        "sampling_seconds": evaluator.base_seconds,
    }
    stage_seconds["base_evaluation"] = time.perf_counter() - tick

    results["methods"] = {}
    for name in args.methods:
        tick = time.perf_counter()
        log(f"stage 4: {name} ({args.seconds_per_method:.0f} s budget)")
        result = run_method(
            name, args, runs, preferences_dir, reward_model_dir, rater_scale, base_path, threads
        )
        result.update(evaluator.evaluate_model_dir(result["model_dir"]))
        results["methods"][name] = result
        stage_seconds[name] = time.perf_counter() - tick
        write_results(results, output)

    tick = time.perf_counter()
    log("stage 5: Flow-NRG")
    results["nrg"] = []
    for weights in args.nrg_weights:
        row = evaluator.guided(noise_aware_dir, weights)
        results["nrg"].append({"weights": dict(zip(DIMENSIONS, weights, strict=True)), **row})
        if weights == (0.0, 0.0) and row["max_abs_latent_change"] != 0.0:
            raise RuntimeError(f"unguided NRG run differs from the base by {row['max_abs_latent_change']}")
    stage_seconds["nrg"] = time.perf_counter() - tick

    results["targets"] = {
        "reward_model_within_5_points": {
            d: results["reward_model"][d]["gap_without_ties"] <= 0.05 for d in DIMENSIONS
        },
    }
    if "dpo" in results["methods"]:
        results["targets"]["dpo_win_rate_alignment_at_least_0.7"] = (
            results["methods"]["dpo"]["win_rate"]["alignment"] >= 0.7
        )
    results["stage_seconds"] = stage_seconds
    results["total_seconds"] = time.perf_counter() - started
    write_results(results, output)
    print(markdown(results))
    log(f"wrote {output} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
