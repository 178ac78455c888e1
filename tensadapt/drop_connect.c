/* DropConnect on a low-rank update, folded into the frozen weight (AVX2 + FMA, OpenMP).
 *
 * The keep decision of entry e (its row-major index in the rows x cols matrix, e < 2^32) is
 * a keyed hash, so a mask is never stored: the backward pass draws the same one again.
 *
 *   h(e)   = mix(mix(e ^ k0) ^ k1)          mix: a 32-bit integer finaliser (a bijection)
 *   keep_e = (h(e) >> 16) >= threshold      threshold = round(p * 2^16)
 *
 * so P(keep) = 1 - threshold / 2^16, the law of tensadapt.low_rank.keep_mask.
 *
 *   ta_drop_fold:  out = W + c * (m (.) B A)     one pass; B A formed in registers
 *   ta_drop_grad:  g   = c * (m (.) g)           in place
 *   ta_keep_mask:  the mask m as bytes           (for paths that do not fold)
 *   ta_drop_factor_grads: gA = c B^T (m (.) G), gB = c (m (.) G) A^T for G = gy^T x,
 *                  as thin passes minus the dropped entries' share: p of the dense G
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KERNEL __attribute__((target("avx2,fma")))
#define TP 32 /* tokens per chunk: a row's run of them is four AVX2 registers (TA_DOT) */

static inline uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline int keeps(uint32_t e, uint32_t k0, uint32_t k1, int threshold) {
    return (int)(mix(mix(e ^ k0) ^ k1) >> 16) >= threshold;
}

KERNEL static inline __m256i mix8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bU));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    return x;
}

/* All-ones lanes where entries e .. e+7 keep. */
KERNEL static inline __m256 keep8(uint32_t e, __m256i k0, __m256i k1, __m256i below) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)e), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i h = mix8(_mm256_xor_si256(mix8(_mm256_xor_si256(idx, k0)), k1));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_srli_epi32(h, 16), below));
}

/* out[i, :] = w[i, :] + c * (m (.) b[i, :] a) for rows i; a is R x cols, b is rows x R. */
KERNEL static void fold_rows(const float *w, long cols, const float *a, const float *b, long R,
                             float c, uint32_t k0, uint32_t k1, int threshold, float *out,
                             long i0, long i1) {
    const __m256i K0 = _mm256_set1_epi32((int)k0), K1 = _mm256_set1_epi32((int)k1);
    const __m256i below = _mm256_set1_epi32(threshold - 1);
    const __m256 cv = _mm256_set1_ps(c);
    for (long i = i0; i < i1; ++i) {
        const float *bi = b + i * R, *wi = w + i * cols;
        float *oi = out + i * cols;
        const uint32_t e0 = (uint32_t)(i * cols);
        long j = 0;
        for (; j + 8 <= cols; j += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (long r = 0; r < R; ++r)
                acc = _mm256_fmadd_ps(_mm256_broadcast_ss(bi + r), _mm256_loadu_ps(a + r * cols + j),
                                      acc);
            acc = _mm256_and_ps(acc, keep8(e0 + (uint32_t)j, K0, K1, below));
            _mm256_storeu_ps(oi + j, _mm256_fmadd_ps(acc, cv, _mm256_loadu_ps(wi + j)));
        }
        for (; j < cols; ++j) {
            float d = 0.0f;
            for (long r = 0; r < R; ++r) d += bi[r] * a[r * cols + j];
            oi[j] = keeps(e0 + (uint32_t)j, k0, k1, threshold) ? wi[j] + c * d : wi[j];
        }
    }
}

void ta_drop_fold(const float *w, long rows, long cols, const float *a, const float *b, long R,
                  float c, uint32_t k0, uint32_t k1, int threshold, float *out, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long per = (rows + T - 1) / T, i0 = t * per, i1 = i0 + per < rows ? i0 + per : rows;
        if (i0 < i1) fold_rows(w, cols, a, b, R, c, k0, k1, threshold, out, i0, i1);
    }
}

KERNEL static void grad_range(float *g, long n0, long n1, float c, uint32_t k0, uint32_t k1,
                              int threshold) {
    const __m256i K0 = _mm256_set1_epi32((int)k0), K1 = _mm256_set1_epi32((int)k1);
    const __m256i below = _mm256_set1_epi32(threshold - 1);
    const __m256 cv = _mm256_set1_ps(c);
    long e = n0;
    for (; e + 8 <= n1; e += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(g + e), cv);
        _mm256_storeu_ps(g + e, _mm256_and_ps(v, keep8((uint32_t)e, K0, K1, below)));
    }
    for (; e < n1; ++e) g[e] = keeps((uint32_t)e, k0, k1, threshold) ? c * g[e] : 0.0f;
}

/* Entry range of thread t out of T over n entries, in multiples of 8. */
static void entry_range(long n, int t, int T, long *n0, long *n1) {
    long per = ((n + T - 1) / T + 7) / 8 * 8;
    *n0 = t * per < n ? t * per : n;
    *n1 = *n0 + per < n ? *n0 + per : n;
}

void ta_drop_grad(float *g, long n, float c, uint32_t k0, uint32_t k1, int threshold,
                  int threads) {
#pragma omp parallel num_threads(threads)
    {
        long n0, n1;
        entry_range(n, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        if (n0 < n1) grad_range(g, n0, n1, c, k0, k1, threshold);
    }
}

void ta_keep_mask(unsigned char *out, long n, uint32_t k0, uint32_t k1, int threshold,
                  int threads) {
#pragma omp parallel num_threads(threads)
    {
        long n0, n1;
        entry_range(n, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        for (long e = n0; e < n1; ++e) out[e] = (unsigned char)keeps((uint32_t)e, k0, k1, threshold);
    }
}

/* Bit l set where entry e0 + l*step (l < 8) is dropped. */
KERNEL static inline int dropped8(uint32_t e0, __m256i steps, __m256i k0, __m256i k1,
                                  __m256i below) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)e0), steps);
    __m256i h = mix8(_mm256_xor_si256(mix8(_mm256_xor_si256(idx, k0)), k1));
    __m256i keep = _mm256_cmpgt_epi32(_mm256_srli_epi32(h, 16), below);
    return ~_mm256_movemask_ps(_mm256_castsi256_ps(keep)) & 0xff;
}

/* Row p's dropped entries (entries p*sp + q*sq, q < Q): bits[q / 8] gets bit q % 8 set
 * where entry q drops; returns their count. */
KERNEL static long row_drops(long p, long Q, long sp, long sq, uint32_t k0, uint32_t k1,
                             int threshold, unsigned char *bits) {
    const __m256i K0 = _mm256_set1_epi32((int)k0), K1 = _mm256_set1_epi32((int)k1);
    const __m256i below = _mm256_set1_epi32(threshold - 1);
    const __m256i steps = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32((int)sq));
    const uint32_t base = (uint32_t)(p * sp);
    long n = 0, q = 0;
    for (; q + 8 <= Q; q += 8) {
        int m = dropped8(base + (uint32_t)(q * sq), steps, K0, K1, below);
        bits[q / 8] = (unsigned char)m;
        n += __builtin_popcount(m);
    }
    if (q < Q) {
        int m = 0;
        for (long l = 0; q + l < Q; ++l) {
            uint32_t e = base + (uint32_t)((q + l) * sq);
            m |= ((int)(mix(mix(e ^ k0) ^ k1) >> 16) < threshold) << l;
        }
        bits[q / 8] = (unsigned char)m;
        n += __builtin_popcount(m);
    }
    return n;
}

/* lanes[m]: the panel offsets j * TP of the set bits j of the byte m, ascending. */
static int32_t lanes[256][8];

__attribute__((constructor)) static void fill_lanes(void) {
    for (int m = 0; m < 256; ++m)
        for (int j = 0, n = 0; j < 8; ++j)
            if (m >> j & 1) lanes[m][n++] = j * TP;
}

/* Row p's dropped columns q from its bits, ascending, as panel offsets q * TP into
 * off .. end. Eight offsets are written per byte of bits and the end moved by its count, so
 * no branch depends on the mask, while eight slots remain; the rest one offset at a time,
 * so nothing is written past the row's list (the next row's may be another thread's). */
KERNEL static void row_list(long Q, const unsigned char *bits, int32_t *off, const int32_t *end) {
    long q = 0;
    for (; q < Q && off + 8 <= end; q += 8) {
        const int m = bits[q / 8];
        const __m256i row = _mm256_loadu_si256((const __m256i *)lanes[m]);
        _mm256_storeu_si256((__m256i *)off,
                            _mm256_add_epi32(row, _mm256_set1_epi32((int)(q * TP))));
        off += __builtin_popcount(m);
    }
    for (; q < Q; q += 8)
        for (int m = bits[q / 8]; m; m &= m - 1) *off++ = (int32_t)((q + __builtin_ctz(m)) * TP);
}

/* The 8 x 8 block src[t .. t+8, c .. c+8] (row stride ss) transposed into dst (stride Tp). */
KERNEL static inline void transpose8(const float *s, long ss, float *d, long Tp) {
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ss);
    __m256 r2 = _mm256_loadu_ps(s + 2 * ss), r3 = _mm256_loadu_ps(s + 3 * ss);
    __m256 r4 = _mm256_loadu_ps(s + 4 * ss), r5 = _mm256_loadu_ps(s + 5 * ss);
    __m256 r6 = _mm256_loadu_ps(s + 6 * ss), r7 = _mm256_loadu_ps(s + 7 * ss);
    __m256 a0 = _mm256_unpacklo_ps(r0, r1), a1 = _mm256_unpackhi_ps(r0, r1);
    __m256 a2 = _mm256_unpacklo_ps(r2, r3), a3 = _mm256_unpackhi_ps(r2, r3);
    __m256 a4 = _mm256_unpacklo_ps(r4, r5), a5 = _mm256_unpackhi_ps(r4, r5);
    __m256 a6 = _mm256_unpacklo_ps(r6, r7), a7 = _mm256_unpackhi_ps(r6, r7);
    __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
    __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
    __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
    __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(b0, b4, 0x20));
    _mm256_storeu_ps(d + Tp, _mm256_permute2f128_ps(b1, b5, 0x20));
    _mm256_storeu_ps(d + 2 * Tp, _mm256_permute2f128_ps(b2, b6, 0x20));
    _mm256_storeu_ps(d + 3 * Tp, _mm256_permute2f128_ps(b3, b7, 0x20));
    _mm256_storeu_ps(d + 4 * Tp, _mm256_permute2f128_ps(b0, b4, 0x31));
    _mm256_storeu_ps(d + 5 * Tp, _mm256_permute2f128_ps(b1, b5, 0x31));
    _mm256_storeu_ps(d + 6 * Tp, _mm256_permute2f128_ps(b2, b6, 0x31));
    _mm256_storeu_ps(d + 7 * Tp, _mm256_permute2f128_ps(b3, b7, 0x31));
}

/* dst (C x Tp) = src[t, c] for t < T, c < C (src row stride ss), zero for T <= t < Tp.
 * Token blocks outer, so the source is read as eight sequential row streams. */
KERNEL static void pack_t(const float *src, long ss, long C, long T, long Tp, float *dst) {
    const long C8 = C / 8 * 8;
    long t = 0;
    for (; t + 8 <= T; t += 8) {
        for (long c = 0; c < C8; c += 8) transpose8(src + t * ss + c, ss, dst + c * Tp + t, Tp);
        for (long c = C8; c < C; ++c)
            for (long k = 0; k < 8; ++k) dst[c * Tp + t + k] = src[(t + k) * ss + c];
    }
    for (long c = 0; c < C; ++c)
        for (long k = t; k < Tp; ++k) dst[c * Tp + k] = k < T ? src[k * ss + c] : 0.0f;
}

KERNEL static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

KERNEL static inline float hsum1(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* <g, r[off]> over TP = 32 tokens, as the lanes of one vector, g in g0..g3. */
#define TA_DOT(acc, o)                                                                  \
    do {                                                                               \
        const float *q_ = r + (o);                                                     \
        acc = _mm256_mul_ps(g0, _mm256_loadu_ps(q_));                                  \
        acc = _mm256_fmadd_ps(g1, _mm256_loadu_ps(q_ + 8), acc);                       \
        acc = _mm256_fmadd_ps(g2, _mm256_loadu_ps(q_ + 16), acc);                      \
        acc = _mm256_fmadd_ps(g3, _mm256_loadu_ps(q_ + 24), acc);                      \
    } while (0)

/* d[k] += <g, r + off[k]> over the TP tokens for k < n: g (TP floats) in registers, eight
 * entries per group summed across lanes together, then four, then one at a time. */
KERNEL static inline void dots(const float *restrict g, const float *restrict r,
                               const int32_t *restrict off, long n, float *restrict d) {
    const __m256 g0 = _mm256_loadu_ps(g), g1 = _mm256_loadu_ps(g + 8);
    const __m256 g2 = _mm256_loadu_ps(g + 16), g3 = _mm256_loadu_ps(g + 24);
    long k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 a0, a1, a2, a3, a4, a5, a6, a7;
        TA_DOT(a0, off[k]);
        TA_DOT(a1, off[k + 1]);
        TA_DOT(a2, off[k + 2]);
        TA_DOT(a3, off[k + 3]);
        TA_DOT(a4, off[k + 4]);
        TA_DOT(a5, off[k + 5]);
        TA_DOT(a6, off[k + 6]);
        TA_DOT(a7, off[k + 7]);
        __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
        __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20),
                                   _mm256_permute2f128_ps(t0, t1, 0x31));
        _mm256_storeu_ps(d + k, _mm256_add_ps(_mm256_loadu_ps(d + k), sum));
    }
    if (k + 4 <= n) {
        __m256 a0, a1, a2, a3;
        TA_DOT(a0, off[k]);
        TA_DOT(a1, off[k + 1]);
        TA_DOT(a2, off[k + 2]);
        TA_DOT(a3, off[k + 3]);
        _mm_storeu_ps(d + k, _mm_add_ps(_mm_loadu_ps(d + k), hsum4(a0, a1, a2, a3)));
        k += 4;
    }
    for (; k < n; ++k) {
        __m256 a0;
        TA_DOT(a0, off[k]);
        d[k] += hsum1(a0);
    }
}

static void free_all(void *a, void *b, void *c, void *d) {
    free(a);
    free(b);
    free(c);
    free(d);
}

/* out += v * in over R entries. */
KERNEL static inline void axpy(long R, float v, const float *restrict in, float *restrict out) {
    long r = 0;
    const __m256 vv = _mm256_set1_ps(v);
    for (; r + 8 <= R; r += 8)
        _mm256_storeu_ps(out + r, _mm256_fmadd_ps(vv, _mm256_loadu_ps(in + r), _mm256_loadu_ps(out + r)));
    for (; r < R; ++r) out[r] += v * in[r];
}

/* Rows p0 .. p1 of outp (P x R) = D vq, and their share of outq (Q x R) = D^T vp added into
 * outq, for D given by each row's entries. */
static void contract_rows(long p0, long p1, long R, const long *start, const int32_t *off,
                          const float *d, const float *vp, const float *vq, float *outp,
                          float *outq) {
    for (long p = p0; p < p1; ++p)
        for (long k = start[p]; k < start[p + 1]; ++k) {
            const long q = off[k] / TP;
            axpy(R, d[k], vq + q * R, outp + p * R);
            axpy(R, d[k], vp + p * R, outq + q * R);
        }
}

void ta_rows_range(const float *z, long M, const float *packed, long R, float *out, long n0,
                   long n1);
void ta_cols_range(const float *u, long R, const float *z, long M, float *G, long n0, long n1);
void ta_sums_range(const float *z, long M, float *s, long n0, long n1);

/* What one thread accumulates over its token chunks. */
struct partials {
    float *ga, *gb, *gbias; /* gh^T x (R x K), h^T gy (R x M), 1^T gy (M) */
    float *dq;              /* D^T vp over the thread's rows (Q x R) */
    float *h, *gh;          /* x A^T and gy B on the chunk, TP x R */
    float *rq, *rp;         /* the chunk's transposed panels: all Q columns, the thread's rows */
};

/* Bump allocation of one thread's partials from a zeroed block. */
static struct partials carve(float *block, long R, long K, long M, long Q) {
    struct partials s;
    s.ga = block;
    s.gb = s.ga + R * K;
    s.gbias = s.gb + R * M;
    s.dq = s.gbias + M;
    s.h = s.dq + Q * R;
    s.gh = s.h + TP * R;
    s.rq = s.gh + TP * R;
    s.rp = s.rq + Q * TP;
    return s;
}

static long partial_floats(long R, long K, long M, long P, long Q) {
    return R * K + R * M + M + Q * R + 2 * TP * R + (P + Q) * TP + 16;
}

/* The factor gradients of DropConnect on a low-rank update, y = x (W + c (m (.) B A))^T:
 *
 *   gA = c B^T (m (.) G),  gB = c (m (.) G) A^T,  G = gy^T x  (out x in)
 *
 * computed as m (.) G = G - (1 - m) (.) G. The first term gives the low-rank products
 * gh^T x and h^T gy (h = x A^T, gh = gy B); the second needs G only on the dropped
 * entries, D_pq = sum_n zp[n, p] zq[n, q]: p of the dense product's multiply-adds. Both
 * run chunk by chunk over the tokens, so x and gy are read from memory about once.
 *
 * Per chunk of TP tokens, (zp, zq) = (gy, x), or (x, gy) when x is the wider, are
 * transposed into panels (token runs of length TP), so each D_pq is a dot product along
 * tokens, taken with zp's run in registers against the zq panel (Q x TP floats, in L1 and
 * L2) at each dropped column q of row p. Each row's columns make one list, so a row costs
 * one loop over some Q p entries and its mispredicted exit; lists per column block of the
 * panel (held in L1) were slower, for their many short loops. Threads split the rows p
 * (by entry count), so each owns its entries' sums, and those, their offsets and its rows'
 * panel stay in its own L2 from chunk to chunk; every thread transposes the whole
 * (narrower) zq chunk. The thin passes take the chunks in turn, eight tokens at a time,
 * with per-thread partials summed at the end.
 *
 * gy (N x M), x (N x K), a_t = A^T (K x R), b = B (M x R); pa, pb the same packed for the
 * thin passes (thin_passes.c). Writes ga (R x K), gb (M x R) and, unless NULL, gbias (M).
 * Returns 0, or -1 without memory. */
int ta_drop_factor_grads(const float *gy, long M, const float *x, long K, long N,
                         const float *a_t, const float *b, long R, const float *pa,
                         const float *pb, float c, uint32_t k0, uint32_t k1, int threshold,
                         float *ga, float *gb, float *gbias, int threads) {
    const int wide = M >= K; /* gy is zp, x is zq */
    const float *zp = wide ? gy : x, *zq = wide ? x : gy;
    const long P = wide ? M : K, Q = wide ? K : M, sp = wide ? K : 1, sq = wide ? 1 : K;
    const long row_bytes = (Q + 7) / 8;
    long *start = malloc(sizeof(long) * (size_t)(P + 1));
    unsigned char *bits = malloc((size_t)(P * row_bytes));
    if (!start || !bits) {
        free_all(start, bits, NULL, NULL);
        return -1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < P; ++p)
        start[p + 1] = row_drops(p, Q, sp, sq, k0, k1, threshold, bits + p * row_bytes);
    start[0] = 0;
    for (long p = 0; p < P; ++p) start[p + 1] += start[p];
    const long nnz = start[P], per_thread = partial_floats(R, K, M, P, Q);
    int32_t *off = malloc(sizeof(int32_t) * (size_t)(nnz + 1));
    float *d = calloc((size_t)(nnz + 8), sizeof(float));
    float *block = calloc((size_t)threads * (size_t)per_thread, sizeof(float));
    float *dp = calloc((size_t)(P * R), sizeof(float)); /* D vq (P x R) */
    if (!off || !d || !block || !dp) {
        free_all(start, bits, off, d);
        free_all(block, dp, NULL, NULL);
        return -1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < P; ++p)
        row_list(Q, bits + p * row_bytes, off + start[p], off + start[p + 1]);
    free(bits);
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        /* rows split so that each thread has about nnz / T entries */
        long p0 = 0, p1 = 0;
        for (long p = 0, goal0 = nnz * t / T, goal1 = nnz * (t + 1) / T; p <= P; ++p) {
            if (start[p] <= goal0) p0 = p;
            if (start[p] <= goal1) p1 = p;
        }
        if (t == T - 1) p1 = P;
        const long chunks = (N + TP - 1) / TP;
        struct partials s = carve(block + (size_t)t * (size_t)per_thread, R, K, M, Q);
        for (long ch = 0; ch < chunks; ++ch) {
            const long n0 = ch * TP, rows = n0 + TP < N ? TP : N - n0;
            const float *xc = x + n0 * K, *gyc = gy + n0 * M;
            if (ch % T == t) /* the thin passes, eight tokens at a time while they are in cache */
                for (long i = 0; i < rows; i += 8) {
                    const long e = i + 8 < rows ? i + 8 : rows;
                    ta_rows_range(xc, K, pa, R, s.h, i, e);
                    ta_rows_range(gyc, M, pb, R, s.gh, i, e);
                    ta_cols_range(s.gh, R, xc, K, s.ga, i, e);
                    ta_cols_range(s.h, R, gyc, M, s.gb, i, e);
                    if (gbias != NULL) ta_sums_range(gyc, M, s.gbias, i, e);
                }
            if (p0 >= p1) continue;
            pack_t(zq + n0 * Q, Q, Q, rows, TP, s.rq);
            pack_t(zp + n0 * P + p0, P, p1 - p0, rows, TP, s.rp);
            for (long p = p0; p < p1; ++p)
                dots(s.rp + (p - p0) * TP, s.rq, off + start[p], start[p + 1] - start[p], d + start[p]);
        }
        /* the thread's rows' sums are complete: D vq on them, and their share of D^T vp */
        contract_rows(p0, p1, R, start, off, d, wide ? b : a_t, wide ? a_t : b, dp, s.dq);
        if (t == 0) used = T;
    }
    /* sum the partials into thread 0's: they are laid out alike, up to the chunk buffers */
    const long summed = R * K + R * M + M + Q * R;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long k = 0; k < summed; ++k)
        for (int t = 1; t < used; ++t) block[k] += block[(size_t)t * (size_t)per_thread + (size_t)k];
    const struct partials s = carve(block, R, K, M, Q);
    /* D^T B (K x R) and D A^T (M x R) */
    const float *da_t = wide ? s.dq : dp, *db = wide ? dp : s.dq;
    for (long r = 0; r < R; ++r)
        for (long k = 0; k < K; ++k) ga[r * K + k] = c * (s.ga[r * K + k] - da_t[k * R + r]);
    for (long m = 0; m < M; ++m)
        for (long r = 0; r < R; ++r) gb[m * R + r] = c * (s.gb[r * M + m] - db[m * R + r]);
    if (gbias != NULL) memcpy(gbias, s.gbias, sizeof(float) * (size_t)M);
    free_all(start, off, d, block);
    free(dp);
    return 0;
}
