"""Faults a long run meets: the image server going away and coming back, the run killed by
SIGKILL (one process or several), a shard that cannot be written. Each is a real run of the
command on loopback, then the rerun that finishes the job with no row lost or written twice."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from aiohttp import web
from helpers import encode

from fastlaion.server import LoopbackServer, Served

FASTLAION = [sys.executable, "-m", "fastlaion"]


class RestartableServer(LoopbackServer):
    """A LoopbackServer that binds the port it had before, so a test can stop it and start it
    again at the same address (the URLs of the input stay valid)."""

    async def _start(self, ready):
        app = web.Application()
        app.router.add_get("/{path:.*}", self._file)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        ready.set()


def _photos_served(photos, n: int) -> dict[str, Served]:
    names = list(photos)
    return {f"{i}.jpg": Served(encode(photos[names[i % len(names)]][: 200 + 7 * i]), "image/jpeg") for i in range(n)}


def _write_input(path: Path, urls: list[str]) -> Path:
    pl.DataFrame({"url": urls, "caption": [f"photo {i}" for i in range(len(urls))]}).write_parquet(path)
    return path


def _cmd(inp: Path, out: Path, shard_size: int, *extra: str) -> list[str]:
    return FASTLAION + ["run", str(inp), "-o", str(out), "--shard-size", str(shard_size), "--no-score",
                        "--no-language", "--no-progress", "--allow-private-networks", "--timeout", "5", *extra]


def _wait_for_shards(out: Path, n: int, proc: subprocess.Popen, timeout_s: float = 90) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        done = len(list(out.glob("*_stats.json")))
        if done >= n:
            return done
        time.sleep(0.01)
    return len(list(out.glob("*_stats.json")))


def _mtimes(out: Path, shards) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for s in shards for p in out.glob(f"{s:05d}*")}


def _check_every_row_once(out: Path, urls: list[str]) -> pl.DataFrame:
    """Each input row once in the Parquet files, in order; each kept sample once in the tars."""
    table = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))])
    assert table["url"].to_list() == urls
    assert table["key"].n_unique() == len(urls)
    keys = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += [n.rsplit(".", 1)[0] for n in tf.getnames() if n.endswith(".jpg")]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(table.filter(pl.col("status") == "kept")["key"])
    assert not (out / ".partial").exists()
    return table


def test_server_outage_midway_fails_rows_transiently_and_retry_failed_fixes_them(tmp_path, photos):
    n_rows, shard_size = 60, 5
    server = RestartableServer(_photos_served(photos, n_rows), delay_s=0.03).start()
    try:
        urls = [server.url(f"{i}.jpg") for i in range(n_rows)]
        inp = _write_input(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        # --retries 1: a row failing during the outage waits 0.5 s and tries once more, which
        # stretches the outage over a few shards
        cmd = _cmd(inp, out, shard_size, "--workers", "2", "--retries", "1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        before_outage = _wait_for_shards(out, 3, proc)
        server.close()  # the server dies: refused connections, dropped keep-alives
        # At most two shards are in flight (a shard's tail overlaps the next one): the third to
        # finish from now began during the outage, so all its rows failed.
        _wait_for_shards(out, before_outage + 3, proc)
        server.start()  # back, on the same port
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        table = _check_every_row_once(out, urls)
        failed = table.filter(pl.col("status") == "dropped")
        assert failed.height >= shard_size, "the outage should have failed a shard's worth of rows"
        assert set(failed["reason"]) == {"connection_error"}
        assert table.tail(shard_size)["status"].to_list() == ["kept"] * shard_size  # the server came back
        summary = json.loads((out / "summary.json").read_text())
        assert summary["transient"] == {"connection_error": failed.height}
        assert f"{failed.height} row(s) failed for transient reasons (connection_error {failed.height})" in stdout
        assert "rerun with --retry-failed" in stdout

        untouched = sorted({k // shard_size for k in range(n_rows)} - {int(k[:5]) for k in failed["key"]})
        mtimes = _mtimes(out, untouched)
        requests_before = dict(server.hits)
        retry = subprocess.run(cmd + ["--retry-failed"], capture_output=True, text=True, timeout=120, check=False)
        asked = {p: n - requests_before.get(p, 0) for p, n in server.hits.items() if n != requests_before.get(p, 0)}
    finally:
        server.close()
    assert retry.returncode == 0, retry.stderr
    # only the failed rows were downloaded again, each once
    assert asked == {"/" + u.split("/", 3)[3]: 1 for u in failed["url"]}
    table = _check_every_row_once(out, urls)
    assert table["status"].to_list() == ["kept"] * n_rows
    assert _mtimes(out, untouched) == mtimes  # shards without failures were not touched
    summary = json.loads((out / "summary.json").read_text())
    assert summary["transient"] == {} and summary["funnel"]["kept"] == n_rows
    assert summary["retried"]["rows"] == failed.height == summary["retried"]["kept"]
    assert f"retried: {failed.height} row(s)" in retry.stdout


def _children(pid: int) -> dict[int, str]:
    """Processes whose parent is `pid`, with their command lines."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status waits to be collected


def test_sigkill_of_the_parent_kills_its_workers_and_the_rerun_finishes(tmp_path, photos):
    n_rows, shard_size = 96, 6
    with LoopbackServer(_photos_served(photos, n_rows - 6), delay_s=0.06) as server:
        urls = [server.url(f"{i}.jpg") for i in range(n_rows)]  # the last 6 are 404s
        inp = _write_input(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        cmd = _cmd(inp, out, shard_size, "--workers", "2", "--retries", "0", "--processes", "2")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_shards(out, 4, proc)
        workers = {pid: c for pid, c in _children(proc.pid).items() if "spawn_main" in c}
        assert len(workers) == 2, _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers), "workers outlived their parent"
        done_before = sorted(int(p.name[:5]) for p in out.glob("*_stats.json"))
        assert 4 <= len(done_before) < n_rows // shard_size, "the kill should land midway"
        time.sleep(0.3)  # nothing may still be writing: the files stay as they are
        mtimes = _mtimes(out, done_before)
        assert sorted(int(p.name[:5]) for p in out.glob("*_stats.json")) == done_before
        server.delay_s = 0  # the delay let the kill land midway; the rerun needs none
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "already complete" in rerun.stderr + rerun.stdout
    assert _mtimes(out, done_before) == mtimes  # finished shards left untouched
    table = _check_every_row_once(out, urls)
    assert dict(table.group_by("status").len().iter_rows()) == {"kept": n_rows - 6, "dropped": 6}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_skipped"] == len(done_before)
    assert summary["shards_run"] == n_rows // shard_size - len(done_before)


def test_a_worker_killed_while_the_others_are_busy_stops_the_run_at_once_and_the_rerun_finishes(tmp_path, photos):
    """SIGKILL one of two busy workers (the OOM killer's way): the parent noticed only when their
    shared queue had been quiet for 0.5 s, which the other worker's progress never let it be, so
    the run went on with one worker through every other shard (about 7 s here) and only then
    said the worker was killed, its shard waiting for the rerun all that time. Now it says so at
    once, in one line; the rerun writes the killed worker's shard and the rest, every row once."""
    from helpers import children

    n_rows, shard_size = 144, 6
    server = LoopbackServer(_photos_served(photos, n_rows), delay_s=0.1).start()
    try:
        urls = [server.url(f"{i}.jpg") for i in range(n_rows)]
        inp = _write_input(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        cmd = _cmd(inp, out, shard_size, "--workers", "2", "--retries", "0", "--processes", "2")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert _wait_for_shards(out, 1, proc) >= 1
            workers = [pid for pid, c in children(proc.pid).items() if "spawn_main" in c]
            assert len(workers) == 2, children(proc.pid)
            os.kill(workers[0], signal.SIGKILL)
            killed = time.monotonic()
            _, err = proc.communicate(timeout=60)
            took = time.monotonic() - killed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 1, lines
        assert len(lines) == 1 and re.fullmatch(r"error: worker [01] \(auto\) was killed by signal 9 before finishing; "
                                                r"finished shards are kept, rerun the same command to resume",
                                                lines[0]), lines
        done = len(list(out.glob("*_stats.json")))
        assert took < 4.0 and done < n_rows // shard_size // 2, (took, done)  # not after the other's shards
        server.delay_s = 0.0
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    finally:
        server.close()
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {done} of {n_rows // shard_size} shards already complete" in rerun.stderr + rerun.stdout
    table = _check_every_row_once(out, urls)
    assert (table["status"] == "kept").all()


def _limit_file_size(max_bytes: int):
    def preexec() -> None:  # in the child only: every file it (and its workers) writes is capped
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return preexec


@pytest.mark.parametrize("processes", [1, 2])
def test_a_shard_that_cannot_be_written_fails_by_name_and_the_rerun_redoes_it(tmp_path, photos, processes):
    """A real write failure without root: RLIMIT_FSIZE caps every file the run writes, and one
    shard's tar outgrows the cap, so writing it fails with EFBIG ("File too large") as ENOSPC
    would with a full disk: the same OSError path through the writer."""
    rng = np.random.default_rng(0)
    big = encode(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8), quality=95)  # ~ 600 KB of noise
    files = _photos_served(photos, 15)
    files["6.jpg"] = files["7.jpg"] = Served(big, "image/jpeg")
    limit = 1_000_000
    assert 2 * len(big) > limit > 3 * max(len(f.body) for n, f in files.items() if n not in ("6.jpg", "7.jpg"))
    shard_size = 3
    with LoopbackServer(files) as server:
        urls = [server.url(f"{i}.jpg") for i in range(15)]
        inp = _write_input(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        # --resize-mode no: the tar holds the downloaded bytes, so shard 2 (rows 6-8) is the big one
        cmd = _cmd(inp, out, shard_size, "--resize-mode", "no", "--processes", str(processes), "--retries", "0")
        failed = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(limit),
                                env={**os.environ, "COLUMNS": "300"}, check=False)
        assert failed.returncode == 1, failed.stderr
        lines = [ln for ln in failed.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, failed.stderr
        assert "shard 00002 not written: File too large" in lines[0] and "rerun" in lines[0]
        assert "Traceback" not in failed.stderr + failed.stdout
        done_before = sorted(int(p.name[:5]) for p in out.glob("*_stats.json"))
        assert 2 not in done_before and not list(out.glob("00002*"))  # nothing of it was published
        summary = json.loads((out / "summary.json").read_text())
        assert summary["shards_failed"] == [{"shard": 2, "error": "File too large"}]
        mtimes = _mtimes(out, done_before)

        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert _mtimes(out, done_before) == mtimes
    table = _check_every_row_once(out, urls)
    assert table["status"].to_list() == ["kept"] * 15
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_redone"] == [2] and summary["shards_failed"] == []
    assert "redone: 1 shard(s) that the previous run could not write (00002)" in rerun.stdout


@pytest.mark.parametrize("processes", [1, 2])
def test_a_shard_whose_parquet_cannot_be_written_fails_by_name(tmp_path, processes):
    """The write that fails is the shard's Parquet (Polars reports it as a ComputeError, not an
    OSError): the same one line as for the tar, and the rerun redoes the shard. Every row is a
    refused connection, so the tars are empty (10,240 bytes) and shard 1's Parquet, its four
    captions of random text, outgrows the cap (20,000) that the input's rows (one file per input)
    and shard 0 stay under."""
    from helpers import refused_url

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    url = refused_url()
    inputs = []
    for i in range(8):
        caption = "".join(rng.choice(letters, 12_000 if i >= 4 else 10))
        inputs.append(tmp_path / f"in{i}.csv")
        pl.DataFrame({"url": [url], "caption": [caption]}).write_csv(inputs[-1])
    out = tmp_path / "out"
    cmd = _cmd(inputs[0], out, 4, "--processes", str(processes), "--max-caption-chars", "12000")
    cmd[4:4] = [str(p) for p in inputs[1:]]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(20_000),
                            env={**os.environ, "COLUMNS": "300"}, check=False)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr + failed.stdout, failed.stderr
    lines = [ln for ln in failed.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "shard 00001 not written: File too large" in lines[0], failed.stderr
    assert not list(out.glob("00001*"))
    assert json.loads((out / "summary.json").read_text())["shards_failed"] == [{"shard": 1, "error": "File too large"}]

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    _check_every_row_once(out, [url] * 8)
    assert "redone: 1 shard(s) that the previous run could not write (00001)" in rerun.stdout


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_input_rows_that_cannot_be_written_name_their_file(tmp_path, fmt):
    """The input's rows are written into the output folder first; a disk full there (here the
    file size cap) said only "File too large (os error 27)", naming no file and so no disk. Now
    the file, in one line, exit 1, and the folder the run made is gone."""
    from helpers import refused_url

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    frame = pl.DataFrame({"url": [refused_url()] * 20, "caption": ["".join(rng.choice(letters, 1900)) for _ in range(20)]})
    inp = tmp_path / f"in.{fmt}"
    frame.write_csv(inp) if fmt == "csv" else frame.write_parquet(inp)
    out = tmp_path / "out"
    failed = subprocess.run(_cmd(inp, out, 10), capture_output=True, text=True, timeout=120,
                            preexec_fn=_limit_file_size(20_000), env={**os.environ, "COLUMNS": "300"}, check=False)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.strip().splitlines() == [f"error: File too large: {out}/.partial/input/00000.arrow"], failed.stderr
    assert not out.exists()


def test_a_shard_killed_while_being_renamed_into_place_is_rolled_forward(tmp_path, photos):
    """SIGKILL between a shard's renames: its tar is in place, its Parquet and stats still under
    .partial/ (all written). The next run moves them into place instead of downloading again."""
    from typer.testing import CliRunner

    from fastlaion.cli import app

    with LoopbackServer(_photos_served(photos, 6)) as server:
        urls = [server.url(f"{i}.jpg") for i in range(6)]
        inp = _write_input(tmp_path / "in.parquet", urls)
        out = tmp_path / "out"
        args = _cmd(inp, out, 3, "--retries", "0")[3:]  # the same command, run in this process
        assert CliRunner().invoke(app, args).exit_code == 0
        published = {p.name: p.read_bytes() for p in out.glob("00001*")}
        partial = out / ".partial" / "00001"
        partial.mkdir(parents=True)
        for name in ("00001.parquet", "00001_stats.json"):  # the tar made it, these did not
            (out / name).rename(partial / name)
        requests = server.requests
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert server.requests == requests  # nothing downloaded again
    assert {p.name: p.read_bytes() for p in out.glob("00001*")} == published
    _check_every_row_once(out, urls)
    assert "nothing to do" in result.output


def test_a_shard_being_renamed_into_place_finishes_before_a_failure_cleans_up(tmp_path, photos, monkeypatch):
    """Shard 1 fails while shard 0's files are being renamed into place (on its own thread): the
    run waits for those renames before it removes .partial/. Cleaning up under them could leave a
    lone stats file there, which the next run would take for a finished shard (its rows lost)."""
    import errno
    import threading

    from typer.testing import CliRunner

    from fastlaion import writer as writer_mod
    from fastlaion.cli import app

    publish, abort = writer_mod.ShardWriter.publish, writer_mod.ShardWriter.abort
    renaming = threading.Event()
    events: list[str] = []

    def slow_or_failing_publish(self, table, stats):
        if self.shard == 1:  # fails once shard 0 is in the middle of its publish
            assert renaming.wait(30)
            raise OSError(errno.EFBIG, "File too large")
        renaming.set()
        time.sleep(0.5)
        publish(self, table, stats)
        events.append(f"published {self.shard}")

    def noted_abort(self):
        events.append(f"abort {self.shard}")
        abort(self)

    monkeypatch.setattr(writer_mod.ShardWriter, "publish", slow_or_failing_publish)
    monkeypatch.setattr(writer_mod.ShardWriter, "abort", noted_abort)
    with LoopbackServer(_photos_served(photos, 4)) as server:
        inp = _write_input(tmp_path / "in.parquet", [server.url(f"{i}.jpg") for i in range(4)])
        result = CliRunner().invoke(app, ["run", str(inp), "-o", str(tmp_path / "out"), "--no-score",
                                          "--shard-size", "2", "--no-progress", "--allow-private-networks"])
    assert result.exit_code == 1, result.output
    assert "shard 00001 not written: File too large" in result.output
    assert "published 0" in events  # shard 0 was renamed into place whole ...
    assert "abort 0" not in events or events.index("abort 0") > events.index("published 0")  # ... before any clean-up
    assert not (tmp_path / "out" / ".partial" / "00000").exists()
    assert (tmp_path / "out" / "00000_stats.json").exists() and (tmp_path / "out" / "00000.parquet").exists()


def test_a_run_interrupted_three_ways_then_resumed_equals_one_never_interrupted(tmp_path):
    """The short variant of bench/torture.py: 60 rows of photographs, bad bodies, 404s, 500s and
    slow answers, shards of 6, two worker processes, interrupted by SIGKILL of the parent, a
    Ctrl-C to its process group and SIGKILL of one worker, each once some shards are finished and
    each resumed by the same command, then run to its end. The output equals an uninterrupted
    run's row by row (url, caption, status, stage, reason, ...), tar member by tar member, funnel
    by funnel, with nothing left over; after each stop no process of the run is left, and each
    shard that reads as finished has its files whole."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import torture
    from helpers import gone, process_group

    files, slow, rows = torture.build_files(60, seed=5)
    with LoopbackServer(files, delay_s=0.05, extra_routes=[torture.slow_route(slow)]) as server:
        urls = [server.url(p) for p, _ in rows]
        inp = tmp_path / "in.parquet"
        pl.DataFrame({"url": urls, "caption": [c for _, c in rows]}).write_parquet(inp)
        ref, out = tmp_path / "ref", tmp_path / "out"
        done = subprocess.run(torture.run_cmd(inp, ref, False, 6), capture_output=True, text=True, timeout=120,
                              check=False)
        assert done.returncode == 0, done.stderr
        cmd = torture.run_cmd(inp, out, False, 6)
        for action in ("kill9-parent", "sigint-group", "kill9-worker"):
            with process_group(cmd) as proc:
                before = len(torture.finished(out)) if out.exists() else 0
                _wait_for_shards(out, before + 1, proc)  # each run finishes a shard more, then is stopped
                family = torture.descendants(proc.pid)
                workers = [p for p, c in family.items() if "spawn_main" in c and torture._parent(p) == proc.pid]
                {"kill9-parent": lambda: os.kill(proc.pid, signal.SIGKILL),
                 "sigint-group": lambda: os.killpg(proc.pid, signal.SIGINT),
                 "kill9-worker": lambda: os.kill(workers[0], signal.SIGKILL)}[action]()
                _, err = proc.communicate(timeout=60)
            assert gone(family, 15), f"{action}: processes of the run outlived it"
            stop = torture.Stop(action, 0.0, proc.returncode, err.decode(), before, len(torture.finished(out)))
            assert proc.returncode != 0, f"{action} landed after the run's end"
            assert torture.judge_stop(stop, out, 10) == []
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert final.returncode == 0, final.stderr
    assert torture.compare(ref, out, urls) == []


def test_a_disk_full_while_config_json_is_written_leaves_the_earlier_one_whole(tmp_path):
    """A resume that cannot write config.json (a disk full, here the file size cap below its
    2 KB) fails in one line naming the file, and the folder still resumes: config.json was
    written in place, so the failed write left it cut short and every later run refused the
    folder ("config.json is unreadable; remove it or choose another output folder")."""
    from helpers import refused_url

    inp = _write_input(tmp_path / "in.parquet", [refused_url()] * 3)
    out = tmp_path / "out"
    cmd = _cmd(inp, out, 2)
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    config = (out / "config.json").read_bytes()
    assert len(config) > 1500

    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(1500),
                            env={**os.environ, "COLUMNS": "300"}, check=False)
    assert failed.returncode == 1, failed.stderr
    assert [ln for ln in failed.stderr.splitlines() if ln.strip()] == [f"error: File too large: {out / 'config.json'}"]
    assert (out / "config.json").read_bytes() == config
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # nor a half-written copy beside it

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "nothing to do: all 2 shard(s) were already complete" in rerun.stdout
    assert pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))]).height == 3
