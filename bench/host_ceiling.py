#!/usr/bin/env python3
"""How fast can one process's host side go when the GPU is free? decode + score with no device work.

Issue #7 wants 20,000 samples/s of decode + score per GPU; session 4's check found one process
held to ~4,500/s by its own host work (Python under one GIL) with 4 of 16 cores busy. The GPU
test machine is lent rarely, so this measures that host work here, on any machine: the same
`decode_and_score` loop as bench/gpu_bench.py's section (c), the same decoder code around the
device (JPEG header reads in prepare(), finish()'s batching, rows, stored-image encode) and the
same scorer code around the towers (tokenizer, normalisation, paired cosine, copies out), with
the device's own work taken out:

- the decoder's `_decode` hands back pixels made once (no decode or resize: the GPU's part);
- the CLIP towers return zeros at once. Their own host cost on a GPU (the Python of each module
  and the kernel launches, a few ms per batch) is not in the figure: gpu_bench's "score parts"
  measure the towers on the GPU itself. (PyTorch's "meta" device would run their Python without
  arithmetic, but its elementwise ops are themselves Python there, far slower than CUDA's.)
- the CLIP inputs handed over are 1 x 1 pixels: on a GPU they stay on the device, where
  stacking a batch is a device copy, not 77 MB of host memory traffic.

So the figure is a ceiling: what one process could reach if its GPU took no time at all. It is
a stand-in measured with stubs, labelled as such, never a GPU figure; what holds it down shows
in the per-thread profile (bench/sampler.py), and is what to make cheaper for #7.

    .venv/bin/python bench/host_ceiling.py [--images 2048] [--batch 512] [--model ViT-B-32]
                                           [--stored host|free|none] [--repeat 2]

--stored host: the stored 256 px JPEGs encoded on this machine's threads (libjpeg-turbo, as the
GPU decoders do by default); free: taken as made elsewhere (what nvImageCodec on the GPU would
leave to the host: nothing); none: no stored image (--resize-mode no).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import decode_and_score  # noqa: E402
from sampler import Sampler  # noqa: E402
from score import make_captions, make_jpegs  # noqa: E402

from fastlaion.config import DecodeConfig, ResizeMode, ScoreConfig  # noqa: E402
from fastlaion.decode import Decoder  # noqa: E402
from fastlaion.gpu_decode import _DeviceBatchDecoder, _Pixels  # noqa: E402
from fastlaion.score import Scorer  # noqa: E402


class DeviceFreeDecoder(_DeviceBatchDecoder):
    """A GPU decoder's host work, its device work done in no time: `_decode` returns the batch's
    CLIP inputs and stored images from pixels made once by the CPU decoder."""

    name = "device-free"

    def __init__(self, cfg: DecodeConfig, clip: Any, samples: list[Any], stored: str, **kwargs: Any):
        super().__init__(cfg, clip, None, torch.device("cpu"), **kwargs)
        self._clip = torch.zeros((self.max_batch_size, 1, 1, 3), dtype=torch.uint8)  # see the module's note
        self._stored = None
        self._jpegs = None
        if stored != "none":
            decoded = [np.asarray(_rgb(d.stored)) for d in samples]
            shape = decoded[0].shape
            same = [a for a in decoded if a.shape == shape]
            self._stored = torch.from_numpy(np.stack([same[i % len(same)] for i in range(self.max_batch_size)]))
        if stored == "free":
            self._jpegs = [d.stored for d in samples]

    def _decode(self, bodies: list[bytes], sizes: list[tuple[int, int]]) -> _Pixels:
        n = len(bodies)
        return _Pixels(list(range(n)), self._clip[:n], None, None if self._stored is None else self._stored[:n])

    def _encode_stored(self, images: Any) -> list[bytes]:
        if self._jpegs is not None:  # made on the device: nothing for the host to do
            return [self._jpegs[i % len(self._jpegs)] for i in range(len(images))]
        return super()._encode_stored(images)


def _rgb(jpeg: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def free_towers(scorer: Scorer) -> Scorer:
    """`scorer` with towers that cost nothing: zeros of the embeddings' shape. Everything else in
    `score` runs as it is (tokenizer, paired cosine, normalisation, copies out)."""
    dim, dtype = scorer.embed_dim, scorer.dtype
    scorer._image_tower = lambda x: torch.zeros(len(x), dim, dtype=dtype)  # type: ignore[method-assign]
    scorer._text_prefix = None
    scorer.model.encode_text = lambda tokens: torch.zeros(len(tokens), dim, dtype=dtype)
    return scorer


def measure(model: str, jpegs: list[bytes], texts: list[str], batch: int, stored_modes: list[str],
            repeat: int = 2, profile: bool = True) -> list[tuple[str, float, float, float, list[tuple[str, str]]]]:
    """(stored mode, samples/s, cores busy, CPU-us per sample, host profile rows) per mode."""
    scorer = free_towers(Scorer(ScoreConfig(model=model, pretrained="none", batch_size=batch, device="cpu"),
                                torch.device("cpu")))
    samples = [Decoder(DecodeConfig(), scorer.clip_spec)(b) for b in jpegs[:64]]
    cpu = torch.device("cpu")
    out = []
    for stored in stored_modes:
        cfg = DecodeConfig(resize_mode=ResizeMode.no if stored == "none" else ResizeMode.border)
        decoder = DeviceFreeDecoder(cfg, scorer.clip_spec, samples, stored, max_batch_size=batch)
        images, captions = jpegs * repeat, texts * repeat
        decode_and_score(decoder, scorer, images[: 2 * batch], captions, batch, cpu)  # warm-up
        t0, cpu0 = time.perf_counter(), time.process_time()
        decode_and_score(decoder, scorer, images, captions, batch, cpu)
        secs, used = time.perf_counter() - t0, time.process_time() - cpu0
        rows: list[tuple[str, str]] = []
        if profile:
            with Sampler() as sampled:
                decode_and_score(decoder, scorer, images, captions, batch, cpu)
            rows = list(sampled.report())
        out.append((stored, len(images) / secs, used / secs, 1e6 * used / len(images), rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--stored", choices=["host", "free", "none"], action="append",
                    help="stored-image variants to run, in turn (default: host, free, none)")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the images per measurement")
    ap.add_argument("--no-profile", action="store_true", help="skip the sampled run")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    jpegs = make_jpegs(args.images)
    texts = make_captions(len(jpegs))
    print(f"{args.model}'s tokenizer and scorer with free towers; {len(jpegs):,} JPEGs, "
          f"mean {sum(map(len, jpegs)) / len(jpegs) / 1e3:.0f} KB; batch {args.batch}, {args.repeat} passes")
    for stored, rate, cores, cpu_us, rows in measure(args.model, jpegs, texts, args.batch,
                                                      args.stored or ["host", "free", "none"], args.repeat,
                                                      not args.no_profile):
        print(f"| stored image: {stored} | {rate:,.0f} samples/s | {cores:.2f} of {os.cpu_count()} cores busy; "
              f"{cpu_us:.0f} CPU-us per sample |", flush=True)
        for group, summary in rows:
            print(f"    {group}: {summary}")


if __name__ == "__main__":
    main()
