/* tgemm.h - the register kernel for many token rows times decoded weight
 * tiles (see tgemm.c). */
#ifndef TK_CPU_TGEMM_H
#define TK_CPU_TGEMM_H

/* Columns per block of B (two vectors) and token rows per register block. */
#if defined(__AVX512F__)
enum { TK_TGEMM_NR = 32 };
#else
enum { TK_TGEMM_NR = 16 };
#endif
enum { TK_TGEMM_MR = 6 };

/* y[T, n] = alpha x[T, kc] . B + beta y (beta 0: y is not read), B[kc, n] as column blocks of TK_TGEMM_NR,
 * each K-major and 64-byte aligned: element (k, j) of block b at bp[b * kc * NR + k * NR + j]. Columns of the
 * last block past n are read and ignored (never written). */
void tk_tgemm(int T, int n, int kc, const float *x, int ldx, const float *bp, float *y, int ldy, float alpha,
              float beta);

#endif
