/* wmatmul.h - the CPU backend's base weights: resident forms and the matmuls
 * that read them (see wmatmul.c). */
#ifndef TK_CPU_WMATMUL_H
#define TK_CPU_WMATMUL_H

#include "../../core/pool.h"
#include "../backend.h"

/* Per-thread panels of decoded weights (4 MB each, allocated with the backend
 * and kept: only the engine worker's pool uses them). */
typedef struct {
    float **buf;    /* [threads] */
    size_t floats;  /* each */
    int threads;
} tk_cpu_panels;

int tk_cpu_panels_init(tk_cpu_panels *p, int threads);
void tk_cpu_panels_free(tk_cpu_panels *p);

size_t tk_cpu_weight_bytes(int type, int rows, int cols);
void tk_cpu_weight_put_row(const tk_weight_part *p, int cols, int row, const void *src);

/* y[T, p.rows] = alpha x[T, cols] . W_p^T + beta y and y[T, cols] = alpha x[T, p.rows] . W_p + beta y for one
 * part (not F32, which the backend hands straight to sgemm): decoded tiles or rows feeding sgemm; for the
 * few rows of a decoding step, the register kernel of qmatmul.c (Q4_0 / Q4_1 / Q8_0) or decoded rows dotted
 * with each token row. */
void tk_cpu_matmul_part(tk_pool *pool, tk_cpu_panels *panels, float *y, int ldy, const float *x, int ldx,
                        const tk_weight_part *p, int cols, int T, float alpha, float beta, int decoding);
void tk_cpu_matmul_part_t(tk_pool *pool, tk_cpu_panels *panels, float *y, int ldy, const float *x, int ldx,
                          const tk_weight_part *p, int cols, int T, float alpha, float beta);
/* The rows [r0, r1) of a part as a part of their own (r0 a multiple of TK_QROWS for a tiled type; any row
 * otherwise), for a caller that splits a weight's rows itself. */
tk_weight_part tk_cpu_part_rows(const tk_weight_part *p, int cols, int r0, int r1);
/* Whether tk_cpu_part_rows may start at this part-local row. */
int tk_cpu_part_row_splits(const tk_weight_part *p, int row);
/* dst[cols] = row `row` of the part, decoded */
void tk_cpu_weight_row(float *dst, const tk_weight_part *p, int cols, int row);

/* Rows up to which the register kernel beats decoded tiles into sgemm (see wmatmul.c). */
enum { TK_CPU_QKERNEL_MAX_ROWS = 64 };

#endif
