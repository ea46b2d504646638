"""The progress bars of `fastlaion run` and `fastlaion extract` (rich).

Apart from fastlaion/cli.py so that rich's progress module is imported only by a command that
draws a bar, not at every start-up (`fastlaion extract --no-progress`, `--help`, `version`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rows = task.fields.get("rows", 0)
        kept = task.fields.get("kept", 0)
        elapsed = task.elapsed or 0.0
        rate = rows / elapsed if elapsed > 0 else 0.0
        share = f"{100 * kept / rows:.0f}%" if rows else "-"
        return Text(f"{rate:,.0f} samples/s  kept {kept:,}/{rows:,} ({share})", style="cyan")


class _StageColumn(ProgressColumn):
    """Each stage's rows per second of its own busy time, in one worker (decode: in one decode
    thread). Compared with the overall samples/s they show which stage holds the run back."""

    def render(self, task: Task) -> Text:
        rows: dict[str, int] = task.fields.get("stage_rows", {})
        busy: dict[str, float] = task.fields.get("stage_busy", {})
        parts = [f"{stage} {rows[stage] / secs:,.0f}/s" for stage, secs in busy.items()
                 if secs > 0.01 and rows.get(stage)]
        return Text(("stages: " + " · ".join(parts)) if parts else "", style="dim")


class Bar(Progress):
    """rich's Progress whose stop() only stops a bar that is running: rich's prints a blank line
    on a console that is no terminal (a log file) even for a bar never started or stopped twice,
    and the error paths stop every bar."""

    def stop(self) -> None:
        if self.live.is_started:
            super().stop()


class BarProgress:
    """Draws the pipeline's progress: shards done, samples/s, kept share, per-stage rates."""

    def __init__(self, console: Console, enabled: bool):
        self.console = console
        self.bar = Bar(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                            TimeElapsedColumn(), _StageColumn(), console=console, disable=not enabled)
        self.task: Any = None
        self.shards_total: int | None = None  # once the input is read and the run starts
        self.rows = self.kept = 0
        self.stage_rows: dict[str, int] = {}
        self.stage_busy: dict[str, float] = {}
        # Reading a large input (100M rows: a minute or more) before the first shard starts.
        self.reading = Bar(TextColumn("[bold]reading input"), TextColumn("{task.completed:,.0f} rows"),
                                TimeElapsedColumn(), console=console, disable=not enabled, transient=True)
        self.reading_task: Any = None

    def reading_input(self, rows: int) -> None:
        if self.reading_task is None:
            self.reading.start()
            self.reading_task = self.reading.add_task("input", total=None)
        self.reading.advance(self.reading_task, rows)

    def start(self, shards_total: int, shards_done: int, rows_total: int, rows_done: int) -> None:
        self.reading.stop()
        self.shards_total = shards_total
        if shards_done:
            self.console.print(f"resuming: {shards_done} of {shards_total} shards already complete, skipped")
        self.bar.start()
        self.task = self.bar.add_task("run", total=shards_total, completed=shards_done, rows=0, kept=0)

    def rows_done(self, rows: int, kept: int, busy_s: dict[str, float] | None = None) -> None:
        self._count(rows, kept, busy_s, 1)

    def rows_undone(self, rows: int, kept: int, busy_s: dict[str, float] | None = None) -> None:
        """A rows_done taken back: a worker lost with its Ray node had reported these rows of a
        shard that another worker runs again (workers.drive)."""
        self._count(rows, kept, busy_s, -1)

    def _count(self, rows: int, kept: int, busy_s: dict[str, float] | None, sign: int) -> None:
        self.rows += sign * rows
        self.kept += sign * kept
        for stage, secs in (busy_s or {}).items():
            if secs > 0:
                self.stage_rows[stage] = self.stage_rows.get(stage, 0) + sign * rows
                self.stage_busy[stage] = self.stage_busy.get(stage, 0.0) + sign * secs
        self.bar.update(self.task, rows=self.rows, kept=self.kept, stage_rows=self.stage_rows,
                        stage_busy=self.stage_busy)

    def shard_done(self, stats: dict[str, Any]) -> None:
        self.bar.advance(self.task)

    def extracting(self) -> Any:
        return ExtractBar(self.console, not self.bar.disable)

    def stop(self) -> None:
        self.reading.stop()
        self.bar.stop()


class _ExtractRateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        records = task.fields.get("records", 0)
        elapsed = task.elapsed or 0.0
        rate = records / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} records/s  {task.fields.get('pairs', 0):,} pairs", style="cyan")


class ExtractBar:
    """Draws extraction progress: input files done, records/s, pairs found so far."""

    def __init__(self, console: Console, enabled: bool):
        self.bar = Bar(TextColumn("[bold]files"), BarColumn(), MofNCompleteColumn(), _ExtractRateColumn(),
                            TimeElapsedColumn(), console=console, disable=not enabled)
        self.task: Any = None
        self.records = self.pairs = 0

    def start(self, n_inputs: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("extract", total=n_inputs, records=0, pairs=0)

    def advance(self, records: int, pairs: int) -> None:
        self.records += records
        self.pairs += pairs
        self.bar.update(self.task, records=self.records, pairs=self.pairs)

    def input_done(self, stats: Any) -> None:
        self.bar.advance(self.task)

    def stop(self) -> None:
        self.bar.stop()
