"""Tests for fastlaion.download against real HTTP servers on 127.0.0.1 (never the internet).

One loopback server per module serves every route; each route counts its requests by path, so a
test that needs its own count uses its own token in the path. Slow routes poll for the client
going away and give up after a few seconds, so the server always stops promptly.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import hashlib
import ipaddress
import itertools
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohappyeyeballs
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from helpers import encode
from aiohttp.abc import AbstractResolver
from yarl import URL

from fastlaion.config import DEFAULT_USER_AGENT, ConfigError, DownloadConfig
from fastlaion.decode import sniff_format
from fastlaion.download import (REASONS, Blocklists, Downloader, Fetched, GuardedResolver, PrivateAddressError,
                                _deadline_fallback, download_all, is_public_address, is_transient, literal_ip,
                                new_event_loop, opt_out_directive, validate_url)
from fastlaion.server import LoopbackServer, Served

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning",
                                        "error::pytest.PytestUnraisableExceptionWarning")

IMAGE = os.urandom(300_000)  # several read chunks
SMALL_CAP = 10_000  # max_bytes for the too_large tests
# The loopback server is a private address: every test that talks to it must allow those.
FAST = dict(timeout_s=0.5, retries=2, backoff_s=0.01, allow_private_networks=True)
HANG_LIMIT_S = 5.0  # the longest any slow route keeps going if the client never leaves
SLACK_S = 0.5  # what a cut-off may take beyond its timeout on a busy 2-core machine


@pytest.fixture(scope="module", autouse=True)
def earlier_modules_garbage_collected():
    """The ResourceWarning-as-error above is for this module's own tests: a file another module's
    test left unclosed is collected here first, its warning not raised, not in whichever test of
    this module the garbage collector would happen to run in."""
    import gc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(autouse=True)
def only_loopback_connections(monkeypatch):
    """Safety net: any connection attempt to an address that is not loopback fails the test
    before a packet leaves (aiohttp connects through aiohappyeyeballs.start_connection)."""
    real = aiohappyeyeballs.start_connection

    async def guarded(*args, **kwargs):
        addr_infos = kwargs["addr_infos"] if "addr_infos" in kwargs else args[0]
        for info in addr_infos:
            host = info[4][0]
            if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
                raise AssertionError(f"the test tried to connect to {host}")
        return await real(*args, **kwargs)

    monkeypatch.setattr(aiohappyeyeballs, "start_connection", guarded)


class StubResolver(AbstractResolver):
    """DNS from a fixed table, never from the network; counts lookups by host name.
    `hang` makes every lookup take an hour (the connect timeout must cut it)."""

    def __init__(self, table: dict[str, list[str]] | None = None, *, hang: bool = False):
        self.table = table or {}
        self.hang = hang
        self.calls: Counter[str] = Counter()

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.calls[host] += 1
        if self.hang:
            await asyncio.sleep(3600)
        if host not in self.table:
            raise OSError(f"stub resolver: no such host {host}")
        return [{"hostname": host, "host": ip, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
                 "family": socket.AF_INET6 if ":" in ip else socket.AF_INET} for ip in self.table[host]]

    async def close(self) -> None:
        pass


class Routes:
    """aiohttp routes with failure modes the file server cannot express, counting requests."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.host_in_flight: Counter[str] = Counter()
        self.host_max_in_flight: Counter[str] = Counter()
        self.arrivals: dict[str, list[float]] = {}
        self.hosts_seen: dict[str, list[str]] = {}  # Host headers by token (host-seen)

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
            web.get("/t/host-tracked/{key}", self.host_tracked),
            web.get("/t/arrival/{token}/{key}", self.arrival),
            web.get("/t/slow/{key}", self.slow),
            web.get("/t/slow-hop/{n}", self.slow_hop),
            web.get("/t/to", self.to),
            web.get("/t/gzip-bomb", self.gzip_bomb),
            web.get("/t/retry-after/{form}/{seconds}/{token}", self.retry_after),
            web.get("/t/host-seen/{token}", self.host_seen),
        ]

    async def host_seen(self, request: web.Request) -> web.Response:
        """The image, noting the Host header it was asked for with."""
        self.hosts_seen.setdefault(request.match_info["token"], []).append(request.headers.get("Host", ""))
        return web.Response(body=IMAGE, content_type="image/jpeg")

    async def retry_after(self, request: web.Request) -> web.Response:
        """429 with Retry-After (seconds, or an HTTP date that many seconds ahead) on the first
        request for the path, the body after; arrivals recorded under the path."""
        self.hits[request.path] += 1
        self.arrivals.setdefault(request.path, []).append(time.monotonic())
        if self.hits[request.path] > 1:
            return web.Response(body=b"after")
        seconds = int(request.match_info["seconds"])
        value = (str(seconds) if request.match_info["form"] == "delta"
                 else email.utils.formatdate(time.time() + seconds, usegmt=True))
        return web.Response(status=429, text="slow down\n", headers={"Retry-After": value})

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

    async def host_tracked(self, request: web.Request) -> web.Response:
        """Counts requests in flight per Host header (several names resolve to this server)."""
        host = request.headers["Host"].split(":")[0]
        self.host_in_flight[host] += 1
        self.host_max_in_flight[host] = max(self.host_max_in_flight[host], self.host_in_flight[host])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.03)
        finally:
            self.host_in_flight[host] -= 1
            self.in_flight -= 1
        return web.Response(body=request.match_info["key"].encode())

    async def arrival(self, request: web.Request) -> web.Response:
        self.arrivals.setdefault(request.match_info["token"], []).append(time.monotonic())
        return web.Response(body=b"here")

    async def slow(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.2)
        finally:
            self.in_flight -= 1
        return web.Response(body=b"slow")

    async def slow_hop(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        await asyncio.sleep(0.15)
        if n == 0:
            return web.Response(body=b"end of slow chain")
        raise web.HTTPFound(f"/t/slow-hop/{n - 1}")

    async def to(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        raise web.HTTPFound(request.query["url"])

    async def gzip_bomb(self, request: web.Request) -> web.Response:
        return web.Response(body=BOMB, headers={"Content-Encoding": "gzip"})


BOMB = gzip.compress(b"\0" * 2_000_000)  # about 2 KB on the wire, 2 MB once decompressed


@pytest.fixture(scope="module")
def served():
    routes = Routes()
    files = {
        "image.jpg": Served(IMAGE, "image/jpeg"),
        "empty": Served(b""),
        "big": Served(b"b" * (SMALL_CAP + 1)),
        "exact": Served(b"e" * SMALL_CAP),
        "html-as-jpeg": Served(b"<!doctype html><html><body>not found</body></html>", "image/jpeg"),
        **{f"xrt/{name}": Served(IMAGE, "image/jpeg", headers=headers) for name, headers in XRT_FILES.items()},
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


def fetch(url: str, *, downloader_args: dict | None = None, **cfg: object) -> Fetched:
    config = DownloadConfig(**{**FAST, **cfg})
    config.validate()

    async def go() -> Fetched:
        async with Downloader(config, **(downloader_args or {})) as downloader:
            return await downloader.fetch(url)
    return run(go())


def fetch_many(urls: list[str], *, downloader_args: dict | None = None, **cfg: object) -> list[Fetched]:
    """Fetch `urls` concurrently (at most `workers` at once) with one Downloader."""
    config = DownloadConfig(**{**FAST, **cfg})
    config.validate()

    async def go() -> list[Fetched]:
        results: dict[int, Fetched] = {}

        async def keep(key: int, fetched: Fetched) -> None:
            results[key] = fetched

        async with Downloader(config, **(downloader_args or {})) as downloader:
            await download_all(downloader, enumerate(urls), config.workers, keep)
        return [results[i] for i in range(len(urls))]
    return run(go())


# X-Robots-Tag headers of the xrt/ files, and whether each opts out of the default tags.
XRT_FILES = {
    "noai": (("X-Robots-Tag", "noai"),),
    "upper": (("X-Robots-Tag", "NoImageAI"),),
    "list": (("X-Robots-Tag", "nofollow, noindex"),),
    "second-header": (("X-Robots-Tag", "nofollow"), ("X-Robots-Tag", "noimageindex")),
    "ours": (("X-Robots-Tag", "fastlaion: noai"),),
    "img2dataset": (("X-Robots-Tag", "img2dataset: noai, noimageai"),),
    "googlebot": (("X-Robots-Tag", "googlebot: noindex"),),
    "googlebot-then-all": (("X-Robots-Tag", "googlebot: noindex"), ("X-Robots-Tag", "noai")),
    "harmless": (("X-Robots-Tag", "nofollow, noarchive, max-image-preview: large"),),
    "unavailable-after": (("X-Robots-Tag", "unavailable_after: 2030-01-01"),),
    "shorthand-none": (("X-Robots-Tag", "none"),),  # Google's "noindex, nofollow"
    "googlebot-none": (("X-Robots-Tag", "googlebot: none"),),
    "none": (),
}
XRT_OPTS_OUT = {"noai", "upper", "list", "second-header", "ours", "img2dataset", "googlebot-then-all",
                "shorthand-none"}


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


@pytest.mark.parametrize("form", ["delta", "date"])
def test_retry_after_is_waited_for_and_holds_the_host(served, form):
    """A 429 with Retry-After (seconds or an HTTP date): the retry comes no sooner than it asks
    (it was 0.01 s later here, the backoff), and a request to the same host that starts meanwhile
    waits for it too. An HTTP date counts whole seconds: 2 s ahead is over 1 s."""
    server, routes = served
    path = f"/t/retry-after/{form}/2/{form}-held"
    config = DownloadConfig(**{**FAST, "timeout_s": 5.0})

    async def go() -> list[Fetched]:
        async with Downloader(config) as downloader:
            first = asyncio.ensure_future(downloader.fetch(server.url(path.lstrip("/"))))
            while not routes.arrivals.get(path):  # the 429 is being answered
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            other = await downloader.fetch(server.url(f"t/arrival/{form}-other/x"))
            return [await first, other]

    got, other = run(go())
    assert got.ok and got.body == b"after" and got.attempts == 2 and other.ok
    (asked, retried), (came,) = routes.arrivals[path], routes.arrivals[f"{form}-other"]
    assert retried - asked >= 1.0 and came - asked >= 1.0, (retried - asked, came - asked)


def test_a_retry_after_longer_than_a_run_waits_fails_the_hosts_urls_without_requests(served):
    """Retry-After over --max-crawl-delay (10 s): that URL is not retried (no 3 quick requests to a
    host asking for an hour), and the host's other URLs get the same 429 without a request until
    then; both transient, so --retry-failed downloads them again. Another host is not affected."""
    server, routes = served
    path = "/t/retry-after/delta/3600/away"
    other_host = server.url("t/status/200/away-other").replace("127.0.0.1", "localhost")
    got = fetch_many([server.url(path.lstrip("/")), server.url("t/status/200/away-same"), other_host],
                     workers=1, retries=2)
    assert [g.error for g in got] == ["http_429", "http_429", None]
    assert got[0].attempts == 1 and routes.hits[path] == 1 and routes.hits["/t/status/200/away-same"] == 0
    assert "Retry-After 3600 s" in got[1].error_detail and "not retried in this run" in got[1].error_detail
    assert is_transient(got[1].error)


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
    ("connect_timeout", True), ("header_timeout", True), ("read_timeout", True), ("deadline", True),
    ("connection_error", True), ("payload_error", True), ("http_429", True),
    ("http_500", True), ("http_503", True), ("http_404", False), ("http_403", False),
    ("too_large", False), ("too_many_redirects", False), ("invalid_url", False),
    ("client_error", False), ("opt_out", False), ("blocked", False), ("private_address", False),
    ("robots_disallowed", False), ("robots_unreachable", True), (None, False),
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
    # read_timeout_s unset: 0.3 s too, ending with the deadline, which names it (see below)
    got = fetch(server.url("t/hang"), timeout_s=0.3, retries=1)
    assert got.error == "deadline" and got.http_status is None and got.attempts == 2
    assert routes.hits["/t/hang"] - before == 2
    assert 2 * 0.3 * 0.9 <= got.elapsed_s < 2 * 0.3 + 1.0


def test_trickling_body_times_out(served):
    """Headers arrive at once, then a byte every 0.1 s: the deadline must cover the body too."""
    server, _ = served
    got = fetch(server.url("t/trickle"), timeout_s=0.4, retries=0)
    assert got.error == "deadline" and got.http_status == 200 and got.body is None
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
    got = fetch(server.url("t/loop"), max_redirects=10)
    assert got.error == "too_many_redirects" and got.body is None and got.attempts == 1
    assert routes.hits["/t/loop"] - before == 11  # the first request and 10 redirects followed
    assert got.http_status == 302


def test_ten_redirects_are_followed_eleven_are_too_many(served):
    server, _ = served
    ten = fetch(server.url("t/chain/10"), max_redirects=10)
    assert ten.error is None and ten.body == b"end of chain"
    eleven = fetch(server.url("t/chain/11"), max_redirects=10)
    assert eleven.error == "too_many_redirects" and eleven.attempts == 1


# --- URL validation --------------------------------------------------------------------------


INVALID_URLS = ["", None, "   ", "ftp://x/y", "not a url", "javascript:alert(1)", "http://",
                "data:image/png;base64,iVBORw0KGgo=", "file:///etc/passwd", "//127.0.0.1/x",
                "http:///path", "http://127.0.0.1:99999/x", "http://[::1/x", "http://a b/x",
                # port 0 names no server: it was connection_error, a transient failure that
                # --retry-failed would download again on every rerun
                "http://127.0.0.1:0/x.jpg", "https://example.com:0/x.jpg"]


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


def test_overlapping_download_alls_share_the_workers_limit(served):
    """Two calls on one downloader (a shard's tail and the next shard) keep at most
    `cfg.workers` requests in flight between them."""
    server, routes = served
    workers = 4
    results: dict[tuple[int, int], Fetched] = {}

    async def go() -> None:
        async with Downloader(DownloadConfig(**{**FAST, "workers": workers})) as downloader:
            async def one(shard: int) -> None:
                async def keep(key: int, fetched: Fetched) -> None:
                    results[shard, key] = fetched
                await download_all(downloader, [(k, server.url(f"t/tracked/o{shard}-{k}")) for k in range(20)],
                                   workers, keep)
            await asyncio.gather(one(0), one(1))
    routes.max_in_flight = 0
    run(go())
    assert len(results) == 40 and all(f.ok for f in results.values())
    assert 2 <= routes.max_in_flight <= workers


def test_download_all_says_once_when_only_the_tail_is_left(served):
    """on_drained fires once, when every URL has been handed to a worker: at that moment at most
    `workers` requests are still in flight, so a caller can start the next shard's downloads."""
    server, _ = served
    n, workers = 40, 4
    delivered = 0
    drained_at: list[int] = []

    async def on_result(key: int, fetched: Fetched) -> None:
        nonlocal delivered
        delivered += 1

    async def go() -> None:
        async with Downloader(DownloadConfig(**{**FAST, "workers": workers})) as downloader:
            await download_all(downloader, [(k, server.url(f"t/tracked/{k}")) for k in range(n)], workers,
                               on_result, on_drained=lambda: drained_at.append(delivered))
    run(go())
    assert delivered == n
    assert len(drained_at) == 1
    assert n - workers <= drained_at[0] <= n


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


# --- never hang: connect, header, idle-read and total timeouts -------------------------------


def assert_cut_off(got: Fetched, timeout_s: float, attempts: int = 1, backoff_s: float = 0.0) -> None:
    """Each attempt lasted its timeout (not less), and the whole fetch at most SLACK_S more."""
    floor = attempts * timeout_s * 0.9 + backoff_s
    assert floor <= got.elapsed_s < attempts * timeout_s + backoff_s + SLACK_S, got


@contextmanager
def full_backlog_port() -> Iterator[int]:
    """A port whose listen queue is full: the kernel drops further SYNs, so connecting hangs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        time.sleep(0.05)
        with socket.socket() as probe:
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except OSError:  # socket.timeout included: the SYN was dropped, as intended
                pass
            else:
                pytest.skip("this kernel accepts connections beyond a full listen backlog")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_connect_timeout_when_the_syn_is_never_answered():
    with full_backlog_port() as port:
        got = fetch(f"http://127.0.0.1:{port}/x.jpg", connect_timeout_s=0.3, read_timeout_s=5, timeout_s=5,
                    retries=1, backoff_s=0.01)
    assert (got.error, got.http_status, got.body, got.attempts) == ("connect_timeout", None, None, 2)
    assert_cut_off(got, 0.3, attempts=2, backoff_s=0.01)


def test_connect_timeout_covers_dns():
    resolver = StubResolver(hang=True)
    got = fetch("http://slow-dns.test/x.jpg", connect_timeout_s=0.3, timeout_s=5, retries=0,
                downloader_args={"resolver": resolver})
    assert got.error == "connect_timeout" and got.http_status is None
    assert resolver.calls["slow-dns.test"] == 1
    assert_cut_off(got, 0.3)


def test_header_timeout_when_the_server_never_answers(served):
    server, _ = served
    got = fetch(server.url("stall/hang?t=header"), read_timeout_s=0.3, timeout_s=5, retries=0)
    assert (got.error, got.http_status, got.body, got.attempts) == ("header_timeout", None, None, 1)
    assert_cut_off(got, 0.3)


def test_read_timeout_when_the_body_never_comes(served):
    server, _ = served
    got = fetch(server.url("stall/headers?t=read"), read_timeout_s=0.3, timeout_s=5, retries=0)
    assert (got.error, got.http_status, got.body, got.attempts) == ("read_timeout", 200, None, 1)
    assert_cut_off(got, 0.3)


@pytest.mark.parametrize("phase", ["connect", "header"])
def test_a_phase_timeout_ending_with_the_deadline_is_the_deadline(served, phase):
    """A phase timeout equal to timeout_s (given so, or unset under a lower timeout_s) ends
    when the deadline does: aiohttp's timer and the deadline's raced, and the reason was the
    phase's on Python 3.11+ (the deadline is checked every 50 ms, aiohttp's timer is exact) and
    the deadline's on 3.10 (a timer of its own, started first). The whole budget spent is
    `deadline`, whichever timer ran first; each run four times, as one run could win the race."""
    server, _ = served
    for _ in range(4):
        if phase == "connect":  # a DNS lookup that never ends: the connect phase
            resolver = StubResolver(hang=True)
            got = fetch("http://slow-dns.test/x.jpg", connect_timeout_s=0.3, timeout_s=0.3, retries=0,
                        downloader_args={"resolver": resolver})
            assert resolver.calls["slow-dns.test"] == 1
        else:  # connected, no headers ever
            got = fetch(server.url("stall/hang?t=equal"), read_timeout_s=0.3, timeout_s=0.3, retries=0)
        assert (got.error, got.http_status, got.attempts) == ("deadline", None, 1), got
        assert_cut_off(got, 0.3)


def test_unset_phase_timeouts_are_at_most_the_deadline():
    """connect_timeout_s and read_timeout_s unset are 5 s, or timeout_s where that is less: a
    5 s phase under a 3 s deadline could never end (config.json said 5). One set above
    timeout_s is refused, also when it is the 5 s default written out."""
    assert (DownloadConfig().connect_timeout_s, DownloadConfig().read_timeout_s) == (5.0, 5.0)
    assert (DownloadConfig(timeout_s=8).connect_timeout_s, DownloadConfig(timeout_s=8).read_timeout_s) == (5.0, 5.0)
    capped = DownloadConfig(timeout_s=3)
    capped.validate()
    assert (capped.connect_timeout_s, capped.read_timeout_s) == (3.0, 3.0)
    partly = DownloadConfig(timeout_s=3, connect_timeout_s=1)
    assert (partly.connect_timeout_s, partly.read_timeout_s) == (1.0, 3.0)
    with pytest.raises(ConfigError, match="^--connect-timeout 5 is above --timeout 3, "):
        DownloadConfig(timeout_s=3, connect_timeout_s=5).validate()
    with pytest.raises(ConfigError, match="^--read-timeout 5 is above --timeout 2.5, "):
        DownloadConfig(timeout_s=2.5, read_timeout_s=5.0).validate()


def wait_for_stall(server: LoopbackServer, marker: str, timeout_s: float = 3.0):
    """The server's record of the /stall/ request whose path and query hold `marker`, once its
    handler has ended (it polls for the client leaving, so this can lag the client a little)."""
    deadline = time.monotonic() + timeout_s
    while not (found := [r for r in server.stalls if marker in r.path]):
        assert time.monotonic() < deadline, f"the server has no record of {marker!r}"
        time.sleep(0.01)
    [record] = found
    return record


def test_deadline_cuts_a_trickle_the_idle_timeout_never_sees(served):
    """One byte every 50 ms never trips the 0.3 s idle timeout; only the 0.6 s deadline ends it."""
    server, _ = served
    got = fetch(server.url("stall/trickle?every_ms=50&t=deadline"), read_timeout_s=0.3, timeout_s=0.6, retries=0)
    assert (got.error, got.http_status, got.body, got.attempts) == ("deadline", 200, None, 1)
    assert_cut_off(got, 0.6)
    record = wait_for_stall(server, "t=deadline")
    assert record.client_left and record.body_bytes_sent >= 5  # bytes kept coming until the cut


def test_deadline_cuts_an_endless_stream(served):
    server, _ = served
    got = fetch(server.url("stall/forever?chunk=4096&every_ms=5"), max_bytes=1 << 30, read_timeout_s=0.3,
                timeout_s=0.5, retries=0)
    assert (got.error, got.http_status, got.body) == ("deadline", 200, None)
    assert_cut_off(got, 0.5)


def test_endless_stream_without_length_is_cut_at_max_bytes(served):
    server, _ = served
    got = fetch(server.url("stall/forever"), max_bytes=1_000_000, timeout_s=5, retries=0)
    assert (got.error, got.http_status, got.body) == ("too_large", 200, None)
    assert got.elapsed_s < 2


def test_timeouts_are_retried(served):
    server, _ = served
    before = server.hits["/stall/hang"]
    got = fetch(server.url("stall/hang"), read_timeout_s=0.2, timeout_s=5, retries=2, backoff_s=0.01)
    assert got.error == "header_timeout" and got.attempts == 3
    assert server.hits["/stall/hang"] - before == 3
    assert_cut_off(got, 0.2, attempts=3, backoff_s=0.01 + 0.02)


def test_deadline_spans_all_redirect_hops(served):
    """Five hops of 0.15 s each: every hop is quick, the whole is over the 0.5 s deadline."""
    server, _ = served
    got = fetch(server.url("t/slow-hop/5"), timeout_s=0.5, read_timeout_s=0.4, retries=0)
    assert (got.error, got.http_status, got.attempts) == ("deadline", 302, 1)
    assert_cut_off(got, 0.5)


def test_waiting_for_a_host_slot_is_not_counted_against_the_deadline(served):
    server, routes = served
    routes.max_in_flight = 0
    results = fetch_many([server.url(f"t/slow/{k}") for k in range(4)], workers=4, per_host=1, timeout_s=0.35)
    assert [r.error for r in results] == [None] * 4  # each waited up to 0.6 s for its turn
    assert routes.max_in_flight == 1
    assert max(r.elapsed_s for r in results) >= 4 * 0.2 * 0.9


# --- politeness: per-host limits, DNS cache, user agent, robots.txt --------------------------


def test_per_host_limit_bounds_requests_in_flight_per_host(served):
    server, routes = served
    resolver = StubResolver({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]})
    urls = [f"http://{host}:{server.port}/t/host-tracked/{k}" for k in range(40) for host in ("a.test", "b.test")]
    routes.max_in_flight = 0
    results = fetch_many(urls, workers=16, per_host=3, downloader_args={"resolver": resolver})
    assert all(r.ok for r in results)
    assert routes.host_max_in_flight["a.test"] == 3 and routes.host_max_in_flight["b.test"] == 3
    assert routes.max_in_flight > 3  # the limit is per host, not overall


def test_a_busy_host_does_not_hold_the_workers_of_other_hosts(served):
    """Twelve slow URLs of one host come first, then twelve quick ones of another; one request
    at a time per host. The workers skip the busy host's URLs, so the other host's are done
    while the busy one is still on its first few (a plain queue served them after ~eight)."""
    server, _ = served
    resolver = StubResolver({"busy.test": ["127.0.0.1"], "free.test": ["127.0.0.1"]})
    urls = ([f"http://busy.test:{server.port}/t/slow/hol-{k}" for k in range(12)]
            + [f"http://free.test:{server.port}/t/status/200/hol-{k}" for k in range(12)])
    order: list[str] = []

    async def go() -> None:
        async def on_result(key: int, fetched: Fetched) -> None:
            assert fetched.ok, fetched
            order.append(urls[key].split("/")[2].split(":")[0])

        cfg = DownloadConfig(**{**FAST, "workers": 4, "per_host": 1})
        async with Downloader(cfg, resolver=resolver) as downloader:
            await download_all(downloader, enumerate(urls), cfg.workers, on_result)
    run(go())
    assert sorted(order) == ["busy.test"] * 12 + ["free.test"] * 12
    assert order[:14].count("free.test") == 12, order


def test_per_host_rate_spaces_request_starts(served):
    server, routes = served
    n, rate = 6, 10.0
    results = fetch_many([server.url(f"t/arrival/rate/{k}") for k in range(n)], workers=n, per_host_rate=rate)
    assert all(r.ok for r in results)
    arrivals = sorted(routes.arrivals["rate"])
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 1 / rate - 0.03, gaps
    assert (n - 1) / rate - 0.03 <= arrivals[-1] - arrivals[0] < (n - 1) / rate + SLACK_S


def test_no_rate_limit_by_default(served):
    server, routes = served
    results = fetch_many([server.url(f"t/arrival/free/{k}") for k in range(6)], workers=6)
    assert all(r.ok for r in results)
    arrivals = routes.arrivals["free"]
    assert max(arrivals) - min(arrivals) < 0.3


def test_dns_answers_are_cached(served):
    server, _ = served
    resolver = StubResolver({"cached.test": ["127.0.0.1"]})
    results = fetch_many([f"http://cached.test:{server.port}/empty" for _ in range(20)], workers=4,
                         downloader_args={"resolver": resolver})
    assert all(r.ok for r in results)
    assert resolver.calls["cached.test"] == 1


def test_default_user_agent_names_the_tool(served):
    server, _ = served
    assert DownloadConfig().user_agent == DEFAULT_USER_AGENT
    got = fetch(server.url("t/ua"))
    assert got.body.decode().startswith("fastlaion/") and "+http" in got.body.decode()


ROBOTS = b"User-agent: *\nDisallow: /private/\n"


def robots_server(robots: Served | None, **kwargs) -> LoopbackServer:
    files = {f"{d}/{i}.jpg": Served(IMAGE, "image/jpeg") for d in ("public", "private") for i in range(10)}
    if robots is not None:
        files["robots.txt"] = robots
    return LoopbackServer(files, **kwargs)


def test_robots_fetched_once_for_many_urls_and_obeyed():
    with robots_server(Served(ROBOTS, "text/plain"), delay_s=0.1) as server:  # slow: the waits overlap
        urls = [server.url(f"{d}/{i}.jpg") for i in range(10) for d in ("public", "private")]
        results = fetch_many(urls, workers=8, respect_robots=True)
        assert server.hits["/robots.txt"] == 1
        assert sum(n for path, n in server.hits.items() if path.startswith("/private/")) == 0
    for url, got in zip(urls, results):
        if "/private/" in url:
            assert (got.error, got.attempts, got.body) == ("robots_disallowed", 0, None)
            assert "robots.txt" in got.error_detail
        else:
            assert got.ok and got.body == IMAGE


def test_robots_crawl_delay_spaces_request_starts():
    robots = b"User-agent: *\nCrawl-delay: 1\nDisallow: /private/\n"
    done: list[float] = []

    async def go(server: LoopbackServer) -> None:
        async def on_result(key: int, fetched: Fetched) -> None:
            assert fetched.ok, fetched
            done.append(time.monotonic())

        cfg = DownloadConfig(**{**FAST, "workers": 3, "respect_robots": True})
        async with Downloader(cfg) as downloader:
            await download_all(downloader, enumerate(server.url(f"public/{i}.jpg") for i in range(3)), 3, on_result)
    with robots_server(Served(robots, "text/plain")) as server:
        run(go(server))
    gaps = [b - a for a, b in itertools.pairwise(done)]
    assert len(done) == 3 and min(gaps) >= 0.95, gaps


def test_robots_crawl_delay_over_the_cap_refuses_the_host():
    with robots_server(Served(b"User-agent: *\nCrawl-delay: 50\n", "text/plain")) as server:
        results = fetch_many([server.url(f"public/{i}.jpg") for i in range(3)], respect_robots=True)
        assert server.hits["/robots.txt"] == 1
        assert sum(n for path, n in server.hits.items() if path.startswith("/public/")) == 0
    for got in results:
        assert (got.error, got.attempts) == ("robots_disallowed", 0)
        assert "Crawl-delay of 50 s, over --max-crawl-delay 10 s" in got.error_detail
    with robots_server(Served(b"User-agent: *\nCrawl-delay: 50\n", "text/plain")) as server:
        # A cap above the delay honours it: the first request goes at once.
        assert fetch(server.url("public/1.jpg"), respect_robots=True, max_crawl_delay_s=60).ok


@pytest.mark.parametrize("lines, delay", [
    (["User-agent: *", "Crawl-delay: 3"], 3.0),
    (["User-agent: *", "Crawl-delay: 0.5"], 1.0),  # fractions round up: never faster than asked
    (["User-agent: *", "crawl-delay:2.25 # slow"], 3.0),
    (["User-agent: *", "Request-rate: 1/5"], 5.0),
    (["User-agent: *", "Crawl-delay: 2", "Request-rate: 2/10"], 5.0),  # the longer of the two
    (["User-agent: other", "Crawl-delay: 9", "", "User-agent: *", "Disallow: /x"], 0.0),
    (["User-agent: *", "Crawl-delay: soon"], 0.0),
])
def test_robots_delay_for_our_agent(lines, delay):
    import urllib.robotparser

    from fastlaion.download import _whole_delays

    parser = urllib.robotparser.RobotFileParser()
    parser.parse(_whole_delays(lines))
    assert Downloader(DownloadConfig(**FAST))._robots_delay(parser) == delay


def test_a_host_whose_robots_txt_is_loading_has_no_room():
    """While robots.txt is fetched, the host's URLs are skipped by the other workers: its
    Crawl-delay may be about to space them."""
    with robots_server(Served(b"User-agent: *\nCrawl-delay: 1\n", "text/plain"), delay_s=0.3) as server:
        async def go() -> list[bool]:
            async with Downloader(DownloadConfig(**{**FAST, "respect_robots": True})) as downloader:
                target = URL(server.url("public/1.jpg"))
                host = target.raw_host or ""
                seen = [downloader.host_has_room(host)]
                loading = asyncio.ensure_future(downloader._robots_for(target))
                await asyncio.sleep(0.05)
                seen.append(downloader.host_has_room(host))
                assert (await loading).crawl_delay_s == 1.0
                seen.append(downloader.host_has_room(host))
                return seen
        assert run(go()) == [True, False, True]


def test_robots_is_ignored_unless_asked_for():
    with robots_server(Served(b"User-agent: *\nDisallow: /\n", "text/plain")) as server:
        got = fetch(server.url("private/1.jpg"))
        assert got.ok and server.hits["/robots.txt"] == 0


@pytest.mark.parametrize("user_agent, allowed", [("fastlaion/0.1 (+test)", False), ("otherbot/1.0", True)])
def test_robots_group_for_our_agent(user_agent, allowed):
    robots = b"User-agent: fastlaion\nDisallow: /public/\n\nUser-agent: *\nAllow: /\n"
    with robots_server(Served(robots, "text/plain")) as server:
        got = fetch(server.url("public/1.jpg"), respect_robots=True, user_agent=user_agent)
    assert got.ok is allowed and got.error in (None, "robots_disallowed")


@pytest.mark.parametrize("robots, allowed", [
    (b"Allow: /\nDisallow: /private/\n", ["public/1.jpg", "public/2.jpg"]),  # not the first rule: the longest
    (b"Disallow: /private/\nAllow: /private/1.jpg\n", ["public/1.jpg", "public/2.jpg", "private/1.jpg"]),
    (b"Disallow: /private/\nAllow: /private/\n", ["public/1.jpg", "public/2.jpg", "private/1.jpg",
                                                  "private/2.jpg"]),  # a tie: Allow
    (b"Disallow: /*1.jpg$\n", ["public/2.jpg", "private/2.jpg"]),  # RFC 9309's wildcards
    (b"Disallow: /p*e/\n", ["public/1.jpg", "public/2.jpg"]),
    (b"Disallow: /*.jpg\nAllow: /public\n", ["public/1.jpg", "public/2.jpg"]),  # "*" counts one: /public is longer
], ids=["allow-all-above", "allow-inside-disallow", "tie", "star-and-dollar", "star-inside", "wildcard-length"])
def test_robots_rules_are_matched_longest_first(robots, allowed):
    """RFC 9309: the most specific (longest) matching rule decides, whatever the order; "*" matches
    any characters, a final "$" the end of the path."""
    paths = ["public/1.jpg", "public/2.jpg", "private/1.jpg", "private/2.jpg"]
    with robots_server(Served(b"User-agent: *\n" + robots, "text/plain")) as server:
        results = fetch_many([server.url(p) for p in paths], respect_robots=True)
        assert [p for p in paths if server.hits[f"/{p}"]] == allowed
    assert [p for p, got in zip(paths, results) if got.ok] == allowed


def test_robots_wildcards_match_as_a_regular_expression_would_and_a_hostile_rule_takes_no_time():
    """The wildcard matcher against Python's re on every small pattern and path: the same
    verdicts. A rule of many "*" (a site's robots.txt is anyone's text) is matched in
    linear time: as one regular expression it backtracked for minutes on a 40-character path,
    holding the download loop (30 s allowed here)."""
    import re
    import subprocess
    import sys
    from urllib.robotparser import RuleLine

    from fastlaion.download import _WildcardRule

    paths = ["/" + "".join(p) for n in range(6) for p in itertools.product("ab", repeat=n)]
    for n in range(1, 6):
        for body in itertools.product("ab*", repeat=n):
            for end in ("", "$"):
                pattern = "/" + "".join(body) + end
                if "*" not in pattern and not end:
                    continue
                rule = _WildcardRule(RuleLine(pattern, False))
                regex = re.compile(".*".join(map(re.escape, pattern.removesuffix("$").split("*")))
                                   + (r"\Z" if end else ""), re.DOTALL)
                for path in paths:
                    assert rule.applies_to(path) == (regex.match(path) is not None), (pattern, path)
    # in a child process: a backtracking match holds the GIL, so no thread of this one could time it out
    check = ("from fastlaion.download import _RobotsParser; p = _RobotsParser(); "
             "p.parse(['User-agent: *', 'Disallow: /' + '*a' * 12 + '*b$']); "
             "print([p.can_fetch('fastlaion', 'http://127.0.0.1/' + 'a' * 40 + end) for end in ('', 'b')])")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "[True, False]", done.stderr


def test_robots_txt_starting_with_a_byte_order_mark_is_obeyed():
    with robots_server(Served(b"\xef\xbb\xbf" + ROBOTS, "text/plain")) as server:
        results = fetch_many([server.url("private/1.jpg"), server.url("public/1.jpg")], respect_robots=True)
        assert server.hits["/private/1.jpg"] == 0
    assert [got.error for got in results] == ["robots_disallowed", None]


def test_robots_404_allows_everything():
    with robots_server(None) as server:
        got = fetch(server.url("private/1.jpg"), respect_robots=True)
        assert got.ok and server.hits["/robots.txt"] == 1


def test_robots_5xx_disallows_everything():
    """RFC 9309: a robots.txt that is unreachable (5xx) means complete disallow."""
    with robots_server(Served(b"oops", status=503)) as server:
        results = fetch_many([server.url("public/1.jpg"), server.url("public/2.jpg")], workers=2,
                             respect_robots=True, retries=1)
        assert server.hits["/robots.txt"] == 2  # one fetch, retried once as a transient failure
        assert server.hits["/public/1.jpg"] == server.hits["/public/2.jpg"] == 0
    for got in results:
        assert (got.error, got.attempts) == ("robots_unreachable", 0)
        assert "unreachable (http_503)" in got.error_detail


def test_robots_timeout_disallows_everything():
    async def hang(request: web.Request) -> web.Response:
        deadline = time.monotonic() + HANG_LIMIT_S
        while request.transport is not None and not request.transport.is_closing() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return web.Response(text="too late\n")

    with robots_server(None, extra_routes=[web.get("/robots.txt", hang)]) as server:
        got = fetch(server.url("public/1.jpg"), respect_robots=True, read_timeout_s=0.2, retries=0)
        assert server.hits["/public/1.jpg"] == 0
    assert got.error == "robots_unreachable" and "header_timeout" in got.error_detail
    assert got.elapsed_s < 0.2 + SLACK_S


def test_robots_checked_on_every_redirect_hop(served):
    with robots_server(Served(ROBOTS, "text/plain")) as images:
        got = fetch(served[0].url(f"t/to?url={images.url('private/3.jpg')}"), respect_robots=True)
        assert images.hits["/private/3.jpg"] == 0
    assert (got.error, got.http_status, got.attempts) == ("robots_disallowed", 302, 1)


def test_a_redirect_target_whose_robots_txt_is_unreachable_is_not_retried_within_the_run(served):
    """Its verdict holds for the run: another attempt would only wait for the same answer."""
    with robots_server(Served(b"oops", status=503)) as images:
        got = fetch(served[0].url(f"t/to?url={images.url('public/1.jpg')}"), respect_robots=True, retries=2)
        assert images.hits["/robots.txt"] == 3 and images.hits["/public/1.jpg"] == 0
    assert (got.error, got.http_status, got.attempts) == ("robots_unreachable", 302, 1)


# --- opt-out: X-Robots-Tag, read before the body ---------------------------------------------


@pytest.mark.parametrize("name", sorted(XRT_FILES))
def test_x_robots_tag_forms(served, name):
    server, _ = served
    got = fetch(server.url(f"xrt/{name}"))
    if name in XRT_OPTS_OUT:
        assert (got.error, got.body, got.http_status, got.attempts) == ("opt_out", None, 200, 1)
        assert got.error_detail.startswith("X-Robots-Tag: ")
    else:
        assert got.ok and got.body == IMAGE


def test_opt_out_tags_are_configurable(served):
    server, _ = served
    assert fetch(server.url("xrt/list"), opt_out_tags=("noai",)).ok  # noindex no longer opts out
    assert fetch(server.url("xrt/noai"), opt_out_tags=()).ok  # no check at all
    assert fetch(server.url("xrt/harmless"), opt_out_tags=("noarchive",)).error == "opt_out"
    assert fetch(server.url("xrt/shorthand-none"), opt_out_tags=("nofollow",)).error == "opt_out"
    assert fetch(server.url("xrt/shorthand-none"), opt_out_tags=("noai", "noimageai")).ok


def test_opt_out_drops_the_row_before_the_body_is_read(served):
    """The header comes first, then 100 MB at 64 KB per 50 ms: the row must drop at once and
    the server see the connection closed long before the body was sent."""
    server, _ = served
    length = 100_000_000
    got = fetch(server.url(f"stall/forever?every_ms=50&length={length}&header=X-Robots-Tag:noai&t=optout"),
                timeout_s=5)
    assert (got.error, got.body, got.http_status, got.attempts) == ("opt_out", None, 200, 1)
    assert got.elapsed_s < SLACK_S
    record = wait_for_stall(server, "t=optout")
    assert record.client_left and record.body_bytes_sent <= 4 * 65536 < length
    assert record.seconds < 1 + SLACK_S


@pytest.mark.parametrize("values, directive", [
    (["noai"], "noai"), (["NOINDEX"], "noindex"), (["nofollow", "noimageai"], "noimageai"),
    (["googlebot: noindex"], None), (["fastlaion: noai"], "fastlaion: noai"),
    (["googlebot: noindex, fastlaion: noimageindex"], "fastlaion: noimageindex"),
    (["unavailable_after: 25 Jun 2030 15:00:00 PST, noai"], "noai"),
    (["max-image-preview: none"], None), (["none"], "none"), (["googlebot: none, noarchive"], None),
    ([""], None), ([], None),
])
def test_opt_out_directive(values, directive):
    tags = ("noai", "noimageai", "noindex", "noimageindex")
    assert opt_out_directive(values, tags, {"fastlaion"}) == directive


# --- safety: private addresses, redirects, size, content type ---------------------------------


def test_loopback_is_refused_by_default(served):
    server, _ = served
    before = server.hits["/image.jpg"]
    got = fetch(server.url("image.jpg"), allow_private_networks=False)
    assert (got.error, got.attempts, got.http_status, got.body) == ("private_address", 0, None, None)
    assert server.hits["/image.jpg"] == before


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/x.jpg", "http://172.16.5.4/x.jpg", "http://192.168.1.1/x.jpg", "http://127.0.0.2/x.jpg",
    "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0/x.jpg", "http://224.0.0.1/x.jpg",
    "http://240.0.0.1/x.jpg", "http://255.255.255.255/x.jpg", "http://100.64.0.1/x.jpg",
    "http://[::1]/x.jpg", "http://[::]/x.jpg", "http://[fe80::1]/x.jpg", "http://[fd00::1]/x.jpg",
    "http://[ff02::1]/x.jpg", "http://[::ffff:127.0.0.1]/x.jpg", "http://[::ffff:a9fe:a9fe]/x.jpg",
    "http://[2002:a00:1::]/x.jpg", "http://[64:ff9b::a00:1]/x.jpg",
    "http://2130706433/x.jpg", "http://0x7f000001/x.jpg", "http://127.1/x.jpg", "http://0177.0.0.1/x.jpg",
])
def test_literal_private_addresses_are_refused_before_any_lookup(url):
    resolver = StubResolver()
    got = fetch(url, allow_private_networks=False, downloader_args={"resolver": resolver})
    assert (got.error, got.attempts, got.http_status) == ("private_address", 0, None), got
    assert not resolver.calls


@pytest.mark.parametrize("address", ["10.1.2.3", "169.254.169.254", "127.0.0.1", "::1", "::ffff:10.0.0.1",
                                     "fd12:3456::1", "fe80::1", "0.0.0.0", "239.1.2.3"])
def test_names_resolving_to_private_addresses_are_refused_before_connecting(address):
    resolver = StubResolver({"intranet.test": [address]})
    got = fetch("http://intranet.test/x.jpg", allow_private_networks=False, retries=2,
                downloader_args={"resolver": resolver})
    assert (got.error, got.attempts, got.http_status) == ("private_address", 1, None), got  # not retried
    assert address in got.error_detail


def test_guarded_resolver_keeps_public_addresses_only():
    async def go() -> None:
        stub = StubResolver({"mixed.test": ["10.0.0.1", "93.184.216.34", "::ffff:192.168.0.1"],
                             "public.test": ["93.184.216.34", "2606:2800:220:1::1"],
                             "private.test": ["10.0.0.1", "fc00::1"]})
        guard = GuardedResolver(stub)
        assert [r["host"] for r in await guard.resolve("mixed.test", 80)] == ["93.184.216.34"]
        assert len(await guard.resolve("public.test", 80)) == 2
        with pytest.raises(PrivateAddressError, match="10.0.0.1"):
            await guard.resolve("private.test", 80)
    run(go())  # no connection is made: only the resolver is exercised


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("10.0.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("198.18.0.1", False),
    ("::ffff:10.0.0.1", False), ("2002:a00:1::", False), ("64:ff9b::a00:1", False), ("ff02::1", False),
])
def test_is_public_address(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_literal_ip_reads_legacy_ipv4_forms():
    assert literal_ip("2130706433") == literal_ip("0x7f.1") == ipaddress.IPv4Address("127.0.0.1")
    assert literal_ip("images.example.com") is None and literal_ip("cafe.de") is None


# IPv4 spellings WHATWG's parser (browsers) and inet_aton read as a private address: 127.0.0.1
# (hex, one number, octal, two parts, a trailing dot, percent-encoded digits: `%31%32%37` is
# "127"), 169.254.169.254 (octal 0251 = 169, 0376 = 254; IPv4-mapped IPv6), 10.0.0.1.
ODD_PRIVATE_SPELLINGS = [
    "http://0x7f.1/x.jpg", "http://2130706433/x.jpg", "http://0251.0376.0251.0376/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/", "http://127.1/x.jpg", "http://127.0.0.1./x.jpg",
    "http://0x7f.1./x.jpg", "http://0X7F.0.0.1/x.jpg", "http://%31%32%37.0.0.1/x.jpg",
    "http://0xa.0.0.1/x.jpg", "http://0xA9FEA9FE/latest/meta-data/", "http://169.254.43518/latest/meta-data/",
]


@pytest.mark.parametrize("url", ODD_PRIVATE_SPELLINGS)
def test_odd_ipv4_spellings_of_private_addresses_are_refused_before_any_lookup(url):
    """No lookup and no connection (the stub resolver counts lookups; only_loopback_connections
    fails the test on a connection to anything but loopback)."""
    resolver = StubResolver()
    got = fetch(url, allow_private_networks=False, downloader_args={"resolver": resolver})
    assert (got.error, got.attempts, got.http_status) == ("private_address", 0, None), got
    assert not resolver.calls


@pytest.mark.parametrize("url", [
    "http://1.2.3.4.5/x.jpg", "http://999.1.1.1/x.jpg", "http://0x100000000/x.jpg", "http://4294967296/x.jpg",
    "http://256.0.0.1./x.jpg", "http://1.2.3.08/x.jpg", "http://example.0x1g.1/x.jpg", "http://1..2/x.jpg",
])
def test_hosts_ending_in_a_number_that_is_no_address_are_invalid_before_any_lookup(url):
    """No host to browsers (WHATWG's IPv4 parser fails), and not to be asked of DNS either:
    aiohttp takes a host of digits and dots for an address, and lets getaddrinfo resolve it
    past GuardedResolver."""
    resolver = StubResolver()
    got = fetch(url, allow_private_networks=False, downloader_args={"resolver": resolver})
    assert (got.error, got.attempts, got.http_status) == ("invalid_url", 0, None), got
    assert not resolver.calls
    assert validate_url(url) == "invalid_url"


def test_redirect_hops_to_odd_ipv4_spellings_are_refused(served):
    """As test_redirect_hops_to_private_addresses_are_refused: 127.0.0.1 plays the public
    internet; each odd spelling of a private address, as a redirect's target, is refused."""
    server, _ = served
    resolver = StubResolver({"public.test": ["127.0.0.1"]})
    args = {"resolver": resolver, "allow_address": lambda ip: ip == ipaddress.IPv4Address("127.0.0.1")}
    for target in ODD_PRIVATE_SPELLINGS[2:4] + ["http://127.0.0.2./", "http://0x7f.2/", "http://0xa.1/"]:
        got = fetch(f"http://public.test:{server.port}/t/to?url={target}", allow_private_networks=False,
                    downloader_args=args)
        assert (got.error, got.http_status, got.attempts) == ("private_address", 302, 1), (target, got)
    assert set(resolver.calls) == {"public.test"}


# 127.0.0.1 as odd_ipv4_spellings_of_private_addresses writes it, and a few more: to browsers (and
# to the guard) each is the address 127.0.0.1, requested as http://127.0.0.1:PORT/...
ODD_LOOPBACK_HOSTS = ["0x7f.1", "2130706433", "0177.0.0.1", "127.1", "127.0.0.1.", "%31%32%37.0.0.1",
                      "0x7f.0.0.1.", "0X7F.0.0.1", "0x7f000001", "127.0.1"]


@pytest.mark.parametrize("host", ODD_LOOPBACK_HOSTS)
def test_odd_ipv4_spellings_are_requested_as_the_address_they_name(served, host):
    """With --allow-private-networks, the loopback server is reached through each spelling, as a
    browser reaches it: the request goes to 127.0.0.1 with the URL's port, path and query, and a
    Host header naming the address in dotted decimal (what a browser sends: its URL parser
    rewrote the host before the request)."""
    server, routes = served
    token = f"odd-{ODD_LOOPBACK_HOSTS.index(host)}"
    resolver = StubResolver()  # answers nothing: with the flag no resolver guards, and none is asked
    got = fetch(f"http://{host}:{server.port}/t/host-seen/{token}?q=1", allow_private_networks=True,
                downloader_args={"resolver": resolver})
    assert (got.error, got.http_status, got.attempts) == (None, 200, 1), got
    assert got.body == IMAGE
    assert routes.hosts_seen[token] == [f"127.0.0.1:{server.port}"]
    assert not resolver.calls


def test_redirect_hops_to_odd_ipv4_spellings_are_requested_as_the_address_they_name(served):
    server, routes = served
    resolver = StubResolver()
    args = {"resolver": resolver}
    for host in ("127.1", "0177.0.0.1", "%31%32%37.0.0.1", "0x7f.0.0.1."):
        token = f"odd-hop-{host.replace('%', 'pct')}"
        got = fetch(server.url(f"t/to?url=http://{host}:{server.port}/t/host-seen/{token}"),
                    allow_private_networks=True, downloader_args=args)
        assert (got.error, got.http_status, got.body == IMAGE) == (None, 200, True), (host, got)
        assert routes.hosts_seen[token] == [f"127.0.0.1:{server.port}"]
    # a relative Location, from a host written oddly, is joined to the address
    got = fetch(f"http://127.1:{server.port}/t/redirect", allow_private_networks=True, downloader_args=args)
    assert got.ok and got.body == IMAGE
    assert not resolver.calls


@pytest.mark.parametrize("url", ["http://134744072/t/host-seen/{token}", "http://0x8.0x8.0x8.0x8/t/host-seen/{token}",
                                 "http://8.0x80808./t/host-seen/{token}", "http://%38.8.8.8/t/host-seen/{token}",
                                 "http://010.8.8.8/t/host-seen/{token}"])
def test_odd_ipv4_spellings_of_public_addresses_are_requested_as_the_address_they_name(served, monkeypatch, url):
    """Without --allow-private-networks: 8.8.8.8 to a browser is asked of the connector as
    8.8.8.8 port 80, not of DNS (the stub resolver answers nothing) nor refused as invalid_url.
    The connector connects the loopback server instead (no connection to 8.8.8.8 is ever
    attempted), which sees the Host header a browser sends: 8.8.8.8."""
    server, routes = served
    asked: list[tuple[str, int]] = []
    real = aiohappyeyeballs.start_connection

    async def to_loopback(addr_infos, **kwargs):
        asked.extend(info[4][:2] for info in addr_infos)
        return await real([(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", server.port))],
                          **kwargs)

    monkeypatch.setattr(aiohappyeyeballs, "start_connection", to_loopback)
    resolver = StubResolver()
    token = f"public-{url.split('/')[2].replace('%', 'pct')}"
    got = fetch(url.format(token=token), allow_private_networks=False, downloader_args={"resolver": resolver})
    assert (got.error, got.http_status, got.body == IMAGE) == (None, 200, True), got
    assert set(asked) == {("8.8.8.8", 80)}
    assert not resolver.calls
    assert routes.hosts_seen[token] == ["8.8.8.8"]


def test_odd_ipv4_spellings_of_one_address_are_one_host_to_robots_txt():
    """robots.txt is fetched once for 127.0.0.1 whatever the spelling of the URLs' hosts."""
    resolver = StubResolver()
    hosts = ["127.0.0.1", *ODD_LOOPBACK_HOSTS]
    with robots_server(Served(ROBOTS, "text/plain"), delay_s=0.1) as server:  # slow: the waits overlap
        results = fetch_many([f"http://{h}:{server.port}/{d}/{i % 10}.jpg" for i, h in enumerate(hosts)
                              for d in ("public", "private")], workers=8, respect_robots=True,
                             downloader_args={"resolver": resolver})
        assert server.hits["/robots.txt"] == 1
    assert [r.error for r in results] == [None, "robots_disallowed"] * len(hosts)
    assert not resolver.calls


def test_odd_ipv4_spellings_of_one_address_are_one_host_to_the_per_host_limit(served):
    """--per-host 1 holds one request in flight to 127.0.0.1 across its spellings. (The stub
    resolver would answer them as names, as getaddrinfo does: so they were fetched before, each
    a host of its own; now none is asked of it.)"""
    server, routes = served
    routes.max_in_flight = 0
    hosts = ["127.0.0.1", "0x7f.1", "0x7f.0.0.1", "0x7f000001"]
    resolver = StubResolver({h: ["127.0.0.1"] for h in hosts})
    results = fetch_many([f"http://{h}:{server.port}/t/slow/odd-{i}" for i, h in enumerate(hosts)],
                         workers=4, per_host=1, downloader_args={"resolver": resolver})
    assert [r.error for r in results] == [None] * 4
    assert routes.max_in_flight == 1
    assert not resolver.calls


def test_redirect_hops_to_private_addresses_are_refused(served):
    """127.0.0.1 plays the public internet here; every hop is checked, literal or resolved."""
    server, _ = served
    resolver = StubResolver({"public.test": ["127.0.0.1"], "metadata.test": ["169.254.169.254"]})
    args = {"resolver": resolver, "allow_address": lambda ip: ip == ipaddress.IPv4Address("127.0.0.1")}

    def via_redirect(target: str) -> Fetched:
        return fetch(f"http://public.test:{server.port}/t/to?url={target}", allow_private_networks=False,
                     downloader_args=args)

    control = via_redirect(f"http://public.test:{server.port}/image.jpg")
    assert control.ok and control.body == IMAGE  # the test's "public" world works
    for target in ("http://169.254.169.254/latest/meta-data/", f"http://127.0.0.2:{server.port}/image.jpg",
                   "http://[::ffff:a9fe:a9fe]/", "http://2852039166/", "http://metadata.test/latest/meta-data/"):
        got = via_redirect(target)
        assert (got.error, got.http_status, got.attempts) == ("private_address", 302, 1), (target, got)


def test_allow_private_networks_turns_the_guard_off(served):
    server, _ = served
    resolver = StubResolver({"loop.test": ["127.0.0.1"]})
    got = fetch(f"http://loop.test:{server.port}/image.jpg", allow_private_networks=True,
                downloader_args={"resolver": resolver})
    assert got.ok and got.body == IMAGE


def test_default_redirect_cap_is_five(served):
    server, _ = served
    assert DownloadConfig().max_redirects == 5
    assert fetch(server.url("t/chain/5"), max_redirects=5).body == b"end of chain"
    six = fetch(server.url("t/chain/6"), max_redirects=5)
    assert (six.error, six.http_status, six.attempts) == ("too_many_redirects", 302, 1)
    assert fetch(server.url("t/redirect"), max_redirects=0).error == "too_many_redirects"


def test_redirect_to_a_non_http_url_is_invalid(served):
    server, _ = served
    got = fetch(server.url("t/to?url=file:///etc/passwd"))
    assert (got.error, got.http_status) == ("invalid_url", 302)


def test_gzip_bomb_is_cut_at_max_bytes_after_decompression(served):
    server, _ = served
    assert len(BOMB) < 100_000
    got = fetch(server.url("t/gzip-bomb"), max_bytes=100_000)
    assert (got.error, got.body) == ("too_large", None)


def test_content_type_is_not_trusted(served):
    """An HTML error page labelled image/jpeg comes back as bytes; the decoder sniffs the magic
    bytes and sees no image (the downloader never looks at Content-Type)."""
    server, _ = served
    got = fetch(server.url("html-as-jpeg"))
    assert got.ok and got.body.startswith(b"<!doctype html>")
    assert sniff_format(got.body) is None
    assert sniff_format(IMAGE[:0] + b"\xff\xd8\xff\xe0") == "jpeg"


# --- blocklists ------------------------------------------------------------------------------


def test_url_blocklist_by_url_sha256_and_md5(served, tmp_path):
    server, _ = served
    urls = [server.url(f"t/status/200/bl{i}") for i in range(4)]
    blocklist = tmp_path / "urls.txt"
    blocklist.write_text("# opted-out URLs\n\n"
                         f"{urls[0]}\n"
                         f"{hashlib.sha256(urls[1].encode()).hexdigest()}\n"
                         f"  {hashlib.md5(urls[2].encode()).hexdigest().upper()}  \n")
    results = fetch_many(urls, workers=4, url_blocklist=str(blocklist))
    for i in range(3):
        assert (results[i].error, results[i].attempts, results[i].http_status) == ("blocked", 0, None)
        assert "--url-blocklist" in results[i].error_detail
        assert served[1].hits[f"/t/status/200/bl{i}"] == 0
    assert results[3].ok


def test_url_blocklist_applies_to_redirect_targets(served, tmp_path):
    server, _ = served
    blocklist = tmp_path / "urls.txt"
    blocklist.write_text(server.url("image.jpg") + "\n")
    before = server.hits["/image.jpg"]
    got = fetch(server.url("t/redirect"), url_blocklist=str(blocklist))
    assert (got.error, got.http_status, got.attempts) == ("blocked", 302, 1)
    assert server.hits["/image.jpg"] == before


def test_url_blocklist_lines_match_in_any_case_of_scheme_and_host(served, tmp_path):
    """A URL line is entered as written and in the normalised form (yarl's) that the input URL is
    checked in too, so `HTTP://Example.COM/x.jpg` on the list blocks `http://example.com/x.jpg` and
    the other way round; a hex line is the digest of one exact URL and matches only that one."""
    server, routes = served
    upper = server.url("").replace("http://", "HTTP://", 1)  # HTTP://127.0.0.1:PORT/
    urls = [server.url(f"t/status/200/blcase{i}") for i in range(4)]
    blocklist = tmp_path / "urls.txt"
    blocklist.write_text(f"{upper}t/status/200/blcase0\n"
                         f"{upper}t/./status/200/blcase1\n"  # and a dot segment yarl removes
                         f"{hashlib.sha256((upper + 't/status/200/blcase2').encode()).hexdigest()}\n"
                         f"{upper}image.jpg\n")
    results = fetch_many(urls, workers=4, url_blocklist=str(blocklist))
    assert [r.error for r in results[:2]] == ["blocked", "blocked"]
    assert [routes.hits[f"/t/status/200/blcase{i}"] for i in range(4)] == [0, 0, 1, 1]
    assert results[2].ok and results[3].ok  # the digest of the upper-case form: that URL only
    before = server.hits["/image.jpg"]
    got = fetch(server.url("t/redirect"), url_blocklist=str(blocklist))  # to /image.jpg
    assert (got.error, got.http_status) == ("blocked", 302) and server.hits["/image.jpg"] == before

    # host case, both ways, checked as the downloader checks an input URL (as given, and yarl's form)
    def blocked(line: str, url: str) -> bool:
        path = tmp_path / "host.txt"
        path.write_text(line + "\n")
        return Blocklists.from_config(DownloadConfig(url_blocklist=str(path))).url_blocked(url, str(URL(url))) is not None

    assert blocked("HTTPS://Example.COM/A.jpg", "https://example.com/A.jpg")
    assert blocked("https://example.com/A.jpg", "HTTPS://EXAMPLE.com/A.jpg")
    assert blocked("http://Example.COM:80/A.jpg", "http://example.com/A.jpg")
    assert not blocked("https://example.com/A.jpg", "https://example.com/a.jpg")  # the path's case counts
    assert not blocked(hashlib.md5(b"HTTPS://Example.COM/A.jpg").hexdigest(), "https://example.com/A.jpg")
    assert blocked(hashlib.md5(b"HTTPS://Example.COM/A.jpg").hexdigest(), "HTTPS://Example.COM/A.jpg")


def test_url_blocklist_lines_match_an_ipv4_address_however_it_is_written(served, tmp_path):
    """A URL is checked as written and as requested (`http://0x7f.1/` at `http://127.0.0.1/`),
    input URL and redirect target alike. (The stub resolver answers 0x7f.1 as a name, as
    getaddrinfo does: so the URLs were fetched before.)"""
    server, routes = served
    odd = f"http://0x7f.1:{server.port}/t/status/200/"
    blocklist = tmp_path / "urls.txt"
    blocklist.write_text(server.url("t/status/200/blodd0") + "\n" + server.url("t/status/200/blodd1") + "\n"
                         + f"{odd}blodd2\n")
    resolver = StubResolver({"0x7f.1": ["127.0.0.1"]})
    results = fetch_many([f"{odd}blodd0", server.url(f"t/to?url={odd}blodd1"), f"{odd}blodd2"], workers=1,
                         url_blocklist=str(blocklist), downloader_args={"resolver": resolver})
    assert [(r.error, r.http_status) for r in results] == [("blocked", None), ("blocked", 302), ("blocked", None)]
    assert [routes.hits[f"/t/status/200/blodd{i}"] for i in range(3)] == [0, 0, 0]
    assert not resolver.calls


def test_url_blocklist_fast_path_writes_urls_as_yarl_does():
    """The URLs `_normal_url` takes as normalised without asking yarl (most lines of a real list)
    are those yarl writes back unchanged: generated ones near the edges (dot segments, bare
    hosts, odd hosts, queries), and the forms that do change go through yarl."""
    import random

    from fastlaion.download import _NORMAL_URL, _normal_url

    rng = random.Random(0)
    urls = ["http://a/.", "http://a/x/..?q", "http://a/.x", "http://a/x?..", "http://./x", "http://0x7f.1/x",
            "http://123/x", "http://a", "http://a/", "http://a.com./x", "http://a//x", "http://a/x?q=/../"]
    for _ in range(20000):
        url = rng.choice(["http://", "https://"]) + "".join(rng.choices("a0.-x9", k=rng.randint(1, 6)))
        if rng.random() < 0.9:
            url += "/" + "".join(rng.choices("aZ0._~/-..", k=rng.randint(0, 8)))
            if rng.random() < 0.3:
                url += "?" + "".join(rng.choices("a0=&/.-_~Z", k=rng.randint(1, 5)))
        urls.append(url)
    fast = [u for u in urls if _NORMAL_URL.fullmatch(u)]
    assert len(fast) > 10000
    assert [str(URL(u)) for u in fast] == fast
    assert _normal_url("HTTP://Example.COM:80/a/./B.jpg?q=%41") == "http://example.com/a/B.jpg?q=A"
    assert _normal_url("http://[bad/x") == "http://[bad/x"  # yarl cannot parse it: as written


@pytest.mark.parametrize("digest", [hashlib.sha256, hashlib.md5])
def test_image_blocklist(served, tmp_path, digest):
    server, _ = served
    blocklist = tmp_path / "images.txt"
    blocklist.write_text(digest(IMAGE).hexdigest() + "\n")
    got = fetch(server.url("image.jpg"), image_blocklist=str(blocklist))
    assert (got.error, got.body, got.http_status, got.attempts) == ("blocked", None, 200, 1)
    assert "--image-blocklist" in got.error_detail
    assert fetch(server.url("exact"), image_blocklist=str(blocklist)).ok


def test_blocklist_files_are_checked_and_named(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="--url-blocklist .*nope.txt"):
        DownloadConfig(url_blocklist=missing).validate()
    with pytest.raises(ConfigError, match="--image-blocklist .*nope.txt"):
        Downloader(DownloadConfig(image_blocklist=missing))
    with pytest.raises(ConfigError, match="--image-blocklist"):
        DownloadConfig(image_blocklist=str(tmp_path)).validate()  # a folder
    bad = tmp_path / "bad.txt"
    bad.write_text("0" * 64 + "\nhttp://example.com/a.jpg\n")
    with pytest.raises(ConfigError, match=r"bad.txt, line 2: not an MD5/SHA-256"):
        Blocklists.from_config(DownloadConfig(image_blocklist=str(bad)))
    assert Blocklists.from_config(DownloadConfig(url_blocklist=str(bad))).url_blocked("http://example.com/a.jpg")


def test_digest_tables_answer_as_a_set_does():
    """The sorted digest arrays against a Python set, with digests ending in NUL bytes (which
    numpy's byte strings read back without) and neighbours that differ only there."""
    import random

    from fastlaion.download import _has_digest, _sorted_digests

    rng = random.Random(0)
    listed = [rng.randbytes(32) for _ in range(2000)] + [b"\x07" * 31 + b"\x00", b"\x07" * 30 + b"\x00\x00",
                                                        bytes(32), b"\x05" * 32]
    table = _sorted_digests(listed + listed[:100], 32)  # duplicates are stored once
    assert len(table) == len(set(listed))
    probes = listed + [rng.randbytes(32) for _ in range(2000)] + [
        b"\x07" * 31 + b"\x01", b"\x07" * 32, b"\x07" * 29 + b"\x00" * 3, b"\x00" * 31 + b"\x01", b"\xff" * 32]
    assert [_has_digest(table, p) for p in probes] == [p in set(listed) for p in probes]
    assert not _has_digest(_sorted_digests([], 32), b"\x05" * 32)


def test_blocklists_are_read_once_per_process(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://example.com/a.jpg\n")
    cfg = DownloadConfig(url_blocklist=str(path))
    assert Blocklists.from_config(cfg).urls is Blocklists.from_config(cfg).urls
    path.write_text("http://example.com/b.jpg\nhttp://example.com/c.jpg\n")  # changed: read again
    assert len(Blocklists.from_config(cfg).urls) == 2


# --- configuration ---------------------------------------------------------------------------


def test_every_reason_is_listed_once():
    assert len(set(REASONS)) == len(REASONS)
    assert {"connect_timeout", "header_timeout", "read_timeout", "deadline", "opt_out", "blocked",
            "private_address", "robots_disallowed", "robots_unreachable"} <= set(REASONS)


@pytest.mark.parametrize("field, value, message", [
    ("connect_timeout_s", 0, "--connect-timeout must be positive"),
    ("read_timeout_s", -1, "--read-timeout must be positive"),
    ("per_host", 0, "--per-host must be at least 1"),
    ("per_host_rate", -0.5, "--per-host-rate must be 0 or more"),
    ("max_crawl_delay_s", -1, "--max-crawl-delay must be 0 or more"),
    ("max_redirects", -1, "--max-redirects must be between"),
    ("opt_out_tags", ("noai", "no ai"), "--opt-out-tags"),
    ("user_agent", "bot\r\nX-Evil: 1", "--user-agent"),
])
def test_download_config_is_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DownloadConfig(**{field: value}).validate()


def test_host_slots_are_given_back_by_requests_cancelled_while_waiting_or_holding():
    """_HostGates: a request cancelled while it waits for a host's slot, while it sleeps out the
    host's rate, or while it holds the slot gives the slot back; once no request of the host is
    left (and its rate window is over) the host's gate is gone, and a new request takes a slot
    at once."""
    from fastlaion.download import _HostGates

    async def go() -> None:
        gates = _HostGates(per_host=1, rate=0.0)
        holding = asyncio.Event()

        async def hold(interval: float = 0.0) -> None:
            async with gates.slot("h", interval):
                holding.set()
                await asyncio.sleep(3600)

        holder = asyncio.ensure_future(hold())
        await asyncio.wait_for(holding.wait(), 5)
        assert not gates.has_room("h", asyncio.get_running_loop().time())
        waiter = asyncio.ensure_future(hold())  # waits for the one slot
        await asyncio.sleep(0.01)
        waiter.cancel()
        holder.cancel()
        await asyncio.gather(holder, waiter, return_exceptions=True)
        assert gates._gates == {}
        # one in its rate window's sleep: the slot is its own then, and given back when cancelled
        async with gates.slot("h", 0.05):
            pass
        holding.clear()
        sleeper = asyncio.ensure_future(hold(0.05))
        await asyncio.sleep(0.01)
        assert not holding.is_set()  # still sleeping out the rate
        sleeper.cancel()
        await asyncio.gather(sleeper, return_exceptions=True)
        await asyncio.sleep(0.1)  # past the window it reserved
        slot = gates.slot("h")
        await asyncio.wait_for(slot.__aenter__(), 0.5)  # free: a leaked slot would never come
        assert gates._gates["h"].users == 1
        await slot.__aexit__(None, None, None)
        assert gates._gates == {}

    run(go())


def test_the_watchdog_keeps_each_deadline_late_by_at_most_a_tick_and_never_early():
    """_Watchdog: one timer for every request's deadline. Each block is cut with TimeoutError no
    sooner than its deadline and at most a tick (plus scheduling) later; blocks that end in time
    are left alone; a cancellation from outside stays a CancelledError, even when the deadline
    passed too (as asyncio.timeout); the timer stops once nothing is watched."""
    from fastlaion.download import DEADLINE_TICK_S, _Watchdog

    async def go() -> None:
        dog = _Watchdog()
        loop = asyncio.get_running_loop()

        async def block(seconds: float, sleep: float) -> tuple[str, float]:
            start = loop.time()
            try:
                async with dog(seconds):
                    await asyncio.sleep(sleep)
            except TimeoutError:
                return "timeout", loop.time() - start
            return "done", loop.time() - start

        plan = [(0.1, 5), (0.2, 5), (0.3, 0.05), (0.15, 5), (0.4, 0.25)]
        got = await asyncio.gather(*(block(s, z) for s, z in plan))
        for (seconds, sleep), (what, took) in zip(plan, got):
            if sleep < seconds:
                assert what == "done" and took < seconds, (seconds, sleep, what, took)
            else:
                # (1e-6: the float subtraction of the loop's clock readings)
                assert what == "timeout" and seconds - 1e-6 <= took < seconds + DEADLINE_TICK_S + 0.1, (seconds, what, took)
        await asyncio.sleep(2 * DEADLINE_TICK_S)
        assert dog._handle is None and not dog._watched

        # cancelled from outside before its deadline, or at the moment the deadline cuts it (both
        # cancellations pending at once): CancelledError either way
        for at_the_deadline in (False, True):
            task = asyncio.ensure_future(block(10, 5))
            await asyncio.sleep(0.02)
            if at_the_deadline:
                (deadline,) = dog._watched
                deadline.expires = 0.0
                dog._check(loop)
                assert deadline.expired
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # a task whose deadline fired and which goes on afterwards is not cancelled again later
        async def after() -> str:
            what, _ = await block(0.05, 5)
            await asyncio.sleep(3 * DEADLINE_TICK_S)  # a leftover cancellation would land here
            return what
        assert await after() == "timeout"
        assert asyncio.current_task().cancelling() == 0
        dog.close()

    run(go())


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with openssl (Makefile's system-deps)."""
    import subprocess

    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=fastlaion-test", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_downloads_verify_the_certificate_and_a_bad_one_is_a_tls_error_row(tmp_path):
    """A real `fastlaion run` over HTTPS from a loopback server, ten URLs: with its certificate
    trusted (SSL_CERT_FILE, as a system's store would) the images are kept; untrusted, each row
    is dropped as tls_error, once (not retried: it would fail the same), the run ends 0, nothing
    is downloaded unverified, and the closing lines say what a machine without CA certificates
    should do, and that the HTTPS_PROXY set is not used (it is never contacted either way)."""
    import ssl
    import subprocess

    from test_dataset_helpers import command_line

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    jpeg = encode(__import__("skimage.data").data.chelsea())
    with LoopbackServer({"a.jpg": Served(jpeg, "image/jpeg")}, ssl_context=context) as server:
        assert server.url("a.jpg").startswith("https://127.0.0.1:")
        (tmp_path / "in.txt").write_text("".join(server.url(f"a.jpg?n={i}") + "\n" for i in range(10)))
        results, said = {}, {}
        for trusted in (True, False):
            env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
            env["HTTPS_PROXY"] = "http://127.0.0.1:9"  # a proxy fastlaion must not use
            if trusted:
                env["SSL_CERT_FILE"] = str(cert)
            out = tmp_path / f"out-{trusted}"
            done = subprocess.run([*command_line(), "run", str(tmp_path / "in.txt"), "-o", str(out), "--no-score",
                                   "--no-progress", "--allow-private-networks", "--retries", "2"],
                                  capture_output=True, text=True, timeout=120, env=env)
            assert done.returncode == 0, done.stderr
            results[trusted] = pq.read_table(out / "00000.parquet").to_pylist()
            said[trusted] = done.stdout
        hits = server.hits["/a.jpg"]
    assert [(r["status"], r["reason"]) for r in results[True]] == [("kept", None)] * 10
    assert "tls_error" not in said[True] and "proxy" not in said[True]
    for row in results[False]:
        assert (row["status"], row["stage"], row["reason"], row["attempts"]) == ("dropped", "download", "tls_error", 1)
        assert "CERTIFICATE_VERIFY_FAILED" in row["error"], row
    assert hits == 10  # the untrusted run's handshakes failed: none of its requests reached the handler
    lines = said[False].splitlines()
    assert any(x.startswith("10 of 10 rows failed TLS verification (tls_error)") and "ca-certificates" in x
               for x in lines), said[False]
    assert any(x.startswith("nothing was downloaded, and HTTPS_PROXY is set") for x in lines), said[False]


@pytest.mark.parametrize("host", ["xn--a.example", "XN--ZZ.example", "xn--72czcrhaj7cpt0ed1dxb4mb1s1.blogspot.com"])
def test_an_ascii_host_whose_xn_labels_uts46_refuses_is_fetched_as_written(served, host):
    """Extraction keeps an ASCII host whatever its "xn--" labels decode to (whatwg/url#914, as
    Chromium does); the download asks the resolver for it in lower case and sends that as the
    Host header (yarl's URL.host, which decodes punycode, raises on such a label: nothing here
    may go through it). The stub resolver plays DNS, answering 127.0.0.1."""
    server, routes = served
    token = f"xn-{host[:12].lower()}"
    resolver = StubResolver({host.lower(): ["127.0.0.1"]})
    got = fetch(f"http://{host}:{server.port}/t/host-seen/{token}", allow_private_networks=True,
                downloader_args={"resolver": resolver})
    assert (got.error, got.http_status, got.body == IMAGE) == (None, 200, True), got
    assert routes.hosts_seen[token] == [f"{host.lower()}:{server.port}"]
    assert dict(resolver.calls) == {host.lower(): 1}
