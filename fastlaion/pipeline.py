"""The one module that knows the order of the stages and wires them.

    input rows -> download -> decode/resize -> CLIP score -> similarity filter -> write

Per shard, a fixed pool of download coroutines pulls URLs from a bounded queue; each body is
decoded in a thread pool as soon as it arrives (so at most `workers` raw bodies are alive), and
decoded rows are gathered into `Batch`es of `score.batch_size` rows that are scored and written
while downloads continue. A bounded queue between the two sides gives back-pressure. The next
shard starts as soon as the current one's downloads are down to their tail (at most two shards
in flight), and on a GPU the next batch decodes on its own CUDA stream while this one scores. Rows leave
a batch only through `Batch.drop`, with a stage and a reason; the shard's Parquet holds every
input row. Finished shards are skipped on a rerun (see `writer`); with `--retry-failed` a rerun
also downloads again the rows of finished shards that failed for a transient reason (timeouts,
5xx, 429, connection errors, an unreachable robots.txt: `download.is_transient`) and rewrites those shards with the new
outcomes merged in, leaving every other shard's files untouched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from .batch import Batch, funnel, merge_funnels
from .config import (
    LAION_MAX_TEXT_CHARS, MODEL_BUILD, MODEL_BUILD_KEY, ConfigError, InputConfig, InputFormat, RunConfig, gelu_built_models,
    no_file_above, oversubscribed, resume_key, usable_cores,
)
from .decode import Decoded, Decoder
from .download import TLS_ERROR, Downloader, Fetched, download_all, is_transient, new_event_loop
from .dataset.source import MANIFEST_FILE, METADATA_FILE, shard_identity
from .interrupt import run_until_stopped
from .reader import InputRows, open_inputs, shard_count, write_rows
from .writer import (
    LOCK_FILE,  # noqa: F401 (fastlaion.pipeline.LOCK_FILE, beside output_lock)
    CONFIG_FILE,
    PARTIAL_DIR,
    SUMMARY_FILE,
    ShardWriteError,
    ShardWriter,
    WRITE_ID,
    any_finished,
    damage,
    finished_shards,
    is_complete,
    mark_incomplete,
    new_write_id,
    output_lock,
    read_stats,
    recover_partial,
    replace_text,
    shard_files,
    shard_name,
)

if TYPE_CHECKING:
    from .language import BatchLanguages
    from .ray_workers import RayCluster

log = logging.getLogger(__name__)


class Progress:
    """Callbacks the pipeline makes as work proceeds; the CLI draws a progress bar from them."""

    def extracting(self) -> Any:
        """An `extract.ExtractProgress` for the extraction that precedes a Common Crawl run."""
        return None

    def reading_input(self, rows: int) -> None:
        """`rows` more input rows checked and written for the shards to read (before `start`)."""

    def start(self, shards_total: int, shards_done: int, rows_total: int, rows_done: int) -> None: ...

    def rows_done(self, rows: int, kept: int, busy_s: dict[str, float] | None = None,
                  shard: int | None = None) -> None:
        """`rows` more rows finished (`kept` of them kept); `busy_s`: seconds each stage spent on
        them (decode: summed over its threads), from which the bar shows per-stage rates. `shard`:
        the shard they are of, as the pipeline reports them to a worker's progress, which passes
        it on to drive (workers.drive); the progress `run` is given is not told it."""

    def rows_undone(self, rows: int, kept: int, busy_s: dict[str, float] | None = None) -> None:
        """Take back a `rows_done` call's rows: those of a worker dropped with its lost Ray node,
        for a shard it had not finished, which another worker runs again (workers.drive)."""

    def shard_done(self, stats: dict[str, Any]) -> None: ...


@dataclass
class RunSummary:
    output_dir: str
    shards_total: int
    shards_run: int  # shards processed by this invocation
    shards_skipped: int  # shards found complete and left as they were
    funnel: dict[str, Any]  # over all shards of the output, previous runs included
    caption_edits: dict[str, int]
    timings_s: dict[str, float] = field(default_factory=dict)  # this invocation's stage totals
    wall_s: float = 0.0
    # one name per worker of this run: its device, or ray:NODE:DEVICE for a Ray actor (ray_workers.Slot.label)
    workers: list[str] = field(default_factory=list)
    # Rows of the output whose download failed for a reason worth retrying, by reason.
    transient: dict[str, int] = field(default_factory=dict)
    # --retry-failed: finished shards rewritten by this invocation, the rows downloaded again,
    # how many of those are kept now and how many failed transiently again.
    retried: dict[str, int] = field(default_factory=lambda: {"shards": 0, "rows": 0, "kept": 0, "failed_again": 0})
    shards_failed: list[dict[str, Any]] = field(default_factory=list)  # {shard, error}: not written
    shards_redone: list[int] = field(default_factory=list)  # the previous run's failed shards, done now
    # The output's finished shards by what scored them ("bf16 on cpu": 3; scoring_of), those of
    # an earlier fastlaion, which did not record it, left out.
    scoring: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def notes(self) -> list[str]:
        """What happened beyond the funnel, one line each (the CLI prints them)."""
        lines = [f"shard {shard_name(f['shard'])} failed and was not written ({f['error']}); "
                 "the shards finished are kept: rerun the same command to redo the rest" for f in self.shards_failed]
        if self.shards_redone:
            lines.append(f"redone: {len(self.shards_redone)} shard(s) that the previous run could not write "
                         f"({', '.join(shard_name(s) for s in self.shards_redone)})")
        r = self.retried
        if r["shards"]:
            lines.append(f"retried: {r['rows']:,} row(s) that had failed transiently, in {r['shards']} shard(s): "
                         f"{r['kept']:,} kept now, {r['failed_again']:,} failed transiently again")
        if self.transient:
            why = ", ".join(f"{reason} {n:,}" for reason, n in self.transient.items())
            lines.append(f"{sum(self.transient.values()):,} row(s) failed for transient reasons ({why}); "
                         "rerun with --retry-failed to download only those again")
        if len(self.scoring) > 1:
            ways = ", ".join(f"{way} ({n} shard{'s' if n > 1 else ''})" for way, n in self.scoring.items())
            lines.append(f"the output's shards were scored in more than one way ({ways}): a resume on another "
                         "device or CPU; their similarities differ by float rounding (bf16 from fp32: up to about "
                         "0.002), so a pair at the threshold may be kept in one and dropped in another")
        return lines + self._download_hints()

    def _download_hints(self) -> list[str]:
        """A line where most rows failed the same way and the likely cause is this machine's,
        not the sites': no CA certificates (every HTTPS site's certificate fails to verify), or a
        network reached only through a proxy, which fastlaion does not use."""
        f = self.funnel
        drops, n = f["drops"]["download"], f["input"]
        lines = []
        tls = drops.get(TLS_ERROR, 0)
        if tls >= HINT_MIN_ROWS and tls >= n / 2:
            lines.append(f"{tls:,} of {n:,} rows failed TLS verification (tls_error): if this machine lacks CA "
                         "certificates (a minimal container), install them (Debian: ca-certificates) or point "
                         "SSL_CERT_FILE at a bundle, then rerun with the same arguments into a new folder")
        proxies = [k for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
                   if os.environ.get(k)]
        if proxies and n >= HINT_MIN_ROWS and f["downloaded"] == 0:
            lines.append(f"nothing was downloaded, and {proxies[0]} is set: fastlaion connects directly and uses no "
                         "proxy (one would bypass its private-address checks); run it where the sites can be "
                         "reached directly")
        return lines


def run(cfg: RunConfig, progress: Progress | None = None) -> RunSummary:
    """Run the whole pipeline for `cfg`, resuming into an existing output folder; with
    `cfg.retry_failed`, also retry the transient failures of the shards finished before.

    A shard that cannot be written (disk full) stops the run with `ShardWriteError`; the
    summary is written first and names it, and a rerun redoes it.
    """
    t0 = time.perf_counter()
    progress = progress or Progress()
    cfg.validate()
    out = Path(cfg.output_dir)
    no_file_above("--output", out)
    if cfg.retry_failed and not (out / CONFIG_FILE).exists():
        raise ConfigError(f"--retry-failed: {out} holds no earlier run whose failed rows could be retried")
    with ExitStack() as cluster:
        # where the workers go, first: a wrong --gpus or --ray is told before anything is read or written
        if cfg.parallel.ray is not None:
            from .ray_workers import ray_cluster

            placed: list[str] | RayCluster = cluster.enter_context(ray_cluster(cfg.parallel.ray, cfg.parallel))
        else:
            placed = worker_devices(cfg)
        return _run_inputs(cfg, out, progress, t0, placed, cluster)


def _run_inputs(cfg: RunConfig, out: Path, progress: Progress, t0: float, placed: list[str] | RayCluster,
                cluster: ExitStack) -> RunSummary:
    fresh = not out.exists()
    try:
        with ExitStack() as held:  # the output folder's lock (prepare_output), released last
            return _run_locked(cfg, out, progress, t0, placed, cluster, held, fresh)
    finally:
        if fresh:
            try:
                out.rmdir()  # a folder this run made, left empty (bad input, or Ctrl-C before any shard)
            except OSError:
                pass


def _run_locked(cfg: RunConfig, out: Path, progress: Progress, t0: float, placed: list[str] | RayCluster,
                cluster: ExitStack, held: ExitStack, fresh: bool) -> RunSummary:
    extracted = needs_extraction(cfg.input)
    blank_lines_are_rows = False  # (candidates are Parquet)
    if extracted:
        inputs = open_inputs(extract_candidates(cfg, out, progress, held, fresh), need_captions=cfg.score.enabled)
        fresh = False  # the candidates are kept: a rerun reuses them
    else:  # every problem with the inputs is told before the output folder is touched
        inputs = open_inputs(cfg.input, need_captions=cfg.score.enabled)
        blank_lines_are_rows = prepare_output(out, cfg, held) < INPUT_BUILD
    rows_dir = out / PARTIAL_DIR / ROWS_DIR
    try:
        try:
            rows = write_rows(inputs, rows_dir, cfg.input.max_caption_chars, progress.reading_input,
                              blank_lines_are_rows=blank_lines_are_rows)
            if not rows.height and not extracted:  # a header only, or an empty file
                paths = cfg.input.paths
                raise ConfigError(f"the input{'s have' if len(paths) > 1 else ' has'} no rows: {', '.join(paths)}; "
                                  "nothing to download")
        except BaseException:
            # A problem only reading the rows shows (a bad byte deep in a csv), or Ctrl-C: a folder
            # this run made holds nothing yet, so it goes, and a rerun may use other settings.
            if fresh:
                (out / CONFIG_FILE).unlink(missing_ok=True)
            raise
        return _run_shards(cfg, out, rows, progress, t0, placed)
    finally:
        cluster.close()  # a Ray cluster's actors, which may still read the rows, gone before they are
        shutil.rmtree(rows_dir, ignore_errors=True)  # this run's copy of the inputs, never part of the output
        try:
            (out / PARTIAL_DIR).rmdir()  # .partial/: empty once every started shard finished or was aborted
        except OSError:
            pass


def _run_shards(cfg: RunConfig, out: Path, rows: InputRows, progress: Progress, t0: float,
                placed: list[str] | RayCluster) -> RunSummary:
    """Run the shards of `rows` not finished yet (and with --retry-failed, retry the finished
    ones' transient failures) on the workers `placed` (worker_devices, or a Ray cluster's);
    summarize the whole output."""
    n_shards = shard_count(rows.height, cfg.input.shard_size)
    _check_finished_rows(out, rows.height, cfg.input.shard_size)
    for s in range(n_shards):  # a finished shard whose files were since lost or cut is run again
        problem = damage(out, s) if is_complete(out, s) else None
        if problem:
            log.warning("shard %s: %s; it is run again", shard_name(s), problem)
            mark_incomplete(out, s)
    todo = [s for s in range(n_shards) if not is_complete(out, s)]
    todo_set = set(todo)
    # --retry-failed: finished shards with transient failures, and how many rows each downloads again
    again = {s: sum(transient_drops(read_stats(out, s)["funnel"]).values())
             for s in range(n_shards) if cfg.retry_failed and s not in todo_set}
    retry = [s for s, n in again.items() if n]
    # done before this run starts: the finished shards' rows, less those downloaded again (the
    # progress counts them as they finish)
    rows_done = sum(min(cfg.input.shard_size, rows.height - s * cfg.input.shard_size)
                    for s in range(n_shards) if s not in todo_set) - sum(again.values())
    previously_failed = _failed_last_time(out)

    timings: dict[str, float] = {}
    jobs = sorted(todo + retry)
    ray_pool = None
    if not jobs:
        devices = []
    elif isinstance(placed, list):
        # CPU workers: no more processes than shards to run (--processes 64 on one shard started
        # 64, each loading the models, to leave 63 idle; memory ran out before they did)
        devices = placed if cfg.parallel.gpus is not None else placed[:len(jobs)]
        par = cfg.parallel
        asked = (f"--processes {par.processes}" if par.gpus is None
                 else f"--gpus {par.gpus} --workers-per-gpu {par.workers_per_gpu}")
        # downloads in flight come from --workers (asyncio), not from processes
        if len(devices) > 1 and (warning := oversubscribed(len(devices), asked, "each loads its own models",
                                                           "for more downloads at once raise --workers")):
            log.warning("%s", warning)
    else:
        ray_pool = placed.workers(cfg, out, rows)
        devices = ray_pool.devices
    progress.start(n_shards, n_shards - len(jobs), rows.height, rows_done)
    tally = _Tally(progress)
    try:
        if ray_pool is not None:
            from .workers import drive

            timings = drive(ray_pool, jobs, tally)
        elif len(devices) == 1:
            timings = work(_on_device(cfg, devices[0]), out, rows, iter(jobs), tally)
        elif devices:
            from .workers import run_workers

            timings = run_workers(cfg, out, rows, jobs, devices, tally)
    except ShardWriteError as exc:
        try:  # the summary of a run stopped by a failed shard still says what happened
            _summarize(out, n_shards, tally, timings, t0, devices, [{"shard": exc.shard, "error": exc.what}],
                       previously_failed)
        except OSError as also:  # the disk that failed the shard may refuse the summary too
            log.warning("summary.json not written: %s", also.strerror or also)
        raise
    return _summarize(out, n_shards, tally, timings, t0, devices, [], previously_failed)


def _check_finished_rows(out: Path, n_rows: int, shard_size: int) -> None:
    """Refuse a resume whose input gives other rows than the finished shards hold: each must have
    the rows its place in the input has now. An input file's mark (prepare_output) finds most
    changes first; a pipe (`run <(head -n 7 urls.txt)` after `<(head -n 6 ...)`) has none, and
    the resume called the first shard complete and lost the 7th row."""
    for s in finished_shards(out):
        want = min(shard_size, n_rows - s * shard_size) if s * shard_size < n_rows else 0
        try:
            stats = read_stats(out, s)
            had = stats.get("rows", stats["funnel"]["input"])
        except (OSError, ValueError, TypeError, KeyError):
            continue  # unreadable: damage() finds it and the shard is run again
        if had != want:
            raise ConfigError(f"the input changed since the run in {out} began: it gives {n_rows:,} rows now, "
                              f"where shard {shard_name(s)} holds {had:,} of them, not {want:,}; resuming would "
                              "lose or repeat rows; give the same rows, or choose another output folder")


def transient_drops(shard_funnel: dict[str, Any]) -> dict[str, int]:
    """The download drops of a funnel worth retrying, by reason."""
    return {r: n for r, n in shard_funnel["drops"]["download"].items() if is_transient(r)}


def transient_rows(table: pl.DataFrame) -> np.ndarray:
    """Positions (= shard rows) of a shard table's rows dropped at download for a transient reason."""
    reasons = [r for r in table["reason"].drop_nulls().unique().to_list() if is_transient(r)]
    mask = (table["stage"] == "download") & table["reason"].is_in(reasons)
    return np.flatnonzero(mask.fill_null(False).to_numpy())


class _Tally:
    """Passes progress on, and notes each shard this invocation finished, with its last retry
    (this process sees every one of them, also those of worker processes)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.finished: list[dict[str, Any]] = []

    def extracting(self) -> Any:
        return self.inner.extracting()

    def start(self, shards_total: int, shards_done: int, rows_total: int, rows_done: int) -> None:
        self.inner.start(shards_total, shards_done, rows_total, rows_done)

    def rows_done(self, rows: int, kept: int, busy_s: dict[str, float] | None = None,
                  shard: int | None = None) -> None:
        self.inner.rows_done(rows, kept, busy_s)

    def rows_undone(self, rows: int, kept: int, busy_s: dict[str, float] | None = None) -> None:
        undone = getattr(self.inner, "rows_undone", None)  # a caller's progress object may predate it
        if undone is not None:
            undone(rows, kept, busy_s)

    def shard_done(self, stats: dict[str, Any]) -> None:
        # what the summary needs, not the whole stats (a long run finishes many thousand shards)
        noted = {"shard": stats["shard"]}
        if "retries" in stats:
            noted["retries"] = stats["retries"][-1:]
        self.finished.append(noted)
        self.inner.shard_done(stats)


def _failed_last_time(out: Path) -> list[int]:
    try:
        return [f["shard"] for f in json.loads((out / SUMMARY_FILE).read_text()).get("shards_failed", [])]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def _summarize(out: Path, n_shards: int, tally: _Tally, timings: dict[str, float], t0: float,
               devices: list[str], failed: list[dict[str, Any]], previously_failed: list[int]) -> RunSummary:
    """The summary over every finished shard of the output, saved as summary.json."""
    all_stats = [read_stats(out, s) for s in range(n_shards) if is_complete(out, s)]
    edits: dict[str, int] = {}
    for st in all_stats:
        for k, v in st["caption_edits"].items():
            edits[k] = edits.get(k, 0) + v
    f = merge_funnels([st["funnel"] for st in all_stats])
    retried = {"shards": 0, "rows": 0, "kept": 0, "failed_again": 0}
    for st in tally.finished:
        if "retries" in st:  # only a --retry-failed pass writes them
            retried["shards"] += 1
            for k in ("rows", "kept", "failed_again"):
                retried[k] += st["retries"][-1][k]
    finished = {st["shard"] for st in tally.finished}
    summary = RunSummary(
        output_dir=str(out), shards_total=n_shards, shards_run=len(finished),
        shards_skipped=len(all_stats) - len(finished), funnel=f, caption_edits=edits,
        timings_s={k: round(v, 3) for k, v in timings.items()}, wall_s=round(time.perf_counter() - t0, 3),
        workers=devices, transient=transient_drops(f), retried=retried, shards_failed=failed,
        shards_redone=[s for s in previously_failed if s in finished],
        scoring=dict(sorted(Counter(st["scoring"] for st in all_stats if isinstance(st.get("scoring"), str)).items())),
    )
    replace_text(out / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2))
    return summary


def worker_devices(cfg: RunConfig) -> list[str]:
    """One entry per worker process: the device its models and decoder use ('auto', 'cpu',
    'cuda:N', --workers-per-gpu entries per GPU). One entry means the work runs in this process.
    (With --ray, fastlaion.ray_workers.plan places the workers on the cluster's nodes.)"""
    par = cfg.parallel
    if cfg.decode.decoder in ("nvjpeg", "dali") and cfg.score.device == "auto" and par.gpus is None:
        import torch

        if not torch.cuda.is_available():  # told before the models load and the output folder is made; its
            # CPU mode (tests, CI) is for --device cpu
            choice = cfg.decode.decoder
            raise ConfigError(f"--decoder {choice}: no CUDA GPU is available here; use --decoder cpu or auto "
                              f"(or --device cpu to run {choice}'s CPU mode)")
    if par.gpus is not None:
        import torch

        visible = torch.cuda.device_count()
        if visible == 0:
            raise ConfigError("--gpus: no CUDA GPU is visible here; leave --gpus out to run on the CPU "
                              "(--processes N for several CPU workers)")
        wanted = visible if par.gpus == "all" else int(par.gpus)
        if wanted > visible:
            raise ConfigError(f"--gpus {wanted}: only {visible} GPU(s) visible")
        return [f"cuda:{i}" for i in range(wanted) for _ in range(par.workers_per_gpu)]
    return [cfg.score.device] * (par.processes or usable_cores())


def _on_device(cfg: RunConfig, device: str) -> RunConfig:
    return dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, device=device))


def work(cfg: RunConfig, out: Path, rows: InputRows, shard_ids: Iterator[int], progress: Progress,
         on_ready: Callable[[float], None] | None = None) -> dict[str, float]:
    """Load the models once, then download, decode, score and write each shard `shard_ids`
    yields (a list here, asked for one at a time in a worker), reading each shard's input rows
    from `rows` when it starts. Returns stage seconds."""
    timings: dict[str, float] = {}
    with _timer(timings, "load_models"):
        models = Models.load(cfg)
    try:  # from here on, whatever fails ends the language process with the rest
        with _timer(timings, "load_models"):
            decoder = make_run_decoder(cfg, models)
        if on_ready is not None:
            on_ready(timings["load_models"])
        _work_shards(cfg, out, rows, shard_ids, progress, models, decoder, timings)
    finally:
        models.close()
    return timings


def _work_shards(cfg: RunConfig, out: Path, rows: InputRows, shard_ids: Iterator[int], progress: Progress,
                models: Models, decoder: Any, timings: dict[str, float]) -> None:
    threads = cfg.decode.threads or usable_cores()  # a worker's share: workers.worker_configs
    # One downloader per worker for the whole run: per-host limits, the DNS cache and robots.txt
    # answers carry over from shard to shard.
    downloader = Downloader(cfg.download)
    loop = new_event_loop()
    try:
        loop.run_until_complete(downloader.__aenter__())
        with ThreadPoolExecutor(threads, thread_name_prefix="decode") as decode_pool, \
                ThreadPoolExecutor(getattr(decoder, "concurrency", 1), thread_name_prefix="batch-decode") \
                as batch_decode_pool, \
                ThreadPoolExecutor(1, thread_name_prefix="score") as score_pool, \
                ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool, \
                ThreadPoolExecutor(MAX_SHARDS_IN_FLIGHT, thread_name_prefix="publish") as publish_pool:
            pools = _Pools(decode_pool, batch_decode_pool, score_pool, write_pool, publish_pool)

            def make_job(shard_id: int) -> ShardJob:
                shard_rows = rows.shard(shard_id, cfg.input.shard_size)
                return ShardJob(cfg, out, shard_id, shard_rows, decoder, models, pools, progress, downloader,
                                retry=cfg.retry_failed and is_complete(out, shard_id))

            def finished(stats: dict[str, Any]) -> None:
                for stage, secs in stats["timings_s"].items():
                    timings[stage] = timings.get(stage, 0.0) + secs
                progress.shard_done(stats)

            run_until_stopped(loop, _overlapping(shard_ids, make_job, finished))  # not uvloop's way: see there
    finally:
        _cancel_all(loop)
        loop.run_until_complete(downloader.__aexit__(None, None, None))
        loop.close()


MAX_SHARDS_IN_FLIGHT = 2


async def _overlapping(shard_ids: Iterator[int], make_job: Callable[[int], ShardJob],
                       finished: Callable[[dict[str, Any]], None]) -> None:
    """Run the shards one after another, except that the next one starts as soon as the current
    one's downloads are down to their tail (every URL handed out, the slowest still in flight):
    decode and scoring never wait on one shard's last slow hosts. At most two shards in flight."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[dict[str, Any]]] = set()

    async def settle(block: bool) -> None:
        nonlocal running
        while running and (block or any(t.done() for t in running)):
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                finished(task.result())
            block = block and len(running) >= MAX_SHARDS_IN_FLIGHT

    async def next_shard() -> int | None:
        """next() may block (a worker asks its parent, or a Ray actor that answers only once a
        shard is free or every shard is finished): off the event loop, the shards finished
        meanwhile reported as they finish. A Ray worker waits for the run's last shard so: had
        its own finished shards waited for that answer, the run would wait for them."""
        asked = loop.run_in_executor(None, next, shard_ids, None)
        while not asked.done():
            await asyncio.wait({asked, *running}, return_when=asyncio.FIRST_COMPLETED)
            await settle(block=False)
        return asked.result()

    try:
        while (shard_id := await next_shard()) is not None:
            job = make_job(shard_id)
            task = asyncio.create_task(job.run())
            running.add(task)
            tail = asyncio.create_task(job.tail.wait())
            await asyncio.wait({task, tail}, return_when=asyncio.FIRST_COMPLETED)
            tail.cancel()
            await settle(block=len(running) >= MAX_SHARDS_IN_FLIGHT)
        while running:
            await settle(block=True)
    except BaseException:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise


def make_run_decoder(cfg: RunConfig, models: Models) -> Any:
    """The decoder, chosen once per worker. The CPU decoder needs no torch: a laptop run
    without models, or an explicit --decoder cpu, never loads it."""
    clip = models.scorer.clip_spec if models.scorer else None
    watermark_px = models.tagger.watermark_size_px if models.tagger else None
    choice, device = cfg.decode.decoder, cfg.score.device
    on_cpu = device == "cpu" or (device == "auto" and getattr(models.device, "type", "cpu") == "cpu")
    encoder = cfg.decode.stored_encoder
    if choice == "cpu" or (choice == "auto" and on_cpu):
        _stored_encoder_unused(encoder)
        _dali_settings_unused(cfg, "cpu")
        return Decoder(cfg.decode, clip, watermark_px)
    from .gpu_decode import import_nvimgcodec, make_decoder
    from .score import pick_device

    if encoder == "nvimgcodec":
        import_nvimgcodec()  # asked for by name: its absence is an error, not a reason to decode on the CPU
    # (a GPU decoder asked for by name where there is no GPU was refused before: worker_devices,
    # or RunConfig.validate with --ray)
    decoder = make_decoder(choice, cfg.decode, clip, watermark_px, models.device or pick_device(device),
                           max_batch_size=cfg.score.batch_size, stored_encode=encoder,
                           exact_chroma=cfg.decode.exact_chroma, hw_decoder_load=cfg.decode.hw_decoder_load)
    if decoder.name == "cpu":  # auto found no GPU decoder that runs here
        _stored_encoder_unused(encoder)
    _dali_settings_unused(cfg, decoder.name)
    log.info("decoder: %s on %s", decoder.name, decoder.device)
    return decoder


def _dali_settings_unused(cfg: RunConfig, decoder: str) -> None:
    if decoder != "dali" and (not cfg.decode.exact_chroma or cfg.decode.hw_decoder_load is not None):
        log.warning("--fast-chroma and --hw-decoder-load are DALI's settings: the %s decoder ignores them", decoder)


def _stored_encoder_unused(encoder: str) -> None:
    if encoder != "host":
        log.warning("--stored-encoder %s applies to the GPU decoders; the CPU decoder encodes the stored "
                    "images itself", encoder)


CANDIDATES_DIR = "candidates"
# Under .partial/: the run's input rows as `reader.write_rows` leaves them, removed when the run
# ends (and by the next run's `recover_partial` after a crash). Not a shard's name: no digit.
ROWS_DIR = "input"


def needs_extraction(inputs: InputConfig) -> bool:
    from .extract import is_warc_like

    return inputs.crawl is not None or any(is_warc_like(p) for p in inputs.paths)


def extract_candidates(cfg: RunConfig, out: Path, progress: Progress, held: ExitStack, fresh: bool = False) -> InputConfig:
    """Common Crawl inputs -> candidate pairs under OUT/candidates (once; a rerun reuses them).

    Returns the input config that reads those candidates as URL lists. In a `fresh` folder (this
    run made it), an extraction that fails (the crawl's listing or a WAT file cannot be read:
    only extracting shows it) or is stopped takes config.json and candidates/ with it, so the
    folder goes, as for a URL list that cannot be read. They used to stay, and the corrected
    command into the folder warned about "the run there", which had never begun.
    """
    from .extract import ExtractConfig, extract_to_parquet, is_warc_like, list_crawl

    inputs = cfg.input
    others = [p for p in inputs.paths if not is_warc_like(p)]
    if others:
        raise ConfigError(f"{others[0]}: URL lists and WAT/WARC inputs cannot be mixed in one run; "
                          "run `fastlaion extract` first and pass its candidates-*.parquet")
    for path in inputs.paths:
        if "://" not in path and not Path(path).is_file():
            raise ConfigError(f"input file not found: {path}")
    prepare_output(out, cfg, held)
    target = out / CANDIDATES_DIR
    # the pages' opt-outs: extract's defaults (noai, noimageai) that --opt-out-tags keeps
    page_tags = tuple(t for t in ExtractConfig.page_opt_out_tags if t in cfg.download.opt_out_tags)
    if (target / "extract_stats.json").exists():
        try:
            earlier = json.loads((target / "extract_stats.json").read_text())
            had = tuple(earlier["config"]["page_opt_out_tags"])
            files = [str(f) for f in earlier["files"]]
        except (OSError, ValueError, KeyError, TypeError):
            had, files = None, []
        missing = [f for f in files if not (target / f).is_file()]
        if missing and had == page_tags:
            # A candidates file deleted since (taken for an intermediate file): the run read the
            # others, or none, and said the extraction had found nothing. The same inputs give
            # the same candidates (a changed local input is refused above, in prepare_output).
            log.warning("%s is missing; the candidates are extracted again", target / missing[0])
            (target / "extract_stats.json").unlink()
        elif had != page_tags:  # --opt-out-tags changed: the candidates kept other pages' links
            if any_finished(out):
                raise ConfigError(f"{out} holds a run whose candidates were extracted with page opt-outs "
                                  f"{','.join(had or ()) or 'none'}, now {','.join(page_tags) or 'none'} "
                                  "(--opt-out-tags); rerun with the same settings to resume, or choose another "
                                  "output folder")
            (target / "extract_stats.json").unlink()  # extracted again below
    if not (target / "extract_stats.json").exists():
        try:
            sources = list(inputs.paths)
            if inputs.crawl:
                sources += list_crawl(inputs.crawl, inputs.crawl_files, inputs.cc_base_url)
            shutil.rmtree(target, ignore_errors=True)
            # URLs cut at LAION's length, not --max-caption-chars (the extraction's limit is for
            # both: a short one cut every image URL, and every download failed); the captions
            # are cut to it when the rows are read, as a URL list's are
            cut = max(LAION_MAX_TEXT_CHARS, inputs.max_caption_chars)
            extract_to_parquet(sources, target, ExtractConfig(max_text_chars=cut, page_opt_out_tags=page_tags),
                               progress.extracting())
        except BaseException:
            if fresh:  # this run holds the folder's lock: what is in it is this run's
                shutil.rmtree(target, ignore_errors=True)
                (out / CONFIG_FILE).unlink(missing_ok=True)
            raise
    candidates = tuple(str(p) for p in sorted(target.glob("candidates-*.parquet")))
    return dataclasses.replace(inputs, paths=candidates, input_format=InputFormat.parquet, url_col="url",
                               caption_col="caption", crawl=None)


# What `fastlaion subset`, `dedup` and `classify` write in their output folder
DATASET_OUTPUT_FILES = (METADATA_FILE, MANIFEST_FILE)


def refuse_a_dataset_output(out: Path) -> None:
    """Refuse to run into the output folder of a dataset command: it holds no finished shard, so
    the run "started over" there and wrote its shards over a `subset --shards` folder's own
    NNNNN.tar and embeddings (the samples exported, lost), beside a dataset.json that still
    described them. (A dataset command refuses a run's folder alike.)"""
    held = [name for name in DATASET_OUTPUT_FILES if (out / name).is_file()]
    if held:
        raise ConfigError(f"{out} holds the output of `fastlaion subset`, `dedup` or `classify` ({', '.join(held)}), "
                          "which a run would write its shards over; choose another output folder")


_SHARD_FILE = shard_files()


def refuse_shards_of_another(out: Path) -> None:
    """Refuse a folder without a run's config.json that holds files named as a run's shard files:
    an img2dataset output (00000.tar, 00000.parquet, 00000_stats.json), which a run into it wrote
    over, shard by shard."""
    named = sorted(p.name for p in out.iterdir() if p.is_file() and _SHARD_FILE.match(p.name))
    if named:
        listed = ", ".join(named[:4]) + (f" and {len(named) - 4} more" if len(named) > 4 else "")
        raise ConfigError(f"{out} holds {len(named)} file(s) named as a run's shards ({listed}) but no {CONFIG_FILE}: "
                          "not a fastlaion run's (an img2dataset output?), which this run would write over; choose "
                          "another output folder")


def prepare_output(out: Path, cfg: RunConfig, held: ExitStack) -> int:
    """Create the output folder and lock it in `held` for this run, or check that the run already
    in it used the same settings and the same input files. A run there that finished no shard
    (it stopped while loading a model, say) holds nothing to keep: other settings or changed
    inputs start over. Returns the INPUT_BUILD its shards' rows were read with: a run resumed
    reads its inputs as the fastlaion that began it did."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path exists and is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(output_lock(out))  # a dataset command writing there is told first
    refuse_a_dataset_output(out)
    saved = out / CONFIG_FILE
    if not saved.exists():  # every run writes it before its first shard
        refuse_shards_of_another(out)
    files = input_files(cfg.input.paths)
    weights = weight_files(cfg.resume_key())
    build = INPUT_BUILD
    if saved.exists():
        try:
            before = json.loads(saved.read_text())
            previous = resume_key(before)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{saved} is unreadable; remove it or choose another output folder") from None
        current = cfg.resume_key()
        marks = before.get(INPUT_FILES_KEY, {})
        if not isinstance(marks, dict):
            marks = {}
        was, now = previous["input"]["paths"], current["input"]["paths"]
        if was != now and len(was) == len(now) and all(
                a == b or marks.get(a) is not None and marks.get(a) == files.get(b) for a, b in zip(was, now)):
            # The same files, spelled otherwise: the command rerun from another folder, a path made
            # absolute, a file moved. Their marks (size and content) say they are what the run
            # read; they were refused as "other settings".
            previous["input"]["paths"] = now
            marks = {b: marks[a] for a, b in zip(was, now) if a in marks}
        weights_before = before.get(WEIGHT_FILES_KEY, {})
        if not isinstance(weights_before, dict):
            weights_before = {}
        changed_weights = []
        for setting, mark in weights.items():
            section, name = setting.split(".")
            if previous[section].get(name) != current[section].get(name) and weights_before.get(setting) == mark:
                previous[section][name] = current[section][name]  # the same file, named otherwise
            elif setting in weights_before and weights_before[setting] != mark:
                changed_weights.append(setting)
        diffs = _differences(previous, current)
        changed = [p for p, mark in files.items() if marks.get(p, mark) != mark]
        if any_finished(out):
            if diffs:
                raise ConfigError(f"{out} holds a run with other settings ({'; '.join(diffs[:4])}); "
                                  "rerun with the same settings to resume, or choose another output folder")
            if changed_weights:
                section, name = changed_weights[0].split(".")
                raise ConfigError(f"{WEIGHT_SETTINGS[changed_weights[0]]} {current[section][name]} changed since the "
                                  f"run in {out} began (its size or content): the finished shards were tagged or "
                                  "scored with the earlier file; restore it, or choose another output folder")
            if changed:
                raise ConfigError(f"input {changed[0]} changed since the run in {out} began (its size or content): "
                                  "the finished shards hold the rows it had then, and resuming would lose or "
                                  "repeat rows; restore it, or choose another output folder")
            wrong = gelu_built_models(before)
            if wrong:
                raise ConfigError(f"{out}'s finished shards were scored by an older fastlaion that ran {wrong[0]} "
                                  "with nn.GELU, not the QuickGELU its weights were trained with: this version "
                                  "computes other embeddings and similarities, and resuming would mix the two; "
                                  "start over in another output folder")
            saved_build = before.get(INPUT_BUILD_KEY, 1)
            build = saved_build if isinstance(saved_build, int) else 1
            rules = _differences(_download_rules(before), _download_rules(cfg.to_dict()))
            if rules:  # a resume may change them (a blocklist grown, robots.txt now respected), but say so
                log.warning("%s: its finished shards were downloaded under other rules (%s); the shards left follow "
                            "the new ones", out, "; ".join(rules[:4]))
        elif diffs or changed:
            log.warning("%s: the run there finished no shard; starting over with %s", out,
                        "these settings" if diffs else f"the changed input {changed[0]}")
            (out / SUMMARY_FILE).unlink(missing_ok=True)  # of the run given up (its failed shards, say)
            if changed or previous["input"] != current["input"]:
                shutil.rmtree(out / CANDIDATES_DIR, ignore_errors=True)  # extracted from other inputs
    replace_text(saved, json.dumps({**cfg.to_dict(), INPUT_FILES_KEY: files, WEIGHT_FILES_KEY: weights,
                                    MODEL_BUILD_KEY: MODEL_BUILD, INPUT_BUILD_KEY: build}, indent=2))
    # Leftovers of an interrupted run: shards killed while renaming are finished, the rest dropped.
    for shard in recover_partial(out):
        log.info("shard %s: its files were all written when the last run stopped; moved into place",
                 shard_name(shard))
    return build


HINT_MIN_ROWS = 10  # RunSummary._download_hints: no hint from fewer failed rows than this
INPUT_FILES_KEY = "input_files"  # in config.json: each local input file's input_mark
# In config.json: how its run reads its inputs into rows. 1 (none saved): a csv/tsv file's blank
# lines were rows of no URL; 2: they are no rows (as for pandas, pyarrow, Python's csv).
INPUT_BUILD_KEY = "input_build"
INPUT_BUILD = 2
MARK_BYTES = 1 << 16


def input_files(paths: Iterable[str]) -> dict[str, str]:
    """Each local input file's mark (input_mark); remote inputs and unreadable paths have none."""
    marks = {}
    for p in paths:
        try:  # regular files only: a pipe (`run <(cat urls)`) would lose what the mark reads
            if "://" not in p and stat.S_ISREG(os.stat(p).st_mode):
                marks[str(Path(p))] = input_mark(Path(p))
        except OSError:
            pass
    return marks


# The settings that name a weights file, with their options. In config.json, WEIGHT_FILES_KEY holds
# each local one's input_mark: a rerun naming the same file otherwise (from another folder, by an
# absolute path) resumes, as for the input files, and one whose file changed since is refused.
WEIGHT_SETTINGS = {"score.pretrained": "--pretrained", "score.multilingual_pretrained": "--multilingual-pretrained",
                   "tags.language_model": "--language-model", "tags.nsfw_head": "--nsfw-head",
                   "tags.aesthetic_v1": "--aesthetic-v1", "tags.aesthetic_v2": "--aesthetic-v2",
                   "tags.watermark_model": "--watermark-model"}
WEIGHT_FILES_KEY = "weight_files"


def weight_files(key: dict[str, Any]) -> dict[str, str]:
    """{'section.setting': input_mark} of each local file that a resume key names as weights."""
    marks = {}
    for setting in WEIGHT_SETTINGS:
        section, name = setting.split(".")
        value = key.get(section, {}).get(name)
        try:
            if isinstance(value, str) and "://" not in value and Path(value).expanduser().is_file():
                marks[setting] = input_mark(Path(value).expanduser())
        except OSError:
            pass
    return marks


def input_mark(path: Path) -> str:
    """A file's size and a hash of its first and last 64 KiB: it changes when rows are appended,
    removed or rewritten (a Parquet file's footer is at its end), not when the file is only
    touched or copied, and costs two small reads however large the file is."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest = hashlib.sha256(f.read(MARK_BYTES))
        if size > MARK_BYTES:
            f.seek(max(MARK_BYTES, size - MARK_BYTES))
            digest.update(f.read(MARK_BYTES))
    return f"{size}:{digest.hexdigest()[:32]}"


# The download settings that decide which rows a shard keeps (opt-outs, robots.txt, blocklists,
# private networks, the byte cap): a resume may change them, with a warning (prepare_output).
DOWNLOAD_RULES = ("opt_out_tags", "respect_robots", "url_blocklist", "image_blocklist", "allow_private_networks",
                  "max_bytes")


def _download_rules(saved: dict[str, Any]) -> dict[str, Any]:
    download = saved.get("download")
    if not isinstance(download, dict):
        return {}
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in download.items() if k in DOWNLOAD_RULES}


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            diffs.append(f"{prefix}{k}: was {va!r}, now {vb!r}")
    return diffs


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


@dataclass
class Models:
    """What the score and tag stages hold, loaded once per run (CPU or GPU decided here)."""

    scorer: Any = None  # score.Scorer, or None with --no-score
    multi_scorer: Any = None  # a second Scorer for non-English captions, when configured
    tagger: Any = None  # tags.Tagger, or None when no tag is configured
    device: Any = None  # the torch.device the models run on; None when no model needs torch
    _language: Any = None  # language.LanguageProcess, also the tagger's, until close()

    @classmethod
    def load(cls, cfg: RunConfig) -> Models:
        models = cls()
        try:
            models._load(cfg)
        except BaseException:
            models.close()
            raise
        return models

    def _load(self, cfg: RunConfig) -> None:
        tags = cfg.tags
        wants_tags = tags.language or tags.watermark_model or tags.aesthetic_v2 or (
            cfg.score.enabled and (tags.nsfw_head or tags.aesthetic_v1))
        if not (cfg.score.enabled or wants_tags):
            return
        language = None
        if tags.language:
            # its own process (fastText holds the GIL), started first: it loads while CLIP does
            from .language import LanguageProcess

            language = self._language = LanguageProcess(tags.language_model, tags.language_min_score)
        device = None
        if cfg.score.enabled or tags.watermark_model or tags.aesthetic_v2:
            # torch and open_clip load only when a model runs (not for language alone)
            from .score import pick_device

            device = pick_device(cfg.score.device)
            self.device = device
        if cfg.score.enabled:
            from .score import Scorer

            self.scorer = Scorer(cfg.score, device)
            if cfg.score.multilingual_model:  # RunConfig.validate: it needs language identification
                multi_cfg = dataclasses.replace(cfg.score, model=cfg.score.multilingual_model,
                                                pretrained=cfg.score.multilingual_pretrained)
                self.multi_scorer = Scorer(multi_cfg, device,
                                           flags=("--multilingual-model", "--multilingual-pretrained"))
                if self.multi_scorer.clip_spec != self.scorer.clip_spec:
                    raise ConfigError(f"--multilingual-model {multi_cfg.model} resizes images differently "
                                      f"({self.multi_scorer.clip_spec}) from {cfg.score.model}; "
                                      "pick one with the same input size")
        if wants_tags:
            from .tags import Tagger

            self.tagger = Tagger(tags, cfg.score, self.scorer.embed_dim if self.scorer else None, device, language)
        if language is not None:
            language.wait_ready()  # a model fastText cannot load is a ConfigError now, not at the first batch

    def close(self) -> None:
        """Ends the language process; the models themselves go with the garbage collector."""
        if self._language is not None:
            self._language.close()

    def optional_columns(self) -> tuple[str, ...]:
        cols: list[str] = []
        if self.tagger is not None and self.tagger.language is not None:
            cols += ["language", "language_score", "language_group"]
        if self.scorer is not None:
            cols.append("similarity")
        if self.multi_scorer is not None:
            cols.append("similarity_model")
        if self.tagger is not None:
            cols += self.tagger.embedding_columns
            if self.tagger.watermark is not None:
                cols.append("pwatermark")
        return tuple(cols)


@dataclass(frozen=True, slots=True)
class _Pools:
    """A worker's threads: per-body decode (many), batch decode on the GPU (the decoder's
    `concurrency`, so the next batches decode while this one scores), model work (one), tar
    writing (one) and shard publishing."""

    decode: ThreadPoolExecutor
    batch_decode: ThreadPoolExecutor
    score: ThreadPoolExecutor
    write: ThreadPoolExecutor  # one thread: batches' samples into the shard tars, in turn, off the event loop
    publish: ThreadPoolExecutor  # a finished shard's Parquet, stats and renames


@dataclass(frozen=True, slots=True)
class _Arrived:
    """A row back from download (and decode, when a body came): what the batch is built from."""

    row: int
    fetched: Fetched
    sha256: str | None
    decoded: Decoded | None


class ShardJob:
    """Download, decode, score and write one shard; with `retry`, download again only the rows
    of a finished shard that failed transiently and rewrite it with their new outcomes."""

    # Batches in flight per shard: the next batch's GPU decode overlaps this one's scoring.
    MAX_BATCHES_IN_FLIGHT = 2

    def __init__(self, cfg: RunConfig, out: Path, shard: int, rows: pl.DataFrame, decoder: Any,
                 models: Models, pools: _Pools, progress: Progress, downloader: Downloader, *, retry: bool = False):
        self.cfg, self.out, self.shard, self.rows = cfg, out, shard, rows
        self.retry = retry
        self.downloader = downloader
        self.tail = asyncio.Event()  # set once only the slowest downloads are left (or the job ended)
        self._reported: dict[str, float] = {}  # stage seconds already passed to progress.rows_done
        self.decoder, self.models = decoder, models  # decoder: decode.Decoder or a gpu_decode.BatchDecoder
        self.pools, self.progress = pools, progress
        self.timings: dict[str, float] = {"download": 0.0, "decode": 0.0, "score": 0.0, "tag": 0.0, "write": 0.0}

    async def run(self) -> dict[str, Any]:
        started = time.time()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        scorer = self.models.scorer
        # off the loop: a rewrite copies the published tar and reads its files
        making = self.pools.publish.submit(functools.partial(
            ShardWriter, self.out, self.shard, self.rows.height, self.cfg.input.shard_size,
            scorer.embed_dim if scorer is not None else None, self.models.optional_columns(), rewrite=self.retry))
        try:
            with self._writing():
                writer = await asyncio.wrap_future(making)
        except BaseException:
            # Cancelled (Ctrl-C, SIGTERM, another shard failed) while the thread makes the shard's
            # folder under .partial/: it went on, and the folder stayed behind (with an empty tar),
            # which the next run had to clear. Once made, it goes.
            concurrent.futures.wait([making])
            if not making.cancelled() and making.exception() is None:
                making.result().abort()
            raise
        todo = self.rows
        if writer.previous is not None:
            todo = self.rows[transient_rows(writer.previous)]
        batch_size = self.cfg.score.batch_size
        arrived: asyncio.Queue[_Arrived | None] = asyncio.Queue(maxsize=2 * batch_size)

        def decode(body: bytes) -> tuple[str, Decoded]:
            return hashlib.sha256(body).hexdigest(), self.decoder.prepare(body)

        async def on_result(row: int, fetched: Fetched) -> None:
            sha, decoded = None, None
            if fetched.body is not None:
                sha, decoded = await loop.run_in_executor(self.pools.decode, decode, fetched.body)
            await arrived.put(_Arrived(row, fetched, sha, decoded))

        consumer = asyncio.create_task(self._consume(arrived, writer))
        publishing: concurrent.futures.Future[None] | None = None
        try:
            items = zip(todo["row"].to_list(), todo["url"].to_list())
            # no more worker coroutines than URLs: --workers 10^12 made that many tasks (a hang)
            workers = min(self.cfg.download.workers, max(1, todo.height))
            download_task = asyncio.create_task(
                download_all(self.downloader, items, workers, on_result, on_drained=self.tail.set))
            # The consumer only returns after the end marker, so finishing first means it failed.
            done, _ = await asyncio.wait({download_task, consumer}, return_when=asyncio.FIRST_COMPLETED)
            if consumer in done:
                download_task.cancel()
                await asyncio.gather(download_task, return_exceptions=True)
                consumer.result()
                raise RuntimeError("the scoring side stopped before the downloads ended")
            await download_task
            self.timings["download"] = time.perf_counter() - t0
            await arrived.put(None)
            await consumer
            table = writer.table()
            stats = self._stats(table, writer, started, time.perf_counter() - t0)
            if writer.previous is not None:
                stats = self._retry_stats(stats, table[todo["row"].to_numpy()])
            with _timer(self.timings, "write"), self._writing():
                publishing = self.pools.publish.submit(writer.publish, table, stats)
                await asyncio.wrap_future(publishing)
            return stats
        except BaseException:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            if publishing is not None:
                # Cancelling (another shard failed, Ctrl-C) does not stop the thread renaming this
                # shard into place: let it end first. Removing .partial/ under its renames could
                # leave a stats file alone there, which the next run would take for a finished
                # shard without its Parquet: rows lost.
                concurrent.futures.wait([publishing])
            writer.abort()
            raise
        finally:
            self.tail.set()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """An OSError of the writer (disk full) fails this shard by name: `ShardWriteError`."""
        try:
            yield
        except OSError as exc:
            raise ShardWriteError.wrap(self.shard, exc) from exc

    def _retry_stats(self, stats: dict[str, Any], retried: pl.DataFrame) -> dict[str, Any]:
        """A rewritten shard's stats: the new funnel, and one more entry under `retries`."""
        previous = read_stats(self.out, self.shard)
        again = int(retried["reason"].is_in(list(transient_drops(stats["funnel"]))).sum())
        entry = {"rows": retried.height, "kept": int((retried["status"] == "kept").sum()), "failed_again": again,
                 "wall_s": stats["wall_s"], "finished_at": stats["finished_at"]}
        # the same write of the shard, more rows downloaded: what a dataset made from it recorded
        # (Dataset.root_changed) still holds; a shard written anew gets a new write_id. One an
        # earlier fastlaion wrote has none: it is known by its stats file's digest, kept as its id
        kept_id = shard_identity(Path(self.out), shard_name(self.shard))
        return {**stats, "started_at": previous["started_at"], **({WRITE_ID: kept_id} if kept_id else {}),
                "retries": [*previous.get("retries", []), entry]}

    async def _consume(self, arrived: asyncio.Queue[_Arrived | None], writer: ShardWriter) -> None:
        pending: list[_Arrived] = []
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                item = await arrived.get()
                if item is not None:
                    pending.append(item)
                if pending and (item is None or len(pending) >= self.cfg.score.batch_size):
                    in_flight.add(asyncio.create_task(self._process(pending, writer)))
                    pending = []
                    if len(in_flight) >= self.MAX_BATCHES_IN_FLIGHT:
                        done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()
                if item is None:
                    break
            for task in asyncio.as_completed(in_flight):
                await task
        except BaseException:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            raise

    async def _process(self, items: list[_Arrived], writer: ShardWriter) -> None:
        """Turn arrived rows into a Batch, drop with reasons, score, tag, filter, write."""
        loop = asyncio.get_running_loop()
        with_body = [i for i, a in enumerate(items) if a.decoded is not None]
        languages = self._send_captions([items[i].row for i in with_body])
        if any(items[i].decoded.pending for i in with_body):
            # GPU decoders decode a whole batch at once, on their own thread and CUDA stream.
            finished = await loop.run_in_executor(
                self.pools.batch_decode, self.decoder.finish,
                [items[i].fetched.body for i in with_body], [items[i].decoded for i in with_body])
            items = list(items)
            for i, decoded in zip(with_body, finished):
                items[i] = dataclasses.replace(items[i], decoded=decoded)
        batch = self._make_batch(items)
        batch.drop(batch.rows["download_reason"].is_not_null().to_numpy(), "download", batch.rows["download_reason"])
        batch.drop(batch.rows["decode_reason"].is_not_null().to_numpy(), "decode", batch.rows["decode_reason"])
        if len(batch) and (self.models.scorer is not None or self.models.tagger is not None):
            # model work runs on its own thread so downloads go on meanwhile
            await loop.run_in_executor(self.pools.score, self._score_and_tag, batch, writer, languages)
        with self._writing():
            # On the write thread: a batch's tar members are ~10 ms of Python and a large write,
            # which the downloads on this loop need not wait for.
            await loop.run_in_executor(self.pools.write, self._write_samples, writer, batch)
        with _timer(self.timings, "write"):
            writer.add_outcome(batch.outcome().drop("download_reason", "decode_reason"))
        self.progress.rows_done(len(items), len(batch), self._busy_since_last_report(), shard=self.shard)

    def _send_captions(self, rows: list[int]) -> BatchLanguages | None:
        """These rows' captions to the language process, now: it answers while the batch decodes."""
        tagger = self.models.tagger
        if not rows or tagger is None or tagger.language is None:
            return None
        from .language import BatchLanguages

        return BatchLanguages(tagger.language, rows, self.rows["caption"].gather(rows).to_list())

    def _write_samples(self, writer: ShardWriter, batch: Batch) -> None:
        with _timer(self.timings, "write"):  # the writing itself, not the wait for the write thread
            writer.add_samples(batch)

    def _busy_since_last_report(self) -> dict[str, float]:
        busy = {k: v - self._reported.get(k, 0.0) for k, v in self.timings.items() if k != "download"}
        self._reported = dict(self.timings)
        return busy

    def _score_and_tag(self, batch: Batch, writer: ShardWriter, languages: BatchLanguages | None) -> None:
        """Language, CLIP similarity (per language group), heads on embeddings, filter, watermark."""
        scorer, multi, tagger = self.models.scorer, self.models.multi_scorer, self.models.tagger
        score_cfg = self.cfg.score
        with _timer(self.timings, "tag"):
            if languages is not None:
                tags = languages.take(batch.rows["row"].to_list())
                batch.with_columns(language=pl.Series(tags["language"], dtype=pl.String),
                                   language_score=pl.Series(tags["language_score"]).fill_nan(None),
                                   language_group=pl.Series(tags["language_group"], dtype=pl.String))
        if scorer is not None:
            captions = batch.rows["caption"]
            batch.drop((captions.is_null() | (captions.str.len_chars() == 0)).to_numpy(), "score", "no_caption")
            if not len(batch):
                return
            with _timer(self.timings, "score"):
                pixels = stack_pixels(batch.payload["clip_input"])
                texts = batch.rows["caption"].to_list()
                img, txt, sim = scorer.score(pixels, texts)
                writer.add_embeddings(batch.rows["row"].to_numpy(), img, txt)
                threshold = np.full(len(batch), score_cfg.min_similarity, dtype=np.float32)
                if "language_group" in batch.rows.columns:
                    non_en = (batch.rows["language_group"] != "en").to_numpy()
                    threshold[non_en] = score_cfg.threshold_multi
                    if multi is not None:
                        sim = sim.copy()
                        if non_en.any():
                            idx = np.flatnonzero(non_en)
                            sim[idx] = multi.score(pixels[idx], [texts[i] for i in idx])[2]
                        batch.with_columns(similarity_model=np.where(
                            non_en, score_cfg.multilingual_model, score_cfg.model).astype(object))
                batch.with_columns(similarity=sim)
            with _timer(self.timings, "tag"):
                if tagger is not None:
                    batch.with_columns(**tagger.on_embeddings(img))
            batch.drop(sim < threshold, "filter", "low_similarity")
        if tagger is not None and tagger.watermark is not None and len(batch):
            with _timer(self.timings, "tag"):
                batch.with_columns(**tagger.on_pixels(stack_pixels(batch.payload["watermark_input"])))

    def _make_batch(self, items: list[_Arrived]) -> Batch:
        rows_idx = np.fromiter((a.row for a in items), dtype=np.int64, count=len(items))
        base = self.rows[rows_idx]  # the shard frame's position equals its `row`
        f = [a.fetched for a in items]
        d = [a.decoded for a in items]
        frame = base.with_columns(
            pl.Series("download_reason", [x.error for x in f], dtype=pl.String),
            pl.Series("decode_reason", [x.error if x is not None else None for x in d], dtype=pl.String),
            pl.Series("error", [x.error_detail if x.error else (y.error_detail if y is not None else None)
                                for x, y in zip(f, d)], dtype=pl.String),
            pl.Series("http_status", [x.http_status for x in f], dtype=pl.Int32),
            pl.Series("attempts", [x.attempts for x in f], dtype=pl.Int32),
            pl.Series("download_s", [round(x.elapsed_s, 4) for x in f], dtype=pl.Float32),
            pl.Series("bytes", [len(x.body) if x.body is not None else None for x in f], dtype=pl.Int64),
            pl.Series("sha256", [a.sha256 for a in items], dtype=pl.String),
            pl.Series("format", [y.format if y is not None else None for y in d], dtype=pl.String),
            pl.Series("original_width", [y.width if y is not None else None for y in d], dtype=pl.Int32),
            pl.Series("original_height", [y.height if y is not None else None for y in d], dtype=pl.Int32),
            pl.Series("width", [y.stored_width if y is not None else None for y in d], dtype=pl.Int32),
            pl.Series("height", [y.stored_height if y is not None else None for y in d], dtype=pl.Int32),
        )
        batch = Batch(frame, payload={
            "stored": [y.stored if y is not None else None for y in d],
            "stored_ext": [y.stored_ext if y is not None else None for y in d],
            "clip_input": [y.clip_input if y is not None else None for y in d],
            "watermark_input": [y.watermark_input if y is not None else None for y in d],
        })
        self.timings["decode"] += sum(y.decode_s for y in d if y is not None)
        return batch

    def _stats(self, table: pl.DataFrame, writer: ShardWriter, started: float, wall_s: float) -> dict[str, Any]:
        f = funnel(table)
        if f["kept"] != writer.samples:
            raise RuntimeError(f"shard {writer.name}: funnel keeps {f['kept']} rows but {writer.samples} samples were written")
        edits = table.filter(pl.col("caption_edit").is_not_null()).group_by("caption_edit").len()
        return {
            "shard": self.shard,
            "rows": table.height,
            "funnel": f,
            "caption_edits": {k: int(n) for k, n in edits.iter_rows()},
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "wall_s": round(wall_s, 3),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            WRITE_ID: new_write_id(),
            **({"scoring": scoring_of(scorer)} if (scorer := self.models.scorer) is not None else {}),
        }


def scoring_of(scorer: Any) -> str:
    """What a shard's similarities and embeddings were computed in, as its stats record it: "bf16
    on cpu", "fp16 on cuda:0". A run resumed elsewhere (another device, another CPU: auto is bf16
    on one with AMX, fp32 on others) mixes them; RunSummary.scoring counts them."""
    return f"{scorer.precision} on {scorer.device}"


def stack_pixels(images: list[Any]) -> Any:
    """(N, H, W, 3) uint8 from one image per row: a numpy array from the CPU decoder, a torch
    tensor on the GPU from a GPU decoder (stacked there, no host round trip)."""
    if images and not isinstance(images[0], np.ndarray):
        import torch

        return torch.stack(images)
    return np.stack(images)


class _timer:
    """Adds the seconds of its block to timings[name]; several threads time the same stage (the
    loop and the write thread both write), hence the lock."""

    _lock = threading.Lock()

    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        spent = time.perf_counter() - self.t0
        with self._lock:
            self.timings[self.name] = self.timings.get(self.name, 0.0) + spent
