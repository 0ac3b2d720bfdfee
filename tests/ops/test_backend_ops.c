/* test_backend_ops.c - every op of the backend table (csrc/backend/backend.h),
 * on every backend this build has, against a float64 reference
 * (reference.c), in the manner of ggml's test-backend-ops.
 *
 *     test_backend_ops [name-substring...]
 *
 * Prints one line per op and shape (max error, and its fraction of the
 * tolerance) and exits 1 if any check failed. Built and run by
 * tests/test_ops_backend.py (also under AddressSanitizer + UBSan).
 *
 * What each op is held to:
 * - its reference on shapes with odd sizes, one-row and one-token cases,
 *   row strides larger than the row (the padding must come back untouched),
 *   several packed sequences of different lengths, grouped-query heads, and
 *   alpha / beta / accumulate variants; outputs the op overwrites start as
 *   NaN (so reading them, or a workspace, shows), and workspaces are
 *   allocated at exactly the size the backend asks for;
 * - every backward op also against central finite differences of a scalar
 *   objective sum(dy * forward(x)) computed in float64 from the reference:
 *   rmsnorm_backward, swiglu_backward, attention_backward, rope inverse (the
 *   transpose), softmax_scale (the gradient of -g * logsumexp), matmul_nn
 *   (input gradient) and matmul_tn_acc (weight gradient).
 *
 * Layout of this file: the calls (the only code that touches the table: when
 * a signature changes, the change is here), then one test function per op
 * (shapes, inputs, the reference, the comparison), then main.
 *
 * Tolerances: an element passes when |got - ref| <= atol + rtol * scale,
 * scale = |ref| unless said. Inputs are N(0, 1)-sized unless a case says
 * otherwise, so the absolute parts are in units of the values. Each bound is
 * 5-10x the largest error seen on the CPU backend (2x for add_bias's single
 * rounding and softmax_scale), in AVX-512, AVX2 and plain-C builds and with
 * OpenBLAS's SkylakeX, Haswell, Sandybridge and Prescott kernels; the CUDA
 * backend (bf16) will need its own table.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/qmatrix.h"
#include "io/quant.h"
#include "harness.h"
#include "quant_ref.h"
#include "reference.h"

/* matmul_nt / nn / tn_acc / nt_q: scale = the sum of the absolute terms, |alpha| sum|x w| + |beta y|: float32
 * summation error is relative to that, not to a result that may cancel to ~0 */
static const tol_t TOL_MATMUL = {1e-30, 2e-6, 0};
static const tol_t TOL_EXACT = {0, 0, 1};             /* embed, decoded weights: got == ref */
static const tol_t TOL_ADD = {0, 1.2e-7, 0};          /* add_bias: one rounding */
static const tol_t TOL_RMSNORM = {1e-6, 2e-6, 0};     /* y and inv_rms: a few roundings after the sum of squares */
static const tol_t TOL_RMSNORM_BWD = {4e-6, 4e-6, 0}; /* two terms that may cancel; atol / |x| for tiny x */
static const tol_t TOL_ROPE = {2e-6, 1e-6, 0};        /* a c - b s cancels: absolute part */
static const tol_t TOL_SWIGLU = {1e-12, 2e-6, 0};     /* tk_expf (2 ulp), a division, a product */
static const tol_t TOL_SWIGLU_BWD = {2e-6, 4e-6, 0};  /* s (1 + g (1 - s)) crosses 0 near g = -1.28 */
static const tol_t TOL_LSE = {1e-5, 2e-7, 0};         /* sum of up to 50257 exps; |lse| up to ~90 */
static const tol_t TOL_SOFTMAX = {1e-30, 4e-6, 0};    /* exp of x - lse rounded in float (|x - lse| <~ 30) */
static const tol_t TOL_ATTN = {1e-5, 1e-5, 0};        /* attention, its lse, attention_decode */
static const tol_t TOL_ATTN_BWD = {5e-5, 5e-5, 0};    /* dq, dk, dv: dk and dv summed over keys' queries */
/* finite differences (float64, h = 1e-5 max(1, |x|), error ~1e-9): the backend's float32 gradient against them */
static const tol_t TOL_FD = {2e-5, 2e-5, 0};

enum { FD_COORDS = 48 }; /* entries perturbed per checked tensor (all when fewer) */

/* ==== the calls ================================================================================ */

static void call_matmul_nt(tk_backend *be, mat *y, const mat *x, const mat *w, float alpha, float beta)
{
    /* w rows are contiguous: w->ld == K */
    be->matmul_nt(be, y->f, y->ld, x->f, x->ld, w->f, x->rows, y->cols, x->cols, alpha, beta);
}

static void call_matmul_nn(tk_backend *be, mat *y, const mat *x, const mat *w, float alpha, float beta)
{
    be->matmul_nn(be, y->f, y->ld, x->f, x->ld, w->f, w->ld, x->rows, y->cols, x->cols, alpha, beta);
}

static void call_matmul_nt_q(tk_backend *be, mat *y, const mat *x, const tk_qmatrix *w, float alpha, float beta)
{
    be->matmul_nt_q(be, y->f, y->ld, x->f, x->ld, w, x->rows, alpha, beta);
}

static void call_matmul_tn_acc(tk_backend *be, mat *g, const mat *a, const mat *b, float alpha)
{
    be->matmul_tn_acc(be, g->f, g->ld, a->f, a->ld, b->f, b->ld, a->rows, g->rows, g->cols, alpha);
}

static void call_embed(tk_backend *be, mat *x, const mat *table, const int32_t *tokens)
{
    be->embed(be, x->f, table->f, tokens, x->rows, x->cols);
}

/* y may be x (in place) */
static void call_rmsnorm(tk_backend *be, mat *y, const mat *x, const mat *w, float eps, float *inv_rms)
{
    be->rmsnorm(be, y->f, y->ld, x->f, x->ld, w->f, x->rows, x->cols, eps, inv_rms);
}

static void call_rmsnorm_backward(tk_backend *be, mat *dx, const mat *dy, const mat *x, const mat *w,
                                  const float *inv_rms, int accumulate)
{
    be->rmsnorm_backward(be, dx->f, dx->ld, dy->f, dy->ld, x->f, x->ld, w->f, inv_rms, x->rows, x->cols, accumulate);
}

static void call_add_bias(tk_backend *be, mat *y, const mat *b)
{
    be->add_bias(be, y->f, y->ld, b->f, y->rows, y->cols);
}

/* heads start at column col0 of x */
static void call_rope(tk_backend *be, mat *x, int col0, int n_heads, int head_dim, const mat *cos, const mat *sin,
                      int inverse)
{
    be->rope(be, x->f + col0, x->ld, x->rows, n_heads, head_dim, cos->f, sin->f, inverse);
}

static void call_swiglu(tk_backend *be, mat *act, const mat *gate_up)
{
    be->swiglu(be, act->f, gate_up->f, act->rows, act->cols);
}

static void call_swiglu_backward(tk_backend *be, mat *dgate_up, const mat *dact, const mat *gate_up)
{
    be->swiglu_backward(be, dgate_up->f, dact->f, gate_up->f, dact->rows, dact->cols);
}

static void call_logsumexp(tk_backend *be, float *lse, const mat *x)
{
    be->logsumexp(be, lse, x->f, x->ld, x->rows, x->cols);
}

static void call_softmax_scale(tk_backend *be, mat *x, const float *lse, const float *g)
{
    be->softmax_scale(be, x->f, x->ld, lse, g, x->rows, x->cols);
}

/* An attention problem: packed sequences, q | k | v side by side in one [T, ldqkv] buffer. */
typedef struct {
    int H, Hkv, Dh, n_seqs, T, max_len;
    int32_t *seq_start;
} attn_shape;

static void call_attention(tk_backend *be, mat *out, const mat *qkv, const attn_shape *s, float *lse)
{
    size_t n = be->attention_workspace(be, s->T, s->max_len, s->H, s->Dh);
    float *work = fvec(n);
    for (size_t i = 0; i < n; i++) work[i] = NAN;
    const float *q = qkv->f, *k = q + s->H * s->Dh, *v = k + s->Hkv * s->Dh;
    be->attention(be, out->f, out->ld, q, k, v, qkv->ld, s->seq_start, s->n_seqs, s->H, s->Hkv, s->Dh, lse, work);
    free(work);
}

static void call_attention_backward(tk_backend *be, mat *dqkv, const mat *dout, const mat *out, const mat *qkv,
                                    const float *lse, const attn_shape *s)
{
    size_t n = be->attention_backward_workspace(be, s->T, s->max_len, s->H, s->Dh);
    float *work = fvec(n);
    for (size_t i = 0; i < n; i++) work[i] = NAN;
    const float *q = qkv->f, *k = q + s->H * s->Dh, *v = k + s->Hkv * s->Dh;
    float *dq = dqkv->f, *dk = dq + s->H * s->Dh, *dv = dk + s->Hkv * s->Dh;
    be->attention_backward(be, dq, dk, dv, dout->f, out->f, out->ld, q, k, v, qkv->ld, lse, s->seq_start, s->n_seqs,
                           s->H, s->Hkv, s->Dh, work);
    free(work);
}

static void call_attention_decode(tk_backend *be, mat *out, const mat *q, const tk_kv_view *views, int n, int H,
                                  int Hkv, int Dh, int ld_kv, int max_keys)
{
    size_t len = be->attention_decode_workspace(be, max_keys);
    float *work = fvec(len);
    for (size_t i = 0; i < len; i++) work[i] = NAN;
    be->attention_decode(be, out->f, out->ld, q->f, q->ld, views, n, H, Hkv, Dh, ld_kv, work);
    free(work);
}

/* ==== helpers =================================================================================== */

/* a copy of m's float64 values, absolute (for summation scales) */
static double *abs_of(const mat *m)
{
    double *a = dvec((size_t)m->rows * m->ld);
    for (size_t i = 0; i < (size_t)m->rows * m->ld; i++) a[i] = fabs(m->d[i]);
    return a;
}

static double *copy_of(const mat *m)
{
    double *a = dvec((size_t)m->rows * m->ld);
    memcpy(a, m->d, (size_t)m->rows * m->ld * sizeof(double));
    return a;
}

/* sum(dy * y) over dy's valid entries (y with dy's layout) */
static double dot_valid(const mat *dy, const double *y)
{
    double s = 0;
    for (int r = 0; r < dy->rows; r++)
        for (int c = 0; c < dy->cols; c++) s += dy->d[(size_t)r * dy->ld + c] * y[(size_t)r * dy->ld + c];
    return s;
}

static const char *guard_note(int ok) { return ok ? NULL : "row padding was written"; }

/* ==== matmuls ==================================================================================== */

typedef struct {
    int T, N, K, pad_x, pad_y;
} mm_shape;

/* T = 1 (the one-row path), odd N and K, N not a multiple of 16, and shapes large enough to be split over threads */
static const mm_shape MM_SHAPES[] = {
    {1, 1, 1, 0, 0},   {1, 17, 33, 3, 5},  {1, 200, 301, 1, 2}, {2, 45, 7, 2, 0},
    {3, 100, 64, 0, 7}, {17, 31, 577, 5, 1}, {65, 130, 96, 3, 3},
};
static const float ALPHA_BETA[][2] = {{1, 0}, {0.5f, 1}, {-2, 0.25f}};

/* L(x, w) = sum(dy * x w^T): d/dx = dy w (matmul_nn), d/dw = dy^T x (matmul_tn_acc) */
typedef struct {
    const mat *x, *w, *dy;
    double *y;
} mm_objective;

static double mm_L(void *ctx)
{
    mm_objective *o = ctx;
    ref_matmul_nt(o->y, o->dy->ld, o->x->d, o->x->ld, o->w->d, o->w->ld, o->x->rows, o->w->rows, o->x->cols, 1, 0);
    return dot_valid(o->dy, o->y);
}

static void test_matmul_nt(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof MM_SHAPES / sizeof MM_SHAPES[0]; i++)
        for (int ab = 0; ab < 3; ab++) {
            mm_shape s = MM_SHAPES[i];
            float alpha = ALPHA_BETA[ab][0], beta = ALPHA_BETA[ab][1];
            mat x = mat_new(s.T, s.K, s.K + s.pad_x), w = mat_new(s.N, s.K, s.K), y = mat_new(s.T, s.N, s.N + s.pad_y);
            mat_randn(&x, r, 1), mat_randn(&w, r, 1);
            if (beta == 0) mat_fill(&y, NAN); /* not read */
            else mat_randn(&y, r, 1);
            double *want = copy_of(&y), *scale = abs_of(&y), *ax = abs_of(&x), *aw = abs_of(&w);
            ref_matmul_nt(want, y.ld, x.d, x.ld, w.d, w.ld, s.T, s.N, s.K, alpha, beta);
            ref_matmul_nt(scale, y.ld, ax, x.ld, aw, w.ld, s.T, s.N, s.K, fabs(alpha), fabs(beta));
            call_matmul_nt(be, &y, &x, &w, alpha, beta);
            char what[128];
            snprintf(what, sizeof what, "T=%d N=%d K=%d ldx=%d ldy=%d alpha=%g beta=%g", s.T, s.N, s.K, x.ld, y.ld,
                     alpha, beta);
            int guard = mat_guard_ok(&y);
            report("matmul_nt", what, compare(y.f, want, scale, s.T, s.N, y.ld, TOL_MATMUL), TOL_MATMUL, guard,
                   guard_note(guard));
            free(want), free(scale), free(ax), free(aw);
            mat_free(&x), mat_free(&w), mat_free(&y);
        }
}

/* y[T, N] = x[T, K] w[K, N]; also as the input gradient of y = x W^T (finite differences) */
static void test_matmul_nn(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof MM_SHAPES / sizeof MM_SHAPES[0]; i++)
        for (int ab = 0; ab < 3; ab++) {
            mm_shape s = MM_SHAPES[i];
            float alpha = ALPHA_BETA[ab][0], beta = ALPHA_BETA[ab][1];
            mat x = mat_new(s.T, s.K, s.K + s.pad_x), w = mat_new(s.K, s.N, s.N + s.pad_x + 1);
            mat y = mat_new(s.T, s.N, s.N + s.pad_y);
            mat_randn(&x, r, 1), mat_randn(&w, r, 1);
            if (beta == 0) mat_fill(&y, NAN);
            else mat_randn(&y, r, 1);
            double *want = copy_of(&y), *scale = abs_of(&y), *ax = abs_of(&x), *aw = abs_of(&w);
            ref_matmul_nn(want, y.ld, x.d, x.ld, w.d, w.ld, s.T, s.N, s.K, alpha, beta);
            ref_matmul_nn(scale, y.ld, ax, x.ld, aw, w.ld, s.T, s.N, s.K, fabs(alpha), fabs(beta));
            call_matmul_nn(be, &y, &x, &w, alpha, beta);
            char what[128];
            snprintf(what, sizeof what, "T=%d N=%d K=%d ldx=%d ldw=%d ldy=%d alpha=%g beta=%g", s.T, s.N, s.K, x.ld,
                     w.ld, y.ld, alpha, beta);
            int guard = mat_guard_ok(&y);
            report("matmul_nn", what, compare(y.f, want, scale, s.T, s.N, y.ld, TOL_MATMUL), TOL_MATMUL, guard,
                   guard_note(guard));
            free(want), free(scale), free(ax), free(aw);
            mat_free(&x), mat_free(&w), mat_free(&y);
        }
    /* dx[T, K] = dy[T, N] . W[N, K] is d/dx sum(dy * x W^T) */
    for (size_t i = 0; i < sizeof MM_SHAPES / sizeof MM_SHAPES[0]; i++) {
        mm_shape s = MM_SHAPES[i];
        mat x = mat_new(s.T, s.K, s.K), W = mat_new(s.N, s.K, s.K), dy = mat_new(s.T, s.N, s.N + s.pad_y);
        mat dx = mat_new(s.T, s.K, s.K + s.pad_x);
        mat_randn(&x, r, 1), mat_randn(&W, r, 1), mat_randn(&dy, r, 1), mat_fill(&dx, NAN);
        call_matmul_nn(be, &dx, &dy, &W, 1, 0);
        mm_objective o = {&x, &W, &dy, dvec((size_t)s.T * dy.ld)};
        char what[128];
        snprintf(what, sizeof what, "d/dx of dy.(x W^T): T=%d N=%d K=%d", s.T, s.N, s.K);
        report("matmul_nn fin.diff", what, fd_check(mm_L, &o, &x, dx.f, dx.ld, FD_COORDS, r, TOL_FD), TOL_FD, 1, NULL);
        free(o.y);
        mat_free(&x), mat_free(&W), mat_free(&dy), mat_free(&dx);
    }
}

/* g[M, N] += alpha a[T, M]^T b[T, N]: M >= N and M < N (the two splits), T = 1, odd sizes */
static void test_matmul_tn_acc(tk_backend *be, rng_t *r)
{
    static const int shapes[][3] = {{1, 1, 1}, {1, 17, 33}, {2, 45, 7}, {3, 7, 100}, {17, 31, 577}, {65, 130, 96},
                                    {65, 96, 130}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int v = 0; v < 2; v++) {
            int T = shapes[i][0], M = shapes[i][1], N = shapes[i][2];
            float alpha = v ? -0.5f : 1.0f;
            mat a = mat_new(T, M, M + 3 * v), b = mat_new(T, N, N + 1 + v), g = mat_new(M, N, N + 2 * v);
            mat_randn(&a, r, 1), mat_randn(&b, r, 1), mat_randn(&g, r, 1); /* g: what earlier calls accumulated */
            double *want = copy_of(&g), *scale = abs_of(&g), *aa = abs_of(&a), *ab = abs_of(&b);
            ref_matmul_tn_acc(want, g.ld, a.d, a.ld, b.d, b.ld, T, M, N, alpha);
            ref_matmul_tn_acc(scale, g.ld, aa, a.ld, ab, b.ld, T, M, N, fabs(alpha));
            call_matmul_tn_acc(be, &g, &a, &b, alpha);
            char what[128];
            snprintf(what, sizeof what, "T=%d M=%d N=%d lda=%d ldb=%d ldg=%d alpha=%g", T, M, N, a.ld, b.ld, g.ld, alpha);
            int guard = mat_guard_ok(&g);
            report("matmul_tn_acc", what, compare(g.f, want, scale, M, N, g.ld, TOL_MATMUL), TOL_MATMUL, guard,
                   guard_note(guard));
            free(want), free(scale), free(aa), free(ab);
            mat_free(&a), mat_free(&b), mat_free(&g);
        }
    /* dW[N, K] = dy[T, N]^T x[T, K] is d/dW sum(dy * x W^T) */
    for (size_t i = 0; i < sizeof MM_SHAPES / sizeof MM_SHAPES[0]; i++) {
        mm_shape s = MM_SHAPES[i];
        mat x = mat_new(s.T, s.K, s.K + s.pad_x), W = mat_new(s.N, s.K, s.K), dy = mat_new(s.T, s.N, s.N + s.pad_y);
        mat dW = mat_new(s.N, s.K, s.K + 1);
        mat_randn(&x, r, 1), mat_randn(&W, r, 1), mat_randn(&dy, r, 1), mat_fill(&dW, 0);
        call_matmul_tn_acc(be, &dW, &dy, &x, 1);
        mm_objective o = {&x, &W, &dy, dvec((size_t)s.T * dy.ld)};
        char what[128];
        snprintf(what, sizeof what, "d/dW of dy.(x W^T): T=%d N=%d K=%d", s.T, s.N, s.K);
        report("matmul_tn_acc fin.diff", what, fd_check(mm_L, &o, &W, dW.f, dW.ld, FD_COORDS, r, TOL_FD), TOL_FD, 1,
               NULL);
        free(o.y);
        mat_free(&x), mat_free(&W), mat_free(&dy), mat_free(&dW);
    }
}

/* ---- matmul_nt_q: W as Q4_0 / Q4_1 / Q8_0 blocks, repacked as at load ---- */

/* N rows of random blocks, their tk_dequantize'd values in Wd ([N, K], float64 in d) and the repacked copy */
static tk_qmatrix make_qmatrix(int type, int N, int K, mat *Wd, rng_t *r, int extreme)
{
    const qref_type *t = qref_find(type);
    size_t row_bytes = (size_t)K / 32 * t->bytes;
    uint8_t *blocks = malloc((size_t)N * row_bytes);
    qref_random_blocks(blocks, t, (size_t)N * K / 32, r, extreme);
    tk_qmatrix q = {type, N, K, calloc(1, tk_qmatrix_bytes(type, N, K))};
    *Wd = mat_new(N, K, K);
    for (int n = 0; n < N; n++) {
        tk_qmatrix_put_row(&q, n, blocks + (size_t)n * row_bytes);
        tk_dequantize(Wd->f + (size_t)n * K, blocks + (size_t)n * row_bytes, type, (size_t)K);
    }
    mat_to_double(Wd);
    free(blocks);
    return q;
}

static void test_matmul_nt_q(tk_backend *be, rng_t *r)
{
    static const int types[] = {TK_GGML_Q4_0, TK_GGML_Q4_1, TK_GGML_Q8_0};
    /* N, K, T: a partial last group of 16 rows, T past 8 (two passes of a group), up to the 64 rows it is used for */
    static const int shapes[][3] = {{1, 32, 1}, {17, 96, 3}, {45, 576, 9}, {100, 64, 17}, {300, 576, 13}, {33, 64, 64}};
    if (!be->matmul_nt_q) {
        report_bool("matmul_nt_q", "(optional: not provided by this backend)", 1, NULL);
        return;
    }
    for (int ti = 0; ti < 3; ti++) {
        const char *tname = qref_find(types[ti])->name;
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
            for (int ab = 0; ab < 3; ab++) {
                int N = shapes[i][0], K = shapes[i][1], T = shapes[i][2];
                float alpha = ALPHA_BETA[ab][0], beta = ALPHA_BETA[ab][1];
                mat W;
                tk_qmatrix q = make_qmatrix(types[ti], N, K, &W, r, 0);
                mat x = mat_new(T, K, K + 4), y = mat_new(T, N, N + 3);
                mat_randn(&x, r, 1);
                if (beta == 0) mat_fill(&y, NAN);
                else mat_randn(&y, r, 1);
                double *want = copy_of(&y), *scale = abs_of(&y), *ax = abs_of(&x), *aw = abs_of(&W);
                ref_matmul_nt(want, y.ld, x.d, x.ld, W.d, W.ld, T, N, K, alpha, beta);
                ref_matmul_nt(scale, y.ld, ax, x.ld, aw, W.ld, T, N, K, fabs(alpha), fabs(beta));
                call_matmul_nt_q(be, &y, &x, &q, alpha, beta);
                char what[128];
                snprintf(what, sizeof what, "%s T=%d N=%d K=%d ldx=%d ldy=%d alpha=%g beta=%g", tname, T, N, K, x.ld,
                         y.ld, alpha, beta);
                int guard = mat_guard_ok(&y);
                report("matmul_nt_q", what, compare(y.f, want, scale, T, N, y.ld, TOL_MATMUL), TOL_MATMUL, guard,
                       guard_note(guard));
                free(want), free(scale), free(ax), free(aw), free(q.tiles);
                mat_free(&W), mat_free(&x), mat_free(&y);
            }
        /* decoding is exact: x = identity rows (T = K = 64, eight passes of 8) gives W^T, every weight (== as
         * values: a -0 weight may come back +0), scales 0, -0, subnormal and +-65504 included */
        int N = 45, K = 64;
        mat W;
        tk_qmatrix q = make_qmatrix(types[ti], N, K, &W, r, 1);
        mat x = mat_new(K, K, K), y = mat_new(K, N, N);
        for (int k = 0; k < K; k++) x.f[(size_t)k * K + k] = 1;
        mat_to_double(&x), mat_fill(&y, NAN);
        double *want = dvec((size_t)K * N);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) want[(size_t)k * N + n] = W.d[(size_t)n * K + k];
        call_matmul_nt_q(be, &y, &x, &q, 1, 0);
        char what[128];
        snprintf(what, sizeof what, "%s x = identity: y = W^T (extreme scales) N=%d K=%d", tname, N, K);
        report("matmul_nt_q", what, compare(y.f, want, NULL, K, N, N, TOL_EXACT), TOL_EXACT, 1, NULL);
        free(want), free(q.tiles);
        mat_free(&W), mat_free(&x), mat_free(&y);
    }
}

/* ==== embedding, norms, bias ======================================================================= */

static void test_embed(tk_backend *be, rng_t *r)
{
    static const int shapes[][3] = {{1, 1, 1}, {3, 7, 5}, {17, 64, 50}}; /* T, D, V */
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int T = shapes[i][0], D = shapes[i][1], V = shapes[i][2];
        mat table = mat_new(V, D, D), x = mat_new(T, D, D);
        mat_randn(&table, r, 1), mat_fill(&x, NAN);
        int32_t *tokens = malloc((size_t)T * sizeof *tokens);
        for (int t = 0; t < T; t++) tokens[t] = t == 0 ? V - 1 : t == 1 ? 0 : rng_int(r, 0, V - 1); /* repeats too */
        double *want = dvec((size_t)T * D);
        ref_embed(want, table.d, tokens, T, D);
        call_embed(be, &x, &table, tokens);
        char what[128];
        snprintf(what, sizeof what, "T=%d D=%d V=%d", T, D, V);
        report("embed", what, compare(x.f, want, NULL, T, D, D, TOL_EXACT), TOL_EXACT, 1, NULL);
        free(tokens), free(want);
        mat_free(&table), mat_free(&x);
    }
}

typedef struct {
    int rows, n, pad_x, pad_y, in_place, with_inv;
    float eps, x_scale;
} norm_shape;

/* one row; odd n; rows * n >= 32768 (split over threads); tiny inputs where eps matters; in place with strides */
static const norm_shape NORM_SHAPES[] = {
    {1, 1, 0, 0, 0, 1, 1e-6f, 1}, {3, 7, 2, 1, 0, 0, 1e-5f, 1},  {17, 64, 0, 3, 0, 1, 1e-6f, 1},
    {65, 577, 3, 0, 0, 1, 1e-5f, 1}, {2, 8, 1, 1, 0, 1, 1e-5f, 1e-3f}, {17, 64, 5, 5, 1, 1, 1e-6f, 1},
};

static void test_rmsnorm(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof NORM_SHAPES / sizeof NORM_SHAPES[0]; i++) {
        norm_shape s = NORM_SHAPES[i];
        mat x = mat_new(s.rows, s.n, s.n + s.pad_x), w = mat_new(1, s.n, s.n);
        mat y = s.in_place ? x : mat_new(s.rows, s.n, s.n + s.pad_y);
        mat_randn(&x, r, s.x_scale), mat_randn(&w, r, 0.1);
        for (int c = 0; c < s.n; c++) w.f[c] += 1;
        mat_to_double(&w);
        if (!s.in_place) mat_fill(&y, NAN);
        double *want = dvec((size_t)s.rows * y.ld), *want_inv = dvec((size_t)s.rows);
        ref_rmsnorm(want, y.ld, x.d, x.ld, w.d, s.rows, s.n, s.eps, want_inv);
        float *inv = s.with_inv ? fvec((size_t)s.rows) : NULL;
        call_rmsnorm(be, &y, &x, &w, s.eps, inv);
        char what[128];
        snprintf(what, sizeof what, "rows=%d n=%d ldx=%d ldy=%d eps=%g |x|~%g%s%s", s.rows, s.n, x.ld, y.ld, s.eps,
                 s.x_scale, s.in_place ? " in place" : "", s.with_inv ? "" : " no inv_rms");
        int guard = mat_guard_ok(&y);
        report("rmsnorm", what, compare(y.f, want, NULL, s.rows, s.n, y.ld, TOL_RMSNORM), TOL_RMSNORM, guard,
               guard_note(guard));
        if (inv) report("rmsnorm inv_rms", what, compare(inv, want_inv, NULL, 1, s.rows, s.rows, TOL_RMSNORM),
                        TOL_RMSNORM, 1, NULL);
        free(want), free(want_inv), free(inv);
        mat_free(&x), mat_free(&w);
        if (!s.in_place) mat_free(&y);
    }
}

/* L(x) = sum(dy * rmsnorm(x)) */
typedef struct {
    const mat *x, *w, *dy;
    double eps, *y;
} norm_objective;

static double norm_L(void *ctx)
{
    norm_objective *o = ctx;
    ref_rmsnorm(o->y, o->dy->ld, o->x->d, o->x->ld, o->w->d, o->x->rows, o->x->cols, o->eps, NULL);
    return dot_valid(o->dy, o->y);
}

static void test_rmsnorm_backward(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof NORM_SHAPES / sizeof NORM_SHAPES[0]; i++)
        for (int accumulate = 0; accumulate < 2; accumulate++) {
            norm_shape s = NORM_SHAPES[i];
            if (s.in_place && accumulate) continue; /* in place (dx = dy) only overwrites, as the model uses it */
            mat x = mat_new(s.rows, s.n, s.n + s.pad_x), w = mat_new(1, s.n, s.n), dy = mat_new(s.rows, s.n, s.n + s.pad_y);
            mat dx = s.in_place ? dy : mat_new(s.rows, s.n, s.n + s.pad_y + 1);
            mat_randn(&x, r, s.x_scale), mat_randn(&w, r, 0.1), mat_randn(&dy, r, 1);
            for (int c = 0; c < s.n; c++) w.f[c] += 1;
            mat_to_double(&w);
            if (!s.in_place) {
                if (accumulate) mat_randn(&dx, r, 1);
                else mat_fill(&dx, NAN);
            }
            mat dy0 = mat_new(s.rows, s.n, dy.ld); /* dy as it was (dx may overwrite it) */
            mat_copy(&dy0, &dy);
            double *want = copy_of(&dx), *inv_d = dvec((size_t)s.rows), *tmp = dvec((size_t)s.rows * s.n);
            ref_rmsnorm_backward(want, dx.ld, dy.d, dy.ld, x.d, x.ld, w.d, s.rows, s.n, s.eps, accumulate);
            ref_rmsnorm(tmp, s.n, x.d, x.ld, w.d, s.rows, s.n, s.eps, inv_d);
            float *inv = fvec((size_t)s.rows); /* the forward's saved inv_rms, rounded */
            for (int k = 0; k < s.rows; k++) inv[k] = (float)inv_d[k];
            call_rmsnorm_backward(be, &dx, &dy, &x, &w, inv, accumulate);
            char what[128];
            snprintf(what, sizeof what, "rows=%d n=%d lddx=%d lddy=%d ldx=%d |x|~%g%s%s", s.rows, s.n, dx.ld, dy.ld, x.ld,
                     s.x_scale, accumulate ? " accumulate" : "", s.in_place ? " in place (dx = dy)" : "");
            int guard = mat_guard_ok(&dx);
            tol_t tol = TOL_RMSNORM_BWD;
            if (s.x_scale < 1) tol.atol /= s.x_scale; /* the gradient scales as 1 / |x| */
            report("rmsnorm_backward", what, compare(dx.f, want, NULL, s.rows, s.n, dx.ld, tol), tol, guard,
                   guard_note(guard));
            if (!accumulate) {
                norm_objective o = {&x, &w, &dy0, s.eps, dvec((size_t)s.rows * dy.ld)};
                tol_t ftol = TOL_FD;
                if (s.x_scale < 1) ftol.atol /= s.x_scale;
                report("rmsnorm_backward fin.diff", what, fd_check(norm_L, &o, &x, dx.f, dx.ld, FD_COORDS, r, ftol),
                       ftol, 1, NULL);
                free(o.y);
            }
            free(want), free(inv_d), free(tmp), free(inv);
            mat_free(&x), mat_free(&w), mat_free(&dy), mat_free(&dy0);
            if (!s.in_place) mat_free(&dx);
        }
}

static void test_add_bias(tk_backend *be, rng_t *r)
{
    static const int shapes[][3] = {{1, 1, 0}, {3, 17, 4}, {65, 577, 1}}; /* rows, n, pad */
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int rows = shapes[i][0], n = shapes[i][1];
        mat y = mat_new(rows, n, n + shapes[i][2]), b = mat_new(1, n, n);
        mat_randn(&y, r, 1), mat_randn(&b, r, 1);
        double *want = copy_of(&y);
        ref_add_bias(want, y.ld, b.d, rows, n);
        call_add_bias(be, &y, &b);
        char what[128];
        snprintf(what, sizeof what, "rows=%d n=%d ldy=%d", rows, n, y.ld);
        int guard = mat_guard_ok(&y);
        report("add_bias", what, compare(y.f, want, NULL, rows, n, y.ld, TOL_ADD), TOL_ADD, guard, guard_note(guard));
        free(want);
        mat_free(&y), mat_free(&b);
    }
}

/* ==== RoPE ========================================================================================= */

/* L(x) = sum(dy * rope(x)): its gradient is rope^T dy, which the inverse rotation must be */
typedef struct {
    const mat *x, *dy, *cos, *sin;
    int col0, heads, Dh;
    double *y;
} rope_objective;

static double rope_L(void *ctx)
{
    rope_objective *o = ctx;
    memcpy(o->y, o->x->d, (size_t)o->x->rows * o->x->ld * sizeof(double));
    ref_rope(o->y + o->col0, o->x->ld, o->x->rows, o->heads, o->Dh, o->cos->d, o->sin->d, 0);
    return dot_valid(o->dy, o->y);
}

static void test_rope(tk_backend *be, rng_t *r)
{
    /* rows, heads, head_dim, first column (the k part of a q|k|v row), row padding */
    static const int shapes[][5] = {{1, 1, 2, 0, 0}, {3, 3, 6, 6, 1}, {17, 4, 64, 128, 64}, {65, 2, 128, 0, 3}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int rows = shapes[i][0], heads = shapes[i][1], Dh = shapes[i][2], col0 = shapes[i][3];
        int cols = col0 + heads * Dh + 5, half = Dh / 2; /* columns after the heads: left alone too */
        mat x = mat_new(rows, cols, cols + shapes[i][4]), cs = mat_new(rows, half, half), sn = mat_new(rows, half, half);
        mat_randn(&x, r, 1);
        for (int t = 0; t < rows; t++) { /* a position per row, theta 10000: cos / sin rounded to float */
            int pos = t == 0 ? 0 : rng_int(r, 0, 8191);
            for (int j = 0; j < half; j++) {
                double angle = pos * pow(10000.0, -2.0 * j / Dh);
                cs.f[(size_t)t * half + j] = (float)cos(angle), sn.f[(size_t)t * half + j] = (float)sin(angle);
            }
        }
        mat_to_double(&cs), mat_to_double(&sn);
        char what[128];
        snprintf(what, sizeof what, "rows=%d heads=%d Dh=%d from col %d ldx=%d", rows, heads, Dh, col0, x.ld);
        for (int inverse = 0; inverse < 2; inverse++) {
            mat y = mat_new(rows, cols, x.ld);
            mat_copy(&y, &x);
            double *want = copy_of(&x);
            ref_rope(want + col0, x.ld, rows, heads, Dh, cs.d, sn.d, inverse);
            call_rope(be, &y, col0, heads, Dh, &cs, &sn, inverse);
            int guard = mat_guard_ok(&y);
            report(inverse ? "rope inverse" : "rope", what, compare(y.f, want, NULL, rows, cols, y.ld, TOL_ROPE),
                   TOL_ROPE, guard, guard_note(guard));
            if (!inverse) { /* and back */
                call_rope(be, &y, col0, heads, Dh, &cs, &sn, 1);
                report("rope then inverse", what, compare(y.f, x.d, NULL, rows, cols, y.ld, TOL_ROPE), TOL_ROPE, 1, NULL);
            }
            free(want);
            mat_free(&y);
        }
        /* the inverse of dy is the gradient of sum(dy * rope(x)) */
        mat dy = mat_new(rows, cols, x.ld);
        mat_randn(&dy, r, 1);
        mat g = mat_new(rows, cols, x.ld);
        mat_copy(&g, &dy);
        call_rope(be, &g, col0, heads, Dh, &cs, &sn, 1);
        rope_objective o = {&x, &dy, &cs, &sn, col0, heads, Dh, dvec((size_t)rows * x.ld)};
        report("rope inverse fin.diff", what, fd_check(rope_L, &o, &x, g.f, g.ld, FD_COORDS, r, TOL_FD), TOL_FD, 1, NULL);
        free(o.y);
        mat_free(&dy), mat_free(&g);
        mat_free(&x), mat_free(&cs), mat_free(&sn);
    }
}

/* ==== SwiGLU ======================================================================================= */

static const int SWIGLU_SHAPES[][2] = {{1, 1}, {2, 17}, {17, 300}, {65, 577}}; /* T, F */

/* gate values N(0, 3^2), a few far in the tails where exp overflows or underflows */
static void swiglu_inputs(mat *gate_up, rng_t *r)
{
    static const float tails[] = {-100, -90, -40, 40, 90, 100};
    mat_randn(gate_up, r, 1);
    int F = gate_up->cols / 2;
    for (int t = 0; t < gate_up->rows; t++)
        for (int i = 0; i < F; i++) gate_up->f[(size_t)t * 2 * F + i] *= 3;
    for (int k = 0; k < 6 && k < F * gate_up->rows; k++) gate_up->f[(size_t)(k % gate_up->rows) * 2 * F + k % F] = tails[k];
    mat_to_double(gate_up);
}

static void test_swiglu(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof SWIGLU_SHAPES / sizeof SWIGLU_SHAPES[0]; i++) {
        int T = SWIGLU_SHAPES[i][0], F = SWIGLU_SHAPES[i][1];
        mat gu = mat_new(T, 2 * F, 2 * F), act = mat_new(T, F, F);
        swiglu_inputs(&gu, r), mat_fill(&act, NAN);
        double *want = dvec((size_t)T * F);
        ref_swiglu(want, gu.d, T, F);
        call_swiglu(be, &act, &gu);
        char what[128];
        snprintf(what, sizeof what, "T=%d F=%d gate~N(0,9) and +-40/90/100", T, F);
        report("swiglu", what, compare(act.f, want, NULL, T, F, F, TOL_SWIGLU), TOL_SWIGLU, 1, NULL);
        free(want);
        mat_free(&gu), mat_free(&act);
    }
}

typedef struct {
    const mat *gu, *dact;
    double *act;
} swiglu_objective;

static double swiglu_L(void *ctx)
{
    swiglu_objective *o = ctx;
    ref_swiglu(o->act, o->gu->d, o->gu->rows, o->dact->cols);
    return dot_valid(o->dact, o->act);
}

static void test_swiglu_backward(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof SWIGLU_SHAPES / sizeof SWIGLU_SHAPES[0]; i++) {
        int T = SWIGLU_SHAPES[i][0], F = SWIGLU_SHAPES[i][1];
        mat gu = mat_new(T, 2 * F, 2 * F), dact = mat_new(T, F, F), dgu = mat_new(T, 2 * F, 2 * F);
        swiglu_inputs(&gu, r), mat_randn(&dact, r, 1), mat_fill(&dgu, NAN);
        double *want = dvec((size_t)T * 2 * F);
        ref_swiglu_backward(want, dact.d, gu.d, T, F);
        call_swiglu_backward(be, &dgu, &dact, &gu);
        char what[128];
        snprintf(what, sizeof what, "T=%d F=%d gate~N(0,9) and +-40/90/100", T, F);
        report("swiglu_backward", what, compare(dgu.f, want, NULL, T, 2 * F, 2 * F, TOL_SWIGLU_BWD), TOL_SWIGLU_BWD, 1,
               NULL);
        swiglu_objective o = {&gu, &dact, dvec((size_t)T * F)};
        report("swiglu_backward fin.diff", what, fd_check(swiglu_L, &o, &gu, dgu.f, dgu.ld, FD_COORDS, r, TOL_FD), TOL_FD,
               1, NULL);
        free(want), free(o.act);
        mat_free(&gu), mat_free(&dact), mat_free(&dgu);
    }
}

/* ==== softmax over the vocabulary ================================================================== */

/* rows, n, padding, and the value range: N(0, 3^2) logits, with row 0 shifted by +80 and row 1 by -500 */
static const int LSE_SHAPES[][3] = {{1, 1, 0}, {3, 17, 3}, {2, 1000, 1}, {65, 577, 2}, {3, 50257, 5}};

static void lse_inputs(mat *x, rng_t *r)
{
    mat_randn(x, r, 3);
    for (int c = 0; c < x->cols; c++) {
        x->f[c] += 80;
        if (x->rows > 1) x->f[(size_t)x->ld + c] -= 500;
    }
    mat_to_double(x);
}

static void test_logsumexp(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof LSE_SHAPES / sizeof LSE_SHAPES[0]; i++) {
        int rows = LSE_SHAPES[i][0], n = LSE_SHAPES[i][1];
        mat x = mat_new(rows, n, n + LSE_SHAPES[i][2]);
        lse_inputs(&x, r);
        float *lse = fvec((size_t)rows);
        for (int k = 0; k < rows; k++) lse[k] = NAN;
        double *want = dvec((size_t)rows);
        ref_logsumexp(want, x.d, x.ld, rows, n);
        call_logsumexp(be, lse, &x);
        char what[128];
        snprintf(what, sizeof what, "rows=%d n=%d ldx=%d (rows shifted +80, -500)", rows, n, x.ld);
        report("logsumexp", what, compare(lse, want, NULL, 1, rows, rows, TOL_LSE), TOL_LSE, 1, NULL);
        free(lse), free(want);
        mat_free(&x);
    }
}

/* L(x) = -sum_r g[r] logsumexp(x[r]): its gradient is -g softmax(x), what softmax_scale writes */
typedef struct {
    const mat *x;
    const double *g;
    double *lse;
} lse_objective;

static double lse_L(void *ctx)
{
    lse_objective *o = ctx;
    ref_logsumexp(o->lse, o->x->d, o->x->ld, o->x->rows, o->x->cols);
    double s = 0;
    for (int k = 0; k < o->x->rows; k++) s -= o->g[k] * o->lse[k];
    return s;
}

static void test_softmax_scale(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof LSE_SHAPES / sizeof LSE_SHAPES[0]; i++) {
        int rows = LSE_SHAPES[i][0], n = LSE_SHAPES[i][1];
        mat x = mat_new(rows, n, n + LSE_SHAPES[i][2]);
        lse_inputs(&x, r);
        mat x0 = mat_new(rows, n, x.ld);
        mat_copy(&x0, &x);
        double *lse_d = dvec((size_t)rows), *g_d = dvec((size_t)rows), *want = dvec((size_t)rows * x.ld);
        float *lse = fvec((size_t)rows), *g = fvec((size_t)rows);
        ref_logsumexp(lse_d, x.d, x.ld, rows, n);
        for (int k = 0; k < rows; k++) {
            lse[k] = (float)lse_d[k], lse_d[k] = lse[k]; /* the op's contract: the lse it is given */
            g[k] = (float)rng_normal(r), g_d[k] = g[k];
        }
        ref_softmax_scale(want, x.ld, x.d, x.ld, lse_d, g_d, rows, n);
        call_softmax_scale(be, &x, lse, g);
        char what[128];
        snprintf(what, sizeof what, "rows=%d n=%d ldx=%d (rows shifted +80, -500)", rows, n, x.ld);
        int guard = mat_guard_ok(&x);
        report("softmax_scale", what, compare(x.f, want, NULL, rows, n, x.ld, TOL_SOFTMAX), TOL_SOFTMAX, guard,
               guard_note(guard));
        if ((long)rows * n <= 20000) {
            lse_objective o = {&x0, g_d, dvec((size_t)rows)};
            report("softmax_scale fin.diff", what, fd_check(lse_L, &o, &x0, x.f, x.ld, FD_COORDS, r, TOL_FD), TOL_FD,
                   1, NULL);
            free(o.lse);
        }
        free(lse_d), free(g_d), free(want), free(lse), free(g);
        mat_free(&x), mat_free(&x0);
    }
}

/* ==== attention ==================================================================================== */

typedef struct {
    int H, Hkv, Dh, pad_qkv, pad_o, n_seqs;
    int lens[6];
} attn_case;

/* T = 1; GQA groups of 1, 2, 3, 4; an odd head_dim; sequences of different lengths packed together, one
 * longer than a 64-row query block */
static const attn_case ATTN_CASES[] = {
    {1, 1, 8, 0, 0, 1, {1}},
    {2, 1, 16, 3, 1, 2, {2, 3}},
    {4, 2, 16, 5, 2, 4, {17, 1, 65, 5}},
    {3, 3, 5, 1, 0, 2, {3, 17}},
    {6, 2, 32, 0, 4, 3, {7, 2, 70}},
    {4, 1, 8, 2, 2, 2, {130, 1}},
};

static attn_shape attn_shape_of(const attn_case *c)
{
    attn_shape s = {c->H, c->Hkv, c->Dh, c->n_seqs, 0, 0, malloc((size_t)(c->n_seqs + 1) * sizeof(int32_t))};
    s.seq_start[0] = 0;
    for (int i = 0; i < c->n_seqs; i++) {
        s.seq_start[i + 1] = s.seq_start[i] + c->lens[i];
        if (c->lens[i] > s.max_len) s.max_len = c->lens[i];
    }
    s.T = s.seq_start[c->n_seqs];
    return s;
}

static void attn_describe(char *what, size_t n, const attn_case *c, const mat *qkv, const mat *out)
{
    int k = snprintf(what, n, "H=%d Hkv=%d Dh=%d ldqkv=%d ldo=%d seqs", c->H, c->Hkv, c->Dh, qkv->ld, out->ld);
    for (int i = 0; i < c->n_seqs && k > 0 && (size_t)k < n; i++) k += snprintf(what + k, n - (size_t)k, " %d", c->lens[i]);
}

static void ref_attention_on(double *out, int ldo, const mat *qkv, const attn_shape *s, double *lse)
{
    const double *q = qkv->d, *k = q + s->H * s->Dh, *v = k + s->Hkv * s->Dh;
    ref_attention(out, ldo, q, k, v, qkv->ld, s->seq_start, s->n_seqs, s->H, s->Hkv, s->Dh, lse);
}

static void test_attention(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof ATTN_CASES / sizeof ATTN_CASES[0]; i++)
        for (int with_lse = 1; with_lse >= 0; with_lse--) {
            const attn_case *c = &ATTN_CASES[i];
            attn_shape s = attn_shape_of(c);
            int width = (c->H + 2 * c->Hkv) * c->Dh;
            mat qkv = mat_new(s.T, width, width + c->pad_qkv), out = mat_new(s.T, c->H * c->Dh, c->H * c->Dh + c->pad_o);
            mat_randn(&qkv, r, 1.5), mat_fill(&out, NAN);
            float *lse = with_lse ? fvec((size_t)s.T * c->H) : NULL;
            for (int k = 0; with_lse && k < s.T * c->H; k++) lse[k] = NAN;
            double *want = dvec((size_t)s.T * out.ld), *want_lse = dvec((size_t)s.T * c->H);
            ref_attention_on(want, out.ld, &qkv, &s, want_lse);
            call_attention(be, &out, &qkv, &s, lse);
            char what[160];
            attn_describe(what, sizeof what, c, &qkv, &out);
            if (!with_lse) strncat(what, " no lse", sizeof what - strlen(what) - 1);
            int guard = mat_guard_ok(&out);
            report("attention", what, compare(out.f, want, NULL, s.T, out.cols, out.ld, TOL_ATTN), TOL_ATTN, guard,
                   guard_note(guard));
            if (lse) report("attention lse", what, compare(lse, want_lse, NULL, s.T, c->H, c->H, TOL_ATTN), TOL_ATTN, 1,
                            NULL);
            free(lse), free(want), free(want_lse), free(s.seq_start);
            mat_free(&qkv), mat_free(&out);
        }
}

/* L(q, k, v) = sum(dout * attention(q, k, v)) */
typedef struct {
    const mat *qkv, *dout;
    const attn_shape *s;
    double *out;
} attn_objective;

static double attn_L(void *ctx)
{
    attn_objective *o = ctx;
    ref_attention_on(o->out, o->dout->ld, o->qkv, o->s, NULL);
    return dot_valid(o->dout, o->out);
}

static void test_attention_backward(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof ATTN_CASES / sizeof ATTN_CASES[0]; i++) {
        const attn_case *c = &ATTN_CASES[i];
        attn_shape s = attn_shape_of(c);
        int width = (c->H + 2 * c->Hkv) * c->Dh, HD = c->H * c->Dh;
        mat qkv = mat_new(s.T, width, width + c->pad_qkv), dqkv = mat_new(s.T, width, width + c->pad_qkv);
        mat out = mat_new(s.T, HD, HD + c->pad_o), dout = mat_new(s.T, HD, HD + c->pad_o);
        mat_randn(&qkv, r, 1.5), mat_randn(&dout, r, 1), mat_fill(&dqkv, NAN);
        /* the forward's out and lse, from the reference, rounded */
        double *lse_d = dvec((size_t)s.T * c->H);
        ref_attention_on(out.d, out.ld, &qkv, &s, lse_d);
        float *lse = fvec((size_t)s.T * c->H);
        for (int k = 0; k < s.T * c->H; k++) lse[k] = (float)lse_d[k];
        for (int t = 0; t < s.T; t++)
            for (int k = 0; k < HD; k++) out.f[(size_t)t * out.ld + k] = (float)out.d[(size_t)t * out.ld + k];
        double *want = dvec((size_t)s.T * qkv.ld);
        ref_attention_backward(want, want + HD, want + HD + c->Hkv * c->Dh, dout.d, dout.ld, qkv.d, qkv.d + HD,
                               qkv.d + HD + c->Hkv * c->Dh, qkv.ld, s.seq_start, s.n_seqs, c->H, c->Hkv, c->Dh);
        call_attention_backward(be, &dqkv, &dout, &out, &qkv, lse, &s);
        char what[160];
        attn_describe(what, sizeof what, c, &qkv, &out);
        int guard = mat_guard_ok(&dqkv);
        report("attention_backward", what, compare(dqkv.f, want, NULL, s.T, width, dqkv.ld, TOL_ATTN_BWD), TOL_ATTN_BWD,
               guard, guard_note(guard));
        attn_objective o = {&qkv, &dout, &s, dvec((size_t)s.T * dout.ld)};
        report("attention_backward fin.diff", what,
               fd_check(attn_L, &o, &qkv, dqkv.f, dqkv.ld, FD_COORDS, r, TOL_FD), TOL_FD, 1, NULL);
        free(o.out), free(lse_d), free(lse), free(want), free(s.seq_start);
        mat_free(&qkv), mat_free(&dqkv), mat_free(&out), mat_free(&dout);
    }
}

typedef struct {
    int n, H, Hkv, Dh, n0;
    int n1[8];
    int shares; /* bit i: sequence i attends to the shared prompt too */
} decode_case;

/* one sequence with one key; a group of 12 query heads (more than one task's 8); a group of 3 split into
 * tasks of 2 + 1 heads (with 3 threads); sequences with and without the shared prompt; an odd head_dim; own
 * spans past 64 keys */
static const decode_case DECODE_CASES[] = {
    {1, 1, 1, 8, 0, {1}, 0},
    {1, 12, 1, 64, 5, {3}, 1},
    {3, 6, 2, 24, 4, {2, 5, 1}, 0x5},
    {3, 4, 2, 17, 0, {1, 2, 65}, 0},
    {5, 9, 3, 32, 17, {1, 4, 9, 2, 30}, 0x15},
    {8, 16, 2, 16, 33, {1, 2, 3, 4, 5, 6, 7, 70}, 0xFF},
};

static void test_attention_decode(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof DECODE_CASES / sizeof DECODE_CASES[0]; i++) {
        const decode_case *c = &DECODE_CASES[i];
        int HD = c->H * c->Dh, KV = c->Hkv * c->Dh, ld_kv = KV + 3, max_keys = 1;
        mat q = mat_new(c->n, HD, HD + 2 * KV + 1), out = mat_new(c->n, HD, HD + 2); /* q: part of a q|k|v row */
        mat k0 = mat_new(c->n0 ? c->n0 : 1, KV, ld_kv), v0 = mat_new(c->n0 ? c->n0 : 1, KV, ld_kv);
        mat k1[8], v1[8];
        tk_kv_view views[8];
        ref_kv_view rviews[8];
        mat_randn(&q, r, 1.5), mat_randn(&k0, r, 1), mat_randn(&v0, r, 1), mat_fill(&out, NAN);
        for (int s = 0; s < c->n; s++) {
            int shares = (c->shares >> s) & 1, n0 = shares ? c->n0 : 0;
            k1[s] = mat_new(c->n1[s], KV, ld_kv), v1[s] = mat_new(c->n1[s], KV, ld_kv);
            mat_randn(&k1[s], r, 1), mat_randn(&v1[s], r, 1);
            views[s] = (tk_kv_view){n0 ? k0.f : NULL, n0 ? v0.f : NULL, n0, k1[s].f, v1[s].f, c->n1[s]};
            rviews[s] = (ref_kv_view){k0.d, v0.d, n0, k1[s].d, v1[s].d, c->n1[s]};
            if (n0 + c->n1[s] > max_keys) max_keys = n0 + c->n1[s];
        }
        double *want = dvec((size_t)c->n * out.ld);
        ref_attention_decode(want, out.ld, q.d, q.ld, rviews, c->n, c->H, c->Hkv, c->Dh, ld_kv);
        call_attention_decode(be, &out, &q, views, c->n, c->H, c->Hkv, c->Dh, ld_kv, max_keys);
        char what[160];
        int k = snprintf(what, sizeof what, "n=%d H=%d Hkv=%d Dh=%d ld_kv=%d keys (shared+own)", c->n, c->H, c->Hkv,
                         c->Dh, ld_kv);
        for (int s = 0; s < c->n && (size_t)k < sizeof what; s++)
            k += snprintf(what + k, sizeof what - (size_t)k, " %d+%d", views[s].n0, c->n1[s]);
        int guard = mat_guard_ok(&out);
        report("attention_decode", what, compare(out.f, want, NULL, c->n, HD, out.ld, TOL_ATTN), TOL_ATTN, guard,
               guard_note(guard));
        free(want);
        for (int s = 0; s < c->n; s++) mat_free(&k1[s]), mat_free(&v1[s]);
        mat_free(&q), mat_free(&out), mat_free(&k0), mat_free(&v0);
    }
}

/* ==== tk_dequantize (not a backend op: run once) ==================================================== */

static void test_dequantize(rng_t *r)
{
    for (int ti = 0; ti < qref_n_types; ti++) {
        const qref_type *t = &qref_types[ti];
        int ok = tk_quant_block_elems(t->type) == t->elems && tk_quant_block_bytes(t->type) == t->bytes;
        /* F16 / BF16: all 65536 bit patterns (NaN payloads, infinities, subnormals, -0); others: random blocks */
        size_t n_blocks = t->elems == 1 && t->bytes == 2 ? 65536 : t->elems == 1 ? 1024 : 4096 / (size_t)t->elems + 3;
        size_t n = n_blocks * (size_t)t->elems;
        uint8_t *src = malloc(n_blocks * t->bytes + 1), *unaligned = src + 1; /* blocks need no alignment */
        qref_random_blocks(unaligned, t, n_blocks, r, ti % 2);
        if (t->elems == 1 && t->bytes == 2)
            for (size_t k = 0; k < n; k++) unaligned[2 * k] = (uint8_t)k, unaligned[2 * k + 1] = (uint8_t)(k >> 8);
        float *got = fvec(n), *want = fvec(n);
        tk_dequantize(got, unaligned, t->type, n);
        for (size_t b = 0; b < n_blocks; b++)
            for (int e = 0; e < t->elems; e++)
                want[b * t->elems + e] = qref_element(t, unaligned + b * t->bytes, e);
        size_t bad = 0, first = 0;
        for (size_t k = 0; k < n; k++)
            if (memcmp(&got[k], &want[k], sizeof(float)) != 0 && !bad++) first = k;
        char what[96], detail[160] = "";
        snprintf(what, sizeof what, "%s: %zu elements, bit for bit%s", t->name, n, ti % 2 ? " (extreme scales)" : "");
        if (bad)
            snprintf(detail, sizeof detail, "%zu differ, first [%zu]: %.9g instead of %.9g", bad, first, got[first],
                     want[first]);
        else if (!ok)
            snprintf(detail, sizeof detail, "block size %d / %zu bytes, expected %d / %zu", tk_quant_block_elems(t->type),
                     tk_quant_block_bytes(t->type), t->elems, t->bytes);
        report_bool("tk_dequantize", what, ok && !bad, detail);
        free(src), free(got), free(want);
    }
}

/* ==== main ======================================================================================== */

typedef struct {
    const char *name;
    void (*fn)(tk_backend *be, rng_t *r);
} op_test;

static const op_test OP_TESTS[] = {
    {"matmul_nt", test_matmul_nt},
    {"matmul_nn", test_matmul_nn},
    {"matmul_nt_q", test_matmul_nt_q},
    {"matmul_tn_acc", test_matmul_tn_acc},
    {"embed", test_embed},
    {"rmsnorm", test_rmsnorm},
    {"rmsnorm_backward", test_rmsnorm_backward},
    {"add_bias", test_add_bias},
    {"rope", test_rope},
    {"swiglu", test_swiglu},
    {"swiglu_backward", test_swiglu_backward},
    {"logsumexp", test_logsumexp},
    {"softmax_scale", test_softmax_scale},
    {"attention", test_attention},
    {"attention_backward", test_attention_backward},
    {"attention_decode", test_attention_decode},
};

/* The backends this build has, each with a thread count (the CPU one splits work over a pool: 1 thread
 * runs everything on the caller, 3 splits odd ways). */
typedef struct {
    const char *label;
    int threads;
    tk_backend *(*create)(int threads, void **state);
    void (*destroy)(tk_backend *be, void *state);
} backend_kind;

static tk_backend *cpu_create(int threads, void **state)
{
    tk_pool *pool;
    if (tk_pool_create(&pool, threads) != TK_OK) return NULL;
    *state = pool;
    return tk_cpu_backend_create(pool);
}

static void cpu_destroy(tk_backend *be, void *state)
{
    tk_cpu_backend_free(be);
    tk_pool_free(state);
}

/* a CUDA build adds its backend here (under its build macro), run against the same references */
static const backend_kind BACKENDS[] = {
    {"cpu/1 thread", 1, cpu_create, cpu_destroy},
    {"cpu/3 threads", 3, cpu_create, cpu_destroy},
};

static int g_argc;
static char **g_argv;

/* with name arguments, only tests whose name contains one of them */
static int selected(const char *name)
{
    int any = 0;
    for (int i = 1; i < g_argc; i++) {
        any = 1;
        if (strstr(name, g_argv[i])) return 1;
    }
    return !any;
}

int main(int argc, char **argv)
{
    g_argc = argc, g_argv = argv;
    rng_t r = {20240611};
    if (selected("tk_dequantize")) test_dequantize(&r);
    for (size_t b = 0; b < sizeof BACKENDS / sizeof BACKENDS[0]; b++) {
        void *state = NULL;
        tk_backend *be = BACKENDS[b].create(BACKENDS[b].threads, &state);
        g_backend_label = BACKENDS[b].label;
        if (!be) {
            report_bool("(create)", "the backend could not be created", 0, tk_last_error());
            continue;
        }
        for (size_t i = 0; i < sizeof OP_TESTS / sizeof OP_TESTS[0]; i++) {
            if (!selected(OP_TESTS[i].name)) continue;
            rng_t op_rng = {r.s + i * 7919}; /* each op's inputs do not depend on which others ran */
            OP_TESTS[i].fn(be, &op_rng);
        }
        BACKENDS[b].destroy(be, state);
    }
    printf("%d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
