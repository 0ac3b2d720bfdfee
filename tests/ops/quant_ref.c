/* quant_ref.c - see quant_ref.h. Each element is located by its own index
 * arithmetic (which byte, which nibble, which bit, which sub-scale), not by
 * the block loops quant.c uses. Products of an fp16 scale, a 6-bit sub-scale
 * and a quant are exact in float, so computing them in float and rounding
 * only the final add/subtract is the formula's one rounding. */
#include "quant_ref.h"

#include <math.h>
#include <string.h>

#include "io/quant.h"

const qref_type qref_types[] = {
    {TK_GGML_F32, "F32", 1, 4},       {TK_GGML_F16, "F16", 1, 2},       {TK_GGML_BF16, "BF16", 1, 2},
    {TK_GGML_Q4_0, "Q4_0", 32, 18},   {TK_GGML_Q4_1, "Q4_1", 32, 20},   {TK_GGML_Q5_0, "Q5_0", 32, 22},
    {TK_GGML_Q5_1, "Q5_1", 32, 24},   {TK_GGML_Q8_0, "Q8_0", 32, 34},   {TK_GGML_Q4_K, "Q4_K", 256, 144},
    {TK_GGML_Q5_K, "Q5_K", 256, 176}, {TK_GGML_Q6_K, "Q6_K", 256, 210},
};
const int qref_n_types = (int)(sizeof qref_types / sizeof qref_types[0]);

const qref_type *qref_find(int type)
{
    for (int i = 0; i < qref_n_types; i++)
        if (qref_types[i].type == type) return &qref_types[i];
    return NULL;
}

static uint16_t u16_at(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

float qref_half(uint16_t h)
{
    int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    if (e == 31) { /* inf, or NaN with its payload in the high mantissa bits */
        uint32_t bits = (uint32_t)sign << 31 | 0x7F800000u | (uint32_t)m << 13;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    double v = e == 0 ? ldexp(m, -24) : ldexp(m + 1024, e - 25);
    return (float)(sign ? -v : v);
}

static float half_at(const uint8_t *p) { return qref_half(u16_at(p)); }

/* the 4-bit value of element i of a 32-element block: low nibbles are 0-15, high nibbles 16-31 */
static int nibble32(const uint8_t *qs, int i) { return i < 16 ? qs[i] & 15 : qs[i - 16] >> 4; }

/* Q4_K / Q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes */
static void k_scale_min(const uint8_t *s, int j, int *sc, int *mn)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
        *mn = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

float qref_element(const qref_type *t, const uint8_t *b, int i)
{
    switch (t->type) {
    case TK_GGML_F32: {
        float f;
        memcpy(&f, b, sizeof f);
        return f;
    }
    case TK_GGML_F16: return half_at(b);
    case TK_GGML_BF16: {
        uint32_t bits = (uint32_t)u16_at(b) << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    case TK_GGML_Q4_0: return (float)(nibble32(b + 2, i) - 8) * half_at(b);
    case TK_GGML_Q4_1: return (float)nibble32(b + 4, i) * half_at(b) + half_at(b + 2);
    case TK_GGML_Q5_0: { /* bit i of the 32-bit qh is element i's fifth bit */
        uint32_t qh = (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
        return (float)((nibble32(b + 6, i) | (int)((qh >> i) & 1) << 4) - 16) * half_at(b);
    }
    case TK_GGML_Q5_1: {
        uint32_t qh = (uint32_t)b[4] | (uint32_t)b[5] << 8 | (uint32_t)b[6] << 16 | (uint32_t)b[7] << 24;
        return (float)(nibble32(b + 8, i) | (int)((qh >> i) & 1) << 4) * half_at(b) + half_at(b + 2);
    }
    case TK_GGML_Q8_0: return (float)(int8_t)b[2 + i] * half_at(b);
    case TK_GGML_Q4_K:
    case TK_GGML_Q5_K: {
        /* sub-block j = i / 32; 64-element chunk c = i / 64 reads qs[32c + i % 32], low nibble for even j */
        int j = i / 32, c = i / 64, l = i % 32, sc, mn;
        k_scale_min(b + 4, j, &sc, &mn);
        const uint8_t *qs = b + (t->type == TK_GGML_Q4_K ? 16 : 48);
        int q = j % 2 == 0 ? qs[32 * c + l] & 15 : qs[32 * c + l] >> 4;
        if (t->type == TK_GGML_Q5_K) q += ((b[16 + l] >> j) & 1) << 4; /* qh[l] bit j */
        float d = half_at(b) * (float)sc, m = half_at(b + 2) * (float)mn;
        return d * (float)q - m;
    }
    case TK_GGML_Q6_K: {
        /* half n = i / 128; in it quarter k = (i % 128) / 32 and l = i % 32: ql[64n + l + 32 (k odd)], low nibble
         * for k < 2; qh[32n + l] bits 2k, 2k+1; scale 8n + l / 16 + 2k */
        int n = i / 128, k = (i % 128) / 32, l = i % 32;
        int byte = b[64 * n + l + 32 * (k % 2)], lo = k < 2 ? byte & 15 : byte >> 4;
        int hi = (b[128 + 32 * n + l] >> (2 * k)) & 3;
        int q = (lo | hi << 4) - 32;
        float d = half_at(b + 208) * (float)(int8_t)b[192 + 8 * n + l / 16 + 2 * k];
        return d * (float)q;
    }
    default: return NAN;
    }
}

static uint16_t random_half(rng_t *r, int extreme)
{
    uint16_t h = (uint16_t)rng_u64(r);
    if (extreme) switch (rng_int(r, 0, 5)) {
        case 0: return 0x0000;                                            /* 0 */
        case 1: return 0x8000;                                            /* -0 */
        case 2: return (uint16_t)(rng_int(r, 1, 0x3FF) | (rng_int(r, 0, 1) << 15)); /* subnormal */
        case 3: return rng_int(r, 0, 1) ? 0x7BFF : 0xFBFF;                /* +-65504 */
        default: break;
        }
    /* ordinary: |value| in [2^-10, 2^2), either sign */
    return (uint16_t)((h & 0x83FF) | (uint16_t)rng_int(r, 5, 16) << 10);
}

static void put_half(uint8_t *p, uint16_t h) { p[0] = (uint8_t)h, p[1] = (uint8_t)(h >> 8); }

/* |value| in [2^lo, 2^hi) (lo >= -14: fp16 normals), either sign */
static uint16_t half_between(rng_t *r, int lo, int hi)
{
    return (uint16_t)((rng_u64(r) & 0x83FF) | (uint16_t)rng_int(r, lo + 15, hi + 14) << 10);
}

/* QREF_SANE scales: weights below about 1 in magnitude, as in real files (d times the largest quant, or
 * sub-scale times quant, about 2^-1 at most; the mins, which are subtracted, up to about 1) */
static void sane_scales(uint8_t *b, int type, rng_t *r)
{
    switch (type) {
    case TK_GGML_Q4_0: put_half(b, half_between(r, -7, -4)); break;            /* |q - 8| <= 8 */
    case TK_GGML_Q5_0: put_half(b, half_between(r, -8, -5)); break;            /* |q - 16| <= 16 */
    case TK_GGML_Q8_0: put_half(b, half_between(r, -11, -8)); break;           /* |q| <= 128 */
    case TK_GGML_Q4_1: put_half(b, half_between(r, -8, -5)), put_half(b + 2, half_between(r, -4, -1)); break;
    case TK_GGML_Q5_1: put_half(b, half_between(r, -9, -6)), put_half(b + 2, half_between(r, -4, -1)); break;
    case TK_GGML_Q4_K: put_half(b, half_between(r, -14, -11)), put_half(b + 2, half_between(r, -10, -7)); break;
    case TK_GGML_Q5_K: put_half(b, half_between(r, -14, -12)), put_half(b + 2, half_between(r, -10, -7)); break;
    case TK_GGML_Q6_K: put_half(b + 208, half_between(r, -14, -13)); break; /* 127 x 32 = 2^12 */
    default: break;
    }
}

void qref_random_blocks(uint8_t *dst, const qref_type *t, size_t n_blocks, rng_t *r, int mode)
{
    int extreme = mode == QREF_EXTREME || mode == QREF_EXTREME_FINITE;
    size_t n = n_blocks * t->bytes;
    for (size_t i = 0; i < n; i++) dst[i] = (uint8_t)rng_u64(r);
    for (size_t k = 0; k < n_blocks; k++) {
        uint8_t *b = dst + k * t->bytes;
        switch (t->type) {
        case TK_GGML_F32: { /* finite values only (NaN payloads are memcpy'd, but keep comparisons simple) */
            static const float special[] = {0.0f, -0.0f, 1e-40f, 3e38f, -3e38f};
            float f = (float)rng_normal(r);
            if (mode == QREF_EXTREME_FINITE && rng_int(r, 0, 5) == 0) f = special[rng_int(r, 0, 4)];
            memcpy(b, &f, sizeof f);
            break;
        }
        case TK_GGML_Q4_0: case TK_GGML_Q5_0: case TK_GGML_Q8_0:
            if (mode == QREF_SANE) sane_scales(b, t->type, r);
            else put_half(b, random_half(r, extreme));
            break;
        case TK_GGML_Q4_1: case TK_GGML_Q5_1: case TK_GGML_Q4_K: case TK_GGML_Q5_K:
            if (mode == QREF_SANE) {
                sane_scales(b, t->type, r);
                break;
            }
            put_half(b, random_half(r, extreme));
            put_half(b + 2, random_half(r, extreme));
            break;
        case TK_GGML_Q6_K:
            if (mode == QREF_SANE) sane_scales(b, t->type, r);
            else put_half(b + 208, random_half(r, extreme));
            break;
        case TK_GGML_F16:
            if (mode == QREF_SANE) put_half(b, random_half(r, 0));
            else if (mode == QREF_EXTREME_FINITE && ((b[1] >> 2) & 31) == 31) b[1] &= 0x83; /* exponent 31 -> 0 */
            break;
        case TK_GGML_BF16: { /* the high half of a float32: sign, 8 exponent bits, 7 mantissa bits */
            uint16_t h = (uint16_t)(b[0] | b[1] << 8);
            if (mode == QREF_SANE) h = (uint16_t)((h & 0x807F) | (uint16_t)rng_int(r, 127 - 10, 127 + 1) << 7);
            else if (mode == QREF_EXTREME_FINITE && (h & 0x7F80) == 0x7F80) h &= 0x807F; /* exponent 255 -> 0 */
            put_half(b, h);
            break;
        }
        default: break;
        }
    }
}
