/* Thin passes over token-sized float32 activations (AVX2 + FMA or AVX-512, OpenMP over tokens).
 *
 * A low-rank adapter meets each big activation z (N x M, row-major) with a thin matrix of
 * rank R (R << M) in two ways:
 *
 *   ta_rows_times:  out = z P          (N x R)   e.g. h = x A^T, gh = gy B
 *   ta_cols_reduce: G   = u^T z        (R x M)   e.g. gA^T = gh^T x, gB^T = h^T gy
 *   ta_grad_pass:   both of the above on the same z in one read (gh = gy B, gB^T = hb^T gy)
 *   ta_factor_grads: folded maps' gA, gB and bias gradients in one read of x and each gy
 *                    (h = x A^T, gh = gy B, gA = gh^T x, gB^T = h^T gy, 1^T gy on each block
 *                    of tokens; maps sharing x, and optionally their A)
 *
 * Each pass is bound by the read of z at low rank and by the FMAs at rank 32; CPU BLAS runs
 * these shapes well below either bound. P arrives packed as (ceil(R / VW), M, VW), zero
 * padded, VW the floats per vector register (ta_panel_width: 8 with AVX2, 16 with AVX-512
 * from rank 9 on),
 * so each token row of z meets one panel row per column of z. Reductions accumulate
 * per-thread partials over token ranges, then sum them. Both passes prefetch the rows AHEAD
 * token rows on: an activation saved in the forward is out of cache by the backward, and the
 * hardware prefetcher alone left the passes at half their in-cache speed.
 *
 * The kernel section below is compiled once per instruction set (simd.h: the file includes
 * itself with TA_ISA 256, then 512); ta_select_isa picks the set the entry points call.
 */
#ifndef TA_ISA
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define ROW_BLOCK 8 /* tokens per block of the reductions at rank <= 8 */
#define ROWS 8   /* token rows per block of z P */
#define LINE 16  /* floats per cache line */
#define AHEAD 8  /* rows prefetched ahead: a cold activation otherwise halves the pass's speed */

/* Tokens per block of the reductions and the fused passes for a thin operand of this rank:
 * ROW_BLOCK up to rank 8; above it 3 ROW_BLOCK, a multiple of every rows tile's height (8, 6,
 * 4, 3), so no block ends in one-row tiles, and G is read and written a third as often (at
 * rank 32 the fused passes ran 1.15-1.35x as fast as with blocks of 8, AVX2). */
static inline long block_rows(long rank) { return rank > 8 ? 3 * ROW_BLOCK : ROW_BLOCK; }

#define TA_ISA 256
#include "simd.h"
#include "thin_passes.c"
#undef TA_ISA
#define TA_ISA 512
#include "simd.h"
#include "thin_passes.c"
#undef TA_ISA

static int isa = 256; /* the set the entry points call: 256 or 512 */

/* 0 without AVX2 + FMA, else the widest set this CPU runs: 256 (AVX2) or 512 (AVX-512F). */
int ta_cpu_ok(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    return __builtin_cpu_supports("avx512f") ? 512 : 256;
}

/* Use `wanted` (256 or 512) where the CPU has it; returns the set now in use. */
int ta_select_isa(int wanted) {
    isa = wanted == 512 && ta_cpu_ok() == 512 ? 512 : 256;
    return isa;
}

/* The set in use: 256 or 512. */
int ta_isa(void) { return isa; }

/* Whether z P of rank R runs in AVX-512: from rank 9 on; up to rank 8 a 16-wide panel would
 * be half padding, and the AVX2 kernel reads the same z with half the panel traffic. */
static int wide_rows(long R) { return isa == 512 && R > 8; }

/* Floats per panel row of a packed P of rank R for the set in use (8 or 16). */
int ta_panel_width(long R) { return wide_rows(R) ? 16 : 8; }

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

static void sums_range(const float *z, long M, float *s, long n0, long n1);
/* Token-range forms for other kernels in this library (drop_connect.c). */
void ta_rows_range(const float *z, long M, const float *packed, long R, float *out, long n0,
                   long n1) {
    if (wide_rows(R))
        rows_times_avx512(z, M, packed, R, out, n0, n1);
    else
        rows_times_avx2(z, M, packed, R, out, n0, n1);
}

void ta_sums_range(const float *z, long M, float *s, long n0, long n1) { sums_range(z, M, s, n0, n1); }

void ta_cols_range(const float *u, long R, const float *z, long M, float *G, long n0, long n1) {
    if (isa == 512)
        cols_reduce_avx512(u, R, z, M, G, n0, n1);
    else
        cols_reduce_avx2(u, R, z, M, G, n0, n1);
}

void ta_rows_times(const float *z, long N, long M, const float *packed, long R, float *out,
                   int threads) {
#pragma omp parallel num_threads(threads)
    {
        long n0, n1;
        token_range(N, omp_get_thread_num(), omp_get_num_threads(), &n0, &n1);
        if (n0 < n1) ta_rows_range(z, M, packed, R, out, n0, n1);
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
        const long blk = block_rows(R > Ru ? R : Ru);
        for (long n = n0; n < n1; n += blk) {
            long e = n + blk < n1 ? n + blk : n1;
            if (packed != NULL) ta_rows_range(z, M, packed, R, out, n, e);
            ta_cols_range(u, Ru, z, M, dst, n, e);
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

/* s[m] += sum_{n in [n0, n1)} z[n, m]: a bias gradient 1^T gy over a token range. */
static void sums_range(const float *z, long M, float *s, long n0, long n1) {
    if (isa == 512)
        col_sums_avx512(z, M, s, n0, n1);
    else
        col_sums_avx2(z, M, s, n0, n1);
}

/* The factor gradients of G folded low-rank maps y_j = x (W_j + B_j A_j)^T + b_j (j < G <=
 * MAX_MAPS, all of rank R, one input x of N x K) in one read of x and of each gy_j (N x M_j):
 * per block of tokens, h_j = x A_j^T and g_j = gy_j B_j (rows passes into h[j] and g[j], N x R
 * each), then GA_j = g_j^T x (R x K), GB_j = h_j^T gy_j (R x M_j) and, where GS[j] is not
 * NULL, the bias gradient GS_j = 1^T gy_j (M_j) accumulate while the block is in cache.
 * pa[j] = pack(A_j^T), pb[j] = pack(B_j). With `shared`, every map has the one A_0: h_0 is
 * formed once per block, g_0 becomes sum_j gy_j B_j and GA_0 = g_0^T x is the only A
 * gradient (h[j], GA[j] and pa[j] are not read for j > 0). Done apart, h_j would be a pass
 * over x in the forward and g_j^T x a second read of x in the backward. 0, or -1 without
 * scratch memory or with more than MAX_MAPS maps. */
#define MAX_MAPS 16
int ta_factor_grads(int G, int shared, const float *x, long K, long N, const float *const *gy,
                    const long *M, const float *const *pa, const float *const *pb, long R,
                    float *const *h, float *const *g, float *const *GA, float *const *GB,
                    float *const *GS, int threads) {
    if (G < 1 || G > MAX_MAPS) return -1;
    /* map j's [GA_j | GB_j | GS_j] in a thread's partials; GA_j empty for j > 0 when shared */
    long oa[MAX_MAPS], ob[MAX_MAPS], os[MAX_MAPS], size = 0;
    for (int j = 0; j < G; ++j) {
        oa[j] = size;
        size += shared && j > 0 ? 0 : R * K;
        ob[j] = size;
        size += R * M[j];
        os[j] = size;
        size += GS[j] != NULL ? M[j] : 0;
    }
    float *extra = threads > 1 ? calloc((size_t)(threads - 1) * (size_t)size, sizeof(float)) : NULL;
    if (threads > 1 && extra == NULL) return -1;
    for (int j = 0; j < G; ++j) {
        if (!shared || j == 0) memset(GA[j], 0, sizeof(float) * (size_t)(R * K));
        memset(GB[j], 0, sizeof(float) * (size_t)(R * M[j]));
        if (GS[j] != NULL) memset(GS[j], 0, sizeof(float) * (size_t)M[j]);
    }
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long n0, n1;
        token_range(N, t, T, &n0, &n1);
        float *mine = t == 0 ? NULL : extra + (size_t)(t - 1) * (size_t)size;
        const long blk = block_rows(R);
        for (long n = n0; n < n1; n += blk) {
            long e = n + blk < n1 ? n + blk : n1;
            if (shared) ta_rows_range(x, K, pa[0], R, h[0], n, e);
            for (int j = 0; j < G; ++j) {
                const float *hj = shared ? h[0] : h[j];
                if (!shared) ta_rows_range(x, K, pa[j], R, h[j], n, e);
                ta_rows_range(gy[j], M[j], pb[j], R, g[j], n, e);
                ta_cols_range(hj, R, gy[j], M[j], mine ? mine + ob[j] : GB[j], n, e);
                if (GS[j] != NULL) sums_range(gy[j], M[j], mine ? mine + os[j] : GS[j], n, e);
                if (!shared)
                    ta_cols_range(g[j], R, x, K, mine ? mine + oa[j] : GA[j], n, e);
                else if (j > 0) /* g_0 += g_j on the block's rows */
                    for (long i = n * R; i < e * R; ++i) g[0][i] += g[j][i];
            }
            if (shared) ta_cols_range(g[0], R, x, K, mine ? mine + oa[0] : GA[0], n, e);
        }
        if (t == 0) used = T;
    }
    for (int t = 1; t < used; ++t) {
        const float *part = extra + (size_t)(t - 1) * (size_t)size;
        for (int j = 0; j < G; ++j) {
            if (!shared || j == 0)
                for (long i = 0; i < R * K; ++i) GA[j][i] += part[oa[j] + i];
            for (long i = 0; i < R * M[j]; ++i) GB[j][i] += part[ob[j] + i];
            if (GS[j] != NULL)
                for (long i = 0; i < M[j]; ++i) GS[j][i] += part[os[j] + i];
        }
    }
    free(extra);
    return 0;
}

#else /* ------------------------------------------ kernels, once per instruction set (simd.h) */

/* Rows passes' tiles: accumulator c<i><g> is token row i, panel group g; named, since an
 * array of them is kept on the stack. RT_STEP is one column q of z against panel row q. */
#define RT_FMA(i, g)                                                                           \
    if (TILE_GG > g) c##i##g = V_FMA(zq, p##g, c##i##g);
#define RT_ROW(i)                                                                              \
    if (TILE_RR > i) {                                                                         \
        const VEC zq = V_BCAST(z0 + i * M + q);                                                \
        RT_FMA(i, 0) RT_FMA(i, 1) RT_FMA(i, 2) RT_FMA(i, 3)                                    \
    }
#define RT_STEP(q)                                                                             \
    {                                                                                          \
        const VEC p0 = V_LOAD(packed + (g0 * M + (q)) * VW);                                   \
        const VEC p1 = TILE_GG > 1 ? V_LOAD(packed + ((g0 + 1) * M + (q)) * VW) : p0;          \
        const VEC p2 = TILE_GG > 2 ? V_LOAD(packed + ((g0 + 2) * M + (q)) * VW) : p0;          \
        const VEC p3 = TILE_GG > 3 ? V_LOAD(packed + ((g0 + 3) * M + (q)) * VW) : p0;          \
        RT_ROW(0) RT_ROW(1) RT_ROW(2) RT_ROW(3) RT_ROW(4) RT_ROW(5) RT_ROW(6) RT_ROW(7)        \
    }
#define RT_OUT(i, g)                                                                           \
    if (TILE_RR > i && TILE_GG > g) {                                                          \
        float *dst = out + (n + i) * R + (g0 + g) * VW;                                        \
        const long cols = R - (g0 + g) * VW;                                                   \
        if (cols >= VW)                                                                        \
            V_STORE(dst, c##i##g);                                                             \
        else                                                                                   \
            V_STORE_N(dst, c##i##g, cols);                                                     \
    }
#define RT_OUT_ROW(i) RT_OUT(i, 0) RT_OUT(i, 1) RT_OUT(i, 2) RT_OUT(i, 3)
#define RT_ZERO_ROW(i)                                                                         \
    VEC c##i##0 = V_ZERO(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;

/* The columns of panel groups g0 .. g0 + GG - 1 of out[n + i, :] = z[n + i, :] P, i < RR:
 * RR x GG accumulators in registers over M, so each panel load serves RR rows and each
 * broadcast of z serves GG groups. One function per shape, its sizes constants. */
#define ROWS_TILE(RR, GG)                                                                      \
    KERNEL static inline __attribute__((always_inline)) void ISA(rows_tile_##RR##x##GG)(       \
        const float *z, long M, const float *packed, long R, float *out, long n, long g0) {    \
        enum { TILE_RR = RR, TILE_GG = GG };                                                   \
        const float *z0 = z + n * M;                                                           \
        const char *ahead = (const char *)(z0 + AHEAD * M);                                    \
        RT_ZERO_ROW(0) RT_ZERO_ROW(1) RT_ZERO_ROW(2) RT_ZERO_ROW(3)                            \
        RT_ZERO_ROW(4) RT_ZERO_ROW(5) RT_ZERO_ROW(6) RT_ZERO_ROW(7)                            \
        for (long m = 0; m < M; m += LINE) {                                                   \
            const long end = m + LINE < M ? m + LINE : M;                                      \
            if (g0 == 0)                                                                       \
                for (int i = 0; i < RR; ++i)                                                   \
                    _mm_prefetch(ahead + (i * M + m) * sizeof(float), _MM_HINT_T0);            \
            for (long q = m; q < end; ++q) RT_STEP(q)                                          \
        }                                                                                      \
        RT_OUT_ROW(0) RT_OUT_ROW(1) RT_OUT_ROW(2) RT_OUT_ROW(3)                                \
        RT_OUT_ROW(4) RT_OUT_ROW(5) RT_OUT_ROW(6) RT_OUT_ROW(7)                                \
    }
ROWS_TILE(8, 1)
ROWS_TILE(6, 2)
ROWS_TILE(4, 3)
ROWS_TILE(3, 4)
ROWS_TILE(1, 1)
ROWS_TILE(1, 2)
ROWS_TILE(1, 3)
ROWS_TILE(1, 4)
#undef ROWS_TILE
#undef RT_FMA
#undef RT_ROW
#undef RT_STEP
#undef RT_OUT
#undef RT_OUT_ROW
#undef RT_ZERO_ROW

/* out[n, :R] = z[n, :M] P for n in [n0, n1) at rank above VW (2 to 4 panel groups): tiles of
 * 6 rows x 2 groups, 4 x 3 or 3 x 4, so each broadcast of z feeds several FMAs (3 x 4 ran
 * 1.2-1.4x as fast as 8 rows x 1 group at rank 32, AVX2); rows left over take one-row tiles;
 * ranks above 4 groups (beyond max_rank) take the groups 4 at a time. */
KERNEL static void ISA(rows_wide)(const float *z, long M, const float *packed, long R,
                                  float *out, long n0, long n1, long groups) {
#define RT_RUN(RR, GG)                                                                         \
    {                                                                                          \
        long n = n0;                                                                           \
        for (; n + RR <= n1; n += RR) ISA(rows_tile_##RR##x##GG)(z, M, packed, R, out, n, g0); \
        for (; n < n1; ++n) ISA(rows_tile_1x##GG)(z, M, packed, R, out, n, g0);                \
    }                                                                                          \
    break;
    for (long g0 = 0; g0 < groups; g0 += 4) {
        switch (groups - g0 < 4 ? groups - g0 : 4) {
        case 1: RT_RUN(8, 1)
        case 2: RT_RUN(6, 2)
        case 3: RT_RUN(4, 3)
        default: RT_RUN(3, 4)
        }
    }
#undef RT_RUN
}

/* out[n, :R] = z[n, :M] P for n in [n0, n1); P packed (groups, M, VW). One panel group (rank
 * <= VW): eight token rows at a time, eight independent FMA chains sharing each panel load;
 * more groups: rows_wide. */
KERNEL static void ISA(rows_times)(const float *z, long M, const float *packed, long R,
                                   float *out, long n0, long n1) {
    if (R > VW) {
        ISA(rows_wide)(z, M, packed, R, out, n0, n1, (R + VW - 1) / VW);
        return;
    }
    const long groups = (R + VW - 1) / VW;
    long n = n0;
    for (; n + ROWS <= n1; n += ROWS) {
        const float *z0 = z + n * M;
        const char *ahead = (const char *)(z0 + AHEAD * M);
        for (long g = 0; g < groups; ++g) {
            const float *p = packed + g * M * VW;
            VEC c[ROWS];
            for (int i = 0; i < ROWS; ++i) c[i] = V_ZERO();
            for (long m = 0; m < M; m += LINE) {
                const long end = m + LINE < M ? m + LINE : M;
                if (g == 0)
                    for (int i = 0; i < ROWS; ++i)
                        _mm_prefetch(ahead + (i * M + m) * sizeof(float), _MM_HINT_T0);
                for (long q = m; q < end; ++q) {
                    const VEC pq = V_LOAD(p + q * VW);
                    for (int i = 0; i < ROWS; ++i) c[i] = V_FMA(V_BCAST(z0 + i * M + q), pq, c[i]);
                }
            }
            const long cols = R - g * VW;
            for (int i = 0; i < ROWS; ++i) {
                float *dst = out + (n + i) * R + g * VW;
                if (cols >= VW)
                    V_STORE(dst, c[i]);
                else
                    V_STORE_N(dst, c[i], cols);
            }
        }
    }
    for (; n < n1; ++n) {
        for (long g = 0; g < groups; ++g) {
            const float *p = packed + g * M * VW;
            VEC c0 = V_ZERO();
            for (long m = 0; m < M; ++m) c0 = V_FMA(V_BCAST(z + n * M + m), V_LOAD(p + m * VW), c0);
            const long cols = R - g * VW;
            if (cols >= VW)
                V_STORE(out + n * R + g * VW, c0);
            else
                V_STORE_N(out + n * R + g * VW, c0, cols);
        }
    }
}

/* G[r0 + j, m + VW s + l] += sum_{n in [n0, n1)} u[n, r0 + j] z[n, m + VW s + l] for j < RR,
 * s < S, l < VW: RR x S accumulators stay in registers over the whole token range, so G is
 * read and written once per range and each token costs S loads of z and RR broadcasts of u.
 * With `ahead`, also prefetches the same columns of the next range's rows. */
KERNEL static inline __attribute__((always_inline)) void ISA(cols_tile)(
    const float *u, long R, long r0, const int RR, const float *z, long M, long m, const int S,
    float *G, long n0, long n1, int ahead) {
    /* named accumulators: an array of them ends up on the stack */
    VEC a0 = V_ZERO(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    VEC b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
    for (long n = n0; n < n1; ++n) {
        const float *zn = z + n * M + m, *un = u + n * R + r0;
        if (ahead) {
            _mm_prefetch((const char *)(zn + (n1 - n0) * M), _MM_HINT_T0);
            if (S * VW > LINE) _mm_prefetch((const char *)(zn + (n1 - n0) * M + LINE), _MM_HINT_T0);
        }
        const VEC z0 = V_LOAD(zn);
        const VEC z1 = S > 1 ? V_LOAD(zn + VW) : z0;
#define ACC(j)                                                                                 \
    if (RR > j) {                                                                              \
        const VEC uj = V_BCAST(un + j);                                                        \
        a##j = V_FMA(uj, z0, a##j);                                                            \
        if (S > 1) b##j = V_FMA(uj, z1, b##j);                                                 \
    }
        ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5)
#undef ACC
    }
    float *g = G + r0 * M + m;
#define OUT(j)                                                                                 \
    if (RR > j) {                                                                              \
        V_STORE(g + j * M, V_ADD(V_LOAD(g + j * M), a##j));                                    \
        if (S > 1) V_STORE(g + j * M + VW, V_ADD(V_LOAD(g + j * M + VW), b##j));               \
    }
    OUT(0) OUT(1) OUT(2) OUT(3) OUT(4) OUT(5)
#undef OUT
}

/* cols_tile with its row count and strip count as constants (1 to 6 rows, 1 or 2 strips). */
KERNEL static void ISA(cols_strip)(const float *u, long R, long r0, int RR, const float *z,
                                   long M, long m, int S, float *G, long n0, long n1, int ahead) {
#define TILE(rr)                                                                               \
    case rr:                                                                                   \
        if (S == 2)                                                                            \
            ISA(cols_tile)(u, R, r0, rr, z, M, m, 2, G, n0, n1, ahead);                        \
        else                                                                                   \
            ISA(cols_tile)(u, R, r0, rr, z, M, m, 1, G, n0, n1, ahead);                        \
        break;
    switch (RR) {
        TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
    }
#undef TILE
}

/* G[r, m] += sum_{n in [n0, n1)} u[n, r] z[n, m]; u rows of stride R. Per block of block_rows(R)
 * tokens, the rows of G go in groups of at most 6 and its columns in strips of 2 VW, each
 * group x strip a register tile over the block; the first group prefetches the next block. */
KERNEL static void ISA(cols_reduce)(const float *u, long R, const float *z, long M, float *G,
                                    long n0, long n1) {
    const long groups = (R + 5) / 6;
    const long blk = block_rows(R);
    for (long nb = n0; nb < n1; nb += blk) {
        const long ne = nb + blk < n1 ? nb + blk : n1;
        long m = 0;
        for (; m + VW <= M; m += 2 * VW) {
            const int S = m + 2 * VW <= M ? 2 : 1;
            long r0 = 0;
            for (long g = 0; g < groups; ++g) {
                const long rr = (R - r0) / (groups - g); /* balanced: 9 rows as 4 + 5 */
                ISA(cols_strip)(u, R, r0, (int)rr, z, M, m, S, G, nb, ne, g == 0);
                r0 += rr;
            }
        }
        if (m > M) m -= VW; /* the last strip was a single one */
        for (; m < M; ++m)
            for (long n = nb; n < ne; ++n)
                for (long r = 0; r < R; ++r) G[r * M + m] += u[n * R + r] * z[n * M + m];
    }
}

/* s[m] += sum_{n in [n0, n1)} z[n, m]: column sums of a token range, one vector per strip. */
KERNEL static void ISA(col_sums)(const float *z, long M, float *s, long n0, long n1) {
    long m = 0;
    for (; m + VW <= M; m += VW) {
        VEC acc = V_LOAD(s + m);
        for (long n = n0; n < n1; ++n) acc = V_ADD(acc, V_LOAD(z + n * M + m));
        V_STORE(s + m, acc);
    }
    for (; m < M; ++m)
        for (long n = n0; n < n1; ++n) s[m] += z[n * M + m];
}

#endif
