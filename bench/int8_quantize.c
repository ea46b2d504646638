/* bench/int8.py's quantizer: bfloat16 activations to uint8 in one pass, round(x / scale) + zero
   point, clamped to 0..255 (torch's own takes three: a float32 copy, quantize_per_tensor, and
   int_repr's copy). AVX-512 where the CPU has it (every AMX CPU does), else a plain loop. */
#include <stdint.h>
#include <math.h>
#include <immintrin.h>

static void plain(const uint16_t *x, int64_t n, float inv_scale, float zp, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) {
        union { uint32_t u; float f; } v = { (uint32_t)x[i] << 16 };
        float q = nearbyintf(v.f * inv_scale) + zp;
        out[i] = (uint8_t)(q < 0.f ? 0.f : q > 255.f ? 255.f : q);
    }
}

__attribute__((target("avx512f,avx512bw")))
static void wide(const uint16_t *x, int64_t n, float inv_scale, float zp, uint8_t *out) {
    const __m512 inv = _mm512_set1_ps(inv_scale);
    const __m512i z = _mm512_set1_epi32((int)zp), lo = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16);
        __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(w), inv)), z);
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtusepi32_epi8(_mm512_max_epi32(q, lo)));
    }
    plain(x + i, n - i, inv_scale, zp, out + i);
}

int int8q_simd(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

void int8q_bf16_to_u8(const uint16_t *x, int64_t n, float inv_scale, int32_t zp, uint8_t *out, int simd) {
    (simd ? wide : plain)(x, n, inv_scale, (float)zp, out);
}
