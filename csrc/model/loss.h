/* loss.h - the output projection, log-probabilities and Tinker's five losses.
 *
 * Position t of a sequence predicts its targets (one, or K per position):
 * lp = logits[target] - logsumexp(logits). Losses are sums over targets and
 * datums, never means (tinker-api.md §6.6), with dL/dlp:
 *   cross_entropy        -w lp                               -w
 *   importance_sampling  -r A,  r = exp(lp - s)              -r A
 *   ppo                  -min(r A, clamp(r, lo, hi) A)        torch's min/clamp subgradients
 *   cispo                -sg(clamp(r, lo, hi)) lp A          -clamp(r, lo, hi) A
 *   dro                  -(lp A - beta/2 (lp - s)^2)         -(A - beta (lp - s))
 */
#ifndef TK_LOSS_H
#define TK_LOSS_H

#include "../backend/backend.h"
#include "lora.h"

enum tk_loss_kind { TK_LOSS_CROSS_ENTROPY, TK_LOSS_IMPORTANCE_SAMPLING, TK_LOSS_PPO, TK_LOSS_CISPO, TK_LOSS_DRO,
                    TK_LOSS_COUNT };

typedef struct {
    int kind;
    float clip_low, clip_high; /* ppo, cispo */
    float beta;                /* dro */
} tk_loss_config;

/* Per token t, targets [tgt_start[t], tgt_start[t+1]); the float arrays are
 * per target. Arrays a loss does not use may be NULL. */
typedef struct {
    const int32_t *tgt_start;  /* [T + 1] */
    const int32_t *targets;    /* [E] */
    const float *weights;      /* [E] cross_entropy */
    const float *advantages;   /* [E] the RL losses */
    const float *sampler_lp;   /* [E] the RL losses */
    const float *clip_low;     /* [E] per-target overrides of the config, or NULL */
    const float *clip_high;
} tk_loss_inputs;

size_t tk_head_workspace(const tk_model *m, const tk_adapter *ad);
/* logprobs[E] of the targets of h[T, D] (final-norm output) and the summed
 * loss into *loss. With dh != NULL also the backward pass of the head:
 * dh[T, D] = dL/dh and the unembed LoRA gradients accumulate. Logits are
 * built 256 tokens at a time, never for the whole batch. */
void tk_head_loss(float *logprobs, double *loss, const tk_model *m, const tk_adapter *ad, tk_backend *be,
                  const float *h, int T, const tk_loss_config *cfg, const tk_loss_inputs *in, float *dh, float *work);

/* logits[T, V] of h[T, D] (with the unembed LoRA term when ad has one). */
void tk_head_logits(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h, int T,
                    float *work);
/* The same for the few rows of a decoding step: through the quantized lm_head when the model has one and T
 * is at most the backend's matmul_nt_q_max_rows (equal to tk_head_logits up to float32 rounding). */
void tk_head_logits_decode(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h,
                           int T, float *work);

#endif
