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
 *   and matmul_w_t (input gradients) and matmul_tn_acc (weight gradient).
 * - base weights (tk_weight) of each of the 11 storage types, and of several
 *   parts of different types (a Q4_K_M file's q|k|v: Q4_K rows then Q6_K
 *   rows; three parts, one of them F32; parts starting off a 16-row group),
 *   built as the loader builds them (weight_bytes, a zeroed aligned alloc,
 *   weight_put_row of unaligned file rows in shuffled order): matmul_w,
 *   matmul_w_decode and matmul_w_t against the float64 product with the
 *   tk_dequantize'd matrix for T = 1, 2, 7, 9, 17, 64, 65, 300 (the decode
 *   kernels and the decoded panels), N = 1 and N not a multiple of 16, K of
 *   one block up to 16384 (several panels), beta 0 with a NaN y, beta 1 and
 *   another; exact decoding (x = identity rows gives W^T, W through
 *   matmul_w_t, on weights of extreme scales); embed bit for bit the
 *   tk_dequantize rows (NaN and infinite F16 / BF16 included).
 * - matmul_w_grouped / matmul_w_t_grouped (an MoE layer's experts in one
 *   call): groups of 0, 1 and tens of rows through experts of F32, BF16,
 *   F16, tiled and K-quant types and of two parts (one off a 16-row group),
 *   prefill and decoding, against each group's float64 product.
 * - matmul_nt's rows bit for bit the same whatever other rows share the call (the rows of a prompt prefilled
 *   after a cached prefix equal the same rows of a whole prefill); matmul_nt_decode against the reference.
 * - attention_cached (a prefill resumed over cached rows) against the reference and, bit for bit, against
 *   attention's rows over the whole sequences.
 * - memory (alloc zeroed and 64-byte aligned, upload / download, copy_rows,
 *   sync), the MoE block's row ops (add_rows with repeated destinations and
 *   scales, scale_rows, row_dot, zero_rows; strided, padding untouched),
 *   gather / scatter_add (repeats accumulate in order), sum_squares
 *   (a double sum, the same for every thread count), adamw (bit for bit
 *   torch's float32 operations, and within 1e-6 of the float64 formula),
 *   rope_table (cosf / sinf of the float32 angle, within 1 ulp of float64; one position component per row,
 *   and M-RoPE's three with a per-frequency axis map).
 * - a vision tower's forward ops: attention_full (bidirectional within each packed sequence), layer_norm (with
 *   bias, rows far from zero mean), gelu (erf, tanh and quick forms) against float64.
 * - the backend is made by the factory the engine is given and released as
 *   the engine releases it (tk_backend_release: refcount, destroy).
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
 * OpenBLAS's SkylakeX, Haswell, Sandybridge and Prescott kernels. A backend
 * whose base weights round (backend.h's weight_rounding: bf16 on CUDA) has
 * its weight ops held to the float64 product of the rounded operands (each
 * non-F32 part's values and the x it multiplies rounded to bf16) within
 * TOL_MATMUL_ROUNDED, and its exact-decode and embed checks to the rounded
 * values exactly; the CPU backends' checks are unchanged by it.
 *
 * Lines starting "same" / "DIFF" are notes, not checks: whether a row of a
 * many-row weight matmul equals the row computed alone (see rows_alone_equal).
 */
#include <math.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/devsim/devsim_backend.h"
#ifdef TK_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#include "io/quant.h"
#include "harness.h"
#include "quant_ref.h"
#include "reference.h"

/* matmul_nt / nn / tn_acc / _w / _w_decode / _w_t: scale = the sum of the absolute terms, |alpha| sum|x w| + |beta y|: float32
 * summation error is relative to that, not to a result that may cancel to ~0 */
static const tol_t TOL_MATMUL = {1e-30, 2e-6, 0};
/* matmul_w and its kin on a backend whose weights and activations round (weight_rounding != 0, bf16 on CUDA):
 * against the float64 product of the rounded operands, whose products are exact in float32, so only the
 * float32 sums differ. Tensor cores sum with truncation (Fasi et al. 2021), an error that grows with the K / 16
 * steps of the sum rather than its square root: estimated at ~6e-7 of the scale for K = 16384 with N(0, 1)
 * terms; 1e-5 allows that 15 times over and still sees an operand rounded otherwise (x truncated, or not rounded,
 * errs by ~2^-9 / sqrt(K) of the scale: 3.5e-4 at K = 32). */
static const tol_t TOL_MATMUL_ROUNDED = {1e-30, 1e-5, 0};
static const tol_t TOL_EXACT = {0, 0, 1};             /* embed, decoded weights, gather: got == ref */
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

/* ---- device copies of a call's host arrays ----
 * The ops take device buffers; the tests build host arrays (mats, vectors). A call wrapper hands the op device
 * copies: IN (uploaded), OUT (uploaded, then downloaded back over the host array when the call ends: outputs,
 * arrays updated in place), MIN / MOUT for a whole mat. A range inside one already copied for this call is the
 * same copy at its offset (in-place ops; pointers into a mat: D(p) translates those). dev_end downloads the
 * outputs and frees the copies. On a backend whose buffers are host memory this costs a memcpy each way; on
 * devsim (and a GPU) the host arrays are never touched by an op. Workspaces are backend buffers (dev_work). */
enum { MAX_DEV_ARGS = 256 };
typedef struct {
    const char *host;
    size_t bytes;
    char *dev;
    int out;
} dev_arg;
static dev_arg g_dev[MAX_DEV_ARGS];
static int g_n_dev;

static void dev_fatal(const char *what)
{
    fprintf(stderr, "test harness: %s\n", what);
    exit(2);
}

/* the device copy of host[0 .. bytes) */
static void *dev_copy(tk_backend *be, const void *host, size_t bytes, int out)
{
    if (!host) return NULL;
    const char *h = host;
    for (int i = 0; i < g_n_dev; i++)
        if (h >= g_dev[i].host && h + bytes <= g_dev[i].host + g_dev[i].bytes) {
            g_dev[i].out |= out;
            return g_dev[i].dev + (h - g_dev[i].host);
        }
    if (g_n_dev == MAX_DEV_ARGS) dev_fatal("too many device copies in one call");
    char *d = be->alloc(be, bytes ? bytes : 64);
    if (!d) dev_fatal("the backend could not allocate a device copy");
    be->upload(be, d, host, bytes);
    g_dev[g_n_dev++] = (dev_arg){h, bytes, d, out};
    return d;
}

/* a host pointer inside a range copied for this call, as the device sees it */
static void *dev_ptr(const void *host)
{
    if (!host) return NULL;
    const char *h = host;
    for (int i = 0; i < g_n_dev; i++)
        if (h >= g_dev[i].host && h <= g_dev[i].host + g_dev[i].bytes) return g_dev[i].dev + (h - g_dev[i].host);
    dev_fatal("a pointer outside every array copied for the call");
    return NULL;
}

/* a workspace of n floats on the device, NaN-filled (reading it before writing it shows) */
static float *dev_work(tk_backend *be, size_t n)
{
    float *host = fvec(n ? n : 1);
    for (size_t i = 0; i < n; i++) host[i] = NAN;
    float *d = dev_copy(be, host, n * sizeof(float), 0);
    g_dev[g_n_dev - 1].host = NULL; /* never matched, never downloaded */
    free(host);
    return d;
}

static void dev_end(tk_backend *be)
{
    if (be->sync(be) != TK_OK) report_bool("(sync)", "the call's device work", 0, tk_last_error());
    for (int i = 0; i < g_n_dev; i++) {
        if (g_dev[i].out && g_dev[i].host) be->download(be, (void *)g_dev[i].host, g_dev[i].dev, g_dev[i].bytes);
        be->free(be, g_dev[i].dev);
    }
    g_n_dev = 0;
}

/* floats of `rows` rows of `cols` values at stride ld (the last row's padding excluded) */
static size_t span(int rows, int ld, int cols) { return rows > 0 ? (size_t)(rows - 1) * ld + (size_t)cols : 0; }

#define IN(p, floats) ((__typeof__(p))dev_copy(be, (p), (size_t)(floats) * sizeof *(p), 0))
#define OUT(p, floats) ((__typeof__(p))dev_copy(be, (p), (size_t)(floats) * sizeof *(p), 1))
#define MIN(m) ((const float *)dev_copy(be, (m)->f, (size_t)(m)->rows * (m)->ld * sizeof(float), 0))
#define MOUT(m) ((float *)dev_copy(be, (m)->f, (size_t)(m)->rows * (m)->ld * sizeof(float), 1))
#define D(p) ((__typeof__(p))dev_ptr(p))

static void call_matmul_nt(tk_backend *be, mat *y, const mat *x, const mat *w, float alpha, float beta)
{
    /* w rows are contiguous: w->ld == K */
    be->matmul_nt(be, MOUT(y), y->ld, MIN(x), x->ld, MIN(w), x->rows, y->cols, x->cols, alpha, beta);
    dev_end(be);
}

/* rows [first, first + rows) of x and y only (a resumed prefill's new rows) */
static void call_matmul_nt_rows(tk_backend *be, mat *y, const mat *x, const mat *w, int first, int rows, float alpha,
                                float beta)
{
    float *yd = MOUT(y);
    const float *xd = MIN(x);
    be->matmul_nt(be, yd + (size_t)first * y->ld, y->ld, xd + (size_t)first * x->ld, x->ld, MIN(w), rows, y->cols,
                  x->cols, alpha, beta);
    dev_end(be);
}

static void call_matmul_nt_decode(tk_backend *be, mat *y, const mat *x, const mat *w, float alpha, float beta)
{
    be->matmul_nt_decode(be, MOUT(y), y->ld, MIN(x), x->ld, MIN(w), x->rows, y->cols, x->cols, alpha, beta);
    dev_end(be);
}

/* jobs over host mats: each job's y, x and w copied (y downloaded back) */
static void call_matmul_nt_many(tk_backend *be, const tk_nt_job *jobs, int n, int decoding)
{
    tk_nt_job *d = calloc((size_t)(n ? n : 1), sizeof *d);
    for (int j = 0; j < n; j++) {
        d[j] = jobs[j];
        d[j].y = OUT(jobs[j].y, span(jobs[j].T, jobs[j].ldy, jobs[j].N));
        d[j].x = IN(jobs[j].x, span(jobs[j].T, jobs[j].ldx, jobs[j].K));
        d[j].w = IN(jobs[j].w, (size_t)jobs[j].N * jobs[j].K);
    }
    be->matmul_nt_many(be, d, n, decoding);
    dev_end(be);
    free(d);
}

static void call_matmul_nn(tk_backend *be, mat *y, const mat *x, const mat *w, float alpha, float beta)
{
    be->matmul_nn(be, MOUT(y), y->ld, MIN(x), x->ld, MIN(w), w->ld, x->rows, y->cols, x->cols, alpha, beta);
    dev_end(be);
}

static void call_matmul_tn_acc(tk_backend *be, mat *g, const mat *a, const mat *b, float alpha)
{
    be->matmul_tn_acc(be, MOUT(g), g->ld, MIN(a), a->ld, MIN(b), b->ld, a->rows, g->rows, g->cols, alpha);
    dev_end(be);
}

/* ---- base weights (their parts are backend buffers already: made by the loader's steps below) ---- */

static size_t call_weight_bytes(tk_backend *be, int type, int rows, int cols)
{
    return be->weight_bytes(be, type, rows, cols);
}

static void call_weight_put_row(tk_backend *be, const tk_weight_part *p, int cols, int row, const void *src)
{
    be->weight_put_row(be, p, cols, row, src);
}

/* y[T, rows] = alpha x[T, cols] W^T + beta y */
static void call_matmul_w(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                          float alpha, float beta)
{
    be->matmul_w(be, OUT(y, span(T, ldy, w->rows)), ldy, IN(x, span(T, ldx, w->cols)), ldx, w, T, alpha, beta);
    dev_end(be);
}

static void call_matmul_w_decode(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w,
                                 int T, float alpha, float beta)
{
    be->matmul_w_decode(be, OUT(y, span(T, ldy, w->rows)), ldy, IN(x, span(T, ldx, w->cols)), ldx, w, T, alpha,
                        beta);
    dev_end(be);
}

/* y[T, cols] = alpha x[T, rows] W + beta y */
static void call_matmul_w_t(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                            float alpha, float beta)
{
    be->matmul_w_t(be, OUT(y, span(T, ldy, w->cols)), ldy, IN(x, span(T, ldx, w->rows)), ldx, w, T, alpha, beta);
    dev_end(be);
}

/* the groups' rows of y through w[g] (MoE experts) */
static void call_matmul_w_grouped(tk_backend *be, mat *y, const mat *x, const tk_weight *w, const int32_t *start,
                                  int n_groups, float alpha, float beta, int decoding)
{
    be->matmul_w_grouped(be, MOUT(y), y->ld, MIN(x), x->ld, w, start, n_groups, alpha, beta, decoding);
    dev_end(be);
}

static void call_matmul_w_t_grouped(tk_backend *be, mat *y, const mat *x, const tk_weight *w, const int32_t *start,
                                    int n_groups, float alpha, float beta)
{
    be->matmul_w_t_grouped(be, MOUT(y), y->ld, MIN(x), x->ld, w, start, n_groups, alpha, beta);
    dev_end(be);
}

static void call_embed(tk_backend *be, float *x, const tk_weight *table, const int32_t *tokens, int T)
{
    be->embed(be, OUT(x, (size_t)T * table->cols), table, tokens, T);
    dev_end(be);
}

/* ---- memory (the ops under test move the bytes themselves) ---- */

static void *call_alloc(tk_backend *be, size_t bytes) { return be->alloc(be, bytes); }
static void call_free(tk_backend *be, void *buffer) { be->free(be, buffer); }
static void call_upload(tk_backend *be, void *dst, const void *host, size_t bytes) { be->upload(be, dst, host, bytes); }
static void call_download(tk_backend *be, void *host, const void *src, size_t bytes)
{
    be->download(be, host, src, bytes);
}
static void call_copy_rows(tk_backend *be, float *const *dst, const float *const *src, int rows, int n)
{
    be->copy_rows(be, dst, src, rows, n);
}
static tk_status call_sync(tk_backend *be) { return be->sync(be); }

/* ---- rows (the MoE block) ---- */

/* dst / src: rows of the mats dst_m / src_m (host pointers, translated here) */
static void call_add_rows(tk_backend *be, mat *dst_m, const mat *src_m, float *const *dst, const float *const *src,
                          const float *scale, int rows, int n)
{
    MOUT(dst_m), MIN(src_m);
    float **dd = malloc((size_t)(rows ? rows : 1) * sizeof *dd);
    const float **sd = malloc((size_t)(rows ? rows : 1) * sizeof *sd);
    for (int i = 0; i < rows; i++) dd[i] = D(dst[i]), sd[i] = D(src[i]);
    be->add_rows(be, dd, sd, scale, rows, n);
    dev_end(be);
    free(dd), free(sd);
}
static void call_scale_rows(tk_backend *be, mat *x, const float *scale)
{
    be->scale_rows(be, MOUT(x), x->ld, scale, x->rows, x->cols);
    dev_end(be);
}
static void call_row_dot(tk_backend *be, float *out, const mat *a, const mat *b)
{
    be->row_dot(be, OUT(out, a->rows), MIN(a), a->ld, MIN(b), b->ld, a->rows, a->cols);
    dev_end(be);
}
static void call_zero_rows(tk_backend *be, mat *x)
{
    be->zero_rows(be, MOUT(x), x->ld, x->rows, x->cols);
    dev_end(be);
}

/* ---- indexing, the optimizer ---- */

static void call_gather(tk_backend *be, float *out, const mat *x, const int32_t *row, const int32_t *col, int n)
{
    be->gather(be, OUT(out, n), MIN(x), x->ld, row, col, n);
    dev_end(be);
}

static void call_scatter_add(tk_backend *be, mat *x, const int32_t *row, const int32_t *col, const float *val, int n)
{
    be->scatter_add(be, MOUT(x), x->ld, row, col, IN(val, n), n);
    dev_end(be);
}

static double call_sum_squares(tk_backend *be, const float *x, size_t n)
{
    double s = be->sum_squares(be, IN(x, n), n);
    dev_end(be);
    return s;
}

static void call_adamw(tk_backend *be, float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f)
{
    be->adamw(be, OUT(p, n), OUT(g, n), OUT(m, n), OUT(v, n), n, f);
    dev_end(be);
}

static float call_adamw_peak(tk_backend *be, const float *p, const float *g, const float *m, const float *v, size_t n,
                             const tk_adamw_factors *f)
{
    float peak = be->adamw_peak(be, IN(p, n), IN(g, n), IN(m, n), IN(v, n), n, f);
    dev_end(be);
    return peak;
}

static void call_rope_table(tk_backend *be, float *cos, float *sin, const int32_t *pos, int pos_dims, int rows,
                            const float *inv_freq, const int8_t *axis, int half)
{
    be->rope_table(be, OUT(cos, (size_t)rows * half), OUT(sin, (size_t)rows * half), pos, pos_dims, rows,
                   IN(inv_freq, half), axis, half);
    dev_end(be);
}

/* y may be x (in place) */
static void call_rmsnorm(tk_backend *be, mat *y, const mat *x, const mat *w, float eps, float *inv_rms)
{
    float *yd = MOUT(y);
    be->rmsnorm(be, yd, y->ld, MIN(x), x->ld, MIN(w), x->rows, x->cols, eps, OUT(inv_rms, x->rows));
    dev_end(be);
}

static void call_rmsnorm_backward(tk_backend *be, mat *dx, const mat *dy, const mat *x, const mat *w,
                                  const float *inv_rms, int accumulate)
{
    be->rmsnorm_backward(be, MOUT(dx), dx->ld, MIN(dy), dy->ld, MIN(x), x->ld, MIN(w), IN(inv_rms, x->rows), x->rows,
                         x->cols, accumulate);
    dev_end(be);
}

static void call_add_bias(tk_backend *be, mat *y, const mat *b)
{
    be->add_bias(be, MOUT(y), y->ld, MIN(b), y->rows, y->cols);
    dev_end(be);
}

/* heads start at column col0 of x */
static void call_rope(tk_backend *be, mat *x, int col0, int n_heads, int head_dim, const mat *cos, const mat *sin,
                      int inverse)
{
    be->rope(be, MOUT(x) + col0, x->ld, x->rows, n_heads, head_dim, MIN(cos), MIN(sin), inverse);
    dev_end(be);
}

static void call_swiglu(tk_backend *be, mat *act, const mat *gate_up)
{
    be->swiglu(be, MOUT(act), MIN(gate_up), act->rows, act->cols);
    dev_end(be);
}

static void call_swiglu_backward(tk_backend *be, mat *dgate_up, const mat *dact, const mat *gate_up)
{
    be->swiglu_backward(be, MOUT(dgate_up), MIN(dact), MIN(gate_up), dact->rows, dact->cols);
    dev_end(be);
}

static void call_logsumexp(tk_backend *be, float *lse, const mat *x)
{
    be->logsumexp(be, OUT(lse, x->rows), MIN(x), x->ld, x->rows, x->cols);
    dev_end(be);
}

static void call_softmax_scale(tk_backend *be, mat *x, const float *lse, const float *g)
{
    be->softmax_scale(be, MOUT(x), x->ld, IN(lse, x->rows), IN(g, x->rows), x->rows, x->cols);
    dev_end(be);
}

/* An attention problem: packed sequences, q | k | v side by side in one [T, ldqkv] buffer. */
typedef struct {
    int H, Hkv, Dh, n_seqs, T, max_len;
    int32_t *seq_start;
} attn_shape;

static void call_attention(tk_backend *be, mat *out, const mat *qkv, const attn_shape *s, float *lse)
{
    float *work = dev_work(be, be->attention_workspace(be, s->T, s->max_len, s->H, s->Dh));
    const float *q = MIN(qkv), *k = q + s->H * s->Dh, *v = k + s->Hkv * s->Dh;
    be->attention(be, MOUT(out), out->ld, q, k, v, qkv->ld, s->seq_start, s->n_seqs, s->H, s->Hkv, s->Dh,
                  OUT(lse, (size_t)s->T * s->H), work);
    dev_end(be);
}

/* bidirectional, multi-head (q, k, v of H heads each) */
static void call_attention_full(tk_backend *be, mat *out, const mat *qkv, const attn_shape *s)
{
    float *work = dev_work(be, be->attention_workspace(be, s->T, s->max_len, s->H, s->Dh));
    const float *q = MIN(qkv), *k = q + s->H * s->Dh, *v = k + s->H * s->Dh;
    be->attention_full(be, MOUT(out), out->ld, q, k, v, qkv->ld, s->seq_start, s->n_seqs, s->H, s->Dh, work);
    dev_end(be);
}

static void call_layer_norm(tk_backend *be, mat *y, const mat *x, const mat *w, const mat *b, float eps)
{
    float *yd = MOUT(y);
    be->layer_norm(be, yd, y->ld, MIN(x), x->ld, MIN(w), MIN(b), x->rows, x->cols, eps);
    dev_end(be);
}

static void call_gelu(tk_backend *be, mat *y, const mat *x, int kind)
{
    float *yd = MOUT(y);
    be->gelu(be, yd, y->ld, MIN(x), x->ld, x->rows, x->cols, kind);
    dev_end(be);
}

static void call_attention_backward(tk_backend *be, mat *dqkv, const mat *dout, const mat *out, const mat *qkv,
                                    const float *lse, const attn_shape *s)
{
    float *work = dev_work(be, be->attention_backward_workspace(be, s->T, s->max_len, s->H, s->Dh));
    const float *q = MIN(qkv), *k = q + s->H * s->Dh, *v = k + s->Hkv * s->Dh;
    float *dq = MOUT(dqkv), *dk = dq + s->H * s->Dh, *dv = dk + s->Hkv * s->Dh;
    be->attention_backward(be, dq, dk, dv, MIN(dout), MIN(out), out->ld, q, k, v, qkv->ld,
                           IN(lse, (size_t)s->T * s->H), s->seq_start, s->n_seqs, s->H, s->Hkv, s->Dh, work);
    dev_end(be);
}

/* the views' key and value rows (n of them, rows of ld_kv, KV floats used) as device views */
static void device_views(tk_backend *be, tk_kv_view *out, const tk_kv_view *views, int n, int ld_kv, int KV)
{
    for (int i = 0; i < n; i++)
        out[i] = (tk_kv_view){IN(views[i].k0, span(views[i].n0, ld_kv, KV)), IN(views[i].v0, span(views[i].n0, ld_kv, KV)),
                              views[i].n0, IN(views[i].k1, span(views[i].n1, ld_kv, KV)),
                              IN(views[i].v1, span(views[i].n1, ld_kv, KV)), views[i].n1};
}

static void call_attention_decode(tk_backend *be, mat *out, const mat *q, const tk_kv_view *views, int n, int H,
                                  int Hkv, int Dh, int ld_kv, int max_keys)
{
    float *work = dev_work(be, be->attention_decode_workspace(be, max_keys));
    tk_kv_view dv[8];
    if (n > 8) dev_fatal("attention_decode: more than 8 views");
    device_views(be, dv, views, n, ld_kv, Hkv * Dh);
    be->attention_decode(be, MOUT(out), out->ld, MIN(q), q->ld, dv, n, H, Hkv, Dh, ld_kv, work);
    dev_end(be);
}

/* new query rows over cached keys and values (views: n1 rows each, the new ones last) */
static void call_attention_cached(tk_backend *be, mat *out, const mat *q, const tk_kv_view *views,
                                  const int32_t *seq_start, int n_seqs, int H, int Hkv, int Dh, int ld_kv, int max_keys)
{
    float *work = dev_work(be, be->attention_cached_workspace(be, max_keys, Dh));
    tk_kv_view dv[8];
    if (n_seqs > 8) dev_fatal("attention_cached: more than 8 views");
    device_views(be, dv, views, n_seqs, ld_kv, Hkv * Dh);
    be->attention_cached(be, MOUT(out), out->ld, MIN(q), q->ld, dv, seq_start, n_seqs, H, Hkv, Dh, ld_kv, work);
    dev_end(be);
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
            mat y_dec = mat_new(s.T, s.N, s.N + s.pad_y);
            mat_copy(&y_dec, &y);
            call_matmul_nt(be, &y, &x, &w, alpha, beta);
            call_matmul_nt_decode(be, &y_dec, &x, &w, alpha, beta);
            char what[128];
            snprintf(what, sizeof what, "T=%d N=%d K=%d ldx=%d ldy=%d alpha=%g beta=%g", s.T, s.N, s.K, x.ld, y.ld,
                     alpha, beta);
            int guard = mat_guard_ok(&y), guard_dec = mat_guard_ok(&y_dec);
            report("matmul_nt", what, compare(y.f, want, scale, s.T, s.N, y.ld, TOL_MATMUL), TOL_MATMUL, guard,
                   guard_note(guard));
            report("matmul_nt_decode", what, compare(y_dec.f, want, scale, s.T, s.N, y.ld, TOL_MATMUL), TOL_MATMUL,
                   guard_dec, guard_note(guard_dec));
            mat_free(&y_dec);
            free(want), free(scale), free(ax), free(aw);
            mat_free(&x), mat_free(&w), mat_free(&y);
        }
}

/* matmul_nt's rows do not depend on the other rows of the call: the last rows of a call (a resumed prefill's
 * new rows), and rows alone, bit for bit the same rows of the whole call; K past one chunk (1024) and N past one
 * packed piece (128), beta 0 and 1. */
static void test_matmul_nt_rows(tk_backend *be, rng_t *r)
{
    static const int shapes[][3] = {{70, 200, 2500}, {40, 96, 576}, {9, 33, 1536}, {130, 1728, 32}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int beta = 0; beta <= 1; beta++) {
            int T = shapes[i][0], N = shapes[i][1], K = shapes[i][2], ok = 1;
            mat x = mat_new(T, K, K + 1), w = mat_new(N, K, K), y0 = mat_new(T, N, N), all = mat_new(T, N, N);
            mat_randn(&x, r, 1), mat_randn(&w, r, 1), mat_randn(&y0, r, 1);
            mat_copy(&all, &y0);
            call_matmul_nt(be, &all, &x, &w, 0.5f, (float)beta);
            static const int firsts[] = {1, 16, 63, -1};
            for (int f = 0; f < 4 && ok; f++) {
                int first = firsts[f] < 0 ? T - 1 : firsts[f] % T, rows = firsts[f] < 0 ? 1 : T - first;
                mat y = mat_new(T, N, N);
                mat_copy(&y, &y0);
                call_matmul_nt_rows(be, &y, &x, &w, first, rows, 0.5f, (float)beta);
                ok = memcmp(y.f + (size_t)first * N, all.f + (size_t)first * N, (size_t)rows * N * sizeof(float)) == 0;
                mat_free(&y);
            }
            char what[96];
            snprintf(what, sizeof what, "T=%d N=%d K=%d beta=%d: rows 1.., 16.., 63.., the last alone", T, N, K, beta);
            report_bool("matmul_nt rows", what, ok, "a row's result changed with the rows sharing the call");
            mat_free(&x), mat_free(&w), mat_free(&y0), mat_free(&all);
        }
}

/* matmul_nt_many: every job as its own call would give it. Jobs the shapes of a pass's LoRA terms: one-row
 * segments of a decoding step (A: 96 x 576, B: 576 x 32), several-row segments, a head-sized B (N 4000), a job of
 * no rows; counts below and above twice the threads (split jobs, one task each) and past 64 (more than one pool
 * run). Prefill (decoding 0): bit for bit matmul_nt's. Decoding: one-row jobs bit for bit matmul_nt_decode's
 * (the streaming kernel sums each output alone), others against the float64 reference (sgemm's rounding may
 * change with the split). */
static void test_matmul_nt_many(tk_backend *be, rng_t *r)
{
    static const int shapes[][3] = {{1, 96, 576}, {1, 576, 32}, {3, 96, 576}, {5, 1536, 32}, {1, 4000, 32},
                                    {0, 64, 32}, {17, 200, 300}};
    static const int counts[] = {1, 2, 7, 70};
    enum { NS = sizeof shapes / sizeof shapes[0] };
    for (int decoding = 0; decoding <= 1; decoding++)
        for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
            int n = counts[c], same = 1;
            cmp_t worst = {0};
            tk_nt_job *jobs = calloc((size_t)n, sizeof *jobs);
            mat *x = calloc((size_t)n, sizeof *x), *w = calloc((size_t)n, sizeof *w), *y = calloc((size_t)n, sizeof *y),
                *alone = calloc((size_t)n, sizeof *alone);
            double **want = calloc((size_t)n, sizeof *want), **scale = calloc((size_t)n, sizeof *scale);
            for (int j = 0; j < n; j++) {
                const int *sh = shapes[(j * 5 + (int)c) % NS];
                int T = sh[0], N = sh[1], K = sh[2];
                float beta = (float)(j % 2);
                x[j] = mat_new(T, K, K + 3), w[j] = mat_new(N, K, K), y[j] = mat_new(T, N, N + 1);
                alone[j] = mat_new(T, N, N + 1);
                mat_randn(&x[j], r, 1), mat_randn(&w[j], r, 1), mat_randn(&y[j], r, 1);
                mat_copy(&alone[j], &y[j]);
                want[j] = copy_of(&y[j]), scale[j] = abs_of(&y[j]);
                double *ax = abs_of(&x[j]), *aw = abs_of(&w[j]);
                ref_matmul_nt(want[j], y[j].ld, x[j].d, x[j].ld, w[j].d, w[j].ld, T, N, K, 0.25f, beta);
                ref_matmul_nt(scale[j], y[j].ld, ax, x[j].ld, aw, w[j].ld, T, N, K, 0.25f, beta);
                free(ax), free(aw);
                jobs[j] = (tk_nt_job){y[j].f, x[j].f, w[j].f, y[j].ld, x[j].ld, T, N, K, 0.25f, beta};
                (decoding ? call_matmul_nt_decode : call_matmul_nt)(be, &alone[j], &x[j], &w[j], 0.25f, beta);
            }
            call_matmul_nt_many(be, jobs, n, decoding);
            for (int j = 0; j < n; j++) {
                int T = jobs[j].T, N = jobs[j].N;
                if (!decoding || T == 1)
                    for (int t = 0; t < T; t++)
                        same &= memcmp(y[j].f + (size_t)t * y[j].ld, alone[j].f + (size_t)t * alone[j].ld,
                                       (size_t)N * sizeof(float)) == 0;
                worst = cmp_merge(worst, compare(y[j].f, want[j], scale[j], T, N, y[j].ld, TOL_MATMUL));
                same &= mat_guard_ok(&y[j]);
                free(want[j]), free(scale[j]);
                mat_free(&x[j]), mat_free(&w[j]), mat_free(&y[j]), mat_free(&alone[j]);
            }
            char what[96];
            snprintf(what, sizeof what, "%d jobs, decoding %d", n, decoding);
            report("matmul_nt_many", what, worst, TOL_MATMUL, same,
                   same ? "" : "a job's rows differ from its own call's (or its guard was written)");
            free(jobs), free(x), free(w), free(y), free(alone), free(want), free(scale);
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

/* ==== base weights: tk_weight handles of every storage type ====================================== */

/* The backend's weight_rounding (set per backend in main): 0 on the CPU backends, whose weight ops are held to
 * the exact tk_dequantize values; else (bf16 on CUDA) every part but F32 ones is held to its values rounded to
 * bf16, and the activations multiplied with such a part to theirs, within TOL_MATMUL_ROUNDED. */
static float g_rounding;

/* whether a part of `type` is resident rounded (F32 parts stay float32 on every backend) */
static int part_rounded(int type) { return g_rounding != 0 && type != TK_GGML_F32; }

/* the tolerance of a weight op's results: float32 sums of exact products (TOL_MATMUL_ROUNDED) where any part
 * rounds, else TOL_MATMUL */
static tol_t weight_tol(const tk_weight *w)
{
    for (int i = 0; i < w->n_parts; i++)
        if (part_rounded(w->part[i].type)) return TOL_MATMUL_ROUNDED;
    return TOL_MATMUL;
}

static float float_of_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* v rounded to bf16 (8 significant bits), to nearest, ties to the even one, chosen by comparing the distances
 * to the two neighbours in float64; a NaN keeps its sign and high mantissa bits (made quiet when those are 0) */
static float bf16_of(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if (isnan(v)) return float_of_bits((u & 0xffff0000u) | ((u & 0x007f0000u) ? 0 : 0x00400000u));
    if (isinf(v)) return v;
    uint32_t lo = u & 0xffff0000u, e = (lo >> 23) & 0xff;
    double ulp = ldexp(1.0, (e ? (int)e : 1) - 127 - 7), dlo = float_of_bits(lo);
    double dhi = dlo + (v < 0 ? -ulp : ulp), d_lo = fabs((double)v - dlo), d_hi = fabs(dhi - (double)v);
    int up = d_hi < d_lo || (d_hi == d_lo && ((lo >> 16) & 1));
    return float_of_bits(up ? lo + 0x10000u : lo); /* past the largest bf16: the infinity */
}

typedef struct {
    int type, rows;
} part_spec;

/* A weight built as the loader builds one (model/weights.c): each part's resident form in a zeroed, 64-byte
 * aligned backend buffer of weight_bytes, its rows stored one at a time (weight_put_row, in a shuffled order,
 * from the pool's threads, from unaligned file-format bytes). W holds the tk_dequantize values of the same
 * file rows. */
typedef struct {
    tk_weight w;
    mat W; /* [rows, cols] */
    mat R; /* the resident values the ops must multiply with: W, its non-F32 rows rounded when g_rounding */
    int ok;
} test_weight;

static const char *type_name(int type)
{
    const qref_type *t = qref_find(type);
    return t ? t->name : "?";
}

/* "Q4_K[70]+Q6_K[31]" */
static void describe_parts(char *buf, size_t n, const part_spec *parts, int n_parts)
{
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < n_parts && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%s[%d]", i ? "+" : "", type_name(parts[i].type), parts[i].rows);
}

static tk_pool *g_pool; /* the pool the backend runs on: rows are stored from its threads, as the loader does */

typedef struct {
    tk_backend *be;
    const tk_weight_part *p;
    const uint8_t *file;
    const int *order;
    size_t row_bytes;
    int cols, rows;
} put_rows_args;

enum { PUT_TASKS = 4 };

/* every PUT_TASKS-th row of the shuffled order */
static void put_rows_task(void *ctx, int task, int thread)
{
    (void)thread;
    put_rows_args *a = ctx;
    for (int k = task; k < a->rows; k += PUT_TASKS)
        call_weight_put_row(a->be, a->p, a->cols, a->order[k], a->file + (size_t)a->order[k] * a->row_bytes);
}

static test_weight make_weight(tk_backend *be, const part_spec *parts, int n_parts, int cols, rng_t *r, int mode)
{
    test_weight tw;
    memset(&tw, 0, sizeof tw);
    int N = 0;
    for (int i = 0; i < n_parts; i++) N += parts[i].rows;
    tw.w.rows = N, tw.w.cols = cols, tw.w.n_parts = n_parts, tw.ok = 1;
    tw.W = mat_new(N, cols, cols);
    for (int i = 0, row0 = 0; i < n_parts; row0 += parts[i].rows, i++) {
        const qref_type *t = qref_find(parts[i].type);
        int rows = parts[i].rows;
        tk_weight_part *p = &tw.w.part[i];
        *p = (tk_weight_part){parts[i].type, row0, rows, NULL};
        size_t bytes = call_weight_bytes(be, p->type, rows, cols);
        if (bytes == 0 || bytes % 64 || !(p->data = call_alloc(be, bytes)) || (uintptr_t)p->data % 64) {
            char what[96];
            snprintf(what, sizeof what, "%s rows=%d cols=%d: %zu bytes", t->name, rows, cols, bytes);
            report_bool("weight_bytes", what, 0, "0, not a multiple of 64, or its buffer not allocated / aligned");
            tw.ok = 0;
            continue;
        }
        size_t row_bytes = (size_t)cols / (size_t)t->elems * t->bytes;
        uint8_t *file = malloc((size_t)rows * row_bytes + 1), *at = file + 1; /* file rows are not aligned */
        int *order = malloc((size_t)rows * sizeof *order);
        qref_random_blocks(at, t, (size_t)rows * (size_t)cols / (size_t)t->elems, r, mode);
        for (int k = 0; k < rows; k++) order[k] = k;
        for (int k = rows - 1; k > 0; k--) { /* rows may be stored in any order (the loader uses threads) */
            int j = rng_int(r, 0, k), tmp = order[k];
            order[k] = order[j], order[j] = tmp;
        }
        put_rows_args args = {be, p, at, order, row_bytes, cols, rows};
        tk_pool_run(g_pool, PUT_TASKS, put_rows_task, &args);
        for (int k = 0; k < rows; k++)
            tk_dequantize(tw.W.f + (size_t)(row0 + k) * cols, at + (size_t)k * row_bytes, p->type, (size_t)cols);
        free(order), free(file);
    }
    mat_to_double(&tw.W);
    tw.R = mat_new(N, cols, cols);
    for (int i = 0; i < n_parts; i++)
        for (size_t j = (size_t)tw.w.part[i].row0 * cols; j < (size_t)(tw.w.part[i].row0 + parts[i].rows) * cols; j++)
            tw.R.f[j] = part_rounded(parts[i].type) ? bf16_of(tw.W.f[j]) : tw.W.f[j];
    mat_to_double(&tw.R);
    return tw;
}

static void free_weight(tk_backend *be, test_weight *tw)
{
    for (int i = 0; i < tw->w.n_parts; i++)
        if (tw->w.part[i].data) call_free(be, tw->w.part[i].data);
    mat_free(&tw->W);
    mat_free(&tw->R);
}

/* p[t * N + n] = sum_k x[t, k] w[n, k] and s[t * N + n] = sum_k |x[t, k] w[n, k]| (the scale of float32
 * summation error), in float64 */
static void product_nt(double *p, double *s, const double *x, int ldx, const double *w, int ldw, int T, int N, int K)
{
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            const double *xt = x + (size_t)t * ldx, *wn = w + (size_t)n * ldw;
            double sum[4] = {0}, abs_sum[4] = {0}; /* 4 partial sums: float64, so the order does not matter */
            int k = 0;
            for (; k + 4 <= K; k += 4)
                for (int j = 0; j < 4; j++) {
                    double term = xt[k + j] * wn[k + j];
                    sum[j] += term, abs_sum[j] += fabs(term);
                }
            for (; k < K; k++) sum[0] += xt[k] * wn[k], abs_sum[0] += fabs(xt[k] * wn[k]);
            p[(size_t)t * N + n] = (sum[0] + sum[1]) + (sum[2] + sum[3]);
            s[(size_t)t * N + n] = (abs_sum[0] + abs_sum[1]) + (abs_sum[2] + abs_sum[3]);
        }
}

/* The product a weight op computes, in float64 (p, and s the sum of the absolute terms), dense [T, n_out]:
 * matmul_w's x[T, K] R^T, or (transposed) matmul_w_t's x[T, N] R, with tw's resident values R and x as the op
 * multiplies it with each part: rounded to bf16 for a rounded part (the rows of R it meets), else as it is. */
static void weight_product(double *p, double *s, const test_weight *tw, const float *x, int ldx, int T,
                           int transposed)
{
    int N = tw->w.rows, K = tw->w.cols, n_in = transposed ? N : K, n_out = transposed ? K : N;
    double *xd = dvec((size_t)(T ? T : 1) * ldx), *xr = dvec((size_t)(T ? T : 1) * ldx);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < n_in; k++) {
            size_t i = (size_t)t * ldx + k;
            xd[i] = x[i], xr[i] = g_rounding != 0 ? bf16_of(x[i]) : x[i];
        }
    if (!transposed) { /* each part's columns of y, from x as that part meets it */
        for (int i = 0; i < tw->w.n_parts; i++) {
            const tk_weight_part *part = &tw->w.part[i];
            double *pp = dvec((size_t)(T ? T : 1) * part->rows), *ss = dvec((size_t)(T ? T : 1) * part->rows);
            product_nt(pp, ss, part_rounded(part->type) ? xr : xd, ldx, tw->R.d + (size_t)part->row0 * K, K, T,
                       part->rows, K);
            for (int t = 0; t < T; t++)
                for (int n = 0; n < part->rows; n++) {
                    p[(size_t)t * n_out + part->row0 + n] = pp[(size_t)t * part->rows + n];
                    s[(size_t)t * n_out + part->row0 + n] = ss[(size_t)t * part->rows + n];
                }
            free(pp), free(ss);
        }
    } else { /* x's columns each as their part meets them, through R^T */
        double *RT = dvec((size_t)K * N);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) RT[(size_t)k * N + n] = tw->R.d[(size_t)n * K + k];
        for (int i = 0; i < tw->w.n_parts; i++)
            if (part_rounded(tw->w.part[i].type))
                for (int t = 0; t < T; t++)
                    for (int n = tw->w.part[i].row0; n < tw->w.part[i].row0 + tw->w.part[i].rows; n++)
                        xd[(size_t)t * ldx + n] = xr[(size_t)t * ldx + n];
        product_nt(p, s, xd, ldx, RT, N, T, K, N);
        free(RT);
    }
    free(xd), free(xr);
}

typedef void (*wmm_fn)(tk_backend *be, float *y, int ldy, const float *x, int ldx, const tk_weight *w, int T,
                       float alpha, float beta);

/* beta 0 (y NaN: not read), beta 1, and a general one; each check's line covers all three */
static const float W_ALPHA_BETA[][2] = {{1, 0}, {-0.5f, 1}, {2, 0.25f}};

/* y[T, n_out] (row stride n_out + pad_y) = alpha * product + beta * y through `fn`, against p / s (dense [T, n_out]) */
static void check_wmm(tk_backend *be, rng_t *r, const char *op, wmm_fn fn, const tk_weight *w, const mat *x, int n_out,
                      int pad_y, const double *p, const double *s, const char *what)
{
    cmp_t worst = {0, 0, 0, 0};
    int guard = 1, T = x->rows;
    for (int v = 0; v < 3; v++) {
        float alpha = W_ALPHA_BETA[v][0], beta = W_ALPHA_BETA[v][1];
        mat y = mat_new(T, n_out, n_out + pad_y);
        if (beta == 0) mat_fill(&y, NAN);
        else mat_randn(&y, r, 1);
        double *want = dvec((size_t)T * y.ld), *scale = dvec((size_t)T * y.ld);
        for (int t = 0; t < T; t++)
            for (int n = 0; n < n_out; n++) {
                size_t i = (size_t)t * y.ld + n, j = (size_t)t * n_out + n;
                double y0 = beta == 0 ? 0 : y.d[i];
                want[i] = alpha * p[j] + beta * y0;
                scale[i] = fabs(alpha) * s[j] + fabs(beta * y0);
            }
        fn(be, y.f, y.ld, x->f, x->ld, w, T, alpha, beta);
        cmp_t c = compare(y.f, want, scale, T, n_out, y.ld, weight_tol(w));
        worst = v ? cmp_merge(worst, c) : c;
        guard &= mat_guard_ok(&y);
        free(want), free(scale);
        mat_free(&y);
    }
    char line[200];
    snprintf(line, sizeof line, "%s ldx=%d alpha,beta 1,0 -.5,1 2,.25", what, x->ld);
    report(op, line, worst, weight_tol(w), guard, guard_note(guard));
}

/* Whether row t of a T-row call equals the same row computed alone (bit for bit). backend.h says of
 * matmul_w_decode that "each output row depends only on its own input row", and that prefill uses matmul_w
 * "whatever their size, so a prompt's logits do not depend on how many other prompts share its pass". On the
 * CPU backend this holds inside the decoding kernels (Q4_0 / Q4_1 / Q8_0 up to 64 rows, the other quantized
 * and 16-bit types up to 8, F32 for 1) and not where OpenBLAS sgemm computes (whose sums depend on the rows
 * and columns of the call: small-matrix kernels, tails, one-row forwarding to gemv), so it is reported as a
 * note (same / DIFF), not a check. tests/test_decode_kernel.py checks the register kernel's rows. */
static int rows_alone_equal(tk_backend *be, wmm_fn fn, const tk_weight *w, const mat *x, int n_out, int *first_bad)
{
    int T = x->rows, same = 1;
    float *all = fvec((size_t)T * n_out), *one = fvec((size_t)n_out);
    fn(be, all, n_out, x->f, x->ld, w, T, 1, 0);
    *first_bad = -1;
    for (int t = 0; t < T && same; t++) {
        fn(be, one, n_out, x->f + (size_t)t * x->ld, x->ld, w, 1, 1, 0);
        if (memcmp(one, all + (size_t)t * n_out, (size_t)n_out * sizeof(float)) != 0) same = 0, *first_bad = t;
    }
    free(all), free(one);
    return same;
}

/* matmul_w, matmul_w_decode and matmul_w_t of one weight against the float64 products with its decoded W,
 * for each T; the decode's rows alone against the same rows together */
static void check_weight_matmuls(tk_backend *be, rng_t *r, const test_weight *tw, const char *label, const int *Ts,
                                 int n_T)
{
    int N = tw->w.rows, K = tw->w.cols;
    for (int i = 0; i < n_T; i++) {
        int T = Ts[i];
        char what[160];
        snprintf(what, sizeof what, "%s T=%d N=%d K=%d", label, T, N, K);
        mat x = mat_new(T, K, K + 3);
        mat_randn(&x, r, 1);
        double *p = dvec((size_t)T * N), *s = dvec((size_t)T * N);
        weight_product(p, s, tw, x.f, x.ld, T, 0);
        check_wmm(be, r, "matmul_w", call_matmul_w, &tw->w, &x, N, 5, p, s, what);
        check_wmm(be, r, "matmul_w_decode", call_matmul_w_decode, &tw->w, &x, N, 5, p, s, what);
        free(p), free(s);
        if (T > 1 && (long)N * K <= 1 << 20) { /* a call per row: not on the largest weights */
            int bad;
            char detail[96] = "";
            int same = rows_alone_equal(be, call_matmul_w_decode, &tw->w, &x, N, &bad);
            if (!same) snprintf(detail, sizeof detail, "row %d differs from the row alone", bad);
            report_note("matmul_w_decode rows alone", what, same, detail);
            same = rows_alone_equal(be, call_matmul_w, &tw->w, &x, N, &bad);
            if (!same) snprintf(detail, sizeof detail, "row %d differs from the row alone", bad);
            report_note("matmul_w rows alone", what, same, detail);
        }
        mat_free(&x);
        mat xt = mat_new(T, N, N + 2);
        mat_randn(&xt, r, 1);
        p = dvec((size_t)T * K), s = dvec((size_t)T * K);
        weight_product(p, s, tw, xt.f, xt.ld, T, 1);
        check_wmm(be, r, "matmul_w_t", call_matmul_w_t, &tw->w, &xt, K, 1, p, s, what);
        free(p), free(s);
        mat_free(&xt);
    }
}

/* Exact decoding: x = identity rows gives W^T (matmul_w, and matmul_w_decode in chunks of 1, 7, 64, 65, 2 and
 * 300 rows: the register kernel, the few-rows loop and the panels), and through matmul_w_t W itself (whole,
 * and in chunks). Values compared with == (a -0 weight may come back +0 from a sum). With g_rounding the same
 * checks hold the resident values R exactly (1 and 0 are exact in bf16, each product too): every element of a
 * rounded part is its tk_dequantize value rounded to bf16, to nearest even. */
static void check_weight_identity(tk_backend *be, const test_weight *tw, const char *label)
{
    static const int chunks[] = {1, 7, 64, 65, 2, 300};
    int N = tw->w.rows, K = tw->w.cols;
    char what[160];
    mat I = mat_new(K > N ? K : N, K > N ? K : N, (K > N ? K : N) + 1);
    for (int k = 0; k < I.rows; k++) I.f[(size_t)k * I.ld + k] = 1;
    mat y = mat_new(K, N, N + 5);
    double *want = dvec((size_t)K * y.ld);
    for (int k = 0; k < K; k++)
        for (int n = 0; n < N; n++) want[(size_t)k * y.ld + n] = tw->R.d[(size_t)n * K + k];
    const char *rounded = g_rounding != 0 ? " (bf16-rounded W)" : "";
    for (int pass = 0; pass < 2; pass++) {
        mat_fill(&y, NAN);
        if (pass == 0) call_matmul_w(be, y.f, y.ld, I.f, I.ld, &tw->w, K, 1, 0);
        for (int k0 = 0, c = 0; pass == 1 && k0 < K; k0 += chunks[c++ % 6]) {
            int rows = K - k0 < chunks[c % 6] ? K - k0 : chunks[c % 6];
            call_matmul_w_decode(be, y.f + (size_t)k0 * y.ld, y.ld, I.f + (size_t)k0 * I.ld, I.ld, &tw->w, rows, 1, 0);
        }
        snprintf(what, sizeof what, "%s x = I[%d]: y = W^T%s%s, N=%d K=%d", label, K,
                 pass ? " (chunks 1,7,64,65,2,300)" : "", rounded, N, K);
        int guard = mat_guard_ok(&y);
        report(pass ? "matmul_w_decode exact" : "matmul_w exact", what,
               compare(y.f, want, NULL, K, N, y.ld, TOL_EXACT), TOL_EXACT, guard, guard_note(guard));
    }
    free(want);
    mat_free(&y);
    /* matmul_w_t: I[N] W = W */
    mat yt = mat_new(N, K, K + 1);
    for (int pass = 0; pass < 2; pass++) {
        mat_fill(&yt, NAN);
        if (pass == 0) call_matmul_w_t(be, yt.f, yt.ld, I.f, I.ld, &tw->w, N, 1, 0);
        for (int n0 = 0, c = 0; pass == 1 && n0 < N; n0 += chunks[c++ % 6]) {
            int rows = N - n0 < chunks[c % 6] ? N - n0 : chunks[c % 6];
            call_matmul_w_t(be, yt.f + (size_t)n0 * yt.ld, yt.ld, I.f + (size_t)n0 * I.ld, I.ld, &tw->w, rows, 1, 0);
        }
        double *wantt = dvec((size_t)N * yt.ld);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) wantt[(size_t)n * yt.ld + k] = tw->R.d[(size_t)n * K + k];
        snprintf(what, sizeof what, "%s x = I[%d]: y = W%s%s, N=%d K=%d", label, N, pass ? " (chunks)" : "", rounded,
                 N, K);
        int guard = mat_guard_ok(&yt);
        report("matmul_w_t exact", what, compare(yt.f, wantt, NULL, N, K, yt.ld, TOL_EXACT), TOL_EXACT, guard,
               guard_note(guard));
        free(wantt);
    }
    mat_free(&yt);
    mat_free(&I);
}

/* matmul_w_t as the input gradient: dx = dy . W is d/dx sum(dy * x W^T), by finite differences (with
 * g_rounding: of sum(dy * x R^T), dy taken bf16 values, so that the op's rounding of it is exact) */
static void check_weight_fd(tk_backend *be, rng_t *r, const test_weight *tw, const char *label, int T)
{
    int N = tw->w.rows, K = tw->w.cols;
    mat x = mat_new(T, K, K), dy = mat_new(T, N, N + 2), dx = mat_new(T, K, K + 1);
    mat_randn(&x, r, 1), mat_randn(&dy, r, 1), mat_fill(&dx, NAN);
    for (int t = 0; g_rounding != 0 && t < T; t++)
        for (int n = 0; n < N; n++) dy.f[(size_t)t * dy.ld + n] = bf16_of(dy.f[(size_t)t * dy.ld + n]);
    mat_to_double(&dy);
    call_matmul_w_t(be, dx.f, dx.ld, dy.f, dy.ld, &tw->w, T, 1, 0);
    mm_objective o = {&x, &tw->R, &dy, dvec((size_t)T * dy.ld)};
    char what[160];
    snprintf(what, sizeof what, "d/dx of dy.(x W^T): %s T=%d N=%d K=%d", label, T, N, K);
    report("matmul_w_t fin.diff", what, fd_check(mm_L, &o, &x, dx.f, dx.ld, FD_COORDS, r, TOL_FD), TOL_FD, 1, NULL);
    free(o.y);
    mat_free(&x), mat_free(&dy), mat_free(&dx);
}

enum { N_WTYPES = 11, MAX_TS = 6 };
static const int WTYPES[N_WTYPES] = {TK_GGML_F32,  TK_GGML_F16,  TK_GGML_BF16, TK_GGML_Q4_0,
                                     TK_GGML_Q4_1, TK_GGML_Q5_0, TK_GGML_Q5_1, TK_GGML_Q8_0,
                                     TK_GGML_Q4_K, TK_GGML_Q5_K, TK_GGML_Q6_K};

/* one-type weights: N, K by block size (1, 32, 256 elements), the T of each */
typedef struct {
    int N, K[3]; /* K for blocks of 1, 32, 256 elements */
    int Ts[MAX_TS], n_T;
    int identity; /* also the exact-decode checks (on a weight of extreme scales) and finite differences */
} wshape;

/* T = 1, 2, 7, 64 (the register kernel's last), 65 (its first past: panels), 300; N = 1, not a multiple of
 * 16; K of one block; K = 16384, whose panels are 64 rows (1M floats), so N = 150 is three panels on one
 * thread (forward), and 1 thread's whole K in the backward is three panels too */
static const wshape WSHAPES[] = {
    {1, {37, 32, 256}, {1, 2, 65}, 3, 0},
    {45, {101, 96, 768}, {1, 2, 7, 64, 65, 300}, 6, 1},
    {100, {777, 768, 768}, {9, 300}, 2, 0},
    {150, {16384, 16384, 16384}, {2, 17}, 2, 0},
    /* more rows than one chunk of matmul_w_t's sum over W's rows (tgemm.c sums 1024 at a time), 1100 = 68.75 x 16 */
    {1100, {37, 96, 256}, {5, 70}, 2, 0},
};

/* weights of several parts, each its own type */
typedef struct {
    part_spec parts[TK_WEIGHT_MAX_PARTS];
    int n_parts, K;
    int Ts[MAX_TS], n_T;
} wmulti;

static const wmulti WMULTI[] = {
    /* a Q4_K_M file's fused q|k|v: q, k in Q4_K, v in Q6_K */
    {{{TK_GGML_Q4_K, 70}, {TK_GGML_Q6_K, 31}}, 2, 768, {1, 7, 64, 65, 300}, 5},
    /* a tiled part, another starting at row 37 (not a multiple of 16), an F32 part (plain sgemm) */
    {{{TK_GGML_Q8_0, 37}, {TK_GGML_Q4_1, 33}, {TK_GGML_F32, 23}}, 3, 96, {1, 2, 65}, 3},
    {{{TK_GGML_F16, 20}, {TK_GGML_Q5_0, 33}, {TK_GGML_BF16, 7}}, 3, 64, {1, 9}, 2},
    {{{TK_GGML_Q4_0, 16}, {TK_GGML_Q5_1, 33}, {TK_GGML_Q5_K, 15}}, 3, 256, {2, 64}, 2},
    /* gate|up-like, three panels on one thread */
    {{{TK_GGML_Q4_1, 70}, {TK_GGML_Q6_K, 80}}, 2, 16384, {17}, 1},
};

static int block_class(int type)
{
    int e = qref_find(type)->elems;
    return e == 1 ? 0 : e == 32 ? 1 : 2;
}

static void test_weight_matmuls(tk_backend *be, rng_t *r)
{
    for (int ti = 0; ti < N_WTYPES; ti++)
        for (size_t si = 0; si < sizeof WSHAPES / sizeof WSHAPES[0]; si++) {
            const wshape *sh = &WSHAPES[si];
            part_spec part = {WTYPES[ti], sh->N};
            int K = sh->K[block_class(WTYPES[ti])];
            char label[64];
            describe_parts(label, sizeof label, &part, 1);
            test_weight tw = make_weight(be, &part, 1, K, r, QREF_SANE);
            if (tw.ok) check_weight_matmuls(be, r, &tw, label, sh->Ts, sh->n_T);
            if (tw.ok && sh->identity) check_weight_fd(be, r, &tw, label, 3);
            free_weight(be, &tw);
            if (sh->identity) { /* extreme scales: 0, -0, subnormal, +-65504 (F16 / BF16: any finite bits) */
                tw = make_weight(be, &part, 1, K, r, QREF_EXTREME_FINITE);
                strncat(label, " extreme", sizeof label - strlen(label) - 1);
                if (tw.ok) check_weight_identity(be, &tw, label);
                free_weight(be, &tw);
            }
        }
    for (size_t mi = 0; mi < sizeof WMULTI / sizeof WMULTI[0]; mi++) {
        const wmulti *m = &WMULTI[mi];
        char label[64];
        describe_parts(label, sizeof label, m->parts, m->n_parts);
        test_weight tw = make_weight(be, m->parts, m->n_parts, m->K, r, QREF_SANE);
        if (tw.ok) check_weight_matmuls(be, r, &tw, label, m->Ts, m->n_T);
        if (tw.ok && m->K <= 1024) check_weight_fd(be, r, &tw, label, 3);
        free_weight(be, &tw);
        if (m->K <= 1024) {
            tw = make_weight(be, m->parts, m->n_parts, m->K, r, QREF_EXTREME_FINITE);
            strncat(label, " extreme", sizeof label - strlen(label) - 1);
            if (tw.ok) check_weight_identity(be, &tw, label);
            free_weight(be, &tw);
        }
    }
}

/* ==== grouped weight matmuls: an MoE layer's experts in one call ======================================= */

/* Experts of one storage form, the rows each gets (0: none; the decoding cases give every chosen expert one
 * row), and whether the call is a decoding step's. */
typedef struct {
    part_spec parts[TK_WEIGHT_MAX_PARTS];
    int n_parts, K;
    int rows[12], n_groups, decoding;
    int aligned; /* x and y row strides a multiple of 4 floats (16 bytes), as a model's: the others' are odd */
} wgrouped;

static const wgrouped WGROUPED[] = {
    /* F32 experts (sgemm / the one-row kernel), the group sizes a prefill gives: empty, 1, tens */
    {{{TK_GGML_F32, 70}}, 1, 96, {3, 0, 1, 17, 0, 9, 40, 2}, 8, 0},
    {{{TK_GGML_F32, 70}}, 1, 96, {1, 0, 1, 1, 0, 1}, 6, 1},
    /* BF16 (decoded panels, or dotted rows when decoding) and a tiled type (tgemm / the register kernel) */
    {{{TK_GGML_BF16, 48}}, 1, 64, {5, 1, 0, 33, 2, 7, 1, 1, 65}, 9, 0},
    {{{TK_GGML_BF16, 48}}, 1, 64, {1, 1, 0, 1, 1}, 5, 1},
    {{{TK_GGML_Q8_0, 100}}, 1, 128, {9, 0, 70, 1, 3, 3, 12}, 7, 0},
    {{{TK_GGML_Q4_1, 100}}, 1, 128, {1, 0, 1, 1}, 4, 1},
    /* gate|up: two parts; one starting off a 16-row group (whose rows cannot be cut), one of them F32 */
    {{{TK_GGML_Q8_0, 37}, {TK_GGML_F32, 23}}, 2, 96, {4, 0, 20, 1, 6, 2, 1}, 7, 0},
    {{{TK_GGML_Q4_K, 32}, {TK_GGML_Q6_K, 32}}, 2, 256, {2, 1, 0, 1}, 4, 1},
    /* a single group */
    {{{TK_GGML_F16, 40}}, 1, 64, {30}, 1, 0},
    /* decoding steps with work enough to be cut in blocks of rows over the threads */
    {{{TK_GGML_F32, 300}}, 1, 512, {1, 0, 1, 1}, 4, 1},
    {{{TK_GGML_BF16, 300}}, 1, 512, {1, 1, 0, 1}, 4, 1},
    {{{TK_GGML_Q8_0, 256}}, 1, 512, {0, 1, 1, 1}, 4, 1},
    /* 16-byte aligned rows (a GPU backend may batch the groups of one size in one call, where every pointer is
     * aligned): one-row decoding groups, and a prefill's groups of repeated sizes */
    {{{TK_GGML_BF16, 48}}, 1, 64, {1, 1, 0, 1, 1}, 5, 1, 1},
    {{{TK_GGML_F32, 40}}, 1, 96, {1, 0, 1, 1}, 4, 1, 1},
    {{{TK_GGML_Q4_K, 32}, {TK_GGML_Q6_K, 32}}, 2, 256, {1, 1, 0, 1}, 4, 1, 1},
    {{{TK_GGML_Q8_0, 32}, {TK_GGML_F32, 16}}, 2, 64, {3, 3, 0, 2, 3, 2, 5}, 7, 0, 1},
};

/* y rows of group g = alpha x rows . W_g^T + beta y (and, _t, x rows . W_g) against the float64 products with
 * each expert's decoded W, every alpha / beta variant in one line */
static void check_grouped(tk_backend *be, rng_t *r, const test_weight *tws, const wgrouped *c, int transposed,
                          const char *what)
{
    int32_t start[13] = {0};
    for (int g = 0; g < c->n_groups; g++) start[g + 1] = start[g] + c->rows[g];
    int T = start[c->n_groups], N = tws[0].w.rows, K = c->K, n_in = transposed ? N : K, n_out = transposed ? K : N;
    tk_weight w[12];
    for (int g = 0; g < c->n_groups; g++) w[g] = tws[g].w;
    int ldx = c->aligned ? (n_in + 3) / 4 * 4 + 4 : n_in + 3, ldy = c->aligned ? (n_out + 3) / 4 * 4 + 4 : n_out + 5;
    mat x = mat_new(T, n_in, ldx);
    mat_randn(&x, r, 1);
    double *p = dvec((size_t)T * n_out), *sc = dvec((size_t)T * n_out);
    for (int g = 0; g < c->n_groups; g++)
        if (c->rows[g])
            weight_product(p + (size_t)start[g] * n_out, sc + (size_t)start[g] * n_out, &tws[g],
                           x.f + (size_t)start[g] * x.ld, x.ld, c->rows[g], transposed);
    cmp_t worst = {0, 0, 0, 0};
    int guard = 1;
    for (int v = 0; v < 3; v++) {
        float alpha = W_ALPHA_BETA[v][0], beta = W_ALPHA_BETA[v][1];
        mat y = mat_new(T, n_out, ldy);
        if (beta == 0) mat_fill(&y, NAN);
        else mat_randn(&y, r, 1);
        double *want = dvec((size_t)(T ? T : 1) * y.ld), *scale = dvec((size_t)(T ? T : 1) * y.ld);
        for (int t = 0; t < T; t++)
            for (int n = 0; n < n_out; n++) {
                size_t i = (size_t)t * y.ld + n, j = (size_t)t * n_out + n;
                double y0 = beta == 0 ? 0 : y.d[i];
                want[i] = alpha * p[j] + beta * y0;
                scale[i] = fabs(alpha) * sc[j] + fabs(beta * y0);
            }
        if (transposed) call_matmul_w_t_grouped(be, &y, &x, w, start, c->n_groups, alpha, beta);
        else call_matmul_w_grouped(be, &y, &x, w, start, c->n_groups, alpha, beta, c->decoding);
        cmp_t cm = compare(y.f, want, scale, T, n_out, y.ld, weight_tol(&w[0]));
        worst = v ? cmp_merge(worst, cm) : cm;
        guard &= mat_guard_ok(&y) && mat_guard_ok(&x);
        free(want), free(scale);
        mat_free(&y);
    }
    report(transposed ? "matmul_w_t_grouped" : "matmul_w_grouped", what, worst, weight_tol(&w[0]), guard,
           guard_note(guard));
    free(p), free(sc);
    mat_free(&x);
}

static void test_weight_grouped(tk_backend *be, rng_t *r)
{
    for (size_t ci = 0; ci < sizeof WGROUPED / sizeof WGROUPED[0]; ci++) {
        const wgrouped *c = &WGROUPED[ci];
        test_weight tws[12];
        int ok = 1;
        for (int g = 0; g < c->n_groups; g++) ok &= (tws[g] = make_weight(be, c->parts, c->n_parts, c->K, r,
                                                                          QREF_SANE)).ok;
        char label[64], what[200];
        describe_parts(label, sizeof label, c->parts, c->n_parts);
        size_t at = (size_t)snprintf(what, sizeof what, "%s K=%d%s%s, rows", label, c->K,
                                     c->decoding ? " decoding" : "", c->aligned ? " aligned" : "");
        for (int g = 0; g < c->n_groups && at < sizeof what; g++)
            at += (size_t)snprintf(what + at, sizeof what - at, " %d", c->rows[g]);
        if (ok) {
            check_grouped(be, r, tws, c, 0, what);
            if (!c->decoding) check_grouped(be, r, tws, c, 1, what);
        }
        for (int g = 0; g < c->n_groups; g++) free_weight(be, &tws[g]);
    }
}

/* weight_bytes: a positive multiple of 64 for every type on shapes it holds; 0 for a type outside the 11,
 * no rows, or cols that are not whole blocks */
static void test_weight_bytes(tk_backend *be, rng_t *r)
{
    (void)r;
    for (int ti = 0; ti < N_WTYPES; ti++) {
        int type = WTYPES[ti], elems = qref_find(type)->elems, B = elems < 32 ? 32 : elems;
        static const int rows[] = {1, 15, 16, 17, 100};
        int ok = 1;
        char detail[160] = "";
        for (int i = 0; i < 5; i++)
            for (int kb = 1; kb <= 3; kb++) {
                size_t b = call_weight_bytes(be, type, rows[i], kb * B);
                if (b == 0 || b % 64) {
                    ok = 0;
                    snprintf(detail, sizeof detail, "rows=%d cols=%d: %zu", rows[i], kb * B, b);
                }
            }
        if (call_weight_bytes(be, type, 0, B) != 0) ok = 0, snprintf(detail, sizeof detail, "rows=0 is not 0");
        if (elems > 1 && call_weight_bytes(be, type, 4, B + elems / 2) != 0)
            ok = 0, snprintf(detail, sizeof detail, "cols=%d (not whole blocks) is not 0", B + elems / 2);
        char what[96];
        snprintf(what, sizeof what, "%s: rows 1,15,16,17,100 x 1-3 blocks; 0 rows, part blocks", type_name(type));
        report_bool("weight_bytes", what, ok, detail);
    }
    static const int unsupported[] = {10, 11, 15, 16, 24, 99}; /* Q2_K, Q3_K, Q8_K, IQ2_XXS, I8, none */
    int ok = 1;
    for (int i = 0; i < 6; i++) ok &= call_weight_bytes(be, unsupported[i], 16, 256) == 0;
    report_bool("weight_bytes", "types outside the 11 (Q2_K, Q3_K, Q8_K, IQ2_XXS, I8, 99): 0", ok, NULL);
}

/* embed: each row exactly its decoded values (bit for bit), tables of every type, one part and several
 * (tokens on both sides of each boundary); F16 / BF16 rows of any bits, NaN and infinities included. With
 * g_rounding: exactly the resident values R (a rounded part's tk_dequantize values rounded to bf16; BF16 and
 * F32 tables therefore still their tk_dequantize values bit for bit). */
static void check_embed(tk_backend *be, rng_t *r, const part_spec *parts, int n_parts, int K)
{
    static const int Ts[] = {1, 7, 300};
    char label[64];
    describe_parts(label, sizeof label, parts, n_parts);
    test_weight tw = make_weight(be, parts, n_parts, K, r, QREF_EXTREME);
    int V = tw.w.rows;
    for (int i = 0; tw.ok && i < 3; i++) {
        int T = Ts[i], k = 0;
        int32_t *tokens = malloc((size_t)T * sizeof *tokens);
        tokens[k++] = V - 1;
        for (int p = 1; p < n_parts && k + 1 < T; p++) tokens[k++] = tw.w.part[p].row0, tokens[k++] = tw.w.part[p].row0 - 1;
        if (k < T) tokens[k++] = 0;
        while (k < T) tokens[k++] = rng_int(r, 0, V - 1); /* repeats too */
        float *x = fvec((size_t)T * K); /* exactly T rows: nothing past them may be written */
        for (size_t j = 0; j < (size_t)T * K; j++) x[j] = NAN;
        double *want = dvec((size_t)T * K);
        ref_embed(want, tw.R.d, tokens, T, K);
        call_embed(be, x, &tw.w, tokens, T);
        long bits = 0; /* beyond equal values: the same bits (sign of zero, NaN payloads) as tk_dequantize */
        for (int t = 0; t < T; t++)
            bits += memcmp(x + (size_t)t * K, tw.R.f + (size_t)tokens[t] * K, (size_t)K * sizeof(float)) != 0;
        char what[160], detail[96] = "";
        snprintf(what, sizeof what, "%s T=%d V=%d D=%d (NaN/inf F16/BF16, extreme scales)%s", label, T, V, K,
                 g_rounding != 0 ? " bf16-rounded" : "");
        if (bits) snprintf(detail, sizeof detail, "%ld rows not bit for bit tk_dequantize's%s", bits,
                           g_rounding != 0 ? " (bf16-rounded)" : "");
        report("embed", what, compare(x, want, NULL, T, K, K, TOL_EXACT), TOL_EXACT, bits == 0, bits ? detail : NULL);
        free(tokens), free(x), free(want);
    }
    free_weight(be, &tw);
}

static void test_embed(tk_backend *be, rng_t *r)
{
    for (int ti = 0; ti < N_WTYPES; ti++) {
        int type = WTYPES[ti], elems = qref_find(type)->elems;
        part_spec part = {type, 50};
        check_embed(be, r, &part, 1, elems == 1 ? 37 : 2 * (elems < 32 ? 32 : elems));
    }
    for (size_t mi = 0; mi < sizeof WMULTI / sizeof WMULTI[0]; mi++)
        if (WMULTI[mi].K <= 1024) check_embed(be, r, WMULTI[mi].parts, WMULTI[mi].n_parts, WMULTI[mi].K);
}

/* ==== embedding, norms, bias ======================================================================= */

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

/* LayerNorm over the same shapes as rmsnorm, with a bias, rows offset from 0 (the mean matters) */
static void test_layer_norm(tk_backend *be, rng_t *r)
{
    static const tol_t TOL_LAYER_NORM = {1e-6, 2e-6, 0};
    for (size_t i = 0; i < sizeof NORM_SHAPES / sizeof NORM_SHAPES[0]; i++) {
        norm_shape s = NORM_SHAPES[i];
        mat x = mat_new(s.rows, s.n, s.n + s.pad_x), w = mat_new(1, s.n, s.n), b = mat_new(1, s.n, s.n);
        mat y = s.in_place ? x : mat_new(s.rows, s.n, s.n + s.pad_y);
        mat_randn(&x, r, s.x_scale), mat_randn(&w, r, 0.1), mat_randn(&b, r, 0.1);
        for (int row = 0; row < s.rows; row++)
            for (int c = 0; c < s.n; c++) x.f[(size_t)row * x.ld + c] += 3.0f * s.x_scale;
        for (int c = 0; c < s.n; c++) w.f[c] += 1;
        mat_to_double(&x), mat_to_double(&w), mat_to_double(&b);
        if (!s.in_place) mat_fill(&y, NAN);
        double *want = dvec((size_t)s.rows * y.ld);
        ref_layer_norm(want, y.ld, x.d, x.ld, w.d, b.d, s.rows, s.n, s.eps);
        call_layer_norm(be, &y, &x, &w, &b, s.eps);
        char what[128];
        snprintf(what, sizeof what, "rows=%d n=%d ldx=%d ldy=%d eps=%g |x|~%g%s", s.rows, s.n, x.ld, y.ld, s.eps,
                 s.x_scale, s.in_place ? " in place" : "");
        int guard = mat_guard_ok(&y);
        report("layer_norm", what, compare(y.f, want, NULL, s.rows, s.n, y.ld, TOL_LAYER_NORM), TOL_LAYER_NORM, guard,
               guard_note(guard));
        free(want);
        mat_free(&x), mat_free(&w), mat_free(&b);
        if (!s.in_place) mat_free(&y);
    }
}

/* the three GELU forms on values from -12 to 12 and large ones, strided and in place: one rounding of the double */
static void test_gelu(tk_backend *be, rng_t *r)
{
    static const tol_t TOL_GELU = {1e-30, 1.2e-7, 0};
    static const int shapes[][4] = {{1, 1, 0, 0}, {3, 70, 2, 1}, {65, 577, 0, 0}, {4, 33, 3, 3}}; /* rows n pads */
    for (int kind = 0; kind < 3; kind++)
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
            int rows = shapes[i][0], n = shapes[i][1], in_place = i == 3;
            mat x = mat_new(rows, n, n + shapes[i][2]);
            mat y = in_place ? x : mat_new(rows, n, n + shapes[i][3]);
            mat_randn(&x, r, 4.0);
            if (rows * n > 2) x.f[0] = -12.0f, x.f[1] = 30.0f;
            mat_to_double(&x);
            if (!in_place) mat_fill(&y, NAN);
            double *want = dvec((size_t)rows * y.ld);
            for (int row = 0; row < rows; row++)
                for (int c = 0; c < n; c++) want[(size_t)row * y.ld + c] = ref_gelu(x.d[(size_t)row * x.ld + c], kind);
            call_gelu(be, &y, &x, kind);
            char what[96];
            snprintf(what, sizeof what, "kind=%d rows=%d n=%d ldx=%d ldy=%d%s", kind, rows, n, x.ld, y.ld,
                     in_place ? " in place" : "");
            int guard = mat_guard_ok(&y);
            report("gelu", what, compare(y.f, want, NULL, rows, n, y.ld, TOL_GELU), TOL_GELU, guard, guard_note(guard));
            free(want);
            mat_free(&x);
            if (!in_place) mat_free(&y);
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
 * longer than a 64-row query block; head_dim 128 (real models': a GPU kernel's tiles then need more than 48 KB
 * of shared memory) */
static const attn_case ATTN_CASES[] = {
    {1, 1, 8, 0, 0, 1, {1}},
    {2, 1, 16, 3, 1, 2, {2, 3}},
    {4, 2, 16, 5, 2, 4, {17, 1, 65, 5}},
    {3, 3, 5, 1, 0, 2, {3, 17}},
    {6, 2, 32, 0, 4, 3, {7, 2, 70}},
    {4, 1, 8, 2, 2, 2, {130, 1}},
    {4, 2, 128, 3, 1, 2, {100, 9}},
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

/* Every row sees its whole sequence (a vision tower's image): the same packed cases, as many kv heads as heads */
static void test_attention_full(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof ATTN_CASES / sizeof ATTN_CASES[0]; i++) {
        attn_case c = ATTN_CASES[i];
        c.Hkv = c.H;
        attn_shape s = attn_shape_of(&c);
        int width = 3 * c.H * c.Dh;
        mat qkv = mat_new(s.T, width, width + c.pad_qkv), out = mat_new(s.T, c.H * c.Dh, c.H * c.Dh + c.pad_o);
        mat_randn(&qkv, r, 1.5), mat_fill(&out, NAN);
        double *want = dvec((size_t)s.T * out.ld);
        const double *q = qkv.d, *k = q + c.H * c.Dh, *v = k + c.H * c.Dh;
        ref_attention_full(want, out.ld, q, k, v, qkv.ld, s.seq_start, s.n_seqs, c.H, c.Dh);
        call_attention_full(be, &out, &qkv, &s);
        char what[160];
        attn_describe(what, sizeof what, &c, &qkv, &out);
        int guard = mat_guard_ok(&out);
        report("attention_full", what, compare(out.f, want, NULL, s.T, out.cols, out.ld, TOL_ATTN), TOL_ATTN, guard,
               guard_note(guard));
        free(want), free(s.seq_start);
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
    {2, 8, 2, 128, 40, {300, 1}, 0x1},
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

/* A resumed prefill: sequences of past cached rows and len new ones (a query block of 64 split by the first new
 * row, starting on one, a single new row, none cached), GQA groups of 1 to 4, an odd head_dim. */
typedef struct {
    int H, Hkv, Dh, n_seqs;
    int past[4], len[4];
} cached_case;

static const cached_case CACHED_CASES[] = {
    {2, 1, 16, 3, {16, 0, 63}, {1, 5, 2}},
    {4, 2, 8, 4, {64, 1, 100, 129}, {70, 1, 40, 3}},
    {3, 3, 5, 2, {32, 48}, {17, 64}},
    {8, 2, 16, 1, {200}, {16}},
};

/* Each sequence whole (past + len rows) in one packed q|k|v: the reference and attention over it; the new rows'
 * queries packed, and each sequence's keys and values in a cache of its own (rows of ld_kv), for
 * attention_cached. Its rows against the float64 reference, and against attention's rows bit for bit. */
static void test_attention_cached(tk_backend *be, rng_t *r)
{
    for (size_t i = 0; i < sizeof CACHED_CASES / sizeof CACHED_CASES[0]; i++) {
        const cached_case *c = &CACHED_CASES[i];
        attn_case whole = {c->H, c->Hkv, c->Dh, 1, 2, c->n_seqs, {0}};
        for (int q = 0; q < c->n_seqs; q++) whole.lens[q] = c->past[q] + c->len[q];
        attn_shape s = attn_shape_of(&whole);
        int HD = c->H * c->Dh, KV = c->Hkv * c->Dh, width = HD + 2 * KV, ld_kv = KV + 3, n_new = 0, max_keys = 1;
        int32_t new_start[5] = {0};
        for (int q = 0; q < c->n_seqs; q++) {
            new_start[q + 1] = new_start[q] + c->len[q];
            if (whole.lens[q] > max_keys) max_keys = whole.lens[q];
        }
        n_new = new_start[c->n_seqs];
        mat qkv = mat_new(s.T, width, width + 1), full = mat_new(s.T, HD, HD + 2);
        mat qn = mat_new(n_new, HD, HD + 5), out = mat_new(n_new, HD, HD + 2);
        mat_randn(&qkv, r, 1.5), mat_fill(&full, NAN), mat_fill(&out, NAN);
        double *ref_full = dvec((size_t)s.T * full.ld), *want = dvec((size_t)n_new * out.ld);
        ref_attention_on(ref_full, full.ld, &qkv, &s, NULL);
        call_attention(be, &full, &qkv, &s, NULL);
        mat kc[4], vc[4];
        tk_kv_view views[4];
        for (int q = 0; q < c->n_seqs; q++) {
            kc[q] = mat_new(whole.lens[q], KV, ld_kv), vc[q] = mat_new(whole.lens[q], KV, ld_kv);
            for (int t = 0; t < whole.lens[q]; t++) {
                const float *row = qkv.f + (size_t)(s.seq_start[q] + t) * qkv.ld;
                memcpy(kc[q].f + (size_t)t * ld_kv, row + HD, (size_t)KV * sizeof(float));
                memcpy(vc[q].f + (size_t)t * ld_kv, row + HD + KV, (size_t)KV * sizeof(float));
            }
            for (int t = 0; t < c->len[q]; t++) {
                size_t from = (size_t)(s.seq_start[q] + c->past[q] + t), to = (size_t)(new_start[q] + t);
                memcpy(qn.f + to * qn.ld, qkv.f + from * qkv.ld, (size_t)HD * sizeof(float));
                memcpy(want + to * out.ld, ref_full + from * full.ld, (size_t)HD * sizeof(double));
            }
            views[q] = (tk_kv_view){NULL, NULL, 0, kc[q].f, vc[q].f, whole.lens[q]};
        }
        call_attention_cached(be, &out, &qn, views, new_start, c->n_seqs, c->H, c->Hkv, c->Dh, ld_kv, max_keys);
        int same = 1;
        for (int q = 0; q < c->n_seqs; q++)
            for (int t = 0; t < c->len[q]; t++)
                same &= memcmp(out.f + (size_t)(new_start[q] + t) * out.ld,
                               full.f + (size_t)(s.seq_start[q] + c->past[q] + t) * full.ld,
                               (size_t)HD * sizeof(float)) == 0;
        char what[160];
        int k = snprintf(what, sizeof what, "H=%d Hkv=%d Dh=%d ld_kv=%d keys (cached+new)", c->H, c->Hkv, c->Dh, ld_kv);
        for (int q = 0; q < c->n_seqs && (size_t)k < sizeof what; q++)
            k += snprintf(what + k, sizeof what - (size_t)k, " %d+%d", c->past[q], c->len[q]);
        int guard = mat_guard_ok(&out);
        report("attention_cached", what, compare(out.f, want, NULL, n_new, HD, out.ld, TOL_ATTN), TOL_ATTN, guard,
               guard_note(guard));
        report_bool("attention_cached", "= attention's rows of the whole sequences, bit for bit", same, what);
        for (int q = 0; q < c->n_seqs; q++) mat_free(&kc[q]), mat_free(&vc[q]);
        free(ref_full), free(want), free(s.seq_start);
        mat_free(&qkv), mat_free(&full), mat_free(&qn), mat_free(&out);
    }
}

/* ==== memory ======================================================================================= */

/* bytes of device memory, read back through download */
static uint8_t *read_back(tk_backend *be, const void *buf, size_t bytes)
{
    uint8_t *host = malloc(bytes ? bytes : 1);
    call_download(be, host, buf, bytes);
    return host;
}

/* alloc: 64-byte aligned, zeroed, disjoint; a size it cannot allocate gives NULL and a message; free(NULL) does
 * nothing (the engine frees a scratch it never allocated). upload / download of odd byte counts at an offset,
 * the rest of the buffer untouched; sync; a host view. */
static void test_memory(tk_backend *be, rng_t *r)
{
    static const size_t sizes[] = {1, 3, 63, 64, 65, 4103, (1u << 20) + 5};
    enum { N_SIZES = sizeof sizes / sizeof sizes[0] };
    void *buf[N_SIZES];
    int aligned = 1, zeroed = 1, disjoint = 1;
    for (int i = 0; i < N_SIZES; i++) {
        buf[i] = call_alloc(be, sizes[i]);
        if (!buf[i]) {
            report_bool("alloc", "a small buffer", 0, tk_last_error());
            continue;
        }
        aligned &= (uintptr_t)buf[i] % 64 == 0;
        uint8_t *host = read_back(be, buf[i], sizes[i]);
        for (size_t j = 0; j < sizes[i]; j++) zeroed &= host[j] == 0;
        for (size_t j = 0; j < sizes[i]; j++) host[j] = (uint8_t)(i * 37 + j * 7 + 1);
        call_upload(be, buf[i], host, sizes[i]);
        free(host);
    }
    for (int i = 0; i < N_SIZES; i++) { /* each buffer still holds its own pattern */
        if (!buf[i]) continue;
        uint8_t *host = read_back(be, buf[i], sizes[i]);
        for (size_t j = 0; j < sizes[i]; j++) disjoint &= host[j] == (uint8_t)(i * 37 + j * 7 + 1);
        free(host);
        call_free(be, buf[i]);
    }
    report_bool("alloc", "1, 3, 63, 64, 65, 4103, 1M+5 bytes: 64-byte aligned", aligned, NULL);
    report_bool("alloc", "... zeroed", zeroed, NULL);
    report_bool("alloc / free", "... disjoint (each keeps its pattern while the others are written)", disjoint, NULL);
    tk_error(TK_ERR_INTERNAL, "(no message yet)");
    void *huge = call_alloc(be, SIZE_MAX);
    int failed_well = huge == NULL && strcmp(tk_last_error(), "(no message yet)") != 0;
    report_bool("alloc", "SIZE_MAX bytes: NULL, with a message", failed_well, tk_last_error());
    if (huge) call_free(be, huge);
    call_free(be, NULL);
    report_bool("free", "NULL: nothing (the engine frees a scratch it never allocated)", 1, NULL);

    static const size_t copies[] = {0, 1, 5, 4097};
    for (int i = 0; i < 4; i++) {
        size_t bytes = copies[i], total = bytes + 64;
        uint8_t *dev = call_alloc(be, total), *src = malloc(bytes + 1), *back = malloc(bytes + 2);
        for (size_t j = 0; j <= bytes; j++) src[j] = (uint8_t)rng_u64(r);
        for (size_t j = 0; j < bytes + 2; j++) back[j] = 0xEE;
        call_upload(be, dev + 4, src + 1, bytes); /* unaligned host side, device side at an offset */
        call_download(be, back + 1, dev + 4, bytes);
        uint8_t *all = read_back(be, dev, total);
        int ok = memcmp(back + 1, src + 1, bytes) == 0 && back[0] == 0xEE && back[bytes + 1] == 0xEE;
        int untouched = 1;
        for (size_t j = 0; j < total; j++)
            if (j < 4 || j >= 4 + bytes) untouched &= all[j] == 0;
        ok &= memcmp(all + 4, src + 1, bytes) == 0;
        const void *view = tk_host_view(be, back + 1, dev + 4, bytes);
        ok &= bytes == 0 || memcmp(view, src + 1, bytes) == 0;
        char what[96];
        snprintf(what, sizeof what, "%zu bytes at offset 4 of a %zu-byte buffer, and back; host view", bytes, total);
        report_bool("upload / download", what, ok && untouched, untouched ? NULL : "bytes outside the copy changed");
        free(all), free(src), free(back);
        call_free(be, dev);
    }
    report_bool("sync", "TK_OK after the copies", call_sync(be) == TK_OK, tk_last_error());
    report_bool("host_memory", be->host_memory ? "1: buffers are host memory" : "0: buffers are device memory", 1,
                NULL);
}

/* copy_rows: rows from anywhere in one buffer (at a column offset) to distinct rows of another (at another
 * offset); everything else in the destination untouched */
static void test_copy_rows(tk_backend *be, rng_t *r)
{
    static const int cases[][2] = {{0, 5}, {1, 1}, {7, 33}, {64, 577}, {300, 64}, {300, 1025}}; /* rows, n */
    for (int ci = 0; ci < 6; ci++) {
        int rows = cases[ci][0], n = cases[ci][1];
        int src_rows = rows + 9, ld_s = n + 3, dst_rows = 2 * rows + 5, ld_d = n + 7;
        size_t src_floats = (size_t)src_rows * ld_s, dst_floats = (size_t)dst_rows * ld_d;
        float *src_h = fvec(src_floats), *dst_h = fvec(dst_floats);
        for (size_t i = 0; i < src_floats; i++) src_h[i] = (float)rng_normal(r);
        for (size_t i = 0; i < dst_floats; i++) dst_h[i] = PAD_SENTINEL;
        float *src = call_alloc(be, src_floats * sizeof(float)), *dst = call_alloc(be, dst_floats * sizeof(float));
        call_upload(be, src, src_h, src_floats * sizeof(float));
        call_upload(be, dst, dst_h, dst_floats * sizeof(float));
        int *dst_perm = malloc((size_t)dst_rows * sizeof(int)), *src_perm = malloc((size_t)src_rows * sizeof(int));
        for (int i = 0; i < dst_rows; i++) dst_perm[i] = i;
        for (int i = 0; i < src_rows; i++) src_perm[i] = i;
        for (int i = dst_rows - 1; i > 0; i--) {
            int j = rng_int(r, 0, i), t = dst_perm[i];
            dst_perm[i] = dst_perm[j], dst_perm[j] = t;
        }
        for (int i = src_rows - 1; i > 0; i--) {
            int j = rng_int(r, 0, i), t = src_perm[i];
            src_perm[i] = src_perm[j], src_perm[j] = t;
        }
        float **dp = malloc((size_t)(rows ? rows : 1) * sizeof *dp), **sp = malloc((size_t)(rows ? rows : 1) * sizeof *sp);
        for (int i = 0; i < rows; i++) {
            dp[i] = dst + (size_t)dst_perm[i] * ld_d + 2, sp[i] = src + (size_t)src_perm[i] * ld_s + 1;
            memcpy(dst_h + (size_t)dst_perm[i] * ld_d + 2, src_h + (size_t)src_perm[i] * ld_s + 1, (size_t)n * sizeof(float));
        }
        call_copy_rows(be, (float *const *)dp, (const float *const *)sp, rows, n);
        float *got = (float *)read_back(be, dst, dst_floats * sizeof(float));
        char what[96];
        snprintf(what, sizeof what, "rows=%d n=%d: shuffled rows, src col 1 (ld %d) -> dst col 2 (ld %d)", rows, n,
                 ld_s, ld_d);
        report_bool("copy_rows", what, memcmp(got, dst_h, dst_floats * sizeof(float)) == 0,
                    "a destination float differs (copied wrong, or written outside the rows)");
        free(got), free(dp), free(sp), free(dst_perm), free(src_perm), free(src_h), free(dst_h);
        call_free(be, src), call_free(be, dst);
    }
}

/* ==== rows: the MoE block's grouping of tokens by expert and back =================================== */

/* rows, n, pad; the last two are work enough for the CPU backend to split them over its threads (by rows, and by
 * columns for add_rows) */
static const int ROW_CASES[][3] = {{1, 1, 0}, {5, 17, 3}, {64, 577, 1}, {300, 64, 0}, {300, 1025, 2}};
enum { N_ROW_CASES = sizeof ROW_CASES / sizeof ROW_CASES[0] };

/* add_rows: src rows (shuffled) added into dst rows that repeat (a token gets one row per expert), with and
 * without scales; within float rounding of the float64 sums (2 roundings per term: the product, the add) */
static void test_add_rows(tk_backend *be, rng_t *r)
{
    static const tol_t TOL_ADD_ROWS = {1e-30, 2.4e-7, 0}; /* relative to sum |terms| per element */
    for (int ci = 0; ci < N_ROW_CASES; ci++) {
        for (int scaled = 0; scaled < 2; scaled++) {
            int rows = ROW_CASES[ci][0], n = ROW_CASES[ci][1], dst_rows = rows / 3 + 1;
            mat src = mat_new(rows + 2, n, n + ROW_CASES[ci][2]), dst = mat_new(dst_rows, n, n + 2);
            mat_randn(&src, r, 1), mat_randn(&dst, r, 1);
            float **dp = malloc((size_t)rows * sizeof *dp), *scale = fvec((size_t)rows);
            const float **sp = malloc((size_t)rows * sizeof *sp);
            double *want = copy_of(&dst), *mag = abs_of(&dst);
            for (int i = 0; i < rows; i++) {
                int d = rng_int(r, 0, dst_rows - 1), s_row = (i * 7 + 1) % (rows + 2);
                scale[i] = scaled ? (float)rng_normal(r) : 1.0f;
                dp[i] = dst.f + (size_t)d * dst.ld, sp[i] = src.f + (size_t)s_row * src.ld;
                for (int j = 0; j < n; j++) {
                    double term = (double)scale[i] * src.d[(size_t)s_row * src.ld + j];
                    want[(size_t)d * dst.ld + j] += term;
                    mag[(size_t)d * dst.ld + j] += fabs(term);
                }
            }
            call_add_rows(be, &dst, &src, dp, sp, scaled ? scale : NULL, rows, n);
            char what[128];
            snprintf(what, sizeof what, "rows=%d into %d rows, n=%d, %s", rows, dst_rows, n,
                     scaled ? "scaled" : "scale NULL");
            int guard = mat_guard_ok(&dst) && mat_guard_ok(&src);
            report("add_rows", what, compare(dst.f, want, mag, dst_rows, n, dst.ld, TOL_ADD_ROWS), TOL_ADD_ROWS,
                   guard, guard_note(guard));
            free(dp), free(sp), free(scale), free(want), free(mag);
            mat_free(&src), mat_free(&dst);
        }
    }
}

/* scale_rows: one float product per element (exact against the float64 product rounded once) */
static void test_scale_rows(tk_backend *be, rng_t *r)
{
    for (int ci = 0; ci < N_ROW_CASES; ci++) {
        int rows = ROW_CASES[ci][0], n = ROW_CASES[ci][1];
        mat x = mat_new(rows, n, n + ROW_CASES[ci][2]);
        mat_randn(&x, r, 1);
        float *scale = fvec((size_t)rows);
        for (int i = 0; i < rows; i++) scale[i] = i % 5 == 4 ? 0.0f : (float)rng_normal(r);
        double *want = copy_of(&x);
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < n; j++) want[(size_t)i * x.ld + j] *= scale[i];
        call_scale_rows(be, &x, scale);
        char what[96];
        snprintf(what, sizeof what, "rows=%d n=%d ldx=%d (some scales 0)", rows, n, x.ld);
        int guard = mat_guard_ok(&x);
        report("scale_rows", what, compare(x.f, want, NULL, rows, n, x.ld, TOL_EXACT), TOL_EXACT, guard,
               guard_note(guard));
        free(scale), free(want);
        mat_free(&x);
    }
}

/* row_dot: a double sum rounded once: within half an ulp-ish of sum |a b| */
static void test_row_dot(tk_backend *be, rng_t *r)
{
    static const tol_t TOL_ROW_DOT = {1e-30, 1.2e-7, 0};
    for (int ci = 0; ci < N_ROW_CASES; ci++) {
        int rows = ROW_CASES[ci][0], n = ROW_CASES[ci][1];
        mat a = mat_new(rows, n, n + ROW_CASES[ci][2]), b = mat_new(rows, n, n + 5);
        mat_randn(&a, r, 1), mat_randn(&b, r, 3);
        float *out = fvec((size_t)rows);
        double *want = dvec((size_t)rows), *mag = dvec((size_t)rows);
        for (int i = 0; i < rows; i++) {
            out[i] = NAN;
            for (int j = 0; j < n; j++) {
                double t = a.d[(size_t)i * a.ld + j] * b.d[(size_t)i * b.ld + j];
                want[i] += t, mag[i] += fabs(t);
            }
        }
        call_row_dot(be, out, &a, &b);
        char what[96];
        snprintf(what, sizeof what, "rows=%d n=%d lda=%d ldb=%d", rows, n, a.ld, b.ld);
        report("row_dot", what, compare(out, want, mag, 1, rows, rows, TOL_ROW_DOT), TOL_ROW_DOT, 1, NULL);
        free(out), free(want), free(mag);
        mat_free(&a), mat_free(&b);
    }
}

/* zero_rows: NaN rows become 0, their padding stays */
static void test_zero_rows(tk_backend *be, rng_t *r)
{
    (void)r;
    for (int ci = 0; ci < N_ROW_CASES; ci++) {
        int rows = ROW_CASES[ci][0], n = ROW_CASES[ci][1];
        mat x = mat_new(rows, n, n + ROW_CASES[ci][2] + 1);
        mat_fill(&x, NAN);
        double *want = dvec((size_t)rows * x.ld);
        call_zero_rows(be, &x);
        char what[96];
        snprintf(what, sizeof what, "rows=%d n=%d ldx=%d", rows, n, x.ld);
        int guard = mat_guard_ok(&x);
        report("zero_rows", what, compare(x.f, want, NULL, rows, n, x.ld, TOL_EXACT), TOL_EXACT, guard,
               guard_note(guard));
        free(want);
        mat_free(&x);
    }
}

/* ==== indexing (the loss's targets) ================================================================= */

static const int INDEX_CASES[][4] = {{1, 1, 0, 1}, {3, 17, 3, 0}, {65, 577, 2, 1000}, {7, 50257, 5, 7}}; /* rows, cols, pad, n */

static void random_pairs(int32_t *row, int32_t *col, int n, int rows, int cols, rng_t *r)
{
    for (int i = 0; i < n; i++) {
        row[i] = i == 0 ? 0 : i == 1 ? rows - 1 : rng_int(r, 0, rows - 1);
        col[i] = i == 0 ? 0 : i == 1 ? cols - 1 : rng_int(r, 0, cols - 1);
    }
}

static void test_gather(tk_backend *be, rng_t *r)
{
    for (int ci = 0; ci < 4; ci++) {
        int rows = INDEX_CASES[ci][0], cols = INDEX_CASES[ci][1], n = INDEX_CASES[ci][3];
        mat x = mat_new(rows, cols, cols + INDEX_CASES[ci][2]);
        mat_randn(&x, r, 3);
        int32_t *row = malloc((size_t)(n ? n : 1) * sizeof *row), *col = malloc((size_t)(n ? n : 1) * sizeof *col);
        random_pairs(row, col, n, rows, cols, r);
        float *out = fvec((size_t)n); /* exactly n: nothing past it may be written */
        for (int i = 0; i < n; i++) out[i] = NAN;
        double *want = dvec((size_t)n);
        ref_gather(want, x.d, x.ld, row, col, n);
        call_gather(be, out, &x, row, col, n);
        char what[96];
        snprintf(what, sizeof what, "n=%d from [%d, %d] ldx=%d (first and last element included)", n, rows, cols, x.ld);
        report("gather", what, compare(out, want, NULL, 1, n, n, TOL_EXACT), TOL_EXACT, 1, NULL);
        free(row), free(col), free(out), free(want);
        mat_free(&x);
    }
}

/* scatter_add: pairs repeat (a few targets get many values), and one target gets 1e8, 1, -1e8 in that order,
 * where float addition is not associative: the result must be the in-order float sums exactly, and within
 * float rounding of the float64 sums */
static void test_scatter_add(tk_backend *be, rng_t *r)
{
    static const tol_t TOL_SCATTER = {1e-30, 2.4e-7, 0}; /* |err| <= ~2 ulp of sum |terms| per target */
    for (int ci = 0; ci < 4; ci++) {
        int rows = INDEX_CASES[ci][0], cols = INDEX_CASES[ci][1], n = INDEX_CASES[ci][3] + 3;
        mat x = mat_new(rows, cols, cols + INDEX_CASES[ci][2]);
        mat_randn(&x, r, 1);
        int32_t *row = malloc((size_t)n * sizeof *row), *col = malloc((size_t)n * sizeof *col);
        float *val = fvec((size_t)n);
        double *vald = dvec((size_t)n);
        random_pairs(row, col, n - 3, rows, cols, r);
        for (int i = 2; i < n - 3; i++) /* half of the pairs repeat one of 3 targets */
            if (rng_int(r, 0, 1)) row[i] = row[i % 3], col[i] = col[i % 3];
        for (int i = 0; i < n - 3; i++) val[i] = (float)rng_normal(r);
        static const float order[] = {1e8f, 1.0f, -1e8f};
        for (int i = n - 3; i < n; i++) row[i] = rows - 1, col[i] = 0, val[i] = order[i - (n - 3)];
        for (int i = 0; i < n; i++) vald[i] = val[i];
        double *want = copy_of(&x), *scale = abs_of(&x), *absval = dvec((size_t)n);
        for (int i = 0; i < n; i++) absval[i] = fabs(vald[i]);
        ref_scatter_add(want, x.ld, row, col, vald, n);
        ref_scatter_add(scale, x.ld, row, col, absval, n);
        mat in_order = mat_new(rows, cols, x.ld); /* float sums in the given order */
        mat_copy(&in_order, &x);
        for (int i = 0; i < n; i++) in_order.f[(size_t)row[i] * x.ld + col[i]] += val[i];
        mat_to_double(&in_order);
        call_scatter_add(be, &x, row, col, val, n);
        char what[128];
        snprintf(what, sizeof what, "n=%d into [%d, %d] ldx=%d (repeats; 1e8, 1, -1e8 on one)", n, rows, cols, x.ld);
        int guard = mat_guard_ok(&x);
        report("scatter_add", what, compare(x.f, want, scale, rows, cols, x.ld, TOL_SCATTER), TOL_SCATTER, guard,
               guard_note(guard));
        report("scatter_add in order", what, compare(x.f, in_order.d, NULL, rows, cols, x.ld, TOL_EXACT), TOL_EXACT,
               1, NULL);
        free(row), free(col), free(val), free(vald), free(want), free(scale), free(absval);
        mat_free(&x), mat_free(&in_order);
    }
}

/* ==== the optimizer ================================================================================= */

static int g_backend_index; /* which of BACKENDS runs now: later ones are compared with the first */

/* sum_squares in double: within n double roundings of the exact sum (a float sum is ~1e-7 off, and overflows
 * or underflows on the 1e20 and 1e-25 cases); the same bits whatever the thread count */
static void test_sum_squares(tk_backend *be, rng_t *r)
{
    static const size_t sizes[] = {0, 1, 63, 64, 65, 1000, (1u << 20) + 3, 100, 100};
    static const double scales[] = {1, 1, 1, 1, 1, 1, 1, 1e20, 1e-25};
    enum { N_CASES = sizeof sizes / sizeof sizes[0] };
    static double first[N_CASES];
    for (int ci = 0; ci < N_CASES; ci++) {
        size_t n = sizes[ci];
        float *x = fvec(n);
        for (size_t i = 0; i < n; i++) x[i] = (float)(scales[ci] * rng_normal(r));
        double want = ref_sum_squares(x, n), got = call_sum_squares(be, x, n);
        double bound = 4e-16 * (double)(n ? n : 1) * want + 1e-300;
        char what[96], detail[128];
        snprintf(what, sizeof what, "n=%zu |x|~%g", n, scales[ci]);
        snprintf(detail, sizeof detail, "got %.17g, want %.17g: |err| / (4e-16 n sum) = %.2f", got, want,
                 fabs(got - want) / bound);
        report_bool("sum_squares", what, fabs(got - want) <= bound, detail);
        /* the CPU backend's sum (devsim's is the CPU's) does not depend on its thread count; a GPU's adds blocks'
         * partial sums in its own order, held to the bound above only */
        if (g_backend_index == 0) first[ci] = got;
        else if (strcmp(be->name, "cuda") != 0)
            report_bool("sum_squares threads", what, memcmp(&got, &first[ci], sizeof got) == 0,
                        "differs from the first backend's (another thread count)");
        free(x);
    }
}

typedef struct {
    int n;
    double beta1, beta2, lr, wd, eps, max_norm; /* max_norm 0: no clipping */
    int steps;
} adamw_case;

/* b1w < 0.5 and >= 0.5 (torch.lerp's two formulas), beta1 = beta2 = 0, with and without weight decay and
 * clipping (active and not), odd n, n split over tasks unevenly */
static const adamw_case ADAMW_CASES[] = {
    {1, 0.9, 0.999, 1e-3, 0.01, 1e-8, 0, 3},
    {63, 0.9, 0.95, 3e-4, 0, 1e-8, 1.0, 3},
    {1000, 0.3, 0.99, 1e-2, 0.1, 1e-6, 0.5, 2},
    {7, 0, 0, 1e-3, 0.01, 1e-8, 100, 2},
    {100003, 0.9, 0.999, 1e-4, 0.01, 1e-8, 0, 2},
};

/* One step in float32 exactly as torch's _single_tensor_adamw does it on CPU, one operation at a time (after
 * clip_grad_norm_'s g *= clip): p.mul_(1 - lr wd); m.lerp_(g, 1 - beta1); v.mul_(beta2).addcmul_(g, g, 1 - beta2);
 * denom = (v.sqrt() / bc2_sqrt).add_(eps); p.addcdiv_(m, denom, -step_size) */
static void torch_adamw_float(float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f)
{
    for (size_t i = 0; i < n; i++) {
        float grad = g[i] * f->clip_scale;
        p[i] = p[i] * f->decay;
        float w = f->b1w;
        m[i] = w < 0.5f ? m[i] + w * (grad - m[i]) : grad - (grad - m[i]) * (1.0f - w); /* at::lerp */
        v[i] = v[i] * f->b2;
        v[i] = v[i] + f->b2w * grad * grad; /* addcmul: self + value * t1 * t2 */
        float denom = sqrtf(v[i]) / f->bc2_sqrt;
        denom = denom + f->eps;
        p[i] = p[i] + -f->step_size * (m[i] / denom); /* addcdiv: self + value * (t1 / t2) */
        g[i] = 0.0f;
    }
}

static void test_adamw(tk_backend *be, rng_t *r)
{
    static const tol_t TOL_ADAMW = {1e-30, 1e-6, 0}; /* float32 vs float64 of one step: a few roundings */
    for (size_t ci = 0; ci < sizeof ADAMW_CASES / sizeof ADAMW_CASES[0]; ci++) {
        const adamw_case *c = &ADAMW_CASES[ci];
        size_t n = (size_t)c->n;
        float *p = fvec(n), *g = fvec(n), *m = fvec(n), *v = fvec(n);
        float *p2 = fvec(n), *g2 = fvec(n), *m2 = fvec(n), *v2 = fvec(n); /* the float reference's state */
        double *pd = dvec(n), *gd = dvec(n), *md = dvec(n), *vd = dvec(n);
        double *sp = dvec(n), *sm = dvec(n), *sv = dvec(n); /* summation scales */
        for (size_t i = 0; i < n; i++) p[i] = p2[i] = (float)rng_normal(r);
        cmp_t exact = {0, 0, 0, 0}, close = {0, 0, 0, 0};
        int zeroed = 1, peak_exact = 1;
        for (int step = 1; step <= c->steps; step++) {
            double lr = c->lr * (step == 2 ? 0.5 : 1); /* hyperparameters may change every step */
            for (size_t i = 0; i < n; i++) g[i] = g2[i] = (float)(0.1 * rng_normal(r));
            /* the factors as model/optim.c derives them (torch's, in double, rounded to float) */
            tk_adamw_factors f = {.clip_scale = 1.0f};
            double norm = sqrt(ref_sum_squares(g, n));
            if (c->max_norm > 0) {
                float coef = (float)c->max_norm / ((float)norm + 1e-6f);
                f.clip_scale = coef < 1.0f ? coef : 1.0f;
            }
            double bc1 = 1.0 - pow(c->beta1, step), bc2 = 1.0 - pow(c->beta2, step);
            f.decay = (float)(1.0 - lr * c->wd), f.step_size = (float)(lr / bc1), f.bc2_sqrt = (float)sqrt(bc2);
            f.b1w = (float)(1.0 - c->beta1), f.b2 = (float)c->beta2, f.b2w = (float)(1.0 - c->beta2);
            f.eps = (float)c->eps;
            /* float64 from this step's float32 state */
            for (size_t i = 0; i < n; i++) pd[i] = p[i], gd[i] = g[i], md[i] = m[i], vd[i] = v[i];
            for (size_t i = 0; i < n; i++) {
                double grad = gd[i] * f.clip_scale, mn = md[i] + f.b1w * (grad - md[i]);
                double vn = f.b2 * vd[i] + f.b2w * grad * grad, upd = f.step_size * mn / (sqrt(vn) / f.bc2_sqrt + f.eps);
                sm[i] = fabs(md[i]) + fabs(grad), sv[i] = vn, sp[i] = fabs(pd[i] * f.decay) + fabs(upd);
            }
            ref_adamw(pd, gd, md, vd, n, f.clip_scale, f.decay, f.step_size, f.bc2_sqrt, f.b1w, f.b2, f.b2w, f.eps);
            torch_adamw_float(p2, g2, m2, v2, n, &f);
            float peak = call_adamw_peak(be, p, g, m, v, n, &f);
            call_adamw(be, p, g, m, v, n, &f);
            float want_peak = 0.0f;
            for (size_t i = 0; i < n; i++) want_peak = fabsf(p[i]) > want_peak ? fabsf(p[i]) : want_peak;
            peak_exact &= memcmp(&peak, &want_peak, sizeof peak) == 0;
            close = cmp_merge(close, compare(p, pd, sp, 1, c->n, c->n, TOL_ADAMW));
            close = cmp_merge(close, compare(m, md, sm, 1, c->n, c->n, TOL_ADAMW));
            close = cmp_merge(close, compare(v, vd, sv, 1, c->n, c->n, TOL_ADAMW));
            double *e = dvec(n);
            for (size_t i = 0; i < n; i++) e[i] = p2[i];
            exact = cmp_merge(exact, compare(p, e, NULL, 1, c->n, c->n, TOL_EXACT));
            for (size_t i = 0; i < n; i++) e[i] = m2[i];
            exact = cmp_merge(exact, compare(m, e, NULL, 1, c->n, c->n, TOL_EXACT));
            for (size_t i = 0; i < n; i++) e[i] = v2[i];
            exact = cmp_merge(exact, compare(v, e, NULL, 1, c->n, c->n, TOL_EXACT));
            free(e);
            for (size_t i = 0; i < n; i++) zeroed &= g[i] == 0.0f;
        }
        char what[160];
        snprintf(what, sizeof what, "n=%d steps=%d betas=%g,%g lr=%g wd=%g eps=%g clip=%g: p, m, v", c->n, c->steps,
                 c->beta1, c->beta2, c->lr, c->wd, c->eps, c->max_norm);
        report("adamw", what, close, TOL_ADAMW, zeroed, zeroed ? NULL : "g is not 0 afterwards");
        report("adamw = torch's float ops", what, exact, TOL_EXACT, 1, NULL);
        report_bool("adamw_peak", what, peak_exact, "differs from the largest |p| adamw then wrote");
        free(p), free(g), free(m), free(v), free(p2), free(g2), free(m2), free(v2);
        free(pd), free(gd), free(md), free(vd), free(sp), free(sm), free(sv);
    }
}

/* adamw_peak is +inf when one updated value would be non-finite (a step size past float32, a gradient whose
 * square overflows the second moment), whichever task holds it, and writes nothing */
static void test_adamw_peak_nonfinite(tk_backend *be, rng_t *r)
{
    size_t n = 1000;
    float *p = fvec(n), *g = fvec(n), *m = fvec(n), *v = fvec(n), *p0 = fvec(n), *g0 = fvec(n);
    for (size_t i = 0; i < n; i++) p[i] = p0[i] = (float)rng_normal(r), g[i] = g0[i] = (float)(0.1 * rng_normal(r));
    tk_adamw_factors f = {.clip_scale = 1, .decay = 1, .step_size = 1e-3f, .bc2_sqrt = 0.1f, .b1w = 0.1f,
                          .b2 = 0.99f, .b2w = 0.01f, .eps = 1e-8f};
    float finite = call_adamw_peak(be, p, g, m, v, n, &f);
    g[n - 1] = 1e30f; /* its square overflows v */
    float overflow = call_adamw_peak(be, p, g, m, v, n, &f);
    g[n - 1] = g0[n - 1];
    f.eps = 0, g[3] = 0; /* 0 / 0: a NaN update */
    float nan_update = call_adamw_peak(be, p, g, m, v, n, &f);
    int untouched = memcmp(p, p0, n * sizeof *p) == 0;
    for (size_t i = 0; i < n; i++) untouched &= m[i] == 0 && v[i] == 0;
    report_bool("adamw_peak", "finite step", isfinite(finite) && finite > 0, "not a finite positive peak");
    report_bool("adamw_peak", "gradient whose square overflows", isinf(overflow), "not +inf");
    report_bool("adamw_peak", "eps 0 and a zero gradient (0 / 0)", isinf(nan_update), "not +inf");
    report_bool("adamw_peak", "writes nothing", untouched, "changed p, m or v");
    free(p), free(g), free(m), free(v), free(p0), free(g0);
}

/* ==== RoPE tables =================================================================================== */

/* cos / sin of the float32 angle (float)p * inv_freq, p = the row's position component that frequency's axis names
 * (one component, or M-RoPE's three with an interleaved axis map): within 1 ulp of the float64 cos / sin of that
 * angle, and (the CPU backend's definition) equal to libm's cosf / sinf of it */
static void test_rope_table(tk_backend *be, rng_t *r)
{
    static const tol_t TOL_TRIG = {1e-30, 1.2e-7, 0}; /* 1 ulp (2^-23 relative bounds it) */
    static const int cases[][3] = {{1, 1, 1}, {5, 3, 1}, {300, 32, 1}, {17, 64, 1}, {9, 8, 3}, {70, 64, 3}};
    static const double thetas[] = {10000, 10000, 10000, 500000, 10000, 5000000}; /* rows, half, pos_dims */
    static const int32_t fixed[] = {0, 1, 2, 4095, 8191, 32767, 131071, 524287};
    for (int ci = 0; ci < 6; ci++) {
        int rows = cases[ci][0], half = cases[ci][1], dims = cases[ci][2];
        int32_t *pos = malloc((size_t)rows * dims * sizeof *pos);
        for (int i = 0; i < rows * dims; i++) pos[i] = i < 8 ? fixed[(i + ci) % 8] : rng_int(r, 0, 131071);
        int8_t *axis = NULL;
        if (dims == 3) { /* Qwen3-VL's interleaved sections: H at i % 3 == 1, W at i % 3 == 2, below 3 * section */
            axis = malloc((size_t)half);
            int sec_h = half * 5 / 16, sec_w = half * 5 / 16;
            for (int i = 0; i < half; i++)
                axis[i] = (int8_t)(i % 3 == 1 && i < 3 * sec_h ? 1 : i % 3 == 2 && i < 3 * sec_w ? 2 : 0);
        }
        float *inv_freq = fvec((size_t)half), *c = fvec((size_t)rows * half), *s = fvec((size_t)rows * half);
        for (int i = 0; i < half; i++) inv_freq[i] = (float)(1.0 / pow(thetas[ci], 2.0 * i / (2.0 * half)));
        for (size_t i = 0; i < (size_t)rows * half; i++) c[i] = s[i] = NAN;
        double *want_c = dvec((size_t)rows * half), *want_s = dvec((size_t)rows * half);
        double *libm_c = dvec((size_t)rows * half), *libm_s = dvec((size_t)rows * half);
        ref_rope_table(want_c, want_s, pos, dims, rows, inv_freq, axis, half);
        for (int t = 0; t < rows; t++)
            for (int i = 0; i < half; i++) {
                float angle = (float)pos[(size_t)t * dims + (axis ? axis[i] : 0)] * inv_freq[i];
                libm_c[(size_t)t * half + i] = cosf(angle), libm_s[(size_t)t * half + i] = sinf(angle);
            }
        call_rope_table(be, c, s, pos, dims, rows, inv_freq, axis, half);
        char what[128];
        snprintf(what, sizeof what, "rows=%d half=%d theta=%g components=%d positions up to %d", rows, half,
                 thetas[ci], dims, 524287);
        cmp_t close = cmp_merge(compare(c, want_c, NULL, rows, half, half, TOL_TRIG),
                                compare(s, want_s, NULL, rows, half, half, TOL_TRIG));
        report("rope_table", what, close, TOL_TRIG, 1, NULL);
        cmp_t same = cmp_merge(compare(c, libm_c, NULL, rows, half, half, TOL_EXACT),
                               compare(s, libm_s, NULL, rows, half, half, TOL_EXACT));
        report("rope_table = cosf, sinf", what, same, TOL_EXACT, 1, NULL);
        free(pos), free(axis), free(inv_freq), free(c), free(s), free(want_c), free(want_s), free(libm_c), free(libm_s);
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
    const char *needs; /* the table entries it calls, besides memory (a backend without one skips it) */
} op_test;

static const op_test OP_TESTS[] = {
    {"weight_bytes", test_weight_bytes, "weight_bytes matmul_w"}, /* every storage type: a backend with matmuls */
    {"matmul_w", test_weight_matmuls, "weight_bytes weight_put_row matmul_w matmul_w_decode matmul_w_t"},
    {"matmul_w_grouped", test_weight_grouped, "weight_bytes weight_put_row matmul_w_grouped matmul_w_t_grouped"},
    {"matmul_nt", test_matmul_nt, "matmul_nt matmul_nt_decode matmul_nn matmul_tn_acc"},
    {"matmul_nn", test_matmul_nn, "matmul_nn"},
    {"matmul_nt rows", test_matmul_nt_rows, "matmul_nt"},
    {"matmul_nt_many", test_matmul_nt_many, "matmul_nt matmul_nt_decode matmul_nt_many"},
    {"matmul_tn_acc", test_matmul_tn_acc, "matmul_tn_acc"},
    {"memory", test_memory, ""}, /* alloc, free, upload, download, sync */
    {"copy_rows", test_copy_rows, "copy_rows"},
    {"add_rows", test_add_rows, "add_rows"},
    {"scale_rows", test_scale_rows, "scale_rows"},
    {"row_dot", test_row_dot, "row_dot"},
    {"zero_rows", test_zero_rows, "zero_rows"},
    {"gather", test_gather, "gather"},
    {"scatter_add", test_scatter_add, "scatter_add"},
    {"sum_squares", test_sum_squares, "sum_squares"},
    {"adamw", test_adamw, "adamw adamw_peak"},
    {"adamw_peak", test_adamw_peak_nonfinite, "adamw_peak"},
    {"embed", test_embed, "weight_bytes weight_put_row embed matmul_w"}, /* tables of every storage type */
    {"rmsnorm", test_rmsnorm, "rmsnorm"},
    {"rmsnorm_backward", test_rmsnorm_backward, "rmsnorm rmsnorm_backward"},
    {"add_bias", test_add_bias, "add_bias"},
    {"rope_table", test_rope_table, "rope_table"},
    {"rope", test_rope, "rope"},
    {"swiglu", test_swiglu, "swiglu"},
    {"swiglu_backward", test_swiglu_backward, "swiglu_backward"},
    {"logsumexp", test_logsumexp, "logsumexp"},
    {"softmax_scale", test_softmax_scale, "softmax_scale"},
    {"attention", test_attention, "attention attention_workspace"},
    {"attention_backward", test_attention_backward,
     "attention attention_workspace attention_backward attention_backward_workspace"},
    {"attention_decode", test_attention_decode, "attention_decode attention_decode_workspace"},
    {"attention_cached", test_attention_cached,
     "attention attention_workspace attention_cached attention_cached_workspace"},
    {"attention_full", test_attention_full, "attention_full attention_workspace"},
    {"layer_norm", test_layer_norm, "layer_norm"},
    {"gelu", test_gelu, "gelu"},
};

/* The table's entries by name, for the tests' `needs` (a backend being written fills them in one by one) */
#define FIELD(f) {#f, offsetof(tk_backend, f)}
static const struct {
    const char *name;
    size_t offset;
} TABLE_FIELDS[] = {
    FIELD(weight_bytes), FIELD(weight_put_row), FIELD(matmul_w), FIELD(matmul_w_decode), FIELD(matmul_w_t),
    FIELD(matmul_w_grouped), FIELD(matmul_w_t_grouped), FIELD(matmul_nt), FIELD(matmul_nt_decode),
    FIELD(matmul_nt_many), FIELD(matmul_nn), FIELD(matmul_tn_acc), FIELD(alloc), FIELD(free), FIELD(upload),
    FIELD(download), FIELD(copy_rows), FIELD(sync), FIELD(add_rows), FIELD(scale_rows), FIELD(row_dot),
    FIELD(zero_rows), FIELD(gather), FIELD(scatter_add), FIELD(sum_squares), FIELD(adamw), FIELD(adamw_peak),
    FIELD(embed), FIELD(rmsnorm), FIELD(rmsnorm_backward), FIELD(add_bias), FIELD(rope_table), FIELD(rope),
    FIELD(swiglu), FIELD(swiglu_backward), FIELD(logsumexp), FIELD(softmax_scale), FIELD(layer_norm), FIELD(gelu),
    FIELD(attention_full), FIELD(attention), FIELD(attention_workspace), FIELD(attention_backward),
    FIELD(attention_backward_workspace), FIELD(attention_decode), FIELD(attention_decode_workspace),
    FIELD(attention_cached), FIELD(attention_cached_workspace),
};
#undef FIELD

/* The first entry of `needs` (space-separated names, memory's always) that the backend leaves NULL, or NULL */
static const char *missing_entry(const tk_backend *be, const char *needs)
{
    static char name[64];
    char list[512];
    snprintf(list, sizeof list, "alloc free upload download sync %s", needs);
    for (char *save = NULL, *tok = strtok_r(list, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
        size_t i = 0, n = sizeof TABLE_FIELDS / sizeof TABLE_FIELDS[0];
        while (i < n && strcmp(TABLE_FIELDS[i].name, tok) != 0) i++;
        if (i == n) {
            fprintf(stderr, "test harness: unknown table entry '%s'\n", tok);
            exit(2);
        }
        void (*fn)(void);
        memcpy(&fn, (const char *)be + TABLE_FIELDS[i].offset, sizeof fn);
        if (!fn) return snprintf(name, sizeof name, "%s", tok), name;
    }
    return NULL;
}

/* The backends this build has, each made by the factory the engine is given (tk_engine_create's
 * create_backend) over a pool of `threads` (the CPU one splits work over it: 1 thread runs everything on the
 * caller, 3 split odd ways), and released as the engine releases it. */
typedef struct {
    const char *label;
    int threads;
    tk_backend *(*create)(tk_pool *pool);
    int optional; /* may be absent on this machine (a GPU): a failed creation is reported, not a failure */
} backend_kind;

/* devsim: the CPU backend behind device pointers the host cannot read (csrc/backend/devsim), so every call
 * below must hand the ops device copies, as a GPU needs; with CUDA (TK_HAVE_CUDA: tests/native_build.py
 * compiles the .cu sources where nvcc is), the GPU backend, skipped where no GPU is visible (`optional`) */
static const backend_kind BACKENDS[] = {
    {"cpu/1 thread", 1, tk_cpu_backend_create, 0},
    {"cpu/3 threads", 3, tk_cpu_backend_create, 0},
    {"devsim/2 threads", 2, tk_devsim_backend_create, 0},
#ifdef TK_HAVE_CUDA
    {"cuda", 1, tk_cuda_backend_create, 1},
#endif
};

static int g_argc;
static char **g_argv;

/* $TK_TEST_BACKENDS (labels' first words, comma-separated: "cuda", "cpu,devsim"): only those backends */
static int backend_selected(const char *label)
{
    const char *list = getenv("TK_TEST_BACKENDS");
    if (!list || !*list) return 1;
    size_t word = strcspn(label, "/ ");
    for (const char *at = list; *at;) {
        size_t n = strcspn(at, ",");
        if (n == word && strncmp(at, label, n) == 0) return 1;
        at += n + (at[n] == ',');
    }
    return 0;
}

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
        tk_pool *pool = NULL;
        tk_backend *be = NULL;
        if (!backend_selected(BACKENDS[b].label)) continue;
        g_backend_label = BACKENDS[b].label;
        g_backend_index = (int)b;
        if (tk_pool_create(&pool, BACKENDS[b].threads) != TK_OK || !(be = BACKENDS[b].create(pool))) {
            if (BACKENDS[b].optional) printf("skip %s: %s\n", BACKENDS[b].label, tk_last_error());
            else report_bool("(create)", "the backend could not be created", 0, tk_last_error());
            tk_pool_free(pool);
            continue;
        }
        g_pool = pool;
        g_rounding = be->weight_rounding;
        /* the engine holds the one reference a new backend has; models and adapters add theirs */
        int refs = atomic_load(&be->refcount);
        tk_backend_retain(be);
        refs = refs * 10 + atomic_load(&be->refcount);
        tk_backend_release(be);
        refs = refs * 10 + atomic_load(&be->refcount);
        report_bool("(create)", "refcount 1 when made, 2 retained, 1 released; destroy set", refs == 121 && be->destroy,
                    be->name);
        for (size_t i = 0; i < sizeof OP_TESTS / sizeof OP_TESTS[0]; i++) {
            if (!selected(OP_TESTS[i].name)) continue;
            const char *missing = missing_entry(be, OP_TESTS[i].needs);
            if (missing) { /* a backend being written: not a failure, but listed */
                printf("skip %s %s: no %s yet\n", g_backend_label, OP_TESTS[i].name, missing);
                continue;
            }
            rng_t op_rng = {r.s + i * 7919}; /* each op's inputs do not depend on which others ran */
            OP_TESTS[i].fn(be, &op_rng);
        }
        tk_backend_release(be); /* the last reference: destroys it */
        tk_pool_free(pool);
    }
    printf("%d notes (%d DIFF: not checks, see rows_alone_equal)\n", g_notes, g_notes_diff);
    printf("%d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
