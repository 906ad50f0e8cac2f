"""CAA, probes and MELBO against hand computations and exact optima."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.reference import principal_angles
from tl_powersteer.baselines import melbo_optimise

POSITIVE = ["the movie was good", "i liked the film", "the cat was good"]
NEGATIVE = ["the movie was bad", "i liked it not", "the cat was bad"]

pytestmark = pytest.mark.usefixtures("no_grad")


def resid(model: Any, prompt: str, layer: int, position: int = -1) -> torch.Tensor:
    _, cache = model.run_with_cache(model.to_tokens(prompt))
    return cache[f"blocks.{layer}.hook_resid_post"][0, position].double()


def test_caa_is_the_mean_difference(text_model: Any) -> None:
    diffs = [
        resid(text_model, p, 2) - resid(text_model, n, 2)
        for p, n in zip(POSITIVE, NEGATIVE, strict=True)
    ]
    mean = torch.stack(diffs).mean(0)
    v = tps.caa_vector(text_model, POSITIVE, NEGATIVE, layer=2)
    torch.testing.assert_close(v.direction.double(), mean / mean.norm(), rtol=0, atol=1e-10)
    assert (v.layer, v.site, v.method, v.norm) == (2, "hook_resid_post", "caa", 1.0)
    assert v.metadata["mean_difference_norm"] == pytest.approx(float(mean.norm()))
    raw = tps.caa_vector(text_model, POSITIVE, NEGATIVE, layer=-2, normalize=False)
    assert raw.layer == 2 and raw.norm == pytest.approx(float(mean.norm()))
    # Another position: the second-to-last token of every prompt.
    second = torch.stack(
        [
            resid(text_model, p, 2, -2) - resid(text_model, n, 2, -2)
            for p, n in zip(POSITIVE, NEGATIVE, strict=True)
        ]
    ).mean(0)
    at_1 = tps.caa_vector(text_model, POSITIVE, NEGATIVE, layer=2, position=-2)
    torch.testing.assert_close(at_1.direction.double(), second / second.norm(), rtol=0, atol=1e-10)


def test_caa_layer_sweep(text_model: Any) -> None:
    sweep = tps.caa_layer_sweep(text_model, POSITIVE, NEGATIVE)
    assert list(sweep["layer"]) == [0, 1, 2, 3]
    one = tps.caa_vector(text_model, POSITIVE, NEGATIVE, layer=1)
    torch.testing.assert_close(sweep.loc[1, "vector"].direction, one.direction)
    # Separation: gap of mean projections over the pooled spread, by hand at layer 3.
    u = sweep.loc[3, "vector"].direction.double()
    pos = torch.stack([resid(text_model, p, 3) @ u for p in POSITIVE])
    neg = torch.stack([resid(text_model, n, 3) @ u for n in NEGATIVE])
    spread = torch.cat([pos - pos.mean(), neg - neg.mean()]).std()
    assert sweep.loc[3, "separation"] == pytest.approx(float((pos.mean() - neg.mean()) / spread))


def test_caa_refuses_bad_pairs(text_model: Any) -> None:
    with pytest.raises(ValueError, match="same number"):
        tps.caa_vector(text_model, POSITIVE, NEGATIVE[:2], layer=1)
    with pytest.raises(ValueError, match="empty"):
        tps.caa_vector(text_model, [], [], layer=1)
    with pytest.raises(ValueError, match="does not fit"):
        tps.caa_vector(text_model, POSITIVE, NEGATIVE, layer=1, position=30)
    with pytest.raises(ValueError, match="identical"):
        tps.caa_vector(text_model, POSITIVE, POSITIVE, layer=1)


def test_probe_is_the_cosine(text_model: Any) -> None:
    v = tps.caa_vector(text_model, POSITIVE, NEGATIVE, layer=2)
    got = tps.probe(text_model, POSITIVE + NEGATIVE, v)
    for i, prompt in enumerate(POSITIVE + NEGATIVE):
        a = resid(text_model, prompt, 2)
        assert float(got[i]) == pytest.approx(float(a @ v.direction.double() / a.norm()), abs=1e-6)
    other = tps.probe(text_model, POSITIVE, v, layer=3, position=0)
    a = resid(text_model, POSITIVE[1], 3, 0)
    assert float(other[1]) == pytest.approx(float(a @ v.direction.double() / a.norm()), abs=1e-6)
    with pytest.raises(ValueError, match="width"):
        tps.probe(
            text_model, POSITIVE, tps.SteeringVector(torch.ones(5), 1, "hook_resid_post", "x")
        )


def test_melbo_on_a_linear_map_finds_the_top_singular_vectors() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    A = A @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2], dtype=torch.float64))
    U, objective, history, calls = melbo_optimise(
        lambda th: (A @ th).view(3, 4, 1), 6, n_vectors=3, radius=2.0, steps=400, p=2, q=1
    )
    _, S, Vh = torch.linalg.svd(A)
    assert principal_angles(U.T, Vh[:3].T).max() < 1e-4
    for i in range(3):  # one vector at a time: each matches its own singular vector
        assert abs(float(U[i] @ Vh[i])) == pytest.approx(1.0, abs=1e-8)
    # With p = 2, q = 1 the objective is ||A theta||^2 = (R sigma_i)^2.
    torch.testing.assert_close(objective, (2.0 * S[:3]) ** 2, rtol=1e-8, atol=0)
    torch.testing.assert_close(U @ U.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert calls == 3 * 401 and history.shape == (3, 400)
    assert bool((history[:, -1] >= history[:, 0]).all())


def test_melbo_small_radius_agrees_with_power_steering(model: Any, tokens: torch.Tensor) -> None:
    ps = tps.power_steer(model, tokens, source=0, target=3, k=2, tol=1e-8)
    res = tps.melbo(model, tokens, 0, 3, n_vectors=1, radius=1e-4, steps=300, progress=False)
    assert abs(float(res.vectors[0].double() @ ps.vectors[0].double())) == pytest.approx(
        1, abs=1e-5
    )
    assert (res.n_forward, res.n_backward) == (302, 300)
    v = res.steering_vector(0)
    assert (v.method, v.layer, v.norm) == ("melbo", 0, 1e-4)


def test_melbo_save_load_and_errors(model: Any, tokens: torch.Tensor, tmp_path: Any) -> None:
    res = tps.melbo(model, tokens, 1, 2, n_vectors=2, radius=0.5, steps=5, progress=False)
    res.save(tmp_path / "m.safetensors")
    again = tps.load(tmp_path / "m.safetensors")
    assert torch.equal(again.vectors, res.vectors) and again.radius == 0.5
    assert len(res.to_pandas()) == 2
    for kwargs, message in [
        ({"radius": 0.0}, "radius"),
        ({"radius": float("nan")}, "radius"),
        ({"radius": 1.0, "steps": 0}, "steps"),
        ({"radius": 1.0, "n_vectors": 99}, "n_vectors"),
        ({"radius": 1.0, "p": -1}, "p must"),
    ]:
        with pytest.raises(ValueError, match=message):
            tps.melbo(model, tokens, 1, 2, progress=False, **kwargs)
    with pytest.raises(ValueError, match="after the source"):
        tps.melbo(model, tokens, 2, 1, radius=1.0, progress=False)
