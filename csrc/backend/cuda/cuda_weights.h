/* cuda_weights.h - the CUDA backend's base-weight matmuls (cuda_weights.cu, compiled by nvcc), behind a plain C
 * interface for cuda_backend.c.
 *
 * Resident form (chosen by cuda_backend.c at load): an F32 part stays float32 (exact, multiplied in float32 by
 * cublasSgemm, as the LoRA matmuls); a part of every other type (F16, BF16, the GGUF block types) is its
 * tk_dequantize values rounded to bf16 (round to nearest even), row-major [rows, cols]. The activations
 * multiplied with a bf16 part are rounded to bf16 on the device (a kernel into the context's scratch), and
 * cublasGemmEx multiplies them with bf16 A and B, float32 C and float32 arithmetic (CUBLAS_COMPUTE_32F: each
 * product of two bf16 values is exact in float32, only the sums round). backend.h's weight_rounding (2^-8) states
 * the relative rounding this adds; tests/ops holds the ops to the float64 product of the rounded operands.
 *
 * Not run on a GPU yet: tests/ops runs the ops under the CPU emulation of CUDA (tests/cuda_emu) and, where a
 * GPU is visible, on it.
 */
#ifndef TK_CUDA_WEIGHTS_H
#define TK_CUDA_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "cuda_ops.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One part of a weight in its resident form: rows [row0, row0 + rows) of W, bf16 (bf16 != 0) or float32. */
typedef struct {
    int bf16;
    int row0, rows;
    const void *data;
} tk_cu_wpart;

/* y[T, rows] = alpha x[T, cols] W^T + beta y: each part writes its own columns of y (row strides ldy, ldx). */
void tk_cu_matmul_w(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const tk_cu_wpart *parts, int n_parts,
                    int cols, int T, float alpha, float beta);
/* y[T, cols] = alpha x[T, rows] W + beta y: the parts' terms add (the first part's GEMM applies beta, the
 * others add to its result). */
void tk_cu_matmul_w_t(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const tk_cu_wpart *parts, int n_parts,
                      int rows, int cols, int T, float alpha, float beta);
/* The experts of an MoE layer: rows [start[g], start[g + 1]) of x and y through weight g, whose parts are
 * parts[g * TK_CU_MAX_PARTS ..] (n_parts[g] of them); matmul_w's product, or with `transposed` matmul_w_t's.
 * start and n_parts are host arrays. */
enum { TK_CU_MAX_PARTS = 3 };
void tk_cu_matmul_w_grouped(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const tk_cu_wpart *parts,
                            const int *n_parts, int rows, int cols, const int32_t *start, int n_groups, float alpha,
                            float beta, int transposed);

/* Records a host-side failure of a weight op (out of host memory) as the context's first failure: the next sync
 * reports it as out of memory. */
void tk_cu_fail_nomem(tk_cu *cu, const char *where);

#ifdef __cplusplus
}
#endif

#endif
