"""subset, dedup and stats on a real `fastlaion run` output (loopback server, tiny random CLIP),
with expected values computed here from the run's own files, without fastlaion.dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from helpers import encode
from test_dataset_helpers import (
    app,
    greedy_reference,
    load_json,
    read_rows,
    real_run,
    reference_phash,
    run_cli,
    run_cli_here,
    tar_images,
)
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return real_run(str(tmp_path_factory.mktemp("dataset-run")))


def invoke(args):
    result = runner.invoke(app(), [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def kept(rows):
    return [r for r in rows if r["status"] == "kept"]


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# --- 1. subsets --------------------------------------------------------------------------------------

def test_subset_with_dropped_rows_says_its_tars_hold_kept_samples_only(run, tmp_path):
    """--include-dropped --shards: the metadata holds every selected row, the tars the kept ones;
    the rows that are not kept samples are counted and said, not left out in silence."""
    out = tmp_path / "all"
    result = invoke(["subset", "--where", "true", "--include-dropped", "--from", run, "-o", out, "--shards",
                     "--no-progress"])
    rows = read_rows(run)
    not_kept = len(rows) - len(kept(rows))
    assert not_kept > 0
    said = " ".join(result.output.split())
    assert f"tars: 1 ({len(kept(rows)):,} samples" in said
    assert f"{not_kept:,} selected rows are not kept samples, and tars hold kept samples only" in said
    assert load_json(out / "dataset.json")["rows_not_exported"] == not_kept


def test_subset_writes_parquet_tars_that_webdataset_reads_and_urls(run, tmp_path):
    import webdataset as wds

    out = tmp_path / "en"
    invoke(["subset", "en", "--from", run, "-o", out, "--shards", "--shard-size", "3", "--urls", "--no-progress"])
    rows = read_rows(run)
    expected = [r for r in kept(rows) if r["language_group"] == "en"]
    assert len(expected) >= 4  # the case has English, German, French and no-language captions
    meta = table(out / "metadata.parquet")
    assert [r["key"] for r in meta] == [r["key"] for r in expected]
    assert all(m["caption"] == e["caption"] and m["sha256"] == e["sha256"] for m, e in zip(meta, expected))

    # the new tars, read by the webdataset library, hold exactly those samples, bytes unchanged
    tars = sorted(out.glob("[0-9]*.tar"))
    assert len(tars) == -(-len(expected) // 3)
    images = tar_images(run)
    dataset = wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False)
    seen = list(dataset)
    assert [s["__key__"] for s in seen] == [r["key"] for r in expected]
    for sample, row in zip(seen, expected):
        image_ext = next(e for e in ("jpg", "png", "webp") if e in sample)
        assert sample[image_ext] == images[row["key"]]
        assert sample["txt"].decode() == row["caption"]
    shards = load_json(out / "shards.json")
    assert shards["samples"] == len(expected) and shards["missing"] == 0
    assert [t["samples"] for t in shards["tars"]] == [min(3, len(expected) - 3 * i) for i in range(len(tars))]

    urls = table(out / "urls.parquet")
    assert [(u["url"], u["caption"]) for u in urls] == [(r["url"], r["caption"]) for r in expected]


def test_subset_of_a_dedup_still_finds_the_images(run, tmp_path):
    invoke(["dedup", "--by", "sha256", "--from", run, "-o", tmp_path / "d", "--no-progress"])
    invoke(["subset", "--where", "similarity > -1", "--from", tmp_path / "d", "-o", tmp_path / "s", "--shards",
            "--no-progress"])
    rows = read_rows(run)
    seen_sha: set[str] = set()
    unique = []
    for r in kept(rows):
        if r["sha256"] not in seen_sha:
            seen_sha.add(r["sha256"])
            unique.append(r["key"])
    assert [m["key"] for m in table(tmp_path / "s" / "metadata.parquet")] == unique
    assert load_json(tmp_path / "s" / "shards.json")["samples"] == len(unique)


def test_recipe_on_a_run_without_the_column_says_which_option_adds_it(run, tmp_path):
    result = run_cli_here(["subset", "aesthetic-v1", "--from", run, "-o", tmp_path / "x"])
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "'punsafe'" in err and "--nsfw-head" in err
    assert "'pwatermark'" in err and "--watermark-model" in err
    assert "'aesthetic'" in err and "--aesthetic-v1" in err
    assert not (tmp_path / "x" / "metadata.parquet").exists()


# --- 2. dedup ----------------------------------------------------------------------------------------

def check_dedup_output(run: Path, out: Path, expected_dups: dict[str, str], reason: str) -> None:
    """Every input row is in the output, unchanged but for the duplicates, which name their original."""
    before = read_rows(run)
    after = table(out / "metadata.parquet")
    assert [r["key"] for r in after] == [r["key"] for r in before]
    for b, a in zip(before, after):
        if b["key"] in expected_dups:
            assert (a["status"], a["stage"], a["reason"]) == ("dropped", "dedup", reason), a
            assert a["duplicate_of"] == expected_dups[b["key"]]
        else:
            assert a["duplicate_of"] is None
            assert (a["status"], a["stage"], a["reason"]) == (b["status"], b["stage"], b["reason"])
        assert a["url"] == b["url"] and a["caption"] == b["caption"] and a["sha256"] == b["sha256"]
    info = load_json(out / "dataset.json")
    assert info["duplicates"] == len(expected_dups)
    assert info["kept"] == len(kept(before)) - len(expected_dups)


def _laion_key(row: dict) -> str:
    """What LAION's hash (mmh3.hash64 of url + text) keys on: the two strings joined, as written."""
    return (row["url"] or "") + (row["caption"] or "")


@pytest.mark.parametrize("by, columns", [("url", ("url",)), ("url+caption", ("url", "caption")),
                                         ("sha256", ("sha256",)), ("hash", ())])
def test_exact_dedup_keeps_the_first_and_records_what_each_drop_repeats(run, tmp_path, by, columns):
    invoke(["dedup", "--by", by, "--from", run, "-o", tmp_path, "--no-progress"])
    rows = {r["key"]: r for r in kept(read_rows(run))}
    if by == "hash":  # LAION's key: url + caption joined, no case folding
        expected = greedy_reference(list(rows), lambda a, b: _laion_key(rows[a]) == _laion_key(rows[b]))
    else:
        expected = greedy_reference(list(rows), lambda a, b: all(rows[a][c] == rows[b][c] for c in columns))
    assert expected  # the case holds duplicates of every kind
    check_dedup_output(run, tmp_path, expected, "duplicate_" + by.replace("+", "_"))


def test_perceptual_dedup_finds_copies_and_a_resized_recompressed_variant(run, tmp_path):
    invoke(["dedup", "--by", "phash", "--max-hamming", "4", "--from", run, "-o", tmp_path, "--no-progress"])
    rows = kept(read_rows(run))
    images = tar_images(run)
    hashes = {r["key"]: reference_phash(images[r["key"]]) for r in rows}
    expected = greedy_reference([r["key"] for r in rows], lambda a, b: bin(hashes[a] ^ hashes[b]).count("1") <= 4)
    check_dedup_output(run, tmp_path, expected, "duplicate_phash")
    by_url: dict[str, str] = {}
    for r in rows:
        by_url.setdefault(r["url"].rsplit("/", 1)[-1], r["key"])   # the first row of each URL
    assert expected[by_url["coffee-small.jpg"]] == by_url["coffee.jpg"]          # another file, same picture
    assert expected[by_url["chelsea-copy.jpg"]] == by_url["chelsea.jpg"]


def test_semantic_dedup_matches_all_pairs_cosine(run, tmp_path):
    rows = kept(read_rows(run))
    emb = {}
    for r in rows:
        arr = np.load(run / f"{r['shard']}_img_emb.npy").astype(np.float64)
        v = arr[int(r["key"][len(r["shard"]):])]
        emb[r["key"]] = v / np.linalg.norm(v)
    threshold = 0.999
    cosines = [float(emb[a] @ emb[b]) for a in emb for b in emb if a < b]
    assert min(abs(c - threshold) for c in cosines) > 2e-4  # nothing sits on the threshold (fp16 vs fp64)
    invoke(["dedup", "--by", "embedding", "--min-cosine", threshold, "--device", "cpu", "--from", run, "-o", tmp_path,
            "--no-progress"])
    expected = greedy_reference([r["key"] for r in rows], lambda a, b: float(emb[a] @ emb[b]) >= threshold)
    assert expected
    check_dedup_output(run, tmp_path, expected, "duplicate_embedding")


# --- 3. stats and the HTML report ------------------------------------------------------------------

def test_stats_match_the_rows_and_the_run_summary(run, tmp_path):
    result = invoke(["stats", run, "--json", tmp_path / "s.json"])
    stats = load_json(tmp_path / "s.json")
    rows = read_rows(run)
    ok = kept(rows)
    summary = load_json(run / "summary.json")["funnel"]
    assert [lvl["rows"] for lvl in stats["funnel"]] == [summary[k] for k in ("input", "downloaded", "decoded",
                                                                               "scored", "kept")]
    drops = Counter((r["stage"], r["reason"]) for r in rows if r["status"] == "dropped")
    assert {(lvl["stage"], reason): n for lvl in stats["funnel"][1:] for reason, n in lvl["reasons"].items()} == drops
    assert stats["language_groups"] == dict(Counter(r["language_group"] for r in ok))
    sim = stats["histograms"]["similarity"]
    edges = sim["edges"]
    expected_bins = [0] * (len(edges) - 1)
    for r in ok:
        i = max(0, min(len(expected_bins) - 1, int((r["similarity"] - edges[0]) // (edges[1] - edges[0]))))
        expected_bins[i] += 1
    assert sim["counts"] == expected_bins and sim["values"] == len(ok)
    assert abs(sim["mean"] - np.mean([r["similarity"] for r in ok])) < 1e-6
    short = [min(r["original_width"], r["original_height"]) for r in ok]
    buckets = dict(map(tuple, stats["size_buckets"]))
    assert buckets["256-511 px"] == sum(256 <= s < 512 for s in short)
    assert buckets[">= 1024 px"] == sum(s >= 1024 for s in short)
    for word in ("funnel", "drops per reason", "http_404", "similarity", "language groups"):
        assert word in result.output


def test_stats_of_a_subset_that_matched_nothing_is_a_zero_funnel(run, tmp_path):
    invoke(["subset", "--where", "similarity > 5", "--from", run, "-o", tmp_path / "none", "--no-progress"])
    assert table(tmp_path / "none" / "metadata.parquet") == []
    result = invoke(["stats", tmp_path / "none", "--json", tmp_path / "s.json", "--html", tmp_path / "r.html"])
    stats = load_json(tmp_path / "s.json")
    assert (stats["rows"], stats["kept"]) == (0, 0)
    assert [(lvl["name"], lvl["rows"]) for lvl in stats["funnel"]] == [
        (name, 0) for name in ("input", "downloaded", "decoded", "scored", "kept")]
    said = " ".join(result.output.split())
    assert "0 rows, 0 kept samples" in said and "no kept samples" in said and "(0 thumbnails)" in said


def columns_of(path: Path) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in pq.read_schema(path)]


def test_every_command_takes_a_subset_that_matched_nothing(run, tmp_path):
    """A subset whose filter matched nothing (0 rows) is a dataset like any other: subset (with
    --shards and --urls), dedup (each --by) and classify write a 0-row metadata.parquet with the
    columns they write from a subset that matched everything, and a dataset.json, so the next
    command in a chain reads it; index and search say in one line that there is nothing to index
    or search (exit 2: nothing was built or found). They refused it ("holds no rows")."""
    none, every = tmp_path / "none", tmp_path / "every"
    invoke(["subset", "--where", "similarity > 5", "--from", run, "-o", none, "--no-progress"])
    invoke(["subset", "--where", "similarity > -5", "--from", run, "-o", every, "--no-progress"])
    assert pq.read_metadata(none / "metadata.parquet").num_rows == 0
    assert pq.read_metadata(every / "metadata.parquet").num_rows == len(kept(read_rows(run)))
    commands = {"subset": ["subset", "--where", "true", "--shards", "--urls"],
                "classify": ["classify", "-c", "cat", "-c", "dog"],
                **{f"dedup-{by}": ["dedup", "--by", by] for by in ("url", "url+caption", "sha256", "phash",
                                                                    "embedding")}}
    for name, args in commands.items():
        for source in (none, every):
            invoke(args + ["--from", source, "-o", tmp_path / name / source.name, "--no-progress"])
        empty, full = tmp_path / name / "none", tmp_path / name / "every"
        assert pq.read_metadata(empty / "metadata.parquet").num_rows == 0, name
        assert columns_of(empty / "metadata.parquet") == columns_of(full / "metadata.parquet"), name
        manifest = load_json(empty / "dataset.json")
        assert (manifest["source_rows"], manifest["rows"]) == (0, 0), name
        # chained: the empty output is read as a dataset by the next command
        chained = invoke(["stats", empty, "--json", tmp_path / name / "s.json"])
        assert "0 rows, 0 kept samples" in " ".join(chained.output.split()), name
        invoke(["dedup", "--by", "url", "--from", empty, "-o", tmp_path / name / "then", "--no-progress"])
        assert pq.read_metadata(tmp_path / name / "then" / "metadata.parquet").num_rows == 0, name
    assert load_json(tmp_path / "subset" / "none" / "shards.json")["tars"] == []
    assert pq.read_metadata(tmp_path / "subset" / "none" / "urls.parquet").num_rows == 0
    np.save(tmp_path / "q.npy", np.load(run / "00000_img_emb.npy")[0].astype(np.float32))
    for args, what in ((["index", none], "index"), (["search", none, "--vector", tmp_path / "q.npy"], "search"),
                       (["search", none, "--text", "a cat"], "search")):
        result = runner.invoke(app(), [str(a) for a in args] + ["--no-progress"])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"error: {none} holds no kept samples (0 rows): nothing to {what}", args
    assert not (none / "index").exists()


def test_stats_names_the_finished_shards_files_missing_or_cut(run, tmp_path):
    """stats on a run folder checks each finished shard's files against the sizes its stats file
    records: a cut tar, a lost embedding file and a lost Parquet (whose rows would otherwise be
    missing from the figures without a word) are each a line, and in --json."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "summary.json").unlink()  # (a run that also did not finish: both are said)
    size = (out / "00001.tar").stat().st_size
    os.truncate(out / "00001.tar", 10240)
    (out / "00001_txt_emb.npy").unlink()
    (out / "00002.parquet").unlink()
    result = runner.invoke(app(), ["stats", str(out), "--json", str(tmp_path / "s.json"), "--html",
                                   str(tmp_path / "r.html"), "--thumbnails", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 problem(s) with finished shards' files: 00001: 00001.tar holds" in (tmp_path / "r.html").read_text()
    problems = [{"shard": "00001", "problem": f"00001.tar holds 10,240 bytes, {size:,} when written"},
                {"shard": "00001", "problem": "00001_txt_emb.npy is missing"},
                {"shard": "00002", "problem": "00002.parquet is missing"}]
    assert load_json(tmp_path / "s.json")["damaged_files"] == problems
    lines = result.stdout.splitlines()
    at = lines.index("damaged: 3 problem(s) with the files of 2 finished shard(s); `fastlaion run` with the same "
                     "arguments writes those shards again")
    assert lines[at + 1:at + 4] == [f"  shard {p['shard']}: {p['problem']}" for p in problems]
    clean = runner.invoke(app(), ["stats", str(run), "--json", str(tmp_path / "c.json"), "--no-progress"])
    assert clean.exit_code == 0 and "damaged" not in clean.stdout
    assert load_json(tmp_path / "c.json")["damaged_files"] == []


def cut_after_first_member(tar: Path) -> int:
    """Cut a tar just after its first member (a sample's image, before its .txt and .json): what
    is left reads as a whole, shorter tar. Returns the size it was written at."""
    import tarfile

    size = tar.stat().st_size
    with tarfile.open(tar) as t:
        first = t.getmembers()[0]
    os.truncate(tar, first.offset_data + -(-first.size // 512) * 512)
    return size


def test_commands_reading_a_runs_shard_files_name_the_damaged_ones_and_read_them_as_missing(run, tmp_path):
    """A run whose 00001.tar was cut after its first sample's image (the rest reads as a whole,
    shorter tar) and whose 00002_img_emb.npy is gone, checked against the sizes the shards' stats
    files record (as `stats` on the run folder does): subset --shards, dedup --by phash and
    --by embedding, given a subset of that run, say in one line each damaged file they need and
    read it as a missing one (subset --shards copied the cut sample, its image without its
    caption and metadata, into its tars); stats on the subset lists them, naming the run. A file
    the command does not need, or of a shard the dataset has no sample in, is not said."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    sub, shard0 = tmp_path / "sub", tmp_path / "shard0"
    invoke(["subset", "--where", "similarity > -5", "--from", out, "-o", sub, "--no-progress"])
    invoke(["subset", "--where", "shard = '00000'", "--from", out, "-o", shard0, "--no-progress"])
    rows = kept(read_rows(out))
    images = tar_images(out)
    tar_size = cut_after_first_member(out / "00001.tar")
    cut = f"{(out / '00001.tar').stat().st_size:,} bytes, {tar_size:,} when written"
    (out / "00002_img_emb.npy").unlink()
    real = out.resolve()
    tar_line = f"{real}/00001.tar holds {cut}, so it was not read (as if missing); `fastlaion run` with the same " \
               "arguments writes shard 00001 again"
    emb_line = f"{real}/00002_img_emb.npy is missing; `fastlaion run` with the same arguments writes shard 00002 again"
    tar_problem = {"shard": "00001", "problem": f"00001.tar holds {cut}"}
    emb_problem = {"shard": "00002", "problem": "00002_img_emb.npy is missing"}

    result = runner.invoke(app(), ["subset", "--where", "true", "--from", str(sub), "-o", str(tmp_path / "s"),
                                   "--shards", "--no-progress"])
    assert result.exit_code == 0, result.output
    exported = [r for r in rows if r["shard"] != "00001"]
    said = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert said == [f"warning: reshard: {len(rows) - len(exported)} selected sample(s) were not found in their tars",
                    f"warning: subset --shards: {tar_line}", f"warning: subset --shards: {emb_line}"], said
    assert tar_images(tmp_path / "s") == {r["key"]: images[r["key"]] for r in exported}
    meta = table(tmp_path / "s" / "metadata.parquet")
    emb = np.load(tmp_path / "s" / "00000_img_emb.npy")
    for m in meta:
        if m["shard"] is not None:
            assert np.isnan(emb[m["shard_row"]]).all() == (m["key"] in {r["key"] for r in rows if r["shard"] == "00002"})
    manifest = load_json(tmp_path / "s" / "dataset.json")
    assert manifest["damaged_files"] == [tar_problem, emb_problem]
    assert manifest["samples_missing"] == len(rows) - len(exported)

    for by, line, problem, unreadable in (("phash", tar_line, tar_problem, "00001"),
                                          ("embedding", emb_line, emb_problem, "00002")):
        result = runner.invoke(app(), ["dedup", "--by", by, "--from", str(sub), "-o", str(tmp_path / by),
                                       "--no-progress"])
        assert result.exit_code == 0, result.output
        said = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
        assert [x for x in said if x.startswith("warning: dedup")] == [f"warning: dedup --by {by}: {line}"], said
        manifest = load_json(tmp_path / by / "dataset.json")
        assert manifest["damaged_files"] == [problem]
        assert manifest["unreadable_samples"] == sum(r["shard"] == unreadable for r in rows)

    result = invoke(["stats", sub, "--json", tmp_path / "s.json", "--html", tmp_path / "s.html", "--thumbnails", "0"])
    stats = load_json(tmp_path / "s.json")
    assert stats["damaged_files"] == [tar_problem, emb_problem] and stats["damaged_root"] == str(real)
    assert f"2 problem(s) with finished shards' files of the run {real}: 00001: 00001.tar holds" in \
        (tmp_path / "s.html").read_text()
    lines = result.stdout.splitlines()
    at = lines.index(f"damaged: 2 problem(s) with the files of 2 finished shard(s) of the run {real}, which this "
                     "dataset's samples are in; `fastlaion run` with the same arguments writes those shards again")
    assert lines[at + 1:at + 3] == [f"  shard {p['shard']}: {p['problem']}" for p in (tar_problem, emb_problem)]
    # a subset whose samples are all in shard 00000, whose files are whole: nothing to say
    for args in (["stats", shard0, "--json", tmp_path / "0.json"],
                 ["subset", "--where", "true", "--from", shard0, "-o", tmp_path / "s0", "--shards"],
                 ["dedup", "--by", "phash", "--from", shard0, "-o", tmp_path / "d0"]):
        result = runner.invoke(app(), [str(a) for a in args] + ["--no-progress"])
        assert result.exit_code == 0 and "damaged" not in result.output and not result.stderr, (args, result.output)
    assert load_json(tmp_path / "0.json")["damaged_files"] == []


def test_a_shards_subsets_own_files_are_checked_against_the_sizes_its_shards_json_records(run, tmp_path):
    """A `subset --shards` folder is its own root: its shards.json records the size of each tar
    and embedding file it wrote, so stats on it names one cut or missing later (it checked
    nothing: no run stats files there), and a subset --shards of it reads the damaged ones as
    missing and says so; the remedy named is the subset that wrote them, not a `fastlaion run`."""
    own = tmp_path / "own"
    invoke(["subset", "--where", "similarity > -5", "--from", run, "-o", own, "--shards", "--shard-size", "4",
            "--no-progress"])
    sizes = load_json(own / "shards.json")["files"]
    assert sizes == {p.name: p.stat().st_size for p in own.iterdir() if p.suffix == ".tar" or p.name.endswith("_emb.npy")}
    assert "00001.tar" in sizes and "00000_img_emb.npy" in sizes
    result = invoke(["stats", own, "--json", tmp_path / "before.json"])
    assert load_json(tmp_path / "before.json")["damaged_files"] == [] and "damaged" not in result.stdout

    tar_size = cut_after_first_member(own / "00001.tar")
    cut = f"{(own / '00001.tar').stat().st_size:,} bytes, {tar_size:,} when written"
    (own / "00000_txt_emb.npy").unlink()
    result = invoke(["stats", own, "--json", tmp_path / "after.json"])
    problems = [{"shard": "00000", "problem": "00000_txt_emb.npy is missing"},
                {"shard": "00001", "problem": f"00001.tar holds {cut}"}]
    assert load_json(tmp_path / "after.json")["damaged_files"] == problems
    lines = result.stdout.splitlines()
    at = lines.index("damaged: 2 problem(s) with the files of 2 finished shard(s); the `fastlaion subset --shards` "
                     "that wrote them writes them again")
    assert lines[at + 1:at + 3] == [f"  shard {p['shard']}: {p['problem']}" for p in problems]

    result = runner.invoke(app(), ["subset", "--where", "true", "--from", str(own), "-o", str(tmp_path / "again"),
                                   "--shards", "--no-progress"])
    assert result.exit_code == 0, result.output
    said = [x for x in result.stderr.splitlines() if x.startswith("warning: subset --shards:")]
    assert said == [f"warning: subset --shards: {own.resolve()}/00000_txt_emb.npy is missing; the `fastlaion subset "
                    "--shards` that wrote it writes it again",
                    f"warning: subset --shards: {own.resolve()}/00001.tar holds {cut}, so it was not read (as if "
                    "missing); the `fastlaion subset --shards` that wrote it writes it again"], result.stderr
    copied = tar_images(tmp_path / "again")
    by_shard = {m["key"]: m["shard"] for m in table(own / "metadata.parquet")}
    assert copied and all(by_shard[k] != "00001" for k in copied)


def test_commands_on_a_run_folder_say_a_finished_shards_lost_parquet(run, tmp_path):
    """A run folder whose finished shard lost its Parquet: the commands that read its rows (all
    but stats, which lists it among the damaged files) say in one line that that shard's rows are
    not read; they used to leave them out without a word. A Parquet that is there but unreadable
    is said once, as before."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    rows = read_rows(out)
    (out / "00002.parquet").unlink()
    line = (f"warning: {out.resolve()}/00002.parquet is missing: the rows of shard 00002 are not read; `fastlaion run` "
            "with the same arguments writes it again")
    for args in (["subset", "--where", "true", "--include-dropped", "--from", out, "-o", tmp_path / "s"],
                 ["dedup", "--by", "url", "--from", out, "-o", tmp_path / "d"]):
        result = runner.invoke(app(), [str(a) for a in args] + ["--no-progress"])
        assert result.exit_code == 0 and result.stderr.strip() == line, (args, result.stderr)
        assert [m["key"] for m in table(args[-1] / "metadata.parquet")] == [r["key"] for r in rows
                                                                              if r["shard"] != "00002"]
    (out / "00001.parquet").write_bytes(b"not a parquet file")
    result = runner.invoke(app(), ["subset", "--where", "true", "--from", str(out), "-o", str(tmp_path / "s"),
                                   "--no-progress"])
    assert result.exit_code == 0, result.output
    said = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert len(said) == 2 and said[1] == line, result.stderr
    assert said[0].startswith(f"warning: skipped unreadable Parquet {out}/00001.parquet: "), said
    result = runner.invoke(app(), ["stats", str(out), "--no-progress"])
    assert result.exit_code == 0 and "shard 00002: 00002.parquet is missing" in result.stdout
    assert [x for x in result.stderr.splitlines() if "00002" in x] == []  # in the listing, not a warning too


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def chromium_or_fail() -> str:
    """Chromium, or a loud failure. Skips only where it cannot be installed: not in CI, and no
    apt package 'chromium' to install (`make system-deps` installs it where there is)."""
    exe = find_chromium()
    if exe:
        return exe
    installable = shutil.which("apt-cache") and subprocess.run(
        ["apt-cache", "show", "chromium"], capture_output=True).returncode == 0
    if os.environ.get("CI") or installable:
        pytest.fail("chromium is not installed: run `make system-deps` (apt-get install -y chromium)")
    pytest.skip("chromium is not installable on this machine (no apt package 'chromium'); set CHROMIUM=/path")


def png_colours(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return len(img.convert("RGB").getcolors(maxcolors=1 << 24))


def test_html_report_renders_its_plots_and_thumbnails_in_headless_chromium(run, tmp_path):
    exe = chromium_or_fail()
    report = tmp_path / "report.html"
    invoke(["stats", run, "--html", report, "--thumbnails", "6"])
    page = report.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "").split("<h2>Samples")[0]  # self-contained
    assert page.count('<img src="data:image/jpeg;base64,') == 6
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([exe, *flags, "--virtual-time-budget=5000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = re.search(r'data-rendered="plots=(\d+) empty=(\d+) thumbnails=(\d+)/(\d+)"', dom.stdout)
    assert rendered, "the page's check script did not run"
    plots, empty, decoded, thumbs = map(int, rendered.groups())
    # funnel, similarity, language groups, languages, short-side histogram, size buckets
    assert plots == 6 and empty == 0
    assert decoded == thumbs == 6
    shot = tmp_path / "shot.png"
    done = subprocess.run([exe, *flags, "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    assert png_colours(shot) > 50  # plots and photographs, not a blank page


# --- 4. datasets moved or copied: where the images and embeddings are ---------------------------------

def run_embedding(run: Path, row: dict, kind: str = "img") -> np.ndarray:
    """The run's own embedding of a row (the key is the shard and the row in it)."""
    return np.load(run / f"{row['shard']}_{kind}_emb.npy")[int(row["key"][len(row["shard"]):])]


def test_a_subset_with_shards_stands_alone_moved_away_from_its_run(run, tmp_path):
    """subset --shards writes its samples' tars, their embeddings and the run's config.json, and
    points its rows at them: moved away from the run, and the run gone, a subset of it, stats
    --html, search, index and dedup find every sample."""
    shutil.copytree(run, tmp_path / "a" / "run")
    invoke(["subset", "--where", "similarity > -1", "--from", tmp_path / "a" / "run", "-o", tmp_path / "a" / "sub",
            "--shards", "--shard-size", 5, "--no-progress"])
    moved = tmp_path / "b" / "sub"
    moved.parent.mkdir()
    shutil.move(tmp_path / "a" / "sub", moved)
    shutil.rmtree(tmp_path / "a")
    rows = kept(read_rows(run))
    images = tar_images(run)
    # each row names its tar in the subset and its row in that tar's embedding files: the run's vectors
    meta = table(moved / "metadata.parquet")
    assert [m["key"] for m in meta] == [r["key"] for r in rows]
    assert [m["shard"] for m in meta] == [f"{i // 5:05d}" for i in range(len(rows))]
    assert [m["shard_row"] for m in meta] == [i % 5 for i in range(len(rows))]
    for m, r in zip(meta, rows):
        for kind in ("img", "txt"):
            stored = np.load(moved / f"{m['shard']}_{kind}_emb.npy")
            assert stored.dtype == np.float16 and np.array_equal(stored[m["shard_row"]], run_embedding(run, r, kind))
    assert tar_images(moved) == {r["key"]: images[r["key"]] for r in rows}

    # a subset of the moved subset copies every sample from its tars
    invoke(["subset", "--where", "similarity > -1", "--from", moved, "-o", tmp_path / "c", "--shards", "--no-progress"])
    assert load_json(tmp_path / "c" / "shards.json")["samples"] == len(rows)
    assert tar_images(tmp_path / "c") == {r["key"]: images[r["key"]] for r in rows}
    result = invoke(["stats", moved, "--html", tmp_path / "report.html", "--thumbnails", 6])
    assert "(6 thumbnails)" in result.output

    # search, plain and through an index: the cosines of the run's own embeddings
    np.save(tmp_path / "q.npy", run_embedding(run, rows[3]).astype(np.float32))
    emb = {r["key"]: run_embedding(run, r).astype(np.float64) for r in rows}
    q = emb[rows[3]["key"]]
    cosine = {k: float(v @ q / np.linalg.norm(v) / np.linalg.norm(q)) for k, v in emb.items()}
    best = sorted(cosine.values(), reverse=True)[:4]
    for options in ([], ["index"]):
        if options:
            invoke(["index", moved, "--no-progress"])
        invoke(["search", moved, "--vector", tmp_path / "q.npy", "-k", 4, "--json", tmp_path / "hits.json",
                "--no-progress"])
        hits = load_json(tmp_path / "hits.json")["results"][0]["hits"]
        assert all(abs(h["similarity"] - min(1.0, cosine[h["key"]])) < 1e-3 for h in hits), hits
        assert np.allclose([h["similarity"] for h in hits], np.minimum(best, 1.0), atol=1e-3)
    invoke(["dedup", "--by", "embedding", "--min-cosine", 0.999, "--device", "cpu", "--from", moved,
            "-o", tmp_path / "d", "--no-progress"])
    assert load_json(tmp_path / "d" / "dataset.json")["unreadable_samples"] == 0
    invoke(["dedup", "--by", "phash", "--from", moved, "-o", tmp_path / "p", "--no-progress"])
    assert load_json(tmp_path / "p" / "dataset.json")["unreadable_samples"] == 0
    assert load_json(moved / "dataset.json")["root_relative"] == "."  # its own root
    assert (moved / "config.json").read_bytes() == (run / "config.json").read_bytes()  # the model, for text queries


def test_a_run_and_its_subsets_moved_together_still_find_their_samples(run, tmp_path):
    """dataset.json holds the root relative to itself as well, read first: a run moved with the
    subsets and dedups made from it keeps them working."""
    a = tmp_path / "a"
    shutil.copytree(run, a / "run")
    invoke(["subset", "en", "--from", a / "run", "-o", a / "en", "--no-progress"])
    invoke(["dedup", "--by", "sha256", "--from", a / "run", "-o", a / "dd", "--no-progress"])
    invoke(["subset", "--where", "similarity > -1", "--from", a / "dd", "-o", a / "dd-sub", "--no-progress"])
    b = tmp_path / "b"
    shutil.move(a, b)  # the absolute paths recorded are gone
    english = [r for r in kept(read_rows(run)) if r["language_group"] == "en"]
    result = invoke(["stats", b / "en", "--html", tmp_path / "report.html"])
    assert f"({len(english)} thumbnails)" in result.output
    invoke(["subset", "--where", "true", "--from", b / "dd-sub", "-o", tmp_path / "c", "--shards", "--no-progress"])
    unique = len(table(b / "dd-sub" / "metadata.parquet"))
    assert load_json(tmp_path / "c" / "shards.json")["samples"] == unique
    assert load_json(tmp_path / "c" / "shards.json")["missing"] == 0
    assert load_json(b / "en" / "dataset.json")["root_relative"] == "../run"
    assert load_json(b / "dd-sub" / "dataset.json")["root_relative"] == "../run"


def _commands_reading_the_root(ds, tmp_path):
    """Each command that reads the samples' images or embeddings of the dataset `ds` (args, and
    the name its one-line refusal starts with), its outputs under tmp_path/x."""
    np.save(tmp_path / "q.npy", np.ones(512, np.float32))
    x = tmp_path / "x"
    return ((["stats", ds, "--html", tmp_path / "r.html"], "stats --html"),
            (["subset", "en", "--from", ds, "-o", x, "--shards"], "subset --shards"),
            (["dedup", "--by", "phash", "--from", ds, "-o", x], "dedup --by phash"),
            (["dedup", "--by", "embedding", "--from", ds, "-o", x], "dedup --by embedding"),
            (["index", ds], "index"),
            (["search", ds, "--vector", tmp_path / "q.npy"], "search"),
            (["classify", "--from", ds, "-o", x, "--class", "cat"], "classify"))


def test_a_dataset_whose_run_is_gone_says_so_in_one_line(run, tmp_path):
    """Every command that reads the images or embeddings refuses with one line naming the folder
    looked for; those that read only the metadata warn once and go on. An older dataset.json,
    with the absolute root only, is still read."""
    shutil.copytree(run, tmp_path / "a" / "run")
    subset = tmp_path / "en"
    invoke(["subset", "en", "--from", tmp_path / "a" / "run", "-o", subset, "--no-progress"])
    info = load_json(subset / "dataset.json")
    info.pop("root_relative", None)  # as fastlaion wrote it before
    (subset / "dataset.json").write_text(json.dumps(info))
    result = invoke(["stats", subset, "--html", tmp_path / "report.html", "--thumbnails", 2])
    assert "(2 thumbnails)" in result.output

    shutil.move(tmp_path / "a" / "run", tmp_path / "elsewhere")
    gone = str((tmp_path / "a" / "run").resolve())
    for args, what in _commands_reading_the_root(subset, tmp_path):
        result = runner.invoke(app(), [str(a) for a in args] + ["--no-progress"], terminal_width=400)
        assert result.exit_code == 2, (args, result.output)
        said = result.output.strip()
        assert len(said.splitlines()) == 1 and said.startswith(f"error: {what}"), said
        assert ": cannot find the folder holding the images and embeddings of" in said
        assert f"names {gone}, which does not exist" in said and "Traceback" not in said
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()

    # the metadata alone: a warning naming the folder, and the figures
    result = run_cli_here(["stats", subset])
    assert result.returncode == 0 and "funnel" in result.stdout
    warned = " ".join(result.stderr.split())
    assert f"names {gone}, which does not exist" in warned and "goes on" in warned


def test_a_dataset_whose_root_another_run_wrote_since_says_so_in_one_line(run, tmp_path):
    """A subset records which write of each of the root's shards its rows name (the stats files'
    write_id). Another run written into the root's folder since (the demo's way: the folder
    replaced by a new run) would have the subset read that run's images and embeddings as its own
    rows' (key.json of the new URLs beside the old metadata): every command that reads them
    refuses in one line naming the folder, those that read only the metadata warn, and what is
    made from the subset (a subset of it, a dedup of it) carries the record on. A `--shards`
    subset holds its own samples and is unaffected; a dataset.json of an earlier fastlaion
    (nothing recorded) is read as before; shards the run finished later, which the subset never
    saw, do not count."""
    root = tmp_path / "root"
    shutil.copytree(run, root)
    subset, shards = tmp_path / "s", tmp_path / "own"
    invoke(["subset", "--where", "similarity > -2", "--from", root, "-o", subset, "--no-progress"])
    invoke(["subset", "--where", "similarity > -2", "--from", root, "-o", shards, "--shards", "--no-progress"])
    invoke(["subset", "--where", "true", "--from", subset, "-o", tmp_path / "s2", "--no-progress"])
    invoke(["dedup", "--by", "url", "--from", subset, "-o", tmp_path / "d", "--no-progress"])
    named = sorted({r["shard"] for r in kept(read_rows(run))})
    recorded = {s: load_json(root / f"{s}_stats.json")["write_id"] for s in named}
    assert len(set(recorded.values())) == len(named) >= 2
    for made in ("s", "s2", "d"):
        assert load_json(tmp_path / made / "dataset.json")["root_shards"] == recorded, made
    old = tmp_path / "old"
    shutil.copytree(subset, old)
    info = load_json(old / "dataset.json")
    del info["root_shards"]  # as fastlaion wrote it before
    (old / "dataset.json").write_text(json.dumps(info))

    # another run, with the same inputs served again (other URLs: another port), in its place
    shutil.rmtree(root)
    shutil.copytree(real_run(str(tmp_path / "again")), root)
    real = str(root.resolve())
    for made in ("s", "s2", "d"):
        ds = tmp_path / made
        for args, what in _commands_reading_the_root(ds, tmp_path):
            result = runner.invoke(app(), [str(a) for a in args] + ["--no-progress"], terminal_width=400)
            assert result.exit_code == 2, (args, result.output)
            said = result.output.strip()
            assert len(said.splitlines()) == 1 and "Traceback" not in said, said
            assert said.startswith(f"error: {what}") and (
                f": {real} was written again since {ds} was made from it: {len(named)} of the {len(named)} shards its "
                f"rows name ({', '.join(named)}; {named[0]} was written again, finished ") in said, said
        assert not (tmp_path / "x").exists() and not (ds / "index").exists()
        result = run_cli_here(["stats", ds])  # the metadata alone: a warning, and the figures
        assert result.returncode == 0 and "funnel" in result.stdout, result.stderr
        warned = " ".join(result.stderr.split())
        assert f"warning: {real} was written again since {ds} was made from it" in warned and "goes on" in warned

    # a --shards subset is its own root: untouched; an earlier fastlaion's dataset.json: not checked
    for ds in (shards, old):
        result = runner.invoke(app(), ["stats", str(ds), "--html", str(tmp_path / "r.html"), "--no-progress"])
        assert result.exit_code == 0 and "written again" not in result.output, result.output
    invoke(["dedup", "--by", "embedding", "--from", shards, "-o", tmp_path / "dd", "--no-progress"])

    # made from the new run while its last shard was not finished, then the run finished it
    subset = tmp_path / "early"
    partial = as_in_progress(root, tmp_path / "resumed")
    invoke(["subset", "--where", "similarity > -2", "--from", partial, "-o", subset, "--no-progress"])
    last = next((partial / ".partial").iterdir())
    for f in last.iterdir():
        f.rename(partial / f.name)
    last.rmdir()
    shutil.copyfile(root / "summary.json", partial / "summary.json")
    assert last.name not in load_json(subset / "dataset.json")["root_shards"]
    assert any(r["shard"] == last.name for r in kept(read_rows(partial)))  # a shard the subset never saw
    result = runner.invoke(app(), ["dedup", "--by", "embedding", "--from", str(subset), "-o", str(tmp_path / "e"),
                                   "--no-progress"])
    assert result.exit_code == 0 and "written again" not in result.output, result.output


# --- 5. a run folder whose run is not done ---------------------------------------------------------

WRITING = "a fastlaion run is writing this folder; the result covers the {n} shards finished so far"
STOPPED = "the fastlaion run that wrote it did not finish ({n} shards finished); `fastlaion run` with the same arguments resumes it"


def as_in_progress(run: Path, to: Path) -> Path:
    """A copy of the run as it is while its last shard is being written: that shard's files under
    .partial/, no summary.json yet."""
    shutil.copytree(run, to)
    last = sorted(to.glob("[0-9]*_stats.json"))[-1].name.split("_")[0]
    (to / ".partial" / last).mkdir(parents=True)
    for f in to.glob(f"{last}*"):
        f.rename(to / ".partial" / last / f.name)
    (to / "summary.json").unlink()
    return to


def test_dataset_commands_say_a_run_is_writing_the_folder_and_a_stopped_one_did_not_finish(run, tmp_path):
    """Each dataset command on a run folder whose lock a run holds (a real flock, held here; the
    command in another process too) says on stderr, in one line, that a run is writing it and the
    result covers the shards finished so far; once the lock is gone without a summary, that the
    run did not finish and how to resume it. Their output counts the finished shards' rows only."""
    from fastlaion.pipeline import output_lock

    out = as_in_progress(run, tmp_path / "run")
    rows = read_rows(out)
    np.save(tmp_path / "q.npy", np.load(out / "00000_img_emb.npy")[0].astype(np.float32))
    commands = [["stats", out, "--json", tmp_path / "s.json", "--no-progress"],
                ["subset", "--where", "similarity > -2", "--from", out, "-o", tmp_path / "sub", "--no-progress"],
                ["dedup", "--from", out, "-o", tmp_path / "dd", "--no-progress"],
                ["index", out, "--no-progress"],
                ["search", out, "--vector", tmp_path / "q.npy", "-k", "2", "--no-progress", "--json", tmp_path / "h.json"]]
    with output_lock(out):
        other = run_cli(commands[0])
        assert other.returncode == 0, other.stderr
        assert other.stderr.strip() == f"warning: {out}: " + WRITING.format(n=2), other.stderr
        for args in commands:
            result = runner.invoke(app(), [str(a) for a in args])
            assert result.exit_code == 0, result.output
            assert result.stderr.strip() == f"warning: {out}: " + WRITING.format(n=2), (args, result.stderr)
    assert load_json(tmp_path / "s.json")["rows"] == len(rows) == 10
    # the JSON says it too, for a script that never sees stderr (it read as a whole dataset)
    assert load_json(tmp_path / "s.json")["unfinished"] == {
        "source_unfinished": True, "source_run": str(out.resolve()), "source_finished_shards": 2,
        "source_shards_total": None, "source_run_writing": True}
    assert load_json(tmp_path / "h.json")["unfinished"]["source_finished_shards"] == 2
    assert load_json(tmp_path / "h.json")["samples"] == sum(r["status"] == "kept" for r in rows)
    for args in commands[:2]:  # killed: the lock file left, nobody holding it
        (out / ".lock").write_text("12345\n")
        result = runner.invoke(app(), [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert result.stderr.strip() == f"warning: {out}: " + STOPPED.format(n=2), (args, result.stderr)
    assert load_json(tmp_path / "s.json")["unfinished"]["source_run_writing"] is False
    # a finished run, one Parquet file: nothing to say
    for args in (["stats", run, "--json", tmp_path / "whole.json"], ["stats", out / "00000.parquet"]):
        result = runner.invoke(app(), [str(a) for a in args] + ["--no-progress"])
        assert result.exit_code == 0 and not result.stderr, (args, result.stderr)
    assert load_json(tmp_path / "whole.json")["unfinished"] is None


def test_a_shard_a_run_finishes_while_a_command_opens_the_folder_is_left_for_the_next(run, tmp_path):
    """The line a dataset command prints ("the result covers the 2 shards finished so far") and
    the dataset.json / --json record are taken when it starts; a shard the run finishes (its files
    renamed into place, stats last, as the writer publishes) before the command lists the
    folder's Parquet files was read too: 3 shards' rows under a line and a record that said 2.
    What is read is what was counted; the next command reads the new shard."""
    from fastlaion.dataset import open_dataset, run_state
    from fastlaion.pipeline import output_lock

    out = as_in_progress(run, tmp_path / "run")
    last = next((out / ".partial").iterdir())
    with output_lock(out):  # a real flock: a run is writing the folder
        state = run_state(out)
        assert state is not None and state.writing and state.finished == 2
        for f in sorted(last.iterdir(), key=lambda f: f.name.endswith("_stats.json")):  # the run publishes it
            f.rename(out / f.name)
        ds = open_dataset(out, run=state)
        assert len(ds.files) == 2 and ds.rows == 10 and ds.unfinished["source_finished_shards"] == 2
        assert ds.skipped == ()
        now = open_dataset(out)
        assert len(now.files) == 3 and now.unfinished["source_finished_shards"] == 3


def test_a_subset_of_a_run_not_done_records_it_and_says_so(run, tmp_path):
    """A subset made from a run folder whose run was writing it, or had stopped before its end,
    records that in its dataset.json (with the shards finished then), and so does what is made
    from it; stats and the other commands on it say so in one line, as they do on the run folder.
    A subset of a finished run records nothing and nothing is said (it recorded nothing of it and
    stats on it said nothing: a partial dataset passed for a whole one)."""
    from fastlaion.pipeline import output_lock

    out = as_in_progress(run, tmp_path / "run")
    real = str(out.resolve())
    with output_lock(out):
        invoke(["subset", "--where", "similarity > -2", "--from", out, "-o", tmp_path / "writing", "--no-progress"])
    (out / ".lock").write_text("12345\n")  # killed: the lock file left, nobody holding it
    invoke(["subset", "--where", "similarity > -2", "--from", out, "-o", tmp_path / "stopped", "--no-progress"])
    invoke(["dedup", "--by", "url", "--from", tmp_path / "stopped", "-o", tmp_path / "then", "--no-progress"])
    invoke(["subset", "--where", "similarity > -2", "--from", run, "-o", tmp_path / "finished", "--no-progress"])
    record = {"source_unfinished": True, "source_run": real, "source_finished_shards": 2, "source_shards_total": None}
    for name, writing in (("writing", True), ("stopped", False), ("then", False)):
        info = load_json(tmp_path / name / "dataset.json")
        assert {k: info[k] for k in record} == record and info["source_run_writing"] is writing, name
    assert not any(k.startswith("source_unf") for k in load_json(tmp_path / "finished" / "dataset.json"))

    how = {"writing": "while a fastlaion run was writing it", "stopped": "whose fastlaion run had not finished"}
    for name in ("writing", "stopped", "then"):
        for args in (["stats", tmp_path / name], ["stats", tmp_path / name / "metadata.parquet"],
                     ["subset", "--where", "true", "--from", tmp_path / name, "-o", tmp_path / f"{name}2"]):
            result = runner.invoke(app(), [str(a) for a in args] + ["--no-progress"])
            assert result.exit_code == 0, result.output
            assert result.stderr.strip() == (f"warning: {args[-1] if args[0] == 'stats' else args[-3]}: made from "
                                             f"{real}, {how.get(name, how['stopped'])} (2 shards finished then): it "
                                             "holds the samples of those shards only"), (args, result.stderr)
    result = runner.invoke(app(), ["stats", str(tmp_path / "finished"), "--no-progress"])
    assert result.exit_code == 0 and not result.stderr, result.stderr


def test_a_real_run_being_written_and_then_killed_is_said_so(tmp_path, photos):
    """A real `fastlaion run` whose last shard hangs on a stalled download: `stats` on its folder
    says a run is writing it; after SIGKILL (its lock file left behind), that it did not finish."""
    import signal
    import sys
    import time

    from fastlaion.server import LoopbackServer, Served

    files = {f"{n}.jpg": Served(encode(a), "image/jpeg") for n, a in photos.items()}
    out = tmp_path / "run"
    with LoopbackServer(files, stall_limit_s=120) as server:
        urls = [server.url(f) for f in files] * 2 + [server.url("stall/hang")]
        pl.DataFrame({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}).write_parquet(
            tmp_path / "in.parquet")
        proc = subprocess.Popen([sys.executable, "-m", "fastlaion", "run", str(tmp_path / "in.parquet"), "-o", str(out),
                                 "--no-score", "--shard-size", "4", "--timeout", "100", "--read-timeout", "100",
                                 "--no-progress", "--allow-private-networks"], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while len(list(out.glob("*_stats.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(list(out.glob("*_stats.json"))) == 2 and proc.poll() is None
            writing = run_cli(["stats", out, "--no-progress"])
            as_json = run_cli(["stats", out, "--no-progress", "--json", tmp_path / "s.json"])
            assert proc.poll() is None, "the run must still be writing"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    assert writing.returncode == 0 and writing.stderr.strip() == f"warning: {out}: " + WRITING.format(n=2), writing.stderr
    assert "8 rows" in writing.stdout
    assert as_json.returncode == 0 and as_json.stderr == writing.stderr, as_json.stderr
    said = load_json(tmp_path / "s.json")
    assert said["rows"] == 8 and said["files"] == 2 and said["unfinished"] == {
        "source_unfinished": True, "source_run": str(out.resolve()), "source_finished_shards": 2,
        "source_shards_total": None, "source_run_writing": True}
    assert (out / ".lock").exists() and not (out / "summary.json").exists()
    stopped = run_cli(["stats", out, "--no-progress"])
    assert stopped.returncode == 0 and stopped.stderr.strip() == f"warning: {out}: " + STOPPED.format(n=2), stopped.stderr
