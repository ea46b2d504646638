"""`fastlaion subset`, `dedup`, `stats`, `index`, `search` and `classify`: operations on a finished
dataset (fastlaion.dataset); and `evaluate`, the zero-shot accuracy of the model a run scores with
on a labelled image folder (fastlaion.evaluation).

fastlaion/cli.py registers the seven functions `<name>_cmd` lazily: this module, whose signatures
import Polars, numpy and Pillow, is imported only when one of them is looked up (run, or listed by
`fastlaion --help`), never at the other commands' start-up. Bad input (a missing column, an unknown recipe, no rows, a bad --where) is one line on
stderr and exit status 2, through cli.user_errors, like `fastlaion run`. fastlaion.cli is imported
when a command runs, not at import (no import cycle).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .config import ConfigError, ScoreConfig
from .dataset.dedup import DedupBy, DedupConfig
from .dataset.subset import RECIPES, SubsetConfig

_DD = DedupConfig()
_SS = SubsetConfig()


def _cli() -> Any:
    from . import cli

    return cli


class _Bar:
    """A rich progress bar for the loops over tars; one task at a time. Disabled, it is made
    on no start: rich's progress module is imported only when a bar shows (0.05 s)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None

    def start(self, what: str, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

            from .cli_progress import Bar

            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=_cli().console.real)
        self.bar.start()
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(what, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _say(line: str) -> None:
    """One plain line: no rich markup, so captions, URLs and class names ("[b]", "[/url]") print
    as they are."""
    _cli().out_console.print(line, soft_wrap=True, highlight=False, markup=False, emoji=False)


def _drop_columns(where: str) -> list[str]:
    """The columns a --where condition names that tell why a row was dropped (status, reason, ...)."""
    import polars as pl

    try:
        names = pl.sql_expr(where).meta.root_names()
    except pl.exceptions.PolarsError:
        return []
    return [c for c in ("status", "stage", "reason", "error", "duplicate_of") if c in names]


def _warn(line: str) -> None:
    """One line on stderr, `warning: ...`; the text is not markup (paths with brackets)."""
    _cli().console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)


def _open(source: Path, lost_rows: bool = True, **options: Any) -> Any:
    """open_dataset(source, **options), first saying on stderr when it is the folder of a run not
    done (being written, or stopped before its end): the command reads only the shards finished so
    far; then when it was made from such a run (a subset of it: its dataset.json says so); then
    (`lost_rows`; stats lists them itself) each finished shard's Parquet of a run folder that is
    missing or not as written, whose rows are not in the result."""
    from .dataset import open_dataset, run_state

    state = run_state(source)
    if state is not None:
        _warn(state.notice())
    ds = open_dataset(source, run=state, **options)  # the shards the notice counts, not one finished since
    notice = ds.unfinished_notice()
    if notice:
        _warn(notice)
    if lost_rows and ds.kind == "run" and ds.path.is_dir():
        said = {Path(s.path).name for s in ds.skipped}  # an unreadable one: already said
        for d in ds.damage(None, (".parquet",)):
            if d.file not in said:
                _warn(f"{ds.root.resolve() / d.problem}: the rows of shard {d.shard} are not read; `fastlaion run` "
                      "with the same arguments writes it again")
    return ds


NOT_REPLACED = "nothing was replaced; rerun the command"


def _interrupted(written: list[Path], what: str, before: str = NOT_REPLACED, then: str = "") -> Callable[[], str]:
    """cli.user_errors' message for a Ctrl-C: `before` until the command's output is whole in
    place, then "`what` written, whole, to" it and `then`, `what` saying what and a verb ("the
    subset was"; `written` gets the folder or file then: the dataset functions' `written` callback
    is its append; `-` is told as stdout)."""
    from .dataset.output import shown

    return lambda: f"{what} written, whole, to {shown(written[0])}{then}" if written else before


def _skipped_line(skipped: list[dict[str, str]]) -> None:
    if skipped:
        _say(f"skipped {len(skipped)} unreadable Parquet file(s): " + ", ".join(s["path"] for s in skipped[:5])
             + (" ..." if len(skipped) > 5 else ""))


_RECIPE_HELP = "; ".join(f"{name}: {r.description}" for name, r in RECIPES.items())


def subset_cmd(
    source: Annotated[Path, typer.Option("--from", help="A fastlaion run folder (or a subset/dedup folder, or one Parquet file).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for metadata.parquet (and the tars, urls.parquet); its earlier output is replaced.", show_default=False)],
    name: Annotated[Optional[str], typer.Argument(metavar="NAME", show_default=False,
        help=f"A LAION subset recipe. {_RECIPE_HELP}.")] = None,
    minimum: Annotated[Optional[float], typer.Option("--min", help="aesthetic-v2's threshold on aesthetic_v2 (LAION's: 4.5, 4.75, 5, 6, 6.25, 6.5).", show_default=False)] = None,
    where: Annotated[Optional[str], typer.Option(help="A SQL condition over the columns, e.g. \"similarity >= 0.32 AND caption ILIKE '%cat%'\" (parsed by Polars' SQL parser, never evaluated as Python); with NAME, both must hold.", show_default=False)] = None,
    shards: Annotated[bool, typer.Option("--shards/--no-shards", help="Also copy the subset's samples into new webdataset tars (NNNNN.tar), read from the run's tars: nothing is downloaded.")] = _SS.shards,
    shard_size: Annotated[int, typer.Option(help="Samples per new tar (with --shards).")] = _SS.shard_size,
    urls: Annotated[bool, typer.Option("--urls", help="Also write urls.parquet (url, caption, key): input for `fastlaion run --resize-mode no` to download the subset again at full size.")] = _SS.urls,
    include_dropped: Annotated[bool, typer.Option("--include-dropped", help="Select among every row, dropped ones too (to audit them with --where); by default only kept samples.")] = _SS.include_dropped,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Select a subset of a dataset: LAION's recipes (en, multi, nolang, laion400m, high-res,
    aesthetic-v1, art, aesthetic-v2 --min X) and/or a --where condition. Writes OUTPUT/metadata.parquet
    (the matching samples, every column) and dataset.json; --shards and --urls add tars and a URL list."""
    from .dataset.output import check_output_folder
    from .dataset.subset import subset

    _cli()._setup_logging(verbose)
    bar = _Bar(progress)
    written: list[Path] = []  # the output folder, once the new output is whole in place
    # the closing lines are printed inside too: a Ctrl-C while they print is told what was written
    with _cli().user_errors(bar, _interrupted(written, "the subset was")):
        cfg = SubsetConfig(recipe=name, minimum=minimum, where=where, include_dropped=include_dropped, shards=shards,
                           shard_size=shard_size, urls=urls)
        cfg.validate()
        check_output_folder(output)  # before the work, not after it
        ds = _open(source, allow_empty=True, needs_root="subset --shards" if shards else None)
        result = subset(ds, output, cfg, bar, written.append)
        bar.stop()
        share = f" ({100 * result.selected / result.considered:.1f}%)" if result.considered else ""
        pool = "rows" if include_dropped else "kept samples"
        _say(f"subset {result.condition}: {result.selected:,} of {result.considered:,} {pool}{share} "
             f"-> {Path(result.output) / 'metadata.parquet'}")
        if where and not include_dropped and not result.selected and (why := _drop_columns(where)):
            # `--where "reason = 'http_404'"` over kept samples only: 0, and nothing said why
            _warn(f"--where names {', '.join(why)}, which tell(s) why rows were dropped, but a subset selects among "
                  "kept samples only: add --include-dropped to select among every row")
        if shards:
            _say(f"tars: {result.tars} ({result.samples_exported:,} samples, up to {shard_size:,} per tar)"
                 + (f"; {result.samples_missing:,} selected samples not found in their tars" if result.samples_missing else "")
                 + (f"; {result.rows_not_exported:,} selected rows are not kept samples, and tars hold kept samples "
                    "only" if result.rows_not_exported else "")
                 + (f"; {result.embeddings_missing:,} samples in them have no image embedding"
                    if result.embeddings_missing else ""))
        if urls:
            _say(f"urls: {Path(result.output) / 'urls.parquet'} (download again at full size: fastlaion run "
                 f"{Path(result.output) / 'urls.parquet'} --resize-mode no -o DIR)")
        _skipped_line(result.skipped_files)
        _damaged_warnings(result.damaged_files, ds.root.resolve(), "subset --shards")


def dedup_cmd(
    source: Annotated[Path, typer.Option("--from", help="A fastlaion run folder (or a subset/dedup folder, or one Parquet file).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for metadata.parquet (every row, duplicates marked) and dataset.json.", show_default=False)],
    by: Annotated[DedupBy, typer.Option(help="url, url+caption or sha256 (of the image bytes): exact (a URL's scheme and host in any case, its path as written); hash: LAION's key, mmh3.hash64(url + caption), the hash column (no case folding, as LAION deduplicated); phash: perceptual hash of the stored images (read from the tars); embedding: cosine of the CLIP image embeddings.")] = _DD.by,
    max_hamming: Annotated[int, typer.Option(help="--by phash: images whose 64-bit pHashes differ in at most this many bits are duplicates.")] = _DD.max_hamming_bits,
    min_cosine: Annotated[float, typer.Option(help="--by embedding: images whose embeddings have at least this cosine similarity are duplicates.")] = _DD.min_cosine,
    device: Annotated[str, typer.Option(help="--by embedding: auto, cpu, cuda or cuda:N (where the cosines run).")] = _DD.device,
    method: Annotated[str, typer.Option(help="--by embedding: exact (every pair, time growing as samples squared: about a minute for 10^5 samples on 2 cores, some two hours for 10^6), clusters (SemDeDup-style: only pairs inside one k-means cluster; about 1.5 minutes for 10^6 samples on 2 cores, bounded memory, can miss a pair split across clusters) or auto (exact up to 100,000 samples on a CPU / 1,000,000 on CUDA, else clusters).")] = _DD.method,
    clusters: Annotated[int, typer.Option(help="--by embedding --method clusters (or auto, where it clusters; a warning says when it does not): how many k-means clusters; 0 = about sqrt(2 x samples). The summary estimates the share of pairs split across clusters (never compared); try another count, or --method exact, if it is high.")] = _DD.clusters,
    threads: Annotated[int, typer.Option(help="--by phash: decode threads; 0 = one per core.")] = _DD.threads,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Mark duplicate samples. Of each set of duplicates the first in dataset order (lowest key)
    stays; the others become status=dropped, stage=dedup, reason=duplicate_<by> (+ as _:
    duplicate_url_caption), with duplicate_of = the key they repeat. Every row is written to
    OUTPUT/metadata.parquet: nothing is lost."""
    from .dataset.dedup import dedup
    from .dataset.output import check_output_folder

    _cli()._setup_logging(verbose)
    bar = _Bar(progress)
    written: list[Path] = []  # the output folder, once the new output is whole in place
    # the closing lines are printed inside too: a Ctrl-C while they print is told what was written
    with _cli().user_errors(bar, _interrupted(written, "the deduplicated dataset was")):
        cfg = DedupConfig(by=by, max_hamming_bits=max_hamming, min_cosine=min_cosine, device=device, threads=threads,
                          method=method, clusters=clusters)
        cfg.validate()
        check_output_folder(output)  # before the work, not after it
        ds = _open(source, allow_empty=True,
                   needs_root=f"dedup --by {by.value}" if by in (DedupBy.phash, DedupBy.embedding) else None)
        result = dedup(ds, output, cfg, bar, written.append)
        bar.stop()
        share = f" ({100 * result.duplicates / result.candidates:.2f}%)" if result.candidates else ""
        _say(f"dedup by {result.by}: {result.duplicates:,} of {result.candidates:,} kept samples were duplicates{share}; "
             f"{result.kept:,} kept -> {Path(result.output) / 'metadata.parquet'} ({result.rows:,} rows)")
        st = result.settings
        if st.get("method") == "clusters" and st.get("clusters"):
            if st.get("probe_pairs"):
                split = (f"{100 * st['probe_pairs_split'] / st['probe_pairs']:.1f}% of the {st['probe_pairs']:,} pairs above "
                         f"--min-cosine found from {st['probe_samples']:,} probe samples straddle two clusters and were "
                         "not compared")
            elif st.get("probe_samples"):
                split = (f"the {st['probe_samples']:,} probe samples have no pair above --min-cosine, so the share of pairs "
                         "straddling two clusters (not compared) is not estimated")
            else:
                split = "too few samples to set probes aside, so the share of pairs straddling two clusters is not estimated"
            _say(f"pairs compared within {st['clusters']:,} k-means clusters (--method clusters): {split}; "
                 "--method exact compares every pair")
        if result.unreadable_samples:
            _say(f"{result.unreadable_samples:,} kept samples had no readable image/embedding and were left as they were")
        _skipped_line(result.skipped_files)
        _damaged_warnings(result.damaged_files, ds.root.resolve(), f"dedup --by {by.value}")


MAX_THUMBNAILS = 10_000  # in one HTML page, each a data: URI


def stats_cmd(
    source: Annotated[Path, typer.Argument(metavar="OUT", help="A fastlaion run folder (or a subset/dedup folder, or one Parquet file).", show_default=False)],
    html: Annotated[Optional[Path], typer.Option("--html", help="Also write one self-contained HTML page: plots and a grid of sample thumbnails.", show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures as JSON; - writes them to stdout (the tables then go to stderr).", show_default=False)] = None,
    bins: Annotated[int, typer.Option(help="Histogram bins.")] = 20,
    thumbnails: Annotated[int, typer.Option(help=f"Sample thumbnails in the HTML page (at most {MAX_THUMBNAILS:,}).")] = 48,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar (reading the thumbnails' tars).")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Print what a dataset holds: the funnel, drops per reason, histograms of similarity,
    aesthetic and punsafe, languages and image sizes."""
    from .dataset.output import check_writable_file, is_stdout, refuse_a_dataset_file, shown, write_whole
    from .dataset.stats import compute_stats

    _cli()._setup_logging(verbose)
    bar = _Bar(progress)
    written: list[Path] = []  # --json's and --html's files, each once it is whole in place

    def interrupted() -> str:
        if not written:
            return "nothing was written"
        left = [shown(p) for p in (json_path, html) if p is not None and p not in written]
        return (f"{' and '.join(map(shown, written))} {'was' if len(written) == 1 else 'were'} written, whole"
                + (f"; {' and '.join(left)} was not" if left else ""))

    # `--json -`: stdout is the JSON alone, the tables on stderr
    with _cli().lines_on_stderr(is_stdout(json_path)), _cli().user_errors(bar, interrupted):
        if not 1 <= bins <= 200:
            raise ConfigError(f"--bins must be between 1 and 200, got {bins}")
        if not 0 <= thumbnails <= MAX_THUMBNAILS:  # 10^12 was an OverflowError traceback from Polars
            raise ConfigError(f"--thumbnails must be between 0 and {MAX_THUMBNAILS:,}, got {thumbnails}")
        for flag, path in (("--json", json_path), ("--html", html)):
            if path is not None:
                check_writable_file(flag, path)  # before the work, not after it
        ds = _open(source, lost_rows=False, allow_empty=True,
                   needs_root="stats --html (its thumbnails; --thumbnails 0 leaves them out)" if html and thumbnails
                   else None)
        for flag, path in (("--json", json_path), ("--html", html)):
            if path is not None:
                refuse_a_dataset_file(flag, path, ds)
        stats = compute_stats(ds, bins)
        print_stats(stats)
        if json_path:
            write_whole(json_path, json.dumps(stats.to_dict(), indent=2), written.append)
        if html:
            from .dataset.samples import thumbnails as make_thumbnails
            from .dataset.stats import sample_rows
            from .report import render

            rows = sample_rows(ds, thumbnails) if thumbnails else None
            thumbs = make_thumbnails(ds, rows, bar) if rows is not None and rows.height else {}
            bar.stop()
            write_whole(html, render(stats, rows.to_dicts() if rows is not None else [], thumbs), written.append)
            _say(f"report: {html} ({len(thumbs)} thumbnails)")


def print_stats(stats: Any) -> None:
    total = max(1, stats.rows)
    _say(f"{stats.source} ({stats.kind}): {stats.files:,} Parquet file(s), {stats.rows:,} rows, "
         f"{stats.kept:,} kept samples")
    _skipped_line(stats.skipped_files)
    root = stats.damaged_root
    own = root is not None and Path(root) == Path(stats.source).resolve()  # a --shards subset's own files
    _damaged_lines(stats.damaged_files, None if stats.kind == "run" or own else root,
                   root is not None and _exported(Path(root)))
    t = Table(title="funnel", title_justify="left")
    for col, just in (("level", "left"), ("rows", "right"), ("%", "right"), ("dropped here", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for lvl in stats.funnel:
        t.add_row(lvl.name, f"{lvl.rows:,}", f"{100 * lvl.rows / total:.1f}",
                  (f"-{lvl.dropped:,} {lvl.stage}" if lvl.dropped else ""))
    _cli().out_console.print(t)
    if stats.drops:
        t = Table(title="drops per reason", title_justify="left")
        for col, just in (("stage", "left"), ("reason", "left"), ("rows", "right"), ("% of input", "right")):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for stage, reason, n in stats.drops:
            t.add_row(stage, reason, f"{n:,}", f"{100 * n / total:.2f}")
        _cli().out_console.print(t)
    if not stats.kept:  # histograms and counts of nothing: all zeros
        _say("no kept samples: no histograms, languages or image sizes to show")
        return
    for h in list(stats.histograms.values()) + ([stats.size_histogram] if stats.size_histogram else []):
        _print_histogram(h)
    if stats.language_groups:
        _print_counts("language groups (kept)", stats.language_groups.items(), stats.kept)
    if stats.languages:
        _print_counts("languages (kept, top)", stats.languages, stats.kept)
    if stats.size_buckets:
        _print_counts("image short side (kept, original)", stats.size_buckets, stats.kept)


DAMAGED_SHOWN = 10


def _damaged_lines(damaged: list[dict[str, str]], run: str | None = None, exported: bool = False) -> None:
    """A run's shard files that are missing or cut: a count, then one line a problem (the first
    DAMAGED_SHOWN; --json lists every one). `run`: the run folder they are in, where it is not the
    dataset's own (a subset's, a dedup's); `exported`: the files are those a `subset --shards`
    wrote (its own, or those of the one `run` names)."""
    if not damaged:
        return
    shards = len({d["shard"] for d in damaged})
    of = (f" of {run}, which this dataset's samples are in" if run and exported else
          f" of the run {run}, which this dataset's samples are in" if run else "")
    again = ("the `fastlaion subset --shards` that wrote them writes them again" if exported else
             "`fastlaion run` with the same arguments writes those shards again")
    _say(f"damaged: {len(damaged):,} problem(s) with the files of {shards:,} finished shard(s){of}; {again}")
    for d in damaged[:DAMAGED_SHOWN]:
        _say(f"  shard {d['shard']}: {d['problem']}")
    if len(damaged) > DAMAGED_SHOWN:
        _say(f"  ... and {len(damaged) - DAMAGED_SHOWN:,} more (--json lists every one)")


def _damaged_warnings(damaged: list[dict[str, str]], root: Path, what: str) -> None:
    """One line on stderr for each of the run's files that `what` needed and found damaged
    (Dataset.damage), which it read as a missing one."""
    again = ("the `fastlaion subset --shards` that wrote it writes it again" if _exported(root) else
             "`fastlaion run` with the same arguments writes shard {} again")
    for d in damaged:
        read = "" if d["problem"].endswith(" is missing") else ", so it was not read (as if missing)"
        _warn(f"{what}: {root / d['problem']}{read}; {again.format(d['shard'])}")


def _exported(root: Path) -> bool:
    """Whether `root` is a folder that `subset --shards` wrote (its shards.json), not a run's."""
    from .dataset.source import SHARDS_FILE

    return (root / SHARDS_FILE).is_file()


def _print_counts(title: str, items: Any, total: int) -> None:
    t = Table(title=title, title_justify="left")
    t.add_column("value")
    t.add_column("rows", justify="right")
    t.add_column("%", justify="right")
    for k, n in items:
        t.add_row(escape(str(k)), f"{n:,}", f"{100 * n / max(1, total):.1f}")  # values are data, not markup
    _cli().out_console.print(t)


def _print_histogram(h: Any) -> None:
    mean = f", mean {h.mean:.4g}" if h.mean is not None else ""
    t = Table(title=f"{h.column} (kept: {h.values:,} values, {h.nulls:,} missing{mean})", title_justify="left")
    t.add_column("bin")
    t.add_column("rows", justify="right")
    t.add_column("", no_wrap=True)
    top = max(h.counts) if h.counts and max(h.counts) else 1
    for i, n in enumerate(h.counts):
        lo, hi = h.edges[i], h.edges[i + 1]
        label = f"{lo:.4g} +" if (h.last_open and i == len(h.counts) - 1) else f"{lo:.4g} .. {hi:.4g}"
        t.add_row(label, f"{n:,}", "█" * round(30 * n / top))
    _cli().out_console.print(t)


def search_cmd(
    source: Annotated[Path, typer.Argument(metavar="OUT", help="A fastlaion run folder (or a subset/dedup folder, or one Parquet file) with image embeddings.", show_default=False)],
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="Find the samples whose images best match this text (repeatable).", show_default=False)] = None,
    image: Annotated[Optional[list[Path]], typer.Option("--image", help="Find the samples most like this image file (repeatable).", show_default=False)] = None,
    vector: Annotated[Optional[list[Path]], typer.Option("--vector", help="A .npy embedding made elsewhere, of the run's model (repeatable); needs no model.", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", help="How many samples per query.")] = 10,
    model: Annotated[Optional[str], typer.Option(help="open_clip architecture for the queries; default: the one the run scored with (its config.json).", show_default=False)] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Its weights: tag or checkpoint path; default: the run's.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (where the queries are embedded).")] = "auto",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write every hit (rank, similarity, key, url, caption) as JSON; - writes it to stdout (the hits' lines then go to stderr).", show_default=False)] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Compare every embedding even where `fastlaion index` built an index.")] = False,
    probes: Annotated[int, typer.Option(help="With an index: how many of its cells a query reads; more finds more of the exact answer, slower. 0: a sixteenth of them.")] = 0,
    rerank: Annotated[int, typer.Option(help="With an index of --pq codes: how many candidates a query takes by the codes' approximate cosines and ranks again by their stored embeddings; more finds more of the exact answer, slower. 0: 50 x k, at least 1,000.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Find the kept samples most like a text, an image or a vector: the query is embedded with
    the CLIP model the run scored with, and every kept sample's image embedding is compared with
    it (exact cosine, shard by shard), or, where `fastlaion index` built an index that matches the
    dataset, the samples in the index's cells nearest the query (fast; may miss a few). Prints the
    k best per query."""
    from .dataset.output import check_writable_file, is_stdout, refuse_a_dataset_file, shown, write_whole
    from .dataset.search import Query, SearchConfig, run_search

    _cli()._setup_logging(verbose)
    bar = _Bar(progress)
    queries = ([Query("text", t) for t in text or []] + [Query("image", str(p)) for p in image or []]
               + [Query("vector", str(p)) for p in vector or []])
    written: list[Path] = []  # --json's file, once it is whole in place
    # the hits are printed inside too: a Ctrl-C while they print is told what was written
    # `--json -`: stdout is the JSON alone, the hits' lines on stderr
    with _cli().lines_on_stderr(is_stdout(json_path)), \
            _cli().user_errors(bar, _interrupted(written, "the hits were", "nothing was written")):
        cfg = SearchConfig(k=k, model=model, pretrained=pretrained, device=device, exact=exact, probes=probes,
                           rerank=rerank)
        cfg.validate()
        if json_path is not None:
            check_writable_file("--json", json_path)  # before the search, not after it
        ds = _open(source, allow_empty=True, needs_root="search")
        if json_path is not None:
            refuse_a_dataset_file("--json", json_path, ds)
        result = run_search(ds, queries, cfg, bar)
        if json_path is not None:
            write_whole(json_path, json.dumps(result.to_dict(), indent=2, ensure_ascii=False), written.append)
        bar.stop()
        how = ""
        if result.index:
            how = f" (index: {result.index['probes']:,} of {result.index['cells']:,} cells read"
            if result.index.get("pq"):
                how += f", the best {result.index['reranked']:,} by the {result.index['pq']}-byte codes ranked again"
            how += ")"
        for q, hits in zip(result.queries, result.hits):
            label = f'"{q.value}"' if q.kind == "text" else q.value
            _say(f"{q.kind} {label}: the {len(hits):,} best of {result.samples:,} kept samples{how} "
                 "(rank, cosine similarity, key, url, caption)")
            width = len(str(len(hits)))
            for h in hits:  # one line a hit, never wrapped: it greps and pastes well
                caption = " ".join((h.caption or "").split())
                _say(f"  {h.rank:>{width}}  {h.similarity:.4f}  {h.key}  {h.url or '-'}  "
                     f"{caption[:100] + ('...' if len(caption) > 100 else '')}")
        if result.short:
            _say(_short_line(result.short, result.index or {}, len(result.queries)))
        if result.unreadable_samples:
            _say(f"{result.unreadable_samples:,} kept samples had no readable embedding and were not searched")
        if json_path is not None:
            _say(f"hits written to {shown(json_path)}")
        _skipped_line(result.skipped_files)


def _short_line(short: dict[str, int], index: dict[str, int], queries: int) -> str:
    """One line: the index gave fewer hits than -k asked, and what finds more."""
    k = short["k"]
    which = (f"only {short['fewest']:,} of the {k:,} hits asked (-k) were found" if queries == 1 else
             f"{short['queries']:,} of the {queries:,} queries got fewer than the {k:,} hits asked (-k) (the fewest: "
             f"{short['fewest']:,})")
    if short["probes_needed"]:
        return (f"{which}: the index cells read ({index['probes']:,} of {index['cells']:,}) hold no more; "
                f"--probes {short['probes_needed']:,} (or more) reads enough of them, or --exact compares every "
                "embedding")
    return f"{which}: some candidates' embeddings could not be read; --exact compares every readable embedding"


def index_cmd(
    source: Annotated[Path, typer.Argument(metavar="OUT", help="A fastlaion run folder (or a subset/dedup folder, or one Parquet file) with image embeddings.", show_default=False)],
    cells: Annotated[int, typer.Option(help="Cells (k-means centroids) of the index; 0: 4 x the square root of the kept samples, at most one per 64 of them and 15,625.")] = 0,
    threads: Annotated[int, typer.Option(help="faiss's threads; 0: every core.")] = 0,
    pq: Annotated[int, typer.Option(metavar="BYTES", help="Store each sample as BYTES bytes of product-quantized codes (faiss IVFPQ; BYTES must divide the dimensions: 64 for ViT-B/32's 512 is 1/16 of the float16 vectors) instead of its float16 vector (2 bytes a dimension), for datasets whose vectors do not fit in memory; search then ranks the best candidates again by their stored embeddings. 0: float16. Needs 9,984 or more samples.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Build a kNN index of the kept samples' image embeddings (faiss IVF, float16 or --pq codes,
    cosine) in OUT/index/, so that `fastlaion search OUT` reads a few cells per query instead of
    every embedding. Search uses it while the dataset's files are the ones it was built from;
    rerun this after the dataset changes."""
    from .dataset.index import IndexConfig, build_index, default_probes

    _cli()._setup_logging(verbose)
    bar = _Bar(progress)
    written: list[Path] = []  # the index's folder, once the new index is whole in place
    # the closing line is printed inside too: a Ctrl-C while it prints is told what was written
    with _cli().user_errors(bar, _interrupted(written, "the index was", "the index was not replaced; rerun the command",
                                              "; search uses it")):
        cfg = IndexConfig(cells=cells, threads=threads, pq=pq)
        cfg.validate()
        ds = _open(source, allow_empty=True, needs_root="index")
        result = ds.guarded(lambda d: build_index(d, cfg, bar, written.append))
        bar.stop()
        probes = default_probes(result.cells)
        codes = f", {result.pq}-byte codes a sample" if result.pq else ", float16"
        _say(f"index: {result.samples:,} kept samples in {result.cells:,} cell{'s' * (result.cells != 1)} "
             f"({result.dim} dimensions{codes}, {result.bytes / 2**20:,.1f} MiB) -> {result.path}, in "
             f"{result.seconds:.1f} s; search reads {probes:,} cell{'s' * (probes != 1)} a query by default (--probes)")
        if result.unreadable_samples:
            _say(f"{result.unreadable_samples:,} kept samples had no readable embedding and are not in the index")


def classify_cmd(
    source: Annotated[Path, typer.Option("--from", help="A fastlaion run folder (or a subset/dedup folder, or one Parquet file) with image embeddings.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for metadata.parquet (every row, zero_shot_label / zero_shot_score / zero_shot_top added) and dataset.json.", show_default=False)],
    class_names: Annotated[Optional[list[str]], typer.Option("--class", "-c", help="A class name (repeatable), e.g. --class cat --class dog.", show_default=False)] = None,
    classes_file: Annotated[Optional[Path], typer.Option("--classes", help="A text file of class names, one a line (blank lines and # comments skipped).", show_default=False)] = None,
    template: Annotated[Optional[list[str]], typer.Option("--template", help="A prompt with {} where the class name goes (repeatable; their embeddings are averaged). Default: 'a photo of a {}.'", show_default=False)] = None,
    templates: Annotated[Optional[str], typer.Option("--templates", help=TEMPLATES_HELP, show_default=False)] = None,
    top: Annotated[int, typer.Option(help="Classes per sample in zero_shot_top, best first (at most 16).")] = 1,
    model: Annotated[Optional[str], typer.Option(help="open_clip architecture for the class prompts; default: the one the run scored with (its config.json).", show_default=False)] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Its weights: tag or checkpoint path; default: the run's.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Zero-shot classify the kept samples into the classes given, from the image embeddings the
    run stored and the run's CLIP model (class prompts averaged, as CLIP's zero-shot recipe).
    Every row is written to OUTPUT/metadata.parquet with zero_shot_label, zero_shot_score and
    zero_shot_top; `fastlaion subset --where "zero_shot_label = 'cat'"` selects a class."""
    from .dataset.classify import ClassifyConfig, classify
    from .dataset.output import check_output_folder

    _cli()._setup_logging(verbose)
    bar = _Bar(progress)
    written: list[Path] = []  # the output folder, once the new output is whole in place
    # the closing lines are printed inside too: a Ctrl-C while they print is told what was written
    with _cli().user_errors(bar, _interrupted(written, "the labelled dataset was")):
        names = list(class_names or [])
        if classes_file is not None:
            names += _class_file("--classes", classes_file)
        cfg = ClassifyConfig(classes=tuple(names), templates=_templates(template, templates), top=top,
                             model=model, pretrained=pretrained, device=device)
        cfg.validate()
        check_output_folder(output)  # before the work (the model's loading), not after it
        ds = _open(source, allow_empty=True, needs_root="classify")
        result = classify(ds, output, cfg, bar, written.append)
        bar.stop()
        _say(f"classify: {result.classified:,} of {result.kept:,} kept samples labelled over {len(cfg.classes):,} "
             f"classes with {result.model} -> {Path(result.output) / 'metadata.parquet'} ({result.rows:,} rows)")
        if result.counts:
            _print_counts("best class (kept samples)", list(result.counts.items())[:50], result.classified)
        if result.unreadable_samples:
            _say(f"{result.unreadable_samples:,} kept samples had no readable embedding: no label")
        _skipped_line(result.skipped_files)


def _class_file(flag: str, path: Path) -> list[str]:
    """The class names in the text file `path`, one a line, blank lines and # comments skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e})") from None
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not listed:
        raise ConfigError(f"{flag} {path}: no class names in it (one a line; blank lines and # comments are skipped)")
    return listed


TEMPLATES_HELP = ("A named set of prompts instead of --template: openai (OpenAI CLIP's 80 ImageNet prompts, as "
                  "published zero-shot figures use) or openai-simple (its 7-prompt subset).")


def _templates(given: list[str] | None, named: str | None) -> tuple[str, ...]:
    """The prompt templates of --template (repeatable) or --templates NAME; the default one alone."""
    from .dataset.classify import DEFAULT_TEMPLATES, template_set

    if named is not None:
        if given:
            raise ConfigError("--template and --templates: give your own prompts or a named set, not both")
        return template_set(named)
    return tuple(given or DEFAULT_TEMPLATES)


def _class_names(path: Path) -> tuple[str, ...]:
    """--classnames: a file's names, or 'imagenet' (where no file of that name is) for ImageNet-1k's,
    open_clip's list in class-index order, which is the sorted order of ImageNet's wnid folders."""
    if str(path) == "imagenet" and not path.exists():
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return tuple(IMAGENET_CLASSNAMES)
    return tuple(_class_file("--classnames", path))


_SC = ScoreConfig()
MAX_CLASS_ROWS = 50  # more classes: the table lists the worst recalls; --json has every one


def evaluate_cmd(
    images_dir: Annotated[Path, typer.Argument(metavar="IMAGES_DIR", help="A labelled image folder: one subfolder per class (its name the class name, '_' read as a space), its images inside (JPEG, PNG, WebP).", show_default=False)],
    model: Annotated[str, typer.Option(help="open_clip architecture.")] = _SC.model,
    pretrained: Annotated[str, typer.Option(help="Its weights: an open_clip tag, a local checkpoint path, or none (random).")] = _SC.pretrained,
    classnames: Annotated[Optional[Path], typer.Option("--classnames", help="A text file of class names for the prompts, one a line in the class folders' name order (blank lines and # comments skipped), or 'imagenet': ImageNet-1k's 1,000 names as open_clip gives them, in the order of its wnid folders (n01440764 ...); default: the folders' names.", show_default=False)] = None,
    template: Annotated[Optional[list[str]], typer.Option("--template", help="A prompt with {} where the class name goes (repeatable; their embeddings are averaged per class). Default: 'a photo of a {}.'", show_default=False)] = None,
    templates: Annotated[Optional[str], typer.Option("--templates", help=TEMPLATES_HELP, show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per CLIP forward pass.")] = _SC.batch_size,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = _SC.device,
    precision: Annotated[str, typer.Option(help="auto (as `fastlaion run`: fp16 on CUDA, bf16 on a CPU with AMX, else fp32), fp16, bf16 or fp32.")] = _SC.precision,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the figures, per-class recall and the images that did not decode as JSON; - writes it to stdout (the table then goes to stderr).", show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="At most this many images per class (the first by path), for a quick check; 0: every one.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
) -> None:
    """Zero-shot accuracy of a CLIP model on a labelled image folder (as clip_benchmark's zero-shot
    classification): each class name through the prompt templates, averaged (CLIP's recipe), each
    image decoded as `fastlaion run` decodes it, its best classes by cosine. Prints top-1 and top-5
    accuracy, mean per-class recall, each class's images and recall, and the most confused pairs."""
    from .dataset.output import check_writable_file, is_stdout, shown, write_whole
    from .evaluation import EvaluateConfig, evaluate

    _cli()._setup_logging(verbose)
    bar = _Bar(progress)
    written: list[Path] = []  # --json's file, once it is whole in place
    # the figures are printed inside too: a Ctrl-C while they print is told what was written;
    # `--json -`: stdout is the JSON alone, the figures' lines on stderr
    with _cli().lines_on_stderr(is_stdout(json_path)), \
            _cli().user_errors(bar, _interrupted(written, "the figures were", "nothing was written")):
        cfg = EvaluateConfig(images_dir=images_dir, templates=_templates(template, templates), limit=limit,
                             score=ScoreConfig(model=model, pretrained=pretrained, batch_size=batch_size,
                                               device=device, precision=precision))
        cfg.validate()
        if json_path is not None:
            check_writable_file("--json", json_path)  # before the work, not after it
        if classnames is not None:
            cfg = replace(cfg, classes=_class_names(classnames))
        result = evaluate(cfg, bar)
        if json_path is not None:
            write_whole(json_path, json.dumps(result.to_dict(), indent=2, ensure_ascii=False), written.append)
        bar.stop()
        _print_evaluation(result)
        if json_path is not None:
            _say(f"figures written to {shown(json_path)}")


def _print_evaluation(r: Any) -> None:
    """The figures, a table of the classes, the most confused pairs, and what did not decode."""
    prompts = f"{len(r.templates)} prompt template{'s' * (len(r.templates) != 1)}"
    _say(f"evaluate {r.model} ({r.pretrained}), {r.precision} on {r.device}, {prompts}: {r.images:,} images in "
         f"{r.classes:,} classes of {r.images_dir}")
    top5 = f"{100 * r.top5:6.2f}%" if r.top5 is not None else "     -  (5 classes or fewer: every image's class is among its 5 best)"
    _say(f"  top-1 accuracy         {100 * r.top1:6.2f}%")
    _say(f"  top-5 accuracy         {top5}")
    empty = [c["class"] for c in r.per_class if c["recall"] is None]  # no image of theirs decoded
    _say(f"  mean per-class recall  {100 * r.mean_per_class_recall:6.2f}%"
         + (f"  (over {r.classes - len(empty):,} of {r.classes:,} classes: none of {', '.join(empty[:3])}"
            f"{' ...' if len(empty) > 3 else ''}'s images decoded)" if empty else ""))
    rows = r.per_class
    title = "per class (top-1 recall)"
    if len(rows) > MAX_CLASS_ROWS:  # the classes without a decoded image first, as the worst
        rows = sorted(rows, key=lambda c: -1.0 if c["recall"] is None else c["recall"])[:MAX_CLASS_ROWS]
        title = f"the {len(rows)} classes of lowest top-1 recall (every class: --json)"
    t = Table(title=title, title_justify="left")
    t.add_column("class")
    t.add_column("images", justify="right")
    t.add_column("recall %", justify="right")
    for c in rows:  # names are data, not markup
        t.add_row(escape(c["class"]), f"{c['images']:,}", "-" if c["recall"] is None else f"{100 * c['recall']:.1f}")
    _cli().out_console.print(t)
    if r.confused:
        _say("most confused (true -> predicted: images, share of the true class's):")
        for c in r.confused:
            _say(f"  {c['true']} -> {c['predicted']}: {c['images']:,} ({100 * c['share']:.1f}%)")
    if r.undecodable:
        _warn(f"{len(r.undecodable):,} image(s) did not decode and are not counted: "
              + ", ".join(f"{u['path']} ({u['reason']})" for u in r.undecodable[:5])
              + (" ... (every one: --json)" if len(r.undecodable) > 5 else ""))
