"""A small HTTP server on 127.0.0.1 for the demo, the tests and the benchmarks.

It serves a fixed set of files from memory on a free port, in a background thread with its own
event loop, and stops when its `with` block ends. It never listens on anything but loopback.
Extra aiohttp routes can be passed for behaviour the files cannot express (slow bodies, resets).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class Served:
    body: bytes
    content_type: str = "application/octet-stream"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


class LoopbackServer:
    """Serve `files` (path -> Served) at http://127.0.0.1:PORT/PATH until closed.

    `/status/N` answers with HTTP status N and a short text body. `delay_s` delays every answer
    (to make runs long enough to interrupt in tests). Use as a context manager.
    """

    def __init__(self, files: Mapping[str, Served] | None = None, *, delay_s: float = 0.0,
                 extra_routes: Iterable[web.RouteDef] = ()):
        self.files = dict(files or {})
        self.delay_s = delay_s
        self.requests = 0
        self._extra = list(extra_routes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
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

    async def _start(self, ready: threading.Event) -> None:
        app = web.Application()
        app.add_routes(self._extra)
        app.router.add_get("/{path:.*}", self._file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
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
