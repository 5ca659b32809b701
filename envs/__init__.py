"""``rlflow.envs``: MuJoCo / gymnasium worlds and their wrappers (installed from the top-level ``envs/``).

Importing this package imports nothing heavy; gymnasium and MuJoCo come with the ``[mujoco]`` extra and
are imported by the modules that use them. The robotics tasks (Hopper, Walker2d, HalfCheetah, Ant),
action-chunk wrappers and vector-env rollouts arrive with the robotics work (see docs/architecture.md).
"""
