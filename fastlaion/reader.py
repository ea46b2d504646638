"""Input: URL lists (txt, csv/tsv, jsonl, parquet), checked up front, then streamed once into
Arrow IPC files from which each shard reads its own rows.

Columns follow img2dataset's meaning: `--url-col` names the image URL, `--caption-col` the alt
text. Every input row becomes exactly one output row (blank lines of a txt, csv or tsv file are
not rows, as for Python's csv module, pandas and pyarrow, which img2dataset reads with).
Captions are cleaned here, as LAION did at extraction: control characters removed and text cut
to `max_caption_chars`; the counts of both edits are reported per shard.

No process ever holds the whole input (a 100M-row LAION parquet is ~23 GB as one frame).
`open_inputs` only reads what it needs to check the inputs (schemas, column names), so every
input problem is reported before the output folder is touched; `write_rows` then passes the rows
through, cleaning them, into IPC files in the output folder, and `InputRows.shard` reads back one
shard's rows. Parquet, the format of large URL lists (LAION's metadata, our own candidates), and
txt are read a slice at a time, one IPC file per slice, so memory stays at one slice whatever the
input; csv and jsonl go through Polars' streaming engine (one IPC file per input), whose buffers
level off (at a few hundred MB on two cores) instead of growing with the input.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import itertools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, TypeVar

import polars as pl

from .config import ConfigError, InputConfig, InputFormat, first_line, polars_io

_EXTENSIONS = {
    ".txt": InputFormat.txt, ".csv": InputFormat.csv, ".tsv": InputFormat.tsv,
    ".jsonl": InputFormat.jsonl, ".ndjson": InputFormat.jsonl, ".json": InputFormat.jsonl,
    ".parquet": InputFormat.parquet, ".pq": InputFormat.parquet,
}
# C0 controls except tab/newline/carriage return (those become spaces), DEL and C1 controls.
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
_WHITESPACE = r"[\t\n\r]+"
# Rows per slice of a parquet input (~25 MB of LAION rows), and characters per block of a txt
# input (~80k URLs): the most of an input held at once, and the size of one rows file.
SLICE_ROWS = 100_000
TXT_BLOCK_CHARS = 8 << 20
# Where str.splitlines ends a line: a txt block ending in one of these ends its last line.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_ROWS_COMPRESSION = "zstd"
# An input's column that says the row is a blank line (csv/tsv), dropped before the rows are written.
_BLANK = "__fastlaion_blank"
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, which orjson refuses
_TAB_ON_A_LATER_LINE = re.compile(r"[\r\n][^\r\n]*\t")  # in one tsv field: a line of the file taken into it

_Frame = TypeVar("_Frame", pl.DataFrame, pl.LazyFrame)
_DEFAULT_CAPTION_COL = InputConfig.caption_col
log = logging.getLogger(__name__)


def detect_format(path: Path, declared: InputFormat) -> InputFormat:
    """The format named by `declared`, else by the file's extension; a gzipped text format's
    (urls.csv.gz, img2dataset's tsv.gz) by the extension before .gz."""
    if declared is not InputFormat.auto:
        return declared
    suffix = path.suffix.lower()
    gzipped = suffix == ".gz"
    if gzipped:
        suffix = Path(path.stem).suffix.lower()
    fmt = _EXTENSIONS.get(suffix)
    if fmt is None or (gzipped and fmt is InputFormat.parquet):
        known = ", ".join(sorted(_EXTENSIONS))
        raise ConfigError(f"{path}: cannot tell the input format from the extension "
                          f"{''.join(path.suffixes[-2:]) if gzipped else path.suffix or '(none)'!r}; use one of "
                          f"{known} (the text ones also gzipped: .csv.gz, ...) or pass --input-format")
    return fmt


@dataclass(frozen=True)
class Input:
    """One input file, checked. `table`: a lazy query of its `url` and `caption` (String, the
    caption null without a caption column), and for a csv/tsv whether the row is a blank line
    (`_BLANK`); None for a txt file, which is read by lines. `unquoted`, for a tsv: the same
    query with `"` read as text, for a file whose quotes do not parse as quoting (`write_rows`).
    `json_caption`, for a jsonl/json input read with captions: their key (`_note_json_captions`)."""

    path: Path
    fmt: InputFormat
    table: pl.LazyFrame | None
    unquoted: pl.LazyFrame | None = None
    json_caption: str | None = None


def open_input(path: Path, cfg: InputConfig, need_captions: bool) -> Input:
    """Check one input file: it exists, its format, its columns. Reads no more than its schema
    (a jsonl file is read through once to infer it, as a full read would)."""
    if not path.exists():
        raise ConfigError(f"input file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"input is a directory, not a file: {path}")
    fmt = detect_format(path, cfg.input_format)
    if fmt is InputFormat.txt:
        if need_captions:
            raise ConfigError(f"{path}: a txt input holds URLs only, but CLIP scoring needs captions; "
                              "use a csv/tsv/jsonl/parquet input with a caption column, or pass --no-score")
        try:
            path.open("rb").close()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read as {fmt.value}: {first_line(e)}") from None
        return Input(path, fmt, None)
    if not path.is_file():  # `run <(cat urls.csv)`: Polars said "No such device (os error 19)"
        raise ConfigError(f"{path}: not a regular file (a pipe?): a {fmt.value} input is read more than once "
                          "(its columns checked, then its rows); save it to a file first (a txt input may be a pipe)")
    try:
        if fmt is not InputFormat.parquet and _first_character(path) == b"":  # Polars: "empty CSV", ...
            return Input(path, fmt, pl.LazyFrame(schema={"url": pl.String, "caption": pl.String}))
        if fmt is InputFormat.jsonl:
            table, columns = _scan_json(path, (cfg.url_col, cfg.caption_col))
        else:
            table = _scan(path, fmt)
            columns = table.collect_schema().names()
        schema = table.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise _unreadable(path, fmt, e) from None
    if not columns and fmt is InputFormat.jsonl and _json_array(path):  # [] : no rows, as an empty file
        return Input(path, fmt, pl.LazyFrame(schema={"url": pl.String, "caption": pl.String}))
    if fmt in (InputFormat.csv, InputFormat.tsv) and any(_binary(name) for name in columns):
        # a Parquet (or an image) read as csv: the "column names" were its bytes, in 17 lines of garbage
        raise ConfigError(f"{path}: cannot read as {fmt.value}: its first line is not text (a binary file? "
                          f"--input-format picks the format)")
    for name in (cfg.url_col, cfg.caption_col):  # Polars reads a csv header's second `url` as url_duplicated_0
        if name is not None and f"{name}_duplicated_0" in columns and fmt in (InputFormat.csv, InputFormat.tsv):
            raise ConfigError(f"{path}: its header names the column {name!r} more than once: which one to read "
                              f"is not clear; rename the others")
    if cfg.url_col not in columns:
        raise ConfigError(f"{path}: no URL column {cfg.url_col!r} (columns: {', '.join(columns) or 'none'}); "
                          "pass --url-col NAME")
    if cfg.caption_col is not None and cfg.caption_col in columns:
        caption = pl.col(cfg.caption_col).cast(pl.String)
        text_columns = (cfg.url_col, cfg.caption_col)
    elif need_captions:
        raise ConfigError(f"{path}: no caption column {cfg.caption_col!r} (columns: {', '.join(columns)}); "
                          "pass --caption-col NAME, or --no-score to download without CLIP filtering")
    elif cfg.caption_col not in (None, _DEFAULT_CAPTION_COL):
        # Named by the user (a typo, the wrong case): without it every sample's .txt would be empty,
        # silently. The default name may be absent: a URL list without captions, --no-score.
        raise ConfigError(f"{path}: no caption column {cfg.caption_col!r} (columns: {', '.join(columns)}); "
                          "pass --caption-col NAME, or leave it out to download without captions")
    else:
        caption = pl.lit(None, dtype=pl.String)
        text_columns = (cfg.url_col,)
    for name in text_columns:
        if schema[name].is_nested():
            raise ConfigError(f"{path}: cannot read columns {cfg.url_col!r}/{cfg.caption_col!r} as text: "
                              f"{name!r} holds {schema[name]}")
    columns = [pl.col(cfg.url_col).cast(pl.String).alias("url"), caption.alias("caption")]
    if fmt in (InputFormat.csv, InputFormat.tsv):
        # A blank line reads as a row of nulls (Polars keeps it), as does a line of separators
        # only: no row of the file, flagged (write_rows drops it). A row with data in any column is kept.
        columns.append(pl.all_horizontal(pl.all().is_null()).alias(_BLANK))
    unquoted = _scan(path, fmt, quoted=False).select(columns) if fmt is InputFormat.tsv else None
    json_caption = cfg.caption_col if fmt is InputFormat.jsonl and len(text_columns) == 2 else None
    return Input(path, fmt, table.select(columns), unquoted, json_caption)


def _binary(text: str) -> bool:
    """Whether text read from a file was bytes that are no text: a control character (a tab and a
    line end aside) or what undecodable UTF-8 became (U+FFFD)."""
    return any(c == "\ufffd" or (c < " " and c not in "\t\r\n") or c == "\x7f" for c in text)


def open_inputs(cfg: InputConfig, need_captions: bool) -> list[Input]:
    """Every input, in the order given, checked (see `open_input`)."""
    return [open_input(Path(p), cfg, need_captions) for p in cfg.paths]


def _scan(path: Path, fmt: InputFormat, quoted: bool = True) -> pl.LazyFrame:
    # Polars expands * ? [ in paths: escaped, a file named urls[1].csv is read as itself.
    source = glob.escape(str(path))
    if fmt in (InputFormat.csv, InputFormat.tsv):
        return pl.scan_csv(source, separator="," if fmt is InputFormat.csv else "\t", infer_schema=False,
                           quote_char='"' if quoted else None)
    return pl.scan_parquet(source)  # a jsonl: _scan_json


def _scan_json(path: Path, text_columns: tuple[str | None, ...]) -> tuple[pl.LazyFrame, list[str]]:
    """A jsonl file (or JSON array) with its `text_columns` (url, caption) read as text whatever
    each line holds, the same in any order of lines: a number or a boolean as its JSON text
    (`123`, `1.5`, `true`), a list or an object as its JSON text (`["a", "b"]`), null as null;
    and the file's column names. Polars' inferred types depended on the order: a number then a
    list stopped the run ("failed to determine supertype of struct[2] and struct[2]", even in a
    column not read), null then a list was refused, a string then a list read as its JSON text.
    img2dataset (pandas) makes a number caption its text too; no row is lost. Ordinary input
    costs what it did: the names come from the inference pass Polars made anyway; only where
    that fails is the file read once more, in Python, for its keys."""
    source = glob.escape(str(path))
    array = _json_array(path)
    data = b""
    try:
        if array:  # img2dataset's json input (pandas.read_json): read whole, as pandas does
            with path.open("rb") as raw, _decompressed(raw) as f:
                data = f.read()
            table = pl.read_json(data, infer_schema_length=None).lazy()
        else:
            table = pl.scan_ndjson(source, infer_schema_length=None)
        schema = table.collect_schema()
        columns = schema.names()
    except pl.exceptions.PolarsError:
        # types that do not merge across lines: the keys alone, from a pass of our own (None: a
        # line that is no JSON object, which the error, re-raised, names)
        found = _json_keys(path, data if array else None)
        if found is None:
            raise
        schema, columns = None, found
    text = {name: pl.String for name in text_columns if name is not None and name in columns}
    if not array:
        return pl.scan_ndjson(source, schema=text), columns
    if schema is not None and all(schema[name] == pl.String for name in text):
        return table, columns  # text already: the common case, read once
    try:  # read again as text: the inferred types may have changed values (true in a column of numbers: 1)
        return pl.read_json(data, schema=text).lazy(), columns
    except pl.exceptions.PolarsError:  # a list or an object in one: as its JSON text, as a jsonl line's is read
        import orjson

        lines = b"\n".join(map(orjson.dumps, orjson.loads(_without_bom(data))))
        return pl.read_ndjson(io.BytesIO(lines), schema=text).lazy(), columns


def _json_keys(path: Path, array: bytes | None) -> list[str] | None:
    """Every key of a jsonl file's objects (or a JSON array's, given as `array`), in order of
    first appearance; None where a line (an item) is no JSON object."""
    import orjson

    keys: dict[str, None] = {}
    try:
        for _, item in _json_items(path, array):
            if not isinstance(item, dict):
                return None
            keys.update(dict.fromkeys(item))
    except (orjson.JSONDecodeError, OSError, EOFError):
        return None
    return list(keys)


def _json_items(path: Path, array: bytes | None = None) -> Iterator[tuple[str, object]]:
    """Each value of a jsonl file's lines, or each item of a JSON array file (`array`: its bytes
    where already read), with where it stands ("line 4", "item 4 of the array"); a leading
    byte-order mark skipped. Raises orjson.JSONDecodeError at the first that is not JSON."""
    import orjson

    if array is None and _json_array(path):
        with path.open("rb") as raw, _decompressed(raw) as f:
            array = f.read()
    if array is not None:
        items = orjson.loads(_without_bom(array))
        yield from ((f"item {n:,} of the array", item)
                    for n, item in enumerate(items if isinstance(items, list) else [items], 1))
        return
    with path.open("rb") as raw, _decompressed(raw) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"line {n:,}", orjson.loads(_without_bom(line) if n == 1 else line)


def _json_array(path: Path) -> bool:
    """Whether a json/jsonl file holds one JSON array (its first character is '['), not a JSON
    object a line."""
    return _first_character(path) == b"["


def _without_bom(data: bytes) -> bytes:
    """A JSON array's bytes (or a jsonl's first line) less a leading byte-order mark, which Polars reads past and orjson
    refuses (a list caption in such a file was "not JSON", a number caption read)."""
    return data.removeprefix(_BOM)


def _first_character(path: Path) -> bytes:
    """A text file's first byte past white space and a byte-order mark (gunzipped); b"" when it
    has none: an empty file, or one of blank lines only."""
    try:
        with path.open("rb") as raw, _decompressed(raw) as f:
            while chunk := f.read(1 << 16):
                if text := chunk.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n"):
                    return text[:1]
    except EOFError:  # a gzip file cut short: Polars' read says so
        return b"?"
    return b""


@dataclass(frozen=True)
class InputRows:
    """The run's input rows, in order, cleaned (`url`, `caption`, `caption_edit`): `heights[i]`
    of them in the Arrow IPC file `parts[i]`. Small enough to hand to worker processes."""

    parts: tuple[str, ...]
    heights: tuple[int, ...]

    @cached_property
    def height(self) -> int:
        return sum(self.heights)

    def shard(self, shard_id: int, shard_size: int) -> pl.DataFrame:
        """Shard `shard_id`'s rows with a `row` column: the row's index within its shard. Reads
        only the files that hold them, and of those only these rows (Polars 1.20 and before read
        the whole file, which for a csv or jsonl input is all its rows)."""
        start, stop = shard_id * shard_size, min((shard_id + 1) * shard_size, self.height)
        frames = []
        first = 0  # index of the first row of the file
        for part, n in zip(self.parts, self.heights):
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                frames.append(pl.scan_ipc(glob.escape(part)).slice(lo - first, hi - lo).collect())
            first += n
        return pl.concat(frames).with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))


def write_rows(inputs: list[Input], folder: Path, max_caption_chars: int,
               on_rows: Callable[[int], None] | None = None, *, blank_lines_are_rows: bool = False) -> InputRows:
    """Pass every input's rows, captions cleaned, into IPC files under `folder` (created);
    `on_rows(n)` is told each time n more rows are written (a progress bar's feed).
    `blank_lines_are_rows`: a csv/tsv file's blank lines are rows (of no URL), as fastlaion before
    INPUT_BUILD 2 read them; a run it began is resumed so, or its shards' rows would shift.

    An input that turns out unreadable past its schema (a broken row, text that is not UTF-8,
    a column that cannot be read as text) raises `ConfigError` naming it; nothing has been
    downloaded by then.
    """
    folder.mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    heights: list[int] = []

    def next_part() -> str:
        parts.append(str(folder / f"{len(parts):05d}.arrow"))
        return parts[-1]

    def add(rows: pl.DataFrame) -> None:
        part = next_part()
        with polars_io(part):
            rows.write_ipc(part, compression=_ROWS_COMPRESSION)
        counted(rows.height)

    def counted(n: int) -> None:
        heights.append(n)
        if on_rows is not None:
            on_rows(n)

    for inp in inputs:
        try:
            if inp.table is None:  # URLs alone: no caption to clean
                no_text = pl.lit(None, dtype=pl.String)
                for urls in _txt_blocks(inp.path):
                    add(pl.DataFrame({"url": urls}, schema={"url": pl.String})
                        .with_columns(no_text.alias("caption"), no_text.alias("caption_edit")))
                continue
            table = _rows_of(inp.table, blank_lines_are_rows)
            if inp.fmt is InputFormat.parquet:
                # Cleaned lazily: Polars computes what the caption and its edit share once. Sliced
                # until a short slice, not up to a row count: Polars 1.x counts this query by
                # reading every row.
                cleaned = clean_captions(table, max_caption_chars)
                for offset in itertools.count(0, SLICE_ROWS):
                    rows = cleaned.slice(offset, SLICE_ROWS).collect()
                    if rows.height:
                        add(rows)
                    if rows.height < SLICE_ROWS:
                        break
            else:
                part = next_part()
                try:
                    _sink_ipc(clean_captions(table, max_caption_chars), part)
                    where = _quote_spanning_lines(inp.path) if inp.unquoted is not None else None
                except pl.exceptions.PolarsError:
                    if inp.unquoted is None:
                        raise
                    where = _first_bad_line(inp.path, inp.fmt) or "its quotes do not parse"
                if where is not None:
                    _write_unquoted(inp, _rows_of(inp.unquoted, blank_lines_are_rows), max_caption_chars, part, where)
                if inp.json_caption is not None:
                    _note_json_captions(inp.path, inp.json_caption, part)
                counted(pl.scan_ipc(glob.escape(part)).select(pl.len()).collect().item())
        except pl.exceptions.PolarsError as e:
            raise _unreadable(inp.path, inp.fmt, e) from None
    return InputRows(tuple(parts), tuple(heights))


def _quote_spanning_lines(path: Path) -> str | None:
    """For a tsv that parsed with quoting: "line N: ..." where a quoted field runs over a line end
    and holds a tab on a later line: the next lines' columns taken into one field; else None.
    A caption with a line break that a tsv quotes (pandas and Polars do) has no tab past it but
    in the rarest text. Not seen: a field running on over one line only, when it holds no tab
    there (a caption-first file's `"Best shoes` closed by the next line's caption). Only a file
    with a field that starts with a quote is read again (Python's csv)."""
    if not _a_field_starts_with_a_quote(path):
        return None
    limit = csv.field_size_limit(1 << 62)
    try:
        with path.open("rb") as raw, _decompressed(raw) as f:
            rows = csv.reader(_utf8_lines(f), delimiter="\t")
            while True:
                start = rows.line_num + 1
                row = next(rows, None)
                if row is None:
                    return None
                if any(_TAB_ON_A_LATER_LINE.search(v) for v in row):
                    return (f"line {start}: a field that starts with a quote runs on to line {rows.line_num}, "
                            "taking the lines between into it")
    except (OSError, EOFError, ValueError, csv.Error):  # _NotUtf8 is a ValueError; Polars read it, so did this
        return None
    finally:
        csv.field_size_limit(limit)


def _a_field_starts_with_a_quote(path: Path) -> bool:
    """Whether a tab-separated file has a `"` at the start of a field (after a tab or a line
    break, or first in the file): without one, quoting is not in play. One pass over the bytes."""
    with path.open("rb") as raw, _decompressed(raw) as f:
        last = b"\n"
        while chunk := f.read(1 << 22):
            if (chunk[:1] == b'"' and last in b"\t\r\n") or any(m in chunk for m in (b'\t"', b'\n"', b'\r"')):
                return True
            last = chunk[-1:]
    return False


def _rows_of(table: pl.LazyFrame, blank_lines_are_rows: bool) -> pl.LazyFrame:
    """An input's query less its blank lines (csv/tsv), and less the flag that marks them."""
    if _BLANK not in table.collect_schema():
        return table
    return (table if blank_lines_are_rows else table.filter(~pl.col(_BLANK))).drop(_BLANK)


def _write_unquoted(inp: Input, table: pl.LazyFrame, max_caption_chars: int, part: str, where: str) -> None:
    """A tsv whose quotes are no quoting, read again with them as text (into `part`), as
    tab-separated text usually is and img2dataset's reader read it too (it dropped such a
    caption's quotes); `where` says what showed it. A caption that starts with a quote either
    did not parse (`"Best" shoes`: the whole run stopped) or, with no other quote on its line,
    opened a field that ran on over the next lines, up to the next field ending in one
    (`_quote_spanning_lines`): the rows between were lost, silently. A tsv that quotes properly
    (pandas' or Polars' to_csv with a tab) never gets here."""
    try:
        _sink_ipc(clean_captions(table, max_caption_chars), part)
    except pl.exceptions.PolarsError as e:
        raise _unreadable(inp.path, inp.fmt, e, quoted=False) from None
    log.warning("%s: %s: read without quoting, as tab-separated text usually is (its quotes are part of "
                "the text)", inp.path, where)


def _note_json_captions(path: Path, key: str, part: str) -> None:
    """Warn once for a jsonl/json input whose captions (`key`) hold lists or objects, naming the
    file, how many and the first: each is read as its JSON text (`["a", "b"]`), as a number is,
    and CLIP scores that text, brackets and quotes included, where a list is likelier several
    captions meant for one image (it was kept so, silently). `part`: the rows file the input was
    written to. Ordinary input costs a look at its captions there; only one that is the JSON text
    of a list or an object (or starts with [ or { and was cut to --max-caption-chars) has the
    file read again, in Python, for the count and the first line."""
    import orjson

    bracketed = (pl.scan_ipc(glob.escape(part)).select("caption", "caption_edit")
                 .filter(pl.col("caption").str.starts_with("[") | pl.col("caption").str.starts_with("{"))
                 .collect())

    def json_text(caption: str, edit: str | None) -> bool:
        if edit is not None and "truncated" in edit:
            return True
        try:
            return isinstance(orjson.loads(caption), (list, dict))
        except orjson.JSONDecodeError:
            return False

    if not any(json_text(c, e) for c, e in bracketed.iter_rows()):
        return
    try:
        found = [where for where, item in _json_items(path)
                 if isinstance(item, dict) and isinstance(item.get(key), (list, dict))]
    except (orjson.JSONDecodeError, OSError, EOFError):  # Polars read it: not expected, and only a warning lost
        return
    if found:
        log.warning("%s: %s row%s hold%s a list or an object as caption (the first: %s): the caption is its JSON "
                    "text, as [\"a\", \"b\"], brackets and quotes included; give each row one caption, a string",
                    path, f"{len(found):,}", "s" * (len(found) != 1), "s" * (len(found) == 1), found[0])


def _decompressed(raw: io.BufferedReader) -> BinaryIO:
    """A file's bytes, gunzipped when it is gzip's (a urls.txt.gz; Polars decompresses the
    csv/tsv/jsonl it reads itself). Closing it leaves `raw` open."""
    if raw.peek(2)[:2] == _GZIP_MAGIC:  # peeked, not read: a pipe (`run <(cat urls.gz)`) cannot seek back
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _txt_blocks(path: Path) -> Iterator[list[str]]:
    """A txt file's URLs, a block of text at a time: one per line that is not blank, stripped
    (the lines of `str.splitlines`, bytes that are not UTF-8 replaced), gunzipped if gzip's."""
    try:
        with path.open("rb") as raw, io.TextIOWrapper(_decompressed(raw), encoding="utf-8", errors="replace") as f:
            carry = ""  # the start of a line that goes on in the next block
            while block := f.read(TXT_BLOCK_CHARS):
                lines = (carry + block).splitlines()
                carry = "" if block[-1] in _LINE_BREAKS else lines.pop()
                if urls := [url for url in map(str.strip, lines) if url]:
                    yield urls
    except (OSError, EOFError) as e:  # EOFError: a gzip file cut short
        raise ConfigError(f"{path}: cannot read as txt: {first_line(e)}") from None
    if carry.strip():
        yield [carry.strip()]


def _unreadable(path: Path, fmt: InputFormat, error: Exception, quoted: bool = True) -> ConfigError:
    """The one-line error for an input Polars could not read: for a csv/tsv/jsonl, the line
    where it goes wrong (Polars names none, or a character offset within a buffer: "Syntax at
    character 0" for a jsonl's broken line 15,001)."""
    where = (_first_bad_line(path, fmt, quoted)
             if fmt in (InputFormat.csv, InputFormat.tsv, InputFormat.jsonl) else None)
    name = "a JSON array" if fmt is InputFormat.jsonl and _json_array(path) else fmt.value
    return ConfigError(f"{path}: cannot read as {name}: {where or first_line(error)}")


def _first_bad_line(path: Path, fmt: InputFormat, quoted: bool = True) -> str | None:
    """Where a csv/tsv/jsonl file stops being readable, as "line N: what", read again with
    Python's parsers (only after Polars failed: one more pass over the file); None where they
    find nothing wrong (then Polars' own message is the best there is)."""
    import orjson  # only here, on a file Polars could not read

    try:
        if fmt is InputFormat.jsonl and _json_array(path):
            return _first_bad_item(path)
        with path.open("rb") as raw, _decompressed(raw) as f:
            if fmt is InputFormat.jsonl:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            value = orjson.loads(line)
                        except orjson.JSONDecodeError as e:
                            return f"line {n}, column {e.colno}: not JSON ({e.msg})"
                        if not isinstance(value, dict):
                            return f"line {n}: not a JSON object but {type(value).__name__}"
                return None
            return _first_bad_csv_line(_utf8_lines(f), "," if fmt is InputFormat.csv else "\t", quoted)
    except _NotUtf8 as e:
        return f"line {e.line}: not UTF-8 text"
    except (OSError, EOFError, ValueError):
        return None


def _first_bad_item(path: Path) -> str | None:
    """Where a JSON array input goes wrong: the line and column of a syntax error, or the first
    item that is not an object (a row)."""
    import orjson

    with path.open("rb") as raw, _decompressed(raw) as f:
        data = f.read()
    try:
        items = orjson.loads(_without_bom(data))
    except orjson.JSONDecodeError as e:
        return f"line {e.lineno}, column {e.colno}: not JSON ({e.msg})"
    for n, item in enumerate(items if isinstance(items, list) else [], 1):
        if not isinstance(item, dict):
            return f"item {n:,} of the array: not a JSON object but {type(item).__name__}"
    return None


def _first_bad_csv_line(lines: Iterator[str], separator: str, quoted: bool = True) -> str | None:
    limit = csv.field_size_limit(1 << 62)  # a quote never closed reads to the end, not to 128 KiB
    try:
        rows = csv.reader(lines, delimiter=separator, strict=True,
                          **({} if quoted else {"quoting": csv.QUOTE_NONE}))
        width = 0
        while True:
            start = rows.line_num + 1  # a quoted field may go on over several lines
            try:
                row = next(rows, None)
            except csv.Error as e:
                if "unexpected end of data" in str(e):
                    return f"line {start}: a quoted field starts here and never ends"
                # "a tab expected after '\"'", not a quoted tab, which shows as spaces
                named = "a tab" if separator == "\t" else "a comma"
                return f"line {start}: {str(e).replace(chr(39) + separator + chr(39), named)}"
            if row is None:
                return None
            if width and len(row) > width:
                return f"line {start}: {len(row)} fields, the header has {width}"
            width = width or len(row)
    finally:
        csv.field_size_limit(limit)


class _NotUtf8(ValueError):
    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


def _utf8_lines(f: BinaryIO) -> Iterator[str]:
    for n, line in enumerate(f, 1):
        try:
            yield line.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError:
            raise _NotUtf8(n) from None


def _sink_ipc(table: pl.LazyFrame, path: str) -> None:
    """Stream a query into one IPC file; Polars 1.x, whose streaming engine cannot run every
    plan (jsonl scans in 1.20 and before), collects it instead (more memory, same file)."""
    with polars_io(path):  # a disk full names the rows file, not only "os error 28"
        try:
            table.sink_ipc(path, compression=_ROWS_COMPRESSION)
        except pl.exceptions.InvalidOperationError:
            if not pl.__version__.startswith("1."):
                raise
            table.collect().write_ipc(path, compression=_ROWS_COMPRESSION)


def clean_captions(table: _Frame, max_chars: int) -> _Frame:
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


def shard_count(n_rows: int, shard_size: int) -> int:
    return -(-n_rows // shard_size)
