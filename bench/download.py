#!/usr/bin/env python3
"""Download benchmark: `fastlaion run --no-score --processes 2` against img2dataset, with the
peak RSS of each tool's process tree and a py-spy profile of where each image's CPU time goes;
and, with `--urls N`, a long run that checks that fastlaion's memory stays flat.

    .venv/bin/python bench/download.py [--images 5000] [--repeat 1] [--no-profile]
    .venv/bin/python bench/download.py --urls 1000000

Comparison mode reuses bench/pipeline.py whole (its image generator, loopback server process,
URL lists, quiet-machine wait, timing and counting, and its report): it calls `pipeline.main`
with `--fastlaion-arg=--processes=2`, so the two command lines are pipeline.py's:

    img2dataset --url_list urls.parquet ... --output_format webdataset --image_size 256
        --resize_mode keep_ratio --processes_count 2 --thread_count 32
        --number_sample_per_shard 250 --timeout 10 --retries 0 ...
    fastlaion run urls.parquet -o OUT --no-score --image-size 256 --resize-mode keep_ratio
        --shard-size 250 --timeout 10 --retries 0 --no-progress
        --allow-private-networks --per-host 1000 --processes 2

What this script adds:

- peak RSS: a sampler thread reads /proc every 0.5 s and sums VmRSS (and PSS, which counts a
  page shared by several processes once) over every process of each tool's session (both are
  started in a new session, so the session is the whole tree: workers, resource tracker);
- a profile of each tool (unless --no-profile), in separate runs after the timed ones (the
  profiler costs CPU, so it never runs during a timed run), with

      py-spy record --nonblocking --subprocesses --rate 100 -f raw -o PROFILE -- COMMAND

  `--nonblocking` does not stop the target to sample it, `--subprocesses` follows the worker
  processes, and idle threads are left out (py-spy's default), so the samples are CPU time.
  The summary gives each tool's samples by process, by the package of the innermost Python
  frame (time in a C extension counts for the Python function that called it: Pillow's decode
  shows up as PIL, libjpeg-turbo's as turbojpeg), the top innermost functions, and the
  inclusive share of the tool's own functions; shares times CPU-ms per image give CPU-ms per
  image per item.

Memory mode (`--urls N`): N rows (default 1,000,000) pointing at 16 small JPEGs (about 6 KB,
160 x 120 px) served from memory, every tenth row a 404, so each row goes through download,
decode, resize and the tar or the Parquet. `fastlaion run --no-score --processes 2
--image-size 128 --shard-size 10000` runs on it while the sampler records the tree's RSS
against progress (requests the server answered); the report gives the peak, RSS at 10 %, 50 %
and 90 % of the rows, each process's share, and the slope of RSS against rows over 10-100 %
(bytes per row: 0 is flat). `--minutes M` stops the run after M minutes and reports over the
rows done so far.

Results go to bench/_work/download_results.json (and memory_results.json). Nothing here talks to
anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pipeline as bp

REPO = bp.REPO
PY_SPY = REPO / ".venv" / "bin" / "py-spy"
MARKERS = {"img2dataset": "bin/img2dataset", "fastlaion": "bin/fastlaion run"}
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --------------------------------------------------------------------------- memory of a tree

def _stat_fields(pid: str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: str | int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _rss_pss_kb(pid: str) -> tuple[int, int]:
    rss = pss = 0
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
                break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


def sessions() -> dict[int, list[str]]:
    """Live (not zombie) processes by session id."""
    by_sid: dict[int, list[str]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (f := _stat_fields(d)) is not None and f[0] != "Z":
            by_sid.setdefault(int(f[3]), []).append(d)
    return by_sid


def _role(cmd: str) -> str:
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "spawn_main" in cmd or "multiprocessing-fork" in cmd or "forkserver" in cmd:
        return "worker"
    return "main"


class TreeSampler(threading.Thread):
    """Every `every_s`, for each tool whose session leader's command line contains its marker,
    the summed RSS and PSS (KiB) of every process in that session, per role too, with the
    value of `progress()` at that moment. Samples: {tool: [(t, rss, pss, progress, {role: rss})]}."""

    def __init__(self, markers: dict[str, str], every_s: float = 0.5,
                 progress: Callable[[], int] | None = None):
        super().__init__(daemon=True, name="rss-sampler")
        self.markers, self.every_s, self.progress = markers, every_s, progress
        self.samples: dict[str, list[tuple[float, int, int, int, dict[str, int]]]] = {}
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            done = self.progress() if self.progress else 0
            for sid, pids in sessions().items():
                tool = next((t for t, m in self.markers.items() if m in _cmdline(sid)), None) \
                    if str(sid) in pids else None
                if tool is None:
                    continue
                rss = pss = 0
                roles: Counter[str] = Counter()
                for pid in pids:
                    r, p = _rss_pss_kb(pid)
                    rss, pss = rss + r, pss + p
                    roles[_role(_cmdline(pid))] += r
                self.samples.setdefault(tool, []).append((time.monotonic() - self.t0, rss, pss, done, dict(roles)))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peak(self, tool: str) -> dict:
        s = self.samples.get(tool) or [(0.0, 0, 0, 0, {})]
        top = max(s, key=lambda x: x[1])
        return {"peak_rss_mb": top[1] / 1024, "peak_pss_mb": max(x[2] for x in s) / 1024,
                "peak_roles_mb": {k: v / 1024 for k, v in top[4].items()}, "rss_samples": len(s)}


# --------------------------------------------------------------------------- profiles

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


_PROCESSES = re.compile(r'^(?:process \d+:"[^"]*";?)+')


def _frames(stack: str) -> tuple[str, list[tuple[str, str]]]:
    """(process role, [(function, file)] outermost first) of one py-spy raw stack."""
    procs = _PROCESSES.match(stack)  # the command lines may hold ';' themselves
    proc = _role(procs[0].rsplit("process ", 1)[1]) if procs else "main"
    frames = []
    for part in stack[procs.end() if procs else 0:].split(";"):
        if not part or part.startswith("thread "):
            continue
        m = _FRAME.match(part)
        frames.append((m["func"], m["file"]) if m else (part, "?"))
    return proc, frames


def _package(path: str) -> str:
    """The importable package a py-spy file path belongs to ('PIL', 'asyncio', 'fastlaion')."""
    return _module(path).split(".", 1)[0] or "?"


def _module(path: str) -> str:
    """The dotted module of a py-spy file path, relative to site-packages or the stdlib."""
    p = path.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in p:
            p = p.split(marker, 1)[1]
    p = re.sub(r"^.*/lib/python3\.\d+/", "", p)
    return p[:-3].replace("/", ".") if p.endswith(".py") else p


def summarize_profile(raw: Path, own_package: str, top: int = 12) -> dict:
    """Shares of py-spy samples: by process role, by innermost package, top innermost functions,
    and the tool's own functions counted inclusively (once per sample whatever the recursion)."""
    by_proc: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    by_leaf: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        proc, frames = _frames(stack)
        total += count
        by_proc[proc] += count
        if not frames:
            by_pkg["(no Python frame)"] += count
            continue
        func, path = frames[-1]
        by_pkg[_package(path)] += count
        by_leaf[f"{_module(path)}.{func}"] += count
        seen = {f"{_module(p)}.{f}" for f, p in frames if _package(p) == own_package}
        for name in seen:
            own[name] += count

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in c.most_common(top)] if total else []

    return {"samples": total, "by_process": share(by_proc), "by_package": share(by_pkg),
            "top_functions": share(by_leaf), "own_inclusive": share(own)}


def profile_run(cmd: list[str], out_dir: Path, raw: Path, env: dict, rate: int = 100) -> tuple[int, float]:
    """Run `cmd` under py-spy; returns (exit status, wall seconds)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    spy = [str(PY_SPY), "record", "--nonblocking", "--subprocesses", "--rate", str(rate), "-f", "raw",
           "-o", str(raw), "--"]
    bp.log(f"profiling: {' '.join(spy)} {' '.join(cmd)}")
    t0 = time.perf_counter()
    with open(raw.with_suffix(".log"), "w") as log_file:
        rc = subprocess.run(spy + cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), check=False,
                            start_new_session=True, timeout=1800).returncode
    return rc, time.perf_counter() - t0


def _output_dir(cmd: list[str]) -> Path:
    for flag in ("-o", "--output_folder"):
        if flag in cmd:
            return Path(cmd[cmd.index(flag) + 1])
    raise ValueError(f"no output folder in {cmd}")


def print_profile(tool: str, prof: dict, cpu_ms_per_img: float) -> None:
    def rows(items: list[tuple[str, float]]) -> str:
        return "\n".join(f"  {100 * s:5.1f} %  {cpu_ms_per_img * s:6.2f} ms/img  {name}" for name, s in items)

    print(f"\n{tool}: {prof['samples']} samples (CPU-ms per image {cpu_ms_per_img:.1f} from the timed run)")
    print("by process:\n" + rows(prof["by_process"]))
    print("by package of the innermost Python frame:\n" + rows(prof["by_package"]))
    print("top innermost functions:\n" + rows(prof["top_functions"]))
    print(f"{tool}'s own functions, inclusive:\n" + rows(prof["own_inclusive"]))


# --------------------------------------------------------------------------- comparison

def compare(args: argparse.Namespace) -> int:
    work = args.workdir.resolve()
    pipeline_args = ["--images", str(args.images), "--workdir", str(work), "--wait-quiet", str(args.wait_quiet),
                     "--fastlaion-arg=--processes=2", *args.pipeline_arg]
    rounds = []
    for i in range(args.repeat):
        bp.log(f"round {i + 1} of {args.repeat}: bench/pipeline.py {' '.join(pipeline_args)}")
        sampler = TreeSampler(MARKERS)
        sampler.start()
        rc = bp.main(pipeline_args)
        sampler.stop()
        res = json.loads((work / "results.json").read_text())
        for r in res["results"]:
            r.update(sampler.peak(r["tool"]))
        rounds.append({"rc": rc, **res})

    best = {}
    for rnd in rounds:
        for r in rnd["results"]:
            if r["tool"] not in best or r["img_s"] > best[r["tool"]]["img_s"]:
                best[r["tool"]] = r
    commands = rounds[-1]["commands"]
    env = {**os.environ, **bp.QUIET_ENV,
           "PATH": f"{bp.IMG2DATASET_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    profiles = {}
    if args.profile and PY_SPY.exists():
        paths = sorted((work / "images").glob("*.jpg"))[:args.images]
        server = bp.ServerProcess(work / "images")
        try:
            bp.write_url_lists(work, paths, server.base_url, 0)  # the same list, on the new port
            for cmd in commands:
                tool = "img2dataset" if "img2dataset" in cmd.split()[0] else "fastlaion"
                argv = cmd.split()
                raw = work / f"profile-{tool}.txt"
                bp.wait_until_quiet(args.wait_quiet)
                rc, wall = profile_run(argv, _output_dir(argv), raw, env)
                shutil.rmtree(_output_dir(argv), ignore_errors=True)
                profiles[tool] = {"rc": rc, "wall_s": wall, "raw": str(raw),
                                  **summarize_profile(raw, tool)}
        finally:
            server.close()
    elif args.profile:
        bp.log(f"no py-spy at {PY_SPY}: `.venv/bin/pip install py-spy` for the profiles")

    print()
    print("=" * 78)
    print(f"download benchmark, {args.repeat} round(s), best of each tool; load average before: "
          + ", ".join(f"{r['tool']} {r['load_before']:.2f}" for r in best.values()))
    print("| tool | images ok | wall s | images/s | CPU-ms per image | peak RSS MB (tree) | peak PSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in best.values():
        print(f"| {r['tool']} {r['version']} | {r['ok']} | {r['wall_s']:.1f} | {r['img_s']:.0f} | "
              f"{r['cpu_ms_per_img']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} |")
    ratio = None
    if {"img2dataset", "fastlaion"} <= set(best) and best["img2dataset"]["img_s"] > 0:
        ratio = best["fastlaion"]["img_s"] / best["img2dataset"]["img_s"]
        print(f"\nfastlaion / img2dataset, images/s: {ratio:.2f}x (target 3x: {'met' if ratio >= 3 else 'NOT met'})")
    for rnd_i, rnd in enumerate(rounds):
        print(f"round {rnd_i + 1}: " + "; ".join(
            f"{r['tool']} {r['img_s']:.0f} img/s, {r['cpu_ms_per_img']:.1f} CPU-ms/img, other processes "
            f"{r['other_cpu_s']:.1f} CPU-s, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"({', '.join(f'{k} {v:.0f}' for k, v in r['peak_roles_mb'].items())})" for r in rnd["results"]))
    for tool, prof in profiles.items():
        print_profile(tool, prof, best[tool]["cpu_ms_per_img"] if tool in best else float("nan"))
    (work / "download_results.json").write_text(json.dumps(
        {"machine": bp.machine_info(), "rounds": rounds, "best": best, "ratio": ratio, "profiles": profiles,
         "commands": commands}, indent=2, default=str))
    print(f"\n(results also in {work / 'download_results.json'})")
    return max(r["rc"] for r in rounds)


# --------------------------------------------------------------------------- memory

def make_small_images(img_dir: Path, n: int = 16) -> list[Path]:
    """n small noisy JPEGs (160 x 120, about 6 KB: over LAION's 5,000-byte minimum)."""
    import io

    import numpy as np
    from PIL import Image

    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = img_dir / f"s{i:02d}.jpg"
        if not p.exists():
            rng = np.random.default_rng([1, i])
            base = np.linspace(0, 255, 160 * 120 * 3).reshape(120, 160, 3) * rng.uniform(0.5, 1.0, 3)
            arr = (base + rng.normal(0, 18, base.shape)).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=85)
            p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def write_many_urls(path: Path, base_url: str, names: list[str], n: int) -> None:
    """n rows: every tenth a 404, the others cycling over `names`; unique URLs (a query string)."""
    import polars as pl

    i = pl.int_range(0, n, eager=True)
    name = pl.Series(names)[i % len(names)]
    url = (pl.when(i % 10 == 9).then(pl.lit(f"{base_url}/img/missing.jpg?n="))
           .otherwise(pl.lit(f"{base_url}/img/") + pl.lit(name) + pl.lit("?n=")) + i.cast(pl.String))
    pl.DataFrame({"i": i}).select(url.alias("url"), (pl.lit("a small test picture number ") + i.cast(pl.String))
                                  .alias("caption")).write_parquet(path)


def memory(args: argparse.Namespace) -> int:
    work = args.workdir.resolve()
    img_dir = work / "small-images"
    paths = make_small_images(img_dir)
    server = bp.ServerProcess(img_dir)
    lock = threading.Lock()

    def served() -> int:
        with lock:
            return server.counters()[0]

    try:
        urls = work / f"urls-{args.urls}.parquet"
        t = time.perf_counter()
        write_many_urls(urls, server.base_url, [p.name for p in paths], args.urls)
        bp.log(f"{args.urls:,} URLs in {urls} ({urls.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")
        out = work / "out-memory"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(REPO / ".venv" / "bin" / "fastlaion"), "run", str(urls), "-o", str(out), "--no-score",
               "--image-size", "128", "--shard-size", "10000", "--timeout", "10", "--retries", "0", "--no-progress",
               "--allow-private-networks", "--per-host", "1000", "--processes", "2", *args.fastlaion_arg]
        start = served()
        sampler = TreeSampler({"fastlaion": "bin/fastlaion run"}, every_s=2.0, progress=lambda: served() - start)
        sampler.start()
        run = bp.run_timed(cmd, work / "memory.log", args.minutes * 60 if args.minutes else 6 * 3600,
                           {**os.environ, **bp.QUIET_ENV}, args.wait_quiet, lambda: served() - start, 120)
        sampler.stop()
        rows_done = served() - start
    finally:
        server.close()
    samples = [s for s in sampler.samples.get("fastlaion", []) if s[1] > 0]
    stats = list(out.glob("*_stats.json"))
    report = {"machine": bp.machine_info(), "command": " ".join(cmd), "urls": args.urls, "rows_done": rows_done,
              "shards_done": len(stats), **{k: run[k] for k in ("rc", "wall_s", "cpu_s", "load_before")},
              "samples": samples}
    print()
    print("=" * 78)
    print(f"memory: {' '.join(cmd)}")
    print(f"{rows_done:,} of {args.urls:,} rows requested, {len(stats)} shards finished, exit {run['rc']}, "
          f"{run['wall_s']:.0f} s wall ({rows_done / max(run['wall_s'], 1e-9):,.0f} rows/s), "
          f"{run['cpu_s']:.0f} CPU-s, load average before {run['load_before']:.2f}")
    if samples:
        peak = max(samples, key=lambda s: s[1])
        print(f"peak RSS of the process tree {peak[1] / 1024:.0f} MB at {peak[3]:,} rows "
              f"({', '.join(f'{k} {v / 1024:.0f} MB' for k, v in peak[4].items())}); peak PSS "
              f"{max(s[2] for s in samples) / 1024:.0f} MB")
        if rows_done < args.urls:
            print(f"  (stopped early: the percentages below are of the {rows_done:,} rows done)")
        for q in (0.1, 0.5, 0.9):
            s = min(samples, key=lambda s: abs(s[3] - q * rows_done))
            print(f"  at {100 * q:.0f} % ({s[3]:,} rows, {s[0]:.0f} s): RSS {s[1] / 1024:.0f} MB, PSS {s[2] / 1024:.0f} MB "
                  f"({', '.join(f'{k} {v / 1024:.0f}' for k, v in s[4].items())})")
            report[f"at_{int(100 * q)}"] = {"rows": s[3], "rss_mb": s[1] / 1024, "pss_mb": s[2] / 1024}
        steady = [s for s in samples if s[3] >= 0.1 * rows_done]
        if len(steady) > 2:
            import numpy as np

            x = np.array([s[3] for s in steady], dtype=float)
            slope_rss = np.polyfit(x, [s[1] * 1024 for s in steady], 1)[0]
            slope_pss = np.polyfit(x, [s[2] * 1024 for s in steady], 1)[0]
            print(f"slope over 10-100 % of the rows: RSS {slope_rss:+.1f} B/row, PSS {slope_pss:+.1f} B/row "
                  f"(x 1M rows = {slope_rss:+.0f} MB / {slope_pss:+.0f} MB)")
            report.update(slope_rss_b_per_row=slope_rss, slope_pss_b_per_row=slope_pss)
        report.update(peak_rss_mb=peak[1] / 1024, peak_pss_mb=max(s[2] for s in samples) / 1024)
    (work / "memory_results.json").write_text(json.dumps(report, indent=2, default=str))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(f"(samples in {work / 'memory_results.json'})")
    return 0 if run["rc"] in (0, "timeout") else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000, help="comparison: how many JPEGs (default 5000)")
    ap.add_argument("--repeat", type=int, default=1, help="comparison: rounds; each tool's best is reported")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy runs")
    ap.add_argument("--pipeline-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for bench/pipeline.py (repeatable)")
    ap.add_argument("--urls", type=int, help="memory mode: a run over this many URLs (e.g. 1000000)")
    ap.add_argument("--minutes", type=float, default=0, help="memory mode: stop the run after this long")
    ap.add_argument("--fastlaion-arg", action="append", default=[], metavar="ARG",
                    help="memory mode: extra argument for `fastlaion run`")
    ap.add_argument("--keep", action="store_true", help="memory mode: keep the output folder")
    ap.add_argument("--workdir", type=Path, default=HERE / "_work")
    ap.add_argument("--wait-quiet", type=float, default=120, metavar="S",
                    help="wait up to S s for other processes to leave the CPUs idle before each run")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return memory(args) if args.urls else compare(args)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
