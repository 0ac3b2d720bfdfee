/* engine.c - the Engine, Model, Adapter and Request Python types.
 *
 * Every binding method follows one shape: parse -> validate -> copy into a C
 * request -> submit -> return a handle. Request.wait/result block with the
 * GIL released, waking every 50 ms to run signal handlers so Ctrl-C works.
 * A finished request exports its float results through the buffer protocol
 * (format "f": forward logits [T, V], train logprobs [E], adapter reads [n]),
 * so numpy.asarray(...) copies nothing; the exported buffer keeps the Request,
 * and so its results, alive.
 */
#define _GNU_SOURCE
#include "binding.h"

#include <sched.h>

#include <math.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    tk_engine *engine;
} EngineObject;

typedef struct {
    PyObject_HEAD
    tk_model *model;
} ModelObject;

typedef struct {
    PyObject_HEAD
    tk_adapter *adapter;
} AdapterObject;

enum request_kind { REQUEST_LOAD, REQUEST_FORWARD, REQUEST_TRAIN, REQUEST_OPTIM, REQUEST_ADAPTER_READ,
                    REQUEST_ADAPTER_WRITE, REQUEST_SAMPLE, REQUEST_SNAPSHOT, REQUEST_VISION_LOAD, REQUEST_VISION };

typedef struct {
    PyObject_HEAD
    tk_request *req;
    int kind;
    uint64_t id;
    PyTypeObject *model_type;   /* to build the Model of a load request */
    PyTypeObject *adapter_type; /* to build the Adapter of a snapshot request */
    Py_ssize_t shape[2];
} RequestObject;

/* ---- Request ------------------------------------------------------------- */

static PyObject *request_new(tk_module_state *state, tk_engine *engine, tk_request *req, int kind, int notify)
{
    RequestObject *self = PyObject_GC_New(RequestObject, state->request_type);
    if (!self) {
        tk_request_release(req);
        return NULL;
    }
    self->req = req;
    self->kind = kind;
    self->model_type = (PyTypeObject *)Py_NewRef(state->model_type);
    self->adapter_type = (PyTypeObject *)Py_NewRef(state->adapter_type);
    self->id = tk_engine_submit(engine, req, notify);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static void request_dealloc(RequestObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    tk_request_release(self->req);
    Py_CLEAR(self->model_type);
    Py_CLEAR(self->adapter_type);
    PyObject_GC_Del(self);
    Py_DECREF(type);
}

static int request_traverse(RequestObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->model_type);
    Py_VISIT(self->adapter_type);
    return 0;
}

/* 1: done, 0: timed out, -1: a signal handler raised */
static int wait_with_signals(tk_request *req, double timeout)
{
    double waited = 0;
    for (;;) {
        int slice_ms = 50, done;
        if (timeout >= 0 && (timeout - waited) * 1000 < slice_ms) slice_ms = (int)ceil((timeout - waited) * 1000);
        if (slice_ms < 0) slice_ms = 0;
        Py_BEGIN_ALLOW_THREADS
        done = tk_request_wait(req, slice_ms);
        Py_END_ALLOW_THREADS
        if (done) return 1;
        if (PyErr_CheckSignals() < 0) return -1;
        waited += slice_ms / 1000.0;
        if (timeout >= 0 && waited >= timeout) return 0;
    }
}

static PyObject *request_wait(RequestObject *self, PyObject *args)
{
    PyObject *timeout_obj = Py_None;
    if (!PyArg_ParseTuple(args, "|O:wait", &timeout_obj)) return NULL;
    double timeout = timeout_obj == Py_None ? -1.0 : PyFloat_AsDouble(timeout_obj);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    int done = wait_with_signals(self->req, timeout < 0 && timeout_obj != Py_None ? 0 : timeout);
    if (done < 0) return NULL;
    return PyBool_FromLong(done);
}

static PyObject *request_done(RequestObject *self, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(tk_request_done(self->req));
}

static PyObject *request_cancel(RequestObject *self, PyObject *unused)
{
    (void)unused;
    tk_request_cancel(self->req);
    Py_RETURN_NONE;
}

/* The float results a finished request exports: pointer, rows, cols. */
static const float *request_floats(RequestObject *self, Py_ssize_t *rows, Py_ssize_t *cols)
{
    int r, c;
    long n_targets;
    double loss;
    size_t n;
    int64_t step;
    const float *data = NULL;
    *cols = 1;
    switch (self->kind) {
    case REQUEST_FORWARD:
        if ((data = tk_forward_request_logits(self->req, &r, &c))) *rows = r, *cols = c;
        break;
    case REQUEST_TRAIN:
        if ((data = tk_train_request_result(self->req, &n_targets, &loss, NULL))) *rows = n_targets;
        break;
    case REQUEST_ADAPTER_READ:
        if ((data = tk_adapter_read_result(self->req, &n, &step))) *rows = (Py_ssize_t)n;
        break;
    case REQUEST_VISION: {
        int tokens, blocks, width;
        if ((data = tk_vision_request_result(self->req, &tokens, &blocks, &width)))
            *rows = (Py_ssize_t)tokens * blocks, *cols = width;
        break;
    }
    }
    return data;
}

static PyObject *int_list(const int32_t *v, int n)
{
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) {
        PyObject *x = PyLong_FromLong(v[i]);
        if (!x) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, x);
    }
    return list;
}

static PyObject *float_list(const float *v, int n)
{
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) {
        PyObject *x = PyFloat_FromDouble(v[i]);
        if (!x) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, x);
    }
    return list;
}

/* {"sequences": [(tokens, logprobs, stopped, topk ids [n * k] or None, topk logprobs [n * k] or None)],
 *  "prompt_logprobs": [P] or None,
 *  "topk_ids": [P][k] or None, "topk_logprobs": [P][k] or None,
 *  "group": (requests admitted with it, distinct prompts prefilled for them, 1 if it joined a running decode),
 *  "cached_tokens": prompt tokens whose keys and values came from the prefix cache} */
static PyObject *sample_result(tk_request *req)
{
    PyObject *seqs = PyList_New(0), *out = NULL, *plp = Py_None, *tids = Py_None, *tlps = Py_None;
    tk_sampled s;
    for (int i = 0; seqs && tk_sample_request_sample(req, i, &s); i++) {
        PyObject *ids = Py_None, *lps = Py_None;
        if (s.topk_ids) {
            ids = int_list(s.topk_ids, s.n * s.topk);
            lps = float_list(s.topk_logprobs, s.n * s.topk);
        } else {
            Py_INCREF(Py_None), Py_INCREF(Py_None);
        }
        PyObject *item = NULL;
        if (ids && lps) /* N steals ids and lps, also when it fails */
            item = Py_BuildValue("(NNONN)", int_list(s.tokens, s.n), float_list(s.logprobs, s.n),
                                 s.stopped ? Py_True : Py_False, ids, lps);
        else
            Py_XDECREF(ids), Py_XDECREF(lps);
        if (!item || PyList_Append(seqs, item) < 0) Py_CLEAR(seqs);
        Py_XDECREF(item);
    }
    int P, k;
    const int32_t *topk_ids;
    const float *topk_lp, *prompt_lp = tk_sample_request_prompt(req, &P, &topk_ids, &topk_lp, &k);
    Py_INCREF(Py_None), Py_INCREF(Py_None), Py_INCREF(Py_None);
    if (seqs && prompt_lp) Py_SETREF(plp, float_list(prompt_lp, P));
    if (seqs && topk_ids) {
        Py_SETREF(tids, PyList_New(P));
        Py_SETREF(tlps, PyList_New(P));
        for (int i = 0; tids && tlps && i < P; i++) {
            PyList_SET_ITEM(tids, i, int_list(topk_ids + (size_t)i * k, k));
            PyList_SET_ITEM(tlps, i, float_list(topk_lp + (size_t)i * k, k));
        }
    }
    int group_requests, group_prompts, joined;
    tk_sample_request_group(req, &group_requests, &group_prompts, &joined);
    if (seqs && plp && tids && tlps)
        out = Py_BuildValue("{s:O,s:O,s:O,s:O,s:(iii),s:i}", "sequences", seqs, "prompt_logprobs", plp, "topk_ids",
                            tids, "topk_logprobs", tlps, "group", group_requests, group_prompts, joined,
                            "cached_tokens", tk_sample_request_cached_tokens(req));
    Py_XDECREF(seqs), Py_XDECREF(plp), Py_XDECREF(tids), Py_XDECREF(tlps);
    return out;
}

/* An MoE model's routing of a finished train request: one list per sparse layer of the (token, expert)
 * assignments each expert received; None for a dense model. */
static PyObject *expert_tokens(tk_request *req)
{
    int layers, experts;
    const int64_t *counts = tk_train_request_expert_tokens(req, &layers, &experts);
    if (!counts) Py_RETURN_NONE;
    PyObject *out = PyList_New(layers);
    for (int l = 0; out && l < layers; l++) {
        PyObject *row = PyList_New(experts);
        for (int e = 0; row && e < experts; e++) {
            PyObject *x = PyLong_FromLongLong((long long)counts[(size_t)l * experts + e]);
            if (!x) Py_CLEAR(row);
            else PyList_SET_ITEM(row, e, x);
        }
        if (!row) Py_CLEAR(out);
        else PyList_SET_ITEM(out, l, row);
    }
    return out;
}

/* Waits, then returns the kind's result: the Model (load); the [T, V] logits
 * (forward); (logprobs [E], loss, tokens per expert per sparse layer or None) (train); a metrics dict (optim);
 * (floats, step) (adapter read); None (adapter write). */
static PyObject *request_result(RequestObject *self, PyObject *unused)
{
    (void)unused;
    int done = wait_with_signals(self->req, -1.0);
    if (done < 0) return NULL;
    const char *message;
    tk_status s = tk_request_status(self->req, &message);
    if (s != TK_OK) return tk_py_raise(s, message);
    long n_targets;
    double loss;
    size_t n;
    int64_t step;
    switch (self->kind) {
    case REQUEST_LOAD: {
        ModelObject *m = PyObject_New(ModelObject, self->model_type);
        if (m) m->model = tk_load_request_model(self->req);
        return (PyObject *)m;
    }
    case REQUEST_TRAIN:
    {
        int pass_requests;
        tk_train_request_result(self->req, &n_targets, &loss, &pass_requests);
        return Py_BuildValue("(NdNi)", PyMemoryView_FromObject((PyObject *)self), loss, expert_tokens(self->req),
                             pass_requests);
    }
    case REQUEST_OPTIM: {
        const tk_optim_result *r = tk_optim_request_result(self->req);
        return Py_BuildValue("{s:d,s:d,s:L}", "grad_norm", r->grad_norm, "clip_scale", (double)r->clip_scale, "step",
                             (long long)r->step);
    }
    case REQUEST_ADAPTER_READ:
        tk_adapter_read_result(self->req, &n, &step);
        return Py_BuildValue("(NL)", PyMemoryView_FromObject((PyObject *)self), (long long)step);
    case REQUEST_ADAPTER_WRITE:
    case REQUEST_VISION_LOAD:
        Py_RETURN_NONE;
    case REQUEST_SAMPLE:
        return sample_result(self->req);
    case REQUEST_SNAPSHOT: {
        AdapterObject *a = PyObject_New(AdapterObject, self->adapter_type);
        if (a) a->adapter = tk_snapshot_request_adapter(self->req);
        return (PyObject *)a;
    }
    }
    return PyMemoryView_FromObject((PyObject *)self);
}

static int request_getbuffer(RequestObject *self, Py_buffer *view, int flags)
{
    Py_ssize_t rows, cols;
    const float *data = request_floats(self, &rows, &cols);
    if (!data) {
        PyErr_SetString(PyExc_BufferError, "this request has no finished float result");
        return -1;
    }
    self->shape[0] = rows;
    self->shape[1] = cols;
    view->obj = Py_NewRef(self);
    view->buf = (void *)data;
    view->len = rows * cols * (Py_ssize_t)sizeof(float);
    view->readonly = 1;
    view->itemsize = sizeof(float);
    view->format = (flags & PyBUF_FORMAT) ? "f" : NULL;
    view->ndim = self->kind == REQUEST_FORWARD || self->kind == REQUEST_VISION ? 2 : 1;
    view->shape = (flags & PyBUF_ND) ? self->shape : NULL;
    view->strides = NULL;
    view->suboffsets = NULL;
    view->internal = NULL;
    if (!(flags & PyBUF_ND)) view->ndim = 1, view->shape = NULL;
    return 0;
}

static PyObject *request_get_id(RequestObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->id);
}

static PyMethodDef request_methods[] = {
    {"wait", (PyCFunction)request_wait, METH_VARARGS,
     "wait(timeout=None) -> bool: block (GIL released, Ctrl-C honoured) until done or timeout"},
    {"done", (PyCFunction)request_done, METH_NOARGS, "done() -> bool"},
    {"cancel", (PyCFunction)request_cancel, METH_NOARGS,
     "cancel(): ask the request to stop (sampling stops between decoding steps and frees its slot; training "
     "requests run to completion)"},
    {"result", (PyCFunction)request_result, METH_NOARGS,
     "result(): wait, then return the Model (load) or the [T, V] float32 logits (forward); raises on failure"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef request_getset[] = {
    {"id", (getter)request_get_id, NULL, "the id the engine gave this request at submission", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot request_slots[] = {
    {Py_tp_dealloc, request_dealloc},
    {Py_tp_traverse, request_traverse},
    {Py_tp_methods, request_methods},
    {Py_tp_getset, request_getset},
    {Py_bf_getbuffer, request_getbuffer},
    {Py_tp_doc, "A request submitted to the engine (load or forward)."},
    {0, NULL},
};

static PyType_Spec request_spec = {
    "tinker._C.Request", sizeof(RequestObject), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION, request_slots,
};

/* ---- Model -------------------------------------------------------------------- */

static void model_dealloc(ModelObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    tk_model_release(self->model);
    PyObject_Free(self);
    Py_DECREF(type);
}

static PyObject *model_get_config(ModelObject *self, void *closure)
{
    (void)closure;
    const tk_model_config *c = &self->model->cfg;
    PyObject *moe_layers = PyList_New(0);
    for (int l = 0; moe_layers && l < c->n_layers; l++) {
        if (!tk_model_layer_is_moe(c, l)) continue;
        PyObject *x = PyLong_FromLong(l);
        if (!x || PyList_Append(moe_layers, x) < 0) Py_CLEAR(moe_layers);
        Py_XDECREF(x);
    }
    if (!moe_layers) return NULL;
    return Py_BuildValue("{s:s,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:N,s:[iii]}", "arch", c->arch->name,
                         "n_layers", c->n_layers, "d_model", c->d_model, "n_heads", c->n_heads, "n_kv_heads",
                         c->n_kv_heads, "head_dim", c->head_dim, "d_ff", c->d_ff, "vocab_size", c->vocab_size,
                         "max_context", c->max_context, "n_experts", c->n_experts, "n_experts_used",
                         c->n_experts_used, "d_ff_expert", c->d_ff_expert, "norm_topk_prob", c->norm_topk_prob,
                         "moe_layers", moe_layers, "mrope_section", c->mrope_section[0], c->mrope_section[1],
                         c->mrope_section[2]);
}

static PyObject *model_get_weight_bytes(ModelObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(self->model->w.block_floats * sizeof(float) + self->model->w.wblock_bytes);
}

static PyObject *model_get_quantized_bytes(ModelObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(self->model->w.quantized_bytes);
}

/* set_token_bytes(list of bytes, one per token id): for stop strings */
static PyObject *model_set_token_bytes(ModelObject *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "token bytes must be a sequence of bytes");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), total = 0;
    uint32_t *offsets = PyMem_Malloc(((size_t)n + 1) * sizeof *offsets);
    char *blob = NULL;
    PyObject *result = NULL;
    if (!offsets) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(b)) {
            PyErr_Format(PyExc_TypeError, "token %zd: expected bytes", i);
            goto done;
        }
        offsets[i] = (uint32_t)total;
        total += PyBytes_GET_SIZE(b);
    }
    offsets[n] = (uint32_t)total;
    if (!(blob = PyMem_Malloc((size_t)total + 1))) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        memcpy(blob + offsets[i], PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(seq, i)), offsets[i + 1] - offsets[i]);
    tk_status s = tk_model_set_vocab_bytes(self->model, offsets, blob, (int)n);
    if (s != TK_OK) tk_py_raise(s, tk_last_error());
    else result = Py_NewRef(Py_None);
done:
    PyMem_Free(offsets);
    PyMem_Free(blob);
    Py_DECREF(seq);
    return result;
}

/* prefix_cache_stats() -> dict (prefix_cache.h tk_prefix_stats) */
static PyObject *model_prefix_cache_stats(ModelObject *self, PyObject *unused)
{
    (void)unused;
    tk_prefix_stats st = {0};
    if (self->model->prefix_cache) tk_prefix_cache_stats(self->model->prefix_cache, &st);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:n,s:n,s:i}", "lookups", (unsigned long long)st.lookups,
                         "hits", (unsigned long long)st.hits, "tokens_reused", (unsigned long long)st.tokens_reused,
                         "tokens_prefilled", (unsigned long long)st.tokens_prefilled, "blocks_inserted",
                         (unsigned long long)st.blocks_inserted, "blocks_evicted",
                         (unsigned long long)st.blocks_evicted, "blocks", (Py_ssize_t)st.blocks, "bytes",
                         (Py_ssize_t)st.bytes, "limit", (Py_ssize_t)st.limit, "block_tokens", (int)TK_PREFIX_BLOCK);
}

/* set_prefix_cache_limit(bytes): 0 disables the cache; blocks over the new bound are evicted now */
static PyObject *model_set_prefix_cache_limit(ModelObject *self, PyObject *arg)
{
    unsigned long long bytes = PyLong_AsUnsignedLongLong(arg);
    if (bytes == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (self->model->prefix_cache) {
        Py_BEGIN_ALLOW_THREADS
        tk_prefix_cache_set_limit(self->model->prefix_cache, self->model->be, (size_t)bytes);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

/* set_kv_cache_limit(bytes): what sampling's caches may hold at once (generate.h); 0: the default */
static PyObject *model_set_kv_cache_limit(ModelObject *self, PyObject *arg)
{
    unsigned long long bytes = PyLong_AsUnsignedLongLong(arg);
    if (bytes == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    tk_model_set_kv_limit(self->model, (size_t)bytes);
    Py_RETURN_NONE;
}

static PyObject *model_kv_cache_limit(ModelObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromSize_t(tk_model_kv_limit(self->model));
}

static PyMethodDef model_methods[] = {
    {"set_token_bytes", (PyCFunction)model_set_token_bytes, METH_O,
     "set_token_bytes(list[bytes]): each token's bytes, for matching stop strings (kept from the first call)"},
    {"prefix_cache_stats", (PyCFunction)model_prefix_cache_stats, METH_NOARGS,
     "prefix_cache_stats() -> dict: lookups, hits, tokens_reused, tokens_prefilled, blocks_inserted, "
     "blocks_evicted, blocks, bytes, limit, block_tokens of the model's prompt-prefix cache (sampling)"},
    {"set_prefix_cache_limit", (PyCFunction)model_set_prefix_cache_limit, METH_O,
     "set_prefix_cache_limit(bytes): the prefix cache's bound (0 disables it); blocks past it are evicted now"},
    {"set_kv_cache_limit", (PyCFunction)model_set_kv_cache_limit, METH_O,
     "set_kv_cache_limit(bytes): the bytes of keys and values sampling may hold at once (0: the default, 3/4 "
     "of the memory available once the model loaded); requests past it wait, and one past it alone is refused"},
    {"kv_cache_limit", (PyCFunction)model_kv_cache_limit, METH_NOARGS,
     "kv_cache_limit() -> int: the bytes of keys and values sampling may hold at once"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef model_getset[] = {
    {"config", (getter)model_get_config, NULL, "the model's dimensions", NULL},
    {"weight_bytes", (getter)model_get_weight_bytes, NULL,
     "bytes of base weights held: every matrix in its file's type, the vectors in float32", NULL},
    {"quantized_bytes", (getter)model_get_quantized_bytes, NULL,
     "bytes of the matrices held in block-quantized types (0 for F32 / F16 / BF16 models)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot model_slots[] = {
    {Py_tp_dealloc, model_dealloc},
    {Py_tp_getset, model_getset},
    {Py_tp_methods, model_methods},
    {Py_tp_doc, "A base model loaded into the engine (shared by every request on it)."},
    {0, NULL},
};

static PyType_Spec model_spec = {
    "tinker._C.Model", sizeof(ModelObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION, model_slots,
};

/* ---- Adapter ------------------------------------------------------------------------ */

static void adapter_dealloc(AdapterObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    tk_adapter_release(self->adapter);
    PyObject_Free(self);
    Py_DECREF(type);
}

/* [(name, offset, rows, cols, shape)] of every trained tensor in the params array; shape is (rows, cols), or
 * (experts, rows / experts, cols) for an expert target's factors */
static PyObject *adapter_get_tensors(AdapterObject *self, void *closure)
{
    (void)closure;
    int n = tk_adapter_tensors(self->adapter, NULL, 0);
    tk_lora_tensor *t = PyMem_Calloc((size_t)n + 1, sizeof *t);
    if (!t) return PyErr_NoMemory();
    tk_adapter_tensors(self->adapter, t, n);
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) {
        PyObject *shape = t[i].experts ? Py_BuildValue("(iii)", t[i].experts, t[i].rows / t[i].experts, t[i].cols)
                                       : Py_BuildValue("(ii)", t[i].rows, t[i].cols);
        PyObject *item = shape ? Py_BuildValue("(sniiN)", t[i].name, (Py_ssize_t)(t[i].data - self->adapter->block),
                                               t[i].rows, t[i].cols, shape) : NULL;
        if (!item) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, item);
    }
    PyMem_Free(t);
    return list;
}

static PyObject *adapter_get_n_params(AdapterObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(self->adapter->n_params);
}

static PyObject *adapter_get_scale(AdapterObject *self, void *closure)
{
    (void)closure;
    return PyFloat_FromDouble(self->adapter->scale);
}

static PyGetSetDef adapter_getset[] = {
    {"tensors", (getter)adapter_get_tensors, NULL,
     "[(name, offset, rows, cols, shape)] of the trained LoRA tensors", NULL},
    {"n_params", (getter)adapter_get_n_params, NULL, "number of trained parameters", NULL},
    {"scale", (getter)adapter_get_scale, NULL, "alpha / rank", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot adapter_slots[] = {
    {Py_tp_dealloc, adapter_dealloc},
    {Py_tp_getset, adapter_getset},
    {Py_tp_doc, "A LoRA adapter (parameters, gradients, AdamW moments) on a loaded base model."},
    {0, NULL},
};

static PyType_Spec adapter_spec = {
    "tinker._C.Adapter", sizeof(AdapterObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    adapter_slots,
};

/* ---- Engine: parsing the load arguments ------------------------------------------ */

static int dict_int(PyObject *d, const char *key, int *out, int required)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        if (required) PyErr_Format(PyExc_ValueError, "model config is missing '%s'", key);
        return required ? -1 : 0;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "model config '%s' is out of range", key);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int dict_float(PyObject *d, const char *key, float *out, int required)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        if (required) PyErr_Format(PyExc_ValueError, "model config is missing '%s'", key);
        return required ? -1 : 0;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)x;
    return 0;
}

/* mlp_only_layers: a list of layer indices (MoE models) whose MLP stays dense, into the config's bits. */
static int parse_mlp_only_layers(PyObject *d, tk_model_config *c)
{
    PyObject *v = PyDict_GetItemString(d, "mlp_only_layers");
    if (!v || v == Py_None) return 0;
    PyObject *seq = PySequence_Fast(v, "model config 'mlp_only_layers' must be a list of layer indices");
    if (!seq) return -1;
    int ok = 1;
    for (Py_ssize_t i = 0; ok && i < PySequence_Fast_GET_SIZE(seq); i++) {
        long layer = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (layer == -1 && PyErr_Occurred()) ok = 0;
        else if (layer < 0 || layer >= TK_MAX_MOE_LAYERS || layer >= c->n_layers) {
            PyErr_Format(PyExc_ValueError, "model config 'mlp_only_layers' holds %ld, not a layer of the model (0 to "
                         "%d)", layer, (c->n_layers < TK_MAX_MOE_LAYERS ? c->n_layers : TK_MAX_MOE_LAYERS) - 1);
            ok = 0;
        } else {
            c->mlp_only_layers[layer / 64] |= (uint64_t)1 << (layer % 64);
        }
    }
    Py_DECREF(seq);
    return ok ? 0 : -1;
}

/* mrope_section: three section sizes (M-RoPE), or absent / None: plain RoPE. */
static int parse_mrope_section(PyObject *d, tk_model_config *c)
{
    PyObject *v = PyDict_GetItemString(d, "mrope_section");
    if (!v || v == Py_None) return 0;
    PyObject *seq = PySequence_Fast(v, "model config 'mrope_section' must be a list of 3 integers");
    if (!seq) return -1;
    int ok = PySequence_Fast_GET_SIZE(seq) == 3;
    for (Py_ssize_t i = 0; ok && i < 3; i++) {
        long n = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        ok = !(n == -1 && PyErr_Occurred()) && n >= 0 && n <= (1 << 16);
        c->mrope_section[i] = (int)n;
    }
    Py_DECREF(seq);
    if (!ok && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "model config 'mrope_section' must be a list of 3 non-negative integers");
    return ok ? 0 : -1;
}

static int parse_config(PyObject *d, tk_model_config *c)
{
    memset(c, 0, sizeof *c);
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "model config must be a dict");
        return -1;
    }
    PyObject *arch = PyDict_GetItemString(d, "arch");
    const char *arch_name = arch && PyUnicode_Check(arch) ? PyUnicode_AsUTF8(arch) : NULL;
    if (arch_name) c->arch = tk_arch_find(arch_name);
    if (!c->arch) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "model config 'arch' must name an architecture the engine runs, got %R",
                         arch ? arch : Py_None);
        return -1;
    }
    if (dict_int(d, "n_layers", &c->n_layers, 1) < 0 || dict_int(d, "d_model", &c->d_model, 1) < 0 ||
        dict_int(d, "n_heads", &c->n_heads, 1) < 0 || dict_int(d, "n_kv_heads", &c->n_kv_heads, 1) < 0 ||
        dict_int(d, "head_dim", &c->head_dim, 1) < 0 || dict_int(d, "d_ff", &c->d_ff, 1) < 0 ||
        dict_int(d, "vocab_size", &c->vocab_size, 1) < 0 || dict_int(d, "max_context", &c->max_context, 1) < 0 ||
        dict_float(d, "rms_eps", &c->rms_eps, 1) < 0 || dict_float(d, "rope_theta", &c->rope_theta, 1) < 0 ||
        dict_int(d, "tied_embeddings", &c->tied_embeddings, 1) < 0 || dict_int(d, "qkv_bias", &c->qkv_bias, 1) < 0 ||
        dict_int(d, "qk_norm", &c->qk_norm, 1) < 0 || dict_int(d, "rope_scaling", &c->rope_scaling, 0) < 0 ||
        dict_float(d, "rope_factor", &c->rope_factor, 0) < 0 ||
        dict_float(d, "rope_low_freq_factor", &c->rope_low_freq_factor, 0) < 0 ||
        dict_float(d, "rope_high_freq_factor", &c->rope_high_freq_factor, 0) < 0 ||
        dict_int(d, "rope_original_context", &c->rope_original_context, 0) < 0 ||
        dict_int(d, "moe", &c->moe, 0) < 0 || dict_int(d, "n_experts", &c->n_experts, 0) < 0 ||
        dict_int(d, "n_experts_used", &c->n_experts_used, 0) < 0 ||
        dict_int(d, "d_ff_expert", &c->d_ff_expert, 0) < 0 ||
        dict_int(d, "norm_topk_prob", &c->norm_topk_prob, 0) < 0 ||
        dict_int(d, "decoder_sparse_step", &c->decoder_sparse_step, 0) < 0)
        return -1;
    return parse_mlp_only_layers(d, c) < 0 ? -1 : parse_mrope_section(d, c);
}

/* A tensor source's shape (a sequence of 1 to max_dims integers) into out[], its length into *n_dims; -1 with
 * the exception set when it is not one. */
static int parse_shape(PyObject *shape, const char *what, const char *name, int max_dims, int64_t *out, int *n_dims)
{
    PyObject *dims = PySequence_Fast(shape, "tensor shape must be a sequence");
    if (!dims) return -1;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(dims);
    if (nd < 1 || nd > max_dims) {
        Py_DECREF(dims);
        PyErr_Format(PyExc_ValueError, "%s '%s' has %zd dimensions (1 to %d)", what, name, nd, max_dims);
        return -1;
    }
    *n_dims = (int)nd;
    for (Py_ssize_t d = 0; d < nd; d++) out[d] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(dims, d));
    Py_DECREF(dims);
    return PyErr_Occurred() ? -1 : 0;
}

/* Fills src from a sequence of (name, role, layer, file, offset, nbytes, type,
 * shape, rope_rows_interleaved[, expert[, col_stride]]); names and roles borrow the tuples' strings. */
static int parse_sources(PyObject *seq, tk_tensor_source *src, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *shape;
        unsigned long long offset, nbytes, col_stride = 0;
        unsigned int type;
        tk_tensor_source *s = &src[i];
        s->expert = -1;
        if (!PyArg_ParseTuple(item, "ssiiKKIOp|iK;tensor source must be (name, role, layer, file, offset, nbytes, "
                              "type, shape, rope_rows_interleaved[, expert[, col_stride]])", &s->name, &s->role,
                              &s->layer, &s->file, &offset, &nbytes, &type, &shape, &s->rope_rows_interleaved,
                              &s->expert, &col_stride))
            return -1;
        s->col_stride = col_stride;
        s->type = (int)type; /* ids beyond the known range are rejected as unknown by the loader */
        s->offset = offset;
        s->nbytes = nbytes;
        if (parse_shape(shape, "tensor", s->name, 2, s->shape, &s->n_dims) < 0) return -1;
    }
    return 0;
}

/* A load call's file paths (encoded for the file system, kept alive by `encoded`) and its tensor sources (n_src
 * zeroed entries of src_size bytes, for the caller to parse), as C arrays; load_args_free releases them. */
typedef struct {
    PyObject *paths, *sources, *encoded;
    const char **path_ptrs;
    void *src;
    Py_ssize_t n_paths, n_src;
} load_args;

static int load_args_init(load_args *la, PyObject *paths_arg, PyObject *sources_arg, size_t src_size)
{
    memset(la, 0, sizeof *la);
    la->paths = PySequence_Fast(paths_arg, "paths must be a sequence of file paths");
    la->sources = la->paths ? PySequence_Fast(sources_arg, "tensors must be a sequence of tuples") : NULL;
    la->encoded = la->sources ? PyList_New(0) : NULL;
    if (!la->encoded) return -1;
    la->n_paths = PySequence_Fast_GET_SIZE(la->paths);
    la->n_src = PySequence_Fast_GET_SIZE(la->sources);
    la->path_ptrs = PyMem_Calloc((size_t)la->n_paths + 1, sizeof *la->path_ptrs);
    la->src = la->path_ptrs ? PyMem_Calloc((size_t)la->n_src + 1, src_size) : NULL;
    if (!la->src) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < la->n_paths; i++) {
        PyObject *bytes;
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(la->paths, i), &bytes)) return -1;
        int appended = PyList_Append(la->encoded, bytes);
        Py_DECREF(bytes);
        if (appended < 0) return -1;
        la->path_ptrs[i] = PyBytes_AS_STRING(bytes);
    }
    return 0;
}

static void load_args_free(load_args *la)
{
    PyMem_Free(la->src);
    PyMem_Free(la->path_ptrs);
    Py_XDECREF(la->encoded);
    Py_XDECREF(la->sources);
    Py_XDECREF(la->paths);
}

static PyObject *engine_load_model(EngineObject *self, PyObject *args)
{
    PyObject *config, *paths_arg, *sources_arg, *result = NULL;
    if (!PyArg_ParseTuple(args, "OOO:load_model", &config, &paths_arg, &sources_arg)) return NULL;
    tk_model_config cfg;
    if (parse_config(config, &cfg) < 0) return NULL;
    load_args la;
    tk_request *req;
    if (load_args_init(&la, paths_arg, sources_arg, sizeof(tk_tensor_source)) == 0 &&
        parse_sources(la.sources, la.src, la.n_src) == 0) {
        tk_status s = tk_load_request_create(&req, &cfg, la.path_ptrs, (int)la.n_paths, la.src, (int)la.n_src);
        if (s != TK_OK) tk_py_raise(s, tk_last_error());
        else result = request_new(PyType_GetModuleState(Py_TYPE(self)), self->engine, req, REQUEST_LOAD, 0);
    }
    load_args_free(&la);
    return result;
}

/* ---- Engine: forward ------------------------------------------------------------ */

static int get_int32_buffer(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (view->itemsize != 4 || (strcmp(f, "i") != 0 && strcmp(f, "l") != 0)) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous int32 buffer (got format '%s', itemsize %zd)", what,
                     view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int get_float32_buffer(PyObject *obj, Py_buffer *view, long n, const char *what);

/* Sets a forward request's replacement embeddings: embed_rows (int32 [T], -1: the token's own) picks rows of
 * embeds (float32 [n, D]). 0, or -1 with a Python exception set. */
static int set_embeds(tk_request *req, PyObject *embeds_obj, PyObject *rows_obj, int d_model)
{
    Py_buffer rows, embeds;
    if (PyObject_GetBuffer(embeds_obj, &embeds, PyBUF_SIMPLE) < 0) return -1;
    long n_values = (long)(embeds.len / 4); /* checked as float32 below */
    PyBuffer_Release(&embeds);
    if (n_values % d_model) {
        tk_py_raise(TK_ERR_INVALID, "forward: embeds must hold whole rows of the model width");
        return -1;
    }
    if (get_float32_buffer(embeds_obj, &embeds, n_values, "embeds") < 0) return -1;
    if (get_int32_buffer(rows_obj, &rows, "embed_rows") < 0) {
        PyBuffer_Release(&embeds);
        return -1;
    }
    tk_status s = tk_forward_request_set_embeds(req, embeds.buf, (int)(n_values / d_model), rows.buf,
                                                (long)(rows.len / 4));
    PyBuffer_Release(&rows);
    PyBuffer_Release(&embeds);
    if (s != TK_OK) tk_py_raise(s, tk_last_error());
    return s == TK_OK ? 0 : -1;
}

/* A request's multimodal inputs (mm.h) from mm=(embeds, embed_rows, deepstack, positions, pos_delta): each
 * None or a contiguous buffer - embeds float32 [n, D], embed_rows int32 [T], deepstack float32 [K, n, D],
 * positions int32 [T, 3], pos_delta int32 [n_seqs]; the engine checks the counts against the request. The
 * views stay held (release_mm) until the request has copied them. 0, or -1 with a Python exception set. */
enum { MM_FIELDS = 5 };

static void release_mm(Py_buffer views[MM_FIELDS])
{
    for (int i = 0; i < MM_FIELDS; i++)
        if (views[i].obj) PyBuffer_Release(&views[i]);
}

static int parse_mm(PyObject *obj, int d_model, tk_mm *mm, Py_buffer views[MM_FIELDS])
{
    static const char *names[MM_FIELDS] = {"embeds", "embed_rows", "deepstack", "positions", "pos_delta"};
    memset(mm, 0, sizeof *mm);
    memset(views, 0, MM_FIELDS * sizeof *views);
    PyObject *items = PySequence_Fast(obj, "mm must be (embeds, embed_rows, deepstack, positions, pos_delta)");
    if (!items) return -1;
    if (PySequence_Fast_GET_SIZE(items) != MM_FIELDS) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_ValueError, "mm must be (embeds, embed_rows, deepstack, positions, pos_delta)");
        return -1;
    }
    int failed = 0;
    for (int i = 0; i < MM_FIELDS && !failed; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, i);
        if (item == Py_None) continue;
        int is_float = i == 0 || i == 2;
        if (is_float) {
            Py_buffer probe;
            if (PyObject_GetBuffer(item, &probe, PyBUF_SIMPLE) < 0) { failed = 1; break; }
            long n = (long)(probe.len / 4);
            PyBuffer_Release(&probe);
            failed = get_float32_buffer(item, &views[i], n, names[i]) < 0;
        } else {
            failed = get_int32_buffer(item, &views[i], names[i]) < 0;
        }
    }
    Py_DECREF(items);
    if (failed) {
        release_mm(views);
        return -1;
    }
    long row = d_model;
    long n_embed_values = views[0].obj ? (long)(views[0].len / 4) : 0;
    long n_deep_values = views[2].obj ? (long)(views[2].len / 4) : 0;
    if (n_embed_values % row || (n_embed_values == 0 && views[2].obj) ||
        (n_embed_values && n_deep_values % n_embed_values)) {
        release_mm(views);
        PyErr_SetString(PyExc_ValueError, "mm: embeds must hold whole rows of the model width, and deepstack whole "
                        "blocks of embeds' size");
        return -1;
    }
    mm->n_embeds = (int)(n_embed_values / row);
    mm->embeds = views[0].buf;
    mm->embed_row = views[1].buf;
    mm->n_deepstack = n_embed_values ? (int)(n_deep_values / n_embed_values) : 0;
    mm->deepstack = mm->n_deepstack ? views[2].buf : NULL;
    mm->pos = views[3].buf;
    mm->pos_delta = views[4].buf;
    return 0;
}

/* Sets parsed multimodal inputs on a request before it is submitted (setter: the request kind's); releases the
 * request and returns -1 with a Python exception when they are refused. */
static int attach_mm(tk_request *req, PyObject *obj, int d_model, tk_status (*setter)(tk_request *, const tk_mm *),
                     long n_tokens, const char *what)
{
    if (obj == Py_None) return 0;
    tk_mm mm;
    Py_buffer views[MM_FIELDS];
    if (parse_mm(obj, d_model, &mm, views) < 0) {
        tk_request_release(req);
        return -1;
    }
    tk_status s = TK_OK;
    if ((views[1].obj && views[1].len / 4 != n_tokens) || (views[3].obj && views[3].len / 4 != 3 * n_tokens))
        s = tk_error(TK_ERR_INVALID, "%s: embed_rows and positions need one entry (positions: 3) per token of the "
                     "%ld", what, n_tokens);
    if (s == TK_OK) s = setter(req, &mm);
    release_mm(views);
    if (s != TK_OK) {
        tk_request_release(req);
        tk_py_raise(s, tk_last_error());
        return -1;
    }
    return 0;
}

/* adapter=: one Adapter (or None) for every sequence, or a list with one Adapter or None per sequence (a
 * mixed batch: each sequence through its own adapter in one pass over the base weights). embeds= and
 * embed_rows= (together): embeddings that replace some tokens' (see set_embeds). */
static PyObject *engine_forward(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model", "tokens", "seq_lens", "notify", "adapter", "embeds", "embed_rows", "mm", NULL};
    PyObject *model_obj, *tokens_obj, *lens_obj, *adapter_obj = Py_None, *embeds_obj = Py_None, *rows_obj = Py_None;
    PyObject *mm_obj = Py_None;
    int notify = 0;
    tk_module_state *state = PyType_GetModuleState(Py_TYPE(self));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OO|pOOOO:forward", kwlist, state->model_type, &model_obj,
                                     &tokens_obj, &lens_obj, &notify, &adapter_obj, &embeds_obj, &rows_obj, &mm_obj))
        return NULL;
    if ((embeds_obj == Py_None) != (rows_obj == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "forward: embeds and embed_rows go together");
        return NULL;
    }
    int per_sequence = PyList_Check(adapter_obj) || PyTuple_Check(adapter_obj);
    PyObject *items = per_sequence ? PySequence_Fast(adapter_obj, "adapter") : NULL;
    Py_ssize_t n_items = items ? PySequence_Fast_GET_SIZE(items) : 1;
    for (Py_ssize_t i = 0; i < n_items; i++) {
        PyObject *a = items ? PySequence_Fast_GET_ITEM(items, i) : adapter_obj;
        if (a != Py_None && !PyObject_TypeCheck(a, state->adapter_type)) {
            Py_XDECREF(items);
            PyErr_SetString(PyExc_TypeError, "adapter must be an Adapter, None, or a list of them (one per sequence)");
            return NULL;
        }
    }
    tk_adapter **ads = PyMem_Calloc((size_t)n_items, sizeof *ads);
    if (!ads) {
        Py_XDECREF(items);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n_items; i++) {
        PyObject *a = items ? PySequence_Fast_GET_ITEM(items, i) : adapter_obj;
        ads[i] = a == Py_None ? NULL : ((AdapterObject *)a)->adapter;
    }
    Py_XDECREF(items);
    Py_buffer tokens, lens;
    tk_request *req = NULL;
    tk_status s = TK_ERR_INVALID;
    if (get_int32_buffer(tokens_obj, &tokens, "tokens") < 0) goto fail;
    long n_tokens = (long)(tokens.len / 4);
    if (get_int32_buffer(lens_obj, &lens, "seq_lens") < 0) {
        PyBuffer_Release(&tokens);
        goto fail;
    }
    if (per_sequence && n_items != (Py_ssize_t)(lens.len / 4))
        s = tk_error(TK_ERR_INVALID, "forward: %zd adapters given for %zd sequences", n_items,
                     (Py_ssize_t)(lens.len / 4));
    else
        s = tk_forward_request_create(&req, ((ModelObject *)model_obj)->model, ads, per_sequence, tokens.buf,
                                      (long)(tokens.len / 4), lens.buf, (int)(lens.len / 4));
    PyBuffer_Release(&tokens);
    PyBuffer_Release(&lens);
    PyMem_Free(ads);
    if (s != TK_OK) return tk_py_raise(s, tk_last_error());
    const tk_model *model = ((ModelObject *)model_obj)->model;
    if (embeds_obj != Py_None && set_embeds(req, embeds_obj, rows_obj, model->cfg.d_model)) {
        tk_request_release(req);
        return NULL;
    }
    if (attach_mm(req, mm_obj, model->cfg.d_model, tk_forward_request_set_mm, n_tokens, "forward") < 0)
        return NULL;
    return request_new(state, self->engine, req, REQUEST_FORWARD, notify);
fail:
    PyMem_Free(ads);
    return NULL;
}

/* ---- Engine: adapters and training ------------------------------------------------------ */

static PyObject *engine_create_adapter(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model", "rank", "seed", "train_attn", "train_mlp", "train_unembed", NULL};
    PyObject *model_obj;
    tk_lora_config cfg = {32, 0, 1, 1, 1};
    unsigned long long seed = 0;
    tk_module_state *state = PyType_GetModuleState(Py_TYPE(self));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!|iKppp:create_adapter", kwlist, state->model_type, &model_obj,
                                     &cfg.rank, &seed, &cfg.train_attn, &cfg.train_mlp, &cfg.train_unembed))
        return NULL;
    cfg.seed = seed;
    tk_adapter *ad;
    tk_status s;
    Py_BEGIN_ALLOW_THREADS
    s = tk_adapter_create(&ad, ((ModelObject *)model_obj)->model, &cfg);
    Py_END_ALLOW_THREADS
    if (s != TK_OK) return tk_py_raise(s, tk_last_error());
    AdapterObject *obj = PyObject_New(AdapterObject, state->adapter_type);
    if (!obj) {
        tk_adapter_release(ad);
        return NULL;
    }
    obj->adapter = ad;
    return (PyObject *)obj;
}

static tk_adapter *adapter_arg(EngineObject *self, PyObject *obj)
{
    tk_module_state *state = PyType_GetModuleState(Py_TYPE(self));
    if (!PyObject_TypeCheck(obj, state->adapter_type)) {
        PyErr_SetString(PyExc_TypeError, "expected an Adapter");
        return NULL;
    }
    return ((AdapterObject *)obj)->adapter;
}

/* A C-contiguous float32 buffer of exactly n values, or None (view->buf NULL). */
static int get_float32_buffer(PyObject *obj, Py_buffer *view, long n, const char *what)
{
    memset(view, 0, sizeof *view);
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (view->itemsize != 4 || strcmp(f, "f") != 0 || view->len / 4 != n) {
        PyErr_Format(PyExc_ValueError, "%s must be a contiguous float32 buffer of %ld values (got format '%s', %zd "
                     "bytes)", what, n, view->format ? view->format : "B", view->len);
        PyBuffer_Release(view);
        view->buf = NULL;
        return -1;
    }
    return 0;
}

static PyObject *engine_train(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"adapter", "tokens", "seq_lens", "k_per_datum", "targets", "weights", "advantages",
                             "logprobs", "clip_low", "clip_high", "loss", "clip_low_threshold",
                             "clip_high_threshold", "beta", "backward", "notify", "ratio_mask", "mm", NULL};
    PyObject *adapter_obj, *tokens_obj, *lens_obj, *k_obj, *targets_obj, *mm_obj = Py_None;
    PyObject *float_objs[6] = {Py_None, Py_None, Py_None, Py_None, Py_None, Py_None};
    tk_loss_config loss = {0, 0.8f, 1.2f, 0.0f};
    int backward = 1, notify = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|OOOOOifffppOO:train", kwlist, &adapter_obj, &tokens_obj,
                                     &lens_obj, &k_obj, &targets_obj, &float_objs[0], &float_objs[1], &float_objs[2],
                                     &float_objs[3], &float_objs[4], &loss.kind, &loss.clip_low, &loss.clip_high,
                                     &loss.beta, &backward, &notify, &float_objs[5], &mm_obj))
        return NULL;
    tk_adapter *ad = adapter_arg(self, adapter_obj);
    if (!ad) return NULL;
    static const char *float_names[6] = {"weights", "advantages", "logprobs", "clip_low", "clip_high", "ratio_mask"};
    Py_buffer tokens, lens, ks, targets, floats[6];
    int have = 0, n_floats = 0;
    PyObject *result = NULL;
    if (get_int32_buffer(tokens_obj, &tokens, "tokens") < 0) goto done;
    have = 1;
    if (get_int32_buffer(lens_obj, &lens, "seq_lens") < 0) goto done;
    have = 2;
    if (get_int32_buffer(k_obj, &ks, "k_per_datum") < 0) goto done;
    have = 3;
    if (get_int32_buffer(targets_obj, &targets, "targets") < 0) goto done;
    have = 4;
    for (; n_floats < 6; n_floats++)
        if (get_float32_buffer(float_objs[n_floats], &floats[n_floats], (long)(targets.len / 4),
                               float_names[n_floats]) < 0)
            goto done;
    if (lens.len != ks.len) {
        PyErr_SetString(PyExc_ValueError, "seq_lens and k_per_datum must have one entry per datum");
        goto done;
    }
    tk_train_batch tb = {tokens.buf, (long)(tokens.len / 4), lens.buf, ks.buf, (int)(lens.len / 4), targets.buf,
                         floats[0].buf, floats[1].buf, floats[2].buf, floats[3].buf, floats[4].buf,
                         floats[5].buf, (long)(targets.len / 4)};
    tk_request *req;
    tk_status s = tk_train_request_create(&req, ad, &tb, &loss, backward);
    if (s != TK_OK) tk_py_raise(s, tk_last_error());
    else if (attach_mm(req, mm_obj, ad->model->cfg.d_model, tk_train_request_set_mm, tb.n_tokens,
                       backward ? "forward_backward" : "forward") == 0)
        result = request_new(PyType_GetModuleState(Py_TYPE(self)), self->engine, req, REQUEST_TRAIN, notify);
done:
    for (int i = 0; i < n_floats; i++)
        if (floats[i].buf) PyBuffer_Release(&floats[i]);
    if (have >= 4) PyBuffer_Release(&targets);
    if (have >= 3) PyBuffer_Release(&ks);
    if (have >= 2) PyBuffer_Release(&lens);
    if (have >= 1) PyBuffer_Release(&tokens);
    return result;
}

static PyObject *engine_optim_step(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"adapter", "learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm",
                             "notify", NULL};
    PyObject *adapter_obj;
    tk_adam_params p = {1e-4, 0.9, 0.95, 1e-12, 0.0, 0.0};
    int notify = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|ddddddp:optim_step", kwlist, &adapter_obj, &p.learning_rate,
                                     &p.beta1, &p.beta2, &p.eps, &p.weight_decay, &p.grad_clip_norm, &notify))
        return NULL;
    tk_adapter *ad = adapter_arg(self, adapter_obj);
    if (!ad) return NULL;
    tk_request *req;
    tk_status s = tk_optim_request_create(&req, ad, &p);
    if (s != TK_OK) return tk_py_raise(s, tk_last_error());
    return request_new(PyType_GetModuleState(Py_TYPE(self)), self->engine, req, REQUEST_OPTIM, notify);
}

static PyObject *engine_read_adapter(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"adapter", "parts", "notify", NULL};
    PyObject *adapter_obj;
    int parts, notify = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oi|p:read_adapter", kwlist, &adapter_obj, &parts, &notify))
        return NULL;
    tk_adapter *ad = adapter_arg(self, adapter_obj);
    if (!ad) return NULL;
    tk_request *req;
    tk_status s = tk_adapter_read_request_create(&req, ad, parts);
    if (s != TK_OK) return tk_py_raise(s, tk_last_error());
    return request_new(PyType_GetModuleState(Py_TYPE(self)), self->engine, req, REQUEST_ADAPTER_READ, notify);
}

static PyObject *engine_write_adapter(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"adapter", "parts", "data", "step", "notify", NULL};
    PyObject *adapter_obj, *data_obj;
    int parts, notify = 0;
    long long step = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiO|Lp:write_adapter", kwlist, &adapter_obj, &parts, &data_obj,
                                     &step, &notify))
        return NULL;
    tk_adapter *ad = adapter_arg(self, adapter_obj);
    if (!ad) return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (data.itemsize != 4 || !data.format || strchr(data.format, 'f') == NULL) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_TypeError, "adapter data must be a contiguous float32 buffer");
        return NULL;
    }
    tk_request *req;
    tk_status s = tk_adapter_write_request_create(&req, ad, parts, data.buf, (size_t)(data.len / 4), step);
    PyBuffer_Release(&data);
    if (s != TK_OK) return tk_py_raise(s, tk_last_error());
    return request_new(PyType_GetModuleState(Py_TYPE(self)), self->engine, req, REQUEST_ADAPTER_WRITE, notify);
}

/* ---- Engine: sampling ---------------------------------------------------------------- */

static PyObject *engine_sample(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model", "prompt", "num_samples", "max_tokens", "temperature", "top_k", "top_p", "min_p",
                             "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop_ids",
                             "stop_strings", "prompt_logprobs", "topk_prompt_logprobs", "adapter", "notify",
                             "topk_sample_logprobs", "mm", NULL};
    PyObject *model_obj, *prompt_obj, *stop_ids_obj = Py_None, *stop_strings_obj = Py_None, *adapter_obj = Py_None;
    PyObject *mm_obj = Py_None;
    tk_sample_params p = {1, 16, 1.0, -1, 1.0, 0.0, 1.0, 0.0, 0.0, 0, 0, 0, 0};
    unsigned long long seed = 0;
    int notify = 0;
    tk_module_state *state = PyType_GetModuleState(Py_TYPE(self));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O|iididddddKOOpiOpiO:sample", kwlist, state->model_type,
                                     &model_obj, &prompt_obj, &p.num_samples, &p.max_tokens, &p.temperature, &p.top_k,
                                     &p.top_p, &p.min_p, &p.repetition_penalty, &p.presence_penalty,
                                     &p.frequency_penalty, &seed, &stop_ids_obj, &stop_strings_obj,
                                     &p.prompt_logprobs, &p.topk_prompt, &adapter_obj, &notify, &p.topk_sample,
                                     &mm_obj))
        return NULL;
    p.seed = seed;
    if (adapter_obj != Py_None && !PyObject_TypeCheck(adapter_obj, state->adapter_type)) {
        PyErr_SetString(PyExc_TypeError, "adapter must be an Adapter or None");
        return NULL;
    }
    tk_adapter *ad = adapter_obj == Py_None ? NULL : ((AdapterObject *)adapter_obj)->adapter;
    Py_buffer prompt, stops = {0};
    if (get_int32_buffer(prompt_obj, &prompt, "prompt") < 0) return NULL;
    if (stop_ids_obj != Py_None && get_int32_buffer(stop_ids_obj, &stops, "stop_ids") < 0) {
        PyBuffer_Release(&prompt);
        return NULL;
    }
    PyObject *strings = stop_strings_obj == Py_None ? PyList_New(0)
                                                    : PySequence_Fast(stop_strings_obj, "stop_strings: a list of bytes");
    Py_ssize_t n_str = strings ? PySequence_Fast_GET_SIZE(strings) : 0;
    uint32_t *offsets = strings ? PyMem_Calloc((size_t)n_str + 1, sizeof *offsets) : NULL;
    char *blob = NULL;
    PyObject *result = NULL;
    if (!offsets) goto done;
    for (Py_ssize_t i = 0; i < n_str; i++) {
        PyObject *b = PySequence_Fast_GET_ITEM(strings, i);
        if (!PyBytes_Check(b) || PyBytes_GET_SIZE(b) == 0 || PyBytes_GET_SIZE(b) > 4096) {
            PyErr_SetString(PyExc_ValueError, "each stop string must be 1 to 4096 bytes");
            goto done;
        }
        offsets[i + 1] = offsets[i] + (uint32_t)PyBytes_GET_SIZE(b);
    }
    if (!(blob = PyMem_Malloc((size_t)offsets[n_str] + 1))) goto done;
    for (Py_ssize_t i = 0; i < n_str; i++)
        memcpy(blob + offsets[i], PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(strings, i)), offsets[i + 1] - offsets[i]);
    tk_request *req;
    tk_status s = tk_sample_request_create(&req, ((ModelObject *)model_obj)->model, ad, prompt.buf,
                                           (int)(prompt.len / 4), &p, stops.buf, (int)(stops.len / 4), blob, offsets,
                                           (int)n_str);
    if (s != TK_OK) tk_py_raise(s, tk_last_error());
    else if (attach_mm(req, mm_obj, ((ModelObject *)model_obj)->model->cfg.d_model, tk_sample_request_set_mm,
                       (long)(prompt.len / 4), "sample") == 0)
        result = request_new(state, self->engine, req, REQUEST_SAMPLE, notify);
done:
    if (!result && !PyErr_Occurred()) PyErr_NoMemory();
    PyMem_Free(blob);
    PyMem_Free(offsets);
    Py_XDECREF(strings);
    if (stops.buf) PyBuffer_Release(&stops);
    PyBuffer_Release(&prompt);
    return result;
}

static PyObject *engine_snapshot_adapter(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"adapter", "notify", NULL};
    PyObject *adapter_obj;
    int notify = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p:snapshot_adapter", kwlist, &adapter_obj, &notify)) return NULL;
    tk_adapter *ad = adapter_arg(self, adapter_obj);
    if (!ad) return NULL;
    tk_request *req;
    tk_status s = tk_snapshot_request_create(&req, ad);
    if (s != TK_OK) return tk_py_raise(s, tk_last_error());
    return request_new(PyType_GetModuleState(Py_TYPE(self)), self->engine, req, REQUEST_SNAPSHOT, notify);
}

/* ---- Engine: completions -------------------------------------------------------- */

static PyObject *engine_wake_fd(EngineObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(tk_engine_wake_fd(self->engine));
}

static PyObject *engine_drain(EngineObject *self, PyObject *unused)
{
    (void)unused;
    PyObject *list = PyList_New(0);
    uint64_t ids[256];
    size_t n;
    while (list && (n = tk_engine_drain(self->engine, ids, 256)) > 0) {
        for (size_t i = 0; i < n; i++) {
            PyObject *id = PyLong_FromUnsignedLongLong(ids[i]);
            if (!id || PyList_Append(list, id) < 0) {
                Py_XDECREF(id);
                Py_CLEAR(list);
                break;
            }
            Py_DECREF(id);
        }
        if (n < 256) break;
    }
    return list;
}

static PyObject *engine_get_threads(EngineObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(tk_engine_threads(self->engine));
}

/* ---- Engine: lifetime ----------------------------------------------------------- */

/* The CPUs this process may run on (a container's cpuset), else all online ones. */
static int usable_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* The backend factory for a device name: "cpu", "cuda" (GPU 0, in a build with the CUDA backend), or "devsim"
 * (the CPU backend behind device pointers, a check for tests: backend/devsim). NULL for anything else. */
#ifdef TK_HAVE_CUDA
#define CUDA_DEVICE " or cuda"
#else
#define CUDA_DEVICE "; cuda needs a build with the CUDA backend"
#endif

static tk_backend *(*backend_factory(const char *device))(tk_pool *)
{
    if (strcmp(device, "cpu") == 0) return tk_cpu_backend_create;
    if (strcmp(device, "devsim") == 0) return tk_devsim_backend_create;
#ifdef TK_HAVE_CUDA
    if (strcmp(device, "cuda") == 0) return tk_cuda_backend_create;
#endif
    return NULL;
}

static PyObject *engine_tp_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"n_threads", "device", NULL};
    int n_threads = 0;
    const char *device = "cpu";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|is:Engine", kwlist, &n_threads, &device)) return NULL;
    tk_backend *(*factory)(tk_pool *) = backend_factory(device);
    if (!factory) return PyErr_Format(PyExc_ValueError, "unknown device '%s' (cpu, devsim%s)", device, CUDA_DEVICE);
    if (n_threads <= 0) n_threads = usable_cpus();
    if (n_threads > 256) n_threads = 256;
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    tk_status s = tk_engine_create(&self->engine, n_threads, factory);
    if (s != TK_OK) {
        Py_DECREF(self);
        return tk_py_raise(s, tk_last_error());
    }
    return (PyObject *)self;
}

static void engine_dealloc(EngineObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    if (self->engine) {
        tk_engine *e = self->engine;
        Py_BEGIN_ALLOW_THREADS
        tk_engine_free(e); /* waits for the running request */
        Py_END_ALLOW_THREADS
    }
    type->tp_free(self);
    Py_DECREF(type);
}

/* ---- Engine: a vision-language model's tower --------------------------------------------------------- */

/* The vision config (vision.h) from a dict: depth, d_model, d_ff, n_heads, in_channels, patch, temporal_patch,
 * merge, out, grid_side, act (enum tk_gelu), rope_theta, eps, deepstack (a list of block indices). */
static int parse_vision_config(PyObject *d, tk_vision_config *c)
{
    memset(c, 0, sizeof *c);
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "vision config must be a dict");
        return -1;
    }
    if (dict_int(d, "depth", &c->depth, 1) < 0 || dict_int(d, "d_model", &c->d_model, 1) < 0 ||
        dict_int(d, "d_ff", &c->d_ff, 1) < 0 || dict_int(d, "n_heads", &c->n_heads, 1) < 0 ||
        dict_int(d, "in_channels", &c->in_channels, 1) < 0 || dict_int(d, "patch", &c->patch, 1) < 0 ||
        dict_int(d, "temporal_patch", &c->temporal_patch, 1) < 0 || dict_int(d, "merge", &c->merge, 1) < 0 ||
        dict_int(d, "out", &c->out, 1) < 0 || dict_int(d, "grid_side", &c->grid_side, 1) < 0 ||
        dict_int(d, "act", &c->act, 1) < 0 || dict_float(d, "rope_theta", &c->rope_theta, 1) < 0 ||
        dict_float(d, "eps", &c->eps, 1) < 0)
        return -1;
    PyObject *taps = PyDict_GetItemString(d, "deepstack");
    PyObject *seq = taps ? PySequence_Fast(taps, "vision config 'deepstack' must be a list of block indices") : NULL;
    if (!seq) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "vision config has no 'deepstack'");
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int ok = n <= TK_MM_MAX_DEEPSTACK;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        long at = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        ok = !(at == -1 && PyErr_Occurred()) && at >= 0 && at < (1 << 16);
        c->deepstack_at[i] = (int)at;
    }
    Py_DECREF(seq);
    if (!ok) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "vision config 'deepstack': bad block indices");
        return -1;
    }
    c->n_deepstack = (int)n;
    return 0;
}

/* (name, index, file, offset, nbytes, type, shape) tuples into src; names borrow the tuples' strings */
static int parse_vision_sources(PyObject *seq, tk_vision_source *src, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *shape;
        unsigned long long offset, nbytes;
        tk_vision_source *s = &src[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "siiKKiO;vision tensor source must be (name, index, "
                              "file, offset, nbytes, type, shape)", &s->name, &s->index, &s->file, &offset, &nbytes,
                              &s->type, &shape))
            return -1;
        s->offset = offset, s->nbytes = nbytes;
        if (parse_shape(shape, "vision tensor", s->name, 5, s->shape, &s->n_dims) < 0) return -1;
    }
    return 0;
}

static PyObject *engine_load_vision(EngineObject *self, PyObject *args)
{
    PyObject *model_obj, *config, *paths_arg, *sources_arg, *result = NULL;
    tk_module_state *state = PyType_GetModuleState(Py_TYPE(self));
    if (!PyArg_ParseTuple(args, "O!OOO:load_vision", state->model_type, &model_obj, &config, &paths_arg,
                          &sources_arg))
        return NULL;
    tk_vision_config cfg;
    if (parse_vision_config(config, &cfg) < 0) return NULL;
    load_args la;
    tk_request *req;
    if (load_args_init(&la, paths_arg, sources_arg, sizeof(tk_vision_source)) == 0 &&
        parse_vision_sources(la.sources, la.src, la.n_src) == 0) {
        tk_status s = tk_vision_load_request_create(&req, ((ModelObject *)model_obj)->model, &cfg, la.path_ptrs,
                                                    (int)la.n_paths, la.src, (int)la.n_src);
        if (s != TK_OK) tk_py_raise(s, tk_last_error());
        else result = request_new(state, self->engine, req, REQUEST_VISION_LOAD, 0);
    }
    load_args_free(&la);
    return result;
}

static PyObject *engine_vision(EngineObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"model", "pixels", "grids", "notify", NULL};
    PyObject *model_obj, *pixels_obj, *grids_obj;
    int notify = 0;
    tk_module_state *state = PyType_GetModuleState(Py_TYPE(self));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OO|p:vision", kwlist, state->model_type, &model_obj,
                                     &pixels_obj, &grids_obj, &notify))
        return NULL;
    Py_buffer probe, pixels, grids;
    if (PyObject_GetBuffer(pixels_obj, &probe, PyBUF_SIMPLE) < 0) return NULL;
    long n = (long)(probe.len / 4);
    PyBuffer_Release(&probe);
    if (get_float32_buffer(pixels_obj, &pixels, n, "pixels") < 0) return NULL;
    if (get_int32_buffer(grids_obj, &grids, "grids") < 0) {
        PyBuffer_Release(&pixels);
        return NULL;
    }
    tk_request *req = NULL;
    tk_status s = grids.len % 12 ? tk_error(TK_ERR_INVALID, "vision: grids must be (t, h, w) triples")
                                 : tk_vision_request_create(&req, ((ModelObject *)model_obj)->model, pixels.buf, n,
                                                            grids.buf, (int)(grids.len / 12));
    PyBuffer_Release(&grids);
    PyBuffer_Release(&pixels);
    if (s != TK_OK) return tk_py_raise(s, tk_last_error());
    return request_new(state, self->engine, req, REQUEST_VISION, notify);
}

static PyMethodDef engine_methods[] = {
    {"load_vision", (PyCFunction)engine_load_vision, METH_VARARGS,
     "load_vision(model, config: dict, paths: list[str], tensors: list[tuple]) -> Request: loads the model's vision\n"
     "tower once (vision-language models); tensors are (name, index, file, offset, nbytes, type, shape)"},
    {"vision", (PyCFunction)(void (*)(void))engine_vision, METH_VARARGS | METH_KEYWORDS,
     "vision(model, pixels: float32 [N, C*Tp*P*P], grids: int32 [n, 3], notify=False) -> Request; result() ->\n"
     "float32 [(1 + deepstack taps) * tokens, out]: the images' merged features, then each tap's"},
    {"load_model", (PyCFunction)engine_load_model, METH_VARARGS,
     "load_model(config: dict, paths: list[str], tensors: list[tuple]) -> Request"},
    {"forward", (PyCFunction)(void (*)(void))engine_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(model, tokens: int32 buffer, seq_lens: int32 buffer, notify=False, adapter=None) -> Request"},
    {"create_adapter", (PyCFunction)(void (*)(void))engine_create_adapter, METH_VARARGS | METH_KEYWORDS,
     "create_adapter(model, rank=32, seed=0, train_attn=True, train_mlp=True, train_unembed=True) -> Adapter"},
    {"train", (PyCFunction)(void (*)(void))engine_train, METH_VARARGS | METH_KEYWORDS,
     "train(adapter, tokens, seq_lens, k_per_datum, targets, weights=None, advantages=None, logprobs=None,\n"
     "      clip_low=None, clip_high=None, loss=0, clip_low_threshold=0.8, clip_high_threshold=1.2, beta=0,\n"
     "      backward=True, notify=False, ratio_mask=None) -> Request; result() -> (logprobs, loss_sum, "
     "expert_tokens)"},
    {"optim_step", (PyCFunction)(void (*)(void))engine_optim_step, METH_VARARGS | METH_KEYWORDS,
     "optim_step(adapter, learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm, notify=False) -> Request"},
    {"read_adapter", (PyCFunction)(void (*)(void))engine_read_adapter, METH_VARARGS | METH_KEYWORDS,
     "read_adapter(adapter, parts, notify=False) -> Request; result() -> (floats, step); parts: 1 params, 2 grads, 4 exp_avg, "
     "8 exp_avg_sq"},
    {"write_adapter", (PyCFunction)(void (*)(void))engine_write_adapter, METH_VARARGS | METH_KEYWORDS,
     "write_adapter(adapter, parts, float32 data, step=0, notify=False) -> Request"},
    {"sample", (PyCFunction)(void (*)(void))engine_sample, METH_VARARGS | METH_KEYWORDS,
     "sample(model, prompt, num_samples=1, max_tokens=16, temperature=1, top_k=-1, top_p=1, min_p=0,\n"
     "       repetition_penalty=1, presence_penalty=0, frequency_penalty=0, seed=0, stop_ids=None,\n"
     "       stop_strings=None, prompt_logprobs=False, topk_prompt_logprobs=0, adapter=None, notify=False,\n"
     "       topk_sample_logprobs=0) -> Request"},
    {"snapshot_adapter", (PyCFunction)(void (*)(void))engine_snapshot_adapter, METH_VARARGS | METH_KEYWORDS,
     "snapshot_adapter(adapter, notify=False) -> Request; result() -> a frozen Adapter copy, taken at its place in the queue"},
    {"wake_fd", (PyCFunction)engine_wake_fd, METH_NOARGS, "wake_fd() -> int: readable when notify requests finish"},
    {"drain", (PyCFunction)engine_drain, METH_NOARGS, "drain() -> list[int]: ids of finished notify requests"},
    {NULL, NULL, 0, NULL},
};

static PyObject *engine_get_device(EngineObject *self, void *closure)
{
    (void)closure;
    return PyUnicode_FromString(tk_engine_device(self->engine));
}

static PyGetSetDef engine_getset[] = {
    {"threads", (getter)engine_get_threads, NULL, "threads in the engine's compute team", NULL},
    {"device", (getter)engine_get_device, NULL, "the device the engine computes on: 'cpu', 'cuda' or 'devsim'", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot engine_slots[] = {
    {Py_tp_new, engine_tp_new},
    {Py_tp_dealloc, engine_dealloc},
    {Py_tp_methods, engine_methods},
    {Py_tp_getset, engine_getset},
    {Py_tp_doc, "Engine(n_threads=0): a worker thread running requests in order, with its compute threads."},
    {0, NULL},
};

static PyType_Spec engine_spec = {
    "tinker._C.Engine", sizeof(EngineObject), 0, Py_TPFLAGS_DEFAULT, engine_slots,
};

int tk_py_add_engine_types(PyObject *module, tk_module_state *state)
{
    state->engine_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &engine_spec, NULL);
    state->model_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &model_spec, NULL);
    state->request_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &request_spec, NULL);
    state->adapter_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &adapter_spec, NULL);
    if (!state->engine_type || !state->model_type || !state->request_type || !state->adapter_type) return -1;
    if (PyModule_AddType(module, state->engine_type) < 0 || PyModule_AddType(module, state->model_type) < 0 ||
        PyModule_AddType(module, state->request_type) < 0 || PyModule_AddType(module, state->adapter_type) < 0)
        return -1;
    return 0;
}
