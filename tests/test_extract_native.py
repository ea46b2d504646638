"""The compiled WAT path (fastlaion/extract_native.c) against the Python path it stands in for:
the same rows in the same order and the same counts, on clean, odd and damaged inputs; and the
Python path when no compiler (or no working one) is there."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from test_extract import (
    ONE,
    PAGE,
    RULE_LINKS,
    SHARED_WARC,
    _gzip_variants,
    _random_pages,
    _wat_doc_variants,
    gz,
    img,
    ending,
    rule_wat,
    three_wat_records,
    use_wat_path,
    warc_record,
    wat_record,
    wat_request_record,
)

import fastlaion.extract as extract_mod
import fastlaion.extract_native as native
from fastlaion.extract import ExtractConfig, extract_to_parquet, uid_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_library(native_library):
    """Each test builds (or finds) the library in one cache folder for this session (conftest)."""


def _need_native() -> None:
    if native._compiler() is None:
        pytest.skip("no C compiler: the native path cannot be built here")
    assert native.library() is not None, "a compiler is there but the library did not build"


class _Spy:
    """Counts what the native scanner decided, by kind, over a run."""

    def __init__(self, monkeypatch):
        self.kinds: dict[int, int] = {}
        take = native.Scanner.take

        def counted(scanner):
            batch = take(scanner)
            if batch is not None:
                for kind, _ in batch.members():
                    self.kinds[kind] = self.kinds.get(kind, 0) + 1
            return batch
        monkeypatch.setattr(native.Scanner, "take", counted)

    def decided(self) -> int:
        return sum(n for k, n in self.kinds.items() if k not in (native.K_DEFER, native.K_EMPTY))


def _run(tmp_path: Path, data: bytes, use_native: bool, monkeypatch, cfg: ExtractConfig = ONE, name: str = "in.wat.gz"):
    monkeypatch.setattr(extract_mod, "_USE_NATIVE", use_native)
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / f"out-{use_native}"
    s = extract_to_parquet([str(src)], out, cfg)
    table = pl.concat([pl.read_parquet(out / f) for f in s.files])
    counts = (s.records, s.pages, s.links, s.pairs, s.pairs_after_dedup, s.rejected, s.ignored, s.skipped, s.notes)
    return table, counts


def _same_both_ways(tmp_path, data: bytes, monkeypatch, cfg: ExtractConfig = ONE, name: str = "in.wat.gz") -> _Spy:
    _need_native()
    ref_table, ref_counts = _run(tmp_path, data, False, monkeypatch, cfg, name)
    spy = _Spy(monkeypatch)
    table, counts = _run(tmp_path, data, True, monkeypatch, cfg, name)
    assert counts == ref_counts
    assert table.rows() == ref_table.rows()  # same rows, same order, every column (uid too)
    return spy


def _page_records(seed: int, n_pages: int) -> list[bytes]:
    """WAT records for _random_pages: odd srcs and alts, bases, languages."""
    recs = [warc_record("warcinfo", "", b"software: test\r\n", "application/warc-fields")]
    for i, (page_url, base, srcs, alts, lang) in enumerate(_random_pages(seed, n_pages)):
        links = []
        for s, a in zip(srcs, alts):
            link = {"path": "IMG@/src"}
            if s is not None:
                link["url"] = s
            if a is not None:
                link["alt"] = a
            links.append(link)
            if i % 3 == 0:
                links.append({"path": "A@/href", "url": "/other", "text": "x"})
        headers = {"Content-Type": "text/html", **({"Content-Language": lang} if lang else {})}
        rec = wat_record(page_url or f"https://empty.example/{i}", links, base=base, http_headers=headers)
        if i % 4 == 0:  # raw UTF-8 instead of \u escapes
            _, _, rest = rec.partition(b"\r\n\r\n")
            doc = json.loads(rest[:-4])
            body = json.dumps(doc, ensure_ascii=False).encode()
            rec = warc_record("metadata", page_url or f"https://empty.example/{i}", body, "application/json")
        recs.append(rec)
        if i % 5 == 0:
            recs.append(wat_request_record(page_url or "https://r.example/"))
    return recs


# ---------------------------------------------------------------------------------------------
# Whole inputs: native against Python


@pytest.mark.parametrize("cfg", [
    ONE,
    ExtractConfig(processes=1, min_alt_chars=0, reject_svg=False, reject_gif=False),
    ExtractConfig(processes=1, max_host_chars=3, max_text_chars=20),
    ExtractConfig(processes=1, max_host_chars=1, min_alt_chars=1),
], ids=["laion", "keep-all", "short-limits", "tiny-host"])
def test_random_pages_match(tmp_path, monkeypatch, cfg):
    """extract_vec's test cases (odd srcs, alts and bases), as whole WAT files: the C walk and
    the C link rules against the Python path, pair for pair and count for count."""
    spy = _same_both_ways(tmp_path, gz(_page_records(11, 700)), monkeypatch, cfg)
    assert spy.kinds.get(native.K_PAGE, 0) > 500  # the C path decided most pages itself


@pytest.mark.parametrize("data", ["odd-pages", "bench-generator"])
def test_c_rules_decide_most_links_themselves(tmp_path, monkeypatch, data):
    """The comparisons mean something only if the C rules settle links: count the links they
    hand to the reference (the odd test pages are made of hard cases; the bench's realistic
    ones are not)."""
    _need_native()
    handed: list[int] = []
    run = native.Rules.run

    def counted(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        handed.append(len(out.hard))
        handed.append(-len(out.rows) - sum(out.reasons))
        return out
    monkeypatch.setattr(native.Rules, "run", counted)
    if data == "odd-pages":
        _run(tmp_path, gz(_page_records(11, 700)), True, monkeypatch)
    else:
        wat = tmp_path / "gen.warc.wat.gz"
        _bench_generator().generate_wat(wat, 1500, seed=5)
        _run(tmp_path, wat.read_bytes(), True, monkeypatch)
    hard, settled = sum(h for h in handed if h > 0), -sum(h for h in handed if h < 0)
    assert settled > (1 if data == "odd-pages" else 15) * hard > 0, (settled, hard)


# (host as one of its spellings, host as WHATWG writes it, None where WHATWG's host parser fails:
# invalid_url): plain, IDN (punycode written or not), percent-encoded (decoded first, as WHATWG's
# host parser does), "xn--" labels that are not punycode of a valid label (an ASCII host's are
# lower-cased unchecked, as Chromium does and the URL Standard since whatwg/url#914; a non-ASCII
# host's are checked). Written by hand; those with a '%' or an "xn--" label checked against
# Node's URL (WHATWG's parser, which refuses the ASCII ones too) and Chromium's.
_FOLD_HOSTS = [("img.example.com", "img.example.com"), ("bücher.example", "xn--bcher-kva.example"),
               ("xn--bcher-kva.example", "xn--bcher-kva.example"), ("straße.de", "xn--strae-oqa.de"),
               ("[::1]", "[::1]"),
               # hosts idna refuses ('_', an emoji, a leading '-'), in punycode label by label as
               # browsers write them; U+1F4A9 is "ls8h" (RFC 3492, test_extract.py's fold_case test)
               ("my_host.bücher.example", "my_host.xn--bcher-kva.example"), ("💩.la", "xn--ls8h.la"),
               ("-x.bücher.de", "-x.xn--bcher-kva.de"),
               ("%69mg.example.com", "img.example.com"), ("img%2eexample%2Ecom", "img.example.com"),
               ("b%C3%BCcher.example", "xn--bcher-kva.example"), ("%E5%85%AC%E5%8F%B8.cn", "xn--55qx5d.cn"),
               ("xn--55qx5d.cn", "xn--55qx5d.cn"),
               ("my%5Fhost.b%C3%BCcher.example", "my_host.xn--bcher-kva.example"),  # decoded, then as above
               ("%FF.example", None), ("a%25b.example", None), ("a%2Fb.example", None), ("a%zz.example", None),
               ("%E2%80%8D.example", None),  # a lone zero width joiner (CheckJoiners)
               ("xn--a.example", "xn--a.example"), ("xn--zz.example", "xn--zz.example"),
               ("xn--abc-.example", "xn--abc-.example"), ("a.xn--.example", "a.xn--.example"),
               ("xn--1ug.example", "xn--1ug.example"),  # punycode of that joiner
               ("xn--a.bücher.example", None), ("xn--1ug.bücher.example", None),  # not ASCII: checked
               # IPv4 addresses (WHATWG's IPv4 parser, by hand): dotted decimal, other spellings, none
               ("127.0.0.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("2130706433", "127.0.0.1"),
               ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("%31%32%37.1", "127.0.0.1"),
               ("0xc0.0250.01.", "192.168.0.1"), ("1.2.3.4.5", None), ("0x100000000", None), ("999.1.1.1", None),
               ("example.1", None)]
# the hosts above the C rules leave to the reference though they are printable ASCII without '%':
# an IPv4 address not in dotted decimal, or no address
_IPV4_ELSE = {"0x7f.1", "2130706433", "0177.0.0.1", "127.1", "0xc0.0250.01.", "1.2.3.4.5", "0x100000000",
              "999.1.1.1", "example.1"}


def _spelled(rng: random.Random, text: str) -> str:
    """text with some letters in upper case (not 'ß', whose upper case is "SS": another host)"""
    return "".join(c.upper() if rng.random() < 0.4 and len(c.upper()) == 1 else c for c in text)


def _port_and_idn_pages(seed: int, n_pages: int) -> tuple[list[bytes], set[tuple[str, str]], int, int]:
    """WAT records whose links spell a few URLs many ways (scheme and host case, a default, empty
    or zero-padded port, an IDN host in Unicode, punycode or percent-encoded UTF-8), absolute or
    relative to a page URL so spelled; the (url, alt) pairs they must come to, written by hand,
    not by fold_case; the number of links whose host WHATWG refuses (invalid_url); and the
    number the C rules decide themselves (a printable ASCII host without '%')."""
    rng = random.Random(seed)
    recs, expected, refused, in_c = [], set(), 0, 0
    for i in range(n_pages):
        links = []
        for _ in range(rng.randint(5, 25)):
            scheme = rng.choice(["http", "https"])
            host, folded = rng.choice(_FOLD_HOSTS)
            default = "80" if scheme == "http" else "443"
            port, port_folded = rng.choice([("", ""), (":", ""), (f":{default}", ""), (f":00{default}", ""),
                                            (":8080", ":8080"), (":08080", ":8080"),
                                            (":443" if scheme == "http" else ":80", ":443" if scheme == "http" else ":80")])
            path = rng.choice(["/a.jpg", "/B.jpg?Q=1", "", "#F"])
            alt = f"Picture {folded}|{port_folded}|{path}"
            relative = rng.random() < 0.3
            spelled = _spelled(rng, host)
            page = f"{_spelled(rng, scheme)}://{spelled}{port}/dir/p{i}.html"
            src = rng.choice(["x/c.jpg", "/c.jpg"]) if relative else f"{_spelled(rng, scheme)}://{spelled}{port}{path}"
            if relative:
                path = "/dir/x/c.jpg" if src == "x/c.jpg" else "/c.jpg"
                alt = f"Relative {folded}|{port_folded}|{path}"
                recs.append(wat_record(page, [img(src, alt)]))
            else:
                links.append(img(src, alt))
            if folded is None:
                refused += 1
            else:
                expected.add((f"{scheme}://{folded}{port_folded}{path}", alt))
            in_c += host.isascii() and "%" not in host and host not in _IPV4_ELSE
        recs.append(wat_record(f"https://site.example/{i}", links))
    return recs + [ending()], expected, refused, in_c


def test_ports_and_idn_hosts_fold_alike_on_every_path(tmp_path, monkeypatch):
    """Many spellings of a few URLs (scheme and host case, default, empty and zero-padded ports,
    IDN hosts in Unicode, punycode or percent-encoded, ASCII hosts percent-encoded, IPv4
    addresses in several spellings), absolute and
    relative to page URLs so spelled, and hosts WHATWG's parser refuses (percent-decoding to
    bytes that are not UTF-8 or to a forbidden code point, in a non-ASCII host "xn--" labels
    that are not punycode of a valid label): the C rules, extract_vec and the reference (`_check_link` on every link)
    write the same table, row for row, and count the same rejections; the table holds each URL
    once, as WHATWG writes it (the expected pairs are made here by hand, not by fold_case), with
    the uid of the URL as kept, and every link to a refused host is invalid_url. The page URL is
    the base of the relative links: their host is folded after the join."""
    _need_native()
    records, expected, refused, in_c = _port_and_idn_pages(5, 60)
    data = gz(records)
    tables, rejected = {}, {}
    for path in ("native", "vectorised", "reference"):
        with monkeypatch.context() as m:
            decided = use_wat_path(m, path)
            src = tmp_path / f"{path}.wat.gz"
            src.write_bytes(data)
            s = extract_to_parquet([str(src)], tmp_path / f"out-{path}", ONE)
            tables[path] = pl.concat([pl.read_parquet(tmp_path / f"out-{path}" / f) for f in s.files])
            rejected[path] = {k: v for k, v in s.rejected.items() if v}
            if path == "native":  # the C fold is exercised (most plain ASCII hosts; a page URL with an
                # empty port is no plain base to it), not only the reference's; never an odd host
                assert in_c * 0.7 < sum(decided) <= in_c
    assert tables["native"].rows() == tables["vectorised"].rows() == tables["reference"].rows()
    assert rejected["native"] == rejected["vectorised"] == rejected["reference"] == {"invalid_url": refused}
    assert refused > 100
    got = tables["reference"].select("url", "caption").rows()
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    assert tables["reference"]["uid"].to_list() == [uid_of(u, c) for u, c in got]


_DOT_SRCS = ["../a.jpg", "./b.jpg", "a/../../c.jpg", "/x/../y.jpg", "..", ".", "../", "./", "a/./b/.",
             "a//../b.jpg", "/a//../b.jpg", "../../../../../z.jpg", ".hidden.jpg", "a/.b.jpg", "...jpg",
             "a/b/..", "/..", "/.", "/./", "/../x.png", "x/./././y.png", "a/..//b.jpg", "..a/b.jpg",
             "../a.jpg?x=1", "./a b.jpg", "//h.example/../x.jpg", "./a;p.jpg", "./a#f.jpg", "../c:d.jpg",
             "  ../padded.jpg  ", "..\t/tab.jpg", "%2e%2e/enc.jpg", "a/%2e./b.jpg"]
_DOT_BASES = ["https://d.example/one/two/page.html", "https://d.example/", "http://d.example",
              "https://d.example/a//b/c", "https://d.example:8080/x/y/?q=1", "https://d.example/dir/"]


def test_dot_segment_paths_are_joined_in_c_as_urljoin_does(tmp_path, monkeypatch):
    """Relative srcs with '.' and '..' segments, on bases of several shapes (the page URL, and a
    <base href>): the C join gives the Python path's pairs, and decides the plain ones itself."""
    pages = []
    for i, base in enumerate(_DOT_BASES):
        links = [{"path": "IMG@/src", "url": src, "alt": f"dot segment picture {k}"}
                 for k, src in enumerate(_DOT_SRCS)]
        pages.append(wat_record(base, links))
        pages.append(wat_record(f"https://p{i}.example/x/y/z.html", links, base=base[8:] if i % 2 else base))
    ending = wat_request_record("https://end.example/")  # the last member goes to Python's member loop
    handed: list[int] = []
    run = native.Rules.run

    def counted(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        handed.append(len(out.hard))
        return out
    monkeypatch.setattr(native.Rules, "run", counted)
    _same_both_ways(tmp_path, gz([*pages, ending]), monkeypatch)
    hard_shapes = sum(1 for s in _DOT_SRCS if any(c in s.strip() for c in "?; #:") or s.strip().startswith("//"))
    # the plain dot paths are joined in C; the rest (query, space, params, '//') go to the reference
    assert sum(handed) == len(pages) * hard_shapes, (sum(handed), len(pages) * hard_shapes)


_BASE_HREFS = ["https://static.example.net/assets/", "http://cdn.example.org", "https://cdn.example.org/a/b.html",
               "  https://padded.example/p/  ", "\thttps://tab.example/t/\n", "HTTPS://upper.example/u/",
               "https://q.example/dir/?v=1", "https://q.example/dir/?", "https://f.example/d/#", "https://f.example/d/#top",
               "https://p.example/d;p/", "https://e.example/a&amp;b/", "https://e.example/a&b/", "https://[::1]/v6/",
               "https://bs.example\\d/", "https:///no-host/", "https://", "http:", "https://sp ace.example/",
               "https://u:p@auth.example:8080/x/", "https://dots.example/a/../b/./c/", "//proto.example/rel/",
               "/root/", "rel/dir/", "../up/", "https://ex\u00e4mple.example/", "\u00a0https://nbsp.example/",
               "https://tail.example/\u00a0", "ftp://files.example/", "https:/one-slash.example/", "http://h.example/%7e/",
               "/a//b/", "/with:colon/", "//", "///x/", "/./x/", "//h.example", "//h.example:8080/p/", "/", "/x/../y/"]
_BASE_SRCS = ["x.jpg", "/root.jpg", "//other.example/p.jpg", "../up.jpg", "./here.jpg", "https://abs.example/a.jpg",
              "?q=1", "#frag", "a b.jpg", "c:d.jpg", "", "&amp;e.jpg", "#", "?", "?#", "?q#", "?#f", "?q#f#g", "##",
              "? sp", "about:blank", "mailto:a@b.example", "HTTP:rel.jpg", "https:rel.jpg", "1a:b.jpg", "a+b.c-d:x",
              "a_b:x", ":x.jpg", "ftp://f.example/a.jpg"]


def test_plain_base_hrefs_are_taken_in_c_as_urljoin_gives_them(tmp_path, monkeypatch):
    """<base href> values of many shapes (and none), on http and https pages, under srcs of many
    shapes (a query or fragment only, other schemes): the pairs equal the Python path's (urljoin
    of the href to the page URL, then of each src to that). The C scan joins the plain absolute,
    protocol-relative and root-relative hrefs itself; Python joins only the others."""
    pages = []
    for i, base in enumerate(_BASE_HREFS):
        links = [{"path": "IMG@/src", "url": src, "alt": f"a picture under a base {k}"} for k, src in enumerate(_BASE_SRCS)]
        for page_url in (f"https://page{i}.example/dir/page.html", f"http://page{i}.example/dir/page.html",
                         f"HTTPS://Upper{i}.example/d/p.html", f"https://query{i}.example/p.html?x=1",
                         f"https://frag{i}.example/p.html#top", f"https://bare{i}.example", f"https://semi{i}.example/a;p/b"):
            pages.append(wat_record(page_url, links, base=base))
    ending = wat_request_record("https://end.example/")
    joined: list[str] = []
    base_pages = native.Batch.base_pages

    def spied(self, a, b):
        got = base_pages(self, a, b)
        joined.extend(href for _, href in got)
        return got
    monkeypatch.setattr(native.Batch, "base_pages", spied)
    hard: list[tuple[str, str]] = []  # (page URL, src) of the links the C rules handed to Python
    run = native.Rules.run

    def counted(self, batch, *args, **kwargs):
        out = run(self, batch, *args, **kwargs)
        hard.extend((batch.page(k)[0], src) for src, _, k in out.hard_links)
        return out
    monkeypatch.setattr(native.Rules, "run", counted)
    _same_both_ways(tmp_path, gz([*pages, ending]), monkeypatch)
    # On a plain page without a <base href>: a query or fragment only, and another scheme, are
    # decided in C (here with a lower-case scheme and no query, fragment or params in the page URL)
    plain_pages = {f"https://page{len(_BASE_HREFS)}.example/dir/page.html", f"http://page{len(_BASE_HREFS)}.example/dir/page.html",
                   f"https://bare{len(_BASE_HREFS)}.example"}
    decided = {"#", "?", "?#", "?q#", "?#f", "?q#f#g", "##", "? sp", "?q=1", "#frag", "about:blank", "mailto:a@b.example",
               "a+b.c-d:x", "ftp://f.example/a.jpg", "c:d.jpg"}
    assert not [h for h in hard if h[0] in plain_pages and h[1] in decided], hard
    assert {src for page, src in hard if page.startswith(("https://query", "HTTPS://", "https://frag", "https://semi"))
            and src.startswith(("?", "#"))}, "pages whose URL urlunparse changes keep those srcs for Python"
    plain = {"https://static.example.net/assets/", "http://cdn.example.org", "https://cdn.example.org/a/b.html",
             "  https://padded.example/p/  ", "\thttps://tab.example/t/\n", "https://u:p@auth.example:8080/x/",
             "https://dots.example/a/../b/./c/", "http://h.example/%7e/", "//proto.example/rel/", "/root/", "/a//b/",
             "//h.example", "//h.example:8080/p/"}
    assert set(joined) == set(_BASE_HREFS) - plain, sorted(set(_BASE_HREFS) - plain - set(joined))


@pytest.mark.parametrize("page_url", ["http://[x/d/", "http://a\uff03b/d/"], ids=["bracket", "nfkc-host"])
def test_a_page_url_urlsplit_refuses_keeps_an_absolute_base_href(tmp_path, monkeypatch, page_url):
    """A page URL urlsplit refuses (an unbalanced '[', a fullwidth '#' that NFKC makes a
    delimiter) with a <base href>: an absolute href is the base as it is, a relative one joins to
    nothing valid. The Python path used to stop the whole extract with a traceback there (found
    by a review fuzzer); both paths now give the same rows."""
    pages = [wat_record(page_url, [img("?q", "some alt text"), img("x.jpg", "another alt text")], base=base)
             for base in ("http://b.example/x/", "https://c.example/", "rel/dir/", "/root/")]
    _same_both_ways(tmp_path, gz([*pages, wat_request_record("https://end.example/")]), monkeypatch)
    rows = pl.read_parquet(tmp_path / "out-True" / "candidates-00000.parquet").rows(named=True)
    assert {r["url"] for r in rows} == {"http://b.example/x/?q", "http://b.example/x/x.jpg", "https://c.example/?q",
                                         "https://c.example/x.jpg"}


def test_a_kept_url_or_caption_with_nul_is_written(tmp_path, monkeypatch):
    """The reference keeps a URL holding U+0000 (from a base href with \\u0000, which the C
    rules leave to it): the compiled writer takes such a row with its length (it used to raise on
    one, found by a review fuzzer), in link order with the C path's rows, and Polars writes
    nothing. (A link whose own alt or src holds one sends its record to Python.)"""
    from fastlaion import extract

    to_polars = []
    add_frame = extract._PairWriter.add_frame
    monkeypatch.setattr(extract._PairWriter, "add_frame", lambda self, frame: (to_polars.append(self.native),
                                                                                add_frame(self, frame))[1])
    pages = [wat_record("https://p.example/a/", [img("/one.jpg", "a first alt text"), img("?q", "a query only src"),
                                                 img("/three.jpg", "a last alt text")], base="http://b.example/x/\x00y"),
             wat_record("https://n.example/", [img("/two.jpg", "an alt with \x00 inside")]),
             wat_record("https://q.example/", [img("/four.jpg", "a plain page after it")])]
    _same_both_ways(tmp_path, gz([*pages, wat_request_record("https://end.example/")]), monkeypatch)
    rows = pl.read_parquet(tmp_path / "out-True" / "candidates-00000.parquet").rows(named=True)
    assert [(r["url"], r["caption"]) for r in rows] == [
        ("http://b.example/one.jpg", "a first alt text"), ("http://b.example/x/\x00y?q", "a query only src"),
        ("http://b.example/three.jpg", "a last alt text"), ("https://n.example/two.jpg", "an alt with \x00 inside"),
        ("https://q.example/four.jpg", "a plain page after it")]
    assert True not in to_polars  # the native run's rows all went to the compiled writer


def test_odd_warc_headers_match(tmp_path, monkeypatch):
    """WAT records whose WARC header names a field twice, in another case, or inside another
    field's name or value (which the reference counts: header.lower().count(name) must be 1):
    the C classify (count_names) gives the Python path's pairs and counts."""
    body = (b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Links":['
            b'{"path":"IMG@/src","url":"/a.jpg","alt":"an alt text here"}]}}}}}')
    extra = [b"", b"Content-Length: 9\r\n", b"X-Content-Length-Note: 1\r\n", b"X-Note: warc-type twice\r\n",
             b"WARC-Type: metadata\r\n", b"warc-target-uri: https://other.example/\r\n",
             b"X-Note: WARC-TARGET-URI\r\n", b"X-Warc-Typeface: none\r\n", b"X: content-lengt\r\n", b"X: warc-targe\r\n",
             b"X: CONTENT-LENGTH\r\n", b"X: wArC-tYpE\r\n"]
    records = []
    for i, more in enumerate(extra):
        for order in range(2):
            fields = [b"WARC-Type: metadata\r\n", b"WARC-Target-URI: https://p%d.example/\r\n" % i,
                      b"Content-Length: %d\r\n" % len(body), more]
            if order:
                fields.reverse()
            records.append(b"WARC/1.0\r\n" + b"".join(fields) + b"\r\n" + body + b"\r\n\r\n")
    spy = _same_both_ways(tmp_path, gz([*records, wat_request_record("https://end.example/")]), monkeypatch)
    # C reads the records where each name occurs once (no extra field, or only a part of a name
    # added), in both field orders; every other one it leaves to Python
    assert spy.kinds.get(native.K_PAGE, 0) == 6, spy.kinds


def test_alts_folded_or_taken_as_they_are_match(tmp_path, monkeypatch):
    """Alts the C rules take as they are (plain_alt: printable ASCII, no '&', no space at an end,
    no two in a row, checked 16 bytes at a time) and alts they fold: two spaces, a tab or a
    non-ASCII space on each side of a 16-byte block boundary, at the ends, DEL, '&': the pairs
    equal the Python path's (" ".join(alt.split()))."""
    alts = []
    for length in (5, 15, 16, 17, 31, 32, 33, 47):
        base = "".join("abcdefghij"[i % 10] for i in range(length))
        alts.append(base)
        for at in {1, 14, 15, 16, 17, length - 2}:
            if 0 < at < length - 1:
                for gap in ("  ", " ", "\t", "\u00a0", " \u3000", "\x7f", "&amp;", "&", " & "):
                    alts.append(base[:at] + gap + base[at + 1:])
        alts += [" " + base, base + " ", "  " + base + "  "]
    pages = [wat_record(f"https://alt{i}.example/", [img(f"/{k}.jpg", alt) for k, alt in enumerate(alts[i:i + 40])])
             for i in range(0, len(alts), 40)]
    _same_both_ways(tmp_path, gz([*pages, wat_request_record("https://end.example/")]), monkeypatch)


def test_rule_file_matches(tmp_path, monkeypatch):
    spy = _same_both_ways(tmp_path, rule_wat(), monkeypatch)
    # the last member has no next gzip header to end it: Python's member loop reads it
    assert spy.kinds == {native.K_OTHER: 1, native.K_NOIMG: 1, native.K_PAGE: 3}


def test_each_odd_document_matches(tmp_path, monkeypatch):
    """The documents the fast msgspec decoder is tested on, each as a WAT record between two
    plain pages: the C walk decides or hands over, and the outcome is the reference's."""
    docs = _wat_doc_variants()
    decided = 0
    for i, doc in enumerate(docs):
        plain = three_wat_records()
        recs = [plain[0], warc_record("metadata", "https://w.example/p", doc, "application/json"), plain[1], plain[2]]
        (tmp_path / str(i)).mkdir()
        spy = _same_both_ways(tmp_path / str(i), gz(recs), monkeypatch)
        decided += spy.decided() - 2  # the plain pages around it (the last is read by Python's loop)
    assert decided >= len(docs) // 2, (decided, len(docs))


def _escape_docs() -> list[bytes]:
    def rec(body: bytes, uri: str = "https://e.example/dir/p") -> bytes:
        return warc_record("metadata", uri, body, "application/json")

    def links(*items: str) -> bytes:
        return (b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"Headers":{"Content-Language":" de "},'
                b'"HTML-Metadata":{"Head":{"Metas":[{"http-equiv":"CONTENT-LANGUAGE","content":"  "},'
                b'{"name":"description","content":"Caf\xc3\xa9 \\u00e9t\xc3\xa9"}]},"Links":['
                + b",".join(i.encode() for i in items) + b"]}}}}}")

    return [
        rec(links(r'{"path":"IMG@/src","url":"\/a\/b.jpg","alt":"Tab\there \"quoted\" and a back\\slash"}')),
        rec(links(r'{"path":"IMG@/src","url":"/tab\tin\nside.jpg","alt":"Tab and newline inside the url"}')),
        rec(links(r'{"path":"IMG@/src","url":"/\u00e9t\u00e9.jpg","alt":"Emoji \ud83d\ude00 pair here"}')),
        rec(links('{"path":"IMG@/src","url":"/\u00fcber.jpg","alt":"Gr\u00fc\u00dfe aus K\u00f6ln"}')),
        rec(links(r'{"path":"IMG@/src","url":"/nul.jpg","alt":"Has a \u0000 NUL inside"}')),
        rec(links(r'{"path":"IMG@/src","url":"","alt":""}', r'{"path":"IMG@/src","url":"/x.jpg","alt":null}',
                  r'{"path":"IMG@/src","alt":"No url at all here"}', r'{"path":"IMG@/src","url":null,"alt":"Null url"}')),
        rec(links(r'{"path":"IMG@\/src","url":"/escaped-path.jpg","alt":"Escaped path key"}')),
        rec(links(r'{"path":"IMG@/src","url":"/lone.jpg","alt":"Lone \udc00 low"}')),
        rec(links(r'{"path":"IMG@/src","url":"/n.jpg","alt":"Number \u0031 escape","x":1e5}')),
        rec(links(r'{"path":"IMG@/src","url":"/n.jpg","alt":"Bad escape \q here"}')),
        rec(links('{"path":"IMG@/src","url":"/bad-utf8.jpg","alt":"Bad \xff byte here"}'.encode("latin-1").decode("latin-1"))),
        rec(links(r'{"path":"IMG@/src","url":"/a.jpg","alt":"Alt text one"}'), uri="<https://angle.example/p>"),
        rec(links(r'{"path":"IMG@/src","url":"/a.jpg","alt":"Alt text one"}'), uri="https://\u00fc.example/p"),
        rec(b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Head":{"Base":"  \\t "},'
            b'"Links":[{"path":"IMG@/src","url":"x.jpg","alt":"Blank base href"}]}}}}}'),
        rec(b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Head":{"Base":"\\/sub\\/"},'
            b'"Links":[{"path":"IMG@/src","url":"x.jpg","alt":"Escaped base href"}]}}}}}'),
        rec(b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"Headers":{"content-language":"fr",'
            b'"Content-Language":"de"},"HTML-Metadata":{"Links":[{"path":"IMG@/src","url":"x.jpg","alt":"Two headers"}]}}}}}'),
        rec(b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Head":{"Metas":['
            b'{"http-equiv":"content-language","content":"' + b"x" * 80 + b'  "}]},'
            b'"Links":[{"path":"IMG@/src","url":"x.jpg","alt":"Long language"}]}}}}}'),
        rec(b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Links":'
            b'[{"path":"IMG@/src","url":"x.jpg","alt":"Deep ' + b"[" * 300 + b"]" * 300 + b'"}], "D":' + b"[" * 300
            + b"]" * 300 + b"}}}}}"),
        rec(b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Links":[]}}}}}'),
        rec(b'{"Envelope":{"Payload-Metadata":{"HTTP-Response-Metadata":{"HTML-Metadata":{"Links":null}}}},'
            b'"X":"IMG@/src"}'),
    ]


def test_escapes_non_ascii_and_empty_strings_match(tmp_path, monkeypatch):
    docs = _escape_docs()
    spy = _same_both_ways(tmp_path, gz(docs), monkeypatch)
    assert spy.decided() >= len(docs) // 2
    assert spy.kinds.get(native.K_DEFER, 0) >= 4  # NUL, lone surrogate, exponent, bad escape, bad UTF-8 ...


@pytest.mark.parametrize("name", list(_gzip_variants()))
def test_damaged_gzip_matches(tmp_path, monkeypatch, name):
    _same_both_ways(tmp_path, _gzip_variants()[name], monkeypatch)


def test_members_cut_by_read_chunks_match(tmp_path, monkeypatch):
    """Small read chunks, so most members start in one chunk and end in the next: the scanner
    takes such a member joined alone (_straddling_member) and reads the next chunk in place, or
    leaves it to the joined chunks as before (a look-alike header, damage, a cut). Same rows and
    counts as the Python path, which always joins, for each damaged-gzip input and chunk size;
    both outcomes happen over them."""
    straddling = extract_mod._straddling_member
    outcomes: list[int] = []

    def spied(parts, chunk, native_):
        at = straddling(parts, chunk, native_)
        outcomes.append(at)
        return at
    monkeypatch.setattr(extract_mod, "_straddling_member", spied)
    for name, data in _gzip_variants().items():
        for size in (97, 700, 3001):
            monkeypatch.setattr(extract_mod, "READ_CHUNK_BYTES", size)
            case = tmp_path / f"{name}-{size}"
            case.mkdir()
            _same_both_ways(case, data + gz(_page_records(7, 12)), monkeypatch)
    assert any(at >= 0 for at in outcomes) and any(at < 0 for at in outcomes)


def test_a_header_cut_by_the_read_chunks_before_a_damaged_member_counts_once(tmp_path, monkeypatch):
    """The read chunk ends inside the gzip header after a whole member, and the member after that
    is damaged: the scanner takes the first member but not the damaged one at the chunk's first
    header, so the joined chunks are read again from the first member. It used to be taken there
    as well (counted and written twice); now nothing of a straddling scan that stops short is
    used."""
    recs = [wat_record(f"https://g.example/{i}", [img(f"/{i}.jpg", f"Gzip variant {i}")]) for i in range(4)]
    members = [gzip.compress(r) for r in recs]
    bad = bytearray(members[1])
    bad[20:40] = b"\x00" * 20
    monkeypatch.setattr(extract_mod, "READ_CHUNK_BYTES", len(members[0]) + 2)  # the cut: after 1f 8b
    _same_both_ways(tmp_path, members[0] + bytes(bad) + members[2] + members[3], monkeypatch)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "invalid-json", "lying-length", "junk", "mid-record-member"])
def test_damaged_records_match(tmp_path, monkeypatch, damage):
    recs = _page_records(3, 40)
    members = [gzip.compress(r) for r in recs]
    if damage == "truncated":
        data = b"".join(members)[:-70]
    elif damage == "corrupt":
        bad = bytearray(members[10])
        bad[20:50] = b"\x00" * 30
        data = b"".join(members[:10]) + bytes(bad) + b"".join(members[11:])
    elif damage == "invalid-json":
        members[7] = gzip.compress(warc_record("metadata", "https://j.example/", b'{"x":"IMG@/src", ', "application/json"))
        data = b"".join(members)
    elif damage == "lying-length":
        head, _, rest = recs[9].partition(b"\r\n\r\n")
        members[9] = gzip.compress(head.replace(b"Content-Length: ", b"Content-Length: 1") + b"\r\n\r\n" + rest)
        data = b"".join(members)
    elif damage == "junk":
        data = b"".join(members[:5]) + b"not gzip at all" + b"".join(members[5:])
    else:  # one record split over two members: the splitter holds a partial record between them
        r = recs[12]
        data = b"".join(members[:12]) + gzip.compress(r[:100]) + gzip.compress(r[100:]) + b"".join(members[13:])
    spy = _same_both_ways(tmp_path, data, monkeypatch)
    assert spy.decided() > 0 or damage == "junk"


def test_real_wat_and_warc_match(tmp_path, monkeypatch):
    wat = SHARED_WARC / "whirlwind.warc.wat.gz"
    warc = SHARED_WARC / "whirlwind.warc.gz"
    if not wat.exists():
        pytest.skip("../shared/data/warc is not there")
    (tmp_path / "wat").mkdir()
    _same_both_ways(tmp_path / "wat", wat.read_bytes(), monkeypatch, name="w.warc.wat.gz")
    (tmp_path / "warc").mkdir()
    _same_both_ways(tmp_path / "warc", warc.read_bytes(), monkeypatch, name="w.warc.gz")


def _bench_generator():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import extract as bench_extract  # bench/extract.py
    finally:
        sys.path.remove(str(REPO / "bench"))
    return bench_extract


def test_bench_generator_wat_matches(tmp_path, monkeypatch):
    """The bench's synthetic WAT (real record layout), a small one: the C path decides nearly all."""
    wat = tmp_path / "gen.warc.wat.gz"
    _bench_generator().generate_wat(wat, 1500, seed=5)
    spy = _same_both_ways(tmp_path, wat.read_bytes(), monkeypatch)
    assert spy.kinds.get(native.K_PAGE, 0) > 300
    assert spy.kinds.get(native.K_DEFER, 0) <= 5


def test_many_batches_and_flushes_match(tmp_path, monkeypatch):
    """Small read chunks, link batches and write chunks: pages split over batches and flushes."""
    monkeypatch.setattr(extract_mod, "READ_CHUNK_BYTES", 3000)
    monkeypatch.setattr(extract_mod, "LINK_BATCH", 50)
    monkeypatch.setattr(extract_mod, "WRITE_CHUNK_ROWS", 40)
    data = gz(_page_records(21, 300)) + gzip.compress(b"WARC/1.0\r\n") + gz(_page_records(22, 50))
    _same_both_ways(tmp_path, data, monkeypatch)


@pytest.mark.parametrize("reference_links", [0, 10**9], ids=["polars-for-python-pages", "reference-for-python-pages"])
def test_pages_left_to_python_mix_with_native_rows(tmp_path, monkeypatch, reference_links):
    """Pages the scanner hands to Python (a damaged member makes the splitter read the next
    ones) go either through the vectorised rules and Polars' writer, starting another part
    file that the merge joins, or through the reference into the compiled writer; both give
    the Python path's rows, in order, deduplicated on uid."""
    monkeypatch.setattr(extract_mod, "REFERENCE_LINKS", reference_links)
    monkeypatch.setattr(extract_mod, "LINK_BATCH", 200)
    recs = _page_records(31, 240)
    mid = len(recs) // 2
    data = gz(recs[:mid]) + gzip.compress(b"WARC/1.0\r\n") + gz(recs[mid:]) + gz(recs[:40])  # and repeats
    frames: list[bool] = []  # per frame given to Polars' writer: was the native path on
    add_frame = extract_mod._PairWriter.add_frame

    def counted(self, frame):
        frames.append(extract_mod._USE_NATIVE)
        return add_frame(self, frame)
    monkeypatch.setattr(extract_mod._PairWriter, "add_frame", counted)
    _same_both_ways(tmp_path, data, monkeypatch)
    assert any(frames) == (reference_links == 0)  # the case each run is meant to test


def test_a_native_run_writes_parquet_without_polars(tmp_path):
    """The point of the compiled writer: a WAT read by the native path is extracted, with
    duplicates dropped on uid, without importing Polars (0.4 s of start-up per process)."""
    _need_native()
    wat = tmp_path / "gen.warc.wat.gz"
    _bench_generator().generate_wat(wat, 600, seed=3)
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from fastlaion.extract import ExtractConfig, extract_to_parquet\n"
        f"s = extract_to_parquet([{str(wat)!r}], Path({str(tmp_path / 'out')!r}), ExtractConfig(processes=1))\n"
        "print(json.dumps([s.pairs, s.pairs_after_dedup, 'polars' in sys.modules, s.inputs[0].reader]))\n"
    )
    env = {**os.environ, "FASTLAION_KERNEL_CACHE": os.environ["FASTLAION_KERNEL_CACHE"]}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    pairs, after, polars_loaded, reader = json.loads(proc.stdout.splitlines()[-1])
    assert (polars_loaded, reader) == (False, "native")
    table = pl.read_parquet(tmp_path / "out" / "candidates-00000.parquet")
    assert pairs > after == table.height  # the generator repeats each site's logo: duplicates dropped
    assert table["uid"].n_unique() == table.height
    stats = json.loads((tmp_path / "out" / "extract_stats.json").read_text())
    assert stats["inputs"][0]["written"] == after and stats["inputs"][0]["unique_on"] == "uid"


# ---------------------------------------------------------------------------------------------
# uid, fallback, cache


def test_python_whitespace_is_the_c_whitespace():
    _need_native()
    lib = native.library()
    assert [c for c in range(0x110000) if lib.wat_is_py_space(c)] == [c for c in range(0x110000) if chr(c).isspace()]


def test_full_buffers_are_taken_and_scanning_goes_on(tmp_path, monkeypatch):
    """More members in one read chunk than a batch holds (4,096): the scanner stops full, Python
    takes the batch, and the scan goes on where it stopped."""
    monkeypatch.setattr(extract_mod, "READ_CHUNK_BYTES", 8 << 20)
    recs = [warc_record("warcinfo", "", b"software: test\r\n", "application/warc-fields")] * 5000
    recs[4500] = wat_record(PAGE, RULE_LINKS)
    spy = _same_both_ways(tmp_path, gz(recs), monkeypatch)
    assert spy.kinds.get(native.K_OTHER, 0) == 4998 and spy.kinds.get(native.K_PAGE) == 1


def test_a_member_too_big_for_the_scanner_goes_to_python(tmp_path, monkeypatch):
    """A member of 8 MiB (the most one member may inflate to) fills no batch: Python's member
    loop takes it, and reading goes on (no endless 'full' loop)."""
    head = warc_record("warcinfo", "", b"", "application/warc-fields")
    pad = (8 << 20) - len(head)
    big = warc_record("warcinfo", "", b" " * pad, "application/warc-fields")
    big = warc_record("warcinfo", "", b" " * (pad - (len(big) - (8 << 20))), "application/warc-fields")
    assert len(big) == 8 << 20
    data = gz([wat_record(PAGE, RULE_LINKS), big, wat_record(PAGE, RULE_LINKS), wat_request_record(PAGE)])
    spy = _same_both_ways(tmp_path, data, monkeypatch, ExtractConfig(processes=1, max_record_bytes=16 << 20))
    assert spy.kinds.get(native.K_PAGE) == 2


@pytest.mark.parametrize("sha", ["openssl", "own"])
def test_native_uids_equal_uid_of(monkeypatch, sha):
    _need_native()
    if sha == "own":
        monkeypatch.setattr(native.library(), "fastlaion_sha256", (None, None, None))
    elif native.library().fastlaion_sha256[0] is None:
        pytest.skip("no libcrypto loaded by hashlib")
    rng = random.Random(3)
    alphabet = "abc /?&é東\U0001f600\x00\n"
    urls = ["", "https://a.example/x.jpg"] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 130)))
                                               for _ in range(300)]
    caps = ["", ""] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 70))) for _ in range(300)]
    got = native.uids(pl.Series(urls, dtype=pl.String), pl.Series(caps, dtype=pl.String)).to_list()
    assert got == [uid_of(u, c) for u, c in zip(urls, caps)]


def test_library_is_cached_by_source_hash(tmp_path, monkeypatch):
    _need_native()
    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTLAION_KERNEL_CACHE", str(cache))
    native._reset()
    assert native.library() is not None
    built = list(cache.glob("wat-*.so"))
    assert len(built) == 1
    native._reset()
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt although cached"))
    assert native.library() is not None


@pytest.mark.parametrize("how", ["no-compiler", "broken-compiler", "env-off"])
def test_without_the_library_the_python_path_reads(tmp_path, monkeypatch, how):
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("FASTLAION_KERNEL_CACHE", str(cache))
    if how == "no-compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
    elif how == "broken-compiler":
        monkeypatch.setenv("CC", "false")
    else:
        monkeypatch.setenv("FASTLAION_NATIVE", "0")
    native._reset()
    assert native.scanner(1 << 20, ()) is None and native.library() is None
    assert not list(cache.glob("wat-*.so")) if cache.exists() else True
    table, counts = _run(tmp_path, rule_wat(), True, monkeypatch)
    ref_table, ref_counts = _run(tmp_path, rule_wat(), False, monkeypatch)
    assert counts == ref_counts and table.rows() == ref_table.rows()
    assert table.height == 9


def test_plain_wat_file_still_reads(tmp_path, monkeypatch):
    """An uncompressed WAT never reaches the scanner; the Python path reads it alike."""
    data = b"".join([wat_record(PAGE, RULE_LINKS)] + three_wat_records())
    spy = _same_both_ways(tmp_path, data, monkeypatch, name="plain.wat")
    assert spy.kinds == {}
    stats = json.loads((tmp_path / "out-True" / "extract_stats.json").read_text())
    assert stats["inputs"][0]["reader"] == "python"  # extract_stats.json says which path read it


def test_a_cached_library_cut_short_is_built_again(tmp_path, monkeypatch):
    """A library file cut short in the cache (a crash before it reached the disk, an interrupted
    copy) would kill the process when loaded (SIGBUS): its digest does not match, so it is built
    again, in place, and the run reads natively."""
    import subprocess
    import sys

    monkeypatch.setenv("FASTLAION_KERNEL_CACHE", str(tmp_path))
    script = "from fastlaion import extract_native as n; lib = n.library(); print(lib is not None)"
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert first.stdout.strip() == "True", first.stderr[-2000:]
    (so,) = tmp_path.glob("wat-*.so")
    assert so.with_suffix(".sha256").is_file() and so.stat().st_mode & 0o044 == 0o044  # readable by all
    whole = so.read_bytes()
    so.write_bytes(whole[: len(whole) // 3])
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == "True", (again.returncode, again.stderr[-2000:])
    assert so.read_bytes() == whole  # rebuilt: the same bytes as the first build
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*tmp"))


def test_a_compiler_command_with_arguments_builds_it(tmp_path, monkeypatch):
    """$CC may carry arguments (`ccache gcc`, here `env gcc`): the library is built with it."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("gcc") is None:
        pytest.skip("no gcc here")
    script = "from fastlaion import extract_native as n; print(n._compiler()); print(n.library() is not None)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CC": "env gcc", "FASTLAION_KERNEL_CACHE": str(tmp_path)})
    compiler, loaded = proc.stdout.strip().rsplit("\n", 1)
    assert compiler.endswith("env gcc") and loaded == "True", proc.stderr[-2000:]
    assert len(list(tmp_path.glob("wat-*.so"))) == 1


@pytest.mark.parametrize("tags", [("noai", "noimageai"), ("noindex",), ("noimageindex",), ()],
                         ids=["default", "noindex", "noimageindex", "none"])
def test_pages_that_may_opt_out_go_to_python_and_the_outcome_matches(tmp_path, monkeypatch, tags):
    """The C walk never decides an opt-out: a record whose robots metas or X-Robots-Tag may hold
    one of the tags asked for goes to Python (deferred), every other page is decided in C, and
    the pairs and counts (opt_out among them) are the Python path's."""
    from test_extract import opt_out_pages

    pages = opt_out_pages()
    cfg = ExtractConfig(processes=1, http_backoff_s=0.0, page_opt_out_tags=tags)
    recs = [rec for rec, _ in pages] + [three_wat_records()[0]]  # a plain last page: Python's loop reads the last
    spy = _same_both_ways(tmp_path, gz(recs), monkeypatch, cfg)
    # deferred: the pages whose robots meta, http-equiv X-Robots-Tag meta or header holds a tag
    # asked for, opting out or not (googlebot's, a whole-word miss), the 3 whose robots values
    # are escaped (the C walk does not unescape them) and the 3 whose X-Robots-Tag is a list;
    # a description's mention of noai is no robots meta; and, whatever the tags, the one whose
    # Content-Language is a list
    may = {("noai", "noimageai"): 11 + 3 + 2 + 1, ("noindex",): 2 + 2 + 3 + 1, ("noimageindex",): 1 + 2 + 3 + 1,
           (): 1}[tags]
    assert spy.kinds.get(native.K_DEFER, 0) == may, spy.kinds
    assert spy.kinds.get(native.K_PAGE, 0) == len(pages) - may, spy.kinds


def test_a_tag_the_c_walk_does_not_know_leaves_every_record_to_python(monkeypatch):
    """extract_file takes an ExtractConfig as it is (unvalidated): a tag outside PAGE_OPT_OUT_TAGS
    gets no compiled scanner, so the C walk cannot decide a page Python would reject."""
    _need_native()
    assert native.scanner(1 << 20, ("noai",)) is not None
    assert native.scanner(1 << 20, ("noarchive",)) is None
