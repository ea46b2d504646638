"""Interrupt `fastlaion run` (and `subset` / `dedup`) at random moments and check that no row is
lost, written twice or changed: "never lose a row" under SIGKILL, SIGINT and SIGTERM.

Not a benchmark: a randomized fault test, run by hand (a few minutes on 2 cores). Everything is on
127.0.0.1; the scoring rounds use the tiny random-weight CLIP (`fastlaion-tiny`, `--pretrained
none`), so nothing is downloaded.

1. A loopback server holds a few hundred URLs: scikit-image photographs cropped and encoded at
   many sizes (JPEG and PNG), some bad bodies (an HTML page, a truncated JPEG, an empty body, a
   tiny icon), some 404s and 500s, some slow answers (0.2-0.6 s), every answer a little delayed.
2. A reference run: the same command, uninterrupted, into its own folder.
3. The torture: the command is started again and again into one folder and interrupted at a
   random moment each time (SIGKILL of the parent, Ctrl-C to its process group, SIGTERM to the
   parent, SIGKILL of one worker process), then run to completion. After each interruption:
   every worker process is gone, the exit status and the one line the command said are the ones
   documented, each shard that reads as finished has all its files at the recorded sizes, and a
   stop by SIGINT/SIGTERM leaves no `.partial/` and says how many shards are kept (the count on
   disk).
4. The final folder against the reference: every input row exactly once, each row's outcome
   (url, caption, status, stage, reason, error, http status, bytes, sha256, sizes, language,
   similarity) the same; each shard's tar members (bytes; the sample JSON compared parsed) and
   embeddings; the per-shard funnels and summary.json's funnel, whose input is the row count; no
   `.partial/`, `.lock`, `*.tmp` or other stray file.

   What may differ: `download_s` (timings), the stats' timings and `write_id`, summary.json's
   timings and shard counts of this invocation, the tar's member order and mtimes (samples are
   written as they arrive), the Parquet's byte size (timings compress differently), and
   similarities / embeddings within float tolerance (a row is scored in another batch).

5. `subset --shards --urls` and `dedup` on the final folder: each killed (SIGKILL) at every rename
   of the step that puts its output in place (the K-th os.replace, K = 1, 2, ...), into a fresh
   folder and over an earlier output, plus SIGINT/SIGKILL at random moments; after each, the
   folder holds the earlier output, the complete new one, or something every reader refuses; and
   the same command then completes it.

    .venv/bin/python bench/torture.py                    # 300 rows, 3 rounds --no-score + 1 scored
    .venv/bin/python bench/torture.py --rows 150 --kills 6 --rounds 1 --scored-rounds 0 --seed 3
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # the tiny model has no weights to fetch; nothing may try

FASTLAION = [sys.executable, "-m", "fastlaion"]
# Parquet columns that may differ between two runs of the same rows (timings)
VOLATILE_COLUMNS = {"download_s"}
FLOAT_TOLERANCE = 2e-3  # similarities and embeddings scored in other batches (fp32 on the CPU)


# --- the served files -------------------------------------------------------------------------------

def _encode(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def build_files(n_rows: int, seed: int):
    """(files for LoopbackServer, slow bodies by name, [(path, caption)] one per row)."""
    import skimage.data
    from PIL import Image

    from fastlaion.server import Served

    rng = random.Random(seed)
    photos = [getattr(skimage.data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket", "cat")]
    files: dict[str, Served] = {}
    slow: dict[str, bytes] = {}
    rows = []
    jpeg = _encode(Image.fromarray(photos[0]), "JPEG", quality=85)
    for i in range(n_rows):
        kind = rng.choices(["photo", "png", "slow", "404", "500", "html", "truncated", "empty", "icon"],
                           [62, 8, 8, 7, 3, 3, 3, 3, 3])[0]
        name = f"img{i}.{'png' if kind == 'png' else 'jpg'}"
        photo = photos[rng.randrange(len(photos))]
        h, w = photo.shape[:2]
        ch, cw = rng.randint(h // 4, h), rng.randint(w // 4, w)
        y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
        img = Image.fromarray(photo[y:y + ch, x:x + cw])
        if kind in ("photo", "slow"):
            body = _encode(img, "JPEG", quality=rng.randint(70, 95))
            if kind == "slow":
                slow[name] = body
                name = f"slow/{name}"
            else:
                files[name] = Served(body, "image/jpeg")
        elif kind == "png":
            files[name] = Served(_encode(img, "PNG"), "image/png")
        elif kind == "500":
            name = "status/500"
        elif kind == "html":
            files[name] = Served(b"<html><body>not an image</body></html>" * 200, "image/jpeg")
        elif kind == "truncated":
            files[name] = Served(jpeg[: len(jpeg) // 2], "image/jpeg")
        elif kind == "empty":
            files[name] = Served(b"", "image/jpeg")
        elif kind == "icon":
            files[name] = Served(_encode(img.resize((16, 16)), "PNG"), "image/png")
        # "404": a name the server does not hold
        rows.append((name, f"{kind} number {i}, a photo of {rng.choice(['a cat', 'coffee', 'a rocket', 'a person'])}"))
    return files, slow, rows


def slow_route(slow: dict[str, bytes]):
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await asyncio.sleep(0.2 + (hash(name) % 5) / 10)  # 0.2-0.6 s (PYTHONHASHSEED-independent enough)
        return web.Response(body=slow[name], content_type="image/jpeg")

    return web.get("/slow/{name}", handler)


# --- processes ---------------------------------------------------------------------------------------

def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid` with its command line (Linux /proc)."""
    parents: dict[int, int] = {}
    cmds: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmds[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for c, pp in parents.items():
            if pp == p and c not in found:
                found[c] = cmds.get(c, "")
                frontier.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Stop:
    action: str
    at_s: float
    returncode: int | None
    stderr: str
    finished_before: int  # shards finished when the signal went
    finished_after: int
    notes: list[str] = field(default_factory=list)
    # left by an earlier SIGKILL: a run stopped before it reached its output folder (in its
    # start-up) leaves them as they were; the next run that gets there clears them
    had_partial: bool = False
    had_lock: bool = False


# --- checks ------------------------------------------------------------------------------------------

def finished(out: Path) -> list[int]:
    return sorted(int(p.name[:5]) for p in out.glob("[0-9]*_stats.json"))


def check_published(out: Path) -> list[str]:
    """Each shard that reads as finished has its files at the sizes its stats recorded."""
    from fastlaion.writer import problems

    return [f"shard {s:05d}: {line}" for s in finished(out) for line in problems(out, s)]


def read_table(out: Path):
    import polars as pl

    return pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))], how="vertical")


def tar_members(out: Path) -> dict[str, bytes]:
    members = {}
    for p in sorted(out.glob("[0-9]*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name in members:
                    members[m.name + "#twice"] = b""
                members[m.name] = tf.extractfile(m).read()
    return members


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (np.isnan(a) and np.isnan(b)) or abs(a - b) <= FLOAT_TOLERANCE
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def compare(ref: Path, out: Path, urls: list[str]) -> list[str]:
    """What differs between the interrupted run's output and the reference, beyond what may."""
    import polars as pl

    bad = []
    got, want = read_table(out), read_table(ref)
    if got["url"].to_list() != urls:
        bad.append(f"rows: {got.height} in the Parquets, {len(urls)} input rows, or out of order")
    if got["key"].n_unique() != got.height:
        bad.append("a key is in the Parquets twice")
    if got.columns != want.columns:
        bad.append(f"columns differ: {got.columns} vs {want.columns}")
    for col in want.columns:
        if col in VOLATILE_COLUMNS or col not in got.columns:
            continue
        a, b = got[col], want[col]
        if a.dtype.is_float():
            same = ((a - b).abs() <= FLOAT_TOLERANCE) | (a.is_null() & b.is_null()) | (a.is_nan() & b.is_nan())
            diff = (~same.fill_null(False)).sum()
        else:
            diff = (~(a.eq_missing(b))).sum()
        if diff:
            i = int(np.flatnonzero(~(a.eq_missing(b) if not a.dtype.is_float() else same.fill_null(False)).to_numpy())[0])
            bad.append(f"column {col}: {diff} row(s) differ (first: key {want['key'][i]}: {a[i]!r} vs {b[i]!r})")
    kept = set(got.filter(pl.col("status") == "kept")["key"])
    mg, mw = tar_members(out), tar_members(ref)
    if mg.keys() != mw.keys():
        bad.append(f"tar members differ: {sorted(mg.keys() ^ mw.keys())[:6]}")
    if {n.rsplit(".", 1)[0] for n in mg if not n.endswith("#twice")} != kept:
        bad.append("the tars' samples are not the kept rows")
    for name in mg.keys() & mw.keys():
        if name.endswith(".json"):
            if not _close(json.loads(mg[name]), json.loads(mw[name])):
                bad.append(f"{name}: {mg[name][:200]!r} vs {mw[name][:200]!r}")
        elif mg[name] != mw[name]:
            bad.append(f"tar member {name}: other bytes")
    for p in sorted(ref.glob("[0-9]*_emb.npy")):
        a, b = np.load(out / p.name).astype(np.float32), np.load(p).astype(np.float32)
        if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)) or \
                np.nanmax(np.abs(a - b), initial=0) > FLOAT_TOLERANCE * 10:
            bad.append(f"{p.name}: embeddings differ")
    for p in sorted(ref.glob("[0-9]*_stats.json")):
        a, b = json.loads((out / p.name).read_text()), json.loads(p.read_text())
        for k in ("funnel", "caption_edits", "rows", "scoring"):
            if a.get(k) != b.get(k):
                bad.append(f"{p.name}: {k} {a.get(k)} vs {b.get(k)}")
    sa, sb = json.loads((out / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    if sa["funnel"] != sb["funnel"]:
        bad.append(f"summary funnel {sa['funnel']} vs {sb['funnel']}")
    if sa["funnel"]["input"] != len(urls):
        bad.append(f"summary funnel input {sa['funnel']['input']}, {len(urls)} input rows")
    if sa["shards_total"] != sb["shards_total"] or sa["shards_run"] + sa["shards_skipped"] != sa["shards_total"]:
        bad.append(f"summary shards: {sa['shards_total']} total, {sa['shards_run']} run, {sa['shards_skipped']} skipped")
    expected = {p.name for p in ref.iterdir()}
    stray = sorted({p.name for p in out.iterdir()} - expected)
    if stray:
        bad.append(f"left in the output: {stray}")
    missing = sorted(expected - {p.name for p in out.iterdir()})
    if missing:
        bad.append(f"missing from the output: {missing}")
    return bad


# --- the run torture ---------------------------------------------------------------------------------

ACTIONS = ("kill9-parent", "sigint-group", "sigterm-parent", "kill9-worker", "sigint-parent")


def interrupt_once(cmd: list[str], out: Path, action: str, at_s: float, n_shards: int) -> Stop:
    had_partial, had_lock = (out / ".partial").exists(), (out / ".lock").exists()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    notes: list[str] = []
    try:
        deadline = time.monotonic() + at_s
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        if action == "kill9-worker":  # wait for the workers, however long they take to start
            wait_end = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < wait_end:
                workers = [p for p, c in descendants(proc.pid).items() if "spawn_main" in c and "resource_tracker" not in c]
                if len(workers) >= 1:
                    break
                time.sleep(0.005)
        before = len(finished(out))
        family = descendants(proc.pid)
        if proc.poll() is None:
            if action == "kill9-parent":
                os.kill(proc.pid, signal.SIGKILL)
            elif action == "sigint-group":
                os.killpg(proc.pid, signal.SIGINT)
            elif action == "sigint-parent":
                os.kill(proc.pid, signal.SIGINT)
            elif action == "sigterm-parent":
                os.kill(proc.pid, signal.SIGTERM)
            elif action == "kill9-worker":
                workers = sorted(p for p, c in family.items() if "spawn_main" in c and "resource_tracker" not in c
                                 and _parent(p) == proc.pid)
                if workers:
                    os.kill(random.choice(workers), signal.SIGKILL)
                else:
                    notes.append("no worker to kill")
        try:
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            notes.append(f"HANG: still running 90 s after {action}")
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        end = time.monotonic() + 15
        while any(alive(p) for p in family) and time.monotonic() < end:
            time.sleep(0.05)
        left = {p: c for p, c in family.items() if alive(p)}
        if left:
            notes.append(f"ORPHANS: {left}")
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        return Stop(action, at_s, proc.returncode, err.decode(errors="replace"), before, len(finished(out)), notes,
                    had_partial, had_lock)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def judge_stop(stop: Stop, out: Path, n_shards: int) -> list[str]:
    """What is wrong with the folder and the command's words after one interruption."""
    bad = [f"{stop.action}@{stop.at_s:.2f}s: {n}" for n in stop.notes]
    bad += [f"{stop.action}@{stop.at_s:.2f}s: {p}" for p in check_published(out)]
    rc, err = stop.returncode, stop.stderr.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    tag = f"{stop.action}@{stop.at_s:.2f}s rc={rc}"
    if rc == 0:
        return bad  # it finished first
    if "Traceback" in err:
        bad.append(f"{tag}: a traceback: {err[-600:]}")
    if stop.action.startswith("sigint") or stop.action == "sigterm-parent":
        want = 143 if stop.action == "sigterm-parent" else 130
        if rc != want:
            bad.append(f"{tag}: exit status {rc}, not {want}: {err[-300:]}")
        if (out / ".partial").exists() and not stop.had_partial:
            bad.append(f"{tag}: .partial/ left after a clean stop: {sorted(str(p.relative_to(out)) for p in (out / '.partial').rglob('*'))[:5]}")
        if (out / ".lock").exists() and not stop.had_lock:
            bad.append(f"{tag}: .lock left after a clean stop")
        said = [ln for ln in lines if "shards are finished and kept" in ln or "shard is finished and kept" in ln]
        if said:
            n = int(said[-1].split(":", 1)[1].split()[0])
            if n != stop.finished_after:
                bad.append(f"{tag}: said {n} finished, {stop.finished_after} on disk: {said[-1]}")
    elif stop.action == "kill9-worker":
        if rc != 1 or not any("was killed by signal 9" in ln for ln in lines):
            bad.append(f"{tag}: a killed worker: {err[-400:]}")
    elif rc != -9:
        bad.append(f"{tag}: exit status {rc} after SIGKILL")
    return bad


def run_cmd(inp: Path, out: Path, scored: bool, shard_size: int) -> list[str]:
    cmd = FASTLAION + ["run", str(inp), "-o", str(out), "--shard-size", str(shard_size), "--processes", "2",
                       "--workers", "4", "--retries", "0", "--timeout", "10", "--no-progress",
                       "--allow-private-networks"]
    if scored:
        cmd += ["--model", "fastlaion-tiny", "--pretrained", "none", "--precision", "fp32", "--min-similarity", "0.0"]
    else:
        cmd += ["--no-score", "--no-language"]
    return cmd


def torture_round(name: str, cmd_of, inp: Path, work: Path, urls: list[str], kills: int, rng: random.Random,
                  ref: Path, ref_s: float, n_shards: int, log) -> tuple[list[str], list[Stop]]:
    out = work / name
    cmd = cmd_of(out)
    stops: list[Stop] = []
    bad: list[str] = []
    for _ in range(kills):
        left = n_shards - len(finished(out)) if out.exists() else n_shards
        if left == 0 and (out / "summary.json").exists():
            break
        action = rng.choice(ACTIONS)
        # mostly before the work left ends (a run that finishes first ends the round), some in start-up
        at_s = rng.uniform(0.05, ref_s * (0.15 + 0.8 * left / n_shards))
        stop = interrupt_once(cmd, out, action, at_s, n_shards)
        stops.append(stop)
        problems = judge_stop(stop, out, n_shards)
        bad += problems
        log(f"  {name}: {action:15s} at {at_s:5.2f} s -> rc {stop.returncode}, shards {stop.finished_before}->"
            f"{stop.finished_after}/{n_shards}{'  PROBLEM: ' + '; '.join(problems) if problems else ''}")
        if stop.returncode == 0:
            break
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if final.returncode != 0:
        bad.append(f"{name}: the final run failed ({final.returncode}): {final.stderr[-800:]}")
        return bad, stops
    diffs = compare(ref, out, urls)
    bad += [f"{name}: {d}" for d in diffs]
    log(f"  {name}: final run rc 0; {'the same as the reference' if not diffs else f'{len(diffs)} difference(s)'}")
    return bad, stops


# --- subset / dedup at their commit -----------------------------------------------------------------

KILL_AT_RENAME = """
import os, signal, sys
from fastlaion.dataset import output
k = int(os.environ["TORTURE_KILL_AT_RENAME"])
real_replace, real_commit, seen = os.replace, output.Staging.commit, [0, False]
def replace(*a, **kw):
    if seen[1]:
        seen[0] += 1
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(*a, **kw)
def commit(self):
    seen[1] = True
    return real_commit(self)
os.replace, output.Staging.commit = replace, commit
from fastlaion.cli import main
sys.argv = ["fastlaion", *sys.argv[1:]]
main()
"""


VOLATILE_KEYS = {"seconds", "write_id", "root_shards"}  # timings; a --shards subset's own random write id


def _without_volatile(data):
    if isinstance(data, dict):
        return {k: _without_volatile(v) for k, v in data.items() if k not in VOLATILE_KEYS}
    if isinstance(data, list):
        return [_without_volatile(v) for v in data]
    return data


def snapshot(folder: Path) -> dict[str, object]:
    """The files of a dataset command's output, as they count: JSON files parsed, without timings
    and write ids, the folder's own path masked; tars as their members (not their mtimes)."""
    snap: dict[str, object] = {}
    if not folder.exists():
        return snap
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_dir() or rel == ".lock":
            continue
        if p.suffix == ".json" and not rel.startswith("."):
            try:
                data = json.loads(p.read_text().replace(str(folder), "<OUT>").replace(folder.name, "<OUT>"))
            except ValueError:
                snap[rel] = "unreadable"
                continue
            snap[rel] = {"json": _without_volatile(data)}
        elif p.suffix == ".tar" and not rel.startswith("."):
            try:
                with tarfile.open(p) as tf:
                    snap[rel] = {"tar": [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]}
            except (tarfile.TarError, OSError):
                snap[rel] = "unreadable tar"
        else:
            snap[rel] = p.read_bytes()
    return snap


def reader_view(folder: Path) -> tuple[str, int | None]:
    """What a later command reads there: ('refused', None) or ('read', rows)."""
    r = subprocess.run(FASTLAION + ["stats", str(folder), "--json", "-"], capture_output=True, text=True, timeout=120,
                       check=False)
    if r.returncode != 0:
        return "refused: " + (r.stderr.strip().splitlines() or [""])[-1][:200], None
    return "read", json.loads(r.stdout)["rows"]


def dataset_torture(src: Path, work: Path, rng: random.Random, log, random_kills: int) -> tuple[list[str], int]:
    bad: list[str] = []
    tried = 0
    commands = {
        "subset": ["subset", "--where", "true", "--from", str(src), "--shards", "--shard-size", "7", "--urls",
                   "--no-progress"],
        "dedup": ["dedup", "--from", str(src), "--by", "sha256", "--no-progress"],
    }
    for name, args in commands.items():
        base = work / f"{name}-ref"
        r = subprocess.run(FASTLAION + [*args, "-o", str(base)], capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr
        new = snapshot(base)
        src_half = work / f"{name}-src-half"
        if not src_half.exists():
            r = subprocess.run(FASTLAION + ["subset", "--where", "key < '00010'", "--include-dropped", "--from", str(src),
                                            "-o", str(src_half), "--no-progress"], capture_output=True, text=True,
                               timeout=300, check=False)
            assert r.returncode == 0, r.stderr
        # an earlier output to be replaced: the same command on the first shard's rows
        old_args = [a if a != str(src) else str(src_half) for a in args]
        renames = None
        for over in (False, True):
            k = 1
            while True:
                target = work / f"{name}-k{k}-{'over' if over else 'fresh'}"
                shutil.rmtree(target, ignore_errors=True)
                old: dict[str, object] = {}
                if over:  # an earlier output of the same command (on other rows) in the folder
                    r = subprocess.run(FASTLAION + [*old_args, "-o", str(target)], capture_output=True, text=True,
                                       timeout=300, check=False)
                    assert r.returncode == 0, r.stderr
                    old = snapshot(target)
                env = {**os.environ, "TORTURE_KILL_AT_RENAME": str(k), "PYTHONPATH": str(ROOT)}
                r = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, *args, "-o", str(target)], capture_output=True,
                                   text=True, timeout=300, env=env, check=False)
                tried += r.returncode == -9
                if r.returncode == 0:
                    renames = k - 1
                    break
                if r.returncode != -9:
                    bad.append(f"{name} kill at rename {k}: exit {r.returncode}: {r.stderr[-300:]}")
                    break
                now = snapshot(target)
                state = "old" if over and _same(now, old) else "new" if _same(now, new) else "neither"
                seen, rows = reader_view(target)
                if state == "neither" and seen == "read":
                    bad.append(f"{name} killed at rename {k} ({'over an earlier output' if over else 'fresh'}): the "
                               f"folder holds a half output ({_files_of(now)}) that stats reads as {rows} rows")
                again = subprocess.run(FASTLAION + [*args, "-o", str(target)], capture_output=True, text=True,
                                       timeout=300, check=False)
                if again.returncode != 0 or not _same(snapshot(target), new):
                    bad.append(f"{name} killed at rename {k} ({'over' if over else 'fresh'}): the rerun "
                               f"{'failed: ' + again.stderr.strip()[-300:] if again.returncode else 'left another output'}")
                log(f"  {name}: SIGKILL at rename {k} ({'over an earlier output' if over else 'fresh folder'}): "
                    f"{state}; stats {seen}{'' if rows is None else f' ({rows} rows)'}; rerun rc {again.returncode}")
                shutil.rmtree(target, ignore_errors=True)
                k += 1
                if k > 40:
                    break
        log(f"  {name}: its commit makes {renames} renames")
        for i in range(random_kills):
            target = work / f"{name}-random{i}"
            sig = rng.choice([signal.SIGINT, signal.SIGKILL])
            at_s = rng.uniform(0.3, 4.0)
            proc = subprocess.Popen(FASTLAION + [*args, "-o", str(target)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
            time.sleep(at_s)
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                tried += 1
            _, err = proc.communicate(timeout=120)
            now = snapshot(target)
            state = "none" if not now else "new" if _same(now, new) else "neither"
            seen, rows = reader_view(target) if target.exists() else ("absent", None)
            if state == "neither" and seen == "read":
                bad.append(f"{name} {sig.name} at {at_s:.2f} s: a half output read as {rows} rows: {_files_of(now)}")
            log(f"  {name}: {sig.name} at {at_s:.2f} s -> rc {proc.returncode}: {state}; stats {seen}")
            shutil.rmtree(target, ignore_errors=True)
    return bad, tried


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(_close(a[k], b[k]) if isinstance(a[k], dict) else a[k] == b[k] for k in a)


def _files_of(snap: dict) -> str:
    return ", ".join(sorted(snap))[:300]


# --- main --------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--shard-size", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="torture rounds with --no-score")
    ap.add_argument("--scored-rounds", type=int, default=1, help="torture rounds scored by the tiny random CLIP")
    ap.add_argument("--kills", type=int, default=8, help="interruptions per round (fewer where a run finishes first)")
    ap.add_argument("--dataset-random-kills", type=int, default=2, help="random SIGINT/SIGKILL per dataset command")
    ap.add_argument("--no-dataset", action="store_true", help="skip the subset / dedup part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for the outputs (default: a temporary one)")
    args = ap.parse_args()

    from fastlaion.server import LoopbackServer

    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="fastlaion-torture-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    files, slow, rows = build_files(args.rows, args.seed)
    bad: list[str] = []
    all_stops: list[Stop] = []
    n_shards = -(-args.rows // args.shard_size)
    with LoopbackServer(files, delay_s=0.05, extra_routes=[slow_route(slow)]) as server:
        import polars as pl

        urls = [server.url(p) for p, _ in rows]
        inp = work / "input.parquet"
        pl.DataFrame({"url": urls, "caption": [c for _, c in rows]}).write_parquet(inp)
        log(f"{args.rows} rows, {n_shards} shards of {args.shard_size}, seed {args.seed}, in {work}")
        for scored, rounds in ((False, args.rounds), (True, args.scored_rounds)):
            if not rounds:
                continue
            kind = "scored" if scored else "noscore"
            ref = work / f"ref-{kind}"
            t = time.monotonic()
            r = subprocess.run(run_cmd(inp, ref, scored, args.shard_size), capture_output=True, text=True,
                               timeout=900, check=False)
            ref_s = time.monotonic() - t
            if r.returncode != 0:
                log(r.stderr)
                return 2
            log(f"reference ({kind}): {ref_s:.1f} s")
            for i in range(rounds):
                got, stops = torture_round(f"{kind}-{i}", lambda o: run_cmd(inp, o, scored, args.shard_size), inp, work,
                                           urls, args.kills, rng, ref, ref_s, n_shards, log)
                bad += got
                all_stops += stops
        dataset_tried = 0
        if not args.no_dataset:
            src = work / ("ref-noscore" if args.rounds else "ref-scored")
            got, dataset_tried = dataset_torture(src, work, rng, log, args.dataset_random_kills)
            bad += got
    by_action: dict[str, int] = {}
    for s in all_stops:
        by_action[s.action] = by_action.get(s.action, 0) + 1
    landed = sum(s.returncode != 0 for s in all_stops)
    log(f"\nrun interruptions: {len(all_stops)} ({landed} landed before the end; {by_action}); "
        f"dataset-command kills: {dataset_tried}")
    if bad:
        log(f"{len(bad)} PROBLEM(S):")
        for b in bad:
            log("  " + b)
        return 1
    log("no row lost, repeated or changed; no half output read as whole")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
