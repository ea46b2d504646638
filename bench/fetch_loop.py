#!/usr/bin/env python3
"""The download loop's own CPU per request: fastlaion's Downloader + download_all against a plain
aiohttp loop, on the same loopback server and URLs, in one process, rounds alternated.

On a GPU box the image work leaves the host (#7), and what each worker's one Python process
spends per sample on HTTP is what caps how fast it can feed its GPU (session 14: a whole run did
about 1,000 samples/s past the models' loading against 5,200 for decode + score alone). This
measures that part alone: no decode, no writing, nothing but fetching bodies into memory.

- peer: `aiohttp.ClientSession.get` + `read()` from 64 coroutines over one TCPConnector(limit=64),
  no timeouts beyond aiohttp's default, no checks: the least an aiohttp downloader does (it would
  hang on a silent server, follow redirects into private networks, and read any size of body);
- fastlaion: `Downloader` with the settings `fastlaion run` uses (its deadline over all hops,
  connect and read timeouts, per-host slots, the byte cap, opt-out headers, the address guard
  off for loopback), fed by `download_all` with 64 workers.

The figure is client CPU (this process's user + system time) per request; the server runs in
its own process (bench/pipeline.py's, the JPEGs of its generator) and its CPU is apart.
Each fastlaion checkout runs in a child process of its own that fetches 200 URLs before its
measured round (this one, and with `--compare PATH` a second, e.g. a `git worktree` of an older
commit, in the same rounds, to measure a change before and after); the peer runs in this process,
warmed by the rounds before.

    .venv/bin/python bench/fetch_loop.py [--requests 3000] [--rounds 5] [--compare PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/pipeline.py; fastlaion itself as installed, or from PYTHONPATH

WORKERS = 64


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


CERT_ENV = "FETCH_LOOP_CERT"  # the loopback server's certificate (--tls), for the children
HOSTS_SUFFIX = ".fetch.test"  # --hosts: h0.fetch.test ... all 127.0.0.1, through LoopbackResolver


def loopback_resolver():
    """Every name to 127.0.0.1 (--hosts: a host a request, as a crawl of many sites; nothing is
    ever looked up)."""
    import socket

    from aiohttp.abc import AbstractResolver

    class LoopbackResolver(AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
            return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                     "proto": 0, "flags": socket.AI_NUMERICHOST}]

        async def close(self) -> None:
            pass

    return LoopbackResolver()


async def plain_aiohttp(urls: list[str]) -> int:
    import ssl

    import aiohttp

    ok = 0
    cert = os.environ.get(CERT_ENV)
    tls = ssl.create_default_context(cafile=cert) if cert else True
    connector = aiohttp.TCPConnector(limit=WORKERS, ssl=tls, resolver=loopback_resolver())
    async with aiohttp.ClientSession(connector=connector) as session:
        todo = iter(urls)

        async def worker() -> None:
            nonlocal ok
            for url in todo:
                async with session.get(url) as resp:
                    body = await resp.read()
                ok += resp.status == 200 and len(body) > 0

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return ok


async def fastlaion_loop(urls: list[str]) -> int:
    from fastlaion.config import DownloadConfig
    from fastlaion.download import Downloader, download_all

    ok = 0

    async def on_result(_key: int, fetched) -> None:
        nonlocal ok
        ok += fetched.ok

    cfg = DownloadConfig(allow_private_networks=True, per_host=1000, retries=0, workers=WORKERS)
    async with Downloader(cfg, resolver=loopback_resolver()) as downloader:  # its TLS: SSL_CERT_FILE
        await download_all(downloader, enumerate(urls), WORKERS, on_result)
    return ok


WARM_UP = 200  # requests a child makes before the measured round (imports, first calls, the first loop)


def one_round(name: str, urls: list[str], checkout: str | None) -> dict:
    """One side: the peer in this process (warmed by the rounds before), a fastlaion checkout in
    a child process of its own, which fetches WARM_UP URLs before the measured round, so both
    checkouts are measured alike."""
    if checkout is not None:
        cert = os.environ.get(CERT_ENV)
        out = subprocess.run([sys.executable, __file__, "--child", "--urls-from", "-"],
                             input="\n".join(urls), capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": checkout, **({"SSL_CERT_FILE": cert} if cert else {})})
        return {"name": name, **parse_child(out.stdout)}
    from fastlaion.download import new_event_loop

    run = plain_aiohttp if name == "aiohttp" else fastlaion_loop
    loop = new_event_loop()
    if name != "aiohttp":
        loop.run_until_complete(run(urls[:WARM_UP]))
    c0, t0 = cpu_s(), time.perf_counter()
    ok = loop.run_until_complete(run(urls))
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    loop.close()
    if ok != len(urls):
        raise SystemExit(f"{name}: {ok} of {len(urls)} requests succeeded")
    return {"name": name, "wall_s": wall, "cpu_s": cpu, "n": len(urls)}


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed RSA-2048 certificate for 127.0.0.1 and *.fetch.test (the usual key of web
    servers), made once with openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not (cert.exists() and key.exists()):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "3650", "-subj", "/CN=fetch.test", "-addext",
                        f"subjectAltName=IP:127.0.0.1,DNS:*{HOSTS_SUFFIX}"], check=True, capture_output=True)
    return cert, key


def parse_child(text: str) -> dict:
    wall, cpu, n = text.split()[-3:]
    return {"wall_s": float(wall), "cpu_s": float(cpu), "n": int(n)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="URLs per round (default 3000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each side, alternated (default 5)")
    ap.add_argument("--compare", metavar="PATH", help="another fastlaion checkout to run in the same rounds")
    ap.add_argument("--workdir", type=Path, default=HERE / "_work", help="where the JPEGs are made (bench/_work)")
    ap.add_argument("--tls", action="store_true",
                    help="HTTPS: the server with a self-signed RSA-2048 certificate made here (openssl), "
                         "which the clients trust")
    ap.add_argument("--hosts", type=int, default=0, metavar="N",
                    help="spread the URLs over N host names (all 127.0.0.1): with N >= --requests each "
                         "request opens its own connection (and TLS handshake), as a crawl of many sites "
                         "does; 0 (default): all to 127.0.0.1, connections kept alive")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--urls-from", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:  # one fastlaion round on the checkout PYTHONPATH names
        urls = sys.stdin.read().split("\n")
        r = one_round("fastlaion", urls, None)
        print(r["wall_s"], r["cpu_s"], r["n"])
        return 0

    pipeline = importlib.import_module("pipeline")  # bench/pipeline.py: the JPEGs and their server
    paths = pipeline.generate_images(args.workdir / "images", args.requests, 0)
    tls = make_certificate(args.workdir / "tls") if args.tls else None
    if tls:
        os.environ[CERT_ENV] = str(tls[0])
    server = pipeline.ServerProcess(args.workdir / "images", tls=tls)
    scheme = "https" if tls else "http"
    if args.hosts:
        urls = [f"{scheme}://h{i % args.hosts}{HOSTS_SUFFIX}:{server.port}/img/{p.name}" for i, p in enumerate(paths)]
    else:
        urls = [f"{server.base_url}/img/{p.name}" for p in paths]
    here = str(Path(__file__).resolve().parent.parent)  # this checkout, in a child like --compare's
    sides = [("aiohttp", None), ("fastlaion", here)] + ([("compare", args.compare)] if args.compare else [])
    results: dict[str, list[dict]] = {name: [] for name, _ in sides}
    server_cpu: dict[str, float] = {name: 0.0 for name, _ in sides}
    served: dict[str, int] = {name: 0 for name, _ in sides}
    try:
        for _ in range(args.rounds):
            for name, checkout in sides:
                r0, s0 = server.counters()
                results[name].append(one_round(name, urls, checkout))
                r1, s1 = server.counters()
                if r1 - r0 != len(urls) + (WARM_UP if checkout else 0):
                    raise SystemExit(f"{name}: the server answered {r1 - r0} requests, {len(urls)} expected")
                server_cpu[name] += s1 - s0
                served[name] += r1 - r0
    finally:
        server.close()

    def per_request_ms(name: str) -> float:
        return statistics.median(1e3 * r["cpu_s"] / r["n"] for r in results[name])

    def rate(name: str) -> float:
        return statistics.median(r["n"] / r["wall_s"] for r in results[name])

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.requests} requests a round, {args.rounds} rounds, "
          f"{WORKERS} coroutines, loopback server in its own process; "
          f"{'HTTPS (RSA-2048)' if tls else 'HTTP'}, "
          f"{f'{args.hosts:,} host names' if args.hosts else 'one host, connections kept alive'}")
    print(f"{'side':>10} | client CPU-ms/request (median; each round) | requests/s | server CPU-ms/request")
    for name, _ in sides:
        each = " ".join(f"{1e3 * r['cpu_s'] / r['n']:.3f}" for r in results[name])
        print(f"{name:>10} | {per_request_ms(name):.3f} ({each}) | {rate(name):,.0f} | "
              f"{1e3 * server_cpu[name] / served[name]:.3f}")
    ratio = per_request_ms("aiohttp") / per_request_ms("fastlaion")
    print(f"fastlaion / plain aiohttp, CPU per request: {1 / ratio:.2f}x the peer's "
          f"(its guarantees' cost: {per_request_ms('fastlaion') - per_request_ms('aiohttp'):.3f} ms a request)")
    if args.compare:
        print(f"this checkout / {args.compare}: {per_request_ms('compare') / per_request_ms('fastlaion'):.2f}x "
              "less CPU per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
