/* tgemm.c - the register kernel for many token rows times decoded weight
 * tiles: y[T, n] = alpha x[T, kc] . B[kc, n] + beta y, B given as blocks of
 * TK_TGEMM_NR columns stored K-major (bp[nb][k][NR]).
 *
 * That block layout is the Q4_0 / Q4_1 / Q8_0 tiles' own order (element k of
 * 16 weight rows is one vector), so wmatmul.c decodes tiles straight into it
 * and no second packing pass runs - sgemm would copy the decoded panel into
 * its own layout and pack the token rows again for every panel (measured on a
 * 128-token SmolLM2 forward: 10% of the time in those copies).
 *
 * The kernel keeps a TK_TGEMM_MR x NR block of y in registers (AVX-512: 6 x 32,
 * 12 zmm accumulators; AVX2: 6 x 16, 12 ymm) and walks k: two vector loads of
 * B, one broadcast of x per row, two FMAs per row. Every output sums its kc
 * products in k order with one accumulator, whatever T is, so a row's result
 * does not depend on how many other rows share the call.
 */
#include "tgemm.h"

#include <stddef.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)

/* lanes of the block's two vectors that hold columns < n */
INLINE __mmask16 lanes(int n, int half)
{
    int k = n - 16 * half;
    return k >= 16 ? (__mmask16)0xFFFF : k <= 0 ? (__mmask16)0 : (__mmask16)((1u << k) - 1);
}

INLINE void kernel(const int MR, int kc, const float *x, size_t ldx, const float *bp, float *y, size_t ldy, int n,
                   float alpha, float beta)
{
    __m512 c0[TK_TGEMM_MR], c1[TK_TGEMM_MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_load_ps(bp + (size_t)k * 32), b1 = _mm512_load_ps(bp + (size_t)k * 32 + 16);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m512 a = _mm512_set1_ps(x[i * ldx + k]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    __mmask16 m0 = lanes(n, 0), m1 = lanes(n, 1);
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
        float *yi = y + i * ldy;
        __m512 v0 = _mm512_mul_ps(va, c0[i]), v1 = _mm512_mul_ps(va, c1[i]);
        if (beta != 0.0f) { /* beta 0: y may hold anything, even NaN, and is not read */
            v0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, yi), v0);
            v1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, yi + 16), v1);
        }
        _mm512_mask_storeu_ps(yi, m0, v0);
        _mm512_mask_storeu_ps(yi + 16, m1, v1);
    }
}

#elif defined(__AVX2__) && defined(__FMA__)

/* all-ones in the 32-bit lanes of the block's vector `part` that hold columns < n */
INLINE __m256i lanes(int n, int part)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8 * part), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

INLINE void kernel(const int MR, int kc, const float *x, size_t ldx, const float *bp, float *y, size_t ldy, int n,
                   float alpha, float beta)
{
    __m256 c0[TK_TGEMM_MR], c1[TK_TGEMM_MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(bp + (size_t)k * 16), b1 = _mm256_load_ps(bp + (size_t)k * 16 + 8);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    __m256i m0 = lanes(n, 0), m1 = lanes(n, 1);
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
        float *yi = y + i * ldy;
        __m256 v0 = _mm256_mul_ps(va, c0[i]), v1 = _mm256_mul_ps(va, c1[i]);
        if (beta != 0.0f) {
            v0 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(yi, m0), v0);
            v1 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(yi + 8, m1), v1);
        }
        _mm256_maskstore_ps(yi, m0, v0);
        _mm256_maskstore_ps(yi + 8, m1, v1);
    }
}

#else /* plain C: the same sums in the same order, for builds without AVX2 + FMA */

INLINE void kernel(const int MR, int kc, const float *x, size_t ldx, const float *bp, float *y, size_t ldy, int n,
                   float alpha, float beta)
{
    float c[TK_TGEMM_MR][TK_TGEMM_NR] = {{0}};
    for (int k = 0; k < kc; k++)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < TK_TGEMM_NR; j++) c[i][j] += x[i * ldx + k] * bp[(size_t)k * TK_TGEMM_NR + j];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < n && j < TK_TGEMM_NR; j++) {
            float *yij = y + i * ldy + j;
            *yij = beta != 0.0f ? alpha * c[i][j] + beta * *yij : alpha * c[i][j];
        }
}

#endif

/* one row block of up to TK_TGEMM_MR rows against one column block, the row count a constant in each case */
static void block(int mr, int kc, const float *x, size_t ldx, const float *bp, float *y, size_t ldy, int n,
                  float alpha, float beta)
{
    switch (mr) {
    case 6: kernel(6, kc, x, ldx, bp, y, ldy, n, alpha, beta); break;
    case 5: kernel(5, kc, x, ldx, bp, y, ldy, n, alpha, beta); break;
    case 4: kernel(4, kc, x, ldx, bp, y, ldy, n, alpha, beta); break;
    case 3: kernel(3, kc, x, ldx, bp, y, ldy, n, alpha, beta); break;
    case 2: kernel(2, kc, x, ldx, bp, y, ldy, n, alpha, beta); break;
    default: kernel(1, kc, x, ldx, bp, y, ldy, n, alpha, beta); break;
    }
}

void tk_tgemm(int T, int n, int kc, const float *x, int ldx, const float *bp, float *y, int ldy, float alpha,
              float beta)
{
    /* rows outer: a block of x rows (MR x kc floats) stays in L1 while the column blocks stream from L2 */
    for (int t = 0; t < T; t += TK_TGEMM_MR) {
        int mr = T - t < TK_TGEMM_MR ? T - t : TK_TGEMM_MR;
        for (int nb = 0; nb < n; nb += TK_TGEMM_NR)
            block(mr, kc, x + (size_t)t * ldx, (size_t)ldx, bp + (size_t)nb * kc, y + (size_t)t * ldy + nb,
                  (size_t)ldy, n - nb, alpha, beta);
    }
}
