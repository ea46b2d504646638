"""The compiled common case of CachedClipTokenizer (tokenize_native.c), loaded with ctypes.

`NativeWords` holds a table of words and their ids and tokenizes a batch of captions of printable
ASCII without '&' with it, without the GIL; CachedClipTokenizer (score.py) gives it the words
it computes and tokenizes the captions it leaves (another alphabet, a new word) itself. `words()`
gives None where the library cannot be had (no C compiler, a failed build, FASTLAION_NATIVE=0):
the tokenizer then runs in Python alone, with the same ids.

Built once per source version into $FASTLAION_KERNEL_CACHE, as extract_native's library is.
"""

from __future__ import annotations

import ctypes
import threading
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from . import extract_native

SOURCE = Path(__file__).with_name("tokenize_native.c")
ST_DONE, ST_NOT_ASCII, ST_NEW_WORD = 0, 1, 2


def _load() -> Any:
    lib = ctypes.CDLL(str(extract_native.built("tok", (SOURCE,))))
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.tok_new.restype, lib.tok_new.argtypes = p, [i64, i64]
    lib.tok_free.restype, lib.tok_free.argtypes = None, [p]
    lib.tok_clear.restype, lib.tok_clear.argtypes = None, [p]
    lib.tok_words.restype, lib.tok_words.argtypes = i64, [p]
    lib.tok_add.restype, lib.tok_add.argtypes = ctypes.c_int, [p, ctypes.c_char_p, i64, p, i64]
    lib.tok_encode.restype, lib.tok_encode.argtypes = i64, [p, ctypes.c_char_p, p, i64, i64, p, p, p]
    return lib


_LIBRARY = extract_native.OnFirstUse(_load, "compiled tokenizer unavailable (%s); tokenizing in Python")


def library() -> Any:
    """The loaded library, built if needed; None (the reason logged once) when it cannot be had."""
    return _LIBRARY.get()


def _reset() -> None:
    """Forget the loaded library (tests)."""
    _LIBRARY.reset()


class NativeWords:
    """A word table in C and the batch tokenizer that reads it. Calls take a lock: the table is
    shared by the threads that tokenize with one CachedClipTokenizer."""

    def __init__(self, lib: Any, sot: int, eot: int):
        self._lib = lib
        self._handle = lib.tok_new(sot, eot)
        if not self._handle:
            raise MemoryError("tok_new")
        self._lock = threading.Lock()

    def __del__(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self._lib.tok_free(handle)

    def __len__(self) -> int:
        with self._lock:
            return int(self._lib.tok_words(self._handle))

    def add(self, word: str, ids: tuple[int, ...]) -> bool:
        """Add a word of the cleaned (lower-case) text and its ids (only ASCII words are asked
        for here); False when the table could not take it (out of memory)."""
        if not word.isascii():
            return True
        arr = np.asarray(ids, dtype=np.int64)
        with self._lock:
            return self._lib.tok_add(self._handle, word.encode(), len(word), arr.ctypes.data, len(arr)) == 0

    def clear(self) -> None:
        with self._lock:
            self._lib.tok_clear(self._handle)

    def encode(self, texts: list[str], context: int) -> tuple[np.ndarray, np.ndarray]:
        """(len(texts), context) int64 ids and a status per caption: ST_DONE where the row was
        written here, else ST_NOT_ASCII / ST_NEW_WORD (the row is zeros: the caller tokenizes it)."""
        if context < 1:
            raise ValueError(f"context length {context}: must be 1 or more")
        n = len(texts)
        # Another alphabet goes to Python anyway: one byte the C code refuses stands for it.
        blobs = [t.encode() if t.isascii() else b"\x80" for t in texts]
        off = np.fromiter(accumulate(map(len, blobs), initial=0), dtype=np.int64, count=n + 1)
        out = np.zeros((n, context), dtype=np.int64)
        status = np.empty(n, dtype=np.uint8)
        scratch = ctypes.create_string_buffer(max(map(len, blobs), default=0) + 1)
        with self._lock:
            self._lib.tok_encode(self._handle, b"".join(blobs), off.ctypes.data, n, context, out.ctypes.data,
                                 status.ctypes.data, scratch)
        return out, status


def words(sot: int, eot: int) -> NativeWords | None:
    lib = library()
    return NativeWords(lib, sot, eot) if lib is not None else None
