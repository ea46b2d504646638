"""Similarity ops: our CUDA kernels (sources in `kernels/`) beside their pure-torch references.

- `paired_cosine(a, b)`: row-wise cosine of paired embeddings, (N, D) x (N, D) -> (N,).
- `topk_cosine(img, txt, k)`: each image against a set of text embeddings (prompts or classes),
  the k best cosines and their class indices, (N, D) x (C, D) -> (N, k), (N, k); the (N, C)
  matrix is never materialised on the CUDA path.
- `cosine_matrix(img, txt)`: the full (N, C) cosine matrix (plain torch on every device: cuBLAS
  is already the right tool once the whole matrix is wanted).

`impl="auto"` uses the CUDA kernel for CUDA tensors and the reference otherwise, saying why once
in the log; `impl="cuda"` demands the kernel (benchmarks and GPU tests use it so they can never
measure the fallback by accident); `impl="ref"` forces the reference. References compute in
float32, the precision the kernels accumulate in.

Both kernels live in one extension library, built on first use with torch.utils.cpp_extension
(registered as `torch.ops.fastlaion.*`) and cached under a hash of every file in `kernels/`, the
GPU architecture (sm_XY) and the torch/CUDA versions, in $FASTLAION_KERNEL_CACHE or
~/.cache/fastlaion/kernels. `compile_check()` compiles the same sources with nvcc for sm_80 and
sm_90 without a GPU, so a broken kernel fails CI on a GPU-less machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
_warned: set[str] = set()

IMPLS = ("auto", "cuda", "ref")
MAX_TOPK = 16  # kernels/fastlaion_kernels.h: kMaxTopK (one warp lane per kept entry)
MIN_CAPABILITY = (8, 0)  # bf16 tensor-core fragments in topk_cosine.cu
_KERNEL_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")
# Flags for the device code, shared by the JIT build and compile_check so CI compiles what runs.
_NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
# Rows of the reference's (rows, C) fp32 similarity block: bounds its memory to 64 MiB.
_REF_BLOCK_ELEMS = 1 << 24


class KernelCompileError(RuntimeError):
    """nvcc rejected a kernel source; the message carries the compiler's output."""


def kernels_dir() -> Path:
    """The CUDA sources: inside the installed wheel, or the checkout's top-level `kernels/`."""
    shipped = Path(__file__).with_name("_kernels")
    return shipped if shipped.is_dir() else Path(__file__).resolve().parent.parent / "kernels"


# --- paired cosine -------------------------------------------------------------------------------


def paired_cosine_reference(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise cosine of paired embeddings: <a_i, b_i> / (max(|a_i|, eps) * max(|b_i|, eps)).

    a, b: (N, D), any float dtype, any device. Returns (N,) float32 on the same device; the
    arithmetic is done in float32 (the precision the CUDA kernel accumulates in).
    """
    a32, b32 = a.float(), b.float()
    dot = (a32 * b32).sum(dim=1)
    na = a32.norm(dim=1).clamp_min(eps)
    nb = b32.norm(dim=1).clamp_min(eps)
    return dot / (na * nb)


def paired_cosine(a: torch.Tensor, b: torch.Tensor, impl: str = "auto", eps: float = 1e-8) -> torch.Tensor:
    """Fused L2-normalise + row-wise cosine of paired embeddings.

    a, b: (N, D) on one device; the kernel takes float16, bfloat16 or float32 (b is cast to a's
    dtype on the CUDA path). Returns (N,) float32 on that device. `impl`: see the module doc.

    >>> a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    >>> paired_cosine(a, torch.tensor([[3.0, 4.0], [0.0, 1.0]]), impl="ref")
    tensor([1., 0.])
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"paired_cosine needs two (N, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_impl(impl)
    if impl == "ref" or (impl == "auto" and not _kernel_usable("paired_cosine", a)):
        return paired_cosine_reference(a, b, eps)
    if not (a.is_cuda and b.is_cuda):
        raise RuntimeError("paired_cosine(impl='cuda') needs CUDA tensors")
    return _ops().paired_cosine(a, b.to(a.dtype), eps)


# --- images against classes ----------------------------------------------------------------------


def cosine_matrix(img: torch.Tensor, txt: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """All cosines of images against text embeddings: (N, D) x (C, D) -> (N, C) float32.

    Any float dtype, any device (both inputs on one). Plain torch: normalise in float32, then one
    float32 matmul (on CUDA that is cuBLAS, which uses TF32 only if
    torch.backends.cuda.matmul.allow_tf32 is set). Needs N * C * 4 bytes; when only the best
    classes are wanted, `topk_cosine` never builds the matrix.
    """
    _check_pair_of_sets(img, txt, "cosine_matrix")
    return _normalized(img, eps) @ _normalized(txt, eps).T


def topk_cosine_reference(img: torch.Tensor, txt: torch.Tensor, k: int,
                          eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `topk_cosine`: float32 cosines, then torch.topk, in row blocks of bounded memory.

    Same shapes and checks as `topk_cosine`; the order of exactly tied scores is torch.topk's.
    """
    _check_topk(img, txt, k)
    n = img.shape[0]
    values = torch.empty((n, k), dtype=torch.float32, device=img.device)
    indices = torch.empty((n, k), dtype=torch.int64, device=img.device)
    txt_n = _normalized(txt, eps)
    rows = max(1, _REF_BLOCK_ELEMS // txt.shape[0])
    for start in range(0, n, rows):
        sim = _normalized(img[start:start + rows], eps) @ txt_n.T
        values[start:start + rows], indices[start:start + rows] = torch.topk(sim, k, dim=1)
    return values, indices


def topk_cosine(img: torch.Tensor, txt: torch.Tensor, k: int, impl: str = "auto",
                eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best text matches per image: fused normalise + cosine + top-k.

    img: (N, D), txt: (C, D) on one device (prompts or class embeddings); 1 <= k <= min(C, 16).
    Returns values (N, k) float32, best first, and indices (N, k) int64 into txt, on that device.
    The CUDA kernel takes float16 or bfloat16 (txt is cast to img's dtype) and multiplies on the
    tensor cores with float32 accumulation; exactly tied scores keep the lower index first and
    NaN scores are never chosen. With `impl="auto"`, float32 CUDA inputs use the reference (there
    is no exact float32 tensor-core path), logged once. `impl`: see the module doc.

    >>> img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> txt = torch.tensor([[0.0, 1.0], [1.0, 0.1], [-1.0, 0.0]])
    >>> topk_cosine(img, txt, k=1, impl="ref")[1]
    tensor([[1],
            [0]])
    """
    _check_topk(img, txt, k)
    _check_impl(impl)
    if impl == "ref" or (impl == "auto" and not _kernel_usable("topk_cosine", img)):
        return topk_cosine_reference(img, txt, k, eps)
    if not (img.is_cuda and txt.is_cuda):
        raise RuntimeError("topk_cosine(impl='cuda') needs CUDA tensors")
    if img.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"topk_cosine(impl='cuda') takes float16 or bfloat16 embeddings, got {img.dtype}")
    values, indices = _ops().topk_cosine(img, txt.to(img.dtype), k, eps)
    return values, indices


# --- argument checks and dispatch ----------------------------------------------------------------


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")


def _check_pair_of_sets(img: torch.Tensor, txt: torch.Tensor, op: str) -> None:
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"{op} needs img (N, D) and txt (C, D) with one D, got {tuple(img.shape)} and {tuple(txt.shape)}")
    if img.device != txt.device:
        raise ValueError(f"{op}: img is on {img.device} but txt on {txt.device}")


def _check_topk(img: torch.Tensor, txt: torch.Tensor, k: int) -> None:
    _check_pair_of_sets(img, txt, "topk_cosine")
    classes = txt.shape[0]
    if not 1 <= k <= min(classes, MAX_TOPK):
        raise ValueError(f"topk_cosine needs 1 <= k <= min(C, {MAX_TOPK}); got k={k} with C={classes} text embeddings")


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return x32 / x32.norm(dim=1, keepdim=True).clamp_min(eps)


def _kernel_usable(op: str, x: torch.Tensor) -> bool:
    """For impl='auto': can the kernel take x? If not, say why once and let the caller fall back."""
    reason = None
    if not x.is_cuda:
        reason = f"tensors on {x.device}"
    elif op == "topk_cosine" and x.dtype not in (torch.float16, torch.bfloat16):
        reason = f"the kernel takes float16/bfloat16, got {x.dtype}"
    elif torch.cuda.get_device_capability(x.device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(x.device)
        reason = f"the kernels need sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or newer, this GPU is sm_{major}{minor}"
    if reason is None:
        return True
    key = f"{op}: {reason}"
    if key not in _warned:
        _warned.add(key)
        # A CPU run is the ordinary case; a CUDA tensor left on the slow path deserves a warning.
        log.log(logging.WARNING if x.is_cuda else logging.INFO, "%s: %s, using the pure-torch reference", op, reason)
    return False


# --- building the extension ----------------------------------------------------------------------


def _kernel_sources() -> list[Path]:
    return sorted(p for p in kernels_dir().iterdir() if p.suffix in _KERNEL_SUFFIXES)


@lru_cache(maxsize=None)
def _ops() -> Any:
    """Build (or load from the cache) the kernels for the current GPU; returns torch.ops.fastlaion."""
    from torch.utils.cpp_extension import load

    if not torch.cuda.is_available():
        raise RuntimeError("fastlaion's CUDA kernels need a CUDA GPU; torch sees none (use impl='auto' or 'ref')")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        raise RuntimeError(f"fastlaion's CUDA kernels need sm_80 or newer; this GPU is sm_{major}{minor}")
    arch = f"{major}{minor}"
    files = _kernel_sources()
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    digest.update(f"sm_{arch} torch {torch.__version__} cuda {torch.version.cuda}".encode())
    tag = digest.hexdigest()[:16]
    cache = Path(os.environ.get("FASTLAION_KERNEL_CACHE", Path.home() / ".cache" / "fastlaion" / "kernels"))
    build_dir = cache / f"ops-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("loading fastlaion CUDA kernels for sm_%s (cache %s)", arch, build_dir)
    load(name=f"fastlaion_ops_{tag}", sources=[str(f) for f in files if f.suffix in (".cu", ".cpp")],
         build_directory=str(build_dir), is_python_module=False, verbose=False,
         # An explicit -gencode stops torch from choosing archs itself, so the cache key is the truth.
         extra_cuda_cflags=[*_NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"])
    return torch.ops.fastlaion


# --- compile check without a GPU -----------------------------------------------------------------


def compile_check(archs: tuple[str, ...] = ("80", "90"), out_dir: Path | None = None) -> list[Path]:
    """Compile every kernels/*.cu for the given SM architectures, and bindings.cpp, with nvcc.

    No GPU needed: this runs nvcc the way torch's extension build does (torch's include paths and
    -D flags, the C++ standard torch's headers demand) and writes object files (-c) into out_dir
    (a new temporary folder by default, which the caller owns). Returns their paths, one per
    source. Raises FileNotFoundError without nvcc and KernelCompileError naming the file and
    nvcc's output when a source does not compile. Logs a warning when nvcc's CUDA major version
    differs from the one torch was built with.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    _warn_on_cuda_mismatch(nvcc)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="fastlaion-kernels-"))
    out.mkdir(parents=True, exist_ok=True)
    common = _host_flags()
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    jobs = []
    for src in _kernel_sources():
        if src.suffix == ".cu":
            jobs.append((src, [nvcc, "-c", str(src), "-o", str(out / f"{src.stem}.cu.o"), *common, *_NVCC_FLAGS, *gencode]))
        elif src.suffix == ".cpp":  # host-only: nvcc hands it to the host compiler with CUDA's headers
            jobs.append((src, [nvcc, "-c", str(src), "-o", str(out / f"{src.stem}.o"), *common, "-O1"]))

    def run(job: tuple[Path, list[str]]) -> Path:
        src, cmd = job
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelCompileError(f"{src.name} does not compile:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        return Path(cmd[cmd.index("-o") + 1])

    from .config import usable_cores

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), usable_cores()))) as pool:
        return list(pool.map(run, jobs))


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/$CUDA_PATH, else PATH, else /usr/local/cuda; None if there is none."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) of the CUDA toolkit behind nvcc, from `nvcc --version`."""
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _warn_on_cuda_mismatch(nvcc: str) -> None:
    have = nvcc_version(nvcc)
    want = torch.version.cuda
    if have is None or want is None or int(want.split(".")[0]) != have[0]:
        log.warning("nvcc is CUDA %s but torch was built with CUDA %s: the check may not match the GPU build",
                    "?" if have is None else f"{have[0]}.{have[1]}", want)


def _torch_cxx_std() -> str:
    """The C++ standard torch's headers need: recent releases refuse anything older than C++20."""
    aten = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    text = aten.read_text(errors="replace") if aten.is_file() else ""
    return "c++20" if "C++20 or later" in text else "c++17"


def _host_flags() -> list[str]:
    """What torch.utils.cpp_extension passes to nvcc for an extension, minus the arch flags."""
    from torch.utils import cpp_extension

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        includes = cpp_extension.include_paths(cuda=True)
    python_include = sysconfig.get_path("include", scheme="posix_prefix")  # Python.h, for pybind11
    flags = [
        f"-std={_torch_cxx_std()}",
        "-DTORCH_EXTENSION_NAME=fastlaion_ops_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *cpp_extension.COMMON_NVCC_FLAGS,  # -D__CUDA_NO_HALF_OPERATORS__ and friends
        "--compiler-options", "-fPIC",
    ]
    for path in [*includes, python_include]:
        flags += ["-isystem", path]
    return flags
