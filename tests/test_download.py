"""Tests for fastlaion.download against real HTTP servers on 127.0.0.1 (never the internet).

One loopback server per module serves every route; each route counts its requests by path, so a
test that needs its own count uses its own token in the path. Slow routes poll for the client
going away and give up after a few seconds, so the server always stops promptly.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections import Counter

import pytest
from aiohttp import web

from fastlaion.config import DownloadConfig
from fastlaion.download import (Downloader, Fetched, _deadline_fallback, download_all, is_transient,
                                new_event_loop, validate_url)
from fastlaion.server import LoopbackServer, Served

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning",
                                        "error::pytest.PytestUnraisableExceptionWarning")

IMAGE = os.urandom(300_000)  # several read chunks
SMALL_CAP = 10_000  # max_bytes for the too_large tests
FAST = dict(timeout_s=0.5, retries=2, backoff_s=0.01)
HANG_LIMIT_S = 5.0  # the longest any slow route keeps going if the client never leaves


class Routes:
    """aiohttp routes with failure modes the file server cannot express, counting requests."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    def defs(self) -> list[web.RouteDef]:
        return [
            web.get("/t/status/{code}/{token}", self.status),
            web.get("/t/flaky/{token}", self.flaky),
            web.get("/t/hang", self.hang),
            web.get("/t/trickle", self.trickle),
            web.get("/t/chunked-big", self.chunked_big),
            web.get("/t/cut", self.cut),
            web.get("/t/drop", self.drop),
            web.get("/t/loop", self.loop),
            web.get("/t/redirect", self.redirect),
            web.get("/t/chain/{n}", self.chain),
            web.get("/t/ua", self.user_agent),
            web.get("/t/tracked/{key}", self.tracked),
        ]

    async def status(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return web.Response(status=int(request.match_info["code"]), text="status\n")

    async def flaky(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if self.hits[request.path] <= 2:
            return web.Response(status=503, text="try later\n")
        return web.Response(body=b"third time lucky")

    @staticmethod
    def _client_gone(request: web.Request) -> bool:
        return request.transport is None or request.transport.is_closing()

    async def hang(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        deadline = time.monotonic() + HANG_LIMIT_S
        while not self._client_gone(request) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return web.Response(text="too late\n")

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        deadline = time.monotonic() + HANG_LIMIT_S
        try:
            while not self._client_gone(request) and time.monotonic() < deadline:
                await resp.write(b"x")
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        return resp

    async def chunked_big(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()  # no Content-Length: only counting the bytes can catch it
        await resp.prepare(request)
        try:
            for _ in range(20):
                await resp.write(b"y" * 4096)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    async def cut(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b"z" * 10)
        await asyncio.sleep(0.05)
        request.transport.close()  # the body ends 990 bytes short
        return resp

    async def drop(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        request.transport.close()  # no answer at all
        return web.Response()

    async def loop(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        raise web.HTTPFound("/t/loop")

    async def redirect(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        raise web.HTTPFound("/image.jpg")

    async def chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])  # redirects still to come
        if n == 0:
            return web.Response(body=b"end of chain")
        raise web.HTTPFound(f"/t/chain/{n - 1}")

    async def user_agent(self, request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("User-Agent", ""))

    async def tracked(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        return web.Response(body=request.match_info["key"].encode())


@pytest.fixture(scope="module")
def served():
    routes = Routes()
    files = {
        "image.jpg": Served(IMAGE, "image/jpeg"),
        "empty": Served(b""),
        "big": Served(b"b" * (SMALL_CAP + 1)),
        "exact": Served(b"e" * SMALL_CAP),
    }
    with LoopbackServer(files, extra_routes=routes.defs()) as server:
        yield server, routes


def run(coro):
    """Run `coro` on a fresh loop from `new_event_loop()`, then close the loop."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def fetch(url: str, **cfg: object) -> Fetched:
    async def go() -> Fetched:
        async with Downloader(DownloadConfig(**{**FAST, **cfg})) as downloader:
            return await downloader.fetch(url)
    return run(go())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: nothing listens there


# --- success ---------------------------------------------------------------------------------


def test_ok_body_is_exact(served):
    server, _ = served
    got = fetch(server.url("image.jpg"))
    assert got.error is None and got.error_detail is None and got.ok
    assert got.http_status == 200 and got.attempts == 1
    assert hashlib.sha256(got.body).hexdigest() == hashlib.sha256(IMAGE).hexdigest()
    assert got.elapsed_s < 5


def test_empty_body_is_success(served):
    server, _ = served
    got = fetch(server.url("empty"))
    assert got.body == b"" and got.error is None and got.http_status == 200


def test_body_of_exactly_max_bytes_is_kept(served):
    server, _ = served
    got = fetch(server.url("exact"), max_bytes=SMALL_CAP)
    assert got.error is None and len(got.body) == SMALL_CAP


def test_user_agent_is_sent(served):
    server, _ = served
    got = fetch(server.url("t/ua"), user_agent="fastlaion-test/1.0 (+loopback)")
    assert got.body == b"fastlaion-test/1.0 (+loopback)"


def test_fetched_is_immutable(served):
    server, _ = served
    got = fetch(server.url("empty"))
    with pytest.raises(AttributeError):
        got.error = "x"  # type: ignore[misc]


# --- HTTP errors and retries -----------------------------------------------------------------


def test_404_is_not_retried(served):
    server, routes = served
    got = fetch(server.url("t/status/404/a"))
    assert (got.error, got.http_status, got.body, got.attempts) == ("http_404", 404, None, 1)
    assert routes.hits["/t/status/404/a"] == 1


def test_503_is_retried_then_reported(served):
    server, routes = served
    got = fetch(server.url("t/status/503/a"), retries=2)
    assert (got.error, got.http_status, got.body, got.attempts) == ("http_503", 503, None, 3)
    assert routes.hits["/t/status/503/a"] == 3


def test_429_is_retried(served):
    server, routes = served
    got = fetch(server.url("t/status/429/a"), retries=1)
    assert got.error == "http_429" and got.attempts == 2 and routes.hits["/t/status/429/a"] == 2


def test_no_retries_means_one_attempt(served):
    server, routes = served
    got = fetch(server.url("t/status/500/a"), retries=0)
    assert got.error == "http_500" and got.attempts == 1 and routes.hits["/t/status/500/a"] == 1


def test_transient_failure_then_success(served):
    server, routes = served
    got = fetch(server.url("t/flaky/a"), retries=2)
    assert got.error is None and got.body == b"third time lucky" and got.attempts == 3
    assert routes.hits["/t/flaky/a"] == 3


def test_backoff_doubles(served):
    server, _ = served
    got = fetch(server.url("t/status/502/backoff"), retries=2, backoff_s=0.1)
    assert got.attempts == 3
    assert got.elapsed_s >= 0.1 + 0.2 - 0.02  # two sleeps: backoff_s, then 2 * backoff_s


@pytest.mark.parametrize("error, transient", [
    ("timeout", True), ("connection_error", True), ("payload_error", True), ("http_429", True),
    ("http_500", True), ("http_503", True), ("http_404", False), ("http_403", False),
    ("too_large", False), ("too_many_redirects", False), ("invalid_url", False),
    ("client_error", False), (None, False),
])
def test_is_transient(error, transient):
    assert is_transient(error) is transient


# --- connection failures and deadlines -------------------------------------------------------


def test_refused_connection():
    got = fetch(f"http://127.0.0.1:{free_port()}/x.jpg", retries=1)
    assert got.error == "connection_error" and got.http_status is None and got.attempts == 2
    assert got.error_detail and len(got.error_detail) <= 200


def test_server_closes_without_answer(served):
    server, routes = served
    got = fetch(server.url("t/drop"), retries=1)
    assert got.error == "connection_error" and got.attempts == 2 and got.http_status is None
    # aiohttp itself retries a GET once on a dropped connection, so each attempt may be 2 requests.
    assert 2 <= routes.hits["/t/drop"] <= 4


def test_body_cut_short_is_payload_error(served):
    server, routes = served
    got = fetch(server.url("t/cut"), retries=1)
    assert got.error == "payload_error" and got.body is None and got.http_status == 200
    assert got.attempts == 2 and routes.hits["/t/cut"] == 2


def test_no_answer_times_out(served):
    server, routes = served
    before = routes.hits["/t/hang"]
    got = fetch(server.url("t/hang"), timeout_s=0.3, retries=1)
    assert got.error == "timeout" and got.http_status is None and got.attempts == 2
    assert routes.hits["/t/hang"] - before == 2
    assert 2 * 0.3 * 0.9 <= got.elapsed_s < 2 * 0.3 + 1.0


def test_trickling_body_times_out(served):
    """Headers arrive at once, then a byte every 0.1 s: the deadline must cover the body too."""
    server, _ = served
    got = fetch(server.url("t/trickle"), timeout_s=0.4, retries=0)
    assert got.error == "timeout" and got.http_status == 200 and got.body is None
    assert got.attempts == 1 and 0.35 <= got.elapsed_s < 0.4 + 0.6


def test_deadline_fallback_for_python_310():
    async def go() -> None:
        async with _deadline_fallback(1.0):  # finishes in time: no error
            await asyncio.sleep(0.01)
        start = time.perf_counter()
        with pytest.raises(asyncio.TimeoutError):
            async with _deadline_fallback(0.05):
                await asyncio.sleep(10)
        assert time.perf_counter() - start < 1
    run(go())


# --- size cap --------------------------------------------------------------------------------


def test_content_length_over_cap_is_too_large(served):
    server, _ = served
    got = fetch(server.url("big"), max_bytes=SMALL_CAP)
    assert (got.error, got.body, got.attempts) == ("too_large", None, 1)
    assert "Content-Length" in got.error_detail


def test_chunked_body_over_cap_is_too_large(served):
    server, routes = served
    got = fetch(server.url("t/chunked-big"), max_bytes=SMALL_CAP)
    assert (got.error, got.body, got.attempts) == ("too_large", None, 1)
    assert routes.hits["/t/chunked-big"] >= 1


# --- redirects -------------------------------------------------------------------------------


def test_one_redirect_is_followed(served):
    server, _ = served
    got = fetch(server.url("t/redirect"))
    assert got.error is None and got.body == IMAGE and got.attempts == 1


def test_redirect_loop(served):
    server, routes = served
    before = routes.hits["/t/loop"]
    got = fetch(server.url("t/loop"))
    assert got.error == "too_many_redirects" and got.body is None and got.attempts == 1
    assert routes.hits["/t/loop"] - before == 11  # the first request and 10 redirects followed
    assert got.http_status == 302


def test_ten_redirects_are_followed_eleven_are_too_many(served):
    server, _ = served
    ten = fetch(server.url("t/chain/10"))
    assert ten.error is None and ten.body == b"end of chain"
    eleven = fetch(server.url("t/chain/11"))
    assert eleven.error == "too_many_redirects" and eleven.attempts == 1


# --- URL validation --------------------------------------------------------------------------


INVALID_URLS = ["", None, "   ", "ftp://x/y", "not a url", "javascript:alert(1)", "http://",
                "data:image/png;base64,iVBORw0KGgo=", "file:///etc/passwd", "//127.0.0.1/x",
                "http:///path", "http://127.0.0.1:99999/x", "http://[::1/x", "http://a b/x"]


@pytest.mark.parametrize("url", INVALID_URLS)
def test_invalid_urls(url):
    assert validate_url(url) == "invalid_url"


@pytest.mark.parametrize("url", ["http://127.0.0.1/a.jpg", "HTTPS://LOCALHOST:8443/x?y=1#z",
                                 "  http://127.0.0.1/a b.jpg  ", "http://[::1]:80/x"])
def test_valid_urls(url):
    assert validate_url(url) is None


def test_fetch_of_invalid_url_sends_nothing():
    got = fetch("javascript:alert(1)")
    assert (got.body, got.http_status, got.error, got.attempts) == (None, None, "invalid_url", 0)


def test_surrounding_whitespace_is_stripped(served):
    server, _ = served
    assert fetch(f"  {server.url('empty')}\n").error is None


# --- download_all ----------------------------------------------------------------------------


def collect(items, *, workers: int, **cfg: object) -> dict[int, list[Fetched]]:
    results: dict[int, list[Fetched]] = {}

    async def on_result(key: int, fetched: Fetched) -> None:
        results.setdefault(key, []).append(fetched)

    async def go() -> None:
        async with Downloader(DownloadConfig(**{**FAST, "workers": workers, **cfg})) as downloader:
            await download_all(downloader, items, workers, on_result)
    run(go())
    return results


def test_download_all_bounds_concurrency_and_delivers_each_key_once(served):
    server, routes = served
    n, workers = 200, 8
    pulled = 0
    delivered = 0
    ahead: list[int] = []

    def items():
        nonlocal pulled
        for key in range(n):
            pulled += 1
            yield key, server.url(f"t/tracked/{key}")

    async def on_result(key: int, fetched: Fetched) -> None:
        nonlocal delivered
        delivered += 1
        ahead.append(pulled - delivered)
        results.setdefault(key, []).append(fetched)

    results: dict[int, list[Fetched]] = {}

    async def go() -> None:
        async with Downloader(DownloadConfig(**{**FAST, "workers": workers})) as downloader:
            await download_all(downloader, items(), workers, on_result)
    routes.max_in_flight = 0
    run(go())

    assert sorted(results) == list(range(n))
    assert all(len(v) == 1 for v in results.values())
    assert all(v[0].body == str(k).encode() for k, v in results.items())
    assert 2 <= routes.max_in_flight <= workers
    # The queue holds 2 * workers, each worker one, the producer one in hand: memory stays flat.
    assert max(ahead) <= 3 * workers + 1


def test_download_all_never_requests_invalid_urls(served):
    server, routes = served
    ftp = f"ftp://127.0.0.1:{server.port}/t/status/200/ftp"
    items = [(i, url) for i, url in enumerate(INVALID_URLS + [ftp])]
    items.append((1000, server.url("t/status/200/valid")))
    results = collect(items, workers=3)
    assert sorted(results) == [i for i, _ in items]
    for key, [fetched] in results.items():
        if key == 1000:
            assert fetched.error is None and fetched.attempts == 1
        else:
            assert (fetched.error, fetched.attempts, fetched.http_status) == ("invalid_url", 0, None)
    assert routes.hits["/t/status/200/ftp"] == 0
    assert routes.hits["/t/status/200/valid"] == 1


def test_download_all_empty_input():
    assert collect([], workers=4) == {}


def test_download_all_propagates_on_result_errors(served):
    server, _ = served
    seen: list[int] = []

    async def on_result(key: int, fetched: Fetched) -> None:
        seen.append(key)
        if len(seen) == 5:
            raise ValueError("bug in the writer")

    async def go() -> None:
        async with Downloader(DownloadConfig(**{**FAST, "workers": 4})) as downloader:
            with pytest.raises(ValueError, match="bug in the writer"):
                await download_all(downloader, [(k, server.url("empty")) for k in range(100)], 4,
                                   on_result)
        # Every worker and the producer were cancelled and awaited: nothing is left running.
        assert asyncio.all_tasks() == {asyncio.current_task()}
    run(go())
    assert 5 <= len(seen) < 100


def test_download_all_rejects_zero_workers():
    async def go() -> None:
        async with Downloader(DownloadConfig(**FAST)) as downloader:
            with pytest.raises(ValueError):
                await download_all(downloader, [], 0, None)  # type: ignore[arg-type]
    run(go())


# --- loop and lifecycle ----------------------------------------------------------------------


def test_new_event_loop_prefers_uvloop():
    uvloop = pytest.importorskip("uvloop")
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_fetch_outside_context_is_an_error():
    async def go() -> None:
        with pytest.raises(RuntimeError, match="async with"):
            await Downloader(DownloadConfig(**FAST)).fetch("http://127.0.0.1:1/x")
    run(go())
