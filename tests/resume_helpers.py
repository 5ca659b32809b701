"""Kill a step-loop training run part-way and resume it: the shared body of the resume tests."""

from __future__ import annotations

import pytest


def interrupt_and_resume(trainer_cls, config, crash_at_step: int, monkeypatch):
    """Train ``trainer_cls(config)`` until its ``update`` is about to run at ``crash_at_step`` (a killed
    run: only the checkpoints written so far survive), then train a fresh trainer on the same config, which
    resumes from the last checkpoint. Returns the resumed, finished trainer."""
    original_update = trainer_cls.update

    def crash(self):
        if self.step == crash_at_step:
            raise KeyboardInterrupt
        return original_update(self)

    monkeypatch.setattr(trainer_cls, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer_cls(config).train()
    monkeypatch.setattr(trainer_cls, "update", original_update)
    resumed = trainer_cls(config)
    resumed.train()
    return resumed
