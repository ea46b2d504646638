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
one record plus one read chunk (and one batch of links), whatever the file size.

Each step has a fast path and the plain reference it is tested against (tests/test_extract.py):
    inflate       whole members with libdeflate, each checked by its CRC-32 and length;
                  from the first member that fails, the streaming zlib(-ng) decompressor
    WARC headers  a few byte searches for the usual `Name: value` layout; else a line parser
    WAT JSON      msgspec decodes only the fields read (extract_wat.py); a record it refuses
                  gets a full orjson parse, which decides. The one difference: a number beyond
                  a double's range in a field never read no longer makes the record invalid_json
    link rules    Polars expressions over LINK_BATCH links at once (extract_vec.py); entities,
                  dot segments and odd characters go to `_check_link`, one link at a time
    native        gzipped WAT records, where a C compiler is at hand: extract_native.c inflates,
                  splits, classifies and parses the members, and applies the link rules, for
                  the cases the fast paths above settle; any other record (a response, odd
                  JSON, a damaged member) goes to the Python path as bytes, any other link to
                  `_check_link`. Built once into $FASTLAION_KERNEL_CACHE; FASTLAION_NATIVE=0,
                  or no compiler, leaves everything to the Python path

Per input file (one process each, `processes` at a time), the pairs are written to a temporary
Parquet in chunks as they are found; at the end Polars deduplicates all of them lazily (first
occurrence kept, input order kept) and writes `candidates-NNNNN.parquet` shards plus
`extract_stats.json`. The candidates are a valid `fastlaion run` input (columns url, caption).

Counting (it adds up; `ExtractSummary` and extract_stats.json carry all of it):
    records = pages + sum(ignored) + sum(skipped)
    links   = sum(rejected) + pairs          (links: IMG src entries seen on pages)
    pairs   = pairs_after_dedup + duplicates

Link rules, checked in this order; a link is counted under the first rule it fails:
    opt_out      the page opts out: its robots <meta> (name robots, fastlaion or img2dataset;
                 directives split at commas and spaces), its X-Robots-Tag header (Google's
                 syntax, as the downloader reads it; every value of a repeated one) or a
                 <meta http-equiv=X-Robots-Tag> carries one of `page_opt_out_tags` (default
                 noai, noimageai: the AI opt-outs); every image link of the page is rejected
    no_alt       the img has no alt attribute (kept with an empty caption if min_alt_chars == 0)
    short_alt    alt, entity-decoded and whitespace-folded, under `min_alt_chars` (LAION: 5)
    data_uri     src contains "data:image" (LAION; a data: URI of another type is invalid_url)
    javascript   src contains "javascript:" (LAION)
    svg          src contains ".svg" (LAION; `reject_svg=False` / --keep-svg keeps them)
    gif          src contains ".gif" (LAION; `reject_gif=False` / --keep-gif keeps them)
    invalid_url  after joining to the page (or <base href>): not http(s), no host, bad host or port
                 (a host WHATWG's host parser refuses, see below)
    long_host    hostname longer than `max_host_chars` (LAION: 60)
The substring rules are LAION's and match anywhere in the src, case-insensitively: a Wikipedia
thumbnail `.../Flag.svg/18px-Flag.svg.png` counts as svg, as it did for LAION.
A kept URL's scheme, host and port are written as the WHATWG URL standard (browsers, and yarl
when aiohttp fetches it) serialises them (`fold_case`): scheme and host in lower case, a
non-ASCII host in punycode by UTS #46 (an emoji or '_' too, which the idna package refuses, as
browsers do), no port where it is the scheme's default (`:80`, `:443`) or empty; path, query,
fragment and userinfo as written; a percent-encoded host is decoded first (`http://%65xample.com/`). So
`HTTPS://Example.COM:443/a.jpg`, `http://Bücher.example/b.jpg` and
`http://xn--bcher-kva.example:80/b.jpg` dedup with their plain spellings, and are fetched once;
an IPv4 address in another spelling (`http://0x7f.1/`, `http://2130706433/`) is written in
dotted decimal. A host that the standard's host parser refuses (bytes that are not UTF-8 or a
forbidden code point once decoded, in a non-ASCII host an "xn--" label that is not punycode of
a valid label (an ASCII host's are not checked, as browsers do not: whatwg/url#914), a non-ASCII
host breaking RFC 5893's Bidi Rule in any label (`1a.אב`), a host ending in a number that is no
IPv4 address: `_parse_host`) is
invalid_url: no browser fetches it. The rules (long_host) measure the host as written; uid is
computed from the URL as kept. page_url is written as found: it is no dedup key, and the
relative srcs joined to it are folded after the join.
Kept URL and caption are cut to `max_text_chars` (LAION: 2000); `notes` counts the cuts
(url_truncated, caption_truncated) and the WARC pages whose declared charsets are all unknown,
read as UTF-8 (charset_fallback).

Record reasons. Ignored (normal, not errors):
    other_type     warcinfo, request, revisit, ... records, and WARC metadata records
    not_html       a WARC response whose content is not HTML
    no_img_links   a WAT record that lists no IMG@/src link (request and metadata records too)
Skipped (damaged input; reading goes on with the next record):
    empty_input         the input holds no bytes at all
    not_warc            a stretch of bytes that is not a WARC record (counted once per stretch)
    bad_header          a WARC header without a usable Content-Length, over 64 KiB, or cut
                        short by the next record's
    bad_content_length  the record's Content-Length does not end where the next record starts
    too_large           a record over `max_record_bytes` (skipped unread), or a WARC response whose
                        gzip/deflate body inflates to more (a bomb of a few MB would take gigabytes)
    truncated           the input ended inside a record (e.g. a gzip file cut short)
    corrupt_gzip        a gzip member that does not decompress (reading resumes at the next one)
    read_error          the input could not be read further (retries spent); what came before is kept.
                        One that cannot be opened at all (an http 404, every attempt failing)
                        counts one, named in its `error`; the others are extracted. Only when
                        no input can be opened does the extraction fail.
    invalid_json        a WAT record that mentions IMG@/src but is not valid JSON
    bad_http            a WARC response whose HTTP head or chunked/compressed body does not decode
    unsupported_encoding  a WARC HTML response in a Content-Encoding or Transfer-Encoding not
                        decoded here (zstd, compress, an unknown one, br without the `brotli`
                        package): not read as HTML, which its compressed bytes are not (gzip,
                        x-gzip, deflate, br and identity are decoded, and chunked transfer, each
                        of a list such as "gzip, br", or of one header on several lines)

`uid` is the first 16 bytes of sha256(url + "\\x00" + caption) as 32 hex characters: stable
across runs, machines and library versions (unlike Polars' own hash).
"""

from __future__ import annotations

import array
import codecs
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import html
import itertools
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
import unicodedata
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from .config import (DEFAULT_USER_AGENT, ConfigError, DedupMode, ExtractConfig, no_file_above, oversubscribed,
                     polars_io)
from .interrupt import ctrl_c_deferred, ctrl_c_held, release_ctrl_c
from .ipv4 import dotted, ends_in_number, ipv4_number
from .lock import output_lock

if TYPE_CHECKING:  # imported where an http(s) input is read: a local file does not need them
    import http.client
    import urllib.request

log = logging.getLogger(__name__)

DEFAULT_CC_BASE_URL = "https://data.commoncrawl.org/"
# opt_out last here, though checked first: the compiled rules count the others in this order
REJECT_REASONS = ("no_alt", "short_alt", "data_uri", "javascript", "svg", "gif", "invalid_url", "long_host", "opt_out")
IGNORE_REASONS = ("other_type", "not_html", "no_img_links")
SKIP_REASONS = ("empty_input", "not_warc", "bad_header", "bad_content_length", "too_large", "truncated",
                "corrupt_gzip", "read_error", "invalid_json", "bad_http", "unsupported_encoding")
NOTES = ("url_truncated", "caption_truncated", "charset_fallback")
WARC_SUFFIXES = (".warc", ".warc.gz", ".wat", ".wat.gz")  # .warc.wat.gz ends in .wat.gz
READ_CHUNK_BYTES = 1 << 20
DECOMPRESS_CAP_BYTES = 8 << 20  # most output one decompress call may make
INFLATE_FEED_BYTES = 8 << 10  # most compressed input one decompress call is given
WRITE_CHUNK_ROWS = 65_536  # pairs buffered per input before they go to its temporary Parquet (a row group)
# zstd level 1: 7 % larger files than Polars' default level, half the CPU to write them
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 1}
LINK_BATCH = 65_536  # WAT links queued before the vectorised rules check them (~15 MB)
# Python-path WAT links of one flush that the reference checks one by one when the native
# writer is there (a few pages the native scanner left to Python): fewer than Polars' import costs
REFERENCE_LINKS = 4096
MAX_HEADER_BYTES = 64 << 10
_MEMBER_TRIES = 8  # gzip header look-alikes tried as a member's end before the streaming path takes over
TICK_RECORDS = 2000  # progress is reported every this many records
CRAWL_ID = re.compile(r"CC-MAIN-\d{4}-\d{2}")
STATS_FILE = "extract_stats.json"  # written last: candidates without it are no whole extraction

_GZIP_MAGIC = b"\x1f\x8b\x08"
_GZIP_TRAILER = struct.Struct("<II")  # CRC-32 and length of a member's output
_IMG_PATH = b'"IMG@/src"'
# scheme://[userinfo@]host[:port] then path/query/fragment or the end. The host may be an
# IPv6 literal or any run of characters that cannot end or break an authority (IDN allowed).
_HTTP_URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://(?:[^/?#@]*@)?"
                       r"(\[[0-9A-Fa-f:.]+\]|[^\s/?#@:\[\]<>\"'{}|\\^`]+)(?::(\d*))?(?:[/?#]|$)")
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9A-Fa-f]+|[A-Za-z][A-Za-z0-9]*);")
_LEADING_INT = re.compile(r"\s*\+?(\d{1,9})")
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.I)
# An XHTML page's <?xml ... encoding="..."?>, read before the metas as browsers do (HTML's prescan)
_XML_ENCODING = re.compile(rb"""<\?xml[^>]{0,200}?encoding\s*=\s*["']\s*([A-Za-z0-9_.:\-]+)""")
_HTTP_CHARSET = re.compile(r"""charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.I)
# The charset labels browsers know (the WHATWG Encoding Standard's table) and the Python codec that
# decodes each as they do. Python's own names would take labels no browser reads (utf-7, utf-32,
# 'hex', 'undefined': some not text codecs at all) and decode the legacy ones by the narrower
# standard where browsers use the vendor's superset: iso-8859-1 and ascii as windows-1252 (0x80-0x9F),
# gb2312 as GBK (gb18030), shift_jis as cp932, euc-kr as cp949, big5 as Big5-HKSCS. UTF-16 labels
# in ASCII bytes mean UTF-8 and x-user-defined windows-1252 (the standard's rule for <meta>).
_CHARSET_LABELS = {
    "utf-8": "unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8 "
             "csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff unicodefffe utf-16 utf-16be utf-16le",
    "cp866": "866 cp866 csibm866 ibm866",
    "iso8859_2": "csisolatin2 iso-8859-2 iso-ir-101 iso8859-2 iso88592 iso_8859-2 iso_8859-2:1987 l2 latin2",
    "iso8859_3": "csisolatin3 iso-8859-3 iso-ir-109 iso8859-3 iso88593 iso_8859-3 iso_8859-3:1988 l3 latin3",
    "iso8859_4": "csisolatin4 iso-8859-4 iso-ir-110 iso8859-4 iso88594 iso_8859-4 iso_8859-4:1988 l4 latin4",
    "iso8859_5": "csisolatincyrillic cyrillic iso-8859-5 iso-ir-144 iso8859-5 iso88595 iso_8859-5 iso_8859-5:1988",
    "iso8859_6": "arabic asmo-708 csiso88596e csiso88596i csisolatinarabic ecma-114 iso-8859-6 iso-8859-6-e "
                 "iso-8859-6-i iso-ir-127 iso8859-6 iso88596 iso_8859-6 iso_8859-6:1987",
    "iso8859_7": "csisolatingreek ecma-118 elot_928 greek greek8 iso-8859-7 iso-ir-126 iso8859-7 iso88597 "
                 "iso_8859-7 iso_8859-7:1987 sun_eu_greek",
    "iso8859_8": "csiso88598e csisolatinhebrew hebrew iso-8859-8 iso-8859-8-e iso-ir-138 iso8859-8 iso88598 "
                 "iso_8859-8 iso_8859-8:1988 visual csiso88598i iso-8859-8-i logical",
    "iso8859_10": "csisolatin6 iso-8859-10 iso-ir-157 iso8859-10 iso885910 l6 latin6",
    "iso8859_13": "iso-8859-13 iso8859-13 iso885913",
    "iso8859_14": "iso-8859-14 iso8859-14 iso885914",
    "iso8859_15": "csisolatin9 iso-8859-15 iso8859-15 iso885915 iso_8859-15 l9",
    "iso8859_16": "iso-8859-16",
    "koi8_r": "cskoi8r koi koi8 koi8-r koi8_r",
    "koi8_u": "koi8-ru koi8-u",
    "mac_roman": "csmacintosh mac macintosh x-mac-roman",
    "cp874": "dos-874 iso-8859-11 iso8859-11 iso885911 tis-620 windows-874",
    "cp1250": "cp1250 windows-1250 x-cp1250",
    "cp1251": "cp1251 windows-1251 x-cp1251",
    "cp1252": "ansi_x3.4-1968 ascii cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 iso8859-1 iso88591 "
              "iso_8859-1 iso_8859-1:1987 l1 latin1 us-ascii windows-1252 x-cp1252 x-user-defined",
    "cp1253": "cp1253 windows-1253 x-cp1253",
    "cp1254": "cp1254 csisolatin5 iso-8859-9 iso-ir-148 iso8859-9 iso88599 iso_8859-9 iso_8859-9:1989 l5 "
              "latin5 windows-1254 x-cp1254",
    "cp1255": "cp1255 windows-1255 x-cp1255",
    "cp1256": "cp1256 windows-1256 x-cp1256",
    "cp1257": "cp1257 windows-1257 x-cp1257",
    "cp1258": "cp1258 windows-1258 x-cp1258",
    "mac_cyrillic": "x-mac-cyrillic x-mac-ukrainian",
    "gb18030": "chinese csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 x-gbk gb18030",
    "big5hkscs": "big5 big5-hkscs cn-big5 csbig5 x-x-big5",
    "euc_jp": "cseucpkdfmtjapanese euc-jp x-euc-jp",
    "iso2022_jp": "csiso2022jp iso-2022-jp",
    "cp932": "csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis",
    "cp949": "cseuckr csksc56011987 euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 ksc5601 ksc_5601 "
             "windows-949",
}
_CHARSETS = {label: codec for codec, labels in _CHARSET_LABELS.items() for label in labels.split()}


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
    reader: str = "python"  # "native": the compiled WAT path read (some of) it; "python": only the Python path
    written: int = 0  # rows in its Parquet: `pairs`, less the duplicates within it that its writer dropped
    unique_on: str | None = None  # the key those rows are unique on already (its writer dropped the duplicates)
    error: str | None = None  # why it could not be opened at all (then nothing else was read of it)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self.records += 1

    def not_warc(self) -> str | None:
        """Its counts, e.g. 'not_warc 1', when not one WARC record was found in the input (an
        empty file, a JPEG, gzip that is not a WARC's), else None."""
        junk = {r: self.skipped[r] for r in ("empty_input", "not_warc", "corrupt_gzip") if self.skipped[r]}
        if not junk or sum(junk.values()) != self.records:
            return None
        return ", ".join(f"{r} {n:,}" for r, n in junk.items())

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


class NoProgress:
    """An ExtractProgress that draws nothing (`fastlaion extract --no-progress`, library use)."""

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
    if not paths:  # else "no input given ... or --crawl", to a command given --crawl
        raise ConfigError(f"{listing} lists no WAT file: the crawl {crawl} has nothing to read")
    if len(paths) < n_files:
        log.warning("crawl %s lists %d WAT files; --files %d asks for more", crawl, len(paths), n_files)
    return [f"{base}/{p.lstrip('/')}" for p in paths[:n_files]]


def extract_to_parquet(sources: list[str], out_dir: Path, cfg: ExtractConfig,
                       progress: ExtractProgress | None = None,
                       written: Callable[[Path], None] | None = None) -> ExtractSummary:
    """Extract candidate pairs from every source (local path, http(s) URL or fsspec URL such as
    s3://) into out_dir/candidates-NNNNN.parquet, deduplicated over all sources; write
    out_dir/extract_stats.json. Raises ConfigError for a bad option or an unreadable source.

    An earlier extraction in out_dir is replaced, and only once the new one is whole
    (`_commit`); `written(out_dir)` is called when it is in place (a Ctrl-C from then on finds
    the new output there)."""
    cfg.validate()
    if not sources:
        raise ConfigError("no input given: pass one or more WAT/WARC files or URLs, or --crawl")
    for s in sources:
        _check_local(s)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output exists and is not a folder: {out_dir}")
    no_file_above("--output", out_dir)
    made = not out_dir.exists()  # removed again when nothing is written
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        # A second extract into the folder took the first one's .extract-partial/ for a crash's
        # leftovers and removed it: the first failed, or took the second's part files for its own
        with output_lock(out_dir, "extract"):
            return _extract_locked(sources, out_dir, cfg, progress or NoProgress(), written)
    except BaseException:
        if made:  # an input that cannot be read, or Ctrl-C: "nothing was written" leaves nothing
            shutil.rmtree(out_dir / ".extract-partial", ignore_errors=True)
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


def _extract_locked(sources: list[str], out_dir: Path, cfg: ExtractConfig, progress: ExtractProgress,
                    written: Callable[[Path], None] | None) -> ExtractSummary:
    partial = out_dir / ".extract-partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    start = time.perf_counter()
    jobs = [_Job(i, s, partial / f"part-{i:06d}.parquet", cfg) for i, s in enumerate(sources)]
    progress.start(len(jobs))
    try:
        stats = _run_jobs(jobs, cfg, progress)
        _check_any_opened(stats)
        files, after = _dedup_and_shard([j.part for j in jobs], partial, cfg, stats)
        summary = _summarise(out_dir, files, stats, after, cfg, time.perf_counter() - start)
        payload = {**summary.to_dict(), "config": cfg.to_dict()}
        (partial / STATS_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        _commit(partial, out_dir, files, written)
    finally:
        progress.stop()
        shutil.rmtree(partial, ignore_errors=True)
    for st in stats:  # counted as skipped like other damage, and named: which of many inputs it was
        if st.error is not None:
            log.warning("%s; its pairs are missing from this extraction; the other inputs were extracted", st.error)
        elif (why := st.not_warc()) is not None:
            log.warning("%s holds no WARC record (%s): not a WARC/WAT file?", st.source, why)
    return summary


def _check_any_opened(stats: list[InputStats]) -> None:
    """ConfigError when no input could be opened: a mistyped URL, a crawl's files all missing.
    Nothing is written then, as before inputs that fail alone were extracted around."""
    errors = [s.error for s in stats if s.error is not None]
    if errors and len(errors) == len(stats):
        more = f" (and {len(errors) - 1:,} more input(s) that could not be read)" if len(errors) > 1 else ""
        raise ConfigError(errors[0] + more)


def _commit(partial: Path, out_dir: Path, files: list[str], written: Callable[[Path], None] | None) -> None:
    """Put the new candidates and extract_stats.json (all in `partial`) in the place of an
    earlier extraction's, through a Ctrl-C, which lands once they are all there. The shards used
    to be written into out_dir one by one, the earlier ones deleted first: a Ctrl-C among them
    left some new shards, or none, beside the earlier extract_stats.json, and the command said
    nothing was written. extract_stats.json goes first and comes back last: candidates without
    it beside them (a kill in between) are no whole extraction (`fastlaion run` extracts again)."""
    with ctrl_c_deferred():
        (out_dir / STATS_FILE).unlink(missing_ok=True)
        for old in out_dir.glob("candidates-*.parquet"):
            old.unlink()
        for name in files:
            os.replace(partial / name, out_dir / name)
        os.replace(partial / STATS_FILE, out_dir / STATS_FILE)
        if written is not None:
            written(out_dir)


def extract_file(source: str, part_path: Path, cfg: ExtractConfig,
                 tick: Callable[[int, int], None] | None = None) -> InputStats:
    """Extract one source into Parquet files `part_path.stem-NNNN.parquet` beside `part_path`
    (`_PairWriter.files([part_path])`; none when no pair is found)."""
    stats = InputStats(source)
    t0 = time.perf_counter()
    try:
        opened = _open_source(source, cfg)
    except ConfigError as e:  # one of many crawl files answering 404 loses that file, not the others
        stats.error = str(e)
        stats.skip("read_error")
        if tick is not None:
            tick(1, 0)
        stats.elapsed_s = time.perf_counter() - t0
        return stats
    with opened as stream, _PairWriter(part_path, cfg.dedup) as writer:
        counted = _CountingReader(stream)
        rules = _LinkRules(cfg, stats, writer)
        splitter = _Splitter(stats, cfg.max_record_bytes, _RecordHandler(rules, stats).record)
        any_bytes = False
        last_records = last_pairs = 0
        native = _native_scanner(cfg)
        try:
            for data in _decompressed(_raw_chunks(counted, stats), stats, splitter, native):
                if data is None:
                    splitter.hole()
                    continue
                if isinstance(data, bytes | bytearray):
                    any_bytes = True
                    splitter.feed(data)
                else:
                    stats.reader = "native"  # the compiled scanner read (some of) it
                    any_bytes = _native_batch(data, splitter, rules, stats) or any_bytes
                if tick is not None and stats.records - last_records >= TICK_RECORDS:
                    tick(stats.records - last_records, stats.pairs - last_pairs)
                    last_records, last_pairs = stats.records, stats.pairs
            splitter.close()
            if not any_bytes and stats.records == 0:
                stats.skip("empty_input")
            rules.flush()
        finally:
            rules.close()
            if native is not None:
                native.close()
        stats.bytes_read = counted.count
    stats.written, stats.unique_on = writer.rows_out, writer.unique_on
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
    release_ctrl_c(ignore=True)  # Ctrl-C is the parent's: it stops the pool (_stop_pool)
    _worker_queue = queue
    if _USE_NATIVE:
        from .extract_native import tune_malloc

        tune_malloc()  # an extract worker only extracts


def _run_in_worker(job: _Job) -> InputStats:
    def tick(records: int, pairs: int) -> None:
        _worker_queue.put((records, pairs))

    return extract_file(job.source, job.part, job.cfg, tick)


def _run_jobs(jobs: list[_Job], cfg: ExtractConfig, progress: ExtractProgress) -> list[InputStats]:
    n_workers = cfg.worker_count(len(jobs))
    if n_workers > 1 and (warning := oversubscribed(n_workers, f"--processes {cfg.processes}",
                                                    "each reads an input file of its own")):
        log.warning("%s", warning)
    if n_workers == 1:
        out = []
        for job in jobs:
            out.append(extract_file(job.source, job.part, cfg, progress.advance))
            progress.input_done(out[-1])
        return out
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    if _USE_NATIVE:  # built here once, so the workers load it instead of each compiling their own
        from .extract_native import library

        library()
    # spawn, not fork: the parent may hold Polars/Arrow thread pools, which fork would copy locked.
    ctx = mp.get_context("spawn")
    ticks = ctx.Queue()
    results: dict[int, InputStats] = {}
    futures: dict[Any, _Job] = {}
    pending: set[Any] = set()
    # Managed by hand, not `with`: its exit waits for every running job, and the workers ignore
    # Ctrl-C, so a Ctrl-C must go through _stop_pool wherever it lands (submitting, waiting for
    # results, or waiting for the running jobs after another job's error).
    _quiet_pool_manager()
    pool = cf.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=(ticks,))
    try:
        with ctrl_c_held():  # submit starts the workers: they ignore Ctrl-C from their first instruction
            for job in jobs:
                futures[pool.submit(_run_in_worker, job)] = job
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            _drain(ticks, progress, queue_mod.Empty)
            for fut in done:
                results[futures[fut].index] = fut.result()  # re-raises ConfigError and bugs
                progress.input_done(results[futures[fut].index])
    except KeyboardInterrupt:
        _stop_pool(pool)
        raise
    except BaseException:
        for fut in pending:
            fut.cancel()
        _shutdown(pool)  # the running jobs finish; a Ctrl-C meanwhile stops them
        raise
    _shutdown(pool)
    _drain(ticks, progress, queue_mod.Empty)
    return [results[j.index] for j in jobs]


def _shutdown(pool: Any) -> None:
    try:
        pool.shutdown(wait=True)
    except KeyboardInterrupt:
        _stop_pool(pool)
        raise


def _stop_pool(pool: Any) -> None:
    """Ctrl-C: end the workers now (they ignore SIGINT), not after their files, and wait for the
    pool to see them gone. Their futures are left pending, not cancelled: the pool then fails
    them as broken, where Python 3.11 would print an InvalidStateError traceback for a cancelled
    one."""
    processes = getattr(pool, "_processes", None) or {}  # pid -> Process (no public handle)
    for proc in list(processes.values()):
        proc.terminate()
    pool.shutdown(wait=True)


def _quiet_pool_manager() -> None:
    """A process pool's manager thread, while the pool is torn down (after an input failed, or
    on Ctrl-C), can find one of its pipes already closed (Python 3.11: "OSError: handle is
    closed") and die with a traceback on stderr, before our one-line message (a fresh-clone CI
    run saw it twice in ten). Only then does that thread meet a closed pipe, so its OSError is
    not shown; any other thread's exception is, as before. Installed once per process."""
    previous = threading.excepthook
    if getattr(previous, "_fastlaion_quiet_pool", False):
        return

    def quiet(args: Any) -> None:
        if type(args.thread).__name__ == "_ExecutorManagerThread" and issubclass(args.exc_type, OSError):
            log.debug("process pool manager thread: %s", args.exc_value)
            return
        previous(args)

    quiet._fastlaion_quiet_pool = True  # type: ignore[attr-defined]
    threading.excepthook = quiet


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


def _dedup_and_shard(parts: list[Path], folder: Path, cfg: ExtractConfig,
                     stats: list[InputStats]) -> tuple[list[str], int]:
    """Deduplicate the per-input Parquets lazily (first occurrence in input order kept) and cut
    the result into candidates-NNNNN.parquet shards in `folder` (the partial folder that
    `_commit` moves them from). Returns (file names, rows written).
    One part file that is already unique on the key (or no dedup) and fits one shard is
    renamed into place: no Polars."""
    existing = [str(f) for f in _PairWriter.files(parts)]
    merged = folder / "merged.parquet"
    key = cfg.dedup.value
    if not existing:
        _write_empty(merged)
        rows = 0
    elif len(existing) == 1 and all(cfg.dedup is DedupMode.none or s.unique_on == key for s in stats if s.written):
        os.replace(existing[0], merged)  # nothing to merge: the one part is the result
        rows = sum(s.written for s in stats)
    else:
        import polars as pl

        lf = pl.scan_parquet(existing, glob=False)
        if cfg.dedup is not DedupMode.none:
            lf = lf.unique(subset=[key], keep="first", maintain_order=True)
        with polars_io(merged):
            lf.sink_parquet(merged, **PARQUET_OPTIONS)
        rows = pl.scan_parquet(merged, glob=False).select(pl.len()).collect().item()
    if rows <= cfg.shard_rows:
        name = "candidates-00000.parquet"
        os.replace(merged, folder / name)
        return [name], rows
    import polars as pl

    names = [f"candidates-{k:05d}.parquet" for k in range(-(-rows // cfg.shard_rows))]
    for k, name in enumerate(names):
        with polars_io(folder / name):
            pl.scan_parquet(merged, glob=False).slice(k * cfg.shard_rows, cfg.shard_rows).sink_parquet(
                folder / name, **PARQUET_OPTIONS)
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
    what was already read when the server ignores Range). ConfigError only on the first open (a
    4xx, or every attempt failing): `extract_file` counts that input a `read_error`."""

    def __init__(self, url: str, cfg: ExtractConfig):
        self.url = url
        self.cfg = cfg
        self.pos = 0
        self.failures = 0
        self._opener = _opener_for(url)
        self.end: int | None = None  # where the body ends, from Content-Length, when known
        self.resp = self._open(0)

    def _open(self, offset: int) -> http.client.HTTPResponse:
        import http.client
        import urllib.error
        import urllib.request

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
        import http.client

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
    import urllib.request

    host = (urlsplit(url).hostname or "").lower()
    if host in ("127.0.0.1", "localhost", "::1"):  # loopback never goes through a proxy
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


# ---------------------------------------------------------------------------------------------
# WARC records: gzip members -> records, with damage counted and skipped

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


def _decompressed(chunks: Iterator[bytes], stats: InputStats, splitter: _Splitter,
                 native: Any = None) -> Iterator[Any]:
    """The input's bytes, gunzipped member by member when it is gzip. None marks a hole: a corrupt
    member was dropped (counted) and reading resumed at the next gzip header. A gzip stream that
    ends inside a member sets `splitter.cut`.

    Two inflaters give the same bytes. Whole members go through libdeflate while each one checks
    out (the fast path: Common Crawl writes one small member per record); from the first member
    that does not (corrupt, cut short, junk after it, too large), the rest of the input goes
    through the streaming decompressor, which is the reference for damaged input and sees the
    same read chunks it would have seen alone."""
    first = next(chunks, b"")
    if not first:
        return
    if not first.startswith(_GZIP_MAGIC[:2]):
        at = _gzip_after_junk(first)
        if at < 0:
            yield first
            yield from chunks
            return
        # Junk, then gzip members (`curl -i`'s HTTP head saved before a .warc.gz): the junk read
        # as plain text hid every member behind it as one not_warc stretch
        stats.skip("not_warc")
        yield None
        first = first[at:]
    rest = yield from _whole_members(_prepend(first, chunks), native)
    if rest:
        yield from _inflate_stream(itertools.chain(rest, chunks), stats, splitter)


def _gzip_after_junk(first: bytes) -> int:
    """Where gzip members begin in an input's first read chunk that starts with neither a gzip
    header nor a WARC record, when one does and no WARC record starts before it; else -1. An
    uncompressed WARC starts with its record ("WARC/1."), whose payloads may hold gzip bytes."""
    if first.startswith(b"WARC/"):
        return -1
    at = first.find(_GZIP_MAGIC)
    return at if at > 0 and b"WARC/1." not in first[:at] else -1


def _whole_members(chunks: Iterator[bytes], native: Any = None) -> Generator[Any, None, list[bytes]]:
    """Inflate complete gzip members with libdeflate, one call each. A member runs from one gzip
    header to the next; it counts only if libdeflate inflates it, its size stays under
    DECOMPRESS_CAP_BYTES, and its trailer (CRC-32 and length) is the last 8 bytes before the
    next header, so a header look-alike inside compressed data or junk between members cannot
    pass. Returns [] when all input was read, else the read chunks from a member start on (the
    first one cut there) that the streaming decompressor must take over; the chunks not yet
    read stay in `chunks`.

    With `native` (the compiled scanner, extract_native.py) in front: it inflates and classifies
    the members that check out at their first possible end and yields them as a Batch; where it
    stops, the loop below takes one member as it would without it and calls the scanner again.
    Same members, same order, same return."""
    member = _member_inflater()
    if member is None:  # without libdeflate everything goes through the streaming decompressor
        return [next(chunks)]
    parts: list[bytes] = []  # the read chunks the unread bytes come from, the first cut at `start`
    for chunk in chunks:
        at = _straddling_member(parts, chunk, native) if parts and native is not None else -1
        keep = at >= 0  # the member cut at the last chunk's end is in the scanner's batch: this chunk
        if keep:        # is read in place, its members added to that batch
            parts, buf, start = [chunk], chunk, at
        else:
            parts.append(chunk)
            buf = b"".join(parts) if len(parts) > 1 else chunk
            start = 0
        view = memoryview(buf)
        while True:
            if native is not None:
                start, full = native.scan(buf, start, keep)
                keep = False
                batch = native.take()
                if batch is not None:
                    yield batch
                    if full:
                        continue  # its buffers were full: scan on from where it stopped
            if not buf.startswith(_GZIP_MAGIC, start):
                if len(buf) - start >= len(_GZIP_MAGIC):
                    view.release()
                    return _last_bytes(parts, len(buf) - start)  # not a gzip header: junk
                break
            end = buf.find(_GZIP_MAGIC, start + 20)
            out = None
            for _ in range(_MEMBER_TRIES):
                if end < 0:
                    break
                out = member(buf, view, start, end)
                if out is not None:
                    break
                end = buf.find(_GZIP_MAGIC, end + 1)
            if out is None:
                if end < 0:
                    break  # the member goes on in the next chunk
                view.release()
                return _last_bytes(parts, len(buf) - start)  # a member that does not check out
            if out:
                yield out
            start = end
        view.release()
        parts = _last_bytes(parts, len(buf) - start)
        if len(buf) - start > DECOMPRESS_CAP_BYTES:
            return parts
    if parts:
        buf = b"".join(parts)
        out = member(buf, memoryview(buf), 0, len(buf))
        if out is None:
            return parts  # the last member is damaged or cut short
        if out:
            yield out
    return []


def _straddling_member(parts: list[bytes], chunk: bytes, native: Any) -> int:
    """The member that starts in `parts` (the unread end of the last chunks) and ends in `chunk`,
    through the scanner alone: its bytes and the next header's are joined (a few KB) rather than
    all of `chunk` onto them. Returns where the scan of `chunk` goes on, the members taken left
    in the scanner's batch for that scan to add to; or -1 when the scanner did not take all of
    `parts` and `chunk` up to the chunk's first header (a header look-alike, damage, a member
    too large for its buffers, no header in the chunk): then nothing it took is used (the
    caller's next scan starts a new batch), the caller joins as before and the usual loop
    decides, so the members and their order are the same either way."""
    head = b"".join(parts) if len(parts) > 1 else parts[0]
    end = chunk.find(_GZIP_MAGIC)
    if end < 0 or len(head) + end < 20:
        return -1
    at, _ = native.scan(head + chunk[:end + len(_GZIP_MAGIC)], 0)
    return end if at == len(head) + end else -1


def _member_inflater() -> Callable[[bytes, memoryview, int, int], bytearray | None] | None:
    """member(buf, view, start, end): the output of the gzip member buf[start:end] when it is one
    whole member (libdeflate inflates it, its trailer's CRC-32 matches, its size is plausible),
    else None. None when libdeflate (the `deflate` package) is not installed."""
    try:
        import deflate
    except ImportError:
        return None
    inflate, crc32, error = deflate.gzip_decompress, deflate.crc32, deflate.DeflateError

    def member(buf: bytes, view: memoryview, start: int, end: int) -> bytearray | None:
        if end - start < 20:
            return None
        crc, size = _GZIP_TRAILER.unpack_from(buf, end - 8)
        if size > DECOMPRESS_CAP_BYTES or size > 1032 * (end - start):
            return None  # 1032:1 is deflate's largest ratio: a bigger claim is not a member end
        try:
            out = inflate(view[start:end])
        except (error, ValueError, MemoryError):
            return None
        return out if crc32(out) == crc else None

    return member


def _native_scanner(cfg: ExtractConfig) -> Any:
    """The compiled WAT scanner for one input, or None: the Python path reads it."""
    if not _USE_NATIVE:
        return None
    from .extract_native import scanner

    return scanner(cfg.max_record_bytes, cfg.page_opt_out_tags)


_USE_NATIVE = True  # tests switch the native path off to compare with the Python path


def _native_batch(batch: Any, splitter: _Splitter, rules: _LinkRules, stats: InputStats) -> bool:
    """Apply a Batch from the native scanner, in member order: a record it classified is counted
    or queued as _RecordHandler would; a deferred one, and any member while the splitter holds
    a partial record, goes to `splitter.feed` as the Python path would give it. Returns whether
    any member had bytes (extract_file's any_bytes)."""
    from .extract_native import K_DEFER, K_EMPTY, K_NOIMG, K_OTHER, K_PAGE

    if not splitter.buf and not splitter.skip_left and not batch.n_defer:
        if batch.n_other or batch.n_noimg or batch.n_pages:
            splitter.in_junk = False
        stats.ignored["other_type"] += batch.n_other
        stats.ignored["no_img_links"] += batch.n_noimg
        stats.records += batch.n_other + batch.n_noimg
        rules.wat_pages_native(batch, 0, batch.n_pages)
        return batch.n_bytes > 0
    q0 = 0  # the first native page not yet queued (or given to the splitter)
    seen = 0  # native pages of the members before this one
    for i, (kind, _) in enumerate(batch.members()):
        if kind == K_EMPTY:
            continue
        if kind == K_DEFER or splitter.buf or splitter.skip_left:
            rules.wat_pages_native(batch, q0, seen)  # the pages before it, in order
            q0 = seen + (kind == K_PAGE)  # a page the splitter reads from the member's bytes
            seen += kind == K_PAGE
            splitter.feed(batch.member(i))
            continue
        splitter.in_junk = False
        if kind == K_PAGE:
            seen += 1
        elif kind == K_OTHER:
            stats.ignore("other_type")
        elif kind == K_NOIMG:
            stats.ignore("no_img_links")
    rules.wat_pages_native(batch, q0, batch.n_pages)
    return batch.n_bytes > 0


class _NotStrings(Exception):
    """Internal: a queued link's src or alt is neither a string nor null (the reference decides)."""


def _last_bytes(parts: list[bytes], n: int) -> list[bytes]:
    """The pieces of `parts` that hold its last n bytes, the first one cut to fit."""
    out: list[bytes] = []
    for part in reversed(parts):
        if n <= 0:
            break
        out.append(part if len(part) <= n else part[len(part) - n:])
        n -= len(part)
    return out[::-1]


def _inflate_stream(chunks: Iterator[bytes], stats: InputStats, splitter: _Splitter) -> Iterator[bytes | None]:
    """The streaming decompressor: in pieces of about READ_CHUNK_BYTES, None for a hole."""
    inflate = _inflate_module()
    d = inflate.decompressobj(31)
    fed = False  # the current member has received bytes
    member_out = False  # the current member has given output
    resync = False
    pending: list[bytes] = []  # output joined into one piece: one splitter call per ~1 MiB
    pending_bytes = 0
    for chunk in chunks:
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
                d, fed, resync, member_out = inflate.decompressobj(31), False, True, False
                pos = member_start + 1
                continue
            fed = True
            if out:
                member_out = True
            if d.eof:
                pos += len(piece) - len(d.unused_data)
                member_start = pos
                d, fed, member_out = inflate.decompressobj(31), False, False
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
        elif not member_out:  # cut before its first output byte: deflate gives none for its first
            splitter.cut_unseen = True  # tens of bytes, so the splitter never sees that record
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


# emit(head, head.lower(), buf, body_start, body_end): one whole record; head is its header
# block, bytes or bytearray, and its block is buf[body_start:body_end]
_Emit = Callable[[Any, Any, Any, int, int], None]


class _Splitter:
    """Cuts a WARC byte stream into records and hands each to `emit`. Keeps at most one record
    (plus a read chunk) in memory; on damage it counts a reason and resynchronises at the next
    'WARC/1.' line. A piece that holds whole records is parsed where it lies, uncopied."""

    def __init__(self, stats: InputStats, max_record_bytes: int, emit: _Emit):
        self.stats = stats
        self.max_record_bytes = max_record_bytes
        self.emit = emit
        self.buf: bytes | bytearray = bytearray()  # a bytearray whenever it holds carried-over bytes
        self.pos = 0
        self.skip_left = 0  # bytes of a too-large record still to discard
        self.in_junk = False  # inside a stretch already counted (not_warc or a damaged record)
        self.cut = False  # the input is known to end mid-stream (a gzip member cut short)
        self.cut_unseen = False  # ... in a member that gave no output: no byte of its record came here

    def feed(self, data: bytes | bytearray) -> None:
        if not self.buf and not self.skip_left and self._whole_record(data):
            return
        if self.skip_left:
            n = min(self.skip_left, len(data))
            self.skip_left -= n
            data = data[n:]
        if self.buf:
            self.buf += data
        else:
            self.buf, self.pos = data, 0
        self._parse(eof=False)
        if self.pos >= len(self.buf):
            self.buf, self.pos = bytearray(), 0
        elif not isinstance(self.buf, bytearray):
            self.buf, self.pos = bytearray(memoryview(self.buf)[self.pos:]), 0
        elif self.pos > (1 << 20):
            del self.buf[:self.pos]
            self.pos = 0

    def _whole_record(self, data: bytes | bytearray) -> bool:
        """The usual piece from a gzip member: exactly one whole, sound record. Emit it and say
        True; anything else (False) goes through `_parse`, which would emit the same record."""
        if not data.startswith(b"WARC/"):
            return False
        h_end = data.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
        if h_end < 0:
            return False
        head = data[:h_end]  # bytes or bytearray, as the piece is
        low = head.lower()
        try:
            length = _content_length(head, low)
        except ValueError:
            return False
        end = h_end + 4 + length
        if not 0 <= length <= self.max_record_bytes or end + 4 != len(data) or not data.endswith(b"\r\n\r\n"):
            return False
        self.in_junk = False
        self.emit(head, low, data, h_end + 4, end)
        return True

    def hole(self) -> None:
        """A corrupt gzip member was dropped here (already counted): forget the partial record."""
        self.buf = bytearray()
        self.pos = 0
        self.skip_left = 0
        self.in_junk = True

    def close(self) -> None:
        if self.skip_left:
            self.stats.skip("truncated")
            self.skip_left = 0
            return
        # A gzip member cut in its first tens of bytes gives no output: its record, after whole
        # ones, was counted nowhere (the last of three: records 2). Bytes still here are a partial
        # record, which the parse counts; an input with no record before is empty_input instead.
        unseen = self.cut_unseen and self.pos >= len(self.buf) and self.stats.records > 0
        self._parse(eof=True)
        if unseen:
            self.stats.skip("truncated")

    def _junk(self) -> None:
        if not self.in_junk:
            self.stats.skip("not_warc")
            self.in_junk = True

    def _resync(self, start: int, eof: bool) -> bool:
        """Move to the next record start at or after `start` (`_record_start`); False if none is
        buffered yet."""
        buf = self.buf
        j = _record_start(buf, start)
        if j >= 0:
            self.pos = j
            return True
        self.pos = len(buf) if eof else max(start, len(buf) - 10)  # keep a possibly split marker
        return False

    def _parse(self, eof: bool) -> None:
        buf = self.buf
        emit = self.emit
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
            head = bytes(buf[pos:h_end])
            nested = _record_start(head, 1)
            if nested >= 0:  # a record cut inside its header, the next one's header after it: the
                # two were read as one record, and the cut one was counted nowhere
                self._damaged("bad_header")
                self.pos = pos + nested
                continue
            low = head.lower()
            try:
                length = _content_length(head, low)
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
                    self.in_junk = False
                    self.pos = len(buf)
                    emit(head, low, buf, body, end)
                    continue
                if _record_start(buf, body) >= 0:
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
            self.in_junk = False
            self.pos = end + 4
            emit(head, low, buf, body, end)

    def _damaged(self, reason: str) -> None:
        self.stats.skip(reason)
        self.in_junk = True  # the bytes up to the next record belong to this one


def _record_start(buf: bytes | bytearray, start: int) -> int:
    """Where the next WARC record begins at or after `start`, or -1: a 'WARC/1.' at `start` or
    after a newline, or a whole version line 'WARC/1.N\\r\\n' after any byte. The latter is where
    damage ends without a newline (a record whose closing CRLFs were damaged or are missing, junk
    cut mid-line, a gzip member of junk): the record after it, whole, was passed over as part of
    the damage and counted nowhere."""
    i = start
    while (i := buf.find(b"WARC/1.", i)) >= 0:
        if i == start or buf[i - 1] == 0x0A or buf[i + 7:i + 8].isdigit() and buf[i + 8:i + 10] == b"\r\n":
            return i
        i += 1
    return -1


def _parse_warc_headers(head: bytes) -> dict[str, str]:
    """The four WARC header fields we use, from a record's header block (first line excluded);
    the reference for `_warc_field`."""
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            key = name.strip().lower()
            if key in (b"warc-type", b"warc-target-uri", b"content-length", b"content-type"):
                headers[key.decode("ascii", "replace")] = value.strip().decode("utf-8", "replace")
    return headers


_WarcField = tuple[bytes, bytes, str]  # (name, b"\r\n" + name + b":", key in _parse_warc_headers)
_CONTENT_LENGTH: _WarcField = (b"content-length", b"\r\ncontent-length:", "content-length")
_WARC_TYPE: _WarcField = (b"warc-type", b"\r\nwarc-type:", "warc-type")
_CONTENT_TYPE: _WarcField = (b"content-type", b"\r\ncontent-type:", "content-type")
_TARGET_URI: _WarcField = (b"warc-target-uri", b"\r\nwarc-target-uri:", "warc-target-uri")


def _warc_field(head: bytes, low: bytes, fld: _WarcField) -> str:
    """One field of a WARC header block ("" when absent), the same as
    `_parse_warc_headers(head).get(key, "")`. The usual layout, the name once and written
    `Name:` at a line start, is read with a few byte searches; anything else (the name twice,
    spaces around it, the name inside another value) goes to the reference parser."""
    name, needle, key = fld
    n = low.count(name)
    if not n:
        return ""
    i = low.find(needle)
    if n > 1 or i < 0:
        return _parse_warc_headers(head).get(key, "")
    start = i + len(needle)
    e = head.find(b"\r\n", start)
    return head[start:e if e >= 0 else len(head)].strip().decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Records -> pages -> pairs

class _RecordHandler:
    """What happens to each whole record: WAT metadata records and WARC responses become pages,
    everything else is counted under its reason."""

    def __init__(self, rules: _LinkRules, stats: InputStats):
        self.rules = rules
        self.stats = stats

    def record(self, head: bytes, low: bytes, buf: bytes | bytearray, body: int, end: int) -> None:
        warc_type = _warc_type(head, low)
        if warc_type == b"metadata" and (buf.startswith(b"{", body, end)
                                         or "json" in _warc_field(head, low, _CONTENT_TYPE).lower()):
            if buf.find(_IMG_PATH, body, end) < 0:  # most WAT records: requests, metadata, pages without images
                self.stats.ignore("no_img_links")
                return
            view = memoryview(buf)[body:end]
            try:
                _handle_wat(_target_uri(head, low), view, self.rules, self.stats)
            finally:
                view.release()  # buf may be a bytearray the splitter grows later
        elif warc_type == b"response":
            _handle_response(_target_uri(head, low), bytes(buf[body:end]), self.rules, self.stats)
        else:
            self.stats.ignore("other_type")


def _content_length(head: bytes, low: bytes) -> int:
    """int(_warc_field(head, low, _CONTENT_LENGTH)), raising ValueError alike, without the
    str round trip in the usual case (int() reads ASCII digits from bytes the same way)."""
    i = low.find(b"\r\ncontent-length:")
    if i >= 0 and low.count(b"content-length") == 1:
        e = head.find(b"\r\n", i + 17)
        try:
            return int(head[i + 17:e] if e >= 0 else head[i + 17:])
        except ValueError:
            pass  # not plain ASCII digits: the str path decides
    return int(_warc_field(head, low, _CONTENT_LENGTH))


def _warc_type(head: bytes, low: bytes) -> bytes:
    """The record type, lower case, as bytes: b"metadata" or b"response" exactly when
    `_warc_field(head, low, _WARC_TYPE).lower()` is "metadata" or "response" (no non-ASCII
    character lower-cases to their letters); other values may differ from that str's bytes."""
    i = low.find(b"\r\nwarc-type:")
    if i >= 0 and low.count(b"warc-type") == 1:
        e = low.find(b"\r\n", i + 12)
        return (low[i + 12:e] if e >= 0 else low[i + 12:]).strip()
    return _warc_field(head, low, _WARC_TYPE).lower().encode()


def _target_uri(head: bytes, low: bytes) -> str:
    uri = _warc_field(head, low, _TARGET_URI)
    if uri.startswith("<") and uri.endswith(">"):  # WARC/1.0 drafts wrote <uri>
        uri = uri[1:-1]
    return uri


def _handle_wat(target_uri: str, block: Any, rules: _LinkRules, stats: InputStats) -> None:
    """A WAT record that mentions IMG@/src. The fast path decodes only the fields we read
    (msgspec, typed); a record whose shape or bytes it does not accept goes to the reference
    path, a full orjson parse, which decides (tests/test_extract.py checks the two agree)."""
    decoder, refused = _wat_decoder()
    try:
        doc = decoder.decode(block)
        str(block, "utf-8")  # the fields skipped above were not checked for valid UTF-8
    except refused:
        _handle_wat_reference(target_uri, block, rules, stats)
        return
    env = doc.Envelope
    payload = env.payload if env is not None else None
    meta = payload.response if payload is not None else None
    html_meta = meta.html if meta is not None else None
    links = html_meta.Links if html_meta is not None else None
    if links is None:
        stats.ignore("no_img_links")
        return
    page_url = target_uri or (env.header.target_uri if env.header is not None else None)
    if not isinstance(page_url, str):  # absent, or not a string in a damaged record
        page_url = ""
    head = html_meta.Head
    base = head.Base if head is not None else None
    lang = _wat_lang(head.Metas if head is not None else None, meta.Headers)
    opt_out = _wat_opt_out(head.Metas if head is not None else None, meta.Headers, rules.cfg.page_opt_out_tags)
    stats.pages += 1
    stats.records += 1
    imgs = [ln for ln in links if ln.path == "IMG@/src"]
    rules.wat_page(page_url, base if isinstance(base, str) else None, [ln.url for ln in imgs], [ln.alt for ln in imgs],
                   lang, opt_out)


def _handle_wat_reference(target_uri: str, block: Any, rules: _LinkRules, stats: InputStats) -> None:
    """The straightforward path: parse the whole record, walk to the links."""
    import orjson

    try:
        doc = orjson.loads(block)  # also refuses invalid UTF-8 and lone surrogates
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
    page_url = target_uri or _dig(envelope, "WARC-Header-Metadata", "WARC-Target-URI")
    if not isinstance(page_url, str):  # absent, or not a string in a damaged record
        page_url = ""
    head = html_meta.get("Head")
    base = head.get("Base") if isinstance(head, dict) else None
    metas = head.get("Metas") if isinstance(head, dict) else None
    lang = _wat_lang(metas, meta.get("Headers"))
    opt_out = _wat_opt_out(metas, meta.get("Headers"), rules.cfg.page_opt_out_tags)
    stats.pages += 1
    stats.records += 1
    imgs = [ln for ln in links if isinstance(ln, dict) and ln.get("path") == "IMG@/src"]
    rules.wat_page(page_url, base if isinstance(base, str) else None, [ln.get("url") for ln in imgs],
                   [ln.get("alt") for ln in imgs], lang, opt_out)


def _wat_decoder() -> tuple[Any, tuple[type[BaseException], ...]]:
    """The typed WAT decoder and the errors that send a record to the reference path."""
    global _WAT_DECODER
    if _WAT_DECODER is None:
        import msgspec  # imported on the first page with images

        from .extract_wat import DECODER

        _WAT_DECODER = (DECODER, (msgspec.MsgspecError, ValueError, RecursionError))
    return _WAT_DECODER


_WAT_DECODER: tuple[Any, tuple[type[BaseException], ...]] | None = None


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _wat_lang(metas: Any, headers: Any) -> str | None:
    """WAT keeps no <html lang>; use <meta http-equiv=content-language>, else the HTTP header."""
    for m in metas if isinstance(metas, list) else ():
        if isinstance(m, dict) and "http-equiv" in m and str(m["http-equiv"]).lower() == "content-language":
            value = m.get("content")
            if isinstance(value, str) and value.strip():
                return value.strip()[:64]
    if isinstance(headers, dict):
        for k, v in headers.items():
            # len first: no character lower-cases into these letters with a change of length
            if len(k) == 16 and k.lower() == "content-language":
                for value in _header_list(v):
                    if isinstance(value, str) and value.strip():
                        return value.strip()[:64]
    return None


def _header_list(value: Any) -> list[Any]:
    """A WAT header's values: Common Crawl's extractor writes a header sent once as a string and,
    since CC-MAIN-2024-51, one sent several times as a list of its values in order (before, only
    the last value was kept)."""
    return value if isinstance(value, list) else [value]


# <meta name=...> values whose directives apply to us: every robot, ours, img2dataset's (which
# sites name in their opt-outs); X-Robots-Tag's agent prefixes likewise (download.py's rule)
META_AGENTS = ("robots", "fastlaion", "img2dataset")
_DIRECTIVE_SPLIT = re.compile(r"[,\s]+")


def _meta_opt_out(name: Any, content: Any, tags: tuple[str, ...]) -> str | None:
    """'name: directive' when a <meta name content> is a robots meta for us carrying one of tags."""
    if not (tags and isinstance(name, str) and isinstance(content, str)):
        return None
    agent = name.strip().lower()
    if agent not in META_AGENTS:
        return None
    return next((f"{agent}: {d}" for d in _DIRECTIVE_SPLIT.split(content.lower()) if d in tags), None)


def _header_opt_out(values: list[Any], tags: tuple[str, ...]) -> str | None:
    """'x-robots-tag: directive' when one of a page's X-Robots-Tag values (each a string, one a
    header line: an agent prefix runs to the end of its value) carries one of tags for us."""
    values = [v for v in values if isinstance(v, str)]
    if not (tags and values):
        return None
    from .robots_tag import opt_out_directive

    found = opt_out_directive(values, tags, META_AGENTS[1:])
    return f"x-robots-tag: {found}" if found else None


def _wat_opt_out(metas: Any, headers: Any, tags: tuple[str, ...]) -> str | None:
    """The page's opt-out (its robots metas, then its X-Robots-Tag headers), or None."""
    if not tags:
        return None
    for m in metas if isinstance(metas, list) else ():
        if isinstance(m, dict):
            found = _meta_opt_out(m.get("name"), m.get("content"), tags) or _equiv_opt_out(
                m.get("http-equiv"), m.get("content"), tags)
            if found:
                return found
    if isinstance(headers, dict):
        for k, v in headers.items():
            if isinstance(k, str) and len(k) == 12 and k.lower() == "x-robots-tag":
                found = _header_opt_out(_header_list(v), tags)
                if found:
                    return found
    return None


def _equiv_opt_out(equiv: Any, content: Any, tags: tuple[str, ...]) -> str | None:
    """'x-robots-tag: directive' when a <meta http-equiv="X-Robots-Tag" content> carries one of tags
    for us: the header written into the page, read as the header is."""
    if isinstance(equiv, str) and len(equiv) == 12 and equiv.lower() == "x-robots-tag":
        return _header_opt_out([content], tags)
    return None


def _html_opt_out(tree: Any, http_head: bytes, tags: tuple[str, ...]) -> str | None:
    """A WARC page's opt-out (its robots metas, then every X-Robots-Tag header line), or None."""
    if not tags:
        return None
    for node in tree.css("meta[name], meta[http-equiv]"):
        a = node.attributes
        found = _meta_opt_out(a.get("name"), a.get("content"), tags) or _equiv_opt_out(
            a.get("http-equiv"), a.get("content"), tags)
        if found:
            return found
    return _header_opt_out(_header_values(http_head, b"x-robots-tag"), tags)


def _handle_response(target_uri: str, block: bytes, rules: _LinkRules, stats: InputStats) -> None:
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
        body = _decode_transfer(body, headers, rules.cfg.max_record_bytes)
    except _TooLarge:
        stats.skip("too_large")
        return
    except _Unsupported as e:
        log.debug("%s: %s: coding %s not decoded (unsupported_encoding)", stats.source, target_uri, e)
        stats.skip("unsupported_encoding")
        return
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
    opt_out = _html_opt_out(tree, block[:h_end], rules.cfg.page_opt_out_tags)
    stats.pages += 1
    stats.records += 1
    imgs = []
    for node in tree.css("img"):
        a = node.attributes
        alt = a.get("alt", _MISSING)
        imgs.append((a.get("src"), None if alt is _MISSING else (alt or ""),
                     _dimension(a.get("width")), _dimension(a.get("height"))))
    rules.html_page(target_uri, base, imgs, lang.strip()[:64] if lang else None, opt_out)


_MISSING = object()


def _header_values(head: bytes, name: bytes) -> list[str]:
    """Every value of header `name` (lower case) in an HTTP head, in order (a repeated header
    is several lines, each its own value)."""
    if name not in head.lower():
        return []
    out = []
    for line in head.split(b"\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            out.append(value.strip().decode("latin-1"))
    return out


# Headers whose repeated lines are one list, as if joined by commas (RFC 9110, 5.3): read in full
_LIST_HEADERS = frozenset({"content-encoding", "transfer-encoding"})


def _parse_http_headers(head: bytes) -> dict[str, str]:
    """An HTTP head's headers by lower-case name. A repeated Content-Encoding or Transfer-Encoding
    line adds to its list ("gzip" then "br" is "gzip, br", both to undo); of any other header
    repeated, the last line is kept."""
    headers: dict[str, str] = {}
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            key, text = name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")
            if key in _LIST_HEADERS and key in headers:
                text = f"{headers[key]}, {text}"
            headers[key] = text
    return headers


class _TooLarge(Exception):
    """Internal: a response body that inflates to more than max_record_bytes."""


class _Unsupported(Exception):
    """Internal: a response body in a content coding not decoded here (its name)."""


def _decode_transfer(body: bytes, headers: dict[str, str], max_bytes: int) -> bytes:
    """Undo the transfer codings (chunked, and gzip/deflate/br before it) and the gzip/deflate/br
    content codings, which some WARC writers keep (Common Crawl stores the decoded payload and
    renames the headers X-Crawler-*); codings listed together ("gzip, br", or on two header
    lines) are undone last first, as RFC 9110 lists them in the order applied, the transfer
    codings before the content codings. A gzip or deflate body that inflates to more than
    max_bytes raises _TooLarge; any other coding (zstd, x-foo, compress), or br without the
    brotli package, raises _Unsupported before anything is decoded."""
    content = _codings(headers.get("content-encoding", ""))
    transfer = _codings(headers.get("transfer-encoding", ""))
    for coding in content + [c for c in transfer if c != "chunked"]:
        if coding == "br":
            try:
                import brotli  # noqa: F401
            except ImportError:
                raise _Unsupported("br (the brotli package is not installed)") from None
        elif coding not in ("gzip", "x-gzip", "deflate"):
            raise _Unsupported(coding[:40])
    for coding in reversed(transfer):
        body = _dechunk(body) if coding == "chunked" else _decode_coding(body, coding, max_bytes)
    for coding in reversed(content):
        body = _decode_coding(body, coding, max_bytes)
    return body


def _codings(value: str) -> list[str]:
    """The codings of a Content-Encoding or Transfer-Encoding value, in the order applied, in
    lower case; identity, which is none, left out."""
    return [c for c in (c.strip() for c in value.lower().split(",")) if c and c != "identity"]


def _decode_coding(body: bytes, coding: str, max_bytes: int) -> bytes:
    """One content coding of _decode_transfer's undone."""
    if coding in ("gzip", "x-gzip"):
        return _inflate_body(body, 31, max_bytes)
    if coding == "deflate":
        try:
            return _inflate_body(body, 15, max_bytes, whole=True)
        except zlib.error:
            return _inflate_body(body, -15, max_bytes, whole=True)
    try:  # optional, not a dependency (_decode_transfer checked it is there)
        import brotli
    except ImportError:
        raise _Unsupported("br (the brotli package is not installed)") from None
    try:
        return brotli.decompress(body)
    except brotli.error as e:  # an Exception, no ValueError: it would stop the extraction
        raise ValueError(f"bad brotli body: {e}") from e


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")


def _inflate_body(body: bytes, wbits: int, max_bytes: int, whole: bool = False) -> bytes:
    """zlib's inflate of body, never more than max_bytes of output (else _TooLarge). `whole`: a
    stream cut short raises zlib.error, as zlib.decompress does; else what it gave is kept."""
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, max_bytes + 1)
    if len(out) > max_bytes:
        raise _TooLarge
    if whole and not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def _dechunk(body: bytes) -> bytes:
    out = []
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("bad chunked body")
        size_hex = body[pos:eol].split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_hex):  # int() would take '-6' (read the same chunk forever), '0x1a', '1_a'
            raise ValueError("bad chunked body")
        size = int(size_hex, 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2:eol + 2 + size])
        pos = eol + 2 + size + 2


def _decode_html(body: bytes, content_type: str, stats: InputStats) -> str:
    """Bytes -> text: BOM, then the HTTP header's charset, then <?xml encoding>, then <meta charset>
    (a label browsers know, _CHARSETS), else UTF-8."""
    if body.startswith(codecs.BOM_UTF8):
        return body[3:].decode("utf-8", "replace")
    if body.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return body.decode("utf-16", "replace")
    labels = []
    m = _HTTP_CHARSET.search(content_type)
    if m:
        labels.append(m.group(1))
    m1 = _XML_ENCODING.match(body)
    if m1:
        labels.append(m1.group(1).decode("ascii"))
    m2 = _META_CHARSET.search(body, 0, 4096)
    if m2:
        labels.append(m2.group(1).decode("ascii"))
    for label in labels:
        name = _CHARSETS.get(label.lower())
        if name is not None:
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
    protocol-relative, plain relative) are joined by string concatenation; paths with dot
    segments by urljoin's own algorithm, written out for a path-only src; anything else (a
    query/fragment-only reference, a possible scheme, params) goes to urljoin. They agree
    (tests/test_extract.py checks them against each other), except that concatenation keeps
    empty path segments ("a//b.jpg"), as browsers do, where urljoin drops them."""

    def __init__(self, base: str, parts: tuple[str | None, str | None, str | None] = (None, None, None)):
        self.base = base
        self.scheme = "http"
        self.origin: str | None = None
        self.dir = ""
        self.dir_path = "/"
        self._split = False  # split lazily: many pages have only absolute src values
        if parts[0] is not None:  # _base_parts(base), which splits the plain shapes alike
            self.scheme, self.origin, self.dir = parts  # type: ignore[assignment]
            self.dir_path = self.dir[len(self.origin):]  # type: ignore[arg-type]
            self._split = True

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
            self.dir_path = path[:path.rfind("/") + 1]
            self.dir = self.origin + self.dir_path

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
        elif self.origin is not None and not src.startswith("//") and not _NOT_A_PLAIN_PATH.search(src):
            return self._join_dots(src)
        try:
            return urljoin(self.base, src)
        except ValueError:  # e.g. an unbalanced IPv6 bracket
            return ""


    def _join_dots(self, src: str) -> str:
        """urljoin(self.base, src) for a src that is a path with dot segments (urllib.parse's
        steps: merge with the base directory, drop empty segments in between, resolve '.' and
        '..', never above the root)."""
        if src[:1] == "/":
            segments = src.split("/")
        else:
            segments = self.dir_path.split("/") + src.split("/")
            segments[1:-1] = filter(None, segments[1:-1])
        resolved: list[str] = []
        for seg in segments:
            if seg == "..":
                if resolved:
                    resolved.pop()
            elif seg != ".":
                resolved.append(seg)
        if segments[-1] in (".", ".."):
            resolved.append("")
        path = "/".join(resolved) or "/"
        return self.origin + (path if path[:1] == "/" else "/" + path)  # type: ignore[operator]


_NOT_A_PLAIN_PATH = re.compile(r"[:?#;\x00-\x20\x7f]")  # urlparse reads these as more than a path


class _LinkRules:
    """LAION's link rules (module docstring) applied to pages' img elements; accepted pairs go
    to `writer`. WAT pages are queued and checked LINK_BATCH links at a time by the vectorised
    rules (extract_vec.py, Polars); HTML pages, and each link the vectorised rules cannot
    settle exactly, go through `_check_link`, the reference. `vectorised=False` uses the
    reference for everything (tests/test_extract.py checks the two agree). Pages from the
    native scanner come with their links already checked by its compiled rules
    (wat_pages_native; tests/test_extract_native.py checks those against this class)."""

    def __init__(self, cfg: ExtractConfig, stats: InputStats, writer: _PairWriter, vectorised: bool = True):
        self.cfg = cfg
        self.stats = stats
        self.writer = writer
        self.vectorised = vectorised
        self._native_rules: Any = None  # extract_native.Rules, made on the first native page
        self._new_batch()

    def close(self) -> None:
        if self._native_rules is not None:
            self._native_rules.close()
            self._native_rules = None

    def _new_batch(self) -> None:
        # The queued pages and their links, in order: _PyPages (wat_page, the Python path) and
        # the compiled rules' results (extract_native.Rules.run, from wat_pages_native).
        self._segments: list[Any] = []
        self._py: _PyPages | None = None  # the last segment, while wat_page adds to it
        self._queued = 0  # links in all of them
        self._seq = 0  # links queued so far: each link's number orders the rows of a flush

    def wat_page(self, page_url: str, base_href: str | None, srcs: list[Any], alts: list[Any],
                 lang: str | None, opt_out: str | None = None) -> None:
        """A WAT page's IMG@/src links (url and alt values as found; entities still encoded);
        `opt_out`: the page's opt-out directive, which rejects them all."""
        self.stats.links += len(srcs)
        if not srcs or self._opted_out(opt_out, len(srcs)):
            return
        base = _page_base(page_url, base_href, True)
        if not self.vectorised:
            self._reference_page(page_url, base, srcs, alts, None, None, lang, True)
            return
        seg = self._py
        if seg is None:
            seg = self._py = _PyPages(self._seq)
            self._segments.append(seg)
        self._seq += len(srcs)
        page = len(seg.page_urls)
        seg.page_urls.append(page_url)
        seg.bases.append(base)
        for col, value in zip(seg.parts, _base_parts(base)):
            col.append(value)
        seg.langs.append(lang)
        seg.srcs += srcs
        seg.alts += alts
        seg.page_of += [page] * len(srcs)
        self._queued += len(srcs)
        if self._queued >= LINK_BATCH:
            self.flush()

    def _opted_out(self, opt_out: str | None, links: int) -> bool:
        """Count a page's links under opt_out when it opts out (rule order: first)."""
        if opt_out is None:
            return False
        self.stats.rejected["opt_out"] += links
        return True

    def wat_pages_native(self, batch: Any, a: int, b: int) -> None:
        """Pages a..b of a native Batch (extract_native.py), as wat_page for each in order: the
        compiled rules (wat_rules) decide the links they can, `_check_link` the rest (the same
        links extract_vec leaves to it), and the rows join the queue in link order."""
        if a >= b:
            return
        n_links = batch.links_of(a, b)
        self.stats.pages += b - a
        self.stats.records += b - a
        self.stats.links += n_links
        if not n_links:
            return
        rules = self._native_rules
        if rules is None:
            from .extract_native import Rules

            c = self.cfg
            rules = self._native_rules = Rules(batch.scanner.lib, c.min_alt_chars, c.reject_svg, c.reject_gif,
                                               c.max_host_chars, c.max_text_chars)
        bases: dict[int, tuple[str, tuple[str | None, str | None, str | None]]] = {}
        for k, href in batch.base_pages(a, b):  # a <base href> the C scan did not take as it is: joined here
            base = _page_base(batch.page(k)[0], href, True)
            bases[k] = (base, _base_parts(base))
        # Nothing queued before these rows and the compiled writer there: they go to it from the
        # C buffers as they are, before the next run reuses them (no copy into Python bytes).
        direct = not self._segments and self.writer.native
        out = rules.run(batch, a, b, [(k, parts) for k, (_, parts) in bases.items()], copy=not direct)
        rej, notes, cap = self.stats.rejected, self.stats.notes, self.cfg.max_text_chars
        for name, n in zip(REJECT_REASONS, out.reasons):
            rej[name] += n
        notes["url_truncated"] += out.url_cut
        notes["caption_truncated"] += out.cap_cut
        lo = batch.pages()[a * batch.PAGE_FIELDS + 3]  # the first link of page a
        hard_rows: list[tuple[int, str, str, str, str | None, str]] = []
        joiners: dict[int, Callable[[str], str]] = {}
        for i, (src, alt, k) in zip(out.hard, out.hard_links):  # what extract_vec leaves to the reference
            url, lang, parts = batch.page(k)
            base, parts = bases.get(k) or (batch.based(k) or url, parts)
            join = joiners.get(k) or joiners.setdefault(k, _Base(base, parts).join)
            reason, link_url, caption = _check_link(src, alt, True, join, self.cfg)
            if reason is not None:
                rej[reason] += 1
                continue
            for value, note in ((link_url, "url_truncated"), (caption, "caption_truncated")):
                notes[note] += len(value) > cap
            link_url, caption = link_url[:cap], caption[:cap]
            hard_rows.append((i, link_url, caption, url, lang, uid_of(link_url, caption)))
        self.stats.pairs += len(out.rows) + len(hard_rows)
        out.seq0 = self._seq - lo  # a row's place in the flush: seq0 + its link's number in the batch
        out.hard_rows = hard_rows
        self._py = None
        self._seq += n_links
        if direct:
            self.writer.add_native(out)
            return
        self._segments.append(out)
        self._queued += n_links
        if self._queued >= LINK_BATCH:
            self.flush()

    def html_page(self, page_url: str, base_href: str | None, imgs: list[tuple[Any, Any, int | None, int | None]],
                  lang: str | None, opt_out: str | None = None) -> None:
        """An HTML page's img elements as (src, alt, width, height); the parser decoded entities."""
        self.flush()  # keep the pairs in input order
        self.stats.links += len(imgs)
        if imgs and not self._opted_out(opt_out, len(imgs)):
            srcs, alts, widths, heights = (list(c) for c in zip(*imgs))
            self._reference_page(page_url, _page_base(page_url, base_href, False), srcs, alts, widths, heights,
                                 lang, False)

    def flush(self) -> None:
        """Check the queued WAT links and write their pairs, in link order."""
        if not self._segments:
            return
        segments = self._segments
        self._new_batch()
        py = [seg for seg in segments if isinstance(seg, _PyPages)]
        native = [seg for seg in segments if not isinstance(seg, _PyPages)]
        if self.writer.native and sum(len(seg.srcs) for seg in py) <= REFERENCE_LINKS:
            for seg in segments:  # compiled rules (and a few links by the reference) to the compiled writer
                if isinstance(seg, _PyPages):
                    self._reference_queued(seg)
                else:
                    self.writer.add_native(seg)
            return
        import polars as pl

        frames = []
        if py:
            try:
                frames.append(self._check_queued(py))
            except _NotStrings:  # a url or alt that is neither a string nor null: the reference decides
                for seg in segments:  # and writes, so everything goes to the writer in order
                    if isinstance(seg, _PyPages):
                        self._reference_queued(seg)
                    else:
                        self.writer.add_frame(_native_frame([seg]).sort("seq").drop("seq"))
                return
        if native:
            if frames:  # rows of both kinds in one frame: the native ones have their uid already
                frames[0] = frames[0].with_columns(uid=_uids(frames[0].get_column("url"), frames[0].get_column("caption")))
            frames.append(_native_frame(native))
        frame = pl.concat(frames, how="diagonal") if len(frames) > 1 else frames[0]
        if (py and native) or any(seg.hard_rows for seg in native):
            frame = frame.sort("seq")
        if frame.height:
            self.writer.add_frame(frame.drop("seq"))

    def _reference_queued(self, seg: _PyPages) -> None:
        """The queued Python-path pages of `seg` through the reference, which writes their rows."""
        lo = 0
        for page, links in itertools.groupby(seg.page_of):  # a page's links are contiguous
            hi = lo + sum(1 for _ in links)
            self._reference_page(seg.page_urls[page], seg.bases[page], seg.srcs[lo:hi], seg.alts[lo:hi], None, None,
                                 seg.langs[page], True)
            lo = hi

    def _check_queued(self, segments: list[_PyPages]) -> Any:
        """The rows of queued Python-path pages, checked by the vectorised rules, as a DataFrame
        with a `seq` column. Raises _NotStrings for a url or alt that is neither a string nor
        null, before anything is counted."""
        import polars as pl

        from .extract_vec import link_outcomes

        page_urls, bases, base_parts, langs, srcs, alts, page_of = _join_queued(segments)
        try:
            out = link_outcomes(base_parts, srcs, alts, page_of, self.cfg)
        except TypeError as exc:
            raise _NotStrings from exc
        reasons, urls, captions = out["reason"], out["url"], out["caption"]
        hard = out["hard"].arg_true()
        if len(hard):  # shapes the vectorised rules leave to the reference (entities, dot segments, ...)
            joiners: dict[int, Callable[[str], str]] = {}
            got = []
            for i in hard.to_list():
                page = page_of[i]
                join = joiners.get(page) or joiners.setdefault(
                    page, _Base(bases[page], (base_parts[0][page], base_parts[1][page], base_parts[2][page])).join)
                got.append(_check_link(srcs[i], alts[i], True, join, self.cfg))
            reasons = reasons.scatter(hard, [g[0] for g in got])
            urls = urls.scatter(hard, [g[1] for g in got])
            captions = captions.scatter(hard, [g[2] for g in got])
        rej = self.stats.rejected
        for reason, n in reasons.drop_nulls().value_counts().iter_rows():
            rej[reason] += n
        kept = reasons.is_null()
        urls, captions = urls.filter(kept), captions.filter(kept)
        cap, notes = self.cfg.max_text_chars, self.stats.notes
        for col, note in ((urls, "url_truncated"), (captions, "caption_truncated")):
            notes[note] += int((col.str.len_chars() > cap).sum())
        pages = pl.Series(page_of, dtype=pl.UInt32).filter(kept)
        self.stats.pairs += len(urls)
        none = pl.Series(dtype=pl.Int32).extend_constant(None, len(urls))
        seq = pl.Series("seq", [i for seg in segments for i in range(seg.seq0, seg.seq0 + len(seg.srcs))],
                        dtype=pl.Int64).filter(kept)
        return pl.DataFrame({
            "url": urls.str.slice(0, cap), "caption": captions.str.slice(0, cap),
            "page_url": pl.Series(page_urls, dtype=pl.String).gather(pages), "width": none, "height": none,
            "page_lang": pl.Series(langs, dtype=pl.String).gather(pages), "seq": seq})

    def _reference_page(self, page_url: str, base: str, srcs: list[Any], alts: list[Any],
                        widths: list[int | None] | None, heights: list[int | None] | None, lang: str | None,
                        raw_entities: bool) -> None:
        join = _Base(base).join
        rej = self.stats.rejected
        urls: list[str] = []
        captions: list[str] = []
        kept_w: list[int | None] = []
        kept_h: list[int | None] = []
        for i, (src, alt) in enumerate(zip(srcs, alts)):
            reason, url, caption = _check_link(src, alt, raw_entities, join, self.cfg)
            if reason is not None:
                rej[reason] += 1
                continue
            urls.append(url)
            captions.append(caption)
            kept_w.append(widths[i] if widths is not None else None)
            kept_h.append(heights[i] if heights is not None else None)
        self._emit(urls, captions, [page_url] * len(urls), kept_w, kept_h, [lang] * len(urls))

    def _emit(self, urls: list[str], captions: list[str], page_urls: list[str], widths: list[int | None] | None,
              heights: list[int | None] | None, langs: list[str | None]) -> None:
        """Accepted pairs: cut URL and caption to max_text_chars (counted), then write."""
        if not urls:
            return
        cap, notes = self.cfg.max_text_chars, self.stats.notes
        for col, note in ((urls, "url_truncated"), (captions, "caption_truncated")):
            for i, s in enumerate(col):
                if len(s) > cap:
                    col[i] = s[:cap]
                    notes[note] += 1
        self.stats.pairs += len(urls)
        none = [None] * len(urls)
        self.writer.add_rows(urls, captions, page_urls, widths or none, heights or none, langs)


class _PyPages:
    """WAT pages queued by _LinkRules.wat_page: per page its URL, base URL, _base_parts of that
    and language; per link its src and alt as found and its page (from 0). Its links are
    numbered from seq0 on (the order of the rows of a flush)."""

    def __init__(self, seq0: int) -> None:
        self.seq0 = seq0
        self.page_urls: list[str] = []
        self.bases: list[str] = []
        self.parts: tuple[list[str | None], ...] = ([], [], [])
        self.langs: list[str | None] = []
        self.srcs: list[Any] = []
        self.alts: list[Any] = []
        self.page_of: list[int] = []


def _join_queued(segments: list[_PyPages]) -> tuple[Any, ...]:
    """Queued pages and links as (page_urls, bases, base_parts, langs, srcs, alts, page_of),
    lists, the pages numbered from 0 over all the segments."""
    page_urls: list[str] = []
    bases: list[str] = []
    parts: tuple[list[str | None], ...] = ([], [], [])
    langs: list[str | None] = []
    srcs: list[Any] = []
    alts: list[Any] = []
    page_of: list[int] = []
    for seg in segments:
        off = len(page_urls)
        page_urls += seg.page_urls
        bases += seg.bases
        for col, part in zip(parts, seg.parts):
            col += part
        langs += seg.langs
        srcs += seg.srcs
        alts += seg.alts
        page_of += [p + off for p in seg.page_of] if off else seg.page_of
    return page_urls, bases, parts, langs, srcs, alts, page_of


def _native_frame(results: list[Any]) -> Any:
    """The rows of native RuleResults, uid included, with their `seq` numbers (not sorted)."""
    import polars as pl

    frame = type(results[0]).frame(results).with_columns(
        seq=pl.Series([r.seq0 + i for r in results for i in r.rows], dtype=pl.Int64))
    hard_rows = [(r.seq0 + row[0], *row[1:]) for r in results for row in r.hard_rows]
    if hard_rows:
        seq, url, caption, page_url, lang, uid = (list(c) for c in zip(*hard_rows))
        hard = pl.DataFrame({"url": url, "caption": caption, "page_url": page_url,
                             "width": pl.Series(dtype=pl.Int32).extend_constant(None, len(seq)),
                             "height": pl.Series(dtype=pl.Int32).extend_constant(None, len(seq)),
                             "page_lang": pl.Series(lang, dtype=pl.String),
                             "uid": uid, "seq": pl.Series(seq, dtype=pl.Int64)},
                            schema=frame.schema)
        frame = pl.concat([frame, hard], how="vertical")
    return frame


_NO_BASE_PARTS = (None, None, None)
_PLAIN_BASE = re.compile(r"([Hh][Tt][Tt][Pp][Ss]?)://([^/?#]+)([^?#]*)")


def _base_parts(base: str) -> tuple[str | None, str | None, str | None]:
    """(scheme, origin, directory) of a base URL as _Base splits it (urlsplit), for the plain
    shape: printable ASCII, http(s), a host without brackets. Anything else gives Nones, and
    its relative links go to the reference."""
    if not (base.isascii() and base.isprintable()) or " " in base:
        return _NO_BASE_PARTS
    m = _PLAIN_BASE.match(base)
    if m is None or "[" in m.group(2) or "]" in m.group(2):
        return _NO_BASE_PARTS
    scheme = m.group(1).lower()
    origin = f"{scheme}://{m.group(2)}"
    path = m.group(3) or "/"
    return scheme, origin, origin + path[:path.rfind("/") + 1]


def _page_base(page_url: str, base_href: str | None, raw_entities: bool) -> str:
    """The URL a page's relative src values are joined to: <base href> (itself joined to the
    page URL) when the page has one, else the page URL. A javascript: or data: base is none, as
    for browsers (HTML's frozen base URL): it rejected every relative src of the page."""
    if base_href and base_href.strip():
        href = base_href.strip()
        href = _unescape_url(href) if raw_entities and "&" in href else href
        if href[:11].lower().startswith(("javascript:", "data:")):
            return page_url
        try:
            return urljoin(page_url, href)
        except ValueError:  # a page URL urlsplit refuses (an unbalanced '[', a host NFKC breaks)
            return href  # an absolute href is the base as it is; a relative one joins to nothing valid
    return page_url


def _check_link(src: Any, alt: Any, raw_entities: bool, join: Callable[[str], str],
                cfg: ExtractConfig) -> tuple[str | None, str, str]:
    """The reference rules for one img: (reason it is rejected or None, absolute URL, caption),
    URL and caption not yet cut to max_text_chars. `raw_entities`: the strings come from a WAT,
    where entities are still encoded; an HTML parser has already decoded them."""
    min_alt = cfg.min_alt_chars
    if not isinstance(alt, str):
        if min_alt > 0 or alt is not None:
            return "no_alt", "", ""
        alt = ""
    if raw_entities and "&" in alt:
        alt = html.unescape(alt)
    alt = " ".join(alt.split())
    if len(alt) < min_alt:
        return "short_alt", "", ""
    if not isinstance(src, str):
        src = ""
    src = src.strip()
    if raw_entities and "&" in src:
        src = _unescape_url(src)
    low = src.lower()
    if "data:image" in low:
        return "data_uri", "", ""
    if "javascript:" in low:
        return "javascript", "", ""
    if cfg.reject_svg and ".svg" in low:
        return "svg", "", ""
    if cfg.reject_gif and ".gif" in low:
        return "gif", "", ""
    if "\n" in src or "\t" in src or "\r" in src:  # browsers drop these inside URLs
        src = src.replace("\n", "").replace("\t", "").replace("\r", "")
        low = src.lower()
    url = src if low.startswith(("http://", "https://")) else join(src)
    m = _HTTP_URL.match(url)
    if m is None or (m.group(2) and _port_number(m.group(2)) > 65535) or _fold_host(m.group(1)) is None:
        return "invalid_url", "", ""
    if len(m.group(1)) > cfg.max_host_chars:
        return "long_host", "", ""
    return None, fold_case(url, m), alt


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_case(url: str, m: re.Match[str] | None = None) -> str:
    """An http(s) URL that `_HTTP_URL` matches (`m`, its match, when at hand) as the WHATWG URL
    standard serialises its scheme, host and port, so that spellings of one URL dedup as one
    (and are downloaded once):

    - scheme and an ASCII host in lower case: `HTTPS://Example.COM/A.jpg` is
      `https://example.com/A.jpg`;
    - a host with a non-ASCII character in punycode, by UTS #46 (`_parse_host`):
      `http://Bücher.example/x` is `http://xn--bcher-kva.example/x`; so is a host the idna
      package refuses for IDNA 2008's stricter rules, as browsers write it: `http://💩.la/` is
      `http://xn--ls8h.la/`, `http://my_host.Bücher.example/` is
      `http://my_host.xn--bcher-kva.example/`;
    - a percent-encoded host decoded first, as WHATWG's host parser does (`_fold_host`):
      `http://%65xample.COM/` is `http://example.com/`, `http://b%C3%BCcher.example/` is
      `http://xn--bcher-kva.example/`. A host that parser refuses stays as written (ASCII
      letters in lower case): the rules reject it as invalid_url;
    - the port as a number, none where it is the scheme's default or empty: `:80` on http,
      `:443` on https, `:0080` and `http://a.example:/x` are dropped, `:08080` is `:8080`;
      a port that is not the scheme's default stays (`http://a.example:443/`).

    Path, query, fragment and userinfo stay as written. The host's length (long_host) is
    measured on the URL as written, before this.

    >>> fold_case("HTTP://Bücher.Example:0080/A.jpg")
    'http://xn--bcher-kva.example/A.jpg'
    """
    if m is None:
        m = _HTTP_URL.match(url)
        if m is None:
            return url
    a, b = m.span(1)
    n = 5 if url[4] in "sS" else 4  # the scheme's length
    scheme, host, port = url[:n], url[a:b], m.group(2)
    if (port is None and scheme.islower() and host.isascii() and not _UPPER_ASCII.search(host) and "%" not in host
            and not ends_in_number(host)):
        return url
    # (a host WHATWG's parser refuses, invalid_url to the rules, is kept as written: dedup's key)
    host = _fold_host(host) or host.translate(_ASCII_LOWER)
    rest = url[b:]
    # (a port over 65535 is none, invalid_url to the rules: dedup's key keeps it as written)
    if port is not None and (number := _port_number(port)) <= 65535:
        rest = rest[1 + len(port):]  # rest started with ':' and the port's digits
        if port and number != (443 if n == 5 else 80):
            rest = f":{number}{rest}"
    return scheme.lower() + url[n:a] + host + rest


def _port_number(digits: str) -> int:
    """A port's digits (an empty port is 0 here) as a number; 65536 for any beyond 65535. Any
    number of leading zeros, as WHATWG reads them: int() alone refuses over 4,300 digits (a
    src with a port of 5,000 zeros then 80 stopped the extraction with a traceback)."""
    digits = digits.lstrip("0")
    return int(digits or "0") if len(digits) <= 5 else 65536


# What sends a host to _parse_host rather than lower-casing it: a character outside printable
# ASCII, a '%' (percent-decoding); also a host that ends in a number (`ends_in_number`: an IPv4
# address, in whatever spelling). An ASCII host's "xn--" labels are not checked (_parse_host).
_ODD_HOST = re.compile(r"[^\x21-\x7e]|%")

# WHATWG's forbidden domain code points (ASCII all, so checked after the UTS #46 mapping), and
# what else _HTTP_URL refuses in a host written plainly ('"', "'", '{', '}', '`', whitespace):
# decoded, they are no more a host to the rules than written so, and a kept URL stays one
# _HTTP_URL matches (fold_case of a kept URL is the URL)
_FORBIDDEN_DOMAIN = re.compile(r"[\x00-\x20#%/:<>?@\[\\\]^|\x7f\"'{}`]|\s")


def _fold_host(host: str) -> str | None:
    """A host `_HTTP_URL` matched as WHATWG's host parser writes it, or None where that parser
    fails (the URL is then no URL to a browser, which fetches nothing: invalid_url). Most
    hosts are printable ASCII without '%': lower case is all the parser does to them ("xn--"
    labels too, whatwg/url#914: `_parse_host`); the others go to `_parse_host`. An IPv6 literal
    (`_HTTP_URL` lets only hex digits, ':' and '.' in) is put in lower case, as before."""
    if host[0] == "[" or not (_ODD_HOST.search(host) or ends_in_number(host)):
        return host.translate(_ASCII_LOWER)
    return _parse_host(host)


@functools.lru_cache(maxsize=4096)
def _parse_host(host: str) -> str | None:
    """WHATWG's host parser (URL Standard, "host parsing" and "domain to ASCII") on a host that
    is not plain printable ASCII: percent-decode it, read the bytes as UTF-8, map it by UTS #46
    (non-transitional, STD3 rules off, CheckBidi and CheckJoiners on), refuse a forbidden domain
    code point, then punycode. None where it fails, which is where browsers' parser (Node's,
    Chromium's) fails too (tests/test_extract.py): bytes that are not UTF-8 (`%FF`: U+FFFD,
    disallowed), a code point UTS #46 disallows (a C0 or C1 control, U+FFFD, a lone surrogate),
    a forbidden one after decoding or mapping (`a%20b`, `a%25b`, `a%2Fb`, U+FF0F, which maps to
    '/'), a leftover '%' (`a%zz`); also a character WHATWG takes but the rules refuse in a host
    written plainly (`a%22b`: '"', see _FORBIDDEN_DOMAIN), in a host that is not ASCII once
    decoded an "xn--" label that is not UTS #46 punycode (`_a_label_ok`; an ASCII one is only
    lower-cased, whatever its "xn--" labels: see below),
    a label breaking the joiner or bidi rules (in a host that is not ASCII, every label of a
    Bidi domain name: `_bidi_domain_ok`), nothing left after mapping.

    A host that ends in a number (its last label decimal, or "0x" hex) is an IPv4 address to
    the parser, in any spelling inet_aton takes (`0x7f.1`, `2130706433`, `0177.0.0.1`,
    `127.1`, `127.0.0.1.`: 127.0.0.1), written in dotted decimal; or, where its IPv4 parser
    fails (`1.2.3.4.5`, `999.1.1.1`, `0x100000000`, `example.1`), no host (fastlaion/ipv4.py).

    Where it succeeds the ASCII form is the mapped host's labels in punycode (`_punycode_labels`),
    an emoji's or '_''s too, which the idna package refuses, as browsers write them."""
    import idna

    if "%" in host:
        try:
            host = unquote_to_bytes(host).decode("utf-8")  # (a '%' without two hex digits stays)
        except UnicodeDecodeError:
            return None
    ascii_host = host.isascii()
    if ascii_host:
        mapped = host.translate(_ASCII_LOWER)  # UTS #46 maps ASCII to itself but for capitals
    else:
        try:
            mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        except idna.IDNAError:  # a code point UTS #46 disallows
            return None
    if not mapped or _FORBIDDEN_DOMAIN.search(mapped):
        return None
    if ends_in_number(mapped):  # an IPv4 address, written as dotted decimal; or no host at all
        number = ipv4_number(mapped)
        return None if number is None else dotted(number)
    if ascii_host:
        # An ASCII domain is lower-cased whatever UTS #46 says of its "xn--" labels (the URL
        # Standard's "ToASCII fallback for ASCII domains", whatwg/url#914, 2026; what Chromium's
        # ASCII fast path always did): strict checking refused real sites that browsers open,
        # `xn--72czcrhaj7cpt0ed1dxb4mb1s1.blogspot.com`, `xn--8i7caa.famitei.net`,
        # `xn--board-ngr.palungjit.org`; they were invalid_url here, their images lost.
        return mapped
    labels = mapped.split(".")
    for label in labels:
        if label[:4] == "xn--":
            if not _a_label_ok(label):
                return None
        elif not label.isascii() and not _u_label_ok(label):
            return None
    if not _bidi_domain_ok(labels):
        return None
    return mapped if mapped.isascii() else _punycode_labels(mapped)


_RTL_CLASSES = frozenset(("R", "AL", "AN"))  # the Bidi_Class values that make a "Bidi domain name"


def _bidi_domain_ok(labels: list[str]) -> bool:
    """UTS #46's CheckBidi across a domain's labels (each checked by `_a_label_ok` or
    `_u_label_ok`): where any label, "xn--" ones decoded, holds a character of Bidi_Class R, AL
    or AN (a "Bidi domain name", RFC 5893 1.4), every non-empty label must satisfy RFC 5893's
    Bidi Rule, its LTR and ASCII ones too: `1a.אב` fails (a label starting with a digit, EN),
    as `a-.אב` does (an LTR label ending in '-'); `a.אב` and `my_host.אב` pass. Checked only
    on a host that is not ASCII once percent-decoded: the URL Standard (2026, whatwg-url's
    domain parser) runs UTS #46 on an ASCII one for a validation error only and lower-cases it,
    so `1a.xn--4dbc` stays, as does `xn--a.example` (whatwg/url#914: `_parse_host`). ICU
    (Chromium) and whatwg-url (tr46) check so; Node 20's URL (ada before its PR #91) checks each
    label alone."""
    unicode_labels = [label[4:].encode("ascii").decode("punycode") if label[:4] == "xn--" else label
                      for label in labels]
    if not any(unicodedata.bidirectional(c) in _RTL_CLASSES for c in "".join(unicode_labels) if c > "\x7f"):
        return True
    import idna
    import idna.core

    try:
        return all(idna.core.check_bidi(label, check_ltr=True) for label in unicode_labels if label)
    except idna.IDNAError:
        return False


def _a_label_ok(label: str) -> bool:
    """Whether UTS #46 (rev. 31 on, as WHATWG's domain to ASCII runs it) takes an "xn--" label
    (lower case, after mapping): the rest is ASCII and decodes as punycode (RFC 3492) to a
    label holding a non-ASCII character (`xn--`, `xn--abc-` are refused, as ICU, which
    Chromium and Firefox use, refuses them), which is itself in UTS #46's mapped form (each code
    point valid, NFC: `xn--a` decodes to U+0080, a control) and valid (`_u_label_ok`). WHATWG's
    CheckHyphens is off: `xn--bcher-kva-` is refused for its decoding (ASCII only), not for
    its hyphen."""
    import idna

    try:
        decoded = label[4:].encode("ascii").decode("punycode")
        valid = decoded == idna.uts46_remap(decoded, std3_rules=False, transitional=False)
    except UnicodeError:  # not ASCII, not punycode, or a code point UTS #46 disallows (IDNAError)
        return False
    return valid and not decoded.isascii() and _u_label_ok(decoded)


def _u_label_ok(label: str) -> bool:
    """UTS #46's validity criteria that its mapping does not settle, for a non-ASCII label as
    WHATWG runs them (CheckJoiners and CheckBidi on, CheckHyphens off): no combining mark
    first, U+200C/U+200D only where RFC 5892's context rules allow, RFC 5893's bidi rule
    where the label has an RTL character (the other labels of a Bidi domain name are held to it
    too: `_bidi_domain_ok`). No CONTEXTO rule: UTS #46 has none, so `a·b` (U+00B7, which IDNA
    2008 allows only between two 'l') is taken, as browsers take it."""
    import idna
    import idna.core

    if unicodedata.category(label[0])[0] == "M":
        return False
    try:
        if ("\u200c" in label or "\u200d" in label) and not all(
                idna.core.valid_contextj(label, i) for i, c in enumerate(label) if c in "\u200c\u200d"):
            return False
        return idna.core.check_bidi(label)
    except idna.IDNAError:
        return False


@functools.lru_cache(maxsize=4096)
def _punycode_labels(mapped: str) -> str:
    """A host with non-ASCII characters, mapped by UTS #46 and checked as WHATWG's host parser
    does (`_parse_host`), as that parser writes it: ToASCII's last step, each label that is not
    ASCII as "xn--" and its punycode (RFC 3492, Python's 'punycode' codec), the others as they
    are; as browsers and yarl (aiohttp's URLs) send it. `_punycode_labels("💩.la")` is
    `"xn--ls8h.la"`. The idna package writes the same where it takes a host (tests/test_extract.py);
    it is not asked: every check WHATWG makes was made before, and what idna alone refuses (an
    emoji, '_', a label starting or ending with '-', an empty one or one over 63 characters: IDNA
    2008's and DNS's rules, stricter than WHATWG's) browsers write so too. Cached: a page's links
    often share a host."""
    return ".".join(label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
                    for label in mapped.split("."))


_UPPER_ASCII = re.compile("[A-Z]")


# ---------------------------------------------------------------------------------------------
# Writing pairs

def _schema_of() -> dict[str, Any]:
    """The candidates' columns and their Polars types."""
    import polars as pl

    return {"url": pl.String, "caption": pl.String, "page_url": pl.String, "uid": pl.String,
            "width": pl.Int32, "height": pl.Int32, "page_lang": pl.String}


def _uids(urls: Any, captions: Any) -> Any:
    """uid_of over two String Series: the native one when available, else hashlib."""
    if _USE_NATIVE:
        from .extract_native import uids

        out = uids(urls, captions)
        if out is not None:
            return out
    import polars as pl

    sha = hashlib.sha256
    return pl.Series("uid", [sha(f"{u}\x00{c}".encode()).hexdigest()[:32] for u, c in zip(urls.to_list(), captions.to_list())],
                     dtype=pl.String)


def uid_of(url: str, caption: str) -> str:
    """The stable pair key: first 16 bytes of sha256(url + '\\x00' + caption), hex.

    >>> uid_of("https://a.example/x.jpg", "a red bicycle")
    '51f59d02692bcf304a07832864cf76b8'
    """
    return hashlib.sha256(f"{url}\x00{caption}".encode()).hexdigest()[:32]


def _compiled_writer() -> bool:
    """Whether the compiled Parquet writer can be used (the native path is on, the library and
    libzstd are there)."""
    from .parquet_native import available

    return _USE_NATIVE and available()


def _write_empty(path: Path) -> None:
    """A Parquet file with the candidates' columns and no rows."""
    if _compiled_writer():
        from .parquet_native import ParquetWriter

        ParquetWriter(path, level=PARQUET_OPTIONS["compression_level"]).close()
        return
    import polars as pl

    with polars_io(path):
        pl.DataFrame(schema=_schema_of()).write_parquet(path, **PARQUET_OPTIONS)


class _PairWriter:
    """Writes one input's pairs to numbered Parquet files `path.stem-NNNN.parquet` beside
    `path`, in order. When the compiled writer is there (parquet_native.py), the rows the
    compiled rules kept (add_native) and rows given as lists (add_rows) go straight to it, and it
    drops the duplicates on `dedup` as they come: an input read by the native path never loads
    Polars. Frames (add_frame, from the vectorised rules), and add_rows without the compiled
    writer, are buffered and written by Polars, WRITE_CHUNK_ROWS at a time (pyarrow's writer
    would pull in pandas). A switch from one writer to the other starts the next file."""

    def __init__(self, path: Path, dedup: DedupMode = DedupMode.none):
        self.path = path
        self.dedup = dedup
        self._written = 0  # files
        self._cols: tuple[list, ...] = ([], [], [], [], [], [])
        self._frames: list[Any] = []  # before the rows in _cols, in order
        self._rows = 0
        self._native: Any = None  # the compiled writer of the current file, while it is open
        self.rows_out = 0  # rows in the files closed so far
        self._unique = True  # every file so far came from a compiled writer that dropped duplicates
        self._native_ok: bool | None = None

    @property
    def native(self) -> bool:
        """Whether add_native can be used: the compiled writer is there (and zstd for it)."""
        if self._native_ok is None:
            self._native_ok = _compiled_writer()
        return self._native_ok

    @property
    def unique_on(self) -> str | None:
        """The key the rows of this input's files are unique on already: its one file is from
        the compiled writer, which dropped the duplicates (None otherwise)."""
        if self._written == 1 and self._unique and self.dedup is not DedupMode.none and self._native is None:
            return self.dedup.value
        return None

    def _next_file(self) -> Path:
        return self.path.with_name(f"{self.path.stem}-{self._written:04d}.parquet")

    @staticmethod
    def files(paths: list[Path]) -> list[Path]:
        """The files the writers for `paths` wrote, writer by writer and each in order; every
        folder is listed once (a crawl's thousands of inputs share one)."""
        written: dict[Path, list[tuple[int, Path]]] = {}
        for folder in dict.fromkeys(p.parent for p in paths):
            for f in folder.glob("*-*.parquet"):
                stem, _, number = f.stem.rpartition("-")
                if number.isdigit():
                    written.setdefault(f.with_name(stem), []).append((int(number), f))
        return [f for p in paths for _, f in sorted(written.get(p.with_suffix(""), []))]

    def add_native(self, result: Any) -> None:
        """The rows of an extract_native.RuleResult (with its hard_rows: (link, url, caption,
        page_url, lang, uid) the reference kept), merged in link order."""
        from .parquet_native import Rows

        if not len(result.rows) and not result.hard_rows:
            return
        if result.addresses is not None:  # still in the C buffers: our own C wrote them, as Rows wants them
            a = Rows.from_addresses(len(result.rows), *result.addresses, result.rows, keep=result,
                                    merge=bool(result.hard_rows))
        else:
            lang_valid = result.lang_valid if result.lang_valid.count(0) else None
            a = Rows(len(result.rows), (result.url, result.cap, result.purl, result.uid, result.lang),
                     (None, None, None, None, lang_valid), seq=result.rows if result.hard_rows else None)
        b = None
        if result.hard_rows:
            link, url, caption, page_url, lang, uid = (list(c) for c in zip(*result.hard_rows))
            b = Rows.from_lists(url, caption, page_url, uid, lang, seq=array.array("q", link))
        self._native_writer().append(a, b)

    def _native_writer(self) -> Any:
        """The compiled writer of the current file; what Polars holds is written first."""
        if self._frames or self._cols[0]:
            self.flush()
        if self._native is None:
            from .parquet_native import ParquetWriter

            key = None if self.dedup is DedupMode.none else self.dedup.value
            self._native = ParquetWriter(self._next_file(), dedup=key, rowgroup_rows=WRITE_CHUNK_ROWS,
                                         level=PARQUET_OPTIONS["compression_level"])  # as Polars writes them
        return self._native

    def _close_native(self) -> None:
        if self._native is not None:
            self._native.close()
            self.rows_out += self._native.rows_written
            self._native = None
            self._written += 1

    def add_rows(self, urls: list[str], captions: list[str], page_urls: list[str], widths: list[int | None],
                 heights: list[int | None], langs: list[str | None]) -> None:
        if self.native:
            from .parquet_native import Rows

            uids = [uid_of(u, c) for u, c in zip(urls, captions)]
            self._native_writer().append(Rows.from_lists(urls, captions, page_urls, uids, langs, widths, heights))
            return
        c = self._cols
        c[0].extend(urls)
        c[1].extend(captions)
        c[2].extend(page_urls)
        c[3].extend(widths)
        c[4].extend(heights)
        c[5].extend(langs)
        self._rows += len(urls)
        if self._rows >= WRITE_CHUNK_ROWS:
            self.flush()

    def add_frame(self, frame: Any) -> None:
        """Rows as a Polars DataFrame with the columns of add_rows: url, caption, page_url,
        width, height, page_lang; and uid, when it has it already."""
        self._close_native()
        self._frame_rows()
        self._frames.append(frame)
        self._rows += frame.height
        if self._rows >= WRITE_CHUNK_ROWS:
            self.flush()

    def _frame_rows(self) -> None:
        import polars as pl

        urls, caps, pages, widths, heights, langs = self._cols
        if urls:
            schema = _schema_of()
            del schema["uid"]
            self._frames.append(pl.DataFrame({"url": urls, "caption": caps, "page_url": pages, "width": widths,
                                              "height": heights, "page_lang": langs}, schema=schema))
            self._cols = ([], [], [], [], [], [])

    def flush(self) -> None:
        """Write what is buffered; close the compiled writer's file."""
        self._close_native()
        if not self._frames and not self._cols[0]:
            return
        import polars as pl

        self._frame_rows()
        schema = _schema_of()
        frames = [(f if "uid" in f.columns else f.with_columns(uid=_uids(f.get_column("url"), f.get_column("caption"))))
                  .select(list(schema)).cast(schema) for f in self._frames]  # native frames come with their uid
        frame = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
        self._frames, self._rows = [], 0
        path = self._next_file()
        with polars_io(path):
            frame.write_parquet(path, **PARQUET_OPTIONS)
        self._written += 1
        self.rows_out += frame.height
        self._unique = False

    def __enter__(self) -> _PairWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.flush()
        elif self._native is not None:
            self._native.abort()
            self._native = None

