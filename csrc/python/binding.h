/* binding.h - shared pieces of the CPython binding (the only C that includes
 * Python.h). module.c holds the module and its free functions, engine.c the
 * Engine, Model and Request types. */
#ifndef TK_BINDING_H
#define TK_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../tk.h"

typedef struct {
    PyTypeObject *engine_type;
    PyTypeObject *model_type;
    PyTypeObject *request_type;
    PyTypeObject *adapter_type;
} tk_module_state;

/* Raises the Python exception that fits `status`, with the engine's message. */
PyObject *tk_py_raise(tk_status status, const char *message);
int tk_py_add_engine_types(PyObject *module, tk_module_state *state);

#endif
