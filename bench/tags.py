#!/usr/bin/env python3
"""The tag stage's heads against LAION's own scripts, in one process, rounds of the two sides alternated.

    .venv/bin/python bench/tags.py            # full sizes (about 4-5 minutes on the busy 2-core dev box)
    .venv/bin/python bench/tags.py --quick    # dry run, small sizes, 1 round (tests/test_bench.py; 10-30 s here)

Heads on CLIP image embeddings: each side gets the same (N, D) float16 L2-normalised embeddings,
as the scorer hands them to the tag stage, in batches of --batch (256, the run's).

punsafe       fastlaion: Tagger.on_embeddings with only the NSFW head (fastlaion.heads.NsfwHead, LAION's
              nsfw_head_vit_b_32.pth). Peer: clip-retrieval's way, `safety_model.predict(emb)` of the
              Keras model per batch, written out in numpy float32 as Keras computes it (Normalization
              (x - mean) / max(sqrt(var), eps), Dense + ReLU, Dense + ReLU, Dense + sigmoid).
aesthetic     fastlaion: Tagger.on_embeddings with only the V1 head (aesthetic_v1_vit_b_32_linear.pth).
              Peer: LAION's aesthetic-predictor example, torch float32: `x /= x.norm(dim=-1,
              keepdim=True)`, then its nn.Linear(512, 1), under no_grad.
aesthetic_v2  fastlaion: Tagger.on_embeddings with only the V2 MLP, 768-d. Peer: improved-aesthetic-
              predictor's simple_inference, numpy `normalized()` (np.linalg.norm) then its MLP in torch
              float32. No V2 weights are here: random weights, saved once and loaded by both sides.
embedding heads  punsafe + aesthetic together: one Tagger.on_embeddings (what a run with OpenAI
              ViT-B/32 calls per batch) against the two peers one after the other.

The watermark detector (LAION-5B-WatermarkDetection: timm efficientnet_b3 with LAION's 2-class
head, 256x256, ImageNet normalisation, pwatermark = softmax[:, 0]) on real photographs (score.py's
JPEGs, 300-800 px). Its real weights cannot be downloaded here: random weights, with BatchNorm's
statistics calibrated on the bench's own photographs and its last layer scaled (an uncalibrated random EfficientNet gives one
pwatermark for every image); the arithmetic is the real network's, the values mean nothing.

watermark input   Peer: per image `Image.open(bytes).convert("RGB")` and torchvision's
              Compose([Resize((256, 256)), ToTensor(), Normalize(ImageNet)]), as the detector's
              script does (its stacking into a batch is in the model row), on one torch thread as in
              the DataLoader worker it ran in. fastlaion, two rows:
              (a) "alone": a Decoder that makes only the watermark input (DecodeConfig(resize_mode=no),
              no CLIP spec, 256: libjpeg-turbo at a DCT scale covering 256 px, Pillow bilinear squash
              to uint8): decode + resize like the peer's; (b) "in the run's decode": what the run
              pays for it, the run's Decoder (stored 256 px border JPEG + 224 px CLIP input + the
              watermark input) less the same Decoder without the watermark input, timed in the same
              alternated rounds (the decode itself is shared with the CLIP input, so it is not paid
              twice). One thread each, as one decode thread runs.
watermark model   Peer: torch.stack of the transformed tensors (NCHW float32), model.eval() under
              no_grad, softmax, [:, 0]. fastlaion: np.stack of the decoder's uint8 (N, 256, 256, 3)
              pixels (pipeline.stack_pixels) and Tagger.on_pixels (WatermarkDetector: permute,
              normalise, model under inference_mode, softmax). Batches of --wm-batch on both sides.
pwatermark        (b) + model against the peer's transform + model, per image.
watermark bf16    not a peer: fastlaion's detector with its network (weights and input) in bfloat16
              (WatermarkDetector's dtype) against the float32 one a run uses, same pixels, batches of
              --wm-batch, at the run's torch threads and on one; before it, how far bfloat16 moves
              pwatermark (max, mean), how many images cross LAION's 0.8, and the same for the float32
              network on its input rounded to bfloat16 (how sensitive the network itself is: a random
              one is far more than a trained one). With --watermark-weights (LAION's real file) these
              figures are the real detector's.
tag stage         embedding heads + pwatermark, per image (one embedding per image), from the rows above.

Agreement first: punsafe, aesthetic and aesthetic_v2 on float32 embeddings (where renormalising is
a no-op) to float tolerance, and on the float16 ones (the peers renormalise them: the difference is
printed); pwatermark of fastlaion's detector on the peer's own resized pixels to float tolerance;
then how far the decoder's 256 px pixels are from the peer's Resize (levels, 0-255) and how far
that moves pwatermark (against its spread over the images). A mismatch stops the script.

torch runs with os.cpu_count() threads, as a one-worker CPU run sets them (workers.serve_shards:
torch.set_num_threads(cfg.decode.threads), a worker's share of the cores). Every figure is the total
over the rounds (alternated: ours, theirs, theirs, ours, ...; for the heads on embeddings, whose
batches take a millisecond or less, batch by batch); the ratio is the figure to quote. The two heads
together are timed again with torch on one thread: on a busy machine torch's intra-op pool waits for a
core at every operation, which is most of their time (see bench/RESULTS.md).
Where fastlaion is slower, one more round of its side runs under cProfile and the top is printed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # this checkout's fastlaion, whatever the venv has installed
import stages as st  # noqa: E402  alternate, record, profile, the table

MODELS = REPO.parent / "shared" / "data" / "models"  # LAION's heads, read in place (never copied)
NSFW_B32 = MODELS / "nsfw_head_vit_b_32.pth"
AESTHETIC_B32 = MODELS / "aesthetic_v1_vit_b_32_linear.pth"
RATINGS = MODELS / "aesthetic_v1_rating_embeddings"
WM_SIZE = 256
WATERMARK_FLAG = 0.8  # LAION-5B calls an image watermarked above 0.8 (../shared/docs/LAION.md; subsets keep < 0.8)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

log = st.log


# -- data ------------------------------------------------------------------------------------

def embeddings(model: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the 10 real rating embeddings of `model` ('vit_b_32' | 'vit_l_14'), float32 (10, D);
    n embeddings around them, L2-normalised float16 (n, D), as the scorer hands them on):
    random mixtures of the real ones plus noise, so that they lie where CLIP's do."""
    real = np.concatenate([np.load(RATINGS / f"{model}_rating{r}.npy").reshape(1, -1) for r in range(10)])
    real = (real / np.linalg.norm(real, axis=1, keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(seed)
    mixed = rng.dirichlet(np.full(10, 0.3), n).astype(np.float32) @ real
    mixed += rng.standard_normal(mixed.shape).astype(np.float32) * (0.3 / np.sqrt(real.shape[1]))
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    return real, mixed.astype(np.float16)


def batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


# -- the peers, written as LAION's scripts wrote them ----------------------------------------

class KerasNsfw:
    """clip-retrieval's `safety_model.predict(embeddings)`: the autokeras model's layers in numpy
    float32 (Keras' Normalization divides by max(sqrt(variance), epsilon))."""

    def __init__(self, state: dict[str, Any]):
        self.mean = state["norm.mean"].numpy().astype(np.float32)
        self.std = np.maximum(np.sqrt(state["norm.variance"].numpy().astype(np.float32)), 1e-7)
        n = len([k for k in state if k.startswith("linear_") and k.endswith(".weight")])
        self.dense = [(state[f"linear_{i}.weight"].numpy().T.copy(), state[f"linear_{i}.bias"].numpy())
                      for i in range(1, n + 1)]

    def predict(self, emb: np.ndarray) -> np.ndarray:
        x = (emb - self.mean) / self.std
        for w, b in self.dense[:-1]:
            x = np.maximum(x @ w + b, 0)
        w, b = self.dense[-1]
        with np.errstate(over="ignore"):  # exp(-x) of a large negative logit: inf, sigmoid 0
            return (1 / (1 + np.exp(-(x @ w + b))))[:, 0]


def nsfw_peer(model: KerasNsfw, batch: np.ndarray) -> np.ndarray:
    return model.predict(batch.astype(np.float32))


def aesthetic_peer(linear: Any, batch: np.ndarray) -> np.ndarray:
    """LAION aesthetic-predictor's example: normalise, then the linear head, in torch float32."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(batch).float()
        x /= x.norm(dim=-1, keepdim=True)
        return linear(x).numpy()[:, 0]


def normalized(a: np.ndarray, axis: int = -1, order: int = 2) -> np.ndarray:
    """improved-aesthetic-predictor's numpy L2 normalisation."""
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def aesthetic_v2_peer(mlp: Any, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return mlp(torch.from_numpy(normalized(batch.astype(np.float32))).float()).numpy()[:, 0]


def peer_mlp(embed_dim: int) -> Any:
    """improved-aesthetic-predictor's MLP class (its `layers`, so its state dict keys)."""
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x: Any) -> Any:
            return self.layers(x)

    return MLP()


def peer_watermark_model() -> Any:
    """LAION-5B-WatermarkDetection's model: timm's efficientnet_b3(a) and its classifier."""
    import timm
    from torch import nn

    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(in_features=1536, out_features=625), nn.ReLU(), nn.Dropout(p=0.3),
        nn.Linear(in_features=625, out_features=256), nn.ReLU(), nn.Linear(in_features=256, out_features=2))
    return model


def peer_transform() -> Any:
    from torchvision import transforms as T

    return T.Compose([T.Resize((WM_SIZE, WM_SIZE)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# -- sections --------------------------------------------------------------------------------

def tagger(embed_dim: int | None, **heads: str | None) -> Any:
    """A Tagger as a run builds it, with only `heads` (TagConfig fields) set; no language."""
    from fastlaion.config import ScoreConfig, TagConfig
    from fastlaion.tags import Tagger

    import torch

    cfg = TagConfig(language=False, **{"nsfw_head": None, "aesthetic_v1": None, **heads})
    return Tagger(cfg, ScoreConfig(), embed_dim, torch.device("cpu"))


def alternate_batches(tg: Any, peer_fns: list[Any], chunks: list[np.ndarray],
                      rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """stages.alternate at the grain of one batch: a batch takes a millisecond or less, and on a
    shared machine one descheduled moment costs as much, so the sides take turns batch by batch
    (ours, theirs, theirs, ours, ...) and see the same load. Wall and CPU seconds per side."""
    wall = {"fastlaion": 0.0, "peer": 0.0}
    cpu = dict(wall)

    def ours(chunk: np.ndarray) -> None:
        tg.on_embeddings(chunk)

    def theirs(chunk: np.ndarray) -> None:
        for fn in peer_fns:
            fn(chunk)

    sides = [("fastlaion", ours), ("peer", theirs)]
    k = 0
    for _ in range(rounds):
        for chunk in chunks:
            for name, fn in sides if k % 2 == 0 else sides[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                fn(chunk)
                wall[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
            k += 1
    return wall, cpu


def check_close(what: str, ours: np.ndarray, theirs: np.ndarray, tol: float) -> float:
    diff = float(np.abs(ours.astype(np.float64) - theirs).max())
    if not diff <= tol:
        raise SystemExit(f"{what}: fastlaion and its peer differ by {diff:.3g} (> {tol:g})")
    return diff


def embedding_section(args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """The heads on embeddings; returns seconds per embedding of both sides for the two heads a
    run with OpenAI ViT-B/32 computes together ({"fastlaion": s, "peer": s})."""
    import torch

    log(f"\n## heads on CLIP image embeddings ({st.load()})")
    real_b, emb_b = embeddings("vit_b_32", args.embeddings, 0)
    real_l, emb_l = embeddings("vit_l_14", args.embeddings, 1)
    log(f"  {args.embeddings:,} embeddings a round, float16, L2-normalised, batches of {args.batch}: 512-d around "
        f"LAION's 10 real ViT-B/32 rating embeddings, 768-d around the 10 ViT-L/14 ones")

    nsfw_tagger = tagger(512, nsfw_head=str(NSFW_B32))
    v1_tagger = tagger(512, aesthetic_v1=str(AESTHETIC_B32))
    both_tagger = tagger(512, nsfw_head=str(NSFW_B32), aesthetic_v1=str(AESTHETIC_B32))
    torch.manual_seed(2)
    mlp = peer_mlp(768).eval()
    v2_path = scratch / "aesthetic_v2_random.pth"
    torch.save(mlp.state_dict(), v2_path)  # random weights, the same file for both sides
    v2_tagger = tagger(768, aesthetic_v2=str(v2_path))

    keras = KerasNsfw(torch.load(NSFW_B32, weights_only=True))
    linear = torch.nn.Linear(512, 1)
    linear.load_state_dict(torch.load(AESTHETIC_B32, weights_only=True))
    linear.eval()

    # agreement: float32 (renormalising is a no-op there) to float tolerance, then float16
    scores = v1_tagger.on_embeddings(real_b)["aesthetic"]
    if not np.all(np.diff(scores) > 0):
        raise SystemExit(f"the V1 head does not score LAION's rating embeddings 0..9 in order: {scores}")
    f32_b, f32_l = emb_b.astype(np.float32), emb_l.astype(np.float32)
    f32_b /= np.linalg.norm(f32_b, axis=1, keepdims=True)
    f32_l /= np.linalg.norm(f32_l, axis=1, keepdims=True)
    pairs = [("punsafe", nsfw_tagger, lambda b: nsfw_peer(keras, b), f32_b, emb_b, 1e-5),
             ("aesthetic", v1_tagger, lambda b: aesthetic_peer(linear, b), f32_b, emb_b, 1e-4),
             ("aesthetic_v2", v2_tagger, lambda b: aesthetic_v2_peer(mlp, b), f32_l, emb_l, 1e-4)]
    for column, tg, peer, f32, f16, tol in pairs:
        exact = check_close(f"{column} (float32)", tg.on_embeddings(f32)[column], peer(f32), tol)
        a, b = tg.on_embeddings(f16)[column], peer(f16)
        log(f"  agreement, {column}: max |fastlaion - peer| {exact:.2g} on float32 embeddings (bound {tol:g}); "
            f"{np.abs(a - b).max():.2g} on the float16 ones, which the peer renormalises (values "
            f"{b.min():.3f}..{b.max():.3f})")
    log(f"  the V1 head scores LAION's rating-0..9 embeddings {', '.join(f'{s:.2f}' for s in scores)}: in order")

    out: dict[str, float] = {}
    n = args.embeddings * args.rounds
    rows = [("punsafe", "NSFW head", nsfw_tagger, [lambda b: nsfw_peer(keras, b)], emb_b,
             "clip-retrieval's Keras predict (numpy float32)"),
            ("aesthetic", "aesthetic V1 head", v1_tagger, [lambda b: aesthetic_peer(linear, b)], emb_b,
             "aesthetic-predictor (torch float32)"),
            ("aesthetic_v2", "aesthetic V2 MLP, random weights, 768-d", v2_tagger,
             [lambda b: aesthetic_v2_peer(mlp, b)], emb_l, "improved-aesthetic-predictor (numpy + torch)"),
            ("embedding heads", "punsafe + aesthetic, one on_embeddings", both_tagger,
             [lambda b: nsfw_peer(keras, b), lambda b: aesthetic_peer(linear, b)], emb_b, "the two peers above")]
    for stage, what, tg, peer_fns, data, peer_name in rows:
        chunks = batches(data, args.batch)

        def ours(tg: Any = tg, chunks: list[np.ndarray] = chunks) -> None:
            for chunk in chunks:
                tg.on_embeddings(chunk)

        def theirs(peer_fns: list[Any] = peer_fns, chunks: list[np.ndarray] = chunks) -> None:
            for chunk in chunks:
                for fn in peer_fns:
                    fn(chunk)

        ours()
        theirs()  # warm-up
        wall, cpu = alternate_batches(tg, peer_fns, chunks, args.rounds)
        rate = {k: n / v for k, v in wall.items()}
        st.record(stage, f"{what}, {args.embeddings:,} x {args.rounds} embeddings", rate["fastlaion"], peer_name,
                  rate["peer"], "emb/s", cpu["peer"] / cpu["fastlaion"],
                  slow_profile=lambda ours=ours, stage=stage: st.profile(stage, ours))
        if stage == "embedding heads":
            out = {**{k: v / n for k, v in wall.items()}, **{f"cpu_{k}": v / n for k, v in cpu.items()}}
            # the same with torch on one thread: how much of the above is torch's intra-op pool
            # waiting for a core (the peer's numpy uses OpenBLAS's own threads, which this leaves alone)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                wall, cpu = alternate_batches(tg, peer_fns, chunks, args.rounds)
            finally:
                torch.set_num_threads(threads)
            st.record(stage, f"{what}, torch on 1 thread (not the run's setting)", n / wall["fastlaion"], peer_name,
                      n / wall["peer"], "emb/s", cpu["peer"] / cpu["fastlaion"])
    log(f"  ({st.load()})")
    return out


def calibrated_watermark_state(images: list[Any], transform: Any) -> dict[str, Any]:
    """A random-weight detector whose BatchNorm statistics are those of the photographs' own
    activations (one pass in train mode, cumulative averages), so its output depends on the
    image as a trained network's does, and whose last layer is rescaled so that its logit
    difference has mean 0 and standard deviation 2 over them (pwatermark spread over ~0.1-0.9,
    as a trained detector's, rather than 0.50 +- 0.001): the state dict both sides load."""
    import torch

    torch.manual_seed(0)
    model = peer_watermark_model()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    x = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        model(x)
        model.eval()
        last = model.classifier[-1]
        seen: list[Any] = []
        hook = last.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
        model(x)
        hook.remove()
        w, b = last.weight[0] - last.weight[1], last.bias[0] - last.bias[1]
        d = seen[0] @ w + b
        scale = 2 / d.std().clamp_min(1e-12)
        last.weight.copy_(torch.stack([w * scale, torch.zeros_like(w)]))
        last.bias.copy_(torch.stack([(b - d.mean()) * scale, torch.zeros_like(b)]))
    return model.state_dict()


def watermark_section(args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """The watermark detector; returns seconds per image ({"fastlaion": s, "peer": s}) of the
    whole pwatermark (fastlaion: its share of the run's decode + the model)."""
    import torch
    from PIL import Image
    from score import make_jpegs

    from fastlaion.config import DecodeConfig, ResizeMode
    from fastlaion.decode import ClipInputSpec, Decoder
    from fastlaion.heads import sha256_file
    from fastlaion.pipeline import stack_pixels

    log(f"\n## watermark detector ({st.load()})")
    jpegs = make_jpegs(max(args.decode_images, args.images))
    kb = sum(map(len, jpegs)) / len(jpegs) / 1e3
    data = f"{len(jpegs)} JPEGs, 300-800 px, {kb:.0f} KB avg"
    log(f"  {data} for the decode rows, the first {args.images} of them for the model's, in batches of "
        f"{args.wm_batch}; torch threads {torch.get_num_threads()}")
    transform = peer_transform()
    originals = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs[:max(16, args.images)]]
    if args.watermark_weights:
        wm_path = Path(args.watermark_weights)
    else:
        # calibrated on 16 images (--quick: its 8) whatever --images is: on 2 the logit scale is a guess
        state = calibrated_watermark_state(originals[:16], transform)
        wm_path = scratch / "watermark_random.pth"
        torch.save(state, wm_path)
    originals = originals[:args.images]
    tg = tagger(None, watermark_model=str(wm_path))
    peer_model = peer_watermark_model()
    peer_model.load_state_dict(torch.load(wm_path, weights_only=True))
    peer_model.eval()
    if args.watermark_weights:
        log(f"  weights: {wm_path} (sha256 {sha256_file(wm_path)[:16]}...)")
    else:
        log("  random weights (LAION's cannot be downloaded here), BatchNorm statistics calibrated on these "
            "photographs: the arithmetic is the real network's, the pwatermark values mean nothing")

    alone = Decoder(DecodeConfig(resize_mode=ResizeMode.no), None, WM_SIZE)
    clip = ClipInputSpec((224, 224))
    run_with = Decoder(DecodeConfig(), clip, WM_SIZE)
    run_without = Decoder(DecodeConfig(), clip, None)

    def peer_pixels(jpegs: list[bytes] = jpegs) -> list[Any]:
        # on one torch thread, as in the DataLoader workers LAION's script decodes in (PyTorch sets
        # each worker's threads to 1): Normalize's torch ops would otherwise wait for a second core
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [transform(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
        finally:
            torch.set_num_threads(threads)

    def peer_model_pass(tensors: list[Any]) -> np.ndarray:
        out = []
        for i in range(0, len(tensors), args.wm_batch):
            with torch.no_grad():
                logits = peer_model(torch.stack(tensors[i:i + args.wm_batch]))
                out.append(torch.nn.functional.softmax(logits, dim=1)[:, 0].numpy())
        return np.concatenate(out)

    def ours_model_pass(pixels: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([tg.on_pixels(stack_pixels(pixels[i:i + args.wm_batch]))["pwatermark"]
                               for i in range(0, len(pixels), args.wm_batch)])

    # agreement. 1: the same pixels (the peer's own Resize output as uint8) give the same pwatermark
    resized = [transform.transforms[0](im) for im in originals]
    same_pixels = [np.asarray(im) for im in resized]
    theirs_p = peer_model_pass(peer_pixels(jpegs[:args.images]))
    exact = check_close("pwatermark on the same pixels", ours_model_pass(same_pixels), theirs_p, 1e-4)
    # 2: the decoder's pixels against Resize's, and what that does to pwatermark
    model_jpegs = jpegs[:args.images]
    decoded = {"alone": [alone(j) for j in model_jpegs], "in the run's decode": [run_with(j) for j in model_jpegs]}
    spread = float(theirs_p.max() - theirs_p.min())
    log(f"  agreement: fastlaion's detector on the peer's own resized pixels: max |diff| {exact:.2g} (bound 1e-4: channels_last against NCHW sums in another order); "
        f"peer's pwatermark over the images {theirs_p.min():.4f}..{theirs_p.max():.4f} (spread {spread:.4f})")
    for name, ds in decoded.items():
        if any(d.error is not None or d.watermark_input.shape != (WM_SIZE, WM_SIZE, 3) for d in ds):
            raise SystemExit(f"the decoder ({name}) rejected a JPEG or made no {WM_SIZE} px watermark input")
        levels = np.array([np.abs(d.watermark_input.astype(np.int16) - np.asarray(r, np.int16)).mean()
                           for d, r in zip(ds, resized)])
        pw = ours_model_pass([d.watermark_input for d in ds])
        moved = np.abs(pw.astype(np.float64) - theirs_p)
        log(f"  decoder's pixels, {name}: mean |fastlaion - Resize((256, 256))| {levels.mean():.2f} levels (0-255; per "
            f"image {levels.min():.2f}-{levels.max():.2f}); pwatermark moves by {moved.mean():.2g} on average, "
            f"{moved.max():.2g} at most ({moved.max() / spread if spread else 0:.1%} of the spread over the images)")
        if levels.mean() > 2.0:  # DCT scaling and rounding only: measured 0.5-1 (see RESULTS.md)
            raise SystemExit(f"the decoder's watermark input ({name}) is {levels.mean():.2f} levels from Resize's")
    x = torch.from_numpy(stack_pixels([d.watermark_input for d in decoded["alone"][:2]])).permute(0, 3, 1, 2).float()
    log(f"  memory format into the network: fastlaion's permuted uint8 -> float is channels_last "
        f"({x.is_contiguous(memory_format=torch.channels_last)}), the peer's torch.stack of ToTensor() is NCHW "
        f"({torch.stack(peer_pixels(jpegs[:2])).is_contiguous()})")

    n = len(jpegs) * args.rounds

    def ours_alone() -> None:
        [alone(j) for j in jpegs]

    def ours_with() -> None:
        [run_with(j) for j in jpegs]

    def ours_without() -> None:
        [run_without(j) for j in jpegs]

    def theirs_pixels() -> None:
        peer_pixels()

    ours_alone(), ours_with(), ours_without(), theirs_pixels()  # warm-up
    wall, cpu = st.alternate({"alone": ours_alone, "peer": theirs_pixels, "with": ours_with,
                              "without": ours_without}, args.rounds)
    extra_wall, extra_cpu = wall["with"] - wall["without"], cpu["with"] - cpu["without"]
    log(f"  decode, 1 thread: alone {n / wall['alone']:,.1f} img/s, run's decoder with the watermark input "
        f"{n / wall['with']:,.1f} img/s, without {n / wall['without']:,.1f} img/s: the watermark input costs it "
        f"{1e3 * extra_wall / n:.2f} ms an image ({1e3 * extra_cpu / n:.2f} CPU-ms); peer {n / wall['peer']:,.1f} img/s")
    if extra_wall <= 0 or extra_cpu <= 0:  # a few images (--quick) on a busy machine: noise
        log("  the run's decoder was no faster without the watermark input: its extra cost is within noise here, "
            "taken as 0 below; use more --images and --rounds for the figure")
        extra_wall, extra_cpu = max(extra_wall, 0.0), max(extra_cpu, 0.0)
    st.record("watermark input", f"{data}, decode + squash alone, 1 thread", n / wall["alone"],
              "PIL open + Resize + ToTensor + Normalize", n / wall["peer"], "img/s", cpu["peer"] / cpu["alone"],
              slow_profile=lambda: st.profile("watermark input, alone", ours_alone))
    if extra_wall > 0 and extra_cpu > 0:
        st.record("watermark input", f"{data}, its extra cost in the run's decode, 1 thread", n / extra_wall,
                  "PIL open + Resize + ToTensor + Normalize", n / wall["peer"], "img/s", cpu["peer"] / extra_cpu)

    ours_px = [d.watermark_input for d in decoded["in the run's decode"]]
    theirs_px = peer_pixels(model_jpegs)
    model_sides = {"fastlaion": lambda: ours_model_pass(ours_px), "peer": lambda: peer_model_pass(theirs_px)}
    mwall, mcpu = st.alternate(model_sides, args.rounds)
    m = len(model_jpegs) * args.rounds
    st.record("watermark model", f"{len(model_jpegs)} images, batches of {args.wm_batch}", m / mwall["fastlaion"],
              "torch.stack + model + softmax", m / mwall["peer"], "img/s", mcpu["peer"] / mcpu["fastlaion"],
              slow_profile=lambda: st.profile("watermark model", model_sides["fastlaion"]))
    watermark_precision(args, tg.watermark, wm_path, ours_px)
    per_image = {"fastlaion": extra_wall / n + mwall["fastlaion"] / m, "peer": wall["peer"] / n + mwall["peer"] / m,
                 "cpu_fastlaion": extra_cpu / n + mcpu["fastlaion"] / m, "cpu_peer": cpu["peer"] / n + mcpu["peer"] / m}
    st.record("pwatermark", "input (its extra cost in the run's decode) + model, per image", 1 / per_image["fastlaion"],
              "LAION-5B-WatermarkDetection's loop", 1 / per_image["peer"], "img/s",
              per_image["cpu_peer"] / per_image["cpu_fastlaion"])
    log(f"  ({st.load()})")
    return per_image


def watermark_precision(args: argparse.Namespace, fp32: Any, wm_path: Path, pixels: list[np.ndarray]) -> None:
    """The detector in bfloat16 against `fp32`, the run's float32 one, on the same uint8 pixels:
    pwatermark's differences first, then the speed (alternated rounds, the run's torch threads,
    then one thread, the steadier comparison on a shared machine)."""
    import torch

    from fastlaion.heads import WatermarkDetector
    from fastlaion.pipeline import stack_pixels
    from fastlaion.score import cpu_has_amx

    bf16 = WatermarkDetector.load(str(wm_path), torch.device("cpu"), dtype=torch.bfloat16)
    chunks = [torch.from_numpy(stack_pixels(pixels[i:i + args.wm_batch])) for i in range(0, len(pixels), args.wm_batch)]

    def run(det: Any) -> np.ndarray:
        return np.concatenate([det(c).numpy() for c in chunks]).astype(np.float64)

    @torch.inference_mode()
    def rounded_input(c: Any) -> np.ndarray:  # fp32's own arithmetic on an input rounded as bf16's is
        x = c.permute(0, 3, 1, 2).float().div_(255).sub_(fp32.mean).div_(fp32.std)
        return torch.softmax(fp32.model(x.to(torch.bfloat16).float()), dim=1)[:, 0].numpy()

    ref = run(fp32)
    for what, p in (("bfloat16 network (weights + input)", run(bf16)),
                    ("float32 network, its input rounded to bfloat16",
                     np.concatenate([rounded_input(c) for c in chunks]).astype(np.float64))):
        d = np.abs(p - ref)
        flips = int(((p > WATERMARK_FLAG) != (ref > WATERMARK_FLAG)).sum())
        log(f"  pwatermark, {what}: max |diff| {d.max():.3g}, mean {d.mean():.3g} against float32's over "
            f"{len(ref)} images ({ref.min():.3f}..{ref.max():.3f}, {(ref > WATERMARK_FLAG).sum()} above "
            f"{WATERMARK_FLAG}); {flips} cross {WATERMARK_FLAG}")
    sides = {"bf16": lambda: run(bf16), "fp32": lambda: run(fp32)}
    n = len(pixels) * args.rounds
    data = f"{len(pixels)} images, batches of {args.wm_batch}, weights + input in bfloat16 (AMX: {cpu_has_amx()})"
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):  # once where torch has one thread
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            run(bf16)  # oneDNN's bfloat16 kernels are made on first use
            wall, cpu = st.alternate(sides, args.rounds)
        finally:
            torch.set_num_threads(before)
        st.record("watermark bf16", data + ("" if threads == before else ", torch on 1 thread"), n / wall["bf16"],
                  "the run's float32 detector", n / wall["fp32"], "img/s", cpu["fp32"] / cpu["bf16"])


# -- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a dry run: small sizes, 1 round")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per side (default 4; --quick 1)")
    ap.add_argument("--embeddings", type=int, default=0, help="embeddings a round (default 25,600; --quick 1,024)")
    ap.add_argument("--images", type=int, default=0, help="JPEGs through the watermark model (default 32; --quick 2)")
    ap.add_argument("--decode-images", type=int, default=0, help="JPEGs for the decode rows (default 256; --quick 8)")
    ap.add_argument("--batch", type=int, default=256, help="embeddings per batch (the run's --batch-size default)")
    ap.add_argument("--wm-batch", type=int, default=0, help="images per batch for the watermark model (default 32; --quick 2)")
    ap.add_argument("--scratch", default="/tmp", help="folder for the random-weight files (deleted at the end)")
    ap.add_argument("--only", choices=["heads", "watermark"], help="run only the heads on embeddings, or only the "
                    "watermark detector (no tag stage row then)")
    ap.add_argument("--watermark-weights", help="LAION's watermark detector weights (a state dict file) instead of the "
                    "calibrated random ones: the watermark rows, bf16's pwatermark differences above all, become the real detector's")
    ap.add_argument("--profile", action="store_true", help="a cProfile of fastlaion's side for every row")
    args = ap.parse_args(argv)
    st.PROFILE_ALL = args.profile
    q = args.quick
    args.rounds = args.rounds or (1 if q else 4)
    args.embeddings = args.embeddings or (1_024 if q else 25_600)
    args.images = args.images or (2 if q else 32)
    args.decode_images = args.decode_images or (8 if q else 256)
    args.wm_batch = args.wm_batch or (2 if q else 32)
    for path in (NSFW_B32, AESTHETIC_B32, RATINGS):
        if not path.exists():
            raise SystemExit(f"{path}: missing (LAION's heads are read from ../shared/data/models)")

    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # a one-worker CPU run's share: all cores
    st.log_setting(f"torch {torch.__version__}")
    log(f"{st.load()} before; {args.rounds} rounds a side, alternated; torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    os.makedirs(args.scratch, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tags-bench-", dir=args.scratch) as tmp:
        heads = embedding_section(args, Path(tmp)) if args.only in (None, "heads") else None
        wm = watermark_section(args, Path(tmp)) if args.only in (None, "watermark") else None
    if heads and wm:
        ours_s, theirs_s = heads["fastlaion"] + wm["fastlaion"], heads["peer"] + wm["peer"]
        log(f"\n## tag stage per image: punsafe + aesthetic ({1e6 * heads['fastlaion']:.1f} / {1e6 * heads['peer']:.1f} "
            f"us) + pwatermark ({1e3 * wm['fastlaion']:.1f} / {1e3 * wm['peer']:.1f} ms), fastlaion / peer")
        st.record("tag stage", "punsafe + aesthetic + pwatermark, per image (the rows above)", 1 / ours_s,
                  "LAION's scripts", 1 / theirs_s, "img/s",
                  (heads["cpu_peer"] + wm["cpu_peer"]) / (heads["cpu_fastlaion"] + wm["cpu_fastlaion"]))
    log(f"\n{st.load()} after; {time.perf_counter() - t0:.0f} s in all")
    log("\n| stage | data | fastlaion | peer | peer's figure | fastlaion / peer | by CPU time |")
    log("|---|---|---|---|---|---|---|")
    for stage, data, ours, peer, theirs, ratio, by_cpu in st.TABLE:
        log(f"| {stage} | {data} | {ours} | {peer} | {theirs} | {ratio:.2f}x | {by_cpu} |")
    if st.SLOWER:
        log(f"\nfastlaion is SLOWER than its peer on: {'; '.join(st.SLOWER)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
