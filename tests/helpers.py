"""Shared test helpers: the tiny random models, and faults injected the way they show in
the wild.

Which model classes exist depends on the installed TransformerLens: ``HookedTransformer``
up to 3.x, ``TransformerBridge`` from 3.x on.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tl_powersteer.adapters import ModelAdapter
from tl_powersteer.io import digest
from tl_powersteer.jacobian import RecordedJacobian


def break_kv_cache(monkeypatch: pytest.MonkeyPatch, *, also_without: bool = False) -> None:
    """Generation with the cache (or, ``also_without``, any generation) repeats its first
    new token, as under transformers 5.24.0."""
    original = ModelAdapter.generate

    def generate(self: ModelAdapter, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = original(self, tokens, **kwargs)
        if also_without or kwargs.get("use_cache", True):
            out[:, tokens.shape[1] :] = out[:, tokens.shape[1], None]
        return out

    monkeypatch.setattr(ModelAdapter, "generate", generate)


_TEXT = (
    "the a cat dog sat on mat is was good bad movie film i liked it not very and but so "
    "last night honestly watched"
)
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", *_TEXT.split()]
N_LAYERS = 4
D_MODEL = 16
# Shared by the HookedTransformer and the native TransformerBridge.
TINY_CONFIG: dict[str, Any] = {
    "d_model": D_MODEL,
    "d_head": 4,
    "n_heads": 4,
    "n_layers": N_LAYERS,
    "n_ctx": 32,
    "d_vocab": len(WORDS),
    "d_mlp": 32,
    "act_fn": "gelu",
    "seed": 0,
}


def write_word_tokenizer(folder: Path) -> str:
    """A word-level tokenizer over ``WORDS``, saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(folder)
    return str(folder)


def hooked_model(tokenizer_dir: str) -> Any:
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        return None
    from transformers import AutoTokenizer

    cfg = HookedTransformerConfig(**TINY_CONFIG, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))


def native_model() -> Any:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(**TINY_CONFIG)
    return TransformerBridge.boot_native(cfg, dtype=torch.float64)


def write_tiny_gpt2(folder: Path, tokenizer_dir: str) -> str:
    """A tiny random GPT-2 saved as a local HuggingFace directory, with a tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root = str(folder)
    torch.manual_seed(1)
    config = GPT2Config(
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=4,
        vocab_size=len(WORDS),
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(root)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root)
    return root


def build_models(tokenizer_dir: str, gpt2_dir: str, device: str = "cpu") -> dict[str, Any]:
    """Every tiny model this TransformerLens version can build, by name, each time anew
    with the same weights."""
    found: dict[str, Any] = {}
    hooked = hooked_model(tokenizer_dir)
    if hooked is not None:
        found["hooked"] = hooked.to(device)
    found["native_bridge"] = native_model().to(device)
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(gpt2_dir, device=device, dtype=torch.float64)
    found["hf_bridge"] = bridge.eval()
    return found


class Interrupt(Exception):
    pass


def interrupt_call(monkeypatch: pytest.MonkeyPatch, method: str, number: int) -> Any:
    """Make ``RecordedJacobian.<method>`` raise ``Interrupt`` at its call ``number`` (from 0);
    returns the real method, to put back."""
    real = getattr(RecordedJacobian, method)
    calls = [0]

    def stopping(self: RecordedJacobian, X: torch.Tensor) -> torch.Tensor:
        if calls[0] == number:
            raise Interrupt
        calls[0] += 1
        return real(self, X)

    monkeypatch.setattr(RecordedJacobian, method, stopping)
    return real


@contextmanager
def no_forward_pass(model: Any) -> Iterator[None]:
    """Fail the test if the model runs while the block is active."""
    calls: list[str] = []

    def spy(act: torch.Tensor, hook: Any) -> None:
        calls.append(hook.name)

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", spy)]):
        yield
    assert calls == [], "a forward pass ran before the error"


def forge(path: Path, change: Any) -> None:
    """Rewrite a file with ``change(tensors, fields)`` applied and a digest that matches,
    as someone who knows the format would: only the invariants can catch it."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["tl_powersteer"])
    tensors = load_file(str(path))
    change(tensors, header["fields"])
    header["digest"] = digest(header["kind"], tensors, header["fields"])
    save_file(tensors, str(path), metadata={"tl_powersteer": json.dumps(header)})
