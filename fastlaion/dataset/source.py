"""Open a finished dataset as one lazy frame: a `fastlaion run` folder, a subset or dedup folder,
or one Parquet file.

A run folder holds `NNNNN.parquet` per shard (every input row, kept or dropped) beside
`NNNNN.tar` and `NNNNN_img_emb.npy`. A subset or dedup folder holds `metadata.parquet` and
`dataset.json`, whose `root` names the folder that holds the samples' images and embeddings
(`Dataset.root`); every row carries `shard`, the stem of those files, so nothing is copied. The
root is recorded twice: relative to the dataset.json's folder (`root_relative`, looked for first:
a run and its subsets moved or copied together keep working) and absolute (`root`, the only one
older files have). A subset written with `--shards` holds its own tars and embeddings: it is its
own root (`root_relative` "."), its rows' `shard` names its own tars (null for a row with no
sample there) and `shard_row` their row in its embedding files (a run's is in the key).
A root found in neither place is `Dataset.root_missing`: the commands that read images or
embeddings refuse with one line naming the folders looked for; the others warn and go on.
The dataset.json also records which write of each root shard its rows name (`root_shards`:
`shard_identity`, the `write_id` of the shard's stats file). A run written into the root's folder
since (another run, not a resume: it finishes new shards only) would make those rows point at
another run's images and embeddings: `Dataset.root_changed`, refused or warned as a missing root.

Unreadable Parquet files are skipped, counted and named in a warning, never fatal and never
silent: a bad footer is seen when the dataset is opened; a bad page deep inside a file only when
a job reads it, so `Dataset.guarded` runs a job, and if a read fails midway it checks every file,
drops the bad ones and runs the job once more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import polars as pl

from ..config import ConfigError, first_line
from ..writer import CONFIG_FILE, WRITE_ID, shard_files, with_laion_hash

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.parquet"
MANIFEST_FILE = "dataset.json"
# The journal of a dataset command's commit (output.Staging.commit): the earlier files it replaces
# and the new ones, there from before the first rename until every new file is in place. A folder
# holding it is part earlier, part new output: readers refuse it, the next command into it puts
# the rest of the new files in place first (the new files were whole under .partial/ before the
# first rename).
COMMIT_FILE = ".committing"
SHARD_PARQUET = shard_files([".parquet"])
REQUIRED_COLUMNS = ("key", "status")
KEPT = "kept"
DROPPED = "dropped"
# A sample's row in its shard's embedding files, where the key does not give it (a subset written
# with --shards: samples from many of the run's shards in one tar); null: no embedding there.
SHARD_ROW = "shard_row"

# Where each optional column comes from, for errors about a column the dataset lacks.
COLUMN_SOURCES: dict[str, str] = {
    "language": "run with --language (the default; this run used --no-language)",
    "language_group": "run with --language (the default; this run used --no-language)",
    "similarity": "run with CLIP scoring on (without --no-score)",
    "punsafe": "run with --nsfw-head auto (OpenAI ViT-B-32 or ViT-L-14 weights) or --nsfw-head PATH",
    "pwatermark": "run with --watermark-model PATH (LAION's watermark detector)",
    "aesthetic": "run with --aesthetic-v1 auto (OpenAI ViT-B-32, B-16 or L-14 weights) or --aesthetic-v1 PATH",
    "aesthetic_v2": "run with --aesthetic-v2 PATH (LAION-Aesthetics V2 weights)",
    **{c: "every fastlaion run writes it; this Parquet was not written by fastlaion run"
       for c in ("key", "status", "stage", "reason")},
    "sha256": "every fastlaion run writes it; this Parquet was not written by fastlaion run",
    "original_width": "every fastlaion run writes it; this Parquet was not written by fastlaion run",
    "original_height": "every fastlaion run writes it; this Parquet was not written by fastlaion run",
}

T = TypeVar("T")


class DatasetError(ConfigError):
    """Bad input about a dataset (a missing column, no rows, an unknown recipe): one line, exit 2."""


def stopped_commit(folder: Path) -> dict[str, list[str]] | None:
    """The commit journal in `folder` ({"earlier": names, "new": names}), or None where there is
    none, or where it is unreadable: a command killed while it wrote the journal had moved no file
    yet (the folder holds its earlier output, as it was)."""
    try:
        plan = json.loads((folder / COMMIT_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    if not (isinstance(plan, dict) and all(isinstance(plan.get(k), list) for k in ("earlier", "new"))):
        return None
    return plan


class Progress(Protocol):
    """What the long loops report to (the CLI draws a bar; the library default draws nothing)."""

    def start(self, what: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def stop(self) -> None: ...


class NoProgress:
    def start(self, what: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass(frozen=True)
class Skipped:
    path: str
    why: str


@dataclass(frozen=True)
class Damage:
    """A file of one of the root's finished run shards that is not as the run wrote it
    (writer.file_problems: missing, or another size than its stats file records)."""

    shard: str    # "00001"
    file: str     # its name in the root: "00001.tar"
    problem: str  # one line: "00001.tar holds 10,240 bytes, 20,480 when written"


# The files of a run's shard that a dataset made from it reads besides its own metadata.
SAMPLE_FILES = (".tar", "_img_emb.npy", "_txt_emb.npy")


@dataclass(frozen=True)
class Dataset:
    path: Path                      # what was opened
    root: Path                      # the run folder holding the samples' tars and embeddings
    kind: str                       # "run", "subset", "dedup" or "parquet"
    files: tuple[Path, ...]         # readable metadata Parquet files, in dataset order
    skipped: tuple[Skipped, ...]    # unreadable ones, with why
    rows: int                       # rows in `files`
    groups: tuple[tuple[Path, ...], ...]  # files sharing one schema, in order
    root_missing: str | None = None  # why `root` cannot be read (it is nowhere dataset.json says); None: it can
    damaged: tuple[Damage, ...] = ()  # the root's files found damaged (with_damage): read as missing ones
    # made from a run not done when it was read (RunState): UNFINISHED_FIELDS, for the dataset.json
    # of what is made from it (a subset, dedup or classify output of it, or of those, carries them)
    unfinished: dict[str, Any] | None = None
    manifest_file: Path | None = None  # the dataset.json its root was read from; None: none (a run folder, ...)
    # which write of each root shard its rows name, as that dataset.json records (shard_identity);
    # None: none recorded (no dataset.json, or one by an earlier fastlaion: nothing to check)
    root_shards: dict[str, str] | None = None
    root_changed: str | None = None  # why the root's samples are no longer its rows' (a shard written again); None: they are

    def scan(self) -> pl.LazyFrame:
        """Every row, in dataset order (files in name order, rows in file order), plus `shard`;
        `hash` computed from url and caption for files written before that column (with_laion_hash)."""
        frames = [self._scan_group(g) for g in self.groups]
        lf = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
        return lf

    def _scan_group(self, files: Sequence[Path]) -> pl.LazyFrame:
        schema = pl.scan_parquet(files[0], glob=False).collect_schema()
        if "shard" in schema:
            return with_laion_hash(pl.scan_parquet(list(files), glob=False))
        # A run's shard Parquet: the shard is the file's stem (00042.parquet -> "00042").
        return with_laion_hash(pl.scan_parquet(list(files), include_file_paths="__file", glob=False)
                               .with_columns(pl.col("__file").str.extract(r"([^/\\]+)\.parquet$", 1).alias("shard"))
                               .drop("__file"))

    def scan_shards(self, shards: Collection[str]) -> pl.LazyFrame | None:
        """The rows of these shards only, in dataset order (None if none has a file here): of a
        run's per-shard files only theirs are read; a file with a `shard` column is filtered, its
        row groups skipped by their statistics where they allow it."""
        wanted = set(shards)
        frames = []
        for group in self.groups:
            if "shard" in pl.scan_parquet(group[0], glob=False).collect_schema():
                frames.append(with_laion_hash(pl.scan_parquet(list(group), glob=False))
                              .filter(pl.col("shard").is_in(sorted(wanted))))
            else:
                mine = [f for f in group if f.name.removesuffix(".parquet") in wanted]
                if mine:
                    frames.append(self._scan_group(mine))
        if not frames:
            return None
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")

    @property
    def columns(self) -> list[str]:
        return list(self.scan().collect_schema().names())

    def missing(self, columns: Iterable[str]) -> list[str]:
        have = set(self.columns)
        return [c for c in columns if c not in have]

    def require(self, columns: Iterable[str], what: str) -> None:
        """Raise a DatasetError naming each missing column and the option that adds it."""
        missing = self.missing(columns)
        if missing:
            how = "; ".join(f"'{c}': {COLUMN_SOURCES.get(c, 'not a fastlaion column')}" for c in missing)
            raise DatasetError(f"{what} needs {', '.join(repr(c) for c in missing)}, which {self.path} lacks: {how}")

    def sample_columns(self) -> list[str]:
        """The columns that say where a row's sample is: key and shard, and shard_row where the
        dataset has it (semantic.row_in_shard)."""
        return ["key", "shard"] + ([SHARD_ROW] if SHARD_ROW in self.columns else [])

    def need_root(self, what: str) -> None:
        """Raise a DatasetError (one line, naming the folders looked for) when `what` needs the
        samples' images or embeddings and the folder holding them is gone."""
        if self.root_missing or self.root_changed:
            raise DatasetError(f"{what}: {self.root_missing or self.root_changed}")

    def tar_path(self, shard: str) -> Path:
        self.need_root("reading the images")
        return self.root / f"{shard}.tar"

    def embeddings_path(self, shard: str, kind: str = "img") -> Path:
        """`{shard}_img_emb.npy` (or kind "txt": the text embeddings) in the root."""
        self.need_root("reading the embeddings")
        return self.root / f"{shard}_{kind}_emb.npy"

    def damage(self, shards: Iterable[str | None] | None = None, files: Sequence[str] | None = SAMPLE_FILES
               ) -> list[Damage]:
        """The damage to the files (those ending in `files`, None: all; an unreadable stats file
        always) of the root's finished run shards `shards` (None: those of the kept samples; a run
        folder's: all), checked against the sizes their stats files record (writer.file_problems:
        what `stats` on a run folder and a rerun check). A root that a `subset --shards` wrote:
        its files against its shards.json's sizes (_exported_damage); a lone Parquet's folder
        records no sizes: nothing to check."""
        from ..writer import file_problems, finished_shards, shard_name

        if self.root_missing:
            return []
        finished = finished_shards(self.root)
        if not finished:
            return self._exported_damage(shards, files)
        if shards is None and not (self.kind == "run" and self.path.is_dir()):
            shards = self._kept_shards()
        wanted = None if shards is None else {int(s) for s in shards if s is not None and s.isdigit()}
        found = []
        for n in finished:
            if wanted is None or n in wanted:
                found += [Damage(shard_name(n), f, line) for f, line in file_problems(self.root, n)
                          if files is None or f.endswith((*files, "_stats.json"))]
        return found

    def _exported_damage(self, shards: Iterable[str | None] | None, files: Sequence[str] | None) -> list[Damage]:
        """damage() for a root that a `subset --shards` wrote: its tars and embedding files against
        the sizes its shards.json records (an earlier fastlaion's records none: nothing checked)."""
        try:
            sizes = json.loads((self.root / SHARDS_FILE).read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            return []
        if not isinstance(sizes, dict):
            return []
        wanted = {s for s in (self._kept_shards() if shards is None else shards) if s is not None}
        found = []
        for name, size in sizes.items():
            stem = name.removesuffix(".tar").removesuffix("_img_emb.npy").removesuffix("_txt_emb.npy")
            if stem not in wanted or (files is not None and not name.endswith(tuple(files))):
                continue
            try:
                now = (self.root / name).stat().st_size
            except FileNotFoundError:
                found.append(Damage(stem, name, f"{name} is missing"))
                continue
            if isinstance(size, int) and now != size:
                found.append(Damage(stem, name, f"{name} holds {now:,} bytes, {size:,} when written"))
        return found

    def _kept_shards(self) -> Iterable[str | None]:
        """The shards the kept samples are in: a run's tars and embeddings hold those only."""
        return collect(self.scan().filter(pl.col("status") == KEPT).select(pl.col("shard").unique()))["shard"]

    def with_damage(self, damaged: Sequence[Damage]) -> Dataset:
        """This dataset, its readers of tars and embeddings (samples.py, semantic.py) taking
        these files for missing: a cut tar would give the samples before the cut, some without
        their caption or metadata file; a cut or other embedding file, rows that may not be
        the samples'."""
        return replace(self, damaged=tuple(damaged))

    def is_damaged(self, path: Path) -> bool:
        """Whether `path` (tar_path, embeddings_path) is one of the files `with_damage` named."""
        return any(path == self.root / d.file for d in self.damaged)

    def without(self, bad: Sequence[Skipped]) -> Dataset:
        gone = {b.path for b in bad}
        groups = tuple(g2 for g2 in (tuple(f for f in g if str(f) not in gone) for g in self.groups) if g2)
        files = tuple(f for f in self.files if str(f) not in gone)
        if not files:
            raise DatasetError(f"none of the Parquet files in {self.path} can be read (first: {bad[0].path}: {bad[0].why})")
        rows = sum(_row_count(f) for f in files)
        return replace(self, files=files, groups=groups, skipped=self.skipped + tuple(bad), rows=rows)

    def guarded(self, job: Callable[[Dataset], T]) -> T:
        """Run `job(dataset)`; if a file fails to read midway (a corrupt page), skip the bad files
        with a warning and run it once more on the rest."""
        try:
            return job(self)
        except (pl.exceptions.ComputeError, OSError) as e:
            bad = self.unreadable()
            if not bad:
                raise
            log.debug("a read failed (%s); checked every file, %d unreadable", e, len(bad))
            _warn_skipped(bad, self.path)
            return job(self.without(bad))

    def unreadable(self) -> list[Skipped]:
        """Read every row group of every file; the files that fail, with why (slow: a full pass)."""
        import pyarrow.parquet as pq

        bad = []
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                for i in range(pf.num_row_groups):
                    pf.read_row_group(i)
            except Exception as e:  # any decoding failure means this file is unreadable
                bad.append(Skipped(str(f), _short(e)))
        return bad

    def manifest(self, out: Path) -> dict[str, Any]:
        """Provenance for the dataset.json of an output made from this dataset in folder `out`:
        the root absolute and relative to `out` (read first, so that the two moved together still
        find each other)."""
        return {"source": str(self.path.resolve()), **root_fields(self.root, out),
                "source_rows": self.rows, "skipped_files": [vars(s) for s in self.skipped], **(self.unfinished or {})}

    def root_record(self, shards: Iterable[str], own: Path | None = None) -> dict[str, Any]:
        """ROOT_SHARDS for the dataset.json of an output made from this dataset whose rows name
        these `shards` of its root (`own`: the folder where the output's own tars, a subset
        --shards', are being written: those, as written). A dataset made from a dataset.json's
        carries that record on, so that it names the root's shards as they were when the first
        of the chain was made, not as they are now; one whose dataset.json records none (an
        earlier fastlaion) records none either ({}: nothing will be checked). A run folder or a
        lone Parquet: its shards as they are now."""
        if own is None and self.manifest_file is not None:
            if self.root_shards is None:
                return {}
            return {ROOT_SHARDS: {s: self.root_shards[s] for s in sorted(set(shards)) if s in self.root_shards}}
        folder = self.root if own is None else own
        found = {s: shard_identity(folder, s) for s in sorted(set(shards))}
        return {ROOT_SHARDS: {s: i for s, i in found.items() if i is not None}}

    def unfinished_notice(self) -> str | None:
        """One line for a subset, dedup or classify output made from a run that was not done
        (its dataset.json's UNFINISHED_FIELDS), as RunState.notice is for the run folder; None
        for any other dataset."""
        u = self.unfinished
        if not u or self.kind == "run":
            return None
        n = f"{u['source_finished_shards']:,} shard{'s' * (u['source_finished_shards'] != 1)}"
        total = u.get("source_shards_total")
        of = f" of {total:,}" if isinstance(total, int) and total > u["source_finished_shards"] else ""
        how = "while a fastlaion run was writing it" if u.get("source_run_writing") else \
            "whose fastlaion run had not finished"
        return (f"{self.path}: made from {u['source_run']}, {how} ({n}{of} finished then): it holds the samples of "
                "those shards only")


def root_fields(root: Path, out: Path) -> dict[str, str | None]:
    """dataset.json's `root` (absolute) and `root_relative` (to the folder `out` it is in)."""
    root = root.resolve()
    try:
        relative: str | None = Path(os.path.relpath(root, Path(out).resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path
        relative = None
    return {"root": str(root), "root_relative": relative}


RUN_CONFIG = CONFIG_FILE  # every fastlaion run writes it before its first shard (its settings)
SHARDS_FILE = "shards.json"  # a `subset --shards` folder's: its tars, and the size of each of its files
# dataset.json: {shard: shard_identity} of each root shard its rows name, when it was made
ROOT_SHARDS = "root_shards"


def shard_identity(root: Path, shard: str) -> str | None:
    """Which write of the root's shard `shard` is there: of a run's, its stats file's write_id (a
    digest of that file where an earlier fastlaion wrote none); of a `subset --shards` folder's
    tars, its shards.json's (the folder is written whole, one id for all). Cheap: one small file
    read. None: no such finished shard (no stats file: unfinished, being written, removed)."""
    for f in (root / f"{shard}_stats.json", root / SHARDS_FILE):
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            continue
        except OSError:
            return None
        try:
            info = json.loads(data)
        except ValueError:
            info = None
        if isinstance(info, dict) and isinstance(info.get(WRITE_ID), str):
            return info[WRITE_ID]
        return "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    return None


def root_changes(path: Path, root: Path, recorded: dict[str, str]) -> str | None:
    """One line where a root shard the dataset at `path` names (`recorded`: its dataset.json's
    ROOT_SHARDS) is not the write recorded: another run wrote the root's folder since, and its
    images and embeddings are not the rows' samples. None: each is as recorded (shards the run
    finished since, which the dataset never saw, do not count)."""
    changed = [(s, now) for s, was in recorded.items() if (now := shard_identity(root, s)) != was]
    if not changed:
        return None

    def how(shard: str, now: str | None) -> str:
        if now is None:
            return f"{shard} is not finished there now (no {shard}_stats.json: a run is writing it, or it was removed)"
        try:
            finished = json.loads((root / f"{shard}_stats.json").read_text()).get("finished_at")
        except (OSError, ValueError, AttributeError):
            finished = None
        return f"{shard} was written again" + (f", finished {finished}" if isinstance(finished, str) else "")

    names = ", ".join(s for s, _ in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    root = root.resolve()
    return (f"{root} was written again since {path} was made from it: {len(changed):,} of the {len(recorded):,} "
            f"shard{'s' * (len(recorded) != 1)} its rows name ({names}; {how(*changed[0])}) hold another run's "
            f"images and embeddings, not its rows' samples; make {path} again from {root}, or put the run it was "
            "made from back there")
# What the dataset.json of an output made from a run not done records (Dataset.unfinished)
UNFINISHED_FIELDS = ("source_unfinished", "source_run", "source_finished_shards", "source_shards_total",
                     "source_run_writing")


@dataclass(frozen=True)
class RunState:
    """A run folder whose `fastlaion run` is not done: one writing it now, or one that stopped
    (killed, interrupted, or failed on a shard) before it finished. Open it anyway and a dataset
    command reads the shards finished so far; `notice` says so."""

    folder: Path
    writing: bool          # a fastlaion run holds the folder's lock now
    finished: int          # shards in place with their stats file
    total: int | None      # the run's shards, where its summary says
    shards: frozenset[int] = frozenset()  # which those finished ones are (open_dataset reads those)

    def record(self) -> dict[str, Any]:
        """UNFINISHED_FIELDS, for the dataset.json of an output made from this run."""
        return dict(zip(UNFINISHED_FIELDS, (True, str(self.folder.resolve()), self.finished, self.total,
                                            self.writing)))

    def notice(self) -> str:
        n = f"{self.finished:,} shard{'s' * (self.finished != 1)}"
        if self.writing:
            return (f"{self.folder}: a fastlaion run is writing this folder; the result covers the {n} finished "
                    "so far")
        of = f" of {self.total:,}" if self.total is not None and self.total > self.finished else ""
        return (f"{self.folder}: the fastlaion run that wrote it did not finish ({n}{of} finished); `fastlaion run` "
                "with the same arguments resumes it")


def run_state(path: str | Path) -> RunState | None:
    """How far the run in a run folder got, when it is not done; None for a finished run and for
    anything but a run folder (a subset or dedup folder, one Parquet file). Not done: a run holds
    the folder's lock (writing it), or no summary was written, or the summary counts shards not
    finished, or a shard is in progress under .partial/ or published without its stats file."""
    from ..writer import PARTIAL_DIR, SUMMARY_FILE, finished_shards, lock_held, lock_holder

    path = Path(path)
    if not path.is_dir() or (path / METADATA_FILE).exists():
        return None
    holder = lock_holder(path)
    run_lock = holder is not None and holder[1] == "run"  # not a dataset command's, writing its first output here
    if not ((path / RUN_CONFIG).exists() or run_lock):
        return None  # no run ever started writing here
    finished = finished_shards(path)
    if run_lock and lock_held(path):
        return RunState(path, True, len(finished), None, frozenset(finished))
    total, failed = None, False
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text())
        total, failed = int(summary["shards_total"]), bool(summary.get("shards_failed"))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no summary (or an unreadable one): the run did not get to its end
    done = set(finished)
    in_progress = (path / PARTIAL_DIR).is_dir() and any(
        p.name.isdigit() for p in (path / PARTIAL_DIR).iterdir())
    unpublished = any(SHARD_PARQUET.match(p.name) and int(p.name.split(".")[0]) not in done for p in path.iterdir())
    if total is None or failed or len(finished) < total or in_progress or unpublished:
        return RunState(path, False, len(finished), total, frozenset(finished))
    return None


_LOOK = RunState(Path(), False, 0, None)  # open_dataset's `run` not given: it looks itself


def open_dataset(path: str | Path, allow_empty: bool = False, needs_root: str | None = None,
                 run: RunState | None = _LOOK) -> Dataset:
    """Open a run folder, a subset/dedup folder or one Parquet file; skip unreadable files.

    Raises DatasetError when there is nothing to read, or no rows (unless `allow_empty`). When
    the folder holding the samples' images and embeddings (the root its dataset.json names) is
    gone, raises a DatasetError if `needs_root` (what needs it, for the message), else warns.

    A run folder whose run is not done is read as `run` (its `run_state`, taken by the caller
    that said so to the user; else here, first) found it: the shards finished then, and not one
    that a run writing the folder finished since, so that what is read is what was counted (its
    `unfinished` record and the line that says how many shards the result covers).
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    if stopped_commit(folder) is not None:
        raise DatasetError(f"{folder} holds an output only partly put in place: the command writing it was stopped "
                           "(or is putting it there now) after it had replaced some of the earlier files; rerun that "
                           "command, which puts the rest in place first, or wait for it to end")
    root, kind, root_missing, recorded, manifest_file = path, "run", None, None, None
    state = run_state(path) if run is _LOOK else run
    if path.is_file():
        if path.suffix != ".parquet":
            raise DatasetError(f"{path}: not a Parquet file or a dataset folder")
        candidates, root, kind = [path], path.parent, "parquet"
        manifest = path.parent / MANIFEST_FILE
        if path.name == METADATA_FILE and manifest.exists():
            kind, root, root_missing, recorded = _read_manifest(manifest, path)
            manifest_file = manifest
    elif (path / METADATA_FILE).exists():
        candidates = [path / METADATA_FILE]
        if (path / MANIFEST_FILE).exists():
            manifest_file = path / MANIFEST_FILE
            kind, root, root_missing, recorded = _read_manifest(manifest_file, path)
        else:
            kind = "parquet"
    else:
        candidates = sorted(p for p in path.iterdir() if SHARD_PARQUET.match(p.name))
        if state is not None:  # not one finished since (one without its stats file is skipped, and said, below)
            candidates = [p for p in candidates if int(p.name.split(".")[0]) in state.shards
                          or not (path / f"{p.name.split('.')[0]}_stats.json").exists()]
        if not candidates:
            raise DatasetError(f"{path} holds no dataset: no shard Parquet files (NNNNN.parquet, written by "
                               f"fastlaion run) and no {METADATA_FILE} (written by fastlaion subset or dedup)")
    good, skipped, schemas, rows = [], [], [], 0
    for f, checked in zip(candidates, _checked(candidates, kind == "run")):
        if isinstance(checked, Skipped):
            skipped.append(checked)
            continue
        good.append(f)
        schemas.append(checked[0])
        rows += checked[1]
    if skipped:
        _warn_skipped(skipped, path)
    if not good:
        raise DatasetError(f"none of the {len(candidates)} Parquet file(s) in {path} can be read "
                           f"(first: {skipped[0].path}: {skipped[0].why})")
    groups: list[list[Path]] = []
    last = None
    for f, schema in zip(good, schemas):
        if schema != last:
            groups.append([])
            last = schema
        groups[-1].append(f)
    ds = Dataset(path=path, root=root, kind=kind, files=tuple(good), skipped=tuple(skipped), rows=rows,
                 groups=tuple(tuple(g) for g in groups), root_missing=root_missing,
                 unfinished=(None if state is None else state.record()) if kind == "run" and path.is_dir()
                 else _unfinished(path), manifest_file=manifest_file, root_shards=recorded,
                 root_changed=None if root_missing or not recorded else root_changes(path, root, recorded))
    if rows == 0 and not allow_empty:
        raise DatasetError(f"{path} holds no rows ({len(good)} Parquet file(s), all empty)")
    if root_missing or ds.root_changed:
        if needs_root:
            ds.need_root(needs_root)
        log.warning("%s (this command reads neither, so it goes on)", root_missing or ds.root_changed)
    elif manifest_file is not None and recorded is None:
        log.info("%s records no %s (an earlier fastlaion wrote it): whether the run in %s is still the one it "
                 "was made from is not checked", manifest_file, ROOT_SHARDS, root)
    return ds


class _Unreadable(Exception):
    pass


CHECK_THREADS = 16  # footers read at once: on a network filesystem or a cold disk each read waits


def _checked(files: list[Path], need_stats: bool) -> list[Skipped | tuple[tuple[tuple[str, str], ...], int]]:
    """Each file's (schema, rows), or why it is skipped, in order; the footers are read by several
    threads (pyarrow releases the GIL): 100 files on a cold disk in 0.35 s, not 1.2 (one at a time)."""
    def one(f: Path) -> Skipped | tuple[tuple[tuple[str, str], ...], int]:
        if need_stats and not (f.parent / f"{f.stem}_stats.json").exists():
            # the writer publishes a shard's stats file last (and removes it first when rewriting)
            return Skipped(str(f), "incomplete shard: no stats file (the run is writing it or was stopped)")
        try:
            return _check(f)
        except _Unreadable as e:
            return Skipped(str(f), str(e))

    if len(files) < 4:
        return [one(f) for f in files]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(CHECK_THREADS, len(files)), thread_name_prefix="footer") as pool:
        return list(pool.map(one, files))


def _check(f: Path) -> tuple[tuple[tuple[str, str], ...], int]:
    """The file's schema (names and types) and row count, from its footer alone."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(f)
        schema = meta.schema.to_arrow_schema()
    except Exception as e:  # pyarrow raises several types for a bad footer; all mean "unreadable"
        raise _Unreadable(_short(e)) from None
    names = schema.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise _Unreadable(f"not a fastlaion metadata file (no {', '.join(missing)} column)")
    return tuple((field.name, str(field.type)) for field in schema), meta.num_rows


def _row_count(f: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(f).num_rows


def _read_manifest(manifest: Path, path: Path) -> tuple[str, Path, str | None, dict[str, str] | None]:
    """(kind, root, why the root cannot be read or None, its ROOT_SHARDS or None) from a
    dataset.json: the root relative to its folder first (`root_relative`), then absolute (`root`;
    older files have only that)."""
    try:
        info = json.loads(manifest.read_text())
        kind, absolute, relative = str(info.get("kind", "parquet")), Path(info["root"]), info.get("root_relative")
        if relative is not None and not isinstance(relative, str):
            raise ValueError(f"root_relative is {type(relative).__name__}, not text")
        recorded = info.get(ROOT_SHARDS)
        if recorded is not None and not (isinstance(recorded, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in recorded.items())):
            raise ValueError(f"{ROOT_SHARDS} is not an object of shard names and texts")
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{manifest}: not a fastlaion dataset.json ({_short(e)})") from None
    beside = manifest.parent / relative if relative else None
    if beside is not None and beside.is_dir():
        return kind, beside, None, recorded
    if absolute.is_dir():
        return kind, absolute, None, recorded
    named = (f"{beside.resolve()} ({relative}, relative to it) and {absolute}; neither exists"
             if beside is not None and beside.resolve() != absolute else f"{absolute}, which does not exist")
    why = (f"cannot find the folder holding the images and embeddings of {path}: its {MANIFEST_FILE} names "
           f"{named}. Put that folder back, or set \"root\" in {manifest} to where it is now")
    return kind, absolute, why, recorded


def _unfinished(path: Path) -> dict[str, Any] | None:
    """Dataset.unfinished: a run folder's RunState, or what the dataset.json of a dataset made
    from one records."""
    state = run_state(path)
    if state is not None:
        return state.record()
    manifest = (path if path.is_dir() else path.parent) / MANIFEST_FILE
    if path.is_file() and path.name != METADATA_FILE or not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None  # _read_manifest has said what is wrong with it
    if not (isinstance(info, dict) and info.get("source_unfinished") is True
            and isinstance(info.get("source_finished_shards"), int)):
        return None
    return {k: info.get(k) for k in UNFINISHED_FIELDS}


def _warn_skipped(skipped: Sequence[Skipped], where: Path) -> None:
    for s in skipped[:10]:
        log.warning("skipped unreadable Parquet %s: %s", s.path, s.why)
    if len(skipped) > 10:
        log.warning("... and %d more unreadable Parquet files in %s", len(skipped) - 10, where)


def _short(e: BaseException) -> str:
    return first_line(e)[:200]


def collect(lf: pl.LazyFrame) -> pl.DataFrame:
    """Collect with the streaming engine on any polars 1.x or 2.x (the spelling changed)."""
    try:
        return lf.collect(engine="streaming")
    except (ValueError, TypeError):  # polars < 1.23: no streaming engine name yet
        return lf.collect(streaming=True)


def sink_parquet(lf: pl.LazyFrame, path: Path) -> None:
    """Stream a query into one Parquet file; older polars, whose streaming engine cannot run
    every plan, collect it instead (slower, more memory, same file)."""
    try:
        lf.sink_parquet(path, compression="zstd", statistics=True)
    except pl.exceptions.InvalidOperationError:
        if not pl.__version__.startswith("1."):
            raise
        collect(lf).write_parquet(path, compression="zstd", statistics=True)
