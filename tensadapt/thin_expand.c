/* The thin-to-wide product of a low-rank adapter (AVX2 + FMA, OpenMP over tokens):
 *
 *   ta_rows_expand:  out = C + u P    (N x M)   e.g. b + h B^T, gh A, W + B A
 *
 * u is N x R (thin), P is R x M row-major, out is N x M; C is a row broadcast to every token
 * (a bias), a full N x M matrix (a frozen weight), or absent. Where the update stays apart
 * from the frozen weight (rank or input dropout), the forward forms b + h B^T and the backward
 * gh A before the big matmul accumulates into them; where it is folded, W' = W + B A. CPU BLAS runs these shapes
 * (K = R of 8 to 32) at a third to a half of the FMA peak; here each 6 x 16 tile of out stays
 * in registers over all R, P is read from cache once per six token rows, and out is written
 * once. Only built and called where the CPU reports AVX2 and FMA.
 */
#include <immintrin.h>
#include <omp.h>
#include <string.h>

#define KERNEL __attribute__((target("avx2,fma")))
#define TILE_ROWS 6 /* token rows per register tile: 12 accumulators, 2 panel registers */

/* out[n0 + i, m : m + 8 S] = C[n0 + i, m : m + 8 S] + sum_r u[n0 + i, r] P[r, m : m + 8 S]
 * for i < RR (C's rows cs apart: 0 for a bias, M for a matrix), with RR and S compile-time
 * constants after inlining. */
KERNEL static inline __attribute__((always_inline)) void expand_tile(
    const float *u, long R, const float *P, long M, const float *C, long cs, float *out,
    long n0, const int RR, long m, const int S) {
    const __m256 z = _mm256_setzero_ps();
    __m256 a0 = z, a1 = z, a2 = z, a3 = z, a4 = z, a5 = z;
    __m256 b0 = z, b1 = z, b2 = z, b3 = z, b4 = z, b5 = z;
    const float *un = u + n0 * R;
    for (long r = 0; r < R; ++r) {
        const __m256 p0 = _mm256_loadu_ps(P + r * M + m);
        const __m256 p1 = S > 1 ? _mm256_loadu_ps(P + r * M + m + 8) : z;
#define ACC(j)                                                  \
    if (RR > j) {                                               \
        const __m256 uj = _mm256_broadcast_ss(un + j * R + r);  \
        a##j = _mm256_fmadd_ps(uj, p0, a##j);                   \
        if (S > 1) b##j = _mm256_fmadd_ps(uj, p1, b##j);        \
    }
        ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5)
#undef ACC
    }
    /* C is added to the finished sum, as BLAS does: W + B A then rounds like the merged
     * weight W + (B A), and a merge followed by an unmerge gives back the same W' */
    float *o = out + n0 * M + m;
    const float *c = C ? C + n0 * cs + m : NULL;
#define OUT(j)                                                                                   \
    if (RR > j) {                                                                                \
        if (c) a##j = _mm256_add_ps(a##j, _mm256_loadu_ps(c + j * cs));                          \
        _mm256_storeu_ps(o + j * M, a##j);                                                       \
        if (S > 1) {                                                                             \
            if (c) b##j = _mm256_add_ps(b##j, _mm256_loadu_ps(c + j * cs + 8));                  \
            _mm256_storeu_ps(o + j * M + 8, b##j);                                               \
        }                                                                                        \
    }
    OUT(0) OUT(1) OUT(2) OUT(3) OUT(4) OUT(5)
#undef OUT
}

/* expand_tile with RR (1 to 6) and S (1 or 2) as constants. */
KERNEL static void expand_strip(const float *u, long R, const float *P, long M, const float *C,
                                long cs, float *out, long n0, int RR, long m, int S) {
#define CASE(rr)                                                        \
    case rr:                                                            \
        if (S == 2)                                                     \
            expand_tile(u, R, P, M, C, cs, out, n0, rr, m, 2);          \
        else                                                            \
            expand_tile(u, R, P, M, C, cs, out, n0, rr, m, 1);          \
        break;
    switch (RR) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
    }
#undef CASE
}

/* Rows [n0, n1) of out: tiles of TILE_ROWS tokens x 16 columns, then one strip of 8, then
 * single columns. */
KERNEL static void rows_expand(const float *u, long R, const float *P, long M, const float *C,
                               long cs, float *out, long n0, long n1) {
    for (long n = n0; n < n1; n += TILE_ROWS) {
        const int rr = n1 - n < TILE_ROWS ? (int)(n1 - n) : TILE_ROWS;
        long m = 0;
        for (; m + 16 <= M; m += 16) expand_strip(u, R, P, M, C, cs, out, n, rr, m, 2);
        if (m + 8 <= M) {
            expand_strip(u, R, P, M, C, cs, out, n, rr, m, 1);
            m += 8;
        }
        for (; m < M; ++m)
            for (int i = 0; i < rr; ++i) {
                float s = 0.0f;
                for (long r = 0; r < R; ++r) s += u[(n + i) * R + r] * P[r * M + m];
                out[(n + i) * M + m] = C ? C[(n + i) * cs + m] + s : s;
            }
    }
}

/* out (N x M) = C + u (N x R) P (R x M); C NULL (zero), a row (cs = 0) or N x M (cs = M).
 * Tokens are split between threads in whole tiles. */
void ta_rows_expand(const float *u, long N, long R, const float *P, long M, const float *C,
                    long cs, float *out, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const long tiles = (N + TILE_ROWS - 1) / TILE_ROWS, per = (tiles + T - 1) / T;
        long n0 = t * per * TILE_ROWS, n1 = n0 + per * TILE_ROWS;
        if (n1 > N) n1 = N;
        if (n0 < n1) rows_expand(u, R, P, M, C, cs, out, n0, n1);
    }
}
