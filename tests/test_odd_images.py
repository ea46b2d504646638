"""The decoders and a whole run against Pillow's own test images: about a thousand real odd files
(truncated, CMYK, bad EXIF, ICC profiles, APNG, 16-bit, MPO, decompression bombs, and formats
LAION drops), fetched once from the package index (helpers.pillow_test_images).

Every file must end as a decoded image or one of decode.REASONS, in bounded time and memory, with
the reason Pillow's own verdict implies, and pixels where both decode that agree with Pillow (the
library open_clip and img2dataset's peers read images with):

- the CLIP input against open_clip's eval transform on Pillow's full decode, and the stored image
  against Pillow's full decode matted on white (img2dataset's rule), resized and encoded as we
  store it: equal for PNG and WebP (Pillow decodes those for us too, and the geometry is
  open_clip's), and for JPEGs decoded at full scale or by Pillow (CMYK). A JPEG libjpeg-turbo
  decodes at a reduced DCT scale differs by what that scale smooths: bounds 0.03 of mean |diff|
  in [0, 1] for the CLIP input and 9 levels for the stored image, over a measured worst of 0.0225
  and 6.9 (exif-72dpi-int.jpg, a snowfield's fine texture at 5/8; the median of the 22 such
  JPEGs 0.0044 and 1.4).
  A one-pixel misalignment costs a photo 0.01-0.04, which these bounds would not always catch;
  tests/test_decode.py pins the geometry on photographs.

16-bit grey PNGs are the one documented disagreement: Pillow's conversion clips their values to
255 (a photo comes out white); the decoder keeps their top byte.
"""

from __future__ import annotations

import io
import resource
import time
import warnings
from collections import Counter
from urllib.parse import quote

import numpy as np
import polars as pl
import pytest
from PIL import Image
from turbojpeg import TJPF_RGB
from typer.testing import CliRunner

from fastlaion.config import DecodeConfig
from fastlaion.decode import (
    _STORED_SUBSAMPLING,
    REASONS,
    TOO_FEW_BYTES,
    TOO_MANY_PIXELS,
    TRUNCATED,
    UNSUPPORTED_FORMAT,
    ClipInputSpec,
    Decoded,
    Decoder,
    resize_for_storage,
    shared_turbojpeg,
    sniff_format,
)

from helpers import pillow_test_images

# Pillow's own warnings on its odd files (an invalid APNG, a palette's transparency in bytes)
# are what these files are for: expected, not the suite's to report.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

CLIP = ClipInputSpec(size=(224, 224))  # ViT-B-32's, the run's default model
MAX_DECODE_S = 5.0  # per file; the slowest here takes 0.1 s
MAX_PEAK_GROWTH_MIB = 600  # over the whole corpus; one image at LAION's 89.5 Mpx limit is 256 MiB of RGB


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    root = pillow_test_images()
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != "complete"}
    assert len(files) > 1000, f"{root}: {len(files)} files"
    return files


def pillow_verdict(body: bytes) -> Image.Image | str:
    """Pillow's full decode (with its own bomb limit), or its error's type name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(body))
            image.load()
            return image
    except Exception as exc:  # noqa: BLE001 - any refusal is Pillow's verdict
        return type(exc).__name__


def decode_all(decoder, corpus: dict[str, bytes]) -> dict[str, Decoded]:
    """Each body through `decoder`, checking no exception escapes and each takes bounded time."""
    out, slow, crashed = {}, [], []
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, body in corpus.items():
        start = time.perf_counter()
        try:
            out[name] = decoder(body)
        except Exception as exc:  # noqa: BLE001 - collected, so one failure names them all
            crashed.append(f"{name}: {type(exc).__name__}: {exc}")
        if time.perf_counter() - start > MAX_DECODE_S:
            slow.append(name)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib) / 1024
    assert not crashed, crashed
    assert not slow, f"over {MAX_DECODE_S} s each: {slow}"
    assert growth_mib < MAX_PEAK_GROWTH_MIB
    assert {d.error for d in out.values()} <= {None, *REASONS}
    return out


def storage_reference(image: Image.Image, cfg: DecodeConfig) -> np.ndarray:
    """Pillow's decode stored as img2dataset would: transparency matted on white, resized as the
    decoder resizes, encoded as it encodes, decoded back (so the encode's loss is on both sides)."""
    if image.mode.startswith("I"):  # 16-bit grey: the top byte (the documented disagreement)
        grey = np.asarray(image)
        rgba = np.stack([(grey >> 8).astype(np.uint8)] * 3 + [np.full(grey.shape, 255, np.uint8)], axis=-1)
        if isinstance(image.info.get("transparency"), int):
            rgba[..., 3] = np.where(grey == image.info["transparency"], 0, 255)
        image = Image.fromarray(rgba, "RGBA")
    rgba = image.convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    resized = resize_for_storage(rgb, *image.size, cfg.image_size, cfg.resize_mode, cfg.border_fill)
    jpeg = shared_turbojpeg().encode(np.asarray(resized), quality=cfg.jpeg_quality,
                                       pixel_format=TJPF_RGB, jpeg_subsample=_STORED_SUBSAMPLING)
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)


@pytest.fixture
def one_torch_thread():
    """open_clip's transform on these small tensors: 10 ms an op with torch's thread pool on a busy
    box, well under 1 on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_decoder_on_pillows_odd_images(corpus, one_torch_thread):
    open_clip = pytest.importorskip("open_clip")
    to_clip = open_clip.image_transform(CLIP.size[0], is_train=False)
    mean = np.asarray(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = np.asarray(open_clip.OPENAI_DATASET_STD)[:, None, None]

    # The run's default config: LAION's 5000-byte floor settles most of these small files first.
    default = decode_all(Decoder(DecodeConfig(), CLIP), corpus)
    assert {n for n, d in default.items() if d.error == TOO_FEW_BYTES} == \
        {n for n, b in corpus.items() if len(b) < 5000 and sniff_format(b) in ("jpeg", "png", "webp")}
    # Without it, so that every odd file reaches the decoder itself.
    cfg = DecodeConfig(min_image_bytes=0)
    decoder = Decoder(cfg, CLIP)
    decoded = decode_all(decoder, corpus)
    for name, d in decoded.items():
        if default[name].error != TOO_FEW_BYTES:
            assert (d.error, d.width, d.height) == (default[name].error, default[name].width,
                                                    default[name].height), name

    disagree, far = [], []
    for name, d in decoded.items():
        if d.format not in ("jpeg", "png", "webp"):
            assert d.error in ("not_an_image", UNSUPPORTED_FORMAT), name
            continue
        verdict = pillow_verdict(corpus[name])
        if isinstance(verdict, str):  # Pillow refuses: so do we, truncated where it is
            if d.error is None:
                disagree.append(f"{name}: kept, Pillow: {verdict}")
            continue
        if d.error is not None:
            if d.error != TOO_MANY_PIXELS:
                disagree.append(f"{name}: {d.error} ({d.error_detail}), Pillow decodes it")
            continue
        assert (d.width, d.height) == verdict.size, name
        stored = np.asarray(Image.open(io.BytesIO(d.stored)).convert("RGB"), dtype=np.int16)
        stored_diff = np.abs(stored - storage_reference(verdict, cfg)).mean()
        if not verdict.mode.startswith("I"):
            if verdict.mode == "RGB":  # ClipInputSpec.apply is open_clip's transform (test_decode), 10x faster
                reference = CLIP.apply(verdict, *verdict.size).transpose(2, 0, 1) / 255.0
            else:  # open_clip's own: it resizes in the image's mode, then converts to RGB
                reference = to_clip(verdict).numpy() * std + mean  # [0, 1], CHW
            ours = d.clip_input.transpose(2, 0, 1) / 255.0
            clip_diff = np.abs(ours - reference).mean()
        if d.format == "jpeg" and decoder._jpeg_scale(d.width, d.height) != (1, 1) and verdict.mode != "CMYK":
            if clip_diff > 0.03 or stored_diff > 9.0:
                far.append(f"{name}: CLIP input {clip_diff:.4f}, stored {stored_diff:.2f}")
        elif stored_diff > 0 or (not verdict.mode.startswith("I") and clip_diff > 1e-6):
            far.append(f"{name} ({verdict.mode}, {sorted(verdict.info)}): stored {stored_diff:.2f}, "
                       f"CLIP input {clip_diff if not verdict.mode.startswith('I') else '-'}")
    assert not disagree, disagree
    assert not far, "\n".join(far)
    # A few named ones, so that a change in what the corpus holds cannot empty the checks above.
    reasons = {n: d.error for n, d in decoded.items()}
    assert reasons["truncated_jpeg.jpg"] == reasons["truncated_image.png"] == TRUNCATED
    assert reasons["png_decompression_dos.png"] == "decode_error"  # Pillow's text chunk limit
    assert reasons["decompression_bomb.gif"] == UNSUPPORTED_FORMAT
    assert reasons["pil_sample_cmyk.jpg"] is None and reasons["fujifilm.mpo"] is None
    assert Counter(d.format for d in decoded.values() if d.error is None)["jpeg"] >= 50


def test_dali_cpu_decoder_on_pillows_odd_images(corpus):
    """DALI without a GPU, as a run gives it the bodies: prepare() each, finish() per batch of
    256 (--batch-size). Every row ends as the CPU decoder's reason; JPEGs DALI decodes itself come
    out at the CPU's sizes, with pixels within the DCT-scale bound above (it decodes at full
    scale, as Pillow does)."""
    pytest.importorskip("nvidia.dali")
    import torch

    from fastlaion.gpu_decode import make_decoder

    cfg = DecodeConfig(min_image_bytes=0)
    dali = make_decoder("dali", cfg, CLIP, None, torch.device("cpu"), max_batch_size=64)
    cpu = Decoder(cfg, CLIP)
    names, bodies = list(corpus), list(corpus.values())
    prepared = [dali.prepare(body) for body in bodies]
    assert sum(d.pending for d in prepared) >= 50  # the JPEGs DALI takes itself
    finished = []
    for first in range(0, len(bodies), 256):
        start = time.perf_counter()
        finished += dali.finish(bodies[first:first + 256], prepared[first:first + 256])
        assert time.perf_counter() - start < 60
    assert len(finished) == len(bodies)
    far = []
    for name, body, was, d in zip(names, bodies, prepared, finished, strict=True):
        ref = cpu(body)
        assert (d.error, d.width, d.height) == (ref.error, ref.width, ref.height), name
        if d.error is None:
            assert (d.stored_width, d.stored_height) == (ref.stored_width, ref.stored_height), name
            clip_diff = np.abs(np.asarray(d.clip_input, np.float32) - ref.clip_input).mean() / 255
            if clip_diff > (0.03 if was.pending else 0):
                far.append(f"{name}: CLIP input {clip_diff:.4f}")
    assert not far, far


def test_a_run_over_the_whole_corpus(corpus, tmp_path):
    """`fastlaion run --no-score` over a loopback server holding every file: one row per URL,
    kept exactly where the CPU decoder decodes, else dropped with its reason; the funnel adds up.
    --min-image-bytes 0, so that every file reaches the decoder, not LAION's byte floor."""
    from fastlaion.cli import app
    from fastlaion.server import LoopbackServer, Served

    expected = {name: d.error for name, d in ((n, Decoder(DecodeConfig(min_image_bytes=0), None)(b)) for n, b in corpus.items())}
    files = {quote(name): Served(body, "application/octet-stream") for name, body in corpus.items()}
    with LoopbackServer(files) as server:
        urls = [server.url(quote(name)) for name in corpus]
        inp = tmp_path / "urls.parquet"
        pl.DataFrame({"url": urls, "caption": list(corpus)}).write_parquet(inp)
        out = tmp_path / "out"
        result = CliRunner().invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--no-score", "--min-image-bytes", "0",
                                          "--shard-size", "400", "--timeout", "10", "--retries", "0",
                                          "--no-progress"])
    assert result.exit_code == 0, result.output
    table = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))], how="diagonal_relaxed")
    assert table.height == len(corpus) and table["url"].n_unique() == len(corpus)
    got = dict(zip(table["caption"], zip(table["status"], table["stage"], table["reason"])))
    for name, reason in expected.items():
        assert got[name] == (("kept", None, None) if reason is None else ("dropped", "decode", reason)), name
    funnel = __import__("json").loads((out / "summary.json").read_text())["funnel"]
    assert funnel["input"] == len(corpus) == funnel["downloaded"]
    assert funnel["drops"]["decode"] == dict(Counter(r for r in expected.values() if r is not None))
    assert funnel["decoded"] == funnel["kept"] == sum(r is None for r in expected.values())
