"""The measurements of bench/gpu_check.sh: kernels, decoders, decode+score, and a whole run.

    python bench/gpu_bench.py --out DIR            # on the GPU machine (gpu_check.sh calls it)
    python bench/gpu_bench.py --out DIR --cpu      # the dry run: same steps, small sizes, CPU

Each section runs on its own: one that fails prints its error in the table and the others go on,
so one 15-minute GPU session always brings back every figure that could be measured.

(a) kernels: our fused paired-cosine and top-k cosine against torch eager on the same inputs,
    and the paired cosine's read bandwidth against a device-to-device copy's (what the memory
    can do on this card).
(b) decode img/s for each decoder available (DALI, nvJPEG, CPU) on the same generated JPEGs:
    the pipeline's whole decode stage (checks, decode, CLIP input, stored 256 px JPEG), with the
    old settings (one batch at a time, stored image encoded by nvJPEG; the header reads and
    geometry are the new code there too) and the new (two batches in flight, stored image encoded
    by libjpeg-turbo on the host's threads), DALI's fast paths, and where finish() spends its
    time (ms per batch).
(c) ViT-B/32 fp16 decode+score samples/s (random weights: the real model's arithmetic) against a
    naive open_clip loop (Pillow + open_clip's preprocess + the model, batched) on the same GPU,
    with and without the stored image; where the host's threads spend that run (bench/sampler.py);
    the model alone, and its parts (tokenizer, towers).
(d) `fastlaion run` end to end over a loopback server (download, decode, score, write), with one
    worker on the GPU (the default) and with `--workers-per-gpu 2`, which decides the default.
(e) (c) in 4 processes sharing the GPU (`--workers-per-gpu 4`; 2 in the dry run), eager and with
    the compiled towers, with DALI's default decode and with its hardware decoder taking every
    image: what takes device time off the GPU that 4 processes keep busy (session 10).
(h) one batch of scoring under torch.profiler: device time by kind of kernel (matrix products,
    attention, layer norm, elementwise, copies), the matrix products' TFLOP/s and the top kernels;
    the full table in $OUT/profile_score.txt. Last: it informs the next change, it decides none.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

_STARTED = time.perf_counter()  # before torch's import: --time-limit counts from the process's start

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
    a = b = big = None  # free the GPU memory (the timing lambdas above close over these names)
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

def decode_all(decoder: Any, jpegs: list[bytes], batch: int, pool: ThreadPoolExecutor,
               in_flight: int = 1) -> list[Any]:
    """prepare() on `pool` then finish(), batch by batch, with `in_flight` batches at once (each
    on its own thread, as the pipeline runs them)."""
    def one(start: int) -> list[Any]:
        chunk = jpegs[start:start + batch]
        return decoder.finish(chunk, list(pool.map(decoder.prepare, chunk)))

    with ThreadPoolExecutor(in_flight) as batches:
        out = [d for done in batches.map(one, range(0, len(jpegs), batch)) for d in done]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def bench_decoders(args: argparse.Namespace, jpegs: list[bytes], device: torch.device) -> dict[str, float]:
    from fastlaion.config import DecodeConfig, ResizeMode
    from fastlaion.decode import ClipInputSpec
    from fastlaion.gpu_decode import available_decoders, make_decoder, nvimgcodec_importable

    clip = ClipInputSpec(size=(224, 224))
    rates: dict[str, float] = {}
    names = available_decoders(device)
    if "dali" not in names:
        row("decode dali", "not measured", "nvidia.dali is not installed here")
    # (label, decoder, make_decoder options, DecodeConfig options, batches in flight)
    variants: list[tuple[str, str, dict[str, Any], dict[str, Any], int]] = []
    for name in names:
        if name == "cpu":
            variants.append(("cpu", "cpu", {}, {}, 1))
            continue
        variants.append((f"{name}, old settings: 1 batch at a time, stored image encoded by nvJPEG", name,
                         {"stored_encode": "device"}, {}, 1))
        if name == "dali":
            variants.append(("dali, 1 batch at a time", name, {}, {}, 1))
        variants.append((name, name, {}, {}, 2))
        if nvimgcodec_importable():  # the stored image encoded by nvImageCodec, on the GPU on CUDA
            variants.append((f"{name}, stored image by nvImageCodec", name, {"stored_encode": "nvimgcodec"}, {}, 2))
        if name == "dali":  # DALI's fastest paths: no libjpeg-style chroma smoothing, hardware decoder
            variants += [("dali, fast chroma", name, {"exact_chroma": False}, {}, 2),
                         ("dali, fast chroma, all to the hardware decoder", name,
                          {"exact_chroma": False, "hw_decoder_load": 1.0}, {}, 2),
                         ("dali, no stored image (--resize-mode no)", name, {}, {"resize_mode": ResizeMode.no}, 2),
                         (f"dali, batch {2 * args.batch}", name, {"max_batch_size": 2 * args.batch}, {}, 2)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for label, name, options, cfg_options, in_flight in variants:
            def one(name: str = name, options: dict[str, Any] = options, cfg_options: dict[str, Any] = cfg_options,
                    in_flight: int = in_flight, label: str = label) -> None:
                batch = options.get("max_batch_size", args.batch)
                extra = {"concurrency": in_flight} if name != "cpu" else {}
                decoder = make_decoder(name, DecodeConfig(**cfg_options), clip, None, device,
                                       **{"max_batch_size": args.batch, **extra, **options})
                # warm-up (pipelines, cuDNN, one DALI pipeline per batch in flight)
                decode_all(decoder, jpegs[: batch * in_flight], batch, pool, in_flight)
                phases = getattr(decoder, "phase_s", None)
                if phases is not None:
                    phases.clear()
                t0, cpu0 = time.perf_counter(), time.process_time()
                done = decode_all(decoder, jpegs, batch, pool, in_flight)
                secs = time.perf_counter() - t0
                cores = (time.process_time() - cpu0) / secs
                bad = sum(d.error is not None for d in done)
                rates[label] = len(jpegs) / secs
                n_batches = -(-len(jpegs) // batch)
                # where finish() went, in ms per batch summed over its threads (parts overlap when
                # batches are in flight together; "decode" holds the dali_* parts)
                parts = ", ".join(f"{k} {1e3 * v / n_batches:.1f}" for k, v in sorted((phases or {}).items()))
                row(f"decode {label}", f"{rates[label]:,.0f} img/s",
                    f"{len(jpegs):,} JPEGs, batch {batch}, {in_flight} in flight, {os.cpu_count()} threads, "
                    f"{cores:.1f} of {os.cpu_count()} cores busy; {bad} rejected" + (f"; finish ms/batch: {parts}" if parts else "")
                    + (f"; {decoder.stored_fallbacks:,} stored images left to the host encoder"
                       if getattr(decoder, "stored_fallbacks", 0) else ""))
            section(f"decode {label}", one)
    return rates


# -- (c) decode + score ----------------------------------------------------------------------

def decode_and_score(decoder: Any, scorer: Any, images: list[bytes], texts: list[str], batch: int,
                     device: torch.device) -> None:
    """As in the pipeline: batches decode on `decoder.concurrency` threads at once (prepare on a
    pool, finish on the batch's thread), scoring runs on its own thread, in batch order."""
    from fastlaion.pipeline import MAX_SHARDS_IN_FLIGHT, ShardJob, stack_pixels

    # Batches decoded and not yet scored, at most: the pipeline's bound (MAX_BATCHES_IN_FLIGHT
    # per shard, MAX_SHARDS_IN_FLIGHT shards), so decoding never runs further ahead than there.
    ahead = threading.BoundedSemaphore(ShardJob.MAX_BATCHES_IN_FLIGHT * MAX_SHARDS_IN_FLIGHT)

    def decode_batch(start: int) -> tuple[Any, list[str]]:
        ahead.acquire()
        chunk = images[start:start + batch]
        done = decoder.finish(chunk, list(pool.map(decoder.prepare, chunk)))
        ok = [i for i, d in enumerate(done) if d.error is None]
        return stack_pixels([done[i].clip_input for i in ok]), [texts[start + i] for i in ok]

    def score(decoded: Any) -> None:
        try:
            scorer.score(*decoded.result())
        finally:
            ahead.release()

    with ThreadPoolExecutor(os.cpu_count(), "prepare") as pool, \
            ThreadPoolExecutor(decoder.concurrency, "finish") as decoding, ThreadPoolExecutor(1, "score") as scorer_thread:
        decoded = [decoding.submit(decode_batch, start) for start in range(0, len(images), batch)]
        scored = [scorer_thread.submit(score, f) for f in decoded]
        for f in scored:
            f.result()
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make_scorer(model: str, batch: int, device: torch.device, compile: bool = False,
                 open_clip_layers: bool = False) -> Any:
    """fastlaion's Scorer; `open_clip_layers`: with open_clip's patch embedding (a convolution of
    normalised float pixels) and float32 layer norms, as before session 14 (Scorer's option)."""
    from fastlaion.config import ScoreConfig
    from fastlaion.score import Scorer

    torch.manual_seed(0)
    return Scorer(ScoreConfig(model=model, pretrained="none", batch_size=batch, compile=compile), device,
                  open_clip_layers=open_clip_layers)


def _make_decoder(scorer: Any, batch: int, device: torch.device, cfg_options: dict[str, Any] | None = None,
                  **options: Any) -> Any:
    """The pipeline's choice of decoder (the best available) for `scorer`'s CLIP input."""
    from fastlaion.config import DecodeConfig
    from fastlaion.gpu_decode import available_decoders, make_decoder

    return make_decoder(available_decoders(device)[0], DecodeConfig(**(cfg_options or {})), scorer.clip_spec, None,
                        device, max_batch_size=batch, **options)


def _score_worker(model: str, batch: int, device_name: str, jpeg_file: str, repeat: int, threads: int,
                  start: Any, results: Any, variants: list[tuple[str, dict[str, Any], dict[str, bool]]]) -> None:
    """One of several processes sharing a GPU (bench_processes): its own model, decoder, threads,
    through every variant in turn, each timed between two barriers with the other processes. Each
    kind of scorer is made once (the compile once per process)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    images = pickle.loads(Path(jpeg_file).read_bytes())
    texts = make_captions(len(images))
    scorers: dict[tuple[tuple[str, bool], ...], Any] = {}
    for _label, decoder_options, scorer_options in variants:
        kind = tuple(sorted(scorer_options.items()))
        if kind not in scorers:
            scorers[kind] = _make_scorer(model, batch, device, **scorer_options)
        scorer = scorers[kind]
        # Its share of the cores for the decoder's pools too, as `--workers-per-gpu` gives each
        # worker (session 4's rows of this section gave every process all the cores).
        decoder = _make_decoder(scorer, batch, device, {"threads": threads}, **decoder_options)
        decode_and_score(decoder, scorer, images[: 2 * batch], texts, batch, device)  # warm-up (and the compile)
        start.wait(timeout=400)
        t0 = time.time()
        decode_and_score(decoder, scorer, images * repeat, texts * repeat, batch, device)
        results.put((len(images) * repeat, t0, time.time()))
        del decoder  # its DALI pipeline and buffers, before the next variant's


def process_variants(device: torch.device) -> tuple[int, list[tuple[str, dict[str, Any], dict[str, bool]]]]:
    """Section (e)'s processes and variants: (label, decoder options, Scorer options). Four
    processes on one H200 are limited by the GPU itself (sessions 10 and 13), so what is measured
    is what takes device time off the towers: open_clip's layers (as before session 14) against
    fastlaion's patch embedding and float16 layer norms, eager and compiled. (DALI's hardware
    decoder for every image, measured in session 13, was slower in both: 8,854 against 9,527
    eager, 10,563 against 10,906 compiled.) The dry run walks two variants in 2 processes."""
    variants: list[tuple[str, dict[str, Any], dict[str, bool]]] = [
        ("open_clip's layers", {}, {"open_clip_layers": True}), ("", {}, {})]
    if device.type != "cuda":
        return 2, variants
    return 4, [*variants, ("compiled towers", {}, {"compile": True})]


def bench_processes(args: argparse.Namespace, jpegs: list[bytes], device: torch.device, processes: int,
                    variants: list[tuple[str, dict[str, Any], dict[str, bool]]]) -> None:
    """decode+score with `processes` worker processes on the one GPU, started once and timed
    together for each variant: whether one process's host work (Python, one GIL) is what limits,
    and with which settings. A row is written as each variant finishes."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        jpeg_file = str(Path(tmp) / "jpegs.pickle")
        Path(jpeg_file).write_bytes(pickle.dumps(jpegs))
        start, results = ctx.Barrier(processes + 1), ctx.Queue()
        threads = max(1, (os.cpu_count() or 1) // processes)
        workers = [ctx.Process(target=_score_worker, args=(args.model, args.batch, str(device), jpeg_file,
                                                           args.repeat, threads, start, results, variants),
                               daemon=True)
                   for _ in range(processes)]
        try:
            for w in workers:
                w.start()
            for label, _options, scorer_options in variants:
                # a worker that died loading breaks this after 2 minutes (4 with a compile), not 5
                start.wait(timeout=240 if scorer_options.get("compile") else 120)
                done = [results.get(timeout=180) for _ in workers]
                samples = sum(n for n, _, _ in done)
                secs = max(end for _, _, end in done) - min(begin for _, begin, _ in done)
                how = f", {label}" if label else ""
                row(f"{args.model} decode+score, {processes} processes on one {device.type.upper()}{how}",
                    f"{samples / secs:,.0f} samples/s", f"all processes together; {samples:,} samples in {secs:.1f} s")
        finally:
            for w in workers:
                w.join(timeout=30)
                if w.is_alive():
                    w.terminate()


def score_rate(scorer: Any, pixels: torch.Tensor, texts: list[str], rounds: int, device: torch.device) -> float:
    """Samples/s of `scorer.score` over `rounds` calls on the same batch (already warm)."""
    t0 = time.perf_counter()
    for _ in range(rounds):
        scorer.score(pixels, texts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rounds * len(texts) / (time.perf_counter() - t0)


def bench_score(args: argparse.Namespace, jpegs: list[bytes], device: torch.device) -> None:
    from fastlaion.config import ResizeMode
    from fastlaion.gpu_decode import available_decoders, nvimgcodec_importable

    texts = make_captions(len(jpegs))
    scorer = _make_scorer(args.model, args.batch, device)
    n_naive = min(len(jpegs), args.naive_images)
    naive = naive_path(args.model, jpegs[:n_naive], texts[:n_naive], device, args.batch)
    images, captions = jpegs * args.repeat, texts * args.repeat
    variants: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("", {}, {}), (", 1 batch at a time", {}, {"concurrency": 1}),
        (", no stored image (--resize-mode no)", {"resize_mode": ResizeMode.no}, {})]
    if device.type != "cuda":
        variants.pop(1)  # the CPU decoder decodes as bodies arrive: no batches in flight
    if device.type == "cuda" and "dali" in available_decoders(device):
        variants.append((", fast chroma, all to the hardware decoder", {},
                         {"exact_chroma": False, "hw_decoder_load": 1.0}))
    if device.type == "cuda" and nvimgcodec_importable():  # no host encode: the bytes come back, not pixels
        variants.append((", stored image by nvImageCodec on the GPU", {}, {"stored_encode": "nvimgcodec"}))
    for what, cfg_options, options in variants:
        decoder = _make_decoder(scorer, args.batch, device, cfg_options, **options)
        decode_and_score(decoder, scorer, images[: 2 * args.batch], captions, args.batch, device)  # warm-up
        t0, cpu0 = time.perf_counter(), time.process_time()
        decode_and_score(decoder, scorer, images, captions, args.batch, device)
        secs = time.perf_counter() - t0
        ours, cores = len(images) / secs, (time.process_time() - cpu0) / secs
        row(f"{args.model} decode+score ({decoder.name}{what})", f"{ours:,.0f} samples/s",
            f"{ours / naive:.1f}x naive open_clip batched loop ({naive:,.0f}/s on {n_naive:,}); {len(images):,} "
            f"samples, {scorer.dtype}, batch {args.batch}, {decoder.concurrency} batches decoding at once, "
            f"{cores:.1f} of {os.cpu_count()} cores busy")
    # Where the host's time goes in the first variant, by thread (bench/sampler.py): run again
    # under the sampler, which costs a little, so it gives no rate of its own.
    from sampler import Sampler

    decoder = _make_decoder(scorer, args.batch, device)
    decode_and_score(decoder, scorer, images[: 2 * args.batch], captions, args.batch, device)  # warm-up
    with Sampler() as sampled:
        decode_and_score(decoder, scorer, images, captions, args.batch, device)
    for group, summary in sampled.report():
        row(f"{args.model} decode+score ({decoder.name}) host profile: {group}", summary,
            f"{sampled.samples:,} samples over {sampled.wall:.1f} s")
    # The model alone, on pixels already on the device: what scoring could reach with a free decoder.
    h, w = scorer.clip_spec.size
    pixels = torch.randint(0, 256, (args.batch, h, w, 3), dtype=torch.uint8, device=device)
    batch_texts = texts[: args.batch]
    scorer.score(pixels, batch_texts)
    rounds = max(2, len(jpegs) // args.batch)
    alone = score_rate(scorer, pixels, batch_texts, rounds, device)
    row(f"{args.model} score only", f"{alone:,.0f} samples/s",
        f"image + text towers + paired cosine + host copies, batch {args.batch}, pixels already on {device.type}")
    # The image tower's blocks through MultiheadAttention's fast path (cuDNN attention on CUDA:
    # session 14's layers) instead of one scaled_dot_product_attention each (since 2026-11-28, the
    # CPU's lever, unmeasured on a GPU): the same scorer, the switch flipped for the row
    patches = getattr(scorer, "_patches", None)
    if patches is not None and patches.plain_blocks:
        patches.plain_blocks = False
        try:
            scorer.score(pixels, batch_texts)
            fast_path = score_rate(scorer, pixels, batch_texts, rounds, device)
        finally:
            patches.plain_blocks = True
        row(f"{args.model} score only, image blocks through MultiheadAttention", f"{fast_path:,.0f} samples/s",
            f"one scaled_dot_product_attention a block (the default): {alone / fast_path:.2f}x")
    # The same model with open_clip's patch embedding and float32 layer norms (before session 14)
    before = _make_scorer(args.model, args.batch, device, open_clip_layers=True)
    before.score(pixels, batch_texts)
    was = score_rate(before, pixels, batch_texts, rounds, device)
    row(f"{args.model} score only, open_clip's layers", f"{was:,.0f} samples/s",
        f"fastlaion's patch embedding{' and float16 layer norms' if device.type == 'cuda' else ''}: "
        f"{alone / was:.2f}x; max |cosine difference| {_cosine_gap(scorer, before, pixels, batch_texts):.1e}")

    # Its parts, ms per batch: what to speed up next.
    def timed(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(rounds):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t) / rounds

    tokens = scorer.tokenizer(batch_texts)
    compiled = getattr(scorer.tokenizer, "_native", None) is not None  # tokenize_native.c, where gcc is
    with torch.inference_mode():  # as Scorer runs them (torch's fused attention needs it)
        parts = {f"tokenize (host, {'compiled word table' if compiled else 'Python'})":
                     timed(lambda: scorer.tokenizer(batch_texts)),
                 "image tower": timed(lambda: scorer.image_features(pixels)),
                 "text tower": timed(lambda: scorer._text_prefix.encode(tokens, device) if scorer._text_prefix
                                     else scorer.model.encode_text(tokens.to(device))),
                 "text tower, one pass (before packing)": timed(
                     lambda: scorer._text_prefix.encode_one_pass(tokens, device) if scorer._text_prefix
                     else scorer.model.encode_text(tokens.to(device))),
                 "image tower, open_clip's layers": timed(lambda: before.image_features(pixels)),
                 "text tower, open_clip's layers": timed(lambda: before._text_prefix.encode(tokens, device)
                                                         if before._text_prefix
                                                         else before.model.encode_text(tokens.to(device))),
                 "text tower, open_clip's encode_text over 77 positions":
                     timed(lambda: before.model.encode_text(tokens.to(device)))}
    if compiled:  # the same tokenizer and word cache without the compiled table: what it saves
        python = copy.copy(scorer.tokenizer)
        python._native = None
        parts["tokenize (host, Python alone)"] = timed(lambda: python(batch_texts))
    row(f"{args.model} score parts", f"{1e3 * args.batch / sum(list(parts.values())[:3]):,.0f} samples/s if serial",
        "ms per batch of " + f"{args.batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    mlp_epilogue_row(scorer, pixels, args.model, args.batch, rounds, timed)
    # The default run's architecture: OpenAI's ViT-B/32 weights run with QuickGELU (fastlaion folds
    # it into one SiLU pass; open_clip's is three elementwise passes), both layer sets.
    import open_clip

    quick = f"{args.model}-quickgelu"
    if quick in open_clip.list_models():
        rates = []
        for open_clip_layers in (False, True):
            scorer = _make_scorer(quick, args.batch, device, open_clip_layers=open_clip_layers)
            scorer.score(pixels, batch_texts)
            rates.append(score_rate(scorer, pixels, batch_texts, rounds, device))
        row(f"{quick} score only", f"{rates[0]:,.0f} samples/s",
            f"the default run's activation (OpenAI's weights), as one SiLU pass: {rates[0] / rates[1]:.2f}x open_clip's "
            f"layers and QuickGELU ({rates[1]:,.0f}/s)")


def mlp_epilogue_row(scorer: Any, pixels: torch.Tensor, model: str, batch: int, rounds: int,
                     timed: Callable[[Callable[[], Any]], float]) -> None:
    """A lever measured, not built: the image tower's 12 MLPs with GELU in the first matrix
    product's epilogue (torch._addmm_activation(use_gelu=True): cuBLASLt's GELU epilogue on CUDA,
    the tanh form) against bias + nn.GELU's own pass (GELU was 2.5 ms of a 21 ms batch in session
    14's profile). Same weights and tokens (one block's, N x 50 x 768); ms for all 12 blocks'
    MLPs, and how far the tanh form moves the output. For models trained with nn.GELU (LAION's
    weights); OpenAI's QuickGELU runs as SiLU, which cuBLASLt has no epilogue for."""
    block = scorer.model.visual.transformer.resblocks[0]
    mlp = getattr(block, "mlp", None)
    fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    if fc is None or proj is None or not hasattr(torch, "_addmm_activation"):
        return
    layers = len(scorer.model.visual.transformer.resblocks)
    with torch.inference_mode():
        grid = scorer.model.visual.grid_size
        x = torch.randn(batch * (1 + grid[0] * grid[1]), fc.in_features, device=pixels.device,
                        dtype=fc.weight.dtype)
        eager = lambda: torch.nn.functional.linear(  # noqa: E731
            torch.nn.functional.gelu(torch.nn.functional.linear(x, fc.weight, fc.bias)), proj.weight, proj.bias)
        fused = lambda: torch.nn.functional.linear(  # noqa: E731
            torch._addmm_activation(fc.bias, x, fc.weight.t(), use_gelu=True), proj.weight, proj.bias)
        gap = float((eager().float() - fused().float()).abs().max())
        scale = float(eager().float().abs().max())
        ms_eager, ms_fused = layers * timed(eager), layers * timed(fused)
    row(f"{model} image MLPs, GELU in the GEMM epilogue", f"{ms_fused:.1f} ms a batch",
        f"bias + GELU pass: {ms_eager:.1f} ms ({ms_eager / ms_fused:.2f}x); {layers} blocks x {x.shape[0]:,} tokens; "
        f"max |difference| {gap:.1e} of outputs up to {scale:.1f} (the epilogue's tanh GELU); not in the scorer")


def _cosine_gap(a: Any, b: Any, pixels: torch.Tensor, texts: list[str]) -> float:
    """The largest difference between two scorers' image-text cosines on one batch."""
    return float(abs(a.score(pixels, texts)[2] - b.score(pixels, texts)[2]).max())


# -- (h) where the towers' device time goes -----------------------------------------------

# Kernel (or, on the CPU, aten op) names -> what they do, first match wins: attention first (cuDNN
# has SDPA kernels), conv before the matrix products (cuDNN's implicit GEMMs).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),  # first: cuDNN's SDPA kernels too
    ("patch embedding (conv)", ("conv", "cudnn", "implicit_gemm", "implicit_convolve")),
    ("matrix products", ("gemm", "cutlass", "cublas", "xmma", "nvjet", "sm90_", "sm80_", "ampere", "hopper",
                         "addmm", "aten::mm", "aten::bmm", "matmul", "scaled_mm")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("copies and casts", ("copy", "memcpy", "memset", "cat", "to_copy", "index", "gather")),
    ("elementwise and reductions", ("elementwise", "vectorized", "unrolled", "reduce", "sigmoid", "gelu", "mul",
                                    "add", "div", "sub", "norm", "sum", "mean", "triton")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in low for m in marks)), "other")


def bench_profile(args: argparse.Namespace, device: torch.device) -> None:
    """One batch of `score` (image and text towers, paired cosine, host copies) under
    torch.profiler: its device time by kind of kernel, the matrix products' TFLOP/s, and the
    kernels that take the most. What the next speed-up of the towers must attack (the GPU check of
    session 10: the eager towers 61 us of device time a sample, 20,000/s leaves 50 in all)."""
    from torch.profiler import ProfilerActivity, profile

    scorer = _make_scorer(args.model, args.batch, device)
    h, w = scorer.clip_spec.size
    pixels = torch.randint(0, 256, (args.batch, h, w, 3), dtype=torch.uint8, device=device)
    texts = make_captions(args.batch)
    for _ in range(2):  # warm: cuBLAS's choices, the tokenizer's cache
        scorer.score(pixels, texts)
    cuda = device.type == "cuda"
    rounds = 3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_flops=True) as prof:
        for _ in range(rounds):
            scorer.score(pixels, texts)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    timed = _profiled(events, cuda, Path(args.out) / "profile_score.txt")
    total = sum(map(_self_us, timed))
    if not total:
        raise RuntimeError("the profiler recorded no kernel time")
    kinds: dict[str, float] = {}
    for e in timed:
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + _self_us(e)
    flops = sum(float(getattr(e, "flops", 0) or 0) for e in events
                if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))
    gemm_us = kinds.get("matrix products", 0.0)
    where = "device" if cuda else "CPU"
    row(f"(h) {args.model} score, {where} time by kind", f"{total / rounds / 1e3:.1f} ms per batch of {args.batch}",
        f"{total / rounds / args.batch:.1f} us a sample; " + ", ".join(
            f"{kind} {100 * us / total:.0f}%" for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]))
        + (f"; matrix products at {flops / (gemm_us * 1e-6) / 1e12:.3g} TFLOP/s" if flops and gemm_us else ""))
    top = sorted(timed, key=_self_us, reverse=True)[:8]
    row(f"(h) {args.model} score, top {where} kernels", f"{100 * sum(map(_self_us, top)) / total:.0f}% of the time",
        "; ".join(f"{e.key[:70]} {_self_us(e) / rounds / 1e3:.2f} ms ({e.count // rounds}x)" for e in top))


def _self_us(e: Any) -> float:
    """An event's own time: on the device for a kernel or copy (torch >= 2.4's name, then the
    older one), else on the CPU."""
    if str(getattr(e, "device_type", "")).endswith("CUDA"):
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
    return float(e.self_cpu_time_total)


def _profiled(events: Any, cuda: bool, table_file: Path) -> list[Any]:
    """A profile's events whose own time counts, its full table written to `table_file` first (it
    is there even when nothing is summed): on a GPU the kernels and copies themselves, not the CPU
    ops that launched them; on the CPU, aten ops' self time (a profiler's overhead is in their
    parents)."""
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    try:
        table = events.table(sort_by=sort_by, row_limit=60)
    except (KeyError, AttributeError, ValueError):  # an older torch's column name
        table = events.table(sort_by="self_cuda_time_total" if cuda else sort_by, row_limit=60)
    table_file.write_text(table)
    if cuda:
        return [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") and _self_us(e) > 0]
    return [e for e in events if e.key.startswith("aten::") and _self_us(e) > 0]


def bench_decode_profile(args: argparse.Namespace, jpegs: list[bytes], device: torch.device) -> None:
    """(i) Four batches of the run's decoder (DALI where it came along), one at a time, under
    torch.profiler: the device time an image takes to decode and resize, and its top kernels and
    copies (DALI's and nvJPEG's run in this process, where CUPTI records them). Four processes are
    held by the GPU (sessions 10-14): the towers take 41 us a sample (h), and this is the other
    part. On the CPU (the dry run) the decoders do their work on the host: the step is walked and
    reports no device time."""
    from torch.profiler import ProfilerActivity, profile

    scorer = _make_scorer(args.model, args.batch, device)
    decoder = _make_decoder(scorer, args.batch, device)
    chunks = [jpegs[i:i + args.batch] for i in range(0, min(len(jpegs), 4 * args.batch), args.batch)]
    cuda = device.type == "cuda"
    with ThreadPoolExecutor(os.cpu_count(), "prepare") as pool:
        def run(chunk: list[bytes]) -> None:
            done = decoder.finish(chunk, list(pool.map(decoder.prepare, chunk)))
            if any(d.error is not None for d in done):
                raise RuntimeError(f"{sum(d.error is not None for d in done)} images did not decode")

        run(chunks[0])  # warm: the decoder's buffers and plans
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for chunk in chunks:
                run(chunk)
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    images = sum(map(len, chunks))
    timed = _profiled(prof.key_averages(), cuda, Path(args.out) / "profile_decode.txt")
    total = sum(map(_self_us, timed))
    label = f"(i) decode ({decoder.name}), device time"
    if not cuda:
        row(label, "none (no GPU)", f"{images:,} images in {wall:.1f} s under the profiler; the table in profile_decode.txt")
        return
    row(label, f"{total / images:.1f} us an image", f"{total / 1e3 / len(chunks):.1f} ms a batch of {args.batch}, "
        f"{images:,} images, one batch at a time, {wall / len(chunks) * 1e3:.1f} ms wall a batch under the profiler")
    top = sorted(timed, key=_self_us, reverse=True)[:8]
    row(f"(i) decode ({decoder.name}), top device kernels", f"{100 * sum(map(_self_us, top)) / max(total, 1e-9):.0f}% of the time",
        "; ".join(f"{e.key[:70]} {_self_us(e) / len(chunks) / 1e3:.2f} ms ({e.count // len(chunks)}x)" for e in top))


def bench_compiled(args: argparse.Namespace, jpegs: list[bytes], device: torch.device) -> None:
    """(f) `--compile`: the towers under torch.compile (fixed shapes), against the eager ones in
    the same call: compile time, score only, decode+score. Not in the default sections (the
    compile takes minutes): GPU_BENCH_SECTIONS=f."""
    texts = make_captions(len(jpegs))
    batch_texts = texts[: args.batch]
    rounds = max(2, len(jpegs) // args.batch)
    pixels = None
    for compiled in (False, True):
        scorer = _make_scorer(args.model, args.batch, device, compile=compiled)
        if pixels is None:  # the same batch for both (the model's input size)
            h, w = scorer.clip_spec.size
            pixels = torch.randint(0, 256, (args.batch, h, w, 3), dtype=torch.uint8, device=device)
        t0 = time.perf_counter()
        scorer.score(pixels, batch_texts)  # the compile, for this caption length
        first = time.perf_counter() - t0
        alone = score_rate(scorer, pixels, batch_texts, rounds, device)
        label = "compiled" if compiled else "eager"
        row(f"{args.model} score only ({label})", f"{alone:,.0f} samples/s",
            f"first batch {first:.1f} s (the compile when compiled); batch {args.batch}, {scorer.dtype}")
        decoder = _make_decoder(scorer, args.batch, device)
        images, captions = jpegs * args.repeat, texts * args.repeat
        decode_and_score(decoder, scorer, images[: 2 * args.batch], captions, args.batch, device)  # warm-up
        t0 = time.perf_counter()
        decode_and_score(decoder, scorer, images, captions, args.batch, device)
        row(f"{args.model} decode+score ({decoder.name}, {label})", f"{len(images) / (time.perf_counter() - t0):,.0f} samples/s",
            f"{len(images):,} samples, batch {args.batch}")


# -- (d) the whole run -----------------------------------------------------------------------

def bench_run(args: argparse.Namespace, jpegs: list[bytes], device: torch.device) -> None:
    """`fastlaion run` over a loopback server, with one worker and with two: on the GPU one worker
    per GPU (the default) and `--workers-per-gpu 2`, whose figure decides that default (#7);
    `args.repeat` times the JPEGs under other URLs, so the work outweighs the start-up. The
    server is a process of its own (bench/pipeline.py's, as the CPU benchmarks serve), so it
    shares no GIL with the bench; each row gives the rate past the models' loading and the
    server's CPU time. The second run is left out when the step's time is nearly spent."""
    import polars as pl
    from pipeline import ServerProcess

    n = len(jpegs) * args.repeat
    where = ["--gpus", "1"] if device.type == "cuda" else ["--device", "cpu"]
    two = ["--workers-per-gpu", "2"] if device.type == "cuda" else ["--processes", "2"]
    # languages as a real run has them (in their own process) when fastText and lid.176 came along
    language = [] if _language_available() else ["--no-language"]
    private = ["--allow-private-networks"] if "--allow-private-networks" in _run_help() else []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for i, body in enumerate(jpegs):
            (images / f"{i:05d}.jpg").write_bytes(body)
        server = ServerProcess(images)
        try:
            inp = Path(tmp) / "in.parquet"
            # each JPEG under args.repeat URLs (the server answers by path; the query makes them differ)
            pl.DataFrame({"url": [f"{server.base_url}/img/{i % len(jpegs):05d}.jpg?copy={i // len(jpegs)}"
                                  for i in range(n)],
                          "caption": make_captions(n)}).write_parquet(inp)
            for i, workers in enumerate(([], two)):
                what = f"fastlaion run {' '.join(where + workers + language)}"
                used = time.perf_counter() - _STARTED
                if i and args.time_limit and used > args.time_limit - 45:
                    row(what, "SKIPPED", f"out of time: {used:.0f} s of the {args.time_limit:.0f} s limit used")
                    continue
                if i and device.type != "cuda":  # what decides --workers-per-gpu; CI's dry run checks one run
                    row(what, "SKIPPED", "dry run: the first run checked the step (tests/test_workers.py runs two processes)")
                    continue
                out = Path(tmp) / f"out{i}"
                cmd = [sys.executable, "-m", "fastlaion.cli", "run", str(inp), "-o", str(out),
                       "--model", args.model, "--pretrained", "none", "--min-similarity", "-1", *language,
                       "--shard-size", str(args.shard_size), "--batch-size", str(args.batch), "--workers", "256",
                       "--no-progress", *where, *workers, *private]
                requests0, server_cpu0 = server.counters()
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                secs = time.perf_counter() - t0
                requests, server_cpu = server.counters()
                (Path(args.out) / f"run{i}_stdout.txt").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
                if proc.returncode != 0:
                    raise RuntimeError(f"fastlaion run exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
                summary = json.loads((out / "summary.json").read_text())
                kept = summary["funnel"]["kept"]
                if kept != n:  # --min-similarity -1 keeps every image that arrives
                    raise RuntimeError(f"only {kept} of {n} kept: {summary['funnel']['drops']}")
                timings = summary["timings_s"]
                stages = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
                # the models load in every worker at once, before the first batch: the rate past them
                past = secs - float(timings.get("load_models", 0.0))
                steady = f"{n / past:,.0f}/s past the models' loading" if past > 0 else "no time past the models' loading"
                row(what, f"{n / secs:,.0f} samples/s",
                    f"{n:,} URLs over loopback, {kept:,} kept, {secs:.1f} s wall incl. start-up ({steady}); "
                    f"the server: {requests - requests0:,} requests, {server_cpu - server_cpu0:.1f} CPU-s; stage s: {stages}")
        finally:
            server.close()


def _language_available() -> bool:
    from fastlaion.config import ConfigError
    from fastlaion.language import bundled_model_path

    try:
        import fasttext  # noqa: F401

        bundled_model_path()
    except (ImportError, ConfigError):
        return False
    return True


def bench_host_ceiling(args: argparse.Namespace, jpegs: list[bytes]) -> None:
    """(g) decode + score with the device's work taken out (bench/host_ceiling.py): how far this
    machine's host side could carry one process, with the stored images encoded on its threads
    and with them made elsewhere (nvImageCodec on the GPU)."""
    from host_ceiling import measure

    jpegs = jpegs[:2048]  # enough for a rate; the section stays short on the GPU machine
    texts = make_captions(len(jpegs))
    for stored, rate, cores, cpu_us, rows in measure(args.model, jpegs, texts, args.batch, ["host", "free"],
                                                      profile=True):
        what = {"host": "stored images encoded on the host's threads",
                "free": "stored images made elsewhere (on the GPU)"}[stored]
        row(f"host ceiling, one process, device free ({what})", f"{rate:,.0f} samples/s",
            f"{cores:.1f} of {os.cpu_count()} cores busy, {cpu_us:.0f} CPU-us per sample; towers return zeros, "
            "decoder pixels made once: a ceiling, not a GPU figure")
        for group, summary in rows:
            row(f"host ceiling ({stored}) profile: {group}", summary, "")


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
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds this run may take (gpu_check.sh gives its step's limit): a section that "
                         "would start with under 60 s left is reported as skipped, so the table still prints")
    args = ap.parse_args()
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --cpu for the dry run")
    args.model = args.model or ("ViT-B-32" if gpu else "fastlaion-tiny")
    args.images = args.images or (4096 if gpu else 32)
    args.batch = args.batch or (512 if gpu else 16)
    args.naive_images = 2048 if gpu else 8
    args.repeat = 4 if gpu else 1  # (c) and (e) decode the JPEGs this many times: seconds, not fractions
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
    wanted = set(os.environ.get("GPU_BENCH_SECTIONS", "a,b,c,d,e,g,h,i").split(","))
    # in order of what #7 needs to know first; (d), the integration check, last
    for key, name, fn in (("a", "(a) kernels", lambda: bench_kernels(args)),
                          ("b", "(b) decoders", lambda: bench_decoders(args, jpegs, device)),
                          ("c", "(c) decode+score", lambda: bench_score(args, jpegs, device)),
                          ("e", "(e) decode+score, several processes",
                           # session 4 measured 2 and 4 (4 the better); 4, with what takes device time off
                           lambda: bench_processes(args, jpegs, device, *process_variants(device))),
                          ("g", "(g) host ceiling (device work free)", lambda: bench_host_ceiling(args, jpegs)),
                          ("d", "(d) fastlaion run", lambda: bench_run(args, jpegs, device)),
                          ("h", "(h) where the towers' time goes (torch.profiler)", lambda: bench_profile(args, device)),
                          ("i", "(i) where the decode's device time goes (torch.profiler)",
                           lambda: bench_decode_profile(args, jpegs, device)),
                          ("f", "(f) compiled towers (--compile)", lambda: bench_compiled(args, jpegs, device))):
        if key not in wanted:
            continue
        used = time.perf_counter() - _STARTED
        if args.time_limit and used > args.time_limit - 60:  # (e) takes up to a minute
            row(name, "SKIPPED", f"out of time: {used:.0f} s of the {args.time_limit:.0f} s limit used")
            continue
        section(name, fn)
        # after each section: a run cut short by its step's timeout still leaves what it measured
        (Path(args.out) / "results.json").write_text(json.dumps({"env": env, "rows": ROWS}, indent=2))

    (Path(args.out) / "results.json").write_text(json.dumps({"env": env, "rows": ROWS}, indent=2))
    title = f"{env['gpu'] or 'CPU dry run'} | torch {env['torch']} | {env['date']}"
    print(f"\n{title}\n| what | figure | note |\n|---|---|---|")
    for what, figure, note in ROWS:
        print(f"| {what} | {figure} | {note} |")
    if any(fig == "FAILED" for _, fig, _ in ROWS):
        sys.exit(1)


if __name__ == "__main__":
    main()
