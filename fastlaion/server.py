"""A small HTTP server on 127.0.0.1 for the demo, the tests and the benchmarks.

It serves a fixed set of files from memory on a free port, in a background thread with its own
event loop, and stops when its `with` block ends. It never listens on anything but loopback.
Built-in /stall/ routes misbehave the ways real image hosts do (never answering, trickling bytes,
streaming forever), so the downloader's timeouts can be tested; extra aiohttp routes can be
passed for other behaviour the files cannot express.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Served:
    body: bytes
    content_type: str = "application/octet-stream"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Stalled:
    """What one /stall/ request did, recorded when its handler ends."""

    path: str  # with the query string, e.g. /stall/trickle?every_ms=50
    body_bytes_sent: int  # body bytes written to the socket (headers not counted)
    client_left: bool  # the client closed the connection (else the route ended by itself)
    seconds: float  # from the request's arrival to the handler's end


class LoopbackServer:
    """Serve `files` (path -> Served) at http://127.0.0.1:PORT/PATH until closed.

    `/status/N` answers with HTTP status N and a short text body. `delay_s` delays every answer
    (to make runs long enough to interrupt in tests). Use as a context manager.

    The /stall/ routes each keep going until the client leaves or `stall_limit_s` passes, so a
    test can never leave the server busy; each appends a `Stalled` record to `stalls`:

    - `/stall/hang`: accept the request, never send the headers.
    - `/stall/headers`: send the headers (Content-Length: 1000), then neither body nor close.
    - `/stall/trickle?every_ms=50`: send the headers, then one body byte every `every_ms` ms.
    - `/stall/forever?chunk=65536&every_ms=0`: stream `chunk`-byte pieces, no end, no length.

    `trickle` and `forever` also take `length=N` (send a Content-Length of N and stop after N
    bytes) and `header=Name:value` (repeatable) to add response headers, e.g.
    `header=X-Robots-Tag:noai`. `hits` counts requests by path.
    """

    def __init__(self, files: Mapping[str, Served] | None = None, *, delay_s: float = 0.0,
                 extra_routes: Iterable[web.RouteDef] = (), stall_limit_s: float = 10.0,
                 ssl_context: Any = None):
        self.files = dict(files or {})
        self.ssl_context = ssl_context  # an ssl.SSLContext: HTTPS (bench/fetch_loop.py --tls)
        self.delay_s = delay_s
        self.stall_limit_s = stall_limit_s
        self.requests = 0
        self.hits: Counter[str] = Counter()
        self.stalls: list[Stalled] = []
        self._extra = list(extra_routes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl_context is not None else 'http'}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.hits[request.path] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        path = request.match_info["path"]
        if path.startswith("status/"):
            code = int(path.split("/", 1)[1])
            return web.Response(status=code, text=f"status {code}\n")
        served = self.files.get(path)
        if served is None:
            return web.Response(status=404, text="not found\n")
        return web.Response(body=served.body, status=served.status, content_type=None,
                            headers={"Content-Type": served.content_type, **dict(served.headers)})

    @staticmethod
    def _client_gone(request: web.Request) -> bool:
        return request.transport is None or request.transport.is_closing()

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.hits[request.path] += 1
        arrived = time.monotonic()
        deadline = arrived + self.stall_limit_s
        kind, query = request.match_info["kind"], request.query
        if kind not in ("hang", "headers", "trickle", "forever"):
            return web.Response(status=404, text="no such stall\n")
        sent = 0
        left = False  # the client went away before the route was done

        def going() -> bool:
            nonlocal left
            left = self._client_gone(request)
            return not left and time.monotonic() < deadline

        try:
            if kind == "hang":
                while going():
                    await asyncio.sleep(0.01)
                return web.Response(text="too late\n")
            headers = dict(h.split(":", 1) for h in query.getall("header", []))
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg", **headers})
            length = int(query["length"]) if "length" in query else (1000 if kind == "headers" else None)
            if length is None:
                resp.enable_chunked_encoding()
            else:
                resp.content_length = length
            await resp.prepare(request)
            chunk = b"x" * int(query.get("chunk", 1 if kind == "trickle" else 65536))
            every_s = int(query.get("every_ms", 50 if kind == "trickle" else 0)) / 1000
            try:
                while going():
                    if kind == "headers":
                        await asyncio.sleep(0.01)
                        continue
                    piece = chunk if length is None else chunk[:length - sent]
                    if not piece:
                        await resp.write_eof()
                        break
                    await resp.write(piece)
                    sent += len(piece)
                    await asyncio.sleep(every_s)
            except ConnectionError:
                left = True
            if (length is None or sent < length) and request.transport is not None:
                request.transport.close()  # at the limit: never pretend an endless body is complete
            return resp
        finally:
            self.stalls.append(Stalled(request.path_qs, sent, left, time.monotonic() - arrived))

    async def _start(self, ready: threading.Event) -> None:
        app = web.Application()
        app.add_routes(self._extra)
        app.router.add_get("/stall/{kind}", self._stall)
        app.router.add_get("/{path:.*}", self._file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the free port the OS chose
        ready.set()

    def start(self) -> LoopbackServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start(ready))
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="loopback-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("loopback server did not start within 10 s")
        return self

    def close(self) -> None:
        if self._loop is None:
            return
        loop, runner = self._loop, self._runner

        async def stop() -> None:
            if runner is not None:
                await runner.cleanup()
            loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), loop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
