/* cuda_attention.h - the CUDA backend's attention kernels (cuda_attention.cu, compiled by nvcc) behind a plain C
 * interface, as cuda_ops.h: causal grouped-query attention over packed sequences and its backward, a vision
 * tower's bidirectional attention, decoding over a KV cache, and a prefill resumed over cached rows (the backend.h
 * ops attention, attention_full, attention_backward, attention_decode, attention_cached). Float32 in, out and in
 * between. Host arrays (seq_start, the views) are staged to the device by the calls themselves.
 */
#ifndef TK_CUDA_ATTENTION_H
#define TK_CUDA_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#include "cuda_ops.h"

#ifdef __cplusplus
extern "C" {
#endif

/* backend.h's tk_kv_view, field for field (backend.h is C11 with <stdatomic.h>, which nvcc's C++ does not take;
 * cuda_backend.c checks that the two layouts agree) */
typedef struct tk_cu_kv_view {
    const float *k0, *v0;
    int n0;
    const float *k1, *v1;
    int n1;
} tk_cu_kv_view;

/* The largest head_dim the kernels take (8 chunks of 32 per output row); larger ones record an error. */
enum { TK_CU_ATTN_MAX_HEAD_DIM = 256 };

/* out[t, h*Dh:] = softmax(q_h k_g^T / sqrt(Dh)) v_g within each sequence (rows seq_start[s] .. seq_start[s+1],
 * a host array), g = h / (n_heads / n_kv_heads); causal: each row sees the keys up to its own position (else the
 * whole sequence: attention_full, with n_kv_heads = n_heads). lse[t, h] (optional, row stride n_heads). */
void tk_cu_attention(tk_cu *cu, float *out, int ldo, const float *q, const float *k, const float *v, int ldqkv,
                     const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim, float *lse,
                     int causal);

/* dq, dk, dv (row stride ldqkv, overwritten) of causal attention; work: tk_cu_attention_backward_workspace floats */
void tk_cu_attention_backward(tk_cu *cu, float *dq, float *dk, float *dv, const float *dout, const float *out, int ldo,
                              const float *q, const float *k, const float *v, int ldqkv, const float *lse,
                              const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                              float *work);
size_t tk_cu_attention_backward_workspace(int n_tokens, int n_heads);

/* One query per sequence over its views (a host array of device pointers): backend.h's attention_decode. */
void tk_cu_attention_decode(tk_cu *cu, float *out, int ldo, const float *q, int ldq, const tk_cu_kv_view *views, int n,
                            int n_heads, int n_kv_heads, int head_dim, int ld_kv);

/* New rows over cached keys: backend.h's attention_cached (views and seq_start: host arrays); each row bit for bit
 * what tk_cu_attention gives it in a prefill of its whole sequence. */
void tk_cu_attention_cached(tk_cu *cu, float *out, int ldo, const float *q, int ldq, const tk_cu_kv_view *views,
                            const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                            int ld_kv);

#ifdef __cplusplus
}
#endif

#endif
