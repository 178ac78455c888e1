/* Thin passes over token-sized float32 activations (AVX2 + FMA, OpenMP over tokens).
 *
 * A low-rank adapter meets each big activation z (N x M, row-major) with a thin matrix of
 * rank R (R << M) in two ways:
 *
 *   ta_rows_times:  out = z P          (N x R)   e.g. h = x A^T, gh = gy B
 *   ta_cols_reduce: G   = u^T z        (R x M)   e.g. gA^T = gh^T x, gB^T = h^T gy
 *   ta_grad_pass:   both of the above on the same z in one read (gh = gy B, gB^T = hb^T gy)
 *
 * Each pass is bound by the read of z; CPU BLAS runs these shapes well below that speed.
 * P arrives packed as (ceil(R / 8), M, 8), zero padded, so each token row of z meets one
 * 8-wide panel row per column of z. Reductions accumulate per-thread partials over token
 * ranges, then sum them. Only built and called where the CPU reports AVX2 and FMA.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define KERNEL __attribute__((target("avx2,fma")))
#define ROW_BLOCK 8

int ta_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

KERNEL static inline void store_cols(float *dst, __m256 v, long cols) {
    if (cols >= 8) {
        _mm256_storeu_ps(dst, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        memcpy(dst, tmp, sizeof(float) * (size_t)cols);
    }
}

/* out[n, :R] = z[n, :M] P for n in [n0, n1); P packed (groups, M, 8). */
KERNEL static void rows_times(const float *z, long M, const float *packed, long R, float *out,
                              long n0, long n1) {
    const long groups = (R + 7) / 8;
    long n = n0;
    for (; n + 4 <= n1; n += 4) {
        const float *z0 = z + n * M;
        for (long g = 0; g < groups; ++g) {
            const float *p = packed + g * M * 8;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (long m = 0; m < M; ++m) {
                __m256 pm = _mm256_loadu_ps(p + m * 8);
                c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(z0 + m), pm, c0);
                c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(z0 + M + m), pm, c1);
                c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(z0 + 2 * M + m), pm, c2);
                c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(z0 + 3 * M + m), pm, c3);
            }
            long cols = R - g * 8;
            store_cols(out + n * R + g * 8, c0, cols);
            store_cols(out + (n + 1) * R + g * 8, c1, cols);
            store_cols(out + (n + 2) * R + g * 8, c2, cols);
            store_cols(out + (n + 3) * R + g * 8, c3, cols);
        }
    }
    for (; n < n1; ++n) {
        for (long g = 0; g < groups; ++g) {
            const float *p = packed + g * M * 8;
            __m256 c0 = _mm256_setzero_ps();
            for (long m = 0; m < M; ++m)
                c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(z + n * M + m), _mm256_loadu_ps(p + m * 8),
                                     c0);
            store_cols(out + n * R + g * 8, c0, R - g * 8);
        }
    }
}

/* G[r, m] += sum_{n in [n0, n1)} u[n, r] z[n, m]; u rows of stride R. */
KERNEL static void cols_reduce(const float *u, long R, const float *z, long M, float *G, long n0,
                               long n1) {
    long n = n0;
    for (; n + ROW_BLOCK <= n1; n += ROW_BLOCK) {
        const float *zn = z + n * M, *un = u + n * R;
        long m = 0;
        for (; m + 8 <= M; m += 8) {
            __m256 z0 = _mm256_loadu_ps(zn + m), z1 = _mm256_loadu_ps(zn + M + m);
            __m256 z2 = _mm256_loadu_ps(zn + 2 * M + m), z3 = _mm256_loadu_ps(zn + 3 * M + m);
            __m256 z4 = _mm256_loadu_ps(zn + 4 * M + m), z5 = _mm256_loadu_ps(zn + 5 * M + m);
            __m256 z6 = _mm256_loadu_ps(zn + 6 * M + m), z7 = _mm256_loadu_ps(zn + 7 * M + m);
            for (long r = 0; r < R; ++r) {
                __m256 a = _mm256_loadu_ps(G + r * M + m);
                __m256 b = _mm256_mul_ps(_mm256_broadcast_ss(un + r), z0);
                a = _mm256_fmadd_ps(_mm256_broadcast_ss(un + R + r), z1, a);
                b = _mm256_fmadd_ps(_mm256_broadcast_ss(un + 2 * R + r), z2, b);
                a = _mm256_fmadd_ps(_mm256_broadcast_ss(un + 3 * R + r), z3, a);
                b = _mm256_fmadd_ps(_mm256_broadcast_ss(un + 4 * R + r), z4, b);
                a = _mm256_fmadd_ps(_mm256_broadcast_ss(un + 5 * R + r), z5, a);
                b = _mm256_fmadd_ps(_mm256_broadcast_ss(un + 6 * R + r), z6, b);
                a = _mm256_fmadd_ps(_mm256_broadcast_ss(un + 7 * R + r), z7, a);
                _mm256_storeu_ps(G + r * M + m, _mm256_add_ps(a, b));
            }
        }
        for (; m < M; ++m)
            for (long i = 0; i < ROW_BLOCK; ++i)
                for (long r = 0; r < R; ++r) G[r * M + m] += un[i * R + r] * zn[i * M + m];
    }
    for (; n < n1; ++n)
        for (long r = 0; r < R; ++r)
            for (long m = 0; m < M; ++m) G[r * M + m] += u[n * R + r] * z[n * M + m];
}

/* Token range of thread t out of T, in whole row blocks. */
static void token_range(long N, int t, int T, long *n0, long *n1) {
    long blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    long per = (blocks + T - 1) / T;
    *n0 = t * per * ROW_BLOCK;
    *n1 = *n0 + per * ROW_BLOCK;
    if (*n0 > N) *n0 = N;
    if (*n1 > N) *n1 = N;
}

/* Sums the per-thread partials into G (partials[0] is G itself). */
static void sum_partials(float *G, float *extra, int T, long size) {
    for (int t = 1; t < T; ++t) {
        const float *p = extra + (size_t)(t - 1) * (size_t)size;
        for (long i = 0; i < size; ++i) G[i] += p[i];
    }
}

/* Token-range forms for other kernels in this library (drop_connect.c). */
void ta_rows_range(const float *z, long M, const float *packed, long R, float *out, long n0,
                   long n1) {
    rows_times(z, M, packed, R, out, n0, n1);
}

void ta_cols_range(const float *u, long R, const float *z, long M, float *G, long n0, long n1) {
    cols_reduce(u, R, z, M, G, n0, n1);
}

void ta_rows_times(const float *z, long N, long M, const float *packed, long R, float *out,
                   int threads) {
#pragma omp parallel num_threads(threads)
    {
        long n0, n1;
        token_range(N, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        if (n0 < n1) rows_times(z, M, packed, R, out, n0, n1);
    }
}

/* G (Ru x M) = u^T z over all tokens, per-thread partials summed; with packed != NULL also
 * out = z P on the same row blocks while they are in cache. 0, or -1 without scratch memory. */
static int reduce_tokens(const float *z, long N, long M, const float *packed, long R, float *out,
                         const float *u, long Ru, float *G, int threads) {
    const long size = Ru * M;
    float *extra = threads > 1 ? calloc((size_t)(threads - 1) * (size_t)size, sizeof(float)) : NULL;
    if (threads > 1 && extra == NULL) return -1;
    memset(G, 0, sizeof(float) * (size_t)size);
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long n0, n1;
        token_range(N, t, T, &n0, &n1);
        float *dst = t == 0 ? G : extra + (size_t)(t - 1) * (size_t)size;
        for (long n = n0; n < n1; n += ROW_BLOCK) {
            long e = n + ROW_BLOCK < n1 ? n + ROW_BLOCK : n1;
            if (packed != NULL) rows_times(z, M, packed, R, out, n, e);
            cols_reduce(u, Ru, z, M, dst, n, e);
        }
        if (t == 0) used = T;
    }
    sum_partials(G, extra, used, size);
    free(extra);
    return 0;
}

/* G (R x M) = u^T z. */
int ta_cols_reduce(const float *u, long N, long R, const float *z, long M, float *G, int threads) {
    return reduce_tokens(z, N, M, NULL, 0, NULL, u, R, G, threads);
}

/* One read of gy (N x M): gh = gy P (N x R, P packed from B) and G = hb^T gy (Rh x M). */
int ta_grad_pass(const float *gy, long N, long M, const float *packed, long R, float *gh,
                 const float *hb, long Rh, float *G, int threads) {
    return reduce_tokens(gy, N, M, packed, R, gh, hb, Rh, G, threads);
}
