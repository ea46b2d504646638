"""Input: URL lists (txt, csv/tsv, jsonl, parquet) read into one frame and cut into shards.

Columns follow img2dataset's meaning: `--url-col` names the image URL, `--caption-col` the alt
text. Every input row becomes exactly one output row (blank lines of a txt file are not rows).
Captions are cleaned here, as LAION did at extraction: control characters removed and text cut
to `max_caption_chars`; the counts of both edits are reported per shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl

from .config import ConfigError, InputConfig, InputFormat

_EXTENSIONS = {
    ".txt": InputFormat.txt, ".csv": InputFormat.csv, ".tsv": InputFormat.tsv,
    ".jsonl": InputFormat.jsonl, ".ndjson": InputFormat.jsonl, ".json": InputFormat.jsonl,
    ".parquet": InputFormat.parquet, ".pq": InputFormat.parquet,
}
# C0 controls except tab/newline/carriage return (those become spaces), DEL and C1 controls.
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
_WHITESPACE = r"[\t\n\r]+"


def detect_format(path: Path, declared: InputFormat) -> InputFormat:
    if declared is not InputFormat.auto:
        return declared
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(_EXTENSIONS))
        raise ConfigError(f"{path}: cannot tell the input format from the extension "
                          f"{path.suffix or '(none)'!r}; use one of {known} or pass --input-format")
    return fmt


def _read_table(path: Path, fmt: InputFormat) -> pl.DataFrame:
    try:
        if fmt is InputFormat.txt:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
            return pl.DataFrame({"url": [ln for ln in lines if ln]}, schema={"url": pl.String})
        if fmt in (InputFormat.csv, InputFormat.tsv):
            return pl.read_csv(path, separator="," if fmt is InputFormat.csv else "\t",
                               infer_schema=False)
        if fmt is InputFormat.jsonl:
            return pl.read_ndjson(path, infer_schema_length=None)
        return pl.read_parquet(path)
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read as {fmt.value}: {first}") from None


def read_input(path: Path, cfg: InputConfig, need_captions: bool) -> pl.DataFrame:
    """One input file as a frame with String columns `url` and `caption` (caption may be null)."""
    if not path.exists():
        raise ConfigError(f"input file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"input is a directory, not a file: {path}")
    fmt = detect_format(path, cfg.input_format)
    table = _read_table(path, fmt)
    if fmt is InputFormat.txt:
        if need_captions:
            raise ConfigError(f"{path}: a txt input holds URLs only, but CLIP scoring needs captions; "
                              "use a csv/tsv/jsonl/parquet input with a caption column, or pass --no-score")
        return table.with_columns(pl.lit(None, dtype=pl.String).alias("caption"))
    columns = table.columns
    if cfg.url_col not in columns:
        raise ConfigError(f"{path}: no URL column {cfg.url_col!r} (columns: {', '.join(columns) or 'none'}); "
                          "pass --url-col NAME")
    if cfg.caption_col is not None and cfg.caption_col in columns:
        caption = pl.col(cfg.caption_col).cast(pl.String)
    elif need_captions:
        raise ConfigError(f"{path}: no caption column {cfg.caption_col!r} (columns: {', '.join(columns)}); "
                          "pass --caption-col NAME, or --no-score to download without CLIP filtering")
    else:
        caption = pl.lit(None, dtype=pl.String)
    try:
        return table.select(pl.col(cfg.url_col).cast(pl.String).alias("url"), caption.alias("caption"))
    except pl.exceptions.PolarsError as e:
        raise ConfigError(f"{path}: cannot read columns {cfg.url_col!r}/{cfg.caption_col!r} as text: "
                          f"{str(e).splitlines()[0]}") from None


def read_inputs(cfg: InputConfig, need_captions: bool) -> pl.DataFrame:
    """All inputs, in the order given, as one frame: url, caption (cleaned), caption_edit."""
    frames = [read_input(Path(p), cfg, need_captions) for p in cfg.paths]
    table = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema={"url": pl.String, "caption": pl.String})
    return clean_captions(table, cfg.max_caption_chars)


def clean_captions(table: pl.DataFrame, max_chars: int) -> pl.DataFrame:
    """Strip control characters, fold tabs/newlines to spaces, trim, cut to `max_chars`.

    Adds `caption_edit`: null, "control_chars", "truncated" or "control_chars+truncated".
    """
    raw = pl.col("caption")
    no_ctl = raw.str.replace_all(_WHITESPACE, " ").str.replace_all(_CONTROL, "").str.strip_chars()
    had_ctl = raw.str.contains(_CONTROL)
    too_long = no_ctl.str.len_chars() > max_chars
    edit = (pl.when(had_ctl & too_long).then(pl.lit("control_chars+truncated"))
            .when(had_ctl).then(pl.lit("control_chars"))
            .when(too_long).then(pl.lit("truncated")))
    return table.with_columns(no_ctl.str.slice(0, max_chars).alias("caption"), edit.alias("caption_edit"))


def shards(table: pl.DataFrame, shard_size: int) -> Iterator[tuple[int, pl.DataFrame]]:
    """(shard id, rows) with a `row` column: the row's index within its shard."""
    for shard_id in range(shard_count(table.height, shard_size)):
        yield shard_id, shard_rows(table, shard_id, shard_size)


def shard_rows(table: pl.DataFrame, shard_id: int, shard_size: int) -> pl.DataFrame:
    """Shard `shard_id`'s rows with a `row` column: the row's index within its shard."""
    part = table.slice(shard_id * shard_size, shard_size)
    return part.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))


def shard_count(n_rows: int, shard_size: int) -> int:
    return -(-n_rows // shard_size)
