"""The shard tar writer against the standard library's tarfile, byte for byte."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from fastlaion.writer import TarAppender

MTIME = 1_764_000_000.75
MEMBERS = [("000000000.jpg", b"\xff\xd8" + bytes(range(256)) * 40), ("000000000.txt", b""),
           ("000000000.json", b'{"key": "000000000"}'), ("000000001.jpg", b"x" * 512),
           ("000000001.txt", b"y" * 513), ("a" * 100, b"z" * 10_239)]


def _tarfile_bytes(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    with tarfile.open(path, mode, format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_tar_appender_writes_what_tarfile_writes(tmp_path: Path) -> None:
    ours = TarAppender(tmp_path / "ours.tar", MTIME)
    for name, data in MEMBERS:
        ours.add(name, data)
    ours.close()
    assert (tmp_path / "ours.tar").read_bytes() == _tarfile_bytes(tmp_path / "ref.tar", MEMBERS)
    with tarfile.open(tmp_path / "ours.tar") as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == MEMBERS


def test_tar_appender_appends_as_tarfile_does(tmp_path: Path) -> None:
    first, more = MEMBERS[:3], MEMBERS[3:]
    _tarfile_bytes(tmp_path / "ours.tar", first)
    ours = TarAppender(tmp_path / "ours.tar", MTIME, append=True)
    for name, data in more:
        ours.add(name, data)
    ours.close()
    _tarfile_bytes(tmp_path / "ref.tar", first)
    assert (tmp_path / "ours.tar").read_bytes() == _tarfile_bytes(tmp_path / "ref.tar", more, mode="a")


def test_tar_appender_refuses_a_long_name(tmp_path: Path) -> None:
    ours = TarAppender(tmp_path / "ours.tar", MTIME)
    with pytest.raises(ValueError, match="over 100 bytes"):
        ours.add("k" * 101, b"")
    ours.close()
    with tarfile.open(tmp_path / "ours.tar") as tar:
        assert tar.getmembers() == []


def test_abort_waits_for_a_batch_being_written(tmp_path: Path, monkeypatch) -> None:
    """A cancelled shard's abort() on the loop waits for the batch the write thread is writing,
    so that write neither fails on a closed file nor lands after the folder is gone."""
    import threading
    import time

    import polars as pl

    from fastlaion.batch import Batch
    from fastlaion.writer import ShardWriter

    writer = ShardWriter(tmp_path, 0, 4, 10, None)
    slow = TarAppender.add_many

    def add_many(self, members):
        started.set()
        time.sleep(0.3)
        slow(self, members)

    started, errors = threading.Event(), []
    monkeypatch.setattr(TarAppender, "add_many", add_many)
    batch = Batch(pl.DataFrame({"row": [0, 1], "caption": ["a", "b"]}),
                  payload={"stored": [b"x", b"y"], "stored_ext": ["jpg", "jpg"]})

    def write() -> None:
        try:
            writer.add_samples(batch)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=write)
    thread.start()
    started.wait(5)
    writer.abort()
    assert not thread.is_alive()  # abort returned only once the batch was written
    thread.join()
    assert errors == [] and writer.samples == 2
    assert not writer.tmp.exists()
    writer.add_samples(batch)  # one that reaches the lock after abort(): dropped with the shard, no error
    assert writer.samples == 2


def test_a_lock_let_go_while_it_is_waited_for_is_taken_on_the_file_there_now(tmp_path, monkeypatch):
    """output_lock waiting (its retries) on a lock file whose holder lets go removes that file; a
    third command then makes a new one and locks it. The waiting one used to lock the removed
    file and go on beside the third; now it locks the file there now, and is refused naming the
    third."""
    from fastlaion import writer
    from fastlaion.config import ConfigError

    first = writer.output_lock(tmp_path, "subset")
    first.__enter__()
    third = []

    def sleep(seconds):  # while the second waits: the first lets go, a third takes the folder
        if not third:
            first.__exit__(None, None, None)
            third.append(writer.output_lock(tmp_path, "dedup"))
            third[0].__enter__()

    monkeypatch.setattr(writer.time, "sleep", sleep)
    with pytest.raises(ConfigError) as refused:
        with writer.output_lock(tmp_path, "index"):
            pass
    assert str(refused.value) == (f"{tmp_path}: a fastlaion dedup is writing into it (process {os.getpid()}); wait "
                                  "for it to end, or choose another output folder")
    third[0].__exit__(None, None, None)
    assert not (tmp_path / writer.LOCK_FILE).exists()
