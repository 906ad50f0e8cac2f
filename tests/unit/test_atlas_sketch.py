"""The atlas's sketch method: lower bounds, accuracy against exact, its passes and their
checkpoints, and the widths of its bases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.helpers import Interrupt, interrupt_call
from tests.reference import principal_angles
from tl_powersteer.atlas import plan as plan_module
from tl_powersteer.atlas import run as run_module
from tl_powersteer.atlas import sketch as sketch_module
from tl_powersteer.atlas.checkpoint import load_checkpoint, save_checkpoint
from tl_powersteer.jacobian import RecordedJacobian


@pytest.mark.parametrize(("sources", "targets"), [(None, None), ([0, 1], [2, 3])])
def test_sketch_values_are_lower_bounds(
    models: dict[str, Any], tokens: torch.Tensor, sources: Any, targets: Any
) -> None:
    # The second case's first refined target already has two sources.
    model = models["native_bridge"]
    layers = {"sources": sources, "targets": targets, "k": 2, "progress": False}
    exact = tps.sensitivity_atlas(model, tokens, method="exact", **layers)
    sketch = tps.sensitivity_atlas(model, tokens, method="sketch", sketch_rank=3, **layers)
    gap = sketch.singular_values - exact.singular_values
    assert bool((gap.nan_to_num(0.0) <= 1e-12 * exact.singular_values.nan_to_num(1.0)).all())
    assert float(gap.nan_to_num(0.0).abs().max()) > 1e-6  # r = 3 < d_model: not exact


def test_sketch_at_full_rank_equals_exact(models: dict[str, Any], tokens: torch.Tensor) -> None:
    model = models["native_bridge"]
    exact = tps.sensitivity_atlas(model, tokens, k=2, method="exact", progress=False)
    sketch = tps.sensitivity_atlas(
        model, tokens, k=2, method="sketch", sketch_rank=16, progress=False
    )
    assert (
        sketch.method == "sketch"
        and sketch.sketch_rank == 16
        and not hasattr(sketch, "co_range_sketch")
    )
    for s, t in exact.pairs():
        torch.testing.assert_close(
            sketch.singular_values[s, t], exact.singular_values[s, t], rtol=1e-8, atol=0
        )
        assert principal_angles(sketch.vectors(s, t), exact.vectors(s, t)).max() < 1e-6


def test_sketch_matmul_dtype(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    model64 = models["native_bridge"]
    model32 = copy.deepcopy(model64).to(torch.float32)
    exact = tps.sensitivity_atlas(model64, tokens, k=2, method="exact", progress=False)
    made: list[Any] = []
    real_graph = run_module.RecordedPass

    def recording_graph(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs["matmul_dtype"])
        return real_graph(*args, **kwargs)

    monkeypatch.setattr(run_module, "RecordedPass", recording_graph)

    def sketch(model: Any, native: bool, **kwargs: Any) -> tps.SensitivityAtlas:
        monkeypatch.setattr(plan_module, "cpu_multiplies_bfloat16", lambda: native)
        return tps.sensitivity_atlas(
            model, tokens, k=2, method="sketch", sketch_rank=16, progress=False, **kwargs
        )

    def error(atlas: tps.SensitivityAtlas) -> float:
        rel = (atlas.singular_values - exact.singular_values).abs() / exact.singular_values
        return float(rel.nan_to_num(0.0).max())

    ckpt = tmp_path / "sketch.safetensors"
    atlases = {
        "native": sketch(model32, True, checkpoint=ckpt),
        "not native": sketch(model32, False),
        "asked for": sketch(model32, False, sketch_matmul_dtype=torch.bfloat16),
        "turned off": sketch(model32, True, sketch_matmul_dtype=torch.float32),
        "float64 model": sketch(model64, True),
    }
    chosen = ["bfloat16", "float32", "bfloat16", "float32", "float64"]
    assert [atlas.sketch_matmul_dtype for atlas in atlases.values()] == chosen
    assert made == [getattr(torch, name) for name in chosen]
    # At full rank (r = d_model) the sketch is exact but for its products' rounding.
    for name in ("not native", "turned off", "float64 model"):
        assert error(atlases[name]) < 1e-5, name
    for name in ("native", "asked for"):
        assert 1e-4 < error(atlases[name]) < 2e-2, name
    made.clear()
    exact32 = tps.sensitivity_atlas(model32, tokens, k=2, method="exact", progress=False)
    assert exact32.sketch_matmul_dtype == "" and made == [None]
    with pytest.raises(ValueError, match="sketch_matmul_dtype: 'bfloat16' there, 'float32' now"):
        sketch(model32, False, checkpoint=ckpt)


def test_sketch_draws_each_test_matrix_once(
    models: dict[str, Any], tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["native_bridge"]
    before = tps.sensitivity_atlas(model, tokens, k=2, method="sketch", progress=False)
    drawn: list[int] = []
    real = sketch_module.gaussian_block

    def recording(rows: int, cols: int, seed: int, layer: int, dtype: torch.dtype) -> Any:
        drawn.append(layer)
        return real(rows, cols, seed, layer, dtype)

    monkeypatch.setattr(sketch_module, "gaussian_block", recording)
    after = tps.sensitivity_atlas(model, tokens, k=2, method="sketch", progress=False)
    # One Ψ per target; the sources' bases come from the co-range sketches, not from a draw.
    assert sorted(drawn) == sorted(-1 - t for t in range(1, before.n_layers))
    torch.testing.assert_close(
        after.singular_values, before.singular_values, rtol=1e-12, atol=0, equal_nan=True
    )


def test_sketch_error_shrinks_with_rank(
    models: dict[str, Any], tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["native_bridge"]
    # The shared passes alone: every pair of the 4-layer model is short enough to be polished.
    monkeypatch.setattr(sketch_module, "POLISH_HOPS", 0)
    exact = tps.sensitivity_atlas(model, tokens, k=1, method="exact", progress=False)

    def mean_error(rank: int) -> float:
        sketch = tps.sensitivity_atlas(
            model, tokens, k=1, method="sketch", sketch_rank=rank, progress=False
        )
        rel = (sketch.singular_values - exact.singular_values).abs() / exact.singular_values
        return float(rel.nanmean())

    # d_model is 16: a basis of 4r columns is all of it from r = 4 on.
    errors = [mean_error(rank) for rank in (2, 3, 4)]
    assert errors[0] > errors[1] > 1e-6 and errors[2] < 1e-12


def test_sketch_checkpoint_resumes(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["native_bridge"]
    ckpt = tmp_path / "sketch.safetensors"
    # r = 3: each basis (12 of 16 columns) depends on the co-range sketches being resumed.
    real_matvec = interrupt_call(monkeypatch, "matvec", 1)
    with pytest.raises(Interrupt):
        tps.sensitivity_atlas(
            model, tokens, k=2, method="sketch", sketch_rank=3, checkpoint=ckpt, progress=False
        )
    partial, state = load_checkpoint(ckpt)
    assert state.completed_targets == [1, 2, 3] and partial.completed_sources == [0]
    assert state.co_range_sketch is not None and state.co_range_width == 3  # r
    assert state.co_range_sketch.shape[2] == 3 and state.basis_width == 12  # 4r
    monkeypatch.setattr(RecordedJacobian, "matvec", real_matvec)
    # A sketch made with other widths (an earlier version's shared basis of 3r, or one that
    # saved no widths) cannot be continued.
    for name, value, message in [
        ("co_range_width", 17, "co_range_width: 17 there, 3 now"),
        ("basis_width", 0, "basis_width: 0 there, 12 now"),
        ("range_width", 0, "range_width: 0 there, 4 now"),
    ]:
        other = tmp_path / f"other_{name}.safetensors"
        changed, changed_state = load_checkpoint(ckpt)
        setattr(changed_state, name, value)
        save_checkpoint(other, changed, changed_state)
        with pytest.raises(ValueError, match=message):
            tps.sensitivity_atlas(
                model, tokens, k=2, method="sketch", sketch_rank=3, checkpoint=other,
                progress=False,
            )  # fmt: skip
    resumed = tps.sensitivity_atlas(
        model, tokens, k=2, method="sketch", sketch_rank=3, checkpoint=ckpt, progress=False
    )
    fresh = tps.sensitivity_atlas(
        model, tokens, k=2, method="sketch", sketch_rank=3, progress=False
    )
    torch.testing.assert_close(resumed.singular_values, fresh.singular_values, equal_nan=True)
    assert load_checkpoint(ckpt)[1].co_range_sketch is None
    assert load_checkpoint(ckpt)[1].range_sketch is None


def test_sketch_refine_pass_improves_and_resumes(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["native_bridge"]
    monkeypatch.setattr(sketch_module, "POLISH_HOPS", 0)
    options: dict[str, Any] = {"k": 2, "method": "sketch", "sketch_rank": 3, "progress": False}
    exact = tps.sensitivity_atlas(model, tokens, k=2, method="exact", progress=False)
    refined = tps.sensitivity_atlas(model, tokens, **options)
    with monkeypatch.context() as patch:
        patch.setattr(sketch_module, "refine_phase", lambda *args: None)
        first = tps.sensitivity_atlas(model, tokens, **options)

    def error(atlas: tps.SensitivityAtlas) -> float:
        rel = (atlas.singular_values - exact.singular_values).abs() / exact.singular_values
        return float(rel.nanmean())

    assert error(refined) < 0.5 * error(first)
    # Every pair holds at least as much of its spectrum after the refining pass.
    energy = [(a.singular_values**2).sum(-1) for a in (refined, first)]
    assert bool((energy[0].nan_to_num(0) >= energy[1].nan_to_num(0)).all())

    # Interrupted after refining target 1 (three co-range passes, then one refining pass).
    ckpt = tmp_path / "refine.safetensors"
    real_rmatvec = interrupt_call(monkeypatch, "rmatvec", 4)
    with pytest.raises(Interrupt):
        tps.sensitivity_atlas(model, tokens, checkpoint=ckpt, **options)
    partial, state = load_checkpoint(ckpt)
    assert partial.completed_sources == [0, 1, 2] and state.refined_targets == [1]
    # Target 1's one source gives it all 4r directions of its basis (2k where it has more).
    assert state.range_sketch is not None and state.range_sketch.shape[-1] == 12
    assert state.range_width == 12
    monkeypatch.setattr(RecordedJacobian, "rmatvec", real_rmatvec)
    resumed = tps.sensitivity_atlas(model, tokens, checkpoint=ckpt, **options)
    torch.testing.assert_close(resumed.singular_values, refined.singular_values, equal_nan=True)
    done = load_checkpoint(ckpt)[1]
    assert done.refined_targets == [1, 2, 3] and done.range_sketch is None


def test_sketch_polishes_short_pairs_only_and_resumes(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["native_bridge"]
    options: dict[str, Any] = {"k": 2, "method": "sketch", "sketch_rank": 3, "progress": False}
    exact = tps.sensitivity_atlas(model, tokens, k=2, method="exact", progress=False)
    monkeypatch.setattr(sketch_module, "POLISH_HOPS", 1)
    with monkeypatch.context() as patch:
        patch.setattr(sketch_module, "polish_phase", lambda *args: None)
        shared = tps.sensitivity_atlas(model, tokens, **options)
    polished = tps.sensitivity_atlas(model, tokens, **options)

    def error(atlas: tps.SensitivityAtlas, hops: int) -> float:
        rel = (atlas.singular_values - exact.singular_values).abs() / exact.singular_values
        return max(float(rel[s, t].max()) for s, t in exact.pairs() if t - s == hops)

    # Adjacent layers take the Krylov step: much closer to exact, and never below the
    # shared passes' estimate, nor above the exact values.
    assert error(polished, 1) < 0.2 * error(shared, 1) and error(shared, 1) > 1e-4
    for s, t in exact.pairs():
        gain = polished.singular_values[s, t] - shared.singular_values[s, t]
        if t - s > 1:  # pairs further apart are left as they were
            assert torch.equal(polished.singular_values[s, t], shared.singular_values[s, t])
        else:
            assert float((polished.singular_values[s, t] ** 2).sum()) >= float(
                (shared.singular_values[s, t] ** 2).sum()
            )
            assert bool((gain.abs() > 0).any())
        assert bool(
            (polished.singular_values[s, t] <= exact.singular_values[s, t] * (1 + 1e-12)).all()
        )

    # Interrupted while polishing source 1: one matvec per source for the shared basis,
    # then one per polished pair (J Jᵀ U).
    ckpt = tmp_path / "polish.safetensors"
    real_matvec = interrupt_call(monkeypatch, "matvec", 3 + 1)
    with pytest.raises(Interrupt):
        tps.sensitivity_atlas(model, tokens, checkpoint=ckpt, **options)
    state = load_checkpoint(ckpt)[1]
    assert state.refined_targets == [1, 2, 3] and state.polished_sources == [0]
    assert state.polish_basis is not None and state.polish_rows is not None
    assert state.polish_basis.shape[2:] == (2 * 4 * 16, 4) and state.polish_rows.shape[2:] == (
        4,
        16,
    )
    monkeypatch.setattr(RecordedJacobian, "matvec", real_matvec)
    resumed = tps.sensitivity_atlas(model, tokens, checkpoint=ckpt, **options)
    torch.testing.assert_close(resumed.singular_values, polished.singular_values, equal_nan=True)
    done = load_checkpoint(ckpt)[1]
    assert done.polished_sources == [0, 1, 2] and done.polish_basis is None


def test_sketch_widths_fill_every_basis() -> None:
    r, k, d = 14, 4, 640  # Gemma 3 270M's defaults
    full = list(range(18))
    co_range, directions = sketch_module.sketch_widths(full[:-1], full[1:], r, k, d)
    # A whole atlas has partners enough everywhere but for a few targets' refining bases:
    # the last sources' pairs are short enough to be polished instead.
    assert set(co_range.values()) == {r}
    assert directions == {t: {4: 14, 5: 12, 6: 10}.get(t, 2 * k) for t in full[1:]}
    layouts = [
        ([2], [12]),  # one long pair
        (full[:-2], [16]),  # one target for many sources
        ([3], full),  # one source for many targets
        ([0, 1, 2, 3], [14, 15, 16, 17]),
        (full[:-1], full[1:]),
    ]
    for sources, targets in layouts:
        co_range, directions = sketch_module.sketch_widths(sources, targets, r, k, d)
        for s in sources:
            later = [t for t in targets if t > s]
            if later and later[-1] - s > sketch_module.POLISH_HOPS:
                assert sum(co_range[t] for t in later) >= 4 * r, (sources, targets, s)
        for t, m in directions.items():
            earlier = [s for s in sources if s < t]
            assert m <= 4 * r
            if t - earlier[0] > sketch_module.POLISH_HOPS:
                assert len(earlier) * m >= 4 * r, (sources, targets, t)


@pytest.mark.parametrize(
    ("sources", "targets"), [([0], [3]), ([0, 1, 2], [3]), ([0], [1, 2, 3]), (None, None)]
)
def test_sketch_bases_hold_no_filler(
    models: dict[str, Any],
    tokens: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
    sources: Any,
    targets: Any,
) -> None:
    # Every pair long enough to go unpolished: each basis must then be built from as many
    # sketched directions as it has columns, however few pairs share it.
    monkeypatch.setattr(sketch_module, "POLISH_HOPS", 0)
    built: list[tuple[int, int]] = []
    real_basis = sketch_module.shared_basis

    def spy(sketches: Any, width: int) -> torch.Tensor:
        built.append((sum(len(sketch) for sketch in sketches), width))
        assert not any(bool(sketch.isnan().any()) for sketch in sketches)
        return real_basis(sketches, width)

    monkeypatch.setattr(sketch_module, "shared_basis", spy)
    model = models["native_bridge"]
    layers = {"sources": sources, "targets": targets, "k": 2, "progress": False}
    exact = tps.sensitivity_atlas(model, tokens, method="exact", **layers)
    sketch = tps.sensitivity_atlas(model, tokens, method="sketch", sketch_rank=3, **layers)
    assert built and all(rows >= width for rows, width in built), built
    rel = (sketch.singular_values - exact.singular_values).abs() / exact.singular_values
    # 2e-3 at most here, where bases filled up with arbitrary directions erred by 5e-3 to 1e-2.
    assert float(rel.nan_to_num(0.0).max()) < 3e-3
