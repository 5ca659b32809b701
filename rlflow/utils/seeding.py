"""Seeding and exact RNG-state capture/restore for bit-reproducible resumption.

:func:`capture_rng_state` stores every state as types that ``torch.load(weights_only=True)`` accepts
(tensors, ints, floats, strings, lists, dicts), so it can go straight into
:func:`rlflow.utils.checkpoint.save_training_state`.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "prepare_run", "restore_rng_state", "seed_everything"]

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device).

    Note: this does not make CUDA kernels deterministic (see ``torch.use_deterministic_algorithms``) and
    cannot change Python's hash seed, which is fixed at interpreter start (``PYTHONHASHSEED``).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        # numpy's legacy seeding only accepts [0, 2**32); reject rather than silently wrapping.
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices (lazily, if CUDA gets initialised later)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def prepare_run(seed: int, num_threads: int | None = None) -> torch.Generator:
    """A trainer's start: torch threads (if given), every global RNG seeded, and the trainer's own
    generator (checkpointed with the run so a resume replays the same draws)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    seed_everything(seed)
    return torch.Generator().manual_seed(seed)


def capture_rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Snapshot Python, numpy (global), torch CPU, CUDA (if available) and the given generators.

    Returns:
        ``{"python": {...}, "numpy": {...}, "torch": uint8 Tensor, "cuda": list[uint8 Tensor],
        "generators": list[uint8 Tensor]}``; every leaf is a tensor or Python scalar/string.
    """
    version, mt_state, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            # 625 words < 2**32 each: int64 tensor is compact and allowlisted.
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(np_name),
            # The legacy state holds a uint32 ndarray, which weights_only cannot unpickle: store as int64.
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def restore_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    """Restore a :func:`capture_rng_state` snapshot; pass the same generators, in the same order.

    A CUDA state captured on a machine with a different number of GPUs (or none) is restored for the
    devices both have, with a warning, since exact reproduction is impossible there anyway.
    """
    saved_generators = state["generators"]
    if len(saved_generators) != len(generators):
        raise ValueError(
            f"the RNG state holds {len(saved_generators)} generator state(s) but {len(generators)} "
            "generator(s) were passed; pass the same generators, in the same order, as to capture_rng_state"
        )

    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))

    npst = state["numpy"]
    np.random.set_state(
        (
            npst["bit_generator"],
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )

    torch.set_rng_state(state["torch"])

    cuda_states = state.get("cuda", [])
    if cuda_states:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available != len(cuda_states):
            logger.warning(
                "RNG state was captured with %d CUDA device(s) but %d are available; restoring the "
                "common ones only, so CUDA random streams will not match the original run",
                len(cuda_states),
                available,
            )
        for device, cuda_state in enumerate(cuda_states[:available]):
            torch.cuda.set_rng_state(cuda_state, device)

    for generator, gen_state in zip(generators, saved_generators, strict=True):
        generator.set_state(gen_state)
