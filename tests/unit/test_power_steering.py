"""power_steer against the exact SVD of the dense Jacobian, and saving results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import tl_powersteer as tps
from tests.reference import principal_angles, reference_jacobian
from tl_powersteer.io import digest


def test_matches_exact_svd(model: Any, tokens: torch.Tensor) -> None:
    res = tps.power_steer(model, tokens, source=0, target=3, k=4, tol=1e-9, max_iters=200)
    J = reference_jacobian(model, list(tokens), "blocks.0.hook_mlp_out", "blocks.3.hook_mlp_out", 4)
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    assert res.converged
    torch.testing.assert_close(res.singular_values, S[:4], rtol=1e-7, atol=0)
    assert principal_angles(res.vectors, Vh[:4]).max() < 1e-3
    for i in range(4):  # each vector up to sign
        sign = torch.sign(res.vectors[i] @ Vh[i])
        torch.testing.assert_close(res.vectors[i], sign * Vh[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(res.left_vectors[i], sign * U[:, i], atol=1e-4, rtol=0)


def test_defaults_reach_benchmark_accuracy(model: Any, tokens: torch.Tensor) -> None:
    res = tps.power_steer(model, tokens, source=1, target=3, k=4)
    J = tps.LayerJacobian(model, tokens, source=1, target=3).dense()
    S, Vh = torch.linalg.svd(J, full_matrices=False)[1:]
    assert ((res.singular_values - S[:4]).abs() / S[:4]).max() < 1e-3
    assert principal_angles(res.vectors, Vh[:4]).max() < 1e-2


def test_result_contract(model: Any, tokens: torch.Tensor) -> None:
    res = tps.power_steer(model, tokens, source=0, target=2, k=3)
    assert res.vectors.shape == (3, 16)
    assert res.singular_values.shape == (3,)
    assert res.left_vectors.shape == (3, 2 * 4 * 16)
    assert res.residuals.shape == (3,)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(res.vectors @ res.vectors.T, eye, atol=1e-12, rtol=0)
    assert torch.all(res.singular_values[:-1] >= res.singular_values[1:])
    # J v = σ u against the dense Jacobian, and the residual is what it says it is.
    J = tps.LayerJacobian(model, tokens, source=0, target=2).dense()
    torch.testing.assert_close(
        res.vectors @ J.T, res.singular_values[:, None] * res.left_vectors, atol=1e-10, rtol=0
    )
    adjoint = res.left_vectors @ J - res.singular_values[:, None] * res.vectors
    torch.testing.assert_close(
        res.residuals, adjoint.norm(dim=1) / res.singular_values, atol=1e-9, rtol=1e-6
    )
    b = 3 + 4
    assert (res.n_jvp, res.n_vjp) == (res.iterations * b, res.iterations * b)
    assert (res.source, res.target, res.target_positions) == (0, 2, 4)
    assert res.source_site == res.target_site == "hook_mlp_out"
    pivots = res.vectors.gather(1, res.vectors.abs().argmax(1, keepdim=True))
    assert torch.all(pivots > 0)


def test_deterministic_under_seed(model: Any, tokens: torch.Tensor) -> None:
    a = tps.power_steer(model, tokens, 0, 2, k=2, seed=3, max_iters=2)
    b = tps.power_steer(model, tokens, 0, 2, k=2, seed=3, max_iters=2)
    c = tps.power_steer(model, tokens, 0, 2, k=2, seed=4, max_iters=2)
    assert torch.equal(a.vectors, b.vectors)
    assert not torch.equal(a.vectors, c.vectors)


def test_string_prompt(text_model: Any) -> None:
    res = tps.power_steer(text_model, "i watched the film last night", source=1, target=3, k=2)
    assert res.prompts == ["i watched the film last night"]
    assert res.vectors.shape == (2, 16)


def test_options_are_keyword_only(model: Any, tokens: torch.Tensor) -> None:
    with pytest.raises(TypeError):
        tps.power_steer(model, tokens, 0, 2, 4)  # type: ignore[misc]
    with pytest.raises(TypeError):
        tps.LayerJacobian(model, tokens, 0, 2, "hook_mlp_out")  # type: ignore[misc]


def test_save_load_roundtrip(text_model: Any, tmp_path: Path) -> None:
    res = tps.power_steer(text_model, ["the cat sat", "i liked it"], 0, 2, k=3, seed=5)
    path = tmp_path / "vectors.safetensors"
    res.save(str(path))
    again = tps.load(path)
    assert isinstance(again, tps.PowerSteeringResult)
    names = ("vectors", "singular_values", "left_vectors", "residuals", "history", "error_bounds")
    for name in names:
        assert torch.equal(getattr(again, name), getattr(res, name)), name
    for name in (
        "iterations",
        "converged",
        "n_jvp",
        "n_vjp",
        "source",
        "target",
        "seed",
        "source_site",
        "target_site",
        "target_positions",
        "prompts",
        "model_name",
        "angle_bound",
        "stop_rule",
    ):
        assert getattr(again, name) == getattr(res, name), name
    assert list(tmp_path.iterdir()) == [path]
    raw = path.read_bytes()
    assert b"library_version" in raw and b"schema_version" in raw and b"pickle" not in raw


def test_save_load_token_prompts(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    res = tps.power_steer(models["native_bridge"], tokens, 0, 1, k=2)
    res.save(tmp_path / "t.safetensors")
    again = tps.load(tmp_path / "t.safetensors")
    assert again.prompts is None and torch.equal(again.tokens, tokens)


def test_to_pandas(models: dict[str, Any], tokens: torch.Tensor) -> None:
    res = tps.power_steer(models["native_bridge"], tokens, 0, 1, k=2)
    df = res.to_pandas()
    assert list(df.columns) == [
        "source", "target", "rank", "singular_value", "error_bound", "residual"
    ]  # fmt: skip
    assert df["singular_value"].tolist() == res.singular_values.tolist()
    assert df["error_bound"].tolist() == res.error_bounds.tolist()
    assert res.stop_rule == "tol" and bool((res.error_bounds <= 1e-4).all())


def test_save_errors_leave_nothing(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    res = tps.power_steer(models["native_bridge"], tokens, 0, 1, k=2)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        res.save(tmp_path / "v.pt")
    with pytest.raises(ValueError, match="does not exist"):
        res.save(tmp_path / "missing" / "v.safetensors")
    res.tokens = "not a tensor"  # type: ignore[assignment]
    res.prompts = [object()]  # type: ignore[list-item]
    with pytest.raises(TypeError):
        res.save(tmp_path / "v.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="no such file"):
        tps.load(tmp_path / "nope.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not written by tl_powersteer"):
        tps.load(other)


def test_load_refuses_fields_it_does_not_know(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    """A file from a version with other fields (an atlas checkpoint written mid-run by an
    older layout, say) is refused by name, not with a constructor's TypeError."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "atlas.safetensors"
    atlas = tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, progress=False)
    atlas.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["leading_vectors"] = torch.zeros(2)
    # As that version would write it: with a digest of what it holds.
    header = json.loads(metadata["tl_powersteer"])
    header["digest"] = digest(header["kind"], tensors, header["fields"])
    save_file(tensors, str(path), metadata={"tl_powersteer": json.dumps(header)})
    with pytest.raises(ValueError, match=r"does not know: \['leading_vectors'\].*recompute"):
        tps.load(path)
