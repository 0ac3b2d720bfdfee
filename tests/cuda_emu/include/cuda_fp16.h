/* cuda_fp16.h (the emulator's, see cuda_runtime.h): __half as its 16 bits, with exact conversions. */
#ifndef TK_CUDA_EMU_FP16_H
#define TK_CUDA_EMU_FP16_H

#include "cuda_runtime.h"

struct __half {
    unsigned short x;
};

inline float __half2float(__half h)
{
    unsigned sign = (unsigned)(h.x >> 15) << 31, exp = (h.x >> 10) & 31u, man = h.x & 1023u;
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (man << 13)); /* inf, NaN (payload kept) */
    if (exp == 0) {                                                          /* zero and subnormals: man 2^-24 */
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

/* round to nearest even, overflow to inf, NaN stays NaN */
inline __half __float2half_rn(float f)
{
    unsigned u = __float_as_uint(f), sign = (u >> 16) & 0x8000u;
    float a = fabsf(f);
    __half h;
    if (a != a) { h.x = (unsigned short)(sign | 0x7e00u); return h; }
    if (a >= 65520.0f) { h.x = (unsigned short)(sign | 0x7c00u); return h; }
    if (a < 6.103515625e-05f) { /* subnormal half: a multiple of 2^-24, rounded to nearest even by rintf */
        h.x = (unsigned short)(sign | (unsigned)rintf(a * 16777216.0f));
        return h;
    }
    unsigned au = __float_as_uint(a), rest = au & 0x1fffu, base = (au >> 13) - (112u << 10);
    if (rest > 0x1000u || (rest == 0x1000u && (base & 1u))) base++;
    h.x = (unsigned short)(sign | base);
    return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short u)
{
    __half h;
    h.x = u;
    return h;
}

#endif
