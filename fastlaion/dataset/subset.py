"""LAION's derived subsets (LAION.md, "Derived subsets") as recipes, plus free SQL conditions.

A recipe is data: the columns it reads and a Polars expression. A subset is the kept samples
matching the recipe and `--where` (both when both are given), written lazily to
`metadata.parquet`; optionally their samples copied into new webdataset tars (read from the
run's tars, no download) and a URL list to download them again at full size.

With the tars (`--shards`) the subset stands alone: each tar gets its samples' image and text
embeddings beside it (`NNNNN_img_emb.npy`, row j = its j-th sample) and the run's config.json is
copied, so the folder is its own root (source.py) and can be moved or copied without the run. Its
rows' `shard` then names its own tar (null for a row with no sample in them: not kept, or not
found in the run's tars) and `shard_row` the sample's row in that tar's embedding files.

>>> df = pl.DataFrame({"language_group": ["en", "en", "multi"], "similarity": [0.31, 0.2, 0.4]})
>>> df.filter(RECIPES["laion400m"].expression(None)).height
1
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..config import ConfigError, at_least, first_line
from .output import OutputDir
from .samples import export_embeddings, reshard, write_shards_json
from .semantic import row_in_shard
from .source import (KEPT, METADATA_FILE, RUN_CONFIG, SHARD_ROW, SHARDS_FILE, Dataset, DatasetError, NoProgress, Progress,
                     collect, sink_parquet)

log = logging.getLogger(__name__)

URLS_FILE = "urls.parquet"
AESTHETIC_V2_LAION_MINIMA = (4.5, 4.75, 5.0, 6.0, 6.25, 6.5)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str                          # LAION's definition, for --help and errors
    columns: tuple[str, ...]                  # what it reads
    build: Callable[[float | None], pl.Expr]  # the condition, given --min (aesthetic-v2 only)
    needs_min: bool = False

    def expression(self, minimum: float | None) -> pl.Expr:
        return self.build(minimum)


def _aesthetic_v1(threshold: float) -> Callable[[float | None], pl.Expr]:
    return lambda _: (pl.col("pwatermark") < 0.8) & (pl.col("punsafe") < 0.5) & (pl.col("aesthetic") > threshold)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("en", "LAION-2B-en: captions identified as English (language_group = en)",
           ("language_group",), lambda _: pl.col("language_group") == "en"),
    Recipe("multi", "LAION-2B-multi: captions in another identified language (language_group = multi)",
           ("language_group",), lambda _: pl.col("language_group") == "multi"),
    Recipe("nolang", "LAION-1B-nolang: captions with no reliable language (language_group = nolang)",
           ("language_group",), lambda _: pl.col("language_group") == "nolang"),
    Recipe("laion400m", "LAION-400M style: English and similarity >= 0.3 (LAION scored with OpenAI ViT-B/32)",
           ("language_group", "similarity"),
           lambda _: (pl.col("language_group") == "en") & (pl.col("similarity") >= 0.3)),
    Recipe("high-res", "LAION-High-Resolution: original width >= 1024 and height >= 1024",
           ("original_width", "original_height"),
           lambda _: (pl.col("original_width") >= 1024) & (pl.col("original_height") >= 1024)),
    Recipe("aesthetic-v1", "LAION-Aesthetics V1: pwatermark < 0.8, punsafe < 0.5, aesthetic > 7",
           ("pwatermark", "punsafe", "aesthetic"), _aesthetic_v1(7.0)),
    Recipe("art", "LAION-Art: pwatermark < 0.8, punsafe < 0.5, aesthetic > 8",
           ("pwatermark", "punsafe", "aesthetic"), _aesthetic_v1(8.0)),
    Recipe("aesthetic-v2", "LAION-Aesthetics V2 (English): aesthetic_v2 >= --min "
           f"(LAION's: {', '.join(f'{m:g}' for m in AESTHETIC_V2_LAION_MINIMA)})",
           ("language_group", "aesthetic_v2"),
           lambda m: (pl.col("language_group") == "en") & (pl.col("aesthetic_v2") >= m), needs_min=True),
)}


def known_recipes() -> str:
    return ", ".join(RECIPES)


@dataclass(frozen=True)
class SubsetConfig:
    recipe: str | None = None        # a name in RECIPES, or None for --where alone
    minimum: float | None = None     # aesthetic-v2's threshold (--min)
    where: str | None = None         # SQL condition over the columns (--where)
    include_dropped: bool = False    # select among every row, not only kept samples
    shards: bool = False             # also copy the samples into new tars
    shard_size: int = 10_000         # samples per new tar
    urls: bool = False               # also write urls.parquet (url, caption, key)

    def validate(self) -> None:
        if self.recipe is None and not self.where:
            raise ConfigError(f"name a recipe ({known_recipes()}) or give --where, or both")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; known recipes: {known_recipes()}")
        recipe = RECIPES.get(self.recipe or "")
        if recipe is not None and recipe.needs_min and self.minimum is None:
            raise ConfigError(f"{self.recipe} needs --min (LAION's thresholds: "
                              f"{', '.join(f'{m:g}' for m in AESTHETIC_V2_LAION_MINIMA)})")
        if self.minimum is not None and (recipe is None or not recipe.needs_min):
            raise ConfigError("--min applies to the aesthetic-v2 recipe only")
        if self.minimum is not None and not 0 <= self.minimum <= 10:
            raise ConfigError(f"--min must be between 0 and 10, got {self.minimum}")
        at_least("--shard-size", self.shard_size, 1)
        if not self.shards and self.shard_size != SubsetConfig.shard_size:  # was ignored
            raise ConfigError("--shard-size applies to --shards only (the samples per new tar)")


@dataclass
class SubsetResult:
    output: str
    condition: str
    rows: int                 # rows in the source
    considered: int           # rows the condition was applied to (kept samples, or all rows)
    selected: int             # rows written
    skipped_files: list[dict[str, str]]
    tars: int = 0
    samples_exported: int = 0
    samples_missing: int = 0
    rows_not_exported: int = 0  # with --shards: selected rows that are no kept sample (--include-dropped)
    embeddings_missing: int = 0  # with --shards: samples in the tars without an image embedding
    # with --shards: the run's files of these samples not as the run wrote them ({shard, problem}),
    # read as missing ones (Dataset.damage)
    damaged_files: list[dict[str, str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def parse_where(where: str, schema: pl.Schema | dict[str, Any]) -> pl.Expr:
    """Parse a SQL condition (`similarity >= 0.3 AND caption ILIKE '%cat%'`) into a Polars
    expression with pl.sql_expr (a parser, not eval: it cannot run code), and check that it names
    only existing columns and yields true/false."""
    try:
        expr = pl.sql_expr(where)
    except Exception as e:  # polars raises SQLSyntaxError, SQLInterfaceError or ComputeError here
        raise ConfigError(f"--where: cannot parse {where!r}: {first_line(e)}") from None
    names = list(schema)
    unknown = [c for c in expr.meta.root_names() if c not in names]
    if unknown:
        raise ConfigError(f"--where names unknown column(s) {', '.join(map(repr, unknown))}; columns are: "
                          f"{', '.join(names)}")
    try:
        dtype = pl.LazyFrame(schema=schema).select(expr.alias("_cond")).collect_schema()["_cond"]
        # some type errors only when it is computed (comparing a string with a number: "caption >
        # 3", "status = 1" passed the schema and raised from the subset's scan, a traceback)
        pl.LazyFrame(schema=schema).select(expr.alias("_cond")).collect()
    except Exception as e:  # type errors surface here (e.g. comparing a string with a number)
        raise ConfigError(f"--where: {where!r} does not apply to these columns: {first_line(e)}") from None
    if dtype != pl.Boolean:
        raise ConfigError(f"--where must be a condition (true/false), but {where!r} gives {dtype}")
    return expr


def condition(ds: Dataset, cfg: SubsetConfig) -> tuple[pl.Expr, str]:
    """The selection as one expression, and a readable description of it."""
    cfg.validate()
    parts: list[pl.Expr] = []
    text: list[str] = []
    if cfg.recipe:
        recipe = RECIPES[cfg.recipe]
        ds.require(recipe.columns, f"recipe {recipe.name} ({recipe.description})")
        if recipe.name == "laion400m":
            _warn_unless_laions_model(ds)
        parts.append(recipe.expression(cfg.minimum))
        text.append(cfg.recipe + (f" --min {cfg.minimum:g}" if cfg.minimum is not None else ""))
    if cfg.where:
        parts.append(parse_where(cfg.where, ds.scan().collect_schema()))
        text.append(f"--where {cfg.where!r}")
    expr = parts[0]
    for p in parts[1:]:
        expr = expr & p
    return expr, " and ".join(text)


# The model whose similarities LAION-400M's 0.3 is a cut of: OpenAI's ViT-B/32 (open_clip's names)
LAION_400M_MODELS = ("ViT-B-32", "ViT-B-32-quickgelu")
LAION_400M_PRETRAINED = "openai"


def _warn_unless_laions_model(ds: Dataset) -> None:
    """One warning where the run was scored by another model than OpenAI's ViT-B/32 (its
    config.json says so): laion400m's `similarity >= 0.3` is a cut of that model's similarities,
    and another model's sit elsewhere (LAION's own ViT-B/32 weights, ViT-L/14: other scales), so
    the subset is no LAION-400M-style selection. Nothing said where config.json is missing or
    unreadable, or names a checkpoint file (which may be OpenAI's)."""
    try:
        score = json.loads((ds.root / RUN_CONFIG).read_text()).get("score")
        model, pretrained = score.get("model"), score.get("pretrained")
    except (OSError, ValueError, AttributeError):
        return
    if not (isinstance(model, str) and isinstance(pretrained, str)) or os.sep in pretrained or pretrained.endswith(".pt"):
        return
    if model not in LAION_400M_MODELS or pretrained != LAION_400M_PRETRAINED:
        log.warning("recipe laion400m: LAION's similarity >= 0.3 is a cut of OpenAI ViT-B/32's similarities; %s was "
                    "scored with %s (%s), whose similarities sit elsewhere, so this is no LAION-400M-style selection "
                    "(give that model's own cut with --where on language_group and similarity)",
                    ds.root, model, pretrained)


def subset(ds: Dataset, out: Path, cfg: SubsetConfig, progress: Progress | None = None,
           written: Callable[[Path], None] | None = None) -> SubsetResult:
    """Write `out/metadata.parquet` (the matching rows, every column), `out/dataset.json`, and with
    cfg.shards `out/NNNNN.tar` + `shards.json`, with cfg.urls `out/urls.parquet`. `written(out)` is
    called once they are whole in place (OutputDir)."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    expr, text = condition(ds, cfg)
    if cfg.shards:
        ds.need_root("subset --shards")
    target = OutputDir(out, ds, written, "subset")

    def job(d: Dataset) -> SubsetResult:
        pool = d.scan() if cfg.include_dropped else d.scan().filter(pl.col("status") == KEPT)
        chosen = pool.filter(expr)
        meta = target.path(METADATA_FILE)
        sink_parquet(chosen, meta)
        considered = d.rows if cfg.include_dropped else int(collect(pool.select(pl.len())).item())
        selected = int(collect(pl.scan_parquet(meta, glob=False).select(pl.len())).item())
        return SubsetResult(output=str(out), condition=text, rows=d.rows, considered=considered, selected=selected,
                            skipped_files=[vars(s) for s in d.skipped], files=[METADATA_FILE])

    with target.building():
        try:
            result = ds.guarded(job)
        except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError) as e:
            if not cfg.where:  # (guarded has ruled out an unreadable file)
                raise
            # what only the data can refuse ("CAST(caption AS INTEGER) > 3"), a traceback until then
            raise ConfigError(f"--where {cfg.where!r} could not be computed on the data: {first_line(e)}") from None
        meta = pl.scan_parquet(target.path(METADATA_FILE), glob=False)
        if cfg.urls:
            sink_parquet(meta.select("url", "caption", "key"), target.path(URLS_FILE))
            result.files.append(URLS_FILE)
        if cfg.shards:
            _export(ds, target, result, cfg.shard_size, progress)
        target.finish("subset", result, started, own_root=cfg.shards)
    return result


def _export(ds: Dataset, target: OutputDir, result: SubsetResult, shard_size: int, progress: Progress) -> None:
    """Copy the subset's kept samples into new tars with their embeddings, the run's config.json
    beside them, and point the subset's rows at them (`shard`, `shard_row`): the folder becomes
    its own root."""
    meta_path = target.path(METADATA_FILE)
    meta = pl.scan_parquet(meta_path, glob=False).with_row_index("_r")
    rows = collect(meta.filter(pl.col("status") == KEPT)
                   .select("_r", "key", "shard", row_in_shard(meta.collect_schema().names()).alias("_row")))
    result.rows_not_exported = result.selected - rows.height  # tars hold kept samples only
    damaged = ds.damage(rows["shard"])
    result.damaged_files = [{"shard": d.shard, "problem": d.problem} for d in damaged]
    ds = ds.with_damage(damaged)
    written = reshard(ds, rows, target.tmp, shard_size, progress)
    result.tars, result.samples_exported = len(written.tars), written.samples
    result.samples_missing = written.missing
    result.files += [t["tar"] for t in written.tars] + [SHARDS_FILE]

    picked = rows[written.positions]
    result.embeddings_missing = export_embeddings(ds, picked["shard"], picked["_row"].fill_null(-1).to_numpy(),
                                                  written, target.tmp, progress)
    result.files += [p.name for p in sorted(target.tmp.glob("*_emb.npy"))]
    write_shards_json(target.path(SHARDS_FILE), written)  # after the embeddings: it records every file's size
    config = ds.root / RUN_CONFIG
    if config.is_file():
        shutil.copyfile(config, target.path(RUN_CONFIG))
        result.files.append(RUN_CONFIG)

    # each exported row: its tar's name and its row there; the others: no shard
    stems = [t["tar"].removesuffix(".tar") for t in written.tars]
    counts = [t["samples"] for t in written.tars]
    placed = pl.DataFrame({
        "_r": picked["_r"],
        "_shard": pl.Series(stems, dtype=pl.String).gather(np.repeat(np.arange(len(stems)), counts)),
        "_shard_row": np.concatenate([np.arange(n, dtype=np.int64) for n in counts]) if counts
        else np.zeros(0, np.int64),
    })
    lf = meta.join(placed.lazy(), on="_r", how="left", maintain_order="left")
    lf = lf.with_columns(pl.col("_shard").alias("shard"), pl.col("_shard_row").alias(SHARD_ROW)).drop(
        "_r", "_shard", "_shard_row")
    rewritten = meta_path.with_name(METADATA_FILE + ".new")
    sink_parquet(lf, rewritten)
    os.replace(rewritten, meta_path)


__all__ = ["RECIPES", "Recipe", "SubsetConfig", "SubsetResult", "subset", "parse_where", "DatasetError"]
