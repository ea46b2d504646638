"""LAION's link rules over a batch of WAT links at once, with Polars string expressions.

The reference is `_check_link` in extract.py, one link at a time. This module does the same
for the shapes that make up nearly all of Common Crawl's links, and marks every other link
`hard`, for the reference to settle:

- an alt where html.unescape could find an entity, or with U+001C-U+001F (whitespace to
  Python's str.split, not to Unicode);
- a src with anything but printable ASCII, tab, CR and LF, or with an entity;
- a relative src that needs urllib's urljoin: dot segments, a query- or fragment-only
  reference, a colon, or a page whose base URL is not plain printable-ASCII http(s).

For the rest each step is the reference's, written as an expression: whitespace folding
(`" ".join(alt.split())`, in Python for the few alts it changes), strip, lower case, the
substring rules, joining to the base by concatenation (as `_Base.join` does),
`_HTTP_URL`'s host and port check, and `fold_case` (scheme and host in lower case, no default
port; in Python, for the few URLs with a capital there or a port). A host with a '%', which
WHATWG's parser decodes (it may refuse it: invalid_url), is left to the reference too. tests/test_extract.py compares the two on generated and edge-case links.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from .config import ExtractConfig

_SIMPLE_SRC = r"^[\t\n\r\x20-\x7e]*$"  # printable ASCII, tab, CR, LF
_SRC_ENTITY = r"&(?:#[0-9]+|#[xX][0-9A-Fa-f]+|[A-Za-z][A-Za-z0-9]*);"  # extract.py's _ENTITY
_STR_OR_NONE = frozenset({str, type(None)})  # the types a src or alt may have
# An alt the reference changes beyond whitespace: html.unescape may find an entity ('&' then a
# character its pattern can start with), or U+001C-U+001F, which str.split takes for whitespace.
_ODD_ALT = r"&(?:[^\t\n\x0c <&#;]|#[0-9xX])|[\x1c-\x1f]"
# Python's own whitespace (str.split, str.strip), read from Python so the two cannot drift.
_PY_SPACE = "".join(f"\\x{{{c:x}}}" for c in range(0x3001) if chr(c).isspace() and c != 0x20)
_NEEDS_FOLD = rf"^ | $|  |[{_PY_SPACE}]"  # " ".join(alt.split()) would change the alt
_HARD = "hard"
_LABELS = r"(?:[^/?#@:]*\.)?"  # any labels before the last one (each with its dot), or none
# digits that are not 0-255 in decimal without a leading zero (dotted decimal's octets)
_NOT_OCTET = r"(?:0[0-9]+|[0-9]{4,}|[3-9][0-9]{2}|2[6-9][0-9]|25[6-9])"
_END = r"(?:[:/?#]|$)"
# A host that ends in a number (WHATWG: an IPv4 address in another spelling, or no host) and is
# not dotted decimal, which is all the parser writes it as: a trailing dot, a last label in hex,
# a digits label that is no octet (a leading zero, over 255), a label before a digits last one
# that is no octet (a letter, empty), fewer or more than four labels. No lookaround in Polars'
# regex: the alternatives, of which the matches that are no such host are none.
_NUMERIC_HOST = "|".join((
    rf"{_LABELS}(?:[0-9]+|0[Xx][0-9A-Fa-f]*)\.{_END}",
    rf"{_LABELS}0[Xx][0-9A-Fa-f]*{_END}",
    rf"{_LABELS}{_NOT_OCTET}{_END}",
    rf"{_LABELS}(?:[^/?#@:.]*[^0-9/?#@:.][^/?#@:.]*|{_NOT_OCTET}|)\.{_LABELS}[0-9]+{_END}",
    rf"(?:[^/?#@:.]*\.){{0,2}}[0-9]+{_END}",
    rf"(?:[^/?#@:.]*\.){{4,}}[0-9]+{_END}",
))
# A host WHATWG's parser does more to than lower-case it (extract._ODD_HOST and ipv4.ends_in_number, for
# the printable ASCII URLs here): a '%' to decode, an IPv4 address in another spelling than
# dotted decimal (`0x7f.1`, `01.2.3.4`; `1.2.3.4` stays here). (An ASCII host's "xn--" labels are
# not checked: extract._parse_host.)
# Rare: the reference decides (it may be invalid_url). A userinfo may match too: harmless.
_ODD_HOST = (r"^[Hh][Tt][Tt][Pp][Ss]?://(?:[^/?#@]*@)?"
             rf"(?:[^/?#@:]*%|{_NUMERIC_HOST})")

# What fold_case may change in a URL: an upper-case letter in its scheme or authority (the host is
# in there), a non-ASCII character in its authority (an IDN host: punycode), or a port (a default
# or empty one goes, leading zeros go), or an IPv4 address in another spelling than dotted decimal.
# A userinfo's ':' or an IPv6 literal's are not taken for a port.
_TO_FOLD = (r"^(?:[A-Za-z]*[A-Z]|[A-Za-z]+://[^/?#]*(?:[A-Z]|[^\x00-\x7f]|%|:[0-9]*(?:[/?#]|$))"
            rf"|[A-Za-z]+://(?:[^/?#@]*@)?(?:{_NUMERIC_HOST}))")


def _url_pattern(max_host: int | None) -> str:
    """extract.py's _HTTP_URL as a yes/no pattern (a DFA, no captures: many times faster)
    that also demands a port of at most 65535 and, given `max_host`, a host that long at
    most. Every URL that reaches it is printable ASCII, where this is what _HTTP_URL does;
    and a URL has one parse at most (a userinfo '@' cannot sit inside host or port), so "some
    parse has a short host" is "the host is short"."""
    name = "+" if max_host is None else f"{{1,{max_host}}}"
    hosts = [rf"[^ /?#@:\[\]<>\"'{{}}|\\^`]{name}"]
    if max_host is None or max_host >= 3:  # brackets count in the host's length
        hosts.insert(0, rf"\[[0-9A-Fa-f:.]{'+' if max_host is None else f'{{1,{max_host - 2}}}'}\]")
    port = r"0*(?:[0-9]{0,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
    return rf"^[Hh][Tt][Tt][Pp][Ss]?://(?:[^/?#@]*@)?(?:{'|'.join(hosts)})(?::{port})?(?:[/?#]|$)"


def link_outcomes(base_parts: tuple[list[str | None], ...], srcs: list[Any], alts: list[Any],
                  page_of: list[int], cfg: ExtractConfig) -> dict[str, pl.Series]:
    """Series of one row per link, in order: `reason` (the rule it fails, null when kept),
    `url` and `caption` (the accepted pair, not yet cut to max_text_chars) and `hard` (true:
    the reference must decide this link; its other values mean nothing). `base_parts`: per
    page, the scheme, origin and directory of its base URL (extract._base_parts: None where the
    base is left to urljoin); `page_of`: each link's page. Raises TypeError when a src or alt
    is neither a string nor None."""
    # Checked here, not left to Polars: to name a bad value it works out the value's type first,
    # which for a list nested 400 deep (a fuzzed WAT record) took 6 s and gigabytes.
    if not set(map(type, srcs)) <= _STR_OR_NONE or not set(map(type, alts)) <= _STR_OR_NONE:
        raise TypeError("a link's src or alt is neither a string nor null")
    alt = pl.Series("alt", alts, dtype=pl.String, strict=True)
    src = pl.Series("src", srcs, dtype=pl.String, strict=True)
    page = pl.Series("page", page_of, dtype=pl.UInt32)
    pages = pl.DataFrame([pl.Series(name, col, dtype=pl.String)
                          for name, col in zip(("scheme", "origin", "dir"), base_parts)])

    # Alt rules, on every link.
    caption = alt.fill_null("")
    fold = alt.str.contains(_NEEDS_FOLD).fill_null(False).arg_true()
    if len(fold):
        caption = caption.scatter(fold, [" ".join(a.split()) for a in caption.gather(fold).to_list()])
    hard = alt.str.contains(_ODD_ALT).fill_null(False).alias("hard")
    min_alt = cfg.min_alt_chars
    reason = pl.select(reason=pl.when(alt.is_null() & (min_alt > 0)).then(pl.lit("no_alt"))
                       .when(caption.str.len_chars() < min_alt).then(pl.lit("short_alt"))).to_series()

    # Src rules, on the links the alt rules pass.
    todo = (reason.is_null() & ~hard).arg_true()
    sub = _src_rules(src.gather(todo), page.gather(todo), pages, cfg)
    reason = reason.scatter(todo, sub["reason"])
    hard = hard.scatter(todo, sub["hard"])
    url = pl.Series("url", dtype=pl.String).extend_constant(None, len(srcs)).scatter(todo, sub["url"])
    return {"reason": reason, "url": url, "caption": caption, "hard": hard}


def _src_rules(src: pl.Series, page: pl.Series, pages: pl.DataFrame, cfg: ExtractConfig) -> pl.DataFrame:
    src = src.fill_null("")
    s = src.str.strip_chars(" \t\n\r")  # all the whitespace a simple src can hold
    inner = s.str.contains(r"[\t\n\r]").any()
    clean = s.str.replace_all(r"[\t\n\r]", "") if inner else s  # browsers drop these inside URLs
    low = clean.str.to_lowercase()
    links = pl.DataFrame([
        src, clean.alias("clean"), low.alias("low"),
        (s.str.to_lowercase() if inner else low).alias("before"),  # the substring rules look before they go
        pages.get_column("scheme").gather(page), pages.get_column("origin").gather(page),
        pages.get_column("dir").gather(page),
    ])
    clean, low, before = pl.col("clean"), pl.col("low"), pl.col("before")
    # Joined to the base by concatenation where _Base.join does; null where it needs urljoin.
    url = (
        pl.when(low.str.starts_with("http://") | low.str.starts_with("https://")).then(clean)
        .when(clean == "").then(pl.lit(""))
        .when(clean.str.starts_with(".") | clean.str.contains("/.", literal=True)).then(None)
        .when(clean.str.starts_with("//")).then(pl.col("scheme") + ":" + clean)
        .when(clean.str.starts_with("/")).then(pl.col("origin") + clean)
        .when(~(clean.str.starts_with("?") | clean.str.starts_with("#") | clean.str.contains(":", literal=True)))
        .then(pl.col("dir") + clean)
        .otherwise(None)
    )
    reason = pl.when(before.str.contains("data:image", literal=True)).then(pl.lit("data_uri"))
    reason = reason.when(before.str.contains("javascript:", literal=True)).then(pl.lit("javascript"))
    if cfg.reject_svg:
        reason = reason.when(before.str.contains(".svg", literal=True)).then(pl.lit("svg"))
    if cfg.reject_gif:
        reason = reason.when(before.str.contains(".gif", literal=True)).then(pl.lit("gif"))
    u = pl.col("url")
    reason = reason.when(u.is_null()).then(pl.lit(_HARD))
    reason = reason.when(~u.str.contains(_url_pattern(None))).then(pl.lit("invalid_url"))
    reason = reason.when(u.str.contains(_ODD_HOST)).then(pl.lit(_HARD))
    reason = reason.when(~u.str.contains(_url_pattern(cfg.max_host_chars))).then(pl.lit("long_host"))
    odd = ~pl.col("src").str.contains(_SIMPLE_SRC) | pl.col("src").str.contains(_SRC_ENTITY)
    out = links.lazy().with_columns(url=url).with_columns(reason=reason.otherwise(None)).select(
        pl.when(pl.col("reason") == _HARD).then(None).otherwise(pl.col("reason")).alias("reason"),
        "url",
        hard=odd | (pl.col("reason") == _HARD).fill_null(False),
    ).collect()
    kept = out.select(pl.col("reason").is_null() & ~pl.col("hard")).to_series()
    return out.with_columns(fold_case_urls(out.get_column("url"), kept))


def fold_case_urls(urls: pl.Series, where: pl.Series | None = None) -> pl.Series:
    """`urls` (String) as `extract.fold_case` writes them (scheme and host in lower case, an IDN
    host in punycode, a percent-encoded one decoded, no default or empty port), where `where` is
    true (everywhere when None). Vectorised but for the few URLs fold_case may change (a capital
    in their scheme or authority, a non-ASCII authority, a '%' there, a port), which go through
    fold_case itself (the reference) one by one;
    a URL fold_case does not parse (not http(s)), or null, stays as it is. Also the key
    `fastlaion dedup --by url` compares (dataset/dedup.py)."""
    if urls.dtype != pl.String:  # e.g. a column of nulls only (pl.Null)
        return urls
    to_fold = urls.str.contains(_TO_FOLD)
    if where is not None:
        to_fold = to_fold & where
    rows = to_fold.arg_true()  # (a null is not true)
    if not len(rows):
        return urls
    from .extract import fold_case

    return urls.clone().scatter(rows, [fold_case(u) for u in urls.gather(rows).to_list()])
