"""Former names keep working for one release, each with a DeprecationWarning naming the new
one; files written under the former field names still load."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tl_powersteer import jacobian, scales
from tl_powersteer.atlas.checkpoint import load_checkpoint
from tl_powersteer.io import split_fields, write_fields


def test_renamed_modules_and_classes() -> None:
    sys.modules.pop("tl_powersteer.power", None)
    with pytest.warns(DeprecationWarning, match="tl_powersteer.linalg"):
        power = importlib.import_module("tl_powersteer.power")
    assert power.block_power_iteration is tps.block_power_iteration
    with pytest.warns(DeprecationWarning, match="RecordedPass"):
        assert jacobian.JacobianGraph is jacobian.RecordedPass
    with pytest.warns(DeprecationWarning, match=r"moved to tl_powersteer\.scales\.kl_scale"):
        from tl_powersteer.steering import kl_scale
    assert kl_scale is scales.kl_scale
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        importlib.import_module("tl_powersteer.steering").nothing  # noqa: B018


def test_positions_keyword_is_now_target_positions(
    models: dict[str, Any], tokens: torch.Tensor
) -> None:
    model = models["native_bridge"]
    with pytest.warns(DeprecationWarning, match=r"power_steer\(\): positions= is now target_"):
        res = tps.power_steer(model, tokens, 0, 2, k=2, positions=2)
    new = tps.power_steer(model, tokens, 0, 2, k=2, target_positions=2)
    assert res.target_positions == 2 and torch.equal(res.vectors, new.vectors)
    with pytest.warns(DeprecationWarning, match="PowerSteeringResult.positions is now"):
        assert res.positions == 2
    with pytest.warns(DeprecationWarning, match="LayerJacobian"):
        op = tps.LayerJacobian(model, tokens, 0, 2, positions=3)
    assert op.shape[0] == 2 * 3 * 16
    with pytest.warns(DeprecationWarning, match="sensitivity_atlas"):
        atlas = tps.sensitivity_atlas(model, tokens, sources=[0], k=1, positions=1, progress=False)
    assert atlas.target_positions == 1
    with pytest.warns(DeprecationWarning, match="SensitivityAtlas.positions"):
        assert atlas.positions == 1
    with pytest.warns(DeprecationWarning, match="melbo"):
        found = tps.melbo(model, tokens, 0, 2, n_vectors=1, radius=1.0, steps=2, positions=2,
                          progress=False)  # fmt: skip
    assert found.target_positions == 2
    with pytest.raises(TypeError, match="unexpected keyword argument 'position'"):
        tps.power_steer(model, tokens, 0, 2, position=2)


def test_to_html_still_writes_the_page(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    model = models["native_bridge"]
    atlas = tps.sensitivity_atlas(model, tokens, sources=[0], targets=[2], k=1, progress=False)
    with pytest.warns(DeprecationWarning, match="atlas_html"):
        old = atlas.to_html(tmp_path / "old.html", model=model, top=2, progress=False)  # type: ignore[attr-defined]
    effects = tps.token_effects(model, atlas, top=2, progress=False)
    new = tps.atlas_html(atlas, tmp_path / "new.html", effects=effects)
    assert old.read_text() == new.read_text() and "promoted" in new.read_text()


def test_files_with_former_field_names_load(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    """What the former version wrote: ``positions`` for the final tokens read, and the
    sketch's widths and working state inside the atlas."""
    model = models["native_bridge"]
    res = tps.power_steer(model, tokens, 0, 2, k=2, target_positions=3)
    path = tmp_path / "old.safetensors"

    def write_as_before(result: Any, extra: dict[str, Any]) -> None:
        tensors, fields = split_fields(result)
        fields["positions"] = fields.pop("target_positions")
        write_fields(path, type(result).__name__, tensors, {**fields, **extra})

    write_as_before(res, {})
    again = tps.load(path)
    assert again.target_positions == 3 and torch.equal(again.vectors, res.vectors)

    atlas = tps.sensitivity_atlas(model, tokens, k=1, method="sketch", sketch_rank=3,
                                  progress=False)  # fmt: skip
    widths = {"co_range_width": 3, "basis_width": 12, "range_width": 2}
    write_as_before(atlas, {**widths, "co_range_sketch": None, "completed_targets": [1, 2, 3]})
    loaded = tps.load(path)
    assert loaded.target_positions == atlas.target_positions and loaded.pairs() == atlas.pairs()
    torch.testing.assert_close(loaded.singular_values, atlas.singular_values, equal_nan=True)
    _, state = load_checkpoint(path)
    assert state.settings() == widths and state.completed_targets == [1, 2, 3]


def test_power_steering_files_without_error_bounds_still_load(
    models: dict[str, Any], tokens: torch.Tensor, tmp_path: Path
) -> None:
    res = tps.power_steer(models["native_bridge"], tokens, 0, 2, k=2)
    tensors, fields = split_fields(res)
    tensors.pop("error_bounds")
    for name in ("angle_bound", "stop_rule"):
        fields.pop(name)
    path = tmp_path / "old.safetensors"
    write_fields(path, "PowerSteeringResult", tensors, fields)
    again = tps.load(path)
    assert torch.equal(again.vectors, res.vectors)
    assert again.error_bounds.numel() == 0 and again.stop_rule == ""
    assert again.to_pandas()["error_bound"].isna().all()
