"""``rlflow.envs``: MuJoCo / gymnasium worlds and their wrappers (installed from the top-level ``envs/``).

Importing this package imports nothing heavy; gymnasium and MuJoCo come with the ``[mujoco]`` extra and
are imported by the submodules that use them, on first access:

* :mod:`rlflow.envs.normalization`: :class:`Normalization` (dataset min-max scaling to ``[-1, 1]``; no gymnasium);
* :mod:`rlflow.envs.wrappers`: :class:`ActionChunk`, :class:`NormalizedObsAction`, :func:`wrap_env`;
* :mod:`rlflow.envs.tasks`: :data:`TASKS`, :func:`resolve_task`, :func:`make_env`, :func:`make_vector_env`,
  :func:`make_raw_env` / :func:`use_tracking_camera` (rendered frames follow the robot), :func:`env_dims`
  (and the vector-env ``infos`` layout under ``AutoresetMode.SAME_STEP``);
* :mod:`rlflow.envs.manipulation`: Meta-World v3 manipulation tasks (:data:`MANIPULATION_TASKS`,
  :class:`MetaWorldTask`; sparse ``rlflow/<name>-v3`` and shaped ``rlflow/<name>-dense-v3`` ids, resolved by
  :func:`resolve_task`) and their scripted experts with injected noise (:func:`scripted_expert`);
* :mod:`rlflow.envs.video`: :func:`record_video`, :func:`record_policy_video`.

The names above are also available as ``rlflow.envs.<name>``; they are resolved lazily (PEP 562) so that
``import rlflow.envs`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule defining it
_LAZY = {
    "Normalization": "normalization",
    "ActionChunk": "wrappers",
    "NormalizedObsAction": "wrappers",
    "wrap_env": "wrappers",
    "TASKS": "tasks",
    "resolve_task": "tasks",
    "make_env": "tasks",
    "make_raw_env": "tasks",
    "use_tracking_camera": "tasks",
    "TRACKING_CAMERAS": "tasks",
    "make_vector_env": "tasks",
    "env_dims": "tasks",
    "identity_normalization": "tasks",
    "record_video": "video",
    "record_policy_video": "video",
    "MANIPULATION_TASKS": "manipulation",
    "MetaWorldTask": "manipulation",
    "scripted_expert": "manipulation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
