"""Exponential moving average (EMA) of a model's parameters."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA"]

logger = logging.getLogger(__name__)


class EMA:
    """Keeps ``ema = decay * ema + (1 - decay) * param`` for every parameter; buffers are copied.

    Args:
        model: the model being trained. A frozen deep copy is made; pass the *unwrapped* module
            (not a DDP / ``torch.compile`` wrapper) so parameter order and names match later updates.
        decay: the EMA decay in ``[0, 1]``.
        warmup: if true the effective decay of the ``n``-th update (``n`` = number of updates done
            before it, starting at 0) is ``min(decay, (1 + n) / (10 + n))``, so early, poorly trained
            weights are forgotten quickly.

    Attributes:
        model: the averaged model, in eval mode with ``requires_grad=False``; use it for inference and
            save ``ema.model.state_dict()`` as the EMA weights.
        num_updates: how many times :meth:`update` was called.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.model: nn.Module = copy.deepcopy(model).eval().requires_grad_(False)
        self._refresh_views()

    def _refresh_views(self) -> None:
        """Cache the EMA model's tensors in ``parameters()`` / ``buffers()`` order (once, not per update)."""
        params = list(self.model.parameters())
        # _foreach_lerp_ needs floating tensors; integer parameters (rare) are copied instead.
        self._float_idx = [i for i, p in enumerate(params) if p.is_floating_point() or p.is_complex()]
        self._other_idx = [i for i, p in enumerate(params) if not (p.is_floating_point() or p.is_complex())]
        self._params = params
        self._buffers = list(self.model.buffers())

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current parameters and copy its buffers.

        ``model`` must have the same architecture (same parameter order, shapes, dtypes, devices) as the
        model the EMA was created from.
        """
        src_params = [p.detach() for p in model.parameters()]
        src_buffers = [b.detach() for b in model.buffers()]
        if len(src_params) != len(self._params) or len(src_buffers) != len(self._buffers):
            raise ValueError(
                f"model has {len(src_params)} parameters / {len(src_buffers)} buffers but the EMA tracks "
                f"{len(self._params)} / {len(self._buffers)}; update the EMA with the model it was built from"
            )
        weight = 1.0 - self.current_decay()
        if self._float_idx:
            # One fused multi-tensor kernel instead of a Python loop over parameters:
            # ema += weight * (param - ema)  ==  decay * ema + (1 - decay) * param.
            torch._foreach_lerp_(
                [self._params[i] for i in self._float_idx], [src_params[i] for i in self._float_idx], weight
            )
        for i in self._other_idx:
            self._params[i].copy_(src_params[i])
        if self._buffers:
            # Buffers (e.g. BatchNorm running stats) are not averaged: the latest values are the right ones.
            torch._foreach_copy_(self._buffers, src_buffers)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the EMA ones (e.g. for evaluation)."""
        model.load_state_dict(self.model.state_dict(), strict=True)

    def to(self, *args: Any, **kwargs: Any) -> EMA:
        """Move the EMA model like ``nn.Module.to`` (it must match the trained model's device/dtype)."""
        self.model.to(*args, **kwargs)
        self._refresh_views()
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "warmup", "num_updates", "model": EMA weights}``; loadable with ``weights_only=True``."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "model": self.model.state_dict(),  # shares storage, like nn.Module.state_dict()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the EMA weights and update counter.

        ``decay`` / ``warmup`` stay as constructed (the current config is the source of truth); a
        differing saved value is reported with a warning.
        """
        if float(state["decay"]) != self.decay or bool(state["warmup"]) != self.warmup:
            logger.warning(
                "EMA state was saved with decay=%s warmup=%s; continuing with the configured decay=%s warmup=%s",
                state["decay"],
                state["warmup"],
                self.decay,
                self.warmup,
            )
        weights: dict[str, Tensor] = state["model"]
        self.model.load_state_dict(weights, strict=True)
        self.num_updates = int(state["num_updates"])
