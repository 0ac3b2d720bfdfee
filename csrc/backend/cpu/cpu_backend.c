/* cpu_backend.c - CPU ops: OpenBLAS for the matmuls, plain loops (written so
 * gcc vectorises them, no -ffast-math) for the rest, split over the pool. The
 * matmuls that read base weights in their stored format are in wmatmul.c
 * (and, for few rows of Q4_0 / Q4_1 / Q8_0, the register kernel of qmatmul.c).
 *
 * Threading: one thread team, the engine's pool. OpenBLAS is kept at one
 * thread and the pool splits each GEMM instead: OpenBLAS's own threads
 * spin-wait after every call and, on a 2-core machine, steal the cores from
 * the pool's element-wise ops (measured: 15% of a 512-token forward spent in
 * blas_thread_server). Attention runs one (sequence, head) per task.
 */
#define _DEFAULT_SOURCE /* mmap flags and madvise */
#include "cpu_backend.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "../../io/quant.h"
#include "blas.h"
#include "optim_ops.h"
#include "tgemm.h"
#include "vec_math.h"
#include "wmatmul.h"

typedef struct {
    tk_backend base;
    tk_pool *pool;
    tk_cpu_panels panels; /* decoded weight panels, one per thread (wmatmul.c) */
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

/* [begin, end) of `n` for one of n_tasks tasks, in multiples of 16 (64-byte aligned starts) */
static void block16_range(int task, int n_tasks, int n, int *begin, int *end)
{
    int blocks = (n + 15) / 16;
    *begin = (int)((long)blocks * task / n_tasks) * 16;
    *end = (int)((long)blocks * (task + 1) / n_tasks) * 16;
    if (*end > n) *end = n;
}

/* Tasks to split a GEMM of `flops` multiply-adds with an output dimension n. */
static int gemm_tasks(tk_backend *be, long flops, int n)
{
    int threads = tk_pool_threads(pool_of(be));
    return flops >= (1L << 18) && n >= 32 * threads ? threads : 1;
}

/* ---- matmuls ------------------------------------------------------------------ */

typedef struct {
    float *y;
    const float *x, *w;
    int ldy, ldx, ldw, T, N, K, n_tasks, split_m;
    float alpha, beta;
    int small_m; /* one row, through small_m_nt */
    tk_cpu_panels *panels; /* matmul_nt: each thread packs w into its own (nt_tgemm) */
} gemm_args;

/* A single row of x (decoding one sequence): each weight row is streamed once
 * from memory and dotted with x. A BLAS sgemm would first copy ("pack") the
 * whole weight matrix for that one token (measured: half of a decode step in
 * sgemm_incopy). From 2 rows on, sgemm's packing pays: at 8 rows it is 4x
 * faster than this loop. */
enum { SMALL_M = 1 };

static void store_dot(const gemm_args *a, float *y, float s)
{
    *y = a->beta == 0.0f ? a->alpha * s : a->alpha * s + a->beta * *y;
}

/* Four weight rows at a time (tk_dot4): the same sums as one at a time. */
static void small_m_nt(const gemm_args *a, int n0, int n1)
{
    const int K = a->K;
    for (int t = 0; t < a->T; t++) {
        const float *xt = a->x + (size_t)t * a->ldx;
        float *yt = a->y + (size_t)t * a->ldy, s[4];
        int n = n0;
        for (; n + 4 <= n1; n += 4) {
            const float *w = a->w + (size_t)n * K;
            tk_dot4(s, w, w + K, w + 2 * K, w + 3 * K, xt, K);
            for (int r = 0; r < 4; r++) store_dot(a, yt + n + r, s[r]);
        }
        for (; n < n1; n++) store_dot(a, yt + n, tk_dot1(a->w + (size_t)n * K, xt, K));
    }
}

/* Columns of w packed per tgemm call (a multiple of TK_TGEMM_NR), and the most of K one call sums: a piece of
 * NT_COLS x NT_MAX_K floats (512 KB) stays in L2 while every row of x sweeps over it. */
enum { NT_COLS = 128, NT_MAX_K = 1024 };

/* K columns per chunk: all of them up to NT_MAX_K, else even chunks (multiples of 16). It depends on K alone,
 * so a row's sums are split the same way whatever T is. */
static int nt_k_chunk(int K)
{
    int chunks = (K + NT_MAX_K - 1) / NT_MAX_K, kc = (K + chunks - 1) / chunks;
    kc = (kc + 15) / 16 * 16;
    return kc < K ? kc : K;
}

/* bp = rows [0, cols) of w (row stride ldw), columns [0, kc), as tgemm's K-major blocks: element (k, j) of
 * block b at bp[(b kc + k) NR + j], rows past cols zero. 16 k at a time, so the block's lines being written
 * stay in L1. */
static void pack_nt(float *restrict bp, const float *restrict w, int ldw, int cols, int kc)
{
    for (int b = 0; b * TK_TGEMM_NR < cols; b++) {
        float *blk = bp + (size_t)b * kc * TK_TGEMM_NR;
        int filled = cols - b * TK_TGEMM_NR < TK_TGEMM_NR ? cols - b * TK_TGEMM_NR : TK_TGEMM_NR;
        for (int k0 = 0; k0 < kc; k0 += 16) {
            int k1 = k0 + 16 < kc ? k0 + 16 : kc;
            for (int j = 0; j < TK_TGEMM_NR; j++) {
                const float *src = w + (size_t)(b * TK_TGEMM_NR + j) * ldw;
                for (int k = k0; k < k1; k++) blk[(size_t)k * TK_TGEMM_NR + j] = j < filled ? src[k] : 0.0f;
            }
        }
    }
}

/* y[:, n0:n1] = alpha x . w[n0:n1]^T + beta y through tgemm, NT_COLS columns of w at a time packed into this
 * thread's panel: each output sums its products in k order (in K chunks that depend on K alone), so a row's
 * result does not depend on which rows share the call. sgemm's do (its small-matrix kernels and blocking
 * depend on the row count: OpenBLAS 0.3.34, SkylakeX kernels, measured): a LoRA projection of a prompt's last
 * rows would not equal the same rows of a whole prompt's prefill. */
static void nt_tgemm(const gemm_args *a, float *panel, int n0, int n1)
{
    int K = a->K, kc_max = nt_k_chunk(K);
    for (int c0 = n0; c0 < n1; c0 += NT_COLS) {
        int cols = n1 - c0 < NT_COLS ? n1 - c0 : NT_COLS;
        for (int k0 = 0; k0 < K; k0 += kc_max) {
            int kc = K - k0 < kc_max ? K - k0 : kc_max;
            pack_nt(panel, a->w + (size_t)c0 * a->ldw + k0, a->ldw, cols, kc);
            tk_tgemm(a->T, cols, kc, a->x + k0, a->ldx, panel, a->y + c0, a->ldy, a->alpha, k0 == 0 ? a->beta : 1.0f);
        }
    }
}

/* y[:, n0:n1] = x . w[n0:n1]^T (w rows are output columns) */
static void nt_columns(const gemm_args *a, int thread, int n0, int n1)
{
    if (a->small_m) small_m_nt(a, n0, n1);
    else if (a->panels) nt_tgemm(a, a->panels->buf[thread], n0, n1);
    else tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a->T, n1 - n0, a->K, a->alpha, a->x, a->ldx,
                        a->w + (size_t)n0 * a->K, a->K, a->beta, a->y + n0, a->ldy);
}

static void nt_task(void *ctx, int task, int thread)
{
    gemm_args *a = ctx;
    int n0, n1;
    block16_range(task, a->n_tasks, a->N, &n0, &n1);
    if (n1 > n0) nt_columns(a, thread, n0, n1);
}

/* `stream`: a decoding step, where one row streams each weight row once (small_m_nt) and a few rows are
 * sgemm's (no packing of w for them); everything else goes through tgemm (nt_tgemm), whose rows come out the
 * same whatever else shares the call. n_tasks: the column blocks a call of its own splits it into. */
static gemm_args nt_args(tk_backend *be, const tk_nt_job *j, int stream)
{
    gemm_args a = {j->y, j->x, j->w, j->ldy, j->ldx, j->K, j->T, j->N, j->K, 1, 0, j->alpha, j->beta,
                   stream && j->T <= SMALL_M, stream ? NULL : &((cpu_backend *)be)->panels};
    a.n_tasks = gemm_tasks(be, (long)j->T * j->N * j->K, j->N);
    if (a.small_m && j->N >= 64) a.n_tasks = tk_pool_threads(pool_of(be)); /* memory-bound: use every core */
    return a;
}

static void matmul_nt(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N,
                      int K, float alpha, float beta, int stream)
{
    tk_nt_job j = {y, x, w, ldy, ldx, T, N, K, alpha, beta};
    gemm_args a = nt_args(be, &j, stream);
    tk_pool_run(pool_of(be), a.n_tasks, nt_task, &a);
}

/* matmul_nt_many: up to MANY_JOBS jobs per pool run; task t is column block t - first[j] of job j. */
enum { MANY_JOBS = 64 };

typedef struct {
    gemm_args job[MANY_JOBS];
    int first[MANY_JOBS + 1];
} many_args;

static void many_task(void *ctx, int task, int thread)
{
    const many_args *m = ctx;
    int lo = 0, hi = MANY_JOBS; /* the job holding `task`: first[lo] <= task < first[hi], until hi = lo + 1 */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (m->first[mid] <= task) lo = mid;
        else hi = mid;
    }
    const gemm_args *a = &m->job[lo];
    int n0, n1;
    block16_range(task - m->first[lo], a->n_tasks, a->N, &n0, &n1);
    if (n1 > n0) nt_columns(a, thread, n0, n1);
}

/* With as many jobs as twice the threads, a job is one task (the pool balances them); fewer are split as a
 * call of their own would be. Each task's columns are computed as in that call, so the rows match it. */
static void cpu_matmul_nt_many(tk_backend *be, const tk_nt_job *jobs, int n_jobs, int decoding)
{
    many_args m;
    int threads = tk_pool_threads(pool_of(be));
    for (int j0 = 0; j0 < n_jobs; j0 += MANY_JOBS) {
        int n = n_jobs - j0 < MANY_JOBS ? n_jobs - j0 : MANY_JOBS;
        m.first[0] = 0;
        for (int j = 0; j < MANY_JOBS; j++) {
            if (j < n) {
                m.job[j] = nt_args(be, &jobs[j0 + j], decoding);
                if (n >= 2 * threads) m.job[j].n_tasks = 1;
            } else
                m.job[j].n_tasks = 0;
            m.first[j + 1] = m.first[j] + m.job[j].n_tasks;
        }
        tk_pool_run(pool_of(be), m.first[MANY_JOBS], many_task, &m);
    }
}

static void cpu_matmul_nt(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T, int N,
                          int K, float alpha, float beta)
{
    matmul_nt(be, y, ldy, x, ldx, w, T, N, K, alpha, beta, 0);
}

static void cpu_matmul_nt_decode(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int T,
                                 int N, int K, float alpha, float beta)
{
    matmul_nt(be, y, ldy, x, ldx, w, T, N, K, alpha, beta, 1);
}


/* y[:, n0:n1] = x . w[:, n0:n1] */
static void nn_task(void *ctx, int task, int thread)
{
    (void)thread;
    gemm_args *a = ctx;
    int n0, n1;
    block16_range(task, a->n_tasks, a->N, &n0, &n1);
    if (n1 <= n0) return;
    tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, a->T, n1 - n0, a->K, a->alpha, a->x, a->ldx,
                   a->w + n0, a->ldw, a->beta, a->y + n0, a->ldy);
}

static void cpu_matmul_nn(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int ldw, int T,
                          int N, int K, float alpha, float beta)
{
    gemm_args a = {y, x, w, ldy, ldx, ldw, T, N, K, 1, 0, alpha, beta, 0, NULL};
    a.n_tasks = gemm_tasks(be, (long)T * N * K, N);
    tk_pool_run(pool_of(be), a.n_tasks, nn_task, &a);
}

/* g[M, N] += alpha a^T b, split along the larger of M and N.
 * Fields: y = g, x = a (lda in ldx), w = b (ldb in ldw), T tokens, N = M rows of g, K = N cols of g. */
static void tn_task(void *ctx, int task, int thread)
{
    (void)thread;
    gemm_args *a = ctx;
    int M = a->N, N = a->K, b0, b1;
    block16_range(task, a->n_tasks, a->split_m ? M : N, &b0, &b1);
    if (b1 <= b0) return;
    if (a->split_m)
        tk_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, b1 - b0, N, a->T, a->alpha, a->x + b0, a->ldx, a->w,
                       a->ldw, 1.0f, a->y + (size_t)b0 * a->ldy, a->ldy);
    else
        tk_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, M, b1 - b0, a->T, a->alpha, a->x, a->ldx, a->w + b0,
                       a->ldw, 1.0f, a->y + b0, a->ldy);
}

static void cpu_matmul_tn_acc(tk_backend *be, float *g, int ldg, const float *a_, int lda, const float *b, int ldb,
                              int T, int M, int N, float alpha)
{
    gemm_args a = {g, a_, b, ldg, lda, ldb, T, M, N, 1, M >= N, alpha, 1.0f, 0, NULL};
    a.n_tasks = gemm_tasks(be, (long)T * M * N, M >= N ? M : N);
    tk_pool_run(pool_of(be), a.n_tasks, tn_task, &a);
}

/* ---- base weights (wmatmul.c) ---------------------------------------------------------- */

static size_t cpu_weight_bytes(tk_backend *be, int type, int rows, int cols)
{
    (void)be;
    return tk_cpu_weight_bytes(type, rows, cols);
}

static void cpu_weight_put_row(tk_backend *be, const tk_weight_part *p, int cols, int row, const void *src)
{
    (void)be;
    tk_cpu_weight_put_row(p, cols, row, src);
}

/* Each part writes its own columns of y; F32 parts are plain sgemm operands. */
static void matmul_w(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                     float alpha, float beta, int decoding)
{
    for (int i = 0; i < w->n_parts; i++) {
        const tk_weight_part *p = &w->part[i];
        if (p->type == TK_GGML_F32)
            matmul_nt(be, y + p->row0, ldy, x, ldx, p->data, T, p->rows, w->cols, alpha, beta, decoding);
        else
            tk_cpu_matmul_part(pool_of(be), &((cpu_backend *)be)->panels, y + p->row0, ldy, x, ldx, p, w->cols, T,
                               alpha, beta, decoding);
    }
}

static void cpu_matmul_w(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                         float alpha, float beta)
{
    matmul_w(be, y, ldy, x, ldx, w, T, alpha, beta, 0);
}

static void cpu_matmul_w_decode(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                                int T, float alpha, float beta)
{
    matmul_w(be, y, ldy, x, ldx, w, T, alpha, beta, 1);
}

/* The parts' row ranges of x are the reduction: the first part applies beta, the others accumulate. */
static void cpu_matmul_w_t(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                           float alpha, float beta)
{
    for (int i = 0; i < w->n_parts; i++) {
        const tk_weight_part *p = &w->part[i];
        float b = i == 0 ? beta : 1.0f;
        if (p->type == TK_GGML_F32)
            cpu_matmul_nn(be, y, ldy, x + p->row0, ldx, p->data, w->cols, T, w->cols, p->rows, alpha, b);
        else
            tk_cpu_matmul_part_t(pool_of(be), &((cpu_backend *)be)->panels, y, ldy, x + p->row0, ldx, p, w->cols, T,
                                 alpha, b);
    }
}

/* ---- an MoE layer's experts: every group in one pool run ----------------------------------------------- */

/* Tasks are (group, block of W's rows) pairs, the groups with most work first (the pool hands tasks out in
 * order, so the big ones do not come last); each task runs the one-thread kernels, over this thread's panel. */
typedef struct {
    float *y;
    const float *x;
    const tk_weight *w;
    const int32_t *start;
    int ldy, ldx, decoding;
    float alpha, beta;
    const int *order;  /* [n]: the non-empty groups, by work, most first */
    const int *first;  /* [n + 1]: order[i]'s tasks are first[i] .. first[i + 1] - 1 */
    int n;
    tk_cpu_panels *panels;
} grouped_args;

static long group_work(const grouped_args *a, int g)
{
    return (long)(a->start[g + 1] - a->start[g]) * a->w[g].rows * a->w[g].cols;
}

/* Whether W's rows may be cut at any multiple of 16 (each tiled part's tiles start on one). */
static int rows_split(const tk_weight *w)
{
    for (int i = 0; i < w->n_parts; i++)
        if (!tk_cpu_part_row_splits(&w->part[i], (16 - w->part[i].row0 % 16) % 16)) return 0;
    return 1;
}

/* The y columns [n0, n1) of group g's rows: each part's share through the one-thread kernels. */
static void grouped_forward_rows(const grouped_args *a, int g, int n0, int n1, int thread)
{
    const tk_weight *w = &a->w[g];
    int T = a->start[g + 1] - a->start[g], K = w->cols;
    const float *x = a->x + (size_t)a->start[g] * a->ldx;
    float *y = a->y + (size_t)a->start[g] * a->ldy;
    tk_cpu_panels one = {&a->panels->buf[thread], a->panels->floats, 1};
    for (int i = 0; i < w->n_parts; i++) {
        const tk_weight_part *p = &w->part[i];
        int end = p->row0 + p->rows;
        int r0 = (n0 > p->row0 ? n0 : p->row0) - p->row0, r1 = (n1 < end ? n1 : end) - p->row0;
        if (r1 <= r0) continue;
        if (p->type != TK_GGML_F32) {
            tk_weight_part v = tk_cpu_part_rows(p, K, r0, r1);
            tk_cpu_matmul_part(NULL, &one, y + v.row0, a->ldy, x, a->ldx, &v, K, T, a->alpha, a->beta, a->decoding);
            continue;
        }
        const float *wp = (const float *)p->data + (size_t)r0 * K;
        float *yp = y + p->row0 + r0;
        gemm_args ga = {yp, x, wp, a->ldy, a->ldx, K, T, r1 - r0, K, 1, 0, a->alpha, a->beta, 1, NULL};
        if (a->decoding && T <= SMALL_M)
            small_m_nt(&ga, 0, r1 - r0);
        else
            tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, r1 - r0, K, a->alpha, x, a->ldx, wp, K,
                           a->beta, yp, a->ldy);
    }
}

/* the i with first[i] <= task < first[i + 1] */
static int task_group(const grouped_args *a, int task)
{
    int lo = 0, hi = a->n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (a->first[mid] <= task) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

static void grouped_forward_task(void *ctx, int task, int thread)
{
    const grouped_args *a = ctx;
    int i = task_group(a, task), g = a->order[i], chunks = a->first[i + 1] - a->first[i], n0, n1;
    block16_range(task - a->first[i], chunks, a->w[g].rows, &n0, &n1);
    if (n1 > n0) grouped_forward_rows(a, g, n0, n1, thread);
}

/* group g's rows of y = alpha x . W_g + beta y, whole (the parts' rows are the sum) */
static void grouped_backward_task(void *ctx, int task, int thread)
{
    const grouped_args *a = ctx;
    int g = a->order[task], T = a->start[g + 1] - a->start[g];
    const tk_weight *w = &a->w[g];
    const float *x = a->x + (size_t)a->start[g] * a->ldx;
    float *y = a->y + (size_t)a->start[g] * a->ldy;
    tk_cpu_panels one = {&a->panels->buf[thread], a->panels->floats, 1};
    for (int i = 0; i < w->n_parts; i++) {
        const tk_weight_part *p = &w->part[i];
        float beta = i == 0 ? a->beta : 1.0f;
        if (p->type == TK_GGML_F32)
            tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, w->cols, p->rows, a->alpha, x + p->row0,
                           a->ldx, p->data, w->cols, beta, y, a->ldy);
        else
            tk_cpu_matmul_part_t(NULL, &one, y, a->ldy, x + p->row0, a->ldx, p, w->cols, T, a->alpha, beta);
    }
}

typedef struct {
    long work;
    int g;
} group_rank;

static int by_work_desc(const void *l, const void *r)
{
    const group_rank *a = l, *b = r;
    return a->work != b->work ? (a->work < b->work ? 1 : -1) : a->g - b->g;
}

/* The non-empty groups by work, most first; returns how many, and their total work. */
static int rank_groups(const grouped_args *a, int n_groups, int *order, long *total)
{
    group_rank ranks[n_groups > 0 ? n_groups : 1];
    int n = 0;
    *total = 0;
    for (int g = 0; g < n_groups; g++)
        if (a->start[g + 1] > a->start[g]) {
            ranks[n] = (group_rank){group_work(a, g), g};
            *total += ranks[n++].work;
        }
    qsort(ranks, (size_t)n, sizeof *ranks, by_work_desc);
    for (int i = 0; i < n; i++) order[i] = ranks[i].g;
    return n;
}

static void cpu_matmul_w_grouped(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                                 const int32_t *start, int n_groups, float alpha, float beta, int decoding)
{
    int order[n_groups > 0 ? n_groups : 1], first[n_groups + 1];
    long total;
    grouped_args a = {y, x, w, start, ldy, ldx, decoding, alpha, beta, order, first, 0, &((cpu_backend *)be)->panels};
    a.n = rank_groups(&a, n_groups, order, &total);
    int threads = tk_pool_threads(pool_of(be));
    /* about 4 tasks a thread, a group's rows cut in blocks of 16 where it has that much of the work */
    long per_task = total / (4L * threads) + 1;
    first[0] = 0;
    for (int i = 0; i < a.n; i++) {
        const tk_weight *wg = &w[order[i]];
        long chunks = threads == 1 || !rows_split(wg) ? 1 : (group_work(&a, order[i]) + per_task - 1) / per_task;
        long most = (wg->rows + 15) / 16;
        first[i + 1] = first[i] + (int)(chunks < 1 ? 1 : chunks > most ? most : chunks);
    }
    tk_pool_run(total >= (1L << 18) ? pool_of(be) : NULL, first[a.n], grouped_forward_task, &a);
}

static void cpu_matmul_w_t_grouped(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                                   const int32_t *start, int n_groups, float alpha, float beta)
{
    int order[n_groups > 0 ? n_groups : 1];
    long total;
    grouped_args a = {y, x, w, start, ldy, ldx, 0, alpha, beta, order, NULL, 0, &((cpu_backend *)be)->panels};
    a.n = rank_groups(&a, n_groups, order, &total);
    int threads = tk_pool_threads(pool_of(be));
    if (a.n < 2 * threads) { /* too few groups to share out whole: each one over the pool */
        for (int i = 0; i < a.n; i++) {
            int g = order[i];
            cpu_matmul_w_t(be, y + (size_t)start[g] * ldy, ldy, x + (size_t)start[g] * ldx, ldx, &w[g],
                           start[g + 1] - start[g], alpha, beta);
        }
        return;
    }
    tk_pool_run(total >= (1L << 18) ? pool_of(be) : NULL, a.n, grouped_backward_task, &a);
}

/* ---- memory: host memory is the device's ---------------------------------------------- */

/* Buffers come zeroed and 64-byte aligned, with a header just below holding how they were made. Small ones
 * from calloc; large ones (activations, scratch, adapter moments) from mmap, 2 MB aligned and advised as
 * transparent huge pages: sgemm streams them, and 4 KB pages cost TLB misses and page faults on every pass.
 * Either way untouched pages cost no memory (a fresh adapter's moments before its first optim_step). */
enum { HUGE_BYTES = 2 << 20 };
typedef struct {
    void *raw;
    size_t mapped; /* 0: calloc */
} alloc_header;

static void *cpu_alloc(tk_backend *be, size_t bytes)
{
    (void)be;
    uint8_t *at = NULL;
    alloc_header h = {NULL, 0};
    if (bytes >= SIZE_MAX / 2) {
        /* no buffer: reported below */
    } else if (bytes >= HUGE_BYTES) {
        size_t mapped = bytes + 2 * (size_t)HUGE_BYTES;
        void *raw = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw != MAP_FAILED) {
            at = (uint8_t *)(((uintptr_t)raw + sizeof h + HUGE_BYTES - 1) & ~(uintptr_t)(HUGE_BYTES - 1));
#ifdef MADV_HUGEPAGE
            madvise(at, (bytes + HUGE_BYTES - 1) & ~(size_t)(HUGE_BYTES - 1), MADV_HUGEPAGE);
#endif
            h = (alloc_header){raw, mapped};
        }
    } else {
        uint8_t *raw = calloc(1, bytes + 64 + sizeof h);
        if (raw) at = (uint8_t *)(((uintptr_t)raw + sizeof h + 63) & ~(uintptr_t)63), h.raw = raw;
    }
    if (!at) {
        tk_error(TK_ERR_NOMEM, "cannot allocate %.1f MB", (double)bytes / 1e6);
        return NULL;
    }
    memcpy(at - sizeof h, &h, sizeof h);
    return at;
}

static void cpu_free(tk_backend *be, void *buffer)
{
    (void)be;
    if (!buffer) return;
    alloc_header h;
    memcpy(&h, (uint8_t *)buffer - sizeof h, sizeof h);
    if (h.mapped)
        munmap(h.raw, h.mapped);
    else
        free(h.raw);
}

static void cpu_copy(tk_backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    if (bytes && dst != src) memcpy(dst, src, bytes);
}

static tk_status cpu_sync(tk_backend *be)
{
    (void)be;
    return TK_OK;
}

/* ---- indexing ---------------------------------------------------------------------- */

static void cpu_gather(tk_backend *be, float *out, const float *x, int ldx, const int32_t *row, const int32_t *col,
                       int n)
{
    (void)be;
    for (int i = 0; i < n; i++) out[i] = x[(size_t)row[i] * ldx + col[i]];
}

static void cpu_scatter_add(tk_backend *be, float *x, int ldx, const int32_t *row, const int32_t *col,
                            const float *val, int n)
{
    (void)be;
    for (int i = 0; i < n; i++) x[(size_t)row[i] * ldx + col[i]] += val[i];
}

/* ---- rows ------------------------------------------------------------------------------ */

/* The row ops of an MoE block (moe.c), split over the pool when there is work enough: by rows, or, for add_rows
 * (whose destinations may repeat), by columns, every task adding all rows to its columns in order. Each output
 * element sees the same operations in the same order whatever the split. */
typedef struct {
    float *const *dst;
    const float *const *src;
    const float *scale, *b;
    float *x, *out;
    const float *a;
    int ldx, lda, ldb, rows, n, n_tasks;
} moe_rows_args;

static void add_rows_task(void *ctx, int task, int thread)
{
    (void)thread;
    const moe_rows_args *a = ctx;
    int c0, c1;
    block16_range(task, a->n_tasks, a->n, &c0, &c1);
    for (int i = 0; i < a->rows; i++) {
        float s = a->scale ? a->scale[i] : 1.0f, *y = a->dst[i];
        const float *x = a->src[i];
        for (int j = c0; j < c1; j++) y[j] += s * x[j];
    }
}

static void cpu_add_rows(tk_backend *be, float *const *dst, const float *const *src, const float *scale, int rows,
                         int n)
{
    moe_rows_args a = {.dst = dst, .src = src, .scale = scale, .rows = rows, .n = n};
    int threads = tk_pool_threads(pool_of(be));
    a.n_tasks = (long)rows * n >= 32768 && n >= 32 * threads ? threads : 1; /* columns in 64-byte blocks */
    tk_pool_run(pool_of(be), a.n_tasks, add_rows_task, &a);
}

static void copy_rows_task(void *ctx, int task, int thread)
{
    (void)thread;
    const moe_rows_args *a = ctx;
    int r0, r1;
    chunk_range(task, a->n_tasks, a->rows, &r0, &r1);
    for (int i = r0; i < r1; i++) memcpy(a->dst[i], a->src[i], (size_t)a->n * sizeof(float));
}

static void cpu_copy_rows(tk_backend *be, float *const *dst, const float *const *src, int rows, int n)
{
    moe_rows_args a = {.dst = dst, .src = src, .rows = rows, .n = n};
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, copy_rows_task, &a);
}

static void scale_rows_task(void *ctx, int task, int thread)
{
    (void)thread;
    const moe_rows_args *a = ctx;
    int r0, r1;
    chunk_range(task, a->n_tasks, a->rows, &r0, &r1);
    for (int r = r0; r < r1; r++)
        for (int j = 0; j < a->n; j++) a->x[(size_t)r * a->ldx + j] *= a->scale[r];
}

static void cpu_scale_rows(tk_backend *be, float *x, int ldx, const float *scale, int rows, int n)
{
    moe_rows_args a = {.x = x, .ldx = ldx, .scale = scale, .rows = rows, .n = n};
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, scale_rows_task, &a);
}

static void row_dot_task(void *ctx, int task, int thread)
{
    (void)thread;
    const moe_rows_args *a = ctx;
    int r0, r1;
    chunk_range(task, a->n_tasks, a->rows, &r0, &r1);
    for (int r = r0; r < r1; r++) {
        double sum = 0;
        for (int j = 0; j < a->n; j++) sum += (double)a->a[(size_t)r * a->lda + j] * a->b[(size_t)r * a->ldb + j];
        a->out[r] = (float)sum;
    }
}

static void cpu_row_dot(tk_backend *be, float *out, const float *a, int lda, const float *b, int ldb, int rows, int n)
{
    moe_rows_args r = {.out = out, .a = a, .lda = lda, .b = b, .ldb = ldb, .rows = rows, .n = n};
    r.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), r.n_tasks, row_dot_task, &r);
}

static void zero_rows_task(void *ctx, int task, int thread)
{
    (void)thread;
    const moe_rows_args *a = ctx;
    int r0, r1;
    chunk_range(task, a->n_tasks, a->rows, &r0, &r1);
    for (int r = r0; r < r1; r++) memset(a->x + (size_t)r * a->ldx, 0, (size_t)a->n * sizeof(float));
}

static void cpu_zero_rows(tk_backend *be, float *x, int ldx, int rows, int n)
{
    if (n <= 0) return;
    moe_rows_args a = {.x = x, .ldx = ldx, .rows = rows, .n = n};
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, zero_rows_task, &a);
}

/* ---- the optimizer (optim_ops.c) ------------------------------------------------------------ */

static double cpu_sum_squares(tk_backend *be, const float *x, size_t n)
{
    return tk_cpu_sum_squares(pool_of(be), x, n);
}

static void cpu_adamw(tk_backend *be, float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f)
{
    tk_cpu_adamw(pool_of(be), p, g, m, v, n, f);
}

static float cpu_adamw_peak(tk_backend *be, const float *p, const float *g, const float *m, const float *v, size_t n,
                            const tk_adamw_factors *f)
{
    return tk_cpu_adamw_peak(pool_of(be), p, g, m, v, n, f);
}

/* ---- embedding, norms, bias ------------------------------------------------------ */

static void cpu_embed(tk_backend *be, float *x, const tk_weight *table, const int32_t *tokens, int T)
{
    (void)be;
    for (int t = 0; t < T; t++) {
        const tk_weight_part *p = &table->part[0];
        for (int i = 1; i < table->n_parts && tokens[t] >= table->part[i].row0; i++) p = &table->part[i];
        tk_cpu_weight_row(x + (size_t)t * table->cols, p, table->cols, tokens[t] - p->row0);
    }
}

typedef struct {
    float *y, *inv_rms;
    const float *x, *w, *dy;
    int ldy, ldx, lddy, rows, n, n_tasks, accumulate;
    float eps;
} rows_args;

static void rmsnorm_task(void *ctx, int task, int thread)
{
    (void)thread;
    rows_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->rows, &begin, &end);
    for (int r = begin; r < end; r++) {
        const float *x = a->x + (size_t)r * a->ldx;
        float *y = a->y + (size_t)r * a->ldy;
        /* as HF: x * rsqrt(mean(x^2) + eps), then times the weight */
        float inv = 1.0f / sqrtf(tk_sum_of_squares(x, a->n) / (float)a->n + a->eps);
        if (a->inv_rms) a->inv_rms[r] = inv;
        for (int i = 0; i < a->n; i++) y[i] = (x[i] * inv) * a->w[i];
    }
}

static void cpu_rmsnorm(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int n,
                        float eps, float *inv_rms)
{
    rows_args a = {y, inv_rms, x, w, NULL, ldy, ldx, 0, rows, n, 0, 0, eps};
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, rmsnorm_task, &a);
}

/* LayerNorm rows: the mean and biased variance of the row in double, the result rounded once per value */
static void layer_norm_task(void *ctx, int task, int thread)
{
    (void)thread;
    rows_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->rows, &begin, &end);
    for (int r = begin; r < end; r++) {
        const float *x = a->x + (size_t)r * a->ldx;
        float *y = a->y + (size_t)r * a->ldy;
        double sum = 0, sq = 0;
        for (int i = 0; i < a->n; i++) sum += x[i];
        double mean = sum / a->n;
        for (int i = 0; i < a->n; i++) sq += (x[i] - mean) * (x[i] - mean);
        double inv = 1.0 / sqrt(sq / a->n + (double)a->eps);
        for (int i = 0; i < a->n; i++) y[i] = (float)((x[i] - mean) * inv * a->w[i] + a->dy[i]);
    }
}

static void cpu_layer_norm(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, const float *b,
                           int rows, int n, float eps)
{
    rows_args a = {y, NULL, x, w, b, ldy, ldx, 0, rows, n, 0, 0, eps}; /* dy: the bias */
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, layer_norm_task, &a);
}

static double gelu_of(double x, int kind)
{
    switch (kind) {
    case TK_GELU_TANH: return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
    case TK_GELU_QUICK: return x / (1.0 + exp(-1.702 * x));
    default: return 0.5 * x * erfc(-x * 0.7071067811865476); /* = x (1 + erf(x / sqrt 2)) / 2, no cancellation */
    }
}

static void gelu_task(void *ctx, int task, int thread)
{
    (void)thread;
    rows_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->rows, &begin, &end);
    for (int r = begin; r < end; r++) {
        const float *x = a->x + (size_t)r * a->ldx;
        float *y = a->y + (size_t)r * a->ldy;
        for (int i = 0; i < a->n; i++) y[i] = (float)gelu_of(x[i], a->accumulate);
    }
}

static void cpu_gelu(tk_backend *be, float *y, int ldy, const float *x, int ldx, int rows, int n, int kind)
{
    rows_args a = {y, NULL, x, NULL, NULL, ldy, ldx, 0, rows, n, 0, kind, 0.0f}; /* accumulate: the kind */
    a.n_tasks = chunks_for(be, rows, 8L * rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, gelu_task, &a);
}

/* y = w x r with r = (mean(x^2) + eps)^-1/2:
 * dx = r (dy w) - x r^3 mean(dy w x) */
static void rmsnorm_backward_task(void *ctx, int task, int thread)
{
    (void)thread;
    rows_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->rows, &begin, &end);
    for (int r = begin; r < end; r++) {
        const float *x = a->x + (size_t)r * a->ldx, *dy = a->dy + (size_t)r * a->lddy;
        float *dx = a->y + (size_t)r * a->ldy, inv = a->inv_rms[r];
        float acc[16] = {0}, dot = 0;
        int i = 0;
        for (; i + 16 <= a->n; i += 16)
            for (int j = 0; j < 16; j++) acc[j] += dy[i + j] * a->w[i + j] * x[i + j];
        for (; i < a->n; i++) dot += dy[i] * a->w[i] * x[i];
        for (int j = 0; j < 16; j++) dot += acc[j];
        float c = inv * inv * inv * dot / (float)a->n;
        if (a->accumulate)
            for (i = 0; i < a->n; i++) dx[i] += inv * dy[i] * a->w[i] - c * x[i];
        else
            for (i = 0; i < a->n; i++) dx[i] = inv * dy[i] * a->w[i] - c * x[i];
    }
}

static void cpu_rmsnorm_backward(tk_backend *be, float *dx, int lddx, const float *dy, int lddy, const float *x,
                                 int ldx, const float *w, const float *inv_rms, int rows, int n, int accumulate)
{
    rows_args a = {dx, (float *)inv_rms, x, w, dy, lddx, ldx, lddy, rows, n, 0, accumulate, 0};
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, rmsnorm_backward_task, &a);
}

static void cpu_add_bias(tk_backend *be, float *y, int ldy, const float *b, int rows, int n)
{
    (void)be;
    for (int r = 0; r < rows; r++) {
        float *row = y + (size_t)r * ldy;
        for (int i = 0; i < n; i++) row[i] += b[i];
    }
}

/* ---- RoPE --------------------------------------------------------------------------- */

static void cpu_rope_table(tk_backend *be, float *cos_t, float *sin_t, const int32_t *pos, int pos_dims, int rows,
                           const float *inv_freq, const int8_t *axis, int half)
{
    (void)be;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < half; i++) {
            float angle = (float)pos[(size_t)r * pos_dims + (axis ? axis[i] : 0)] * inv_freq[i];
            cos_t[(size_t)r * half + i] = cosf(angle);
            sin_t[(size_t)r * half + i] = sinf(angle);
        }
}

static void cpu_rope(tk_backend *be, float *x, int ldx, int rows, int n_heads, int head_dim, const float *cos,
                     const float *sin, int inverse)
{
    (void)be;
    int half = head_dim / 2;
    float sign = inverse ? -1.0f : 1.0f;
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (size_t)r * half, *s = sin + (size_t)r * half;
        for (int h = 0; h < n_heads; h++) {
            float *lo = x + (size_t)r * ldx + (size_t)h * head_dim, *hi = lo + half;
            /* q * cos + rotate_half(q) * sin, rotate_half(q) = [-q_hi, q_lo]; inverse: sin -> -sin */
            for (int i = 0; i < half; i++) {
                float a = lo[i], b = hi[i], sn = sign * s[i];
                lo[i] = a * c[i] - b * sn;
                hi[i] = b * c[i] + a * sn;
            }
        }
    }
}

/* ---- SwiGLU ---------------------------------------------------------------------------- */

typedef struct {
    float *out;
    const float *in, *gate_up;
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
        float *y = a->out + (size_t)t * a->F;
        for (int i = 0; i < a->F; i++) y[i] = g[i] / (1.0f + tk_expf(-g[i])) * u[i];
    }
}

static void cpu_swiglu(tk_backend *be, float *act, const float *gate_up, int T, int F)
{
    swiglu_args a = {act, NULL, gate_up, T, F, 0};
    a.n_tasks = chunks_for(be, T, (long)T * F);
    tk_pool_run(pool_of(be), a.n_tasks, swiglu_task, &a);
}

/* silu(g) = g s, s = sigmoid(g); d silu/dg = s (1 + g (1 - s)) */
static void swiglu_backward_task(void *ctx, int task, int thread)
{
    (void)thread;
    swiglu_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->T, &begin, &end);
    for (int t = begin; t < end; t++) {
        const float *g = a->gate_up + (size_t)t * 2 * a->F, *u = g + a->F, *da = a->in + (size_t)t * a->F;
        float *dg = a->out + (size_t)t * 2 * a->F, *du = dg + a->F;
        for (int i = 0; i < a->F; i++) {
            float s = 1.0f / (1.0f + tk_expf(-g[i]));
            dg[i] = da[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
            du[i] = da[i] * g[i] * s;
        }
    }
}

static void cpu_swiglu_backward(tk_backend *be, float *dgate_up, const float *dact, const float *gate_up, int T,
                                int F)
{
    swiglu_args a = {dgate_up, dact, gate_up, T, F, 0};
    a.n_tasks = chunks_for(be, T, (long)T * F);
    tk_pool_run(pool_of(be), a.n_tasks, swiglu_backward_task, &a);
}

/* ---- softmax over the vocabulary ------------------------------------------------------- */

typedef struct {
    float *x, *lse;
    const float *g;
    int ldx, rows, n, n_tasks;
} softmax_args;

static float row_logsumexp(const float *x, int n)
{
    float max = tk_max(x, n);
    float acc[16] = {0}, sum = 0;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += tk_expf(x[i + j] - max);
    for (; i < n; i++) sum += tk_expf(x[i] - max);
    for (int j = 0; j < 16; j++) sum += acc[j];
    return max + logf(sum);
}

static void logsumexp_task(void *ctx, int task, int thread)
{
    (void)thread;
    softmax_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->rows, &begin, &end);
    for (int r = begin; r < end; r++) a->lse[r] = row_logsumexp(a->x + (size_t)r * a->ldx, a->n);
}

static void cpu_logsumexp(tk_backend *be, float *lse, const float *x, int ldx, int rows, int n)
{
    softmax_args a = {(float *)x, lse, NULL, ldx, rows, n, 0};
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, logsumexp_task, &a);
}

static void softmax_scale_task(void *ctx, int task, int thread)
{
    (void)thread;
    softmax_args *a = ctx;
    int begin, end;
    chunk_range(task, a->n_tasks, a->rows, &begin, &end);
    for (int r = begin; r < end; r++) {
        float *x = a->x + (size_t)r * a->ldx, lse = a->lse[r], g = -a->g[r];
        for (int i = 0; i < a->n; i++) x[i] = g * tk_expf(x[i] - lse);
    }
}

static void cpu_softmax_scale(tk_backend *be, float *x, int ldx, const float *lse, const float *g, int rows, int n)
{
    softmax_args a = {x, (float *)lse, g, ldx, rows, n, 0};
    a.n_tasks = chunks_for(be, rows, (long)rows * n);
    tk_pool_run(pool_of(be), a.n_tasks, softmax_scale_task, &a);
}

/* ---- attention ------------------------------------------------------------------------ */

enum { ATTN_QUERY_BLOCK = 64 };

typedef struct {
    float *out, *lse, *dq, *dk_heads, *dv_heads, *drow;
    const float *q, *k, *v, *o, *dout;
    const int32_t *seq_start;
    int ldo, ldqkv, n_heads, group, head_dim, n_seqs;
    int bidirectional;    /* attention_full: every row sees its whole sequence */
    float scale;
    float *scratch;       /* [threads][2][ATTN_QUERY_BLOCK * max_len] */
    size_t scratch_per_thread;
} attention_args;

static int max_len_of(const int32_t *seq_start, int n_seqs)
{
    int max = 0;
    for (int s = 0; s < n_seqs; s++)
        if (seq_start[s + 1] - seq_start[s] > max) max = seq_start[s + 1] - seq_start[s];
    return max;
}

/* Rows p of S hold query positions q0+p against keys 0..n_keys-1; keys after
 * the query's own position are masked. Softmax in float32; lse (optional,
 * stride lse_ld) keeps each row's log-sum-exp. */
/* Softmax of each score row over its visible keys: up to its own position when causal, else all n_keys. */
static void block_softmax(float *S, int rows, int n_keys, int q0, int causal, float *lse, int lse_ld)
{
    for (int p = 0; p < rows; p++) {
        float *s = S + (size_t)p * n_keys;
        int visible = causal ? q0 + p + 1 : n_keys;
        float max = tk_max(s, visible);
        for (int j = 0; j < visible; j++) s[j] = tk_expf(s[j] - max);
        float sum = tk_sum(s, visible), inv = 1.0f / sum;
        for (int j = 0; j < visible; j++) s[j] *= inv;
        for (int j = visible; j < n_keys; j++) s[j] = 0.0f;
        if (lse) lse[(size_t)p * lse_ld] = max + logf(sum);
    }
}

/* One task is one (sequence, head): query blocks of 64 rows attend to the keys
 * up to their last position only, so the causal half is mostly skipped. */
static void attention_task(void *ctx, int task, int thread)
{
    attention_args *a = ctx;
    int seq = task / a->n_heads, h = task % a->n_heads, g = h / a->group, Dh = a->head_dim;
    int start = a->seq_start[seq], len = a->seq_start[seq + 1] - start;
    float *S = a->scratch + (size_t)thread * a->scratch_per_thread;
    const float *q = a->q + (size_t)start * a->ldqkv + (size_t)h * Dh;
    const float *k = a->k + (size_t)start * a->ldqkv + (size_t)g * Dh;
    const float *v = a->v + (size_t)start * a->ldqkv + (size_t)g * Dh;
    float *out = a->out + (size_t)start * a->ldo + (size_t)h * Dh;
    float *lse = a->lse ? a->lse + (size_t)start * a->n_heads + h : NULL;
    for (int q0 = 0; q0 < len; q0 += ATTN_QUERY_BLOCK) {
        int rows = len - q0 < ATTN_QUERY_BLOCK ? len - q0 : ATTN_QUERY_BLOCK;
        int n_keys = a->bidirectional ? len : q0 + rows;
        /* S[rows, n_keys] = scale * q[q0:q0+rows] k[0:n_keys]^T */
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_keys, Dh, a->scale,
                       q + (size_t)q0 * a->ldqkv, a->ldqkv, k, a->ldqkv, 0.0f, S, n_keys);
        block_softmax(S, rows, n_keys, q0, !a->bidirectional, lse ? lse + (size_t)q0 * a->n_heads : NULL,
                      a->n_heads);
        /* out[q0:q0+rows] = P[rows, n_keys] v[0:n_keys] */
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, Dh, n_keys, 1.0f, S, n_keys, v, a->ldqkv,
                       0.0f, out + (size_t)q0 * a->ldo, a->ldo);
    }
}

static void cpu_attention(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                          int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                          float *lse, float *work)
{
    int max_len = max_len_of(seq_start, n_seqs);
    attention_args a = {0};
    a.out = out;
    a.lse = lse;
    a.q = q, a.k = k, a.v = v;
    a.seq_start = seq_start;
    a.ldo = ldo, a.ldqkv = ldqkv, a.n_heads = n_heads, a.group = n_heads / n_kv_heads, a.head_dim = head_dim;
    a.n_seqs = n_seqs;
    a.scale = 1.0f / sqrtf((float)head_dim);
    a.scratch = work;
    a.scratch_per_thread = (size_t)ATTN_QUERY_BLOCK * (size_t)max_len;
    tk_pool_run(pool_of(be), n_seqs * n_heads, attention_task, &a);
}

static void cpu_attention_full(tk_backend *be, float *out, int ldo, const float *q, const float *k, const float *v,
                               int ldqkv, const int32_t *seq_start, int n_seqs, int n_heads, int head_dim, float *work)
{
    attention_args a = {0};
    a.out = out;
    a.q = q, a.k = k, a.v = v;
    a.seq_start = seq_start;
    a.ldo = ldo, a.ldqkv = ldqkv, a.n_heads = n_heads, a.group = 1, a.head_dim = head_dim;
    a.n_seqs = n_seqs;
    a.scale = 1.0f / sqrtf((float)head_dim);
    a.scratch = work;
    a.scratch_per_thread = (size_t)ATTN_QUERY_BLOCK * (size_t)max_len_of(seq_start, n_seqs);
    a.bidirectional = 1;
    tk_pool_run(pool_of(be), n_seqs * n_heads, attention_task, &a);
}

/* one score block per pool thread */
static size_t cpu_attention_workspace(tk_backend *be, int n_tokens, int max_seq_len, int n_heads, int head_dim)
{
    (void)n_tokens, (void)n_heads, (void)head_dim;
    return (size_t)tk_pool_threads(pool_of(be)) * ATTN_QUERY_BLOCK * (size_t)max_seq_len;
}

/* FlashAttention-2 style backward for one (sequence, head): P is recomputed
 * from q, k and the stored lse; with D = rowsum(dO . O):
 *   dS = P (dO v^T - D),  dq = scale dS k,  dk += scale dS^T q,  dv += P^T dO.
 * dk and dv go to per-head buffers (heads of a kv group would race), summed
 * over each group afterwards. */
static void attention_backward_task(void *ctx, int task, int thread)
{
    attention_args *a = ctx;
    int seq = task / a->n_heads, h = task % a->n_heads, g = h / a->group, Dh = a->head_dim, H = a->n_heads;
    int start = a->seq_start[seq], len = a->seq_start[seq + 1] - start;
    float *P = a->scratch + (size_t)thread * a->scratch_per_thread, *dP = P + a->scratch_per_thread / 2;
    const float *q = a->q + (size_t)start * a->ldqkv + (size_t)h * Dh;
    const float *k = a->k + (size_t)start * a->ldqkv + (size_t)g * Dh;
    const float *v = a->v + (size_t)start * a->ldqkv + (size_t)g * Dh;
    const float *o = a->o + (size_t)start * a->ldo + (size_t)h * Dh;
    const float *dout = a->dout + (size_t)start * a->ldo + (size_t)h * Dh;
    const float *lse = a->lse + (size_t)start * H + h;
    float *dq = a->dq + (size_t)start * a->ldqkv + (size_t)h * Dh;
    float *dk = a->dk_heads + (size_t)start * H * Dh + (size_t)h * Dh;
    float *dv = a->dv_heads + (size_t)start * H * Dh + (size_t)h * Dh;
    float *drow = a->drow + (size_t)start * H + h;
    for (int i = 0; i < len; i++) {
        const float *oi = o + (size_t)i * a->ldo, *di = dout + (size_t)i * a->ldo;
        float s = 0;
        for (int d = 0; d < Dh; d++) s += oi[d] * di[d];
        drow[(size_t)i * H] = s;
        memset(dk + (size_t)i * H * Dh, 0, (size_t)Dh * sizeof(float));
        memset(dv + (size_t)i * H * Dh, 0, (size_t)Dh * sizeof(float));
    }
    for (int q0 = 0; q0 < len; q0 += ATTN_QUERY_BLOCK) {
        int rows = len - q0 < ATTN_QUERY_BLOCK ? len - q0 : ATTN_QUERY_BLOCK;
        int n_keys = q0 + rows;
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_keys, Dh, a->scale,
                       q + (size_t)q0 * a->ldqkv, a->ldqkv, k, a->ldqkv, 0.0f, P, n_keys);
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_keys, Dh, 1.0f,
                       dout + (size_t)q0 * a->ldo, a->ldo, v, a->ldqkv, 0.0f, dP, n_keys);
        for (int p = 0; p < rows; p++) {
            float *pr = P + (size_t)p * n_keys, *dpr = dP + (size_t)p * n_keys;
            float l = lse[(size_t)(q0 + p) * H], d = drow[(size_t)(q0 + p) * H];
            int visible = q0 + p + 1;
            for (int j = 0; j < visible; j++) {
                pr[j] = tk_expf(pr[j] - l);
                dpr[j] = pr[j] * (dpr[j] - d);
            }
            for (int j = visible; j < n_keys; j++) pr[j] = dpr[j] = 0.0f;
        }
        /* dq[q0:] = scale dS k;  dk[0:n_keys] += scale dS^T q[q0:];  dv[0:n_keys] += P^T dout[q0:] */
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, Dh, n_keys, a->scale, dP, n_keys, k,
                       a->ldqkv, 0.0f, dq + (size_t)q0 * a->ldqkv, a->ldqkv);
        tk_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n_keys, Dh, rows, a->scale, dP, n_keys,
                       q + (size_t)q0 * a->ldqkv, a->ldqkv, 1.0f, dk, H * Dh);
        tk_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n_keys, Dh, rows, 1.0f, P, n_keys,
                       dout + (size_t)q0 * a->ldo, a->ldo, 1.0f, dv, H * Dh);
    }
}

typedef struct {
    float *dk, *dv;
    const float *dk_heads, *dv_heads;
    int ldqkv, T, n_heads, group, head_dim, n_tasks;
} group_sum_args;

/* dk[t, g] = sum of dk_heads[t, h] over the heads h of group g (and dv) */
static void group_sum_task(void *ctx, int task, int thread)
{
    (void)thread;
    group_sum_args *a = ctx;
    int begin, end, Dh = a->head_dim, Hkv = a->n_heads / a->group;
    chunk_range(task, a->n_tasks, a->T, &begin, &end);
    for (int t = begin; t < end; t++)
        for (int g = 0; g < Hkv; g++) {
            float *dk = a->dk + (size_t)t * a->ldqkv + (size_t)g * Dh, *dv = a->dv + (size_t)t * a->ldqkv + (size_t)g * Dh;
            const float *sk = a->dk_heads + ((size_t)t * a->n_heads + (size_t)g * a->group) * Dh;
            const float *sv = a->dv_heads + ((size_t)t * a->n_heads + (size_t)g * a->group) * Dh;
            for (int d = 0; d < Dh; d++) dk[d] = sk[d], dv[d] = sv[d];
            for (int j = 1; j < a->group; j++)
                for (int d = 0; d < Dh; d++) dk[d] += sk[(size_t)j * Dh + d], dv[d] += sv[(size_t)j * Dh + d];
        }
}

static void cpu_attention_backward(tk_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                   const float *out, int ldo, const float *q, const float *k, const float *v,
                                   int ldqkv, const float *lse, const int32_t *seq_start, int n_seqs, int n_heads,
                                   int n_kv_heads, int head_dim, float *work)
{
    int max_len = max_len_of(seq_start, n_seqs), T = seq_start[n_seqs];
    size_t per_head = (size_t)T * n_heads * head_dim;
    attention_args a = {0};
    a.dq = dq;
    a.dk_heads = work;
    a.dv_heads = work + per_head;
    a.drow = work + 2 * per_head;
    a.scratch = work + 2 * per_head + (size_t)T * n_heads;
    a.scratch_per_thread = 2 * (size_t)ATTN_QUERY_BLOCK * (size_t)max_len;
    a.q = q, a.k = k, a.v = v, a.o = out, a.dout = dout, a.lse = (float *)lse;
    a.seq_start = seq_start;
    a.ldo = ldo, a.ldqkv = ldqkv, a.n_heads = n_heads, a.group = n_heads / n_kv_heads, a.head_dim = head_dim;
    a.n_seqs = n_seqs;
    a.scale = 1.0f / sqrtf((float)head_dim);
    tk_pool_run(pool_of(be), n_seqs * n_heads, attention_backward_task, &a);
    group_sum_args s = {dk, dv, a.dk_heads, a.dv_heads, ldqkv, T, n_heads, a.group, head_dim, 0};
    s.n_tasks = chunks_for(be, T, (long)T * n_heads * head_dim);
    tk_pool_run(pool_of(be), s.n_tasks, group_sum_task, &s);
}

static size_t cpu_attention_backward_workspace(tk_backend *be, int n_tokens, int max_seq_len, int n_heads,
                                               int head_dim)
{
    size_t per_head = (size_t)n_tokens * n_heads * head_dim;
    return 2 * per_head + (size_t)n_tokens * n_heads +
           (size_t)tk_pool_threads(pool_of(be)) * 2 * ATTN_QUERY_BLOCK * (size_t)max_seq_len;
}

/* ---- attention while decoding ---------------------------------------------------------------- */

/* Query heads that share a kv head are done together, up to this many at a time: each key and
 * value row is loaded once for all of them (grouped-query attention's whole point). */
enum { DECODE_HEADS = 8 };

typedef struct {
    float *out, *scratch;
    const float *q;
    const tk_kv_view *views;
    int ldo, ldq, n_heads, group, head_dim, ld_kv, max_keys;
    int heads_per_task, chunks_per_group; /* a kv head's query heads, split into tasks */
    float scale;
} decode_args;

/* The cache rows a decoding step reads were evicted by the weights streamed since the last step (~100 MB
 * against a 32 MB L3), and each is a short piece (one head: Dh floats) of a longer row, at a stride the
 * hardware prefetcher does not follow: without prefetching, the loops below waited on memory at every
 * key. PREFETCH_KEYS rows ahead covers about a DRAM latency. */
enum { PREFETCH_KEYS = 16 };

static inline void prefetch_row(const float *row, int n)
{
    for (int i = 0; i < n; i += 16) __builtin_prefetch(row + i);
}

/* scale * q . k_j for one head and one key: 16 partial sums over the 16-element chunks of Dh, then added in
 * lane order (tk_sum), plus the products past the last whole chunk. The SIMD path below does exactly these
 * operations in this order for 8 keys at a time, so a score does not depend on which path computed it. */
static float score_one(const float *qh, const float *kj, int Dh, float scale)
{
    float acc[16] = {0}, tail = 0;
    int d = 0;
    for (; d + 16 <= Dh; d += 16)
        for (int l = 0; l < 16; l++) acc[l] += qh[d + l] * kj[d + l];
    for (; d < Dh; d++) tail += qh[d] * kj[d];
    return scale * (tail + tk_sum(acc, 16));
}

#if defined(__AVX2__)
#include <immintrin.h>

/* r[i] = lane i of the 8 rows: an 8 x 8 transpose */
static inline void transpose8(__m256 r[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* score_one for keys k, k + ld_kv, ..., 7 ld_kv, into s[0..8): each key's 16 lane sums as two vectors (lanes
 * 0-7, 8-15), transposed so that adding them in lane order is 16 vector adds for all 8 keys at once. A key
 * at a time, that sequential sum was the loop's critical path. */
static void score8(float *s, const float *qh, const float *k, int ld_kv, int Dh, float scale)
{
    const int whole = Dh - Dh % 16;
    __m256 sum = _mm256_setzero_ps();
    for (int half = 0; half < 2; half++) {
        __m256 acc[8];
        for (int key = 0; key < 8; key++) acc[key] = _mm256_setzero_ps();
        for (int d = 8 * half; d < whole; d += 16) {
            const __m256 qv = _mm256_loadu_ps(qh + d);
            for (int key = 0; key < 8; key++)
                acc[key] = _mm256_add_ps(acc[key], _mm256_mul_ps(qv, _mm256_loadu_ps(k + (size_t)key * ld_kv + d)));
        }
        transpose8(acc);
        for (int l = 0; l < 8; l++) sum = _mm256_add_ps(sum, acc[l]);
    }
    float tail[8] = {0};
    for (int d = whole; d < Dh; d++)
        for (int key = 0; key < 8; key++) tail[key] += qh[d] * k[(size_t)key * ld_kv + d];
    _mm256_storeu_ps(s, _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_add_ps(_mm256_loadu_ps(tail), sum)));
}
#endif

/* s[h][j] = scale * q[h] . k_j for the G heads of one task (q rows Dh apart) */
static void decode_scores(float *s, int ld_s, const float *q, int G, const float *k, int n_keys, int ld_kv, int Dh,
                          float scale)
{
    for (int j = 0; j < PREFETCH_KEYS && j < n_keys; j++) prefetch_row(k + (size_t)j * ld_kv, Dh);
    int j = 0;
#if defined(__AVX2__)
    for (; j + 8 <= n_keys; j += 8) {
        const float *kj = k + (size_t)j * ld_kv;
        for (int i = PREFETCH_KEYS; i < PREFETCH_KEYS + 8 && j + i < n_keys; i++) prefetch_row(kj + (size_t)i * ld_kv, Dh);
        for (int h = 0; h < G; h++) score8(s + (size_t)h * ld_s + j, q + (size_t)h * Dh, kj, ld_kv, Dh, scale);
    }
#endif
    for (; j < n_keys; j++)
        for (int h = 0; h < G; h++)
            s[(size_t)h * ld_s + j] = score_one(q + (size_t)h * Dh, k + (size_t)j * ld_kv, Dh, scale);
}

/* out[h] += sum_j p[h][j] v_j for the G heads of one task (out rows Dh apart): per element, products added
 * in key order. Up to 64 elements of a head's output stay in registers over all the keys (as a loop over
 * keys outside, each key's update was a load and a store of out, and the next key waited on that store). */
static void decode_values(float *out, const float *p, int ld_p, int G, const float *v, int n_keys, int ld_kv, int Dh)
{
    for (int j = 0; j < PREFETCH_KEYS && j < n_keys; j++) prefetch_row(v + (size_t)j * ld_kv, Dh);
    for (int h = 0; h < G; h++) {
        const float *ph = p + (size_t)h * ld_p;
        float *o = out + (size_t)h * Dh;
        int d0 = 0;
        for (; d0 + 64 <= Dh; d0 += 64) {
            float acc[64];
            memcpy(acc, o + d0, sizeof acc);
            for (int j = 0; j < n_keys; j++) {
                const float *vj = v + (size_t)j * ld_kv + d0;
                if (h == 0 && d0 == 0 && j + PREFETCH_KEYS < n_keys) prefetch_row(vj + (size_t)PREFETCH_KEYS * ld_kv, Dh);
                const float w = ph[j];
                for (int d = 0; d < 64; d++) acc[d] += w * vj[d];
            }
            memcpy(o + d0, acc, sizeof acc);
        }
        for (int j = 0; j < n_keys; j++) {
            const float *vj = v + (size_t)j * ld_kv;
            const float w = ph[j];
            for (int d = d0; d < Dh; d++) o[d] += w * vj[d];
        }
    }
}

/* One task is one (sequence, slice of a kv head's query heads): scores over both spans (the shared
 * prompt, then the sequence's own tokens), softmax per head, weighted sum of values. */
static void decode_task(void *ctx, int task, int thread)
{
    decode_args *a = ctx;
    int per_seq = (a->n_heads / a->group) * a->chunks_per_group;
    int i = task / per_seq, g = (task % per_seq) / a->chunks_per_group, c = task % a->chunks_per_group;
    int h0 = g * a->group + c * a->heads_per_task, G = a->group - c * a->heads_per_task, Dh = a->head_dim;
    if (G > a->heads_per_task) G = a->heads_per_task;
    const tk_kv_view *kv = &a->views[i];
    const float *q = a->q + (size_t)i * a->ldq + (size_t)h0 * Dh;
    float *out = a->out + (size_t)i * a->ldo + (size_t)h0 * Dh;
    int n = kv->n0 + kv->n1, ld_s = a->max_keys;
    float *s = a->scratch + (size_t)thread * DECODE_HEADS * ld_s; /* [G, n] */
    size_t col = (size_t)g * Dh;
    if (kv->n0) decode_scores(s, ld_s, q, G, kv->k0 + col, kv->n0, a->ld_kv, Dh, a->scale);
    decode_scores(s + kv->n0, ld_s, q, G, kv->k1 + col, kv->n1, a->ld_kv, Dh, a->scale);
    for (int h = 0; h < G; h++) {
        float *sh = s + (size_t)h * ld_s;
        float max = tk_max(sh, n);
        for (int j = 0; j < n; j++) sh[j] = tk_expf(sh[j] - max);
        float inv = 1.0f / tk_sum(sh, n);
        for (int j = 0; j < n; j++) sh[j] *= inv;
        for (int d = 0; d < Dh; d++) out[(size_t)h * Dh + d] = 0;
    }
    if (kv->n0) decode_values(out, s, ld_s, G, kv->v0 + col, kv->n0, a->ld_kv, Dh);
    decode_values(out, s + kv->n0, ld_s, G, kv->v1 + col, kv->n1, a->ld_kv, Dh);
}

static void cpu_attention_decode(tk_backend *be, float *out, int ldo, const float *q, int ldq, const tk_kv_view *views,
                                 int n, int n_heads, int n_kv_heads, int head_dim, int ld_kv, float *work)
{
    int max_keys = 1;
    for (int i = 0; i < n; i++)
        if (views[i].n0 + views[i].n1 > max_keys) max_keys = views[i].n0 + views[i].n1;
    int group = n_heads / n_kv_heads, per_task = group < DECODE_HEADS ? group : DECODE_HEADS;
    /* few sequences (batch 1: one task per kv head): smaller tasks, so every thread gets a share */
    while (per_task > 1 && (long)n * n_kv_heads * ((group + per_task - 1) / per_task) < 4L * tk_pool_threads(pool_of(be)))
        per_task = (per_task + 1) / 2;
    int chunks = (group + per_task - 1) / per_task;
    decode_args a = {out, work, q, views, ldo, ldq, n_heads, group, head_dim, ld_kv, max_keys, per_task, chunks,
                     1.0f / sqrtf((float)head_dim)};
    tk_pool_run(pool_of(be), n * n_kv_heads * chunks, decode_task, &a);
}

static size_t cpu_attention_decode_workspace(tk_backend *be, int max_keys)
{
    return (size_t)tk_pool_threads(pool_of(be)) * DECODE_HEADS * (size_t)(max_keys > 0 ? max_keys : 1);
}

/* ---- attention resumed over cached rows ------------------------------------------------------------ */

typedef struct {
    float *out, *scratch;
    const float *q;
    const tk_kv_view *views;
    const int32_t *seq_start;
    int ldo, ldq, n_heads, group, head_dim, ld_kv;
    float scale;
    size_t scratch_per_thread; /* scores [ATTN_QUERY_BLOCK, max_keys], then a padded query and output block
                                * [ATTN_QUERY_BLOCK, Dh] each */
} cached_args;

/* One task is one (sequence, head), as attention_task, over the blocks of ATTN_QUERY_BLOCK positions counted
 * from position 0 that hold new rows: S = scale q k^T over the keys up to the block's last position, the causal
 * softmax, P v - the sgemm calls attention makes for these rows in a prefill of the whole sequence, with the
 * same shapes and operands, so the same results. The block the new rows start in gets zero queries for its
 * cached positions (in a padded copy), whose outputs are dropped. */
static void cached_task(void *ctx, int task, int thread)
{
    cached_args *a = ctx;
    int seq = task / a->n_heads, h = task % a->n_heads, g = h / a->group, Dh = a->head_dim;
    int start = a->seq_start[seq], len = a->seq_start[seq + 1] - start;
    const tk_kv_view *kv = &a->views[seq];
    int total = kv->n1, past = total - len;
    float *S = a->scratch + (size_t)thread * a->scratch_per_thread;
    float *qpad = S + (size_t)ATTN_QUERY_BLOCK * (size_t)total, *opad = qpad + (size_t)ATTN_QUERY_BLOCK * Dh;
    const float *k = kv->k1 + (size_t)g * Dh, *v = kv->v1 + (size_t)g * Dh;
    /* position p >= past is new row p - past */
    const float *q = a->q + (size_t)start * a->ldq + (size_t)h * Dh;
    float *out = a->out + (size_t)start * a->ldo + (size_t)h * Dh;
    for (int b0 = past / ATTN_QUERY_BLOCK * ATTN_QUERY_BLOCK; b0 < total; b0 += ATTN_QUERY_BLOCK) {
        int rows = total - b0 < ATTN_QUERY_BLOCK ? total - b0 : ATTN_QUERY_BLOCK, n_keys = b0 + rows;
        int skip = past > b0 ? past - b0 : 0; /* cached positions at the block's start */
        const float *qb = qpad;
        float *ob = opad;
        int ldq = Dh, ldo = Dh;
        if (skip) {
            memset(qpad, 0, (size_t)skip * Dh * sizeof(float));
            for (int r = skip; r < rows; r++)
                memcpy(qpad + (size_t)r * Dh, q + (size_t)(b0 + r - past) * a->ldq, (size_t)Dh * sizeof(float));
        } else {
            qb = q + (size_t)(b0 - past) * a->ldq, ob = out + (size_t)(b0 - past) * a->ldo;
            ldq = a->ldq, ldo = a->ldo;
        }
        /* S[rows, n_keys] = scale * q[b0:b0+rows] k[0:n_keys]^T */
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_keys, Dh, a->scale, qb, ldq, k, a->ld_kv,
                       0.0f, S, n_keys);
        block_softmax(S, rows, n_keys, b0, 1, NULL, 0);
        /* out[b0:b0+rows] = P[rows, n_keys] v[0:n_keys] */
        tk_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, Dh, n_keys, 1.0f, S, n_keys, v, a->ld_kv,
                       0.0f, ob, ldo);
        for (int r = skip; skip && r < rows; r++)
            memcpy(out + (size_t)(b0 + r - past) * a->ldo, opad + (size_t)r * Dh, (size_t)Dh * sizeof(float));
    }
}

static void cpu_attention_cached(tk_backend *be, float *out, int ldo, const float *q, int ldq, const tk_kv_view *views,
                                 const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim,
                                 int ld_kv, float *work)
{
    int max_keys = 1;
    for (int i = 0; i < n_seqs; i++)
        if (views[i].n1 > max_keys) max_keys = views[i].n1;
    cached_args a = {out, work, q, views, seq_start, ldo, ldq, n_heads, n_heads / n_kv_heads, head_dim, ld_kv,
                     1.0f / sqrtf((float)head_dim),
                     (size_t)ATTN_QUERY_BLOCK * ((size_t)max_keys + 2 * (size_t)head_dim)};
    tk_pool_run(pool_of(be), n_seqs * n_heads, cached_task, &a);
}

/* per pool thread: a score block and a padded query and output block */
static size_t cpu_attention_cached_workspace(tk_backend *be, int max_keys, int head_dim)
{
    return (size_t)tk_pool_threads(pool_of(be)) * ATTN_QUERY_BLOCK * ((size_t)max_keys + 2 * (size_t)head_dim);
}

/* ---- the table ---------------------------------------------------------------------------- */

tk_backend *tk_cpu_backend_create(tk_pool *pool)
{
    cpu_backend *be = calloc(1, sizeof *be);
    if (!be) return NULL;
    tk_blas_set_threads(1); /* the pool parallelises the GEMMs (see the top of this file) */
    be->pool = pool;
    if (!tk_cpu_panels_init(&be->panels, tk_pool_threads(pool))) {
        tk_cpu_panels_free(&be->panels);
        free(be);
        return NULL;
    }
    be->base = (tk_backend){
        .name = "cpu",
        .host_memory = 1,
        .weight_rounding = 0, /* weights decode exactly, products in float32 */
        .destroy = tk_cpu_backend_free,
        .weight_bytes = cpu_weight_bytes,
        .weight_put_row = cpu_weight_put_row,
        .matmul_w = cpu_matmul_w,
        .matmul_w_decode = cpu_matmul_w_decode,
        .matmul_w_t = cpu_matmul_w_t,
        .matmul_w_grouped = cpu_matmul_w_grouped,
        .matmul_w_t_grouped = cpu_matmul_w_t_grouped,
        .matmul_nt = cpu_matmul_nt,
        .matmul_nt_decode = cpu_matmul_nt_decode,
        .matmul_nt_many = cpu_matmul_nt_many,
        .matmul_nn = cpu_matmul_nn,
        .matmul_tn_acc = cpu_matmul_tn_acc,
        .alloc = cpu_alloc,
        .free = cpu_free,
        .upload = cpu_copy,
        .download = cpu_copy,
        .copy_rows = cpu_copy_rows,
        .sync = cpu_sync,
        .add_rows = cpu_add_rows,
        .scale_rows = cpu_scale_rows,
        .row_dot = cpu_row_dot,
        .zero_rows = cpu_zero_rows,
        .gather = cpu_gather,
        .scatter_add = cpu_scatter_add,
        .sum_squares = cpu_sum_squares,
        .adamw = cpu_adamw,
        .adamw_peak = cpu_adamw_peak,
        .rope_table = cpu_rope_table,
        .embed = cpu_embed,
        .rmsnorm = cpu_rmsnorm,
        .rmsnorm_backward = cpu_rmsnorm_backward,
        .add_bias = cpu_add_bias,
        .rope = cpu_rope,
        .swiglu = cpu_swiglu,
        .swiglu_backward = cpu_swiglu_backward,
        .logsumexp = cpu_logsumexp,
        .softmax_scale = cpu_softmax_scale,
        .layer_norm = cpu_layer_norm,
        .gelu = cpu_gelu,
        .attention_full = cpu_attention_full,
        .attention = cpu_attention,
        .attention_workspace = cpu_attention_workspace,
        .attention_backward = cpu_attention_backward,
        .attention_backward_workspace = cpu_attention_backward_workspace,
        .attention_decode = cpu_attention_decode,
        .attention_decode_workspace = cpu_attention_decode_workspace,
        .attention_cached = cpu_attention_cached,
        .attention_cached_workspace = cpu_attention_cached_workspace,
    };
    atomic_init(&be->base.refcount, 1);
    return &be->base;
}

void tk_cpu_backend_free(tk_backend *be)
{
    if (!be) return;
    tk_cpu_panels_free(&((cpu_backend *)be)->panels);
    free(be);
}
