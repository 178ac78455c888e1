/* One vector instruction set for the kernels that include this header after defining TA_ISA:
 *
 *   TA_ISA 256: AVX2 + FMA, 8 floats per register (VW), names suffixed _avx2
 *   TA_ISA 512: AVX-512F, 16 floats per register, names suffixed _avx512
 *
 * A kernel file includes its kernel section once per set (see thin_passes.c), so the same
 * source gives both; the entry points pick one at run time (ta_select_isa). Included again,
 * the header first drops the previous set's names.
 */
#include <immintrin.h>

#undef KERNEL
#undef VEC
#undef VW
#undef V_ZERO
#undef V_LOAD
#undef V_STORE
#undef V_STORE_N
#undef V_BCAST
#undef V_FMA
#undef V_ADD
#undef ISA

#if TA_ISA == 512
#define KERNEL __attribute__((target("avx512f,avx2,fma")))
#define VEC __m512
#define VW 16
#define V_ZERO() _mm512_setzero_ps()
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
/* the first n < 16 lanes of v */
#define V_STORE_N(p, v, n) _mm512_mask_storeu_ps(p, (__mmask16)((1u << (n)) - 1u), v)
#define V_BCAST(p) _mm512_set1_ps(*(p))
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define ISA(name) name##_avx512
#elif TA_ISA == 256
#define KERNEL __attribute__((target("avx2,fma")))
#define VEC __m256
#define VW 8
#define V_ZERO() _mm256_setzero_ps()
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_STORE_N(p, v, n) _mm256_maskstore_ps(p, ta_lanes_avx2(n), v)
#define V_BCAST(p) _mm256_broadcast_ss(p)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define ISA(name) name##_avx2
#ifndef TA_LANES_AVX2
#define TA_LANES_AVX2
/* the mask of the first n < 8 lanes */
__attribute__((target("avx2"))) static inline __m256i ta_lanes_avx2(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif
#else
#error "define TA_ISA as 256 or 512 before including simd.h"
#endif
