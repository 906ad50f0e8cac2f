"""The live atlas server on a tiny model: its guards over plain HTTP, and its page in a real
headless Chromium, generating on a click what ``generate_steered`` generates."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

import tl_powersteer as tps
from tests.browser.test_atlas_page import CHROMIUM, cell_centre, chromium_page
from tl_powersteer.browse import AtlasServer

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium"
)

PROMPT = "i watched the movie last night"
# The tiny random model saturates well below 0.05 nats of next-token KL.
KL = 1e-3


@pytest.fixture(scope="module")
def atlas(models: dict[str, Any]) -> tps.SensitivityAtlas:
    return tps.sensitivity_atlas(models["hf_bridge"], PROMPT, k=2, progress=False)


@pytest.fixture
def server(models: dict[str, Any], atlas: tps.SensitivityAtlas) -> Iterator[AtlasServer]:
    with AtlasServer(models["hf_bridge"], atlas) as running:
        yield running


def call(
    server: AtlasServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    host: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    sent = {"Host": host or f"127.0.0.1:{server.port}", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    connection.request(method, path, body=data, headers=sent)
    answer = connection.getresponse()
    text = answer.read().decode()
    connection.close()
    return answer.status, text


def request(**change: Any) -> dict[str, Any]:
    return {"source": 0, "target": 2, "rank": 0, "sign": 1, "prompt": PROMPT, "kl": KL,
            "tokens": 4, **change}  # fmt: skip


def expected(model: Any, atlas: tps.SensitivityAtlas, s: int, t: int, rank: int, sign: int,
             prompt: str = PROMPT, tokens: int = 4) -> list[str]:  # fmt: skip
    vector = atlas.steering_vectors([(s, t)], top=rank + 1)[rank]
    table = tps.generate_steered(model, prompt, vector, [KL], signs=[sign], scale_mode="kl",
                                 max_new_tokens=tokens, progress=False)  # fmt: skip
    return [str(table.text[0]), str(table.text[1])]


def test_the_token_host_and_origin_guard_every_request(server: AtlasServer) -> None:
    token = f"?token={server.token}"
    assert call(server, "GET", "/")[0] == 403
    assert call(server, "GET", "/?token=guess")[0] == 403
    status, page = call(server, "GET", "/" + token)
    assert status == 200 and '"live": {' in page and "Sensitivity atlas" in page
    assert call(server, "GET", "/" + token, host=f"localhost:{server.port}")[0] == 200
    # DNS rebinding: a page of another domain re-pointed at 127.0.0.1.
    status, why = call(server, "GET", "/" + token, host=f"evil.example:{server.port}")
    assert status == 403 and "its own address" in why
    status, why = call(server, "POST", "/api/generate" + token, request(),
                       headers={"Origin": "http://evil.example"})  # fmt: skip
    assert status == 403 and "its own page" in why
    status, why = call(server, "POST", "/api/generate", request())
    assert status == 403 and "needs its token" in why
    status, _ = call(server, "POST", "/api/generate" + token, request(),
                     headers={"Content-Type": "text/plain"})  # fmt: skip
    assert status == 415
    assert server.log == []  # nothing refused reached the model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": 2, "target": 1}, "unknown pair L2 -> L1"),
        ({"target": 9}, "unknown pair L0 -> L9"),
        ({"prompt": "   "}, "the prompt is empty"),
        ({"kl": 50}, "the KL budget must be between 0.0001 and 10 nats, got 50"),
        ({"kl": "1"}, "the KL budget must be between"),
        ({"tokens": 0}, "new tokens must be between 1 and 200"),
        ({"rank": 2}, "rank must be 0..1"),
        ({"sign": 0}, "sign must be 1 or -1"),
        ({"source": True}, "source must be an integer"),
    ],
)
def test_bad_requests_are_answered_with_what_is_wrong(
    server: AtlasServer, change: dict[str, Any], message: str
) -> None:
    status, text = call(server, "POST", f"/api/generate?token={server.token}", request(**change))
    assert status == 400 and message in json.loads(text)["error"]
    assert server.log == []


def test_live_page_generates_on_click_queues_and_shuts_down(
    models: dict[str, Any], atlas: tps.SensitivityAtlas
) -> None:
    model = models["hf_bridge"]
    server = AtlasServer(model, atlas).start()
    try:
        with chromium_page(1400, 900) as (page, errors):
            page.goto(server.url)
            page.wait_for_selector("#heatmap .heatmaplayer image, #heatmap .hm image",
                                   state="attached")  # fmt: skip
            assert page.input_value("#live-prompt") == PROMPT
            page.fill("#live-kl", str(KL))
            page.fill("#live-tokens", "4")
            x, y = cell_centre(page, 0, 2)
            page.mouse.click(x, y)
            page.wait_for_selector("#vectors tr.vector-row")
            rows = page.locator("#vectors tr.vector-row")
            assert rows.count() == 2 * 2  # k vectors, both signs, without any precomputed effect

            rows.nth(1).click()  # v1, -v
            page.wait_for_selector("#live-runs .run")
            base, text = expected(model, atlas, 0, 2, 0, -1)
            assert page.inner_text("#live-runs .run .run-text") == f"steered: {text}"
            assert page.inner_text("#live-runs .run .run-base") == f"unsteered: {base}"
            assert "L0 -> L2 v1, -v" in page.inner_text("#live-runs .run b")

            # Two quick clicks: both answered, one computation after the other.
            server.log.clear()
            page.fill("#live-prompt", "the dog was <b>good</b>")
            rows.nth(2).click()
            rows.nth(3).click()
            page.wait_for_function("document.querySelectorAll('#live-runs .run').length === 3")
            page.wait_for_function("document.getElementById('live-status').textContent === 'idle'")
            first, second = server.log
            assert first[1] <= second[0]  # queued, not interleaved
            cards = page.locator("#live-runs .run")
            newest = [cards.nth(i).locator(".run-text").inner_text() for i in range(2)]
            prompt = "the dog was <b>good</b>"
            assert newest == [
                "steered: " + expected(model, atlas, 0, 2, 1, -1, prompt)[1],
                "steered: " + expected(model, atlas, 0, 2, 1, 1, prompt)[1],
            ]
            assert page.locator("#live-runs b b").count() == 0  # the prompt is shown as text

            # Bad input: a message on the page, nothing computed.
            server.log.clear()
            page.fill("#live-prompt", "")
            rows.nth(0).click()
            page.wait_for_function("document.getElementById('live-error').textContent !== ''")
            assert "the prompt is empty" in page.inner_text("#live-error")
            page.fill("#live-prompt", PROMPT)
            page.fill("#live-kl", "50")
            rows.nth(0).click()
            page.wait_for_function(
                "document.getElementById('live-error').textContent.includes('KL budget')"
            )
            assert server.log == []
    finally:
        server.shutdown()
    # The browser logs the two refused requests; nothing else went wrong.
    assert len(errors) == 2 and all("status of 400" in e for e in errors), errors
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass
