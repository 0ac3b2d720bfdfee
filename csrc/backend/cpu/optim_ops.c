/* optim_ops.c - AdamW and the global gradient norm on the CPU, split over
 * the pool in a fixed number of tasks (so sums do not depend on the thread
 * count). The float operations follow torch's single-tensor AdamW on CPU one
 * for one: decoupled decay p *= 1 - lr wd; m = lerp(m, g, 1 - b1);
 * v = v b2 + (1 - b2) g g; p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps).
 */
#include "optim_ops.h"

#include <math.h>

enum { OPTIM_TASKS = 64 };

typedef struct {
    float *p, *g, *m, *v;
    const float *x;
    size_t n;
    const tk_adamw_factors *f;
    double partial[OPTIM_TASKS];
} optim_args;

typedef struct {
    const float *p, *g, *m, *v;
    size_t n;
    const tk_adamw_factors *f;
    float peak[OPTIM_TASKS];
} peak_args;

static void range(size_t n, int task, size_t *begin, size_t *end)
{
    *begin = n * (size_t)task / OPTIM_TASKS;
    *end = n * (size_t)(task + 1) / OPTIM_TASKS;
}

static void sum_squares_task(void *ctx, int task, int thread)
{
    (void)thread;
    optim_args *o = ctx;
    size_t begin, end;
    range(o->n, task, &begin, &end);
    double s = 0;
    for (size_t i = begin; i < end; i++) s += (double)o->x[i] * o->x[i];
    o->partial[task] = s;
}

double tk_cpu_sum_squares(tk_pool *pool, const float *x, size_t n)
{
    optim_args o = {.x = x, .n = n};
    tk_pool_run(pool, OPTIM_TASKS, sum_squares_task, &o);
    double sum = 0;
    for (int t = 0; t < OPTIM_TASKS; t++) sum += o.partial[t];
    return sum;
}

/* One parameter's update: the new p, m and v (adamw and adamw_peak share it, so a preview is the step). */
static inline void adamw_element(float *p, float *m, float *v, float g, const tk_adamw_factors *f)
{
    float grad = g * f->clip_scale, b1w = f->b1w;
    float pn = *p * f->decay;
    /* torch.lerp(m, g, w) = w < 0.5 ? m + w (g - m) : g - (g - m)(1 - w) */
    float mn = b1w < 0.5f ? *m + b1w * (grad - *m) : grad - (grad - *m) * (1.0f - b1w);
    float vn = *v * f->b2 + f->b2w * grad * grad;
    float denom = sqrtf(vn) / f->bc2_sqrt + f->eps;
    *p = pn + -f->step_size * (mn / denom);
    *m = mn;
    *v = vn;
}

static void adamw_task(void *ctx, int task, int thread)
{
    (void)thread;
    optim_args *o = ctx;
    size_t begin, end;
    range(o->n, task, &begin, &end);
    for (size_t i = begin; i < end; i++) {
        adamw_element(&o->p[i], &o->m[i], &o->v[i], o->g[i], o->f);
        o->g[i] = 0.0f;
    }
}

static void adamw_peak_task(void *ctx, int task, int thread)
{
    (void)thread;
    peak_args *o = ctx;
    size_t begin, end;
    range(o->n, task, &begin, &end);
    const float *p = o->p, *g = o->g, *m = o->m, *v = o->v;
    float peak = 0.0f;
    for (size_t i = begin; i < end; i++) {
        float pn = p[i], mn = m[i], vn = v[i];
        adamw_element(&pn, &mn, &vn, g[i], o->f);
        if (!isfinite(pn) || !isfinite(mn) || !isfinite(vn)) {
            peak = INFINITY;
            break;
        }
        if (fabsf(pn) > peak) peak = fabsf(pn);
    }
    o->peak[task] = peak;
}

float tk_cpu_adamw_peak(tk_pool *pool, const float *p, const float *g, const float *m, const float *v, size_t n,
                        const tk_adamw_factors *f)
{
    peak_args o = {.p = p, .g = g, .m = m, .v = v, .n = n, .f = f};
    tk_pool_run(pool, OPTIM_TASKS, adamw_peak_task, &o);
    float peak = 0.0f;
    for (int t = 0; t < OPTIM_TASKS; t++)
        if (o.peak[t] > peak) peak = o.peak[t];
    return peak;
}

void tk_cpu_adamw(tk_pool *pool, float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f)
{
    optim_args o = {.p = p, .g = g, .m = m, .v = v, .n = n, .f = f};
    tk_pool_run(pool, OPTIM_TASKS, adamw_task, &o);
}
