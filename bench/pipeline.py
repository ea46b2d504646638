#!/usr/bin/env python3
"""Download-and-resize benchmark: fastlaion against img2dataset, side by side, on loopback.

Run with the project's interpreter:

    .venv/bin/python bench/pipeline.py [--images 5000] [--workdir bench/_work] [--keep]
                                       [--only img2dataset|fastlaion]

What it does:

1. Makes (or reuses) a separate virtual environment `bench/.venv-img2dataset` with
   `img2dataset==1.47.0` (the newest that installs if that pin does not).
2. Makes N JPEGs deterministically from the photographs scikit-image ships (cropped, resized to
   320-800 px sides, a little noise and colour change so every file differs; about 150 KB each at
   quality 90-95) and caches them under the work folder, so reruns skip this step.
3. Serves them from memory with `fastlaion.server.LoopbackServer` in a separate process
   (127.0.0.1 only), so the server does not share a GIL with either tool.
4. Runs img2dataset's CLI (webdataset out, 256 px keep_ratio, 2 processes x 32 threads, 250 per
   shard, no retries) and counts its successes from its *_stats.json files.
5. Runs `fastlaion run` on the same URL list (no scoring, 256 px keep_ratio, 250 per shard) and
   counts the rows with status == 'kept' in its per-shard Parquet files.
6. Prints the machine, the command lines and a table: images ok, wall seconds, images/s and
   CPU-ms per image (getrusage of the waited-for children), and the fastlaion/img2dataset ratio.

Nothing here talks to anything but 127.0.0.1, apart from the one `pip install` into the bench
venv (package index only). img2dataset's dependencies are told not to phone home
(albumentations' update check, wandb) through environment variables.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMG2DATASET_VENV = HERE / ".venv-img2dataset"
IMG2DATASET_PIN = "1.47.0"

# Photographs that scikit-image ships inside its wheel (no download). Grey ones are turned
# into colour with a random tint so every sample is a 3-channel JPEG.
SOURCES = [
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
    "ihc.png", "retina.jpg", "motorcycle_left.png", "motorcycle_right.png",
    "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png",
    "clock_motion.png",
]

GEN_VERSION = 2  # bump when the generator changes, so cached images are remade
CAPTION_WORDS = [
    "a", "photo", "of", "the", "cat", "cup", "coffee", "astronaut", "rocket", "stars", "galaxy",
    "motorcycle", "coins", "moon", "grass", "gravel", "brick", "wall", "clock", "page", "text",
    "close-up", "view", "red", "blue", "green", "old", "new", "small", "large", "on", "in",
    "with", "and", "bright", "dark", "sunny", "night", "vintage", "studio", "outdoor", "macro",
]

QUIET_ENV = {
    # albumentations (an img2dataset dependency) asks pypi.org for its newest version at import
    # time unless told not to; wandb must stay off; nothing may leave loopback.
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "PYTHONUNBUFFERED": "1",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- img2dataset venv

def _venv_img2dataset_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    exe = venv / "bin" / "img2dataset"
    if not py.exists() or not exe.exists():
        return None
    code = ("import importlib.metadata as m, img2dataset; "
            "print(m.version('img2dataset'))")
    env = {**os.environ, **QUIET_ENV}
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return None
    return r.stdout.strip().splitlines()[-1]


def ensure_img2dataset(venv: Path = IMG2DATASET_VENV) -> str:
    """Make sure `venv` holds a working img2dataset; return its version."""
    version = _venv_img2dataset_version(venv)
    if version:
        log(f"reusing {venv.relative_to(REPO)} (img2dataset {version})")
        return version
    log(f"creating {venv.relative_to(REPO)} with the system python3 -m venv")
    if venv.exists():
        shutil.rmtree(venv)
    system_python = shutil.which("python3") or "python3"
    # The project venv's python3 would be found first on PATH if someone activated it; drop it.
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not p.startswith(str(REPO / ".venv")))
    system_python = shutil.which("python3", path=path) or system_python
    subprocess.run([system_python, "-m", "venv", str(venv)], check=True)
    install_first(venv, "img2dataset", IMG2DATASET_PIN)
    return installed_version(venv, "img2dataset", _venv_img2dataset_version)


def install_first(venv: Path, package: str, pin: str, extra: tuple[str, ...] = ()) -> None:
    """pip install `package`==`pin` (with `extra` requirements) into `venv`, else its latest;
    SystemExit naming it where neither installs (pip's last lines logged)."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    env = {**os.environ, **QUIET_ENV}
    for spec in (f"{package}=={pin}", package):
        log(f"pip install {spec} (a minute or two)")
        r = subprocess.run(pip + [spec, *extra], env=env, capture_output=True, text=True)
        if r.returncode == 0:
            return
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        log(f"pip install {spec} failed:\n{tail}")
    raise SystemExit(f"could not install {package} into the bench venv")


def installed_version(venv: Path, package: str, version_of: Callable[[Path], str | None]) -> str:
    """`package`'s version in `venv` once installed (`version_of`), or SystemExit where it does not import."""
    version = version_of(venv)
    if not version:
        raise SystemExit(f"{package} installed but does not import; see the pip output above")
    log(f"installed {package} {version}")
    return version


def img2dataset_command(url_list: Path, out: Path, input_format: str = "parquet", processes: int = 2,
                        threads: int = 32, image_size: int = 256, shard_size: int = 250,
                        venv: Path = IMG2DATASET_VENV) -> list[str]:
    """img2dataset's CLI as PEERS.md measured it: webdataset out, `image_size` px keep_ratio,
    `processes` x `threads`, `shard_size` samples per shard, timeout 10 s, no retries, wandb off."""
    cmd = [str(venv / "bin" / "img2dataset"), "--url_list", str(url_list), "--input_format", input_format]
    if input_format == "parquet":
        cmd += ["--url_col", "url", "--caption_col", "caption"]
    return cmd + ["--output_format", "webdataset", "--output_folder", str(out),
                  "--image_size", str(image_size), "--resize_mode", "keep_ratio",
                  "--processes_count", str(processes), "--thread_count", str(threads),
                  "--number_sample_per_shard", str(shard_size), "--timeout", "10", "--retries", "0",
                  "--enable_wandb", "False", "--distributor", "multiprocessing"]


def img2dataset_env(env: dict[str, str], venv: Path = IMG2DATASET_VENV) -> dict[str, str]:
    """`env` with the venv's bin first on PATH (its workers find their own tools there)."""
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


# --------------------------------------------------------------------------- images

def _load_sources():
    import numpy as np
    import skimage
    from PIL import Image

    data_dir = Path(skimage.__file__).parent / "data"
    out = []
    for name in SOURCES:
        p = data_dir / name
        if not p.exists():
            continue
        im = Image.open(p)
        im.load()
        if im.mode in ("RGBA", "P", "LA"):
            im = im.convert("RGB")
        arr = np.asarray(im)
        if arr.ndim == 2:
            arr = arr[..., None]
        out.append((name, arr[..., :3]))
    if not out:
        raise SystemExit("no scikit-image photographs found; is scikit-image installed?")
    return out


_SOURCES_CACHE = None


def _make_one(args: tuple[int, int, str]) -> int:
    """Make image `i` (same bytes for the same seed, every time) and return its size."""
    global _SOURCES_CACHE
    import numpy as np
    from PIL import Image, ImageFilter

    i, seed, path = args
    if _SOURCES_CACHE is None:
        _SOURCES_CACHE = _load_sources()
    rng = np.random.default_rng([seed, i])
    name, src = _SOURCES_CACHE[int(rng.integers(len(_SOURCES_CACHE)))]
    h, w = src.shape[:2]
    # A random crop of 45-100 % of each side, then a resize to 320-800 px sides.
    ch = int(h * rng.uniform(0.45, 1.0))
    cw = int(w * rng.uniform(0.45, 1.0))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    crop = src[y0:y0 + ch, x0:x0 + cw]
    if crop.shape[2] == 1:  # grey photograph: give it a colour tint
        tint = rng.uniform(0.6, 1.0, size=3)
        crop = (crop.astype(np.float32) * tint).clip(0, 255).astype(np.uint8)
    tw = int(rng.integers(320, 801))
    th = int(rng.integers(320, 801))
    im = Image.fromarray(np.ascontiguousarray(crop)).resize((tw, th), Image.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.15:
        im = im.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(60, 160))))
    arr = np.asarray(im, dtype=np.float32)
    # Colour gain and brightness change, then sensor-like noise (fine grain that survives
    # JPEG and keeps files near camera-photo sizes).
    arr = arr * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-20, 20)
    sigma = rng.uniform(7.0, 13.0)
    arr += rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(90, 96)))
    data = buf.getvalue()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def generate_images(img_dir: Path, n: int, seed: int) -> list[Path]:
    """Make images 0..n-1 under img_dir (reusing those already there for the same seed)."""
    img_dir.mkdir(parents=True, exist_ok=True)
    meta_path = img_dir / "meta.json"
    meta = {"gen_version": GEN_VERSION, "seed": seed}
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        log("image cache was made with other settings; remaking it")
        for p in img_dir.glob("*.jpg"):
            p.unlink()
    meta_path.write_text(json.dumps(meta))
    paths = [img_dir / f"{i:06d}.jpg" for i in range(n)]
    todo = [(i, seed, str(p)) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        log(f"generating {len(todo)} JPEGs under {img_dir} ({n - len(todo)} cached)")
        t0 = time.perf_counter()
        from multiprocessing import get_context

        with get_context("spawn").Pool(max(1, os.cpu_count() or 1)) as pool:
            for _ in pool.imap_unordered(_make_one, todo, chunksize=16):
                pass
        log(f"generated in {time.perf_counter() - t0:.1f} s")
    else:
        log(f"reusing {n} cached JPEGs under {img_dir}")
    return paths


def write_url_lists(work: Path, paths: list[Path], base_url: str, seed: int) -> dict[str, Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, 7])
    urls = [f"{base_url}/img/{p.name}" for p in paths]
    captions = [" ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(4, 12))))
                for _ in paths]
    txt = work / "urls.txt"
    txt.write_text("".join(u + "\n" for u in urls))
    parquet = work / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": captions}), parquet)
    return {"txt": txt, "parquet": parquet}


# --------------------------------------------------------------------------- server

def serve_main(img_dir: str, tls: list[str] | None = None) -> None:
    """Child-process entry: serve img_dir/*.jpg from memory until stdin closes; over HTTPS with
    `tls` = [certificate file, key file]."""
    sys.path.insert(0, str(REPO))
    from fastlaion.server import LoopbackServer, Served

    ssl_context = None
    if tls:
        import ssl

        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(tls[0], tls[1])

    files = {f"img/{p.name}": Served(p.read_bytes(), "image/jpeg")
             for p in sorted(Path(img_dir).glob("*.jpg"))}
    total = sum(len(s.body) for s in files.values())
    try:  # uvloop if the project has it, as fastlaion itself would
        import asyncio

        import uvloop  # type: ignore

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except Exception:
        pass
    with LoopbackServer(files, ssl_context=ssl_context) as srv:
        print(json.dumps({"port": srv.port, "files": len(files), "bytes": total}), flush=True)
        for line in sys.stdin:  # commands from the parent, one a line
            if line.strip() == "count":
                ru = resource.getrusage(resource.RUSAGE_SELF)
                print(json.dumps({"requests": srv.requests,
                                  "cpu_s": ru.ru_utime + ru.ru_stime}), flush=True)
        # stdin closed: the parent is done (or gone)


class ServerProcess:
    def __init__(self, img_dir: Path, tls: tuple[Path, Path] | None = None):
        """The loopback server in a process of its own; HTTPS with tls = (certificate, key)."""
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(img_dir)]
            + (["--serve-tls", str(tls[0]), str(tls[1])] if tls else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, **QUIET_ENV})
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("loopback server process did not start")
        info = json.loads(line)
        self.port = info["port"]
        self.files = info["files"]
        self.bytes = info["bytes"]
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def counters(self) -> tuple[int, float]:
        """(requests answered, CPU seconds used) by the server so far."""
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        c = json.loads(self.proc.stdout.readline())
        return c["requests"], c["cpu_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- running a tool

def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs that was busy over the next `seconds` (0..1)."""
    try:
        b0, t0 = _cpu_ticks()
        time.sleep(seconds)
        b1, t1 = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (b1 - b0) / max(1, t1 - t0)


def wait_until_quiet(max_wait_s: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait_s) until other work uses under `threshold` of the CPUs."""
    t0 = time.perf_counter()
    busy = busy_fraction(2.0)
    if busy >= threshold and max_wait_s > 0:
        log(f"  other processes keep {100 * busy:.0f} % of the CPUs busy; waiting up to "
            f"{max_wait_s:.0f} s for a quiet machine")
        while busy >= threshold and time.perf_counter() - t0 < max_wait_s:
            busy = busy_fraction(5.0)
    return busy


def run_timed(cmd: list[str], log_path: Path, timeout_s: float, env: dict,
              wait_quiet_s: float = 0, requests: Callable[[], int] | None = None,
              stall_s: float = 0) -> dict:
    """Run cmd in its own process group; return wall seconds, CPU seconds and the exit code.

    With `requests` (the server's request counter) and `stall_s`, a run that makes no request
    for stall_s seconds while it has not exited is killed and reported as stalled.
    """
    busy = wait_until_quiet(wait_quiet_s)
    la = os.getloadavg()[0]
    log(f"running: {' '.join(cmd)}")
    log(f"  (CPUs busy with other work just before: {100 * busy:.0f} %; "
        f"output in {log_path})")
    cpu0 = children_cpu_s()
    busy0, _ = _cpu_ticks()
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(REPO), start_new_session=True)
        rc: int | str | None = None
        last_n, last_change = -1, time.perf_counter()
        while rc is None:
            try:
                rc = proc.wait(2.0)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.perf_counter()
            if requests is not None and stall_s > 0:
                n_req = requests()
                if n_req != last_n:
                    last_n, last_change = n_req, now
                elif now - last_change > stall_s:
                    log(f"  STALLED: no request for {stall_s:.0f} s (after {n_req} requests) "
                        "and still running; killing its process group")
                    rc = f"stalled after {n_req} requests"
            if rc is None and now - t0 > timeout_s:
                log(f"  timed out after {timeout_s:.0f} s; killing its process group")
                rc = "timeout"
            if rc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - t0
    cpu = children_cpu_s() - cpu0
    # Everything the machine's CPUs did during the run (the tool, the server, anything else).
    machine_cpu = (_cpu_ticks()[0] - busy0) / os.sysconf("SC_CLK_TCK")
    others = busy_fraction(0.5)  # a rough look at whether anything else kept running
    # Reap stragglers the tool may have left in its group (multiprocessing workers).
    try:
        os.killpg(proc.pid, 0)
        left = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and os.getpgid(int(d.name)) == proc.pid:
                    args_ = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
                    if args_.strip():  # an empty command line is a zombie being reaped
                        left.append(f"{d.name} {args_.strip()}")
            except (OSError, ProcessLookupError):
                pass
        if left:
            log(f"  note: {len(left)} processes of the run were still alive after it exited; "
                f"killing them: {'; '.join(left)[:300]}")
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log(f"  exit {rc}, {wall:.1f} s wall, {cpu:.1f} s CPU (children)")
    return {"rc": rc, "wall_s": wall, "cpu_s": cpu, "load_before": la, "busy_before": busy,
            "busy_after": others, "machine_cpu_s": machine_cpu}


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def count_img2dataset(out: Path) -> dict:
    ok = tried = 0
    starts, ends = [], []
    errors: dict[str, int] = {}
    for p in sorted(out.glob("*_stats.json")):
        s = json.loads(p.read_text())
        ok += int(s.get("successes", 0))
        tried += int(s.get("count", 0))
        if "start_time" in s and "end_time" in s:
            starts.append(float(s["start_time"]))
            ends.append(float(s["end_time"]))
        for k, v in (s.get("status_dict") or {}).items():
            if k != "success":
                errors[k] = errors.get(k, 0) + int(v)
    span = (max(ends) - min(starts)) if starts else None
    return {"ok": ok, "tried": tried, "span_s": span, "errors": errors,
            "shards": len(list(out.glob("*.tar")))}


def count_fastlaion(out: Path) -> dict:
    import pyarrow.parquet as pq

    ok = tried = 0
    errors: dict[str, int] = {}
    parquets = sorted(p for p in out.glob("*.parquet") if re.fullmatch(r"\d+\.parquet", p.name))
    for p in parquets:
        t = pq.read_table(p)
        if "status" not in t.column_names:
            continue
        for status in t.column("status").to_pylist():
            tried += 1
            if status == "kept":
                ok += 1
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1
    source = "parquet"
    if not parquets or tried == 0:  # fall back on the stats files
        source = "stats.json"
        for p in sorted(out.glob("*_stats.json")):
            s = json.loads(p.read_text())
            ok += int(s.get("kept", s.get("successes", 0)))
            tried += int(s.get("count", s.get("total", 0)))
    return {"ok": ok, "tried": tried, "span_s": None, "errors": errors, "source": source,
            "shards": len(list(out.glob("*.tar")))}


def fastlaion_version(exe: Path | None = None) -> str:
    """The version of the fastlaion that `exe` (a venv's console script) or, by default, this
    interpreter runs, with this checkout's commit."""
    python = str(exe.parent / "python") if exe is not None else sys.executable
    r = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('fastlaion'))"],
                       capture_output=True, text=True)
    v = r.stdout.strip() if r.returncode == 0 else "?"
    g = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    if g.returncode == 0 and g.stdout.strip():
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True).stdout.strip()
        v += f" ({g.stdout.strip()}{'+dirty' if dirty else ''})"
    else:
        v += " (no commit yet)"
    return v


# --------------------------------------------------------------------------- report

def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": model, "memory": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000, help="how many JPEGs (default 5000)")
    ap.add_argument("--workdir", type=Path, default=HERE / "_work",
                    help="images, URL lists, outputs and logs (default bench/_work)")
    ap.add_argument("--keep", action="store_true",
                    help="keep both tools' output folders (default: delete after counting)")
    ap.add_argument("--only", choices=["img2dataset", "fastlaion"], help="run one side only")
    ap.add_argument("--seed", type=int, default=0, help="image generator seed (default 0)")
    ap.add_argument("--input-format", choices=["parquet", "txt"], default="parquet",
                    help="URL list given to both tools (default parquet, with captions)")
    ap.add_argument("--processes", type=int, default=2, help="img2dataset --processes_count")
    ap.add_argument("--threads", type=int, default=32, help="img2dataset --thread_count")
    ap.add_argument("--fastlaion-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `fastlaion run` (repeatable, e.g. "
                         "--fastlaion-arg=--workers=128)")
    ap.add_argument("--run-timeout", type=float, default=1800,
                    help="kill a tool run after this many seconds (default 1800)")
    ap.add_argument("--stall-timeout", type=float, default=120, metavar="S",
                    help="kill a tool that has made no request for S seconds but has not "
                         "exited (default 120; 0 to never)")
    ap.add_argument("--wait-quiet", type=float, default=120, metavar="S",
                    help="before each run, wait up to S seconds for other processes to leave "
                         "the CPUs idle (default 120; 0 to not wait)")
    ap.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--serve-tls", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.serve:
        serve_main(args.serve, args.serve_tls)
        return 0

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    n = args.images
    results: list[dict] = []
    commands: list[str] = []

    i2d_version = None
    if args.only != "fastlaion":
        i2d_version = ensure_img2dataset()
        log(f"img2dataset version: {i2d_version}")

    paths = generate_images(work / "images", n, args.seed)
    sizes = [p.stat().st_size for p in paths]
    dims = []
    from PIL import Image

    for p in paths[:: max(1, n // 500)]:
        with Image.open(p) as im:
            dims.append(im.size)
    avg_kb = sum(sizes) / len(sizes) / 1000
    log(f"{n} JPEGs, {sum(sizes) / 1e6:.1f} MB, average {avg_kb:.0f} KB "
        f"(min {min(sizes) / 1000:.0f}, max {max(sizes) / 1000:.0f}); sides "
        f"{min(min(d) for d in dims)}-{max(max(d) for d in dims)} px (sampled)")

    server = ServerProcess(work / "images")
    log(f"loopback server pid {server.proc.pid} on {server.base_url} "
        f"({server.files} files in memory)")
    try:
        # Serve only the first n (the cache may hold more from an earlier, larger run).
        lists = write_url_lists(work, paths, server.base_url, args.seed)
        url_list = lists[args.input_format]
        env = {**os.environ, **QUIET_ENV}

        def measure(cmd: list[str], log_path: Path, run_env: dict[str, str]) -> dict:
            """Run one tool, timed, with the server's requests and CPU over the run apart."""
            r0, s0 = server.counters()
            run = run_timed(cmd, log_path, args.run_timeout, run_env, args.wait_quiet,
                            lambda: server.counters()[0] - r0, args.stall_timeout)
            r1, s1 = server.counters()
            run["requests"], run["server_cpu_s"] = r1 - r0, s1 - s0
            run["other_cpu_s"] = max(0.0, run["machine_cpu_s"] - run["cpu_s"] - run["server_cpu_s"])
            return run

        if args.only != "fastlaion":
            out = work / "out-img2dataset"
            shutil.rmtree(out, ignore_errors=True)
            cmd = img2dataset_command(url_list, out, args.input_format, args.processes, args.threads)
            run = measure(cmd, work / "img2dataset.log", img2dataset_env(env))
            c = count_img2dataset(out)
            commands.append(" ".join(cmd))
            results.append({"tool": "img2dataset", "version": i2d_version, **run, **c})
            if run["rc"] != 0:
                log(f"img2dataset exited {run['rc']}; last lines of its log:\n"
                    f"{tail(work / 'img2dataset.log')}")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)

        if args.only != "img2dataset":
            out = work / "out-fastlaion"
            shutil.rmtree(out, ignore_errors=True)
            # this interpreter, from the repository root (run_timed's cwd): this checkout's fastlaion
            cmd = [sys.executable, "-m", "fastlaion", "run", str(url_list), "-o", str(out),
                   "--input-format", args.input_format, "--no-score",
                   "--image-size", "256", "--resize-mode", "keep_ratio",
                   "--shard-size", "250", "--timeout", "10", "--retries", "0", "--no-progress",
                   # one loopback host serves everything: no per-host cap, as img2dataset has none
                   "--allow-private-networks", "--per-host", "1000", *args.fastlaion_arg]
            run = measure(cmd, work / "fastlaion.log", env)
            c = count_fastlaion(out) if out.exists() else {"ok": 0, "tried": 0, "errors": {},
                                                         "span_s": None, "shards": 0}
            commands.append(" ".join(cmd))
            results.append({"tool": "fastlaion", "version": fastlaion_version(), **run, **c})
            if run["rc"] != 0:
                log(f"fastlaion exited {run['rc']}; last lines of its log:\n"
                    f"{tail(work / 'fastlaion.log', 40)}")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        server.close()

    # ---- report
    m = machine_info()
    for r in results:
        r["img_s"] = r["ok"] / r["wall_s"] if r["wall_s"] > 0 else 0.0
        r["cpu_ms_per_img"] = 1000 * r["cpu_s"] / r["ok"] if r["ok"] else float("nan")

    print()
    print("=" * 78)
    print(f"machine: {m['nproc']} CPUs usable (nproc; {m['cpu_count']} online), {m['cpu_model']}, "
          f"{m['memory']} RAM, Linux {m['kernel']}, Python {m['python']}")
    print(f"date:    {m['date']}")
    print(f"data:    {n} JPEGs, average {avg_kb:.0f} KB, sides 320-800 px (seed {args.seed}), "
          f"{args.input_format} URL list, served from memory by a separate process on "
          f"127.0.0.1")
    print("commands:")
    for c in commands:
        print(f"  {c}")
    print()
    print("| tool | version | images ok | wall s | images/s | CPU-ms per image |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tool']} | {r['version']} | {r['ok']} / {n} | {r['wall_s']:.1f} | "
              f"{r['img_s']:.0f} | {r['cpu_ms_per_img']:.1f} |")
    by = {r["tool"]: r for r in results}
    if "img2dataset" in by and "fastlaion" in by and by["img2dataset"]["img_s"] > 0:
        ratio = by["fastlaion"]["img_s"] / by["img2dataset"]["img_s"]
        print(f"\nfastlaion / img2dataset, images/s: {ratio:.2f}x")
    print()
    for r in results:
        extra = [f"server answered {r['requests']} requests using {r['server_cpu_s']:.1f} "
                 "CPU-s (not in the table)",
                 f"{r['shards']} tar shards",
                 f"other processes used {r['other_cpu_s']:.1f} CPU-s during the run "
                 f"({100 * r['other_cpu_s'] / max(1e-9, r['wall_s'] * (m['nproc'] or 1)):.0f} % "
                 "of the machine)"]
        if r.get("span_s"):
            extra.append(f"own stats span {r['span_s']:.1f} s -> "
                         f"{r['ok'] / r['span_s']:.0f} img/s excluding start-up")
        if r.get("errors"):
            extra.append("not ok: " + ", ".join(f"{k}: {v}" for k, v in
                                                 sorted(r["errors"].items(),
                                                        key=lambda kv: -kv[1])[:5]))
        print(f"{r['tool']}: " + "; ".join(extra))
    warned = False
    for r in results:
        if r["rc"] != 0:
            print(f"\n!!! WARNING: {r['tool']} exited with {r['rc']}; "
                  f"see {work / (r['tool'] + '.log')}")
            warned = True
        if r["ok"] < 0.98 * n:
            print(f"\n!!! WARNING: {r['tool']} got only {r['ok']} of {n} images "
                  f"({100 * r['ok'] / n:.1f} %); its images/s is not comparable")
            warned = True
    if any(r["other_cpu_s"] > 0.1 * r["wall_s"] * (m["nproc"] or 1) for r in results):
        print("\n!!! note: other processes were using the CPUs around the runs; "
              "rerun on a quiet machine before quoting these figures")
    (work / "results.json").write_text(json.dumps(
        {"machine": m, "images": n, "avg_kb": avg_kb, "commands": commands,
         "results": results}, indent=2, default=str))
    print(f"\n(results also in {work / 'results.json'})")
    return 1 if warned else 0


if __name__ == "__main__":
    sys.exit(main())
