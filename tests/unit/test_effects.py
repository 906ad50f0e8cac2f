"""Effect metrics against hand computations; ranking at a KL budget; random controls."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tl_powersteer.effects import split_prompts

SITE = "hook_resid_post"
PROMPTS = ["i watched the movie last night", "the cat sat on the mat", "the dog was good"]

pytestmark = pytest.mark.usefixtures("no_grad")


def vector(model: Any, layer: int = 1, seed: int = 0) -> tps.SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    return tps.SteeringVector(
        torch.randn(d, generator=gen, dtype=torch.float64), layer, SITE, "custom"
    )


def steered_logits(
    model: Any, tokens: torch.Tensor, v: tps.SteeringVector, a: float
) -> torch.Tensor:
    def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + a * v.direction.to(act.dtype)

    with model.hooks(fwd_hooks=[(v.hook_name, add)]):
        return model(tokens)[0].double()


def test_logit_diff_and_kl_match_a_hand_computation(text_model: Any) -> None:
    v = vector(text_model)
    table = tps.effect(
        text_model, PROMPTS[:2], v, [3.0], metric="logit_diff", answers=("good", "bad")
    )
    good, bad = (text_model.to_tokens(w, prepend_bos=False)[0, 0] for w in ("good", "bad"))
    for row in table.itertuples():
        tokens = text_model.to_tokens(PROMPTS[row.prompt])
        base = text_model(tokens)[0, -1].double()
        steered = steered_logits(text_model, tokens, v, row.sign * 3.0)[-1]
        assert row.value == pytest.approx(float(steered[good] - steered[bad]), abs=1e-9)
        assert row.baseline == pytest.approx(float(base[good] - base[bad]), abs=1e-9)
        p, q = steered.log_softmax(-1), base.log_softmax(-1)
        assert row.kl == pytest.approx(float((p.exp() * (p - q)).sum()), abs=1e-12)
    assert list(table["prompt"]) == [0, 0, 1, 1] and list(table["sign"]) == [1, -1, 1, -1]


def test_logprob_of_a_continuation(text_model: Any) -> None:
    v = vector(text_model)
    table = tps.effect(text_model, PROMPTS[0], v, [2.0], signs=[1], metric="logprob",
                       continuation="it was good")  # fmt: skip
    prompt = text_model.to_tokens(PROMPTS[0])
    cont = text_model.to_tokens("it was good", prepend_bos=False)
    full = torch.cat([prompt, cont], dim=1)
    logp = steered_logits(text_model, full, v, 2.0).log_softmax(-1)
    n = prompt.shape[1]
    expected = sum(float(logp[n - 1 + i, int(t)]) for i, t in enumerate(cont[0]))
    assert table.loc[0, "value"] == pytest.approx(expected, abs=1e-9)


def test_text_metric_scores_the_steered_generation(text_model: Any) -> None:
    v = vector(text_model)

    def count_the(text: str) -> float:
        return float(len(re.findall(r"\bthe\b", text)))

    table = tps.effect(text_model, PROMPTS[0], v, [0.0, 30.0], signs=[1], metric=count_the,
                       max_new_tokens=6)  # fmt: skip
    gen = tps.generate_steered(text_model, PROMPTS[0], v, [0.0, 30.0], signs=[1], max_new_tokens=6)
    assert list(table["value"]) == [count_the(t) for t in gen["text"][1:]]
    assert table.loc[0, "baseline"] == count_the(gen.loc[0, "text"])


def test_controls_are_random_unit_directions_at_the_same_hook(text_model: Any) -> None:
    v = vector(text_model, layer=2)
    table = tps.effect(text_model, PROMPTS[0], v, [1.0], signs=[1], controls=3, seed=5)
    assert list(table["method"]) == ["custom", "random", "random", "random"]
    assert set(table["layer"]) == {2}
    randoms = tps.random_vectors(16, 2, SITE, 3, seed=5)
    assert [r.name for r in randoms] == list(table["vector"][1:])
    assert all(abs(float(r.direction.norm()) - 1) < 1e-6 for r in randoms)


def test_kl_mode_matches_the_kl_of_every_vector(text_model: Any) -> None:
    vs = [vector(text_model, 1, seed=1), vector(text_model, 2, seed=2)]
    target = 0.5 * float(tps.effect(text_model, PROMPTS[:2], vs, [0.05])["kl"].min())
    table = tps.effect(text_model, PROMPTS[:2], vs, [target], scale_mode="kl", controls=1)
    means = table.groupby(["vector", "sign"])["kl"].mean()
    assert means.to_numpy() == pytest.approx([target] * len(means), rel=1e-3)


def test_rank_vectors_at_a_kl_budget(text_model: Any) -> None:
    vs = [vector(text_model, 1, seed=s) for s in range(3)]
    budget = 0.5 * float(tps.effect(text_model, PROMPTS, vs, [0.05])["kl"].min())
    ranked = tps.rank_vectors(text_model, PROMPTS, vs, kl=budget, answers=("good", "bad"),
                              controls=2, holdout=1 / 3)  # fmt: skip
    assert len(ranked) == 5 and ranked["held_out"].all()
    assert list(ranked["abs_effect"]) == sorted(ranked["abs_effect"], reverse=True)
    assert (ranked["method"] == "random").sum() == 2
    fit, evaluate = split_prompts(PROMPTS, 1 / 3, 0)
    assert len(evaluate) == 1 and sorted(fit + evaluate) == sorted(PROMPTS)
    # The reported effect is the measured delta, at the sign and scale in the table.
    row = ranked.iloc[0]
    chosen = next(v for v in vs + tps.random_vectors(16, 1, SITE, 2) if v.name == row["vector"])
    again = tps.effect(text_model, evaluate, chosen, [row["absolute_scale"]], signs=[row["sign"]],
                       metric="logit_diff", answers=("good", "bad"))  # fmt: skip
    assert again["delta"].mean() == pytest.approx(row["effect"], abs=1e-9)
    assert row["kl"] == pytest.approx(float(again["kl"].mean()), abs=1e-12)


def test_rank_vectors_chooses_each_sign_on_the_fit_prompts(text_model: Any) -> None:
    vs = [vector(text_model, 1, seed=s) for s in range(3)]
    for i, v in enumerate(vs):
        v.metadata["name"] = f"v{i}"
    budget = 0.5 * float(tps.effect(text_model, PROMPTS, vs, [0.05])["kl"].min())
    ranked = tps.rank_vectors(text_model, PROMPTS, vs, kl=budget, answers=("good", "bad"),
                              controls=0, holdout=1 / 3)  # fmt: skip
    fit, evaluate = split_prompts(PROMPTS, 1 / 3, 0)
    for row in ranked.itertuples():
        v = next(v for v in vs if v.name == row.vector)
        fit_effects = {}
        for sign in (1, -1):
            scale = tps.scales.kl_scale(text_model, fit, v, budget, sign=sign)
            table = tps.effect(text_model, fit, v, [scale], signs=[sign], metric="logit_diff",
                               answers=("good", "bad"), progress=False)  # fmt: skip
            fit_effects[sign] = float(table["delta"].mean())
        # The sign is the one that moved the fit prompts more, whatever the held-out ones say
        # (to the scale search's tolerance, in which near-mirror signs may tie).
        assert abs(fit_effects[row.sign]) >= abs(fit_effects[-row.sign]) - 1e-6
        assert row.fit_effect == pytest.approx(fit_effects[row.sign], abs=1e-6)
        held = tps.effect(text_model, evaluate, v, [row.absolute_scale], signs=[row.sign],
                          metric="logit_diff", answers=("good", "bad"), progress=False)  # fmt: skip
        assert row.effect == pytest.approx(float(held["delta"].mean()), abs=1e-9)


def test_bad_metric_input(text_model: Any) -> None:
    v = vector(text_model)
    for kwargs, message in [
        ({"metric": "accuracy"}, "metric must be one of"),
        ({"metric": "logit_diff"}, "answers"),
        ({"metric": "logit_diff", "answers": ("good", "very good")}, "not one"),
        ({"metric": "logprob"}, "continuation"),
        ({"controls": -1}, "controls"),
    ]:
        with pytest.raises(ValueError, match=message):
            tps.effect(text_model, PROMPTS[0], v, [1.0], **kwargs)
    with pytest.raises(ValueError, match="metric='kl' cannot rank"):
        tps.rank_vectors(text_model, PROMPTS, v, metric="kl")
    with pytest.raises(ValueError, match="empty list"):
        tps.effect(text_model, [], v, [1.0])


def test_effects_and_generations_share_one_calibration(text_model: Any) -> None:
    from tl_powersteer.effects import effects_and_generations

    vs = [vector(text_model, 1, seed=1), vector(text_model, 2, seed=2)]
    target = 0.5 * float(tps.effect(text_model, PROMPTS, vs, [0.05])["kl"].min())
    effects, texts = effects_and_generations(
        text_model, PROMPTS, vs, [target], answers=("good", "bad"), controls=1,
        max_new_tokens=4, progress=False,
    )  # fmt: skip
    alone = tps.effect(text_model, PROMPTS, vs, [target], scale_mode="kl", metric="logit_diff",
                       answers=("good", "bad"), controls=1, progress=False)  # fmt: skip
    assert effects.equals(alone)
    # Generations: the baseline, then each vector (not the controls) at both signs, at the
    # scales the effect table used, as generate_steered writes them at those scales.
    assert list(texts["vector"]) == ["baseline"] + [v.name for v in vs for _ in (1, -1)]
    for row in texts.iloc[1:].itertuples():
        used = effects[(effects["vector"] == row.vector) & (effects["sign"] == row.sign)]
        assert row.absolute_scale == used["absolute_scale"].iloc[0]
        v = next(v for v in vs if v.name == row.vector)
        direct = tps.generate_steered(text_model, PROMPTS[0], v, [row.absolute_scale],
                                      signs=[row.sign], max_new_tokens=4, progress=False)  # fmt: skip
        assert direct["text"].iloc[1] == row.text
