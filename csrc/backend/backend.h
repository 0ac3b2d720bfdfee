/* backend.h - the op table the transformer recipe calls.
 *
 * The forward and backward passes (model/transformer.c, model/loss.c) are
 * written once against this table; each backend (cpu/ now, cuda/ later)
 * fills it in. Activations, LoRA tensors and gradients are row-major
 * float32; `ld` arguments are row strides in floats, so ops can work on
 * column slices (one head of q, the k part of a fused qkv buffer) without
 * copies. The CPU backend is the executable specification the others are
 * tested against op by op.
 *
 * Base weights are tk_weight handles: each keeps its file's own storage type
 * (GGUF F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K, safetensors
 * F32/F16/BF16) in a resident form the backend chooses at load, and the ops
 * that read them (matmul_w, matmul_w_t, embed) decode each weight exactly to
 * its tk_dequantize value inside the kernel. There is no float32 copy. A
 * backend whose resident form rounds (CUDA: bf16) says by how much in
 * weight_rounding.
 */
#ifndef TK_BACKEND_H
#define TK_BACKEND_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/status.h"


typedef struct tk_backend tk_backend;

/* The GELU forms a vision tower uses (backend gelu op). */
enum tk_gelu { TK_GELU_ERF, TK_GELU_TANH, TK_GELU_QUICK };

/* A weight matrix W [rows, cols] (PyTorch order: [out, in]) made of up to three row ranges ("parts"), each
 * stored in its own type: q, k and v (or gate and up) stacked into one matrix keep their file types even
 * when those differ (k-quant files mix Q4_K and Q6_K); rows of one type are one part. */
enum { TK_WEIGHT_MAX_PARTS = 3 };

typedef struct {
    int type;          /* ggml type id of the stored values */
    int row0, rows;    /* this part's rows of W */
    void *data;        /* the backend's resident form (weight_bytes of it) */
} tk_weight_part;

typedef struct tk_weight {
    int rows, cols;
    int n_parts;
    tk_weight_part part[TK_WEIGHT_MAX_PARTS];
} tk_weight;

/* The cached keys/values one decoding sequence attends to, for one layer. */
typedef struct tk_kv_view {
    const float *k0, *v0; /* [n0, ld_kv] the shared prompt (n0 may be 0) */
    int n0;
    const float *k1, *v1; /* [n1, ld_kv] the sequence's own tokens, the new one last */
    int n1;
} tk_kv_view;

/* One y[T, N] = alpha * x[T, K] . w[N, K]^T + beta * y of a matmul_nt_many call (row strides ldy, ldx; w's
 * rows contiguous). */
typedef struct tk_nt_job {
    float *y;
    const float *x, *w;
    int ldy, ldx, T, N, K;
    float alpha, beta;
} tk_nt_job;

/* The float32 factors of one AdamW step (computed in double by model/optim.c, as torch does). */
typedef struct {
    float clip_scale;   /* the gradients are multiplied by it first (global-norm clipping) */
    float decay;        /* 1 - lr wd */
    float step_size;    /* lr / (1 - beta1^t) */
    float bc2_sqrt;     /* sqrt(1 - beta2^t) */
    float b1w, b2, b2w; /* 1 - beta1, beta2, 1 - beta2 */
    float eps;
} tk_adamw_factors;

struct tk_backend {
    const char *name;
    /* Device buffers are plain host memory (the CPU backend): a host view of one needs no download. */
    int host_memory;
    /* The relative rounding of the resident base weights and of the activations multiplied with them: 0 when the
     * weights decode exactly to their tk_dequantize values and the products run in float32 (the CPU backend),
     * 2^-8 for bf16 (CUDA: every non-F32 part is its tk_dequantize values rounded to bf16 at load, and matmul_w
     * and its kin round x to bf16, summing the exact products in float32; F32 parts stay float32). embed gives
     * the resident values exactly. Tests hold the weight ops to the float64 product of the rounded operands. */
    float weight_rounding;
    /* The engine holds one reference, and every model and adapter whose buffers the backend allocated holds
     * one, so they can free them even after the engine is gone (the backend then only frees memory). */
    atomic_int refcount;
    void (*destroy)(tk_backend *be);

    /* ---- base weights ---- */
    /* Bytes (a multiple of 64) of the resident form of a [rows, cols] part of `type`; 0 when this backend
     * cannot hold that type or shape. The caller provides that much zeroed, 64-byte aligned memory. */
    size_t (*weight_bytes)(tk_backend *be, int type, int rows, int cols);
    /* Stores row `row` (0 <= row < p->rows) of a part from the file's bytes for that row (cols / block
     * elements blocks, unaligned). Distinct rows may be stored from different threads. */
    void (*weight_put_row)(tk_backend *be, const tk_weight_part *p, int cols, int row, const void *src);
    /* y[T, rows] = alpha * x[T, cols] . W^T + beta * y   (projections and the head) */
    void (*matmul_w)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                     float alpha, float beta);
    /* The same for the rows of a decoding step (one token per sequence, T small): a kernel that streams W
     * once for all rows. The CPU backend's keeps each row's result independent of the other rows up to 64
     * rows of Q4_0 / Q4_1 / Q8_0 (8 of other block types, 1 of F32); past that it is matmul_w. Prefill and
     * training always use matmul_w, whose rows come out bit for bit the same whatever rows share the call
     * (every type sums each output alone in k order: tgemm), so a prompt's rows never depend on how many
     * prompts, or cached rows before it, share its pass. */
    void (*matmul_w_decode)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                            float alpha, float beta);
    /* y[T, cols] = alpha * x[T, rows] . W + beta * y     (input gradients: dx = dy . W) */
    void (*matmul_w_t)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                       float alpha, float beta);
    /* The experts of an MoE layer in one call: for every group g < n_groups, the rows [start[g], start[g + 1])
     * of x and y (groups back to back, any of them empty) through w[g]: matmul_w (decoding: matmul_w_decode)
     * of each group, and, _t, matmul_w_t. The same results up to float32 summation order; one call spreads
     * all the groups' work over the device, where a call per group would wait for each (a decoding step has
     * k one-row groups a layer, a prefill E of tens of rows). */
    void (*matmul_w_grouped)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                             const int32_t *start, int n_groups, float alpha, float beta, int decoding);
    void (*matmul_w_t_grouped)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                               const int32_t *start, int n_groups, float alpha, float beta);

    /* ---- matmuls on float32 tensors (LoRA) ---- */
    /* y[T, N] = alpha * x[T, K] . w[N, K]^T + beta * y   (projections; w rows contiguous). Each row's result
     * does not depend on the other rows of the call (bit for bit), so a prompt's rows come out the same however
     * many other rows (prompts, or the cached prefix of a resumed prefill) share the pass. */
    void (*matmul_nt)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N,
                      int K, float alpha, float beta);
    /* The same for the rows of a decoding step (T small): the kernel fastest there, whose rows may round
     * differently with T. */
    void (*matmul_nt_decode)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T,
                             int N, int K, float alpha, float beta);
    /* n_jobs independent matmul_nt's (or matmul_nt_decode's when `decoding`) as one call over the device,
     * each job's rows the same bit for bit as its own call: the LoRA terms of every adapter segment of a pass
     * (a segmented gather matmul, as Punica's SGMV), where a call each would wait for each (a decoding step
     * of 8 one-row segments made 88 small calls a layer). Jobs' outputs must not overlap. */
    void (*matmul_nt_many)(tk_backend *be, const tk_nt_job *jobs, int n_jobs, int decoding);
    /* y[T, N] = alpha * x[T, K] . w[K, N] + beta * y    (input gradients: dx = dy . W) */
    void (*matmul_nn)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int ldw, int T,
                      int N, int K, float alpha, float beta);
    /* g[M, N] += alpha * a[T, M]^T . b[T, N]            (weight gradients, summed over tokens) */
    void (*matmul_tn_acc)(tk_backend *be, float *g, int ldg, const float *a, int lda, const float *b, int ldb, int T,
                          int M, int N, float alpha);

    /* ---- memory ---- */
    /* Device buffers: 64-byte aligned and zeroed. NULL when out of memory, with the message recorded
     * (tk_last_error); the engine reports it and keeps working. */
    void *(*alloc)(tk_backend *be, size_t bytes);
    void (*free)(tk_backend *be, void *buffer); /* NULL: nothing */
    /* host <-> device copies of `bytes` (the host side is plain memory, the device side a buffer's) */
    void (*upload)(tk_backend *be, void *dst, const void *host, size_t bytes);
    void (*download)(tk_backend *be, void *host, const void *src, size_t bytes);
    /* dst[i][0 .. n) = src[i][0 .. n) for i < rows, device to device: rows gathered from or scattered to
     * anywhere (KV-cache writes, replacement embeddings, a stored copy of the residual stream); no row
     * overlaps another. The pointer arrays themselves are host memory. */
    void (*copy_rows)(tk_backend *be, float *const *dst, const float *const *src, int rows, int n);
    /* Waits for the work queued so far; returns TK_OK or the first failure since the last sync (its message
     * in tk_last_error). The CPU backend runs every op to completion before returning. */
    tk_status (*sync)(tk_backend *be);

    /* ---- rows (a mixture-of-experts block: tokens grouped by expert and back) ---- */
    /* dst[i][0 .. n) += scale[i] * src[i][0 .. n) for i < rows, in order (scale NULL: 1). A dst row may repeat
     * (its terms add up in order); no dst row overlaps a src row. The pointer and scale arrays are host memory. */
    void (*add_rows)(tk_backend *be, float *const *dst, const float *const *src, const float *scale, int rows, int n);
    /* x[r, :n] *= scale[r] for r < rows (scale: host memory) */
    void (*scale_rows)(tk_backend *be, float *x, int ldx, const float *scale, int rows, int n);
    /* out[r] = sum_i a[r, i] b[r, i] for r < rows, summed in double and rounded once */
    void (*row_dot)(tk_backend *be, float *out, const float *a, int lda, const float *b, int ldb, int rows, int n);
    /* x[r, :n] = 0 for r < rows */
    void (*zero_rows)(tk_backend *be, float *x, int ldx, int rows, int n);

    /* ---- indexing (the loss's targets) ---- */
    /* out[i] = x[row[i] * ldx + col[i]] for i < n (row, col: host arrays) */
    void (*gather)(tk_backend *be, float *out, const float *x, int ldx, const int32_t *row, const int32_t *col, int n);
    /* x[row[i] * ldx + col[i]] += val[i] for i < n, in order (pairs may repeat) */
    void (*scatter_add)(tk_backend *be, float *x, int ldx, const int32_t *row, const int32_t *col, const float *val,
                        int n);

    /* ---- the optimizer ---- */
    /* sum of x[i]^2 over n floats, in double */
    double (*sum_squares)(tk_backend *be, const float *x, size_t n);
    /* One AdamW update of n parameters in place, as torch's single-tensor AdamW on float32 (see
     * model/optim.c for the factors), then g = 0. */
    void (*adamw)(tk_backend *be, float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f);
    /* What adamw would do, without writing: the largest |p| after the update, or +inf when any updated p, m or v
     * would be non-finite (optim_step refuses such a step and leaves the adapter as it was). */
    float (*adamw_peak)(tk_backend *be, const float *p, const float *g, const float *m, const float *v, size_t n,
                        const tk_adamw_factors *f);

    /* ---- element-wise and row-wise ---- */
    /* x[T, cols] = table[tokens[t], :], decoded */
    void (*embed)(tk_backend *be, float *x, const tk_weight *table, const int32_t *tokens, int T);
    /* y[r, :n] = x[r, :n] * rsqrt(mean(x[r]^2) + eps) * w; y may equal x; inv_rms[r] (optional) keeps the rsqrt */
    void (*rmsnorm)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n,
                    float eps, float *inv_rms);
    /* dx[r] (+)= d/dx of rmsnorm given dy, the input x and its inv_rms; overwrite when !accumulate */
    void (*rmsnorm_backward)(tk_backend *be, float *dx, int lddx, const float *dy, int lddy, const float *x, int ldx,
                             const float *w, const float *inv_rms, int rows, int n, int accumulate);
    /* y[r, :n] += b */
    void (*add_bias)(tk_backend *be, float *y, int ldy, const float *b, int rows, int n);
    /* cos[r, i] = cos(angle), sin[r, i] = sin(angle), angle = (float)p * inv_freq[i] rounded to float32 as Hugging
     * Face computes it, p = pos[r * pos_dims + (axis ? axis[i] : 0)]: each row's position has pos_dims components
     * (M-RoPE: temporal, height, width) and frequency i takes its angle from component axis[i]; for rows < rows,
     * i < half (pos, axis: host; inv_freq: device) */
    void (*rope_table)(tk_backend *be, float *cos, float *sin, const int32_t *pos, int pos_dims, int rows,
                       const float *inv_freq, const int8_t *axis, int half);
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

    /* ---- a vision tower's (forward only) ---- */
    /* y[r, :n] = (x[r] - mean) / sqrt(var + eps) * w + b over each row's n values (LayerNorm, biased variance; mean
     * and variance summed in double); y may equal x */
    void (*layer_norm)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, const float *b,
                       int rows, int n, float eps);
    /* y[r, :n] = gelu(x[r, :n]) (enum tk_gelu: the exact erf form, the tanh approximation, or x sigmoid(1.702 x)),
     * each value computed in double and rounded once; y may equal x */
    void (*gelu)(tk_backend *be, float *y, int ldy, const float *x, int ldx, int rows, int n, int kind);
    /* Bidirectional multi-head attention within each packed sequence (rows seq_start[s] .. seq_start[s+1]: one
     * image's patches): out[t, h*Dh:] = softmax(q_h k_h^T / sqrt(Dh)) v_h over all of the sequence's rows.
     * `work` holds attention_workspace floats. */
    void (*attention_full)(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                           int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int head_dim, float *work);

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
    /* A prefill resumed over cached rows (a prompt whose prefix's keys and values came from the prefix cache):
     * sequence i's new rows are rows seq_start[i] .. seq_start[i+1] of q (len of them), at positions
     * views[i].n1 - len .. views[i].n1 - 1, and attend causally to the keys and values views[i].k1 / v1 rows
     * [0, n1) (rows of ld_kv floats: the cached rows, then the new ones, already written; n0 must be 0). Each
     * row's result is bit for bit what attention gives it in a prefill of the whole sequence: the query blocks
     * are the ones attention takes from position 0, a block's rows before the first new one computed as zeros
     * and dropped. */
    void (*attention_cached)(tk_backend *be, float *out, int ldo, const float *q, int ldq, const tk_kv_view *views,
                             const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                             int ld_kv, float *work);
    size_t (*attention_cached_workspace)(tk_backend *be, int max_keys, int head_dim);
};


/* The name of the first op the table leaves NULL (a backend being written), or NULL when it has them all: the
 * engine runs models only on a complete backend. */
const char *tk_backend_missing_op(const tk_backend *be);

static inline void tk_backend_retain(tk_backend *be) { atomic_fetch_add(&be->refcount, 1); }

static inline void tk_backend_release(tk_backend *be)
{
    if (be && atomic_fetch_sub(&be->refcount, 1) == 1) be->destroy(be);
}

/* A host-readable view of `bytes` of device memory: the buffer itself when the device is host memory,
 * else a download into `host`. */
static inline const void *tk_host_view(tk_backend *be, void *host, const void *src, size_t bytes)
{
    if (be->host_memory) return src;
    be->download(be, host, src, bytes);
    return host;
}

#endif
