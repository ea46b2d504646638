/* float16 embeddings to float32, with each row's squared length, for the dataset commands
 * (fastlaion/f16_native.py; fastlaion/dataset/semantic.py's float32_rows is the caller and
 * numpy's astype + einsum its reference).
 *
 * numpy converts float16 one value at a time (about 2.6 ns a value on the dev box: 1.3 s of a
 * 4.6 s exact search over a million 512-d embeddings). x86 CPUs since 2013 convert eight at once
 * (F16C); this file uses that where the CPU has it (checked once, at run time) and a portable
 * conversion elsewhere. Both give numpy's values exactly (except that a signalling NaN comes back
 * quiet from F16C: a NaN either way); the squared lengths are float32 sums
 * (in another order than numpy's, so they may differ in the last bits). A row with an inf or a
 * NaN gets a squared length that is inf or NaN, which is how callers find such rows.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define F16_X86 1
#endif

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    float f;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf, or NaN with its payload */
    } else if (exp) {
        bits = sign | ((exp + 112u) << 23) | (man << 13); /* rebias 15 -> 127 */
    } else {
        f = (float)man * (1.0f / 16777216.0f); /* zero or subnormal: man * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
}

static void rows_portable(const uint16_t *x, int64_t n, int64_t d, float *out, float *norm2) {
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *src = x + i * d;
        float *dst = out + i * d, s = 0.0f;
        for (int64_t j = 0; j < d; j++) {
            float v = half_to_float(src[j]);
            dst[j] = v;
            s += v * v;
        }
        norm2[i] = s;
    }
}

#ifdef F16_X86
__attribute__((target("avx,f16c,fma"))) static void rows_f16c(const uint16_t *x, int64_t n, int64_t d, float *out,
                                                              float *norm2) {
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *src = x + i * d;
        float *dst = out + i * d;
        __m256 acc = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j)));
            _mm256_storeu_ps(dst + j, v);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        float s = _mm_cvtss_f32(q);
        for (; j < d; j++) {
            float v = half_to_float(src[j]);
            dst[j] = v;
            s += v * v;
        }
        norm2[i] = s;
    }
}

static int has_f16c(void) {
    unsigned a, b, c, dx;
    if (!__get_cpuid(1, &a, &b, &c, &dx)) return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1, fma = (c >> 12) & 1;
    if (!(osxsave && avx && f16c && fma)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0)); /* the OS saves the ymm registers */
    return (lo & 6u) == 6u;
}
#endif

/* 1 when the F16C path runs on this CPU, else 0. Called once when the library loads (under
 * f16_native.py's lock), before any f16_rows: `known` is written by that one thread. */
static int known = -1;

int f16_simd(void) {
#ifdef F16_X86
    if (known < 0) known = has_f16c();
    return known;
#else
    return 0;
#endif
}

/* x: n rows of d float16 (C order) -> out: the same as float32; norm2: each row's sum of squares.
 * simd 0 forces the portable path (the tests compare the two). */
void f16_rows(const uint16_t *x, int64_t n, int64_t d, float *out, float *norm2, int simd) {
#ifdef F16_X86
    if (simd && known == 1) {
        rows_f16c(x, n, d, out, norm2);
        return;
    }
#endif
    (void)simd;
    rows_portable(x, n, d, out, norm2);
}

/* ok[i] = 1 when row i of x (n rows of d float16) holds no inf or NaN (exponent bits all ones).
 * Vectorized by GCC (SSE2 is every x86-64's; the library is built at -O2, where GCC 12 does not). */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("O3")))
#endif
void f16_finite_rows(const uint16_t *x, int64_t n, int64_t d, uint8_t *ok) {
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *src = x + i * d;
        uint16_t lowest = 0xffff; /* of the exponents' complement: 0 where an exponent is all ones */
        for (int64_t j = 0; j < d; j++) {
            uint16_t e = (uint16_t)(~src[j] & 0x7c00u);
            lowest = e < lowest ? e : lowest;
        }
        ok[i] = lowest != 0;
    }
}
