/* sampler.c - choosing a token (see sampler.h).
 *
 * Choosing a token from a row of logits, as Hugging Face's samplers order it:
 * penalties (repetition over prompt and output, presence and frequency over
 * the output), temperature, then top_k, top_p (on the top_k-renormalised
 * distribution), min_p (relative to the most likely token), and a draw from
 * the sequence's own xoshiro256** stream, seeded from (seed, sample index) so
 * a sample does not depend on what else shares its batch. The reported
 * logprob is the token's under the penalised, temperature-scaled distribution
 * (temperature 1 when greedy). The vocabulary is never fully sorted: top_k and
 * top_p take the best candidates by partial selection first.
 */
#include "sampler.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../core/rng.h"

/* ---- random numbers --------------------------------------------------------- */

tk_rng tk_rng_for(uint64_t seed, int sample)
{
    uint64_t x = seed ^ (0xd1b54a32d192ed03ull * (uint64_t)(sample + 1));
    tk_rng r;
    for (int i = 0; i < 4; i++) r.s[i] = tk_splitmix64(&x);
    return r;
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static double uniform(tk_rng *r) /* [0, 1) */
{
    uint64_t *s = r->s, result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t, s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- choosing a token --------------------------------------------------------- */

int tk_cand_by_z_desc(const void *a, const void *b)
{
    float x = ((const tk_cand *)a)->z, y = ((const tk_cand *)b)->z;
    return x > y ? -1 : x < y ? 1 : ((const tk_cand *)a)->id - ((const tk_cand *)b)->id;
}

/* Moves the k largest of c[0..n) to the front (unordered), by quickselect. */
void tk_select_top(tk_cand *c, int n, int k)
{
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = c[(lo + hi) / 2].z;
        int i = lo, j = hi;
        while (i <= j) {
            while (c[i].z > pivot) i++;
            while (c[j].z < pivot) j--;
            if (i <= j) {
                tk_cand t = c[i];
                c[i++] = c[j];
                c[j--] = t;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* A penalised logit, kept finite: absurd but finite penalties (a repetition_penalty of 1e-40, a frequency_penalty
 * of -1e39) overflow float32, and an inf logit would make the distribution NaN. The order they impose is kept at
 * the largest finite values; 0 * inf (a zero logit times a huge repetition_penalty) is its limit, 0. */
static float saturate(float z)
{
    return z > FLT_MAX ? FLT_MAX : z < -FLT_MAX ? -FLT_MAX : z == z ? z : 0.0f;
}

static void apply_penalties(tk_chooser *ch, const tk_sample_params *p, const int32_t *prompt, int P,
                            const int32_t *out, int n_out)
{
    if (p->repetition_penalty != 1.0) { /* HF: divide positive logits, multiply negative ones, once per token */
        ch->stamp++;
        for (int pass = 0; pass < 2; pass++) {
            const int32_t *ids = pass ? out : prompt;
            int n = pass ? n_out : P;
            for (int i = 0; i < n; i++) {
                int t = ids[i];
                if (ch->seen[t] == ch->stamp) continue;
                ch->seen[t] = ch->stamp;
                ch->z[t] = saturate(ch->z[t] > 0 ? ch->z[t] / (float)p->repetition_penalty
                                                 : ch->z[t] * (float)p->repetition_penalty);
            }
        }
    }
    if (p->presence_penalty != 0.0 || p->frequency_penalty != 0.0) {
        ch->stamp++;
        for (int i = 0; i < n_out; i++) {
            int t = out[i];
            ch->z[t] = saturate(ch->z[t] - (float)p->frequency_penalty);
            if (ch->seen[t] != ch->stamp) ch->z[t] = saturate(ch->z[t] - (float)p->presence_penalty);
            ch->seen[t] = ch->stamp;
        }
    }
}

/* log sum exp z, keeping e[v] = exp(z[v] - max z): the exponentials are most of a step's sampling time (a
 * 49k vocabulary), so the draw and top_p reuse these, bit for bit the values they computed themselves. */
static double logsumexp(const float *z, double *e, int V, float *max_out, double *sum_out)
{
    float max = z[0];
    for (int v = 1; v < V; v++) max = z[v] > max ? z[v] : max;
    double sum = 0;
    for (int v = 0; v < V; v++) sum += e[v] = exp((double)(z[v] - max));
    *max_out = max;
    *sum_out = sum;
    return max + log(sum);
}

/* Draws from c[0..n) with weights e[id] = exp(z - zmax), or from all of e[0..n) when c is NULL (their sum
 * is then `total`, as logsumexp added them in the same order). */
static int draw(const tk_cand *c, const double *e, int n, double total, tk_rng *rng)
{
    if (c) {
        total = 0;
        for (int i = 0; i < n; i++) total += e[c[i].id];
    }
    double u = uniform(rng) * total, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += e[c ? c[i].id : i];
        if (u < acc) return c ? c[i].id : i;
    }
    return c ? c[n - 1].id : n - 1;
}

/* z /= temperature, in float32 as z * (1 / temperature) while that stays finite. A temperature so small that it
 * would overflow (1e-40: inf logits, a NaN distribution) scales z - max z in double instead: the most likely
 * tokens stay at 0 and the rest go to -inf, which is the limit, greedy. */
static void scale_by_temperature(float *z, int V, double temperature)
{
    double inv = 1.0 / temperature;
    if (inv <= 1.0) { /* temperature >= 1 cannot overflow: the common case skips the pass over z below */
        float inv_t = (float)inv;
        for (int v = 0; v < V; v++) z[v] *= inv_t;
        return;
    }
    float zmax = z[0], zabs = 0;
    for (int v = 0; v < V; v++) {
        zmax = z[v] > zmax ? z[v] : zmax;
        zabs = fabsf(z[v]) > zabs ? fabsf(z[v]) : zabs;
    }
    if ((double)zabs * inv <= FLT_MAX / 2) {
        float inv_t = (float)inv;
        for (int v = 0; v < V; v++) z[v] *= inv_t;
        return;
    }
    for (int v = 0; v < V; v++) z[v] = (float)(((double)z[v] - zmax) * inv);
}

int tk_choose(tk_chooser *ch, const float *logits, int V, const tk_sample_params *p, const int32_t *prompt, int P,
                  const int32_t *out, int n_out, tk_rng *rng, float *logprob)
{
    memcpy(ch->z, logits, (size_t)V * sizeof(float));
    apply_penalties(ch, p, prompt, P, out, n_out);
    float zmax;
    if (p->temperature == 0.0) {
        int best = 0;
        for (int v = 1; v < V; v++)
            if (ch->z[v] > ch->z[best]) best = v;
        double sum;
        ch->lse = logsumexp(ch->z, ch->e, V, &zmax, &sum);
        *logprob = (float)(ch->z[best] - ch->lse);
        return best;
    }
    scale_by_temperature(ch->z, V, p->temperature);
    double sum, lse = logsumexp(ch->z, ch->e, V, &zmax, &sum);
    ch->lse = lse;
    int n = 0;
    if (p->top_k <= 0 && p->top_p >= 1.0 && !(p->min_p > 0)) {
        /* plain sampling: the whole vocabulary in order, whose weights logsumexp has summed */
        int token = draw(NULL, ch->e, V, sum, rng);
        *logprob = (float)(ch->z[token] - lse);
        return token;
    }
    if (p->top_k <= 0 && p->top_p >= 1.0) {
        /* min_p only: a threshold, no sorting */
        float floor_z = p->min_p > 0 ? zmax + (float)log(p->min_p) : -INFINITY;
        for (int v = 0; v < V; v++)
            if (ch->z[v] >= floor_z) ch->c[n++] = (tk_cand){ch->z[v], v};
    } else {
        for (int v = 0; v < V; v++) ch->c[v] = (tk_cand){ch->z[v], v};
        n = V;
        int k = p->top_k > 0 && p->top_k < V ? p->top_k : V;
        int first = k < 1024 ? k : 1024; /* top_p rarely needs more: widen if it does */
        for (;;) {
            tk_select_top(ch->c, n, first);
            qsort(ch->c, (size_t)first, sizeof *ch->c, tk_cand_by_z_desc);
            if (p->top_p >= 1.0) { n = first; break; }
            /* top_p over the top_k-renormalised distribution */
            double norm = 0, acc = 0;
            if (k < V) {
                for (int i = 0; i < k; i++) norm += ch->e[ch->c[i].id];
            } else {
                norm = exp(lse - zmax);
            }
            int keep = 0;
            while (keep < first && acc < p->top_p * norm) acc += ch->e[ch->c[keep++].id];
            if (acc >= p->top_p * norm || first == k) { n = keep > 0 ? keep : 1; break; }
            first = k; /* the best 1024 did not reach top_p: sort everything allowed */
        }
        if (p->min_p > 0) {
            float floor_z = ch->c[0].z + (float)log(p->min_p);
            int keep = 0;
            while (keep < n && ch->c[keep].z >= floor_z) keep++;
            n = keep > 0 ? keep : 1;
        }
    }
    int token = draw(ch->c, ch->e, n, 0.0, rng);
    *logprob = (float)(ch->z[token] - lse);
    return token;
}


void tk_chooser_topk(tk_chooser *ch, int V, int k, int32_t *ids, float *logprobs)
{
    if (k > V) k = V;
    for (int v = 0; v < V; v++) ch->c[v] = (tk_cand){ch->z[v], v};
    tk_select_top(ch->c, V, k);
    qsort(ch->c, (size_t)k, sizeof *ch->c, tk_cand_by_z_desc);
    for (int j = 0; j < k; j++) {
        ids[j] = ch->c[j].id;
        logprobs[j] = (float)(ch->c[j].z - ch->lse);
    }
}
