/* lowbit binary (XNOR-popcount) CPU kernels: activations and weights in {-1, +1}.
 *
 * Part of the same shared library as lowbit_kernels.c (plain C, called through ctypes, one binary
 * for every x86-64 with per-function target attributes; `lb_binary_isa()` picks the path). The
 * Python side is lowbit/kernels/binary.py; lowbit/kernels/reference.py (binary_linear,
 * binary_conv2d) is the specification these kernels equal bit for bit.
 *
 * ---------------------------------------------------------------------------------------------
 * Bits: a value v in {-1, +1} is the bit (v == -1); 64 values per uint64 word, value k of a row
 * in bit k % 64 of word k / 64, the tail of the last word zero (= +1 in both operands):
 *
 *     word j:  bit 63 ............ bit 1  bit 0
 *              v[64j + 63]   ...   v[64j + 1]  v[64j]          bit = 1  <=>  v = -1
 *
 * For two rows a, w of K values:   a . w = sum_k a_k w_k = K - 2 * popcount(a XOR w)
 * (equal bits multiply to +1, different ones to -1; the zero tails XOR to 0 and add nothing).
 *
 * Activations: v = sign(x - t) with sign(0) = +1, i.e. bit = (x < t) (t: the per-channel
 * threshold of rsign, or 0), packed on the fly from float32 rows: (M, KW) words, KW = ceil(K/64).
 * Weights: codes c in {0, 1} (level c - 1/2, value sign = 2c - 1), bit = (c == 0), packed once
 * into blocks of 8 rows with the rows' words interleaved, (ceil(N/8), KW, 8) words:
 *
 *     block b:  [w(8b,0) w(8b+1,0) ... w(8b+7,0)] [w(8b,1) ... w(8b+7,1)] ... (64 bytes per word j)
 *
 * so one 64-byte load gives word j of 8 rows (one zmm, two ymm), XORed with the broadcast word j
 * of a token and popcounted per 64-bit lane. Rows past N are zero and their results dropped.
 *
 * Output: y[t, n] = (float)(K - 2 popcount) * alpha[n] + bias[n], a float32 product then a
 * float32 sum, never fused (fp-contract off below): the exact arithmetic of the training layer
 * ((x_b @ w_b.T) * alpha + b in torch), so a packed model gives bit-identical outputs.
 *
 * Block epilogue (optional, lb_binary_epilogue; the eval-mode arithmetic of a lowbit.bnn block,
 * lowbit/epilogue.py), on each output v of channel c, in this order, each step one float32
 * operation rounded on its own:
 *
 *     v = v * scale[c];  v = v + shift[c]                  BatchNorm folded (eval statistics)
 *     v = v + x[token * C + c % C]                         real-valued shortcut, if residual:
 *                                                          the layer's float input (C channels,
 *                                                          [x, x, ...] along N)
 *     u = v + pbias[c];  u = u >= 0 ? u : u * pslope[c];  v = u + pshift[c]            RPReLU
 *
 * (residual 0, pbias NULL: that step is skipped). A convolution's token is an output pixel, so
 * its shortcut needs the input's pixel grid (stride 1, same size): the caller checks.
 *
 * Convolutions (groups 1): the NHWC input is binarized once into a padded bit image
 * (B, Hp, Wp, CW) words, CW = ceil(C/64) per pixel, the border bits 0: padding with +1, the
 * value a zero-padded input binarizes to (sign(0) = +1), as the training layer pads. Patch rows
 * are then gathered per output pixel, tap-major: word (i * kw + j) * CW + cw is channel word cw
 * of tap (i, j) (each tap's channel tail zero), and the weights are packed in the same order
 * with K = C * kh * kw: the convolution is the GEMM above.
 *
 * Paths: AVX-512 VPOPCNTDQ (vpopcntq on 8 words a lane each), AVX2 (Mula's pshufb nibble table:
 * byte counts summed bytewise for up to 31 words, then vpsadbw into 64-bit lanes; convolutions
 * look their counts up in per-activation nibble tables instead, see "AVX2 nibble tables"),
 * portable C.
 * Threads: parallel_for of lowbit_kernels.c (torch's OpenMP team, the fork guard included).
 */

#pragma GCC optimize("fp-contract=off")

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LB_EXPORT __attribute__((visibility("default")))
#define LB_INLINE static inline __attribute__((always_inline))
#define TPOP __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq")))
#define TAVX2 __attribute__((target("avx2")))

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
/* BROWS: rows per weight block (one 64-byte word group); TOKENS: tokens per work item;
 * NT512 / NT256: tokens sharing each weight load in the AVX-512 / AVX2 inner loops */
enum { BROWS = 8, TOKENS = 32, NT512 = 8, NT256 = 2 };
/* The AVX2 nibble-table path (below): NIB_WORD bytes of tables or weights per 64-bit word,
 * NIB_TILES tiles of 16 rows per pass (the weights padded to whole passes), byte counters widened
 * every NIB_VECTORS table vectors (each adds at most 4 to a byte: 63 * 4 <= 255),
 * K <= 64 * NIB_MAX_KW < 2^16 (16-bit counters), at most NIB_MAX_WORDS image words a call (4 MiB
 * of tables) */
enum { NIB_WORD = 256, NIB_TILES = 4, NIB_VECTORS = 63, NIB_MAX_KW = 1023, NIB_MAX_WORDS = 16384 };

typedef void (*chunk_fn)(const void *ctx, int64_t chunk);
/* lowbit_kernels.c: fn(ctx, i) for i < nchunks on torch's OpenMP team (or the calling thread) */
void parallel_for(chunk_fn fn, const void *ctx, int64_t nchunks, int nthreads);

LB_EXPORT int lb_binary_version(void) { return 5; }

/* The block epilogue of the header; the Python side mirrors this layout (ctypes.Structure). */
typedef struct {
    const float *scale, *shift;           /* (N,) */
    const float *pbias, *pslope, *pshift; /* (N,) RPReLU, or pbias NULL */
    int64_t residual;                     /* add the layer's float input (res below) */
} lb_binary_epilogue;

LB_EXPORT int lb_binary_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vpopcntdq"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2")) return ISA_AVX2;
    return ISA_PORTABLE;
}

static int64_t words_of(int64_t k) { return (k + 63) / 64; }

static void *xalloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); }

/* ---------------------------------------------------------------------------------------- */
/* Packing                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* codes (n, taps * c) uint8 in {0, 1}, tap-major -> blocks (ceil(n/8), taps * CW, 8) words. */
LB_EXPORT void lb_binary_pack_weights(const uint8_t *codes, int64_t n, int64_t taps, int64_t c,
                                      uint64_t *out) {
    const int64_t cw = words_of(c), kw = taps * cw, nblocks = (n + BROWS - 1) / BROWS;
    memset(out, 0, (size_t)(nblocks * kw * BROWS) * sizeof(uint64_t));
    for (int64_t r = 0; r < n; r++) {
        uint64_t *o = out + (r / BROWS) * kw * BROWS + r % BROWS;
        for (int64_t t = 0; t < taps; t++)
            for (int64_t i = 0; i < c; i++)
                if (codes[(r * taps + t) * c + i] == 0)
                    o[(t * cw + i / 64) * BROWS] |= (uint64_t)1 << (i % 64);
    }
}

/* One row of k floats -> KW words, bit = (x < t) (t NULL: 0). */
static void pack_row_portable(const float *x, int64_t k, const float *t, uint64_t *out) {
    for (int64_t j = 0; j < words_of(k); j++) {
        const int64_t base = j * 64, len = k - base < 64 ? k - base : 64;
        uint64_t word = 0;
        for (int64_t i = 0; i < len; i++)
            word |= (uint64_t)(x[base + i] < (t ? t[base + i] : 0.0f)) << i;
        out[j] = word;
    }
}

TAVX2 static void pack_row_256(const float *x, int64_t k, const float *t, uint64_t *out) {
    const int64_t full = k / 64;
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t j = 0; j < full; j++) {
        uint64_t word = 0;
        for (int q = 0; q < 8; q++) {
            const int64_t e = j * 64 + q * 8;
            const __m256 th = t ? _mm256_loadu_ps(t + e) : zero;
            const __m256 lt = _mm256_cmp_ps(_mm256_loadu_ps(x + e), th, _CMP_LT_OQ);
            word |= (uint64_t)(uint8_t)_mm256_movemask_ps(lt) << (q * 8);
        }
        out[j] = word;
    }
    if (k % 64) pack_row_portable(x + full * 64, k % 64, t ? t + full * 64 : NULL, out + full);
}

TPOP static void pack_row_512(const float *x, int64_t k, const float *t, uint64_t *out) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t j = 0; j < words_of(k); j++) {
        uint64_t word = 0;
        for (int q = 0; q < 4; q++) {
            const int64_t e = j * 64 + q * 16, left = k - e;
            if (left <= 0) break;
            const __mmask16 live = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            const __m512 th = t ? _mm512_maskz_loadu_ps(live, t + e) : zero;
            const __m512 v = _mm512_maskz_loadu_ps(live, x + e);
            word |= (uint64_t)_mm512_mask_cmp_ps_mask(live, v, th, _CMP_LT_OQ) << (q * 16);
        }
        out[j] = word;
    }
}

static void pack_row(int isa, const float *x, int64_t k, const float *t, uint64_t *out) {
    if (isa == ISA_AVX512) pack_row_512(x, k, t, out);
    else if (isa == ISA_AVX2) pack_row_256(x, k, t, out);
    else pack_row_portable(x, k, t, out);
}

/* ---------------------------------------------------------------------------------------- */
/* Popcount dot products of one weight block with nt tokens: pop[t * 8 + r]                 */
/* ---------------------------------------------------------------------------------------- */

/* Where a token's words are: word (tap, c) of token t is a[t][toff_tap[tap] + c], c < cw. A linear
 * layer has one tap (offset 0, cw = KW); a convolution reads its patches in place from the
 * padded bit image, one offset per tap (the patch rows are never copied out). */
typedef struct {
    const int64_t *tapoff;
    int64_t taps, cw;
} word_map;

static void block_portable(const uint64_t *w, const uint64_t *const *a, int nt, word_map m,
                           int64_t *pop) {
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < BROWS; r++) {
            int64_t s = 0;
            for (int64_t tap = 0; tap < m.taps; tap++)
                for (int64_t c = 0; c < m.cw; c++)
                    s += __builtin_popcountll(a[t][m.tapoff[tap] + c] ^
                                              w[(tap * m.cw + c) * BROWS + r]);
            pop[t * BROWS + r] = s;
        }
}

/* nb (1 or 2) weight blocks, w and w + wstride, against nt tokens: each broadcast token word
 * meets 8 * nb rows; pop[(bi * TOKENS + t) * 8 + r] */
LB_INLINE TPOP void block_512_n(const uint64_t *w, int64_t wstride, const int nb,
                                const uint64_t *const *a, const int nt, word_map m, int64_t *pop) {
    __m512i acc[2][NT512];
    for (int bi = 0; bi < nb; bi++)
        for (int t = 0; t < nt; t++) acc[bi][t] = _mm512_setzero_si512();
    for (int64_t tap = 0; tap < m.taps; tap++) {
        const int64_t off = m.tapoff[tap];
        for (int64_t c = 0; c < m.cw; c++) {
            const uint64_t *wj = w + (tap * m.cw + c) * BROWS;
            const __m512i w0 = _mm512_loadu_si512(wj);
            const __m512i w1 = nb > 1 ? _mm512_loadu_si512(wj + wstride) : w0;
            for (int t = 0; t < nt; t++) {
                const __m512i x = _mm512_set1_epi64((long long)a[t][off + c]);
                acc[0][t] = _mm512_add_epi64(acc[0][t], _mm512_popcnt_epi64(_mm512_xor_si512(w0, x)));
                if (nb > 1)
                    acc[1][t] =
                        _mm512_add_epi64(acc[1][t], _mm512_popcnt_epi64(_mm512_xor_si512(w1, x)));
            }
        }
    }
    for (int bi = 0; bi < nb; bi++)
        for (int t = 0; t < nt; t++) _mm512_storeu_si512(pop + (bi * TOKENS + t) * BROWS, acc[bi][t]);
}

TPOP static void block_512(const uint64_t *w, int64_t wstride, int nb, const uint64_t *const *a,
                           int nt, word_map m, int64_t *pop) {
#define LB_CASE(n)                                                                                 \
    case n:                                                                                        \
        if (nb > 1) block_512_n(w, wstride, 2, a, n, m, pop);                                      \
        else block_512_n(w, wstride, 1, a, n, m, pop);                                             \
        break;
    switch (nt) { /* constant token and block counts: the accumulators stay in registers */
    LB_CASE(8) LB_CASE(7) LB_CASE(6) LB_CASE(5) LB_CASE(4) LB_CASE(3) LB_CASE(2)
    default: block_512_n(w, wstride, nb > 1 ? 2 : 1, a, 1, m, pop); break;
    }
#undef LB_CASE
}

/* byte-wise popcount of 32 bytes through the nibble table (Mula, Kurz, Lemire 2016) */
LB_INLINE TAVX2 __m256i popcnt_bytes_256(__m256i v, __m256i table, __m256i low) {
    const __m256i lo = _mm256_and_si256(v, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
}

LB_INLINE TAVX2 void block_256_n(const uint64_t *w, const uint64_t *const *a, const int nt,
                                 word_map m, int64_t *pop) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                           2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i acc[NT256][2], bytes[NT256][2];
    for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = bytes[t][0] = bytes[t][1] = zero;
    int pending = 0; /* words summed bytewise: a byte holds at most 8 a word, 31 * 8 <= 255 */
    for (int64_t tap = 0; tap < m.taps; tap++) {
        const int64_t off = m.tapoff[tap];
        for (int64_t c = 0; c < m.cw; c++) {
            const uint64_t *wj = w + (tap * m.cw + c) * BROWS;
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)wj);
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wj + 4));
            for (int t = 0; t < nt; t++) {
                const __m256i x = _mm256_set1_epi64x((long long)a[t][off + c]);
                bytes[t][0] = _mm256_add_epi8(
                    bytes[t][0], popcnt_bytes_256(_mm256_xor_si256(w0, x), table, low));
                bytes[t][1] = _mm256_add_epi8(
                    bytes[t][1], popcnt_bytes_256(_mm256_xor_si256(w1, x), table, low));
            }
            if (++pending == 31) {
                for (int t = 0; t < nt; t++)
                    for (int h = 0; h < 2; h++) {
                        acc[t][h] = _mm256_add_epi64(acc[t][h], _mm256_sad_epu8(bytes[t][h], zero));
                        bytes[t][h] = zero;
                    }
                pending = 0;
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        for (int h = 0; h < 2; h++)
            acc[t][h] = _mm256_add_epi64(acc[t][h], _mm256_sad_epu8(bytes[t][h], zero));
        _mm256_storeu_si256((__m256i *)(pop + t * BROWS), acc[t][0]);
        _mm256_storeu_si256((__m256i *)(pop + t * BROWS + 4), acc[t][1]);
    }
}

/* One token (a GEMV): the 8 rows' counts through a carry-save adder tree (Harley and Seal; Mula,
 * Kurz, Lemire 2016), so 16 words cost 15 CSAs of 5 logic operations and one nibble popcount
 * instead of 16 popcounts: the nibble shuffles, which this path is bound by otherwise, become
 * 1/8 (measured on a Zen 2, 4096x4096: 98 -> 88 us, the rest bound by reading the weights).
 * (h, l) = the carry and sum bits of a + b + c, bitwise. */
LB_INLINE TAVX2 void csa_256(__m256i *h, __m256i *l, __m256i a, __m256i b, __m256i c) {
    const __m256i u = _mm256_xor_si256(a, b);
    *h = _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(u, c));
    *l = _mm256_xor_si256(u, c);
}

/* the words of one token in K order (taps, then channel words), XORed with 8 rows of weights */
typedef struct {
    const uint64_t *w, *a;
    word_map m;
    int64_t tap, c, off;
} word_walk;

LB_INLINE TAVX2 void next_256(word_walk *k, __m256i *d0, __m256i *d1) {
    const __m256i x = _mm256_set1_epi64x((long long)k->a[k->off + k->c]);
    *d0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)k->w), x);
    *d1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(k->w + 4)), x);
    k->w += BROWS;
    if (++k->c == k->m.cw) {
        k->c = 0;
        if (++k->tap < k->m.taps) k->off = k->m.tapoff[k->tap];
    }
}

TAVX2 static void block_256_one(const uint64_t *w, const uint64_t *a, word_map m, int64_t *pop) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                           2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
#define LB_LANES(v) _mm256_sad_epu8(popcnt_bytes_256((v), table, low), zero) /* 4 x 64-bit */
    word_walk k = {w, a, m, 0, 0, m.tapoff[0]};
    /* [h]: rows 4h .. 4h + 3 */
    __m256i ones[2], twos[2], fours[2], eights[2], total[2];
    for (int h = 0; h < 2; h++) ones[h] = twos[h] = fours[h] = eights[h] = total[h] = zero;
    __m256i twos_a[2], twos_b[2], fours_a[2], fours_b[2], eights_a[2], eights_b[2], sixteens[2];
#define LB_PAIR(out)                                                                               \
    do {                                                                                           \
        __m256i p0, p1, q0, q1;                                                                    \
        next_256(&k, &p0, &p1), next_256(&k, &q0, &q1);                                            \
        csa_256(&out[0], &ones[0], ones[0], p0, q0), csa_256(&out[1], &ones[1], ones[1], p1, q1);  \
    } while (0)
#define LB_EACH(stmt) for (int h = 0; h < 2; h++) stmt
    const int64_t words = m.taps * m.cw;
    /* 2 words -> twos, 4 -> fours, 8 -> eights, 16 -> sixteens, each level a CSA of two outputs of
     * the level below with the carry bits kept at that level */
#define LB_FOUR(out)                                                                               \
    do {                                                                                           \
        LB_PAIR(twos_a);                                                                           \
        LB_PAIR(twos_b);                                                                           \
        LB_EACH(csa_256(&out[h], &twos[h], twos[h], twos_a[h], twos_b[h]));                        \
    } while (0)
#define LB_EIGHT(out)                                                                              \
    do {                                                                                           \
        LB_FOUR(fours_a);                                                                          \
        LB_FOUR(fours_b);                                                                          \
        LB_EACH(csa_256(&out[h], &fours[h], fours[h], fours_a[h], fours_b[h]));                    \
    } while (0)
    for (int64_t i = 0; i + 16 <= words; i += 16) {
        LB_EIGHT(eights_a);
        LB_EIGHT(eights_b);
        LB_EACH(csa_256(&sixteens[h], &eights[h], eights[h], eights_a[h], eights_b[h]));
        LB_EACH(total[h] = _mm256_add_epi64(total[h], LB_LANES(sixteens[h])));
    }
    /* total = 16 sixteens + 8 eights + 4 fours + 2 twos + ones, then the last words one by one */
    LB_EACH({
        total[h] = _mm256_slli_epi64(total[h], 4);
        total[h] = _mm256_add_epi64(total[h], _mm256_slli_epi64(LB_LANES(eights[h]), 3));
        total[h] = _mm256_add_epi64(total[h], _mm256_slli_epi64(LB_LANES(fours[h]), 2));
        total[h] = _mm256_add_epi64(total[h], _mm256_slli_epi64(LB_LANES(twos[h]), 1));
        total[h] = _mm256_add_epi64(total[h], LB_LANES(ones[h]));
    });
    for (int64_t i = words / 16 * 16; i < words; i++) {
        __m256i d0, d1;
        next_256(&k, &d0, &d1);
        total[0] = _mm256_add_epi64(total[0], LB_LANES(d0));
        total[1] = _mm256_add_epi64(total[1], LB_LANES(d1));
    }
    _mm256_storeu_si256((__m256i *)pop, total[0]);
    _mm256_storeu_si256((__m256i *)(pop + 4), total[1]);
#undef LB_EIGHT
#undef LB_FOUR
#undef LB_EACH
#undef LB_PAIR
#undef LB_LANES
}

TAVX2 static void block_256(const uint64_t *w, const uint64_t *const *a, int nt, word_map m,
                            int64_t *pop) {
    if (nt == 2) block_256_n(w, a, 2, m, pop);
    else block_256_one(w, a[0], m, pop);
}

/* ---------------------------------------------------------------------------------------- */
/* AVX2 nibble tables (convolutions): one pshufb counts 16 rows x 2 nibbles                  */
/* ---------------------------------------------------------------------------------------- */
/* popcount(a XOR w) summed over a row is summed over the row's 4-bit nibbles, and for a fixed
 * activation nibble u the count popcount(u XOR v) is a 16-entry table of the weight nibble v.
 * So each activation word becomes 8 table vectors, one per byte q of the word:
 *
 *     table[q]:  lane 0 byte i = popcount(lo_nibble(byte q) XOR i)      i = 0..15
 *                lane 1 byte i = popcount(hi_nibble(byte q) XOR i)
 *
 * and the weights are laid out in tiles of 16 rows, one byte per nibble, the same pairing:
 *
 *     tile T, word j, byte q (32 bytes):  [lo nibble of byte q of word j, rows 16T .. 16T + 15]
 *                                         [hi nibble of byte q of word j, rows 16T .. 16T + 15]
 *
 * so vpshufb(table[q], weights) gives 16 rows' counts for 8 bits of K in each lane: 2 vector
 * operations (the shuffle, with its load folded in, and a byte add) per 128 row-bits, against 8
 * per 256 for the XOR-and-nibble-popcount of block_256. The weights take twice the bytes of their
 * bits, which a convolution's few weights afford; a token's tables are the tables of the image
 * words its patch reads, built once per call for the whole image. Counts are exact integers:
 * bytes (<= 252 between widenings) into 16-bit lanes, the two lanes added at the end. */

/* blocks (ceil(n/8), kw, 8) words -> tiles (lb_binary_nibble_tiles(n), kw, 8, 32) bytes as above,
 * the rows past n zero; returns -1 (nothing written) when K = 64 kw is too large for the 16-bit
 * counters. */
LB_EXPORT int64_t lb_binary_nibble_tiles(int64_t n) {
    return (n + 16 * NIB_TILES - 1) / (16 * NIB_TILES) * NIB_TILES;
}

LB_EXPORT int lb_binary_nibble_weights(const uint64_t *w, int64_t n, int64_t kw, uint8_t *out) {
    if (kw > NIB_MAX_KW) return -1;
    const int64_t tiles = lb_binary_nibble_tiles(n);
    memset(out, 0, (size_t)(tiles * kw * NIB_WORD));
    for (int64_t r = 0; r < n; r++)
        for (int64_t j = 0; j < kw; j++) {
            const uint64_t word = w[((r / BROWS) * kw + j) * BROWS + r % BROWS];
            uint8_t *o = out + ((r / 16) * kw + j) * NIB_WORD + r % 16;
            for (int q = 0; q < 8; q++) {
                o[q * 32] = (uint8_t)((word >> (8 * q)) & 15);
                o[q * 32 + 16] = (uint8_t)((word >> (8 * q + 4)) & 15);
            }
        }
    return 0;
}

/* count words -> count * 8 table vectors (the header above) */
TAVX2 static void nib_tables(const uint64_t *words, int64_t count, uint8_t *out) {
    const __m256i poptab = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                            2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i iota = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0,
                                          1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int64_t i = 0; i < count; i++) {
        const __m256i x = _mm256_set1_epi64x((long long)words[i]);
        const __m256i lo = _mm256_and_si256(x, low), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
        const __m256i nibs = _mm256_blend_epi32(lo, hi, 0xF0); /* lane 0: lo nibbles, lane 1: hi */
        for (int q = 0; q < 8; q++) {
            const __m256i u = _mm256_shuffle_epi8(nibs, _mm256_set1_epi8((char)q));
            _mm256_storeu_si256((__m256i *)(out + i * NIB_WORD + q * 32),
                                _mm256_shuffle_epi8(poptab, _mm256_xor_si256(iota, u)));
        }
    }
}

/* nib_tables over bands of `per` words, one band a chunk */
typedef struct {
    const uint64_t *words;
    int64_t count;
    uint8_t *out;
    int64_t per;
} tables_job;

static void tables_chunk(const void *ctx, int64_t chunk) {
    const tables_job *t = ctx;
    const int64_t i0 = chunk * t->per, n = t->count - i0 < t->per ? t->count - i0 : t->per;
    nib_tables(t->words + i0, n, t->out + i0 * NIB_WORD);
}

/* byte counters -> 16-bit counters: lo[g] holds rows 0..7 (lane 0: lo nibbles, lane 1: hi),
 * hi[g] rows 8..15 */
LB_INLINE TAVX2 void nib_widen(__m256i *acc, __m256i *lo, __m256i *hi, const int ng) {
    const __m256i zero = _mm256_setzero_si256();
    for (int g = 0; g < ng; g++) {
        lo[g] = _mm256_add_epi16(lo[g], _mm256_unpacklo_epi8(acc[g], zero));
        hi[g] = _mm256_add_epi16(hi[g], _mm256_unpackhi_epi8(acc[g], zero));
        acc[g] = zero;
    }
}

/* The inner loop, over taps tap0 .. tap1 - 1 and table vectors k0 .. k0 + n - 1 of each: two
 * tokens' tables (a token's tap at x + 32 * 8 * tapoff[tap], its vectors contiguous) against the
 * same vectors of 4 tiles (w: tap tap's vectors at w + tap * tap_bytes, tiles tile_bytes apart),
 * into the byte counters c[i * 4 + g]. Named registers, each weight vector loaded once for both
 * tokens: written over arrays, GCC spills the counters (measured on a Zen 2: 1.7 cycles a
 * shuffle against 0.85). */
TAVX2 static void nib_run(const uint8_t *x0, const uint8_t *x1, const int64_t *tapoff,
                          int64_t tap0, int64_t tap1, int64_t k0, int64_t n, const uint8_t *w,
                          int64_t tap_bytes, int64_t tile_bytes, __m256i *c) {
    __m256i a0 = c[0], a1 = c[1], a2 = c[2], a3 = c[3], b0 = c[4], b1 = c[5], b2 = c[6], b3 = c[7];
    for (int64_t tap = tap0; tap < tap1; tap++) {
        const uint8_t *t0p = x0 + tapoff[tap] * NIB_WORD + 32 * k0;
        const uint8_t *t1p = x1 + tapoff[tap] * NIB_WORD + 32 * k0;
        const uint8_t *wp = w + tap * tap_bytes + 32 * k0;
        for (int64_t k = 0; k < 32 * n; k += 32) {
            const __m256i t0 = _mm256_loadu_si256((const __m256i *)(t0p + k));
            const __m256i t1 = _mm256_loadu_si256((const __m256i *)(t1p + k));
            __m256i v;
#define LB_TILE(g, a, b)                                                                           \
    v = _mm256_loadu_si256((const __m256i *)(wp + g * tile_bytes + k));                             \
    a = _mm256_add_epi8(a, _mm256_shuffle_epi8(t0, v));                                            \
    b = _mm256_add_epi8(b, _mm256_shuffle_epi8(t1, v));
            LB_TILE(0, a0, b0) LB_TILE(1, a1, b1) LB_TILE(2, a2, b2) LB_TILE(3, a3, b3)
#undef LB_TILE
        }
    }
    c[0] = a0, c[1] = a1, c[2] = a2, c[3] = a3, c[4] = b0, c[5] = b1, c[6] = b2, c[7] = b3;
}

/* Tokens toff[0] and toff[1] (equal for a lone token) against the NIB_TILES tiles at wn (tiles
 * tile_bytes apart): row r of tile g's count for token i to pop[(2g + r / 8) * stride + i * 8 +
 * r % 8]. The byte counters are widened after each run of at most NIB_VECTORS vectors: whole
 * taps while a tap has that few (C <= 448), else pieces of a tap. */
TAVX2 static void nib_pair(const uint8_t *wn, int64_t tile_bytes, const uint8_t *tab,
                           const int64_t *toff, word_map m, int32_t *pop, int64_t stride) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i acc[2 * NIB_TILES], lo[2 * NIB_TILES], hi[2 * NIB_TILES]; /* [i * NIB_TILES + g] */
    for (int g = 0; g < 2 * NIB_TILES; g++) acc[g] = lo[g] = hi[g] = zero;
    const uint8_t *x0 = tab + toff[0] * NIB_WORD, *x1 = tab + toff[1] * NIB_WORD;
    const int64_t per_tap = 8 * m.cw, tap_bytes = m.cw * NIB_WORD; /* table vectors, bytes */
    if (per_tap <= NIB_VECTORS) {
        const int64_t group = NIB_VECTORS / per_tap;
        for (int64_t tap = 0; tap < m.taps; tap += group) {
            const int64_t tap1 = tap + group < m.taps ? tap + group : m.taps;
            nib_run(x0, x1, m.tapoff, tap, tap1, 0, per_tap, wn, tap_bytes, tile_bytes, acc);
            nib_widen(acc, lo, hi, 2 * NIB_TILES);
        }
    } else {
        for (int64_t tap = 0; tap < m.taps; tap++)
            for (int64_t k = 0; k < per_tap; k += NIB_VECTORS) {
                const int64_t n = per_tap - k < NIB_VECTORS ? per_tap - k : NIB_VECTORS;
                nib_run(x0, x1, m.tapoff, tap, tap + 1, k, n, wn, tap_bytes, tile_bytes, acc);
                nib_widen(acc, lo, hi, 2 * NIB_TILES);
            }
    }
    for (int i = 0; i < 2; i++)
        for (int g = 0; g < NIB_TILES; g++) {
            const __m256i l = lo[i * NIB_TILES + g], h = hi[i * NIB_TILES + g];
            const __m128i r0 = _mm_add_epi16(_mm256_castsi256_si128(l), _mm256_extracti128_si256(l, 1));
            const __m128i r1 = _mm_add_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            int32_t *p0 = pop + 2 * g * stride + i * BROWS;
            _mm256_storeu_si256((__m256i *)p0, _mm256_cvtepu16_epi32(r0));
            _mm256_storeu_si256((__m256i *)(p0 + stride), _mm256_cvtepu16_epi32(r1));
        }
}

/* ---------------------------------------------------------------------------------------- */
/* GEMM: y (M, N) = (K - 2 popcount(a XOR w)) * alpha + bias                                 */
/* ---------------------------------------------------------------------------------------- */

typedef struct {
    int isa;
    const uint64_t *a;    /* activation words: token t starts at a + toff[t] */
    const int64_t *toff;  /* (M,) */
    word_map map;         /* the words of a token (see word_map) */
    const uint64_t *w;    /* (ceil(N/8), KW, 8) weight words */
    int64_t m, n, k;
    const float *alpha; /* (N,) or (1,) */
    int per_channel;
    const float *bias; /* (N,) or NULL */
    const lb_binary_epilogue *ep; /* or NULL */
    const float *res;             /* the residual rows (token t at res + t * res_row), or NULL */
    int64_t res_row;              /* = its channels */
    float *y;                     /* (M, N) */
    const uint8_t *nib;           /* AVX2 nibble-tile weights (lb_binary_nibble_weights), or NULL */
    const uint8_t *tables;        /* with nib: the nibble tables of the activation words */
    int64_t blocks_per_chunk, token_chunks;
} bgemm_job;

/* Where the residual of output channels col .. col + rows - 1 is read: their first input channel
 * when the 8 are adjacent (C % 8 == 0: one division), else -1 and idx[r] = the channel of row r
 * (gather indices, a division each). No residual: -1 and idx untouched. */
static int64_t residual_columns(const bgemm_job *j, int64_t col, int rows, int32_t *idx) {
    if (!j->res) return -1;
    if (j->res_row % BROWS == 0) return col % j->res_row;
    for (int r = 0; r < rows; r++) idx[r] = (int32_t)((col + r) % j->res_row);
    return -1;
}

/* y[t, 8b + r] for tokens t0 .. t0 + nt - 1 and block b, r < rows: (float)(K - 2 pop) * alpha,
 * then + bias, then the epilogue (header), every step a float32 operation of its own;
 * pop[i * 8 + r] is token t0 + i's count */
static void finish_scalar(const bgemm_job *j, const int64_t *pop, int64_t t0, int nt, int64_t b,
                          int rows) {
    const lb_binary_epilogue *e = j->ep;
    for (int i = 0; i < nt; i++) {
        float *y = j->y + (t0 + i) * j->n;
        for (int r = 0; r < rows; r++) {
            const int64_t col = b * BROWS + r;
            float v = (float)(j->k - 2 * pop[i * BROWS + r]);
            v = v * j->alpha[j->per_channel ? col : 0];
            if (j->bias) v = v + j->bias[col];
            if (e) {
                v = v * e->scale[col];
                v = v + e->shift[col];
                if (j->res) v = v + j->res[(t0 + i) * j->res_row + col % j->res_row];
                if (e->pbias) {
                    float u = v + e->pbias[col];
                    u = u >= 0.0f ? u : u * e->pslope[col];
                    v = u + e->pshift[col];
                }
            }
            y[col] = v;
        }
    }
}

TPOP static void finish_512(const bgemm_job *j, const int64_t *pop, int64_t t0, int nt, int64_t b,
                            int rows) {
    const __mmask8 live = (__mmask8)((1u << rows) - 1);
    const int64_t col = b * BROWS;
    const lb_binary_epilogue *e = j->ep;
    /* the per-channel vectors, loaded once for the nt tokens */
    const __m256 alpha = j->per_channel ? _mm256_maskz_loadu_ps(live, j->alpha + col)
                                        : _mm256_set1_ps(j->alpha[0]);
    const __m256 zero = _mm256_setzero_ps();
    const __m256 bias = j->bias ? _mm256_maskz_loadu_ps(live, j->bias + col) : zero;
    __m256 scale = zero, shift = zero, pbias = zero, pslope = zero, pshift = zero;
    int32_t res_idx[BROWS] = {0};
    const int64_t res_col = e ? residual_columns(j, col, rows, res_idx) : -1;
    if (e) {
        scale = _mm256_maskz_loadu_ps(live, e->scale + col);
        shift = _mm256_maskz_loadu_ps(live, e->shift + col);
        if (e->pbias) {
            pbias = _mm256_maskz_loadu_ps(live, e->pbias + col);
            pslope = _mm256_maskz_loadu_ps(live, e->pslope + col);
            pshift = _mm256_maskz_loadu_ps(live, e->pshift + col);
        }
    }
    const __m256i idx = _mm256_loadu_si256((const __m256i *)res_idx);
    for (int i = 0; i < nt; i++) {
        const __m512i dot = _mm512_sub_epi64(_mm512_set1_epi64(j->k),
                                             _mm512_slli_epi64(_mm512_loadu_si512(pop + i * BROWS), 1));
        __m256 v = _mm256_mul_ps(_mm512_cvtepi64_ps(dot), alpha); /* exact int -> float */
        if (j->bias) v = _mm256_add_ps(v, bias);
        if (e) {
            v = _mm256_mul_ps(v, scale);
            v = _mm256_add_ps(v, shift);
            if (j->res) {
                const float *row = j->res + (t0 + i) * j->res_row;
                __m256 r;
                if (res_col >= 0) r = _mm256_maskz_loadu_ps(live, row + res_col);
                else r = _mm256_mmask_i32gather_ps(zero, live, idx, row, 4);
                v = _mm256_add_ps(v, r);
            }
            if (e->pbias) {
                const __m256 u = _mm256_add_ps(v, pbias);
                const __mmask8 neg = (__mmask8)~_mm256_cmp_ps_mask(u, zero, _CMP_GE_OQ);
                v = _mm256_add_ps(_mm256_mask_mul_ps(u, neg, u, pslope), pshift);
            }
        }
        _mm256_mask_storeu_ps(j->y + (t0 + i) * j->n + col, live, v);
    }
}

/* finish_512 on AVX2: the same float32 operations, with the counts as int32 (exact: |K - 2 pop|
 * <= K < 2^31, checked by the caller) so cvtepi32_ps converts them as the scalar (float) cast
 * does; rows past `rows` are masked off. `narrow`: pop holds int32 counts (the nibble path), else
 * int64 ones narrowed here. The job's options are copied to locals first: read through j in the
 * loop they are reloaded after every store to y (that and the int64 counts took 12 us of a 110 us
 * 128->128 16x16 convolution on a Zen 2; now ~2). */
LB_INLINE TAVX2 void finish_256_body(const bgemm_job *j, const void *pop, int64_t t0, int nt,
                                     int64_t b, int rows, const int narrow) {
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 livef = _mm256_castsi256_ps(live);
    const int64_t col = b * BROWS, n = j->n, res_row = j->res_row;
    const lb_binary_epilogue *e = j->ep;
    const float *res = j->res;
    const int has_bias = j->bias != NULL, has_prelu = e && e->pbias;
    const __m256 zero = _mm256_setzero_ps();
    const __m256 alpha = j->per_channel ? _mm256_maskload_ps(j->alpha + col, live)
                                        : _mm256_set1_ps(j->alpha[0]);
    const __m256 bias = has_bias ? _mm256_maskload_ps(j->bias + col, live) : zero;
    __m256 scale = zero, shift = zero, pbias = zero, pslope = zero, pshift = zero;
    int32_t res_idx[BROWS] = {0};
    const int64_t res_col = e ? residual_columns(j, col, rows, res_idx) : -1;
    if (e) {
        scale = _mm256_maskload_ps(e->scale + col, live);
        shift = _mm256_maskload_ps(e->shift + col, live);
        if (has_prelu) {
            pbias = _mm256_maskload_ps(e->pbias + col, live);
            pslope = _mm256_maskload_ps(e->pslope + col, live);
            pshift = _mm256_maskload_ps(e->pshift + col, live);
        }
    }
    const __m256i idx = _mm256_loadu_si256((const __m256i *)res_idx);
    const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7), k = _mm256_set1_epi32((int32_t)j->k);
    float *out = j->y + t0 * n + col;
    for (int i = 0; i < nt; i++, out += n) {
        __m256i count;
        if (narrow) {
            count = _mm256_loadu_si256((const __m256i *)((const int32_t *)pop + i * BROWS));
        } else {
            const int64_t *p = (const int64_t *)pop + i * BROWS;
            const __m256i p0 = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)p), low_dwords);
            const __m256i p1 = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(p + 4)), low_dwords);
            count = _mm256_permute2x128_si256(p0, p1, 0x20);
        }
        const __m256i dot = _mm256_sub_epi32(k, _mm256_slli_epi32(count, 1));
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), alpha);
        if (has_bias) v = _mm256_add_ps(v, bias);
        if (e) {
            v = _mm256_mul_ps(v, scale);
            v = _mm256_add_ps(v, shift);
            if (res) {
                const float *row = res + (t0 + i) * res_row;
                const __m256 r = res_col >= 0 ? _mm256_maskload_ps(row + res_col, live)
                                              : _mm256_mask_i32gather_ps(zero, row, idx, livef, 4);
                v = _mm256_add_ps(v, r);
            }
            if (has_prelu) {
                const __m256 u = _mm256_add_ps(v, pbias);
                const __m256 ge = _mm256_cmp_ps(u, zero, _CMP_GE_OQ);
                v = _mm256_add_ps(_mm256_blendv_ps(_mm256_mul_ps(u, pslope), u, ge), pshift);
            }
        }
        if (rows == BROWS) _mm256_storeu_ps(out, v); /* a masked store is microcoded on AMD */
        else _mm256_maskstore_ps(out, live, v);
    }
}

TAVX2 static void finish_256(const bgemm_job *j, const int64_t *pop, int64_t t0, int nt, int64_t b,
                             int rows) {
    finish_256_body(j, pop, t0, nt, b, rows, 0);
}

/* the nibble path's finish: pop[i * 8 + r] int32 */
TAVX2 static void finish_256_narrow(const bgemm_job *j, const int32_t *pop, int64_t t0, int nt,
                                    int64_t b, int rows) {
    finish_256_body(j, pop, t0, nt, b, rows, 1);
}

/* the finish step of the job's path (the scalar one where K does not fit the int32 lanes) */
static void finish(const bgemm_job *j, const int64_t *pop, int64_t t0, int nt, int64_t b, int rows) {
    if (j->isa == ISA_AVX512) finish_512(j, pop, t0, nt, b, rows);
    else if (j->isa == ISA_AVX2 && j->k <= INT32_MAX) finish_256(j, pop, t0, nt, b, rows);
    else finish_scalar(j, pop, t0, nt, b, rows);
}

/* the rows of block b that exist (the last block of N % 8 != 0 outputs is short) */
static int block_rows(const bgemm_job *j, int64_t b) {
    return (int)(j->n - b * BROWS < BROWS ? j->n - b * BROWS : BROWS);
}

/* Blocks b .. b + nb - 1 for tokens t0 .. t1 - 1, their counts at pop + (bi * TOKENS + i) * 8:
 * one finish per block for the chunk's tokens, so its per-channel set-up is paid once. */
static void finish_blocks(const bgemm_job *j, const int64_t *pop, int64_t t0, int64_t t1, int64_t b,
                          int64_t nb) {
    for (int64_t bi = 0; bi < nb; bi++) {
        const int64_t bb = b + bi;
        const int rows = block_rows(j, bb);
        finish(j, pop + bi * TOKENS * BROWS, t0, (int)(t1 - t0), bb, rows);
    }
}

/* AVX-512 with a full group of tokens: two weight blocks at a time, so each broadcast token word
 * meets 16 rows (measured: 1.2x on convolutions; a GEMV, bound by reading the weights, is 1.4x
 * slower with two weight streams) */
static int pair_blocks(const bgemm_job *j) { return j->isa == ISA_AVX512 && j->m >= NT512; }

static void bgemm_chunk(const void *ctx, int64_t chunk) {
    const bgemm_job *j = ctx;
    const int64_t nblocks = (j->n + BROWS - 1) / BROWS;
    const int64_t t0 = (chunk % j->token_chunks) * TOKENS;
    const int64_t t1 = t0 + TOKENS < j->m ? t0 + TOKENS : j->m;
    const int64_t b0 = (chunk / j->token_chunks) * j->blocks_per_chunk;
    const int64_t b1 = b0 + j->blocks_per_chunk < nblocks ? b0 + j->blocks_per_chunk : nblocks;
    const int step = j->isa == ISA_AVX512 ? NT512 : j->isa == ISA_AVX2 ? NT256 : 1;
    const int64_t kw = j->map.taps * j->map.cw;
    if (j->nib) { /* passes of up to NIB_TILES tiles (b0 is even: tiles are pairs of blocks) */
        int32_t counts[2 * NIB_TILES * TOKENS * BROWS]; /* block bi, token t0 + i: (bi * TOKENS + i) * 8 */
        for (int64_t b = b0; b < b1; b += 2 * NIB_TILES) {
            const int64_t nbl = b1 - b < 2 * NIB_TILES ? b1 - b : 2 * NIB_TILES;
            const uint8_t *wn = j->nib + (b / 2) * kw * NIB_WORD;
            for (int64_t t = t0; t < t1; t += 2) { /* a lone last token goes twice: its twin's
                                                      * counts land in a free slot */
                const int64_t toff[2] = {j->toff[t], j->toff[t + 1 < t1 ? t + 1 : t]};
                nib_pair(wn, kw * NIB_WORD, j->tables, toff, j->map, counts + (t - t0) * BROWS,
                         TOKENS * BROWS);
            }
            for (int64_t bi = 0; bi < nbl; bi++) {
                const int64_t bb = b + bi;
                const int rows = block_rows(j, bb);
                finish_256_narrow(j, counts + bi * TOKENS * BROWS, t0, (int)(t1 - t0), bb, rows);
            }
        }
        return;
    }
    int64_t pop[2 * NIB_TILES * TOKENS * BROWS]; /* block b + bi, token t0 + i: (bi * TOKENS + i) * 8 */
    const uint64_t *a[NT512];
    const int64_t bstep = pair_blocks(j) ? 2 : 1;
    for (int64_t b = b0; b < b1; b += bstep) {
        const int nb = b + 1 < b1 && bstep == 2 ? 2 : 1;
        const uint64_t *w = j->w + b * kw * BROWS;
        for (int64_t t = t0; t < t1; t += step) {
            const int nt = (int)(t1 - t < step ? t1 - t : step);
            for (int i = 0; i < nt; i++) a[i] = j->a + j->toff[t + i];
            int64_t *p = pop + (t - t0) * BROWS;
            if (j->isa == ISA_AVX512) block_512(w, kw * BROWS, nb, a, nt, j->map, p);
            else if (j->isa == ISA_AVX2) block_256(w, a, nt, j->map, p);
            else block_portable(w, a, nt, j->map, p);
        }
        finish_blocks(j, pop, t0, t1, b, nb);
    }
}

static void run_bgemm(bgemm_job *j, int nthreads) {
    if (j->m <= 0 || j->n <= 0) return;
    const int64_t nblocks = (j->n + BROWS - 1) / BROWS;
    j->token_chunks = (j->m + TOKENS - 1) / TOKENS;
    /* enough chunks for the threads to balance, each a run of blocks sharing its tokens */
    const int64_t want = 4 * (int64_t)(nthreads > 0 ? nthreads : 1);
    const int64_t per = (j->token_chunks * nblocks + want - 1) / want / j->token_chunks;
    j->blocks_per_chunk = per < 1 ? 1 : per;
    if (pair_blocks(j)) j->blocks_per_chunk += j->blocks_per_chunk & 1;
    /* the nibble path: whole passes of tiles per chunk (its tables are shared by the tiles) */
    if (j->nib) j->blocks_per_chunk = nblocks < 2 * NIB_TILES ? nblocks + (nblocks & 1) : 2 * NIB_TILES;
    const int64_t block_chunks = (nblocks + j->blocks_per_chunk - 1) / j->blocks_per_chunk;
    parallel_for(bgemm_chunk, j, j->token_chunks * block_chunks, nthreads);
}

/* Packing of activation rows, in chunks of rows. */
typedef struct {
    int isa;
    const float *x;
    const float *t;
    int64_t rows, k, kw, per_chunk;
    uint64_t *out;
} pack_job;

static void pack_chunk(const void *ctx, int64_t chunk) {
    const pack_job *p = ctx;
    const int64_t r1 = (chunk + 1) * p->per_chunk < p->rows ? (chunk + 1) * p->per_chunk : p->rows;
    for (int64_t r = chunk * p->per_chunk; r < r1; r++)
        pack_row(p->isa, p->x + r * p->k, p->k, p->t, p->out + r * p->kw);
}

static void pack_rows(int isa, const float *x, int64_t rows, int64_t k, const float *t,
                      uint64_t *out, int nthreads) {
    pack_job p = {isa, x, t, rows, k, words_of(k), 0, out};
    p.per_chunk = rows * k < 65536 ? rows : (rows + 4 * nthreads - 1) / (4 * nthreads);
    if (p.per_chunk < 1) p.per_chunk = 1;
    parallel_for(pack_chunk, &p, (rows + p.per_chunk - 1) / p.per_chunk, nthreads);
}

/* Activation rows (M, K) float32 -> (M, KW) words, bit = (x < t[k]); exposed for the tests. */
LB_EXPORT void lb_binary_pack_activations(int isa, const float *x, int64_t m, int64_t k,
                                          const float *t, uint64_t *out) {
    pack_rows(isa, x, m, k, t, out, 1);
}

/* y (M, N) = sign(x - t) . w_b * alpha + bias, then the epilogue ep (NULL: none). Returns 0, or -1
 * when out of memory. */
LB_EXPORT int lb_binary_linear(int isa, const float *x, int64_t m, int64_t k, const float *t,
                               const uint64_t *w, int64_t n, const float *alpha, int per_channel,
                               const float *bias, const lb_binary_epilogue *ep, float *y,
                               int nthreads) {
    const int64_t kw = words_of(k), zero = 0;
    uint64_t *a = xalloc((size_t)(m * kw) * sizeof(uint64_t));
    int64_t *toff = xalloc((size_t)m * sizeof(int64_t));
    int rc = -1;
    if (!a || !toff) goto done;
    pack_rows(isa, x, m, k, t, a, nthreads);
    for (int64_t i = 0; i < m; i++) toff[i] = i * kw;
    const float *res = ep && ep->residual ? x : NULL;
    bgemm_job j = {isa,  a,           toff, {&zero, 1, kw}, w,    m,    n, k, alpha,
                   per_channel, bias, ep,   res,            k, y, NULL, NULL, 0, 0};
    run_bgemm(&j, nthreads);
    rc = 0;
done:
    free(a), free(toff);
    return rc;
}

/* 2x2 max-pooling, stride 2, odd sizes floored, after an optional per-channel affine map:
 * x (B, C, H, W) float32 NCHW -> y (B, H/2, W/2, C) NHWC, the layout the convolutions read:
 *
 *     a = x * scale[c] + shift[c]          (two float32 roundings; scale NULL: a = x)
 *     y = max(max(a00, a10), max(a01, a11))
 *
 * (a10 the pixel below a00, a01 the one to its right), NaN propagated, the operations and order
 * of lowbit.bnn (a folded BatchNorm then torch.maximum), so the values are torch's. AVX2, C a
 * multiple of 8 and W/2 >= 8: eight planes at a time, 8 outputs of a row each, transposed so
 * that each pixel's 8 channels are one 32-byte store (the last 8 of a row overlap the previous
 * ones when W/2 is not a multiple of 8: the same values written twice); otherwise one value at a
 * time. 64x28x28 on a Zen 2: 16.8 us one plane at a time with 4-byte stores, 4 us this way. */

/* torch.maximum's float max: NaN if either is, else the larger (b when equal); branch-free (a
 * comparison of random values mispredicts half the time) */
static inline float max_nan(float a, float b) {
    const __m128 va = _mm_set_ss(a), vb = _mm_set_ss(b);
    return _mm_cvtss_f32(_mm_or_ps(_mm_max_ss(va, vb), _mm_cmpunord_ss(va, va)));
}

static inline float affine(float v, const float *scale, const float *shift, int64_t c) {
    if (!scale) return v;
    v = v * scale[c];
    return v + shift[c];
}

/* channel ch of image bi, output row oy, one value at a time */
static void pool_plane_row(const float *x, int64_t c, int64_t h, int64_t w, int64_t bi,
                           int64_t ch, int64_t oy, const float *scale, const float *shift,
                           float *y) {
    const int64_t wo = w / 2;
    const float *r0 = x + ((bi * c + ch) * h + 2 * oy) * w, *r1 = r0 + w;
    float *out = y + ((bi * (h / 2) + oy) * wo) * c + ch;
    for (int64_t ox = 0; ox < wo; ox++) {
        const float a00 = affine(r0[2 * ox], scale, shift, ch), a10 = affine(r1[2 * ox], scale, shift, ch);
        const float a01 = affine(r0[2 * ox + 1], scale, shift, ch);
        const float a11 = affine(r1[2 * ox + 1], scale, shift, ch);
        out[ox * c] = max_nan(max_nan(a00, a10), max_nan(a01, a11));
    }
}

LB_INLINE TAVX2 __m256 max_nan_256(__m256 a, __m256 b) {
    return _mm256_or_ps(_mm256_max_ps(a, b), _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}

/* outputs ox .. ox + 7 of one plane's row pair r0, r1 (input columns 2 ox .. 2 ox + 15) */
LB_INLINE TAVX2 __m256 pool8(const float *r0, const float *r1, __m256 s, __m256 t, int affine_on) {
    __m256 a = _mm256_loadu_ps(r0), b = _mm256_loadu_ps(r0 + 8);
    __m256 c = _mm256_loadu_ps(r1), d = _mm256_loadu_ps(r1 + 8);
    if (affine_on) {
        a = _mm256_add_ps(_mm256_mul_ps(a, s), t), b = _mm256_add_ps(_mm256_mul_ps(b, s), t);
        c = _mm256_add_ps(_mm256_mul_ps(c, s), t), d = _mm256_add_ps(_mm256_mul_ps(d, s), t);
    }
    const __m256 v0 = max_nan_256(a, c), v1 = max_nan_256(b, d); /* max(a00, a10), max(a01, a11) */
    /* even and odd columns, per 128-bit lane: outputs [0 1 4 5 | 2 3 6 7], then in order */
    const __m256 m = max_nan_256(_mm256_shuffle_ps(v0, v1, 0x88), _mm256_shuffle_ps(v0, v1, 0xDD));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(m), 0xD8));
}

/* m[p] = 8 values of channel p -> m[k] = the 8 channels of value k */
LB_INLINE TAVX2 void transpose8(__m256 *m) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(m[2 * i], m[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(m[2 * i], m[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        m[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        m[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* channels ch .. ch + 7 of image bi, every output pixel (wo >= 8) */
TAVX2 static void pool_planes8(const float *x, int64_t c, int64_t h, int64_t w, int64_t bi,
                               int64_t ch, const float *scale, const float *shift, float *y) {
    const int64_t ho = h / 2, wo = w / 2;
    __m256 s[8], t[8];
    for (int p = 0; p < 8; p++) {
        s[p] = _mm256_set1_ps(scale ? scale[ch + p] : 1.0f);
        t[p] = _mm256_set1_ps(scale ? shift[ch + p] : 0.0f);
    }
    const float *plane = x + (bi * c + ch) * h * w;
    for (int64_t oy = 0; oy < ho; oy++) {
        float *out = y + ((bi * ho + oy) * wo) * c + ch;
        for (int64_t ox = 0; ox < wo; ox += 8) {
            if (ox + 8 > wo) ox = wo - 8; /* the last 8, overlapping */
            __m256 m[8];
            for (int p = 0; p < 8; p++) {
                const float *r0 = plane + p * h * w + 2 * oy * w + 2 * ox;
                m[p] = scale ? pool8(r0, r0 + w, s[p], t[p], 1) : pool8(r0, r0 + w, s[p], t[p], 0);
            }
            transpose8(m);
            for (int k = 0; k < 8; k++) _mm256_storeu_ps(out + (ox + k) * c, m[k]);
        }
    }
}

LB_EXPORT void lb_binary_maxpool2x2_nhwc(int isa, const float *x, int64_t b, int64_t c, int64_t h,
                                         int64_t w, const float *scale, const float *shift,
                                         float *y) {
    const int64_t ho = h / 2, wo = w / 2;
    const int64_t vector = isa != ISA_PORTABLE && wo >= 8 ? c / 8 * 8 : 0; /* channels by 8 */
    for (int64_t bi = 0; bi < b; bi++) {
        for (int64_t ch = 0; ch < vector; ch += 8) pool_planes8(x, c, h, w, bi, ch, scale, shift, y);
        for (int64_t ch = vector; ch < c; ch++)
            for (int64_t oy = 0; oy < ho; oy++) pool_plane_row(x, c, h, w, bi, ch, oy, scale, shift, y);
    }
}

/* y (B * Ho * Wo, N) = conv(sign(x - t), w_b) * alpha + bias, then the epilogue ep (NULL: none),
 * x (B, H, W, C) float32 NHWC; dims: b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo; nib: the
 * weight's nibble tiles (lb_binary_nibble_weights) or NULL, taken on the AVX2 path while the
 * image's tables stay within NIB_MAX_WORDS words (batch 1 of the usual shapes). Returns 0, or -1
 * when out of memory. */
LB_EXPORT int lb_binary_conv2d(int isa, const float *x, const int64_t *d, const float *t,
                               const uint64_t *w, const uint8_t *nib, int64_t n, const float *alpha,
                               int per_channel, const float *bias, const lb_binary_epilogue *ep,
                               float *y, int nthreads) {
    const int64_t B = d[0], C = d[1], H = d[2], W = d[3], KH = d[4], KW = d[5], SH = d[6];
    const int64_t SW = d[7], PH = d[8], PW = d[9], DH = d[10], DW = d[11], HO = d[12], WO = d[13];
    const int64_t cw = words_of(C), hp = H + 2 * PH, wp = W + 2 * PW, m = B * HO * WO;
    uint64_t *img = xalloc((size_t)(B * hp * wp * cw) * sizeof(uint64_t));
    uint64_t *packed = xalloc((size_t)(B * H * W * cw) * sizeof(uint64_t));
    int64_t *toff = xalloc((size_t)m * sizeof(int64_t));
    int64_t *tapoff = xalloc((size_t)(KH * KW) * sizeof(int64_t));
    uint8_t *tables = NULL;
    int rc = -1;
    if (!img || !packed || !toff || !tapoff) goto done;
    /* binarize every pixel (B*H*W rows of C), then place the rows inside a +1 (zero-bit) border */
    pack_rows(isa, x, B * H * W, C, t, packed, nthreads);
    memset(img, 0, (size_t)(B * hp * wp * cw) * sizeof(uint64_t));
    for (int64_t r = 0; r < B * H; r++) {
        const int64_t b = r / H, yy = r % H;
        memcpy(img + ((b * hp + yy + PH) * wp + PW) * cw, packed + r * W * cw,
               (size_t)(W * cw) * sizeof(uint64_t));
    }
    /* output pixel p's patch: tap (i, j) at img + toff[p] + tapoff[i * KW + j], inside the image */
    for (int64_t p = 0; p < m; p++) {
        const int64_t b = p / (HO * WO), oy = (p / WO) % HO, ox = p % WO;
        toff[p] = ((b * hp + oy * SH) * wp + ox * SW) * cw;
    }
    for (int64_t i = 0; i < KH; i++)
        for (int64_t jj = 0; jj < KW; jj++) tapoff[i * KW + jj] = (i * DH * wp + jj * DW) * cw;
    const float *res = ep && ep->residual ? x : NULL; /* output pixel p reads input pixel p */
    bgemm_job j = {isa,   img,         toff, {tapoff, KH * KW, cw}, w,    m,    n, C * KH * KW,
                   alpha, per_channel, bias, ep,                     res, C, y, NULL, NULL, 0, 0};
    const int64_t words = B * hp * wp * cw;
    if (nib && isa == ISA_AVX2 && KH * KW * cw <= NIB_MAX_KW && words <= NIB_MAX_WORDS) {
        tables = xalloc((size_t)(words * NIB_WORD));
        if (!tables) goto done;
        /* in bands on the team (two threads on a Zen 2: 86 -> 79 us for 128->128 at 16x16, where
         * the calling thread alone built them) */
        const int64_t bands = 2 * (int64_t)(nthreads > 0 ? nthreads : 1);
        tables_job tj = {img, words, tables, (words + bands - 1) / bands};
        parallel_for(tables_chunk, &tj, (words + tj.per - 1) / tj.per, nthreads);
        j.nib = nib, j.tables = tables;
    }
    run_bgemm(&j, nthreads);
    rc = 0;
done:
    free(img), free(packed), free(toff), free(tapoff), free(tables);
    return rc;
}
