"""The workers of `fastlaion run --ray ADDRESS` as actors of a Ray cluster, when one box is not
enough.

They are fastlaion.workers' workers in another home: an actor runs `serve_shards`, taking shard
ids from an actor that hands them out (`ShardHandout`) and putting the same messages on a Ray
queue, and `drive` makes of them what it makes of a process's; only starting, watching and
stopping them is Ray's (`RayWorkers`).

This process plans where they go (`plan`) from the nodes Ray reports alive whose raylet answers
now (`RayCluster.nodes`: Ray takes seconds to mark a lost node dead): with --gpus, one actor per
GPU and --workers-per-gpu, each asking Ray for that fraction of a GPU; without, --processes
actors spread over the nodes by their CPUs. Each is pinned to its node and reserves its share of
the node's CPUs, and runs that many threads: what Ray accounts for is what the worker uses. A node
lost between the plan and its workers' start leaves them out (`RayWorkers._started`): they have
taken no shard. A node lost once they run (a crashed or preempted machine) drops its workers, and
the shards they had taken, not finished, go to the others (`RayWorkers.check_alive`); only a
worker that dies on a node that is still there, or the loss of every worker, stops the run, its
finished shards kept for a rerun.

Every node must see the output folder at the path this process sees it (a shared filesystem), and
have this version of fastlaion installed in the Python that runs Ray there: each actor checks
both before any work and refuses with its node's name. Ray ends a run's actors when this process
goes, as the kernel ends a worker process (workers._die_with_parent).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    ConfigError,
    ParallelConfig,
    RunConfig,
    WorkerFailed,
    first_line,
    ray_address,
)
from .interrupt import STOP_SIGNALS, land
from .reader import InputRows
from .workers import WorkerPool, on_worker, serve_shards
from .writer import shard_name

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # to open a TCP connection to --ray HOST:PORT before Ray tries
ANSWER_TIMEOUT_S = 10.0  # for the first bytes back on it (a Ray head's GCS sends them at once)
START_WARN_S = 30.0  # a worker not started by then is waiting for its node's CPUs or GPUs: say so
KILLED_WAIT_S = 10.0  # how long killed actors get to be gone before the run returns
NODE_ANSWER_TIMEOUT_S = 2.0  # for a node's raylet to take a connection and answer on it (RayCluster.nodes)
NODE_ID_CHARS = 8  # of a node's id in the name of a node that shares its address with another
START_PROBE_S = 2.0  # how often the nodes of workers not started yet are asked whether they answer
MARKED_DEAD_WAIT_S = 300.0  # for Ray to mark a node lost mid-run dead before its workers' shards go back


@dataclass
class RayCluster:
    """A connected cluster, checked at once to have room for the run's workers."""

    ray: Any
    par: ParallelConfig
    lost: set[str] = field(default_factory=set)  # the nodes found not answering, each told once

    def nodes(self) -> list[dict[str, Any]]:
        """The nodes Ray lists alive (as ray.nodes() does) whose raylet answers now. Ray marks a
        node dead only once it has missed its health checks (about 15 s with Ray's defaults; a
        node that stopped cleanly, at once): a worker planned meanwhile on a node lost to a crash
        or to its network waited for that, and the run failed."""
        alive = [n for n in self.ray.nodes() if n.get("Alive")]
        silent = _silent(alive)
        for node, why in zip(alive, silent):
            if why and node["NodeID"] not in self.lost:
                self.lost.add(node["NodeID"])
                log.warning("Ray node %s does not answer (%s): lost, though Ray has not marked it dead yet; no "
                            "worker is placed there", _node_name(node, alive), why)
        return [node for node, why in zip(alive, silent) if not why]

    def workers(self, cfg: RunConfig, out: Path, rows: InputRows) -> RayWorkers:
        """The workers for `cfg`, planned on the nodes alive now (reading the input, or extracting
        it, may have taken long enough for an autoscaler to change them), not started."""
        return RayWorkers(self.ray, cfg, out, rows, plan(self.nodes(), self.par))


@contextmanager
def ray_cluster(address: str, par: ParallelConfig) -> Iterator[RayCluster]:
    """The Ray cluster at `address` (--ray), connected (for "local", a private one started), and
    the workers' places on it planned once, as a check; disconnected (stopped) at the end. The run
    enters it before it reads its input or touches the output folder, so that a wrong --ray, or a
    cluster without the GPUs asked for, is told at once."""
    # A private instance keeps its sockets, session and logs in a folder of its own, removed with
    # it (Ray's default, /tmp/ray/session_*, would keep a session a run): in RAY_TMPDIR where that
    # is set, else in /tmp, whatever TMPDIR is (Ray's socket paths live under it: short).
    own = None
    if address == "local":
        root = os.path.abspath(os.environ.get("RAY_TMPDIR") or "/tmp")
        try:
            os.makedirs(root, exist_ok=True)
            own = tempfile.mkdtemp(prefix="fl-ray-", dir=root)
        except OSError as exc:
            raise ConfigError(f"--ray local: cannot make its folder in {root} (RAY_TMPDIR): "
                              f"{exc.strerror or exc}") from None
    try:
        ray = _connect(address, own)
        with _node_deaths_unprinted():
            try:
                cluster = RayCluster(ray, par)
                plan(cluster.nodes(), par)  # the cluster has what --gpus / --processes ask for, or one line
                yield cluster
            finally:
                ray.shutdown()
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


def _connect(address: str, temp_dir: str | None) -> Any:
    """`ray`, connected to the cluster at `address` (a "local" one's files in `temp_dir`); every
    way this fails is one line."""
    if address == "local":
        # A private instance listens on loopback only (Ray's switch for one-machine clusters, its
        # default on macOS and Windows; else its nodes listen on the machine's network address)
        # and reports no usage statistics. Read when ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Its own token, in the environment its processes inherit: Ray 2.60's local start would
        # otherwise write ~/.ray/auth_token, which turns every later `ray start` and --ray auto of
        # this user to token authentication (and breaks them against clusters without it).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    else:
        if address != "auto":
            _probe(address)
        # A head that takes connections but does not answer: Ray waits 30 s a try, 20 tries; so,
        # about 40 s in all. Read when ray is imported (the first), when it connects (the second).
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", "10")
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "2")
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray, here and on every node of the cluster: pip install 'fastlaion[ray]'") from None
    level = logging.getLogger().getEffectiveLevel()  # Ray's "connected" lines with --verbose only
    # A Ctrl-C or SIGTERM inside ray.init can leave a half-started local instance behind (its
    # agents orphaned, once a crash): it is held until init returns, then Ray is shut down and it
    # lands, with the handler it would have met (SIGTERM's: `terminated`). ray.init sets a SIGTERM
    # handler of its own first thing (a driver's: sys.exit(15)), which is taken for the signal
    # here, and ours is put back after it: with Ray's, a SIGTERM later in the run was exit 15,
    # with no word of what was written.
    interrupted: list[int] = []
    held = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda signum, _: interrupted.append(signum))
                for sig in STOP_SIGNALS} if held else {}
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, logging_level=level, _temp_dir=temp_dir)
        else:
            ray.init(address=address, logging_level=level)
    except SystemExit as exc:
        if not held or exc.code != signal.SIGTERM:
            raise
        interrupted.append(signal.SIGTERM)  # Ray's handler got it
    except Exception as exc:  # a refused connection, another Ray or Python version, no node here...
        if not interrupted:
            cause = f" ({first_line(exc.__cause__)})" if exc.__cause__ else ""
            raise ConfigError(f"--ray {address}: {_plain(first_line(exc))}{_plain(cause)}; this machine must be a "
                              "node of the cluster (`ray start --address HEAD:PORT`) with the same Ray and Python "
                              "versions") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if interrupted:
        ray.shutdown()
        land(interrupted[0], previous[interrupted[0]])
        raise KeyboardInterrupt  # a handler that let it pass: the run was stopped all the same
    return ray


def _silent(nodes: list[dict[str, Any]]) -> list[str]:
    """_raylet_silent of each of `nodes` (ray.nodes() entries), asked at once."""
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(nodes)))) as pool:
        return list(pool.map(_raylet_silent, nodes))


def _lost(ray: Any, node_ids: set[str]) -> dict[str, str]:
    """Those of `node_ids` that are lost now, each with why: Ray lists it dead or no more, or its
    raylet does not answer (_raylet_silent)."""
    listed = {n["NodeID"]: n for n in ray.nodes() if n["NodeID"] in node_ids}
    lost = {i: "Ray marked it dead" if i in listed else "Ray no longer lists it"
            for i in node_ids if not listed.get(i, {}).get("Alive")}
    alive = [n for i, n in listed.items() if i not in lost]
    lost.update((n["NodeID"], why) for n, why in zip(alive, _silent(alive)) if why)
    return lost


def _raylet_silent(node: dict[str, Any]) -> str:
    """Why the raylet of `node` (a ray.nodes() entry) does not answer ("" where it does): it must
    take a connection on its port and, as the gRPC server it is, send its first bytes (SETTINGS)
    within NODE_ANSWER_TIMEOUT_S. Refused is a raylet that died on a machine still up; a timeout,
    a machine down or cut off, or a raylet that hangs. An answer of any kind, a connection
    closed or reset included, leaves the node to Ray's judgement."""
    port = node.get("NodeManagerPort")
    if not port:
        return ""
    try:
        conn = socket.create_connection((node["NodeManagerAddress"], port), timeout=NODE_ANSWER_TIMEOUT_S)
    except TimeoutError:
        return f"no connection in {NODE_ANSWER_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    with conn:
        try:
            conn.sendall(_H2_PREFACE)
            conn.recv(64)
        except TimeoutError:
            return f"nothing sent back in {NODE_ANSWER_TIMEOUT_S:.0f} s"
        except OSError:
            pass
    return ""


def _node_name(node: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    """`node`'s address, and where another of `nodes` has the same (nodes of one machine, as
    `ray start` on one box makes them, or --ray local), the start of its id: 127.0.0.1/3f9a1c2e."""
    ip = node["NodeManagerAddress"]
    if any(n["NodeManagerAddress"] == ip and n["NodeID"] != node["NodeID"] for n in nodes):
        return f"{ip}/{node['NodeID'][:NODE_ID_CHARS]}"
    return ip


_NODE_DEATH = re.compile(r"The node with node id: (\w+) and address: (\S+).*? has been marked dead because ([^.]*)")


@contextmanager
def _node_deaths_unprinted() -> Iterator[None]:
    """While connected, Ray's driver prints what the cluster publishes as errors, as the raylet's:
    a node marked dead, even one without a worker of this run, was three yellow lines on stdout,
    "(raylet) The node with node id: ... has been marked dead because the detector has missed too
    many heartbeats from it. This can happen when a (1) raylet crashes unexpectedly (OOM, etc.)
    (2) raylet has lagging heartbeats ...". The run already says what a lost node means to it (a
    worker of it died, in its one-line error; none placed there, in its warning): here Ray's
    message is one line of our log at debug level (--verbose). Ray's other messages pass. Its
    printer is looked up by name for each message (ray._private.worker), so wrapping it there
    reaches them; where a Ray version has it elsewhere, its lines are printed as they were."""
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None:
        yield
        return

    def printed(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if data.get("pid") == "raylet":
            lines = []
            for line in data.get("lines", []):
                death = _NODE_DEATH.search(line)
                if death:
                    log.debug("Ray marked node %s/%s dead: %s", death[2], death[1][:NODE_ID_CHARS], death[3])
                else:
                    lines.append(line)
            if not lines:
                return
            data = {**data, "lines": lines}
        printer(data, *args, **kwargs)

    ray_worker.print_to_stdstream = printed
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = printer


def _plain(text: str) -> str:
    """Ray's messages without their terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# HTTP/2's client preface and an empty SETTINGS frame: what a gRPC client sends first
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _probe(address: str) -> None:
    """Refuse at once an address where nothing listens, where something takes the connection but
    never answers, or where what answers is no gRPC server (a dashboard's HTTP port, say): Ray
    would retry for a minute or wait 40 s. A Ray head's GCS is a gRPC server and sends its HTTP/2
    SETTINGS frame as soon as a connection opens. A TLS record back (a cluster with RAY_USE_TLS)
    or the connection closed lets ray.init try and say what it finds."""
    host, port = ray_address(address)
    hint = "start one with `ray start --head`, or use --ray local for one on this machine only"
    try:
        conn = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except OSError as exc:
        raise ConfigError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); {hint}") from None
    head = b""
    with conn:
        try:
            conn.settimeout(ANSWER_TIMEOUT_S)
            conn.sendall(_H2_PREFACE)
            while len(head) < 4:
                more = conn.recv(64)
                if not more:
                    return  # closed: an answer of a kind; ray.init says more
                head += more
        except TimeoutError:
            if head[:1] == b"\x00":  # the start of a frame header (a SETTINGS frame's length begins with 0)
                return
            if not head:
                raise ConfigError(f"--ray {address}: something takes connections there but sent nothing in "
                                  f"{ANSWER_TIMEOUT_S:.0f} s, so it is no Ray cluster's head (the port of "
                                  f"`ray start --head`, 6379 by default); {hint}") from None
        except OSError:
            return  # reset: it answered, by closing
    if head[3:4] == b"\x04" or head[0] in range(0x14, 0x18):  # an HTTP/2 SETTINGS frame; a TLS record
        return
    what = head.decode("latin-1").split("\r")[0][:40]
    raise ConfigError(f"--ray {address}: what answers there is no Ray cluster's head (no gRPC; it began {what!r}), "
                      f"perhaps its dashboard: give the port of `ray start --head`, 6379 by default")


@dataclass(frozen=True)
class Slot:
    """Where one worker runs and what it reserves there."""

    node_id: str
    node_ip: str
    node_name: str  # in messages: its address, with the start of its id where nodes share it (_node_name)
    num_cpus: float  # reserved on the node: the worker's share of its CPUs (0 where it has none)
    num_gpus: float  # 1 / --workers-per-gpu, or 0 for a CPU worker
    threads: int  # for its pools (decode threads, torch's threads): the CPUs reserved, at least 1

    @property
    def device(self) -> str:
        """Its models' device. Ray makes the GPU it gives an actor the only one the actor sees
        (CUDA_VISIBLE_DEVICES), so "cuda" is that GPU; a CPU worker never takes one it was not
        given, which "auto" would."""
        return "cuda" if self.num_gpus else "cpu"

    @property
    def label(self) -> str:
        """Its name in messages and the summary (RayWorkers adds the GPU's number): ray:10.0.0.2:cuda,
        ray:127.0.0.1/3f9a1c2e:cpu where two of the run's nodes have one address."""
        return f"ray:{self.node_name}:{self.device}"


def plan(nodes: list[dict[str, Any]], par: ParallelConfig) -> list[Slot]:
    """The workers' slots on the alive `nodes` (as ray.nodes() lists them, less those that do not
    answer: RayCluster.nodes; ordered here by address). With --gpus, --workers-per-gpu workers on
    each GPU, all GPUs or the first N, each reserving its share of its node's CPUs. Without,
    --processes workers (0: one per CPU of the cluster), one at a time to the node with the most
    CPUs per worker, each reserving its share."""
    alive = sorted((n for n in nodes if n.get("Alive")), key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
    cpus = [n["Resources"].get("CPU", 0.0) for n in alive]
    if par.gpus is not None:
        gpus = [int(n["Resources"].get("GPU", 0)) for n in alive]
        total = sum(gpus)
        if not total:
            raise ConfigError("--gpus: the Ray cluster has no GPU; leave --gpus out for workers on its CPUs "
                              "(--processes N)")
        wanted = total if par.gpus == "all" else int(par.gpus)
        if wanted > total:
            raise ConfigError(f"--gpus {wanted}: the Ray cluster has {total} GPU(s)")
        per_gpu = par.workers_per_gpu
        slots: list[Slot] = []
        for node, node_cpus, node_gpus in zip(alive, cpus, gpus):
            taken = min(node_gpus, wanted - len(slots) // per_gpu)
            if taken:
                slot = _slot(node, alive, node_cpus / (node_gpus * per_gpu), 1 / per_gpu)
                slots += [slot] * (taken * per_gpu)
        return slots
    if not sum(cpus):
        raise ConfigError("the Ray cluster has no CPU to run workers on")
    counts = [0] * len(alive)
    for _ in range(par.processes or int(sum(cpus))):
        most = max(range(len(alive)), key=lambda i: cpus[i] / (counts[i] + 1))
        counts[most] += 1
    return [_slot(node, alive, node_cpus / n, 0.0)
            for node, node_cpus, n in zip(alive, cpus, counts) for _ in range(n)]


def _slot(node: dict[str, Any], nodes: list[dict[str, Any]], cpus: float, gpus: float) -> Slot:
    return Slot(node["NodeID"], node["NodeManagerAddress"], _node_name(node, nodes), _reservable(cpus),
                _reservable(gpus), max(1, int(cpus)))


def _reservable(amount: float) -> float:
    """`amount` as Ray takes it, whole above 1 and to 4 decimals below, rounded down so that a
    node's workers together never ask for more than it has."""
    return float(int(amount)) if amount >= 1 else math.floor(amount * 10_000) / 10_000


class RayWorkers(WorkerPool):
    """One actor per slot, fed from Ray queues."""

    def __init__(self, ray: Any, cfg: RunConfig, out: Path, rows: InputRows, slots: list[Slot]):
        self.ray = ray
        self.cfg = cfg
        # Absolute: an actor's working folder is Ray's, on a node of its own. Not resolved: a
        # symlink here (/data -> /mnt/nfs/data) may be the very path the other nodes mount.
        self.out = os.path.abspath(out)
        self.rows = InputRows(tuple(os.path.abspath(p) for p in rows.parts), rows.heights)
        self.slots = slots
        self.devices = [slot.label for slot in slots]
        self.shards: Any = None  # the ShardHandout actor (start)
        self.results = _Results(_queue(ray), ray)
        self.actors: list[Any] = []
        self.runs: dict[Any, int] = {}  # each worker's serve_shards call -> the worker
        self.lost: dict[str, str] = {}  # the nodes lost mid-run (node id: why), each handled once
        # their workers, killed, and since when, until their shards go back (check_ended)
        self.losing: dict[str, tuple[list[int], float]] = {}
        self.gone: set[int] = set()  # the workers dropped: their shards handed out to the others
        self.over = False  # every shard finished (all_finished)

    def start(self, todo: list[int]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Each worker waits on it for its next shard (two calls at most: its own, and one of its
        # that outlived it) and drive's calls come between.
        self.shards = self.ray.remote(ShardHandout).options(
            max_concurrency=2 * len(self.slots) + 8, **_on_this_node(self.ray)).remote(todo)
        actor = self.ray.remote(FastlaionWorker)
        for slot in self.slots:
            self.actors.append(actor.options(
                num_cpus=slot.num_cpus, num_gpus=slot.num_gpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False)).remote())
        # Every worker checked before any starts: a node without the output folder stops the
        # run before it has written anything. A node lost since the plan leaves its workers out.
        self._leave_out(self._started([a.check.remote(__version__, os.getcwd(), self.out, self.rows)
                                       for a in self.actors]))
        # their shares of the per-host limits among the workers that run
        configs = [on_worker(self.cfg, slot.device, slot.threads, len(self.slots)) for slot in self.slots]
        level = logging.getLogger().getEffectiveLevel()  # the workers log what this process would
        self.runs = {a.run.remote(i, c, self.out, self.rows, self.shards, self.results.queue, level): i
                     for i, (a, c) in enumerate(zip(self.actors, configs))}

    def _started(self, checks: list[Any]) -> dict[str, str]:
        """Wait for the workers' `checks`; returns the nodes lost meanwhile (node id: why), whose
        workers are not to run. Any other failure is the run's one-line error. Ray retries an
        actor on a node whose raylet is gone until it marks the node dead (about 15 s with its
        defaults), then fails it: a run planned just before its node was lost failed so. Here
        the nodes of the workers not started yet are asked every START_PROBE_S whether they
        answer (RayCluster.nodes' question), and a failed check is a lost node's where its node
        is lost."""
        pending = {ref: i for i, ref in enumerate(checks)}
        lost: dict[str, str] = {}
        warn_at = time.monotonic() + START_WARN_S
        probe_at = time.monotonic() + START_PROBE_S
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                i = pending.pop(ref)
                node = self.slots[i].node_id
                try:
                    gpu_ids = self._outcome(i, ref, "could not start")
                except WorkerFailed:
                    why = lost.get(node) or _lost(self.ray, {node}).get(node)
                    if not why:
                        raise
                    lost[node] = why
                    continue
                if gpu_ids:
                    self.devices[i] += ":" + ",".join(gpu_ids)
            if pending and time.monotonic() >= probe_at:
                probe_at = time.monotonic() + START_PROBE_S
                lost |= _lost(self.ray, {self.slots[i].node_id for i in pending.values()} - lost.keys())
                pending = {ref: i for ref, i in pending.items() if self.slots[i].node_id not in lost}
            if pending and time.monotonic() > warn_at:
                log.warning("%d of %d Ray workers have not started after %.0f s: their nodes' CPUs or GPUs are "
                            "taken (`ray status` shows the cluster's); waiting", len(pending), len(checks),
                            START_WARN_S)
                warn_at = math.inf
        return lost

    def _leave_out(self, lost: dict[str, str]) -> None:
        """Leave the workers of the `lost` nodes (node id: why) out of the run, before it starts:
        they have taken no shard (none has asked for its first), so the others run them all. A
        warning for each such node; where no worker is left, the run's one-line error."""
        if not lost:
            return
        out = {i for i, slot in enumerate(self.slots) if slot.node_id in lost}
        for i in out:
            self.ray.kill(self.actors[i])  # its creation given up, or a started actor ended
        kept = [i for i in range(len(self.slots)) if i not in out]
        names = {slot.node_id: slot.node_name for slot in self.slots}
        if not kept:
            which = "; ".join(f"{names[node]}: {why}" for node, why in lost.items())
            raise WorkerFailed(f"no Ray worker could start: the node(s) planned for them were lost ({which}); finished "
                               "shards are kept, rerun the same command to resume on the nodes that answer")
        for node, why in lost.items():
            log.warning("Ray node %s was lost before its workers started (%s): its %d worker(s) are left out, the "
                        "run goes on with the other %d", names[node], why,
                        sum(self.slots[i].node_id == node for i in out), len(kept))
        self.slots = [self.slots[i] for i in kept]
        self.actors = [self.actors[i] for i in kept]
        self.devices[:] = [self.devices[i] for i in kept]  # in place: drive and the summary hold this list

    def _outcome(self, worker: int, ref: Any, failed: str) -> Any:
        """What the actor call `ref` returned; its failure as the one-line error the run ends with."""
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:  # the method raised
            if isinstance(exc.cause, ConfigError):
                raise ConfigError(str(exc.cause)) from None
            why = _last_line(exc)
        except exceptions.RayError as exc:  # the actor died, or its node, or it could not start
            text = _plain(str(exc))
            if "No module named 'fastlaion" in text or "ModuleNotFoundError" in text:
                raise ConfigError(f"node {self.slots[worker].node_name} cannot import fastlaion: install this version "
                                  f"({__version__}) in the Python that runs Ray on every node") from None
            why = _plain(first_line(exc))
        raise WorkerFailed(f"worker {worker} ({self.devices[worker]}) {failed} ({why}); finished shards are kept, "
                           "rerun the same command to resume")

    def check_alive(self, done: set[int]) -> None:
        """A worker whose call has ended, not having said "done": where its node is lost (Ray
        marked it dead, or its raylet does not answer: _lost), every worker of that node is
        killed and dropped, and once Ray has marked the node dead (or no shard is left to hand
        out) drive is told behind their last messages (`check_ended`), where their shards go back
        to the others. Until then they may still be running, cut off from the cluster but not from
        the shared folder: Ray marking their node dead is what ends them (its raylet, back, is
        told to exit, and its workers with it), so none of their shards is run twice at once.
        Any other end stops the run, as does the loss of every worker while shards are left."""
        calls = [ref for ref, i in self.runs.items() if i not in done and i not in self.gone]
        ready, _ = self.ray.wait(calls, num_returns=len(calls), timeout=0) if calls else ([], [])
        for ref in ready:
            worker = self.runs[ref]
            node = self.slots[worker].node_id
            if worker in done or node in self.lost:
                continue
            try:  # returned normally: its last messages are in the queue
                self._outcome(worker, ref, "died before finishing")
            except WorkerFailed:
                why = _lost(self.ray, {node}).get(node)
                if not why:
                    raise
                self._lose(node, why, done)
        if self.losing:
            listed = {n["NodeID"]: n.get("Alive") for n in self.ray.nodes()}
            for node, (workers, since) in list(self.losing.items()):
                if self.over or not listed.get(node):
                    # behind the workers' last messages: drive reads those first, and the shards
                    # they finished are not handed out again
                    self.results.queue.put(("ended", None, workers))
                    del self.losing[node]
                elif time.monotonic() - since > MARKED_DEAD_WAIT_S:  # a node that answers again, say
                    raise WorkerFailed(
                        f"Ray node {self.slots[workers[0]].node_name} was lost mid-run ({self.lost[node]}) but Ray "
                        f"has not marked it dead in {MARKED_DEAD_WAIT_S:.0f} s: its workers' shards cannot be "
                        "handed out again safely; finished shards are kept, rerun the same command to resume")

    def _lose(self, node: str, why: str, done: set[int]) -> None:
        """Kill the workers of `node`, lost mid-run (`why`); the run's one-line error where no
        worker is left and shards are."""
        self.lost[node] = why
        workers = [i for i, slot in enumerate(self.slots) if slot.node_id == node and i not in done]
        for i in workers:
            self.ray.kill(self.actors[i])
        self.losing[node] = (workers, time.monotonic())
        left = [i for i in range(len(self.slots)) if self.slots[i].node_id not in self.lost]
        if not left and not self.over:
            names = {slot.node_id: slot.node_name for slot in self.slots}
            which = "; ".join(f"{names[n]}: {w}" for n, w in self.lost.items())
            raise WorkerFailed(f"every Ray worker was lost with its node ({which}); finished shards are kept, rerun "
                               "the same command to resume on the nodes that answer")

    def check_ended(self, workers: list[int], done: set[int]) -> None:
        """`workers`, of one lost node, are gone and each of their messages read: the shards they
        had taken and not finished go back to the others, first in line; one warning."""
        workers = [i for i in workers if i not in done]
        back = self.ray.get(self.shards.put_back.remote(workers, sorted(self.results.finished)))
        self.gone.update(workers)
        node = self.slots[workers[0]].node_id if workers else None
        if node is None:
            return
        left = sum(slot.node_id not in self.lost for slot in self.slots)
        taken = (f"the shard(s) they had taken ({', '.join(shard_name(s) for s in back)}) are run by the other "
                 f"{left}" if back else f"they held no unfinished shard; the run goes on with the other {left}")
        log.warning("Ray node %s was lost mid-run (%s): its %d worker(s) are dropped, and %s",
                    self.slots[workers[0]].node_name, self.lost[node], len(workers), taken)

    def all_finished(self) -> None:
        self.over = True
        self.ray.get(self.shards.close.remote())

    def dropped(self) -> set[int]:
        return self.gone

    def join(self) -> None:
        self.ray.get([ref for ref, i in self.runs.items() if i not in self.gone])

    def stop(self, interrupted: bool) -> None:
        """Actors are not in our process group, so a Ctrl-C does not reach them: killed either
        way, and gone when the run returns. Their shards in progress stay in .partial/, which
        the next run clears."""
        for actor in self.actors:
            self.ray.kill(actor)
        if self.runs:
            self.ray.wait(list(self.runs), num_returns=len(self.runs), timeout=KILLED_WAIT_S)

    def close(self) -> None:
        """Free what the run holds on the cluster now, not when this process disconnects."""
        for actor in self.actors:
            self.ray.kill(actor)
        if self.shards is not None:
            self.ray.kill(self.shards)
        try:
            self.results.queue.shutdown(force=True)
        except self.ray.exceptions.RayError:  # already gone with its node
            pass


def _queue(ray: Any) -> Any:
    """A Ray queue on this process's own node. Ray would put it on any node (a worker node about
    half the time on a cluster of two): one node lost mid-run then took the queue, and with it
    every worker's feed, ending the run with Ray's RPC error instead of the lost worker's name. Here
    it goes only with the node the run goes with. It reserves no CPU: a cluster whose CPUs all go
    to workers still runs it."""
    from ray.util.queue import Queue

    return Queue(actor_options=_on_this_node(ray))


def _on_this_node(ray: Any) -> dict[str, Any]:
    """An actor's options for this process's node, reserving no CPU (_queue)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


class ShardHandout:
    """The run's shards, handed out one at a time to the workers that ask (`take`), an actor on
    the driver's node. It knows which worker took which, so that those of workers lost with their
    node go back to the others (`put_back`); and a worker that asks when none is left waits, since
    one may yet come back, until every shard is finished (`close`): then it takes None."""

    def __init__(self, shards: list[int]):
        self.waiting = collections.deque(shards)
        self.taken: dict[int, list[int]] = {}  # worker -> the shards it took
        self.gone: set[int] = set()  # workers dropped: a call of theirs still waiting takes nothing
        self.closed = False
        self.changed: asyncio.Condition | None = None  # made in the actor's event loop

    def _changed(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def take(self, worker: int) -> int | None:
        async with self._changed():
            await self._changed().wait_for(lambda: self.waiting or self.closed or worker in self.gone)
            if worker in self.gone or not self.waiting:
                return None
            shard = self.waiting.popleft()
            self.taken.setdefault(worker, []).append(shard)
            return shard

    async def put_back(self, workers: list[int], finished: list[int]) -> list[int]:
        """The shards `workers` took that are not `finished`, handed out first from now on."""
        done = set(finished)
        back = sorted(s for w in workers for s in self.taken.pop(w, []) if s not in done)
        async with self._changed():
            self.gone.update(workers)
            self.waiting.extendleft(reversed(back))
            self._changed().notify_all()
        return back

    async def close(self) -> None:
        async with self._changed():
            self.closed = True
            self._changed().notify_all()


class _Taken:
    """A Ray worker's shard ids, as serve_shards takes them (`get`), from the run's ShardHandout."""

    def __init__(self, worker: int, shards: Any):
        self.worker, self.shards = worker, shards

    def get(self) -> int | None:
        import ray

        return ray.get(self.shards.take.remote(self.worker))


class _Results:
    """The Ray queue the workers report to, read as drive() reads a process queue: a queue that
    died with its node is a failed run in one line, not Ray's traceback."""

    def __init__(self, queue: Any, ray: Any):
        self.queue, self.ray = queue, ray
        self.finished: set[int] = set()  # the shards whose "shard" message has been read

    def get(self, timeout: float) -> Any:
        try:
            msg = self.queue.get(timeout=timeout)
            if msg[0] == "shard":
                self.finished.add(msg[2]["shard"])
            return msg
        except queue.Empty:  # Ray's error for the actor's Empty is an Empty too: nothing came
            raise
        except self.ray.exceptions.RayError as exc:
            raise WorkerFailed(f"the Ray queue the workers report to is gone ({_plain(first_line(exc))}); finished "
                               "shards are kept, rerun the same command to resume") from None


def _last_line(exc: BaseException) -> str:
    """The line of a Ray task error that says what was raised (its last)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class FastlaionWorker:
    """One worker, in a process Ray started on some node of the cluster."""

    def check(self, version: str, cwd: str, out: str, rows: InputRows) -> list[str]:
        """Refuse to work where the output folder is not visible or fastlaion is not this
        version; work from the driver's folder where this node has it, so that relative paths
        (a checkpoint, a blocklist) mean what they meant there. Returns the GPUs Ray gave this
        worker."""
        import ray

        node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
        if version != __version__:
            raise ConfigError(f"node {node} has fastlaion {__version__}, the machine running the command has {version}: "
                              "install the same version on every node")
        if not (os.path.isdir(out) and all(os.path.isfile(p) for p in rows.parts)):
            raise ConfigError(f"output folder {out} is not visible on node {node}: on a cluster of several machines "
                              "it must be on a shared filesystem, mounted at the same path on every node")
        if os.path.isdir(cwd):
            os.chdir(cwd)
        return [str(gpu) for gpu in ray.get_gpu_ids()]

    def run(self, worker: int, cfg: RunConfig, out: str, rows: InputRows, shards: Any, results: Any,
            log_level: int = logging.WARNING) -> None:
        serve_shards(worker, cfg, Path(out), rows, _Taken(worker, shards), results, log_level)
