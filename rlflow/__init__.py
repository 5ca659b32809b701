"""rlflow: fine-tune and align flow-matching (rectified-flow) models with RL and preference learning.

Importing ``rlflow`` only imports torch and the light core; MuJoCo, diffusers and DeepSpeed are
optional extras imported by the modules that need them.

Conventions (see ``docs/flows.md``): time runs from 0 (noise) to 1 (data),
``x_t = (1 - t) * x0 + t * x1``, and the velocity target is ``x1 - x0``.
"""


def _version() -> str:
    """The version in ``pyproject.toml``, its one source.

    In a source checkout (an editable install, or the repository on ``sys.path``) the file itself is read,
    so a bumped version shows without reinstalling; an installed wheel reports its metadata (written from
    the same field at build time).
    """
    import re
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        lines = pyproject.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    table, fields = "", {}
    for line in lines:
        header = re.match(r"\s*\[\[?([^\[\]]+)\]\]?\s*(#.*)?$", line)
        if header:
            table = header.group(1).strip()
            continue
        field = re.match(r'\s*(name|version)\s*=\s*"([^"]*)"', line)
        if table == "project" and field:
            fields[field.group(1)] = field.group(2)
    if fields.get("name") == "rlflow" and fields.get("version"):
        return fields["version"]
    from importlib import metadata

    try:
        return metadata.version("rlflow")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

from rlflow.loading import load_pretrained  # noqa: E402  (light: its loaders are imported when called)

__all__ = ["__version__", "load_pretrained"]
