/* transformer.c - the decoder-only transformer forward pass, as a recipe.
 *
 * One function reads top to bottom like the math of Llama / Qwen2 / Qwen3
 * (Hugging Face semantics, float32 throughout): embeddings, then per layer
 * x += o(attn(rope(norm(x)))) and x += down(silu(gate(norm(x))) * up(norm(x))),
 * a final norm and the output projection. Architecture deltas are flags in
 * the config: q/k/v biases (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3),
 * tied embeddings. All ops go through the backend table.
 */
#include "transformer.h"

#include <math.h>
#include <string.h>

/* The activations of one forward pass, carved from `work`. */
typedef struct {
    float *x;        /* [T, D] residual stream */
    float *h;        /* [T, D] normed input of a block */
    float *qkv;      /* [T, (H + 2 Hkv) Dh] q | k | v per row */
    float *att;      /* [T, H Dh] attention output before o */
    float *gate_up;  /* [T, 2F] */
    float *act;      /* [T, F] */
    float *cos, *sin;/* [T, Dh/2] rotation of each row's position */
    float *attn_work;
} activations;

static int max_seq_len(const tk_batch *b)
{
    int max = 0;
    for (int s = 0; s < b->n_seqs; s++)
        if (b->seq_start[s + 1] - b->seq_start[s] > max) max = b->seq_start[s + 1] - b->seq_start[s];
    return max;
}

static size_t carve(activations *a, float *work, const tk_model *m, tk_backend *be, const tk_batch *b)
{
    const tk_model_config *c = &m->cfg;
    size_t T = (size_t)b->n_tokens, at = 0;
#define TAKE(ptr, n)                   \
    do {                               \
        if (work) (ptr) = work + at;   \
        at += ((n) + 15) & ~(size_t)15;\
    } while (0)
    activations dummy;
    if (!a) a = &dummy;
    TAKE(a->x, T * c->d_model);
    TAKE(a->h, T * c->d_model);
    TAKE(a->qkv, T * (size_t)tk_model_qkv_rows(c));
    TAKE(a->att, T * c->n_heads * c->head_dim);
    TAKE(a->gate_up, T * 2 * c->d_ff);
    TAKE(a->act, T * c->d_ff);
    TAKE(a->cos, T * (c->head_dim / 2));
    TAKE(a->sin, T * (c->head_dim / 2));
    TAKE(a->attn_work, be->attention_workspace(be, max_seq_len(b)));
#undef TAKE
    return at;
}

size_t tk_forward_workspace_floats(const tk_model *m, tk_backend *be, const tk_batch *batch)
{
    return carve(NULL, NULL, m, be, batch);
}

/* cos/sin of position * inv_freq for every row; positions restart at 0 in each
 * sequence. The angle is rounded to float32 first, as HF computes it. */
static void rope_tables(float *cos_t, float *sin_t, const tk_model *m, const tk_batch *b)
{
    int half = m->cfg.head_dim / 2;
    for (int s = 0; s < b->n_seqs; s++)
        for (int t = b->seq_start[s]; t < b->seq_start[s + 1]; t++) {
            float pos = (float)(t - b->seq_start[s]);
            for (int i = 0; i < half; i++) {
                float angle = pos * m->w.rope_inv_freq[i];
                cos_t[(size_t)t * half + i] = cosf(angle);
                sin_t[(size_t)t * half + i] = sinf(angle);
            }
        }
}

void tk_transformer_forward(float *logits, const tk_model *m, tk_backend *be, const tk_batch *b, float *work)
{
    const tk_model_config *c = &m->cfg;
    const int T = b->n_tokens, D = c->d_model, H = c->n_heads, Hkv = c->n_kv_heads, Dh = c->head_dim;
    const int F = c->d_ff, QKV = tk_model_qkv_rows(c);
    activations a = {0};
    carve(&a, work, m, be, b);
    float *q = a.qkv, *k = a.qkv + H * Dh, *v = a.qkv + (H + Hkv) * Dh; /* column slices, row stride QKV */

    be->embed(be, a.x, m->w.embed, b->tokens, T, D);
    rope_tables(a.cos, a.sin, m, b);

    for (int l = 0; l < c->n_layers; l++) {
        const tk_layer_weights *L = &m->w.layers[l];

        /* attention block: x += o(attention(rope(q), rope(k), v)) */
        be->rmsnorm(be, a.h, D, a.x, D, L->attn_norm, T, D, c->rms_eps);
        be->matmul_nt(be, a.qkv, QKV, a.h, D, L->wqkv, T, QKV, D, 0.0f);
        if (L->bqkv) be->add_bias(be, a.qkv, QKV, L->bqkv, T, QKV);
        if (c->qk_norm) { /* Qwen3: RMSNorm over each head's Dh, before RoPE */
            for (int h = 0; h < H; h++) be->rmsnorm(be, q + h * Dh, QKV, q + h * Dh, QKV, L->q_norm, T, Dh, c->rms_eps);
            for (int h = 0; h < Hkv; h++) be->rmsnorm(be, k + h * Dh, QKV, k + h * Dh, QKV, L->k_norm, T, Dh, c->rms_eps);
        }
        be->rope(be, q, QKV, T, H, Dh, a.cos, a.sin);
        be->rope(be, k, QKV, T, Hkv, Dh, a.cos, a.sin);
        be->attention(be, a.att, H * Dh, q, k, v, QKV, b->seq_start, b->n_seqs, H, Hkv, Dh, a.attn_work);
        be->matmul_nt(be, a.x, D, a.att, H * Dh, L->wo, T, D, H * Dh, 1.0f);

        /* MLP block: x += down(silu(gate(h)) * up(h)) */
        be->rmsnorm(be, a.h, D, a.x, D, L->mlp_norm, T, D, c->rms_eps);
        be->matmul_nt(be, a.gate_up, 2 * F, a.h, D, L->w_gate_up, T, 2 * F, D, 0.0f);
        be->swiglu(be, a.act, a.gate_up, T, F);
        be->matmul_nt(be, a.x, D, a.act, F, L->w_down, T, D, F, 1.0f);
    }

    be->rmsnorm(be, a.h, D, a.x, D, m->w.final_norm, T, D, c->rms_eps);
    be->matmul_nt(be, logits, c->vocab_size, a.h, D, m->w.lm_head, T, c->vocab_size, D, 0.0f);
}
