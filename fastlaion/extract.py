"""Extraction: Common Crawl WAT/WARC files -> (image URL, alt text) candidate pairs in Parquet.

This is LAION's first two stages (../shared/docs/LAION.md, stages 1-3). A WAT record already
lists a page's links (`Envelope."Payload-Metadata"."HTTP-Response-Metadata"."HTML-Metadata".Links`,
entries with `"path": "IMG@/src"`), so it is read as LAION read it; a WARC response record holds
the raw HTML, parsed here with selectolax for its `<img>` elements. Both go through the same link
rules, each an option with LAION's default, and every rejected link is counted under its rule.

Reading is our own small WARC splitter over a gzip-member-aware decompressor rather than a
library iterator: Common Crawl files are one gzip member per record, so a corrupt member, a lying
Content-Length or junk between records costs one counted record, and reading goes on from the
next record (fastwarc raises at the first such error and reads no further). Memory per file is
one record plus one read chunk, whatever the file size.

Per input file (one process each, `processes` at a time), the pairs are written to a temporary
Parquet in chunks as they are found; at the end Polars deduplicates all of them lazily (first
occurrence kept, input order kept) and writes `candidates-NNNNN.parquet` shards plus
`extract_stats.json`. The candidates are a valid `fastlaion run` input (columns url, caption).

Counting (it adds up; `ExtractSummary` and extract_stats.json carry all of it):
    records = pages + sum(ignored) + sum(skipped)
    links   = sum(rejected) + pairs          (links: IMG src entries seen on pages)
    pairs   = pairs_after_dedup + duplicates

Link rules, checked in this order; a link is counted under the first rule it fails:
    no_alt       the img has no alt attribute (kept with an empty caption if min_alt_chars == 0)
    short_alt    alt, entity-decoded and whitespace-folded, under `min_alt_chars` (LAION: 5)
    data_uri     src contains "data:" (LAION)
    javascript   src contains "javascript:" (LAION)
    svg          src contains ".svg" (LAION; `reject_svg=False` / --keep-svg keeps them)
    gif          src contains ".gif" (LAION; `reject_gif=False` / --keep-gif keeps them)
    invalid_url  after joining to the page (or <base href>): not http(s), no host, bad host or port
    long_host    hostname longer than `max_host_chars` (LAION: 60)
The substring rules are LAION's and match anywhere in the src, case-insensitively: a Wikipedia
thumbnail `.../Flag.svg/18px-Flag.svg.png` counts as svg, as it did for LAION.
Kept URL and caption are cut to `max_text_chars` (LAION: 2000); `notes` counts the cuts.

Record reasons. Ignored (normal, not errors):
    other_type     warcinfo, request, revisit, ... records, and WARC metadata records
    not_html       a WARC response whose content is not HTML
    no_img_links   a WAT record that lists no IMG@/src link (request and metadata records too)
Skipped (damaged input; reading goes on with the next record):
    empty_input         the input holds no bytes at all
    not_warc            a stretch of bytes that is not a WARC record (counted once per stretch)
    bad_header          a WARC header without a usable Content-Length, or over 64 KiB
    bad_content_length  the record's Content-Length does not end where the next record starts
    too_large           a record over `max_record_bytes` (skipped unread)
    truncated           the input ended inside a record (e.g. a gzip file cut short)
    corrupt_gzip        a gzip member that does not decompress (reading resumes at the next one)
    read_error          the input could not be read further (retries spent); what came before is kept
    invalid_json        a WAT record that mentions IMG@/src but is not valid JSON
    bad_http            a WARC response whose HTTP head or chunked/compressed body does not decode

`uid` is the first 16 bytes of sha256(url + "\\x00" + caption) as 32 hex characters: stable
across runs, machines and library versions (unlike Polars' own hash).
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import html
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urljoin, urlsplit

from .config import DEFAULT_USER_AGENT, ConfigError, DedupMode, ExtractConfig

log = logging.getLogger(__name__)

DEFAULT_CC_BASE_URL = "https://data.commoncrawl.org/"
REJECT_REASONS = ("no_alt", "short_alt", "data_uri", "javascript", "svg", "gif", "invalid_url", "long_host")
IGNORE_REASONS = ("other_type", "not_html", "no_img_links")
SKIP_REASONS = ("empty_input", "not_warc", "bad_header", "bad_content_length", "too_large", "truncated",
                "corrupt_gzip", "read_error", "invalid_json", "bad_http")
NOTES = ("url_truncated", "caption_truncated", "charset_fallback")
WARC_SUFFIXES = (".warc", ".warc.gz", ".wat", ".wat.gz")  # .warc.wat.gz ends in .wat.gz
READ_CHUNK_BYTES = 1 << 20
DECOMPRESS_CAP_BYTES = 8 << 20  # most output one decompress call may make
INFLATE_FEED_BYTES = 8 << 10  # most compressed input one decompress call is given
WRITE_CHUNK_ROWS = 65_536  # pairs buffered per input before they go to its temporary Parquet
MAX_HEADER_BYTES = 64 << 10
TICK_RECORDS = 2000  # progress is reported every this many records
CRAWL_ID = re.compile(r"CC-MAIN-\d{4}-\d{2}")

_GZIP_MAGIC = b"\x1f\x8b\x08"
_IMG_PATH = b'"IMG@/src"'
# scheme://[userinfo@]host[:port] then path/query/fragment or the end. The host may be an
# IPv6 literal or any run of characters that cannot end or break an authority (IDN allowed).
_HTTP_URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://(?:[^/?#@]*@)?"
                       r"(\[[0-9A-Fa-f:.]+\]|[^\s/?#@:\[\]<>\"'{}|\\^`]+)(?::(\d*))?(?:[/?#]|$)")
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9A-Fa-f]+|[A-Za-z][A-Za-z0-9]*);")
_LEADING_INT = re.compile(r"\s*\+?(\d{1,9})")
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.I)
_HTTP_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.I)
# Browsers (WHATWG Encoding) read these labels as windows-1252; Python's latin-1 differs in 0x80-0x9F.
_AS_CP1252 = {"iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1", "us-ascii", "ascii", "iso_8859-1"}


@dataclass
class InputStats:
    """What one input gave: counts per reason (module docstring) and its timing."""

    source: str
    records: int = 0
    pages: int = 0
    links: int = 0
    pairs: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    ignored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IGNORE_REASONS, 0))
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    notes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NOTES, 0))
    bytes_read: int = 0  # bytes read from the input (compressed, as stored)
    elapsed_s: float = 0.0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self.records += 1

    def ignore(self, reason: str) -> None:
        self.ignored[reason] += 1
        self.records += 1


@dataclass(frozen=True)
class ExtractSummary:
    output_dir: str
    files: tuple[str, ...]  # the candidates-NNNNN.parquet written, in order
    inputs: tuple[InputStats, ...]  # in the order given
    dedup: str
    records: int
    pages: int
    links: int
    pairs: int  # before dedup
    pairs_after_dedup: int
    rejected: dict[str, int]
    ignored: dict[str, int]
    skipped: dict[str, int]
    notes: dict[str, int]
    wall_s: float

    @property
    def duplicates(self) -> int:
        return self.pairs - self.pairs_after_dedup

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["duplicates"] = self.duplicates
        return d


class ExtractProgress(Protocol):
    def start(self, n_inputs: int) -> None: ...
    def advance(self, records: int, pairs: int) -> None: ...
    def input_done(self, stats: InputStats) -> None: ...
    def stop(self) -> None: ...


class _NoProgress:
    def start(self, n_inputs: int) -> None: ...
    def advance(self, records: int, pairs: int) -> None: ...
    def input_done(self, stats: InputStats) -> None: ...
    def stop(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Public helpers for `fastlaion run` and the CLI

def is_warc_like(path: str) -> bool:
    """Whether `path` (a file name or URL) names a WARC or WAT file, by its name.

    >>> is_warc_like("s3://commoncrawl/crawl-data/x/wat/CC-MAIN-1-2-00000.warc.wat.gz")
    True
    >>> is_warc_like("urls.parquet")
    False
    """
    name = path.split("?", 1)[0].split("#", 1)[0].lower()
    return name.endswith(WARC_SUFFIXES)


def list_crawl(crawl: str, n_files: int, base_url: str = DEFAULT_CC_BASE_URL,
               cfg: ExtractConfig | None = None) -> list[str]:
    """URLs of the first `n_files` WAT files of Common Crawl crawl `crawl` (e.g. CC-MAIN-2024-22),
    from its public listing {base_url}/crawl-data/{crawl}/wat.paths.gz (one path a line,
    relative to base_url)."""
    cfg = cfg or ExtractConfig()
    if not CRAWL_ID.fullmatch(crawl):
        raise ConfigError(f"--crawl must look like CC-MAIN-YYYY-WW, got {crawl!r}")
    if n_files < 1:
        raise ConfigError(f"--files must be at least 1, got {n_files}")
    base = base_url.rstrip("/")
    listing = f"{base}/crawl-data/{crawl}/wat.paths.gz"
    try:
        with _open_source(listing, cfg) as stream:
            raw = stream.read()
    except OSError as e:  # broken mid-stream, retries spent
        raise ConfigError(f"cannot read {listing}: {e}") from None
    try:
        paths = gzip.decompress(raw).decode("utf-8").split()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise ConfigError(f"{listing}: not a gzipped list of paths ({e})") from None
    if len(paths) < n_files:
        log.warning("crawl %s lists %d WAT files; --files %d asks for more", crawl, len(paths), n_files)
    return [f"{base}/{p.lstrip('/')}" for p in paths[:n_files]]


def extract_to_parquet(sources: list[str], out_dir: Path, cfg: ExtractConfig,
                       progress: ExtractProgress | None = None) -> ExtractSummary:
    """Extract candidate pairs from every source (local path, http(s) URL or fsspec URL such as
    s3://) into out_dir/candidates-NNNNN.parquet, deduplicated over all sources; write
    out_dir/extract_stats.json. Raises ConfigError for a bad option or an unreadable source."""
    cfg.validate()
    if not sources:
        raise ConfigError("no input given: pass one or more WAT/WARC files or URLs, or --crawl")
    for s in sources:
        _check_local(s)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output exists and is not a folder: {out_dir}")
    partial = out_dir / ".extract-partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    progress = progress or _NoProgress()
    start = time.perf_counter()
    jobs = [_Job(i, s, partial / f"part-{i:06d}.parquet", cfg) for i, s in enumerate(sources)]
    progress.start(len(jobs))
    try:
        stats = _run_jobs(jobs, cfg, progress)
        files, after = _dedup_and_shard([j.part for j in jobs], out_dir, cfg)
    finally:
        progress.stop()
        shutil.rmtree(partial, ignore_errors=True)
    summary = _summarise(out_dir, files, stats, after, cfg, time.perf_counter() - start)
    payload = {**summary.to_dict(), "config": cfg.to_dict()}
    (out_dir / "extract_stats.json").write_text(json.dumps(payload, indent=2) + "\n")
    return summary


def extract_file(source: str, part_path: Path, cfg: ExtractConfig,
                 tick: Callable[[int, int], None] | None = None) -> InputStats:
    """Extract one source into a Parquet at `part_path` (not written when no pair is found)."""
    stats = InputStats(source)
    t0 = time.perf_counter()
    rules = _LinkRules(cfg, stats)
    with _open_source(source, cfg) as stream, _PairWriter(part_path) as writer:
        counted = _CountingReader(stream)
        last_records = last_pairs = 0
        for rec in _records(counted, cfg, stats):
            _handle_record(rec, rules, writer, stats)
            if tick is not None and stats.records - last_records >= TICK_RECORDS:
                tick(stats.records - last_records, stats.pairs - last_pairs)
                last_records, last_pairs = stats.records, stats.pairs
        stats.bytes_read = counted.count
    if tick is not None:
        tick(stats.records - last_records, stats.pairs - last_pairs)
    stats.elapsed_s = time.perf_counter() - t0
    return stats


# ---------------------------------------------------------------------------------------------
# Running over many inputs

@dataclass(frozen=True)
class _Job:
    index: int
    source: str
    part: Path
    cfg: ExtractConfig


_worker_queue: Any = None


def _init_worker(queue: Any) -> None:
    global _worker_queue
    _worker_queue = queue


def _run_in_worker(job: _Job) -> InputStats:
    def tick(records: int, pairs: int) -> None:
        _worker_queue.put((records, pairs))

    return extract_file(job.source, job.part, job.cfg, tick)


def _run_jobs(jobs: list[_Job], cfg: ExtractConfig, progress: ExtractProgress) -> list[InputStats]:
    n_workers = cfg.worker_count(len(jobs))
    if n_workers == 1:
        out = []
        for job in jobs:
            out.append(extract_file(job.source, job.part, cfg, progress.advance))
            progress.input_done(out[-1])
        return out
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    # spawn, not fork: the parent may hold Polars/Arrow thread pools, which fork would copy locked.
    ctx = mp.get_context("spawn")
    ticks = ctx.Queue()
    results: dict[int, InputStats] = {}
    with cf.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=(ticks,)) as pool:
        futures = {pool.submit(_run_in_worker, job): job for job in jobs}
        pending = set(futures)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                _drain(ticks, progress, queue_mod.Empty)
                for fut in done:
                    results[futures[fut].index] = fut.result()  # re-raises ConfigError and bugs
                    progress.input_done(results[futures[fut].index])
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        _drain(ticks, progress, queue_mod.Empty)
    return [results[j.index] for j in jobs]


def _drain(ticks: Any, progress: ExtractProgress, empty: type[Exception]) -> None:
    records = pairs = 0
    while True:
        try:
            r, p = ticks.get_nowait()
        except empty:
            break
        records += r
        pairs += p
    if records or pairs:
        progress.advance(records, pairs)


def _dedup_and_shard(parts: list[Path], out_dir: Path, cfg: ExtractConfig) -> tuple[list[str], int]:
    """Deduplicate the per-input Parquets lazily (first occurrence in input order kept) and cut
    the result into candidates-NNNNN.parquet shards. Returns (file names, rows written)."""
    import polars as pl
    import pyarrow.parquet as pq

    for old in out_dir.glob("candidates-*.parquet"):  # from an earlier run into the same folder
        old.unlink()
    existing = [str(p) for p in parts if p.exists()]
    merged = out_dir / ".extract-partial" / "merged.parquet"
    if not existing:
        pq.write_table(_schema().empty_table(), merged)
    else:
        lf = pl.scan_parquet(existing)
        if cfg.dedup is not DedupMode.none:
            lf = lf.unique(subset=[cfg.dedup.value], keep="first", maintain_order=True)
        lf.sink_parquet(merged)
    rows = pq.ParquetFile(merged).metadata.num_rows
    if rows <= cfg.shard_rows:
        name = "candidates-00000.parquet"
        os.replace(merged, out_dir / name)
        return [name], rows
    names: list[str] = []
    writer: Any = None
    in_shard = 0
    for batch in pq.ParquetFile(merged).iter_batches(batch_size=min(cfg.shard_rows, WRITE_CHUNK_ROWS)):
        while batch.num_rows:
            if writer is None:
                names.append(f"candidates-{len(names):05d}.parquet")
                writer = pq.ParquetWriter(out_dir / names[-1], batch.schema, compression="zstd")
                in_shard = 0
            take = min(batch.num_rows, cfg.shard_rows - in_shard)
            writer.write_batch(batch.slice(0, take))
            in_shard += take
            batch = batch.slice(take)
            if in_shard == cfg.shard_rows:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()
    return names, rows


def _summarise(out_dir: Path, files: list[str], stats: list[InputStats], after: int, cfg: ExtractConfig,
               wall_s: float) -> ExtractSummary:
    def total(attr: str, keys: tuple[str, ...]) -> dict[str, int]:
        return {k: sum(getattr(s, attr)[k] for s in stats) for k in keys}

    return ExtractSummary(
        output_dir=str(out_dir), files=tuple(files), inputs=tuple(stats), dedup=cfg.dedup.value,
        records=sum(s.records for s in stats), pages=sum(s.pages for s in stats),
        links=sum(s.links for s in stats), pairs=sum(s.pairs for s in stats), pairs_after_dedup=after,
        rejected=total("rejected", REJECT_REASONS), ignored=total("ignored", IGNORE_REASONS),
        skipped=total("skipped", SKIP_REASONS), notes=total("notes", NOTES), wall_s=wall_s,
    )


# ---------------------------------------------------------------------------------------------
# Opening inputs

def _check_local(source: str) -> None:
    if "://" in source:
        return
    p = Path(source)
    if not p.exists():
        raise ConfigError(f"input file not found: {source}")
    if p.is_dir():
        raise ConfigError(f"input is a directory, not a file: {source}")


def _open_source(source: str, cfg: ExtractConfig) -> BinaryIO:
    """A binary stream over `source`; ConfigError when it cannot be opened at all."""
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in ("http", "https"):
        return _HttpReader(source, cfg)  # type: ignore[return-value]
    if scheme and scheme != "file":
        try:
            import fsspec

            return fsspec.open(source, "rb").open()
        except ImportError as e:
            pkg = "s3fs" if scheme in ("s3", "s3a") else f"the fsspec back end for {scheme}://"
            raise ConfigError(f"cannot read {source}: install {pkg} ({e})") from None
        except (FileNotFoundError, PermissionError) as e:
            raise ConfigError(f"cannot read {source}: {e}") from None
        except ValueError as e:  # fsspec: unknown protocol
            raise ConfigError(f"cannot read {source}: {e}") from None
    path = source[len("file://"):] if scheme == "file" else source
    try:
        return open(path, "rb")
    except OSError as e:
        raise ConfigError(f"cannot read {source}: {e.strerror or e}") from None


class _CountingReader:
    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.count = 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        return data


class _StreamBroken(OSError):
    """An http(s) input failed mid-stream and the retries are spent."""


class _HttpReader:
    """A streamed http(s) GET that resumes after a broken connection (Range request, or skipping
    what was already read when the server ignores Range). Fatal (ConfigError) only on the first
    open: a 4xx, or every attempt failing."""

    def __init__(self, url: str, cfg: ExtractConfig):
        self.url = url
        self.cfg = cfg
        self.pos = 0
        self.failures = 0
        self._opener = _opener_for(url)
        self.end: int | None = None  # where the body ends, from Content-Length, when known
        self.resp = self._open(0)

    def _open(self, offset: int) -> http.client.HTTPResponse:
        last = ""
        for attempt in range(self.cfg.http_retries + 1):
            if attempt:
                time.sleep(self.cfg.http_backoff_s * 2 ** (attempt - 1))
            headers = {"User-Agent": DEFAULT_USER_AGENT}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                resp = self._opener.open(urllib.request.Request(self.url, headers=headers),
                                         timeout=self.cfg.http_timeout_s)
            except urllib.error.HTTPError as e:
                e.close()
                if e.code != 429 and e.code < 500:
                    raise ConfigError(f"cannot read {self.url}: HTTP {e.code} {e.reason}") from None
                last = f"HTTP {e.code} {e.reason}"
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                last = str(getattr(e, "reason", None) or e) or type(e).__name__
                continue
            start = offset if resp.status == 206 else 0
            length = resp.headers.get("Content-Length")
            self.end = start + int(length) if length and length.isdigit() else None
            if offset and resp.status != 206:  # Range ignored: skip what we already have
                try:
                    _skip_bytes(resp, offset)
                except (OSError, http.client.HTTPException) as e:
                    last = str(e) or type(e).__name__
                    continue
            return resp
        raise ConfigError(f"cannot read {self.url}: {last} ({self.cfg.http_retries + 1} attempts)")

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            return b"".join(iter(lambda: self.read(READ_CHUNK_BYTES), b""))
        while True:
            try:
                data = self.resp.read(n)
                if not data and self.end is not None and self.pos < self.end:
                    # http.client reports a connection closed early as a plain end of body
                    raise http.client.IncompleteRead(b"", self.end - self.pos)
                self.pos += len(data)
                return data
            except (OSError, http.client.HTTPException) as e:
                self.failures += 1
                self.resp.close()
                if self.failures > self.cfg.http_retries:
                    raise _StreamBroken(f"{self.url}: {e}") from None
                log.info("%s: connection broken at byte %d (%s); resuming", self.url, self.pos, e)
                try:
                    self.resp = self._open(self.pos)
                except ConfigError as e2:
                    raise _StreamBroken(str(e2)) from None

    def close(self) -> None:
        self.resp.close()

    def __enter__(self) -> _HttpReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _skip_bytes(resp: http.client.HTTPResponse, n: int) -> None:
    while n > 0:
        got = len(resp.read(min(n, READ_CHUNK_BYTES)))
        if not got:
            raise OSError("body ended before the resume offset")
        n -= got


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    host = (urlsplit(url).hostname or "").lower()
    if host in ("127.0.0.1", "localhost", "::1"):  # loopback never goes through a proxy
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


# ---------------------------------------------------------------------------------------------
# WARC records: gzip members -> records, with damage counted and skipped

@dataclass(frozen=True, slots=True)
class _Record:
    warc_type: str
    target_uri: str
    content_type: str
    block: bytes


def _raw_chunks(stream: Any, stats: InputStats) -> Iterator[bytes]:
    while True:
        try:
            data = stream.read(READ_CHUNK_BYTES)
        except OSError as e:  # includes _StreamBroken
            log.warning("%s: read error, the rest of this input is lost: %s", stats.source, e)
            stats.skip("read_error")
            return
        if not data:
            return
        yield data


def _decompressed(chunks: Iterator[bytes], stats: InputStats, splitter: _Splitter) -> Iterator[bytes | None]:
    """The input's bytes, gunzipped member by member when it is gzip, in pieces of about
    READ_CHUNK_BYTES. None marks a hole: a corrupt member was dropped (counted) and reading
    resumed at the next gzip header. A gzip stream that ends inside a member sets `splitter.cut`."""
    first = next(chunks, b"")
    if not first:
        return
    if not first.startswith(_GZIP_MAGIC[:2]):
        yield first
        yield from chunks
        return
    inflate = _inflate_module()
    d = inflate.decompressobj(31)
    fed = False  # the current member has received bytes
    resync = False
    pending: list[bytes] = []  # output joined into one piece: one splitter call per ~1 MiB
    pending_bytes = 0
    for chunk in _prepend(first, chunks):
        view = memoryview(chunk)
        pos = 0
        member_start = 0  # where the current member's bytes begin in this chunk
        while pos < len(chunk):
            if resync:
                j = chunk.find(_GZIP_MAGIC, pos)
                if j < 0:
                    break
                pos = member_start = j
                resync = False
            # At most INFLATE_FEED_BYTES per call: at a member's end the decompressor copies all
            # input it was given past that end (unused_data), so a whole chunk per call would
            # copy ~0.5 MiB for every ~2 KiB member.
            piece = view[pos:pos + INFLATE_FEED_BYTES]
            try:
                out = d.decompress(piece, DECOMPRESS_CAP_BYTES)  # capped: a gzip bomb stays small
            except inflate.error:
                if pending:
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
                yield None
                stats.skip("corrupt_gzip")
                d, fed, resync = inflate.decompressobj(31), False, True
                pos = member_start + 1
                continue
            fed = True
            if d.eof:
                pos += len(piece) - len(d.unused_data)
                member_start = pos
                d, fed = inflate.decompressobj(31), False
            else:
                pos += len(piece) - len(d.unconsumed_tail)
            if out:
                pending.append(out)
                pending_bytes += len(out)
                if pending_bytes >= READ_CHUNK_BYTES:
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
    if fed and not d.eof:  # cut short: what it holds goes on; the splitter counts a partial record
        splitter.cut = True
        try:
            tail = d.flush()
        except inflate.error:
            tail = b""
        if tail:
            pending.append(tail)
    if pending:
        yield b"".join(pending)


def _inflate_module() -> Any:
    """zlib-ng when installed (it inflates Common Crawl's small gzip members ~1.5x faster than
    zlib, with the same results and errors), else the standard zlib."""
    try:
        from zlib_ng import zlib_ng

        return zlib_ng
    except ImportError:
        return zlib


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


class _Splitter:
    """Cuts a WARC byte stream into records. Keeps at most one record (plus a read chunk) in
    memory; on damage it counts a reason and resynchronises at the next 'WARC/1.' line."""

    def __init__(self, stats: InputStats, max_record_bytes: int):
        self.stats = stats
        self.max_record_bytes = max_record_bytes
        self.buf = bytearray()
        self.pos = 0
        self.skip_left = 0  # bytes of a too-large record still to discard
        self.in_junk = False  # inside a stretch already counted (not_warc or a damaged record)
        self.cut = False  # the input is known to end mid-stream (a gzip member cut short)

    def feed(self, data: bytes) -> list[_Record]:
        if self.skip_left:
            n = min(self.skip_left, len(data))
            self.skip_left -= n
            data = data[n:]
        self.buf += data
        out = self._parse(eof=False)
        if self.pos > (1 << 20) or self.pos == len(self.buf):
            del self.buf[:self.pos]
            self.pos = 0
        return out

    def hole(self) -> None:
        """A corrupt gzip member was dropped here (already counted): forget the partial record."""
        self.buf.clear()
        self.pos = 0
        self.skip_left = 0
        self.in_junk = True

    def close(self) -> list[_Record]:
        if self.skip_left:
            self.stats.skip("truncated")
            self.skip_left = 0
            return []
        return self._parse(eof=True)

    def _junk(self) -> None:
        if not self.in_junk:
            self.stats.skip("not_warc")
            self.in_junk = True

    def _resync(self, start: int, eof: bool) -> bool:
        """Move to the next 'WARC/1.' line at or after `start`; False if none is buffered yet."""
        buf = self.buf
        if buf.startswith(b"WARC/1.", start):
            self.pos = start
            return True
        j = buf.find(b"\nWARC/1.", start)
        if j >= 0:
            self.pos = j + 1
            return True
        self.pos = len(buf) if eof else max(start, len(buf) - 8)  # keep a possibly split marker
        return False

    def _parse(self, eof: bool) -> list[_Record]:
        out: list[_Record] = []
        buf = self.buf
        while self.pos < len(buf):
            pos = self.pos
            if not buf.startswith(b"WARC/", pos):
                if not eof and len(buf) - pos < 5 and b"WARC/".startswith(bytes(buf[pos:])):
                    break  # may be the start of a record still arriving
                self._junk()
                if not self._resync(pos + 1, eof):
                    break
                continue
            h_end = buf.find(b"\r\n\r\n", pos, pos + MAX_HEADER_BYTES)
            if h_end < 0:
                if len(buf) - pos < MAX_HEADER_BYTES and not eof:
                    break
                self._damaged("bad_header" if len(buf) - pos >= MAX_HEADER_BYTES else "truncated")
                if not self._resync(pos + 1, eof):
                    break
                continue
            headers = _parse_warc_headers(bytes(buf[pos:h_end]))
            try:
                length = int(headers.get("content-length", ""))
                if length < 0:
                    raise ValueError
            except ValueError:
                self._damaged("bad_header")
                if not self._resync(h_end + 4, eof):
                    break
                continue
            body = h_end + 4
            end = body + length
            if length > self.max_record_bytes:
                self._damaged("too_large")
                have = len(buf) - body
                self.skip_left = max(0, length + 4 - have)
                self.pos = min(len(buf), end + 4)
                continue
            if len(buf) < end + 4:
                if not eof:
                    break
                # At the end: a complete block missing only its closing CRLFs is accepted; a
                # block that holds another record's start has a lying Content-Length.
                if len(buf) >= end and b"\r\n\r\n".startswith(bytes(buf[end:])):
                    out.append(_record(headers, bytes(buf[body:end])))
                    self.in_junk = False
                    self.pos = len(buf)
                    continue
                if buf.find(b"\nWARC/1.", body) >= 0:
                    self._damaged("bad_content_length")
                    self._resync(body, eof)
                    continue
                if not self.cut and buf.endswith(b"\r\n\r\n"):  # ends like a whole record: a lie
                    self._damaged("bad_content_length")
                    self.pos = len(buf)
                    break
                self._damaged("truncated")
                self.pos = len(buf)
                break
            if buf[end:end + 4] != b"\r\n\r\n":
                self._damaged("bad_content_length")
                if not self._resync(body, eof):
                    break
                continue
            out.append(_record(headers, bytes(buf[body:end])))
            self.in_junk = False
            self.pos = end + 4
        return out

    def _damaged(self, reason: str) -> None:
        self.stats.skip(reason)
        self.in_junk = True  # the bytes up to the next record belong to this one


def _parse_warc_headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            key = name.strip().lower()
            if key in (b"warc-type", b"warc-target-uri", b"content-length", b"content-type"):
                headers[key.decode("ascii", "replace")] = value.strip().decode("utf-8", "replace")
    return headers


def _record(headers: dict[str, str], block: bytes) -> _Record:
    uri = headers.get("warc-target-uri", "")
    if uri.startswith("<") and uri.endswith(">"):  # WARC/1.0 drafts wrote <uri>
        uri = uri[1:-1]
    return _Record(headers.get("warc-type", "").lower(), uri, headers.get("content-type", "").lower(), block)


def _records(stream: Any, cfg: ExtractConfig, stats: InputStats) -> Iterator[_Record]:
    splitter = _Splitter(stats, cfg.max_record_bytes)
    any_bytes = False
    for data in _decompressed(_raw_chunks(stream, stats), stats, splitter):
        if data is None:
            splitter.hole()
            continue
        any_bytes = True
        yield from splitter.feed(data)
    yield from splitter.close()
    if not any_bytes and stats.records == 0:
        stats.skip("empty_input")


# ---------------------------------------------------------------------------------------------
# Records -> pages -> pairs

def _handle_record(rec: _Record, rules: _LinkRules, writer: _PairWriter, stats: InputStats) -> None:
    if rec.warc_type == "metadata" and ("json" in rec.content_type or rec.block[:1] == b"{"):
        _handle_wat(rec, rules, writer, stats)
    elif rec.warc_type == "response":
        _handle_response(rec, rules, writer, stats)
    else:
        stats.ignore("other_type")


def _handle_wat(rec: _Record, rules: _LinkRules, writer: _PairWriter, stats: InputStats) -> None:
    import orjson

    if _IMG_PATH not in rec.block:  # most WAT records: requests, metadata, pages without images
        stats.ignore("no_img_links")
        return
    try:
        doc = orjson.loads(rec.block)  # also refuses invalid UTF-8 and lone surrogates
    except orjson.JSONDecodeError:
        stats.skip("invalid_json")
        return
    envelope = doc.get("Envelope") if isinstance(doc, dict) else None
    try:
        meta = envelope["Payload-Metadata"]["HTTP-Response-Metadata"]
        html_meta = meta["HTML-Metadata"]
        links = html_meta["Links"]
    except (KeyError, TypeError):
        links = None
    if not isinstance(links, list):
        stats.ignore("no_img_links")
        return
    page_url = rec.target_uri or _dig(envelope, "WARC-Header-Metadata", "WARC-Target-URI") or ""
    head = html_meta.get("Head")
    base = head.get("Base") if isinstance(head, dict) else None
    lang = _wat_lang(meta, head)
    stats.pages += 1
    stats.records += 1
    imgs = [(ln.get("url"), ln.get("alt"), None, None) for ln in links
            if isinstance(ln, dict) and ln.get("path") == "IMG@/src"]
    rules.page(page_url, base if isinstance(base, str) else None, imgs, lang, True, writer)


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _wat_lang(meta: dict, head: Any) -> str | None:
    """WAT keeps no <html lang>; use <meta http-equiv=content-language>, else the HTTP header."""
    if isinstance(head, dict):
        for m in head.get("Metas") or ():
            if isinstance(m, dict) and str(m.get("http-equiv", "")).lower() == "content-language":
                value = m.get("content")
                if isinstance(value, str) and value.strip():
                    return value.strip()[:64]
    headers = meta.get("Headers")
    if isinstance(headers, dict):
        for k, v in headers.items():
            if k.lower() == "content-language" and isinstance(v, str) and v.strip():
                return v.strip()[:64]
    return None


def _handle_response(rec: _Record, rules: _LinkRules, writer: _PairWriter, stats: InputStats) -> None:
    block = rec.block
    if not block.startswith(b"HTTP/"):
        stats.ignore("not_html")  # e.g. a dns: record or a non-HTTP resource
        return
    h_end, sep = block.find(b"\r\n\r\n"), 4
    if h_end < 0:
        h_end, sep = block.find(b"\n\n"), 2
    if h_end < 0:
        stats.skip("bad_http")
        return
    headers = _parse_http_headers(block[:h_end])
    body = block[h_end + sep:]
    ctype = headers.get("content-type", "").lower()
    sniffed = body[:512].lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
    if "html" not in ctype and (ctype or not sniffed):
        stats.ignore("not_html")
        return
    try:
        body = _decode_transfer(body, headers)
    except (ValueError, zlib.error, OSError, EOFError):
        stats.skip("bad_http")
        return
    text = _decode_html(body, ctype, stats)
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(text)
    root = tree.css_first("html")
    lang = (root.attributes.get("lang") or None) if root is not None else None
    if lang is None:
        meta = tree.css_first('meta[http-equiv="content-language" i]')
        lang = (meta.attributes.get("content") or None) if meta is not None else None
    lang = lang or headers.get("content-language") or None
    base_node = tree.css_first("base[href]")
    base = base_node.attributes.get("href") if base_node is not None else None
    stats.pages += 1
    stats.records += 1
    imgs = []
    for node in tree.css("img"):
        a = node.attributes
        alt = a.get("alt", _MISSING)
        imgs.append((a.get("src"), None if alt is _MISSING else (alt or ""),
                     _dimension(a.get("width")), _dimension(a.get("height"))))
    rules.page(rec.target_uri, base, imgs, lang.strip()[:64] if lang else None, False, writer)


_MISSING = object()


def _parse_http_headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


def _decode_transfer(body: bytes, headers: dict[str, str]) -> bytes:
    """Undo chunked transfer and gzip/deflate/br content encoding, which some WARC writers keep
    (Common Crawl stores the decoded payload and renames the headers X-Crawler-*)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    encoding = headers.get("content-encoding", "").lower().strip()
    if encoding in ("gzip", "x-gzip"):
        body = zlib.decompressobj(31).decompress(body)
    elif encoding == "deflate":
        try:
            body = zlib.decompress(body)
        except zlib.error:
            body = zlib.decompress(body, -15)
    elif encoding == "br":
        try:
            import brotli
        except ImportError as e:
            raise ValueError("brotli body, brotli not installed") from e
        body = brotli.decompress(body)
    return body


def _dechunk(body: bytes) -> bytes:
    out = []
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("bad chunked body")
        size = int(body[pos:eol].split(b";", 1)[0].strip() or b"x", 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2


def _decode_html(body: bytes, content_type: str, stats: InputStats) -> str:
    """Bytes -> text: BOM, then the HTTP header's charset, then <meta charset>, else UTF-8."""
    if body.startswith(codecs.BOM_UTF8):
        return body[3:].decode("utf-8", "replace")
    if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return body.decode("utf-16", "replace")
    labels = []
    m = _HTTP_CHARSET.search(content_type)
    if m:
        labels.append(m.group(1))
    m2 = _META_CHARSET.search(body, 0, 4096)
    if m2:
        labels.append(m2.group(1).decode("ascii"))
    for label in labels:
        name = label.lower()
        name = "cp1252" if name in _AS_CP1252 else name
        try:
            codecs.lookup(name)
        except LookupError:
            continue
        if name.replace("-", "").replace("_", "") in ("utf16", "utf16le", "utf16be"):
            name = "utf-8"  # a page that says utf-16 in ASCII bytes is not utf-16 (WHATWG)
        return body.decode(name, "replace")
    if labels:
        stats.notes["charset_fallback"] += 1
    return body.decode("utf-8", "replace")


def _dimension(value: str | None) -> int | None:
    """An HTML width/height attribute as an int (leading digits, as browsers read it)."""
    if not value:
        return None
    m = _LEADING_INT.match(value)
    return int(m.group(1)) if m else None


def _unescape_url(url: str) -> str:
    # Only ';'-terminated references: '&copy=1' in a query string must stay as it is.
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), url)


class _Base:
    """Joins a page's relative src values to its base URL. The common shapes (root-relative,
    protocol-relative, plain relative) are joined by string concatenation; anything with dot
    segments, a query/fragment-only reference or a possible scheme goes to urljoin. Both give
    the same result (tests/test_extract.py checks them against each other)."""

    def __init__(self, base: str):
        self.base = base
        self.scheme = "http"
        self.origin: str | None = None
        self.dir = ""
        self._split = False  # split lazily: many pages have only absolute src values

    def _split_base(self) -> None:
        self._split = True
        try:
            parts = urlsplit(self.base)
        except ValueError:
            return
        if parts.scheme in ("http", "https") and parts.netloc:
            self.scheme = parts.scheme
            self.origin = f"{parts.scheme}://{parts.netloc}"
            path = parts.path or "/"
            self.dir = self.origin + path[:path.rfind("/") + 1]

    def join(self, src: str) -> str:
        if not src:
            return ""
        if not self._split:
            self._split_base()
        if self.origin is not None and not src.startswith(".") and "/." not in src:
            if src.startswith("//"):
                return self.scheme + ":" + src
            first = src[0]
            if first == "/":
                return self.origin + src
            if first not in "?#" and ":" not in src:
                return self.dir + src
        try:
            return urljoin(self.base, src)
        except ValueError:  # e.g. an unbalanced IPv6 bracket
            return ""


class _LinkRules:
    """LAION's link rules (module docstring) applied to a page's img elements."""

    def __init__(self, cfg: ExtractConfig, stats: InputStats):
        self.cfg = cfg
        self.stats = stats

    def page(self, page_url: str, base_href: str | None, imgs: list[tuple[Any, Any, int | None, int | None]],
             lang: str | None, raw_entities: bool, writer: _PairWriter) -> None:
        """Add the page's accepted pairs to `writer`. `raw_entities`: the strings come from a
        WAT, where entities are still encoded; an HTML parser has already decoded them."""
        stats, rej = self.stats, self.stats.rejected
        min_alt, max_chars, max_host = self.cfg.min_alt_chars, self.cfg.max_text_chars, self.cfg.max_host_chars
        base = page_url
        if base_href and base_href.strip():
            href = base_href.strip()
            base = urljoin(page_url, _unescape_url(href) if raw_entities and "&" in href else href)
        join = _Base(base).join
        reject_svg, reject_gif = self.cfg.reject_svg, self.cfg.reject_gif
        match_url = _HTTP_URL.match
        urls: list[str] = []
        captions: list[str] = []
        widths: list[int | None] = []
        heights: list[int | None] = []
        stats.links += len(imgs)
        for src, alt, width, height in imgs:
            if not isinstance(alt, str):
                if min_alt > 0 or alt is not None:
                    rej["no_alt"] += 1
                    continue
                alt = ""
            if raw_entities and "&" in alt:
                alt = html.unescape(alt)
            alt = " ".join(alt.split())
            if len(alt) < min_alt:
                rej["short_alt"] += 1
                continue
            if not isinstance(src, str):
                src = ""
            src = src.strip()
            if raw_entities and "&" in src:
                src = _unescape_url(src)
            low = src.lower()
            if "data:" in low:
                rej["data_uri"] += 1
                continue
            if "javascript:" in low:
                rej["javascript"] += 1
                continue
            if reject_svg and ".svg" in low:
                rej["svg"] += 1
                continue
            if reject_gif and ".gif" in low:
                rej["gif"] += 1
                continue
            if "\n" in src or "\t" in src or "\r" in src:  # browsers drop these inside URLs
                src = src.replace("\n", "").replace("\t", "").replace("\r", "")
                low = src.lower()
            url = src if low.startswith(("http://", "https://")) else join(src)
            m = match_url(url)
            if m is None or (m.group(2) and int(m.group(2)) > 65535):
                rej["invalid_url"] += 1
                continue
            if len(m.group(1)) > max_host:
                rej["long_host"] += 1
                continue
            if len(url) > max_chars:
                url = url[:max_chars]
                stats.notes["url_truncated"] += 1
            if len(alt) > max_chars:
                alt = alt[:max_chars]
                stats.notes["caption_truncated"] += 1
            urls.append(url)
            captions.append(alt)
            widths.append(width)
            heights.append(height)
        if urls:
            stats.pairs += len(urls)
            writer.add_page(urls, captions, page_url, widths, heights, lang)


# ---------------------------------------------------------------------------------------------
# Writing pairs

def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("url", pa.string()), ("caption", pa.string()), ("page_url", pa.string()),
                      ("uid", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                      ("page_lang", pa.string())])


def uid_of(url: str, caption: str) -> str:
    """The stable pair key: first 16 bytes of sha256(url + '\\x00' + caption), hex.

    >>> uid_of("https://a.example/x.jpg", "a red bicycle")
    '51f59d02692bcf304a07832864cf76b8'
    """
    return hashlib.sha256(f"{url}\x00{caption}".encode()).hexdigest()[:32]


class _PairWriter:
    """Buffers pairs and writes them to one Parquet file in row groups of WRITE_CHUNK_ROWS."""

    def __init__(self, path: Path):
        self.path = path
        self._writer: Any = None
        self._cols: tuple[list, ...] = ([], [], [], [], [], [])

    def add_page(self, urls: list[str], captions: list[str], page_url: str, widths: list[int | None],
                 heights: list[int | None], lang: str | None) -> None:
        """One page's pairs: page_url and lang are the same for all of them."""
        c = self._cols
        c[0].extend(urls)
        c[1].extend(captions)
        c[2].extend([page_url] * len(urls))
        c[3].extend(widths)
        c[4].extend(heights)
        c[5].extend([lang] * len(urls))
        if len(c[0]) >= WRITE_CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        urls, caps, pages, widths, heights, langs = self._cols
        if not urls:
            return
        sha = hashlib.sha256
        uids = [sha(f"{u}\x00{c}".encode()).hexdigest()[:32] for u, c in zip(urls, caps)]
        schema = _schema()
        table = pa.Table.from_arrays(
            [pa.array(urls, pa.string()), pa.array(caps, pa.string()),
             pa.array(pages, pa.string()), pa.array(uids, pa.string()),
             pa.array(widths, pa.int32()), pa.array(heights, pa.int32()),
             pa.array(langs, pa.string())], schema=schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, schema, compression="lz4")
        self._writer.write_table(table)
        self._cols = ([], [], [], [], [], [])

    def __enter__(self) -> _PairWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.flush()
        if self._writer is not None:
            self._writer.close()

