/* optim.c - AdamW (see optim.h).
 *
 * The step's factors are derived here in double, as torch derives them: the
 * bias corrections bc1 = 1 - b1^t and bc2 = 1 - b2^t, step size lr / bc1,
 * decay 1 - lr wd; global-norm clipping as torch.nn.utils.clip_grad_norm_:
 * g *= min(1, max_norm / (norm + 1e-6)). The element-wise update, which
 * follows torch's single-tensor AdamW one float operation for another, is the
 * backend's adamw op.
 */
#include "optim.h"

#include <math.h>
#include <stdio.h>

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

/* A LoRA value past this cannot be carried by the float32 forward and backward passes: the adapter adds
 * x A B over D * R products to the residual stream, and the MLP multiplies three such values (gate, up,
 * down), so factors of 1e5 already overflow float32's 3.4e38 in SmolLM2's backward pass. Trained adapters
 * hold values of order 1 and never come near it; a step past the limit comes from an absurd learning rate or
 * gradient and is refused before it destroys the adapter. */
#define ADAPTER_VALUE_LIMIT 1e4f

static tk_adamw_factors adamw_factors(const tk_adam_params *p, int64_t step, double grad_norm)
{
    tk_adamw_factors f = {.clip_scale = 1.0f};
    if (p->grad_clip_norm > 0) {
        float coef = (float)p->grad_clip_norm / ((float)grad_norm + 1e-6f);
        f.clip_scale = coef < 1.0f ? coef : 1.0f;
    }
    double bc1 = 1.0 - pow(p->beta1, (double)step), bc2 = 1.0 - pow(p->beta2, (double)step);
    f.decay = (float)(1.0 - p->learning_rate * p->weight_decay);
    f.step_size = (float)(p->learning_rate / bc1);
    f.bc2_sqrt = (float)sqrt(bc2);
    f.b1w = (float)(1.0 - p->beta1);
    f.b2 = (float)p->beta2;
    f.b2w = (float)(1.0 - p->beta2);
    f.eps = (float)p->eps;
    return f;
}

tk_status tk_adamw_step(tk_optim_result *out, tk_adapter *a, const tk_adam_params *p, tk_backend *be)
{
    size_t n = a->n_params;
    float *params = a->block, *grads = params + n, *m = grads + n, *v = m + n;
    out->grad_norm = sqrt(be->sum_squares(be, grads, n));
    if (!isfinite(out->grad_norm))
        return tk_error(TK_ERR_INVALID, "optim_step: the accumulated gradients are not finite; the adapter and its "
                                        "optimizer state are unchanged");
    tk_adamw_factors f = adamw_factors(p, a->step + 1, out->grad_norm);
    float peak = be->adamw_peak(be, params, grads, m, v, n, &f);
    if (!(peak <= ADAPTER_VALUE_LIMIT)) {
        char values[48] = "non-finite";
        if (isfinite(peak)) snprintf(values, sizeof values, "as large as %g", (double)peak);
        return tk_error(TK_ERR_INVALID,
                        "optim_step: this step would make adapter values %s (learning_rate=%g, gradient norm %g): "
                        "past %g the model's float32 passes overflow. The adapter, its optimizer state and "
                        "the accumulated gradients are unchanged; use a smaller learning_rate (or grad_clip_norm)",
                        values, p->learning_rate, out->grad_norm, (double)ADAPTER_VALUE_LIMIT);
    }
    be->adamw(be, params, grads, m, v, n, &f); /* (and zeroes the gradients) */
    a->grads_zero = 1;
    a->step++;
    a->version++; /* new weights: keys and values cached under the old ones no longer apply */
    out->clip_scale = f.clip_scale;
    out->step = a->step;
    return TK_OK;
}
