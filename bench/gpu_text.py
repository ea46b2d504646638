"""Where the scorer's time goes, text side first: a short GPU check (one call, about a minute).

    python bench/gpu_text.py            # CUDA if there is one (ViT-B-32), else the CPU (fastlaion-tiny)

Prints ms per batch of 512 mixed-length captions (bench/score.py's) for: the tokenizer, open_clip's
encode_text over all 77 positions, fastlaion's PrefixTextEncoder (length buckets) with its causal
attention blocks and through open_clip's own blocks, one pass cut to the batch's longest caption, the
captions packed (the Scorer's default),
the image tower, and Scorer.score() whole; and whether torch's fused attention ("fast path") ran.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import make_captions  # noqa: E402  (bench/score.py)


def timed(device: torch.device, fn: Callable[[], Any], rounds: int = 10) -> float:
    """Median ms of fn over `rounds` (after 2 warm-up calls), device work included."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def fast_path_calls(fn: Callable[[], Any]) -> int:
    """How many times torch's fused multi-head attention ran during fn()."""
    calls = 0
    original = torch._native_multi_head_attention

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    torch._native_multi_head_attention = counting
    try:
        fn()
    finally:
        torch._native_multi_head_attention = original
    return calls


def main() -> None:
    from fastlaion.config import ScoreConfig
    from fastlaion.score import Scorer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_name = "ViT-B-32" if device.type == "cuda" else "fastlaion-tiny"
    batch = 512
    torch.manual_seed(0)
    scorer = Scorer(ScoreConfig(model=model_name, pretrained="none", batch_size=batch), device)
    model, prefix = scorer.model, scorer._text_prefix
    texts = make_captions(batch)
    tokens = scorer.tokenizer(texts)
    ends = prefix.ends(tokens)
    print(f"{model_name} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, batch {batch}")
    print("caption lengths (tokens incl. start and end): median", int(ends.median()) + 1, "max", int(ends.max()) + 1,
          "| per bucket:", {b: int(((ends < b) & (ends >= s)).sum()) for s, b in zip((0, *prefix.BUCKETS),
                                                                                  (*prefix.BUCKETS, 77))})
    on_device = tokens.to(device)
    def through_open_clips_blocks() -> torch.Tensor:  # the buckets before the causal blocks
        causal, prefix.causal_blocks = prefix.causal_blocks, False
        try:
            return prefix.encode_buckets(tokens, device)
        finally:
            prefix.causal_blocks = causal

    pixels = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=device)
    rows: list[tuple[str, Callable[[], Any]]] = [
        ("tokenize (host)", lambda: scorer.tokenizer(texts)),
        ("text: open_clip encode_text, 77 positions", lambda: model.encode_text(on_device)),
        ("text: length buckets, causal attention", lambda: prefix.encode_buckets(tokens, device)),
        ("text: length buckets through open_clip's blocks", through_open_clips_blocks),
        ("text: one pass cut to the longest caption", lambda: prefix.encode_one_pass(tokens, device)),
        ("text: packed, attention per length group", lambda: prefix.encode_packed(tokens, device)),
        ("text: Scorer's choice here", lambda: prefix.encode(tokens, device)),
        ("image tower", lambda: scorer.image_features(pixels)),
        ("Scorer.score() whole", lambda: scorer.score(pixels, texts)),
    ]
    with torch.inference_mode():
        reference = model.encode_text(on_device).float()
        for name, fn in rows:
            ms = timed(device, fn)
            calls = fast_path_calls(fn) if name.startswith("text") or name == "image tower" else None
            extra = ""
            if name.startswith("text"):
                got = fn().float()
                cos = torch.nn.functional.cosine_similarity(got, reference, dim=1).min().item()
                extra = f"; min cosine to encode_text {cos:.5f}"
            print(f"  {name:45s} {ms:8.2f} ms/batch  {batch / ms * 1e3:10,.0f}/s"
                  + (f"  fused attention calls {calls}" if calls is not None else "") + extra, flush=True)


if __name__ == "__main__":
    main()
