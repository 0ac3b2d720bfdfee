/* quant.h - ggml tensor types: sizes, names, and dequantisation to float32.
 *
 * The GGUF loader uses this to turn each tensor's stored blocks into float32
 * weights. Output is bit-identical to ggml's reference dequantisers (and to the
 * numpy ones in the `gguf` Python package, which mirror them). Pure functions:
 * no allocation, no global state, no error recording. The caller validates the
 * type and length first (tk_quant_row_bytes returns 0 for anything invalid).
 */
#ifndef TK_QUANT_H
#define TK_QUANT_H

#include <stddef.h>
#include <stdint.h>

/* ggml tensor type ids as stored in GGUF files (only the ones we decode). */
enum tk_ggml_type {
    TK_GGML_F32 = 0,
    TK_GGML_F16 = 1,
    TK_GGML_Q4_0 = 2,
    TK_GGML_Q4_1 = 3,
    TK_GGML_Q5_0 = 6,
    TK_GGML_Q5_1 = 7,
    TK_GGML_Q8_0 = 8,
    TK_GGML_Q4_K = 12,
    TK_GGML_Q5_K = 13,
    TK_GGML_Q6_K = 14,
    TK_GGML_BF16 = 30,
};

/* 1 for the 11 types above, else 0. */
int tk_quant_is_supported(int type);

/* Elements per block: 1, 32 or 256; 0 if unsupported. */
int tk_quant_block_elems(int type);

/* Bytes per block; 0 if unsupported. */
size_t tk_quant_block_bytes(int type);

/* ggml's name for any ggml type id ("Q4_1", "Q3_K", "IQ2_XS", "I8", ...),
 * including ids we cannot decode, so error messages can name them;
 * "unknown" for ids ggml does not define. Static string, never NULL. */
const char *tk_quant_type_name(int type);

/* Bytes holding n elements of `type`; 0 if the type is unsupported, n is not
 * a multiple of the block size, or the byte count would overflow size_t. */
size_t tk_quant_row_bytes(int type, size_t n);

/* dst[0..n) = dequantize(src). Caller guarantees tk_quant_is_supported(type),
 * n % tk_quant_block_elems(type) == 0, and src holds tk_quant_row_bytes(type, n)
 * bytes. src needs no alignment; dst and src must not overlap. */
void tk_dequantize(float *dst, const void *src, int type, size_t n);

/* Exact IEEE binary16 -> binary32, including subnormals, +-0, +-inf and NaN
 * (NaN payload kept, shifted into the high mantissa bits). */
float tk_fp16_to_fp32(uint16_t h);

/* bfloat16 -> binary32: the 16 bits become the high half of the float. */
float tk_bf16_to_fp32(uint16_t h);

#endif
