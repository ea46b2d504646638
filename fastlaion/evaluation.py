"""Zero-shot accuracy of a CLIP model on a labelled image folder (`fastlaion evaluate`), as
clip_benchmark's zero-shot classification measures it, for the model a run scores with.

The folder is an ImageFolder: one subfolder per class, its images inside (at any depth), the
subfolders in name order giving the class indices (torchvision's order). Each image goes through
fastlaion's own CPU decoder with a default run's settings (fastlaion.decode.Decoder, the stored
copy not made), so the model sees the pixels `fastlaion run` gives it and the accuracy is the one
the pipeline's embeddings have; an image that does not decode is counted, named, and left out.
Class text embeddings are classify's (prompt templates averaged, CLIP's recipe:
fastlaion.dataset.classify.class_embeddings); each batch of images is ranked against them by
fastlaion.ops.topk_cosine (our CUDA kernel on a GPU, its pure-torch reference on the CPU).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, DecodeConfig, ScoreConfig, at_least, usable_cores
from .dataset.classify import DEFAULT_TEMPLATES, ClassifyConfig, class_embeddings
from .dataset.source import NoProgress, Progress

log = logging.getLogger(__name__)

# torchvision's ImageFolder's (IMG_EXTENSIONS): a .bmp or .tif in a class folder is an image of
# the benchmark that fastlaion's decoder refuses (JPEG, PNG, WebP only), counted as not decoded,
# not a file silently left out
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
TOP_K = 5
CONFUSED_PAIRS = 5  # the most confused (true, predicted) pairs reported


@dataclass(frozen=True)
class EvaluateConfig:
    images_dir: Path
    classes: tuple[str, ...] | None = None   # one per class folder, in name order; None: the folders' names
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    limit: int = 0                            # images per class, the first by path; 0: every one
    score: ScoreConfig = field(default_factory=ScoreConfig)  # model, pretrained, batch_size, device, precision
    # a default run's decode settings (its stored size sets the JPEG DCT scale, so the CLIP input);
    # no size floor: a benchmark's small images (CIFAR's 32 px PNGs) are images to classify
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(min_image_bytes=0))

    def validate(self) -> None:
        """The options alone, before the folder is read or a model loads."""
        at_least("--limit", self.limit, 0)
        self.score.validate()
        # classify's checks of the templates (the class names are checked once the folder is read)
        ClassifyConfig(classes=("x",), templates=self.templates, device=self.score.device).validate()


@dataclass(frozen=True)
class LabelledFolder:
    root: Path
    folders: tuple[str, ...]              # class subfolders, in name order (their index: the label)
    classes: tuple[str, ...]              # the name each class goes into the prompts with
    files: tuple[tuple[Path, ...], ...]   # per class, its images in path order (--limit applied)

    @property
    def images(self) -> int:
        return sum(len(f) for f in self.files)


def read_image_folder(root: Path, classes: tuple[str, ...] | None = None, limit: int = 0) -> LabelledFolder:
    """The classes and images of the ImageFolder `root`; ConfigError for one that is not one.
    Hidden folders and files (".ipynb_checkpoints") are not classes or images; files that are
    not images by their extension are left out."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{root}: no such folder")
    if not root.is_dir():
        raise ConfigError(f"{root}: is a file; give a folder with one subfolder of images per class")
    folders = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not folders:
        raise ConfigError(f"{root}: no class subfolders in it (a labelled folder holds one subfolder per class, "
                          "its images inside)")
    if len(folders) < 2:
        raise ConfigError(f"{root}: only one class subfolder ({folders[0]!r}); zero-shot accuracy needs 2 or more")
    files = []
    for name in folders:
        found = _images_under(root / name)
        if not found:
            raise ConfigError(f"{root / name}: no images in it ({', '.join(sorted(IMAGE_EXTENSIONS))}); every class "
                              "folder needs at least one")
        files.append(tuple(found[:limit] if limit else found))
    if classes is None:
        classes = tuple(name.replace("_", " ") for name in folders)
    elif len(classes) != len(folders):
        raise ConfigError(f"--classnames: {len(classes):,} names for {len(folders):,} class folders in {root}; give "
                          "one name a line, in the folders' name order")
    return LabelledFolder(root, folders, tuple(classes), tuple(files))


def _images_under(folder: Path) -> list[Path]:
    """The image files at any depth of a class folder, in path order, hidden ones and those in
    hidden folders left out. Linked folders are followed, as ImageFolder's os.walk(followlinks=
    True) does (pathlib's rglob does not: a class kept in a linked folder had no images), each
    real folder walked once (a link back up the tree is no endless walk)."""
    found: list[Path] = []
    walked: set[str] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [p for n in names if not n.startswith(".") and (p := Path(top) / n).suffix.lower() in IMAGE_EXTENSIONS
                  and p.is_file()]
    return sorted(found)


@dataclass
class EvaluateResult:
    images_dir: str
    model: str
    pretrained: str
    precision: str
    device: str
    templates: list[str]
    classes: int
    images: int                           # decoded and classified
    top1: float                           # share of the images whose best class is their own
    top5: float | None                    # ... among their 5 best; None with 5 classes or fewer (always 1)
    mean_per_class_recall: float          # top-1 recall averaged over the classes with an image
    per_class: list[dict[str, Any]]       # class, folder, images, recall (None: no image decoded)
    confused: list[dict[str, Any]]        # true, predicted, images, share (of the true class's)
    undecodable: list[dict[str, str]] = field(default_factory=list)  # path, reason
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def zero_shot_figures(labels: np.ndarray, top: np.ndarray, n_classes: int) -> dict[str, Any]:
    """labels: (N,) int true classes; top: (N, k) int best classes, best first. Top-1, top-5
    (None when k < 5 or there are only 5 classes), per-class counts and top-1 recall, mean
    recall over the classes with an image, and the (C, C) confusion counts (true, predicted)."""
    hit = top == labels[:, None]
    counts = np.bincount(labels, minlength=n_classes)
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (labels, top[:, 0]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(confusion) / counts
    return {"top1": float(hit[:, 0].mean()),
            "top5": float(hit[:, :TOP_K].any(axis=1).mean()) if n_classes > TOP_K and top.shape[1] >= TOP_K else None,
            "counts": counts, "recall": recall, "mean_recall": float(np.nanmean(recall)), "confusion": confusion}


def most_confused(confusion: np.ndarray, n: int = CONFUSED_PAIRS) -> list[tuple[int, int, int]]:
    """The n (true, predicted, images) off the diagonal with the most images, ties by index."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [(int(t), int(p), int(off[t, p])) for t, p in zip(*np.unravel_index(flat, off.shape))]
    return [pair for pair in pairs if pair[2]]


def evaluate(cfg: EvaluateConfig, progress: Progress | None = None) -> EvaluateResult:
    """Classify every image of cfg.images_dir zero-shot and measure the answers against the
    folders they are in."""
    import torch

    from .decode import Decoder
    from .ops import topk_cosine
    from .score import Scorer, pick_device

    cfg.validate()
    progress = progress or NoProgress()
    started = time.perf_counter()
    folder = read_image_folder(cfg.images_dir, cfg.classes, cfg.limit)
    ClassifyConfig(classes=folder.classes, templates=cfg.templates, device=cfg.score.device).validate()
    scorer = Scorer(cfg.score, pick_device(cfg.score.device))
    classes = class_embeddings(scorer, folder.classes, cfg.templates, progress)
    k = min(TOP_K, len(folder.classes))
    decoder = Decoder(cfg.decode, scorer.clip_spec, store=False)
    paths = [(p, label) for label, files in enumerate(folder.files) for p in files]
    labels: list[np.ndarray] = []
    tops: list[np.ndarray] = []
    undecodable: list[dict[str, str]] = []
    progress.start("evaluate", len(paths))
    for batch, decoded in _decoded_batches(decoder, paths, cfg.score.batch_size):
        ok = [i for i, d in enumerate(decoded) if d.error is None]
        undecodable += [{"path": str(batch[i][0].relative_to(folder.root)), "reason": d.error or "",
                         "detail": d.error_detail or ""} for i, d in enumerate(decoded) if d.error is not None]
        if ok:
            with torch.inference_mode():
                x = scorer.image_features(np.stack([decoded[i].clip_input for i in ok]))
                _, best = topk_cosine(x if x.is_cuda else x.float(), classes, k)
            tops.append(best.cpu().numpy())
            labels.append(np.array([batch[i][1] for i in ok], np.int64))
        progress.advance(len(batch))
    progress.stop()
    if not labels:
        raise ConfigError(f"{folder.root}: none of its {len(paths):,} images decoded "
                          f"(the first: {undecodable[0]['path']}: {undecodable[0]['reason']})")
    figures = zero_shot_figures(np.concatenate(labels), np.concatenate(tops), len(folder.classes))
    counts, recall = figures["counts"], figures["recall"]
    return EvaluateResult(
        images_dir=str(folder.root), model=cfg.score.model, pretrained=cfg.score.pretrained,
        precision=scorer.precision, device=str(scorer.device), templates=list(cfg.templates),
        classes=len(folder.classes), images=int(counts.sum()), top1=figures["top1"], top5=figures["top5"],
        mean_per_class_recall=figures["mean_recall"],
        per_class=[{"class": c, "folder": f, "images": int(n), "recall": None if n == 0 else float(r)}
                   for c, f, n, r in zip(folder.classes, folder.folders, counts, recall)],
        confused=[{"true": folder.classes[t], "predicted": folder.classes[p], "images": n,
                   "share": n / int(counts[t])} for t, p, n in most_confused(figures["confusion"])],
        undecodable=undecodable, seconds=time.perf_counter() - started)


def _decoded_batches(decoder: Any, paths: list[tuple[Path, int]], size: int
                     ) -> Iterator[tuple[list[tuple[Path, int]], list[Any]]]:
    """(batch of `paths`, its Decoded outcomes), batch by batch, decoded on one thread per usable
    core; the next batch is decoding while the caller embeds this one, and no further (memory
    stays at two batches of pixels)."""
    def decode(path: Path) -> Any:
        try:
            body = path.read_bytes()
        except OSError as e:  # a file the folder listed that cannot be read: the image's outcome, as a bad body's
            from .decode import Decoded

            return Decoded("unreadable", f"{e.strerror or e}", None, None, None, None, None, None, None, None, 0.0)
        return decoder(body)

    pool = ThreadPoolExecutor(usable_cores(), thread_name_prefix="evaluate-decode")
    try:
        ahead: tuple[list[tuple[Path, int]], list[Future]] | None = None
        for start in range(0, len(paths), size):
            batch = paths[start:start + size]
            submitted = (batch, [pool.submit(decode, p) for p, _ in batch])
            if ahead is not None:
                yield ahead[0], [f.result() for f in ahead[1]]
            ahead = submitted
        if ahead is not None:
            yield ahead[0], [f.result() for f in ahead[1]]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a Ctrl-C: the queued decodes dropped, not waited for


__all__ = ["EvaluateConfig", "EvaluateResult", "LabelledFolder", "IMAGE_EXTENSIONS", "evaluate",
           "most_confused", "read_image_folder", "zero_shot_figures"]
