"""The output folder's lock (`OUT/.lock`): held by the fastlaion command writing the folder, so
that a second one into it is refused at once. In a module of its own, free of numpy and Polars:
`fastlaion extract`, which never loads them, takes it too (fastlaion.writer imports these names).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".lock"  # flocked by the command writing the folder (output_lock): "PID COMMAND" in it


def lock_held(out_dir: Path) -> bool:
    """Whether a command holds the folder's lock now (it is writing there). Probed by taking the lock
    shared for an instant: flock has no way to ask without taking it (output_lock retries
    briefly, so a command starting in that instant is not refused); lock_holder says which
    command it is (a run's, or a dataset command's writing its output there)."""
    import fcntl

    try:
        f = open(out_dir / LOCK_FILE, "rb")  # noqa: SIM115 (closed below)
    except OSError:  # no lock file: no run holds one (output_lock removes it before letting go)
        return False
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without flock: nothing can be told
        return False
    finally:
        f.close()  # releases the shared lock, if taken
    return False


LOCK_RETRIES_S = (0.02, 0.05, None)  # waits before trying the lock again; None: refuse
# flock's errors on a file system that does not lock (FUSE mounts of object stores, some NFS setups)
NO_FLOCK_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


@contextmanager
def output_lock(out: Path, command: str = "run", advice: str = "wait for it to end, or choose another output "
                "folder") -> Iterator[None]:
    """Held while a command writes into `out`: `fastlaion run` for the whole run, `fastlaion
    extract` for its whole extraction (a second one removed the first one's .extract-partial/),
    and subset, dedup, classify and index (`command`) while they write their output
    (dataset.output.Staging).
    Another one into the same folder, of either kind, is refused at once, naming the command and
    its process, then `advice`: a second run would take the first one's shards in progress under
    .partial/ for a crash's leftovers and remove them, and a dataset command would too (and a
    run the dataset command's .partial/, or two dataset commands each other's, their renames
    interleaved). The lock file holds "PID COMMAND" (an earlier fastlaion's, the PID only: a
    run's; lock_holder). An flock: it ends with its process, however that ends; on a network file
    system it may guard one machine only. On a file system that cannot lock (NO_FLOCK_ERRNOS) it
    warns and writes unguarded, as fastlaion did before; flock's other errors are raised."""
    import fcntl

    path = out / LOCK_FILE
    while True:
        f = open(path, "a+")  # noqa: SIM115 (closed below, or when the lock is let go)
        try:
            for wait_s in LOCK_RETRIES_S:  # a dataset command's probe (lock_held) holds it for an instant
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if wait_s is None:
                        raise
                    time.sleep(wait_s)
        except BlockingIOError:
            f.seek(0)
            pid, other = _holder(f.read())
            f.close()
            raise ConfigError(f"{out}: {'another' if other == command else 'a'} fastlaion {other} is writing into "
                              f"it (process {pid}); {advice}") from None
        except OSError as e:
            if e.errno not in NO_FLOCK_ERRNOS:
                f.close()
                raise OSError(e.errno, e.strerror, str(path)) from None
            # A file system that locks nothing (some FUSE mounts: s3fs, gcsfuse...): write anyway,
            # as before there was a lock, and say what is not guarded.
            logging.getLogger(__name__).warning(
                "%s: this file system cannot lock files (%s), so nothing stops another fastlaion command from "
                "writing into the folder at the same time; run one at a time there", out, e.strerror or e)
            break
        try:  # the holder removes the file as it lets go: one opened before that is locked by nobody else
            current = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {command}\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a command that opens it now makes a new one
        f.close()


def _holder(text: str) -> tuple[str, str]:
    words = text.split()
    return (words[0] if words else "?"), (words[1] if len(words) > 1 else "run")


def lock_holder(out_dir: Path) -> tuple[str, str] | None:
    """(process id, command) that the folder's lock file records: of the command holding its lock
    now, or of one killed while it held it (the file stays); None where there is no lock file."""
    try:
        return _holder((out_dir / LOCK_FILE).read_text(errors="replace"))
    except FileNotFoundError:
        return None
    except OSError:
        return "?", "run"  # there, but unreadable: as before the file named its command
