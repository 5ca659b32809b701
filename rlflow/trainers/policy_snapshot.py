"""A lagging copy of the trained parameters that can be swapped into the model (rollout / old policies).

DiffusionNFT samples from an *old* policy (a soft copy of the trained weights); Flow-RWR can sample from a
*frozen* rollout policy refreshed every few iterations (``rlflow rwr --rollout_refresh_iterations N``). Both
keep a copy of only the trainable tensors (LoRA adapters, or the whole transformer: this rank's shards under
ZeRO-2) and swap it into the live parameters for the duration of a block, restoring the trained values bit
for bit afterwards, so there is one model in memory and no second module to keep in sync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


class PolicySnapshot:
    """A copy of ``tensors`` (the live trainable parameters) that :meth:`swapped_in` puts in their place."""

    def __init__(self, tensors: Sequence[Tensor]):
        self.live = list(tensors)
        self.values = [tensor.detach().clone() for tensor in self.live]
        self._stash = [torch.empty_like(tensor) for tensor in self.live]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the live parameters hold the snapshot's values (restored bit for bit)."""
        with torch.no_grad():
            torch._foreach_copy_(self._stash, self.live)
            torch._foreach_copy_(self.live, self.values)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, self._stash)

    @torch.no_grad()
    def update(self, decay: float = 0.0) -> None:
        """``snapshot <- decay * snapshot + (1 - decay) * live`` (``decay = 0``: an exact copy)."""
        soft_update_(self.values, self.live, decay)

    def state(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The snapshot by parameter name (``names`` in the order of the live tensors), for checkpoints."""
        return {name: value.clone() for name, value in zip(names, self.values, strict=True)}

    @torch.no_grad()
    def load_state(self, state: dict[str, Tensor], names: Sequence[str]) -> bool:
        """Restore from :meth:`state`; ``False`` (nothing changed) when the names do not match."""
        if set(state) != set(names):
            return False
        for name, value in zip(names, self.values, strict=True):
            value.copy_(state[name])
        return True


@torch.no_grad()
def soft_update_(old: Sequence[Tensor], new: Sequence[Tensor], decay: float) -> None:
    """In place ``old <- decay * old + (1 - decay) * new`` (``decay = 0``: an exact copy)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    for target, source in zip(old, new, strict=True):
        if decay == 0.0:
            target.copy_(source)
        else:
            target.mul_(decay).add_(source.to(target), alpha=1.0 - decay)
