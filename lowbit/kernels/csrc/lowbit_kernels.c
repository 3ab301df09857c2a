/* lowbit packed-weight CPU kernels: y = x W^T + b with W = s * (c - (N-1)/2), c in 0..N-1.
 *
 * A plain C shared library (no Python or torch headers), called through ctypes with raw data
 * pointers. One binary runs on every x86-64: the AVX-512 functions carry per-function target
 * attributes and `lb_isa()` picks the best path at run time (`__builtin_cpu_supports`).
 *
 * ---------------------------------------------------------------------------------------------
 * Compute layout (built once by lb_pack; the storage codec of the .lowbit file is another one)
 * ---------------------------------------------------------------------------------------------
 * Every code c (0..N-1) is held in a lane of B bits, B = 1 (N = 2), 2 (N <= 4), 4 (N <= 16) or
 * 8 (N = 17; larger N are not handled here). K is zero-padded to Kp, a multiple of the group
 * size G = 512 / B codes = 64 bytes. Row n occupies Kp * B / 8 bytes; group g of row n is the
 * 64 bytes at offset g * 64, and holds codes k = g*G + j*64 + i (j = 0..8/B-1, i = 0..63):
 *
 * byte i of the group, bits [j*B, (j+1)*B), holds code k = g*G + j*64 + i:
 *
 *        byte i of group g:   | j=3 | j=2 | j=1 | j=0 |     (B = 2: codes g*256 + {192,128,64,0} + i)
 *                              7   6 5   4 3   2 1   0
 *
 * so one 64-byte load yields 8/B vectors of 64 consecutive codes, each with one 16-bit shift and
 * one byte mask: u_j = (p >> j*B) & (2^B - 1). (A masked-move layout for B = 1, bits -> bytes
 * through a k-register, and a GF2P8AFFINE bit select measured slower on Zen 4.)
 *
 * ---------------------------------------------------------------------------------------------
 * int8 activations (exact integer arithmetic, the reference's activations="int8")
 * ---------------------------------------------------------------------------------------------
 *   a[t]     = (1 / max(max_k |x[t,k]|, 1e-5)) * 127       (float32, as torch evaluates 127 / m)
 *   q[t,k]   = clip(rint(x[t,k] * a[t]), -127, 127)                 (int8, round half to even)
 *   dot[t,n] = sum_k c[n,k] * q[t,k]                                (int32, vpdpbusd: u8 x s8)
 *   acc[t,n] = 2 * dot[t,n] - (N-1) * sum_k q[t,k]                  (= sum_k q * (2c - (N-1)))
 *   y[t,n]   = float((double) acc * s[n] / (2 * (double) a[t])) + b[n]
 *
 * The codes are unsigned, so they are vpdpbusd's u8 operand and the signed activations its s8
 * operand; the "offset" (N-1)/2 that makes the levels signed is applied once per output through
 * the token sum of q (the second line), not per multiply. No product can saturate: |c * q| <=
 * 16 * 127 and the AVX2 path's pairwise int16 sums stay below 2 * 16 * 127 = 4064.
 *
 * fp32 activations: y[t,n] = s[n] * sum_k x[t,k] * (c[n,k] - (N-1)/2) + b[n], float32 sums.
 *
 * Threads: OpenMP over blocks of 8 output rows (torch's own OpenMP runtime when loaded from
 * torch, since both are libgomp.so.1).
 */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LB_EXPORT __attribute__((visibility("default")))
#define LB_INLINE static inline __attribute__((always_inline))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define T256 __attribute__((target("avx2,fma")))

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum { ROWS = 8 }; /* rows per thread work item */

LB_EXPORT int lb_version(void) { return 1; }

LB_EXPORT int lb_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
    return ISA_PORTABLE;
}

LB_EXPORT int lb_max_threads(void) { return omp_get_max_threads(); }

static int64_t group_codes(int bits) { return 512 / bits; }

/* ---------------------------------------------------------------------------------------- */
/* Packing: codes (n, k) uint8 -> compute layout (n, kp * bits / 8) bytes                   */
/* ---------------------------------------------------------------------------------------- */

LB_EXPORT void lb_pack(const uint8_t *codes, int64_t n, int64_t k, int bits, int64_t kp,
                       uint8_t *out) {
    const int64_t rowbytes = kp * bits / 8, gc = group_codes(bits);
    memset(out, 0, (size_t)(n * rowbytes));
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *c = codes + r * k;
        uint8_t *o = out + r * rowbytes;
        for (int64_t i = 0; i < k; i++) {
            const int64_t g = i / gc, rem = i % gc, j = rem >> 6, b = rem & 63;
            o[g * 64 + b] |= (uint8_t)(c[i] << (j * bits));
        }
    }
}

/* Code k of a packed row (portable decoding, used by the generic kernels). */
LB_INLINE void decode_group(const uint8_t *grp, int bits, uint8_t *dst /* 512/bits codes */) {
    const int sub = 8 / bits;
    const uint8_t m = (uint8_t)((1u << bits) - 1u);
    for (int j = 0; j < sub; j++)
        for (int i = 0; i < 64; i++) dst[j * 64 + i] = (grp[i] >> (j * bits)) & m;
}

/* ---------------------------------------------------------------------------------------- */
/* Per-token int8 quantization of the activations                                            */
/* ---------------------------------------------------------------------------------------- */

/* x (m, k) float32 -> q (m, kp) int8 zero-padded, a (m) the multipliers, sq (m) sum_k q. */
LB_INLINE void quantize_row_generic(const float *x, int64_t k, int64_t kp, int8_t *q, float *a,
                                    int32_t *sq) {
    float mx = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        const float v = fabsf(x[i]);
        mx = v > mx ? v : mx;
    }
    /* torch evaluates the reference's 127 / m as reciprocal(m) * 127: same rounding here */
    const float ai = (1.0f / (mx > 1e-5f ? mx : 1e-5f)) * 127.0f;
    int32_t s = 0;
    for (int64_t i = 0; i < k; i++) {
        float v = rintf(x[i] * ai);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)v;
        s += (int32_t)v;
    }
    memset(q + k, 0, (size_t)(kp - k));
    *a = ai;
    *sq = s;
}

T512 static void quantize_row_512(const float *x, int64_t k, int64_t kp, int8_t *q, float *a,
                                  int32_t *sq) {
    __m512 vm = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    float mx = _mm512_reduce_max_ps(vm);
    for (; i < k; i++) mx = fmaxf(mx, fabsf(x[i]));
    /* torch evaluates the reference's 127 / m as reciprocal(m) * 127: same rounding here */
    const float ai = (1.0f / (mx > 1e-5f ? mx : 1e-5f)) * 127.0f;
    const __m512 va = _mm512_set1_ps(ai), lo = _mm512_set1_ps(-127.0f),
                 hi = _mm512_set1_ps(127.0f);
    __m512i vs = _mm512_setzero_si512();
    for (i = 0; i + 16 <= k; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), va);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        const __m512i vi = _mm512_cvtps_epi32(v);
        vs = _mm512_add_epi32(vs, vi);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(vi));
    }
    int32_t s = _mm512_reduce_add_epi32(vs);
    for (; i < k; i++) {
        float v = rintf(x[i] * ai);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)v;
        s += (int32_t)v;
    }
    memset(q + k, 0, (size_t)(kp - k));
    *a = ai;
    *sq = s;
}

static void quantize_rows(int isa, const float *x, int64_t m, int64_t k, int64_t kp, int8_t *q,
                          float *a, int32_t *sq, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m > 1 && m * k > 65536)
    for (int64_t t = 0; t < m; t++) {
        if (isa == ISA_AVX512)
            quantize_row_512(x + t * k, k, kp, q + t * kp, a + t, sq + t);
        else
            quantize_row_generic(x + t * k, k, kp, q + t * kp, a + t, sq + t);
    }
}

LB_EXPORT void lb_quantize_i8(int isa, const float *x, int64_t m, int64_t k, int64_t kp,
                              int8_t *q, float *a, int32_t *sq) {
    quantize_rows(isa, x, m, k, kp, q, a, sq, 1);
}

/* Final rescale of one output, the same float operations as the reference (float64). */
LB_INLINE float rescale_i8(int32_t dot, int32_t sq, int levels, float a, float s) {
    const int64_t acc = 2 * (int64_t)dot - (int64_t)(levels - 1) * (int64_t)sq;
    return (float)((double)acc * (double)s / (2.0 * (double)a));
}

/* ---------------------------------------------------------------------------------------- */
/* int8 x packed dot products, AVX-512 VNNI                                                   */
/* ---------------------------------------------------------------------------------------- */

/* out[r*T + t] = sum_k c[row r, k] * q[token t, k] for R rows and T tokens. */
LB_INLINE T512 void dots_512(const uint8_t *w, int64_t rowbytes, const int8_t *q, int64_t kp,
                             int64_t ngroups, const int bits, const int R, const int T,
                             int32_t *out) {
    __m512i acc[8][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_si512();
    const __m512i lanemask = _mm512_set1_epi8((char)((1 << (bits & 7)) - 1));
    const int sub = 8 / bits;
    for (int64_t g = 0; g < ngroups; g++) {
        const uint8_t *wg = w + g * 64;
        const int8_t *qg = q + g * 512 / bits;
        __m512i p[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) p[r] = _mm512_loadu_si512(wg + r * rowbytes);
#pragma GCC unroll 8
        for (int j = 0; j < sub; j++) {
            __m512i xv[4];
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_si512(qg + t * kp + j * 64);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m512i u;
                if (bits == 8) {
                    u = p[r];
                } else {
                    u = _mm512_and_si512(p[r], lanemask);
                    p[r] = _mm512_srli_epi16(p[r], bits); /* 16-bit shift: the mask drops spill */
                }
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], u, xv[t]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) out[r * T + t] = _mm512_reduce_add_epi32(acc[r][t]);
}

#define DEF_DOTS_512(B)                                                                          \
    T512 static void dots_512_b##B(const uint8_t *w, int64_t rb, const int8_t *q, int64_t kp,    \
                                   int64_t ng, int R, int T, int32_t *out) {                     \
        if (R == 8 && T == 1) dots_512(w, rb, q, kp, ng, B, 8, 1, out);                          \
        else if (R == 4 && T == 4) dots_512(w, rb, q, kp, ng, B, 4, 4, out);                     \
        else if (R == 1 && T == 4) dots_512(w, rb, q, kp, ng, B, 1, 4, out);                     \
        else dots_512(w, rb, q, kp, ng, B, 1, 1, out);                                           \
    }
DEF_DOTS_512(1)
DEF_DOTS_512(2)
DEF_DOTS_512(4)
DEF_DOTS_512(8)

/* ---------------------------------------------------------------------------------------- */
/* int8 x packed dot products, generic C (compiled for AVX2 and for the baseline ISA)         */
/* ---------------------------------------------------------------------------------------- */

/* Decode each row's group once, then take its dot with every token (vectorised by the
 * compiler from the omp simd reduction). */
#define DEF_DOTS_GENERIC(NAME, ATTR)                                                             \
    ATTR static void NAME(const uint8_t *w, int64_t rowbytes, const int8_t *q, int64_t kp,       \
                          int64_t ngroups, int bits, int R, int T, int32_t *out) {               \
        uint8_t dec[512];                                                                        \
        const int gc = 512 / bits;                                                               \
        for (int i = 0; i < R * T; i++) out[i] = 0;                                              \
        for (int64_t g = 0; g < ngroups; g++) {                                                  \
            for (int r = 0; r < R; r++) {                                                        \
                decode_group(w + r * rowbytes + g * 64, bits, dec);                              \
                for (int t = 0; t < T; t++) {                                                    \
                    const int8_t *qg = q + t * kp + g * gc;                                      \
                    int32_t s = 0;                                                               \
                    _Pragma("omp simd reduction(+ : s)") for (int i = 0; i < gc; i++) s +=       \
                        (int32_t)dec[i] * (int32_t)qg[i];                                        \
                    out[r * T + t] += s;                                                         \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }
DEF_DOTS_GENERIC(dots_avx2, T256)
DEF_DOTS_GENERIC(dots_portable, )

typedef void (*dots_fn)(const uint8_t *, int64_t, const int8_t *, int64_t, int64_t, int, int,
                        int32_t *);

static void dots_dispatch(int isa, const uint8_t *w, int64_t rb, const int8_t *q, int64_t kp,
                          int64_t ng, int bits, int R, int T, int32_t *out) {
    if (isa == ISA_AVX512) {
        switch (bits) {
        case 1: dots_512_b1(w, rb, q, kp, ng, R, T, out); return;
        case 2: dots_512_b2(w, rb, q, kp, ng, R, T, out); return;
        case 4: dots_512_b4(w, rb, q, kp, ng, R, T, out); return;
        default: dots_512_b8(w, rb, q, kp, ng, R, T, out); return;
        }
    }
    if (isa == ISA_AVX2)
        dots_avx2(w, rb, q, kp, ng, bits, R, T, out);
    else
        dots_portable(w, rb, q, kp, ng, bits, R, T, out);
}

/* ---------------------------------------------------------------------------------------- */
/* int8 linear: the driver                                                                   */
/* ---------------------------------------------------------------------------------------- */

static void *xalloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}

/* Returns 0 on success, -1 when out of memory. */
LB_EXPORT int lb_linear_i8(int isa, const float *x, int64_t m, int64_t k, const uint8_t *w,
                           int64_t n, int64_t kp, int bits, int levels, const float *scale,
                           int per_channel, const float *bias, float *y, int nthreads) {
    int8_t *q = xalloc((size_t)(m * kp + 64));
    float *a = xalloc((size_t)m * sizeof(float));
    int32_t *sq = xalloc((size_t)m * sizeof(int32_t));
    if (!q || !a || !sq) {
        free(q), free(a), free(sq);
        return -1;
    }
    quantize_rows(isa, x, m, k, kp, q, a, sq, nthreads);
    const int64_t rowbytes = kp * bits / 8, ngroups = rowbytes / 64;
    const int64_t nblocks = (n + ROWS - 1) / ROWS;
    const int par = nthreads > 1 && n >= 2 * ROWS && (double)m * n * k > 2.0e5;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (par)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int64_t r0 = blk * ROWS, nr = n - r0 < ROWS ? n - r0 : ROWS;
        int32_t dots[ROWS * 4];
        int nt = 1;
        for (int64_t t0 = 0; t0 < m; t0 += nt) {
            nt = m - t0 >= 4 ? 4 : 1; /* 4-token tiles, then single tokens */
            const int8_t *qt = q + t0 * kp;
            if (nr == ROWS && nt == 1) {
                dots_dispatch(isa, w + r0 * rowbytes, rowbytes, qt, kp, ngroups, bits, 8, 1, dots);
            } else if (nr == ROWS) {
                dots_dispatch(isa, w + r0 * rowbytes, rowbytes, qt, kp, ngroups, bits, 4, 4, dots);
                dots_dispatch(isa, w + (r0 + 4) * rowbytes, rowbytes, qt, kp, ngroups, bits, 4, 4,
                              dots + 16);
            } else {
                for (int r = 0; r < nr; r++)
                    dots_dispatch(isa, w + (r0 + r) * rowbytes, rowbytes, qt, kp, ngroups, bits, 1,
                                  nt, dots + r * nt);
            }
            for (int r = 0; r < nr; r++) {
                const int64_t row = r0 + r;
                const float s = per_channel ? scale[row] : scale[0];
                for (int t = 0; t < nt; t++) {
                    float v = rescale_i8(dots[r * nt + t], sq[t0 + t], levels, a[t0 + t], s);
                    if (bias) v += bias[row];
                    y[(t0 + t) * n + row] = v;
                }
            }
        }
    }
    free(q), free(a), free(sq);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* fp32 activations                                                                          */
/* ---------------------------------------------------------------------------------------- */

/* Each row's group is decoded to float levels (c - (N-1)/2, exact), then dotted with every
 * token in float32 with the compiler's vectorised reduction. R rows x T tokens per call. */
#define DEF_F32(NAME, ATTR)                                                                      \
    ATTR static void NAME(const uint8_t *w, int64_t rowbytes, const float *x, int64_t kp,        \
                          int64_t ngroups, int bits, float half, int R, int T, float *out) {     \
        uint8_t dec[512];                                                                        \
        float lev[512];                                                                          \
        const int gc = 512 / bits;                                                               \
        for (int i = 0; i < R * T; i++) out[i] = 0.0f;                                           \
        for (int64_t g = 0; g < ngroups; g++) {                                                  \
            for (int r = 0; r < R; r++) {                                                        \
                decode_group(w + r * rowbytes + g * 64, bits, dec);                              \
                for (int i = 0; i < gc; i++) lev[i] = (float)dec[i] - half;                      \
                for (int t = 0; t < T; t++) {                                                    \
                    const float *xg = x + t * kp + g * gc;                                       \
                    float s = 0.0f;                                                              \
                    _Pragma("omp simd reduction(+ : s)") for (int i = 0; i < gc; i++) s +=       \
                        lev[i] * xg[i];                                                          \
                    out[r * T + t] += s;                                                         \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }
DEF_F32(f32_512, T512)
DEF_F32(f32_avx2, T256)
DEF_F32(f32_portable, )

LB_EXPORT int lb_linear_f32(int isa, const float *x, int64_t m, int64_t k, const uint8_t *w,
                            int64_t n, int64_t kp, int bits, int levels, const float *scale,
                            int per_channel, const float *bias, float *y, int nthreads) {
    float *xp = xalloc((size_t)(m * kp) * sizeof(float));
    if (!xp) return -1;
    for (int64_t t = 0; t < m; t++) {
        memcpy(xp + t * kp, x + t * k, (size_t)k * sizeof(float));
        memset(xp + t * kp + k, 0, (size_t)(kp - k) * sizeof(float));
    }
    const int64_t rowbytes = kp * bits / 8, ngroups = rowbytes / 64;
    const float half = (float)(levels - 1) / 2.0f;
    const int64_t nblocks = (n + ROWS - 1) / ROWS;
    const int par = nthreads > 1 && n >= 2 * ROWS && (double)m * n * k > 2.0e5;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (par)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int64_t r0 = blk * ROWS, nr = n - r0 < ROWS ? n - r0 : ROWS;
        float acc[ROWS * 4];
        for (int64_t t0 = 0; t0 < m; t0 += 4) {
            const int nt = m - t0 >= 4 ? 4 : (int)(m - t0);
            const float *xt = xp + t0 * kp;
            const uint8_t *wr = w + r0 * rowbytes;
            if (isa == ISA_AVX512)
                f32_512(wr, rowbytes, xt, kp, ngroups, bits, half, (int)nr, nt, acc);
            else if (isa == ISA_AVX2)
                f32_avx2(wr, rowbytes, xt, kp, ngroups, bits, half, (int)nr, nt, acc);
            else
                f32_portable(wr, rowbytes, xt, kp, ngroups, bits, half, (int)nr, nt, acc);
            for (int r = 0; r < nr; r++) {
                const int64_t row = r0 + r;
                const float s = per_channel ? scale[row] : scale[0];
                for (int t = 0; t < nt; t++) {
                    float v = acc[r * nt + t] * s;
                    if (bias) v += bias[row];
                    y[(t0 + t) * n + row] = v;
                }
            }
        }
    }
    free(xp);
    return 0;
}
