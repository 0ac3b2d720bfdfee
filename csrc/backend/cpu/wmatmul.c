/* wmatmul.c - base weights on the CPU: one resident form per weight, in its
 * file's own type, decoded exactly inside the matmuls.
 *
 * Resident forms: Q4_0, Q4_1 and Q8_0 parts are repacked into 16-row tiles
 * (qmatrix.h) - the same bytes, moved so one vector load gives one element of
 * 16 rows; every other type (F32, F16, BF16, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
 * keeps the file's rows of blocks as they are.
 *
 * Many token rows (prefill, training, the head) of a tiled part: each thread
 * decodes blocks of tiles (128 weight rows x up to 1024 columns, in L2) into
 * the K-major column blocks the register kernel of tgemm.c reads - the tiles'
 * own order - and sweeps every token row over them, so the decode costs one
 * pass over the weight per call while the kernel does 2T flops per weight.
 *   forward  y[T, N] = x[T, K] W^T: threads split N, blocks walk their rows;
 *   backward y[T, K] = x[T, N] W:   threads split K (whole tiles), blocks of
 *                                    W's rows decoded transposed, summed.
 * Row forms (F16, BF16, Q5_x, K-quants) the same way: rows decoded to
 * float32 - exactly the tk_dequantize values - and put in the same blocks
 * (transposed in 16 x 32 tiles forward; W's rows are already K-major in the
 * backward). sgemm on a decoded panel would pack it again: measured on the
 * bfloat16 experts of a Qwen3-MoE prefill, as much time as the decoding, and
 * the blocks make the whole forward 17% cheaper.
 * Decoding steps (matmul_w_decode) of a tiled part, up to
 * TK_CPU_QKERNEL_MAX_ROWS sequences: the register kernel of qmatmul.c, which
 * streams the tiles once; of a row form, up to SMALL_T sequences: 16 decoded
 * rows at a time dotted with each token row. Prefill and training always take
 * the blocks, whatever their size, so a prompt's logits do not depend on how
 * many other prompts share its pass (bit for bit: tgemm sums each output
 * alone, in k order).
 */
#include "wmatmul.h"

#include <stdlib.h>
#include <string.h>

#include "../../io/quant.h"
#include "../qmatrix.h"
#include "qmatmul.h"
#include "tgemm.h"
#include "vec_math.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

/* Floats of one thread's panel: 4 MB, the blocks tgemm reads (128 weight rows x up to ~1300 columns) and a
 * decoded row or 32; cols up to 65536 still get 16 rows. */
enum { PANEL_FLOATS = 1 << 20, SMALL_T = 8, DOT_PANEL_ROWS = 16 };

int tk_cpu_panels_init(tk_cpu_panels *p, int threads)
{
    p->threads = threads;
    p->floats = PANEL_FLOATS;
    p->buf = calloc((size_t)threads, sizeof *p->buf);
    for (int t = 0; p->buf && t < threads; t++)
        if (!(p->buf[t] = aligned_alloc(64, PANEL_FLOATS * sizeof(float)))) return 0;
    return p->buf != NULL;
}

void tk_cpu_panels_free(tk_cpu_panels *p)
{
    for (int t = 0; p->buf && t < p->threads; t++) free(p->buf[t]);
    free(p->buf);
    p->buf = NULL;
}

static int tiled(int type) { return tk_qmatrix_supports(type); }

size_t tk_cpu_weight_bytes(int type, int rows, int cols)
{
    size_t bytes;
    if (rows < 1 || cols < 1 || cols > PANEL_FLOATS / 16) return 0;
    if (tiled(type)) {
        if (cols % TK_QBLOCK) return 0;
        bytes = tk_qmatrix_bytes(type, rows, cols);
    } else {
        size_t row_bytes = tk_quant_row_bytes(type, (size_t)cols);
        if (!row_bytes) return 0;
        bytes = row_bytes * (size_t)rows;
    }
    return (bytes + 63) & ~(size_t)63;
}

static tk_qmatrix as_qmatrix(const tk_weight_part *p, int cols)
{
    return (tk_qmatrix){p->type, p->rows, cols, p->data};
}

void tk_cpu_weight_put_row(const tk_weight_part *p, int cols, int row, const void *src)
{
    if (tiled(p->type)) {
        tk_qmatrix q = as_qmatrix(p, cols);
        tk_qmatrix_put_row(&q, row, src);
        return;
    }
    size_t row_bytes = tk_quant_row_bytes(p->type, (size_t)cols);
    memcpy((uint8_t *)p->data + (size_t)row * row_bytes, src, row_bytes);
}

/* ---- decoding ------------------------------------------------------------------------------ */

static void fp16x16_to_fp32(float *out, const uint8_t *h)
{
#if defined(__F16C__)
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)));
    _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 16))));
#else
    for (int r = 0; r < TK_QROWS; r++) {
        uint16_t v;
        memcpy(&v, h + 2 * r, sizeof v);
        out[r] = tk_fp16_to_fp32(v);
    }
#endif
}

/* out[k * ld + r] = element k of row r of one tile (32 x 16 values), bit for bit as tk_dequantize gives them,
 * by quant.c's own formulas: d*q (Q8_0), d*q + m (Q4_1), (q - 8)*d (Q4_0; d*q - 8d is the same value, but +0
 * where quant.c gives -0 when d is 0, and embed hands these values out as they are). */
static void decode_tile_kmajor(float *restrict out, int ld, const uint8_t *restrict tile, int type)
{
    float d[TK_QROWS], m[TK_QROWS];
    fp16x16_to_fp32(d, tile);
    if (type == TK_GGML_Q8_0) {
        const int8_t *q = (const int8_t *)(tile + 2 * TK_QROWS);
        for (int k = 0; k < TK_QBLOCK; k++)
            for (int r = 0; r < TK_QROWS; r++) out[(size_t)k * ld + r] = (float)q[k * TK_QROWS + r] * d[r];
        return;
    }
    if (type == TK_GGML_Q4_0) {
        const uint8_t *q = tile + 2 * TK_QROWS;
        for (int j = 0; j < 16; j++)
            for (int r = 0; r < TK_QROWS; r++) {
                out[(size_t)j * ld + r] = (float)((q[j * TK_QROWS + r] & 0x0F) - 8) * d[r];
                out[(size_t)(j + 16) * ld + r] = (float)((q[j * TK_QROWS + r] >> 4) - 8) * d[r];
            }
        return;
    }
    fp16x16_to_fp32(m, tile + 2 * TK_QROWS);
    const uint8_t *q = tile + 4 * TK_QROWS;
    for (int j = 0; j < 16; j++)
        for (int r = 0; r < TK_QROWS; r++) {
            out[(size_t)j * ld + r] = (float)(q[j * TK_QROWS + r] & 0x0F) * d[r] + m[r];
            out[(size_t)(j + 16) * ld + r] = (float)(q[j * TK_QROWS + r] >> 4) * d[r] + m[r];
        }
}

/* panel[(k - k0) * ld + (r - r0)] = W[r, k] for rows [r0, r1) (r0 a multiple of 16; whole groups, padding rows
 * decode to 0) and columns [k0, k1) (multiples of 32) of a tiled part */
static void decode_tiles(float *panel, int ld, const tk_weight_part *p, int cols, int r0, int r1, int k0, int k1)
{
    size_t tile_bytes = tk_qmatrix_tile_bytes(p->type), n_blocks = (size_t)cols / TK_QBLOCK;
    for (int g = r0 / TK_QROWS; g * TK_QROWS < r1; g++) {
        const uint8_t *tile = (const uint8_t *)p->data + ((size_t)g * n_blocks + (size_t)k0 / TK_QBLOCK) * tile_bytes;
        float *out = panel + (g * TK_QROWS - r0);
        for (int k = k0; k < k1; k += TK_QBLOCK, tile += tile_bytes, out += (size_t)TK_QBLOCK * ld)
            decode_tile_kmajor(out, ld, tile, p->type);
    }
}

/* panel[(r - r0) * ld + (k - k0)] = W[r, k] for a part kept as rows of blocks; k0, k1 multiples of its block */
static void decode_rows(float *panel, int ld, const tk_weight_part *p, int cols, int r0, int r1, int k0, int k1)
{
    size_t row_bytes = tk_quant_row_bytes(p->type, (size_t)cols);
    size_t skip = (size_t)(k0 / tk_quant_block_elems(p->type)) * tk_quant_block_bytes(p->type);
    for (int r = r0; r < r1; r++)
        tk_dequantize(panel + (size_t)(r - r0) * ld, (const uint8_t *)p->data + (size_t)r * row_bytes + skip, p->type,
                      (size_t)(k1 - k0));
}

int tk_cpu_part_row_splits(const tk_weight_part *p, int row) { return !tiled(p->type) || row % TK_QROWS == 0; }

tk_weight_part tk_cpu_part_rows(const tk_weight_part *p, int cols, int r0, int r1)
{
    tk_weight_part out = *p;
    size_t skip = tiled(p->type) ? (size_t)(r0 / TK_QROWS) * ((size_t)cols / TK_QBLOCK) * tk_qmatrix_tile_bytes(p->type)
                                 : (size_t)r0 * tk_quant_row_bytes(p->type, (size_t)cols);
    out.data = (uint8_t *)p->data + skip;
    out.row0 = p->row0 + r0;
    out.rows = r1 - r0;
    return out;
}

void tk_cpu_weight_row(float *dst, const tk_weight_part *p, int cols, int row)
{
    if (!tiled(p->type)) {
        decode_rows(dst, cols, p, cols, row, row + 1, 0, cols);
        return;
    }
    float tile[TK_QBLOCK * TK_QROWS];
    size_t tile_bytes = tk_qmatrix_tile_bytes(p->type), n_blocks = (size_t)cols / TK_QBLOCK;
    const uint8_t *t = (const uint8_t *)p->data + (size_t)(row / TK_QROWS) * n_blocks * tile_bytes;
    int lane = row % TK_QROWS;
    for (size_t b = 0; b < n_blocks; b++, t += tile_bytes) {
        decode_tile_kmajor(tile, TK_QROWS, t, p->type);
        for (int k = 0; k < TK_QBLOCK; k++) dst[b * TK_QBLOCK + (size_t)k] = tile[k * TK_QROWS + lane];
    }
}

/* ---- the matmuls ---------------------------------------------------------------------------- */

typedef struct {
    float *y;
    const float *x;
    const tk_weight_part *p;
    tk_cpu_panels *panels;
    int ldy, ldx, cols, T, n_tasks, unit, dot;
    float alpha, beta;
} part_args;

static int round16(int n) { return (n + 15) & ~15; }

/* [begin, end) of n for one of n_tasks tasks, in whole units */
static void unit_range(int task, int n_tasks, int n, int unit, int *begin, int *end)
{
    int units = (n + unit - 1) / unit;
    *begin = (int)((long)units * task / n_tasks) * unit;
    *end = (int)((long)units * (task + 1) / n_tasks) * unit;
    if (*end > n) *end = n;
}

static void store_dot(const part_args *a, float *y, float s)
{
    *y = a->beta == 0.0f ? a->alpha * s : a->alpha * s + a->beta * *y;
}

/* y[t, r] = alpha panel[r] . x[t] + beta y[t, r] for a few token rows (sgemm would pack the panel first), four
 * panel rows per pass over x (tk_dot4: the same sums as one row at a time) */
static void dot_rows(const part_args *a, float *y, const float *panel, int n)
{
    int K = a->cols;
    for (int t = 0; t < a->T; t++) {
        const float *xt = a->x + (size_t)t * a->ldx;
        float *yt = y + (size_t)t * a->ldy, s[4];
        int r = 0;
        for (; r + 4 <= n; r += 4) {
            const float *w = panel + (size_t)r * K;
            tk_dot4(s, w, w + K, w + 2 * K, w + 3 * K, xt, K);
            for (int i = 0; i < 4; i++) store_dot(a, yt + r + i, s[i]);
        }
        for (; r < n; r++) store_dot(a, yt + r, tk_dot1(panel + (size_t)r * K, xt, K));
    }
}

/* K columns per decoded block: all of them up to 1024, else even chunks (whole tiles): a block of TGEMM_COLS
 * weight rows (128 x 576 floats for SmolLM2, 288 KB) stays in L2 while every token row sweeps over it. */
enum { TGEMM_COLS = 128, TGEMM_MAX_K = 1024 };

static int tgemm_k_chunk(int K)
{
    int chunks = (K + TGEMM_MAX_K - 1) / TGEMM_MAX_K, kc = (K + chunks - 1) / chunks;
    return (kc + TK_QBLOCK - 1) / TK_QBLOCK * TK_QBLOCK;
}

/* y[:, r0:r1] = alpha x W_rows^T + beta y for a tiled part: blocks of tiles decoded into the K-major column
 * blocks tgemm reads (a tile group is 16 columns of one; a half-filled last block is zeroed) */
static void forward_tiles(const part_args *a, float *buf, int r0, int r1)
{
    int K = a->cols, kc_max = tgemm_k_chunk(K);
    for (int n0 = r0; n0 < r1; n0 += TGEMM_COLS) {
        int n1 = n0 + TGEMM_COLS < r1 ? n0 + TGEMM_COLS : r1;
        for (int k0 = 0; k0 < K; k0 += kc_max) {
            int kc = K - k0 < kc_max ? K - k0 : kc_max;
            for (int nb = n0; nb < n1; nb += TK_TGEMM_NR) {
                float *bp = buf + (size_t)(nb - n0) * kc;
                int filled = round16(n1 - nb < TK_TGEMM_NR ? n1 - nb : TK_TGEMM_NR);
                for (int k = 0; filled < TK_TGEMM_NR && k < kc; k++)
                    memset(bp + (size_t)k * TK_TGEMM_NR + filled, 0, (TK_TGEMM_NR - filled) * sizeof(float));
                decode_tiles(bp, TK_TGEMM_NR, a->p, K, nb, nb + filled, k0, k0 + kc);
            }
            tk_tgemm(a->T, n1 - n0, kc, a->x + k0, a->ldx, buf, a->y + n0, a->ldy, a->alpha,
                     k0 == 0 ? a->beta : 1.0f);
        }
    }
}

/* K columns per decoded block of a part kept as rows: as for tiles, in whole blocks of its type */
static int rows_k_chunk(int K, int block)
{
    int chunks = (K + TGEMM_MAX_K - 1) / TGEMM_MAX_K, kc = (K + chunks - 1) / chunks, unit = block > 16 ? block : 16;
    kc = (kc + unit - 1) / unit * unit;
    return kc < K ? kc : K;
}

/* bp[k * NR + j] = rows[j * kc + k] for k < kc, j < NR: 16 k at a time, so the block's lines being read and
 * written stay in L1 (one row at a time would write kc lines of bp per row) */
static void transpose_block(float *restrict bp, const float *restrict rows, int kc)
{
    int k0 = 0;
    for (; k0 + 16 <= kc; k0 += 16) {
        float *dst = bp + (size_t)k0 * TK_TGEMM_NR;
        for (int j = 0; j < TK_TGEMM_NR; j++) {
            const float *src = rows + (size_t)j * kc + k0;
            for (int i = 0; i < 16; i++) dst[i * TK_TGEMM_NR + j] = src[i]; /* unrolled: constant offsets */
        }
    }
    for (int j = 0; j < TK_TGEMM_NR; j++)
        for (int k = k0; k < kc; k++) bp[(size_t)k * TK_TGEMM_NR + j] = rows[(size_t)j * kc + k];
}

/* y[:, r0:r1] = alpha x W_rows^T + beta y for a part kept as rows of blocks (F16, BF16, Q5_x, K-quants): like
 * forward_tiles, NR rows' [k0, k0 + kc) decoded (into `rows`, NR x kc floats; rows past r1 zero) and transposed
 * into the K-major block tgemm reads, so the decoded weights are copied once (sgemm would pack the decoded panel
 * again: measured, as much time as the decoding). */
static void forward_rows(const part_args *a, float *buf, int r0, int r1)
{
    int K = a->cols, block = tk_quant_block_elems(a->p->type), kc_max = rows_k_chunk(K, block);
    size_t row_bytes = tk_quant_row_bytes(a->p->type, (size_t)K);
    float *rows = buf + (size_t)TGEMM_COLS * kc_max;
    for (int n0 = r0; n0 < r1; n0 += TGEMM_COLS) {
        int n1 = n0 + TGEMM_COLS < r1 ? n0 + TGEMM_COLS : r1;
        for (int k0 = 0; k0 < K; k0 += kc_max) {
            int kc = K - k0 < kc_max ? K - k0 : kc_max;
            size_t skip = (size_t)(k0 / block) * tk_quant_block_bytes(a->p->type);
            for (int nb = n0; nb < n1; nb += TK_TGEMM_NR) {
                int filled = n1 - nb < TK_TGEMM_NR ? n1 - nb : TK_TGEMM_NR;
                for (int j = 0; j < filled; j++)
                    tk_dequantize(rows + (size_t)j * kc, (const uint8_t *)a->p->data + (size_t)(nb + j) * row_bytes +
                                  skip, a->p->type, (size_t)kc);
                if (filled < TK_TGEMM_NR)
                    memset(rows + (size_t)filled * kc, 0, (size_t)(TK_TGEMM_NR - filled) * kc * sizeof(float));
                transpose_block(buf + (size_t)(nb - n0) * kc, rows, kc);
            }
            tk_tgemm(a->T, n1 - n0, kc, a->x + k0, a->ldx, buf, a->y + n0, a->ldy, a->alpha,
                     k0 == 0 ? a->beta : 1.0f);
        }
    }
}

/* y[:, rows of this task] = alpha x W_rows^T + beta y: tiled parts and row forms through tgemm (or, for the few
 * rows of a decoding step, row forms a few decoded rows at a time, dotted) */
static void forward_task(void *ctx, int task, int thread)
{
    part_args *a = ctx;
    int begin, end, K = a->cols;
    unit_range(task, a->n_tasks, a->p->rows, a->unit, &begin, &end);
    float *panel = a->panels->buf[thread];
    if (begin >= end) return;
    if (tiled(a->p->type)) {
        forward_tiles(a, panel, begin, end);
        return;
    }
    if (!a->dot) {
        forward_rows(a, panel, begin, end);
        return;
    }
    /* a decoding step dots each few decoded rows while they are in L1 */
    for (int r0 = begin; r0 < end; r0 += DOT_PANEL_ROWS) {
        int r1 = r0 + DOT_PANEL_ROWS < end ? r0 + DOT_PANEL_ROWS : end;
        decode_rows(panel, K, a->p, K, r0, r1, 0, K);
        dot_rows(a, a->y + r0, panel, r1 - r0);
    }
}

/* The backward's blocks: B = W[n0:n1, c0:c1] row-major in column blocks of TK_TGEMM_NR (bp[block][n][NR]),
 * each tile decoded K-major into a small buffer and written transposed */
static void decode_tiles_transposed(float *bp, const tk_weight_part *p, int cols, int n0, int n1, int c0, int c1)
{
    size_t tile_bytes = tk_qmatrix_tile_bytes(p->type), n_blocks = (size_t)cols / TK_QBLOCK;
    size_t kc = (size_t)(n1 - n0);
    float tile[TK_QBLOCK * TK_QROWS] __attribute__((aligned(64)));
    for (int g = n0 / TK_QROWS; g * TK_QROWS < n1; g++) {
        int r_lo = n0 - g * TK_QROWS > 0 ? n0 - g * TK_QROWS : 0;
        int r_hi = n1 - g * TK_QROWS < TK_QROWS ? n1 - g * TK_QROWS : TK_QROWS;
        for (int c = c0; c < c1; c += TK_QBLOCK) {
            decode_tile_kmajor(tile, TK_QROWS, (const uint8_t *)p->data + ((size_t)g * n_blocks + c / TK_QBLOCK) *
                                                                           tile_bytes, p->type);
            for (int half = 0; half < TK_QBLOCK; half += TK_TGEMM_NR) { /* AVX2: a tile is two column blocks */
                int col = c + half - c0;
                float *dst = bp + (size_t)(col / TK_TGEMM_NR) * kc * TK_TGEMM_NR + col % TK_TGEMM_NR;
                for (int r = r_lo; r < r_hi; r++) {
                    float *row = dst + (size_t)(g * TK_QROWS + r - n0) * TK_TGEMM_NR;
                    for (int k = 0; k < TK_TGEMM_NR && k < TK_QBLOCK; k++) row[k] = tile[(half + k) * TK_QROWS + r];
                }
            }
        }
    }
}

/* y[:, c0:c1] = alpha x W[:, c0:c1] + beta y for a tiled part, the sum over W's rows in chunks */
static void backward_tiles(const part_args *a, float *buf, int c0, int c1)
{
    int N = a->p->rows, nc_max = tgemm_k_chunk(N);
    for (int j0 = c0; j0 < c1; j0 += TGEMM_COLS) {
        int j1 = j0 + TGEMM_COLS < c1 ? j0 + TGEMM_COLS : c1;
        for (int n0 = 0; n0 < N; n0 += nc_max) {
            int n1 = n0 + nc_max < N ? n0 + nc_max : N;
            decode_tiles_transposed(buf, a->p, a->cols, n0, n1, j0, j1);
            tk_tgemm(a->T, j1 - j0, n1 - n0, a->x + n0, a->ldx, buf, a->y + j0, a->ldy, a->alpha,
                     n0 == 0 ? a->beta : 1.0f);
        }
    }
}

/* y[:, c0:c1] = alpha x W[:, c0:c1] + beta y for a part kept as rows of blocks, the sum over W's rows in chunks:
 * each row's columns (whole blocks of its type around them) decoded into `row` and copied, NR at a time, into the
 * blocks tgemm reads (W's rows are already K-major there) */
static void backward_rows(const part_args *a, float *buf, int c0, int c1)
{
    int N = a->p->rows, K = a->cols, type = a->p->type, block = tk_quant_block_elems(type), nc_max = tgemm_k_chunk(N);
    size_t row_bytes = tk_quant_row_bytes(type, (size_t)K);
    float *row = buf + (size_t)TGEMM_COLS * nc_max;
    for (int j0 = c0; j0 < c1; j0 += TGEMM_COLS) {
        int j1 = j0 + TGEMM_COLS < c1 ? j0 + TGEMM_COLS : c1, width = j1 - j0;
        int b0 = j0 / block * block, b1 = (j1 + block - 1) / block * block;
        if (b1 > K) b1 = K;
        for (int n0 = 0; n0 < N; n0 += nc_max) {
            int n1 = n0 + nc_max < N ? n0 + nc_max : N, kc = n1 - n0;
            for (int n = n0; n < n1; n++) {
                tk_dequantize(row, (const uint8_t *)a->p->data + (size_t)n * row_bytes +
                              (size_t)(b0 / block) * tk_quant_block_bytes(type), type, (size_t)(b1 - b0));
                for (int cb = 0; cb < width; cb += TK_TGEMM_NR) {
                    float *dst = buf + ((size_t)(cb / TK_TGEMM_NR) * kc + (size_t)(n - n0)) * TK_TGEMM_NR;
                    int w = width - cb < TK_TGEMM_NR ? width - cb : TK_TGEMM_NR;
                    memcpy(dst, row + (j0 - b0) + cb, (size_t)w * sizeof(float));
                    if (w < TK_TGEMM_NR) memset(dst + w, 0, (size_t)(TK_TGEMM_NR - w) * sizeof(float));
                }
            }
            tk_tgemm(a->T, width, kc, a->x + n0, a->ldx, buf, a->y + j0, a->ldy, a->alpha, n0 == 0 ? a->beta : 1.0f);
        }
    }
}

/* y[:, columns of this task] = alpha x W[:, columns] + beta y, the sum over W's rows in chunks */
static void backward_task(void *ctx, int task, int thread)
{
    part_args *a = ctx;
    int k0, k1;
    unit_range(task, a->n_tasks, a->cols, a->unit, &k0, &k1);
    if (k1 <= k0) return;
    float *panel = a->panels->buf[thread];
    if (tiled(a->p->type)) backward_tiles(a, panel, k0, k1);
    else backward_rows(a, panel, k0, k1);
}

static int tasks_for(tk_pool *pool, long flops, int units)
{
    int threads = tk_pool_threads(pool);
    if (flops < (1L << 18)) return 1;
    return units < threads ? (units > 0 ? units : 1) : threads;
}

void tk_cpu_matmul_part(tk_pool *pool, tk_cpu_panels *panels, float *y, int ldy, const float *x, int ldx,
                        const tk_weight_part *p, int cols, int T, float alpha, float beta, int decoding)
{
    if (decoding && tiled(p->type) && T <= TK_CPU_QKERNEL_MAX_ROWS) {
        tk_qmatrix q = as_qmatrix(p, cols);
        tk_cpu_matmul_nt_q(pool, y, ldy, x, ldx, &q, T, alpha, beta);
        return;
    }
    int unit = tiled(p->type) ? TK_TGEMM_NR : TK_QROWS;
    part_args a = {y, x, p, panels, ldy, ldx, cols, T, 1, unit, decoding && T <= SMALL_T, alpha, beta};
    /* memory-bound at few rows: every thread streams its share of the weight */
    a.n_tasks = T <= SMALL_T ? tk_pool_threads(pool) : tasks_for(pool, (long)T * p->rows * cols, p->rows / 32);
    if (a.n_tasks < 1) a.n_tasks = 1;
    tk_pool_run(pool, a.n_tasks, forward_task, &a);
}

void tk_cpu_matmul_part_t(tk_pool *pool, tk_cpu_panels *panels, float *y, int ldy, const float *x, int ldx,
                          const tk_weight_part *p, int cols, int T, float alpha, float beta)
{
    int unit = tiled(p->type) ? TK_QBLOCK : tk_quant_block_elems(p->type);
    if (unit < 16) unit = 16; /* F16 / BF16: whole cache lines of y */
    part_args a = {y, x, p, panels, ldy, ldx, cols, T, 1, unit, 0, alpha, beta};
    a.n_tasks = tasks_for(pool, (long)T * p->rows * cols, cols / unit);
    tk_pool_run(pool, a.n_tasks, backward_task, &a);
}
