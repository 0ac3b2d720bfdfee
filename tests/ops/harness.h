/* harness.h - what the per-op tests share: a seeded RNG, float matrices with
 * guarded row padding and a float64 twin, comparison against a float64
 * reference with a stated tolerance, central finite differences, and the
 * one-line-per-check report.
 *
 * A mat is rows x cols valid floats in rows of ld >= cols; the ld - cols
 * padding floats of every row hold a sentinel that no op may change
 * (mat_guard_ok). Allocations are exact (rows * ld floats, no slack), so
 * AddressSanitizer sees any access past the last row.
 */
#ifndef TK_TEST_HARNESS_H
#define TK_TEST_HARNESS_H

#include <stddef.h>
#include <stdint.h>

/* ---- random numbers (xoshiro-style, deterministic per seed) ---- */
typedef struct {
    uint64_t s;
} rng_t;

uint64_t rng_u64(rng_t *r);
double rng_uniform(rng_t *r);           /* [0, 1) */
double rng_normal(rng_t *r);            /* N(0, 1) */
int rng_int(rng_t *r, int lo, int hi);  /* [lo, hi] */

/* ---- matrices ---- */
#define PAD_SENTINEL (-1234.5f)

typedef struct {
    float *f;  /* [rows, ld]: what the backend sees */
    double *d; /* [rows, ld]: the reference's copy (perturbed by finite differences) */
    int rows, cols, ld;
} mat;

mat mat_new(int rows, int cols, int ld); /* valid entries 0, padding the sentinel */
void mat_free(mat *m);
void mat_randn(mat *m, rng_t *r, double scale); /* N(0, scale^2) in f, rounded values in d */
void mat_fill(mat *m, float v);                 /* every valid entry (NaN poisons an output) */
void mat_to_double(mat *m);                     /* d = f on the valid entries */
void mat_copy(mat *dst, const mat *src);        /* same shape: f and d */
int mat_guard_ok(const mat *m);                 /* padding still the sentinel */
double *dvec(size_t n);                         /* zeroed float64 scratch */
float *fvec(size_t n);                          /* zeroed float32 scratch */

/* ---- comparison ----
 * Element i passes when |got_i - want_i| <= atol + rtol * scale_i, with
 * scale_i = |want_i| unless the check passes a scale (for sums: the sum of
 * the absolute terms, the scale of float32 summation error). exact = 1
 * demands got == (float)want instead (so -0 equals 0; NaN matches NaN). */
typedef struct {
    double atol, rtol;
    int exact;
} tol_t;

typedef struct {
    double max_abs;   /* max |got - want| */
    double max_ratio; /* max |got - want| / (atol + rtol * scale): <= 1 passes */
    long bad;         /* elements out of tolerance (NaN counts) */
    long worst;       /* index (row * ld + col) of the worst element */
} cmp_t;

/* got / want / scale with row stride ld (scale may be NULL) */
cmp_t compare(const float *got, const double *want, const double *scale, int rows, int cols, int ld, tol_t tol);
/* the worse of two comparisons, bad counts added (for one report line over several variants) */
cmp_t cmp_merge(cmp_t a, cmp_t b);

/* ---- the report ---- */
extern const char *g_backend_label; /* "cpu/3 threads", printed on every line */
extern int g_failures, g_checks;

/* Prints one line (label, what, max error, the tolerance) and counts a failure when !ok or c.bad. */
void report(const char *op, const char *what, cmp_t c, tol_t tol, int extra_ok, const char *extra);
/* A check that is a plain yes/no (guards, bit-for-bit identities); detail is printed when it fails. */
void report_bool(const char *op, const char *what, int ok, const char *detail);
/* An observation that is not a check (a property the backend may or may not have): "same" or "DIFF", never a
 * failure; g_notes_diff counts the DIFFs. */
extern int g_notes, g_notes_diff;
void report_note(const char *op, const char *what, int same, const char *detail);

/* ---- finite differences ----
 * L(ctx) evaluates a scalar objective in float64 from the inputs `ctx` holds;
 * fd_check perturbs x->d[i] by +-h for a sample of x's valid entries (all
 * of them when there are at most max_coords) and compares grad (float,
 * stride ldg, the layout of x's valid entries) with (L(+h) - L(-h)) / 2h. */
typedef double (*objective_fn)(void *ctx);
cmp_t fd_check(objective_fn L, void *ctx, mat *x, const float *grad, int ldg, int max_coords, rng_t *r,
               tol_t tol);

#endif
