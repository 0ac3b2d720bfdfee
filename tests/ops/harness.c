/* harness.c - see harness.h. */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *g_backend_label = "";
int g_failures = 0, g_checks = 0;

/* ---- random numbers: splitmix64 ---- */

uint64_t rng_u64(rng_t *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rng_uniform(rng_t *r) { return (double)(rng_u64(r) >> 11) * 0x1p-53; }

double rng_normal(rng_t *r)
{
    double u = rng_uniform(r), v = rng_uniform(r);
    return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

int rng_int(rng_t *r, int lo, int hi) { return lo + (int)(rng_u64(r) % (uint64_t)(hi - lo + 1)); }

/* ---- matrices ---- */

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

double *dvec(size_t n) { return xcalloc(n, sizeof(double)); }
float *fvec(size_t n) { return xcalloc(n, sizeof(float)); }

mat mat_new(int rows, int cols, int ld)
{
    mat m = {fvec((size_t)rows * ld), dvec((size_t)rows * ld), rows, cols, ld};
    for (int r = 0; r < rows; r++)
        for (int c = cols; c < ld; c++) m.f[(size_t)r * ld + c] = PAD_SENTINEL, m.d[(size_t)r * ld + c] = PAD_SENTINEL;
    return m;
}

void mat_free(mat *m)
{
    free(m->f);
    free(m->d);
    m->f = NULL, m->d = NULL;
}

void mat_randn(mat *m, rng_t *r, double scale)
{
    for (int i = 0; i < m->rows; i++)
        for (int c = 0; c < m->cols; c++) m->f[(size_t)i * m->ld + c] = (float)(scale * rng_normal(r));
    mat_to_double(m);
}

void mat_fill(mat *m, float v)
{
    for (int i = 0; i < m->rows; i++)
        for (int c = 0; c < m->cols; c++) m->f[(size_t)i * m->ld + c] = v;
    mat_to_double(m);
}

void mat_to_double(mat *m)
{
    for (int i = 0; i < m->rows; i++)
        for (int c = 0; c < m->cols; c++) m->d[(size_t)i * m->ld + c] = m->f[(size_t)i * m->ld + c];
}

void mat_copy(mat *dst, const mat *src)
{
    memcpy(dst->f, src->f, (size_t)src->rows * src->ld * sizeof(float));
    memcpy(dst->d, src->d, (size_t)src->rows * src->ld * sizeof(double));
}

int mat_guard_ok(const mat *m)
{
    for (int r = 0; r < m->rows; r++)
        for (int c = m->cols; c < m->ld; c++) {
            float v = m->f[(size_t)r * m->ld + c];
            if (memcmp(&v, &(float){PAD_SENTINEL}, sizeof v) != 0) return 0;
        }
    return 1;
}

/* ---- comparison ---- */

cmp_t compare(const float *got, const double *want, const double *scale, int rows, int cols, int ld, tol_t tol)
{
    cmp_t c = {0, 0, 0, 0};
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++) {
            size_t i = (size_t)r * ld + j;
            double g = got[i], w = want[i], err = fabs(g - w), ratio;
            if (tol.exact) {
                int same = got[i] == (float)w || (isnan(g) && isnan(w));
                ratio = same ? 0 : INFINITY;
            } else {
                double bound = tol.atol + tol.rtol * (scale ? scale[i] : fabs(w));
                ratio = err / bound;
                if (isnan(g) != isnan(w) || isinf(g) != isinf(w)) ratio = INFINITY;
                else if (isinf(w) && g == w) ratio = 0, err = 0;
            }
            if (isnan(ratio) || ratio > 1) c.bad++;
            if (!(ratio <= c.max_ratio)) c.max_ratio = ratio, c.worst = (long)i;
            if (!(err <= c.max_abs)) c.max_abs = err;
        }
    return c;
}

cmp_t cmp_merge(cmp_t a, cmp_t b)
{
    cmp_t c = isnan(a.max_ratio) || a.max_ratio >= b.max_ratio ? a : b;
    c.max_abs = a.max_abs > b.max_abs ? a.max_abs : b.max_abs;
    c.bad = a.bad + b.bad;
    return c;
}

/* ---- the report ---- */

void report(const char *op, const char *what, cmp_t c, tol_t tol, int extra_ok, const char *extra)
{
    int ok = c.bad == 0 && extra_ok;
    g_checks++;
    if (!ok) g_failures++;
    if (tol.exact)
        printf("%-4s %-13s %-27s %-58s max|err| %.1e  exact%s%s\n", ok ? "ok" : "FAIL", g_backend_label, op, what,
               c.max_abs, extra ? "  " : "", extra ? extra : "");
    else
        printf("%-4s %-13s %-27s %-58s max|err| %.1e  %.2f of tol (%.0e + %.0e*|ref|)%s%s\n", ok ? "ok" : "FAIL",
               g_backend_label, op, what, c.max_abs, c.max_ratio, tol.atol, tol.rtol, extra ? "  " : "",
               extra ? extra : "");
    if (c.bad) printf("     %ld elements out of tolerance, worst at flat index %ld\n", c.bad, c.worst);
    fflush(stdout);
}

void report_bool(const char *op, const char *what, int ok, const char *detail)
{
    g_checks++;
    if (!ok) g_failures++;
    printf("%-4s %-13s %-27s %-58s %s\n", ok ? "ok" : "FAIL", g_backend_label, op, what, detail && !ok ? detail : "");
    fflush(stdout);
}

int g_notes = 0, g_notes_diff = 0;

void report_note(const char *op, const char *what, int same, const char *detail)
{
    g_notes++;
    if (!same) g_notes_diff++;
    printf("%-4s %-13s %-27s %-58s %s\n", same ? "same" : "DIFF", g_backend_label, op, what, detail && !same ? detail : "");
    fflush(stdout);
}

/* ---- finite differences ---- */

cmp_t fd_check(objective_fn L, void *ctx, mat *x, const float *grad, int ldg, int max_coords, rng_t *r, tol_t tol)
{
    long n = (long)x->rows * x->cols;
    int k = n <= max_coords ? (int)n : max_coords;
    float *got = fvec((size_t)k);
    double *want = dvec((size_t)k);
    for (int i = 0; i < k; i++) {
        long flat = n <= max_coords ? i : i == 0 ? 0 : i == 1 ? n - 1 : (long)(rng_u64(r) % (uint64_t)n);
        int row = (int)(flat / x->cols), col = (int)(flat % x->cols);
        double *p = &x->d[(size_t)row * x->ld + col], saved = *p;
        /* central differences: truncation ~h^2 |L'''|, rounding ~1e-16 |L| / h; inputs are O(1) */
        double h = 1e-5 * (fabs(saved) > 1 ? fabs(saved) : 1);
        *p = saved + h;
        double up = L(ctx);
        *p = saved - h;
        double down = L(ctx);
        *p = saved;
        want[i] = (up - down) / (2 * h);
        got[i] = grad[(size_t)row * ldg + col];
    }
    cmp_t c = compare(got, want, NULL, 1, k, k, tol);
    free(got);
    free(want);
    return c;
}
