"""Shared by the test_dataset_* files: a real fastlaion run on loopback, the dataset commands as a
typer app, and plain-Python readers that compute expected values without fastlaion.dataset."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl
from helpers import encode, invoke_cli
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

def app():
    from fastlaion import cli

    return cli.app


def command_line() -> list[str]:
    """The commands as a user runs them."""
    return [sys.executable, "-m", "fastlaion"]


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command_line() + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"}, cwd=REPO)


def run_cli_here(args: list[str]) -> subprocess.CompletedProcess:
    """run_cli's command, told as run_cli tells it, in this process (helpers.invoke_cli): for what a
    command says and writes, where a fresh interpreter adds only its start-up (torch's and
    open_clip's imports, 5-10 s on 2 cores, for the commands that embed or compare)."""
    return invoke_cli([str(a) for a in args], env={"COLUMNS": "200"})


# --- the real run ----------------------------------------------------------------------------------

def _variant(arr: np.ndarray) -> bytes:
    """The same picture, resized by 90 % and re-encoded: another file, a near-identical image."""
    img = Image.fromarray(arr)
    img = img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.Resampling.BICUBIC)
    return encode(np.asarray(img), "JPEG", quality=75)


def build_case(photos: dict[str, np.ndarray]):
    """(files to serve, rows: (path, caption)) with duplicates of every kind on purpose."""
    import skimage.data

    from fastlaion.server import Served

    more = {"camera": skimage.data.camera(), "coins": skimage.data.coins(), "moon": skimage.data.moon()}
    jpeg = {n: encode(a, "JPEG") for n, a in {**photos, **more}.items()}
    files = {f"{n}.jpg": Served(b, "image/jpeg") for n, b in jpeg.items()}
    files["chelsea-copy.jpg"] = Served(jpeg["chelsea"], "image/jpeg")          # same bytes, other URL
    files["coffee-small.jpg"] = Served(_variant(photos["coffee"]), "image/jpeg")  # near-duplicate image
    rows = [
        ("chelsea.jpg", "a tabby cat lying down"),
        ("coffee.jpg", "a cup of coffee on a saucer"),
        ("astronaut.jpg", "portrait of an astronaut in front of a flag"),
        ("missing.jpg", "a dead link"),
        ("chelsea.jpg", "a tabby cat lying down"),                 # same url + caption
        ("chelsea.jpg", "eine Katze liegt auf dem Boden"),         # same url, other caption (German)
        ("chelsea-copy.jpg", "a cat photo copied to another site"),  # same image bytes
        ("rocket.jpg", "a rocket on the launch pad"),
        ("camera.jpg", "un homme avec une caméra et un trépied dans le parc"),
        ("coffee-small.jpg", "coffee, smaller and recompressed"),  # near duplicate of coffee
        ("gone.jpg", "another dead link"),
        ("coins.jpg", "old coins"),
        ("moon.jpg", "the surface of the moon, close up"),
        ("rocket.jpg", "xyz"),                                     # same url, short caption (nolang)
    ]
    return files, rows


@lru_cache(maxsize=None)
def real_run(base: str) -> Path:
    """Run `fastlaion run` once (tiny random CLIP, language on) into base/run; returns the folder."""
    import skimage.data
    from typer.testing import CliRunner

    from fastlaion.cli import app as main_app
    from fastlaion.server import LoopbackServer

    photos = {n: getattr(skimage.data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket")}
    files, rows = build_case(photos)
    out = Path(base) / "run"
    Path(base).mkdir(parents=True, exist_ok=True)
    with LoopbackServer(files) as server:
        inp = Path(base) / "input.parquet"
        pl.DataFrame({"url": [server.url(p) for p, _ in rows], "caption": [c for _, c in rows]}).write_parquet(inp)
        result = CliRunner().invoke(main_app, ["run", str(inp), "-o", str(out), "--model", "fastlaion-tiny",
                                               "--pretrained", "none", "--min-similarity", "-1", "--shard-size", "5",
                                               "--timeout", "3", "--retries", "0", "--no-progress",
                                               "--allow-private-networks"])
    assert result.exit_code == 0, result.output
    return out


# --- independent readers -----------------------------------------------------------------------------

def read_rows(folder: Path) -> list[dict]:
    """Every row of a run folder's shard Parquet files, in key order, as dicts (pyarrow, not polars)."""
    import pyarrow.parquet as pq

    rows = []
    for p in sorted(folder.glob("[0-9]*.parquet")):
        for rec in pq.read_table(p).to_pylist():
            rec["shard"] = p.stem
            rows.append(rec)
    return rows


def tar_images(folder: Path) -> dict[str, bytes]:
    """key -> stored image bytes, from every tar of a run."""
    out = {}
    for p in sorted(folder.glob("[0-9]*.tar")):
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if ext in ("jpg", "png", "webp"):
                    out[key] = tar.extractfile(m).read()
    return out


def greedy_reference(keys: list[str], same) -> dict[str, str]:
    """Plain O(n^2) greedy dedup: each key, in order, is a duplicate of the first earlier kept key
    for which same(a, b) holds. Returns {duplicate: original}."""
    kept: list[str] = []
    dup: dict[str, str] = {}
    for k in keys:
        original = next((a for a in kept if same(a, k)), None)
        if original is None:
            kept.append(k)
        else:
            dup[k] = original
    return dup


def reference_phash(data: bytes) -> int:
    """pHash as the imagehash library computes it (scipy's DCT), written out here independently."""
    from scipy.fftpack import dct

    img = Image.open(io.BytesIO(data)).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(img, dtype=np.float64)
    low = dct(dct(pixels, axis=0), axis=1)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def load_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())


# --- a real Ctrl-C at each step of a command that writes an output -----------------------------------

def ctrl_c() -> None:
    """SIGINT to this process, as the terminal sends it; its handler runs in the sleep (Python's
    raises KeyboardInterrupt there), or is held for later."""
    import signal
    import time

    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)


def ctrl_c_after(fn):
    """`fn`, then a Ctrl-C."""
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        ctrl_c()
        return out
    return wrapped


def ctrl_c_while_writing(write_text, suffix: str):
    """Path.write_text, but a file whose name holds `suffix` gets half the text, then a Ctrl-C
    comes (what a Ctrl-C while a big file is written does)."""
    def wrapped(self, data, *args, **kwargs):
        if suffix not in self.name:
            return write_text(self, data, *args, **kwargs)
        with open(self, "w", encoding="utf-8") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            ctrl_c()
            f.write(data[len(data) // 2:])
        return len(data)
    return wrapped


def check_commit_undone(stderr: str, failed: str, folder: Path, before: dict[str, bytes] | None, what: str) -> None:
    """After a disk error that the commit undid: the one line says so (its earlier `what` as it
    was, or nothing written), and the disk agrees: `folder` byte for byte as `before` (its files'
    names and bytes), or gone where there was no earlier `what` (before is None)."""
    if before is not None:
        assert stderr == f"{failed}; its earlier {what} is as it was; rerun the command\n"
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # byte for byte, nothing else
    else:
        assert stderr == f"{failed}; nothing was written; rerun the command\n"
        assert not folder.exists()


def check_ctrl_c_of_an_output(monkeypatch, invoke, earlier: list, new: list, out: Path, what: str) -> None:
    """`invoke(args, code)` runs a command (a CliRunner's result back) that writes the output folder
    `out` (fastlaion.dataset.output.OutputDir; `earlier` and `new` are its arguments but -o; `what`:
    "the subset was", as the message says it). A real Ctrl-C at each step of `new` over the output
    of `earlier`: while the new files are written aside, the earlier output stays as it was, byte
    for byte, and the command says nothing was replaced;
    between the renames that put them in place (which stopped there, the earlier files removed and
    some new ones not moved, and said nothing was replaced), just after (said nothing was replaced),
    and while the closing line prints (exit 130 and not a word), the new output is whole in place,
    and the command says so. Exit status 130 every time."""
    from fastlaion import cli_dataset
    from fastlaion.dataset import output

    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def described(folder: Path) -> tuple:  # the output as a result: its rows and record, not the timing
        info = {k: v for k, v in load_json(folder / "dataset.json").items() if k != "seconds"}
        return sorted(p.name for p in folder.iterdir()), pl.read_parquet(folder / "metadata.parquet"), info

    invoke([*new, "-o", out], 0)
    names, rows, info = described(out)
    real_replace = os.replace
    moved: list[str] = []

    def replace(src, dst, *args, **kwargs):  # a Ctrl-C once the first new file is in place
        real_replace(src, dst, *args, **kwargs)
        if Path(src).parent.name == output.PARTIAL_DIR and not moved:
            moved.append(str(dst))
            ctrl_c()

    nothing = "interrupted: nothing was replaced; rerun the command"
    written = f"interrupted: {what} written, whole, to {out}"
    for target, name, wrap, says in ((output.OutputDir, "finish", ctrl_c_after, nothing),
                                     (output.os, "replace", lambda _: replace, written),
                                     (output.OutputDir, "commit", ctrl_c_after, written),
                                     (cli_dataset, "_say", ctrl_c_after, written)):
        invoke([*earlier, "-o", out], 0)
        before = files()
        assert not described(out)[1].equals(rows), name  # another output
        with monkeypatch.context() as m:
            m.setattr(target, name, wrap(getattr(target, name)))
            result = invoke([*new, "-o", out], 130)
        assert result.stderr.strip() == says, (name, result.stderr)
        assert not (out / output.PARTIAL_DIR).exists(), name
        if says == nothing:
            assert files() == before, name
        else:
            now = described(out)
            assert now[0] == names and now[1].equals(rows) and now[2] == info, name
    assert moved, "no Ctrl-C between the renames"


# --- a command held while it holds its output folder's lock, in another process ---------------------

_HELD = """
import sys, time
from pathlib import Path

ready, go, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if what == "run-lock":  # a fastlaion run's lock on the folder (pipeline.prepare_output's), held until go
    from fastlaion.pipeline import output_lock

    with output_lock(Path(sys.argv[4])):
        ready.write_text("held")
        while not go.exists():
            time.sleep(0.05)
    sys.exit(0)
from fastlaion.dataset import output

real = output.Staging.commit

def commit(self):  # every new file written under .partial/, the lock held: waits for go
    ready.write_text("held")
    while not go.exists():
        time.sleep(0.05)
    real(self)

output.Staging.commit = commit
sys.argv = ["fastlaion", *sys.argv[4:]]
from fastlaion.__main__ import main

main()
"""


@contextmanager
def held(args: list, tmp_path: Path, what: str = "commit") -> Iterator[subprocess.Popen]:
    """`fastlaion ARGS` in another process, held just before its commit (its new files all written
    under .partial/, its output folder locked) until the block ends, when it goes on and is waited
    for (`what` "run-lock": ARGS is a folder, whose lock a fastlaion run's output_lock holds). The
    block gets the process; one that ended before it was held fails the test with its stderr."""
    import time

    ready, go = tmp_path / f"held-{len(list(tmp_path.iterdir()))}", tmp_path / "go"
    go.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HELD, str(ready), str(go), what, *(str(a) for a in args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "never held"
            time.sleep(0.05)
        yield proc
        go.touch()
        # its output read and its pipes closed: left open, they were collected later, inside
        # another file's test (test_download turns that ResourceWarning into an error); the text
        # is left on the process for the caller's messages
        proc.stdout, proc.stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if not isinstance(proc.stderr, str):
            proc.stdout, proc.stderr = proc.communicate()
