"""llama.cpp control vectors: the file's layout, the layer numbering, and a round trip
that steers exactly as the original vectors do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tl_powersteer.adapters import ModelAdapter


def logits(model: Any, tokens: torch.Tensor, vectors: list, scales: list) -> torch.Tensor:
    with torch.no_grad():
        if not vectors:
            return model(tokens)
        with tps.steer(model, vectors, scales):
            return model(tokens)


def vector(layer: int, site: str, seed: int) -> tps.SteeringVector:
    torch.manual_seed(seed)
    return tps.SteeringVector(torch.randn(16, dtype=torch.float64), layer, site, "test")


def test_mlp_out_and_resid_post_are_one_place(model: Any, tokens: torch.Tensor) -> None:
    """Why a vector at hook_mlp_out is exported as the block's output: adding it there
    changes nothing else (the same for resid_pre of the next block)."""
    v = vector(1, "hook_mlp_out", 0)
    at_out = tps.SteeringVector(v.direction, 1, "hook_resid_post", "test")
    at_next = tps.SteeringVector(v.direction, 2, "hook_resid_pre", "test")
    reference = logits(model, tokens, [at_out], [3.0])
    torch.testing.assert_close(logits(model, tokens, [v], [3.0]), reference, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        logits(model, tokens, [at_next], [3.0]), reference, rtol=1e-9, atol=1e-9
    )
    assert not torch.allclose(reference, logits(model, tokens, [], []))


def test_round_trip_steers_like_the_originals(
    model: Any, tokens: torch.Tensor, tmp_path: Path
) -> None:
    originals = [
        vector(1, "hook_mlp_out", 1),
        vector(2, "hook_resid_pre", 2),
        vector(2, "hook_resid_post", 3),
    ]
    scales = [3.0, 2.0, 0.5]
    path = tps.export_control_vector(
        originals, tmp_path / "v.gguf", scales=scales, architecture="gpt2"
    )
    imported = tps.import_control_vector(path)
    # The first two land on block 1's output and are summed, as llama.cpp sums them.
    assert [(v.layer, v.site) for v in imported] == [(1, "hook_resid_post"), (2, "hook_resid_post")]
    summed = 3.0 * originals[0].direction.double() + 2.0 * originals[1].direction.double()
    torch.testing.assert_close(imported[0].direction.double() * imported[0].norm, summed,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    steered = logits(model, tokens, originals, scales)
    again = logits(model, tokens, imported, [v.norm for v in imported])
    # float32 in the file: the difference is rounding of the directions.
    torch.testing.assert_close(again, steered, rtol=1e-5, atol=1e-5)


def test_the_file_is_what_llama_cpp_reads(tmp_path: Path) -> None:
    import gguf

    path = tps.export_control_vector(
        [vector(3, "hook_resid_post", 0), vector(1, "hook_mlp_out", 1)],
        tmp_path / "v.gguf", scales=[1.0, 2.0], architecture="llama",
    )  # fmt: skip
    reader = gguf.GGUFReader(str(path))
    fields = {
        name: reader.get_field(name).contents()
        for name in reader.fields
        if not name.startswith("GGUF.")
    }
    assert fields == {
        "general.architecture": "controlvector",
        "controlvector.model_hint": "llama",
        "controlvector.layer_count": 2,
    }
    assert reader.get_field("controlvector.layer_count").types == [gguf.GGUFValueType.INT32]
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.3"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.shape == (16,)
    assert abs(float(torch.from_numpy(reader.tensors[0].data.copy()).norm()) - 2.0) < 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


def test_embedded_models_know_their_architecture(tmp_path: Path) -> None:
    v = vector(2, "hook_mlp_out", 0)
    v.metadata["model_name"] = "smollm2-135m-instruct"
    path = tps.export_control_vector(v, tmp_path / "v.gguf", scales=1.0)
    assert tps.import_control_vector(path)[0].metadata["model_hint"] == "llama"


@pytest.mark.parametrize(
    ("vectors", "kwargs", "message"),
    [
        ([vector(1, "hook_attn_out", 0)], {}, "'hook_attn_out', which has no llama.cpp equivalent"),
        ([vector(0, "hook_mlp_out", 0)], {}, "refuses direction.0"),
        ([vector(1, "hook_resid_pre", 0)], {}, "refuses direction.0"),
        ([vector(1, "hook_mlp_out", 0)], {"architecture": None}, "architecture=<its llama.cpp"),
        ([vector(1, "hook_mlp_out", 0)], {"scales": [1.0, 2.0]}, "2 scales for 1 vectors"),
        ([vector(1, "hook_mlp_out", 0)], {"scales": -1.0}, "non-negative"),
        ([vector(1, "hook_mlp_out", 0)], {"path": "v.bin"}, "must be a file ending in .gguf"),
    ],
)
def test_what_cannot_be_exported(tmp_path: Path, vectors: list, kwargs: dict, message: str) -> None:
    options: dict[str, Any] = {"scales": 1.0, "architecture": "llama", **kwargs}
    path = tmp_path / options.pop("path", "v.gguf")
    with pytest.raises((TypeError, ValueError), match=message):
        tps.export_control_vector(vectors, path, **options)
    assert list(tmp_path.iterdir()) == []


def test_files_that_are_not_control_vectors(tmp_path: Path) -> None:
    import gguf

    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="damaged.gguf' is not a readable GGUF file"):
        tps.import_control_vector(damaged)
    model_file = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model_file), "llama")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 16).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="of 'llama', not a control vector"):
        tps.import_control_vector(model_file)
    with pytest.raises(ValueError, match="no control vector file"):
        tps.import_control_vector(tmp_path / "none.gguf")


def test_width_is_checked_when_steering(model: Any, tmp_path: Path) -> None:
    wide = tps.SteeringVector(torch.ones(32), 1, "hook_mlp_out", "test")
    path = tps.export_control_vector(wide, tmp_path / "w.gguf", scales=1.0, architecture="llama")
    (imported,) = tps.import_control_vector(path)
    with pytest.raises(ValueError, match="width 32 but the model's d_model is 16"):
        with tps.steer(model, imported, imported.norm):
            pass
    assert ModelAdapter(model).d_model == 16
