"""Shared by the test_dataset_* files: a real fastlaion run on loopback, the dataset commands as a
typer app, and plain-Python readers that compute expected values without fastlaion.dataset."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl
from helpers import encode
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
