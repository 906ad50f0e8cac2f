"""Tiny random-weight models built offline, session-scoped and read-only.

Which model classes exist depends on the installed TransformerLens: ``HookedTransformer``
up to 3.x, ``TransformerBridge`` from 3.x on. Tests that take ``model`` run once per
class available here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.helpers import TINY_CONFIG, build_models, write_tiny_gpt2, write_word_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests on the real model")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded() -> Iterator[None]:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_grad() -> Iterator[None]:
    """For tests that call the shared models directly: a bridge caches its last attention
    pattern on its modules, and one with an autograd graph would make the model
    impossible to deepcopy in later tests."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def gpt2_dir(tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random GPT-2 saved as a local HuggingFace directory, with a tokenizer."""
    return write_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), tokenizer_dir)


@pytest.fixture(scope="session")
def models(tokenizer_dir: str, gpt2_dir: str) -> dict[str, Any]:
    return build_models(tokenizer_dir, gpt2_dir)


@pytest.fixture(params=["hooked", "native_bridge", "hf_bridge"])
def model(request: pytest.FixtureRequest, models: dict[str, Any]) -> Any:
    if request.param not in models:
        pytest.skip(f"{request.param} is not available in this TransformerLens version")
    return models[request.param]


@pytest.fixture(params=["hooked", "hf_bridge"])
def text_model(request: pytest.FixtureRequest, models: dict[str, Any]) -> Any:
    """A tiny model with a tokenizer, for string prompts."""
    if request.param not in models:
        pytest.skip(f"{request.param} is not available in this TransformerLens version")
    return models[request.param]


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.tensor([[1, 4, 6, 8, 9, 4, 10, 5], [1, 5, 7, 13, 14, 15, 16, 17]])


@pytest.fixture(scope="session")
def generation_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny random models whose greedy continuations vary from token to token: one per
    HuggingFace architecture, booted through ``boot_transformers`` so that generation runs
    transformers' own code, and the HookedTransformer where TransformerLens has one."""
    from tl_powersteer.doctor import TINY_ARCHITECTURES, write_tiny_model

    root = tmp_path_factory.mktemp("generation")
    found = {
        architecture: tps.load_model(
            str(write_tiny_model(root / architecture, architecture)),
            device="cpu",
            dtype=torch.float64,
            progress=False,
        )
        for architecture in TINY_ARCHITECTURES
    }
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        return found
    cfg = HookedTransformerConfig(
        **{**TINY_CONFIG, "d_model": 32, "d_mlp": 64, "d_vocab": 64},
        initializer_range=0.3,
        dtype=torch.float64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tokenizer = found["gpt2"].tokenizer
        found["hooked"] = HookedTransformer(cfg, tokenizer=tokenizer).eval()
        found["hooked, no tokenizer"] = HookedTransformer(cfg).eval()
    return found


@pytest.fixture(params=["gemma3", "llama", "gpt2", "hooked"])
def generation_model(request: pytest.FixtureRequest, generation_models: dict[str, Any]) -> Any:
    if request.param not in generation_models:
        pytest.skip(f"{request.param} is not available in this TransformerLens version")
    return generation_models[request.param]
