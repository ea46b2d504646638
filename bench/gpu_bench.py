"""The measurements of bench/gpu_check.sh: kernels, decoders, decode+score, and a whole run.

    python bench/gpu_bench.py --out DIR            # on the GPU machine (gpu_check.sh calls it)
    python bench/gpu_bench.py --out DIR --cpu      # the dry run: same steps, small sizes, CPU

Each section runs on its own: one that fails prints its error in the table and the others go on,
so one 15-minute GPU session always brings back every figure that could be measured.

(a) kernels: our fused paired-cosine and top-k cosine against torch eager on the same inputs,
    and the paired cosine's read bandwidth against a device-to-device copy's (what the memory
    can do on this card).
(b) decode img/s for each decoder available (DALI, nvJPEG, CPU) on the same generated JPEGs:
    the pipeline's whole decode stage (checks, decode, CLIP input, stored 256 px JPEG).
(c) ViT-B/32 fp16 decode+score samples/s (random weights: the real model's arithmetic) against a
    naive open_clip loop (Pillow + open_clip's preprocess + the model, batched) on the same GPU.
(d) `fastlaion run` end to end over a loopback server (download, decode, score, write).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import make_captions, make_jpegs, naive_path  # noqa: E402  (bench/score.py)

ROWS: list[tuple[str, str, str]] = []  # (what, figure, note): the closing table


def row(what: str, figure: str, note: str = "") -> None:
    ROWS.append((what, figure, note))
    print(f"  {what}: {figure}  {note}", flush=True)


def section(name: str, fn: Callable[[], None]) -> None:
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every section reports, none stops the others
        traceback.print_exc()
        row(name, "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}")
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def cuda_time_ms(fn: Callable[[], Any], repeat: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of `fn` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -- (a) kernels -----------------------------------------------------------------------------

def bench_kernels(args: argparse.Namespace) -> None:
    from fastlaion import ops

    if not torch.cuda.is_available():
        if os.environ.get("GPU_CHECK_SKIP_COMPILE"):  # CI: tests/test_ops.py compiles them already
            row("kernels", "compile skipped", "GPU_CHECK_SKIP_COMPILE is set")
            return
        t0 = time.perf_counter()
        built = ops.compile_check() if ops.find_nvcc() else []
        row("kernels", "compile only (no GPU)",
            f"nvcc built {len(built)} objects for sm_80/sm_90 in {time.perf_counter() - t0:.0f} s" if built
            else "no nvcc here")
        return
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    ops._ops()
    row("kernel build (JIT)", f"{time.perf_counter() - t0:.1f} s")
    n, d = args.cosine_rows, 512
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, d, device=dev, dtype=torch.float16, generator=gen)
    b = torch.randn(n, d, device=dev, dtype=torch.float16, generator=gen)
    big = torch.empty(2 * n * d, device=dev, dtype=torch.float16)
    copy_ms = cuda_time_ms(lambda: big.clone())
    copy_gbs = 2 * big.numel() * 2 / copy_ms / 1e6  # bytes read + written
    ours_ms = cuda_time_ms(lambda: ops.paired_cosine(a, b, impl="cuda"))
    eager_ms = cuda_time_ms(lambda: ops.paired_cosine_reference(a, b))
    torch_f = cuda_time_ms(lambda: torch.nn.functional.cosine_similarity(a, b, dim=1))
    err = (ops.paired_cosine(a, b, impl="cuda") - ops.paired_cosine_reference(a, b)).abs().max().item()
    read_gbs = 2 * n * d * 2 / ours_ms / 1e6
    row(f"paired_cosine fp16 {n:,}x{d}", f"{ours_ms:.3f} ms",
        f"{read_gbs:,.0f} GB/s = {100 * read_gbs / copy_gbs:.0f}% of copy ({copy_gbs:,.0f} GB/s); "
        f"{eager_ms / ours_ms:.1f}x torch eager reference ({eager_ms:.2f} ms), "
        f"{torch_f / ours_ms:.1f}x F.cosine_similarity ({torch_f:.2f} ms); max |err| {err:.1e}")
    del a, b, big
    ni, c, k = args.topk_rows, 1000, 5
    img = torch.randn(ni, d, device=dev, dtype=torch.float16, generator=gen)
    txt = torch.randn(c, d, device=dev, dtype=torch.float16, generator=gen)

    def eager_topk() -> Any:
        m = torch.nn.functional.normalize(img.float(), dim=1) @ torch.nn.functional.normalize(txt.float(), dim=1).T
        return m.topk(k, dim=1)

    def fp16_topk() -> Any:  # what a careful torch user writes: fp16 matmul on the tensor cores
        m = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
        return m.topk(k, dim=1)

    ours = cuda_time_ms(lambda: ops.topk_cosine(img, txt, k, impl="cuda"))
    eager = cuda_time_ms(eager_topk)
    half = cuda_time_ms(fp16_topk)
    agree = (ops.topk_cosine(img, txt, k, impl="cuda")[1][:, 0] == eager_topk().indices[:, 0]).float().mean().item()
    row(f"topk_cosine fp16 {ni:,}x{c} k={k}", f"{ours:.3f} ms",
        f"{eager / ours:.1f}x torch eager fp32 ({eager:.2f} ms), {half / ours:.1f}x torch fp16 matmul+topk "
        f"({half:.2f} ms); top-1 agrees on {100 * agree:.2f}%")


# -- (b) decoders ----------------------------------------------------------------------------

def decode_all(decoder: Any, jpegs: list[bytes], batch: int, pool: ThreadPoolExecutor) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(jpegs), batch):
        chunk = jpegs[start:start + batch]
        prepared = list(pool.map(decoder.prepare, chunk))
        out += decoder.finish(chunk, prepared)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def bench_decoders(args: argparse.Namespace, jpegs: list[bytes], device: torch.device) -> dict[str, float]:
    from fastlaion.config import DecodeConfig
    from fastlaion.decode import ClipInputSpec
    from fastlaion.gpu_decode import available_decoders, make_decoder

    clip = ClipInputSpec(size=(224, 224))
    rates: dict[str, float] = {}
    names = available_decoders(device)
    if "dali" not in names:
        row("decode dali", "not measured", "nvidia.dali is not installed here")
    variants = [(name, name, True) for name in names]
    if "dali" in names:  # DALI's fastest path: no libjpeg-style chroma smoothing (hardware decoder)
        variants.insert(names.index("dali") + 1, ("dali, fast chroma", "dali", False))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for label, name, exact in variants:
            def one() -> None:
                decoder = make_decoder(name, DecodeConfig(), clip, None, device, max_batch_size=args.batch,
                                       exact_chroma=exact)
                decode_all(decoder, jpegs[: args.batch], args.batch, pool)  # warm-up (pipelines, cuDNN)
                finish_s = 0.0
                finish = decoder.finish

                def timed_finish(bodies: list[bytes], prepared: list[Any]) -> list[Any]:
                    nonlocal finish_s
                    t = time.perf_counter()
                    try:
                        return finish(bodies, prepared)
                    finally:
                        finish_s += time.perf_counter() - t

                decoder.finish = timed_finish  # type: ignore[method-assign]
                # Inside finish(): the stored images' JPEG encode, the next thing to speed up if
                # it dominates (GPU decoders only; the CPU decoder encodes in prepare()).
                encode_s = 0.0
                encode = getattr(decoder, "_encode_stored", None)
                if encode is not None:
                    def timed_encode(images: list[Any]) -> list[bytes]:
                        nonlocal encode_s
                        if device.type == "cuda":  # the decode queued before is not the encode's
                            torch.cuda.synchronize()
                        t = time.perf_counter()
                        try:
                            return encode(images)
                        finally:
                            encode_s += time.perf_counter() - t

                    decoder._encode_stored = timed_encode  # type: ignore[method-assign]
                t0 = time.perf_counter()
                done = decode_all(decoder, jpegs, args.batch, pool)
                secs = time.perf_counter() - t0
                bad = sum(d.error is not None for d in done)
                rates[label] = len(jpegs) / secs
                encoded = f", stored-image encode {100 * encode_s / secs:.0f}%" if encode is not None else ""
                row(f"decode {label}", f"{rates[label]:,.0f} img/s",
                    f"{len(jpegs):,} JPEGs, batch {args.batch}, {os.cpu_count()} prepare threads; "
                    f"finish() {100 * finish_s / secs:.0f}% of the time{encoded}; {bad} rejected")
            section(f"decode {label}", one)
    return rates


# -- (c) decode + score ----------------------------------------------------------------------

def bench_score(args: argparse.Namespace, jpegs: list[bytes], device: torch.device) -> None:
    from fastlaion.config import DecodeConfig, ScoreConfig
    from fastlaion.gpu_decode import available_decoders, make_decoder
    from fastlaion.score import Scorer

    texts = make_captions(len(jpegs))
    torch.manual_seed(0)
    scorer = Scorer(ScoreConfig(model=args.model, pretrained="none", batch_size=args.batch), device)
    best = available_decoders(device)[0]
    decoder = make_decoder(best, DecodeConfig(), scorer.clip_spec, None, device, max_batch_size=args.batch)
    from fastlaion.pipeline import stack_pixels

    def run_all(images: list[bytes]) -> None:
        # decode of batch k+1 overlaps scoring of batch k, as in the pipeline (two threads)
        with ThreadPoolExecutor(os.cpu_count()) as pool, ThreadPoolExecutor(1) as scorer_thread:
            pending = None
            for start in range(0, len(images), args.batch):
                chunk = images[start:start + args.batch]
                done = decoder.finish(chunk, list(pool.map(decoder.prepare, chunk)))
                ok = [i for i, d in enumerate(done) if d.error is None]
                pixels = stack_pixels([done[i].clip_input for i in ok])
                if pending is not None:
                    pending.result()
                pending = scorer_thread.submit(scorer.score, pixels, [texts[start + i] for i in ok])
            if pending is not None:
                pending.result()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run_all(jpegs[: 2 * args.batch])  # warm-up
    t0 = time.perf_counter()
    run_all(jpegs)
    ours = len(jpegs) / (time.perf_counter() - t0)
    n_naive = min(len(jpegs), args.naive_images)
    naive = naive_path(args.model, jpegs[:n_naive], texts[:n_naive], device, args.batch)
    row(f"{args.model} decode+score ({best})", f"{ours:,.0f} samples/s",
        f"{ours / naive:.1f}x naive open_clip batched loop ({naive:,.0f}/s on {n_naive:,}); "
        f"{len(jpegs):,} JPEGs, {scorer.dtype}, batch {args.batch}")
    # The model alone, on pixels already on the device: what scoring could reach with a free decoder.
    h, w = scorer.clip_spec.size
    pixels = torch.randint(0, 256, (args.batch, h, w, 3), dtype=torch.uint8, device=device)
    batch_texts = texts[: args.batch]
    scorer.score(pixels, batch_texts)
    rounds = max(2, len(jpegs) // args.batch)
    t0 = time.perf_counter()
    for _ in range(rounds):
        scorer.score(pixels, batch_texts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    alone = rounds * args.batch / (time.perf_counter() - t0)
    row(f"{args.model} score only", f"{alone:,.0f} samples/s",
        f"image + text towers + paired cosine + host copies, batch {args.batch}, pixels already on {device.type}")


# -- (d) the whole run -----------------------------------------------------------------------

def bench_run(args: argparse.Namespace, jpegs: list[bytes], device: torch.device) -> None:
    import polars as pl

    from fastlaion.server import LoopbackServer, Served

    files = {f"{i}.jpg": Served(b, "image/jpeg") for i, b in enumerate(jpegs)}
    with tempfile.TemporaryDirectory() as tmp, LoopbackServer(files) as server:
        inp = Path(tmp) / "in.parquet"
        pl.DataFrame({"url": [server.url(f"{i}.jpg") for i in range(len(jpegs))],
                      "caption": make_captions(len(jpegs))}).write_parquet(inp)
        where = ["--gpus", "1"] if device.type == "cuda" else ["--device", "cpu"]
        cmd = [sys.executable, "-m", "fastlaion.cli", "run", str(inp), "-o", str(Path(tmp) / "out"),
               "--model", args.model, "--pretrained", "none", "--min-similarity", "-1", "--no-language",
               "--shard-size", str(args.shard_size), "--batch-size", str(args.batch), "--workers", "256",
               "--no-progress", *where]
        if "--allow-private-networks" in _run_help():
            cmd.append("--allow-private-networks")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        (Path(args.out) / "run_stdout.txt").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"fastlaion run exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
        kept = summary["funnel"]["kept"]
        if kept != len(jpegs):  # --min-similarity -1 keeps every image that arrives
            raise RuntimeError(f"only {kept} of {len(jpegs)} kept: {summary['funnel']['drops']}")
        stages = ", ".join(f"{k} {v:.1f}" for k, v in summary["timings_s"].items())
        row(f"fastlaion run {' '.join(where)}", f"{len(jpegs) / secs:,.0f} samples/s",
            f"{len(jpegs):,} URLs over loopback, {kept:,} kept, {secs:.1f} s wall incl. start-up; stage s: {stages}")


def _run_help() -> str:
    return subprocess.run([sys.executable, "-m", "fastlaion.cli", "run", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"}).stdout


# -- main ------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json and logs")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU with small sizes")
    ap.add_argument("--model", default="", help="open_clip model (default ViT-B-32; fastlaion-tiny in the dry run)")
    ap.add_argument("--images", type=int, default=0, help="JPEGs for (b) and (c) (default 4096 GPU, 32 CPU)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default 512 GPU, 16 CPU)")
    args = ap.parse_args()
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --cpu for the dry run")
    args.model = args.model or ("ViT-B-32" if gpu else "fastlaion-tiny")
    args.images = args.images or (4096 if gpu else 32)
    args.batch = args.batch or (512 if gpu else 16)
    args.naive_images = 2048 if gpu else 8
    args.cosine_rows = 1 << 21 if gpu else 1024
    args.topk_rows = 1 << 18 if gpu else 512
    args.shard_size = 2000 if gpu else 16
    Path(args.out).mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if gpu else "cpu")
    env = {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if gpu else None,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
        import nvidia.dali as dali

        env["dali"] = dali.__version__
    except ImportError:
        pass
    print("environment:", json.dumps(env), flush=True)

    t0 = time.perf_counter()
    jpegs = make_jpegs(args.images)
    print(f"generated {len(jpegs):,} JPEGs (300-800 px, mean {sum(map(len, jpegs)) / len(jpegs) / 1e3:.0f} KB) "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    # GPU_BENCH_SECTIONS=b,c runs a subset (a second, shorter GPU call); default: all
    wanted = set(os.environ.get("GPU_BENCH_SECTIONS", "a,b,c,d").split(","))
    for key, name, fn in (("a", "(a) kernels", lambda: bench_kernels(args)),
                          ("b", "(b) decoders", lambda: bench_decoders(args, jpegs, device)),
                          ("c", "(c) decode+score", lambda: bench_score(args, jpegs, device)),
                          ("d", "(d) fastlaion run", lambda: bench_run(args, jpegs, device))):
        if key in wanted:
            section(name, fn)

    (Path(args.out) / "results.json").write_text(json.dumps({"env": env, "rows": ROWS}, indent=2))
    title = f"{env['gpu'] or 'CPU dry run'} | torch {env['torch']} | {env['date']}"
    print(f"\n{title}\n| what | figure | note |\n|---|---|---|")
    for what, figure, note in ROWS:
        print(f"| {what} | {figure} | {note} |")
    if any(fig == "FAILED" for _, fig, _ in ROWS):
        sys.exit(1)


if __name__ == "__main__":
    main()
