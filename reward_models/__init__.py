"""``rlflow.reward_models``: reward functions and learned reward models (installed from ``reward_models/``).

Rewards are plain callables ``reward(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]`` (float32, CPU;
see docs/architecture.md). Build weighted combinations from a config with :func:`build_rewards`; the
registry :data:`REWARDS` maps names to factories. Imports stay light (torch, numpy, Pillow, stdlib).
"""

from rlflow.worlds.shapes.verifier import ShapesVerifier

from .base import RewardFn, RewardOutput, as_reward_vector, check_reward_inputs
from .combine import REWARDS, WeightedRewards, build_reward, build_rewards
from .image_rewards import Brightness, Colorfulness, JpegCompressibility
from .remote import (
    RemoteReward,
    RewardServer,
    RewardServerConfig,
    RewardServerError,
    serve,
)

__all__ = [
    "REWARDS",
    "Brightness",
    "Colorfulness",
    "JpegCompressibility",
    "RemoteReward",
    "RewardFn",
    "RewardOutput",
    "RewardServer",
    "RewardServerConfig",
    "RewardServerError",
    "ShapesVerifier",
    "WeightedRewards",
    "as_reward_vector",
    "build_reward",
    "build_rewards",
    "check_reward_inputs",
    "serve",
]
