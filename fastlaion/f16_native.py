"""float16 embeddings to float32 with their squared lengths, and the rows without inf or NaN,
compiled (f16_native.c), loaded with ctypes. `rows()` and `finite_rows()` give None where the library cannot be had (no C compiler, a failed build,
FASTLAION_NATIVE=0): fastlaion.dataset.semantic's float32_rows and finite_rows then use numpy,
the reference, to the same values.

Built once per source version into $FASTLAION_KERNEL_CACHE, as extract_native's library is.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from . import extract_native

SOURCE = Path(__file__).with_name("f16_native.c")


def _load() -> Any:
    lib = ctypes.CDLL(str(extract_native.built("f16", (SOURCE,))))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.f16_rows.restype, lib.f16_rows.argtypes = None, [p, i64, i64, p, p, ctypes.c_int]
    lib.f16_simd.restype, lib.f16_simd.argtypes = ctypes.c_int, []
    lib.f16_finite_rows.restype, lib.f16_finite_rows.argtypes = None, [p, i64, i64, p]
    lib.f16_simd()  # once, here under OnFirstUse's lock: it caches the CPU check that f16_rows reads
    return lib


_LIBRARY = extract_native.OnFirstUse(_load, "compiled float16 conversion unavailable (%s); numpy converts")


def library() -> Any:
    """The loaded library, built if needed; None (the reason logged once) when it cannot be had."""
    return _LIBRARY.get()


def _reset() -> None:
    """Forget the loaded library (tests)."""
    _LIBRARY.reset()


def _native_2d(vec: np.ndarray) -> np.ndarray:
    """vec as the C reads it: 2-D, float16 in the machine's byte order, C order and aligned."""
    if vec.ndim != 2 or vec.dtype != np.float16:
        raise ValueError(f"need a 2-D float16 array, got {vec.ndim}-D {vec.dtype}")
    return np.require(vec, np.dtype("=f2"), ["C_CONTIGUOUS", "ALIGNED"])


def rows(vec: np.ndarray, simd: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """A 2-D float16 (m, D) array -> (its float32 copy, (m,) float32 sums of squares), or None
    without the library. `simd=False` takes the portable path where F16C is there too (tests)."""
    lib = library()
    if lib is None:
        return None
    x = _native_2d(vec)
    out = np.empty(x.shape, np.float32)
    norm2 = np.empty(x.shape[0], np.float32)
    if x.size:
        lib.f16_rows(x.ctypes.data, x.shape[0], x.shape[1], out.ctypes.data, norm2.ctypes.data, int(simd))
    else:
        norm2[:] = 0
    return out, norm2


def finite_rows(vec: np.ndarray) -> np.ndarray | None:
    """(m,) bool: the rows of a 2-D float16 (m, D) array without inf or NaN; None without the library."""
    lib = library()
    if lib is None:
        return None
    x = _native_2d(vec)
    ok = np.empty(x.shape[0], np.bool_)
    if x.shape[0]:
        lib.f16_finite_rows(x.ctypes.data, x.shape[0], x.shape[1], ok.ctypes.data)
    return ok


def simd() -> bool:
    """Whether the F16C path runs on this CPU (False without the library)."""
    lib = library()
    return bool(lib is not None and lib.f16_simd())
