"""Prompt worlds: groups of denoising chains per prompt, scored by reward functions (GRPO's rollouts).

A *prompt world* is a source of prompts plus a reward. The engine samples ``group_size`` chains per prompt
with a stochastic kernel (Flow-GRPO's SDE step or CPS) on some steps and the Euler ODE step elsewhere
(Flow-GRPO-Fast / MixGRPO windows), or, for TempFlow-GRPO, branches ``group_size`` one-step SDE
explorations off a deterministic main chain at a few branch points. It decodes the samples and computes
rewards in a background thread while the next chunk is being sampled, so a slow (e.g. remote) reward
model overlaps with sampling. Trainers receive a :class:`PromptRolloutBatch`; they never call the reward.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rlflow.config import ConfigError
from rlflow.flows.gaussian import standard_normal
from rlflow.flows.kernels import EulerStep, StepKernel
from rlflow.flows.sampling import Trajectory, sample_chain, select_batch

logger = logging.getLogger(__name__)


class PromptSource(Protocol):
    """Where training and evaluation prompts come from."""

    def sample(self, num: int, generator: torch.Generator) -> list[str]: ...

    def eval_prompts(self) -> list[str]: ...


class TextToImageModel(Protocol):
    """What the engine needs from a model (``rlflow.generators.diffusers_flow.DiffusersFlowModel``)."""

    latent_shape: tuple[int, ...]

    def velocity(self, x: Tensor, t: Tensor, cond: Any) -> Tensor: ...

    def encode_prompts(self, prompts: Sequence[str]) -> Any: ...

    def decode(self, latents: Tensor) -> Tensor: ...


#: ``reward(images [B, 3, H, W] in [0, 1], prompts) -> Tensor [B]`` or an object with ``total`` and
#: ``components`` (``rlflow.reward_models.RewardOutput``).
RewardFunction = Callable[[Tensor, Sequence[str]], Any]


@dataclass
class FilePrompts:
    """Prompts from a text file, one per line (blank lines and ``#`` comments skipped).

    The evaluation prompts are the first ``num_eval`` lines (a fixed set, so evaluations are comparable
    across iterations and runs). Training prompts are drawn uniformly with replacement from the lines after
    them (``held_out=True``: evaluation then measures prompts the trainer never saw), or from every line
    (``held_out=False``, evaluation prompts are training prompts too).
    """

    path: str
    num_eval: int = 16
    held_out: bool = False
    prompts: list[str] = field(init=False)

    def __post_init__(self) -> None:
        file = Path(self.path)
        if not file.is_file():
            raise FileNotFoundError(
                f"prompt file {self.path!r} does not exist; give a text file, one prompt per line"
            )
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        self.prompts = [line for line in lines if line and not line.startswith("#")]
        if not self.prompts:
            raise ValueError(f"prompt file {self.path!r} contains no prompts")
        if self.held_out:
            evaluation = set(self.eval_prompts())
            repeated = sorted({p for p in self.prompts[self.num_eval :] if p in evaluation})
            if len(self.prompts) <= self.num_eval or repeated:
                raise ValueError(
                    f"prompt file {self.path!r}: its first {self.num_eval} lines are the evaluation prompts and "
                    + (
                        f"training lines repeat {len(repeated)} of them (e.g. {repeated[0]!r})"
                        if repeated
                        else f"it has only {len(self.prompts)} lines, so no training prompt is held apart"
                    )
                    + "; add training prompts after them, lower num_eval_prompts, or set "
                    "allow_eval_overlap: true to train on the evaluation prompts too"
                )

    @property
    def training_prompts(self) -> list[str]:
        return self.prompts[self.num_eval :] if self.held_out else self.prompts

    def sample(self, num: int, generator: torch.Generator) -> list[str]:
        prompts = self.training_prompts
        index = torch.randint(len(prompts), (num,), generator=generator)
        return [prompts[i] for i in index.tolist()]

    def eval_prompts(self) -> list[str]:
        return self.prompts[: self.num_eval]


# The built-in shapes world's prompt sources -> their held-out split (rlflow.worlds.shapes.prompts.is_held_out).
SHAPES_PROMPT_SOURCES: dict[str, str | None] = {
    "shapes": "pairs",
    "shapes_prompt_split": "prompts",
    "shapes_all": None,
}
PROMPT_SOURCE_HELP = (
    "Prompt source: 'shapes' (the built-in world; evaluated on held-out prompts with a colour-shape pair training "
    "never draws), 'shapes_prompt_split' (evaluated on a held-out quarter of the prompts, every pair in training), "
    "'shapes_all' (no held-out split) or a text file, one per line (the first num_eval_prompts lines evaluate)."
)


def build_prompt_source(config: Any) -> Any:
    """The prompt source a config names (:data:`PROMPT_SOURCE_HELP`). Evaluation prompts that are also
    training prompts are refused unless ``allow_eval_overlap``."""
    if config.prompts in SHAPES_PROMPT_SOURCES:
        from rlflow.worlds.shapes.prompts import ShapesPrompts

        split = SHAPES_PROMPT_SOURCES[config.prompts]  # None: no held-out split
        if split is None and not config.allow_eval_overlap:
            raise ConfigError(
                "prompts: shapes_all evaluates on prompts it also trains on, which cannot show alignment that "
                "generalises; use prompts: shapes (held-out evaluation prompts) or set allow_eval_overlap: true"
            )
        try:
            # The evaluation set does not depend on the run's seed: every run is scored on the same prompts.
            return ShapesPrompts(
                num_eval=config.num_eval_prompts,
                seed=0,
                held_out=split is not None,
                split=split or "pairs",
            )
        except ValueError as exc:
            raise ConfigError(f"num_eval_prompts: {exc}") from exc
    try:
        return FilePrompts(
            config.prompts, num_eval=config.num_eval_prompts, held_out=not config.allow_eval_overlap
        )
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"prompts: {exc}") from exc


def accuracy_metrics(
    correct: Tensor, categories: Sequence[str] | None = None, *, prefix: str = "eval/accuracy"
) -> dict[str, float]:
    """Verifier accuracy with its standard error, overall and per prompt category.

    With categories the overall ``prefix`` is GenEval's: the mean of the per-category accuracies (so a
    category's weight does not depend on how many of its prompts the evaluation set holds), with the
    standard error ``sqrt(sum_c se_c^2) / k`` of that mean; ``prefix_micro`` is the plain mean over images.
    A category's standard error is the binomial ``sqrt(p (1 - p) / n)`` over its ``n`` images.
    """
    values = correct.detach().float().cpu().reshape(-1)
    if values.numel() == 0:
        raise ValueError("accuracy_metrics needs at least one verdict")

    def mean_and_stderr(x: Tensor) -> tuple[float, float]:
        p = float(x.mean())
        return p, (p * (1.0 - p) / x.numel()) ** 0.5

    overall, overall_se = mean_and_stderr(values)
    if not categories:
        return {prefix: overall, f"{prefix}_stderr": overall_se}
    if len(categories) != values.numel():
        raise ValueError(f"{len(categories)} categories for {values.numel()} verdicts")
    metrics: dict[str, float] = {f"{prefix}_micro": overall}
    names = list(dict.fromkeys(categories))  # first-seen order
    means, variances = [], []
    for name in names:
        rows = torch.tensor([c == name for c in categories])
        p, se = mean_and_stderr(values[rows])
        metrics[f"{prefix}/{name}"], metrics[f"{prefix}_stderr/{name}"] = p, se
        means.append(p)
        variances.append(se * se)
    metrics[prefix] = sum(means) / len(means)
    metrics[f"{prefix}_stderr"] = sum(variances) ** 0.5 / len(names)
    return metrics


@dataclass
class RewardResult:
    """Rewards of a batch: the weighted total and each named component (``[N]`` each)."""

    total: Tensor
    components: dict[str, Tensor]


def evaluate_reward(reward: RewardFunction, images: Tensor, prompts: Sequence[str]) -> RewardResult:
    """Call ``reward`` and normalise its output to a :class:`RewardResult`, rejecting NaN/inf and bad shapes."""
    out = reward(images, list(prompts))
    if isinstance(out, Tensor):
        result = RewardResult(total=out, components={})
    elif hasattr(out, "total") and hasattr(out, "components"):
        result = RewardResult(total=out.total, components=dict(out.components))
    else:
        raise TypeError(
            f"a reward must return a Tensor [B] or an object with .total/.components, got {type(out).__name__}"
        )
    total = torch.as_tensor(result.total, dtype=torch.float32).detach().cpu().reshape(-1)
    if total.shape[0] != len(prompts):
        raise ValueError(f"the reward returned {total.shape[0]} values for {len(prompts)} samples")
    if not torch.isfinite(total).all():
        bad = torch.nonzero(~torch.isfinite(total)).flatten()[:5].tolist()
        raise ValueError(
            f"the reward returned NaN/inf for samples {bad} (prompts {[prompts[i] for i in bad]})"
        )
    components = {
        name: torch.as_tensor(value, dtype=torch.float32).detach().cpu().reshape(-1)
        for name, value in result.components.items()
    }
    return RewardResult(total=total, components=components)


@dataclass
class PromptRolloutBatch:
    """``N`` samples with their chains, rewards, groups and the steps the policy loss trains on."""

    prompts: list[str]  # [N]
    group_ids: Tensor  # [N] long: samples compared with each other by the group advantage
    trajectory: Trajectory  # chain [N, K+1, ...]; log_probs [N, K] (0 on ODE steps); cond: embeddings
    train_steps: Tensor  # [N, S] long: per sample, the (stochastic) steps its policy loss uses
    images: Tensor  # [N, 3, H, W] in [0, 1]
    rewards: Tensor  # [N]
    reward_components: dict[str, Tensor]  # name -> [N]
    nfe: int  # velocity evaluations (one per sample per step) spent to produce the batch

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Tensor) -> PromptRolloutBatch:
        """The samples at ``index`` (e.g. some whole groups), everything else aligned."""
        index = torch.as_tensor(index, dtype=torch.long)
        traj = self.trajectory
        trajectory = Trajectory(
            chain=select_batch(traj.chain, index),
            log_probs=select_batch(traj.log_probs, index),
            times=traj.times,
            stochastic_steps=traj.stochastic_steps,
            cond=select_batch(traj.cond, index),
        )
        return PromptRolloutBatch(
            prompts=[self.prompts[i] for i in index.tolist()],
            group_ids=select_batch(self.group_ids, index),
            trajectory=trajectory,
            train_steps=select_batch(self.train_steps, index),
            images=select_batch(self.images, index),
            rewards=select_batch(self.rewards, index),
            reward_components=select_batch(self.reward_components, index),
            nfe=self.nfe * len(index) // max(1, len(self)),
        )


class _RewardPipeline:
    """Decodes chunks of samples and scores them on a background thread (overlapping with sampling)."""

    def __init__(self, model: TextToImageModel, reward: RewardFunction, asynchronous: bool):
        self.model, self.reward = model, reward
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1) if asynchronous else None
        self._pending: list[concurrent.futures.Future | tuple[Tensor, RewardResult]] = []

    def submit(self, latents: Tensor, prompts: Sequence[str]) -> None:
        with torch.no_grad():
            images = self.model.decode(latents).float().cpu()
        if self._executor is None:
            self._pending.append((images, evaluate_reward(self.reward, images, prompts)))
        else:
            future = self._executor.submit(evaluate_reward, self.reward, images, list(prompts))
            self._pending.append((images, future))  # type: ignore[arg-type]

    def gather(self) -> tuple[Tensor, RewardResult]:
        images, totals, components = [], [], {}
        for chunk_images, result in self._pending:  # type: ignore[misc]
            if isinstance(result, concurrent.futures.Future):
                result = result.result()
            images.append(chunk_images)
            totals.append(result.total)
            for name, value in result.components.items():
                components.setdefault(name, []).append(value)
        self._pending = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        return torch.cat(images), RewardResult(
            total=torch.cat(totals), components={name: torch.cat(v) for name, v in components.items()}
        )


def initial_noise(
    num_prompts: int,
    group_size: int,
    latent_shape: Sequence[int],
    *,
    shared_within_group: bool,
    generator: torch.Generator,
    device: torch.device | str,
) -> Tensor:
    """``x_0`` for ``num_prompts * group_size`` chains (group-major); DanceGRPO shares it within a group."""
    if shared_within_group:
        noise = standard_normal((num_prompts, *latent_shape), generator=generator, device=device)
        return noise.repeat_interleave(group_size, dim=0)
    return standard_normal((num_prompts * group_size, *latent_shape), generator=generator, device=device)


@torch.no_grad()
def collect_prompt_groups(
    model: TextToImageModel,
    kernel: StepKernel,
    reward: RewardFunction,
    prompts: Sequence[str],
    *,
    group_size: int,
    times: Tensor,
    stochastic_steps: Tensor,
    train_steps: Tensor,
    generator: torch.Generator,
    chunk_size: int = 32,
    shared_noise: bool = False,
    asynchronous_rewards: bool = True,
    device: torch.device | str = "cpu",
) -> PromptRolloutBatch:
    """Flow-GRPO rollouts: ``group_size`` chains per prompt (group-major rows), rewards per sample.

    ``stochastic_steps: [K] bool`` marks the SDE steps (the rest are Euler ODE); ``train_steps: [N, S]``
    are the steps each sample's loss will use (all must be stochastic). Chains are sampled in chunks of
    ``chunk_size`` samples; each chunk is decoded and scored in the background while the next one samples.
    """
    num_samples = len(prompts) * group_size
    train_steps = train_steps.to(torch.long)
    if train_steps.shape[0] != num_samples:
        raise ValueError(
            f"train_steps must have {num_samples} rows (one per sample), got {train_steps.shape[0]}"
        )
    if not stochastic_steps.cpu()[train_steps.cpu()].all():
        raise ValueError("every trained step must be a stochastic (SDE) step; it has no log-prob otherwise")
    expanded = [p for p in prompts for _ in range(group_size)]
    cond = model.encode_prompts(expanded)
    x_init = initial_noise(
        len(prompts),
        group_size,
        model.latent_shape,
        shared_within_group=shared_noise,
        generator=generator,
        device=device,
    )
    rewards = _RewardPipeline(model, reward, asynchronous_rewards)
    pieces: list[Trajectory] = []
    for start in range(0, num_samples, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, num_samples))
        piece = sample_chain(
            model,
            kernel,
            x_init[rows.to(x_init.device)],
            times,
            select_batch(cond, rows),
            stochastic_steps=stochastic_steps,
            generator=generator,
        )
        rewards.submit(piece.sample, expanded[start : start + len(rows)])
        pieces.append(piece)
    images, result = rewards.gather()
    trajectory = Trajectory(
        chain=torch.cat([p.chain for p in pieces]),
        log_probs=torch.cat([p.log_probs for p in pieces]),
        times=times,
        stochastic_steps=pieces[0].stochastic_steps,
        cond=cond,
    )
    return PromptRolloutBatch(
        prompts=expanded,
        group_ids=torch.arange(len(prompts)).repeat_interleave(group_size),
        trajectory=trajectory,
        train_steps=train_steps,
        images=images,
        rewards=result.total,
        reward_components=result.components,
        nfe=num_samples * (times.shape[0] - 1),
    )


@torch.no_grad()
def collect_branched_groups(
    model: TextToImageModel,
    kernel: StepKernel,
    reward: RewardFunction,
    prompts: Sequence[str],
    *,
    group_size: int,
    times: Tensor,
    branch_steps: Sequence[int],
    generator: torch.Generator,
    chunk_size: int = 32,
    asynchronous_rewards: bool = True,
    device: torch.device | str = "cpu",
) -> PromptRolloutBatch:
    """TempFlow-GRPO's trajectory branching (arXiv 2508.04324).

    For each prompt one deterministic (ODE) main chain runs from fresh noise. At each branch step ``b``,
    ``group_size`` siblings take ONE stochastic step from the main chain's ``x_b`` with independent noise
    and then follow the ODE to the end; the reward of a sibling's final sample is the *process reward* of
    its step-``b`` decision. Each (prompt, branch step) is a group, and a sibling trains only on step
    ``b``. Rows are ordered prompt-major, then branch step, then sibling.
    """
    num_steps = times.shape[0] - 1
    branch = torch.as_tensor(list(branch_steps), dtype=torch.long)
    if branch.numel() == 0 or int(branch.min()) < 0 or int(branch.max()) >= num_steps:
        raise ValueError(f"branch_steps must be step indices in [0, {num_steps}), got {branch.tolist()}")
    num_prompts, num_branches = len(prompts), branch.numel()
    cond_main = model.encode_prompts(list(prompts))
    x_init = standard_normal((num_prompts, *model.latent_shape), generator=generator, device=device)
    main = sample_chain(model, EulerStep(), x_init, times, cond_main, deterministic=True)

    # Rows: prompt p, branch j, sibling g  ->  (p * num_branches + j) * group_size + g.
    per_prompt = num_branches * group_size
    prompt_of_row = torch.arange(num_prompts).repeat_interleave(per_prompt)
    step_of_row = branch.repeat_interleave(group_size).repeat(num_prompts)
    expanded = [prompts[i] for i in prompt_of_row.tolist()]
    cond = model.encode_prompts(expanded)
    ode = EulerStep()
    rewards = _RewardPipeline(model, reward, asynchronous_rewards)
    chains, log_probs = [], []
    for start in range(0, prompt_of_row.shape[0], chunk_size):
        rows = torch.arange(start, min(start + chunk_size, prompt_of_row.shape[0]))
        chain = main.chain[prompt_of_row[rows].to(main.chain.device)].clone()  # [R, K+1, ...]
        chunk_cond = select_batch(cond, rows)
        step = step_of_row[rows].to(chain.device)
        row_index = torch.arange(rows.shape[0], device=chain.device)
        chunk_log_probs = torch.zeros(rows.shape[0], num_steps, device=chain.device)
        # The SDE step at each row's own branch step: one batched call (rows differ in time).
        t, t_next = times[step], times[step + 1]
        x = chain[row_index, step]
        out = kernel.step(x, model.velocity(x, t, chunk_cond), t, t_next, chunk_cond, generator=generator)
        chain[row_index, step + 1] = out.sample
        chunk_log_probs[row_index, step] = out.log_prob
        # Then the ODE to the end; a row only moves once it is past its branch step.
        for k in range(int(step.min()) + 1, num_steps):
            active = torch.nonzero(step < k).flatten()
            x = chain[active, k]
            t_k, t_k1 = times[k].expand(x.shape[0]), times[k + 1].expand(x.shape[0])
            velocity = model.velocity(x, t_k, select_batch(chunk_cond, active))
            chain[active, k + 1] = ode.step(x, velocity, t_k, t_k1).sample
        rewards.submit(chain[:, -1], [expanded[i] for i in rows.tolist()])
        chains.append(chain)
        log_probs.append(chunk_log_probs)
    images, result = rewards.gather()
    stochastic = torch.zeros(num_steps, dtype=torch.bool)
    stochastic[branch] = True
    trajectory = Trajectory(
        chain=torch.cat(chains),
        log_probs=torch.cat(log_probs),
        times=times,
        stochastic_steps=stochastic,
        cond=cond,
    )
    # NFEs: per prompt the main chain, plus per sibling its SDE step and the ODE steps after it.
    nfe = num_prompts * (num_steps + group_size * sum(num_steps - int(b) for b in branch.tolist()))
    return PromptRolloutBatch(
        prompts=expanded,
        group_ids=torch.arange(num_prompts * num_branches).repeat_interleave(group_size),
        trajectory=trajectory,
        train_steps=step_of_row.unsqueeze(1),
        images=images,
        rewards=result.total,
        reward_components=result.components,
        nfe=nfe,
    )
