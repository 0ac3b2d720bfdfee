/* qmatrix.h - a weight matrix kept in its file's quantized blocks, repacked
 * so a decoding kernel streams it once, linearly: the CPU backend's resident
 * form of Q4_0, Q4_1 and Q8_0 weights (cpu/wmatmul.c, cpu/qmatmul.c).
 *
 * W [N, K] (PyTorch order, K a multiple of 32) of ggml type Q4_0, Q4_1 or
 * Q8_0 is cut into row groups of TK_QROWS = 16 output rows; each group is
 * K/32 tiles, one per 32-element block along K, stored group after group:
 *
 *   tile = d[16] fp16 | m[16] fp16 (Q4_1 only) | quants
 *   Q4_0, Q4_1 quants: 16 x 16 bytes; byte [j][r] = block byte j of row r
 *                      (low nibble element j, high nibble element j + 16)
 *   Q8_0 quants:       32 x 16 int8; byte [k][r] = element k of row r
 *
 * so one 16-byte load gives the same element of the group's 16 rows: a
 * vector lane per output row, no horizontal sums. The bytes are the file's
 * own, moved: decoding gives exactly tk_dequantize's float32 values
 * (d*q + m, d*(q - 8), d*q, each product exact). Rows past N in the last
 * group are zero (weights 0). Scales stay fp16, converted in the kernel:
 * fp32 scales would add 6-20% to the bytes a decode step reads.
 */
#ifndef TK_QMATRIX_H
#define TK_QMATRIX_H

#include <stddef.h>
#include <stdint.h>

#include "../io/quant.h"

enum { TK_QROWS = 16, TK_QBLOCK = 32 };

typedef struct {
    int type;        /* TK_GGML_Q4_0, TK_GGML_Q4_1 or TK_GGML_Q8_0 */
    int rows, cols;  /* N, K */
    uint8_t *tiles;  /* [ceil(N / 16), K / 32] tiles; NULL when the matrix has no quantized copy */
} tk_qmatrix;

/* 1 for the ggml types a tk_qmatrix can hold. */
int tk_qmatrix_supports(int type);

/* Bytes of one tile of `type` (0 if unsupported); inline so kernels specialised on the type fold it. */
static inline size_t tk_qmatrix_tile_bytes(int type)
{
    switch (type) {
    case TK_GGML_Q4_0: return 2 * TK_QROWS + 16 * TK_QROWS; /* d, quants */
    case TK_GGML_Q4_1: return 4 * TK_QROWS + 16 * TK_QROWS; /* d, m, quants */
    case TK_GGML_Q8_0: return 2 * TK_QROWS + 32 * TK_QROWS; /* d, quants */
    default: return 0;
    }
}
/* Bytes of a repacked [rows, cols] matrix, its last group padded to 16 rows. */
size_t tk_qmatrix_bytes(int type, int rows, int cols);
/* Moves one row of ggml blocks (cols / 32 blocks of `type`, unaligned) into
 * row `row` of the repacked matrix. Rows are independent: different rows may
 * be written from different threads. Padding rows must be zeroed by the caller. */
void tk_qmatrix_put_row(const tk_qmatrix *w, int row, const uint8_t *blocks);

#endif
