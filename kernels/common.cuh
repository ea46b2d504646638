// Device helpers shared by the kernels: 16-byte loads unpacked to fp32, warp sums.
#pragma once

#include <cstdint>
#include <cstring>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastlaion_kernels.h"

namespace fastlaion {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// A 16-byte word of T as fp32 pairs: Pack<T>::pair(v, i) for i < kPairs (a compile-time i after
// unrolling, so the word selection folds away).
template <typename T>
struct Pack;

template <>
struct Pack<float> {
  static constexpr int kPairs = 2;
  static __device__ __forceinline__ float2 pair(const uint4& v, int i) {
    return i == 0 ? make_float2(__uint_as_float(v.x), __uint_as_float(v.y))
                  : make_float2(__uint_as_float(v.z), __uint_as_float(v.w));
  }
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <>
struct Pack<__half> {
  static constexpr int kPairs = 4;
  static __device__ __forceinline__ float2 pair(const uint4& v, int i) {
    const uint32_t w = word(v, i);
    __half2 h;
    memcpy(&h, &w, sizeof(h));
    return __half22float2(h);
  }
};

template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kPairs = 4;
  static __device__ __forceinline__ float2 pair(const uint4& v, int i) {
    const uint32_t w = word(v, i);
    __nv_bfloat162 h;
    memcpy(&h, &w, sizeof(h));
    return __bfloat1622float2(h);
  }
};

template <typename T>
constexpr int kElemsPer16B = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace detail
}  // namespace fastlaion
