/* Per-token sparsity of one layer of one batch (METHODS §9), in one pass per token row.
 *
 * The native form of neuronspec.capture.stats._token_sparsity_torch (same definitions,
 * see that function): for every token row a (W,) of the `mlp` site, with m = |a|,
 *
 *   sums[4·tid + 0] += 1                          for rows with S = Σ m > 0 (measured)
 *   sums[4·tid + 1] += (ln S − Σ m ln m / S) / ln W           normalised entropy
 *   sums[4·tid + 2] += Σ_k (2k − W − 1) m_(k) / (W · S)       Gini (m_(k) ascending)
 *   sums[4·tid + 3] += (√W − S / √Σ m²) / (√W − 1)            Hoyer
 *   sketch[tid · (n_bins + 2) + k] += 1 for every m, k = 0 below `lo`, n_bins + 1 at or
 *       above `hi`, else 1 + floor(log2(m / lo) · per_log2)   (log-spaced, DDSketch-like)
 *
 * Rows are split among `threads` OpenMP threads (torch's runtime, see scan.c); each thread
 * owns row (4,) of sums and one sketch. The ascending order for Gini comes from sorting the
 * float bits of m (non-negative floats order as their bits): see radix_sort. Per-row sums
 * are float64 (LANES partial sums each).
 * Returns 0, or -1 when scratch memory cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "fastmath.h"

typedef int64_t i64;

#define LANES 8  /* float64 partial sums per quantity */
#define HLANES 4 /* sketch copies */
#define RADIX 1024 /* two 10-bit digits: bits 12..21 and 22..31 (the sign bit is 0) */

/* Sort n keys ascending; `keys` and `tmp` both of n; `count` of 2 · RADIX; returns the
 * array holding the result. Two LSD radix passes order the keys by their top 20 bits
 * (values within 2^-11 relative of each other may stay out of order); an insertion sort
 * then finishes exactly in time n + (inversions left), which are few. */
static uint32_t *radix_sort(uint32_t *keys, uint32_t *tmp, i64 n, uint32_t *count) {
    memset(count, 0, 2 * RADIX * sizeof(uint32_t));
    uint32_t *c0 = count, *c1 = count + RADIX;
    for (i64 i = 0; i < n; i++) {
        const uint32_t k = keys[i];
        c0[(k >> 12) & 0x3ff]++;
        c1[k >> 22]++;
    }
    uint32_t *src = keys, *dst = tmp;
    for (int d = 0; d < 2; d++) {
        const int shift = d ? 22 : 12;
        uint32_t *c = d ? c1 : c0;
        if (c[(src[0] >> shift) & 0x3ff] == (uint32_t)n) continue; /* one digit: no-op */
        uint32_t total = 0;
        for (int j = 0; j < RADIX; j++) {
            const uint32_t here = c[j];
            c[j] = total;
            total += here;
        }
        for (i64 i = 0; i < n; i++) {
            const uint32_t k = src[i];
            dst[c[(k >> shift) & 0x3ff]++] = k;
        }
        uint32_t *swap = src;
        src = dst;
        dst = swap;
    }
    for (i64 i = 1; i < n; i++) {
        const uint32_t k = src[i];
        if (src[i - 1] <= k) continue;
        i64 j = i - 1;
        while (j >= 0 && src[j] > k) {
            src[j + 1] = src[j];
            j--;
        }
        src[j + 1] = k;
    }
    return src;
}

int neuronspec_token_sparsity_f32(
    i64 threads, i64 B, i64 T, i64 W, const float *act, i64 act_sb, i64 act_st,
    i64 *sketch, i64 n_bins, float lo, float hi, float per_log2, float offset,
    double *sums) {
    if (threads < 1 || W < 2) return -2;
    const i64 rows = B * T, nb2 = n_bins + 2;
    const double ln_w = log((double)W), sqrt_w = sqrt((double)W);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : failed)
    {
        i64 tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        uint32_t *keys = malloc((size_t)W * sizeof(uint32_t));
        uint32_t *tmp = malloc((size_t)W * sizeof(uint32_t));
        uint32_t *count = malloc((size_t)(2 * RADIX) * sizeof(uint32_t));
        uint16_t *bins = malloc((size_t)W * sizeof(uint16_t));
        /* HLANES interleaved copies of the sketch (see stats.c); int64: no overflow */
        i64 *lanes = calloc((size_t)(HLANES * nb2), sizeof(i64));
        i64 *hist = sketch + tid * nb2;
        double *out = sums + 4 * tid;
        if (!keys || !tmp || !count || !bins || !lanes) {
            failed += 1;
        } else {
            for (i64 r = rows * tid / nt; r < rows * (tid + 1) / nt; r++) {
                const float *a = act + (r / T) * act_sb + (r % T) * act_st;
                /* LANES independent float64 partial sums per quantity: they vectorise */
                double s1v[LANES] = {0}, s2v[LANES] = {0}, slv[LANES] = {0};
                i64 w = 0;
                for (; w + LANES <= W; w += LANES) {
                    for (int j = 0; j < LANES; j++) {
                        const float m = fabsf(a[w + j]);
                        const float l = log2_pos(m);
                        s1v[j] += (double)m;
                        s2v[j] += (double)m * (double)m;
                        slv[j] += (double)m * (double)l;
                    }
                }
                for (; w < W; w++) {
                    const float m = fabsf(a[w]);
                    s1v[0] += (double)m;
                    s2v[0] += (double)m * (double)m;
                    slv[0] += (double)m * (double)log2_pos(m);
                }
                for (w = 0; w < W; w++) {
                    const float m = fabsf(a[w]);
                    uint32_t bits;
                    memcpy(&bits, &m, sizeof bits);
                    keys[w] = bits;
                    bins[w] = (uint16_t)log_bin(m, per_log2, offset, (int32_t)n_bins, lo, hi);
                }
                w = 0;
                for (; w + HLANES <= W; w += HLANES)
                    for (int j = 0; j < HLANES; j++) lanes[j * nb2 + bins[w + j]]++;
                for (; w < W; w++) lanes[bins[w]]++;
                double s1 = 0.0, s2 = 0.0, slog = 0.0;
                for (int j = 0; j < LANES; j++) {
                    s1 += s1v[j];
                    s2 += s2v[j];
                    slog += slv[j];
                }
                if (!(s1 > 0.0)) continue; /* all-zero row: no distribution over neurons */
                const uint32_t *sorted = radix_sort(keys, tmp, W, count);
                double wv[LANES] = {0};
                const double base = (double)(1 - W); /* 2(k + 1) - W - 1 at k = 0 */
                for (w = 0; w + LANES <= W; w += LANES) {
                    for (int j = 0; j < LANES; j++) {
                        float v;
                        memcpy(&v, &sorted[w + j], sizeof v);
                        wv[j] += (base + 2.0 * (double)(w + j)) * (double)v;
                    }
                }
                for (; w < W; w++) {
                    float v;
                    memcpy(&v, &sorted[w], sizeof v);
                    wv[0] += (base + 2.0 * (double)w) * (double)v;
                }
                double weighted = 0.0;
                for (int j = 0; j < LANES; j++) weighted += wv[j];
                out[0] += 1.0;
                out[1] += (log(s1) - slog * 0.69314718055994531 / s1) / ln_w;
                out[2] += weighted / ((double)W * s1);
                out[3] += (sqrt_w - s1 / sqrt(s2)) / (sqrt_w - 1.0);
            }
            for (i64 k = 0; k < nb2; k++)
                for (int j = 0; j < HLANES; j++) hist[k] += lanes[j * nb2 + k];
        }
        free(keys);
        free(tmp);
        free(count);
        free(bins);
        free(lanes);
    }
    return failed ? -1 : 0;
}

int neuronspec_sparsity_abi(void) { return 1; }
