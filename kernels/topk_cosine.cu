// Images against a set of text embeddings (prompts or classes), fused with top-k.
//
// For each image i: the k largest cos(img_i, txt_c) over all classes c, best first, without ever
// writing the (N, C) similarity matrix. Reference: fastlaion.ops.topk_cosine_reference.
//
// Layout: a block of 4 warps owns BM = 64 images and walks over the classes in tiles of BN = 64.
// For each class tile it stages (BM x BK) image and (BN x BK) class slices of D in shared memory,
// multiplies them on the tensor cores (WMMA 16x16x16, fp16/bf16 products, fp32 accumulation;
// each warp a 32 x 32 piece of the 64 x 64 tile), parks the tile of raw dot products in shared
// memory, and then each warp scales 16 rows of it by the precomputed inverse norms (cosine.cu's
// inv_norms kernel, fp32) and merges them into per-row top-k lists it keeps in registers: lane j
// holds the j-th best (value, class) of the row. A candidate enters only when it beats the
// current k-th best, which after the first tiles is rare, so the merge costs a ballot per 32
// candidates. Ties keep the lower class index first (classes arrive in increasing order and an
// equal value never displaces an earlier one). NaN scores are never selected.
//
// Untuned first version: no cp.async double buffering, and the image slice is re-staged for
// every class tile (it comes from L2). Both are the next steps if profiling shows them.
#include <mma.h>

#include "common.cuh"

namespace fastlaion {
namespace {

using namespace nvcuda;
using detail::kFullMask;

constexpr int kThreads = 128;    // 4 warps
constexpr int BM = 64;           // images per block
constexpr int BN = 64;           // classes per tile
constexpr int BK = 64;           // slice of D staged per step
constexpr int kLds = BK + 8;     // padded smem row (elements): 144 bytes, a multiple of 16
constexpr int kLdc = BN + 4;     // padded fp32 row of the dot-product tile
constexpr int kRowsPerWarp = BM / (kThreads / 32);  // 16

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// dst[r][j] = src[(row0 + r) * dim + k0 + j] for a BM/BN x BK slice, zero outside the matrix.
// Both element types are 2 bytes, so the slice moves as raw bits.
template <bool kVec>
__device__ __forceinline__ void stage(uint16_t (*dst)[kLds], const uint16_t* __restrict__ src,
                                      int64_t rows, int64_t row0, int64_t dim, int64_t k0) {
  static_assert(BM == BN, "one staging routine serves both operands");
  if constexpr (kVec) {  // dim % 8 == 0 and 16-byte aligned rows: whole 16-byte words
    constexpr int kWordsPerRow = BK / 8;
    for (int i = threadIdx.x; i < BM * kWordsPerRow; i += kThreads) {
      const int r = i / kWordsPerRow;
      const int j = (i % kWordsPerRow) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (row0 + r < rows && k0 + j < dim) {
        v = __ldg(reinterpret_cast<const uint4*>(src + (row0 + r) * dim + k0 + j));
      }
      *reinterpret_cast<uint4*>(&dst[r][j]) = v;
    }
  } else {
    for (int i = threadIdx.x; i < BM * BK; i += kThreads) {
      const int r = i / BK;
      const int j = i % BK;
      uint16_t v = 0;
      if (row0 + r < rows && k0 + j < dim) v = src[(row0 + r) * dim + k0 + j];
      dst[r][j] = v;
    }
  }
}

// Offer (v, idx), one candidate per lane, to a warp's top-k list (lane j < k holds the j-th
// best; lanes >= k hold -inf). Candidates are taken in lane order; all 32 lanes must call.
__device__ __forceinline__ void offer(float& top_v, int& top_i, float v, int idx, int k,
                                      int lane) {
  unsigned pending = __ballot_sync(kFullMask, v > __shfl_sync(kFullMask, top_v, k - 1));
  while (pending) {  // warp-uniform
    const int src = __ffs(pending) - 1;
    pending &= pending - 1;
    const float cv = __shfl_sync(kFullMask, v, src);
    const int ci = __shfl_sync(kFullMask, idx, src);
    if (cv > __shfl_sync(kFullMask, top_v, k - 1)) {  // still beats the k-th best
      // The list is sorted best first, so the entries >= cv are a prefix; cv goes right after.
      const int pos = __popc(__ballot_sync(kFullMask, lane < k && top_v >= cv));
      const float up_v = __shfl_up_sync(kFullMask, top_v, 1);
      const int up_i = __shfl_up_sync(kFullMask, top_i, 1);
      if (lane == pos) {
        top_v = cv;
        top_i = ci;
      } else if (lane > pos && lane < k) {
        top_v = up_v;
        top_i = up_i;
      }
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
topk_cosine_kernel(const T* __restrict__ img, const T* __restrict__ txt,
                   const float* __restrict__ inv_img, const float* __restrict__ inv_txt,
                   float* __restrict__ values, int64_t* __restrict__ indices, int64_t n,
                   int64_t c, int64_t dim, int k) {
  // WMMA wants 32-byte aligned fragment pointers: every fragment offset below is a multiple
  // of 32 bytes from these bases.
  __shared__ __align__(32) uint16_t img_s[BM][kLds];
  __shared__ __align__(32) uint16_t txt_s[BN][kLds];
  __shared__ __align__(32) float dot_s[BM][kLdc];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_m = warp / 2;  // which 32 rows of the tile this warp multiplies
  const int warp_n = warp % 2;  // which 32 columns
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t my_row0 = row0 + warp * kRowsPerWarp;  // rows whose top-k lists this warp keeps

  float row_scale[kRowsPerWarp];
  float top_v[kRowsPerWarp];
  int top_i[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    row_scale[r] = my_row0 + r < n ? inv_img[my_row0 + r] : 0.f;
    top_v[r] = neg_inf();
    top_i[r] = -1;
  }

  const auto* img_bits = reinterpret_cast<const uint16_t*>(img);
  const auto* txt_bits = reinterpret_cast<const uint16_t*>(txt);

  for (int64_t c0 = 0; c0 < c; c0 += BN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int64_t k0 = 0; k0 < dim; k0 += BK) {
      stage<kVec>(img_s, img_bits, n, row0, dim, k0);
      stage<kVec>(txt_s, txt_bits, c, c0, dim, k0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(a[i], reinterpret_cast<const T*>(&img_s[warp_m * 32 + i * 16][kk]), kLds);
          // txt_s[class][d] read column-major is the (d x class) operand: acc = img . txt^T
          wmma::load_matrix_sync(b[i], reinterpret_cast<const T*>(&txt_s[warp_n * 32 + i * 16][kk]), kLds);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();  // before the next slice overwrites img_s / txt_s
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&dot_s[warp_m * 32 + i * 16][warp_n * 32 + j * 16], acc[i][j], kLdc,
                                wmma::mem_row_major);
    __syncthreads();

    const int64_t col_a = c0 + lane;
    const int64_t col_b = c0 + lane + 32;
    const float scale_a = col_a < c ? inv_txt[col_a] : 0.f;
    const float scale_b = col_b < c ? inv_txt[col_b] : 0.f;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (my_row0 + r >= n) break;  // warp-uniform: rows past the end hold no list
      const float* dots = dot_s[warp * kRowsPerWarp + r];
      const float va = col_a < c ? dots[lane] * row_scale[r] * scale_a : neg_inf();
      const float vb = col_b < c ? dots[lane + 32] * row_scale[r] * scale_b : neg_inf();
      offer(top_v[r], top_i[r], va, static_cast<int>(col_a), k, lane);
      offer(top_v[r], top_i[r], vb, static_cast<int>(col_b), k, lane);
    }
    __syncthreads();  // before the next tile's dot products overwrite dot_s
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = my_row0 + r;
    if (row < n && lane < k) {
      values[row * k + lane] = top_v[r];
      indices[row * k + lane] = top_i[r];
    }
  }
}

template <typename T>
void launch_typed(const void* img, const void* txt, const float* inv_img, const float* inv_txt,
                  float* values, int64_t* indices, int64_t n, int64_t c, int64_t dim, int k,
                  cudaStream_t stream) {
  const auto* it = static_cast<const T*>(img);
  const auto* tt = static_cast<const T*>(txt);
  const unsigned blocks = static_cast<unsigned>((n + BM - 1) / BM);
  if (dim % 8 == 0 && detail::aligned16(img) && detail::aligned16(txt)) {
    topk_cosine_kernel<T, true><<<blocks, kThreads, 0, stream>>>(it, tt, inv_img, inv_txt, values,
                                                                indices, n, c, dim, k);
  } else {
    topk_cosine_kernel<T, false><<<blocks, kThreads, 0, stream>>>(it, tt, inv_img, inv_txt, values,
                                                                 indices, n, c, dim, k);
  }
}

}  // namespace

cudaError_t launch_topk_cosine(const void* img, const void* txt, const float* inv_img,
                               const float* inv_txt, float* values, int64_t* indices, int64_t n,
                               int64_t c, int64_t dim, int k, Dtype dtype, cudaStream_t stream) {
  // Class indices travel as int inside the kernel.
  if (k < 1 || k > kMaxTopK || k > c || c > INT32_MAX) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::f16:
      launch_typed<__half>(img, txt, inv_img, inv_txt, values, indices, n, c, dim, k, stream);
      break;
    case Dtype::bf16:
      launch_typed<__nv_bfloat16>(img, txt, inv_img, inv_txt, values, indices, n, c, dim, k, stream);
      break;
    default:
      return cudaErrorInvalidValue;  // fp32 has no exact tensor-core path; ops.py says so first
  }
  return cudaGetLastError();
}

}  // namespace fastlaion
