"""The sensitivity atlas against per-pair exact SVDs: methods, result, checkpoint, arguments, and
the next-token effects of its page."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.helpers import Interrupt
from tests.reference import principal_angles, reference_jacobian
from tl_powersteer.atlas import plan as plan_module
from tl_powersteer.jacobian import RecordedJacobian


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


@pytest.mark.parametrize("method", ["exact", "power", "sketch"])
def test_prompts_of_different_lengths_stack_their_jacobians(text_model: Any, method: str) -> None:
    # Several prompts of one fork: each read at its own last tokens, pads neither steered
    # nor read, and the pair's spectrum that of the stacked per-prompt Jacobians.
    prompts = ["the movie was good", "i watched the film last night and it was", "the cat sat"]
    options = {"sketch_rank": 16} if method == "sketch" else {"tol": 1e-10}
    atlas = tps.sensitivity_atlas(text_model, prompts, k=3, method=method, target_positions=2,
                                  progress=False, **options)  # fmt: skip
    assert atlas.prompts == prompts
    for s, t in atlas.pairs():
        J = reference_jacobian(text_model, [text_model.to_tokens(p)[0] for p in prompts],
                               f"blocks.{s}.hook_mlp_out", f"blocks.{t}.hook_mlp_out", 2)  # fmt: skip
        S, Vh = torch.linalg.svd(J, full_matrices=False)[1:]
        torch.testing.assert_close(atlas.singular_values[s, t].double(), S[:3], rtol=1e-6, atol=0)
        assert principal_angles(atlas.vectors(s, t).double(), Vh[:3]).max() < 1e-4
        result = tps.power_steer(text_model, prompts, s, t, k=3, target_positions=2, tol=1e-10)
        torch.testing.assert_close(result.singular_values.double(), S[:3], rtol=1e-6, atol=0)


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
    # Few targets for many sources: each source's basis is filled by widening the
    # co-range sketches to 2r rows, which makes the sketch dearer than the power method,
    # with four targets for any number of sources, and with six for ten (eleven tip it).
    assert choose(2304, layers[:22], layers[22:], k=4, sketch_rank=20) == "power"
    assert choose(2304, layers[:10], layers[20:], k=4, sketch_rank=20) == "power"
    assert choose(2304, layers[:11], layers[20:], k=4, sketch_rank=20) == "sketch"


def test_save_load(models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path) -> None:
    atlas = tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, progress=False)
    atlas.save(tmp_path / "a.safetensors")
    again = tps.load(tmp_path / "a.safetensors")
    assert isinstance(again, tps.SensitivityAtlas)
    assert torch.equal(again.singular_values.nan_to_num(-1), atlas.singular_values.nan_to_num(-1))
    assert again.pairs() == atlas.pairs() and again.is_complete()


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
        ({"checkpoint": "x.pt"}, ValueError, r"checkpoint must be a file ending in \.safetensors"),
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
        dp = (moved.double().softmax(-1) - base.double().softmax(-1)).mean(0)
        dl = (moved - base).mean(0).double()
        assert listed["kl"] == pytest.approx(mean_kl(base, moved), rel=1e-6)
        # Ranked by the change of probability, each with its change of logit.
        for kind, largest in (("promoted", True), ("suppressed", False)):
            ids = dp.topk(3, largest=largest).indices.tolist()
            assert [text for text, _, _ in listed[kind]] == [
                model.tokenizer.decode([i]) for i in ids
            ]
            assert [p for _, p, _ in listed[kind]] == pytest.approx(dp[ids].tolist(), abs=1e-6)
            assert [d for _, _, d in listed[kind]] == pytest.approx(dl[ids].tolist(), abs=1e-4)
    # A KL out of reach is shown at the largest scale searched, 64 typical norms.
    strong = tps.token_effects(model, atlas, kl=10.0, top=1, progress=False)
    found = {
        e[sign]["relative"] for pair in strong["pairs"].values() for e in pair for sign in "+-"
    }
    assert found == {64.0}


def test_token_moves_rank_by_probability_not_logit() -> None:
    from tl_powersteer.atlas.effects import TokenMoves

    base = torch.tensor([4.0, 3.0, -6.0, 0.0], dtype=torch.float64)
    # Token 2 is rare: its logit jumps by 5 while it gains almost no mass; token 0 loses
    # mass to token 1, the change a reader should see first.
    moved = torch.tensor([3.0, 4.0, -1.0, 0.0], dtype=torch.float64)
    dp = moved.softmax(-1) - base.softmax(-1)
    moves = TokenMoves.of(dp, moved - base, top=2)
    assert [i for i, _, _ in moves.up] == [1, 2]
    assert [i for i, _, _ in moves.down] == [0, 3]
    assert moves.up[0] == (1, pytest.approx(float(dp[1])), pytest.approx(1.0))
    assert (moved - base).topk(1).indices.item() == 2  # by logit the rare token would lead


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
