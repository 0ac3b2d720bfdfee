/* module.c - the tinker._C extension module: multi-phase init, module state
 * holding the heap types, and the free functions (GGUF reading,
 * dequantisation). Test and benchmark hooks into the kernels are not
 * shipped: they live in tests/ops/ and benchmarks/.
 *
 * Engine status codes map onto Python's built-in exceptions (ValueError for
 * bad files and arguments, OSError for I/O, MemoryError); the tinker package
 * turns them into its own exception classes where the API names one.
 */
#include "binding.h"

PyObject *tk_py_raise(tk_status status, const char *message)
{
    PyObject *type = PyExc_RuntimeError;
    switch (status) {
    case TK_ERR_IO: type = PyExc_OSError; break;
    case TK_ERR_FORMAT: case TK_ERR_INVALID: case TK_ERR_UNSUPPORTED: type = PyExc_ValueError; break;
    case TK_ERR_NOMEM: type = PyExc_MemoryError; break;
    case TK_ERR_CANCELLED: type = PyExc_InterruptedError; break; /* the Python side turns it into CancelledError */
    default: break;
    }
    /* messages may quote bytes from a corrupt file: decode leniently */
    PyObject *text = PyUnicode_DecodeUTF8(message, (Py_ssize_t)strlen(message), "replace");
    if (text) {
        PyErr_SetObject(type, text);
        Py_DECREF(text);
    }
    return NULL;
}

/* ---- GGUF metadata to Python values --------------------------------------- */

static PyObject *gguf_value_to_py(const tk_gguf_value *v, const uint8_t *end, int depth);

static PyObject *gguf_scalar_to_py(uint32_t type, const uint8_t *p)
{
    union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32; float f32;
            uint64_t u64; int64_t i64; double f64; } u;
    memcpy(&u, p, tk_gguf_scalar_size(type));
    switch (type) {
    case TK_GGUF_UINT8: return PyLong_FromUnsignedLong(u.u8);
    case TK_GGUF_INT8: return PyLong_FromLong(u.i8);
    case TK_GGUF_UINT16: return PyLong_FromUnsignedLong(u.u16);
    case TK_GGUF_INT16: return PyLong_FromLong(u.i16);
    case TK_GGUF_UINT32: return PyLong_FromUnsignedLong(u.u32);
    case TK_GGUF_INT32: return PyLong_FromLong(u.i32);
    case TK_GGUF_FLOAT32: return PyFloat_FromDouble(u.f32);
    case TK_GGUF_BOOL: return PyBool_FromLong(u.u8);
    case TK_GGUF_UINT64: return PyLong_FromUnsignedLongLong(u.u64);
    case TK_GGUF_INT64: return PyLong_FromLongLong(u.i64);
    case TK_GGUF_FLOAT64: return PyFloat_FromDouble(u.f64);
    }
    return tk_py_raise(TK_ERR_FORMAT, "unknown GGUF scalar type");
}

static PyObject *gguf_array_to_py(const tk_gguf_value *v, const uint8_t *end, int depth)
{
    PyObject *list = PyList_New((Py_ssize_t)v->count);
    if (!list) return NULL;
    const uint8_t *p = v->payload;
    for (uint64_t i = 0; i < v->count; i++) {
        tk_gguf_value item;
        tk_status s = tk_gguf_parse_value(&item, p, end, v->elem_type, depth + 1);
        PyObject *obj = s == TK_OK ? gguf_value_to_py(&item, end, depth + 1) : tk_py_raise(s, tk_last_error());
        if (!obj) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, obj);
        p += item.size;
    }
    return list;
}

static PyObject *gguf_value_to_py(const tk_gguf_value *v, const uint8_t *end, int depth)
{
    if (v->type == TK_GGUF_STRING)
        /* "replace": a tokenizer vocabulary may hold byte pieces that are not UTF-8 */
        return PyUnicode_DecodeUTF8((const char *)v->payload, (Py_ssize_t)v->count, "replace");
    if (v->type == TK_GGUF_ARRAY) return gguf_array_to_py(v, end, depth);
    return gguf_scalar_to_py(v->type, v->payload);
}

static PyObject *decode_name(const char *name)
{
    return PyUnicode_DecodeUTF8(name, (Py_ssize_t)strlen(name), "replace");
}

static PyObject *gguf_tensors_to_py(const tk_gguf *g)
{
    PyObject *list = PyList_New((Py_ssize_t)g->n_tensors);
    if (!list) return NULL;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const tk_gguf_tensor *t = &g->tensors[i];
        PyObject *shape = PyTuple_New(t->n_dims); /* PyTorch order: outermost first */
        if (!shape) goto error;
        for (uint32_t d = 0; d < t->n_dims; d++)
            PyTuple_SET_ITEM(shape, d, PyLong_FromUnsignedLongLong(t->ne[t->n_dims - 1 - d]));
        /* names are bytes in the file: undecodable ones get U+FFFD and fail to match any tensor */
        PyObject *item = Py_BuildValue("{s:N,s:I,s:s,s:N,s:K,s:K}", "name", decode_name(t->name), "type", t->type,
                                       "type_name",
                                       tk_quant_type_name((int)t->type), "shape", shape, "offset",
                                       (unsigned long long)t->offset, "nbytes", (unsigned long long)t->nbytes);
        if (!item) goto error;
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
error:
    Py_DECREF(list);
    return NULL;
}

static PyObject *py_read_gguf(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *path_obj;
    if (!PyArg_ParseTuple(args, "O&:read_gguf", PyUnicode_FSConverter, &path_obj)) return NULL;
    tk_gguf *g = NULL;
    tk_status s;
    Py_BEGIN_ALLOW_THREADS
    s = tk_gguf_open(&g, PyBytes_AS_STRING(path_obj));
    Py_END_ALLOW_THREADS
    Py_DECREF(path_obj);
    if (s != TK_OK) return tk_py_raise(s, tk_last_error());
    PyObject *meta = PyDict_New(), *tensors = NULL, *result = NULL;
    const uint8_t *end = g->file.data + g->file.size;
    for (uint64_t i = 0; meta && i < g->n_kv; i++) {
        PyObject *value = gguf_value_to_py(&g->kv[i].value, end, 0), *key = value ? decode_name(g->kv[i].key) : NULL;
        if (!key || PyDict_SetItem(meta, key, value) < 0) {
            Py_XDECREF(value);
            Py_XDECREF(key);
            Py_CLEAR(meta);
            break;
        }
        Py_DECREF(value);
        Py_DECREF(key);
    }
    if (meta) tensors = gguf_tensors_to_py(g);
    if (meta && tensors)
        result = Py_BuildValue("{s:N,s:N,s:I,s:K,s:K}", "metadata", meta, "tensors", tensors, "version", g->version,
                               "alignment", (unsigned long long)g->alignment, "data_offset",
                               (unsigned long long)g->data_offset);
    else {
        Py_XDECREF(meta);
        Py_XDECREF(tensors);
    }
    tk_gguf_close(g);
    return result;
}

/* ---- dequantisation ----------------------------------------------------------------- */

static PyObject *py_dequantize(PyObject *module, PyObject *args)
{
    (void)module;
    int type;
    Py_buffer data;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iy*n:dequantize", &type, &data, &n)) return NULL;
    PyObject *out = NULL;
    size_t need = n >= 0 ? tk_quant_row_bytes(type, (size_t)n) : 0;
    if (!tk_quant_is_supported(type)) {
        PyErr_Format(PyExc_ValueError, "ggml type %d (%s) is not supported", type, tk_quant_type_name(type));
    } else if (n < 0 || (n > 0 && need == 0)) {
        PyErr_Format(PyExc_ValueError, "%zd elements is not a whole number of %s blocks of %d", n,
                     tk_quant_type_name(type), tk_quant_block_elems(type));
    } else if ((size_t)data.len < need) {
        PyErr_Format(PyExc_ValueError, "%zd elements of %s need %zu bytes, got %zd", n, tk_quant_type_name(type), need,
                     data.len);
    } else if ((out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(float)))) {
        float *dst = (float *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        tk_dequantize(dst, data.buf, type, (size_t)n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&data);
    return out;
}

/* ---- architecture descriptors -------------------------------------------------- */

static PyObject *shape_to_py(const tk_arch_tensor *t)
{
    int n = 0;
    while (n < TK_ARCH_MAX_DIMS && t->shape[n]) n++;
    PyObject *shape = PyTuple_New(n);
    for (int d = 0; shape && d < n; d++) {
        PyObject *dim = PyUnicode_FromString(t->shape[d]);
        if (!dim) Py_CLEAR(shape);
        else PyTuple_SET_ITEM(shape, d, dim);
    }
    return shape;
}

static PyObject *arch_tensor_to_py(const tk_arch_tensor *t)
{
    return Py_BuildValue("{s:s,s:N,s:N,s:s,s:z,s:z,s:N,s:N}", "role", tk_role_name((int)t->role), "per_layer",
                         PyBool_FromLong(t->per_layer), "shape", shape_to_py(t), "when", tk_when_name((int)t->when),
                         "gguf", t->gguf, "hf", t->hf, "gguf_rope_rows", PyBool_FromLong(t->gguf_rope_rows),
                         "per_expert", PyBool_FromLong(t->per_expert));
}

static PyObject *arch_lora_to_py(const tk_arch *a, const tk_arch_lora *l)
{
    const tk_arch_tensor *t = tk_arch_tensor_of(a, (int)l->role); /* a 2-D (or more) tensor: tk_arch_validate */
    int n = 0;
    while (n < TK_ARCH_MAX_DIMS && t->shape[n]) n++;
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:N,s:s,s:s,s:N,s:N,s:N}", "name", l->name, "role",
                         tk_role_name((int)l->role), "trained_by", tk_train_name((int)l->trained_by), "peft", l->peft,
                         "per_layer", PyBool_FromLong(t->per_layer), "in", t->shape[n - 1], "out", t->shape[n - 2],
                         "per_expert", PyBool_FromLong(t->per_expert), "a_per_expert",
                         PyBool_FromLong(l->a_per_expert), "b_per_expert", PyBool_FromLong(l->b_per_expert));
}

static PyObject *arch_fused_to_py(const tk_arch *a, int i)
{
    const tk_arch_fused *f = &a->fused[i];
    PyObject *roles = PyTuple_New(f->n_roles);
    for (int r = 0; roles && r < f->n_roles; r++) {
        PyObject *name = PyUnicode_FromString(tk_role_name((int)f->roles[r]));
        if (!name) Py_CLEAR(roles);
        else PyTuple_SET_ITEM(roles, r, name);
    }
    return roles ? Py_BuildValue("{s:s,s:N}", "hf", f->hf, "roles", roles) : NULL;
}

/* A tuple of f(item) over n items; NULL (with the error set) when one fails. */
static PyObject *tuple_of(const tk_arch *a, int n, PyObject *(*f)(const tk_arch *, int))
{
    PyObject *tuple = PyTuple_New(n);
    for (int i = 0; tuple && i < n; i++) {
        PyObject *item = f(a, i);
        if (!item) Py_CLEAR(tuple);
        else PyTuple_SET_ITEM(tuple, i, item);
    }
    return tuple;
}

static PyObject *tensor_at(const tk_arch *a, int i) { return arch_tensor_to_py(&a->tensors[i]); }
static PyObject *vision_at(const tk_arch *a, int i)
{
    const tk_arch_vision_tensor *v = &a->vision[i];
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s}", "name", v->name, "scope", tk_vision_scope_name((int)v->scope), "hf",
                         v->hf, "gguf", v->gguf, "shape", v->shape);
}
static PyObject *lora_at(const tk_arch *a, int i) { return arch_lora_to_py(a, &a->lora[i]); }

static PyObject *arch_to_py(const tk_arch *a)
{
    PyObject *flags = PyDict_New();
    for (int bit = 0; flags && bit < TK_ARCH_FLAG_COUNT; bit++) {
        PyObject *value = PyBool_FromLong((a->flags >> bit) & 1u);
        int failed = PyDict_SetItemString(flags, tk_arch_flag_name(bit), value) < 0;
        Py_DECREF(value);
        if (failed) Py_CLEAR(flags);
    }
    if (!flags) return NULL;
    return Py_BuildValue("{s:s,s:s,s:s,s:z,s:N,s:s,s:N,s:N,s:N,s:N}", "name", a->name, "hf_model_type",
                         a->hf_model_type, "hf_class", a->hf_class, "gguf_name", a->gguf_name, "flags", flags,
                         "hf_config", a->hf_config, "tensors", tuple_of(a, a->n_tensors, tensor_at), "lora",
                         tuple_of(a, a->n_lora, lora_at), "fused", tuple_of(a, a->n_fused, arch_fused_to_py),
                         "vision", tuple_of(a, a->n_vision, vision_at));
}

static PyObject *py_architectures(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    PyObject *all = PyDict_New();
    for (int i = 0; all && i < tk_arch_count(); i++) {
        const tk_arch *a = tk_arch_at(i);
        PyObject *item = arch_to_py(a);
        if (!item || PyDict_SetItemString(all, a->name, item) < 0) Py_CLEAR(all);
        Py_XDECREF(item);
    }
    return all;
}

/* ---- CUDA ---------------------------------------------------------------------- */

#ifdef TK_HAVE_CUDA
#include "../backend/cuda/cuda_probe.h"

static PyObject *cuda_devices_to_py(void)
{
    enum { MAX_GPUS = 16 };
    tk_cuda_device devices[MAX_GPUS];
    char why[512] = "";
    int n;
    Py_BEGIN_ALLOW_THREADS /* the driver's first call can take a while */
    n = tk_cuda_probe(devices, MAX_GPUS, why, sizeof why);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(0);
    for (int i = 0; list && i < n; i++) {
        PyObject *d = Py_BuildValue("{s:s,s:(ii),s:K,s:i}", "name", devices[i].name, "capability", devices[i].major,
                                    devices[i].minor, "memory", (unsigned long long)devices[i].memory,
                                    "multiprocessors", devices[i].multiprocessors);
        if (!d || PyList_Append(list, d) < 0) Py_CLEAR(list);
        Py_XDECREF(d);
    }
    if (!list) return NULL;
    PyObject *out = Py_BuildValue("{s:O,s:N,s:s}", "built", Py_True, "devices", list, "reason", why);
    return out;
}
#endif

static PyObject *py_cuda_probe(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
#ifdef TK_HAVE_CUDA
    return cuda_devices_to_py();
#else
    return Py_BuildValue("{s:O,s:N,s:s}", "built", Py_False, "devices", PyList_New(0), "reason",
                         "this build of tinker has no CUDA code (nvcc was not found when it was built, or "
                         "TINKER_CUDA=0)");
#endif
}

/* ---- the module ---------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"architectures", py_architectures, METH_NOARGS,
     "architectures() -> {name: descriptor}\n\n"
     "The engine's architecture descriptors (csrc/model/arch.c) as plain dicts: name, hf_model_type, hf_class,\n"
     "gguf_name, flags {config key: bool}, hf_config (JSON text), tensors (role, per_layer, shape expressions,\n"
     "when, gguf and hf name patterns, gguf_rope_rows), lora targets (name, role, trained_by, peft module\n"
     "pattern, per_layer, in and out expressions), fused expert forms and vision tensors (name, scope, hf, gguf, shape)."},
    {"read_gguf", py_read_gguf, METH_VARARGS,
     "read_gguf(path) -> dict(metadata, tensors, version, alignment, data_offset)\n\n"
     "Parses and validates a GGUF file; tensor shapes are in PyTorch order and offsets absolute."},
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(ggml_type, data, n) -> bytes of n float32 values"},
    {"cuda_probe", py_cuda_probe, METH_NOARGS,
     "cuda_probe() -> dict(built, devices, reason)\n\n"
     "Whether this build has CUDA code, the GPUs CUDA can run on here (name, capability, memory,\n"
     "multiprocessors) and, when there are none, why."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module)
{
    tk_module_state *state = PyModule_GetState(module);
    tk_status s = tk_arch_validate(); /* a mistake in an architecture table fails the import, not a load */
    if (s != TK_OK) {
        tk_py_raise(s, tk_last_error());
        return -1;
    }
    if (tk_py_add_engine_types(module, state) < 0) return -1;
    return 0;
}

static int module_traverse(PyObject *module, visitproc visit, void *arg)
{
    tk_module_state *state = PyModule_GetState(module);
    Py_VISIT(state->engine_type);
    Py_VISIT(state->model_type);
    Py_VISIT(state->request_type);
    Py_VISIT(state->adapter_type);
    return 0;
}

static int module_clear(PyObject *module)
{
    tk_module_state *state = PyModule_GetState(module);
    Py_CLEAR(state->engine_type);
    Py_CLEAR(state->model_type);
    Py_CLEAR(state->request_type);
    Py_CLEAR(state->adapter_type);
    return 0;
}

static void module_free(void *module) { module_clear((PyObject *)module); }

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030c0000
    /* the engine owns OS threads; one interpreter at a time */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tinker._C",
    .m_doc = "The tinker C engine: model loading, the forward pass, requests and completions.",
    .m_size = sizeof(tk_module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
