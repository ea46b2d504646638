"""Download stage: fetch image URLs over HTTP with bounded concurrency, memory and time.

The shape is the 500-lines asyncio crawler's: `download_all` runs a fixed number of worker
coroutines that pull (key, url) pairs from a bounded queue, so memory stays flat however long the
input is. Each URL ends as one immutable `Fetched` record: the body, or a short reason code the
pipeline counts and writes beside the row. Expected failures (404, timeout, refused, too large)
are reasons, never exceptions; only `aiohttp.ClientError` and timeouts are caught, so a bug raises.

Reason codes (`Fetched.error`):
    invalid_url         not an http(s) URL with a host, or rejected by aiohttp (also redirects to one)
    http_<status>       the server answered with status >= 400, e.g. http_404 (429 and 5xx retried)
    timeout             no complete answer within `timeout_s` (connect + headers + body) (retried)
    connection_error    refused, reset, disconnected before answering (retried)
    payload_error       the body was cut short or malformed (retried)
    too_large           Content-Length or the bytes read exceed `max_bytes`
    too_many_redirects  more than `MAX_REDIRECTS` redirects
    client_error        any other aiohttp.ClientError (e.g. a malformed response)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import aiohttp.connector
from yarl import URL

from fastlaion.config import DownloadConfig

MAX_REDIRECTS = 10  # redirects followed; the 11th is too_many_redirects
CHUNK_BYTES = 64 * 1024
DNS_CACHE_TTL_S = 300  # image hosts repeat a lot in web-scale URL lists
MAX_DETAIL_CHARS = 200

# aiohttp warns that the flag is useless on Pythons whose SSL transports close themselves.
_CLEANUP_CLOSED = getattr(aiohttp.connector, "NEEDS_CLEANUP_CLOSED", True)
# aiohttp >= 3.10 reports a non-http(s) URL (given or redirected to) with its own class.
_NON_HTTP_URL = getattr(aiohttp, "NonHttpUrlClientError", aiohttp.InvalidURL)
_TRANSIENT = frozenset({"timeout", "connection_error", "payload_error", "http_429"})


@dataclass(frozen=True, slots=True)
class Fetched:
    """The outcome of one URL: a body, or the reason there is none."""

    body: bytes | None  # the full body on success, None on failure
    http_status: int | None  # last HTTP status seen, None if no response
    error: str | None  # None on success, else a reason code (module docstring)
    error_detail: str | None  # human-readable message, at most MAX_DETAIL_CHARS
    attempts: int  # attempts made (1 + retries used); 0 for an invalid URL
    elapsed_s: float  # wall time over all attempts and backoff sleeps

    @property
    def ok(self) -> bool:
        return self.error is None


def validate_url(url: str | None) -> str | None:
    """Return None if `url` is a downloadable http(s) URL, else the reason 'invalid_url'.

    Surrounding whitespace is ignored (`Downloader.fetch` strips it too).

    >>> validate_url("https://example.com/a.jpg") is None
    True
    >>> validate_url("data:image/png;base64,AAAA")
    'invalid_url'
    """
    if not isinstance(url, str) or not url.strip():
        return "invalid_url"
    try:
        parsed = URL(url.strip())
        host = parsed.raw_host  # IDNA-encodes, which can fail
        parsed.port  # noqa: B018 -- raises on an out-of-range port
    except ValueError:  # UnicodeError is a ValueError
        return "invalid_url"
    if parsed.scheme not in ("http", "https") or not host or any(c.isspace() for c in host):
        return "invalid_url"
    return None


def is_transient(error: str | None) -> bool:
    """Whether a failure with this reason may succeed if tried again."""
    return error is not None and (error in _TRANSIENT or error.startswith("http_5"))


@dataclass(frozen=True, slots=True)
class _Attempt:
    body: bytes | None
    http_status: int | None
    error: str | None
    error_detail: str | None


def _detail(exc: BaseException) -> str:
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:MAX_DETAIL_CHARS]


class Downloader:
    """One aiohttp session with its connection pool; use as `async with Downloader(cfg) as d`.

    The session is made in `__aenter__`, so the object must be entered inside a running loop.
    """

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Downloader:
        connector = aiohttp.TCPConnector(limit=self.cfg.workers, ttl_dns_cache=DNS_CACHE_TTL_S,
                                         enable_cleanup_closed=_CLEANUP_CLOSED)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            headers={"User-Agent": self.cfg.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),  # a crawler keeps no state between URLs
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> Fetched:
        """Download `url`, retrying transient failures `cfg.retries` times with backoff."""
        start = time.perf_counter()
        if validate_url(url) is not None:
            return Fetched(None, None, "invalid_url", f"not an http(s) URL: {url!r}"[:MAX_DETAIL_CHARS],
                           0, 0.0)
        url = url.strip()
        attempts = 0
        while True:
            attempts += 1
            outcome = await self._attempt(url)
            if not is_transient(outcome.error) or attempts > self.cfg.retries:
                return Fetched(outcome.body, outcome.http_status, outcome.error, outcome.error_detail,
                               attempts, time.perf_counter() - start)
            await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempts - 1))

    async def _attempt(self, url: str) -> _Attempt:
        if self._session is None:
            raise RuntimeError("Downloader.fetch called outside `async with Downloader(cfg)`")
        status: int | None = None
        try:
            # aiohttp's total timeout should cover the body too; the outer deadline makes sure,
            # so a server trickling bytes forever cannot hold a worker past timeout_s.
            async with _deadline(self.cfg.timeout_s):
                # aiohttp counts responses, not redirects followed: 11 lets 10 redirects through.
                async with self._session.get(url, max_redirects=MAX_REDIRECTS + 1) as resp:
                    status = resp.status
                    if status >= 400:
                        return _Attempt(None, status, f"http_{status}", f"{status} {resp.reason}")
                    return await self._read_body(resp)
        except (asyncio.TimeoutError, TimeoutError):  # before ClientError: ServerTimeoutError is both
            return _Attempt(None, status, "timeout", f"no complete answer within {self.cfg.timeout_s} s")
        except aiohttp.TooManyRedirects as exc:
            last = exc.history[-1].status if exc.history else None
            return _Attempt(None, last, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects")
        except aiohttp.ClientPayloadError as exc:
            return _Attempt(None, status, "payload_error", _detail(exc))
        except aiohttp.ClientConnectionError as exc:
            return _Attempt(None, status, "connection_error", _detail(exc))
        except (aiohttp.InvalidURL, _NON_HTTP_URL) as exc:
            return _Attempt(None, status, "invalid_url", _detail(exc))
        except aiohttp.ClientError as exc:
            # Not exc.status: for a malformed response aiohttp makes up a 400 of its own.
            return _Attempt(None, status, "client_error", _detail(exc))

    async def _read_body(self, resp: aiohttp.ClientResponse) -> _Attempt:
        cap = self.cfg.max_bytes
        if resp.content_length is not None and resp.content_length > cap:
            return _Attempt(None, resp.status, "too_large",
                            f"Content-Length {resp.content_length} > max_bytes {cap}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            size += len(chunk)
            if size > cap:  # leaving the `async with` drops the connection mid-body
                return _Attempt(None, resp.status, "too_large", f"body over max_bytes {cap}")
            chunks.append(chunk)
        return _Attempt(b"".join(chunks), resp.status, None, None)


@asynccontextmanager
async def _deadline_fallback(seconds: float) -> AsyncIterator[None]:
    """What `asyncio.timeout` does, for Python 3.10: cancel the task at the deadline, raise TimeoutError."""
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        yield
    except asyncio.CancelledError:
        if expired:
            raise asyncio.TimeoutError from None
        raise
    finally:
        handle.cancel()


_deadline = getattr(asyncio, "timeout", _deadline_fallback)


async def download_all(downloader: Downloader, items: Iterable[tuple[int, str]], workers: int,
                       on_result: Callable[[int, Fetched], Awaitable[None]]) -> None:
    """Fetch every (key, url) with `workers` coroutines and await `on_result(key, fetched)` for each.

    A producer feeds a queue of at most 2 * workers items; since `on_result` is awaited inside
    the worker, at most `workers` bodies are alive at once. Invalid URLs are not requested (they
    get `Fetched(error='invalid_url', attempts=0)`). Results arrive in completion order, each key
    exactly once. If `on_result` (or `items`) raises, the other workers are cancelled and the
    exception propagates.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(maxsize=2 * workers)

    async def produce() -> None:
        for item in items:
            await queue.put(item)
        for _ in range(workers):
            await queue.put(None)  # one stop sign per worker

    async def work() -> None:
        while (item := await queue.get()) is not None:
            key, url = item
            await on_result(key, await downloader.fetch(url))

    tasks = [asyncio.ensure_future(produce())] + [asyncio.ensure_future(work()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when uvloop is importable (faster sockets), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


