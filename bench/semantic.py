#!/usr/bin/env python3
"""Semantic dedup: `fastlaion dedup --by embedding --method clusters` against the exact all-pairs
walk (`--method exact`, blocked float32 matmuls in torch: what a careful script does).

    .venv/bin/python bench/semantic.py                         # 100,000 samples both ways, 1,000,000 clustered
    .venv/bin/python bench/semantic.py --rows 100000 --large 0 # the comparison only

1. Generates synthetic fastlaion runs (shard Parquet of kept rows + `{shard}_img_emb.npy`,
   10,000 samples a shard, float16, D=512), seeded, cached under `bench/_work/semantic/`:
   vectors around 2,000 topics (cosine ~0.5 within a topic, like CLIP's broad neighbourhoods),
   and 10 % near copies (cosine 0.96-0.999) of an earlier original. Synthetic vectors are not
   CLIP's: the recall below says how the clustering does on this shape, not on LAION.
2. Runs the CLI in a child process per job (wall time from its start, imports included; peak RSS
   from os.wait4, taken while this process holds nothing large: a child's ru_maxrss also counts
   the pages it shares with its parent before exec), `--device cpu`, threshold 0.95.
3. Checks every drop (its cosine with the sample it names, computed here in float64, is at least
   the threshold; that sample is earlier and kept), the recall of clusters against exact on the
   same rows, and prints the ratio of wall times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import pipeline as bp  # noqa: E402  (bench/pipeline.py: quiet-machine wait, machine description)

DIM = 512
SHARD = 10_000
THRESHOLD = 0.95
GENERATOR_VERSION = 2


def generate(folder: Path, n: int, seed: int) -> Path:
    """A run folder of n kept samples with planted near copies (cached by n, seed, version)."""
    import polars as pl

    from fastlaion.writer import PARQUET_SCHEMA

    run = folder / f"n{n}-s{seed}-v{GENERATOR_VERSION}"
    if (run / "done").exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(2000, DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    is_copy = rng.random(n) < 0.10
    is_copy[0] = False
    originals = np.flatnonzero(~is_copy)
    before = np.cumsum(~is_copy)  # originals up to and including each row
    for s in range(math.ceil(n / SHARD)):
        lo, hi = s * SHARD, min(n, (s + 1) * SHARD)
        m = hi - lo
        emb = topics[rng.integers(0, len(topics), m)] + rng.normal(scale=1 / math.sqrt(DIM), size=(m, DIM)).astype(np.float32)
        copy_rows = np.flatnonzero(is_copy[lo:hi])
        if copy_rows.size:
            src = originals[(rng.random(copy_rows.size) * before[lo + copy_rows]).astype(np.int64)]
            src_vec = _vectors(run, src, topics, rng_seed=seed, emb_now=emb, lo=lo)
            noise = rng.normal(size=(copy_rows.size, DIM)).astype(np.float32)
            noise *= (rng.uniform(0.04, 0.25, size=(copy_rows.size, 1)) / math.sqrt(DIM)).astype(np.float32)
            emb[copy_rows] = src_vec + noise
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        np.save(run / f"{s:05d}_img_emb.npy", emb.astype(np.float16))
        keys = [f"{s:05d}{r:04d}" for r in range(m)]
        frame = pl.DataFrame({"key": keys, "url": [f"https://h.example/{lo + r}.jpg" for r in range(m)],
                              "caption": [f"c{lo + r}" for r in range(m)], "status": ["kept"] * m})
        frame.select([(pl.col(c) if c in frame.columns else pl.lit(None)).cast(t).alias(c)
                      for c, t in PARQUET_SCHEMA.items()]).write_parquet(run / f"{s:05d}.parquet")
        (run / f"{s:05d}_stats.json").write_text("{}")
    (run / "done").write_text(json.dumps({"rows": n, "seed": seed, "dim": DIM}))
    return run


def _vectors(run: Path, rows: np.ndarray, topics, rng_seed: int, emb_now: np.ndarray, lo: int) -> np.ndarray:
    """The (float32, as written) vectors of earlier rows: from the shards already saved, or from the
    shard being made (rows >= lo, before its copies are placed: a copy's source is an original)."""
    out = np.empty((rows.size, DIM), np.float32)
    current = rows >= lo
    out[current] = emb_now[rows[current] - lo] / np.linalg.norm(emb_now[rows[current] - lo], axis=1, keepdims=True)
    for shard in np.unique(rows[~current] // SHARD):
        pick = (~current) & (rows // SHARD == shard)
        arr = np.load(run / f"{shard:05d}_img_emb.npy", mmap_mode="r")
        out[pick] = arr[rows[pick] % SHARD].astype(np.float32)
    return out


def load_all(run: Path) -> np.ndarray:
    files = sorted(run.glob("*_img_emb.npy"))
    return np.concatenate([np.load(f).astype(np.float32) for f in files])


def run_dedup(run: Path, out: Path, method: str, timeout_s: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    bp.wait_until_quiet(60)
    cmd = [sys.executable, "-m", "fastlaion", "dedup", "--by", "embedding", "--min-cosine", str(THRESHOLD),
           "--method", method, "--device", "cpu", "--from", str(run), "-o", str(out), "--no-progress"]
    t0 = time.perf_counter()
    log_path = out.with_name(out.name + ".log")
    log_file = open(log_path, "wb")  # noqa: SIM115 (a file, not a pipe: the child can never block on it)
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=log_file, stderr=subprocess.STDOUT)
    while True:  # os.wait4, not proc.wait: it also reports the child's own peak RSS
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - t0 > timeout_s:
            proc.kill()
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    log_file.close()
    output = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        return {"method": method, "error": output[-1500:], "wall_s": round(wall, 1)}
    info = json.loads((out / "dataset.json").read_text())
    return {"method": method, "wall_s": round(wall, 1), "peak_rss_gb": round(rusage.ru_maxrss * 1024 / 1e9, 2), "duplicates": info["duplicates"],
            "clusters": info["settings"].get("clusters"), "split_estimate": (
                round(info["settings"]["probe_pairs_split"] / info["settings"]["probe_pairs"], 4)
                if info["settings"].get("probe_pairs") else None),
            "output": output.strip().splitlines()}


def drops(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of each duplicate, row it names, kept mask) in dataset order."""
    import polars as pl

    frame = pl.read_parquet(out / "metadata.parquet", columns=["key", "duplicate_of"]).with_row_index("_i")
    index = dict(zip(frame["key"], frame["_i"]))
    dup = frame.filter(pl.col("duplicate_of").is_not_null())
    kept = np.ones(frame.height, bool)
    kept[dup["_i"].to_numpy()] = False
    return dup["_i"].to_numpy(), np.array([index[k] for k in dup["duplicate_of"]], dtype=np.int64), kept


def check_drops(emb: np.ndarray, out: Path) -> dict:
    d, f, kept = drops(out)
    a = emb[d].astype(np.float64)
    b = emb[f].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"false_drops": int((cos < THRESHOLD - 1e-3).sum()), "later_or_dropped_originals":
            int(((f >= d) | ~kept[f]).sum()), "dups": set(d.tolist())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="samples for the exact vs clusters comparison")
    ap.add_argument("--large", type=int, default=1_000_000, help="samples for a clusters-only run (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=HERE / "_work" / "semantic")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)
    info = bp.machine_info()
    print(f"machine: {info}")
    results = []
    exact_dups: set[int] | None = None
    for n, methods in ((args.rows, ("exact", "clusters")), (args.large, ("clusters",))):
        if not n:
            continue
        run = generate(args.workdir, n, args.seed)
        # every run first, the checks after: a child's peak RSS (ru_maxrss) counts the pages it
        # shares with this process between fork and exec, so this process stays small meanwhile
        runs = {m: run_dedup(run, args.workdir / f"out-{n}-{m}", m, args.timeout) for m in methods}
        emb = load_all(run)
        for method in methods:
            r = runs[method]
            r["rows"] = n
            if "error" not in r:
                check = check_drops(emb, args.workdir / f"out-{n}-{method}")
                dups = check.pop("dups")
                r.update(check)
                if method == "exact" and n == args.rows:
                    exact_dups = dups
                if method == "clusters" and n == args.rows and exact_dups is not None:
                    r["recall_vs_exact"] = round(len(dups & exact_dups) / max(1, len(exact_dups)), 4)
            print(json.dumps(r), flush=True)
            results.append(r)
        del emb
    print()
    print("| samples | method | wall s | peak RSS GB | duplicates | recall vs exact | pairs split (probes' estimate) | false drops |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['method']}{' (' + str(r['clusters']) + ' clusters)' if r.get('clusters') else ''} | "
              f"{r['wall_s']} | {r.get('peak_rss_gb')} | {r.get('duplicates', 'ERROR')} | {r.get('recall_vs_exact', '')} | "
              f"{'' if r.get('split_estimate') is None else r['split_estimate']} | {r.get('false_drops', '')} |")
    pair = {r["method"]: r for r in results if r["rows"] == args.rows and "error" not in r}
    if len(pair) == 2:
        print(f"\nclusters / exact at {args.rows:,} samples: {pair['exact']['wall_s'] / pair['clusters']['wall_s']:.1f}x faster")
    (args.workdir / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=2, default=str))
    bad = [r for r in results if "error" in r or r.get("false_drops") or r.get("later_or_dropped_originals")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
