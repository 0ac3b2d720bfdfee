/* cuda_backend.c - the CUDA backend's op table (C, like the rest of the engine); the device work is in
 * cuda_ops.cu behind cuda_ops.h. Buffers are device memory (host_memory 0): model/ reaches them only through
 * the table, which TINKER_DEVICE=devsim checks on any machine.
 *
 * Every op of the table: memory (alloc, free, upload, download, copy_rows, sync), base weights (F32 parts kept
 * float32, every other type, the GGUF block types included, as bf16 rows; embed; matmul_w and its kin through
 * cuBLAS: see "base weights" and cuda_weights.cu), rmsnorm, add_bias, swiglu, logsumexp, softmax_scale,
 * zero_rows, gather, scatter_add, sum_squares, adamw, adamw_peak, rope_table, rope, rmsnorm_backward,
 * swiglu_backward, the MoE row ops (add_rows, scale_rows, row_dot), layer_norm, gelu, the float32 matmuls
 * (LoRA's), and attention (attention, attention_full, attention_backward, attention_decode, attention_cached and
 * their workspaces: cuda_attention.cu). None of this has run on a GPU yet: tests/ops checks each op against the
 * float64 references under the CPU emulation of CUDA (tests/cuda_emu) and where a GPU is visible.
 *
 * matmul_nt (and its decode and many forms) is a kernel of our own, not cuBLAS: its rows must not depend on the
 * other rows of the call, bit for bit (the prefix cache's exactness rests on it; "matmul_nt rows" in tests/ops),
 * and cuBLAS picks its algorithm by shape. matmul_w is cuBLAS's (issue #15: bf16 tensor-core GEMMs), so its rows
 * may round differently with T (tests/ops' "matmul_w rows alone" notes say DIFF for some shapes under the
 * emulator's cuBLAS): a resumed prefill's rows may then differ in their last bits from a whole prefill's. Open:
 * cuBLASLt with one fixed algorithm per weight shape (no split-K or stream-K), or a tolerance in the prefix
 * cache's contract on this backend.
 */
#ifdef TK_HAVE_CUDA

#include "cuda_backend.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "../../io/quant.h"
#include "cuda_attention.h"
#include "cuda_ops.h"
#include "cuda_weights.h"

typedef struct {
    tk_backend base;
    tk_cu *cu;
} cuda_backend;

static tk_cu *cu_of(tk_backend *be) { return ((cuda_backend *)be)->cu; }

static void cuda_destroy(tk_backend *be)
{
    tk_cu_destroy(cu_of(be));
    free(be);
}

/* ---- memory ---- */

static void *cuda_alloc(tk_backend *be, size_t bytes)
{
    void *p = tk_cu_alloc(cu_of(be), bytes);
    if (!p) tk_error(TK_ERR_NOMEM, "out of GPU memory: %.1f MB could not be allocated", (double)bytes / 1e6);
    return p;
}

static void cuda_free(tk_backend *be, void *p) { tk_cu_free(cu_of(be), p); }

static void cuda_upload(tk_backend *be, void *dst, const void *host, size_t bytes)
{
    tk_cu_upload(cu_of(be), dst, host, bytes);
}

static void cuda_download(tk_backend *be, void *host, const void *src, size_t bytes)
{
    tk_cu_download(cu_of(be), host, src, bytes);
}

static void cuda_copy_rows(tk_backend *be, float *const *dst, const float *const *src, int rows, int n)
{
    tk_cu_copy_rows(cu_of(be), dst, src, rows, n);
}

static tk_status cuda_sync(tk_backend *be)
{
    char why[256];
    int failed = tk_cu_sync(cu_of(be), why, sizeof why);
    if (!failed) return TK_OK;
    return tk_error(failed == 2 ? TK_ERR_NOMEM : TK_ERR_INTERNAL, "%s", why);
}

/* ---- base weights ----
 * Resident form: an F32 part stays float32; a part of any other type (F16, BF16, the GGUF block types) becomes
 * bf16 rows, each value its tk_dequantize value rounded to nearest even (weight_rounding 2^-8). weight_put_row
 * decodes the file's row on the host (its own buffer: rows are stored from several threads at once) and uploads
 * it (cudaMemcpyAsync from pageable memory returns once the bytes are staged, so the buffer is freed at once).
 * matmul_w and its kin are cuda_weights.cu's: bf16 activations into cublasGemmEx with float32 accumulation. */

static int resident_bf16(int type) { return type != TK_GGML_F32; }

/* float -> bf16, to nearest even; a NaN keeps its sign and high mantissa bits (and stays a NaN) */
static uint16_t bf16_round(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        uint16_t h = (uint16_t)(u >> 16);
        return (h & 0x7f) ? h : (uint16_t)(h | 0x40);
    }
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static size_t cuda_weight_bytes(tk_backend *be, int type, int rows, int cols)
{
    (void)be;
    if (rows <= 0 || cols <= 0 || !tk_quant_row_bytes(type, (size_t)cols)) return 0; /* one of the 11, whole blocks */
    size_t e = resident_bf16(type) ? 2 : 4;
    return ((size_t)rows * (size_t)cols * e + 63) & ~(size_t)63;
}

static void cuda_weight_put_row(tk_backend *be, const tk_weight_part *p, int cols, int row, const void *src)
{
    tk_cu *cu = cu_of(be);
    if (p->type == TK_GGML_F32 || p->type == TK_GGML_BF16) { /* resident as stored */
        size_t e = p->type == TK_GGML_F32 ? 4 : 2;
        tk_cu_upload(cu, (char *)p->data + (size_t)row * cols * e, src, (size_t)cols * e);
        return;
    }
    float *f = malloc((size_t)cols * (sizeof(float) + sizeof(uint16_t)));
    if (!f) {
        tk_cu_fail_nomem(cu, "weight_put_row: out of host memory");
        return;
    }
    uint16_t *h = (uint16_t *)(f + cols);
    tk_dequantize(f, src, p->type, (size_t)cols);
    for (int i = 0; i < cols; i++) h[i] = bf16_round(f[i]);
    tk_cu_upload(cu, (uint16_t *)p->data + (size_t)row * cols, h, (size_t)cols * sizeof *h);
    free(f);
}

/* the parts of w as cuda_weights.h takes them */
static int wparts(tk_cu_wpart *out, const tk_weight *w)
{
    for (int i = 0; i < w->n_parts; i++) {
        const tk_weight_part *p = &w->part[i];
        out[i] = (tk_cu_wpart){resident_bf16(p->type), p->row0, p->rows, p->data};
    }
    return w->n_parts;
}

static void cuda_matmul_w(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                          float alpha, float beta)
{
    tk_cu_wpart parts[TK_WEIGHT_MAX_PARTS];
    tk_cu_matmul_w(cu_of(be), y, ldy, x, ldx, parts, wparts(parts, w), w->cols, T, alpha, beta);
}

static void cuda_matmul_w_t(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                            float alpha, float beta)
{
    tk_cu_wpart parts[TK_WEIGHT_MAX_PARTS];
    tk_cu_matmul_w_t(cu_of(be), y, ldy, x, ldx, parts, wparts(parts, w), w->rows, w->cols, T, alpha, beta);
}

static void grouped(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                    const int32_t *start, int n_groups, float alpha, float beta, int transposed)
{
    if (n_groups <= 0) return;
    tk_cu_wpart *parts = malloc((size_t)n_groups * TK_CU_MAX_PARTS * sizeof *parts);
    int *n_parts = malloc((size_t)n_groups * sizeof *n_parts);
    if (!parts || !n_parts) tk_cu_fail_nomem(cu_of(be), "matmul_w_grouped: out of host memory");
    else {
        for (int g = 0; g < n_groups; g++) n_parts[g] = wparts(parts + (size_t)g * TK_CU_MAX_PARTS, &w[g]);
        tk_cu_matmul_w_grouped(cu_of(be), y, ldy, x, ldx, parts, n_parts, w[0].rows, w[0].cols, start, n_groups,
                               alpha, beta, transposed);
    }
    free(parts), free(n_parts);
}

static void cuda_matmul_w_grouped(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                                  const int32_t *start, int n_groups, float alpha, float beta, int decoding)
{
    (void)decoding; /* one implementation serves both */
    grouped(be, y, ldy, x, ldx, w, start, n_groups, alpha, beta, 0);
}

static void cuda_matmul_w_t_grouped(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                                    const int32_t *start, int n_groups, float alpha, float beta)
{
    grouped(be, y, ldy, x, ldx, w, start, n_groups, alpha, beta, 1);
}

/* the rows of the resident form, decoded exactly (bf16 -> float32 is exact) */
static void cuda_embed(tk_backend *be, float *x, const tk_weight *table, const int32_t *tokens, int T)
{
    for (int i = 0; i < table->n_parts; i++) { /* each part writes the rows of the tokens it holds */
        const tk_weight_part *p = &table->part[i];
        tk_cu_embed(cu_of(be), x, p->data, resident_bf16(p->type) ? TK_GGML_BF16 : TK_GGML_F32, table->cols, p->row0,
                    p->rows, tokens, T);
    }
}

/* ---- row-wise and element-wise ---- */

static void cuda_rmsnorm(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n,
                         float eps, float *inv_rms)
{
    tk_cu_rmsnorm(cu_of(be), y, ldy, x, ldx, w, rows, n, eps, inv_rms);
}

static void cuda_add_bias(tk_backend *be, float *y, int ldy, const float *b, int rows, int n)
{
    tk_cu_add_bias(cu_of(be), y, ldy, b, rows, n);
}

static void cuda_swiglu(tk_backend *be, float *act, const float *gate_up, int T, int F)
{
    tk_cu_swiglu(cu_of(be), act, gate_up, T, F);
}

static void cuda_logsumexp(tk_backend *be, float *lse, const float *x, int ldx, int rows, int n)
{
    tk_cu_logsumexp(cu_of(be), lse, x, ldx, rows, n);
}

static void cuda_softmax_scale(tk_backend *be, float *x, int ldx, const float *lse, const float *g, int rows, int n)
{
    tk_cu_softmax_scale(cu_of(be), x, ldx, lse, g, rows, n);
}

static void cuda_zero_rows(tk_backend *be, float *x, int ldx, int rows, int n)
{
    tk_cu_zero_rows(cu_of(be), x, ldx, rows, n);
}

static void cuda_gather(tk_backend *be, float *out, const float *x, int ldx, const int32_t *row, const int32_t *col,
                        int n)
{
    tk_cu_gather(cu_of(be), out, x, ldx, row, col, n);
}

static void cuda_scatter_add(tk_backend *be, float *x, int ldx, const int32_t *row, const int32_t *col,
                             const float *val, int n)
{
    tk_cu_scatter_add(cu_of(be), x, ldx, row, col, val, n);
}

/* ---- backward element-wise, the MoE block's rows, a vision tower's ---- */

static void cuda_rmsnorm_backward(tk_backend *be, float *dx, int lddx, const float *dy, int lddy, const float *x,
                                  int ldx, const float *w, const float *inv_rms, int rows, int n, int accumulate)
{
    tk_cu_rmsnorm_backward(cu_of(be), dx, lddx, dy, lddy, x, ldx, w, inv_rms, rows, n, accumulate);
}

static void cuda_swiglu_backward(tk_backend *be, float *dgate_up, const float *dact, const float *gate_up, int T, int F)
{
    tk_cu_swiglu_backward(cu_of(be), dgate_up, dact, gate_up, T, F);
}

static void cuda_add_rows(tk_backend *be, float *const *dst, const float *const *src, const float *scale, int rows,
                          int n)
{
    tk_cu_add_rows(cu_of(be), dst, src, scale, rows, n);
}

static void cuda_scale_rows(tk_backend *be, float *x, int ldx, const float *scale, int rows, int n)
{
    tk_cu_scale_rows(cu_of(be), x, ldx, scale, rows, n);
}

static void cuda_row_dot(tk_backend *be, float *out, const float *a, int lda, const float *b, int ldb, int rows, int n)
{
    tk_cu_row_dot(cu_of(be), out, a, lda, b, ldb, rows, n);
}

static void cuda_layer_norm(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, const float *b,
                            int rows, int n, float eps)
{
    tk_cu_layer_norm(cu_of(be), y, ldy, x, ldx, w, b, rows, n, eps);
}

static void cuda_gelu(tk_backend *be, float *y, int ldy, const float *x, int ldx, int rows, int n, int kind)
{
    tk_cu_gelu(cu_of(be), y, ldy, x, ldx, rows, n, kind);
}

/* ---- float32 matmuls (LoRA's): cuBLAS ---- */

static void cuda_matmul_nt(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N,
                           int K, float alpha, float beta)
{
    tk_cu_matmul_nt(cu_of(be), y, ldy, x, ldx, w, T, N, K, alpha, beta);
}

static void cuda_matmul_nt_many(tk_backend *be, const tk_nt_job *jobs, int n_jobs, int decoding)
{
    (void)decoding; /* one kernel serves both: a grouped GEMM is the next step */
    for (int j = 0; j < n_jobs; j++)
        tk_cu_matmul_nt(cu_of(be), jobs[j].y, jobs[j].ldy, jobs[j].x, jobs[j].ldx, jobs[j].w, jobs[j].T, jobs[j].N,
                        jobs[j].K, jobs[j].alpha, jobs[j].beta);
}

static void cuda_matmul_nn(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int ldw, int T,
                           int N, int K, float alpha, float beta)
{
    tk_cu_matmul_nn(cu_of(be), y, ldy, x, ldx, w, ldw, T, N, K, alpha, beta);
}

static void cuda_matmul_tn_acc(tk_backend *be, float *g, int ldg, const float *a, int lda, const float *b, int ldb,
                               int T, int M, int N, float alpha)
{
    tk_cu_matmul_tn_acc(cu_of(be), g, ldg, a, lda, b, ldb, T, M, N, alpha);
}

/* ---- RoPE ---- */

static void cuda_rope_table(tk_backend *be, float *cos, float *sin, const int32_t *pos, int pos_dims, int rows,
                            const float *inv_freq, const int8_t *axis, int half)
{
    tk_cu_rope_table(cu_of(be), cos, sin, pos, pos_dims, rows, inv_freq, axis, half);
}

static void cuda_rope(tk_backend *be, float *x, int ldx, int rows, int n_heads, int head_dim, const float *cos,
                      const float *sin, int inverse)
{
    tk_cu_rope(cu_of(be), x, ldx, rows, n_heads, head_dim, cos, sin, inverse);
}

/* ---- the optimizer ---- */

static double cuda_sum_squares(tk_backend *be, const float *x, size_t n) { return tk_cu_sum_squares(cu_of(be), x, n); }

static void factors_array(const tk_adamw_factors *f, float out[8])
{
    out[0] = f->clip_scale, out[1] = f->decay, out[2] = f->step_size, out[3] = f->bc2_sqrt;
    out[4] = f->b1w, out[5] = f->b2, out[6] = f->b2w, out[7] = f->eps;
}

static void cuda_adamw(tk_backend *be, float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f)
{
    float fa[8];
    factors_array(f, fa);
    tk_cu_adamw(cu_of(be), p, g, m, v, n, fa);
}

static float cuda_adamw_peak(tk_backend *be, const float *p, const float *g, const float *m, const float *v, size_t n,
                             const tk_adamw_factors *f)
{
    float fa[8];
    factors_array(f, fa);
    return tk_cu_adamw_peak(cu_of(be), p, g, m, v, n, fa);
}

/* ---- attention ---- (cuda_attention.cu) */

/* tk_cu_kv_view mirrors tk_kv_view, so a host array of views passes as it is */
_Static_assert(sizeof(tk_cu_kv_view) == sizeof(tk_kv_view) && offsetof(tk_cu_kv_view, k0) == offsetof(tk_kv_view, k0) &&
                   offsetof(tk_cu_kv_view, v0) == offsetof(tk_kv_view, v0) &&
                   offsetof(tk_cu_kv_view, n0) == offsetof(tk_kv_view, n0) &&
                   offsetof(tk_cu_kv_view, k1) == offsetof(tk_kv_view, k1) &&
                   offsetof(tk_cu_kv_view, v1) == offsetof(tk_kv_view, v1) &&
                   offsetof(tk_cu_kv_view, n1) == offsetof(tk_kv_view, n1),
               "tk_cu_kv_view must match tk_kv_view");

static void cuda_attention(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                           int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                           float *lse, float *work)
{
    (void)work;
    tk_cu_attention(cu_of(be), out, ldo, q, k, v, ldqkv, seq_start, n_seqs, n_heads, n_kv_heads, head_dim, lse, 1);
}

static void cuda_attention_full(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                                int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int head_dim, float *work)
{
    (void)work;
    tk_cu_attention(cu_of(be), out, ldo, q, k, v, ldqkv, seq_start, n_seqs, n_heads, n_heads, head_dim, NULL, 0);
}

/* attention, attention_full, attention_decode and attention_cached keep their state in registers and shared
 * memory (decoding's split-K partials in a stream-ordered allocation of their own): one float, so that callers
 * that carve workspaces never see an empty one */
static size_t cuda_attention_workspace(tk_backend *be, int n_tokens, int max_seq_len, int n_heads, int head_dim)
{
    (void)be, (void)n_tokens, (void)max_seq_len, (void)n_heads, (void)head_dim;
    return 1;
}

static void cuda_attention_backward(tk_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                    const float *out, int ldo, const float *q, const float *k, const float *v,
                                    int ldqkv, const float *lse, const int32_t *seq_start, int n_seqs, int n_heads,
                                    int n_kv_heads, int head_dim, float *work)
{
    tk_cu_attention_backward(cu_of(be), dq, dk, dv, dout, out, ldo, q, k, v, ldqkv, lse, seq_start, n_seqs, n_heads,
                             n_kv_heads, head_dim, work);
}

/* D = rowsum(dout * out) for every (token, head) */
static size_t cuda_attention_backward_workspace(tk_backend *be, int n_tokens, int max_seq_len, int n_heads,
                                                int head_dim)
{
    (void)be, (void)max_seq_len, (void)head_dim;
    return tk_cu_attention_backward_workspace(n_tokens, n_heads);
}

static void cuda_attention_decode(tk_backend *be, float *out, int ldo, const float *q, int ldq,
                                  const tk_kv_view *views, int n, int n_heads, int n_kv_heads, int head_dim, int ld_kv,
                                  float *work)
{
    (void)work;
    tk_cu_attention_decode(cu_of(be), out, ldo, q, ldq, (const tk_cu_kv_view *)views, n, n_heads, n_kv_heads,
                           head_dim, ld_kv);
}

static size_t cuda_attention_decode_workspace(tk_backend *be, int max_keys)
{
    (void)be, (void)max_keys;
    return 1;
}

static void cuda_attention_cached(tk_backend *be, float *out, int ldo, const float *q, int ldq,
                                  const tk_kv_view *views, const int32_t *seq_start, int n_seqs, int n_heads,
                                  int n_kv_heads, int head_dim, int ld_kv, float *work)
{
    (void)work;
    tk_cu_attention_cached(cu_of(be), out, ldo, q, ldq, (const tk_cu_kv_view *)views, seq_start, n_seqs, n_heads,
                           n_kv_heads, head_dim, ld_kv);
}

static size_t cuda_attention_cached_workspace(tk_backend *be, int max_keys, int head_dim)
{
    (void)be, (void)max_keys, (void)head_dim;
    return 1;
}

/* ---- the table ---- */

tk_backend *tk_cuda_backend_create(tk_pool *pool)
{
    (void)pool; /* the GPU runs the work; the pool stays the host's */
    char why[256] = "";
    tk_cu *cu = tk_cu_create(0, why, sizeof why);
    cuda_backend *be = cu ? calloc(1, sizeof *be) : NULL;
    if (!be) {
        tk_cu_destroy(cu);
        tk_error(TK_ERR_UNSUPPORTED, "no CUDA backend: %s", cu ? "out of memory" : why);
        return NULL;
    }
    be->cu = cu;
    be->base = (tk_backend){
        .name = "cuda",
        .host_memory = 0,
        .destroy = cuda_destroy,
        .weight_rounding = 0x1p-8f, /* bf16 base weights and activations (see "base weights") */
        .weight_bytes = cuda_weight_bytes,
        .weight_put_row = cuda_weight_put_row,
        .matmul_w = cuda_matmul_w,
        .matmul_w_decode = cuda_matmul_w,
        .matmul_w_t = cuda_matmul_w_t,
        .matmul_w_grouped = cuda_matmul_w_grouped,
        .matmul_w_t_grouped = cuda_matmul_w_t_grouped,
        .alloc = cuda_alloc,
        .free = cuda_free,
        .upload = cuda_upload,
        .download = cuda_download,
        .copy_rows = cuda_copy_rows,
        .sync = cuda_sync,
        .zero_rows = cuda_zero_rows,
        .gather = cuda_gather,
        .scatter_add = cuda_scatter_add,
        .sum_squares = cuda_sum_squares,
        .adamw = cuda_adamw,
        .adamw_peak = cuda_adamw_peak,
        .embed = cuda_embed,
        .rmsnorm = cuda_rmsnorm,
        .add_bias = cuda_add_bias,
        .swiglu = cuda_swiglu,
        .logsumexp = cuda_logsumexp,
        .softmax_scale = cuda_softmax_scale,
        .rope_table = cuda_rope_table,
        .rope = cuda_rope,
        .matmul_nt = cuda_matmul_nt,
        .matmul_nt_decode = cuda_matmul_nt,
        .matmul_nt_many = cuda_matmul_nt_many,
        .matmul_nn = cuda_matmul_nn,
        .matmul_tn_acc = cuda_matmul_tn_acc,
        .rmsnorm_backward = cuda_rmsnorm_backward,
        .swiglu_backward = cuda_swiglu_backward,
        .add_rows = cuda_add_rows,
        .scale_rows = cuda_scale_rows,
        .row_dot = cuda_row_dot,
        .layer_norm = cuda_layer_norm,
        .gelu = cuda_gelu,
        .attention = cuda_attention,
        .attention_full = cuda_attention_full,
        .attention_workspace = cuda_attention_workspace,
        .attention_backward = cuda_attention_backward,
        .attention_backward_workspace = cuda_attention_backward_workspace,
        .attention_decode = cuda_attention_decode,
        .attention_decode_workspace = cuda_attention_decode_workspace,
        .attention_cached = cuda_attention_cached,
        .attention_cached_workspace = cuda_attention_cached_workspace,
    };
    atomic_init(&be->base.refcount, 1);
    return &be->base;
}

#endif /* TK_HAVE_CUDA */
