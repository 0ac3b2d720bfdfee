/* loss.h - Tinker's built-in losses.
 *
 * Position t of a sequence predicts its targets (one, or K per position):
 * lp = logits[target] - logsumexp(logits). Losses are sums over targets and
 * datums, never means (tinker-api.md §6.6), with dL/dlp:
 *   cross_entropy        -w lp                               -w
 *   importance_sampling  -r A,  r = exp(lp - s)              -r A
 *   ppo                  -min(r A, clamp(r, lo, hi) A)        torch's min/clamp subgradients
 *   cispo                -sg(clamp(r, lo, hi)) lp A          -clamp(r, lo, hi) A
 *   dro                  -(lp A - beta/2 (lp - s)^2)         -(A - beta (lp - s))
 *   gspo                 ppo's form with the ratio rs = exp(L + lp - sg(lp)), whose value is the
 *                        sequence ratio exp(L), L = mean of sg(lp) - s over the datum's targets that
 *                        sequence_ratio_mask marks (GSPO-token), and whose dr/dlp is exp(L)
 *   stable_reinforce     -r A as importance_sampling (its stabilising terms are not public)
 */
#ifndef TK_LOSS_H
#define TK_LOSS_H

#include <stddef.h>
#include <stdint.h>

enum tk_loss_kind { TK_LOSS_CROSS_ENTROPY, TK_LOSS_IMPORTANCE_SAMPLING, TK_LOSS_PPO, TK_LOSS_CISPO, TK_LOSS_DRO,
                    TK_LOSS_GSPO, TK_LOSS_STABLE_REINFORCE, TK_LOSS_COUNT };

typedef struct {
    int kind;
    float clip_low, clip_high; /* ppo, cispo, gspo */
    float beta;                /* dro */
} tk_loss_config;

/* Per token t, targets [tgt_start[t], tgt_start[t+1]); the float arrays are
 * per target. Arrays a loss does not use may be NULL. */
typedef struct {
    const int32_t *tgt_start;  /* [T + 1] */
    const int32_t *targets;    /* [E] */
    const float *weights;      /* [E] cross_entropy */
    const float *advantages;   /* [E] the RL losses */
    const float *sampler_lp;   /* [E] the RL losses */
    const float *clip_low;     /* [E] per-target overrides of the config, or NULL */
    const float *clip_high;
    /* gspo: the sequence ratio couples a datum's targets */
    const float *ratio_mask;   /* [E] nonzero: the target counts in its datum's sequence ratio */
    const int32_t *seq_tgt;    /* [n_seqs + 1] datum i's targets are [seq_tgt[i], seq_tgt[i+1]) */
    int n_seqs;
    float *seq_log_ratio;      /* [E] scratch: each target's datum log-ratio L, filled by tk_loss_sequence_ratios */
} tk_loss_inputs;

/* Whether the loss of a target depends on the other targets of its datum (gspo):
 * every logprob must be known before any term is computed. */
int tk_loss_is_sequence_level(const tk_loss_config *c);

/* gspo: L of every datum from all its targets' logprobs[E], written to in->seq_log_ratio. */
void tk_loss_sequence_ratios(const tk_loss_inputs *in, const float *logprobs);

/* The loss of target e (log-probability lp) and dL/dlp into *g. */
double tk_loss_term(const tk_loss_config *c, const tk_loss_inputs *in, size_t e, float lp, float *g);

#endif
