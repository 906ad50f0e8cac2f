"""The atlas page in a real headless Chromium: renders, hovers, clicks, no script errors."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

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
    model = models["hf_bridge"]
    prompt = "the cat sat on the mat <script>"  # "<script>" is a real token here
    atlas = tps.sensitivity_atlas(model, prompt, k=3, progress=False)
    atlas.model_name = '<script>document.title="pwned"</script>'
    folder = tmp_path_factory.mktemp("page")
    effects = tps.token_effects(model, atlas, progress=False)
    return tps.atlas_html(atlas, folder / "atlas.html", effects=effects)


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
        # The model name's script is shown as text and never runs.
        assert page.title() == 'Sensitivity atlas: <script>document.title="pwned"</script>'
        assert '<script>document.title="pwned"</script>' in (
            page.text_content("#heatmap .gtitle") or ""
        )
        assert "<script>" in (page.text_content("#heatmap .gtitle") or "")

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
        tables = page.locator("#effects table.effect")
        assert tables.count() == 3
        first = tables.first.inner_text()
        assert "+v promoted" in first and "-v suppressed" in first
        assert re.search(r"v1: \+v at [0-9.e+-]+ \(KL [0-9.e+-]+\), -v at [0-9.e+-]+ \(KL ", first)
        assert "where the next-token KL is 1 nat (searched" in page.inner_text("#effects p")
        assert '"' in first  # token texts are listed, quoted
        # each with its change of probability (by which it is ranked), then of logit
        assert re.search(r'"[^"]*" [+-][0-9.e+-]+ \([+-][0-9.e+-]+\)', first), first
        assert "rose and fell most (change of probability, then of logit)" in page.inner_text(
            "#effects p"
        )
        page.screenshot(path=str(tmp_path / "atlas.png"))
        browser.close()
    assert errors == []
    assert (tmp_path / "atlas.png").stat().st_size > 10_000
