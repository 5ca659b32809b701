"""rlflow: fine-tune and align flow-matching (rectified-flow) models with RL and preference learning.

Importing ``rlflow`` only imports torch and the light core; MuJoCo, diffusers and DeepSpeed are
optional extras imported by the modules that need them.

Conventions (see ``docs/flows.md``): time runs from 0 (noise) to 1 (data),
``x_t = (1 - t) * x0 + t * x1``, and the velocity target is ``x1 - x0``.
"""

__version__ = "0.1.0"
