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

static void adamw_task(void *ctx, int task, int thread)
{
    (void)thread;
    optim_args *o = ctx;
    size_t begin, end;
    range(o->n, task, &begin, &end);
    const tk_adamw_factors *f = o->f;
    float *p = o->p, *g = o->g, *m = o->m, *v = o->v;
    const float b1w = f->b1w, b2 = f->b2, b2w = f->b2w, eps = f->eps;
    for (size_t i = begin; i < end; i++) {
        float grad = g[i] * f->clip_scale;
        p[i] *= f->decay;
        /* torch.lerp(m, g, w) = w < 0.5 ? m + w (g - m) : g - (g - m)(1 - w) */
        m[i] = b1w < 0.5f ? m[i] + b1w * (grad - m[i]) : grad - (grad - m[i]) * (1.0f - b1w);
        v[i] = v[i] * b2 + b2w * grad * grad;
        float denom = sqrtf(v[i]) / f->bc2_sqrt + eps;
        p[i] += -f->step_size * (m[i] / denom);
        g[i] = 0.0f;
    }
}

void tk_cpu_adamw(tk_pool *pool, float *p, float *g, float *m, float *v, size_t n, const tk_adamw_factors *f)
{
    optim_args o = {.p = p, .g = g, .m = m, .v = v, .n = n, .f = f};
    tk_pool_run(pool, OPTIM_TASKS, adamw_task, &o);
}
