#!/usr/bin/env python3
"""The whole scored job: fastlaion against the tool chain it replaces, on loopback, on the CPU.

Run with the project's interpreter, from any checkout:

    .venv/bin/python bench/e2e.py [--images 1500] [--rounds 1] [--only peer|fastlaion]
    .venv/bin/python bench/e2e.py --quick      # ~48 images, the tiny model (tests/test_bench.py)

The job users run today, on one URL list (url + caption, captions of mixed lengths as
bench/score.py's `make_captions`), each stage its own command as they chain them:

1. img2dataset (bench/pipeline.py's venv and command): download, resize to 256 px keep_ratio
   (LAION-5B's downloads kept the ratio; 256 is the LAION-400M release's size; CLIP then takes the
   centre 224), webdataset shards of 250.
2. clip-retrieval's real `clip-retrieval inference` over those shards (webdataset in, image and
   text embeddings, metadata), in `bench/.venv-clip-retrieval`, offline: its
   `--clip_model open_clip:ARCH//PATH` form loads a local checkpoint, here a seeded random
   ViT-B-32 written with open_clip exactly as fastlaion makes `--pretrained none` (same seed, same
   weights). On the CPU clip-retrieval runs fp32 (all_clip's wrapper); it stores the embeddings
   as float16.
3. The filter, as a user's script does it: numpy cosine of each pair's embeddings, pandas keeps
   the rows at or above the threshold and writes them to Parquet.

fastlaion does all of it in one command: `python -m fastlaion run URLS -o OUT --model ViT-B-32
--pretrained none` with the same image size, resize mode, shard size and threshold, in its default
precision (bf16 on a CPU with AMX, else fp32) and again with `--precision fp32` (like for like).

The threshold: random weights put every similarity near 0, so LAION's 0.28 would keep all or
none. The timed runs use the median of the peer's similarities (from its inference, before its
filter and fastlaion run), which splits the rows in two; `--threshold` sets another. Before the
table, both sides' row counts (downloaded, scored, kept) and their keep/drop decisions per URL are
compared, and the decisions that differ are explained by how far the two similarities are apart.

The clip-retrieval venv borrows torch (and what else the project's interpreter has that
clip-retrieval's pins allow) through a .pth file instead of installing PyPI's CUDA torch (~3 GB):
same torch on both sides. `--quick` installs nothing: it runs the peer only where both venvs are.
Nothing but 127.0.0.1 is contacted, apart from the package index for the two venvs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import pipeline as pl  # noqa: E402  (bench/pipeline.py: images, server, img2dataset, timed runs)

CLIP_RETRIEVAL_VENV = HERE / ".venv-clip-retrieval"
CLIP_RETRIEVAL_PIN = "2.45.0"
LAION_THRESHOLD = 0.28
SHARD_SIZE = 250
IMAGE_SIZE = 256
CAPTION_WORDS = (3, 5, 8, 10, 12, 12, 16, 20, 30, 80)  # bench/score.py's mix of caption lengths
WORDS = ("a photo of the cat dog red blue house car tree sky man woman beautiful vintage poster art print "
         "on white background with for sale new old black and green small large wooden table").split()

# The user's filter (step 3), run with the peer venv's python: cosine per pair, LAION's rule.
FILTER_SCRIPT = r"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

emb, threshold, out = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
part = lambda p: int(p.stem.rsplit("_", 1)[1])
img = np.concatenate([np.load(p) for p in sorted((emb / "img_emb").glob("*.npy"), key=part)])
txt = np.concatenate([np.load(p) for p in sorted((emb / "text_emb").glob("*.npy"), key=part)])
meta = pd.concat([pd.read_parquet(p) for p in sorted((emb / "metadata").glob("*.parquet"), key=part)],
                 ignore_index=True)
meta["similarity"] = (img.astype(np.float32) * txt.astype(np.float32)).sum(axis=1)
kept = meta[meta["similarity"] >= threshold]
kept.to_parquet(out)
print(f"kept {len(kept)} of {len(meta)} pairs at similarity >= {threshold}")
"""

# clip-retrieval's CLI with fastlaion's model configs registered in its open_clip (the tiny model
# of --quick is no open_clip architecture); everything else is its own `clip-retrieval` script.
CLIP_RETRIEVAL_SHIM = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
    "from clip_retrieval.cli import main; sys.argv[0] = 'clip-retrieval'; sys.exit(main())")

log = pl.log


def make_captions(n: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng([seed, 11])
    return [" ".join(rng.choice(WORDS, CAPTION_WORDS[i % len(CAPTION_WORDS)])) for i in range(n)]


# --------------------------------------------------------------------------- clip-retrieval venv

def _clip_retrieval_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not py.exists() or not (venv / "bin" / "clip-retrieval").exists():
        return None
    code = ("import importlib.metadata as m, clip_retrieval.clip_inference.worker; "
            "print(m.version('clip-retrieval'))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                       env={**os.environ, **pl.QUIET_ENV})
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def ensure_clip_retrieval(venv: Path = CLIP_RETRIEVAL_VENV) -> str:
    """Make sure `venv` holds a working clip-retrieval; return its version.

    The venv is made by this interpreter (same Python) and sees this interpreter's site-packages
    after its own through a .pth file: pip then takes torch and torchvision as installed (PyPI's
    would be the CUDA build, ~3 GB) and installs into the venv only what clip-retrieval pins
    otherwise (numpy<2, open_clip<3, webdataset<0.3, pyarrow<16, ...), which shadow ours there."""
    version = _clip_retrieval_version(venv)
    if version:
        log(f"reusing {venv.relative_to(REPO)} (clip-retrieval {version})")
        return version
    log(f"creating {venv.relative_to(REPO)} (torch borrowed from {sys.executable})")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (Path(site) / "_borrowed_project_site.pth").write_text("".join(p + "\n" for p in ours))
    # setuptools<81: clip-anytorch imports pkg_resources, which setuptools 81 removed
    pl.install_first(venv, "clip-retrieval", CLIP_RETRIEVAL_PIN, extra=("setuptools<81",))
    return pl.installed_version(venv, "clip-retrieval", _clip_retrieval_version)


def write_checkpoint(model: str, path: Path) -> None:
    """The random weights fastlaion's `--pretrained none` runs with (fastlaion.score's seed and
    call), saved as a state dict that open_clip's `pretrained=PATH` loads."""
    import open_clip
    import torch

    from fastlaion.score import RANDOM_WEIGHTS_SEED, register_model_configs

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        m = open_clip.create_model(model, pretrained=None)
    torch.save(m.state_dict(), path)


# --------------------------------------------------------------------------- reading the outputs

def peer_similarities(emb: Path) -> dict[str, float]:
    """url -> similarity from clip-retrieval's output (float16 embeddings, as it stores them)."""
    import numpy as np
    import pyarrow.parquet as pq

    def part(p: Path) -> int:
        return int(p.stem.rsplit("_", 1)[1])

    img = np.concatenate([np.load(p) for p in sorted((emb / "img_emb").glob("*.npy"), key=part)])
    txt = np.concatenate([np.load(p) for p in sorted((emb / "text_emb").glob("*.npy"), key=part)])
    urls = [u for p in sorted((emb / "metadata").glob("*.parquet"), key=part)
            for u in pq.read_table(p, columns=["url"]).column("url").to_pylist()]
    sims = (img.astype(np.float32) * txt.astype(np.float32)).sum(axis=1)
    return dict(zip(urls, sims.tolist()))


def fastlaion_rows(out: Path) -> list[dict]:
    """Every input row of a fastlaion output: url, status, stage, similarity."""
    import pyarrow.parquet as pq

    return [row for p in sorted(out.glob("*.parquet")) if re.fullmatch(r"\d+\.parquet", p.name)
            for row in pq.read_table(p, columns=["url", "status", "stage", "similarity"]).to_pylist()]


def compare(peer_dl: int, peer_sim: dict[str, float], fl: dict, threshold: float) -> list[str]:
    """Lines on how the two sides' rows and decisions agree."""
    import numpy as np

    lines = []
    peer_kept = sum(v >= threshold for v in peer_sim.values())
    for name, r in fl.items():
        scored = {row["url"]: row["similarity"] for row in r["rows"] if row["similarity"] is not None}
        f = r["summary"]["funnel"]
        lines.append(f"counts, peer vs {name}: downloaded {peer_dl} vs {f['downloaded']}, "
                     f"scored {len(peer_sim)} vs {len(scored)}, kept at {threshold:.5f} "
                     f"{peer_kept} vs {r['kept']}")
        common = sorted(set(peer_sim) & set(scored))
        p = np.array([peer_sim[u] for u in common], np.float64)
        q = np.array([scored[u] for u in common], np.float64)
        d = np.abs(p - q)
        flips = (p >= threshold) != (q >= threshold)
        near = np.abs(p - threshold)
        lines.append(
            f"agreement, {name}: {len(common)} URLs scored by both; similarity |fastlaion - peer| max "
            f"{d.max():.4f}, mean {d.mean():.4f} (the peer's similarities spread: std {p.std():.4f}, "
            f"range {p.min():.4f}..{p.max():.4f}); decisions differ for {int(flips.sum())} pairs "
            f"({100 * flips.mean():.1f} %)" + (
                f": the peer's similarity within {near[flips].max():.4f} of the threshold for all of them, "
                f"the two sides' {d[flips].min():.4f}..{d[flips].max():.4f} apart there, so the threshold "
                f"falls between them (image resampled twice and re-encoded by the peer, float16 embeddings, "
                f"the other precision)" if flips.any() else ""))
    return lines


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1500, help="how many JPEGs (default 1500)")
    ap.add_argument("--quick", action="store_true",
                    help="dry run: 48 images, the tiny model, no install (the peer only where its venvs are)")
    ap.add_argument("--model", default=None, help="open_clip architecture (default ViT-B-32; fastlaion-tiny "
                                                  "with --quick)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="similarity threshold (default: the median of the peer's similarities)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run both sides this many times, alternating which goes first (default 1)")
    ap.add_argument("--only", choices=["peer", "fastlaion"], help="run one side only")
    ap.add_argument("--batch-size", type=int, default=256, help="clip-retrieval's --batch_size (256, its default)")
    ap.add_argument("--prepro-workers", type=int, default=None,
                    help="clip-retrieval's --num_prepro_workers (default: the CPUs usable)")
    ap.add_argument("--processes", type=int, default=2, help="img2dataset --processes_count")
    ap.add_argument("--threads", type=int, default=32, help="img2dataset --thread_count")
    ap.add_argument("--workdir", type=Path, default=HERE / "_work", help="default bench/_work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the outputs (default: deleted after counting)")
    ap.add_argument("--fastlaion-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `fastlaion run` (repeatable)")
    ap.add_argument("--run-timeout", type=float, default=1800)
    ap.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                    help="before each run, wait up to S s for a quiet machine (default 120; 0 with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images = min(args.images, 48)
    model = args.model or ("fastlaion-tiny" if args.quick else "ViT-B-32")
    wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0 if args.quick else 120)
    n = args.images
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ncpu = len(os.sched_getaffinity(0))
    prepro = args.prepro_workers or ncpu

    versions: dict[str, str] = {}
    run_peer = args.only != "fastlaion"
    if run_peer and args.quick:
        i2d = pl._venv_img2dataset_version(pl.IMG2DATASET_VENV)
        cr = _clip_retrieval_version(CLIP_RETRIEVAL_VENV)
        if not (i2d and cr):
            log("--quick: no bench/.venv-img2dataset or bench/.venv-clip-retrieval here (--quick installs "
                "nothing): peer SKIPPED, fastlaion alone at LAION's threshold")
            run_peer = False
        else:
            versions = {"img2dataset": i2d, "clip-retrieval": cr}
    elif run_peer:
        versions = {"img2dataset": pl.ensure_img2dataset(), "clip-retrieval": ensure_clip_retrieval()}
    versions["fastlaion"] = pl.fastlaion_version()
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))

    paths = pl.generate_images(work / "images", n, args.seed)
    captions = make_captions(n, args.seed)
    ckpt = work / f"e2e-{model}-random.pt"
    if run_peer:
        write_checkpoint(model, ckpt)

    server = pl.ServerProcess(work / "images")
    log(f"loopback server pid {server.proc.pid} on {server.base_url}")
    env = {**os.environ, **pl.QUIET_ENV}
    rounds: list[dict] = []
    commands: dict[str, str] = {}
    threshold = args.threshold
    agreement: list[str] = []
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        urls = work / "e2e-urls.parquet"
        pq.write_table(pa.table({"url": [f"{server.base_url}/img/{p.name}" for p in paths],
                                 "caption": captions}), urls)

        def measure(cmd: list[str], log_name: str, run_env: dict, downloads: bool) -> dict:
            r0, s0 = server.counters()
            run = pl.run_timed(cmd, work / log_name, args.run_timeout, run_env, wait_quiet,
                               (lambda: server.counters()[0] - r0) if downloads else None, 120 if downloads else 0)
            r1, s1 = server.counters()
            run["server_cpu_s"] = s1 - s0
            run["other_cpu_s"] = max(0.0, run["machine_cpu_s"] - run["cpu_s"] - run["server_cpu_s"])
            if run["rc"] != 0:
                raise SystemExit(f"{cmd[0]} ... exited {run['rc']}; last lines of {work / log_name}:\n"
                                 f"{pl.tail(work / log_name, 30)}")
            return run

        def peer_round() -> dict:
            nonlocal threshold
            wds, emb = work / "e2e-img2dataset", work / "e2e-clip-retrieval"
            kept = work / "e2e-peer-kept.parquet"
            for p in (wds, emb):
                shutil.rmtree(p, ignore_errors=True)
            cmd = pl.img2dataset_command(urls, wds, "parquet", args.processes, args.threads, IMAGE_SIZE, SHARD_SIZE)
            commands["peer 1: img2dataset"] = " ".join(cmd)
            dl = measure(cmd, "e2e-img2dataset.log", pl.img2dataset_env(env), True)
            dl.update(pl.count_img2dataset(wds))
            tars = sorted(wds.glob("*.tar"))
            stems = [t.stem for t in tars]
            if not tars or stems != [f"{i:05d}" for i in range(len(tars))]:
                raise SystemExit(f"img2dataset wrote shards {stems[:5]}...; expected 00000.tar on")
            cr_bin = CLIP_RETRIEVAL_VENV / "bin"
            builtin = "/" not in model and not (REPO / "fastlaion" / "model_configs" / f"{model}.json").exists()
            head = ([str(cr_bin / "clip-retrieval")] if builtin else
                    [str(cr_bin / "python"), "-c", CLIP_RETRIEVAL_SHIM, str(REPO / "fastlaion" / "model_configs")])
            cmd = head + ["inference", "--input_dataset", f"{wds}/{{00000..{len(tars) - 1:05d}}}.tar",
                          "--output_folder", str(emb), "--input_format", "webdataset",
                          "--enable_text", "True", "--enable_image", "True", "--enable_metadata", "True",
                          "--clip_model", f"open_clip:{model}/{ckpt}", "--batch_size", str(args.batch_size),
                          # a webdataset worker without a shard stops the run ("fewer shards than workers")
                          "--num_prepro_workers", str(min(prepro, len(tars))), "--use_jit", "False", "--enable_wandb", "False"]
            commands["peer 2: clip-retrieval inference"] = " ".join(cmd)
            inf = measure(cmd, "e2e-clip-retrieval.log", env, False)
            sims = peer_similarities(emb)
            inf["ok"] = len(sims)
            warm = re.findall(r"done warming up in ([0-9.]+)s", (work / "e2e-clip-retrieval.log").read_text())
            inf["warmup_s"] = sum(float(w) for w in warm)
            if threshold is None:
                import numpy as np

                threshold = float(np.median(list(sims.values())))
                log(f"threshold: the median of the peer's similarities, {threshold:.5f}")
            cmd = [str(cr_bin / "python"), "-c", FILTER_SCRIPT, str(emb), repr(threshold), str(kept)]
            commands["peer 3: filter"] = " ".join(cmd[:2]) + " FILTER_SCRIPT " + " ".join(cmd[3:])
            flt = measure(cmd, "e2e-filter.log", env, False)
            flt["ok"] = len(sims)
            flt["kept"] = pq.read_metadata(kept).num_rows
            result = {"download": dl, "inference": inf, "filter": flt, "sims": sims}
            if not args.keep:
                for p in (wds, emb, kept):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            return result

        def fastlaion_round(precision: str | None) -> dict:
            out = work / f"e2e-fastlaion-{precision or 'auto'}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "fastlaion", "run", str(urls), "-o", str(out),
                   "--model", model, "--pretrained", "none",
                   "--image-size", str(IMAGE_SIZE), "--resize-mode", "keep_ratio", "--shard-size", str(SHARD_SIZE),
                   "--min-similarity", repr(threshold), "--min-similarity-multi", repr(threshold),
                   "--timeout", "10", "--retries", "0", "--no-progress",
                   # one loopback host serves everything: no per-host cap (img2dataset has none)
                   "--allow-private-networks", "--per-host", "1000",
                   *(["--precision", precision] if precision else []), *args.fastlaion_arg]
            name = f"fastlaion {precision or 'default precision'}"
            commands[name] = " ".join(cmd)
            run = measure(cmd, f"e2e-fastlaion-{precision or 'auto'}.log", env, True)
            run["summary"] = json.loads((out / "summary.json").read_text())
            run["rows"] = fastlaion_rows(out)
            run["ok"] = sum(row["similarity"] is not None for row in run["rows"])
            run["kept"] = sum(row["status"] == "kept" for row in run["rows"])
            run["precision_used"] = _precision_used(work / f"e2e-fastlaion-{precision or 'auto'}.log", precision)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
            return run

        if not run_peer and threshold is None:
            threshold = LAION_THRESHOLD
        for r in range(args.rounds):
            this: dict = {}
            sides = ["peer", "fastlaion"] if r % 2 == 0 or not run_peer else ["fastlaion", "peer"]
            for side in sides:
                if side == "peer" and run_peer:
                    this["peer"] = peer_round()
                elif side == "fastlaion" and args.only != "peer":
                    this["fastlaion auto"] = fastlaion_round(None)
                    this["fastlaion fp32"] = fastlaion_round("fp32")
            rounds.append(this)
            if r == 0 and run_peer and args.only != "peer":
                agreement = compare(this["peer"]["download"]["ok"], this["peer"]["sims"],
                                    {k: v for k, v in this.items() if k.startswith("fastlaion")}, threshold)
                for line in agreement:
                    log(line)
    finally:
        server.close()
        ckpt.unlink(missing_ok=True)

    report(args, n, model, ncpu, prepro, versions, commands, rounds, threshold, agreement, run_peer)
    bad = [f"{k} got {v['ok']} of {n}" for rd in rounds for k, v in rd.items()
           if k.startswith("fastlaion") and v["ok"] < 0.98 * n]
    bad += [f"peer got {rd['peer']['inference']['ok']} of {n}" for rd in rounds
            if "peer" in rd and rd["peer"]["inference"]["ok"] < 0.98 * n]
    for b in bad:
        print(f"!!! WARNING: {b} samples scored; its samples/s is not comparable")
    return 1 if bad else 0


def _precision_used(log_path: Path, asked: str | None) -> str:
    """The precision fastlaion's scorer picked: the one asked for, else what auto gives here."""
    if asked:
        return asked
    import torch

    from fastlaion.score import pick_precision

    return pick_precision("auto", torch.device("cpu"))


def report(args, n: int, model: str, ncpu: int, prepro: int, versions: dict, commands: dict,
           rounds: list[dict], threshold: float, agreement: list[str], run_peer: bool) -> None:
    m = pl.machine_info()

    def best(key: str, total) -> dict | None:
        runs = [rd[key] for rd in rounds if key in rd]
        return min(runs, key=total) if runs else None

    peer = best("peer", lambda p: sum(p[s]["wall_s"] for s in ("download", "inference", "filter")))
    fls = {k: best(k, lambda r: r["wall_s"]) for k in ("fastlaion auto", "fastlaion fp32")}
    print()
    print("=" * 78)
    print(f"machine: {m['nproc']} CPUs usable, {m['cpu_model']}, {m['memory']} RAM, Python {m['python']}")
    print(f"date:    {m['date']}; load average now {os.getloadavg()[0]:.2f}")
    print(f"data:    {n} JPEGs (bench/pipeline.py's, seed {args.seed}) with captions of 3-80 words, served "
          f"from memory by a separate process on 127.0.0.1; model {model} (random weights, seed 0, "
          f"the same on both sides); {IMAGE_SIZE} px keep_ratio, {SHARD_SIZE} per shard; threshold "
          f"{threshold:.5f}" + (" (the median of the peer's similarities)" if args.threshold is None and run_peer
                                else ""))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("commands:")
    for k, c in commands.items():
        print(f"  {k}: {c}")
    if not run_peer:
        print("peer: SKIPPED (" + ("--only fastlaion" if args.only == "fastlaion" else
                                   "--quick without the bench venvs") + ")")
    for line in agreement:
        print(line)
    print()
    print("| side | step | samples | wall s | samples/s | CPU-s | fastlaion / peer, samples/s | by CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    peer_wall = peer_cpu = None
    if peer:
        for step, label in (("download", f"img2dataset {versions.get('img2dataset', '')} (download, resize, write)"),
                            ("inference", f"clip-retrieval {versions.get('clip-retrieval', '')} inference (fp32)"),
                            ("filter", "filter (numpy + pandas)")):
            r = peer[step]
            print(f"| peer | {label} | {r['ok']} | {r['wall_s']:.1f} | {r['ok'] / r['wall_s']:.1f} | "
                  f"{r['cpu_s']:.1f} | | |")
        peer_wall = sum(peer[s]["wall_s"] for s in ("download", "inference", "filter"))
        peer_cpu = sum(peer[s]["cpu_s"] for s in ("download", "inference", "filter"))
        scored = peer["inference"]["ok"]
        print(f"| peer | **the chain** (kept {peer['filter']['kept']}) | {scored} | {peer_wall:.1f} | "
              f"{scored / peer_wall:.1f} | {peer_cpu:.1f} | 1.00x | 1.00x |")
    for k, r in fls.items():
        if r is None:
            continue
        t = r["summary"].get("timings_s", {})
        stages = ", ".join(f"{s} {v:.1f}" for s, v in t.items())
        rate = r["ok"] / r["wall_s"]
        ratio = f"{rate / (peer['inference']['ok'] / peer_wall):.2f}x" if peer else "n/a"
        by_cpu = (f"{(peer_cpu / peer['inference']['ok']) / (r['cpu_s'] / r['ok']):.2f}x"
                  if peer and r["ok"] else "n/a")
        print(f"| fastlaion | run, {r['precision_used']} (kept {r['kept']}; stage s: {stages}) | {r['ok']} | "
              f"{r['wall_s']:.1f} | {rate:.1f} | {r['cpu_s']:.1f} | {ratio} | {by_cpu} |")
    if peer and peer["inference"].get("warmup_s"):
        w = peer["inference"]["warmup_s"]
        print(f"\n(clip-retrieval's wall includes its own warm-up, two batches of {args.batch_size} through both "
              f"towers: {w:.1f} s by its log; without it, inference {peer['inference']['ok'] / max(1e-9, peer['inference']['wall_s'] - w):.1f} samples/s)")
    print("\n(samples: pairs scored; peer download: images written. 'by CPU-s': the peer's CPU-s per "
          "scored sample over fastlaion's. CPU-s: getrusage of the waited-for children; the server's apart.)")
    for i, rd in enumerate(rounds):
        runs = []
        for k, v in rd.items():
            steps = [(f"peer {s}", v[s]) for s in ("download", "inference", "filter")] if k == "peer" else [(k, v)]
            runs += [f"{name} {r['wall_s']:.1f} s (load {r['load_before']:.1f} before; other processes "
                     f"{r['other_cpu_s']:.0f} CPU-s during)" for name, r in steps]
        print(f"round {i + 1}: " + "; ".join(runs))
    (work_file := args.workdir.resolve() / "e2e_results.json").write_text(json.dumps(
        {"machine": m, "images": n, "model": model, "threshold": threshold, "versions": versions,
         "commands": commands, "agreement": agreement,
         "rounds": [{k: ({s: {a: b for a, b in v[s].items()} for s in ("download", "inference", "filter")}
                         if k == "peer" else {a: b for a, b in v.items() if a != "rows"})
                     for k, v in rd.items()} for rd in rounds]}, indent=2, default=str))
    print(f"(results also in {work_file})")


if __name__ == "__main__":
    sys.exit(main())
