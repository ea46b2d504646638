"""A Parquet writer for extract's candidate pairs in C (parquet_native.c), so the compiled WAT
path writes its rows without importing Polars.

The files hold extract._schema_of()'s columns (url, caption, page_url, uid, width, height,
page_lang, all nullable), zstd-compressed, and read back in Polars and pyarrow exactly like
the files Polars' `write_parquet` makes. The C code is part of extract_native's library;
zstd is taken from the system's libzstd.so.1. `available()` is False without either, and the
caller then writes with Polars.

Rows are handed over as `Rows`: per string column one blob of n UTF-8 strings, NUL-terminated
(the compiled rules' output, which holds no NUL) or with their byte lengths (rows from Python,
which may), optional validity bytes, optional Int32 arrays. The buffers are checked here, as the C code
relies on them.
"""

from __future__ import annotations

import array
import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import extract_native

NSTR = 5  # url, caption, page_url, uid, page_lang
_DEDUP = {None: -1, "url": 0, "uid": 3}

_vp = ctypes.c_void_p


class _PqRows(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("seq", _vp), ("strs", _vp * NSTR), ("valid", _vp * NSTR),
                ("ints", _vp * 2), ("ivalid", _vp * 2), ("lens", _vp * NSTR)]


class _Fns:
    """The pq_* functions, with errno kept for OSError."""

    def __init__(self, lib: Any):
        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            return ctypes.CFUNCTYPE(restype, *argtypes, use_errno=True)((name, lib))

        rows_p = ctypes.POINTER(_PqRows)
        self.open = fn("pq_open", _vp, ctypes.c_char_p, _vp, _vp, _vp, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
        self.append = fn("pq_append", ctypes.c_int, _vp, rows_p, rows_p)
        self.written = fn("pq_rows_written", ctypes.c_int64, _vp)
        self.dropped = fn("pq_rows_dropped", ctypes.c_int64, _vp)
        self.close = fn("pq_close", ctypes.c_int, _vp)
        self.abort = fn("pq_abort", None, _vp)


@functools.cache
def _zstd() -> tuple[int, int, int] | None:
    """Addresses of ZSTD_compress, ZSTD_compressBound and ZSTD_isError; None without libzstd."""
    try:
        so = ctypes.CDLL("libzstd.so.1")
        return tuple(ctypes.cast(getattr(so, name), _vp).value or 0  # type: ignore[return-value]
                     for name in ("ZSTD_compress", "ZSTD_compressBound", "ZSTD_isError"))
    except (OSError, AttributeError):
        return None


def _fns() -> _Fns | None:
    """The pq_* functions of extract_native's library, or None."""
    lib = extract_native.library()
    if lib is None:
        return None
    fns = getattr(lib, "fastlaion_pq", None)
    if fns is None:
        fns = lib.fastlaion_pq = _Fns(lib)
    return fns


def available() -> bool:
    """Whether the C writer can be used here (the library built and libzstd loaded)."""
    return _zstd() is not None and _fns() is not None


def _addr(buf: bytes | array.array | None) -> int | None:
    if buf is None:
        return None
    if isinstance(buf, array.array):
        return buf.buffer_info()[0]
    return ctypes.cast(ctypes.c_char_p(buf), _vp).value


def _as_bytes(b: Any, what: str) -> bytes:
    if isinstance(b, bytes):
        return b
    if isinstance(b, (bytearray, memoryview)):
        return bytes(b)
    raise ValueError(f"{what}: bytes expected, got {type(b).__name__}")


class Rows:
    """One set of rows for ParquetWriter.append (the C pq_rows), keeping its buffers alive.

    strs: url, caption, page_url, uid, page_lang, each n UTF-8 strings (a null row holds an empty
    one): NUL-terminated, or back to back where `lens` gives that column's n byte lengths (array
    "q"; such strings may hold U+0000); valid: per string column None (all valid) or n bytes,
    0 = null; seq: n never decreasing int64 sort keys (array "q") for merging two sets; ints: width
    and height, None (all null) or n int32 (array "i"); ivalid: None or n bytes, 0 = null. The
    arrays are used in place, not copied: they must not change size while the Rows lives."""

    def __init__(self, n: int, strs: Sequence[bytes], valid: Sequence[bytes | None] = (None,) * NSTR,
                 seq: array.array | None = None, ints: Sequence[array.array | None] = (None, None),
                 ivalid: Sequence[bytes | None] = (None, None), lens: Sequence[array.array | None] = (None,) * NSTR):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, not {n!r}")
        if len(strs) != NSTR or len(valid) != NSTR or len(ints) != 2 or len(ivalid) != 2 or len(lens) != NSTR:
            raise ValueError("Rows takes 5 string blobs, 5 valid, 2 ints, 2 ivalid and 5 lens")
        self.n = n
        self.strs = [_as_bytes(s, f"strs[{k}]") for k, s in enumerate(strs)]
        self.lens = list(lens)
        for k, (blob, ln) in enumerate(zip(self.strs, self.lens)):
            if n == 0 and blob:
                raise ValueError(f"strs[{k}]: no rows but {len(blob)} bytes")
            if ln is not None:
                if not isinstance(ln, array.array) or ln.typecode != "q" or len(ln) != n:
                    raise ValueError(f"lens[{k}]: array('q') of {n} values expected")
                if (n and min(ln) < 0) or sum(ln) != len(blob):
                    raise ValueError(f"lens[{k}]: lengths >= 0 adding up to the {len(blob)} bytes of strs[{k}] expected")
                continue
            nuls = blob.count(b"\0")
            if n and (nuls != n or not blob.endswith(b"\0")):
                raise ValueError(f"strs[{k}]: {n} NUL-terminated strings expected, {nuls} NULs in {len(blob)} bytes")
        self.valid = [None if v is None else _as_bytes(v, f"valid[{k}]") for k, v in enumerate(valid)]
        self.ivalid = [None if v is None else _as_bytes(v, f"ivalid[{k}]") for k, v in enumerate(ivalid)]
        for name, vs in (("valid", self.valid), ("ivalid", self.ivalid)):
            for k, v in enumerate(vs):
                if v is not None and len(v) != n:
                    raise ValueError(f"{name}[{k}]: {n} bytes expected, got {len(v)}")
        self.ints = list(ints)
        for k, a in enumerate(self.ints):
            if a is None:
                if self.ivalid[k] is not None:
                    raise ValueError(f"ivalid[{k}] given without ints[{k}]")
                continue
            if not isinstance(a, array.array) or a.typecode != "i" or a.itemsize != 4 or len(a) != n:
                raise ValueError(f"ints[{k}]: array('i') of {n} values expected")
        if seq is not None:
            if not isinstance(seq, array.array) or seq.typecode != "q" or len(seq) != n:
                raise ValueError(f"seq: array('q') of {n} values expected")
            if seq.tolist() != sorted(seq):
                raise ValueError("seq must never decrease")
        self.seq = seq
        self._c = _PqRows(n, _addr(seq), (_vp * NSTR)(*map(_addr, self.strs)), (_vp * NSTR)(*map(_addr, self.valid)),
                          (_vp * 2)(*map(_addr, self.ints)), (_vp * 2)(*map(_addr, self.ivalid)),
                          (_vp * NSTR)(*map(_addr, self.lens)))

    @staticmethod
    def from_addresses(n: int, strs: Sequence[int], valid: Sequence[int | None], seq: array.array, keep: Any,
                       merge: bool) -> Rows:
        """Rows whose strings are already in C memory at these addresses, laid out as Rows wants
        them (extract_native's rules output, which only our C writes): not checked or copied.
        `keep` is kept alive with the Rows; seq (array "q" of n) is used when `merge`."""
        if len(seq) != n or len(strs) != NSTR or len(valid) != NSTR:
            raise ValueError("from_addresses: n, strs and valid do not agree")
        rows = Rows.__new__(Rows)
        rows.n, rows.seq, rows.strs, rows.valid = n, seq if merge else None, [keep], [None] * NSTR
        rows.ints, rows.ivalid, rows.lens = [None, None], [None, None], [None] * NSTR
        rows._c = _PqRows(n, _addr(rows.seq), (_vp * NSTR)(*strs), (_vp * NSTR)(*valid), (_vp * 2)(None, None),
                          (_vp * 2)(None, None), (_vp * NSTR)())
        return rows

    @staticmethod
    def from_lists(urls: Sequence[str], captions: Sequence[str], page_urls: Sequence[str], uids: Sequence[str],
                   langs: Sequence[str | None], widths: Sequence[int | None] | None = None,
                   heights: Sequence[int | None] | None = None, seq: Sequence[int] | None = None) -> Rows:
        """Rows from Python lists (None = null); strings go with their lengths, so U+0000 may be in one."""
        cols = (urls, captions, page_urls, uids, langs)
        n = len(urls)
        if any(len(c) != n for c in cols) or any(c is not None and len(c) != n for c in (widths, heights, seq)):
            raise ValueError("all columns must have the same length")
        strs, valid, lens = [], [], []
        for col in cols:
            encoded = [(s or "").encode() for s in col]
            strs.append(b"".join(encoded))
            lens.append(array.array("q", map(len, encoded)))
            valid.append(bytes(s is not None for s in col) if any(s is None for s in col) else None)
        ints: list[array.array | None] = []
        ivalid: list[bytes | None] = []
        for col in (widths, heights):
            if col is None or all(v is None for v in col):
                ints.append(None)
                ivalid.append(None)
            else:
                ints.append(array.array("i", [v or 0 for v in col]))
                ivalid.append(bytes(v is not None for v in col) if any(v is None for v in col) else None)
        return Rows(n, strs, valid, None if seq is None else array.array("q", seq), ints, ivalid, lens)


class ParquetWriter:
    """Writes Rows to one Parquet file; a context manager (an exception aborts: no file left).

    dedup: None, "url" or "uid": a row whose key was written before is dropped (counted in
    rows_dropped), as Polars' unique(subset=[key], keep="first", maintain_order=True) over all
    rows appended. A new row group starts every rowgroup_rows rows (and before a page would
    pass 256 MiB)."""

    def __init__(self, path: Path, dedup: str | None = None, rowgroup_rows: int = 131_072, level: int = 1):
        if dedup not in _DEDUP:
            raise ValueError(f"dedup must be None, 'url' or 'uid', not {dedup!r}")
        if rowgroup_rows < 1:
            raise ValueError("rowgroup_rows must be at least 1")
        fns, zstd = _fns(), _zstd()
        if fns is None or zstd is None:
            raise RuntimeError("the native Parquet writer is not available")
        self.path = Path(path)
        self._fns = fns
        self._counts = (0, 0)
        w = fns.open(os.fsencode(self.path), *zstd, level, _DEDUP[dedup], rowgroup_rows)
        if not w:
            self._raise()
        self._w: int | None = w

    def _raise(self) -> None:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(self.path))

    def append(self, a: Rows, b: Rows | None = None) -> None:
        """Write the rows of a; with b, the rows of a and b merged by seq (a first on ties)."""
        if self._w is None:
            raise ValueError(f"{self.path}: writer is closed")
        if b is not None and a.n and b.n and (a.seq is None or b.seq is None):
            raise ValueError("merging two sets needs seq in both")
        if self._fns.append(self._w, ctypes.byref(a._c), ctypes.byref(b._c) if b is not None else None):
            self._raise()

    @property
    def rows_written(self) -> int:
        return self._fns.written(self._w) if self._w is not None else self._counts[0]

    @property
    def rows_dropped(self) -> int:
        return self._fns.dropped(self._w) if self._w is not None else self._counts[1]

    def _take(self) -> int | None:
        w = self._w
        if w is not None:
            self._counts = (self._fns.written(w), self._fns.dropped(w))
            self._w = None
        return w

    def close(self) -> None:
        """Write the last row group and the footer and close the file; again: nothing."""
        w = self._take()
        if w is not None and self._fns.close(w):
            self._raise()

    def abort(self) -> None:
        """Close without a footer and remove the file."""
        w = self._take()
        if w is not None:
            self._fns.abort(w)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ParquetWriter:  # noqa: PYI034 (not subclassed)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # Frees the C state of a writer never closed; the file is left as it is.
        w = getattr(self, "_w", None)
        if w is not None:
            self._w = None
            self._fns.abort(w)
