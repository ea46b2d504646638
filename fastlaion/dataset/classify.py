"""Zero-shot classification of a dataset's kept samples, from the image embeddings the run
stored: each class name goes through prompt templates ("a photo of a {}."), their text
embeddings are averaged into one unit vector per class (CLIP's zero-shot recipe), and each kept
sample gets its best classes by cosine (fastlaion.ops.topk_cosine: our CUDA kernel on a GPU, its
pure-torch reference on the CPU), one shard at a time.

Every row is written to OUTPUT/metadata.parquet, unchanged, with three columns added:
`zero_shot_label` (the best class), `zero_shot_score` (its cosine) and `zero_shot_top` (the
`--top` best classes, best first); null where a row is not kept or has no readable embedding.
`fastlaion subset --where "zero_shot_label = 'cat'"` then selects a class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..config import ConfigError
from .output import OutputDir
from .search import RUN_CONFIG, SearchConfig, run_score_config
from .semantic import EmbeddingReader
from .source import KEPT, METADATA_FILE, Dataset, NoProgress, Progress, collect, sink_parquet

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# Named prompt sets (--templates NAME): OpenAI CLIP's ImageNet prompts as open_clip ships them
# (open_clip.zero_shot_metadata, from OpenAI's prompt-engineering notebook), so that a zero-shot
# figure is comparable with the published ones and clip_benchmark's
TEMPLATE_SETS = {"openai": "OPENAI_IMAGENET_TEMPLATES", "openai-simple": "SIMPLE_IMAGENET_TEMPLATES"}
PROMPTS_A_PASS = 1024  # class prompts embedded at a time (1,000 classes x 80 prompts would not fit at once)
COLUMNS = ("zero_shot_label", "zero_shot_score", "zero_shot_top")
MAX_TOP = 16  # topk_cosine's bound


@dataclass(frozen=True)
class ClassifyConfig:
    classes: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    top: int = 1                    # classes kept per sample in zero_shot_top
    model: str | None = None        # None: the run's (config.json)
    pretrained: str | None = None
    device: str = "auto"

    def validate(self) -> None:
        if not self.classes:
            raise ConfigError("no classes: give --class NAME (repeatable) or --classes FILE (one a line)")
        blank = [c for c in self.classes if not c.strip()]
        if blank:
            raise ConfigError("a class name is empty")
        twice = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if twice:
            raise ConfigError(f"class named twice: {', '.join(repr(c) for c in twice)}")
        bad = [t for t in self.templates if t.count("{}") != 1 or not _fills_once(t)]
        if bad:
            raise ConfigError(f"--template {bad[0]!r} must hold '{{}}' once, where the class name goes, and no "
                              "other brace (write '{{' and '}}' for a brace of the text)")
        if not 1 <= self.top <= min(MAX_TOP, len(self.classes)):
            raise ConfigError(f"--top must be between 1 and {min(MAX_TOP, len(self.classes))} "
                              f"(the classes, at most {MAX_TOP}), got {self.top}")
        SearchConfig(device=self.device).validate()


def _fills_once(template: str) -> bool:
    """Whether str.format puts a class name into `template` exactly once: '{} {x}' and 'a {} }'
    had one '{}' and failed (KeyError, ValueError) once the model was loaded; 'a {{}}' has no
    place for the name."""
    try:
        return template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError):
        return False


@dataclass
class ClassifyResult:
    output: str
    rows: int                     # every row written
    kept: int                     # kept samples
    classified: int               # of them, with an embedding: labelled
    unreadable_samples: int       # kept samples without a readable embedding
    counts: dict[str, int]        # samples per best class, most first
    model: str
    templates: list[str]
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def template_set(name: str, flag: str = "--templates") -> tuple[str, ...]:
    """The prompts of a named set (TEMPLATE_SETS) as '{}' templates, or a one-line error."""
    if name not in TEMPLATE_SETS:
        raise ConfigError(f"{flag} {name!r}: no such prompt set; the sets are {', '.join(TEMPLATE_SETS)} "
                          "(or give your own with --template, repeatable)")
    from open_clip import zero_shot_metadata

    return tuple(make("{}") for make in getattr(zero_shot_metadata, TEMPLATE_SETS[name]))


def class_embeddings(scorer: Any, classes: tuple[str, ...], templates: tuple[str, ...],
                     progress: Progress | None = None, per_pass: int = PROMPTS_A_PASS) -> Any:
    """(C, D) unit float32 tensor on the scorer's device: per class, the mean of its prompts'
    unit text embeddings, made unit again. The prompts go through the text tower `per_pass` at a
    time (ImageNet's 1,000 classes with OpenAI's 80 prompts are 80,000: minutes on a CPU, told to
    `progress` as "class prompts" where there is more than one pass)."""
    import torch

    prompts = [t.format(c) for c in classes for t in templates]
    bar = progress if progress is not None and len(prompts) > per_pass else NoProgress()
    bar.start("class prompts", len(prompts))
    parts = []
    for i in range(0, len(prompts), per_pass):
        parts.append(scorer.embed_texts(prompts[i:i + per_pass]))
        bar.advance(len(parts[-1]))
    bar.stop()
    emb = torch.cat(parts).view(len(classes), len(templates), -1)  # unit rows, on the host
    return torch.nn.functional.normalize(emb.mean(dim=1), dim=1).to(scorer.device)


def classify(ds: Dataset, out: Path, cfg: ClassifyConfig, progress: Progress | None = None,
             written: Callable[[Path], None] | None = None) -> ClassifyResult:
    """Write `out/metadata.parquet` (every row of `ds`, the zero-shot columns added) and
    `out/dataset.json`; `written(out)` is called once they are whole in place (OutputDir)."""
    cfg.validate()
    progress = progress or NoProgress()
    started = time.perf_counter()
    ds.require(("key", "status"), "classify")
    clash = [c for c in COLUMNS if c in ds.columns]
    if clash:
        raise ConfigError(f"{ds.path} already has {', '.join(clash)} (a classify output): classify the run it came "
                          "from, or drop those columns")
    score = run_score_config(ds, SearchConfig(model=cfg.model, pretrained=cfg.pretrained, device=cfg.device),
                             "classify")
    target = OutputDir(out, ds, written, "classify")

    def job(d: Dataset) -> ClassifyResult:
        import torch

        from ..ops import topk_cosine
        from ..score import Scorer, pick_device

        cand = collect(d.scan().with_row_index("_i").filter(pl.col("status") == KEPT)
                       .select("_i", *d.sample_columns()))
        # no kept sample (a subset that matched nothing): the labelled dataset, empty, without a model
        classes = (class_embeddings(Scorer(score, pick_device(score.device)), cfg.classes, cfg.templates, progress)
                   if cand.height else None)
        rows_i: list[np.ndarray] = []
        best: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        reader = EmbeddingReader(d, cand, "classify") if cand.height else None
        for pos, vec in (reader.shards(progress, "classify") if reader else ()):
            if vec.shape[1] != classes.shape[1]:
                raise ConfigError(f"the run's embeddings have {vec.shape[1]} dimensions, the model's text "
                                  f"embeddings {classes.shape[1]}: classify with the model the run scored with")
            x = torch.from_numpy(vec).to(classes.device)
            values, indices = topk_cosine(x if x.is_cuda else x.float(), classes, cfg.top)
            rows_i.append(cand["_i"].to_numpy()[pos])
            # copies: a numpy view keeps the shard's whole torch result alive (1M samples: 3.2 GB, 0.9 copied)
            best.append(indices.cpu().numpy().copy())
            scores.append(values[:, 0].float().cpu().numpy().copy())
        names = pl.Series(cfg.classes, dtype=pl.String)
        idx = np.concatenate(best) if best else np.zeros((0, cfg.top), np.int64)
        top = names.gather(idx.ravel())  # columnar: no Python object per sample
        labels = pl.DataFrame({
            "_i": np.concatenate(rows_i) if rows_i else np.zeros(0, np.int64),
            "zero_shot_label": names.gather(idx[:, 0]),
            "zero_shot_score": pl.Series(np.concatenate(scores) if scores else [], dtype=pl.Float32),
            "zero_shot_top": (top.reshape((len(idx), cfg.top)).cast(pl.List(pl.String)) if len(idx)
                              else pl.Series([], dtype=pl.List(pl.String))),
        })
        _write(d, labels, target.path(METADATA_FILE))
        counts = labels["zero_shot_label"].value_counts(sort=True)
        return ClassifyResult(
            output=str(out), rows=d.rows, kept=cand.height, classified=labels.height,
            unreadable_samples=reader.unreadable if reader else 0,
            counts={str(k): int(v) for k, v in counts.iter_rows()}, model=f"{score.model} ({score.pretrained})",
            templates=list(cfg.templates), skipped_files=[vars(s) for s in d.skipped])

    with target.building():
        result = ds.guarded(job)
        target.finish("classify", result, started)
    return result


def _write(ds: Dataset, labels: pl.DataFrame, path: Path) -> None:
    """Every row of `ds` in order, with the zero-shot columns (null where `labels` has no row)."""
    lf = ds.scan().with_row_index("_i")
    labels = labels.with_columns(pl.col("_i").cast(lf.collect_schema()["_i"]))
    sink_parquet(lf.join(labels.lazy(), on="_i", how="left", maintain_order="left").drop("_i"), path)


__all__ = ["ClassifyConfig", "ClassifyResult", "classify", "class_embeddings", "RUN_CONFIG"]
