"""Samples in the run's webdataset tars: find images by key, copy samples into new tars.

A tar member's key is its name up to the first dot (webdataset's rule: `0000042.jpg`,
`0000042.txt` and `0000042.json` are one sample). Tars are read front to back, never seeked
into: that is what a tar allows, and reading a 1 GB shard sequentially is disk speed.
A missing or damaged tar costs its samples (counted and named in a warning), not the job, and
so does a row whose shard is null (a --shards subset's row with no sample in its tars).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..writer import WRITE_ID, new_write_id
from .source import Dataset, NoProgress, Progress

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext.lower()


def _members(path: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                yield tar, member


def by_shard(rows: pl.DataFrame) -> list[tuple[str | None, list[str], list[int]]]:
    """rows (key, shard) -> [(shard, keys, positions in rows)], shards in first-seen order (None:
    the rows with no shard, whose samples are nowhere)."""
    grouped = (rows.select("key", "shard").with_row_index("_pos")
               .group_by("shard", maintain_order=True).agg("key", "_pos"))
    return [(s, k, p) for s, k, p in grouped.iter_rows()]


def read_images(ds: Dataset, rows: pl.DataFrame, on_image: Callable[[int, bytes], None], progress: Progress,
                what: str, threads: int = 1) -> int:
    """Call `on_image(position, image bytes)` for each row (key, shard) whose image is in its tar,
    from `threads` threads (one tar each). Returns how many rows had no image to read."""
    groups = by_shard(rows)
    progress.start(what, len(groups))

    def one(group: tuple[str, list[str], list[int]]) -> int:
        shard, keys, positions = group
        wanted = dict(zip(keys, positions))
        if shard is None:  # in no tar: counted as missing
            progress.advance()
            return len(wanted)
        path = ds.tar_path(shard)
        if ds.is_damaged(path):  # said once by the command (Dataset.with_damage): read as missing
            progress.advance()
            return len(wanted)
        try:
            for tar, member in _members(path):
                key, ext = split_name(member.name)
                if ext in IMAGE_EXTS and key in wanted:
                    f = tar.extractfile(member)
                    if f is not None:
                        on_image(wanted.pop(key), f.read())
                        if not wanted:
                            break
        except FileNotFoundError:
            log.warning("%s: missing tar %s; its %d sample(s) were skipped", what, path, len(wanted))
        except (tarfile.TarError, OSError) as e:
            log.warning("%s: cannot read tar %s (%s); %d sample(s) skipped", what, path, e, len(wanted))
        progress.advance()
        return len(wanted)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        missing = sum(pool.map(one, groups))
    progress.stop()
    return missing


def thumbnails(ds: Dataset, rows: pl.DataFrame, progress: Progress | None = None,
               size_px: int = 160) -> dict[str, str]:
    """key -> `data:image/jpeg;base64,...` of a small JPEG, for the rows (key, shard) found;
    `progress` is advanced a tar at a time."""
    from PIL import Image

    keys = rows["key"].to_list()
    out: dict[str, str] = {}

    def on_image(pos: int, data: bytes) -> None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (size_px, size_px))
                thumb = img.convert("RGB")
                thumb.thumbnail((size_px, size_px))
                buf = io.BytesIO()
                thumb.save(buf, "JPEG", quality=80)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("thumbnail of %s: cannot decode (%s)", keys[pos], e)
            return
        out[keys[pos]] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    read_images(ds, rows, on_image, progress or NoProgress(), "thumbnails")
    return out


@dataclass
class ShardsWritten:
    tars: list[dict]          # {"tar", "samples", "first_key", "last_key"}
    samples: int
    missing: int              # selected rows whose sample was not in its tar
    positions: np.ndarray     # (samples,) int64: the row (in `rows`) of each sample written, tar by tar


def reshard(ds: Dataset, rows: pl.DataFrame, out_dir: Path, shard_size: int, progress: Progress) -> ShardsWritten:
    """Copy the samples of rows (key, shard), in row order, into out_dir/NNNNN.tar of
    `shard_size` samples each (every member of a sample: image, .txt, .json). A damaged source
    tar keeps what was copied before the damage; the rest of its samples count as missing."""
    groups = by_shard(rows)
    tars: list[dict] = []
    written: list[int] = []
    writer: tarfile.TarFile | None = None
    in_tar = 0
    total = missing = 0
    mtime = time.time()
    progress.start("reshard", len(groups))

    def rotate() -> tarfile.TarFile:
        nonlocal writer, in_tar
        if writer is not None:
            writer.close()
        name = f"{len(tars):05d}.tar"
        tars.append({"tar": name, "samples": 0, "first_key": None, "last_key": None})
        in_tar = 0
        return tarfile.open(out_dir / name, "w", format=tarfile.USTAR_FORMAT)

    try:
        for shard, keys, positions in groups:
            wanted = set(keys)
            if shard is None:  # in no tar
                missing += len(wanted)
                progress.advance()
                continue
            where = dict(zip(keys, positions))
            path = ds.tar_path(shard)
            if ds.is_damaged(path):  # said once by the command (Dataset.with_damage): read as missing
                missing += len(wanted)
                progress.advance()
                continue
            found = 0
            try:
                with tarfile.open(path, "r:") as tar:
                    # The run appends samples as their batches finish, not in key order: index the
                    # members first (headers only), then copy in row order.
                    members: dict[str, list[tarfile.TarInfo]] = {}
                    for member in tar.getmembers():
                        key, _ext = split_name(member.name)
                        if member.isfile() and key in wanted:
                            members.setdefault(key, []).append(member)
                    for key in keys:
                        parts = members.pop(key, None)
                        if not parts:
                            continue
                        # read the whole sample before writing any of it: a damaged source never
                        # leaves half a sample in the new tar
                        blobs = [(m.name.rsplit("/", 1)[-1], _read(tar, m)) for m in parts]
                        if writer is None or in_tar >= shard_size:
                            writer = rotate()
                        for name, data in blobs:
                            info = tarfile.TarInfo(name)
                            info.size, info.mtime, info.mode = len(data), mtime, 0o644
                            writer.addfile(info, io.BytesIO(data))
                        in_tar += 1
                        found += 1
                        written.append(where[key])
                        entry = tars[-1]
                        entry["samples"] += 1
                        entry["first_key"] = entry["first_key"] or key
                        entry["last_key"] = key
            except FileNotFoundError:
                log.warning("reshard: missing tar %s; its %d sample(s) were not exported", path, len(wanted))
            except (tarfile.TarError, OSError) as e:
                log.warning("reshard: cannot read tar %s (%s); %d sample(s) not exported", path, e,
                            len(wanted) - found)
            total += found
            missing += len(wanted) - found
            progress.advance()
    finally:
        if writer is not None:
            writer.close()
        progress.stop()
    if missing:
        log.warning("reshard: %d selected sample(s) were not found in their tars", missing)
    return ShardsWritten(tars=tars, samples=total, missing=missing, positions=np.array(written, np.int64))


EMBEDDING_KINDS = ("img", "txt")  # a run's {shard}_img_emb.npy and {shard}_txt_emb.npy


def export_embeddings(ds: Dataset, shards: pl.Series, rows: np.ndarray, written: ShardsWritten, out_dir: Path,
                      progress: Progress) -> int:
    """Beside each tar reshard wrote, `{tar}_img_emb.npy` and `{tar}_txt_emb.npy`: row j = the
    embedding of its j-th sample, copied from the dataset's files (`shards`, `rows`: each written
    sample's shard and row there, in `written.positions` order), float16, NaN where there is
    none, as a run writes them. A kind none of the dataset's files holds (a --no-score run) is
    left out. Returns how many samples have no image embedding (counted, and their files named
    in a warning)."""
    from .semantic import embedding_rows

    names = shards.unique(maintain_order=True)
    codes = shards.replace_strict(names, np.arange(len(names)), return_dtype=pl.Int64).to_numpy()
    names = names.to_list()
    widths = {kind: _width(ds, names, kind) for kind in EMBEDDING_KINDS}
    if not any(widths.values()):
        return 0  # the dataset has no embeddings (a --no-score run): neither has the subset
    missing = 0
    warned: set[Path] = set()
    progress.start("embeddings", len(written.tars))
    at = 0
    try:
        for tar in written.tars:
            n = tar["samples"]
            part = slice(at, at + n)
            at += n
            for kind, dim in widths.items():
                if not dim:
                    continue
                vec = np.full((n, dim), np.nan, np.float16)
                got = np.zeros(n, bool)
                for code in np.unique(codes[part]):
                    mine = np.flatnonzero(codes[part] == code)
                    path = ds.embeddings_path(names[code], kind)
                    if ds.is_damaged(path):  # said by the command: its samples get none, as if missing
                        continue
                    try:
                        arr = np.load(path, mmap_mode="r")
                        if arr.ndim != 2 or arr.shape[1] != dim:
                            raise ValueError(f"shape {arr.shape}, the others (rows, {dim})")
                        want = rows[part][mine]
                        ok = (want >= 0) & (want < arr.shape[0])
                        vec[mine[ok]] = embedding_rows(arr, want[ok])
                        got[mine[ok]] = True
                    except (OSError, ValueError, EOFError) as e:
                        if path not in warned:
                            warned.add(path)
                            log.warning("subset: cannot read %s (%s); its samples' embeddings are left out", path, e)
                if kind == "img":
                    missing += int((~(got & np.isfinite(vec).all(axis=1))).sum())
                np.save(out_dir / f"{Path(tar['tar']).stem}_{kind}_emb.npy", vec)
            progress.advance()
    finally:
        progress.stop()
    return missing


def _width(ds: Dataset, shards: list[str], kind: str) -> int:
    """The width of the first readable `{shard}_{kind}_emb.npy` of these shards (0: none)."""
    for shard in shards:
        path = ds.embeddings_path(shard, kind)
        if ds.is_damaged(path):
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            continue
        if arr.ndim == 2:
            return int(arr.shape[1])
    return 0


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise tarfile.ReadError(f"{member.name}: not a regular file")
    data = f.read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"{member.name}: truncated ({len(data)} of {member.size} bytes)")
    return data


def write_shards_json(path: Path, written: ShardsWritten) -> None:
    """shards.json of a --shards subset, with the size of every tar and embedding file beside it
    ("files"), which Dataset.damage checks as a run's stats files are checked."""
    folder = path.parent
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
             if p.is_file() and (p.suffix == ".tar" or p.name.endswith("_emb.npy"))}
    # write_id: this folder's identity as a root (source.shard_identity), new each time it is written
    path.write_text(json.dumps({"samples": written.samples, "missing": written.missing, "tars": written.tars,
                                "files": files, WRITE_ID: new_write_id()}, indent=2))
