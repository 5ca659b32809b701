"""Deterministic ODE solvers for evaluation (the ODE ``dx/dt = v(x, t)`` from noise at t=0 to data at t=1).

Training chains use the step kernels; evaluation often wants a higher-order solver at the same number of
velocity evaluations (NFE). Heun and midpoint cost 2 NFE per step and are second order.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from rlflow.flows.gaussian import standard_normal
from rlflow.flows.paths import expand_time
from rlflow.flows.sampling import VelocityModel

OdeMethod = Literal["euler", "heun", "midpoint"]


def integrate_ode(
    model: VelocityModel, x_init: Tensor, times: Tensor, cond: Any = None, *, method: OdeMethod = "euler"
) -> Tensor:
    """Integrate from ``x_init: [B, ...]`` along ``times: [K+1]``; returns the final state ``[B, ...]``.

    - ``euler``: ``x' = x + dt v(x, t)`` (1 NFE/step)
    - ``heun``: ``x~ = x + dt v(x, t)``, ``x' = x + dt/2 (v(x, t) + v(x~, t'))`` (2 NFE/step)
    - ``midpoint``: ``x' = x + dt v(x + dt/2 v(x, t), t + dt/2)`` (2 NFE/step)
    """
    if method not in ("euler", "heun", "midpoint"):
        raise ValueError(f"unknown ODE method {method!r}; choose euler, heun or midpoint")
    batch = x_init.shape[0]
    x = x_init
    for k in range(times.shape[0] - 1):
        t, t_next = times[k].expand(batch), times[k + 1].expand(batch)
        dt = expand_time(t_next - t, x)
        v = model.velocity(x, t, cond)
        if method == "euler":
            x = x + dt * v
        elif method == "heun":
            v_next = model.velocity(x + dt * v, t_next, cond)
            x = x + 0.5 * dt * (v + v_next)
        else:
            t_mid = 0.5 * (t + t_next)
            x = x + dt * model.velocity(x + 0.5 * dt * v, t_mid, cond)
    return x


def nfe_per_step(method: OdeMethod) -> int:
    """Velocity evaluations per step of ``method``."""
    return 1 if method == "euler" else 2


@torch.no_grad()
def sample_ode(
    model: VelocityModel,
    shape: tuple[int, ...],
    times: Tensor,
    cond: Any = None,
    *,
    method: OdeMethod = "euler",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``x_0 ~ N(0, I)`` of ``shape`` and integrate it (no gradients): evaluation sampling."""
    x_init = standard_normal(shape, generator=generator, device=device)
    return integrate_ode(model, x_init, times.to(x_init.device), cond, method=method)
