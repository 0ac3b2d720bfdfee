/* loss.c - the output projection, log-probabilities and losses (see loss.h).
 *
 * The vocabulary is large (49k for SmolLM2) and logits for a 1k-token batch
 * would take 200 MB, so the head runs in chunks of 256 tokens (50 MB): logits, their
 * log-sum-exp, the targets' log-probs and loss, and for training at once
 * dL/dlogits = sum_k g_k (onehot(t_k) - softmax) in place, its product with
 * the output matrix (dh) and the unembed LoRA gradients.
 */
#include "loss.h"

#include <math.h>

enum { HEAD_CHUNK = 256 };

typedef struct {
    float *logits; /* [C, V] */
    float *lse;    /* [C] */
    float *gsum;   /* [C] sum over a token's targets of dL/dlp */
    float *u;      /* [C, R] scale * h A^T of the unembed LoRA */
    float *t;      /* [C, R] */
} head_scratch;

static size_t carve(head_scratch *s, float *work, const tk_model *m, const tk_adapter *ad)
{
    size_t C = HEAD_CHUNK, R = ad && ad->unembed.A ? (size_t)ad->cfg.rank : 1, at = 0;
#define TAKE(ptr, n)                     \
    do {                                 \
        if (work) (ptr) = work + at;     \
        at += ((n) + 15) & ~(size_t)15;  \
    } while (0)
    head_scratch dummy;
    if (!s) s = &dummy;
    TAKE(s->logits, C * (size_t)m->cfg.vocab_size);
    TAKE(s->lse, C);
    TAKE(s->gsum, C);
    TAKE(s->u, C * R);
    TAKE(s->t, C * R);
#undef TAKE
    return at;
}

size_t tk_head_workspace(const tk_model *m, const tk_adapter *ad) { return carve(NULL, NULL, m, ad); }

/* logits[C, V] = h W^T + u B^T, u = scale h A^T; `decoding`: W from its quantized copy when the model has one
 * and the backend's quantized kernel is faster at C rows (see tk_head_logits_decode) */
static void chunk_logits(float *logits, float *u, const tk_model *m, const tk_adapter *ad, tk_backend *be,
                         const float *h, int C, int decoding)
{
    int D = m->cfg.d_model, V = m->cfg.vocab_size;
    if (decoding && m->w.lm_head_q.tiles && be->matmul_nt_q && C <= be->matmul_nt_q_max_rows)
        be->matmul_nt_q(be, logits, V, h, D, &m->w.lm_head_q, C, 1.0f, 0.0f);
    else
        be->matmul_nt(be, logits, V, h, D, m->w.lm_head, C, V, D, 1.0f, 0.0f);
    if (ad && ad->unembed.A) {
        int R = ad->cfg.rank;
        be->matmul_nt(be, u, R, h, D, ad->unembed.A, C, R, D, ad->scale, 0.0f);
        be->matmul_nt(be, logits, V, u, R, ad->unembed.B, C, V, R, 1.0f, 1.0f);
    }
}

static void head_logits(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h,
                        int T, float *work, int decoding)
{
    head_scratch s;
    carve(&s, work, m, ad);
    int D = m->cfg.d_model, V = m->cfg.vocab_size;
    for (int t0 = 0; t0 < T; t0 += HEAD_CHUNK) {
        int C = T - t0 < HEAD_CHUNK ? T - t0 : HEAD_CHUNK;
        chunk_logits(logits + (size_t)t0 * V, s.u, m, ad, be, h + (size_t)t0 * D, C, decoding);
    }
}

void tk_head_logits(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h, int T,
                    float *work)
{
    head_logits(logits, m, ad, be, h, T, work, 0);
}

void tk_head_logits_decode(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h,
                           int T, float *work)
{
    head_logits(logits, m, ad, be, h, T, work, 1);
}

/* torch.clamp's gradient passes where lo <= x <= hi */
static float clamp(float x, float lo, float hi) { return x < lo ? lo : x > hi ? hi : x; }

/* The loss of one target and dL/dlp (see the table in loss.h). */
static double loss_term(const tk_loss_config *c, const tk_loss_inputs *in, size_t e, float lp, float *g)
{
    if (c->kind == TK_LOSS_CROSS_ENTROPY) {
        float w = in->weights[e];
        *g = -w;
        return -(double)lp * w;
    }
    float A = in->advantages[e], s = in->sampler_lp[e];
    float lo = in->clip_low ? in->clip_low[e] : c->clip_low, hi = in->clip_high ? in->clip_high[e] : c->clip_high;
    float r = expf(lp - s);
    switch (c->kind) {
    case TK_LOSS_IMPORTANCE_SAMPLING:
        *g = -r * A;
        return -(double)r * A;
    case TK_LOSS_PPO: {
        float unclipped = r * A, clipped = clamp(r, lo, hi) * A;
        float d_unclipped = r * A, d_clipped = (r >= lo && r <= hi) ? r * A : 0.0f;
        /* torch.min sends the gradient to the smaller side, half to each on a tie */
        float d = unclipped < clipped ? d_unclipped : unclipped > clipped ? d_clipped : 0.5f * (d_unclipped + d_clipped);
        *g = -d;
        return -(double)(unclipped < clipped ? unclipped : clipped);
    }
    case TK_LOSS_CISPO: {
        float w = clamp(r, lo, hi);
        *g = -w * A;
        return -(double)w * lp * A;
    }
    default: { /* dro */
        float diff = lp - s;
        *g = -(A - c->beta * diff);
        return -((double)lp * A - 0.5 * c->beta * (double)diff * diff);
    }
    }
}

void tk_head_loss(float *logprobs, double *loss, const tk_model *m, const tk_adapter *ad, tk_backend *be,
                  const float *h, int T, const tk_loss_config *cfg, const tk_loss_inputs *in, float *dh, float *work)
{
    head_scratch s;
    carve(&s, work, m, ad);
    const int D = m->cfg.d_model, V = m->cfg.vocab_size, R = ad ? ad->cfg.rank : 0;
    const int unembed = ad && ad->unembed.A;
    double total = 0;
    for (int t0 = 0; t0 < T; t0 += HEAD_CHUNK) {
        int C = T - t0 < HEAD_CHUNK ? T - t0 : HEAD_CHUNK;
        const float *hc = h + (size_t)t0 * D;
        chunk_logits(s.logits, s.u, m, ad, be, hc, C, 0);
        be->logsumexp(be, s.lse, s.logits, V, C, V);
        for (int r = 0; r < C; r++) {
            const float *row = s.logits + (size_t)r * V;
            s.gsum[r] = 0;
            for (int32_t e = in->tgt_start[t0 + r]; e < in->tgt_start[t0 + r + 1]; e++) {
                float g;
                logprobs[e] = row[in->targets[e]] - s.lse[r];
                total += loss_term(cfg, in, (size_t)e, logprobs[e], &g);
                s.gsum[r] += g;
            }
        }
        if (!dh) continue;
        /* dL/dlogits = sum_k g_k (onehot(t_k) - softmax): -gsum * softmax, then + g_k at each target */
        be->softmax_scale(be, s.logits, V, s.lse, s.gsum, C, V);
        for (int r = 0; r < C; r++)
            for (int32_t e = in->tgt_start[t0 + r]; e < in->tgt_start[t0 + r + 1]; e++) {
                float g;
                loss_term(cfg, in, (size_t)e, logprobs[e], &g);
                s.logits[(size_t)r * V + in->targets[e]] += g;
            }
        float *dhc = dh + (size_t)t0 * D;
        be->matmul_nn(be, dhc, D, s.logits, V, m->w.lm_head, D, C, D, V, 1.0f, 0.0f);
        if (unembed) {
            const tk_lora_pair *p = &ad->unembed;
            be->matmul_nn(be, s.t, R, s.logits, V, p->B, R, C, R, V, 1.0f, 0.0f);       /* t = dlogits B */
            be->matmul_nn(be, dhc, D, s.t, R, p->A, D, C, D, R, ad->scale, 1.0f);      /* dh += scale t A */
            be->matmul_tn_acc(be, tk_adapter_slot(ad, p->B, 1), R, s.logits, V, s.u, R, C, V, R, 1.0f);
            be->matmul_tn_acc(be, tk_adapter_slot(ad, p->A, 1), D, s.t, R, hc, D, C, R, D, ad->scale);
        }
    }
    *loss = total;
}
