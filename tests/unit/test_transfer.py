"""The held-out protocol: matched KL per prompt against direct passes, choices made on the
fit prompts only, random levels and bootstrap intervals, generation metrics, checkpoints,
bad input, and the steerability curves."""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.helpers import forge, no_forward_pass
from tl_powersteer.transfer import RANDOM, TransferResult, bootstrap_means

SITE = "hook_resid_post"
FIT = ["i watched the movie last night", "the cat sat on the mat", "the dog was good"]
HELD = ["it was not very good", "the film was bad but i liked it"]
ANSWERS = ("good", "bad")


def vector(model: Any, layer: int = 1, seed: int = 0, method: str = "custom") -> tps.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64)
    return tps.SteeringVector(direction, layer, SITE, method, metadata={"name": f"{method} {seed}"})


def budgets_for(model: Any, vectors: list[tps.SteeringVector]) -> tuple[float, float]:
    """Two KL budgets every vector and random direction reaches on these tiny models."""
    kl = tps.effect(model, FIT + HELD, vectors, [0.25], scale_mode="relative",
                    reference=FIT + HELD, progress=False)["kl"].min()  # fmt: skip
    return (0.1 * float(kl), 0.4 * float(kl))


def direct(
    model: Any, text: str, direction: torch.Tensor, hook: str, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [seq, vocab] with ``direction`` added at every position: an independent pass."""
    tokens = model.to_tokens(text) if tokens is None else tokens

    def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + direction.to(act.dtype)

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, add)]):
        return model(tokens)[0].double()


def kl_of(steered: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p, q = steered.log_softmax(-1), base.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.fixture
def measured(text_model: Any) -> tuple[Any, list[tps.SteeringVector], TransferResult]:
    vs = [vector(text_model, seed=s, method="mine") for s in range(2)] + [
        vector(text_model, seed=7, method="theirs")
    ]
    budgets = budgets_for(text_model, vs + tps.random_vectors(16, 1, SITE, 3))
    result = tps.transfer(text_model, FIT, HELD, vs, answers=ANSWERS, kl_budgets=budgets,
                          controls=3, draws=200, progress=False)  # fmt: skip
    return text_model, vs, result


def test_every_row_is_at_its_budget_and_its_effect_is_the_direct_one(
    measured: tuple[Any, list[tps.SteeringVector], TransferResult],
) -> None:
    model, vs, result = measured
    assert result.complete and result.methods == ["mine", "theirs", RANDOM]
    good, bad = (model.to_single_token(w) for w in ANSWERS)
    controls = tps.random_vectors(16, 1, SITE, 3)
    for which, prompts in (("fit", FIT), ("eval", HELD)):
        effects = getattr(result, f"{which}_effects")
        kls = getattr(result, f"{which}_kls")
        for p, text in enumerate(prompts):
            base = direct(model, text, torch.zeros(16), vs[0].hook_name)[-1]
            for i, v in enumerate(vs):
                for j, sign in enumerate((1, -1)):
                    for b, budget in enumerate(result.kl_budgets):
                        scale = float(getattr(result, f"{which}_scales")[i, j, b, p])
                        steered = direct(model, text, sign * scale * v.direction, v.hook_name)[-1]
                        # Each prompt's own scale puts its own KL at the budget.
                        assert float(kl_of(steered, base)) == pytest.approx(budget, rel=2e-3)
                        assert float(kls[i, j, b, p]) == pytest.approx(
                            float(kl_of(steered, base)), rel=1e-9
                        )
                        moved = float(steered[good] - steered[bad] - base[good] + base[bad])
                        assert float(effects[i, j, b, p]) == pytest.approx(moved, abs=1e-9)
        # The controls are random_vectors at the candidates' hook, seeded as asked.
        ctl = getattr(result, f"control_{which}_kls")
        assert ctl.shape == (3, 2, 2, len(prompts)) and result.control_layers == [1, 1, 1]
        ratio = ctl / torch.tensor(result.kl_budgets, dtype=torch.float64)[None, None, :, None]
        assert float((ratio - 1).abs().max()) <= 2e-3
    assert [c.name for c in controls] == [f"random#{i} L1" for i in range(3)]


def test_choices_are_made_on_the_fit_prompts_only(
    measured: tuple[Any, list[tps.SteeringVector], TransferResult],
) -> None:
    _, _, result = measured
    table = result.to_pandas()
    for row in table.itertuples():
        if row.method == RANDOM:
            fit, held = result.control_fit_effects, result.control_eval_effects
            members = list(range(3))
        else:
            members = [i for i, label in enumerate(result.labels) if label == row.method]
            fit, held = result.fit_effects, result.eval_effects
        b = result.kl_budgets.index(row.budget)
        means = {(i, j): float(fit[i, j, b].mean()) for i in members for j in range(2)}
        (i, j) = max(means, key=lambda key: abs(means[key]))
        direction = 1 if means[(i, j)] > 0 else -1
        assert row.sign == (1, -1)[j] and row.direction == direction
        assert row.fit_effect == pytest.approx(abs(means[(i, j)]))
        # The held-out effect is that row's, signed by the fit direction, whatever it is.
        assert row.effect == pytest.approx(direction * float(held[i, j, b].mean()))
        level = result.control_eval_effects[:, :, b].mean(dim=-1).abs().flatten()
        assert row.random_mean == pytest.approx(float(level.mean()))
        assert row.random_q90 == pytest.approx(float(level.quantile(0.9)))
        assert row.ratio == pytest.approx(row.effect / row.random_mean)
        assert row.effect_low <= row.effect <= row.effect_high or math.isclose(
            row.effect_low, row.effect_high
        )
    # Each method's chosen budget is the one with the best ratio on the fit prompts.
    for _, rows in table.groupby("method"):
        assert int(rows["chosen_budget"].sum()) == 1
        assert rows.loc[rows["chosen_budget"], "fit_ratio"].item() == rows["fit_ratio"].max()
    summary = result.summary()
    assert list(summary["method"]) == result.methods and summary["chosen_budget"].all()


def test_a_goal_fixes_the_direction(text_model: Any) -> None:
    vs = [vector(text_model, seed=s) for s in range(2)]
    budgets = budgets_for(text_model, vs + tps.random_vectors(16, 1, SITE, 2))
    kwargs = dict(answers=ANSWERS, kl_budgets=budgets, controls=2, draws=0, progress=False)
    up = tps.transfer(text_model, FIT, HELD, vs, goal=1, **kwargs).to_pandas()
    down = tps.transfer(text_model, FIT, HELD, vs, goal=-1, **kwargs).to_pandas()
    assert (up["direction"] == 1).all() and (down["direction"] == -1).all()
    # Without resamples there are no intervals.
    assert up["effect_low"].isna().all()
    # Raising and lowering pick opposite extremes of the same fit effects.
    assert (up["fit_effect"] >= -down["fit_effect"] - 1e-12).all()


def test_bootstrap_resamples_prompts_jointly() -> None:
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]])
    draws = bootstrap_means(values, draws=500, seed=3)
    assert draws.shape == (2, 500)
    # Rows resampled with the same prompts differ by the same constant in every draw.
    torch.testing.assert_close(draws[1] - draws[0], torch.full((500,), 10.0))
    assert float(draws[0].min()) >= 0 and float(draws[0].max()) <= 3
    again = bootstrap_means(values, draws=500, seed=3)
    assert torch.equal(draws, again)
    low, high = draws[0].quantile(torch.tensor([0.025, 0.975], dtype=draws.dtype))
    assert float(low) < 1.5 < float(high)


def test_kl_over_the_continuation_is_the_teacher_forced_mean(
    generation_models: dict[str, Any],
) -> None:
    model = generation_models["gpt2"]
    v = tps.SteeringVector(torch.randn(model.cfg.d_model, dtype=torch.float64), 1,
                           "hook_resid_post", "custom")  # fmt: skip
    prompts = ["hello there", "one two"]
    result = tps.transfer(model, prompts[:1], prompts[1:], [v], answers=(5, 6),
                          kl_budgets=(0.02,), controls=1, kl_over="continuation",
                          max_new_tokens=5, draws=0, progress=False)  # fmt: skip
    for which, text in (("fit", prompts[0]), ("eval", prompts[1])):
        tokens = model.to_tokens(text)
        n = tokens.shape[1]
        out = model.generate(tokens, max_new_tokens=5, do_sample=False, verbose=False)
        for j, sign in enumerate((1, -1)):
            scale = float(getattr(result, f"{which}_scales")[0, j, 0, 0])
            base = direct(model, text, torch.zeros(model.cfg.d_model), v.hook_name, out)
            steered = direct(model, text, sign * scale * v.direction, v.hook_name, out)
            kls = kl_of(steered[n - 1 : -1], base[n - 1 : -1])
            assert float(getattr(result, f"{which}_kls")[0, j, 0, 0]) == pytest.approx(
                float(kls.mean()), rel=1e-9
            )
            assert float(kls.mean()) == pytest.approx(0.02, rel=2e-3)
            # The logit difference is still read at the prompt's last token.
            moved = steered[n - 1, 5] - steered[n - 1, 6] - base[n - 1, 5] + base[n - 1, 6]
            assert float(getattr(result, f"{which}_effects")[0, j, 0, 0]) == pytest.approx(
                float(moved), abs=1e-9
            )


def test_a_text_scorer_scores_the_steered_generations(generation_models: dict[str, Any]) -> None:
    model = generation_models["gpt2"]
    v = tps.SteeringVector(torch.randn(model.cfg.d_model, dtype=torch.float64), 1,
                           "hook_resid_post", "custom")  # fmt: skip

    def vowels(text: str) -> float:
        return float(len(re.findall(r"[aeiou]", text)))

    prompts = ["hello there", "one two"]
    result = tps.transfer(model, prompts[:1], prompts[1:], [v], metric=vowels,
                          kl_budgets=(0.5,), controls=1, max_new_tokens=6, draws=0,
                          progress=False)  # fmt: skip
    assert result.metric == "vowels"
    for which, text in (("fit", prompts[0]), ("eval", prompts[1])):
        baseline = tps.generate_steered(model, text, v, [0.0], signs=[1], max_new_tokens=6)
        base_score = vowels(baseline.loc[0, "text"])
        assert float(getattr(result, f"{which}_baseline")[0]) == base_score
        for j, sign in enumerate((1, -1)):
            scale = float(getattr(result, f"{which}_scales")[0, j, 0, 0])
            table = tps.generate_steered(model, text, v, [scale], signs=[sign], max_new_tokens=6)
            expected = vowels(table.iloc[-1]["text"]) - base_score
            assert float(getattr(result, f"{which}_effects")[0, j, 0, 0]) == expected


def test_candidates_from_runs_and_labels(text_model: Any) -> None:
    runs = tps.compare.find_vectors(text_model, FIT, 0, 2, methods=["power_steering"], k=2,
                                    target_positions=1, progress=False)  # fmt: skip
    v = vector(text_model, layer=0)
    v = tps.SteeringVector(v.direction, 0, "hook_mlp_out", "custom")
    kl = float(
        tps.effect(text_model, FIT, [v, *runs[0].vectors], [0.05], progress=False)["kl"].min()
    )
    result = tps.transfer(text_model, FIT, HELD, {"ps": runs[0], "mine": [v]}, answers=ANSWERS,
                          kl_budgets=(0.2 * kl,), controls=2, draws=0, progress=False)  # fmt: skip
    assert result.labels == ["ps", "ps", "mine"] and result.methods == ["ps", "mine", RANDOM]
    table = result.to_pandas().set_index("method")
    assert table.loc["ps", "passes"] == runs[0].passes and math.isnan(table.loc["mine", "passes"])


def test_checkpoint_resumes_and_refuses_other_arguments(
    text_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vs = [vector(text_model, seed=s) for s in range(2)]
    budgets = budgets_for(text_model, vs + tps.random_vectors(16, 1, SITE, 2))
    kwargs = dict(answers=ANSWERS, kl_budgets=budgets, controls=2, draws=0, progress=False)
    path = tmp_path / "transfer.safetensors"
    whole = tps.transfer(text_model, FIT, HELD, vs, **kwargs)
    # One scale search per prompt and hook: the fourth is the first eval prompt's.
    module = importlib.import_module("tl_powersteer.transfer")
    real, calls = module.matched_kl_search, [0]

    def stopping(*args: Any, **kw: Any) -> Any:
        if calls[0] == 3:
            raise KeyboardInterrupt
        calls[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(module, "matched_kl_search", stopping)
    with pytest.raises(KeyboardInterrupt):
        tps.transfer(text_model, FIT, HELD, vs, checkpoint=path, **kwargs)
    partial = tps.load(path)
    assert partial.completed_fit == [0, 1, 2] and partial.completed_eval == []
    assert not partial.complete and bool(partial.eval_effects.isnan().all())
    monkeypatch.setattr(module, "matched_kl_search", real)
    resumed = tps.transfer(text_model, FIT, HELD, vs, checkpoint=path, **kwargs)
    assert resumed.complete
    torch.testing.assert_close(resumed.eval_effects, whole.eval_effects, equal_nan=True)
    torch.testing.assert_close(resumed.fit_effects, whole.fit_effects, equal_nan=True)
    assert tps.load(path).complete
    with pytest.raises(ValueError, match="other arguments .*controls"):
        tps.transfer(text_model, FIT, HELD, vs, checkpoint=path, **{**kwargs, "controls": 3})


def test_bad_input_is_refused_before_any_pass(text_model: Any, tmp_path: Path) -> None:
    v = vector(text_model)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"metric": "accuracy"}, ValueError, "metric must be 'logit_diff' or a function"),
        ({"answers": None}, ValueError, r"needs answers=\(A, B\)"),
        ({"answers": [ANSWERS]}, ValueError, "one pair .* or a list of 3 pairs"),
        ({"eval_answers": ("good", "good")}, ValueError, "same token"),
        ({"kl_budgets": (0.5, 0.1)}, ValueError, "ascending"),
        ({"kl_budgets": (0.0,)}, ValueError, "positive numbers of nats"),
        ({"controls": 0}, ValueError, "controls must be a positive int"),
        ({"goal": 2}, ValueError, r"goal must be \+1"),
        (
            {"kl_over": "all"},
            ValueError,
            r"kl_over must be one of \('next_token', 'continuation'\)",
        ),
        ({"draws": -1}, ValueError, "draws"),
        ({"tol": 2.0}, ValueError, "tol"),
        ({"checkpoint": tmp_path / "x.pt"}, ValueError, "ending in .safetensors"),
    ]
    for kwargs, error, message in cases:
        with no_forward_pass(text_model), pytest.raises(error, match=message):
            tps.transfer(text_model, FIT, HELD, [v], **{"answers": ANSWERS, **kwargs})
    with no_forward_pass(text_model), pytest.raises(ValueError, match="fit_prompts must be"):
        tps.transfer(text_model, "one prompt", HELD, [v], answers=ANSWERS)
    with (
        no_forward_pass(text_model),
        pytest.raises(ValueError, match="'random' labels the controls"),
    ):
        tps.transfer(text_model, FIT, HELD, tps.random_vectors(16, 1, SITE, 1), answers=ANSWERS)
    with no_forward_pass(text_model), pytest.raises(TypeError, match="candidates must be"):
        tps.transfer(text_model, FIT, HELD, "v", answers=ANSWERS)
    assert list(tmp_path.iterdir()) == []


def test_saved_results_load_and_plot(
    measured: tuple[Any, list[tps.SteeringVector], TransferResult], tmp_path: Path
) -> None:
    _, _, result = measured
    result.save(tmp_path / "t.safetensors")
    again = tps.load(tmp_path / "t.safetensors")
    assert isinstance(again, TransferResult) and again.settings() == result.settings()
    assert again.to_pandas().equals(result.to_pandas())
    fig = tps.plot_steerability(again)
    names = [trace.name for trace in fig.data]
    assert names[:2] == ["random, 0 to 90th percentile (L1)", "random mean |effect|"]
    for method in result.methods:
        assert method in names
    line = next(t for t in fig.data if t.name == "mine")
    table = result.to_pandas().set_index("method").loc["mine"]
    assert list(line.x) == list(table["budget"]) and list(line.y) == list(table["effect"])
    assert fig.layout.xaxis.type == "log"
    assert list(fig.layout.xaxis.tickvals) == list(result.kl_budgets)
    assert list(fig.layout.xaxis.ticktext) == [f"{b:g}" for b in result.kl_budgets]
    mean, q90 = result.random_band(1, SITE)
    assert list(fig.data[1].y) == mean and list(fig.data[0].y[: len(q90)]) == q90
    with pytest.raises(TypeError, match="needs a TransferResult"):
        tps.plot_steerability(result.to_pandas())
    # A file whose effects do not fit its prompts is refused, not half-loaded.
    forge(
        tmp_path / "t.safetensors",
        lambda t, f: t.update(eval_effects=t["eval_effects"][..., 1:].clone()),
    )
    with pytest.raises(ValueError, match=r"its eval_effects has shape .* not \("):
        tps.load(tmp_path / "t.safetensors")


def test_steerability_runs_each_method_as_alone(text_model: Any) -> None:
    budgets = budgets_for(text_model, tps.random_vectors(16, 1, "hook_mlp_out", 3))
    lean = dict(k=3, max_iters=1, block_size=3)
    result = tps.steerability(
        text_model, FIT, HELD, 1, 3, answers=ANSWERS, kl_budgets=budgets, controls=2,
        methods=["power_steering", "refined_power_steering", "caa"], refine_kl=budgets[0],
        positive=["the movie was good", "i liked the film"],
        negative=["the movie was bad", "i liked it not"],
        refine_starts="surrogate", refine_rounds=0, progress=False, **lean,
    )  # fmt: skip
    assert sorted(result.methods) == sorted(
        ["power_steering", "refined_power_steering", "caa", RANDOM]
    )
    # The same vectors as each method run alone, and what each one spent.
    ps = tps.power_steer(text_model, FIT, 1, 3, **lean)
    assert result.passes["power_steering"] == ps.n_jvp + ps.n_vjp == 2 * 3
    names = [v.name for v in ps.steering_vectors()]
    for v in ps.steering_vectors():
        torch.testing.assert_close(
            result.directions[result.names.index(v.name)], v.direction.double()
        )
    alone = tps.refine_in_subspace(
        text_model, FIT, ps.steering_vectors(), answers=ANSWERS, kl=budgets[0],
        starts="surrogate", rounds=0,
    )  # fmt: skip
    assert alone.metadata["basis"] == names
    at = result.labels.index("refined_power_steering")
    torch.testing.assert_close(result.directions[at], alone.direction.double(), atol=1e-5, rtol=0)
    assert result.passes["refined_power_steering"] == 6 + alone.metadata["passes"]
    assert result.passes["caa"] == 2 * 2


def test_steerability_refuses_bad_options_before_any_pass(text_model: Any) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"methods": ["probe"]}, "unknown method"),
        ({"refine_starts": "basis"}, "refine_starts must be one of"),
        ({"refine_rounds": -1}, "refine_rounds must be"),
        ({"refine_kl": 0}, "refine_kl must be a positive number"),
        ({"block_size": 2}, "block_size"),
        ({"kl_over": "all"}, "kl_over must be one of"),
    ]
    for kwargs, message in cases:
        with no_forward_pass(text_model), pytest.raises(ValueError, match=message):
            tps.steerability(text_model, FIT, HELD, 1, 3, **{"answers": ANSWERS, "k": 3, **kwargs})
