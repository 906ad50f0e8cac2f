"""Atlas shards merged against the atlas one run computes, and shards that must be refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps


def _atlas(model: Any, tokens: torch.Tensor, **options: Any) -> tps.SensitivityAtlas:
    return tps.sensitivity_atlas(model, tokens, k=2, progress=False, **options)


def _assert_same(merged: tps.SensitivityAtlas, whole: tps.SensitivityAtlas) -> None:
    for f in dataclasses.fields(whole):
        ours, theirs = getattr(merged, f.name), getattr(whole, f.name)
        if isinstance(theirs, torch.Tensor):
            assert ours.dtype == theirs.dtype, f.name
            assert torch.equal(ours.nan_to_num(-7.0), theirs.nan_to_num(-7.0)), f.name
        else:
            assert ours == theirs, f.name


@pytest.mark.parametrize("method", ["exact", "power"])
def test_shards_merge_to_the_unsharded_atlas(
    model: Any, tokens: torch.Tensor, method: str, tmp_path: Path
) -> None:
    whole = _atlas(model, tokens, method=method)
    first = _atlas(model, tokens, method=method, sources=[2])
    second = _atlas(model, tokens, method=method, sources=slice(0, 2))
    first.save(tmp_path / "first.safetensors")
    before = second.singular_values.clone()
    # Paths and objects, in any order, with an overlapping shard that agrees.
    merged = tps.merge_atlases(
        [tmp_path / "first.safetensors", second, _atlas(model, tokens, method=method, sources=[1])]
    )
    _assert_same(merged, whole)
    assert torch.equal(second.singular_values.nan_to_num(), before.nan_to_num())
    assert second.sources == [0, 1]  # the shards are left as they were
    merged.save(tmp_path / "merged.safetensors")
    _assert_same(tps.load(tmp_path / "merged.safetensors"), whole)


def test_sketch_shards_merge_into_a_valid_sketch(
    models: dict[str, Any], tokens: torch.Tensor
) -> None:
    model = models["native_bridge"]
    exact = _atlas(model, tokens, method="exact")
    shards = [_atlas(model, tokens, method="sketch", sources=[s], sketch_rank=3) for s in range(3)]
    merged = tps.merge_atlases(shards)
    assert merged.sources == [0, 1, 2] and merged.is_complete()
    for s, t in merged.pairs():
        shard = shards[s]
        assert torch.equal(merged.singular_values[s, t], shard.singular_values[s, t])
        # still lower bounds of the exact spectrum (full-precision products on a float64 model)
        assert (merged.singular_values[s, t] <= exact.singular_values[s, t] * (1 + 1e-9)).all()


def _changed(atlas: tps.SensitivityAtlas, **fields: Any) -> tps.SensitivityAtlas:
    return dataclasses.replace(atlas, **fields)


@pytest.fixture
def shards(models: dict[str, Any], tokens: torch.Tensor) -> list[tps.SensitivityAtlas]:
    model = models["native_bridge"]
    return [_atlas(model, tokens, method="exact", sources=[s]) for s in (0, 1)]


def test_shards_of_other_settings_are_refused(
    models: dict[str, Any], tokens: torch.Tensor, shards: list[tps.SensitivityAtlas]
) -> None:
    model = models["native_bridge"]
    other = {
        "prompts": _atlas(model, tokens[:1], method="exact", sources=[1]),
        "target_site": _atlas(model, tokens, method="exact", sources=[1], target_site="hook_resid_post"),
        "k": tps.sensitivity_atlas(model, tokens, k=3, method="exact", sources=[1], progress=False),
        "method": _atlas(model, tokens, method="power", sources=[1]),
        "targets": _atlas(model, tokens, method="exact", sources=[1], targets=[2, 3]),
        "target_positions": _atlas(model, tokens, method="exact", sources=[1], target_positions=2),
        "weights_fingerprint": _changed(shards[1], weights_fingerprint="0" * 16),
        "config_hash": _changed(shards[1], provenance={**shards[1].provenance, "config_hash": "x"}),
        "dtype": _changed(
            shards[1],
            singular_values=shards[1].singular_values.float(),
        ),
    }  # fmt: skip
    for key, shard in other.items():
        key_text = "tokens" if key == "prompts" else key
        with pytest.raises(ValueError, match=rf"shard 1 was computed with another {key_text} "):
            tps.merge_atlases([shards[0], shard])


def test_overlapping_sources_that_disagree_are_refused(
    shards: list[tps.SensitivityAtlas],
) -> None:
    values = shards[1].singular_values.clone()
    values[1, 3, 1] *= 1.001
    with pytest.raises(
        ValueError, match=r"shards 1 and 2 both computed source layer 1 .*σ2 of L1 -> L3"
    ):
        tps.merge_atlases([shards[0], shards[1], _changed(shards[1], singular_values=values)])
    vectors = shards[1].right_vectors.clone()
    vectors[1, 2, 0] = torch.roll(vectors[1, 2, 0], 1)
    with pytest.raises(ValueError, match=r"disagree on vector #0 of L1 -> L2"):
        tps.merge_atlases([shards[1], _changed(shards[1], right_vectors=vectors)])
    norms = shards[1].source_norms.clone()
    norms[1] *= 2
    with pytest.raises(ValueError, match=r"disagree on the source norm"):
        tps.merge_atlases([shards[1], _changed(shards[1], source_norms=norms)])
    # a sign flip is the same singular vector
    flipped = shards[1].right_vectors.clone()
    flipped[1] *= -1
    merged = tps.merge_atlases([shards[1], _changed(shards[1], right_vectors=flipped)])
    assert torch.equal(merged.right_vectors[1, 2], shards[1].right_vectors[1, 2])


def test_bad_shards(
    models: dict[str, Any], tokens: torch.Tensor, shards: list[tps.SensitivityAtlas], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="shards is empty"):
        tps.merge_atlases([])
    with pytest.raises(TypeError, match="must be a list"):
        tps.merge_atlases(shards[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shard 1 is a int; expected a SensitivityAtlas"):
        tps.merge_atlases([shards[0], 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"shard 1: .*missing.safetensors is not a file"):
        tps.merge_atlases([shards[0], tmp_path / "missing.safetensors"])
    vector = tps.SteeringVector(torch.ones(8), layer=0, site="hook_mlp_out", method="custom")
    vector.save(tmp_path / "vector.safetensors")
    with pytest.raises(TypeError, match=r"holds a SteeringVector, not an atlas"):
        tps.merge_atlases([tmp_path / "vector.safetensors"])
    unfinished = _changed(shards[1], completed_sources=[])
    with pytest.raises(ValueError, match=r"shard 1 has not finished source layers \[1\]: rerun"):
        tps.merge_atlases([shards[0], unfinished])
    with pytest.raises(ValueError, match=r"rtol must be a number in \[0, 1\)"):
        tps.merge_atlases(shards, rtol=2.0)
