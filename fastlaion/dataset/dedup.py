"""Dedup a dataset: exact (url, url+caption, image sha256), perceptual (pHash) or semantic (CLIP
image embeddings). Rows are never deleted: a duplicate becomes status=dropped, stage=dedup,
reason=duplicate_<by>, and `duplicate_of` names the key of the sample it repeats.

Which one stays: among kept samples, the first in dataset order (run shards in order, rows in
order: the lowest key). For near duplicates the walk is greedy in that order: a sample is a
duplicate of the earliest *kept* sample close enough to it, so a kept sample never points at a
dropped one and the result does not depend on how candidates were found.

Semantic dedup is exact all-pairs in blocks (n^2/2 dot products with fastlaion.ops.cosine_matrix,
on CUDA when there is one): the greedy rule needs *the earliest kept* row above the threshold,
which a top-k search (topk_cosine keeps at most 16) cannot promise once more than k rows pass.
Practical up to about a million samples on a CPU; beyond that, cluster first (SemDeDup-style),
not done here.

Exact dedup is lazy Polars end to end: a 128-bit key (two 64-bit hashes of the values) per kept
row, a group-by for each key's first row, then one streaming pass that writes every row with its
new status; memory is ~24 bytes per kept row at most, not the strings. A false match needs both
64-bit hashes to collide for two different values (odds ~ n^2 / 2^129).
"""

from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from ..config import ConfigError, at_least
from .output import OutputDir
from .samples import read_images
from .source import (
    DROPPED,
    KEPT,
    METADATA_FILE,
    Dataset,
    DatasetError,
    NoProgress,
    Progress,
    collect,
    sink_parquet,
)

log = logging.getLogger(__name__)

STAGE = "dedup"


class DedupBy(str, enum.Enum):
    url = "url"
    url_caption = "url+caption"
    sha256 = "sha256"
    phash = "phash"
    embedding = "embedding"

    @property
    def reason(self) -> str:
        return "duplicate_" + self.value.replace("+", "_")


EXACT_COLUMNS: dict[DedupBy, tuple[str, ...]] = {
    DedupBy.url: ("url",), DedupBy.url_caption: ("url", "caption"), DedupBy.sha256: ("sha256",),
}


@dataclass(frozen=True)
class DedupConfig:
    by: DedupBy = DedupBy.url_caption
    max_hamming_bits: int = 4   # phash: at most this many of the 64 bits may differ
    min_cosine: float = 0.95    # embedding: image embeddings at least this similar are duplicates
    device: str = "auto"        # embedding: where the cosine blocks run (auto: CUDA if present)
    block_rows: int = 2048      # embedding: query rows per matrix product
    threads: int = 0            # phash: decode threads; 0 = one per core

    def validate(self) -> None:
        from .phash import MAX_BITS

        if not 0 <= self.max_hamming_bits <= MAX_BITS:
            raise ConfigError(f"--max-hamming must be between 0 and {MAX_BITS} bits, got {self.max_hamming_bits}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"--min-cosine must be between -1 and 1, got {self.min_cosine}")
        at_least("--threads", self.threads, 0)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class DedupResult:
    by: str
    output: str
    rows: int                 # every row written (kept or dropped, before and after)
    candidates: int           # kept samples that took part
    duplicates: int           # of them, now dropped as duplicates
    kept: int                 # kept samples after dedup
    skipped_files: list[dict[str, str]]
    unreadable_samples: int = 0   # phash: missing or undecodable images; embedding: no embedding
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def dedup(ds: Dataset, out: Path, cfg: DedupConfig, progress: Progress | None = None) -> DedupResult:
    """Write `out/metadata.parquet` (every row of `ds`, duplicates marked) and `out/dataset.json`."""
    cfg.validate()
    progress = progress or NoProgress()
    started = time.perf_counter()
    ds.require(EXACT_COLUMNS.get(cfg.by, ("key",)), f"dedup --by {cfg.by.value}")
    target = OutputDir(out, ds)

    def job(d: Dataset) -> DedupResult:
        if cfg.by in EXACT_COLUMNS:
            dups, candidates, unreadable = _exact(d, EXACT_COLUMNS[cfg.by]), _count_kept(d), 0
        elif cfg.by is DedupBy.phash:
            dups, candidates, unreadable = _perceptual(d, cfg, progress)
        else:
            dups, candidates, unreadable = _semantic(d, cfg, progress)
        _write(d, dups, cfg.by, target.path(METADATA_FILE))
        settings = ({"max_hamming_bits": cfg.max_hamming_bits} if cfg.by is DedupBy.phash else
                    {"min_cosine": cfg.min_cosine} if cfg.by is DedupBy.embedding else {})
        return DedupResult(by=cfg.by.value, output=str(out), rows=d.rows, candidates=candidates,
                           duplicates=dups.height, kept=candidates - dups.height,
                           skipped_files=[vars(s) for s in d.skipped], unreadable_samples=unreadable,
                           settings=settings)

    with target.building():
        result = ds.guarded(job)
        target.finish("dedup", result, started)
    return result


def _kept(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.filter(pl.col("status") == KEPT)


def _count_kept(ds: Dataset) -> int:
    return int(collect(_kept(ds.scan()).select(pl.len())).item())


def _exact(ds: Dataset, columns: tuple[str, ...]) -> pl.DataFrame:
    """(_i, duplicate_of) of every kept row whose values repeat an earlier kept row's."""
    lf = ds.scan().with_row_index("_i")
    values = pl.struct(list(columns))
    cand = (_kept(lf).filter(pl.all_horizontal([pl.col(c).is_not_null() for c in columns if c != "caption"]))
            .select("_i", values.hash(0).alias("_h1"), values.hash(1).alias("_h2")))
    firsts = (cand.group_by("_h1", "_h2").agg(pl.col("_i").min().alias("_first"), pl.len().alias("_n"))
              .filter(pl.col("_n") > 1).select("_h1", "_h2", "_first"))
    pairs = collect(cand.join(firsts, on=["_h1", "_h2"]).filter(pl.col("_i") != pl.col("_first"))
                    .select("_i", "_first"))
    return _with_keys(lf, pairs)


def _with_keys(lf: pl.LazyFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """pairs (_i, _first) -> (_i, duplicate_of = the key of row _first), sorted by _i."""
    if pairs.height == 0:
        return pl.DataFrame({"_i": pl.Series([], dtype=pairs.schema["_i"] if "_i" in pairs.schema else pl.UInt32),
                             "duplicate_of": pl.Series([], dtype=pl.String)})
    index_type = lf.collect_schema()["_i"]
    pairs = pairs.with_columns(pl.col("_i").cast(index_type), pl.col("_first").cast(index_type))
    firsts = pairs.select(pl.col("_first").unique().alias("_i")).lazy()
    keys = collect(lf.join(firsts, on="_i", how="semi").select(pl.col("_i").alias("_first"), "key"))
    return (pairs.join(keys, on="_first", how="left").select("_i", pl.col("key").alias("duplicate_of"))
            .sort("_i"))


def _write(ds: Dataset, dups: pl.DataFrame, by: DedupBy, path: Path) -> None:
    """Every row, in order, duplicates marked; an earlier dedup's duplicate_of is kept."""
    lf = ds.scan().with_row_index("_i")
    has_prior = "duplicate_of" in lf.collect_schema().names()
    marks = dups.lazy().with_columns(pl.col("_i").cast(lf.collect_schema()["_i"]))
    joined = lf.join(marks.rename({"duplicate_of": "_dup"}), on="_i", how="left", maintain_order="left")
    is_dup = pl.col("_dup").is_not_null()
    prior = pl.col("duplicate_of") if has_prior else pl.lit(None, dtype=pl.String)
    out = joined.with_columns(
        pl.when(is_dup).then(pl.lit(DROPPED)).otherwise(pl.col("status")).alias("status"),
        pl.when(is_dup).then(pl.lit(STAGE)).otherwise(pl.col("stage")).alias("stage"),
        pl.when(is_dup).then(pl.lit(by.reason)).otherwise(pl.col("reason")).alias("reason"),
        pl.coalesce(pl.col("_dup"), prior).alias("duplicate_of"),
    ).drop("_i", "_dup")
    sink_parquet(out, path)


# --- perceptual ---------------------------------------------------------------------------------

def _candidates(ds: Dataset) -> pl.DataFrame:
    """Kept rows in dataset order: _i, key, shard."""
    return collect(_kept(ds.scan().with_row_index("_i")).select("_i", "key", "shard"))


def _perceptual(ds: Dataset, cfg: DedupConfig, progress: Progress) -> tuple[pl.DataFrame, int, int]:
    from .phash import greedy_duplicates, phash_bytes

    cand = _candidates(ds)
    hashes = np.zeros(cand.height, dtype=np.uint64)
    ok = np.zeros(cand.height, dtype=bool)

    def on_image(i: int, data: bytes) -> None:
        try:
            h = phash_bytes(data)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("phash: cannot decode %s (%s); left as it was", cand["key"][i], e)
            return
        hashes[i] = np.uint64(h)
        ok[i] = True

    read_images(ds, cand, on_image, progress, "phash", threads=cfg.threads or (os.cpu_count() or 1))
    unreadable = int((~ok).sum())
    if unreadable:
        log.warning("phash: %d of %d kept samples have no readable image; they take no part", unreadable, cand.height)
    idx = np.flatnonzero(ok)
    rep = greedy_duplicates(hashes[idx], cfg.max_hamming_bits)
    dup = rep >= 0
    rows = cand["_i"].to_numpy()
    pairs = pl.DataFrame({"_i": rows[idx[dup]], "_first": rows[idx[rep[dup]]]})
    return _with_keys(ds.scan().with_row_index("_i"), pairs), cand.height, unreadable


# --- semantic -----------------------------------------------------------------------------------

def _semantic(ds: Dataset, cfg: DedupConfig, progress: Progress) -> tuple[pl.DataFrame, int, int]:
    import torch

    cand = _candidates(ds)
    emb, ok = _load_embeddings(ds, cand, progress)
    unreadable = int((~ok).sum())
    if unreadable:
        log.warning("embedding: %d of %d kept samples have no image embedding; they take no part",
                    unreadable, cand.height)
    device = _device(cfg.device)
    idx = np.flatnonzero(ok)
    rep = greedy_cosine(torch.from_numpy(emb[idx]), cfg.min_cosine, cfg.block_rows, device, progress)
    dup = rep >= 0
    rows = cand["_i"].to_numpy()
    pairs = pl.DataFrame({"_i": rows[idx[dup]], "_first": rows[idx[rep[dup]]]})
    return _with_keys(ds.scan().with_row_index("_i"), pairs), cand.height, unreadable


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here")
    log.info("embedding dedup on %s", name)
    return torch.device(name)


def _load_embeddings(ds: Dataset, cand: pl.DataFrame, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) float16 image embeddings of the candidate rows, and which ones exist (finite)."""
    if cand.height == 0:
        return np.zeros((0, 1), np.float16), np.zeros(0, bool)
    per_shard = (cand.with_row_index("_pos")
                 .with_columns(pl.col("key").str.slice(pl.col("shard").str.len_chars()).cast(pl.Int64, strict=False)
                               .alias("_row"))
                 .group_by("shard", maintain_order=True).agg("_pos", "_row"))
    shards = per_shard["shard"].to_list()
    if not any(ds.embeddings_path(s).exists() for s in shards):
        raise DatasetError(f"dedup --by embedding needs image embeddings ({shards[0]}_img_emb.npy and the like) in "
                           f"{ds.root}: run with CLIP scoring on (without --no-score)")
    emb: np.ndarray | None = None
    ok = np.zeros(cand.height, dtype=bool)
    progress.start("embeddings", len(shards))
    for shard, pos, row in per_shard.iter_rows():
        path = ds.embeddings_path(shard)
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            log.warning("embedding: cannot read %s (%s); its %d samples take no part", path, e, len(pos))
            progress.advance()
            continue
        if emb is None:
            emb = np.zeros((cand.height, arr.shape[1]), dtype=np.float16)
        pos_a = np.asarray(pos, dtype=np.int64)
        row_a = np.asarray([-1 if r is None else r for r in row], dtype=np.int64)
        valid = (row_a >= 0) & (row_a < arr.shape[0])
        vec = np.asarray(arr[row_a[valid]], dtype=np.float16)
        finite = np.isfinite(vec).all(axis=1)
        emb[pos_a[valid][finite]] = vec[finite]
        ok[pos_a[valid][finite]] = True
        progress.advance()
    progress.stop()
    return (emb if emb is not None else np.zeros((cand.height, 1), np.float16)), ok


def greedy_cosine(emb: Any, min_cosine: float, block_rows: int, device: Any,
                  progress: Progress | None = None) -> np.ndarray:
    """For embeddings in dataset order, (n, D) any float dtype: the index of the earliest earlier
    kept row whose cosine with it is >= min_cosine, or -1 for rows that are kept.

    Exact all-pairs in blocks (n^2 / 2 dot products, fastlaion.ops.cosine_matrix on `device`):
    each block of rows is compared with every kept row before it, then greedily within itself.
    Memory: the kept rows (n x D float32 on `device`) plus one block x chunk similarity matrix.
    """
    import torch

    from ..ops import cosine_matrix

    progress = progress or NoProgress()
    n = emb.shape[0]
    rep = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return rep
    dim = emb.shape[1]
    kept_vecs = torch.empty((n, dim), dtype=torch.float32, device=device)
    kept_rows = np.empty(n, dtype=np.int64)
    n_kept = 0
    chunk = max(1, (1 << 24) // block_rows)   # bounds the similarity block at 64 MiB of float32
    progress.start("cosine blocks", (n + block_rows - 1) // block_rows)
    for start in range(0, n, block_rows):
        q = emb[start:start + block_rows].to(device=device, dtype=torch.float32)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-8)
        b = q.shape[0]
        hit = torch.full((b,), -1, dtype=torch.int64, device=device)
        for k0 in range(0, n_kept, chunk):
            sim = cosine_matrix(q, kept_vecs[k0:min(n_kept, k0 + chunk)])
            close = sim >= min_cosine
            first = close.to(torch.uint8).argmax(dim=1)  # first True per row (argmax returns the first max)
            new = close.any(dim=1) & (hit < 0)
            hit = torch.where(new, first + k0, hit)
        hit_np = hit.cpu().numpy()
        inner = (cosine_matrix(q, q) >= min_cosine).cpu().numpy()
        block_kept = np.zeros(b, dtype=bool)
        for i in range(b):
            if hit_np[i] >= 0:
                rep[start + i] = kept_rows[hit_np[i]]
                continue
            earlier = np.flatnonzero(inner[i, :i] & block_kept[:i])
            if earlier.size:
                rep[start + i] = start + earlier[0]
            else:
                block_kept[i] = True
        new_rows = np.flatnonzero(block_kept)
        kept_vecs[n_kept:n_kept + new_rows.size] = q[torch.as_tensor(new_rows, device=device)]
        kept_rows[n_kept:n_kept + new_rows.size] = start + new_rows
        n_kept += new_rows.size
        progress.advance()
    progress.stop()
    return rep
