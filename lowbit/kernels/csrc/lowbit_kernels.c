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
 * K is zero-padded to Kp, a multiple of the group size G = 512 / B codes = 64 bytes. Group g of
 * a row is 64 bytes and holds codes k = g*G + j*64 + i (j = 0..8/B-1, i = 0..63):
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
 * Rows come in blocks of ROWS = 8 (the last block padded with zero rows), and a block stores its
 * rows' groups interleaved: byte offset ((block * Kp/G + g) * 8 + r) * 64 for row 8*block + r.
 * The kernels take a block's 8 rows together, so a block is one sequential stream: from memory
 * the hardware prefetcher keeps up (20 GB/s on one Zen 4 core where 8 rows 1 kB apart gave 8.5),
 * and it refills the caches faster after other traffic.
 *
 * N = 17 ("B = 5", 5 bits a weight): c = lo + 16 hi; a block is the B = 4 layout of the low
 * nibbles (8 * Kp / 2 bytes) followed by the B = 1 layout of the high bits (8 * Kp / 8 bytes),
 * Kp a multiple of 512; dot products are taken on both parts and combined, dot = lo + 16 hi.
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
 * 15 * 127 and the AVX2 path's int16 sums stay below 2 * 15 * 127 = 3810 a pair and 15,240 a group
 * (see dots_256).
 *
 * fp32 activations: y[t,n] = s[n] * sum_k x[t,k] * (c[n,k] - (N-1)/2) + b[n], float32 sums:
 * on AVX-512 and portable machines by lookup tables on a layout of their own (see "fp32
 * activations by table lookup" below), on AVX2 by a level table + FMA on the lane layout.
 *
 * Threads: OpenMP, built against the libgomp that torch has already loaded in the process, so the
 * kernels run on torch's own thread team. After each torch operator (a ReLU, a pooling) that
 * team's workers keep spinning for a while; a second pool of our own would have to share the
 * cores with them (measured: cvnn2 at batch 1, 5.9 ms on two threads vs 3.4 ms on one), while
 * the same team picks up the next parallel region at once. Chunks are claimed dynamically. A
 * call that a descheduled worker made slower than the calling thread alone would have been
 * sends the next calls to the calling thread alone for a while (see parallel_for).
 * Without OpenMP (a compiler that lacks it) the kernels run on the calling thread.
 */

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LB_EXPORT __attribute__((visibility("default")))
#define LB_INLINE static inline __attribute__((always_inline))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define T256 __attribute__((target("avx2,fma")))

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
/* ROWS: rows per block (the compute layout interleaves them, see the header); BLOCK_GROUP:
 * bytes of one group of a row block; MAX_CHUNK_TOKENS: tokens per work item */
enum { ROWS = 8, BLOCK_GROUP = ROWS * 64, MAX_CHUNK_TOKENS = 32 };
/* the GEMM drivers' work split (see make_job) */
enum { CHUNKS_PER_THREAD = 16, MIN_CHUNK_BYTES = 16384 };

LB_EXPORT int lb_version(void) { return 8; }

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
/* Threads                                                                                    */
/* ---------------------------------------------------------------------------------------- */

typedef void (*chunk_fn)(const void *ctx, int64_t chunk);

/* GNU OpenMP cannot start a team in a child forked after the parent used one (the child hangs,
 * torch's own operators included), so a forked child runs the kernels on its calling thread. */
static volatile int forked_child = 0;
static void on_fork_child(void) { forked_child = 1; }
__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, on_fork_child);
}

/* A team that waits: an OpenMP region ends in a barrier that waits for every thread of the team,
 * including one the OS has not run yet or has taken off its core in the middle of a chunk.
 * Where the cores are shared with more runnable threads than they have (other jobs; another
 * runtime's spinning workers), such a worker may get its core back only after another thread's
 * time slice, milliseconds later, while the caller waits at the barrier doing nothing: measured
 * on a 2-core Zen 4 at load ~4, int8 ternary 4096x4096 batch 1 took a median 7.3 ms on two
 * threads against 0.21 ms on one. So each call checks itself: from the caller's own chunks it
 * estimates what the call would have cost on the caller alone (its time computing / its chunks
 * x all chunks), and a call that took longer than that (and by more than STALL_SECONDS) sends
 * the next calls to the caller alone, for a number of calls that doubles with every such call
 * in a row (1, 2, 4, ... MAX_SERIAL_CALLS); the first call after that tries the team again. A
 * quiet machine never stalls like that and keeps its threads; a loaded one pays one slow call
 * per back-off instead of one per call. (A pool whose caller never waits for a worker that has
 * not started was tried: it cannot use torch's team, already spinning after each torch
 * operator, and packed cvnn2 at batch 1 on two threads got slower: 3.0 ms against 1.85, best
 * decile, at load ~5.) */
enum { MAX_SERIAL_CALLS = 256 };
#define STALL_SECONDS 20e-6 /* smaller losses are noise, not a stall */
static _Atomic int serial_calls = 0; /* calls left to run on the caller alone */
static _Atomic int backoff = 0;      /* the next back-off's length; 0 after a call that scaled */

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A team call took `elapsed` seconds where the caller alone would have taken about `alone`. */
static void note_team_call(double alone, double elapsed) {
    if (elapsed > alone + STALL_SECONDS) {
        const int b = atomic_load(&backoff);
        atomic_store(&serial_calls, b > 0 ? b : 1);
        atomic_store(&backoff, b == 0 ? 2 : (2 * b < MAX_SERIAL_CALLS ? 2 * b : MAX_SERIAL_CALLS));
    } else {
        atomic_store(&backoff, 0);
    }
}

/* fn(ctx, i) for i in 0..nchunks-1 on up to `nthreads` threads (the caller included), chunks
 * claimed one at a time in order. Not static: lowbit_binary.c, in the same library, shares it
 * (hidden by -fvisibility=hidden). */
void parallel_for(chunk_fn fn, const void *ctx, int64_t nchunks, int nthreads) {
#ifdef _OPENMP
    if (nthreads > 1 && nchunks > 1 && !forked_child && !omp_in_parallel() &&
        atomic_fetch_sub(&serial_calls, 1) <= 0) {
        atomic_store(&serial_calls, 0);
        if (nthreads > nchunks) nthreads = (int)nchunks;
        _Atomic int64_t next = 0;
        int64_t mine = 0; /* the caller's chunks */
        const double t0 = seconds();
        double t1 = t0;
#pragma omp parallel num_threads(nthreads)
        {
            const int caller = omp_get_thread_num() == 0;
            for (int64_t i; (i = atomic_fetch_add_explicit(&next, 1, memory_order_relaxed)) < nchunks;) {
                fn(ctx, i);
                if (caller) mine++;
            }
            if (caller) t1 = seconds();
        }
        if (mine > 0) note_team_call((t1 - t0) * (double)nchunks / (double)mine, seconds() - t0);
        return;
    }
#endif
    (void)nthreads;
    for (int64_t i = 0; i < nchunks; i++) fn(ctx, i);
}

LB_EXPORT int lb_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static int64_t group_codes(int lanes) { return 512 / lanes; }

/* ---------------------------------------------------------------------------------------- */
/* Packing: codes (n, k) uint8 -> compute layout (n, kp * bits / 8) bytes                   */
/* ---------------------------------------------------------------------------------------- */

LB_EXPORT void lb_pack(const uint8_t *codes, int64_t n, int64_t k, int bits, int64_t kp,
                       uint8_t *out) {
    const int64_t rowbytes = kp * bits / 8, nblocks = (n + ROWS - 1) / ROWS;
    memset(out, 0, (size_t)(nblocks * ROWS * rowbytes));
    const int lanes = bits == 5 ? 4 : bits; /* B = 5: nibbles first, then the high bits */
    const int64_t gc = group_codes(lanes);
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *c = codes + r * k;
        uint8_t *o = out + (r / ROWS) * ROWS * rowbytes + (r % ROWS) * 64;
        for (int64_t i = 0; i < k; i++) {
            const int64_t g = i / gc, rem = i % gc, j = rem >> 6, b = rem & 63;
            o[g * BLOCK_GROUP + b] |= (uint8_t)((c[i] & 15) << (j * lanes));
        }
        if (bits == 5) {
            uint8_t *h = o + ROWS * kp / 2;
            for (int64_t i = 0; i < k; i++) {
                const int64_t g = i / 512, rem = i % 512, j = rem >> 6, b = rem & 63;
                h[g * BLOCK_GROUP + b] |= (uint8_t)((c[i] >> 4) << j);
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
/* int8 quantization of the activations                                                       */
/* ---------------------------------------------------------------------------------------- */

/* The absmax multiplier of n floats: a = (1 / max(max|x|, 1e-5)) * 127 (float32; torch evaluates
 * the reference's 127 / m as reciprocal(m) * 127, so the same rounding here). */
LB_INLINE float multiplier_of(float mx) { return (1.0f / (mx > 1e-5f ? mx : 1e-5f)) * 127.0f; }

T512 static float absmax_512(const float *x, int64_t n) {
    __m512 vm = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    float mx = _mm512_reduce_max_ps(vm);
    for (; i < n; i++) mx = fmaxf(mx, fabsf(x[i]));
    return mx;
}

static float absmax_generic(const float *x, int64_t n) {
    float mx = 0.0f;
    for (int64_t i = 0; i < n; i++) mx = fmaxf(mx, fabsf(x[i]));
    return mx;
}

static float absmax(int isa, const float *x, int64_t n) {
    return isa == ISA_AVX512 ? absmax_512(x, n) : absmax_generic(x, n);
}

/* q[i] = clip(rint(x[i] * a), -127, 127) (round half to even) for n floats; returns sum q. */
T512 static int32_t quantize_span_512(const float *x, int64_t n, float a, int8_t *q) {
    const __m512 va = _mm512_set1_ps(a), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    __m512i vs = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), va);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        const __m512i vi = _mm512_cvtps_epi32(v);
        vs = _mm512_add_epi32(vs, vi);
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(vi));
    }
    int32_t s = _mm512_reduce_add_epi32(vs);
    for (; i < n; i++) {
        float v = rintf(x[i] * a);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)v;
        s += (int32_t)v;
    }
    return s;
}

static int32_t quantize_span_generic(const float *x, int64_t n, float a, int8_t *q) {
    int32_t s = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = rintf(x[i] * a);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[i] = (int8_t)v;
        s += (int32_t)v;
    }
    return s;
}

static int32_t quantize_span(int isa, const float *x, int64_t n, float a, int8_t *q) {
    return isa == ISA_AVX512 ? quantize_span_512(x, n, a, q) : quantize_span_generic(x, n, a, q);
}

/* Per-token: x (m, k) float32 -> q (m, kp) int8 zero-padded, a (m) the multipliers, sq (m)
 * sum_k q. */
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
        const float *xt = j->x + t * j->k;
        int8_t *qt = j->q + t * j->kp;
        j->a[t] = multiplier_of(absmax(j->isa, xt, j->k));
        j->sq[t] = quantize_span(j->isa, xt, j->k, j->a[t], qt);
        memset(qt + j->k, 0, (size_t)(j->kp - j->k));
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
/* Activation addressing                                                                      */
/* ---------------------------------------------------------------------------------------- */

/* The tiles below never see a token as one row: the 64 activations that meet chunk c of the
 * weight (codes k = 64c .. 64c+63) are read at xt[t] + coff[c], xt[t] the token's base pointer.
 * A linear layer's tokens are rows (xt[t] = x + t * kp, coff[c] = 64 c); a convolution's are
 * output pixels of a zero-padded NHWC image, its chunks (tap, 64 channels), so the patches are
 * read in place (implicit GEMM) instead of being copied out by an im2col. Only the first `nch`
 * chunks are read: the zero codes that pad K to whole groups are skipped. */

/* ---------------------------------------------------------------------------------------- */
/* int8 x packed dot products, AVX-512 VNNI                                                   */
/* ---------------------------------------------------------------------------------------- */

/* The 16 horizontal sums of v[0..15], in one vector (lane i = sum of v[i]): pairs are merged
 * inside 128-bit lanes (unpack + add), then across lanes (shuffle_i32x4 + add); 45 operations
 * where 16 separate reductions take about 130. */
LB_INLINE T512 __m512i reduce16_512(const __m512i *v) {
    __m512i a[8], b[4];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) /* lane L of b[i]: the lane-L sums of v[4i .. 4i+3] */
        b[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * i], a[2 * i + 1]),
                                _mm512_unpackhi_epi64(a[2 * i], a[2 * i + 1]));
    const int even = _MM_SHUFFLE(2, 0, 2, 0), odd = _MM_SHUFFLE(3, 1, 3, 1);
    const __m512i c0 = _mm512_add_epi32(_mm512_shuffle_i32x4(b[0], b[1], even),
                                        _mm512_shuffle_i32x4(b[0], b[1], odd));
    const __m512i c1 = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2], b[3], even),
                                        _mm512_shuffle_i32x4(b[2], b[3], odd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(c0, c1, even), _mm512_shuffle_i32x4(c0, c1, odd));
}

/* out[t*ROWS + r] = sum_k c[row r, k] * q[token t, k] for R rows and T tokens (every int8 tile
 * writes token-major rows of ROWS outputs, the layout the rescale reads). */
LB_INLINE T512 void dots_512(const uint8_t *w, const int8_t *const *xt,
                             const int64_t *coff, int64_t nch, const int bits, const int R,
                             const int T, int32_t *out) {
    __m512i acc[8][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_si512();
    const __m512i lanemask = _mm512_set1_epi8((char)((1 << bits) - 1));
    const int sub = 8 / bits;
    for (int64_t g = 0, c0 = 0; c0 < nch; g++, c0 += sub) {
        const uint8_t *wg = w + g * BLOCK_GROUP;
        __m512i p[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) p[r] = _mm512_loadu_si512(wg + r * 64);
#pragma GCC unroll 8
        for (int j = 0; j < sub; j++) {
            if (c0 + j >= nch) break;
            const int64_t o = coff[c0 + j];
            __m512i xv[4];
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_si512(xt[t] + o);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const __m512i u = _mm512_and_si512(p[r], lanemask);
                p[r] = _mm512_srli_epi16(p[r], bits); /* 16-bit shift: the mask drops spill */
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], u, xv[t]);
            }
        }
    }
    if (R * T == 16) {
        __m512i v[16];
        int32_t sums[16];
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++)
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) v[t * 4 + r] = acc[r][t];
        _mm512_storeu_si512(sums, reduce16_512(v));
        for (int t = 0; t < 4; t++) memcpy(out + t * ROWS, sums + t * 4, 4 * sizeof(int32_t));
        return;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) out[t * ROWS + r] = _mm512_reduce_add_epi32(acc[r][t]);
}

#define DEF_DOTS_512(B)                                                                          \
    T512 static void dots_512_b##B(const uint8_t *w, const int8_t *const *xt,                    \
                                   const int64_t *coff, int64_t nch, int R, int T,               \
                                   int32_t *out) {                                               \
        if (R == 8 && T == 1) dots_512(w, xt, coff, nch, B, 8, 1, out);                          \
        else if (R == 4 && T == 4) dots_512(w, xt, coff, nch, B, 4, 4, out);                     \
        else if (R == 1 && T == 4) dots_512(w, xt, coff, nch, B, 1, 4, out);                     \
        else dots_512(w, xt, coff, nch, B, 1, 1, out);                                           \
    }
DEF_DOTS_512(1)
DEF_DOTS_512(2)
DEF_DOTS_512(4)

/* ---------------------------------------------------------------------------------------- */
/* int8 x packed dot products, generic C (the portable path)                                  */
/* ---------------------------------------------------------------------------------------- */

/* Decode each row's group once, then take its dot with every token (vectorised by the
 * compiler from the omp simd reduction). */
static void dots_portable(const uint8_t *w, const int8_t *const *xt,
                          const int64_t *coff, int64_t nch, int bits, int R, int T,
                          int32_t *out) {
    uint8_t dec[512];
    const int sub = 8 / bits;
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[t * ROWS + r] = 0;
    for (int64_t g = 0, c0 = 0; c0 < nch; g++, c0 += sub) {
        const int nsub = nch - c0 < sub ? (int)(nch - c0) : sub;
        for (int r = 0; r < R; r++) {
            decode_group(w + g * BLOCK_GROUP + r * 64, bits, dec);
            for (int t = 0; t < T; t++) {
                int32_t s = 0;
                for (int j = 0; j < nsub; j++) {
                    const int8_t *xc = xt[t] + coff[c0 + j];
                    const uint8_t *dc = dec + j * 64;
#pragma omp simd reduction(+ : s)
                    for (int i = 0; i < 64; i++) s += (int32_t)dc[i] * (int32_t)xc[i];
                }
                out[t * ROWS + r] += s;
            }
        }
    }
}

typedef void (*dots_fn)(const uint8_t *, const int8_t *const *, const int64_t *, int64_t, int,
                        int, int32_t *);

/* ---------------------------------------------------------------------------------------- */
/* int8 x packed dot products, AVX2 (no VNNI): vpmaddubsw u8 x s8 -> s16 pairs, vpmaddwd -> s32 */
/* ---------------------------------------------------------------------------------------- */

/* The AVX-512 kernel's algorithm on 32-byte halves of each 64-byte group, for R rows x T tokens
 * with R * T <= 4 (8 + 8 accumulators at most: the 16 ymm registers). vpmaddubsw's pair sums
 * cannot saturate (2 * 15 * 127 < 32767), and they are summed in int16 over a whole group before
 * one vpmaddwd widens them into int32, one vector operation in five fewer than widening each. A
 * group adds 2 * sub = 16 / bits pair sums to a lane, each at most 2 * (2^bits - 1) * 127 in
 * magnitude (codes < 2^bits, |x| <= 127): 4,064 (bits 1), 6,096 (2) or 15,240 (4), below 32767. */
LB_INLINE T256 void dots_256(const uint8_t *w, const int8_t *const *xt,
                             const int64_t *coff, int64_t nch, const int bits, const int R,
                             const int T, int32_t *out) {
    __m256i acc[4][4], acc16[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = acc16[r][t] = _mm256_setzero_si256();
    const __m256i lanemask = _mm256_set1_epi8((char)((1 << bits) - 1));
    const __m256i ones16 = _mm256_set1_epi16(1);
    const int sub = 8 / bits;
    for (int64_t g = 0, c0 = 0; c0 < nch; g++, c0 += sub) {
        for (int h = 0; h < 2; h++) {
            const uint8_t *wg = w + g * BLOCK_GROUP + h * 32;
            __m256i p[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                p[r] = _mm256_loadu_si256((const __m256i *)(wg + r * 64));
            for (int j = 0; j < sub; j++) {
                if (c0 + j >= nch) break;
                const int64_t o = coff[c0 + j] + h * 32;
                __m256i xv[4];
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_si256((const __m256i *)(xt[t] + o));
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m256i u = _mm256_and_si256(p[r], lanemask);
                    p[r] = _mm256_srli_epi16(p[r], bits);
#pragma GCC unroll 4
                    for (int t = 0; t < T; t++)
                        acc16[r][t] = _mm256_add_epi16(acc16[r][t], _mm256_maddubs_epi16(u, xv[t]));
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(acc16[r][t], ones16));
                acc16[r][t] = _mm256_setzero_si256();
            }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc[r][t]),
                                            _mm256_extracti128_si256(acc[r][t], 1));
            const __m128i v2 = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
            out[t * ROWS + r] = _mm_cvtsi128_si32(_mm_add_epi32(v2, _mm_shuffle_epi32(v2, 0xb1)));
        }
}

/* 8 rows x 1 token as two blocks of 4 rows; 4 x 4 as four rows of 4 tokens each (the int16 sums
 * leave no registers for 4 x 4 accumulators). Ternary 4096x4096 on a Zen 2, against widening
 * every pair sum in 4 x 4 blocks: batch 1 377 -> 274 us (weights in cache) and 828 -> 568 us
 * (evicted); batch 8 2866 -> 1709 and 3018 -> 2173 us. */
#define DEF_DOTS_256(B)                                                                          \
    T256 static void dots_256_b##B(const uint8_t *w, const int8_t *const *xt,                    \
                                   const int64_t *coff, int64_t nch, int R, int T,               \
                                   int32_t *out) {                                               \
        if (R == 8 && T == 1) {                                                                  \
            dots_256(w, xt, coff, nch, B, 4, 1, out);                                            \
            dots_256(w + 4 * 64, xt, coff, nch, B, 4, 1, out + 4);                               \
        } else if (R == 4 && T == 4) {                                                           \
            for (int r = 0; r < 4; r++) dots_256(w + r * 64, xt, coff, nch, B, 1, 4, out + r);    \
        } else if (R == 1 && T == 4) dots_256(w, xt, coff, nch, B, 1, 4, out);                   \
        else dots_256(w, xt, coff, nch, B, 1, 1, out);                                           \
    }
DEF_DOTS_256(1)
DEF_DOTS_256(2)
DEF_DOTS_256(4)

static void dots_lanes(int isa, const uint8_t *w, const int8_t *const *xt,
                       const int64_t *coff, int64_t nch, int lanes, int R, int T, int32_t *out) {
    static const dots_fn table[2][3] = {
        {dots_256_b1, dots_256_b2, dots_256_b4},
        {dots_512_b1, dots_512_b2, dots_512_b4},
    };
    const int li = lanes == 1 ? 0 : (lanes == 2 ? 1 : 2);
    if (isa == ISA_AVX512 || isa == ISA_AVX2)
        table[isa == ISA_AVX512][li](w, xt, coff, nch, R, T, out);
    else
        dots_portable(w, xt, coff, nch, lanes, R, T, out);
}

/* bits = 5 (N = 17): c = lo + 16 hi, the block's low nibbles then its high bits. */
static void dots_dispatch(int isa, const uint8_t *w, int64_t kp,
                          const int8_t *const *xt, const int64_t *coff, int64_t nch, int bits,
                          int R, int T, int32_t *out) {
    if (bits != 5) {
        dots_lanes(isa, w, xt, coff, nch, bits, R, T, out);
        return;
    }
    int32_t hi[4 * ROWS];
    dots_lanes(isa, w, xt, coff, nch, 4, R, T, out);
    dots_lanes(isa, w + ROWS * kp / 2, xt, coff, nch, 1, R, T, hi);
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) out[t * ROWS + r] += 16 * hi[t * ROWS + r];
}

/* ---------------------------------------------------------------------------------------- */
/* fp32 activations, AVX-512: codes -> float levels through a 16-entry table (vpermps)         */
/* ---------------------------------------------------------------------------------------- */

/* out[r*T + t] = sum_k (c[r,k] - (N-1)/2) * x[t,k] for R rows and T tokens. Sixteen codes are
 * zero-extended to dwords (vpmovzxbd), shifted so their lane is in the low bits, and looked up
 * in `table` (table[i] = value of code i mod 2^B, so the bits of the neighbouring lanes above are
 * ignored by vpermps, which reads only 4 index bits). */
LB_INLINE T512 void f32tile_512(const uint8_t *w, const float *const *xt,
                                const int64_t *coff, int64_t nch, const int bits,
                                const float *table, const int R, const int T, float *out) {
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    const __m512 lut = _mm512_loadu_ps(table);
    const int sub = 8 / bits;
    for (int64_t g = 0, c0 = 0; c0 < nch; g++, c0 += sub) {
        const uint8_t *wg = w + g * BLOCK_GROUP;
        for (int j = 0; j < sub; j++) {
            if (c0 + j >= nch) break;
            const __m512i shift = _mm512_set1_epi32(j * bits);
            const int64_t o = coff[c0 + j];
#pragma GCC unroll 4
            for (int qq = 0; qq < 4; qq++) {
                __m512 xv[4];
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_ps(xt[t] + o + qq * 16);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    __m512i idx = _mm512_cvtepu8_epi32(
                        _mm_loadu_si128((const __m128i *)(wg + r * 64 + qq * 16)));
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

/* f32_<isa>_b<B>: the tile shapes the drivers ask for, each compiled with constant R, T, B. */
#define DEF_F32_TILES(ISA, ATTR, B)                                                              \
    ATTR static void f32_##ISA##_b##B(const uint8_t *w, const float *const *xt,                  \
                                      const int64_t *coff, int64_t nch, const float *lut, int R, \
                                      int T, float *out) {                                       \
        if (R == 4 && T == 4) f32tile_##ISA(w, xt, coff, nch, B, lut, 4, 4, out);                \
        else if (R == 4 && T == 1) f32tile_##ISA(w, xt, coff, nch, B, lut, 4, 1, out);           \
        else if (R == 1 && T == 4) f32tile_##ISA(w, xt, coff, nch, B, lut, 1, 4, out);           \
        else f32tile_##ISA(w, xt, coff, nch, B, lut, 1, 1, out);                                 \
    }
DEF_F32_TILES(512, T512, 1)
DEF_F32_TILES(512, T512, 2)
DEF_F32_TILES(512, T512, 4)

/* fp32 activations, AVX2: the same levels, 8 codes at a time, computed instead of looked up:
 * table[i] = i * (table[1] - table[0]) + table[0] for the lane's codes i (set_f32_tables), so
 * level = fma(float(i), step, table[0]), exact (small integers and halves) and equal to the
 * table's entry. A lane-crossing vpermps (two and a blend for B = 4) cost more on AMD Zen 2
 * than the conversion: 1.3x (ternary) to 1.9x (5 and 9 levels) slower on 4096x4096, batch 1. */
LB_INLINE T256 void f32tile_256(const uint8_t *w, const float *const *xt, const int64_t *coff,
                                int64_t nch, const int bits, const float *table, const int R,
                                const int T, float *out) {
    __m256 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    const __m256 step = _mm256_set1_ps(table[1] - table[0]), base = _mm256_set1_ps(table[0]);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const int sub = 8 / bits;
    for (int64_t g = 0, c0 = 0; c0 < nch; g++, c0 += sub) {
        const uint8_t *wg = w + g * BLOCK_GROUP;
        for (int j = 0; j < sub; j++) {
            if (c0 + j >= nch) break;
            const __m128i shift = _mm_cvtsi32_si128(j * bits);
            const int64_t o = coff[c0 + j];
            for (int qq = 0; qq < 8; qq++) {
                __m256 xv[4];
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_ps(xt[t] + o + qq * 8);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    __m256i idx = _mm256_cvtepu8_epi32(
                        _mm_loadl_epi64((const __m128i *)(wg + r * 64 + qq * 8)));
                    idx = _mm256_and_si256(_mm256_srl_epi32(idx, shift), mask);
                    const __m256 lev = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idx), step, base);
#pragma GCC unroll 4
                    for (int t = 0; t < T; t++) acc[r][t] = _mm256_fmadd_ps(lev, xv[t], acc[r][t]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]),
                                        _mm256_extractf128_ps(acc[r][t], 1));
            const __m128 v2 = _mm_add_ps(v, _mm_movehl_ps(v, v));
            out[r * T + t] = _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps(v2, v2, 1)));
        }
}

DEF_F32_TILES(256, T256, 1)
DEF_F32_TILES(256, T256, 2)
DEF_F32_TILES(256, T256, 4)

/* fp32 generic C: each row's group is decoded to float levels (c - (N-1)/2, exact), then dotted
 * with every token in float32 (the compiler vectorises the omp simd reduction). */
static void f32_portable(const uint8_t *w, const float *const *xt, const int64_t *coff,
                         int64_t nch, int bits, float mul, float half, int R, int T, float *out) {
    uint8_t dec[512];
    float lev[512];
    const int sub = 8 / bits;
    for (int i = 0; i < R * T; i++) out[i] = 0.0f;
    for (int64_t g = 0, c0 = 0; c0 < nch; g++, c0 += sub) {
        const int nsub = nch - c0 < sub ? (int)(nch - c0) : sub;
        for (int r = 0; r < R; r++) {
            decode_group(w + g * BLOCK_GROUP + r * 64, bits, dec);
            for (int i = 0; i < 64 * nsub; i++) lev[i] = (float)dec[i] * mul - half;
            for (int t = 0; t < T; t++) {
                float s = 0.0f;
                for (int j = 0; j < nsub; j++) {
                    const float *xc = xt[t] + coff[c0 + j];
                    const float *lc = lev + j * 64;
#pragma omp simd reduction(+ : s)
                    for (int i = 0; i < 64; i++) s += lc[i] * xc[i];
                }
                out[r * T + t] += s;
            }
        }
    }
}


/* ---------------------------------------------------------------------------------------- */
/* The GEMM driver: (token block, row block) chunks, 8-row blocks, 4-token tiles              */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    int isa, bits, levels, per_channel;
    int64_t m, n, kp, nch, rowbytes;
    int64_t tokens_per_chunk, token_chunks, rows_per_chunk;
    const uint8_t *w;
    const float *scale, *bias;
    float *y;
    const int64_t *toff, *coff; /* token t, chunk c at act + toff[t] + coff[c] (elements) */
    const int8_t *q;            /* int8: quantized activations, multiplier and sum per token */
    const float *a;
    const int32_t *sq;
    const float *x; /* fp32: activations, level tables */
    const float *lut, *lut_hi;
    float half;
} gemm_job;

static void *xalloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}

/* Row `row`'s bytes of group 0 in the blocked layout (its block, then its 64-byte slot). */
static const uint8_t *row_ptr(const gemm_job *j, int64_t row) {
    return j->w + (row / ROWS) * ROWS * j->rowbytes + (row % ROWS) * 64;
}

static void chunk_bounds(const gemm_job *j, int64_t chunk, int64_t *t0, int64_t *t1, int64_t *r0,
                         int64_t *r1) {
    const int64_t tc = chunk % j->token_chunks, rc = chunk / j->token_chunks;
    *t0 = tc * j->tokens_per_chunk;
    *t1 = *t0 + j->tokens_per_chunk < j->m ? *t0 + j->tokens_per_chunk : j->m;
    *r0 = rc * j->rows_per_chunk;
    *r1 = *r0 + j->rows_per_chunk < j->n ? *r0 + j->rows_per_chunk : j->n;
}

/* y[0..nr) = float((2 dot - (N-1) sq) * s / (2 a)) + b for one token and up to 8 rows: the
 * reference's float64 operations, 8 rows a vector (each step is exact or rounds as the scalar
 * one does: the integers stay below 2^53). */
T512 static void rescale_512(const int32_t *dot, int nr, int32_t sq, int levels, float a,
                             const float *s, float s0, const float *bias, float *y) {
    const __mmask8 m = (__mmask8)((1u << nr) - 1u);
    __m512d d = _mm512_cvtepi32_pd(_mm256_maskz_loadu_epi32(m, dot));
    d = _mm512_sub_pd(_mm512_add_pd(d, d), _mm512_set1_pd((double)(levels - 1) * (double)sq));
    const __m512d sv = s ? _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, s)) : _mm512_set1_pd(s0);
    d = _mm512_div_pd(_mm512_mul_pd(d, sv), _mm512_set1_pd(2.0 * (double)a));
    __m256 v = _mm512_cvtpd_ps(d);
    if (bias) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(m, bias));
    _mm256_mask_storeu_ps(y, m, v);
}

static void rescale_generic(const int32_t *dot, int nr, int32_t sq, int levels, float a,
                            const float *s, float s0, const float *bias, float *y) {
    for (int r = 0; r < nr; r++) {
        const float v = rescale_i8(dot[r], sq, levels, a, s ? s[r] : s0);
        y[r] = bias ? v + bias[r] : v;
    }
}

static void i8_chunk(const void *ctx, int64_t chunk) {
    const gemm_job *j = ctx;
    const int64_t n = j->n;
    int64_t t0, t1, r0, r1;
    chunk_bounds(j, chunk, &t0, &t1, &r0, &r1);
    int32_t dots[MAX_CHUNK_TOKENS * ROWS]; /* token-major: dots[(t - t0) * ROWS + r] */
    for (int64_t rr = r0; rr < r1; rr += ROWS) {
        const int nr = r1 - rr < ROWS ? (int)(r1 - rr) : ROWS;
        const uint8_t *w = row_ptr(j, rr);
        int nt = 1;
        for (int64_t t = t0; t < t1; t += nt) {
            nt = t1 - t >= 4 ? 4 : 1; /* 4-token tiles, then single tokens */
            const int8_t *xt[4];
            for (int i = 0; i < nt; i++) xt[i] = j->q + j->toff[t + i];
            int32_t *out = dots + (t - t0) * ROWS;
#define DOTS(W, R, T, OUT) dots_dispatch(j->isa, W, j->kp, xt, j->coff, j->nch, j->bits, R, T, OUT)
            if (nr == ROWS && nt == 1) {
                DOTS(w, 8, 1, out);
            } else if (nr == ROWS) {
                DOTS(w, 4, 4, out);
                DOTS(w + 4 * 64, 4, 4, out + 4);
            } else {
                for (int r = 0; r < nr; r++) DOTS(w + r * 64, 1, nt, out + r);
            }
#undef DOTS
        }
        const float *s = j->per_channel ? j->scale + rr : NULL;
        const float *bias = j->bias ? j->bias + rr : NULL;
        for (int64_t t = t0; t < t1; t++) {
            const int32_t *d = dots + (t - t0) * ROWS;
            float *y = j->y + t * n + rr;
            if (j->isa == ISA_AVX512)
                rescale_512(d, nr, j->sq[t], j->levels, j->a[t], s, j->scale[0], bias, y);
            else
                rescale_generic(d, nr, j->sq[t], j->levels, j->a[t], s, j->scale[0], bias, y);
        }
    }
}

/* One tile over a lane layout: table (AVX-512) or value = code * mul - half (generic). */
static void f32_lanes(const gemm_job *j, const uint8_t *w, const float *const *xt, int lanes,
                      const float *table, float mul, float half, int R, int T, float *acc) {
    typedef void (*f32_fn)(const uint8_t *, const float *const *, const int64_t *, int64_t,
                           const float *, int, int, float *);
    static const f32_fn tiles[2][3] = {
        {f32_256_b1, f32_256_b2, f32_256_b4},
        {f32_512_b1, f32_512_b2, f32_512_b4},
    };
    if (j->isa == ISA_AVX512 || j->isa == ISA_AVX2)
        tiles[j->isa == ISA_AVX512][lanes == 1 ? 0 : (lanes == 2 ? 1 : 2)](
            w, xt, j->coff, j->nch, table, R, T, acc);
    else
        f32_portable(w, xt, j->coff, j->nch, lanes, mul, half, R, T, acc);
}

static void f32_tile(const gemm_job *j, const uint8_t *w, const float *const *xt, int R, int T,
                     float *acc) {
    if (j->bits != 5) {
        f32_lanes(j, w, xt, j->bits, j->lut, 1.0f, j->half, R, T, acc);
        return;
    }
    float hi[16];
    f32_lanes(j, w, xt, 4, j->lut, 1.0f, j->half, R, T, acc);             /* lo - (N-1)/2 */
    f32_lanes(j, w + ROWS * j->kp / 2, xt, 1, j->lut_hi, 16.0f, 0.0f, R, T, hi); /* 16 hi */
    for (int i = 0; i < R * T; i++) acc[i] += hi[i];
}

static void f32_chunk(const void *ctx, int64_t chunk) {
    const gemm_job *j = ctx;
    const int64_t n = j->n;
    int64_t t0, t1, r0, r1;
    chunk_bounds(j, chunk, &t0, &t1, &r0, &r1);
    for (int64_t rr = r0; rr < r1; rr += 4) {
        const int nr = r1 - rr < 4 ? (int)(r1 - rr) : 4;
        float acc[16];
        int nt = 1;
        for (int64_t t = t0; t < t1; t += nt) {
            nt = t1 - t >= 4 ? 4 : 1;
            const float *xt[4];
            for (int i = 0; i < nt; i++) xt[i] = j->x + j->toff[t + i];
            if (nr == 4) {
                f32_tile(j, row_ptr(j, rr), xt, 4, nt, acc);
            } else {
                for (int r = 0; r < nr; r++) f32_tile(j, row_ptr(j, rr + r), xt, 1, nt, acc + r * nt);
            }
            for (int r = 0; r < nr; r++) {
                const int64_t row = rr + r;
                const float s = j->per_channel ? j->scale[row] : j->scale[0];
                for (int i = 0; i < nt; i++) {
                    float v = acc[r * nt + i] * s;
                    if (j->bias) v += j->bias[row];
                    j->y[(t + i) * n + row] = v;
                }
            }
        }
    }
}

static gemm_job make_job(int isa, int64_t m, int64_t k, const uint8_t *w, int64_t n, int64_t kp,
                         int bits, int levels, const float *scale, int per_channel,
                         const float *bias, float *y, int *nthreads) {
    gemm_job j;
    memset(&j, 0, sizeof j);
    j.isa = isa, j.bits = bits, j.levels = levels, j.per_channel = per_channel;
    j.m = m, j.n = n, j.kp = kp, j.w = w, j.scale = scale, j.bias = bias, j.y = y;
    j.nch = (k + 63) / 64;
    j.rowbytes = kp * bits / 8;
    if ((double)m * (double)n * (double)k < 2.0e5) *nthreads = 1;
    /* Tokens in blocks of 32 (a block's activations stay in L1/L2 while every row block passes
     * over them), rows split further until there are about CHUNKS_PER_THREAD chunks a thread,
     * whole 8-row blocks of at least MIN_CHUNK_BYTES of weights. Chunks are claimed in order as
     * threads come free, so the threads finish within about one chunk of each other: with 4
     * chunks a thread a worker that starts late left the caller up to 1/8 of a 2-thread GEMV to
     * finish alone; with 16, 1/32. */
    j.tokens_per_chunk = m < MAX_CHUNK_TOKENS ? (m > 0 ? m : 1) : MAX_CHUNK_TOKENS;
    j.token_chunks = (m + j.tokens_per_chunk - 1) / j.tokens_per_chunk;
    if (j.token_chunks < 1) j.token_chunks = 1;
    const int64_t nblocks = (n + ROWS - 1) / ROWS;
    const int64_t max_chunks = nblocks * ROWS * j.rowbytes / MIN_CHUNK_BYTES;
    int64_t row_chunks =
        (CHUNKS_PER_THREAD * (int64_t)*nthreads + j.token_chunks - 1) / j.token_chunks;
    if (row_chunks > max_chunks) row_chunks = max_chunks;
    row_chunks = row_chunks < 1 ? 1 : (row_chunks > nblocks ? nblocks : row_chunks);
    j.rows_per_chunk = ROWS * ((nblocks + row_chunks - 1) / row_chunks);
    return j;
}

static int64_t job_chunks(const gemm_job *j) {
    return j->token_chunks * ((j->n + j->rows_per_chunk - 1) / j->rows_per_chunk);
}

static void set_f32_tables(gemm_job *j, float *lut, float *lut_hi) {
    j->half = (float)(j->levels - 1) / 2.0f;
    const int lanemask = j->bits == 5 ? 15 : (1 << j->bits) - 1;
    for (int i = 0; i < 16; i++) {
        lut[i] = (float)(i & lanemask) - j->half; /* exact */
        lut_hi[i] = (float)(16 * (i & 1));
    }
    j->lut = lut, j->lut_hi = lut_hi;
}

/* Offsets of tokens laid out as rows of `stride` elements, and of consecutive chunks. */
static int64_t *row_offsets(int64_t count, int64_t stride) {
    int64_t *off = xalloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
    if (off)
        for (int64_t i = 0; i < count; i++) off[i] = i * stride;
    return off;
}

/* Returns 0 on success, -1 when out of memory. */
LB_EXPORT int lb_linear_i8(int isa, const float *x, int64_t m, int64_t k, const uint8_t *w,
                           int64_t n, int64_t kp, int bits, int levels, const float *scale,
                           int per_channel, const float *bias, float *y, int nthreads) {
    gemm_job j = make_job(isa, m, k, w, n, kp, bits, levels, scale, per_channel, bias, y, &nthreads);
    int8_t *q = xalloc((size_t)(m * kp + 64));
    float *a = xalloc((size_t)m * sizeof(float));
    int32_t *sq = xalloc((size_t)m * sizeof(int32_t));
    int64_t *toff = row_offsets(m, kp), *coff = row_offsets(j.nch, 64);
    int rc = -1;
    if (q && a && sq && toff && coff) {
        quantize_rows(isa, x, m, k, kp, q, a, sq, nthreads);
        j.q = q, j.a = a, j.sq = sq, j.toff = toff, j.coff = coff;
        parallel_for(i8_chunk, &j, job_chunks(&j), nthreads);
        rc = 0;
    }
    free(q), free(a), free(sq), free(toff), free(coff);
    return rc;
}

LB_EXPORT int lb_linear_f32(int isa, const float *x, int64_t m, int64_t k, const uint8_t *w,
                            int64_t n, int64_t kp, int bits, int levels, const float *scale,
                            int per_channel, const float *bias, float *y, int nthreads) {
    gemm_job j = make_job(isa, m, k, w, n, kp, bits, levels, scale, per_channel, bias, y, &nthreads);
    /* rows padded to a whole chunk: the tiles read 64 floats per chunk */
    const int64_t kc = j.nch * 64;
    float *xp = xalloc((size_t)(m * kc) * sizeof(float));
    int64_t *toff = row_offsets(m, kc), *coff = row_offsets(j.nch, 64);
    float lut[16], lut_hi[16];
    int rc = -1;
    if (xp && toff && coff) {
        for (int64_t t = 0; t < m; t++) {
            memcpy(xp + t * kc, x + t * k, (size_t)k * sizeof(float));
            memset(xp + t * kc + k, 0, (size_t)(kc - k) * sizeof(float));
        }
        set_f32_tables(&j, lut, lut_hi);
        j.x = xp, j.toff = toff, j.coff = coff;
        parallel_for(f32_chunk, &j, job_chunks(&j), nthreads);
        rc = 0;
    }
    free(xp), free(toff), free(coff);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* fp32 activations by table lookup: no multiplications, no activation quantization           */
/* ---------------------------------------------------------------------------------------- */

/* The weight-only (fp32-activation) kernel of AVX-512 and portable machines (AVX2 machines keep
 * the FMA tiles above). LUT-GEMM / T-MAC's idea: a row's dot product with a token
 * x is a sum over groups of g consecutive weights, and a group can meet only few patterns, so
 * the sums of x over every pattern are computed once per token, and each packed weight group
 * becomes one table index and one add.
 *
 * Digits. Every code c is written as P digit planes of base D, by the level count N:
 *
 *   N = 3:        D = 3, g = 3, P = 1, digit = c            (3^3 = 27 patterns)
 *   N = 5:        D = 5, g = 2, P = 1, digit = c            (5^2 = 25 patterns)
 *   other N:      D = 2, g = 5, P = ceil(log2 N), digit p = bit p of c  (2^5 = 32 patterns)
 *
 * and a digit d stands for the signed value v(d) = d - (D - 1) / 2 (-1, 0, 1 / -2..2 / +-1/2),
 * so that the level of a weight is
 *
 *   c - (N - 1) / 2  =  sum_p 2^p v(d_p)  +  corr,    corr = (2^P - N) / 2  (0 unless D = 2
 *                                                      and N is not a power of 2; 17: 7.5)
 *
 * Tables (per token t, per group i of weights k = g i .. g i + g - 1, 32 float32 entries):
 *
 *   T[t, i, e] = sum_{q<g} v(digit q of e) * x[t, g i + q]   (e = sum_q d_q D^q; entries >= D^g
 *                                                             are 0 and never indexed)
 *
 * computed left to right (q = 0 first) in float32: every product is exact (v is 0, +-1/2, +-1
 * or +-2), so an entry is the float32 sum of g exact terms. Both paths use the same operations.
 *
 * Index layout (built once at prepare, lb_lut_pack, from the codes alone): rows in blocks of
 * 16, one uint32 per (row block, plane, word w, row) holding the indices of groups 6w .. 6w+5
 * in 5-bit fields (bits 5s .. 5s+4 = group 6w + s, bits 30-31 zero):
 *
 *     uint32 of row r, word w:  | 0 0 | e(6w+5) | e(6w+4) | ... | e(6w+1) | e(6w) |
 *                                31 30 29     25 24     20        9      5 4      0
 *
 * stored (blocks, P, W, 16) so a row block is one sequential stream; K is padded with digit-0
 * weights to G = ceil(K / g) groups, W = ceil(G / 6) words (their activations are zero, T = 0
 * there). A convolution's weight with tables per pixel is packed in segments, one a tap: each
 * tap's C channels in ceil(C / g) groups of their own, the taps' groups one after the other
 * (G = kh kw ceil(C / g)). Bits a weight: 5/3 (ternary, entropy 1.585), 5/5 x P (binary 1.0),
 * 5/2 (5 levels).
 *
 * Kernel: for 16 rows at once, `vpermt2ps` (two 16-float registers = one 32-entry table) looks
 * up the 16 rows' entries of group i from the 16 indices of a register (it reads only the 5
 * low bits of each 32-bit lane, so one shift per group selects the field), and an add
 * accumulates (every second one issued as fma(value, 1, acc): the same rounding, see
 * lut_tile_512). Per plane, each row sums its groups in order i = 0, 1, ... in float32 (a
 * convolution leaves out the groups whose taps read only zero padding: adding their zero
 * tables changes nothing but the sign of a zero sum); planes combine from the top,
 * acc = 2 acc + acc_p (exact doubling), then
 *
 *   y[t, n] = s[n] * (acc[t, n] + corr * sum_k x[t, k]) + b[n]          (float32)
 *
 * Error (u = 2^-24): every rounding is that of a float32 sum whose terms are bounded by
 * A * sum_k |x[t,k]| (g - 1 in a table entry, G - 1 along a row, P - 1 combining planes, the
 * correction, the scale and the bias), so against the exact value
 *
 *   |y - y_exact| <= (g + G + P + 4) u * |s[n]| * A * sum_k |x[t,k]| + |b[n]| u,
 *
 * G the groups of a row (above), A = (2^P - 1)(D - 1)/2 +
 * |corr| the largest |level| the digits can sum to (1/2 binary, 1 ternary, 2 for 5 levels, 3/2
 * for 4, 15/2 + 0 for 16, 31/2 + 15/2 for 17); the reference (float32 F.linear) has an error
 * of the same order in its own summation order. tests/test_kernels.py checks this bound against
 * a float64 product, and the AVX-512 and portable paths bit for bit against each other (the
 * same operations in the same order; no FMA contraction: the portable path is compiled for
 * baseline x86-64 and the table products are exact).
 */

/* A convolution's geometry (lb_conv2d's dims; hp, wp: the zero-padded image). */
typedef struct {
    int64_t b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, hp, wp;
} conv_geom;

static conv_geom geom_from(const int64_t *d) {
    conv_geom g = {d[0], d[1], d[2],  d[3],  d[4],  d[5],  d[6], d[7],
                   d[8], d[9], d[10], d[11], d[12], d[13], 0,    0};
    g.hp = g.h + 2 * g.ph, g.wp = g.w + 2 * g.pw;
    return g;
}

enum { LUT_ENTRIES = 32, LUT_GROUPS_PER_WORD = 6, LUT_ROWS = 16, LUT_FIELD = 5 };
/* tokens per work item: up to 32, fewer where the tables of a token block would leave L2 */
enum { LUT_TABLE_BUDGET = 256 * 1024 };

typedef struct {
    int base, group, planes;
    float corr;
} lut_shape;

static lut_shape lut_shape_of(int levels) {
    lut_shape s = {2, 5, 0, 0.0f};
    if (levels == 3) {
        s.base = 3, s.group = 3, s.planes = 1;
    } else if (levels == 5) {
        s.base = 5, s.group = 2, s.planes = 1;
    } else {
        while ((1 << s.planes) < levels) s.planes++;
        s.corr = (float)((1 << s.planes) - levels) / 2.0f;
    }
    return s;
}

/* Groups of g columns a segment of c columns (the last one padded), and index words a row and
 * plane of `seg` segments: the segments' groups follow one another, 6 to a word. */
static int64_t lut_groups(const lut_shape *s, int64_t c) { return (c + s->group - 1) / s->group; }

static int64_t lut_words(const lut_shape *s, int64_t k, int64_t seg) {
    const int64_t groups = seg * lut_groups(s, k / seg);
    return (groups + LUT_GROUPS_PER_WORD - 1) / LUT_GROUPS_PER_WORD;
}

/* The digit planes of `levels`: out = {D, g, P} (the header's table). */
LB_EXPORT void lb_lut_shape(int levels, int *out) {
    const lut_shape s = lut_shape_of(levels);
    out[0] = s.base, out[1] = s.group, out[2] = s.planes;
}

/* A convolution with at least this many input channels gets tables per image pixel (a tap's
 * channels are whole groups; see lut_conv); fewer channels gather patches into rows. */
enum { LUT_MIN_TAP_CHANNELS = 16 };

/* The segments of the index layout of a conv weight with `taps` taps of `c` channels: `taps`
 * (tables per pixel) or 1 (one segment of K = taps * c columns, tables per patch). */
LB_EXPORT int64_t lb_lut_segments(int64_t c, int64_t taps) {
    return c >= LUT_MIN_TAP_CHANNELS ? taps : 1;
}

/* uint32 words of the index layout of an (n, k) weight in `seg` segments of k / seg columns. */
LB_EXPORT int64_t lb_lut_size(int levels, int64_t n, int64_t k, int64_t seg) {
    const lut_shape s = lut_shape_of(levels);
    return (n + LUT_ROWS - 1) / LUT_ROWS * s.planes * lut_words(&s, k, seg) * LUT_ROWS;
}

/* codes (n, k) uint8 -> the index layout (lb_lut_size words). Column kk is channel kk % c of
 * segment kk / c (c = k / seg), which starts a group of its own: segment j's groups are
 * j * gs + (0 .. gs - 1), gs = ceil(c / g), the last one padded with digit-0 weights. */
LB_EXPORT void lb_lut_pack(const uint8_t *codes, int64_t n, int64_t k, int levels, int64_t seg,
                           uint32_t *out) {
    const lut_shape s = lut_shape_of(levels);
    const int64_t c = k / seg, gs = lut_groups(&s, c), W = lut_words(&s, k, seg);
    const int64_t block = s.planes * W * LUT_ROWS;
    memset(out, 0, (size_t)lb_lut_size(levels, n, k, seg) * sizeof(uint32_t));
    for (int64_t r = 0; r < n; r++)
        for (int p = 0; p < s.planes; p++) {
            uint32_t *o = out + (r / LUT_ROWS) * block + p * W * LUT_ROWS + r % LUT_ROWS;
            for (int64_t j = 0; j < seg; j++)
                for (int64_t i = 0; i * s.group < c; i++) {
                    const uint8_t *cr = codes + r * k + j * c + i * s.group;
                    uint32_t e = 0, mul = 1;
                    for (int q = 0; q < s.group && i * s.group + q < c; q++) {
                        e += (s.base == 2 ? (cr[q] >> p) & 1u : cr[q]) * mul;
                        mul *= (uint32_t)s.base;
                    }
                    const int64_t gi = j * gs + i;
                    o[(gi / LUT_GROUPS_PER_WORD) * LUT_ROWS] |=
                        e << (LUT_FIELD * (gi % LUT_GROUPS_PER_WORD));
                }
        }
}

/* The digit values of every entry: L[q * 32 + e] = v(digit q of e), 0 for e >= D^g. */
static void lut_digit_values(const lut_shape *s, float *L) {
    int patterns = 1;
    for (int q = 0; q < s->group; q++) patterns *= s->base;
    for (int q = 0, div = 1; q < s->group; q++, div *= s->base)
        for (int e = 0; e < LUT_ENTRIES; e++)
            L[q * LUT_ENTRIES + e] =
                e < patterns ? (float)((e / div) % s->base) - (float)(s->base - 1) / 2.0f : 0.0f;
}

/* Tables of one token: x (G * g floats, zero-padded) -> tab (G, 32). */
T512 static void lut_tables_512(const float *x, int64_t groups, int g, const float *L, float *tab) {
    __m512 lo[5], hi[5];
    for (int q = 0; q < g; q++)
        lo[q] = _mm512_loadu_ps(L + q * 32), hi[q] = _mm512_loadu_ps(L + q * 32 + 16);
    for (int64_t i = 0; i < groups; i++) {
        const float *xi = x + i * g;
        __m512 a = _mm512_mul_ps(lo[0], _mm512_set1_ps(xi[0]));
        __m512 b = _mm512_mul_ps(hi[0], _mm512_set1_ps(xi[0]));
        for (int q = 1; q < g; q++) {
            const __m512 v = _mm512_set1_ps(xi[q]);
            a = _mm512_fmadd_ps(lo[q], v, a); /* the product is exact: fma rounds as an add */
            b = _mm512_fmadd_ps(hi[q], v, b);
        }
        _mm512_storeu_ps(tab + i * 32, a);
        _mm512_storeu_ps(tab + i * 32 + 16, b);
    }
}

static void lut_tables_generic(const float *x, int64_t groups, int g, const float *L, float *tab) {
    for (int64_t i = 0; i < groups; i++)
        for (int e = 0; e < LUT_ENTRIES; e++) {
            float a = L[e] * x[i * g];
            for (int q = 1; q < g; q++) a += L[q * LUT_ENTRIES + e] * x[i * g + q];
            tab[i * 32 + e] = a;
        }
}

/* What a tile walks: the row blocks' index words (block words a row block, W a plane) and
 * the words to visit, [vr[2q], vr[2q+1]) for q < nvr, group i's table at a token's tables +
 * goff[i]. A linear layer visits all W words; a convolution skips the words whose taps fall in
 * the zero padding for every token of the tile (their tables are zero: adding them changes no
 * sum but the sign of a zero, which the epilogue's + off turns into +0 either way). */
typedef struct {
    int64_t block, W;
    int planes, nvr;
    const int64_t *goff, *vr;
} lut_walk;

/* out[(t * R + r) * 16 + lane] = sum over planes and groups of row block r, token t.
 *
 * Tiles of R row blocks x T tokens: each group loads T tables (2 registers each) and shifts R
 * index registers, then does R * T lookups. Half of the accumulations are issued as
 * fma(value, 1, acc), which rounds as the add does (value * 1 is exact) but runs on the
 * multiply pipes, where the adds otherwise compete with the permutes. Measured on Zen 4, one
 * core, cvnn2's five 3x3 convolutions at batch 1 (lut_conv, ms, two runs): 4x2 with the fma
 * 4.30-4.46, 4x2 adds only 5.60-5.71, 8x2 4.63-4.95, 3x2 4.94, 6x2 5.90-6.23 (one register
 * too many: spills); the former 4x4 tiles (adds only) 4.87 on the same layers. A loop of
 * permute + add alone runs at 0.38 ns a lookup on that core; the 4x2 tile at 0.42-0.45, the
 * shifts hidden (0.42 without them). One token (8x1) measured 0.46. */
LB_INLINE T512 void lut_tile_512(const uint32_t *w, const lut_walk *k, const float *const *tab,
                                 const int R, const int T, float *out) {
    const int64_t block = k->block, W = k->W, *goff = k->goff;
    const int planes = k->planes;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int p = planes - 1; p >= 0; p--) {
        __m512 acc[8][2];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 2
            for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
        const uint32_t *wp = w + p * W * LUT_ROWS;
        for (int q = 0; q < k->nvr; q++)
        for (int64_t v = k->vr[2 * q]; v < k->vr[2 * q + 1]; v++) {
            __m512i idx[8];
#pragma GCC unroll 8
            for (int r = 0; r < R; r++)
                idx[r] = _mm512_loadu_si512(wp + r * block + v * LUT_ROWS);
#pragma GCC unroll 6
            for (int s = 0; s < LUT_GROUPS_PER_WORD; s++) {
                __m512 lo[2], hi[2];
#pragma GCC unroll 2
                for (int t = 0; t < T; t++) {
                    const float *tg = tab[t] + goff[v * LUT_GROUPS_PER_WORD + s];
                    lo[t] = _mm512_loadu_ps(tg), hi[t] = _mm512_loadu_ps(tg + 16);
                }
#pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    const __m512i e = _mm512_srli_epi32(idx[r], LUT_FIELD * s);
#pragma GCC unroll 2
                    for (int t = 0; t < T; t++) {
                        const __m512 val = _mm512_permutex2var_ps(lo[t], e, hi[t]);
                        acc[r][t] = (r * T + t) & 1 ? _mm512_fmadd_ps(val, one, acc[r][t])
                                                    : _mm512_add_ps(acc[r][t], val);
                    }
                }
            }
        }
#pragma GCC unroll 2
        for (int t = 0; t < T; t++)
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                float *o = out + (t * R + r) * LUT_ROWS;
                __m512 v = acc[r][t];
                if (p < planes - 1) v = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(o),
                                                                    _mm512_loadu_ps(o)), v);
                _mm512_storeu_ps(o, v);
            }
    }
}

/* The tile shapes lut_chunk asks for (R row blocks x T tokens): 8x1 (one token), 4x2, and
 * single row blocks for the rest; one function each, so that each gets its own registers. */
#define DEF_LUT_TILE(R, T)                                                                       \
    __attribute__((noinline)) T512 static void lut_tile_##R##x##T(                               \
        const uint32_t *w, const lut_walk *k, const float *const *tab, float *out) {             \
        lut_tile_512(w, k, tab, R, T, out);                                                      \
    }
DEF_LUT_TILE(8, 1)
DEF_LUT_TILE(4, 1)
DEF_LUT_TILE(4, 2)
DEF_LUT_TILE(1, 2)
DEF_LUT_TILE(1, 1)

static void lut_tiles_512(const uint32_t *w, const lut_walk *k, const float *const *tab, int R,
                          int T, float *out) {
    if (R == 8 && T == 1) lut_tile_8x1(w, k, tab, out);
    else if (R == 4 && T == 1) lut_tile_4x1(w, k, tab, out);
    else if (R == 4 && T == 2) lut_tile_4x2(w, k, tab, out);
    else if (R == 1 && T == 2) lut_tile_1x2(w, k, tab, out);
    else lut_tile_1x1(w, k, tab, out);
}

/* The same sums in the same order, one lane at a time. */
static void lut_tiles_generic(const uint32_t *w, const lut_walk *k, const float *const *tab,
                              int R, int T, float *out) {
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R * LUT_ROWS; r++) {
            float total = 0.0f;
            for (int p = k->planes - 1; p >= 0; p--) {
                const uint32_t *wr =
                    w + (r / LUT_ROWS) * k->block + p * k->W * LUT_ROWS + r % LUT_ROWS;
                float a = 0.0f;
                for (int q = 0; q < k->nvr; q++)
                    for (int64_t v = k->vr[2 * q]; v < k->vr[2 * q + 1]; v++) {
                        const uint32_t word = wr[v * LUT_ROWS];
                        const int64_t *go = k->goff + v * LUT_GROUPS_PER_WORD;
                        for (int s = 0; s < LUT_GROUPS_PER_WORD; s++)
                            a += tab[t][go[s] + ((word >> (LUT_FIELD * s)) & 31u)];
                    }
                total = p == k->planes - 1 ? a : (total + total) + a;
            }
            out[(t * R + r / LUT_ROWS) * LUT_ROWS + r % LUT_ROWS] = total;
        }
}

typedef struct {
    int isa;
    lut_shape sh;
    float L[5 * LUT_ENTRIES];
    int64_t m, n, k, W, block, nblocks;
    const uint32_t *w;
    const float *scale, *bias;
    int per_channel;
    float *y;
    const float *x;             /* token t, chunk c (64 floats) at x + toff[t] + coff[c] */
    const int64_t *toff, *coff;
    int64_t nch;
    int64_t tokens_per_chunk, token_chunks, blocks_per_chunk;
    int64_t tab_floats, row_floats; /* a token's tables (W * 6 * 32), its padded row (W*6*g) */
    const int64_t *goff;            /* group i's table at a token's tables + goff[i] (floats) */
    /* tables built per chunk (linear, gathered patches): per-thread slots of tables, a row,
     * token sums, and the token block a slot holds (-1: none) */
    int nslots;
    float *tabs, *rows, *sums;
    int64_t *owner;
    /* or prebuilt (lut_conv): token t's tables at fixed + ttab[t], its sum of x tsum[t]; the
     * convolution's geometry (its taps are groups [tap * gs, (tap + 1) * gs)) */
    const float *fixed, *tsum;
    const int64_t *ttab;
    const conv_geom *geom;
    int64_t gs;
    const uint64_t *rect; /* token t's taps inside the image (lut_rect) */
    const int64_t *order; /* the tokens in the order visited: sorted by rect */
} lut_job;

static int worker_slot(int nslots) {
#ifdef _OPENMP
    const int id = omp_get_thread_num();
    return id < nslots ? id : 0; /* a serial loop (nested call) runs on one thread only */
#else
    (void)nslots;
    return 0;
#endif
}

/* The tables of tokens t0 .. t1-1 into a slot (and each token's sum of x when corr != 0). */
static void lut_build(const lut_job *j, int slot, int64_t t0, int64_t t1) {
    float *row = j->rows + slot * j->row_floats;
    const int64_t groups = j->W * LUT_GROUPS_PER_WORD;
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t c = 0; c < j->nch; c++) {
            const int64_t len = j->k - 64 * c < 64 ? j->k - 64 * c : 64;
            memcpy(row + 64 * c, j->x + j->toff[t] + j->coff[c], (size_t)len * sizeof(float));
        }
        memset(row + j->k, 0, (size_t)(j->row_floats - j->k) * sizeof(float));
        float *tab = j->tabs + (slot * j->tokens_per_chunk + (t - t0)) * j->tab_floats;
        if (j->isa == ISA_AVX512) lut_tables_512(row, groups, j->sh.group, j->L, tab);
        else lut_tables_generic(row, groups, j->sh.group, j->L, tab);
        float sx = 0.0f;
        if (j->sh.corr != 0.0f)
            for (int64_t i = 0; i < j->k; i++) sx += row[i];
        j->sums[slot * j->tokens_per_chunk + (t - t0)] = sx;
    }
}

/* y[row0 + i] = s * (acc[i] + off) + b for the rows i < 16 of one block that exist: a float32
 * add, multiply and add, each rounded (never fused: the portable path has no FMA; the
 * intrinsics with an explicit rounding mode are never contracted by the compiler). */
T512 static void lut_store_512(const lut_job *j, const float *acc, float off, int64_t row0,
                               float *y) {
    const int64_t left = j->n - row0;
    const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
    const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 s = j->per_channel ? _mm512_maskz_loadu_ps(m, j->scale + row0)
                                    : _mm512_set1_ps(j->scale[0]);
    __m512 v = _mm512_add_round_ps(_mm512_loadu_ps(acc), _mm512_set1_ps(off), rn);
    v = _mm512_mul_round_ps(s, v, rn);
    if (j->bias) v = _mm512_add_round_ps(v, _mm512_maskz_loadu_ps(m, j->bias + row0), rn);
    _mm512_mask_storeu_ps(y + row0, m, v);
}

static void lut_store(const lut_job *j, const float *acc, float off, int64_t row0, float *y) {
    if (j->isa == ISA_AVX512) {
        lut_store_512(j, acc, off, row0, y);
        return;
    }
    for (int64_t i = 0; i < LUT_ROWS && row0 + i < j->n; i++) {
        const float v = j->scale[j->per_channel ? row0 + i : 0] * (acc[i] + off);
        y[row0 + i] = j->bias ? v + j->bias[row0 + i] : v;
    }
}

/* Valid kernel offsets of an output coordinate: taps i in [*i0, *i1) read inside the image
 * (o * stride - pad + i * dil in [0, size)); the others read the zero padding. */
static void lut_valid_taps(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t size,
                           int64_t taps, int64_t *i0, int64_t *i1) {
    int64_t lo = taps, hi = 0;
    for (int64_t i = 0; i < taps; i++) {
        const int64_t at = o * stride - pad + i * dil;
        if (at >= 0 && at < size) lo = i < lo ? i : lo, hi = i + 1;
    }
    *i0 = lo < hi ? lo : 0, *i1 = hi;
}

/* The taps of token t of a convolution that read inside the image, as one number: kernel rows
 * [i0, i1) x columns [c0, c1) packed in 16-bit fields (tokens with the same rectangle can share
 * a tile and its skipped taps). */
static uint64_t lut_rect(const lut_job *j, int64_t t) {
    const conv_geom *g = j->geom;
    const int64_t rem = t % (g->ho * g->wo);
    int64_t a, b, c, d;
    lut_valid_taps(rem / g->wo, g->sh, g->ph, g->dh, g->h, g->kh, &a, &b);
    lut_valid_taps(rem % g->wo, g->sw, g->pw, g->dw, g->w, g->kw, &c, &d);
    return (uint64_t)a | (uint64_t)b << 16 | (uint64_t)c << 32 | (uint64_t)d << 48;
}

/* The word ranges of a convolution token with the tap rectangle `rect` (lut_rect): the words
 * holding a group of a tap inside the image, one range a kernel row, ranges that meet merged
 * (one range over them all beyond 16 rows). Returns the count. */
static int lut_tap_words(const lut_job *j, uint64_t rect, int64_t *vr) {
    const int64_t i0 = rect & 0xffff, i1 = rect >> 16 & 0xffff, c0 = rect >> 32 & 0xffff,
                  c1 = rect >> 48, kw = j->geom->kw, G = LUT_GROUPS_PER_WORD;
    if (c0 >= c1 || i0 >= i1) return 0;
    if (i1 - i0 > 16) { /* more kernel rows than ranges: one range over them all */
        vr[0] = i0 * kw * j->gs / G, vr[1] = (((i1 - 1) * kw + c1) * j->gs + G - 1) / G;
        return 1;
    }
    int n = 0;
    for (int64_t r = i0; r < i1; r++) {
        const int64_t v0 = (r * kw + c0) * j->gs / G;
        const int64_t v1 = ((r * kw + c1) * j->gs + G - 1) / G;
        if (n && v0 <= vr[2 * n - 1]) vr[2 * n - 1] = v1; /* shares a word with the last range */
        else vr[2 * n] = v0, vr[2 * n + 1] = v1, n++;
    }
    return n;
}

static void lut_chunk(const void *ctx, int64_t chunk) {
    const lut_job *j = ctx;
    const int64_t tc = chunk % j->token_chunks, bc = chunk / j->token_chunks;
    const int64_t t0 = tc * j->tokens_per_chunk;
    const int64_t t1 = t0 + j->tokens_per_chunk < j->m ? t0 + j->tokens_per_chunk : j->m;
    const int64_t b0 = bc * j->blocks_per_chunk;
    const int64_t b1 = b0 + j->blocks_per_chunk < j->nblocks ? b0 + j->blocks_per_chunk : j->nblocks;
    const float *tabs = NULL, *sums = NULL;
    if (!j->fixed) {
        const int slot = worker_slot(j->nslots);
        if (j->owner[slot] != tc) {
            lut_build(j, slot, t0, t1);
            j->owner[slot] = tc;
        }
        tabs = j->tabs + slot * j->tokens_per_chunk * j->tab_floats;
        sums = j->sums + slot * j->tokens_per_chunk;
    }
    float out[8 * LUT_ROWS];
    for (int64_t b = b0; b < b1;) {
        /* tiles (row blocks x tokens): 8x1 / 4x1 for a lone token, 4x2 for pairs, 1x2 / 1x1
         * for the row blocks left over (portable: 1x1, the same sums in the same order) */
        const int R = j->isa != ISA_AVX512 ? 1 : (b1 - b >= 8 ? 8 : (b1 - b >= 4 ? 4 : 1));
        for (int64_t t = t0; t < t1;) {
            /* a convolution visits its tokens sorted by tap rectangle (j->order) and pairs
             * those whose patches meet the padding alike (the tile skips the taps they read
             * there); a token whose rectangle differs from the next one's goes alone */
            const int64_t tok[2] = {j->order ? j->order[t] : t,
                                    t + 1 < t1 ? (j->order ? j->order[t + 1] : t + 1) : 0};
            const int T = j->isa == ISA_AVX512 && t1 - t >= 2 &&
                                  (!j->geom || j->rect[tok[0]] == j->rect[tok[1]])
                              ? 2
                              : 1;
            const int RR = T == 2 ? (R >= 4 ? 4 : 1) : R;
            int64_t vr[2 * 16];
            lut_walk walk = {j->block, j->W, j->sh.planes, 1, j->goff, vr};
            vr[0] = 0, vr[1] = j->W;
            if (j->geom) walk.nvr = lut_tap_words(j, j->rect[tok[0]], vr);
            for (int64_t bb = b; bb < b + R; bb += RR) {
                const float *tab[2];
                for (int i = 0; i < T; i++)
                    tab[i] = j->fixed ? j->fixed + j->ttab[tok[i]]
                                      : tabs + (t - t0 + i) * j->tab_floats;
                const uint32_t *w = j->w + bb * j->block;
                if (j->isa == ISA_AVX512) lut_tiles_512(w, &walk, tab, RR, T, out);
                else lut_tiles_generic(w, &walk, tab, RR, T, out);
                for (int i = 0; i < T; i++) {
                    const float sx = j->fixed ? j->tsum[tok[i]] : sums[t - t0 + i];
                    const float off = j->sh.corr != 0.0f ? j->sh.corr * sx : 0.0f;
                    for (int r = 0; r < RR; r++)
                        lut_store(j, out + (i * RR + r) * LUT_ROWS, off, (bb + r) * LUT_ROWS,
                                  j->y + tok[i] * j->n);
                }
            }
            t += T;
        }
        b += R;
    }
}

/* The job's shape: weight, output, words, token blocks and row-block chunks (m tokens). */
static lut_job lut_setup(int isa, int64_t m, int64_t k, int64_t seg, const uint32_t *w,
                         int64_t n, int levels, const float *scale, int per_channel,
                         const float *bias, float *y, int *nthreads) {
    lut_job j;
    memset(&j, 0, sizeof j);
    j.isa = isa == ISA_AVX512 ? ISA_AVX512 : ISA_PORTABLE;
    j.sh = lut_shape_of(levels);
    lut_digit_values(&j.sh, j.L);
    j.m = m, j.n = n, j.k = k, j.w = w, j.scale = scale, j.bias = bias, j.y = y;
    j.per_channel = per_channel;
    j.nch = (k + 63) / 64;
    j.W = lut_words(&j.sh, k, seg);
    j.block = j.sh.planes * j.W * LUT_ROWS;
    j.nblocks = (n + LUT_ROWS - 1) / LUT_ROWS;
    j.tab_floats = j.W * LUT_GROUPS_PER_WORD * LUT_ENTRIES;
    j.row_floats = j.W * LUT_GROUPS_PER_WORD * j.sh.group;
    if (j.row_floats < j.nch * 64) j.row_floats = j.nch * 64;
    if ((double)m * (double)n * (double)k < 2.0e5) *nthreads = 1;
    int64_t tb = LUT_TABLE_BUDGET / ((j.tab_floats + 1) * (int64_t)sizeof(float));
    tb = tb < 4 ? 4 : (tb > MAX_CHUNK_TOKENS ? MAX_CHUNK_TOKENS : tb & ~(int64_t)3);
    j.tokens_per_chunk = m < tb ? (m > 0 ? m : 1) : tb;
    j.token_chunks = (m + j.tokens_per_chunk - 1) / j.tokens_per_chunk;
    int64_t block_chunks = (4 * (int64_t)*nthreads + j.token_chunks - 1) / j.token_chunks;
    block_chunks = block_chunks < 1 ? 1 : (block_chunks > j.nblocks ? j.nblocks : block_chunks);
    j.blocks_per_chunk = (j.nblocks + block_chunks - 1) / block_chunks;
    return j;
}

static void lut_go(lut_job *j, int nthreads) {
    const int64_t nb = (j->nblocks + j->blocks_per_chunk - 1) / j->blocks_per_chunk;
    parallel_for(lut_chunk, j, j->token_chunks * nb, nthreads);
}

/* Group i's table at 32 i: a token's tables one after the other. */
static int64_t *lut_group_offsets(int64_t W) {
    return row_offsets(W * LUT_GROUPS_PER_WORD, LUT_ENTRIES);
}

/* The lookup-table GEMM over activations addressed as toff/coff (token rows, or gathered patch
 * rows), tables built per token block in per-thread slots. Returns 0, or -1 when out of
 * memory. */
static int lut_run(int isa, const float *x, const int64_t *toff, const int64_t *coff, int64_t m,
                   int64_t k, const uint32_t *w, int64_t n, int levels, const float *scale,
                   int per_channel, const float *bias, float *y, int nthreads) {
    if (m <= 0 || n <= 0) return 0;
    lut_job j = lut_setup(isa, m, k, 1, w, n, levels, scale, per_channel, bias, y, &nthreads);
    j.x = x, j.toff = toff, j.coff = coff;
    j.nslots = nthreads > 0 ? nthreads : 1;
    j.tabs = xalloc((size_t)(j.nslots * j.tokens_per_chunk * j.tab_floats) * sizeof(float));
    j.rows = xalloc((size_t)(j.nslots * j.row_floats) * sizeof(float));
    j.sums = xalloc((size_t)(j.nslots * j.tokens_per_chunk) * sizeof(float));
    j.owner = xalloc((size_t)j.nslots * sizeof(int64_t));
    int64_t *goff = lut_group_offsets(j.W);
    int rc = -1;
    if (j.tabs && j.rows && j.sums && j.owner && goff) {
        for (int i = 0; i < j.nslots; i++) j.owner[i] = -1;
        j.goff = goff;
        lut_go(&j, nthreads);
        rc = 0;
    }
    free(j.tabs), free(j.rows), free(j.sums), free(j.owner), free(goff);
    return rc;
}

/* y (m, n) = x (m, k) W^T + b with W in the index layout of lb_lut_pack. isa: AVX-512 or
 * portable (any other runs the portable loop). Returns 0, or -1 when out of memory. */
LB_EXPORT int lb_linear_lut(int isa, const float *x, int64_t m, int64_t k, const uint32_t *w,
                            int64_t n, int levels, const float *scale, int per_channel,
                            const float *bias, float *y, int nthreads) {
    const int64_t nch = (k + 63) / 64;
    int64_t *toff = row_offsets(m, k), *coff = row_offsets(nch, 64);
    int rc = -1;
    if (toff && coff)
        rc = lut_run(isa, x, toff, coff, m, k, w, n, levels, scale, per_channel, bias, y, nthreads);
    free(toff), free(coff);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Convolution: NHWC input, weight columns in (kernel row, kernel column, channel) order      */
/* ---------------------------------------------------------------------------------------- */

/* x is a dense NHWC float32 tensor (B, H, W, C) (a channels-last NCHW tensor); the weight was
 * packed from codes (N_out, kh * kw * C) with column (i * kw + j) * C + c for tap (i, j) and
 * channel c. Output token t = (b, oy, ox) of y (B * Ho * Wo, N_out) = NHWC.
 *
 * C a multiple of 64 ("direct"): the input is copied once into a zero-padded NHWC image
 * (B, Hp, Wp, C), Hp = H + 2 ph, Wp = W + 2 pw, int8 or float32, and every chunk of 64 columns
 * (tap (i, j), channels 64 cb .. 64 cb + 63) of token t is read in place at
 *   toff[t] = ((b * Hp + oy * sh) * Wp + ox * sw) * C,   coff = (i * dh * Wp + j * dw) * C + 64 cb.
 * Otherwise (few channels, e.g. an RGB input) the patches are gathered once into rows of whole
 * 64-column chunks (im2col in the same column order).
 *
 * int8: one multiplier per image (the per-sample absmax of QuantConv2d's absmax8 input,
 *   a[b] = 127 / max_{c,y,x} |x[b]|), so every patch of image b holds integers of one scale and
 *   the dot products stay exact; a token's sum of q (the offset term) comes from per-chunk sums
 *   taken while quantizing. */
/* The input copy of a convolution: the padded image (direct) or the patch rows (im2col). */
typedef struct {
    int isa, int8;
    conv_geom g;
    const float *x;
    const float *a;     /* int8: per-image multiplier */
    const int8_t *qimg; /* int8 im2col: the quantized NHWC image */
    void *buf;          /* direct: padded image; im2col: rows of kc */
    int32_t *sums;      /* int8 direct: per-chunk sums; im2col: per-token sums */
    int64_t kc, per_chunk, count;
} conv_fill_job;

/* Direct: input row (b, y) of the padded image, quantized (with its 64-channel sums) or copied. */
static void fill_padded_chunk(const void *ctx, int64_t chunk) {
    const conv_fill_job *f = ctx;
    const conv_geom *g = &f->g;
    const int64_t r1 = (chunk + 1) * f->per_chunk < f->count ? (chunk + 1) * f->per_chunk : f->count;
    for (int64_t r = chunk * f->per_chunk; r < r1; r++) {
        const int64_t b = r / g->h, y = r % g->h;
        const float *src = f->x + r * g->w * g->c;
        const int64_t dst0 = ((b * g->hp + y + g->ph) * g->wp + g->pw) * g->c;
        if (!f->int8) {
            memcpy((float *)f->buf + dst0, src, (size_t)(g->w * g->c) * sizeof(float));
            continue;
        }
        int8_t *dst = (int8_t *)f->buf + dst0;
        quantize_span(f->isa, src, g->w * g->c, f->a[b], dst);
        for (int64_t i = 0; i < g->w * g->c; i += 64) {
            int32_t sum = 0;
            for (int64_t e = i; e < i + 64; e++) sum += dst[e];
            f->sums[(dst0 + i) / 64] = sum;
        }
    }
}

/* im2col: token rows of kc elements, column (i * kw + j) * C + c, zero outside the image,
 * gathered from `src` (the NHWC input, or for int8 the image already quantized to NHWC int8);
 * for int8 also the token's sum of q. */
static void fill_rows_chunk(const void *ctx, int64_t chunk) {
    const conv_fill_job *f = ctx;
    const conv_geom *g = &f->g;
    const int64_t t1 = (chunk + 1) * f->per_chunk < f->count ? (chunk + 1) * f->per_chunk : f->count;
    const size_t esize = f->int8 ? 1 : sizeof(float);
    const char *src = f->int8 ? (const char *)f->qimg : (const char *)f->x;
    for (int64_t t = chunk * f->per_chunk; t < t1; t++) {
        const int64_t b = t / (g->ho * g->wo), rem = t % (g->ho * g->wo);
        const int64_t oy = rem / g->wo, ox = rem % g->wo;
        char *row = (char *)f->buf + (size_t)(t * f->kc) * esize;
        memset(row, 0, (size_t)f->kc * esize);
        for (int64_t i = 0; i < g->kh; i++) {
            const int64_t y = oy * g->sh - g->ph + i * g->dh;
            if (y < 0 || y >= g->h) continue;
            for (int64_t jj = 0; jj < g->kw; jj++) {
                const int64_t xx = ox * g->sw - g->pw + jj * g->dw;
                if (xx < 0 || xx >= g->w) continue;
                memcpy(row + (size_t)((i * g->kw + jj) * g->c) * esize,
                       src + (size_t)(((b * g->h + y) * g->w + xx) * g->c) * esize,
                       (size_t)g->c * esize);
            }
        }
        if (f->int8) {
            int32_t s = 0;
            for (int64_t i = 0; i < f->kc; i++) s += ((const int8_t *)row)[i];
            f->sums[t] = s;
        }
    }
}

static void run_fill(chunk_fn fn, conv_fill_job *f, int64_t count, int nthreads) {
    f->count = count;
    f->per_chunk = (count + 4 * nthreads - 1) / (4 * nthreads);
    if (f->per_chunk < 1) f->per_chunk = 1;
    parallel_for(fn, f, (count + f->per_chunk - 1) / f->per_chunk, nthreads);
}

/* fp32 convolution by lookup tables, C_in >= LUT_MIN_TAP_CHANNELS: a patch's group of g channels
 * of tap (i, j) is a group of one pixel of the image, so the tables are built once per pixel of
 * the zero-padded NHWC image (each tap's channels in gs = ceil(C / g) whole groups, lb_lut_pack
 * with one segment a tap) rather than once per patch: kh * kw times fewer tables. Token
 * t = (b, oy, ox) reads its group i (tap (ti, tj) = i / gs) at the tables of pixel
 * (b, oy sh + ti dh, ox sw + tj dw):
 *   ttab[t] = pixel(b, oy sh, ox sw) * gpp * 32,   goff[i] = ((ti dh Wp + tj dw) gpp + i % gs) 32
 * gpp = gs + 1 tables a pixel, the last one zeros: the groups that pad the last index word
 * (i >= kh kw gs) read it at goff = gs * 32.
 *
 * The tables are built band by band: output rows oy0 .. oy1-1 of an image read the padded rows
 * [oy0 sh, (oy1 - 1) sh + (kh - 1) dh + 1), whose tables go into a window of about
 * LUT_CONV_WINDOW bytes (pixel offsets above count from the window's first row), and the
 * band's tokens are computed from it at once. The tables are thus read from L2 right after
 * they were written, and one small buffer is written over and over, where tables for a whole
 * image (5 MB for cvnn2's 128-channel 28x28 layer) went out to L3 or memory and came back;
 * the rows two bands share are built twice. Measured on Zen 4, one core, cvnn2's 3x3 layers
 * with a 64 MB write between calls (caches cold, as inside a model): 128 channels at 28x28
 * 1.50-1.69 ms with tables for the whole image, 1.36-1.39 in bands (2 rows a band here);
 * the five layers 5.05-5.49 ms against 4.91-5.09. Bands of 2 to 4 rows measured alike, a band
 * of 1 row (3x the table builds) or of the whole image slower, so at least 2 rows a band. */
enum { LUT_CONV_WINDOW = 768 << 10 };

typedef struct {
    const lut_job *j;
    const conv_geom *g;
    const float *img; /* the image (H, W, C), read as its zero-padded (Hp, Wp, C) */
    int64_t y0, gs, per_chunk, count; /* pixels p of the padded rows from y0 */
    float *tabs, *psum; /* per pixel: gs + 1 tables, the sum of its channels (corr != 0) */
} lut_pixel_job;

static void lut_pixel_chunk(const void *ctx, int64_t chunk) {
    const lut_pixel_job *f = ctx;
    const lut_job *j = f->j;
    const int64_t p1 = (chunk + 1) * f->per_chunk < f->count ? (chunk + 1) * f->per_chunk : f->count;
    const conv_geom *g = f->g;
    const int64_t width = f->gs * j->sh.group;
    float *row = xalloc((size_t)width * sizeof(float));
    if (!row) return; /* lut_conv checks every pixel's mark below */
    memset(row + g->c, 0, (size_t)(width - g->c) * sizeof(float));
    for (int64_t p = chunk * f->per_chunk; p < p1; p++) {
        const int64_t yy = f->y0 + p / g->wp - g->ph, xx = p % g->wp - g->pw;
        float *tab = f->tabs + p * (f->gs + 1) * LUT_ENTRIES;
        f->psum[p] = 0.0f;
        if (yy < 0 || yy >= g->h || xx < 0 || xx >= g->w) { /* padding: zero tables */
            memset(tab, 0, (size_t)((f->gs + 1) * LUT_ENTRIES) * sizeof(float));
            continue;
        }
        memcpy(row, f->img + (yy * g->w + xx) * g->c, (size_t)g->c * sizeof(float));
        if (j->isa == ISA_AVX512) lut_tables_512(row, f->gs, j->sh.group, j->L, tab);
        else lut_tables_generic(row, f->gs, j->sh.group, j->L, tab);
        memset(tab + f->gs * LUT_ENTRIES, 0, LUT_ENTRIES * sizeof(float));
        float sx = 0.0f;
        if (j->sh.corr != 0.0f)
            for (int64_t i = 0; i < g->c; i++) sx += row[i];
        f->psum[p] = sx;
    }
    free(row);
}

/* Tokens sorted by tap rectangle (then index: the interior stays in raster order). */
typedef struct {
    uint64_t rect;
    int64_t t;
} lut_token;

static int lut_token_cmp(const void *a, const void *b) {
    const lut_token *x = a, *y = b;
    if (x->rect != y->rect) return x->rect < y->rect ? -1 : 1;
    return (x->t > y->t) - (x->t < y->t);
}

static int lut_conv(int isa, const float *x, conv_geom g, const uint32_t *lut, int64_t n,
                    int levels, const float *scale, int per_channel, const float *bias, float *y,
                    int nthreads) {
    const int64_t taps = g.kh * g.kw, k = taps * g.c, outs = g.ho * g.wo;
    int nt = nthreads;
    lut_job j = lut_setup(isa, outs, k, taps, lut, n, levels, scale, per_channel, bias, y, &nt);
    const int64_t gs = lut_groups(&j.sh, g.c), gpp = gs + 1;
    /* rows of the padded image one output row reads; output rows a band (the window's size) */
    const int64_t span = (g.kh - 1) * g.dh + 1;
    const int64_t row_bytes = g.wp * gpp * LUT_ENTRIES * (int64_t)sizeof(float);
    int64_t band = (LUT_CONV_WINDOW / row_bytes - span) / g.sh + 1;
    band = band < 2 ? 2 : band; /* one row a band would build every row kh / sh times */
    band = band > g.ho ? g.ho : band;
    const int64_t wrows = (band - 1) * g.sh + span, tokens = band * g.wo;
    float *tabs = xalloc((size_t)(wrows * row_bytes) + 64);
    float *psum = xalloc((size_t)(wrows * g.wp) * sizeof(float) + 64);
    float *tsum = xalloc((size_t)tokens * sizeof(float) + 64);
    int64_t *ttab = xalloc((size_t)tokens * sizeof(int64_t) + 64);
    int64_t *goff = xalloc((size_t)(j.W * LUT_GROUPS_PER_WORD) * sizeof(int64_t) + 64);
    uint64_t *rect = xalloc((size_t)tokens * sizeof(uint64_t) + 64);
    int64_t *order = xalloc((size_t)tokens * sizeof(int64_t) + 64);
    lut_token *sorted = xalloc((size_t)tokens * sizeof(lut_token) + 64);
    int rc = -1;
    if (!tabs || !psum || !tsum || !ttab || !goff || !rect || !order || !sorted) goto done;
    for (int64_t i = 0; i < j.W * LUT_GROUPS_PER_WORD; i++) {
        const int64_t tap = i / gs, ti = tap / g.kw, tj = tap % g.kw;
        goff[i] = (i < taps * gs ? (ti * g.dh * g.wp + tj * g.dw) * gpp + i % gs : gs) *
                  LUT_ENTRIES;
    }
    for (int64_t b = 0; b < g.b; b++) {
        const float *img = x + b * g.h * g.w * g.c;
        for (int64_t oy0 = 0; oy0 < g.ho; oy0 += band) {
            const int64_t oy1 = oy0 + band < g.ho ? oy0 + band : g.ho, y0 = oy0 * g.sh;
            const int64_t rows = (oy1 - 1) * g.sh + span - y0, m = (oy1 - oy0) * g.wo;
            memset(psum, 0xff, (size_t)(rows * g.wp) * sizeof(float)); /* NaN: not built */
            lut_pixel_job pj = {&j, &g, img, y0, gs, 0, rows * g.wp, tabs, psum};
            pj.per_chunk = (pj.count + 4 * nthreads - 1) / (4 * nthreads);
            pj.per_chunk = pj.per_chunk < 1 ? 1 : pj.per_chunk;
            parallel_for(lut_pixel_chunk, &pj, (pj.count + pj.per_chunk - 1) / pj.per_chunk,
                         nthreads);
            for (int64_t p = 0; p < rows * g.wp; p++)
                if (psum[p] != psum[p]) goto done; /* a chunk could not allocate its row */
            for (int64_t t = 0; t < m; t++) {
                const int64_t oy = oy0 + t / g.wo, ox = t % g.wo;
                const int64_t pix = (oy * g.sh - y0) * g.wp + ox * g.sw;
                ttab[t] = pix * gpp * LUT_ENTRIES;
                float s = 0.0f;
                if (j.sh.corr != 0.0f)
                    for (int64_t tap = 0; tap < taps; tap++)
                        s += psum[pix + (tap / g.kw) * g.dh * g.wp + (tap % g.kw) * g.dw];
                tsum[t] = s;
            }
            int nt2 = nthreads;
            lut_job jj = lut_setup(isa, m, k, taps, lut, n, levels, scale, per_channel, bias,
                                   y + (b * outs + oy0 * g.wo) * n, &nt2);
            jj.goff = goff, jj.fixed = tabs, jj.ttab = ttab, jj.tsum = tsum;
            jj.geom = &g, jj.gs = gs, jj.rect = rect, jj.order = order;
            for (int64_t t = 0; t < m; t++) {
                rect[t] = lut_rect(&jj, oy0 * g.wo + t);
                sorted[t].rect = rect[t], sorted[t].t = t;
            }
            qsort(sorted, (size_t)m, sizeof(lut_token), lut_token_cmp);
            for (int64_t t = 0; t < m; t++) order[t] = sorted[t].t;
            lut_go(&jj, nt2);
        }
    }
    rc = 0;
done:
    free(tabs), free(psum), free(tsum), free(ttab), free(goff);
    free(rect), free(order), free(sorted);
    return rc;
}

/* fp32 convolutions with K = C_in kh kw <= LUT_DIRECT_MAX_K (a one-channel 3x3 first layer):
 * direct float32 products instead of tables, which for so few columns cost more to build than
 * they save. Per token t (a gathered patch row) and output n,
 *
 *   acc = fma(lev[n, K-1], x[t, K-1], ... fma(lev[n, 1], x[t, 1], fma(lev[n, 0], x[t, 0], 0)))
 *   y[t, n] = s[n] * (acc + 0) + b[n]                  (lev = c - (N-1)/2, exact in float32)
 *
 * each step one rounding, k in order, on both paths (AVX-512: 16 outputs a vector; portable:
 * fmaf), so they agree bit for bit. Error: K roundings of terms bounded by A sum_k |x| and the
 * scale and bias, K + 2 <= g + ceil(K / g) + P + 4 for every level count when K <= 9: within
 * the lookup tables' stated bound. Measured on Zen 4, one core, cvnn2's first layer (1 -> 128
 * channels, 28x28, batch 1): 46 us (56 with cold caches) against 88-90 (112-124) by lookup
 * tables over gathered patches; torch's F.conv2d on fp32 weights 33 us. */
enum { LUT_DIRECT_MAX_K = 9 };

/* Codes of row r, columns 0 .. k-1 < 64, from the lane layout of lb_pack (w, kp, bits as
 * there): the first 64 columns are the low lanes of the row's first 64 bytes (and, for 17
 * levels, bit 0 of its first 64 high-bit bytes). */
static void lane_codes(const uint8_t *w, int64_t kp, int bits, int64_t r, int64_t k, int *out) {
    const int lanes = bits == 5 ? 4 : bits;
    const uint8_t *row = w + (r / ROWS) * ROWS * (kp * bits / 8) + (r % ROWS) * 64;
    for (int64_t kk = 0; kk < k; kk++) {
        out[kk] = row[kk] & ((1 << lanes) - 1);
        if (bits == 5) out[kk] |= (row[ROWS * kp / 2 + kk] & 1) << 4;
    }
}

typedef struct {
    int isa, per_channel;
    conv_geom g;
    int64_t m, n, k, per_chunk;
    const float *x, *lev, *scale, *bias; /* lev (k, np): level of column k, output n */
    int64_t np;                          /* n rounded up to 16 */
    float *y;
} direct_job;

/* Token t's patch, xt[(i kw + j) C + c] (zero where it falls in the padding). */
static void direct_patch(const direct_job *d, int64_t t, float *xt) {
    const conv_geom *g = &d->g;
    const int64_t b = t / (g->ho * g->wo), oy = t / g->wo % g->ho, ox = t % g->wo;
    for (int64_t i = 0; i < g->kh; i++)
        for (int64_t jj = 0; jj < g->kw; jj++) {
            const int64_t yy = oy * g->sh - g->ph + i * g->dh, xx = ox * g->sw - g->pw + jj * g->dw;
            const int inside = yy >= 0 && yy < g->h && xx >= 0 && xx < g->w;
            for (int64_t c = 0; c < g->c; c++)
                xt[(i * g->kw + jj) * g->c + c] =
                    inside ? d->x[((b * g->h + yy) * g->w + xx) * g->c + c] : 0.0f;
        }
}

/* Outputs n0 .. n0 + 16 NV - 1 (as far as they exist) of token t: NV vectors of 16, independent
 * chains (one chain would wait for each fma's latency). */
LB_INLINE T512 void direct_block_512(const direct_job *d, int64_t t, const float *xt, int64_t n0,
                                     const int NV) {
    const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m512 acc[8];
#pragma GCC unroll 8
    for (int v = 0; v < NV; v++) acc[v] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < d->k; kk++) {
        const __m512 xv = _mm512_set1_ps(xt[kk]);
        const float *lv = d->lev + kk * d->np + n0;
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) acc[v] = _mm512_fmadd_ps(_mm512_loadu_ps(lv + 16 * v), xv, acc[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; v++) {
        const int64_t o = n0 + 16 * v, left = d->n - o;
        const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        const __m512 s = d->per_channel ? _mm512_maskz_loadu_ps(m, d->scale + o)
                                        : _mm512_set1_ps(d->scale[0]);
        __m512 y = _mm512_add_round_ps(acc[v], _mm512_setzero_ps(), rn);
        y = _mm512_mul_round_ps(s, y, rn);
        if (d->bias) y = _mm512_add_round_ps(y, _mm512_maskz_loadu_ps(m, d->bias + o), rn);
        _mm512_mask_storeu_ps(d->y + t * d->n + o, m, y);
    }
}

T512 static void direct_token_512(const direct_job *d, int64_t t, const float *xt) {
    int64_t n0 = 0;
    for (; n0 + 8 * 16 <= d->n; n0 += 8 * 16) direct_block_512(d, t, xt, n0, 8);
    for (; n0 < d->n; n0 += 16) direct_block_512(d, t, xt, n0, 1);
}

static void direct_chunk(const void *ctx, int64_t chunk) {
    const direct_job *d = ctx;
    const int64_t t1 = (chunk + 1) * d->per_chunk < d->m ? (chunk + 1) * d->per_chunk : d->m;
    float xt[LUT_DIRECT_MAX_K];
    for (int64_t t = chunk * d->per_chunk; t < t1; t++) {
        direct_patch(d, t, xt);
        if (d->isa == ISA_AVX512) {
            direct_token_512(d, t, xt);
            continue;
        }
        for (int64_t n = 0; n < d->n; n++) {
            float acc = 0.0f;
            for (int64_t kk = 0; kk < d->k; kk++) acc = fmaf(d->lev[kk * d->np + n], xt[kk], acc);
            const float v = d->scale[d->per_channel ? n : 0] * (acc + 0.0f);
            d->y[t * d->n + n] = d->bias ? v + d->bias[n] : v;
        }
    }
}

/* y (B Ho Wo, n) = conv(x, W) + b, x NHWC, K = kh kw C <= LUT_DIRECT_MAX_K; w, kp, bits:
 * lb_pack's layout. Returns 0, or -1 when out of memory. */
static int direct_conv(int isa, const float *x, conv_geom g, const uint8_t *w, int64_t n,
                       int64_t kp, int bits, int levels, const float *scale, int per_channel,
                       const float *bias, float *y, int nthreads) {
    const int64_t m = g.b * g.ho * g.wo, k = g.kh * g.kw * g.c;
    const int64_t np = (n + 15) / 16 * 16;
    float *lev = xalloc((size_t)(k * np) * sizeof(float));
    if (!lev) return -1;
    const float half = (float)(levels - 1) / 2.0f;
    memset(lev, 0, (size_t)(k * np) * sizeof(float));
    int codes[LUT_DIRECT_MAX_K];
    for (int64_t r = 0; r < n; r++) {
        lane_codes(w, kp, bits, r, k, codes);
        for (int64_t kk = 0; kk < k; kk++) lev[kk * np + r] = (float)codes[kk] - half;
    }
    if (m * n * k < 200000) nthreads = 1;
    direct_job d = {isa == ISA_AVX512 ? ISA_AVX512 : ISA_PORTABLE,
                    per_channel,
                    g,
                    m,
                    n,
                    k,
                    0,
                    x,
                    lev,
                    scale,
                    bias,
                    np,
                    y};
    d.per_chunk = (m + 4 * nthreads - 1) / (4 * nthreads);
    d.per_chunk = d.per_chunk < 1 ? 1 : d.per_chunk;
    parallel_for(direct_chunk, &d, (m + d.per_chunk - 1) / d.per_chunk, nthreads);
    free(lev);
    return 0;
}

/* y (B * Ho * Wo, N_out) = conv(x, W) + b; dims: b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho,
 * wo. Returns 0 on success, -1 when out of memory. */
LB_EXPORT int lb_conv2d(int isa, int int8, const float *x, const int64_t *dims, const uint8_t *w,
                        int64_t n, int64_t kp, int bits, int levels, const float *scale,
                        int per_channel, const float *bias, float *y, int nthreads,
                        const uint32_t *lut) {
    const conv_geom g = geom_from(dims);
    if (!int8 && lut && lb_lut_segments(g.c, g.kh * g.kw) > 1)
        return lut_conv(isa, x, g, lut, n, levels, scale, per_channel, bias, y, nthreads);
    if (!int8 && lut && g.kh * g.kw * g.c <= LUT_DIRECT_MAX_K)
        return direct_conv(isa, x, g, w, n, kp, bits, levels, scale, per_channel, bias, y,
                           nthreads);
    const int64_t m = g.b * g.ho * g.wo, k = g.kh * g.kw * g.c, img = g.h * g.w * g.c;
    gemm_job j = make_job(isa, m, k, w, n, kp, bits, levels, scale, per_channel, bias, y, &nthreads);
    const int direct = g.c % 64 == 0;
    const size_t esize = int8 ? 1 : sizeof(float);
    const int64_t kc = j.nch * 64;
    const int64_t elements = direct ? g.b * g.hp * g.wp * g.c : m * kc;
    void *buf = xalloc((size_t)elements * esize + 64);
    float *a_img = xalloc((size_t)g.b * sizeof(float));
    float *a = xalloc((size_t)m * sizeof(float));
    int32_t *sq = xalloc((size_t)m * sizeof(int32_t));
    int32_t *csum = direct && int8 ? xalloc((size_t)(elements / 64) * sizeof(int32_t)) : NULL;
    int64_t *toff = xalloc((size_t)m * sizeof(int64_t)), *coff = row_offsets(j.nch, 64);
    int8_t *qimg = NULL;
    float lut16[16], lut_hi[16];
    int rc = -1;
    if (!buf || !a_img || !a || !sq || !toff || !coff || (direct && int8 && !csum)) goto done;

    if (int8)
        for (int64_t b = 0; b < g.b; b++) a_img[b] = multiplier_of(absmax(isa, x + b * img, img));
    conv_fill_job f = {isa, int8, g, x, a_img, NULL, buf, direct ? csum : sq, kc, 0, 0};
    if (direct) {
        memset(buf, 0, (size_t)elements * esize);
        if (csum) memset(csum, 0, (size_t)(elements / 64) * sizeof(int32_t));
        run_fill(fill_padded_chunk, &f, g.b * g.h, nthreads);
        for (int64_t c = 0; c < j.nch; c++) {
            const int64_t tap = c / (g.c / 64), cb = c % (g.c / 64);
            coff[c] = ((tap / g.kw) * g.dh * g.wp + (tap % g.kw) * g.dw) * g.c + 64 * cb;
        }
        for (int64_t t = 0; t < m; t++) {
            const int64_t b = t / (g.ho * g.wo), rem = t % (g.ho * g.wo);
            toff[t] = ((b * g.hp + (rem / g.wo) * g.sh) * g.wp + (rem % g.wo) * g.sw) * g.c;
            if (!csum) continue;
            int32_t s = 0;
            for (int64_t c = 0; c < j.nch; c++) s += csum[(toff[t] + coff[c]) / 64];
            sq[t] = s;
        }
    } else {
        if (int8) {
            if (!(qimg = xalloc((size_t)(g.b * img)))) goto done;
            for (int64_t b = 0; b < g.b; b++)
                quantize_span(isa, x + b * img, img, a_img[b], qimg + b * img);
            f.qimg = qimg;
        }
        run_fill(fill_rows_chunk, &f, m, nthreads);
        for (int64_t t = 0; t < m; t++) toff[t] = t * kc;
    }
    if (int8) {
        for (int64_t t = 0; t < m; t++) a[t] = a_img[t / (g.ho * g.wo)];
        j.q = buf, j.a = a, j.sq = sq;
    } else {
        set_f32_tables(&j, lut16, lut_hi);
        j.x = buf;
    }
    j.toff = toff, j.coff = coff;
    if (!int8 && lut) {
        rc = lut_run(isa, buf, toff, coff, m, k, lut, n, levels, scale, per_channel, bias, y,
                     nthreads);
        goto done;
    }
    parallel_for(int8 ? i8_chunk : f32_chunk, &j, job_chunks(&j), nthreads);
    rc = 0;
done:
    free(buf), free(a_img), free(a), free(sq), free(csum), free(toff), free(coff), free(qimg);
    return rc;
}
