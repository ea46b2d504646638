"""The C Parquet writer (fastlaion/parquet_native.c) against Polars' write_parquet: the same
frames and schemas read back in Polars and pyarrow, row groups, merging, dedup (against Polars'
unique), the file's metadata, and its errors."""

from __future__ import annotations

import array
import errno
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from fastlaion import parquet_native as pn
from fastlaion.parquet_native import ParquetWriter, Rows

SCHEMA = {"url": pl.String, "caption": pl.String, "page_url": pl.String, "uid": pl.String,
          "width": pl.Int32, "height": pl.Int32, "page_lang": pl.String}
COLS = list(SCHEMA)


@pytest.fixture(autouse=True)
def _fresh_library(native_library):
    """The library in one cache folder for this session (conftest); skipped without it."""
    if not pn.available():
        pytest.skip("the native Parquet writer is not available here (no compiler, libdeflate or libzstd)")


# ---------------------------------------------------------------------------------------------
# Helpers

WORDS = ["a", "bicycle", "é", "naïve", "中文字", "😀", "Ωmega", "x y", "", "tab\tand\nnewline", "\u200b", "ÿ"]


def _text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.1:
        return ""
    if r < 0.15:
        return "".join(rng.choice(WORDS[:8]) for _ in range(2000))[:2000]
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def _ints(rng: random.Random, n: int, nulls: bool) -> list[int | None]:
    return [None if nulls and rng.random() < 0.3 else rng.randint(-2**31, 2**31 - 1) for _ in range(n)]


def _rows(rng: random.Random, n: int, ints: str = "nulls") -> dict[str, list]:
    """n random rows as columns; ints: 'none' (all null), 'full' or 'nulls'."""
    cols: dict[str, list] = {
        "url": [f"https://{_text(rng)}.example/{i}" for i in range(n)],
        "caption": [_text(rng) for _ in range(n)],
        "page_url": [_text(rng) for _ in range(n)],
        "uid": [f"{rng.getrandbits(128):032x}" for _ in range(n)],
        "page_lang": [None if rng.random() < 0.3 else rng.choice(["en", "de", "zh-Hans", ""]) for _ in range(n)],
    }
    for name in ("width", "height"):
        cols[name] = [None] * n if ints == "none" else _ints(rng, n, ints == "nulls")
    return cols


def _frame(cols: dict[str, list]) -> pl.DataFrame:
    return pl.DataFrame({c: cols[c] for c in COLS}, schema=SCHEMA)


def _as_rows(cols: dict[str, list], seq: list[int] | None = None) -> Rows:
    return Rows.from_lists(cols["url"], cols["caption"], cols["page_url"], cols["uid"], cols["page_lang"],
                           cols["width"], cols["height"], seq=seq)


def _polars_file(frame: pl.DataFrame, path: Path) -> Path:
    frame.write_parquet(path, compression="zstd", compression_level=1)
    return path


def _write(path: Path, *sets: Rows | tuple[Rows, Rows], **kw) -> ParquetWriter:
    with ParquetWriter(path, **kw) as w:
        for s in sets:
            if isinstance(s, tuple):
                w.append(*s)
            else:
                w.append(s)
    return w


def _same_as_polars(ours: Path, frame: pl.DataFrame, tmp_path: Path) -> None:
    """ours reads back as `frame`, and as Polars' own file of it, in Polars and pyarrow."""
    theirs = _polars_file(frame, tmp_path / f"polars-{ours.stem}.parquet")
    got = pl.read_parquet(ours)
    assert got.schema == pl.read_parquet(theirs).schema == pl.Schema(SCHEMA)
    assert_frame_equal(got, pl.read_parquet(theirs))
    assert_frame_equal(got, frame)
    a, b = pq.read_table(ours), pq.read_table(theirs)
    assert a.schema.equals(b.schema), (a.schema, b.schema)
    assert a.equals(b)
    both = pl.scan_parquet([ours, theirs]).collect()
    assert_frame_equal(both, pl.concat([frame, frame]))


# ---------------------------------------------------------------------------------------------
# The file

@pytest.mark.parametrize("ints", ["nulls", "full", "none"])
def test_random_rows_read_back_as_polars_writes_them(tmp_path, ints):
    rng = random.Random(f"rows-{ints}")
    cols = _rows(rng, 600, ints)
    ours = tmp_path / "ours.parquet"
    w = _write(ours, _as_rows(cols))
    assert (w.rows_written, w.rows_dropped) == (600, 0)
    _same_as_polars(ours, _frame(cols), tmp_path)


def test_several_appends_and_row_groups(tmp_path):
    rng = random.Random("groups")
    for n, per_group in ((70, 7), (75, 7), (64, 1), (100, 100), (99, 100), (101, 100)):
        parts = [_rows(rng, k) for k in (0, n // 3, 0, n - n // 3)]
        ours = tmp_path / f"ours-{n}-{per_group}.parquet"
        _write(ours, *map(_as_rows, parts), rowgroup_rows=per_group)
        frame = pl.concat([_frame(p) for p in parts])
        _same_as_polars(ours, frame, tmp_path)
        meta = pq.ParquetFile(ours).metadata
        sizes = [per_group] * (n // per_group) + ([n % per_group] if n % per_group else [])
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == sizes
        assert meta.num_rows == n


def test_null_patterns_of_every_kind(tmp_path):
    """Definition levels of all shapes: runs around the 8- and 16-level edges, alternation,
    all null, all valid, and runs cut by row group ends."""
    rng = random.Random("levels")
    pattern: list[bool] = []
    for run in (1, 2, 7, 8, 9, 15, 16, 17, 31, 64, 200):
        for value in (True, False):
            pattern += [value] * run
    pattern += [bool(i % 2) for i in range(45)] + [rng.random() < 0.5 for _ in range(500)]
    pattern += [rng.random() < 0.05 for _ in range(300)] + [rng.random() < 0.95 for _ in range(300)]
    n = len(pattern)
    cols = _rows(rng, n)
    cols["page_lang"] = ["en" if p else None for p in pattern]
    cols["width"] = [i if p else None for i, p in enumerate(pattern)]
    cols["height"] = [None if p else -i for i, p in enumerate(pattern)]
    for per_group in (n, 1000, 97, 8, 3):
        ours = tmp_path / f"ours-{per_group}.parquet"
        _write(ours, _as_rows(cols), rowgroup_rows=per_group)
        _same_as_polars(ours, _frame(cols), tmp_path)
    for value in (True, False):
        cols["page_lang"] = ["en" if value else None] * n
        ours = tmp_path / f"ours-{value}.parquet"
        _write(ours, _as_rows(cols), rowgroup_rows=500)
        _same_as_polars(ours, _frame(cols), tmp_path)


def test_no_rows_and_one_row(tmp_path):
    empty = tmp_path / "empty.parquet"
    _write(empty)
    _same_as_polars(empty, pl.DataFrame(schema=SCHEMA), tmp_path)
    assert pq.ParquetFile(empty).metadata.num_row_groups == 0
    empty_appended = tmp_path / "empty2.parquet"
    _write(empty_appended, Rows(0, [b""] * 5), (Rows(0, [b""] * 5), Rows(0, [b""] * 5)))
    assert_frame_equal(pl.read_parquet(empty_appended), pl.DataFrame(schema=SCHEMA))

    cols = {"url": ["https://a.example/😀.jpg"], "caption": [""], "page_url": ["p"], "uid": ["0" * 32],
            "width": [None], "height": [3], "page_lang": [None]}
    one = tmp_path / "one.parquet"
    _write(one, _as_rows(cols))
    _same_as_polars(one, _frame(cols), tmp_path)
    # parts with and without rows scan together with Polars' own
    assert pl.scan_parquet([empty, one, tmp_path / "polars-one.parquet", empty]).collect().height == 2


def test_metadata(tmp_path):
    rng = random.Random("meta")
    cols = _rows(rng, 250)
    ours = tmp_path / "ours.parquet"
    _write(ours, _as_rows(cols), rowgroup_rows=100)
    theirs = _polars_file(_frame(cols).slice(0, 100), tmp_path / "theirs.parquet")
    meta = pq.ParquetFile(ours).metadata
    assert (meta.num_rows, meta.num_row_groups, meta.num_columns) == (250, 3, 7)
    assert [meta.row_group(g).num_rows for g in range(3)] == [100, 100, 50]
    schema = pq.ParquetFile(ours).schema
    for i, name in enumerate(COLS):
        col = schema.column(i)
        assert (col.name, col.max_definition_level, col.max_repetition_level) == (name, 1, 0)
        assert col.physical_type == ("INT32" if name in ("width", "height") else "BYTE_ARRAY")
        assert str(col.logical_type) == ("None" if name in ("width", "height") else "String")
        assert col.converted_type == ("NONE" if name in ("width", "height") else "UTF8")
    mine, polars_meta = meta.row_group(0), pq.ParquetFile(theirs).metadata.row_group(0)
    for g in range(3):
        for i in range(7):
            c = meta.row_group(g).column(i)
            assert c.compression == "ZSTD"
            assert set(c.encodings) == {"PLAIN", "RLE"}
            assert not c.has_dictionary_page
            assert c.num_values == meta.row_group(g).num_rows
    for i in range(7):  # the statistics written are those Polars writes
        a, b = mine.column(i).statistics, polars_meta.column(i).statistics
        assert a.null_count == b.null_count
        if COLS[i] in ("width", "height"):
            assert (a.min, a.max) == (b.min, b.max)


# ---------------------------------------------------------------------------------------------
# Merging two sets

def _merged(a: dict[str, list], sa: list[int], b: dict[str, list], sb: list[int]) -> pl.DataFrame:
    order = sorted([(s, 0, i) for i, s in enumerate(sa)] + [(s, 1, i) for i, s in enumerate(sb)])
    return _frame({c: [(a, b)[k][c][i] for _, k, i in order] for c in COLS})


def test_merge_by_seq(tmp_path):
    rng = random.Random("merge")
    a, b = _rows(rng, 4), _rows(rng, 4)
    sa, sb = [0, 2, 4, 6], [1, 2, 3, 7]
    ours = tmp_path / "fixed.parquet"
    _write(ours, (_as_rows(a, sa), _as_rows(b, sb)))
    got = pl.read_parquet(ours)
    assert got["uid"].to_list() == [a["uid"][0], b["uid"][0], a["uid"][1], b["uid"][1], b["uid"][2], a["uid"][2],
                                    a["uid"][3], b["uid"][3]]
    _same_as_polars(ours, _merged(a, sa, b, sb), tmp_path)

    for k in range(5):
        na, nb = rng.randint(0, 300), rng.randint(0, 300)
        a, b = _rows(rng, na), _rows(rng, nb)
        sa = sorted(rng.randint(0, 400) for _ in range(na))
        sb = sorted(rng.randint(0, 400) for _ in range(nb))
        ours = tmp_path / f"random-{k}.parquet"
        _write(ours, (_as_rows(a, sa), _as_rows(b, sb)), rowgroup_rows=50)
        _same_as_polars(ours, _merged(a, sa, b, sb), tmp_path)


def test_merge_with_an_empty_side(tmp_path):
    rng = random.Random("empty-side")
    a = _rows(rng, 30)
    empty = Rows(0, [b""] * 5)
    ours = tmp_path / "b-empty.parquet"
    _write(ours, (_as_rows(a), empty), (_as_rows(a, list(range(30))), empty))
    _same_as_polars(ours, pl.concat([_frame(a), _frame(a)]), tmp_path)
    ours = tmp_path / "a-empty.parquet"
    _write(ours, (empty, _as_rows(a)))
    _same_as_polars(ours, _frame(a), tmp_path)


# ---------------------------------------------------------------------------------------------
# Dedup

def _keys(rng: random.Random) -> list[str]:
    """Keys prone to clash: one byte apart, prefixes of each other, the empty key, long ones."""
    long = "k" * 1000
    keys = ["", "a", "aa", "aaa", "ab", "ba", "b", "é", "e\u0301", "😀", "😀😀"]
    keys += [long, long + "k", long[:-1]] + [long[:i] + "j" + long[i + 1:] for i in (0, 7, 8, 500, 999)]
    keys += [f"https://x.example/{i}" for i in range(40)] + [f"{i:032x}" for i in range(40)]
    keys += [f"{rng.getrandbits(64):x}" for _ in range(3000)]  # enough to grow the table
    return keys


@pytest.mark.parametrize("key", ["uid", "url"])
def test_dedup_is_polars_unique(tmp_path, key):
    rng = random.Random(f"dedup-{key}")
    keys = _keys(rng)
    parts, frames = [], []
    for n in (500, 0, 2000, 1, 3000):
        cols = _rows(rng, n)
        cols[key] = [rng.choice(keys[:80]) if rng.random() < 0.5 else rng.choice(keys) for _ in range(n)]
        if key == "url" and n > 10:
            cols["url"][3] = cols["url"][7] = None  # nulls are one key, as for Polars
        parts.append(cols)
        frames.append(_frame(cols))
    a, b = parts[0], parts[2]
    sa, sb = sorted(rng.sample(range(10_000), len(a["uid"]))), sorted(rng.sample(range(10_000), len(b["uid"])))
    ours = tmp_path / "ours.parquet"
    w = _write(ours, (_as_rows(a, sa), _as_rows(b, sb)), _as_rows(parts[1]), _as_rows(parts[3]),
               _as_rows(parts[4]), dedup=key, rowgroup_rows=700)
    everything = pl.concat([_merged(a, sa, b, sb), *frames[1:2], *frames[3:]])
    expected = everything.unique(subset=[key], keep="first", maintain_order=True)
    assert w.rows_written == expected.height
    assert w.rows_written + w.rows_dropped == everything.height
    assert w.rows_dropped > 1000
    _same_as_polars(ours, expected, tmp_path)


def test_no_dedup_keeps_duplicates(tmp_path):
    cols = _rows(random.Random("dups"), 5)
    cols["uid"] = ["same"] * 5
    w = _write(tmp_path / "ours.parquet", _as_rows(cols), _as_rows(cols))
    assert (w.rows_written, w.rows_dropped) == (10, 0)
    w = _write(tmp_path / "dedup.parquet", _as_rows(cols), _as_rows(cols), dedup="uid")
    assert (w.rows_written, w.rows_dropped) == (1, 9)


# ---------------------------------------------------------------------------------------------
# Errors

def test_missing_folder_names_the_path(tmp_path):
    path = tmp_path / "missing" / "out.parquet"
    with pytest.raises(OSError) as e:
        ParquetWriter(path)
    assert e.value.errno == errno.ENOENT and e.value.filename == str(path)
    with pytest.raises(ValueError):
        ParquetWriter(tmp_path / "x.parquet", dedup="caption")


def test_file_size_limit_is_an_oserror(tmp_path):
    """A write that fails (EFBIG under RLIMIT_FSIZE, SIGXFSZ ignored) raises OSError, no crash."""
    script = textwrap.dedent(f"""
        import os, random, resource, signal, sys
        from fastlaion.parquet_native import ParquetWriter, Rows, available
        assert available()  # the library is loaded before the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        rng = random.Random(1)
        n = 200
        urls = [os.urandom(300).hex() for _ in range(n)]
        rows = Rows.from_lists(urls, urls, urls, urls, urls)
        w = ParquetWriter({str(tmp_path / "big.parquet")!r}, rowgroup_rows=20)
        try:
            w.append(rows)
            w.close()
        except OSError as e:
            print("OSError", e.errno, e.filename)
            w.abort()
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["OSError", str(errno.EFBIG), str(tmp_path / "big.parquet")]
    assert not (tmp_path / "big.parquet").exists()


def test_bad_rows_are_refused():
    ok = [b"a\0b\0"] * 5
    Rows(2, ok)
    bad = [
        lambda: Rows(2, [b"a\0b"] + ok[1:]),             # no final NUL
        lambda: Rows(2, [b"a\0b\0c\0"] + ok[1:]),        # too many strings
        lambda: Rows(2, [b"a\0"] + ok[1:]),              # too few
        lambda: Rows(0, [b"\0"] + [b""] * 4),            # strings without rows
        lambda: Rows(2, ok[:4]),                          # a column missing
        lambda: Rows(2, ok, valid=[b"\1"] + [None] * 4),  # valid of the wrong length
        lambda: Rows(2, ok, seq=array.array("q", [2, 1])),
        lambda: Rows(2, ok, seq=array.array("i", [1, 2])),
        lambda: Rows(2, ok, seq=array.array("q", [1])),
        lambda: Rows(2, ok, ints=(array.array("q", [1, 2]), None)),
        lambda: Rows(2, ok, ints=(array.array("i", [1]), None)),
        lambda: Rows(2, ok, ints=(array.array("i", [1, 2]), None), ivalid=(b"\1", None)),
        lambda: Rows(2, ok, ivalid=(b"\1\1", None)),      # ivalid without ints
        lambda: Rows(-1, [b""] * 5),
        lambda: Rows(2, [b"ab"] + ok[1:], lens=[array.array("q", [1, 2])] + [None] * 4),  # lengths past the bytes
        lambda: Rows(2, [b"ab"] + ok[1:], lens=[array.array("q", [3, -1])] + [None] * 4),  # a negative length
        lambda: Rows(2, [b"ab"] + ok[1:], lens=[array.array("q", [2])] + [None] * 4),  # too few lengths
        lambda: Rows.from_lists(["a"], ["c", "d"], ["p"], ["u"], [None]),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


def test_strings_with_nul_bytes_go_with_their_lengths(tmp_path):
    """from_lists hands strings over with their lengths, so U+0000 inside one is written as it is
    (the Python path writes such rows too), merged with NUL-terminated rows."""
    import pyarrow.parquet as pq

    a = Rows(2, [b"u1\0u3\0", b"c1\0c3\0", b"p\0p\0", b"k1\0k3\0", b"en\0en\0"], seq=array.array("q", [1, 3]))
    b = Rows.from_lists(["u\x002", ""], ["c\x002", "\x00"], ["p", "p"], ["k2", "k4"], [None, "\x00x"],
                        seq=[2, 4])
    with ParquetWriter(tmp_path / "x.parquet", dedup="url") as w:
        w.append(a, b)
    table = pq.read_table(tmp_path / "x.parquet").to_pydict()
    assert table["url"] == ["u1", "u\x002", "u3", ""]
    assert table["caption"] == ["c1", "c\x002", "c3", "\x00"]
    assert table["page_lang"] == ["en", None, "en", "\x00x"]


def test_merge_needs_seq(tmp_path):
    rows = Rows(2, [b"a\0b\0"] * 5)
    with ParquetWriter(tmp_path / "x.parquet") as w, pytest.raises(ValueError):
        w.append(rows, rows)


def test_abort_close_and_context(tmp_path):
    rows = _as_rows(_rows(random.Random("abort"), 10))
    path = tmp_path / "aborted.parquet"
    w = ParquetWriter(path)
    w.append(rows)
    w.abort()
    assert not path.exists()
    w.abort()

    with pytest.raises(RuntimeError), ParquetWriter(path) as w:
        w.append(rows)
        raise RuntimeError("stop")
    assert not path.exists()

    w = ParquetWriter(path)
    w.append(rows)
    w.close()
    w.close()
    assert (w.rows_written, w.rows_dropped) == (10, 0)
    with pytest.raises(ValueError):
        w.append(rows)
    assert pl.read_parquet(path).height == 10
