/* quant_ref.h - an independent decode of the ggml block formats, one element
 * at a time straight off the bit layout (reference/gguf-and-models.md,
 * ggml-common.h), to check tk_dequantize against; and random blocks whose
 * fp16 scales are finite (or, for the exactness checks, extreme). */
#ifndef TK_TEST_QUANT_REF_H
#define TK_TEST_QUANT_REF_H

#include <stddef.h>
#include <stdint.h>

#include "harness.h"

/* the 11 supported types, with their names and sizes as this test knows them */
typedef struct {
    int type;
    const char *name;
    int elems;    /* per block */
    size_t bytes; /* per block */
} qref_type;

extern const qref_type qref_types[];
extern const int qref_n_types;

float qref_half(uint16_t h); /* IEEE binary16 -> float, by its fields */
/* element i of one block of `type` */
float qref_element(const qref_type *t, const uint8_t *block, int i);
/* n_blocks random blocks; every fp16 scale field finite; extreme: a sixth of
 * them each 0, -0, a subnormal, +-65504 */
void qref_random_blocks(uint8_t *dst, const qref_type *t, size_t n_blocks, rng_t *r, int extreme);
const qref_type *qref_find(int type);

#endif
