"""``rlflow preferences``: build a pairwise preference set for the shapes world with the hidden oracle.

For each of ``num_pairs`` prompts (``rlflow.worlds.shapes.prompts.sample_prompts``) the base model draws two images
from different initial noise; each sample gets its own number of Euler steps (``num_steps_choices``) and,
optionally, SDE noise (``noise_levels``, Flow-GRPO's SDE), so image quality varies between the two images as
well as alignment. The :class:`~rlflow.worlds.shapes.oracle.ShapesOracle` then plays the human raters:
per dimension it samples ``A`` / ``B`` / ``tie`` from a Bradley-Terry-with-ties model of the noiseless
scores. Output (``output_dir``)::

    meta.json, pairs.jsonl, samples.safetensors   the preference set (rlflow.data.preferences; image kind
                                                  with latents = the model-space samples)
    oracle.safetensors                            noiseless oracle scores "scores_a"/"scores_b" [N, D] and
                                                  rater "probabilities" [N, D, 3] (evaluation only: never
                                                  train on them)
    summary.json                                  label fractions, agreement ceiling, score statistics, timing
    config.yaml, metrics.jsonl                    the resolved config; per-chunk score / label / speed metrics
    pairs_grid.png                                a few pairs with their labels and scores

Run: ``rlflow preferences --config recipes/reward_models/shapes_preferences.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlflow.config import ConfigError, dump_yaml, option, validate_config
from rlflow.data.preferences import (
    LABEL_NAMES,
    META_FILE,
    PAIRS_FILE,
    SAMPLES_FILE,
    PreferenceSet,
    is_preference_set,
    save_preferences,
)
from rlflow.utils.output_dirs import overwrite_option

__all__ = ["BuildPreferencesConfig", "build_preferences", "sample_pair_images"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "recipes/alignment/artifacts/shapes_base"
#: Every file ``rlflow preferences`` writes into ``output_dir`` (nothing else there is touched).
OUTPUT_FILES = (
    META_FILE,
    PAIRS_FILE,
    SAMPLES_FILE,
    "oracle.safetensors",
    "summary.json",
    "config.yaml",
    "metrics.jsonl",
    "pairs_grid.png",
)


@dataclass
class BuildPreferencesConfig:
    """``rlflow preferences``: sample image pairs from a shapes model and label them with the oracle."""

    output_dir: str = option(
        "runs/preferences/shapes",
        help="Directory of the preference set: empty, new, or an earlier set (only this command's files are "
        "replaced).",
    )
    model_path: str = option(
        DEFAULT_BASE_MODEL, help="Saved shapes model (save_shapes_model) to sample from."
    )
    num_pairs: int = option(4000, help="Comparisons to build (two samples each).")
    seed: int = option(0, help="Seed for prompts, sampling noise and rater labels.")
    num_threads: int | None = option(None, help="torch.set_num_threads (null: torch's default).")
    categories: list[str] | None = option(
        None, help="Prompt categories (single, counting, two_objects, position); null: all, uniformly."
    )
    num_steps_choices: list[int] = option(
        default_factory=lambda: [4, 6, 10],
        help="Euler step counts; each sample draws one uniformly (fewer steps -> blurrier, lower quality).",
    )
    noise_levels: list[float] = option(
        default_factory=lambda: [0.0],
        help="Flow-SDE noise levels; each sample draws one uniformly (0: deterministic Euler ODE).",
    )
    time_shift: float = option(1.0, help="Time-grid shift of the sampler (1.0: uniform).")
    dimensions: list[str] = option(
        default_factory=lambda: ["alignment", "quality"], help="Oracle label dimensions (label-column order)."
    )
    rater_scale: float = option(
        10.0, help="Oracle rater sharpness: P(A) = sigmoid(scale (sA - sB) - log theta)."
    )
    rater_theta: float = option(2.0, help="Oracle tie parameter theta >= 1 (1: raters never say tie).")
    quality_temperature: float = option(8.0, help="Oracle quality: defect pixels per factor e of quality.")
    chunk_size: int = option(256, help="Pairs sampled per vectorised chunk.")
    grid_pairs: int = option(8, help="Pairs shown in pairs_grid.png (0: no grid).")
    device: str = option("cpu", help="Torch device for sampling.")
    overwrite: bool = overwrite_option()

    def __post_init__(self) -> None:
        validate_config(self)
        if not self.num_steps_choices:
            raise ConfigError("num_steps_choices must be a non-empty list of ints >= 1, e.g. [4, 10, 20]")
        if not self.noise_levels or any(a >= 10.0 for a in self.noise_levels):
            raise ConfigError(
                f"noise_levels must be a non-empty list of values in [0, 10), got {self.noise_levels}"
            )


def sample_pair_images(
    model: Any,
    prompts: list[str],
    *,
    num_steps: Tensor,
    noise_levels: Tensor,
    time_shift: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Sample one image per prompt, sample ``i`` with ``num_steps[i]`` steps and SDE level ``noise_levels[i]``.

    Samples sharing a (steps, noise level) setting are drawn together in one batch, so the Python loop
    runs over the few distinct settings, never over samples. Returns ``(latents, images in [0, 1])`` on CPU.
    """
    from rlflow.flows.gaussian import standard_normal
    from rlflow.flows.kernels import EulerStep, FlowSDEStep
    from rlflow.flows.sampling import sample_chain, select_batch
    from rlflow.flows.time import time_grid

    device = next(model.parameters()).device
    batch = len(prompts)
    # Initial noise for the whole batch first, so a sample's noise does not depend on the grouping.
    x0 = standard_normal((batch, *model.latent_shape), generator=generator)
    cond = model.encode_prompts(prompts)
    latents = torch.empty_like(x0)
    settings = torch.stack([num_steps.double(), noise_levels.double()], dim=1)
    for steps, level in torch.unique(settings, dim=0).tolist():
        index = ((settings[:, 0] == steps) & (settings[:, 1] == level)).nonzero().squeeze(1)
        times = time_grid(int(steps), shift=time_shift, device=device)
        kernel = FlowSDEStep(level) if level > 0 else EulerStep()
        traj = sample_chain(
            model,
            kernel,
            x0[index].to(device),
            times,
            select_batch(cond, index.to(device)),
            deterministic=level == 0,
            generator=generator if device.type == "cpu" else None,
        )
        latents[index] = traj.sample.float().cpu()
    return latents, model.decode(latents.to(device)).float().cpu()


def _save_grid(pairs: PreferenceSet, scores_a: Tensor, scores_b: Tensor, count: int, path: Path) -> None:
    from rlflow.utils.plotting import save_image_grid

    n = min(count, len(pairs))
    images = torch.stack([pairs.a[:n], pairs.b[:n]], dim=1).flatten(0, 1)  # a0, b0, a1, b1, ...
    captions = []
    for i in range(n):
        score_text = [
            " ".join(f"{dim[:5]}={s[i, d]:.2f}" for d, dim in enumerate(pairs.dimensions))
            for s in (scores_a, scores_b)
        ]
        labels = ", ".join(
            f"{dim}: {LABEL_NAMES[int(v)]}"
            for dim, v in zip(pairs.dimensions, pairs.labels[i].tolist(), strict=True)
        )
        captions.append(f"A | {pairs.prompts[i]} | {score_text[0]}")
        captions.append(f"B | {labels} | {score_text[1]}")
    save_image_grid(images, captions, path, ncols=4, title="preference pairs (A left, B right)")


@torch.no_grad()
def build_preferences(config: BuildPreferencesConfig) -> dict[str, Any]:
    """CLI entry: sample, label, save the preference set, ``oracle.safetensors``, summary and grid."""
    from tqdm.auto import tqdm

    from rlflow.utils.checkpoint import atomic_write_text, save_state_dict, write_json
    from rlflow.utils.output_dirs import check_output_dir
    from rlflow.utils.seeding import prepare_run
    from rlflow.worlds.shapes.model import load_shapes_model
    from rlflow.worlds.shapes.oracle import ShapesOracle
    from rlflow.worlds.shapes.prompts import sample_prompts

    # Before any sampling: an existing run or a user's directory must never be written into by mistake.
    check_output_dir(
        config.output_dir,
        is_ours=is_preference_set,
        overwrite=config.overwrite,
        what="a preference set (meta.json)",
        writes=OUTPUT_FILES,
    )
    started = time.perf_counter()
    cpu_started = time.process_time()
    generator = prepare_run(config.seed, config.num_threads)
    # A separate stream for the raters, so relabelling (other scale/theta) keeps the same images.
    label_generator = torch.Generator().manual_seed(config.seed + 1_000_003)
    try:
        oracle = ShapesOracle(
            dimensions=tuple(config.dimensions),
            scale=config.rater_scale,
            theta=config.rater_theta,
            quality_temperature=config.quality_temperature,
        )
    except ValueError as exc:
        raise ConfigError(f"oracle settings: {exc}") from None
    model = load_shapes_model(config.model_path, device=config.device)
    model.eval()
    steps_choices = torch.tensor(config.num_steps_choices)
    level_choices = torch.tensor(config.noise_levels, dtype=torch.float64)

    prompts_all: list[str] = []
    metrics: list[dict[str, float | int]] = []
    parts: dict[str, list[Tensor]] = {
        k: [] for k in ("a", "b", "la", "lb", "sa", "sb", "p", "labels", "steps")
    }
    loop_started, loop_cpu_started = time.perf_counter(), time.process_time()
    with tqdm(total=config.num_pairs, desc="preferences", unit="pair") as bar:
        for start in range(0, config.num_pairs, config.chunk_size):
            count = min(config.chunk_size, config.num_pairs - start)
            prompts = sample_prompts(count, generator, categories=config.categories)
            # Rows [0, count) are the A samples, [count, 2 count) the B samples of the same prompts.
            settings = torch.randint(len(steps_choices), (2 * count,), generator=generator)
            levels = torch.randint(len(level_choices), (2 * count,), generator=generator)
            latents, images = sample_pair_images(
                model,
                prompts + prompts,
                num_steps=steps_choices[settings],
                noise_levels=level_choices[levels],
                time_shift=config.time_shift,
                generator=generator,
            )
            scores = oracle.scores(images, prompts + prompts)
            stacked = torch.stack([scores[d] for d in oracle.dimensions], dim=1)
            probabilities = oracle.probabilities_from_scores(stacked[:count], stacked[count:])
            parts["labels"].append(oracle.sample_labels(probabilities, label_generator))
            parts["a"].append(images[:count])
            parts["b"].append(images[count:])
            parts["la"].append(latents[:count])
            parts["lb"].append(latents[count:])
            parts["sa"].append(stacked[:count])
            parts["sb"].append(stacked[count:])
            parts["p"].append(probabilities)
            parts["steps"].append(steps_choices[settings].view(2, count).T)
            prompts_all.extend(prompts)
            bar.update(count)
            chunk_labels = parts["labels"][-1]
            metrics.append(
                {
                    "step": start + count,
                    **{
                        f"scores/{d}_mean": float(stacked[:, i].mean())
                        for i, d in enumerate(oracle.dimensions)
                    },
                    **{
                        f"labels/{d}_tie_fraction": float((chunk_labels[:, i] == 2).float().mean())
                        for i, d in enumerate(oracle.dimensions)
                    },
                    "time/pairs_per_second": (start + count) / max(time.perf_counter() - loop_started, 1e-9),
                }
            )
    cat = {k: torch.cat(v) for k, v in parts.items()}
    # Sampling + oracle labelling only (no imports / model loading): what scales with num_pairs.
    sampling_seconds = time.perf_counter() - loop_started
    sampling_cpu_seconds = time.process_time() - loop_cpu_started

    pairs = PreferenceSet(
        kind="image",
        dimensions=list(oracle.dimensions),
        prompts=prompts_all,
        a=cat["a"],
        b=cat["b"],
        labels=cat["labels"],
        latents_a=cat["la"],
        latents_b=cat["lb"],
        meta={
            "source": "rlflow preferences (shapes world, ShapesOracle raters)",
            "model_path": config.model_path,
            "seed": config.seed,
            "num_steps_choices": list(config.num_steps_choices),
            "noise_levels": list(config.noise_levels),
            "time_shift": config.time_shift,
            "oracle": {
                "scale": oracle.scale,
                "theta": oracle.theta,
                "quality_temperature": oracle.quality_temperature,
            },
            "latent_space": (
                "the model's VAE latents ((z - shift_factor) * scaling_factor of the decoded images' encoder)"
                if model.vae is not None
                else "shapes model space: images * 2 - 1, unclamped"
            ),
        },
    )
    output = save_preferences(pairs, config.output_dir)
    save_state_dict(
        {
            "scores_a": cat["sa"],
            "scores_b": cat["sb"],
            "probabilities": cat["p"].float(),
            "num_steps": cat["steps"],
        },
        output / "oracle.safetensors",
    )
    ceiling = oracle.agreement_ceiling(cat["p"])
    fractions = pairs.label_fractions()
    decided = cat["labels"] != 2
    summary: dict[str, Any] = {
        "output_dir": str(output),
        "num_pairs": len(pairs),
        "dimensions": list(oracle.dimensions),
        "label_fractions": fractions,
        "agreement_ceiling": ceiling,
        "score_mean": {
            d: float(torch.cat([cat["sa"][:, i], cat["sb"][:, i]]).mean())
            for i, d in enumerate(oracle.dimensions)
        },
        "score_std": {
            d: float(torch.cat([cat["sa"][:, i], cat["sb"][:, i]]).std())
            for i, d in enumerate(oracle.dimensions)
        },
        "sampling_seconds": sampling_seconds,
        "sampling_cpu_seconds": sampling_cpu_seconds,
        "pairs_per_second": len(pairs) / max(sampling_seconds, 1e-9),
    }
    if len(oracle.dimensions) >= 2:
        # How often two dimensions pick the same winner when both are decided: low = genuinely distinct axes.
        both = decided[:, 0] & decided[:, 1]
        same = (cat["labels"][:, 0] == cat["labels"][:, 1]) & both
        summary["dimension_agreement"] = {
            f"{oracle.dimensions[0]}_vs_{oracle.dimensions[1]}": float(same.sum() / both.sum().clamp_min(1))
        }
    if config.grid_pairs > 0:
        _save_grid(pairs, cat["sa"], cat["sb"], config.grid_pairs, output / "pairs_grid.png")
    summary["total_seconds"] = time.perf_counter() - started
    # CPU time of this process (all threads): comparable across runs on a shared, busy machine.
    summary["cpu_seconds"] = time.process_time() - cpu_started
    # Written after save_preferences, next to the set; the loader ignores files it does not know.
    dump_yaml(config, output / "config.yaml")
    atomic_write_text(output / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in metrics))
    write_json(output / "summary.json", summary)
    from rlflow.utils.run import done_line

    labels = ", ".join(
        f"{dim} A {f['A']:.2f} / B {f['B']:.2f} / tie {f['tie']:.2f}" for dim, f in fractions.items()
    )
    ceilings = ", ".join(f"{dim} {c['with_ties']:.3f}" for dim, c in ceiling.items())
    line = done_line(
        f"{len(pairs)} preference pairs",
        summary["total_seconds"],
        [f"labels {labels}", f"agreement ceiling (with ties) {ceilings}"],
        f"saved to {output}",
    )
    logger.info("%s", line)
    return summary
