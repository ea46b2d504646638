"""Download stage: fetch image URLs over HTTP with bounded concurrency, memory and time.

The shape is the 500-lines asyncio crawler's: `download_all` runs a fixed number of worker
coroutines that pull (key, url) pairs from a bounded look-ahead window (preferring hosts with a
free slot), so memory stays flat however long the input is. Each URL ends as one immutable `Fetched` record: the body, or a short reason code the
pipeline counts and writes beside the row. Expected failures (404, timeout, refused, too large)
are reasons, never exceptions; only `aiohttp.ClientError` and timeouts are caught, so a bug raises.

What a request goes through, in order (each refusal is a reason, never an exception):

1. the URL must be http(s) with a host (`invalid_url`) and not on the URL blocklist (`blocked`);
2. a literal IP host must be a public address (`private_address`), unless
   `allow_private_networks`; host names are checked after DNS, by `GuardedResolver`. An IPv4
   address in another spelling than dotted decimal (`0x7f.1`, `2130706433`, `127.1`,
   `127.0.0.1.`) is read as browsers read it (`literal_ip`), and requested as they request it:
   at `127.0.0.1`, which is also its host for steps 3 and 4 (`request_url`);
3. with `respect_robots`, the origin's robots.txt (fetched once, shared by all waiters) must
   allow the URL for our user agent (`robots_disallowed`);
4. a per-host slot: at most `per_host` requests in flight and, with `per_host_rate` or a
   robots.txt Crawl-delay, request starts spaced apart (waiting here is not counted against any
   timeout);
5. the request, bounded four ways: connect, silence before the headers and between body chunks
   (`read_timeout_s`), and a total `timeout_s` over all redirect hops. Redirects are followed
   here, not by aiohttp, so that steps 1-4 run again for every hop;
6. the response headers: X-Robots-Tag opt-out directives drop the row before a byte of the body
   is read (`opt_out`); a Content-Length over `max_bytes` drops it too (`too_large`);
7. the body, counted as it arrives (`too_large` also without a Content-Length, and after
   decompression), then checked against the image blocklist (`blocked`).

Reason codes (`Fetched.error`); "retried" marks the transient ones (`is_transient`):
    invalid_url         not an http(s) URL with a host, or rejected by aiohttp (also redirects to one)
    blocked             the URL (or a redirect target) is on --url-blocklist, or the body's hash is
                        on --image-blocklist
    private_address     the host is, or resolves only to, a private, loopback, link-local,
                        multicast, reserved or unspecified address (`is_public_address`)
    robots_disallowed   robots.txt disallows the URL for our user agent, or its Crawl-delay is
                        over `max_crawl_delay_s`. A robots.txt answering 4xx allows everything.
    robots_unreachable  robots.txt could not be fetched (5xx, 429, timeout, refused: RFC 9309's
                        "unreachable", which means complete disallow); the verdict holds for the
                        run, so it is retried by --retry-failed only, not within the run
    opt_out             X-Robots-Tag carries one of `opt_out_tags` (see `opt_out_directive`)
    http_<status>       the server answered with status >= 400, e.g. http_404 (429 and 5xx retried).
                        A 429 or 503 with Retry-After is retried no sooner than it asks, and no
                        request to its host starts before then; one asking for more than
                        `max_crawl_delay_s` is not retried in this run, and the host's other URLs
                        get the same answer without a request until that time (--retry-failed
                        downloads them again)
    connect_timeout     no connection (DNS + TCP + TLS) within `connect_timeout_s` (retried)
    header_timeout      connected, but no response headers within `read_timeout_s` (retried)
    read_timeout        the body stalled: no bytes for `read_timeout_s` (retried)
    deadline            no complete answer within `timeout_s`, e.g. a body trickling in; also a
                        connect or read timeout that ends as `timeout_s` does (retried)
    connection_error    refused, reset, disconnected before answering, DNS failure (retried)
    tls_error           the TLS handshake failed: a certificate that does not verify (expired,
                        self-signed, another host's) or no protocol both sides speak (not retried)
    payload_error       the body was cut short or malformed (retried)
    too_large           Content-Length or the bytes read exceed `max_bytes`
    too_many_redirects  more than `max_redirects` redirects
    client_error        any other aiohttp.ClientError (e.g. a malformed response)
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import os
import re
import socket
import time
import urllib.parse
import urllib.robotparser
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp.connector
import numpy as np
from aiohttp.abc import AbstractResolver
from yarl import URL

from fastlaion.config import ConfigError, DownloadConfig
from fastlaion.ipv4 import MAY_END_IN_NUMBER, ends_in_number, ipv4_number
from fastlaion.robots_tag import agent_token, opt_out_directive

if TYPE_CHECKING:
    from aiohttp.abc import ResolveResult

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
DNS_CACHE_TTL_S = 300  # image hosts repeat a lot in web-scale URL lists
MAX_DETAIL_CHARS = 200
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 asks crawlers to parse at least 500 KiB; the rest is ignored
ROBOTS_CACHE_ORIGINS = 20_000  # robots.txt verdicts kept per downloader, least recently used dropped
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Agent names whose X-Robots-Tag directives apply to us besides our own user agent's: sites
# addressed their AI opt-outs to img2dataset, the tool fastlaion replaces.
OPT_OUT_AGENTS = ("img2dataset",)

# Reason codes (module docstring); http_<status> comes on top of these.
INVALID_URL = "invalid_url"
BLOCKED = "blocked"
PRIVATE_ADDRESS = "private_address"
ROBOTS_DISALLOWED = "robots_disallowed"
ROBOTS_UNREACHABLE = "robots_unreachable"
OPT_OUT = "opt_out"
CONNECT_TIMEOUT = "connect_timeout"
HEADER_TIMEOUT = "header_timeout"
READ_TIMEOUT = "read_timeout"
DEADLINE = "deadline"
CONNECTION_ERROR = "connection_error"
PAYLOAD_ERROR = "payload_error"
TOO_LARGE = "too_large"
TOO_MANY_REDIRECTS = "too_many_redirects"
CLIENT_ERROR = "client_error"
TLS_ERROR = "tls_error"
REASONS = (INVALID_URL, BLOCKED, PRIVATE_ADDRESS, ROBOTS_DISALLOWED, ROBOTS_UNREACHABLE, OPT_OUT,
           CONNECT_TIMEOUT, HEADER_TIMEOUT, READ_TIMEOUT, DEADLINE, CONNECTION_ERROR, TLS_ERROR, PAYLOAD_ERROR,
           TOO_LARGE, TOO_MANY_REDIRECTS, CLIENT_ERROR)
_TRANSIENT = frozenset({CONNECT_TIMEOUT, HEADER_TIMEOUT, READ_TIMEOUT, DEADLINE, CONNECTION_ERROR,
                        PAYLOAD_ERROR, ROBOTS_UNREACHABLE, "http_429"})

# aiohttp warns that the flag is useless on Pythons whose SSL transports close themselves.
_CLEANUP_CLOSED = getattr(aiohttp.connector, "NEEDS_CLEANUP_CLOSED", True)
# aiohttp >= 3.10 reports a non-http(s) URL (given or redirected to) with its own class.
_NON_HTTP_URL = getattr(aiohttp, "NonHttpUrlClientError", aiohttp.InvalidURL)


class _NeverRaised(Exception):
    pass


# aiohttp >= 3.10 tells a connect timeout from a read timeout by class; 3.9 only by message.
_CONNECT_TIMEOUT_ERROR = getattr(aiohttp, "ConnectionTimeoutError", _NeverRaised)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Fetched:
    """The outcome of one URL: a body, or the reason there is none."""

    body: bytes | None  # the full body on success, None on failure
    http_status: int | None  # last HTTP status seen, None if no response
    error: str | None  # None on success, else a reason code (module docstring)
    error_detail: str | None  # human-readable message, at most MAX_DETAIL_CHARS
    # attempts made (1 + retries used); 0 when refused before any request to the URL was sent
    # (invalid_url, blocked, private_address of a literal IP, robots_disallowed, robots_unreachable)
    attempts: int
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
        return INVALID_URL
    try:
        return _url_reason(URL(url.strip()))
    except ValueError:  # UnicodeError is a ValueError
        return INVALID_URL


def _url_reason(parsed: URL) -> str | None:
    host = parsed.raw_host  # IDNA-encodes, which can fail (ValueError)
    port = parsed.port  # raises on an out-of-range port
    if parsed.scheme not in ("http", "https") or not host or any(c.isspace() for c in host):
        return INVALID_URL
    if port == 0:  # names no server: a connect to it fails as connection_error, retried as transient
        return INVALID_URL
    if _numeric_non_address(host):
        return INVALID_URL
    return None


def _numeric_non_address(host: str) -> bool:
    """Whether `host` ends in a number (or is digits and dots only) but is no IP address: no
    host to browsers (WHATWG's IPv4 parser fails: `1.2.3.4.5`, `999.1.1.1`, `0x100000000`).
    Refused rather than asked of DNS: aiohttp takes a host of digits and dots for an address
    and hands it to getaddrinfo itself, past `GuardedResolver` (3.14 refuses one that is not
    dotted-quad first; not every version the project allows does)."""
    if not (ends_in_number(host) or (host[-1] in MAY_END_IN_NUMBER and host.replace(".", "").isdigit())):
        return False
    return literal_ip(host) is None


def is_transient(error: str | None) -> bool:
    """Whether a failure with this reason may succeed if tried again."""
    return error is not None and (error in _TRANSIENT or error.startswith("http_5"))


# --- safety: which addresses a crawler may connect to ---------------------------------------

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_address(ip: IPAddress) -> bool:
    """Whether `ip` is a global unicast address, safe for a crawler to connect to.

    Refuses private, loopback, link-local (169.254.169.254, the cloud metadata service),
    multicast, reserved and unspecified addresses, shared address space (100.64/10), and IPv6
    addresses that embed a refused IPv4 one (IPv4-mapped, 6to4, NAT64).

    >>> is_public_address(ipaddress.ip_address("93.184.216.34"))
    True
    >>> [is_public_address(ipaddress.ip_address(a)) for a in ("10.0.0.1", "169.254.169.254", "::1")]
    [False, False, False]
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
        if ip.ipv4_mapped is not None:
            return True
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")


def literal_ip(host: str) -> IPAddress | None:
    """The address a URL's host names literally, or None for a host name.

    Also reads the legacy IPv4 forms that WHATWG's URL parser (browsers: `ipv4.ipv4_number`)
    and `inet_aton` (and so `getaddrinfo`) accept, so that `http://2130706433/`,
    `http://0x7f.1/` or `http://127.0.0.1./` cannot pass for a host name.

    >>> literal_ip("2130706433"), literal_ip("::1"), literal_ip("example.com")
    (IPv4Address('127.0.0.1'), IPv6Address('::1'), None)
    >>> literal_ip("0x7f.1."), literal_ip("1.2.3.4.5")
    (IPv4Address('127.0.0.1'), None)
    """
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if "%" in host:  # browsers percent-decode a host first: `%31%32%37.1` is 127.0.0.1 to them
        host = urllib.parse.unquote(host)
    if ends_in_number(host) and (number := ipv4_number(host)) is not None:
        return ipaddress.IPv4Address(number)
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _dotted_host(host: str) -> str | None:
    """The address `host` names in dotted decimal, where it is an IPv4 address written otherwise
    (as `literal_ip` reads it); None for any other host."""
    if host[-1:] not in MAY_END_IN_NUMBER:  # most host names: no address ends in their letter
        return None
    ip = literal_ip(host)
    if isinstance(ip, ipaddress.IPv4Address) and (address := str(ip)) != host:
        return address
    return None


def request_url(target: URL) -> URL:
    """`target` as a browser requests it: a host that is an IPv4 address written otherwise than
    in dotted decimal replaced by that address, the port, path and query kept. WHATWG's URL
    parser rewrites the host so before the request, which then goes to that address with it in
    the Host header; aiohttp sent the spelling as written (`0x7f.1` in the Host header), refused
    it (`127.1`, `2130706433`: invalid_url) or asked DNS for it (`%31%32%37.0.0.1`, `0x7f.1.`).
    The guard checks the same address, so what it checked is what is connected to.

    >>> str(request_url(URL("http://0x7f.1:8080/a.jpg?q=1"))), str(request_url(URL("http://134744072/")))
    ('http://127.0.0.1:8080/a.jpg?q=1', 'http://8.8.8.8/')
    >>> request_url(URL("http://example.com/a.jpg")).raw_host
    'example.com'
    """
    address = _dotted_host(target.raw_host or "")
    return target if address is None else target.with_host(address)


class PrivateAddressError(OSError):
    """A host resolved only to refused addresses. aiohttp wraps it in ClientConnectorError
    (it is an OSError), so no connection is ever attempted."""


class GuardedResolver(AbstractResolver):
    """Wraps a resolver: drops the addresses `allow` refuses; raises `PrivateAddressError` when
    none is left. aiohttp caches what it returns (ttl_dns_cache) and connects only to that, so
    the check and the connection see the same addresses (no DNS rebinding in between)."""

    def __init__(self, inner: AbstractResolver, allow: Callable[[IPAddress], bool] = is_public_address):
        self._inner = inner
        self._allow = allow

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = [r for r in results if self._allow(ipaddress.ip_address(r["host"]))]
        if results and not kept:
            addresses = ", ".join(sorted({r["host"] for r in results}))
            raise PrivateAddressError(f"{host} resolves to refused addresses only: {addresses}")
        return kept

    async def close(self) -> None:
        pass  # the inner resolver belongs to whoever made it


# --- opt-out: X-Robots-Tag -------------------------------------------------------------------

# (agent_token and opt_out_directive: fastlaion/robots_tag.py, which extract.py reads too)


# --- blocklists ------------------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{64}")


def _sorted_digests(digests: list[bytes], size: int) -> np.ndarray:
    """Distinct digests as one sorted array of fixed-size byte strings: `size` bytes an entry,
    where a set of bytes objects takes about 110 (a 10M-entry blocklist: 320 MB, not 1.1 GB)."""
    table = np.sort(np.array(digests, dtype=f"S{size}"))  # (np.unique is 10x slower on byte strings)
    if len(table) > 1:
        table = table[np.concatenate(([True], table[1:] != table[:-1]))]
    return table


def _has_digest(table: np.ndarray, digest: bytes) -> bool:
    """Whether `digest` is in a `_sorted_digests` table (binary search)."""
    i = int(np.searchsorted(table, digest))
    # numpy's S dtype reads back without trailing NUL bytes: compare the same way
    return i < len(table) and table[i] == digest.rstrip(b"\0")


_NO_DIGESTS = np.array([], dtype="S1")


@dataclass(frozen=True)
class _Digests:
    sha256: np.ndarray = field(default_factory=lambda: _NO_DIGESTS)  # sorted, S32
    md5: np.ndarray = field(default_factory=lambda: _NO_DIGESTS)  # sorted, S16

    def match(self, data: bytes) -> str | None:
        if len(self.sha256) and _has_digest(self.sha256, hashlib.sha256(data).digest()):
            return "sha256"
        if len(self.md5) and _has_digest(self.md5, hashlib.md5(data, usedforsecurity=False).digest()):
            return "md5"
        return None

    def __len__(self) -> int:
        return len(self.sha256) + len(self.md5)


@dataclass(frozen=True)
class Blocklists:
    """--url-blocklist and --image-blocklist, as sorted arrays of digests.

    A URL blocklist line is a URL (anything with "://") or the hex SHA-256 (64 digits) or MD5
    (32 digits) of a URL's UTF-8 bytes. An input URL is checked exactly as given (after stripping
    surrounding whitespace) and in its normalised form (yarl's: scheme and host in lower case,
    default port and dot segments dropped, percent-escapes requoted), each redirect target in
    that form; a URL line is entered both as written and in that form, so
    `HTTP://Example.COM/x.jpg` on the list blocks `http://example.com/x.jpg` and the other way
    round. A hex line is the digest of one exact URL string and matches only that string.
    An image blocklist line is the hex SHA-256 or MD5 of an image's bytes, as downloaded.
    Blank lines and lines starting with '#' are ignored; anything else is a ConfigError.
    """

    urls: _Digests = field(default_factory=_Digests)
    images: _Digests = field(default_factory=_Digests)

    @classmethod
    def from_config(cls, cfg: DownloadConfig) -> Blocklists:
        """Load the configured files; a file is read once per process while it is unchanged."""
        return cls(urls=_load_digests("--url-blocklist", cfg.url_blocklist, urls_allowed=True),
                   images=_load_digests("--image-blocklist", cfg.image_blocklist, urls_allowed=False))

    def url_blocked(self, *urls: str) -> str | None:
        """A detail naming the list if any of `urls` is on the URL blocklist, else None."""
        if not len(self.urls):
            return None
        for url in dict.fromkeys(urls):  # each distinct form once
            if (how := self.urls.match(url.encode("utf-8", "surrogatepass"))) is not None:
                return f"URL ({how}) on --url-blocklist: {url}"[:MAX_DETAIL_CHARS]
        return None

    def image_blocked(self, body: bytes) -> str | None:
        """A detail naming the list if the hash of `body` is on the image blocklist, else None."""
        how = self.images.match(body) if len(self.images) else None
        return None if how is None else f"image {how} on --image-blocklist"


def _load_digests(flag: str, path: str | None, *, urls_allowed: bool) -> _Digests:
    if path is None:
        return _Digests()
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    return _read_digests(flag, path, urls_allowed, st.st_mtime_ns, st.st_size)


# A URL that yarl's URL() writes back unchanged (lower-case scheme and host, no port, no dot
# segment, nothing to quote or unquote): most lines of a URL blocklist, spared the 30 us of URL()
_NORMAL_URL = re.compile(r"(?!.*/\.\.?(?:[/?]|$))https?://[a-z0-9.-]+(?:/[A-Za-z0-9._~/-]*(?:\?[A-Za-z0-9._~=&/-]+)?)?")


def _normal_url(url: str) -> str:
    """`url` in the normalised form `Downloader.fetch` checks an input URL in, `str(URL(url))`;
    `url` itself where yarl cannot parse it (such an input URL is refused as invalid_url)."""
    if _NORMAL_URL.fullmatch(url):
        return url
    try:
        return str(URL(url))
    except ValueError:  # UnicodeError is a ValueError
        return url


@lru_cache(maxsize=8)
def _read_digests(flag: str, path: str, urls_allowed: bool, mtime_ns: int, size: int) -> _Digests:
    sha256: list[bytes] = []
    md5: list[bytes] = []
    what = "a URL or the MD5/SHA-256 hex of one" if urls_allowed else "an MD5/SHA-256 hex digest"
    try:
        with open(path, encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                item = line.strip()
                if not item or item.startswith("#"):
                    continue
                if urls_allowed and "://" in item:
                    sha256.append(hashlib.sha256(item.encode("utf-8")).digest())
                    if (normal := _normal_url(item)) != item:  # the form url_blocked is given too
                        sha256.append(hashlib.sha256(normal.encode("utf-8", "surrogatepass")).digest())
                elif _HEX.fullmatch(item):
                    (md5 if len(item) == 32 else sha256).append(bytes.fromhex(item))
                else:
                    raise ConfigError(f"{flag} {path}, line {n}: not {what}: {item[:80]!r}")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{flag} {path}: cannot read it ({reason})") from None
    digests = _Digests(_sorted_digests(sha256, 32), _sorted_digests(md5, 16))
    log.info("%s %s: %d entries", flag, path, len(digests))
    return digests


# --- politeness: per-host slots and robots.txt -----------------------------------------------


@dataclass(slots=True)
class _Gate:
    slots: asyncio.Semaphore
    users: int = 0  # tasks holding or waiting for a slot
    next_start: float = 0.0  # loop time before which no request to this host may start


class _HostGates:
    """At most `per_host` requests in flight per host and, when `rate` > 0, request starts
    spaced 1/rate s apart. Gates of idle hosts are dropped, so memory follows the hosts in use."""

    def __init__(self, per_host: int, rate: float):
        self._per_host = per_host
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._gates: dict[str, _Gate] = {}
        self._sweep_at = 1024

    def has_room(self, host: str, now: float) -> bool:
        """Whether a request to `host` could start now without waiting for a slot or the rate."""
        gate = self._gates.get(host)
        return gate is None or (not gate.slots.locked() and gate.next_start <= now)

    def slot(self, host: str, interval: float = 0.0) -> _Slot:
        """Hold one of `host`'s slots (`async with`); request starts are spaced by the configured
        rate or by `interval` s (the host's robots.txt Crawl-delay), whichever is longer."""
        return _Slot(self, host, max(self._interval, interval))

    def hold(self, host: str, until: float) -> None:
        """No request to `host` starts before loop time `until` (a Retry-After); the host's gate
        exists (a request to it holds a slot)."""
        gate = self._gates.get(host)
        if gate is not None:
            gate.next_start = max(gate.next_start, until)

    def _enter(self, host: str) -> _Gate:
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = _Gate(asyncio.Semaphore(self._per_host))
        gate.users += 1
        return gate

    def _leave(self, host: str, gate: _Gate) -> None:
        gate.users -= 1
        now = asyncio.get_running_loop().time()
        if gate.users == 0 and gate.next_start <= now:
            del self._gates[host]
        elif len(self._gates) > self._sweep_at:  # idle hosts still inside their rate window
            for name in [n for n, g in self._gates.items() if g.users == 0 and g.next_start <= now]:
                del self._gates[name]
            self._sweep_at = max(1024, 2 * len(self._gates))


class _Slot:
    """`_HostGates.slot`: a class rather than an @asynccontextmanager, whose generator and
    wrappers cost about as much again per request; a free slot of a host without a rate is taken
    without a wait (Semaphore.acquire returns at once then)."""

    __slots__ = ("_gates", "_host", "_interval", "_gate", "_held")

    def __init__(self, gates: _HostGates, host: str, interval: float):
        self._gates, self._host, self._interval = gates, host, interval
        self._gate: _Gate | None = None
        self._held = False

    async def __aenter__(self) -> None:
        gate = self._gate = self._gates._enter(self._host)
        try:
            await gate.slots.acquire()
            self._held = True
            if self._interval or gate.next_start:  # a rate, a Crawl-delay, or a Retry-After's hold
                loop = asyncio.get_running_loop()
                now = loop.time()
                start = max(now, gate.next_start)
                if self._interval:
                    gate.next_start = start + self._interval  # reserved before sleeping: no two share it
                if start > now:
                    await asyncio.sleep(start - now)
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is None:
            return
        if self._held:
            self._held = False
            gate.slots.release()
        self._gates._leave(self._host, gate)


class _WildcardRule(urllib.robotparser.RuleLine):
    """A rule whose path has RFC 9309's special characters, which Python's parser compares
    literally: "*" matches any characters, a "$" at the end the end of the URL's path.

    Matched segment by segment, each at its first place after the one before (which finds a
    match whenever there is one), in time linear in the path per segment: a regular expression
    with a ".*" per "*" backtracks, and a site's "Disallow: /*a*a*a*a*a*a*a*a*a*a*a*a*b$" held
    the download loop for minutes on one 40-character path."""

    def __init__(self, rule: urllib.robotparser.RuleLine):
        self.path, self.allowance = rule.path, rule.allowance  # as RuleLine quoted it: * is %2A, $ %24
        self._anchored = self.path.endswith("%24")
        self._parts = (self.path[:-3] if self._anchored else self.path).split("%2A")

    def applies_to(self, filename: str) -> bool:
        first, *middle, last = self._parts if len(self._parts) > 1 else (self._parts[0], "")
        if not filename.startswith(first):
            return False
        if len(self._parts) == 1:  # no "*": an anchored path is the whole path
            return not self._anchored or filename == first
        pos = len(first)
        for part in middle:
            pos = filename.find(part, pos)
            if pos < 0:
                return False
            pos += len(part)
        if self._anchored:
            return filename.endswith(last) and len(filename) - len(last) >= pos
        return filename.find(last, pos) >= 0


def _pattern_length(path: str) -> int:
    """A rule's length as robots.txt wrote it: its quoted wildcards ("*" is %2A, "$" %24) count one."""
    return len(path) - 2 * path.count("%2A") - (2 if path.endswith("%24") else 0)


class _RobotsParser(urllib.robotparser.RobotFileParser):
    """Python's robots.txt parser, with a group's rules matched as RFC 9309 says: the rule with
    the longest path matching the URL decides, Allow where an Allow and a Disallow tie (Python's
    parser takes the first rule that matches, so "Allow: /" above "Disallow: /private/" allowed
    everything), and "*" and a final "$" are wildcards (`_WildcardRule`)."""

    def parse(self, lines: Iterable[str]) -> None:
        super().parse(lines)
        for entry in [*self.entries, self.default_entry]:
            if entry is not None:
                rules = [_WildcardRule(rule) if "%2A" in rule.path or rule.path.endswith("%24") else rule
                         for rule in entry.rulelines]
                rules.sort(key=lambda rule: (_pattern_length(rule.path), rule.allowance), reverse=True)
                entry.rulelines = rules  # Entry.allowance takes the first rule that applies


@dataclass(frozen=True, slots=True)
class _Robots:
    """One origin's robots.txt verdict: a parser, or one answer for every path."""

    parser: urllib.robotparser.RobotFileParser | None
    refusal: str | None = None  # with no parser: None allows all, else the reason refusing all
    detail: str | None = None
    crawl_delay_s: float = 0.0  # Crawl-delay (or Request-rate) for our user agent; 0: none


_ALLOW_ALL = _Robots(None)


# --- the downloader --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attempt:
    body: bytes | None
    http_status: int | None
    error: str | None
    error_detail: str | None
    retry_after_s: float | None = None  # a 429/503's Retry-After: no retry sooner (None: none asked)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header's wait in seconds (delta-seconds or an HTTP date, RFC 9110), at
    least 0; None when there is none or it cannot be read.

    >>> retry_after_seconds("120"), retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0)
    (120.0, 10.0)
    >>> retry_after_seconds("soon") is None and retry_after_seconds("-5") is None
    True
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # not a valid HTTP date (those are GMT)
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True, slots=True)
class _Rules:
    """What applies to one kind of request: an image row, or a robots.txt."""

    max_bytes: int
    truncate: bool  # keep the first max_bytes instead of dropping the row (robots.txt)
    policy: bool  # robots.txt, X-Robots-Tag and the blocklists apply (not to robots.txt itself)


def _detail(exc: BaseException) -> str:
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:MAX_DETAIL_CHARS]


def _refused(error: str, detail: str, status: int | None = None) -> _Attempt:
    return _Attempt(None, status, error, detail[:MAX_DETAIL_CHARS])


# Files a process holds beside its connections: Python's modules, the models, the shard's files,
# pipes to the other processes, the DNS resolver's sockets.
OPEN_FILES_BESIDE_CONNECTIONS = 256


def open_file_limit(needed: int) -> int:
    """Raise this process's soft limit on open files (`ulimit -n`, 1024 on many systems) towards
    `needed`, as far as its hard limit allows, and return the limit now in force. One connection
    is one file: `--workers 2000` under a soft limit of 1024 stopped the run with "Too many open
    files" (an import, a decoder's file, a socket: whichever came first). Where even the hard
    limit is lower, a warning names it; the run goes on (a connection that cannot open fails its
    row as connection_error, transient)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("--workers needs about %d open files, and this process may open %d (ulimit -n; its hard "
                    "limit is %s): raise it, or lower --workers", needed, soft,
                    "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return needed if soft == resource.RLIM_INFINITY else soft


class Downloader:
    """One aiohttp session with its connection pool; use as `async with Downloader(cfg) as d`.

    The session is made in `__aenter__`, so the object must be entered inside a running loop.
    Per-host slots, DNS answers and robots.txt verdicts live as long as the downloader: keep one
    for many URLs. `resolver` replaces aiohttp's DNS resolver (tests pass a stub); `allow_address`
    decides which resolved or literal addresses may be connected to when private networks are
    not allowed; `blocklists` defaults to the files named in `cfg`.
    """

    def __init__(self, cfg: DownloadConfig, *, resolver: AbstractResolver | None = None,
                 allow_address: Callable[[IPAddress], bool] = is_public_address,
                 blocklists: Blocklists | None = None):
        self.cfg = cfg
        self.blocklists = blocklists if blocklists is not None else Blocklists.from_config(cfg)
        self._resolver = resolver
        self._allow_address = allow_address
        self._opt_out_tags = frozenset(t.lower() for t in cfg.opt_out_tags)
        self._agents = frozenset({agent_token(cfg.user_agent), *OPT_OUT_AGENTS})
        self._image_rules = _Rules(cfg.max_bytes, truncate=False, policy=True)
        self._robots_rules = _Rules(ROBOTS_MAX_BYTES, truncate=True, policy=False)
        self._session: aiohttp.ClientSession | None = None
        self._owned_resolver: AbstractResolver | None = None
        self._gates = _HostGates(cfg.per_host, cfg.per_host_rate)
        self._robots: OrderedDict[str, asyncio.Future[_Robots]] = OrderedDict()
        self._robots_loading: Counter[str] = Counter()  # hosts whose robots.txt is being fetched
        # hosts that asked (Retry-After) for a longer wait than max_crawl_delay_s: loop time until
        # which their URLs get that answer again without a request, and the answer
        self._host_away: dict[str, tuple[float, _Attempt]] = {}
        # At most `workers` requests in flight across every download_all on this downloader (two
        # shards overlap at a shard's tail).
        self.in_flight = asyncio.Semaphore(cfg.workers)
        # each request's total deadline: one timer for all of them where Task.uncancel exists (3.11+)
        self._deadline: Callable[[float], Any] = _deadline_fallback
        self._watchdog: _Watchdog | None = None

    async def __aenter__(self) -> Downloader:
        open_file_limit(self.cfg.workers + OPEN_FILES_BESIDE_CONNECTIONS)
        if hasattr(asyncio.Task, "uncancel"):
            self._deadline = self._watchdog = _Watchdog()
        resolver = self._resolver
        if resolver is None:
            resolver = self._owned_resolver = aiohttp.DefaultResolver()
        if not self.cfg.allow_private_networks:
            resolver = GuardedResolver(resolver, self._allow_address)
        # Up to `workers` connections: each worker holds at most one (redirect hops are
        # sequential), so waiting for the pool, which aiohttp counts as connecting, never happens.
        connector = aiohttp.TCPConnector(limit=self.cfg.workers, ttl_dns_cache=DNS_CACHE_TTL_S,
                                         resolver=resolver, enable_cleanup_closed=_CLEANUP_CLOSED)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # The total deadline is ours (`_Watchdog`), so that it spans redirect hops but not
            # the waits for a per-host slot or a robots.txt.
            timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s,
                                          sock_read=self.cfg.read_timeout_s),
            headers={"User-Agent": self.cfg.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),  # a crawler keeps no state between URLs
            trust_env=False,  # a proxy from the environment would bypass the address checks
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        pending = [f for f in self._robots.values() if not f.done()]
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._robots.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._owned_resolver is not None:
            await self._owned_resolver.close()
            self._owned_resolver = None
        if self._watchdog is not None:
            self._watchdog.close()

    def host_has_room(self, host: str) -> bool:
        """Whether a request to `host` (see `host_of`) would start at once rather than wait for
        one of the host's slots, its rate window or its robots.txt (whose Crawl-delay may space
        the requests)."""
        return host not in self._robots_loading and self._gates.has_room(host, asyncio.get_running_loop().time())

    def fetch(self, url: str) -> Coroutine[Any, Any, Fetched]:
        """Download `url` (await it), retrying transient failures `cfg.retries` times with
        backoff. `_fetch`'s coroutine itself, not one awaiting it: each level of coroutines is
        resumed again at every wait of the request (connect, headers, each block of the body)."""
        if self._session is None:
            raise RuntimeError("Downloader.fetch called outside `async with Downloader(cfg)`")
        return self._fetch(url, self._image_rules)

    async def _fetch(self, url: str, rules: _Rules) -> Fetched:
        start = time.perf_counter()

        def done(outcome: _Attempt, attempts: int) -> Fetched:
            return Fetched(outcome.body, outcome.http_status, outcome.error, outcome.error_detail,
                           attempts, time.perf_counter() - start)

        try:  # validate_url's checks, on the one URL object parsed
            target = URL(url.strip()) if isinstance(url, str) and url.strip() else None
            invalid = target is None or _url_reason(target) is not None
        except ValueError:  # UnicodeError is a ValueError
            invalid = True
        if invalid:
            return done(_refused(INVALID_URL, f"not an http(s) URL: {url!r}"), 0)
        url = url.strip()
        requested = request_url(target)
        if rules.policy and (why := self.blocklists.url_blocked(
                url, str(target), *(() if requested is target else (str(requested),)))) is not None:
            return done(_refused(BLOCKED, why), 0)
        refusal, crawl_delay = await self._refusal(requested, rules)
        if refusal is not None:
            return done(refusal, 0)
        attempts = 0
        while True:
            attempts += 1
            outcome = await self._attempt(requested, rules, crawl_delay)
            # (a redirect target's unreachable robots.txt: its verdict would answer again the same)
            if not is_transient(outcome.error) or outcome.error == ROBOTS_UNREACHABLE or attempts > self.cfg.retries:
                return done(outcome, attempts)
            wait = outcome.retry_after_s or 0.0
            if wait > self.cfg.max_crawl_delay_s:  # asks for longer than a run waits: --retry-failed
                return done(outcome, attempts)
            await asyncio.sleep(max(wait, self.cfg.backoff_s * 2 ** (attempts - 1)))

    async def _refusal(self, target: URL, rules: _Rules) -> tuple[_Attempt | None, float]:
        """(why `target` must not be requested (a literal private IP, robots.txt) or None, the
        Crawl-delay its robots.txt asks for between requests to its host, in seconds)."""
        if not self.cfg.allow_private_networks:
            ip = literal_ip(target.raw_host or "")
            if ip is not None and not self._allow_address(ip):
                return _refused(PRIVATE_ADDRESS, f"{target.raw_host} is not a public address"), 0.0
        if not (rules.policy and self.cfg.respect_robots):
            return None, 0.0
        robots = await self._robots_for(target)
        if robots.parser is None:
            return (None if robots.refusal is None else _refused(robots.refusal, robots.detail or "")), 0.0
        if not robots.parser.can_fetch(self.cfg.user_agent, str(target)):
            return _refused(ROBOTS_DISALLOWED, f"robots.txt of {target.origin()} disallows {target.path_qs}"), 0.0
        if robots.crawl_delay_s > self.cfg.max_crawl_delay_s:
            return _refused(ROBOTS_DISALLOWED, f"robots.txt of {target.origin()} asks for a Crawl-delay of "
                                               f"{robots.crawl_delay_s:g} s, over --max-crawl-delay "
                                               f"{self.cfg.max_crawl_delay_s:g} s"), 0.0
        return None, robots.crawl_delay_s

    async def _attempt(self, target: URL, rules: _Rules, crawl_delay: float) -> _Attempt:
        """One attempt: request `target` (a `request_url`) and follow its redirects, within
        `cfg.timeout_s` in all; `crawl_delay`: the first hop's, from `_refusal`."""
        spent = 0.0
        status: int | None = None
        for hop in range(self.cfg.max_redirects + 1):
            if hop:  # `target`: the Location as written (joined, yarl's form)
                location, target = target, request_url(target)
                if rules.policy and (why := self.blocklists.url_blocked(str(location), str(target))) is not None:
                    return _refused(BLOCKED, why, status)
                refusal, crawl_delay = await self._refusal(target, rules)
                if refusal is not None:
                    return _Attempt(None, status, refusal.error, refusal.error_detail)
            if self._host_away and (away := self._away(target.raw_host or "")) is not None:
                return away
            async with self._gates.slot(target.raw_host or "", crawl_delay):
                began = time.perf_counter()
                try:
                    step = await self._hop(target, rules, self.cfg.timeout_s - spent, status)
                finally:
                    spent += time.perf_counter() - began
            if isinstance(step, _Attempt):
                return step
            target, status = step
        return _refused(TOO_MANY_REDIRECTS, f"more than {self.cfg.max_redirects} redirects", status)

    def _asked_to_wait(self, host: str, resp: aiohttp.ClientResponse) -> _Attempt:
        """A 429/503 with Retry-After: no request to `host` starts before the time it names (its
        gate is held), and when that is over max_crawl_delay_s, the host's URLs get this answer
        until then without a request (`_away`)."""
        wait = retry_after_seconds(resp.headers.get("Retry-After"))
        detail = f"{resp.status} {resp.reason}"
        if wait is None:
            return _Attempt(None, resp.status, f"http_{resp.status}", detail)
        now = asyncio.get_running_loop().time()
        detail = f"{detail}, Retry-After {wait:g} s"
        if wait > self.cfg.max_crawl_delay_s:
            detail += f" (over --max-crawl-delay {self.cfg.max_crawl_delay_s:g} s: not retried in this run)"
        outcome = _Attempt(None, resp.status, f"http_{resp.status}", detail[:MAX_DETAIL_CHARS], wait)
        if wait > self.cfg.max_crawl_delay_s:
            self._host_away[host] = (now + wait, outcome)
        else:
            self._gates.hold(host, now + wait)
        return outcome

    def _away(self, host: str) -> _Attempt | None:
        """The answer of a host that asked to be left alone for longer than a run waits, while
        that time lasts."""
        entry = self._host_away.get(host)
        if entry is None:
            return None
        until, outcome = entry
        left = until - asyncio.get_running_loop().time()
        if left <= 0:
            del self._host_away[host]
            return None
        return _Attempt(None, outcome.http_status, outcome.error, outcome.error_detail, left)

    async def _hop(self, target: URL, rules: _Rules, budget_s: float,
                   status: int | None) -> _Attempt | tuple[URL, int]:
        """One request: the outcome, or where it redirects to (and the redirect's status)."""
        assert self._session is not None
        answered = False  # headers received: a socket timeout now is the body stalling
        # A phase timeout that ends as the budget does is the deadline: with one equal to
        # --timeout (as an unset one below its default is), aiohttp's timer and ours end
        # together, and the reason was whichever ran first.
        spent_at = asyncio.get_running_loop().time() + budget_s
        try:
            async with self._deadline(budget_s), self._session.get(target, allow_redirects=False) as resp:
                answered, status = True, resp.status
                if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                    return _redirect(resp)
                if resp.status >= 400:
                    if resp.status in (429, 503) and "Retry-After" in resp.headers:
                        return self._asked_to_wait(target.raw_host or "", resp)
                    return _Attempt(None, resp.status, f"http_{resp.status}", f"{resp.status} {resp.reason}")
                if rules.policy:
                    directive = opt_out_directive(resp.headers.getall("X-Robots-Tag", ()),
                                                  self._opt_out_tags, self._agents)
                    if directive is not None:
                        resp.close()  # drop the connection: not a byte of the body is read
                        return _refused(OPT_OUT, f"X-Robots-Tag: {directive}", resp.status)
                return await self._read_body(resp, rules)
        except _CONNECT_TIMEOUT_ERROR:
            if asyncio.get_running_loop().time() >= spent_at:
                return _refused(DEADLINE, f"no complete answer within {self.cfg.timeout_s} s", status)
            return _refused(CONNECT_TIMEOUT, f"no connection within {self.cfg.connect_timeout_s} s", status)
        except aiohttp.ServerTimeoutError as exc:  # sock_read (3.9 also says connect this way)
            if asyncio.get_running_loop().time() >= spent_at:
                return _refused(DEADLINE, f"no complete answer within {self.cfg.timeout_s} s", status)
            if not answered and "Connection timeout" in str(exc):
                return _refused(CONNECT_TIMEOUT, f"no connection within {self.cfg.connect_timeout_s} s", status)
            if answered:
                return _refused(READ_TIMEOUT, f"body stalled for {self.cfg.read_timeout_s} s", status)
            return _refused(HEADER_TIMEOUT, f"no response headers within {self.cfg.read_timeout_s} s", status)
        except (asyncio.TimeoutError, TimeoutError):  # after ServerTimeoutError, which is one too
            return _refused(DEADLINE, f"no complete answer within {self.cfg.timeout_s} s", status)
        except aiohttp.ClientPayloadError as exc:
            return _Attempt(None, status, PAYLOAD_ERROR, _detail(exc))
        except aiohttp.ClientSSLError as exc:  # a certificate that does not verify, a failed handshake
            return _Attempt(None, status, TLS_ERROR, _detail(exc))
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PrivateAddressError):
                return _Attempt(None, status, PRIVATE_ADDRESS, str(exc.os_error)[:MAX_DETAIL_CHARS])
            return _Attempt(None, status, CONNECTION_ERROR, _detail(exc))
        except aiohttp.ClientConnectionError as exc:
            return _Attempt(None, status, CONNECTION_ERROR, _detail(exc))
        except (aiohttp.InvalidURL, _NON_HTTP_URL) as exc:
            return _Attempt(None, status, INVALID_URL, _detail(exc))
        except aiohttp.ClientError as exc:
            # Not exc.status: for a malformed response aiohttp makes up a 400 of its own.
            return _Attempt(None, status, CLIENT_ERROR, _detail(exc))

    async def _read_body(self, resp: aiohttp.ClientResponse, rules: _Rules) -> _Attempt:
        cap = rules.max_bytes
        if resp.content_length is not None and resp.content_length > cap and not rules.truncate:
            resp.close()
            return _refused(TOO_LARGE, f"Content-Length {resp.content_length} > max_bytes {cap}", resp.status)
        chunks: list[bytes] = []
        size = 0
        # Counted after decompression, so a small gzip bomb is cut off like a big body.
        # Each block as the socket delivered it (readany): fixed-size reads (iter_chunked) split and
        # copy the blocks, and resume this chain of coroutines once per piece.
        content = resp.content
        while chunk := await content.readany():
            if size + len(chunk) > cap:
                resp.close()  # drops the connection mid-body
                if not rules.truncate:
                    return _refused(TOO_LARGE, f"body over max_bytes {cap}", resp.status)
                chunks.append(chunk[:cap - size])
                break
            size += len(chunk)
            chunks.append(chunk)
        body = b"".join(chunks)
        if rules.policy and (why := self.blocklists.image_blocked(body)) is not None:
            return _refused(BLOCKED, why, resp.status)
        return _Attempt(body, resp.status, None, None)

    def _robots_loaded(self, host: str) -> None:
        self._robots_loading[host] -= 1
        if self._robots_loading[host] <= 0:
            del self._robots_loading[host]

    async def _robots_for(self, target: URL) -> _Robots:
        """The robots.txt verdict for `target`'s origin: fetched once, every caller awaits it."""
        origin = target.origin()
        key = str(origin)
        future = self._robots.get(key)
        if future is None:
            future = self._robots[key] = asyncio.ensure_future(self._load_robots(origin))
            host = origin.raw_host or ""
            self._robots_loading[host] += 1
            future.add_done_callback(lambda _future: self._robots_loaded(host))
            if len(self._robots) > ROBOTS_CACHE_ORIGINS:
                oldest = next((k for k, f in self._robots.items() if f.done()), None)
                if oldest is not None:
                    del self._robots[oldest]
        else:
            self._robots.move_to_end(key)
        # One waiter's deadline or cancellation must not cancel the fetch the others wait on.
        return await asyncio.shield(future)

    def _robots_delay(self, parser: urllib.robotparser.RobotFileParser) -> float:
        """Seconds between request starts that robots.txt asks of our user agent: its
        Crawl-delay, or the interval of its Request-rate (n requests per s seconds), the longer.
        (The parser keeps whole numbers only; `_whole_delays` rounded fractions up for it.)"""
        crawl = parser.crawl_delay(self.cfg.user_agent) or 0
        rate = parser.request_rate(self.cfg.user_agent)
        interval = rate.seconds / rate.requests if rate is not None and rate.requests > 0 else 0
        return float(max(crawl, interval))

    async def _load_robots(self, origin: URL) -> _Robots:
        got = await self._fetch(str(origin.with_path("/robots.txt")), self._robots_rules)
        if got.ok:
            parser = _RobotsParser()
            # utf-8-sig: a byte order mark (Windows editors write one) would hide the first line,
            # often the "User-agent: *" that the rules below it belong to
            parser.parse(_whole_delays((got.body or b"").decode("utf-8-sig", "replace").splitlines()))
            verdict = _Robots(parser, crawl_delay_s=self._robots_delay(parser))
        elif got.error == PRIVATE_ADDRESS:
            verdict = _Robots(None, PRIVATE_ADDRESS, got.error_detail)
        elif got.error in (TOO_MANY_REDIRECTS, INVALID_URL) or (
                got.error is not None and got.error.startswith("http_4") and got.error != "http_429"):
            # RFC 9309: robots.txt "unavailable" (4xx, also after over five redirects) allows everything
            verdict = _ALLOW_ALL
        else:  # RFC 9309: "unreachable" (5xx, 429, network errors) means complete disallow
            verdict = _Robots(None, ROBOTS_UNREACHABLE, f"robots.txt of {origin} unreachable ({got.error}): "
                                                        "everything disallowed (RFC 9309)")
        log.debug("robots.txt of %s: %s", origin, got.error or "parsed")
        return verdict


_FRACTIONAL_DELAY = re.compile(r"(\s*crawl-delay\s*:\s*)([0-9]*\.[0-9]+)", re.IGNORECASE)


def _whole_delays(lines: list[str]) -> list[str]:
    """robots.txt lines with a fractional Crawl-delay rounded up to whole seconds: Python's
    parser drops any value that is not all digits, and 0.5 would become no delay at all."""
    return [_FRACTIONAL_DELAY.sub(lambda m: f"{m.group(1)}{math.ceil(float(m.group(2)))}", line, count=1)
            if "." in line else line for line in lines]


def _redirect(resp: aiohttp.ClientResponse) -> _Attempt | tuple[URL, int]:
    location = resp.headers["Location"]
    try:
        target = resp.url.join(URL(location)).with_fragment(None)
        reason = _url_reason(target)
    except ValueError:
        reason = INVALID_URL
    if reason is not None:
        return _refused(INVALID_URL, f"redirect to a bad URL: {location!r}", resp.status)
    return target, resp.status


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


DEADLINE_TICK_S = 0.05  # how late a request's deadline may be kept (never early): the watchdog's period


class _Watchdog:
    """The total deadline of every request in flight on one loop, kept by one periodic timer
    rather than a timer each: `asyncio.timeout` makes and cancels a timer per request (a libuv
    timer under uvloop), about 0.03 ms of a request's 0.42 ms of CPU (bench/fetch_loop.py). A
    deadline is kept up to `tick` s late, never early; the timer runs only while a request is
    watched. The block is cut as `asyncio.timeout` cuts it: its task cancelled, the
    CancelledError turned into TimeoutError where no other cancellation came (Task.uncancel,
    Python 3.11+; on 3.10 `_deadline_fallback` keeps a timer per request)."""

    def __init__(self, tick: float = DEADLINE_TICK_S):
        self._tick = tick
        self._watched: dict[_Deadline, None] = {}  # an ordered set
        self._handle: asyncio.TimerHandle | None = None

    def __call__(self, seconds: float) -> _Deadline:
        return _Deadline(self, seconds)

    def _watch(self, deadline: _Deadline, loop: asyncio.AbstractEventLoop) -> None:
        self._watched[deadline] = None
        if self._handle is None:
            self._handle = loop.call_later(self._tick, self._check, loop)

    def _unwatch(self, deadline: _Deadline) -> None:
        self._watched.pop(deadline, None)  # the timer stops at its next tick if nothing is left

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for deadline in [d for d in self._watched if d.expires <= now]:
            del self._watched[deadline]
            deadline.expired = True
            deadline.task.cancel()
        self._handle = loop.call_later(self._tick, self._check, loop) if self._watched else None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._watched.clear()


class _Deadline:
    """One block under a `_Watchdog`'s deadline: `async with watchdog(seconds):`."""

    __slots__ = ("_dog", "_seconds", "task", "expires", "expired", "_cancelling")

    def __init__(self, dog: _Watchdog, seconds: float):
        self._dog, self._seconds = dog, seconds
        self.expired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self.task, self.expires, self._cancelling = task, loop.time() + self._seconds, task.cancelling()
        self._dog._watch(self, loop)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        self._dog._unwatch(self)
        # Ours alone (no other cancellation meanwhile): a timeout, as asyncio.timeout says it
        if self.expired and self.task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


def host_of(url: str | None) -> str:
    """The host a URL's first request goes to, as the per-host slots name it ('' if none, e.g.
    for an invalid URL, which `fetch` answers without a request): an IPv4 address in dotted
    decimal however it was written (`request_url`).

    >>> host_of("http://0x7f.1:8080/a.jpg"), host_of("https://Example.COM/a.jpg")
    ('127.0.0.1', 'example.com')
    """
    if not isinstance(url, str):
        return ""
    try:
        host = URL(url.strip()).raw_host or ""
    except (ValueError, TypeError):
        return ""
    return _dotted_host(host) or host


async def download_all(downloader: Downloader, items: Iterable[tuple[int, str]], workers: int,
                       on_result: Callable[[int, Fetched], Awaitable[None]],
                       on_drained: Callable[[], None] | None = None) -> None:
    """Fetch every (key, url) with `workers` coroutines and await `on_result(key, fetched)` for each.

    Workers take the next URL from a look-ahead window of at most 2 * workers items, skipping
    those whose host has no free slot (per-host limit or rate) for the first one whose host has:
    a host with many URLs in a row does not hold every worker idle while other hosts wait. When
    no host in the window has room, the oldest item is taken and waits for its host, as in a
    plain queue. A worker holds one of the downloader's `in_flight` slots (`cfg.workers` of
    them) while it fetches and hands over a URL, so two overlapping calls (a shard's tail and the
    next shard) never have more than `cfg.workers` requests or bodies alive between them. Invalid URLs are not requested (they get `Fetched(error='invalid_url',
    attempts=0)`). Results arrive in completion order, each key exactly once. If `on_result` (or
    `items`) raises, the other workers are cancelled and the exception propagates.
    `on_drained()` is called once, when every item has been taken by a worker and only the
    requests in flight remain (the tail: a caller may start the next batch).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    source = iter(items)
    window: deque[tuple[int, str, str]] = deque()  # (key, url, host), oldest first
    lookahead = 2 * workers
    exhausted = False
    drained = False

    def take() -> tuple[int, str] | None:
        nonlocal exhausted
        while not exhausted and len(window) < lookahead:
            try:
                key, url = next(source)
            except StopIteration:
                exhausted = True
            else:
                window.append((key, url, host_of(url)))
        if not window:
            return None
        full: set[str] = set()  # hosts seen without room in this scan: each is asked once
        for i, (key, url, host) in enumerate(window):
            if host in full:
                continue
            if downloader.host_has_room(host):
                del window[i]
                return key, url
            full.add(host)
        key, url, _host = window.popleft()
        return key, url

    async def work() -> None:
        nonlocal drained
        while True:
            async with downloader.in_flight:  # shared with an overlapping shard's download_all
                if (item := take()) is None:
                    break
                key, url = item
                await on_result(key, await downloader.fetch(url))
        if not drained and on_drained is not None:
            drained = True
            on_drained()

    tasks = [asyncio.ensure_future(work()) for _ in range(workers)]
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
