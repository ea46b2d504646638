#!/usr/bin/env python3
"""Dataset operations at scale: fastlaion (Polars, lazy) against pandas and DuckDB on the same rows.

    .venv/bin/python bench/table.py                      # 20M rows, all three tools
    .venv/bin/python bench/table.py --rows 2000000       # a quick look
    .venv/bin/python bench/table.py --only fastlaion,duckdb --rows 100000000

1. Generates N synthetic metadata rows shaped like `fastlaion run`'s per-shard Parquet (the same
   columns and types as fastlaion.writer.PARQUET_SCHEMA, `--rows-per-file` rows per shard file,
   10,000 by default like `fastlaion run`), seeded and deterministic, cached under
   `bench/_work/table/` (git-ignored) and reused while rows, seed and generator version match.
   About 70 % of rows are kept samples; the rest were dropped at download, decode or filter with
   LAION-like reasons and have nulls where their stage never ran. About 4 % of rows repeat an
   earlier URL (60 % of those with the same caption too), 1 % repeat an earlier image under a new
   URL; scores, languages and sizes follow LAION-like distributions.
2. Runs three jobs, each tool in its own subprocess (peak RSS from `os.wait4`, which reports the
   child's own `ru_maxrss`), each writing its results to Parquet/JSON under the work folder:
   - dedup: among kept rows, the first of each (url, caption) pair stays, later ones become
     status=dropped, stage=dedup with `duplicate_of` = the first one's key; every row is written.
   - subset: LAION-400M style (kept, language_group = en, similarity >= 0.3), written as Parquet.
   - stats: the funnel (rows per status/stage/reason), 20-bin histograms of similarity,
     aesthetic and punsafe over kept rows, rows per language group, image-size buckets.
3. Checks that the tools agree (rows dropped as duplicates, rows in the subset, funnel counts,
   histogram counts) and prints wall time, peak RSS and the ratios against fastlaion.

The peers: pandas is what most dataset scripts use (read every file, work in memory);
DuckDB is the fairer peer (columnar, multi-threaded, streams Parquet, spills to disk), doing
the same work in SQL. Each tool is timed from its process start (imports included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import pipeline as bp  # noqa: E402  (bench/pipeline.py: quiet-machine wait, machine description)
GENERATOR_VERSION = 3  # 3: LAION's hash column
TOOLS = ("fastlaion", "pandas", "duckdb")
JOBS = ("dedup", "subset", "stats")
HIST_BINS = 20


# --- synthetic data --------------------------------------------------------------------------------

def _mix(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of x ^ salt: a fast deterministic hash of uint64 ids."""
    z = (x.astype(np.uint64) ^ np.uint64(salt * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF))
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hex_strings(parts: list[np.ndarray]):
    """Fixed-width lowercase hex strings (16 chars per uint64 part), built as one Arrow buffer."""
    import polars as pl
    import pyarrow as pa

    words = np.stack([p.astype(">u8") for p in parts], axis=1)  # big-endian: hex reads in order
    raw = words.tobytes().hex().encode("ascii")
    width = 16 * len(parts)
    n = len(parts[0])
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int64)
    arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(raw))
    return pl.from_arrow(arr)


def _vocabulary(seed: int, size: int = 6000) -> list[str]:
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "en", "ar", "ol", "is", "ph", "th", "or",
                 "an", "el", "st", "qu", "ing", "ion", "er", "ed", "ly", "cat", "dog", "sun", "sea"]
    words = set()
    while len(words) < size:
        k = int(rng.integers(1, 4))
        words.add("".join(syllables[i] for i in rng.integers(0, len(syllables), k)))
    return sorted(words)


def generate(work: Path, rows: int, rows_per_file: int, seed: int) -> Path:
    """Write (or reuse) the synthetic dataset; returns its folder."""
    import polars as pl

    from fastlaion.writer import laion_hash

    folder = work / f"rows-{rows}-per{rows_per_file}-s{seed}-v{GENERATOR_VERSION}"
    done = folder / "_DONE"
    if done.exists():
        for p in folder.glob("*.parquet"):  # folders cached before stats files were written
            stats = folder / f"{p.stem}_stats.json"
            if not stats.exists():
                stats.write_text(json.dumps({"shard": int(p.stem)}))
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    # Global ids first (so a row can copy any earlier row, across files): url, caption and image.
    idx = np.arange(rows, dtype=np.int64)
    url_id, cap_id, img_id = idx.copy(), idx.copy(), idx.copy()
    copies = np.flatnonzero(rng.random(rows) < 0.04)
    copies = copies[copies > 0]
    src = (rng.random(copies.size) * copies).astype(np.int64)  # an earlier row, uniformly
    # chains resolve because ids of earlier rows are already final when copied in index order
    url_id[copies] = url_id[src]
    img_id[copies] = img_id[src]
    same_caption = rng.random(copies.size) < 0.6
    cap_id[copies[same_caption]] = cap_id[src[same_caption]]
    reposts = np.flatnonzero(rng.random(rows) < 0.01)
    reposts = reposts[reposts > 0]
    img_id[reposts] = img_id[(rng.random(reposts.size) * reposts).astype(np.int64)]
    del idx, copies, src, same_caption, reposts

    words = pl.Series("w", _vocabulary(seed))
    tlds = ["com", "org", "net", "de", "fr", "co.uk", "ru", "jp"]
    hosts = pl.Series("h", [f"{w}{i % 97}.{tlds[i % len(tlds)]}" for i, w in enumerate(_vocabulary(seed + 1, 8_000))])
    langs = ["en", "de", "fr", "es", "ru", "ja", "zh", "pt", "it", "nl", "pl", "tr"]
    lang_p = np.array([0.45, 0.07, 0.06, 0.06, 0.05, 0.04, 0.04, 0.03, 0.03, 0.02, 0.02, 0.02])
    lang_p = lang_p / lang_p.sum() * 0.85  # 15 % nolang
    outcomes = [  # (status, stage, reason, share)
        ("kept", None, None, 0.70), ("dropped", "download", "http_404", 0.08),
        ("dropped", "download", "timeout", 0.04), ("dropped", "download", "connection_error", 0.03),
        ("dropped", "download", "invalid_url", 0.01), ("dropped", "decode", "not_an_image", 0.02),
        ("dropped", "decode", "too_few_bytes", 0.02), ("dropped", "decode", "truncated", 0.01),
        ("dropped", "score", "no_caption", 0.01), ("dropped", "filter", "low_similarity", 0.08),
    ]
    out_p = np.array([o[3] for o in outcomes])
    files = (rows + rows_per_file - 1) // rows_per_file
    digits = max(1, len(str(rows_per_file - 1)))
    for shard in range(files):
        lo, hi = shard * rows_per_file, min(rows, (shard + 1) * rows_per_file)
        n = hi - lo
        r = np.random.default_rng([seed, shard])
        u, c, im = url_id[lo:hi].astype(np.uint64), cap_id[lo:hi].astype(np.uint64), img_id[lo:hi].astype(np.uint64)
        o = r.choice(len(outcomes), n, p=out_p / out_p.sum())
        stage_rank = np.array([9, 0, 0, 0, 0, 1, 1, 1, 2, 3])[o]  # how far each row got
        got_body, decoded, scored = stage_rank >= 1, stage_rank >= 2, stage_rank >= 3
        n_words = 3 + (_mix(c, 7) % np.uint64(10)).astype(np.int64)
        word_frame = pl.DataFrame({f"w{k}": words.gather((_mix(c, 100 + k) % np.uint64(len(words))).astype(np.int64))
                                   for k in range(12)}).with_columns(pl.Series("n_words", n_words))
        captions = word_frame.select(pl.concat_str(
            [pl.when(pl.col("n_words") > k).then(pl.col(f"w{k}")) for k in range(12)],
            separator=" ", ignore_nulls=True).alias("caption"))["caption"]
        lang_i = r.choice(len(langs) + 1, n, p=np.append(lang_p, 0.15))
        w = np.clip(r.lognormal(6.5, 0.55, n), 64, 8000).astype(np.int32)
        h = np.clip(w * r.choice([0.5, 0.66, 0.75, 1.0, 1.33, 1.5], n), 64, 8000).astype(np.int32)
        sim = np.clip(r.normal(0.31, 0.045, n), -0.05, 0.49).astype(np.float32)
        sim[o == 9] = np.minimum(sim[o == 9], 0.279)
        frame = pl.DataFrame({
            "key": pl.Series(np.char.zfill(np.arange(n).astype(str), digits)).str.replace(r"^", f"{shard:05d}"),
            "host": hosts.gather((_mix(u, 1) % np.uint64(len(hosts))).astype(np.int64)),
            "dir": (_mix(u, 2) % np.uint64(1000)).astype(np.int64),
            "id": _mix(u, 3).astype(np.int64) & 0xFFFFFFFFFFFF,
            "caption": captions,
            "bad_url": o == 4,
        }).select(
            "key", pl.when(pl.col("bad_url")).then(pl.lit("notaurl"))
            .otherwise(pl.format("https://{}/images/{}/{}.jpg", "host", "dir", "id")).alias("url"),
            "caption")
        frame = frame.with_columns(
            _pick("status", [x[0] for x in outcomes], o),
            _pick("stage", [x[1] for x in outcomes], o),
            _pick("reason", [x[2] for x in outcomes], o),
            pl.lit(None, pl.String).alias("error"),
            pl.Series("http_status", np.where(o == 1, 404, np.where(got_body, 200, 0)).astype(np.int32))
            .replace(0, None),
            pl.Series("attempts", np.where(o == 2, 3, 1).astype(np.int32)),
            pl.Series("download_s", r.gamma(2.0, 0.15, n).astype(np.float32)),
            pl.Series("bytes", np.where(got_body, (w.astype(np.int64) * h // 6), -1)).replace(-1, None),
            _hex_strings([_mix(im.astype(np.uint64), 10 + k) for k in range(4)]).alias("sha256"),
            _pick("format", [None, "jpeg"], decoded.astype(np.int64)),
            pl.Series("original_width", w), pl.Series("original_height", h),
            pl.Series("width", np.full(n, 256, np.int32)), pl.Series("height", np.full(n, 256, np.int32)),
            _pick("language", [*langs, None], lang_i),
            pl.Series("language_score", r.beta(8, 2, n).astype(np.float32)),
            _pick("language_group", [*["en"], *["multi"] * (len(langs) - 1), "nolang"], lang_i),
            pl.Series("similarity", sim),
            pl.lit("ViT-B-32/openai").alias("similarity_model"),
            pl.Series("punsafe", r.beta(0.4, 4.0, n).astype(np.float32)),
            pl.Series("pwatermark", r.beta(0.6, 2.5, n).astype(np.float32)),
            pl.Series("aesthetic", np.clip(r.normal(5.2, 0.9, n), 0, 10).astype(np.float32)),
            pl.Series("aesthetic_v2", np.clip(r.normal(4.8, 0.7, n), 0, 10).astype(np.float32)),
            pl.lit(None, pl.String).alias("caption_edit"),
        )
        frame = frame.with_columns(
            pl.when(pl.Series(got_body)).then(pl.col("sha256")).otherwise(None).alias("sha256"),
            *[pl.when(pl.Series(decoded)).then(pl.col(x)).otherwise(None).alias(x)
              for x in ("original_width", "original_height", "width", "height")],
            *[pl.when(pl.Series(scored)).then(pl.col(x)).otherwise(None).alias(x)
              for x in ("similarity", "similarity_model", "punsafe", "pwatermark", "aesthetic", "aesthetic_v2")],
        )
        frame = frame.with_columns(laion_hash(frame["url"], frame["caption"]))
        _cast_like_fastlaion(frame).write_parquet(folder / f"{shard:05d}.parquet", compression="zstd", statistics=True)
        # a run publishes each shard's stats file last; readers take only shards that have one
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"shard": shard, "rows": n}))
        if shard % 200 == 0:
            log(f"  generated {hi:,} / {rows:,} rows ({time.perf_counter() - t0:.0f} s)")
    done.write_text(json.dumps({"rows": rows, "files": files, "seed": seed, "version": GENERATOR_VERSION,
                                "seconds": round(time.perf_counter() - t0, 1)}))
    return folder


def _pick(name: str, values: list, idx: np.ndarray):
    import polars as pl

    return pl.Series(name, values, dtype=pl.String).gather(idx)


def _cast_like_fastlaion(frame):
    import polars as pl

    from fastlaion.writer import PARQUET_SCHEMA

    return frame.select([pl.col(c).cast(t) for c, t in PARQUET_SCHEMA.items()])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the three jobs, one function per tool ---------------------------------------------------------
# Each writes OUT/result.json with the figures the tools must agree on.

def _histogram_range(column: str, lo: float | None, hi: float | None, bins: int) -> tuple[float, float]:
    """The range `fastlaion stats` gives the histogram, so every tool's bins are comparable."""
    from fastlaion.dataset.stats import histogram_range

    return histogram_range(column, lo, hi, bins)


STATS_COLUMNS = ("similarity", "aesthetic", "aesthetic_v2", "punsafe", "pwatermark")


def fastlaion_job(job: str, data: Path, out: Path) -> dict:
    from fastlaion.dataset import open_dataset

    ds = open_dataset(data)
    if job == "dedup":
        from fastlaion.dataset.dedup import DedupBy, DedupConfig, dedup

        r = dedup(ds, out, DedupConfig(by=DedupBy.url_caption))
        return {"rows": r.rows, "duplicates": r.duplicates}
    if job == "subset":
        from fastlaion.dataset.subset import SubsetConfig, subset

        r = subset(ds, out, SubsetConfig(recipe="laion400m"))
        return {"rows": r.selected}
    from fastlaion.dataset.stats import compute_stats

    s = compute_stats(ds, HIST_BINS)
    return {"funnel": {f"{lvl.stage}/{reason}": n for lvl in s.funnel[1:] for reason, n in lvl.reasons.items()},
            "kept": s.kept, "histograms": {c: s.histograms[c].counts for c in STATS_COLUMNS},
            "language_groups": s.language_groups, "size_buckets": [n for _, n in s.size_buckets],
            "size_histogram": s.size_histogram.counts if s.size_histogram else None}


def pandas_job(job: str, data: Path, out: Path) -> dict:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in data.glob("*.parquet"))
    if job == "dedup":
        df = pd.read_parquet(files)  # every column: every row is written back
        cand = df.loc[(df["status"] == "kept") & df["url"].notna(), ["url", "caption", "key"]]
        dup = cand.duplicated(["url", "caption"], keep="first")
        first = cand.groupby(["url", "caption"], sort=False, dropna=False)["key"].transform("first")
        idx = dup[dup].index
        df["duplicate_of"] = pd.Series(pd.NA, index=df.index, dtype=df["key"].dtype)
        df.loc[idx, "duplicate_of"] = first.loc[idx]
        df.loc[idx, "status"] = "dropped"
        df.loc[idx, "stage"] = "dedup"
        df.loc[idx, "reason"] = "duplicate_url_caption"
        df.to_parquet(out / "metadata.parquet", compression="zstd", index=False)
        return {"rows": len(df), "duplicates": int(dup.sum())}
    if job == "subset":
        # the informed pandas user: pyarrow pushes the filter into the Parquet reader
        df = pd.read_parquet(files, filters=[("status", "==", "kept"), ("language_group", "==", "en"),
                                            ("similarity", ">=", 0.3)])
        df.to_parquet(out / "metadata.parquet", compression="zstd", index=False)
        return {"rows": len(df)}
    cols = ["status", "stage", "reason", "language_group", "original_width", "original_height", *STATS_COLUMNS]
    df = pd.read_parquet(files, columns=cols)
    dropped = df[df["status"] == "dropped"]
    funnel = dropped.groupby(["stage", "reason"]).size()
    kept = df[df["status"] == "kept"]
    hists = {}
    for c in STATS_COLUMNS:
        x = kept[c].dropna().astype("float64")
        x = x[~np.isnan(x)]
        lo, hi = _histogram_range(c, x.min() if len(x) else None, x.max() if len(x) else None, HIST_BINS)
        width = (hi - lo) / HIST_BINS
        b = np.clip(np.floor((x.to_numpy() - lo) / width), 0, HIST_BINS - 1).astype(np.int64)
        hists[c] = np.bincount(b, minlength=HIST_BINS).tolist()
    side = np.minimum(kept["original_width"], kept["original_height"]).dropna().to_numpy(dtype=np.int64)
    groups = kept["language_group"].value_counts()
    return {"funnel": {f"{s}/{r}": int(n) for (s, r), n in funnel.items()}, "kept": int(len(kept)),
            "histograms": hists, "language_groups": {str(k): int(v) for k, v in groups.items()},
            "size_buckets": [int((side < 256).sum()), int(((side >= 256) & (side < 512)).sum()),
                             int(((side >= 512) & (side < 1024)).sum()), int((side >= 1024).sum())],
            "size_histogram": np.bincount(np.clip(side // 128, 0, 15), minlength=16).tolist()}


def duckdb_job(job: str, data: Path, out: Path) -> dict:
    import duckdb

    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET temp_directory = '{out / 'duckdb.tmp'}'")
    # DuckDB's default limit, 80 % of RAM, would crowd out everything else on a shared machine;
    # past this it spills to disk, which is what it is built to do
    con.execute(f"SET memory_limit = '{os.environ.get('BENCH_DUCKDB_MEMORY', '10GB')}'")
    src = f"read_parquet('{data}/*.parquet')"
    if job == "dedup":
        # first the duplicates (a window over three columns of the kept rows), then every row with
        # its mark, in key (= dataset) order like the other tools' output
        con.execute(f"""
            CREATE TEMP TABLE dups AS
            SELECT key, first_key FROM (
              SELECT key, min(key) OVER (PARTITION BY url, caption) AS first_key
              FROM {src} WHERE status = 'kept' AND url IS NOT NULL)
            WHERE key <> first_key""")
        con.execute(f"""
            COPY (
              SELECT s.* REPLACE (
                  CASE WHEN d.key IS NOT NULL THEN 'dropped' ELSE s.status END AS status,
                  CASE WHEN d.key IS NOT NULL THEN 'dedup' ELSE s.stage END AS stage,
                  CASE WHEN d.key IS NOT NULL THEN 'duplicate_url_caption' ELSE s.reason END AS reason),
                d.first_key AS duplicate_of
              FROM {src} s LEFT JOIN dups d ON s.key = d.key
              ORDER BY s.key
            ) TO '{out / 'metadata.parquet'}' (FORMAT parquet, COMPRESSION zstd)""")
        rows, dups = con.execute(f"SELECT count(*), count(duplicate_of) FROM read_parquet('{out / 'metadata.parquet'}')").fetchone()
        return {"rows": rows, "duplicates": dups}
    if job == "subset":
        con.execute(f"""COPY (SELECT * FROM {src} WHERE status = 'kept' AND language_group = 'en' AND similarity >= 0.3)
                        TO '{out / 'metadata.parquet'}' (FORMAT parquet, COMPRESSION zstd)""")
        return {"rows": con.execute(f"SELECT count(*) FROM read_parquet('{out / 'metadata.parquet'}')").fetchone()[0]}
    funnel = con.execute(f"SELECT stage, reason, count(*) FROM {src} WHERE status = 'dropped' GROUP BY ALL").fetchall()
    kept = f"(SELECT * FROM {src} WHERE status = 'kept')"
    hists = {}
    for c in STATS_COLUMNS:
        lo, hi = con.execute(f"SELECT min({c}::DOUBLE), max({c}::DOUBLE) FROM {kept} WHERE NOT isnan({c})").fetchone()
        lo, hi = _histogram_range(c, lo, hi, HIST_BINS)
        width = (hi - lo) / HIST_BINS
        counts = [0] * HIST_BINS
        for b, n in con.execute(f"""SELECT least(greatest(floor(({c}::DOUBLE - {lo!r}) / {width!r}), 0), {HIST_BINS - 1})::INT AS b,
                                           count(*) FROM {kept} WHERE {c} IS NOT NULL AND NOT isnan({c}) GROUP BY b""").fetchall():
            counts[b] = n
        hists[c] = counts
    groups = dict(con.execute(f"SELECT language_group, count(*) FROM {kept} GROUP BY ALL").fetchall())
    side = "least(original_width, original_height)"
    buckets = con.execute(f"""SELECT count(*) FILTER ({side} < 256), count(*) FILTER ({side} >= 256 AND {side} < 512),
                              count(*) FILTER ({side} >= 512 AND {side} < 1024), count(*) FILTER ({side} >= 1024)
                              FROM {kept}""").fetchone()
    size_hist = [0] * 16
    for b, n in con.execute(f"SELECT least({side} // 128, 15) AS b, count(*) FROM {kept} WHERE {side} IS NOT NULL GROUP BY b").fetchall():
        size_hist[int(b)] = n
    return {"funnel": {f"{s}/{r}": n for s, r, n in funnel}, "kept": con.execute(f"SELECT count(*) FROM {kept}").fetchone()[0],
            "histograms": hists, "language_groups": {str(k): v for k, v in groups.items()},
            "size_buckets": list(buckets), "size_histogram": size_hist}


JOB_FUNCTIONS = {"fastlaion": fastlaion_job, "pandas": pandas_job, "duckdb": duckdb_job}


def driver(tool: str, job: str, data: str, out: str) -> int:
    """Run one job of one tool in this process; print its result as JSON (the parent times it)."""
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    result = JOB_FUNCTIONS[tool](job, Path(data), Path(out))
    result["job_s"] = round(time.perf_counter() - t0, 2)
    # this process's own peak since exec (a cross-check of the parent's ru_maxrss)
    hwm = [line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")]
    result["vm_hwm_gb"] = round(int(hwm[0]) * 1024 / 1e9, 2) if hwm else None  # kB
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "result.json").write_text(json.dumps(result, default=int))
    return 0


# --- timing ------------------------------------------------------------------------------------------

def measure(tool: str, job: str, data: Path, out: Path, max_rss_gb: float, timeout_s: float,
            wait_quiet_s: float) -> dict:
    """Run one job in a child process: wall time, its own peak RSS (os.wait4), CPU, others' CPU."""
    shutil.rmtree(out, ignore_errors=True)
    busy = bp.wait_until_quiet(wait_quiet_s)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--driver", tool, job, str(data), str(out)]
    ticks0 = bp._cpu_ticks()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = None
    peak_seen = 0
    status = rusage = None
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
            peak_seen = max(peak_seen, rss_kb)
        except (OSError, StopIteration, ValueError):
            pass
        if killed is None and peak_seen > max_rss_gb * 1e6:
            killed = f"over {max_rss_gb:g} GB RSS"
            proc.kill()
        if killed is None and time.perf_counter() - t0 > timeout_s:
            killed = f"over {timeout_s:.0f} s"
            proc.kill()
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    cpu = rusage.ru_utime + rusage.ru_stime
    machine = (bp._cpu_ticks()[0] - ticks0) / os.sysconf("SC_CLK_TCK")
    result: dict[str, Any] = {"tool": tool, "job": job, "wall_s": round(wall, 2), "cpu_s": round(cpu, 1),
                              "peak_rss_gb": round(rusage.ru_maxrss * 1024 / 1e9, 2),  # Linux: KiB; the child's own
                              "others_cpu_share": round(max(0.0, machine - cpu) / max(wall * (os.cpu_count() or 1), 1e-9), 3),
                              "busy_before": round(busy, 3), "rc": proc.returncode, "killed": killed}
    if proc.returncode == 0 and (out / "result.json").exists():
        result["result"] = json.loads((out / "result.json").read_text())
    else:
        result["error"] = output[-1500:]
    for junk in ("metadata.parquet", "duckdb.tmp"):  # outputs are large; keep the result.json only
        p = out / junk
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return result


def _agree(results: list[dict], job: str) -> list[str]:
    """What the tools disagree on (empty: all agree)."""
    ok = [r for r in results if "result" in r]
    if len(ok) < 2:
        return []
    ref = ok[0]
    problems = []
    keys = {"dedup": ("rows", "duplicates"), "subset": ("rows",),
            "stats": ("funnel", "kept", "histograms", "language_groups", "size_buckets", "size_histogram")}[job]
    for r in ok[1:]:
        for k in keys:
            if r["result"].get(k) != ref["result"].get(k):
                problems.append(f"{job}: {r['tool']} and {ref['tool']} differ on {k}")
    return problems


def machine_info() -> dict:
    """bench/pipeline.py's machine description (date included), with the table libraries' versions."""
    from importlib.metadata import PackageNotFoundError, version

    info = {**bp.machine_info(), "polars": version("polars")}
    for mod in ("pandas", "duckdb", "pyarrow"):
        try:
            info[mod] = version(mod)
        except PackageNotFoundError:
            info[mod] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000_000, help="synthetic metadata rows (default 20M)")
    ap.add_argument("--rows-per-file", type=int, default=10_000, help="rows per shard Parquet (fastlaion run's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=HERE / "_work" / "table")
    ap.add_argument("--only", default=",".join(TOOLS), help="tools to run, comma-separated: fastlaion,pandas,duckdb")
    ap.add_argument("--jobs", default=",".join(JOBS), help="jobs to run, comma-separated: dedup,subset,stats")
    ap.add_argument("--max-rss-gb", type=float, default=18.0, help="a tool going over this is killed and reported")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds allowed per job and tool")
    ap.add_argument("--wait-quiet", type=float, default=20.0, help="seconds to wait for an idle machine before each run")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--driver", nargs=4, metavar=("TOOL", "JOB", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.driver:
        return driver(*args.driver)

    sys.path.insert(0, str(REPO))
    tools = [t for t in args.only.split(",") if t]
    jobs = [j for j in args.jobs.split(",") if j]
    for t in tools:
        if t not in TOOLS:
            ap.error(f"--only: unknown tool {t!r}")
        if t in ("pandas", "duckdb") and not args.generate_only and importlib.util.find_spec(t) is None:
            ap.error(f"{t} is not installed: pip install -e '.[bench]' (or drop it with --only)")
    info = machine_info()
    log(f"machine: {info}")
    t0 = time.perf_counter()
    if args.generate_only:
        data = generate(args.workdir, args.rows, args.rows_per_file, args.seed)
        log(f"data: {data}")
        return 0
    # Generated in a child process: this parent must stay small, because a child's ru_maxrss
    # starts from the parent's peak RSS when the child is spawned (vfork + exec)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--generate-only", "--rows", str(args.rows),
                    "--rows-per-file", str(args.rows_per_file), "--seed", str(args.seed), "--workdir",
                    str(args.workdir)], check=True)
    data = args.workdir / f"rows-{args.rows}-per{args.rows_per_file}-s{args.seed}-v{GENERATOR_VERSION}"
    files = len(list(data.glob("*.parquet")))
    size_gb = sum(p.stat().st_size for p in data.glob("*.parquet")) / 1e9
    log(f"data: {args.rows:,} rows in {files:,} Parquet files, {size_gb:.2f} GB, {data} "
        f"(ready in {time.perf_counter() - t0:.0f} s)")
    results: list[dict] = []
    problems: list[str] = []
    for job in jobs:
        per_job = []
        for tool in tools:
            log(f"{job}: {tool} ...")
            r = measure(tool, job, data, args.workdir / "out" / f"{job}-{tool}", args.max_rss_gb, args.run_timeout,
                        args.wait_quiet)
            log(f"  {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB, CPU {r['cpu_s']:.0f} s"
                + (f", KILLED {r['killed']}" if r["killed"] else "") + (f", exit {r['rc']}" if r["rc"] else ""))
            if "error" in r:
                log("  " + r["error"].strip().replace("\n", "\n  ")[-800:])
            per_job.append(r)
        problems += _agree(per_job, job)
        results += per_job

    cmd = "python bench/table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n## table: dataset operations on {args.rows:,} metadata rows ({files:,} Parquet files, {size_gb:.2f} GB)\n")
    print(f"- Command: `{cmd.strip()}`")
    print(f"- Machine: {info['cpu_model']}, {info['nproc']} cores, {info['memory']}; "
          f"Python {info['python']}, polars {info['polars']}, pandas {info['pandas']}, duckdb {info['duckdb']}, "
          f"pyarrow {info['pyarrow']}; {info['date']}")
    print("- dedup: url+caption among kept rows, every row written back with duplicate_of (zstd Parquet), in key order;"
          " subset: laion400m (kept, en, similarity >= 0.3) written as Parquet; stats: funnel, 5 score histograms,"
          " languages, image sizes. Wall time from process start (imports included); peak RSS is the process's own"
          " (os.wait4 ru_maxrss).\n")
    print("| job | tool | wall s | peak RSS GB | CPU s | others' CPU | vs fastlaion (time) | vs fastlaion (RSS) |")
    print("|---|---|---|---|---|---|---|---|")
    for job in jobs:
        base = next((r for r in results if r["job"] == job and r["tool"] == "fastlaion" and "result" in r), None)
        for r in (r for r in results if r["job"] == job):
            ok = "result" in r
            wall = f"{r['wall_s']:.1f}" if ok else f"failed ({r['killed'] or 'exit ' + str(r['rc'])})"
            ratio = f"{r['wall_s'] / base['wall_s']:.2f}x" if ok and base else "-"
            mem = f"{r['peak_rss_gb'] / max(base['peak_rss_gb'], 1e-3):.2f}x" if ok and base else "-"
            print(f"| {job} | {r['tool']} | {wall} | {r['peak_rss_gb']:.2f} | {r['cpu_s']:.0f} | "
                  f"{100 * r['others_cpu_share']:.0f} % | {ratio} | {mem} |")
    print()
    if any(r["others_cpu_share"] > 0.10 for r in results):
        print("**Warning**: other processes used over 10 % of the machine during some runs; rerun on a quiet machine "
              "before quoting those figures.\n")
    print("Agreement: " + ("all tools produced the same counts." if not problems else "; ".join(problems)))
    out_json = args.workdir / "results.json"
    out_json.write_text(json.dumps({"machine": info, "rows": args.rows, "files": files, "results": results,
                                    "problems": problems}, indent=2, default=str))
    log(f"results: {out_json}")
    return 1 if problems or any("result" not in r for r in results if r["tool"] == "fastlaion") else 0


if __name__ == "__main__":
    sys.exit(main())
