"""Files: damaged, truncated or edited ones are refused with one ValueError naming the file,
never accepted and never a raw traceback."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import tl_powersteer as tps
from tests.helpers import WORDS, forge, no_forward_pass
from tl_powersteer.atlas.checkpoint import load_checkpoint, save_checkpoint
from tl_powersteer.io import split_fields


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    (ta, fa), (tb, fb) = split_fields(a), split_fields(b)

    def bits(x: torch.Tensor) -> torch.Tensor:  # NaN == NaN, bit for bit
        return x.contiguous().reshape(-1).view(torch.uint8)

    return (
        fa == fb
        and ta.keys() == tb.keys()
        and all(ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape for k in ta)
        and all(torch.equal(bits(ta[k]), bits(tb[k])) for k in ta)
    )


@pytest.fixture
def saved(models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path) -> list[tuple[Path, Any]]:
    model = models["native_bridge"]
    results = [
        tps.power_steer(model, tokens, 0, 2, k=2),
        tps.sensitivity_atlas(model, tokens, k=1, method="sketch", sketch_rank=3, progress=False),
        tps.SteeringVector(torch.randn(16), 1, "hook_mlp_out", "custom", metadata={"a": [1]}),
    ]
    out = []
    for i, result in enumerate(results):
        path = tmp_path / f"r{i}.safetensors"
        result.save(path)
        out.append((path, result))
    return out


def test_damaged_files_are_refused_or_load_unchanged(
    saved: list[tuple[Path, Any]], tmp_path: Path
) -> None:
    """Truncations and flipped bytes anywhere in the file: each either raises ValueError
    (naming the file) or loads an object equal to the saved one, never anything else."""
    rng = random.Random(0)
    refused = 0
    for path, result in saved:
        data = path.read_bytes()
        cases = [data[: rng.randrange(len(data))] for _ in range(15)]
        for _ in range(45):
            damaged = bytearray(data)
            where = rng.randrange(len(damaged))
            damaged[where] ^= 1 << rng.randrange(8)
            cases.append(bytes(damaged))
        for i, case in enumerate(cases):
            broken = tmp_path / f"broken{i}.safetensors"
            broken.write_bytes(case)
            try:
                again = tps.load(broken)
            except ValueError as err:
                assert str(broken) in str(err)
                refused += 1
                continue
            assert same(again, result), f"case {i} of {path.name} loaded a different object"
    assert refused > 100


@pytest.mark.parametrize(
    "header",
    [
        "null",
        "[1, 2]",
        '"text"',
        "{}",
        '{"kind": "PowerSteeringResult", "schema_version": 1}',
        '{"kind": 3, "schema_version": 1, "fields": {}}',
        '{"kind": "PowerSteeringResult", "schema_version": "1", "fields": {}}',
        '{"kind": "PowerSteeringResult", "schema_version": true, "fields": {}}',
        '{"kind": "PowerSteeringResult", "schema_version": 1, "fields": []}',
        '{"kind": "PowerSteeringResult", "schema_version": 1, "fields": {}}',
        '{"kind": "Nothing", "schema_version": 1, "fields": {}}',
        "[" * 100_000,
        "{not json",
    ],
)
def test_malformed_headers_are_one_value_error(
    saved: list[tuple[Path, Any]], tmp_path: Path, header: str
) -> None:
    path, _ = saved[0]
    tensors = load_file(str(path))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"tl_powersteer": header})
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        tps.load(bad)


def test_forged_contents_break_the_invariants(saved: list[tuple[Path, Any]]) -> None:
    path, _ = saved[0]
    forge(path, lambda tensors, fields: tensors["singular_values"].neg_())
    with pytest.raises(ValueError, match="negative singular values"):
        tps.load(path)
    forge(path, lambda tensors, fields: tensors["singular_values"].copy_(torch.tensor([1, 2])))
    with pytest.raises(ValueError, match="not in descending order"):
        tps.load(path)


def test_a_checkpoint_marking_an_unfinished_source_done_is_refused(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    model = models["native_bridge"]
    ckpt = tmp_path / "atlas.safetensors"
    tps.sensitivity_atlas(model, tokens, k=1, checkpoint=ckpt, progress=False)
    atlas, state = load_checkpoint(ckpt)
    atlas.singular_values[0, 1] = float("nan")
    save_checkpoint(ckpt, atlas, state)
    with pytest.raises(ValueError, match=r"L0 -> L1 has singular values that are not finite"):
        tps.sensitivity_atlas(model, tokens, k=1, checkpoint=ckpt, progress=False)


def test_string_prompts_longer_than_the_context_are_refused(text_model: Any) -> None:
    n_ctx = int(text_model.cfg.n_ctx)
    long = " ".join(WORDS[4:] * 3)
    with pytest.raises(ValueError, match=rf"prompt 1 is \d+ tokens long.*n_ctx = {n_ctx}"):
        tps.power_steer(text_model, ["the cat", long], 0, 2, k=2)


def test_saving_onto_a_folder_is_refused(saved: list[tuple[Path, Any]], tmp_path: Path) -> None:
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        saved[0][1].save(folder)
    assert [p.name for p in folder.iterdir()] == []


def test_a_checkpoint_of_other_weights_is_refused(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    """Same name ("native"), same shapes, other weights: resuming would mix two models,
    and the page would measure one model's vectors on another."""
    import copy

    from tl_powersteer.adapters import ModelAdapter

    model = models["native_bridge"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    mine, again = ModelAdapter(model), ModelAdapter(copy.deepcopy(model))
    assert mine.weights_fingerprint() == again.weights_fingerprint()
    assert mine.weights_fingerprint() != ModelAdapter(other).weights_fingerprint()
    ckpt = tmp_path / "atlas.safetensors"
    atlas = tps.sensitivity_atlas(model, tokens, k=1, checkpoint=ckpt, progress=False)
    assert atlas.weights_fingerprint == mine.weights_fingerprint()
    with pytest.raises(ValueError, match="computed on other weights than this model's"):
        tps.sensitivity_atlas(other, tokens, k=1, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="weights are not those the atlas was computed on"):
        tps.token_effects(other, atlas, progress=False)
    # A checkpoint of the first release, which recorded no weights, still resumes.
    old, state = load_checkpoint(ckpt)
    old.weights_fingerprint = ""
    save_checkpoint(ckpt, old, state)
    resumed = tps.sensitivity_atlas(model, tokens, k=1, checkpoint=ckpt, progress=False)
    torch.testing.assert_close(resumed.singular_values, atlas.singular_values, equal_nan=True)


def _dead_pid() -> int:
    import os

    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


@pytest.mark.parametrize("writer", ["save", "checkpoint", "page"])
@pytest.mark.parametrize("problem", ["suffix", "folder", "missing"])
def test_every_file_writer_checks_its_destination_first(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path, writer: str, problem: str
) -> None:
    """Saving, the atlas checkpoint and the atlas page share one check, run before any work
    (the checkpoint's before any forward pass), and leave nothing behind."""
    model = models["native_bridge"]
    suffix = ".html" if writer == "page" else ".safetensors"
    what = {"save": "the save path", "checkpoint": "checkpoint", "page": "the atlas page path"}
    path = {
        "suffix": tmp_path / "out.pt",
        "folder": tmp_path / f"dir{suffix}",
        "missing": tmp_path / "missing" / f"out{suffix}",
    }[problem]
    if problem == "folder":
        path.mkdir()
    message = {
        "suffix": f"{what[writer]} must be a file ending in {suffix}",
        "folder": f"{what[writer]} '{path}' is a folder: choose a file path ending in {suffix}",
        "missing": f"of {what[writer]} does not exist; create it first",
    }[problem]
    res = tps.power_steer(model, tokens, 0, 2, k=1)
    atlas = tps.sensitivity_atlas(model, tokens, sources=[0], targets=[1], k=1, progress=False)
    before = sorted(tmp_path.rglob("*"))
    with no_forward_pass(model), pytest.raises(ValueError, match=re.escape(message)):
        if writer == "save":
            res.save(path)
        elif writer == "checkpoint":
            tps.sensitivity_atlas(model, tokens, k=1, checkpoint=path, progress=False)
        else:
            tps.atlas_html(atlas, path)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_failed_write_leaves_no_temporary_file(
    saved: list[tuple[Path, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tl_powersteer import io

    target = tmp_path / "new.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        saved[0][1].save(target)
    with pytest.raises(RuntimeError, match="half way"):
        with io.atomic_folder(tmp_path / "out") as folder:
            (folder / "a.csv").write_text("1")
            raise RuntimeError("half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_temporary_files_of_a_killed_writer_are_removed(
    saved: list[tuple[Path, Any]], tmp_path: Path
) -> None:
    """A killed writer's temporary files (its pid no longer runs) are removed by the next
    write of the same path; a running writer's, and other files, are left alone."""
    import os

    from tl_powersteer.io import atomic_folder, is_temporary

    path, result = saved[0]
    dead = _dead_pid()
    stale = tmp_path / f".{path.name}.{dead}-abc123.tmp"
    stale.write_bytes(b"half")
    running = tmp_path / f".{path.name}.{os.getpid()}-def456.tmp"
    running.write_bytes(b"mine")
    other = tmp_path / f".{path.name}.notes"
    other.write_text("keep")
    stale_folder = tmp_path / f".out.{dead}-x1.partial"
    (stale_folder / "vectors").mkdir(parents=True)
    assert is_temporary(stale.name) and is_temporary(stale_folder.name)
    assert not is_temporary(other.name) and not is_temporary("atlas.csv")
    result.save(path)
    assert not stale.exists() and running.exists() and other.exists()
    assert same(tps.load(path), result)
    with atomic_folder(tmp_path / "out") as folder:
        (folder / "summary.md").write_text("done")
    assert not stale_folder.exists() and (tmp_path / "out" / "summary.md").is_file()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], None),
        (["summary.md", "effects.csv", ".summary.md.123-ab.tmp"], None),
        (["notes.txt"], r"not a previous output folder \(it holds notes.txt\)"),
        (["effects.csv"], r"not a previous output folder \(it has no summary.md\)"),
        (["summary.md", "thesis.tex"], r"\(it holds thesis.tex\)"),
    ],
)
def test_output_folders_are_only_replaced_when_they_are_ours(
    tmp_path: Path, entries: list[str], message: str | None
) -> None:
    from tl_powersteer.io import check_output_folder

    folder = tmp_path / "out"
    folder.mkdir()
    for name in entries:
        (folder / name).write_text("x")
    written = ["summary.md", "effects.csv", "generations.csv"]
    if message is None:
        assert check_output_folder(folder, written, "--out", marker="summary.md") == folder
    else:
        with pytest.raises(ValueError, match=message):
            check_output_folder(folder, written, "--out", marker="summary.md")
    with pytest.raises(ValueError, match="is a file; choose a folder"):
        check_output_folder(_touch(tmp_path / "f"), written, "--out", marker="summary.md")
    with pytest.raises(ValueError, match="the folder of --out does not exist"):
        check_output_folder(tmp_path / "no" / "out", written, "--out", marker="summary.md")


def _touch(path: Path) -> Path:
    path.write_text("x")
    return path
