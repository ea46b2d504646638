"""LAION's tagging heads: NSFW (`punsafe`), aesthetics (V1 linear, V2 MLP) and watermark (`pwatermark`).

The NSFW and aesthetic heads are small models on CLIP image embeddings; the watermark detector is
an image model of its own (timm EfficientNet-B3a on 256x256 pixels). Weights come from a local
path or from their public URL, checked against a sha256 and cached under
~/.cache/fastlaion/weights. Nothing here makes up a value: a head without weights is not run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Weights:
    """A published weights file: where it lives and what its bytes hash to."""

    url: str
    sha256: str
    embed_dim: int | None = None  # the CLIP embedding size the head takes, if it is a head


# Public origins (see ../shared/data/README.md); sha256 of the published files.
KNOWN_WEIGHTS: dict[str, Weights] = {
    "nsfw-vit-b-32": Weights(
        "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/models/clip_ViT-B-32_openai_binary_nsfw_head.pth",
        "615f35e1364b40b14c30e770544345b82d8e558240692ad72eb8eafa466ef25c", 512),
    "nsfw-vit-l-14": Weights(
        "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/models/clip_ViT-L-14_openai_binary_nsfw_head.pth",
        "fc4d70d2eea4e948d13bc27bf7114f5e8d3bd317eb01a4b49b35dcf1a3d672c6", 768),
    "aesthetic-v1-vit-b-32": Weights(
        "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_b_32_linear.pth",
        "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f", 512),
    "aesthetic-v1-vit-b-16": Weights(
        "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_b_16_linear.pth",
        "8ad3923d7ecf019df20ecd2ab5542a3075fbba0278d239c0371345f3d7fcbde0", 512),
    "aesthetic-v1-vit-l-14": Weights(
        "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth",
        "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba", 768),
}


def weights_cache_dir() -> Path:
    return Path(os.environ.get("FASTLAION_WEIGHTS_CACHE", Path.home() / ".cache" / "fastlaion" / "weights"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights(source: str, flag: str) -> Path:
    """A local file for `source`: a path, a name in KNOWN_WEIGHTS, or an http(s) URL.

    Known names download once into the cache and must match their sha256; a plain URL is
    downloaded as is (its hash is logged). `flag` names the option in error messages.
    """
    if source in known_names(flag):
        known = KNOWN_WEIGHTS[source]
        target = weights_cache_dir() / f"{source}-{known.sha256[:12]}.pth"
        if not target.exists():
            _download(known.url, target, flag)
        digest = sha256_file(target)
        if digest != known.sha256:
            target.unlink(missing_ok=True)
            raise ConfigError(f"{flag} {source}: downloaded file has sha256 {digest}, expected {known.sha256}")
        return target
    if source.startswith(("http://", "https://")):
        target = weights_cache_dir() / ("url-" + hashlib.sha256(source.encode()).hexdigest()[:16] + ".pth")
        if not target.exists():
            _download(source, target, flag)
        log.info("%s %s: sha256 %s", flag, source, sha256_file(target))
        return target
    path = Path(source).expanduser()
    if not path.is_file():
        names = known_names(flag)
        also = f", an http(s) URL or one of: {', '.join(names)}" if names else " or an http(s) URL"
        raise ConfigError(f"{flag} {source!r}: no such file (give a path{also})")
    return path


# The names in KNOWN_WEIGHTS each option takes (the others are heads of another kind).
_KNOWN_PREFIX = {"--nsfw-head": "nsfw-", "--aesthetic-v1": "aesthetic-v1-"}


def known_names(flag: str) -> list[str]:
    """The names in KNOWN_WEIGHTS that option `flag` takes."""
    prefix = _KNOWN_PREFIX.get(flag)
    return [name for name in KNOWN_WEIGHTS if prefix is not None and name.startswith(prefix)]


def _download(url: str, target: Path, flag: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, tempfile.NamedTemporaryFile(
                dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(resp, tmp)
        os.replace(tmp.name, target)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot download {url}: {e}") from None


def load_state_dict(path: Path, flag: str, source: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict saved in `path` (read with weights_only: tensors only, no code runs), or a
    one-line ConfigError naming the option `flag` and the file (`source`, as the user gave it)."""
    name = f"{flag} {source or path}" + (f" (downloaded to {path})" if source and Path(source).expanduser() != path
                                         else "")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch's unpickler on bytes that are no checkpoint raises KeyError, IndexError...)
        raise ConfigError(f"{name}: {checkpoint_failure(path, e)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{name}: not a PyTorch state dict (it holds a {type(state).__name__})")
    other = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise ConfigError(f"{name}: not a PyTorch state dict (its {other!r} holds a {type(state[other]).__name__})")
    return state


def checkpoint_failure(path: Path, exc: BaseException) -> str:
    """What is wrong with `path`, which torch.load could not read (it raised `exc`), in a user's
    words: what the file is when it is no checkpoint at all (torch's own error then means
    nothing: "KeyError: 101"), else the first sentence of torch's reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if not head:
        return "not a PyTorch checkpoint (the file is empty)"
    if head != b"PK" and head[0] != 0x80:  # torch.save writes a zip archive (before torch 1.6, a pickle)
        return ("not a PyTorch checkpoint (torch.load failed: the file is neither a zip archive nor a pickle, "
                "the formats torch.save writes)")
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # weights_only refused what the pickle holds
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(". ")[0]
        if reason.startswith("Unsupported global"):  # a class: torch.save(model) rather than its state_dict()
            return (f"a checkpoint of more than tensors, which is not loaded (torch.load with weights_only: "
                    f"{reason}); save the model's state_dict() instead")
        return f"not a PyTorch checkpoint (torch.load failed on the pickle: {reason})"
    what = f"{type(exc).__name__}: {first_line(exc).split('. ')[0]}" if text.strip() else type(exc).__name__
    if isinstance(exc, (EOFError, OSError)) or "zip archive" in what:  # its end (the zip's directory) is missing
        return f"not a PyTorch checkpoint: truncated or corrupted (torch.load failed: {what})"
    return f"not a PyTorch checkpoint (torch.load failed: {what})"


class NsfwHead(nn.Module):
    """LAION's CLIP-based NSFW detector (PyTorch port of the Keras model).

    Input: (N, D) L2-normalised CLIP image embeddings. Output: (N,) punsafe in [0, 1].
    Architecture: (x - mean) / sqrt(variance), then Linear layers with ReLU between, sigmoid last.
    """

    def __init__(self, mean: torch.Tensor, variance: torch.Tensor, sizes: list[tuple[int, int]]):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("variance", variance.float())
        self.linears = nn.ModuleList(nn.Linear(i, o) for i, o in sizes)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> NsfwHead:
        n = len([k for k in state if k.startswith("linear_") and k.endswith(".weight")])
        if n == 0 or "norm.mean" not in state:
            raise ValueError("not an NSFW head state dict (needs norm.mean, norm.variance, linear_1..)")
        shapes = [tuple(state[f"linear_{i}.weight"].shape) for i in range(1, n + 1)]
        if any(len(shape) != 2 for shape in shapes):
            raise ValueError("not an NSFW head state dict (a linear_N.weight is no matrix)")
        sizes = [(i, o) for o, i in shapes]
        # a head whose layers do not chain would load, then fail on the first batch of the run
        for name in ("norm.mean", "norm.variance"):
            if tuple(state[name].shape) != (sizes[0][0],):
                raise ValueError(f"{name} holds {tuple(state[name].shape)} values, linear_1 takes {sizes[0][0]}")
        for i in range(1, n):
            if sizes[i][0] != sizes[i - 1][1]:
                raise ValueError(f"linear_{i} gives {sizes[i - 1][1]} values, linear_{i + 1} takes {sizes[i][0]}")
        if sizes[-1][1] != 1:
            raise ValueError(f"linear_{n} gives {sizes[-1][1]} values, not the one punsafe")
        head = cls(state["norm.mean"], state["norm.variance"], sizes)
        for i, lin in enumerate(head.linears, 1):
            lin.weight.data.copy_(state[f"linear_{i}.weight"])
            lin.bias.data.copy_(state[f"linear_{i}.bias"])
        return head.eval()

    @property
    def embed_dim(self) -> int:
        return self.mean.shape[0]

    @torch.inference_mode()
    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = (emb.float() - self.mean) / self.variance.sqrt()
        for lin in self.linears[:-1]:
            x = torch.relu(lin(x))
        return torch.sigmoid(self.linears[-1](x)).squeeze(-1)


class AestheticV2(nn.Module):
    """LAION-Aesthetics V2 predictor: an MLP on L2-normalised ViT-L/14 image embeddings.

    Layer indices match the published state dict (`layers.0`, `.2`, `.4`, `.6`, `.7`).
    """

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    @torch.inference_mode()
    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb.float()).squeeze(-1)


class AestheticV1(nn.Module):
    """LAION-Aesthetics V1: one Linear(D, 1) on L2-normalised CLIP image embeddings."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.linear = nn.Linear(embed_dim, 1)

    @torch.inference_mode()
    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb.float()).squeeze(-1)


def load_nsfw_head(source: str) -> NsfwHead:
    state = load_state_dict(resolve_weights(source, "--nsfw-head"), "--nsfw-head", source)
    try:
        return NsfwHead.from_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--nsfw-head {source}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"--nsfw-head {source}: not an NSFW head state dict (no {e})") from None


def load_aesthetic_head(source: str, version: int) -> nn.Module:
    flag = f"--aesthetic-v{version}"
    state = load_state_dict(resolve_weights(source, flag), flag, source)
    first = "weight" if version == 1 else "layers.0.weight"
    try:
        if state[first].ndim != 2:
            raise RuntimeError(f"its {first} is no matrix")
        if version == 1:
            head: nn.Module = AestheticV1(state["weight"].shape[1])
            head.linear.load_state_dict(state)
        else:
            head = AestheticV2(state["layers.0.weight"].shape[1])
            head.load_state_dict(state)
    except KeyError as e:
        raise ConfigError(f"{flag} {source}: not an aesthetic V{version} state dict (KeyError: {e})") from None
    except RuntimeError as e:
        raise ConfigError(f"{flag} {source}: not an aesthetic V{version} state dict ({load_failure(e)})") from None
    return head.eval()


def load_failure(exc: RuntimeError) -> str:
    """torch's load_state_dict error ("Error(s) in loading state_dict for X:", then one indented
    line per finding) as one line: its first finding, cut where it lists hundreds of keys."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = lines[1] if len(lines) > 1 else first_line(exc)
    return found if len(found) <= 200 else found[:197] + "..."


WATERMARK_SIZE_PX = 256
WATERMARK_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as LAION's detector was trained
WATERMARK_STD = (0.229, 0.224, 0.225)


def watermark_model() -> nn.Module:
    """LAION-5B-WatermarkDetection's architecture: timm efficientnet_b3a with its 2-class head.

    Input: (N, 3, 256, 256) normalised pixels. `pwatermark = softmax(logits)[:, 0]`.
    """
    import timm

    # timm renamed efficientnet_b3a to efficientnet_b3 (the same network) and warns at the old name
    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(in_features=1536, out_features=625), nn.ReLU(), nn.Dropout(p=0.3),
        nn.Linear(in_features=625, out_features=256), nn.ReLU(), nn.Linear(in_features=256, out_features=2))
    return model


class WatermarkDetector:
    """`pwatermark` for batches of uint8 RGB images (N, 256, 256, 3).

    `dtype` is the network's (weights and input): a run keeps float32 whatever --precision says
    (Tagger). bfloat16 is 1.7-2x faster on a CPU with AMX, but on the only stand-in for LAION's weights
    here, a random network with calibrated BatchNorm, it moved pwatermark by up to 0.52 (rounding
    the input alone to bfloat16: 0.41), a network too sensitive to say what the trained one would do
    (bench/RESULTS.md, the tags section); bench/tags.py measures it, with the real weights given.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.dtype = dtype
        self.mean = torch.tensor(WATERMARK_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(WATERMARK_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, source: str, device: torch.device, dtype: torch.dtype = torch.float32) -> WatermarkDetector:
        state = load_state_dict(resolve_weights(source, "--watermark-model"), "--watermark-model", source)
        model = watermark_model()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"--watermark-model {source}: weights do not fit efficientnet_b3a's head "
                              f"({load_failure(e)})") from None
        return cls(model, device, dtype)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N, 256, 256, 3) uint8 -> (N,) float32 pwatermark on the host."""
        # the permuted batch keeps its NHWC strides through .float(): the network runs channels_last,
        # which oneDNN prefers (1.4-1.6x LAION's NCHW batch on the CPU, bench/tags.py). Whole batches:
        # chunks of 8 were 2x faster on a calm CPU but 3x slower on a busy one (bench/RESULTS.md)
        x = pixels.to(self.device).permute(0, 3, 1, 2).float().div_(255).sub_(self.mean).div_(self.std)
        return torch.softmax(self.model(x.to(self.dtype)).float(), dim=1)[:, 0].cpu()
