"""The sensitivity atlas against per-pair exact SVDs, and its checkpointing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.reference import principal_angles, reference_jacobian
from tl_powersteer import linalg
from tl_powersteer.atlas import plan as plan_module
from tl_powersteer.atlas import run as run_module
from tl_powersteer.atlas import sketch as sketch_module
from tl_powersteer.atlas.checkpoint import load_checkpoint, save_checkpoint
from tl_powersteer.jacobian import RecordedJacobian
from tl_powersteer.scales import kl_search


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


def test_repr_is_a_short_summary(models: dict[str, Any], tokens: torch.Tensor) -> None:
    import dataclasses

    atlas = tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, progress=False)
    top = atlas.singular_values[..., 0]
    assert float(top[0, 1]) == float(top.nan_to_num(-1).max())  # where this model peaks
    assert repr(atlas) == (
        f"SensitivityAtlas(model={atlas.model_name!r}, method='exact', pairs done 6/6, k=2, "
        "sources 0..2, targets 1..3, hook_mlp_out -> hook_mlp_out, target_positions=4, "
        f"largest σ1 {float(top[0, 1]):.4g} at L0 -> L1)"
    )
    subset = tps.sensitivity_atlas(
        models["native_bridge"], tokens, sources=[0, 1], targets=[3], k=2, progress=False
    )
    assert "pairs done 2/2, k=2, sources [0, 1], targets [3]," in repr(subset)
    empty = dataclasses.replace(
        atlas, completed_sources=[], singular_values=torch.full_like(top[..., None], torch.nan)
    )
    assert repr(empty).endswith("pairs done 0/6, k=1, sources 0..2, targets 1..3, "
                                "hook_mlp_out -> hook_mlp_out, target_positions=4)")  # fmt: skip


def test_auto_picks_a_method() -> None:
    choose = plan_module.choose_method
    gemma = list(range(18))
    assert choose(640, gemma[:-1], gemma[1:], k=4, sketch_rank=20) == "exact"
    layers = list(range(26))
    assert choose(2304, layers[:-1], layers[1:], k=4, sketch_rank=20) == "sketch"
    assert choose(8192, [3], [20], k=4, sketch_rank=20) == "power"
    # Two targets for eight sources: each source's basis is filled by widening the two
    # co-range sketches to 2r rows, which makes the sketch dearer than the power method on
    # the 16 pairs (18 pairs tip it back).
    assert choose(2304, layers[:8], [24, 25], k=4, sketch_rank=20) == "power"
    assert choose(2304, layers[:9], [24, 25], k=4, sketch_rank=20) == "sketch"


def test_save_load(models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path) -> None:
    atlas = tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, progress=False)
    atlas.save(tmp_path / "a.safetensors")
    again = tps.load(tmp_path / "a.safetensors")
    assert isinstance(again, tps.SensitivityAtlas)
    assert torch.equal(again.singular_values.nan_to_num(-1), atlas.singular_values.nan_to_num(-1))
    assert again.pairs() == atlas.pairs() and again.is_complete()


class Interrupt(Exception):
    pass


def interrupt_call(monkeypatch: pytest.MonkeyPatch, method: str, number: int) -> Any:
    """Make ``RecordedJacobian.<method>`` raise ``Interrupt`` at its call ``number`` (from 0);
    returns the real method, to put back."""
    real = getattr(RecordedJacobian, method)
    calls = [0]

    def stopping(self: RecordedJacobian, X: torch.Tensor) -> torch.Tensor:
        if calls[0] == number:
            raise Interrupt
        calls[0] += 1
        return real(self, X)

    monkeypatch.setattr(RecordedJacobian, method, stopping)
    return real


def test_checkpoint_resumes_without_recomputing(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = models["native_bridge"]
    ckpt = tmp_path / "atlas.safetensors"
    computed: list[int] = []
    real_dense = RecordedJacobian.dense

    def dense_then_stop(self: RecordedJacobian) -> torch.Tensor:
        if len(computed) == 2:
            raise Interrupt  # as if Ctrl-C arrived during the third source layer
        computed.append(self.source)
        return real_dense(self)

    monkeypatch.setattr(RecordedJacobian, "dense", dense_then_stop)
    with pytest.raises(Interrupt):
        tps.sensitivity_atlas(model, tokens, k=2, method="exact", checkpoint=ckpt, progress=False)
    partial = tps.load(ckpt)
    assert partial.completed_sources == [0, 1] and not partial.is_complete()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.safetensors"]

    computed.clear()
    monkeypatch.setattr(
        RecordedJacobian, "dense", lambda self: (computed.append(self.source), real_dense(self))[1]
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
        (
            {"method": "fast"},
            ValueError,
            r"method must be one of \('auto', 'exact', 'power', 'sketch'\)",
        ),
        ({"k": 0}, ValueError, "k must be an int between 1 and d_model - 1"),
        ({"sources": [3], "targets": [1]}, ValueError, "no pair with target > source"),
        ({"sources": 2}, TypeError, "sources must be a list"),
        ({"sources": [9]}, ValueError, "sources=9 is out of range"),
        ({"target_site": "hook_mlp"}, ValueError, "unknown site"),
        ({"target_positions": 9}, ValueError, "positions must be an int between 1 and 8"),
        ({"checkpoint": "x.pt"}, ValueError, r"checkpoint must be a \.safetensors path"),
        ({"sketch_rank": 2, "k": 2}, ValueError, "sketch_rank must be an int between k \\+ 1 = 3"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be a positive int \(or None"),
        (
            {"sketch_matmul_dtype": torch.float16},
            ValueError,
            r"sketch_matmul_dtype must be None, torch.bfloat16 or the model's torch.float64",
        ),
        ({"sketch_matmul_dtype": "bfloat16"}, TypeError, "sketch_matmul_dtype must be None"),
        ({"tol": -1.0}, ValueError, "tol must be a positive number"),
        ({"max_iters": 0}, ValueError, "max_iters must be at least 1"),
    ],
)
def test_bad_arguments(
    models: dict[str, Any],
    tokens: torch.Tensor,
    kwargs: dict,
    error: type,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_forward_pass(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a forward pass ran before the arguments were checked")

    model = models["native_bridge"]
    monkeypatch.setattr(model, "forward", no_forward_pass)
    with pytest.raises(error, match=message):
        tps.sensitivity_atlas(model, tokens, progress=False, **kwargs)


def test_shared_basis_holds_every_low_rank_sketch_exactly() -> None:
    gen = torch.Generator().manual_seed(0)

    def low_rank(rows: int, rank: int, cols: int = 30) -> torch.Tensor:
        left = torch.randn(rows, rank, generator=gen, dtype=torch.float64)
        return left @ torch.randn(rank, cols, generator=gen, dtype=torch.float64)

    # Three Jacobians of rank 3 with unrelated row spaces: a basis of 9 columns holds all.
    Js = [low_rank(40, 3) for _ in range(3)]
    sketches = [torch.randn(40, 12, generator=gen, dtype=torch.float64).T @ J for J in Js]
    basis = linalg.shared_basis(sketches, 9)
    assert basis.shape == (30, 9) and basis.dtype == torch.float64
    torch.testing.assert_close(basis.T @ basis, torch.eye(9, dtype=torch.float64))
    for J in Js:
        sig, nxt, V = linalg.top_k_in_basis(J @ basis, basis, k=2)
        S, Vh = torch.linalg.svd(J, full_matrices=False)[1:]
        torch.testing.assert_close(sig, S[:2], rtol=1e-10, atol=0)
        torch.testing.assert_close(nxt, S[2], rtol=1e-10, atol=0)
        assert principal_angles(V, Vh[:2]).max() < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_of_a_dense_jacobian_is_float64_accurate(dtype: torch.dtype) -> None:
    # Heavy-tailed like a layer Jacobian's spectrum; σ_5 close to σ_6, where a step on
    # the top k + 1 directions alone would mix them.
    gen = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(300, 80, generator=gen, dtype=torch.float64)).Q
    W = torch.linalg.qr(torch.randn(80, 80, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.cat(
        [torch.tensor([9.0, 5.0, 3.0, 2.0, 1.98, 1.9799]), torch.linspace(1.5, 0.1, 74)]
    )
    J = ((U * spectrum.double()) @ W.T).to(dtype)
    sig, nxt, V = linalg.top_k_svd(J, k=4)
    # The reference: a float64 SVD of the very matrix given (rounded to its dtype).
    S, Vh = torch.linalg.svd(J.double(), full_matrices=False)[1:]
    assert sig.dtype == nxt.dtype == V.dtype == torch.float64
    # float32 eigenvectors are orthonormal to ~1e-7 only: unless made orthonormal in
    # float64 before the Rayleigh-Ritz step, σ would be off by about that much.
    torch.testing.assert_close(sig, S[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(nxt, S[4], rtol=1e-10, atol=0)
    assert principal_angles(V, Vh[:4]).max() < (1e-8 if dtype == torch.float64 else 1e-4)


def test_rows_of_a_left_basis_give_the_exact_top_k() -> None:
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(40, 4, generator=gen, dtype=torch.float64) @ torch.randn(
        4, 30, generator=gen, dtype=torch.float64
    )
    # A left basis built from J's own top directions holds its column space: Qᵀ J is exact.
    left = linalg.top_directions(J, 4)
    Q = linalg.shared_basis([left.T], 6)
    sig, nxt, V, W = linalg.top_k_of_rows(Q.T @ J, k=3)
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    torch.testing.assert_close(sig, S[:3], rtol=1e-10, atol=0)
    torch.testing.assert_close(nxt, S[3], rtol=1e-10, atol=0)
    assert principal_angles(V, Vh[:3]).max() < 1e-8
    # J's top left directions within Q, in order (where the Krylov step starts), and those
    # of Z = J, each times its singular value (what the refining basis is built from).
    assert principal_angles((Q @ W[:, :4]).T, U[:, :4].T).max() < 1e-8
    torch.testing.assert_close(left.norm(dim=0), S[:4], rtol=1e-10, atol=0)
    assert principal_angles((left / S[:4]).T, U[:, :4].T).max() < 1e-8


def test_shared_basis_weighs_every_target_equally() -> None:
    gen = torch.Generator().manual_seed(1)
    # A large Jacobian with a flat spectrum and a tiny one of rank 1: unscaled, the tiny
    # one's direction would fall below the large one's top 4 and out of a 5-column basis.
    large = torch.randn(40, 30, generator=gen, dtype=torch.float64) * 1e3
    tiny = torch.randn(40, 1, generator=gen, dtype=torch.float64) @ torch.randn(
        1, 30, generator=gen, dtype=torch.float64
    )
    psi = torch.randn(40, 20, generator=gen, dtype=torch.float64)
    sketches = [psi.T @ large, psi.T @ tiny]
    exact = torch.linalg.svdvals(tiny)[0]

    def error(basis: torch.Tensor) -> float:
        sig = linalg.top_k_in_basis(tiny @ basis, basis, k=1)[0]
        return float((exact - sig[0]) / exact)

    unscaled = torch.linalg.svd(torch.cat(sketches).T, full_matrices=False).U[:, :5]
    assert error(unscaled) > 0.1
    assert 0 <= error(linalg.shared_basis(sketches, 5)) < 1e-3
    # A target whose Jacobian is zero adds nothing and no NaN; short stacks are completed.
    basis = linalg.shared_basis([torch.zeros(2, 30, dtype=torch.float64)], 6)
    assert basis.shape == (30, 6) and bool(torch.isfinite(basis).all())
    torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=torch.float64))


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


def test_token_effects_match_a_direct_steered_run(models: dict[str, Any]) -> None:
    model = models["hf_bridge"]
    prompts = ["the cat sat on the mat", "i liked it"]
    atlas = tps.sensitivity_atlas(model, prompts, sources=[0], targets=[2, 3], k=2, progress=False)
    # This random-weight model is nearly insensitive: 2e-3 nats needs ~8 typical norms.
    effects = tps.token_effects(model, atlas, kl=2e-3, top=3, progress=False)
    assert effects["kl"] == 2e-3 and sorted(effects["pairs"]) == ["0,2", "0,3"]

    def steered(vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at each prompt's last token, unsteered and with the vector added."""
        base, moved = [], []
        for prompt in prompts:
            tokens = model.to_tokens(prompt)
            with torch.no_grad():
                base.append(model(tokens)[0, -1])
                moved.append(
                    model.run_with_hooks(
                        tokens,
                        fwd_hooks=[("blocks.0.hook_mlp_out", lambda act, hook: act + vector)],
                    )[0, -1]
                )
        return torch.stack(base), torch.stack(moved)

    def mean_kl(base: torch.Tensor, moved: torch.Tensor) -> float:
        log_p, log_q = moved.double().log_softmax(-1), base.double().log_softmax(-1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    unit = float(atlas.source_norms[0])
    assert unit == pytest.approx(tps.typical_norm(model, prompts, 0, "hook_mlp_out"), rel=1e-6)
    # Every vector and sign is shown within 10% (0.1 in log) of the KL asked for.
    for pair in effects["pairs"].values():
        for entry in pair:
            for sign in "+-":
                assert abs(math.log(entry[sign]["kl"] / 2e-3)) <= 0.1
                assert entry[sign]["relative"] == pytest.approx(entry[sign]["scale"] / unit)
    v = atlas.vectors(0, 3)[1].to(torch.float64)
    entry = effects["pairs"]["0,3"][1]
    for sign, direction in (("+", v), ("-", -v)):
        listed = entry[sign]
        base, moved = steered(direction * listed["scale"])
        expected = (moved - base).mean(0)
        assert listed["kl"] == pytest.approx(mean_kl(base, moved), rel=1e-6)
        top_ids = expected.topk(3).indices.tolist()
        assert [text for text, _ in listed["promoted"]] == [
            model.tokenizer.decode([i]) for i in top_ids
        ]
        assert [d for _, d in listed["promoted"]] == pytest.approx(
            expected.topk(3).values.tolist(), abs=1e-4
        )
        low = expected.topk(3, largest=False)
        assert [d for _, d in listed["suppressed"]] == pytest.approx(low.values.tolist(), abs=1e-4)
    # A KL out of reach is shown at the largest scale searched, 64 typical norms.
    strong = tps.token_effects(model, atlas, kl=10.0, top=1, progress=False)
    found = {
        e[sign]["relative"] for pair in strong["pairs"].values() for e in pair for sign in "+-"
    }
    assert found == {64.0}


def test_token_effects_refuse_another_model(models: dict[str, Any], tokens: torch.Tensor) -> None:
    atlas = tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, progress=False)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="kl must be a positive number of nats"):
            tps.token_effects(models["native_bridge"], atlas, kl=bad)  # type: ignore[arg-type]
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    other = TransformerBridge.boot_native(
        TransformerBridgeConfig(
            d_model=8, d_head=4, n_heads=2, n_layers=2, n_ctx=16, d_vocab=20, d_mlp=16
        )
    )
    with pytest.raises(ValueError, match="not the one the atlas was computed on"):
        tps.token_effects(other, atlas)


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


def _kl_curves(a: torch.Tensor, p: torch.Tensor, cap: float = math.inf) -> Any:
    """A ``kl_at`` for rows whose KL is a·scale^p (at most ``cap``), counting calls per
    row; each payload is the scale it was evaluated at."""
    calls = torch.zeros(len(a), dtype=torch.long)

    def kl_at(rows: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        calls[rows] += 1
        return (a[rows] * scales ** p[rows]).clamp(max=cap), scales.tolist()

    return kl_at, calls


def test_kl_matched_scales_on_known_curves() -> None:
    a = torch.tensor([1e-3, 2e-2, 0.5, 4.0, 1e-4, 3e-3], dtype=torch.float64)
    p = torch.tensor([2.0, 1.6, 1.3, 1.2, 3.0, 1.0], dtype=torch.float64)
    kl_at, calls = _kl_curves(a, p)
    n = len(a)
    probe = torch.full((n,), 1.0, dtype=torch.float64)
    bounds = (
        torch.full((n,), 1e-3, dtype=torch.float64),
        torch.full((n,), 1e3, dtype=torch.float64),
    )
    scales, kls, payloads = kl_search(kl_at, probe, 0.7, bounds, tol=0.1, rounds=6)
    torch.testing.assert_close(kls, a * scales**p)
    assert (kls / 0.7).log().abs().max() <= 0.1
    assert payloads == scales.tolist()  # the payload of the evaluation that was kept
    # KL ∝ scale² is hit by the first step; the others take a few more.
    assert calls[0] == 2 and calls.max() <= 5
    assert float(scales[0]) == pytest.approx((0.7 / 1e-3) ** 0.5)


def test_kl_matched_scales_stop_at_what_they_cannot_reach() -> None:
    # Row 0 saturates at 0.3 nats; row 1 never moves; row 2 exceeds the target at the
    # smallest scale allowed.
    a = torch.tensor([1e-2, 0.0, 50.0], dtype=torch.float64)
    p = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    kl_at, calls = _kl_curves(a, p, cap=0.3)
    kl_at_big, _ = _kl_curves(a[2:], p[2:])
    probe = torch.full((3,), 1.0, dtype=torch.float64)
    bounds = (
        torch.full((3,), 0.5, dtype=torch.float64),
        torch.full((3,), 64.0, dtype=torch.float64),
    )
    scales, kls, _ = kl_search(kl_at, probe, 1.0, bounds, tol=0.1, rounds=6)
    assert float(kls[0]) == pytest.approx(0.3) and float(kls[1]) == 0.0
    assert ((scales >= 0.5) & (scales <= 64.0)).all() and (calls <= 7).all()
    high, high_kl, _ = kl_search(
        kl_at_big, probe[2:], 1.0, (bounds[0][2:], bounds[1][2:]), tol=0.1, rounds=6
    )
    assert float(high) == 0.5 and float(high_kl) == pytest.approx(25.0)
