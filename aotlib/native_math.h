/* Math shared by aotlib's C kernels (aotlib.native): vectorizable float building blocks. */
#ifndef AOTLIB_NATIVE_MATH_H
#define AOTLIB_NATIVE_MATH_H

#include <stdint.h>

/* exp(x) for float, within 1 ulp of the exact value on [-87, 88] (checked on every 7th
 * float there against double exp): Cephes' polynomial on x - n ln2, times 2^n built from
 * its exponent bits, branch-free so that loops calling it vectorize. Arguments are
 * clamped to that range, where 2^n is a normal float: below it exp is < 2^-125 (SiLU
 * rounds to 0 or to x, a softmax term to nothing next to its maximum's 1). */
static inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float shift = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds */
    float n = (x * 1.44269504088896341f + shift) - shift;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/* sum of a[q] b[q] over n floats, in 16 lanes (so that it vectorizes without reordering
 * licence from -ffast-math), the lanes then added pairwise: four dependent steps, not
 * sixteen (added one by one, they stalled the loops that call this once per row or per
 * (step, head), measured in aotlib/ssd_cpu.c); with AVX-512 the same in registers. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline float dot_f(const float *restrict a, const float *restrict b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t q = 0;
    for (; q + 16 <= n; q += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + q), _mm512_loadu_ps(b + q), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; q < n; q++) s += a[q] * b[q];
    return s;
}
#else
static inline float dot_f(const float *restrict a, const float *restrict b, int64_t n) {
    float lane[16] = {0};
    int64_t q = 0;
    for (; q + 16 <= n; q += 16)
        for (int v = 0; v < 16; v++) lane[v] += a[q + v] * b[q + v];
    float s = 0.0f;
    for (; q < n; q++) s += a[q] * b[q];
    for (int w = 8; w >= 1; w /= 2)
        for (int v = 0; v < w; v++) lane[v] += lane[v + w];
    return lane[0] + s;
}
#endif

#endif
