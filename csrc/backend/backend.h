/* backend.h - the op table the transformer recipe calls.
 *
 * The forward and backward passes (model/transformer.c, model/head.c) are
 * written once against this table; each backend (cpu/ now, cuda/ later)
 * fills it in. All tensors are row-major float32; `ld` arguments are row
 * strides in floats, so ops can work on column slices (one head of q, the k
 * part of a fused qkv buffer) without copies. The CPU backend is the
 * executable specification the others are tested against op by op.
 */
#ifndef TK_BACKEND_H
#define TK_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "qmatrix.h"

typedef struct tk_backend tk_backend;

/* The cached keys/values one decoding sequence attends to, for one layer. */
typedef struct tk_kv_view {
    const float *k0, *v0; /* [n0, ld_kv] the shared prompt (n0 may be 0) */
    int n0;
    const float *k1, *v1; /* [n1, ld_kv] the sequence's own tokens, the new one last */
    int n1;
} tk_kv_view;

struct tk_backend {
    const char *name;

    /* ---- matmuls ---- */
    /* y[T, N] = alpha * x[T, K] . w[N, K]^T + beta * y   (projections; w rows contiguous) */
    void (*matmul_nt)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N,
                      int K, float alpha, float beta);
    /* y[T, N] = alpha * x[T, K] . w[K, N] + beta * y    (input gradients: dx = dy . W) */
    void (*matmul_nn)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int ldw, int T,
                      int N, int K, float alpha, float beta);
    /* y[T, N] = alpha * x[T, K] . W^T + beta * y with W [N, K] kept as quantized blocks (qmatrix.h), each
     * weight decoded to exactly its tk_dequantize value; activations and sums stay float32. For decoding
     * steps: used only up to matmul_nt_q_max_rows rows, where it beats matmul_nt on the float32 copy.
     * Optional (NULL: the backend has no such kernel). */
    void (*matmul_nt_q)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_qmatrix *w, int T,
                        float alpha, float beta);
    int matmul_nt_q_max_rows;
    /* g[M, N] += alpha * a[T, M]^T . b[T, N]            (weight gradients, summed over tokens) */
    void (*matmul_tn_acc)(tk_backend *be, float *g, int ldg, const float *a, int lda, const float *b, int ldb, int T,
                          int M, int N, float alpha);

    /* ---- element-wise and row-wise ---- */
    /* x[T, D] = table[tokens[t], :] */
    void (*embed)(tk_backend *be, float *x, const float *table, const int32_t *tokens, int T, int D);
    /* y[r, :n] = x[r, :n] * rsqrt(mean(x[r]^2) + eps) * w; y may equal x; inv_rms[r] (optional) keeps the rsqrt */
    void (*rmsnorm)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n,
                    float eps, float *inv_rms);
    /* dx[r] (+)= d/dx of rmsnorm given dy, the input x and its inv_rms; overwrite when !accumulate */
    void (*rmsnorm_backward)(tk_backend *be, float *dx, int lddx, const float *dy, int lddy, const float *x, int ldx,
                             const float *w, const float *inv_rms, int rows, int n, int accumulate);
    /* y[r, :n] += b */
    void (*add_bias)(tk_backend *be, float *y, int ldy, const float *b, int rows, int n);
    /* rotate_half RoPE in place on x[r, h*Dh : (h+1)*Dh] for h < n_heads, with cos/sin [rows, Dh/2] for each
     * row's position; inverse rotates back (the transpose, for the backward pass) */
    void (*rope)(tk_backend *be, float *x, int ldx, int rows, int n_heads, int head_dim, const float *cos,
                 const float *sin, int inverse);
    /* act[T, F] = silu(gate_up[T, :F]) * gate_up[T, F:] */
    void (*swiglu)(tk_backend *be, float *act, const float *gate_up, int T, int F);
    /* dgate_up[T, 2F] from dact[T, F] and the forward's gate_up */
    void (*swiglu_backward)(tk_backend *be, float *dgate_up, const float *dact, const float *gate_up, int T, int F);
    /* lse[r] = log(sum(exp(x[r, :n]))) */
    void (*logsumexp)(tk_backend *be, float *lse, const float *x, int ldx, int rows, int n);
    /* x[r, :n] = -g[r] * exp(x[r, :n] - lse[r]): minus g times the softmax, in place */
    void (*softmax_scale)(tk_backend *be, float *x, int ldx, const float *lse, const float *g, int rows, int n);

    /* ---- attention ---- */
    /* Causal grouped-query attention over packed sequences (rows seq_start[s] .. seq_start[s+1]):
     * out[t, h*Dh:] = softmax(q_h k_g^T / sqrt(Dh)) v_g with g = h / (H / Hkv); lse[t, h] (optional, row
     * stride H) keeps each row's log-sum-exp for the backward pass. `work` holds attention_workspace floats. */
    void (*attention)(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                      int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                      float *lse, float *work);
    size_t (*attention_workspace)(tk_backend *be, int n_tokens, int max_seq_len, int n_heads, int head_dim);
    /* dq, dk, dv (row stride ldqkv, overwritten) from dout and the forward's q, k, v, out and lse; the
     * probabilities are recomputed block by block, never stored */
    void (*attention_backward)(tk_backend *be, float *dq, float *dk, float *dv, const float *dout, const float *out,
                               int ldo, const float *q, const float *k, const float *v, int ldqkv, const float *lse,
                               const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                               float *work);
    size_t (*attention_backward_workspace)(tk_backend *be, int n_tokens, int max_seq_len, int n_heads, int head_dim);
    /* One new query per sequence (decoding with a KV cache): out[i, h*Dh:] attends over the keys and
     * values of views[i] - two spans of rows (a shared prompt, then the sequence's own tokens, the new
     * one included), rows of ld_kv floats with the kv heads side by side. */
    void (*attention_decode)(tk_backend *be, float *out, int ldo, const float *q, int ldq,
                             const tk_kv_view *views, int n, int n_heads, int n_kv_heads, int head_dim,
                             int ld_kv, float *work);
    size_t (*attention_decode_workspace)(tk_backend *be, int max_keys);
};


#endif
