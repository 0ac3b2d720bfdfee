/* cpu_backend.c - CPU ops: OpenBLAS for the matmuls, plain loops (written so
 * gcc vectorises them, no -ffast-math) for the rest, split over the pool.
 *
 * Threading: one thread team, the engine's pool. OpenBLAS is kept at one
 * thread and the pool splits each GEMM by output columns instead: OpenBLAS's
 * own threads spin-wait after every call and, on a 2-core machine, steal the
 * cores from the pool's element-wise ops (measured: 15% of a 512-token
 * forward spent in blas_thread_server). Attention runs one (sequence, head)
 * per task.
 */
#include "cpu_backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "vec_math.h"

typedef struct {
    tk_backend base;
    tk_pool *pool;
} cpu_backend;

static tk_pool *pool_of(tk_backend *be) { return ((cpu_backend *)be)->pool; }

/* Splits `rows` into about 4 chunks per thread when there is enough work to
 * pay for waking the pool (a few microseconds). */
static int chunks_for(tk_backend *be, int rows, long work)
{
    int threads = tk_pool_threads(pool_of(be));
    if (threads == 1 || work < 32768 || rows < 2) return 1;
    int chunks = threads * 4;
    return chunks > rows ? rows : chunks;
}

static void chunk_range(int task, int n_tasks, int rows, int *begin, int *end)
{
    *begin = (int)((long)rows * task / n_tasks);
    *end = (int)((long)rows * (task + 1) / n_tasks);
}

/* ---- matmul ---------------------------------------------------------------- */

typedef struct {
    float *y;
    const float *x, *w;
    int ldy, ldx, T, N, K, n_tasks;
    float beta;
} matmul_args;

/* Columns [n0, n1) of y: rows [n0, n1) of w. Chunk edges are multiples of 16
 * so every task starts on a 64-byte boundary of w. */
static void matmul_task(void *ctx, int task, int thread)
{
    (void)thread;
    matmul_args *a = ctx;
    int blocks = (a->N + 15) / 16;
    int n0 = (int)((long)blocks * task / a->n_tasks) * 16, n1 = (int)((long)blocks * (task + 1) / a->n_tasks) * 16;
    if (n1 > a->N) n1 = a->N;
    if (n1 <= n0) return;
    tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->T, n1 - n0, a->K, 1.0f, a->x, a->ldx,
                   a->w + (size_t)n0 * a->K, a->K, a->beta, a->y + n0, a->ldy);
}

static void cpu_matmul_nt(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N,
                          int K, float beta)
{
    matmul_args a = {y, x, w, ldy, ldx, T, N, K, 1, beta};
    long work = (long)T * N * K;
    int threads = tk_pool_threads(pool_of(be));
    if (work >= 1L << 18 && N >= 32 * threads) a.n_tasks = threads;
    tk_pool_run(pool_of(be), a.n_tasks, matmul_task, &a);
}

/* ---- embedding, norms, bias ------------------------------------------------- */

static void cpu_embed(tk_backend *be, float *x, const float *table, const int32_t *tokens, int T, int D)
{
    (void)be;
    for (int t = 0; t < T; t++) memcpy(x + (size_t)t * D, table + (size_t)tokens[t] * D, (size_t)D * sizeof(float));
}


typedef struct {
    float *y;
    const float *x, *w;
    int ldy, ldx, rows, n, n_tasks;
    float eps;
} rmsnorm_args;

static void rmsnorm_task(void *ctx, int task, int thread)
{
    (void)thread;
    rmsnorm_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->rows, &begin, &end);
    for (int r = begin; r < end; r++) {
        const float *x = a->x + (size_t)r * a->ldx;
        float *y = a->y + (size_t)r * a->ldy;
        /* as HF: x * rsqrt(mean(x^2) + eps), then times the weight */
        float inv = 1.0f / sqrtf(tk_sum_of_squares(x, a->n) / (float)a->n + a->eps);
        for (int i = 0; i < a->n; i++) y[i] = (x[i] * inv) * a->w[i];
    }
}

static void cpu_rmsnorm(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n,
                        float eps)
{
    rmsnorm_args a = {y, x, w, ldy, ldx, rows, n, 0, eps};
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, rmsnorm_task, &a);
}

static void cpu_add_bias(tk_backend *be, float *y, int ldy, const float *b, int rows, int n)
{
    (void)be;
    for (int r = 0; r < rows; r++) {
        float *row = y + (size_t)r * ldy;
        for (int i = 0; i < n; i++) row[i] += b[i];
    }
}

/* ---- RoPE --------------------------------------------------------------------- */

static void cpu_rope(tk_backend *be, float *x, int ldx, int rows, int n_heads, int head_dim, const float *cos,
                     const float *sin)
{
    (void)be;
    int half = head_dim / 2;
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (size_t)r * half, *s = sin + (size_t)r * half;
        for (int h = 0; h < n_heads; h++) {
            float *lo = x + (size_t)r * ldx + (size_t)h * head_dim, *hi = lo + half;
            /* q * cos + rotate_half(q) * sin, rotate_half(q) = [-q_hi, q_lo] */
            for (int i = 0; i < half; i++) {
                float a = lo[i], b = hi[i];
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/* ---- attention ------------------------------------------------------------------ */

enum { ATTN_QUERY_BLOCK = 64 };

typedef struct {
    float *out;
    const float *q, *k, *v;
    const int32_t *seq_start;
    int ldo, ldqkv, n_heads, group, head_dim, n_seqs;
    float scale;
    float *scores;        /* [threads][ATTN_QUERY_BLOCK * max_len] */
    size_t scores_per_thread;
} attention_args;

/* Rows p = 0..rows-1 of S hold query positions q0+p against keys 0..n_keys-1;
 * keys after the query's own position are masked. Softmax in float32. */
static void causal_softmax(float *S, int rows, int n_keys, int q0)
{
    for (int p = 0; p < rows; p++) {
        float *s = S + (size_t)p * n_keys;
        int visible = q0 + p + 1;
        float max = tk_max(s, visible);
        for (int j = 0; j < visible; j++) s[j] = tk_expf(s[j] - max);
        float inv = 1.0f / tk_sum(s, visible);
        for (int j = 0; j < visible; j++) s[j] *= inv;
        for (int j = visible; j < n_keys; j++) s[j] = 0.0f;
    }
}

/* One task is one (sequence, head): query blocks of 64 rows attend to the keys
 * up to their last position only, so the causal half is mostly skipped. */
static void attention_task(void *ctx, int task, int thread)
{
    attention_args *a = ctx;
    int seq = task / a->n_heads, h = task % a->n_heads, g = h / a->group, Dh = a->head_dim;
    int start = a->seq_start[seq], len = a->seq_start[seq + 1] - start;
    float *S = a->scores + (size_t)thread * a->scores_per_thread;
    const float *q = a->q + (size_t)start * a->ldqkv + (size_t)h * Dh;
    const float *k = a->k + (size_t)start * a->ldqkv + (size_t)g * Dh;
    const float *v = a->v + (size_t)start * a->ldqkv + (size_t)g * Dh;
    float *out = a->out + (size_t)start * a->ldo + (size_t)h * Dh;
    for (int q0 = 0; q0 < len; q0 += ATTN_QUERY_BLOCK) {
        int rows = len - q0 < ATTN_QUERY_BLOCK ? len - q0 : ATTN_QUERY_BLOCK;
        int n_keys = q0 + rows;
        /* S[rows, n_keys] = scale * q[q0:q0+rows] k[0:n_keys]^T */
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_keys, Dh, a->scale,
                       q + (size_t)q0 * a->ldqkv, a->ldqkv, k, a->ldqkv, 0.0f, S, n_keys);
        causal_softmax(S, rows, n_keys, q0);
        /* out[q0:q0+rows] = P[rows, n_keys] v[0:n_keys] */
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, Dh, n_keys, 1.0f, S, n_keys, v, a->ldqkv,
                       0.0f, out + (size_t)q0 * a->ldo, a->ldo);
    }
}

static void cpu_attention(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                          int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                          float *work)
{
    int max_len = 0;
    for (int s = 0; s < n_seqs; s++)
        if (seq_start[s + 1] - seq_start[s] > max_len) max_len = seq_start[s + 1] - seq_start[s];
    attention_args a = {out, q, k, v, seq_start, ldo, ldqkv, n_heads, n_heads / n_kv_heads, head_dim, n_seqs,
                        1.0f / sqrtf((float)head_dim), work, (size_t)ATTN_QUERY_BLOCK * (size_t)max_len};
    tk_pool_run(pool_of(be), n_seqs * n_heads, attention_task, &a);
}

/* one score block per pool thread */
static size_t cpu_attention_workspace(tk_backend *be, int max_seq_len)
{
    return (size_t)tk_pool_threads(pool_of(be)) * ATTN_QUERY_BLOCK * (size_t)max_seq_len;
}

/* ---- SwiGLU ----------------------------------------------------------------------- */

typedef struct {
    float *act;
    const float *gate_up;
    int T, F, n_tasks;
} swiglu_args;

static void swiglu_task(void *ctx, int task, int thread)
{
    (void)thread;
    swiglu_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->T, &begin, &end);
    for (int t = begin; t < end; t++) {
        const float *g = a->gate_up + (size_t)t * 2 * a->F, *u = g + a->F;
        float *y = a->act + (size_t)t * a->F;
        for (int i = 0; i < a->F; i++) y[i] = g[i] / (1.0f + tk_expf(-g[i])) * u[i];
    }
}

static void cpu_swiglu(tk_backend *be, float *act, const float *gate_up, int T, int F)
{
    swiglu_args a = {act, gate_up, T, F, 0};
    a.n_tasks = chunks_for(be, T, (long)T * F);
    tk_pool_run(pool_of(be), a.n_tasks, swiglu_task, &a);
}

/* ---- the table ---------------------------------------------------------------------- */

tk_backend *tk_cpu_backend_create(tk_pool *pool)
{
    cpu_backend *be = calloc(1, sizeof *be);
    if (!be) return NULL;
    tk_blas_set_threads(1); /* the pool parallelises the GEMMs (see the top of this file) */
    be->pool = pool;
    be->base = (tk_backend){
        .name = "cpu",
        .matmul_nt = cpu_matmul_nt,
        .embed = cpu_embed,
        .rmsnorm = cpu_rmsnorm,
        .add_bias = cpu_add_bias,
        .rope = cpu_rope,
        .attention = cpu_attention,
        .attention_workspace = cpu_attention_workspace,
        .swiglu = cpu_swiglu,
    };
    return &be->base;
}

void tk_cpu_backend_free(tk_backend *be) { free(be); }
