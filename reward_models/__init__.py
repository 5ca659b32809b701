"""``rlflow.reward_models``: reward functions and learned reward models (installed from ``reward_models/``).

Rewards are plain callables ``reward_fn(samples, prompts, **meta) -> Tensor[B]`` (see
docs/architecture.md); the programmatic verifiers, learned Bradley-Terry models and the remote reward
client arrive with the alignment work.
"""
