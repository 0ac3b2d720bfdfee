/* lora.c - LoRA adapters: their layout, creation, and the LoRA terms of the forward and backward passes
 * (see lora.h). */
#include "lora.h"

#include "../core/rng.h"
#include "arch.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The engine's name of a target (q ... down; unembed for TK_LORA_PER_LAYER), from the architecture descriptor. */
static const char *target_name(const tk_model_config *c, int target)
{
    const tk_arch_lora *l = tk_arch_lora_of(c->arch, target);
    return l ? l->name : "?";
}

/* [in, out] of each target (TK_LORA_PER_LAYER: the unembedding): the shape of the tensor it adapts */
static void target_dims(const tk_model_config *c, int target, int *in, int *out)
{
    tk_arch_lora_dims(c->arch, target, c, in, out);
}

/* Whether the adapter trains `target` in `layer`: its flag is set and the layer has the tensor it adapts (an MoE
 * layer has the experts' targets, a dense one the MLP's). */
static int target_trained(const tk_adapter *a, int layer, int target)
{
    const tk_model_config *c = &a->model->cfg;
    const tk_arch_lora *l = tk_arch_lora_of(c->arch, target);
    const tk_arch_tensor *t = l ? tk_arch_tensor_of(c->arch, (int)l->role) : NULL;
    if (!t || !tk_arch_used(t, c, layer)) return 0;
    switch (l->trained_by) {
    case TK_TRAIN_ATTN: return a->cfg.train_attn;
    case TK_TRAIN_MLP: return a->cfg.train_mlp;
    default: return a->cfg.train_unembed;
    }
}

/* How many experts stack in each factor of a target: E for an expert's own, 1 for a shared or dense one. */
static void target_experts(const tk_model_config *c, int target, int *a_experts, int *b_experts)
{
    const tk_arch_lora *l = tk_arch_lora_of(c->arch, target);
    *a_experts = l && l->a_per_expert ? c->n_experts : 1;
    *b_experts = l && l->b_per_expert ? c->n_experts : 1;
}

/* Walks the layout: with base == NULL it only counts floats. Per layer all
 * A matrices come first, in target order, then all B matrices: the A's of
 * q, k, v (and of gate, up, or of the experts' shared gate, up) then form one
 * [3R, D] (and [2R, D]) matrix, so the projections that share an input run as
 * one GEMM. */
static size_t carve(tk_adapter *a, float *base)
{
    const tk_model_config *c = &a->model->cfg;
    size_t R = (size_t)a->cfg.rank, at = 0;
    for (int l = 0; l < c->n_layers; l++) {
        for (int t = 0; t < TK_LORA_PER_LAYER; t++) {
            tk_lora_pair *p = &a->layers[(size_t)l * TK_LORA_PER_LAYER + (size_t)t];
            target_dims(c, t, &p->in, &p->out);
            target_experts(c, t, &p->a_experts, &p->b_experts);
            if (!target_trained(a, l, t)) continue;
            if (base) p->A = base + at;
            at += (size_t)p->a_experts * R * (size_t)p->in;
        }
        for (int t = 0; t < TK_LORA_PER_LAYER; t++) {
            tk_lora_pair *p = &a->layers[(size_t)l * TK_LORA_PER_LAYER + (size_t)t];
            if (!target_trained(a, l, t)) continue;
            if (base) p->B = base + at;
            at += (size_t)p->b_experts * (size_t)p->out * R;
        }
    }
    target_dims(c, TK_LORA_PER_LAYER, &a->unembed.in, &a->unembed.out);
    a->unembed.a_experts = a->unembed.b_experts = 1;
    if (a->cfg.train_unembed) {
        if (base) a->unembed.A = base + at;
        at += R * (size_t)a->unembed.in;
        if (base) a->unembed.B = base + at;
        at += (size_t)a->unembed.out * R;
    }
    return at;
}

/* A ~ U(-1/sqrt(in), 1/sqrt(in)): peft's kaiming_uniform_(a=sqrt(5)) bound */
static void init_a(float *A, size_t n, int in, uint64_t *rng)
{
    float bound = 1.0f / sqrtf((float)in);
    for (size_t i = 0; i < n; i++) {
        double u = (double)(tk_splitmix64(rng) >> 11) * (1.0 / 9007199254740992.0); /* [0, 1) */
        A[i] = (float)((2.0 * u - 1.0) * bound);
    }
}

/* Adapter uids start at 1 (0 is the base model in prefix-cache keys). */
static atomic_uint_fast64_t next_uid = 1;

tk_status tk_adapter_create(tk_adapter **out, tk_model *m, const tk_lora_config *cfg)
{
    *out = NULL;
    if (cfg->rank < 1 || cfg->rank > 256)
        return tk_error(TK_ERR_INVALID, "LoRA rank %d is out of range (1 to 256)", cfg->rank);
    if (!cfg->train_attn && !cfg->train_mlp && !cfg->train_unembed)
        return tk_error(TK_ERR_INVALID, "LoRA needs at least one of train_attn, train_mlp, train_unembed");
    tk_adapter *a = calloc(1, sizeof *a);
    if (!a) return tk_error(TK_ERR_NOMEM, "out of memory");
    a->model = m;
    tk_model_retain(m);
    a->cfg = *cfg;
    a->scale = TK_LORA_ALPHA / (float)cfg->rank;
    a->uid = atomic_fetch_add(&next_uid, 1);
    atomic_init(&a->refcount, 1);
    a->layers = calloc((size_t)m->cfg.n_layers * TK_LORA_PER_LAYER, sizeof *a->layers);
    a->n_params = a->layers ? carve(a, NULL) : 0;
    /* zeroed: gradients, moments and B start at 0 */
    a->block = a->layers ? m->be->alloc(m->be, (4 * a->n_params + 1) * sizeof(float)) : NULL;
    size_t largest_a = 1; /* floats of the largest A: one at a time goes through `host`, then is uploaded */
    for (int i = 0; a->block && i <= m->cfg.n_layers * TK_LORA_PER_LAYER; i++) {
        const tk_lora_pair *p = i < m->cfg.n_layers * TK_LORA_PER_LAYER ? &a->layers[i] : &a->unembed;
        size_t n = (size_t)p->a_experts * (size_t)cfg->rank * (size_t)p->in;
        if (n > largest_a) largest_a = n;
    }
    float *host = malloc(largest_a * sizeof(float));
    if (!a->block || !host) {
        free(host);
        tk_adapter_release(a);
        return tk_error(TK_ERR_NOMEM, "cannot allocate %.1f MB for a rank-%d LoRA adapter",
                        4.0 * (double)a->n_params * sizeof(float) / 1e6, cfg->rank);
    }
    carve(a, a->block);
    a->grads_zero = 1;
    uint64_t rng = cfg->seed;
    for (int i = 0; i <= m->cfg.n_layers * TK_LORA_PER_LAYER; i++) { /* every layer's targets, then the unembed */
        const tk_lora_pair *p = i < m->cfg.n_layers * TK_LORA_PER_LAYER ? &a->layers[i] : &a->unembed;
        if (!p->A) continue;
        size_t n = (size_t)p->a_experts * (size_t)cfg->rank * (size_t)p->in;
        init_a(host, n, p->in, &rng);
        m->be->upload(m->be, p->A, host, n * sizeof(float));
    }
    free(host);
    *out = a;
    return TK_OK;
}

tk_status tk_adapter_snapshot(tk_adapter **out, const tk_adapter *src)
{
    *out = NULL;
    tk_adapter *a = calloc(1, sizeof *a);
    if (!a) return tk_error(TK_ERR_NOMEM, "out of memory");
    a->model = src->model;
    tk_model_retain(a->model);
    a->cfg = src->cfg;
    a->scale = src->scale;
    a->frozen = 1;
    a->uid = atomic_fetch_add(&next_uid, 1);
    atomic_init(&a->refcount, 1);
    a->layers = calloc((size_t)a->model->cfg.n_layers * TK_LORA_PER_LAYER, sizeof *a->layers);
    a->n_params = src->n_params;
    tk_backend *be = a->model->be;
    a->block = a->layers ? be->alloc(be, (a->n_params + 1) * sizeof(float)) : NULL;
    if (!a->block) {
        tk_adapter_release(a);
        return tk_error(TK_ERR_NOMEM, "cannot allocate a snapshot of the adapter");
    }
    carve(a, a->block);
    float *dst[1] = {a->block};
    const float *from[1] = {src->block};
    be->copy_rows(be, dst, from, 1, (int)a->n_params);
    a->step = src->step;
    *out = a;
    return TK_OK;
}

void tk_adapter_retain(tk_adapter *a) { atomic_fetch_add(&a->refcount, 1); }

void tk_adapter_release(tk_adapter *a)
{
    if (!a || atomic_fetch_sub(&a->refcount, 1) != 1) return;
    if (a->model) a->model->be->free(a->model->be, a->block);
    tk_model_release(a->model);
    free(a->layers);
    free(a);
}

/* ---- the LoRA math --------------------------------------------------------------------------- */

/* Segments per pair of matmul_nt_many calls: the B jobs of up to 3 targets each fit a small stack array. */
enum { FORWARD_SEGMENTS = 32 };

void tk_lora_forward(tk_backend *be, const tk_lora_segment *segs, int n_segs, int layer, const tk_lora_group *g,
                     const float *x, int ldx, float *u, int ldu, int decoding)
{
    tk_nt_job a_jobs[FORWARD_SEGMENTS], b_jobs[FORWARD_SEGMENTS * 3];
    for (int s0 = 0; s0 < n_segs; s0 += FORWARD_SEGMENTS) {
        int s1 = n_segs - s0 < FORWARD_SEGMENTS ? n_segs : s0 + FORWARD_SEGMENTS, na = 0, nb = 0;
        for (int i = s0; i < s1; i++) {
            const tk_adapter *ad = segs[i].ad;
            const tk_lora_pair *p0 = tk_lora_at(ad, layer, g->first);
            if (!p0->A) continue; /* this adapter does not train these targets */
            int R = ad->cfg.rank, r0 = segs[i].r0, rows = segs[i].r1 - r0;
            float *us = u + (size_t)r0 * ldu + (size_t)g->first * R;
            a_jobs[na++] = (tk_nt_job){us, x + (size_t)r0 * ldx, p0->A, ldu, ldx, rows, g->n * R, p0->in, ad->scale,
                                       0.0f};
            for (int j = 0; j < g->n; j++) {
                const tk_lora_pair *p = tk_lora_at(ad, layer, g->first + j);
                b_jobs[nb++] = (tk_nt_job){g->y[j] + (size_t)r0 * g->ld, us + j * R, p->B, g->ld, ldu, rows, p->out,
                                           R, 1.0f, 1.0f};
            }
        }
        be->matmul_nt_many(be, a_jobs, na, decoding);
        be->matmul_nt_many(be, b_jobs, nb, decoding);
    }
}

void tk_lora_backward(tk_backend *be, const tk_adapter *ad, int layer, const tk_lora_group *g, const float *x,
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

/* ---- tensors for export ------------------------------------------------------------------------ */

static int add_tensor(tk_lora_tensor *out, int n, int max, const char *name, const float *data, int rows, int cols,
                      int experts)
{
    if (n < max) {
        snprintf(out[n].name, sizeof out[n].name, "%s", name);
        out[n].data = data;
        out[n].rows = rows;
        out[n].cols = cols;
        out[n].experts = experts;
    }
    return n + 1;
}

int tk_adapter_tensors(const tk_adapter *a, tk_lora_tensor *out, int max)
{
    const tk_model_config *c = &a->model->cfg;
    int n = 0, R = a->cfg.rank;
    char name[64];
    for (int l = 0; l < c->n_layers; l++)
        for (int t = 0; t < TK_LORA_PER_LAYER; t++) {
            const tk_lora_pair *p = tk_lora_at(a, l, t);
            if (!p->A) continue;
            const tk_arch_tensor *base = tk_arch_tensor_of(c->arch, (int)tk_arch_lora_of(c->arch, t)->role);
            int experts = base->per_expert; /* expert targets' factors are 3-D, [1 or E, rows, cols] */
            snprintf(name, sizeof name, "layers.%d.%s.lora_A", l, target_name(c, t));
            n = add_tensor(out, n, max, name, p->A, p->a_experts * R, p->in, experts ? p->a_experts : 0);
            snprintf(name, sizeof name, "layers.%d.%s.lora_B", l, target_name(c, t));
            n = add_tensor(out, n, max, name, p->B, p->b_experts * p->out, R, experts ? p->b_experts : 0);
        }
    if (a->unembed.A) {
        snprintf(name, sizeof name, "%s.lora_A", target_name(c, TK_LORA_PER_LAYER));
        n = add_tensor(out, n, max, name, a->unembed.A, R, a->unembed.in, 0);
        snprintf(name, sizeof name, "%s.lora_B", target_name(c, TK_LORA_PER_LAYER));
        n = add_tensor(out, n, max, name, a->unembed.B, a->unembed.out, R, 0);
    }
    return n;
}
