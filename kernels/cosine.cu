// Fused L2-normalise + row-wise cosine of paired image/text embeddings, and the per-row inverse
// norms that topk_cosine.cu scales its dot products with.
//
// out[i] = <a_i, b_i> / (max(|a_i|, eps) * max(|b_i|, eps)); fp16, bf16 or fp32 in, fp32
// accumulation. Reference: fastlaion.ops.paired_cosine_reference (pure torch).
//
// The op reads 2 * N * D elements once and writes N floats, so it is bound by memory bandwidth:
// one warp per row, 16-byte streaming loads (8 halves) when D is a multiple of 16 bytes' worth of
// elements and the rows are 16-byte aligned, unrolled so that each lane has several loads in
// flight; a scalar loop handles every other shape.
#include "common.cuh"

namespace fastlaion {
namespace {

using detail::Pack;
using detail::kElemsPer16B;
using detail::to_float;
using detail::warp_sum;

constexpr int kThreads = 256;  // 8 warps, 8 rows per block
constexpr int kRowsPerBlock = kThreads / 32;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
paired_cosine_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                     int64_t rows, int64_t dim, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp leaves together, so full-mask shuffles stay legal
  const T* ar = a + row * dim;
  const T* br = b + row * dim;
  float dot = 0.f, na = 0.f, nb = 0.f;
  if constexpr (kVec) {
    const uint4* av = reinterpret_cast<const uint4*>(ar);
    const uint4* bv = reinterpret_cast<const uint4*>(br);
    const int64_t words = dim / kElemsPer16B<T>;
#pragma unroll 4
    for (int64_t w = lane; w < words; w += 32) {
      const uint4 x = __ldcs(av + w);  // read once: evict-first
      const uint4 y = __ldcs(bv + w);
#pragma unroll
      for (int p = 0; p < Pack<T>::kPairs; ++p) {
        const float2 xf = Pack<T>::pair(x, p);
        const float2 yf = Pack<T>::pair(y, p);
        dot = fmaf(xf.x, yf.x, fmaf(xf.y, yf.y, dot));
        na = fmaf(xf.x, xf.x, fmaf(xf.y, xf.y, na));
        nb = fmaf(yf.x, yf.x, fmaf(yf.y, yf.y, nb));
      }
    }
  } else {
    for (int64_t j = lane; j < dim; j += 32) {
      const float x = to_float(ar[j]);
      const float y = to_float(br[j]);
      dot = fmaf(x, y, dot);
      na = fmaf(x, x, na);
      nb = fmaf(y, y, nb);
    }
  }
  dot = warp_sum(dot);
  na = warp_sum(na);
  nb = warp_sum(nb);
  if (lane == 0) out[row] = dot / (fmaxf(sqrtf(na), eps) * fmaxf(sqrtf(nb), eps));
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
inv_norms_kernel(const T* __restrict__ x, float* __restrict__ inv_norm, int64_t rows, int64_t dim,
                 float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const T* xr = x + row * dim;
  float ss = 0.f;
  if constexpr (kVec) {
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    const int64_t words = dim / kElemsPer16B<T>;
#pragma unroll 4
    for (int64_t w = lane; w < words; w += 32) {
      const uint4 v = __ldg(xv + w);  // the top-k kernel reads these rows next: keep them cached
#pragma unroll
      for (int p = 0; p < Pack<T>::kPairs; ++p) {
        const float2 f = Pack<T>::pair(v, p);
        ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
      }
    }
  } else {
    for (int64_t j = lane; j < dim; j += 32) {
      const float f = to_float(xr[j]);
      ss = fmaf(f, f, ss);
    }
  }
  ss = warp_sum(ss);
  if (lane == 0) inv_norm[row] = 1.f / fmaxf(sqrtf(ss), eps);
}

template <typename T>
void launch_paired_typed(const void* a, const void* b, float* out, int64_t rows, int64_t dim,
                         float eps, cudaStream_t stream) {
  const auto* at = static_cast<const T*>(a);
  const auto* bt = static_cast<const T*>(b);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const bool vec = dim % kElemsPer16B<T> == 0 && detail::aligned16(a) && detail::aligned16(b);
  if (vec) {
    paired_cosine_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(at, bt, out, rows, dim, eps);
  } else {
    paired_cosine_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(at, bt, out, rows, dim, eps);
  }
}

template <typename T>
void launch_inv_norms_typed(const void* x, float* inv_norm, int64_t rows, int64_t dim, float eps,
                            cudaStream_t stream) {
  const auto* xt = static_cast<const T*>(x);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (dim % kElemsPer16B<T> == 0 && detail::aligned16(x)) {
    inv_norms_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xt, inv_norm, rows, dim, eps);
  } else {
    inv_norms_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(xt, inv_norm, rows, dim, eps);
  }
}

}  // namespace

cudaError_t launch_paired_cosine(const void* a, const void* b, float* out, int64_t rows,
                                 int64_t dim, Dtype dtype, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::f32: launch_paired_typed<float>(a, b, out, rows, dim, eps, stream); break;
    case Dtype::f16: launch_paired_typed<__half>(a, b, out, rows, dim, eps, stream); break;
    case Dtype::bf16: launch_paired_typed<__nv_bfloat16>(a, b, out, rows, dim, eps, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_inv_norms(const void* x, float* inv_norm, int64_t rows, int64_t dim,
                             Dtype dtype, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::f32: launch_inv_norms_typed<float>(x, inv_norm, rows, dim, eps, stream); break;
    case Dtype::f16: launch_inv_norms_typed<__half>(x, inv_norm, rows, dim, eps, stream); break;
    case Dtype::bf16: launch_inv_norms_typed<__nv_bfloat16>(x, inv_norm, rows, dim, eps, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fastlaion
