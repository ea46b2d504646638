// Launchers for fastlaion's CUDA kernels.
//
// The .cu files include only CUDA headers, never torch's: torch/extension.h costs minutes of
// nvcc time per GPU architecture, while these kernels compile in seconds. bindings.cpp is the
// one file that sees torch (checks, allocation, the current stream, op registration).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace fastlaion {

enum class Dtype : int { f32 = 0, f16 = 1, bf16 = 2 };

// Largest k that topk_cosine keeps per image (one warp holds the list, a lane per entry).
constexpr int kMaxTopK = 16;

// out[i] = <a_i, b_i> / (max(|a_i|, eps) * max(|b_i|, eps)).
// a, b: (rows, dim) contiguous, dtype `dtype`; out: (rows,) float32. All on the stream's device.
cudaError_t launch_paired_cosine(const void* a, const void* b, float* out, int64_t rows,
                                 int64_t dim, Dtype dtype, float eps, cudaStream_t stream);

// inv_norm[i] = 1 / max(|x_i|, eps). x: (rows, dim) contiguous; inv_norm: (rows,) float32.
cudaError_t launch_inv_norms(const void* x, float* inv_norm, int64_t rows, int64_t dim,
                             Dtype dtype, float eps, cudaStream_t stream);

// For each image i, the k largest cos(img_i, txt_c) over classes c, best first; equal scores
// keep the lower class index first. img: (n, dim), txt: (c, dim) contiguous, dtype f16 or bf16
// (tensor cores); inv_img (n,), inv_txt (c,) from launch_inv_norms; values (n, k) float32,
// indices (n, k) int64. Needs 1 <= k <= min(c, kMaxTopK) and sm_80 or newer.
cudaError_t launch_topk_cosine(const void* img, const void* txt, const float* inv_img,
                               const float* inv_txt, float* values, int64_t* indices, int64_t n,
                               int64_t c, int64_t dim, int k, Dtype dtype, cudaStream_t stream);

}  // namespace fastlaion
