"""An output folder of `fastlaion subset`, `dedup` or `classify`: files are written under
`.partial/` and moved into place at the end, so an interrupted command leaves the earlier output
intact, with the folder locked meanwhile (`OUT/.lock`, as a run locks its folder); and one file of `stats` or `search` (`write_whole`), written aside and renamed. A Ctrl-C
while an output is put in place lands once it is, after the command is told (`written`), so that
what its message says was written is what is on disk."""

from __future__ import annotations

import abc
import errno
import json
import logging
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import no_file_above
from ..interrupt import ctrl_c_deferred
from ..writer import SUMMARY_FILE, shard_files
from .source import (COMMIT_FILE, MANIFEST_FILE, METADATA_FILE, RUN_CONFIG, SHARD_PARQUET, SHARDS_FILE, Dataset,
                     DatasetError, collect, root_fields, stopped_commit)

log = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
EARLIER_DIR = ".earlier"  # the earlier output's files while the new ones are put in place
# `.earlier/` renamed once every new file is in place, then deleted: a command killed before the
# deletion ends leaves it, and the next one removes it (the files in it were replaced, whole)
SUPERSEDED_DIR = ".superseded"
# The files a dataset command writes (subset's urls.parquet named here: subset imports this module)
_OURS = shard_files([".tar", "_img_emb.npy", "_txt_emb.npy"], [METADATA_FILE, MANIFEST_FILE, "urls.parquet", SHARDS_FILE])


class CommitError(OSError):
    """The new output could not be put in place; its message (strerror) says what is where."""


def _said(e: OSError) -> str:
    return f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"


def _held(folder: Path) -> list[str]:
    """The paths (relative, sorted) of what `folder` holds but folders; [] where it is none or
    holds only folders; the folder's own name where it is something else (a file, a link)."""
    try:
        if not folder.is_dir() or folder.is_symlink():
            return [folder.name] if folder.is_symlink() or folder.exists() else []
        found = []
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                found += [f"{entry.name}/{name}" for name in _held(Path(entry.path))]
            else:
                found.append(entry.name)
        return sorted(found)
    except FileNotFoundError:
        return []


def _files(names: list[str], shown: int = 6) -> str:
    """Names as "2 files (a, b)"; past `shown` of them, the first ones and how many more."""
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"{len(names)} file{'s' * (len(names) != 1)}" + (f" ({listed})" if names else "")


class Staging(abc.ABC):
    """Files written under a folder's `.partial/` (`path`) and put in place together (`commit`),
    replacing the folder's earlier ones of the same kind (`earlier_files`): an OutputDir, or
    `fastlaion index`'s folder. `written(folder)` is called once the new files are whole in place
    (a Ctrl-C from then on leaves them so), before a Ctrl-C that came while they were put there
    lands. `what` names them in messages ("output", "index"); `last`, where one file makes the
    others valid (index.json), is moved aside first and put in place last, so that at no moment
    is it beside files of another build."""

    what = "output"
    last: str | None = None
    command = "dataset command"  # in the folder's lock file while it writes there, to name it to another one
    busy = "wait for it to end, or choose another output folder"  # what a second command is told to do

    def __init__(self, out: Path, written: Callable[[Path], None] | None = None, command: str | None = None):
        self.out = Path(out)
        self.written = written
        self.command = command or self.command
        self.committing = False  # the earlier files are being replaced: no going back
        self.tmp = self.out / PARTIAL_DIR

    def path(self, name: str) -> Path:
        return self.tmp / name

    def _clear_leftovers(self) -> None:
        """Remove what an earlier command left under `.partial/` (its new files, never put in
        place) and an empty `.earlier/`; refuse (DatasetError, nothing changed) while `.earlier/`
        holds a file: the earlier output put aside by a commit that could not put it back (the
        CommitError named it there) or that was killed midway, which may be the only copy. Both
        folders used to be removed, the earlier output with them, by whichever command came next.
        A `.superseded/` (a commit killed after every new file was in place) is removed. A commit
        killed midway (SIGKILL, the OOM killer: its journal, COMMIT_FILE, is there) is finished
        first (`_finish_stopped_commit`)."""
        self._finish_stopped_commit()
        aside = self.out / EARLIER_DIR
        held = _held(aside)
        if held:
            raise DatasetError(f"{self.out}: {aside} holds {_files(held)} of an earlier {self.what}, put aside by a "
                               f"command that failed or was stopped while it replaced it; nothing was changed: move "
                               f"them away, or back into {self.out}, then rerun")
        shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(self.out / SUPERSEDED_DIR, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _finish_stopped_commit(self) -> None:
        """Put in place the rest of the new files of a commit that was killed midway, as its
        journal lists them: they were whole under `.partial/` before its first rename, and each
        is now there or in place. Such a folder held some earlier and some new files (an earlier
        output's tars moved aside while its metadata.parquet stayed, say), which `stats` read as
        a whole output, and the next command refused it until `.earlier/` was emptied by hand.
        The earlier files it replaced (in `.earlier/`, or still in place where not replaced by
        a new file of the same name) are deleted, as the commit would have deleted them. A journal
        cut short (killed while it was written) means no file was moved: it goes, and the new
        files with `.partial/`."""
        journal = self.out / COMMIT_FILE
        plan = stopped_commit(self.out)
        if plan is None:
            journal.unlink(missing_ok=True)
            return
        new = self._ordered([n for n in plan["new"] if isinstance(n, str)], last=True)
        if self.last in new and (self.tmp / self.last).exists():  # the earlier one leaves first, as in commit
            (self.out / self.last).unlink(missing_ok=True)
        for name in plan["earlier"]:
            if isinstance(name, str) and name not in new:
                (self.out / name).unlink(missing_ok=True)
        for name in new:
            if (self.tmp / name).exists():
                os.replace(self.tmp / name, self.out / name)
        journal.unlink()
        shutil.rmtree(self.out / EARLIER_DIR, ignore_errors=True)
        log.warning("%s: the command that wrote its %s was stopped while it put it in place; the rest of it is in "
                    "place now", self.out, self.what)

    @abc.abstractmethod
    def earlier_files(self) -> list[str]:
        """The names of the folder's files that the new ones replace (those not among the new
        ones are deleted): each kind of folder says which are its own."""

    def mixed(self) -> str:
        """What to add to the message where the folder is left holding files of both builds."""
        return ""

    @contextmanager
    def building(self) -> Iterator[Staging]:
        """Lock the folder while the new files are written and put in place (writer.output_lock:
        a second command writing into it, another dataset command or a `fastlaion run`, is refused
        at once, in one line naming it; two used to clear each other's `.partial/` and interleave
        their renames, and one into a folder a run had just begun removed the run's shards in
        progress), clear an earlier command's leftovers (`_clear_leftovers`), then commit the new
        files when the block ends; on any failure (Ctrl-C included) before the commit begins drop
        them, so the earlier output, if any, stays as it was. A folder this command made goes
        again if nothing was put in it."""
        from ..writer import output_lock

        made = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            with output_lock(self.out, self.command, self.busy):
                self._clear_leftovers()
                self.tmp.mkdir(mode=0o700)  # its owner's only: a file may get a narrower mode at the commit
                try:
                    yield self
                    self.commit()
                except BaseException:
                    if not self.committing:  # a failure while the files move keeps those not moved yet
                        self.abort()
                    raise
        finally:
            if made:
                try:
                    self.out.rmdir()  # only when empty: its lock file is gone
                except OSError:
                    pass

    def _ordered(self, names: list[str], last: bool) -> list[str]:
        names = sorted(names)
        if self.last in names:
            names.remove(self.last)
            names.insert(len(names) if last else 0, self.last)
        return names

    def commit(self) -> None:
        """Replace this folder's earlier files with the new ones: through a Ctrl-C, which lands
        once they are all in place (it used to stop this midway, the earlier files removed and
        only some new ones moved, while the command said nothing was replaced).

        A new file that replaces one gets that file's mode (a metadata.parquet kept from others
        with 0o640 stays so), as `write_whole` does; one that replaces none keeps the umask's. It
        used to get the umask's always. Until then `.partial/` is its owner's only (0o700).
        The earlier files are moved aside (`.earlier/`) first and deleted once the new ones
        are all in place. A failed rename (a full disk, a folder gone read-only) undoes the ones
        made, so the folder is as it was; where undoing fails too, the error (`CommitError`, one
        line) names what is in the folder and where the rest is. It used to leave the earlier
        files deleted, some new ones in place and the others in `.partial/`, and say only the
        disk's error. What it names in `.earlier/` stays there: the next command into the folder
        is refused until it is moved (`_clear_leftovers`)."""
        with ctrl_c_deferred():
            self.committing = True
            old = self._ordered(self.earlier_files(), last=False)
            new = self._ordered([p.name for p in self.tmp.iterdir()], last=True)
            aside = self.out / EARLIER_DIR  # none: an earlier command's was refused or removed (_clear_leftovers)
            journal = self.out / COMMIT_FILE
            moved_aside: list[str] = []
            moved_in: list[str] = []
            try:
                for name in new:
                    if name in old:  # the replaced file's mode, not the umask's
                        os.chmod(self.tmp / name, stat.S_IMODE(os.stat(self.out / name).st_mode))
                # What the renames are, for the next command to finish them where a SIGKILL stops
                # them midway (ctrl_c_deferred holds off SIGINT and SIGTERM only); written in one
                # call, without a rename of its own (one cut short means nothing was moved yet).
                fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, json.dumps({"earlier": old, "new": new}).encode())
                finally:
                    os.close(fd)
                if old:
                    aside.mkdir()
                for name in old:
                    os.replace(self.out / name, aside / name)
                    moved_aside.append(name)
                for name in new:
                    os.replace(self.tmp / name, self.out / name)
                    moved_in.append(name)
            except OSError as e:
                raise self._undo(e, old, new, moved_aside, moved_in) from None
            if old:  # every new file in place: what is aside is superseded, whatever stops this now
                superseded = self.out / SUPERSEDED_DIR
                shutil.rmtree(superseded, ignore_errors=True)
                try:
                    os.replace(aside, superseded)
                    aside = superseded
                except OSError:
                    pass  # deleted where it is, below
            journal.unlink(missing_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            if self.written is not None:
                self.written(self.out)

    def _undo(self, error: OSError, old: list[str], new: list[str], moved_aside: list[str],
              moved_in: list[str]) -> CommitError:
        """After `error` stopped the commit: the renames made so far undone, the new files dropped;
        the error to raise, which says what is where."""
        aside = self.out / EARLIER_DIR
        what = self.what
        failed = f"{self.out}: could not put the new {what} in place ({_said(error)})"
        try:  # what is where is said (and .earlier/ kept) by the error below, not finished by the next command
            (self.out / COMMIT_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        try:
            while moved_in:
                os.replace(self.out / moved_in[-1], self.tmp / moved_in[-1])
                moved_in.pop()
            while moved_aside:
                os.replace(aside / moved_aside[-1], self.out / moved_aside[-1])
                moved_aside.pop()
        except OSError as again:
            in_place = [n for n in old if n not in moved_aside]
            held = ([f"{_files(moved_in)} of the new {what}"] if moved_in else []) \
                + ([f"{_files(in_place)} of the earlier one"] if in_place else [])
            where = ["it holds " + (" and ".join(held) if held else f"no file of either {what}")]
            if len(moved_in) < len(new):
                rest = [n for n in new if n not in moved_in]
                where.append(f"the new {what}'s {'other ' * bool(moved_in)}{_files(rest)} in {self.tmp}")
            if moved_aside:
                where.append(f"the earlier {what}'s {_files(sorted(moved_aside))} in {aside}")
            return CommitError(error.errno, f"{failed}, nor undo it ({_said(again)}): " + "; ".join(where)
                               + self.mixed())
        shutil.rmtree(aside, ignore_errors=True)
        self.abort()
        return CommitError(error.errno, f"{failed}; " + (f"its earlier {what} is as it was" if old
                                                         else "nothing was written") + "; rerun the command")

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class OutputDir(Staging):
    """The output folder of subset, dedup or classify: its earlier output is the files of ours
    in it (a run's config.json too where it holds an output of ours)."""

    def __init__(self, out: Path, source: Dataset, written: Callable[[Path], None] | None = None,
                 command: str | None = None):
        out = Path(out)
        check_output_folder(out)
        src_dir = source.path if source.path.is_dir() else source.path.parent
        if out.exists() and out.resolve() in (src_dir.resolve(), source.root.resolve()):
            raise DatasetError(f"-o {out} is the dataset's own folder; write the result to another one")
        if out.is_dir() and any(SHARD_PARQUET.match(p.name) for p in out.iterdir()):
            raise DatasetError(f"-o {out} holds a fastlaion run (NNNNN.parquet files); write the result to another folder")
        if out.is_dir() and not (out / MANIFEST_FILE).is_file() and stopped_commit(out) is None:
            # files named as ours, in a folder no command of ours finished writing: someone's
            # webdataset tars (NNNNN.tar), which were deleted as the "earlier output"
            named = sorted(p.name for p in out.iterdir() if p.is_file() and _OURS.match(p.name))
            if named:
                raise DatasetError(f"-o {out} holds {_files(named)} named as a fastlaion output's but no {MANIFEST_FILE} "
                                   "(not written by fastlaion, or left by a command stopped midway), which the output "
                                   "would replace; move them away or choose another folder")
        self.source = source
        super().__init__(out, written, command)

    def earlier_files(self) -> list[str]:
        earlier = (self.out / MANIFEST_FILE).is_file()
        return [p.name for p in self.out.iterdir()
                if p.is_file() and (_OURS.match(p.name) or (earlier and p.name == RUN_CONFIG))]

    def write_manifest(self, info: dict[str, Any], own_root: bool = False) -> None:
        """dataset.json: the source's provenance and `info`; `own_root`: this folder holds its
        samples' tars and embeddings itself (subset --shards), so it is its own root."""
        manifest = self.source.manifest(self.out)
        if own_root:
            manifest.update(root_fields(self.out, self.out), source_root=manifest["root"])
        manifest.update(self.source.root_record(self._shards(), self.tmp if own_root else None))
        manifest.update(info)  # info has the skips of the final attempt
        (self.tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))

    def _shards(self) -> list[str]:
        """The root shards the new metadata.parquet's rows name (its `shard` column's values)."""
        import polars as pl

        meta = self.tmp / METADATA_FILE
        if not meta.is_file():
            return []
        rows = pl.scan_parquet(meta, glob=False)
        if "shard" not in rows.collect_schema():
            return []
        return collect(rows.select(pl.col("shard").drop_nulls().unique()))["shard"].to_list()

    def finish(self, kind: str, result: Any, started: float, own_root: bool = False) -> None:
        """Stamp `result` with its wall time and write it into the manifest as a `kind` result."""
        result.seconds = round(time.perf_counter() - started, 3)
        self.write_manifest({"kind": kind, **result.to_dict()}, own_root)


def check_output_folder(out: Path) -> None:
    """Refuse, before the command's work, an -o that is a file or under one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"-o {out}: exists and is not a folder")
    no_file_above("-o", out)


def check_writable_file(flag: str, path: Path) -> None:
    """Refuse, before the command's work, a file `write_whole` could not write at its end (the
    command's result lost with it: `search --json DIR` searched for 20 s, then "Is a directory"
    and no hit printed): a folder, a path under a missing folder or under a file, a folder this
    user may not write in (a permission check: a read-only file system is found when written).
    `-` is stdout (STDOUT), always writable."""
    path = Path(path)
    if is_stdout(path):
        return
    if path.is_dir():
        raise DatasetError(f"{flag} {path}: is a folder; give a file name")
    parent = path.parent
    for folder in (parent, *parent.parents):  # the nearest that exists: a folder, or a file in the way
        if folder.exists():
            if not folder.is_dir():
                raise DatasetError(f"{flag} {path}: {folder} is a file, not a folder")
            break
    if not parent.is_dir():
        raise DatasetError(f"{flag} {path}: no folder {parent}")
    if not (path.exists() and os.access(path, os.W_OK)) and not os.access(parent, os.W_OK | os.X_OK):
        raise DatasetError(f"{flag} {path}: cannot write in {parent} (permission denied)")


# The files of a dataset's folder (a run's, a subset's, a dedup's, a classify's): none is a place for
# a report. A file of another name there (DS/stats.json, DS/report.html) is the user's to write.
_DATASET_FILE = shard_files(others=[METADATA_FILE, MANIFEST_FILE, "urls.parquet", SHARDS_FILE, RUN_CONFIG, SUMMARY_FILE,
                                    "demo_urls.parquet"])


def refuse_a_dataset_file(flag: str, path: Path, ds: Dataset) -> None:
    """Refuse `path` where it is one of the dataset's own files: `stats DS --json DS/00000.parquet`
    wrote the figures over the shard's rows, `search DS --json DS/config.json` over the run's
    settings (what its resume is checked against)."""
    if is_stdout(path):
        return
    target = Path(path).resolve()
    folders = {ds.root.resolve(), (ds.path if ds.path.is_dir() else ds.path.parent).resolve()}
    if target in {f.resolve() for f in ds.files} or (target.parent in folders and _DATASET_FILE.match(target.name)):
        raise DatasetError(f"{flag} {path}: a file of the dataset {ds.path}, which it would be written over; "
                           "give another file name")


STDOUT = "-"  # a file name meaning stdout (`stats --json -`), as for jq, curl -o - and pip --report -


def is_stdout(path: Path | str | None) -> bool:
    return path is not None and str(path) == STDOUT


def shown(path: Path | str) -> str:
    """How a message names a file written: `-` is "stdout"."""
    return "stdout" if is_stdout(path) else str(path)


def write_whole(path: Path, text: str, written: Callable[[Path], None] | None = None) -> None:
    """`text` into the file `path`, whole or not at all: written aside, then renamed over it, so
    a Ctrl-C or a full disk while it is written leaves the earlier file, if any, as it was (it
    used to be cut short). `written(path)` is called once it is in place, before a Ctrl-C that
    came while it was renamed lands. A failure names `path`, not the file aside. A file replaced
    keeps its mode; a new one gets the umask's. A link is followed (the file it names is replaced);
    a device or a pipe (/dev/stdout) is written through. `-` is stdout: the text and a newline in
    one write, which a Ctrl-C does not cut (it lands once the text is out and `written` told)."""
    path = Path(path)
    if is_stdout(path):
        with ctrl_c_deferred():
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            sys.stdout.flush()
            if written is not None:
                written(path)
        return
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        real = path.resolve() if path.is_symlink() else path
        tmp = real.with_name(real.name + ".partial")
        if path.exists() and (not path.is_file() or path.as_posix().startswith(("/dev/", "/proc/"))):
            # nothing to keep, nowhere to write aside (/dev/stdout may be a file the shell opened)
            path.write_text(text, encoding="utf-8")
            if written is not None:
                written(path)
            return
        try:
            mode = stat.S_IMODE(os.stat(real).st_mode)
        except FileNotFoundError:
            mode = None  # a new file: the umask's mode
        try:
            if mode is not None:  # the text aside readable by its owner only until it has the file's mode
                tmp.touch()
                os.chmod(tmp, 0o600)
            tmp.write_text(text, encoding="utf-8")
            if mode is not None:
                os.chmod(tmp, mode)  # the replaced file's, not the umask's
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
        with ctrl_c_deferred():
            os.replace(tmp, real)
            if written is not None:
                written(path)
    except OSError as e:
        if e.errno is None or e.filename == str(path):
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from None


__all__ = ["CommitError", "OutputDir", "METADATA_FILE", "Staging", "STDOUT", "check_output_folder", "check_writable_file", "is_stdout",
           "refuse_a_dataset_file", "shown", "write_whole"]
