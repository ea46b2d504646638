"""Decode stage (LAION stages 5 and 6): a downloaded body becomes a stored image and a CLIP input.

For each body, in this order, the first failed check is the row's drop reason:

    empty_body          the body has no bytes
    not_an_image        the magic bytes are no image format we know (HTML, text, noise)
    unsupported_format  a real image format that LAION drops (GIF, BMP, TIFF, ICO, AVIF, SVG ...)
    too_few_bytes       fewer than `DecodeConfig.min_image_bytes` (LAION: 5000)
    decode_error        the header or the pixel data could not be read
    too_many_pixels     the header's width x height is over `DecodeConfig.max_pixels` (LAION:
                        89,478,484); checked from the header, before any pixel is decoded
    extreme_aspect_ratio  a resize that scales the short side (the CLIP input's 'shortest', the
                        stored image's keep_ratio and center_crop) would make the long side over
                        65,500 px (JPEG's limit; a 1 x 300 px strip at 256 px is 256 x 76,800,
                        and a 60,000 x 1 px one would need gigabytes): from the header too
    truncated           the image data ends early (a cut-off download)

Accepted formats are JPEG, PNG and WebP. JPEGs are decoded with libjpeg-turbo (PyTurboJPEG) at
the smallest DCT scale (n/8) that is still at least as large as every output needs, and fall back
to Pillow where libjpeg-turbo cannot (CMYK, or any libjpeg warning other than truncation); PNG
and WebP are decoded with Pillow. Both libraries release the GIL while they work, so a `Decoder`
is meant to be called from a thread pool.

The two outputs:

- the *stored* image, resized per `ResizeMode` with img2dataset's meanings and re-encoded as
  JPEG (or the original bytes, for `ResizeMode.no`);
- the *CLIP input*: uint8 RGB pixels reproducing open_clip's eval transform (resize, centre
  crop or pad) for the model's `PreprocessCfg`; mean/std normalisation is left to the scorer.

EXIF orientation is not applied, as neither img2dataset nor open_clip applies it; `width` and
`height` are those of the image as encoded (never swapped, unlike an early LAION release).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import turbojpeg
from PIL import Image, ImageOps

from fastlaion.config import DecodeConfig, ResizeMode

log = logging.getLogger(__name__)

# Drop reasons, in the order the checks run.
EMPTY_BODY = "empty_body"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_FEW_BYTES = "too_few_bytes"
DECODE_ERROR = "decode_error"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED = "truncated"
EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
REASONS = (EMPTY_BODY, NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TOO_FEW_BYTES, DECODE_ERROR,
           TOO_MANY_PIXELS, TRUNCATED, EXTREME_ASPECT_RATIO)
JPEG_MAX_SIDE_PX = 65_500  # libjpeg(-turbo) refuses to encode a wider or taller image

ACCEPTED_FORMATS = ("jpeg", "png", "webp")
STORED_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}

# Pillow's own errors for bad data. Anything else is a bug and propagates.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
               Image.DecompressionBombError)

# Stored images are re-encoded 4:2:0, as img2dataset's cv2.imencode (and Pillow) do by default.
_STORED_SUBSAMPLING = turbojpeg.TJSAMP_420
# Modes that Pillow resizes natively; the CLIP input is resized in them, as open_clip does.
_RESIZABLE_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "LA", "CMYK"})
_TJCS_CMYK = 3
_TJCS_YCCK = 4


# -- libjpeg warnings ------------------------------------------------------------------------
#
# PyTurboJPEG reports libjpeg *warnings* with warnings.warn and returns the image anyway. A cut-off
# download only warns ("Premature end of JPEG file"), and libjpeg-turbo 2.1 also reports a fatal
# error that follows any earlier warning as a warning, with an uninitialised buffer as the
# "result". So every warning raised from the turbojpeg module is made an exception (a filter is
# process-wide and read-only while decoding, hence thread-safe, unlike catch_warnings):
# "Premature end ..." means 'truncated'; any other warning sends the image to Pillow, which
# accepts benign oddities (extraneous bytes before a marker) and raises on real damage.
_TURBOJPEG_WARNING_FILTER: dict[str, Any] = dict(action="error", category=UserWarning,
                                                 module=r"turbojpeg\Z")
_TRUNCATED_JPEG = re.compile(r"premature end", re.IGNORECASE)


def _turbojpeg_filter_installed() -> bool:
    for action, _message, category, module, _lineno in warnings.filters:
        if (action == "error" and category is UserWarning and module is not None
                and module.pattern == _TURBOJPEG_WARNING_FILTER["module"]):
            return True
    return False


def ensure_turbojpeg_warnings_raise() -> None:
    """Install the turbojpeg warnings-as-errors filter unless it is there.

    Called before every decode: `warnings.catch_warnings` blocks (pytest wraps collection and
    every test in one) restore the filter list on exit and would silently drop a filter that was
    installed only once, at import. The check is a scan of a short list.
    """
    if not _turbojpeg_filter_installed():
        warnings.filterwarnings(**_TURBOJPEG_WARNING_FILTER)


ensure_turbojpeg_warnings_raise()

_turbojpeg_lock = threading.Lock()
_turbojpeg_instance: turbojpeg.TurboJPEG | None = None


def shared_turbojpeg() -> turbojpeg.TurboJPEG:
    """The process's TurboJPEG: it only holds function pointers (every call makes its own
    libjpeg-turbo handle), so one instance is safe to share between threads."""
    global _turbojpeg_instance
    with _turbojpeg_lock:
        if _turbojpeg_instance is None:
            _turbojpeg_instance = turbojpeg.TurboJPEG()
        return _turbojpeg_instance


# -- format sniffing and headers -------------------------------------------------------------

_FTYP_IMAGE_BRANDS = {b"avif": "avif", b"avis": "avif", b"heic": "heic", b"heix": "heic",
                      b"hevc": "heic", b"hevx": "heic", b"heim": "heic", b"heis": "heic",
                      b"mif1": "heif", b"msf1": "heif"}


_PNM = re.compile(rb"P[1-7][ \t\r\n]+[0-9#]")  # a PPM/PGM/PBM/PAM header: magic, whitespace, width or comment
_RARE_MAGIC = ((b"DDS ", "dds"), (b"icns", "icns"), (b"qoif", "qoi"), (b"\x76\x2f\x31\x01", "exr"),
               (b"#?RADIANCE", "hdr"), (b"#?RGBE", "hdr"))


def _rare_format(body: bytes) -> str | None:
    """The formats Pillow reads that LAION never kept, seldom served on the web: named so that the
    funnel says unsupported_format for them, not not_an_image (Pillow's test images showed 122
    such files counted as no image)."""
    for magic, name in _RARE_MAGIC:
        if body.startswith(magic):
            return name
    if _PNM.match(body):
        return "pnm"
    if len(body) >= 4 and body[0] == 0x0A and body[1] in (0, 2, 3, 4, 5) and body[2] == 1 and body[3] in (1, 2, 4, 8):
        return "pcx"  # manufacturer 10, a version, RLE, bits per pixel
    if body[:2] == b"\x01\xda" and len(body) > 3 and body[2] in (0, 1) and body[3] in (1, 2):
        return "sgi"  # magic 474, storage (verbatim or RLE), bytes per channel
    if body.endswith(b"TRUEVISION-XFILE.\x00"):
        return "tga"
    return None


def sniff_format(body: bytes) -> str | None:
    """The image format named by `body`'s magic bytes, or None when it is no image we know.

    Returns 'jpeg', 'png' or 'webp' (accepted), or the name of another image format: 'gif',
    'bmp', 'tiff', 'ico', 'avif', 'heic', 'heif', 'jxl', 'jp2', 'psd', 'svg', and the rarer ones
    Pillow reads too, 'pnm' (PPM/PGM/PBM), 'pcx', 'sgi', 'dds', 'icns', 'qoi', 'exr', 'hdr' and
    'tga' (by its v2 footer: a TGA without one has no magic bytes, not_an_image).
    """
    if body.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    rare = _rare_format(body)  # before ico: a TGA's header can start as a cursor's does (0 0 2 0)
    if rare is not None:
        return rare
    if body[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if body[:2] == b"BM" and len(body) >= 26:
        return "bmp"
    if body[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if body[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return "ico"
    if body[4:8] == b"ftyp" and body[8:12] in _FTYP_IMAGE_BRANDS:
        return _FTYP_IMAGE_BRANDS[body[8:12]]
    if body[:2] == b"\xff\x0a" or body[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "jxl"
    if body[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or body[:4] == b"\xff\x4f\xff\x51":
        return "jp2"
    if body[:4] == b"8BPS":
        return "psd"
    head = body[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    # An XML prolog alone could be XHTML or a feed; only an <svg> element makes it an image.
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!--", b"<!doctype svg"))
                                    and b"<svg" in head):
        return "svg"
    return None


def _png_size_px(body: bytes) -> tuple[int, int] | None:
    """(width, height) from the PNG's IHDR chunk, which must come first."""
    if len(body) < 24 or body[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", body[16:24])


def _webp_size_px(body: bytes) -> tuple[int, int] | None:
    """(width, height) from the first chunk of a WebP: VP8X canvas, VP8L or VP8 frame header."""
    chunk = body[12:16]
    if chunk == b"VP8X" and len(body) >= 30:
        return (int.from_bytes(body[24:27], "little") + 1, int.from_bytes(body[27:30], "little") + 1)
    if chunk == b"VP8L" and len(body) >= 25 and body[20] == 0x2F:
        bits = int.from_bytes(body[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(body) >= 30 and body[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", body[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _webp_is_truncated(body: bytes) -> bool:
    """A WebP's RIFF header states the file's length: fewer bytes mean a cut-off download."""
    (riff_bytes,) = struct.unpack("<I", body[4:8])
    return len(body) < riff_bytes + 8


# -- the CLIP input --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ClipInputSpec:
    """The pixel part of open_clip's PreprocessCfg; mean/std are applied later by the scorer."""

    size: tuple[int, int]  # (height, width) in pixels
    interpolation: str = "bicubic"  # 'bicubic' | 'bilinear' (open_clip's names)
    resize_mode: str = "shortest"  # 'shortest' | 'longest' | 'squash' (open_clip's names)
    fill_color: int = 0  # padding value of 'longest' mode

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"ClipInputSpec.size must be (height, width), got {self.size!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"unsupported CLIP interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unsupported CLIP resize_mode {self.resize_mode!r}")

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict | object) -> ClipInputSpec:
        """From `model.visual.preprocess_cfg` (a dict) or an open_clip `PreprocessCfg`."""
        get = preprocess_cfg.get if isinstance(preprocess_cfg, dict) else (
            lambda key, default=None: getattr(preprocess_cfg, key, default))
        size = get("size", 224)
        size_hw = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        if len(size_hw) == 1:
            size_hw = (size_hw[0], size_hw[0])
        interpolation = get("interpolation", None) or "bicubic"
        if interpolation == "random":  # open_clip's eval transform treats it as bicubic
            interpolation = "bicubic"
        return cls(size=size_hw, interpolation=interpolation,
                   resize_mode=get("resize_mode", None) or "shortest",
                   fill_color=int(get("fill_color", None) or 0))

    def resized_size_px(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) that open_clip resizes an image of `width` x `height` to, before its
        centre crop; the same arithmetic as torchvision's Resize and open_clip's ResizeKeepRatio."""
        target_h, target_w = self.size
        if self.resize_mode == "squash":
            return target_w, target_h
        if self.resize_mode == "shortest" and target_h == target_w:
            # torchvision _compute_resized_output_size: the long side is truncated, not rounded.
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(target_h * long / short)
            return (target_h, new_long) if width <= height else (new_long, target_h)
        longest = 1.0 if self.resize_mode == "longest" else 0.0
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
        # open_clip would fail on a zero side (a 1 x 1000 strip); one pixel keeps it going.
        return max(1, round(width / ratio)), max(1, round(height / ratio))

    def _resample(self) -> Image.Resampling:
        # open_clip's non-square 'shortest' path builds ResizeKeepRatio with its default, bicubic.
        if self.resize_mode == "shortest" and self.size[0] != self.size[1]:
            return Image.Resampling.BICUBIC
        return Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC

    def apply(self, image: Image.Image, width: int, height: int) -> np.ndarray:
        """open_clip's eval transform, without ToTensor/Normalize: uint8 (H, W, 3) RGB, CPU.

        `image` may be a DCT-scaled decode of an image whose original size is `width` x `height`:
        the resize target is computed from the original size, as open_clip would.
        """
        resized_w, resized_h = self.resized_size_px(width, height)
        if image.size != (resized_w, resized_h):
            # Exactly torchvision's F.resize on a PIL image: Image.resize, no reducing_gap.
            image = image.resize((resized_w, resized_h), self._resample())
        if self.resize_mode == "shortest":
            image = _center_crop_or_pad(image, self.size, fill=0)  # torchvision CenterCrop pads 0
        elif self.resize_mode == "longest":
            image = _center_crop_or_pad(image, self.size, fill=self.fill_color)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)


def _center_crop_or_pad(image: Image.Image, size_hw: tuple[int, int], fill: int) -> Image.Image:
    """torchvision's center_crop (and open_clip's center_crop_or_pad) on a PIL image."""
    crop_h, crop_w = size_hw
    width, height = image.size
    if crop_w > width or crop_h > height:
        left = (crop_w - width) // 2 if crop_w > width else 0
        top = (crop_h - height) // 2 if crop_h > height else 0
        right = (crop_w - width + 1) // 2 if crop_w > width else 0
        bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        bands = len(image.getbands())
        fill_value = fill if image.mode == "P" or bands == 1 else (fill,) * bands
        palette = image.getpalette() if image.mode == "P" else None
        image = ImageOps.expand(image, border=(left, top, right, bottom), fill=fill_value)
        if palette is not None:
            image.putpalette(palette)
        width, height = image.size
        if (crop_w, crop_h) == (width, height):
            return image
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


# -- the stored image ------------------------------------------------------------------------

def stored_resized_size_px(width: int, height: int, image_size_px: int, mode: ResizeMode) -> tuple[int, int]:
    """(width, height) the stored image is resized to before its crop or pad (img2dataset's
    smallest_max_size for center_crop/keep_ratio, longest_max_size for border)."""
    if mode is ResizeMode.no:
        return width, height
    by_longest = mode is ResizeMode.border
    if (width >= height) == by_longest:  # the width is the side set to image_size
        return image_size_px, max(1, round(height * image_size_px / width))
    return max(1, round(width * image_size_px / height)), image_size_px


def too_long_to_resize(width: int, height: int, cfg: DecodeConfig, clip: ClipInputSpec | None) -> str | None:
    """Why an image of this size is not resized, or None. A resize that scales the short side to
    the output (the CLIP input's 'shortest'; keep_ratio and center_crop for the stored image)
    makes a strip's long side huge before any crop: past 65,500 px, JPEG's limit, it is refused
    (a 60,000 x 1 px PNG would otherwise need gigabytes of memory and fail its whole shard)."""
    sizes = []
    if cfg.resize_mode in (ResizeMode.keep_ratio, ResizeMode.center_crop):
        sizes.append(("stored image", stored_resized_size_px(width, height, cfg.image_size, cfg.resize_mode)))
    if clip is not None and clip.resize_mode == "shortest":
        sizes.append(("CLIP input", clip.resized_size_px(width, height)))
    for what, (w, h) in sizes:
        if max(w, h) > JPEG_MAX_SIDE_PX:
            return f"{width}x{height} px: its {what} would be resized to {w}x{h}, over {JPEG_MAX_SIDE_PX:,} px a side"
    return None


def resize_for_storage(image: Image.Image, width: int, height: int, image_size_px: int,
                       mode: ResizeMode, fill: int) -> Image.Image:
    """The stored image's pixels (RGB) from a decode of an image of original size `width` x
    `height`: area averaging (Pillow BOX, like cv2 INTER_AREA) to shrink and Lanczos to enlarge,
    as img2dataset; then a centre crop (center_crop) or centred borders of value `fill` (border;
    img2dataset's are white)."""
    target_w, target_h = stored_resized_size_px(width, height, image_size_px, mode)
    if image.size != (target_w, target_h):
        shrinking = target_w * target_h < image.width * image.height
        image = image.resize((target_w, target_h),
                             Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    if mode is ResizeMode.center_crop:
        left, top = (target_w - image_size_px) // 2, (target_h - image_size_px) // 2
        image = image.crop((left, top, left + image_size_px, top + image_size_px))
    elif mode is ResizeMode.border and (target_w, target_h) != (image_size_px, image_size_px):
        square = Image.new("RGB", (image_size_px, image_size_px), (fill, fill, fill))
        square.paste(image, ((image_size_px - target_w) // 2, (image_size_px - target_h) // 2))
        image = square
    return image


def _rgb_for_storage(image: Image.Image) -> Image.Image:
    """RGB pixels (RGBX, as libjpeg-turbo decodes, is left as it is: the same pixels);
    transparent images are matted on white, as img2dataset does. That includes an RGB PNG whose
    tRNS chunk names one colour transparent (OpenCV, img2dataset's decoder, gives it an alpha
    band; Pillow keeps it in info['transparency'])."""
    if image.mode in ("RGB", "RGBX") and "transparency" not in image.info:
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _grey_16_to_8(image: Image.Image) -> Image.Image:
    """A 16-bit grey image as 8-bit 'L' (its top byte), its tRNS grey as an alpha band ('LA').
    Pillow's convert() clips such values to 255 instead: a photo comes out white."""
    grey = np.asarray(image)
    grey8 = Image.fromarray((grey.astype(np.uint32) >> 8).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha = Image.fromarray(np.where(grey == transparent, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (grey8, alpha))
    return grey8


# -- the decoder -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Decoded:
    """One body's outcome. `error` is None for an accepted image, else one of `REASONS`."""

    error: str | None
    error_detail: str | None
    format: str | None  # sniffed from the magic bytes: 'jpeg' | 'png' | 'webp' | 'gif' | ... | None
    width: int | None  # the original image's width in pixels, from its header
    height: int | None  # the original image's height in pixels, from its header
    stored: bytes | None  # JPEG at the configured size, or the original bytes (ResizeMode.no)
    stored_ext: str | None  # 'jpg', or the original's 'jpg' | 'png' | 'webp' (ResizeMode.no)
    stored_width: int | None
    stored_height: int | None
    clip_input: np.ndarray | None  # uint8 (H, W, 3) RGB at ClipInputSpec.size, CPU; None: no spec
    decode_s: float  # CPU seconds this thread spent on the body (time.thread_time)
    # uint8 (S, S, 3) RGB squashed to the watermark detector's input size; None when not asked for
    watermark_input: np.ndarray | None = None
    # True: checks passed and the pixels are left to a GPU decoder's batched `finish`
    pending: bool = False


class _Rejected(Exception):
    """Internal: ends one body's decode with a reason (never escapes `Decoder.__call__`)."""

    def __init__(self, reason: str, detail: str):
        # Pillow names the stream it read: "cannot identify image file <_io.BytesIO object at
        # 0x7f38...>", an address that made the row's error (the Parquet's, evaluate's) differ
        # from one run to the next
        detail = _STREAM_REPR.sub("the body", detail)
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_STREAM_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _pil_reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return TOO_MANY_PIXELS
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return TRUNCATED
    return DECODE_ERROR


class Decoder:
    """Validates, decodes and resizes one image body per call; safe to call from many threads.

    >>> decoder = Decoder(DecodeConfig(image_size=256), ClipInputSpec(size=(224, 224)))
    >>> decoded = decoder(body)          # doctest: +SKIP
    >>> decoded.error, decoded.clip_input.shape   # doctest: +SKIP
    (None, (224, 224, 3))
    """

    def __init__(self, cfg: DecodeConfig, clip: ClipInputSpec | None, watermark_size_px: int | None = None,
                 store: bool = True):
        """`store` False: no stored image (Decoded.stored None), only the CLIP (and watermark)
        input, for a reader that keeps no copy (`fastlaion evaluate`); a JPEG is still decoded at
        the DCT scale cfg's stored size needs, so the CLIP input is the one a run with cfg gets."""
        self.cfg = cfg
        self.clip = clip
        self.watermark_size_px = watermark_size_px
        self.store = store
        self._tj = shared_turbojpeg()
        # DCT scales that shrink, smallest first: 1/8, 1/4, 3/8, ... 1/1.
        self._jpeg_scales = sorted((f for f in self._tj.scaling_factors if f[0] <= f[1]),
                                   key=lambda f: f[0] / f[1])
        # Our limit is checked from the header before Pillow opens anything, so Pillow's own
        # (warning above MAX_IMAGE_PIXELS, error above twice that) only matters when ours is higher.
        if Image.MAX_IMAGE_PIXELS is not None and cfg.max_pixels > Image.MAX_IMAGE_PIXELS:
            log.info("raising Pillow's MAX_IMAGE_PIXELS from %d to --max-pixels %d",
                     Image.MAX_IMAGE_PIXELS, cfg.max_pixels)
            Image.MAX_IMAGE_PIXELS = cfg.max_pixels
        ensure_turbojpeg_warnings_raise()

    name = "cpu"

    # The batch-decoder interface (see gpu_decode): on the CPU each body is decoded whole as it
    # arrives, so a batch has nothing left to finish.
    def prepare(self, body: bytes) -> Decoded:
        return self(body)

    def finish(self, bodies: list[bytes], prepared: list[Decoded]) -> list[Decoded]:
        return prepared

    def __call__(self, body: bytes) -> Decoded:
        start_s = time.thread_time()
        fmt: str | None = None
        size: tuple[int, int] | None = None
        try:
            fmt = self._check_format(body)
            size, pil_image = self._read_header(body, fmt)
            if size[0] * size[1] > self.cfg.max_pixels:
                raise _Rejected(TOO_MANY_PIXELS, f"{size[0]}x{size[1]} px is over {self.cfg.max_pixels}")
            too_long = too_long_to_resize(*size, self.cfg, self.clip)
            if too_long:
                raise _Rejected(EXTREME_ASPECT_RATIO, too_long)
            image = self._decode_pixels(body, fmt, size, pil_image)
            stored, stored_ext, stored_size = (self._store(body, fmt, image, size) if self.store
                                               else (None, None, (None, None)))
            clip_input = None if self.clip is None else self.clip.apply(image, *size)
            watermark_input = None
            if self.watermark_size_px:
                side = self.watermark_size_px  # LAION's detector squashes to a square (Resize((S, S)))
                squashed = _rgb_for_storage(image).resize((side, side), Image.Resampling.BILINEAR)
                watermark_input = np.asarray(squashed if squashed.mode == "RGB" else squashed.convert("RGB"))
        except _Rejected as rejected:
            return Decoded(rejected.reason, rejected.detail, fmt, size and size[0], size and size[1],
                           None, None, None, None, None, time.thread_time() - start_s)
        return Decoded(None, None, fmt, size[0], size[1], stored, stored_ext, stored_size[0],
                       stored_size[1], clip_input, time.thread_time() - start_s, watermark_input)

    # Steps 1-3: the body itself.
    def _check_format(self, body: bytes) -> str:
        if not body:
            raise _Rejected(EMPTY_BODY, "the body is empty")
        fmt = sniff_format(body)
        if fmt is None:
            raise _Rejected(NOT_AN_IMAGE, f"no image signature; starts with {bytes(body[:16])!r}")
        if fmt not in ACCEPTED_FORMATS:
            raise _Rejected(UNSUPPORTED_FORMAT, f"{fmt} is not JPEG, PNG or WebP")
        if len(body) < self.cfg.min_image_bytes:
            raise _Rejected(TOO_FEW_BYTES, f"{len(body)} bytes is under {self.cfg.min_image_bytes}")
        return fmt

    # Step 4: the header's dimensions, read without decoding pixels.
    def _read_header(self, body: bytes, fmt: str) -> tuple[tuple[int, int], Image.Image | None]:
        """((width, height), a lazily opened Pillow image or None when libjpeg-turbo will decode)."""
        if fmt == "jpeg":
            ensure_turbojpeg_warnings_raise()
            try:
                width, height, _subsampling, colorspace = self._tj.decode_header(body)
                if width > 0 and height > 0:
                    # libjpeg-turbo cannot convert CMYK/YCCK to RGB: Pillow decodes those.
                    return (width, height), (self._open_pil(body) if colorspace in (_TJCS_CMYK, _TJCS_YCCK)
                                             else None)
            except (OSError, UserWarning) as exc:
                log.debug("turbojpeg could not read a JPEG header (%s); trying Pillow", exc)
            pil_image = self._open_pil(body)
            return pil_image.size, pil_image
        # Pillow refuses (or warns about) large images at open: check ours from the bytes first.
        size = _png_size_px(body) if fmt == "png" else _webp_size_px(body)
        if size is not None and size[0] * size[1] > self.cfg.max_pixels:
            return size, None
        if fmt == "webp" and _webp_is_truncated(body):
            raise _Rejected(TRUNCATED, f"RIFF header states {struct.unpack('<I', body[4:8])[0] + 8} bytes, "
                                       f"got {len(body)}")
        pil_image = self._open_pil(body)
        return pil_image.size, pil_image

    @staticmethod
    def _open_pil(body: bytes) -> Image.Image:
        try:
            return Image.open(io.BytesIO(body), formats=ACCEPTED_FORMATS)
        except _PIL_ERRORS as exc:
            raise _Rejected(DECODE_ERROR if _pil_reason(exc) != TOO_MANY_PIXELS else TOO_MANY_PIXELS,
                            f"header: {type(exc).__name__}: {exc}") from None

    # Step 5: pixels.
    def _decode_pixels(self, body: bytes, fmt: str, size: tuple[int, int],
                       pil_image: Image.Image | None) -> Image.Image:
        """A Pillow image of the pixels: RGB from libjpeg-turbo (possibly DCT-scaled), else the
        mode Pillow decodes to (open_clip resizes in that mode; storage converts to RGB)."""
        if fmt == "jpeg" and pil_image is None:
            ensure_turbojpeg_warnings_raise()
            scale = self._jpeg_scale(*size)
            try:
                # RGBX is Pillow's own layout for RGB: the image maps the decoded buffer, no copy.
                pixels = self._tj.decode(body, pixel_format=turbojpeg.TJPF_RGBX, scaling_factor=scale)
                return Image.frombuffer("RGBX", (pixels.shape[1], pixels.shape[0]), pixels, "raw", "RGBX", 0, 1)
            except UserWarning as exc:
                if _TRUNCATED_JPEG.search(str(exc)):
                    raise _Rejected(TRUNCATED, f"libjpeg-turbo: {exc}") from None
                log.debug("libjpeg-turbo warned (%s); decoding with Pillow", exc)
            except OSError as exc:
                log.debug("libjpeg-turbo failed (%s); decoding with Pillow", exc)
            pil_image = self._open_pil(body)
        assert pil_image is not None
        try:
            pil_image.load()
            if pil_image.mode.startswith("I"):  # 16-bit grey PNG ('I;16', 'I' in older Pillow)
                pil_image = _grey_16_to_8(pil_image)
            if pil_image.mode not in _RESIZABLE_MODES:  # e.g. 'PA'
                has_alpha = "A" in pil_image.getbands() or "transparency" in pil_image.info
                pil_image = pil_image.convert("RGBA" if has_alpha else "RGB")
        except _PIL_ERRORS as exc:
            raise _Rejected(_pil_reason(exc), f"{type(exc).__name__}: {exc}") from None
        return pil_image

    def _jpeg_scale(self, width: int, height: int) -> tuple[int, int]:
        """The smallest DCT scale n/8 whose output still covers what the stored image, the CLIP
        input and the watermark input are resized to (1/1 when the image is smaller than that: it
        is enlarged)."""
        need_w, need_h = 1, 1
        if self.cfg.resize_mode is not ResizeMode.no:
            need_w, need_h = stored_resized_size_px(width, height, self.cfg.image_size, self.cfg.resize_mode)
        if self.clip is not None:
            clip_w, clip_h = self.clip.resized_size_px(width, height)
            need_w, need_h = max(need_w, clip_w), max(need_h, clip_h)
        if self.watermark_size_px:
            # squashed to S x S: both sides need S, or a reduced decode is enlarged where LAION's
            # Resize((S, S)) shrinks the full image (with --no-score --resize-mode no, 1/8 scale)
            need_w, need_h = max(need_w, self.watermark_size_px), max(need_h, self.watermark_size_px)
        for num, denom in self._jpeg_scales:
            # libjpeg-turbo rounds scaled sizes up.
            if -(-width * num // denom) >= need_w and -(-height * num // denom) >= need_h:
                return num, denom
        return 1, 1

    # Step 6: the stored image.
    def _store(self, body: bytes, fmt: str, image: Image.Image,
               size: tuple[int, int]) -> tuple[bytes, str, tuple[int, int]]:
        mode = self.cfg.resize_mode
        if mode is ResizeMode.no:
            return body, STORED_EXT[fmt], size
        stored = resize_for_storage(_rgb_for_storage(image), *size, self.cfg.image_size, mode, self.cfg.border_fill)
        jpeg = self._tj.encode(np.asarray(stored), quality=self.cfg.jpeg_quality,
                               pixel_format=turbojpeg.TJPF_RGBX if stored.mode == "RGBX" else turbojpeg.TJPF_RGB,
                               jpeg_subsample=_STORED_SUBSAMPLING)
        return jpeg, "jpg", stored.size


__all__ = ["ACCEPTED_FORMATS", "REASONS", "ClipInputSpec", "Decoded", "Decoder", "sniff_format",
           "stored_resized_size_px", "resize_for_storage", "shared_turbojpeg",
           "ensure_turbojpeg_warnings_raise", "EMPTY_BODY", "NOT_AN_IMAGE", "UNSUPPORTED_FORMAT",
           "TOO_FEW_BYTES", "DECODE_ERROR", "TOO_MANY_PIXELS", "TRUNCATED", "EXTREME_ASPECT_RATIO",
           "JPEG_MAX_SIDE_PX", "too_long_to_resize"]
