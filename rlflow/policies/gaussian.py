"""A diagonal-Gaussian MLP policy over action chunks: the PPO baseline and the behaviour-policy trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlflow.config import option, validate_config
from rlflow.flows.gaussian import gaussian_entropy, gaussian_log_prob, standard_normal
from rlflow.policies.actor import ActorOutput
from rlflow.policies.networks import MLP, Activation
from rlflow.policies.pretrained import PretrainedMixin


@dataclass
class GaussianPolicyConfig:
    """Architecture of a :class:`GaussianPolicy` (saved as ``config.json``)."""

    obs_dim: int = option(11, help="Observation dimension.")
    act_dim: int = option(3, help="Action dimension.")
    horizon: int = option(1, help="Action chunk length.")
    hidden_dims: list[int] = option(default_factory=lambda: [64, 64], help="Hidden widths of the mean MLP.")
    activation: Activation = option("tanh", help="Hidden activation.")
    init_log_std: float = option(-0.5, help="Initial log std (state-independent, one per action element).")

    def __post_init__(self) -> None:
        validate_config(self)


class GaussianPolicy(PretrainedMixin, nn.Module):
    """``a ~ N(mu(s), diag(exp(log_std)^2))`` with a state-independent learned ``log_std`` (as SB3's PPO)."""

    config_class = GaussianPolicyConfig
    model_type = "rlflow.GaussianPolicy"
    card_summary = "A Gaussian MLP policy (`GaussianPolicy`, the PPO baseline): a mean network and a learned std."
    card_tags = ("gaussian-policy",)

    def __init__(self, config: GaussianPolicyConfig):
        super().__init__()
        self.config = config
        self.event_shape = (config.horizon, config.act_dim)
        self.mean_net = MLP(
            config.obs_dim, config.horizon * config.act_dim, config.hidden_dims, activation=config.activation
        )
        # Small initial mean outputs keep early actions near the middle of the [-1, 1] action box.
        nn.init.orthogonal_(self.mean_net.output.weight, gain=0.01)
        nn.init.zeros_(self.mean_net.output.bias)
        self.log_std = nn.Parameter(torch.full(self.event_shape, float(config.init_log_std)))

    def mean(self, obs: Tensor) -> Tensor:
        if obs.ndim != 2 or obs.shape[1] != self.config.obs_dim:
            raise ValueError(
                f"observation shape {tuple(obs.shape)} does not match the policy's obs_dim={self.config.obs_dim}; "
                "pass [N, obs_dim] (check the environment and the policy config)"
            )
        return self.mean_net(obs).reshape(obs.shape[0], *self.event_shape)

    def explore(self, obs: Tensor, *, generator: torch.Generator | None = None) -> ActorOutput:
        mean, std = self.mean(obs), self.log_std.exp()
        action = mean + std * standard_normal(
            mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
        )
        return ActorOutput(action=action, record=action, log_prob=gaussian_log_prob(action, mean, std))

    def evaluate_actions(self, obs: Tensor, record: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = self.mean(obs), self.log_std.exp()
        return gaussian_log_prob(record, mean, std), gaussian_entropy(std.expand_as(mean))

    def deterministic_action(
        self, obs: Tensor, *, generator: torch.Generator | None = None, requires_grad: bool = False
    ) -> Tensor:
        with torch.set_grad_enabled(requires_grad):
            return self.mean(obs)

    def stochastic_elements(self) -> int:
        return self.config.horizon * self.config.act_dim


class ValueNetwork(nn.Module):
    """``V(s)``: an MLP critic on (normalised) observations ``[N, obs_dim] -> [N]``."""

    def __init__(self, obs_dim: int, hidden_dims: list[int], activation: Activation = "tanh"):
        super().__init__()
        self.obs_dim = obs_dim
        self.net = MLP(obs_dim, 1, hidden_dims, activation=activation)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs).squeeze(-1)
