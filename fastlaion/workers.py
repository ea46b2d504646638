"""Several worker processes, one per GPU (`--gpus`) or per CPU share (`--processes`).

Each worker is a spawned process with its own event loop, decoder and models (one GPU each);
this process hands out the shards one at a time as each worker asks for its next, so a slow shard
never holds the others back. A worker reports rows and finished shards to this process, which
draws the progress bar and merges the stats. A worker's log records go the same way
(`forwarded_logs`), its Python warnings as records too (fastlaion.logs): this process prints them
through its own handler, in its format, filtered as its own are (open_clip's chatter hidden
without -v), and each message once however many workers log it. Each worker has pipes of its own to this process,
shared with no other worker: one killed at any moment (the OOM killer's SIGKILL, in the middle of
a message) can neither cut into another's messages nor hold a lock the others wait for, and its
end is seen at once. Every shard is still written atomically by the worker that ran it, so a crash,
Ctrl-C or SIGKILL loses at most the shards in progress, and a rerun resumes. A worker reads the
input rows of the shard it runs, and only those, from the files this process wrote them to
(`reader.InputRows`), so its memory does not grow with the input.

The same workers run as actors of a Ray cluster (`--ray`, fastlaion/ray_workers.py): a
`WorkerPool` starts, watches and stops them, processes here and actors there, while what a worker
does (`serve_shards`) and what this process makes of its messages (`drive`) are one code for both.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import queue
import selectors
import signal
import struct
import sys
import threading
import time
import traceback
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, WorkerFailed, usable_cores
from .interrupt import STOP_SIGNALS, ctrl_c_held, release_ctrl_c, stopped_by
from .logs import warnings_logged
from .reader import InputRows
from .writer import ShardWriteError

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # how long workers get to abort their shards cleanly after Ctrl-C
LIVENESS_CHECK_S = 0.5  # how often drive checks that the workers live, however busy their queue


def worker_configs(cfg: RunConfig, devices: list[str]) -> list[RunConfig]:
    """Each worker's settings: its device, and in decode.threads its share of the cores for every
    pool it runs (decode threads, a GPU decoder's DALI pipeline and stored-image encoders), so
    that `--workers-per-gpu 4` on a 16-core box gives each worker 4 threads, not 16."""
    threads = max(1, usable_cores() // len(devices))
    return [on_worker(cfg, device, threads, len(devices)) for device in devices]


def on_worker(cfg: RunConfig, device: str, threads: int, workers: int) -> RunConfig:
    """`cfg` for one of `workers` workers, on `device`, whose pools get `threads` threads (unless
    --decode-threads says how many), and whose share of the per-host limits is its own: each
    worker keeps its own gates, so N workers at --per-host 16 had 16N requests in flight to one
    host. Each now gets per_host / N (at least 1) and per_host_rate / N."""
    download = dataclasses.replace(cfg.download, per_host=max(1, cfg.download.per_host // workers),
                                   per_host_rate=cfg.download.per_host_rate / workers)
    return dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, device=device),
                               decode=dataclasses.replace(cfg.decode, threads=cfg.decode.threads or threads),
                               download=download)


class WorkerPool(abc.ABC):
    """The workers of a run and how they are started, watched and stopped. A worker takes shard
    ids from its `tasks` until it takes None, and reports on its `results` (`serve_shards`);
    `drive` is the rest, the same whatever runs the workers."""

    devices: list[str]  # one name per worker, for its messages and the summary's `workers`; the
    # same list throughout: `start` takes out of it, in place, workers that could not start (RayWorkers)
    results: Any  # the workers' messages: get(timeout=s), queue.Empty when none came

    @abc.abstractmethod
    def start(self, todo: list[int]) -> None:
        """Start the workers, which take the shards of `todo`, then None."""

    @abc.abstractmethod
    def check_alive(self, done: set[int]) -> None:
        """Raise `WorkerFailed` for a worker that has ended but is not in `done` (it said "done"),
        now or, where its last messages may still be in `results`, behind them: `results` then
        gives ("ended", None, workers) after them, and `check_ended` decides when drive reads it."""

    def check_ended(self, workers: list[int], done: set[int]) -> None:
        """Raise `WorkerFailed` for one of `workers`, which had ended when `results` gave this
        message after their last ones, that is not in `done` (every message it sent has been read)."""

    def all_finished(self) -> None:
        """Every shard is finished: the workers that wait for their next one take None now.
        (`_Processes` gives None as soon as none is left to hand out: a worker process that dies
        stops the run, so no shard comes back.)"""

    def dropped(self) -> set[int]:
        """The workers the run went on without (RayWorkers: those lost with their node, whose
        shards went back to the others): drive expects no "done" of them."""
        return set()

    @abc.abstractmethod
    def join(self) -> None:
        """Wait for the workers, every one of which has said "done" (or was dropped)."""

    @abc.abstractmethod
    def stop(self, interrupted: bool) -> None:
        """End the workers after a failure or a Ctrl-C (`interrupted`); their shards in progress
        are dropped (a rerun redoes them)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the queues and whatever else the workers hold, after `join` or `stop`."""


def run_workers(cfg: RunConfig, out: Path, rows: InputRows, todo: list[int], devices: list[str],
                progress: Any) -> dict[str, float]:
    """Run the shards in `todo` of `rows` on one worker process per entry of `devices`; returns
    stage seconds summed over workers (load_models: the slowest worker's)."""
    return drive(_Processes(cfg, out, rows, devices), todo, progress)


def drive(pool: WorkerPool, todo: list[int], progress: Any) -> dict[str, float]:
    """Run the shards in `todo` on the workers of `pool`: pass their progress on and merge their
    timings until each shard is done and each worker has said so (or was dropped: its shards
    went to the others, and the rows it had reported of those taken back out of `progress`);
    stop them all at the first failure. Returns stage seconds summed over workers (load_models:
    the slowest worker's)."""
    devices = pool.devices
    timings: dict[str, float] = {}
    logged: set[tuple[int, str, str]] = set()  # the workers' records printed so far (relay_log)
    finished: set[int] = set()
    done_workers: set[int] = set()
    # the progress passed on of each shard not finished yet, by worker: a dropped worker's is
    # taken back (`_take_back`), its shards being run again by the others
    unfinished: dict[int, dict[int, list[tuple[int, int, Any]]]] = {}
    try:
        pool.start(todo)
        check_at = time.monotonic() + LIVENESS_CHECK_S
        while len(finished) < len(todo) or len(done_workers | pool.dropped()) < len(devices):
            try:
                msg = pool.results.get(timeout=LIVENESS_CHECK_S)
            except queue.Empty:
                msg = None
            # Not only when the queue is quiet: while the others keep it busy, a killed worker was
            # noticed once they had run every other shard, its own waiting meanwhile.
            if msg is None or time.monotonic() >= check_at:
                check_at = time.monotonic() + LIVENESS_CHECK_S
                pool.check_alive(done_workers)
            if msg is None:
                continue
            kind, worker = msg[0], msg[1]
            if kind == "ended":  # the pool's, after the last messages of the workers it names
                pool.check_ended(msg[2], done_workers)
                _take_back(progress, unfinished, set(msg[2]) & pool.dropped())
            elif kind == "rows":
                if worker in pool.dropped():  # late: its shards are the others' now
                    continue
                shard = msg[5] if len(msg) > 5 else None
                if shard is not None and shard not in finished:
                    unfinished.setdefault(shard, {}).setdefault(worker, []).append(msg[2:5])
                progress.rows_done(msg[2], msg[3], msg[4])
            elif kind == "log":
                relay_log(msg[2], logged)
            elif kind == "shard":
                stats = msg[2]
                if stats["shard"] in finished:  # a dropped worker's, whose message came after its end
                    continue
                for stage, secs in stats["timings_s"].items():
                    timings[stage] = timings.get(stage, 0.0) + secs
                finished.add(stats["shard"])
                unfinished.pop(stats["shard"], None)
                progress.shard_done(stats)
                if len(finished) == len(todo):
                    pool.all_finished()
            elif kind == "ready":
                timings["load_models"] = max(timings.get("load_models", 0.0), msg[2])
            elif kind == "done":
                done_workers.add(worker)
            elif kind == "config_error":
                raise ConfigError(msg[2])
            elif kind == "shard_failed":  # a shard could not be written: stop, as one worker would
                raise ShardWriteError(*msg[2:])
            elif kind == "os_error":
                raise OSError(*msg[2])
            else:  # "error"
                raise WorkerFailed(f"worker {worker} ({devices[worker]}) failed; finished shards are kept, "
                                   f"rerun to resume:\n{msg[2]}")
        pool.join()
    except BaseException as exc:
        pool.stop(interrupted=isinstance(exc, KeyboardInterrupt))
        raise
    finally:
        pool.close()
    return timings


def _take_back(progress: Any, unfinished: dict[int, dict[int, list[tuple[int, int, Any]]]],
               dropped: set[int]) -> None:
    """Take out of `progress` the rows the `dropped` workers reported for the shards they had not
    finished (`unfinished`: shard -> worker -> each "rows" message's rows, kept and busy seconds),
    which go back to the others (RayWorkers.check_ended): the bar counted those rows twice, once
    from the lost worker and again as another ran the shard, and read more rows than the input's
    (the summary, read from the files, did not)."""
    for shard in list(unfinished):
        for worker in dropped & unfinished[shard].keys():
            for rows, kept, busy_s in unfinished[shard].pop(worker):
                progress.rows_undone(rows, kept, busy_s)
        if not unfinished[shard]:
            del unfinished[shard]


def relay_log(fields: dict[str, Any], logged: set[tuple[int, str, str]]) -> None:
    """Handle a worker's log record (`_ForwardedLogs`) as if this process had logged it: through
    the handler and filters of its logger here, unless the same message at the same level from
    the same logger was already handled (`logged`): N workers loading the same model each warn
    that its weights are random, and the user reads it once."""
    record = logging.makeLogRecord(fields)
    key = (record.levelno, record.name, record.getMessage())
    logger = logging.getLogger(record.name)
    if key in logged or not logger.isEnabledFor(record.levelno):
        return
    logged.add(key)
    logger.handle(record)


class _ForwardedLogs(logging.Handler):
    """A worker's log handler: each record goes to drive as ("log", worker, fields), which
    `relay_log` makes a record again. Without it a worker has no handler of its own (a spawned
    process, a Ray actor): Python's last resort printed our warnings bare, and the first library
    to call `logging.warning` (open_clip, on random weights) installed basicConfig's handler,
    after which every record came out as "WARNING:name:message", once per worker."""

    def __init__(self, worker: int, results: Any):
        super().__init__()
        self.worker, self.results = worker, results

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.results.put(("log", self.worker, _portable(record)))
        except Exception:  # noqa: BLE001 -- logging's own policy: a failed record never raises
            self.handleError(record)


def _portable(record: logging.LogRecord) -> dict[str, Any]:
    """`record`'s fields as they pickle (logging.handlers.SocketHandler's way): the message
    formatted with its arguments, a traceback as text."""
    fields = dict(record.__dict__)
    fields["msg"] = record.getMessage()
    fields["args"] = None
    if record.exc_info and not record.exc_text:
        fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
    fields["exc_info"] = None
    fields.pop("message", None)
    return fields


@contextlib.contextmanager
def forwarded_logs(worker: int, results: Any, level: int) -> Any:
    """Within it, every record this worker logs at `level` (the parent's, WARNING or -v's INFO)
    or above goes to the parent (`_ForwardedLogs`), and only there: the root logger's handlers
    are set aside (a Ray actor's process may have some) and put back at the end. So do the
    Python warnings it shows (`logs.warnings_logged`: one record each, no file, line or source
    line), which went raw to the worker's stderr, once per worker, across the progress bar."""
    root = logging.getLogger()
    handlers, previous_level = root.handlers[:], root.level
    root.handlers = [_ForwardedLogs(worker, results)]
    root.setLevel(level)
    try:
        with warnings_logged():
            yield
    finally:
        root.handlers = handlers
        root.setLevel(previous_level)


class _Processes(WorkerPool):
    """One spawned process per worker, on this machine, with two pipes of its own: its messages
    to this process, and the shard ids it asks for (`_Inbox`)."""

    def __init__(self, cfg: RunConfig, out: Path, rows: InputRows, devices: list[str]):
        self.cfg, self.out, self.rows, self.devices = cfg, out, rows, devices
        self.ctx = mp.get_context("spawn")  # fork is unsafe with threads, CUDA and uvloop
        self.log_level = logging.getLogger().getEffectiveLevel()  # the workers log what this process would
        self.results = _Inbox()
        self.procs: list[Any] = []

    def start(self, todo: list[int]) -> None:
        self.results.shards.extend(todo)
        # The first spawned process starts multiprocessing's resource tracker, which unblocks
        # SIGINT and SIGTERM in this thread once it has: inside ctrl_c_held, the workers started
        # after it with the stop signals open (a Ctrl-C while Python starts in them: a traceback).
        resource_tracker.ensure_running()
        with ctrl_c_held():  # a Ctrl-C while a worker is still starting waits for _worker_main
            for i, wcfg in enumerate(worker_configs(self.cfg, self.devices)):
                self.spawn(i, _worker_main, wcfg, str(self.out), self.rows, self.log_level)

    def spawn(self, worker: int, target: Any, *args: Any) -> None:
        """Start `target(worker, *args, tasks, results)` in a process, `tasks` and `results` its
        ends of two pipes of its own (`_ShardsAsked`, `_Outbox`). This process closes its copies of
        the worker's ends: the worker gone, its pipe ends too."""
        shards_in, shards_out = self.ctx.Pipe(duplex=False)
        messages_in, messages_out = self.ctx.Pipe(duplex=False)
        results = _Outbox(messages_out)
        proc = self.ctx.Process(target=target, name=f"fastlaion-worker-{worker}", daemon=True,
                                args=(worker, *args, _ShardsAsked(worker, shards_in, results), results))
        self.procs.append(proc)  # before start: a Ctrl-C inside start() still stops it (stop)
        try:
            proc.start()
        except BaseException:
            shards_out.close()
            messages_in.close()
            raise
        finally:
            shards_in.close()
            messages_out.close()
        self.results.watch(worker, proc.sentinel, messages_in, shards_out)

    def check_alive(self, done: set[int]) -> None:
        """Nothing to do: `results` watches each worker's process and gives ("ended", None,
        [worker]) after the last message of one that ended without saying "done"."""

    def check_ended(self, workers: list[int], done: set[int]) -> None:
        for i in workers:
            if i not in done:
                self.procs[i].join(1.0)  # it has ended: its exit status comes with its end
                code = self.procs[i].exitcode
                how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
                raise WorkerFailed(f"worker {i} ({self.devices[i]}) {how} before finishing; finished shards are "
                                   "kept, rerun the same command to resume")

    def join(self) -> None:
        for proc in self.procs:
            proc.join()

    def stop(self, interrupted: bool) -> None:
        """Ctrl-C reaches the workers too (same process group): give them time to abort their
        shards; otherwise, or if they linger, kill them. A signal sent to this process alone
        (`kill -INT`/`kill -TERM PID`, `timeout`, `docker stop`) reached no worker: it is passed on
        (SIGTERM after a failure), and each worker aborts its shards as on a Ctrl-C. Their pipes
        are closed then: a worker waiting for its next shard takes None, and one whose messages
        fill its pipe does not wait for this process to read them."""
        procs = [p for p in self.procs if p.pid is not None]  # a Ctrl-C may have come before one started
        for proc in procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):  # a second one is dropped (_first_ctrl_c_only)
                    os.kill(proc.pid, stopped_by() if interrupted else signal.SIGTERM)
        self.results.close()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()

    def close(self) -> None:
        self.results.close()


_FRAME = struct.Struct("!Q")  # a message on a worker's pipe: its pickle's length, then the pickle
_READ_BYTES = 1 << 18  # the most read from a worker's pipe at once


class _Outbox:
    """A worker's messages to this process, on a pipe of its own, in the order it put them. As a
    multiprocessing Queue's, `put` never waits: a thread writes them, as many at once as are
    waiting; `close`, then `join_thread` (or `cancel_join_thread`) at the end. A message is
    pickled in `put`: one that does not pickle fails there, not in the thread."""

    def __init__(self, conn: Any):
        self.conn = conn
        self._ready()

    def _ready(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.waiting: list[bytes] = []
        self.closed = False
        self.thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:  # to the worker process: its end of the pipe
        return {"conn": self.conn}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.conn = state["conn"]
        self._ready()

    def put(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self.cond:
            if self.closed:
                raise ValueError("the worker's messages are closed")
            self.waiting += (_FRAME.pack(len(data)), data)
            if self.thread is None:
                self.thread = threading.Thread(target=self._send, name="fastlaion-outbox", daemon=True)
                self.thread.start()
            self.cond.notify()

    def _send(self) -> None:
        fd = self.conn.fileno()
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                frames, self.waiting = self.waiting, []
            if not frames:  # closed, and all sent
                return
            view = memoryview(b"".join(frames))
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:  # this process's parent closed its end: it reads no more (stop)
                return

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def join_thread(self) -> None:
        """Wait until every message is written (this process's parent reads them meanwhile)."""
        if self.thread is not None:
            self.thread.join()
        self.conn.close()

    def cancel_join_thread(self) -> None:
        """Exit without waiting for the messages not written yet (the thread is a daemon)."""


class _ShardsAsked:
    """A worker's shard ids, as it takes them (`get`): it asks this process for its next one
    on its messages (`_Inbox` answers, and hands out the shards one at a time, so that none waits
    for a worker busy with another) and reads the answer on a pipe of its own. None when there are
    no more, or when this process has stopped handing them out (`_Processes.stop`)."""

    def __init__(self, worker: int, conn: Any, results: _Outbox):
        self.worker, self.conn, self.results = worker, conn, results

    def get(self) -> int | None:
        self.results.put(("take", self.worker))
        try:
            return self.conn.recv()
        except EOFError:
            return None


@dataclasses.dataclass
class _Peer:
    """This process's ends of one worker's pipes."""

    worker: int
    sentinel: int  # readable once the worker's process has ended
    messages: Any  # its messages (a Connection whose bytes `_Inbox._read` reads as they come)
    shards: Any  # its shard ids, one per ("take", worker)
    received: bytearray = dataclasses.field(default_factory=bytearray)  # read, not yet a whole message
    said_done: bool = False


class _Inbox:
    """The workers' messages, as drive reads them (`get`): each worker's in the order it sent
    them, read from its own pipe; and the shards, handed out as the workers ask for them.

    A worker whose process has ended has written everything it ever will: its pipe is read to the
    end, and unless it said "done", ("ended", None, [worker]) comes after its last message, so a
    worker that exited normally, its "done" unread, is never taken for dead, and one that died is
    seen at once. A message it was cut off in the middle of (SIGKILL) is dropped: drive stops the
    run, and the rerun redoes the worker's shard."""

    def __init__(self) -> None:
        self.shards: collections.deque[int] = collections.deque()  # not handed out yet
        self.selector = selectors.DefaultSelector()
        self.messages: collections.deque[Any] = collections.deque()  # read, not yet taken by drive
        self.peers: list[_Peer] = []

    def watch(self, worker: int, sentinel: int, messages: Any, shards: Any) -> None:
        os.set_blocking(messages.fileno(), False)
        peer = _Peer(worker, sentinel, messages, shards)
        self.peers.append(peer)
        self.selector.register(messages.fileno(), selectors.EVENT_READ, (peer, False))
        self.selector.register(sentinel, selectors.EVENT_READ, (peer, True))

    def get(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.messages:
            left = deadline - time.monotonic()
            for key, _ in self.selector.select(max(0.0, left)) if self.selector.get_map() else _slept(left):
                peer, ended = key.data
                if ended:
                    self._ended(peer)
                elif peer.messages is not None:
                    self._read(peer)
            if not self.messages and left <= 0:
                raise queue.Empty
        return self.messages.popleft()

    def _read(self, peer: _Peer, to_the_end: bool = False) -> None:
        """Read what `peer`'s pipe holds (all of it, `to_the_end`), and take the whole messages."""
        while True:
            try:
                data = os.read(peer.messages.fileno(), _READ_BYTES)
            except BlockingIOError:
                break
            if not data:  # every copy of its end closed: nothing more will come
                self.selector.unregister(peer.messages.fileno())
                peer.messages.close()
                peer.messages = None
                break
            peer.received += data
            if not to_the_end:
                break
        received, at = peer.received, 0
        while len(received) - at >= _FRAME.size:
            end = at + _FRAME.size + _FRAME.unpack_from(received, at)[0]
            if end > len(received):
                break
            self._take(peer, pickle.loads(received[at + _FRAME.size:end]))
            at = end
        del received[:at]

    def _take(self, peer: _Peer, msg: Any) -> None:
        if msg[0] == "take":  # the worker's next shard, or None: no more
            with contextlib.suppress(OSError):  # it has ended meanwhile: its end is seen (`_ended`)
                peer.shards.send(self.shards.popleft() if self.shards else None)
            return
        if msg[0] == "done":
            peer.said_done = True
        self.messages.append(msg)

    def _ended(self, peer: _Peer) -> None:
        """`peer`'s process has ended: what it wrote is all in its pipe, read now to the end."""
        self.selector.unregister(peer.sentinel)
        if peer.messages is not None:
            self._read(peer, to_the_end=True)
        if peer.messages is not None:  # a process it started holds a copy of the pipe: read no more
            self.selector.unregister(peer.messages.fileno())
            peer.messages.close()
            peer.messages = None
        if peer.received:
            log.debug("worker %d ended in the middle of a message (%d bytes of it dropped)", peer.worker,
                      len(peer.received))
            peer.received.clear()
        peer.shards.close()
        if not peer.said_done:
            self.messages.append(("ended", None, [peer.worker]))

    def close(self) -> None:
        """Close this process's ends of every pipe (more than once is fine)."""
        for peer in self.peers:
            if peer.messages is not None:
                peer.messages.close()
                peer.messages = None
            peer.shards.close()
        self.shards.clear()
        self.selector.close()


def _slept(seconds: float) -> list[Any]:
    """No pipe left to wait on: wait `seconds` (drive checks on the workers meanwhile)."""
    time.sleep(max(0.0, seconds))
    return []


class _QueueProgress:
    """A worker's progress callbacks, forwarded to the parent."""

    def __init__(self, worker: int, results: Any):
        self.worker, self.results = worker, results

    def rows_done(self, rows: int, kept: int, busy_s: dict[str, float] | None = None,
                  shard: int | None = None) -> None:
        self.results.put(("rows", self.worker, rows, kept, busy_s, shard))

    def shard_done(self, stats: dict[str, Any]) -> None:
        self.results.put(("shard", self.worker, stats))

    def start(self, *args: Any) -> None: ...

    def extracting(self) -> Any:
        return None


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the parent dies (even by SIGKILL), so no orphan
    keeps writing into an output folder that a rerun is resuming."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _first_ctrl_c_only(signum: int, frame: Any) -> None:
    """A worker's SIGINT and SIGTERM handler: the first Ctrl-C or SIGTERM stops the worker
    (KeyboardInterrupt), any after it are dropped: the terminal's (or a supervisor's, to the
    whole group) and the one the parent forwards (`_Processes.stop`), or a second press, landed
    in the worker's clean-up (its event loop closing connections, its queue's feeder flushing)
    and printed a traceback there. The parent ends a worker that lingers (STOP_GRACE_S)."""
    global _stopped
    _stopped = True
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


_stopped = False  # this worker got its stop signal (_first_ctrl_c_only)


def _worker_main(worker: int, cfg: RunConfig, out: str, rows: InputRows, log_level: int, tasks: Any,
                 results: Any) -> None:
    """A worker process: `serve_shards`, dying with the parent and flushing its messages before
    it exits. Once serve_shards has returned, the worker only exits: a stop signal then (the
    parent's SIGTERM after another worker failed, or a late Ctrl-C) is dropped; it raised
    KeyboardInterrupt in the flush below, with a traceback. Stopped, the worker does not wait
    for its last messages to go out: the parent reads no more of them."""
    _die_with_parent()
    if os.getppid() == 1:  # the parent died before prctl took effect
        return
    for sig in STOP_SIGNALS:  # while they are still held (ctrl_c_held)
        signal.signal(sig, _first_ctrl_c_only)
    try:
        try:
            release_ctrl_c()  # started under ctrl_c_held: a pending Ctrl-C lands here
            serve_shards(worker, cfg, Path(out), rows, tasks, results, log_level)
        finally:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
    except KeyboardInterrupt:  # (one that came just before the line above, too)
        pass  # the parent saw Ctrl-C too and reports it
    results.close()
    if _stopped:
        results.cancel_join_thread()
    else:
        results.join_thread()


def serve_shards(worker: int, cfg: RunConfig, out: Path, rows: InputRows, tasks: Any, results: Any,
                 log_level: int = logging.WARNING) -> None:
    """What a worker does, in a process or a Ray actor: run the shards whose ids it takes from
    `tasks` (until None), and report to `drive` on `results`: "ready" once its models are
    loaded, "rows" and "shard" as the work proceeds, its log records at `log_level` and above
    ("log", `forwarded_logs`), then "done", or the one message that says how it failed (sent in
    parts that pickle: the driver raises the error again)."""
    with forwarded_logs(worker, results, log_level):
        _serve_shards(worker, cfg, out, rows, tasks, results)


def _serve_shards(worker: int, cfg: RunConfig, out: Path, rows: InputRows, tasks: Any, results: Any) -> None:
    try:  # the imports too: Ctrl-C during their seconds ends this worker quietly, as later
        from .pipeline import work

        uses_torch = cfg.score.enabled or bool(cfg.tags.watermark_model or cfg.tags.aesthetic_v2)
        if uses_torch and cfg.score.device in ("cpu", "auto"):
            try:  # CPU workers share the cores: torch's own thread pool gets this worker's share
                import torch

                torch.set_num_threads(cfg.decode.threads)  # this worker's share (on_worker)
            except ImportError:
                pass

        def shard_ids() -> Any:
            while (shard := tasks.get()) is not None:
                yield shard

        work(cfg, out, rows, shard_ids(), _QueueProgress(worker, results),
             on_ready=lambda secs: results.put(("ready", worker, secs)))
        results.put(("done", worker))
    except KeyboardInterrupt:
        pass  # the driver saw Ctrl-C too and reports it
    except ConfigError as exc:
        results.put(("config_error", worker, str(exc)))
    except ShardWriteError as exc:  # sent in parts: an OSError subclass does not pickle its own fields
        results.put(("shard_failed", worker, exc.shard, exc.errno, exc.what, exc.path))
    except OSError as exc:
        results.put(("os_error", worker, (exc.errno, exc.strerror or str(exc), exc.filename)))
    except BaseException:
        results.put(("error", worker, traceback.format_exc()))
