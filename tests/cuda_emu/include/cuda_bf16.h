/* cuda_bf16.h (the emulator's, see cuda_runtime.h): __nv_bfloat16 as its 16 bits, with exact conversions. */
#ifndef TK_CUDA_EMU_BF16_H
#define TK_CUDA_EMU_BF16_H

#include "cuda_runtime.h"

struct __nv_bfloat16 {
    unsigned short x;
};
typedef __nv_bfloat16 nv_bfloat16;

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.x << 16); }

/* round to nearest even; NaN stays a (quiet) NaN */
inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    unsigned u = __float_as_uint(f);
    __nv_bfloat16 b;
    if (f != f) b.x = (unsigned short)((u >> 16) | 0x40u);
    else b.x = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return b;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u)
{
    __nv_bfloat16 b;
    b.x = u;
    return b;
}

#endif
