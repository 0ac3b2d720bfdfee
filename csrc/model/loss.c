/* loss.c - Tinker's built-in losses, one target at a time (see loss.h). */
#include "loss.h"

#include <math.h>

/* torch.clamp's gradient passes where lo <= x <= hi */
static float clamp(float x, float lo, float hi) { return x < lo ? lo : x > hi ? hi : x; }

/* -min(r A, clamp(r, lo, hi) A) for a ratio of value r whose derivative in lp is dr (ppo: r, gspo: the
 * sequence ratio); *g = dL/dlp. torch.min sends the gradient to the smaller side, half to each on a tie. */
static double clipped_surrogate(float r, float dr, float A, float lo, float hi, float *g)
{
    float unclipped = r * A, clipped = clamp(r, lo, hi) * A;
    float d_unclipped = dr * A, d_clipped = (r >= lo && r <= hi) ? dr * A : 0.0f;
    float d = unclipped < clipped ? d_unclipped : unclipped > clipped ? d_clipped : 0.5f * (d_unclipped + d_clipped);
    *g = -d;
    return -(double)(unclipped < clipped ? unclipped : clipped);
}

int tk_loss_is_sequence_level(const tk_loss_config *c) { return c->kind == TK_LOSS_GSPO; }

void tk_loss_sequence_ratios(const tk_loss_inputs *in, const float *logprobs)
{
    for (int i = 0; i < in->n_seqs; i++) {
        double sum = 0;
        long n = 0;
        for (int32_t e = in->seq_tgt[i]; e < in->seq_tgt[i + 1]; e++)
            if (in->ratio_mask[e] != 0.0f) {
                sum += (double)logprobs[e] - in->sampler_lp[e];
                n++;
            }
        /* the request checks that every datum marks at least one target */
        float L = n ? (float)(sum / (double)n) : 0.0f;
        for (int32_t e = in->seq_tgt[i]; e < in->seq_tgt[i + 1]; e++) in->seq_log_ratio[e] = L;
    }
}

/* The loss of one target and dL/dlp (see the table in loss.h). */
double tk_loss_term(const tk_loss_config *c, const tk_loss_inputs *in, size_t e, float lp, float *g)
{
    if (c->kind == TK_LOSS_CROSS_ENTROPY) {
        float w = in->weights[e];
        *g = -w;
        return -(double)lp * w;
    }
    float A = in->advantages[e], s = in->sampler_lp[e];
    float lo = in->clip_low ? in->clip_low[e] : c->clip_low, hi = in->clip_high ? in->clip_high[e] : c->clip_high;
    switch (c->kind) {
    case TK_LOSS_IMPORTANCE_SAMPLING:
    case TK_LOSS_STABLE_REINFORCE: {
        float r = expf(lp - s);
        *g = -r * A;
        return -(double)r * A;
    }
    case TK_LOSS_PPO: {
        float r = expf(lp - s);
        return clipped_surrogate(r, r, A, lo, hi, g);
    }
    case TK_LOSS_GSPO: {
        float r = expf(in->seq_log_ratio[e]);
        return clipped_surrogate(r, r, A, lo, hi, g);
    }
    case TK_LOSS_CISPO: {
        float w = clamp(expf(lp - s), lo, hi);
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
