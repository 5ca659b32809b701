"""The shapes world's text-to-image model: tokenizer, embeddings, save/load, and the shipped base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlflow.errors import CheckpointError
from rlflow.testing import tiny_shapes_config
from rlflow.worlds.shapes.model import (
    ShapesModelConfig,
    ShapesTextEncoder,
    build_shapes_model,
    load_shapes_model,
    save_shapes_model,
)
from rlflow.worlds.shapes.prompts import MAX_PROMPT_WORDS, VOCAB

SHIPPED = Path(__file__).resolve().parents[1] / "recipes" / "alignment" / "artifacts" / "shapes_base"
PROMPTS = ["a red circle", "two blue squares", "a green triangle to the left of a white square", ""]


def tiny_config() -> ShapesModelConfig:
    return tiny_shapes_config()


def _velocity(model, prompts, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), *model.latent_shape, generator=g)
    t = torch.rand(len(prompts), generator=g)
    with torch.no_grad():
        return model.velocity(x, t, model.prompt_encoder(prompts))


def test_tokenizer_follows_the_world_and_names_unknown_words():
    encoder = ShapesTextEncoder(tiny_config())
    ids = encoder.tokenize(["a red circle", " A Red Circle. ", ""])
    assert ids.shape == (3, MAX_PROMPT_WORDS) and ids.dtype == torch.long
    assert torch.equal(ids[0], ids[1])  # the world's normalisation: case, spaces, final "."
    assert ids[0, :3].tolist() == [VOCAB.index(w) + 1 for w in ("a", "red", "circle")]
    assert ids[0, 3:].eq(0).all() and ids[2].eq(0).all()  # padding is 0
    with pytest.raises(ValueError, match="'purple'"):
        encoder.tokenize(["a purple circle"])
    with pytest.raises(ValueError, match="at most"):
        encoder.tokenize([" ".join(["a"] * (MAX_PROMPT_WORDS + 1))])
    with pytest.raises(TypeError):
        encoder.tokenize("a red circle")


def test_embeddings_and_velocity_shapes():
    config = tiny_config()
    model = build_shapes_model(config)
    assert model.latent_shape == (3, 32, 32) and model.vae is None
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())  # frozen by default
    emb = model.encode_prompts(PROMPTS)  # the PromptEncoder protocol, through the model's cache
    assert emb.hidden_states.shape == (4, MAX_PROMPT_WORDS, config.text_dim)
    assert emb.pooled.shape == (4, config.pooled_dim)
    assert torch.isfinite(emb.hidden_states).all() and torch.isfinite(emb.pooled).all()
    assert emb.hidden_states[0, 3:].eq(0).all()  # padding carries nothing
    assert emb.hidden_states[3].eq(0).all()  # the empty (unconditional) prompt
    v = _velocity(model, PROMPTS)
    assert v.shape == (4, 3, 32, 32) and torch.isfinite(v).all()
    trainable = build_shapes_model(config, train_text_encoder=True)
    assert all(p.requires_grad for p in trainable.prompt_encoder.parameters())


def test_save_load_round_trip_gives_identical_velocities(tmp_path):
    torch.manual_seed(0)
    model = build_shapes_model(tiny_config()).eval()
    path = save_shapes_model(model, tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md",  # the model card
        "config.json",  # rlflow's model format
        "text_encoder.safetensors",
        "transformer",
    ]
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "rlflow.ShapesModel"
    loaded = load_shapes_model(path)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.prompt_encoder.parameters())
    assert torch.equal(_velocity(model, PROMPTS), _velocity(loaded, PROMPTS))


def test_wrong_or_corrupt_directories_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_shapes_model(tmp_path / "missing")
    path = save_shapes_model(build_shapes_model(tiny_config()), tmp_path / "model")

    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "model_type": "rlflow.FlowPolicy"}))
    with pytest.raises(CheckpointError, match="holds rlflow.FlowPolicy .*, not a shapes-world"):
        load_shapes_model(path)
    (path / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "num_layers": 2}}))
    with pytest.raises(CheckpointError, match="disagrees"):
        load_shapes_model(path)
    (path / "config.json").write_text(json.dumps(meta))

    weights = path / "text_encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="text_encoder.safetensors"):
        load_shapes_model(path)


def test_shipped_base_model_loads():
    model = load_shapes_model(SHIPPED)
    assert model.latent_shape == (3, 32, 32)
    v = _velocity(model, ["a red circle", "two blue squares"])
    assert v.shape == (2, 3, 32, 32) and torch.isfinite(v).all()


def test_data_prediction_returns_the_diffusers_target():
    """The network predicts the image; the transformer returns diffusers' ``noise - data = (x - data) / sigma``."""
    from diffusers import SD3Transformer2DModel

    model = build_shapes_model(tiny_config())
    transformer = model.transformer
    assert isinstance(transformer, SD3Transformer2DModel) and transformer.min_sigma == 0.05
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0.0, 0.5, 0.97, 1.0])
    cond = model.prompt_encoder(["a red circle"] * 4)
    with torch.no_grad():
        velocity = model.velocity(x, t, cond)
        data = SD3Transformer2DModel.forward(
            transformer,
            hidden_states=x,
            encoder_hidden_states=cond.hidden_states,
            pooled_projections=cond.pooled,
            timestep=(1 - t) * 1000,
            return_dict=False,
        )[0]
    # rlflow's velocity is (data - x) / (1 - t), with 1 - t clipped at min_sigma.
    expected = (data - x) / (1 - t).clamp_min(0.05).view(-1, 1, 1, 1)
    torch.testing.assert_close(velocity, expected)
    plain = build_shapes_model(ShapesModelConfig(**{**tiny_config().__dict__, "prediction": "velocity"}))
    assert type(plain.transformer) is SD3Transformer2DModel
