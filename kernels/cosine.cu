// Fused L2-normalise + row-wise cosine of paired image/text embeddings.
//
// out[i] = <a_i, b_i> / (max(|a_i|, eps) * max(|b_i|, eps)), one warp per row, fp16 or fp32 in,
// fp32 accumulation. Reference: fastlaion.ops.paired_cosine_reference (pure torch).
#include <torch/extension.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAStream.h>

namespace {

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float<at::Half>(at::Half x) { return __half2float(x); }

template <typename T>
__global__ void paired_cosine_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                     float* __restrict__ out, int64_t rows, int64_t dim, float eps) {
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t row = blockIdx.x * warps_per_block + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* ar = a + row * dim;
  const T* br = b + row * dim;
  float dot = 0.f, na = 0.f, nb = 0.f;
  for (int64_t k = lane; k < dim; k += 32) {
    const float x = to_float(ar[k]);
    const float y = to_float(br[k]);
    dot += x * y;
    na += x * x;
    nb += y * y;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    dot += __shfl_down_sync(0xffffffff, dot, offset);
    na += __shfl_down_sync(0xffffffff, na, offset);
    nb += __shfl_down_sync(0xffffffff, nb, offset);
  }
  if (lane == 0) {
    out[row] = dot / (fmaxf(sqrtf(na), eps) * fmaxf(sqrtf(nb), eps));
  }
}

}  // namespace

torch::Tensor paired_cosine(torch::Tensor a, torch::Tensor b, double eps) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "paired_cosine: inputs must be CUDA tensors");
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes(), "paired_cosine: inputs must be (N, D) of equal shape");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "paired_cosine: inputs must share a dtype");
  a = a.contiguous();
  b = b.contiguous();
  const int64_t rows = a.size(0), dim = a.size(1);
  auto out = torch::empty({rows}, a.options().dtype(torch::kFloat32));
  if (rows == 0) return out;
  const int threads = 256;
  const int64_t blocks = (rows + threads / 32 - 1) / (threads / 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(a.scalar_type(), "paired_cosine", [&] {
    paired_cosine_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<float>(), rows, dim,
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paired_cosine", &paired_cosine, "fused L2-normalise + row-wise cosine (CUDA)");
}
