"""Packaging: importing rlflow never imports the heavy optional extras; the namespaces are installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("gymnasium", "mujoco", "diffusers", "transformers", "peft", "accelerate", "deepspeed", "trl", "wandb")
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
        "import rlflow.data.collect, rlflow.data.minari_io, rlflow.reward_models.losses, rlflow.generators\n"
        "import rlflow.worlds.shapes.prompts, rlflow.worlds.shapes.render, rlflow.worlds.shapes.verifier\n"
        "import rlflow.worlds.shapes.oracle, rlflow.worlds.shapes.augmentation\n"
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


def test_one_version_string():
    """pyproject.toml is the version's one source: rlflow.__version__ (and `rlflow --version`) read it, and the
    docs' "v<major>.<minor>" status lines name the same release."""
    import re

    import tomllib

    import rlflow

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert rlflow.__version__ == version
    assert not re.search(r"__version__\s*=\s*[\"']", (ROOT / "rlflow" / "__init__.py").read_text())
    major_minor = ".".join(version.split(".")[:2])
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for mentioned in re.findall(r"\(v(\d+\.\d+)[:)]", doc.read_text()):
            assert mentioned == major_minor, f"{doc.name} says v{mentioned}; pyproject.toml says {version}"
