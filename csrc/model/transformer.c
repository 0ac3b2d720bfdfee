/* transformer.c - the decoder stack, forward and backward, as recipes.
 *
 * The forward function reads top to bottom like the math of Llama / Qwen2 /
 * Qwen3 (Hugging Face semantics, float32 throughout): embeddings, then per
 * layer x += o(attn(rope(norm(x)))) and x += down(silu(gate(h)) * up(h)) with
 * h = norm(x), and the final norm. Every projection may carry a LoRA term
 * scale * B (A x). Architecture deltas are config flags: q/k/v biases
 * (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3).
 *
 * Training keeps a few activations per layer (tk_layer_acts, about 24 KB per
 * token and layer for SmolLM2) and recomputes the rest in the backward pass:
 * the normed inputs, the roped q/k, SwiGLU's product and, block by block, the
 * attention probabilities (FlashAttention-2 style, from the stored
 * log-sum-exp). The backward pass yields gradients for the LoRA tensors only;
 * the base weights are frozen and get none.
 */
#include "transformer.h"

#include <math.h>
#include <string.h>

typedef struct {
    int T, D, H, Hkv, Dh, F, QKV, R, n_layers;
} dims;

static dims dims_of(const tk_model *m, const tk_adapter *ad, int T)
{
    const tk_model_config *c = &m->cfg;
    dims d = {T, c->d_model, c->n_heads, c->n_kv_heads, c->head_dim, c->d_ff, tk_model_qkv_rows(c),
              ad ? ad->cfg.rank : 0, c->n_layers};
    return d;
}

/* Bump allocation over one block; with base == NULL it only counts. */
typedef struct {
    float *base;
    size_t at;
} arena;

static float *take(arena *a, size_t n)
{
    float *p = a->base ? a->base + a->at : NULL;
    a->at += (n + 15) & ~(size_t)15; /* 64-byte aligned pieces */
    return p;
}

/* ---- workspaces ---------------------------------------------------------------- */

typedef struct {
    float *x;        /* [T, D] residual stream */
    float *h;        /* [T, D] normed input of a block */
    float *qkv;      /* [T, QKV] (inference; training writes into the store) */
    float *qkr;      /* [T, QKV] q and k after q/k norm and RoPE, v copied */
    float *att;      /* [T, H Dh] (inference) */
    float *gate_up;  /* [T, 2F] (inference) */
    float *act;      /* [T, F] */
    float *cos, *sin;/* [T, Dh/2] */
    float *u;        /* [T, 7R] (inference) */
    float *attn_work;
    /* backward only */
    float *dx, *dh, *dqkv, *datt, *dgate_up, *dact, *t, *head_out, *head_inv, *attn_bwd_work;
} scratch;

static int max_seq_len(const tk_batch *b)
{
    int max = 0;
    for (int s = 0; s < b->n_seqs; s++)
        if (b->seq_start[s + 1] - b->seq_start[s] > max) max = b->seq_start[s + 1] - b->seq_start[s];
    return max;
}

static size_t carve_scratch(scratch *s, float *work, const tk_model *m, const tk_adapter *ad, tk_backend *be,
                            const tk_batch *b, int backward)
{
    dims d = dims_of(m, ad, b->n_tokens);
    size_t T = (size_t)d.T;
    arena a = {work, 0};
    scratch dummy;
    if (!s) s = &dummy;
    s->x = take(&a, T * d.D);
    s->h = take(&a, T * d.D);
    s->qkv = take(&a, T * d.QKV);
    s->qkr = take(&a, T * d.QKV);
    s->att = take(&a, T * d.H * d.Dh);
    s->gate_up = take(&a, T * 2 * d.F);
    s->act = take(&a, T * d.F);
    s->cos = take(&a, T * (d.Dh / 2));
    s->sin = take(&a, T * (d.Dh / 2));
    s->u = take(&a, T * TK_LORA_PER_LAYER * d.R);
    s->attn_work = take(&a, be->attention_workspace(be, d.T, max_seq_len(b), d.H, d.Dh));
    if (backward) {
        s->dx = take(&a, T * d.D);
        s->dh = take(&a, T * d.D);
        s->dqkv = take(&a, T * d.QKV);
        s->datt = take(&a, T * d.H * d.Dh);
        s->dgate_up = take(&a, T * 2 * d.F);
        s->dact = take(&a, T * d.F);
        s->t = take(&a, T * (d.R ? 3 * d.R : 1)); /* a group of up to 3 targets */
        s->head_out = take(&a, T * d.Dh);
        s->head_inv = take(&a, T);
        s->attn_bwd_work = take(&a, be->attention_backward_workspace(be, d.T, max_seq_len(b), d.H, d.Dh));
    }
    return a.at;
}

size_t tk_transformer_workspace(const tk_model *m, const tk_adapter *ad, tk_backend *be, const tk_batch *b,
                                int backward)
{
    return carve_scratch(NULL, NULL, m, ad, be, b, backward);
}

static size_t carve_store(tk_activations *st, tk_layer_acts *layers, float *mem, const tk_model *m,
                          const tk_adapter *ad, int n_tokens)
{
    dims d = dims_of(m, ad, n_tokens);
    size_t T = (size_t)n_tokens;
    arena a = {mem, 0};
    for (int l = 0; l < d.n_layers; l++) {
        tk_layer_acts dummy, *L = layers ? &layers[l] : &dummy;
        L->x = take(&a, T * d.D);
        L->inv_rms1 = take(&a, T);
        L->qkv = take(&a, T * d.QKV);
        L->att = take(&a, T * d.H * d.Dh);
        L->lse = take(&a, T * d.H);
        L->x2 = take(&a, T * d.D);
        L->inv_rms2 = take(&a, T);
        L->gate_up = take(&a, T * 2 * d.F);
        L->u = take(&a, T * TK_LORA_PER_LAYER * d.R);
    }
    tk_activations dummy_store;
    if (!st) st = &dummy_store;
    st->layers = layers;
    st->x_final = take(&a, T * d.D);
    st->inv_rms_final = take(&a, T);
    return a.at;
}

size_t tk_activation_floats(const tk_model *m, const tk_adapter *ad, int n_tokens)
{
    return carve_store(NULL, NULL, NULL, m, ad, n_tokens);
}

void tk_activations_carve(tk_activations *store, tk_layer_acts *layers, float *mem, const tk_model *m,
                          const tk_adapter *ad, int n_tokens)
{
    carve_store(store, layers, mem, m, ad, n_tokens);
}

/* ---- pieces shared by both passes ------------------------------------------------ */

/* cos/sin of position * inv_freq for every row; positions restart at 0 in each
 * sequence. The angle is rounded to float32 first, as HF computes it. */
static void rope_row(float *cos_t, float *sin_t, const tk_model *m, int pos)
{
    int half = m->cfg.head_dim / 2;
    for (int i = 0; i < half; i++) {
        float angle = (float)pos * m->w.rope_inv_freq[i];
        cos_t[i] = cosf(angle);
        sin_t[i] = sinf(angle);
    }
}

static void rope_tables(float *cos_t, float *sin_t, const tk_model *m, const tk_batch *b)
{
    size_t half = (size_t)(m->cfg.head_dim / 2);
    for (int s = 0; s < b->n_seqs; s++)
        for (int t = b->seq_start[s]; t < b->seq_start[s + 1]; t++)
            rope_row(cos_t + (size_t)t * half, sin_t + (size_t)t * half, m, t - b->seq_start[s]);
}

/* qkr = qkv with q and k normed per head (Qwen3) and rotated. */
static void prepare_qk(float *qkr, const float *qkv, const tk_layer_weights *L, const tk_model *m, tk_backend *be,
                       const scratch *s, int T)
{
    const tk_model_config *c = &m->cfg;
    int QKV = tk_model_qkv_rows(c), Dh = c->head_dim, H = c->n_heads, Hkv = c->n_kv_heads;
    float *q = qkr, *k = qkr + H * Dh;
    memcpy(qkr, qkv, (size_t)T * QKV * sizeof(float));
    if (c->qk_norm) {
        for (int h = 0; h < H; h++) be->rmsnorm(be, q + h * Dh, QKV, q + h * Dh, QKV, L->q_norm, T, Dh, c->rms_eps, NULL);
        for (int h = 0; h < Hkv; h++) be->rmsnorm(be, k + h * Dh, QKV, k + h * Dh, QKV, L->k_norm, T, Dh, c->rms_eps, NULL);
    }
    be->rope(be, q, QKV, T, H, Dh, s->cos, s->sin, 0);
    be->rope(be, k, QKV, T, Hkv, Dh, s->cos, s->sin, 0);
}

/* LoRA on a group of n targets that share the input x (q, k, v; gate, up; o;
 * down), whose A's are adjacent rows of one [nR, in] matrix (lora.c): one
 * GEMM makes u = scale x [A_0; ...; A_n-1]^T [T, nR] (kept for the backward
 * pass), then y_j += u_j B_j^T for each target j. */
typedef struct {
    int first, n;          /* targets first .. first + n - 1 */
    float *y[3];           /* the targets' outputs (forward) or dy (backward) */
    int ld;                /* their row stride */
} lora_group;

static void lora_forward(tk_backend *be, const tk_adapter *ad, int layer, const lora_group *g, const float *x,
                         int ldx, int T, float *u, int ldu)
{
    const tk_lora_pair *p0 = tk_lora_at(ad, layer, g->first);
    if (!p0->A) return;
    int R = ad->cfg.rank;
    be->matmul_nt(be, u, ldu, x, ldx, p0->A, T, g->n * R, p0->in, ad->scale, 0.0f);
    for (int j = 0; j < g->n; j++) {
        const tk_lora_pair *p = tk_lora_at(ad, layer, g->first + j);
        be->matmul_nt(be, g->y[j], g->ld, u + j * R, ldu, p->B, T, p->out, R, 1.0f, 1.0f);
    }
}

/* Given each target's dy: t_j = dy_j B_j into t [T, nR], dB_j += dy_j^T u_j,
 * then with the stacked A: dx += scale t A (when dx != NULL) and
 * dA += scale t^T x. The base part of dx is the caller's. */
static void lora_backward(tk_backend *be, const tk_adapter *ad, int layer, const lora_group *g, const float *x,
                          int ldx, const float *u, int ldu, float *dx, int lddx, float *t, int T)
{
    const tk_lora_pair *p0 = tk_lora_at(ad, layer, g->first);
    if (!p0->A) return;
    int R = ad->cfg.rank, nR = g->n * R;
    for (int j = 0; j < g->n; j++) {
        const tk_lora_pair *p = tk_lora_at(ad, layer, g->first + j);
        be->matmul_nn(be, t + j * R, nR, g->y[j], g->ld, p->B, R, T, R, p->out, 1.0f, 0.0f);
        be->matmul_tn_acc(be, tk_adapter_slot(ad, p->B, 1), R, g->y[j], g->ld, u + j * R, ldu, T, p->out, R, 1.0f);
    }
    if (dx) be->matmul_nn(be, dx, lddx, t, nR, p0->A, p0->in, T, p0->in, nR, ad->scale, 1.0f);
    be->matmul_tn_acc(be, tk_adapter_slot(ad, p0->A, 1), p0->in, t, nR, x, ldx, T, nR, p0->in, ad->scale);
}

/* ---- the forward pass --------------------------------------------------------------- */

/* k and v columns of qkr rows [0, T) into the cache rows of layer l */
static void write_kv(const tk_kv_out *kv, const float *qkr, int l, int T, int QKV, int kcol, int vcol, int KV)
{
    float *k = kv->k + (size_t)l * kv->layer_stride, *v = kv->v + (size_t)l * kv->layer_stride;
    for (int t = 0; t < T; t++) {
        memcpy(k + (size_t)t * KV, qkr + (size_t)t * QKV + kcol, (size_t)KV * sizeof(float));
        memcpy(v + (size_t)t * KV, qkr + (size_t)t * QKV + vcol, (size_t)KV * sizeof(float));
    }
}

void tk_transformer_forward(float *h_out, const tk_model *m, const tk_adapter *ad, tk_backend *be, const tk_batch *b,
                            tk_activations *store, const tk_kv_out *kv, float *work)
{
    const tk_model_config *c = &m->cfg;
    const dims d = dims_of(m, ad, b->n_tokens);
    const int T = d.T, D = d.D, H = d.H, Dh = d.Dh, F = d.F, QKV = d.QKV, R = d.R, U = TK_LORA_PER_LAYER * d.R;
    const int kcol = H * Dh, vcol = (H + d.Hkv) * Dh; /* column offsets of k and v in a qkv row */
    scratch s;
    carve_scratch(&s, work, m, ad, be, b, 0);

    be->embed(be, s.x, m->w.embed, b->tokens, T, D);
    rope_tables(s.cos, s.sin, m, b);

    for (int l = 0; l < d.n_layers; l++) {
        const tk_layer_weights *L = &m->w.layers[l];
        tk_layer_acts *st = store ? &store->layers[l] : NULL;
        float *qkv = st ? st->qkv : s.qkv, *att = st ? st->att : s.att, *gate_up = st ? st->gate_up : s.gate_up;
        float *u = st ? st->u : s.u;

        /* attention block: x += o(attention(rope(q), rope(k), v)) */
        if (st) memcpy(st->x, s.x, (size_t)T * D * sizeof(float));
        be->rmsnorm(be, s.h, D, s.x, D, L->attn_norm, T, D, c->rms_eps, st ? st->inv_rms1 : NULL);
        be->matmul_nt(be, qkv, QKV, s.h, D, L->wqkv, T, QKV, D, 1.0f, 0.0f);
        if (L->bqkv) be->add_bias(be, qkv, QKV, L->bqkv, T, QKV);
        if (ad) {
            lora_group qkv_g = {TK_LORA_Q, 3, {qkv, qkv + kcol, qkv + vcol}, QKV};
            lora_forward(be, ad, l, &qkv_g, s.h, D, T, u + TK_LORA_Q * R, U);
        }
        prepare_qk(s.qkr, qkv, L, m, be, &s, T);
        if (kv) write_kv(kv, s.qkr, l, T, QKV, kcol, vcol, d.Hkv * Dh);
        be->attention(be, att, H * Dh, s.qkr, s.qkr + kcol, s.qkr + vcol, QKV, b->seq_start, b->n_seqs, H, d.Hkv,
                      Dh, st ? st->lse : NULL, s.attn_work);
        be->matmul_nt(be, s.x, D, att, H * Dh, L->wo, T, D, H * Dh, 1.0f, 1.0f);
        if (ad) {
            lora_group o_g = {TK_LORA_O, 1, {s.x}, D};
            lora_forward(be, ad, l, &o_g, att, H * Dh, T, u + TK_LORA_O * R, U);
        }

        /* MLP block: x += down(silu(gate(h)) * up(h)), h = norm(x) */
        if (st) memcpy(st->x2, s.x, (size_t)T * D * sizeof(float));
        be->rmsnorm(be, s.h, D, s.x, D, L->mlp_norm, T, D, c->rms_eps, st ? st->inv_rms2 : NULL);
        be->matmul_nt(be, gate_up, 2 * F, s.h, D, L->w_gate_up, T, 2 * F, D, 1.0f, 0.0f);
        if (ad) {
            lora_group gate_up_g = {TK_LORA_GATE, 2, {gate_up, gate_up + F}, 2 * F};
            lora_forward(be, ad, l, &gate_up_g, s.h, D, T, u + TK_LORA_GATE * R, U);
        }
        be->swiglu(be, s.act, gate_up, T, F);
        be->matmul_nt(be, s.x, D, s.act, F, L->w_down, T, D, F, 1.0f, 1.0f);
        if (ad) {
            lora_group down_g = {TK_LORA_DOWN, 1, {s.x}, D};
            lora_forward(be, ad, l, &down_g, s.act, F, T, u + TK_LORA_DOWN * R, U);
        }
    }

    if (store) memcpy(store->x_final, s.x, (size_t)T * D * sizeof(float));
    be->rmsnorm(be, h_out, D, s.x, D, m->w.final_norm, T, D, c->rms_eps, store ? store->inv_rms_final : NULL);
}

/* ---- the backward pass --------------------------------------------------------------- */

/* dq, dk (in dqkv, before RoPE) back through RoPE and, for Qwen3, the q/k norms. */
static void qk_backward(float *dqkv, const float *qkv, const tk_layer_weights *L, const tk_model *m, tk_backend *be,
                        const scratch *s, int T)
{
    const tk_model_config *c = &m->cfg;
    int QKV = tk_model_qkv_rows(c), Dh = c->head_dim, H = c->n_heads, Hkv = c->n_kv_heads;
    be->rope(be, dqkv, QKV, T, H, Dh, s->cos, s->sin, 1);
    be->rope(be, dqkv + H * Dh, QKV, T, Hkv, Dh, s->cos, s->sin, 1);
    if (!c->qk_norm) return;
    for (int h = 0; h < H + Hkv; h++) { /* q heads, then k heads: contiguous columns */
        const float *w = h < H ? L->q_norm : L->k_norm;
        be->rmsnorm(be, s->head_out, Dh, qkv + h * Dh, QKV, w, T, Dh, c->rms_eps, s->head_inv);
        be->rmsnorm_backward(be, dqkv + h * Dh, QKV, dqkv + h * Dh, QKV, qkv + h * Dh, QKV, w, s->head_inv, T, Dh, 0);
    }
}

void tk_transformer_backward(const tk_adapter *ad, tk_backend *be, const tk_batch *b, const tk_activations *store,
                             float *dh_final, float *work)
{
    const tk_model *m = ad->model;
    const tk_model_config *c = &m->cfg;
    const dims d = dims_of(m, ad, b->n_tokens);
    const int T = d.T, D = d.D, H = d.H, Dh = d.Dh, F = d.F, QKV = d.QKV, R = d.R, U = TK_LORA_PER_LAYER * d.R;
    const int kcol = H * Dh, vcol = (H + d.Hkv) * Dh;
    scratch s;
    carve_scratch(&s, work, m, ad, be, b, 1);
    rope_tables(s.cos, s.sin, m, b);

    /* through the final norm: dx is the gradient of the residual stream from here down */
    be->rmsnorm_backward(be, s.dx, D, dh_final, D, store->x_final, D, m->w.final_norm, store->inv_rms_final, T, D, 0);

    for (int l = d.n_layers - 1; l >= 0; l--) {
        const tk_layer_weights *L = &m->w.layers[l];
        const tk_layer_acts *st = &store->layers[l];

        /* MLP block, x3 = x2 + down(act), act = silu(g) * u, [g | u] = gate_up(h), h = norm(x2) */
        be->rmsnorm(be, s.h, D, st->x2, D, L->mlp_norm, T, D, c->rms_eps, NULL);
        be->swiglu(be, s.act, st->gate_up, T, F);
        be->matmul_nn(be, s.dact, F, s.dx, D, L->w_down, F, T, F, D, 1.0f, 0.0f);
        lora_group down_g = {TK_LORA_DOWN, 1, {s.dx}, D};
        lora_backward(be, ad, l, &down_g, s.act, F, st->u + TK_LORA_DOWN * R, U, s.dact, F, s.t, T);
        be->swiglu_backward(be, s.dgate_up, s.dact, st->gate_up, T, F);
        be->matmul_nn(be, s.dh, D, s.dgate_up, 2 * F, L->w_gate_up, D, T, D, 2 * F, 1.0f, 0.0f);
        lora_group gate_up_g = {TK_LORA_GATE, 2, {s.dgate_up, s.dgate_up + F}, 2 * F};
        lora_backward(be, ad, l, &gate_up_g, s.h, D, st->u + TK_LORA_GATE * R, U, s.dh, D, s.t, T);
        be->rmsnorm_backward(be, s.dx, D, s.dh, D, st->x2, D, L->mlp_norm, st->inv_rms2, T, D, 1);

        /* attention block, x2 = x + o(att), att = attention(qkr), qkr = rope(norm(qkv(h))), h = norm(x) */
        /* below layer 0 nothing trains: its attention block only matters for its own LoRA */
        if (l == 0 && !ad->cfg.train_attn) break;
        be->matmul_nn(be, s.datt, H * Dh, s.dx, D, L->wo, H * Dh, T, H * Dh, D, 1.0f, 0.0f);
        lora_group o_g = {TK_LORA_O, 1, {s.dx}, D};
        lora_backward(be, ad, l, &o_g, st->att, H * Dh, st->u + TK_LORA_O * R, U, s.datt, H * Dh, s.t, T);
        prepare_qk(s.qkr, st->qkv, L, m, be, &s, T);
        be->attention_backward(be, s.dqkv, s.dqkv + kcol, s.dqkv + vcol, s.datt, st->att, H * Dh, s.qkr,
                               s.qkr + kcol, s.qkr + vcol, QKV, st->lse, b->seq_start, b->n_seqs, H, d.Hkv, Dh,
                               s.attn_bwd_work);
        qk_backward(s.dqkv, st->qkv, L, m, be, &s, T);
        be->rmsnorm(be, s.h, D, st->x, D, L->attn_norm, T, D, c->rms_eps, NULL);
        float *dh = l > 0 ? s.dh : NULL; /* layer 0: no gradient below the embeddings is needed */
        if (dh) be->matmul_nn(be, dh, D, s.dqkv, QKV, L->wqkv, D, T, D, QKV, 1.0f, 0.0f);
        lora_group qkv_g = {TK_LORA_Q, 3, {s.dqkv, s.dqkv + kcol, s.dqkv + vcol}, QKV};
        lora_backward(be, ad, l, &qkv_g, s.h, D, st->u + TK_LORA_Q * R, U, dh, D, s.t, T);
        if (dh) be->rmsnorm_backward(be, s.dx, D, dh, D, st->x, D, L->attn_norm, st->inv_rms1, T, D, 1);
    }
}

/* ---- one decoding step ------------------------------------------------------------------- */

/* The forward recipe for one new token per sequence, attending to KV caches
 * instead of to the batch (see tk_decode_batch). */
size_t tk_decode_workspace(const tk_model *m, const tk_adapter *ad, tk_backend *be, int n, int max_keys)
{
    int32_t starts[2] = {0, 1};
    tk_batch one = {1, n, NULL, starts}; /* shapes only: n rows, attention unused */
    size_t views = ((size_t)n * sizeof(tk_kv_view) + sizeof(float) - 1) / sizeof(float);
    return carve_scratch(NULL, NULL, m, ad, be, &one, 0) + be->attention_decode_workspace(be, max_keys) + views + 32;
}

/* y[n, N] = x[n, K] . W^T + beta * y for a decoding step: through W's quantized copy when the model has
 * one and the backend's quantized kernel beats its float32 matmul at n rows (it streams 4-8 bits per
 * weight instead of 32), else through the float32 W. */
static void decode_matmul(tk_backend *be, float *y, int ldy, const float *x, int ldx, const float *w,
                          const tk_qmatrix *wq, int n, int N, int K, float beta)
{
    if (wq->tiles && be->matmul_nt_q && n <= be->matmul_nt_q_max_rows)
        be->matmul_nt_q(be, y, ldy, x, ldx, wq, n, 1.0f, beta);
    else
        be->matmul_nt(be, y, ldy, x, ldx, w, n, N, K, 1.0f, beta);
}

void tk_transformer_decode(float *h_out, const tk_model *m, const tk_adapter *ad, tk_backend *be,
                           const tk_decode_batch *b, float *work)
{
    const tk_model_config *c = &m->cfg;
    const dims d = dims_of(m, ad, b->n);
    const int n = b->n, D = d.D, H = d.H, Dh = d.Dh, F = d.F, QKV = d.QKV, R = d.R, U = TK_LORA_PER_LAYER * d.R;
    const int kcol = H * Dh, vcol = (H + d.Hkv) * Dh, KV = d.Hkv * Dh;
    int32_t starts[2] = {0, 1};
    tk_batch one = {1, n, NULL, starts};
    scratch s;
    size_t used = carve_scratch(&s, work, m, ad, be, &one, 0);
    float *attn_work = work + used;
    int max_keys = 1;
    for (int i = 0; i < n; i++)
        if (b->prompt_len[i] + b->own_len[i] + 1 > max_keys) max_keys = b->prompt_len[i] + b->own_len[i] + 1;
    tk_kv_view *views = (tk_kv_view *)(attn_work + ((be->attention_decode_workspace(be, max_keys) + 15) & ~(size_t)15));

    be->embed(be, s.x, m->w.embed, b->tokens, n, D);
    for (int i = 0; i < n; i++) rope_row(s.cos + (size_t)i * (Dh / 2), s.sin + (size_t)i * (Dh / 2), m, b->pos[i]);

    for (int l = 0; l < d.n_layers; l++) {
        const tk_layer_weights *L = &m->w.layers[l];

        /* attention block over the caches */
        be->rmsnorm(be, s.h, D, s.x, D, L->attn_norm, n, D, c->rms_eps, NULL);
        decode_matmul(be, s.qkv, QKV, s.h, D, L->wqkv, &L->wqkv_q, n, QKV, D, 0.0f);
        if (L->bqkv) be->add_bias(be, s.qkv, QKV, L->bqkv, n, QKV);
        if (ad) {
            lora_group qkv_g = {TK_LORA_Q, 3, {s.qkv, s.qkv + kcol, s.qkv + vcol}, QKV};
            lora_forward(be, ad, l, &qkv_g, s.h, D, n, s.u + TK_LORA_Q * R, U);
        }
        prepare_qk(s.qkr, s.qkv, L, m, be, &s, n);
        for (int i = 0; i < n; i++) {
            float *k = b->own_k[i] + (size_t)l * b->own_stride, *v = b->own_v[i] + (size_t)l * b->own_stride;
            memcpy(k + (size_t)b->own_len[i] * KV, s.qkr + (size_t)i * QKV + kcol, (size_t)KV * sizeof(float));
            memcpy(v + (size_t)b->own_len[i] * KV, s.qkr + (size_t)i * QKV + vcol, (size_t)KV * sizeof(float));
            views[i] = (tk_kv_view){
                b->prompt_len[i] ? b->prompt_k[i] + (size_t)l * b->prompt_stride : NULL,
                b->prompt_len[i] ? b->prompt_v[i] + (size_t)l * b->prompt_stride : NULL,
                b->prompt_len[i], k, v, b->own_len[i] + 1};
        }
        be->attention_decode(be, s.att, H * Dh, s.qkr, QKV, views, n, H, d.Hkv, Dh, KV, attn_work);
        decode_matmul(be, s.x, D, s.att, H * Dh, L->wo, &L->wo_q, n, D, H * Dh, 1.0f);
        if (ad) {
            lora_group o_g = {TK_LORA_O, 1, {s.x}, D};
            lora_forward(be, ad, l, &o_g, s.att, H * Dh, n, s.u + TK_LORA_O * R, U);
        }

        /* MLP block */
        be->rmsnorm(be, s.h, D, s.x, D, L->mlp_norm, n, D, c->rms_eps, NULL);
        decode_matmul(be, s.gate_up, 2 * F, s.h, D, L->w_gate_up, &L->w_gate_up_q, n, 2 * F, D, 0.0f);
        if (ad) {
            lora_group gate_up_g = {TK_LORA_GATE, 2, {s.gate_up, s.gate_up + F}, 2 * F};
            lora_forward(be, ad, l, &gate_up_g, s.h, D, n, s.u + TK_LORA_GATE * R, U);
        }
        be->swiglu(be, s.act, s.gate_up, n, F);
        decode_matmul(be, s.x, D, s.act, F, L->w_down, &L->w_down_q, n, D, F, 1.0f);
        if (ad) {
            lora_group down_g = {TK_LORA_DOWN, 1, {s.x}, D};
            lora_forward(be, ad, l, &down_g, s.act, F, n, s.u + TK_LORA_DOWN * R, U);
        }
    }
    be->rmsnorm(be, h_out, D, s.x, D, m->w.final_norm, n, D, c->rms_eps, NULL);
}
