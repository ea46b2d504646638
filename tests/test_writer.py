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


# --- LAION's hash column ----------------------------------------------------------------------------

def laions_compute_hash(url, text):
    """laion-prepro's compute_hash (laion5B/watermark/big_join.py, which wrote the `hash` column of
    the laion2B-en/multi/1B-nolang "joined" releases), written out here with the mmh3 package."""
    import mmh3

    if url is None:
        url = ""
    if text is None:
        text = ""
    return mmh3.hash64((url + text).encode("utf-8"))[0]


PAIRS = [  # hand-written (url, caption) pairs
    ("https://example.com/cat.jpg", "a cat on a mat"),
    (("http://i0.wp.com/ajournalofmusicalthings.com/wp-content/uploads/2016/05/Banjoe-the-Bulldog-copy.jpg"
      "?resize=290%2C166"), "Banjoe the Bulldog copy"),  # laion-prepro's usage guide's example
    ("https://例え.テスト/画像.png", "Ein Bild: Größe ÷ 2 — ok 🐈"),  # non-ASCII: UTF-8 bytes, not UTF-16
    ("https://example.com/no-caption.jpg", None),  # no caption: hashed as url + ""
    ("https://example.com/empty.jpg", ""),
    (None, "a caption without a url"),
    ("fo", "o"),
]


def test_laion_hash_is_mmh3_hash64_of_url_plus_text_as_laion_computed_it():
    import polars as pl

    from fastlaion.writer import laion_hash, laion_hash_expr

    urls = pl.Series([u for u, _ in PAIRS], dtype=pl.String)
    captions = pl.Series([c for _, c in PAIRS], dtype=pl.String)
    expected = [laions_compute_hash(u, c) for u, c in PAIRS]
    got = laion_hash(urls, captions)
    assert got.dtype == pl.Int64 and got.name == "hash"
    assert got.to_list() == expected
    # the lazy expression (readers of shards written before the column) gives the same values
    lazy = pl.LazyFrame({"url": urls, "caption": captions}).select(laion_hash_expr()).collect()
    assert lazy["hash"].to_list() == expected
    # a null caption is url + "", as LAION's None -> ""
    assert got[3] == laions_compute_hash("https://example.com/no-caption.jpg", "")
    # literals, not computed: mmh3's README gives hash64("foo") = (-2129773440516405919, ...), and
    # MurmurHash3 of no bytes with seed 0 is 0 (signed: LAION's column is a Spark LongType)
    assert got[6] == -2129773440516405919
    assert laion_hash(pl.Series([""]), pl.Series([None], dtype=pl.String)).to_list() == [0]


def _hash_route_server(photos):
    """A loopback server: three photos, and /once/NAME, which answers 503 the first time."""
    from aiohttp import web
    from helpers import encode

    from fastlaion.server import LoopbackServer, Served

    images = {f"{n}.jpg": encode(a[:200, :200]) for n, a in photos.items()}
    seen: set[str] = set()

    async def once(request: web.Request) -> web.Response:
        if request.path not in seen:
            seen.add(request.path)
            return web.Response(status=503, text="later\n")
        return web.Response(body=images[request.match_info["name"]], content_type="image/jpeg")

    files = {name: Served(body, "image/jpeg") for name, body in images.items()}
    return LoopbackServer(files, extra_routes=[web.get("/once/{name}", once)])


def _run_args(inp, out, *extra):
    return ["run", str(inp), "-o", str(out), "--allow-private-networks", "--no-score", "--no-language",
            "--retries", "0", "--timeout", "5", "--no-progress", "--shard-size", "3", *extra]


def _shard_rows(out):
    import polars as pl

    return pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))], how="diagonal_relaxed")


def test_a_run_writes_laions_hash_on_every_row_kept_or_dropped(tmp_path, photos):
    import polars as pl
    from typer.testing import CliRunner

    from fastlaion.cli import app

    with _hash_route_server(photos) as server:
        rows = [  # (url, caption in the input, caption as the Parquet holds it: cleaned)
            (server.url("chelsea.jpg"), "a cat", "a cat"),
            (server.url("coffee.jpg"), "Kaffee für zwei ☕", "Kaffee für zwei ☕"),
            (server.url("missing.jpg"), "a dead link", "a dead link"),                 # http_404
            ("", "no url at all", "no url at all"),                                     # invalid_url
            (server.url("rocket.jpg"), "bell\x07 and\x00 null", "bell and null"),       # control chars
            (server.url("astronaut.jpg"), None, None),                                  # no caption
        ]
        inp = tmp_path / "in.parquet"
        pl.DataFrame({"url": [u for u, _, _ in rows], "caption": [c for _, c, _ in rows]},
                     schema={"url": pl.String, "caption": pl.String}).write_parquet(inp)
        result = CliRunner().invoke(app, _run_args(inp, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    table = _shard_rows(tmp_path / "out")
    assert table.schema["hash"] == pl.Int64
    assert table["status"].to_list()[:4] == ["kept", "kept", "dropped", "dropped"]
    assert table["caption"].to_list()[4] == "bell and null"
    assert table["hash"].null_count() == 0
    assert table["hash"].to_list() == [laions_compute_hash(u or None, c) for u, _, c in rows]
    # every shard's Parquet has it, right after caption
    for p in sorted((tmp_path / "out").glob("[0-9]*.parquet")):
        assert pl.read_parquet(p).columns[:4] == ["key", "url", "caption", "hash"]
    # and each kept sample's key.json, after its caption (a sample joins LAION's files by it too)
    import json
    import tarfile

    samples = {}
    for tar in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(tar) as tf:
            samples |= {m.name[:-5]: json.loads(tf.extractfile(m).read()) for m in tf if m.name.endswith(".json")}
    kept = table.filter(pl.col("status") == "kept")
    assert sorted(samples) == sorted(kept["key"].to_list()) and len(samples) == kept.height >= 3
    for key, url, caption in kept.select("key", "url", "caption").iter_rows():
        assert list(samples[key])[:4] == ["key", "url", "caption", "hash"]
        assert samples[key]["hash"] == laions_compute_hash(url, caption)


def _as_written_before_the_hash_column(out, shard: int) -> None:
    """Rewrite a finished shard's Parquet without `hash` (as fastlaion wrote it before), its stats
    file's recorded size updated to match, so that the run folder reads as an older one's."""
    import json

    import polars as pl

    parquet = out / f"{shard:05d}.parquet"
    pl.read_parquet(parquet).drop("hash").write_parquet(parquet, compression="zstd", statistics=True)
    stats_file = out / f"{shard:05d}_stats.json"
    stats = json.loads(stats_file.read_text())
    stats["files"][parquet.name] = parquet.stat().st_size
    stats_file.write_text(json.dumps(stats))


def test_a_folder_whose_older_shards_lack_the_hash_resumes_and_every_reader_takes_it(tmp_path, photos):
    import json

    import polars as pl
    from typer.testing import CliRunner

    from fastlaion.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    with _hash_route_server(photos) as server:
        rows = [(server.url("chelsea.jpg"), "a cat"), (server.url("once/coffee.jpg"), "coffee, once refused"),
                (server.url("missing.jpg"), "a dead link"),
                (server.url("rocket.jpg"), "a rocket"), (server.url("astronaut.jpg"), None),
                (server.url("chelsea.jpg"), "a cat"),  # the first row again: same hash
                (server.url("coffee.jpg"), "coffee"), (server.url("rocket.jpg"), "another rocket")]
        inp = tmp_path / "in.parquet"
        pl.DataFrame({"url": [u for u, _ in rows], "caption": [c for _, c in rows]},
                     schema={"url": pl.String, "caption": pl.String}).write_parquet(inp)
        first = runner.invoke(app, _run_args(inp, out))
        assert first.exit_code == 0, first.output
        # shards 0 and 1 as an earlier fastlaion wrote them; shard 2 not written yet (run stopped)
        for shard in (0, 1):
            _as_written_before_the_hash_column(out, shard)
        for f in [*out.glob("00002*"), out / "summary.json"]:
            f.unlink()
        old = {s: (out / f"0000{s}.parquet").read_bytes() for s in (0, 1)}

        resumed = runner.invoke(app, _run_args(inp, out))
        assert resumed.exit_code == 0, resumed.output
        assert {s: (out / f"0000{s}.parquet").read_bytes() for s in (0, 1)} == old  # not written again
        assert "hash" not in pl.read_parquet(out / "00001.parquet").columns
        assert "hash" in pl.read_parquet(out / "00002.parquet").columns

        expected = [laions_compute_hash(u, c) for u, c in rows]
        # stats reads the mixed folder
        stats = runner.invoke(app, ["stats", str(out), "--json", str(tmp_path / "s.json")])
        assert stats.exit_code == 0, stats.output
        assert json.loads((tmp_path / "s.json").read_text())["rows"] == len(rows)
        # a subset of it holds every row's hash: computed on read for the older shards
        sub = runner.invoke(app, ["subset", "--where", "true", "--from", str(out), "-o", str(tmp_path / "sub"),
                                  "--no-progress"])
        assert sub.exit_code == 0, sub.output
        meta = pl.read_parquet(tmp_path / "sub" / "metadata.parquet")
        kept = [k for k, s in zip(_shard_rows(out)["key"], _shard_rows(out)["status"]) if s == "kept"]
        assert meta["key"].to_list() == kept
        by_key = dict(zip(_shard_rows(out)["key"], expected))
        assert meta["hash"].to_list() == [by_key[k] for k in kept]
        # dedup --by hash, LAION's key: row 5 repeats row 0 (an older shard's row, computed on read)
        dd = runner.invoke(app, ["dedup", "--by", "hash", "--from", str(out), "-o", str(tmp_path / "dd"),
                                 "--no-progress"])
        assert dd.exit_code == 0, dd.output
        marked = pl.read_parquet(tmp_path / "dd" / "metadata.parquet").filter(pl.col("reason") == "duplicate_hash")
        assert marked.select("key", "duplicate_of").rows() == [("00001" + "2", "00000" + "0")]

        # --retry-failed rewrites the older shard 0 (its 503): every row of it gets the hash
        retried = runner.invoke(app, _run_args(inp, out, "--retry-failed"))
        assert retried.exit_code == 0, retried.output
    shard0 = pl.read_parquet(out / "00000.parquet")
    assert shard0["status"].to_list() == ["kept", "kept", "dropped"]
    assert shard0.columns[:4] == ["key", "url", "caption", "hash"]
    assert shard0["hash"].to_list() == expected[:3]
