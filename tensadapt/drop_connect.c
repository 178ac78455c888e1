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
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define KERNEL __attribute__((target("avx2,fma")))

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
