/* optim.h - AdamW over an adapter's LoRA tensors, exactly as torch.optim.AdamW. */
#ifndef TK_OPTIM_H
#define TK_OPTIM_H

#include "../backend/backend.h"
#include "lora.h"

/* doubles, as Python hands them over: torch derives its float32 factors
 * (1 - beta1, 1 - lr wd, ...) in double too */
typedef struct {
    double learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm;
} tk_adam_params;

typedef struct {
    double grad_norm;    /* global L2 norm of the gradients, before clipping */
    float clip_scale;    /* factor the gradients were multiplied by (1 when not clipped) */
    int64_t step;        /* the step just taken (1 for the first) */
} tk_optim_result;

tk_status tk_adam_params_check(const tk_adam_params *p);
/* One AdamW step with the accumulated gradients, then clears them. A step whose gradients are not finite, or
 * that would move adapter values out of what the float32 forward can carry, is refused: nothing changes. */
tk_status tk_adamw_step(tk_optim_result *out, tk_adapter *a, const tk_adam_params *p, tk_backend *be);

#endif
