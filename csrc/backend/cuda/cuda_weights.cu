/* cuda_weights.cu - the base-weight matmuls of the CUDA backend (see cuda_weights.h): activations rounded to
 * bf16 by a kernel into the context's scratch (struct tk_cu's wx, grown in stream order, never shrunk), then one
 * cuBLAS GEMM per weight part (per expert and part for the grouped ops): cublasGemmEx with bf16 A and B, float32
 * C and CUBLAS_COMPUTE_32F for bf16 parts, cublasSgemm on the float32 activations for F32 parts.
 *
 * cuBLAS is column-major: a row-major [R, C] matrix (row stride ld) is the column-major [C, R] (leading dimension
 * ld), written M' below. So y[T, N] = x[T, K] W[N, K]^T is y' [N, T] = (W' [K, N])^T x' [K, T] (op T on A), a
 * part writing rows row0 .. of y'; and y[T, K] = x[T, N] W[N, K] is y' [K, T] = W' [K, N] x' [N, T] (op N), a
 * part reading rows row0 .. of x' (its columns of x).
 *
 * Not run on a GPU yet: tests/ops checks these ops against float64 under the CPU emulation of CUDA
 * (tests/cuda_emu) and, where a GPU is visible, on it.
 */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>

#include "cuda_common.cuh"
#include "cuda_weights.h"

/* bf16 rows of a converted x: a multiple of 8 elements, so every row starts 16-byte aligned (tensor cores) */
static int ld_bf16(int cols) { return (cols + 7) & ~7; }

/* The scratch of at least `bytes`, or NULL with the failure recorded. Stream-ordered: the work queued before
 * a regrowth that reads the old scratch runs before cudaFreeAsync releases it. */
static void *scratch(tk_cu *cu, size_t bytes)
{
    if (bytes <= cu->wx_bytes) return cu->wx;
    if (cu->wx) check(cu, cudaFreeAsync(cu->wx, cu->stream), "weight matmul scratch");
    cu->wx = NULL, cu->wx_bytes = 0;
    size_t want = bytes < ((size_t)1 << 20) ? (size_t)1 << 20 : bytes + bytes / 4;
    cudaError_t err = cudaMallocAsync(&cu->wx, want, cu->stream);
    if (err != cudaSuccess) {
        cu->wx = NULL;
        check(cu, err, "weight matmul scratch");
        return NULL;
    }
    cu->wx_bytes = want;
    return cu->wx;
}

/* out[r, :cols] = x[r, :cols] rounded to bf16 (to nearest even), one block per row */
__global__ void to_bf16_k(__nv_bfloat16 *out, int ldo, const float *x, int ldx, int cols)
{
    const float *xr = x + (size_t)blockIdx.x * ldx;
    __nv_bfloat16 *o = out + (size_t)blockIdx.x * ldo;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = __float2bfloat16_rn(xr[i]);
}

static int blas(tk_cu *cu)
{
    char why[8];
    if (tk_cu_blas_ready(cu, why, sizeof why)) return 1;
    check(cu, cudaErrorNotSupported, cu->blas_error);
    return 0;
}

/* C[m, n] = alpha op(A) B + beta C, column-major; A and B bf16 (bf16 != 0) or float32 */
static void gemm(tk_cu *cu, int bf16, int op_a, int m, int n, int k, float alpha, const void *A, int lda,
                 const void *B, int ldb, float beta, float *C, int ldc, const char *op)
{
    int status;
    if (bf16)
        status = cu->blas.gemm_ex(cu->handle, op_a, CUBLAS_OP_N, m, n, k, &alpha, A, TK_BLAS_R_16BF, lda, B,
                                  TK_BLAS_R_16BF, ldb, &beta, C, TK_BLAS_R_32F, ldc, TK_BLAS_COMPUTE_32F,
                                  TK_BLAS_GEMM_DEFAULT);
    else
        status = cu->blas.sgemm(cu->handle, op_a, CUBLAS_OP_N, m, n, k, &alpha, (const float *)A, lda,
                                (const float *)B, ldb, &beta, C, ldc);
    if (status != 0) {
        char where[96];
        snprintf(where, sizeof where, "%s (cuBLAS status %d)", op, status);
        check(cu, cudaErrorLaunchFailure, where);
    }
}

/* Every group's rows through its weight's parts. x's rows [start[0], start[n_groups]) are converted to bf16 once
 * (when any part is bf16): n_in = cols (matmul_w) or rows (matmul_w_t) values each. A loop over the groups, a GEMM
 * per non-empty group and part: a first version; a grouped GEMM (cublasGemmGroupedBatchedEx, or one kernel over
 * a device-side group table) would spread a decoding step's one-row groups over the device in one launch. */
static void weight_matmuls(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const tk_cu_wpart *parts,
                           int parts_stride, const int *n_parts, int rows, int cols, const int32_t *start,
                           int n_groups, float alpha, float beta, int transposed, const char *op)
{
    int first = start[0], T = start[n_groups] - first, n_in = transposed ? rows : cols, any_bf16 = 0;
    if (T <= 0) return;
    if (!blas(cu)) return;
    for (int g = 0; g < n_groups; g++)
        for (int i = 0; i < n_parts[g] && start[g + 1] > start[g]; i++) any_bf16 |= parts[g * parts_stride + i].bf16;
    const __nv_bfloat16 *xb = NULL;
    int ldb = ld_bf16(n_in);
    if (any_bf16) {
        __nv_bfloat16 *out = (__nv_bfloat16 *)scratch(cu, (size_t)T * ldb * sizeof(__nv_bfloat16));
        if (!out) return;
        const float *x0 = x + (size_t)first * ldx;
        to_bf16_k<<<T, THREADS, 0, cu->stream>>>(out, ldb, x0, ldx, n_in);
        launched(cu, op);
        xb = out;
    }
    for (int g = 0; g < n_groups; g++) {
        int rows_g = start[g + 1] - start[g];
        if (rows_g <= 0) continue;
        size_t at = (size_t)(start[g] - first);
        const float *xg = x + (size_t)start[g] * ldx;
        const __nv_bfloat16 *xbg = xb ? xb + at * ldb : NULL;
        float *yg = y + (size_t)start[g] * ldy;
        for (int i = 0; i < n_parts[g]; i++) {
            const tk_cu_wpart *p = &parts[g * parts_stride + i];
            if (!transposed) /* y^T [p.rows, rows_g] (+ its row0) = W_p [K, p.rows]^T x^T [K, rows_g] */
                gemm(cu, p->bf16, CUBLAS_OP_T, p->rows, rows_g, cols, alpha, p->data, cols,
                     p->bf16 ? (const void *)xbg : (const void *)xg, p->bf16 ? ldb : ldx, beta, yg + p->row0, ldy,
                     op);
            else /* y^T [K, rows_g] (+)= W_p [K, p.rows] x^T [p.rows, rows_g]: x's columns row0 .. */
                gemm(cu, p->bf16, CUBLAS_OP_N, cols, rows_g, p->rows, alpha, p->data, cols,
                     p->bf16 ? (const void *)(xbg + p->row0) : (const void *)(xg + p->row0), p->bf16 ? ldb : ldx,
                     i == 0 ? beta : 1.0f, yg, ldy, op);
        }
    }
}

extern "C" void tk_cu_matmul_w(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const tk_cu_wpart *parts,
                               int n_parts, int cols, int T, float alpha, float beta)
{
    int32_t start[2] = {0, T};
    weight_matmuls(cu, y, ldy, x, ldx, parts, 0, &n_parts, 0, cols, start, 1, alpha, beta, 0, "matmul_w");
}

extern "C" void tk_cu_matmul_w_t(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const tk_cu_wpart *parts,
                                 int n_parts, int rows, int cols, int T, float alpha, float beta)
{
    int32_t start[2] = {0, T};
    weight_matmuls(cu, y, ldy, x, ldx, parts, 0, &n_parts, rows, cols, start, 1, alpha, beta, 1, "matmul_w_t");
}

extern "C" void tk_cu_matmul_w_grouped(tk_cu *cu, float *y, int ldy, const float *x, int ldx,
                                       const tk_cu_wpart *parts, const int *n_parts, int rows, int cols,
                                       const int32_t *start, int n_groups, float alpha, float beta, int transposed)
{
    if (n_groups <= 0) return;
    weight_matmuls(cu, y, ldy, x, ldx, parts, TK_CU_MAX_PARTS, n_parts, rows, cols, start, n_groups, alpha, beta,
                   transposed, transposed ? "matmul_w_t_grouped" : "matmul_w_grouped");
}

extern "C" void tk_cu_fail_nomem(tk_cu *cu, const char *where) { check(cu, cudaErrorMemoryAllocation, where); }
