"""The effect map against ``rank_vectors`` and hand-made steered passes: its tables,
checkpoint, file and arguments."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import tl_powersteer as tps
import tl_powersteer.effect_map as effect_map
from tests.helpers import Interrupt, no_forward_pass

PROMPTS = ["i watched the movie last night", "the cat sat on the mat", "the dog was good"]
ANSWERS = ("good", "bad")
# The tiny random models saturate well below 0.05 nats of next-token KL.
KL = 1e-3

pytestmark = pytest.mark.usefixtures("no_grad")


def atlas_of(model: Any, prompts: Any, k: int = 2) -> tps.SensitivityAtlas:
    return tps.sensitivity_atlas(model, prompts, k=k, method="exact", progress=False)


def by_vector(table: pd.DataFrame) -> pd.DataFrame:
    return table.set_index("vector").sort_index()


def test_agrees_with_rank_vectors_on_the_same_vectors(text_model: Any) -> None:
    atlas = atlas_of(text_model, PROMPTS)
    found = tps.atlas_effects(text_model, atlas, answers=ANSWERS, kl=KL, top=2, controls=2,
                              tol=1e-4, progress=False)  # fmt: skip
    ranked = tps.rank_vectors(text_model, PROMPTS, atlas.steering_vectors(top=2), kl=KL,
                              answers=ANSWERS, controls=2, holdout=None, progress=False)  # fmt: skip
    mine, theirs = by_vector(found.ranking()), by_vector(ranked)
    assert len(mine) == len(theirs) == 6 * 2 + 3 * 2 and list(mine.index) == list(theirs.index)
    assert mine["matched"].all()
    assert (mine["sign"] == theirs["sign"]).all() and (mine["method"] == theirs["method"]).all()
    for column, tolerance in [("absolute_scale", 1e-9), ("kl", 1e-12), ("effect", 1e-9)]:
        assert (mine[column] - theirs[column]).abs().max() < tolerance * max(
            1, theirs[column].abs().max()
        )
    # Both sort by |effect|: the same order.
    assert list(found.ranking()["vector"]) == list(ranked["vector"])


def test_each_number_is_that_of_a_steered_forward_pass(model: Any, tokens: torch.Tensor) -> None:
    """Every model class, prompts given as tokens: at the recorded scale, a plain hooked
    forward pass gives the recorded KL and effect."""
    atlas = atlas_of(model, tokens)
    found = tps.atlas_effects(model, atlas, answers=(5, 6), kl=KL, top=2, controls=1,
                              progress=False)  # fmt: skip
    base = model(tokens)[:, -1].double()
    base_diff = float((base[:, 5] - base[:, 6]).mean())
    assert found.baseline == pytest.approx(base_diff, abs=1e-10)
    vectors = {v.name: v for v in atlas.steering_vectors(top=2)}
    vectors |= {
        v.name: v for s in range(3) for v in tps.random_vectors(16, s, atlas.source_site, 1)
    }
    table = found.ranking()
    assert table["matched"].all() and len(table) == 6 * 2 + 3
    for row in table.itertuples():
        v = vectors[row.vector]
        delta = (row.sign * row.absolute_scale * v.direction).float()
        with model.hooks(fwd_hooks=[(v.hook_name, lambda a, hook, d=delta: a + d)]):
            logits = model(tokens)[:, -1].double()
        logp = logits.log_softmax(-1)
        kl = (logp.exp() * (logp - base.log_softmax(-1))).sum(-1)
        assert float(kl.mean()) == pytest.approx(row.kl, rel=1e-6)
        assert abs(math.log(row.kl / KL)) <= found.tol
        effect = float((logits[:, 5] - logits[:, 6]).mean()) - base_diff
        # float32 models: passes of 64 sequences round otherwise than one of two.
        assert effect == pytest.approx(row.effect, abs=1e-6)


def test_pair_table_takes_the_best_matched_sign_against_the_controls(text_model: Any) -> None:
    found = tps.atlas_effects(text_model, atlas_of(text_model, PROMPTS), answers=ANSWERS, kl=KL,
                              top=2, controls=3, progress=False)  # fmt: skip
    # A row that missed the budget is no candidate, however large its effect.
    found.effects[0, 1, 1, 1] = 1e6
    found.matched[0, 1, 1, 1] = False
    pairs, vectors, controls = found.to_pandas(), found.vectors(), found.controls_table()
    assert list(pairs.columns) == [
        "source", "target", "sigma", "best_effect", "rank", "sign", "scale", "relative_scale",
        "kl", "random_mean", "random_max", "ratio", "beats_random",
    ]  # fmt: skip
    assert len(pairs) == 6 and len(vectors) == 6 * 2 * 2 and len(controls) == 3 * 3 * 2
    for row in pairs.itertuples():
        mine = vectors[
            (vectors.source == row.source) & (vectors.target == row.target) & vectors.matched
        ]
        best = mine.loc[mine["effect"].abs().idxmax()]
        assert (row.best_effect, row.rank, row.sign) == (best.effect, best["rank"], best.sign)
        assert row.relative_scale == pytest.approx(
            best.scale / float(found.source_norms[row.source])
        )
        random = controls[(controls.source == row.source) & controls.matched]["effect"].abs()
        assert row.random_mean == pytest.approx(random.mean())
        assert row.random_max == pytest.approx(random.max())
        assert row.ratio == pytest.approx(abs(row.best_effect) / random.mean())
        assert row.beats_random == (abs(row.best_effect) > random.max())
        assert row.sigma == pytest.approx(float(found.singular_values[row.source, row.target, 0]))
    assert pairs.loc[0, "best_effect"] != 1e6
    # With no matched vector a pair has no best effect.
    found.matched[0, 2] = False
    row = found.to_pandas().iloc[1]
    assert (row.source, row.target, row["rank"], row.beats_random) == (0, 2, -1, False)
    assert math.isnan(row.best_effect)
    assert "6 pairs measured" in repr(found) and "beat the random controls" in repr(found)


def test_generations_are_those_of_generate_steered_at_each_rows_scale(text_model: Any) -> None:
    atlas = atlas_of(text_model, PROMPTS)
    found = tps.atlas_effects(text_model, atlas, answers=ANSWERS, kl=KL, top=2, controls=1,
                              generate=6, progress=False)  # fmt: skip
    assert len(found.generations) == 1 + 6 * 2 * 2 + 3 * 2
    vectors = {v.name: v for v in atlas.steering_vectors(top=2)}
    vectors |= {v.name: v for s in range(3) for v in tps.random_vectors(16, s, "hook_mlp_out", 1)}
    for row in found.ranking().itertuples():
        table = tps.generate_steered(text_model, PROMPTS[0], vectors[row.vector],
                                     [row.absolute_scale], signs=[row.sign], max_new_tokens=6,
                                     progress=False)  # fmt: skip
        target = None if row.target == -1 else row.target
        rank = int(row.vector.split("#")[1].split()[0]) if target is None else row.rank
        assert found.generation(row.layer, target, rank, row.sign) == table.text[1]
        assert found.generations["baseline"] == table.text[0]
    assert found.generation(0, 1, 0, 1) != found.generation(0, 1, 0, -1)
    assert found.generation(0, 1, 5, 1) is None
    with pytest.raises(ValueError, match="sign must be 1 or -1"):
        found.generation(0, 1, 0, 0)


def test_saved_map_loads_equal(text_model: Any, tmp_path: Path) -> None:
    found = tps.atlas_effects(text_model, atlas_of(text_model, PROMPTS), answers=ANSWERS, kl=KL,
                              top=1, controls=1, generate=3, progress=False)  # fmt: skip
    found.save(tmp_path / "effects.safetensors")
    loaded = tps.load(tmp_path / "effects.safetensors")
    assert isinstance(loaded, tps.AtlasEffects) and loaded.settings() == found.settings()
    pd.testing.assert_frame_equal(loaded.to_pandas(), found.to_pandas())
    pd.testing.assert_frame_equal(loaded.vectors(), found.vectors())
    assert loaded.answers == ["good", "bad"] and loaded.vector_digests == found.vector_digests
    assert loaded.generations == found.generations and len(found.generations) == 1 + 6 * 2 + 3 * 2


def test_checkpoint_resumes_after_an_interruption(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ckpt = models["native_bridge"], tmp_path / "effects.safetensors"
    atlas = atlas_of(model, tokens)
    whole = tps.atlas_effects(model, atlas, answers=(5, 6), kl=KL, top=2, controls=2,
                              progress=False)  # fmt: skip
    searched: list[int] = []
    real = effect_map.kl_search

    def search_then_stop(*args: Any, **kwargs: Any) -> Any:
        if len(searched) == 2:
            raise Interrupt  # as if Ctrl-C arrived during the third source layer
        searched.append(len(searched))
        return real(*args, **kwargs)

    monkeypatch.setattr(effect_map, "kl_search", search_then_stop)
    run = dict(answers=(5, 6), kl=KL, top=2, controls=2, checkpoint=ckpt, progress=False)
    with pytest.raises(Interrupt):
        tps.atlas_effects(model, atlas, **run)
    partial = tps.load(ckpt)
    assert partial.completed_sources == [0, 1] and partial.pairs() == [
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
    ]
    assert partial.effects[2].isnan().all()
    searched.clear()
    resumed = tps.atlas_effects(model, atlas, **run)
    assert len(searched) == 1  # only the last source layer
    pd.testing.assert_frame_equal(
        resumed.ranking(), whole.ranking(), check_exact=False, rtol=0, atol=1e-12
    )
    # Another budget, or another atlas's vectors, is not resumed.
    with pytest.raises(ValueError, match=r"other arguments \(kl: 0.001 there, 0.002 now\)"):
        tps.atlas_effects(model, atlas, **(run | {"kl": 2e-3}))
    atlas.right_vectors = -atlas.right_vectors
    with pytest.raises(ValueError, match=r"other vectors at source layers \[0, 1, 2\]"):
        tps.atlas_effects(model, atlas, **run)
    atlas.save(tmp_path / "atlas.safetensors")
    with pytest.raises(ValueError, match="holds a SensitivityAtlas, not an effect map"):
        tps.atlas_effects(model, atlas, **(run | {"checkpoint": tmp_path / "atlas.safetensors"}))


def test_bad_arguments_are_refused_before_any_pass(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    model = models["hf_bridge"]
    atlas = atlas_of(model, PROMPTS)
    other = atlas_of(models["native_bridge"], tokens)
    unfinished = atlas_of(model, PROMPTS)
    unfinished.completed_sources = []
    ckpt = tmp_path / "effects.safetensors"
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (atlas, {"metric": "kl"}, r"metric must be 'logit_diff'.*got 'kl'"),
        (atlas, {"answers": ("good",)}, "two"),
        (atlas, {"answers": ("good", "nonsenseword")}, "single token|not one token|token"),
        (atlas, {"top": 0}, r"top must be an int between 1 and the atlas's k = 2, got 0"),
        (atlas, {"top": 3}, r"top must be an int between 1 and the atlas's k = 2, got 3"),
        (atlas, {"controls": 0}, r"controls must be a positive int"),
        (atlas, {"kl": 0}, r"kl must be a positive number of nats"),
        (atlas, {"kl": "big"}, r"kl must be a positive number of nats"),
        (atlas, {"tol": 1.5}, r"tol must be a number between 0 and 1"),
        (atlas, {"seed": 1.5}, "seed must be an int"),
        (atlas, {"checkpoint": tmp_path / "effects.json"}, r"\.safetensors"),
        (unfinished, {}, "no computed source layer"),
        (other, {}, "model|weights|layers"),
    ]
    for which, kwargs, message in cases:
        with no_forward_pass(model), pytest.raises((ValueError, TypeError), match=message):
            tps.atlas_effects(model, which, **({"answers": ANSWERS, "checkpoint": ckpt} | kwargs))
        assert not ckpt.exists() and not (tmp_path / "effects.json").exists()
