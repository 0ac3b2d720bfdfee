/* vec_math.h - element-wise math written so gcc vectorises it without
 * -ffast-math: no calls, no branches (selects become blends; on AVX2, which has
 * no masks to predicate with, only with -fno-trapping-math: setup.py), and reductions
 * over 16 independent partial results (a fixed order, so results do not
 * depend on the vector width).
 */
#ifndef TK_VEC_MATH_H
#define TK_VEC_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) in float: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7
 * Taylor polynomial (truncation < 1e-8 relative), 2^n through the exponent
 * bits. Within 2 ulp of expf on [-87, 88]; 0 below (so exp(-inf) = 0, as
 * masked softmax needs) and +inf above 88 (expf overflows at 88.72: the
 * engine only needs exp of non-positive values and of -x in SiLU). */
static inline float tk_expf(float x)
{
    const float big = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float xc = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float n = (xc * 1.44269504088896341f + big) - big;
    float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    y = x < -87.0f ? 0.0f : y;
    return x > 88.0f ? (float)INFINITY : y;
}

static inline float tk_sum(const float *x, int n)
{
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[i + j];
    float s = 0;
    for (; i < n; i++) s += x[i];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

static inline float tk_sum_of_squares(const float *x, int n)
{
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[i + j] * x[i + j];
    float s = 0;
    for (; i < n; i++) s += x[i] * x[i];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

static inline float tk_max(const float *x, int n)
{
    float acc[16];
    for (int j = 0; j < 16; j++) acc[j] = -INFINITY;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j];
    float m = -INFINITY;
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    for (int j = 0; j < 16; j++) m = acc[j] > m ? acc[j] : m;
    return m;
}

#endif
