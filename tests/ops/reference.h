/* reference.h - the op table's definitions, written the plain way in float64.
 *
 * One function per op of backend.h, with the same meaning and layout
 * (row-major, `ld` row strides) but double data and none of the kernels'
 * tricks: no blocking, no threads, no fast exp, softmax over exactly the
 * visible keys. These are what the backend is compared with, and their
 * forward functions are the objectives finite differences differentiate, so
 * the backward ones here are checked too. Outputs are written only on their
 * valid columns. With beta == 0 an output is not read (BLAS semantics).
 */
#ifndef TK_TEST_REFERENCE_H
#define TK_TEST_REFERENCE_H

#include <stddef.h>
#include <stdint.h>

/* y[T, N] = alpha x[T, K] . w[N, K]^T + beta y */
void ref_matmul_nt(double *y, int ldy, const double *x, int ldx, const double *w, int ldw, int T, int N, int K,
                   double alpha, double beta);
/* y[T, N] = alpha x[T, K] . w[K, N] + beta y */
void ref_matmul_nn(double *y, int ldy, const double *x, int ldx, const double *w, int ldw, int T, int N, int K,
                   double alpha, double beta);
/* g[M, N] += alpha a[T, M]^T . b[T, N] */
void ref_matmul_tn_acc(double *g, int ldg, const double *a, int lda, const double *b, int ldb, int T, int M, int N,
                       double alpha);
/* out[i] = x[row[i] * ldx + col[i]] */
void ref_gather(double *out, const double *x, int ldx, const int32_t *row, const int32_t *col, int n);
/* x[row[i] * ldx + col[i]] += val[i], in order */
void ref_scatter_add(double *x, int ldx, const int32_t *row, const int32_t *col, const double *val, int n);
/* sum of x[i]^2 (long double accumulation: exact enough to judge a double sum) */
double ref_sum_squares(const float *x, size_t n);
/* One AdamW step as torch's single-tensor AdamW defines it, in float64 from the factors (backend.h
 * tk_adamw_factors): g' = g clip; p = p decay; m = m + b1w (g' - m); v = b2 v + b2w g'^2;
 * p = p - step_size m / (sqrt(v) / bc2_sqrt + eps); g = 0. */
void ref_adamw(double *p, double *g, double *m, double *v, size_t n, double clip_scale, double decay,
               double step_size, double bc2_sqrt, double b1w, double b2, double b2w, double eps);
/* cos[r, i] = cos(a), sin[r, i] = sin(a) with a = (float)pos[r] * inv_freq[i] rounded to float32 (as Hugging
 * Face computes the angle), the cos and sin in float64 */
void ref_rope_table(double *cos, double *sin, const int32_t *pos, int pos_dims, int rows, const float *inv_freq,
                    const int8_t *axis, int half);
/* x[T, D] = table[tokens[t]] */
void ref_embed(double *x, const double *table, const int32_t *tokens, int T, int D);
/* y = x / sqrt(mean(x^2) + eps) * w per row; inv_rms[r] (optional) the 1 / sqrt */
void ref_rmsnorm(double *y, int ldy, const double *x, int ldx, const double *w, int rows, int n, double eps,
                 double *inv_rms);
/* dx (+)= the gradient of sum(dy * rmsnorm(x)) with respect to x (inv_rms recomputed from x and eps) */
void ref_rmsnorm_backward(double *dx, int lddx, const double *dy, int lddy, const double *x, int ldx, const double *w,
                          int rows, int n, double eps, int accumulate);
/* y[r] += b */
void ref_add_bias(double *y, int ldy, const double *b, int rows, int n);
/* rotate_half RoPE of heads h < n_heads of x (cos/sin [rows, Dh/2]); inverse rotates by -angle */
void ref_rope(double *x, int ldx, int rows, int n_heads, int head_dim, const double *cos, const double *sin,
              int inverse);
/* act[T, F] = silu(gate_up[:, :F]) * gate_up[:, F:] (rows of 2F) */
void ref_swiglu(double *act, const double *gate_up, int T, int F);
/* dgate_up[T, 2F] = the gradient of sum(dact * swiglu(gate_up)) */
void ref_swiglu_backward(double *dgate_up, const double *dact, const double *gate_up, int T, int F);
/* lse[r] = log sum exp x[r, :n] */
void ref_logsumexp(double *lse, const double *x, int ldx, int rows, int n);
/* y[r, i] = -g[r] exp(x[r, i] - lse[r]) (out of place; the op works in place) */
void ref_softmax_scale(double *y, int ldy, const double *x, int ldx, const double *lse, const double *g, int rows,
                       int n);
/* causal grouped-query attention over packed sequences (backend.h attention); lse optional [T, H] */
void ref_attention(double *out, int ldo, const double *q, const double *k, const double *v, int ldqkv,
                   const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim, double *lse);
/* bidirectional multi-head attention within each packed sequence (backend.h attention_full) */
void ref_attention_full(double *out, int ldo, const double *q, const double *k, const double *v, int ldqkv,
                        const int32_t *seq_start, int n_seqs, int n_heads, int head_dim);
/* y = (x - mean) / sqrt(var + eps) * w + b per row (biased variance) */
void ref_layer_norm(double *y, int ldy, const double *x, int ldx, const double *w, const double *b, int rows, int n,
                    double eps);
/* gelu of one value: kind 0 the erf form (through erfc, exact for negative x too), 1 the tanh approximation,
 * 2 x sigmoid(1.702 x) (backend.h enum tk_gelu) */
double ref_gelu(double x, int kind);
/* dq, dk, dv (overwritten, row stride ldqkv) of sum(dout * attention(q, k, v)); probabilities recomputed */
void ref_attention_backward(double *dq, double *dk, double *dv, const double *dout, int ldo, const double *q,
                            const double *k, const double *v, int ldqkv, const int32_t *seq_start, int n_seqs,
                            int n_heads, int n_kv_heads, int head_dim);

/* the keys and values one decoding query attends to: n0 shared rows then n1 own rows */
typedef struct {
    const double *k0, *v0;
    int n0;
    const double *k1, *v1;
    int n1;
} ref_kv_view;
/* out[i, h] = softmax(q_h . keys / sqrt(Dh)) values over view i's n0 + n1 rows */
void ref_attention_decode(double *out, int ldo, const double *q, int ldq, const ref_kv_view *views, int n,
                          int n_heads, int n_kv_heads, int head_dim, int ld_kv);

#endif
