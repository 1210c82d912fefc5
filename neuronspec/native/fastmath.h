/* Inline math of the sparsity kernel (sparsity.c). */
#ifndef NEURONSPEC_FASTMATH_H
#define NEURONSPEC_FASTMATH_H
#include <stdint.h>
#include <string.h>

/* log2(x) for normal x > 0, about 1e-7 absolute error; finite for 0 and subnormals
 * (callers multiply it by x there, or bin those values apart): x = 2^e · m with m in
 * [√½, √2), log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172. */
static inline float log2_pos(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    const int32_t big = (bits & 0x007fffff) > 0x003504f3; /* mantissa above √2 */
    const int32_t mbits = (bits & 0x007fffff) | (big ? 0x3f000000 : 0x3f800000);
    float m;
    memcpy(&m, &mbits, sizeof m);
    const float e = (float)(((bits >> 23) & 0xff) - 127 + big);
    const float s = (m - 1.0f) / (m + 1.0f);
    const float s2 = s * s;
    float p = 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return e + 2.0f * s * p * 1.44269504088896341f;
}

/* Bin of m >= 0 on a log scale, given log2_m = log2_pos(m): 0 below `lo`, `n_bins + 1` at
 * or above `hi`, else clamp(floor(log2_m · per_log2 + offset), 1, n_bins) (NaN -> 1). */
static inline int32_t log_bin(float log2_m, float m, float per_log2, float offset,
                              int32_t n_bins, float lo, float hi) {
    float index = log2_m * per_log2 + offset;
    index = index >= 1.0f ? index : 1.0f; /* NaN -> 1 */
    index = index <= (float)n_bins ? index : (float)n_bins;
    int32_t k = (int32_t)index; /* index >= 1: truncation is floor */
    k = m < lo ? 0 : k;
    k = m >= hi ? n_bins + 1 : k;
    return k;
}

#endif
