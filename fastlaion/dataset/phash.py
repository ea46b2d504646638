"""64-bit perceptual hashes (DCT pHash) and an exact search for hashes within a Hamming distance.

`phash64` is the classic pHash, as the `imagehash` library computes it: greyscale, Lanczos
resize to 32x32, 2-D DCT-II, the top-left 8x8 low frequencies, one bit per coefficient above
their median, packed row by row, most significant bit first. Written with numpy (two 32x32
matrix products) so that fastlaion does not need imagehash and scipy at run time.

`greedy_duplicates` walks hashes in dataset order and marks a row a duplicate of the earliest
earlier *kept* row within the distance; the pair search is exact (pigeonhole: split 64 bits into
max_bits + 1 chunks; two hashes within max_bits agree on at least one chunk), so only hashes
sharing a chunk are compared.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

HASH_SIZE = 8
_SIDE = HASH_SIZE * 4
# DCT-II basis (the scale does not matter: bits compare coefficients with their median).
_N = np.arange(_SIDE)
_DCT = np.cos(np.pi * np.outer(_N, 2 * _N + 1) / (2 * _SIDE))
MAX_BITS = 12  # beyond this, nearly every pair shares a chunk and the search goes quadratic


def phash64(image: Image.Image) -> int:
    """The 64-bit pHash of a PIL image, as an int in [0, 2**64)."""
    grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_bytes(data: bytes) -> int:
    """pHash of an encoded image (JPEG, PNG, WebP...); raises OSError/ValueError if undecodable."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return phash64(img)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    b = x.astype(np.uint64).view(np.uint8).reshape(-1, 8)
    return np.unpackbits(b, axis=1).sum(axis=1).astype(np.int64)


def _chunks(max_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of max_bits + 1 near-equal chunks covering 64 bits."""
    n = max_bits + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def candidate_pairs(hashes: np.ndarray, max_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (a, b), a < b, of distinct positions whose hashes differ in at most max_bits.

    hashes: (n,) uint64. Returns two int64 arrays, sorted by (b, a), without repeats.
    """
    n = hashes.size
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    for shift, width in _chunks(max_bits):
        part = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(part, kind="stable")
        sp = part[order]
        starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
        lengths = np.diff(np.r_[starts, n])
        # runs of two: vectorised; longer runs: all their pairs, one run at a time
        two = starts[lengths == 2]
        a, b = order[two], order[two + 1]
        found_a.append(a)
        found_b.append(b)
        for s, m in zip(starts[lengths > 2], lengths[lengths > 2]):
            i, j = np.triu_indices(int(m), 1)
            idx = order[s:s + m]
            found_a.append(idx[i])
            found_b.append(idx[j])
    if not found_a:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    a = np.concatenate(found_a).astype(np.int64)
    b = np.concatenate(found_b).astype(np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    close = popcount64(hashes[lo] ^ hashes[hi]) <= max_bits
    pair = np.unique(hi[close] * n + lo[close])  # sorted by (b, a)
    return pair % n, pair // n


def greedy_duplicates(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """For hashes in dataset order: the index of the earliest earlier kept row within max_bits
    (that row is the duplicate's original), or -1 for rows that are kept.

    Deterministic: rows are visited in order, and a row is kept only if no kept row before it
    is close enough, so the result does not depend on how the search found the pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = hashes.size
    rep = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return rep
    # Identical hashes first: only the first of each value takes part in the near search.
    values, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    by_first = np.argsort(first, kind="stable")      # unique values in order of first appearance
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    uniq = values[by_first]
    uniq_rep = np.full(uniq.size, -1, dtype=np.int64)  # in unique-rank space
    if max_bits > 0 and uniq.size > 1:
        a, b = candidate_pairs(uniq, max_bits)
        kept = np.ones(uniq.size, dtype=bool)
        # pairs come sorted by (b, a): the first kept a for each b is the earliest kept original
        last_b = -1
        for ai, bi in zip(a.tolist(), b.tolist()):
            if bi == last_b or not kept[ai]:
                continue
            kept[bi] = False
            uniq_rep[bi] = ai
            last_b = bi
    # Back to rows: a unique value's first row is the original of its later copies, unless that
    # first row is itself a near duplicate, in which case all of them share its original.
    first_row_of_rank = first[by_first]
    row_rank = rank[inverse]
    is_first = first_row_of_rank[row_rank] == np.arange(n)
    has_near = uniq_rep[row_rank] >= 0
    near_original = first_row_of_rank[np.maximum(uniq_rep[row_rank], 0)]
    rep = np.where(has_near, near_original, np.where(is_first, -1, first_row_of_rank[row_rank]))
    return rep.astype(np.int64)
