"""Preference data format (rlflow.data.preferences) and the `rlflow preferences` builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlflow.config import ConfigError
from rlflow.data.preferences import (
    LABEL_A,
    LABEL_B,
    LABEL_TIE,
    PreferenceDataError,
    PreferenceSet,
    load_preferences,
    save_preferences,
)
from rlflow.utils.checkpoint import save_state_dict

DIMS = ["alignment", "quality"]


def make_set(n: int = 6, *, latents: bool = True, seed: int = 0) -> PreferenceSet:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, 3, 8, 8, generator=g), torch.rand(n, 3, 8, 8, generator=g)
    return PreferenceSet(
        kind="image",
        dimensions=list(DIMS),
        prompts=[f"prompt {i}" for i in range(n)],
        a=a,
        b=b,
        labels=torch.randint(0, 3, (n, 2), generator=g),
        latents_a=a * 2 - 1 if latents else None,
        latents_b=b * 2 - 1 if latents else None,
        meta={"seed": seed, "note": "test"},
    )


def test_round_trip(tmp_path: Path) -> None:
    pairs = make_set()
    out = save_preferences(pairs, tmp_path / "prefs")
    assert {p.name for p in out.iterdir()} == {"meta.json", "pairs.jsonl", "samples.safetensors"}
    loaded = load_preferences(out)
    assert loaded.kind == "image" and loaded.dimensions == DIMS and loaded.prompts == pairs.prompts
    for name in ("a", "b", "labels", "latents_a", "latents_b"):
        assert torch.equal(getattr(loaded, name), getattr(pairs, name)), name
    assert loaded.meta == {"seed": 0, "note": "test"}
    row = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    names = {LABEL_A: "A", LABEL_B: "B", LABEL_TIE: "tie"}
    assert row == {
        "prompt": "prompt 0",
        "a": 0,
        "b": 6,
        "labels": {d: names[int(v)] for d, v in zip(DIMS, pairs.labels[0].tolist(), strict=True)},
    }
    # Without latents, and overwriting the previous set atomically.
    save_preferences(make_set(latents=False, seed=1), out)
    again = load_preferences(out)
    assert again.latents_a is None and again.meta["seed"] == 1


def test_segment_round_trip(tmp_path: Path) -> None:
    seg = PreferenceSet(
        kind="segment",
        dimensions=["return"],
        prompts=["", ""],
        a=torch.randn(2, 5, 4),
        b=torch.randn(2, 5, 4),
        labels=torch.tensor([[0], [2]]),
        meta={"obs_dim": 3, "act_dim": 1},
    )
    loaded = load_preferences(save_preferences(seg, tmp_path / "seg"))
    assert torch.equal(loaded.a, seg.a) and loaded.meta == {"obs_dim": 3, "act_dim": 1}
    with pytest.raises(ValueError, match="obs_dim"):
        save_preferences(
            PreferenceSet(
                "segment", ["r"], [""], torch.zeros(1, 2, 4), torch.ones(1, 2, 4), torch.zeros(1, 1).long()
            ),
            tmp_path / "bad",
        )


def test_select_split_label_index() -> None:
    pairs = make_set(10)
    sub = pairs.select(torch.tensor([3, 1]))
    assert sub.prompts == ["prompt 3", "prompt 1"] and torch.equal(sub.a, pairs.a[[3, 1]])
    assert torch.equal(sub.latents_b, pairs.latents_b[[3, 1]])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 9]] = True
    assert pairs.select(mask).prompts == ["prompt 0", "prompt 9"]
    train, held = pairs.split(0.3, seed=0)
    assert len(train) == 7 and len(held) == 3
    assert sorted(train.prompts + held.prompts) == sorted(pairs.prompts)
    assert pairs.split(0.3, seed=0)[1].prompts == held.prompts  # seeded
    with pytest.raises(ValueError, match="heldout_fraction"):
        pairs.split(1.0, seed=0)
    assert pairs.label_index("quality") == 1
    with pytest.raises(ValueError, match=r"'style'.*alignment.*quality"):
        pairs.label_index("style")
    fractions = pairs.label_fractions()
    assert fractions["alignment"]["A"] == pytest.approx((pairs.labels[:, 0] == 0).float().mean().item())


def test_constructor_checks() -> None:
    good = make_set(3)
    with pytest.raises(ValueError, match="labels must be int64"):
        PreferenceSet("image", DIMS, good.prompts, good.a, good.b, good.labels.float())
    with pytest.raises(ValueError, match="kind"):
        PreferenceSet("video", DIMS, good.prompts, good.a, good.b, good.labels)
    with pytest.raises(ValueError, match="3 prompts"):
        PreferenceSet("image", DIMS, good.prompts, good.a[:2], good.b[:2], good.labels)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_preferences(make_set(4), tmp_path / "prefs")


def _rewrite_row(directory: Path, row_index: int, edit) -> None:
    path = directory / "pairs.jsonl"
    lines = path.read_text().splitlines()
    lines[row_index] = edit(lines[row_index])
    path.write_text("\n".join(lines) + "\n")


def _edit_json(change):
    def edit(line: str) -> str:
        row = json.loads(line)
        change(row)
        return json.dumps(row)

    return edit


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda line: line[:-3], r"row 3: malformed JSON"),
        (_edit_json(lambda r: r.pop("labels")), r"row 3: field 'labels' is missing"),
        (_edit_json(lambda r: r.pop("a")), r"row 3: field 'a' is missing"),
        (
            _edit_json(lambda r: r["labels"].update(alignment="a")),
            r"row 3: field 'labels.alignment' is 'a'.*\"A\"",
        ),
        (
            _edit_json(lambda r: r["labels"].update(style="A")),
            r"row 3: field 'labels' has unknown dimension.*'style'",
        ),
        (
            _edit_json(lambda r: r["labels"].pop("quality")),
            r"row 3: field 'labels' is missing dimension.*'quality'",
        ),
        (_edit_json(lambda r: r.update(b=8)), r"row 3: field 'b' = 8 is out of range.*\[0, 7\]"),
        (_edit_json(lambda r: r.update(a=-1)), r"row 3: field 'a' = -1 is out of range"),
        (_edit_json(lambda r: r.update(a=1.5)), r"row 3: field 'a' must be an integer.*1.5"),
        (_edit_json(lambda r: r.update(b=r["a"])), r"row 3: fields 'a' and 'b' are both 2"),
        (_edit_json(lambda r: r.update(prompt=3)), r"row 3: field 'prompt' must be a string"),
    ],
)
def test_malformed_rows(saved: Path, edit, pattern: str) -> None:
    _rewrite_row(saved, 2, edit)
    with pytest.raises(PreferenceDataError, match=pattern) as info:
        load_preferences(saved)
    assert "pairs.jsonl" in str(info.value)


def _write_meta(directory: Path, change) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    change(meta)
    (directory / "meta.json").write_text(json.dumps(meta))


def test_meta_and_file_errors(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_preferences(tmp_path / "nowhere")
    _write_meta(saved, lambda m: m.update(format_version=2))
    with pytest.raises(PreferenceDataError, match=r"meta.json: field 'format_version' is 2"):
        load_preferences(saved)
    _write_meta(saved, lambda m: m.update(format_version=1, dimensions=["alignment"]))
    with pytest.raises(PreferenceDataError, match=r"row 1: field 'labels' has unknown dimension.*'quality'"):
        load_preferences(saved)
    _write_meta(saved, lambda m: m.update(dimensions=DIMS, num_pairs=5))
    with pytest.raises(PreferenceDataError, match=r"'num_pairs' is 5 but pairs.jsonl has 4 rows"):
        load_preferences(saved)
    _write_meta(saved, lambda m: m.update(num_pairs=4, kind="audio"))
    with pytest.raises(PreferenceDataError, match=r"field 'kind' is 'audio'"):
        load_preferences(saved)
    (saved / "meta.json").write_text("{not json")
    with pytest.raises(PreferenceDataError, match=r"meta.json: not valid JSON"):
        load_preferences(saved)
    (saved / "meta.json").unlink()
    with pytest.raises(PreferenceDataError, match=r"meta.json: file is missing"):
        load_preferences(saved)


def test_sample_array_errors(saved: Path) -> None:
    samples = saved / "samples.safetensors"
    images = torch.rand(8, 3, 8, 8)
    save_state_dict({"samples": images.double()}, samples)
    with pytest.raises(PreferenceDataError, match=r"'samples' has dtype torch.float64.*float32"):
        load_preferences(saved)
    save_state_dict({"samples": images * 2 - 1}, samples)
    with pytest.raises(PreferenceDataError, match=r"\[0, 1\].*first: row \d+, bad value -"):
        load_preferences(saved)
    save_state_dict({"samples": images[:, 0]}, samples)
    with pytest.raises(PreferenceDataError, match=r"shape \(8, 8, 8\).*\[M, 3, H, W\]"):
        load_preferences(saved)
    save_state_dict({"samples": images, "latents": torch.zeros(7, 3, 8, 8)}, samples)
    with pytest.raises(PreferenceDataError, match=r"'latents' has 7 rows but 'samples' has 8"):
        load_preferences(saved)
    save_state_dict({"samples": images[:6]}, samples)
    with pytest.raises(PreferenceDataError, match=r"'num_samples' is 8 but samples.safetensors has 6"):
        load_preferences(saved)
    samples.write_bytes(b"garbage")
    with pytest.raises(PreferenceDataError, match=r"cannot be read as safetensors"):
        load_preferences(saved)


def test_build_preferences_tiny(tmp_path: Path) -> None:
    """A tiny random shapes model, 8 pairs: the whole command end to end, reproducible from the seed."""
    from rlflow.testing import tiny_shapes_config
    from rlflow.worlds.shapes.model import build_shapes_model, save_shapes_model
    from rlflow.worlds.shapes.preferences import BuildPreferencesConfig, build_preferences

    torch.manual_seed(0)
    model = build_shapes_model(tiny_shapes_config())
    model_dir = save_shapes_model(model, tmp_path / "model")
    config = BuildPreferencesConfig(
        output_dir=str(tmp_path / "prefs"),
        model_path=str(model_dir),
        num_pairs=8,
        chunk_size=5,  # two chunks, the second one partial
        num_steps_choices=[1, 2],
        noise_levels=[0.0, 0.5],
        grid_pairs=2,
    )
    summary = build_preferences(config)
    pairs = load_preferences(tmp_path / "prefs")
    assert len(pairs) == 8 and pairs.dimensions == ["alignment", "quality"] and pairs.has_latents
    assert pairs.a.shape == (8, 3, 32, 32) and pairs.latents_a.shape == (8, 3, 32, 32)
    assert torch.allclose(pairs.a, ((pairs.latents_a + 1) / 2).clamp(0, 1))
    assert not torch.equal(pairs.a, pairs.b)  # different noise for the two samples of a pair
    assert (tmp_path / "prefs" / "pairs_grid.png").is_file()
    written = json.loads((tmp_path / "prefs" / "summary.json").read_text())
    for dim in pairs.dimensions:
        assert sum(written["label_fractions"][dim].values()) == pytest.approx(1.0)
        assert 0.0 <= written["agreement_ceiling"][dim]["with_ties"] <= 1.0
    assert summary["num_pairs"] == 8
    # Same seed -> same set (labels drawn from their own generator).
    config.output_dir = str(tmp_path / "prefs2")
    config.grid_pairs = 0
    build_preferences(config)
    again = load_preferences(tmp_path / "prefs2")
    assert torch.equal(again.latents_a, pairs.latents_a) and torch.equal(again.labels, pairs.labels)
    with pytest.raises(ConfigError, match="num_steps_choices"):
        BuildPreferencesConfig(num_steps_choices=[0])


def test_cli_reports_a_malformed_set_without_a_traceback(saved: Path, tmp_path: Path, capsys) -> None:
    """`rlflow reward-model` on a bad preference set exits 1 (a corrupt artefact) naming the row and field."""
    from rlflow.cli import main

    _rewrite_row(saved, 2, _edit_json(lambda r: r["labels"].update(alignment="C")))
    code = main(
        ["reward-model", "--data_dir", str(saved), "--output_dir", str(tmp_path / "run"), "--steps", "1"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "row 3: field 'labels.alignment'" in err and "Traceback" not in err
