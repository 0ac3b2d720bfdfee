/* moe.c - the mixture-of-experts MLP block (Qwen3-MoE, Hugging Face semantics) and its backward pass.
 *
 * Forward, for the normed rows h [T, D] of a pass (x, the residual stream, is updated in place):
 *   z = h Wr^T [T, E] router logits; p = softmax(z) in float32; each token keeps its k most likely experts with
 *   weights w = p, or p / (sum of the kept p) with norm_topk_prob;
 *   the n = T k (token, expert) assignments are sorted by expert, in token order within an expert: row j of the
 *   sorted buffers is one assignment, so each expert multiplies its rows as one matmul through its own weight
 *   handles and only the experts a token was routed to are read for it;
 *   gu = rows Wgu_e^T [n, 2Fe], act = silu(gate) * up, f = act Wd_e^T [n, D], x[token(j)] += w_j f_j.
 * LoRA on the experts, Tinker's shared-outer layout (lora.h), s = alpha / R:
 *   gate and up share their A [R, D], so u = s h [A_gate; A_up]^T [T, 2R] is computed once per token, gathered
 *   to the rows, and each expert adds its own B: gate_j += u_gate(t) B_gate,e^T, up_j += u_up(t) B_up,e^T;
 *   down shares its B [D, R]: v_j = s act_j A_down,e^T [R], zd_t = sum_j w_j v_j [T, R], x += zd B_down^T once
 *   per token (sum_j w_j B (A_e act_j) = B sum_j w_j A_e act_j). u and zd are kept in the layer's LoRA columns.
 *
 * Backward, dy = dL/d(block output) [T, D]; the top-k choice is piecewise constant and has no gradient:
 *   a_j = dy_t Wd_e + s (dy_t B_down) A_down,e   (the gradient of f_j's input act_j, before the gate weight)
 *   c_j = <a_j, act_j> = <dy_t, f_j>              (f_j is linear in act_j): dL/dw_j
 *   router: dL/dp_e = c_e (or (c_e - sum_i w_i c_i) / Z through the renormalisation, Z the kept mass);
 *   dz = p * (dL/dp - <p, dL/dp>) [T, E]; dh = dz Wr
 *   experts: dact_j = w_j a_j, dgu = swiglu'(dact), dh_t += sum_j dgu_j Wgu_e, and the LoRA terms.
 *
 * The routing is computed on the host from the router logits (downloaded where the device's memory is not the
 * host's) and recomputed, bit for bit the same, from the stored logits for the backward pass. Rows of a pass
 * with different adapters (multi-LoRA batches) share the base matmuls; each adapter's LoRA terms run on the
 * part of each expert's rows that belongs to its sequences.
 */
#include "moe.h"

#include <math.h>
#include <string.h>

#include "lora.h"

static size_t floats_for_bytes(size_t bytes) { return (bytes + sizeof(float) - 1) / sizeof(float); }

void tk_moe_carve(tk_moe_scratch *s, tk_arenas *a, const tk_model_config *c, int T, int R, int backward)
{
    tk_moe_scratch dummy;
    if (!s) s = &dummy;
    memset(s, 0, sizeof *s);
    if (!c->moe) return;
    size_t E = (size_t)c->n_experts, k = (size_t)c->n_experts_used, n = (size_t)T * k, D = (size_t)c->d_model;
    size_t Fe = (size_t)c->d_ff_expert, Rz = (size_t)(R > 0 ? R : 0), t = (size_t)T;
    tk_arena *dev = &a->dev, *host = &a->host;
    s->r.expert_start = (int32_t *)tk_arena_take(host, E + 1);
    s->r.cursor = (int32_t *)tk_arena_take(host, E);
    s->r.token = (int32_t *)tk_arena_take(host, n);
    s->r.weight = tk_arena_take(host, n);
    s->r.choice = (int32_t *)tk_arena_take(host, n);
    s->r.row = (int32_t *)tk_arena_take(host, n);
    s->r.prob = tk_arena_take(host, t * E);
    s->src = (const float **)tk_arena_take(host, floats_for_bytes(n * sizeof(float *)));
    s->dst = (float **)tk_arena_take(host, floats_for_bytes(n * sizeof(float *)));
    s->logits_host = tk_arena_take(host, t * E);
    s->logits = tk_arena_take(dev, t * E);
    s->gate_up = tk_arena_take(dev, n * 2 * Fe);
    s->rows = tk_arena_take(dev, n * D);
    s->act = tk_arena_take(dev, n * Fe);
    s->u_rows = tk_arena_take(dev, n * 2 * Rz);
    s->v = tk_arena_take(dev, n * Rz);
    if (!backward) return;
    s->c_host = tk_arena_take(host, n);
    s->dz_host = tk_arena_take(host, t * E);
    s->dact = tk_arena_take(dev, n * Fe);
    s->dgate_up = tk_arena_take(dev, n * 2 * Fe);
    s->c = tk_arena_take(dev, n);
    s->dz = tk_arena_take(dev, t * E);
    s->q = tk_arena_take(dev, t * Rz);
    s->du_rows = tk_arena_take(dev, n * 2 * Rz);
    s->du = tk_arena_take(dev, t * 2 * Rz);
}

/* ---- routing (host) ---------------------------------------------------------------------------------------- */

/* p[E] = softmax(z[E]) in float32, as torch computes it: exp(z - max) / sum. */
static void softmax_row(float *p, const float *z, int E)
{
    float max = z[0], sum = 0.0f;
    for (int e = 1; e < E; e++) max = z[e] > max ? z[e] : max;
    for (int e = 0; e < E; e++) sum += p[e] = expf(z[e] - max);
    for (int e = 0; e < E; e++) p[e] /= sum;
}

/* choice[k]: the k most likely experts, most likely first (equal probabilities: the lower index first). */
static void top_k(int32_t *choice, const float *p, int E, int k)
{
    for (int s = 0; s < k; s++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < s && !taken; i++) taken = choice[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        choice[s] = best;
    }
}

/* The routing of T tokens from their router logits z [T, E] (host). */
static void route(tk_moe_routing *r, const float *z, const tk_model_config *c, int T)
{
    int E = c->n_experts, k = c->n_experts_used;
    memset(r->cursor, 0, (size_t)E * sizeof *r->cursor);
    for (int t = 0; t < T; t++) {
        float *p = r->prob + (size_t)t * E;
        int32_t *choice = r->choice + (size_t)t * k;
        softmax_row(p, z + (size_t)t * E, E);
        top_k(choice, p, E, k);
        for (int s = 0; s < k; s++) r->cursor[choice[s]]++;
    }
    r->expert_start[0] = 0;
    for (int e = 0; e < E; e++) {
        r->expert_start[e + 1] = r->expert_start[e] + r->cursor[e];
        r->cursor[e] = r->expert_start[e];
    }
    for (int t = 0; t < T; t++) {
        const float *p = r->prob + (size_t)t * E;
        const int32_t *choice = r->choice + (size_t)t * k;
        float kept = 0.0f; /* the kept probability mass, summed most likely first as torch's sum of topk values */
        for (int s = 0; s < k; s++) kept += p[choice[s]];
        for (int s = 0; s < k; s++) {
            int j = r->cursor[choice[s]]++;
            r->token[j] = t;
            r->weight[j] = c->norm_topk_prob ? p[choice[s]] / kept : p[choice[s]];
            r->row[(size_t)t * k + s] = j;
        }
    }
}

/* The router's backward on the host: dz [T, E] from c [n] (dL/dw of each row), the probabilities and the
 * choice. dL/dp is c on the kept experts (through the renormalisation: (c_e - sum_i w_i c_i) / Z), 0 elsewhere;
 * then softmax's Jacobian: dz_m = p_m (dL/dp_m - sum_i p_i dL/dp_i). In double, rounded once. */
static void router_backward(float *dz, const tk_moe_routing *r, const float *c_rows, const tk_model_config *cfg,
                            int T)
{
    int E = cfg->n_experts, k = cfg->n_experts_used;
    for (int t = 0; t < T; t++) {
        const float *p = r->prob + (size_t)t * E;
        const int32_t *choice = r->choice + (size_t)t * k, *row = r->row + (size_t)t * k;
        double kept = 0, weighted = 0, dp[k];
        for (int s = 0; s < k; s++) {
            kept += p[choice[s]];
            weighted += (double)r->weight[row[s]] * c_rows[row[s]];
        }
        double dot = 0; /* sum_i p_i dL/dp_i over the kept experts (dL/dp is 0 elsewhere) */
        for (int s = 0; s < k; s++) {
            dp[s] = cfg->norm_topk_prob ? (c_rows[row[s]] - weighted) / kept : c_rows[row[s]];
            dot += p[choice[s]] * dp[s];
        }
        float *out = dz + (size_t)t * E;
        for (int e = 0; e < E; e++) out[e] = (float)(-p[e] * dot);
        for (int s = 0; s < k; s++) out[choice[s]] = (float)(p[choice[s]] * (dp[s] - dot));
    }
}

/* The rows of expert e whose tokens lie in [t0, t1): [*a, *b) (rows are in token order within an expert). */
static void expert_rows_in(const tk_moe_routing *r, int e, int t0, int t1, int *a, int *b)
{
    int j = r->expert_start[e], end = r->expert_start[e + 1];
    while (j < end && r->token[j] < t0) j++;
    *a = j;
    while (j < end && r->token[j] < t1) j++;
    *b = j;
}

/* ---- row movement ---------------------------------------------------------------------------------------- */

/* dst_rows[j] = src[token(j)] for the rows j in [a, b) (ldd / lds: row strides in floats) */
static void gather_rows(const tk_moe_pass *p, float *dst_rows, int ldd, const float *src, int lds, int a, int b,
                        int n)
{
    tk_moe_scratch *s = p->s;
    for (int j = a; j < b; j++) {
        s->dst[j - a] = dst_rows + (size_t)j * ldd;
        s->src[j - a] = src + (size_t)s->r.token[j] * lds;
    }
    if (b > a) p->be->copy_rows(p->be, s->dst, s->src, b - a, n);
}

/* dst[token(j)] += w_j src_rows[j] (weight NULL: 1) for the rows j in [a, b) */
static void scatter_add_rows(const tk_moe_pass *p, float *dst, int ldd, const float *src_rows, int lds,
                             const float *weight, int a, int b, int n)
{
    tk_moe_scratch *s = p->s;
    for (int j = a; j < b; j++) {
        s->dst[j - a] = dst + (size_t)s->r.token[j] * ldd;
        s->src[j - a] = src_rows + (size_t)j * lds;
    }
    if (b > a) p->be->add_rows(p->be, s->dst, s->src, weight ? weight + a : NULL, b - a, n);
}

/* ---- LoRA on the experts, per adapter segment (tokens [t0, t1)) ------------------------------------------------- */

static const tk_lora_pair *pair(const tk_adapter *ad, int layer, int target) { return tk_lora_at(ad, layer, target); }

typedef void (*nt_fn)(tk_backend *, float *, int, const float *, int, const float *, int, int, int, float, float);

/* The LoRA matmul for this pass: a decoding step's rows through the decode kernel. */
static nt_fn nt_of(const tk_moe_pass *p) { return p->decode ? p->be->matmul_nt_decode : p->be->matmul_nt; }

/* gate|up rows += the adapter's terms: u = s h [A_gate; A_up]^T per token, gathered, times each expert's B. */
static void lora_gate_up_forward(const tk_moe_pass *p, const tk_adapter *ad, int layer, int t0, int t1,
                                 const float *h, float *gate_up, float *u, int ldu)
{
    const tk_lora_pair *g = pair(ad, layer, TK_LORA_EXP_GATE), *up = pair(ad, layer, TK_LORA_EXP_UP);
    if (!g->A) return;
    tk_backend *be = p->be;
    const tk_model_config *c = &p->m->cfg;
    int D = c->d_model, Fe = c->d_ff_expert, R = ad->cfg.rank, Rm = tk_batch_max_rank(p->b);
    float *u13 = u + (size_t)t0 * ldu + (size_t)TK_LORA_EXP_GATE * R; /* [rows, 2R]: the A's of gate, up adjoin */
    nt_of(p)(be, u13, ldu, h + (size_t)t0 * D, D, g->A, t1 - t0, 2 * R, D, ad->scale, 0.0f);
    for (int e = 0; e < c->n_experts; e++) {
        int a, b;
        expert_rows_in(&p->s->r, e, t0, t1, &a, &b);
        if (a == b) continue;
        float *rows_u = p->s->u_rows + (size_t)a * 2 * Rm;
        gather_rows(p, p->s->u_rows, 2 * Rm, u + (size_t)TK_LORA_EXP_GATE * R, ldu, a, b, 2 * R);
        nt_of(p)(be, gate_up + (size_t)a * 2 * Fe, 2 * Fe, rows_u, 2 * Rm, g->B + (size_t)e * Fe * R, b - a,
                      Fe, R, 1.0f, 1.0f);
        nt_of(p)(be, gate_up + (size_t)a * 2 * Fe + Fe, 2 * Fe, rows_u + R, 2 * Rm, up->B + (size_t)e * Fe * R,
                      b - a, Fe, R, 1.0f, 1.0f);
    }
}

/* x += the adapter's down terms: v_j = s act_j A_e^T, zd_t = sum_j w_j v_j (kept in u), x += zd B^T. */
static void lora_down_forward(const tk_moe_pass *p, const tk_adapter *ad, int layer, int t0, int t1, float *x,
                              float *u, int ldu)
{
    const tk_lora_pair *d = pair(ad, layer, TK_LORA_EXP_DOWN);
    if (!d->A) return;
    tk_backend *be = p->be;
    const tk_model_config *c = &p->m->cfg;
    int D = c->d_model, Fe = c->d_ff_expert, R = ad->cfg.rank, Rm = tk_batch_max_rank(p->b);
    float *zd = u + (size_t)TK_LORA_EXP_DOWN * R; /* [T, R] at row stride ldu */
    be->zero_rows(be, zd + (size_t)t0 * ldu, ldu, t1 - t0, R);
    for (int e = 0; e < c->n_experts; e++) {
        int a, b;
        expert_rows_in(&p->s->r, e, t0, t1, &a, &b);
        if (a == b) continue;
        nt_of(p)(be, p->s->v + (size_t)a * Rm, Rm, p->s->act + (size_t)a * Fe, Fe, d->A + (size_t)e * R * Fe,
                      b - a, R, Fe, ad->scale, 0.0f);
        scatter_add_rows(p, zd, ldu, p->s->v, Rm, p->s->r.weight, a, b, R);
    }
    nt_of(p)(be, x + (size_t)t0 * D, D, zd + (size_t)t0 * ldu, ldu, d->B, t1 - t0, D, R, 1.0f, 1.0f);
}

/* The down terms' backward, first half: dB += dy^T zd; q = dy B per token, gathered to the rows (s->v), and
 * each row's a_j += s q_j A_e (the LoRA part of dL/d act_j before the gate weight). */
static void lora_down_backward_input(const tk_moe_pass *p, const tk_adapter *ad, int layer, int t0, int t1,
                                     const float *dy, const float *u, int ldu)
{
    const tk_lora_pair *d = pair(ad, layer, TK_LORA_EXP_DOWN);
    if (!d->A) return;
    tk_backend *be = p->be;
    const tk_model_config *c = &p->m->cfg;
    int D = c->d_model, Fe = c->d_ff_expert, R = ad->cfg.rank, Rm = tk_batch_max_rank(p->b);
    const float *zd = u + (size_t)TK_LORA_EXP_DOWN * R;
    float *q = p->s->q;
    be->matmul_tn_acc(be, tk_adapter_slot(ad, d->B, 1), R, dy + (size_t)t0 * D, D, zd + (size_t)t0 * ldu, ldu,
                      t1 - t0, D, R, 1.0f);
    be->matmul_nn(be, q + (size_t)t0 * Rm, Rm, dy + (size_t)t0 * D, D, d->B, R, t1 - t0, R, D, 1.0f, 0.0f);
    for (int e = 0; e < c->n_experts; e++) {
        int a, b;
        expert_rows_in(&p->s->r, e, t0, t1, &a, &b);
        if (a == b) continue;
        gather_rows(p, p->s->v, Rm, q, Rm, a, b, R);
        be->matmul_nn(be, p->s->dact + (size_t)a * Fe, Fe, p->s->v + (size_t)a * Rm, Rm, d->A + (size_t)e * R * Fe,
                      Fe, b - a, Fe, R, ad->scale, 1.0f);
    }
}

/* Second half, once the gate weights' gradients are known: dA_e += s sum_j (w_j q_j)^T act_j. */
static void lora_down_backward_weights(const tk_moe_pass *p, const tk_adapter *ad, int layer, int t0, int t1)
{
    const tk_lora_pair *d = pair(ad, layer, TK_LORA_EXP_DOWN);
    if (!d->A) return;
    tk_backend *be = p->be;
    const tk_model_config *c = &p->m->cfg;
    int Fe = c->d_ff_expert, R = ad->cfg.rank, Rm = tk_batch_max_rank(p->b);
    for (int e = 0; e < c->n_experts; e++) {
        int a, b;
        expert_rows_in(&p->s->r, e, t0, t1, &a, &b);
        if (a == b) continue;
        float *wq = p->s->v + (size_t)a * Rm;
        be->scale_rows(be, wq, Rm, p->s->r.weight + a, b - a, R);
        be->matmul_tn_acc(be, tk_adapter_slot(ad, d->A + (size_t)e * R * Fe, 1), Fe, wq, Rm,
                          p->s->act + (size_t)a * Fe, Fe, b - a, R, Fe, ad->scale);
    }
}

/* gate|up terms' backward: dB_e += dgu_e^T u_rows; du_t = sum_j [dgate_j B_gate,e | dup_j B_up,e];
 * dA += s du^T h; dh += s du [A_gate; A_up]. */
static void lora_gate_up_backward(const tk_moe_pass *p, const tk_adapter *ad, int layer, int t0, int t1,
                                  const float *h, float *dh, const float *u, int ldu)
{
    const tk_lora_pair *g = pair(ad, layer, TK_LORA_EXP_GATE), *up = pair(ad, layer, TK_LORA_EXP_UP);
    if (!g->A) return;
    tk_backend *be = p->be;
    const tk_model_config *c = &p->m->cfg;
    int D = c->d_model, Fe = c->d_ff_expert, R = ad->cfg.rank, Rm = tk_batch_max_rank(p->b);
    tk_moe_scratch *s = p->s;
    float *du = s->du; /* [T, 2R] at row stride 2 Rm */
    be->zero_rows(be, du + (size_t)t0 * 2 * Rm, 2 * Rm, t1 - t0, 2 * R);
    for (int e = 0; e < c->n_experts; e++) {
        int a, b;
        expert_rows_in(&s->r, e, t0, t1, &a, &b);
        if (a == b) continue;
        const float *dgate = s->dgate_up + (size_t)a * 2 * Fe, *dup = dgate + Fe;
        const float *rows_u = s->u_rows + (size_t)a * 2 * Rm;
        float *rows_du = s->du_rows + (size_t)a * 2 * Rm;
        const float *Bg = g->B + (size_t)e * Fe * R, *Bu = up->B + (size_t)e * Fe * R;
        gather_rows(p, s->u_rows, 2 * Rm, u + (size_t)TK_LORA_EXP_GATE * R, ldu, a, b, 2 * R);
        be->matmul_tn_acc(be, tk_adapter_slot(ad, Bg, 1), R, dgate, 2 * Fe, rows_u, 2 * Rm, b - a, Fe, R, 1.0f);
        be->matmul_tn_acc(be, tk_adapter_slot(ad, Bu, 1), R, dup, 2 * Fe, rows_u + R, 2 * Rm, b - a, Fe, R, 1.0f);
        be->matmul_nn(be, rows_du, 2 * Rm, dgate, 2 * Fe, Bg, R, b - a, R, Fe, 1.0f, 0.0f);
        be->matmul_nn(be, rows_du + R, 2 * Rm, dup, 2 * Fe, Bu, R, b - a, R, Fe, 1.0f, 0.0f);
        scatter_add_rows(p, du, 2 * Rm, s->du_rows, 2 * Rm, NULL, a, b, 2 * R);
    }
    const float *du0 = du + (size_t)t0 * 2 * Rm;
    be->matmul_tn_acc(be, tk_adapter_slot(ad, g->A, 1), D, du0, 2 * Rm, h + (size_t)t0 * D, D, t1 - t0, 2 * R, D,
                      ad->scale);
    be->matmul_nn(be, dh + (size_t)t0 * D, D, du0, 2 * Rm, g->A, D, t1 - t0, D, 2 * R, ad->scale, 1.0f);
}

/* ---- the block ------------------------------------------------------------------------------------------- */

typedef void (*project_fn)(tk_backend *, float *, int, const float *, int, const tk_weight *, int, float, float);

static project_fn projection(const tk_moe_pass *p) { return p->decode ? p->be->matmul_w_decode : p->be->matmul_w; }

/* The routing of this pass's tokens from the router logits [T, E] (device). */
static void route_pass(const tk_moe_pass *p, const float *logits)
{
    const tk_model_config *c = &p->m->cfg;
    int T = p->b->n_tokens;
    const float *z = tk_host_view(p->be, p->s->logits_host, logits, (size_t)T * c->n_experts * sizeof(float));
    route(&p->s->r, z, c, T);
}

/* Row of the batch's expert_tokens for `layer`: its index among the MoE layers. */
static int moe_layer_index(const tk_model *m, int layer)
{
    int i = 0;
    for (int l = 0; l < layer; l++) i += m->w.layers[l].moe != 0;
    return i;
}

/* The batch's expert_tokens row of `layer` += the tokens routed to each expert (the routing's group sizes). */
static void count_routed(const tk_moe_pass *p, int layer)
{
    int64_t *row = p->b->expert_tokens;
    if (!row) return;
    int E = p->m->cfg.n_experts;
    row += (size_t)moe_layer_index(p->m, layer) * E;
    for (int e = 0; e < E; e++) row[e] += p->s->r.expert_start[e + 1] - p->s->r.expert_start[e];
}

void tk_moe_forward(const tk_moe_pass *p, int layer, float *x, const float *h, float *logits, float *gate_up,
                    float *u, int ldu)
{
    const tk_model_config *c = &p->m->cfg;
    const tk_layer_weights *L = &p->m->w.layers[layer];
    tk_backend *be = p->be;
    tk_moe_scratch *s = p->s;
    const int T = p->b->n_tokens, D = c->d_model, E = c->n_experts, Fe = c->d_ff_expert;
    const int n = T * c->n_experts_used;
    project_fn project = projection(p);

    project(be, logits, E, h, D, &L->router, T, 1.0f, 0.0f);
    route_pass(p, logits);
    count_routed(p, layer);
    gather_rows(p, s->rows, D, h, D, 0, n, D);
    /* gate|up of each expert's rows through its own weights (all experts in one call) */
    be->matmul_w_grouped(be, gate_up, 2 * Fe, s->rows, D, L->expert_gate_up, s->r.expert_start, E, 1.0f, 0.0f,
                         p->decode);
    FOR_EACH_ADAPTER_SEGMENT(p->b, ad, t0, t1, { lora_gate_up_forward(p, ad, layer, t0, t1, h, gate_up, u, ldu); })
    be->swiglu(be, s->act, gate_up, n, Fe);
    /* the experts' outputs f, over the sorted inputs (no longer needed) */
    be->matmul_w_grouped(be, s->rows, D, s->act, Fe, L->expert_down, s->r.expert_start, E, 1.0f, 0.0f, p->decode);
    scatter_add_rows(p, x, D, s->rows, D, s->r.weight, 0, n, D);
    FOR_EACH_ADAPTER_SEGMENT(p->b, ad, t0, t1, { lora_down_forward(p, ad, layer, t0, t1, x, u, ldu); })
}

void tk_moe_backward(const tk_moe_pass *p, int layer, float *dh, const float *dy, const float *h,
                     const float *logits, const float *gate_up, const float *u, int ldu)
{
    const tk_model_config *c = &p->m->cfg;
    const tk_layer_weights *L = &p->m->w.layers[layer];
    tk_backend *be = p->be;
    tk_moe_scratch *s = p->s;
    const int T = p->b->n_tokens, D = c->d_model, E = c->n_experts, Fe = c->d_ff_expert;
    const int n = T * c->n_experts_used;

    route_pass(p, logits);
    /* a_j = dy_t Wd_e (+ the LoRA part): dL/d act_j before the gate weight, in s->dact */
    gather_rows(p, s->rows, D, dy, D, 0, n, D);
    be->matmul_w_t_grouped(be, s->dact, Fe, s->rows, D, L->expert_down, s->r.expert_start, E, 1.0f, 0.0f);
    FOR_EACH_ADAPTER_SEGMENT(p->b, ad, t0, t1, { lora_down_backward_input(p, ad, layer, t0, t1, dy, u, ldu); })

    /* the gate weights' gradients c_j = <a_j, act_j>, and through the router to its logits */
    be->swiglu(be, s->act, gate_up, n, Fe);
    be->row_dot(be, s->c, s->dact, Fe, s->act, Fe, n, Fe);
    const float *c_rows = tk_host_view(be, s->c_host, s->c, (size_t)n * sizeof(float));
    float *dz = be->host_memory ? s->dz : s->dz_host;
    router_backward(dz, &s->r, c_rows, c, T);
    if (!be->host_memory) be->upload(be, s->dz, dz, (size_t)T * E * sizeof(float));

    /* through the experts: dact = w a, swiglu, then gate|up */
    be->scale_rows(be, s->dact, Fe, s->r.weight, n, Fe);
    FOR_EACH_ADAPTER_SEGMENT(p->b, ad, t0, t1, { lora_down_backward_weights(p, ad, layer, t0, t1); })
    be->swiglu_backward(be, s->dgate_up, s->dact, gate_up, n, Fe);
    be->matmul_w_t(be, dh, D, s->dz, E, &L->router, T, 1.0f, 0.0f);
    be->matmul_w_t_grouped(be, s->rows, D, s->dgate_up, 2 * Fe, L->expert_gate_up, s->r.expert_start, E, 1.0f,
                           0.0f);
    scatter_add_rows(p, dh, D, s->rows, D, NULL, 0, n, D);
    FOR_EACH_ADAPTER_SEGMENT(p->b, ad, t0, t1, { lora_gate_up_backward(p, ad, layer, t0, t1, h, dh, u, ldu); })
}
