"""Power Steering, MELBO and CAA side by side."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tl_powersteer as tps

PROMPTS = ["i watched the movie last night", "the cat sat on the mat", "the dog was good"]
POSITIVE = ["the movie was good", "i liked the film"]
NEGATIVE = ["the movie was bad", "i liked it not"]

pytestmark = pytest.mark.usefixtures("no_grad")


def test_compare_methods_table(text_model: Any) -> None:
    table = tps.compare_methods(
        text_model, PROMPTS, 1, 3, k=2, positive=POSITIVE, negative=NEGATIVE,
        melbo_steps=30, kl=1e-4, answers=("good", "bad"), controls=1, progress=False,
    )  # fmt: skip
    assert sorted(table["method"]) == sorted(
        ["power_steering"] * 2 + ["melbo"] * 2 + ["caa", "random"]
    )
    assert {"method_passes", "method_seconds", "effect", "kl", "cos_caa", "cos_melbo"} <= set(
        table.columns
    )
    assert table["kl"].to_numpy() == pytest.approx([1e-4] * len(table), rel=1e-2)
    ps = table[table["method"] == "power_steering"]
    assert ps["cos_power_steering"].isna().all()
    assert ((ps["cos_caa"] >= 0) & (ps["cos_caa"] <= 1 + 1e-9)).all()
    # Passes: Power Steering counts its JVPs and VJPs, MELBO its forward and backward passes.
    res = tps.power_steer(text_model, PROMPTS, 1, 3, k=2)
    assert ps["method_passes"].iloc[0] == res.n_jvp + res.n_vjp
    assert table[table["method"] == "melbo"]["method_passes"].iloc[0] == (2 * (30 + 1) + 1) + 2 * 30
    assert table[table["method"] == "caa"]["method_passes"].iloc[0] == 4
    # The cosine column is the largest |cosine| with the other method's vectors.
    caa = tps.caa_vector(text_model, POSITIVE, NEGATIVE, 1, site="hook_mlp_out")
    expected = max(abs(float(v.direction @ caa.direction)) for v in res.steering_vectors())
    assert table[table["method"] == "caa"]["cos_power_steering"].iloc[0] == pytest.approx(expected)


def test_compare_without_caa_and_bad_input(text_model: Any) -> None:
    table = tps.compare_methods(text_model, PROMPTS[:1], 1, 2, k=1, melbo_steps=5, kl=1e-4,
                                answers=("good", "bad"), controls=0, progress=False)  # fmt: skip
    assert "cos_caa" not in table.columns and len(table) == 2
    with pytest.raises(ValueError, match="same number|pairs them"):
        tps.compare_methods(text_model, PROMPTS, 1, 2, positive=POSITIVE, negative=NEGATIVE[:1],
                            answers=("good", "bad"))  # fmt: skip
    with pytest.raises(ValueError, match="answers"):
        tps.compare_methods(text_model, PROMPTS, 1, 2)
    with pytest.raises(ValueError, match="both positive and negative"):
        tps.compare_methods(text_model, PROMPTS, 1, 2, positive=POSITIVE, answers=("good", "bad"))


def test_cosine_table() -> None:
    a = tps.SteeringVector(torch.tensor([1.0, 0.0]), 0, "hook_mlp_out", "x", metadata={"name": "a"})
    b = tps.SteeringVector(torch.tensor([1.0, 1.0]), 0, "hook_mlp_out", "x", metadata={"name": "b"})
    table = tps.cosine_table([a, b])
    assert table.loc["a", "b"] == pytest.approx(2**-0.5) and table.loc["b", "b"] == pytest.approx(1)


def test_find_vectors_runs_each_method_as_alone(text_model: Any) -> None:
    from tl_powersteer.compare import find_vectors

    runs = find_vectors(text_model, PROMPTS, 1, 3, k=2, positive=POSITIVE, negative=NEGATIVE,
                        melbo_steps=5, progress=False)  # fmt: skip
    assert [run.method for run in runs] == ["power_steering", "melbo", "caa"]
    ps, mel, caa = runs
    alone = tps.power_steer(text_model, PROMPTS, 1, 3, k=2)
    assert torch.equal(torch.stack([v.direction for v in ps.vectors]), alone.vectors)
    assert ps.result is not None and ps.passes == alone.n_jvp + alone.n_vjp
    assert ps.summary.startswith(f"power_steering: 2 vectors, {ps.passes} JVP/VJP products")
    radius = tps.typical_norm(text_model, PROMPTS, 1, "hook_mlp_out")
    direct = tps.melbo(text_model, PROMPTS, 1, 3, n_vectors=2, radius=radius, steps=5,
                       progress=False)  # fmt: skip
    found = torch.stack([v.direction for v in mel.vectors])
    torch.testing.assert_close(found, direct.vectors, rtol=0, atol=1e-12)
    assert mel.summary.startswith(f"melbo: 2 vectors at radius {radius:.4g}")
    expected = tps.caa_vector(text_model, POSITIVE, NEGATIVE, 1, site="hook_mlp_out")
    assert torch.equal(caa.vectors[0].direction, expected.direction) and caa.passes == 4
    only = find_vectors(text_model, PROMPTS, 1, 3, k=1, methods=["power_steering"])
    assert [run.method for run in only] == ["power_steering"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"positive": POSITIVE}, "CAA needs both positive and negative"),
        ({"positive": POSITIVE, "negative": NEGATIVE[:1]}, "got 2 positive and 1 negative"),
        ({"methods": ["caa", "lasso"]}, r"unknown method\(s\) \['lasso'\]"),
        ({"methods": []}, "unknown method"),
        ({"methods": ["caa"]}, "caa needs positive and negative prompt pairs"),
        ({"melbo_radius": 0.0}, "melbo_radius must be positive"),
        ({"melbo_steps": 0}, "melbo_steps must be at least 1"),
    ],
)
def test_method_options_are_checked_without_a_model(options: Any, message: str) -> None:
    from tl_powersteer.compare import check_method_options

    given = {"methods": None, "positive": None, "negative": None, **options}
    with pytest.raises(ValueError, match=message):
        check_method_options(given.pop("methods"), given.pop("positive"), given.pop("negative"),
                             **given)  # fmt: skip


def test_method_options_speak_the_callers_names() -> None:
    from tl_powersteer.compare import check_method_options

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    assert check_method_options(None, None, None) == ["power_steering", "melbo"]
    assert check_method_options(None, POSITIVE, NEGATIVE) == ["power_steering", "melbo", "caa"]
    with pytest.raises(ValueError, match="got 2 --positive and 1 --negative"):
        check_method_options(None, POSITIVE, NEGATIVE[:1], spell=flag)
    with pytest.raises(ValueError, match="--melbo-radius must be positive"):
        check_method_options(None, None, None, melbo_radius=-1.0, spell=flag)
