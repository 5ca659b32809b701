"""User-facing error types, importable without torch (the CLI catches them to exit without a traceback)."""

from __future__ import annotations


class DataError(ValueError):
    """An input data file (e.g. a preference set) is malformed; the message names the file, the row or
    field, the bad value and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or does not match the model it is loaded into.

    The message always names the offending file (or checkpoint source) and the fix.
    """


class NonFiniteError(RuntimeError):
    """A NaN/inf value where training needs finite numbers: weights (or weights exploded past 1e20),
    optimizer state or a loss about to be checkpointed or applied, or an action / reward / observation of
    an environment step.

    The message names the step or iteration (or the environment index and step), what was non-finite and
    the likely cause with its fix. Raised *before* anything non-finite is written, so the previous
    checkpoint stays usable.
    """


class RewardServerError(RuntimeError):
    """A remote reward server is unreachable, too slow, refused a request or sent a malformed answer.

    The message names the server's URL, what went wrong and the fix (start it, pass its token, ...).
    """
