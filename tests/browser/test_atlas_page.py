"""The atlas page in a real headless Chromium: renders, hovers, clicks, no script errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import tl_powersteer as tps
from tl_powersteer.cli import main

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


@contextmanager
def chromium_page(width: int, height: int) -> Iterator[tuple[Any, list[str]]]:
    """A page in headless Chromium, and the script errors and console errors it logs."""
    sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as play:
        browser = play.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page, errors
        browser.close()


@pytest.fixture(scope="module")
def page_file(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = models["hf_bridge"]
    prompt = "the cat sat on the mat <script>"  # "<script>" is a real token here
    atlas = tps.sensitivity_atlas(model, prompt, k=3, progress=False)
    atlas.model_name = '<script>document.title="pwned"</script>'
    folder = tmp_path_factory.mktemp("page")
    effects = tps.token_effects(model, atlas, kl=1e-3, progress=False)
    # The tiny random model saturates well below 0.05 nats of next-token KL.
    found = tps.atlas_effects(
        model,
        atlas,
        answers=("good", "bad"),
        kl=1e-3,
        top=2,
        controls=2,
        generate=4,
        progress=False,
    )
    # Generated text is shown as text: markup in it must never run.
    found.generations["1,3,1,-"] = "<img src=x onerror=\"document.title='pwned'\">"
    return tps.atlas_html(atlas, folder / "atlas.html", effects=effects, effect_map=found)


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
    """Map -> pair -> vector row -> generations, the effect views, and escaping."""
    with chromium_page(1300, 700) as (page, errors):
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
        # k bars and the next singular value's
        assert page.locator("#spectrum .bars path").count() == 4
        panel = page.inner_text("#panel-text")
        assert re.search(r"best effect [+-][0-9.e+-]+ \(v[12], [+-]v\) against random", panel)
        assert "beats random" in panel or "random level, inactive" in panel
        notes = page.inner_text("#vectors p")
        assert 'logit("good") − logit("bad")' in notes and "0.001 nats of next-token KL" in notes
        assert "rose and fell most (change of probability, then of logit)" in notes
        rows = page.locator("#vectors tr.vector-row")
        assert rows.count() == 3 * 2  # k vectors, both signs; the effect map covers top 2
        first = rows.first.inner_text()
        assert re.search(r"v1\s+\+v\s+[0-9.e+-]+\s+[0-9.e+-]+\s+[+-][0-9.e+-]+\s+\"", first)
        # each token with its change of probability (by which it is ranked), then of logit
        assert re.search(r'"[^"]*" [+-][0-9.e+-]+ \([+-][0-9.e+-]+\)', first), first
        assert page.locator("#generations td").count() == 0
        rows.nth(1).click()
        page.wait_for_selector("#gen-steered")
        data = json.loads(page.text_content("#atlas-data") or "")
        texts = data["map"]["texts"]
        assert page.inner_text("#gen-base") == data["map"]["baseline"]
        assert page.text_content("#gen-steered") == texts["1,3,0,-"]
        assert page.text_content("#gen-random") == texts["1,random,0,-"]
        assert "L1 -> L3 v1, -v" in page.inner_text("#generations h3")
        # Markup in generated text is shown, not run.
        rows.nth(3).click()
        page.wait_for_function(
            "document.querySelector('#generations h3').textContent.includes('v2, -v')"
        )
        assert page.text_content("#gen-steered") == texts["1,3,1,-"]
        assert page.locator("#generations img").count() == 0
        # The third vector was not measured by the effect map: tokens only, no generation.
        assert rows.nth(4).inner_text().split("\t")[4] == ""
        rows.nth(4).click()
        page.wait_for_function(
            "document.querySelector('#generations h3').textContent.includes('v3, +v')"
        )
        assert page.text_content("#gen-steered") == "(not generated)"

        # The effect views: the dropdown shows them, with random-level pairs in grey.
        page.click(".updatemenu-header-group")
        buttons = page.locator(".updatemenu-dropdown-button")
        labels = [buttons.nth(i).text_content() for i in range(buttons.count())]
        assert labels[-2:] == ["best effect at KL 0.001", "best effect ÷ random mean"]
        buttons.nth(len(labels) - 2).click()
        visible = page.evaluate(
            """() => document.querySelector('#heatmap .plotly-graph-div').data
                .filter((t) => t.visible === true).map((t) => t.name)"""
        )
        assert visible == ["best effect at KL 0.001", "random level"]
        x, y = cell_centre(page, 0, 2)
        page.mouse.move(x, y)
        page.wait_for_selector(".hoverlayer .hovertext")
        hover = page.text_content(".hoverlayer .hovertext") or ""
        assert "L0 -> L2" in hover and "best effect" in hover and "ratio" in hover
        page.mouse.click(x, y)
        page.wait_for_function("document.querySelector('#panel-title').textContent === 'L0 -> L2'")
        assert page.title().startswith("Sensitivity atlas: <script>")
        page.screenshot(path=str(tmp_path / "atlas.png"))
    assert errors == []
    assert (tmp_path / "atlas.png").stat().st_size > 10_000


def test_page_works_in_a_notebook_cell_frame(page_file: Path, tmp_path: Path) -> None:
    """What a notebook shows for ``atlas_frame``: the page in a sandboxed frame, working."""
    host = tmp_path / "notebook.html"
    host.write_text(
        f"<html><body><h1>cell</h1>{tps.atlas_frame(page_file)._repr_html_()}</body></html>"
    )
    with chromium_page(1300, 1100) as (page, errors):
        page.goto(host.as_uri())
        frame = page.frame_locator("iframe")
        frame.locator("#heatmap .heatmaplayer image, #heatmap .hm image").first.wait_for(
            state="attached"
        )
        inner = page.frames[1]
        x, y = cell_centre(inner, 1, 3)
        box = page.locator("iframe").bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + x, box["y"] + y)
        frame.locator("#vectors tr.vector-row").first.wait_for()
        assert frame.locator("#panel-title").inner_text() == "L1 -> L3"
        frame.locator("#vectors tr.vector-row").nth(1).click()
        frame.locator("#gen-steered").wait_for()
    assert errors == []


def test_cli_page_goes_from_the_map_to_generations_in_two_clicks(
    gpt2_dir: str, tmp_path: Path
) -> None:
    """What `tl-powersteer atlas --answers` writes: a click on a cell, a click on a row,
    and the row's generation is there beside the unsteered text, offline."""
    out = tmp_path / "atlas"
    # The tiny random model saturates well below 0.05 nats of next-token KL.
    assert main(["atlas", "--prompt", "i watched the movie last night", "--k", "2", "--model",
                 gpt2_dir, "--answers", "good", "bad", "--kl", "1e-3", "--generate-tokens", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    found = tps.load(out / "effects.safetensors")
    with chromium_page(1300, 900) as (page, errors):
        page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(
            "file:") else route.continue_())  # offline: nothing but the file  # fmt: skip
        page.goto((out / "atlas.html").as_uri())
        page.wait_for_selector("#heatmap .heatmaplayer image, #heatmap .hm image", state="attached")
        page.mouse.click(*cell_centre(page, 2, 3))
        page.locator("#vectors tr.vector-row").nth(1).click()
        page.wait_for_selector("#gen-steered")
        assert page.text_content("#gen-steered") == found.generation(2, 3, 0, -1)
        assert page.text_content("#gen-base") == found.generations["baseline"]
    assert errors == []
