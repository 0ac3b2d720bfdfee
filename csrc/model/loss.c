/* loss.c - Tinker's five losses, one target at a time (see loss.h). */
#include "loss.h"

#include <math.h>

/* torch.clamp's gradient passes where lo <= x <= hi */
static float clamp(float x, float lo, float hi) { return x < lo ? lo : x > hi ? hi : x; }

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

