"""Similarity ops: our CUDA kernels (sources in `kernels/`) beside their pure-torch references.

`impl="auto"` uses the CUDA kernel for CUDA tensors and the reference otherwise, saying so once in
the log; `impl="cuda"` demands the kernel (benchmarks and GPU tests use it so they can never
measure the fallback by accident); `impl="ref"` forces the reference. The extension is built on
first use with torch.utils.cpp_extension and cached under a hash of the sources and the GPU
architecture.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
_warned: set[str] = set()


def kernels_dir() -> Path:
    """The CUDA sources: inside the installed wheel, or the checkout's top-level `kernels/`."""
    shipped = Path(__file__).with_name("_kernels")
    return shipped if shipped.is_dir() else Path(__file__).resolve().parent.parent / "kernels"


def paired_cosine_reference(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise cosine of paired embeddings.

    a, b: (N, D), any float dtype, any device. Returns (N,) float32 on the same device; the
    arithmetic is done in float32 (the precision the CUDA kernel accumulates in).
    """
    a32, b32 = a.float(), b.float()
    dot = (a32 * b32).sum(dim=1)
    na = a32.norm(dim=1).clamp_min(eps)
    nb = b32.norm(dim=1).clamp_min(eps)
    return dot / (na * nb)


def paired_cosine(a: torch.Tensor, b: torch.Tensor, impl: str = "auto", eps: float = 1e-8) -> torch.Tensor:
    """Fused L2-normalise + row-wise cosine: (N, D) x (N, D) -> (N,) float32. See module doc for `impl`."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"paired_cosine needs two (N, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if impl not in ("auto", "cuda", "ref"):
        raise ValueError(f"impl must be auto, cuda or ref, got {impl!r}")
    use_cuda = impl == "cuda" or (impl == "auto" and a.is_cuda)
    if not use_cuda:
        if impl == "auto" and "paired_cosine" not in _warned:
            _warned.add("paired_cosine")
            log.info("paired_cosine: tensors on %s, using the pure-torch reference", a.device)
        return paired_cosine_reference(a, b, eps)
    if not a.is_cuda:
        raise RuntimeError("paired_cosine(impl='cuda') needs CUDA tensors")
    return _extension("cosine").paired_cosine(a, b.to(a.dtype), eps)


@lru_cache(maxsize=None)
def _extension(name: str) -> ModuleType:
    """Build (or load from cache) kernels/{name}.cu for the current GPU."""
    from torch.utils.cpp_extension import load

    source = kernels_dir() / f"{name}.cu"
    major, minor = torch.cuda.get_device_capability()
    digest = hashlib.sha256(source.read_bytes() + f"sm_{major}{minor}".encode()).hexdigest()[:16]
    build_dir = Path(os.environ.get("FASTLAION_KERNEL_CACHE", Path.home() / ".cache" / "fastlaion" / "kernels")) / f"{name}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("loading CUDA kernel %s (cache %s)", name, build_dir)
    return load(name=f"fastlaion_{name}_{digest}", sources=[str(source)], build_directory=str(build_dir),
                extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=False)
