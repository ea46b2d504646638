"""`fastlaion stats --html`: one self-contained HTML page about a dataset.

Plots are inline SVG written here (bar charts need no plotting library, and the page stays a
few kilobytes plus its thumbnails); thumbnails are base64 JPEG data URIs. Nothing is fetched
when the page is opened: no scripts, fonts or styles from elsewhere. A short inline script
checks, once the page has loaded, that every plot has its bars and every thumbnail decoded, and
records the result on <body data-rendered=...> (tests read it through headless Chromium).
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Sequence
from typing import Any

from .dataset.stats import DatasetStats, Histogram

PALETTE = {"bar": "#3b6ea5", "kept": "#3b8a55", "drop": "#c0504d", "axis": "#555", "grid": "#ddd"}


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def bar_chart(plot_id: str, title: str, labels: Sequence[str], values: Sequence[int], *, width: int = 520,
              height: int = 240, color: str = PALETTE["bar"], tick_every: int = 1) -> str:
    """A vertical bar chart as an inline <svg class="plot" data-plot=plot_id>; bars are <rect class="bar">."""
    left, right, top, bottom = 64, 12, 28, 64
    inner_w, inner_h = width - left - right, height - top - bottom
    top_value = max(values) if values and max(values) > 0 else 1
    n = max(1, len(values))
    step = inner_w / n
    parts = [f'<svg class="plot" data-plot="{_esc(plot_id)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{_esc(title)}">',
             f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" class="title">{_esc(title)}</text>']
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + inner_h * (1 - frac)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{PALETTE["grid"]}"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                     f'{_esc(_fmt(top_value * frac))}</text>')
    for i, (label, v) in enumerate(zip(labels, values)):
        h = inner_h * v / top_value
        x = left + i * step
        parts.append(f'<rect class="bar" x="{x + 1:.1f}" y="{top + inner_h - h:.1f}" width="{max(step - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>{_esc(label)}: {v:,}</title></rect>')
        if i % tick_every == 0:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{top + inner_h + 14}" text-anchor="end" class="tick" '
                         f'transform="rotate(-35 {x + step / 2:.1f} {top + inner_h + 14})">{_esc(label)}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + inner_h}" y2="{top + inner_h}" '
                 f'stroke="{PALETTE["axis"]}"/></svg>')
    return "".join(parts)


def histogram_chart(h: Histogram, title: str | None = None) -> str:
    labels = [f"{_fmt(lo)}-{_fmt(hi)}" for lo, hi in zip(h.edges[:-1], h.edges[1:])]
    if h.last_open and labels:
        labels[-1] = f"{_fmt(h.edges[-2])}+"
    every = max(1, len(labels) // 8)
    return bar_chart(f"hist-{h.column}", title or h.column, labels, h.counts, tick_every=every)


def funnel_chart(stats: DatasetStats, width: int = 640) -> str:
    """Horizontal bars: one per funnel level, with what each stage dropped."""
    rows = stats.funnel
    left, bar_h, gap, top = 150, 22, 8, 28
    height = top + len(rows) * (bar_h + gap) + 10
    total = max(1, rows[0].rows if rows else 1)
    inner = width - left - 150
    parts = [f'<svg class="plot" data-plot="funnel" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="funnel">',
             f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" class="title">funnel</text>']
    for i, lvl in enumerate(rows):
        y = top + i * (bar_h + gap)
        w = inner * lvl.rows / total
        parts.append(f'<text x="{left - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">{_esc(lvl.name)}</text>')
        parts.append(f'<rect class="bar" x="{left}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" '
                     f'fill="{PALETTE["kept"]}"><title>{_esc(lvl.name)}: {lvl.rows:,}</title></rect>')
        if lvl.dropped:
            dw = inner * lvl.dropped / total
            parts.append(f'<rect class="bar drop" x="{left + w:.1f}" y="{y}" width="{max(dw, 0.5):.1f}" '
                         f'height="{bar_h}" fill="{PALETTE["drop"]}" opacity="0.55"><title>dropped at '
                         f'{_esc(lvl.stage)}: {lvl.dropped:,}</title></rect>')
        parts.append(f'<text x="{left + inner + 8}" y="{y + bar_h * 0.7:.1f}">{lvl.rows:,} '
                     f'({100 * lvl.rows / total:.1f}%)</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#666} .plots{display:flex;flex-wrap:wrap;gap:16px}
svg.plot{background:#fafafa;border:1px solid #e5e5e5} svg .title{font-size:13px;font-weight:600}
svg .tick{font-size:10px;fill:#555} svg text{font-size:12px}
table{border-collapse:collapse;margin:4px 0 12px} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px}
.thumbs figure{margin:0;padding:6px;border:1px solid #e5e5e5;background:#fafafa}
.thumbs img{display:block;max-width:160px;max-height:160px;margin:0 auto}
.thumbs figcaption{font-size:11px;color:#444;overflow-wrap:anywhere;max-height:4.2em;overflow:hidden}
.warn{color:#a33}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var plots = document.querySelectorAll("svg.plot");
  var empty = 0;
  plots.forEach(function (p) { if (!p.querySelector("rect.bar") || p.getBBox().width <= 0) empty++; });
  var imgs = Array.prototype.slice.call(document.querySelectorAll(".thumbs img"));
  var decoded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-rendered",
    "plots=" + plots.length + " empty=" + empty + " thumbnails=" + decoded + "/" + imgs.length);
});
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{v:,}</td>' if isinstance(v, int) else f"<td>{_esc(v)}</td>"
                                    for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(stats: DatasetStats, samples: Sequence[dict[str, Any]] = (), thumbs: dict[str, str] | None = None) -> str:
    """The whole page. `samples`: rows (key, caption, scores) for the grid; `thumbs`: key -> data URI."""
    thumbs = thumbs or {}
    total = max(1, stats.rows)
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>fastlaion stats: {_esc(stats.source)}</title><style>{_CSS}</style></head><body>",
           f"<h1>fastlaion dataset report</h1><div class=\"meta\">{_esc(stats.source)} ({_esc(stats.kind)}), "
           f"{stats.files:,} Parquet file(s), {stats.rows:,} rows, {stats.kept:,} kept samples; "
           f"generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC</div>"]
    if stats.skipped_files:
        out.append(f'<p class="warn">{len(stats.skipped_files)} unreadable Parquet file(s) skipped: '
                   + ", ".join(_esc(s["path"]) for s in stats.skipped_files[:10]) + "</p>")
    if stats.damaged_files:
        of_run = f" of the run {stats.damaged_root}" if stats.damaged_root and stats.kind != "run" else ""
        out.append(f'<p class="warn">{len(stats.damaged_files)} problem(s) with finished shards\' files'
                   f'{_esc(of_run)}: '
                   + "; ".join(_esc(f"{d['shard']}: {d['problem']}") for d in stats.damaged_files[:10]) + "</p>")
    out.append("<h2>Funnel</h2><div class=\"plots\">" + funnel_chart(stats) + "</div>")
    out.append(_table(["level", "rows", "% of input", "dropped here"],
                      [[lvl.name, lvl.rows, f"{100 * lvl.rows / total:.1f}%",
                        ", ".join(f"{r} {n:,}" for r, n in lvl.reasons.items())] for lvl in stats.funnel]))
    if stats.drops:
        out.append("<h2>Drops per reason</h2>")
        out.append(_table(["stage", "reason", "rows", "% of input"],
                          [[s, r, n, f"{100 * n / total:.2f}%"] for s, r, n in stats.drops]))
    if stats.histograms:
        out.append("<h2>Scores (kept samples)</h2><div class=\"plots\">")
        for h in stats.histograms.values():
            mean = f", mean {h.mean:.3f}" if h.mean is not None else ""
            out.append(histogram_chart(h, f"{h.column} ({h.values:,} values{mean})"))
        out.append("</div>")
    if stats.language_groups or stats.languages:
        out.append("<h2>Languages (kept samples)</h2><div class=\"plots\">")
        if stats.language_groups:
            out.append(bar_chart("language-groups", "language group", list(stats.language_groups),
                                 list(stats.language_groups.values()), width=320))
        if stats.languages:
            out.append(bar_chart("languages", f"top {len(stats.languages)} languages",
                                 [k for k, _ in stats.languages], [v for _, v in stats.languages]))
        out.append("</div>")
    if stats.size_histogram is not None:
        out.append("<h2>Image sizes (kept samples, original)</h2><div class=\"plots\">")
        out.append(histogram_chart(stats.size_histogram, "short side of the original image (px)"))
        out.append(bar_chart("size-buckets", "short side", [k for k, _ in stats.size_buckets],
                             [v for _, v in stats.size_buckets], width=360))
        out.append("</div>")
    if samples:
        out.append(f"<h2>Samples ({len(samples)} kept, spread over the dataset)</h2><div class=\"thumbs\">")
        for s in samples:
            src = thumbs.get(s["key"])
            scores = " · ".join(f"{k} {s[k]:.3f}" for k in ("similarity", "aesthetic", "punsafe")
                                if s.get(k) is not None)
            img = (f'<img src="{src}" alt="{_esc(s.get("caption") or "")}" loading="eager">' if src
                   else '<div class="warn">image not found</div>')
            out.append(f"<figure>{img}<figcaption><b>{_esc(s['key'])}</b> {_esc(s.get('caption') or '')}"
                       f"<br>{_esc(scores)}</figcaption></figure>")
        out.append("</div>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(out)
