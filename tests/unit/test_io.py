"""Files: damaged, truncated or edited ones are refused with one ValueError naming the file,
never accepted and never a raw traceback."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tl_powersteer as tps
from tests.helpers import WORDS
from tl_powersteer.atlas.checkpoint import load_checkpoint, save_checkpoint
from tl_powersteer.io import digest, split_fields


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    (ta, fa), (tb, fb) = split_fields(a), split_fields(b)

    def bits(x: torch.Tensor) -> torch.Tensor:  # NaN == NaN, bit for bit
        return x.contiguous().reshape(-1).view(torch.uint8)

    return (
        fa == fb
        and ta.keys() == tb.keys()
        and all(ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape for k in ta)
        and all(torch.equal(bits(ta[k]), bits(tb[k])) for k in ta)
    )


@pytest.fixture
def saved(models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path) -> list[tuple[Path, Any]]:
    model = models["native_bridge"]
    results = [
        tps.power_steer(model, tokens, 0, 2, k=2),
        tps.sensitivity_atlas(model, tokens, k=1, method="sketch", sketch_rank=3, progress=False),
        tps.SteeringVector(torch.randn(16), 1, "hook_mlp_out", "custom", metadata={"a": [1]}),
    ]
    out = []
    for i, result in enumerate(results):
        path = tmp_path / f"r{i}.safetensors"
        result.save(path)
        out.append((path, result))
    return out


def test_damaged_files_are_refused_or_load_unchanged(
    saved: list[tuple[Path, Any]], tmp_path: Path
) -> None:
    """Truncations and flipped bytes anywhere in the file: each either raises ValueError
    (naming the file) or loads an object equal to the saved one, never anything else."""
    rng = random.Random(0)
    refused = 0
    for path, result in saved:
        data = path.read_bytes()
        cases = [data[: rng.randrange(len(data))] for _ in range(15)]
        for _ in range(45):
            damaged = bytearray(data)
            where = rng.randrange(len(damaged))
            damaged[where] ^= 1 << rng.randrange(8)
            cases.append(bytes(damaged))
        for i, case in enumerate(cases):
            broken = tmp_path / f"broken{i}.safetensors"
            broken.write_bytes(case)
            try:
                again = tps.load(broken)
            except ValueError as err:
                assert str(broken) in str(err)
                refused += 1
                continue
            assert same(again, result), f"case {i} of {path.name} loaded a different object"
    assert refused > 100


@pytest.mark.parametrize(
    "header",
    [
        "null",
        "[1, 2]",
        '"text"',
        "{}",
        '{"kind": "PowerSteeringResult", "schema_version": 1}',
        '{"kind": 3, "schema_version": 1, "fields": {}}',
        '{"kind": "PowerSteeringResult", "schema_version": "1", "fields": {}}',
        '{"kind": "PowerSteeringResult", "schema_version": true, "fields": {}}',
        '{"kind": "PowerSteeringResult", "schema_version": 1, "fields": []}',
        '{"kind": "PowerSteeringResult", "schema_version": 1, "fields": {}}',
        '{"kind": "Nothing", "schema_version": 1, "fields": {}}',
        "[" * 100_000,
        "{not json",
    ],
)
def test_malformed_headers_are_one_value_error(
    saved: list[tuple[Path, Any]], tmp_path: Path, header: str
) -> None:
    path, _ = saved[0]
    tensors = load_file(str(path))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"tl_powersteer": header})
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        tps.load(bad)


def forge(path: Path, change: Any) -> None:
    """Rewrite a file with ``change(tensors, fields)`` applied and a digest that matches,
    as someone who knows the format would: only the invariants can catch it."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["tl_powersteer"])
    tensors = load_file(str(path))
    change(tensors, header["fields"])
    header["digest"] = digest(header["kind"], tensors, header["fields"])
    save_file(tensors, str(path), metadata={"tl_powersteer": json.dumps(header)})


def test_forged_contents_break_the_invariants(saved: list[tuple[Path, Any]]) -> None:
    path, _ = saved[0]
    forge(path, lambda tensors, fields: tensors["singular_values"].neg_())
    with pytest.raises(ValueError, match="negative singular values"):
        tps.load(path)
    forge(path, lambda tensors, fields: tensors["singular_values"].copy_(torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="not in descending order"):
        tps.load(path)


def test_a_checkpoint_marking_an_unfinished_source_done_is_refused(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    model = models["native_bridge"]
    ckpt = tmp_path / "atlas.safetensors"
    tps.sensitivity_atlas(model, tokens, k=1, checkpoint=ckpt, progress=False)
    atlas, state = load_checkpoint(ckpt)
    atlas.singular_values[0, 1] = float("nan")
    save_checkpoint(ckpt, atlas, state)
    with pytest.raises(ValueError, match=r"L0 -> L1 has singular values that are not finite"):
        tps.sensitivity_atlas(model, tokens, k=1, checkpoint=ckpt, progress=False)


def test_string_prompts_longer_than_the_context_are_refused(text_model: Any) -> None:
    n_ctx = int(text_model.cfg.n_ctx)
    long = " ".join(WORDS[4:] * 3)
    with pytest.raises(ValueError, match=rf"prompt 1 is \d+ tokens long.*n_ctx = {n_ctx}"):
        tps.power_steer(text_model, ["the cat", long], 0, 2, k=2)


def test_saving_onto_a_folder_is_refused(saved: list[tuple[Path, Any]], tmp_path: Path) -> None:
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        saved[0][1].save(folder)
    assert [p.name for p in folder.iterdir()] == []


def test_a_checkpoint_of_other_weights_is_refused(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    """Same name ("native"), same shapes, other weights: resuming would mix two models,
    and the page would measure one model's vectors on another."""
    import copy

    from tl_powersteer.adapters import ModelAdapter

    model = models["native_bridge"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    mine, again = ModelAdapter(model), ModelAdapter(copy.deepcopy(model))
    assert mine.weights_fingerprint() == again.weights_fingerprint()
    assert mine.weights_fingerprint() != ModelAdapter(other).weights_fingerprint()
    ckpt = tmp_path / "atlas.safetensors"
    atlas = tps.sensitivity_atlas(model, tokens, k=1, checkpoint=ckpt, progress=False)
    assert atlas.weights_fingerprint == mine.weights_fingerprint()
    with pytest.raises(ValueError, match="computed on other weights than this model's"):
        tps.sensitivity_atlas(other, tokens, k=1, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="weights are not those the atlas was computed on"):
        tps.token_effects(other, atlas, progress=False)
    # A checkpoint of the first release, which recorded no weights, still resumes.
    old, state = load_checkpoint(ckpt)
    old.weights_fingerprint = ""
    save_checkpoint(ckpt, old, state)
    resumed = tps.sensitivity_atlas(model, tokens, k=1, checkpoint=ckpt, progress=False)
    torch.testing.assert_close(resumed.singular_values, atlas.singular_values, equal_nan=True)
