"""Built-in 2-D toy distributions (for flow-matching demos and tests); all sampling is vectorised."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Toy2D = Literal["eight_gaussians", "checkerboard", "two_moons"]
TOY_2D_NAMES: tuple[str, ...] = ("eight_gaussians", "checkerboard", "two_moons")


def sample_toy_2d(name: Toy2D, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``[num_samples, 2]`` points from a named 2-D distribution (roughly within [-4, 4]^2).

    - ``eight_gaussians``: 8 isotropic Gaussians (std 0.2) on a circle of radius 2.8 (scaled unit circle).
    - ``checkerboard``: uniform on the black squares of a 4x4 board on [-4, 4]^2.
    - ``two_moons``: two interleaved half circles with Gaussian jitter (std 0.1), scaled by 2.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if name == "eight_gaussians":
        component = torch.randint(0, 8, (num_samples,), generator=generator)
        angle = component.float() * (2.0 * math.pi / 8.0)
        centres = 2.8 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return centres + 0.2 * torch.randn(num_samples, 2, generator=generator)
    if name == "checkerboard":
        # x uniform on [-4, 4); y on one of the two unit squares of its column that are "black".
        x = torch.rand(num_samples, generator=generator) * 8.0 - 4.0
        y = (
            torch.rand(num_samples, generator=generator) * 2.0
            - 4.0
            + 4.0 * torch.randint(0, 2, (num_samples,), generator=generator)
        )
        y = y + (torch.floor(x / 2.0).long() % 2).float() * 2.0
        return torch.stack([x, y], dim=1)
    if name == "two_moons":
        upper = torch.rand(num_samples, generator=generator) < 0.5
        angle = torch.rand(num_samples, generator=generator) * math.pi
        x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
        y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
        points = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.0
        return points + 0.1 * torch.randn(num_samples, 2, generator=generator)
    raise ValueError(f"unknown toy distribution {name!r}; choose one of {', '.join(TOY_2D_NAMES)}")
