"""Decode + CLIP score: fastlaion's path against a naive open_clip loop, same images, same weights.

    .venv/bin/python bench/score.py                       # CPU: tiny and ViT-B-32 (random weights)
    .venv/bin/python bench/score.py --device cuda --models ViT-B-32 --images 4096

fastlaion: libjpeg-turbo scaled decode to the model's input in a thread pool (one per core),
batched image and text towers in --precision auto's choice (bf16 on a CPU with AMX, else fp32;
fp16 on CUDA; the table also gives fastlaion in the naive loop's precision), paired cosine.
Peers, as clip-retrieval-style scripts do it: Pillow decode + open_clip's `preprocess` +
the model, (a) one sample at a time, (b) in batches of --batch-size.
Random weights: the arithmetic is that of the real model, the scores mean nothing.
Captions: a mix of lengths (CAPTION_WORDS); further tables time the tokenizer and the text tower alone.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from fastlaion.score import pick_precision

WORDS = ("a photo of the cat dog red blue house car tree sky man woman beautiful vintage poster art print "
         "sale new old wooden table coffee cup astronaut rocket launch pad street city night view").split()
# Caption lengths in words, cycled: short alts to long descriptions, the longest over the 77-token
# context (open_clip truncates it). A stand-in mix, median 12 words; the text tower's cost follows
# the lengths, so the `text` table below gives each length apart.
CAPTION_WORDS = (3, 5, 8, 10, 12, 12, 16, 20, 30, 80)


def make_captions(n: int, words: tuple[int, ...] = CAPTION_WORDS, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words[i % len(words)])) for i in range(n)]


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """LAION-like JPEGs: real photographs (scikit-image's) cropped and resized to 300-800 px."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
    out = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = img.size
        x0, y0 = rng.integers(0, w // 4), rng.integers(0, h // 4)
        img = img.crop((x0, y0, w - rng.integers(0, w // 4), h - rng.integers(0, h // 4)))
        side = int(rng.integers(300, 800))
        scale = side / max(img.size)
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
        out.append(buf.getvalue())
    return out


def fastlaion_path(model_name: str, jpegs: list[bytes], texts: list[str], device: torch.device, batch: int,
                   precision: str = "auto") -> float:
    from fastlaion.config import DecodeConfig, ResizeMode, ScoreConfig
    from fastlaion.decode import Decoder
    from fastlaion.score import Scorer

    torch.manual_seed(0)
    scorer = Scorer(ScoreConfig(model=model_name, pretrained="none", precision=precision), device)
    decoder = Decoder(DecodeConfig(resize_mode=ResizeMode.no), scorer.clip_spec)
    scorer.score(np.zeros((2, *scorer.clip_spec.size, 3), np.uint8), texts[:2])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for start in range(0, len(jpegs), batch):
            decoded = list(pool.map(decoder, jpegs[start:start + batch]))
            pixels = np.stack([d.clip_input for d in decoded])
            scorer.score(pixels, texts[start:start + batch])
    _sync(device)
    return len(jpegs) / (time.perf_counter() - t0)


# A clip-retrieval-style script's precision: fp16 on CUDA (its autocast), fp32 on the CPU.
NAIVE_PRECISION = {"cuda": "fp16", "cpu": "fp32"}


def naive_path(model_name: str, jpegs: list[bytes], texts: list[str], device: torch.device, batch: int) -> float:
    """Pillow + open_clip's preprocess + the model; batch=1 is the one-at-a-time loop."""
    import open_clip

    from fastlaion.score import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    precision = NAIVE_PRECISION[device.type]
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, precision=precision, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(jpegs), batch):
            imgs = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs[start:start + batch]])
            i = model.encode_image(imgs.to(device, dtype))
            t = model.encode_text(tokenizer(texts[start:start + batch]).to(device))
            torch.nn.functional.cosine_similarity(i.float(), t.float()).cpu()
    _sync(device)
    return len(jpegs) / (time.perf_counter() - t0)


def text_tower(scorer, device: torch.device, batch: int, words: int, rounds: int) -> tuple[int, float, float]:
    """Captions/s of the text tower alone, tokens made once: open_clip's encode_text over all 77
    positions against fastlaion's encoder of the positions each caption uses, same weights, same
    captions of `words` words. Returns (tokens used by the longest caption, ours, open_clip)."""
    tokens = scorer.tokenizer(make_captions(batch, (words,)))
    prefix = scorer._text_prefix
    used = int(prefix.ends(tokens).max()) + 1 if prefix is not None else tokens.shape[1]
    on_device = tokens.to(device)

    @torch.inference_mode()
    def theirs() -> None:
        scorer.model.encode_text(on_device)

    @torch.inference_mode()
    def ours() -> None:
        prefix.encode(tokens, device) if prefix is not None else scorer.model.encode_text(on_device)

    spent = {theirs: 0.0, ours: 0.0}
    for fn in spent:  # warm-up
        fn()
    for r in range(rounds):  # alternated, so a change in the machine's speed hits both alike
        for fn in (theirs, ours) if r % 2 == 0 else (ours, theirs):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            spent[fn] += time.perf_counter() - t0
    return used, rounds * batch / spent[ours], rounds * batch / spent[theirs]


def tokenizer_rates(n: int = 4096, rounds: int = 5) -> list[tuple[str, float, float, float]]:
    """Captions/s on one core (best of `rounds`, alternated) of fastlaion's tokenizer with its
    compiled word table, of the same without it (Python alone) and of open_clip's; same ids
    checked, on ASCII captions, on captions with accented words and on ASCII ones with curly quotes
    (open_clip runs ftfy on the last two; fastlaion skips it where fastlaion.textfix shows it
    would change nothing, or only straighten the quotes)."""
    import copy

    import open_clip

    from fastlaion.score import CachedClipTokenizer

    accented = [f"{c} caf\u00e9 cr\u00e8me br\u00fbl\u00e9e" for c in make_captions(n, seed=1)]
    quoted = [f"it\u2019s {c} \u201cnew\u201d" for c in make_captions(n, seed=3)]  # English with curly quotes
    rows = []
    for what, texts in (("ASCII", make_captions(n)), ("accented", accented), ("curly quotes", quoted)):
        theirs, ours = open_clip.get_tokenizer("ViT-B-32"), CachedClipTokenizer.wrap(open_clip.get_tokenizer("ViT-B-32"))
        if not torch.equal(ours(texts), theirs(texts)):
            raise SystemExit(f"tokenizers disagree on the {what} captions")
        if ours._native is None:
            print("  (no compiled tokenizer here: its column is the Python path's)")
        python = copy.copy(ours)
        python._native = None  # the same warm word cache, without the compiled table
        best = {t: 0.0 for t in (ours, python, theirs)}
        for _ in range(rounds):  # the check above warmed every cache
            for tokenizer in best:
                t0 = time.process_time()
                tokenizer(texts)
                best[tokenizer] = max(best[tokenizer], n / max(time.process_time() - t0, 1e-9))
        rows.append((what, *best.values()))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def repeated_captions(n: int, share: float, seed: int = 0) -> list[str]:
    """n captions of the bench's mixed lengths, of which about `share` repeat an earlier one of
    the batch (as a page's alt text repeats over its images), in shuffled order."""
    rng = np.random.default_rng(seed)
    distinct = make_captions(max(1, round(n * (1 - share))), seed=seed)
    texts = distinct + [distinct[i] for i in rng.integers(0, len(distinct), n - len(distinct))]
    return [texts[i] for i in rng.permutation(n)]


def repeated_text(scorer, device: torch.device, batch: int, share: float, rounds: int) -> tuple[int, float, float, float]:
    """Captions/s of tokenizer + text tower on a batch where `share` of the captions repeat:
    Scorer.text_features (each caption once), the same without that (_text_tower on every row)
    and open_clip's tokenizer + encode_text. Returns (distinct captions, ours, ours without, open_clip)."""
    texts = repeated_captions(batch, share)
    open_clip_tokenizer = getattr(scorer.tokenizer, "tokenizer", scorer.tokenizer)  # under fastlaion's cache

    @torch.inference_mode()
    def theirs() -> None:
        scorer.model.encode_text(open_clip_tokenizer(texts).to(device))

    @torch.inference_mode()
    def every_row() -> None:
        scorer._text_tower(texts)

    def ours() -> None:
        scorer.text_features(texts)

    spent = {theirs: 0.0, every_row: 0.0, ours: 0.0}
    for fn in spent:  # warm-up
        fn()
    for r in range(rounds):  # rotated, so a change in the machine's speed hits all alike
        order = list(spent)[r % 3:] + list(spent)[:r % 3]
        for fn in order:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            spent[fn] += time.perf_counter() - t0
    return len(set(texts)), rounds * batch / spent[ours], rounds * batch / spent[every_row], rounds * batch / spent[theirs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", nargs="+", default=["fastlaion-tiny", "ViT-B-32"])
    ap.add_argument("--images", type=int, default=0, help="images per model (default: 1024 tiny, 192 others on CPU)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--text-words", type=int, nargs="*", default=[5, 10, 20, 40, 80],
                    help="caption lengths (words) for the text-tower table; none to skip it")
    ap.add_argument("--text-rounds", type=int, default=0, help="batches per text measurement (default: 3 CPU, 20 CUDA)")
    ap.add_argument("--text-only", action="store_true", help="only the text tables (skip decode + score and the tokenizer)")
    ap.add_argument("--repeat-shares", type=float, nargs="*", default=[0.0, 0.25, 0.5],
                    help="shares of a batch's captions that repeat another, for the repeated-captions table; none to skip it")
    ap.add_argument("--precisions", nargs="*", default=["fp32", "bf16", "fp16"],
                    help="precisions for the precision table (the first is the reference); none to skip it")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    print(f"machine: {platform.node()} {os.cpu_count()} cores, torch {torch.__version__} "
          f"threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit "
          + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    if not args.text_only:
        decode_and_score_tables(args, device)
    rounds = args.text_rounds or (20 if device.type == "cuda" else 3)
    if args.text_words:
        text_tower_table(args, device, rounds)
    packing_table(args, device, rounds)
    if args.repeat_shares:
        repeated_table(args, device, rounds)
    if args.precisions:
        precision_table(args, device, max(rounds, 3))


def decode_and_score_tables(args: argparse.Namespace, device: torch.device) -> None:
    rows = []
    for name in args.models:
        n = args.images or (1024 if name == "fastlaion-tiny" or device.type == "cuda" else 192)
        jpegs = make_jpegs(n)
        texts = make_captions(n)
        ours = fastlaion_path(name, jpegs, texts, device, args.batch_size)
        same = fastlaion_path(name, jpegs, texts, device, args.batch_size, NAIVE_PRECISION[device.type]) \
            if pick_precision("auto", device) != NAIVE_PRECISION[device.type] else ours
        one = naive_path(name, jpegs[: max(32, n // 4)], texts, device, 1)
        batched = naive_path(name, jpegs, texts, device, args.batch_size)
        rows.append((name, n, ours, same, one, batched))
    auto, theirs = pick_precision("auto", device), NAIVE_PRECISION[device.type]
    print(f"\nfastlaion in its default precision here ({auto}) and in the naive loop's ({theirs})")
    print(f"| model (random weights) | images | fastlaion samples/s ({auto}) | fastlaion ({theirs}) | naive 1-at-a-time "
          f"| naive batched ({args.batch_size}) | vs 1-at-a-time | vs batched | {theirs} vs batched |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, ours, same, one, batched in rows:
        print(f"| {name} | {n} | {ours:,.1f} | {same:,.1f} | {one:,.1f} | {batched:,.1f} | {ours / one:.2f}x "
              f"| {ours / batched:.2f}x | {same / batched:.2f}x |")
    print("\ntokenizer, one core, 4,096 captions, best of 5 (same ids checked): fastlaion's tokenizer (compiled word "
          "table; Python alone) vs open_clip's")
    print("| captions | fastlaion captions/s | Python alone | open_clip captions/s | ratio | Python alone vs open_clip |")
    print("|---|---|---|---|---|---|")
    for what, ours, python, theirs in tokenizer_rates():
        print(f"| {what} | {ours:,.0f} | {python:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x | {python / theirs:.2f}x |")


def text_tower_table(args: argparse.Namespace, device: torch.device, rounds: int) -> None:
    from fastlaion.config import ScoreConfig
    from fastlaion.score import Scorer

    print(f"\ntext tower alone, batches of {args.batch_size}, {rounds} batches per figure: open_clip's encode_text "
          "(77 positions) vs fastlaion's (the positions the captions use)")
    print("| model (random weights) | caption words | tokens used (max) | fastlaion captions/s | open_clip captions/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        scorer = Scorer(ScoreConfig(model=name, pretrained="none"), device)
        for words in args.text_words:
            used, ours, theirs = text_tower(scorer, device, args.batch_size, words, rounds)
            print(f"| {name} | {words} | {used} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.2f}x |")


def packing_table(args: argparse.Namespace, device: torch.device, rounds: int) -> None:
    """The text tower's ways on captions of the bench's mixed lengths (one in ten runs to 77
    tokens, most use 10-20): packed (the Scorer's way), length buckets, one pass cut to the longest
    caption, open_clip's encode_text; rounds alternated, in rotating order."""
    from fastlaion.config import ScoreConfig
    from fastlaion.score import Scorer

    print(f"\ntext tower on mixed-length captions, batches of {args.batch_size}, {rounds} batches per figure "
          "(captions/s; same weights, same captions)")
    print("| model (random weights) | positions used / one pass's | packed | length buckets | one pass | open_clip "
          "| packed vs buckets | vs one pass | vs open_clip |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        scorer = Scorer(ScoreConfig(model=name, pretrained="none"), device)
        prefix = scorer._text_prefix
        if prefix is None or not prefix.causal_blocks:
            print(f"| {name} | (no prefix encoder: open_clip's encode_text) | | | | | | | |")
            continue
        tokens = scorer.tokenizer(make_captions(args.batch_size))
        used = prefix.ends(tokens) + 1
        on_device = tokens.to(device)
        ways = {"packed": lambda: prefix.encode_packed(tokens, device),
                "buckets": lambda: prefix.encode_buckets(tokens, device),
                "one pass": lambda: prefix.encode_one_pass(tokens, device),
                "open_clip": lambda: scorer.model.encode_text(on_device)}
        spent = dict.fromkeys(ways, 0.0)
        with torch.inference_mode():
            for fn in ways.values():  # warm-up
                fn()
            order = list(ways)
            for r in range(rounds):
                for way in order[r % len(order):] + order[:r % len(order)]:
                    _sync(device)
                    t0 = time.perf_counter()
                    ways[way]()
                    _sync(device)
                    spent[way] += time.perf_counter() - t0
        rate = {way: rounds * args.batch_size / s for way, s in spent.items()}
        share = float(used.sum()) / (len(used) * int(used.max()))
        print(f"| {name} | {share:.0%} | {rate['packed']:,.1f} | {rate['buckets']:,.1f} | {rate['one pass']:,.1f} "
              f"| {rate['open_clip']:,.1f} | {rate['packed'] / rate['buckets']:.2f}x | "
              f"{rate['packed'] / rate['one pass']:.2f}x | {rate['packed'] / rate['open_clip']:.2f}x |")


def repeated_table(args: argparse.Namespace, device: torch.device, rounds: int) -> None:
    from fastlaion.config import ScoreConfig
    from fastlaion.score import Scorer

    print(f"\ncaptions repeated within a batch (mixed lengths), batches of {args.batch_size}, {rounds} batches per "
          "figure: tokenizer + text tower, fastlaion (each caption once) vs fastlaion on every row vs open_clip")
    print("| model (random weights) | repeated share | distinct captions | fastlaion captions/s | every row | open_clip "
          "| vs every row | vs open_clip |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        scorer = Scorer(ScoreConfig(model=name, pretrained="none"), device)
        for share in args.repeat_shares:
            distinct, ours, every, theirs = repeated_text(scorer, device, args.batch_size, share, rounds)
            print(f"| {name} | {share:.0%} | {distinct} | {ours:,.1f} | {every:,.1f} | {theirs:,.1f} | {ours / every:.2f}x "
                  f"| {ours / theirs:.2f}x |")


def precision_table(args: argparse.Namespace, device: torch.device, rounds: int) -> None:
    """Scorer.score on the same decoded images and captions in each of --precisions, same weights:
    samples/s (rounds alternated, in rotating order) and how far each precision's similarities and
    embeddings are from the first's (the reference, fp32)."""
    from fastlaion.config import DecodeConfig, ResizeMode, ScoreConfig
    from fastlaion.decode import Decoder
    from fastlaion.score import Scorer

    batch = args.batch_size
    print(f"\nScorer.score in each precision, batches of {batch}, {rounds} batches per figure (decoded pixels made "
          f"once; auto here is {pick_precision('auto', device)}); differences against {args.precisions[0]}")
    print(f"| model (random weights) | precision | samples/s | vs {args.precisions[0]} | similarity max / mean abs "
          "difference | embeddings' least cosine (image, text) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        scorers = {}
        for precision in args.precisions:
            torch.manual_seed(0)
            scorers[precision] = Scorer(ScoreConfig(model=name, pretrained="none", precision=precision), device)
        spec = next(iter(scorers.values())).clip_spec
        decoder = Decoder(DecodeConfig(resize_mode=ResizeMode.no), spec)
        pixels = np.stack([decoder(j).clip_input for j in make_jpegs(batch)])
        texts = make_captions(batch)
        out = {p: s.score(pixels, texts) for p, s in scorers.items()}  # also the warm-up
        spent = dict.fromkeys(scorers, 0.0)
        order = list(scorers)
        for r in range(rounds):
            for p in order[r % len(order):] + order[:r % len(order)]:
                _sync(device)
                t0 = time.perf_counter()
                scorers[p].score(pixels, texts)
                _sync(device)
                spent[p] += time.perf_counter() - t0
        ref_img, ref_txt, ref_sim = out[order[0]]
        for p in order:
            img, txt, sim = out[p]
            diff = np.abs(sim - ref_sim)
            least = [float(np.min(_cosines(a, b))) for a, b in ((img, ref_img), (txt, ref_txt))]
            rate = rounds * batch / spent[p]
            print(f"| {name} | {p} | {rate:,.1f} | {spent[order[0]] / spent[p]:.2f}x | {diff.max():.5f} / "
                  f"{diff.mean():.5f} | {least[0]:.5f}, {least[1]:.5f} |")



def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row, of two (N, D) arrays of embeddings (float16: unit length only up to rounding)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


if __name__ == "__main__":
    main()
