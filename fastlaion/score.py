"""CLIP scoring with open_clip: batched image and text embeddings and their cosine similarity.

The device is chosen once (`pick_device`) and passed down. The image side receives uint8 pixels
already resized and cropped by the decoder to the model's own preprocessing config
(`ClipInputSpec.from_open_clip`); mean/std normalisation happens here, on the device, in batch.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, ScoreConfig, architecture_error, check_pretrained, first_line
from .decode import ClipInputSpec
from .ops import paired_cosine
from .textfix import fix_text_is_identity, uncurled_ascii

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
    """The towers' precision, unless asked: fp16 on CUDA; on the CPU bf16 where it has AMX (Intel
    Xeon since Sapphire Rapids: oneDNN runs bfloat16 matrix products on its tile unit, the towers
    several times faster than in fp32, bench/score.py's precision table), else fp32 (elsewhere
    half-precision matrix products are emulated, slower than fp32, or missing)."""
    if preference == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if cpu_has_amx() else "fp32"
    return preference


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles the OS lets this process use (torch's own check, as oneDNN
    makes it before choosing its AMX kernels)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: a torch without it says no
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


# The seed of a model's random weights (--pretrained none): one model, not one per process, so that
# the shards of a run (its workers, its resumes) hold comparable embeddings. Still random: its
# scores mean nothing.
RANDOM_WEIGHTS_SEED = 0


class Scorer:
    """An open_clip model with its tokenizer and preprocessing config, ready to embed batches."""

    def __init__(self, cfg: ScoreConfig, device: torch.device, flags: tuple[str, str] = ("--model", "--pretrained"),
                 open_clip_layers: bool = False):
        """`flags` name the options that gave cfg.model and cfg.pretrained, in error messages.
        `open_clip_layers` keeps open_clip's own patch embedding and float32 layer norms (what
        bench/gpu_bench.py measures the faster ones against)."""
        import open_clip

        model_flag, pretrained_flag = flags
        register_model_configs()
        known = open_clip.list_models()
        if cfg.model not in known:
            raise architecture_error(model_flag, cfg.model, known)
        check_pretrained(pretrained_flag, cfg.model, cfg.pretrained, exact=True)
        pretrained = None if cfg.random_weights else cfg.pretrained
        precision = pick_precision(cfg.precision, device)
        try:
            with torch.random.fork_rng(devices=[]):  # the caller's CPU generator as it was (manual_seed seeds CUDA's too)
                if cfg.random_weights:  # the same random model in every worker and every resume of a run
                    torch.manual_seed(RANDOM_WEIGHTS_SEED)
                model = open_clip.create_model(cfg.model, pretrained=pretrained, precision=precision, device=device,
                                               **clip_options(cfg.model, pretrained))
        except Exception as e:  # noqa: BLE001 (torch.load on a file that is no checkpoint: KeyError, IndexError...)
            if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):  # the device's or host's memory, not the file
                raise
            if pretrained is not None and Path(pretrained).exists():  # a local file: no download, say what is wrong
                raise ConfigError(f"{pretrained_flag} {pretrained}: "
                                  f"{_checkpoint_problem(cfg.model, pretrained, pretrained_flag, e)}") from None
            if not isinstance(e, (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError)):
                raise
            raise ConfigError(f"cannot load {cfg.model} weights {pretrained!r}: {first_line(e)} "
                              "(tags download from the internet on first use; pass a local checkpoint path offline)") from None
        model.eval()
        if cfg.random_weights:
            log.warning("%s has RANDOM weights: similarity scores mean nothing", cfg.model)
        self.model = model
        self.device = device
        self.precision = precision  # the one pick_precision chose: the shards' stats record it
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        log.info("%s on %s in %s", cfg.model, device, precision)
        if not open_clip_layers:
            fold_quick_gelu(model)
            if self.dtype != torch.float32:  # fp16 or bf16, on any device
                half_layer_norms(model, self.dtype)
            if device.type == "cpu" and self.dtype == torch.bfloat16 and not cfg.compile and onednn_fusion_works():
                fuse_mlps(model)
        self.tokenizer = CachedClipTokenizer.wrap(open_clip.get_tokenizer(cfg.model))
        self._text_prefix = PrefixTextEncoder.for_model(model)
        pp = open_clip.get_model_preprocess_cfg(model)
        self.clip_spec = ClipInputSpec.from_open_clip(pp)
        mean = pp.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = pp.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self._patches = None if open_clip_layers else PatchEmbedding.for_model(model, mean, std)
        self._compiled = _CompiledTowers(self, cfg.batch_size) if cfg.compile else None
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
            arr = np.ascontiguousarray(pixels)
            if not arr.flags.writeable:  # one decoded image, a view of its bytes: torch warns on those
                arr = arr.copy()
            x = torch.from_numpy(arr)
            if self.device.type == "cuda":  # pinned: the copy runs asynchronously
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
        if self._compiled is not None and len(x):
            return self._compiled.images(x)
        return self._image_tower(x)

    def _image_tower(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on the device -> (N, D) raw image features."""
        if self._patches is not None and x.shape[1:3] == self._patches.image_size:
            return self._patches.encode_image(x)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std).to(self.dtype)
        return self.model.encode_image(x)

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """texts: N strings -> (N, D) raw text features on the device. A caption that comes more
        than once in `texts` is tokenized and run through the text tower once (crawled pages repeat
        one alt text over many images: a product's name, "image", a site's logo text); its copies
        take that row's features."""
        firsts = dict.fromkeys(texts)
        if len(firsts) == len(texts):
            return self._text_tower(texts)
        position = {text: i for i, text in enumerate(firsts)}
        features = self._text_tower(list(firsts))
        index = torch.tensor([position[text] for text in texts], dtype=torch.int64)
        return features[index.to(features.device, non_blocking=True)]

    def _text_tower(self, texts: list[str]) -> torch.Tensor:
        """N strings, each once -> (N, D) raw text features on the device."""
        tokens = self.tokenizer(texts)
        if self._compiled is not None and len(tokens):
            return self._compiled.texts(tokens)
        if self._text_prefix is None:
            return self.model.encode_text(tokens.to(self.device))
        return self._text_prefix.encode(tokens, self.device)

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


def clip_options(model: str, pretrained: str | None) -> dict[str, Any]:
    """open_clip.create_model's options that the weights need beyond the architecture's config:
    QuickGELU for tags trained with it (OpenAI's: the default ViT-B-32 / openai). open_clip 3 only
    warns when the architecture's activation differs from the tag's, and builds nn.GELU, so
    OpenAI's weights would run with another activation than they were trained with: other
    embeddings than CLIP's, other scores against LAION's thresholds. A local file is recognised as
    a tag's download where it can be: in a Hugging Face cache folder of the tag's repository, or
    named as the tag's URL whose path holds its sha256 (OpenAI's) with that digest."""
    import open_clip

    if pretrained is None:  # random weights
        return {}
    config = open_clip.get_model_config(model) or {}
    if config.get("quick_gelu", False):
        return {}
    if Path(pretrained).exists():
        tags = [_tag_of_file(model, Path(pretrained))]
    else:
        tags = [open_clip.get_pretrained_cfg(model, pretrained) or {}]
    return {"force_quick_gelu": True} if any(t.get("quick_gelu", False) for t in tags) else {}


def openai_weights(model: str, pretrained: str | None) -> bool:
    """Whether `pretrained` is OpenAI's CLIP weights for `model` (its -quickgelu twin's too):
    the tag "openai", or a local file recognised as that tag's download (`_tag_of_file`). LAION's
    NSFW and aesthetic heads take those weights' embeddings."""
    if pretrained is None:
        return False
    if pretrained == "openai":
        return True
    if not Path(pretrained).is_file():
        return False
    import open_clip

    base = model.removesuffix("-quickgelu")
    openai = (open_clip.get_pretrained_cfg(base, "openai") or {}).get("url")
    return bool(openai) and _tag_of_file(base, Path(pretrained)).get("url") == openai


def _tag_of_file(model: str, path: Path) -> dict[str, Any]:
    stat = path.stat()
    return _tag_of_file_at(model, str(path), str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _tag_of_file_at(model: str, given: str, resolved: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """The pretrained config of the open_clip tag of `model` that the local file `path` was
    downloaded as, where that shows: a Hugging Face cache folder named after the tag's repository
    (models--ORG--NAME), or the tag URL's file name with the sha256 its path names; else {}."""
    import hashlib

    import open_clip

    path = Path(given)  # its size and time are in the cache's key: hashed once however often asked
    for tag in open_clip.list_pretrained_tags_by_model(model):
        cfg = open_clip.get_pretrained_cfg(model, tag) or {}
        repo = [part for part in str(cfg.get("hf_hub", "")).split("/") if part][:2]
        if len(repo) == 2 and f"{os.sep}models--{repo[0]}--{repo[1]}{os.sep}" in resolved:
            return cfg
        url = str(cfg.get("url", ""))
        digest = url.rsplit("/", 2)[-2] if url.count("/") >= 2 else ""
        if url and path.name == url.rsplit("/", 1)[-1] and len(digest) == 64 and path.is_file():
            sha = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            if sha.hexdigest() == digest:
                return cfg
    return {}


def fold_quick_gelu(model: torch.nn.Module) -> int:
    """Every MLP of `model` whose activation is open_clip's QuickGELU, x * sigmoid(1.702 x) (three
    passes over the MLP's widest activation in eager PyTorch), made to run one SiLU pass instead:
    QuickGELU(h) = SiLU(1.702 h) / 1.702, so c_fc's weight and bias are multiplied by 1.702 and
    c_proj's weight divided by it. The same function, to the rounding of the scaled weights.
    Returns how many MLPs were changed."""
    from open_clip.transformer import QuickGELU

    k = 1.702
    count = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if not isinstance(mlp, torch.nn.Sequential) or [name for name, _ in mlp.named_children()] != ["c_fc", "gelu", "c_proj"]:
            continue
        if type(mlp.gelu) is not QuickGELU or not all(type(m) is torch.nn.Linear for m in (mlp.c_fc, mlp.c_proj)):
            continue
        with torch.no_grad():
            mlp.c_fc.weight.copy_((mlp.c_fc.weight.float() * k).to(mlp.c_fc.weight.dtype))
            if mlp.c_fc.bias is not None:
                mlp.c_fc.bias.copy_((mlp.c_fc.bias.float() * k).to(mlp.c_fc.bias.dtype))
            mlp.c_proj.weight.copy_((mlp.c_proj.weight.float() / k).to(mlp.c_proj.weight.dtype))
        mlp.gelu = torch.nn.SiLU()
        count += 1
    return count


class FusedMlp(torch.nn.Module):
    """open_clip's block MLP (c_fc, a GELU or SiLU, c_proj) on the CPU in bfloat16 as two oneDNN
    matrix products, the bias and the activation applied inside the first one's output tiles
    (`mkldnn::_linear_pointwise`, the op torch.compile's CPU back end emits for them): eager
    PyTorch runs the bias as a second input to the product and the activation as a pass of its
    own over the MLP's widest tensor (a quarter of a bfloat16 batch's time on an AMX CPU). The
    same arithmetic, float32 sums rounded once: 1.6x eager's MLP in bfloat16 on AMX; nothing in
    float32, where the products themselves are the time (so only bfloat16 uses it)."""

    ACTIVATIONS = {"none": ("gelu", "none"), "tanh": ("gelu", "tanh")}  # nn.GELU's `approximate`

    def __init__(self, mlp: torch.nn.Sequential):
        super().__init__()
        # the same modules and names (open_clip reads c_fc's dtype), run otherwise
        self.c_fc, self.gelu, self.c_proj = mlp.c_fc, mlp.gelu, mlp.c_proj
        act = mlp.gelu
        self.attr, self.algorithm = ("swish", "") if type(act) is torch.nn.SiLU else self.ACTIVATIONS[act.approximate]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = torch.ops.mkldnn._linear_pointwise
        h = op(x, self.c_fc.weight, self.c_fc.bias, self.attr, [], self.algorithm)
        return op(h, self.c_proj.weight, self.c_proj.bias, "none", [], "")

    @staticmethod
    def fusable(mlp: Any) -> bool:
        """Whether `mlp` is open_clip's plain MLP with an activation oneDNN applies as torch does."""
        if not isinstance(mlp, torch.nn.Sequential) or [name for name, _ in mlp.named_children()] != ["c_fc", "gelu", "c_proj"]:
            return False
        act = mlp.gelu
        return (all(type(m) is torch.nn.Linear for m in (mlp.c_fc, mlp.c_proj))
                and (type(act) is torch.nn.SiLU or (type(act) is torch.nn.GELU and act.approximate in FusedMlp.ACTIVATIONS)))


@functools.cache
def onednn_fusion_works() -> bool:
    """Whether this torch has oneDNN's fused linear op and it gives, on a small bfloat16 MLP, what
    eager PyTorch gives (a build without oneDNN, an op renamed or changed in a later torch: no,
    and the MLPs stay as they are)."""
    try:
        generator = torch.Generator().manual_seed(0)
        mlp = torch.nn.Sequential(OrderedDict(c_fc=torch.nn.Linear(32, 64), gelu=torch.nn.GELU(),
                                              c_proj=torch.nn.Linear(64, 32))).to(torch.bfloat16)
        x = torch.randn(2, 5, 32, generator=generator).to(torch.bfloat16)
        with torch.inference_mode():
            want, got = mlp(x).float(), FusedMlp(mlp)(x).float()
        return got.shape == want.shape and bool(torch.allclose(got, want, rtol=0.02, atol=0.02))
    except Exception as e:  # noqa: BLE001 (a missing op, a changed signature: any of torch's errors)
        log.debug("oneDNN's fused linear unavailable: %s", first_line(e))
        return False


def fuse_mlps(model: torch.nn.Module) -> int:
    """Every block MLP of `model` that FusedMlp runs as torch does, replaced by one; how many."""
    swaps = [(module, FusedMlp(module.mlp)) for module in model.modules() if FusedMlp.fusable(getattr(module, "mlp", None))]
    for module, fused in swaps:
        module.mlp = fused
    return len(swaps)


class PatchEmbedding:
    """A ViT's image tower from uint8 pixels, its patch embedding one matrix product.

    open_clip's VisionTransformer takes normalised float pixels in channel-first order and embeds
    them with a convolution whose kernel is its stride (a patch); the Scorer made those pixels
    with five passes over the batch (float, divide, subtract, divide, cast). Here the patches are
    cut from the decoder's (N, H, W, 3) uint8 pixels and cast to the model's precision in one pass,
    and multiplied by the convolution's weights divided by 255 * std, centred by a bias (-W 255
    mean): the same arithmetic, as one matrix product (cuDNN's convolution of 32 x 32 patches
    took 3.1 ms a batch of 512 on an H200, for 0.1 TFLOP). The positional embedding is added in
    the pass that places the patches after the class token. The blocks run through
    `_attention_block` where they are open_clip's plain ones; the rest of the tower (ln_pre,
    pooling, ln_post, the projection) is open_clip's own.

    For open_clip's VisionTransformer whose convolution is a plain patch embedding (kernel =
    stride, no padding, no bias); `for_model` returns None for every other tower."""

    def __init__(self, visual: torch.nn.Module, mean: Iterable[float], std: Iterable[float]):
        conv = visual.conv1
        self.visual = visual
        self.patch = int(conv.kernel_size[0])
        self.image_size = tuple(int(g) * self.patch for g in visual.grid_size)
        weight = conv.weight.detach()
        dtype, device = weight.dtype, weight.device
        std_t = torch.tensor(tuple(std), dtype=torch.float32, device=device)
        # (width, 3, p, p) -> (width, p, p, 3): the order of a patch cut from channel-last pixels
        scaled = (weight.float().permute(0, 2, 3, 1) / (255.0 * std_t)).reshape(weight.shape[0], -1)
        self.weight = scaled.to(dtype).contiguous()
        # Centring is a bias: W (x - c) = W x - W c, with W c summed in float32 and rounded once. The
        # uint8 patches are exact in float16 and bfloat16 (integers to 256), so the matrix product
        # (float32 sums) sees the pixels themselves; centring them first rounded each centred
        # pixel to the model's precision (bfloat16: to 1 of 255 above 128), and the subtraction
        # was a pass over the batch of its own (6 % of a bfloat16 batch on a CPU).
        center = 255.0 * torch.tensor(tuple(mean), dtype=torch.float32, device=device)
        self.bias = (-(scaled @ center.repeat(self.patch * self.patch))).to(dtype)  # a patch's (p, p, 3) order
        pos = visual.positional_embedding.detach().to(dtype)
        self.first = (visual.class_embedding.detach().to(dtype) + pos[0]).contiguous()
        self.rest = pos[1:].contiguous()
        self.plain_blocks = _plain_blocks(visual.transformer)  # through `_attention_block`, else open_clip's

    @classmethod
    def for_model(cls, model: torch.nn.Module, mean: Iterable[float], std: Iterable[float]) -> PatchEmbedding | None:
        from open_clip.transformer import VisionTransformer

        visual = getattr(model, "visual", None)
        if type(visual) is not VisionTransformer or visual.output_tokens:
            return None
        conv = visual.conv1
        grid = tuple(int(g) for g in visual.grid_size)
        if (conv.bias is not None or conv.in_channels != 3 or conv.groups != 1 or tuple(conv.kernel_size) != tuple(conv.stride)
                or conv.kernel_size[0] != conv.kernel_size[1] or any(conv.padding) or tuple(conv.dilation) != (1, 1)
                or visual.positional_embedding.shape != (1 + grid[0] * grid[1], conv.out_channels)):
            return None
        return cls(visual, mean, std)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 1 + patches, width) tokens: the class token and the patches'
        embeddings, with the positional embedding, as VisionTransformer's convolution, class token
        and positional embedding make them (before patch dropout and ln_pre)."""
        n, h, w, _ = pixels.shape
        p, dtype = self.patch, self.weight.dtype
        gh, gw = h // p, w // p
        # one copy cuts and casts (uint8 to float16 or bfloat16 is exact); the bias centres
        patches = pixels.reshape(n, gh, p, gw, p, 3).permute(0, 1, 3, 2, 4, 5).to(
            dtype, memory_format=torch.contiguous_format)
        y = torch.nn.functional.linear(patches.view(n * gh * gw, -1), self.weight, self.bias)
        tokens = torch.empty((n, 1 + gh * gw, y.shape[1]), dtype=dtype, device=pixels.device)
        tokens[:, 0] = self.first
        torch.add(self.rest, y.view(n, gh * gw, -1), out=tokens[:, 1:])
        return tokens

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 at the model's image size -> (N, D) raw image features, as
        `CLIP.encode_image` of the normalised pixels."""
        visual = self.visual
        x = visual.ln_pre(visual.patch_dropout(self.embed(pixels)))
        if self.plain_blocks:
            for block in visual.transformer.resblocks:
                x = _attention_block(block, x, causal=False)
        else:
            x = visual.transformer(x)
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled


class HalfLayerNorm(torch.nn.Module):
    """open_clip's LayerNormFp32 for float16 / bfloat16 activations without the float32 copies.

    LayerNormFp32 casts every activation to float32 and back around the norm: two copies of the
    tensor per norm, 51 norms a ViT-B/32 image and caption, 17 % of a batch's device time on an
    H200 (gpu_bench (h)), 10 % of a bfloat16 batch's on a CPU. PyTorch's layer norms on float16 or
    bfloat16 input already compute the mean and variance in float32. On CUDA the weight and bias
    are in the activations' dtype (its kernel takes no other), as open_clip's float16 model holds
    every other weight; on the CPU they stay float32, which its kernel takes with reduced-precision
    input and rounds once, as LayerNormFp32 does (bfloat16: one rounding of the output, 3x faster
    than float16 weights there, 10x LayerNormFp32). Other dtypes are normalised as LayerNormFp32
    does."""

    def __init__(self, norm: torch.nn.LayerNorm, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        cpu = norm.weight is None or norm.weight.device.type == "cpu"
        for name in ("weight", "bias"):
            value = getattr(norm, name)
            full = None if value is None else value.detach().float()
            self.register_buffer(name, full)
            # the parameters used with `dtype` input: on the CPU the float32 ones themselves
            self.register_buffer(f"{name}_low", full if cpu or full is None else full.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:  # LayerNormFp32's own arithmetic
            return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias,
                                                  self.eps).to(x.dtype)
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight_low, self.bias_low, self.eps)


def half_layer_norms(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Replace every open_clip LayerNormFp32 in `model` by a HalfLayerNorm for `dtype`; how many."""
    from open_clip.transformer import LayerNormFp32

    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is LayerNormFp32]
    for parent, name, child in swaps:
        setattr(parent, name, HalfLayerNorm(child, dtype))
    return len(swaps)


def _checkpoint_problem(model: str, pretrained: str, flag: str, exc: Exception) -> str:
    """What is wrong with the local checkpoint `pretrained` that open_clip could not load into
    `model` (it raised `exc`): no file, no state dict (heads.load_state_dict says why, raising a
    ConfigError naming `flag`), or weights of another model."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        return "not a checkpoint file (it is a folder)" if path.is_dir() else "not a checkpoint file"
    if path.suffix in (".safetensors", ".npz", ".npy"):  # open_clip reads these without torch.load
        return f"cannot load it as {model} weights ({type(exc).__name__}: {first_line(exc)})"
    from .heads import load_state_dict

    load_state_dict(path, flag, pretrained)
    lines = [line.strip() for line in str(exc).strip().splitlines()[:2]]  # "Error(s) in loading state_dict", the keys
    detail = " ".join(lines) or type(exc).__name__
    return f"weights do not fit {model} ({detail[:200] + ('...' if len(detail) > 200 else '')})"


def check_compile_backend(device: torch.device) -> None:
    """torch.compile's inductor builds C++ on the CPU and Triton kernels on CUDA: a missing tool is
    a one-line ConfigError when the model loads, not a traceback at the first batch."""
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 (torch's own search, whatever it raises)
            raise ConfigError(f"--compile on the CPU needs a C++ compiler (g++, or $CXX): {first_line(e)}; "
                              "install one or leave --compile out") from None
    elif device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--compile on CUDA needs triton (pip install triton, the version your torch "
                              "names); install it or leave --compile out")


class _CompiledTowers:
    """A Scorer's towers under torch.compile, with shapes kept fixed so that each compiles once:
    every call runs on `rows` rows (a smaller batch padded with zeros, a larger one cut into
    pieces), and captions run at the first of PrefixTextEncoder.BUCKETS and MORE_LENGTHS that
    holds the batch's longest one (PrefixTextEncoder.pass_length; the full context where that
    encoder does not apply).
    Padding rows are computed and dropped."""

    MORE_LENGTHS = (64,)  # after PrefixTextEncoder.BUCKETS, before the full context

    def __init__(self, scorer: Scorer, rows: int):
        check_compile_backend(scorer.device)
        self.rows = rows
        self.device = scorer.device
        self.prefix = scorer._text_prefix
        self._image = torch.compile(scorer._image_tower, dynamic=False)
        self._text = torch.compile(self.prefix._encode_prefix if self.prefix is not None else scorer.model.encode_text,
                                   dynamic=False)
        self._seen: set[str] = set()  # the shapes compiled so far

    def _compiling(self, shape: str) -> None:
        """Say once per shape that it compiles now: the first batch of each waits for it (a minute
        or more), which would look like a hang."""
        if shape not in self._seen:
            self._seen.add(shape)
            log.warning("--compile: compiling the %s for batches of %d (once; the batch waits for it)", shape, self.rows)

    def _padded(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """fn over pieces of `rows` rows of xs (cut alike, the last padded with zeros)."""
        n = len(xs[0])
        out = []
        for i in range(0, n, self.rows):
            piece = [x[i:i + self.rows] for x in xs]
            k = len(piece[0])
            # Always a new tensor made here (under inference_mode, as Scorer calls this): a view of
            # the caller's tensor would differ in its dispatch keys and compile the tower again.
            piece = [torch.cat([p, p.new_zeros((self.rows - k, *p.shape[1:]))]) if k < self.rows else p.clone()
                     for p in piece]
            out.append(fn(*piece, **kwargs)[:k])
        return out[0] if len(out) == 1 else torch.cat(out)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        self._compiling("image tower")
        return self._padded(self._image, x)

    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.prefix is None:
            self._compiling("text tower")
            return self._padded(self._text, tokens.to(self.device))
        ends = self.prefix.ends(tokens)
        length = self.prefix.pass_length(ends, (*self.prefix.BUCKETS, *self.MORE_LENGTHS))
        self._compiling(f"text tower at {length} positions")
        return self._padded(self._text, tokens[:, :length].to(self.device), ends.to(self.device), length=length)


class PrefixTextEncoder:
    """`CLIP.encode_text` run over only the positions each caption uses.

    open_clip pads every caption to the context length (77) and reads the text embedding at its
    end-of-text token. The text transformer's attention is causal, so that token never sees the
    padding after it: running a caption through its first L positions (L = end-of-text index + 1,
    with the positional embedding and causal mask cut to L) gives the same embedding, up to
    float rounding. LAION captions use a fraction of the 77 positions, so the captions run packed,
    end to end, with attention alone on the batch padded to its longest caption: the text tower
    costs about what the captions' real lengths ask for (`encode`; on a GPU not measured yet:
    bench/gpu_text.py's "packed" row). `for_model` returns None for towers where this does not hold
    (no causal mask, pooling at a fixed position, a CLS token appended, other text towers).
    """

    BUCKETS = (16, 32, 48)  # padded lengths tried before the full context

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.pool_type = model.text_pool_type
        self.eos_id = getattr(model, "text_eos_id", None)
        self.context_length = int(model.positional_embedding.shape[0])
        # The blocks run here, attention as one causal scaled_dot_product_attention (flash
        # attention on a GPU), where they are plain open_clip blocks: torch's MultiheadAttention
        # takes no fused path with the float mask open_clip passes (measured on an H200: its
        # text tower over 77 positions took as long as the image tower).
        self.causal_blocks = _plain_blocks(model.transformer)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> PrefixTextEncoder | None:
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_pool_type")
        if not all(hasattr(model, name) for name in needed) or getattr(model, "attn_mask", None) is None:
            return None
        if model.text_pool_type not in ("argmax", "eos") or (
                model.text_pool_type == "eos" and getattr(model, "text_eos_id", None) is None):
            return None
        mask = model.attn_mask
        n = int(model.positional_embedding.shape[0])
        causal = torch.full((n, n), float("-inf"), device=mask.device).triu_(1)
        if mask.shape != (n, n) or not torch.equal(mask.float(), causal):
            return None
        return cls(model)

    def ends(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per caption, the position whose output is the caption's embedding (as open_clip's
        `text_global_pool` picks it)."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def encode(self, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(N, context) token ids on the host -> (N, D) raw text features on `device`, the
        captions packed (`encode_packed`); the indices are made on the host, so the device never
        waits to be asked for them. On the CPU (ViT-B-32, one thread, bench/score.py's captions:
        27% of the one pass's positions used) packed took 7.9 s a batch of 128, the length buckets
        8.8, one pass 27.3. On a GPU one pass measured faster than the buckets (an H200, 512
        captions: buckets 15.3 ms, one pass 12.6, open_clip's encode_text 19.0; bench/gpu_text.py):
        their smaller matrix products, each bucket's own pass of kernel launches and a copy to
        the device per bucket cost more than the positions they saved. Packed is one pass with
        one copy, on a quarter of the rows."""
        if self.causal_blocks:
            return self.encode_packed(tokens, device)
        if device.type == "cuda":
            return self.encode_one_pass(tokens, device)
        return self.encode_buckets(tokens, device)

    def encode_buckets(self, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`encode` by length buckets: each caption over the positions its bucket holds."""
        ends = self.ends(tokens)
        out: torch.Tensor | None = None
        shorter = 0  # the previous bucket's length: its captions are done
        for length in (*(b for b in self.BUCKETS if b < self.context_length), self.context_length):
            rows = torch.nonzero((ends >= shorter) & (ends < length)).flatten()
            shorter = length
            if rows.numel() == 0:
                continue
            features = self._encode_prefix(tokens[rows, :length].to(device), ends[rows].to(device), length)
            if out is None:
                out = features.new_empty((tokens.shape[0], features.shape[1]))
            out[rows.to(device)] = features
        return out if out is not None else self.model.encode_text(tokens.to(device))  # no captions

    def encode_one_pass(self, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`encode` as one pass over the positions the batch's longest caption uses, rounded up
        to a multiple of 8 (the context length at most)."""
        if tokens.shape[0] == 0:
            return self.model.encode_text(tokens.to(device))
        ends = self.ends(tokens)
        length = self.pass_length(ends, range(8, self.context_length, 8))
        return self._encode_prefix(tokens[:, :length].to(device), ends.to(device), length)

    def encode_packed(self, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`encode` with the captions packed: every layer but attention runs on the positions the
        captions use, laid end to end (T rows, T the sum of their lengths), not on the batch
        padded to its longest caption (N x L rows). One LAION-like caption in ten runs to the
        77-token limit, so a batch's longest caption is 77 tokens while most use 10-20: packed,
        the matrix products, layer norms and MLPs do about a quarter of one pass's rows.

        Attention runs on padded grids, one per group of captions of like length (`BUCKETS`: up
        to 16 positions, 32, 48, more), each as long as its group's longest caption: each block
        scatters its packed queries, keys and values into the grids, laid end to end in one
        buffer, and gathers the outputs back. Attention's work grows with the square of the
        grid's length: one grid as long as the batch's longest caption (as before 2026-11-28)
        made it 45% of the text tower's time on the CPU in bfloat16, where the matrix products
        run on AMX (bench/score.py's captions: the grids do a fifth of that one grid's work). The
        captions are put in group order (stably) for the tower and their features back in the
        batch's order after it. The grids' padding positions stay zero throughout (finite: a
        causal mask weighs them 0, and 0 x NaN would not be 0). The causal mask keeps each
        caption from seeing its padding, so every caption gets what one pass (or open_clip's 77
        positions) gives it, up to float rounding."""
        n = tokens.shape[0]
        if n == 0 or not self.causal_blocks:  # open_clip's own blocks (not `_attention_block`'s) run in one pass
            return self.encode_one_pass(tokens, device)
        used = self.ends(tokens) + 1
        group = torch.bucketize(used, torch.tensor(self.BUCKETS, dtype=used.dtype))  # 0: up to 16 positions, ...
        order = torch.argsort(group, stable=True)
        used, tokens = used[order], tokens[order]
        counts = torch.bincount(group, minlength=len(self.BUCKETS) + 1).tolist()
        grids, first = [], 0  # (captions, length) of each group that has captions, in order
        for count in counts:
            if count:
                grids.append((count, int(used[first:first + count].max())))
                first += count
        row_length = torch.repeat_interleave(torch.tensor([length for _, length in grids]),
                                             torch.tensor([count for count, _ in grids]))
        grid_row = torch.cumsum(row_length, 0) - row_length  # each caption's first row in the grids
        caption = torch.repeat_interleave(torch.arange(n), used)  # each packed position's caption
        starts = torch.cumsum(used, 0) - used  # each caption's first packed position
        pos = torch.arange(int(used.sum())) - starts[caption]
        where = grid_row[caption] + pos  # each packed position's row in the grids
        ids = tokens[caption, pos]
        last = starts + used - 1  # each caption's end-of-text position among the packed ones
        back = torch.argsort(order)  # the batch's order from the groups'
        # One copy to the device, from pinned memory on CUDA: one from pageable memory would wait
        # for the stream's work (the image tower, queued just before), and the GPU would then idle
        # while this thread queued the text tower's kernels.
        indices = torch.cat([where, ids.long(), pos, last, back])
        if device.type == "cuda":
            indices = indices.pin_memory()
        where, ids, pos, last, back = indices.to(device, non_blocking=True).split([len(where)] * 3 + [n] * 2)
        model = self.model
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast_dtype) + model.positional_embedding[pos].to(cast_dtype)
        rows = sum(count * length for count, length in grids)
        grid = x.new_zeros((rows, 3 * x.shape[1]))  # pads stay zero: only `where` is written
        for block in model.transformer.resblocks:
            x = _packed_causal_block(block, x, grid, where, grids)
        return self._project(model.ln_final(x[last]))[back]  # a layer norm is per position: the end tokens' alone

    def pass_length(self, ends: torch.Tensor, lengths: Iterable[int]) -> int:
        """The positions one pass over captions ending at `ends` runs on: the first of `lengths`
        that holds the longest caption, else the full context."""
        need = int(ends.max()) + 1
        return next((n for n in lengths if need <= n < self.context_length), self.context_length)

    def _encode_prefix(self, tokens: torch.Tensor, ends: torch.Tensor, length: int) -> torch.Tensor:
        """`CLIP.encode_text` with the context cut to `length` positions."""
        model = self.model
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        if self.causal_blocks:
            for block in model.transformer.resblocks:
                x = _attention_block(block, x, causal=True)
        else:
            x = model.transformer(x, attn_mask=model.attn_mask[:length, :length].contiguous())
        x = model.ln_final(x)
        return self._project(x[torch.arange(x.shape[0], device=x.device), ends])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The end-of-text positions' features through the text projection, as encode_text's."""
        projection = self.model.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def _plain_blocks(transformer: torch.nn.Module) -> bool:
    """Whether every block of `transformer` is open_clip's ResidualAttentionBlock around a plain
    batch-first torch MultiheadAttention (what `_attention_block` reproduces), in a batch-first
    transformer."""
    if not getattr(transformer, "batch_first", False) or not hasattr(transformer, "resblocks"):
        return False
    from open_clip.transformer import ResidualAttentionBlock

    for block in transformer.resblocks:
        attn = getattr(block, "attn", None)
        if (type(block) is not ResidualAttentionBlock or type(attn) is not torch.nn.MultiheadAttention
                or hasattr(block, "ln_1_kv") or not attn.batch_first or not attn._qkv_same_embed_dim
                or attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn
                or attn.in_proj_bias is None or attn.dropout):
            return False
    return True


def _attention_block(block: torch.nn.Module, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock.forward for (N, L, D) `x`, with the causal mask (the text
    tower) or none (the image tower), its attention computed by one scaled_dot_product_attention:
    the arithmetic of MultiheadAttention (in-projection, softmax(QK^T / sqrt(d)) V per head,
    out-projection). MultiheadAttention's own fast path, which the image tower took, spends as
    long as that attention on the CPU rescaling its in-projection (_transform_bias_rescale_qkv,
    8% of a bf16 batch), then multiplies and softmaxes without a fused kernel."""
    attn = block.attn
    n, length, width = x.shape
    qkv = torch.nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    a = _heads_attention(qkv, n, length, attn.num_heads, causal)
    return _after_attention(block, x, a.view(n, length, width))


def _heads_attention(qkv: torch.Tensor, n: int, length: int, heads: int, causal: bool) -> torch.Tensor:
    """MultiheadAttention's attention on the in-projection `qkv` of `n` sequences of `length`
    positions (their n x length rows, each q | k | v): softmax(QK^T / sqrt(d)) V per head, by one
    scaled_dot_product_attention, the heads joined again: (n x length, width) rows."""
    width = qkv.shape[-1] // 3
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return a.transpose(1, 2).reshape(n * length, width)


def _after_attention(block: torch.nn.Module, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The rest of open_clip's ResidualAttentionBlock once its heads' outputs `a` are joined: the
    out-projection, the residual, the MLP and its residual."""
    a = torch.nn.functional.linear(a, block.attn.out_proj.weight, block.attn.out_proj.bias)
    x = x + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _packed_causal_block(block: torch.nn.Module, x: torch.Tensor, grid: torch.Tensor, where: torch.Tensor,
                         grids: list[tuple[int, int]]) -> torch.Tensor:
    """`_attention_block` (causal) for packed (T, D) `x` (PrefixTextEncoder.encode_packed): the in-projection,
    out-projection, layer norms and MLP on the T packed rows; the queries, keys and values put in
    `grid` at `where`: `grids`' (captions, length) grids laid end to end, each a (captions x
    length, 3D) stretch of it, for one causal scaled_dot_product_attention each, whose outputs
    at `where` come back."""
    attn = block.attn
    qkv = torch.nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    grid.index_copy_(0, where, qkv)
    outputs, first = [], 0
    for count, length in grids:
        outputs.append(_heads_attention(grid[first:first + count * length], count, length, attn.num_heads, True))
        first += count * length
    a = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return _after_attention(block, x, a.index_select(0, where))


class CachedClipTokenizer:
    """open_clip's `SimpleTokenizer` with its per-word work cached: the same token ids, faster.

    SimpleTokenizer re-encodes every word to its byte alphabet and looks up its BPE for every
    caption; captions share most of their words, so here each distinct word's ids are computed
    once (by SimpleTokenizer's own byte encoder, BPE and vocabulary) and reused. A caption stops
    being split once it holds a full context of ids: the rest would be truncated anyway (a
    2,000-character alt costs what 77 tokens cost). `wrap` returns any other tokenizer unchanged
    (HF tokenizers, reduction masks).
    """

    MAX_WORDS = 500_000  # cached words; the cache starts over beyond this (bounded memory)
    # SimpleTokenizer's pattern with only its two special tokens: the one tokenize_native.c follows.
    PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.context_length = int(tokenizer.context_length)
        self.sot, self.eot = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
        self._words: dict[str, tuple[int, ...]] = {}
        self._adding = threading.Lock()
        # SimpleTokenizer.bpe keeps every word it saw in its own cache: started over with ours.
        self._bpe_cache_start = dict(tokenizer.cache)
        from open_clip.tokenizer import _clean_lower

        # open_clip's default cleaning is ftfy.fix_text, HTML unescaping twice, whitespace folding
        # and lower case. On printable ASCII without '&' the first two change nothing (every ftfy
        # fix needs non-ASCII, a control character or an entity), so such captions, most of them,
        # only get the last two: ftfy is over half of the tokenizer's time. Nor do they on most
        # non-ASCII captions: textfix.fix_text_is_identity says which.
        self._lower_fast_path = tokenizer.clean_fn is _clean_lower
        # Captions of that kind are split and looked up in C (tokenize_native.c), where the pattern
        # is open_clip's own (no added special tokens) and a compiler is there; Python gives it the
        # words it computes and tokenizes the captions it leaves.
        self._native = None
        if self._lower_fast_path and tokenizer.pat.pattern == self.PATTERN:
            from . import tokenize_native

            self._native = tokenize_native.words(self.sot, self.eot)

    def _clean(self, text: str) -> str:
        if self._lower_fast_path and (text.isascii() and text.isprintable() and "&" not in text
                                      or fix_text_is_identity(text)):
            return " ".join(text.split()).lower()  # the HTML unescaping needs '&'
        return self.tokenizer.clean_fn(text)

    @classmethod
    def wrap(cls, tokenizer: Any) -> Any:
        from open_clip.tokenizer import SimpleTokenizer

        if type(tokenizer) is SimpleTokenizer and tokenizer.reduction_fn is None and tokenizer.context_length:
            return cls(tokenizer)
        return tokenizer

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._words.get(word)
        if ids is not None:
            return ids
        with self._adding:  # the two tables start over and take words together
            tok = self.tokenizer
            token = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
            ids = tuple(tok.encoder[piece] for piece in tok.bpe(token).split(" "))
            if len(self._words) >= self.MAX_WORDS:
                self._words.clear()
                tok.cache = dict(self._bpe_cache_start)
                if self._native is not None:
                    self._native.clear()
            if self._native is not None and not self._native.add(word, ids):
                log.warning("the compiled tokenizer's table is full; captions with new words are tokenized in Python")
                self._native = None
            self._words[word] = ids
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """(N, context_length) int64 token ids, exactly as open_clip's tokenizer returns them."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self._lower_fast_path:  # ASCII but for curly quotes: cleaned as fix_text would, then ASCII
            texts = [t if t.isascii() else uncurled_ascii(t) or t for t in texts]
        context = context_length or self.context_length
        native = self._native
        if native is not None:
            out, status = native.encode(texts, context)
            left = np.flatnonzero(status)
            for i, ids in zip(left, self._rows([texts[i] for i in left], context)):
                out[i, :len(ids)] = ids
            return torch.from_numpy(out)
        rows = self._rows(texts, context)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        out = np.zeros((len(rows), context), dtype=np.int64)
        out[np.arange(context) < lengths[:, None]] = np.fromiter(
            itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        return torch.from_numpy(out)

    def _rows(self, texts: list[str], context: int) -> list[list[int]]:
        """Each caption's ids, [sot, ..., eot] cut to `context`: the Python path (the reference)."""
        pattern, cache, sot, eot = self.tokenizer.pat, self._words, self.sot, self.eot
        rows: list[list[int]] = []
        for text in texts:
            cleaned = self._clean(text)
            # Each word is a token at least, so a full context's words are all that count: a long
            # caption is split only up to a space past 8 tokens' worth of characters (no word holds
            # a space, so the words before it are the same), unless that gave too few words.
            cut = cleaned.find(" ", 8 * context) if len(cleaned) > 8 * context else -1
            words = pattern.findall(cleaned, 0, cut) if cut > 0 else pattern.findall(cleaned)
            if cut > 0 and len(words) < context:
                words = pattern.findall(cleaned)
            try:
                pieces = [cache[w] for w in words]
            except KeyError:  # (get: another thread may start the cache over meanwhile)
                pieces = [cache.get(w) or self._word_ids(w) for w in words]
            ids = [sot, *itertools.chain.from_iterable(pieces), eot]
            if len(ids) > context:
                ids = ids[:context]
                ids[-1] = eot
            rows.append(ids)
        return rows

