import csv
import json
import re
import subprocess
import sys
import textwrap

import polars as pl
import pytest

from fastlaion import reader
from fastlaion.config import ConfigError, InputConfig, InputFormat
from fastlaion.reader import open_inputs, shard_count, write_rows

URLS = ["http://127.0.0.1:1/a.jpg", "http://127.0.0.1:1/b.jpg", "", "http://127.0.0.1:1/c.jpg"]
CAPS = ["a cat", "a dog", "nothing", "a bird"]


def write_all(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(u or "   " for u in URLS) + "\n\n")
    pl.DataFrame({"link": URLS, "alt": CAPS}).write_csv(tmp_path / "in.csv")
    pl.DataFrame({"link": URLS, "alt": CAPS}).write_csv(tmp_path / "in.tsv", separator="\t")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"link": u, "alt": c, "n": 1}) + "\n" for u, c in zip(URLS, CAPS)))
    pl.DataFrame({"link": URLS, "alt": CAPS, "extra": [1, 2, 3, 4]}).write_parquet(tmp_path / "in.parquet")


def read(cfg: InputConfig, need_captions: bool, tmp_path) -> pl.DataFrame:
    """What a run reads: the inputs checked, written to rows files, read back shard by shard."""
    rows = write_rows(open_inputs(cfg, need_captions), tmp_path / "rows", cfg.max_caption_chars)
    shards = [rows.shard(s, cfg.shard_size) for s in range(shard_count(rows.height, cfg.shard_size))]
    return pl.concat([s.drop("row") for s in shards]) if shards else pl.DataFrame(
        schema={"url": pl.String, "caption": pl.String, "caption_edit": pl.String})


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "parquet"])
def test_tabular_inputs_read_alike(tmp_path, ext):
    write_all(tmp_path)
    t = read(InputConfig(paths=(str(tmp_path / f"in.{ext}"),), url_col="link", caption_col="alt"), True, tmp_path)
    assert t["url"].to_list() == [u or None for u in URLS] or t["url"].to_list() == URLS
    assert t["caption"].to_list() == CAPS


def test_txt_input_has_urls_only_and_needs_no_score(tmp_path):
    write_all(tmp_path)
    cfg = InputConfig(paths=(str(tmp_path / "in.txt"),))
    t = read(cfg, False, tmp_path)
    assert t["url"].to_list() == [u for u in URLS if u]  # blank lines are not rows
    assert t["caption"].null_count() == t.height
    with pytest.raises(ConfigError, match="--no-score"):
        open_inputs(cfg, need_captions=True)


def test_several_inputs_concatenate_in_order_and_shard(tmp_path):
    write_all(tmp_path)
    cfg = InputConfig(paths=(str(tmp_path / "in.csv"), str(tmp_path / "in.parquet")), url_col="link",
                      caption_col="alt", shard_size=3)
    rows = write_rows(open_inputs(cfg, True), tmp_path / "rows", cfg.max_caption_chars)
    assert rows.height == 8
    parts = [rows.shard(s, 3) for s in range(shard_count(rows.height, 3))]
    assert [p.height for p in parts] == [3, 3, 2]
    assert parts[2]["row"].to_list() == [0, 1]
    assert pl.concat([p.drop("row") for p in parts])["caption"].to_list() == CAPS + CAPS


def test_bad_inputs_name_the_problem(tmp_path):
    write_all(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        open_inputs(InputConfig(paths=(str(tmp_path / "missing.csv"),)), True)
    with pytest.raises(ConfigError, match="is a directory"):
        open_inputs(InputConfig(paths=(str(tmp_path),)), True)
    with pytest.raises(ConfigError, match="no URL column 'url'.*link"):
        open_inputs(InputConfig(paths=(str(tmp_path / "in.csv"),), caption_col="alt"), True)
    with pytest.raises(ConfigError, match="no caption column 'caption'"):
        open_inputs(InputConfig(paths=(str(tmp_path / "in.csv"),), url_col="link"), True)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(ConfigError, match="bad.parquet: cannot read as parquet"):
        open_inputs(InputConfig(paths=(str(bad),)), True)
    odd = tmp_path / "list.xyz"
    odd.write_text("x")
    with pytest.raises(ConfigError, match="--input-format"):
        open_inputs(InputConfig(paths=(str(odd),)), True)
    t = read(InputConfig(paths=(str(odd),), input_format=InputFormat.txt), False, tmp_path)
    assert t["url"].to_list() == ["x"]
    nested = tmp_path / "nested.parquet"
    pl.DataFrame({"url": [["http://127.0.0.1:1/a.jpg"]], "caption": ["a"]}).write_parquet(nested)
    with pytest.raises(ConfigError, match="nested.parquet: cannot read columns 'url'/'caption' as text"):
        open_inputs(InputConfig(paths=(str(nested),)), True)


def test_a_file_broken_past_its_header_is_named_before_any_download(tmp_path):
    """The checks read schemas only; a csv whose rows are not UTF-8 fails when its rows are
    written, still as one clear ConfigError naming it."""
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"url,caption\nhttp://127.0.0.1:1/a.jpg,ok\nhttp://127.0.0.1:1/\xff\xfe.jpg,bad\n")
    inputs = open_inputs(InputConfig(paths=(str(broken),)), True)
    major, minor = map(int, pl.__version__.split(".")[:2])
    if (major, minor) < (1, 30):
        pytest.skip("the streaming csv reader of Polars 1.20 and before lets text that is not UTF-8 through")
    with pytest.raises(ConfigError, match="broken.csv: cannot read as csv"):
        write_rows(inputs, tmp_path / "rows", 2000)
    # Through `fastlaion run`: the error, and no output folder left behind to hold the settings,
    # so a rerun with others is not refused as "a run with other settings".
    from fastlaion.config import RunConfig, ScoreConfig
    from fastlaion.pipeline import run

    out = tmp_path / "out"
    for shard_size in (10, 20):
        cfg = RunConfig(input=InputConfig(paths=(str(broken),), shard_size=shard_size), output_dir=str(out),
                        score=ScoreConfig(enabled=False))
        with pytest.raises(ConfigError, match="broken.csv: cannot read as csv"):
            run(cfg)
        assert not out.exists()


def test_captions_cleaned_and_counted(tmp_path):
    caps = ["fine", "bell\x07 and\x00 null", "x" * 100_000, "tab\tand\nnewline"]
    pl.DataFrame({"url": ["http://127.0.0.1:1/"] * 4, "caption": caps}).write_parquet(tmp_path / "c.parquet")
    t = read(InputConfig(paths=(str(tmp_path / "c.parquet"),), max_caption_chars=2000), True, tmp_path)
    assert t["caption"].to_list()[:2] == ["fine", "bell and null"]
    assert t["caption"][2] == "x" * 2000
    assert t["caption"][3] == "tab and newline"
    assert t["caption_edit"].to_list() == [None, "control_chars", "truncated", None]


# --- the rows a run reads, against an independent plain-Python reading of each file ------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def py_clean(caption, max_chars):
    """LAION's caption cleaning, in plain Python: (caption, caption_edit)."""
    if caption is None:
        return None, None
    text = _CONTROL.sub("", re.sub(r"[\t\n\r]+", " ", caption)).strip()
    had_ctl, too_long = bool(_CONTROL.search(caption)), len(text) > max_chars
    edit = ("control_chars+truncated" if had_ctl and too_long else "control_chars" if had_ctl
            else "truncated" if too_long else None)
    return text[:max_chars], edit


def tricky_rows(n):
    """Captions with what cleaning must handle: controls, tabs and newlines, long, unicode."""
    caps = ["photo {} of a café ☕", "bell\x07 {}\x00 and\x9f", "tab\t{}\nnewline\r\nend ", "long " * 30 + "{}",
            "  spaces {}  "]
    return [(f"http://127.0.0.1:1/{i}.jpg?q={i % 7}", caps[i % len(caps)].format(i)) for i in range(n)]


def py_read(path, fmt):
    """(url, caption) pairs as the standard library reads the file."""
    if fmt in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            r = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
            header = next(r)
            return [(row[header.index("link")], row[header.index("alt")]) for row in r]
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            return [(d.get("link"), d.get("alt")) for d in map(json.loads, f)]
    import pyarrow.parquet as pq  # a Parquet reader that is not Polars'

    t = pq.read_table(path, columns=["link", "alt"]).to_pydict()
    return list(zip(t["link"], t["alt"]))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_gives_the_rows_python_reads_across_files_and_shards(tmp_path, monkeypatch, fmt):
    """Small slices and two copies of the input: shards span rows files and inputs."""
    monkeypatch.setattr(reader, "SLICE_ROWS", 7)
    pairs = tricky_rows(50)
    path = tmp_path / f"in.{fmt}"
    frame = pl.DataFrame({"link": [u for u, _ in pairs], "alt": [c for _, c in pairs], "n": list(range(50))})
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(d) + "\n" for d in frame.to_dicts()))
    elif fmt == "parquet":
        frame.write_parquet(path, row_group_size=10)
    else:
        frame.write_csv(path, separator="," if fmt == "csv" else "\t")
    expected = py_read(path, fmt) * 2
    assert len(expected) == 100
    cfg = InputConfig(paths=(str(path), str(path)), url_col="link", caption_col="alt", shard_size=9,
                      max_caption_chars=40)
    t = read(cfg, True, tmp_path)
    assert t["url"].to_list() == [u for u, _ in expected]
    cleaned = [py_clean(c, 40) for _, c in expected]
    assert t["caption"].to_list() == [c for c, _ in cleaned]
    assert t["caption_edit"].to_list() == [e for _, e in cleaned]
    assert {e for _, e in cleaned} == {None, "control_chars", "truncated"}


def test_a_json_array_reads_as_its_jsonl(tmp_path):
    """img2dataset's `json` input (pandas.read_json: one array of row objects) was refused as a
    jsonl "not a JSON object but list"; now the same rows as the file a row a line, also gzipped
    and after a byte-order mark and white space."""
    import gzip

    pairs = tricky_rows(30)
    rows = [{"link": u, "alt": c, "n": i} for i, (u, c) in enumerate(pairs)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "in.json").write_text("\ufeff \n" + json.dumps(rows, indent=1))
    (tmp_path / "in.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    frames = [read(InputConfig(paths=(str(tmp_path / name),), url_col="link", caption_col="alt", shard_size=7),
                   True, tmp_path / name.replace(".", "-")) for name in ("in.jsonl", "in.json", "in.json.gz")]
    assert frames[0]["url"].to_list() == [u for u, _ in pairs]
    assert frames[0].equals(frames[1]) and frames[0].equals(frames[2])


@pytest.mark.parametrize("values", [
    [123, ["a", "b"]],              # Polars: "failed to determine supertype of struct[2] and struct[2]"
    [True, 12],                     # "cannot parse 'true' (bool) as Int64"
    [None, ["a", "b"]],             # "cannot read columns ... as text: 'caption' holds List(String)"
    [{"k": [1, 2]}, 1.5, "x"],      # supertype again
])
@pytest.mark.parametrize("form", ["jsonl", "json"])
def test_json_values_of_several_types_read_as_text_whatever_the_order_of_lines(tmp_path, values, form):
    """A caption (or URL) that is a number on one line and a list on another stopped the run in
    one order of lines and read in another, and an unused column of such values stopped it too.
    Now every order reads the same rows: a number or boolean as its JSON text (as img2dataset's
    pandas made a number caption text), a list or an object as its JSON text, null as null."""
    import itertools

    text = {123: "123", True: "true", 12: "12", 1.5: "1.5", "x": "x", None: None}

    def as_text(v):
        return json.dumps(v) if isinstance(v, (list, dict)) else text[v]

    for n, order in enumerate(itertools.permutations(range(len(values)))):
        rows = [{"url": f"http://127.0.0.1:1/{i}.jpg", "caption": values[i], "extra": values[i]} for i in order]
        path = tmp_path / f"in{n}.{form}"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) if form == "jsonl" else json.dumps(rows))
        t = read(InputConfig(paths=(str(path),), shard_size=2), True, tmp_path / f"rows{n}")
        assert t["url"].to_list() == [r["url"] for r in rows]
        assert t["caption"].to_list() == [as_text(values[i]) for i in order], (order, t["caption"].to_list())
    url = tmp_path / "url.jsonl"  # a URL that is a number: its text, then an invalid_url like any other
    url.write_text('{"url": 5, "caption": "x"}\n{"url": ["http://127.0.0.1:1/a.jpg"], "caption": "y"}\n')
    t = read(InputConfig(paths=(str(url),)), True, tmp_path / "rows-url")
    assert t["url"].to_list() == ["5", '["http://127.0.0.1:1/a.jpg"]']

@pytest.mark.parametrize("form", ["jsonl", "jsonl.gz", "json", "bom.json"])
def test_list_and_object_captions_are_kept_as_json_text_with_one_warning(tmp_path, caplog, form):
    """A caption that is a list or an object (`["a", "b"]`: several captions for one image, most
    likely) is read as its JSON text, brackets and quotes included, and was so silently. Now one
    warning per file names it, counts such rows and names the first (the line of a jsonl, the
    item of a JSON array, counted from 1). Captions that only look like JSON are text as always:
    "[OFFICIAL] a cat" (not JSON) and a string holding JSON text (a string, not a list) count
    for nothing. A JSON array led by a byte-order mark read a number caption but refused a list
    one ("not JSON"): orjson, which reads the lists, refuses the mark that Polars skips."""
    import gzip
    import logging

    captions = ["a cat", "[OFFICIAL] a dog", ["a", "b"], '["a", "b"]', {"en": "a bird"}, "x" * 30 + "]",
                ["long " * 10]]  # the last is cut to --max-caption-chars 20: still counted
    rows = [{"url": f"http://127.0.0.1:1/{i}.jpg", "caption": c} for i, c in enumerate(captions)]
    # jsonl: a blank line after the first row, so the rows' lines are 1, 3, 4, ...: lists on 4, 6, 8
    text = ("\n".join(json.dumps(r) + ("\n" if i == 0 else "") for i, r in enumerate(rows)) + "\n"
            if form.startswith("jsonl") else ("\ufeff" if form == "bom.json" else "") + json.dumps(rows, indent=1))
    path = tmp_path / f"in.{form}"
    path.write_bytes(gzip.compress(text.encode()) if form.endswith(".gz") else text.encode())
    with caplog.at_level(logging.WARNING, logger="fastlaion.reader"):
        t = read(InputConfig(paths=(str(path),), shard_size=3, max_caption_chars=20), True, tmp_path / "rows")
    assert t["caption"].to_list() == ["a cat", "[OFFICIAL] a dog", '["a", "b"]', '["a", "b"]', '{"en": "a bird"}',
                                      "x" * 20, '["long long long lon']
    first = "line 4" if form.startswith("jsonl") else "item 3 of the array"
    assert caplog.messages == [f"{path}: 3 rows hold a list or an object as caption (the first: {first}): the "
                               'caption is its JSON text, as ["a", "b"], brackets and quotes included; give each '
                               "row one caption, a string"]
    caplog.clear()
    plain = tmp_path / f"plain.{form.removesuffix('.gz')}"  # the same captions as text: no warning
    rows = [{**r, "caption": c if isinstance(c, str) else json.dumps(c)} for r, c in zip(rows, captions)]
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows) if form == "jsonl" else json.dumps(rows))
    with caplog.at_level(logging.WARNING, logger="fastlaion.reader"):
        t = read(InputConfig(paths=(str(plain),), max_caption_chars=20), True, tmp_path / "rows-plain")
    assert t["caption"][2:4].to_list() == ['["a", "b"]', '["a", "b"]'] and caplog.messages == []


def test_a_tsv_whose_quotes_are_text_keeps_them_and_every_row(tmp_path, caplog):
    """A tab-separated caption that starts with a quote (`"Best" shoes`, common in alt text) is no
    csv quoting: the whole run stopped on it ("a tab expected after '"'"). Now the file is read
    again with quotes as text, every row as Python's csv reads it with quoting off, and a warning
    names the line. A tsv that quotes properly (Polars' writer here) still reads its quotes."""
    import logging

    caps = ['"Best" shoes for men', "plain caption", 'says "hi" there', '"unclosed quote', 'ends with "quote"']
    lines = [f"http://127.0.0.1:1/{i}.jpg\t{c}" for i, c in enumerate(caps)]
    (tmp_path / "raw.tsv").write_text("url\tcaption\n" + "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="fastlaion.reader"):
        t = read(InputConfig(paths=(str(tmp_path / "raw.tsv"),), shard_size=2), True, tmp_path / "a")
    with open(tmp_path / "raw.tsv", newline="", encoding="utf-8") as f:
        expected = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    assert t.select("url", "caption").rows() == [tuple(r) for r in expected] and t["caption"].to_list() == caps
    assert "raw.tsv: line 2: a tab expected after" in caplog.text and "read without quoting" in caplog.text
    caplog.clear()
    pl.DataFrame({"url": [f"http://127.0.0.1:1/{i}.jpg" for i in range(5)], "caption": caps}).write_csv(
        tmp_path / "quoted.tsv", separator="\t")
    assert '"""Best"" shoes' in (tmp_path / "quoted.tsv").read_text()  # Polars quotes them
    with caplog.at_level(logging.WARNING, logger="fastlaion.reader"):
        t = read(InputConfig(paths=(str(tmp_path / "quoted.tsv"),)), True, tmp_path / "b")
    assert t["caption"].to_list() == caps and "read without quoting" not in caplog.text


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_tsv_quote_that_would_swallow_rows_is_read_as_text(tmp_path, caplog, gzipped):
    """A caption that starts with a quote and has no other on its line parsed as a quoted field
    running on to the next field that ends in one: the rows between became part of one caption,
    silently (three rows read as one here). Now every line is its row, with a warning naming the
    lines. A tsv that quotes a caption with a line break (as pandas and Polars write it) is one
    row, as before."""
    import gzip
    import logging

    caps = ['"Best shoes for men', "plain caption", 'TV size 55"', "four"]
    text = "url\tcaption\n" + "".join(f"http://127.0.0.1:1/{i}.jpg\t{c}\n" for i, c in enumerate(caps))
    path = tmp_path / ("raw.tsv.gz" if gzipped else "raw.tsv")
    path.write_bytes(gzip.compress(text.encode()) if gzipped else text.encode())
    with caplog.at_level(logging.WARNING, logger="fastlaion.reader"):
        t = read(InputConfig(paths=(str(path),)), True, tmp_path / "a")
    assert t["caption"].to_list() == caps and t.height == 4
    assert "line 2: a field that starts with a quote runs on to line 4" in caplog.text, caplog.text
    caplog.clear()
    lines = pl.DataFrame({"url": ["http://127.0.0.1:1/a.jpg", "http://127.0.0.1:1/b.jpg"],
                          "caption": ["two\nlines", '"quoted" word']})
    lines.write_csv(tmp_path / "lines.tsv", separator="\t")
    with caplog.at_level(logging.WARNING, logger="fastlaion.reader"):
        t = read(InputConfig(paths=(str(tmp_path / "lines.tsv"),)), True, tmp_path / "b")
    assert t["caption"].to_list() == ["two lines", '"quoted" word'] and not caplog.text


@pytest.mark.parametrize("header, flag", [("url,url,caption", []), ("url,alt,alt", ["--caption-col", "alt"]),
                                          ("link,link", ["--url-col", "link"])])
def test_a_header_naming_the_url_or_caption_column_twice_is_refused(tmp_path, header, flag):
    """`url,url,caption`: the first url column was read, the second silently ignored (Polars
    calls it url_duplicated_0). Which one the user meant is not clear: refused in one line."""
    path = tmp_path / "dup.csv"
    path.write_text(header + "\n" + ",".join(f"http://127.0.0.1:1/{i}.jpg" for i in range(header.count(",") + 1)) + "\n")
    name = flag[1] if flag else "url"
    result = _cli(str(path), "-o", str(tmp_path / "out"), *flag)
    assert result.exit_code == 2, result.output
    assert f"dup.csv: its header names the column {name!r} more than once" in result.output, result.output
    assert not (tmp_path / "out").exists()
    other = tmp_path / "other.csv"  # another column named twice is no matter
    other.write_text("url,caption,x,x\nhttp://127.0.0.1:1/a.jpg,c,1,2\n")
    assert read(InputConfig(paths=(str(other),)), True, tmp_path / "rows")["url"].to_list() == ["http://127.0.0.1:1/a.jpg"]


def test_empty_text_inputs_have_no_rows_in_every_format(tmp_path):
    """An empty csv/tsv/jsonl/json (no bytes, blank lines, `[]`, an empty gzip) has no rows, as an
    empty txt has: beside another input it adds none, alone it is "the input has no rows". They
    were Polars' errors ("empty CSV", "Cannot infer NDJSON types on empty reader") or "no URL
    column", each a different line for the same thing."""
    import gzip

    empties = {"a.csv": b"", "b.tsv": b"\n\n", "c.jsonl": b"", "d.jsonl": b" \n", "e.json": b"[]\n",
               "f.csv.gz": gzip.compress(b""), "g.json": b"\xef\xbb\xbf\n"}
    for name, data in empties.items():
        (tmp_path / name).write_bytes(data)
    pl.DataFrame({"url": URLS, "caption": CAPS}).write_csv(tmp_path / "full.csv")
    paths = [str(tmp_path / n) for n in empties]
    t = read(InputConfig(paths=(*paths[:3], str(tmp_path / "full.csv"), *paths[3:])), True, tmp_path / "rows")
    assert t["caption"].to_list() == CAPS
    for name in empties:
        result = _cli(str(tmp_path / name), "-o", str(tmp_path / "out"))
        assert result.exit_code == 2 and f"the input has no rows: {tmp_path / name};" in result.output, result.output


def test_txt_lines_as_python_splits_them(tmp_path, monkeypatch):
    """Blank and whitespace lines dropped, CRLF and lone CR, no final newline, bytes that are
    not UTF-8, and blocks so small that lines straddle them."""
    monkeypatch.setattr(reader, "TXT_BLOCK_CHARS", 5)
    path = tmp_path / "in.txt"
    path.write_bytes(b"  http://127.0.0.1:1/a.jpg  \n\n   \r\nhttp://127.0.0.1:1/b.jpg\r\n\t\n"
                     b"http://127.0.0.1:1/c\xff.jpg\rhttp://127.0.0.1:1/d.jpg\n\n\nhttp://127.0.0.1:1/e.jpg")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    expected = [ln for ln in lines if ln]
    assert len(expected) == 5
    t = read(InputConfig(paths=(str(path),), shard_size=2), False, tmp_path)
    assert t["url"].to_list() == expected
    assert t["caption"].null_count() == t["caption_edit"].null_count() == 5
    empty = tmp_path / "blank.txt"
    empty.write_text("\n  \n\n")
    assert read(InputConfig(paths=(str(empty),)), False, tmp_path / "e").height == 0


def test_paths_with_glob_characters_read_as_themselves(tmp_path):
    folder = tmp_path / "run[1]*"
    folder.mkdir()
    write_all(folder)
    cfg = InputConfig(paths=(str(folder / "in.jsonl"),), url_col="link", caption_col="alt")
    assert read(cfg, True, folder)["caption"].to_list() == CAPS


# --- memory: the parent never holds the input --------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_preparing_a_large_parquet_does_not_hold_it(tmp_path):
    """4M rows, ~500 MB of text (reading it whole peaked at 1.2-1.6 GB): what a run does with
    its inputs before the first shard (`pipeline.run`: open_inputs, write_rows) stays at a slice
    of rows, measured as the peak RSS of a fresh process."""
    n = 4_000_000
    pl.LazyFrame({"i": pl.int_range(n, eager=True)}).select(
        url=pl.format("http://127.0.0.1:9/images/{}.jpg", "i"),
        caption=pl.format("photo number {} of a red bicycle leaning on a whitewashed wall in the old town, late light", "i"),
    ).sink_parquet(tmp_path / "big.parquet")
    text_mb = pl.scan_parquet(tmp_path / "big.parquet").select(
        pl.col("url").str.len_bytes().sum() + pl.col("caption").str.len_bytes().sum()).collect().item() / 2**20
    script = textwrap.dedent(f"""
        from pathlib import Path
        from fastlaion.config import InputConfig
        from fastlaion.reader import open_inputs, write_rows
        def peak_mb():  # VmHWM: ru_maxrss would start at this test's own RSS, carried over the exec
            return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM")) // 1024
        before = peak_mb()
        cfg = InputConfig(paths=({str(tmp_path / "big.parquet")!r},))
        rows = write_rows(open_inputs(cfg, True), Path({str(tmp_path / "rows")!r}), cfg.max_caption_chars)
        print(rows.height, before, peak_mb())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    height, before_mb, peak_mb = map(int, result.stdout.split())
    assert height == n
    assert text_mb > 450
    assert peak_mb - before_mb < text_mb / 2, (peak_mb, before_mb, text_mb)


def test_rows_written_are_reported_as_they_go(tmp_path, monkeypatch):
    """The progress feed: one report per rows file, adding up to the input's rows; and a run
    tells its Progress about the input before the shards start."""
    monkeypatch.setattr(reader, "SLICE_ROWS", 4)
    path = tmp_path / "in.parquet"
    pl.DataFrame({"url": [f"http://127.0.0.1:1/{i}.jpg" for i in range(10)], "caption": ["a cat"] * 10}
                 ).write_parquet(path)
    cfg = InputConfig(paths=(str(path),), shard_size=3)
    told: list[int] = []
    rows = write_rows(open_inputs(cfg, True), tmp_path / "rows", 2000, told.append)
    assert told == [4, 4, 2] and rows.height == 10

    from fastlaion.config import DownloadConfig, RunConfig, ScoreConfig
    from fastlaion.pipeline import Progress, run

    events: list[tuple[str, int]] = []

    class Recorder(Progress):
        def reading_input(self, rows: int) -> None:
            events.append(("read", rows))

        def start(self, shards_total: int, shards_done: int, rows_total: int, rows_done: int) -> None:
            events.append(("start", rows_total))

    run(RunConfig(input=cfg, output_dir=str(tmp_path / "out"), score=ScoreConfig(enabled=False),
                  download=DownloadConfig(retries=0, timeout_s=2, allow_private_networks=True)), Recorder())
    assert events == [("read", 4), ("read", 4), ("read", 2), ("start", 10)]


# --- a user's files through `fastlaion run`, against a loopback server --------------------------

def _cli(*args: str):
    from typer.testing import CliRunner

    from fastlaion.cli import app

    return CliRunner().invoke(app, ["run", *args, "--allow-private-networks", "--no-score", "--no-progress",
                                    "--retries", "0", "--timeout", "5"])


@pytest.fixture(scope="module")
def served_images(photos):
    from helpers import encode

    from fastlaion.server import LoopbackServer, Served

    names = list(photos)
    files = {f"{i}.jpg": Served(encode(photos[names[i % len(names)]][: 240 + 10 * i]), "image/jpeg") for i in range(4)}
    with LoopbackServer(files) as server:
        yield server


def _outcomes(out):
    t = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))])
    return t["url"].to_list(), t["status"].to_list(), json.loads((out / "summary.json").read_text())["funnel"]


def test_blank_lines_of_a_csv_or_tsv_are_no_rows(tmp_path, served_images):
    """An editor's blank line in the middle and at the end of a csv were rows of no URL: the
    funnel counted 5 inputs, 3 of them invalid_url, for a file of 2 rows (pandas, pyarrow and
    Python's csv skip them). A line of separators only holds no row either."""
    urls = [served_images.url("0.jpg"), served_images.url("1.jpg")]
    for sep, ext in ((",", "csv"), ("\t", "tsv")):
        path = tmp_path / f"in.{ext}"
        path.write_text(f"url{sep}caption\r\n{urls[0]}{sep}a cat\r\n\r\n{sep}\r\n{urls[1]}{sep}\r\n\r\n")
        out = tmp_path / f"out-{ext}"
        result = _cli(str(path), "-o", str(out))
        assert result.exit_code == 0, result.output
        got, status, funnel = _outcomes(out)
        assert got == urls and status == ["kept", "kept"]
        assert funnel["input"] == 2 and funnel["drops"]["download"] == {}


def test_a_run_begun_by_a_fastlaion_that_read_blank_lines_as_rows_resumes_reading_them_so(tmp_path, served_images):
    """Its finished shards hold rows counted with the blank lines: a resume that skipped them
    would shift every later row by one, repeating one and losing another. config.json without
    an input_build is such a run's (the current one writes 2)."""
    a, b, c = (served_images.url(f"{i}.jpg") for i in range(3))
    path = tmp_path / "in.csv"
    path.write_text(f"url,caption\n{a},x\n\n{b},y\n{c},z\n")
    out = tmp_path / "out"
    assert _cli(str(path), "-o", str(out), "--shard-size", "2").exit_code == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved.pop("input_build") == 2
    (out / "config.json").write_text(json.dumps(saved))
    for f in out.glob("00001*"):  # the earlier run's last shard, not finished
        f.unlink()
    result = _cli(str(path), "-o", str(out), "--shard-size", "2")
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(out / "00001.parquet")["url"].to_list() == [b, c]  # rows 2-3 as it counted them
    assert json.loads((out / "config.json").read_text())["input_build"] == 1  # and so on every later resume


@pytest.mark.parametrize("name, content, expected", [
    ("broken.jsonl", "".join(json.dumps({"url": f"http://127.0.0.1:1/{i}.jpg"}) + "\n" for i in range(3000))
     .replace('"http://127.0.0.1:1/2500.jpg"}', '"http://127.0.0.1:1/2500.jpg}'), "line 2501, column"),
    ("cut.jsonl", '{"url": "http://127.0.0.1:1/a.jpg"}\n{"url": "http://127.0.0.1:1/b', "line 2, column"),
    ("scalar.jsonl", '{"url": "http://127.0.0.1:1/a.jpg"}\n"http://127.0.0.1:1/b.jpg"\n', "line 2: not a JSON object but str"),
    ("list.json", '[{"url": "http://127.0.0.1:1/a.jpg"},\n "http://127.0.0.1:1/b.jpg"]\n',
     "a JSON array: item 2 of the array: not a JSON object but str"),
    ("cut.json", '[{"url": "http://127.0.0.1:1/a.jpg"},\n {"url": ', "a JSON array: line 2, column 10: not JSON"),
    ("ragged.csv", "url,caption\n" + "".join(f"http://127.0.0.1:1/{i}.jpg,c{i}\n" for i in range(3000))
     .replace("/2000.jpg,c2000", "/2000.jpg,c,2000"), "line 2002: 3 fields, the header has 2"),
    ("unclosed.csv", "url,caption\n" + "".join(f"http://127.0.0.1:1/{i}.jpg,c{i}\n" for i in range(3000))
     .replace("/2000.jpg,c2000", '/2000.jpg,"c2000'), "line 2002: a quoted field starts here and never ends"),
    ("ragged.tsv", 'url\tcaption\nhttp://127.0.0.1:1/a.jpg\t"Best" photo\tever\n', "line 2: 3 fields, the header has 2"),
])
def test_a_broken_row_is_named_by_its_line(tmp_path, name, content, expected):
    """Polars' own messages named no line ("Syntax at character 0" for a jsonl's line 2,501;
    "found more fields than defined in 'Schema'"): in a file of millions of rows the user could
    not find the row to fix. One line, the file and the line, exit 2, no output folder."""
    path = tmp_path / name
    path.write_text(content)
    result = _cli(str(path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert f"{name}: cannot read as" in result.output and expected in result.output, result.output
    assert not (tmp_path / "out").exists()
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"url,caption\nhttp://127.0.0.1:1/a.jpg,ok\nhttp://127.0.0.1:1/b.jpg,caf\xe9\n")
    assert "latin1.csv: cannot read as csv: line 3: not UTF-8 text" in _cli(str(latin1), "-o", str(tmp_path / "o")).output


def test_gzipped_text_inputs_are_read(tmp_path, served_images):
    """img2dataset reads tsv.gz: a urls.csv.gz was refused ("cannot tell the input format from
    the extension '.gz'"), and a urls.txt.gz given --input-format txt, as that error advised,
    became a dataset of its compressed bytes, every row invalid_url, exit 0."""
    import gzip
    import os

    urls = [served_images.url(f"{i}.jpg") for i in range(3)]
    texts = {"in.txt.gz": "\n".join(urls) + "\n",
             "in.csv.gz": "url,caption\n" + "".join(f"{u},a photo\n" for u in urls),
             "in.tsv.gz": "url\tcaption\n" + "".join(f"{u}\ta photo\n" for u in urls),
             "in.jsonl.gz": "".join(json.dumps({"url": u, "caption": "a photo"}) + "\n" for u in urls)}
    for name, text in texts.items():
        (tmp_path / name).write_bytes(gzip.compress(text.encode()))
        result = _cli(str(tmp_path / name), "-o", str(tmp_path / f"out-{name}"))
        assert result.exit_code == 0, (name, result.output)
        got, status, _ = _outcomes(tmp_path / f"out-{name}")
        assert got == urls and status == ["kept"] * 3, name
    (tmp_path / "gz.txt").write_bytes(gzip.compress(texts["in.txt.gz"].encode()))  # gzip's, whatever its name
    result = _cli(str(tmp_path / "gz.txt"), "-o", str(tmp_path / "out-named"))
    assert result.exit_code == 0 and _outcomes(tmp_path / "out-named")[0] == urls, result.output
    read_end, write_end = os.pipe()  # `run <(cat urls.txt.gz) --input-format txt`: a pipe, which cannot seek
    os.write(write_end, gzip.compress(texts["in.txt.gz"].encode()))
    os.close(write_end)
    try:
        result = _cli(f"/dev/fd/{read_end}", "--input-format", "txt", "-o", str(tmp_path / "out-pipe"))
    finally:
        os.close(read_end)
    assert result.exit_code == 0 and _outcomes(tmp_path / "out-pipe")[0] == urls, result.output
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(texts["in.txt.gz"].encode())[:-12])
    result = _cli(str(tmp_path / "cut.txt.gz"), "-o", str(tmp_path / "out-cut"))
    assert result.exit_code == 2 and "cut.txt.gz: cannot read as txt" in result.output, result.output
    (tmp_path / "in.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    result = _cli(str(tmp_path / "in.parquet.gz"), "-o", str(tmp_path / "out-pq"))
    assert result.exit_code == 2 and "'.parquet.gz'" in result.output, result.output


def test_a_caption_column_named_but_absent_is_refused_also_without_scoring(tmp_path, served_images):
    """--no-score --caption-col Caption on a file whose column is "caption" wrote every sample
    with an empty .txt, exit 0: a typo lost all captions silently. The default name may still be
    absent (a URL list without captions)."""
    path = tmp_path / "in.csv"
    path.write_text(f"url,caption\n{served_images.url('0.jpg')},a cat\n")
    result = _cli(str(path), "-o", str(tmp_path / "out"), "--caption-col", "Caption")
    assert result.exit_code == 2, result.output
    assert "in.csv: no caption column 'Caption' (columns: url, caption)" in result.output
    assert not (tmp_path / "out").exists()
    bare = tmp_path / "urls.csv"
    bare.write_text(f"url\n{served_images.url('0.jpg')}\n")
    result = _cli(str(bare), "-o", str(tmp_path / "out-bare"))
    assert result.exit_code == 0, result.output
    assert _outcomes(tmp_path / "out-bare")[1] == ["kept"]


def test_a_tabular_input_from_a_pipe_is_refused_clearly(tmp_path):
    """`run <(cat urls.csv) --input-format csv` said "/dev/fd/63: cannot read as csv: No such
    device (os error 19)": a csv/tsv/jsonl/parquet is read twice (its columns, then its rows),
    which a pipe cannot give. A txt input may still be a pipe."""
    import os

    for fmt, text in (("csv", "url,caption\nhttp://127.0.0.1:1/a.jpg,a\n"), ("txt", "http://127.0.0.1:1/a.jpg\n")):
        read_end, write_end = os.pipe()
        os.write(write_end, text.encode())
        os.close(write_end)
        try:
            result = _cli(f"/dev/fd/{read_end}", "--input-format", fmt, "-o", str(tmp_path / fmt))
        finally:
            os.close(read_end)
        if fmt == "csv":
            assert result.exit_code == 2, result.output
            assert f"/dev/fd/{read_end}: not a regular file (a pipe?)" in result.output
            assert "save it to a file first" in result.output and not (tmp_path / fmt).exists()
        else:
            assert result.exit_code == 0, result.output
            assert _outcomes(tmp_path / fmt)[0] == ["http://127.0.0.1:1/a.jpg"]


def test_a_resume_from_a_pipe_that_gives_other_rows_is_refused(tmp_path):
    """A pipe has no size or content mark, so `run <(head -7 urls.txt)` into the folder where
    `run <(head -6 urls.txt)` had finished its one shard said "nothing to do: all 1 shard(s)
    were already complete", exit 0: the 7th row was in no output and the funnel counted 6
    inputs. The rows read now are checked against each finished shard's row count."""
    import os

    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in range(7)]
    out = tmp_path / "out"

    def from_pipe(lines, *more):  # on fd 63 each time, as bash's <(...) is: the same input name
        read_end, write_end = os.pipe()
        os.write(write_end, "".join(u + "\n" for u in lines).encode())
        os.close(write_end)
        os.dup2(read_end, 63)
        os.close(read_end)
        try:
            return _cli("/dev/fd/63", "--input-format", "txt", "-o", str(out), *more)
        finally:
            os.close(63)

    assert from_pipe(urls[:6]).exit_code == 0
    assert from_pipe(urls[:6]).exit_code == 0  # the same rows: resumed, nothing to do
    for lines, more in ((urls, ()), (urls[:3], ()), (urls[:6] * 2, ("--shard-size", "6"))):
        if more:  # a run of two shards, then a pipe that gives the first one's rows only
            out = tmp_path / "out-two"
            assert from_pipe(lines, *more).exit_code == 0
            lines = urls[:6]
        result = from_pipe(lines, *more)
        assert result.exit_code == 2, (len(lines), result.output)
        assert "the input changed since the run" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert _outcomes(tmp_path / "out")[0] == urls[:6]  # the finished shard as it was


def test_input_format_json_is_img2datasets_name_for_the_jsonl_reader(tmp_path):
    """`--input-format json` (img2dataset's name for a JSON input) was refused ("'json' is not
    one of ..."), while the jsonl reader reads an object a line and a JSON array alike. Now it is
    that reader: an array in a file whose extension says nothing is read, and config.json records
    jsonl, so a rerun naming either resumes the same run."""
    import json

    from helpers import refused_url

    url = refused_url()
    inp = tmp_path / "list.data"
    inp.write_text(json.dumps([{"url": f"{url}/{i}.jpg", "caption": f"photo {i}"} for i in range(3)]))
    first = _cli(str(inp), "--input-format", "json", "-o", str(tmp_path / "out"))
    assert first.exit_code == 0, first.output
    table = pl.read_parquet(tmp_path / "out" / "00000.parquet")
    assert table["url"].to_list() == [f"{url}/{i}.jpg" for i in range(3)]
    assert table["caption"].to_list() == [f"photo {i}" for i in range(3)]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["input"]["input_format"] == "jsonl"
    again = _cli(str(inp), "--input-format", "jsonl", "-o", str(tmp_path / "out"))
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
