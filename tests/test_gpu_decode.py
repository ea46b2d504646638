"""Tests for fastlaion.gpu_decode: every batch decoder against the CPU Decoder, the reference.

All of it runs on the CPU (nvjpeg and dali have CPU modes that run every line but the device);
the same comparisons on CUDA carry the `gpu` marker and skip without a GPU.

Tolerances (`Tolerance`), in uint8 levels of |ours - reference|, measured on scikit-image's
photos and on the generated stand-ins (worst seen in brackets, CPU device):

- Against the CPU Decoder. It decodes a JPEG at the smallest DCT scale that covers its outputs
  (3/4 for a 451x300 photo and a 224 px CLIP input) and resizes that with Pillow; the batch
  decoders decode at full size and resample with antialiasing. The DCT scaling alone moves the
  CPU's CLIP input 3.2 levels on average from Pillow's transform of a full-size decode (chelsea,
  border mode), which is why the bound is not tighter:
  CLIP input mean <= 3.5 [3.2], p99 <= 20 [18]; watermark input mean <= 1.5 [1.2], p99 <= 10 [7];
  stored image (both JPEGs decoded back) mean <= 5.0 [4.3], p99 <= 35 [28]: the q95 re-encode and
  Pillow BOX/Lanczos against torch's antialiased bicubic (DALI: cubic/Lanczos3) add to the DCT
  scaling. Maxima are not bounded there: at a sharp edge a sub-pixel shift reaches 90+ levels.
- Against Pillow's transform of a full-size libjpeg decode (the CPU path's own ClipInputSpec.apply
  without DCT scaling), the tight check that torch and DALI reproduce Pillow's filters and the
  geometry: CLIP input mean <= 0.35 [0.22], p99 <= 2 [1], max <= 20 [15, a hard edge enlarged
  5x]; watermark input mean <= 0.35 [0.19], p99 <= 3 [2].
- Geometry alone (crops and pads, no resampling): identical pixels on the CPU, where all three
  decode with libjpeg-turbo and get bit-identical pixels.
- Sizes, formats, reasons, row order: exactly equal, always.

On CUDA (measured on an H200, torch 2.11, torchvision 0.26, DALI 2.4) the bounds against the CPU
decoder hold unchanged (worst: CLIP 3.2, watermark 0.9, stored 4.4 / p99 28). nvJPEG's own IDCT
and chroma upsampling show against full-size Pillow: CLIP input mean 0.88, p99 6, max 24;
watermark 0.68 / p99 4; DALI (fancy upsampling on) stays at the CPU figures. The cuda row of
TOLERANCES loosens only those, and geometry to mean <= 1.5 (luma of the stored image: nvJPEG
encodes 4:4:4, libjpeg-turbo 4:2:0).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
import torch
import turbojpeg
from PIL import Image

from fastlaion.config import ConfigError, DecodeConfig, ResizeMode
from fastlaion.decode import ClipInputSpec, Decoded, Decoder, shared_turbojpeg
from fastlaion.gpu_decode import (BatchDecoder, Window, available_decoders, clip_window, clip_windows,
                                  dali_importable, jpeg_has_eoi_after_scan, make_decoder, nvimgcodec_importable,
                                  stored_window, stored_windows)

CPU = torch.device("cpu")
CLIP = ClipInputSpec(size=(224, 224))
WATERMARK_PX = 64
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_dali = pytest.mark.skipif(not dali_importable(), reason="nvidia.dali is not installed")
DEVICES = [pytest.param(CPU, id="cpu"),
           pytest.param(torch.device("cuda"), id="cuda", marks=[pytest.mark.gpu, needs_cuda])]
DECODERS = ["cpu", "nvjpeg", pytest.param("dali", marks=needs_dali)]
GPU_DECODERS = ["nvjpeg", pytest.param("dali", marks=needs_dali)]


@dataclass(frozen=True)
class Tolerance:
    """Bounds on |ours - reference| in uint8 levels (see the module docstring)."""

    clip_mean: float = 3.5
    clip_p99: float = 20
    watermark_mean: float = 1.5
    watermark_p99: float = 10
    stored_mean: float = 5.0
    stored_p99: float = 35
    full_clip_mean: float = 0.35  # vs Pillow on a full-size decode
    full_clip_p99: float = 2
    full_clip_max: float = 20
    full_watermark_mean: float = 0.35
    full_watermark_p99: float = 3
    geometry_mean: float = 0.0  # no resampling: same decoder, same pixels


TOLERANCES = {"cpu": Tolerance(),
              "cuda": Tolerance(full_clip_mean=1.2, full_clip_p99=8, full_clip_max=40, full_watermark_mean=1.0,
                                full_watermark_p99=6, geometry_mean=1.5)}


# -- test images -----------------------------------------------------------------------------

def synthetic_photo(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth colour fields, hard-edged shapes and fine texture. Stands in
    for scikit-image's photos where that is not installed (the GPU machine)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    image = np.stack([128 + 90 * np.sin(5 * x + 3 * y + 2 * c + seed) for c in range(3)], axis=-1)
    coarse = rng.integers(0, 256, (height // 6 + 2, width // 6 + 2, 3), dtype=np.uint8)
    image += 0.35 * (np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)) - 128.0)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        image[y0:y0 + height // 5, x0:x0 + width // 4] = rng.integers(0, 256, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_images(request: pytest.FixtureRequest) -> list[Image.Image]:
    """scikit-image's four photos (tests/conftest.py), or synthetic ones of the same sizes."""
    if importlib.util.find_spec("skimage") is not None:
        return [Image.fromarray(a) for a in request.getfixturevalue("photos").values()]
    sizes = ((451, 300), (600, 400), (512, 512), (640, 427))
    return [Image.fromarray(synthetic_photo(w, h, seed)) for seed, (w, h) in enumerate(sizes)]


def jpeg(image: Image.Image, quality: int = 90, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, **options)
    return buf.getvalue()


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_cases(photo_images: list[Image.Image]) -> dict[str, bytes]:
    """Real photos plus odd sizes, grey, tiny, extreme aspect ratios, a large one (deep DCT
    scaling on the CPU), progressive, 4:4:4, and one whose EXIF says to rotate it."""
    chelsea, coffee, astronaut, rocket = photo_images
    big = chelsea.resize((chelsea.width * 3, chelsea.height * 3), Image.Resampling.LANCZOS)  # 1353x900
    wide = coffee.resize((1800, 1200), Image.Resampling.LANCZOS)
    return {
        **{f"photo{i}_{im.width}x{im.height}": jpeg(im) for i, im in enumerate(photo_images)},
        "odd_301x199": jpeg(coffee.crop((3, 5, 304, 204))),
        "grey": jpeg(astronaut.convert("L")),
        "tiny_37x23": jpeg(chelsea.resize((37, 23), Image.Resampling.BOX)),
        "strip_1800x40": jpeg(wide.crop((0, 500, 1800, 540))),
        "tall_31x1281": jpeg(big.crop((700, 0, 731, 900)).resize((31, 1281))),
        "large_1353x900": jpeg(big),
        "progressive": jpeg(rocket, progressive=True),
        "subsampling_444": jpeg(coffee, subsampling=0),
        "exif_rotated": jpeg(coffee, exif=exif_orientation(6)),  # not applied (fastlaion.decode's docstring)
    }


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation; 6: the camera was turned 90 degrees clockwise
    return exif.tobytes()


# -- helpers ---------------------------------------------------------------------------------

def run_batch(decoder: BatchDecoder, bodies: list[bytes]) -> tuple[list[Decoded], list[Decoded]]:
    """prepare() from a thread pool, as the pipeline calls it, then finish() once."""
    with ThreadPoolExecutor(4) as pool:
        prepared = list(pool.map(decoder.prepare, bodies))
    return prepared, decoder.finish(bodies, prepared)


def pixels(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.cpu().numpy()
    return np.asarray(array, dtype=np.int16)


def stored_pixels(d: Decoded) -> np.ndarray:
    image = Image.open(io.BytesIO(d.stored))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (d.stored_width, d.stored_height)
    return np.asarray(image, dtype=np.int16)


def stored_luma(d: Decoded) -> np.ndarray:
    """The stored JPEG's Y plane alone (libjpeg decodes just that for draft mode L): nvJPEG
    encodes 4:4:4 where libjpeg-turbo encodes 4:2:0, which on noise changes every colour."""
    image = Image.open(io.BytesIO(d.stored))
    image.draft("L", image.size)
    assert image.mode == "L"
    return np.asarray(image, dtype=np.int16)


def assert_close(ours: np.ndarray, ref: np.ndarray, mean: float, p99: float | None = None,
                 maximum: float | None = None, what: str = "") -> None:
    assert ours.shape == ref.shape, what
    diff = np.abs(ours - ref)
    assert diff.mean() <= mean, f"{what}: mean |diff| {diff.mean():.2f} > {mean}"
    if p99 is not None:
        assert np.percentile(diff, 99) <= p99, f"{what}: p99 |diff| {np.percentile(diff, 99):.1f} > {p99}"
    if maximum is not None:
        assert diff.max() <= maximum, f"{what}: max |diff| {diff.max()} > {maximum}"


@cache
def full_size_reference(body: bytes, clip: ClipInputSpec) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP input, watermark input) by the CPU path's Pillow transforms from a full-size
    libjpeg-turbo decode: what open_clip itself would compute, without DCT scaling."""
    image = Image.fromarray(shared_turbojpeg().decode(body, pixel_format=turbojpeg.TJPF_RGB))
    watermark = image.resize((WATERMARK_PX, WATERMARK_PX), Image.Resampling.BILINEAR)
    return pixels(clip.apply(image, *image.size)), pixels(np.asarray(watermark))


def count_cpu_fallbacks(decoder: BatchDecoder, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bodies a GPU decoder hands to its CPU Decoder from now on (a list that fills up)."""
    calls: list[bytes] = []
    if hasattr(decoder, "_cpu"):
        cpu_decode = decoder._cpu
        monkeypatch.setattr(decoder, "_cpu", lambda body: calls.append(body) or cpu_decode(body))
    return calls


def on_device(value: object, device: torch.device) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == device.type and value.dtype == torch.uint8


# -- outputs match the CPU decoder -----------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("mode", list(ResizeMode))
def test_jpegs_match_the_cpu_decoder(jpeg_cases, name, mode, device, monkeypatch):
    if name == "cpu" and device.type == "cuda":
        pytest.skip("the cpu decoder has no device")
    cfg = DecodeConfig(resize_mode=mode, min_image_bytes=0)
    reference = Decoder(cfg, CLIP, WATERMARK_PX)
    decoder = make_decoder(name, cfg, CLIP, WATERMARK_PX, device)
    cpu_fallbacks = count_cpu_fallbacks(decoder, monkeypatch)
    tol = TOLERANCES[device.type]
    names, bodies = list(jpeg_cases), list(jpeg_cases.values())
    prepared, finished = run_batch(decoder, bodies)
    assert not cpu_fallbacks, "every case is a JPEG the batch path must decode itself"

    assert len(finished) == len(bodies)
    for case, body, p, d in zip(names, bodies, prepared, finished):
        ref = reference(body)
        assert ref.error is None, case
        assert p.pending == (name != "cpu"), case  # every case is a JPEG a GPU decodes
        assert (d.error, d.format, d.width, d.height, d.stored_ext, d.stored_width, d.stored_height, d.pending) == (
            ref.error, ref.format, ref.width, ref.height, ref.stored_ext, ref.stored_width, ref.stored_height,
            False), case
        assert d.decode_s >= 0 and (name == "cpu" or d.decode_s > 0)
        if name == "cpu":
            assert isinstance(d.clip_input, np.ndarray)
        else:
            assert on_device(d.clip_input, device) and on_device(d.watermark_input, device), case
        assert_close(pixels(d.clip_input), pixels(ref.clip_input), tol.clip_mean, tol.clip_p99, what=f"{case} clip")
        assert_close(pixels(d.watermark_input), pixels(ref.watermark_input), tol.watermark_mean, tol.watermark_p99,
                     what=f"{case} watermark")
        if mode is ResizeMode.no:
            assert d.stored == body, case
        else:
            assert_close(stored_pixels(d), stored_pixels(ref), tol.stored_mean, tol.stored_p99, what=f"{case} stored")
        if name != "cpu":
            full_clip, full_watermark = full_size_reference(body, CLIP)
            assert_close(pixels(d.clip_input), full_clip, tol.full_clip_mean, tol.full_clip_p99, tol.full_clip_max,
                         what=f"{case} clip vs full-size Pillow")
            assert_close(pixels(d.watermark_input), full_watermark, tol.full_watermark_mean, tol.full_watermark_p99,
                         what=f"{case} watermark vs full-size Pillow")


CLIP_SPECS = {
    "longest_fill": ClipInputSpec(size=(224, 224), interpolation="bilinear", resize_mode="longest", fill_color=128),
    "squash_nonsquare": ClipInputSpec(size=(192, 256), resize_mode="squash"),
    "shortest_nonsquare": ClipInputSpec(size=(160, 224), interpolation="bilinear"),  # open_clip: bicubic anyway
    "shortest_bilinear": ClipInputSpec(size=(256, 256), interpolation="bilinear"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GPU_DECODERS)
@pytest.mark.parametrize("spec", list(CLIP_SPECS.values()), ids=list(CLIP_SPECS))
def test_every_clip_preprocessing_matches(jpeg_cases, name, spec, device):
    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0)
    reference = Decoder(cfg, spec, None)
    decoder = make_decoder(name, cfg, spec, None, device)
    tol = TOLERANCES[device.type]
    cases = {k: jpeg_cases[k] for k in ("photo0_451x300", "odd_301x199", "strip_1800x40", "tall_31x1281")}
    _, finished = run_batch(decoder, list(cases.values()))
    for (case, body), d in zip(cases.items(), finished):
        ref = reference(body)
        assert d.watermark_input is None and on_device(d.clip_input, device)
        assert d.clip_input.shape == (*spec.size, 3)
        assert_close(pixels(d.clip_input), pixels(ref.clip_input), tol.clip_mean, tol.clip_p99, what=f"{case} clip")
        full_clip, _ = full_size_reference(body, spec)
        assert_close(pixels(d.clip_input), full_clip, tol.full_clip_mean, tol.full_clip_p99, tol.full_clip_max,
                     what=f"{case} clip vs full-size Pillow")


# -- geometry, exactly -----------------------------------------------------------------------

def noise_jpeg(width: int, height: int) -> bytes:
    """Fine random texture: any one-pixel misplacement of a crop or pad shows at once. 4:4:4, so
    that decoders that upsample chroma differently (nvJPEG) still decode the same pixels."""
    rng = np.random.default_rng(width * 10_000 + height)
    return jpeg(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), quality=95,
                subsampling=0)


GEOMETRY_CASES = [
    # (image size, stored mode, CLIP spec): sizes that need no resampling, only crops and pads
    ((224, 301), ResizeMode.no, ClipInputSpec(size=(224, 224))),  # CLIP crop, odd excess: round half even
    ((301, 224), ResizeMode.no, ClipInputSpec(size=(224, 224))),
    ((224, 151), ResizeMode.no, ClipInputSpec(size=(224, 224), resize_mode="longest", fill_color=77)),
    ((256, 301), ResizeMode.center_crop, None),  # stored crop, odd excess: floor
    ((301, 256), ResizeMode.center_crop, None),
    ((256, 171), ResizeMode.border, None),  # stored pad, odd: the extra row goes below
    ((171, 256), ResizeMode.border, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GPU_DECODERS)
def test_crops_and_pads_land_on_the_same_pixels(name, device):
    tol = TOLERANCES[device.type]
    for (width, height), mode, spec in GEOMETRY_CASES:
        body = noise_jpeg(width, height)
        cfg = DecodeConfig(resize_mode=mode, min_image_bytes=0)
        ref = Decoder(cfg, spec, None)(body)
        _, (d,) = run_batch(make_decoder(name, cfg, spec, None, device), [body])
        what = f"{width}x{height} {mode.value}"
        assert (d.stored_width, d.stored_height) == (ref.stored_width, ref.stored_height), what
        if mode is ResizeMode.no:
            assert d.stored == body
        else:
            assert_close(stored_luma(d), stored_luma(ref), tol.geometry_mean, what=f"{what} stored")
        if spec is not None:
            assert_close(pixels(d.clip_input), pixels(ref.clip_input), tol.geometry_mean, what=f"{what} clip")


def test_windows_follow_the_cpu_arithmetic():
    # torchvision CenterCrop: top = round((301 - 224) / 2) = round(38.5) = 38 (half to even)
    assert clip_window(CLIP, 224, 301) == Window(224, 301, 0, 38, 224, 224)
    assert clip_window(CLIP, 10, 10) == Window(224, 224, 0, 0, 224, 224)  # enlarged, then exact
    longest = ClipInputSpec(size=(224, 224), resize_mode="longest", fill_color=9)
    assert clip_window(longest, 448, 300) == Window(224, 150, 0, -37, 224, 224, 9)  # pad (74 // 2) above
    assert stored_window(301, 256, 256, ResizeMode.center_crop) == Window(301, 256, 22, 0, 256, 256)
    assert stored_window(512, 342, 256, ResizeMode.border, 255) == Window(256, 171, 0, -42, 256, 256, 255)  # white
    assert stored_window(512, 342, 256, ResizeMode.border, 0) == Window(256, 171, 0, -42, 256, 256, 0)
    assert stored_window(512, 342, 256, ResizeMode.keep_ratio) == Window(383, 256, 0, 0, 383, 256)


def test_batch_windows_are_the_per_image_windows():
    """DALI's inputs come from clip_windows / stored_windows (numpy, a batch at once): the same
    numbers as the per-image functions, halves and truncations included, on every size from 1
    to 80 px each way, extreme strips and sizes where the arithmetic lands on .5."""
    sides = np.arange(1, 81)
    width, height = np.meshgrid(sides, sides)
    width = np.concatenate([width.ravel(), [1, 10_000, 3, 4_000, 301, 448, 224, 513, 7_001, 255, 257]])
    height = np.concatenate([height.ravel(), [10_000, 1, 4_000, 3, 224, 300, 301, 771, 3, 257, 255]])
    fields = ("resized_w", "resized_h", "x", "y", "out_w", "out_h")
    for spec in (CLIP, ClipInputSpec(size=(224, 224), resize_mode="longest"), *CLIP_SPECS.values()):
        arrays = clip_windows(spec, width, height)
        got = list(zip(*(getattr(arrays, f).tolist() for f in fields)))
        want = [tuple(getattr(clip_window(spec, w, h), f) for f in fields) for w, h in zip(width.tolist(), height.tolist())]
        assert got == want, spec
    for mode in (ResizeMode.center_crop, ResizeMode.border, ResizeMode.keep_ratio):
        for side in (256, 224, 7):
            arrays = stored_windows(width, height, side, mode)
            got = list(zip(*(getattr(arrays, f).tolist() for f in fields)))
            want = [tuple(getattr(stored_window(w, h, side, mode), f) for f in fields)
                    for w, h in zip(width.tolist(), height.tolist())]
            assert got == want, (mode, side)


def test_compiled_jpeg_check_answers_as_the_python_walk(jpeg_cases, mixed_bodies, photo_images):
    """jpeg_native.c against jpeg_has_eoi_after_scan (the reference): real JPEGs and other bodies,
    every cut of one, the walk's edge cases, and 20,000 random mutations of JPEG headers (bytes
    changed, dropped or put in: markers, fill bytes, lengths)."""
    import random

    from fastlaion.gpu_decode import _EOI_CHECK, eoi_after_scan

    native = _EOI_CHECK.get()
    assert native is not None, "no compiled check: the test machine has a C compiler"
    assert eoi_after_scan()(jpeg(photo_images[1])) and eoi_after_scan() is not jpeg_has_eoi_after_scan

    def both(body: bytes) -> bool:
        ours = native(body, len(body)) == 1
        assert ours == jpeg_has_eoi_after_scan(body), body[:80]
        return ours

    whole = jpeg(photo_images[0])
    edge = [b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff", b"\xff\xd8\xff\xd9", b"\xff\xd8\xff\xda\x00\x02\xff\xd9",
            b"\xff\xd8\xff\xc0\x00\x02\xff\xda\xff\xd9", b"\xff\xd8\xff\xc0\x00\x02\xff\xda\x00\x00\xff\xd9",
            b"\xff\xd8\xff\xc0\x00\x02\xff\xff\xff\xda\x00\x00\xff\xd9", b"\xff\xd8\xff\x01\xff\xc0\x00\x02\xff\xda\x00\xff\xd9",
            b"\xff\xd8\xff\xc0\x00\x02\xff\xd8\x00\x02\xff\xda\x00\x00\xff\xd9",  # an SOI before the scan
            b"\xff\xd8\xff\xc0\x00\x02\xff\xd9\x00\x02\xff\xda\x00\x00\xff\xd9"]  # an EOI before it
    assert sum(map(both, [*jpeg_cases.values(), *mixed_bodies.values(), *edge])) >= 10
    assert [both(whole[:n]) for n in range(len(whole) + 1)].count(True) == 1  # whole: its EOI is the last two bytes
    # over a MiB of header before the scan: refused (both walks, and libjpeg's read, hold the GIL)
    comment = b"\xff\xfe\xff\xff" + bytes(0xFFFD)  # a COM segment of 65,537 bytes
    assert both(whole[:2] + comment * 15 + whole[2:])  # 983,055 bytes of comments: walked
    padded = whole[:2] + comment * 17 + whole[2:]
    assert not both(padded)
    d = Decoder(DecodeConfig(), CLIP)(padded)  # the CPU decoder takes it: a good JPEG
    assert d.error is None and (d.width, d.height) == Image.open(io.BytesIO(whole)).size
    scan = whole.index(b"\xff\xda")
    head = whole[:scan + 40]
    rng = random.Random(7)
    pieces = [b"\xff", b"\xff\xd9", b"\xff\xd8", b"\xff\xda", b"\xff\xc0", b"\xff\xc4", b"\xff\xd0", b"\xff\x01",
              b"\x00", b"\x00\x04", b"\xff\xff"]
    answers = []
    for _ in range(20_000):
        body = bytearray(rng.choice((head, whole[:scan + 400], whole)))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(2, len(body))
            kind = rng.random()
            if kind < 0.4:
                body[at] = rng.randrange(256)
            elif kind < 0.6:
                del body[at:at + rng.randint(1, 8)]
            else:
                body[at:at] = rng.choice(pieces)
        if rng.random() < 0.5:
            body += rng.choice((b"\xff\xd9", b"\xff", b""))
        answers.append(both(bytes(body)))
    assert 0.05 < sum(answers) / len(answers) < 0.95  # both answers well represented


def test_header_reader_answers_as_turbojpeg_does(jpeg_cases, mixed_bodies, photo_images):
    """read_complete_jpeg_header keeps a decompressor per thread: the same answers as
    PyTurboJPEG's decode_header (None where it raises, or where the JPEG is cut off), right after
    a body that failed or stopped part-way too, and from many threads at once."""
    from fastlaion.decode import ensure_turbojpeg_warnings_raise
    from fastlaion.gpu_decode import _TurboJPEGThreads, read_complete_jpeg_header

    tj = shared_turbojpeg()

    def decode_header(body: bytes) -> tuple[int, int, int, int] | None:
        ensure_turbojpeg_warnings_raise()
        try:
            return tj.decode_header(body)
        except (OSError, UserWarning):
            return None

    def expected(body: bytes) -> tuple[int, int, int, int] | None:
        return decode_header(body) if jpeg_has_eoi_after_scan(body) else None

    whole = jpeg(photo_images[0])
    cut = [whole[:n] for n in (3, 20, 100, 200, 400, len(whole) - 2)]
    tables_only = whole[:2] + b"\xff\xd9" + whole[2:]  # an EOI before the frame header, then a JPEG
    # a standalone RST0 (no length field) then an EOI, the zeros and a JPEG after: a walk that took
    # RST0 for a segment with a length would skip the EOI and find the JPEG's frame and scan
    restart_then_eoi = whole[:2] + b"\xff\xd0\xff\xd9" + bytes(0xFFD9 - 2) + whole
    assert decode_header(cut[2]) == (0, 0, 0, 0)  # a fresh decompressor reads no size there ...
    assert decode_header(tables_only) == (0, 0, 0, 0) == decode_header(restart_then_eoi)
    assert not jpeg_has_eoi_after_scan(restart_then_eoi)
    # passes the walk, fails libjpeg's read (a frame header one component short of its count):
    # the thread's decompressor is replaced after it
    sof = whole.index(b"\xff\xc0")
    length = int.from_bytes(whole[sof + 2:sof + 4], "big")
    bad_frame = (whole[:sof + 2] + (length - 3).to_bytes(2, "big") + whole[sof + 4:sof + 2 + length - 3]
                 + whole[sof + 2 + length:])
    assert jpeg_has_eoi_after_scan(bad_frame) and decode_header(bad_frame) is None
    bodies = [*jpeg_cases.values(), *mixed_bodies.values(), *cut, tables_only, restart_then_eoi, bad_frame]
    # each body after reads that stopped or failed part-way
    interleaved = [b for body in bodies for b in (body, cut[2], body, tables_only, bad_frame, body, restart_then_eoi)]
    want = [expected(b) for b in interleaved]
    assert sum(w is None for w in want) >= len(cut) + 3 and sum(w is not None for w in want) >= 20
    assert [read_complete_jpeg_header(b) for b in interleaved] == want  # ... nor a stale one here
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(read_complete_jpeg_header, interleaved * 4)) == want * 4
    assert [read_complete_jpeg_header(bytearray(b)) for b in bodies] == [expected(b) for b in bodies]

    class OtherTurboJPEG:  # a PyTurboJPEG without the function pointers this reads
        decode_header = tj.decode_header

    reader = _TurboJPEGThreads(OtherTurboJPEG())
    assert not reader.native
    assert [reader.read_header(b) if jpeg_has_eoi_after_scan(b) else None for b in interleaved] == want


def test_thread_encoder_makes_turbojpegs_bytes(photo_images):
    """The stored-image encoder (a compressor per thread) writes PyTurboJPEG's bytes, for every
    quality and subsampling, odd sizes and one-pixel images, from many threads at once."""
    from fastlaion.gpu_decode import _TurboJPEGThreads, turbojpeg_threads

    tj, ours = shared_turbojpeg(), turbojpeg_threads()
    assert ours.native
    images = [np.ascontiguousarray(np.asarray(photo_images[0])), synthetic_photo(257, 3, 1), synthetic_photo(1, 1, 2),
              np.ascontiguousarray(np.asarray(photo_images[1])[:123, :77])]
    cases = [(im, q, sub) for im in images for q in (1, 75, 95, 100)
             for sub in (turbojpeg.TJSAMP_420, turbojpeg.TJSAMP_444, turbojpeg.TJSAMP_GRAY)]

    def want(case: tuple[np.ndarray, int, int]) -> bytes:
        im, q, sub = case
        return tj.encode(im, quality=q, pixel_format=turbojpeg.TJPF_RGB, jpeg_subsample=sub)

    expected = [want(c) for c in cases]
    assert [ours.encode_rgb(*c) for c in cases] == expected
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda c: ours.encode_rgb(*c), cases * 3)) == expected * 3
    with pytest.raises(ValueError, match="C-contiguous"):
        ours.encode_rgb(np.asarray(photo_images[0])[:, ::2], 90, turbojpeg.TJSAMP_420)
    with pytest.raises(OSError):  # libjpeg-turbo refuses an empty image: its message, then a fresh compressor
        ours.encode_rgb(np.zeros((0, 5, 3), dtype=np.uint8), 90, turbojpeg.TJSAMP_420)
    assert ours.encode_rgb(*cases[0]) == expected[0]

    class OtherTurboJPEG:  # a PyTurboJPEG without the function pointers this uses
        encode = tj.encode

    assert [_TurboJPEGThreads(OtherTurboJPEG()).encode_rgb(*c) for c in cases[:6]] == expected[:6]


# -- every row comes back, with the CPU's reason ---------------------------------------------

def cmyk_jpeg(image: Image.Image) -> bytes:
    return jpeg(image.convert("CMYK"))


def with_undefined_quant_table(body: bytes) -> bytes:
    """A JPEG whose header reads fine but whose decode fails: the frame's first component uses
    quantisation table 3, which is never defined (found only when decoding starts)."""
    sof = body.find(b"\xff\xc0")
    broken = bytearray(body)
    broken[sof + 12] = 3  # SOF0: marker, length, precision, height, width, count, then id, sampling, table
    return bytes(broken)


def with_undefined_huffman_table(body: bytes) -> bytes:
    sos = body.find(b"\xff\xda")
    broken = bytearray(body)
    broken[sos + 6] = 0x33  # SOS: the first component's DC/AC tables become 3/3
    return bytes(broken)


def with_scan_garbage(body: bytes) -> bytes:
    sos = body.find(b"\xff\xda")
    broken = bytearray(body)
    broken[sos + 300:sos + 400] = np.random.default_rng(1).integers(0, 255, 100, dtype=np.uint8).tobytes()
    return bytes(broken)


@pytest.fixture(scope="module")
def mixed_bodies(photo_images: list[Image.Image]) -> dict[str, bytes]:
    chelsea, coffee, astronaut, _ = photo_images
    good = jpeg(chelsea)
    return {
        "jpeg": good,
        "png": encode(coffee, "PNG"),
        "webp": encode(coffee, "WEBP", quality=90),
        "cmyk_jpeg": cmyk_jpeg(astronaut),
        "truncated_jpeg": good[: len(good) * 2 // 3],
        "jpeg_without_eoi": good[:-2],
        "undefined_quant_table": with_undefined_quant_table(good),
        "empty": b"",
        "grey_jpeg": jpeg(astronaut.convert("L")),
        "html": b"<!doctype html><html><body>" + b"not found " * 600 + b"</body></html>",
        "undefined_huffman_table": with_undefined_huffman_table(jpeg(coffee)),
        "gif": encode(chelsea, "GIF"),
        "scan_garbage": with_scan_garbage(jpeg(coffee)),
        "small_jpeg": jpeg(chelsea.resize((40, 27))),
        "progressive_jpeg": jpeg(coffee, progressive=True),
    }


# What a GPU decoder keeps for its batch; the rest is decoded (or rejected) by the CPU in prepare().
GPU_PENDING = {"jpeg", "undefined_quant_table", "grey_jpeg", "undefined_huffman_table", "scan_garbage",
               "progressive_jpeg"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", DECODERS)
def test_mixed_batch_keeps_every_row_with_the_cpu_reason(mixed_bodies, name, device):
    if name == "cpu" and device.type == "cuda":
        pytest.skip("the cpu decoder has no device")
    cfg = DecodeConfig()
    reference = Decoder(cfg, CLIP, None)
    names, bodies = list(mixed_bodies), list(mixed_bodies.values())
    prepared, finished = run_batch(make_decoder(name, cfg, CLIP, None, device), bodies)

    expected = [reference(body) for body in bodies]
    # the cases do what they are here for, by the CPU decoder's own account
    assert {n: e.error for n, e in zip(names, expected) if e.error} == {
        "truncated_jpeg": "truncated", "jpeg_without_eoi": "truncated", "undefined_quant_table": "decode_error",
        "empty": "empty_body", "html": "not_an_image", "undefined_huffman_table": "decode_error",
        "gif": "unsupported_format", "small_jpeg": "too_few_bytes"}
    assert {n for n, p in zip(names, prepared) if p.pending} == (GPU_PENDING if name != "cpu" else set())
    assert len(finished) == len(bodies)
    for case, d, e in zip(names, finished, expected):
        assert (d.error, d.format, d.width, d.height, d.stored_ext, d.stored_width, d.stored_height, d.pending) == (
            e.error, e.format, e.width, e.height, e.stored_ext, e.stored_width, e.stored_height, False), case
        if e.error is None:
            assert d.clip_input.shape == (224, 224, 3)
            if name != "cpu":  # CPU-decoded rows too: a batch's CLIP inputs all stack on the device
                assert on_device(d.clip_input, device), case
            assert_close(pixels(d.clip_input), pixels(e.clip_input), TOLERANCES[device.type].clip_mean, what=case)
        else:
            assert d.clip_input is None and d.stored is None, case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GPU_DECODERS)
@pytest.mark.parametrize("mode", [ResizeMode.border, ResizeMode.keep_ratio])
def test_a_failing_image_costs_only_itself(jpeg_cases, mixed_bodies, name, device, mode, monkeypatch):
    """One undecodable body among good ones: the good ones still come from the batch (nvjpeg
    retries them one by one, dali bisects), only the bad one goes to the CPU decoder. Under
    keep_ratio the bisected runs' stored images have different sizes; under border one size."""
    cfg = DecodeConfig(min_image_bytes=0, resize_mode=mode)
    decoder = make_decoder(name, cfg, CLIP, None, device, max_batch_size=4)
    cpu_calls = count_cpu_fallbacks(decoder, monkeypatch)
    good = list(jpeg_cases.values())[:7]
    bad = [mixed_bodies["undefined_quant_table"], mixed_bodies["undefined_huffman_table"]]
    bodies = [good[0], bad[0], *good[1:5], bad[1], *good[5:]]  # split over batches of 4
    prepared, finished = run_batch(decoder, bodies)
    assert all(p.pending for p in prepared)
    assert cpu_calls == bad
    assert [d.error for d in finished] == [None, "decode_error", None, None, None, None, "decode_error", None, None]
    reference = Decoder(cfg, CLIP, None)
    expected = [reference(body) for body in bodies]
    assert [(d.stored_width, d.stored_height) for d in finished] == [(e.stored_width, e.stored_height) for e in expected]
    sizes = {(d.stored_width, d.stored_height) for d in finished if d.error is None}
    assert len(sizes) == 1 if mode is ResizeMode.border else len(sizes) > 1
    for d in finished:
        if d.error is None:
            assert stored_pixels(d).shape == (d.stored_height, d.stored_width, 3)


@pytest.mark.parametrize("name", GPU_DECODERS)
def test_batches_larger_than_the_pipeline_are_split(jpeg_cases, name):
    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0)
    bodies = list(jpeg_cases.values())
    _, whole = run_batch(make_decoder(name, cfg, CLIP, WATERMARK_PX, CPU), bodies)
    _, split = run_batch(make_decoder(name, cfg, CLIP, WATERMARK_PX, CPU, max_batch_size=3), bodies)
    for a, b in zip(whole, split):
        assert (a.stored_width, a.stored_height) == (b.stored_width, b.stored_height)
        assert torch.equal(a.clip_input, b.clip_input) and torch.equal(a.watermark_input, b.watermark_input)
        assert a.stored == b.stored


def test_cpu_batch_decoder_is_the_cpu_decoder(mixed_bodies):
    cfg = DecodeConfig()
    decoder = make_decoder("cpu", cfg, CLIP, WATERMARK_PX, CPU)
    reference = Decoder(cfg, CLIP, WATERMARK_PX)
    bodies = list(mixed_bodies.values())
    prepared, finished = run_batch(decoder, bodies)
    assert finished is prepared
    for body, d in zip(bodies, finished):
        e = reference(body)
        assert (d.error, d.error_detail, d.width, d.height, d.stored, d.pending) == (
            e.error, e.error_detail, e.width, e.height, e.stored, False)
        if e.error is None:
            assert np.array_equal(d.clip_input, e.clip_input) and np.array_equal(d.watermark_input, e.watermark_input)


def test_eoi_check_finds_cut_off_jpegs_but_not_thumbnails(photo_images):
    body = jpeg(photo_images[0])
    assert jpeg_has_eoi_after_scan(body)
    assert jpeg_has_eoi_after_scan(body + b"trailing bytes some servers append")
    assert not jpeg_has_eoi_after_scan(body[:-2])
    assert not jpeg_has_eoi_after_scan(body[: len(body) // 2])
    # an EXIF thumbnail (a whole JPEG, EOI included) in APP1 must not hide the cut
    app1_payload = b"Exif\x00\x00" + jpeg(photo_images[0].resize((64, 43)))
    with_thumb = body[:2] + b"\xff\xe1" + (len(app1_payload) + 2).to_bytes(2, "big") + app1_payload + body[2:]
    assert jpeg_has_eoi_after_scan(with_thumb)
    assert not jpeg_has_eoi_after_scan(with_thumb[: len(with_thumb) - 5000])


# -- choosing a decoder ----------------------------------------------------------------------

def test_auto_on_the_cpu_is_the_cpu_decoder():
    decoder = make_decoder("auto", DecodeConfig(), CLIP, None, CPU)
    assert (decoder.name, decoder.device) == ("cpu", CPU)
    names = available_decoders(CPU)
    assert names[0] == "cpu" and "nvjpeg" in names
    assert ("dali" in names) == dali_importable()


@pytest.mark.parametrize("name", GPU_DECODERS)
def test_gpu_decoders_run_their_cpu_mode_on_a_cpu_device(name):
    decoder = make_decoder(name, DecodeConfig(), CLIP, None, CPU)
    assert (decoder.name, decoder.device) == (name, CPU)


def test_unknown_decoder_is_a_config_error():
    with pytest.raises(ConfigError, match="--decoder"):
        make_decoder("turbo", DecodeConfig(), CLIP, None, CPU)


def test_dali_without_nvidia_dali_names_the_package(monkeypatch):
    for module in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now fails
    missing = r"^--decoder dali needs nvidia-dali-cuda130 \(pip install 'fastlaion\[gpu\]'\)$"
    with pytest.raises(ConfigError, match=missing):
        make_decoder("dali", DecodeConfig(), CLIP, None, CPU)
    assert "dali" not in available_decoders(CPU)
    assert make_decoder("auto", DecodeConfig(), CLIP, None, CPU).name == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("name", ["nvjpeg", "dali"])
def test_gpu_decoder_on_a_missing_gpu_is_a_config_error(name):
    with pytest.raises(ConfigError, match=f"--decoder {name} on cuda.* needs a CUDA device"):
        make_decoder(name, DecodeConfig(), CLIP, None, torch.device("cuda:0"))


# -- on the GPU ------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_auto_on_cuda_picks_a_gpu_decoder():
    device = torch.device("cuda")
    decoder = make_decoder("auto", DecodeConfig(), CLIP, None, device)
    assert decoder.name == ("dali" if dali_importable() else "nvjpeg")
    assert decoder.device.type == "cuda" and decoder.device.index is not None
    assert available_decoders(device)[-1] == "cpu"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", GPU_DECODERS)
def test_cuda_outputs_are_views_of_one_device_batch(jpeg_cases, name):
    decoder = make_decoder(name, DecodeConfig(min_image_bytes=0), CLIP, WATERMARK_PX, torch.device("cuda"))
    _, finished = run_batch(decoder, list(jpeg_cases.values()))
    storages = {d.clip_input.untyped_storage().data_ptr() for d in finished}
    assert len(storages) == 1  # one batch tensor, no per-row host round trip
    assert all(d.clip_input.is_cuda and d.watermark_input.is_cuda for d in finished)


# -- several finish() calls at once; where the stored image is encoded ------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GPU_DECODERS)
def test_concurrent_finish_calls_give_what_one_at_a_time_gives(jpeg_cases, name, device):
    """The pipeline runs `concurrency` finish() calls at once (own CUDA stream each, and for DALI
    its own pipeline): each batch comes back as it does alone."""
    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0)
    decoder = make_decoder(name, cfg, CLIP, WATERMARK_PX, device)
    assert decoder.concurrency >= 2
    bodies = list(jpeg_cases.values())
    batches = [bodies[k:] + bodies[:k] for k in range(6)]  # different rows, different orders
    alone = [run_batch(decoder, batch)[1] for batch in batches]
    start = threading.Barrier(decoder.concurrency)

    def together(batch: list[bytes]) -> list[Decoded]:
        prepared = [decoder.prepare(body) for body in batch]
        start.wait(timeout=60)  # the first concurrency batches enter finish() together
        return decoder.finish(batch, prepared)

    with ThreadPoolExecutor(decoder.concurrency) as pool:
        first = list(pool.map(together, batches[:decoder.concurrency]))
        rest = list(pool.map(lambda b: decoder.finish(b, [decoder.prepare(x) for x in b]),
                             batches[decoder.concurrency:]))
    at_once = first + rest
    for one, other in zip(alone, at_once, strict=True):
        for a, b in zip(one, other, strict=True):
            assert (a.error, a.stored_width, a.stored_height, a.stored) == (b.error, b.stored_width, b.stored_height,
                                                                               b.stored)
            assert torch.equal(a.clip_input.cpu(), b.clip_input.cpu())
            assert torch.equal(a.watermark_input.cpu(), b.watermark_input.cpu())
    if name == "dali":  # a pipeline per batch running at once (two, when the runs overlapped), all kept
        assert 1 <= len(decoder._idle_pipes) <= decoder.concurrency
    assert {"decode", "stored_encode", "rows"} <= set(decoder.phase_s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GPU_DECODERS)
def test_stored_images_are_encoded_as_the_cpu_decoder_encodes(jpeg_cases, name, device, monkeypatch):
    """stored_encode='host' (the default): libjpeg-turbo 4:2:0 at the configured quality, the CPU
    decoder's own settings, byte for byte what it makes of the same pixels."""
    from fastlaion.decode import _STORED_SUBSAMPLING

    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0, jpeg_quality=80)
    decoder = make_decoder(name, cfg, CLIP, None, device)
    seen: list[np.ndarray] = []
    encode_on_host = decoder._encode_on_host

    def noted(images: list[torch.Tensor]) -> list[bytes]:
        seen.extend(im.cpu().numpy() for im in images)
        return encode_on_host(images)

    monkeypatch.setattr(decoder, "_encode_on_host", noted)
    _, finished = run_batch(decoder, list(jpeg_cases.values()))
    assert len(seen) == len(finished)
    tj = shared_turbojpeg()
    for d, image in zip(finished, seen):
        assert d.stored == tj.encode(np.ascontiguousarray(image), quality=80, pixel_format=turbojpeg.TJPF_RGB,
                                     jpeg_subsample=_STORED_SUBSAMPLING)
        assert tj.decode_header(d.stored)[:3] == (d.stored_width, d.stored_height, _STORED_SUBSAMPLING)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", GPU_DECODERS)
def test_stored_encode_on_the_device_matches_the_host_encode(jpeg_cases, name):
    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0)
    bodies = list(jpeg_cases.values())
    host = run_batch(make_decoder(name, cfg, CLIP, None, torch.device("cuda")), bodies)[1]
    device = run_batch(make_decoder(name, cfg, CLIP, None, torch.device("cuda"), stored_encode="device"), bodies)[1]
    for a, b in zip(host, device, strict=True):
        assert (a.stored_width, a.stored_height) == (b.stored_width, b.stored_height)
        assert tj_subsampling(a.stored) == turbojpeg.TJSAMP_420 and tj_subsampling(b.stored) == turbojpeg.TJSAMP_444
        # the same pixels encoded twice at q95: the luma planes agree (the chroma is subsampled in one)
        assert_close(stored_luma(a), stored_luma(b), TOLERANCES["cuda"].geometry_mean, what="stored luma")


needs_nvimgcodec = pytest.mark.skipif(not nvimgcodec_importable(), reason="NVIDIA nvImageCodec is not installed")


@needs_nvimgcodec
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", GPU_DECODERS)
def test_stored_encode_by_nvimgcodec_matches_the_host_encode(jpeg_cases, name, device, caplog):
    """stored_encode='nvimgcodec': the whole batch to nvImageCodec's encoder (on CUDA its GPU back
    end, here its OpenCV one), 4:2:0 at the configured quality like the host encode: the
    same sizes, and pixels within the stored image's tolerance of the host-encoded ones."""
    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0, jpeg_quality=90)
    bodies = list(jpeg_cases.values())
    host = run_batch(make_decoder(name, cfg, CLIP, None, device), bodies)[1]
    decoder = make_decoder(name, cfg, CLIP, None, device, stored_encode="nvimgcodec")
    with caplog.at_level(logging.INFO, logger="fastlaion.gpu_decode"):
        encoded = run_batch(decoder, bodies)[1]
    if decoder._nvimgcodec_refused:  # its GPU back end encodes nothing on this machine: the host did
        assert [d.stored for d in encoded] == [d.stored for d in host]
        pytest.skip(f"nvImageCodec's back end encodes nothing on {device} here (its probe came back empty; "
                    "the session-10 H200): the host encoded every stored image, byte for byte")
    assert "encoding it on the host" not in caplog.text and "the host encodes them" not in caplog.text
    assert decoder.stored_fallbacks == 0
    assert any(a.stored != b.stored for a, b in zip(host, encoded) if a.error is None)  # another encoder made them
    # Another encoder of the same pixels at the same quality: its own DCT and rounding (0.8 levels
    # on average from libjpeg-turbo's bytes here, with nvImageCodec's CPU back end, OpenCV's)
    tolerance = 1.5
    for a, b in zip(host, encoded, strict=True):
        assert (a.error, a.stored_width, a.stored_height, a.stored_ext) == (b.error, b.stored_width, b.stored_height,
                                                                          b.stored_ext)
        if a.error is not None:
            continue
        assert tj_subsampling(b.stored) == turbojpeg.TJSAMP_420
        assert shared_turbojpeg().decode_header(b.stored)[:2] == (b.stored_width, b.stored_height)
        ours = np.asarray(Image.open(io.BytesIO(b.stored)).convert("RGB"), dtype=np.float32)
        ref = np.asarray(Image.open(io.BytesIO(a.stored)).convert("RGB"), dtype=np.float32)
        assert_close(ours, ref, tolerance, what="stored image, nvImageCodec against the host encode")


@needs_nvimgcodec
def test_a_back_end_that_encodes_nothing_is_probed_once_and_the_host_encodes(jpeg_cases, monkeypatch, caplog):
    """nvImageCodec's GPU back end, asked to encode on a machine without a GPU, answers None for
    every image, as it did for every image on the session-10 H200: a one-image probe finds that out
    before the first batch, one warning says so, and every stored image is the host's, byte for byte."""
    from fastlaion import gpu_decode

    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0)
    bodies = list(jpeg_cases.values())
    host = run_batch(make_decoder("nvjpeg", cfg, CLIP, None, CPU), bodies)[1]
    monkeypatch.setitem(gpu_decode.NVIMGCODEC_BACKENDS, "cpu", "GPU_ONLY")  # the real back end, on no GPU
    decoder = make_decoder("nvjpeg", cfg, CLIP, None, CPU, stored_encode="nvimgcodec")
    with caplog.at_level(logging.INFO, logger="fastlaion.gpu_decode"):
        first = run_batch(decoder, bodies)[1]
        second = run_batch(decoder, bodies)[1]
    assert caplog.text.count("encodes nothing") == 1, caplog.text
    stored = [d.stored for d in host]
    assert sum(s is not None for s in stored) >= 4
    assert [d.stored for d in first] == stored and [d.stored for d in second] == stored
    assert decoder.stored_fallbacks == 2 * sum(s is not None for s in stored)


@needs_nvimgcodec
def test_images_nvimgcodec_leaves_out_are_encoded_on_the_host(jpeg_cases, monkeypatch, caplog):
    """Where the encoder answers None for an image, or fails the batch, the host encodes it: no
    row loses its stored image."""
    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0)
    bodies = list(jpeg_cases.values())
    host = run_batch(make_decoder("nvjpeg", cfg, CLIP, None, CPU), bodies)[1]
    decoder = make_decoder("nvjpeg", cfg, CLIP, None, CPU, stored_encode="nvimgcodec")
    nv = decoder._nvimgcodec
    real = nv.Encoder

    class Patchy:  # drops every other image, as an encoder does with one it cannot take
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def encode(self, images, codec, **kwargs):
            out = self.inner.encode(images, codec, **kwargs)
            return [None if i % 2 else e for i, e in enumerate(out)]

    monkeypatch.setattr(nv, "Encoder", Patchy)
    with caplog.at_level(logging.INFO, logger="fastlaion.gpu_decode"):
        patchy = run_batch(decoder, bodies)[1]
    assert "the host encodes them" in caplog.text
    assert decoder.stored_fallbacks == sum(d.stored is not None for d in host) // 2  # every other one
    stored = [d for d in host if d.error is None]
    assert len(stored) >= 4
    for a, b in zip(host, patchy, strict=True):
        assert (a.error, a.stored_width, a.stored_height) == (b.error, b.stored_width, b.stored_height)
        assert (a.stored is None) == (b.stored is None)
        if a.stored is not None:
            assert tj_subsampling(b.stored) == turbojpeg.TJSAMP_420

    class Refusing:  # takes the one-image probe, refuses a whole batch
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def encode(self, images, codec, **kwargs):
            if len(images) > 1:
                raise RuntimeError("out of device memory")
            return self.inner.encode(images, codec, **kwargs)

    monkeypatch.setattr(nv, "Encoder", Refusing)
    decoder = make_decoder("nvjpeg", cfg, CLIP, None, CPU, stored_encode="nvimgcodec")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastlaion.gpu_decode"):
        refused = run_batch(decoder, bodies)[1]
    assert "could not encode a batch (out of device memory); encoding it on the host" in caplog.text
    assert [d.stored for d in refused] == [d.stored for d in host]  # the host encode, byte for byte


@pytest.mark.parametrize("name", GPU_DECODERS)
def test_a_strip_too_long_to_store_goes_to_the_cpu_decoder_and_its_reason(name, jpeg_cases):
    """keep_ratio: a 1 x 300 px JPEG would be stored 256 x 76,800 px, past JPEG's sides: prepare()
    leaves it to the CPU decoder, which drops it by name; the batch's other rows are stored."""
    strip = jpeg(Image.fromarray(np.random.default_rng(3).integers(0, 255, (300, 1, 3), dtype=np.uint8)))
    cfg = DecodeConfig(resize_mode=ResizeMode.keep_ratio, min_image_bytes=0)
    decoder = make_decoder(name, cfg, CLIP, None, CPU)
    bodies = [strip, *jpeg_cases.values()]
    _, finished = run_batch(decoder, bodies)
    assert finished[0].error == "extreme_aspect_ratio" and not decoder.prepare(strip).pending
    cpu = [Decoder(cfg, CLIP)(b) for b in bodies[1:]]
    assert [d.error for d in finished[1:]] == [d.error for d in cpu]
    assert all(d.stored is not None for d in finished[1:] if d.error is None)


def tj_subsampling(jpeg_bytes: bytes) -> int:
    return shared_turbojpeg().decode_header(jpeg_bytes)[2]


def test_unknown_stored_encoder_is_refused():
    with pytest.raises(ValueError, match="stored_encode"):
        make_decoder("nvjpeg", DecodeConfig(), CLIP, None, CPU, stored_encode="gpu")


@needs_dali
def test_dali_batches_take_turns_when_another_pipeline_cannot_be_built(jpeg_cases, monkeypatch, caplog):
    """Building a second pipeline can fail mid-run (GPU memory, say): the batches then share the
    one built, and none is lost."""
    decoder = make_decoder("dali", DecodeConfig(min_image_bytes=0), CLIP, None, CPU)

    def cannot_build() -> None:
        raise ConfigError("--decoder dali could not build its pipeline on cpu: out of memory")

    monkeypatch.setattr(decoder, "_build", cannot_build)
    pipe = decoder._idle_pipes[0]
    run = pipe.run

    def slow_run(**inputs: object) -> object:  # the pipeline stays busy while the others ask for one
        time.sleep(0.3)
        return run(**inputs)

    monkeypatch.setattr(pipe, "run", slow_run)
    bodies = list(jpeg_cases.values())
    start = threading.Barrier(3)

    def together(batch: list[bytes]) -> list[Decoded]:
        prepared = [decoder.prepare(body) for body in batch]
        start.wait(timeout=60)
        return decoder.finish(batch, prepared)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(together, [bodies, bodies[::-1], bodies[1:]]))
    assert [len(r) for r in results] == [len(bodies), len(bodies), len(bodies) - 1]
    assert all(d.error is None and d.clip_input is not None for r in results for d in r)
    assert len(decoder._idle_pipes) == 1
    assert "could not build another pipeline" in caplog.text
