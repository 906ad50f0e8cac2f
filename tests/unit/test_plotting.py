"""Atlas figures and pages, checked on the figure object and the page text."""

from __future__ import annotations

import html as html_lib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tl_powersteer.plotting import GAP_WARNING, atlas_html


@pytest.fixture(scope="module")
def atlas(models: dict[str, Any]) -> tps.SensitivityAtlas:
    tokens = torch.tensor([[1, 4, 6, 8, 9, 4, 10, 5]])
    return tps.sensitivity_atlas(models["native_bridge"], tokens, k=2, progress=False)


def test_heatmap_traces_and_axes(atlas: tps.SensitivityAtlas) -> None:
    fig = tps.plot_atlas(atlas, rank=1)
    assert len(fig.data) == 2 * 2  # (raw, normalised) x ranks
    assert [trace.visible for trace in fig.data] == [False, True, False, False]
    assert fig.layout.xaxis.title.text == "source layer"
    assert fig.layout.yaxis.title.text == "target layer"
    trace = fig.data[1]
    assert list(trace.x) == ["L0", "L1", "L2"] and list(trace.y) == ["L1", "L2", "L3"]
    # Row = target, column = source; log10 of σ2; below the diagonal is empty.
    assert trace.z[2][1] == pytest.approx(float(torch.log10(atlas.singular_values[1, 3, 1])))
    assert trace.z[0][1] is None and trace.z[0][2] is None
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels == ["σ1", "σ2", "σ1 ÷ source norm", "σ2 ÷ source norm"]
    assert fig.layout.updatemenus[0].buttons[2].args[0]["visible"] == [False, False, True, False]


def test_title_says_how_the_map_was_made(
    atlas: tps.SensitivityAtlas, models: dict[str, Any]
) -> None:
    assert ", exact<br>" in tps.plot_atlas(atlas).layout.title.text
    tokens = torch.tensor([[1, 4, 6, 8, 9, 4, 10, 5]])
    sketch = tps.sensitivity_atlas(
        models["native_bridge"], tokens, k=2, method="sketch", sketch_rank=3, progress=False
    )
    assert ", sketch (r = 3, float64 products)<br>" in tps.plot_atlas(sketch).layout.title.text


def test_normalised_view_and_linear_scale(atlas: tps.SensitivityAtlas) -> None:
    fig = tps.plot_atlas(atlas, log=False)
    expected = atlas.singular_values[0, 2, 0] / atlas.source_norms[0]
    assert fig.data[2].z[1][0] == pytest.approx(float(expected))
    assert fig.data[0].z[1][0] == pytest.approx(float(atlas.singular_values[0, 2, 0]))


def test_hover_names_pair_values_and_gap(atlas: tps.SensitivityAtlas) -> None:
    text = tps.plot_atlas(atlas).data[0].text
    cell = text[2][0]  # L0 -> L3
    sig = atlas.singular_values[0, 3]
    assert cell.startswith("L0 -> L3<br>")
    assert f"σ1={float(sig[0]):.4g}" in cell and f"σ2={float(sig[1]):.4g}" in cell
    assert f"gap σ2/σ3 = {float(atlas.spectral_gap()[0, 3]):.3f}" in cell
    assert text[0][1] == ""  # L1 -> L1 is no pair


def test_unseparated_pairs_are_flagged(atlas: tps.SensitivityAtlas) -> None:
    flat = tps.SensitivityAtlas(**{**atlas.__dict__})
    flat.next_singular_value = atlas.singular_values[..., -1] / (GAP_WARNING - 0.01)
    assert "not separated" in tps.plot_atlas(flat).data[0].text[2][0]
    wide = tps.SensitivityAtlas(**{**atlas.__dict__})
    wide.next_singular_value = atlas.singular_values[..., -1] / (GAP_WARNING + 0.01)
    assert "not separated" not in tps.plot_atlas(wide).data[0].text[2][0]


def test_bad_arguments(atlas: tps.SensitivityAtlas, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"rank must be an int in 0\.\.1"):
        tps.plot_atlas(atlas, rank=2)
    with pytest.raises(TypeError, match="needs a SensitivityAtlas"):
        tps.plot_atlas("atlas")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\.html"):
        atlas_html(atlas, tmp_path / "a.txt")
    with pytest.raises(ValueError, match="does not exist"):
        atlas_html(atlas, tmp_path / "missing" / "a.html")
    assert list(tmp_path.iterdir()) == []


def test_html_is_self_contained_and_escaped(atlas: tps.SensitivityAtlas, tmp_path: Path) -> None:
    hostile = tps.SensitivityAtlas(**{**atlas.__dict__})
    hostile.prompts = ["<script>alert('x')</script>"]
    hostile.model_name = "<b>model</b>"
    page = atlas_html(hostile, tmp_path / "a.html").read_text()
    assert "<script>alert" not in page and "<b>model</b>" not in page
    assert "&lt;b&gt;model&lt;/b&gt;" in page
    assert re.search(r"<script[^>]*\ssrc=", page) is None  # nothing loaded from elsewhere
    assert "Plotly" in page and len(page) > 1_000_000  # plotly.js inlined
    data = json.loads(
        re.search(
            r'<script id="atlas-data" type="application/json">(.*?)</script>', page, re.S
        ).group(1)
    )
    assert data["k"] == 2 and data["pairs"]["0,3"]["sigma"][0] == pytest.approx(
        float(atlas.singular_values[0, 3, 0])
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html"]


@pytest.fixture(scope="module")
def effect_map(models: dict[str, Any], atlas: tps.SensitivityAtlas) -> tps.AtlasEffects:
    # The tiny random model saturates well below 0.05 nats of next-token KL.
    return tps.atlas_effects(models["native_bridge"], atlas, answers=(5, 6), kl=1e-3,
                             controls=2, generate=2, progress=False)  # fmt: skip


def test_effect_views_grey_the_pairs_at_random_level(
    atlas: tps.SensitivityAtlas, effect_map: tps.AtlasEffects
) -> None:
    fx = tps.AtlasEffects(**{**effect_map.__dict__})
    fx.effects = effect_map.effects.clone()
    fx.effects[0, 2] = 1e3  # far above any control: active
    fx.effects[1, 3] = 0.0  # no effect at all: random level
    fig = tps.plot_atlas(atlas, effect_map=fx)
    assert len(fig.data) == 2 * 2 + 2 * 2
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels[-2:] == ["best effect at KL 0.001", "best effect ÷ random mean"]
    best, grey, ratio, grey_ratio = fig.data[4:]
    assert (best.name, grey.name) == ("best effect at KL 0.001", "random level")
    assert fig.layout.updatemenus[0].buttons[4].args[0]["visible"] == [False] * 4 + [
        True, True, False, False
    ]  # fmt: skip
    # Row = target, column = source: L0 -> L2 is z[1][0], L1 -> L3 is z[2][1].
    table = fx.to_pandas().set_index(["source", "target"])
    assert best.z[1][0] == pytest.approx(1e3) and grey.z[1][0] is None
    assert ratio.z[1][0] == pytest.approx(float(table.loc[(0, 2), "ratio"]))
    assert best.z[2][1] is None and grey.z[2][1] == 0.0 and grey_ratio.z[2][1] == 0.0
    for row, col in [(1, 0), (2, 1)]:
        active = (best.z[row][col] is None) != (grey.z[row][col] is None)
        assert active  # every measured pair is in exactly one of the two
    assert best.zmid == 0 and grey.showscale is False
    hover = best.text[1][0]
    assert "best effect +1e+03 (v1, +v, KL" in hover or "best effect +1e+03 (v" in hover
    assert "(beats random)" in hover and "(random level)" in best.text[2][1]


def test_page_holds_the_map_groups_and_generations(
    atlas: tps.SensitivityAtlas, effect_map: tps.AtlasEffects, tmp_path: Path
) -> None:
    flat = tps.SensitivityAtlas(**{**atlas.__dict__})
    flat.singular_values = atlas.singular_values.clone()
    flat.singular_values[0, 3, 1] = flat.singular_values[0, 3, 0] / 1.01  # one group
    page = atlas_html(flat, tmp_path / "a.html", effect_map=effect_map).read_text()
    data = json.loads(
        re.search(
            r'<script id="atlas-data" type="application/json">(.*?)</script>', page, re.S
        ).group(1)
    )
    assert data["pairs"]["0,3"]["groups"] == [[0, 1]] and data["pairs"]["0,2"]["groups"] in (
        [[0], [1]], [[0, 1]]
    )  # fmt: skip
    assert data["pairs"]["0,3"]["next"] == pytest.approx(float(atlas.next_singular_value[0, 3]))
    mine = data["map"]
    table = effect_map.to_pandas().set_index(["source", "target"])
    assert mine["pairs"]["1,2"]["best"] == pytest.approx(float(table.loc[(1, 2), "best_effect"]))
    assert mine["pairs"]["1,2"]["beats"] == bool(table.loc[(1, 2), "beats_random"])
    row = mine["pairs"]["1,2"]["rows"]["1,-"]
    assert row["effect"] == pytest.approx(float(effect_map.effects[1, 2, 1, 1]))
    assert row["kl"] == pytest.approx(float(effect_map.kls[1, 2, 1, 1]))
    assert mine["baseline"] == effect_map.generations["baseline"]
    assert mine["texts"]["1,2,1,-"] == effect_map.generation(1, 2, 1, -1)
    assert mine["texts"]["2,random,1,+"] == effect_map.generation(2, None, 1, 1)
    assert mine["answers"] == effect_map.answers and mine["tokens"] == 2


def test_an_effect_map_of_another_atlas_is_refused(
    atlas: tps.SensitivityAtlas, effect_map: tps.AtlasEffects, tmp_path: Path
) -> None:
    other = tps.SensitivityAtlas(**{**atlas.__dict__})
    other.source_site = "hook_resid_post"
    with pytest.raises(ValueError, match="measured on another atlas"):
        atlas_html(other, tmp_path / "a.html", effect_map=effect_map)
    with pytest.raises(TypeError, match="effect_map must be an AtlasEffects"):
        tps.plot_atlas(atlas, effect_map={"pairs": {}})  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_atlas_frame_shows_the_whole_page_in_a_notebook_cell(
    atlas: tps.SensitivityAtlas, tmp_path: Path
) -> None:
    hostile = tps.SensitivityAtlas(**{**atlas.__dict__})
    hostile.model_name = 'a"b<script>'
    path = atlas_html(hostile, tmp_path / "a.html")
    shown = tps.atlas_frame(path, height=700)._repr_html_()
    assert shown.startswith('<iframe srcdoc="') and "height: 700px" in shown
    assert 'sandbox="allow-scripts"' in shown
    # The page travels whole and escaped inside the attribute: no quote ends it early.
    inner = shown[len('<iframe srcdoc="') : shown.index('" style=')]
    assert '"' not in inner and "<" not in inner
    assert html_lib.unescape(inner) == path.read_text()
    with pytest.raises(ValueError, match="no atlas page: write one with atlas_html first"):
        tps.atlas_frame(tmp_path / "missing.html")
    with pytest.raises(ValueError, match="height must be an int of at least 100"):
        tps.atlas_frame(path, height=10)
