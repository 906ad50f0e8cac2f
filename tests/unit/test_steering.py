"""Applying vectors: the steer context, positions under generation, scales, generations."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tl_powersteer.positions import position_mask
from tl_powersteer.scales import kl_scale, robust_norm

SITE = "hook_resid_post"

pytestmark = pytest.mark.usefixtures("no_grad")


def vector(model: Any, layer: int = 1, seed: int = 0) -> tps.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    return tps.SteeringVector(
        torch.randn(d, generator=gen, dtype=torch.float64), layer, SITE, "custom"
    )


def logits_with(model: Any, tokens: torch.Tensor, hooks: list[tuple[str, Any]]) -> torch.Tensor:
    with model.hooks(fwd_hooks=hooks):
        return model(tokens)


def add_at(delta: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
    def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
        weight = torch.ones(act.shape[1]) if mask is None else mask[: act.shape[1]]
        return act + weight[:, None].to(act.dtype) * delta.to(act.dtype)

    return add


def n_hooks(model: Any) -> int:
    return sum(len(point._forward_hooks) for point in model.hook_dict.values())


def test_vector_is_unit_and_checked() -> None:
    v = tps.SteeringVector(torch.tensor([3.0, 4.0]), 2, SITE, "custom", norm=5.0)
    assert torch.allclose(v.direction, torch.tensor([0.6, 0.8]))
    assert v.hook_name == "blocks.2.hook_resid_post" and v.name == "custom L2"
    # An optimised direction is kept as plain data, off the autograd graph.
    found = torch.tensor([3.0, 4.0], requires_grad=True) * 2
    kept = tps.SteeringVector(found, 2, SITE, "custom")
    assert not kept.direction.requires_grad and kept.direction.device.type == "cpu"
    with pytest.raises(ValueError, match="non-zero"):
        tps.SteeringVector(torch.zeros(3), 0, SITE, "custom")
    with pytest.raises(ValueError, match="finite"):
        tps.SteeringVector(torch.tensor([1.0, float("nan")]), 0, SITE, "custom")
    with pytest.raises(ValueError, match="one vector"):
        tps.SteeringVector(torch.ones(2, 3), 0, SITE, "custom")
    with pytest.raises(TypeError, match="float tensor"):
        tps.SteeringVector([1.0, 2.0], 0, SITE, "custom")  # type: ignore[arg-type]


def test_vector_save_load(tmp_path: Any) -> None:
    v = tps.SteeringVector(torch.randn(6), 1, SITE, "caa", norm=2.5, metadata={"name": "x", "n": 3})
    v.save(tmp_path / "v.safetensors")
    again = tps.load(tmp_path / "v.safetensors")
    assert isinstance(again, tps.SteeringVector)
    assert torch.equal(again.direction, v.direction)
    assert (again.layer, again.site, again.method, again.norm, again.metadata) == (
        1, SITE, "caa", 2.5, {"name": "x", "n": 3},
    )  # fmt: skip


def test_steer_adds_scale_times_direction(model: Any, tokens: torch.Tensor) -> None:
    v = vector(model)
    with tps.steer(model, v, 3.0) as steering:
        steered = model(tokens)
    assert steering.scales == [3.0]
    expected = logits_with(model, tokens, [(v.hook_name, add_at(3.0 * v.direction))])
    torch.testing.assert_close(steered, expected, rtol=0, atol=1e-12)
    assert (steered - model(tokens)).abs().max() > 1e-3


def test_steer_composes_and_nests(model: Any, tokens: torch.Tensor) -> None:
    a, b = vector(model, 1, seed=1), vector(model, 2, seed=2)
    with tps.steer(model, [a, b], [2.0, -1.5]):
        together = model(tokens)
    with tps.steer(model, a, 2.0), tps.steer(model, b, -1.5):
        nested = model(tokens)
    expected = logits_with(
        model,
        tokens,
        [(a.hook_name, add_at(2.0 * a.direction)), (b.hook_name, add_at(-1.5 * b.direction))],
    )
    torch.testing.assert_close(together, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(nested, expected, rtol=0, atol=1e-12)


def test_steer_leaves_no_hook_behind_on_exception(model: Any, tokens: torch.Tensor) -> None:
    before, clean = n_hooks(model), model(tokens)
    with pytest.raises(RuntimeError, match="boom"), tps.steer(model, vector(model), 5.0):
        assert n_hooks(model) > before
        raise RuntimeError("boom")
    assert n_hooks(model) == before
    torch.testing.assert_close(model(tokens), clean, rtol=0, atol=0)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(
    "positions", ["all", "prompt", "generated", 2, -1, slice(3, None), slice(1, 7, 2)]
)
def test_positions_under_generate(model: Any, positions: Any, use_cache: bool) -> None:
    """The activations seen during generate equal one full pass over the final sequence
    with the vector added at the positions the rule names, counted in the full sequence."""
    v, prompt, n_new = vector(model, 1), torch.tensor([[1, 4, 6, 8, 9]]), 4
    target = "blocks.3.hook_resid_post"
    seen: list[torch.Tensor] = []
    with (
        tps.steer(model, v, 6.0, positions=positions),
        model.hooks(fwd_hooks=[(target, lambda act, hook: seen.append(act.detach().clone()))]),
    ):
        out = tps.adapters.ModelAdapter(model).generate(
            prompt, max_new_tokens=n_new, greedy=True, use_cache=use_cache, stop_at_eos=False
        )
    assert out.shape[1] == prompt.shape[1] + n_new
    mask = position_mask(positions, 0, out.shape[1], prompt.shape[1])
    reference: list[torch.Tensor] = []
    with model.hooks(
        fwd_hooks=[
            (v.hook_name, add_at(6.0 * v.direction, mask)),
            (target, lambda act, hook: reference.append(act.detach())),
        ]
    ):
        model(out[:, :-1])
    full = reference[0][0]
    # Each pass's activations, placed at their absolute positions.
    offset = 0
    for act in seen:
        n = act.shape[1]
        start = 0 if n > 1 else offset
        torch.testing.assert_close(act[0], full[start : start + n], rtol=1e-9, atol=1e-9)
        offset = start + n
    assert offset == out.shape[1] - 1


def test_new_prompt_in_the_same_block_restarts_positions(model: Any) -> None:
    v = vector(model, 1)
    first, second = torch.tensor([[1, 4, 6, 8]]), torch.tensor([[1, 5, 7, 13, 14]])
    with tps.steer(model, v, 6.0, positions="prompt"):
        model(first)
        steered = model(second)  # not a continuation of the first: all of it is prompt
    expected = logits_with(model, second, [(v.hook_name, add_at(6.0 * v.direction))])
    torch.testing.assert_close(steered, expected, rtol=0, atol=1e-12)


def test_position_mask_rules() -> None:
    assert position_mask("prompt", 0, 6, 4).tolist() == [1, 1, 1, 1, 0, 0]
    assert position_mask("generated", 3, 3, 4).tolist() == [0, 1, 1]
    assert position_mask(-1, 0, 5, 4).tolist() == [0, 0, 0, 1, 0]
    assert position_mask(slice(-2, None), 0, 6, 4).tolist() == [0, 0, 1, 1, 1, 1]
    assert position_mask(slice(0, 5, 2), 0, 6, 4).tolist() == [1, 0, 1, 0, 1, 0]


def test_robust_norm_ignores_massive_dimensions() -> None:
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 64, generator=gen, dtype=torch.float64)
    plain = float(acts.norm(dim=-1).median())
    assert robust_norm(acts) == pytest.approx(plain)  # no outlier: the plain median norm
    massive = acts.clone()
    massive[:, [3, 17]] *= 400
    assert float(massive.norm(dim=-1).median()) > 50 * plain
    keep = [i for i in range(64) if i not in (3, 17)]
    assert robust_norm(massive) == pytest.approx(float(acts[:, keep].norm(dim=-1).median()))


def test_relative_scale_uses_the_typical_norm(text_model: Any) -> None:
    prompt = "i watched the movie last night"
    v = vector(text_model, 1)
    unit = tps.typical_norm(text_model, prompt, 1, SITE)
    with tps.steer(text_model, v, 0.5, scale_mode="relative", reference=prompt) as s:
        pass
    assert s.scales == [pytest.approx(0.5 * unit)]
    with pytest.raises(ValueError, match="reference"):
        with tps.steer(text_model, v, 0.5, scale_mode="relative"):
            pass


@pytest.mark.parametrize("sign", [1, -1])
def test_kl_scale_reaches_the_target(text_model: Any, sign: int) -> None:
    prompts = ["i watched the movie last night", "the cat sat on the mat"]
    v = vector(text_model, 1)
    unit = tps.typical_norm(text_model, prompts, 1, SITE)
    target = 0.5 * float(tps.effect(text_model, prompts, v, [4 * unit], signs=[sign])["kl"].mean())
    a = kl_scale(text_model, prompts, v, target, sign=sign)
    table = tps.effect(text_model, prompts, v, [a], signs=[sign])
    assert table["kl"].mean() == pytest.approx(target, rel=1e-3)
    with tps.steer(text_model, v, -target * sign, scale_mode="kl", reference=prompts) as s:
        pass
    other = kl_scale(text_model, prompts, v, target, sign=-sign)
    assert s.scales == [pytest.approx(-sign * other)]


def test_generate_steered_table(text_model: Any) -> None:
    prompt = "i watched the movie last night"
    v = vector(text_model, 1)
    table = tps.generate_steered(text_model, prompt, [v], [0.0, 40.0], max_new_tokens=5)
    assert list(table.columns) == [
        "vector", "method", "layer", "site", "sign", "scale", "absolute_scale", "text",
    ]  # fmt: skip
    assert list(table["sign"]) == [0, 1, 1, -1, -1] and table.loc[0, "vector"] == "baseline"
    tokens = text_model.to_tokens(prompt)
    plain = text_model.generate(tokens, max_new_tokens=5, do_sample=False, verbose=False)
    assert table.loc[0, "text"] == text_model.tokenizer.decode(plain[0, tokens.shape[1] :])
    assert table.loc[1, "text"] == table.loc[0, "text"]  # scale 0 changes nothing
    assert table.loc[2, "text"] != table.loc[0, "text"]
    again = tps.generate_steered(text_model, prompt, [v], [0.0, 40.0], max_new_tokens=5)
    assert again.equals(table)


def test_sampling_is_seeded_and_leaves_the_global_rng(text_model: Any) -> None:
    prompt, v = "the cat sat", vector(text_model, 1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = tps.generate_steered(text_model, prompt, v, 5.0, greedy=False, seed=7, max_new_tokens=6)
    assert torch.equal(torch.get_rng_state(), state)
    b = tps.generate_steered(text_model, prompt, v, 5.0, greedy=False, seed=7, max_new_tokens=6)
    assert a.equals(b)


def test_bad_input_is_refused_before_any_work(text_model: Any, monkeypatch: Any) -> None:
    v = vector(text_model, 1)

    def no_generation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("generation started")

    monkeypatch.setattr(tps.adapters.ModelAdapter, "generate", no_generation)
    wrong = tps.SteeringVector(torch.randn(7), 1, SITE, "custom")
    cases: list[tuple[dict[str, Any], type, str]] = [
        ({"vectors": wrong}, ValueError, "d_model"),
        (
            {"vectors": tps.SteeringVector(torch.randn(16), 1, "hook_nope", "x")},
            ValueError,
            "unknown site",
        ),
        ({"vectors": []}, ValueError, "no steering vectors"),
        ({"scales": [float("inf")]}, ValueError, "finite"),
        ({"scales": []}, ValueError, "empty"),
        ({"positions": "middle"}, ValueError, "'all', 'prompt', 'generated'"),
        ({"positions": 40}, ValueError, "does not fit a prompt"),
        ({"signs": (2,)}, ValueError, "signs"),
        ({"scale_mode": "huge"}, ValueError, "absolute"),
        ({"prompt": ["a", "b"]}, TypeError, "one prompt"),
    ]
    for change, error, message in cases:
        kwargs: dict[str, Any] = {"prompt": "the cat sat", "vectors": v, "scales": 1.0, **change}
        with pytest.raises(error, match=message):
            tps.generate_steered(text_model, kwargs.pop("prompt"), kwargs.pop("vectors"),
                                 kwargs.pop("scales"), **kwargs)  # fmt: skip
    with (
        pytest.raises(ValueError, match="does not fit"),
        tps.steer(text_model, v, 1.0, positions=9),
    ):
        text_model(torch.tensor([[1, 4, 6]]))
    assert n_hooks(text_model) == 0


def test_power_steer_results_give_vectors(model: Any, tokens: torch.Tensor) -> None:
    res = tps.power_steer(model, tokens, source=1, target=3, k=2)
    v = res.steering_vector(1)
    assert (v.layer, v.site, v.method) == (1, "hook_mlp_out", "power_steering")
    assert torch.equal(v.direction, res.vectors[1])
    assert v.metadata["singular_value"] == pytest.approx(float(res.singular_values[1]))
    assert v.name == "power_steering L1->L3 #1"
    assert [u.metadata["rank"] for u in res.steering_vectors()] == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        res.steering_vector(2)


def test_last_token_logits_equal_the_full_forward(model: Any, tokens: torch.Tensor) -> None:
    """The last-token shortcut (stop at the unembedding, apply it to one position) gives
    the logits of the full forward pass."""
    from tl_powersteer.adapters import ModelAdapter, TokenBatch, steered_logits

    adapter = ModelAdapter(model)
    lengths = torch.tensor([8, 5])
    batch = TokenBatch(tokens, lengths, None)
    v = vector(model, 1)
    deltas = torch.stack([torch.zeros(model.cfg.d_model, dtype=torch.float64), 2.0 * v.direction])
    fast = steered_logits(adapter, batch, v.hook_name, deltas)
    full = steered_logits(adapter, batch, v.hook_name, deltas, last_only=False)
    torch.testing.assert_close(fast, full[:, [0, 1], [7, 4]], rtol=0, atol=1e-12)
    mask = batch.mask.double()[..., None]
    expected = logits_with(
        model, tokens, [(v.hook_name, lambda act, hook: act + mask * 2.0 * v.direction)]
    )
    torch.testing.assert_close(fast[1], expected[[0, 1], [7, 4]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("site", ["hook_resid_pre", "hook_mlp_out", "hook_resid_post"])
def test_replayed_prefix_runs_equal_the_full_forward(
    model: Any, tokens: torch.Tensor, site: str
) -> None:
    """``steered_runs`` computes the blocks before the hook once and replays them; every
    call still gives the full, cache-free forward pass's last-token logits, at each layer,
    on a padded batch, call after call."""
    from tl_powersteer.adapters import ModelAdapter, TokenBatch, steered_runs

    adapter = ModelAdapter(model)
    batch = TokenBatch(tokens, torch.tensor([8, 5]), None)
    mask = batch.mask.double()[..., None]
    before = model(tokens.flip(1))
    for layer in range(model.cfg.n_layers):
        hook = adapter.hook_name(layer, site)
        deltas = torch.stack([s * vector(model, layer, seed=layer).direction for s in (0, 2, -3)])
        with steered_runs(adapter, batch, hook, chunk=2) as run:
            first, again = run(deltas), run(deltas[1:])
        for i, delta in enumerate(deltas):
            expected = logits_with(
                model, tokens, [(hook, lambda act, hook, d=delta: act + mask * d)]
            )
            torch.testing.assert_close(
                first[i], expected[[0, 1], [7, 4]].double(), rtol=0, atol=1e-10
            )
        torch.testing.assert_close(again, first[1:], rtol=0, atol=1e-12)
    # The replay is undone: other tokens run as before.
    torch.testing.assert_close(model(tokens.flip(1)), before, rtol=0, atol=0)


def test_replayed_passes_skip_the_block_a_delta_leaves_unchanged(
    model: Any, tokens: torch.Tensor
) -> None:
    """A delta at a block's last addition to the residual stream reaches the next block's
    input unchanged, so ``steered_runs`` steers there and replays the hook's own block
    too; a delta that the block still transforms (at its input or its attention output),
    or one in the last block, leaves the block running on every pass."""
    from tl_powersteer.adapters import ModelAdapter, TokenBatch, steered_runs

    adapter = ModelAdapter(model)
    batch = TokenBatch(tokens, torch.tensor([8, 5]), None)
    last = model.cfg.n_layers - 1
    deltas = torch.ones(3, model.cfg.d_model, dtype=torch.float64)
    for layer in range(model.cfg.n_layers):
        inside = model.hook_dict[f"blocks.{layer}.hook_resid_mid"]
        for site in ("hook_mlp_out", "hook_resid_post", "hook_attn_out", "hook_resid_pre"):
            with steered_runs(adapter, batch, adapter.hook_name(layer, site)) as run:
                calls: list[int] = []
                handle = inside.register_forward_hook(lambda *args, calls=calls: calls.append(1))
                try:
                    run(deltas)
                finally:
                    handle.remove()
            skipped = layer < last and site in ("hook_mlp_out", "hook_resid_post")
            assert (len(calls) == 0) == skipped, (layer, site, len(calls))


def test_long_steering_work_shows_progress(
    text_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt, v = "the cat sat on the mat", vector(text_model, 1)
    target = 0.5 * float(tps.effect(text_model, prompt, v, [0.05], progress=False)["kl"].min())
    assert capsys.readouterr().err == ""
    tps.generate_steered(text_model, prompt, v, [target], scale_mode="kl", max_new_tokens=2)
    err = capsys.readouterr().err
    assert "KL scale search" in err and "generations" in err
    tps.effect(text_model, [prompt, "the dog"], v, [1.0])
    assert "effects" in capsys.readouterr().err
    tps.generate_steered(text_model, prompt, v, [target], scale_mode="kl", max_new_tokens=2,
                         progress=False)  # fmt: skip
    assert capsys.readouterr().err == ""


def test_streamed_kl_passes_equal_the_kl_of_the_logits(model: Any, tokens: torch.Tensor) -> None:
    """``run.kl`` gives ``kl_divergence`` of ``run``'s logits and their columns, for every
    model class; past its one check of the unembedding it never forms whole-vocabulary
    logits (the unembedding module is not called again)."""
    from tl_powersteer.adapters import ModelAdapter, TokenBatch, steered_runs
    from tl_powersteer.scales import kl_divergence

    adapter = ModelAdapter(model)
    batch = TokenBatch(tokens, torch.tensor([8, 5]), None)
    v = vector(model, 1)
    deltas = torch.stack([s * v.direction for s in (0.0, 1.0, -3.0)])
    calls: list[int] = []
    handle = model.unembed.register_forward_hook(lambda *args: calls.append(1))
    try:
        with steered_runs(adapter, batch, v.hook_name, chunk=2) as run:
            base = run(torch.zeros(1, model.cfg.d_model, dtype=torch.float64))[0]
            logits = run(deltas)
            before = len(calls)
            kls, columns = run.kl(deltas, base, [3, 5])
            again, _ = run.kl(deltas, base, [3, 5])
    finally:
        handle.remove()
    assert kls.shape == (3, 2) and columns.shape == (3, 2, 2)
    torch.testing.assert_close(kls, kl_divergence(logits, base[None]), rtol=0, atol=1e-12)
    torch.testing.assert_close(columns, logits[..., [3, 5]], rtol=0, atol=1e-12)
    assert float(kls[0].abs().max()) < 1e-12 and bool((kls[1:] > 0).all())
    torch.testing.assert_close(again, kls, rtol=0, atol=0)
    assert len(calls) - before <= 1


def capped_model(kind: str) -> Any:
    from tests.helpers import TINY_CONFIG

    if kind == "hooked":
        try:
            from transformer_lens import HookedTransformer, HookedTransformerConfig
        except ImportError:
            pytest.skip("HookedTransformer is not in this TransformerLens version")
        cfg = HookedTransformerConfig(
            **TINY_CONFIG, dtype=torch.float64, output_logits_soft_cap=0.5
        )
        return HookedTransformer(cfg)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    bridge_cfg = TransformerBridgeConfig(**TINY_CONFIG, output_logits_soft_cap=0.5)
    return TransformerBridge.boot_native(bridge_cfg, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["hooked", "native_bridge"])
def test_capped_logits_are_those_of_the_full_forward(kind: str) -> None:
    """A model that caps its logits after the unembedding (Gemma 2) gets no last-token
    shortcut past the cap: steered logits and their KL are the full pass's."""
    from tl_powersteer.adapters import ModelAdapter, TokenBatch, steered_logits, steered_runs
    from tl_powersteer.scales import kl_divergence

    model = capped_model(kind)
    tokens = torch.tensor([[1, 4, 6, 8, 9, 4, 10, 5]])
    batch = TokenBatch(tokens, torch.tensor([8]), None)
    v = vector(model, 1)
    deltas = torch.stack([0.0 * v.direction, 2.0 * v.direction])
    with model.hooks(fwd_hooks=[(v.hook_name, add_at(2.0 * v.direction))]):
        expected = model(tokens)[:, -1]
    base = model(tokens)[:, -1]
    assert float(expected.abs().max()) <= 0.5
    found = steered_logits(ModelAdapter(model), batch, v.hook_name, deltas)
    torch.testing.assert_close(found[1], expected, rtol=0, atol=1e-12)
    with steered_runs(ModelAdapter(model), batch, v.hook_name) as run:
        kls, _ = run.kl(deltas, base, [3])
    torch.testing.assert_close(kls[1], kl_divergence(expected, base), rtol=0, atol=1e-12)
