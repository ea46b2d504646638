"""Dedup a dataset: exact (url, url+caption, image sha256, LAION's hash), perceptual (pHash) or semantic (CLIP
image embeddings). Rows are never deleted: a duplicate becomes status=dropped, stage=dedup,
reason=duplicate_<by>, and `duplicate_of` names the key of the sample it repeats. URLs are
compared as extraction writes a kept URL (`_url_key`: extract.fold_case: scheme and host in lower
case, an IDN host in punycode, no default port), so `HTTP://A.com:80/x.jpg` repeats
`http://a.com/x.jpg`; the url column is not changed. `hash` is LAION's own key (the hash column,
mmh3 of url + caption as written, writer.laion_hash): no case folding, and `ab`+`c` repeats
`a`+`bc`, as in LAION's dedup; 64 bits, so two different pairs collide with odds ~ n^2 / 2^65.

Which one stays: among kept samples, the first in dataset order (run shards in order, rows in
order: the lowest key). For near duplicates the walk is greedy in that order: a sample is a
duplicate of the earliest *kept* sample close enough to it, so a kept sample never points at a
dropped one and the result does not depend on how candidates were found.

Semantic dedup (semantic.py) applies that rule to every pair (`--method exact`, n^2/2 dot
products: the greedy rule needs *the earliest kept* row above the threshold, which a top-k search
cannot promise once more than k rows pass) or, past EXACT_MAX_ROWS, inside k-means clusters only
(`--method clusters`, SemDeDup-style: a million samples in about a minute and a half on two
cores, bounded memory, may miss a pair split across two clusters, never drops a sample without a
kept one that close).

Exact dedup is lazy Polars end to end: a 128-bit key (two 64-bit hashes of the values) per kept
row, a group-by for each key's first row, then one streaming pass that writes every row with its
new status; memory is ~24 bytes per kept row at most, not the strings. A false match needs both
64-bit hashes to collide for two different values (odds ~ n^2 / 2^129).
"""

from __future__ import annotations

import enum
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..config import MAX_THREADS, ConfigError, at_least, between, torch_device, usable_cores
from .output import OutputDir
from .samples import read_images
from .source import (
    DROPPED,
    KEPT,
    METADATA_FILE,
    Dataset,
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
    hash = "hash"  # LAION's key: mmh3.hash64(url + caption)[0], the run's hash column
    phash = "phash"
    embedding = "embedding"

    @property
    def reason(self) -> str:
        return "duplicate_" + self.value.replace("+", "_")


EXACT_COLUMNS: dict[DedupBy, tuple[str, ...]] = {
    DedupBy.url: ("url",), DedupBy.url_caption: ("url", "caption"), DedupBy.sha256: ("sha256",),
    DedupBy.hash: ("hash",),
}


METHODS = ("auto", "exact", "clusters")

# The options that one --by reads and the others ignore: (flag, DedupConfig field, that --by).
_ONE_BY_ONLY = (("--method", "method", DedupBy.embedding), ("--clusters", "clusters", DedupBy.embedding),
                ("--min-cosine", "min_cosine", DedupBy.embedding), ("--device", "device", DedupBy.embedding),
                ("--max-hamming", "max_hamming_bits", DedupBy.phash), ("--threads", "threads", DedupBy.phash))


@dataclass(frozen=True)
class DedupConfig:
    by: DedupBy = DedupBy.url_caption
    max_hamming_bits: int = 4   # phash: at most this many of the 64 bits may differ
    min_cosine: float = 0.95    # embedding: image embeddings at least this similar are duplicates
    device: str = "auto"        # embedding: where the cosine blocks run (auto: CUDA if present)
    block_rows: int = 2048      # embedding: query rows per matrix product
    method: str = "auto"        # embedding: exact (all pairs), clusters (within k-means clusters), auto
    clusters: int = 0           # embedding, clusters: how many; 0 = about sqrt(2 x samples)
    bucket_bytes: int = 1 << 28  # embedding, clusters: spilled embeddings held in memory at once (256 MiB)
    threads: int = 0            # phash: decode threads; 0 = one per core

    def validate(self) -> None:
        from .phash import MAX_BITS

        if not 0 <= self.max_hamming_bits <= MAX_BITS:
            raise ConfigError(f"--max-hamming must be between 0 and {MAX_BITS} bits, got {self.max_hamming_bits}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"--min-cosine must be between -1 and 1, got {self.min_cosine}")
        between("--threads", self.threads, 0, MAX_THREADS)
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        at_least("--clusters", self.clusters, 0)
        at_least("bucket_bytes", self.bucket_bytes, 1 << 20)
        torch_device("--device", self.device)
        default = DedupConfig()
        for flag, name, by in _ONE_BY_ONLY:  # read by one --by only: refused with another, not ignored
            if self.by is not by and getattr(self, name) != getattr(default, name):
                raise ConfigError(f"{flag} applies to --by {by.value} only, not --by {self.by.value}")
        if self.method == "exact" and self.clusters != default.clusters:  # was ignored
            raise ConfigError("--clusters applies to --method clusters (or auto) only, not --method exact")


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
    # phash, embedding: the run's files they read (tars, image embeddings) not as the run wrote
    # them ({shard, problem}), read as missing ones (Dataset.damage)
    damaged_files: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def dedup(ds: Dataset, out: Path, cfg: DedupConfig, progress: Progress | None = None,
          written: Callable[[Path], None] | None = None) -> DedupResult:
    """Write `out/metadata.parquet` (every row of `ds`, duplicates marked) and `out/dataset.json`;
    `written(out)` is called once they are whole in place (OutputDir)."""
    cfg.validate()
    progress = progress or NoProgress()
    started = time.perf_counter()
    ds.require(("key", "status", "stage", "reason", *EXACT_COLUMNS.get(cfg.by, ())), f"dedup --by {cfg.by.value}")
    if cfg.by not in EXACT_COLUMNS:  # reads the images or the embeddings
        ds.need_root(f"dedup --by {cfg.by.value}")
    target = OutputDir(out, ds, written, "dedup")

    def job(d: Dataset) -> DedupResult:
        settings: dict[str, Any] = {}
        damaged = [] if cfg.by in EXACT_COLUMNS else d.damage(files=(".tar",) if cfg.by is DedupBy.phash
                                                              else ("_img_emb.npy",))
        d = d.with_damage(damaged)
        if cfg.by in EXACT_COLUMNS:
            dups, candidates, unreadable = _exact(d, EXACT_COLUMNS[cfg.by]), _count_kept(d), 0
        elif cfg.by is DedupBy.phash:
            dups, candidates, unreadable = _perceptual(d, cfg, progress)
            settings = {"max_hamming_bits": cfg.max_hamming_bits}
        else:
            dups, candidates, unreadable, settings = _semantic(d, cfg, progress, target.path(".spill"))
        _write(d, dups, cfg.by, target.path(METADATA_FILE))
        return DedupResult(by=cfg.by.value, output=str(out), rows=d.rows, candidates=candidates,
                           duplicates=dups.height, kept=candidates - dups.height,
                           skipped_files=[vars(s) for s in d.skipped], unreadable_samples=unreadable,
                           settings=settings, damaged_files=[{"shard": x.shard, "problem": x.problem}
                                                             for x in damaged])

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
    values = pl.struct([_url_key() if c == "url" else pl.col(c) for c in columns])
    cand = (_kept(lf).filter(pl.all_horizontal([pl.col(c).is_not_null() for c in columns if c != "caption"]))
            .select("_i", values.hash(0).alias("_h1"), values.hash(1).alias("_h2")))
    firsts = (cand.group_by("_h1", "_h2").agg(pl.col("_i").min().alias("_first"), pl.len().alias("_n"))
              .filter(pl.col("_n") > 1).select("_h1", "_h2", "_first"))
    pairs = collect(cand.join(firsts, on=["_h1", "_h2"]).filter(pl.col("_i") != pl.col("_first"))
                    .select("_i", "_first"))
    return _with_keys(lf, pairs)


def _url_key() -> pl.Expr:
    """The url column as dedup compares it: scheme and host in lower case, an IDN host in
    punycode, no default port (extract.fold_case, as extraction writes a kept URL), so
    `HTTP://A.com:80/x.jpg` repeats `http://a.com/x.jpg`; the path keeps its case. Polars, batch
    by batch, but for the few URLs with a capital, a non-ASCII character or a port before their
    path, folded in Python by fold_case itself (extract_vec.fold_case_urls)."""
    from ..extract_vec import fold_case_urls

    return pl.col("url").map_batches(fold_case_urls, return_dtype=pl.String, is_elementwise=True).alias("url")


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
    """Kept rows in dataset order: _i, key, shard (and shard_row, where the dataset has it)."""
    return collect(_kept(ds.scan().with_row_index("_i")).select("_i", *ds.sample_columns()))


def _perceptual(ds: Dataset, cfg: DedupConfig, progress: Progress) -> tuple[pl.DataFrame, int, int]:
    from PIL import Image  # here: the other commands that import this module need no Pillow

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

    read_images(ds, cand, on_image, progress, "phash", threads=cfg.threads or usable_cores())
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

def _semantic(ds: Dataset, cfg: DedupConfig, progress: Progress,
              spill_dir: Path) -> tuple[pl.DataFrame, int, int, dict[str, Any]]:
    from .semantic import EXACT_MAX_ROWS, EmbeddingReader, clustered_duplicates, exact_duplicates

    cand = _candidates(ds)
    reader = EmbeddingReader(ds, cand)
    device = _device(cfg.device)
    method = cfg.method
    if method == "auto":
        most = EXACT_MAX_ROWS.get(device.type, EXACT_MAX_ROWS["cpu"])
        method = "exact" if cand.height <= most else "clusters"
        if method == "exact" and cfg.clusters != DedupConfig.clusters:  # asked for, and silently not used
            log.warning("--clusters %d is not used: --method auto compared every pair of the %s samples exactly "
                        "(it clusters past %s on %s); --method clusters uses it", cfg.clusters, f"{cand.height:,}",
                        f"{most:,}", device.type)
    settings: dict[str, Any] = {"min_cosine": cfg.min_cosine, "method": method}
    if method == "exact":
        dup, first = exact_duplicates(reader, cfg.min_cosine, cfg.block_rows, device, progress)
    else:
        try:
            dup, first, report = clustered_duplicates(
                reader, cfg.min_cosine, cfg.block_rows, device, cfg.clusters, cfg.bucket_bytes, spill_dir, progress)
        finally:
            shutil.rmtree(spill_dir, ignore_errors=True)
        settings.update(clusters=report.clusters, largest_cluster=report.largest, probe_samples=report.probes,
                        probe_pairs=report.pairs, probe_pairs_split=report.split_pairs)
    if reader.unreadable:
        log.warning("embedding: %d of %d kept samples have no image embedding; they take no part",
                    reader.unreadable, cand.height)
    rows = cand["_i"].to_numpy()
    pairs = pl.DataFrame({"_i": rows[dup], "_first": rows[first]})
    return _with_keys(ds.scan().with_row_index("_i"), pairs), cand.height, reader.unreadable, settings


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here")
    log.info("embedding dedup on %s", name)
    return torch.device(name)
