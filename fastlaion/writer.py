"""Output: webdataset tar shards, a per-shard Parquet of every input row, embeddings, stats.

Layout under the output folder (img2dataset's, plus fastlaion's extras):

    00000.tar              key.jpg, key.txt, key.json per kept sample
    00000.parquet          every input row of the shard, kept or dropped, with status/stage/reason
                           and LAION's `hash` of its url + caption (PARQUET_SCHEMA, laion_hash)
    00000_img_emb.npy      (rows, D) float16 image embeddings, row i = Parquet row i (NaN: none)
    00000_txt_emb.npy      same for text
    00000_stats.json       the shard's funnel and timings; written last: its presence marks the
                           shard complete, and a rerun skips such shards. Its `write_id` (random)
                           tells this write of the shard from another run's into the same folder
    config.json            the run's whole configuration

Everything of a shard is first written under `.partial/` and then renamed into place, so a
shard's files appear only when complete. The stats file is written there last, so a folder under
`.partial/` that holds it is complete: a run killed while renaming is rolled forward by the next
run (`recover_partial`). A shard rewritten with retried rows (`rewrite=True`) loses its stats
file first, so readers never take a half-renamed shard for a complete one.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import mmh3
import numpy as np
import orjson
import polars as pl

from .batch import Batch
from .lock import (  # noqa: F401 (fastlaion.writer's names, as before they moved)
    LOCK_FILE, LOCK_RETRIES_S, NO_FLOCK_ERRNOS, _holder, lock_held, lock_holder, output_lock,
)

PARTIAL_DIR = ".partial"
SUMMARY_FILE = "summary.json"  # written when a run ends
CONFIG_FILE = "config.json"  # the run's settings, written before its first shard (what a resume is checked against)
STATS_FILE = re.compile(r"^(\d{5,})_stats\.json$")
# A shard's stats key: random, new each time a run writes the shard anew (kept by --retry-failed,
# which adds rows to the same write). A dataset made from the run records it (source.root_fields'
# caller), so that one rewritten since, by another run into the folder, is not read as its own.
WRITE_ID = "write_id"
# A shard's files (the module docstring's list): its number, five digits or more, and one of these.
SHARD_SUFFIXES = (".tar", ".parquet", "_stats.json", "_img_emb.npy", "_txt_emb.npy")


def shard_files(suffixes: Iterable[str] = SHARD_SUFFIXES, others: Iterable[str] = ()) -> re.Pattern[str]:
    """A pattern matching a file name that is a shard's file with one of `suffixes`, or one of
    the `others` names. Where fastlaion looks for its own files (or for files named as them)."""
    shard = r"\d{5,}(?:" + "|".join(map(re.escape, suffixes)) + ")"
    return re.compile("^(?:" + "|".join([shard, *map(re.escape, others)]) + ")$")


# The per-shard Parquet's columns, in order, with their types. Every shard of a run has the same
# schema; optional columns (scores and tags) are present exactly when their stage is configured.
# `hash` is LAION's key of the row (laion_hash), on every row, kept or dropped; shards written
# before it was added lack it, and readers compute it (dataset.source).
PARQUET_SCHEMA: dict[str, pl.DataType] = {
    "key": pl.String(), "url": pl.String(), "caption": pl.String(), "hash": pl.Int64(),
    "status": pl.String(), "stage": pl.String(),
    "reason": pl.String(), "error": pl.String(), "http_status": pl.Int32(), "attempts": pl.Int32(),
    "download_s": pl.Float32(), "bytes": pl.Int64(), "sha256": pl.String(), "format": pl.String(),
    "original_width": pl.Int32(), "original_height": pl.Int32(), "width": pl.Int32(), "height": pl.Int32(),
    "language": pl.String(), "language_score": pl.Float32(), "language_group": pl.String(),
    "similarity": pl.Float32(), "similarity_model": pl.String(),
    "punsafe": pl.Float32(), "pwatermark": pl.Float32(), "aesthetic": pl.Float32(), "aesthetic_v2": pl.Float32(),
    "caption_edit": pl.String(),
}
OPTIONAL_COLUMNS = ("language", "language_score", "language_group", "similarity", "similarity_model",
                    "punsafe", "pwatermark", "aesthetic", "aesthetic_v2")
# Written into each sample's key.json as well (LAION's released columns and then some; `hash`
# computed for the samples by _add_samples, as for the Parquet's rows).
SAMPLE_JSON_COLUMNS = ("url", "caption", "hash", "width", "height", "original_width", "original_height", "sha256",
                       "language", "language_score", "similarity", "punsafe", "pwatermark", "aesthetic",
                       "aesthetic_v2")


HASH = "hash"
FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)


def laion_hash(urls: pl.Series, captions: pl.Series) -> pl.Series:
    """LAION's `hash` column of these rows (Int64, never null): the first half of MurmurHash3
    x64_128 (seed 0) of the UTF-8 bytes of url + caption, as a signed 64-bit integer, which is
    `mmh3.hash64((url + text).encode("utf-8"))[0]`; a null url or caption counts as "". That is
    LAION's compute_hash (laion-prepro, laion5B/watermark/big_join.py, which wrote the column of
    laion2B-en-joined and its siblings from their URL and TEXT, None as ""; the safety and
    watermark joins and the usage guide key on the same function)."""
    return hash_joined((urls.fill_null("") + captions.fill_null("")).alias(HASH))


def hash_joined(joined: pl.Series) -> pl.Series:
    """laion_hash of url + caption already joined (no nulls). A Polars string is its UTF-8 bytes:
    cast to Binary, each row is handed to mmh3 as the bytes LAION hashed, with no Python str made
    and encoded again: about 0.25 CPU-us a row, where str took 4x that on non-ASCII captions."""
    h = mmh3.hash64
    return pl.Series(HASH, [h(b)[0] for b in joined.cast(pl.Binary).to_list()], dtype=pl.Int64)


def laion_hash_expr() -> pl.Expr:
    """laion_hash as a Polars expression over the `url` and `caption` columns, batch by batch (a
    lazy reader of shards written before the column was added computes it so)."""
    joined = pl.concat_str([pl.col("url").fill_null(""), pl.col("caption").fill_null("")])
    return joined.map_batches(hash_joined, return_dtype=pl.Int64, is_elementwise=True).alias(HASH)


def with_laion_hash(frame: FrameT) -> FrameT:
    """`frame` (eager or lazy) with its `hash` column after `caption`: computed from url and caption
    where it has none (a shard written before the column was added, or a dataset made from such
    shards); as it is where it has one, or no string url and caption to compute it from. A lazy
    frame computes it only for a query that reads it (Polars drops an unread column's expression)."""
    schema = frame.collect_schema()
    if HASH in schema or schema.get("url") != pl.String or schema.get("caption") != pl.String:
        return frame
    names = schema.names()
    at = names.index("caption") + 1
    return frame.select(*names[:at], laion_hash_expr(), *names[at:])


class TarAppender:
    """A ustar archive written member by member: the same bytes as `tarfile` with
    `USTAR_FORMAT` (regular files, mode 0644, uid/gid 0, no user names), without tarfile's
    per-member TarInfo, BytesIO and copy loop, which cost about 0.1 ms a member.

    `append=True` continues an existing archive after its last member, as tarfile's "a" mode.
    Names must be ASCII and at most 100 bytes (sample keys are).
    """

    _BLOCK = tarfile.BLOCKSIZE
    _RECORD = tarfile.RECORDSIZE
    _ZEROS = bytes(tarfile.BLOCKSIZE)

    def __init__(self, path: Path, mtime: float, *, append: bool = False):
        end = 0
        if append:
            with tarfile.open(path, "r", format=tarfile.USTAR_FORMAT) as existing:
                for _member in existing:
                    pass
                end = existing.offset  # where the end-of-archive blocks start
        self._file = open(path, "r+b" if append else "wb")  # noqa: SIM115 (closed by close())
        self._file.seek(end)
        self._file.truncate()
        self._offset = end
        # Every field but name, size and checksum is the same for every member.
        self._head = (b"0000644\0" b"0000000\0" b"0000000\0")
        self._mtime = b"%011o\0" % int(mtime)
        self._tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 247
        self._fixed_sum = sum(self._head) + sum(self._mtime) + sum(b" " * 8) + sum(self._tail)

    def add(self, name: str, data: bytes) -> None:
        self.add_many([(name, data)])

    def add_many(self, members: Iterable[tuple[str, bytes]]) -> None:
        """Append members in order (a batch's samples), in one call to the file. A name that
        cannot be written refuses the whole call before anything is written."""
        parts: list[bytes] = []
        offset = self._offset
        for name, data in members:
            encoded = name.encode("ascii")
            if len(encoded) > 100:
                raise ValueError(f"tar member name over 100 bytes: {name!r}")
            size = b"%011o\0" % len(data)
            # the header's checksum: its bytes summed with the checksum field as spaces
            checksum = self._fixed_sum + sum(encoded) + sum(size)
            parts += (encoded.ljust(100, b"\0"), self._head, size, self._mtime, b"%06o\0 " % checksum, self._tail, data)
            pad = -len(data) % self._BLOCK
            if pad:
                parts.append(self._ZEROS[:pad])
            offset += self._BLOCK + len(data) + pad
        self._file.writelines(parts)  # no joined copy of the batch (originals stored whole can be large)
        self._offset = offset

    def close(self) -> None:
        """Write the end-of-archive blocks, padded to a whole record as tarfile does, and close."""
        if self._file.closed:
            return
        try:
            end = self._offset + 2 * self._BLOCK
            self._file.write(b"\0" * (2 * self._BLOCK + (-end % self._RECORD)))
        finally:
            self._file.close()


def new_write_id() -> str:
    return os.urandom(8).hex()


def replace_text(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: into a hidden file beside it, then renamed over
    it. A run's config.json and summary.json were written in place, so a disk that filled up
    (or a SIGKILL) midway left a config.json cut short, and every later run refused the folder
    ("config.json is unreadable; remove it") where the earlier one was still good. A failed
    write names the file (a write error carries no file name: "File too large" alone)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def key_digits(shard_size: int) -> int:
    return max(1, len(str(shard_size - 1)))


def is_complete(out_dir: Path, shard: int) -> bool:
    return (out_dir / f"{shard_name(shard)}_stats.json").exists()


def read_stats(out_dir: Path, shard: int) -> dict[str, Any]:
    return json.loads((out_dir / f"{shard_name(shard)}_stats.json").read_text())


def damage(out_dir: Path, shard: int) -> str | None:
    """What is wrong with a complete shard's files, or None: the first of `problems`."""
    found = problems(out_dir, shard)
    return found[0] if found else None


def problems(out_dir: Path, shard: int) -> list[str]:
    """Everything wrong with a complete shard's files, one line each: each file its stats name
    must be there with the size it was written at (stats from before the sizes were recorded: the
    tar and the Parquet must be there). An unreadable stats file is damage too."""
    return [line for _, line in file_problems(out_dir, shard)]


def file_problems(out_dir: Path, shard: int) -> list[tuple[str, str]]:
    """problems(), each with the name of the file it is about (the stats file's own, when that
    is unreadable), for a reader that needs only some of the shard's files."""
    name = shard_name(shard)
    try:
        files = read_stats(out_dir, shard).get("files") or {f"{name}.tar": None, f"{name}.parquet": None}
    except (OSError, ValueError, AttributeError) as exc:
        return [(f"{name}_stats.json", f"{name}_stats.json is unreadable ({exc.__class__.__name__})")]
    found = []
    for fname, size in files.items():
        try:
            now = (out_dir / fname).stat().st_size
        except FileNotFoundError:
            found.append((fname, f"{fname} is missing"))
            continue
        if size is not None and now != size:
            found.append((fname, f"{fname} holds {now:,} bytes, {size:,} when written"))
    return found


def mark_incomplete(out_dir: Path, shard: int) -> None:
    """Remove a shard's stats file: the shard reads as unfinished, and a rerun writes it anew."""
    (out_dir / f"{shard_name(shard)}_stats.json").unlink(missing_ok=True)


def any_finished(out_dir: Path) -> bool:
    """Whether the output holds a finished shard, or one finished under .partial/ that the next
    run rolls forward (recover_partial)."""
    return any(out_dir.glob("[0-9]*_stats.json")) or any((out_dir / PARTIAL_DIR).glob("[0-9]*/[0-9]*_stats.json"))


def finished_shards(out_dir: Path) -> list[int]:
    """The shards whose stats file is in place (finished), in order."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(STATS_FILE.match, names) if m)


def kept_shards(out_dir: Path) -> set[int]:
    """The shards a rerun finds finished: those in place, and those whose files were all written
    under .partial/ (recover_partial moves them in)."""
    aside = {int(folder.name) for folder in (out_dir / PARTIAL_DIR).glob("[0-9]*")
             if folder.name.isdigit() and (folder / f"{folder.name}_stats.json").is_file()}
    return set(finished_shards(out_dir)) | aside


class ShardWriteError(OSError):
    """A shard's files could not be written (disk full, file too large, permissions). Nothing
    of the shard was published: the shard is as it was before, and a rerun redoes it."""

    def __init__(self, shard: int, errno: int | None, what: str, path: str | None = None):
        where = f" ({path})" if path else ""
        super().__init__(errno, f"shard {shard_name(shard)} not written: {what}{where}; the finished shards "
                                "are kept, rerun the same command to redo it")
        self.shard, self.what, self.path = shard, what, path

    @classmethod
    def wrap(cls, shard: int, exc: OSError) -> ShardWriteError:
        return exc if isinstance(exc, cls) else cls(shard, exc.errno, exc.strerror or str(exc), exc.filename)


def recover_partial(out_dir: Path) -> list[int]:
    """Finish the renames of shards whose files were all written under `.partial/` (their stats
    file is there) when the run stopped; drop everything else there. Returns the shards finished."""
    partial = out_dir / PARTIAL_DIR
    finished = []
    for tmp in sorted(partial.glob("[0-9]*")) if partial.is_dir() else ():
        stats = tmp / f"{tmp.name}_stats.json"
        if tmp.is_dir() and stats.exists():
            for f in sorted(tmp.iterdir()):
                if f != stats and f.name.startswith(tmp.name) and not f.name.endswith(".tmp"):
                    os.replace(f, out_dir / f.name)
            os.replace(stats, out_dir / stats.name)
            finished.append(int(tmp.name))
    shutil.rmtree(partial, ignore_errors=True)
    return finished


class ShardWriter:
    """Writes one shard: kept samples stream into the tar as batches finish; the Parquet,
    embeddings and stats are written by `publish`, then everything is renamed into place.

    With `rewrite=True` the writer starts from the published shard (--retry-failed): its tar is
    copied and appended to, and the outcomes added replace those rows of its Parquet (the other
    rows are kept as they are), their embeddings those rows of its embeddings.
    """

    def __init__(self, out_dir: Path, shard: int, n_rows: int, shard_size: int, embed_dim: int | None,
                 optional_columns: tuple[str, ...] = (), *, rewrite: bool = False):
        self.out_dir = out_dir
        self.shard = shard
        self.name = shard_name(shard)
        self.n_rows = n_rows
        self.digits = key_digits(shard_size)
        unknown = set(optional_columns) - set(OPTIONAL_COLUMNS)
        if unknown:
            raise ValueError(f"unknown optional columns {unknown}")
        self.columns = [c for c in PARQUET_SCHEMA if c not in OPTIONAL_COLUMNS or c in optional_columns]
        self.tmp = out_dir / PARTIAL_DIR / self.name
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.rewrite = rewrite
        self.previous: pl.DataFrame | None = None  # the published Parquet, when rewriting
        self.samples = 0
        if rewrite:
            # glob=False: an output folder named "out [1]" is read as itself, not as a pattern
            # a shard written before the hash column was added gets it (the rows not redone too)
            self.previous = with_laion_hash(pl.read_parquet(out_dir / f"{self.name}.parquet", glob=False))
            if self.previous.height != n_rows:
                raise RuntimeError(f"shard {self.name}: its Parquet has {self.previous.height} rows, "
                                   f"the input {n_rows}")
            self.samples = int((self.previous["status"] == "kept").sum())
            shutil.copyfile(out_dir / f"{self.name}.tar", self.tmp / f"{self.name}.tar")
        self._tar = TarAppender(self.tmp / f"{self.name}.tar", time.time(), append=rewrite)
        self._lock = threading.Lock()
        self._aborted = False
        self._outcomes: list[pl.DataFrame] = []
        # Embeddings of every row, NaN where none was computed (rows that never reached scoring).
        self._img_emb = self._txt_emb = None
        if embed_dim is not None:
            if rewrite:
                self._img_emb = np.load(out_dir / f"{self.name}_img_emb.npy")
                self._txt_emb = np.load(out_dir / f"{self.name}_txt_emb.npy")
            else:
                self._img_emb = np.full((n_rows, embed_dim), np.nan, dtype=np.float16)
                self._txt_emb = np.full((n_rows, embed_dim), np.nan, dtype=np.float16)

    def key(self, row: int) -> str:
        return f"{self.name}{row:0{self.digits}d}"

    def add_samples(self, batch: Batch) -> None:
        """Append the batch's live rows as samples (key.ext, key.txt, key.json). Thread-safe:
        batches go in whole, one at a time, and abort() waits for the one being written."""
        with self._lock:
            if self._aborted:  # a cancelled shard's batch that reached the lock after abort(): it goes too
                return
            self._add_samples(batch)

    def _add_samples(self, batch: Batch) -> None:
        stored = batch.payload["stored"]
        exts = batch.payload["stored_ext"]
        rows = batch.rows
        if {"url", "caption"} <= set(rows.columns):  # LAION's hash, as the Parquet's (a sample joins LAION's files on it)
            rows = rows.with_columns(laion_hash(rows["url"], rows["caption"]))
        meta_cols = [c for c in SAMPLE_JSON_COLUMNS if c in rows.columns and c in self.columns]
        members: list[tuple[str, bytes]] = []
        for i, rec in enumerate(rows.select("row", *meta_cols).iter_rows(named=True)):
            key = self.key(rec.pop("row"))
            # orjson: UTF-8 JSON as json.dumps(ensure_ascii=False) writes it, compact, ~10x faster;
            # a NaN becomes null (json.dumps would write NaN, which is not JSON)
            members += ((f"{key}.{exts[i]}", stored[i]), (f"{key}.txt", (rec.get("caption") or "").encode("utf-8")),
                        (f"{key}.json", orjson.dumps({"key": key, **rec})))
        self._tar.add_many(members)
        self.samples += len(members) // 3

    def add_outcome(self, outcome: pl.DataFrame) -> None:
        self._outcomes.append(outcome)

    def add_embeddings(self, rows: np.ndarray, img: np.ndarray, txt: np.ndarray) -> None:
        """Place (n, D) float16 embeddings at shard rows `rows`."""
        if self._img_emb is None or self._txt_emb is None:
            raise RuntimeError("this shard writer was made without an embedding size")
        self._img_emb[rows] = img
        self._txt_emb[rows] = txt

    def table(self) -> pl.DataFrame:
        """Every input row of the shard, kept or dropped, in row order, with its sample key."""
        if not self._outcomes and self.previous is not None:
            return self.previous  # a rewrite with no row to redo
        outcome = pl.concat(self._outcomes, how="diagonal_relaxed").sort("row")
        outcome = outcome.with_columns(
            (pl.lit(self.name) + pl.col("row").cast(pl.String).str.zfill(self.digits)).alias("key"),
            laion_hash(outcome["url"], outcome["caption"]))
        table = outcome.select([(pl.col(c) if c in outcome.columns else pl.lit(None)).cast(PARQUET_SCHEMA[c]).alias(c)
                                for c in self.columns])
        if self.previous is not None:  # the rows not redone stay exactly as published
            kept_as_is = self.previous.filter(~pl.col("key").is_in(table["key"].implode()))
            table = pl.concat([kept_as_is, table]).sort("key")  # keys are zero-padded: row order
        if table.height != self.n_rows or table["key"].n_unique() != self.n_rows:
            raise RuntimeError(f"shard {self.name}: {table.height} outcomes for {self.n_rows} input rows")
        return table

    def publish(self, table: pl.DataFrame, stats: dict[str, Any]) -> None:
        """Write Parquet, embeddings and stats, then rename everything into place (stats last)."""
        with self._lock:
            self._tar.close()
        # Encoded in memory, written by Python: Polars reports a failed write (disk full) as a
        # ComputeError, which stopped the run with a traceback; an OSError fails the shard by name.
        parquet = io.BytesIO()
        table.write_parquet(parquet, compression="zstd", statistics=True)
        (self.tmp / f"{self.name}.parquet").write_bytes(parquet.getbuffer())
        published = [f"{self.name}.tar", f"{self.name}.parquet"]
        if self._img_emb is not None:
            np.save(self.tmp / f"{self.name}_img_emb.npy", self._img_emb)
            np.save(self.tmp / f"{self.name}_txt_emb.npy", self._txt_emb)
            published += [f"{self.name}_img_emb.npy", f"{self.name}_txt_emb.npy"]
        stats_name = f"{self.name}_stats.json"
        # the files' sizes, so that a rerun can tell a shard whose files were since lost or cut
        stats = {**stats, "files": {f: (self.tmp / f).stat().st_size for f in published}}
        # Written whole, then renamed: its presence under .partial/ means every file is there.
        (self.tmp / f"{stats_name}.tmp").write_text(json.dumps(stats, indent=2))
        os.replace(self.tmp / f"{stats_name}.tmp", self.tmp / stats_name)
        if self.rewrite:  # from here until the new stats lands, the shard reads as incomplete
            (self.out_dir / stats_name).unlink(missing_ok=True)
        for fname in [*published, stats_name]:  # stats last: it marks completion
            os.replace(self.tmp / fname, self.out_dir / fname)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written under .partial/ (the published shard, if any, is untouched)."""
        try:
            with self._lock:  # a batch still being written on another thread (a cancelled shard) ends first
                self._aborted = True
                self._tar.close()
        except OSError:
            pass  # the write that failed (disk full) may fail again: the file goes anyway
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
