/* backend.h - the op table the transformer recipe calls.
 *
 * The forward pass (model/transformer.c) is written once against this table;
 * each backend (cpu/ now, cuda/ later) fills it in. All tensors are row-major
 * float32; `ld` arguments are row strides in floats, so ops can work on column
 * slices (one head of q, the k part of a fused qkv buffer) without copies.
 * The CPU backend is the executable specification the others are tested
 * against op by op.
 */
#ifndef TK_BACKEND_H
#define TK_BACKEND_H

#include <stddef.h>
#include <stdint.h>

typedef struct tk_backend tk_backend;

struct tk_backend {
    const char *name;
    /* y[T, N] = beta * y + x[T, K] . w[N, K]^T */
    void (*matmul_nt)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N,
                      int K, float beta);
    /* x[T, D] = table[tokens[t], :] */
    void (*embed)(tk_backend *be, float *x, const float *table, const int32_t *tokens, int T, int D);
    /* y[r, :n] = x[r, :n] * rsqrt(mean(x[r]^2) + eps) * w; y may equal x */
    void (*rmsnorm)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n,
                    float eps);
    /* y[r, :n] += b */
    void (*add_bias)(tk_backend *be, float *y, int ldy, const float *b, int rows, int n);
    /* rotate_half RoPE in place on x[r, h*Dh : (h+1)*Dh] for h < n_heads, with
     * cos/sin [rows, Dh/2] for each row's position */
    void (*rope)(tk_backend *be, float *x, int ldx, int rows, int n_heads, int head_dim, const float *cos,
                 const float *sin);
    /* Causal grouped-query attention over packed sequences (rows
     * seq_start[s] .. seq_start[s+1]): out[t, h*Dh:] = softmax(q_h k_g^T * scale) v_g
     * with g = h / (H / Hkv). `work` holds attention_workspace(max_len) floats. */
    void (*attention)(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                      int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                      float *work);
    size_t (*attention_workspace)(tk_backend *be, int max_seq_len);
    /* act[T, F] = silu(gate_up[T, :F]) * gate_up[T, F:] */
    void (*swiglu)(tk_backend *be, float *act, const float *gate_up, int T, int F);
};

#endif
