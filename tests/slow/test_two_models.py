"""Both embedded models, Gemma 3 270M and SmolLM2-135M-Instruct (run with --run-slow):
the same checks against independent dense references on two architectures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.reference import RELATIVE_SCALE, assert_generation_is_greedy, principal_angles
from tl_powersteer.adapters import ModelAdapter
from tl_powersteer.cli import DEMO_PROMPT

pytestmark = pytest.mark.slow

NAMES = ["gemma-3-270m", "smollm2-135m-instruct"]
_LOADED: dict[str, Any] = {}


@pytest.fixture(params=NAMES)
def embedded(request: pytest.FixtureRequest) -> Any:
    if request.param not in _LOADED:
        _LOADED[request.param] = tps.load_model(request.param, device="cpu", progress=False)
    return _LOADED[request.param]


@pytest.fixture
def smollm2() -> Any:
    if NAMES[1] not in _LOADED:
        _LOADED[NAMES[1]] = tps.load_model(NAMES[1], device="cpu", progress=False)
    return _LOADED[NAMES[1]]


def prompt_of(model: Any) -> str:
    if model.cfg.model_name == NAMES[0]:
        return DEMO_PROMPT
    return tps.chat_prompt(model, "Is it a good idea to learn to swim? Answer yes or no.")


def test_smollm2_loads_offline_and_is_the_hf_model(smollm2: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tl_powersteer.models import embedded_cache_dir

    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model, smollm2.cfg.d_vocab) == (30, 576, 49152)
    assert smollm2.cfg.model_name == "smollm2-135m-instruct"
    folder = str(embedded_cache_dir(NAMES[1]))
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = ModelAdapter(smollm2).tokenize("The capital of France is").tokens
    # The model's own tokenizer adds no BOS to a plain prompt, and neither does the adapter
    # (TransformerLens would prepend <|im_start|>).
    own = AutoTokenizer.from_pretrained(folder)
    assert tokens[0].tolist() == own("The capital of France is").input_ids
    with torch.no_grad():
        ours, theirs = smollm2(tokens), hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    for text, answer, least in (
        ("The capital of France is", " Paris", 0.7),
        ("When Mary and John went to the store, John gave a drink to", " Mary", 0.85),
    ):
        with torch.no_grad():
            probs = smollm2(ModelAdapter(smollm2).tokenize(text).tokens)[0, -1].softmax(-1)
        top = int(probs.argmax())
        assert smollm2.tokenizer.decode([top]) == answer and float(probs[top]) > least


def test_chat_prompt_tokens_are_the_templates(smollm2: Any) -> None:
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Is water wet?"},
    ]
    text = tps.chat_prompt(smollm2, messages)
    from transformers import AutoTokenizer

    from tl_powersteer.models import embedded_cache_dir

    own = AutoTokenizer.from_pretrained(str(embedded_cache_dir(NAMES[1])))
    ids = own.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ModelAdapter(smollm2).tokenize(text).tokens[0].tolist() == list(ids)
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("pair", [(0.3, 0.7), (0.1, 0.5)])
def test_power_steer_matches_dense_svd(embedded: Any, pair: tuple[float, float]) -> None:
    n = embedded.cfg.n_layers
    source, target = (int(f * n) for f in pair)
    prompt = prompt_of(embedded)
    res = tps.power_steer(embedded, prompt, source=source, target=target, k=8)
    J = tps.LayerJacobian(embedded, prompt, source=source, target=target).dense()
    S, Vh = torch.linalg.svd(J.double(), full_matrices=False)[1:]
    assert res.converged
    assert ((res.singular_values.double() - S[:8]).abs() / S[:8]).max() < 1e-3
    assert principal_angles(res.vectors[:4], Vh[:4]).max() < 1e-2


@pytest.mark.parametrize("rule", list(RELATIVE_SCALE))
def test_smollm2_generation_is_its_own_greedy_continuation(smollm2: Any, rule: Any) -> None:
    """With the KV cache, without it, and an argmax loop, unsteered and under each rule
    (Gemma's: test_embedded.py), on a chat prompt."""
    tokens = ModelAdapter(smollm2).tokenize(prompt_of(smollm2)).tokens
    assert_generation_is_greedy(smollm2, tokens, rule, 8, layer=10)


def test_a_control_vector_round_trips(embedded: Any, tmp_path: Path) -> None:
    """Power Steering vectors at hook_mlp_out, exported to llama.cpp's format and imported
    at hook_resid_post, steer exactly as the originals: on Gemma 3 too, whose MLP output
    passes a norm before the residual addition."""
    n = embedded.cfg.n_layers
    prompt = prompt_of(embedded)
    res = tps.power_steer(embedded, prompt, source=n // 3, target=2 * n // 3, k=2)
    vectors = res.steering_vectors()
    scales = [4.0 * tps.typical_norm(embedded, prompt, n // 3, "hook_mlp_out")] * 2
    path = tps.export_control_vector(vectors, tmp_path / "v.gguf", scales=scales)
    (imported,) = tps.import_control_vector(path)
    assert (imported.layer, imported.site) == (n // 3, "hook_resid_post")
    tokens = ModelAdapter(embedded).tokenize(prompt).tokens
    with torch.no_grad():
        with tps.steer(embedded, vectors, scales):
            steered = embedded(tokens)
        with tps.steer(embedded, imported, imported.norm):
            again = embedded(tokens)
        plain = embedded(tokens)
    assert (steered - plain).abs().max() > 1.0  # the vectors do something
    torch.testing.assert_close(again, steered, rtol=1e-3, atol=1e-3)


def test_a_sketch_atlas_of_all_435_pairs(smollm2: Any) -> None:
    """The 30-layer model's whole atlas by the sketch (about 80 s on two cores), checked on
    a sample of pairs against exact: σ are lower bounds up to bfloat16 rounding, within the
    tolerances of Gemma's test (test_embedded.py); about 1.4% below at most here."""
    prompt = prompt_of(smollm2)
    sketch = tps.sensitivity_atlas(smollm2, prompt, k=4, method="sketch", progress=False)
    assert len(sketch.pairs()) == 435 and sketch.is_complete()
    exact = tps.sensitivity_atlas(
        smollm2, prompt, k=4, method="exact", sources=[14], targets=[15, 29], progress=False
    )
    for s, t in exact.pairs():
        want = exact.singular_values[s, t]
        relative = (sketch.singular_values[s, t] - want) / want
        assert relative.max() < 5e-3 and relative.min() > -0.02, (s, t, relative)


def test_the_readme_example(smollm2: Any, tmp_path: Path) -> None:
    prompt = tps.chat_prompt(smollm2, [
        {"role": "system", "content": "Answer yes or no."},
        {"role": "user", "content": "Is it safe to swim right after eating?"},
    ], assistant_prefix="")  # fmt: skip
    result = tps.power_steer(smollm2, prompt, source=10, target=20, k=4)
    path = tps.export_control_vector(
        result.steering_vectors()[:1], tmp_path / "vector.gguf", scales=8.0
    )
    (back,) = tps.import_control_vector(path)
    assert (back.layer, back.norm) == (10, pytest.approx(8.0, rel=1e-6))
    assert back.metadata["model_hint"] == "llama"


def test_each_embedded_model_records_its_gguf_file(embedded: Any) -> None:
    from tl_powersteer.models import EMBEDDED_MODELS, model_provenance

    made = model_provenance(embedded)
    name = embedded.cfg.model_name
    assert (made["embedded_model"], made["gguf_sha256"]) == (name, EMBEDDED_MODELS[name].sha256)
    other = _LOADED[NAMES[1] if name == NAMES[0] else NAMES[0]] if len(_LOADED) == 2 else None
    if other is not None:
        assert model_provenance(other)["config_hash"] != made["config_hash"]


def test_the_smollm2_demo_has_a_chat_fork_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd

    from tl_powersteer.cli import main
    from tl_powersteer.cli.parser import DEMOS

    out = tmp_path / "demo"
    args = ["demo", "--model", NAMES[1], "--out", str(out), "--k", "2", "--controls", "1",
            "--max-new-tokens", "12"]  # fmt: skip
    assert main(args) == 0
    summary = (out / "summary.md").read_text()
    demo = DEMOS[NAMES[1]]
    assert "L6 hook_mlp_out -> L18 hook_mlp_out, last 1 tokens of 4 prompt(s)" in summary
    assert "change of logit('Yes') - logit('No')" in summary
    # The prompts went through the chat template, with the demo's system message once.
    assert summary.count(f"<|im_start|>system\\n{demo.system}<|im_end|>") == 2
    saved = tps.load(out / "vectors.safetensors")
    assert saved.prompts[0].endswith("<|im_start|>assistant\n")
    assert saved.provenance["embedded_model"] == NAMES[1]
    texts = pd.read_csv(out / "generations.csv")
    assert texts["text"].str.len().min() > 0 and len(texts) == 1 + 2 * 2
