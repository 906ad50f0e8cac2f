"""The atlas page, served live: ``tl-powersteer browse`` generates on demand.

``AtlasServer`` serves the page ``atlas_html`` writes, with controls for a prompt, a KL
budget and a number of new tokens. Clicking a pair's vector and sign asks the server for
the greedy continuation of that prompt with the vector added at the scale where the
next-token KL is the budget: exactly ``generate_steered(model, prompt, vector, [kl],
signs=[sign], scale_mode="kl")``, whose table it answers with.

Why the standard library (``http.server``) and not an ASGI framework: the server answers
one page and two small JSON requests, for one person on one machine, and every model
computation must run one at a time anyway. A ``ThreadingHTTPServer`` keeps answering the
page and status requests while one worker thread runs the queued computations in order;
an event loop would add a dependency and an async layer in front of that same blocking
queue without serving anything sooner.

Like Jupyter's server, it binds to 127.0.0.1 and needs a random token, made per server,
in every request's query string (``?token=...``): other users of the machine and web
pages in the browser cannot drive the model. Requests whose ``Host`` (or, when given,
``Origin``) is not the server's own address are refused, so that a page whose domain is
re-pointed at 127.0.0.1 (DNS rebinding) cannot read the answers either.
"""

from __future__ import annotations

import json
import math
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .adapters import Model, ModelAdapter
from .atlas import SensitivityAtlas
from .atlas.effects import check_atlas_model
from .effect_map import AtlasEffects
from .plotting import atlas_page, check_effect_map
from .steering import generate_steered

__all__ = ["KL_RANGE", "MAX_NEW_TOKENS", "AtlasServer"]

# A budget past ~10 nats has already changed the whole next-token distribution.
KL_RANGE = (1e-4, 10.0)
MAX_NEW_TOKENS = 200
_MAX_BODY = 1 << 16


@dataclass
class _Job:
    request: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    answer: dict[str, Any] | None = None
    error: str | None = None
    status: int = HTTPStatus.OK


class AtlasServer:
    """A local server of the live atlas page; ``url`` holds its token.

    Use it as a context manager, or ``start()`` and ``shutdown()``; ``serve_forever()``
    serves in the calling thread until ``shutdown()`` or Ctrl-C. ``log`` records each
    computation's (start, end) ``time.monotonic()`` interval, in order.
    """

    def __init__(
        self,
        model: Model | ModelAdapter,
        atlas: SensitivityAtlas,
        *,
        effects: dict[str, Any] | None = None,
        effect_map: AtlasEffects | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not isinstance(atlas, SensitivityAtlas):
            raise TypeError(f"atlas must be a SensitivityAtlas, got {type(atlas).__name__}")
        self.adapter = ModelAdapter.of(model)
        check_atlas_model(self.adapter, atlas)
        if effect_map is not None:
            check_effect_map(atlas, effect_map)
        self.atlas = atlas
        self.token = secrets.token_urlsafe(24)
        self.page = atlas_page(atlas, effects=effects, effect_map=effect_map, live=True)
        self.log: list[tuple[float, float]] = []
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._busy = False
        self._httpd = _Server((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self.host, self.port = host, int(self._httpd.server_address[1])
        self._worker = threading.Thread(target=self._work, name="atlas-model", daemon=True)
        self._worker.start()
        self._serving: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self._authority(self.host)}/?token={self.token}"

    def _authority(self, host: str) -> str:
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def allowed_hosts(self) -> set[str]:
        """``Host`` values of requests to this server: its address, and localhost's names
        when it listens on a loopback address."""
        names = {self.host}
        if self.host in ("127.0.0.1", "localhost", "::1"):
            names |= {"127.0.0.1", "localhost", "::1"}
        return {self._authority(name) for name in names}

    def start(self) -> AtlasServer:
        """Serve in a background thread."""
        self._serving = threading.Thread(
            target=self._httpd.serve_forever, name="atlas-http", daemon=True
        )
        self._serving.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def shutdown(self) -> None:
        """Stop serving, let the running computation finish, and close the socket."""
        if self._serving is not None:
            self._httpd.shutdown()
            self._serving.join()
            self._serving = None
        self._jobs.put(None)
        self._worker.join()
        self._httpd.server_close()

    def __enter__(self) -> AtlasServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def status(self) -> dict[str, Any]:
        return {"busy": self._busy, "waiting": self._jobs.qsize()}

    def submit(self, request: Any) -> _Job:
        """Check a generation request and queue it; the job's ``done`` is set when answered."""
        job = _Job(request)
        try:
            job.request = self.checked(request)
        except ValueError as err:
            job.error, job.status = str(err), HTTPStatus.BAD_REQUEST
            job.done.set()
            return job
        self._jobs.put(job)
        return job

    def checked(self, request: Any) -> dict[str, Any]:
        """The request's fields, or a ValueError that says what is wrong."""
        if not isinstance(request, dict):
            raise ValueError("the request must be a JSON object")
        fields = ("source", "target", "rank", "sign", "prompt", "kl", "tokens")
        missing = [name for name in fields if name not in request]
        if missing:
            raise ValueError(f"the request lacks {', '.join(missing)}")
        ints = {name: request[name] for name in ("source", "target", "rank", "sign", "tokens")}
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        s, t = ints["source"], ints["target"]
        done = set(self.atlas.completed_sources)
        if (s, t) not in self.atlas.pairs() or s not in done:
            raise ValueError(
                f"unknown pair L{s} -> L{t}: the atlas has sources {sorted(done)} and targets "
                f"{self.atlas.targets}, with the target after the source"
            )
        if not 0 <= ints["rank"] < self.atlas.k:
            raise ValueError(f"rank must be 0..{self.atlas.k - 1}, got {ints['rank']}")
        if ints["sign"] not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {ints['sign']}")
        prompt = request["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: write the text to continue")
        kl = request["kl"]
        low, high = KL_RANGE
        if isinstance(kl, bool) or not isinstance(kl, (int, float)) or not low <= kl <= high:
            raise ValueError(f"the KL budget must be between {low:g} and {high:g} nats, got {kl!r}")
        if not 1 <= ints["tokens"] <= MAX_NEW_TOKENS:
            raise ValueError(
                f"new tokens must be between 1 and {MAX_NEW_TOKENS}, got {ints['tokens']}"
            )
        return {**ints, "prompt": prompt, "kl": float(kl)}

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._busy = True
            start = time.monotonic()
            try:
                job.answer = self.generate(job.request)
            except (ValueError, TypeError) as err:
                job.error, job.status = str(err), HTTPStatus.BAD_REQUEST
            except Exception as err:
                job.error = f"{type(err).__name__}: {err}"
                job.status = HTTPStatus.INTERNAL_SERVER_ERROR
            finally:
                self.log.append((start, time.monotonic()))
                self._busy = False
                job.done.set()

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """The unsteered and the steered continuation of a checked request."""
        s, t, rank = request["source"], request["target"], request["rank"]
        vector = self.atlas.steering_vectors([(s, t)], top=rank + 1)[rank]
        table = generate_steered(
            self.adapter, request["prompt"], vector, [request["kl"]], signs=[request["sign"]],
            scale_mode="kl", max_new_tokens=request["tokens"], progress=False,
        )  # fmt: skip
        scale = float(table.absolute_scale[1])
        return {
            "baseline": str(table.text[0]),
            "text": str(table.text[1]),
            "scale": scale if math.isfinite(scale) else None,
            "vector": vector.name,
        }


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A browser that closes a tab mid-answer is no error; anything else is shown.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(server: AtlasServer) -> Callable[..., BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tl-powersteer"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the terminal shows what the server prints, not every request

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value: Any) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def _refused(self) -> str | None:
            """Why this request is refused, or None."""
            if self.headers.get("Host") not in server.allowed_hosts():
                return "this server answers requests to its own address only"
            origin = self.headers.get("Origin")
            if origin is not None and origin not in {f"http://{h}" for h in server.allowed_hosts()}:
                return "this server answers its own page only"
            given = parse_qs(urlsplit(self.path).query).get("token", [""])[0]
            if not secrets.compare_digest(given.encode(), server.token.encode()):
                return "this server needs its token: open the URL it printed"
            return None

        def do_GET(self) -> None:
            why = self._refused()
            if why is not None:
                self._send(HTTPStatus.FORBIDDEN, why.encode(), "text/plain; charset=utf-8")
                return
            route = urlsplit(self.path).path
            if route == "/":
                self._send(HTTPStatus.OK, server.page.encode(), "text/html; charset=utf-8")
            elif route == "/api/status":
                self._json(HTTPStatus.OK, server.status())
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain; charset=utf-8")

        def do_POST(self) -> None:
            why = self._refused()
            if why is not None:
                self._json(HTTPStatus.FORBIDDEN, {"error": why})
                return
            if urlsplit(self.path).path != "/api/generate":
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
                return
            # A form of another site cannot send JSON without the browser asking first.
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= _MAX_BODY:
                self._json(
                    HTTPStatus.BAD_REQUEST, {"error": "the request body is empty or too large"}
                )
                return
            try:
                request = json.loads(self.rfile.read(length))
            except ValueError:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "the request is not JSON"})
                return
            job = server.submit(request)
            job.done.wait()
            if job.error is not None:
                self._json(job.status, {"error": job.error})
            else:
                self._json(HTTPStatus.OK, job.answer)

    return Handler
