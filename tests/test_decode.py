"""Tests for fastlaion.decode on real photographs (scikit-image's) and crafted bad bodies."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from fastlaion.config import LAION_MAX_PIXELS, DecodeConfig, ResizeMode
from fastlaion.decode import REASONS, ClipInputSpec, Decoded, Decoder, sniff_format

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # 451x300, 600x400, 512x512, 640x427


@cache
def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}) | options)
    return buf.getvalue()


@cache
def photo_bytes(name: str, fmt: str) -> bytes:
    return encode(photo(name), fmt)


def decode(body: bytes, clip: ClipInputSpec | None = None, **cfg) -> Decoded:
    return Decoder(DecodeConfig(**cfg), clip)(body)


def stored_pixels(decoded: Decoded) -> np.ndarray:
    stored = Image.open(io.BytesIO(decoded.stored))
    assert stored.format == "JPEG"
    assert stored.size == (decoded.stored_width, decoded.stored_height)
    return np.asarray(stored.convert("RGB"))


# -- stored image --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_resize_modes_give_img2dataset_sizes_and_original_dims(fmt):
    body = photo_bytes("chelsea", fmt)  # 451 wide, 300 high: a swapped width/height shows
    expected = {ResizeMode.center_crop: (256, 256), ResizeMode.keep_ratio: (385, 256),
                ResizeMode.border: (256, 256)}
    for mode, size in expected.items():
        d = decode(body, resize_mode=mode, image_size=256)
        assert d.error is None, d.error_detail
        assert (d.format, d.width, d.height) == ({"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}[fmt], 451, 300)
        assert (d.stored_ext, d.stored_width, d.stored_height) == ("jpg", *size)
        pixels = stored_pixels(d)
        if mode is ResizeMode.border:
            # 451x300 -> 256x170, centred: 43 white rows above, 43 below (img2dataset's padding),
            # photo in between; --border-color black pads black
            assert pixels[:40].min() > 239 and pixels[-40:].min() > 239
            assert 60 < pixels[50:200].mean() < 200
            black = stored_pixels(decode(body, resize_mode=mode, image_size=256, border_color="black"))
            assert black[:40].max() < 16 and black[-40:].max() < 16
            assert np.abs(black[50:200].astype(int) - pixels[50:200]).mean() < 2  # the same photo


def test_portrait_image_keeps_its_own_width_and_height():
    body = encode(photo("chelsea").transpose(Image.Transpose.ROTATE_90), "JPEG")
    d = decode(body, resize_mode=ResizeMode.keep_ratio)
    assert (d.width, d.height) == (300, 451)
    assert (d.stored_width, d.stored_height) == (256, 385)


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_resize_mode_no_keeps_the_bytes(fmt, ext):
    body = photo_bytes("coffee", fmt)
    d = decode(body, resize_mode=ResizeMode.no)
    assert d.error is None
    assert d.stored is body or d.stored == body
    assert (d.stored_ext, d.stored_width, d.stored_height, d.width, d.height) == (ext, 600, 400, 600, 400)


def test_small_image_is_enlarged_to_image_size():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))  # 100 wide, 80 high
    for fmt in ("JPEG", "PNG"):
        body = encode(small, fmt)
        d = decode(body, ClipInputSpec((224, 224)), min_image_bytes=0, resize_mode=ResizeMode.center_crop,
                   image_size=256)
        assert d.error is None, d.error_detail
        assert (d.width, d.height, d.stored_width, d.stored_height) == (100, 80, 256, 256)
        assert d.clip_input.shape == (224, 224, 3)
        kept = decode(body, min_image_bytes=0, resize_mode=ResizeMode.keep_ratio, image_size=256)
        assert (kept.stored_width, kept.stored_height) == (320, 256)


def test_transparent_png_is_matted_on_white_for_storage():
    rgba = np.zeros((300, 400, 4), dtype=np.uint8)  # fully transparent black ...
    rgba[100:200, 100:300] = (255, 0, 0, 255)  # ... around an opaque red box
    d = decode(encode(Image.fromarray(rgba), "PNG"), min_image_bytes=0, resize_mode=ResizeMode.keep_ratio)
    pixels = stored_pixels(d)
    assert pixels[:50].min() > 240  # white, not the black under the alpha
    assert pixels[128, 170, 0] > 230 and pixels[128, 170, 1:].max() < 30


def test_rgb_png_with_a_transparent_colour_is_matted_on_white_for_storage():
    # A tRNS chunk in an RGB PNG names one colour transparent (Pillow: info['transparency'], mode
    # RGB). OpenCV, img2dataset's decoder, gives such a PNG an alpha band and img2dataset mattes it
    # on white; it was stored as is, the key colour showing (Pillow's rgb_trns.png, bright green).
    rgb = np.zeros((300, 400, 3), dtype=np.uint8)
    rgb[...] = (0, 255, 52)  # the key colour ...
    rgb[100:200, 100:300] = (255, 0, 0)  # ... around an opaque red box
    d = decode(encode(Image.fromarray(rgb), "PNG", transparency=(0, 255, 52)), min_image_bytes=0,
               resize_mode=ResizeMode.keep_ratio)
    pixels = stored_pixels(d)
    assert pixels[:50].min() > 240  # white, not green
    assert pixels[128, 170, 0] > 230 and pixels[128, 170, 1:].max() < 30


def test_16_bit_grey_png_keeps_its_tones():
    """A 16-bit greyscale PNG (Pillow's 'I;16') is scaled to 8 bits, not clipped: Pillow's own
    convert('RGB') turns every value over 255, nearly all of a photo, to white."""
    grey = np.asarray(photo("coffee").convert("L"), dtype=np.uint16) * 257  # 0..255 -> 0..65535
    body = encode(Image.fromarray(grey), "PNG")
    assert Image.open(io.BytesIO(body)).mode == "I;16"
    d = decode(body, ClipInputSpec((224, 224)), resize_mode=ResizeMode.keep_ratio)
    assert d.error is None, d.error_detail
    assert (d.width, d.height, d.stored_width, d.stored_height) == (600, 400, 384, 256)
    original = np.asarray(photo("coffee").convert("L").resize((384, 256), Image.Resampling.BOX), dtype=float)
    assert np.abs(stored_pixels(d)[..., 0] - original).mean() < 5
    eight_bit = decode(encode(photo("coffee").convert("L"), "PNG"), ClipInputSpec((224, 224)))
    assert np.abs(d.clip_input.astype(float) - eight_bit.clip_input).max() <= 1
    # its tRNS grey is transparent, matted on white as other transparent images are
    grey[:100] = 7
    d = decode(encode(Image.fromarray(grey), "PNG", transparency=7), resize_mode=ResizeMode.keep_ratio)
    assert stored_pixels(d)[:60].min() > 240 and np.abs(stored_pixels(d)[100:, :, 0] - original[100:]).mean() < 5


# -- CLIP input against open_clip ----------------------------------------------------------

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def normalized(clip_input: np.ndarray) -> torch.Tensor:
    """Our uint8 (H, W, 3) through the same ToTensor + Normalize ops as open_clip."""
    x = torch.from_numpy(clip_input.copy()).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]


def open_clip_reference(body: bytes, size, resize_mode: str, interpolation: str = "bicubic") -> torch.Tensor:
    open_clip = pytest.importorskip("open_clip")
    transform = open_clip.image_transform(size, is_train=False, resize_mode=resize_mode,
                                          interpolation=interpolation)
    return transform(Image.open(io.BytesIO(body)))  # what clip-retrieval / open_clip users do


CLIP_CASES = [((224, 224), "shortest", "bicubic"), ((224, 224), "longest", "bicubic"),
              ((224, 224), "squash", "bilinear"), ((224, 160), "shortest", "bicubic")]


@pytest.mark.parametrize("size,resize_mode,interpolation", CLIP_CASES)
@pytest.mark.parametrize("name", PHOTOS)
def test_clip_input_matches_open_clip_exactly_on_png(name, size, resize_mode, interpolation):
    # PNG decodes exactly and our geometry is open_clip's, so the pixels are identical; the
    # bound only allows float rounding (one uint8 step is 1/255/std ~ 0.015 normalized units).
    body = photo_bytes(name, "PNG")
    spec = ClipInputSpec(size, interpolation=interpolation, resize_mode=resize_mode)
    d = decode(body, spec)
    assert d.clip_input.dtype == np.uint8 and d.clip_input.shape == (*size, 3)
    reference = open_clip_reference(body, size[0] if size[0] == size[1] else size, resize_mode, interpolation)
    assert (normalized(d.clip_input) - reference).abs().max().item() <= 1e-5


def test_clip_input_matches_open_clip_exactly_on_full_scale_jpeg():
    # A JPEG smaller than the CLIP input is decoded at 1/1; libjpeg-turbo's full decode equals
    # Pillow's, so this path is exact too.
    body = encode(photo("coffee").resize((300, 200)), "JPEG")
    d = decode(body, ClipInputSpec((224, 224)), min_image_bytes=0)
    reference = open_clip_reference(body, 224, "shortest")
    assert (normalized(d.clip_input) - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size,resize_mode,interpolation", CLIP_CASES)
@pytest.mark.parametrize("name", PHOTOS)
def test_clip_input_is_close_to_open_clip_on_scaled_jpeg(name, size, resize_mode, interpolation):
    # JPEGs are decoded at the smallest DCT scale n/8 that still covers the resize target (e.g.
    # 3/4 for chelsea), then resized; open_clip resizes the full decode. Measured on these photos
    # (q90) in [0, 1] pixel units: mean abs diff 0.0025-0.015, max 0.07-0.21 (single pixels on
    # sharp edges). Bounds: mean < 0.02, max < 0.3. Those alone would pass a crop one pixel off
    # on a smooth photo (rocket: 0.009-0.013), so the mean must also stay under 3/4 of what
    # shifting open_clip's own output by one pixel costs (measured ratio: 0.11-0.45).
    body = photo_bytes(name, "JPEG")
    spec = ClipInputSpec(size, interpolation=interpolation, resize_mode=resize_mode)
    ours = torch.from_numpy(decode(body, spec).clip_input.copy()).permute(2, 0, 1).float() / 255
    reference = open_clip_reference(body, size[0] if size[0] == size[1] else size, resize_mode, interpolation)
    reference = reference * torch.tensor(OPENAI_STD)[:, None, None] + torch.tensor(OPENAI_MEAN)[:, None, None]
    diff = (ours - reference).abs()
    assert diff.mean().item() < 0.02
    assert diff.max().item() < 0.3
    one_pixel_shift = (reference[:, :, 1:] - reference[:, :, :-1]).abs().mean().item()
    assert diff.mean().item() < 0.75 * one_pixel_shift


def test_clip_spec_from_open_clip_config():
    PreprocessCfg = pytest.importorskip("open_clip.transform").PreprocessCfg
    assert ClipInputSpec.from_open_clip(PreprocessCfg()) == ClipInputSpec((224, 224))
    cfg = {"size": (256, 192), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
           "resize_mode": "squash", "fill_color": 128}
    assert ClipInputSpec.from_open_clip(cfg) == ClipInputSpec((256, 192), "bilinear", "squash", 128)
    assert ClipInputSpec.from_open_clip({"size": 384}).size == (384, 384)


def test_no_clip_spec_gives_no_clip_input():
    d = decode(photo_bytes("rocket", "JPEG"))
    assert d.error is None and d.clip_input is None and d.decode_s > 0


# -- rejects -------------------------------------------------------------------------------

def patch_jpeg_size(body: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0/SOF2 marker's height and width fields."""
    at = next(i for i in range(2, len(body) - 1) if body[i] == 0xFF and body[i + 1] in (0xC0, 0xC2))
    # FF Cx, length (2 bytes), precision (1 byte), height (2), width (2).
    return body[: at + 5] + struct.pack(">HH", height, width) + body[at + 9:]


def patch_png_size(body: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR chunk's width and height, with a valid CRC."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + body[24:29]
    return body[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + body[33:]


def cmyk_jpeg() -> bytes:
    return encode(photo("astronaut").convert("CMYK"), "JPEG")


def test_an_unidentified_body_is_described_without_a_memory_address():
    """Pillow's "cannot identify image file <_io.BytesIO object at 0x7f38...>" went into the row's
    error as it was: the same body gave another error text in each process and run (the Parquet's
    error column, evaluate's JSON). Now the stream is "the body"."""
    body = b"\x89PNG\r\n\x1a\n" + b"\x00" * 6000  # a PNG signature and nothing Pillow can read
    first, second = decode(body), decode(bytes(body))
    assert first.error == "decode_error"
    assert first.error_detail == second.error_detail == "header: UnidentifiedImageError: cannot identify image file the body"


def test_reason_codes():
    jpeg = photo_bytes("chelsea", "JPEG")
    png = photo_bytes("chelsea", "PNG")
    tiny_jpeg = encode(photo("chelsea").resize((64, 48)), "JPEG")
    assert len(tiny_jpeg) < 4000
    cases = {
        "empty": (b"", "empty_body"),
        "html": (b"<!DOCTYPE html><html><body>" + b"x" * 9000 + b"</body></html>", "not_an_image"),
        "text": (b"404 Not Found\n" * 500, "not_an_image"),
        "gif": (encode(photo("chelsea"), "GIF"), "unsupported_format"),
        "bmp": (encode(photo("chelsea"), "BMP"), "unsupported_format"),
        "tiff": (encode(photo("chelsea"), "TIFF"), "unsupported_format"),
        "svg": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                + b"<rect/>" * 1000 + b"</svg>", "unsupported_format"),
        "too_few_bytes": (tiny_jpeg, "too_few_bytes"),
        "jpeg_cut_60pct": (jpeg[: len(jpeg) * 6 // 10], "truncated"),
        "png_cut_60pct": (png[: len(png) * 6 // 10], "truncated"),
        "webp_cut_60pct": (photo_bytes("coffee", "WEBP")[:20000], "truncated"),
        "jpeg_bomb": (patch_jpeg_size(jpeg, 10000, 9000), "too_many_pixels"),
        "png_bomb": (patch_png_size(png, 10000, 9000), "too_many_pixels"),
        "png_huge_bomb": (patch_png_size(png, 60000, 60000), "too_many_pixels"),
        "jpeg_noise": (b"\xff\xd8\xff" + np.random.default_rng(1).bytes(20000), "decode_error"),
        "png_noise": (b"\x89PNG\r\n\x1a\n" + np.random.default_rng(2).bytes(20000), "decode_error"),
    }
    for name, (body, reason) in cases.items():
        d = decode(body)
        assert d.error == reason, (name, d.error, d.error_detail)
        assert d.error in REASONS and d.error_detail
        assert d.stored is None and d.clip_input is None
    bomb = decode(patch_jpeg_size(jpeg, 10000, 9000))
    assert (bomb.width, bomb.height) == (10000, 9000)
    assert 10000 * 9000 > LAION_MAX_PIXELS
    assert decode(tiny_jpeg, min_image_bytes=0).error is None


def test_laions_byte_and_pixel_limits_hold_at_their_boundaries():
    """LAION.md: fewer than 5,000 bytes rejected (5,000 kept); more than 89,478,484 pixels
    rejected (that many pass). The body is padded after the JPEG's end (decoders ignore it); the
    pixel counts are a PNG header's (4 x 2731 x 8191 = 10924 x 8191, and 6235 x 14351 one more),
    whose data then does not fit: decode_error, past the pixel check."""
    tiny = encode(photo("chelsea").resize((64, 48)), "JPEG")
    assert decode(tiny + b"\x00" * (4999 - len(tiny))).error == "too_few_bytes"
    assert decode(tiny + b"\x00" * (5000 - len(tiny))).error is None
    png = photo_bytes("chelsea", "PNG")
    assert 10924 * 8191 == LAION_MAX_PIXELS and 6235 * 14351 == LAION_MAX_PIXELS + 1
    assert decode(patch_png_size(png, 6235, 14351)).error == "too_many_pixels"
    at_limit = decode(patch_png_size(png, 10924, 8191))
    assert at_limit.error == "decode_error" and (at_limit.width, at_limit.height) == (10924, 8191)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_strips_too_long_to_resize_are_dropped_with_a_reason(fmt):
    """A resize that scales the short side (CLIP's 'shortest'; keep_ratio and center_crop for the
    stored image) makes a strip's long side huge before any crop: a 1 x 300 px strip at 256 px
    is 256 x 76,800, past JPEG's sides, and a 60,000 x 1 px PNG would need gigabytes. Such rows
    are dropped by name from the header (not an error that fails the shard); resizes that scale
    the long side store them, and a strip that just fits is stored."""
    rng = np.random.default_rng(3)
    strip = encode(Image.fromarray(rng.integers(0, 255, (300, 1, 3), dtype=np.uint8)), fmt)
    clip = ClipInputSpec((224, 224))
    for mode in ResizeMode:  # with a CLIP input: its 224 x 67,200 px resize is refused in every mode
        d = decode(strip, clip, resize_mode=mode, min_image_bytes=0)
        assert d.error == "extreme_aspect_ratio" and d.error in REASONS, (mode, d.error, d.error_detail)
        assert d.error_detail == "1x300 px: its CLIP input would be resized to 224x67200, over 65,500 px a side" or (
            mode in (ResizeMode.keep_ratio, ResizeMode.center_crop) and "stored image would be resized to 256x76800"
            in d.error_detail), d.error_detail
        assert (d.width, d.height, d.stored) == (1, 300, None)
    for mode, error in ((ResizeMode.keep_ratio, "extreme_aspect_ratio"), (ResizeMode.center_crop, "extreme_aspect_ratio"),
                        (ResizeMode.border, None), (ResizeMode.no, None)):  # no CLIP input (--no-score)
        d = decode(strip, None, resize_mode=mode, min_image_bytes=0)
        assert d.error == error, (mode, d.error_detail)
        assert (d.stored is None) == (error is not None)
    fits = encode(Image.fromarray(np.zeros((255, 1, 3), dtype=np.uint8)), fmt)  # 256 x 65,280: just fits
    kept = decode(fits, None, resize_mode=ResizeMode.keep_ratio, min_image_bytes=0)
    assert kept.error is None and (kept.stored_width, kept.stored_height) == (256, 65280)


def test_a_60000_px_strip_is_refused_before_it_takes_memory():
    long = encode(Image.fromarray(np.zeros((1, 60000, 3), dtype=np.uint8)), "PNG")  # a few KB of PNG
    for mode in ResizeMode:
        d = decode(long, ClipInputSpec((224, 224)), resize_mode=mode, min_image_bytes=0)
        assert d.error == "extreme_aspect_ratio", (mode, d.error_detail)
    stored = decode(long, None, resize_mode=ResizeMode.border, min_image_bytes=0)  # scales the long side
    assert stored.error is None and (stored.stored_width, stored.stored_height) == (256, 256)


def test_sniffed_formats():
    assert sniff_format(photo_bytes("chelsea", "JPEG")) == "jpeg"
    assert sniff_format(photo_bytes("chelsea", "PNG")) == "png"
    assert sniff_format(photo_bytes("chelsea", "WEBP")) == "webp"
    assert sniff_format(encode(photo("chelsea"), "GIF")) == "gif"
    assert sniff_format(b"<svg xmlns='http://www.w3.org/2000/svg'/>") == "svg"
    assert sniff_format(b'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"/>') is None
    assert sniff_format(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00") == "avif"
    assert sniff_format(b"\x00\x00\x00\x1cftypisom\x00\x00\x00\x00") is None  # an MP4 video


def test_rarer_formats_pillow_writes_are_unsupported_formats_not_no_image():
    """PPM/PGM/PBM, PCX, SGI, DDS, ICNS, QOI and TGA (with its v2 footer), as Pillow writes them: real
    images LAION never kept, which the funnel counted as not_an_image (Pillow's own test images: 122
    such files). Now each is named and dropped as unsupported_format; text that merely starts like
    a PNM header is still no image."""
    cat = photo("chelsea")
    written = {"pnm": [encode(cat, "PPM"), encode(cat.convert("L"), "PPM"), encode(cat.convert("1"), "PPM")],
               "pcx": [encode(cat, "PCX")], "sgi": [encode(cat, "SGI")], "dds": [encode(cat, "DDS")],
               "icns": [encode(cat.resize((256, 256)), "ICNS")], "qoi": [encode(cat, "QOI")], "tga": [encode(cat, "TGA")]}
    for name, bodies in written.items():
        for body in bodies:
            assert sniff_format(body) == name, (name, body[:16])
            d = decode(body)
            assert d.error == "unsupported_format", (name, d.error, d.error_detail)
    for text in (b"P1 is the first point\n" * 400, b"P6 results\n" * 600, b"\n\nplain text" * 600):
        assert sniff_format(text) is None
        assert decode(text).error == "not_an_image"


def test_cmyk_jpeg_falls_back_to_pillow():
    d = decode(cmyk_jpeg(), ClipInputSpec((224, 224)))
    assert d.error is None, d.error_detail
    assert (d.width, d.height, d.stored_width, d.stored_height) == (512, 512, 256, 256)
    assert d.clip_input.shape == (224, 224, 3)
    # Pillow's CMYK->RGB of a photo: the colours come back close to the original's.
    original = np.asarray(photo("astronaut").resize((256, 256), Image.Resampling.BOX), dtype=float)
    assert np.abs(stored_pixels(d) - original).mean() < 10


def test_benign_libjpeg_warning_does_not_reject():
    jpeg = photo_bytes("chelsea", "JPEG")
    app0_end = 4 + struct.unpack(">H", jpeg[4:6])[0]  # SOI (2) + FF E0 (2) + APP0 length
    junk = jpeg[:app0_end] + b"\x12\x34\x56" + jpeg[app0_end:]  # "3 extraneous bytes before marker"
    d = decode(junk, ClipInputSpec((224, 224)))
    assert d.error is None, d.error_detail
    assert (d.width, d.height) == (451, 300)


# -- threads -------------------------------------------------------------------------------

def test_concurrent_decoding_equals_sequential():
    bodies = [photo_bytes(name, fmt) for name in PHOTOS for fmt in ("JPEG", "PNG", "WEBP")]
    bodies += [cmyk_jpeg(), b"", photo_bytes("rocket", "JPEG")[:30000]]
    bodies = (bodies * 5)[:64]
    decoder = Decoder(DecodeConfig(resize_mode=ResizeMode.center_crop), ClipInputSpec((224, 224)))
    sequential = [decoder(body) for body in bodies]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(decoder, bodies))
    for one, other in zip(sequential, concurrent):
        assert (one.error, one.width, one.height, one.stored) == (other.error, other.width, other.height,
                                                                  other.stored)
        assert (one.clip_input is None and other.clip_input is None) or np.array_equal(one.clip_input,
                                                                                       other.clip_input)
    assert {d.error for d in sequential} == {None, "empty_body", "truncated"}


# -- watermark input -----------------------------------------------------------------------

@pytest.mark.parametrize("clip,mode", [(ClipInputSpec((224, 224)), ResizeMode.border), (None, ResizeMode.no),
                                       (None, ResizeMode.border)])
def test_watermark_input_is_never_enlarged_from_a_reduced_decode(clip, mode):
    # LAION's detector takes Resize((256, 256)) of the full image. The decoder used to pick its
    # DCT scale for the stored image and the CLIP input alone: with --no-score --resize-mode no
    # an 800x530 JPEG was decoded at 1/8 (100x67) and blown up to 256x256 (mean |diff| 6.0
    # levels from the full-size squash), and at 3/8 (300x199) with --no-score's border (1.2).
    # Now both sides are at least 256 before the squash: 0.5 levels (measured), bound 1.0.
    body = encode(photo("chelsea").resize((800, 530)), "JPEG")
    decoder = Decoder(DecodeConfig(resize_mode=mode), clip, 256)
    num, den = decoder._jpeg_scale(800, 530)
    assert -(-530 * num // den) >= 256  # the short side after DCT scaling (libjpeg-turbo rounds up)
    d = decoder(body)
    full = Image.open(io.BytesIO(body)).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
    assert d.watermark_input.shape == (256, 256, 3) and d.watermark_input.dtype == np.uint8
    assert np.abs(d.watermark_input.astype(np.int16) - np.asarray(full, np.int16)).mean() < 1.0
