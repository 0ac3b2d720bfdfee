/* qmatrix.c - repacking ggml blocks into row-interleaved tiles (see qmatrix.h).
 *
 * Pure byte moves, no arithmetic: the kernel decodes the file's own scales and
 * quants. Block layouts (quant.c): Q4_0 d:f16 @0, qs[16] @2; Q4_1 d:f16 @0,
 * m:f16 @2, qs[16] @4; Q8_0 d:f16 @0, qs:int8[32] @2.
 */
#include "qmatrix.h"

#include <string.h>

int tk_qmatrix_supports(int type)
{
    return type == TK_GGML_Q4_0 || type == TK_GGML_Q4_1 || type == TK_GGML_Q8_0;
}

size_t tk_qmatrix_bytes(int type, int rows, int cols)
{
    size_t groups = ((size_t)rows + TK_QROWS - 1) / TK_QROWS;
    return groups * (size_t)(cols / TK_QBLOCK) * tk_qmatrix_tile_bytes(type);
}

void tk_qmatrix_put_row(const tk_qmatrix *w, int row, const uint8_t *blocks)
{
    const size_t tile_bytes = tk_qmatrix_tile_bytes(w->type), block_bytes = tk_quant_block_bytes(w->type);
    const int n_blocks = w->cols / TK_QBLOCK, lane = row % TK_QROWS;
    const int has_min = w->type == TK_GGML_Q4_1, scale_bytes = (has_min ? 4 : 2) * TK_QROWS;
    const int quant_bytes = w->type == TK_GGML_Q8_0 ? 32 : 16; /* per row in a block */
    uint8_t *tile = w->tiles + (size_t)(row / TK_QROWS) * (size_t)n_blocks * tile_bytes;
    for (int b = 0; b < n_blocks; b++, tile += tile_bytes, blocks += block_bytes) {
        memcpy(tile + 2 * lane, blocks, 2);                               /* d */
        if (has_min) memcpy(tile + 2 * TK_QROWS + 2 * lane, blocks + 2, 2); /* m */
        const uint8_t *q = blocks + (has_min ? 4 : 2);
        for (int j = 0; j < quant_bytes; j++) tile[scale_bytes + j * TK_QROWS + lane] = q[j];
    }
}
