/* head.c - the output projection: logits, log-probabilities and the loss's backward (see head.h).
 *
 * The vocabulary is large (49k for SmolLM2) and logits for a 1k-token batch
 * would take 200 MB, so the head runs in chunks of 256 tokens (50 MB): logits, their
 * log-sum-exp, the targets' log-probs and loss, and for training at once
 * dL/dlogits = sum_k g_k (onehot(t_k) - softmax) in place, its product with
 * the output matrix (dh) and the unembed LoRA gradients.
 */
#include "head.h"

#include <math.h>

#include "../core/arena.h"

enum { HEAD_CHUNK = 256, HEAD_TARGETS = 1024 /* targets gathered or scattered per op */ };

typedef struct {
    /* device */
    float *logits; /* [C, V] */
    float *lse;    /* [C] */
    float *gsum;   /* [C] sum over a token's targets of dL/dlp */
    float *u;      /* [C, R] scale * h A^T of the unembed LoRA */
    float *t;      /* [C, R] */
    float *picked; /* [HEAD_TARGETS] the targets' logits, then their dL/dlp */
    /* host */
    float *lse_h, *gsum_h, *picked_h;
    int32_t *rows; /* [HEAD_TARGETS] each target's row in the chunk */
} head_scratch;

static tk_workspace carve(head_scratch *s, float *work, float *host, const tk_model *m, const tk_adapter *ad)
{
    size_t C = HEAD_CHUNK, R = ad && ad->unembed.A ? (size_t)ad->cfg.rank : 1;
    tk_arenas a = {{work, 0}, {host, 0}};
    head_scratch dummy;
    if (!s) s = &dummy;
    s->logits = tk_arena_take(&a.dev, C * (size_t)m->cfg.vocab_size);
    s->lse = tk_arena_take(&a.dev, C);
    s->gsum = tk_arena_take(&a.dev, C);
    s->u = tk_arena_take(&a.dev, C * R);
    s->t = tk_arena_take(&a.dev, C * R);
    s->picked = tk_arena_take(&a.dev, HEAD_TARGETS);
    s->lse_h = tk_arena_take(&a.host, C);
    s->gsum_h = tk_arena_take(&a.host, C);
    s->picked_h = tk_arena_take(&a.host, HEAD_TARGETS);
    s->rows = (int32_t *)tk_arena_take(&a.host, HEAD_TARGETS);
    return tk_arenas_used(&a);
}

tk_workspace tk_head_workspace(const tk_model *m, const tk_adapter *ad) { return carve(NULL, NULL, NULL, m, ad); }

/* Runs of rows per pair of matmul_nt_many calls. */
enum { LORA_RUNS = 32 };

/* logits[C, V] = h W^T + u B^T, u = scale h A^T [C, R], where row r's adapter is ads[r] (ads NULL: ad for every
 * row); the base product runs once for all rows, the LoRA terms of all runs of rows with one adapter as one
 * call for the A's and one for the B's. `decoding`: C rows of a decoding step (matmul_w_decode, the decode
 * kernels of matmul_nt_many). */
static void chunk_logits(float *logits, float *u, const tk_model *m, const tk_adapter *const *ads,
                         const tk_adapter *ad, tk_backend *be, const float *h, int C, int decoding)
{
    int D = m->cfg.d_model, V = m->cfg.vocab_size, R_u = ad ? ad->cfg.rank : 0;
    (decoding ? be->matmul_w_decode : be->matmul_w)(be, logits, V, h, D, &m->w.lm_head, C, 1.0f, 0.0f);
    tk_nt_job a_jobs[LORA_RUNS], b_jobs[LORA_RUNS];
    int n = 0;
    for (int r0 = 0, r1; r0 < C; r0 = r1) {
        const tk_adapter *a = ads ? ads[r0] : ad;
        for (r1 = r0 + 1; r1 < C && (ads ? ads[r1] : ad) == a;) r1++;
        if (a && a->unembed.A) {
            int R = a->cfg.rank;
            float *ur = u + (size_t)r0 * R_u;
            a_jobs[n] = (tk_nt_job){ur, h + (size_t)r0 * D, a->unembed.A, R_u, D, r1 - r0, R, D, a->scale, 0.0f};
            b_jobs[n++] = (tk_nt_job){logits + (size_t)r0 * V, ur, a->unembed.B, V, R_u, r1 - r0, V, R, 1.0f, 1.0f};
        }
        if (n == LORA_RUNS || (r1 == C && n)) {
            be->matmul_nt_many(be, a_jobs, n, decoding);
            be->matmul_nt_many(be, b_jobs, n, decoding);
            n = 0;
        }
    }
}

static void head_logits(float *logits, const tk_model *m, const tk_adapter *const *ads, const tk_adapter *ad,
                        tk_backend *be, const float *h, int T, float *work, int decoding)
{
    head_scratch s;
    carve(&s, work, NULL, m, ad); /* the device part alone */
    int D = m->cfg.d_model, V = m->cfg.vocab_size;
    for (int t0 = 0; t0 < T; t0 += HEAD_CHUNK) {
        int C = T - t0 < HEAD_CHUNK ? T - t0 : HEAD_CHUNK;
        chunk_logits(logits + (size_t)t0 * V, s.u, m, ads ? ads + t0 : NULL, ad, be, h + (size_t)t0 * D, C,
                     decoding);
    }
}

void tk_head_logits(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h, int T,
                    float *work)
{
    head_logits(logits, m, NULL, ad, be, h, T, work, 0);
}

void tk_head_logits_decode(float *logits, const tk_model *m, const tk_adapter *ad, tk_backend *be, const float *h,
                           int T, float *work)
{
    head_logits(logits, m, NULL, ad, be, h, T, work, 1);
}

void tk_head_logits_decode_rows(float *logits, const tk_model *m, const tk_adapter *const *ads,
                                const tk_adapter *widest, tk_backend *be, const float *h, int T, float *work)
{
    head_logits(logits, m, ads, widest, be, h, T, work, 1);
}

/* Targets [e0, e1) of a chunk whose first token is t0, at most HEAD_TARGETS: their rows in the chunk. */
static void target_rows(int32_t *rows, const tk_loss_inputs *in, int t0, int C, int32_t e0, int32_t e1)
{
    for (int r = 0; r < C; r++)
        for (int32_t e = in->tgt_start[t0 + r] > e0 ? in->tgt_start[t0 + r] : e0;
             e < in->tgt_start[t0 + r + 1] && e < e1; e++)
            rows[e - e0] = r;
}

/* Logits and log-sum-exp of the chunk of C tokens at t0 (left in s), and logprobs[e] of its targets;
 * returns the host view of the chunk's lse [C]. */
static const float *chunk_logprobs(head_scratch *s, float *logprobs, const tk_model *m, const tk_adapter *ad,
                                   tk_backend *be, const float *h, int t0, int C, const tk_loss_inputs *in)
{
    const int D = m->cfg.d_model, V = m->cfg.vocab_size;
    int32_t first = in->tgt_start[t0], last = in->tgt_start[t0 + C];
    chunk_logits(s->logits, s->u, m, NULL, ad, be, h + (size_t)t0 * D, C, 0);
    be->logsumexp(be, s->lse, s->logits, V, C, V);
    const float *lse = tk_host_view(be, s->lse_h, s->lse, (size_t)C * sizeof(float));
    for (int32_t e0 = first; e0 < last; e0 += HEAD_TARGETS) {
        int32_t e1 = last - e0 < HEAD_TARGETS ? last : e0 + HEAD_TARGETS;
        target_rows(s->rows, in, t0, C, e0, e1);
        be->gather(be, s->picked, s->logits, V, s->rows, in->targets + e0, e1 - e0);
        const float *picked = tk_host_view(be, s->picked_h, s->picked, (size_t)(e1 - e0) * sizeof(float));
        for (int32_t e = e0; e < e1; e++) logprobs[e] = picked[e - e0] - lse[s->rows[e - e0]];
    }
    return lse;
}

/* Sequence-level losses (gspo) need every logprob of a datum before its first term: one pass of the
 * head for the logprobs alone, then the datums' ratios. Forward-only needs no second pass. */
static double sequence_prepass(head_scratch *s, float *logprobs, const tk_model *m, const tk_adapter *ad,
                               tk_backend *be, const float *h, int T, const tk_loss_config *cfg,
                               const tk_loss_inputs *in, int backward)
{
    for (int t0 = 0; t0 < T; t0 += HEAD_CHUNK)
        chunk_logprobs(s, logprobs, m, ad, be, h, t0, T - t0 < HEAD_CHUNK ? T - t0 : HEAD_CHUNK, in);
    tk_loss_sequence_ratios(in, logprobs);
    double total = 0;
    if (!backward)
        for (int32_t e = 0; e < in->tgt_start[T]; e++) {
            float g;
            total += tk_loss_term(cfg, in, (size_t)e, logprobs[e], &g);
        }
    return total;
}

void tk_head_loss(float *logprobs, double *loss, const tk_model *m, const tk_adapter *ad, tk_backend *be,
                  const float *h, int T, const tk_loss_config *cfg, const tk_loss_inputs *in, float *dh, float *work,
                  float *host)
{
    head_scratch s;
    carve(&s, work, host, m, ad);
    const int D = m->cfg.d_model, V = m->cfg.vocab_size, R = ad ? ad->cfg.rank : 0;
    const int unembed = ad && ad->unembed.A;
    double total = 0;
    if (tk_loss_is_sequence_level(cfg)) {
        total = sequence_prepass(&s, logprobs, m, ad, be, h, T, cfg, in, dh != NULL);
        if (!dh) {
            *loss = total;
            return;
        }
    }
    for (int t0 = 0; t0 < T; t0 += HEAD_CHUNK) {
        int C = T - t0 < HEAD_CHUNK ? T - t0 : HEAD_CHUNK;
        int32_t first = in->tgt_start[t0], last = in->tgt_start[t0 + C];
        const float *hc = h + (size_t)t0 * D;
        /* lp = logits[target] - lse, then the loss and dL/dlp of every target */
        chunk_logprobs(&s, logprobs, m, ad, be, h, t0, C, in);
        for (int r = 0; r < C; r++) s.gsum_h[r] = 0;
        for (int32_t e0 = first; e0 < last; e0 += HEAD_TARGETS) {
            int32_t e1 = last - e0 < HEAD_TARGETS ? last : e0 + HEAD_TARGETS;
            target_rows(s.rows, in, t0, C, e0, e1);
            for (int32_t e = e0; e < e1; e++) {
                float g;
                total += tk_loss_term(cfg, in, (size_t)e, logprobs[e], &g);
                s.gsum_h[s.rows[e - e0]] += g;
            }
        }
        if (!dh) continue;
        /* dL/dlogits = sum_k g_k (onehot(t_k) - softmax): -gsum * softmax, then + g_k at each target */
        be->upload(be, s.gsum, s.gsum_h, (size_t)C * sizeof(float));
        be->softmax_scale(be, s.logits, V, s.lse, s.gsum, C, V);
        for (int32_t e0 = first; e0 < last; e0 += HEAD_TARGETS) {
            int32_t e1 = last - e0 < HEAD_TARGETS ? last : e0 + HEAD_TARGETS;
            target_rows(s.rows, in, t0, C, e0, e1);
            for (int32_t e = e0; e < e1; e++) tk_loss_term(cfg, in, (size_t)e, logprobs[e], &s.picked_h[e - e0]);
            be->upload(be, s.picked, s.picked_h, (size_t)(e1 - e0) * sizeof(float));
            be->scatter_add(be, s.logits, V, s.rows, in->targets + e0, s.picked, e1 - e0);
        }
        float *dhc = dh + (size_t)t0 * D;
        be->matmul_w_t(be, dhc, D, s.logits, V, &m->w.lm_head, C, 1.0f, 0.0f);
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
