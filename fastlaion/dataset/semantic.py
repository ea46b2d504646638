"""Semantic dedup: which kept samples' CLIP image embeddings repeat an earlier kept sample's.

The rule (dedup.py): walking the samples in dataset order, a sample is a duplicate of the
earliest *kept* sample whose cosine with it is at least the threshold; otherwise it is kept.

Two ways to apply it:

- `exact`: every pair (n^2/2 dot products, `greedy_cosine`). The embeddings are held in memory
  (n x D float16). Right up to about 10^5 samples on a CPU and 10^6 on a GPU; beyond, hours.
- `clusters` (SemDeDup-style, approximate): spherical k-means on an evenly spaced sample, every
  sample assigned to its nearest centroid (`topk_cosine`: our CUDA kernel on a GPU), then the
  same greedy walk inside each cluster only. n * (K + n / K / 2) dot products, K ~ sqrt(2 n) by
  default: a million samples take under two minutes on two cores, not hours. The samples are
  spilled to disk by cluster (buckets of whole clusters, about `bucket_bytes` each, one in
  memory at a time; one huge cluster makes one big bucket), so memory stays bounded however many
  there are. Every drop still has cosine >= threshold with the kept sample it names (the rule
  inside a cluster is the exact one); what it can miss is a pair split across two clusters, and
  it measures how often that happens on the data at hand: up to 1,000 probe samples are
  compared with every other sample, and the share of their pairs above the
  threshold that straddle two clusters is reported (ClusterReport). With one cluster it is
  `exact`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .source import SHARD_ROW, Dataset, DatasetError, NoProgress, Progress

log = logging.getLogger(__name__)

KMEANS_ITERATIONS = 10
KMEANS_SAMPLE_PER_CLUSTER = 64     # training sample: this many samples per cluster ...
KMEANS_MAX_SAMPLE = 1 << 20        # ... at most (1M x 768 float32: 3 GiB)
EXACT_MAX_ROWS = {"cpu": 100_000, "cuda": 1_000_000}  # method auto: exact up to this many samples
MAX_BUCKETS = 256                   # spill files open at once (past 256 x bucket_bytes, buckets grow beyond it)
_PROBE_ROWS = 1 << 14              # samples against the probes per matrix product
_ASSIGN_ROWS = 1 << 16             # samples assigned per topk_cosine call


def default_clusters(n: int) -> int:
    """About sqrt(2 n): the assignment (n x K dot products) then costs about four times the walks
    inside clusters (~n x n / K / 2), a price for recall: on bench/semantic.py's data, sqrt(n / 2)
    clusters (the cheapest) split 3 % of the pairs above 0.95, sqrt(2 n) 0.6 %, because finer
    centroids sit closer to where samples gather and leave wider margins between them."""
    return max(1, min(1 << 16, math.ceil(math.sqrt(2 * n))))


# --- reading the embeddings --------------------------------------------------------------------

def embedding_rows(arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (valid, ascending) of an embedding file's (memory-mapped) array, as float16:
    another tool's float32 vectors made unit length first, so that none overflows to inf."""
    if rows.size and rows[0] == 0 and rows[-1] == rows.size - 1 and np.all(np.diff(rows) == 1):
        vec = np.array(arr[:rows.size])  # every row from the first: one copy, not a gather
    else:
        vec = np.asarray(arr[rows])
    if vec.dtype != np.float16:
        vec = vec.astype(np.float32)
        vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-30)
        vec = vec.astype(np.float16)
    return vec


def finite_rows(vec: np.ndarray) -> np.ndarray:
    """(m,) bool: the rows of a float16 (m, D) array without inf or NaN, read from the exponent
    bits (all ones: inf or NaN): compiled (f16_native.c) where it can be built, else numpy on the
    bits (3x np.isfinite, which converts float16 first)."""
    if vec.dtype != np.float16:  # another tool's float32, say
        return np.isfinite(vec).all(axis=1)
    from .. import f16_native

    ok = f16_native.finite_rows(vec)
    if ok is None:
        ok = ((vec.astype("=f2", copy=False).view(np.uint16) & 0x7C00) != 0x7C00).all(axis=1)
    return ok


def float32_rows(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, D) embeddings -> their float32 copy and each row's squared length (inf or NaN for a row
    holding either). float16 goes through the compiled converter (fastlaion/f16_native.c: 5x
    numpy's astype with F16C) where it can be built; numpy is the reference and the fallback."""
    if vec.dtype == np.float16:
        from .. import f16_native

        done = f16_native.rows(vec)
        if done is not None:
            return done
    x = np.ascontiguousarray(vec, dtype=np.float32)
    return x, np.einsum("ij,ij->i", x, x)


def row_in_shard(columns: Collection[str]) -> pl.Expr:
    """A sample's row in its shard's embedding file, for a frame with these columns: its
    `shard_row` where the frame has one (a subset written with --shards), else its key's number
    after the shard's (a run's keys are `{shard}{row}`); null where there is none."""
    if SHARD_ROW in columns:
        return pl.col(SHARD_ROW).cast(pl.Int64)
    return pl.col("key").str.slice(pl.col("shard").str.len_chars()).cast(pl.Int64, strict=False)


class EmbeddingReader:
    """The candidates' image embeddings (`{shard}_img_emb.npy`, row = row_in_shard), shard by
    shard. cand: kept rows in dataset order with Dataset.sample_columns() (`key`, `shard`, and
    `shard_row` where the dataset has it); a row whose shard is null has no embedding file."""

    def __init__(self, ds: Dataset, cand: pl.DataFrame, what: str = "dedup --by embedding"):
        self.ds = ds
        self.rows = cand.height
        self.dim = 0
        self.unreadable = 0
        self._warned: set[str] = set()  # files already named in a warning (the clustered walk reads twice)
        self.shardless = 0
        if cand.height == 0:
            self.per_shard: list[tuple[str, np.ndarray, np.ndarray]] = []
            return
        # Grouped in numpy, not by Polars into lists of Python ints (0.33 s at 1M samples, and
        # 56 bytes a sample while they lived): shards in order of first appearance, each with its
        # samples' positions in dataset order and their rows in its embedding file.
        shard = cand["shard"]
        names = shard.unique(maintain_order=True)
        ids = shard.replace_strict(names, np.arange(len(names)), return_dtype=pl.Int64).to_numpy()
        rows = cand.select(row_in_shard(cand.columns).fill_null(-1)).to_series().to_numpy()
        order = np.argsort(ids, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=len(names)))]).tolist()
        per_shard = [(name, order[a:b], rows[order[a:b]]) for name, a, b in zip(names.to_list(), starts, starts[1:])]
        # samples with no shard (a --shards subset's rows whose sample is in none of its tars) have
        # no embedding: counted as unreadable on every full pass, never looked for
        self.shardless = sum(pos.size for name, pos, _ in per_shard if name is None)
        self.per_shard = [entry for entry in per_shard if entry[0] is not None]
        ds.need_root(what)
        if not self.per_shard:
            return
        if not any(ds.embeddings_path(s).exists() for s, _, _ in self.per_shard):
            raise DatasetError(f"{what} needs image embeddings ({self.per_shard[0][0]}_img_emb.npy and "
                               f"the like) in {ds.root}: run with CLIP scoring on (without --no-score)")
        self.dim = self._common_width()

    def _common_width(self) -> int:
        """The width most of the files have (their headers only): a lone odd file, even the first,
        is the one set aside. 0 when none can be read (each is then named as it is read)."""
        widths: dict[int, int] = {}
        for shard, pos, _ in self.per_shard:
            path = self.ds.embeddings_path(shard)
            if self.ds.is_damaged(path):
                continue
            try:
                shape = np.load(path, mmap_mode="r").shape
            except (OSError, ValueError, EOFError):
                continue
            if len(shape) == 2:
                widths[shape[1]] = widths.get(shape[1], 0) + pos.size
        return max(widths, key=lambda w: (widths[w], -w)) if widths else 0

    def shards(self, progress: Progress, what: str, only: np.ndarray | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per shard: (positions among the candidates, (m, D) float16 vectors) of the samples with
        a finite embedding; `only` (a bool mask over positions) reads just those. Samples without
        one are counted in `unreadable` (on a full pass) and logged once per file."""
        progress.start(what, len(self.per_shard))
        try:
            for _, pos, _, vec in self._read(progress, only):
                yield pos, vec
        finally:
            progress.stop()

    def shard_rows(self, progress: Progress, what: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """As `shards`, but per shard (its index in `per_shard`, the rows of its embedding file,
        their (m, D) float16 vectors): where the samples are, not their positions."""
        progress.start(what, len(self.per_shard))
        try:
            for i, _, row, vec in self._read(progress, None):
                yield i, row, vec
        finally:
            progress.stop()

    def _read(self, progress: Progress, only: np.ndarray | None
              ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        missing = self.shardless
        for i, (shard, pos, row) in enumerate(self.per_shard):
            if only is not None:
                keep = only[pos]
                pos, row = pos[keep], row[keep]
                if not pos.size:
                    progress.advance()
                    continue
            path = self.ds.embeddings_path(shard)
            if self.ds.is_damaged(path):  # said by the command (Dataset.with_damage): as if missing
                missing += pos.size
                progress.advance()
                continue
            try:
                arr = np.load(path, mmap_mode="r")
                if arr.ndim != 2:
                    raise ValueError(f"shape {arr.shape}, not (rows, dim)")
            except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
                self._warn(path, f"cannot read {path} ({e}); its samples take no part")
                missing += pos.size
                progress.advance()
                continue
            self.dim = self.dim or int(arr.shape[1])
            if arr.shape[1] != self.dim:
                self._warn(path, f"{path} has {arr.shape[1]} dimensions, the others {self.dim}; its samples take no part")
                missing += pos.size
                progress.advance()
                continue
            valid = (row >= 0) & (row < arr.shape[0])
            if not valid.all():
                self._warn(path, f"{path} has {arr.shape[0]} rows; the samples of its shard past them take no part")
            take = row[valid]
            vec = embedding_rows(arr, take)
            finite = finite_rows(vec)
            missing += pos.size - int(finite.sum())
            progress.advance()
            if finite.any():
                yield i, pos[valid][finite], take[finite], vec[finite]
        if only is None:
            self.unreadable = missing

    def _warn(self, path: Path, what: str) -> None:
        if str(path) not in self._warned:
            self._warned.add(str(path))
            log.warning("embedding: %s", what)

    def load_all(self, progress: Progress) -> tuple[np.ndarray, np.ndarray]:
        """(positions, (m, D) float16) of every candidate with an embedding, in dataset order
        (shard by shard is not that order when a dataset's rows interleave shards)."""
        parts = list(self.shards(progress, "embeddings"))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, max(self.dim, 1)), np.float16)
        pos = np.concatenate([p for p, _ in parts])
        order = np.argsort(pos, kind="stable")
        return pos[order], np.concatenate([v for _, v in parts])[order]


# --- exact -------------------------------------------------------------------------------------

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


def exact_duplicates(reader: EmbeddingReader, min_cosine: float, block_rows: int, device: Any,
                     progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the duplicates, positions of the kept samples they repeat), all pairs."""
    import torch

    pos, vec = reader.load_all(progress)
    rep = greedy_cosine(torch.from_numpy(vec), min_cosine, block_rows, device, progress)
    dup = rep >= 0
    return pos[dup], pos[rep[dup]]


# --- clusters ----------------------------------------------------------------------------------

def nearest_centroid(x: Any, centroids: Any) -> Any:
    """(n, D) vectors, (K, D) unit centroids (on one device) -> (n,) int64 index of the most
    cosine-similar centroid (ties: the lower index), in blocks; on CUDA in float16 through our
    topk_cosine kernel."""
    import torch

    from ..ops import topk_cosine

    if x.is_cuda:
        x, centroids = x.half(), centroids.half()
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], _ASSIGN_ROWS):
        out[start:start + _ASSIGN_ROWS] = topk_cosine(x[start:start + _ASSIGN_ROWS], centroids, 1)[1][:, 0]
    return out


def spherical_kmeans(x: Any, k: int, iterations: int = KMEANS_ITERATIONS, seed: int = 0) -> Any:
    """(n, D) unit float32 vectors -> (k, D) unit centroids (k <= n). Initial centroids: k samples
    drawn with a seeded generator; a cluster left empty restarts at the sample farthest from its
    own centroid (as faiss does, so no centroid is wasted). Deterministic for one input on one
    device: the members are summed on the CPU (index_add_ on CUDA adds with atomics, in no fixed
    order)."""
    import torch

    n = x.shape[0]
    k = min(k, n)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    x_host = x.cpu()
    centroids = x_host[pick].clone()
    for _ in range(iterations):
        assign = nearest_centroid(x, centroids.to(x.device)).cpu()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x_host)
        filled = torch.bincount(assign, minlength=k) > 0
        centroids[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
        empty = torch.nonzero(~filled).flatten()
        if empty.numel():
            fit = (x_host * centroids[assign]).sum(dim=1)
            centroids[empty] = x_host[torch.argsort(fit, stable=True)[:empty.numel()]]
    return centroids.to(x.device)


def _unit(vec: np.ndarray, device: Any) -> Any:
    import torch

    x = torch.from_numpy(vec).to(device=device, dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=1, eps=1e-8)


@dataclass
class ClusterReport:
    """What the clustered walk did, and how much it may have missed: of the pairs at or above the
    threshold that involve one of `probes` samples (every other sample compared with them),
    `split_pairs` had their two samples in different clusters, so the walk never compared them."""

    clusters: int = 0
    largest: int = 0
    probes: int = 0
    pairs: int = 0
    split_pairs: int = 0


def probe_count(n: int) -> int:
    """Samples compared with every other one to estimate the split pairs: 1,000, fewer past 10^6
    samples (the cost is n x probes dot products, next to the assignment's n x clusters)."""
    return max(1, min(n, 1000, max(100, 10**9 // max(n, 1))))


def clustered_duplicates(reader: EmbeddingReader, min_cosine: float, block_rows: int, device: Any,
                         clusters: int, bucket_bytes: int, spill_dir: Path,
                         progress: Progress) -> tuple[np.ndarray, np.ndarray, ClusterReport]:
    """Like exact_duplicates, inside clusters only: (duplicate positions, kept positions they
    repeat, a ClusterReport). `clusters` 0: default_clusters(n). Spills the embeddings to
    `spill_dir` by cluster; reads the embedding files twice (a sample, then all)."""
    import torch

    n = reader.rows
    k = clusters or default_clusters(n)
    report = ClusterReport()
    none = np.zeros(0, np.int64)
    # 1. centroids from an evenly spaced sample of the candidates; probes evenly spaced among it,
    #    held out of the training (k-means fits the samples it is trained on: their margins are
    #    wider than other samples', so as probes they would see fewer split pairs than there are)
    sample_size = min(n, max(k, min(KMEANS_MAX_SAMPLE, k * KMEANS_SAMPLE_PER_CLUSTER)) + probe_count(n))
    only = np.zeros(n, dtype=bool)
    only[np.linspace(0, n - 1, sample_size).astype(np.int64)] = True
    parts = list(reader.shards(progress, "embeddings (k-means sample)", only))
    if not parts:  # the sample fell on samples without embeddings: the first readable ones instead
        got = 0
        for pos, vec in reader.shards(progress, "embeddings (k-means sample)"):
            parts.append((pos, vec))
            got += len(vec)
            if got >= sample_size:
                break
        if not parts:  # that pass read every file: not one embedding, all counted unreadable
            return none, none, report
    sample_pos = np.concatenate([p for p, _ in parts])
    sample = _unit(np.concatenate([v for _, v in parts]), device)
    del parts
    is_probe = np.zeros(len(sample_pos), dtype=bool)
    probes_n = min(probe_count(n), len(sample_pos) // 3)  # two thirds at least for the training
    is_probe[np.linspace(0, len(sample_pos) - 1, probes_n).astype(np.int64)] = True
    centroids = spherical_kmeans(sample[torch.as_tensor(~is_probe, device=sample.device)], k)
    k = report.clusters = centroids.shape[0]
    probes = sample[torch.as_tensor(is_probe, device=sample.device)]
    probe_pos = torch.as_tensor(sample_pos[is_probe], device=sample.device)
    probe_cluster = nearest_centroid(probes, centroids)
    report.probes = int(is_probe.sum())
    log.info("embedding dedup: %d clusters from %d samples, %d probes", k, len(sample_pos) - report.probes,
             report.probes)
    del sample

    # 2. every sample to its nearest centroid, spilled to buckets of whole clusters
    record = np.dtype([("cluster", "<i4"), ("pos", "<i8"), ("vec", "<f2", (reader.dim,))])
    buckets = max(1, min(MAX_BUCKETS, k, math.ceil(n * record.itemsize / bucket_bytes)))
    bucket_of = (np.arange(k, dtype=np.int64) * buckets) // k
    spill_dir.mkdir(parents=True, exist_ok=True)
    paths = [spill_dir / f"bucket-{b:04d}.bin" for b in range(buckets)]
    sizes = np.zeros(k, dtype=np.int64)
    files = [open(p, "wb") for p in paths]  # noqa: SIM115 (closed below, also on errors)
    try:
        for pos, vec in reader.shards(progress, "embeddings (assign to clusters)"):
            unit = _unit(vec, device)
            cluster_t = nearest_centroid(unit, centroids)
            _count_probe_pairs(unit, torch.as_tensor(pos, device=unit.device), cluster_t, probes, probe_pos,
                               probe_cluster, min_cosine, report)
            cluster = cluster_t.cpu().numpy()
            sizes += np.bincount(cluster, minlength=k)
            rec = np.empty(pos.size, dtype=record)
            rec["cluster"], rec["pos"], rec["vec"] = cluster, pos, vec
            b_of = bucket_of[cluster]
            order = np.argsort(b_of, kind="stable")
            rec, b_of = rec[order], b_of[order]
            bounds = np.flatnonzero(np.diff(b_of)) + 1
            for part in np.split(rec, bounds):
                part.tofile(files[int(bucket_of[part["cluster"][0]])])
    finally:
        for f in files:
            f.close()

    # 3. the exact walk inside each cluster, one bucket in memory at a time
    dups: list[np.ndarray] = []
    firsts: list[np.ndarray] = []
    report.largest = int(sizes.max())
    log.info("embedding dedup: %d samples in %d clusters (largest %d) and %d spill buckets; of %d pairs "
             "above the threshold with one of %d probe samples, %d split across clusters",
             int(sizes.sum()), int((sizes > 0).sum()), report.largest, buckets, report.pairs, report.probes,
             report.split_pairs)
    progress.start("clusters", int((sizes > 0).sum()))
    for path in paths:
        rec = np.fromfile(path, dtype=record)
        path.unlink()
        if not rec.size:
            continue
        rec = rec[np.lexsort((rec["pos"], rec["cluster"]))]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(rec["cluster"])) + 1, [rec.size]))
        for a, b in zip(starts[:-1], starts[1:]):
            if b - a > 1:
                rep = greedy_cosine(torch.from_numpy(rec["vec"][a:b]), min_cosine, block_rows, device)
                hit = rep >= 0
                if hit.any():
                    dups.append(rec["pos"][a:b][hit])
                    firsts.append(rec["pos"][a:b][rep[hit]])
            progress.advance()
    progress.stop()
    if not dups:
        return none, none, report
    dup, first = np.concatenate(dups), np.concatenate(firsts)
    order = np.argsort(dup)
    return dup[order], first[order], report


def _count_probe_pairs(unit: Any, pos: Any, cluster: Any, probes: Any, probe_pos: Any, probe_cluster: Any,
                       min_cosine: float, report: ClusterReport) -> None:
    """Add the pairs (a sample of this shard, a probe) at or above the threshold, and how many of
    them lie in two clusters, to `report` (a sample is not paired with itself)."""
    for start in range(0, unit.shape[0], _PROBE_ROWS):
        stop = start + _PROBE_ROWS
        close = (unit[start:stop] @ probes.T) >= min_cosine
        close &= pos[start:stop, None] != probe_pos[None, :]
        report.pairs += int(close.sum())
        report.split_pairs += int((close & (cluster[start:stop, None] != probe_cluster[None, :])).sum())
