"""Search a dataset by text, by image or by vector: each query is embedded with the CLIP model the
run scored with (its config.json; or one given), and the k kept samples whose image embeddings
are the most cosine-similar are returned, best first.

Where `fastlaion index` built an index that matches the dataset (fastlaion/dataset/index.py), the
queries go to it: a few of its cells are read, not every embedding, and a hit in a cell not read
can be missed (`--probes` trades speed for recall; `--exact` skips the index). Nothing else that
grows with the dataset is read then: the hits' rows come from their shards' metadata only.

Exact: every kept sample's embedding is read once, shard by shard (memory-mapped; one shard in
memory at a time), scored against all queries in one matrix product, and a running top-k per
query is kept; exact ties go to the earlier sample. The embeddings a run writes are unit length,
so a dot product is the cosine; other tools' vectors are made unit length as they are read
(semantic.EmbeddingReader, as for `dedup --by embedding`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..config import ConfigError, ScoreConfig, first_line, gelu_built_models, torch_device
from .semantic import EmbeddingReader, float32_rows
from .source import KEPT, RUN_CONFIG, Dataset, DatasetError, NoProgress, Progress, collect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchConfig:
    k: int = 10
    model: str | None = None        # None: the model the run scored with (its config.json)
    pretrained: str | None = None   # None: the run's
    device: str = "auto"
    exact: bool = False             # True: every embedding, even where an index is (fastlaion index)
    probes: int = 0                 # the index's cells a query reads; 0: index.default_probes
    rerank: int = 0                 # with a --pq index, candidates ranked again; 0: LoadedIndex.candidates

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"-k must be at least 1, got {self.k}")
        if self.probes < 0:
            raise ConfigError(f"--probes must be 0 (the default share of the cells) or more, got {self.probes}")
        if self.rerank < 0:
            raise ConfigError(f"--rerank must be 0 (the default) or more, got {self.rerank}")
        if (self.probes or self.rerank) and self.exact:
            which = "--probes" if self.probes else "--rerank"
            raise ConfigError(f"{which} is for the index; --exact searches every embedding: give one of them")
        torch_device("--device", self.device)


@dataclass(frozen=True)
class Query:
    kind: str    # "text", "image" or "vector"
    value: str   # the text, or the file's path


@dataclass
class Hit:
    rank: int
    similarity: float
    key: str
    url: str | None
    caption: str | None


@dataclass
class SearchResult:
    queries: list[Query]
    hits: list[list[Hit]]           # per query, best first
    samples: int                    # kept samples searched
    unreadable_samples: int = 0     # kept samples without a readable embedding
    model: str | None = None
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    # {"cells", "probes"} when the index answered (with --pq codes, also "pq": their bytes a sample
    # and "reranked": the candidates a query ranked again by their embeddings); None: exact
    index: dict[str, int] | None = None
    # when the index gave some query fewer than k hits though it holds more samples:
    # {"k", "queries": how many, "fewest": hits, "probes_needed": the --probes that reads cells
    # holding k (or all its samples) for each of them; 0: more cells would not help}; None: none
    short: dict[str, int] | None = None
    # a run not done, as stats' (the samples searched are those of its shards finished then)
    unfinished: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "samples": self.samples, "unreadable_samples": self.unreadable_samples,
                "skipped_files": self.skipped_files, "index": self.index, "short": self.short,
                "unfinished": self.unfinished,
                "results": [{"query": vars(q), "hits": [vars(h) for h in hits]}
                            for q, hits in zip(self.queries, self.hits)]}


def run_score_config(ds: Dataset, cfg: SearchConfig, what: str = "search") -> ScoreConfig:
    """The CLIP model to embed queries (or `what`'s texts) with: the run's (config.json beside its
    shards), with --model/--pretrained overriding; random weights with a warning (the run's
    seeded model: queries embedded as its images were, but nothing they find means anything)."""
    instead = ", or search with --vector" if what == "search" else ""
    ds.need_root(what)
    saved: dict[str, Any] = {}
    whole: Any = {}
    path = ds.root / RUN_CONFIG
    if path.exists():
        try:
            whole = json.loads(path.read_text())
            saved = whole.get("score") if isinstance(whole, dict) else None
            if not isinstance(saved, dict):
                raise ValueError("no 'score' object in it")
        except (OSError, ValueError) as e:
            if not (cfg.model and cfg.pretrained):  # both given: the file is not needed
                raise DatasetError(f"cannot read {path}: {first_line(e)}; pass --model and --pretrained") from None
            saved = {}
        if saved.get("enabled") is False:
            raise DatasetError(f"{ds.root} was run without CLIP scoring (--no-score): it has no image embeddings "
                               f"to {what}")
    model = cfg.model or saved.get("model")
    pretrained = cfg.pretrained or saved.get("pretrained")
    if (model is not None and not isinstance(model, str)) or (pretrained is not None and not isinstance(pretrained, str)):
        raise DatasetError(f"{path}: its score.model / score.pretrained are not text; pass --model and --pretrained")
    if saved and (cfg.model or cfg.pretrained) and (model, pretrained) != (saved.get("model"), saved.get("pretrained")):
        log.warning("the queries are embedded with %s (%s), the run scored with %s (%s): the hits mean something "
                    "only if both give the same embeddings", model, pretrained, saved.get("model"),
                    saved.get("pretrained"))
    if not model or pretrained is None:
        raise ConfigError(f"{ds.root} has no {RUN_CONFIG} naming the CLIP model it scored with: pass --model and "
                          f"--pretrained (the same as the run's){instead}")
    # fp32 on any device: a few queries or class names cost nothing, and the run's own precision
    # (bf16 on an AMX CPU, fp16 on CUDA) would only add its rounding to theirs
    score = ScoreConfig(model=model, pretrained=pretrained, device=cfg.device, batch_size=64, precision="fp32")
    wrong = [w for w in gelu_built_models(whole) if w == f"{model} / {pretrained}"] if saved else []
    if wrong:
        log.warning("the run was scored by an older fastlaion that ran %s with nn.GELU, not the QuickGELU its "
                    "weights were trained with: its stored embeddings are not the ones %s's queries get now, so "
                    "hits and scores are off; rerun it to fix them", wrong[0], what)
    if score.random_weights:  # one seeded model (score.RANDOM_WEIGHTS_SEED), as the run loaded it
        texts = "text queries and their hits mean nothing" if what == "search" else "its labels mean nothing"
        log.warning("the run scored with random weights (%s, --pretrained %s): the same seeded model loads here, "
                    "so queries are embedded as its images were, but %s (a run made with another fastlaion, torch "
                    "or open_clip may have drawn other weights)", model, pretrained, texts)
    return score


def embed_queries(queries: list[Query], score: ScoreConfig | None) -> np.ndarray:
    """(Q, D) float32 unit vectors, one per query, in order; the model (and torch) is loaded only
    when a text or image query needs it."""
    out: list[np.ndarray | None] = [None] * len(queries)
    images: dict[int, Any] = {}  # read before the model loads: a bad file fails in a second, not after it
    for i, q in enumerate(queries):
        if q.kind == "vector":
            out[i] = _read_vector(Path(q.value))
        elif q.kind == "image":
            images[i] = _read_image(Path(q.value))
    needs_model = [i for i, q in enumerate(queries) if q.kind != "vector"]
    if needs_model:
        if score is None:
            raise ConfigError("text and image queries need the run's CLIP model")
        from ..score import Scorer, pick_device

        scorer = Scorer(score, pick_device(score.device))
        texts = [i for i in needs_model if queries[i].kind == "text"]
        if texts:
            emb = scorer.embed_texts([queries[i].value for i in texts]).numpy()
            for i, e in zip(texts, emb):
                out[i] = e
        for i, rgb in images.items():
            pixels = np.array(scorer.clip_spec.apply(rgb, rgb.width, rgb.height))  # writable, for torch.from_numpy
            out[i] = scorer.embed_images(pixels[None])[0].numpy()
    dims = {len(v) for v in out if v is not None}
    if len(dims) > 1:
        raise ConfigError(f"the queries' vectors have different lengths ({', '.join(map(str, sorted(dims)))})")
    q = np.stack([np.asarray(v, np.float32) for v in out if v is not None])
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-8)


def _read_vector(path: Path) -> np.ndarray:
    try:
        v = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        if not isinstance(e, OSError) and not _is_npy(path):  # numpy then tried it as a pickle, and refused
            raise ConfigError(f"--vector {path}: not a .npy file; --vector takes a NumPy .npy file holding one "
                              "embedding, shape (D,) or (1, D), as numpy.save writes it") from None
        raise ConfigError(f"--vector {path}: cannot read a .npy vector ({first_line(e)})") from None
    if not isinstance(v, np.ndarray) or v.dtype.kind not in "fiu":  # an .npz, strings, complex, bool...
        raise ConfigError(f"--vector {path}: need a .npy of one real-valued vector, got "
                          f"{type(v).__name__ if not isinstance(v, np.ndarray) else v.dtype}")
    v = v.astype(np.float32).squeeze()
    if v.ndim != 1 or not v.size or not np.isfinite(v).all() or not np.any(v):
        raise ConfigError(f"--vector {path}: need one finite, non-zero vector, got shape {np.shape(v)}")
    return v


def _is_npy(path: Path) -> bool:
    """Whether `path` starts as a .npy file does (numpy's magic string)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX
    except OSError:
        return False


def _read_image(path: Path) -> Any:
    """An image file as an RGB Pillow image, which the scorer's `clip_spec` makes the model's
    input pixels from, as the run made them."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
        raise ConfigError(f"--image {path}: cannot read it as an image ({first_line(e)})") from None


def search(reader: EmbeddingReader | None, vectors: np.ndarray, k: int, progress: Progress | None = None
           ) -> list[list[tuple[int, float]]]:
    """For each unit query vector (Q, D), the k best of the reader's samples (kept_reader's) as
    (position among them, cosine), best first, ties to the earlier sample."""
    progress = progress or NoProgress()
    n_q = vectors.shape[0]
    best_pos = np.zeros((n_q, 0), np.int64)
    best_sim = np.zeros((n_q, 0), np.float32)
    if reader is None:
        return [[] for _ in range(n_q)]
    for pos, vec in reader.shards(progress, "search"):
        if vec.shape[1] != vectors.shape[1]:
            raise ConfigError(f"the queries have {vectors.shape[1]} dimensions, the dataset's embeddings "
                              f"{vec.shape[1]}: embed them with the model the run scored with")
        x, norm2 = float32_rows(vec)
        norms = np.sqrt(norm2)  # a run's are unit; other tools' may not be
        sims = (vectors @ x.T) / np.maximum(norms, 1e-8)  # (Q, m) cosines
        # each query's entries at or above its k-th best value: all of a tie, so the merge below
        # can give it to the earlier samples (argpartition alone picks any of them)
        take = min(k, sims.shape[1])
        kth = -np.partition(-sims, take - 1, axis=1)[:, take - 1:take]
        merged = [_top(np.concatenate([best_pos[q], pos[keep]]), np.concatenate([best_sim[q], sims[q, keep]]), k)
                  for q, keep in ((q, np.flatnonzero(sims[q] >= kth[q])) for q in range(n_q))]
        best_pos = np.stack([p for p, _ in merged])  # every query keeps as many: min(k, samples so far)
        best_sim = np.stack([s for _, s in merged])
    return [[(int(p), float(s)) for p, s in zip(best_pos[i], best_sim[i])] for i in range(n_q)]


def nothing_kept(ds: Dataset, what: str) -> str:
    """The one line of index and search on a dataset with no kept sample (a subset that matched
    nothing: 0 rows)."""
    return f"{ds.path} holds no kept samples ({ds.rows:,} rows): nothing to {what}"


def kept_reader(ds: Dataset, what: str = "search") -> EmbeddingReader | None:
    """The kept samples' embeddings (None when there are none); raises DatasetError, naming the
    command `what`, when the dataset has no embedding files at all."""
    cand = collect(ds.scan().filter(pl.col("status") == KEPT).select(ds.sample_columns()))
    return EmbeddingReader(ds, cand, what) if cand.height else None


def _rows_at(ds: Dataset, positions: list[int]) -> dict[int, dict[str, Any]]:
    """key, url and caption of the kept samples at these positions (for the hits only: the
    captions of every kept sample would cost memory for nothing)."""
    columns = [c for c in ("url", "caption") if c in ds.columns]
    frame = collect(ds.scan().filter(pl.col("status") == KEPT).with_row_index("_p")
                    .filter(pl.col("_p").is_in(positions)).select("_p", "key", *columns))
    return {int(r["_p"]): {"key": r["key"], "url": r.get("url"), "caption": r.get("caption")}
            for r in frame.iter_rows(named=True)}


def _top(pos: np.ndarray, sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k entries of highest `sim`, ties to the lower `pos`, in that order."""
    order = np.lexsort((pos, -sim))[:k]
    return pos[order], sim[order]


def run_search(ds: Dataset, queries: list[Query], cfg: SearchConfig, progress: Progress | None = None) -> SearchResult:
    """Embed the queries (the run's model, unless all are vectors) and search the kept samples."""
    cfg.validate()
    if not queries:
        raise ConfigError("nothing to search for: give --text, --image or --vector (each may repeat)")
    ds.require(("key", "status"), "search")
    ds.need_root("search")
    if not ds.rows:
        raise DatasetError(nothing_kept(ds, "search"))
    score = run_score_config(ds, cfg) if any(q.kind != "vector" for q in queries) else None

    def job(d: Dataset) -> SearchResult:
        from .index import (META_FILE, default_probes, index_dir, load_index, probes_for, rerank, rows_of,
                            search_index)

        has_index = (index_dir(d) / META_FILE).exists()
        for option, value in (("--probes", cfg.probes), ("--rerank", cfg.rerank)):
            if value and not has_index:
                raise ConfigError(f"{option}: {d.path} has no index; `fastlaion index {d.path}` builds one")
        # through the index, only its candidates' embeddings and its hits' shards are read; else
        # every kept sample's, listed before a model loads (or downloads): none is an error
        loaded = load_index(d) if has_index and not cfg.exact else None
        reader = kept_reader(d) if loaded is None else None
        if loaded is None and reader is None:  # before a model loads: a search of nothing is no search
            raise DatasetError(nothing_kept(d, "search"))
        vectors = embed_queries(queries, score)
        used = short = None
        if loaded is not None:
            probes = min(cfg.probes or default_probes(loaded.cells), loaded.cells)
            if cfg.rerank and not loaded.pq:
                log.warning("--rerank is for an index of --pq codes; %s holds float16 vectors, whose cosines are "
                            "exact: nothing to rank again", index_dir(d))
            candidates = loaded.candidates(cfg.k, cfg.rerank)
            found = search_index(loaded, vectors, candidates, probes)
            used = {"cells": loaded.cells, "probes": probes}
            if loaded.pq:  # the codes' cosines are approximate: the candidates ranked by their embeddings
                found = rerank(d, loaded, vectors, found, cfg.k)
                used.update(pq=loaded.pq, reranked=candidates)
            samples, unreadable = loaded.kept_samples, loaded.unreadable_samples
            rows = rows_of(d, loaded, sorted({i for per_query in found for i, _ in per_query}))
            # fewer hits than asked where the index holds more: the cells read held no more; said, not silent
            want = min(cfg.k, loaded.samples)
            few = [q for q, per_query in enumerate(found) if len(per_query) < want]
            if few:
                needed = int(probes_for(loaded, vectors[few], want).max())
                short = {"k": cfg.k, "queries": len(few), "fewest": min(len(found[q]) for q in few),
                         "probes_needed": needed if needed > probes else 0}
        else:
            found = search(reader, vectors, cfg.k, progress)
            samples, unreadable = (reader.rows, reader.unreadable) if reader else (0, 0)
            rows = _rows_at(d, sorted({p for per_query in found for p, _ in per_query}))
        hits = [[Hit(rank=r + 1, similarity=round(s, 6), **rows[p]) for r, (p, s) in enumerate(per_query)]
                for per_query in found]
        return SearchResult(queries=queries, hits=hits, samples=samples, unreadable_samples=unreadable,
                            model=None if score is None else f"{score.model} ({score.pretrained})",
                            skipped_files=[vars(s) for s in d.skipped], index=used, short=short,
                            unfinished=d.unfinished)

    return ds.guarded(job)
