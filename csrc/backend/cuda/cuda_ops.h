/* cuda_ops.h - the CUDA side of the CUDA backend (cuda_ops.cu, compiled by nvcc): the device, its stream, memory
 * and the kernels, behind a plain C interface so that cuda_backend.c (the op table, C11 like the rest of the
 * engine) needs no CUDA headers. Every launch goes to the context's one stream; the first failure is kept and
 * reported by tk_cu_sync. Host arrays an op reads (indices, scales, pointer lists) are copied to the device
 * through the context's staging buffer, in stream order.
 *
 * Not run yet: this task has no GPU. Compiled wherever nvcc is, checked by tests/ops on a GPU (issue #15).
 */
#ifndef TK_CUDA_OPS_H
#define TK_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tk_cu tk_cu;

/* A context on GPU `device`, or NULL with the reason in why. */
tk_cu *tk_cu_create(int device, char *why, size_t why_size);
void tk_cu_destroy(tk_cu *cu);
/* Waits for the stream; 0, or the first failure since the last call (its text in why), then cleared. */
int tk_cu_sync(tk_cu *cu, char *why, size_t why_size);

/* ---- memory ---- */
void *tk_cu_alloc(tk_cu *cu, size_t bytes); /* zeroed, 256-byte aligned; NULL when out of memory */
void tk_cu_free(tk_cu *cu, void *p);
void tk_cu_upload(tk_cu *cu, void *dst, const void *host, size_t bytes);
void tk_cu_download(tk_cu *cu, void *host, const void *src, size_t bytes); /* waits for it */
/* dst[i][0 .. n) = src[i][0 .. n) (host arrays of device pointers) */
void tk_cu_copy_rows(tk_cu *cu, float *const *dst, const float *const *src, int rows, int n);

/* ---- row-wise and element-wise (the backend.h ops of the same names) ---- */
void tk_cu_rmsnorm(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n, float eps,
                   float *inv_rms);
void tk_cu_add_bias(tk_cu *cu, float *y, int ldy, const float *b, int rows, int n);
void tk_cu_swiglu(tk_cu *cu, float *act, const float *gate_up, int T, int F);
void tk_cu_logsumexp(tk_cu *cu, float *lse, const float *x, int ldx, int rows, int n);
void tk_cu_softmax_scale(tk_cu *cu, float *x, int ldx, const float *lse, const float *g, int rows, int n);
void tk_cu_zero_rows(tk_cu *cu, float *x, int ldx, int rows, int n);
void tk_cu_gather(tk_cu *cu, float *out, const float *x, int ldx, const int32_t *row, const int32_t *col, int n);
void tk_cu_scatter_add(tk_cu *cu, float *x, int ldx, const int32_t *row, const int32_t *col, const float *val, int n);
double tk_cu_sum_squares(tk_cu *cu, const float *x, size_t n);
/* AdamW as backend.h's adamw; the factors in the order of tk_adamw_factors */
void tk_cu_adamw(tk_cu *cu, float *p, float *g, float *m, float *v, size_t n, const float factors[8]);
float tk_cu_adamw_peak(tk_cu *cu, const float *p, const float *g, const float *m, const float *v, size_t n,
                       const float factors[8]);
/* backward element-wise ops, the MoE block's row ops, a vision tower's (the backend.h ops of the same names;
 * scale and the row pointer lists: host arrays) */
void tk_cu_rmsnorm_backward(tk_cu *cu, float *dx, int lddx, const float *dy, int lddy, const float *x, int ldx,
                            const float *w, const float *inv_rms, int rows, int n, int accumulate);
void tk_cu_swiglu_backward(tk_cu *cu, float *dgate_up, const float *dact, const float *gate_up, int T, int F);
void tk_cu_add_rows(tk_cu *cu, float *const *dst, const float *const *src, const float *scale, int rows, int n);
void tk_cu_scale_rows(tk_cu *cu, float *x, int ldx, const float *scale, int rows, int n);
void tk_cu_row_dot(tk_cu *cu, float *out, const float *a, int lda, const float *b, int ldb, int rows, int n);
void tk_cu_layer_norm(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const float *w, const float *b, int rows,
                      int n, float eps);
void tk_cu_gelu(tk_cu *cu, float *y, int ldy, const float *x, int ldx, int rows, int n, int kind);

/* RoPE: the backend.h ops of the same names (pos and axis: host arrays) */
void tk_cu_rope_table(tk_cu *cu, float *cos, float *sin, const int32_t *pos, int pos_dims, int rows,
                      const float *inv_freq, const int8_t *axis, int half);
void tk_cu_rope(tk_cu *cu, float *x, int ldx, int rows, int n_heads, int head_dim, const float *cos, const float *sin,
                int inverse);

/* ---- float32 matmuls through cuBLAS (loaded at run time: libcublas.so.13 / .12, or $TINKER_CUBLAS), in
 * float32 arithmetic (no TF32). 0 when cuBLAS could not be loaded (why: the reason). ---- */
int tk_cu_blas_ready(tk_cu *cu, char *why, size_t why_size);
/* y[T, N] = alpha x[T, K] w[N, K]^T + beta y   (row-major, row strides ldy, ldx; w rows contiguous): a kernel of
 * our own, not cuBLAS, whose rows do not depend on the other rows of the call (backend.h's matmul_nt) */
void tk_cu_matmul_nt(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N, int K,
                     float alpha, float beta);
/* y[T, N] = alpha x[T, K] w[K, N] + beta y */
void tk_cu_matmul_nn(tk_cu *cu, float *y, int ldy, const float *x, int ldx, const float *w, int ldw, int T, int N,
                     int K, float alpha, float beta);
/* g[M, N] += alpha a[T, M]^T b[T, N] */
void tk_cu_matmul_tn_acc(tk_cu *cu, float *g, int ldg, const float *a, int lda, const float *b, int ldb, int T, int M,
                         int N, float alpha);

/* x[t, :cols] = row tokens[t] - row0 of a [rows, cols] table part of ggml type F32 (0), F16 (1) or BF16 (30), for
 * the tokens in [row0, row0 + rows) (the others are another part's: left as they are) */
void tk_cu_embed(tk_cu *cu, float *x, const void *table, int type, int cols, int row0, int rows,
                 const int32_t *tokens, int T);

#ifdef __cplusplus
}
#endif

#endif
