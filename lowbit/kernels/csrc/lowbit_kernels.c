/* lowbit packed-weight CPU kernels: y = x W^T + b with W = s * (c - (N-1)/2), c in 0..N-1.
 *
 * A plain C shared library (no Python or torch headers), called through ctypes with raw data
 * pointers. One binary runs on every x86-64: the AVX-512 functions carry per-function target
 * attributes and `lb_isa()` picks the best path at run time (`__builtin_cpu_supports`).
 *
 * ---------------------------------------------------------------------------------------------
 * Compute layout (built once by lb_pack; the storage codec of the .lowbit file is another one)
 * ---------------------------------------------------------------------------------------------
 * Every code c (0..N-1) is held in a lane of B bits, B = 1 (N = 2), 2 (N <= 4) or 4 (N <= 16).
 * K is zero-padded to Kp, a multiple of the group size G = 512 / B codes = 64 bytes. Row n
 * occupies Kp * B / 8 bytes; group g of a row is the 64 bytes at offset g * 64, and holds codes
 * k = g*G + j*64 + i (j = 0..8/B-1, i = 0..63):
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
 * N = 17 ("B = 5", 5 bits a weight): c = lo + 16 hi, the row is a B = 4 row of the low nibbles
 * (Kp / 2 bytes) followed by a B = 1 row of the high bits (Kp / 8 bytes), Kp a multiple of 512;
 * dot products are taken on both parts and combined, dot = dot_lo + 16 dot_hi.
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
 * 15 * 127 and the AVX2 path's pairwise int16 sums stay below 2 * 15 * 127 = 3810.
 *
 * fp32 activations: y[t,n] = s[n] * sum_k x[t,k] * (c[n,k] - (N-1)/2) + b[n], float32 sums.
 *
 * Threads: a small persistent pool (pthreads) splits the output rows into chunks claimed with
 * an atomic counter. The calling thread works too and waits only for chunks that were claimed,
 * never for a helper to wake up: on a busy shared machine a descheduled helper costs nothing
 * (a fork-join barrier such as OpenMP's waits a whole scheduler time slice for it).
 */

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LB_EXPORT __attribute__((visibility("default")))
#define LB_INLINE static inline __attribute__((always_inline))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define T256 __attribute__((target("avx2,fma")))

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum { ROWS = 8 }; /* rows per thread work item */

LB_EXPORT int lb_version(void) { return 3; }

LB_EXPORT int lb_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
    return ISA_PORTABLE;
}


/* ---------------------------------------------------------------------------------------- */
/* Thread pool                                                                               */
/* ---------------------------------------------------------------------------------------- */

typedef void (*chunk_fn)(const void *ctx, int64_t chunk);

enum { MAX_HELPERS = 63, SPIN_ROUNDS = 20000 };

/* `claim` packs (generation << 32 | next chunk). A job is published by storing a new generation;
 * a chunk is claimed by a compare-and-swap that keeps the generation, so a thread that read a
 * stale job can never run a chunk of it: the CAS fails once the generation moved on. */
static struct {
    pthread_mutex_t job_mu; /* one parallel job at a time; others run serially */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t claim;
    _Atomic int64_t done;
    _Atomic(chunk_fn) fn;
    _Atomic(const void *) ctx;
    _Atomic int64_t nchunks;
    _Atomic int sleepers;
    int helpers;
    pid_t pid;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Run unclaimed chunks of generation `gen` until none is left. */
static void pool_work(uint32_t gen) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((uint32_t)(v >> 32) != gen) return;
        const chunk_fn fn = atomic_load_explicit(&pool.fn, memory_order_relaxed);
        const void *ctx = atomic_load_explicit(&pool.ctx, memory_order_relaxed);
        const int64_t n = atomic_load_explicit(&pool.nchunks, memory_order_relaxed);
        const int64_t idx = (int64_t)(v & 0xffffffffu);
        if (idx >= n) return;
        if (!atomic_compare_exchange_weak(&pool.claim, &v, v + 1)) continue;
        fn(ctx, idx);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *pool_helper(void *arg) {
    (void)arg;
    uint32_t seen = (uint32_t)(atomic_load(&pool.claim) >> 32);
    for (;;) {
        uint64_t v;
        int spins = 0;
        while ((uint32_t)((v = atomic_load_explicit(&pool.claim, memory_order_acquire)) >> 32) ==
               seen) {
            if (++spins < SPIN_ROUNDS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((uint32_t)(atomic_load(&pool.claim) >> 32) == seen)
                pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.mu);
            spins = 0;
        }
        seen = (uint32_t)(v >> 32);
        pool_work(seen);
    }
    return NULL;
}

/* Start helpers up to `want` (lazily; again in a forked child, which has none). */
static int pool_ensure(int want) {
    if (pool.pid != getpid()) {
        pool.helpers = 0;
        pool.pid = getpid();
    }
    if (want > MAX_HELPERS) want = MAX_HELPERS;
    while (pool.helpers < want) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&th, &attr, pool_helper, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.helpers++;
    }
    return pool.helpers;
}

/* fn(ctx, i) for i in 0..nchunks-1 on up to `nthreads` threads (the caller included). */
static void parallel_for(chunk_fn fn, const void *ctx, int64_t nchunks, int nthreads) {
    if (nthreads <= 1 || nchunks <= 1 || pthread_mutex_trylock(&pool.job_mu) != 0) {
        for (int64_t i = 0; i < nchunks; i++) fn(ctx, i);
        return;
    }
    if (pool_ensure(nthreads - 1) == 0) {
        pthread_mutex_unlock(&pool.job_mu);
        for (int64_t i = 0; i < nchunks; i++) fn(ctx, i);
        return;
    }
    atomic_store_explicit(&pool.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool.nchunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    const uint32_t gen = (uint32_t)(atomic_load(&pool.claim) >> 32) + 1;
    atomic_store(&pool.claim, (uint64_t)gen << 32); /* seq_cst: publishes the job */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    pool_work(gen);
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < nchunks) cpu_relax();
    pthread_mutex_unlock(&pool.job_mu);
}

LB_EXPORT int lb_max_threads(void) { return (int)sysconf(_SC_NPROCESSORS_ONLN); }

static int64_t group_codes(int lanes) { return 512 / lanes; }

/* ---------------------------------------------------------------------------------------- */
/* Packing: codes (n, k) uint8 -> compute layout (n, kp * bits / 8) bytes                   */
/* ---------------------------------------------------------------------------------------- */

LB_EXPORT void lb_pack(const uint8_t *codes, int64_t n, int64_t k, int bits, int64_t kp,
                       uint8_t *out) {
    const int64_t rowbytes = kp * bits / 8;
    memset(out, 0, (size_t)(n * rowbytes));
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *c = codes + r * k;
        uint8_t *o = out + r * rowbytes;
        const int lanes = bits == 5 ? 4 : bits; /* B = 5: nibbles first, then the high bits */
        const int64_t gc = group_codes(lanes);
        for (int64_t i = 0; i < k; i++) {
            const int64_t g = i / gc, rem = i % gc, j = rem >> 6, b = rem & 63;
            o[g * 64 + b] |= (uint8_t)((c[i] & 15) << (j * lanes));
        }
        if (bits == 5) {
            uint8_t *h = o + kp / 2;
            for (int64_t i = 0; i < k; i++) {
                const int64_t g = i / 512, rem = i % 512, j = rem >> 6, b = rem & 63;
                h[g * 64 + b] |= (uint8_t)((c[i] >> 4) << j);
            }
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

typedef struct {
    int isa;
    const float *x;
    int64_t m, k, kp, per_chunk;
    int8_t *q;
    float *a;
    int32_t *sq;
} quant_job;

static void quantize_chunk(const void *ctx, int64_t chunk) {
    const quant_job *j = ctx;
    const int64_t t1 = (chunk + 1) * j->per_chunk < j->m ? (chunk + 1) * j->per_chunk : j->m;
    for (int64_t t = chunk * j->per_chunk; t < t1; t++) {
        if (j->isa == ISA_AVX512)
            quantize_row_512(j->x + t * j->k, j->k, j->kp, j->q + t * j->kp, j->a + t, j->sq + t);
        else
            quantize_row_generic(j->x + t * j->k, j->k, j->kp, j->q + t * j->kp, j->a + t,
                                 j->sq + t);
    }
}

static void quantize_rows(int isa, const float *x, int64_t m, int64_t k, int64_t kp, int8_t *q,
                          float *a, int32_t *sq, int nthreads) {
    const int64_t per_chunk = m * k > 65536 ? (m + 4 * nthreads - 1) / (4 * nthreads) : m;
    const quant_job job = {isa, x, m, k, kp, per_chunk ? per_chunk : 1, q, a, sq};
    parallel_for(quantize_chunk, &job, (m + job.per_chunk - 1) / job.per_chunk, nthreads);
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
    const __m512i lanemask = _mm512_set1_epi8((char)((1 << bits) - 1));
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
                const __m512i u = _mm512_and_si512(p[r], lanemask);
                p[r] = _mm512_srli_epi16(p[r], bits); /* 16-bit shift: the mask drops spill */
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

/* ---------------------------------------------------------------------------------------- */
/* int8 x packed dot products, generic C (the portable path)                                  */
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
DEF_DOTS_GENERIC(dots_portable, )

typedef void (*dots_fn)(const uint8_t *, int64_t, const int8_t *, int64_t, int64_t, int, int,
                        int32_t *);

/* ---------------------------------------------------------------------------------------- */
/* int8 x packed dot products, AVX2 (no VNNI): vpmaddubsw u8 x s8 -> s16 pairs, vpmaddwd -> s32 */
/* ---------------------------------------------------------------------------------------- */

/* The AVX-512 kernel's algorithm on 32-byte halves of each 64-byte group. Pairwise int16 sums
 * cannot saturate: 2 * 15 * 127 < 32767. */
LB_INLINE T256 void dots_256(const uint8_t *w, int64_t rowbytes, const int8_t *q, int64_t kp,
                             int64_t ngroups, const int bits, const int R, const int T,
                             int32_t *out) {
    __m256i acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
    const __m256i lanemask = _mm256_set1_epi8((char)((1 << bits) - 1));
    const __m256i ones16 = _mm256_set1_epi16(1);
    const int sub = 8 / bits;
    for (int64_t g = 0; g < ngroups; g++) {
        for (int h = 0; h < 2; h++) {
            const uint8_t *wg = w + g * 64 + h * 32;
            const int8_t *qg = q + g * 512 / bits + h * 32;
            __m256i p[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) p[r] = _mm256_loadu_si256((const __m256i *)(wg + r * rowbytes));
            for (int j = 0; j < sub; j++) {
                __m256i xv[4];
#pragma GCC unroll 4
                for (int t = 0; t < T; t++)
                    xv[t] = _mm256_loadu_si256((const __m256i *)(qg + t * kp + j * 64));
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m256i u = _mm256_and_si256(p[r], lanemask);
                    p[r] = _mm256_srli_epi16(p[r], bits);
#pragma GCC unroll 4
                    for (int t = 0; t < T; t++) {
                        const __m256i pairs = _mm256_maddubs_epi16(u, xv[t]);
                        acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(pairs, ones16));
                    }
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc[r][t]),
                                            _mm256_extracti128_si256(acc[r][t], 1));
            const __m128i v2 = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
            out[r * T + t] = _mm_cvtsi128_si32(_mm_add_epi32(v2, _mm_shuffle_epi32(v2, 0xb1)));
        }
}

/* Rows in blocks of 4 (8-row requests run as two), any T handled as 4-token tiles + singles. */
#define DEF_DOTS_256(B)                                                                          \
    T256 static void dots_256_b##B(const uint8_t *w, int64_t rb, const int8_t *q, int64_t kp,    \
                                   int64_t ng, int R, int T, int32_t *out) {                     \
        if (R == 8 && T == 1) {                                                                  \
            dots_256(w, rb, q, kp, ng, B, 4, 1, out);                                            \
            dots_256(w + 4 * rb, rb, q, kp, ng, B, 4, 1, out + 4);                               \
        } else if (R == 4 && T == 4) dots_256(w, rb, q, kp, ng, B, 4, 4, out);                   \
        else if (R == 1 && T == 4) dots_256(w, rb, q, kp, ng, B, 1, 4, out);                     \
        else dots_256(w, rb, q, kp, ng, B, 1, 1, out);                                           \
    }
DEF_DOTS_256(1)
DEF_DOTS_256(2)
DEF_DOTS_256(4)

static void dots_lanes(int isa, const uint8_t *w, int64_t rb, const int8_t *q, int64_t kp,
                       int lanes, int R, int T, int32_t *out) {
    const int64_t ng = kp * lanes / 512;
    if (isa == ISA_AVX512) {
        switch (lanes) {
        case 1: dots_512_b1(w, rb, q, kp, ng, R, T, out); return;
        case 2: dots_512_b2(w, rb, q, kp, ng, R, T, out); return;
        default: dots_512_b4(w, rb, q, kp, ng, R, T, out); return;
        }
    }
    if (isa == ISA_AVX2) {
        switch (lanes) {
        case 1: dots_256_b1(w, rb, q, kp, ng, R, T, out); return;
        case 2: dots_256_b2(w, rb, q, kp, ng, R, T, out); return;
        default: dots_256_b4(w, rb, q, kp, ng, R, T, out); return;
        }
    }
    dots_portable(w, rb, q, kp, ng, lanes, R, T, out);
}

static void dots_dispatch(int isa, const uint8_t *w, int64_t rb, const int8_t *q, int64_t kp,
                          int bits, int R, int T, int32_t *out) {
    if (bits != 5) {
        dots_lanes(isa, w, rb, q, kp, bits, R, T, out);
        return;
    }
    int32_t hi[32];
    dots_lanes(isa, w, rb, q, kp, 4, R, T, out);
    dots_lanes(isa, w + kp / 2, rb, q, kp, 1, R, T, hi);
    for (int i = 0; i < R * T; i++) out[i] += 16 * hi[i];
}

/* ---------------------------------------------------------------------------------------- */
/* fp32 activations, AVX-512: codes -> float levels through a 16-entry table (vpermps)         */
/* ---------------------------------------------------------------------------------------- */

/* out[r*T + t] = sum_k (c[r,k] - (N-1)/2) * x[t,k] for R rows and T tokens. Sixteen codes are
 * zero-extended to dwords (vpmovzxbd), shifted so their lane is in the low bits, and looked up
 * in `table` (table[i] = value of code i mod 2^B, so the bits of the neighbouring lanes above are
 * ignored by vpermps, which reads only 4 index bits). */
LB_INLINE T512 void f32tile_512(const uint8_t *w, int64_t rowbytes, const float *x, int64_t kp,
                                int64_t ngroups, const int bits, const float *table, const int R,
                                const int T, float *out) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    const __m512 lut = _mm512_loadu_ps(table);
    const int sub = 8 / bits;
    for (int64_t g = 0; g < ngroups; g++) {
        const uint8_t *wg = w + g * 64;
        for (int j = 0; j < sub; j++) {
            const __m512i shift = _mm512_set1_epi32(j * bits);
#pragma GCC unroll 4
            for (int qq = 0; qq < 4; qq++) {
                const int64_t koff = g * (512 / bits) + j * 64 + qq * 16;
                __m512 xv[4];
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_ps(x + t * kp + koff);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    __m512i idx = _mm512_cvtepu8_epi32(
                        _mm_loadu_si128((const __m128i *)(wg + r * rowbytes + qq * 16)));
                    if (j) idx = _mm512_srlv_epi32(idx, shift);
                    const __m512 lev = _mm512_permutexvar_ps(idx, lut);
#pragma GCC unroll 4
                    for (int t = 0; t < T; t++) acc[r][t] = _mm512_fmadd_ps(lev, xv[t], acc[r][t]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) out[r * T + t] = _mm512_reduce_add_ps(acc[r][t]);
}

#define DEF_F32_512(B)                                                                           \
    T512 static void f32_512_b##B(const uint8_t *w, int64_t rb, const float *x, int64_t kp,      \
                                  int64_t ng, const float *lut, int R, int T, float *out) {       \
        if (R == 4 && T == 4) f32tile_512(w, rb, x, kp, ng, B, lut, 4, 4, out);                  \
        else if (R == 4 && T == 1) f32tile_512(w, rb, x, kp, ng, B, lut, 4, 1, out);             \
        else if (R == 1 && T == 4) f32tile_512(w, rb, x, kp, ng, B, lut, 1, 4, out);             \
        else f32tile_512(w, rb, x, kp, ng, B, lut, 1, 1, out);                                   \
    }
DEF_F32_512(1)
DEF_F32_512(2)
DEF_F32_512(4)

/* fp32 generic C: each row's group is decoded to float levels (c - (N-1)/2, exact), then dotted
 * with every token in float32 (the compiler vectorises the omp simd reduction). */
#define DEF_F32(NAME, ATTR)                                                                      \
    ATTR static void NAME(const uint8_t *w, int64_t rowbytes, const float *x, int64_t kp,        \
                          int64_t ngroups, int bits, float mul, float half, int R, int T,        \
                          float *out) {                                                          \
        uint8_t dec[512];                                                                        \
        float lev[512];                                                                          \
        const int gc = 512 / bits;                                                               \
        for (int i = 0; i < R * T; i++) out[i] = 0.0f;                                           \
        for (int64_t g = 0; g < ngroups; g++) {                                                  \
            for (int r = 0; r < R; r++) {                                                        \
                decode_group(w + r * rowbytes + g * 64, bits, dec);                              \
                for (int i = 0; i < gc; i++) lev[i] = (float)dec[i] * mul - half;                \
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
DEF_F32(f32_avx2, T256)
DEF_F32(f32_portable, )

/* ---------------------------------------------------------------------------------------- */
/* The linear drivers: chunks of output rows, 8-row blocks, 4-token tiles                     */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    int isa, bits, levels, per_channel;
    int64_t m, n, k, kp, rowbytes, rows_per_chunk;
    const uint8_t *w;
    const float *scale, *bias;
    float *y;
    const int8_t *q; /* int8: quantized tokens (m, kp), multipliers, token sums */
    const float *a;
    const int32_t *sq;
    const float *xp; /* fp32: zero-padded tokens (m, kp), level table */
    const float *lut, *lut_hi;
    float half;
} lin_job;

static void *xalloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}

static void i8_chunk(const void *ctx, int64_t chunk) {
    const lin_job *j = ctx;
    const int64_t rb = j->rowbytes, kp = j->kp, n = j->n, m = j->m;
    const int64_t rend = (chunk + 1) * j->rows_per_chunk < n ? (chunk + 1) * j->rows_per_chunk : n;
    for (int64_t r0 = chunk * j->rows_per_chunk; r0 < rend; r0 += ROWS) {
        const int64_t nr = rend - r0 < ROWS ? rend - r0 : ROWS;
        const uint8_t *w = j->w + r0 * rb;
        int32_t dots[ROWS * 4];
        int nt = 1;
        for (int64_t t0 = 0; t0 < m; t0 += nt) {
            nt = m - t0 >= 4 ? 4 : 1; /* 4-token tiles, then single tokens */
            const int8_t *qt = j->q + t0 * kp;
            if (nr == ROWS && nt == 1) {
                dots_dispatch(j->isa, w, rb, qt, kp, j->bits, 8, 1, dots);
            } else if (nr == ROWS) {
                dots_dispatch(j->isa, w, rb, qt, kp, j->bits, 4, 4, dots);
                dots_dispatch(j->isa, w + 4 * rb, rb, qt, kp, j->bits, 4, 4, dots + 16);
            } else {
                for (int r = 0; r < nr; r++)
                    dots_dispatch(j->isa, w + r * rb, rb, qt, kp, j->bits, 1, nt, dots + r * nt);
            }
            for (int r = 0; r < nr; r++) {
                const int64_t row = r0 + r;
                const float s = j->per_channel ? j->scale[row] : j->scale[0];
                for (int t = 0; t < nt; t++) {
                    float v = rescale_i8(dots[r * nt + t], j->sq[t0 + t], j->levels, j->a[t0 + t], s);
                    if (j->bias) v += j->bias[row];
                    j->y[(t0 + t) * n + row] = v;
                }
            }
        }
    }
}

/* One tile over a lane layout: table (AVX-512) or value = code * mul - half (generic). */
static void f32_lanes(const lin_job *j, const uint8_t *w, const float *xt, int lanes,
                      const float *table, float mul, float half, int R, int T, float *acc) {
    const int64_t rb = j->rowbytes, kp = j->kp, ng = kp * lanes / 512;
    if (j->isa == ISA_AVX512) {
        switch (lanes) {
        case 1: f32_512_b1(w, rb, xt, kp, ng, table, R, T, acc); return;
        case 2: f32_512_b2(w, rb, xt, kp, ng, table, R, T, acc); return;
        default: f32_512_b4(w, rb, xt, kp, ng, table, R, T, acc); return;
        }
    }
    if (j->isa == ISA_AVX2)
        f32_avx2(w, rb, xt, kp, ng, lanes, mul, half, R, T, acc);
    else
        f32_portable(w, rb, xt, kp, ng, lanes, mul, half, R, T, acc);
}

static void f32_tile(const lin_job *j, const uint8_t *w, const float *xt, int R, int T, float *acc) {
    if (j->bits != 5) {
        f32_lanes(j, w, xt, j->bits, j->lut, 1.0f, j->half, R, T, acc);
        return;
    }
    float hi[16];
    f32_lanes(j, w, xt, 4, j->lut, 1.0f, j->half, R, T, acc);         /* lo - (N-1)/2 */
    f32_lanes(j, w + j->kp / 2, xt, 1, j->lut_hi, 16.0f, 0.0f, R, T, hi); /* 16 hi */
    for (int i = 0; i < R * T; i++) acc[i] += hi[i];
}

static void f32_chunk(const void *ctx, int64_t chunk) {
    const lin_job *j = ctx;
    const int64_t rb = j->rowbytes, n = j->n, m = j->m;
    const int64_t rend = (chunk + 1) * j->rows_per_chunk < n ? (chunk + 1) * j->rows_per_chunk : n;
    for (int64_t r0 = chunk * j->rows_per_chunk; r0 < rend; r0 += 4) {
        const int nr = rend - r0 < 4 ? (int)(rend - r0) : 4;
        float acc[16];
        int nt = 1;
        for (int64_t t0 = 0; t0 < m; t0 += nt) {
            nt = m - t0 >= 4 ? 4 : 1;
            const float *xt = j->xp + t0 * j->kp;
            if (nr == 4) {
                f32_tile(j, j->w + r0 * rb, xt, 4, nt, acc);
            } else {
                for (int r = 0; r < nr; r++) f32_tile(j, j->w + (r0 + r) * rb, xt, 1, nt, acc + r * nt);
            }
            for (int r = 0; r < nr; r++) {
                const int64_t row = r0 + r;
                const float s = j->per_channel ? j->scale[row] : j->scale[0];
                for (int t = 0; t < nt; t++) {
                    float v = acc[r * nt + t] * s;
                    if (j->bias) v += j->bias[row];
                    j->y[(t0 + t) * n + row] = v;
                }
            }
        }
    }
}

static lin_job make_job(int isa, int64_t m, int64_t k, const uint8_t *w, int64_t n, int64_t kp,
                        int bits, int levels, const float *scale, int per_channel,
                        const float *bias, float *y, int *nthreads) {
    lin_job j;
    memset(&j, 0, sizeof j);
    j.isa = isa, j.bits = bits, j.levels = levels, j.per_channel = per_channel;
    j.m = m, j.n = n, j.k = k, j.kp = kp, j.w = w, j.scale = scale, j.bias = bias, j.y = y;
    j.rowbytes = kp * bits / 8;
    if ((double)m * (double)n * (double)k < 2.0e5 || n < 2 * ROWS) *nthreads = 1;
    /* about 4 chunks a thread, whole 8-row blocks */
    const int64_t nblocks = (n + ROWS - 1) / ROWS;
    int64_t per = nblocks / (4 * (int64_t)*nthreads);
    j.rows_per_chunk = ROWS * (per > 0 ? per : 1);
    return j;
}

/* Returns 0 on success, -1 when out of memory. */
LB_EXPORT int lb_linear_i8(int isa, const float *x, int64_t m, int64_t k, const uint8_t *w,
                           int64_t n, int64_t kp, int bits, int levels, const float *scale,
                           int per_channel, const float *bias, float *y, int nthreads) {
    lin_job j = make_job(isa, m, k, w, n, kp, bits, levels, scale, per_channel, bias, y, &nthreads);
    int8_t *q = xalloc((size_t)(m * kp + 64));
    float *a = xalloc((size_t)m * sizeof(float));
    int32_t *sq = xalloc((size_t)m * sizeof(int32_t));
    if (!q || !a || !sq) {
        free(q), free(a), free(sq);
        return -1;
    }
    quantize_rows(isa, x, m, k, kp, q, a, sq, nthreads);
    j.q = q, j.a = a, j.sq = sq;
    parallel_for(i8_chunk, &j, (n + j.rows_per_chunk - 1) / j.rows_per_chunk, nthreads);
    free(q), free(a), free(sq);
    return 0;
}

LB_EXPORT int lb_linear_f32(int isa, const float *x, int64_t m, int64_t k, const uint8_t *w,
                            int64_t n, int64_t kp, int bits, int levels, const float *scale,
                            int per_channel, const float *bias, float *y, int nthreads) {
    lin_job j = make_job(isa, m, k, w, n, kp, bits, levels, scale, per_channel, bias, y, &nthreads);
    float *xp = xalloc((size_t)(m * kp) * sizeof(float));
    float lut[16], lut_hi[16];
    if (!xp) return -1;
    for (int64_t t = 0; t < m; t++) {
        memcpy(xp + t * kp, x + t * k, (size_t)k * sizeof(float));
        memset(xp + t * kp + k, 0, (size_t)(kp - k) * sizeof(float));
    }
    j.half = (float)(levels - 1) / 2.0f;
    const int lanemask = bits == 5 ? 15 : (1 << bits) - 1;
    for (int i = 0; i < 16; i++) {
        lut[i] = (float)(i & lanemask) - j.half; /* exact */
        lut_hi[i] = (float)(16 * (i & 1));
    }
    j.xp = xp, j.lut = lut, j.lut_hi = lut_hi;
    parallel_for(f32_chunk, &j, (n + j.rows_per_chunk - 1) / j.rows_per_chunk, nthreads);
    free(xp);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* im2col: x (B, C, H, W) with any strides -> patches (B * Ho * Wo, C * kh * kw), token-major */
/* ---------------------------------------------------------------------------------------- */

/* Row t = (b, ho, wo) of the output holds x[b, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw] at
 * column (c * kh + i) * kw + j (F.unfold's order, the order of weight.reshape(C_out, -1)),
 * zero outside the image. Written directly in the layout the linear kernels read, which saves
 * torch's unfold + transpose copies. */
typedef struct {
    const float *x;
    int64_t b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
    int64_t xs[4];
    int64_t per_chunk;
    float *out;
} im2col_job;

static void im2col_chunk(const void *ctx, int64_t chunk) {
    const im2col_job *j = ctx;
    const int64_t ntok = j->b * j->ho * j->wo, K = j->c * j->kh * j->kw;
    const int64_t t1 = (chunk + 1) * j->per_chunk < ntok ? (chunk + 1) * j->per_chunk : ntok;
    for (int64_t t = chunk * j->per_chunk; t < t1; t++) {
        const int64_t b = t / (j->ho * j->wo), rem = t % (j->ho * j->wo);
        const int64_t oy = rem / j->wo, ox = rem % j->wo;
        float *o = j->out + t * K;
        for (int64_t c = 0; c < j->c; c++) {
            const float *xc = j->x + b * j->xs[0] + c * j->xs[1];
            for (int64_t i = 0; i < j->kh; i++) {
                const int64_t y = oy * j->sh - j->ph + i * j->dh;
                if (y < 0 || y >= j->h) {
                    for (int64_t jj = 0; jj < j->kw; jj++) *o++ = 0.0f;
                    continue;
                }
                const float *row = xc + y * j->xs[2];
                for (int64_t jj = 0; jj < j->kw; jj++) {
                    const int64_t xx = ox * j->sw - j->pw + jj * j->dw;
                    *o++ = (xx >= 0 && xx < j->w) ? row[xx * j->xs[3]] : 0.0f;
                }
            }
        }
    }
}

LB_EXPORT void lb_im2col(const float *x, const int64_t *dims, float *out, int nthreads) {
    /* dims: b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, 4 strides of x (elements) */
    im2col_job j = {x,       dims[0], dims[1], dims[2],  dims[3],  dims[4],  dims[5],  dims[6],
                    dims[7], dims[8], dims[9], dims[10], dims[11], dims[12], dims[13],
                    {dims[14], dims[15], dims[16], dims[17]}, 1, out};
    const int64_t ntok = j.b * j.ho * j.wo;
    if (ntok * j.c * j.kh * j.kw < 65536) nthreads = 1;
    j.per_chunk = (ntok + 4 * nthreads - 1) / (4 * nthreads);
    if (j.per_chunk < 1) j.per_chunk = 1;
    parallel_for(im2col_chunk, &j, (ntok + j.per_chunk - 1) / j.per_chunk, nthreads);
}
