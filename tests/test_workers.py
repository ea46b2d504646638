"""Several worker processes (--processes / --gpus): same output as one worker, clear failures."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fastlaion.cli import app
from fastlaion.gpu_decode import dali_importable, nvimgcodec_importable
from fastlaion.server import LoopbackServer, Served

from test_pipeline import build_case, read_output, tiny_checkpoint, write_input

runner = CliRunner()

# Everything a shard's Parquet says about a row, except what depends on timing.
TIMING_COLUMNS = ("download_s", "attempts")


def _run(inp: Path, out: Path, ckpt: Path, *extra: str):
    threshold = [] if "--no-score" in extra else ["--min-similarity", "0.0"]  # refused with --no-score
    return runner.invoke(app, ["run", str(inp), "-o", str(out), "--allow-private-networks", "--model", "fastlaion-tiny", "--pretrained", str(ckpt),
                               *threshold, "--shard-size", "4", "--timeout", "3", "--retries", "0",
                               "--no-progress", *extra])


def _tar_members(out: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".json"):  # key.json carries the similarity: compare it as numbers below
                    meta = json.loads(data)
                    meta.pop("similarity", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                members[m.name] = data
    return members


@pytest.fixture(scope="module")
def served(tmp_path_factory, photos):
    """The usual case of every outcome (test_pipeline.build_case) served for the module: its input
    file and the tiny model's checkpoint."""
    tmp = tmp_path_factory.mktemp("served")
    files, rows = build_case(photos)
    with LoopbackServer(files) as server:
        yield write_input(tmp, server, rows), tiny_checkpoint(tmp)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, served):
    tmp = tmp_path_factory.mktemp("workers")
    inp, ckpt = served
    one = _run(inp, tmp / "one", ckpt)
    two = _run(inp, tmp / "two", ckpt, "--processes", "2")
    return one, two, tmp


def test_two_cpu_workers_write_what_one_writes(one_and_two):
    one, two, tmp = one_and_two
    assert one.exit_code == 0, one.output
    assert two.exit_code == 0, two.output
    a = read_output(tmp / "one").sort("key").drop(TIMING_COLUMNS)
    b = read_output(tmp / "two").sort("key").drop(TIMING_COLUMNS)
    assert a.height == b.height == 15
    assert a.drop("similarity").equals(b.drop("similarity"))
    # Similarities agree to the tolerance of the precision that scored them (a row may share its
    # CLIP batch with other rows, and the matrix products round differently for another batch's
    # shape): float32 to 1e-4; bfloat16 (auto on a CPU with AMX) keeps 8 significant bits, and
    # the same row's similarity moved by up to 5e-4 (the tiny model) and 1.6e-3 (ViT-B-32)
    # between batch splits (2026-11-28, with or without the fused MLPs: 4.6e-4 / 1.2e-3).
    scoring = {json.loads((tmp / name / "summary.json").read_text())["scoring"].popitem()[0] for name in ("one", "two")}
    assert len(scoring) == 1, scoring
    atol = 1e-4 if scoring.pop().startswith("fp32") else 2e-3
    np.testing.assert_allclose(a["similarity"].fill_null(np.nan).to_numpy(),
                               b["similarity"].fill_null(np.nan).to_numpy(), atol=atol, equal_nan=True)
    assert _tar_members(tmp / "one") == _tar_members(tmp / "two")
    for name in ("one", "two"):
        summary = json.loads((tmp / name / "summary.json").read_text())
        assert summary["funnel"]["input"] == 15
    assert len(json.loads((tmp / "two" / "summary.json").read_text())["workers"]) == 2
    # the shared input file of the workers is gone once they finish
    assert not (tmp / "two" / ".partial").exists()


def test_embeddings_match_across_worker_counts(one_and_two):
    _, _, tmp = one_and_two
    for a in sorted((tmp / "one").glob("*_img_emb.npy")):
        x, y = np.load(a), np.load(tmp / "two" / a.name)
        assert x.shape == y.shape
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3, equal_nan=True)


def test_worker_config_error_is_one_line(tmp_path, photos):
    files, rows = build_case(photos)
    with LoopbackServer(files) as server:
        inp = write_input(tmp_path, server, rows)
        notes = tmp_path / "notes.txt"  # a file, so the parent lets it through: the workers load it
        notes.write_text("hello world\n")
        result = runner.invoke(app, ["run", str(inp), "-o", str(tmp_path / "o"), "--model", "fastlaion-tiny",
                                     "--pretrained", str(notes), "--processes", "2",
                                     "--shard-size", "8", "--no-progress"])  # 2 shards: 2 workers
    assert result.exit_code == 2, result.output
    assert f"--pretrained {notes}: not a PyTorch checkpoint" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("flag, value, message", [
    ("--gpus", "zero", "--gpus must be 'all' or a number"),
    ("--processes", "-1", "--processes"),
    ("--workers-per-gpu", "0", "--workers-per-gpu"),
    ("--workers-per-gpu", "2", "--workers-per-gpu needs --gpus"),
    ("--decoder", "gpu", "--decoder 'gpu'"),
    ("--stored-encoder", "gpu", "--stored-encoder 'gpu': pick one of host, nvimgcodec"),
    # counts no machine has: a MemoryError traceback (--processes), each worker failing on torch's
    # int (--decode-threads with --processes 2)
    ("--processes", str(10**12), "--processes must be between 0 and 65536, got 1000000000000"),
    ("--workers-per-gpu", str(10**12), "--workers-per-gpu must be between 1 and 65536, got 1000000000000"),
    ("--decode-threads", str(10**12), "--decode-threads must be between 0 and 4096, got 1000000000000"),
])
def test_bad_parallel_flags_are_named(tmp_path, flag, value, message):
    inp = tmp_path / "in.txt"
    inp.write_text("http://127.0.0.1:9/x.jpg\n")
    result = runner.invoke(app, ["run", str(inp), "-o", str(tmp_path / "o"), "--no-score", flag, value, "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_no_more_cpu_workers_start_than_shards_to_run(tmp_path, photos):
    """--processes 3 on a one-shard input started 3 worker processes, each loading its models, 2 to
    find no shard (--processes 64 ran out of memory before they did). One shard runs in this
    process, as with --processes 1; two shards take two workers."""
    from helpers import encode

    files = {f"{i}.jpg": Served(encode(photos["chelsea"]), "image/jpeg") for i in range(4)}
    with LoopbackServer(files) as server:
        inp = tmp_path / "in.txt"
        inp.write_text("".join(server.url(f"{i}.jpg") + "\n" for i in range(4)))
        for shard_size, workers in ((4, ["auto"]), (2, ["auto", "auto"])):
            out = tmp_path / f"o{shard_size}"
            result = runner.invoke(app, ["run", str(inp), "-o", str(out), "--no-score", "--no-language",
                                         "--processes", "3", "--shard-size", str(shard_size), "--no-progress",
                                         "--allow-private-networks"])
            assert result.exit_code == 0, result.output
            summary = json.loads((out / "summary.json").read_text())
            assert summary["workers"] == workers and summary["funnel"]["kept"] == 4


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_processes_count_the_cores_this_process_may_use_and_more_than_those_is_one_warning(tmp_path, photos):
    """A run allowed one core (taskset, a cgroup's cpuset, Slurm): --processes 0 (one per core)
    started one worker per core of the machine (os.cpu_count), and --processes 3 started three
    without a word. Now 0 is one per usable core, and 3 on one core still start (oversubscribing
    can be deliberate) with one warning line naming both counts and --workers."""
    import subprocess
    import sys

    from helpers import encode

    one_core = min(os.sched_getaffinity(0))
    files = {f"{i}.jpg": Served(encode(photos["chelsea"]), "image/jpeg") for i in range(4)}
    with LoopbackServer(files) as server:
        inp = tmp_path / "in.txt"
        inp.write_text("".join(server.url(f"{i}.jpg") + "\n" for i in range(4)))
        for processes, shard_size, workers in (("0", 2, 1), ("3", 1, 3)):
            out = tmp_path / f"o{processes}"
            result = subprocess.run(
                [sys.executable, "-m", "fastlaion", "run", str(inp), "-o", str(out), "--no-score", "--no-language",
                 "--processes", processes, "--shard-size", str(shard_size), "--no-progress",
                 "--allow-private-networks"],
                capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
            assert result.returncode == 0, result.stderr
            summary = json.loads((out / "summary.json").read_text())
            assert len(summary["workers"]) == workers and summary["funnel"]["kept"] == 4, summary["workers"]
            warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
            if workers == 1:
                assert warnings == [], result.stderr
            else:
                assert warnings == ["warning: --processes 3: 3 worker processes on 1 core: each loads its own models, "
                                    "and past one a core they add memory, not speed; for more downloads at once "
                                    "raise --workers"], result.stderr


def test_gpus_without_a_gpu_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    inp = tmp_path / "in.txt"
    inp.write_text("http://127.0.0.1:9/x.jpg\n")
    result = runner.invoke(app, ["run", str(inp), "-o", str(tmp_path / "o"), "--no-score", "--gpus", "all",
                                 "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU is visible" in result.output
    assert not (tmp_path / "o").exists()  # told before the output folder is made


def test_next_shard_starts_during_the_download_tail_of_the_current_one(tmp_path, photos):
    """Shard 0 ends with a URL that answers after 2 s; shard 1's downloads must start before
    that answer (one worker, no GPU): the decode and score stages never sit idle on a tail."""
    import asyncio
    import time

    from aiohttp import web

    from helpers import encode

    seen: dict[str, float] = {}
    jpeg = encode(photos["chelsea"])

    async def image(request: web.Request) -> web.Response:
        seen.setdefault(request.match_info["name"], time.monotonic())
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2.0)
        seen["slow answered"] = time.monotonic()
        return web.Response(status=404)

    routes = [web.get("/img/{name}", image), web.get("/slow/{name}", slow)]
    with LoopbackServer(extra_routes=routes) as server:
        urls = [server.url("img/a0"), server.url("img/b0"), server.url("slow/0"),
                server.url("img/a1"), server.url("img/b1"), server.url("img/c1")]
        inp = tmp_path / "in.txt"
        inp.write_text("\n".join(urls) + "\n")
        result = runner.invoke(app, ["run", str(inp), "-o", str(tmp_path / "o"), "--no-score", "--shard-size", "3",
                                     "--allow-private-networks", "--retries", "0", "--timeout", "10",
                                     "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "slow answered" in seen
    assert seen["a1"] < seen["slow answered"], seen
    frame = read_output(tmp_path / "o")
    assert frame.height == 6
    assert (frame["status"] == "kept").sum() == 5


def test_workers_per_gpu_puts_that_many_workers_on_each_gpu(monkeypatch):
    """--gpus all --workers-per-gpu 3 on a (stand-in) two-GPU box: three workers per device."""
    import torch

    from fastlaion.config import ParallelConfig, RunConfig
    from fastlaion.pipeline import worker_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # no GPU here: the count is all it reads
    cfg = RunConfig(output_dir="unused", parallel=ParallelConfig(gpus="all", workers_per_gpu=3))
    assert worker_devices(cfg) == ["cuda:0"] * 3 + ["cuda:1"] * 3
    one = RunConfig(output_dir="unused", parallel=ParallelConfig(gpus="1"))
    assert worker_devices(one) == ["cuda:0"]


def test_each_worker_gets_its_share_of_the_cores_for_every_pool(monkeypatch):
    """Four workers on one GPU of a 16-core box: each decodes, runs its GPU decoder's threads
    and encodes stored images on 4 threads (cfg.decode.threads, which the GPU decoders read),
    not on all 16; an explicit --decode-threads is kept."""
    import dataclasses

    from fastlaion.config import DecodeConfig, RunConfig
    from fastlaion.workers import worker_configs

    monkeypatch.setattr("fastlaion.workers.usable_cores", lambda: 16)
    cfg = RunConfig(output_dir="unused")
    got = worker_configs(cfg, ["cuda:0"] * 4)
    assert [(w.score.device, w.decode.threads) for w in got] == [("cuda:0", 4)] * 4
    assert cfg.decode.threads == 0  # the run's own settings (config.json) are untouched
    fixed = dataclasses.replace(cfg, decode=DecodeConfig(threads=3))
    assert {w.decode.threads for w in worker_configs(fixed, ["cpu", "cpu"])} == {3}
    assert worker_configs(cfg, ["cpu"] * 32)[0].decode.threads == 1


def test_workers_share_the_per_host_limits():
    """--per-host and --per-host-rate hold for the run, not for each worker: every worker keeps
    its own gates, so three workers at --per-host 16 sent up to 48 requests at once to one host.
    Each gets its share (at least one request in flight, or a host could never be reached)."""
    import dataclasses

    from fastlaion.config import RunConfig
    from fastlaion.workers import worker_configs

    cfg = RunConfig(output_dir="unused")
    cfg = dataclasses.replace(cfg, download=dataclasses.replace(cfg.download, per_host=16, per_host_rate=6.0))
    got = worker_configs(cfg, ["cpu"] * 3)
    assert [(w.download.per_host, w.download.per_host_rate) for w in got] == [(5, 2.0)] * 3
    assert sum(w.download.per_host for w in got) <= 16 and cfg.download.per_host == 16  # config.json's: the run's
    assert [w.download.per_host for w in worker_configs(cfg, ["cpu"] * 32)] == [1] * 32
    assert worker_configs(cfg, ["cpu"])[0].download == cfg.download


def test_a_batch_decoder_with_batches_in_flight_keeps_every_row(tmp_path, served):
    """The GPU decoders' way through the pipeline (nvjpeg's CPU mode, here): pending bodies
    decoded a batch at a time, two batches in flight on two threads (batch size 2, so a shard has
    several). Every row ends as the CPU decoder's run ends it; only pixel-derived values differ."""
    inp, ckpt = served
    # every decoded row kept: pixels differ a little between decoders, so similarities do too
    keep = ("--batch-size", "2", "--device", "cpu", "--min-similarity", "-1")
    cpu = _run(inp, tmp_path / "cpu", ckpt, *keep)
    batched = _run(inp, tmp_path / "batched", ckpt, *keep, "--decoder", "nvjpeg")
    assert cpu.exit_code == 0, cpu.output
    assert batched.exit_code == 0, batched.output
    same = ["key", "url", "status", "reason", "format", "original_width", "original_height", "width", "height"]
    a, b = (read_output(tmp_path / name).sort("key") for name in ("cpu", "batched"))
    assert a.height == b.height == 15
    assert a.select(same).equals(b.select(same))
    assert (a["status"] == "kept").sum() >= 5 and (a["status"] != "kept").sum() >= 3
    assert set(_tar_members(tmp_path / "cpu")) == set(_tar_members(tmp_path / "batched"))


@pytest.mark.skipif(not nvimgcodec_importable(), reason="NVIDIA nvImageCodec is not installed")
def test_stored_encoder_nvimgcodec_in_a_run_and_a_resume_with_the_host_encoder(tmp_path, served):
    """--stored-encoder nvimgcodec through a whole run (nvjpeg's CPU mode, nvImageCodec's CPU back
    end here): the same rows and outcomes as the host encoder, stored JPEGs of the same sizes; the
    encoder is not part of the run's resume key, so the folder resumes with the other one; the CPU
    decoder says the flag does not apply to it."""
    inp, ckpt = served
    keep = ("--device", "cpu", "--min-similarity", "-1", "--decoder", "nvjpeg")
    host = _run(inp, tmp_path / "host", ckpt, *keep)
    gpu_encoded = _run(inp, tmp_path / "nvimg", ckpt, *keep, "--stored-encoder", "nvimgcodec")
    again = _run(inp, tmp_path / "nvimg", ckpt, *keep, "--stored-encoder", "host")
    cpu = _run(inp, tmp_path / "cpu", ckpt, "--device", "cpu", "--stored-encoder", "nvimgcodec")
    for result in (host, gpu_encoded, again, cpu):
        assert result.exit_code == 0, result.output
    assert "4 of 4 shards already complete" in again.output  # resumed, not refused for other settings
    same = ["key", "url", "status", "reason", "width", "height"]
    a, b = (read_output(tmp_path / name).sort("key") for name in ("host", "nvimg"))
    assert a.select(same).equals(b.select(same))
    host_tars, nvimg_tars = _tar_members(tmp_path / "host"), _tar_members(tmp_path / "nvimg")
    assert set(host_tars) == set(nvimg_tars)
    images = [name for name in host_tars if name.endswith(".jpg")]
    assert len(images) >= 5
    assert any(host_tars[n] != nvimg_tars[n] for n in images)  # another encoder made them
    for name in images:
        assert Image.open(io.BytesIO(nvimg_tars[name])).size == Image.open(io.BytesIO(host_tars[name])).size
    assert "--stored-encoder nvimgcodec applies to the GPU decoders" in " ".join(cpu.output.split())


@pytest.mark.skipif(not dali_importable(), reason="NVIDIA DALI is not installed")
def test_dalis_fast_chroma_and_hardware_decoder_settings_reach_its_decoder(tmp_path, served):
    """--fast-chroma and --hw-decoder-load through a whole run with DALI (its CPU mode here, where
    neither changes a pixel: both are the mixed back end's): the decoder the run makes gets them,
    the run keeps the same rows and outcomes, neither setting is part of the resume key, the CPU
    decoder says they do not apply to it, and a load outside 0-1 is one line."""
    import torch

    from fastlaion.config import DecodeConfig, RunConfig, ScoreConfig
    from fastlaion.pipeline import Models, make_run_decoder

    cfg = RunConfig(str(tmp_path / "unused"), decode=DecodeConfig(decoder="dali", exact_chroma=False, hw_decoder_load=1.0),
                    score=ScoreConfig(enabled=False, device="cpu"))
    made = make_run_decoder(cfg, Models(device=torch.device("cpu")))
    assert (made.name, made.exact_chroma, made.hw_decoder_load) == ("dali", False, 1.0)
    inp, ckpt = served
    keep = ("--device", "cpu", "--min-similarity", "-1", "--decoder", "dali")
    exact = _run(inp, tmp_path / "exact", ckpt, *keep)
    fast = _run(inp, tmp_path / "fast", ckpt, *keep, "--fast-chroma", "--hw-decoder-load", "1")
    again = _run(inp, tmp_path / "fast", ckpt, *keep)
    cpu = _run(inp, tmp_path / "cpu", ckpt, "--device", "cpu", "--fast-chroma")
    bad = _run(inp, tmp_path / "bad", ckpt, *keep, "--hw-decoder-load", "1.5")
    for result in (exact, fast, again, cpu):
        assert result.exit_code == 0, result.output
    assert "4 of 4 shards already complete" in again.output
    same = ["key", "url", "status", "reason", "width", "height"]
    a, b = (read_output(tmp_path / name).sort("key") for name in ("exact", "fast"))
    assert a.select(same).equals(b.select(same))
    assert set(_tar_members(tmp_path / "exact")) == set(_tar_members(tmp_path / "fast"))
    assert "DALI's settings: the cpu decoder ignores them" in " ".join(cpu.output.split())
    assert bad.exit_code == 2 and "--hw-decoder-load must be between 0 and 1" in bad.output


def test_stored_encoder_nvimgcodec_missing_is_an_error_not_a_cpu_decode(tmp_path, monkeypatch):
    """Asked for by name, a missing nvImageCodec stops the run with its one line; it does not send
    the GPU decoder's work to the CPU decoder."""
    import fastlaion.gpu_decode as gpu_decode
    from fastlaion.config import ConfigError

    def missing():
        raise ConfigError("the nvimgcodec stored-image encoder needs NVIDIA nvImageCodec: pip install it")

    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", missing)
    inp = tmp_path / "in.txt"
    inp.write_text("http://127.0.0.1:9/x.jpg\n")
    result = runner.invoke(app, ["run", str(inp), "-o", str(tmp_path / "o"), "--no-score", "--no-language",
                                 "--decoder", "nvjpeg", "--device", "cpu", "--stored-encoder", "nvimgcodec",
                                 "--no-progress", "--allow-private-networks"])
    assert result.exit_code == 2, result.output
    assert "needs NVIDIA nvImageCodec" in result.output and "Traceback" not in result.output



@pytest.mark.parametrize("decoder", ["nvjpeg", "dali"])
def test_a_gpu_decoder_asked_for_without_a_gpu_is_an_error_not_a_cpu_decode(tmp_path, monkeypatch, decoder):
    """--decoder nvjpeg|dali with --device auto where no GPU is (faked here, for a GPU machine):
    one line and exit 2, as --device cuda is; not its CPU mode in silence. --device cpu asks for
    the CPU mode (tests, CI) and gets it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inp = tmp_path / "in.txt"
    inp.write_text("http://127.0.0.1:9/x.jpg\n")
    args = ["run", str(inp), "--no-score", "--no-language", "--decoder", decoder, "--no-progress", "--retries", "0"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert f"--decoder {decoder}: no CUDA GPU is available here" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # told before the output folder is made (and any model loads)
    if decoder == "nvjpeg" or dali_importable():
        on_cpu = runner.invoke(app, [*args, "-o", str(tmp_path / "cpu"), "--device", "cpu"])
        assert on_cpu.exit_code == 0, on_cpu.output


def test_workers_that_ended_with_their_done_still_queued_are_not_taken_for_dead(monkeypatch):
    """A killed worker is seen at once, also while the others keep the run busy (it was noticed
    only once their messages had been quiet). Two real worker processes put 500 messages each,
    then "done", and exit (their pipes hold them all) well before this process has read them:
    checked by their exit alone, they would be taken for dead (a finished run failed). Their end
    counts only once every message they sent has been read."""
    from helpers import report_as_a_worker

    import fastlaion.workers as workers
    from fastlaion.workers import LIVENESS_CHECK_S, _Processes, drive

    # read a little at a time: their ends come while most of what they sent is still unread, and
    # messages come in parts
    monkeypatch.setattr(workers, "_READ_BYTES", 64)

    class Reporters(_Processes):  # the real pool, whose workers only report
        def start(self, todo):
            for i in range(len(self.devices)):
                self.spawn(i, report_as_a_worker, 500)
            for proc in self.procs:  # both have ended, every message still in the queue
                proc.join(30)
                assert proc.exitcode == 0

    class Rows:
        rows = 0

        def rows_done(self, rows, kept, busy_s=None):
            Rows.rows += rows
            time.sleep(LIVENESS_CHECK_S / 200)  # reading them outlasts several checks

    import time

    drive(Reporters(None, None, None, ["cpu", "cpu"]), [], Rows())
    assert Rows.rows == 1000


@pytest.mark.parametrize("sig, group, processes", [
    ("SIGINT", False, 2),  # kill -INT PID: a process manager's way, not the terminal's
    ("SIGTERM", True, 2),  # Slurm, systemd, timeout: every process of the group, the workers too
    ("SIGTERM", False, 1),  # kill PID, docker stop, Kubernetes: the parent alone (here the whole run)
])
def test_sigint_or_sigterm_stops_the_run_and_its_workers_at_once(tmp_path, photos, sig, group, processes):
    """A SIGINT to the parent alone: the workers never got it and went on downloading until the
    parent's grace period ran out (8 s here, up to STOP_GRACE_S); now the parent passes it on.
    SIGTERM killed the parent at once, without a word, leaving OUT/.lock, the run's input rows
    under .partial/ and, with workers, the workers and their shards in progress. Now either stops
    the run as a Ctrl-C does: one line naming the signal, exit 128 + its number, in far less time
    than the rest of the run, the finished shards kept, no lock; the rerun finishes every row."""
    import signal
    import sys

    from helpers import encode, stop_midway

    from fastlaion.server import Served
    from fastlaion.writer import PARTIAL_DIR

    n = 40
    # a small image, dropped at once (under LAION's 5,000 bytes): shards end and begin fast, and
    # each stop lands between them too
    small = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    files = {f"{i}.jpg": Served(small, "image/jpeg") for i in range(n)}
    with LoopbackServer(files, delay_s=1.0) as server:
        inp = tmp_path / "in.txt"
        inp.write_text("".join(server.url(f"{i}.jpg") + "\n" for i in range(n)))
        out = tmp_path / "o"
        args = ["run", str(inp), "-o", str(out), "--no-score", "--no-language", "--shard-size", "4", "--workers", "2",
                "--allow-private-networks", "--retries", "0", "--no-progress"]
        # a shard is done: the workers are downloading
        stopped = stop_midway([sys.executable, "-m", "fastlaion", *args, "--processes", str(processes)],
                              lambda _: bool(list(out.glob("*_stats.json"))), getattr(signal, sig), group)
        assert stopped.returncode == 128 + getattr(signal, sig), stopped.stderr
        how = "interrupted" if sig == "SIGINT" else "terminated (SIGTERM)"
        done = len(list(out.glob("*_stats.json")))
        assert stopped.stderr.strip().splitlines() == [f"{how}: {done} of {n // 4} shards {'is' if done == 1 else 'are'} "
                                                       "finished and kept; rerun the same command to resume"]
        assert stopped.took_s < 4.0, stopped.took_s  # the rest of the run takes about 8 s: it did not go on
        assert 1 <= done < n // 4
        assert not (out / ".lock").exists()
        assert not (out / PARTIAL_DIR).exists()  # the shards in progress aborted, the run's copy of the rows gone
        if sig == "SIGINT":
            return
        server.delay_s = 0.0
        rerun = runner.invoke(app, [*args, "--processes", "1"])  # in this process: a fresh one costs seconds
    assert rerun.exit_code == 0, rerun.output
    frame = read_output(out)
    assert frame["url"].to_list() == [server.url(f"{i}.jpg") for i in range(n)]  # each row once, in order
    assert frame["reason"].to_list() == ["too_few_bytes"] * n
    assert not (out / PARTIAL_DIR).exists()


def test_ctrl_c_while_the_workers_start_is_one_line_and_the_rerun_finishes(tmp_path, photos):
    """The terminal's SIGINT reaches every process of the group, the workers too while Python is
    still starting them (multiprocessing's bootstrap printed a traceback each); then a rerun of
    the same command finishes every row."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import children, encode

    from fastlaion.server import Served

    files = {f"{i}.jpg": Served(encode(photos["chelsea"]), "image/jpeg") for i in range(12)}
    with LoopbackServer(files, delay_s=0.1) as server:
        inp = tmp_path / "in.txt"
        inp.write_text("".join(server.url(f"{i}.jpg") + "\n" for i in range(12)))
        cmd = [sys.executable, "-m", "fastlaion", "run", str(inp), "-o", str(tmp_path / "o"), "--no-score",
               "--no-language", "--processes", "2", "--shard-size", "3", "--allow-private-networks",
               "--retries", "0", "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not any("spawn_main" in c for c in children(proc.pid).values()):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.005)
            time.sleep(0.05)  # a worker exists and is still starting Python
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 130, (out, err)
        assert "Traceback" not in err.decode() + out.decode(), err.decode()
        done = len(list((tmp_path / "o").glob("*_stats.json")))  # of 12 rows in shards of 3
        assert err.decode().strip().splitlines() == [f"interrupted: {done} of 4 shards {'is' if done == 1 else 'are'} "
                                                     "finished and kept; rerun the same command to resume"]
        rerun = subprocess.run(cmd, capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    frame = read_output(tmp_path / "o")
    assert sorted(frame["url"].to_list()) == sorted(server.url(f"{i}.jpg") for i in range(12))
    assert (frame["status"] == "kept").all()


def test_a_worker_killed_in_the_middle_of_a_message_neither_hangs_the_run_nor_blocks_the_others(tmp_path,
                                                                                                   monkeypatch):
    """The OOM killer's SIGKILL lands while a worker is sending a message longer than a pipe
    holds (a shard's stats can be). The workers shared one queue, so one pipe and one lock: the
    parent read the first part and waited for the rest for ever (the other workers kept the pipe
    open), and every other worker waited for ever for the lock the dead one held. Now each worker
    has a pipe of its own: the others' messages go through meanwhile, the cut message is dropped,
    and the run stops at once with the one line naming the killed worker."""
    import os
    import signal
    import threading
    import time

    from helpers import _wait_for, one_killed_mid_message

    import fastlaion.workers as workers
    from fastlaion.config import RunConfig, WorkerFailed
    from fastlaion.workers import drive

    monkeypatch.setattr(workers, "_worker_main", one_killed_mid_message)  # spawned by reference: the helper runs
    pool = workers._Processes(RunConfig(output_dir=str(tmp_path)), tmp_path, None, ["cpu", "cpu"])
    seen: dict[str, object] = {}

    class Busy:
        """The parent's progress: busy with the first message while worker 0 is killed."""

        def rows_done(self, rows, kept, busy_s=None):
            if "killed" in seen:
                return
            (tmp_path / "parent-busy").touch()
            _wait_for(tmp_path / "sending", 20)
            os.kill(pool.procs[0].pid, signal.SIGKILL)
            seen["killed"] = time.monotonic()
            (tmp_path / "killed").touch()
            _wait_for(tmp_path / "flushed", 5)  # while this process reads nothing
            seen["flushed"] = (tmp_path / "flushed").exists()

    def run():
        try:
            drive(pool, [], Busy())
        except BaseException as exc:
            seen["raised"] = exc
        seen["returned"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        thread.join(30)
        assert not thread.is_alive(), f"the run hung after the kill (worker 1 flushed: {seen.get('flushed')})"
    finally:
        for proc in pool.procs:
            if proc.is_alive():
                proc.kill()
    assert seen["flushed"], "worker 1's messages waited on the killed worker"
    assert isinstance(seen["raised"], WorkerFailed), seen["raised"]
    assert str(seen["raised"]) == ("worker 0 (cpu) was killed by signal 9 before finishing; finished shards are kept, "
                                   "rerun the same command to resume")
    assert seen["returned"] - seen["killed"] < 8.0  # 5 of them waiting for worker 1 on the old pool


def test_a_worker_killed_while_it_asks_for_a_shard_keeps_no_other_from_its_own(tmp_path, monkeypatch):
    """The workers took their shards from one queue, each read under one lock that a worker
    holds while it waits in its read: killed then (the OOM killer's SIGKILL), it never let go, and
    every other worker waited for ever for its next shard. Now each worker asks this process for
    its next one on pipes of its own: the other one gets its answer."""
    import os
    import queue
    import signal
    import time

    from helpers import one_killed_asking_for_a_shard

    import fastlaion.workers as workers
    from fastlaion.config import RunConfig

    monkeypatch.setattr(workers, "_worker_main", one_killed_asking_for_a_shard)  # spawned by reference
    pool = workers._Processes(RunConfig(output_dir=str(tmp_path)), tmp_path, None, ["cpu", "cpu"])
    try:
        pool.start([])
        deadline = time.monotonic() + 30
        while not (tmp_path / "got").exists() and time.monotonic() < deadline:
            if (tmp_path / "asking").exists() and not (tmp_path / "killed").exists():
                time.sleep(0.3)  # worker 0 is in its second ask
                os.kill(pool.procs[0].pid, signal.SIGKILL)
                (tmp_path / "killed").touch()
                deadline = time.monotonic() + 5
            try:
                pool.results.get(timeout=0.05)  # this process reads (and answers) meanwhile
            except queue.Empty:
                pass
        assert (tmp_path / "killed").exists()
        assert (tmp_path / "got").exists(), "worker 1 waited for its shard behind the killed worker"
        assert (tmp_path / "got").read_text() == "None"
    finally:
        pool.stop(interrupted=False)
        pool.close()


# Pillow's warning on the palette PNGs of tests/helpers.palette_png, in our form: one line, the
# package that raised it, no file, line or source line
PALETTE_WARNING = ("warning: Palette images with Transparency expressed in bytes should be converted to RGBA "
                   "images (UserWarning in PIL)")
RANDOM_WEIGHTS_WARNING = "warning: fastlaion-tiny has RANDOM weights: similarity scores mean nothing"


def run_palette_pngs(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m fastlaion run` (its own process: stderr as a user's pipe gets it) of one-row
    shards of palette PNGs, each of which makes Pillow warn (helpers.palette_png), held by the
    server until every worker of a --processes 2 run has taken one (helpers.answered_together)."""
    from fastlaion.pipeline import MAX_SHARDS_IN_FLIGHT
    from helpers import answered_together, palette_png

    count = MAX_SHARDS_IN_FLIGHT + 1
    bodies = {f"{i}.png": palette_png(i) for i in range(count)}
    with LoopbackServer({}, extra_routes=[answered_together(count, bodies, "image/png")]) as server:
        inp = tmp_path / "in.tsv"
        inp.write_text("url\tcaption\n" + "".join(f"{server.url('together/' + name)}\ta cat\n" for name in bodies))
        result = subprocess.run(
            [sys.executable, "-m", "fastlaion", "run", str(inp), "-o", str(tmp_path / "o"), "--model", "fastlaion-tiny",
             "--pretrained", "none", "--no-language", "--shard-size", "1", "--timeout", "90", "--no-progress",
             "--allow-private-networks", *extra],
            capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["funnel"]["decoded"] == count, summary["funnel"]  # a warning drops nothing
    return result


@pytest.mark.parametrize("processes", ["2", "1"])
def test_workers_warnings_come_once_in_our_format(tmp_path, processes):
    """Spawned workers had no log handler: open_clip's `logging.warning` on random weights gave
    each the root's default one, so a 2-process run printed "WARNING:root:No pretrained weights
    loaded ..." and "WARNING:fastlaion.score:fastlaion-tiny has RANDOM weights ..." once per
    worker. Now their records reach the parent, which prints ours as the main process does,
    once, and hides open_clip's chatter (ours says it). Python's warnings likewise: Pillow's on a
    palette PNG came out raw, once per worker ("/.../PIL/Image.py:1134: UserWarning: Palette
    images ..." and its source line "  warnings.warn("), and so in one process; now one line of
    ours, whichever worker and however many give it."""
    result = run_palette_pngs(tmp_path, "--processes", processes)
    assert len(json.loads((tmp_path / "o" / "summary.json").read_text())["workers"]) == int(processes)
    assert sorted(result.stderr.splitlines()) == [PALETTE_WARNING, RANDOM_WEIGHTS_WARNING], result.stderr


def test_forwarded_log_records_keep_level_tracebacks_and_come_once(caplog):
    """What a worker logs at the parent's level (-v: INFO) reaches the parent's handlers as a
    record of the same logger, level and message, a traceback as its text; the same message from
    a second worker is dropped; below the level nothing is sent."""
    import logging
    import pickle

    from fastlaion.workers import forwarded_logs, relay_log

    class Sent(list):
        def put(self, msg):
            self.append(pickle.loads(pickle.dumps(msg)))  # as it crosses the pipe

    sent = Sent()
    root = logging.getLogger()
    before = root.handlers[:]
    for worker in (0, 1):
        with forwarded_logs(worker, sent, logging.INFO):
            logging.getLogger("fastlaion.score").info("scoring on %s", "cpu")
            logging.getLogger("fastlaion.score").debug("not sent")
            try:
                raise ValueError("bad batch")
            except ValueError:
                logging.getLogger("fastlaion.pipeline").exception("shard %d failed", worker)
        assert root.handlers == before  # put back
    assert [(m[0], m[1], m[2]["msg"]) for m in sent] == [
        ("log", 0, "scoring on cpu"), ("log", 0, "shard 0 failed"),
        ("log", 1, "scoring on cpu"), ("log", 1, "shard 1 failed")]
    logged: set = set()
    with caplog.at_level(logging.INFO):
        for msg in sent:
            relay_log(msg[2], logged)
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("fastlaion.score", "INFO", "scoring on cpu"), ("fastlaion.pipeline", "ERROR", "shard 0 failed"),
        ("fastlaion.pipeline", "ERROR", "shard 1 failed")]
    assert "ValueError: bad batch" in caplog.records[1].exc_text
    assert "ValueError: bad batch" in caplog.text


def test_a_workers_python_warnings_pass_its_filters_first():
    """Only how a warning is shown changes in a worker (forwarded_logs): the filters still decide
    which are. Python's defaults hide a DeprecationWarning and show a UserWarning once per place
    in a process; decode's turbojpeg filter still makes libjpeg's warnings errors; -W error
    raises. Warnings shown before and after the block are Python's again."""
    import logging
    import warnings

    from fastlaion.decode import ensure_turbojpeg_warnings_raise
    from fastlaion.workers import forwarded_logs

    sent: list = []

    class Results:
        def put(self, msg):
            sent.append(msg)

    def warn_twice() -> None:
        for _ in range(2):
            warnings.warn("the same place", UserWarning)

    previous = warnings.showwarning
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        ensure_turbojpeg_warnings_raise()
        with forwarded_logs(0, Results(), logging.WARNING):
            warnings.warn("deprecated", DeprecationWarning)
            warn_twice()
            with pytest.raises(UserWarning):
                warnings.warn_explicit("Premature end of JPEG file", UserWarning, "turbojpeg.py", 1,
                                       module="turbojpeg")
            warnings.filterwarnings("error", message="an error")
            with pytest.raises(UserWarning):
                warnings.warn("an error", UserWarning)
        assert warnings.showwarning is previous
    assert [(m[0], m[2]["name"], m[2]["msg"]) for m in sent] == [
        ("log", "py.warnings", "the same place (UserWarning in test_workers)")], sent  # no package: the module


def test_a_dropped_workers_rows_of_shards_run_again_are_taken_out_of_the_bar(tmp_path, served, monkeypatch):
    """A worker dropped with its lost Ray node (RayWorkers.check_ended) had reported rows of the
    shards it had taken; those go back to the others, which report them again as they run them,
    and the bar's row, kept and per-stage counts took both: it read more rows than the input has
    (the summary, read from the files, was right). Now drive takes a dropped worker's
    rows of its unfinished shards back out of the bar once it learns it was dropped, and keeps
    those of the shards it finished. Played by a pool whose messages are those of two workers, the
    second lost mid-run, each "rows" message as a worker sends it (_QueueProgress); then a real run
    shows the pipeline tags each report with its shard, which drive needs for this."""
    import queue

    from rich.console import Console

    from fastlaion.cli_progress import BarProgress
    from fastlaion.pipeline import _Tally
    from fastlaion.workers import WorkerPool, _QueueProgress, drive

    class Played(list):
        def put(self, msg):
            self.append(msg)

        def get(self, timeout):
            if not self:
                raise queue.Empty
            return self.pop(0)

    msgs = Played()
    a, b = _QueueProgress(0, msgs), _QueueProgress(1, msgs)

    def shard(worker, s):
        msgs.put(("shard", worker, {"shard": s, "timings_s": {"download": 1.0}}))

    msgs += [("ready", 0, 0.1), ("ready", 1, 0.1)]
    b.rows_done(2, 2, {"download": 1.0}, shard=2)
    shard(1, 2)  # worker 1 finished shard 2: its rows stay counted
    b.rows_done(2, 1, {"download": 3.0}, shard=1)  # and had begun shard 1, never finished
    a.rows_done(2, 2, {"download": 1.0}, shard=0)
    shard(0, 0)
    msgs.put(("ended", None, [1]))  # worker 1's node lost: its shard 1 goes to worker 0
    b.rows_done(1, 1, {"download": 1.0}, shard=3)  # late, after its drop: not counted
    a.rows_done(2, 0, {"download": 1.0}, shard=1)
    shard(0, 1)
    msgs.put(("done", 0))

    class Pool(WorkerPool):
        devices = ["ray:a:cpu", "ray:b:cpu"]
        results = msgs
        gone: set[int] = set()

        def start(self, todo): ...
        def check_alive(self, done): ...
        def check_ended(self, workers, done):
            self.gone.update(w for w in workers if w not in done)
        def dropped(self):
            return self.gone
        def join(self): ...
        def stop(self, interrupted): ...
        def close(self): ...

    bar = BarProgress(Console(file=io.StringIO()), enabled=False)
    bar.start(3, 0, 6, 0)
    drive(Pool(), [0, 1, 2], _Tally(bar))
    assert (bar.rows, bar.kept) == (6, 4)  # shards 0, 1 and 2 once each: shard 1's first 2 rows were counted too
    assert bar.stage_rows == {"download": 6} and bar.stage_busy == {"download": 3.0}

    # the pipeline reports each batch's rows with its shard (a worker's _QueueProgress sends it on)
    reported: dict[int, int] = {}

    def rows_done(self, rows, kept, busy_s=None, shard=None):
        reported[shard] = reported.get(shard, 0) + rows

    monkeypatch.setattr(_Tally, "rows_done", rows_done)
    inp, ckpt = served
    result = _run(inp, tmp_path / "o", ckpt, "--no-score")
    assert result.exit_code == 0, result.output
    assert reported == {0: 4, 1: 4, 2: 4, 3: 3}  # 15 rows, 4 a shard
