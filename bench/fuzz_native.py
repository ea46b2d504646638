"""Fuzz the compiled parts (fastlaion/*_native.c) under AddressSanitizer and UndefinedBehaviorSanitizer.

Not a test: run by hand, in bounded sessions (bench/README.md). Two kinds of run:

- libFuzzer harnesses (tests/fuzz/fuzz_*.c, built with clang -fsanitize=fuzzer,address,undefined),
  coverage-guided, on the entry points called directly with buffers of exactly the input's size:
    wat   extract_native.c: one inflated WARC record -> classify (header, JSON walk, page strings),
          then wat_rules under three settings
    scan  extract_native.c: a buffer of gzip members -> wat_scan with the `deflate` package's
          libdeflate, as extract_native.Scanner calls it, then wat_rules
    jpeg  jpeg_native.c: jpeg_eoi_after_scan, sanitizers only (`diff jpeg` below compares its
          answers with the Python reference)
    tok   tokenize_native.c: tok_add of the words of the input's first line, tok_encode of the rest
- differential runs in Python, with the libraries the wrappers build compiled with
  -fsanitize=address,undefined (CC set for the build, libasan preloaded into a child Python):
    extract  mutated WAT files (whirlwind, bench/extract.py's generator, tests' records: bit
             flips, cuts at structure boundaries, huge/zero/negative Content-Length, NUL bytes,
             invalid UTF-8, long lines, gzip member boundaries) through extract_to_parquet on the
             native and the Python path: same rows, same counts
    jpeg     scikit-image photographs as JPEG (baseline, progressive, restart markers, EXIF and
             ICC segments, CMYK, grey), cut and mutated: jpeg_eoi_after_scan against
             gpu_decode.jpeg_has_eoi_after_scan
    parquet  random rows (NUL, odd Unicode, empty and long cells, nulls, repeated dedup keys)
             through ParquetWriter, read back with Polars
    f16      random float16 arrays (NaN, inf, subnormal, odd shapes) against numpy
    tok      random word tables and captions through NativeWords against the C file's documented
             contract (_tok_reference; tests/test_score.py compares with open_clip itself)

    python bench/fuzz_native.py seeds                 # write the seed corpora under bench/_work/fuzz/
    python bench/fuzz_native.py build                 # the libFuzzer binaries (needs clang)
    python bench/fuzz_native.py libfuzzer wat --seconds 240 [-use_value_profile=1 ...]
    python bench/fuzz_native.py diff extract --seconds 240

Everything goes under bench/_work/fuzz/ (ignored by git). A crash leaves its input there
(crash-*, or diff-*.bin with the mismatch printed). Nothing is contacted: no network.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "_work" / "fuzz"
SHARED = REPO.parent / "shared" / "data" / "warc"
HARNESSES = ("wat", "scan", "jpeg", "tok")
SAN_FLAGS = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"


def _members(data: bytes) -> list[bytes]:
    """The gzip members of data, each inflated alone."""
    import zlib

    out = []
    while data:
        d = zlib.decompressobj(31)
        try:
            out.append(d.decompress(data))
        except zlib.error:
            break
        data = d.unused_data
    return out


def _test_records() -> list[bytes]:
    sys.path.insert(0, str(REPO / "tests"))
    import test_extract as te
    import test_extract_native as ten

    recs = list(ten._page_records(11, 120))
    recs += [te.warc_record("metadata", "https://w.example/p", d, "application/json") for d in te._wat_doc_variants()]
    recs += ten._port_and_idn_pages(5, 10)[0]
    for base in ten._BASE_HREFS[:20]:
        links = [{"path": "IMG@/src", "url": s, "alt": f"a picture under a base {k}"} for k, s in enumerate(ten._BASE_SRCS)]
        recs.append(te.wat_record("https://page.example/dir/page.html", links, base=base))
    links = [{"path": "IMG@/src", "url": s, "alt": f"dot segment picture {k}"} for k, s in enumerate(ten._DOT_SRCS)]
    recs += [te.wat_record(b, links) for b in ten._DOT_BASES]
    for name, data in te._gzip_variants().items():
        recs += _members(data)
    return recs


def _generated_records(n: int = 300) -> list[bytes]:
    sys.path.insert(0, str(REPO / "bench"))
    import extract as bench_extract

    path = WORK / "gen.warc.wat.gz"
    if not path.exists():
        bench_extract.generate_wat(path, n, seed=3)
    return _members(path.read_bytes())


def seeds() -> None:
    """Seed corpora: records for wat, gzip buffers for scan, JPEGs for jpeg, captions for tok."""
    real = [SHARED / "whirlwind.warc.wat.gz", SHARED / "whirlwind.warc.gz"]
    recs = [m for p in real if p.exists() for m in _members(p.read_bytes())]
    recs += _test_records() + _generated_records()
    recs = [r for r in recs if r]
    for name, items in (("wat", recs), ("scan", _scan_seeds(recs)), ("jpeg", [j for j, _ in _jpegs()]),
                        ("tok", _tok_seeds())):
        d = WORK / "corpus" / name
        d.mkdir(parents=True, exist_ok=True)
        for item in items:
            (d / hashlib.sha1(item).hexdigest()).write_bytes(item)
        print(f"{name}: {len(items)} seeds in {d}")


def _scan_seeds(recs: list[bytes]) -> list[bytes]:
    """Inputs of tests/fuzz/fuzz_scan.c: a flags byte, then records joined by \\x1e\\x1e (the harness
    compresses each), or flag 0x40 and a gzip stream as it is."""
    rng = random.Random(1)
    wat = SHARED / "whirlwind.warc.wat.gz"
    out = [b"\x40" + wat.read_bytes()] if wat.exists() else []
    for _ in range(60):
        pick = rng.sample(recs, min(len(recs), rng.randint(1, 4)))
        flags = rng.choice([0, 1, 2, 13, 0x20, 0x41 & 0x3f, 0x60, 0x21])
        out.append(bytes([flags]) + b"\x1e\x1e".join(pick))
    return out


def _tok_seeds() -> list[bytes]:
    words = "a photo of the cat 's dog <start_of_text> <end_of_text> don't we'll 123 !!! ?? hello-world x".split()
    rng = random.Random(2)
    return [("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(4))).encode()
            for _ in range(40)]


def _jpegs() -> list[tuple[bytes, str]]:
    """scikit-image's photographs as JPEGs of several kinds: (bytes, kind)."""
    import io

    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    out = []
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.camera(), skdata.rocket()]
    exif = Image.Exif()
    exif[0x010F] = "fuzz camera"
    exif[0x0110] = "model"
    for k, arr in enumerate(photos):
        img = Image.fromarray(np.ascontiguousarray(arr[::4, ::4]))
        icc = bytes(range(256)) * 8
        for kind, kw, mode in (("baseline", {}, None), ("progressive", {"progressive": True}, None),
                               ("restart", {"restart_marker_blocks": 1}, None),
                               ("exif-icc", {"exif": exif.tobytes(), "icc_profile": icc}, None),
                               ("cmyk", {}, "CMYK"), ("grey", {}, "L"), ("q5-420", {"quality": 5, "subsampling": 2}, None)):
            im = img.convert(mode) if mode else (img if img.mode in ("RGB", "L") else img.convert("RGB"))
            buf = io.BytesIO()
            try:
                im.save(buf, "JPEG", **kw)
            except (TypeError, ValueError, OSError):
                continue
            out.append((buf.getvalue(), f"{k}-{kind}"))
    return out


# -- libFuzzer -------------------------------------------------------------------------------------

def build() -> None:
    (WORK / "bin").mkdir(parents=True, exist_ok=True)
    for name in HARNESSES:
        src = REPO / "tests" / "fuzz" / f"fuzz_{name}.c"
        cmd = ["clang", "-O1", *SAN_FLAGS.split(), "-fsanitize=fuzzer", "-o", str(WORK / "bin" / f"fuzz_{name}"),
               str(src), "-ldl"]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)


def libfuzzer(name: str, seconds: int, extra: list[str]) -> int:
    """One bounded libFuzzer session on one core; new inputs go to corpus/<name>-new."""
    binary = WORK / "bin" / f"fuzz_{name}"
    new = WORK / "corpus" / f"{name}-new"
    new.mkdir(parents=True, exist_ok=True)
    crashes = WORK / "crashes" / name
    crashes.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:symbolize=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    if name == "scan":
        import sysconfig

        env["FUZZ_LIBDEFLATE"] = _libdeflate_path()
        env["FUZZ_LIBPYTHON"] = str(Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("LDLIBRARY"))
    cmd = [str(binary), str(new), str(WORK / "corpus" / name), f"-max_total_time={seconds}", "-rss_limit_mb=4096",
           "-max_len=262144" if name in ("wat", "scan") else "-max_len=65536", f"-artifact_prefix={crashes}/",
           "-print_final_stats=1", *extra]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


def _libdeflate_path() -> str:
    import deflate._deflate as ext

    return ext.__file__


# -- differential runs in Python -----------------------------------------------------------------

def _asan_env() -> dict:
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    libubsan = subprocess.run(["gcc", "-print-file-name=libubsan.so"], capture_output=True, text=True, check=True).stdout.strip()
    cache = WORK / "kernels-asan"
    cache.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, CC=f"gcc {SAN_FLAGS}", FASTLAION_KERNEL_CACHE=str(cache), LD_PRELOAD=f"{libasan} {libubsan}",
                ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1",
                UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", PYTHONPATH=str(REPO), FUZZ_NATIVE_CHILD="1")


def diff(target: str, seconds: float, seed: int) -> int:
    if os.environ.get("FUZZ_NATIVE_CHILD") != "1":
        cmd = [sys.executable, __file__, "diff", target, "--seconds", str(seconds), "--seed", str(seed)]
        return subprocess.run(cmd, env=_asan_env()).returncode
    fn = {"extract": diff_extract, "jpeg": diff_jpeg, "parquet": diff_parquet, "f16": diff_f16, "tok": diff_tok}[target]
    deadline = time.monotonic() + seconds
    n = fn(random.Random(seed), deadline)
    print(f"{target}: {n} inputs in {seconds:.0f} s, no sanitizer report, no mismatch")
    return 0


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four mutations of data aimed at the structure: a bit flip, a cut at or near a CR LF, a
    quote, a brace or a gzip magic, a length field set huge, zero or negative, a NUL, invalid UTF-8,
    a long run, a duplicated or dropped slice."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b = bytearray(b"{")
        op = rng.randrange(11)
        at = rng.randrange(len(b))
        if op == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 1:  # cut near a structure byte
            marks = [i for i in range(len(b)) if b[i] in b'\r\n"{}[]:,\\\x1f<>'] or [at]
            m = rng.choice(marks) + rng.randint(-2, 2)
            b = b[:max(0, m)] if rng.random() < 0.5 else b[max(0, m):]
        elif op == 2:
            b[at:at] = rng.choice([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe0\x80",
                                   b"\\u0000", b"\\ud800", b"\\udc00\\ud800", b'"', b"\\", b"\r\n\r\n", b"&amp;", b"&#"])
        elif op == 3:
            i = bytes(b).lower().find(b"content-length:")
            if i >= 0:
                j = b.find(b"\r\n", i)
                j = j if j >= 0 else len(b)
                b[i + 15:j] = rng.choice([b" 0", b" -1", b" 99999999999999", b" 18446744073709551616", b" 00012",
                                          b" 1e3", b"", b" \x00", str(rng.randint(0, 5000)).encode()]).ljust(1)
        elif op == 4:
            b[at:at] = bytes([rng.choice(b"a/\"\\ {[")]) * rng.choice([100, 5000, 70000])
        elif op == 5:
            j = min(len(b), at + rng.randint(1, 64))
            b[at:at] = b[at:j]
        elif op == 6:
            j = min(len(b), at + rng.randint(1, 64))
            del b[at:j]
        elif op == 7:
            b[at:at] = rng.choice([b'{"path":"IMG@/src","url":"', b'","alt":"', b'"Base":"', b'"Links":[',
                                   b'"Content-Language":"', b'{"http-equiv":"content-language","content":"',
                                   b'{"name":"robots","content":"noai"}', b"1e400", b"-0.0", b"123456789012345678901",
                                   b"[" * 300, b"]" * 300, b"null", b"true"])
        elif op == 8:
            b[at] = rng.randrange(256)
        elif op == 9:
            j = min(len(b), at + rng.randint(1, 32))
            b[at:j] = bytes(rng.randrange(0x20, 0x7f) for _ in range(j - at))
        else:
            b = b[:at]
    return bytes(b)


def _record_fix_length(rec: bytes) -> bytes:
    """rec with its Content-Length set to its block's length (so the mutation reaches the JSON)."""
    head, sep, rest = rec.partition(b"\r\n\r\n")
    if not sep or not rest.endswith(b"\r\n\r\n"):
        return rec
    lines = head.split(b"\r\n")
    for k, line in enumerate(lines):
        if line.lower().startswith(b"content-length:"):
            lines[k] = b"Content-Length: " + str(len(rest) - 4).encode()
    return b"\r\n".join(lines) + sep + rest


def diff_extract(rng: random.Random, deadline: float) -> int:
    import logging
    import shutil
    import tempfile

    from fastlaion import extract_native
    from fastlaion.extract import ExtractConfig

    assert extract_native.library() is not None, "the sanitized library did not build"
    recs = [m for m in (_members((SHARED / "whirlwind.warc.wat.gz").read_bytes()))]
    recs += _test_records() + _generated_records()
    recs = [r for r in recs if r]
    cfgs = [ExtractConfig(processes=1, http_backoff_s=0.0),
            ExtractConfig(processes=1, http_backoff_s=0.0, min_alt_chars=0, reject_svg=False, reject_gif=False),
            ExtractConfig(processes=1, http_backoff_s=0.0, max_host_chars=3, max_text_chars=20)]
    logging.disable(logging.WARNING)  # the notes on damaged inputs are compared, not printed
    tmp = Path(tempfile.mkdtemp(dir=WORK))
    try:
        return _diff_extract_loop(rng, deadline, recs, cfgs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _diff_extract_loop(rng: random.Random, deadline: float, recs: list[bytes], cfgs: list, tmp: Path) -> int:
    import polars as pl

    import fastlaion.extract as extract_mod
    from fastlaion.extract import extract_to_parquet

    n = 0
    while time.monotonic() < deadline:
        chosen = [recs[0]]  # a clean first record: a file that starts with junk is no WARC at all
        for _ in range(rng.randint(5, 40)):
            r = rng.choice(recs)
            if rng.random() < 0.5:
                r = _mutate(rng, r)
                if rng.random() < 0.7:
                    r = _record_fix_length(r)
            chosen.append(r)
        members = [gzip.compress(r, compresslevel=rng.choice([0, 1, 6])) for r in chosen]
        data = b"".join(members)
        if rng.random() < 0.3:  # damage at the gzip level: a member boundary, a byte, a cut
            data = _mutate(rng, data)
        cfg = rng.choice(cfgs)
        outs = []
        for use_native in (True, False):
            extract_mod._USE_NATIVE = use_native
            src = tmp / "in.warc.wat.gz"
            src.write_bytes(data)
            out = tmp / f"out-{use_native}"
            try:
                s = extract_to_parquet([str(src)], out, cfg)
                rows = pl.concat([pl.read_parquet(out / f) for f in s.files]).rows() if s.files else []
                outs.append((rows, (s.records, s.pages, s.links, s.pairs, s.pairs_after_dedup, s.rejected, s.ignored,
                                    s.skipped, s.notes)))
            except Exception as e:  # noqa: BLE001 (an error is an outcome to compare)
                outs.append(("error", type(e).__name__, str(e)[:200]))
            for f in out.glob("*"):
                f.unlink()
        n += 1
        if outs[0] != outs[1]:
            bad = WORK / f"diff-extract-{n}.bin"
            bad.write_bytes(data)
            print(f"MISMATCH on input {n} ({bad}), cfg {cfg}:\n native: {str(outs[0])[:2000]}\n python: {str(outs[1])[:2000]}")
            return n
    return n


def diff_jpeg(rng: random.Random, deadline: float) -> int:
    import ctypes

    from fastlaion import gpu_decode

    check = gpu_decode._EOI_CHECK.get()
    assert check is not None, "the sanitized jpeg library did not build"
    jpegs = [j for j, _ in _jpegs()]
    n = 0
    while time.monotonic() < deadline:
        j = rng.choice(jpegs)
        r = rng.random()
        if r < 0.3:  # cut anywhere, or right at a marker
            marks = [i for i in range(len(j) - 1) if j[i] == 0xFF and j[i + 1] not in (0, 0xFF)]
            at = rng.choice(marks) + rng.randint(-3, 4) if marks and rng.random() < 0.7 else rng.randrange(len(j) + 1)
            body = j[:max(0, at)]
        elif r < 0.5:  # a segment length set to 0, 1, 2, huge
            marks = [i for i in range(2, min(len(j), 4096) - 3) if j[i] == 0xFF and 0xC0 <= j[i + 1] <= 0xFE
                     and j[i + 1] not in (0xD8, 0xD9) and not 0xD0 <= j[i + 1] <= 0xD7]
            b = bytearray(j)
            if marks:
                i = rng.choice(marks)
                b[i + 2:i + 4] = rng.choice([0, 1, 2, 3, 0xFFFF, 0x8000, rng.randrange(65536)]).to_bytes(2, "big")
            body = bytes(b)
        else:
            body = _mutate(rng, j[: rng.choice([len(j), 64, 300, 2000])] if rng.random() < 0.3 else j)
        if rng.random() < 0.1:
            body = body[:rng.randrange(8)]
        buf = ctypes.create_string_buffer(body, len(body))  # exactly its size: ASan sees a read past it
        native = check(buf, len(body)) == 1
        ref = gpu_decode.jpeg_has_eoi_after_scan(body)
        n += 1
        if native != ref:
            bad = WORK / f"diff-jpeg-{n}.bin"
            bad.write_bytes(body)
            print(f"MISMATCH on input {n} ({bad}): native {native}, python {ref}")
            return n
    return n


def _odd_text(rng: random.Random) -> str:
    pool = ["", "a", "\x00", "é", "\U0001f600", "\u2028", " ", "&amp;", "'s", "<start_of_text>", "x" * 300, "ß",
            "\ud7ff", "\ufffd", "http://a.example/", "\t", "Ö" * 50]
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 6)))


def diff_parquet(rng: random.Random, deadline: float) -> int:
    import polars as pl

    from fastlaion import parquet_native

    assert parquet_native.available()
    n = 0
    path = WORK / "fuzz.parquet"
    while time.monotonic() < deadline:
        rows = rng.choice([0, 1, 2, 7, 8, 9, 15, 16, 17, 100, 1000])
        cols = [[None if rng.random() < 0.2 else _odd_text(rng) for _ in range(rows)] for _ in range(5)]
        if rng.random() < 0.3:  # repeated keys, for dedup
            cols[0] = [rng.choice(["a", "b", None]) for _ in range(rows)]
            cols[3] = [rng.choice(["u", "v", ""]) for _ in range(rows)]
        ints = [[None if rng.random() < 0.3 else rng.randint(-2**31, 2**31 - 1) for _ in range(rows)] for _ in range(2)]
        url, cap, purl, uid, lang = cols
        dedup = rng.choice([None, "url", "uid"])
        r = parquet_native.Rows.from_lists(url, cap, purl, uid, lang, ints[0], ints[1])
        group = rng.choice([1, 3, 8, 131072])
        with parquet_native.ParquetWriter(path, dedup=dedup, rowgroup_rows=group) as w:
            w.append(r)
        got = pl.read_parquet(path)
        frame = pl.DataFrame({"url": url, "caption": cap, "page_url": purl, "uid": uid, "width": ints[0],
                              "height": ints[1], "page_lang": lang},
                             schema={"url": pl.String, "caption": pl.String, "page_url": pl.String, "uid": pl.String,
                                     "width": pl.Int32, "height": pl.Int32, "page_lang": pl.String})
        if dedup:
            frame = frame.unique(subset=[dedup], keep="first", maintain_order=True)
        n += 1
        if got.select(frame.columns).rows() != frame.rows():
            print(f"MISMATCH on input {n}: dedup {dedup}, group {group}, {rows} rows; cols {cols}, ints {ints}")
            return n
    return n


def diff_f16(rng: random.Random, deadline: float) -> int:
    import numpy as np

    from fastlaion import f16_native

    assert f16_native.library() is not None
    n = 0
    nprng = np.random.default_rng(rng.randrange(2**32))
    while time.monotonic() < deadline:
        m, d = rng.choice([0, 1, 2, 5, 33]), rng.choice([0, 1, 7, 8, 9, 15, 16, 17, 512, 513])
        x = nprng.integers(0, 65536, size=(m, d), dtype=np.uint16).view(np.float16)
        if rng.random() < 0.5:
            x = np.where(nprng.random((m, d)) < 0.9, (nprng.standard_normal((m, d)) * 0.1).astype(np.float16), x)
        if rng.random() < 0.2 and m > 1:
            x = x[::2]  # not C-contiguous: the wrapper copies
        ok = f16_native.finite_rows(x)
        ref_ok = np.isfinite(x.astype(np.float32)).all(axis=1) if d else np.ones(x.shape[0], bool)
        for simd in (True, False):
            out, norm2 = f16_native.rows(x, simd=simd)
            ref = x.astype(np.float32)
            same = np.array_equal(out, ref, equal_nan=True)
            ref_n2 = np.einsum("ij,ij->i", ref, ref, dtype=np.float32) if d else np.zeros(x.shape[0], np.float32)
            finite = np.isfinite(ref_n2)
            close = np.allclose(norm2[finite], ref_n2[finite], rtol=1e-4, atol=1e-30) and \
                np.array_equal(np.isfinite(norm2), finite)
            if not (same and close and np.array_equal(ok, ref_ok)):
                bad = WORK / f"diff-f16-{n}.npy"
                np.save(bad, x)
                print(f"MISMATCH on input {n} ({bad}) simd={simd}: values {same}, norms {close}, finite rows "
                      f"{np.array_equal(ok, ref_ok)}")
                return n
        n += 1
    return n


def diff_tok(rng: random.Random, deadline: float) -> int:
    from fastlaion import tokenize_native

    lib = tokenize_native.library()
    assert lib is not None
    words = "a photo of the cat 's dog <start_of_text> <end_of_text> don 't we 'll 123 ! ?? hello - world x é".split()
    n = 0
    while time.monotonic() < deadline:
        table = {}
        nw = tokenize_native.NativeWords(lib, 49406, 49407)
        for w in rng.sample(words, rng.randint(0, len(words))):
            ids = tuple(rng.randint(1, 49000) for _ in range(rng.randint(1, 5)))
            if w.isascii():
                table[w] = ids
            nw.add(w, ids)
        texts = []
        for _ in range(rng.randint(0, 30)):
            t = rng.choice([" ".join(rng.choice(words + ["UPPER", "'S", "<START_OF_TEXT>", "&", "\x01", "~~"])
                                     for _ in range(rng.randint(0, 20))), _odd_text(rng)])
            texts.append(t)
        context = rng.choice([1, 2, 3, 5, 77])
        out, status = nw.encode(texts, context)
        for t, row, st in zip(texts, out, status):
            ref = _tok_reference(t, table, context)
            want = tokenize_native.ST_NOT_ASCII if ref == "ascii" else tokenize_native.ST_NEW_WORD if ref == "new" else 0
            if st != want or (st == 0 and list(row) != ref) or (st != 0 and row.any()):
                print(f"MISMATCH on input {n}: {t!r} context {context}: status {st} row {list(row)}, want {ref}")
                return n
        del nw
        n += 1
    return n


def _tok_reference(text: str, table: dict, context: int):
    """tokenize_native.c's documented contract, in Python: 'ascii', 'new', or the row."""
    import re

    b = text.encode()
    if not text.isascii() or any(c < 0x20 or c > 0x7e or c == 0x26 for c in b):
        return "ascii"
    low = text.lower()
    pat = re.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+")
    ids = [49406]
    for m in pat.finditer(low):
        if len(ids) >= context:
            break
        w = m.group()
        if w not in table:
            return "new"
        for i in table[w]:
            if len(ids) < context:
                ids.append(i)
    ids[len(ids) if len(ids) < context else context - 1:] = [49407]
    return ids + [0] * (context - len(ids))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("seeds")
    sub.add_parser("build")
    lf = sub.add_parser("libfuzzer")
    lf.add_argument("name", choices=HARNESSES)
    lf.add_argument("--seconds", type=int, default=240)
    df = sub.add_parser("diff")
    df.add_argument("target", choices=["extract", "jpeg", "parquet", "f16", "tok"])
    df.add_argument("--seconds", type=float, default=240)
    df.add_argument("--seed", type=int, default=0)
    args, extra = ap.parse_known_args()  # libfuzzer: flags it does not know go to libFuzzer (-dict=..., -jobs=...)
    if extra and args.cmd != "libfuzzer":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    WORK.mkdir(parents=True, exist_ok=True)
    if args.cmd == "seeds":
        seeds()
    elif args.cmd == "build":
        build()
    elif args.cmd == "libfuzzer":
        return libfuzzer(args.name, args.seconds, extra)
    else:
        return diff(args.target, args.seconds, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
