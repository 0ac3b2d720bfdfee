/* tk.h - the engine's C API, as the Python binding (csrc/python/) uses it.
 *
 * Opaque handles with create/free (or retain/release) pairs; every fallible
 * call returns a tk_status and leaves a message in tk_last_error(). Nothing
 * below csrc/python/ includes Python.h.
 *
 *   backend/cpu/cpu_backend.h  the CPU backend (the engine is created with a backend)
 *   core/status.h      status codes and error text
 *   core/engine.h      requests, the worker thread, the completion queue
 *   io/gguf.h          GGUF metadata and tensor infos
 *   io/quant.h         ggml block types and dequantisation
 *   model/arch.h       architecture descriptors: tensor roles, shapes, names, LoRA targets
 *   model/model.h      model config, weights, tensor sources
 *   model/lora.h       LoRA adapters
 *   model/loss.h       losses
 *   model/optim.h      AdamW
 *   model/requests.h   load, forward, forward_backward, optim_step, adapter reads/writes
 *   model/generate.h   sample requests
 *   model/prefix_cache.h  the model's cache of prompt prefixes' keys and values (stats, limit)
 */
#ifndef TK_H
#define TK_H

#include "backend/cpu/cpu_backend.h"
#include "backend/devsim/devsim_backend.h"
#ifdef TK_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#include "core/engine.h"
#include "core/status.h"
#include "io/gguf.h"
#include "io/quant.h"
#include "model/arch.h"
#include "model/lora.h"
#include "model/model.h"
#include "model/requests.h"
#include "model/generate.h"
#include "model/prefix_cache.h"
#include "model/vision.h"

#endif
