"""User-facing error types, importable without torch (the CLI catches them to exit without a traceback)."""

from __future__ import annotations


class DataError(ValueError):
    """An input data file (e.g. a preference set) is malformed; the message names the file, the row or
    field, the bad value and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or does not match the model it is loaded into.

    The message always names the offending file (or checkpoint source) and the fix.
    """
