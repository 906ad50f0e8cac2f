"""Saving and loading results: one ``.safetensors`` file, never pickle.

Tensors go in the safetensors body; everything else (layers, sites, positions, prompts,
model name, seed, library and schema version) is JSON stored in the file's header under
the key ``"tl_powersteer"``, readable with any safetensors reader. Files are written to a
temporary name and renamed (``atomic_file``, ``atomic_folder``), so an interrupted save
never leaves a partial file.

``load`` knows a result type by its name in the file's header, through a registry that
each result type joins with the ``register`` decorator: this module imports none of them.

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
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .version import __version__

__all__ = [
    "RESULT_TYPES",
    "SCHEMA_VERSION",
    "atomic_file",
    "atomic_folder",
    "build_result",
    "check_destination",
    "check_output_folder",
    "digest",
    "is_temporary",
    "load",
    "read_fields",
    "register",
    "remove_stale",
    "save",
    "split_fields",
    "write_fields",
]

SCHEMA_VERSION = 1
HEADER_KEY = "tl_powersteer"

T = TypeVar("T")


@dataclass(frozen=True)
class ResultType:
    """A result type ``load`` can build, and how older files name its fields."""

    cls: type
    renamed: dict[str, str]
    dropped: tuple[str, ...]
    check: Callable[[Any], None] | None


RESULT_TYPES: dict[str, ResultType] = {}


def register(
    *,
    renamed: dict[str, str] | None = None,
    dropped: tuple[str, ...] = (),
    check: Callable[[Any], None] | None = None,
) -> Callable[[type[T]], type[T]]:
    """Class decorator: let ``save`` write and ``load`` read this result dataclass.

    ``renamed`` maps field names that files of earlier versions used to the current ones;
    ``dropped`` lists fields that earlier versions stored and this one no longer has.
    ``check(result)`` raises ``ValueError`` when a loaded result breaks an invariant its
    type guarantees (finite, descending singular values, say).
    """

    def add(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"only dataclasses can be registered, got {cls.__name__}")
        RESULT_TYPES[cls.__name__] = ResultType(cls, dict(renamed or {}), tuple(dropped), check)
        return cls

    return add


# A writer's temporary names: ".{name}.{pid}-{random}.tmp" (files) or ".partial" (folders).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]+\.(tmp|partial)$")


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file or folder of ``atomic_file``/``atomic_folder``."""
    return _TEMPORARY.match(name) is not None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or a platform that cannot tell
    return True


def remove_stale(path: str | os.PathLike[str]) -> None:
    """Remove the temporary files and folders a killed writer of ``path`` left beside it:
    those whose process (the pid in their name, on this machine) no longer runs."""
    path = Path(path)
    if os.name != "posix" or not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        found = _TEMPORARY.match(entry.name)
        if found is None or found["name"] != path.name or _process_alive(int(found["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_destination(path: str | os.PathLike[str], suffix: str, what: str) -> Path:
    """``path`` as a file a writer can create or replace: it ends in ``suffix``, is not a
    folder, and its folder exists. The one check of every file writer, before any work."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{what} must be a file ending in {suffix}, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder: choose a file path ending in {suffix}")
    if not path.parent.is_dir():
        raise ValueError(
            f"the folder {str(path.parent)!r} of {what} does not exist; create it first"
        )
    return path


def check_output_folder(
    folder: str | os.PathLike[str], written: Sequence[str], what: str, *, marker: str
) -> Path:
    """``folder`` as one a writer of the entries ``written`` may fill or replace: absent,
    empty, or a previous output, which holds ``marker`` and nothing but ``written`` (and
    temporary files). Anything else would be partly overwritten, so it is refused."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        raise ValueError(f"the folder of {what} does not exist: {str(folder.parent)!r}")
    if not folder.exists():
        return folder
    if not folder.is_dir():
        raise ValueError(f"{what} {str(folder)!r} is a file; choose a folder")
    entries = {e.name for e in folder.iterdir() if not is_temporary(e.name)}
    foreign = sorted(entries - set(written))
    if entries and (marker not in entries or foreign):
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        why = f"it holds {shown}" if foreign else f"it has no {marker}"
        raise ValueError(
            f"{what} {str(folder)!r} exists and is not a previous output folder ({why}), "
            f"so writing there would overwrite part of it; choose another {what}, or an "
            "empty folder"
        )
    return folder


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block ends without an exception,
    rename it onto ``path`` (else delete it), so readers see the old file or the new one.
    Temporary files that a killed writer left for ``path`` are removed first."""
    path = Path(path)
    remove_stale(path)
    fd, name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(folder: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Yield a new temporary folder beside ``folder``; once the block ends without an
    exception, move it to ``folder``: an interrupted writer leaves the previous folder (or
    none), never a half-written one. With ``replace=False`` an existing ``folder`` is not
    removed and the rename raises ``OSError``."""
    folder = Path(folder)
    remove_stale(folder)
    tmp = Path(
        tempfile.mkdtemp(prefix=_temporary_prefix(folder), suffix=".partial", dir=folder.parent)
    )
    try:
        yield tmp
        if replace and folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def digest(kind: str, tensors: dict[str, Tensor], fields: dict[str, Any]) -> str:
    """SHA-256 of everything a file holds: its kind, its JSON fields (as JSON reads them
    back) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([kind, json.loads(json.dumps(fields))], sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def write_fields(
    path: str | os.PathLike[str], kind: str, tensors: dict[str, Tensor], fields: dict[str, Any]
) -> Path:
    """Write ``tensors`` and JSON ``fields`` under the header of ``kind``, with their
    ``digest``, atomically."""
    path = check_destination(path, ".safetensors", "the save path")
    body = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "library_version": __version__,
        "fields": fields,
        "digest": digest(kind, body, fields),
    }
    with atomic_file(path) as tmp:
        save_file(body, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    return path


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"{str(path)!r} {problem}: the file is damaged, truncated or was edited; "
        "restore a copy or compute the result again"
    )


def read_fields(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header (kind, versions) and every stored field, tensors included, of a file
    written by ``write_fields``; a file that does not match its digest, or whose header is
    not what ``write_fields`` writes, is refused with a ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors: dict[str, Any] = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type, and OS errors
        raise _damaged(path, f"is not a readable safetensors file ({err})") from err
    if HEADER_KEY not in metadata:
        raise ValueError(
            f"{str(path)!r} is a safetensors file but was not written by tl_powersteer"
        )
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (ValueError, RecursionError) as err:
        raise _damaged(path, "has a header that is not JSON") from err
    expected = {"kind": str, "schema_version": int, "fields": dict}
    if not isinstance(header, dict) or any(
        not isinstance(header.get(key), kind) or isinstance(header.get(key), bool)
        for key, kind in expected.items()
    ):
        raise _damaged(
            path, "has a header without the kind, schema_version and fields tl_powersteer writes"
        )
    if header["schema_version"] > SCHEMA_VERSION:
        raise ValueError(
            f"{str(path)!r} uses schema version {header['schema_version']}, newer than this "
            f"library's {SCHEMA_VERSION}; upgrade tl_powersteer to read it"
        )
    overlap = sorted(set(header["fields"]) & set(tensors))
    if overlap:
        raise _damaged(path, f"stores {overlap} both as JSON and as tensors")
    # Files of the first release carry no digest; every later one is checked.
    if "digest" in header and header["digest"] != digest(header["kind"], tensors, header["fields"]):
        raise _damaged(path, "does not match its digest")
    return header, {**header["fields"], **tensors}


def save(result: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``result`` (a result dataclass of this package) to ``path`` atomically."""
    kind = type(result).__name__
    if kind not in RESULT_TYPES or not dataclasses.is_dataclass(result):
        raise TypeError(f"cannot save a {kind}; expected one of {sorted(RESULT_TYPES)}")
    return write_fields(path, kind, *split_fields(result))


def split_fields(result: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A dataclass's fields as (tensors, everything else), as ``write_fields`` takes them."""
    tensors: dict[str, Tensor] = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Tensor):
            tensors[f.name] = value
        else:
            fields[f.name] = value
    return tensors, fields


def load(path: str | os.PathLike[str]) -> Any:
    """Read a result written by ``save`` (or a result's ``save`` method)."""
    header, stored = read_fields(path)
    return build_result(header, stored, path)


def check_shapes(result: Any, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise if a loaded result's tensors do not have the shapes its other fields imply."""
    for name, shape in shapes.items():
        found = tuple(getattr(result, name).shape)
        if found != shape:
            raise ValueError(f"{what} {name} has shape {found}, not {shape}")


def resumable(fresh: Any, path: str | os.PathLike[str], what: str) -> Any:
    """The checkpoint at ``path`` if it holds a result of ``fresh``'s kind (``what`` names
    it for the message) measured with ``fresh.settings()``; a clear error otherwise."""
    header, stored = read_fields(path)
    kind = type(fresh).__name__
    if header.get("kind") != kind:
        raise ValueError(
            f"the checkpoint {str(path)!r} holds a {header.get('kind')}, not {what}; "
            "use another checkpoint path"
        )
    saved = build_result(header, stored, path)
    mine, theirs = fresh.settings(), saved.settings()
    differ = [key for key in mine if mine[key] != theirs.get(key)]
    if differ:
        shown = "; ".join(f"{key}: {theirs.get(key)!r} there, {mine[key]!r} now" for key in differ)
        raise ValueError(
            f"the checkpoint {str(path)!r} was measured with other arguments ({shown}); "
            "rerun with the same arguments or use another checkpoint path"
        )
    return saved


def build_result(
    header: dict[str, Any], stored: dict[str, Any], path: str | os.PathLike[str]
) -> Any:
    """The result a file's ``header`` and ``stored`` fields (from ``read_fields``) describe,
    with the names of earlier versions' fields brought up to date."""
    found = RESULT_TYPES.get(header.get("kind", ""))
    if found is None:
        raise ValueError(f"{str(path)!r} holds an unknown result kind {header.get('kind')!r}")
    stored = {
        found.renamed.get(name, name): value
        for name, value in stored.items()
        if name not in found.dropped
    }
    unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(found.cls)})
    if unknown:
        raise ValueError(
            f"{str(path)!r} holds fields this version of tl_powersteer ({__version__}) does "
            f"not know: {unknown}; it was written by version "
            f"{header.get('library_version', '?')}: load it with that version, or recompute it"
        )
    required = [
        f.name
        for f in dataclasses.fields(found.cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in stored]
    if missing:
        raise _damaged(Path(path), f"lacks the fields {missing} of a {found.cls.__name__}")
    try:
        result = found.cls(**stored)
        if found.check is not None:
            found.check(result)
    except (TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise _damaged(Path(path), f"holds an invalid {found.cls.__name__} ({err})") from err
    return result
