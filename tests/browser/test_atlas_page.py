"""The atlas page in a real headless Chromium: renders, hovers, clicks, no script errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_powersteer as tps

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# CI installs Chromium, so there a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium"
)


@pytest.fixture(scope="module")
def page_file(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokens = torch.tensor([[1, 4, 6, 8, 9, 4, 10, 5]])
    atlas = tps.sensitivity_atlas(models["native_bridge"], tokens, k=3, progress=False)
    atlas.prompts = ['<script>document.title="pwned"</script> & more']
    return atlas.to_html(tmp_path_factory.mktemp("page") / "atlas.html")


def cell_centre(page: Any, source: int, target: int) -> tuple[float, float]:
    """Pixel centre of the heatmap cell for a pair, from plotly's own axis mapping."""
    return page.evaluate(
        """([s, t]) => {
            const gd = document.querySelector('#heatmap .plotly-graph-div');
            const box = gd.getBoundingClientRect();
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const x = xa._offset + xa.l2p(xa._categories.indexOf('L' + s));
            const y = ya._offset + ya.l2p(ya._categories.indexOf('L' + t));
            return [box.left + x, box.top + y];
        }""",
        [source, target],
    )


def test_page_renders_hovers_and_clicks(page_file: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as play:
        browser = play.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 700})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(page_file.as_uri())
        page.wait_for_selector("#heatmap .heatmaplayer image, #heatmap .hm image", state="attached")
        assert page.title() == "Sensitivity atlas: native"  # the prompt's script did not run
        assert "<script>" in page.text_content("#heatmap .gtitle")

        x, y = cell_centre(page, 1, 3)
        page.mouse.move(x, y)
        page.wait_for_selector(".hoverlayer .hovertext")
        hover = page.text_content(".hoverlayer .hovertext") or ""
        assert "L1 -> L3" in hover and "σ1=" in hover and "gap σ3/σ4" in hover

        page.mouse.click(x, y)
        page.wait_for_selector("#spectrum .plotly .bars path")
        assert page.inner_text("#panel-title") == "L1 -> L3"
        assert "gap" in page.inner_text("#panel-text")
        assert page.locator("#spectrum .bars path").count() == 3
        page.screenshot(path=str(tmp_path / "atlas.png"))
        browser.close()
    assert errors == []
    assert (tmp_path / "atlas.png").stat().st_size > 10_000
