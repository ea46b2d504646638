"""fastlaion.ops: references against float64 numpy, impl semantics, the nvcc compile check, and
(marked gpu) the CUDA kernels against float64 on fresh random inputs."""

from __future__ import annotations

import doctest
import logging
import time

import numpy as np
import pytest
import torch

from fastlaion import ops
from fastlaion.ops import (
    MAX_TOPK,
    compile_check,
    cosine_matrix,
    find_nvcc,
    kernels_dir,
    paired_cosine,
    paired_cosine_reference,
    topk_cosine,
    topk_cosine_reference,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none")


def cosines64(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(N, C) cosines in float64, zero rows scoring 0 like the ops (norms clamped at eps)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
    return a @ b.T


def assert_topk_matches(values, indices, sim64, atol: float, rtol: float = 1e-3) -> None:
    """values/indices (N, k) against the exact (N, C) cosines: the values are the k largest, each
    index really scores its value, and no index repeats. That is "indices equal to the exact
    top-k except where scores (nearly) tie", without guessing which tie order is right."""
    values, indices = np.asarray(values, np.float64), np.asarray(indices)
    k = values.shape[1]
    want = -np.sort(-sim64, axis=1)[:, :k]
    np.testing.assert_allclose(values, want, atol=atol, rtol=rtol)
    np.testing.assert_allclose(np.take_along_axis(sim64, indices, axis=1), values, atol=atol, rtol=rtol)
    assert all(len(set(row)) == k for row in indices.tolist()), "an index repeats within a row"
    assert np.all(np.diff(values, axis=1) <= atol), "values are not sorted best first"


@pytest.fixture()
def fresh_log(monkeypatch):
    """Forget which fallbacks were already logged, so each test sees its first one."""
    monkeypatch.setattr(ops, "_warned", set())


# --- references on the CPU -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 8), (33, 40), (257, 512), (64, 768)])
def test_paired_cosine_reference_matches_float64(n, d, dtype):
    g = torch.Generator().manual_seed(n * d)
    a = torch.randn(n, d, generator=g).to(dtype)
    b = (0.5 * a.float() + torch.randn(n, d, generator=g)).to(dtype)  # cosines across (-1, 1)
    want = np.diagonal(cosines64(a.float().numpy(), b.float().numpy()))
    got = paired_cosine_reference(a, b)
    assert got.dtype == torch.float32 and got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)
    np.testing.assert_allclose(paired_cosine(a, b).numpy(), want, atol=2e-6)  # auto on CPU: same


def test_paired_cosine_edge_cases():
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert paired_cosine(a, b).tolist() == [0.0, 0.0]  # zero vectors: eps, not NaN
    empty = paired_cosine(torch.empty(0, 16), torch.empty(0, 16))
    assert empty.shape == (0,) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="one shape"):
        paired_cosine(a, b[:1])
    with pytest.raises(ValueError, match="impl"):
        paired_cosine(a, b, impl="fast")


def test_cosine_matrix_matches_float64():
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(17, 96, generator=g).half(), torch.randn(23, 96, generator=g).half()
    got = cosine_matrix(img, txt)
    assert got.shape == (17, 23) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), cosines64(img.float().numpy(), txt.float().numpy()), atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n,d,c,k", [(1, 8, 1, 1), (50, 64, 10, 5), (300, 512, 1000, 16), (7, 768, 33, 3)])
def test_topk_reference_matches_float64(n, d, c, k, dtype):
    g = torch.Generator().manual_seed(n + d + c)
    img, txt = torch.randn(n, d, generator=g).to(dtype), torch.randn(c, d, generator=g).to(dtype)
    values, indices = topk_cosine(img, txt, k)  # auto on CPU: the reference
    assert values.shape == indices.shape == (n, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert_topk_matches(values, indices, cosines64(img.float().numpy(), txt.float().numpy()), atol=2e-6)


def test_topk_reference_in_row_blocks_agrees_with_one_block(monkeypatch):
    g = torch.Generator().manual_seed(5)
    img, txt = torch.randn(41, 32, generator=g), torch.randn(12, 32, generator=g)
    whole = topk_cosine_reference(img, txt, 4)
    monkeypatch.setattr(ops, "_REF_BLOCK_ELEMS", 5 * 12)  # blocks of 5 rows, the last one short
    blocked = topk_cosine_reference(img, txt, 4)
    torch.testing.assert_close(blocked, whole)


def test_topk_edge_cases():
    img = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    values, indices = topk_cosine(img, txt, 3)
    assert values[0].tolist() == [0.0, 0.0, 0.0]  # a zero image scores 0 everywhere, no NaN
    assert indices[1, 0].item() == 2 and values[1, 0].item() == pytest.approx(2**-0.5)
    assert values[1, 1:].tolist() == [0.0, 0.0]  # a zero class scores 0
    v0, i0 = topk_cosine(torch.empty(0, 2), txt, 2)
    assert v0.shape == i0.shape == (0, 2) and i0.dtype == torch.int64
    with pytest.raises(ValueError, match="k=4 with C=3"):
        topk_cosine(img, txt, 4)
    with pytest.raises(ValueError, match="1 <= k"):
        topk_cosine(img, txt, 0)
    many = torch.randn(40, 2)
    with pytest.raises(ValueError, match=f"min\\(C, {MAX_TOPK}\\)"):
        topk_cosine(img, many, MAX_TOPK + 1)
    with pytest.raises(ValueError, match="one D"):
        topk_cosine(img, torch.randn(5, 3), 1)
    with pytest.raises(ValueError, match="impl"):
        topk_cosine(img, txt, 1, impl="triton")


def test_doc_examples_run():
    result = doctest.testmod(ops, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2 and result.failed == 0


# --- impl semantics without a GPU ----------------------------------------------------------------


def test_auto_on_cpu_uses_the_reference_and_says_so_once(caplog, fresh_log):
    a, b = torch.randn(4, 8), torch.randn(6, 8)
    with caplog.at_level(logging.INFO, logger="fastlaion.ops"):
        for _ in range(3):
            torch.testing.assert_close(paired_cosine(a, a), paired_cosine_reference(a, a))
            torch.testing.assert_close(topk_cosine(a, b, 2), topk_cosine_reference(a, b, 2))
        paired_cosine(a, a, impl="ref")  # an explicit choice is not a fallback: no message
    messages = [r.getMessage() for r in caplog.records if r.name == "fastlaion.ops"]
    assert messages == [
        "paired_cosine: tensors on cpu, using the pure-torch reference",
        "topk_cosine: tensors on cpu, using the pure-torch reference",
    ]


def test_cuda_impl_on_cpu_tensors_is_a_clear_error():
    a = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="paired_cosine\\(impl='cuda'\\) needs CUDA tensors"):
        paired_cosine(a, a, impl="cuda")
    with pytest.raises(RuntimeError, match="topk_cosine\\(impl='cuda'\\) needs CUDA tensors"):
        topk_cosine(a, a, 2, impl="cuda")


# --- the kernels compile without a GPU -----------------------------------------------------------


def test_kernels_compile_with_nvcc(tmp_path):
    if find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put it on PATH): cannot compile-check the kernels")
    start = time.monotonic()
    objects = compile_check(archs=("80", "90"), out_dir=tmp_path)
    elapsed_s = time.monotonic() - start
    sources = sorted(p.name for p in kernels_dir().iterdir() if p.suffix in (".cu", ".cpp"))
    assert len(objects) == len(sources) >= 3  # cosine.cu, topk_cosine.cu, bindings.cpp
    assert all(p.is_file() and p.stat().st_size > 0 and p.parent == tmp_path for p in objects)
    assert elapsed_s < 180, f"compile check took {elapsed_s:.0f} s"


def test_compile_check_reports_a_broken_kernel(tmp_path, monkeypatch):
    if find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put it on PATH)")
    broken = tmp_path / "kernels"
    broken.mkdir()
    (broken / "oops.cu").write_text("__global__ void k(float* x) { x[0] = undeclared; }\n")
    monkeypatch.setattr(ops, "kernels_dir", lambda: broken)
    with pytest.raises(ops.KernelCompileError, match="oops.cu does not compile(.|\n)*undeclared"):
        compile_check(archs=("80",), out_dir=tmp_path / "obj")


# --- the CUDA kernels against float64 (GPU only) -------------------------------------------------

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _cos64(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(N, C) cosines in float64 on the inputs' device."""
    a, b = a.double(), b.double()
    return (a / a.norm(dim=1, keepdim=True).clamp_min(eps)) @ (b / b.norm(dim=1, keepdim=True).clamp_min(eps)).T


def _paired64(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(1) / (a.norm(dim=1).clamp_min(eps) * b.norm(dim=1).clamp_min(eps))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [512, 768])
@pytest.mark.parametrize("n", [1, 1000, 65536])
def test_paired_cosine_cuda_matches_float64(n, d, dtype):
    g = _cuda_gen(n + d)
    a = torch.randn(n, d, device="cuda", generator=g).to(DTYPES[dtype])
    alpha = torch.rand(n, 1, device="cuda", generator=g) * 4 - 2  # cosines spread over (-1, 1)
    b = (alpha * a.float() + torch.randn(n, d, device="cuda", generator=g)).to(DTYPES[dtype])
    got = paired_cosine(a, b, impl="cuda")
    assert got.dtype == torch.float32 and got.shape == (n,) and got.is_cuda
    torch.testing.assert_close(got.double(), _paired64(a, b), rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("d", [1, 100, 7])  # not a multiple of 8: the scalar path
def test_paired_cosine_cuda_odd_shapes_misalignment_and_edges(d):
    g = _cuda_gen(d)
    flat = torch.randn(999 * d + 1, device="cuda", generator=g).half()
    a = flat[1:].view(999, d)  # 2 bytes past an aligned address
    b = torch.randn(999, d, device="cuda", generator=g).half()
    torch.testing.assert_close(paired_cosine(a, b, impl="cuda").double(), _paired64(a, b), rtol=1e-3, atol=1e-5)
    a8 = torch.randn(2 * 64 * 8 + 8, device="cuda", generator=g).half()[8:].view(128, 8)  # 16 B aligned
    b8 = torch.randn(2 * 128 * 8 + 1, device="cuda", generator=g).half()[1:1 + 128 * 8].view(128, 8)
    torch.testing.assert_close(paired_cosine(a8, b8, impl="cuda").double(), _paired64(a8, b8), rtol=1e-3, atol=1e-5)
    zeros = torch.zeros(3, 512, device="cuda", dtype=torch.float16)
    assert paired_cosine(zeros, zeros + 1, impl="cuda").tolist() == [0.0, 0.0, 0.0]
    assert paired_cosine(zeros[:0], zeros[:0], impl="cuda").shape == (0,)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("c", [10, 1000])
@pytest.mark.parametrize("d", [512, 768])
@pytest.mark.parametrize("n", [1, 1000, 65536])
def test_topk_cosine_cuda_matches_float64(n, d, c):
    g = _cuda_gen(n + d + c)
    img = torch.randn(n, d, device="cuda", generator=g).half()
    txt = torch.randn(c, d, device="cuda", generator=g).half()
    k = 5
    values, indices = topk_cosine(img, txt, k, impl="cuda")
    assert values.shape == indices.shape == (n, k) and values.is_cuda
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    sim = _cos64(img, txt)
    assert_topk_matches(values.cpu(), indices.cpu(), sim.cpu().numpy(), atol=1e-5)
    ref_values, ref_indices = topk_cosine_reference(img, txt, k)
    assert (indices == ref_indices).float().mean().item() > 0.99  # ties aside, the same classes


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("n,d,c,k", [(70, 100, 30000, 16), (3, 8, 16, 16), (130, 1, 65, 1), (64, 13, 200, 7)])
def test_topk_cosine_cuda_shapes(n, d, c, k, dtype):
    """Many class tiles with the largest k, k == C, D = 1, D not a multiple of 8 (scalar staging),
    partial image and class tiles, and bfloat16."""
    g = _cuda_gen(n * c + d)
    img = torch.randn(n, d, device="cuda", generator=g).to(DTYPES[dtype])
    txt = torch.randn(c, d, device="cuda", generator=g).to(DTYPES[dtype])
    values, indices = topk_cosine(img, txt, k, impl="cuda")
    assert_topk_matches(values.cpu(), indices.cpu(), _cos64(img, txt).cpu().numpy(), atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_topk_cosine_cuda_ties_zero_vectors_and_empty():
    g = _cuda_gen(11)
    img = torch.randn(200, 512, device="cuda", generator=g).half()
    img[7] = 0
    classes = torch.randn(40, 512, device="cuda", generator=g).half()
    txt = torch.cat([classes, classes])  # every class twice: exact ties 40 apart
    values, indices = topk_cosine(img, txt, 2, impl="cuda")
    assert values[7].tolist() == [0.0, 0.0]
    pairs = indices.sort(dim=1).values
    rows = torch.arange(200, device="cuda") != 7
    assert torch.equal(pairs[rows, 1] - pairs[rows, 0], torch.full_like(pairs[rows, 0], 40))
    same = values[:, 0] == values[:, 1]  # an exact tie keeps the lower index first
    assert torch.all(indices[same & rows, 0] < indices[same & rows, 1])
    v0, i0 = topk_cosine(img[:0], txt, 3, impl="cuda")
    assert v0.shape == i0.shape == (0, 3)


@pytest.mark.gpu
@needs_cuda
def test_cuda_impl_refuses_what_the_kernel_cannot_do_and_auto_falls_back_visibly(caplog, fresh_log):
    img = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        topk_cosine(img, img, 2, impl="cuda")
    with caplog.at_level(logging.INFO, logger="fastlaion.ops"):
        values, _ = topk_cosine(img, img, 2)  # float32 on CUDA: the reference, with a warning
    records = [r for r in caplog.records if r.name == "fastlaion.ops"]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "float16/bfloat16" in records[0].getMessage()
    torch.testing.assert_close(values[:, 0], torch.ones(4, device="cuda"))
