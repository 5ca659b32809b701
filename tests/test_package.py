"""Packaging: importing rlflow never imports the heavy optional extras; the namespaces are installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("gymnasium", "mujoco", "diffusers", "transformers", "peft", "accelerate", "deepspeed", "trl")
ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_do_not_pull_optional_extras():
    """Import the core with every optional extra made unimportable (whether installed here or not)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {HEAVY!r}:\n"
        "            raise ImportError('blocked optional extra: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import rlflow, rlflow.flows, rlflow.policies, rlflow.data, rlflow.rollout, rlflow.trainers.pretrain\n"
        "import rlflow.trainers.ppo, rlflow.data.demonstrations, rlflow.envs, rlflow.reward_models, rlflow.cli\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_subpackage_is_listed_in_pyproject():
    """pyproject lists packages explicitly (for the envs/ and reward_models/ mapping): keep it complete."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "rlflow." + ".".join(p.parent.relative_to(ROOT / "rlflow").parts)
        for p in (ROOT / "rlflow").rglob("__init__.py")
    }
    found = {name.rstrip(".") for name in found}
    assert found <= listed, sorted(found - listed)


def test_envs_and_reward_models_live_under_the_rlflow_namespace():
    import rlflow.envs
    import rlflow.reward_models

    assert Path(rlflow.envs.__file__).parent.name == "envs"
    assert Path(rlflow.reward_models.__file__).parent.name == "reward_models"
