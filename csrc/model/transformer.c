/* transformer.c - the decoder stack: one layer recipe, and its backward.
 *
 * tk_transformer_forward reads top to bottom like the math of Llama / Qwen2 /
 * Qwen3 (Hugging Face semantics, float32 activations): embeddings, then per
 * layer x += o(attn(rope(norm(x)))) and x += down(silu(gate(h)) * up(h)) with
 * h = norm(x), and the final norm. Every projection may carry a LoRA term
 * scale * B (A x), applied per adapter segment of the batch (lora.c), so
 * sequences of different adapters share one pass over the base weights.
 * Architecture deltas are config flags: q/k/v biases (Qwen2), per-head q/k
 * RMSNorm before RoPE (Qwen3), the layers whose MLP is a routed mixture
 * of experts (Qwen3-MoE: moe.c's block in place of the SwiGLU), and
 * Qwen3-VL's three-component M-RoPE positions; a batch's image features
 * replace its image tokens' embeddings and add deepstack features after
 * the first layers (mm.h).
 *
 * The same function is prefill, the training forward and a decoding step;
 * only the batch differs (transformer.h): positions come from the batch, new
 * keys and values go to the sequences' caches when they have them, and a
 * decoding step (one new token per sequence over a cache) attends to the
 * caches and reads the weights through the backend's streaming kernels. A
 * resumed prefill (prompts whose first rows came from the prefix cache) is a
 * prefill whose attention also reads those cached rows (attention_cached);
 * every prefill kernel gives a row the same bits whatever rows share its pass,
 * so it equals a prefill of the whole prompt.
 *
 * Training keeps a few activations per layer (tk_layer_acts) and the backward
 * pass recomputes the rest: the normed inputs, the roped q/k, SwiGLU's product
 * and, block by block, the attention probabilities (FlashAttention-2 style,
 * from the stored log-sum-exp). Gradients go to the LoRA tensors only; the
 * base weights are frozen.
 */
#include "transformer.h"

#include <math.h>

#include "../core/arena.h"
#include "mm.h"
#include "moe.h"

_Static_assert((int)TK_POS_DIMS == (int)TK_MM_POS_DIMS, "a batch's positions are a request's (mm.h)");

typedef struct {
    int T, D, H, Hkv, Dh, F, QKV, R, n_layers;
} dims;

static dims dims_of(const tk_model *m, int T, int R)
{
    const tk_model_config *c = &m->cfg;
    dims d = {T, c->d_model, c->n_heads, c->n_kv_heads, c->head_dim, c->d_ff, tk_model_qkv_rows(c), R, c->n_layers};
    return d;
}

int tk_batch_max_rank(const tk_batch *b)
{
    int R = 0;
    for (int s = 0; b->adapters && s < b->n_seqs; s++)
        if (b->adapters[s] && b->adapters[s]->cfg.rank > R) R = b->adapters[s]->cfg.rank;
    return R;
}

int tk_batch_is_decode(const tk_batch *b)
{
    return b->kv && !b->resumed && b->n_tokens == b->n_seqs;
}

static int max_seq_len(const tk_batch *b)
{
    int max = 0;
    for (int s = 0; s < b->n_seqs; s++)
        if (b->seq_start[s + 1] - b->seq_start[s] > max) max = b->seq_start[s + 1] - b->seq_start[s];
    return max;
}

/* keys one decoding query attends to at most: its prefix, its cached rows and itself */
static int max_keys(const tk_batch *b)
{
    int max = 1;
    for (int s = 0; s < b->n_seqs; s++)
        if (b->kv[s].n0 + b->kv[s].n1 + 1 > max) max = b->kv[s].n0 + b->kv[s].n1 + 1;
    return max;
}

/* keys a resumed prefill's sequence attends to at most: its cached rows and its new ones */
static int max_resumed_keys(const tk_batch *b)
{
    int max = 1;
    for (int s = 0; s < b->n_seqs; s++) {
        int n = b->kv[s].n1 + b->seq_start[s + 1] - b->seq_start[s];
        if (n > max) max = n;
    }
    return max;
}

/* ---- workspaces ---------------------------------------------------------------------------- */

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
    /* index arrays the ops read on the host: */
    tk_kv_view *views;          /* [n_seqs] a decoding step's caches, one layer at a time */
    float **dst_rows;           /* [2T] row pointers for copy_rows (KV writes, embedding overrides) */
    const float **src_rows;     /* [2T] */
    int32_t *pos;               /* [T, TK_POS_DIMS] each row's position components */
    tk_lora_segment *segs;      /* [n_seqs] the runs of rows with one adapter (lora_segments) */
    int n_segs;
    /* backward only */
    float *dx, *dh, *dqkv, *datt, *dgate_up, *dact, *t, *head_out, *head_inv, *attn_bwd_work;
    tk_moe_scratch moe;         /* the MoE block's (nothing for a model without experts) */
} scratch;

static size_t floats_for_bytes(size_t bytes) { return (bytes + sizeof(float) - 1) / sizeof(float); }

static tk_workspace carve_scratch(scratch *s, float *work, float *host, const tk_model *m, tk_backend *be,
                                  const tk_batch *b, int backward)
{
    dims d = dims_of(m, b->n_tokens, tk_batch_max_rank(b));
    size_t T = (size_t)d.T;
    int decode = tk_batch_is_decode(b);
    tk_arenas a = {{work, 0}, {host, 0}};
    scratch dummy;
    if (!s) s = &dummy;
    s->x = tk_arena_take(&a.dev, T * d.D);
    s->h = tk_arena_take(&a.dev, T * d.D);
    s->qkv = tk_arena_take(&a.dev, T * d.QKV);
    s->qkr = tk_arena_take(&a.dev, T * d.QKV);
    s->att = tk_arena_take(&a.dev, T * d.H * d.Dh);
    s->gate_up = tk_arena_take(&a.dev, T * 2 * d.F);
    s->act = tk_arena_take(&a.dev, T * d.F);
    s->cos = tk_arena_take(&a.dev, T * (d.Dh / 2));
    s->sin = tk_arena_take(&a.dev, T * (d.Dh / 2));
    s->u = tk_arena_take(&a.dev, T * TK_LORA_PER_LAYER * d.R);
    s->attn_work = tk_arena_take(&a.dev, decode ? be->attention_decode_workspace(be, max_keys(b))
                                         : b->resumed ? be->attention_cached_workspace(be, max_resumed_keys(b), d.Dh)
                                                      : be->attention_workspace(be, d.T, max_seq_len(b), d.H, d.Dh));
    s->views = (tk_kv_view *)tk_arena_take(&a.host, floats_for_bytes((size_t)b->n_seqs * sizeof(tk_kv_view)));
    s->dst_rows = (float **)tk_arena_take(&a.host, floats_for_bytes(2 * T * sizeof(float *)));
    s->src_rows = (const float **)tk_arena_take(&a.host, floats_for_bytes(2 * T * sizeof(float *)));
    s->pos = (int32_t *)tk_arena_take(&a.host, T * TK_POS_DIMS);
    s->segs = (tk_lora_segment *)tk_arena_take(&a.host,
                                               floats_for_bytes((size_t)b->n_seqs * sizeof(tk_lora_segment)));
    s->n_segs = 0;
    if (backward) {
        s->dx = tk_arena_take(&a.dev, T * d.D);
        s->dh = tk_arena_take(&a.dev, T * d.D);
        s->dqkv = tk_arena_take(&a.dev, T * d.QKV);
        s->datt = tk_arena_take(&a.dev, T * d.H * d.Dh);
        s->dgate_up = tk_arena_take(&a.dev, T * 2 * d.F);
        s->dact = tk_arena_take(&a.dev, T * d.F);
        s->t = tk_arena_take(&a.dev, T * (d.R ? 3 * d.R : 1)); /* a group of up to 3 targets */
        s->head_out = tk_arena_take(&a.dev, T * d.Dh);
        s->head_inv = tk_arena_take(&a.dev, T);
        s->attn_bwd_work = tk_arena_take(&a.dev, be->attention_backward_workspace(be, d.T, max_seq_len(b), d.H, d.Dh));
    }
    tk_moe_carve(&s->moe, &a, &m->cfg, d.T, d.R, backward);
    return tk_arenas_used(&a);
}

tk_workspace tk_transformer_workspace(const tk_model *m, tk_backend *be, const tk_batch *b, int backward)
{
    return carve_scratch(NULL, NULL, NULL, m, be, b, backward);
}

static size_t carve_store(tk_activations *st, tk_layer_acts *layers, float *mem, const tk_model *m, int n_tokens,
                          int max_rank)
{
    dims d = dims_of(m, n_tokens, max_rank);
    size_t T = (size_t)n_tokens;
    tk_arena a = {mem, 0};
    for (int l = 0; l < d.n_layers; l++) {
        tk_layer_acts dummy, *L = layers ? &layers[l] : &dummy;
        L->x = tk_arena_take(&a, T * d.D);
        L->inv_rms1 = tk_arena_take(&a, T);
        L->qkv = tk_arena_take(&a, T * d.QKV);
        L->att = tk_arena_take(&a, T * d.H * d.Dh);
        L->lse = tk_arena_take(&a, T * d.H);
        L->x2 = tk_arena_take(&a, T * d.D);
        L->inv_rms2 = tk_arena_take(&a, T);
        if (tk_model_layer_is_moe(&m->cfg, l)) { /* the expert-sorted rows' gate|up and the router logits */
            const tk_model_config *c = &m->cfg;
            L->gate_up = tk_arena_take(&a, T * (size_t)c->n_experts_used * 2 * (size_t)c->d_ff_expert);
            L->router_logits = tk_arena_take(&a, T * (size_t)c->n_experts);
        } else {
            L->gate_up = tk_arena_take(&a, T * 2 * d.F);
            L->router_logits = NULL;
        }
        L->u = tk_arena_take(&a, T * TK_LORA_PER_LAYER * d.R);
    }
    tk_activations dummy_store;
    if (!st) st = &dummy_store;
    st->layers = layers;
    st->x_final = tk_arena_take(&a, T * d.D);
    st->inv_rms_final = tk_arena_take(&a, T);
    return a.at;
}

size_t tk_activation_floats(const tk_model *m, int n_tokens, int max_rank)
{
    return carve_store(NULL, NULL, NULL, m, n_tokens, max_rank);
}

void tk_activations_carve(tk_activations *store, tk_layer_acts *layers, float *mem, const tk_model *m, int n_tokens,
                          int max_rank)
{
    carve_store(store, layers, mem, m, n_tokens, max_rank);
}

/* ---- pieces shared by both passes ------------------------------------------------------------- */

/* x[T, D]: the token embeddings, with the batch's replacement rows (image features) copied over theirs */
static void embed_tokens(float *x, const tk_model *m, tk_backend *be, const tk_batch *b, const scratch *s)
{
    int D = m->cfg.d_model, n = 0;
    be->embed(be, x, &m->w.embed, b->tokens, b->n_tokens);
    for (int t = 0; b->embed_row && t < b->n_tokens; t++)
        if (b->embed_row[t] >= 0) {
            s->dst_rows[n] = x + (size_t)t * D;
            s->src_rows[n++] = b->embeds + (size_t)b->embed_row[t] * D;
        }
    if (n) be->copy_rows(be, s->dst_rows, s->src_rows, n, D);
}

/* Position components of row t of sequence s: the batch's, else counted on from what the sequence has cached
 * (plus its delta: M-RoPE's positions after an image run ahead of the count), the same on every axis. */
static void position(int32_t out[TK_POS_DIMS], const tk_batch *b, int s, int t)
{
    if (b->pos) {
        for (int k = 0; k < TK_POS_DIMS; k++) out[k] = b->pos[(size_t)t * TK_POS_DIMS + k];
        return;
    }
    int cached = b->kv ? b->kv[s].n0 + b->kv[s].n1 : 0;
    int p = cached + t - b->seq_start[s] + (b->pos_delta ? b->pos_delta[s] : 0);
    for (int k = 0; k < TK_POS_DIMS; k++) out[k] = p;
}

/* cos/sin of each row's position times the model's inverse frequencies; with M-RoPE each frequency reads the
 * component its axis names, else the first (text: all components are equal) */
static void rope_tables(const scratch *s, const tk_model *m, tk_backend *be, const tk_batch *b)
{
    for (int q = 0; q < b->n_seqs; q++)
        for (int t = b->seq_start[q]; t < b->seq_start[q + 1]; t++) position(s->pos + (size_t)t * TK_POS_DIMS, b, q, t);
    be->rope_table(be, s->cos, s->sin, s->pos, TK_POS_DIMS, b->n_tokens, m->w.rope_inv_freq, m->w.rope_axis,
                   m->cfg.head_dim / 2);
}

/* x[T, D] += deepstack feature `layer` at the batch's image rows (after decoder layer `layer`, as Qwen3-VL adds
 * its vision tower's intermediate features into the language model's first layers) */
static void add_deepstack(float *x, const tk_model *m, tk_backend *be, const tk_batch *b, const scratch *s,
                          int layer)
{
    if (!b->deepstack || layer >= b->n_deepstack || !b->embed_row) return;
    int D = m->cfg.d_model, n = 0;
    const float *block = b->deepstack + (size_t)layer * b->n_embeds * D;
    for (int t = 0; t < b->n_tokens; t++)
        if (b->embed_row[t] >= 0) {
            s->dst_rows[n] = x + (size_t)t * D;
            s->src_rows[n++] = block + (size_t)b->embed_row[t] * D;
        }
    if (n) be->add_rows(be, s->dst_rows, s->src_rows, NULL, n, D);
}

/* one contiguous block of floats through the backend (src and dst may not overlap) */
static void copy_block(tk_backend *be, float *dst, const float *src, size_t n)
{
    float *d[1] = {dst};
    const float *s[1] = {src};
    be->copy_rows(be, d, s, 1, (int)n);
}

/* qkr = qkv with q and k normed per head (Qwen3) and rotated. */
static void prepare_qk(float *qkr, const float *qkv, const tk_layer_weights *L, const tk_model *m, tk_backend *be,
                       const scratch *s, int T)
{
    const tk_model_config *c = &m->cfg;
    int QKV = tk_model_qkv_rows(c), Dh = c->head_dim, H = c->n_heads, Hkv = c->n_kv_heads;
    float *q = qkr, *k = qkr + H * Dh;
    copy_block(be, qkr, qkv, (size_t)T * QKV);
    if (c->qk_norm) {
        for (int h = 0; h < H; h++) be->rmsnorm(be, q + h * Dh, QKV, q + h * Dh, QKV, L->q_norm, T, Dh, c->rms_eps, NULL);
        for (int h = 0; h < Hkv; h++) be->rmsnorm(be, k + h * Dh, QKV, k + h * Dh, QKV, L->k_norm, T, Dh, c->rms_eps, NULL);
    }
    be->rope(be, q, QKV, T, H, Dh, s->cos, s->sin, 0);
    be->rope(be, k, QKV, T, Hkv, Dh, s->cos, s->sin, 0);
}

/* The group's LoRA terms for every adapter segment of the pass (s->segs); u [T, ldu] keeps scale x A^T per
 * target. */
static void lora_forward(tk_backend *be, const tk_batch *b, const scratch *s, int layer, const tk_lora_group *g,
                         const float *x, int ldx, float *u, int ldu)
{
    tk_lora_forward(be, s->segs, s->n_segs, layer, g, x, ldx, u, ldu, tk_batch_is_decode(b));
}

/* s->segs: each run of sequences with the same adapter (the base model's runs are left out) */
static void lora_segments(scratch *s, const tk_batch *b)
{
    s->n_segs = 0;
    FOR_EACH_ADAPTER_SEGMENT(b, ad, r0, r1, {
        tk_lora_segment *seg = &s->segs[s->n_segs++];
        seg->ad = ad;
        seg->r0 = r0;
        seg->r1 = r1;
    })
}

/* The same backward: LoRA gradients of each segment's adapter, and its part of dx (when dx != NULL); t is
 * scratch for one segment [rows, 3R]. */
static void lora_backward(tk_backend *be, const tk_batch *b, int layer, const tk_lora_group *g, const float *x,
                          int ldx, const float *u, int ldu, float *dx, int lddx, float *t)
{
    FOR_EACH_ADAPTER_SEGMENT(b, ad, r0, r1, {
        tk_lora_group seg = *g;
        for (int j = 0; j < g->n; j++) seg.y[j] += (size_t)r0 * g->ld;
        tk_lora_backward(be, ad, layer, &seg, x + (size_t)r0 * ldx, ldx,
                         u + (size_t)r0 * ldu + (size_t)g->first * ad->cfg.rank, ldu,
                         dx ? dx + (size_t)r0 * lddx : NULL, lddx, t, r1 - r0);
    })
}

/* New keys and values (columns of qkr) to each sequence's cache, after its cached rows. */
static void write_kv(tk_backend *be, const tk_batch *b, const scratch *s, int l, int QKV, int kcol, int vcol, int KV)
{
    int n = 0;
    for (int q = 0; q < b->n_seqs; q++) {
        const tk_kv_seq *kv = &b->kv[q];
        float *k = kv->k1 + (size_t)l * kv->stride1, *v = kv->v1 + (size_t)l * kv->stride1;
        for (int t = b->seq_start[q]; t < b->seq_start[q + 1]; t++) {
            size_t row = (size_t)(kv->n1 + t - b->seq_start[q]) * KV;
            s->dst_rows[n] = k + row, s->src_rows[n++] = s->qkr + (size_t)t * QKV + kcol;
            s->dst_rows[n] = v + row, s->src_rows[n++] = s->qkr + (size_t)t * QKV + vcol;
        }
    }
    be->copy_rows(be, s->dst_rows, s->src_rows, n, KV);
}

/* Each decoding sequence's keys and values in layer l: its prefix, then its own rows, the new one included. */
static void decode_views(const tk_batch *b, const scratch *s, int l)
{
    for (int q = 0; q < b->n_seqs; q++) {
        const tk_kv_seq *kv = &b->kv[q];
        s->views[q] = (tk_kv_view){kv->n0 ? kv->k0 + (size_t)l * kv->stride0 : NULL,
                                   kv->n0 ? kv->v0 + (size_t)l * kv->stride0 : NULL, kv->n0,
                                   kv->k1 + (size_t)l * kv->stride1, kv->v1 + (size_t)l * kv->stride1, kv->n1 + 1};
    }
}

/* Each resumed sequence's keys and values in layer l: its cached rows, then its new ones (just written). */
static void resumed_views(const tk_batch *b, const scratch *s, int l)
{
    for (int q = 0; q < b->n_seqs; q++) {
        const tk_kv_seq *kv = &b->kv[q];
        s->views[q] = (tk_kv_view){NULL, NULL, 0, kv->k1 + (size_t)l * kv->stride1, kv->v1 + (size_t)l * kv->stride1,
                                   kv->n1 + b->seq_start[q + 1] - b->seq_start[q]};
    }
}

/* ---- the forward pass ------------------------------------------------------------------------ */

void tk_transformer_forward(float *h_out, const tk_model *m, tk_backend *be, const tk_batch *b,
                            tk_activations *store, float *work, float *host)
{
    const tk_model_config *c = &m->cfg;
    const dims d = dims_of(m, b->n_tokens, tk_batch_max_rank(b));
    const int T = d.T, D = d.D, H = d.H, Dh = d.Dh, F = d.F, QKV = d.QKV, U = TK_LORA_PER_LAYER * d.R;
    const int kcol = H * Dh, vcol = (H + d.Hkv) * Dh; /* column offsets of k and v in a qkv row */
    const int decode = tk_batch_is_decode(b);
    /* a decoding step's few rows stream the weights (see backend.h) */
    void (*const project)(tk_backend *, float *, int, const float *, int, const tk_weight *, int, float, float) =
        decode ? be->matmul_w_decode : be->matmul_w;
    scratch s;
    carve_scratch(&s, work, host, m, be, b, 0);
    lora_segments(&s, b);
    const tk_moe_pass moe = {m, be, b, decode, &s.moe};

    embed_tokens(s.x, m, be, b, &s);
    rope_tables(&s, m, be, b);

    for (int l = 0; l < d.n_layers; l++) {
        const tk_layer_weights *L = &m->w.layers[l];
        tk_layer_acts *st = store ? &store->layers[l] : NULL;
        float *qkv = st ? st->qkv : s.qkv, *att = st ? st->att : s.att, *gate_up = st ? st->gate_up : s.gate_up;
        float *u = st ? st->u : s.u;

        /* attention block: x += o(attention(rope(q), rope(k), v)) */
        if (st) copy_block(be, st->x, s.x, (size_t)T * D);
        be->rmsnorm(be, s.h, D, s.x, D, L->attn_norm, T, D, c->rms_eps, st ? st->inv_rms1 : NULL);
        project(be, qkv, QKV, s.h, D, &L->wqkv, T, 1.0f, 0.0f);
        if (L->bqkv) be->add_bias(be, qkv, QKV, L->bqkv, T, QKV);
        tk_lora_group qkv_g = {TK_LORA_Q, 3, {qkv, qkv + kcol, qkv + vcol}, QKV};
        lora_forward(be, b, &s, l, &qkv_g, s.h, D, u, U);
        prepare_qk(s.qkr, qkv, L, m, be, &s, T);
        if (b->kv) write_kv(be, b, &s, l, QKV, kcol, vcol, d.Hkv * Dh);
        if (decode) {
            decode_views(b, &s, l);
            be->attention_decode(be, att, H * Dh, s.qkr, QKV, s.views, T, H, d.Hkv, Dh, d.Hkv * Dh, s.attn_work);
        } else if (b->resumed) {
            resumed_views(b, &s, l);
            be->attention_cached(be, att, H * Dh, s.qkr, QKV, s.views, b->seq_start, b->n_seqs, H, d.Hkv, Dh,
                                 d.Hkv * Dh, s.attn_work);
        } else {
            be->attention(be, att, H * Dh, s.qkr, s.qkr + kcol, s.qkr + vcol, QKV, b->seq_start, b->n_seqs, H,
                          d.Hkv, Dh, st ? st->lse : NULL, s.attn_work);
        }
        project(be, s.x, D, att, H * Dh, &L->wo, T, 1.0f, 1.0f);
        tk_lora_group o_g = {TK_LORA_O, 1, {s.x}, D};
        lora_forward(be, b, &s, l, &o_g, att, H * Dh, u, U);

        /* MLP block: x += down(silu(gate(h)) * up(h)), h = norm(x); or the experts' (moe.c) */
        if (st) copy_block(be, st->x2, s.x, (size_t)T * D);
        be->rmsnorm(be, s.h, D, s.x, D, L->mlp_norm, T, D, c->rms_eps, st ? st->inv_rms2 : NULL);
        if (L->moe) {
            tk_moe_forward(&moe, l, s.x, s.h, st ? st->router_logits : s.moe.logits, st ? gate_up : s.moe.gate_up,
                           u, U);
        } else {
            project(be, gate_up, 2 * F, s.h, D, &L->w_gate_up, T, 1.0f, 0.0f);
            tk_lora_group gate_up_g = {TK_LORA_GATE, 2, {gate_up, gate_up + F}, 2 * F};
            lora_forward(be, b, &s, l, &gate_up_g, s.h, D, u, U);
            be->swiglu(be, s.act, gate_up, T, F);
            project(be, s.x, D, s.act, F, &L->w_down, T, 1.0f, 1.0f);
            tk_lora_group down_g = {TK_LORA_DOWN, 1, {s.x}, D};
            lora_forward(be, b, &s, l, &down_g, s.act, F, u, U);
        }
        /* a constant added to the residual stream: the backward pass needs nothing for it (the next layer's
         * stored input, or x_final, includes it) */
        add_deepstack(s.x, m, be, b, &s, l);
    }

    if (store) copy_block(be, store->x_final, s.x, (size_t)T * D);
    be->rmsnorm(be, h_out, D, s.x, D, m->w.final_norm, T, D, c->rms_eps, store ? store->inv_rms_final : NULL);
}

/* ---- the backward pass ----------------------------------------------------------------------- */

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

/* 1 when some adapter of the batch trains the attention projections */
static int trains_attention(const tk_batch *b)
{
    for (int s = 0; b->adapters && s < b->n_seqs; s++)
        if (b->adapters[s] && b->adapters[s]->cfg.train_attn) return 1;
    return 0;
}

void tk_transformer_backward(const tk_model *m, tk_backend *be, const tk_batch *b, const tk_activations *store,
                             float *dh_final, float *work, float *host)
{
    const tk_model_config *c = &m->cfg;
    const dims d = dims_of(m, b->n_tokens, tk_batch_max_rank(b));
    const int T = d.T, D = d.D, H = d.H, Dh = d.Dh, F = d.F, QKV = d.QKV, U = TK_LORA_PER_LAYER * d.R;
    const int kcol = H * Dh, vcol = (H + d.Hkv) * Dh;
    scratch s;
    carve_scratch(&s, work, host, m, be, b, 1);
    const tk_moe_pass moe = {m, be, b, 0, &s.moe};
    rope_tables(&s, m, be, b);

    /* through the final norm: dx is the gradient of the residual stream from here down */
    be->rmsnorm_backward(be, s.dx, D, dh_final, D, store->x_final, D, m->w.final_norm, store->inv_rms_final, T, D, 0);

    for (int l = d.n_layers - 1; l >= 0; l--) {
        const tk_layer_weights *L = &m->w.layers[l];
        const tk_layer_acts *st = &store->layers[l];

        /* MLP block, x3 = x2 + down(act), act = silu(g) * u, [g | u] = gate_up(h), h = norm(x2); or the experts' */
        be->rmsnorm(be, s.h, D, st->x2, D, L->mlp_norm, T, D, c->rms_eps, NULL);
        if (L->moe) {
            tk_moe_backward(&moe, l, s.dh, s.dx, s.h, st->router_logits, st->gate_up, st->u, U);
        } else {
            be->swiglu(be, s.act, st->gate_up, T, F);
            be->matmul_w_t(be, s.dact, F, s.dx, D, &L->w_down, T, 1.0f, 0.0f);
            tk_lora_group down_g = {TK_LORA_DOWN, 1, {s.dx}, D};
            lora_backward(be, b, l, &down_g, s.act, F, st->u, U, s.dact, F, s.t);
            be->swiglu_backward(be, s.dgate_up, s.dact, st->gate_up, T, F);
            be->matmul_w_t(be, s.dh, D, s.dgate_up, 2 * F, &L->w_gate_up, T, 1.0f, 0.0f);
            tk_lora_group gate_up_g = {TK_LORA_GATE, 2, {s.dgate_up, s.dgate_up + F}, 2 * F};
            lora_backward(be, b, l, &gate_up_g, s.h, D, st->u, U, s.dh, D, s.t);
        }
        be->rmsnorm_backward(be, s.dx, D, s.dh, D, st->x2, D, L->mlp_norm, st->inv_rms2, T, D, 1);

        /* attention block, x2 = x + o(att), att = attention(qkr), qkr = rope(norm(qkv(h))), h = norm(x) */
        /* below layer 0 nothing trains: its attention block only matters for its own LoRA */
        if (l == 0 && !trains_attention(b)) break;
        be->matmul_w_t(be, s.datt, H * Dh, s.dx, D, &L->wo, T, 1.0f, 0.0f);
        tk_lora_group o_g = {TK_LORA_O, 1, {s.dx}, D};
        lora_backward(be, b, l, &o_g, st->att, H * Dh, st->u, U, s.datt, H * Dh, s.t);
        prepare_qk(s.qkr, st->qkv, L, m, be, &s, T);
        be->attention_backward(be, s.dqkv, s.dqkv + kcol, s.dqkv + vcol, s.datt, st->att, H * Dh, s.qkr,
                               s.qkr + kcol, s.qkr + vcol, QKV, st->lse, b->seq_start, b->n_seqs, H, d.Hkv, Dh,
                               s.attn_bwd_work);
        qk_backward(s.dqkv, st->qkv, L, m, be, &s, T);
        be->rmsnorm(be, s.h, D, st->x, D, L->attn_norm, T, D, c->rms_eps, NULL);
        float *dh = l > 0 ? s.dh : NULL; /* layer 0: no gradient below the embeddings is needed */
        if (dh) be->matmul_w_t(be, dh, D, s.dqkv, QKV, &L->wqkv, T, 1.0f, 0.0f);
        tk_lora_group qkv_g = {TK_LORA_Q, 3, {s.dqkv, s.dqkv + kcol, s.dqkv + vcol}, QKV};
        lora_backward(be, b, l, &qkv_g, s.h, D, st->u, U, dh, D, s.t);
        if (dh) be->rmsnorm_backward(be, s.dx, D, dh, D, st->x, D, L->attn_norm, st->inv_rms1, T, D, 1);
    }
}
