"""The rollout engine: gym worlds (vector MuJoCo envs) -> typed batches; GAE, reward scaling and GRPO group advantages.

Prompt worlds (text-to-image) live in :mod:`rlflow.rollout.prompts`, imported on demand."""

from rlflow.rollout.advantages import ReturnScaler, compute_gae, group_advantages
from rlflow.rollout.gym import (
    EvaluationEpisodes,
    GymRolloutBatch,
    SplitVectorEnv,
    collect_gym_rollout,
    evaluate_episodes,
)

__all__ = [
    "EvaluationEpisodes",
    "GymRolloutBatch",
    "ReturnScaler",
    "SplitVectorEnv",
    "collect_gym_rollout",
    "compute_gae",
    "evaluate_episodes",
    "group_advantages",
]
