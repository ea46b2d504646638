"""What a dataset holds: the funnel, drops per reason, score histograms, languages, image sizes.

Every figure is a small lazy aggregation over the columns it needs (Parquet is columnar, so a
histogram of `similarity` reads that column and `status`, nothing else); memory does not grow
with the rows. Histograms, languages and sizes count kept samples; the funnel counts every row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl

from ..batch import FUNNEL_LEVELS, STAGES
from .source import DROPPED, KEPT, SAMPLE_FILES, Dataset, collect

# Scores with a known range are binned over it; the others over their observed range.
HIST_COLUMNS = ("similarity", "aesthetic", "aesthetic_v2", "punsafe", "pwatermark")
FIXED_RANGES = {"punsafe": (0.0, 1.0), "pwatermark": (0.0, 1.0)}
# Levels after stages a run does not have (an added `dedup`): named here, others "after <stage>".
EXTRA_LEVELS = {"dedup": "unique"}
SIZE_STEP_PX = 128
SIZE_BINS = 16  # 0..2048 px by 128; larger short sides go to the last bin
SIZE_BUCKETS = ((0, 256, "< 256 px"), (256, 512, "256-511 px"), (512, 1024, "512-1023 px"),
                (1024, None, ">= 1024 px"))  # the last: LAION-High-Resolution
TOP_LANGUAGES = 20


@dataclass
class Histogram:
    column: str
    edges: list[float]          # len(counts) + 1 bin edges
    counts: list[int]
    values: int                 # kept samples with a value
    nulls: int                  # kept samples without one
    mean: float | None
    minimum: float | None
    maximum: float | None
    last_open: bool = False     # the last bin also holds everything above its upper edge


@dataclass
class Level:
    name: str                   # "input", "downloaded", ...
    rows: int
    stage: str | None = None    # the stage whose drops led to this level
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class DatasetStats:
    source: str
    kind: str
    files: int
    skipped_files: list[dict[str, str]]
    rows: int
    kept: int
    funnel: list[Level]
    statuses: dict[str, int]
    histograms: dict[str, Histogram]
    language_groups: dict[str, int]
    languages: list[tuple[str, int]]
    size_buckets: list[tuple[str, int]]
    size_histogram: Histogram | None
    columns: list[str]
    # a run folder's finished shards whose files are not as they were written ({shard, problem},
    # one a problem): missing, or another size than their stats file records; of a subset or dedup
    # of a run, the tars and embeddings of the shards its kept samples are in
    damaged_files: list[dict[str, str]] = field(default_factory=list)
    # the run folder they are in: the dataset's own, or (a subset, a dedup) the run its rows point at
    damaged_root: str | None = None
    # a run not done (Dataset.unfinished: the run folder's own, or the run a subset of it was made
    # from): the figures cover its shards finished then (source_finished_shards), not the run;
    # None: a whole dataset. In the JSON, for a script that never sees the warning on stderr.
    unfinished: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def drops(self) -> list[tuple[str, str, int]]:
        return [(lvl.stage or "", reason, n) for lvl in self.funnel[1:] for reason, n in lvl.reasons.items()]


def compute_stats(ds: Dataset, bins: int = 20) -> DatasetStats:
    stats = ds.guarded(lambda d: _compute(d, bins))
    stats.damaged_files = damaged_files(ds)
    stats.damaged_root = str(ds.root.resolve()) if stats.damaged_files else None
    stats.unfinished = ds.unfinished
    return stats


def damaged_files(ds: Dataset) -> list[dict[str, str]]:
    """For a run folder: every problem with its finished shards' files (the tar, Parquet and
    embeddings their stats file lists, at the sizes it records: writer.problems, the check a
    rerun makes before it writes such a shard again). For a subset or dedup of a run (or one of
    its shard Parquet files): the problems with the tars and embeddings of the run's shards its
    kept samples are in; for a --shards subset, with its own, against its shards.json."""
    whole_run = ds.kind == "run" and ds.path.is_dir()
    found = ds.damage(None, None if whole_run else SAMPLE_FILES)
    return [{"shard": d.shard, "problem": d.problem} for d in found]


def _compute(ds: Dataset, bins: int) -> DatasetStats:
    ds.require(("status", "stage", "reason"), "stats")
    lf = ds.scan()
    columns = lf.collect_schema().names()
    kept = lf.filter(pl.col("status") == KEPT)
    counts = collect(lf.group_by("status", "stage", "reason").agg(pl.len().alias("n")))
    funnel, statuses = _funnel(counts)
    n_kept = statuses.get(KEPT, 0)

    hist_cols = [c for c in HIST_COLUMNS if c in columns]
    histograms = {c: _histogram(kept, c, bins) for c in hist_cols}
    # Was any row CLIP-scored? The column is read again only where the funnel and the kept
    # samples' histogram cannot tell (no kept sample has a similarity).
    # With no rows at all (a subset that matched nothing) the column's presence is all there is
    # to tell: a run writes it exactly when it scores.
    scored = (any(lvl.stage == "score" and lvl.dropped for lvl in funnel)
              or ("similarity" in histograms and histograms["similarity"].values > 0)
              or ("similarity" in columns and not ds.rows)
              or ("similarity" in columns and collect(lf.select(pl.col("similarity").is_not_null().any())).item()))
    if not scored:  # a --no-score run: its score level, which dropped nothing, is no step
        funnel = [lvl for lvl in funnel if lvl.stage != "score"]

    groups: dict[str, int] = {}
    languages: list[tuple[str, int]] = []
    if "language_group" in columns:
        g = collect(kept.group_by("language_group").agg(pl.len().alias("n"))).sort("n", "language_group",
                                                                                  descending=[True, False])
        groups = {str(k): int(n) for k, n in g.iter_rows()}
    if "language" in columns:
        top = collect(kept.group_by("language").agg(pl.len().alias("n")))
        top = top.sort("n", "language", descending=[True, False], nulls_last=True).head(TOP_LANGUAGES)
        languages = [(str(k), int(n)) for k, n in top.iter_rows()]

    buckets: list[tuple[str, int]] = []
    size_hist = None
    if "original_width" in columns and "original_height" in columns:
        side = pl.min_horizontal("original_width", "original_height")
        sized = kept.select(side.alias("side")).filter(pl.col("side").is_not_null())
        by_bin = collect(sized.group_by((pl.col("side") // SIZE_STEP_PX).clip(0, SIZE_BINS - 1).alias("b"))
                         .agg(pl.len().alias("n")))
        per_bin = [0] * SIZE_BINS
        for b, n in by_bin.iter_rows():
            per_bin[int(b)] = int(n)
        agg = collect(kept.select(side.alias("side")).select(
            pl.col("side").count().alias("values"), pl.col("side").null_count().alias("nulls"),
            pl.col("side").mean().alias("mean"), pl.col("side").min().alias("min"), pl.col("side").max().alias("max"),
            *[((pl.col("side") >= lo) & (pl.col("side") < hi if hi else pl.lit(True))).sum().alias(label)
              for lo, hi, label in SIZE_BUCKETS])).row(0, named=True)
        buckets = [(label, int(agg[label] or 0)) for _, _, label in SIZE_BUCKETS]
        size_hist = Histogram("short side (px)", [float(i * SIZE_STEP_PX) for i in range(SIZE_BINS + 1)], per_bin,
                              int(agg["values"]), int(agg["nulls"]), _float(agg["mean"]), _float(agg["min"]),
                              _float(agg["max"]), last_open=True)

    return DatasetStats(source=str(ds.path), kind=ds.kind, files=len(ds.files),
                        skipped_files=[vars(s) for s in ds.skipped], rows=sum(statuses.values()), kept=n_kept,
                        funnel=funnel, statuses=statuses, histograms=histograms, language_groups=groups,
                        languages=languages, size_buckets=buckets, size_histogram=size_hist, columns=columns)


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _funnel(counts: pl.DataFrame) -> tuple[list[Level], dict[str, int]]:
    statuses: dict[str, int] = {}
    drops: dict[str, dict[str, int]] = {}
    for status, stage, reason, n in counts.iter_rows():
        statuses[status] = statuses.get(status, 0) + int(n)
        if status == DROPPED:
            stage, reason = stage or "unknown", reason or "unknown"
            drops.setdefault(stage, {})
            drops[stage][reason] = drops[stage].get(reason, 0) + int(n)
    order = [s for s in STAGES] + sorted(s for s in drops if s not in STAGES)
    total = sum(statuses.values())
    levels = [Level("input", total)]
    left = total
    names = dict(zip(STAGES, FUNNEL_LEVELS))
    extra = [s for s in order if s not in STAGES and s in drops]
    for stage in order:
        if stage not in STAGES and stage not in drops:
            continue
        reasons = dict(sorted(drops.get(stage, {}).items(), key=lambda kv: (-kv[1], kv[0])))
        n = sum(reasons.values())
        left -= n
        name = names.get(stage) or EXTRA_LEVELS.get(stage, f"after {stage}")
        if stage == "filter" and extra:
            name = "filtered"   # "kept" is the last level's name
        levels.append(Level(name, left, stage, n, reasons))
    if extra:
        levels[-1].name = f"kept ({levels[-1].name})"
    return levels, statuses


def _histogram(kept: pl.LazyFrame, column: str, bins: int) -> Histogram:
    x = pl.col(column).cast(pl.Float64)
    valid = kept.select(x.alias("x")).filter(pl.col("x").is_not_null() & pl.col("x").is_not_nan())
    agg = collect(kept.select(x.alias("x")).select(
        pl.col("x").filter(pl.col("x").is_not_nan()).count().alias("values"),
        (pl.col("x").null_count() + pl.col("x").is_nan().sum()).alias("nulls"),
        pl.col("x").filter(pl.col("x").is_not_nan()).mean().alias("mean"),
        pl.col("x").filter(pl.col("x").is_not_nan()).min().alias("min"),
        pl.col("x").filter(pl.col("x").is_not_nan()).max().alias("max"),
    )).row(0, named=True)
    lo, hi = histogram_range(column, agg["min"], agg["max"], bins)
    width = (hi - lo) / bins
    counts = [0] * bins
    if agg["values"]:
        binned = collect(valid.group_by(((pl.col("x") - lo) / width).floor().clip(0, bins - 1).cast(pl.Int64)
                                        .alias("b")).agg(pl.len().alias("n")))
        for b, n in binned.iter_rows():
            counts[int(b)] = int(n)
    edges = [lo + i * width for i in range(bins + 1)]
    return Histogram(column, edges, counts, int(agg["values"]), int(agg["nulls"]), _float(agg["mean"]),
                     _float(agg["min"]), _float(agg["max"]))


def histogram_range(column: str, lo: float | None, hi: float | None, bins: int) -> tuple[float, float]:
    """The range `column`'s histogram spans, from its values' min and max (None: no values):
    the column's usual range (FIXED_RANGES), widened by values outside it, rounded outwards."""
    flo, fhi = FIXED_RANGES.get(column, (lo, hi))
    if flo is None or fhi is None:
        flo, fhi = 0.0, 1.0
    flo, fhi = float(flo), float(fhi)
    if column in FIXED_RANGES and lo is not None:  # a value outside the usual range widens it
        flo, fhi = min(flo, float(lo)), max(fhi, float(hi))
    if not fhi > flo:
        flo, fhi = flo - 0.5, fhi + 0.5
    return _nice(flo, fhi, bins)


def _nice(lo: float, hi: float, bins: int) -> tuple[float, float]:
    """Round the range outwards so bin edges are round numbers (0.02, 0.05, 0.1, 0.25, 0.5 ...);
    where no round step lets `bins` bins cover it (one bin over a range around 0: its edges are
    multiples of the step, so 0 is one of them), the range as it is."""
    raw = (hi - lo) / bins
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10, 20, 25, 50, 100):
        step = m * mag
        if step < raw:
            continue
        lo2 = math.floor(lo / step + 1e-9) * step
        if lo2 + step * bins >= hi - 1e-12:
            return round(lo2, 10), round(lo2 + step * bins, 10)
    return lo, hi  # --bins 1 over similarities from -0.1 to 0.4 ran out of steps: StopIteration


def sample_rows(ds: Dataset, n: int, seed: int = 7) -> pl.DataFrame:
    """n kept samples spread over the dataset (the n smallest hashes of the key: the same n on
    every run of one polars version), sorted by key, with what a thumbnail caption shows."""
    lf = ds.scan()
    have = lf.collect_schema().names()
    extra = [c for c in ("caption", "similarity", "aesthetic", "aesthetic_v2", "punsafe", "original_width",
                         "original_height") if c in have]
    # a null shard: the sample is in none of the dataset's tars (subset --shards), no thumbnail to show
    picked = (lf.filter((pl.col("status") == KEPT) & pl.col("shard").is_not_null()).select("key", "shard", *extra)
              .with_columns(pl.col("key").hash(seed).alias("_h")).bottom_k(n, by="_h"))
    return collect(picked).drop("_h").sort("key")
