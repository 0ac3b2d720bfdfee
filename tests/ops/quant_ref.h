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
/* What random blocks hold. Every fp16 scale field is finite in all modes.
 * QREF_ORDINARY: scales of |value| in [2^-10, 4); F16 / BF16 any bits (NaN, inf included); F32 N(0, 1).
 * QREF_EXTREME:  as ORDINARY, but a sixth of the scales each 0, -0, a subnormal, +-65504.
 * QREF_SANE:     scales that keep weights below about 1, as in real files; F16 / BF16 finite, |value| in
 *                [2^-10, 4); F32 N(0, 1) (matmul inputs).
 * QREF_EXTREME_FINITE: EXTREME scales; F16 / BF16 any finite bits (subnormals, +-0, the largest); F32
 *                with a sixth each 0, -0, a subnormal, +-3e38 (exact-decode checks that go through sums,
 *                where an infinity or NaN would spread). */
enum { QREF_ORDINARY = 0, QREF_EXTREME = 1, QREF_SANE = 2, QREF_EXTREME_FINITE = 3 };
void qref_random_blocks(uint8_t *dst, const qref_type *t, size_t n_blocks, rng_t *r, int mode);
const qref_type *qref_find(int type);

#endif
