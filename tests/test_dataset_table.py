"""subset, dedup and stats on synthetic metadata shaped like a run's (every optional column), with
the expected rows computed here in plain Python from LAION.md's definitions."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from test_dataset_helpers import (app, check_commit_undone, check_ctrl_c_of_an_output, ctrl_c_after, ctrl_c_while_writing, greedy_reference,
                                  load_json, run_cli_here)
from typer.testing import CliRunner

from fastlaion.writer import PARQUET_SCHEMA

runner = CliRunner()

STATUSES = [("kept", None, None)] * 8 + [("dropped", "download", "http_404"), ("dropped", "decode", "truncated"),
                                         ("dropped", "filter", "low_similarity")]


def synthetic_rows(n: int, seed: int, shard_size: int) -> list[dict]:
    """Rows like a run's Parquet, with duplicates and exact threshold values planted."""
    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "sunset", "beach", "city", "car", "flower", "mountain", "portrait", "food"]
    rows = []
    for i in range(n):
        status, stage, reason = STATUSES[int(rng.integers(len(STATUSES)))]
        got = status == "kept" or stage in ("decode", "filter")
        scored = status == "kept" or stage == "filter"
        url_id = int(rng.integers(i)) if i and rng.random() < 0.08 else i   # repeats an earlier URL
        caption = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
        if url_id != i and rng.random() < 0.5:
            caption = rows[url_id]["caption"]                                # ... with its caption too
        w, h = (int(x) for x in rng.choice([300, 640, 1023, 1024, 2048], size=2))
        rows.append({
            "key": f"{i // shard_size:05d}{i % shard_size:04d}", "url": f"https://h{url_id % 7}.example/{url_id}.jpg",
            "caption": caption, "status": status, "stage": stage, "reason": reason,
            "sha256": (f"{int(rng.integers(n // 2)):064x}" if got else None),
            "original_width": w if got else None, "original_height": h if got else None,
            "language_group": str(rng.choice(["en", "en", "multi", "nolang"])) if scored else None,
            "similarity": float(rng.choice([0.3, 0.29, 0.31, 0.25, 0.35])) if scored else None,
            "punsafe": float(rng.choice([0.1, 0.5, 0.49, 0.9])) if scored else None,
            "pwatermark": float(rng.choice([0.1, 0.8, 0.79, 0.95])) if scored else None,
            "aesthetic": float(rng.choice([5.0, 7.0, 7.01, 8.0, 8.5, 9.0])) if scored else None,
            "aesthetic_v2": float(rng.choice([4.4, 4.5, 4.75, 5.0, 6.0, 6.25, 6.5, 7.0])) if scored else None,
        })
    return rows


def write_run(folder: Path, rows: list[dict], shard_size: int, drop: tuple[str, ...] = ()) -> list[Path]:
    """Shard Parquet files (PARQUET_SCHEMA types) and their stats files, as a run leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = {c: t for c, t in PARQUET_SCHEMA.items() if c not in drop}
    frame = pl.DataFrame(rows).select([(pl.col(c) if c in rows[0] else pl.lit(None)).cast(t).alias(c)
                                       for c, t in schema.items()])
    paths = []
    for s in range(math.ceil(len(rows) / shard_size)):
        path = folder / f"{s:05d}.parquet"
        frame.slice(s * shard_size, shard_size).write_parquet(path)
        (folder / f"{s:05d}_stats.json").write_text("{}")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic") / "run"
    rows = synthetic_rows(3000, seed=1, shard_size=1000)
    write_run(folder, rows, 1000)
    return folder, rows


def invoke(args, code=0):
    result = runner.invoke(app(), [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def keys_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


# --- 1. subsets: every recipe of LAION.md, --where --------------------------------------------------

def _lt(x, t):
    return x is not None and x < t


def _ge(x, t):
    return x is not None and x >= t


def _gt(x, t):
    return x is not None and x > t


LAION_MD = {  # LAION.md, "Derived subsets", written out independently of fastlaion's recipes
    "en": lambda r: r["language_group"] == "en",
    "multi": lambda r: r["language_group"] == "multi",
    "nolang": lambda r: r["language_group"] == "nolang",
    "laion400m": lambda r: r["language_group"] == "en" and _ge(r["similarity"], 0.3),
    "high-res": lambda r: _ge(r["original_width"], 1024) and _ge(r["original_height"], 1024),
    "aesthetic-v1": lambda r: _lt(r["pwatermark"], 0.8) and _lt(r["punsafe"], 0.5) and _gt(r["aesthetic"], 7),
    "art": lambda r: _lt(r["pwatermark"], 0.8) and _lt(r["punsafe"], 0.5) and _gt(r["aesthetic"], 8),
}


def test_folders_named_with_glob_characters_are_read_as_themselves(tmp_path):
    """A run, subset or dedup folder named "run [1]" (or with * or ?): stats, subset and dedup
    stopped with Polars' traceback ("expanded paths were empty"), which took the name for a
    pattern. Now each reads the folder itself."""
    rows = synthetic_rows(60, seed=3, shard_size=25)
    run = tmp_path / "run [1] *?"
    write_run(run, rows, 25)
    kept = sum(r["status"] == "kept" for r in rows)
    stats = runner.invoke(app(), ["stats", str(run), "--no-progress"], terminal_width=200)
    assert stats.exit_code == 0 and f"{len(rows):,}" in stats.output, stats.output
    sub = runner.invoke(app(), ["subset", "--from", str(run), "--where", "status = 'kept'", "-o", str(tmp_path / "s [2]"),
                              "--no-progress"])
    assert sub.exit_code == 0, sub.output
    assert pl.read_parquet(tmp_path / "s [2]" / "metadata.parquet", glob=False).height == kept
    again = runner.invoke(app(), ["subset", "--from", str(tmp_path / "s [2]"), "--where", "true", "-o",
                                str(tmp_path / "t [3]"), "--no-progress"])
    assert again.exit_code == 0, again.output
    deduped = runner.invoke(app(), ["dedup", "--from", str(run), "--by", "url", "-o", str(tmp_path / "d [4]"),
                                  "--no-progress"])
    assert deduped.exit_code == 0, deduped.output


@pytest.mark.parametrize("recipe, extra", [*((name, []) for name in LAION_MD),
                                           *(("aesthetic-v2", ["--min", m]) for m in ("4.5", "4.75", "5", "6", "6.25", "6.5"))])
def test_every_recipe_selects_what_laion_md_defines(synth, tmp_path, recipe, extra):
    folder, rows = synth
    invoke(["subset", recipe, *extra, "--from", folder, "-o", tmp_path, "--no-progress"])
    if recipe == "aesthetic-v2":
        m = float(extra[1])
        want = lambda r: r["language_group"] == "en" and _ge(r["aesthetic_v2"], m)
    else:
        want = LAION_MD[recipe]
    expected = [r["key"] for r in rows if r["status"] == "kept" and want(r)]
    assert expected, "the synthetic rows should hit every recipe"
    assert keys_of(tmp_path / "metadata.parquet") == expected
    info = load_json(tmp_path / "dataset.json")
    assert info["selected"] == len(expected)
    assert info["considered"] == sum(r["status"] == "kept" for r in rows)


@pytest.mark.parametrize("score, warned", [
    ({"model": "ViT-B-32", "pretrained": "openai"}, False), ({"model": "ViT-B-32-quickgelu", "pretrained": "openai"}, False),
    ({"model": "ViT-L-14", "pretrained": "openai"}, True), ({"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, True),
    (None, False)])
def test_laion400m_on_a_run_scored_by_another_model_says_its_cut_is_not_that_models(tmp_path, score, warned):
    """LAION-400M's similarity >= 0.3 is a cut of OpenAI ViT-B/32's similarities (LAION.md); a run
    scored by ViT-L/14, or by ViT-B/32 with LAION's weights, has its similarities elsewhere, so the
    recipe selects no LAION-400M-style subset there: one warning naming the run's model (nothing
    was said). The selection itself is the recipe's either way; no config.json, nothing said."""
    rows = synthetic_rows(60, seed=4, shard_size=30)
    run = tmp_path / "run"
    write_run(run, rows, 30)
    if score is not None:
        (run / "config.json").write_text(json.dumps({"score": score}))
    result = runner.invoke(app(), ["subset", "laion400m", "--from", str(run), "-o", str(tmp_path / "s"), "--no-progress"],
                           terminal_width=400)
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "recipe laion400m" in line]
    if warned:
        assert len(said) == 1 and f"scored with {score['model']} ({score['pretrained']})" in said[0], result.output
    else:
        assert not said, result.output
    expected = [r["key"] for r in rows if r["status"] == "kept" and LAION_MD["laion400m"](r)]
    assert keys_of(tmp_path / "s" / "metadata.parquet") == expected


def test_where_is_sql_and_combines_with_a_recipe(synth, tmp_path):
    folder, rows = synth
    invoke(["subset", "en", "--where", "similarity >= 0.3 AND caption LIKE '%cat%' AND original_width > 600",
            "--from", folder, "-o", tmp_path, "--no-progress"])
    expected = [r["key"] for r in rows if r["status"] == "kept" and r["language_group"] == "en"
                and _ge(r["similarity"], 0.3) and "cat" in r["caption"] and _gt(r["original_width"], 600)]
    assert expected and keys_of(tmp_path / "metadata.parquet") == expected


def test_include_dropped_audits_dropped_rows(synth, tmp_path):
    folder, rows = synth
    invoke(["subset", "--where", "reason = 'http_404'", "--include-dropped", "--from", folder, "-o", tmp_path,
            "--no-progress"])
    assert keys_of(tmp_path / "metadata.parquet") == [r["key"] for r in rows if r["reason"] == "http_404"]
    # without --include-dropped the pool is the kept samples, so a condition on why rows were
    # dropped selects none: it said "0 of N kept samples" and nothing more; now it names the flag
    result = invoke(["subset", "--where", "reason = 'http_404'", "--from", folder, "-o", tmp_path / "kept-only",
                     "--no-progress"])
    assert keys_of(tmp_path / "kept-only" / "metadata.parquet") == []
    assert "--include-dropped" in result.output and "reason" in result.output, result.output
    result = invoke(["subset", "--where", "similarity > 2", "--from", folder, "-o", tmp_path / "none",
                     "--no-progress"])
    assert "--include-dropped" not in result.output, result.output  # no column of the drops: no hint


@pytest.mark.parametrize("where, message", [
    ("__import__('os').system('touch {marker}')", "--where"),
    ("similarity >=", "cannot parse"),
    ("colour = 'red'", "unknown column(s) 'colour'"),
    ("similarity + 1", "must be a condition"),
    # a string compared with a number passed the schema check and raised from the scan (traceback)
    ("caption > 3", "--where: 'caption > 3' does not apply to these columns: cannot compare string with numeric"),
    ("status = 1", "--where: 'status = 1' does not apply to these columns: cannot compare string with numeric"),
    ("similarity > 'high'", "does not apply to these columns: cannot compare string with numeric"),
    ("CAST(caption AS INTEGER) > 3", "error: --where 'CAST(caption AS INTEGER) > 3' could not be computed on the "
                                     "data: conversion from `str` to `i32` failed in column 'caption'"),
])
def test_where_never_runs_python_and_bad_conditions_are_one_line(synth, tmp_path, where, message):
    folder, _ = synth
    marker = tmp_path / "pwned"
    result = invoke(["subset", "--where", where.format(marker=marker), "--from", folder, "-o", tmp_path / "o"], code=2)
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


def test_aesthetic_v2_needs_min_and_min_needs_aesthetic_v2(synth, tmp_path):
    folder, _ = synth
    assert "needs --min" in invoke(["subset", "aesthetic-v2", "--from", folder, "-o", tmp_path], code=2).output
    assert "aesthetic-v2 recipe only" in invoke(["subset", "en", "--min", "5", "--from", folder, "-o", tmp_path],
                                                code=2).output


def test_missing_column_names_the_run_option_that_adds_it(tmp_path):
    rows = synthetic_rows(50, seed=2, shard_size=50)
    write_run(tmp_path / "run", rows, 50, drop=("punsafe", "pwatermark", "aesthetic", "aesthetic_v2", "language_group"))
    out = invoke(["subset", "art", "--from", tmp_path / "run", "-o", tmp_path / "o"], code=2).output
    assert "'punsafe'" in out and "--nsfw-head" in out and "'aesthetic'" in out and "--aesthetic-v1" in out
    out = invoke(["subset", "en", "--from", tmp_path / "run", "-o", tmp_path / "o"], code=2).output
    assert "'language_group'" in out and "--language" in out


def test_bad_input_from_the_command_line_is_one_line_never_a_traceback(synth, tmp_path):
    folder, _ = synth
    (tmp_path / "empty").mkdir()
    bare = tmp_path / "bare"  # a Parquet of ours without the status columns' stage and reason
    bare.mkdir()
    pl.DataFrame({"key": ["000000000"], "url": ["u"], "caption": ["c"], "status": ["kept"]}).write_parquet(
        bare / "00000.parquet")
    (bare / "00000_stats.json").write_text("{}")
    cases = [
        (["dedup", "--by", "embedding", "--from", bare, "-o", tmp_path / "o"], "needs 'stage', 'reason', which"),
        (["stats", bare], "stats needs 'stage', 'reason', which"),
        (["subset", "laion5b", "--from", folder, "-o", tmp_path / "o"],
         "unknown recipe 'laion5b'; known recipes: en, multi, nolang, laion400m, high-res, aesthetic-v1, art, aesthetic-v2"),
        (["stats", tmp_path / "empty"], "holds no dataset"),
        (["dedup", "--by", "url", "--from", tmp_path / "nowhere", "-o", tmp_path / "o"], "no such file or folder"),
        # an option of another --by is refused, not ignored
        (["dedup", "--by", "url", "--method", "clusters", "--from", folder, "-o", tmp_path / "o"],
         "--method applies to --by embedding only, not --by url"),
        (["dedup", "--by", "phash", "--min-cosine", "0.9", "--from", folder, "-o", tmp_path / "o"],
         "--min-cosine applies to --by embedding only, not --by phash"),
        (["dedup", "--by", "embedding", "--max-hamming", "2", "--from", folder, "-o", tmp_path / "o"],
         "--max-hamming applies to --by phash only, not --by embedding"),
        (["dedup", "--by", "phash", "--threads", 10**12, "--from", folder, "-o", tmp_path / "o"],
         "--threads must be between 0 and 4096, got 1000000000000"),
        # an option the other settings do not read is refused, not ignored
        (["dedup", "--by", "embedding", "--method", "exact", "--clusters", "5", "--from", folder, "-o", tmp_path / "o"],
         "--clusters applies to --method clusters (or auto) only, not --method exact"),
        (["subset", "en", "--shard-size", "5", "--from", folder, "-o", tmp_path / "o"],
         "--shard-size applies to --shards only"),
    ]
    for args, message in cases:
        result = run_cli_here(args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- 5. bad data: corrupt files, empty datasets -----------------------------------------------------

def test_corrupt_parquet_among_many_is_skipped_counted_and_named(tmp_path):
    rows = synthetic_rows(4000, seed=3, shard_size=1000)
    paths = write_run(tmp_path / "run", rows, 1000)
    paths[1].write_bytes(b"PAR1 this is not parquet at all PAR1")               # bad footer: seen on open
    data = bytearray(paths[2].read_bytes())                                      # bad pages: seen on read
    for i in range(len(data) // 4, len(data) // 2):
        data[i] = (data[i] * 31 + 7) % 256
    paths[2].write_bytes(bytes(data))
    result = invoke(["stats", tmp_path / "run", "--json", tmp_path / "s.json"])
    stats = load_json(tmp_path / "s.json")
    good = [r for r in rows if r["key"][:5] in ("00000", "00003")]
    assert stats["rows"] == len(good)
    assert stats["kept"] == sum(r["status"] == "kept" for r in good)
    assert sorted(Path(s["path"]).name for s in stats["skipped_files"]) == ["00001.parquet", "00002.parquet"]
    warned = " ".join(result.output.split())  # the warnings, on stderr (rich may wrap them)
    assert "skipped unreadable Parquet" in warned
    assert "00001.parquet" in warned and "00002.parquet" in warned
    assert "skipped 2 unreadable Parquet file(s)" in result.output

    # the same for dedup: the rest is processed, the skip is recorded beside the output
    invoke(["dedup", "--by", "url", "--from", tmp_path / "run", "-o", tmp_path / "d", "--no-progress"])
    assert len(keys_of(tmp_path / "d" / "metadata.parquet")) == len(good)
    assert len(load_json(tmp_path / "d" / "dataset.json")["skipped_files"]) == 2


def test_empty_datasets_are_a_clear_error(tmp_path):
    (tmp_path / "none").mkdir()
    assert "holds no dataset" in invoke(["stats", tmp_path / "none"], code=2).output
    rows = synthetic_rows(10, seed=4, shard_size=10)
    write_run(tmp_path / "zero", rows, 10)
    pl.read_parquet(tmp_path / "zero" / "00000.parquet").clear().write_parquet(tmp_path / "zero" / "00000.parquet")
    # no rows is a dataset (a subset of it is too), but nothing to index
    assert "0 of 0 kept samples" in invoke(["subset", "en", "--from", tmp_path / "zero", "-o", tmp_path / "o"]).output
    assert pq.read_metadata(tmp_path / "o" / "metadata.parquet").num_rows == 0
    assert "holds no kept samples (0 rows): nothing to index" in invoke(["index", tmp_path / "zero"], code=2).output
    # a shard still being written (no stats file yet) is not read
    (tmp_path / "zero" / "00000_stats.json").unlink()
    assert "none of the 1 Parquet file(s)" in invoke(["stats", tmp_path / "zero"], code=2).output


# --- 2. exact dedup at a few thousand rows, and the near-duplicate searches -----------------------

@pytest.mark.parametrize("by, columns", [("url", ("url",)), ("url+caption", ("url", "caption")),
                                         ("sha256", ("sha256",))])
def test_exact_dedup_matches_first_occurrence_in_python(synth, tmp_path, by, columns):
    folder, rows = synth
    invoke(["dedup", "--by", by, "--from", folder, "-o", tmp_path, "--no-progress"])
    first: dict[tuple, str] = {}
    expected: dict[str, str] = {}
    for r in rows:
        if r["status"] != "kept" or r[columns[0]] is None:
            continue
        value = tuple(r[c] for c in columns)
        if value in first:
            expected[r["key"]] = first[value]
        else:
            first[value] = r["key"]
    out = pq.read_table(tmp_path / "metadata.parquet").to_pylist()
    assert len(out) == len(rows)  # every row, dropped ones too
    got = {o["key"]: o["duplicate_of"] for o in out if o["duplicate_of"] is not None}
    assert got == expected and len(expected) > 20
    for o, r in zip(out, rows):
        if o["key"] in expected:
            assert (o["status"], o["stage"], o["reason"]) == ("dropped", "dedup", "duplicate_" + by.replace("+", "_"))
        else:
            assert (o["status"], o["stage"], o["reason"]) == (r["status"], r["stage"], r["reason"])


def test_a_second_dedup_keeps_the_first_ones_records(synth, tmp_path):
    folder, _ = synth
    invoke(["dedup", "--by", "url", "--from", folder, "-o", tmp_path / "a", "--no-progress"])
    invoke(["dedup", "--by", "sha256", "--from", tmp_path / "a", "-o", tmp_path / "b", "--no-progress"])
    a = pq.read_table(tmp_path / "a" / "metadata.parquet").to_pylist()
    b = pq.read_table(tmp_path / "b" / "metadata.parquet").to_pylist()
    for x, y in zip(a, b):
        if x["reason"] == "duplicate_url":
            assert (y["reason"], y["duplicate_of"]) == ("duplicate_url", x["duplicate_of"])
    reasons = Counter(y["reason"] for y in b)
    assert reasons["duplicate_url"] > 0 and reasons["duplicate_sha256"] > 0
    stats = invoke(["stats", tmp_path / "b", "--json", tmp_path / "s.json"])
    funnel = load_json(tmp_path / "s.json")["funnel"]
    assert funnel[-1]["stage"] == "dedup" and funnel[-1]["dropped"] == reasons["duplicate_url"] + reasons["duplicate_sha256"]
    assert funnel[-1]["rows"] == sum(y["status"] == "kept" for y in b)
    assert "duplicate_sha256" in stats.output


def test_url_dedup_folds_the_case_of_scheme_and_host(tmp_path):
    """--by url and url+caption compare URLs as extraction writes them (extract.fold_case: a
    user's URL list may spell one URL `HTTP://A.com:80/x.jpg` and `http://a.com/x.jpg`): scheme
    and host in lower case, an IDN host in punycode, a percent-encoded one decoded, an IPv4
    address in dotted decimal, no default or empty port; the path, userinfo and a non-default port stay, and the url column is written as
    it was."""
    import random

    from fastlaion.extract import fold_case

    planted = [  # (url, caption, status, duplicate_of by url: the index of the row it repeats)
        ("HTTP://A.com/x.jpg", "c", "kept", None), ("http://a.com/x.jpg", "c", "kept", 0),
        ("http://a.com/X.jpg", "c", "kept", None), ("Http://A.COM/x.jpg", "other", "kept", 0),
        ("https://USER:Pw@Ex.COM:8080/P?Q#F", "c", "kept", None), ("https://USER:Pw@ex.com:8080/P?Q#F", "c", "kept", 4),
        ("https://user:Pw@ex.com:8080/P?Q#F", "c", "kept", None), ("NOTAURL", "c", "kept", None),
        ("notaurl", "c", "kept", None), ("http://BÜcher.DE/x", "c", "kept", None), ("http://bÜcher.de/x", "c", "kept", 9),
        ("http://bücher.de/x", "c", "kept", 9), ("HTTPS://[::1]/x", "c", "kept", None),
        ("https://[::1]/x", "c", "kept", 12), ("HTTP://B.com/y", "c", "dropped", None), ("http://b.com/y", "c", "kept", None),
        # ports and IDN hosts (WHATWG's serialisation): a default or empty port goes, punycode is the same host
        ("http://a.com:80/x.jpg", "c", "kept", 0), ("HTTP://A.com:/x.jpg", "c", "kept", 0), ("http://a.com:0080/x.jpg", "c", "kept", 0),
        ("http://a.com:443/x.jpg", "c", "kept", None), ("https://a.com:443/x.jpg", "c", "kept", None),
        ("https://a.com/x.jpg", "c", "kept", 20), ("http://xn--bcher-kva.de:80/x", "c", "kept", 9),
        ("https://USER:Pw@ex.com:08080/P?Q#F", "c", "kept", 4), ("http://my_host.Bücher.de/x", "c", "kept", None),
        ("http://my_host.bücher.de:80/x", "c", "kept", 24),  # a host idna refuses ('_'): in punycode, as browsers write it
        # percent-encoded hosts decoded, as WHATWG's host parser does; one it refuses as written, lower case
        ("http://%61.com/x.jpg", "c", "kept", 0), ("http://b%C3%BCcher.DE/x", "c", "kept", 9),
        ("http://%FF.de/x", "c", "kept", None), ("http://%ff.DE:80/x", "c", "kept", 28),
        # an IPv4 address in another spelling is its dotted decimal (lower case, no port: still found)
        ("http://127.0.0.1/x", "c", "kept", None), ("http://0x7f.1/x", "c", "kept", 30),
        ("http://2130706433/x", "c", "kept", 30), ("http://u@127.1/x", "c", "kept", None),
        ("http://u@0177.0.0.1/x", "c", "kept", 33),
        # hosts idna refuses in punycode label by label, as browsers write them (U+1F4A9 is "ls8h", RFC 3492)
        ("http://My_Host.XN--BCHER-kva.de/x", "c", "kept", 24), ("http://💩.LA/x", "c", "kept", None),
        ("http://xn--ls8h.la:80/x", "c", "kept", 36),
    ]
    rng = random.Random(3)
    generated = []  # case variants of a few URLs, kept: the reference is fold_case in Python
    for _ in range(400):
        url = rng.choice(["http://img.example.org/a/B.jpg", "https://cdn.x.com:443/P.png?Q=1", "https://cdn.x.com/P.png?Q=1",
                          "http://h.de/z", "http://h.de:80/z", "http://bücher.de:/z", "http://xn--bcher-kva.de/z"])
        generated.append(("".join(c.upper() if rng.random() < 0.3 else c for c in url[:20]) + url[20:],
                          rng.choice(["c", "d"]), "kept", None))
    spec = planted + generated
    rows = [{"key": f"00000{i:04d}", "url": u, "caption": c, "status": s,
             "stage": None if s == "kept" else "download", "reason": None if s == "kept" else "http_404"}
            for i, (u, c, s, _) in enumerate(spec)]
    write_run(tmp_path / "run", rows, len(rows))
    for by, columns in (("url", ("url",)), ("url+caption", ("url", "caption"))):
        invoke(["dedup", "--by", by, "--from", tmp_path / "run", "-o", tmp_path / by, "--no-progress"])
        out = pq.read_table(tmp_path / by / "metadata.parquet").to_pylist()
        assert [o["url"] for o in out] == [r["url"] for r in rows]  # as written
        got = {o["key"]: o["duplicate_of"] for o in out if o["duplicate_of"] is not None}
        first: dict[tuple, str] = {}
        expected: dict[str, str] = {}
        for r in rows:
            if r["status"] == "kept":
                value = (fold_case(r["url"]), *(r[c] for c in columns[1:]))
                expected.update({r["key"]: first[value]} if value in first else {})
                first.setdefault(value, r["key"])
        assert got == expected
        if by == "url":
            assert {k: v for k, v in got.items() if int(k) < len(planted)} == {
                f"00000{i:04d}": f"00000{d:04d}" for i, (_, _, _, d) in enumerate(planted) if d is not None}
            assert len(got) > 350
        else:  # the caption still counts: row 3 repeats row 0's URL only
            assert "000000003" not in got and got["000000001"] == "000000000"


def test_greedy_hamming_search_matches_brute_force():
    from fastlaion.dataset.phash import greedy_duplicates

    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300).astype(np.uint64)
    hashes = []
    for _ in range(700):  # copies with a few flipped bits, exact copies, and fresh hashes
        h = int(base[rng.integers(len(base))])
        for bit in rng.choice(64, size=int(rng.integers(0, 7)), replace=False):
            h ^= 1 << int(bit)
        hashes.append(h)
    hashes += [int(x) for x in base]
    arr = np.array(hashes, dtype=np.uint64)
    for bits in (0, 2, 5, 8):
        rep = greedy_duplicates(arr, bits)
        expected = greedy_reference(list(range(len(hashes))),
                                    lambda a, b, bits=bits: bin(hashes[a] ^ hashes[b]).count("1") <= bits)
        assert {i: int(r) for i, r in enumerate(rep) if r >= 0} == expected


def test_phash_matches_the_imagehash_definition(photos):
    from helpers import encode
    from test_dataset_helpers import reference_phash

    from fastlaion.dataset.phash import phash_bytes

    for arr in photos.values():
        for fmt in ("JPEG", "PNG"):
            data = encode(arr, fmt)
            assert phash_bytes(data) == reference_phash(data)


def test_greedy_cosine_blocks_match_all_pairs():
    import torch

    from fastlaion.dataset.semantic import greedy_cosine

    rng = np.random.default_rng(6)
    base = rng.normal(size=(120, 16))
    picks = rng.integers(0, 120, size=400)
    emb = base[picks] + rng.normal(scale=rng.choice([0.01, 0.2, 1.0], size=(400, 1)), size=(400, 16))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    threshold = 0.98
    assert np.abs(cos - threshold).min() > 1e-5
    rep = greedy_cosine(torch.from_numpy(emb.astype(np.float32)), threshold, block_rows=64, device=torch.device("cpu"))
    expected = greedy_reference(list(range(400)), lambda a, b: cos[a, b] >= threshold)
    assert {i: int(r) for i, r in enumerate(rep) if r >= 0} == expected and len(expected) > 50


# --- 3. stats ----------------------------------------------------------------------------------------

def test_stats_histograms_languages_and_sizes_match_python(synth, tmp_path):
    folder, rows = synth
    invoke(["stats", folder, "--json", tmp_path / "s.json", "--bins", "10"])
    stats = load_json(tmp_path / "s.json")
    kept = [r for r in rows if r["status"] == "kept"]
    assert stats["rows"] == len(rows) and stats["kept"] == len(kept)
    assert [lvl["rows"] for lvl in stats["funnel"]] == [
        len(rows), *(len(rows) - sum(r["status"] == "dropped" and r["stage"] in upto for r in rows)
                     for upto in (("download",), ("download", "decode"), ("download", "decode", "score"),
                                  ("download", "decode", "score", "filter")))]
    for column in ("similarity", "aesthetic", "aesthetic_v2", "punsafe", "pwatermark"):
        h = stats["histograms"][column]
        edges = np.array(h["edges"])
        values = np.array([r[column] for r in kept], dtype=np.float32).astype(np.float64)
        assert len(h["counts"]) == 10 and edges[0] <= values.min() and edges[-1] >= values.max()
        idx = np.clip(np.floor((values - edges[0]) / (edges[1] - edges[0])), 0, 9).astype(int)
        assert h["counts"] == np.bincount(idx, minlength=10).tolist(), column
    assert stats["language_groups"] == dict(Counter(r["language_group"] for r in kept))
    short = [min(r["original_width"], r["original_height"]) for r in kept]
    assert dict(map(tuple, stats["size_buckets"])) == {
        "< 256 px": 0, "256-511 px": sum(s < 512 for s in short), "512-1023 px": sum(512 <= s < 1024 for s in short),
        ">= 1024 px": sum(s >= 1024 for s in short)}
    assert sum(stats["size_histogram"]["counts"]) == len(kept)


def test_every_bin_count_allowed_gives_histograms_that_cover_the_values(synth, tmp_path):
    """--bins 1 (allowed: 1 to 200) over values around 0 found no round step (StopIteration, a
    traceback): the range is then kept as it is. Every count allowed covers the values."""
    from fastlaion.dataset.stats import histogram_range

    for bins in range(1, 201):
        for column, lo, hi in [("similarity", -0.12, 0.41), ("aesthetic", 2.1, 7.9), ("punsafe", 0.0, 0.97),
                               ("x", -5.0, 3.0), ("x", 1e-9, 3e-9), ("x", 0.3, 0.3), ("x", None, None)]:
            a, b = histogram_range(column, lo, hi, bins)
            assert a <= (lo if lo is not None else 0) and b >= (hi if hi is not None else 1) and b > a, (bins, lo, hi)
    folder, rows = synth
    invoke(["stats", folder, "--json", tmp_path / "s.json", "--bins", "1"])
    kept = sum(r["status"] == "kept" for r in rows)
    assert load_json(tmp_path / "s.json")["histograms"]["similarity"]["counts"] == [kept]


def test_a_thumbnail_count_past_the_limit_is_one_line_before_work(synth, tmp_path):
    """--thumbnails 10^12 was an OverflowError traceback from Polars, after the stats were printed."""
    folder, _ = synth
    result = invoke(["stats", folder, "--html", tmp_path / "r.html", "--thumbnails", 10**12], code=2)
    assert result.output == "error: --thumbnails must be between 0 and 10,000, got 1000000000000\n"
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("command", [["stats", "{run}", "--json"], ["stats", "{run}", "--html"],
                                     ["search", "{run}", "-t", "cat", "--json"]])
@pytest.mark.parametrize("where, says", [("folder", "{path}: is a folder; give a file name"),
                                         ("missing/out.json", "{path}: no folder {tmp}/missing"),
                                         ("notes.txt/sub/out.json", "{path}: {tmp}/notes.txt is a file, not a folder")])
def test_a_file_to_write_that_cannot_be_is_refused_before_the_work(synth, tmp_path, command, where, says):
    """stats --json/--html and search --json wrote their file last: to a folder, or under a missing
    folder or a file, the command did its whole work (a search: loading the model, every
    embedding) and then failed with "Is a directory" or "No such file", its result lost (search
    printed no hit). Refused first, exit 2, in one line."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    path = tmp_path / where
    run, _ = synth
    args = [a.format(run=run) for a in command] + [str(path), "--no-progress"]
    result = runner.invoke(app(), args, terminal_width=400)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {command[-1]} " + says.format(path=path, tmp=tmp_path), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt"]


@pytest.mark.parametrize("command, name", [(["stats", "--json"], "00001.parquet"), (["stats", "--html"], "config.json"),
                                           (["stats", "--json"], "00000_stats.json"),
                                           (["search", "-t", "cat", "--json"], "config.json"),
                                           (["search", "-t", "cat", "--json"], "00002.parquet")])
def test_a_report_over_a_file_of_the_dataset_is_refused(synth, tmp_path, command, name):
    """`stats DS --json DS/00001.parquet` wrote the figures over the shard's rows (lost; the next
    stats skipped the shard as unreadable), `search DS --json DS/config.json` over the run's
    settings. A file of another name in the dataset's folder is the user's to write."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(synth[0], run)
    (run / "config.json").write_text('{"score": {"model": "fastlaion-tiny", "pretrained": "none"}}')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    target = run / name
    result = invoke([command[0], run, *command[1:], target, "--no-progress"], code=2)
    assert result.output.splitlines()[-1] == (f"error: {command[-1]} {target}: a file of the dataset {run}, which it "
                                              "would be written over; give another file name"), result.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    invoke(["stats", run, "--json", run / "stats.json", "--html", run / "report.html", "--thumbnails", 0])
    assert (run / "stats.json").is_file() and (run / "report.html").is_file()


@pytest.mark.parametrize("command", [["subset", "en"], ["dedup", "--by", "url"]])
def test_an_output_folder_of_someone_elses_tars_is_refused_and_kept(synth, tmp_path, command):
    """A folder of webdataset tars not written by fastlaion (00000.tar, 00001.tar: no dataset.json)
    given as -o: the tars were taken for the command's earlier output and deleted."""
    out = tmp_path / "wds"
    out.mkdir()
    for name in ("00000.tar", "00001.tar", "urls.parquet", "notes.txt"):
        (out / name).write_bytes(b"someone else's " + name.encode())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = invoke([*command, "--from", synth[0], "-o", out, "--no-progress"], code=2)
    assert result.output == (f"error: -o {out} holds 3 files (00000.tar, 00001.tar, urls.parquet) named as a fastlaion "
                             "output's but no dataset.json (not written by fastlaion, or left by a command stopped "
                             "midway), which the output would replace; move them away or choose another folder\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_ctrl_c_says_which_stats_files_were_written(synth, tmp_path, monkeypatch):
    """stats --json --html: a real Ctrl-C while a file is written leaves the earlier one as it
    was (it was cut short), and the message names the files written whole (it said nothing was
    written after the JSON was, and while the closing line printed)."""
    import pathlib

    from fastlaion import cli_dataset, report

    js, page = tmp_path / "s.json", tmp_path / "r.html"
    args = ["stats", synth[0], "--json", js, "--html", page, "--thumbnails", 0, "--no-progress"]
    invoke(args)
    new_js = js.read_bytes()

    def cut_short(suffix):  # writes half the text, then the Ctrl-C comes
        return lambda write_text: ctrl_c_while_writing(write_text, suffix)

    def on_report_line(say):
        return lambda line: ctrl_c_after(say)(line) if line.startswith("report: ") else say(line)

    only_json = f"interrupted: {js} was written, whole; {page} was not"
    for target, name, wrap, says, written in (
            (pathlib.Path, "write_text", cut_short(".json"), "interrupted: nothing was written", ()),
            (report, "render", ctrl_c_after, only_json, (js,)),
            (pathlib.Path, "write_text", cut_short(".html"), only_json, (js,)),
            (cli_dataset, "_say", on_report_line, f"interrupted: {js} and {page} were written, whole", (js, page))):
        js.write_text('{"old": true}')
        page.write_text("<p>old</p>")
        with monkeypatch.context() as m:
            m.setattr(target, name, wrap(getattr(target, name)))
            result = invoke(args, 130)
        assert result.stderr.strip() == says, (name, result.stderr)
        assert js.read_bytes() == (new_js if js in written else b'{"old": true}'), name
        assert (page.read_text() == "<p>old</p>") == (page not in written), name
        assert page not in written or page.read_text().rstrip().endswith("</html>"), name  # the new page, whole
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "s.json"], name  # nothing aside left


def test_stats_json_dash_writes_the_figures_to_stdout_alone(synth, tmp_path, monkeypatch):
    """`stats DS --json -` wrote a file named `-` in the current folder. `-` is stdout, as for jq
    and pip's --report -: stdout is the JSON alone (what a file gets), the tables go to stderr."""
    monkeypatch.chdir(tmp_path)
    invoke(["stats", synth[0], "--json", tmp_path / "s.json", "--no-progress"])
    plain = invoke(["stats", synth[0], "--no-progress"])
    result = invoke(["stats", synth[0], "--json", "-", "--no-progress"])
    assert json.loads(result.stdout) == load_json(tmp_path / "s.json")
    assert result.stderr == plain.stdout  # the same tables, on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # no file named -


def test_a_replaced_stats_file_keeps_its_mode_and_a_new_one_gets_the_umasks(synth, tmp_path, monkeypatch):
    """stats --json over a file of mode 0o640 (or a link to one of 0o600): the new file kept it.
    It got the umask's (0o644 here), readable by all. A new file still gets the umask's. The
    text written aside is its owner's only (0o600) until then."""
    import os
    import pathlib
    import stat

    modes_aside = []
    write_text = pathlib.Path.write_text

    def noting_the_mode(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            modes_aside.append(stat.S_IMODE(self.stat().st_mode) if self.exists() else None)
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", noting_the_mode)

    js, target, link, fresh = (tmp_path / n for n in ("s.json", "t.json", "link.json", "new.json"))
    for path, mode in ((js, 0o640), (target, 0o600)):
        path.write_text('{"old": true}')
        path.chmod(mode)
    link.symlink_to(target)
    umask = os.umask(0o022)
    try:
        for path in (js, link, fresh):
            invoke(["stats", synth[0], "--json", path, "--no-progress"])
    finally:
        os.umask(umask)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (js, target, fresh)] == [0o640, 0o600, 0o644]
    assert modes_aside == [0o600, 0o600, None]
    assert link.is_symlink() and load_json(js) == load_json(target) == load_json(fresh) != {"old": True}


def test_a_replaced_output_file_keeps_its_mode_and_a_new_one_gets_the_umasks(synth, tmp_path, monkeypatch):
    """subset rerun into its earlier output, whose metadata.parquet is 0o640 and dataset.json
    0o600: the new ones kept those modes (they got the umask's, 0o644 here, readable by all); the
    new urls.parquet, which replaces none, gets the umask's. Each new file has its mode before it
    is in place, and until then .partial/ is its owner's only."""
    import os
    import stat

    from fastlaion.dataset import output

    out = tmp_path / "out"
    invoke(["subset", "en", "--from", synth[0], "--no-progress", "-o", out])
    (out / "metadata.parquet").chmod(0o640)
    (out / "dataset.json").chmod(0o600)
    real_replace = os.replace
    moved_in = {}

    def replace(src, dst, *args, **kwargs):
        if Path(src).parent.name == output.PARTIAL_DIR:
            moved_in[Path(dst).name] = (stat.S_IMODE(os.stat(src).st_mode),
                                        stat.S_IMODE(Path(src).parent.stat().st_mode))
        return real_replace(src, dst, *args, **kwargs)

    umask = os.umask(0o022)
    try:
        with monkeypatch.context() as m:
            m.setattr(output.os, "replace", replace)
            invoke(["subset", "--where", "true", "--urls", "--from", synth[0], "--no-progress", "-o", out])
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"dataset.json": 0o600, "metadata.parquet": 0o640, "urls.parquet": 0o644}
    assert moved_in == {"dataset.json": (0o600, 0o700), "metadata.parquet": (0o640, 0o700),
                        "urls.parquet": (0o644, 0o700)}
    assert keys_of(out / "metadata.parquet") == [r["key"] for r in synth[1] if r["status"] == "kept"]  # the new one


def test_a_failed_command_leaves_no_folder_it_made_and_an_earlier_output_as_it_was(synth, tmp_path):
    from fastlaion.dataset.output import OutputDir
    from fastlaion.dataset.source import open_dataset

    ds = open_dataset(synth[0])
    made = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(made, ds).building() as target:
            target.path("metadata.parquet").write_bytes(b"half")
            raise KeyboardInterrupt
    assert not made.exists()
    earlier = tmp_path / "earlier"
    invoke(["subset", "en", "--from", synth[0], "-o", earlier])
    before = sorted(p.name for p in earlier.iterdir())
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(earlier, ds).building():
            raise KeyboardInterrupt
    assert sorted(p.name for p in earlier.iterdir()) == before


@pytest.mark.parametrize("earlier, fails_at, undo_fails", [
    (True, 2, False),   # while the earlier files are moved aside
    (True, 5, False),   # once they are, at the second new file
    (False, 2, False),  # into a new folder
    (True, 5, True),    # and every rename after fails too: nothing undone
])
def test_a_disk_error_while_the_output_is_put_in_place_is_undone_or_says_what_is_where(
        synth, tmp_path, monkeypatch, earlier, fails_at, undo_fails):
    """A rename that fails while subset's new files replace the earlier output (a full disk: a
    real OSError, injected at one os.replace since a full disk cannot be made safely here). It
    left the earlier files deleted, some new ones in place and the rest in .partial/, and said only
    "No space left on device". Now the renames made are undone and the folder is as it was, and
    the one line says so; where undoing fails too, the line says what is in the folder and where
    the rest is, and the disk matches it."""
    import errno
    import os

    from fastlaion.dataset import output

    out = tmp_path / "out"
    new = ["subset", "--where", "true", "--urls", "--from", synth[0], "--no-progress"]
    invoke([*new, "-o", tmp_path / "whole"])  # the new output, whole, to compare with
    if earlier:
        invoke(["subset", "en", "--urls", "--from", synth[0], "--no-progress", "-o", out])
    before = {p.name: p.read_bytes() for p in out.iterdir()} if earlier else None
    names = ["dataset.json", "metadata.parquet", "urls.parquet"]
    assert before is None or sorted(before) == names
    real_replace = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        calls.append((Path(src), Path(dst)))
        if len(calls) == fails_at or (undo_fails and len(calls) > fails_at):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(output.os, "replace", replace)
        result = invoke([*new, "-o", out], 1)
    src = calls[fails_at - 1][0]
    failed = f"error: {out}: could not put the new output in place (No space left on device: {src})"
    if not undo_fails:
        check_commit_undone(result.stderr, failed, out, before, "output")
        return
    assert src == out / output.PARTIAL_DIR / "metadata.parquet"
    assert result.stderr == (
        f"{failed}, nor undo it (No space left on device: {out / 'dataset.json'}): it holds 1 file (dataset.json) "
        f"of the new output; the new output's other 2 files (metadata.parquet, urls.parquet) in "
        f"{out / output.PARTIAL_DIR}; the earlier output's 3 files (dataset.json, metadata.parquet, urls.parquet) in "
        f"{out / output.EARLIER_DIR}\n")
    assert sorted(p.name for p in out.iterdir()) == [".earlier", ".partial", "dataset.json"]
    assert {p.name: p.read_bytes() for p in (out / output.EARLIER_DIR).iterdir()} == before
    assert sorted(p.name for p in (out / output.PARTIAL_DIR).iterdir()) == ["metadata.parquet", "urls.parquet"]
    for name in ("metadata.parquet", "urls.parquet"):
        assert pl.read_parquet(out / output.PARTIAL_DIR / name).equals(pl.read_parquet(tmp_path / "whole" / name))
    assert load_json(out / "dataset.json")["condition"] == load_json(tmp_path / "whole" / "dataset.json")["condition"]
    assert load_json(out / output.EARLIER_DIR / "dataset.json")["condition"] == "en"
    check_a_rerun_keeps_what_a_failed_undo_put_aside(out, [*new, "-o", out], "output", tmp_path / "kept")
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before  # the earlier output, whole
    assert sorted(p.name for p in out.iterdir()) == names  # the rerun replaced the mixed folder
    assert pl.read_parquet(out / "metadata.parquet").equals(pl.read_parquet(tmp_path / "whole" / "metadata.parquet"))


def check_a_rerun_keeps_what_a_failed_undo_put_aside(out: Path, rerun: list, what: str, kept: Path) -> None:
    """After a commit into `out` that could not undo: `rerun` (the command again) is refused in
    one line naming `.earlier/` and what it holds, and changes nothing on disk (it used to delete
    `.earlier/`, the only copy of the earlier files its error had just pointed to); once they are
    moved away (to `kept`; `.earlier/` left empty, an empty folder in it), the same command runs
    and removes `.earlier/` and `.partial/`."""
    from fastlaion.dataset import output

    def disk() -> dict:
        return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}

    aside = out / output.EARLIER_DIR
    before = disk()
    held = sorted(p.name for p in aside.iterdir())
    result = invoke(rerun, 2)
    listed = ", ".join(held)
    assert result.stderr == (
        f"error: {out}: {aside} holds {len(held)} file{'s' * (len(held) != 1)} ({listed}) of an earlier {what}, put "
        f"aside by a command that failed or was stopped while it replaced it; nothing was changed: move them away, "
        f"or back into {out}, then rerun\n")
    assert disk() == before
    kept.mkdir()
    for name in held:
        (aside / name).rename(kept / name)
    (aside / "empty").mkdir()
    invoke(rerun)
    assert not aside.exists() and not (out / output.PARTIAL_DIR).exists()


@pytest.mark.parametrize("earlier, new, what", [
    (["subset", "en"], ["subset", "--where", "true"], "the subset was"),
    (["dedup", "--by", "url"], ["dedup", "--by", "sha256"], "the deduplicated dataset was"),
])
def test_ctrl_c_says_whether_the_output_was_replaced(synth, tmp_path, monkeypatch, earlier, new, what):
    """subset and dedup: a real Ctrl-C before their output is in place leaves the earlier one and
    says so; once it is (or while it is put there, or while the closing line prints), it says where
    it was written."""
    source = ["--from", synth[0], "--no-progress"]
    check_ctrl_c_of_an_output(monkeypatch, invoke, [*earlier, *source], [*new, *source], tmp_path / "out", what)


def test_a_second_command_into_an_output_being_written_is_refused_at_once(synth, tmp_path):
    """A subset held just before its commit in another process (its new files under .partial/,
    the folder's lock held): a second subset, a dedup or a `fastlaion run` into the same folder is
    refused at once in one line naming the first one's command and process, and changes nothing
    there (they used to clear its .partial/ and could interleave their renames with its own);
    stats reads the earlier output and says nothing of a run. Once it ends, its output is in place,
    whole, its lock file gone, and the same commands run. One killed while held leaves its lock
    file and .partial/: the next command takes the folder, and stats on it meanwhile says only
    that it holds no dataset (not that a run is writing it or did not finish)."""
    import signal

    from test_dataset_helpers import held

    out = tmp_path / "out"
    source = ["--from", synth[0], "--no-progress"]
    invoke(["subset", "en", *source, "-o", out])
    en = keys_of(out / "metadata.parquet")
    kept = [r["key"] for r in synth[1] if r["status"] == "kept"]
    (tmp_path / "in.txt").write_text("http://127.0.0.1:9/0.jpg\n")

    def disk(folder: Path) -> dict:
        return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
                for p in sorted(folder.rglob("*"))}

    with held(["subset", "--where", "true", *source, "-o", out], tmp_path) as first:
        before = disk(out)
        assert sorted(before) == [".lock", ".partial", ".partial/dataset.json", ".partial/metadata.parquet",
                                  "dataset.json", "metadata.parquet"]
        for args, other in ((["subset", "art", *source, "-o", out], "another fastlaion subset"),
                            (["dedup", "--by", "url", *source, "-o", out], "a fastlaion subset"),
                            (["run", tmp_path / "in.txt", "-o", out, "--no-score", "--no-progress"],
                             "a fastlaion subset")):
            result = invoke(args, 2)
            assert result.stderr == (f"error: {out}: {other} is writing into it (process {first.pid}); wait for it to "
                                     "end, or choose another output folder\n"), (args, result.stderr)
            assert disk(out) == before, args
        result = invoke(["stats", out, "--json", tmp_path / "s.json", "--no-progress"])
        assert not result.stderr and load_json(tmp_path / "s.json")["rows"] == len(en)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "metadata.parquet"]
    assert keys_of(out / "metadata.parquet") == kept  # the first one's output, whole
    invoke(["subset", "art", *source, "-o", out])
    assert keys_of(out / "metadata.parquet") == [r["key"] for r in synth[1]
                                                 if r["status"] == "kept" and LAION_MD["art"](r)]

    fresh = tmp_path / "fresh"
    no_dataset = f"error: {fresh} holds no dataset: no shard Parquet files"
    with held(["subset", "en", *source, "-o", fresh], tmp_path) as first:
        assert invoke(["stats", fresh, "--no-progress"], 2).stderr.startswith(no_dataset)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert sorted(disk(fresh)) == [".lock", ".partial", ".partial/dataset.json", ".partial/metadata.parquet"]
        result = invoke(["stats", fresh, "--no-progress"], 2)
        assert result.stderr.startswith(no_dataset) and result.stderr.count("\n") == 1, result.stderr
        invoke(["subset", "en", *source, "-o", fresh])
    assert sorted(p.name for p in fresh.iterdir()) == ["dataset.json", "metadata.parquet"]
    assert keys_of(fresh / "metadata.parquet") == en


def test_a_dataset_command_into_a_folder_a_run_is_writing_is_refused(synth, tmp_path):
    """A folder whose lock a fastlaion run holds (pipeline.output_lock, in another process) and
    that holds no finished shard yet (its config.json, a shard in progress under .partial/): a
    subset into it is refused at once in one line naming the run's process, and the run's files
    are as they were (it used to remove the run's .partial/ for its own leftovers and write its
    output among the run's files)."""
    from test_dataset_helpers import held

    out = tmp_path / "run"
    (out / ".partial" / "00000").mkdir(parents=True)
    (out / ".partial" / "00000" / "00000.tar").write_bytes(b"a shard in progress")
    (out / "config.json").write_text("{}")
    with held([out], tmp_path, "run-lock") as run:
        before = {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}
        result = invoke(["subset", "en", "--from", synth[0], "--no-progress", "-o", out], 2)
        assert result.stderr == (f"error: {out}: a fastlaion run is writing into it (process {run.pid}); wait for it "
                                 "to end, or choose another output folder\n")
        assert {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None
                for p in sorted(out.rglob("*"))} == before
    assert run.returncode == 0, run.stderr


def test_a_file_system_that_cannot_lock_is_written_unguarded_with_a_warning(synth, tmp_path, monkeypatch):
    """flock refused as a file system without locks refuses it (ENOLCK, as NFS without a lock
    manager; EOPNOTSUPP, as some FUSE mounts): the command writes its output as it did before
    there was a lock, and warns in one line that nothing guards the folder; flock's other errors
    (EIO here) stop it with the error, nothing written. (flock is made to fail: no such mount can
    be made here.)"""
    import errno
    import fcntl

    real_flock = fcntl.flock
    for code, ok in ((errno.ENOLCK, True), (errno.EOPNOTSUPP, True), (errno.EIO, False)):
        def flock(f, op, code=code):
            if op & fcntl.LOCK_EX:
                raise OSError(code, os.strerror(code))
            return real_flock(f, op)

        out = tmp_path / f"out-{code}"
        with monkeypatch.context() as m:
            m.setattr(fcntl, "flock", flock)
            result = runner.invoke(app(), ["subset", "en", "--from", str(synth[0]), "--no-progress", "-o", str(out)],
                                   env={"COLUMNS": "400"})
        said = " ".join(result.stderr.split())
        if ok:
            assert result.exit_code == 0, result.output
            assert "cannot lock files" in said and os.strerror(code) in said, said
            assert keys_of(out / "metadata.parquet") and not (out / ".lock").exists()
        else:
            assert result.exit_code != 0 and os.strerror(code) in said and "Traceback" not in said, said
            assert not (out / "metadata.parquet").exists()


def test_a_commit_stopped_after_its_new_files_were_in_place_does_not_block_the_next(synth, tmp_path, monkeypatch):
    """A subset killed after every new file was in place, while it deleted the earlier ones: what
    is left aside is superseded (`.superseded/`), so the next command into the folder removes it
    and goes on; a `.earlier/` there would refuse it (the only copy of an earlier output, for all
    it can tell). The kill is a BaseException raised where the deletion begins."""
    from fastlaion.dataset import output

    out = tmp_path / "out"
    invoke(["subset", "en", "--from", synth[0], "--no-progress", "-o", out])
    real_rmtree = output.shutil.rmtree

    class Killed(BaseException):
        pass

    def rmtree(path, *args, **kwargs):
        if Path(path).name == output.SUPERSEDED_DIR and Path(path).exists():
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(output.shutil, "rmtree", rmtree)
        runner.invoke(app(), ["subset", "--where", "true", "--from", str(synth[0]), "--no-progress", "-o", str(out)])
    assert sorted(p.name for p in (out / output.SUPERSEDED_DIR).iterdir()) == ["dataset.json", "metadata.parquet"]
    assert not (out / output.EARLIER_DIR).exists()
    wanted = keys_of(out / "metadata.parquet")  # the new subset's, in place
    invoke(["subset", "--where", "true", "--from", synth[0], "--no-progress", "-o", out])
    assert not (out / output.SUPERSEDED_DIR).exists() and keys_of(out / "metadata.parquet") == wanted


@pytest.mark.parametrize("earlier, killed_at", [
    (True, 2),   # while the earlier files are moved aside: 1 of its 3 aside, metadata.parquet still in place
    (True, 5),   # once they are, at the second new file: dataset.json new, metadata.parquet in .partial/
    (False, 2),  # into a new folder: the new dataset.json in place, its metadata.parquet not yet
])
def test_a_commit_killed_midway_is_refused_by_readers_and_finished_by_the_next_command(
        synth, tmp_path, killed_at, earlier):
    """SIGKILL (or the OOM killer) between two renames of subset's commit, which no Ctrl-C
    deferral holds off. It left the folder part earlier, part new output: `stats` read it as a
    whole one (the earlier metadata.parquet with its dataset.json aside, or a new dataset.json
    beside the earlier metadata), and the same command was refused until `.earlier/` was emptied
    by hand. Now the commit's journal (`.committing`) marks such a folder: readers refuse it in one
    line, and the next command into it puts the rest of the new files in place, then runs. The
    kill is a BaseException raised at the K-th os.replace, which nothing in the commit catches
    (bench/torture.py kills a real process at each rename)."""
    import os

    from fastlaion.dataset import output

    out = tmp_path / "out"
    new = ["subset", "--where", "true", "--urls", "--from", synth[0], "--no-progress"]
    invoke([*new, "-o", tmp_path / "whole"])  # the new output, whole, to compare with
    if earlier:
        invoke(["subset", "en", "--urls", "--from", synth[0], "--no-progress", "-o", out])
    real_replace = os.replace
    calls = []

    class Killed(BaseException):
        pass

    def replace(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == killed_at:
            raise Killed
        return real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m, pytest.raises(Killed):
        m.setattr(output.os, "replace", replace)
        runner.invoke(app(), [str(a) for a in [*new, "-o", out]], catch_exceptions=False)
    assert (out / output.COMMIT_FILE).is_file()  # the journal says the commit did not end
    refused = invoke(["stats", out, "--json", "-"], 2)
    assert refused.stderr == (f"error: {out} holds an output only partly put in place: the command writing it was "
                              "stopped (or is putting it there now) after it had replaced some of the earlier files; "
                              "rerun that command, which puts the rest in place first, or wait for it to end\n")
    assert invoke(["subset", "--where", "true", "--from", out, "-o", tmp_path / "from-half"], 2).stderr == refused.stderr
    again = invoke([*new, "-o", out])
    assert (f"warning: {out}: the command that wrote its output was stopped while it put it in place; the rest of it "
            "is in place now") in " ".join(again.stderr.split())
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "metadata.parquet", "urls.parquet"]
    for name in ("metadata.parquet", "urls.parquet"):
        assert pl.read_parquet(out / name).equals(pl.read_parquet(tmp_path / "whole" / name))
    assert load_json(out / "dataset.json")["condition"] == load_json(tmp_path / "whole" / "dataset.json")["condition"]
    assert invoke(["stats", out, "--json", "-"]).exit_code == 0
