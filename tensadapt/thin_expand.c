/* The thin-to-wide product of a low-rank adapter (AVX2 + FMA or AVX-512, OpenMP over tokens):
 *
 *   ta_rows_expand:  out = C + u P    (N x M)   e.g. b + h B^T, gh A, W + B A
 *
 * u is N x R (thin), P is R x M row-major, out is N x M; C is a row broadcast to every token
 * (a bias), a full N x M matrix (a frozen weight), or absent. Where the update stays apart
 * from the frozen weight (rank or input dropout), the forward forms b + h B^T and the
 * backward gh A before the big matmul accumulates into them; where it is folded,
 * W' = W + B A. CPU BLAS runs these shapes (K = R of 8 to 32) at a third to a half of the FMA
 * peak; here each 6 x 2 VW tile of out (VW floats per vector register: 8 with AVX2, 16 with
 * AVX-512) stays in registers over all R, P is read from cache once per six token rows, and
 * out is written once. A full C (the fold W + B A) goes one row at a time instead: six rows
 * of C read and six of out written at once are twelve short streams (a row of 384 floats is
 * 24 cache lines), which the hardware prefetcher follows poorly; with one row each, the
 * folds of 1536 x 384 and 384 x 1536 weights from memory took 0.70 and 0.92 of the time
 * (AVX2). The kernel section is compiled once per instruction set (simd.h) and
 * ta_select_isa (thin_passes.c) picks the one ta_rows_expand calls.
 */
#ifndef TA_ISA
#include <omp.h>

#define TILE_ROWS 6 /* token rows per register tile: 12 accumulators, 2 panel registers */

#define TA_ISA 256
#include "simd.h"
#include "thin_expand.c"
#undef TA_ISA
#define TA_ISA 512
#include "simd.h"
#include "thin_expand.c"
#undef TA_ISA

int ta_isa(void); /* thin_passes.c: the set in use, 256 or 512 */

/* out (N x M) = C + u (N x R) P (R x M); C NULL (zero), a row (cs = 0) or N x M (cs = M).
 * Rows are split between threads in whole tiles: TILE_ROWS rows, or one with a full C. */
void ta_rows_expand(const float *u, long N, long R, const float *P, long M, const float *C,
                    long cs, float *out, int threads) {
    const int wide = ta_isa() == 512, rows = C != NULL && cs != 0 ? 1 : TILE_ROWS;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const long tiles = (N + rows - 1) / rows, per = (tiles + T - 1) / T;
        long n0 = t * per * rows, n1 = n0 + per * rows;
        if (n1 > N) n1 = N;
        if (n0 < n1) {
            if (wide)
                rows_expand_avx512(u, R, P, M, C, cs, out, n0, n1, rows);
            else
                rows_expand_avx2(u, R, P, M, C, cs, out, n0, n1, rows);
        }
    }
}

#else /* ------------------------------------------ kernels, once per instruction set (simd.h) */

/* out[n0 + i, m : m + VW S] = C[n0 + i, m : m + VW S] + sum_r u[n0 + i, r] P[r, m : m + VW S]
 * for i < RR (C's rows cs apart: 0 for a bias, M for a matrix), with RR and S compile-time
 * constants after inlining. */
KERNEL static inline __attribute__((always_inline)) void ISA(expand_tile)(
    const float *u, long R, const float *P, long M, const float *C, long cs, float *out,
    long n0, const int RR, long m, const int S) {
    const VEC z = V_ZERO();
    VEC a0 = z, a1 = z, a2 = z, a3 = z, a4 = z, a5 = z;
    VEC b0 = z, b1 = z, b2 = z, b3 = z, b4 = z, b5 = z;
    const float *un = u + n0 * R;
    for (long r = 0; r < R; ++r) {
        const VEC p0 = V_LOAD(P + r * M + m);
        const VEC p1 = S > 1 ? V_LOAD(P + r * M + m + VW) : z;
#define ACC(j)                                          \
    if (RR > j) {                                       \
        const VEC uj = V_BCAST(un + j * R + r);         \
        a##j = V_FMA(uj, p0, a##j);                     \
        if (S > 1) b##j = V_FMA(uj, p1, b##j);          \
    }
        ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5)
#undef ACC
    }
    /* C is added to the finished sum, as BLAS does: W + B A then rounds like the merged
     * weight W + (B A), and a merge followed by an unmerge gives back the same W' */
    float *o = out + n0 * M + m;
    const float *c = C ? C + n0 * cs + m : NULL;
#define OUT(j)                                                                    \
    if (RR > j) {                                                                 \
        if (c) a##j = V_ADD(a##j, V_LOAD(c + j * cs));                            \
        V_STORE(o + j * M, a##j);                                                 \
        if (S > 1) {                                                              \
            if (c) b##j = V_ADD(b##j, V_LOAD(c + j * cs + VW));                   \
            V_STORE(o + j * M + VW, b##j);                                        \
        }                                                                         \
    }
    OUT(0) OUT(1) OUT(2) OUT(3) OUT(4) OUT(5)
#undef OUT
}

/* expand_tile with RR (1 to 6) and S (1 or 2) as constants. */
KERNEL static void ISA(expand_strip)(const float *u, long R, const float *P, long M,
                                     const float *C, long cs, float *out, long n0, int RR,
                                     long m, int S) {
#define CASE(rr)                                                        \
    case rr:                                                            \
        if (S == 2)                                                     \
            ISA(expand_tile)(u, R, P, M, C, cs, out, n0, rr, m, 2);     \
        else                                                            \
            ISA(expand_tile)(u, R, P, M, C, cs, out, n0, rr, m, 1);     \
        break;
    switch (RR) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
    }
#undef CASE
}

/* Rows [n0, n1) of out: tiles of `rows` (1 to TILE_ROWS) rows x 2 VW columns, then one
 * strip of VW, then single columns. */
KERNEL static void ISA(rows_expand)(const float *u, long R, const float *P, long M,
                                    const float *C, long cs, float *out, long n0, long n1,
                                    int rows) {
    for (long n = n0; n < n1; n += rows) {
        const int rr = n1 - n < rows ? (int)(n1 - n) : rows;
        long m = 0;
        for (; m + 2 * VW <= M; m += 2 * VW) ISA(expand_strip)(u, R, P, M, C, cs, out, n, rr, m, 2);
        if (m + VW <= M) {
            ISA(expand_strip)(u, R, P, M, C, cs, out, n, rr, m, 1);
            m += VW;
        }
        for (; m < M; ++m)
            for (int i = 0; i < rr; ++i) {
                float s = 0.0f;
                for (long r = 0; r < R; ++r) s += u[(n + i) * R + r] * P[r * M + m];
                out[(n + i) * M + m] = C ? C[(n + i) * cs + m] + s : s;
            }
    }
}

#endif
