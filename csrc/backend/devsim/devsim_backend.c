/* devsim_backend.c - the CPU backend behind device pointers the host cannot read (TINKER_DEVICE=devsim).
 *
 * A GPU's buffers are not host memory: model/ must reach them only through the op table (upload, download,
 * tk_host_view) and keep what it reads or writes itself (index lists, positions, decode views) in host memory.
 * On the CPU backend a slip there silently works. This backend makes it fail at once, on any machine: every
 * buffer it hands out is the CPU backend's address with bit 62 set, a non-canonical x86-64 address, so a host
 * load or store through it faults (SIGSEGV) where a GPU would read garbage or crash later. Each op clears the
 * tag of its device arguments (the pointers inside weights, decode views, nt jobs and row lists too) and runs
 * the CPU op; host arguments (positions, sequence starts, tokens, gather indices, scales) are passed as they
 * are, so a device pointer given where host memory is expected faults inside the op. host_memory is 0, so
 * model/ takes the download and staging paths a GPU takes. Results are the CPU backend's, bit for bit.
 *
 * For tests (tests/test_device_discipline.py): it checks where memory lives, not speed.
 */
#include "devsim_backend.h"

#include <stdlib.h>
#include <string.h>

#include "../cpu/cpu_backend.h"

#define TAG ((uintptr_t)1 << 62)

typedef struct {
    tk_backend base;
    tk_backend *cpu;
    const char *misuse; /* the first op given host memory for a device buffer, or NULL (reported by sync) */
    int out_of_memory;  /* an op could not allocate its host copy of the arguments (reported by sync) */
} devsim_backend;

static tk_backend *inner(tk_backend *be) { return ((devsim_backend *)be)->cpu; }

/* A device address as the CPU sees it. NULL stays NULL. An untagged pointer is host memory given as a device
 * buffer, which a GPU would not accept either: the op still runs (the CPU can read it), and the next sync fails
 * naming the op. */
static void *real(tk_backend *be, const void *p, const char *op)
{
    if (!p) return NULL;
    devsim_backend *d = (devsim_backend *)be;
    if (!((uintptr_t)p & TAG) && !d->misuse) d->misuse = op;
    return (void *)((uintptr_t)p & ~TAG);
}

#define R(p) ((__typeof__(p))real(be, p, __func__))

static tk_weight real_weight(tk_backend *be, const tk_weight *w)
{
    tk_weight r = *w;
    for (int i = 0; i < r.n_parts; i++) r.part[i].data = R(r.part[i].data);
    return r;
}

/* A host array of n device pointers, untagged (NULL when out of memory: the op is then skipped and sync
 * reports it) */
static float **real_rows(tk_backend *be, const float *const *rows, int n)
{
    float **out = malloc((size_t)(n > 0 ? n : 1) * sizeof *out);
    for (int i = 0; out && i < n; i++) out[i] = R((float *)rows[i]);
    if (!out) ((devsim_backend *)be)->out_of_memory = 1;
    return out;
}

static tk_kv_view *real_views(tk_backend *be, const tk_kv_view *views, int n)
{
    tk_kv_view *out = malloc((size_t)(n > 0 ? n : 1) * sizeof *out);
    for (int i = 0; out && i < n; i++)
        out[i] = (tk_kv_view){R(views[i].k0), R(views[i].v0), views[i].n0, R(views[i].k1), R(views[i].v1), views[i].n1};
    if (!out) ((devsim_backend *)be)->out_of_memory = 1;
    return out;
}

static tk_weight *real_weights(tk_backend *be, const tk_weight *w, int n)
{
    tk_weight *out = malloc((size_t)(n > 0 ? n : 1) * sizeof *out);
    for (int i = 0; out && i < n; i++) out[i] = real_weight(be, &w[i]);
    if (!out) ((devsim_backend *)be)->out_of_memory = 1;
    return out;
}

/* ---- memory ---- */

static void *ds_alloc(tk_backend *be, size_t bytes)
{
    void *p = inner(be)->alloc(inner(be), bytes);
    return p ? (void *)((uintptr_t)p | TAG) : NULL;
}

static void ds_free(tk_backend *be, void *p) { inner(be)->free(inner(be), R(p)); }

static void ds_upload(tk_backend *be, void *dst, const void *host, size_t bytes)
{
    inner(be)->upload(inner(be), R(dst), host, bytes);
}

static void ds_download(tk_backend *be, void *host, const void *src, size_t bytes)
{
    inner(be)->download(inner(be), host, R(src), bytes);
}

static void ds_copy_rows(tk_backend *be, float *const *dst, const float *const *src, int rows, int n)
{
    float **d = real_rows(be, (const float *const *)dst, rows), **s = real_rows(be, src, rows);
    if (d && s) inner(be)->copy_rows(inner(be), d, (const float *const *)s, rows, n);
    free(d), free(s);
}

static tk_status ds_sync(tk_backend *be)
{
    devsim_backend *d = (devsim_backend *)be;
    const char *misuse = d->misuse;
    int oom = d->out_of_memory;
    d->misuse = NULL, d->out_of_memory = 0;
    if (misuse) return tk_error(TK_ERR_INTERNAL, "devsim: %s was given host memory for a device buffer", misuse);
    if (oom) return tk_error(TK_ERR_NOMEM, "devsim: out of host memory for an op's arguments");
    return inner(be)->sync(inner(be));
}

static void ds_destroy(tk_backend *be)
{
    tk_backend_release(inner(be));
    free(be);
}

/* ---- base weights ---- */

static size_t ds_weight_bytes(tk_backend *be, int type, int rows, int cols)
{
    return inner(be)->weight_bytes(inner(be), type, rows, cols);
}

static void ds_weight_put_row(tk_backend *be, const tk_weight_part *p, int cols, int row, const void *src)
{
    tk_weight_part r = *p;
    r.data = R(p->data);
    inner(be)->weight_put_row(inner(be), &r, cols, row, src);
}

#define WEIGHT_OP(name)                                                                                           \
    static void ds_##name(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,  \
                          float alpha, float beta)                                                                \
    {                                                                                                             \
        tk_weight r = real_weight(be, w);                                                                         \
        inner(be)->name(inner(be), R(y), ldy, R(x), ldx, &r, T, alpha, beta);                                     \
    }
WEIGHT_OP(matmul_w)
WEIGHT_OP(matmul_w_decode)
WEIGHT_OP(matmul_w_t)

static void ds_matmul_w_grouped(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                                const int32_t *start, int n_groups, float alpha, float beta, int decoding)
{
    tk_weight *r = real_weights(be, w, n_groups);
    if (r) inner(be)->matmul_w_grouped(inner(be), R(y), ldy, R(x), ldx, r, start, n_groups, alpha, beta, decoding);
    free(r);
}

static void ds_matmul_w_t_grouped(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                                  const int32_t *start, int n_groups, float alpha, float beta)
{
    tk_weight *r = real_weights(be, w, n_groups);
    if (r) inner(be)->matmul_w_t_grouped(inner(be), R(y), ldy, R(x), ldx, r, start, n_groups, alpha, beta);
    free(r);
}

static void ds_embed(tk_backend *be, float *x, const tk_weight *table, const int32_t *tokens, int T)
{
    tk_weight r = real_weight(be, table);
    inner(be)->embed(inner(be), R(x), &r, tokens, T);
}

/* ---- float32 matmuls ---- */

#define NT_OP(name)                                                                                               \
    static void ds_##name(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T,      \
                          int N, int K, float alpha, float beta)                                                  \
    {                                                                                                             \
        inner(be)->name(inner(be), R(y), ldy, R(x), ldx, R(w), T, N, K, alpha, beta);                             \
    }
NT_OP(matmul_nt)
NT_OP(matmul_nt_decode)

static void ds_matmul_nt_many(tk_backend *be, const tk_nt_job *jobs, int n_jobs, int decoding)
{
    tk_nt_job *r = malloc((size_t)(n_jobs > 0 ? n_jobs : 1) * sizeof *r);
    if (!r) {
        ((devsim_backend *)be)->out_of_memory = 1;
        return;
    }
    for (int i = 0; i < n_jobs; i++) {
        r[i] = jobs[i];
        r[i].y = R(jobs[i].y), r[i].x = R(jobs[i].x), r[i].w = R(jobs[i].w);
    }
    inner(be)->matmul_nt_many(inner(be), r, n_jobs, decoding);
    free(r);
}

static void ds_matmul_nn(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int ldw, int T,
                         int N, int K, float alpha, float beta)
{
    inner(be)->matmul_nn(inner(be), R(y), ldy, R(x), ldx, R(w), ldw, T, N, K, alpha, beta);
}

static void ds_matmul_tn_acc(tk_backend *be, float *g, int ldg, const float *a, int lda, const float *b, int ldb,
                             int T, int M, int N, float alpha)
{
    inner(be)->matmul_tn_acc(inner(be), R(g), ldg, R(a), lda, R(b), ldb, T, M, N, alpha);
}

/* ---- rows, indexing, the optimizer ---- */

static void ds_add_rows(tk_backend *be, float *const *dst, const float *const *src, const float *scale, int rows,
                        int n)
{
    float **d = real_rows(be, (const float *const *)dst, rows), **s = real_rows(be, src, rows);
    if (d && s) inner(be)->add_rows(inner(be), d, (const float *const *)s, scale, rows, n);
    free(d), free(s);
}

static void ds_scale_rows(tk_backend *be, float *x, int ldx, const float *scale, int rows, int n)
{
    inner(be)->scale_rows(inner(be), R(x), ldx, scale, rows, n);
}

static void ds_row_dot(tk_backend *be, float *out, const float *a, int lda, const float *b, int ldb, int rows, int n)
{
    inner(be)->row_dot(inner(be), R(out), R(a), lda, R(b), ldb, rows, n);
}

static void ds_zero_rows(tk_backend *be, float *x, int ldx, int rows, int n)
{
    inner(be)->zero_rows(inner(be), R(x), ldx, rows, n);
}

static void ds_gather(tk_backend *be, float *out, const float *x, int ldx, const int32_t *row, const int32_t *col,
                      int n)
{
    inner(be)->gather(inner(be), R(out), R(x), ldx, row, col, n);
}

static void ds_scatter_add(tk_backend *be, float *x, int ldx, const int32_t *row, const int32_t *col,
                           const float *val, int n)
{
    inner(be)->scatter_add(inner(be), R(x), ldx, row, col, R(val), n);
}

static double ds_sum_squares(tk_backend *be, const float *x, size_t n)
{
    return inner(be)->sum_squares(inner(be), R(x), n);
}

static void ds_adamw(tk_backend *be, float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f)
{
    inner(be)->adamw(inner(be), R(p), R(g), R(m), R(v), n, f);
}

static float ds_adamw_peak(tk_backend *be, const float *p, const float *g, const float *m, const float *v, size_t n,
                           const tk_adamw_factors *f)
{
    return inner(be)->adamw_peak(inner(be), R(p), R(g), R(m), R(v), n, f);
}

/* ---- element-wise and row-wise ---- */

static void ds_rmsnorm(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n,
                       float eps, float *inv_rms)
{
    inner(be)->rmsnorm(inner(be), R(y), ldy, R(x), ldx, R(w), rows, n, eps, R(inv_rms));
}

static void ds_rmsnorm_backward(tk_backend *be, float *dx, int lddx, const float *dy, int lddy, const float *x,
                                int ldx, const float *w, const float *inv_rms, int rows, int n, int accumulate)
{
    inner(be)->rmsnorm_backward(inner(be), R(dx), lddx, R(dy), lddy, R(x), ldx, R(w), R(inv_rms), rows, n,
                                accumulate);
}

static void ds_add_bias(tk_backend *be, float *y, int ldy, const float *b, int rows, int n)
{
    inner(be)->add_bias(inner(be), R(y), ldy, R(b), rows, n);
}

static void ds_rope_table(tk_backend *be, float *cos, float *sin, const int32_t *pos, int pos_dims, int rows,
                          const float *inv_freq, const int8_t *axis, int half)
{
    inner(be)->rope_table(inner(be), R(cos), R(sin), pos, pos_dims, rows, R(inv_freq), axis, half);
}

static void ds_rope(tk_backend *be, float *x, int ldx, int rows, int n_heads, int head_dim, const float *cos,
                    const float *sin, int inverse)
{
    inner(be)->rope(inner(be), R(x), ldx, rows, n_heads, head_dim, R(cos), R(sin), inverse);
}

static void ds_swiglu(tk_backend *be, float *act, const float *gate_up, int T, int F)
{
    inner(be)->swiglu(inner(be), R(act), R(gate_up), T, F);
}

static void ds_swiglu_backward(tk_backend *be, float *dgate_up, const float *dact, const float *gate_up, int T, int F)
{
    inner(be)->swiglu_backward(inner(be), R(dgate_up), R(dact), R(gate_up), T, F);
}

static void ds_logsumexp(tk_backend *be, float *lse, const float *x, int ldx, int rows, int n)
{
    inner(be)->logsumexp(inner(be), R(lse), R(x), ldx, rows, n);
}

static void ds_softmax_scale(tk_backend *be, float *x, int ldx, const float *lse, const float *g, int rows, int n)
{
    inner(be)->softmax_scale(inner(be), R(x), ldx, R(lse), R(g), rows, n);
}

static void ds_layer_norm(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, const float *b,
                          int rows, int n, float eps)
{
    inner(be)->layer_norm(inner(be), R(y), ldy, R(x), ldx, R(w), R(b), rows, n, eps);
}

static void ds_gelu(tk_backend *be, float *y, int ldy, const float *x, int ldx, int rows, int n, int kind)
{
    inner(be)->gelu(inner(be), R(y), ldy, R(x), ldx, rows, n, kind);
}

/* ---- attention ---- */

static void ds_attention_full(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                              int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int head_dim, float *work)
{
    inner(be)->attention_full(inner(be), R(out), ldo, R(q), R(k), R(v), ldqkv, seq_start, n_seqs, n_heads, head_dim,
                              R(work));
}

static void ds_attention(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                         int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                         float *lse, float *work)
{
    inner(be)->attention(inner(be), R(out), ldo, R(q), R(k), R(v), ldqkv, seq_start, n_seqs, n_heads, n_kv_heads,
                         head_dim, R(lse), R(work));
}

static size_t ds_attention_workspace(tk_backend *be, int n_tokens, int max_seq_len, int n_heads, int head_dim)
{
    return inner(be)->attention_workspace(inner(be), n_tokens, max_seq_len, n_heads, head_dim);
}

static void ds_attention_backward(tk_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                  const float *out, int ldo, const float *q, const float *k, const float *v, int ldqkv,
                                  const float *lse, const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads,
                                  int head_dim, float *work)
{
    inner(be)->attention_backward(inner(be), R(dq), R(dk), R(dv), R(dout), R(out), ldo, R(q), R(k), R(v), ldqkv,
                                  R(lse), seq_start, n_seqs, n_heads, n_kv_heads, head_dim, R(work));
}

static size_t ds_attention_backward_workspace(tk_backend *be, int n_tokens, int max_seq_len, int n_heads,
                                              int head_dim)
{
    return inner(be)->attention_backward_workspace(inner(be), n_tokens, max_seq_len, n_heads, head_dim);
}

static void ds_attention_decode(tk_backend *be, float *out, int ldo, const float *q, int ldq,
                                const tk_kv_view *views, int n, int n_heads, int n_kv_heads, int head_dim, int ld_kv,
                                float *work)
{
    tk_kv_view *r = real_views(be, views, n);
    if (r) inner(be)->attention_decode(inner(be), R(out), ldo, R(q), ldq, r, n, n_heads, n_kv_heads, head_dim, ld_kv,
                                       R(work));
    free(r);
}

static size_t ds_attention_decode_workspace(tk_backend *be, int max_keys)
{
    return inner(be)->attention_decode_workspace(inner(be), max_keys);
}

static void ds_attention_cached(tk_backend *be, float *out, int ldo, const float *q, int ldq,
                                const tk_kv_view *views, const int32_t *seq_start, int n_seqs, int n_heads,
                                int n_kv_heads, int head_dim, int ld_kv, float *work)
{
    tk_kv_view *r = real_views(be, views, n_seqs);
    if (r) inner(be)->attention_cached(inner(be), R(out), ldo, R(q), ldq, r, seq_start, n_seqs, n_heads, n_kv_heads,
                                       head_dim, ld_kv, R(work));
    free(r);
}

static size_t ds_attention_cached_workspace(tk_backend *be, int max_keys, int head_dim)
{
    return inner(be)->attention_cached_workspace(inner(be), max_keys, head_dim);
}

/* ---- the table ---- */

tk_backend *tk_devsim_backend_create(tk_pool *pool)
{
    devsim_backend *be = calloc(1, sizeof *be);
    if (!be) return NULL;
    if (!(be->cpu = tk_cpu_backend_create(pool))) {
        free(be);
        return NULL;
    }
    be->base = (tk_backend){
        .name = "devsim",
        .host_memory = 0,
        .weight_rounding = be->cpu->weight_rounding,
        .destroy = ds_destroy,
#define OP(name) .name = ds_##name
        OP(weight_bytes), OP(weight_put_row), OP(matmul_w), OP(matmul_w_decode), OP(matmul_w_t),
        OP(matmul_w_grouped), OP(matmul_w_t_grouped), OP(matmul_nt), OP(matmul_nt_decode), OP(matmul_nt_many),
        OP(matmul_nn), OP(matmul_tn_acc), OP(alloc), OP(free), OP(upload), OP(download), OP(copy_rows), OP(sync),
        OP(add_rows), OP(scale_rows), OP(row_dot), OP(zero_rows), OP(gather), OP(scatter_add), OP(sum_squares),
        OP(adamw), OP(adamw_peak), OP(embed), OP(rmsnorm), OP(rmsnorm_backward), OP(add_bias), OP(rope_table),
        OP(rope), OP(swiglu), OP(swiglu_backward), OP(logsumexp), OP(softmax_scale), OP(layer_norm), OP(gelu),
        OP(attention_full), OP(attention), OP(attention_workspace), OP(attention_backward),
        OP(attention_backward_workspace), OP(attention_decode), OP(attention_decode_workspace),
        OP(attention_cached), OP(attention_cached_workspace),
#undef OP
    };
    atomic_init(&be->base.refcount, 1);
    return &be->base;
}
