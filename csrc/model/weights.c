/* weights.c - loading a model's weights, each kept in its file's format.
 *
 * The Python loader names every tensor it found (GGUF or safetensors) with a
 * role and a layer; this file checks each one against the config (shape, type,
 * byte count, extent inside its file; the roles an architecture has, their
 * shapes and when a configuration uses them come from its descriptor, arch.h),
 * maps the files read-only and moves the tensors in parallel straight from the
 * maps: matrices into tk_weight handles whose resident form the backend chooses
 * (one allocation for all of them, the file's own bytes, no float32 copy),
 * vectors (norms, biases) decoded to float32 into one small block. GGUF llama
 * q/k rows are un-permuted on the way. Expert tensors arrive as one slice per
 * expert (the Python loader cuts GGUF's and transformers' 3-D tensors), and
 * each expert gets its own handles, views of the same file bytes. A slice
 * stored transposed (Qwen3-VL-MoE's fused [E, in, out] experts) is gathered
 * column by column, a tile of rows at a time, into the handle's rows. Missing, duplicated or misshapen tensors
 * are reported with the file and tensor name. Nothing is read whole into memory.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/arena.h"
#include "../core/pool.h"
#include "../io/file.h"
#include "../io/quant.h"
#include "arch.h"
#include "generate.h"
#include "prefix_cache.h"
#include "vision.h"
#include "weights.h"

/* The roles (arch.h) by their short names in this file. */
enum {
    R_EMBED = TK_ROLE_EMBED, R_FINAL_NORM = TK_ROLE_FINAL_NORM, R_LM_HEAD = TK_ROLE_LM_HEAD,
    R_ROPE_FREQS = TK_ROLE_ROPE_FREQS, R_ATTN_NORM = TK_ROLE_ATTN_NORM, R_Q = TK_ROLE_Q, R_K = TK_ROLE_K,
    R_V = TK_ROLE_V, R_O = TK_ROLE_O, R_Q_BIAS = TK_ROLE_Q_BIAS, R_K_BIAS = TK_ROLE_K_BIAS, R_V_BIAS = TK_ROLE_V_BIAS,
    R_Q_NORM = TK_ROLE_Q_NORM, R_K_NORM = TK_ROLE_K_NORM, R_MLP_NORM = TK_ROLE_MLP_NORM, R_GATE = TK_ROLE_GATE,
    R_UP = TK_ROLE_UP, R_DOWN = TK_ROLE_DOWN, R_ROUTER = TK_ROLE_ROUTER, R_EXP_GATE = TK_ROLE_EXP_GATE,
    R_EXP_UP = TK_ROLE_EXP_UP, R_EXP_DOWN = TK_ROLE_EXP_DOWN, R_COUNT = TK_ROLE_COUNT,
};

/* ---- where each tensor goes ------------------------------------------------ */

/* Vectors (norms, biases, RoPE frequencies) are decoded to float32 into one small block; matrices become
 * tk_weight handles in their file's type. A matrix role's rows start at *row0 of its handle: q, k and v
 * stack into one [(H + 2 Hkv) Dh, D] weight and gate, up into one [2F, D], so one matmul computes them;
 * likewise each expert's gate and up slices into its own [2Fe, D]. */
static int is_matrix(int role)
{
    return role == R_EMBED || role == R_LM_HEAD || role == R_Q || role == R_K || role == R_V || role == R_O ||
           role == R_GATE || role == R_UP || role == R_DOWN || role == R_ROUTER || role == R_EXP_GATE ||
           role == R_EXP_UP || role == R_EXP_DOWN;
}

static tk_weight *matrix_dst(tk_model *m, int role, int layer, int expert, int *row0)
{
    const tk_model_config *c = &m->cfg;
    int q_rows = c->n_heads * c->head_dim, kv_rows = c->n_kv_heads * c->head_dim;
    tk_layer_weights *L = layer >= 0 ? &m->w.layers[layer] : NULL;
    *row0 = 0;
    switch (role) {
    case R_ROUTER: return &L->router;
    case R_EXP_GATE: return &L->expert_gate_up[expert];
    case R_EXP_UP: *row0 = c->d_ff_expert; return &L->expert_gate_up[expert];
    case R_EXP_DOWN: return &L->expert_down[expert];
    case R_EMBED: return &m->w.embed;
    case R_LM_HEAD: return &m->w.lm_head;
    case R_Q: return &L->wqkv;
    case R_K: *row0 = q_rows; return &L->wqkv;
    case R_V: *row0 = q_rows + kv_rows; return &L->wqkv;
    case R_O: return &L->wo;
    case R_GATE: return &L->w_gate_up;
    case R_UP: *row0 = c->d_ff; return &L->w_gate_up;
    case R_DOWN: return &L->w_down;
    }
    return NULL;
}

static float *vector_dst(tk_model *m, int role, int layer)
{
    const tk_model_config *c = &m->cfg;
    size_t q_rows = (size_t)c->n_heads * c->head_dim, kv_rows = (size_t)c->n_kv_heads * c->head_dim;
    tk_layer_weights *L = layer >= 0 ? &m->w.layers[layer] : NULL;
    switch (role) {
    case R_FINAL_NORM: return m->w.final_norm;
    case R_ROPE_FREQS: return m->w.rope_inv_freq;
    case R_ATTN_NORM: return L->attn_norm;
    case R_Q_BIAS: return L->bqkv;
    case R_K_BIAS: return L->bqkv + q_rows;
    case R_V_BIAS: return L->bqkv + q_rows + kv_rows;
    case R_Q_NORM: return L->q_norm;
    case R_K_NORM: return L->k_norm;
    case R_MLP_NORM: return L->mlp_norm;
    }
    return NULL;
}

/* ---- the float32 vectors: a size table and one allocation -------------------- */

/* Walks the layout; with base == NULL it only counts floats. */
static size_t carve_vectors(tk_model *m, float *base)
{
    const tk_model_config *c = &m->cfg;
    size_t D = (size_t)c->d_model, Dh = (size_t)c->head_dim, qkv = (size_t)tk_model_qkv_rows(c);
    tk_arena a = {base, 0};
    tk_layer_weights dummy;
    m->w.final_norm = tk_arena_take(&a, D);
    m->w.rope_inv_freq = tk_arena_take(&a, Dh / 2);
    for (int l = 0; l < c->n_layers; l++) {
        tk_layer_weights *L = base ? &m->w.layers[l] : &dummy;
        L->attn_norm = tk_arena_take(&a, D);
        L->bqkv = c->qkv_bias ? tk_arena_take(&a, qkv) : NULL;
        L->q_norm = c->qk_norm ? tk_arena_take(&a, Dh) : NULL;
        L->k_norm = c->qk_norm ? tk_arena_take(&a, Dh) : NULL;
        L->mlp_norm = tk_arena_take(&a, D);
    }
    return a.at;
}

/* The vectors' device block, and a host mirror of it (`host`, freed by the caller) that the loader fills and
 * uploads in one go. */
static tk_status allocate_vectors(tk_model *m, float **host)
{
    size_t n = carve_vectors(m, NULL);
    m->w.block = m->be->alloc(m->be, n * sizeof(float));
    *host = calloc(n ? n : 1, sizeof(float));
    if (!m->w.block || !*host) return tk_error(TK_ERR_NOMEM, "out of memory loading the model");
    m->w.block_floats = n;
    carve_vectors(m, m->w.block);
    return TK_OK;
}

/* ---- checking the sources ----------------------------------------------- */

typedef struct {
    const tk_tensor_source *src;
    int role;
    const uint8_t *bytes;   /* in the map */
    size_t rows, row_elems, row_bytes;
    int head_dim;           /* for un-permuting GGUF q/k rows */
    size_t col_stride;      /* a transposed source (tk_tensor_source): element (r, c) at c * col_stride + r */
    size_t elem_bytes;      /* of a transposed source's (float) type */
    /* set once memory is allocated: */
    float *dst;             /* a vector's place in the float block, or NULL for a matrix ... */
    tk_backend *be;
    const tk_weight_part *part; /* ... whose rows go to this part of its handle */
    int part_row;           /* starting at this row of the part */
    int cols;
} convert_job;

/* "[a, b, ...]" */
static void format_shape(char *out, size_t size, const int64_t *dims, int n_dims)
{
    size_t at = 0;
    for (int d = 0; d < n_dims && at < size; d++)
        at += (size_t)snprintf(out + at, size - at, "%s%lld", d ? ", " : "[", (long long)dims[d]);
    if (at < size) snprintf(out + at, size - at, "]");
}

static tk_status shape_error(const char *path, const tk_tensor_source *s, tk_shape want)
{
    char got_text[96], want_text[96];
    format_shape(got_text, sizeof got_text, s->shape, s->n_dims);
    format_shape(want_text, sizeof want_text, want.dim, want.n_dims);
    return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' has shape %s, but the config needs %s", path, s->name, got_text,
                    want_text);
}

static int same_shape(const tk_tensor_source *s, tk_shape want)
{
    if (s->n_dims != want.n_dims) return 0;
    for (int d = 0; d < want.n_dims; d++)
        if (s->shape[d] != want.dim[d]) return 0;
    return 1;
}

/* Validates one source against the config and its file; fills the job
 * (except dst). Nothing is allocated yet, so a bad file fails fast. */
/* The flag that says a (role, layer, expert) was supplied: one per expert for expert roles. */
static unsigned char *filled_flag(unsigned char *filled, const tk_model_config *c, int role, int layer, int expert)
{
    size_t slots = (size_t)(c->n_experts > 1 ? c->n_experts : 1);
    return &filled[((size_t)(layer + 1) * R_COUNT + (size_t)role) * slots + (size_t)(expert > 0 ? expert : 0)];
}

static size_t filled_bytes(const tk_model_config *c)
{
    return (size_t)(c->n_layers + 1) * R_COUNT * (size_t)(c->n_experts > 1 ? c->n_experts : 1);
}

/* The shape a source of the tensor must have: one expert's slice for an expert tensor. */
static tk_shape source_shape(const tk_arch_tensor *t, const tk_model_config *c)
{
    tk_shape sl = tk_arch_shape(t, c);
    if (t->per_expert) {
        for (int d = 1; d < sl.n_dims; d++) sl.dim[d - 1] = sl.dim[d];
        sl.n_dims--;
    }
    return sl;
}

static int is_float_type(int type);

/* A transposed source (col_stride > 0): a float matrix whose bytes span ((cols - 1) col_stride + rows)
 * elements; sets the job's stride and element size. */
static tk_status check_transposed(convert_job *job, const tk_tensor_source *s, const char *path, size_t rows,
                                  size_t cols)
{
    if (!is_float_type(s->type) || s->n_dims != 2)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' is stored transposed, which only 2-D F32, F16 and BF16 "
                        "tensors can be read from (type %s)", path, s->name, tk_quant_type_name(s->type));
    size_t elem = tk_quant_row_bytes(s->type, 1);
    if (s->col_stride < rows || s->col_stride > ((uint64_t)1 << 40))
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s': column stride %llu is below its %zu rows", path, s->name,
                        (unsigned long long)s->col_stride, rows);
    size_t span = ((cols - 1) * (size_t)s->col_stride + rows) * elem;
    if (s->nbytes != span)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' (stored transposed) has %llu bytes, but its shape, column "
                        "stride %llu and type %s span %zu", path, s->name, (unsigned long long)s->nbytes,
                        (unsigned long long)s->col_stride, tk_quant_type_name(s->type), span);
    job->col_stride = (size_t)s->col_stride;
    job->elem_bytes = elem;
    return TK_OK;
}

static tk_status check_source(convert_job *job, const tk_model_config *c, const tk_tensor_source *s,
                              const tk_mapped_file *files, int n_files, unsigned char *filled)
{
    if (s->file < 0 || s->file >= n_files)
        return tk_error(TK_ERR_INVALID, "tensor '%s': file index %d out of range", s->name, s->file);
    const char *path = files[s->file].path;
    int role = tk_role_from_name(s->role);
    if (role < 0) return tk_error(TK_ERR_INVALID, "%s: tensor '%s': unknown role '%s'", path, s->name, s->role);
    const tk_arch_tensor *t = tk_arch_tensor_of(c->arch, role); /* NULL: a role this architecture lacks */
    if (t && (t->per_layer ? (s->layer < 0 || s->layer >= c->n_layers) : s->layer != -1))
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' is for layer %d, but the config has %d layers", path,
                        s->name, s->layer, c->n_layers);
    if (!t || !tk_arch_used(t, c, s->layer))
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' (%s) is not used by this configuration (check the config: "
                        "tied embeddings, qkv bias, q/k norm, which layers are mixture-of-experts)", path, s->name,
                        s->role);
    if (t->per_expert ? (s->expert < 0 || s->expert >= c->n_experts) : s->expert != -1)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' is for expert %d, but %s", path, s->name, s->expert,
                        t->per_expert ? "the config has fewer experts" : "its role has no experts");
    unsigned char *flag = filled_flag(filled, c, role, s->layer, s->expert);
    if (*flag) return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' supplies %s of layer %d%s a second time", path,
                               s->name, s->role, s->layer, t->per_expert ? " (that expert)" : "");
    *flag = 1;
    tk_shape sl = source_shape(t, c);
    if (!same_shape(s, sl)) return shape_error(path, s, sl);
    if (!tk_quant_is_supported(s->type))
        return tk_error(TK_ERR_UNSUPPORTED, "%s: tensor '%s' has type %s (ggml id %u), which this engine cannot "
                        "decode; supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K",
                        path, s->name, tk_quant_type_name(s->type), (unsigned)s->type);
    size_t row_elems = (size_t)(sl.n_dims == 2 ? sl.dim[1] : 1), rows = (size_t)sl.dim[0];
    if (sl.n_dims == 1 && !s->rope_rows_interleaved) { row_elems = (size_t)sl.dim[0]; rows = 1; }
    size_t row_bytes = tk_quant_row_bytes(s->type, row_elems);
    if (row_bytes == 0)
        return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' of type %s has rows of %zu elements, not a multiple of "
                        "its block size %d", path, s->name, tk_quant_type_name(s->type), row_elems,
                        tk_quant_block_elems(s->type));
    if (s->col_stride) TK_TRY(check_transposed(job, s, path, rows, row_elems));
    else if (s->nbytes != row_bytes * rows)
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

static tk_status check_complete(const tk_model_config *c, unsigned char *filled, const char *path)
{
    for (int layer = -1; layer < c->n_layers; layer++) {
        for (int i = 0; i < c->arch->n_tensors; i++) {
            const tk_arch_tensor *t = &c->arch->tensors[i];
            int r = (int)t->role;
            if (t->per_layer != (layer >= 0) || !tk_arch_required(t, c, layer)) continue;
            for (int e = 0; e < (t->per_expert ? c->n_experts : 1); e++) {
                if (*filled_flag(filled, c, r, layer, t->per_expert ? e : -1)) continue;
                const char *name = tk_role_name(r);
                if (layer < 0) return tk_error(TK_ERR_FORMAT, "%s: the model files have no %s tensor", path, name);
                if (t->per_expert)
                    return tk_error(TK_ERR_FORMAT, "%s: the model files have no %s tensor for expert %d of layer %d",
                                    path, name, e, layer);
                return tk_error(TK_ERR_FORMAT, "%s: the model files have no %s tensor for layer %d", path, name,
                                layer);
            }
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

/* The conversion's jobs, and per pool thread a gather buffer of GATHER_ROWS rows for transposed sources. */
enum { GATHER_ROWS = 16 };
typedef struct {
    convert_job *jobs;
    uint8_t *gather;      /* [threads][GATHER_ROWS][gather_row] */
    size_t gather_row;    /* bytes: the widest transposed row */
} convert_ctx;

/* Rows of a transposed source, GATHER_ROWS at a time: for each column the tile's rows are adjacent in the file
 * (one short contiguous read), and each gathered row is then stored like a row of any other source. */
static void convert_transposed(convert_job *job, uint8_t *buf)
{
    size_t es = job->elem_bytes, cols = job->row_elems;
    for (size_t r0 = 0; r0 < job->rows; r0 += GATHER_ROWS) {
        size_t n = job->rows - r0 < GATHER_ROWS ? job->rows - r0 : GATHER_ROWS;
        for (size_t c = 0; c < cols; c++) {
            const uint8_t *src = job->bytes + (c * job->col_stride + r0) * es;
            for (size_t i = 0; i < n; i++) memcpy(buf + i * job->row_bytes + c * es, src + i * es, es);
        }
        for (size_t i = 0; i < n; i++)
            job->be->weight_put_row(job->be, job->part, job->cols, job->part_row + (int)(r0 + i),
                                    buf + i * job->row_bytes);
    }
}

static void convert_task(void *ctx, int task, int thread)
{
    convert_ctx *cc = ctx;
    convert_job *job = &cc->jobs[task];
    if (job->col_stride) {
        convert_transposed(job, cc->gather + (size_t)thread * GATHER_ROWS * cc->gather_row);
        return;
    }
    for (size_t r = 0; r < job->rows; r++) {
        const uint8_t *row = job->bytes + source_row(r, job->head_dim) * job->row_bytes;
        if (job->dst)
            tk_dequantize(job->dst + r * job->row_elems, row, job->src->type, job->row_elems);
        else
            job->be->weight_put_row(job->be, job->part, job->cols, job->part_row + (int)r, row);
    }
}

/* ---- the matrices: parts, their resident storage and one allocation ------------------------------- */

/* Every matrix handle of the model (the lm_head only when untied: tied, it is the embedding's), into out
 * (NULL: only count). A dense layer has its MLP's two, an MoE layer its router and two per expert. */
static int matrices(tk_model *m, tk_weight **out)
{
    int n = 0;
#define ADD(w) (out ? (void)(out[n] = (w)) : (void)0, n++)
    ADD(&m->w.embed);
    if (!m->cfg.tied_embeddings) ADD(&m->w.lm_head);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        tk_layer_weights *L = &m->w.layers[l];
        ADD(&L->wqkv);
        ADD(&L->wo);
        if (!L->moe) {
            ADD(&L->w_gate_up);
            ADD(&L->w_down);
            continue;
        }
        ADD(&L->router);
        for (int e = 0; e < m->cfg.n_experts; e++) {
            ADD(&L->expert_gate_up[e]);
            ADD(&L->expert_down[e]);
        }
    }
#undef ADD
    return n;
}

/* The expert handles of the MoE layers: 2 E per layer, pointed at by the layers (calloc: zero rows, no parts). */
static tk_status place_experts(tk_model *m)
{
    const tk_model_config *c = &m->cfg;
    size_t n_moe = 0;
    for (int l = 0; l < c->n_layers; l++) n_moe += (size_t)tk_model_layer_is_moe(c, l);
    if (!n_moe) return TK_OK;
    m->w.experts = calloc(n_moe * 2 * (size_t)c->n_experts, sizeof *m->w.experts);
    if (!m->w.experts) return tk_error(TK_ERR_NOMEM, "out of memory loading the model");
    tk_weight *next = m->w.experts;
    for (int l = 0; l < c->n_layers; l++) {
        tk_layer_weights *L = &m->w.layers[l];
        if (!(L->moe = tk_model_layer_is_moe(c, l))) continue;
        L->expert_gate_up = next;
        L->expert_down = next + c->n_experts;
        next += 2 * (size_t)c->n_experts;
    }
    return TK_OK;
}

/* One part per source, in row order; neighbours of the same type merge into one part. */
static tk_status plan_parts(tk_model *m, const convert_job *jobs, int n_jobs)
{
    for (int j = 0; j < n_jobs; j++) {
        if (!is_matrix(jobs[j].role)) continue;
        int row0;
        tk_weight *w = matrix_dst(m, jobs[j].role, jobs[j].src->layer, jobs[j].src->expert, &row0);
        w->cols = (int)jobs[j].row_elems;
        w->rows += (int)jobs[j].rows;
        w->part[w->n_parts++] = (tk_weight_part){(int)jobs[j].src->type, row0, (int)jobs[j].rows, NULL};
    }
    int n = matrices(m, NULL);
    tk_weight **all = malloc((size_t)n * sizeof *all);
    if (!all) return tk_error(TK_ERR_NOMEM, "out of memory loading the model");
    matrices(m, all);
    for (int i = 0; i < n; i++) {
        tk_weight *w = all[i];
        for (int a = 1; a < w->n_parts; a++) /* insertion sort by first row: at most 3 parts */
            for (int b = a; b > 0 && w->part[b].row0 < w->part[b - 1].row0; b--) {
                tk_weight_part t = w->part[b];
                w->part[b] = w->part[b - 1];
                w->part[b - 1] = t;
            }
        int kept = 0;
        for (int a = 0; a < w->n_parts; a++) {
            if (kept > 0 && w->part[kept - 1].type == w->part[a].type) w->part[kept - 1].rows += w->part[a].rows;
            else w->part[kept++] = w->part[a];
        }
        w->n_parts = kept;
    }
    free(all);
    return TK_OK;
}

static int is_float_type(int type) { return type == TK_GGML_F32 || type == TK_GGML_F16 || type == TK_GGML_BF16; }

/* Sizes every part through the backend, allocates them as one zeroed block and points the parts into it. */
static tk_status allocate_matrices(tk_model *m, tk_backend *be, const char *path)
{
    int n = matrices(m, NULL);
    tk_weight **all = malloc((size_t)n * sizeof *all);
    if (!all) return tk_error(TK_ERR_NOMEM, "out of memory loading the model");
    matrices(m, all);
    tk_status s = TK_OK;
    size_t total = 0;
    for (int pass = 0; pass < 2; pass++) {
        size_t at = 0;
        for (int i = 0; i < n; i++)
            for (int k = 0; k < all[i]->n_parts; k++) {
                tk_weight_part *p = &all[i]->part[k];
                size_t bytes = be->weight_bytes(be, p->type, p->rows, all[i]->cols);
                if (!bytes) {
                    s = tk_error(TK_ERR_UNSUPPORTED, "%s: the %s backend cannot hold a [%d, %d] weight of type %s",
                                 path, be->name, p->rows, all[i]->cols, tk_quant_type_name(p->type));
                    goto done;
                }
                if (pass) p->data = m->w.wblock + at;
                else if (!is_float_type(p->type)) m->w.quantized_bytes += bytes;
                at += bytes;
            }
        if (pass) break;
        total = at;
        m->w.wblock = be->alloc(be, total); /* zeroed: padding rows of tiled parts decode to 0 */
        if (!m->w.wblock) {
            s = tk_error(TK_ERR_NOMEM, "cannot allocate %.1f MB for the model weights", (double)total / 1e6);
            goto done;
        }
        m->w.wblock_bytes = total;
    }
    if (m->cfg.tied_embeddings) m->w.lm_head = m->w.embed;
done:
    free(all);
    return s;
}

/* Points each job at its destination: a vector's floats in the host mirror, or a matrix's part and row. */
static void place_jobs(tk_model *m, tk_backend *be, convert_job *jobs, int n_jobs, float *host)
{
    for (int j = 0; j < n_jobs; j++) {
        convert_job *job = &jobs[j];
        if (!is_matrix(job->role)) {
            job->dst = host + (vector_dst(m, job->role, job->src->layer) - m->w.block);
            continue;
        }
        int row0;
        tk_weight *w = matrix_dst(m, job->role, job->src->layer, job->src->expert, &row0);
        int k = 0;
        while (k + 1 < w->n_parts && w->part[k + 1].row0 <= row0) k++;
        job->be = be;
        job->part = &w->part[k];
        job->part_row = row0 - w->part[k].row0;
        job->cols = w->cols;
    }
}

/* HF's default inverse frequencies, then its rope_scaling rules; a GGUF
 * rope_freqs tensor (already loaded into the slot) divides them instead. */
static void compute_rope(tk_model *m, float *host, int have_rope_freqs)
{
    const tk_model_config *c = &m->cfg;
    int half = c->head_dim / 2;
    float *inv = host + (m->w.rope_inv_freq - m->w.block);
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

/* M-RoPE's frequency -> position component map (model.h), kept on the host: the rope_table op reads it there. */
static tk_status compute_rope_axis(tk_model *m)
{
    const tk_model_config *c = &m->cfg;
    if (!tk_model_mrope(c)) return TK_OK;
    int half = c->head_dim / 2;
    m->w.rope_axis = malloc((size_t)half);
    if (!m->w.rope_axis) return tk_error(TK_ERR_NOMEM, "out of memory loading the model");
    for (int i = 0; i < half; i++)
        m->w.rope_axis[i] = (int8_t)(i % 3 == 1 && i < 3 * c->mrope_section[1]   ? 1
                                     : i % 3 == 2 && i < 3 * c->mrope_section[2] ? 2
                                                                                 : 0);
    return TK_OK;
}

/* Maps the files, checks every source, then allocates and converts all
 * tensors in parallel; the maps are released before returning. */
static tk_status load_sources(tk_model *m, const char *const *paths, int n_paths, const tk_tensor_source *src,
                              int n_src, tk_pool *pool, tk_backend *be)
{
    tk_status s = TK_OK;
    float *host = NULL; /* the vectors, before their upload */
    tk_mapped_file *files = calloc((size_t)(n_paths ? n_paths : 1), sizeof *files);
    convert_job *jobs = calloc((size_t)(n_src ? n_src : 1), sizeof *jobs);
    unsigned char *filled = calloc(filled_bytes(&m->cfg), 1);
    m->w.layers = calloc((size_t)m->cfg.n_layers, sizeof *m->w.layers);
    if (!files || !jobs || !filled || !m->w.layers) {
        s = tk_error(TK_ERR_NOMEM, "out of memory loading the model");
        goto done;
    }
    if ((s = place_experts(m)) != TK_OK || (s = compute_rope_axis(m)) != TK_OK) goto done;
    if (n_paths < 1) {
        s = tk_error(TK_ERR_INVALID, "no model files given");
        goto done;
    }
    for (int f = 0; f < n_paths && s == TK_OK; f++) s = tk_file_map(&files[f], paths[f]);
    for (int i = 0; i < n_src && s == TK_OK; i++) s = check_source(&jobs[i], &m->cfg, &src[i], files, n_paths, filled);
    if (s == TK_OK) s = check_complete(&m->cfg, filled, paths[0]);
    if (s == TK_OK) s = allocate_vectors(m, &host);
    if (s == TK_OK) s = plan_parts(m, jobs, n_src);
    if (s == TK_OK) s = allocate_matrices(m, be, paths[0]);
    convert_ctx cc = {jobs, NULL, 0};
    for (int j = 0; s == TK_OK && j < n_src; j++)
        if (jobs[j].col_stride && jobs[j].row_bytes > cc.gather_row) cc.gather_row = jobs[j].row_bytes;
    if (s == TK_OK && cc.gather_row &&
        !(cc.gather = malloc((size_t)tk_pool_threads(pool) * GATHER_ROWS * cc.gather_row)))
        s = tk_error(TK_ERR_NOMEM, "out of memory loading the model");
    if (s == TK_OK) {
        place_jobs(m, be, jobs, n_src, host);
        tk_pool_run(pool, n_src, convert_task, &cc);
        compute_rope(m, host, *filled_flag(filled, &m->cfg, R_ROPE_FREQS, -1, -1));
        be->upload(be, m->w.block, host, m->w.block_floats * sizeof(float));
        s = be->sync(be);
    }
    free(cc.gather);
done:
    free(host);
    for (int f = 0; files && f < n_paths; f++) tk_file_unmap(&files[f]);
    free(files);
    free(jobs);
    free(filled);
    return s;
}

tk_status tk_weights_load(tk_model **out, const tk_model_config *cfg, const char *const *paths, int n_paths,
                          const tk_tensor_source *src, int n_src, tk_pool *pool, tk_backend *be)
{
    *out = NULL;
    TK_TRY(tk_model_config_check(cfg));
    tk_model *m = calloc(1, sizeof *m);
    if (!m) return tk_error(TK_ERR_NOMEM, "out of memory");
    m->cfg = *cfg;
    atomic_init(&m->refcount, 1);
    tk_backend_retain(be);
    m->be = be;
    tk_status s = load_sources(m, paths, n_paths, src, n_src, pool, be);
    if (s != TK_OK) {
        tk_model_release(m);
        return s;
    }
    /* NULL when out of memory: the model then samples without one */
    m->prefix_cache = tk_prefix_cache_create(cfg->n_layers, cfg->n_kv_heads * cfg->head_dim,
                                             TK_PREFIX_CACHE_DEFAULT_BYTES);
    m->kv_default = tk_kv_default_limit();
    *out = m;
    return TK_OK;
}

/* ---- config and lifetime ------------------------------------------------ */

int tk_model_qkv_rows(const tk_model_config *c) { return (c->n_heads + 2 * c->n_kv_heads) * c->head_dim; }

int tk_model_mrope(const tk_model_config *c)
{
    return c->mrope_section[0] > 0 || c->mrope_section[1] > 0 || c->mrope_section[2] > 0;
}

int tk_model_layer_is_moe(const tk_model_config *c, int l)
{
    if (!c->moe || c->n_experts <= 0 || c->decoder_sparse_step <= 0 || l < 0 || l >= TK_MAX_MOE_LAYERS) return 0;
    if ((c->mlp_only_layers[l / 64] >> (l % 64)) & 1u) return 0;
    return (l + 1) % c->decoder_sparse_step == 0;
}

/* The mixture-of-experts fields: all zero without experts, in range with them. */
static tk_status check_moe_config(const tk_model_config *c)
{
    if (!c->moe) {
        if (c->n_experts != 0)
            return tk_error(TK_ERR_INVALID, "model config: n_experts is %d, but the architecture has no experts",
                            c->n_experts);
        return TK_OK;
    }
    if (c->n_experts < 1 || c->n_experts > TK_MAX_EXPERTS)
        return tk_error(TK_ERR_INVALID, "model config: n_experts is %d, expected 1 to %d", c->n_experts,
                        TK_MAX_EXPERTS);
    if (c->n_experts_used < 1 || c->n_experts_used > c->n_experts)
        return tk_error(TK_ERR_INVALID, "model config: n_experts_used is %d, expected 1 to n_experts (%d)",
                        c->n_experts_used, c->n_experts);
    if (c->d_ff_expert <= 0)
        return tk_error(TK_ERR_INVALID, "model config: d_ff_expert is %d, expected > 0", c->d_ff_expert);
    if (c->decoder_sparse_step < 1)
        return tk_error(TK_ERR_INVALID, "model config: decoder_sparse_step is %d, expected >= 1",
                        c->decoder_sparse_step);
    if (c->n_layers > TK_MAX_MOE_LAYERS)
        return tk_error(TK_ERR_INVALID, "model config: %d layers; mixture-of-experts models may have at most %d",
                        c->n_layers, TK_MAX_MOE_LAYERS);
    return TK_OK;
}

tk_status tk_model_config_check(const tk_model_config *c)
{
    if (!c->arch) return tk_error(TK_ERR_INVALID, "model config: no architecture");
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
    for (int k = 0; k < 3; k++)
        if (c->mrope_section[k] < 0 || c->mrope_section[k] > c->head_dim / 2)
            return tk_error(TK_ERR_INVALID, "model config: mrope_section[%d] is %d, expected 0 to head_dim / 2 (%d)", k,
                            c->mrope_section[k], c->head_dim / 2);
    if (c->rope_scaling < TK_ROPE_NONE || c->rope_scaling > TK_ROPE_LLAMA3)
        return tk_error(TK_ERR_INVALID, "model config: unknown rope scaling %d", c->rope_scaling);
    if (c->moe != ((c->arch->flags & TK_ARCH_MOE) != 0))
        return tk_error(TK_ERR_INVALID, "model config: moe is %d, but architecture %s %s experts", c->moe,
                        c->arch->name, c->moe ? "has no" : "has");
    return check_moe_config(c);
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
    tk_vision_free(atomic_load(&m->vision));
    tk_vocab_bytes *v = atomic_load(&m->vocab);
    if (v) {
        free(v->offsets);
        free(v->bytes);
        free(v);
    }
    if (m->be) {
        tk_prefix_cache_free(m->prefix_cache, m->be);
        m->be->free(m->be, m->w.block);
        m->be->free(m->be, m->w.wblock);
        tk_backend_release(m->be);
    }
    free(m->w.layers);
    free(m->w.experts);
    free(m->w.rope_axis);
    free(m);
}
