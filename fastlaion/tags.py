"""The tag stage: caption language, and LAION's heads on CLIP image embeddings and pixels.

`Tagger` is built once per run from `TagConfig` and the scoring model; each head that is not
configured is simply absent (its column is not written), never filled with made-up values.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ConfigError, ScoreConfig, TagConfig

if TYPE_CHECKING:
    from .language import LanguageProcess

# torch and the heads load only when a head is configured: language alone (the default with
# --no-score) needs neither.

log = logging.getLogger(__name__)

# LAION's heads were trained on OpenAI CLIP image embeddings: "auto" picks them only for those
# (the tag "openai", or a local copy of its download, also named as the -quickgelu architecture).
_AUTO_NSFW = {"ViT-B-32": "nsfw-vit-b-32", "ViT-L-14": "nsfw-vit-l-14"}
_AUTO_AESTHETIC_V1 = {"ViT-B-32": "aesthetic-v1-vit-b-32", "ViT-B-16": "aesthetic-v1-vit-b-16",
                      "ViT-L-14": "aesthetic-v1-vit-l-14"}


def _auto(choice: str | None, table: dict[str, str], score: ScoreConfig, what: str) -> str | None:
    if choice is None or choice.lower() == "none":
        return None
    if choice != "auto":
        return choice
    base = score.model.removesuffix("-quickgelu")  # ViT-B-32-quickgelu / openai: the same weights
    if score.enabled and base in table:
        from .score import openai_weights  # a local file is recognised as OpenAI's download

        if openai_weights(score.model, score.pretrained):
            return table[base]
    log.info("%s: no LAION head for %s/%s (they take OpenAI CLIP embeddings); column left out",
             what, score.model, score.pretrained)
    return None


class Tagger:
    """`language` is the run's language process (`Models.load` starts it before the models load,
    so the two overlap), or None with --no-language."""

    def __init__(self, cfg: TagConfig, score: ScoreConfig, embed_dim: int | None, device: Any,
                 language: LanguageProcess | None = None):
        self.language = language
        self.heads: dict[str, Any] = {}
        nsfw = _auto(cfg.nsfw_head, _AUTO_NSFW, score, "punsafe")
        v1 = _auto(cfg.aesthetic_v1, _AUTO_AESTHETIC_V1, score, "aesthetic")
        self.watermark = None
        if not (nsfw or v1 or cfg.aesthetic_v2 or cfg.watermark_model):
            return
        from .heads import WatermarkDetector, load_aesthetic_head, load_nsfw_head

        if nsfw:
            self.heads["punsafe"] = load_nsfw_head(nsfw)
        if v1:
            self.heads["aesthetic"] = load_aesthetic_head(v1, version=1)
        if cfg.aesthetic_v2:
            self.heads["aesthetic_v2"] = load_aesthetic_head(cfg.aesthetic_v2, version=2)
        for column, head in self.heads.items():
            dim = _input_dim(head)
            if embed_dim is None:
                raise ConfigError(f"the {column} head needs CLIP image embeddings: remove --no-score")
            if dim != embed_dim:
                raise ConfigError(f"the {column} head takes {dim}-d embeddings but {score.model} makes "
                                  f"{embed_dim}-d ones; pick the head for this model or 'none'")
        # float32 whatever --precision says: bfloat16's effect on LAION's detector is unmeasured here
        # (WatermarkDetector's docstring); on CUDA fp16 is unmeasured too (no GPU in that session)
        self.watermark = WatermarkDetector.load(cfg.watermark_model, device) if cfg.watermark_model else None

    @property
    def watermark_size_px(self) -> int | None:
        if self.watermark is None:
            return None
        from .heads import WATERMARK_SIZE_PX

        return WATERMARK_SIZE_PX

    @property
    def embedding_columns(self) -> list[str]:
        return list(self.heads)

    def on_embeddings(self, img_emb: np.ndarray) -> dict[str, np.ndarray]:
        """img_emb: (N, D) L2-normalised float16/32 -> one (N,) float32 column per head."""
        import torch

        x = torch.from_numpy(img_emb.astype(np.float32))
        return {column: head(x).numpy().astype(np.float32) for column, head in self.heads.items()}

    def on_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """pixels: (N, 256, 256, 3) uint8 -> {"pwatermark": (N,) float32}."""
        if self.watermark is None:
            return {}
        import torch

        x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)  # GPU decoders: on the device
        return {"pwatermark": self.watermark(x).cpu().numpy().astype(np.float32)}


def _input_dim(head: Any) -> int:
    import torch

    first = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
    return first.in_features
