"""`Batch`: the one data type for a shard's rows as they move through the stages.

Metadata is a Polars frame (one row per live sample); images, tensors and byte strings are
payload columns kept aligned with it. Rows leave a batch only through `Batch.drop`, which
records the stage and the reason, so payloads and metadata cannot drift apart and the funnel
(input -> downloaded -> decoded -> scored -> kept) is a count over the recorded reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

# The stages that may drop rows, in pipeline order. The funnel's level after each one:
STAGES = ("download", "decode", "score", "filter")
FUNNEL_LEVELS = ("downloaded", "decoded", "scored", "kept")

KEPT = "kept"
DROPPED = "dropped"


class Batch:
    """Live rows of (part of) one shard, with aligned payloads and the rows dropped so far.

    `rows` must hold an integer column `row`: the row's index within its shard, which orders the
    shard's Parquet and keys its samples.
    """

    def __init__(self, rows: pl.DataFrame, payload: dict[str, Sequence[Any] | np.ndarray] | None = None):
        if "row" not in rows.columns:
            raise ValueError("a Batch needs a 'row' column")
        self.rows = rows
        self.payload: dict[str, Sequence[Any] | np.ndarray] = {}
        self._dropped: list[pl.DataFrame] = []
        for name, values in (payload or {}).items():
            self.set_payload(name, values)

    def __len__(self) -> int:
        return self.rows.height

    def set_payload(self, name: str, values: Sequence[Any] | np.ndarray) -> None:
        if len(values) != self.rows.height:
            raise ValueError(f"payload {name!r} has {len(values)} items for {self.rows.height} rows")
        self.payload[name] = values

    def with_columns(self, **columns: Any) -> None:
        """Add or replace metadata columns (Series, arrays or lists aligned with the live rows)."""
        self.rows = self.rows.with_columns(
            [pl.Series(name, values) if not isinstance(values, pl.Expr) else values.alias(name)
             for name, values in columns.items()]
        )

    def drop(self, mask: np.ndarray | pl.Series | Sequence[bool], stage: str,
             reason: str | Sequence[str | None] | np.ndarray | pl.Series) -> int:
        """Remove the rows where `mask` is true, recording `stage` and `reason` for each.

        `reason` is one string for all, or one per live row (only the masked ones are read).
        Returns the number of rows dropped.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.rows.height,):
            raise ValueError(f"mask has shape {mask.shape} for {self.rows.height} rows")
        n = int(mask.sum())
        if n == 0:
            return 0
        if isinstance(reason, str):
            reasons = pl.Series("reason", [reason] * n, dtype=pl.String)
        else:
            reasons = pl.Series("reason", np.asarray(reason, dtype=object)[mask], dtype=pl.String)
            if reasons.null_count():
                raise ValueError(f"stage {stage!r} dropped rows without a reason")
        gone = self.rows.filter(pl.Series(mask)).with_columns(
            pl.lit(DROPPED).alias("status"), pl.lit(stage).alias("stage"), reasons
        )
        self._dropped.append(gone)
        keep = ~mask
        self.rows = self.rows.filter(pl.Series(keep))
        idx = np.flatnonzero(keep)
        for name, values in self.payload.items():
            if isinstance(values, np.ndarray):
                self.payload[name] = values[keep]
            elif hasattr(values, "index_select"):  # a torch tensor, without importing torch here
                import torch

                self.payload[name] = values.index_select(0, torch.as_tensor(idx, device=values.device))
            else:
                self.payload[name] = [values[i] for i in idx]
        return n

    @property
    def dropped(self) -> pl.DataFrame:
        return pl.concat(self._dropped, how="diagonal_relaxed") if self._dropped else pl.DataFrame()

    def outcome(self) -> pl.DataFrame:
        """Every row this batch started with, kept or dropped, in `row` order, with
        `status`, `stage` and `reason` (null stage and reason for kept rows)."""
        kept = self.rows.with_columns(
            pl.lit(KEPT).alias("status"), pl.lit(None, dtype=pl.String).alias("stage"),
            pl.lit(None, dtype=pl.String).alias("reason"),
        )
        return pl.concat([kept, *self._dropped], how="diagonal_relaxed").sort("row")


def funnel(outcome: pl.DataFrame) -> dict[str, Any]:
    """Counts for the funnel from a frame of outcomes (one or many shards).

    Returns {"input": n, "downloaded": n, ..., "kept": n, "drops": {stage: {reason: n}}};
    each level equals the previous one minus that stage's drops, by construction.
    """
    total = outcome.height
    drops: dict[str, dict[str, int]] = {s: {} for s in STAGES}
    if total:
        counted = (outcome.filter(pl.col("status") == DROPPED)
                   .group_by("stage", "reason").len().sort("stage", "len", descending=[False, True]))
        for stage, reason, n in counted.iter_rows():
            drops[stage][reason] = int(n)
    levels: dict[str, Any] = {"input": total}
    left = total
    for stage, level in zip(STAGES, FUNNEL_LEVELS):
        left -= sum(drops[stage].values())
        levels[level] = left
    levels["drops"] = drops
    return levels


def merge_funnels(funnels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Add up per-shard funnels (as stored in `{shard}_stats.json`)."""
    out: dict[str, Any] = {"input": 0, **{lvl: 0 for lvl in FUNNEL_LEVELS}, "drops": {s: {} for s in STAGES}}
    for f in funnels:
        for key in ("input", *FUNNEL_LEVELS):
            out[key] += f[key]
        for stage, reasons in f["drops"].items():
            for reason, n in reasons.items():
                out["drops"][stage][reason] = out["drops"][stage].get(reason, 0) + n
    return out
