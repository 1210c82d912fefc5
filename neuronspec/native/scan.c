/* Selective scan forward (Gu & Dao 2023, Mamba, eq. 2a/2b) for CPU, no autograd.
 *
 * Built and loaded by neuronspec/native (ctypes, no torch headers), called through
 * neuronspec/models/kernel.py; used by neuronspec/models/scan.py when no gradient is
 * needed. Per batch row b, channel c and state n, with h_0 = 0:
 *
 *     h_t[c, n] = exp(Δ_t[c] A[c, n]) h_{t-1}[c, n] + Δ_t[c] x_t[c] B_t[n]
 *     y_t[c]    = Σ_n C_t[n] h_t[c, n]
 *     out_t[c]  = (y_t[c] + D[c] x_t[c]) · z_t[c] / (1 + exp(-z_t[c]))
 *
 * Δ is computed here from the raw dt as softplus(dt + delta_bias) (when `softplus`; the
 * bias may be NULL). Layout: dt, x, z, out are (B, L, d) with channel stride 1 and the
 * given batch / time strides; Bm, Cm are (B, L, N) with state stride 1; At is Aᵀ,
 * (N, d) contiguous; h_last is (B, d, N) contiguous. D, z may be NULL (no skip / no gate).
 * delta_sum, when not NULL, is (B, d) contiguous float64 and receives Σ_t Δ_t[c] per batch
 * row: the window sums of Δ that the statistics pass needs (it costs one add per value).
 *
 * Channels are processed in blocks of CB lanes so that the inner loops over lanes
 * vectorise; the state h of a block, (N, CB), stays in registers or L1. Blocks are shared
 * among `threads` OpenMP threads; the library links libgomp by soname, so inside torch
 * it uses torch's own OpenMP runtime and thread pool (no second pool competing for the
 * cores). Built without OpenMP, the pragma is ignored and one thread runs.
 * exp is evaluated inline (Cody-Waite reduction + polynomial, ≤ 2 ulp) so the lane
 * loops vectorise with any C compiler, without libmvec.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;

/* ---- exp, float: cephes expf reduction and minimax polynomial on |r| <= ln2/2 ---- */
static inline float exp_f32(float x) {
    float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x/ln2) */
    float r = xc - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* ---- exp, double: fdlibm reduction, degree-13 Taylor polynomial on |r| <= ln2/2 ---- */
static inline double exp_f64(double x) {
    double xc = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    double k = (xc * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
    double r = xc - k * 6.93147180369123816490e-01;
    r = r - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;          /* 1/13! */
    p = p * r + 1.0 / 479001600.0;          /* 1/12! */
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    int64_t bits = ((int64_t)k + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -708.0 ? 0.0 : p * scale;
}

/* log1p(y) for y in [0, 1] as 2 atanh(s), s = y / (2 + y) <= 1/3 (series in s²), and
 * softplus(v) = log(1 + e^v) = max(v, 0) + log1p(e^-|v|), returning v above 20 as
 * torch.nn.functional.softplus does (threshold 20). */
static inline float softplus_f32(float v) {
    const float y = exp_f32(v > 0.0f ? -v : v);
    const float s = y / (2.0f + y), s2 = s * s;
    float p = 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    const float r = (v > 0.0f ? v : 0.0f) + 2.0f * s * p;
    return v > 20.0f ? v : r;
}

static inline double softplus_f64(double v) {
    const double y = exp_f64(v > 0.0 ? -v : v);
    const double s = y / (2.0 + y), s2 = s * s;
    double p = 1.0 / 35.0;
    for (int k = 33; k >= 1; k -= 2) p = p * s2 + 1.0 / k;
    const double r = (v > 0.0 ? v : 0.0) + 2.0 * s * p;
    return v > 20.0 ? v : r;
}

/* One block of `cb` (<= CB) channels starting at c, all batch rows. NS is the state
 * size; when the caller passes a literal, the compiler unrolls the state loops. */
#define DEFINE_BLOCK(NAME, REAL, CB, EXP, SOFTPLUS)                                         \
    static inline void NAME(i64 c, int cb, const int NS, i64 B, i64 L, i64 d,              \
                            const REAL *delta, i64 dl_sb, i64 dl_sl,                        \
                            const REAL *bias, int softplus,                                 \
                            const REAL *x, i64 x_sb, i64 x_sl,                              \
                            const REAL *At,                                                 \
                            const REAL *Bm, i64 B_sb, i64 B_sl,                             \
                            const REAL *Cm, i64 C_sb, i64 C_sl,                             \
                            const REAL *D, const REAL *z, i64 z_sb, i64 z_sl,               \
                            REAL *out, i64 o_sb, i64 o_sl, REAL *h_last,                    \
                            double *delta_sum) {                                            \
        REAL h[NS][CB];                                                                     \
        REAL a[NS][CB];                                                                     \
        REAL dl[CB], dx[CB], y[CB], bl[CB];                                                 \
        double dsum[CB];                                                                    \
        for (int l = 0; l < CB; l++) bl[l] = bias && l < cb ? bias[c + l] : 0;              \
        for (i64 b = 0; b < B; b++) {                                                       \
            for (int n = 0; n < NS; n++)                                                    \
                for (int l = 0; l < CB; l++) h[n][l] = 0;                                   \
            for (int l = 0; l < CB; l++) dsum[l] = 0;                                       \
            for (int n = 0; n < NS; n++)                                                    \
                for (int l = 0; l < CB; l++) a[n][l] = l < cb ? At[n * d + c + l] : 0;      \
            for (i64 t = 0; t < L; t++) {                                                   \
                const REAL *dl_t = delta + b * dl_sb + t * dl_sl + c;                       \
                const REAL *x_t = x + b * x_sb + t * x_sl + c;                              \
                const REAL *B_t = Bm + b * B_sb + t * B_sl;                                 \
                const REAL *C_t = Cm + b * C_sb + t * C_sl;                                 \
                /* simple lane loops (no calls, no branches on pointers): they vectorise */ \
                for (int l = 0; l < CB; l++) dl[l] = (l < cb ? dl_t[l] : 0) + bl[l];        \
                if (softplus)                                                               \
                    for (int l = 0; l < CB; l++) dl[l] = SOFTPLUS(dl[l]);                   \
                for (int l = 0; l < CB; l++) dsum[l] += dl[l];                              \
                for (int l = 0; l < CB; l++) {                                              \
                    dx[l] = l < cb ? dl[l] * x_t[l] : 0;                                    \
                    y[l] = 0;                                                               \
                }                                                                           \
                for (int n = 0; n < NS; n++) {                                              \
                    const REAL bn = B_t[n], cn = C_t[n];                                    \
                    for (int l = 0; l < CB; l++) {                                          \
                        h[n][l] = EXP(dl[l] * a[n][l]) * h[n][l] + dx[l] * bn;              \
                        y[l] += cn * h[n][l];                                               \
                    }                                                                       \
                }                                                                           \
                REAL *o_t = out + b * o_sb + t * o_sl + c;                                  \
                const REAL *z_t = z ? z + b * z_sb + t * z_sl + c : NULL;                   \
                for (int l = 0; l < cb; l++) {                                              \
                    REAL v = y[l];                                                          \
                    if (D) v += D[c + l] * x_t[l];                                          \
                    if (z_t) v *= z_t[l] / (1 + EXP(-z_t[l]));                              \
                    o_t[l] = v;                                                             \
                }                                                                           \
            }                                                                               \
            REAL *hl = h_last + b * d * NS + c * NS;                                        \
            for (int l = 0; l < cb; l++)                                                    \
                for (int n = 0; n < NS; n++) hl[l * NS + n] = h[n][l];                      \
            if (delta_sum)                                                                  \
                for (int l = 0; l < cb; l++) delta_sum[b * d + c + l] = dsum[l];            \
        }                                                                                   \
    }

#define DEFINE_SCAN(NAME, BLOCK, REAL, CB)                                                  \
    DEFINE_BLOCK(BLOCK, REAL, CB, EXP_##REAL, SOFTPLUS_##REAL)                              \
    int NAME(i64 threads, i64 B, i64 L, i64 d, i64 N,                                       \
             const REAL *delta, i64 dl_sb, i64 dl_sl, const REAL *bias, int softplus,       \
             const REAL *x, i64 x_sb, i64 x_sl,                                             \
             const REAL *At, const REAL *Bm, i64 B_sb, i64 B_sl,                            \
             const REAL *Cm, i64 C_sb, i64 C_sl, const REAL *D,                             \
             const REAL *z, i64 z_sb, i64 z_sl, REAL *out, i64 o_sb, i64 o_sl,              \
             REAL *h_last, double *delta_sum) {                                             \
        if (N < 1 || N > 256 || threads < 1) return 1;                                      \
        const i64 blocks = (d + CB - 1) / CB;                                               \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                   \
        for (i64 k = 0; k < blocks; k++) {                                                  \
            const i64 c = k * CB;                                                           \
            int cb = (int)(d - c < CB ? d - c : CB);                                        \
            if (N == 16)                                                                    \
                BLOCK(c, cb, 16, B, L, d, delta, dl_sb, dl_sl, bias, softplus, x, x_sb, x_sl,  \
                      At, Bm, B_sb,                                                         \
                      B_sl, Cm, C_sb, C_sl, D, z, z_sb, z_sl, out, o_sb, o_sl, h_last,      \
                      delta_sum);                                                           \
            else                                                                            \
                BLOCK(c, cb, (int)N, B, L, d, delta, dl_sb, dl_sl, bias, softplus, x, x_sb,  \
                      x_sl, At, Bm,                                                         \
                      B_sb, B_sl, Cm, C_sb, C_sl, D, z, z_sb, z_sl, out, o_sb, o_sl,        \
                      h_last, delta_sum);                                                   \
        }                                                                                   \
        return 0;                                                                           \
    }

#define EXP_float exp_f32
#define EXP_double exp_f64
#define SOFTPLUS_float softplus_f32
#define SOFTPLUS_double softplus_f64

/* Lanes per block: for float32, a (4, 256, 1536, 16) scan on 2 AVX-512 cores took
 * 24.3 / 13.5 / 11.4 / 11.9 / 12.9 ms with 8 / 16 / 32 / 48 / 64 lanes. */
DEFINE_SCAN(neuronspec_scan_f32, scan_block_f32, float, 32)
DEFINE_SCAN(neuronspec_scan_f64, scan_block_f64, double, 8)

/* Causal depthwise convolution with SiLU, the Mamba mixer's conv1d + act (no cache):
 *     out[b, t, c] = SiLU(bias[c] + Σ_k w[k, c] · x[b, t - (K - 1) + k, c]),   x[<0] = 0
 * x (B, L, d) with channel stride 1 and the given strides (e.g. the first half of the
 * in_proj output, (B, L, 2d)); wt = conv weightᵀ, (K, d) contiguous; out (B, L, d)
 * contiguous. Rows (b, t) are shared among `threads` OpenMP threads. */
#define DEFINE_CONV(NAME, REAL, EXP)                                                        \
    int NAME(i64 threads, i64 B, i64 L, i64 d, i64 K, const REAL *x, i64 x_sb, i64 x_sl,    \
             const REAL *wt, const REAL *bias, REAL *out) {                                 \
        if (threads < 1 || K < 1) return 1;                                                 \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                   \
        for (i64 row = 0; row < B * L; row++) {                                             \
            const i64 b = row / L, t = row % L;                                             \
            REAL *o = out + row * d;                                                        \
            for (i64 c = 0; c < d; c++) o[c] = bias ? bias[c] : 0;                          \
            for (i64 k = 0; k < K; k++) {                                                   \
                const i64 tt = t - (K - 1) + k;                                             \
                if (tt < 0) continue;                                                       \
                const REAL *xr = x + b * x_sb + tt * x_sl, *wr = wt + k * d;                \
                for (i64 c = 0; c < d; c++) o[c] += wr[c] * xr[c];                          \
            }                                                                               \
            for (i64 c = 0; c < d; c++) o[c] = o[c] / (1 + EXP(-o[c]));                     \
        }                                                                                   \
        return 0;                                                                           \
    }

DEFINE_CONV(neuronspec_conv_silu_f32, float, exp_f32)
DEFINE_CONV(neuronspec_conv_silu_f64, double, exp_f64)

/* Version of the calling convention above; the loader refuses a library with another. */
int neuronspec_scan_abi(void) { return 4; }
