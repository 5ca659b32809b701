"""Flow-matching pretraining / behaviour cloning: ``rlflow pretrain --config recipe.yaml``.

Learns the velocity field of a :class:`~rlflow.policies.FlowPolicy` on (condition, target) pairs with
the rectified-flow loss ``|| v(x_t, t, c) - (x1 - x0) ||^2``, ``x_t = (1 - t) x0 + t x1``. A shortcut
policy (``model.shortcut: true``) is trained with the shortcut objective instead (:meth:`PretrainTrainer.
shortcut_loss`): flow matching at step size ``d = 0`` plus self-consistency of one ``2d`` step with two
``d`` steps.

Reading order: :class:`PretrainConfig` -> :class:`PretrainTrainer` (``__init__`` -> ``loss`` ->
``update`` -> ``evaluate`` -> ``save_checkpoint`` / ``resume`` -> ``train``).

Run directory (``output_dir``)::

    config.yaml, metrics.jsonl, summary.json, plots/*.png, tensorboard/ and wandb/ (as report_to asks)
    checkpoints/step_XXXXXXXX/{policy/, ema/, training_state.pt}   (resumable; written atomically)
    policy/                                                         (final weights to load: EMA if enabled)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from rlflow.config import ConfigError, option
from rlflow.data import FlowMatchingData, load_npz_data, toy_2d_data
from rlflow.data.toy2d import Toy2D

if TYPE_CHECKING:
    from rlflow.envs.normalization import Normalization
from rlflow.flows import flow_matching_loss, linear_path, sample_training_times
from rlflow.flows.solvers import OdeMethod, nfe_per_step
from rlflow.flows.time import TimeDistribution
from rlflow.policies import FlowPolicy, FlowPolicyConfig
from rlflow.trainers.step_loop import StepLoopTrainer, StepTrainingConfig
from rlflow.utils.distances import mmd_rbf, sliced_wasserstein
from rlflow.utils.ema import EMA
from rlflow.utils.seeding import prepare_run

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the (condition, target) pairs come from."""

    source: Literal["toy_2d", "npz", "demonstrations"] = option(
        "toy_2d",
        help="toy_2d: a built-in 2-D distribution; npz: (condition, target) arrays; demonstrations: an "
        "`rlflow collect` dataset, chunked to model.horizon and min-max normalised to [-1, 1] (behaviour cloning).",
    )
    toy_name: Toy2D = option("eight_gaussians", help="toy_2d: eight_gaussians, checkerboard or two_moons.")
    num_samples: int = option(20_000, help="toy_2d: number of points to draw (train + held out).")
    path: str | None = option(None, help="npz: path to the .npz file.")
    target_key: str = option("actions", help="npz: array of targets, [N, act_dim] or [N, horizon, act_dim].")
    condition_key: str | None = option(
        "observations", help="npz: array of conditions [N, obs_dim]; null for unconditional data."
    )
    holdout_fraction: float = option(0.1, help="Fraction of rows held out for evaluation.")

    def __post_init__(self) -> None:
        if self.source in ("npz", "demonstrations") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


@dataclass
class PretrainConfig(StepTrainingConfig):
    """Flow-matching pretraining. Defaults follow ReinFlow's pretraining (lr 1e-3 cosine to 1e-4, EMA 0.995)."""

    output_dir: str = option(
        "runs/pretrain", help="Run directory (metrics, plots, checkpoints, final policy)."
    )
    model: FlowPolicyConfig = option(default_factory=FlowPolicyConfig, help="The policy architecture.")
    data: DataConfig = option(default_factory=DataConfig, help="The training data.")
    batch_size: int = option(256, help="Pairs per optimizer step.")
    ema_decay: float = option(0.995, help="EMA decay of the weights used for eval/saving (0: off).")
    time_distribution: TimeDistribution = option(
        "uniform", help="Training-time distribution: uniform, logit_normal, beta (pi0) or u_shaped."
    )
    logit_mean: float = option(
        0.0, help="logit_normal: mean m of t = sigmoid(N(m, s)); m > 0 favours the data end."
    )
    logit_std: float = option(1.0, help="logit_normal: std s.")
    u_shape_a: float = option(
        4.0, help="u_shaped: a in p(t) ~ cosh(a (t - 1/2)); larger a, more mass at the ends."
    )
    shortcut_fraction: float = option(
        0.25,
        bounds="[0, 1)",  # part of every batch must stay plain flow matching: the shortcut's base case
        help="model.shortcut only: fraction of each batch trained with the self-consistency target (the "
        "rest: flow matching at step size 0). The shortcut paper uses 1/4.",
    )
    shortcut_max_steps: int = option(
        128,
        help="model.shortcut only: the finest grid, a power of 2 M: shortcut steps 1, 1/2, ..., 2/M are "
        "trained (sample with K = 1, 2, 4, ..., M/2); two flow steps of 1/M are the base case.",
    )
    eval_samples: int = option(
        2000,
        help="Held-out rows used per evaluation (unconditional data: half are the reference, half the floor).",
    )
    eval_num_steps: int | None = option(None, help="ODE steps at evaluation (null: model.num_steps).")
    eval_ode_method: OdeMethod = option("euler", help="ODE solver at evaluation: euler, heun or midpoint.")
    save_steps: int = option(1000, help="Write a resumable checkpoint every N steps (and at the end).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        max_steps = self.shortcut_max_steps
        if max_steps < 2 or max_steps & (max_steps - 1):
            lower = 1 << max(1, max_steps.bit_length() - 1)
            raise ValueError(
                f"shortcut_max_steps must be a power of 2 >= 2 (step sizes halve level by level), got "
                f"{max_steps}; use e.g. {lower} or {2 * lower}"
            )


class PretrainTrainer(StepLoopTrainer):
    """Flow matching on a :class:`FlowMatchingData` set; see the module docstring for outputs."""

    def __init__(self, config: PretrainConfig, data: FlowMatchingData | None = None):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.device = torch.device(config.device)
        # One generator drives batches, noise and times, so a resumed run replays exactly.
        self.generator = prepare_run(config.seed, config.num_threads)

        self.normalization = None
        if data is None:
            data, self.normalization = load_data(config.data, seed=config.seed, horizon=config.model.horizon)
        # The data file is named only for data this trainer loaded itself, and read again only on a mismatch.
        describe = (lambda: _data_description(config.data)) if self.normalization is not None else None
        check_model_matches_data(config.model, data, source=describe)
        train_data, eval_data = data.split(
            config.data.holdout_fraction, generator=torch.Generator().manual_seed(config.seed)
        )
        self.train_data = _to_device(train_data, self.device)
        self.eval_data = _to_device(eval_data, self.device)

        self.policy = FlowPolicy(config.model).to(self.device)
        # Flow matching trains the velocity network only; the ReinFlow noise network is fine-tuned later.
        self.setup_optimization(list(self.policy.velocity_net.parameters()))
        self.ema = EMA(self.policy, decay=config.ema_decay) if config.ema_decay > 0 else None
        self.step = 0

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, targets: torch.Tensor, conditions: torch.Tensor | None) -> torch.Tensor:
        """The training loss on one batch of data ``x1``, with fresh noise ``x0`` and times ``t``: flow
        matching, or for a shortcut policy the shortcut objective (:meth:`shortcut_loss`)."""
        if self.config.model.shortcut:
            return self.shortcut_loss(targets, conditions).loss
        noise = torch.randn(targets.shape, generator=self.generator).to(self.device)
        t = self._flow_matching_times(targets.shape[0])
        path = linear_path(noise, targets, t)
        return flow_matching_loss(self.policy.velocity(path.x_t, t, conditions), path.velocity)

    def _flow_matching_times(self, batch: int) -> torch.Tensor:
        return sample_training_times(
            batch,
            self.config.time_distribution,
            generator=self.generator,
            logit_mean=self.config.logit_mean,
            logit_std=self.config.logit_std,
            u_shape_a=self.config.u_shape_a,
        ).to(self.device)

    def shortcut_loss(self, targets: torch.Tensor, conditions: torch.Tensor | None) -> ShortcutLoss:
        """The shortcut-model objective (Frans et al. 2024, arXiv 2410.12557, eq. 5) on one batch.

        The first ``B - n`` rows (``n = floor(shortcut_fraction * B)``) are flow matching at ``d = 0``:
        ``|| s(x_t, t, 0) - (x1 - x0) ||^2`` with ``t ~ time_distribution``, exactly the plain loss. The last
        ``n`` rows are self-consistency: a shortcut step ``2d = 2^-j`` with ``j`` uniform in
        ``{0, ..., log2(shortcut_max_steps) - 1}``, ``t`` uniform on the multiples of ``2d`` in ``[0, 1 - 2d]``,
        and ``|| s(x_t, t, 2d) - sg(shortcut_target(x_t, t, d)) ||^2``. At the finest level (``d = 1 /
        shortcut_max_steps``) the two small steps query ``s(., ., 0)``, the flow-matched velocity, so every
        target rests on the flow-matching base case (see :func:`shortcut_target`). ``x_t`` uses the data's
        own (noise, data) pairs as flow matching does. The loss is the mean over all rows, so the two parts
        weigh by their row counts (as in the paper's code). One velocity call with gradients on all rows, two
        without on the self-consistency rows; every draw comes from the trainer's generator.
        """
        config, device = self.config, self.device
        batch = targets.shape[0]
        num_sc = int(config.shortcut_fraction * batch)
        num_fm = batch - num_sc
        noise = torch.randn(targets.shape, generator=self.generator).to(device)
        t_fm = self._flow_matching_times(num_fm)
        levels = int(math.log2(config.shortcut_max_steps))
        # Shortcut level j: one step of 2d = 2^-j against two steps of d = 2^-(j+1).
        level = torch.randint(levels, (num_sc,), generator=self.generator)
        # A start cell on the finest shortcut grid (2^(levels-1) cells), coarsened to level j's 2^j cells:
        # uniform over level j's starts, in integers, so the times are exact dyadic fractions.
        fine = torch.randint(1 << (levels - 1), (num_sc,), generator=self.generator)
        start = fine >> (levels - 1 - level)
        big = torch.pow(2.0, -level.float())
        t_sc = (start.float() * big).to(device)
        half = (0.5 * big).to(device)
        query = torch.where(level == levels - 1, 0.0, 0.5 * big).to(device)

        t = torch.cat([t_fm, t_sc])
        path = linear_path(noise, targets, t)
        target = path.velocity
        if num_sc:
            cond_sc = None if conditions is None else conditions[num_fm:]
            sc_target = shortcut_target(
                self.policy, path.x_t[num_fm:], t_sc, half, cond_sc, query_step_size=query
            )
            target = torch.cat([target[:num_fm], sc_target])
        step_size = torch.cat([torch.zeros(num_fm, device=device), big.to(device)])
        predicted = self.policy.velocity(path.x_t, t, conditions, step_size=step_size)
        per_row = (predicted - target).square().reshape(batch, -1).mean(1)
        return ShortcutLoss(
            loss=per_row.mean(),
            flow_matching=per_row[:num_fm].detach().mean(),
            self_consistency=per_row[num_fm:].detach().mean() if num_sc else per_row.new_zeros(()),
        )

    def update(self) -> dict[str, float]:
        """One optimizer step on a random batch (sampled with replacement)."""
        index = torch.randint(len(self.train_data), (self.config.batch_size,), generator=self.generator)
        batch = self.train_data.subset(index.to(self.device))
        if not self.config.model.shortcut:
            return self.optimizer_step(self.loss(batch.targets, batch.conditions), self.policy)
        parts = self.shortcut_loss(batch.targets, batch.conditions)
        metrics = self.optimizer_step(parts.loss, self.policy)
        metrics["train/fm_loss"] = parts.flow_matching.item()
        metrics["train/shortcut_loss"] = parts.self_consistency.item()
        return metrics

    # ------------------------------------------------------------------------------------ evaluation
    @property
    def eval_policy(self) -> FlowPolicy:
        """The weights used for evaluation and saving: the EMA if enabled."""
        return self.ema.model if self.ema is not None else self.policy

    def _reference_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two disjoint, equal halves of the held-out targets (flattened), at most ``eval_samples`` rows.

        Samples are compared with the second half; the first half measures how far a second, independent
        sample of the data lands at the same size (the floor any model can reach).
        """
        rows = min(len(self.eval_data), self.config.eval_samples)
        reference = self.eval_data.targets[:rows].reshape(rows, -1)
        half = rows // 2
        return reference[:half], reference[half : 2 * half]

    @torch.no_grad()
    def evaluate(self, *, plot_path: Path | None = None) -> dict[str, float]:
        """Held-out flow-matching loss, plus sample quality.

        Unconditional data: sliced W2 and MMD between ODE samples and held-out data (same sizes as the
        floor in :meth:`reference_distances`). Conditional data (behaviour cloning): mean squared error
        of the ODE action for each held-out condition. Fixed seeds make evaluations comparable.
        """
        config, policy = self.config, self.eval_policy
        g = torch.Generator().manual_seed(config.seed + 1)
        data = self.eval_data.subset(
            torch.arange(min(len(self.eval_data), config.eval_samples), device=self.device)
        )
        noise = torch.randn(data.targets.shape, generator=g).to(self.device)
        t = sample_training_times(len(data), "uniform", generator=g).to(self.device)
        path = linear_path(noise, data.targets, t)
        # A shortcut policy's flow is its d = 0 velocity (what its flow-matching part trains).
        step_size = {"step_size": 0.0} if config.model.shortcut else {}
        metrics = {
            "eval/fm_loss": flow_matching_loss(
                policy.velocity(path.x_t, t, data.conditions, **step_size), path.velocity
            ).item()
        }

        num_steps = config.model.num_steps if config.eval_num_steps is None else config.eval_num_steps
        metrics["eval/nfe"] = float(num_steps * nfe_per_step(config.eval_ode_method))
        if data.conditions is not None:
            actions = policy.act(
                data.conditions, num_steps=num_steps, method=config.eval_ode_method, generator=g
            )
            metrics["eval/action_mse"] = (actions - data.targets).square().mean().item()
            return metrics
        _, reference = self._reference_halves()
        samples = policy.act(
            batch_size=len(reference), num_steps=num_steps, method=config.eval_ode_method, generator=g
        ).reshape(len(reference), -1)
        metrics["eval/sliced_w2"] = _sliced_w2(samples, reference)
        metrics["eval/mmd"] = mmd_rbf(samples, reference).item()
        if plot_path is not None and samples.shape[1] == 2:
            from rlflow.utils.plotting import scatter_2d

            scatter_2d(
                samples.cpu(),
                reference.cpu(),
                plot_path,
                title=f"step {self.step}: sliced W2 {metrics['eval/sliced_w2']:.3f} (held-out data on the right)",
            )
        return metrics

    @torch.no_grad()
    def reference_distances(self) -> dict[str, float]:
        """Scale for the sliced W2: the data's own sampling floor, and the N(0, I) prior (an untrained model)."""
        first, second = self._reference_halves()
        prior = torch.randn(first.shape, generator=torch.Generator().manual_seed(self.config.seed + 2)).to(
            self.device
        )
        return {
            "sliced_w2_data_floor": _sliced_w2(first, second),
            "sliced_w2_prior": _sliced_w2(prior, second),
        }

    # ----------------------------------------------------------------------------------- checkpoints
    # save_checkpoint / resume are StepLoopTrainer's; these are the policy-specific parts.
    weights_name = "policy"
    summary_results = (
        ("sliced_w2", "final sliced W2 to held-out data"),
        ("sliced_w2_data_floor", "the data's own floor"),
        ("action_mse", "final held-out action MSE"),
        ("fm_loss", "held-out flow-matching loss"),
    )

    @property
    def trained_model(self) -> FlowPolicy:
        return self.policy

    def save_weights(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory, extra_json=self._extra_json())  # type: ignore[operator]

    def load_weights(self, directory: Path) -> tuple[FlowPolicy, dict[str, Any]]:
        saved = FlowPolicy.from_pretrained(directory)
        return saved, asdict(saved.config)

    def model_config_dict(self) -> dict[str, Any]:
        return asdict(self.config.model)

    def _extra_json(self) -> dict[str, Any]:
        """Files saved beside the weights: the data normalisation a robot policy must be run with."""
        return {} if self.normalization is None else {"normalization": self.normalization.to_dict()}

    # ----------------------------------------------------------------------------------------- train
    # The loop itself is StepLoopTrainer.train; these are its pretraining-specific parts.
    def evaluation_image(self, plots: Path, *, final: bool) -> Path:
        return plots / ("samples.png" if final else f"samples_step_{self.step:07d}.png")

    def periodic_evaluation(self, plots: Path) -> dict[str, float]:
        return self.evaluate(plot_path=self.evaluation_image(plots, final=False))

    def final_evaluation(self, plots: Path) -> dict[str, float]:
        return self.evaluate(plot_path=self.evaluation_image(plots, final=True))

    def final_outputs(self, final: dict[str, float]) -> dict[str, Any]:
        # The yardsticks first: the model card shows them next to the final metrics.
        distances = self.reference_distances() if self.eval_data.conditions is None else {}
        policy_dir = self.eval_policy.save_pretrained(
            self.output_dir / "policy",
            extra_json=self._extra_json(),
            card=self.model_card(final, **distances),
        )
        return {"policy_dir": str(policy_dir), **distances}


@dataclass
class ShortcutLoss:
    """The shortcut objective of one batch and its two parts (means over their rows; the parts detached)."""

    loss: torch.Tensor
    flow_matching: torch.Tensor
    self_consistency: torch.Tensor


@torch.no_grad()
def shortcut_target(
    policy: FlowPolicy,
    x_t: torch.Tensor,
    t: torch.Tensor,
    step_size: torch.Tensor,
    cond: torch.Tensor | None,
    *,
    query_step_size: torch.Tensor | None = None,
) -> torch.Tensor:
    """The self-consistency target of a shortcut step ``2d`` from ``(x_t, t)``: two steps of ``d``,

        v1 = s(x_t, t, d),   x' = x_t + d v1,   v2 = s(x', t + d, d),   target = (v1 + v2) / 2

    so that ``x_t + 2d * target`` is where the two small steps land. ``step_size`` is ``d`` (``[B]``);
    ``query_step_size`` (default ``d``) is the step size the network is *asked* at, which the trainer sets
    to 0 at the finest level so the smallest steps are flow (Euler) steps. Computed without gradients
    (a stop-gradient target).
    """
    query = step_size if query_step_size is None else query_step_size
    d = step_size.reshape(-1, *([1] * (x_t.ndim - 1)))
    first = policy.velocity(x_t, t, cond, step_size=query)
    second = policy.velocity(x_t + d * first, t + step_size, cond, step_size=query)
    return 0.5 * (first + second)


def load_data(
    config: DataConfig, *, seed: int, horizon: int
) -> tuple[FlowMatchingData, Normalization | None]:
    """The dataset, and for demonstrations the normalisation that must be saved with the policy."""
    if config.source == "toy_2d":
        return toy_2d_data(config.toy_name, config.num_samples, seed=seed), None
    try:
        if config.source == "demonstrations":
            from rlflow.data.demonstrations import bc_data_from_demonstrations

            return bc_data_from_demonstrations(config.path, horizon)
        data = load_npz_data(config.path, target_key=config.target_key, condition_key=config.condition_key)
        return data, None
    except (FileNotFoundError, KeyError, ValueError) as error:  # bad data is a config problem: no traceback
        raise ConfigError(f"data.path={config.path!r}: {error}") from None


def _data_description(data: DataConfig) -> str:
    """``data.path='x.npz' (demonstrations of Hopper-v5)`` for error messages (the task from the file's metadata)."""
    described = f"data.path={data.path!r}"
    if data.source == "demonstrations":
        from rlflow.data.demonstrations import Demonstrations

        task = Demonstrations.load_npz(data.path).metadata.get("gym_id")
        if task:
            described += f" (demonstrations of {task})"
    return described


def check_model_matches_data(
    model: FlowPolicyConfig, data: FlowMatchingData, *, source: Callable[[], str] | None = None
) -> None:
    """Fail before training when the policy's shapes cannot fit the data (naming the fields to set, and the
    file the data came from when ``source`` describes it: called only on a mismatch, since it may read the file)."""
    expected = {"horizon": data.event_shape[0], "act_dim": data.event_shape[1], "obs_dim": data.obs_dim}
    wrong = {name: value for name, value in expected.items() if getattr(model, name) != value}
    if wrong:
        fix = ", ".join(f"model.{name}: {value}" for name, value in wrong.items())
        have = ", ".join(f"model.{name}={getattr(model, name)}" for name in wrong)
        data_is = ", ".join(f"{name} {value}" for name, value in wrong.items())
        if source is None:
            raise ConfigError(f"the policy does not match the data ({have}); set {fix}")
        raise ConfigError(
            f"the policy does not match the data in {source()}, which has {data_is} ({have}); set {fix}, or point "
            "data.path at demonstrations of the task this policy is for"
        )


def _sliced_w2(x: torch.Tensor, y: torch.Tensor) -> float:
    # Fixed projections: every evaluation and the reference numbers use the same directions.
    return sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(0)).item()


def _to_device(data: FlowMatchingData, device: torch.device) -> FlowMatchingData:
    conditions = None if data.conditions is None else data.conditions.to(device)
    return FlowMatchingData(data.targets.to(device), conditions)


def train(config: PretrainConfig) -> dict[str, Any]:
    """CLI entry point: ``rlflow pretrain --config recipe.yaml``."""
    return PretrainTrainer(config).train()
