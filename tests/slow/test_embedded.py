"""The real embedded model, Gemma 3 270M from PyPI (run with --run-slow)."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import tl_powersteer as tps
from tests.reference import (
    RELATIVE_SCALE,
    assert_generation_is_greedy,
    greedy_loop,
    principal_angles,
)
from tl_powersteer import models as M
from tl_powersteer.cli import DEMO_PROMPT, main
from tl_powersteer.jacobian import cpu_multiplies_bfloat16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma() -> Any:
    return tps.load_model(device="cpu")


def test_loads_offline(gemma: Any) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(gemma, TransformerBridge) and not gemma.training
    assert (gemma.cfg.n_layers, gemma.cfg.d_model) == (18, 640)
    assert gemma.cfg.model_name == "gemma-3-270m"
    tokens = gemma.to_tokens(DEMO_PROMPT)
    with torch.no_grad():
        logits = gemma(tokens)
    # The prototype's continuation of the demo prompt is " a bit of a letdown".
    assert gemma.tokenizer.decode(logits[0, -1].argmax()) == " a"


def test_cli_vectors_and_demo(
    gemma: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.safetensors"
    args = ["vectors", "--prompt", DEMO_PROMPT, "--source", "6", "--target", "12", "--k", "4",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert tps.load(out).model_name == "gemma-3-270m"
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    demo = tps.load(tmp_path / "demo" / "vectors.safetensors")
    assert (demo.source, demo.target, demo.k, demo.prompts) == (8, 16, 8, [DEMO_PROMPT])
    printed = capsys.readouterr()
    assert "demo outputs written to" in printed.out
    assert "past_key_values" not in printed.err and "Loading weights" not in printed.err
    # What the user reads: the unsteered line is the model's own cache-free continuation.
    table = pd.read_csv(tmp_path / "demo" / "generations.csv", keep_default_na=False)
    assert table.vector.tolist() == ["baseline"] + [
        f"power_steering L8->L16 #{i}" for i in range(8) for _ in (1, -1)
    ]
    tokens = gemma.to_tokens(DEMO_PROMPT)
    own = greedy_loop(gemma, tokens, 30, "blocks.0.hook_resid_post", 0.0, torch.ones)
    baseline = gemma.tokenizer.decode(own[0, tokens.shape[1] :])
    assert baseline.startswith(" a bit of a letdown")
    assert table.text[0] == baseline
    assert all(text != baseline for text in table.text[1:])
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert re.search(r"\n\s*baseline\s+none\s+0\s+0\.0\s+0\.0+\s+a bit of a letdown", summary)


@pytest.mark.parametrize("rule", list(RELATIVE_SCALE))
def test_gemma_generation_is_its_own_greedy_continuation(gemma: Any, rule: Any) -> None:
    assert_generation_is_greedy(gemma, gemma.to_tokens(DEMO_PROMPT), rule, 8, layer=6)


def test_doctor_passes_on_the_embedded_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "PASS  generation" in out and "(gemma-3-270m, 12 tokens" in out
    assert out.count("PASS  ") == 4 and "all checks passed" in out


def test_corrupted_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = M.embedded_model_dir(progress=False)
    copy = tmp_path / good.name
    shutil.copytree(good, copy)
    with (copy / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    model = tps.load_model(device="cpu", progress=False)
    assert "model.safetensors has 1000 bytes" in capsys.readouterr().err
    assert M.cache_problem(copy) is None
    assert (copy / "model.safetensors").stat().st_size == (
        good / "model.safetensors"
    ).stat().st_size
    assert model.cfg.n_layers == 18


def test_hooked_transformer_matches_bridge(gemma: Any) -> None:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        pytest.skip("HookedTransformer is gone in this TransformerLens version")
    hooked = tps.load_model(kind="hooked", device="cpu")
    assert isinstance(hooked, HookedTransformer) and not hooked.training
    a = tps.power_steer(hooked, DEMO_PROMPT, source=8, target=16, k=4, tol=2e-5)
    b = tps.power_steer(gemma, DEMO_PROMPT, source=8, target=16, k=4, tol=2e-5)
    torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-4, atol=0)
    assert principal_angles(a.vectors, b.vectors).max() < 1e-2


def test_recorded_graph_reads_gemma_targets_at_the_read_positions(gemma: Any) -> None:
    """Gemma's blocks (a norm after the MLP) are recomputed exactly, so atlas products cross
    a target's MLP at the read positions only (the values are checked against dense
    Jacobians below)."""
    from tl_powersteer.jacobian import RecordedPass

    graph = RecordedPass(gemma, DEMO_PROMPT, [0], [1, 9, 17])
    assert sorted(graph._short_reads) == [1, 9, 17]


def test_atlas_methods_on_real_pairs(gemma: Any, tmp_path: Path) -> None:
    from tl_powersteer.atlas.checkpoint import load_checkpoint

    pairs = {"sources": [3, 8], "targets": [10, 16], "k": 4, "progress": False}
    exact = tps.sensitivity_atlas(gemma, DEMO_PROMPT, method="exact", **pairs)
    power = tps.sensitivity_atlas(gemma, DEMO_PROMPT, method="power", **pairs)
    ckpt = tmp_path / "sketch.safetensors"
    sketch = tps.sensitivity_atlas(gemma, DEMO_PROMPT, method="sketch", checkpoint=ckpt, **pairs)
    # 3k + 2; each layer here has two partners, whose sketches are widened to fill the
    # shared basis of 4r = 56 columns.
    state = load_checkpoint(ckpt)[1]
    assert (sketch.sketch_rank, state.co_range_width, state.range_width) == (14, 28, 28)
    assert sketch.sketch_matmul_dtype == ("bfloat16" if cpu_multiplies_bfloat16() else "float32")
    full = tps.sensitivity_atlas(
        gemma, DEMO_PROMPT, method="sketch", sketch_matmul_dtype=torch.float32, **pairs
    )
    for s, t in exact.pairs():
        J = tps.LayerJacobian(gemma, DEMO_PROMPT, source=s, target=t).dense()
        S, Vh = torch.linalg.svd(J.double(), full_matrices=False)[1:]
        torch.testing.assert_close(exact.singular_values[s, t].double(), S[:4], rtol=1e-5, atol=0)
        assert principal_angles(exact.vectors(s, t), Vh[:4]).max() < 1e-3
        rel = (power.singular_values[s, t] - exact.singular_values[s, t]).abs()
        assert (rel / exact.singular_values[s, t]).max() < 1e-3
        # In full precision the sketch's σ are lower bounds, here 0.2% below at most (seeds
        # 0 to 2). Rounded bfloat16 products (the default on a CPU that has them) are up to
        # 0.5% below, and may put σ a little above.
        want = exact.singular_values[s, t]
        for found, below, above in (
            (full.singular_values[s, t], 0.01, 1e-4),
            (sketch.singular_values[s, t], 0.02, 5e-3),
        ):
            assert ((found - want) / want).max() < above
            assert ((found - want) / want).min() > -below


def test_atlas_page_effects_reach_the_asked_kl_on_gemma(gemma: Any) -> None:
    from tl_powersteer.atlas import token_effects

    pairs = {"sources": [3, 8], "targets": [10, 16], "k": 4, "progress": False}
    atlas = tps.sensitivity_atlas(gemma, DEMO_PROMPT, method="sketch", **pairs)
    effects = token_effects(gemma, atlas, kl=1.0, progress=False)
    kls = [e[sign]["kl"] for pair in effects["pairs"].values() for e in pair for sign in "+-"]
    # 32 vectors and signs; seen: 0.86 to 1.10 nats. A tenth of the typical norm spreads
    # the same vectors over 0.19 to 3.4 nats.
    misses = sorted(abs(math.log(kl)) for kl in kls)
    assert len(misses) == 32 and misses[-1] < math.log(1.5) and misses[28] <= 0.1
    relative = [e[s]["relative"] for pair in effects["pairs"].values() for e in pair for s in "+-"]
    assert 0.01 < min(relative) and max(relative) < 1.0
    # Listed by the mass they gained or lost: at 1 nat every first listed token moved by
    # more than half a percentage point of probability.
    firsts = [e[s][side][0][1] for pair in effects["pairs"].values() for e in pair for s in "+-"
              for side in ("promoted", "suppressed")]  # fmt: skip
    assert min(abs(p) for p in firsts) > 0.005, sorted(abs(p) for p in firsts)[:4]
    assert min(firsts[0::2]) > 0 > max(firsts[1::2])


FORK_PROMPTS = [
    DEMO_PROMPT,
    "We saw the new play yesterday. To be honest, the show was",
    "I read the novel over the weekend. Frankly, the book was",
]


def test_power_steering_beats_random_directions_at_matched_kl(gemma: Any) -> None:
    """On a sentiment fork, the best top Power Steering vector moves logit(' great') -
    logit(' terrible') more than any random direction at the same KL, with the scale
    calibrated on two prompts and the effect measured on the third."""
    res = tps.power_steer(gemma, FORK_PROMPTS, 8, 16, k=8)
    ranked = tps.rank_vectors(gemma, FORK_PROMPTS, res.steering_vectors(), kl=0.5,
                              answers=(" great", " terrible"), controls=4, holdout=1 / 3)  # fmt: skip
    assert ranked["held_out"].all() and len(ranked) == 12
    best = ranked.groupby("method")["abs_effect"].max()
    assert best["power_steering"] > 1.5 * best["random"], ranked
    # At matched KL the random directions need several times the norm.
    scales = ranked.groupby("method")["absolute_scale"].median()
    assert scales["random"] > 3 * scales["power_steering"]


def test_last_token_shortcut_and_kl_scale_on_gemma(gemma: Any) -> None:
    from tl_powersteer.adapters import ModelAdapter, steered_logits

    adapter = ModelAdapter(gemma)
    batch = adapter.tokenize(FORK_PROMPTS[:2])
    v = tps.random_vectors(640, 8, "hook_mlp_out", 1)[0]
    deltas = torch.stack([torch.zeros(640), 100.0 * v.direction])
    fast = steered_logits(adapter, batch, v.hook_name, deltas)
    full = steered_logits(adapter, batch, v.hook_name, deltas, last_only=False)
    last = batch.lengths - 1
    torch.testing.assert_close(fast, full[:, [0, 1], last], rtol=1e-4, atol=1e-3)
    with tps.steer(gemma, v, 0.3, scale_mode="kl", reference=FORK_PROMPTS[:2]) as steering:
        pass
    table = tps.effect(gemma, FORK_PROMPTS[:2], v, steering.scales, signs=[1])
    assert table["kl"].mean() == pytest.approx(0.3, rel=1e-3)


def test_relative_scale_ignores_massive_dimensions(gemma: Any) -> None:
    plain = tps.LayerJacobian(gemma, DEMO_PROMPT, 7, 8, target_site="hook_resid_post")
    act = plain.target_value.view(4, 640)
    typical = tps.typical_norm(gemma, DEMO_PROMPT, 8, "hook_resid_post")
    # Gemma's layer-8 residual is dominated by a few dimensions: the robust norm is a
    # fraction of the plain one.
    assert typical < 0.3 * float(act.norm(dim=-1).median())


def test_steer_cli_on_gemma(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "steer"
    args = ["steer", "--prompt", DEMO_PROMPT, "--source", "8", "--target", "16", "--k", "2",
            "--positive", "I loved this film, it was wonderful", "--negative",
            "I hated this film, it was awful", "--melbo-steps", "20", "--scales", "0.5",
            "--answers", " great", " terrible", "--max-new-tokens", "8", "--controls", "1",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    names = sorted(p.name for p in (out / "vectors").iterdir())
    assert [n.split("_", 1)[1] for n in names] == [
        "power_steering.safetensors", "power_steering.safetensors",
        "melbo.safetensors", "melbo.safetensors", "caa.safetensors",
    ]  # fmt: skip
    text = (out / "summary.md").read_text()
    assert "logit(' great') - logit(' terrible')" in text and "caa L8" in text
