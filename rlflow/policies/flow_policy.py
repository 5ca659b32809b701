"""FlowPolicy: a velocity MLP over action chunks, a step kernel, and one time grid.

Actions are chunks ``[B, horizon, act_dim]`` conditioned on an observation vector ``[B, obs_dim]``
(``obs_dim = 0`` gives an unconditional generator, e.g. the 2-D toy). Sampling returns a
:class:`~rlflow.flows.Trajectory` whose chain can be re-scored exactly by :meth:`FlowPolicy.log_prob`.

With ``shortcut=True`` the policy is a shortcut model (Frans et al. 2024, arXiv 2410.12557): the network is
``s(x_t, t, d)``, also conditioned on the step size ``d``, and predicts the average velocity over
``[t, t + d]`` (``d = 0``: the instantaneous flow velocity). Sampling, acting and re-scoring on a K-step
grid query it at ``d = 1 / K``; the shared samplers and kernels still see a plain
``velocity(x, t, cond)`` model (see :class:`StepSizeVelocity`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rlflow.config import option, validate_config
from rlflow.flows import (
    ChainScores,
    Trajectory,
    gaussian_entropy,
    make_kernel,
    sample_chain,
    score_chain,
    standard_normal,
    time_grid,
)
from rlflow.flows.kernels import KernelName
from rlflow.flows.solvers import OdeMethod, integrate_ode
from rlflow.policies.actor import ActorOutput
from rlflow.policies.networks import MLP, Activation, SinusoidalTimeEmbedding
from rlflow.policies.noise import BoundedNoiseStd
from rlflow.policies.pretrained import PretrainedMixin

logger = logging.getLogger(__name__)


@dataclass
class FlowPolicyConfig:
    """Architecture and sampler of a :class:`FlowPolicy` (saved as ``config.json``)."""

    act_dim: int = option(2, help="Action (or sample) dimension per chunk element.")
    horizon: int = option(1, help="Action chunk length: the policy emits [horizon, act_dim] per call.")
    obs_dim: int = option(0, help="Observation/condition dimension; 0 for an unconditional model.")
    hidden_dims: list[int] = option(
        default_factory=lambda: [256, 256, 256], help="Hidden widths of the velocity MLP."
    )
    residual: bool = option(True, help="Residual connections between equal-width hidden layers.")
    activation: Activation = option("mish", help="Hidden activation of the velocity MLP.")
    time_embed_dim: int = option(32, help="Size of the sinusoidal time embedding.")
    num_steps: int = option(4, help="Default number of denoising steps K when sampling.")
    time_shift: float = option(1.0, help="SD3-style grid shift (1 = uniform grid t_k = k/K).")
    kernel: KernelName = option(
        "reinflow", help="Stochastic step used for sampling chains: reinflow, flow_sde, cps or euler."
    )
    noise_level: float = option(0.7, help="Noise level a of the flow_sde / cps kernels.")
    min_std: float = option(0.1, help="ReinFlow noise: lower bound of the per-step std.")
    max_std: float = option(0.24, help="ReinFlow noise: upper bound of the per-step std.")
    noise_hidden_dims: list[int] = option(
        default_factory=lambda: [64, 64], help="Hidden widths of the ReinFlow noise network (tanh)."
    )
    shortcut: bool = option(
        False,
        help="Shortcut model (arXiv 2410.12557): the velocity network also takes the step size d and is "
        "queried at d = 1/K on a K-step grid (needs time_shift 1 and the reinflow or euler kernel); train it "
        "with `rlflow pretrain` (shortcut_fraction, shortcut_max_steps).",
    )

    def __post_init__(self) -> None:
        validate_config(self)
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even (sin and cos pairs), got {self.time_embed_dim}")
        if not 0 < self.min_std <= self.max_std:
            raise ValueError(
                f"need 0 < min_std <= max_std, got min_std={self.min_std}, max_std={self.max_std}"
            )
        if self.kernel == "cps" and not 0 < self.noise_level <= 1:
            raise ValueError(f"noise_level must be in (0, 1] for the cps kernel, got {self.noise_level}")
        if self.kernel == "flow_sde" and self.noise_level <= 0:
            raise ValueError(f"noise_level must be > 0 for the flow_sde kernel, got {self.noise_level}")
        if self.shortcut and self.time_shift != 1.0:
            raise ValueError(
                f"shortcut=True needs the uniform grid t_k = k/K (one step size d = 1/K), got "
                f"time_shift={self.time_shift}; set time_shift: 1.0 or shortcut: false"
            )
        if self.shortcut and self.kernel in ("flow_sde", "cps"):
            # Both kernels read the data/noise predictions x + (1 - t) v and x - t v off an INSTANTANEOUS
            # velocity; a shortcut s(x, t, d) is an average over [t, t + d], so their formulas do not hold.
            raise ValueError(
                f"kernel={self.kernel!r} assumes an instantaneous velocity, which a shortcut model's "
                "s(x, t, d) is not; use kernel: reinflow or euler with shortcut: true"
            )


class FlowPolicy(PretrainedMixin, nn.Module):
    """Velocity network + step kernel + grid. Implements :class:`~rlflow.flows.VelocityModel`."""

    config_class = FlowPolicyConfig
    model_type = "rlflow.FlowPolicy"
    card_summary = (
        "A flow-matching policy (`FlowPolicy`): a velocity network whose ODE (or the stochastic steps of "
        "its kernel) carries Gaussian noise to actions in `num_steps` steps."
    )
    card_tags = ("flow-matching",)

    def __init__(self, config: FlowPolicyConfig):
        super().__init__()
        self.config = config
        self.event_shape = (config.horizon, config.act_dim)
        action_numel = config.horizon * config.act_dim
        self.time_embedding = SinusoidalTimeEmbedding(config.time_embed_dim)
        # Shortcut models embed the step size d itself (not log2 d) with the same sinusoidal features as t:
        # d lies in [0, 1] like t, so the same frequencies fit, and d = 0 (the instantaneous flow, the
        # flow-matching base case) is an ordinary finite input, where log2 d would be -inf and need a
        # special token. The lowest frequencies are monotone on [0, 1], so distinct d get distinct
        # features; the dyadic levels 1, 1/2, ..., 1/64 stay apart through the faster ones. The embedding
        # has no parameters, so the state-dict keys are those of a plain policy (only the input layer is wider).
        self.step_embedding = SinusoidalTimeEmbedding(config.time_embed_dim) if config.shortcut else None
        step_features = config.time_embed_dim if config.shortcut else 0
        self.velocity_net = MLP(
            action_numel + config.obs_dim + config.time_embed_dim + step_features,
            action_numel,
            config.hidden_dims,
            activation=config.activation,
            residual=config.residual,
        )
        # The noise network always exists (it is tiny) so a checkpoint loads whichever kernel a later run
        # picks; only the reinflow kernel uses it.
        self.noise_std = BoundedNoiseStd(
            config.obs_dim,
            self.event_shape,
            hidden_dims=config.noise_hidden_dims,
            min_std=config.min_std,
            max_std=config.max_std,
        )
        self.kernel = make_kernel(config.kernel, noise_level=config.noise_level, noise_std=self.noise_std)

    # ----------------------------------------------------------------------------------------- model
    def velocity(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor | None = None,
        step_size: Tensor | float | None = None,
    ) -> Tensor:
        """``x: [B, horizon, act_dim]``, ``t: [B]``, ``cond: [B, obs_dim]`` -> velocity like ``x``.

        ``step_size`` (``[B]`` or a scalar) is the shortcut step ``d``: required for shortcut policies
        (``0`` gives the instantaneous flow velocity, ``1/K`` the step of a K-step grid), and must be
        ``None`` for plain ones.
        """
        self._check_inputs(x, cond)
        batch = x.shape[0]
        features = [self.time_embedding(t.expand(batch))]
        if self.step_embedding is not None:
            if step_size is None:
                raise ValueError(
                    "this is a shortcut policy (shortcut=True): velocity() needs step_size, the step d of "
                    "the grid (1/K for K steps; 0 for the instantaneous flow velocity)"
                )
            d = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
            if d.ndim > 1 or (d.ndim == 1 and d.shape[0] not in (1, batch)):
                raise ValueError(f"step_size must be a scalar or [B] = [{batch}], got shape {tuple(d.shape)}")
            features.append(self.step_embedding(d.expand(batch)))
        elif step_size is not None:
            raise ValueError(
                "step_size is only for shortcut policies (shortcut=True); this policy's velocity does not "
                "depend on the step size, so call velocity(x, t, cond)"
            )
        return self._velocity_net(x, cond, features)

    def _velocity_net(self, x: Tensor, cond: Tensor | None, features: list[Tensor]) -> Tensor:
        """The velocity MLP on ``[x, cond, *features]`` (``features``: the time (and step) embeddings)."""
        parts = [x.reshape(x.shape[0], -1)]
        if self.config.obs_dim:
            parts.append(cond)
        return self.velocity_net(torch.cat([*parts, *features], dim=-1)).reshape(x.shape)

    def chain_velocity(self, times: Tensor, cond: Tensor | None = None) -> Callable[[Tensor, int], Tensor]:
        """``(x, k) -> velocity(x, times[k], cond)`` for the steps of one chain (what ``sample_chain`` calls).

        The grid's time embeddings are computed once per chain instead of once per step: the same
        values (elementwise sin/cos of the same times), so the same velocities bit for bit.
        """
        if self.step_embedding is not None:  # velocity() names the missing step size
            return lambda x, k: self.velocity(x, times[k].expand(x.shape[0]), cond)
        embeddings = self.time_embedding(times[:-1])  # [K, time_embed_dim]

        def at_step(x: Tensor, k: int) -> Tensor:
            self._check_inputs(x, cond)
            return self._velocity_net(x, cond, [embeddings[k].expand(x.shape[0], -1)])

        return at_step

    def velocity_model(self, times: Tensor) -> Any:
        """The :class:`~rlflow.flows.VelocityModel` that samples / scores on the grid ``times``: the policy
        itself, or for a shortcut policy a :class:`StepSizeVelocity` at the grid's step ``d = 1/K``.

        Sampling, acting and re-scoring all go through here, so a chain is re-scored with the ``d`` it
        was sampled with (``d`` depends only on ``K``, which the stored chain fixes).
        """
        if not self.config.shortcut:
            return self
        return StepSizeVelocity(self, uniform_step_size(times))

    def _check_inputs(self, x: Tensor, cond: Tensor | None) -> None:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"action chunk shape {tuple(x.shape[1:])} does not match the policy's "
                f"[horizon, act_dim] = {list(self.event_shape)}"
            )
        if self.config.obs_dim:
            if cond is None or cond.ndim != 2 or cond.shape[1] != self.config.obs_dim:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(
                    f"observation shape {got} does not match the policy's obs_dim={self.config.obs_dim}; "
                    "pass observations of shape [B, obs_dim] (check the environment and the policy config)"
                )
            if cond.shape[0] != x.shape[0]:
                raise ValueError(f"batch sizes differ: actions {x.shape[0]} vs observations {cond.shape[0]}")
        elif cond is not None:
            raise ValueError("this policy is unconditional (obs_dim=0) but an observation was passed")

    def grid(self, num_steps: int | None = None, device: torch.device | str | None = None) -> Tensor:
        """The time grid ``[K+1]`` used for sampling AND re-scoring."""
        num_steps = self.config.num_steps if num_steps is None else num_steps
        return time_grid(num_steps, shift=self.config.time_shift, device=device)

    def _parameter(self) -> Tensor:
        """A parameter whose device and dtype are the policy's (one attribute look-up, where
        ``next(self.parameters())`` walks the module tree on every decision)."""
        return self.velocity_net.output.weight

    def _device(self) -> torch.device:
        return self._parameter().device

    def _initial_noise(self, batch: int, generator: torch.Generator | None) -> Tensor:
        parameter = self._parameter()
        shape = (batch, *self.event_shape)
        return standard_normal(shape, generator=generator, device=parameter.device, dtype=parameter.dtype)

    def _batch_size(self, obs: Tensor | None, batch_size: int | None) -> int:
        if obs is not None:
            return obs.shape[0]
        if batch_size is None:
            raise ValueError("pass batch_size when sampling an unconditional policy (no observations)")
        return batch_size

    # -------------------------------------------------------------------------------------- sampling
    def sample(
        self,
        obs: Tensor | None = None,
        *,
        batch_size: int | None = None,
        num_steps: int | None = None,
        deterministic: bool = False,
        stochastic_steps: Tensor | None = None,
        generator: torch.Generator | None = None,
        requires_grad: bool = False,
    ) -> Trajectory:
        """Sample a chain per observation: ``chain [B, K+1, horizon, act_dim]``, ``log_probs [B, K]``."""
        batch = self._batch_size(obs, batch_size)
        device = self._device()
        x_init = self._initial_noise(batch, generator)
        with torch.set_grad_enabled(requires_grad):
            times = self.grid(num_steps, device=device)
            return sample_chain(
                self.velocity_model(times),
                self.kernel,
                x_init,
                times,
                obs,
                stochastic_steps=stochastic_steps,
                deterministic=deterministic,
                generator=generator,
            )

    def score(self, traj: Trajectory, steps=None) -> ChainScores:
        """Re-score a stored chain (means, stds, log-probs) on its own grid."""
        return score_chain(self.velocity_model(traj.times), self.kernel, traj, steps=steps)

    def log_prob(self, traj: Trajectory) -> Tensor:
        """Per-step log-probs ``[B, K]`` of a stored chain under the current parameters."""
        return self.score(traj).log_probs

    def act(
        self,
        obs: Tensor | None = None,
        *,
        batch_size: int | None = None,
        num_steps: int | None = None,
        method: OdeMethod = "euler",
        generator: torch.Generator | None = None,
        requires_grad: bool = False,
    ) -> Tensor:
        """Deterministic actions ``[B, horizon, act_dim]``: the ODE from sampled noise, no injected noise
        (evaluation; with ``requires_grad`` for regularisers such as ReinFlow's W2 term)."""
        batch = self._batch_size(obs, batch_size)
        device = self._device()
        x_init = self._initial_noise(batch, generator)
        times = self.grid(num_steps, device=device)
        with torch.set_grad_enabled(requires_grad):
            return integrate_ode(self.velocity_model(times), x_init, times, obs, method=method)

    # -------------------------------------------------------------------------- actor (PPO) interface
    def explore(self, obs: Tensor, *, generator: torch.Generator | None = None) -> ActorOutput:
        """ReinFlow exploration: the whole denoising chain is the "action" PPO scores."""
        traj = self.sample(obs, generator=generator)
        return ActorOutput(action=traj.sample, record=traj.chain, log_prob=traj.log_probs.sum(dim=1))

    def evaluate_actions(self, obs: Tensor, record: Tensor) -> tuple[Tensor, Tensor]:
        """Chain log-prob ``[N]`` (sum over steps; the initial-noise term cancels in ratios and is left out)
        and the chain's noise entropy ``[N]`` (sum of the Gaussian step entropies), on the sampling grid."""
        num_steps = record.shape[1] - 1
        traj = Trajectory(
            chain=record,
            log_probs=record.new_zeros(record.shape[0], num_steps),
            times=self.grid(num_steps, device=record.device),
            stochastic_steps=torch.full((num_steps,), self.kernel.stochastic, dtype=torch.bool),
            cond=obs,
        )
        scores = self.score(traj)
        return scores.log_probs.sum(dim=1), gaussian_entropy(scores.stds)

    def deterministic_action(
        self, obs: Tensor, *, generator: torch.Generator | None = None, requires_grad: bool = False
    ) -> Tensor:
        return self.act(obs, generator=generator, requires_grad=requires_grad)

    def stochastic_elements(self) -> int:
        return self.config.num_steps * self.config.horizon * self.config.act_dim


class StepSizeVelocity:
    """A shortcut policy seen as a plain :class:`~rlflow.flows.VelocityModel` at one step size ``d``.

    The shared samplers, kernels and ODE solvers call ``model.velocity(x, t, cond)``; this adapter adds
    ``step_size=d``. ``d`` is a Python float, so sampling and re-scoring feed bit-identical inputs.
    """

    def __init__(self, policy: FlowPolicy, step_size: float):
        self.policy = policy
        self.step_size = step_size

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.policy.velocity(x, t, cond, step_size=self.step_size)


def uniform_step_size(times: Tensor) -> float:
    """The step ``d = 1/K`` of a uniform ``[K+1]`` grid; raises if the grid is not uniform (a shortcut
    policy is only defined for one step size per chain)."""
    num_steps = times.shape[0] - 1
    if num_steps < 1:
        raise ValueError(f"a time grid needs at least 2 points, got {times.shape[0]}")
    step = 1.0 / num_steps
    gaps = times.detach().to("cpu", torch.float64).diff()
    if not torch.allclose(gaps, torch.full_like(gaps, step), rtol=0.0, atol=1e-6):
        raise ValueError(
            f"a shortcut policy samples and scores on the uniform grid t_k = k/K only; got times "
            f"{times.tolist()} (was the chain sampled with time_shift != 1?)"
        )
    return step


__all__ = ["FlowPolicy", "FlowPolicyConfig", "StepSizeVelocity", "uniform_step_size"]
