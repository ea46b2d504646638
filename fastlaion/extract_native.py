"""The compiled WAT hot path (extract_native.c), built on first use and loaded with ctypes.

`scanner()` gives a `Scanner` for one input (inflate, split, classify and parse gzip members of
WAT records: `Batch`), `Rules` applies LAION's link rules to a Batch's pages, and `uids` hashes
pairs. `scanner()` and `uids()` give None when the native path is not available: no C compiler
(`$CC`, else `cc` or `gcc` on PATH), a failed build, no libdeflate in the `deflate` package, or
FASTLAION_NATIVE=0 in the environment. extract.py then reads the file with its Python path,
which is also the reference the native path is tested against (tests/test_extract_native.py);
a record or link the C code is not sure of is always handed back to that path (see the C
file's comment), so both give the same rows in the same order and the same counts.

The library is built once per source version into $FASTLAION_KERNEL_CACHE (or
~/.cache/fastlaion/kernels), as `wat-<hash of the C source and compiler>.so`, written under a
temporary name and renamed, so processes that build it at once do not clash.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
from itertools import accumulate
from pathlib import Path
from typing import Any

from .config import first_line

log = logging.getLogger(__name__)

# The C sources of the one library: the WAT hot path and the Parquet writer it feeds.
SOURCES = tuple(Path(__file__).with_name(name) for name in ("extract_native.c", "parquet_native.c"))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(cc: str, out: Path, digest: Path, sources: tuple[Path, ...] = SOURCES) -> None:
    """Compile `sources` into `out` (readable by all, as a shared cache needs) and write its digest;
    both under temporary names first, renamed into place, so processes building at once and a
    build killed half-way never leave a partial file under the final names."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        proc = subprocess.run([*shlex.split(cc), "-O2", "-shared", "-fPIC", "-o", str(tmp), *map(str, sources)],
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:] or 'no library written'}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        sha = _file_sha256(tmp)
        os.replace(tmp, out)
        tmp.with_suffix(".sha256tmp").write_text(sha + "\n")
        os.replace(tmp.with_suffix(".sha256tmp"), digest)
    finally:
        for leftover in (tmp, tmp.with_suffix(".sha256tmp")):
            if leftover.exists():
                leftover.unlink()
K_EMPTY, K_DEFER, K_OTHER, K_NOIMG, K_PAGE = range(5)
S_STOP, S_FULL = 0, 1
MEM_FIELDS, PAGE_FIELDS = 4, 6
F_LANG, F_PARTS, F_BASED = 1, 2, 4
PAGE_STRINGS = 5  # url, lang, scheme, origin, dir

_i64p = ctypes.POINTER(ctypes.c_int64)
_u8p = ctypes.POINTER(ctypes.c_uint8)


class _Ctx(ctypes.Structure):
    _fields_ = [
        ("arena", _u8p), ("arena_cap", ctypes.c_int64), ("arena_used", ctypes.c_int64),
        ("mem", _i64p), ("mem_cap", ctypes.c_int64), ("n_mem", ctypes.c_int64),
        ("pages", _i64p), ("pages_cap", ctypes.c_int64), ("n_pages", ctypes.c_int64),
        ("strs", _u8p), ("strs_cap", ctypes.c_int64), ("strs_used", ctypes.c_int64),
        ("pblob", _u8p), ("pblob_cap", ctypes.c_int64), ("pblob_used", ctypes.c_int64),
        ("src", _u8p), ("src_cap", ctypes.c_int64), ("src_used", ctypes.c_int64),
        ("alt", _u8p), ("alt_cap", ctypes.c_int64), ("alt_used", ctypes.c_int64),
        ("src_valid", _u8p), ("alt_valid", _u8p), ("link_page", ctypes.POINTER(ctypes.c_int32)),
        ("links_cap", ctypes.c_int64), ("n_links", ctypes.c_int64),
        ("max_record_bytes", ctypes.c_int64),
        ("decompressor", ctypes.c_void_p), ("gunzip", ctypes.c_void_p),
        ("src_start", _i64p), ("alt_start", _i64p),
        ("n_defer", ctypes.c_int64), ("n_other", ctypes.c_int64), ("n_noimg", ctypes.c_int64),
        ("n_bytes", ctypes.c_int64), ("opt_out_mask", ctypes.c_int64),
    ]


def _compiler() -> str | None:
    """The C compiler command to build with: $CC (which may carry arguments, as `ccache gcc`),
    else cc or gcc. Tests monkeypatch this to simulate a machine without one."""
    cc = os.environ.get("CC")
    if cc:
        words = shlex.split(cc)
        found = shutil.which(words[0]) if words else None
        return shlex.join([found, *words[1:]]) if found else None
    return shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    return Path(os.environ.get("FASTLAION_KERNEL_CACHE") or Path.home() / ".cache" / "fastlaion" / "kernels")


class _NoCompiler(RuntimeError):
    pass


class OnFirstUse:
    """A compiled library (or its functions) loaded on first use, once: `get()` returns it, or
    None where it cannot be had (no compiler, a failed build, FASTLAION_NATIVE=0), the reason
    logged once: at INFO where that is expected (`expected` exception types), else WARNING. The
    Python path then runs, with the same results."""

    def __init__(self, load: Any, unavailable: str, expected: tuple[type[BaseException], ...] = (_NoCompiler,)):
        self._load = load
        self._unavailable = unavailable  # "what is unavailable (%s); what runs instead"
        self._expected = expected
        self._lock = threading.Lock()
        self._tried = False
        self._value: Any = None

    def get(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                self._value = self._try()
            return self._value

    def _try(self) -> Any:
        if os.environ.get("FASTLAION_NATIVE", "1") == "0":
            return None
        try:
            return self._load()
        except Exception as e:  # noqa: BLE001 (no compiler, a failed build, an odd platform: Python runs)
            log.log(logging.INFO if isinstance(e, self._expected) else logging.WARNING, self._unavailable, first_line(e))
            return None

    def reset(self) -> None:
        """Forget what was loaded (tests)."""
        with self._lock:
            self._tried, self._value = False, None


def library() -> Any:
    """The loaded library, built if needed; None (the reason logged once) when it cannot be had."""
    return _LIBRARY.get()


def _reset() -> None:
    """Forget the loaded library (tests)."""
    _LIBRARY.reset()


def built(stem: str, sources: tuple[Path, ...]) -> Path:
    """The shared library compiled from `sources`, built first if the cache has none (or one cut
    short): `<cache>/<stem>-<hash of the sources, compiler and platform>.so`. Raises _NoCompiler
    without a C compiler, RuntimeError when the build fails."""
    cc = _compiler()
    if cc is None:
        raise _NoCompiler("no C compiler")
    src = b"\0".join(f.read_bytes() for f in sources)
    # One library per source, compiler and platform (a home folder shared by machines of two kinds
    # gets one each).
    key = src + "\0".join((cc, sys.platform, platform.machine(), *platform.libc_ver())).encode()
    tag = hashlib.sha256(key).hexdigest()[:16]
    out = _cache_dir() / f"{stem}-{tag}.so"
    digest = out.with_suffix(".sha256")  # the library's own SHA-256, written once it is in place
    if not (out.is_file() and digest.is_file() and digest.read_text().strip() == _file_sha256(out)):
        # None yet, or one cut short (a crash before it reached the disk, a copy interrupted):
        # loading such a file can kill the process (SIGBUS), so it is built again first.
        _build(cc, out, digest, sources)
    return out


def _load() -> Any:
    deflate_fns = _libdeflate()  # first: without it there is nothing to build for
    out = built("wat", SOURCES)
    lib = ctypes.CDLL(str(out))
    lib.wat_open.restype = ctypes.POINTER(_Ctx)
    lib.wat_open.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.wat_close.restype = None
    lib.wat_close.argtypes = [ctypes.POINTER(_Ctx)]
    lib.wat_set_opt_out.restype = None
    lib.wat_set_opt_out.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_int64]
    lib.wat_reset.restype = None
    lib.wat_reset.argtypes = [ctypes.POINTER(_Ctx)]
    lib.wat_scan.restype = ctypes.c_int64
    lib.wat_scan.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64,
                             ctypes.POINTER(ctypes.c_int32)]
    lib.wat_uids.restype = None
    lib.wat_uids.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.fastlaion_sha256 = _openssl_sha256()
    lib.wat_rules.restype = ctypes.c_int
    lib.wat_rules.argtypes = [ctypes.POINTER(_Ctx), ctypes.POINTER(_RulesCfg), ctypes.POINTER(_RulesOut), ctypes.c_int64,
                              ctypes.c_int64]
    lib.wat_rules_out.restype = ctypes.POINTER(_RulesOut)
    lib.wat_rules_out.argtypes = []
    lib.wat_rules_free.restype = None
    lib.wat_rules_free.argtypes = [ctypes.POINTER(_RulesOut)]
    lib.wat_is_py_space.restype = ctypes.c_int
    lib.wat_is_py_space.argtypes = [ctypes.c_uint32]
    lib.fastlaion_libdeflate = deflate_fns
    return lib


# A machine without a compiler or libdeflate is expected to read with Python; a build or load that
# fails where both are there is worth a word.
_LIBRARY = OnFirstUse(_load, "fastlaion extract: native WAT path unavailable (%s); using the Python path",
                      expected=(_NoCompiler, ImportError, AttributeError))


def tune_malloc() -> bool:
    """For a process that only extracts: glibc's malloc keeps serving this process's large buffers
    from its heap instead of mapping fresh pages for each. Reading 1 MiB chunks (and joining one
    onto a member cut at its start, where the scanner does not take that member alone) otherwise
    maps, faults in and unmaps a new MiB or two per chunk
    (~5,000 page faults on the bench WAT, ~0.1 s of 1.4). The cost: up to 128 MiB freed stays
    with the process instead of going back to the system (RSS +10 MB on the bench WAT). Returns
    whether it was set (glibc only)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 128 << 20))
    except (OSError, AttributeError):
        return False


def _libdeflate() -> tuple[Any, int, Any]:
    """(alloc, gzip_decompress_ex address, free) of the libdeflate inside the `deflate` package,
    the inflater extract.py's Python path uses."""
    import deflate._deflate as ext

    so = ctypes.CDLL(ext.__file__)
    alloc = so.libdeflate_alloc_decompressor
    alloc.restype = ctypes.c_void_p
    alloc.argtypes = []
    free = so.libdeflate_free_decompressor
    free.restype = None
    free.argtypes = [ctypes.c_void_p]
    gunzip = ctypes.cast(so.libdeflate_gzip_decompress_ex, ctypes.c_void_p).value
    return alloc, gunzip, free


def _openssl_sha256() -> tuple[int | None, int | None, int | None]:
    """Addresses of SHA256_Init, SHA256_Update and SHA256_Final in the libcrypto that Python's
    hashlib loaded (Nones: the library's own SHA-256 is used). The digests are the same."""
    try:
        import _hashlib  # noqa: F401  (loads libcrypto)

        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/libcrypto" in line})
        for path in paths:
            so = ctypes.CDLL(path)
            return tuple(ctypes.cast(getattr(so, f"SHA256_{name}"), ctypes.c_void_p).value  # type: ignore[return-value]
                         for name in ("Init", "Update", "Final"))
    except (ImportError, OSError, AttributeError):
        pass
    return None, None, None


def uids(urls: Any, captions: Any) -> Any:
    """extract.uid_of of each (url, caption) of two String Series without nulls, as a String
    Series; None when the library is not available."""
    import polars as pl

    lib = library()
    if lib is None:
        return None
    n = len(urls)
    if not n:
        return pl.Series("uid", [], dtype=pl.String)

    def flat(col: Any) -> tuple[bytes, array.array]:
        off = array.array("q", [0])
        off.extend(accumulate(col.str.len_bytes().to_list()))
        return col.str.join("").cast(pl.Binary).item(), off

    ub, uo = flat(urls)
    cb, co = flat(captions)
    out = ctypes.create_string_buffer(33 * n)
    lib.wat_uids(ub, uo.buffer_info()[0], cb, co.buffer_info()[0], n, ctypes.addressof(out), *lib.fastlaion_sha256)
    return pl.Series("uid", [out.raw[:-1]], dtype=pl.Binary).cast(pl.String).str.split("\x00").explode()


def scanner(max_record_bytes: int, opt_out_tags: tuple[str, ...]) -> Scanner | None:
    """A Scanner for one input, or None without the library (or for a tag the C walk does not
    know: then only Python can decide). Records whose robots metas or X-Robots-Tag headers may
    carry one of `opt_out_tags` are left to extract.py (deferred)."""
    from .config import PAGE_OPT_OUT_TAGS

    lib = library()
    if lib is None or any(tag not in PAGE_OPT_OUT_TAGS for tag in opt_out_tags):
        return None
    found = Scanner(lib, max_record_bytes)
    lib.wat_set_opt_out(found.ctx_p, sum(1 << i for i, tag in enumerate(PAGE_OPT_OUT_TAGS) if tag in opt_out_tags))
    return found


def _addr(ptr: Any) -> int:
    return ctypes.cast(ptr, ctypes.c_void_p).value or 0


def _ints(ptr: Any, n: int, code: str = "q") -> list[int]:
    """n C integers at ptr (a ctypes pointer or an address) as a list."""
    size = 8 if code == "q" else 4
    at = ptr if isinstance(ptr, int) else _addr(ptr)
    return array.array(code, ctypes.string_at(at, n * size)).tolist() if n else []


class _GBuf(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("n", ctypes.c_int64), ("cap", ctypes.c_int64)]

    def bytes(self) -> bytes:
        return ctypes.string_at(self.p, self.n) if self.n else b""


class _RulesCfg(ctypes.Structure):
    _fields_ = [("min_alt", ctypes.c_int64), ("reject_svg", ctypes.c_int64), ("reject_gif", ctypes.c_int64),
                ("max_host", ctypes.c_int64), ("max_text", ctypes.c_int64), ("sha_init", ctypes.c_void_p),
                ("sha_update", ctypes.c_void_p), ("sha_final", ctypes.c_void_p), ("ovr_page", ctypes.c_void_p),
                ("ovr_blob", ctypes.c_void_p), ("n_ovr", ctypes.c_int64)]


class _RulesOut(ctypes.Structure):
    _fields_ = [("url", _GBuf), ("cap", _GBuf), ("purl", _GBuf), ("lang", _GBuf), ("uid", _GBuf), ("lang_valid", _GBuf),
                ("row_link", _GBuf), ("hard", _GBuf), ("hsrc", _GBuf), ("halt", _GBuf), ("hvalid", _GBuf),
                ("reasons", ctypes.c_int64 * 8), ("url_cut", ctypes.c_int64),
                ("cap_cut", ctypes.c_int64)]


class Batch:
    """The results of one scan: views of the scanner's buffers, valid until it scans again."""

    PAGE_FIELDS = PAGE_FIELDS

    def __init__(self, scanner: Scanner):
        c = scanner.ctx
        self.scanner, self.c = scanner, c
        self.n, self.n_pages, self.n_links = c.n_mem, c.n_pages, c.n_links
        self.n_defer, self.n_other, self.n_noimg, self.n_bytes = c.n_defer, c.n_other, c.n_noimg, c.n_bytes
        self.pblob_used = c.pblob_used
        self._pages: list[int] | None = None
        self._strings: list[str] | None = None

    def members(self) -> list[tuple[int, int]]:
        """(kind, page index or -1) of each member, in order."""
        m = _ints(self.c.mem, self.n * MEM_FIELDS)
        return list(zip(m[0::MEM_FIELDS], m[3::MEM_FIELDS]))

    def member(self, i: int) -> bytes:
        """The inflated bytes of member i."""
        m = _ints(_addr(self.c.mem) + 8 * MEM_FIELDS * i, MEM_FIELDS)
        return ctypes.string_at(_addr(self.c.arena) + m[1], m[2])

    def pages(self) -> list[int]:
        if self._pages is None:
            self._pages = _ints(self.c.pages, self.n_pages * PAGE_FIELDS)
        return self._pages

    def links_of(self, a: int, b: int) -> int:
        pg, F = self.pages(), PAGE_FIELDS
        return sum(pg[k * F + 4] for k in range(a, b))

    def page_strings(self) -> list[str]:
        """Per page its URL, language, scheme, origin and directory (PAGE_STRINGS a page; the
        last four mean something only where the page's flags say so)."""
        if self._strings is None:
            blob = ctypes.string_at(_addr(self.c.pblob), self.pblob_used - 1) if self.pblob_used else b""
            self._strings = blob.decode().split("\x00") if blob else []
        return self._strings

    def page(self, k: int) -> tuple[str, str | None, tuple[str | None, str | None, str | None]]:
        """(URL, language or None, _base_parts of its base: the URL, or its <base href> when
        based(k)) of page k."""
        strs, flags = self.page_strings(), self.pages()[k * PAGE_FIELDS + 5]
        at = k * PAGE_STRINGS
        return (strs[at], strs[at + 1] if flags & F_LANG else None,
                (strs[at + 2], strs[at + 3], strs[at + 4]) if flags & F_PARTS else (None, None, None))

    def base_pages(self, a: int, b: int) -> list[tuple[int, str]]:
        """(page, <base href>) of the pages among a..b with a non-blank <base href> that Python
        joins to the page URL (the C scan took the others as they are: based)."""
        pg, F, strs = self.pages(), PAGE_FIELDS, _addr(self.c.strs)
        return [(k, ctypes.string_at(strs + pg[k * F + 1], pg[k * F + 2]).decode())
                for k in range(a, b) if pg[k * F + 1] >= 0 and not pg[k * F + 5] & F_BASED]

    def based(self, k: int) -> str | None:
        """Page k's <base href> when the C scan took it as the page's base as it is (page(k)
        gives its parts), else None."""
        pg, F = self.pages(), PAGE_FIELDS
        if not pg[k * F + 5] & F_BASED:
            return None
        return ctypes.string_at(_addr(self.c.strs) + pg[k * F + 1], pg[k * F + 2]).decode().strip()

    def link_pages(self, links: list[int]) -> list[int]:
        """The page of each of `links`."""
        pages = array.array("i", ctypes.string_at(_addr(self.c.link_page), 4 * self.n_links))
        return [pages[i] for i in links]


class Rules:
    """The C link rules for one input (extract_native.c's wat_rules): its settings and output."""

    def __init__(self, lib: Any, min_alt: int, reject_svg: bool, reject_gif: bool, max_host: int, max_text: int):
        self.lib = lib
        self.cfg = _RulesCfg(min_alt, int(reject_svg), int(reject_gif), max_host, max_text, *lib.fastlaion_sha256,
                             None, None, 0)
        self.out_p = lib.wat_rules_out()
        if not self.out_p:
            raise MemoryError("wat_rules_out")
        self.out = self.out_p.contents

    def run(self, batch: Batch, a: int, b: int, overrides: list[tuple[int, tuple[str | None, ...]]],
            copy: bool = True) -> RuleResult:
        """The rules over the links of pages a..b; overrides: (page, (scheme, origin, directory))
        for the pages whose base Python joined, in page order. copy=False: the kept rows stay in
        the C buffers (RuleResult.addresses), valid until the next run."""
        pages = array.array("q", [k for k, _ in overrides])
        blob = b"".join(f"{p[0] or ''}\x00{p[1] or ''}\x00{p[2] or ''}\x00".encode() for _, p in overrides)
        self.cfg.ovr_page = pages.buffer_info()[0] if overrides else None
        self.cfg.ovr_blob = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value if overrides else None
        self.cfg.n_ovr = len(overrides)
        if self.lib.wat_rules(batch.scanner.ctx_p, ctypes.byref(self.cfg), self.out_p, a, b):
            raise MemoryError("wat_rules")
        o = self.out
        lang_valid = o.lang_valid.bytes()
        strings = (o.url, o.cap, o.purl, o.lang, o.uid)  # RuleResult's order
        res = RuleResult(*(s.bytes() if copy else b"" for s in strings), lang_valid,
                         array.array("q", o.row_link.bytes()), array.array("q", o.hard.bytes()).tolist(),
                         list(o.reasons), o.url_cut, o.cap_cut)
        if not copy:  # in the writer's order: url, caption, page_url, uid, page_lang
            res.addresses = ((o.url.p, o.cap.p, o.purl.p, o.uid.p, o.lang.p),
                             (None, None, None, None, o.lang_valid.p if lang_valid.count(0) else None))
        if res.hard:
            valid = o.hvalid.bytes()
            res.hard_links = list(zip(
                (s if v else None for s, v in zip(o.hsrc.bytes()[:-1].decode().split("\x00"), valid[0::2])),
                (a if v else None for a, v in zip(o.halt.bytes()[:-1].decode().split("\x00"), valid[1::2])),
                batch.link_pages(res.hard)))
        return res

    def close(self) -> None:
        if self.out_p:
            self.lib.wat_rules_free(self.out_p)
            self.out_p = None


class RuleResult:
    """What wat_rules decided: the kept links' url, caption, page URL, language and uid as
    NUL-terminated UTF-8 (lang_valid: 0 where the page has none) and their link indices
    (`rows`, int64, increasing); the links left to the reference (`hard`); per reason (extract.REJECT_REASONS
    order) the links rejected; and how many kept urls and captions were cut."""

    def __init__(self, url: bytes, cap: bytes, purl: bytes, lang: bytes, uid: bytes, lang_valid: bytes,
                 rows: array.array, hard: list[int], reasons: list[int], url_cut: int, cap_cut: int):
        self.url, self.cap, self.purl, self.lang, self.uid, self.lang_valid = url, cap, purl, lang, uid, lang_valid
        self.rows, self.hard, self.reasons, self.url_cut, self.cap_cut = rows, hard, reasons, url_cut, cap_cut
        self.hard_links: list[tuple[str | None, str | None, int]] = []  # (url, alt, page) of each hard link
        # Set by extract._LinkRules: the rows the reference kept of the hard links, as (link,
        # url, caption, page_url, lang, uid), and the place of link 0 in its flush.
        self.hard_rows: list[tuple[int, str, str, str, str | None, str]] = []
        self.seq0 = 0
        # Rules.run(copy=False): (string blob addresses, validity addresses) in the C buffers
        # instead of the bytes above, valid until the next run
        self.addresses: tuple[Any, ...] | None = None

    @staticmethod
    def frame(results: list[RuleResult]) -> Any:
        """The kept links of `results` as one DataFrame with extract._PairWriter's columns."""
        import polars as pl

        def col(attr: str, name: str, valid: bytes | None = None) -> Any:
            blob = b"".join(getattr(r, attr) for r in results)
            return strings(blob, valid if valid is not None else b"\x01" * n, name)

        n = sum(len(r.rows) for r in results)
        none = pl.Series(dtype=pl.Int32).extend_constant(None, n)
        return pl.DataFrame({"url": col("url", "url"), "caption": col("cap", "caption"), "page_url": col("purl", "page_url"),
                             "width": none, "height": none,
                             "page_lang": col("lang", "page_lang", b"".join(r.lang_valid for r in results)),
                             "uid": col("uid", "uid")})


def strings(blob: bytes, valid: bytes, name: str) -> Any:
    """NUL-terminated UTF-8 strings (none holds a NUL) as a String Series, null where valid is 0."""
    import polars as pl

    n = len(valid)
    if not n:
        return pl.Series(name, [], dtype=pl.String)
    s = pl.Series(name, [blob[:-1]], dtype=pl.Binary).cast(pl.String).str.split("\x00").explode()
    if valid.count(0) == 0:
        return s
    if valid.count(0) == n:
        return pl.Series(name, dtype=pl.String).extend_constant(None, n)
    mask = pl.Series(list(valid), dtype=pl.UInt8).cast(pl.Boolean)
    return s.zip_with(mask, pl.Series(name, dtype=pl.String).extend_constant(None, n))


class Scanner:
    """The native state for one input (a libdeflate decompressor and the C buffers)."""

    def __init__(self, lib: Any, max_record_bytes: int):
        self.lib = lib
        alloc, gunzip, self._free = lib.fastlaion_libdeflate
        self.decompressor = alloc()
        if not self.decompressor:
            raise MemoryError("libdeflate_alloc_decompressor")
        self.ctx_p = lib.wat_open(max_record_bytes, self.decompressor, gunzip)
        if not self.ctx_p:
            self._free(self.decompressor)
            raise MemoryError("wat_open")
        self.ctx = self.ctx_p.contents
        self._status = ctypes.c_int32(0)

    def scan(self, buf: bytes, start: int, keep: bool = False) -> tuple[int, bool]:
        """Inflate and classify the members of buf from `start`; (where it stopped, full).
        keep: add them to the members of the last scan, not yet taken (nothing of a batch
        points into the input buffer: the next scan may read another one)."""
        if not keep:
            self.lib.wat_reset(self.ctx_p)
        new = self.lib.wat_scan(self.ctx_p, buf, len(buf), start, ctypes.byref(self._status))
        return new, self._status.value == S_FULL

    def take(self) -> Batch | None:
        """The last scan's results, None if it took no member."""
        return Batch(self) if self.ctx.n_mem else None

    def close(self) -> None:
        if self.ctx_p:
            self.lib.wat_close(self.ctx_p)
            self.ctx_p = None
        if self.decompressor:
            self._free(self.decompressor)
            self.decompressor = None
