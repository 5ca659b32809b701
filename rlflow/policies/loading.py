"""Load any saved rlflow policy directory (flow or Gaussian) with its normalisation statistics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlflow.policies.flow_policy import FlowPolicy
from rlflow.policies.gaussian import GaussianPolicy

if TYPE_CHECKING:
    from rlflow.envs.normalization import Normalization

Policy = FlowPolicy | GaussianPolicy

POLICY_CLASSES: dict[str, type[Policy]] = {
    FlowPolicy.model_type: FlowPolicy,
    GaussianPolicy.model_type: GaussianPolicy,
}


def load_policy(
    policy_dir: str | os.PathLike, *, device: str | torch.device = "cpu", **overrides
) -> tuple[Policy, Normalization | None]:
    """Load a saved ``FlowPolicy`` / ``GaussianPolicy`` (chosen by ``config.json``'s ``model_type``).

    Returns the policy in eval mode on ``device`` and its ``normalization.json`` statistics (``None`` when
    the directory has none). ``overrides`` go to ``from_pretrained`` (e.g. ``num_steps`` of a flow).
    Raises :class:`~rlflow.errors.CheckpointError` for a missing directory, config or weights, or another model type.
    """
    from rlflow.envs.normalization import Normalization
    from rlflow.utils.model_format import read_model_config

    directory = Path(policy_dir)
    if not directory.exists():  # a wrong path is the user's mistake (exit 2), not a corrupt artefact (exit 1)
        from rlflow.config import ConfigError

        raise ConfigError(f"policy directory {directory} does not exist; check the path (relative to {Path.cwd()})")
    saved = read_model_config(
        directory, expected=POLICY_CLASSES, writer="FlowPolicy/GaussianPolicy.save_pretrained (rlflow pretrain, ppo)"
    )
    policy = POLICY_CLASSES[saved.model_type].from_pretrained(directory, **overrides).to(device).eval()
    norm_path = directory / "normalization.json"
    normalization = Normalization.load(norm_path) if norm_path.is_file() else None
    return policy, normalization


def policy_digest(policy: torch.nn.Module, *, exclude: tuple[str, ...] = ()) -> str:
    """A sha256 hex digest of a policy's config (without the fields in ``exclude``) and weights: equal
    digests act identically (used to tell whether a rendered video still shows the current policy)."""
    digest = hashlib.sha256()
    config = getattr(policy, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in exclude}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, tensor in sorted(policy.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
