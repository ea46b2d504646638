#!/usr/bin/env python3
"""`fastlaion search` against the numpy script a user writes (load every embedding file, one
matrix product, argsort), on the same synthetic run and queries.

    .venv/bin/python bench/search.py                         # 1,000,000 samples, 10 queries, k=10
    .venv/bin/python bench/search.py --rows 100000 --queries 100
    .venv/bin/python bench/search.py --index 0 4 64 --classes 0   # through `fastlaion index` at 3 --probes
    .venv/bin/python bench/search.py --index 0 64 --pq 64 --classes 0   # its product-quantized codes

The run is bench/semantic.py's (kept rows' Parquet + float16 D=512 embeddings, cached under its
work folder). The queries are --vector files (sample embeddings with noise), so no CLIP model is
loaded by either side. Each side runs in a child process: wall time from its start (imports
included), its peak RSS (os.wait4). The hits must agree (same keys in the same order; exact ties
aside, which the synthetic data does not have).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import pipeline as bp  # noqa: E402  (quiet-machine wait, machine description)
import semantic  # noqa: E402  (the synthetic run)


def numpy_peer(run: str, queries: list[str], k: int, out: str) -> None:
    """What a user writes: every embedding in memory, one product, a sort; keys from the Parquets."""
    import polars as pl

    files = sorted(Path(run).glob("*_img_emb.npy"))
    emb = np.concatenate([np.load(f) for f in files]).astype(np.float32)
    keys = pl.concat([pl.read_parquet(f.with_name(f.name.replace("_img_emb.npy", ".parquet")), columns=["key"])
                      for f in files])["key"].to_list()
    q = np.stack([np.load(p).astype(np.float32) for p in queries])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ emb.T
    hits = []
    for row in sims:
        top = np.argsort(-row, kind="stable")[:k]
        hits.append([(keys[i], float(row[i])) for i in top])
    Path(out).write_text(json.dumps(hits))


def classify_peer(run: str, ckpt: str, out: str, classes: list[str]) -> None:
    """What a user writes for zero-shot labels: every embedding in memory, the class prompts
    through open_clip, one product, argmax; every metadata row with its label, as Parquet."""
    import open_clip
    import polars as pl
    import torch

    from fastlaion.score import TINY_MODEL, register_model_configs

    register_model_configs()
    model = open_clip.create_model(TINY_MODEL, pretrained=ckpt).eval()
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(TINY_MODEL)([f"a photo of a {c}." for c in classes]))
    text = torch.nn.functional.normalize(text.float(), dim=1).numpy()
    files = sorted(Path(run).glob("*_img_emb.npy"))
    emb = np.concatenate([np.load(f) for f in files]).astype(np.float32)
    meta = pl.concat([pl.read_parquet(f.with_name(f.name.replace("_img_emb.npy", ".parquet"))) for f in files])
    sims = emb @ text.T
    best = sims.argmax(axis=1)
    meta.with_columns(pl.Series("zero_shot_label", np.array(classes)[best]),
                      pl.Series("zero_shot_score", sims[np.arange(len(best)), best])).write_parquet(out)


def save_tiny_checkpoint(path: Path) -> Path:
    """The tiny random CLIP (seed 0) saved at `path`, for --pretrained PATH on both sides. Saved by
    a child process: torch and open_clip stay out of this one, whose resident pages a measured
    child's ru_maxrss would count (they are shared between fork and exec)."""
    subprocess.run([sys.executable, "-c", "import sys, torch, open_clip; from fastlaion.score import "
                    "register_model_configs, TINY_MODEL; register_model_configs(); torch.manual_seed(0); "
                    "torch.save({'state_dict': open_clip.create_model(TINY_MODEL).state_dict()}, sys.argv[1])",
                    str(path)], check=True, cwd=str(REPO))
    return path


def measure(cmd: list[str]) -> dict:
    bp.wait_until_quiet(60)
    t0 = time.perf_counter()
    log = open(f"/tmp/bench-search-{os.getpid()}.log", "wb")  # noqa: SIM115 (a file: the child never blocks)
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    _, status, rusage = os.wait4(proc.pid, 0)
    log.close()
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    text = Path(log.name).read_text(errors="replace")
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(rusage.ru_maxrss * 1024 / 1e9, 2), "rc": rc,
            "tail": text[-800:] if rc else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=HERE / "_work" / "semantic")
    ap.add_argument("--classes", type=int, default=100, help="classes for the classify comparison (0: skip it)")
    ap.add_argument("--index", type=int, nargs="*", default=[0],
                    help="build `fastlaion index` and search through it with these --probes (0: the default); "
                         "--index alone skips it")
    ap.add_argument("--pq", type=int, default=0, help="build the index with `--pq BYTES` codes (0: float16)")
    ap.add_argument("--peer", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--classify-peer", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        run, out, k, *queries = args.peer
        numpy_peer(run, queries, int(k), out)
        return 0
    if args.classify_peer:
        run, ckpt, out, *classes = args.classify_peer
        classify_peer(run, ckpt, out, classes)
        return 0
    print(f"machine: {bp.machine_info()}")
    # Both sides' Python compiled ahead, as a pip install leaves it: under PYTHONDONTWRITEBYTECODE
    # (set on the dev box) every start compiled fastlaion's modules anew, 0.07 s of each search
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "fastlaion"), str(HERE)], check=True,
                   stdout=subprocess.DEVNULL)
    run = semantic.generate(args.workdir, args.rows, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    qdir = args.workdir / "queries"
    qdir.mkdir(exist_ok=True)
    queries = []
    for i in range(args.queries):
        shard = rng.integers(0, len(list(run.glob("*_img_emb.npy"))))
        v = np.load(run / f"{shard:05d}_img_emb.npy", mmap_mode="r")[rng.integers(0, semantic.SHARD)].astype(np.float32)
        path = qdir / f"q{i}.npy"
        np.save(path, v + rng.normal(scale=0.5 / np.sqrt(len(v)), size=len(v)).astype(np.float32))
        queries.append(str(path))
    ours_json = args.workdir / "search-fastlaion.json"
    peer_json = args.workdir / "search-numpy.json"
    vectors = sum((["--vector", q] for q in queries), [])
    ours = measure([sys.executable, "-m", "fastlaion", "search", str(run), *vectors,
                    "-k", str(args.k), "--json", str(ours_json), "--no-progress", "--exact"])
    peer = measure([sys.executable, str(Path(__file__).resolve()), "--peer", str(run), str(peer_json), str(args.k),
                    *queries])
    print(json.dumps({"fastlaion": ours, "numpy": peer}))
    if ours["rc"] or peer["rc"]:
        print("a side failed:", ours.get("tail"), peer.get("tail"))
        return 1
    got = [[(h["key"], h["similarity"]) for h in r["hits"]] for r in json.loads(ours_json.read_text())["results"]]
    want = json.loads(peer_json.read_text())
    same = all([k for k, _ in g] == [k for k, _ in w] for g, w in zip(got, want))
    close = all(abs(a[1] - b[1]) < 1e-4 for g, w in zip(got, want) for a, b in zip(g, w))
    print()
    print("| samples | queries | k | tool | wall s | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for name, r in (("fastlaion search", ours), ("numpy script", peer)):
        print(f"| {args.rows:,} | {args.queries} | {args.k} | {name} | {r['wall_s']} | {r['peak_rss_gb']} |")
    print(f"\nfastlaion / numpy: {peer['wall_s'] / ours['wall_s']:.2f}x the speed, "
          f"{peer['peak_rss_gb'] / max(ours['peak_rss_gb'], 1e-9):.1f}x less memory; same hits: {same and close}")
    ok = same and close
    if args.index:
        ok = bench_index(args, run, vectors, want, peer) and ok
    if args.classes:
        ok = bench_classify(args, run) and ok
    return 0 if ok else 1


def bench_index(args: argparse.Namespace, run: Path, vectors: list[str], want: list, peer: dict) -> bool:
    """`fastlaion index` once, then `fastlaion search` through it at each --probes: wall time
    (start-up included, as above) and recall@k against the numpy script's exact hits."""
    build = measure([sys.executable, "-m", "fastlaion", "index", str(run), "--no-progress", "--pq", str(args.pq)])
    if build["rc"]:
        print("index build failed:", build["tail"])
        return False
    meta = json.loads((run / "index" / "index.json").read_text())
    print()
    codes = f"{meta['pq']}-byte codes a sample, the best candidates ranked again" if meta.get("pq") else "float16"
    print(f"index: {meta['cells']:,} cells, {codes}, built in {build['wall_s']} s, peak RSS {build['peak_rss_gb']} GB, "
          f"{(run / 'index' / 'image.faiss').stat().st_size / 2**20:,.0f} MiB on disk")
    print("| samples | queries | k | probes of cells | wall s | peak RSS GB | recall@k vs exact | speed vs numpy |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for probes in args.index:
        out = args.workdir / f"search-index-{probes}.json"
        r = measure([sys.executable, "-m", "fastlaion", "search", str(run), *vectors, "-k", str(args.k),
                     "--json", str(out), "--no-progress", *(["--probes", str(probes)] if probes else [])])
        if r["rc"]:
            print("search through the index failed:", r["tail"])
            ok = False
            continue
        found = json.loads(out.read_text())
        if not found["index"]:
            print(f"--probes {probes}: the search did not use the index (stale or unreadable: see its log)")
            ok = False
            continue
        got = [{h["key"] for h in q["hits"]} for q in found["results"]]
        recall = sum(len(g & {k for k, _ in w}) for g, w in zip(got, want)) / sum(len(w) for w in want)
        used = found["index"]
        print(f"| {args.rows:,} | {args.queries} | {args.k} | {used['probes']} of {used['cells']} "
              f"| {r['wall_s']} | {r['peak_rss_gb']} | {recall:.1%} | {peer['wall_s'] / r['wall_s']:.2f}x |")
    return ok


def bench_classify(args: argparse.Namespace, run: Path) -> bool:
    """`fastlaion classify` against classify_peer: the tiny random CLIP (D=512, as the synthetic
    run) saved as a checkpoint, so both embed the same class prompts."""
    import polars as pl

    from fastlaion.score import TINY_MODEL

    ckpt = save_tiny_checkpoint(args.workdir / "tiny.pt")
    classes = [f"thing number {i}" for i in range(args.classes)]
    out = args.workdir / "classify-fastlaion"
    ours = measure([sys.executable, "-m", "fastlaion", "classify", "--from", str(run), "-o", str(out),
                    *sum((["--class", c] for c in classes), []), "--model", TINY_MODEL, "--pretrained", str(ckpt),
                    "--device", "cpu", "--no-progress"])
    peer_out = args.workdir / "classify-numpy.parquet"
    peer = measure([sys.executable, str(Path(__file__).resolve()), "--classify-peer", str(run), str(ckpt),
                    str(peer_out), *classes])
    print(json.dumps({"classify fastlaion": ours, "classify numpy": peer}))
    if ours["rc"] or peer["rc"]:
        print("a side failed:", ours.get("tail"), peer.get("tail"))
        return False
    a = pl.read_parquet(out / "metadata.parquet", columns=["key", "zero_shot_label", "zero_shot_score"])
    b = pl.read_parquet(peer_out, columns=["key", "zero_shot_label", "zero_shot_score"])
    same = a["key"].equals(b["key"]) and (a["zero_shot_label"] == b["zero_shot_label"]).mean() > 0.999 and \
        (a["zero_shot_score"] - b["zero_shot_score"]).abs().max() < 1e-3
    print()
    print("| samples | classes | tool | wall s | peak RSS GB |")
    print("|---|---|---|---|---|")
    for name, r in (("fastlaion classify", ours), ("numpy script", peer)):
        print(f"| {args.rows:,} | {args.classes} | {name} | {r['wall_s']} | {r['peak_rss_gb']} |")
    print(f"\nclassify, fastlaion / numpy: {peer['wall_s'] / ours['wall_s']:.2f}x the speed, "
          f"{peer['peak_rss_gb'] / max(ours['peak_rss_gb'], 1e-9):.1f}x less memory; same labels: {same} "
          f"({(a['zero_shot_label'] == b['zero_shot_label']).mean():.5f} of rows agree)")
    return bool(same)


if __name__ == "__main__":
    raise SystemExit(main())
