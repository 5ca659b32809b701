"""User-facing error types, importable without torch (the CLI catches them to exit without a traceback)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or does not match the model it is loaded into.

    The message always names the offending file (or checkpoint source) and the fix.
    """
