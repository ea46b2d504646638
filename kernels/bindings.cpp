// Torch glue for the kernels: argument checks, allocation, the current stream, and registration
// as torch.ops.fastlaion.* (TORCH_LIBRARY, not pybind11: the lighter headers build in seconds).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "fastlaion_kernels.h"

namespace {

using fastlaion::Dtype;

Dtype kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, op, ": dtype must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), op, ": inputs must be CUDA tensors");
  TORCH_CHECK(a.device() == b.device(), op, ": inputs must be on one device");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": inputs must share a dtype");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": inputs must be 2-D");
}

at::Tensor paired_cosine(const at::Tensor& a_in, const at::Tensor& b_in, double eps) {
  check_pair(a_in, b_in, "paired_cosine");
  TORCH_CHECK(a_in.sizes() == b_in.sizes(), "paired_cosine: inputs must be (N, D) of equal shape");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  at::Tensor out = at::empty({a.size(0)}, a.options().dtype(at::kFloat));
  check_launch(fastlaion::launch_paired_cosine(a.data_ptr(), b.data_ptr(), out.data_ptr<float>(),
                                               a.size(0), a.size(1), kernel_dtype(a, "paired_cosine"),
                                               static_cast<float>(eps),
                                               c10::cuda::getCurrentCUDAStream()),
               "paired_cosine");
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_cosine(const at::Tensor& img_in, const at::Tensor& txt_in,
                                               int64_t k, double eps) {
  check_pair(img_in, txt_in, "topk_cosine");
  TORCH_CHECK(img_in.size(1) == txt_in.size(1), "topk_cosine: img (N, D) and txt (C, D) need one D");
  const Dtype dtype = kernel_dtype(img_in, "topk_cosine");
  TORCH_CHECK(dtype != Dtype::f32, "topk_cosine: the CUDA kernel takes float16 or bfloat16");
  const int64_t n = img_in.size(0), c = txt_in.size(0), dim = img_in.size(1);
  TORCH_CHECK(k >= 1 && k <= fastlaion::kMaxTopK && k <= c, "topk_cosine: need 1 <= k <= min(C, ",
              fastlaion::kMaxTopK, "), got k=", k, " with C=", c);
  const c10::cuda::CUDAGuard guard(img_in.device());
  const at::Tensor img = img_in.contiguous();
  const at::Tensor txt = txt_in.contiguous();
  const auto f32 = img.options().dtype(at::kFloat);
  at::Tensor values = at::empty({n, k}, f32);
  at::Tensor indices = at::empty({n, k}, img.options().dtype(at::kLong));
  if (n == 0) return {values, indices};
  at::Tensor inv_img = at::empty({n}, f32);
  at::Tensor inv_txt = at::empty({c}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float eps_f = static_cast<float>(eps);
  check_launch(fastlaion::launch_inv_norms(img.data_ptr(), inv_img.data_ptr<float>(), n, dim, dtype,
                                           eps_f, stream),
               "topk_cosine (image norms)");
  check_launch(fastlaion::launch_inv_norms(txt.data_ptr(), inv_txt.data_ptr<float>(), c, dim, dtype,
                                           eps_f, stream),
               "topk_cosine (text norms)");
  check_launch(fastlaion::launch_topk_cosine(img.data_ptr(), txt.data_ptr(), inv_img.data_ptr<float>(),
                                             inv_txt.data_ptr<float>(), values.data_ptr<float>(),
                                             indices.data_ptr<int64_t>(), n, c, dim,
                                             static_cast<int>(k), dtype, stream),
               "topk_cosine");
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY(fastlaion, m) {
  m.def("paired_cosine(Tensor a, Tensor b, float eps) -> Tensor");
  m.def("topk_cosine(Tensor img, Tensor txt, int k, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlaion, CUDA, m) {
  m.impl("paired_cosine", &paired_cosine);
  m.impl("topk_cosine", &topk_cosine);
}
