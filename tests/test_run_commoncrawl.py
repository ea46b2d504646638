"""`fastlaion run` on Common Crawl input: WAT files and --crawl, extracted then downloaded.

Everything is served from 127.0.0.1: the crawl's wat.paths.gz, its WAT files, and the images
their <img> links point to.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from fastlaion.cli import app
from fastlaion.server import LoopbackServer, Served
from helpers import encode
from test_extract import gz, img, wat_record, wat_request_record

runner = CliRunner()
CRAWL = "CC-MAIN-2024-22"


def build(photos, server_url: str) -> dict[str, Served]:
    """Two WAT files of a crawl; their pages link to images on the same server (one link dead)."""
    names = list(photos)
    files = {f"img/{n}.jpg": Served(encode(photos[n]), "image/jpeg") for n in names}
    wats = [
        [wat_request_record(f"{server_url}/page0"),
         wat_record(f"{server_url}/page0", [img(f"/img/{names[0]}.jpg", "a tabby cat on a table"),
                                            img("/img/missing.jpg", "a link that is dead now"),
                                            img("/img/logo.svg", "an svg logo, rejected by LAION's rules"),
                                            img(f"/img/{names[1]}.jpg", "abc")])],  # alt under 5 chars
        [wat_record(f"{server_url}/page1", [img(f"{server_url}/img/{names[2]}.jpg", "an astronaut in a suit"),
                                            img(f"/img/{names[0]}.jpg", "a tabby cat on a table")]),  # a duplicate
         wat_record(f"{server_url}/page2", [img(f"/img/{names[3]}.jpg", "a rocket on the launch pad")])],
    ]
    paths = [f"crawl-data/{CRAWL}/segments/1/wat/part-{i}.warc.wat.gz" for i in range(len(wats))]
    for path, records in zip(paths, wats):
        files[path] = Served(gz(records))
    files[f"crawl-data/{CRAWL}/wat.paths.gz"] = Served(gzip.compress(("\n".join(paths) + "\n").encode()))
    return files


@contextlib.contextmanager
def _served_wat(tmp_path, photos):
    """The crawl of `build` served on loopback, and its second WAT file copied to
    tmp_path/part.warc.wat.gz: (server, that path)."""
    server = LoopbackServer().start()
    try:
        files = build(photos, server.base_url)
        server.files.update(files)
        wat = tmp_path / "part.warc.wat.gz"
        wat.write_bytes(files[f"crawl-data/{CRAWL}/segments/1/wat/part-1.warc.wat.gz"].body)
        yield server, wat
    finally:
        server.close()


def test_run_with_crawl_extracts_then_downloads(tmp_path, photos):
    server = LoopbackServer().start()
    try:
        server.files.update(build(photos, server.base_url))
        out = tmp_path / "out"
        args = ["run", "-o", str(out), "--allow-private-networks", "--crawl", CRAWL, "--crawl-files", "2", "--cc-base-url", server.base_url + "/",
                "--model", "fastlaion-tiny", "--pretrained", "none", "--min-similarity", "-1", "--no-progress",
                "--retries", "0"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        stats = json.loads((out / "candidates" / "extract_stats.json").read_text())
        table = pl.read_parquet(out / "00000.parquet")
        # 7 img links: svg and short alt rejected, one duplicate -> 4 candidates, one of them a 404
        assert (stats["links"], stats["pairs"], stats["pairs_after_dedup"]) == (7, 5, 4)
        assert stats["rejected"]["svg"] == stats["rejected"]["short_alt"] == 1
        assert table.height == 4
        assert sorted(table["caption"].to_list()) == sorted([
            "a tabby cat on a table", "a link that is dead now", "an astronaut in a suit", "a rocket on the launch pad"])
        assert dict(table.group_by("status").len().iter_rows()) == {"kept": 3, "dropped": 1}
        assert table.filter(pl.col("status") == "dropped")["reason"].to_list() == ["http_404"]
        assert table.filter(pl.col("caption") == "a tabby cat on a table")["url"][0] == server.url("img/chelsea.jpg")
        # rerun: extraction is not repeated, finished shards are skipped
        before = (out / "candidates" / "extract_stats.json").stat().st_mtime_ns
        again = runner.invoke(app, args)
        assert again.exit_code == 0 and "already complete" in again.output
        assert (out / "candidates" / "extract_stats.json").stat().st_mtime_ns == before
    finally:
        server.close()


def test_run_with_local_wat_and_bad_mixes(tmp_path, photos):
    with _served_wat(tmp_path, photos) as (server, wat):
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", str(wat), "-o", str(out), "--allow-private-networks", "--no-score", "--no-progress"])
        assert result.exit_code == 0, result.output
        assert pl.read_parquet(out / "00000.parquet")["status"].to_list() == ["kept", "kept", "kept"]
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")
    mixed = runner.invoke(app, ["run", str(wat), str(tmp_path / "urls.txt"), "-o", str(tmp_path / "o2"), "--no-score"])
    assert mixed.exit_code == 2 and "cannot be mixed" in mixed.output
    missing = runner.invoke(app, ["run", str(tmp_path / "nope.warc.gz"), "-o", str(tmp_path / "o3"), "--no-score"])
    assert missing.exit_code == 2 and "input file not found" in missing.output
    assert not (tmp_path / "o3").exists()
    bad = runner.invoke(app, ["run", "-o", str(tmp_path / "o4"), "--crawl", "2024-22"])
    assert bad.exit_code == 2 and "--crawl must look like" in bad.output


REAL_WAT = Path(__file__).resolve().parents[2] / "shared" / "data" / "warc" / "whirlwind.warc.wat.gz"


@pytest.mark.skipif(not REAL_WAT.exists(), reason="needs ../shared/data/warc")
def test_run_on_a_wat_without_image_links_says_the_extraction_found_none(tmp_path):
    """Common Crawl's real WAT of one page's request (no Links): the run ends well and says that
    the extraction gave nothing to download, not that every shard was already complete."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(REAL_WAT), "-o", str(out), "--no-score", "--no-progress"],
                           env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "no candidate pairs to download: the extraction found none" in result.output
    assert "already complete" not in result.output
    assert json.loads((out / "candidates" / "extract_stats.json").read_text())["pairs"] == 0


def test_run_on_wat_leaves_out_pages_that_opt_out_as_its_opt_out_tags_say(tmp_path, photos):
    """`fastlaion run` on a WAT file: a page whose robots meta says noai gives no candidate (its
    link counted under opt_out in candidates/extract_stats.json), another page's image is
    downloaded; with `--opt-out-tags ''` (no opt-out checks at all) both are."""
    names = list(photos)
    server = LoopbackServer().start()
    try:
        server.files.update({f"img/{n}.jpg": Served(encode(photos[n]), "image/jpeg") for n in names[:2]})
        wat = tmp_path / "part.warc.wat.gz"
        wat.write_bytes(gz([
            wat_record(f"{server.base_url}/art", [img(f"/img/{names[0]}.jpg", "a drawing its author keeps from AI")],
                       metas=[{"name": "robots", "content": "noai, noimageai"}]),
            wat_record(f"{server.base_url}/news", [img(f"/img/{names[1]}.jpg", "a photograph on a news page")])]))
        for tags, urls, opted_out in ((None, [names[1]], 1), ("", names[:2], 0)):
            out = tmp_path / f"out-{tags}"
            args = ["run", str(wat), "-o", str(out), "--allow-private-networks", "--no-score", "--no-progress"]
            result = runner.invoke(app, args + ([] if tags is None else ["--opt-out-tags", tags]))
            assert result.exit_code == 0, result.output
            stats = json.loads((out / "candidates" / "extract_stats.json").read_text())
            assert stats["rejected"]["opt_out"] == opted_out
            table = pl.read_parquet(out / "00000.parquet")
            assert sorted(table["url"].to_list()) == sorted(f"{server.base_url}/img/{n}.jpg" for n in urls)
            assert table["status"].to_list() == ["kept"] * len(urls)
        # the candidates of out-'' were extracted with no page opt-outs: once a shard is written
        # from them, the default tags are refused there (they would keep the noai page's link)
        refused = runner.invoke(app, ["run", str(wat), "-o", str(tmp_path / "out-"), "--allow-private-networks",
                                      "--no-score", "--no-progress"])
        assert refused.exit_code == 2 and "extracted with page opt-outs none, now noai,noimageai" in refused.output
        # a run that finished no shard (a checkpoint that does not load) extracted with none:
        # the rerun with the default tags extracts again, and the noai page gives nothing
        (tmp_path / "notes.txt").write_text("not a checkpoint\n")
        out = tmp_path / "out-again"
        args = ["run", str(wat), "-o", str(out), "--allow-private-networks", "--no-progress"]
        failed = runner.invoke(app, [*args, "--opt-out-tags", "", "--model", "fastlaion-tiny", "--pretrained",
                                     str(tmp_path / "notes.txt")])
        assert failed.exit_code == 2 and (out / "candidates" / "extract_stats.json").exists()
        again = runner.invoke(app, [*args, "--no-score"])
        assert again.exit_code == 0, again.output
        assert json.loads((out / "candidates" / "extract_stats.json").read_text())["rejected"]["opt_out"] == 1
        assert pl.read_parquet(out / "00000.parquet")["url"].to_list() == [f"{server.base_url}/img/{names[1]}.jpg"]
    finally:
        server.close()


def test_a_crawl_that_cannot_be_read_leaves_no_output_folder(tmp_path):
    """`fastlaion run --crawl` into a new folder, where the crawl's listing or all of its WAT files
    answer 404 (one file alone is extracted around: test_extract): the folder used to be left behind with a config.json (and an empty candidates/),
    and the corrected command into it then warned about "the run there", which had never begun.
    Now the folder goes, as it does for a URL list that cannot be read, and the rerun says nothing
    but its own results."""
    server = LoopbackServer().start()
    try:
        paths = [f"crawl-data/{CRAWL}/segments/1/wat/part-{i}.warc.wat.gz" for i in range(2)]
        server.files[f"crawl-data/{CRAWL}/wat.paths.gz"] = Served(gzip.compress("\n".join(paths).encode()))
        server.files[paths[0]] = Served(gz([wat_request_record(f"{server.base_url}/p")]))  # paths[1]: 404
        gone = [f"crawl-data/CC-MAIN-2024-24/segments/1/wat/part-{i}.warc.wat.gz" for i in range(2)]
        server.files["crawl-data/CC-MAIN-2024-24/wat.paths.gz"] = Served(gzip.compress("\n".join(gone).encode()))
        out = tmp_path / "out"

        def run(crawl: str, files: int):
            return runner.invoke(app, ["run", "-o", str(out), "--crawl", crawl, "--crawl-files", str(files),
                                       "--cc-base-url", server.base_url + "/", "--no-score", "--no-progress"],
                                 terminal_width=400)

        for crawl, files in (("CC-MAIN-2024-23", 1), ("CC-MAIN-2024-24", 2)):  # no listing; its files all missing
            result = run(crawl, files)
            assert result.exit_code == 2 and "HTTP 404" in result.output, result.output
            assert not out.exists()
        result = run(CRAWL, 1)
        assert result.exit_code == 0, result.output
        assert "warning" not in result.output and "no candidate pairs to download" in result.output
    finally:
        server.close()


def test_a_rerun_extracts_again_when_a_candidates_file_was_deleted(tmp_path, photos):
    """candidates/candidates-00000.parquet deleted after a run (taken for an intermediate file):
    the rerun read no candidates and said "funnel over 0 shard(s)" and that the extraction had
    found none, beside a finished shard of three kept samples. Now it warns, extracts the same
    candidates again, and finds the shard complete."""
    with _served_wat(tmp_path, photos) as (server, wat):
        out = tmp_path / "out"
        args = ["run", str(wat), "-o", str(out), "--allow-private-networks", "--no-score", "--no-progress"]
        assert runner.invoke(app, args).exit_code == 0
        candidates = out / "candidates" / "candidates-00000.parquet"
        first = pl.read_parquet(candidates)
        candidates.unlink()
        again = runner.invoke(app, args, terminal_width=400)
        assert again.exit_code == 0, again.output
        assert f"{candidates} is missing; the candidates are extracted again" in again.output
        assert "funnel over 1 shard(s)" in again.output and "already complete" in again.output
        assert "found none" not in again.output
        assert pl.read_parquet(candidates).equals(first)


def test_max_caption_chars_cuts_the_captions_of_a_wat_not_its_image_urls(tmp_path, photos):
    """`fastlaion run WAT --max-caption-chars 8`: the extraction cut the image URLs to 8
    characters too (its one limit is for URL and caption), and every download failed, where the
    same option on a URL list cuts the captions only. Now the URLs stay whole, the images are
    downloaded, and the captions are cut to 8 characters."""
    with _served_wat(tmp_path, photos) as (server, wat):
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", str(wat), "-o", str(out), "--allow-private-networks", "--no-score",
                                     "--no-progress", "--max-caption-chars", "8"])
        assert result.exit_code == 0, result.output
        table = pl.read_parquet(out / "00000.parquet")
        assert table["status"].to_list() == ["kept", "kept", "kept"]
        assert sorted(table["url"].to_list()) == sorted(server.url(f"img/{n}.jpg") for n in ("chelsea", "astronaut", "rocket"))
        assert sorted(table["caption"].to_list()) == ["a rocket", "a tabby ", "an astro"]


def test_run_accounts_for_the_extraction_in_one_line(tmp_path, photos):
    """`fastlaion run` on a WAT cut short and a duplicate link: the run printed only the funnel,
    whose input is the candidates, and nothing of the records skipped as damaged or the links
    rejected, which only candidates/extract_stats.json told. Now one line before the funnel adds
    them up, as that file has them."""
    server = LoopbackServer().start()
    try:
        files = build(photos, server.base_url)
        server.files.update(files)
        wat = tmp_path / "part.warc.wat.gz"
        whole = files[f"crawl-data/{CRAWL}/segments/1/wat/part-0.warc.wat.gz"].body
        wat.write_bytes(whole + gz([wat_record(f"{server.base_url}/cut", [img("/img/x.jpg", "a page cut short")])])[:-30])
        out = tmp_path / "out"
        result = runner.invoke(app, ["run", str(wat), "-o", str(out), "--allow-private-networks", "--no-score",
                                     "--no-progress", "--retries", "0"], terminal_width=400)
        assert result.exit_code == 0, result.output
        stats = json.loads((out / "candidates" / "extract_stats.json").read_text())
        assert (stats["records"], stats["skipped"]["truncated"], stats["pairs_after_dedup"]) == (3, 1, 2)
        lines = result.output.splitlines()
        assert lines[0] == ("extracted 1 input(s): records 3 = pages 1 + ignored 1 + skipped 1 (truncated 1); links 4 = "
                            "rejected 2 (short_alt 1, svg 1) + pairs 2; pairs 2 = candidates 2 + duplicates 0 "
                            f"({out / 'candidates' / 'extract_stats.json'})")
        assert lines[1].startswith("funnel over 1 shard(s)") and lines[2].split() == ["input", "2"]
    finally:
        server.close()
