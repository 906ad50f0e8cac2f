"""Saved vectors, results and atlases record the model that made them, and ``steer``
refuses or warns about a vector used on another model."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tl_powersteer import models as models_module
from tl_powersteer.adapters import ModelAdapter
from tl_powersteer.models import EMBEDDED_MODELS, model_provenance

KEYS = {"model_name", "kind", "n_layers", "d_model", "config_hash", "weights_fingerprint"}


def steer_warnings(model: Any, vectors: Any) -> list[str]:
    """The warnings one steered forward pass gives, every one of them shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), tps.steer(model, vectors, 1.0):
            model(torch.tensor([[1, 4, 6]]))
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_results_record_their_model_and_keep_it_when_saved(
    model: Any, tokens: torch.Tensor, tmp_path: Path
) -> None:
    made = model_provenance(model)
    assert set(made) == KEYS
    adapter = ModelAdapter(model)
    assert made["n_layers"] == adapter.n_layers and made["d_model"] == adapter.d_model
    assert made["weights_fingerprint"] == adapter.weights_fingerprint()
    assert made["config_hash"].startswith("sha256:")

    res = tps.power_steer(model, tokens, 0, 2, k=2, seed=0)
    melbo = tps.melbo(model, tokens, 0, 2, n_vectors=1, steps=2, radius=1.0)
    atlas = tps.sensitivity_atlas(model, tokens, k=1, progress=False)
    caa = tps.caa_vector(model, tokens[:1], tokens[1:], 1, site="hook_resid_post")
    for result in (res, melbo, atlas):
        assert result.provenance == made
        path = tmp_path / f"{type(result).__name__}.safetensors"
        result.save(path)
        assert tps.load(path).provenance == made
    vectors = [res.steering_vector(0), melbo.steering_vector(0), atlas.steering_vectors()[0], caa]
    for v in vectors:
        assert v.metadata["provenance"] == made
        v.save(tmp_path / "v.safetensors")
        assert tps.load(tmp_path / "v.safetensors").metadata["provenance"] == made
    assert steer_warnings(model, vectors) == []


def test_config_hash_is_the_architecture(models: dict[str, Any]) -> None:
    """The same for both model classes of one architecture, different for another."""
    native = ModelAdapter(models["native_bridge"]).config_hash()
    if "hooked" in models:
        assert ModelAdapter(models["hooked"]).config_hash() == native
    assert ModelAdapter(models["hf_bridge"]).config_hash() != native  # another d_mlp
    other = copy.deepcopy(models["native_bridge"])
    other.cfg.act_fn = "relu"
    assert ModelAdapter(other).config_hash() != native


def test_fingerprint_follows_in_place_edits(models: dict[str, Any]) -> None:
    other = copy.deepcopy(models["native_bridge"])
    adapter = ModelAdapter(other)
    before = adapter.weights_fingerprint()
    assert adapter.weights_fingerprint() == before
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    edited = adapter.weights_fingerprint()
    assert edited != before
    # Kept per model, not per adapter: a later call's new adapter sees every edit too.
    assert ModelAdapter(other).weights_fingerprint() == edited
    first = next(other.parameters())
    first.data = first.data - 1.0
    assert ModelAdapter(other).weights_fingerprint() == before
    state = {name: p + 0.5 for name, p in other.state_dict().items()}
    other.load_state_dict(state)
    assert ModelAdapter(other).weights_fingerprint() not in (before, edited)


def test_steer_refuses_a_vector_of_another_layer_count(model: Any, tokens: torch.Tensor) -> None:
    v = tps.power_steer(model, tokens, 0, 2, k=1).steering_vector(0)
    v.metadata["provenance"] = {**v.metadata["provenance"], "n_layers": 30}
    with pytest.raises(ValueError, match="made for a model with 30 layers"):
        with tps.steer(model, v, 1.0):
            pass
    with pytest.raises(ValueError, match="made for a model with 30 layers"):
        tps.effect(model, tokens, v, [1.0], progress=False)


def test_steer_warns_once_on_another_model_of_the_same_shape(
    models: dict[str, Any], tokens: torch.Tensor
) -> None:
    model = models["native_bridge"]
    v = tps.power_steer(model, tokens, 0, 2, k=1).steering_vector(0)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        next(retrained.parameters()).add_(1e-3)
    (message,) = steer_warnings(retrained, v)
    assert "other weights (weights_fingerprint)" in message and v.name in message
    reconfigured = copy.deepcopy(model)
    reconfigured.cfg.act_fn = "relu"
    (message,) = steer_warnings(reconfigured, v)
    assert "another architecture configuration" in message
    # One call, many steered passes inside: one warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tps.effect(retrained, tokens, v, [1.0, 2.0], progress=False)
    assert len([w for w in caught if "weights_fingerprint" in str(w.message)]) == 1
    # A vector without provenance (made by hand, or saved by an earlier release) is used.
    assert steer_warnings(retrained, tps.SteeringVector(v.direction, 0, v.site, "custom")) == []


def test_the_other_model_class_is_told_apart_by_the_embedded_file(
    models: dict[str, Any], tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weight fingerprints of the two classes differ for one model, so they are not
    compared; the digest of the embedded GGUF file the weights came from is."""
    model = copy.deepcopy(models["native_bridge"])
    v = tps.power_steer(model, tokens, 0, 2, k=1).steering_vector(0)
    made = {**v.metadata["provenance"], "kind": "hooked", "weights_fingerprint": "sha256:0"}
    v.metadata["provenance"] = made
    assert steer_warnings(model, v) == []
    gemma = EMBEDDED_MODELS["gemma-3-270m"].sha256
    v.metadata["provenance"] = {**made, "gguf_sha256": gemma}
    assert steer_warnings(model, v) == []  # this model's source is unknown: no claim
    monkeypatch.setitem(models_module._EMBEDDED_SOURCE, model, "smollm2-135m-instruct")
    assert model_provenance(model)["gguf_sha256"] == EMBEDDED_MODELS["smollm2-135m-instruct"].sha256
    (message,) = steer_warnings(model, v)
    assert "weights from another file (gguf_sha256)" in message
    monkeypatch.setitem(models_module._EMBEDDED_SOURCE, model, "gemma-3-270m")
    assert steer_warnings(model, v) == []


def test_control_vectors_keep_their_provenance(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    model = models["native_bridge"]
    v = tps.power_steer(model, tokens, 1, 3, k=1).steering_vector(0)
    path = tps.export_control_vector(v, tmp_path / "v.gguf", scales=2.0, architecture="gpt2")
    (back,) = tps.import_control_vector(path)
    assert back.metadata["provenance"] == v.metadata["provenance"]
    back.metadata["provenance"]["n_layers"] = 5
    with pytest.raises(ValueError, match="made for a model with 5 layers"):
        with tps.steer(model, back, 1.0):
            pass
