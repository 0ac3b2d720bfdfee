/* moe.h - the mixture-of-experts MLP block of an MoE layer (Qwen3-MoE) and its backward pass (moe.c).
 *
 * The transformer recipe (transformer.c) calls it in place of the dense SwiGLU block in the layers the config
 * makes sparse; prefill, training and decoding steps all go through it. Letters: T tokens of the pass, D model
 * width, E experts, k experts per token, n = T k (token, expert) assignments, Fe one expert's width, R the
 * batch's largest LoRA rank.
 */
#ifndef TK_MOE_H
#define TK_MOE_H

#include "../backend/backend.h"
#include "../core/arena.h"
#include "transformer.h"

/* Which experts each token goes to, with what weight (host memory). Assignment j of the n is row j of the
 * expert-sorted buffers: the rows of expert e are expert_start[e] .. expert_start[e + 1], in token order. */
typedef struct {
    int32_t *expert_start; /* [E + 1] */
    int32_t *cursor;       /* [E] (filling) */
    int32_t *token;        /* [n] the token of row j */
    float *weight;         /* [n] its gate weight w_j */
    int32_t *choice;       /* [T, k] the expert of each token's slot s (most likely first) */
    int32_t *row;          /* [T, k] the row of each token's slot */
    float *prob;           /* [T, E] softmax of the router logits, float32 */
} tk_moe_routing;

/* The block's scratch, carved once per pass (transformer.c's workspace) and reused by every MoE layer. */
typedef struct {
    tk_moe_routing r;
    const float **src;     /* [n] row pointers for copy_rows / add_rows (host) */
    float **dst;           /* [n] */
    float *logits_host;    /* [T, E] a host copy of the router logits (devices whose memory is not the host's) */
    float *c_host;         /* [n] (backward) */
    float *dz_host;        /* [T, E] (backward) */
    /* device memory */
    float *logits;         /* [T, E] router logits (inference; training keeps them in the activation store) */
    float *gate_up;        /* [n, 2Fe] (inference; likewise) */
    float *rows;           /* [n, D] the sorted inputs, then the experts' outputs; backward: dy rows, then dx rows */
    float *act;            /* [n, Fe] silu(gate) * up */
    float *u_rows;         /* [n, 2R] each row's token's shared-A LoRA projection of gate | up */
    float *v;              /* [n, R] LoRA of down: scale act A_e^T; backward: each row's token's dy B */
    /* backward only */
    float *dact;           /* [n, Fe] */
    float *dgate_up;       /* [n, 2Fe] */
    float *c;              /* [n] <dy, expert output> per row: the gradient of its gate weight */
    float *dz;             /* [T, E] gradient of the router logits */
    float *q;              /* [T, R] dy B of down's shared B */
    float *du_rows;        /* [n, 2R] */
    float *du;             /* [T, 2R] */
} tk_moe_scratch;

/* One pass's context: the model, the device, the batch (its adapters by segment) and the scratch. */
typedef struct {
    const tk_model *m;
    tk_backend *be;
    const tk_batch *b;
    int decode;            /* a decoding step: few rows, the weights are streamed by matmul_w_decode */
    tk_moe_scratch *s;
} tk_moe_pass;

/* Carves the scratch of a pass of T tokens (max LoRA rank R) from the arenas (the routing's on the host); a
 * model without MoE layers takes nothing. */
void tk_moe_carve(tk_moe_scratch *s, tk_arenas *a, const tk_model_config *c, int T, int R, int backward);

/* x[T, D] += the block's output for the normed rows h[T, D] of layer `layer`. Keeps the router logits [T, E],
 * the sorted gate_up [n, 2Fe] and the LoRA projections (u [T, ldu], columns by target) for the backward. */
void tk_moe_forward(const tk_moe_pass *p, int layer, float *x, const float *h, float *logits, float *gate_up,
                    float *u, int ldu);

/* dh[T, D] = the gradient of the block's input h given dy[T, D], the gradient of its output, from what the
 * forward kept; accumulates the gradients of the experts' LoRA tensors. */
void tk_moe_backward(const tk_moe_pass *p, int layer, float *dh, const float *dy, const float *h,
                     const float *logits, const float *gate_up, const float *u, int ldu);

#endif
