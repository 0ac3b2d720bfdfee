/* quant.c - dequantisation of ggml block formats to float32 (see quant.h).
 *
 * One function per type decodes one block; tk_dequantize loops over blocks.
 * Block layouts and formulas follow ggml-common.h / ggml-quants.c
 * (dequantize_row_*), and the float arithmetic is done in the same order
 * as there, so results are bit-identical to ggml and to gguf-py's numpy port.
 * Owns nothing: no allocation, no state.
 *
 * Invariants and assumptions:
 * - Little-endian host: multi-byte block fields (fp16 scales, Q5's 32-bit qh)
 *   are little-endian in the file and are read with memcpy, which also copes
 *   with blocks being unaligned (18, 20, 22, ... bytes long).
 * - Every product here is exact in float: an fp16 scale has 11 significant
 *   bits, a 6-bit sub-scale (Q6_K: |int8| <= 128) at most 7 more, and a quant
 *   at most 6 more, so d*sc*q needs <= 24 bits. Only the final +m / -dmin*mn
 *   rounds. Hence a compiler contracting `d*q + m` into an FMA (GCC does in
 *   GNU mode under -march=native) gives the same bits; no pragma is needed.
 * - Inner loops have fixed trip counts and no per-element branches, so the
 *   compiler vectorises them.
 */
#include "quant.h"

#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "quant.c reads little-endian block fields with memcpy: big-endian hosts are not supported"
#endif

#define QK 32    /* elements per block of the simple formats */
#define QK_K 256 /* elements per super-block of the k-quants */

/* ---- scalar conversions ------------------------------------------------- */

static inline float f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline uint16_t load_u16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline uint32_t load_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Branch-free (bit masks, not ?:) so the F16 array loop vectorises: with
 * ternaries GCC sinks the float conversion into a branch, and under its
 * default -ftrapping-math it will not if-convert that branch back. */
static inline float fp16_to_fp32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7FFFu; /* exponent and mantissa */
    /* normal: rebias the exponent from 15 to 127 (add 112 to it) */
    const uint32_t normal = (em << 13) + (112u << 23);
    /* inf / NaN: all-ones exponent, mantissa (NaN payload) kept */
    const uint32_t infnan = (em << 13) | 0x7F800000u;
    /* zero / subnormal: value is mantissa * 2^-24, exact in float */
    const uint32_t sub = f32_to_bits((float)em * 0x1p-24f);
    const uint32_t is_sub = 0u - (uint32_t)(em < 0x0400u);   /* all ones or 0 */
    const uint32_t is_top = 0u - (uint32_t)(em >= 0x7C00u);
    const uint32_t mag = (sub & is_sub) | (infnan & is_top) | (normal & ~(is_sub | is_top));
    return f32_from_bits(sign | mag);
}

static inline float bf16_to_fp32(uint16_t h)
{
    return f32_from_bits((uint32_t)h << 16);
}

float tk_fp16_to_fp32(uint16_t h) { return fp16_to_fp32(h); }

float tk_bf16_to_fp32(uint16_t h) { return bf16_to_fp32(h); }

static inline float load_fp16(const uint8_t *p) { return fp16_to_fp32(load_u16(p)); }

/* ---- 32-element blocks -------------------------------------------------- */
/* In Q4_x/Q5_x the low nibbles of qs[0..16) are elements 0..15 and the high
 * nibbles are elements 16..31 (not interleaved). */

/* Q4_0, 18 bytes: d:f16 @0, qs[16] @2.  y = d * (q4 - 8) */
static void dequant_block_q4_0(float *restrict y, const uint8_t *restrict b)
{
    const float d = load_fp16(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = (float)((qs[j] & 0x0F) - 8) * d;
        y[j + QK / 2] = (float)((qs[j] >> 4) - 8) * d;
    }
}

/* Q4_1, 20 bytes: d:f16 @0, m:f16 @2, qs[16] @4.  y = d*q4 + m */
static void dequant_block_q4_1(float *restrict y, const uint8_t *restrict b)
{
    const float d = load_fp16(b);
    const float m = load_fp16(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < QK / 2; j++) {
        y[j] = (float)(qs[j] & 0x0F) * d + m;
        y[j + QK / 2] = (float)(qs[j] >> 4) * d + m;
    }
}

/* Q5_0, 22 bytes: d:f16 @0, qh:u32 @2, qs[16] @6.  Bit j of qh is the 5th
 * bit of element j.  y = d * (q5 - 16) */
static void dequant_block_q5_0(float *restrict y, const uint8_t *restrict b)
{
    const float d = load_fp16(b);
    const uint32_t qh = load_u32(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < QK / 2; j++) {
        const int h0 = (int)((qh >> j) << 4) & 0x10;
        const int h1 = (int)(qh >> (j + 12)) & 0x10;
        y[j] = (float)(((qs[j] & 0x0F) | h0) - 16) * d;
        y[j + QK / 2] = (float)(((qs[j] >> 4) | h1) - 16) * d;
    }
}

/* Q5_1, 24 bytes: d:f16 @0, m:f16 @2, qh:u32 @4, qs[16] @8.  y = d*q5 + m */
static void dequant_block_q5_1(float *restrict y, const uint8_t *restrict b)
{
    const float d = load_fp16(b);
    const float m = load_fp16(b + 2);
    const uint32_t qh = load_u32(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < QK / 2; j++) {
        const int h0 = (int)((qh >> j) << 4) & 0x10;
        const int h1 = (int)(qh >> (j + 12)) & 0x10;
        y[j] = (float)((qs[j] & 0x0F) | h0) * d + m;
        y[j + QK / 2] = (float)((qs[j] >> 4) | h1) * d + m;
    }
}

/* Q8_0, 34 bytes: d:f16 @0, qs:int8[32] @2.  y = d * q8 */
static void dequant_block_q8_0(float *restrict y, const uint8_t *restrict b)
{
    const float d = load_fp16(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < QK; j++) y[j] = (float)qs[j] * d;
}

/* ---- 256-element k-quant super-blocks ----------------------------------- */

/* Q4_K/Q5_K pack 8 six-bit scales and 8 six-bit mins into scales[12]:
 *   i < 4:  sc = s[i] & 63,                          mn = s[i+4] & 63
 *   i >= 4: sc = (s[i+4] & 15) | (s[i-4] >> 6) << 4, mn = (s[i+4] >> 4) | (s[i] >> 6) << 4
 * Returns d*sc[i] and dmin*mn[i] as ggml computes them (one float multiply). */
static void k4_scales(float *restrict dsc, float *restrict dmn, const uint8_t *restrict s,
                      float d, float dmin)
{
    for (int i = 0; i < 8; i++) {
        int sc, mn;
        if (i < 4) {
            sc = s[i] & 63;
            mn = s[i + 4] & 63;
        } else {
            sc = (s[i + 4] & 0x0F) | ((s[i - 4] >> 6) << 4);
            mn = (s[i + 4] >> 4) | ((s[i] >> 6) << 4);
        }
        dsc[i] = d * (float)sc;
        dmn[i] = dmin * (float)mn;
    }
}

/* Q4_K, 144 bytes: d:f16 @0, dmin:f16 @2, scales[12] @4, qs[128] @16.
 * Chunk c (0..3) of 64 elements reads qs[32c..32c+32): low nibbles are
 * elements 64c+l with sub-block 2c, high nibbles 64c+32+l with sub-block 2c+1.
 * y = (d*sc)*q4 - (dmin*mn) */
static void dequant_block_q4_k(float *restrict y, const uint8_t *restrict b)
{
    float dsc[8], dmn[8];
    k4_scales(dsc, dmn, b + 4, load_fp16(b), load_fp16(b + 2));
    const uint8_t *qs = b + 16;
    for (int c = 0; c < 4; c++) {
        const float d1 = dsc[2 * c], m1 = dmn[2 * c];
        const float d2 = dsc[2 * c + 1], m2 = dmn[2 * c + 1];
        const uint8_t *q = qs + 32 * c;
        float *yc = y + 64 * c;
        for (int l = 0; l < 32; l++) {
            yc[l] = d1 * (float)(q[l] & 0x0F) - m1;
            yc[l + 32] = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

/* Q5_K, 176 bytes: d:f16 @0, dmin:f16 @2, scales[12] @4, qh[32] @16,
 * qs[128] @48. Scales and chunking as Q4_K; the 5th bit of element 64c+l is
 * bit 2c of qh[l], of element 64c+32+l bit 2c+1.
 * y = (d*sc)*(q4 + 16*hb) - (dmin*mn) */
static void dequant_block_q5_k(float *restrict y, const uint8_t *restrict b)
{
    float dsc[8], dmn[8];
    k4_scales(dsc, dmn, b + 4, load_fp16(b), load_fp16(b + 2));
    const uint8_t *qh = b + 16;
    const uint8_t *qs = b + 48;
    for (int c = 0; c < 4; c++) {
        const float d1 = dsc[2 * c], m1 = dmn[2 * c];
        const float d2 = dsc[2 * c + 1], m2 = dmn[2 * c + 1];
        const uint8_t *q = qs + 32 * c;
        float *yc = y + 64 * c;
        for (int l = 0; l < 32; l++) {
            const int h1 = ((qh[l] >> (2 * c)) & 1) << 4;
            const int h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
            yc[l] = d1 * (float)((q[l] & 0x0F) + h1) - m1;
            yc[l + 32] = d2 * (float)((q[l] >> 4) + h2) - m2;
        }
    }
}

/* Q6_K, 210 bytes: ql[128] @0, qh[64] @128, scales:int8[16] @192, d:f16 @208.
 * 16 sub-blocks of 16. Half n (0,1) of 128 elements uses ql+64n, qh+32n and
 * scales+8n; for l < 32 (sub-block is = l/16):
 *   y[l]    from ql[l]    low nibble,  qh[l] bits 0-1, scale[is+0]
 *   y[l+32] from ql[l+32] low nibble,  qh[l] bits 2-3, scale[is+2]
 *   y[l+64] from ql[l]    high nibble, qh[l] bits 4-5, scale[is+4]
 *   y[l+96] from ql[l+32] high nibble, qh[l] bits 6-7, scale[is+6]
 * q6 = (nibble | 2 bits << 4) - 32;  y = (d*scale)*q6 */
static void dequant_block_q6_k(float *restrict y, const uint8_t *restrict b)
{
    const float d = load_fp16(b + 208);
    const int8_t *scales = (const int8_t *)(b + 192);
    float ds[16];
    for (int i = 0; i < 16; i++) ds[i] = d * (float)scales[i];

    for (int n = 0; n < 2; n++) {
        const uint8_t *ql = b + 64 * n;
        const uint8_t *qh = b + 128 + 32 * n;
        const float *dsn = ds + 8 * n;
        float *yn = y + 128 * n;
        for (int half = 0; half < 2; half++) { /* is = half: constant scales in the loop */
            for (int l = 16 * half; l < 16 * half + 16; l++) {
                const int q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                yn[l] = dsn[half + 0] * (float)q1;
                yn[l + 32] = dsn[half + 2] * (float)q2;
                yn[l + 64] = dsn[half + 4] * (float)q3;
                yn[l + 96] = dsn[half + 6] * (float)q4;
            }
        }
    }
}

/* ---- element formats ---------------------------------------------------- */

static void dequant_f16(float *restrict y, const uint8_t *restrict src, size_t n)
{
    for (size_t i = 0; i < n; i++) y[i] = fp16_to_fp32(load_u16(src + 2 * i));
}

static void dequant_bf16(float *restrict y, const uint8_t *restrict src, size_t n)
{
    for (size_t i = 0; i < n; i++) y[i] = bf16_to_fp32(load_u16(src + 2 * i));
}

/* ---- type table and dispatch -------------------------------------------- */

typedef struct {
    int elems;    /* elements per block */
    size_t bytes; /* bytes per block */
} type_info;

static const type_info *info(int type)
{
    static const type_info f32 = {1, 4}, f16 = {1, 2}, bf16 = {1, 2};
    static const type_info q4_0 = {QK, 18}, q4_1 = {QK, 20}, q5_0 = {QK, 22};
    static const type_info q5_1 = {QK, 24}, q8_0 = {QK, 34};
    static const type_info q4_k = {QK_K, 144}, q5_k = {QK_K, 176}, q6_k = {QK_K, 210};
    switch (type) {
    case TK_GGML_F32: return &f32;
    case TK_GGML_F16: return &f16;
    case TK_GGML_Q4_0: return &q4_0;
    case TK_GGML_Q4_1: return &q4_1;
    case TK_GGML_Q5_0: return &q5_0;
    case TK_GGML_Q5_1: return &q5_1;
    case TK_GGML_Q8_0: return &q8_0;
    case TK_GGML_Q4_K: return &q4_k;
    case TK_GGML_Q5_K: return &q5_k;
    case TK_GGML_Q6_K: return &q6_k;
    case TK_GGML_BF16: return &bf16;
    default: return NULL;
    }
}

int tk_quant_is_supported(int type) { return info(type) != NULL; }

int tk_quant_block_elems(int type)
{
    const type_info *t = info(type);
    return t ? t->elems : 0;
}

size_t tk_quant_block_bytes(int type)
{
    const type_info *t = info(type);
    return t ? t->bytes : 0;
}

const char *tk_quant_type_name(int type)
{
    /* ggml ids (ggml.h); holes are removed types. */
    static const char *const names[] = {
        "F32", "F16", "Q4_0", "Q4_1", NULL, NULL, "Q5_0", "Q5_1", "Q8_0", "Q8_1",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
        "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
        "BF16", NULL, NULL, NULL, "TQ1_0", "TQ2_0", NULL, NULL, NULL, "MXFP4",
        "NVFP4", "Q1_0", "Q2_0",
    };
    if (type < 0 || type >= (int)(sizeof names / sizeof names[0]) || !names[type]) return "unknown";
    return names[type];
}

size_t tk_quant_row_bytes(int type, size_t n)
{
    const type_info *t = info(type);
    if (!t || n % (size_t)t->elems != 0) return 0;
    const size_t blocks = n / (size_t)t->elems;
    if (blocks > SIZE_MAX / t->bytes) return 0;
    return blocks * t->bytes;
}

/* A direct call per block (not a function pointer) lets each block decoder
 * inline into its loop. */
#define FOR_EACH_BLOCK(block_fn, elems, bytes)                           \
    for (size_t i = 0; i < n / (elems); i++) block_fn(dst + i * (elems), s + i * (bytes))

void tk_dequantize(float *dst, const void *src, int type, size_t n)
{
    const uint8_t *s = (const uint8_t *)src;
    switch (type) {
    case TK_GGML_F32: memcpy(dst, src, n * sizeof(float)); break;
    case TK_GGML_F16: dequant_f16(dst, s, n); break;
    case TK_GGML_BF16: dequant_bf16(dst, s, n); break;
    case TK_GGML_Q4_0: FOR_EACH_BLOCK(dequant_block_q4_0, QK, 18); break;
    case TK_GGML_Q4_1: FOR_EACH_BLOCK(dequant_block_q4_1, QK, 20); break;
    case TK_GGML_Q5_0: FOR_EACH_BLOCK(dequant_block_q5_0, QK, 22); break;
    case TK_GGML_Q5_1: FOR_EACH_BLOCK(dequant_block_q5_1, QK, 24); break;
    case TK_GGML_Q8_0: FOR_EACH_BLOCK(dequant_block_q8_0, QK, 34); break;
    case TK_GGML_Q4_K: FOR_EACH_BLOCK(dequant_block_q4_k, QK_K, 144); break;
    case TK_GGML_Q5_K: FOR_EACH_BLOCK(dequant_block_q5_k, QK_K, 176); break;
    case TK_GGML_Q6_K: FOR_EACH_BLOCK(dequant_block_q6_k, QK_K, 210); break;
    default: break; /* contract violation; the loader checks the type first */
    }
}
