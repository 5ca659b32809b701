"""What a config value may be: numeric ranges, finiteness, devices and output directories.

A field's allowed range is declared once, either on the field (``option(0.99, bounds="[0, 1]", ...)``)
or, for the names every trainer shares (``learning_rate``, ``seed``, ``ema_decay``, ...), in
:data:`BOUNDS_BY_NAME` below: one vocabulary, so that ``learning_rate`` means the same everywhere.
:mod:`rlflow.config` checks every value a user gives (YAML or command line) against it while the
config is built, so a bad value exits before any work with the field, the value and what is allowed.

Every float is also checked for finiteness: NaN or infinity is never a meaningful setting, and a NaN
slips through ordinary range checks (every comparison with NaN is false).

Like :mod:`rlflow.config`, this module imports nothing heavy; torch is imported only to check a
device that needs it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BOUNDS_BY_NAME",
    "Bounds",
    "CHECKS_BY_NAME",
    "check_device",
    "check_output_dir",
    "parse_bounds",
]

# An output directory needs room for at least metrics, a checkpoint and a small model.
MIN_FREE_BYTES = 16 * 1024 * 1024

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\)\s]+)\s*([\])])\s*$")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A closed, open or half-open interval, written as in mathematics: ``"[0, 1)"``, ``"(0, inf)"``."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def describe(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"in [0, 1)"``: how the allowed values read in an error message."""
        if math.isinf(self.high):
            return f"{'>=' if self.low_closed else '>'} {_number(self.low)}"
        if math.isinf(self.low):
            return f"{'<=' if self.high_closed else '<'} {_number(self.high)}"
        return f"in {self.text}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def parse_bounds(text: str) -> Bounds:
    """Parse interval notation; a developer error (TypeError) when it is malformed."""
    match = _INTERVAL.match(text) if isinstance(text, str) else None
    if match is None:
        raise TypeError(f"bounds must be interval notation such as '[0, 1)' or '(0, inf)', got {text!r}")
    opening, low_text, high_text, closing = match.groups()
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        raise TypeError(f"bounds {text!r}: the ends must be numbers or inf") from None
    if math.isnan(low) or math.isnan(high) or low > high:
        raise TypeError(f"bounds {text!r}: need low <= high")
    if (opening == "[" and math.isinf(low)) or (closing == "]" and math.isinf(high)):
        raise TypeError(f"bounds {text!r}: an infinite end is always open")
    canonical = f"{opening}{_number(low) if not math.isinf(low) else '-inf'}, "
    canonical += f"{_number(high) if not math.isinf(high) else 'inf'}{closing}"
    return Bounds(low, high, opening == "[", closing == "]", canonical)


# ----------------------------------------------------------------------------------------------
# The shared vocabulary: names that mean the same in every config
# ----------------------------------------------------------------------------------------------

_POSITIVE = "(0, inf)"
_NON_NEGATIVE = "[0, inf)"
_AT_LEAST_ONE = "[1, inf)"
_FRACTION = "[0, 1]"
_DECAY = "[0, 1)"

_VOCABULARY: dict[str, tuple[str, ...]] = {
    _POSITIVE: (
        # step sizes: 0 never moves the weights, a negative one ascends the loss
        "learning_rate", "actor_lr", "critic_lr", "critic_learning_rate", "pretrain_lr",
        # a clipping norm of 0 zeroes every gradient
        "max_grad_norm",
        # PPO / GRPO ratio clipping and advantage clipping
        "clip_range", "advantage_clip",
        "time_shift", "eval_time_shift", "temperature", "min_std", "max_std", "final_max_std",
        "logit_std", "target_kl", "rater_scale", "epochs", "beta", "quality_temperature", "max_coefficient",
        "read_timeout_s", "timeout_s",
    ),
    _NON_NEGATIVE: (
        "seed", "split_seed", "eval_prompt_seed",
        "weight_decay", "kl_beta", "ent_coef", "vf_coef", "w2_coef", "w2_alpha", "center_coef",
        "noise_level", "warmup_steps", "max_flat_iterations", "grid_size", "grid_pairs",
        "critic_warmup_iterations", "pretrain_steps", "latent_cache_size", "obs_dim", "act_dim", "stem_channels",
        "u_shape_a", "guidance_scale", "eval_guidance_scale", "margin", "lora_r", "lora_alpha",
        "old_policy_decay_ramp", "old_policy_decay_start", "mse_weight", "kl_weight", "orw_tau",
        "eval_train_pairs", "window_max_start", "branch_steps", "noise_levels",
    ),
    _AT_LEAST_ONE: (
        "steps", "iterations", "batch_size", "minibatch_size", "num_epochs", "update_epochs",
        "updates_per_epoch", "updates_per_iteration", "eval_steps", "save_steps", "logging_steps",
        "save_total_limit", "episodes", "eval_episodes", "num_steps", "eval_num_steps",
        "rollout_steps", "max_episode_steps", "sample_chunk_size", "chunk_size", "eval_batch_size",
        "prompts_per_iteration", "samples_per_prompt", "num_eval_prompts", "eval_prompts",
        "eval_samples_per_prompt", "eval_samples", "eval_loss_samples", "eval_images", "calibration_images",
        "num_pairs", "pairs_per_iteration", "timesteps_per_pair", "times_per_sample",
        "gradient_steps_per_iteration", "window_size", "window_shift_every", "critic_epochs",
        "critic_minibatch_size", "critic_width", "pretrain_batch_size", "nfe_budget", "eval_noise_samples",
        "segment_length", "stride", "num_samples", "num_prompts", "image_size", "resolution", "channels",
        "patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "text_dim", "text_layers",
        "text_heads", "text_ff_dim", "pooled_dim", "max_prompt_words", "layers_per_block",
        "latent_channels", "norm_num_groups", "text_buckets", "time_dim", "hidden_dim", "hidden_dims",
        "noise_hidden_dims", "critic_hidden_dims", "conv_channels", "block_out_channels", "segment_layers",
        "time_embed_dim", "horizon", "shortcut_max_steps", "num_steps_choices",
        # ratios whose 1 means "off": a tie parameter of 1 never ties, a weight cap of 1 flattens weights
        "rater_theta", "weight_clip",
        "max_workers", "max_connections", "max_request_bytes",
    ),
    _FRACTION: (
        "gamma", "gae_lambda", "min_lr_ratio", "old_policy_decay_max",
        "clean_fraction", "prompt_dropout", "reward_norm_momentum",
    ),
    _DECAY: ("ema_decay", "heldout_fraction", "holdout_fraction", "dropout"),
    # upper bounds that catch a typo before it exhausts the machine (each env is a simulator in memory)
    "[1, 1024]": ("num_threads",),
    "[1, 4096]": ("num_envs",),
    "(0, 1]": ("timestep_fraction",),
    "[0, 65535]": ("port",),
}

# Names whose value is any finite real number (a mean, an offset, a log-std): declared so that the
# vocabulary test can tell "no range" from "forgotten".
UNBOUNDED_NAMES = frozenset({"logit_mean", "init_log_std", "learned_reward_offset", "weight"})

BOUNDS_BY_NAME: dict[str, Bounds] = {
    name: parse_bounds(text) for text, names in _VOCABULARY.items() for name in names
}
if len(BOUNDS_BY_NAME) != sum(len(names) for names in _VOCABULARY.values()):  # a name in two intervals
    raise TypeError("a name appears under two intervals of the shared config vocabulary")


# ----------------------------------------------------------------------------------------------
# Checks that need more than a range
# ----------------------------------------------------------------------------------------------

_DEVICE = re.compile(r"^(cpu|auto|cuda|mps|xpu)(:(\d+))?$")


def check_device(value: Any) -> str | None:
    """A device string that names an available device, else the problem and its fix."""
    if value is None:
        return None
    text = str(value).strip().lower()
    match = _DEVICE.match(text)
    if match is None:
        return "is not a device; write auto, cpu, cuda or cuda:N"
    kind, index = match.group(1), match.group(3)
    if kind in ("cpu", "auto"):
        return None if index is None else f"takes no index; write {kind}"
    import torch  # only now: checking a GPU needs it, and the CLI's --help must stay fast

    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "asks for CUDA, but this machine has no CUDA device torch can use; write cpu (or auto)"
        if index is not None and int(index) >= count:
            return f"asks for GPU {index}, but this machine has {count} (cuda:0 to cuda:{count - 1})"
        return None
    backend = getattr(torch.backends, kind, None)
    if backend is None or not backend.is_available():
        return f"asks for {kind}, which this machine does not have; write cpu (or auto)"
    return None


def check_output_dir(value: Any) -> str | None:
    """A directory the run can create or write into, else the problem and its fix."""
    if value is None:
        return None
    if not str(value).strip():  # Path("") is the current directory: never what an empty value meant
        return "is empty; give a directory path"
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        return "is a file, not a directory; choose a directory path"
    existing = path
    while not existing.exists():  # the nearest ancestor that exists decides whether we can create it
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is a file; choose another path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"is not writable ({existing} refuses writing); choose another directory or fix its permissions"
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return f"is on a disk with only {free / 2**20:.1f} MiB free; free some space or choose another disk"
    return None


CHECKS_BY_NAME: Mapping[str, Callable[[Any], str | None]] = {
    "device": check_device,
    "output_dir": check_output_dir,
}
