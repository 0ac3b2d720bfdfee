/* cuda_weights.cu - the base-weight matmuls of the CUDA backend (see cuda_weights.h): activations rounded to
 * bf16 by a kernel into the context's scratch (struct tk_cu's wx, grown in stream order, never shrunk), then one
 * cuBLAS GEMM per weight part (per expert and part for the grouped ops, experts of one shape batched):
 * cublasGemmEx with bf16 A and B, float32 C and CUBLAS_COMPUTE_32F for bf16 parts, cublasSgemm on the float32
 * activations for F32 parts (float32 arithmetic: the handle's math mode allows no TF32).
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
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* One GEMM of weight_matmuls: a group's rows through one part of its weight */
typedef struct {
    const void *a, *b;
    float *c;
    int rows_g, bf16, part_rows;
} wjob;

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* The jobs of one shape (rows_g, bf16, part_rows: their m, n, k and types) as one call: a GEMM, or for several a
 * cublasGemmBatchedEx over device arrays of their pointers (staged). cuBLAS cannot see the pointers in device
 * arrays, and says they must be aligned for its fast kernels ("to avoid misaligned memory access errors"): jobs
 * with a pointer off 16 bytes run one by one (in a model every part, row0 and row stride is a multiple of 64
 * elements, so that is tests/ops' odd strides). */
static void run_jobs(tk_cu *cu, const wjob *const *jobs, int n, int transposed, int cols, int ldb, int ldx, int ldy,
                     float alpha, float beta, const char *op)
{
    const wjob *j = jobs[0];
    int m = transposed ? cols : j->part_rows, k = transposed ? j->part_rows : cols, ld_b = j->bf16 ? ldb : ldx;
    int op_a = transposed ? CUBLAS_OP_N : CUBLAS_OP_T, type = j->bf16 ? TK_BLAS_R_16BF : TK_BLAS_R_32F;
    int aligned = 1;
    for (int i = 0; i < n; i++) aligned &= aligned16(jobs[i]->a) && aligned16(jobs[i]->b) && aligned16(jobs[i]->c);
    if (n == 1 || !aligned) {
        for (int i = 0; i < n; i++)
            gemm(cu, j->bf16, op_a, m, j->rows_g, k, alpha, jobs[i]->a, cols, jobs[i]->b, ld_b, beta, jobs[i]->c, ldy,
                 op);
        return;
    }
    /* the A, B and C arrays each 32-byte aligned (cuBLAS checks the arrays' alignment too) */
    int stride = (n + 3) & ~3;
    const void **host = (const void **)calloc((size_t)3 * stride, sizeof *host);
    if (!host) {
        check(cu, cudaErrorMemoryAllocation, op);
        return;
    }
    for (int i = 0; i < n; i++)
        host[i] = jobs[i]->a, host[stride + i] = jobs[i]->b, host[2 * stride + i] = jobs[i]->c;
    const void **dev = (const void **)staged(cu, host, (size_t)3 * stride * sizeof *host);
    free(host); /* staged's copy from pageable memory returns once the bytes are taken */
    if (!dev || failed(cu)) { /* the arrays may not be there: cuBLAS would follow garbage pointers */
        unstage(cu, (void *)dev);
        return;
    }
    int status = cu->blas.gemm_batched_ex(cu->handle, op_a, CUBLAS_OP_N, m, j->rows_g, k, &alpha, dev, type, cols,
                                          dev + stride, type, ld_b, &beta, (void *const *)(dev + 2 * stride),
                                          TK_BLAS_R_32F, ldy, n, TK_BLAS_COMPUTE_32F, TK_BLAS_GEMM_DEFAULT);
    if (status != 0) {
        char where[96];
        snprintf(where, sizeof where, "%s (cuBLAS batched status %d)", op, status);
        check(cu, cudaErrorLaunchFailure, where);
    }
    unstage(cu, (void *)dev);
}

/* Every group's rows through its weight's parts. x's rows [start[0], start[n_groups]) are converted to bf16 once
 * (when any part is bf16): n_in = cols (matmul_w) or rows (matmul_w_t) values each. Then, part by part (so that
 * matmul_w_t's later parts add to the first's result), the groups whose GEMMs have one shape (rows, part rows,
 * type) run as one batched call: a decoding step's one-row experts are one call a part; a prefill's groups of
 * different sizes are mostly a call each. (A grouped GEMM with per-group sizes, cublasGemmGroupedBatchedEx or
 * a kernel over a device-side group table, would make those one call too.) */
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
    wjob *jobs = (wjob *)malloc((size_t)n_groups * sizeof *jobs);
    const wjob **batch = (const wjob **)malloc((size_t)n_groups * sizeof *batch);
    char *done = (char *)malloc((size_t)n_groups);
    if (!jobs || !batch || !done) {
        check(cu, cudaErrorMemoryAllocation, op);
        free(jobs), free(batch), free(done);
        return;
    }
    for (int i = 0; i < TK_CU_MAX_PARTS; i++) {
        int n = 0;
        for (int g = 0; g < n_groups; g++) {
            int rows_g = start[g + 1] - start[g];
            if (rows_g <= 0 || i >= n_parts[g]) continue;
            const tk_cu_wpart *p = &parts[g * parts_stride + i];
            size_t at = (size_t)(start[g] - first);
            /* matmul_w: y^T [p.rows, rows_g] (y's columns row0 ..) = W_p [K, p.rows]^T x^T [K, rows_g];
             * matmul_w_t: y^T [K, rows_g] (+)= W_p [K, p.rows] x^T [p.rows, rows_g] (x's columns row0 ..) */
            const void *b = p->bf16 ? (const void *)(xb + at * ldb + (transposed ? p->row0 : 0))
                                    : (const void *)(x + (size_t)start[g] * ldx + (transposed ? p->row0 : 0));
            float *c = y + (size_t)start[g] * ldy + (transposed ? 0 : p->row0);
            jobs[n++] = wjob{p->data, b, c, rows_g, p->bf16, p->rows};
        }
        memset(done, 0, (size_t)n);
        for (int a = 0; a < n; a++) {
            if (done[a]) continue;
            int nb = 0;
            for (int b = a; b < n; b++)
                if (!done[b] && jobs[b].rows_g == jobs[a].rows_g && jobs[b].bf16 == jobs[a].bf16 &&
                    jobs[b].part_rows == jobs[a].part_rows)
                    batch[nb++] = &jobs[b], done[b] = 1;
            run_jobs(cu, batch, nb, transposed, cols, ldb, ldx, ldy, alpha, i == 0 || !transposed ? beta : 1.0f, op);
        }
    }
    free(jobs), free(batch), free(done);
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
