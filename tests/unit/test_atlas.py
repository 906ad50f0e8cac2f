"""The sensitivity atlas against per-pair exact SVDs, and its checkpointing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.reference import principal_angles, reference_jacobian
from tl_powersteer import atlas as atlas_module


def test_exact_matches_per_pair_svd(model: Any, tokens: torch.Tensor) -> None:
    atlas = tps.sensitivity_atlas(model, tokens, k=3, method="exact", progress=False)
    assert atlas.pairs() == [(s, t) for s in range(3) for t in range(1, 4) if t > s]
    for s, t in atlas.pairs():
        J = reference_jacobian(
            model, list(tokens), f"blocks.{s}.hook_mlp_out", f"blocks.{t}.hook_mlp_out", 4
        )
        S, Vh = torch.linalg.svd(J, full_matrices=False)[1:]
        torch.testing.assert_close(atlas.singular_values[s, t].double(), S[:3], rtol=1e-5, atol=0)
        torch.testing.assert_close(
            atlas.next_singular_value[s, t].double(), S[3], rtol=1e-5, atol=0
        )
        assert principal_angles(atlas.vectors(s, t), Vh[:3]).max() < 1e-4
    lower = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert atlas.singular_values[lower].isnan().all()
    assert atlas.singular_values[~lower].isfinite().all()


def test_power_agrees_with_exact(models: dict[str, Any], tokens: torch.Tensor) -> None:
    model = models["native_bridge"]
    exact = tps.sensitivity_atlas(model, tokens, k=2, method="exact", progress=False)
    power = tps.sensitivity_atlas(model, tokens, k=2, method="power", tol=1e-8, progress=False)
    assert power.method == "power" and (power.iterations[0, 1] > 1)
    for s, t in exact.pairs():
        torch.testing.assert_close(
            power.singular_values[s, t], exact.singular_values[s, t], rtol=1e-5, atol=0
        )
        assert principal_angles(power.vectors(s, t), exact.vectors(s, t)).max() < 1e-3
        assert power.converged[s, t]


def test_subsets_and_negative_layers(models: dict[str, Any], tokens: torch.Tensor) -> None:
    atlas = tps.sensitivity_atlas(
        models["native_bridge"], tokens, sources=[0, -3], targets=[-1], k=2, progress=False
    )
    assert atlas.sources == [0, 1] and atlas.targets == [3]
    assert atlas.pairs() == [(0, 3), (1, 3)]
    assert atlas.singular_values[0, 2].isnan().all()
    with pytest.raises(ValueError, match=r"pair 0 -> 2 is not in this atlas"):
        atlas.vectors(0, 2)


def test_table_gap_and_norms(models: dict[str, Any], tokens: torch.Tensor) -> None:
    atlas = tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, progress=False)
    df = atlas.to_pandas()
    assert list(df.columns) == [
        "source", "target", "rank", "singular_value", "method", "iterations", "converged",
    ]  # fmt: skip
    assert len(df) == 6 * 2
    row = df[(df.source == 1) & (df.target == 3) & (df["rank"] == 1)].iloc[0]
    assert row.singular_value == pytest.approx(float(atlas.singular_values[1, 3, 1]))
    gap = atlas.spectral_gap()
    assert gap[1, 3] == pytest.approx(
        float(atlas.singular_values[1, 3, 1] / atlas.next_singular_value[1, 3])
    )
    assert torch.all(gap[~gap.isnan()] >= 1)
    assert atlas.source_norms[:3].isfinite().all() and atlas.source_norms[3].isnan()


def test_auto_picks_the_cheaper_method() -> None:
    assert atlas_module._choose_method(d_model=640, n_sources=17, n_pairs=153, k=4) == "exact"
    assert atlas_module._choose_method(d_model=8192, n_sources=2, n_pairs=2, k=4) == "power"


def test_save_load(models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path) -> None:
    atlas = tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, progress=False)
    atlas.save(tmp_path / "a.safetensors")
    again = tps.load(tmp_path / "a.safetensors")
    assert isinstance(again, tps.SensitivityAtlas)
    assert torch.equal(again.singular_values.nan_to_num(-1), atlas.singular_values.nan_to_num(-1))
    assert again.pairs() == atlas.pairs() and again.is_complete()


class Interrupt(Exception):
    pass


def test_checkpoint_resumes_without_recomputing(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["native_bridge"]
    ckpt = tmp_path / "atlas.safetensors"
    computed: list[int] = []
    real_dense = tps.LayerJacobian.dense

    def dense_then_stop(self: tps.LayerJacobian) -> torch.Tensor:
        if len(computed) == 2:
            raise Interrupt  # as if Ctrl-C arrived during the third source layer
        computed.append(self.source)
        return real_dense(self)

    monkeypatch.setattr(tps.LayerJacobian, "dense", dense_then_stop)
    with pytest.raises(Interrupt):
        tps.sensitivity_atlas(model, tokens, k=2, method="exact", checkpoint=ckpt, progress=False)
    partial = tps.load(ckpt)
    assert partial.completed_sources == [0, 1] and not partial.is_complete()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.safetensors"]

    computed.clear()
    monkeypatch.setattr(
        tps.LayerJacobian, "dense", lambda self: (computed.append(self.source), real_dense(self))[1]
    )
    resumed = tps.sensitivity_atlas(
        model, tokens, k=2, method="exact", checkpoint=ckpt, progress=False
    )
    assert computed == [2] and resumed.is_complete()
    fresh = tps.sensitivity_atlas(model, tokens, k=2, method="exact", progress=False)
    torch.testing.assert_close(resumed.singular_values, fresh.singular_values, equal_nan=True)


def test_checkpoint_with_other_arguments_is_refused(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    ckpt = tmp_path / "atlas.safetensors"
    tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match=r"other arguments \(k: 2 there, 3 now\)"):
        tps.sensitivity_atlas(models["native_bridge"], tokens, k=3, checkpoint=ckpt, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "fast"}, ValueError, r"method must be one of \('auto', 'exact', 'power'\)"),
        ({"k": 0}, ValueError, "k must be an int between 1 and d_model - 1"),
        ({"sources": [3], "targets": [1]}, ValueError, "no pair with target > source"),
        ({"sources": 2}, TypeError, "sources must be a list"),
        ({"sources": [9]}, ValueError, "sources=9 is out of range"),
        ({"target_site": "hook_mlp"}, ValueError, "unknown site"),
        ({"positions": 9}, ValueError, "positions must be an int between 1 and 8"),
        ({"checkpoint": "x.pt"}, ValueError, r"checkpoint must be a \.safetensors path"),
    ],
)
def test_bad_arguments(
    models: dict[str, Any], tokens: torch.Tensor, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        tps.sensitivity_atlas(models["native_bridge"], tokens, progress=False, **kwargs)
