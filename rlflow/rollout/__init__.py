"""The rollout engine: gym worlds (vector MuJoCo envs) -> typed batches; GAE and reward scaling."""

from rlflow.rollout.advantages import ReturnScaler, compute_gae
from rlflow.rollout.gym import GymRolloutBatch, collect_gym_rollout, evaluate_episodes

__all__ = ["GymRolloutBatch", "ReturnScaler", "collect_gym_rollout", "compute_gae", "evaluate_episodes"]
