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

/* 16 floats as one vector (gcc's vector extension: a zmm, or two ymm on AVX2), loadable at any float address */
typedef float tk_v16f __attribute__((vector_size(64), aligned(4)));

/* s[r] = w_r . x over K elements for four rows w_r sharing each load of x (four independent chains hide the adds'
 * latency; the weights stream at memory speed). Each sum is 16 lane sums over k = j mod 16 in order, the tail
 * k >= K - K % 16 summed first, then lanes 0..15 added in order: tk_dot1's order, whatever the grouping. */
static inline void tk_dot4(float s[4], const float *w0, const float *w1, const float *w2, const float *w3,
                           const float *x, int K)
{
    const int K16 = K & ~15;
    tk_v16f c[4] = {{0}, {0}, {0}, {0}};
    for (int k = 0; k < K16; k += 16) {
        tk_v16f xv = *(const tk_v16f *)(x + k);
        c[0] += *(const tk_v16f *)(w0 + k) * xv;
        c[1] += *(const tk_v16f *)(w1 + k) * xv;
        c[2] += *(const tk_v16f *)(w2 + k) * xv;
        c[3] += *(const tk_v16f *)(w3 + k) * xv;
    }
    const float *w[4] = {w0, w1, w2, w3};
    for (int r = 0; r < 4; r++) {
        float sum = 0;
        for (int k = K16; k < K; k++) sum += w[r][k] * x[k];
        for (int j = 0; j < 16; j++) sum += c[r][j];
        s[r] = sum;
    }
}

static inline float tk_dot1(const float *w, const float *x, int K)
{
    const int K16 = K & ~15;
    tk_v16f c = {0};
    for (int k = 0; k < K16; k += 16) c += *(const tk_v16f *)(w + k) * *(const tk_v16f *)(x + k);
    float sum = 0;
    for (int k = K16; k < K; k++) sum += w[k] * x[k];
    for (int j = 0; j < 16; j++) sum += c[j];
    return sum;
}

#endif
