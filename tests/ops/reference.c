/* reference.c - see reference.h. Definitions, not kernels: every loop is the
 * formula as written, summed in float64 in index order. */
#include "reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static double *scratch(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof(double));
    if (!p) abort();
    return p;
}

/* ---- matmuls ---- */

void ref_matmul_nt(double *y, int ldy, const double *x, int ldx, const double *w, int ldw, int T, int N, int K,
                   double alpha, double beta)
{
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int k = 0; k < K; k++) s += x[(size_t)t * ldx + k] * w[(size_t)n * ldw + k];
            double *yt = &y[(size_t)t * ldy + n];
            *yt = beta == 0 ? alpha * s : alpha * s + beta * *yt;
        }
}

void ref_matmul_nn(double *y, int ldy, const double *x, int ldx, const double *w, int ldw, int T, int N, int K,
                   double alpha, double beta)
{
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int k = 0; k < K; k++) s += x[(size_t)t * ldx + k] * w[(size_t)k * ldw + n];
            double *yt = &y[(size_t)t * ldy + n];
            *yt = beta == 0 ? alpha * s : alpha * s + beta * *yt;
        }
}

void ref_matmul_tn_acc(double *g, int ldg, const double *a, int lda, const double *b, int ldb, int T, int M, int N,
                       double alpha)
{
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int t = 0; t < T; t++) s += a[(size_t)t * lda + m] * b[(size_t)t * ldb + n];
            g[(size_t)m * ldg + n] += alpha * s;
        }
}

/* ---- indexing, the optimizer, RoPE tables ---- */

void ref_gather(double *out, const double *x, int ldx, const int32_t *row, const int32_t *col, int n)
{
    for (int i = 0; i < n; i++) out[i] = x[(size_t)row[i] * ldx + col[i]];
}

void ref_scatter_add(double *x, int ldx, const int32_t *row, const int32_t *col, const double *val, int n)
{
    for (int i = 0; i < n; i++) x[(size_t)row[i] * ldx + col[i]] += val[i];
}

double ref_sum_squares(const float *x, size_t n)
{
    long double s = 0;
    for (size_t i = 0; i < n; i++) s += (long double)x[i] * x[i];
    return (double)s;
}

void ref_adamw(double *p, double *g, double *m, double *v, size_t n, double clip_scale, double decay,
               double step_size, double bc2_sqrt, double b1w, double b2, double b2w, double eps)
{
    for (size_t i = 0; i < n; i++) {
        double grad = g[i] * clip_scale;
        p[i] *= decay;
        m[i] += b1w * (grad - m[i]);
        v[i] = b2 * v[i] + b2w * grad * grad;
        p[i] -= step_size * m[i] / (sqrt(v[i]) / bc2_sqrt + eps);
        g[i] = 0;
    }
}

void ref_rope_table(double *cos_t, double *sin_t, const int32_t *pos, int pos_dims, int rows, const float *inv_freq,
                    const int8_t *axis, int half)
{
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < half; i++) {
            int component = axis ? axis[i] : 0;
            float angle = (float)pos[(size_t)r * pos_dims + component] * inv_freq[i];
            cos_t[(size_t)r * half + i] = cos((double)angle);
            sin_t[(size_t)r * half + i] = sin((double)angle);
        }
}

/* ---- row-wise ---- */

void ref_embed(double *x, const double *table, const int32_t *tokens, int T, int D)
{
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D; i++) x[(size_t)t * D + i] = table[(size_t)tokens[t] * D + i];
}

static double inv_rms_of(const double *x, int n, double eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    return 1.0 / sqrt(ss / n + eps);
}

void ref_rmsnorm(double *y, int ldy, const double *x, int ldx, const double *w, int rows, int n, double eps,
                 double *inv_rms)
{
    for (int r = 0; r < rows; r++) {
        const double *xr = x + (size_t)r * ldx;
        double inv = inv_rms_of(xr, n, eps);
        if (inv_rms) inv_rms[r] = inv;
        for (int i = 0; i < n; i++) y[(size_t)r * ldy + i] = xr[i] * inv * w[i];
    }
}

/* y_i = x_i w_i s, s = (mean(x^2) + eps)^-1/2, ds/dx_j = -s^3 x_j / n:
 * dL/dx_j = dy_j w_j s - x_j s^3 / n * sum_i dy_i w_i x_i */
void ref_rmsnorm_backward(double *dx, int lddx, const double *dy, int lddy, const double *x, int ldx, const double *w,
                          int rows, int n, double eps, int accumulate)
{
    for (int r = 0; r < rows; r++) {
        const double *xr = x + (size_t)r * ldx, *dyr = dy + (size_t)r * lddy;
        double s = inv_rms_of(xr, n, eps), dot = 0;
        for (int i = 0; i < n; i++) dot += dyr[i] * w[i] * xr[i];
        for (int j = 0; j < n; j++) {
            double g = dyr[j] * w[j] * s - xr[j] * s * s * s / n * dot;
            double *d = &dx[(size_t)r * lddx + j];
            *d = accumulate ? *d + g : g;
        }
    }
}

void ref_add_bias(double *y, int ldy, const double *b, int rows, int n)
{
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) y[(size_t)r * ldy + i] += b[i];
}

/* out = x cos + rotate_half(x) sin, rotate_half([lo, hi]) = [-hi, lo] */
void ref_rope(double *x, int ldx, int rows, int n_heads, int head_dim, const double *cos, const double *sin,
              int inverse)
{
    int half = head_dim / 2;
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < n_heads; h++) {
            double *lo = x + (size_t)r * ldx + (size_t)h * head_dim, *hi = lo + half;
            for (int i = 0; i < half; i++) {
                double c = cos[(size_t)r * half + i], s = (inverse ? -1 : 1) * sin[(size_t)r * half + i];
                double a = lo[i], b = hi[i];
                lo[i] = a * c - b * s;
                hi[i] = b * c + a * s;
            }
        }
}

static double sigmoid(double g) { return 1.0 / (1.0 + exp(-g)); }

void ref_swiglu(double *act, const double *gate_up, int T, int F)
{
    for (int t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            double g = gate_up[(size_t)t * 2 * F + i], u = gate_up[(size_t)t * 2 * F + F + i];
            act[(size_t)t * F + i] = g * sigmoid(g) * u;
        }
}

/* d(g sigmoid(g))/dg = sigmoid(g) + g sigmoid(g) (1 - sigmoid(g)) */
void ref_swiglu_backward(double *dgate_up, const double *dact, const double *gate_up, int T, int F)
{
    for (int t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            double g = gate_up[(size_t)t * 2 * F + i], u = gate_up[(size_t)t * 2 * F + F + i];
            double s = sigmoid(g), da = dact[(size_t)t * F + i];
            dgate_up[(size_t)t * 2 * F + i] = da * u * (s + g * s * (1 - s));
            dgate_up[(size_t)t * 2 * F + F + i] = da * g * s;
        }
}

static double row_lse(const double *x, int n)
{
    double m = -INFINITY, s = 0;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    for (int i = 0; i < n; i++) s += exp(x[i] - m);
    return m + log(s);
}

void ref_logsumexp(double *lse, const double *x, int ldx, int rows, int n)
{
    for (int r = 0; r < rows; r++) lse[r] = row_lse(x + (size_t)r * ldx, n);
}

void ref_softmax_scale(double *y, int ldy, const double *x, int ldx, const double *lse, const double *g, int rows,
                       int n)
{
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) y[(size_t)r * ldy + i] = -g[r] * exp(x[(size_t)r * ldx + i] - lse[r]);
}

/* ---- attention ---- */

/* p[0..n) = softmax over keys 0..n-1 of q . k_j / sqrt(Dh); returns the log-sum-exp */
static double scores_softmax(double *p, const double *q, const double *k, int ldk, int n, int Dh)
{
    double scale = 1.0 / sqrt((double)Dh);
    for (int j = 0; j < n; j++) {
        double s = 0;
        for (int d = 0; d < Dh; d++) s += q[d] * k[(size_t)j * ldk + d];
        p[j] = s * scale;
    }
    double lse = row_lse(p, n);
    for (int j = 0; j < n; j++) p[j] = exp(p[j] - lse);
    return lse;
}

void ref_attention(double *out, int ldo, const double *q, const double *k, const double *v, int ldqkv,
                   const int32_t *seq_start, int n_seqs, int n_heads, int n_kv_heads, int head_dim, double *lse)
{
    int group = n_heads / n_kv_heads, Dh = head_dim;
    double *p = scratch((size_t)seq_start[n_seqs]);
    for (int s = 0; s < n_seqs; s++)
        for (int t = seq_start[s]; t < seq_start[s + 1]; t++)
            for (int h = 0; h < n_heads; h++) {
                int g = h / group, n_keys = t - seq_start[s] + 1;
                const double *kg = k + (size_t)seq_start[s] * ldqkv + (size_t)g * Dh;
                const double *vg = v + (size_t)seq_start[s] * ldqkv + (size_t)g * Dh;
                double l = scores_softmax(p, q + (size_t)t * ldqkv + (size_t)h * Dh, kg, ldqkv, n_keys, Dh);
                if (lse) lse[(size_t)t * n_heads + h] = l;
                for (int d = 0; d < Dh; d++) {
                    double o = 0;
                    for (int j = 0; j < n_keys; j++) o += p[j] * vg[(size_t)j * ldqkv + d];
                    out[(size_t)t * ldo + (size_t)h * Dh + d] = o;
                }
            }
    free(p);
}

void ref_attention_full(double *out, int ldo, const double *q, const double *k, const double *v, int ldqkv,
                        const int32_t *seq_start, int n_seqs, int n_heads, int head_dim)
{
    int Dh = head_dim;
    double *p = scratch((size_t)seq_start[n_seqs]);
    for (int s = 0; s < n_seqs; s++)
        for (int t = seq_start[s]; t < seq_start[s + 1]; t++)
            for (int h = 0; h < n_heads; h++) {
                int n_keys = seq_start[s + 1] - seq_start[s]; /* every row of the sequence */
                const double *kh = k + (size_t)seq_start[s] * ldqkv + (size_t)h * Dh;
                const double *vh = v + (size_t)seq_start[s] * ldqkv + (size_t)h * Dh;
                scores_softmax(p, q + (size_t)t * ldqkv + (size_t)h * Dh, kh, ldqkv, n_keys, Dh);
                for (int d = 0; d < Dh; d++) {
                    double o = 0;
                    for (int j = 0; j < n_keys; j++) o += p[j] * vh[(size_t)j * ldqkv + d];
                    out[(size_t)t * ldo + (size_t)h * Dh + d] = o;
                }
            }
    free(p);
}

void ref_layer_norm(double *y, int ldy, const double *x, int ldx, const double *w, const double *b, int rows, int n,
                    double eps)
{
    for (int r = 0; r < rows; r++) {
        const double *xr = x + (size_t)r * ldx;
        double mean = 0, var = 0;
        for (int i = 0; i < n; i++) mean += xr[i];
        mean /= n;
        for (int i = 0; i < n; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= n;
        for (int i = 0; i < n; i++) y[(size_t)r * ldy + i] = (xr[i] - mean) / sqrt(var + eps) * w[i] + b[i];
    }
}

double ref_gelu(double x, int kind)
{
    if (kind == 1) return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); /* sqrt(2 / pi) */
    if (kind == 2) return x / (1.0 + exp(-1.702 * x));
    return 0.5 * x * erfc(-x / sqrt(2.0));
}

/* With p = softmax(s), s_j = scale q . k_j, o = sum_j p_j v_j and L = dout . o:
 * dp_j = dout . v_j, ds_j = p_j (dp_j - sum_i p_i dp_i),
 * dq = scale sum_j ds_j k_j, dk_j += scale ds_j q, dv_j += p_j dout. */
void ref_attention_backward(double *dq, double *dk, double *dv, const double *dout, int ldo, const double *q,
                            const double *k, const double *v, int ldqkv, const int32_t *seq_start, int n_seqs,
                            int n_heads, int n_kv_heads, int head_dim)
{
    int group = n_heads / n_kv_heads, Dh = head_dim, T = seq_start[n_seqs];
    double scale = 1.0 / sqrt((double)Dh);
    double *p = scratch((size_t)T), *dp = scratch((size_t)T);
    for (int t = 0; t < T; t++) {
        for (int c = 0; c < n_heads * Dh; c++) dq[(size_t)t * ldqkv + c] = 0;
        for (int c = 0; c < n_kv_heads * Dh; c++) dk[(size_t)t * ldqkv + c] = dv[(size_t)t * ldqkv + c] = 0;
    }
    for (int s = 0; s < n_seqs; s++)
        for (int t = seq_start[s]; t < seq_start[s + 1]; t++)
            for (int h = 0; h < n_heads; h++) {
                int g = h / group, n_keys = t - seq_start[s] + 1;
                size_t base = (size_t)seq_start[s] * ldqkv + (size_t)g * Dh;
                const double *qt = q + (size_t)t * ldqkv + (size_t)h * Dh, *dot = dout + (size_t)t * ldo + (size_t)h * Dh;
                scores_softmax(p, qt, k + base, ldqkv, n_keys, Dh);
                double mean = 0;
                for (int j = 0; j < n_keys; j++) {
                    dp[j] = 0;
                    for (int d = 0; d < Dh; d++) dp[j] += dot[d] * v[base + (size_t)j * ldqkv + d];
                    mean += p[j] * dp[j];
                }
                for (int j = 0; j < n_keys; j++) {
                    double ds = p[j] * (dp[j] - mean);
                    for (int d = 0; d < Dh; d++) {
                        dq[(size_t)t * ldqkv + (size_t)h * Dh + d] += scale * ds * k[base + (size_t)j * ldqkv + d];
                        dk[base + (size_t)j * ldqkv + d] += scale * ds * qt[d];
                        dv[base + (size_t)j * ldqkv + d] += p[j] * dot[d];
                    }
                }
            }
    free(p);
    free(dp);
}

void ref_attention_decode(double *out, int ldo, const double *q, int ldq, const ref_kv_view *views, int n,
                          int n_heads, int n_kv_heads, int head_dim, int ld_kv)
{
    int group = n_heads / n_kv_heads, Dh = head_dim, max_keys = 1;
    for (int i = 0; i < n; i++)
        if (views[i].n0 + views[i].n1 > max_keys) max_keys = views[i].n0 + views[i].n1;
    double *keys = scratch((size_t)max_keys * Dh), *vals = scratch((size_t)max_keys * Dh), *p = scratch((size_t)max_keys);
    for (int i = 0; i < n; i++)
        for (int h = 0; h < n_heads; h++) {
            const ref_kv_view *kv = &views[i];
            int g = h / group, n_keys = kv->n0 + kv->n1;
            /* the two spans, one after the other */
            for (int j = 0; j < n_keys; j++) {
                const double *kr = j < kv->n0 ? kv->k0 + (size_t)j * ld_kv : kv->k1 + (size_t)(j - kv->n0) * ld_kv;
                const double *vr = j < kv->n0 ? kv->v0 + (size_t)j * ld_kv : kv->v1 + (size_t)(j - kv->n0) * ld_kv;
                memcpy(keys + (size_t)j * Dh, kr + (size_t)g * Dh, (size_t)Dh * sizeof(double));
                memcpy(vals + (size_t)j * Dh, vr + (size_t)g * Dh, (size_t)Dh * sizeof(double));
            }
            scores_softmax(p, q + (size_t)i * ldq + (size_t)h * Dh, keys, Dh, n_keys, Dh);
            for (int d = 0; d < Dh; d++) {
                double o = 0;
                for (int j = 0; j < n_keys; j++) o += p[j] * vals[(size_t)j * Dh + d];
                out[(size_t)i * ldo + (size_t)h * Dh + d] = o;
            }
        }
    free(keys);
    free(vals);
    free(p);
}
