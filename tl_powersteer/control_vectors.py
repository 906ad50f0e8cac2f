"""Steering vectors as llama.cpp control vectors: a GGUF file that ``llama-cli
--control-vector`` (and ollama, and repeng's ``ControlVector.import_gguf``) reads.

The format, from llama.cpp's loader (``common_control_vector_load_one``) and its writer
(``cvector-generator``): ``general.architecture = "controlvector"``, the string
``controlvector.model_hint`` (the model's llama.cpp architecture, e.g. ``llama``), the
integer ``controlvector.layer_count`` (how many direction tensors follow), and one 1-D
float32 tensor ``direction.{il}`` per layer. llama.cpp adds ``direction.{il}`` to the output
of its layer ``il`` (counted from 0, after the MLP's residual addition, at every token),
and refuses ``direction.0``; repeng numbers layers the same way (its ``direction.{i}`` is
added to the output of ``model.layers[i]``). Several vectors for one layer are summed,
as llama.cpp sums them.

So ``direction.{s}`` is TransformerLens' ``blocks.{s}.hook_resid_post``. A vector at
``blocks.{s}.hook_mlp_out`` goes there too: the MLP's output is added to the residual
stream as it is, so adding ``v`` to it adds ``v`` to the block's output (checked through
the hooks on both embedded models, Gemma 3's norm after the MLP included, since
TransformerLens' ``hook_mlp_out`` is after it). A vector at ``blocks.{s}.hook_resid_pre``
is the output of block ``s - 1``. Other sites have no llama.cpp equivalent.

The file also keeps the vectors' ``metadata["provenance"]`` as JSON under
``tl_powersteer.provenance`` (llama.cpp skips keys it does not use), so imported vectors
are checked against the model they are used on like the originals.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .io import atomic_file, check_destination
from .scales import check_scales
from .vectors import SteeringVector, vector_list

__all__ = ["ARCHITECTURES", "EXPORTABLE_SITES", "export_control_vector", "import_control_vector"]

# Where each site's vector lands in llama.cpp's numbering: the output of block layer + shift.
EXPORTABLE_SITES = {"hook_resid_post": 0, "hook_mlp_out": 0, "hook_resid_pre": -1}
# llama.cpp's architecture names of the embedded models, for controlvector.model_hint.
ARCHITECTURES = {"gemma-3-270m": "gemma3", "smollm2-135m-instruct": "llama"}
PROVENANCE_KEY = "tl_powersteer.provenance"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ValueError("control vectors are GGUF files: pip install gguf") from err
    return gguf


def export_control_vector(
    vectors: SteeringVector | Sequence[SteeringVector],
    path: str | os.PathLike[str],
    *,
    scales: float | Sequence[float],
    architecture: str | None = None,
) -> Path:
    """Write ``scales[i] · vectors[i].direction`` as a llama.cpp control vector (see the
    module docstring for the layer numbering), atomically; returns the path.

    The file holds what ``steer(model, vectors, scales)`` adds (positions ``"all"``):
    ``llama-cli --control-vector file.gguf`` then steers like it, and
    ``--control-vector-scaled file.gguf 0.5`` at half strength.

    Args:
        vectors: one ``SteeringVector`` or several, at ``EXPORTABLE_SITES``.
        path: a ``.gguf`` file.
        scales: one absolute scale for all vectors, or one per vector.
        architecture: the model's llama.cpp architecture name, written as
            ``controlvector.model_hint``; known for the embedded models (``ARCHITECTURES``).
    """
    items = vector_list(vectors)
    given = check_scales(scales)
    if len(given) == 1:
        given = given * len(items)
    if len(given) != len(items):
        raise ValueError(f"got {len(given)} scales for {len(items)} vectors")
    path = check_destination(path, ".gguf", "the control vector path")
    hints = {ARCHITECTURES.get(_model_of(v)) for v in items}
    if architecture is None:
        if len(hints) != 1 or None in hints:
            raise ValueError(
                "say which model the vectors are for with architecture=<its llama.cpp "
                f"architecture, e.g. 'llama'>: known only for {', '.join(ARCHITECTURES)}"
            )
        architecture = hints.pop()
    if not isinstance(architecture, str) or not architecture:
        raise TypeError(f"architecture must be a non-empty string, got {architecture!r}")
    widths = {v.d_model for v in items}
    if len(widths) != 1:
        raise ValueError(f"the vectors have different widths {sorted(widths)}: one model's only")
    directions: dict[int, torch.Tensor] = {}
    for v, scale in zip(items, given, strict=True):
        if v.site not in EXPORTABLE_SITES:
            raise ValueError(
                f"{v.name} is at {v.site!r}, which has no llama.cpp equivalent; control "
                f"vectors are added to a block's output: {', '.join(EXPORTABLE_SITES)}"
            )
        layer = v.layer + EXPORTABLE_SITES[v.site]
        if layer < 1:
            raise ValueError(
                f"{v.name} would be added to the output of block {layer}, and llama.cpp "
                "adds no control vector there (it refuses direction.0): choose a later layer"
            )
        added = scale * v.direction.double()
        directions[layer] = directions.get(layer, torch.zeros_like(added)) + added
    gguf = _gguf()
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", architecture)
        writer.add_int32("controlvector.layer_count", len(directions))
        made = [v.metadata.get("provenance") for v in items]
        if made[0] and all(m == made[0] for m in made):
            # Read back by import_control_vector; llama.cpp ignores keys it does not know.
            writer.add_string(PROVENANCE_KEY, json.dumps(made[0], sort_keys=True))
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", directions[layer].float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _model_of(vector: SteeringVector) -> str:
    made = vector.metadata.get("provenance") or {}
    return str(made.get("embedded_model") or vector.metadata.get("model_name"))


def _field(reader: Any, name: str) -> Any:
    field = reader.get_field(name)
    if field is None or not field.parts:
        return None
    return field.contents()


def import_control_vector(path: str | os.PathLike[str]) -> list[SteeringVector]:
    """The directions of a llama.cpp control vector file, one ``SteeringVector`` per layer
    at ``blocks.{il}.hook_resid_post``.

    Each vector's ``norm`` (also ``metadata["scale"]``) is its direction tensor's length,
    so ``steer(model, vectors, [v.norm for v in vectors])`` adds exactly what the file
    holds.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no control vector file at {str(path)!r}")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
        architecture = _field(reader, "general.architecture")
        hint = _field(reader, "controlvector.model_hint")
        made = _field(reader, PROVENANCE_KEY)
        tensors = [(t.name, t.tensor_type, t.data) for t in reader.tensors]
    except Exception as err:  # the reader raises many kinds on damaged input
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {err}") from err
    if architecture != "controlvector":
        raise ValueError(
            f"{str(path)!r} is a GGUF file of {architecture!r}, not a control vector "
            "(general.architecture 'controlvector')"
        )
    try:
        provenance = json.loads(made) if made is not None else {}
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {PROVENANCE_KEY} is not JSON ({err})") from err
    out = []
    for name, kind, data in tensors:
        prefix, _, index = name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) < 1:
            raise ValueError(f"{str(path)!r} holds a tensor {name!r}; expected direction.1, ...")
        if kind != gguf.GGMLQuantizationType.F32 or data.ndim != 1:
            raise ValueError(f"{str(path)!r}: {name} must be a 1-D float32 tensor")
        direction = torch.from_numpy(data.copy()).double()
        length = float(direction.norm())
        if length == 0:
            continue  # a layer the file leaves unsteered
        if not math.isfinite(length):
            raise ValueError(f"{str(path)!r}: {name} holds NaN or inf")
        layer = int(index)
        out.append(
            SteeringVector(
                (direction / length).float(),
                layer=layer,
                site="hook_resid_post",
                method="control_vector",
                norm=length,
                metadata={
                    "name": f"control vector L{layer}",
                    "scale": length,
                    "model_hint": hint,
                    "file": str(path),
                    **({"provenance": provenance} if provenance else {}),
                },
            )
        )
    if not out:
        raise ValueError(f"{str(path)!r} holds no non-zero direction tensor")
    return out
