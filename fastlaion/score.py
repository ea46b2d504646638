"""CLIP scoring with open_clip: batched image and text embeddings and their cosine similarity.

The device is chosen once (`pick_device`) and passed down. The image side receives uint8 pixels
already resized and cropped by the decoder to the model's own preprocessing config
(`ClipInputSpec.from_open_clip`); mean/std normalisation happens here, on the device, in batch.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, ScoreConfig
from .decode import ClipInputSpec
from .ops import paired_cosine

log = logging.getLogger(__name__)

TINY_MODEL = "fastlaion-tiny"  # a 2-layer random-weight CLIP for tests and the demo
_CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False


def register_model_configs() -> None:
    """Make fastlaion's own model configs (the tiny test CLIP) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def pick_device(preference: str) -> torch.device:
    """The one place that decides CPU or GPU for the run."""
    if preference == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {preference}: no CUDA GPU is available here; use --device cpu or auto")
    log.info("scoring on %s", device)
    return device


def pick_precision(preference: str, device: torch.device) -> str:
    """fp16 on CUDA, fp32 on the CPU (half-precision matmuls are slow or missing there), unless asked."""
    if preference == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return preference


class Scorer:
    """An open_clip model with its tokenizer and preprocessing config, ready to embed batches."""

    def __init__(self, cfg: ScoreConfig, device: torch.device):
        import open_clip

        register_model_configs()
        known = open_clip.list_models()
        if cfg.model not in known:
            close = difflib.get_close_matches(cfg.model, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
            raise ConfigError(f"--model {cfg.model!r} is not an open_clip architecture{hint}")
        pretrained = None if cfg.random_weights else cfg.pretrained
        if pretrained is not None and not Path(pretrained).exists() and os.sep in pretrained:
            raise ConfigError(f"--pretrained {pretrained!r}: no such checkpoint file")
        if pretrained is not None and not Path(pretrained).exists():
            tags = open_clip.list_pretrained_tags_by_model(cfg.model)
            if pretrained not in tags:
                raise ConfigError(f"--pretrained {pretrained!r} is not a known tag for {cfg.model} "
                                  f"(tags: {', '.join(tags) or 'none'}) nor an existing checkpoint path")
        precision = pick_precision(cfg.precision, device)
        try:
            model = open_clip.create_model(cfg.model, pretrained=pretrained, precision=precision, device=device)
        except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot load {cfg.model} weights {pretrained!r}: {msg} "
                              "(tags download from the internet on first use; pass a local checkpoint path offline)") from None
        model.eval()
        if cfg.random_weights:
            log.warning("%s has RANDOM weights: similarity scores mean nothing", cfg.model)
        self.model = model
        self.device = device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        log.info("%s on %s in %s", cfg.model, device, precision)
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        pp = open_clip.get_model_preprocess_cfg(model)
        self.clip_spec = ClipInputSpec.from_open_clip(pp)
        self.mean = torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device).view(1, 3, 1, 1)
        self.embed_dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
            else int(self.embed_texts(["probe"]).shape[1])

    @torch.inference_mode()
    def image_features(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """pixels: (N, H, W, 3) uint8 RGB, a numpy array on the host or a tensor (already on the
        device when a GPU decoder made it) -> (N, D) raw image features on the device, in the
        model's precision (fp16 on CUDA)."""
        if isinstance(pixels, torch.Tensor):
            x = pixels.to(self.device, non_blocking=True)
        else:
            x = torch.from_numpy(np.ascontiguousarray(pixels))
            if self.device.type == "cuda":  # pinned: the copy runs asynchronously
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std).to(self.dtype)
        return self.model.encode_image(x)

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """texts: N strings -> (N, D) raw text features on the device."""
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def embed_images(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, D) L2-normalised float32 on the host."""
        return torch.nn.functional.normalize(self.image_features(pixels).float(), dim=-1).cpu()

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """N strings -> (N, D) L2-normalised float32 on the host."""
        return torch.nn.functional.normalize(self.text_features(texts).float(), dim=-1).cpu()

    @torch.inference_mode()
    def score(self, pixels: np.ndarray | torch.Tensor, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image embeddings, text embeddings (both (N, D) L2-normalised float16 on the host) and
        their cosine similarity ((N,) float32), computed on the device (our fused CUDA kernel on
        a GPU, its pure-torch reference on the CPU)."""
        if len(pixels) != len(texts):
            raise ValueError(f"{len(pixels)} images for {len(texts)} texts")
        img = self.image_features(pixels)
        txt = self.text_features(texts)
        sim = paired_cosine(img, txt)  # normalises in fp32 itself
        img = torch.nn.functional.normalize(img.float(), dim=-1).half()
        txt = torch.nn.functional.normalize(txt.float(), dim=-1).half()
        return img.cpu().numpy(), txt.cpu().numpy(), sim.float().cpu().numpy()
