"""--retry-failed: a rerun downloads again only the rows that failed transiently (5xx, 429,
timeouts, connection errors) and rewrites only the shards that hold them."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from aiohttp import web
from helpers import encode
from test_pipeline import read_output, tiny_checkpoint
from typer.testing import CliRunner

from fastlaion.cli import app
from fastlaion.server import LoopbackServer

runner = CliRunner()
SHARD_SIZE = 4


class Flaky:
    """Routes /flaky/NAME?fail=N&status=S: the first N requests of a path answer S, the later
    ones serve the image NAME. Counts every request by path."""

    def __init__(self, images: dict[str, bytes]):
        self.images = images
        self.hits: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path_qs] += 1
        if self.hits[request.path_qs] <= int(request.query.get("fail", "0")):
            status = int(request.query.get("status", "503"))
            return web.Response(status=status, text="try later\n", headers={"Retry-After": "1"})
        return web.Response(body=self.images[request.match_info["name"]], content_type="image/jpeg")

    def route(self) -> web.RouteDef:
        return web.get("/flaky/{name}", self.handle)


@pytest.fixture
def flaky_case(photos):
    names = list(photos)
    images = {f"{i}.jpg": encode(photos[names[i % len(names)]][: 220 + 9 * i]) for i in range(12)}
    flaky = Flaky(images)
    # (path, expected after the first run, after one --retry-failed, after a second one)
    rows = [
        ("flaky/0.jpg", "kept", "kept", "kept"),                         # shard 0: nothing transient
        ("flaky/1.jpg", "kept", "kept", "kept"),
        ("missing.jpg", "http_404", "http_404", "http_404"),             # lasting: never retried
        ("flaky/3.jpg", "kept", "kept", "kept"),
        ("flaky/4.jpg", "kept", "kept", "kept"),                         # shard 1
        ("flaky/5.jpg?fail=1", "http_503", "kept", "kept"),
        ("flaky/6.jpg?fail=1&status=429", "http_429", "kept", "kept"),
        ("missing.jpg", "http_404", "http_404", "http_404"),
        ("flaky/8.jpg", "kept", "kept", "kept"),                         # shard 2
        ("flaky/9.jpg?fail=2&status=502", "http_502", "http_502", "kept"),
        ("flaky/10.jpg", "kept", "kept", "kept"),
        ("ftp://127.0.0.1/x.jpg", "invalid_url", "invalid_url", "invalid_url"),
    ]
    return flaky, rows


def _args(inp: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(inp), "-o", str(out), "--allow-private-networks", "--shard-size", str(SHARD_SIZE),
            "--retries", "0", "--timeout", "5", "--no-progress", "--no-language", *extra]


def _write_input(tmp_path: Path, server: LoopbackServer, rows) -> Path:
    urls = [p if "://" in p else server.url(p) for p, *_ in rows]
    path = tmp_path / "in.parquet"
    pl.DataFrame({"url": urls, "caption": [f"photo number {i}" for i in range(len(urls))]}).write_parquet(path)
    return path


def _outcomes(out: Path) -> list[str]:
    t = read_output(out)
    return [s if s == "kept" else r for s, r in zip(t["status"], t["reason"])]


def _files(out: Path, shard: int) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob(f"{shard:05d}*"))}


def _tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _check_shard_consistent(out: Path, shard: int) -> None:
    """Parquet, tar and stats of one shard agree, and the funnel adds up."""
    t = pl.read_parquet(out / f"{shard:05d}.parquet")
    stats = json.loads((out / f"{shard:05d}_stats.json").read_text())
    f = stats["funnel"]
    assert f["input"] == t.height == SHARD_SIZE
    assert f["kept"] == f["input"] - sum(sum(d.values()) for d in f["drops"].values())
    assert f["kept"] == t.filter(pl.col("status") == "kept").height
    dropped = t.filter(pl.col("status") == "dropped").group_by("reason").len()
    assert dict(dropped.iter_rows()) == {r: n for d in f["drops"].values() for r, n in d.items()}
    names = [n for n, _ in _tar(out / f"{shard:05d}.tar")]
    assert len(names) == len(set(names))  # no sample twice
    kept = set(t.filter(pl.col("status") == "kept")["key"])
    assert {n.rsplit(".", 1)[0] for n in names} == kept
    assert sorted(n.rsplit(".", 1)[1] for n in names) == sorted(["jpg", "json", "txt"] * len(kept))


def test_retry_failed_downloads_only_transient_rows_and_rewrites_only_their_shards(tmp_path, flaky_case):
    flaky, rows = flaky_case
    with LoopbackServer({}, extra_routes=[flaky.route()]) as server:
        inp = _write_input(tmp_path, server, rows)
        out = tmp_path / "out"
        first = runner.invoke(app, _args(inp, out, "--no-score"))
        assert first.exit_code == 0, first.output
        assert _outcomes(out) == [r[1] for r in rows]
        assert "3 row(s) failed for transient reasons" in first.output
        assert "rerun with --retry-failed" in first.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["transient"] == {"http_503": 1, "http_429": 1, "http_502": 1}
        before = {s: _files(out, s) for s in range(3)}
        tar1_before = _tar(out / "00001.tar")
        table_before = read_output(out)

        made = tmp_path / "subset"  # before the retry: it records the shards' write_id
        assert runner.invoke(app, ["subset", "--where", "true", "--from", str(out), "-o", str(made),
                                   "--no-progress"]).exit_code == 0
        write_ids = {s: json.loads((out / f"0000{s}_stats.json").read_text())["write_id"] for s in range(3)}

        hits_before = Counter(flaky.hits)
        second = runner.invoke(app, _args(inp, out, "--no-score", "--retry-failed"))
        assert second.exit_code == 0, second.output
        # the same write of each shard, rows added: a dataset made before still reads its samples there
        assert {s: json.loads((out / f"0000{s}_stats.json").read_text())["write_id"] for s in range(3)} == write_ids
        exported = runner.invoke(app, ["subset", "--where", "true", "--from", str(made), "-o", str(tmp_path / "own"),
                                       "--shards", "--no-progress"])
        assert exported.exit_code == 0 and "written again" not in exported.output, exported.output
        asked = flaky.hits - hits_before
        # only the three transient rows were asked for again, once each; the 404s were not
        assert asked == Counter({"/flaky/5.jpg?fail=1": 1, "/flaky/6.jpg?fail=1&status=429": 1,
                                 "/flaky/9.jpg?fail=2&status=502": 1})
        assert server.hits["/missing.jpg"] == 2  # both 404 rows, in the first run only
        assert _outcomes(out) == [r[2] for r in rows]
        assert _files(out, 0) == before[0]  # no transient failure: not a byte nor an mtime changed
        assert _files(out, 1) != before[1] and _files(out, 2) != before[2]

        # shard 1: the old samples are still there byte for byte, the two recovered rows appended
        tar1 = _tar(out / "00001.tar")
        assert tar1[:len(tar1_before)] == tar1_before
        assert sorted(n for n, _ in tar1[len(tar1_before):]) == sorted(
            f"00001{r}.{ext}" for r in (1, 2) for ext in ("jpg", "json", "txt"))
        for s in range(3):
            _check_shard_consistent(out, s)
        # rows not retried are unchanged in every column
        table = read_output(out)
        retried = table["url"].str.contains("fail=").to_numpy()
        assert table.filter(~pl.Series(retried)).equals(table_before.filter(~pl.Series(retried)))
        recovered = table.filter(pl.col("url").str.contains("5.jpg|6.jpg"))
        assert recovered["http_status"].to_list() == [200, 200] and recovered["attempts"].to_list() == [1, 1]
        assert recovered["sha256"].null_count() == 0 and (recovered["width"] > 0).all()

        stats1 = json.loads((out / "00001_stats.json").read_text())
        assert stats1["retries"] == [dict(stats1["retries"][0], rows=2, kept=2, failed_again=0)]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["retried"] == {"shards": 2, "rows": 3, "kept": 2, "failed_again": 1}
        assert summary["transient"] == {"http_502": 1}
        assert summary["funnel"]["input"] == 12 and summary["funnel"]["kept"] == 8
        assert "retried: 3 row(s)" in second.output and "2 kept now, 1 failed transiently again" in second.output
        assert not (out / ".partial").exists()

        # a second retry: only the row still failing is asked for, only its shard is rewritten
        after_second = {s: _files(out, s) for s in range(3)}
        hits_before = Counter(flaky.hits)
        third = runner.invoke(app, _args(inp, out, "--no-score", "--retry-failed"))
        assert third.exit_code == 0, third.output
        assert flaky.hits - hits_before == Counter({"/flaky/9.jpg?fail=2&status=502": 1})
        assert _files(out, 0) == after_second[0] and _files(out, 1) == after_second[1]
        assert _outcomes(out) == [r[3] for r in rows]
        _check_shard_consistent(out, 2)
        assert len(json.loads((out / "00002_stats.json").read_text())["retries"]) == 2
        assert "rerun with --retry-failed" not in third.output

        # nothing transient left: nothing is downloaded or touched
        final = {s: _files(out, s) for s in range(3)}
        hits_before = Counter(flaky.hits)
        fourth = runner.invoke(app, _args(inp, out, "--no-score", "--retry-failed"))
        assert fourth.exit_code == 0, fourth.output
        assert flaky.hits == hits_before and {s: _files(out, s) for s in range(3)} == final
        assert "nothing to do" in fourth.output

    import webdataset as wds

    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == sorted(read_output(out).filter(pl.col("status") == "kept")["key"])


def test_retry_failed_on_a_shard_an_earlier_fastlaion_wrote_keeps_its_identity(tmp_path, flaky_case):
    """A shard whose stats file has no write_id (an earlier fastlaion wrote it) is known to a
    subset by a digest of that file; --retry-failed adds rows to that same write, so the subset
    made before it still reads its samples there (it used to be refused: "written again")."""
    flaky, rows = flaky_case
    with LoopbackServer({}, extra_routes=[flaky.route()]) as server:
        inp = _write_input(tmp_path, server, rows[4:8])  # shard 0: two transient failures
        out = tmp_path / "out"
        assert runner.invoke(app, _args(inp, out, "--no-score")).exit_code == 0
        stats_file = out / "00000_stats.json"
        stats = json.loads(stats_file.read_text())
        del stats["write_id"]
        stats_file.write_text(json.dumps(stats))
        made = tmp_path / "subset"
        assert runner.invoke(app, ["subset", "--where", "true", "--from", str(out), "-o", str(made),
                                   "--no-progress"]).exit_code == 0
        recorded = json.loads((made / "dataset.json").read_text())["root_shards"]["00000"]
        assert recorded.startswith("sha256:")
        retried = runner.invoke(app, _args(inp, out, "--no-score", "--retry-failed"))
        assert retried.exit_code == 0, retried.output
    assert _outcomes(out) == ["kept", "kept", "kept", "http_404"]
    assert json.loads(stats_file.read_text())["write_id"] == recorded
    exported = runner.invoke(app, ["subset", "--where", "true", "--from", str(made), "-o", str(tmp_path / "own"),
                                   "--shards", "--no-progress"])
    assert exported.exit_code == 0 and "written again" not in exported.output, exported.output


def test_retry_failed_downloads_again_the_rows_of_a_host_whose_robots_txt_was_unreachable(tmp_path, photos):
    """--respect-robots during an outage: robots.txt answers 503, so RFC 9309 disallows the whole
    host for that run; those rows are transient (robots_unreachable), and once the site is back
    --retry-failed downloads them."""
    image = encode(photos[next(iter(photos))][:240])
    state = {"robots": 503}

    async def robots(request: web.Request) -> web.Response:
        return web.Response(status=state["robots"], text="User-agent: *\nDisallow: /private/\n")

    async def photo(request: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/jpeg")

    rows = [("public/0.jpg",), ("public/1.jpg",), ("private/2.jpg",), ("public/3.jpg",)]
    with LoopbackServer({}, extra_routes=[web.get("/robots.txt", robots), web.get("/{d}/{name}", photo)]) as server:
        inp = _write_input(tmp_path, server, rows)
        out = tmp_path / "out"
        args = _args(inp, out, "--no-score", "--respect-robots")
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.output
        assert _outcomes(out) == ["robots_unreachable"] * 4
        assert not any(path.startswith(("/public/", "/private/")) for path in server.hits)
        assert json.loads((out / "summary.json").read_text())["transient"] == {"robots_unreachable": 4}
        assert "rerun with --retry-failed" in first.output

        state["robots"] = 200  # the site is back
        second = runner.invoke(app, args + ["--retry-failed"])
        assert second.exit_code == 0, second.output
        assert _outcomes(out) == ["kept", "kept", "robots_disallowed", "kept"]
        assert server.hits["/private/2.jpg"] == 0
        _check_shard_consistent(out, 0)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["retried"] == {"shards": 1, "rows": 4, "kept": 3, "failed_again": 0}
        assert summary["transient"] == {}


def test_retry_failed_merges_scores_and_embeddings(tmp_path, flaky_case):
    """With CLIP scoring on: the recovered rows get their similarity and embeddings; the other
    rows' embeddings stay as they were."""
    flaky, rows = flaky_case
    rows = rows[4:8]  # shard 1 alone: two transient failures
    ckpt = tiny_checkpoint(tmp_path)
    score = ["--model", "fastlaion-tiny", "--pretrained", str(ckpt), "--min-similarity", "-1"]
    with LoopbackServer({}, extra_routes=[flaky.route()]) as server:
        inp = _write_input(tmp_path, server, rows)
        out = tmp_path / "out"
        assert runner.invoke(app, _args(inp, out, *score)).exit_code == 0
        img_before = np.load(out / "00000_img_emb.npy")
        assert np.isnan(img_before[[1, 2, 3]]).all() and not np.isnan(img_before[0]).any()
        result = runner.invoke(app, _args(inp, out, *score, "--retry-failed"))
    assert result.exit_code == 0, result.output
    t = pl.read_parquet(out / "00000.parquet")
    assert t["status"].to_list() == ["kept", "kept", "kept", "dropped"]
    img, txt = np.load(out / "00000_img_emb.npy"), np.load(out / "00000_txt_emb.npy")
    np.testing.assert_array_equal(img[0], img_before[0])  # not rescored
    assert not np.isnan(img[[1, 2]]).any() and np.isnan(img[3]).all()
    cos = (img[:3].astype(np.float32) * txt[:3].astype(np.float32)).sum(1)
    np.testing.assert_allclose(cos, t["similarity"].to_numpy()[:3], atol=5e-3)
    _check_shard_consistent(out, 0)


def test_retry_failed_with_two_worker_processes(tmp_path, flaky_case):
    flaky, rows = flaky_case
    with LoopbackServer({}, extra_routes=[flaky.route()]) as server:
        inp = _write_input(tmp_path, server, rows)
        out = tmp_path / "out"
        assert runner.invoke(app, _args(inp, out, "--no-score", "--processes", "2")).exit_code == 0
        before = _files(out, 0)
        hits_before = Counter(flaky.hits)
        result = runner.invoke(app, _args(inp, out, "--no-score", "--processes", "2", "--retry-failed"))
        assert result.exit_code == 0, result.output
        assert sum((flaky.hits - hits_before).values()) == 3
    assert _outcomes(out) == [r[2] for r in rows]
    assert _files(out, 0) == before
    for s in range(3):
        _check_shard_consistent(out, s)


def test_retry_failed_into_a_folder_named_with_glob_characters(tmp_path, flaky_case):
    """An output folder named as copies are ("out [1]", "*", "?"): its shards' Parquets are read
    as themselves, not as patterns that match nothing (Polars' ComputeError, a traceback)."""
    flaky, rows = flaky_case
    with LoopbackServer({}, extra_routes=[flaky.route()]) as server:
        inp = _write_input(tmp_path, server, rows)
        out = tmp_path / "out [1] *?"
        assert runner.invoke(app, _args(inp, out, "--no-score")).exit_code == 0
        result = runner.invoke(app, _args(inp, out, "--no-score", "--retry-failed"))
        assert result.exit_code == 0, result.output
    out = out.rename(tmp_path / "out")  # where this file's helpers read it (they let Polars glob)
    assert _outcomes(out) == [r[2] for r in rows]
    for s in range(3):
        _check_shard_consistent(out, s)


def test_retry_failed_needs_an_earlier_run(tmp_path):
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = runner.invoke(app, ["run", str(tmp_path / "in.txt"), "-o", str(tmp_path / "none"), "--no-score",
                                 "--retry-failed", "--no-progress"])
    assert result.exit_code == 2
    assert "--retry-failed" in result.output and "no earlier run" in result.output
    assert not (tmp_path / "none").exists()


def test_retry_failed_progress_totals_add_up(tmp_path, flaky_case):
    """A --retry-failed rerun's progress: the rows done at the start plus the rows it reports as
    it goes come to the input's rows, neither more (the retried rows counted twice) nor less."""
    from fastlaion.config import DownloadConfig, InputConfig, RunConfig, ScoreConfig, TagConfig
    from fastlaion.pipeline import Progress, run

    class Recorder(Progress):
        def __init__(self) -> None:
            self.total = self.at_start = self.reported = 0

        def start(self, shards_total: int, shards_done: int, rows_total: int, rows_done: int) -> None:
            self.total, self.at_start = rows_total, rows_done

        def rows_done(self, rows: int, kept: int, busy_s: dict[str, float] | None = None) -> None:
            self.reported += rows

    flaky, rows = flaky_case
    with LoopbackServer({}, extra_routes=[flaky.route()]) as server:
        inp = _write_input(tmp_path, server, rows)

        def cfg(retry: bool) -> RunConfig:
            return RunConfig(input=InputConfig(paths=(str(inp),), shard_size=SHARD_SIZE), output_dir=str(tmp_path / "o"),
                             score=ScoreConfig(enabled=False), tags=TagConfig(language=False), retry_failed=retry,
                             download=DownloadConfig(retries=0, timeout_s=5, allow_private_networks=True))

        first, again = Recorder(), Recorder()
        run(cfg(False), first)
        assert (first.total, first.at_start, first.reported) == (len(rows), 0, len(rows))
        run(cfg(True), again)
    assert again.total == len(rows)
    assert again.reported == 3  # the three transient rows, downloaded again
    assert again.at_start + again.reported == len(rows)
