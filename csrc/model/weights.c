/* weights.c - loading a model's weights into one float32 block.
 *
 * The Python loader names every tensor it found (GGUF or safetensors) with a
 * role and a layer; this file checks each one against the config (shape, type,
 * byte count, extent inside its file), maps the files read-only and
 * dequantizes all tensors in parallel straight from the maps into the block.
 * Missing, duplicated or misshapen tensors are reported with the file and
 * tensor name. Nothing is read whole into memory.
 *
 * The same pass copies the blocks of every projection (and of the lm_head)
 * whose sources are all one of the types the decoding kernel reads (Q4_0,
 * Q4_1, Q8_0) into a second, quantized block, row by row in the same order as
 * the float copy (fused q|k|v and gate|up, GGUF q/k rows un-permuted).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/pool.h"
#include "../io/file.h"
#include "../io/quant.h"
#include "weights.h"

enum role {
    R_EMBED, R_FINAL_NORM, R_LM_HEAD, R_ROPE_FREQS, /* model-wide */
    R_ATTN_NORM, R_Q, R_K, R_V, R_O, R_Q_BIAS, R_K_BIAS, R_V_BIAS, R_Q_NORM, R_K_NORM,
    R_MLP_NORM, R_GATE, R_UP, R_DOWN, R_COUNT,
    R_FIRST_LAYER_ROLE = R_ATTN_NORM,
};

static const char *const role_names[R_COUNT] = {
    "embed", "final_norm", "lm_head", "rope_freqs", "attn_norm", "q", "k", "v", "o",
    "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "mlp_norm", "gate", "up", "down",
};

static int role_from_name(const char *name)
{
    for (int r = 0; r < R_COUNT; r++)
        if (strcmp(role_names[r], name) == 0) return r;
    return -1;
}

/* What the config asks of a role: its shape, whether this configuration uses
 * it at all and whether it must be present. */
typedef struct {
    int used, required, n_dims;
    int64_t shape[2];
} slot;

static slot slot_for(const tk_model_config *c, int role)
{
    int64_t D = c->d_model, Dh = c->head_dim, F = c->d_ff, V = c->vocab_size;
    int64_t q_rows = (int64_t)c->n_heads * Dh, kv_rows = (int64_t)c->n_kv_heads * Dh;
    slot s = {1, 1, 1, {0, 1}};
#define SHAPE1(a) (s.n_dims = 1, s.shape[0] = (a), s.shape[1] = 1)
#define SHAPE2(a, b) (s.n_dims = 2, s.shape[0] = (a), s.shape[1] = (b))
    switch (role) {
    case R_EMBED: SHAPE2(V, D); break;
    case R_FINAL_NORM: SHAPE1(D); break;
    case R_LM_HEAD: s.used = s.required = !c->tied_embeddings; SHAPE2(V, D); break;
    case R_ROPE_FREQS: s.required = 0; SHAPE1(Dh / 2); break;
    case R_ATTN_NORM: case R_MLP_NORM: SHAPE1(D); break;
    case R_Q: SHAPE2(q_rows, D); break;
    case R_K: case R_V: SHAPE2(kv_rows, D); break;
    case R_O: SHAPE2(D, q_rows); break;
    case R_Q_BIAS: s.used = s.required = c->qkv_bias; SHAPE1(q_rows); break;
    case R_K_BIAS: case R_V_BIAS: s.used = s.required = c->qkv_bias; SHAPE1(kv_rows); break;
    case R_Q_NORM: case R_K_NORM: s.used = s.required = c->qk_norm; SHAPE1(Dh); break;
    case R_GATE: case R_UP: SHAPE2(F, D); break;
    case R_DOWN: SHAPE2(D, F); break;
    }
#undef SHAPE1
#undef SHAPE2
    return s;
}

/* Where a role's tensor goes in the block (after allocate()). */
static float *slot_dst(tk_model *m, int role, int layer)
{
    const tk_model_config *c = &m->cfg;
    size_t D = (size_t)c->d_model, F = (size_t)c->d_ff;
    size_t q_rows = (size_t)c->n_heads * c->head_dim, kv_rows = (size_t)c->n_kv_heads * c->head_dim;
    tk_layer_weights *L = layer >= 0 ? &m->w.layers[layer] : NULL;
    switch (role) {
    case R_EMBED: return m->w.embed;
    case R_FINAL_NORM: return m->w.final_norm;
    case R_LM_HEAD: return m->w.lm_head;
    case R_ROPE_FREQS: return m->w.rope_inv_freq;
    case R_ATTN_NORM: return L->attn_norm;
    case R_Q: return L->wqkv;
    case R_K: return L->wqkv + q_rows * D;
    case R_V: return L->wqkv + (q_rows + kv_rows) * D;
    case R_O: return L->wo;
    case R_Q_BIAS: return L->bqkv;
    case R_K_BIAS: return L->bqkv + q_rows;
    case R_V_BIAS: return L->bqkv + q_rows + kv_rows;
    case R_Q_NORM: return L->q_norm;
    case R_K_NORM: return L->k_norm;
    case R_MLP_NORM: return L->mlp_norm;
    case R_GATE: return L->w_gate_up;
    case R_UP: return L->w_gate_up + F * D;
    case R_DOWN: return L->w_down;
    }
    return NULL;
}

/* ---- quantized copies ------------------------------------------------------ */

/* The matrices that may get a quantized copy, numbered: layer l's are l * Q_PER_LAYER + Q_QKV ... Q_DOWN,
 * and the lm_head comes last, at n_layers * Q_PER_LAYER. */
enum { Q_QKV, Q_O, Q_GATE_UP, Q_DOWN, Q_PER_LAYER };

static int n_quantized(const tk_model_config *c) { return c->n_layers * Q_PER_LAYER + 1; }

/* Which quantized matrix a source's rows go to (-1: none), and from which of its rows. The tied
 * embedding is the lm_head; an untied embedding is only looked up, as float32. */
static int quantized_index(const tk_model_config *c, int role, int layer, size_t *first_row)
{
    size_t q_rows = (size_t)c->n_heads * c->head_dim, kv_rows = (size_t)c->n_kv_heads * c->head_dim;
    int at = layer * Q_PER_LAYER, head = c->n_layers * Q_PER_LAYER;
    *first_row = 0;
    switch (role) {
    case R_Q: return at + Q_QKV;
    case R_K: *first_row = q_rows; return at + Q_QKV;
    case R_V: *first_row = q_rows + kv_rows; return at + Q_QKV;
    case R_O: return at + Q_O;
    case R_GATE: return at + Q_GATE_UP;
    case R_UP: *first_row = (size_t)c->d_ff; return at + Q_GATE_UP;
    case R_DOWN: return at + Q_DOWN;
    case R_EMBED: return c->tied_embeddings ? head : -1;
    case R_LM_HEAD: return head;
    default: return -1;
    }
}

static tk_qmatrix *quantized_at(tk_model *m, int i)
{
    if (i == n_quantized(&m->cfg) - 1) return &m->w.lm_head_q;
    tk_layer_weights *L = &m->w.layers[i / Q_PER_LAYER];
    tk_qmatrix *by_target[Q_PER_LAYER] = {&L->wqkv_q, &L->wo_q, &L->w_gate_up_q, &L->w_down_q};
    return by_target[i % Q_PER_LAYER];
}

/* [rows, cols] of quantized matrix i */
static void quantized_shape(const tk_model_config *c, int i, int *rows, int *cols)
{
    int D = c->d_model, q_rows = c->n_heads * c->head_dim;
    if (i == n_quantized(c) - 1) {
        *rows = c->vocab_size, *cols = D;
        return;
    }
    switch (i % Q_PER_LAYER) {
    case Q_QKV: *rows = tk_model_qkv_rows(c), *cols = D; break;
    case Q_O: *rows = D, *cols = q_rows; break;
    case Q_GATE_UP: *rows = 2 * c->d_ff, *cols = D; break;
    default: *rows = D, *cols = c->d_ff; break; /* down */
    }
}

/* ---- the size table and the one allocation ---------------------------- */

static size_t padded(size_t n) { return (n + 15) & ~(size_t)15; } /* 64-byte aligned carving */

/* Walks the layout; with base == NULL it only counts floats. */
static size_t carve(tk_model *m, float *base)
{
    const tk_model_config *c = &m->cfg;
    size_t D = (size_t)c->d_model, Dh = (size_t)c->head_dim, F = (size_t)c->d_ff, V = (size_t)c->vocab_size;
    size_t qkv = (size_t)tk_model_qkv_rows(c), q_rows = (size_t)c->n_heads * Dh;
    size_t at = 0;
#define TAKE(ptr, n)                                   \
    do {                                               \
        if (base) (ptr) = base + at;                   \
        at += padded(n);                               \
    } while (0)
    TAKE(m->w.embed, V * D);
    TAKE(m->w.final_norm, D);
    if (c->tied_embeddings) {
        if (base) m->w.lm_head = m->w.embed;
    } else {
        TAKE(m->w.lm_head, V * D);
    }
    TAKE(m->w.rope_inv_freq, Dh / 2);
    for (int l = 0; l < c->n_layers; l++) {
        tk_layer_weights dummy, *L = base ? &m->w.layers[l] : &dummy;
        TAKE(L->attn_norm, D);
        TAKE(L->wqkv, qkv * D);
        if (c->qkv_bias) TAKE(L->bqkv, qkv); else if (base) L->bqkv = NULL;
        if (c->qk_norm) {
            TAKE(L->q_norm, Dh);
            TAKE(L->k_norm, Dh);
        } else if (base) {
            L->q_norm = L->k_norm = NULL;
        }
        TAKE(L->wo, D * q_rows);
        TAKE(L->mlp_norm, D);
        TAKE(L->w_gate_up, 2 * F * D);
        TAKE(L->w_down, D * F);
    }
#undef TAKE
    return at;
}

static tk_status allocate(tk_model *m)
{
    m->w.layers = calloc((size_t)m->cfg.n_layers, sizeof *m->w.layers);
    size_t n = carve(m, NULL);
    /* size_t products: a 7B model has > 2^31 floats */
    m->w.block = m->w.layers ? aligned_alloc(64, n * sizeof(float)) : NULL;
    if (!m->w.block)
        return tk_error(TK_ERR_NOMEM, "cannot allocate %.1f MB for the model weights",
                        (double)n * sizeof(float) / 1e6);
    m->w.block_floats = n;
    carve(m, m->w.block);
    return TK_OK;
}

/* ---- checking the sources ----------------------------------------------- */

typedef struct {
    const tk_tensor_source *src;
    int role;
    const uint8_t *bytes;   /* in the map */
    float *dst;             /* set once the block is allocated */
    size_t rows, row_elems, row_bytes;
    int head_dim;           /* for un-permuting GGUF q/k rows */
    tk_qmatrix *qdst;       /* the quantized copy the rows also go to, or NULL */
    size_t qrow0;           /* ... starting at this row of it */
} convert_job;

static tk_status shape_error(const char *path, const tk_tensor_source *s, slot sl)
{
    char got[64], want[64];
    if (s->n_dims == 1) snprintf(got, sizeof got, "[%lld]", (long long)s->shape[0]);
    else snprintf(got, sizeof got, "[%lld, %lld]", (long long)s->shape[0], (long long)s->shape[1]);
    if (sl.n_dims == 1) snprintf(want, sizeof want, "[%lld]", (long long)sl.shape[0]);
    else snprintf(want, sizeof want, "[%lld, %lld]", (long long)sl.shape[0], (long long)sl.shape[1]);
    return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' has shape %s, but the config needs %s", path, s->name, got, want);
}

/* Validates one source against the config and its file; fills the job
 * (except dst). Nothing is allocated yet, so a bad file fails fast. */
static tk_status check_source(convert_job *job, const tk_model_config *c, const tk_tensor_source *s,
                              const tk_mapped_file *files, int n_files, unsigned char *filled)
{
    if (s->file < 0 || s->file >= n_files)
        return tk_error(TK_ERR_INVALID, "tensor '%s': file index %d out of range", s->name, s->file);
    const char *path = files[s->file].path;
    int role = role_from_name(s->role);
    if (role < 0) return tk_error(TK_ERR_INVALID, "%s: tensor '%s': unknown role '%s'", path, s->name, s->role);
    int per_layer = role >= R_FIRST_LAYER_ROLE;
    if (per_layer ? (s->layer < 0 || s->layer >= c->n_layers) : s->layer != -1)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' is for layer %d, but the config has %d layers", path,
                        s->name, s->layer, c->n_layers);
    slot sl = slot_for(c, role);
    if (!sl.used)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' (%s) is not used by this configuration (check the config: "
                        "tied embeddings, qkv bias, q/k norm)", path, s->name, s->role);
    unsigned char *flag = &filled[(size_t)(s->layer + 1) * R_COUNT + (size_t)role];
    if (*flag) return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' supplies %s of layer %d a second time", path,
                               s->name, s->role, s->layer);
    *flag = 1;
    int64_t got2 = s->n_dims == 2 ? s->shape[1] : 1;
    if (s->n_dims != sl.n_dims || s->shape[0] != sl.shape[0] || got2 != sl.shape[1]) return shape_error(path, s, sl);
    if (!tk_quant_is_supported(s->type))
        return tk_error(TK_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s (ggml id %u), which this engine cannot "
                        "decode; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K",
                        path, s->name, tk_quant_type_name(s->type), (unsigned)s->type);
    size_t row_elems = (size_t)(sl.n_dims == 2 ? sl.shape[1] : 1), rows = (size_t)sl.shape[0];
    if (sl.n_dims == 1 && !s->rope_rows_interleaved) { row_elems = (size_t)sl.shape[0]; rows = 1; }
    size_t row_bytes = tk_quant_row_bytes(s->type, row_elems);
    if (row_bytes == 0)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' of type %s has rows of %zu elements, not a multiple of "
                        "its block size %d", path, s->name, tk_quant_type_name(s->type), row_elems,
                        tk_quant_block_elems(s->type));
    if (s->nbytes != row_bytes * rows)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' has %llu bytes, but shape and type %s need %zu", path,
                        s->name, (unsigned long long)s->nbytes, tk_quant_type_name(s->type), row_bytes * rows);
    if (s->offset > files[s->file].size || s->nbytes > files[s->file].size - s->offset)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' (%llu bytes at byte %llu) lies past the end of the file "
                        "(%zu bytes); the file is truncated or its header is wrong", path, s->name,
                        (unsigned long long)s->nbytes, (unsigned long long)s->offset, files[s->file].size);
    if (s->rope_rows_interleaved && rows % (size_t)c->head_dim != 0)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' cannot be un-permuted with head dim %d", path, s->name,
                        c->head_dim);
    job->src = s;
    job->role = role;
    job->bytes = files[s->file].data + s->offset;
    job->rows = rows;
    job->row_elems = row_elems;
    job->row_bytes = row_bytes;
    job->head_dim = s->rope_rows_interleaved ? c->head_dim : 0;
    return TK_OK;
}

static tk_status check_complete(const tk_model_config *c, const unsigned char *filled, const char *path)
{
    for (int layer = -1; layer < c->n_layers; layer++) {
        int first = layer < 0 ? 0 : R_FIRST_LAYER_ROLE, last = layer < 0 ? R_FIRST_LAYER_ROLE : R_COUNT;
        for (int r = first; r < last; r++) {
            if (!slot_for(c, r).required || filled[(size_t)(layer + 1) * R_COUNT + (size_t)r]) continue;
            if (layer < 0) return tk_error(TK_ERR_FORMAT, "%s: the model files have no %s tensor", path, role_names[r]);
            return tk_error(TK_ERR_FORMAT, "%s: the model files have no %s tensor for layer %d", path, role_names[r],
                            layer);
        }
    }
    return TK_OK;
}

/* ---- conversion ---------------------------------------------------------- */

/* GGUF llama stores the rotate_half partners (i, i + Dh/2) of each head as
 * adjacent rows (2i, 2i+1): destination row h*Dh + t*Dh/2 + i comes from
 * source row h*Dh + 2i + t. */
static size_t source_row(size_t row, int head_dim)
{
    if (!head_dim) return row;
    size_t hd = (size_t)head_dim, half = hd / 2, within = row % hd;
    return row - within + 2 * (within % half) + within / half;
}

static void convert_task(void *ctx, int task, int thread)
{
    (void)thread;
    convert_job *job = &((convert_job *)ctx)[task];
    for (size_t r = 0; r < job->rows; r++) {
        const uint8_t *row = job->bytes + source_row(r, job->head_dim) * job->row_bytes;
        tk_dequantize(job->dst + r * job->row_elems, row, job->src->type, job->row_elems);
        if (job->qdst) tk_qmatrix_put_row(job->qdst, (int)(job->qrow0 + r), row);
    }
}

/* types[i]: the type every source of quantized matrix i has, or -1 when they differ or one has a type the
 * kernel cannot read (then that matrix gets no quantized copy). */
static int *quantized_types(const tk_model_config *c, const convert_job *jobs, int n_jobs)
{
    int n = n_quantized(c), *types = malloc((size_t)n * sizeof *types);
    enum { UNSEEN = -2 };
    for (int i = 0; types && i < n; i++) types[i] = UNSEEN;
    for (int j = 0; types && j < n_jobs; j++) {
        size_t first_row;
        int i = quantized_index(c, jobs[j].role, jobs[j].src->layer, &first_row), type = (int)jobs[j].src->type;
        if (i < 0) continue;
        types[i] = tk_qmatrix_supports(type) && (types[i] == UNSEEN || types[i] == type) ? type : -1;
    }
    return types;
}

/* Walks the quantized matrices of the given types; with base == NULL it only counts bytes. */
static size_t carve_quantized(tk_model *m, const int *types, uint8_t *base)
{
    size_t at = 0;
    for (int i = 0; i < n_quantized(&m->cfg); i++) {
        int rows, cols;
        if (types[i] < 0) continue;
        quantized_shape(&m->cfg, i, &rows, &cols);
        if (base) *quantized_at(m, i) = (tk_qmatrix){types[i], rows, cols, base + at};
        at += (tk_qmatrix_bytes(types[i], rows, cols) + 63) & ~(size_t)63;
    }
    return at;
}

/* Allocates the quantized copies the sources allow and points the jobs at them. Optional: without the
 * memory the model still works (decoding then reads the float32 weights), so failures are not errors. */
static void plan_quantized(tk_model *m, convert_job *jobs, int n_jobs)
{
    int *types = quantized_types(&m->cfg, jobs, n_jobs);
    size_t bytes = types ? carve_quantized(m, types, NULL) : 0;
    m->w.qblock = bytes ? aligned_alloc(64, bytes) : NULL;
    if (m->w.qblock) {
        memset(m->w.qblock, 0, bytes); /* the padding rows of each last row group decode to 0 */
        m->w.qblock_bytes = bytes;
        carve_quantized(m, types, m->w.qblock);
        for (int j = 0; j < n_jobs; j++) {
            int i = quantized_index(&m->cfg, jobs[j].role, jobs[j].src->layer, &jobs[j].qrow0);
            jobs[j].qdst = i >= 0 && quantized_at(m, i)->tiles ? quantized_at(m, i) : NULL;
        }
    }
    free(types);
}

/* HF's default inverse frequencies, then its rope_scaling rules; a GGUF
 * rope_freqs tensor (already loaded into the slot) divides them instead. */
static void compute_rope(tk_model *m, int have_rope_freqs)
{
    const tk_model_config *c = &m->cfg;
    int half = c->head_dim / 2;
    float *inv = m->w.rope_inv_freq;
    for (int i = 0; i < half; i++) {
        float base = (float)(1.0 / pow((double)c->rope_theta, (double)(2 * i) / (double)c->head_dim));
        if (have_rope_freqs) {
            inv[i] = base / inv[i];
            continue;
        }
        if (c->rope_scaling == TK_ROPE_LINEAR) {
            base /= c->rope_factor;
        } else if (c->rope_scaling == TK_ROPE_LLAMA3) {
            double low_wavelen = c->rope_original_context / c->rope_low_freq_factor;
            double high_wavelen = c->rope_original_context / c->rope_high_freq_factor;
            double wavelen = 2.0 * 3.14159265358979323846 / base;
            if (wavelen > low_wavelen) {
                base = base / c->rope_factor;
            } else if (wavelen >= high_wavelen) {
                float smooth = (float)((c->rope_original_context / wavelen - c->rope_low_freq_factor) /
                                       (c->rope_high_freq_factor - c->rope_low_freq_factor));
                base = (1.0f - smooth) * base / c->rope_factor + smooth * base;
            }
        }
        inv[i] = base;
    }
}

/* Maps the files, checks every source, then allocates the block and converts
 * all tensors in parallel; the maps are released before returning. */
static tk_status load_sources(tk_model *m, const char *const *paths, int n_paths, const tk_tensor_source *src,
                              int n_src, tk_pool *pool)
{
    tk_status s = TK_OK;
    tk_mapped_file *files = calloc((size_t)(n_paths ? n_paths : 1), sizeof *files);
    convert_job *jobs = calloc((size_t)(n_src ? n_src : 1), sizeof *jobs);
    unsigned char *filled = calloc((size_t)(m->cfg.n_layers + 1) * R_COUNT, 1);
    if (!files || !jobs || !filled) {
        s = tk_error(TK_ERR_NOMEM, "out of memory loading the model");
        goto done;
    }
    if (n_paths < 1) {
        s = tk_error(TK_ERR_INVALID, "no model files given");
        goto done;
    }
    for (int f = 0; f < n_paths && s == TK_OK; f++) s = tk_file_map(&files[f], paths[f]);
    for (int i = 0; i < n_src && s == TK_OK; i++) s = check_source(&jobs[i], &m->cfg, &src[i], files, n_paths, filled);
    if (s == TK_OK) s = check_complete(&m->cfg, filled, paths[0]);
    if (s == TK_OK) s = allocate(m);
    if (s == TK_OK) {
        for (int i = 0; i < n_src; i++) jobs[i].dst = slot_dst(m, jobs[i].role, jobs[i].src->layer);
        plan_quantized(m, jobs, n_src);
        tk_pool_run(pool, n_src, convert_task, jobs);
        compute_rope(m, filled[R_ROPE_FREQS]);
    }
done:
    for (int f = 0; files && f < n_paths; f++) tk_file_unmap(&files[f]);
    free(files);
    free(jobs);
    free(filled);
    return s;
}

tk_status tk_weights_load(tk_model **out, const tk_model_config *cfg, const char *const *paths, int n_paths,
                          const tk_tensor_source *src, int n_src, tk_pool *pool)
{
    *out = NULL;
    TK_TRY(tk_model_config_check(cfg));
    tk_model *m = calloc(1, sizeof *m);
    if (!m) return tk_error(TK_ERR_NOMEM, "out of memory");
    m->cfg = *cfg;
    atomic_init(&m->refcount, 1);
    tk_status s = load_sources(m, paths, n_paths, src, n_src, pool);
    if (s != TK_OK) {
        tk_model_release(m);
        return s;
    }
    *out = m;
    return TK_OK;
}

/* ---- config and lifetime ------------------------------------------------ */

int tk_model_qkv_rows(const tk_model_config *c) { return (c->n_heads + 2 * c->n_kv_heads) * c->head_dim; }

tk_status tk_model_config_check(const tk_model_config *c)
{
#define POSITIVE(field)                                                                      \
    if (c->field <= 0) return tk_error(TK_ERR_INVALID, "model config: " #field " is %d, expected > 0", c->field)
    POSITIVE(n_layers); POSITIVE(d_model); POSITIVE(n_heads); POSITIVE(n_kv_heads); POSITIVE(head_dim);
    POSITIVE(d_ff); POSITIVE(vocab_size); POSITIVE(max_context);
#undef POSITIVE
    if (c->n_heads % c->n_kv_heads != 0)
        return tk_error(TK_ERR_INVALID, "model config: %d query heads are not a multiple of %d kv heads",
                        c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0)
        return tk_error(TK_ERR_INVALID, "model config: head_dim %d is odd; RoPE needs an even head dim", c->head_dim);
    if (!(c->rms_eps > 0) || !(c->rope_theta > 0) || !isfinite(c->rope_theta))
        return tk_error(TK_ERR_INVALID, "model config: rms_eps and rope_theta must be positive");
    if (c->rope_scaling == TK_ROPE_LINEAR && !(c->rope_factor > 0))
        return tk_error(TK_ERR_INVALID, "model config: linear rope scaling needs factor > 0");
    if (c->rope_scaling == TK_ROPE_LLAMA3 &&
        !(c->rope_factor > 0 && c->rope_low_freq_factor > 0 &&
          c->rope_high_freq_factor > c->rope_low_freq_factor && c->rope_original_context > 0))
        return tk_error(TK_ERR_INVALID, "model config: llama3 rope scaling needs factor > 0, "
                        "0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0");
    if (c->rope_scaling < TK_ROPE_NONE || c->rope_scaling > TK_ROPE_LLAMA3)
        return tk_error(TK_ERR_INVALID, "model config: unknown rope scaling %d", c->rope_scaling);
    return TK_OK;
}

tk_status tk_model_set_vocab_bytes(tk_model *m, const uint32_t *offsets, const char *bytes, int n_tokens)
{
    if (n_tokens != m->cfg.vocab_size)
        return tk_error(TK_ERR_INVALID, "token byte table has %d tokens, the model %d", n_tokens, m->cfg.vocab_size);
    for (int t = 0; t < n_tokens; t++)
        if (offsets[t + 1] < offsets[t] || offsets[t + 1] - offsets[t] > TK_MAX_TOKEN_BYTES)
            return tk_error(TK_ERR_INVALID, "token %d: its bytes must have a length from 0 to %d", t,
                            TK_MAX_TOKEN_BYTES);
    tk_vocab_bytes *v = calloc(1, sizeof *v);
    if (v) v->offsets = malloc(((size_t)n_tokens + 1) * sizeof *v->offsets);
    if (v && v->offsets) v->bytes = malloc((size_t)offsets[n_tokens] + 1);
    if (!v || !v->offsets || !v->bytes) {
        if (v) free(v->offsets);
        free(v);
        return tk_error(TK_ERR_NOMEM, "out of memory");
    }
    memcpy(v->offsets, offsets, ((size_t)n_tokens + 1) * sizeof *offsets);
    memcpy(v->bytes, bytes, offsets[n_tokens]);
    tk_vocab_bytes *expected = NULL;
    if (!atomic_compare_exchange_strong(&m->vocab, &expected, v)) { /* someone set it first */
        free(v->offsets);
        free(v->bytes);
        free(v);
    }
    return TK_OK;
}

void tk_model_retain(tk_model *m) { atomic_fetch_add(&m->refcount, 1); }

void tk_model_release(tk_model *m)
{
    if (!m || atomic_fetch_sub(&m->refcount, 1) != 1) return;
    tk_vocab_bytes *v = atomic_load(&m->vocab);
    if (v) {
        free(v->offsets);
        free(v->bytes);
        free(v);
    }
    free(m->w.block);
    free(m->w.qblock);
    free(m->w.layers);
    free(m);
}
