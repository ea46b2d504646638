"""A kNN index of a dataset's image embeddings, for `fastlaion search` on datasets where reading
every embedding per query (the exact search) takes too long: `fastlaion index OUT` builds it once,
and search uses it while it matches the dataset.

The index is faiss's inverted file (IVF): spherical k-means cells over the unit embeddings (inner
product = cosine), each sample in the cell of its nearest centroid, stored as float16 (the run's
own precision, so the distances within a probed cell are exact). A query reads the `nprobe` cells
whose centroids are nearest to it: with every cell probed the answer is the exact search's, with
fewer it may miss a sample that sits in another cell (bench/search.py measures the recall). faiss
is the well-kept library for this (clip-retrieval and autofaiss build on it); the cells, the
scan and the file format are not code to write again.

For datasets whose float16 vectors do not fit in memory (1 KB a sample at 512 dimensions: a TB
for a billion), `--pq M` product-quantizes them instead, M bytes a sample (faiss's IVFPQ, the
codes of each sample's offset from its cell's centroid). Its distances are approximate, so search
takes the RERANK times k best by the codes and ranks those again by their stored embeddings
(`rerank`): the cosines it reports are the exact search's, and what it can miss is what the cells
not read and the codes' error keep out of those candidates.

Files, in the dataset folder's `index/`: `image.faiss` (faiss's own format) and `index.json`,
which records what the index was built from (every metadata and embedding file's name, size and
modification time), the shards it holds, in order, and what image.faiss must be to be the index it
describes (its samples, cells, dimensions, bytes a code and a digest of its centroids: search
reads the two files one after the other, and an index rebuilt in between, or the files of two
builds copied together, is not searched as the other). A sample's id is where its embedding is:
its shard's number in that list times 2^32 plus its row in the shard's embedding file. So a search
through the index reads only the index, the embeddings of its candidates (--pq) and the metadata
of the shards its hits are in: nothing that grows with the dataset but the index itself. Search
compares the files with the dataset as it is and falls back to the exact search, saying so, when
one changed since.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..config import MAX_THREADS, ConfigError
from .output import Staging
from .semantic import embedding_rows, finite_rows, float32_rows, row_in_shard
from .source import METADATA_FILE, Dataset, DatasetError, NoProgress, Progress

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FILE = "image.faiss"
META_FILE = "index.json"
KIND = "ivf-flat-fp16-v2"
KIND_PQ = "ivf-pq-v2"
OLD_KINDS = ("ivf-flat-fp16",)  # ids were positions among the kept samples (session 10): rebuilt
ROW_BITS = 32  # id = shard number << ROW_BITS | row
PQ_TRAIN_MIN = 39 * 256  # training samples the codebooks need: 256 codes a part, 39 samples a code (faiss's floor)
# With --pq, search ranks again the best RERANK x k candidates, RERANK_MIN at least, by their stored
# embeddings. bench/search.py's 1M samples, 64-byte codes, 10 queries: of the exact top 10, the
# codes' best 100 hold 91%, their best 300 99%, 1,000 all; the whole search took 1.9-2.0 s with
# 100, 300 or 1,000 ranked again (page cache warm: reading the candidates costs little).
RERANK = 50
RERANK_MIN = 1000
RERANK_BYTES = 256 * 2**20  # the candidates' embeddings held at once: queries ranked again in groups
TRAIN_PER_CELL = 64  # training samples per cell (faiss warns under 39)
MAX_TRAIN = 1_000_000  # k-means on at most this many samples, evenly spaced
DEFAULT_PROBE_SHARE = 16  # default nprobe: a sixteenth of the cells (bench/search.py: the recall)


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("the kNN index needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def default_cells(n: int) -> int:
    """4 sqrt(n) cells (faiss's guideline for IVF), never fewer training samples a cell than
    TRAIN_PER_CELL, of the n given or of the MAX_TRAIN it trains on; 1 cell (a flat scan) for
    small datasets."""
    return max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_CELL, MAX_TRAIN // TRAIN_PER_CELL))


def default_probes(cells: int) -> int:
    return max(1, min(cells, math.ceil(cells / DEFAULT_PROBE_SHARE)))


def index_dir(ds: Dataset) -> Path:
    """`index/` in the dataset's folder (a run, subset or dedup folder, also when it is opened by
    its metadata.parquet); beside any other lone Parquet file, `<its name>.index/`."""
    if ds.path.is_dir():
        return ds.path / INDEX_DIR
    if ds.path.name == METADATA_FILE:
        return ds.path.parent / INDEX_DIR
    return ds.path.with_name(ds.path.name + ".index")


def fingerprint(ds: Dataset, shards: list[str]) -> list[list[Any]]:
    """(path, size, mtime_ns) of every metadata file and every embedding file the index reads,
    the paths relative to the index's folder, so that a dataset moved or copied whole (cp -p,
    rsync -t) keeps its index."""
    base = index_dir(ds).parent
    out = []
    for p in list(ds.files) + [ds.embeddings_path(s) for s in shards]:
        name = os.path.relpath(p, base)
        try:
            st = p.stat()
            out.append([name, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([name, None, None])
    return out


@dataclass(frozen=True)
class IndexConfig:
    cells: int = 0  # 0: default_cells(samples)
    threads: int = 0  # faiss's threads; 0: its default (every core)
    pq: int = 0  # bytes a sample of product-quantized codes; 0: float16 vectors

    def validate(self) -> None:
        if self.cells < 0:
            raise ConfigError(f"--cells must be 0 (automatic) or more, got {self.cells}")
        if not 0 <= self.threads <= MAX_THREADS:  # OpenMP's int: 10^12 was an OverflowError traceback
            raise ConfigError(f"--threads must be between 0 (every core) and {MAX_THREADS}, got {self.threads}")
        if self.pq < 0:
            raise ConfigError(f"--pq must be 0 (float16 vectors) or a number of bytes a sample, got {self.pq}")

    def check_pq(self, dim: int, samples: int) -> None:
        """--pq against the embeddings: M parts of dim / M dimensions each, codebooks to learn."""
        if not self.pq:
            return
        if self.pq > dim or dim % self.pq:
            fits = [m for m in (8, 16, 32, 48, 64, 96, 128, 256) if m <= dim and dim % m == 0]
            raise ConfigError(f"--pq {self.pq}: the embeddings' {dim} dimensions do not split into {self.pq} equal "
                              f"parts; use one of {', '.join(map(str, fits)) or 'the divisors of ' + str(dim)}")
        if samples < PQ_TRAIN_MIN:
            raise ConfigError(f"--pq needs {PQ_TRAIN_MIN:,} or more samples with embeddings to learn its codes, this "
                              f"dataset has {samples:,}: leave --pq out (float16 vectors, {2 * dim} bytes a sample)")


@dataclass
class IndexResult:
    path: str
    samples: int
    unreadable_samples: int
    cells: int
    dim: int
    seconds: float
    bytes: int
    pq: int = 0


def build_index(ds: Dataset, cfg: IndexConfig, progress: Progress | None = None,
                written: Callable[[Path], None] | None = None) -> IndexResult:
    """Train the cells on an even sample of the kept samples' embeddings, add every one shard
    by shard (one shard's vectors in memory besides the index), and write the index atomically.
    `written(folder)` is called once the new index is whole in place (a Ctrl-C from then on
    leaves it so), before a Ctrl-C that came while it was put there lands."""
    from .search import kept_reader, nothing_kept

    cfg.validate()
    progress = progress or NoProgress()
    faiss = import_faiss()
    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    ds.require(("key", "status"), "index")
    ds.need_root("index")
    reader = kept_reader(ds, "index")
    if reader is None:
        raise DatasetError(nothing_kept(ds, "index"))
    n, dim = reader.rows, reader.dim
    if not dim:
        raise DatasetError(f"none of {ds.path}'s embedding files can be read: nothing to index")
    if cfg.cells > n:
        raise ConfigError(f"--cells {cfg.cells}: more than the {n:,} kept samples")
    cfg.check_pq(dim, n)
    shards = [s for s, _, _ in reader.per_shard]
    if len(shards) >= 2 ** (63 - ROW_BITS):
        raise DatasetError(f"{ds.path} has {len(shards):,} shards: the index holds at most {2 ** (63 - ROW_BITS):,}")
    before = fingerprint(ds, shards)  # the files as they are when the build starts reading them
    cells = cfg.cells or default_cells(n)
    train_n = min(n, MAX_TRAIN, max(cells * TRAIN_PER_CELL, 10_000, PQ_TRAIN_MIN if cfg.pq else 0))
    sample = np.zeros(n, bool)
    sample[np.linspace(0, n - 1, train_n).round().astype(np.int64)] = True
    train = [v for _, v in reader.shards(progress, "index: training sample", only=sample)]
    if not train:
        raise DatasetError(f"none of {ds.path}'s embedding files can be read: nothing to index")
    x = _unit32(np.concatenate(train))
    if len(x) < cells:  # many embeddings unreadable: the readable ones decide
        if cfg.cells:
            raise ConfigError(f"--cells {cells}: more than the {len(x):,} readable embeddings of the training "
                              "sample")
        cells = max(1, min(default_cells(len(x) * n // train_n), len(x) // TRAIN_PER_CELL))
    cfg.check_pq(dim, len(x))  # the codebooks learn from the readable embeddings of the sample
    quantizer = faiss.IndexFlatIP(dim)
    if cfg.pq:
        index = faiss.IndexIVFPQ(quantizer, dim, cells, cfg.pq, 8, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = 0
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, cells, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # unit centroids: cells by cosine
    index.cp.seed = 0
    # faiss prints a raw warning under 39 training samples a cell: the default sizing gives 64 or
    # more, a small dataset one cell (a flat scan, nothing to learn), --cells what was asked for
    index.cp.min_points_per_centroid = 1
    progress.start("index: training the cells (k-means)" + (" and the codes" if cfg.pq else ""), 1)
    try:
        index.train(x)
        progress.advance()
    finally:
        progress.stop()
    del x, train
    for shard, rows, vec in reader.shard_rows(progress, "index: adding"):
        index.add_with_ids(_unit32(vec), (shard << ROW_BITS) | rows)
    if fingerprint(ds, shards) != before:
        raise DatasetError(f"{ds.path}'s files changed while the index was built (a run still writing?): "
                           "nothing was replaced; rerun when they are done")
    meta = {"kind": KIND_PQ if cfg.pq else KIND, "samples": int(index.ntotal), "kept_samples": n,
            "unreadable_samples": reader.unreadable, "cells": cells, "dim": dim, "pq": cfg.pq,
            "centroids_sha256": centroids_digest(faiss, index), "fastlaion": __version__, "files": before,
            "shards": shards}
    folder = _write(faiss, index, meta, index_dir(ds), ds.path, written)
    return IndexResult(path=str(folder), samples=int(index.ntotal), unreadable_samples=reader.unreadable,
                       cells=cells, dim=dim, seconds=time.perf_counter() - t0,
                       bytes=(folder / INDEX_FILE).stat().st_size, pq=cfg.pq)


class _IndexFolder(Staging):
    """`index/`'s image.faiss and index.json, written under its `.partial/` and put in place
    together by OutputDir's commit (Staging's): index.json, what makes an index valid for search,
    is moved aside first and put in place last, so that a crash at any point leaves the earlier
    index in use or none, never a description of the other one; a failed rename is undone, or
    the error says what is where and that search uses no index there until it is rebuilt."""

    what = "index"
    last = META_FILE
    command = "index"
    busy = "wait for it to end"

    def __init__(self, folder: Path, dataset: Path, written: Callable[[Path], None] | None = None):
        self.dataset = dataset
        super().__init__(folder, written)

    def earlier_files(self) -> list[str]:
        return [name for name in (INDEX_FILE, META_FILE) if (self.out / name).is_file()]

    def mixed(self) -> str:
        # index.json is there only while the earlier one has not been moved aside, or once the
        # new one is in place: an undo that failed left none
        return f"; search compares every embedding until `fastlaion index {self.dataset}` is rerun"


def _write(faiss: Any, index: Any, meta: dict[str, Any], folder: Path, dataset: Path,
           written: Callable[[Path], None] | None = None) -> Path:
    """The new index written aside (`.partial/`), then put in place (`_IndexFolder`). A Ctrl-C
    while it is written leaves the earlier index as it was; one while it is put in place lands
    once it is (the new index complete), after `written(folder)`. It used to replace the files
    with renames of its own: a failure writing or renaming index.json left the new image.faiss
    without one (or beside the earlier one's description), an index.json.partial, and a bare
    disk error."""
    staged = _IndexFolder(folder, dataset, written)
    with staged.building():
        for name, write in ((INDEX_FILE, lambda path: faiss.write_index(index, str(path))),
                            (META_FILE, lambda path: path.write_text(json.dumps(meta, indent=1)))):
            path = staged.path(name)
            try:
                write(path)
            except (RuntimeError, OSError) as e:
                # faiss's I/O errors (a full disk) are RuntimeErrors with a C++ trace
                lines = [line for line in str(e).strip().splitlines() if line.strip()]
                said = e.strerror if isinstance(e, OSError) and e.strerror else lines[-1] if lines else e
                raise OSError(f"cannot write {path} ({said}); the earlier index, if any, is as it was") from None
    for name in (INDEX_FILE, META_FILE):  # left by an earlier fastlaion's renames
        try:
            (folder / (name + ".partial")).unlink(missing_ok=True)
        except OSError:
            pass
    return folder


def centroids_digest(faiss: Any, index: Any) -> str:
    """sha256 of the index's cell centroids (float32): what its k-means learned from the
    embeddings it was trained on, so another build (other data, other --cells) has another. Read
    in memory by faiss.read_index (the cells' lists are what IO_FLAG_MMAP leaves on disk); at the
    most cells, 15,625 x 512 dimensions, 32 MB hashed."""
    ivf = faiss.extract_index_ivf(index)
    return hashlib.sha256(np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), np.float32)).hexdigest()


def mismatch(faiss: Any, index: Any, meta: dict[str, Any]) -> str | None:
    """How `index` (image.faiss as read) differs from the one `meta` (index.json) describes, or
    None. An index.json of an earlier fastlaion has no digest: the shape is checked."""
    ivf = faiss.extract_index_ivf(index)
    dim, pq = int(meta["dim"]), int(meta.get("pq") or 0)
    for what, has, described in (("samples", int(index.ntotal), int(meta["samples"])),
                                 ("cells", int(ivf.nlist), int(meta["cells"])),
                                 ("dimensions", int(index.d), dim),
                                 ("bytes a code", int(ivf.code_size), pq or 2 * dim)):
        if has != described:
            return f"{has:,} {what}, index.json says {described:,}"
    if meta.get("centroids_sha256") not in (None, centroids_digest(faiss, index)):
        return "other cell centroids than index.json records"
    return None


def _unit32(vec: np.ndarray) -> np.ndarray:
    x, norm2 = float32_rows(vec)
    x /= np.maximum(np.sqrt(norm2), 1e-8)[:, None]
    return x


@dataclass
class LoadedIndex:
    index: Any
    cells: int
    samples: int
    kept_samples: int
    unreadable_samples: int
    shards: list[str]  # the shards of its ids, in order
    pq: int = 0  # bytes a sample of its codes; 0: float16 vectors (its distances are exact)

    def candidates(self, k: int, rerank: int = 0) -> int:
        """How many a query takes from the index: k, or with codes the candidates ranked again
        (`rerank`, or by default RERANK x k), never fewer than k."""
        if not self.pq:
            return k
        return max(k, rerank or max(k * RERANK, RERANK_MIN))


def load_index(ds: Dataset) -> LoadedIndex | None:
    """The dataset's index when there is one that matches the dataset as it is now; None (with a
    warning saying why, when there is an index) otherwise. Its files are compared with the ones it
    records: the metadata files as the dataset lists them now, the embedding files of its shards
    (the same shards while the metadata files are the same). image.faiss is read after
    index.json: one that is not the index described (`mismatch`: rebuilt between the two reads,
    as `fastlaion index` puts its new files in place) is read again once with its index.json,
    then, still not, left for the exact search."""
    folder = index_dir(ds)
    if not (folder / META_FILE).exists():
        return None
    for attempt in (1, 2):
        read = _read_index(ds, folder)
        if not isinstance(read, str):
            return read
        if attempt == 2:
            log.warning("index: %s is not the index %s describes (%s; rebuilt while search read them, or copied "
                        "from two builds?): searching every embedding instead (exact); `fastlaion index %s` "
                        "rebuilds it", folder / INDEX_FILE, folder / META_FILE, read, ds.path)
    return None


def _read_index(ds: Dataset, folder: Path) -> LoadedIndex | str | None:
    """`load_index`'s one reading of index.json and image.faiss: the index, None (said why), or
    how image.faiss differs from the index.json read just before it (`mismatch`)."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") not in (KIND, KIND_PQ):
            built = "an earlier fastlaion" if meta.get("kind") in OLD_KINDS else f"fastlaion {meta.get('fastlaion')}"
            log.warning("index: %s was built by %s, whose index this one cannot read: searching every embedding "
                        "instead (exact); `fastlaion index %s` rebuilds it", folder, built, ds.path)
            return None
        shards = meta.get("shards")
        stale = not isinstance(shards, list) or meta.get("files") != fingerprint(ds, shards)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        log.warning("index: cannot read %s (%s): searching every embedding instead", meta_path, e)
        return None
    if stale:
        log.warning("index: %s was built from files that have changed since: searching every embedding "
                    "instead (exact); `fastlaion index %s` rebuilds it", folder, ds.path)
        return None
    try:
        faiss = import_faiss()
    except ConfigError as e:
        log.warning("index: %s is there, but %s: searching every embedding instead", folder, e)
        return None
    try:
        index = faiss.read_index(str(folder / INDEX_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        log.warning("index: cannot read %s (%s): searching every embedding instead", folder / INDEX_FILE,
                    str(e).strip().splitlines()[-1] if str(e).strip() else e)
        return None
    try:
        differs = mismatch(faiss, index, meta)
    except (KeyError, ValueError, TypeError) as e:  # an index.json without its counts
        log.warning("index: cannot read %s (%s): searching every embedding instead", meta_path, e)
        return None
    if differs:
        return differs
    return LoadedIndex(index=index, cells=int(meta["cells"]), samples=int(meta["samples"]),
                       kept_samples=int(meta["kept_samples"]), unreadable_samples=int(meta["unreadable_samples"]),
                       shards=[str(s) for s in shards], pq=int(meta.get("pq") or 0))


def search_index(loaded: LoadedIndex, vectors: np.ndarray, k: int, probes: int) -> list[list[tuple[int, float]]]:
    """For each unit query, up to k (id, cosine) from the cells probed, best first, ties to the
    lower id (dataset order, where shards do not interleave): with codes (--pq), the index's
    approximate cosines, for `rerank`."""
    if vectors.shape[1] != loaded.index.d:
        raise ConfigError(f"the queries have {vectors.shape[1]} dimensions, the index's embeddings "
                          f"{loaded.index.d}: embed them with the model the run scored with")
    loaded.index.nprobe = min(probes, loaded.cells)
    k = min(k, max(1, int(loaded.index.ntotal)))  # faiss allocates k slots a query
    sims, ids = loaded.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    out = []
    for q in range(len(vectors)):
        keep = ids[q] >= 0
        pos, sim = ids[q][keep], np.minimum(sims[q][keep], 1.0)  # float16 rounding: a copy scores 1.0001
        order = np.lexsort((pos, -sim))  # ties to the lower id
        out.append([(int(pos[i]), float(sim[i])) for i in order])
    return out


def probes_for(loaded: LoadedIndex, vectors: np.ndarray, k: int) -> np.ndarray:
    """(Q,) int: for each unit query, the fewest cells that hold k samples or more, read nearest
    first as the search reads them (nprobe); the index's cell count where all of them hold fewer."""
    faiss = import_faiss()
    ivf = faiss.extract_index_ivf(loaded.index)
    sizes = np.array([ivf.invlists.list_size(c) for c in range(ivf.nlist)], np.int64)
    _, nearest = ivf.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), ivf.nlist)
    held = np.cumsum(sizes[nearest], axis=1)
    return np.minimum((held < k).sum(axis=1) + 1, ivf.nlist)


def rerank(ds: Dataset, loaded: LoadedIndex, vectors: np.ndarray, found: list[list[tuple[int, float]]], k: int
           ) -> list[list[tuple[int, float]]]:
    """Each query's candidates (ids) ranked again by the cosine of its stored embedding, as the
    exact search computes it (float16 embedding, float32 query): its best k. Only the candidates'
    rows are read, shard by shard; one whose embedding can no longer be read is dropped (the exact
    search would not have it either), its file named. Queries go in groups whose candidates'
    embeddings take at most RERANK_BYTES (many queries with a large k: 50 x k candidates each)."""
    widest = max((len(per_query) for per_query in found), default=0) * vectors.shape[1] * 2
    group = max(1, RERANK_BYTES // max(widest, 1))
    if len(found) > group:
        return [hits for at in range(0, len(found), group)
                for hits in rerank(ds, loaded, vectors[at:at + group], found[at:at + group], k)]
    ids = np.unique(np.fromiter((i for per_query in found for i, _ in per_query), dtype=np.int64))
    vec = np.zeros((ids.size, vectors.shape[1]), np.float16)
    readable = np.zeros(ids.size, bool)
    shard_of, row_of = ids >> ROW_BITS, ids & ((1 << ROW_BITS) - 1)
    for shard in np.unique(shard_of):
        at = np.flatnonzero(shard_of == shard)  # ascending rows: ids are sorted
        path = ds.embeddings_path(loaded.shards[shard])
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.ndim != 2 or arr.shape[1] != vectors.shape[1] or row_of[at[-1]] >= arr.shape[0]:
                raise ValueError(f"shape {arr.shape}, not what the index was built from")
            vec[at] = embedding_rows(arr, row_of[at])
        except (OSError, ValueError, EOFError) as e:
            log.warning("index: cannot read %s (%s); its candidates are left out", path, e)
            continue
        readable[at] = finite_rows(vec[at])
    out = []
    for q, per_query in zip(vectors, found):
        at = np.searchsorted(ids, np.fromiter((i for i, _ in per_query), dtype=np.int64))
        at = at[readable[at]]
        x, norm2 = float32_rows(vec[at])  # as search() does: another tool's may not be unit
        sim = (x @ np.asarray(q, np.float32)) / np.maximum(np.sqrt(norm2), 1e-8)
        order = np.lexsort((ids[at], -sim))[:k]  # ties to the lower id
        out.append([(int(ids[at][i]), float(sim[i])) for i in order])
    return out


def rows_of(ds: Dataset, loaded: LoadedIndex, ids: list[int]) -> dict[int, dict[str, Any]]:
    """key, url and caption of the kept samples with these ids, from the metadata of their
    shards only (a run's per-shard files: just theirs)."""
    if not ids:
        return {}
    import polars as pl

    from .source import KEPT, collect

    shard_of = {i: loaded.shards[i >> ROW_BITS] for i in ids}
    scan = ds.scan_shards(set(shard_of.values()))
    if scan is None:
        return {}
    wanted = pl.LazyFrame({"_id": ids, "shard": [shard_of[i] for i in ids],
                           "_row": [i & ((1 << ROW_BITS) - 1) for i in ids]},
                          schema={"_id": pl.Int64, "shard": pl.String, "_row": pl.Int64})
    have = ds.columns
    columns = [c for c in ("url", "caption") if c in have]
    frame = collect(scan.filter(pl.col("status") == KEPT)
                    .with_columns(row_in_shard(have).alias("_row"))
                    .join(wanted, on=["shard", "_row"], how="inner")
                    .select("_id", "key", *columns))
    return {int(r["_id"]): {"key": r["key"], "url": r.get("url"), "caption": r.get("caption")}
            for r in frame.iter_rows(named=True)}
