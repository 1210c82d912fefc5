/* One layer of one batch into the streamed neuron statistics, in one pass over memory.
 *
 * The native form of neuronspec.capture.stats.NeuronStats._add_layer_torch (same
 * accumulators, same definitions; see that module's docstring): reads pre-activations
 * and activations (B, T, W) once and updates, for the columns [w0, w1) of this call,
 *
 *   fire_by_pos (T, W) int32   += [pre > threshold]
 *   fire_by_pos_groups (G, T, W) uint8  += the same, at the window's group (the caller
 *                              folds a group's counts before they could pass 255)
 *                              window_group[b] (NULL: no window groups)
 *   arena       packed rows    += [pre > threshold] at positions p with row_offset[p] >= 0:
 *                              the row at byte row_offset[p] of `arena`, fields of
 *                              row_bits[p] bits (see add_packed; the caller widens a row
 *                              before a count could pass 2^bits - 1)
 *   fires       (B·T, W) uint8  = [pre > threshold]          (when not NULL)
 *   tail keys   int32            n·V + token for every firing at a position whose
 *                                tail_token >= 0 (when tail_keys is not NULL)
 *   act_sum, act_sumsq (W,) f64 += per-window float32 sums of a, a², widened per window
 *   act_absmax  (W,) f64        = max(., max |a|)
 *   pearson_abs_sum (W,) f64   += |Pearson r(a, position)| per window
 *   window_sums (B, W) f64      = the per-window float32 sums Σ_t a, widened (when not NULL;
 *                                the window-mean moments of the `mlp` site come from them)
 *
 * The columns are split among `threads` OpenMP threads (torch's own runtime, see
 * scan.c); every column belongs to one thread. The tail keys of the thread owning columns [lo, hi) go to
 * tail_keys[n_tail·lo ..] (room for n_tail·(hi - lo) keys, n_tail = number of positions
 * with tail_token >= 0), in no particular order; tail_spans[2·tid] and [2·tid + 1] say
 * where they start and how many there are. Returns the number of (window, neuron) pairs with
 * a non-finite activation (the caller refuses them), or -1 when scratch memory cannot
 * be allocated.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

/* Packed (neuron, token) count rows: field w of a row of `bits` bits (1, 2, 4, 8, 16 or
 * 32) is bits [w·bits, (w + 1)·bits) of the row, little-endian within each byte (8, 16
 * and 32 are plain uint8 / uint16 / uint32 arrays). Adds the firings f[0..n) (0 or 1) of
 * columns [w0, w0 + n) into the row; w0 is a multiple of 8, so columns of different calls
 * never share a byte. Plain byte adds: the caller guarantees that no field passes
 * 2^bits - 1, so no carry crosses into the next field. */
/* add_packed for fields narrower than a byte; inlined with `bits` a constant, so the loop
 * over whole bytes unrolls. */
static inline __attribute__((always_inline)) void add_subbyte(uint8_t *row, const i64 bits,
                                                              i64 w0, i64 n,
                                                              const uint8_t *f) {
    const i64 per = 8 / bits; /* fields per byte */
    uint8_t *d = row + w0 / per;
    const i64 whole = n / per * per;
    for (i64 w = 0; w < whole; w += per) {
        uint8_t v = 0;
        for (i64 k = 0; k < per; k++) v |= (uint8_t)(f[w + k] << (k * bits));
        d[w / per] += v;
    }
    if (whole < n) {
        uint8_t v = 0;
        for (i64 k = 0; whole + k < n; k++) v |= (uint8_t)(f[whole + k] << (k * bits));
        d[whole / per] += v;
    }
}

static inline void add_packed(uint8_t *row, i64 bits, i64 w0, i64 n, const uint8_t *f) {
    if (bits == 32) {
        uint32_t *d = (uint32_t *)row + w0;
        for (i64 w = 0; w < n; w++) d[w] += f[w];
    } else if (bits == 16) {
        uint16_t *d = (uint16_t *)row + w0;
        for (i64 w = 0; w < n; w++) d[w] += f[w];
    } else if (bits == 8) {
        uint8_t *d = row + w0;
        for (i64 w = 0; w < n; w++) d[w] += f[w];
    } else if (bits == 4) {
        add_subbyte(row, 4, w0, n, f);
    } else if (bits == 2) {
        add_subbyte(row, 2, w0, n, f);
    } else {
        add_subbyte(row, 1, w0, n, f);
    }
}

/* Field n of a packed row (see add_packed). */
static inline int32_t packed_count(const uint8_t *row, i64 bits, i64 n) {
    if (bits == 32) return (int32_t)((const uint32_t *)row)[n];
    if (bits == 16) return ((const uint16_t *)row)[n];
    if (bits == 8) return row[n];
    const i64 bit = n * bits;
    return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

static i64 layer_columns(
    i64 w0, i64 w1, i64 B, i64 T, i64 W,
    const float *pre, i64 pre_sb, i64 pre_st,
    const float *act, i64 act_sb, i64 act_st,
    float threshold, const float *zpos, const i64 *row_offset, const i64 *row_bits,
    uint8_t *arena, uint8_t *fires, int32_t *fire_by_pos,
    const i64 *window_group, uint8_t *fire_by_pos_groups,
    const i64 *tail_tokens, i64 V, int32_t *tail_keys, i64 *tail_found,
    double *act_sum, double *act_sumsq, double *act_absmax, double *pearson_abs_sum,
    double *window_sums, double constant_variance) {
    const i64 n = w1 - w0;
    *tail_found = 0;
    if (n <= 0) return 0;
    i64 found = 0; /* tail keys written */
    /* per-window float32 sums for every batch row: (3, B, n); positions are the outer
     * loop so that fire_by_pos row t is read and written once per batch, not B times */
    float *scratch = malloc((size_t)(3 * B + 1) * n * sizeof(float));
    uint8_t *fire_row = malloc((size_t)n);
    if (!scratch || !fire_row) {
        free(scratch);
        free(fire_row);
        return -1;
    }
    float *sums = scratch, *sumsqs = scratch + B * n, *moments = scratch + 2 * B * n;
    float *amax = scratch + 3 * B * n;
    i64 nonfinite = 0;
    for (i64 w = 0; w < (3 * B + 1) * n; w++) scratch[w] = 0.0f;
    for (i64 t = 0; t < T; t++) {
        const float z = zpos[t];
        int32_t *fp = fire_by_pos + t * W + w0;
        for (i64 b = 0; b < B; b++) {
            const float *p = pre + b * pre_sb + t * pre_st + w0;
            const float *a = act + b * act_sb + t * act_st + w0;
            const i64 row = row_offset[b * T + t];
            uint8_t *f = fires ? fires + (b * T + t) * W + w0 : fire_row;
            float *s = sums + b * n, *ss = sumsqs + b * n, *pm = moments + b * n;
            /* separate simple loops: each one vectorises */
            for (i64 w = 0; w < n; w++) {
                const float v = a[w];
                const float m = fabsf(v);
                s[w] += v;
                ss[w] += v * v;
                pm[w] += z * v;
                amax[w] = m > amax[w] ? m : amax[w];
            }
            for (i64 w = 0; w < n; w++) f[w] = p[w] > threshold;
            for (i64 w = 0; w < n; w++) fp[w] += f[w];
            if (fire_by_pos_groups) {
                uint8_t *gp = fire_by_pos_groups + (window_group[b] * T + t) * W + w0;
                for (i64 w = 0; w < n; w++) gp[w] += f[w];
            }
            if (row >= 0) add_packed(arena + row, row_bits[b * T + t], w0, n, f);
            const i64 token = tail_keys ? tail_tokens[b * T + t] : -1;
            if (token >= 0) {
                /* branch-free: every key is written, the count advances on a firing */
                i64 key = w0 * V + token; /* < W·V, which the caller checks fits int32 */
                for (i64 w = 0; w < n; w++, key += V) {
                    tail_keys[found] = (int32_t)key;
                    found += f[w];
                }
            }
        }
    }
    for (i64 b = 0; b < B; b++) {
        for (i64 w = 0; w < n; w++) {
            /* as _abs_pearson_with_position: float32 window sums, widened, then float64 */
            const double sum = sums[b * n + w], sumsq = sumsqs[b * n + w];
            const double moment = moments[b * n + w];
            nonfinite += !isfinite(sumsq) || !isfinite(sum) || !isfinite(moment);
            act_sum[w0 + w] += sum;
            act_sumsq[w0 + w] += sumsq;
            if (window_sums) window_sums[b * W + w0 + w] = sum;
            const double cov = moment / (double)T;
            const double mean_square = sumsq / (double)T;
            const double mean = sum / (double)T;
            double variance = mean_square - mean * mean;
            variance = variance > 0.0 ? variance : 0.0;
            double r = 0.0;
            if (!(variance <= constant_variance * mean_square)) {
                double sd = sqrt(variance);
                r = cov / (sd > 1e-300 ? sd : 1e-300);
            }
            pearson_abs_sum[w0 + w] += fabs(r);
        }
    }
    for (i64 w = 0; w < n; w++) {
        const double m = amax[w];
        act_absmax[w0 + w] = m > act_absmax[w0 + w] ? m : act_absmax[w0 + w];
    }
    free(scratch);
    free(fire_row);
    *tail_found = found;
    return nonfinite;
}

i64 neuronspec_layer_stats_f32(
    i64 threads, i64 B, i64 T, i64 W,
    const float *pre, i64 pre_sb, i64 pre_st,
    const float *act, i64 act_sb, i64 act_st,
    float threshold, const float *zpos, const i64 *row_offset, const i64 *row_bits,
    uint8_t *arena, uint8_t *fires, int32_t *fire_by_pos,
    const i64 *window_group, uint8_t *fire_by_pos_groups,
    const i64 *tail_tokens, i64 V, i64 n_tail, int32_t *tail_keys, i64 *tail_spans,
    double *act_sum, double *act_sumsq, double *act_absmax, double *pearson_abs_sum,
    double *window_sums, double constant_variance) {
    /* tail_spans (threads, 2) */
    if (threads < 1) return -2;
    const i64 blocks = (W + 15) / 16; /* slices of whole 64-byte lines of float32 columns */
    i64 nonfinite = 0, failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nonfinite, failed)
    {
        i64 tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const i64 lo = 16 * (blocks * tid / nt);
        const i64 hi_block = 16 * (blocks * (tid + 1) / nt);
        const i64 hi = hi_block < W ? hi_block : W;
        int32_t *keys = tail_keys ? tail_keys + n_tail * lo : NULL;
        if (tail_spans) tail_spans[2 * tid] = n_tail * lo;
        i64 tail_found = 0;
        const i64 found = layer_columns(
            lo, hi, B, T, W, pre, pre_sb, pre_st, act, act_sb, act_st, threshold, zpos,
            row_offset, row_bits, arena, fires, fire_by_pos, window_group, fire_by_pos_groups,
            tail_tokens, V, keys, &tail_found,
            act_sum, act_sumsq, act_absmax, pearson_abs_sum, window_sums, constant_variance);
        if (tail_spans) tail_spans[2 * tid + 1] = tail_found;
        if (found < 0) failed += 1;
        else nonfinite += found;
    }
    return failed ? -1 : nonfinite;
}

/* The final (neuron, token) firing table of a layer, merged from its two parts
 * (neuronspec.capture.packed_rows.UnigramCounter.table):
 *
 *   arena, row_offset, row_bits   D packed count rows (see add_packed), in ascending token
 *                                 order: row r at byte row_offset[r], fields of row_bits[r]
 *                                 bits, counts token dense_tokens[r]
 *   tail_keys, tail_counts        (P,) int32, the other tokens, key = neuron·V + token,
 *                                 sorted, unique
 *
 * Output: every nonzero count as (key, count), int32 (the caller checks that W·V and every
 * count fit), sorted by key (neuron-major, then token),
 * without sorting: neuron n's entries start at offsets[n] (from unigram_dense_nnz and the
 * tail's neuron boundaries, tail_starts, (W + 1,)), and within a neuron the ascending dense
 * rows are merged with its ascending tail entries (a token is dense or tail, never both).
 * Neurons go in blocks of 16, each row's fields of a block decoded together. */
#define TABLE_LANES 16

/* The fields [n0, n1) of packed row r into out[(n - n0) * stride] */
static inline void decode_block(const uint8_t *arena, const i64 *row_offset,
                                const uint8_t *row_bits, i64 r, i64 n0, i64 n1,
                                int32_t *out, i64 stride) {
    const uint8_t *row = arena + row_offset[r];
    const i64 bits = row_bits[r];
    for (i64 n = n0; n < n1; n++) out[(n - n0) * stride] = packed_count(row, bits, n);
}

/* nnz[n] = number of nonzero fields n of the D packed rows, (W,) */
void neuronspec_unigram_dense_nnz(i64 threads, i64 D, i64 W, const uint8_t *arena,
                                  const i64 *row_offset, const uint8_t *row_bits, i64 *nnz) {
    const i64 blocks = (W + TABLE_LANES - 1) / TABLE_LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (i64 k = 0; k < blocks; k++) {
        const i64 n0 = k * TABLE_LANES, n1 = n0 + TABLE_LANES < W ? n0 + TABLE_LANES : W;
        i64 count[TABLE_LANES] = {0};
        int32_t fields[TABLE_LANES];
        for (i64 r = 0; r < D; r++) {
            decode_block(arena, row_offset, row_bits, r, n0, n1, fields, 1);
            for (i64 n = n0; n < n1; n++) count[n - n0] += fields[n - n0] != 0;
        }
        for (i64 n = n0; n < n1; n++) nnz[n] = count[n - n0];
    }
}

/* One neuron: its dense column col (D,) merged with its tail entries [t0, t1). Entries
 * with no tail left are written branch-free (a zero count writes a slot that the next
 * entry overwrites); `exact` forbids the one spurious write past the neuron's last entry,
 * for a neuron after which no later neuron of its block has an entry (that slot is
 * another thread's, or past the end). */
static inline void table_neuron(i64 D, i64 base, const int32_t *col, const i64 *dense_tokens,
                                const int32_t *tail_keys, const int32_t *tail_counts,
                                i64 t, i64 t1, i64 o, int exact, int32_t *out_keys,
                                int32_t *out_counts) {
    i64 r = 0;
    for (; r < D && t < t1; r++) {
        if (col[r] == 0) continue;
        const i64 key = base + dense_tokens[r];
        for (; t < t1 && tail_keys[t] < key; t++, o++) {
            out_keys[o] = tail_keys[t];
            out_counts[o] = tail_counts[t];
        }
        out_keys[o] = (int32_t)key;
        out_counts[o++] = col[r];
    }
    for (; t < t1; t++, o++) {
        out_keys[o] = tail_keys[t];
        out_counts[o] = tail_counts[t];
    }
    if (exact) {
        for (; r < D; r++) {
            if (col[r] == 0) continue;
            out_keys[o] = (int32_t)(base + dense_tokens[r]);
            out_counts[o++] = col[r];
        }
        return;
    }
    for (; r < D; r++) {
        out_keys[o] = (int32_t)(base + dense_tokens[r]);
        out_counts[o] = col[r];
        o += col[r] != 0;
    }
}

/* Returns 0, or -1 when scratch memory cannot be allocated. */
int neuronspec_unigram_table(
    i64 threads, i64 D, i64 W, i64 V, const uint8_t *arena, const i64 *row_offset,
    const uint8_t *row_bits, const i64 *dense_tokens,
    const int32_t *tail_keys, const int32_t *tail_counts, const i64 *tail_starts,
    const i64 *offsets, int32_t *out_keys, int32_t *out_counts) {
    const i64 blocks = (W + TABLE_LANES - 1) / TABLE_LANES;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : failed)
    {
        /* the block's columns, lane-major: (TABLE_LANES, D) */
        int32_t *cols = malloc((size_t)(D > 0 ? D : 1) * TABLE_LANES * sizeof(int32_t));
        if (!cols) failed += 1;
#pragma omp for schedule(static)
        for (i64 k = 0; k < blocks; k++) {
            if (!cols) continue;
            const i64 n0 = k * TABLE_LANES, n1 = n0 + TABLE_LANES < W ? n0 + TABLE_LANES : W;
            for (i64 r = 0; r < D; r++)
                decode_block(arena, row_offset, row_bits, r, n0, n1, cols + r, D);
            /* neurons in order: a spurious write lands on slot offsets[n + 1], which a
             * later neuron of this block overwrites if the slot is this block's */
            for (i64 n = n0; n < n1; n++)
                table_neuron(D, n * V, cols + (n - n0) * D, dense_tokens, tail_keys,
                             tail_counts, tail_starts[n], tail_starts[n + 1], offsets[n],
                             offsets[n + 1] >= offsets[n1], out_keys, out_counts);
        }
        free(cols);
    }
    return failed ? -1 : 0;
}

/* Version of the calling convention above; the loader refuses a library with another. */
int neuronspec_stats_abi(void) { return 13; }
