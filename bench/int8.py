"""int8 on an AMX CPU: does it score ViT-B-32 faster than fastlaion's bf16 path, and how far do
its similarities move? (An experiment; fastlaion has no int8 precision.)

    .venv/bin/python bench/int8.py                    # ViT-B-32, random weights, 64 photos + captions
    .venv/bin/python bench/int8.py --micro            # also the one-GEMM table (3200 x 768 -> 3072)

One thread (torch.set_num_threads(1)), CPU seconds (time.process_time) of Scorer.score on one batch,
best of --rounds rounds with the variants alternated in rotating order, after one warm-up each:
the box's other jobs move wall time, not one thread's CPU time, by much.

Variants (the same random weights, seed 0; layer norms, softmax, attention, the patch embedding
and the projections stay as the bf16 Scorer runs them):
  fp32, bf16          fastlaion's Scorer as it is
  ao-dynamic          torch.ao.quantization.quantize_dynamic on the fp32 Scorer's nn.Linear
                      modules (the block MLPs: MultiheadAttention's projections are not
                      nn.Linear modules it converts); float32 activations, fbgemm's int8 GEMM
  int8-mlp            the bf16 Scorer with each block MLP as two oneDNN int8 products
                      (`onednn::qlinear_pointwise`, AMX-INT8): c_fc's input quantized per batch
                      (uint8, per tensor: aminmax + quantize_per_tensor), its bias and GELU fused,
                      its output uint8 at a scale calibrated on another batch (static: a dynamic
                      scale would cost two passes over the MLP's widest tensor); c_proj reads that
                      and writes bf16. Weights int8, symmetric, per output channel.
  int8-mlp+qkv        also the attention in-projections (input quantized per batch)
  int8-all            also the attention out-projections
Accuracy against fp32 on the same batch: similarity max / mean |difference|, the same over the
fp32 similarities' standard deviation (random weights crowd them near 0), and the image and text
embeddings' least and mean cosine to fp32's.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score import make_captions, make_jpegs  # noqa: E402  (bench/score.py's inputs)

from fastlaion import score as fl  # noqa: E402


_C = None  # bench/int8_quantize.c, loaded by --c-quantize


def load_c_quantizer() -> None:
    global _C
    import ctypes

    from fastlaion import extract_native

    lib = ctypes.CDLL(str(extract_native.built("int8q", (Path(__file__).with_name("int8_quantize.c"),))))
    lib.int8q_bf16_to_u8.restype = None
    lib.int8q_bf16_to_u8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p,
                                     ctypes.c_int]
    lib.simd = lib.int8q_simd()
    _C = lib


def quantize_u8(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(R, K) bf16/fp32 -> (R, K) uint8, scale, zero point: asymmetric, per tensor, this batch's range."""
    lo, hi = torch.aminmax(x)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zp = int(round(-lo / scale))
    if _C is not None and x.dtype == torch.bfloat16 and x.is_contiguous():
        out = torch.empty(x.shape, dtype=torch.uint8)
        _C.int8q_bf16_to_u8(x.data_ptr(), x.numel(), 1.0 / scale, zp, out.data_ptr(), _C.simd)
        return out, scale, zp
    return torch.quantize_per_tensor(x.float(), scale, zp, torch.quint8).int_repr(), scale, zp


class Int8Linear:
    """y = x W^T + b with W int8 (symmetric, per output channel) and x quantized to uint8, on
    oneDNN's int8 linear (AMX-INT8 tiles where the CPU has them). `post` is fused ("gelu").
    Output bf16, or uint8 at a fixed (scale, zero point) when `out_q` is given."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none", algorithm: str = "",
                 out_q: tuple[float, int] | None = None):
        w = weight.detach().float()
        self.w_scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        q = torch.round(w / self.w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.w_zp = torch.zeros(w.shape[0], dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float()
        self.post, self.algorithm, self.out_q = post, algorithm, out_q

    def __call__(self, q: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
        out_scale, out_zp, out_dtype = (*self.out_q, None) if self.out_q else (1.0, 0, torch.bfloat16)
        return torch.ops.onednn.qlinear_pointwise(q, scale, zp, self.packed, self.w_scale, self.w_zp, self.bias,
                                                  out_scale, out_zp, out_dtype, self.post, [], self.algorithm)

    def dynamic(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) bf16 -> (..., N): x quantized per batch."""
        shape = x.shape
        y = self(*quantize_u8(x.reshape(-1, shape[-1])))
        return y.view(*shape[:-1], y.shape[-1])


class Int8Mlp(torch.nn.Module):
    """A block MLP (c_fc, GELU, c_proj) as two int8 products; the GELU's output uint8 on [lo, hi]."""

    def __init__(self, mlp: torch.nn.Module, lo: float, hi: float):
        super().__init__()
        self.c_fc = mlp.c_fc  # open_clip reads c_fc's dtype
        act = mlp.gelu
        post, algorithm = ("gelu", act.approximate) if type(act) is torch.nn.GELU else ("swish", "")
        scale = (hi - lo) / 255
        zp = int(round(-lo / scale))
        self.fc = Int8Linear(mlp.c_fc.weight, mlp.c_fc.bias, post, algorithm, (scale, zp))
        self.proj = Int8Linear(mlp.c_proj.weight, mlp.c_proj.bias)
        self.h_q = (scale, zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = self.fc(*quantize_u8(x.reshape(-1, shape[-1])))
        y = self.proj(h, *self.h_q)
        return y.view(*shape[:-1], y.shape[-1])


def _linear(x: torch.Tensor, module: torch.nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
    int8 = getattr(module, f"int8_{name}", None)
    return int8.dynamic(x) if int8 is not None else torch.nn.functional.linear(x, weight, bias)


# fastlaion.score's block functions with the two attention projections taken from `int8_in` /
# `int8_out` where a variant put them (else F.linear, as fastlaion's own): patched in for the run.
def _attention_block(block, x, causal):
    attn = block.attn
    n, length, width = x.shape
    qkv = _linear(block.ln_1(x), attn, "in", attn.in_proj_weight, attn.in_proj_bias)
    a = fl._heads_attention(qkv, n, length, attn.num_heads, causal)
    return _after_attention(block, x, a.view(n, length, width))


def _after_attention(block, x, a):
    a = _linear(a, block.attn, "out", block.attn.out_proj.weight, block.attn.out_proj.bias)
    x = x + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _packed_causal_block(block, x, grid, where, grids):
    attn = block.attn
    qkv = _linear(block.ln_1(x), attn, "in", attn.in_proj_weight, attn.in_proj_bias)
    grid.index_copy_(0, where, qkv)
    outputs, first = [], 0
    for count, length in grids:
        outputs.append(fl._heads_attention(grid[first:first + count * length], count, length, attn.num_heads, True))
        first += count * length
    a = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return _after_attention(block, x, a.index_select(0, where))


fl._attention_block, fl._after_attention, fl._packed_causal_block = _attention_block, _after_attention, _packed_causal_block


def gelu_ranges(scorer: fl.Scorer, pixels: np.ndarray, texts: list[str]) -> dict[str, tuple[float, float]]:
    """Per block MLP (by module name), the GELU output's range on a calibration batch, in the fp32
    `scorer` (whose MLPs are open_clip's own, their activation a module)."""
    seen: dict[str, tuple[float, float]] = {}
    hooks = []
    for name, module in scorer.model.named_modules():
        if name.endswith(".mlp.gelu"):
            def hook(_m, _i, out, name=name[:-len(".gelu")]):
                lo, hi = seen.get(name, (0.0, 0.0))
                seen[name] = (min(lo, float(out.min())), max(hi, float(out.max())))
            hooks.append(module.register_forward_hook(hook))
    scorer.score(pixels, texts)
    for h in hooks:
        h.remove()
    return seen


def int8_scorer(cfg, ranges: dict[str, tuple[float, float]], parts: set[str], margin: float) -> fl.Scorer:
    """A bf16 Scorer with the `parts` ("mlp", "in", "out") of every transformer block in int8."""
    torch.manual_seed(0)
    scorer = fl.Scorer(cfg, torch.device("cpu"))
    for name, module in scorer.model.named_modules():
        if "mlp" in parts and hasattr(module, "mlp") and f"{name}.mlp" in ranges:
            lo, hi = ranges[f"{name}.mlp"]
            module.mlp = Int8Mlp(module.mlp, lo, hi * margin)
        attn = getattr(module, "attn", None)
        if isinstance(attn, torch.nn.MultiheadAttention):
            if "in" in parts:
                attn.int8_in = Int8Linear(attn.in_proj_weight, attn.in_proj_bias)
            if "out" in parts:
                attn.int8_out = Int8Linear(attn.out_proj.weight, attn.out_proj.bias)
    return scorer


def ao_dynamic_scorer(cfg) -> fl.Scorer:
    torch.manual_seed(0)
    scorer = fl.Scorer(cfg, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        scorer.model = torch.ao.quantization.quantize_dynamic(scorer.model, {torch.nn.Linear}, dtype=torch.qint8)
    scorer._patches.visual = scorer.model.visual
    scorer._text_prefix.model = scorer.model
    # open_clip asks c_fc.weight's dtype, a method on a quantized Linear: the activations' stays float32
    scorer.model.transformer.get_cast_dtype = lambda: torch.float32
    return scorer


def add_outliers(model: torch.nn.Module, gain: float, channels: int = 4) -> None:
    """Multiply the first `channels` weights of every block's two layer norms by `gain`: a few
    channels of the norms' outputs (the in-projections' and MLPs' inputs) then run `gain` times
    larger than the rest, as trained ViTs' outlier channels do (random weights have none), which
    per-tensor activation scales have to cover. The same change in every variant."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("ln_1", "ln_2"):
            with torch.no_grad():
                module.weight[:channels] *= gain
                low = getattr(module, "weight_low", None)  # HalfLayerNorm's copy, where it is one
                if low is not None and low is not module.weight:
                    low[:channels] *= gain


def decoded(spec, seed: int, n: int) -> np.ndarray:
    from fastlaion.config import DecodeConfig, ResizeMode
    from fastlaion.decode import Decoder

    decoder = Decoder(DecodeConfig(resize_mode=ResizeMode.no), spec)
    return np.stack([decoder(j).clip_input for j in make_jpegs(n, seed=seed)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def micro(rounds: int) -> None:
    """One ViT-B-32 image MLP's first product (3,200 rows: 64 images x 50 tokens, 768 -> 3,072)."""
    rows, k, n = 3200, 768, 3072
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g)
    w, b = torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g) * 0.01
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    lin = Int8Linear(w, b)
    q = quantize_u8(xb)
    dense = torch.nn.Sequential(torch.nn.Linear(k, n))
    dense[0].weight.data, dense[0].bias.data = w, b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(dense, {torch.nn.Linear}, dtype=torch.qint8)
    xq = torch.round(x / (x.abs().amax() / 127)).to(torch.int8)
    wq = torch.round(w / (w.abs().amax() / 127)).to(torch.int8)
    ways = {
        "fp32 F.linear": lambda: torch.nn.functional.linear(x, w, b),
        "bf16 mkldnn._linear_pointwise (fastlaion's)": lambda: torch.ops.mkldnn._linear_pointwise(xb, wb, bb, "none", [], ""),
        "int8 onednn.qlinear_pointwise, x quantized per batch": lambda: lin.dynamic(xb),
        "  of which the product alone (x already uint8)": lambda: lin(*q),
        "  of which quantizing x (aminmax + the quantizer)": lambda: quantize_u8(xb),
        "int8 torch.ao quantize_dynamic Linear (fbgemm, fp32 in/out)": lambda: ao(x),
        "int8 torch._int_mm (int32 out, no scales)": lambda: torch._int_mm(xq, wq.t()),
    }
    best = dict.fromkeys(ways, float("inf"))
    with torch.inference_mode():
        for fn in ways.values():
            fn()
        for _ in range(rounds):
            for name, fn in ways.items():
                t0 = time.process_time()
                for _ in range(5):
                    fn()
                best[name] = min(best[name], (time.process_time() - t0) / 5)
    bf16 = best["bf16 mkldnn._linear_pointwise (fastlaion's)"]
    print(f"\none product, {rows} x {k} -> {n}, one thread, ms (best of {rounds} x 5)")
    print("| way | ms | bf16 / this |")
    print("|---|---|---|")
    for name, s in best.items():
        print(f"| {name} | {s * 1e3:.2f} | {bf16 / s:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--margin", type=float, default=1.0, help="the calibrated GELU maxima times this")
    ap.add_argument("--variants", nargs="*", default=["fp32", "bf16", "ao-dynamic", "int8-mlp", "int8-mlp+qkv", "int8-all"])
    ap.add_argument("--micro", action="store_true", help="also time one GEMM each way")
    ap.add_argument("--outliers", type=float, default=0.0,
                    help="stress test: 4 channels of every block's layer norms scaled by this (add_outliers)")
    ap.add_argument("--c-quantize", action="store_true",
                    help="quantize activations with bench/int8_quantize.c (one pass) instead of torch's ops")
    args = ap.parse_args()
    if args.c_quantize:
        load_c_quantizer()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")  # torch 2.14's notice
    from fastlaion.config import ScoreConfig

    print(f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, one thread, AMX: {fl.cpu_has_amx()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit "
          + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    if args.micro:
        micro(args.rounds)

    cfg = {p: ScoreConfig(model=args.model, pretrained="none", precision=p) for p in ("fp32", "bf16")}
    torch.manual_seed(0)
    fp32 = fl.Scorer(cfg["fp32"], torch.device("cpu"))
    if args.outliers:
        add_outliers(fp32.model, args.outliers)
    n = args.batch_size
    pixels, texts = decoded(fp32.clip_spec, 0, n), make_captions(n, seed=0)
    ranges = gelu_ranges(fp32, decoded(fp32.clip_spec, 1, n), make_captions(n, seed=1))  # calibration: another batch
    scorers: dict[str, fl.Scorer] = {}
    for v in args.variants:
        if v == "fp32":
            scorers[v] = fp32
        elif v == "bf16":
            torch.manual_seed(0)
            scorers[v] = fl.Scorer(cfg["bf16"], torch.device("cpu"))
        elif v == "ao-dynamic":
            scorers[v] = ao_dynamic_scorer(cfg["fp32"])
        else:
            parts = {"int8-mlp": {"mlp"}, "int8-mlp+qkv": {"mlp", "in"}, "int8-all": {"mlp", "in", "out"}}[v]
            scorers[v] = int8_scorer(cfg["bf16"], ranges, parts, args.margin)
    if args.outliers:
        for v, s in scorers.items():
            if s is not fp32:
                add_outliers(s.model, args.outliers)
    out = {v: s.score(pixels, texts) for v, s in scorers.items()}  # also the warm-up
    best = dict.fromkeys(scorers, float("inf"))
    order = list(scorers)
    for r in range(args.rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.process_time()
            scorers[v].score(pixels, texts)
            best[v] = min(best[v], time.process_time() - t0)
    ref_img, ref_txt, ref_sim = fp32.score(pixels, texts)
    spread = float(np.std(ref_sim))
    stress = f", {args.outliers:g}x outlier channels in the layer norms" if args.outliers else ""
    quantizer = "bench/int8_quantize.c" if args.c_quantize else "torch's quantize_per_tensor"
    print(f"\nScorer.score, {args.model} random weights{stress}, activations quantized by {quantizer}, {n} photos + mixed captions, one thread, CPU s a batch "
          f"(best of {args.rounds}); fp32 similarities: mean {ref_sim.mean():.4f}, std {spread:.4f}, "
          f"range {ref_sim.min():.4f} .. {ref_sim.max():.4f}")
    print("| variant | CPU s / batch | vs fp32 | vs bf16 | similarity max / mean abs diff vs fp32 | "
          "max / mean over the fp32 std | image cosine to fp32: least / mean | text: least / mean |")
    print("|---|---|---|---|---|---|---|---|")
    for v in order:
        img, txt, sim = out[v]
        d = np.abs(sim - ref_sim)
        ci, ct = cosines(img, ref_img), cosines(txt, ref_txt)
        vs_bf16 = f"{best['bf16'] / best[v]:.2f}x" if "bf16" in best else "-"
        vs_fp32 = f"{best['fp32'] / best[v]:.2f}x" if "fp32" in best else "-"
        print(f"| {v} | {best[v]:.3f} | {vs_fp32} | {vs_bf16} | {d.max():.5f} / "
              f"{d.mean():.5f} | {d.max() / spread:.3f} / {d.mean() / spread:.3f} | {ci.min():.5f} / {ci.mean():.5f} "
              f"| {ct.min():.5f} / {ct.mean():.5f} |")


if __name__ == "__main__":
    main()
