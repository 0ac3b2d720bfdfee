/* optim.c - AdamW (see optim.h).
 *
 * The float operations follow torch's single-tensor AdamW on CPU one for one,
 * so results agree to rounding: decoupled decay p *= 1 - lr wd; m = lerp(m,
 * g, 1 - b1); v = v b2 + (1 - b2) g g; p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2)
 * + eps) with the bias corrections in double. Global-norm clipping as
 * torch.nn.utils.clip_grad_norm_: g *= min(1, max_norm / (norm + 1e-6)).
 */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

tk_status tk_adam_params_check(const tk_adam_params *p)
{
#define FINITE_AT_LEAST(field, lo)                                                                      \
    if (!isfinite(p->field) || p->field < (lo))                                                        \
        return tk_error(TK_ERR_INVALID, "AdamParams." #field " is %g; it must be finite and >= %g", \
                        p->field, (double)(lo))
    FINITE_AT_LEAST(learning_rate, 0.0);
    FINITE_AT_LEAST(eps, 0.0);
    FINITE_AT_LEAST(weight_decay, 0.0);
    FINITE_AT_LEAST(grad_clip_norm, 0.0);
#undef FINITE_AT_LEAST
    if (!(p->beta1 >= 0.0 && p->beta1 < 1.0) || !(p->beta2 >= 0.0 && p->beta2 < 1.0))
        return tk_error(TK_ERR_INVALID, "AdamParams betas are (%g, %g); each must be in [0, 1)", p->beta1, p->beta2);
    return TK_OK;
}

enum { OPTIM_TASKS = 64 };

typedef struct {
    tk_adapter *a;
    const tk_adam_params *p;
    double partial[OPTIM_TASKS]; /* sum of squares per task */
    float clip_scale, decay, step_size, bc2_sqrt, b1w, b2, b2w, eps;
} optim_args;

static void range(const optim_args *o, int task, size_t *begin, size_t *end)
{
    size_t n = o->a->n_params;
    *begin = n * (size_t)task / OPTIM_TASKS;
    *end = n * (size_t)(task + 1) / OPTIM_TASKS;
}

static void norm_task(void *ctx, int task, int thread)
{
    (void)thread;
    optim_args *o = ctx;
    size_t begin, end;
    range(o, task, &begin, &end);
    const float *g = o->a->block + o->a->n_params;
    double s = 0;
    for (size_t i = begin; i < end; i++) s += (double)g[i] * g[i];
    o->partial[task] = s;
}

static void update_task(void *ctx, int task, int thread)
{
    (void)thread;
    optim_args *o = ctx;
    size_t begin, end, n = o->a->n_params;
    range(o, task, &begin, &end);
    float *p = o->a->block, *g = p + n, *m = g + n, *v = m + n;
    const float b1w = o->b1w, b2 = o->b2, b2w = o->b2w, eps = o->eps;
    for (size_t i = begin; i < end; i++) {
        float grad = g[i] * o->clip_scale;
        p[i] *= o->decay;
        /* torch.lerp(m, g, w) = w < 0.5 ? m + w (g - m) : g - (g - m)(1 - w) */
        m[i] = b1w < 0.5f ? m[i] + b1w * (grad - m[i]) : grad - (grad - m[i]) * (1.0f - b1w);
        v[i] = v[i] * b2 + b2w * grad * grad;
        float denom = sqrtf(v[i]) / o->bc2_sqrt + eps;
        p[i] += -o->step_size * (m[i] / denom);
        g[i] = 0.0f;
    }
}

void tk_adamw_step(tk_optim_result *out, tk_adapter *a, const tk_adam_params *p, tk_pool *pool)
{
    optim_args o;
    memset(&o, 0, sizeof o);
    o.a = a;
    o.p = p;
    tk_pool_run(pool, OPTIM_TASKS, norm_task, &o);
    double sq = 0;
    for (int t = 0; t < OPTIM_TASKS; t++) sq += o.partial[t];
    out->grad_norm = sqrt(sq);
    o.clip_scale = 1.0f;
    if (p->grad_clip_norm > 0) {
        float coef = (float)p->grad_clip_norm / ((float)out->grad_norm + 1e-6f);
        o.clip_scale = coef < 1.0f ? coef : 1.0f;
    }
    a->step++;
    double bc1 = 1.0 - pow(p->beta1, (double)a->step), bc2 = 1.0 - pow(p->beta2, (double)a->step);
    o.decay = (float)(1.0 - p->learning_rate * p->weight_decay);
    o.step_size = (float)(p->learning_rate / bc1);
    o.bc2_sqrt = (float)sqrt(bc2);
    o.b1w = (float)(1.0 - p->beta1);
    o.b2 = (float)p->beta2;
    o.b2w = (float)(1.0 - p->beta2);
    o.eps = (float)p->eps;
    tk_pool_run(pool, OPTIM_TASKS, update_task, &o);
    out->clip_scale = o.clip_scale;
    out->step = a->step;
}
