"""Tests for rlflow.utils.checkpoint (and its use with seeding / schedules for exact resumption)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rlflow.utils.checkpoint import (
    CheckpointError,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_state_dict,
    load_training_state,
    load_weights_into,
    prune_checkpoints,
    read_json,
    read_safetensors_metadata,
    save_state_dict,
    save_training_state,
    write_json,
)
from rlflow.utils.schedules import make_lr_scheduler
from rlflow.utils.seeding import capture_rng_state, restore_rng_state, seed_everything


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------------------------- atomic I/O
def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _entries(target.parent) == ["file.txt"]


def test_atomic_directory_publishes_and_replaces(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        assert not final.exists()  # nothing visible while the body runs
        (tmp / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"

    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert _entries(final) == ["b.txt"]  # old content fully replaced, not merged
    assert _entries(tmp_path) == ["ckpt"]  # neither temp nor old dir left behind


def test_atomic_directory_keeps_old_dir_when_body_raises(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"good")

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(final) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert (final / "weights.bin").read_bytes() == b"good"
    assert _entries(tmp_path) == ["ckpt"]


# --------------------------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_exact_with_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.randn(4, 6, dtype=torch.float64)
    state = {
        "w": base,
        "w_t": base.T,  # non-contiguous view sharing storage with "w"
        "tied": base,  # same tensor twice (tied weights)
        "row": base[1],  # slice of a larger storage
        "half": torch.randn(3, dtype=torch.float16),
        "ints": torch.arange(5, dtype=torch.int64),
    }
    path = tmp_path / "model.safetensors"
    save_state_dict(state, path, metadata={"step": "7"})
    loaded = load_state_dict(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value), key
    assert read_safetensors_metadata(path)["step"] == "7"
    # Default file permissions (safetensors itself would create a 0o600 file).
    probe = tmp_path / "probe"
    probe.touch()
    assert path.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777


def test_load_state_dict_missing_truncated_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")

    path = tmp_path / "model.safetensors"
    save_state_dict({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(garbage)
    assert str(garbage) in str(info.value)


def test_load_weights_into_reports_mismatches(tmp_path: Path) -> None:
    src = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    path = tmp_path / "model.safetensors"
    save_state_dict(src.state_dict(), path)

    same = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    load_weights_into(same, load_state_dict(path), source=str(path))
    for a, b in zip(src.parameters(), same.parameters(), strict=True):
        assert torch.equal(a, b)

    wider = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(CheckpointError) as info:
        load_weights_into(wider, load_state_dict(path), source=str(path))
    msg = str(info.value)
    assert str(path) in msg and "does not match the model's config" in msg
    assert "0.weight: checkpoint (8, 3) vs model (16, 3)" in msg
    assert "2.weight: checkpoint (2, 8) vs model (2, 16)" in msg

    deeper = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): 3.weight, 3.bias"):
        load_weights_into(deeper, load_state_dict(path), source="ckpt")

    wrapped = {f"module.{k}": v for k, v in src.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(4\).*'module\.' prefix"):
        load_weights_into(same, wrapped, source="ckpt")


# ------------------------------------------------------------------------------------------------- JSON
def test_json_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_json(path, {"b": np.float32(1.5), "a": torch.tensor(2), "nan": float("nan"), "p": tmp_path})
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"')  # sorted keys
    assert read_json(path, what="summary") == {"a": 2, "b": 1.5, "nan": None, "p": str(tmp_path)}

    with pytest.raises(CheckpointError, match="run summary file .*missing.json does not exist"):
        read_json(tmp_path / "missing.json", what="run summary")
    path.write_text('{"a": 1,')
    with pytest.raises(CheckpointError) as info:
        read_json(path, what="summary")
    assert str(path) in str(info.value) and "not valid JSON" in str(info.value)


# ------------------------------------------------------------------------------------------ training state
def _make_training(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = make_lr_scheduler(opt, "cosine", total_steps=20, warmup_steps=3, min_lr_ratio=0.1)
    return model, opt, sched


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, gen: torch.Generator) -> None:
    # Data from all four RNG sources, so any RNG not restored exactly changes the result.
    x = torch.randn(8, 4, generator=gen) + torch.randn(8, 4)
    x = x * float(np.random.rand()) + random.random()
    loss = (model(x) - x.sum(1, keepdim=True)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_training_state_round_trip_continues_bitwise(tmp_path: Path) -> None:
    seed_everything(0)
    gen = torch.Generator().manual_seed(123)
    model, opt, sched = _make_training(seed=1)
    for _ in range(4):
        _train_step(model, opt, sched, gen)

    path = tmp_path / "training_state.pt"
    save_training_state(
        path,
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": capture_rng_state(gen),
            "step": 4,
            "best": 0.5,
        },
    )
    for _ in range(2):
        _train_step(model, opt, sched, gen)
    reference = [p.detach().clone() for p in model.parameters()]
    reference_lr = opt.param_groups[0]["lr"]

    # Scramble everything, then resume into freshly built objects.
    seed_everything(999)
    gen2 = torch.Generator().manual_seed(7)
    model2, opt2, sched2 = _make_training(seed=2)
    state = load_training_state(path)
    assert state["step"] == 4 and state["best"] == 0.5
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"], gen2)
    for _ in range(2):
        _train_step(model2, opt2, sched2, gen2)

    for a, b in zip(reference, model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == reference_lr


def test_save_training_state_rejects_unloadable_objects(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    with pytest.raises(TypeError, match="weights_only"):
        save_training_state(path, {"arr": np.zeros(3)})
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_load_training_state_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_state(tmp_path / "missing.pt")
    path = tmp_path / "state.pt"
    save_training_state(path, {"x": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as info:
        load_training_state(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="state.pt"):
        load_training_state(path)


# ------------------------------------------------------------------------------------------ checkpoint dirs
def test_checkpoint_discovery_and_pruning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    assert checkpoint_dir(run, 5) == run / "checkpoints" / "step_00000005"
    for step in (5, 100, 20):
        with atomic_directory(checkpoint_dir(run, step)) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")

    # A crashed / in-progress save leaves a hidden temp dir with a *higher* step: it must be ignored.
    ctx = atomic_directory(checkpoint_dir(run, 500))
    in_progress = ctx.__enter__()
    try:
        assert in_progress.exists()
        assert latest_checkpoint(run) == checkpoint_dir(run, 100)
        assert [s for s, _ in list_checkpoints(run)] == [5, 20, 100]
    finally:
        ctx.__exit__(RuntimeError, RuntimeError("abort"), None)

    removed = prune_checkpoints(run, keep_last=2)
    assert removed == [checkpoint_dir(run, 5)]
    assert _entries(run / "checkpoints") == ["step_00000020", "step_00000100"]
    with pytest.raises(ValueError):
        prune_checkpoints(run, keep_last=0)


def test_write_json_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, {"inf": float("inf"), "nested": [1.0, float("-inf")]}, sort_keys=False)
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == {
        "inf": None,
        "nested": [1.0, None],
    }
