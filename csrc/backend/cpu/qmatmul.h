/* qmatmul.h - the register kernel of decoding steps over Q4_0 / Q4_1 / Q8_0 tiles (see qmatmul.c; wmatmul.c
 * calls it for matmul_w_decode). */
#ifndef TK_CPU_QMATMUL_H
#define TK_CPU_QMATMUL_H

#include "../../core/pool.h"
#include "../qmatrix.h"

/* y[T, N] = alpha * x[T, K] . W^T + beta * y, W = w [N, K] decoded exactly to float32; split over the pool.
 * With beta == 0, y is not read. */
void tk_cpu_matmul_nt_q(tk_pool *pool, float *y, int ldy, const float *x, int ldx, const tk_qmatrix *w, int T,
                        float alpha, float beta);
/* The same in plain C (the reference the SIMD path is tested against; equal up to float32 rounding). */
void tk_cpu_matmul_nt_q_portable(tk_pool *pool, float *y, int ldy, const float *x, int ldx, const tk_qmatrix *w,
                                 int T, float alpha, float beta);

#endif
