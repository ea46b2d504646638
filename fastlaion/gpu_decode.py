"""Batch decoders: the decode stage with JPEG decoding and resizing moved to the GPU.

The CPU `Decoder` (fastlaion.decode) is the reference. A `BatchDecoder` splits its work in two:

- `prepare(body)`, called from the decode thread pool as bodies arrive, runs the cheap checks. A
  GPU decoder marks the bodies its GPU can decode (baseline or progressive JPEG in YCbCr or grey,
  ending with its EOI marker) `pending`; every other body (PNG, WebP, CMYK JPEG, a cut-off
  download, anything rejected) gets the CPU `Decoder`'s full decode right there, so reasons and
  pixels are the reference's own.
- `finish(bodies, prepared)`, called once per batch (from up to `concurrency` threads at once),
  decodes all pending bodies in one batched call (split at `max_batch_size`) and makes the CLIP
  input, the watermark input and the stored image on the device. An image the GPU cannot decode falls back, visibly in the
  log, to the CPU `Decoder`: no row is lost, and the reason is the CPU's.

Three implementations behind that interface:

    cpu     fastlaion.decode.Decoder in prepare(); finish() has nothing to do
    nvjpeg  torchvision.io.decode_jpeg (nvJPEG on CUDA, libjpeg on CPU) + torch resizing
    dali    an NVIDIA DALI pipeline: decoders.image (mixed on CUDA), resize and slice

Geometry (resize targets, crop and pad offsets) is computed on the host with the CPU path's own
functions (`ClipInputSpec.resized_size_px`, `stored_resized_size_px`) and the same arithmetic as
its crops (for DALI, their numpy twins `clip_windows` / `stored_windows`, tested equal), so sizes
match the reference exactly. Pixels differ a little: the CPU path decodes
JPEGs at a reduced DCT scale and resizes with Pillow, the GPU paths decode at full size and
resample with antialiasing; tests/test_gpu_decode.py states the tolerance.

After a GPU decoder's finish(), every accepted row holds `clip_input` and `watermark_input` as
uint8 (H, W, 3) RGB torch tensors on the decoder's device (views into one batch tensor), so the
scorer gets them without a host round trip; rows the CPU decoded carry the CPU `Decoder`'s pixels,
uploaded in one copy, so that a batch always stacks. `stored` is JPEG bytes on the host: 4:2:0
from libjpeg-turbo on the host's threads, as the CPU decoder writes them (or, with
stored_encode='device' on CUDA, 4:4:4 from torchvision's nvJPEG encoder, which has no other;
with stored_encode='nvimgcodec', 4:2:0 from NVIDIA nvImageCodec's batched encoder, on the device
on CUDA, with only the JPEG bytes coming back; on the CPU its OpenCV back end).
"""

from __future__ import annotations

import abc
import ctypes
import dataclasses
import importlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import turbojpeg
from PIL import Image

from fastlaion import extract_native
from fastlaion.config import DECODERS, ConfigError, DecodeConfig, ResizeMode, first_line, usable_cores
from fastlaion.decode import (
    _STORED_SUBSAMPLING,
    STORED_EXT,
    ClipInputSpec,
    Decoded,
    Decoder,
    ensure_turbojpeg_warnings_raise,
    shared_turbojpeg,
    stored_resized_size_px,
    too_long_to_resize,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 256
DALI_PACKAGE = "nvidia-dali-cuda130"
STORED_ENCODERS = ("host", "device", "nvimgcodec")
# nvImageCodec's back end per device type: its nvJPEG GPU encoder on CUDA (the hybrid one, which also
# works where that fails, took 4x the host encode's time on an H200), its OpenCV one on the CPU
NVIMGCODEC_BACKENDS = {"cuda": "GPU_ONLY", "cpu": "CPU_ONLY"}

_encode_pools: dict[int, ThreadPoolExecutor] = {}
_encode_pools_lock = threading.Lock()


def _encode_pool(workers: int) -> ThreadPoolExecutor:
    """The process's `workers` threads for stored-image JPEG encoding, made on first use."""
    with _encode_pools_lock:
        pool = _encode_pools.get(workers)
        if pool is None:
            pool = _encode_pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="stored-encode")
        return pool

# libjpeg-turbo's colourspaces that nvJPEG and DALI convert to RGB as libjpeg does (TJCS_YCbCr,
# TJCS_GRAY). RGB-coded, CMYK and YCCK JPEGs stay with the CPU decoder.
_GPU_COLORSPACES = frozenset({1, 2})
_SOS, _EOI = 0xDA, b"\xff\xd9"


# -- geometry --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Window:
    """Where an output comes from: the image resized to `resized_w` x `resized_h`, then the
    `out_w` x `out_h` canvas whose top-left corner is at (`x`, `y`) in the resized image;
    negative offsets and anything past the image's edge are padding of value `fill`."""

    resized_w: int
    resized_h: int
    x: int
    y: int
    out_w: int
    out_h: int
    fill: int = 0


def _center_crop_start(length: int, crop: int) -> int:
    """Start of torchvision's (and open_clip's) centre crop along one axis; negative: the image
    is padded by that much first (the pad puts the extra pixel after the image)."""
    if crop > length:
        return -((crop - length) // 2)
    return round((length - crop) / 2.0)


def clip_interpolation(spec: ClipInputSpec) -> str:
    """'bicubic' | 'bilinear': the filter `ClipInputSpec.apply` resizes with (its own rule)."""
    return "bilinear" if spec._resample() is Image.Resampling.BILINEAR else "bicubic"


def clip_window(spec: ClipInputSpec, width: int, height: int) -> Window:
    """`ClipInputSpec.apply`'s geometry for an image of `width` x `height`."""
    resized_w, resized_h = spec.resized_size_px(width, height)
    if spec.resize_mode == "squash":
        return Window(resized_w, resized_h, 0, 0, resized_w, resized_h)
    crop_h, crop_w = spec.size
    fill = spec.fill_color if spec.resize_mode == "longest" else 0  # CenterCrop pads with 0
    return Window(resized_w, resized_h, _center_crop_start(resized_w, crop_w),
                  _center_crop_start(resized_h, crop_h), crop_w, crop_h, fill)


def stored_window(width: int, height: int, image_size_px: int, mode: ResizeMode, fill: int = 0) -> Window:
    """`resize_for_storage`'s geometry for an image of `width` x `height` (not ResizeMode.no);
    `fill`: border's padding (DecodeConfig.border_fill)."""
    resized_w, resized_h = stored_resized_size_px(width, height, image_size_px, mode)
    if mode is ResizeMode.center_crop:
        return Window(resized_w, resized_h, (resized_w - image_size_px) // 2,
                      (resized_h - image_size_px) // 2, image_size_px, image_size_px)
    if mode is ResizeMode.border:
        return Window(resized_w, resized_h, -((image_size_px - resized_w) // 2),
                      -((image_size_px - resized_h) // 2), image_size_px, image_size_px, fill)
    return Window(resized_w, resized_h, 0, 0, resized_w, resized_h)


@dataclass(frozen=True, slots=True)
class WindowArrays:
    """`Window`s of a whole batch, one int64 array per field (the fill is the branch's own)."""

    resized_w: np.ndarray
    resized_h: np.ndarray
    x: np.ndarray
    y: np.ndarray
    out_w: np.ndarray
    out_h: np.ndarray


def _round_half_even(values: np.ndarray) -> np.ndarray:
    """Python's round() of float64 values, as int64 (numpy rounds halves to even as it does)."""
    return np.round(values).astype(np.int64)


def _center_crop_starts(length: np.ndarray, crop: int) -> np.ndarray:
    """`_center_crop_start` of each length."""
    return np.where(crop > length, -((crop - length) // 2), _round_half_even((length - crop) / 2.0))


def clip_windows(spec: ClipInputSpec, width: np.ndarray, height: np.ndarray) -> WindowArrays:
    """`clip_window` of every (width, height) at once: the same float64 arithmetic, in numpy."""
    target_h, target_w = spec.size
    if spec.resize_mode == "squash":
        resized_w, resized_h = np.full_like(width, target_w), np.full_like(height, target_h)
    elif spec.resize_mode == "shortest" and target_h == target_w:
        portrait = width <= height
        short, long = np.where(portrait, width, height), np.where(portrait, height, width)
        new_long = np.trunc(target_h * long / short).astype(np.int64)
        resized_w, resized_h = np.where(portrait, target_h, new_long), np.where(portrait, new_long, target_h)
    else:
        longest = 1.0 if spec.resize_mode == "longest" else 0.0
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = np.maximum(ratio_h, ratio_w) * longest + np.minimum(ratio_h, ratio_w) * (1.0 - longest)
        resized_w = np.maximum(1, _round_half_even(width / ratio))
        resized_h = np.maximum(1, _round_half_even(height / ratio))
    if spec.resize_mode == "squash":
        zeros = np.zeros_like(width)
        return WindowArrays(resized_w, resized_h, zeros, zeros, resized_w, resized_h)
    crop_h, crop_w = spec.size
    return WindowArrays(resized_w, resized_h, _center_crop_starts(resized_w, crop_w),
                        _center_crop_starts(resized_h, crop_h), np.full_like(width, crop_w),
                        np.full_like(height, crop_h))


def stored_windows(width: np.ndarray, height: np.ndarray, image_size_px: int, mode: ResizeMode) -> WindowArrays:
    """`stored_window` of every (width, height) at once."""
    side = image_size_px
    width_set = (width >= height) == (mode is ResizeMode.border)  # the width is the side set to image_size
    resized_w = np.where(width_set, side, np.maximum(1, _round_half_even(width * side / height)))
    resized_h = np.where(width_set, np.maximum(1, _round_half_even(height * side / width)), side)
    full = np.full_like(width, side)
    if mode is ResizeMode.center_crop:
        return WindowArrays(resized_w, resized_h, (resized_w - side) // 2, (resized_h - side) // 2, full, full)
    if mode is ResizeMode.border:
        return WindowArrays(resized_w, resized_h, -((side - resized_w) // 2), -((side - resized_h) // 2), full, full)
    zeros = np.zeros_like(width)
    return WindowArrays(resized_w, resized_h, zeros, zeros, resized_w, resized_h)


# Header bytes walked before the scan at most (jpeg_native.c has the same number).
_MAX_HEADER_BYTES = 1 << 20
# Markers that stand alone, without a length field: TEM and RST0-7 (libjpeg reads them so).
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# Frame headers (SOF0-15), less DHT, JPG and DAC, which share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_has_eoi_after_scan(body: bytes) -> bool:
    """Whether the JPEG has a frame header, then a scan, then its EOI marker after the scan starts.

    A cut-off download has no EOI. libjpeg calls that 'truncated'; nvJPEG may decode it without
    a word, so such bodies stay with the CPU decoder, which names them. Entropy-coded data stuffs
    every 0xFF byte, so no EOI hides inside a scan; the walk skips the header segments as libjpeg
    reads them (a length each, but for the standalone markers), since an EXIF thumbnail carries an
    EOI of its own. Anything odd (an EOI or SOI before the scan, a scan before any frame header,
    over a MiB of header before the scan, which web images hardly ever have but a hostile one can,
    to hold the GIL through this walk and libjpeg's header read) answers False: the CPU decoder
    decides, with the GIL released.
    """
    pos, end, frame = 2, len(body), False
    while pos + 4 <= end:
        if pos > _MAX_HEADER_BYTES:
            return False
        if body[pos] != 0xFF:
            return False
        marker = body[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _STANDALONE_MARKERS:
            pos += 2
        elif marker == _EOI[1] or marker == 0xD8:  # the image ends, or starts again, before any scan
            return False
        elif marker == _SOS:
            return frame and body.rfind(_EOI) > pos
        else:
            frame = frame or marker in _SOF_MARKERS
            pos += 2 + int.from_bytes(body[pos + 2:pos + 4], "big")
    return False


class _TurboJPEGThreads:
    """libjpeg-turbo's header read and compress with one decompressor and one compressor per
    thread, for a GPU decoder's per-image host work.

    PyTurboJPEG makes and frees a libjpeg-turbo instance on every call, most of the cost of a
    header read (18 us of 5) and half the Python around an encode. This calls the same library
    functions through PyTurboJPEG's own function pointers with the thread's instances. After a
    failed call the thread gets a fresh instance, since one that failed part-way can be left
    mid-image. Without those pointers (another PyTurboJPEG), its own methods are used.
    """

    class _Instances:
        """A thread's decompressor and compressor, with the outputs its calls fill in."""

        def __init__(self, owner: _TurboJPEGThreads):
            self.destroy = owner._destroy
            self.decompressor = owner._init_decompress()
            self.compressor = owner._init_compress()
            self.header = tuple(ctypes.c_int() for _ in range(4))  # width, height, subsampling, colourspace
            self.header_refs = tuple(ctypes.byref(c) for c in self.header)

        def __del__(self) -> None:  # the thread ended, or a call failed
            for instance in (self.decompressor, self.compressor):
                if instance:
                    self.destroy(instance)

    def __init__(self, tj: turbojpeg.TurboJPEG):
        self._tj = tj
        self._local = threading.local()
        try:
            def function(name: str, restype: Any, *argtypes: Any, keep_gil: bool = False) -> Any:
                address = ctypes.cast(getattr(tj, f"_TurboJPEG__{name}"), ctypes.c_void_p).value
                kind = ctypes.PYFUNCTYPE if keep_gil else ctypes.CFUNCTYPE
                return kind(restype, *argtypes)(address)

            c_int, c_void_p, int_p = ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)
            # A header read takes microseconds: holding the GIL through it costs less than handing
            # it over and waiting to get it back (on a busy process, longer than the read).
            self._read_header = function("decompress_header", c_int, c_void_p, ctypes.c_char_p, ctypes.c_ulong,
                                         int_p, int_p, int_p, int_p, keep_gil=True)
            self._compress = function("compress", c_int, c_void_p, c_void_p, c_int, c_int, c_int, c_int,
                                      ctypes.POINTER(c_void_p), ctypes.POINTER(ctypes.c_ulong), c_int, c_int, c_int)
            self._free = function("free", None, c_void_p)
            self._init_decompress = function("init_decompress", c_void_p)
            self._init_compress = function("init_compress", c_void_p)
            self._destroy = function("destroy", c_int, c_void_p)
            self.native = True
        except (AttributeError, TypeError, ctypes.ArgumentError):
            self.native = False

    def _instances(self) -> _TurboJPEGThreads._Instances:
        instances = getattr(self._local, "instances", None)
        if instances is None:
            instances = self._local.instances = self._Instances(self)
        return instances

    def read_header(self, body: bytes) -> tuple[int, int, int, int] | None:
        """`TurboJPEG.decode_header(body)`, None where it raises (an error or a warning)."""
        if not self.native:
            ensure_turbojpeg_warnings_raise()
            try:
                return self._tj.decode_header(body)
            except (OSError, UserWarning):
                return None
        instances = self._instances()
        if self._read_header(instances.decompressor, body if type(body) is bytes else bytes(body), len(body),
                             *instances.header_refs) != 0:
            self._local.instances = None
            return None
        width, height, subsampling, colorspace = instances.header
        return width.value, height.value, subsampling.value, colorspace.value

    def encode_rgb(self, image: np.ndarray, quality: int, subsampling: int) -> bytes:
        """`TurboJPEG.encode(image, quality, TJPF_RGB, subsampling)` of a C-contiguous uint8
        (h, w, 3) array: the same bytes."""
        if not self.native:
            return self._tj.encode(image, quality=quality, pixel_format=turbojpeg.TJPF_RGB, jpeg_subsample=subsampling)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not image.flags.c_contiguous:
            raise ValueError(f"encode_rgb needs a C-contiguous uint8 (h, w, 3) array, got {image.dtype} {image.shape}")
        height, width, _ = image.shape
        out, size = ctypes.c_void_p(), ctypes.c_ulong()
        status = self._compress(self._instances().compressor, image.ctypes.data, width, width * 3, height,
                                turbojpeg.TJPF_RGB, ctypes.byref(out), ctypes.byref(size), subsampling, quality, 0)
        try:
            if status != 0:
                self._local.instances = None
                return self._tj.encode(image, quality=quality, pixel_format=turbojpeg.TJPF_RGB,
                                       jpeg_subsample=subsampling)  # raises with libjpeg-turbo's message
            return ctypes.string_at(out.value, size.value)
        finally:
            if out.value:
                self._free(out)


_turbojpeg_threads: _TurboJPEGThreads | None = None
_turbojpeg_threads_lock = threading.Lock()


def turbojpeg_threads() -> _TurboJPEGThreads:
    """The process's `_TurboJPEGThreads`, made on first use."""
    global _turbojpeg_threads
    if _turbojpeg_threads is None:
        with _turbojpeg_threads_lock:
            if _turbojpeg_threads is None:
                _turbojpeg_threads = _TurboJPEGThreads(shared_turbojpeg())
    return _turbojpeg_threads


def _load_eoi_check() -> Any:
    # PyDLL: the check takes under a microsecond, far less than releasing and retaking the GIL
    lib = ctypes.PyDLL(str(extract_native.built("jpeg", (Path(__file__).with_name("jpeg_native.c"),))))
    check = lib.jpeg_eoi_after_scan
    check.restype, check.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_size_t]
    return check


_EOI_CHECK = extract_native.OnFirstUse(_load_eoi_check, "compiled JPEG check unavailable (%s); checking in Python")
_eoi_after_scan: Any = None  # the check prepare() uses, chosen on first use


def eoi_after_scan() -> Any:
    """`jpeg_has_eoi_after_scan`, compiled (jpeg_native.c, ~10x less time; built on first use like
    the extract library) where a C compiler is, else the Python function itself: same answers."""
    global _eoi_after_scan
    if _eoi_after_scan is None:
        native = _EOI_CHECK.get()
        _eoi_after_scan = jpeg_has_eoi_after_scan if native is None else (lambda body: native(body, len(body)) == 1)
    return _eoi_after_scan


def read_complete_jpeg_header(body: bytes) -> tuple[int, int, int, int] | None:
    """`TurboJPEG.decode_header`'s (width, height, subsampling, colourspace) of a JPEG that
    `jpeg_has_eoi_after_scan`; None for any other body and where decode_header would raise (an
    error or a warning). At a third of decode_header's cost.

    The scan check comes first for a reason beyond cut-off downloads: a reused decompressor keeps
    the previous image's size where a header read ends before any frame header (tables only). A
    body the check passes has a frame header before its scan, with no EOI or SOI between, and
    libjpeg reads its markers in the walk's order: its read reaches this body's frame header or
    fails (and a failed read gets a fresh decompressor).
    """
    if type(body) is not bytes:
        body = bytes(body)
    if not (_eoi_after_scan or eoi_after_scan())(body):
        return None
    return turbojpeg_threads().read_header(body)


# -- the interface ---------------------------------------------------------------------------

class BatchDecoder(abc.ABC):
    """prepare() per body from many threads, finish() per batch from up to `concurrency`; see the
    module doc."""

    name: str
    device: torch.device
    concurrency = 1  # finish() calls that may run at once, on as many threads

    @abc.abstractmethod
    def prepare(self, body: bytes) -> Decoded:
        """Checks (and on the CPU the whole decode) of one body, as it arrives."""

    @abc.abstractmethod
    def finish(self, bodies: list[bytes], prepared: list[Decoded]) -> list[Decoded]:
        """Complete a batch's pending rows; every row comes back, in order."""


class CpuBatchDecoder(BatchDecoder):
    """The CPU `Decoder` behind the batch interface: everything happens in prepare()."""

    name = "cpu"

    def __init__(self, cfg: DecodeConfig, clip: ClipInputSpec | None, watermark_size_px: int | None):
        self.device = torch.device("cpu")
        self._decoder = Decoder(cfg, clip, watermark_size_px)

    def prepare(self, body: bytes) -> Decoded:
        return self._decoder(body)

    def finish(self, bodies: list[bytes], prepared: list[Decoded]) -> list[Decoded]:
        return prepared


@dataclass
class _Pixels:
    """A batch's device outputs for the rows it decoded (`rows`: indices into the batch)."""

    rows: list[int]
    clip: torch.Tensor | None  # uint8 (len(rows), H, W, 3) RGB
    watermark: torch.Tensor | None  # uint8 (len(rows), S, S, 3) RGB
    # uint8 (h, w, 3) RGB per row, or one (len(rows), h, w, 3) tensor when all have one size (border
    # and center_crop modes); None for ResizeMode.no
    stored: list[torch.Tensor] | torch.Tensor | None


class _DeviceBatchDecoder(BatchDecoder):
    """What nvjpeg and dali share: the routing in prepare(), and in finish() the batching, the
    stored JPEG encode, the timing and the per-image CPU fallback. Subclasses decode.

    finish() may run on `concurrency` threads at once (the pipeline gives it that many), each
    on its own CUDA stream (and for DALI its own pipeline), so one batch's host work (inputs,
    stored-image encode, rows) overlaps another's device work. `phase_s` adds up the seconds
    each part of finish() took, over all threads (the benchmark's breakdown).
    """

    def __init__(self, cfg: DecodeConfig, clip: ClipInputSpec | None, watermark_size_px: int | None,
                 device: torch.device, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, stored_encode: str = "host",
                 concurrency: int = 2):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        if stored_encode not in STORED_ENCODERS:
            raise ValueError(f"stored_encode must be one of {', '.join(STORED_ENCODERS)}, got {stored_encode!r}")
        self.cfg = cfg
        self.clip = clip
        self.watermark_size_px = watermark_size_px or None
        self.device = _with_index(device)
        self.max_batch_size = max_batch_size
        # 'host': libjpeg-turbo on the CPU's threads, 4:2:0 like the CPU decoder (one copy of the
        # batch's stored pixels to the host); 'device': torchvision's nvJPEG encoder (4:4:4), one
        # image at a time with a device sync each, on CUDA only; 'nvimgcodec': nvImageCodec's
        # batched encoder, 4:2:0 (its nvJPEG back end on CUDA, its OpenCV one on the CPU).
        self.stored_encode = stored_encode
        self._nvimgcodec = import_nvimgcodec() if stored_encode == "nvimgcodec" else None
        self.stored_fallbacks = 0  # stored images the chosen device encoder left to the host
        self._nvimgcodec_refused = False  # its back end's probe encoded nothing: the host encodes
        self._cpu = Decoder(cfg, clip, watermark_size_px)
        self._local = threading.local()  # per finish() thread: its CUDA stream
        self._phase_lock = threading.Lock()
        self.phase_s: dict[str, float] = {}

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._phase_lock:
                self.phase_s[name] = self.phase_s.get(name, 0.0) + time.perf_counter() - start

    def prepare(self, body: bytes) -> Decoded:
        start_s = time.thread_time()
        header = self._gpu_header(body)
        if header is None:
            return self._cpu(body)
        width, height = header
        return Decoded(None, None, "jpeg", width, height, None, None, None, None, None,
                       time.thread_time() - start_s, pending=True)

    def _gpu_header(self, body: bytes) -> tuple[int, int] | None:
        """(width, height) of a JPEG that passes the CPU decoder's cheap checks and that the GPU
        can decode, else None. A body that fails a check gets the CPU decoder's full decode, which
        stops at that same check and names the reason, so no reason is decided here."""
        if not body or body[:3] != b"\xff\xd8\xff" or len(body) < self.cfg.min_image_bytes:
            return None  # the CPU decoder names these (empty, format, too few bytes)
        header = read_complete_jpeg_header(body)  # None: cut off, or libjpeg-turbo has a word to say
        if header is None:
            return None
        width, height, _subsampling, colorspace = header
        if width <= 0 or height <= 0 or colorspace not in _GPU_COLORSPACES or width * height > self.cfg.max_pixels:
            return None
        if too_long_to_resize(width, height, self.cfg, self.clip):
            return None  # the CPU decoder names it: extreme_aspect_ratio
        return width, height

    def finish(self, bodies: list[bytes], prepared: list[Decoded]) -> list[Decoded]:
        if len(bodies) != len(prepared):
            raise ValueError(f"{len(bodies)} bodies but {len(prepared)} prepared rows")
        if self.device.type != "cuda":
            return self._finish(bodies, prepared)
        # This thread's own CUDA stream: this batch's decode and resizes overlap the scorer's work
        # on the previous batch (another thread, the default stream) and another finish() call's.
        # Synchronising before returning hands the scorer finished tensors; they are freed only
        # after its own work on them is done (it copies results to the host), so the caching
        # allocator never hands their memory out early.
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            out = self._finish(bodies, prepared)
        stream.synchronize()
        return out

    def _finish(self, bodies: list[bytes], prepared: list[Decoded]) -> list[Decoded]:
        pending = [i for i, d in enumerate(prepared) if d.pending]
        out = list(prepared)
        for first in range(0, len(pending), self.max_batch_size):
            rows = pending[first:first + self.max_batch_size]
            finished = self._finish_batch([bodies[i] for i in rows], [prepared[i] for i in rows])
            for i, decoded in zip(rows, finished, strict=True):
                out[i] = decoded
        return self._upload_host_pixels(out)

    def _upload_host_pixels(self, rows: list[Decoded]) -> list[Decoded]:
        """Rows the CPU decoded (PNG, WebP, CMYK, GPU failures) get their pixels moved to the
        device too, one copy per kind, so that a batch's CLIP inputs stack there whatever
        decoded them; the values are the CPU decoder's."""
        rows = list(rows)
        for field in ("clip_input", "watermark_input"):
            on_host = [i for i, d in enumerate(rows) if isinstance(getattr(d, field), np.ndarray)]
            if not on_host:
                continue
            host = torch.from_numpy(np.stack([getattr(rows[i], field) for i in on_host]))
            if self.device.type == "cuda":  # pinned memory: an asynchronous copy on this stream
                host = host.pin_memory()
            uploaded = host.to(self.device, non_blocking=True)
            for k, i in enumerate(on_host):
                rows[i] = dataclasses.replace(rows[i], **{field: uploaded[k]})
        return rows

    def _finish_batch(self, bodies: list[bytes], prepared: list[Decoded]) -> list[Decoded]:
        start_s = time.perf_counter()
        with self._phase("decode"):
            pixels = self._decode(bodies, [(d.width, d.height) for d in prepared])
        with self._phase("stored_encode"):
            jpegs = None if pixels.stored is None else self._encode_stored(pixels.stored)
        # Wall time, as the device works while this thread waits; shared evenly.
        share_s = (time.perf_counter() - start_s) / len(bodies)
        with self._phase("rows"):
            out = self._rows(bodies, prepared, pixels, jpegs, share_s)
        failed = [row for row, d in enumerate(out) if d is None]
        if failed:
            log.info("%s could not decode %d of %d images; the CPU decoder takes them",
                     self.name, len(failed), len(bodies))
        return [d if d is not None else self._cpu(bodies[row]) for row, d in enumerate(out)]

    def _rows(self, bodies: list[bytes], prepared: list[Decoded], pixels: _Pixels, jpegs: list[bytes] | None,
              share_s: float) -> list[Decoded | None]:
        """The batch's rows with their outputs; None where the device could not decode."""
        out: list[Decoded | None] = [None] * len(bodies)
        n = len(pixels.rows)
        if isinstance(pixels.stored, torch.Tensor):
            stored_sizes = [tuple(pixels.stored.shape[1:3])] * n
        elif pixels.stored is not None:
            stored_sizes = [tuple(im.shape[:2]) for im in pixels.stored]
        # one view per row in one call each (indexing row by row costs microseconds a row)
        clips = [None] * n if pixels.clip is None else pixels.clip.unbind(0)
        watermarks = [None] * n if pixels.watermark is None else pixels.watermark.unbind(0)
        for k, row in enumerate(pixels.rows):
            d = prepared[row]
            if jpegs is None:  # ResizeMode.no: the downloaded bytes, as the CPU decoder stores them
                stored, ext, stored_w, stored_h = bodies[row], STORED_EXT["jpeg"], d.width, d.height
            else:
                stored_h, stored_w = stored_sizes[k]
                stored, ext = jpegs[k], "jpg"
            # `d` with its outputs; Decoded(...) directly, as dataclasses.replace costs 4x as much
            out[row] = Decoded(d.error, d.error_detail, d.format, d.width, d.height, stored, ext, stored_w, stored_h,
                               clips[k], d.decode_s + share_s, watermarks[k], False)
        return out

    @abc.abstractmethod
    def _decode(self, bodies: list[bytes], sizes: list[tuple[int, int]]) -> _Pixels:
        """Decode and resize one batch (at most max_batch_size) of pending bodies."""

    def _encode_stored(self, images: list[torch.Tensor] | torch.Tensor) -> list[bytes]:
        """JPEG bytes of uint8 (h, w, 3) RGB images (a list, or one (N, h, w, 3) tensor) at the
        configured quality: by
        `stored_encode`, libjpeg-turbo 4:2:0 on the host's threads (as the CPU decoder), or
        nvJPEG on CUDA (torchvision: 4:4:4)."""
        if len(images) == 0:
            return []
        if self._nvimgcodec is not None:
            return self._encode_nvimgcodec(images)
        if self.stored_encode == "device" and self.device.type == "cuda":
            from torchvision.io import encode_jpeg

            try:
                encoded = encode_jpeg([im.permute(2, 0, 1) for im in images], quality=self.cfg.jpeg_quality)
                lengths = [len(e) for e in encoded]
                flat = torch.cat(encoded).cpu().numpy().tobytes()  # one device-to-host copy
                offsets = np.cumsum([0, *lengths]).tolist()
                return [flat[a:b] for a, b in itertools.pairwise(offsets)]
            except RuntimeError as exc:
                log.warning("nvJPEG could not encode a batch (%s); encoding it on the host", exc)
                self._count_fallbacks(len(images))
        return self._encode_on_host(images)

    def _count_fallbacks(self, n: int) -> None:
        with self._phase_lock:  # finish() runs on several threads
            self.stored_fallbacks += n

    def _encode_nvimgcodec(self, images: list[torch.Tensor] | torch.Tensor) -> list[bytes]:
        """nvImageCodec's encoder on the whole batch at once, at the configured quality, 4:2:0 as
        the host encode: on CUDA its GPU back end reads the pixels where the decoder left them (on
        this thread's stream) and only the JPEG bytes come back; on the CPU its OpenCV back end. An
        image it does not encode (None in its answer), or a batch it refuses, is encoded on the
        host instead."""
        nv = self._nvimgcodec
        on_gpu = self.device.type == "cuda"
        encoder = self._nvimgcodec_encoder()
        if encoder is None:  # its back end encodes nothing on this machine (the probe): the host does
            self._count_fallbacks(len(images))
            return self._encode_on_host(images)
        params = self._nvimgcodec_params()
        frames = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
        try:
            if on_gpu:
                stream = torch.cuda.current_stream(self.device).cuda_stream
                encoded = encoder.encode([nv.as_image(f.contiguous(), stream) for f in frames], "jpeg",
                                         params=params, cuda_stream=stream)
            else:
                encoded = encoder.encode([np.ascontiguousarray(f.numpy()) for f in frames], "jpeg", params=params)
        except (RuntimeError, ValueError, TypeError) as exc:  # nvImageCodec's errors, as its bindings raise them
            log.warning("nvImageCodec could not encode a batch (%s); encoding it on the host", exc)
            self._count_fallbacks(len(frames))
            return self._encode_on_host(images)
        jpegs: list[bytes | None] = [None if e is None else bytes(e) for e in encoded]
        missing = [i for i, j in enumerate(jpegs) if not j]
        if missing:
            log.info("nvImageCodec did not encode %d of %d stored images; the host encodes them", len(missing), len(jpegs))
            self._count_fallbacks(len(missing))
            for i, jpeg in zip(missing, self._encode_on_host([frames[i] for i in missing]), strict=True):
                jpegs[i] = jpeg
        return jpegs  # type: ignore[return-value]

    def _nvimgcodec_params(self) -> Any:
        nv = self._nvimgcodec
        return nv.EncodeParams(quality_type=nv.QualityType.QUALITY, quality_value=float(self.cfg.jpeg_quality),
                               chroma_subsampling=nv.ChromaSubsampling.CSS_420)

    def _nvimgcodec_encoder(self) -> Any:
        """This finish() thread's nvImageCodec encoder (one per thread, as the CUDA streams, each
        with its share of the cores), or None once a probe showed that its back end encodes nothing
        here. The probe is one 16 x 16 image, the first time: on the session-10 H200 the GPU back end
        returned None for every image (nvImageCodec 0.9, the driver's nvJPEG 13.0), which cost a
        512-line warning and a wasted call per batch before the host encoded the batch anyway."""
        if self._nvimgcodec_refused:
            return None
        encoder = getattr(self._local, "nvimgcodec_encoder", None)
        if encoder is not None:
            return encoder
        nv = self._nvimgcodec
        threads = max(1, (self.cfg.threads or usable_cores()) // self.concurrency)
        on_gpu = self.device.type == "cuda"
        kind = getattr(nv.BackendKind, NVIMGCODEC_BACKENDS[self.device.type])
        encoder = nv.Encoder(device_id=self.device.index if on_gpu else nv.NVIMGCODEC_DEVICE_CPU_ONLY,
                             max_num_cpu_threads=threads, backends=[nv.Backend(kind)])
        probe = torch.zeros((16, 16, 3), dtype=torch.uint8, device=self.device)
        try:  # the batches' own settings
            if on_gpu:
                stream = torch.cuda.current_stream(self.device).cuda_stream
                answer = encoder.encode([nv.as_image(probe, stream)], "jpeg", params=self._nvimgcodec_params(),
                                        cuda_stream=stream)
            else:
                answer = encoder.encode([probe.numpy()], "jpeg", params=self._nvimgcodec_params())
        except (RuntimeError, ValueError, TypeError) as exc:  # perhaps for now only (out of memory): this
            log.warning("nvImageCodec's probe failed (%s); this batch's stored images are encoded on the host",
                        first_line(exc))  # batch goes to the host, the next probes again
            return None
        works = bool(answer) and answer[0] is not None
        if not works:
            with self._phase_lock:
                if not self._nvimgcodec_refused:
                    log.warning("nvImageCodec's %s back end encodes nothing on %s (a one-image probe came back "
                                "empty): the stored images are encoded on the host (--stored-encoder host)",
                                NVIMGCODEC_BACKENDS[self.device.type], self.device)
                self._nvimgcodec_refused = True
            return None
        self._local.nvimgcodec_encoder = encoder
        return encoder

    def _encode_on_host(self, images: list[torch.Tensor] | torch.Tensor) -> list[bytes]:
        """libjpeg-turbo on the shared encode threads (it releases the GIL), a slice of the batch
        per task. From a GPU the batch's pixels come over in one copy into pinned memory (after
        one gather, for images of different sizes), not one synchronising copy per image."""
        host: torch.Tensor | None = None
        if images[0].device.type == "cuda":
            dense = isinstance(images, torch.Tensor)
            flat = images.contiguous() if dense else torch.cat([im.reshape(-1) for im in images])
            host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            if dense:
                arrays = list(host.numpy())
            else:
                shapes = [tuple(im.shape) for im in images]
                buffer = host.numpy()
                offsets = np.cumsum([0, *(h * w * c for h, w, c in shapes)]).tolist()
                arrays = [buffer[a:b].reshape(shape) for (a, b), shape in zip(itertools.pairwise(offsets), shapes)]
        else:
            arrays = [np.ascontiguousarray(im.numpy()) for im in images]
        tj, quality = turbojpeg_threads(), self.cfg.jpeg_quality

        def encode(part: list[np.ndarray]) -> list[bytes]:
            return [tj.encode_rgb(a, quality, _STORED_SUBSAMPLING) for a in part]

        workers = self.cfg.threads or usable_cores()
        step = max(1, -(-len(arrays) // (2 * workers)))  # two slices per thread: even finish times
        parts = _encode_pool(workers).map(encode, [arrays[i:i + step] for i in range(0, len(arrays), step)])
        jpegs = [jpeg for part in parts for jpeg in part]
        del host  # the pinned buffer goes back to torch's cache only once every encode is done
        return jpegs

    def _store_mode(self) -> ResizeMode | None:
        mode = self.cfg.resize_mode
        return None if mode is ResizeMode.no else mode


# -- nvJPEG (torchvision) --------------------------------------------------------------------

# The filters closest to the CPU path's Pillow ones. The CLIP and watermark inputs are Pillow
# bicubic/bilinear, which antialiased torch interpolation (and DALI's) reproduces to within 0.2
# levels on average. The stored image is Pillow BOX to shrink and Lanczos to enlarge; torch has
# neither, and its antialiased bicubic came closest to both (mean 4.3 levels from the CPU decoder
# on the test photos, against 4.7 for 'area', whose uneven bins alias at ratios near 1, and 4.3+
# for bilinear). DALI has Lanczos3 for enlarging but no box filter: its cubic came closest.
_STORE_MODE = "bicubic"
_DALI_STORE_SHRINK = "INTERP_CUBIC"


class NvjpegDecoder(_DeviceBatchDecoder):
    """torchvision.io.decode_jpeg on a batch (nvJPEG on CUDA, libjpeg on CPU), torch resizing.

    Every line runs the same on a CPU device (that is how the tests cover it); only the device
    differs on a GPU machine.
    """

    name = "nvjpeg"

    def _decode(self, bodies: list[bytes], sizes: list[tuple[int, int]]) -> _Pixels:
        images = self._decode_jpegs(bodies)
        rows = [k for k, image in enumerate(images)
                if image is not None and (image.shape[2], image.shape[1]) == sizes[k]]
        mode = self._store_mode()
        clips, watermarks, stored = [], [], []
        for k in rows:
            width, height = sizes[k]
            source = _FloatSource(images[k])
            if self.clip is not None:
                clips.append(_render(source, clip_window(self.clip, width, height), clip_interpolation(self.clip)))
            if self.watermark_size_px:
                side = self.watermark_size_px
                watermarks.append(_render(source, Window(side, side, 0, 0, side, side), "bilinear"))
            if mode is not None:
                window = stored_window(width, height, self.cfg.image_size, mode, self.cfg.border_fill)
                stored.append(_render(source, window, _STORE_MODE))
        return _Pixels(rows, torch.stack(clips) if clips else None,
                       torch.stack(watermarks) if watermarks else None,
                       stored if mode is not None else None)

    def _decode_jpegs(self, bodies: list[bytes]) -> list[torch.Tensor | None]:
        """uint8 (3, H, W) RGB per body on the device; None where decoding failed. One batched
        call; when it fails, each image alone, so one bad body costs only itself."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(body), dtype=torch.uint8) for body in bodies]
        try:
            return list(decode_jpeg(data, device=self.device, mode=ImageReadMode.RGB))
        except RuntimeError as exc:
            log.debug("batched decode_jpeg failed (%s); decoding %d images one by one", exc, len(data))
        images: list[torch.Tensor | None] = []
        for encoded in data:
            try:
                images.append(decode_jpeg(encoded, device=self.device, mode=ImageReadMode.RGB))
            except RuntimeError as exc:
                log.debug("decode_jpeg failed: %s", exc)
                images.append(None)
        return images


class _FloatSource:
    """A decoded image as float32 (1, 3, H, W), converted once and only if something resizes."""

    def __init__(self, image: torch.Tensor):
        self.image = image  # uint8 (3, H, W)
        self._float: torch.Tensor | None = None

    def as_float(self) -> torch.Tensor:
        if self._float is None:
            self._float = self.image.unsqueeze(0).float()
        return self._float


def _render(source: _FloatSource, window: Window, mode: str) -> torch.Tensor:
    """One output of `window`'s geometry: uint8 (out_h, out_w, 3) RGB on the image's device."""
    _, height, width = source.image.shape
    if (window.resized_w, window.resized_h) == (width, height):
        resized = source.image
    else:
        size = (window.resized_h, window.resized_w)
        out = F.interpolate(source.as_float(), size=size, mode=mode, align_corners=False, antialias=True)
        resized = out[0].round_().clamp_(0, 255).to(torch.uint8)
    return _place(resized, window).permute(1, 2, 0)


def _place(image: torch.Tensor, window: Window) -> torch.Tensor:
    """uint8 (3, h, w) resized image -> (3, out_h, out_w): the window's crop, padded with fill."""
    _, height, width = image.shape
    x0, y0 = max(window.x, 0), max(window.y, 0)
    x1, y1 = min(window.x + window.out_w, width), min(window.y + window.out_h, height)
    if (x0, y0, window.out_w, window.out_h) == (window.x, window.y, x1 - x0, y1 - y0):
        return image[:, y0:y1, x0:x1]  # a plain crop
    canvas = image.new_full((3, window.out_h, window.out_w), window.fill)
    if x1 > x0 and y1 > y0:
        canvas[:, y0 - window.y:y1 - window.y, x0 - window.x:x1 - window.x] = image[:, y0:y1, x0:x1]
    return canvas


# -- DALI ------------------------------------------------------------------------------------

def _import_dali() -> tuple[ModuleType, ModuleType, Any]:
    """(nvidia.dali.fn, nvidia.dali.types, Pipeline); ConfigError naming the package if absent."""
    try:
        importlib.import_module("nvidia.dali")
        fn = importlib.import_module("nvidia.dali.fn")
        types = importlib.import_module("nvidia.dali.types")
        pipeline = importlib.import_module("nvidia.dali.pipeline")
    except ImportError as exc:
        log.debug("nvidia.dali does not import: %s", exc)
        raise ConfigError(f"--decoder dali needs {DALI_PACKAGE} (pip install 'fastlaion[gpu]')") from None
    return fn, types, pipeline.Pipeline


def import_nvimgcodec() -> ModuleType:
    try:
        from nvidia import nvimgcodec
    except ImportError:
        raise ConfigError("the nvimgcodec stored-image encoder needs NVIDIA nvImageCodec: "
                          "pip install nvidia-nvimgcodec-cu13 (DALI installs it)") from None
    return nvimgcodec


def nvimgcodec_importable() -> bool:
    try:
        import_nvimgcodec()
    except ConfigError:
        return False
    return True


def dali_importable() -> bool:
    try:
        _import_dali()
    except ConfigError:
        return False
    return True


class DaliDecoder(_DeviceBatchDecoder):
    """An NVIDIA DALI pipeline: encoded bytes in, CLIP / watermark / stored pixels out.

    Each image's geometry differs, so the host computes it (`clip_windows` / `stored_windows`, the
    CPU path's arithmetic for a whole batch) and feeds it beside the bytes: resize targets as per-sample resize_x/resize_y, crop or pad as a
    per-sample slice anchor and shape. Built once for `max_batch_size`; larger batches are split.
    """

    name = "dali"

    def __init__(self, cfg: DecodeConfig, clip: ClipInputSpec | None, watermark_size_px: int | None,
                 device: torch.device, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, exact_chroma: bool = True,
                 stored_encode: str = "host", hw_decoder_load: float | None = None, concurrency: int = 2):
        super().__init__(cfg, clip, watermark_size_px, device, max_batch_size, stored_encode, concurrency)
        # The share of the images DALI gives the GPU's hardware JPEG decoder (A100, H100, H200),
        # the rest decoded with the CPU's threads doing the Huffman decoding; None: DALI's default.
        self.hw_decoder_load = hw_decoder_load
        # exact_chroma: libjpeg's smooth ("fancy") chroma upsampling, for parity with the CPU
        # decoder; False lets DALI use its fastest path (the GPU's hardware JPEG decoder).
        self.exact_chroma = exact_chroma
        self._fn, self._types, self._pipeline_cls = _import_dali()
        # One pipeline per finish() running at once (a DALI pipeline runs one batch at a time).
        # The first is built here, so a pipeline that cannot build fails at once; more on demand.
        self._idle_pipes = [self._build()]
        self._pipes_lock = threading.Condition()
        self._may_build = True  # False once building another pipeline failed: the threads share

    def _build(self) -> Any:
        fn, types = self._fn, self._types
        on_gpu = self.device.type == "cuda"
        pipe = self._pipeline_cls(batch_size=self.max_batch_size,
                                  num_threads=self.cfg.threads or usable_cores(),
                                  device_id=self.device.index if on_gpu else None,
                                  prefetch_queue_depth=1, exec_dynamic=True)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # Fancy (smooth) chroma upsampling, as libjpeg does by default, for parity with the CPU.
            # EXIF orientation is not applied, as the CPU decoder does not (DALI's default would
            # rotate the pixels, then squash them into the unrotated image's geometry).
            hw = {} if self.hw_decoder_load is None or not on_gpu else {"hw_decoder_load": self.hw_decoder_load}
            images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                       jpeg_fancy_upsampling=self.exact_chroma, adjust_orientation=False, **hw)
            outputs, names = [], []  # names: assigned once built (another thread may be reading them)
            if self.clip is not None:
                names.append("clip")
                interp = types.INTERP_CUBIC if clip_interpolation(self.clip) == "bicubic" else types.INTERP_LINEAR
                fill = self.clip.fill_color if self.clip.resize_mode == "longest" else 0
                outputs.append(self._branch(images, "clip", fill, interp_type=interp, antialias=True))
            if self.watermark_size_px:
                names.append("watermark")
                side = float(self.watermark_size_px)
                outputs.append(fn.resize(images, resize_x=side, resize_y=side,
                                         interp_type=types.INTERP_LINEAR, antialias=True))
            if self._store_mode() is not None:
                names.append("stored")
                outputs.append(self._branch(images, "stored", self.cfg.border_fill,
                                            min_filter=getattr(types, _DALI_STORE_SHRINK),
                                            mag_filter=types.INTERP_LANCZOS3, antialias=True))
            if not outputs:  # nothing to resize: decode anyway, to find the bodies that fail
                names.append("decoded")
                outputs.append(images)
            pipe.set_outputs(*outputs)
        try:
            pipe.build()
        except RuntimeError as exc:
            raise ConfigError(f"--decoder dali could not build its pipeline on {self.device}: "
                              f"{first_line(exc)}") from None
        self._output_names = names  # the same names for every pipeline built
        return pipe

    def _branch(self, images: Any, prefix: str, fill: int, **resize_args: Any) -> Any:
        """resize to per-sample (resize_x, resize_y), then the per-sample window (crop or pad)."""
        fn, types = self._fn, self._types
        resize_x = fn.external_source(name=f"{prefix}_resize_x", dtype=types.FLOAT, ndim=0)
        resize_y = fn.external_source(name=f"{prefix}_resize_y", dtype=types.FLOAT, ndim=0)
        anchor = fn.external_source(name=f"{prefix}_anchor", dtype=types.INT32, ndim=1)  # (y, x)
        shape = fn.external_source(name=f"{prefix}_shape", dtype=types.INT32, ndim=1)  # (h, w)
        resized = fn.resize(images, resize_x=resize_x, resize_y=resize_y, **resize_args)
        return fn.slice(resized, anchor, shape, axis_names="HW", normalized_anchor=False,
                        normalized_shape=False, out_of_bounds_policy="pad", fill_values=float(fill))

    def _inputs(self, bodies: list[bytes], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        inputs: dict[str, Any] = {"encoded": [np.frombuffer(body, dtype=np.uint8) for body in bodies]}
        size_array = np.array(sizes, dtype=np.int64).reshape(-1, 2)
        width, height = size_array[:, 0], size_array[:, 1]
        branches: list[tuple[str, WindowArrays]] = []
        if self.clip is not None:
            branches.append(("clip", clip_windows(self.clip, width, height)))
        mode = self._store_mode()
        if mode is not None:
            branches.append(("stored", stored_windows(width, height, self.cfg.image_size, mode)))
        for prefix, windows in branches:
            inputs[f"{prefix}_resize_x"] = windows.resized_w.astype(np.float32)
            inputs[f"{prefix}_resize_y"] = windows.resized_h.astype(np.float32)
            inputs[f"{prefix}_anchor"] = np.stack([windows.y, windows.x], axis=1).astype(np.int32)
            inputs[f"{prefix}_shape"] = np.stack([windows.out_h, windows.out_w], axis=1).astype(np.int32)
        return inputs

    def _decode(self, bodies: list[bytes], sizes: list[tuple[int, int]]) -> _Pixels:
        parts = self._run_isolating_failures(list(range(len(bodies))), bodies, sizes)
        rows = [row for part_rows, _ in parts for row in part_rows]

        def dense(name: str) -> torch.Tensor | None:
            tensors = [out[name] for _, out in parts if name in out]
            if not tensors:
                return None
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

        stored: list[torch.Tensor] | torch.Tensor | None = None
        if self._store_mode() is not None:
            outs = [out["stored"] for _, out in parts]
            if all(isinstance(o, torch.Tensor) for o in outs) and len({o.shape[1:] for o in outs}) <= 1:
                stored = dense("stored")
            else:  # sizes differ (keep_ratio), within a run or between the runs of a bisected batch
                stored = [im for o in outs for im in (o.unbind(0) if isinstance(o, torch.Tensor) else o)]
        return _Pixels(rows, dense("clip"), dense("watermark"), stored)

    def _run_isolating_failures(self, rows: list[int], bodies: list[bytes], sizes: list[tuple[int, int]]
                                ) -> list[tuple[list[int], dict[str, Any]]]:
        """Run the pipeline on `rows`; DALI fails a whole batch for one bad image, so on failure
        bisect down to the single images that fail (they go to the CPU decoder)."""
        try:
            return [(rows, self._run([bodies[r] for r in rows], [sizes[r] for r in rows]))]
        except RuntimeError as exc:
            if len(rows) == 1:
                log.debug("DALI could not decode an image: %s", first_line(exc))
                return []
        mid = len(rows) // 2
        return (self._run_isolating_failures(rows[:mid], bodies, sizes)
                + self._run_isolating_failures(rows[mid:], bodies, sizes))

    def _run(self, bodies: list[bytes], sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """One pipeline run: 'clip' and 'watermark' as dense uint8 (N, H, W, 3) tensors, 'stored'
        too when all have one size, else a list of (h, w, 3) tensors (keep_ratio). DLPack views of
        DALI's buffers, which its dynamic executor leaves to us; run() without a stream returns
        once they are ready."""
        with self._phase("dali_inputs"):
            inputs = self._inputs(bodies, sizes)
        pipe = self._acquire_pipe()
        try:
            with self._phase("dali_run"):
                outputs = pipe.run(**inputs)
            with self._phase("dali_outputs"):
                converted: dict[str, Any] = {}
                for name, tensor_list in zip(self._output_names, outputs, strict=True):
                    if name == "decoded":
                        continue
                    if name == "stored" and not tensor_list.is_dense_tensor():
                        converted[name] = [torch.from_dlpack(tensor_list[i]) for i in range(len(tensor_list))]
                    else:
                        converted[name] = torch.from_dlpack(tensor_list.as_tensor())
        finally:
            with self._pipes_lock:
                self._idle_pipes.append(pipe)
                self._pipes_lock.notify()
        return converted

    def _acquire_pipe(self) -> Any:
        """An idle pipeline; a new one while none is idle (up to one per finish() thread), or,
        if building one failed (GPU memory, say), the next that comes free."""
        with self._pipes_lock:
            if self._idle_pipes:
                return self._idle_pipes.pop()
            build = self._may_build
        if build:
            try:
                return self._build()
            except ConfigError as exc:
                log.warning("DALI could not build another pipeline (%s); batches take turns on those built", exc)
                with self._pipes_lock:
                    self._may_build = False
        with self._pipes_lock:
            self._pipes_lock.wait_for(lambda: bool(self._idle_pipes))
            return self._idle_pipes.pop()


# -- choosing one ----------------------------------------------------------------------------

def _with_index(device: torch.device) -> torch.device:
    """cuda -> cuda:N (the current device), so every output lands where DALI puts it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _nvjpeg_problem(device: torch.device) -> str | None:
    """Why torchvision cannot decode a JPEG on `device` (None: it can)."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "a CUDA device (torch.cuda.is_available() is False)"
    from torchvision.io import decode_jpeg

    probe = np.zeros((8, 8, 3), dtype=np.uint8)
    try:
        encoded = shared_turbojpeg().encode(probe, pixel_format=turbojpeg.TJPF_RGB)
        decode_jpeg(torch.frombuffer(bytearray(encoded), dtype=torch.uint8), device=_with_index(device))
    except RuntimeError as exc:
        return f"torchvision built with nvJPEG ({first_line(exc)})"
    return None


def available_decoders(device: torch.device) -> list[str]:
    """Which of 'dali', 'nvjpeg', 'cpu' can run on `device`, best first.

    On CUDA: dali (if nvidia.dali imports), nvjpeg (if torchvision decodes there), cpu. On the
    CPU, the CPU decoder is best (DCT-scaled decoding); nvjpeg and dali run their CPU modes.
    """
    dali = ["dali"] if dali_importable() else []
    if device.type == "cuda":
        return [*dali, *(["nvjpeg"] if _nvjpeg_problem(device) is None else []), "cpu"]
    return ["cpu", "nvjpeg", *dali]


def make_decoder(name: str, cfg: DecodeConfig, clip: ClipInputSpec | None, watermark_size_px: int | None,
                 device: torch.device, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 exact_chroma: bool = True, stored_encode: str = "host",
                 hw_decoder_load: float | None = None, concurrency: int = 2) -> BatchDecoder:
    """The decoder `name` ('auto' | 'cpu' | 'nvjpeg' | 'dali') on `device`.

    'auto' takes the best of `available_decoders(device)` that builds (dali, then nvjpeg, on
    CUDA; cpu on the CPU), and says so in the log. An explicit name that cannot run here raises
    ConfigError naming what is missing; 'nvjpeg' and 'dali' on a CPU device run their CPU modes
    (for tests and dry runs).
    """
    if name not in DECODERS:
        raise ConfigError(f"--decoder must be one of {', '.join(DECODERS)}, got {name!r}")
    if name == "auto":
        candidates = available_decoders(device)
        for candidate in candidates:
            try:
                decoder = make_decoder(candidate, cfg, clip, watermark_size_px, device, max_batch_size=max_batch_size,
                                       exact_chroma=exact_chroma, stored_encode=stored_encode,
                                       hw_decoder_load=hw_decoder_load, concurrency=concurrency)
            except ConfigError as exc:
                log.warning("decoder %s cannot run: %s; trying the next one", candidate, exc)
                continue
            return decoder
        raise AssertionError("the cpu decoder always builds")
    if name == "cpu":
        decoder: BatchDecoder = CpuBatchDecoder(cfg, clip, watermark_size_px)
    elif name == "nvjpeg":
        problem = _nvjpeg_problem(device)
        if problem is not None:
            raise ConfigError(f"--decoder nvjpeg on {device} needs {problem}")
        decoder = NvjpegDecoder(cfg, clip, watermark_size_px, device, max_batch_size, stored_encode, concurrency)
    else:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--decoder dali on {device} needs a CUDA device (torch.cuda.is_available() is False)")
        decoder = DaliDecoder(cfg, clip, watermark_size_px, device, max_batch_size, exact_chroma, stored_encode,
                              hw_decoder_load, concurrency)
    log.debug("decoder: %s on %s", decoder.name, decoder.device)  # the caller logs its choice
    return decoder


__all__ = ["BatchDecoder", "CpuBatchDecoder", "DaliDecoder", "NvjpegDecoder", "Window", "WindowArrays",
           "available_decoders", "clip_interpolation", "clip_window", "clip_windows", "dali_importable",
           "jpeg_has_eoi_after_scan", "make_decoder", "read_complete_jpeg_header", "stored_window", "stored_windows"]
