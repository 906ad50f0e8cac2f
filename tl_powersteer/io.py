"""Saving and loading results: one ``.safetensors`` file, never pickle.

Tensors go in the safetensors body; everything else (layers, sites, positions, prompts,
model name, seed, library and schema version) is JSON stored in the file's header under
the key ``"tl_powersteer"``, readable with any safetensors reader. Files are written to a
temporary name and renamed, so an interrupted save never leaves a partial file.

>>> import os, tempfile, torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> import tl_powersteer as tps
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=2, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> model = TransformerBridge.boot_native(cfg)
>>> res = tps.power_steer(model, torch.tensor([[1, 2, 3, 4, 5]]), source=0, target=1, k=2)
>>> path = os.path.join(tempfile.mkdtemp(), "vectors.safetensors")
>>> res.save(path)
>>> again = tps.load(path)
>>> torch.equal(again.vectors, res.vectors), again.source, again.target
(True, 0, 1)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from .atlas import SensitivityAtlas
from .baselines.melbo import MelboResult
from .power_steering import PowerSteeringResult
from .steering import SteeringVector

__all__ = ["save", "load", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_HEADER_KEY = "tl_powersteer"
_KINDS: dict[str, type] = {
    "PowerSteeringResult": PowerSteeringResult,
    "SensitivityAtlas": SensitivityAtlas,
    "SteeringVector": SteeringVector,
    "MelboResult": MelboResult,
}


def _version() -> str:
    from . import __version__

    return __version__


def save(result: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``result`` (a result dataclass of this package) to ``path`` atomically."""
    kind = type(result).__name__
    if kind not in _KINDS or not dataclasses.is_dataclass(result):
        raise TypeError(f"cannot save a {kind}; expected one of {sorted(_KINDS)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save to a file ending in .safetensors, got {str(path)!r}")
    if not path.parent.exists():
        raise ValueError(f"the folder {str(path.parent)!r} does not exist; create it first")
    tensors: dict[str, Tensor] = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Tensor):
            tensors[f.name] = value.detach().cpu().contiguous()
        else:
            fields[f.name] = value
    header = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "library_version": _version(),
        "fields": fields,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_HEADER_KEY: json.dumps(header)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike[str]) -> Any:
    """Read a result written by ``save`` (or a result's ``save`` method)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {str(path)!r}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _HEADER_KEY not in metadata:
        raise ValueError(
            f"{str(path)!r} is a safetensors file but was not written by tl_powersteer"
        )
    header = json.loads(metadata[_HEADER_KEY])
    if header.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(
            f"{str(path)!r} uses schema version {header['schema_version']}, newer than this "
            f"library's {SCHEMA_VERSION}; upgrade tl_powersteer to read it"
        )
    cls = _KINDS.get(header.get("kind", ""))
    if cls is None:
        raise ValueError(f"{str(path)!r} holds an unknown result kind {header.get('kind')!r}")
    tensors: dict[str, Any] = load_file(str(path))
    stored = {**header["fields"], **tensors}
    unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(
            f"{str(path)!r} holds fields this version of tl_powersteer ({_version()}) does "
            f"not know: {unknown}; it was written by version "
            f"{header.get('library_version', '?')}: load it with that version, or recompute it"
        )
    return cls(**stored)
