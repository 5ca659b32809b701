"""Packaging: importing rlflow never imports the heavy optional extras; the namespaces are installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("gymnasium", "mujoco", "diffusers", "transformers", "peft", "accelerate", "deepspeed", "trl")
ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_do_not_pull_optional_extras():
    code = (
        "import sys, rlflow, rlflow.flows, rlflow.policies, rlflow.data, rlflow.trainers.pretrain, "
        "rlflow.envs, rlflow.reward_models, rlflow.cli\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_envs_and_reward_models_live_under_the_rlflow_namespace():
    import rlflow.envs
    import rlflow.reward_models

    assert Path(rlflow.envs.__file__).parent.name == "envs"
    assert Path(rlflow.reward_models.__file__).parent.name == "reward_models"
