"""Test helpers: encode images the way the web serves them, craft bad inputs, stop a command."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def encode(arr: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    if fmt in ("JPEG", "WEBP"):
        kw.setdefault("quality", 90)
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF header claiming another size (a decompression-bomb stand-in)."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 7] = height.to_bytes(2, "big")
            data[i + 7:i + 9] = width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF marker")


def refused_url() -> str:
    """A loopback port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.jpg"


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live processes whose parent is `pid` (Linux /proc)."""
    found = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                pass
    return found


def gone(pids, timeout: float = 5.0) -> bool:
    """Whether every one of `pids` has exited (and been reaped) within `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Stopped:
    """How a command stopped by `stop_midway` ended."""

    returncode: int
    stdout: str
    stderr: str
    took_s: float  # from the signal to the exit


@contextmanager
def process_group(cmd: list[str]):
    """`cmd` started in a process group of its own (a test can signal the group, as a terminal
    does), stdout and stderr piped; the whole group is killed on exit if the command still runs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def wait_until(proc: subprocess.Popen, ready, timeout_s: float = 60.0, poll_s: float = 0.005) -> None:
    """Poll `ready()` until it is true; fail with the command's output if it exits first or
    `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(poll_s)


def stop_midway(cmd: list[str], started: Callable[[subprocess.Popen], bool], sig: int = signal.SIGINT,
                group: bool = True, timeout_s: float = 60) -> Stopped:
    """Run the command `cmd` in a session of its own; once `started(proc)` says its work has begun,
    send it `sig`: with `group`, to its whole process group, workers included (the terminal's
    Ctrl-C; Slurm's, systemd's and `timeout`'s SIGTERM), else to the command's process alone
    (`kill PID`, `docker stop`, Kubernetes). Waits for its end; if anything goes wrong, the group
    is killed."""
    with process_group(cmd) as proc:
        wait_until(proc, lambda: started(proc), timeout_s)
        (os.killpg if group else os.kill)(proc.pid, sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=timeout_s)
        return Stopped(proc.returncode, out.decode(), err.decode(), time.monotonic() - sent)


def report_rows_then_done(worker: int, messages: int, results) -> None:
    """A stand-in for a worker process's reporting (fastlaion.workers.serve_shards): `messages`
    "rows" messages, then "done", flushed before the process exits, as _worker_main does."""
    for _ in range(messages):
        results.put(("rows", worker, 1, 1, None))
    results.put(("done", worker))
    results.close()
    results.join_thread()


def report_as_a_worker(worker: int, messages: int, tasks, results) -> None:
    """`report_rows_then_done` in a worker process of fastlaion.workers._Processes.spawn."""
    report_rows_then_done(worker, messages, results)


def _wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def one_killed_mid_message(worker: int, cfg, out: str, rows, log_level, tasks, results) -> None:
    """A stand-in for a worker process (fastlaion.workers._worker_main, same arguments) that
    only reports. Worker 0 waits until the parent is busy with worker 1's first message, then
    sends one message of 8 MiB (far more than a pipe holds: its sending stops part way until the
    parent reads) and waits to be killed meanwhile. Worker 1, once worker 0 is killed, sends 100
    messages and "done", flushes them and says so (OUT/flushed) before it exits."""
    from fastlaion.interrupt import release_ctrl_c

    release_ctrl_c()  # started with the stop signals held, as every worker is
    folder = Path(out)
    if worker == 0:
        _wait_for(folder / "parent-busy")
        results.put(("rows", 0, 1, 1, {"big": "x" * (8 << 20)}))
        time.sleep(0.5)  # its bytes are being written, held up by the full pipe
        (folder / "sending").touch()
        time.sleep(60)
        return
    results.put(("rows", 1, 1, 1, None))
    _wait_for(folder / "killed")
    for _ in range(100):
        results.put(("rows", 1, 1, 1, None))
    results.put(("done", 1))
    results.close()
    results.join_thread()
    (folder / "flushed").touch()


def one_killed_asking_for_a_shard(worker: int, cfg, out: str, rows, log_level, tasks, results) -> None:
    """A stand-in for a worker process (fastlaion.workers._worker_main, same arguments) with no
    shards to run. Worker 0 takes its None, then asks again and waits to be killed (where the
    workers took their shards from one queue, it waited inside the queue's read, holding the
    lock every worker reads under). Worker 1, once worker 0 is killed, takes its own None and
    writes it to OUT/got."""
    from fastlaion.interrupt import release_ctrl_c

    release_ctrl_c()  # started with the stop signals held, as every worker is
    folder = Path(out)
    if worker == 0:
        tasks.get()
        (folder / "asking").touch()
        tasks.get()
        time.sleep(60)
        return
    _wait_for(folder / "killed")
    (folder / "got").write_text(repr(tasks.get()))
    results.put(("done", 1))
    results.close()
    results.join_thread()


# What a fresh interpreter does not print (Python's default warning filters, less DeprecationWarning
# raised in __main__, which no command is)
_SILENT_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def invoke_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`fastlaion ARGS` in this process (typer's CliRunner, fastlaion.cli.app), told as
    `subprocess.run(FASTLAION + args, capture_output=True, text=True)` tells it: for a test of
    what a command says and its exit status, where a fresh interpreter adds only the start-up
    (torch and open_clip's imports: 5-10 s a call on 2 cores). What the subprocess would print on
    stderr besides the command's lines is added to its stderr: the Python warnings raised while
    the command ran, as the default filters print them (each once; from the command's log set-up
    on they are its own "warning: ..." lines, fastlaion.logs), and an exception the command let
    out as its traceback (exit status 1). Not for what needs a process of its own: signals,
    the console script's start-up and exit (cli.main's), what a fresh interpreter imports."""
    import traceback
    import warnings

    from typer.testing import CliRunner

    from fastlaion.cli import app

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in _SILENT_BY_DEFAULT:
            warnings.filterwarnings("ignore", category=category)
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    stderr = result.stderr + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
                                     for w in caught)
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(["fastlaion", *map(str, args)], code, result.stdout, stderr)


def palette_png(seed: int, side_px: int = 256) -> bytes:
    """A palette PNG whose tRNS chunk gives each colour its alpha (transparency as bytes, as GIF
    conversions and image editors save them). Decoding it is a real run's way to a Python warning
    raised in a worker: the CLIP input's convert("RGB") makes Pillow warn "Palette images with
    Transparency expressed in bytes should be converted to RGBA images" (UserWarning)."""
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 4, (side_px, side_px), dtype=np.uint8), "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0])
    return encode(img, "PNG", transparency=bytes([0, 128, 255, 255]))


def answered_together(count: int, bodies: dict[str, bytes], content_type: str, timeout_s: float = 60.0):
    """An aiohttp route, /together/{name}, serving `bodies`: each request is held until `count`
    have arrived (or `timeout_s` passed). A worker holds at most pipeline.MAX_SHARDS_IN_FLIGHT
    one-row shards at once, so with `count` one more than that, the run's rows cannot all have
    been taken by the worker that loaded its models first: every worker downloads (and decodes)
    some."""
    import asyncio

    from aiohttp import web

    arrived: list[int] = [0]
    everyone: list[asyncio.Event] = []  # made in the server's own event loop

    async def handler(request: web.Request) -> web.Response:
        if not everyone:
            everyone.append(asyncio.Event())
        arrived[0] += 1
        if arrived[0] >= count:
            everyone[0].set()
        try:
            await asyncio.wait_for(everyone[0].wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        return web.Response(body=bodies[request.match_info["name"]], content_type=content_type)

    return web.get("/together/{name}", handler)


# -- Pillow's odd images ---------------------------------------------------------------------
#
# Pillow's source distribution holds about a thousand real odd images (truncated, CMYK, bad EXIF,
# ICC profiles, APNG, 16-bit, decompression bombs) under Tests/images. A fixed release, checked by
# its sha256, so that every machine tests the same files; fetched with pip from the package index
# (nothing else is reached) once, into the ignored .cache/ folder of the checkout, so `make test`
# on a fresh clone gets it by itself. FASTLAION_PILLOW_IMAGES=DIR uses an unpacked Tests/images.
PILLOW_CORPUS_VERSION = "13.0.0"
PILLOW_CORPUS_SHA256 = "cdcd1ba258178f7356d74170c9a81ba4eab6a5d55748bc402a5a2a6fe6be3510"
_INDEX_UNREACHABLE = ("from versions: none", "NewConnectionError", "Connection refused", "Network is unreachable",
                      "Temporary failure in name resolution", "Name or service not known", "ConnectTimeout")


def pillow_test_images() -> Path:
    """Pillow's Tests/images folder, fetched and unpacked on first use; pytest.skip naming the
    cause where the package index cannot be reached (any other failure fails the test)."""
    import hashlib
    import importlib.util
    import shutil
    import sys
    import tarfile
    import tempfile

    import pytest

    given = os.environ.get("FASTLAION_PILLOW_IMAGES")
    if given:
        return Path(given)
    cache = Path(__file__).resolve().parent.parent / ".cache" / f"pillow-{PILLOW_CORPUS_VERSION}-images"
    if (cache / "complete").exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:  # beside it: the rename below is atomic
        # pip prepares an sdist's metadata: with setuptools at hand in this environment that is 3 s,
        # in the isolated build environment pip would make otherwise, about 40 s.
        isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                               *isolation, "--retries", "1", "--timeout", "20", "-d", tmp,
                               f"pillow=={PILLOW_CORPUS_VERSION}"], capture_output=True, text=True)
        if done.returncode != 0:
            said = (done.stdout + done.stderr).strip()
            if any(sign in said for sign in _INDEX_UNREACHABLE):
                pytest.skip(f"Pillow's test images: the package index could not be reached to download "
                            f"pillow=={PILLOW_CORPUS_VERSION}'s sdist ({said.splitlines()[-1]})")
            raise RuntimeError(f"pip download pillow=={PILLOW_CORPUS_VERSION} failed:\n{said}")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != PILLOW_CORPUS_SHA256:
            raise RuntimeError(f"{sdist.name}: sha256 {digest}, expected {PILLOW_CORPUS_SHA256}")
        prefix = f"pillow-{PILLOW_CORPUS_VERSION}/Tests/images/"
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for m in members:
                m.name = m.name[len(prefix):]
            # the "data" filter (no links out, no devices) where this Python has it (3.10.12+)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(unpacked, members=members, **safe)
        (unpacked / "complete").write_text(f"{len(members)} files from {sdist.name}\n")
        if not (cache / "complete").exists():
            shutil.rmtree(cache, ignore_errors=True)  # an earlier try's, cut short
        try:
            unpacked.rename(cache)
        except OSError:  # another process (xdist) put it there first
            if not (cache / "complete").exists():
                raise
    return cache
