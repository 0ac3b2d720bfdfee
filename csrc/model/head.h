/* head.h - the output projection over final-norm outputs: logits, the
 * targets' log-probabilities with the loss (loss.h), and its backward. */
#ifndef TK_HEAD_H
#define TK_HEAD_H

#include "../backend/backend.h"
#include "../core/arena.h"
#include "lora.h"
#include "loss.h"

/* Floats of device and host scratch the head needs (the logits functions use only the device's). */
tk_workspace tk_head_workspace(const tk_model *m, const tk_adapter *ad);
/* logprobs[E] of the targets of h[T, D] (final-norm output) and the summed
 * loss into *loss. With dh != NULL also the backward pass of the head:
 * dh[T, D] = dL/dh and the unembed LoRA gradients accumulate. Logits are
 * built 256 tokens at a time, never for the whole batch. */
void tk_head_loss(float *logprobs, double *loss, const tk_model *m, const tk_adapter *ad, tk_backend *be,
                  const float *h, int T, const tk_loss_config *cfg, const tk_loss_inputs *in, float *dh, float *work,
                  float *host);

/* logits[T, V] of h[T, D] (with the unembed LoRA term when ad has one). */
void tk_head_logits(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h, int T,
                    float *work);
/* The same for the rows of a decoding step (the backend's matmul_w_decode). */
void tk_head_logits_decode(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h,
                           int T, float *work);
/* The same where row r belongs to adapter ads[r] (NULL: the base model), as in a decoding step of sequences of
 * several adapters; `widest` is the adapter whose unembed LoRA has the largest rank (NULL: none has one), which
 * sized `work` (tk_head_workspace). */
void tk_head_logits_decode_rows(float *logits, const tk_model *m, const tk_adapter *const *ads,
                                const tk_adapter *widest, tk_backend *be, const float *h, int T, float *work);

#endif
