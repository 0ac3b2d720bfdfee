/* qmatmul.c - y = alpha x W^T + beta y with W kept as quantized blocks
 * (qmatrix.h), for decoding steps: few token rows, where streaming the
 * weights from memory is the cost and 4-bit weights move 6x fewer bytes than
 * float32 ones.
 *
 * A row group (16 output rows) is the unit of work. Its tiles are decoded to
 * float32 in registers, one vector lane per output row, exactly to the values
 * tk_dequantize gives: d*q + m as one FMA is the same rounding as quant.c's
 * product-then-add, because d*q is exact; d*(q - 8) as d*q + (-8d) is exact.
 * Each decoded vector then multiplies up to 8 token rows at once (outer
 * product: a broadcast activation times 16 rows, no horizontal sums). For more
 * than 8 rows the group's tiles (K/32 of them, a few KB) are decoded again,
 * from L1, for each further 8. Activations stay float32: no 8-bit
 * quantization of x (llama.cpp's way, ~5e-3 relative error per output).
 *
 * Paths: AVX-512 (16 rows a zmm, 8 token rows a pass), AVX2 + FMA + F16C
 * (16 rows as two ymm halves: for 1-2 token rows both halves in one pass, for
 * more one half at a time, 4 token rows a pass: 16 registers), plain C
 * (the reference, and the fallback elsewhere; gcc vectorises it). Summation
 * order, the same in all of them and for any T, thread count or split: each
 * output keeps two partial sums, one over elements 0-15 and one over elements
 * 16-31 of every block (blocks in order), added at the end. So a sequence's
 * logits do not depend on what else shares its batch, and the paths differ
 * only where the compiler does not contract a*b + c into an FMA (plain C in
 * ISO mode). At T = 1 the bound is the FP ports (per 8 weights: a convert,
 * one FMA to decode, one to use; measured ~5.8 weights a cycle a core on
 * Zen 4 in both paths); the two chains per output row, times the vectors in
 * flight (one zmm, or both ymm halves), keep the 4-cycle FMA latency hidden.
 */
#include "qmatmul.h"

#include <string.h>

#include "../../io/quant.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { MAX_NT = 8 }; /* token rows per pass over a row group */

typedef void (*group_fn)(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx, int nt, int type);

/* ---- plain C ------------------------------------------------------------------------- */

static float scale_at(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return tk_fp16_to_fp32(h);
}

/* One tile's 16 x 32 weights: w[k][r] = element k of the block of row r. */
static void decode_tile(float w[TK_QBLOCK][TK_QROWS], const uint8_t *tile, int type)
{
    float d[TK_QROWS], m[TK_QROWS];
    for (int r = 0; r < TK_QROWS; r++) d[r] = scale_at(tile + 2 * r);
    if (type == TK_GGML_Q8_0) {
        const int8_t *q = (const int8_t *)(tile + 2 * TK_QROWS);
        for (int k = 0; k < TK_QBLOCK; k++)
            for (int r = 0; r < TK_QROWS; r++) w[k][r] = (float)q[k * TK_QROWS + r] * d[r];
        return;
    }
    for (int r = 0; r < TK_QROWS; r++)
        m[r] = type == TK_GGML_Q4_1 ? scale_at(tile + 2 * TK_QROWS + 2 * r) : -8.0f * d[r];
    const uint8_t *q = tile + (type == TK_GGML_Q4_1 ? 4 : 2) * TK_QROWS;
    for (int j = 0; j < 16; j++)
        for (int r = 0; r < TK_QROWS; r++) {
            w[j][r] = (float)(q[j * TK_QROWS + r] & 0x0F) * d[r] + m[r];
            w[j + 16][r] = (float)(q[j * TK_QROWS + r] >> 4) * d[r] + m[r];
        }
}

/* acc[t][r] = x[t] . W[r] over the group's tiles, for nt <= 8 token rows */
static void group_portable(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx, int nt, int type)
{
    float w[TK_QBLOCK][TK_QROWS], sum_lo[MAX_NT][TK_QROWS] = {{0}}, sum_hi[MAX_NT][TK_QROWS] = {{0}};
    for (int b = 0; b < n_blocks; b++, tiles += tk_qmatrix_tile_bytes(type)) {
        decode_tile(w, tiles, type);
        for (int t = 0; t < nt; t++) {
            const float *xb = x + (size_t)t * ldx + (size_t)b * TK_QBLOCK;
            float lo[TK_QROWS], hi[TK_QROWS]; /* locals, so the compiler keeps them in registers */
            memcpy(lo, sum_lo[t], sizeof lo);
            memcpy(hi, sum_hi[t], sizeof hi);
            for (int j = 0; j < 16; j++)
                for (int r = 0; r < TK_QROWS; r++) {
                    lo[r] += w[j][r] * xb[j];
                    hi[r] += w[j + 16][r] * xb[j + 16];
                }
            memcpy(sum_lo[t], lo, sizeof lo);
            memcpy(sum_hi[t], hi, sizeof hi);
        }
    }
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < TK_QROWS; r++) acc[t * TK_QROWS + r] = sum_lo[t][r] + sum_hi[t][r];
}

/* ---- SIMD ------------------------------------------------------------------------------ */
/* One function per (type, nt) through an always-inlined body with both constant, so the accumulators
 * live in registers and the type tests fold away. */

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* body(n) with n = nt as a constant, for 1 <= nt <= max_nt <= 8 */
#define WITH_CONSTANT_NT(nt, max_nt, body)                                                              \
    switch (nt) {                                                                                       \
    case 1: body(1); break;                                                                             \
    case 2: body(2 < (max_nt) ? 2 : (max_nt)); break;                                                   \
    case 3: body(3 < (max_nt) ? 3 : (max_nt)); break;                                                   \
    case 4: body(4 < (max_nt) ? 4 : (max_nt)); break;                                                   \
    case 5: body(5 < (max_nt) ? 5 : (max_nt)); break;                                                   \
    case 6: body(6 < (max_nt) ? 6 : (max_nt)); break;                                                   \
    case 7: body(7 < (max_nt) ? 7 : (max_nt)); break;                                                   \
    default: body(max_nt); break;                                                                       \
    }

/* fn(..., type) with a constant type */
#define WITH_CONSTANT_TYPE(type, fn, ...)                                                               \
    switch (type) {                                                                                     \
    case TK_GGML_Q4_0: fn(__VA_ARGS__, TK_GGML_Q4_0); break;                                            \
    case TK_GGML_Q4_1: fn(__VA_ARGS__, TK_GGML_Q4_1); break;                                            \
    default: fn(__VA_ARGS__, TK_GGML_Q8_0); break;                                                      \
    }

#if defined(__AVX512F__)
#define SIMD_GROUP group_avx512

/* 16 rows in one zmm lane each; accumulators: 2 nt of the 32 registers */
static ALWAYS_INLINE void group_avx512_nt(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx,
                                          const int nt, const int type)
{
    const int quants_at = (type == TK_GGML_Q4_1 ? 4 : 2) * TK_QROWS;
    const __m512i nibble = _mm512_set1_epi32(0x0F);
    __m512 lo[MAX_NT], hi[MAX_NT];
    for (int t = 0; t < nt; t++) lo[t] = hi[t] = _mm512_setzero_ps();
    for (int b = 0; b < n_blocks; b++, tiles += tk_qmatrix_tile_bytes(type)) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tiles));
        const __m512 m = type == TK_GGML_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tiles + 32)))
                                              : _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
        const uint8_t *q = tiles + quants_at;
        const float *xb = x + (size_t)b * TK_QBLOCK;
        for (int j = 0; j < 16; j++) {
            __m512 wl, wh;
            if (type == TK_GGML_Q8_0) {
                __m128i ql = _mm_loadu_si128((const __m128i *)(q + j * TK_QROWS));
                __m128i qh = _mm_loadu_si128((const __m128i *)(q + (j + 16) * TK_QROWS));
                wl = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ql)), d);
                wh = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(qh)), d);
            } else {
                __m512i qi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + j * TK_QROWS)));
                wl = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(qi, nibble)), d, m);
                wh = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(qi, 4)), d, m);
            }
            for (int t = 0; t < nt; t++) {
                lo[t] = _mm512_fmadd_ps(wl, _mm512_set1_ps(xb[(size_t)t * ldx + j]), lo[t]);
                hi[t] = _mm512_fmadd_ps(wh, _mm512_set1_ps(xb[(size_t)t * ldx + j + 16]), hi[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++) _mm512_storeu_ps(acc + t * TK_QROWS, _mm512_add_ps(lo[t], hi[t]));
}

static ALWAYS_INLINE void group_avx512_type(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx,
                                            int nt, const int type)
{
#define BODY(n) group_avx512_nt(acc, tiles, n_blocks, x, ldx, n, type)
    WITH_CONSTANT_NT(nt, MAX_NT, BODY);
#undef BODY
}

static void group_avx512(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx, int nt, int type)
{
    WITH_CONSTANT_TYPE(type, group_avx512_type, acc, tiles, n_blocks, x, ldx, nt);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SIMD_GROUP group_avx2

enum { AVX2_NT = 4 }; /* 16 ymm registers: 2 x 4 accumulators, scales, the weights being decoded */

/* Rows half * 8 .. half * 8 + 7 of the group, one ymm lane each; acc rows keep their stride of 16. */
static ALWAYS_INLINE void group_avx2_nt(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx,
                                        const int nt, const int type, int half)
{
    const int quants_at = (type == TK_GGML_Q4_1 ? 4 : 2) * TK_QROWS + 8 * half;
    const __m256i nibble = _mm256_set1_epi32(0x0F);
    __m256 lo[AVX2_NT], hi[AVX2_NT];
    for (int t = 0; t < nt; t++) lo[t] = hi[t] = _mm256_setzero_ps();
    for (int b = 0; b < n_blocks; b++, tiles += tk_qmatrix_tile_bytes(type)) {
        const __m128i *scales = (const __m128i *)(tiles + 16 * half);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(scales));
        const __m256 m = type == TK_GGML_Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(scales + 2))
                                              : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
        const uint8_t *q = tiles + quants_at;
        const float *xb = x + (size_t)b * TK_QBLOCK;
        for (int j = 0; j < 16; j++) {
            __m256 wl, wh;
            if (type == TK_GGML_Q8_0) {
                __m128i ql = _mm_loadl_epi64((const __m128i *)(q + j * TK_QROWS));
                __m128i qh = _mm_loadl_epi64((const __m128i *)(q + (j + 16) * TK_QROWS));
                wl = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ql)), d);
                wh = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qh)), d);
            } else {
                __m256i qi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + j * TK_QROWS)));
                wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(qi, nibble)), d, m);
                wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(qi, 4)), d, m);
            }
            for (int t = 0; t < nt; t++) {
                lo[t] = _mm256_fmadd_ps(wl, _mm256_broadcast_ss(xb + (size_t)t * ldx + j), lo[t]);
                hi[t] = _mm256_fmadd_ps(wh, _mm256_broadcast_ss(xb + (size_t)t * ldx + j + 16), hi[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++) _mm256_storeu_ps(acc + t * TK_QROWS + 8 * half, _mm256_add_ps(lo[t], hi[t]));
}

/* All 16 rows of the group at once, as two ymm halves: 4 nt accumulation chains instead of 2 nt. At nt = 1 the
 * per-half pass above has only 2 chains, so it waits on the FMA latency (4 cycles) with the FP ports half
 * idle (measured, one Zen 4 core, hot: 14.7 weights/ns there, 21.3 here, 21.9 for the AVX-512 path); each
 * 16-byte row of quants is loaded once. nt = 2 still fits the 16 registers (29.8 against 28.2); from 3 on the
 * per-half pass, which decodes each vector for 4 token rows, is the better trade. Same order of summation per
 * output as the per-half pass, so the results are the same bits. */
static ALWAYS_INLINE void group_avx2_both_nt(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx,
                                             const int nt, const int type)
{
    const int quants_at = (type == TK_GGML_Q4_1 ? 4 : 2) * TK_QROWS;
    const __m256i nibble = _mm256_set1_epi32(0x0F);
    __m256 lo0[2], hi0[2], lo1[2], hi1[2];
    for (int t = 0; t < nt; t++) lo0[t] = hi0[t] = lo1[t] = hi1[t] = _mm256_setzero_ps();
    for (int b = 0; b < n_blocks; b++, tiles += tk_qmatrix_tile_bytes(type)) {
        const __m128i *scales = (const __m128i *)tiles;
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128(scales)), d1 = _mm256_cvtph_ps(_mm_loadu_si128(scales + 1));
        __m256 m0, m1;
        if (type == TK_GGML_Q4_1) {
            m0 = _mm256_cvtph_ps(_mm_loadu_si128(scales + 2));
            m1 = _mm256_cvtph_ps(_mm_loadu_si128(scales + 3));
        } else {
            m0 = _mm256_mul_ps(d0, _mm256_set1_ps(-8.0f));
            m1 = _mm256_mul_ps(d1, _mm256_set1_ps(-8.0f));
        }
        const uint8_t *q = tiles + quants_at;
        const float *xb = x + (size_t)b * TK_QBLOCK;
        for (int j = 0; j < 16; j++) {
            __m256 wl0, wh0, wl1, wh1;
            if (type == TK_GGML_Q8_0) {
                const uint8_t *ql = q + j * TK_QROWS, *qh = q + (j + 16) * TK_QROWS;
                wl0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)ql))), d0);
                wl1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(ql + 8)))), d1);
                wh0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qh))), d0);
                wh1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qh + 8)))), d1);
            } else {
                const uint8_t *qj = q + j * TK_QROWS;
                __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qj));
                __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qj + 8)));
                wl0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q0, nibble)), d0, m0);
                wh0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q0, 4)), d0, m0);
                wl1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q1, nibble)), d1, m1);
                wh1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q1, 4)), d1, m1);
            }
            for (int t = 0; t < nt; t++) {
                const __m256 xl = _mm256_broadcast_ss(xb + (size_t)t * ldx + j);
                const __m256 xh = _mm256_broadcast_ss(xb + (size_t)t * ldx + j + 16);
                lo0[t] = _mm256_fmadd_ps(wl0, xl, lo0[t]);
                lo1[t] = _mm256_fmadd_ps(wl1, xl, lo1[t]);
                hi0[t] = _mm256_fmadd_ps(wh0, xh, hi0[t]);
                hi1[t] = _mm256_fmadd_ps(wh1, xh, hi1[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        _mm256_storeu_ps(acc + t * TK_QROWS, _mm256_add_ps(lo0[t], hi0[t]));
        _mm256_storeu_ps(acc + t * TK_QROWS + 8, _mm256_add_ps(lo1[t], hi1[t]));
    }
}

static ALWAYS_INLINE void group_avx2_type(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx,
                                          int nt, const int type)
{
#define BODY(n) (group_avx2_nt(acc, tiles, n_blocks, x, ldx, n, type, 0), \
                 group_avx2_nt(acc, tiles, n_blocks, x, ldx, n, type, 1))
    if (nt == 1) group_avx2_both_nt(acc, tiles, n_blocks, x, ldx, 1, type);
    else if (nt == 2) group_avx2_both_nt(acc, tiles, n_blocks, x, ldx, 2, type);
    else WITH_CONSTANT_NT(nt, AVX2_NT, BODY);
#undef BODY
}

/* up to 8 token rows, 4 at a time */
static void group_avx2(float *acc, const uint8_t *tiles, int n_blocks, const float *x, int ldx, int nt, int type)
{
    for (int t0 = 0; t0 < nt; t0 += AVX2_NT) {
        int n = nt - t0 < AVX2_NT ? nt - t0 : AVX2_NT;
        WITH_CONSTANT_TYPE(type, group_avx2_type, acc + t0 * TK_QROWS, tiles, n_blocks, x + (size_t)t0 * ldx, ldx, n);
    }
}

#else
#define SIMD_GROUP group_portable
#endif

/* ---- the split over the pool ------------------------------------------------------------ */

typedef struct {
    float *y;
    const float *x;
    const tk_qmatrix *w;
    int ldy, ldx, T, n_tasks;
    float alpha, beta;
    group_fn group;
} qgemm_args;

/* y[t0 + t, n0 + r] (rows r < n_rows of the group) from acc[t][r] */
static void store_group(const qgemm_args *a, const float *acc, int t0, int nt, int n0, int n_rows)
{
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < n_rows; r++) {
            float s = acc[t * TK_QROWS + r], *yt = a->y + (size_t)(t0 + t) * a->ldy + n0 + r;
            *yt = a->beta == 0.0f ? a->alpha * s : a->alpha * s + a->beta * *yt;
        }
}

/* Row groups [g0, g1) for all T token rows, 8 at a time. */
static void qgemm_task(void *ctx, int task, int thread)
{
    (void)thread;
    const qgemm_args *a = ctx;
    const tk_qmatrix *w = a->w;
    const int n_groups = (w->rows + TK_QROWS - 1) / TK_QROWS, n_blocks = w->cols / TK_QBLOCK;
    const int g0 = (int)((long)n_groups * task / a->n_tasks), g1 = (int)((long)n_groups * (task + 1) / a->n_tasks);
    const size_t group_bytes = (size_t)n_blocks * tk_qmatrix_tile_bytes(w->type);
    float acc[MAX_NT * TK_QROWS];
    for (int g = g0; g < g1; g++) {
        const uint8_t *tiles = w->tiles + (size_t)g * group_bytes;
        const int n0 = g * TK_QROWS, n_rows = w->rows - n0 < TK_QROWS ? w->rows - n0 : TK_QROWS;
        for (int t0 = 0; t0 < a->T; t0 += MAX_NT) {
            const int nt = a->T - t0 < MAX_NT ? a->T - t0 : MAX_NT;
            a->group(acc, tiles, n_blocks, a->x + (size_t)t0 * a->ldx, a->ldx, nt, w->type);
            store_group(a, acc, t0, nt, n0, n_rows);
        }
    }
}

/* Below about 2^17 multiply-adds (a few microseconds) waking the pool costs more than it saves; above, a
 * few tasks per thread let a thread that got ahead take more (the machine is shared). */
static int qgemm_tasks(tk_pool *pool, const tk_qmatrix *w, int T)
{
    const int threads = tk_pool_threads(pool), n_groups = (w->rows + TK_QROWS - 1) / TK_QROWS;
    if (threads == 1 || (long)T * w->rows * w->cols < (1L << 17)) return 1;
    return n_groups < 4 * threads ? n_groups : 4 * threads;
}

static void run(tk_pool *pool, float *y, int ldy, const float *x, int ldx, const tk_qmatrix *w, int T, float alpha,
                float beta, group_fn group)
{
    qgemm_args a = {y, x, w, ldy, ldx, T, 0, alpha, beta, group};
    a.n_tasks = qgemm_tasks(pool, w, T);
    tk_pool_run(pool, a.n_tasks, qgemm_task, &a);
}

void tk_cpu_matmul_nt_q(tk_pool *pool, float *y, int ldy, const float *x, int ldx, const tk_qmatrix *w, int T,
                        float alpha, float beta)
{
    run(pool, y, ldy, x, ldx, w, T, alpha, beta, SIMD_GROUP);
}

void tk_cpu_matmul_nt_q_portable(tk_pool *pool, float *y, int ldy, const float *x, int ldx, const tk_qmatrix *w,
                                 int T, float alpha, float beta)
{
    run(pool, y, ldy, x, ldx, w, T, alpha, beta, group_portable);
}
