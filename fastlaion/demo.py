"""`fastlaion demo`: the whole pipeline on a built-in sample, with nothing from the user.

A loopback server (127.0.0.1 only) serves real photographs that scikit-image ships, generated
images in JPEG, PNG and WebP, and the usual failures of the web: dead links, a server error, a
refused connection, an HTML page where an image should be, a truncated JPEG, a too-small image,
a GIF and an invalid URL. The URL list is written beside the output and run like any input.
"""

from __future__ import annotations

import io
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

from .config import ConfigError, DecodeConfig, InputConfig, RunConfig, ScoreConfig, no_file_above
from .server import LoopbackServer, Served

DEMO_INPUT = "demo_urls.parquet"

# (scikit-image loader, caption): photographs shipped inside the package, no download needed.
PHOTOS = [
    ("chelsea", "a tabby cat lying down, looking at the camera"),
    ("coffee", "a cup of coffee on a saucer"),
    ("astronaut", "portrait of an astronaut in a spacesuit in front of a flag"),
    ("rocket", "a rocket on the launch pad"),
    ("hubble_deep_field", "the Hubble deep field: galaxies in space"),
    ("immunohistochemistry", "microscope image of stained tissue"),
    ("colorwheel", "a colour wheel"),
    ("camera", "black and white photo of a cameraman with a tripod"),
    ("moon", "the surface of the moon, close up"),
    ("clock", "a clock on a wall"),
    ("coins", "old coins on a table"),
    ("page", "a scanned page of printed text"),
    ("brick", "a brick wall texture"),
    ("grass", "grass texture"),
    ("gravel", "gravel texture"),
]
SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"),
          ("purple", "square"), ("orange", "triangle"), ("white", "circle"), ("black", "square")]


def _jpeg(arr: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def _shape_image(color: str, shape: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    # A textured background so that the files are realistic in size (> 5000 bytes).
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, 128)], -1).astype(np.float32)
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=color)
    return img


def _refused_url() -> str:
    """A loopback port with nothing listening: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing-listens-here.jpg"


def build_sample() -> tuple[dict[str, Served], list[tuple[str | None, str]]]:
    """Files to serve, and (path or absolute URL, caption) rows for the URL list."""
    import skimage.data

    files: dict[str, Served] = {}
    rows: list[tuple[str | None, str]] = []
    for name, caption in PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except (OSError, ValueError, ImportError, AttributeError):  # a data file this version lacks
            continue
        if arr.dtype != np.uint8:
            arr = (arr * 255).astype(np.uint8) if arr.max() <= 1 else arr.astype(np.uint8)
        files[f"photos/{name}.jpg"] = Served(_jpeg(arr), "image/jpeg")
        rows.append((f"photos/{name}.jpg", caption))
    formats = [("JPEG", "jpg", "image/jpeg"), ("PNG", "png", "image/png"), ("WEBP", "webp", "image/webp")]
    for i, (color, shape) in enumerate(SHAPES):
        fmt, ext, ctype = formats[i % 3]
        size = [(640, 480), (480, 640), (800, 800), (1280, 720)][i % 4]
        path = f"generated/{color}-{shape}.{ext}"
        files[path] = Served(_encode(_shape_image(color, shape, size, i), fmt), ctype)
        rows.append((path, f"a {color} {shape} on a gradient background"))
    big = _shape_image("red", "circle", (2048, 1536), 99)
    files["generated/large.jpg"] = Served(_encode(big, "JPEG"), "image/jpeg")
    rows.append(("generated/large.jpg", "a large picture of a red circle"))

    # What the web does to a crawler:
    files["broken/page.jpg"] = Served(b"<html><body>Sorry, this image moved.</body></html>" * 200, "image/jpeg")
    rows.append(("broken/page.jpg", "an html page served where an image should be"))
    whole = files["photos/chelsea.jpg"].body if "photos/chelsea.jpg" in files else _encode(big, "JPEG")
    files["broken/truncated.jpg"] = Served(whole[: len(whole) * 6 // 10], "image/jpeg")
    rows.append(("broken/truncated.jpg", "a truncated download of a cat photo"))
    files["broken/tiny.png"] = Served(_encode(Image.new("RGB", (16, 16), "white"), "PNG"), "image/png")
    rows.append(("broken/tiny.png", "a tiny white icon, far under 5000 bytes"))
    gif = io.BytesIO()
    _shape_image("blue", "circle", (320, 240), 7).save(gif, "GIF")
    files["broken/animation.gif"] = Served(gif.getvalue(), "image/gif")
    rows.append(("broken/animation.gif", "a gif, which LAION does not keep"))
    files["broken/empty.jpg"] = Served(b"", "image/jpeg")
    rows.append(("broken/empty.jpg", "an empty response body"))
    rows += [
        ("missing/photo.jpg", "a dead link (404)"),
        ("status/500", "a server error (500)"),
        (_refused_url(), "a host that refuses the connection"),
        ("ftp://example.invalid/photo.jpg", "not an http URL"),
        (None, "a row without a URL"),
        ("photos/coffee.jpg", ""),  # no caption: cannot be scored
    ]
    return files, rows


def run_demo(output: Path, model: str, pretrained: str, min_similarity: float | None,
             execute: Callable[[RunConfig], Any]) -> tuple[Any, list[str]]:
    """Serve the sample, run the pipeline into `output`, return (summary, notes for the user)."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output exists and is not a folder: {output}")
    no_file_above("--output", output)
    if output.exists() and any(output.iterdir()):
        if not (output / DEMO_INPUT).exists():
            raise ConfigError(f"{output} exists and does not hold an earlier demo; choose another --output")
        shutil.rmtree(output)  # the server's port changes each time, so a demo never resumes
    output.mkdir(parents=True, exist_ok=True)
    random_weights = pretrained.lower() in ("", "none", "random")
    notes = []
    if min_similarity is None:
        min_similarity = -1.0 if random_weights else 0.28
    if random_weights:
        notes.append(f"NOTE: {model} has random weights, so its similarity scores mean nothing"
                     + (" and no threshold was applied" if min_similarity <= -1 else "")
                     + ". For real scores: fastlaion demo --model ViT-B-32 --pretrained openai "
                       "(downloads the weights once).")
    files, rows = build_sample()
    with LoopbackServer(files) as server:
        urls = [u if u is None or "://" in u else server.url(u) for u, _ in rows]
        table = pl.DataFrame({"url": urls, "caption": [c for _, c in rows]},
                             schema={"url": pl.String, "caption": pl.String})
        table.write_parquet(output / DEMO_INPUT)
        cfg = RunConfig(
            output_dir=str(output),
            input=InputConfig(paths=(str(output / DEMO_INPUT),), shard_size=16),
            decode=DecodeConfig(image_size=256),
            score=ScoreConfig(model=model, pretrained=pretrained, min_similarity=min_similarity, batch_size=16),
        )
        cfg = _fast_failures(cfg)
        summary = execute(cfg)
    notes.append(f"the sample: {len(rows)} URLs ({len(PHOTOS)} photographs, {len(SHAPES) + 1} generated images, "
                 "the rest broken on purpose), served from 127.0.0.1")
    return summary, notes


def _fast_failures(cfg: RunConfig) -> RunConfig:
    """Loopback answers in milliseconds: a short timeout and retry backoff keep the demo quick;
    the sample is served from 127.0.0.1, which the private-network guard refuses by default."""
    import dataclasses

    return dataclasses.replace(cfg, download=dataclasses.replace(cfg.download, timeout_s=5.0, backoff_s=0.05,
                                                                 allow_private_networks=True))
