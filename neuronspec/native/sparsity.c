/* Per-token sparsity of one layer of one batch (METHODS §9), in one pass per token row.
 *
 * The native form of neuronspec.capture.sketch.token_sparsity_torch (same definitions,
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
 * owns row (4,) of sums and one sketch. log2 m is computed once per value (into a row
 * buffer) for both Σ m ln m and the sketch bin. The ascending order for Gini comes from
 * sorting the float bits of m (non-negative floats order as their bits): see radix_sort.
 * Per-row sums are float64 (vectorised: `omp simd` reductions).
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

#define HLANES 4 /* sketch copies (uint32, flushed before they could overflow) */
#define LOW_SHIFT 9 /* the low digit: bits 9..18 */
#define LOW_RADIX 1024
#define HIGH_SHIFT 19 /* the high digit: bits 19..30 (the sign bit of m is 0) */
#define HIGH_RADIX 4096

/* Sort n keys ascending; `keys` and `tmp` both of n; `count` of LOW_RADIX + HIGH_RADIX;
 * returns the array holding the result. Two LSD radix passes order the keys by bits 9..30
 * (values within 2^-14 relative of each other may stay out of order); an insertion sort
 * then finishes exactly in time n + (inversions left), which are few. Only the row's
 * high-digit range [dlo, dhi] is cleared and scanned for offsets. */
static uint32_t *radix_sort(uint32_t *keys, uint32_t *tmp, i64 n, uint32_t *count,
                            uint32_t dlo, uint32_t dhi) {
    uint32_t *c0 = count, *ch = count + LOW_RADIX;
    memset(c0, 0, LOW_RADIX * sizeof(uint32_t));
    for (i64 i = 0; i < n; i++) c0[(keys[i] >> LOW_SHIFT) & (LOW_RADIX - 1)]++;
    uint32_t total = 0;
    for (int j = 0; j < LOW_RADIX; j++) {
        const uint32_t here = c0[j];
        c0[j] = total;
        total += here;
    }
    for (i64 i = 0; i < n; i++) {
        const uint32_t k = keys[i];
        tmp[c0[(k >> LOW_SHIFT) & (LOW_RADIX - 1)]++] = k;
    }
    uint32_t *src = tmp;
    if (dhi > dlo) {
        memset(ch + dlo, 0, (dhi - dlo + 1) * sizeof(uint32_t));
        for (i64 i = 0; i < n; i++) ch[src[i] >> HIGH_SHIFT]++;
        total = 0;
        for (uint32_t d = dlo; d <= dhi; d++) {
            const uint32_t here = ch[d];
            ch[d] = total;
            total += here;
        }
        for (i64 i = 0; i < n; i++) {
            const uint32_t k = src[i];
            keys[ch[k >> HIGH_SHIFT]++] = k;
        }
        src = keys;
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

static void flush_lanes(uint32_t *lanes, i64 nb2, i64 *hist) {
    for (i64 k = 0; k < nb2; k++) {
        for (int j = 0; j < HLANES; j++) {
            hist[k] += lanes[j * nb2 + k];
            lanes[j * nb2 + k] = 0;
        }
    }
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
        float *logs = malloc((size_t)W * sizeof(float));
        uint32_t *count = malloc((size_t)(LOW_RADIX + HIGH_RADIX) * sizeof(uint32_t));
        uint16_t *bins = malloc((size_t)W * sizeof(uint16_t));
        /* HLANES interleaved copies of the sketch (element w into copy w % HLANES):
         * neighbouring values often share a bin, and one copy would chain every increment
         * on the one before through memory */
        uint32_t *lanes = calloc((size_t)(HLANES * nb2), sizeof(uint32_t));
        i64 *hist = sketch + tid * nb2;
        double *out = sums + 4 * tid;
        i64 unflushed = 0;
        if (!keys || !tmp || !logs || !count || !bins || !lanes) {
            failed += 1;
        } else {
            for (i64 r = rows * tid / nt; r < rows * (tid + 1) / nt; r++) {
                const float *a = act + (r / T) * act_sb + (r % T) * act_st;
                uint32_t kmin = UINT32_MAX, kmax = 0;
                double s1 = 0.0, s2 = 0.0, slog = 0.0;
#pragma omp simd reduction(min : kmin) reduction(max : kmax) reduction(+ : s1, s2, slog)
                for (i64 w = 0; w < W; w++) {
                    const float m = fabsf(a[w]);
                    const float l = log2_pos(m);
                    uint32_t bits;
                    memcpy(&bits, &m, sizeof bits);
                    keys[w] = bits;
                    logs[w] = l;
                    kmin = bits < kmin ? bits : kmin;
                    kmax = bits > kmax ? bits : kmax;
                    s1 += (double)m;
                    s2 += (double)m * (double)m;
                    slog += (double)m * (double)l;
                }
#pragma omp simd
                for (i64 w = 0; w < W; w++)
                    bins[w] = (uint16_t)log_bin(logs[w], fabsf(a[w]), per_log2, offset,
                                                   (int32_t)n_bins, lo, hi);
                if (unflushed + W > (i64)UINT32_MAX) {
                    flush_lanes(lanes, nb2, hist);
                    unflushed = 0;
                }
                unflushed += W;
                i64 w = 0;
                for (; w + HLANES <= W; w += HLANES)
                    for (int j = 0; j < HLANES; j++) lanes[j * nb2 + bins[w + j]]++;
                for (; w < W; w++) lanes[bins[w]]++;
                if (!(s1 > 0.0)) continue; /* all-zero row: no distribution over neurons */
                const uint32_t *sorted = radix_sort(keys, tmp, W, count, kmin >> HIGH_SHIFT,
                                                     kmax >> HIGH_SHIFT);
                double weighted = 0.0; /* Σ_k (2k + 1 - W) m_(k), k from 0 */
#pragma omp simd reduction(+ : weighted)
                for (w = 0; w < W; w++) {
                    float v;
                    memcpy(&v, &sorted[w], sizeof v);
                    weighted += (double)(2 * w + 1 - W) * (double)v;
                }
                out[0] += 1.0;
                out[1] += (log(s1) - slog * 0.69314718055994531 / s1) / ln_w;
                out[2] += weighted / ((double)W * s1);
                out[3] += (sqrt_w - s1 / sqrt(s2)) / (sqrt_w - 1.0);
            }
            flush_lanes(lanes, nb2, hist);
        }
        free(keys);
        free(tmp);
        free(logs);
        free(count);
        free(bins);
        free(lanes);
    }
    return failed ? -1 : 0;
}

int neuronspec_sparsity_abi(void) { return 1; }
