/* gguf.h - GGUF v2/v3 reader: metadata key/values and tensor infos.
 *
 * Layout (all little-endian): magic "GGUF", u32 version, u64 tensor_count,
 * u64 kv_count, kv_count x (string key, u32 type, value), tensor_count x
 * (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset),
 * zero padding to `general.alignment` (default 32), then the tensor data.
 * Strings are u64 length + bytes, no NUL. ne[0] is the innermost dimension.
 *
 * tk_gguf_open maps the file and validates everything it indexes: every
 * string, value and array lies inside the file, tensor offsets are aligned and
 * each tensor of a known type lies inside the data section. Values are not
 * copied: a tk_gguf_value points into the map and is decoded on demand with
 * tk_gguf_parse_value, which re-checks bounds, so walking never reads past
 * the file. Tensors of types the engine cannot dequantize are indexed with
 * nbytes = 0 and rejected only when a model asks for them.
 */
#ifndef TK_GGUF_H
#define TK_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "file.h"

enum tk_gguf_value_type {
    TK_GGUF_UINT8 = 0, TK_GGUF_INT8 = 1, TK_GGUF_UINT16 = 2, TK_GGUF_INT16 = 3,
    TK_GGUF_UINT32 = 4, TK_GGUF_INT32 = 5, TK_GGUF_FLOAT32 = 6, TK_GGUF_BOOL = 7,
    TK_GGUF_STRING = 8, TK_GGUF_ARRAY = 9, TK_GGUF_UINT64 = 10, TK_GGUF_INT64 = 11,
    TK_GGUF_FLOAT64 = 12,
};

typedef struct {
    uint32_t type;        /* tk_gguf_value_type */
    const uint8_t *data;  /* first byte of the value's encoding in the map */
    size_t size;          /* bytes of the whole encoding */
    /* arrays: element type and count; the elements follow the 12-byte header.
     * strings: count is the byte length and payload points at the bytes. */
    uint32_t elem_type;
    uint64_t count;
    const uint8_t *payload;
} tk_gguf_value;

typedef struct {
    const char *key;      /* NUL-terminated copy */
    tk_gguf_value value;
} tk_gguf_kv;

typedef struct {
    const char *name;     /* NUL-terminated copy */
    uint32_t n_dims;
    uint64_t ne[4];       /* ne[0] innermost; missing dims are 1 */
    uint32_t type;        /* ggml type id */
    uint64_t offset;      /* absolute offset of the first byte in the file */
    uint64_t nbytes;      /* 0 when the type is not one the engine decodes */
} tk_gguf_tensor;

typedef struct {
    tk_mapped_file file;
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset;  /* start of the tensor data section */
    uint64_t n_kv;
    tk_gguf_kv *kv;        /* [n_kv] */
    uint64_t n_tensors;
    tk_gguf_tensor *tensors; /* [n_tensors] */
    char *strings;         /* one block holding every key and name */
} tk_gguf;

tk_status tk_gguf_open(tk_gguf **out, const char *path);
void tk_gguf_close(tk_gguf *gguf);

/* Decodes the value of `type` that starts at p (p < end); bounds-checked. */
tk_status tk_gguf_parse_value(tk_gguf_value *out, const uint8_t *p, const uint8_t *end,
                              uint32_t type, int depth);
/* Byte size of a fixed-size value type, 0 for STRING/ARRAY/unknown. */
size_t tk_gguf_scalar_size(uint32_t type);
const tk_gguf_kv *tk_gguf_find(const tk_gguf *gguf, const char *key);

#endif
