/* gguf.c - GGUF v2/v3 reader (see gguf.h for the format and invariants). */
#include "gguf.h"

#include <stdlib.h>
#include <string.h>

#include "quant.h"

enum { GGUF_DEFAULT_ALIGNMENT = 32, GGUF_MAX_NAME = 64, GGUF_MAX_DEPTH = 8 };

/* A bounds-checked cursor over the mapped file. */
typedef struct {
    const uint8_t *p, *end, *start;
    const char *path;
} cursor;

static uint64_t cursor_offset(const cursor *c) { return (uint64_t)(c->p - c->start); }

static tk_status truncated(const cursor *c, const char *what)
{
    return tk_error(TK_ERR_FORMAT, "%s: truncated GGUF file: %s at byte %llu runs past the end "
                    "(file has %llu bytes)", c->path, what, (unsigned long long)cursor_offset(c),
                    (unsigned long long)(c->end - c->start));
}

static tk_status read_bytes(cursor *c, void *dst, size_t n, const char *what)
{
    if ((size_t)(c->end - c->p) < n) return truncated(c, what);
    memcpy(dst, c->p, n);
    c->p += n;
    return TK_OK;
}

static tk_status read_u32(cursor *c, uint32_t *v, const char *what) { return read_bytes(c, v, 4, what); }
static tk_status read_u64(cursor *c, uint64_t *v, const char *what) { return read_bytes(c, v, 8, what); }

/* Reads a length-prefixed string; *s points into the map (not NUL-terminated). */
static tk_status read_string(cursor *c, const uint8_t **s, uint64_t *len, const char *what)
{
    TK_TRY(read_u64(c, len, what));
    if ((uint64_t)(c->end - c->p) < *len) return truncated(c, what);
    *s = c->p;
    c->p += *len;
    return TK_OK;
}

size_t tk_gguf_scalar_size(uint32_t type)
{
    switch (type) {
    case TK_GGUF_UINT8: case TK_GGUF_INT8: case TK_GGUF_BOOL: return 1;
    case TK_GGUF_UINT16: case TK_GGUF_INT16: return 2;
    case TK_GGUF_UINT32: case TK_GGUF_INT32: case TK_GGUF_FLOAT32: return 4;
    case TK_GGUF_UINT64: case TK_GGUF_INT64: case TK_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

tk_status tk_gguf_parse_value(tk_gguf_value *out, const uint8_t *p, const uint8_t *end,
                              uint32_t type, int depth)
{
    memset(out, 0, sizeof *out);
    out->type = type;
    out->data = p;
    size_t avail = (size_t)(end - p);
    size_t scalar = tk_gguf_scalar_size(type);
    if (scalar) {
        if (avail < scalar) return tk_error(TK_ERR_FORMAT, "value runs past the end of the file");
        if (type == TK_GGUF_BOOL && p[0] > 1)
            return tk_error(TK_ERR_FORMAT, "bool value is %u, expected 0 or 1", p[0]);
        out->size = scalar;
        out->payload = p;
        return TK_OK;
    }
    if (type == TK_GGUF_STRING) {
        uint64_t len;
        if (avail < 8) return tk_error(TK_ERR_FORMAT, "string length runs past the end of the file");
        memcpy(&len, p, 8);
        if (len > avail - 8) return tk_error(TK_ERR_FORMAT, "string of %llu bytes runs past the end of the file",
                                             (unsigned long long)len);
        out->count = len;
        out->payload = p + 8;
        out->size = 8 + (size_t)len;
        return TK_OK;
    }
    if (type != TK_GGUF_ARRAY) return tk_error(TK_ERR_FORMAT, "unknown metadata value type %u", type);
    if (depth >= GGUF_MAX_DEPTH) return tk_error(TK_ERR_FORMAT, "arrays nested deeper than %d", GGUF_MAX_DEPTH);
    if (avail < 12) return tk_error(TK_ERR_FORMAT, "array header runs past the end of the file");
    memcpy(&out->elem_type, p, 4);
    memcpy(&out->count, p + 4, 8);
    out->payload = p + 12;
    size_t elem = tk_gguf_scalar_size(out->elem_type);
    if (elem) {
        if (out->count > (avail - 12) / elem)
            return tk_error(TK_ERR_FORMAT, "array of %llu elements runs past the end of the file",
                            (unsigned long long)out->count);
        for (uint64_t i = 0; out->elem_type == TK_GGUF_BOOL && i < out->count; i++)
            if (out->payload[i] > 1) return tk_error(TK_ERR_FORMAT, "bool array element is %u", out->payload[i]);
        out->size = 12 + (size_t)out->count * elem;
        return TK_OK;
    }
    /* strings or nested arrays: walk every element */
    const uint8_t *q = out->payload;
    for (uint64_t i = 0; i < out->count; i++) {
        tk_gguf_value item;
        TK_TRY(tk_gguf_parse_value(&item, q, end, out->elem_type, depth + 1));
        q += item.size;
    }
    out->size = (size_t)(q - p);
    return TK_OK;
}

/* Keys and tensor names must be UTF-8 (they become Python str); values are
 * decoded leniently by the binding. */
static int valid_utf8(const uint8_t *s, uint64_t n)
{
    for (uint64_t i = 0; i < n;) {
        uint8_t c = s[i];
        int extra = c < 0x80 ? 0 : (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2 : (c & 0xf8) == 0xf0 ? 3 : -1;
        if (extra < 0 || (extra == 1 && c < 0xc2) || i + (uint64_t)extra >= n + (extra == 0)) return 0;
        for (int k = 1; k <= extra; k++)
            if ((s[i + (uint64_t)k] & 0xc0) != 0x80) return 0;
        i += (uint64_t)extra + 1;
    }
    return 1;
}

/* Copies a name into the string block; returns its offset in the block. */
static size_t intern(char *block, size_t *used, const uint8_t *s, uint64_t len)
{
    size_t at = *used;
    if (block) {
        memcpy(block + at, s, (size_t)len);
        block[at + len] = '\0';
    }
    *used += (size_t)len + 1;
    return at;
}

static tk_status read_header(tk_gguf *g, cursor *c)
{
    uint32_t magic = 0;
    TK_TRY(read_u32(c, &magic, "magic"));
    if (magic != 0x46554747u) /* "GGUF" */
        return tk_error(TK_ERR_FORMAT, "%s: not a GGUF file (the first 4 bytes are not \"GGUF\")", c->path);
    TK_TRY(read_u32(c, &g->version, "version"));
    if ((g->version & 0xffffu) == 0)
        return tk_error(TK_ERR_UNSUPPORTED, "%s: big-endian GGUF files are not supported", c->path);
    if (g->version < 2 || g->version > 3)
        return tk_error(TK_ERR_UNSUPPORTED, "%s: GGUF version %u is not supported (expected 2 or 3)",
                        c->path, g->version);
    TK_TRY(read_u64(c, &g->n_tensors, "tensor count"));
    TK_TRY(read_u64(c, &g->n_kv, "metadata count"));
    size_t size = (size_t)(c->end - c->start);
    /* every kv takes >= 13 bytes and every tensor info >= 28: cheap sanity bound */
    if (g->n_kv > size / 13 || g->n_tensors > size / 28)
        return tk_error(TK_ERR_FORMAT, "%s: header claims %llu metadata entries and %llu tensors, "
                        "more than a %zu-byte file can hold", c->path, (unsigned long long)g->n_kv,
                        (unsigned long long)g->n_tensors, size);
    return TK_OK;
}

/* Walks the keys and tensor infos, validating them. Runs twice: first with
 * block == NULL to size the string block, then to fill names into it. */
static tk_status walk_infos(tk_gguf *g, cursor *c, char *block, size_t *used)
{
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const uint8_t *key = NULL;
        uint64_t key_len = 0;
        uint32_t type = 0;
        TK_TRY(read_string(c, &key, &key_len, "metadata key"));
        if (!valid_utf8(key, key_len))
            return tk_error(TK_ERR_FORMAT, "%s: metadata key %llu is not valid UTF-8", c->path, (unsigned long long)i);
        TK_TRY(read_u32(c, &type, "metadata value type"));
        tk_gguf_kv *kv = &g->kv[i];
        size_t key_at = intern(block, used, key, key_len);
        kv->key = block ? block + key_at : NULL;
        if (tk_gguf_parse_value(&kv->value, c->p, c->end, type, 0) != TK_OK)
            return tk_error_prefix(TK_ERR_FORMAT, "%s: metadata '%.*s': ", c->path,
                                   (int)(key_len > 200 ? 200 : key_len), (const char *)key);
        c->p += kv->value.size;
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        tk_gguf_tensor *t = &g->tensors[i];
        const uint8_t *name = NULL;
        uint64_t name_len = 0;
        TK_TRY(read_string(c, &name, &name_len, "tensor name"));
        if (!valid_utf8(name, name_len))
            return tk_error(TK_ERR_FORMAT, "%s: the name of tensor %llu is not valid UTF-8", c->path,
                            (unsigned long long)i);
        if (name_len >= GGUF_MAX_NAME)
            return tk_error(TK_ERR_FORMAT, "%s: tensor %llu has a name of %llu bytes (at most %d allowed)",
                            c->path, (unsigned long long)i, (unsigned long long)name_len, GGUF_MAX_NAME - 1);
        size_t name_at = intern(block, used, name, name_len);
        t->name = block ? block + name_at : NULL;
        TK_TRY(read_u32(c, &t->n_dims, "tensor dimension count"));
        if (t->n_dims < 1 || t->n_dims > 4)
            return tk_error(TK_ERR_FORMAT, "%s: tensor '%.*s' has %u dimensions (expected 1 to 4)", c->path,
                            (int)name_len, (const char *)name, t->n_dims);
        for (int d = 0; d < 4; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) TK_TRY(read_u64(c, &t->ne[d], "tensor shape"));
        TK_TRY(read_u32(c, &t->type, "tensor type"));
        TK_TRY(read_u64(c, &t->offset, "tensor offset"));
    }
    return TK_OK;
}

static tk_status read_alignment(tk_gguf *g, const char *path)
{
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const tk_gguf_kv *kv = tk_gguf_find(g, "general.alignment");
    if (!kv) return TK_OK;
    if (kv->value.type != TK_GGUF_UINT32)
        return tk_error(TK_ERR_FORMAT, "%s: general.alignment must be a uint32 (got value type %u)", path,
                        kv->value.type);
    uint32_t a;
    memcpy(&a, kv->value.payload, 4);
    if (a == 0 || (a & (a - 1)) != 0)
        return tk_error(TK_ERR_FORMAT, "%s: general.alignment is %u, expected a power of two", path, a);
    g->alignment = a;
    return TK_OK;
}

/* Checks each tensor's shape, alignment and extent; turns offsets absolute. */
static tk_status place_tensors(tk_gguf *g, const char *path, uint64_t end_of_infos)
{
    uint64_t size = g->file.size;
    g->data_offset = end_of_infos + (g->alignment - end_of_infos % g->alignment) % g->alignment;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        tk_gguf_tensor *t = &g->tensors[i];
        uint64_t n = 1;
        for (int d = 0; d < 4; d++) {
            if (t->ne[d] == 0 || t->ne[d] > ((uint64_t)1 << 40) || n > (((uint64_t)1 << 50) / t->ne[d]))
                return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' has an invalid shape (dimension %d is %llu)",
                                path, t->name, d, (unsigned long long)t->ne[d]);
            n *= t->ne[d];
        }
        if (t->offset % g->alignment != 0)
            return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' offset %llu is not a multiple of the alignment %llu",
                            path, t->name, (unsigned long long)t->offset, (unsigned long long)g->alignment);
        if (t->offset > size || g->data_offset > size - t->offset)
            return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' starts at byte %llu, past the end of the file "
                            "(%llu bytes)", path, t->name, (unsigned long long)(g->data_offset + t->offset),
                            (unsigned long long)size);
        t->offset += g->data_offset;
        t->nbytes = 0;
        if (!tk_quant_is_supported((int)t->type)) continue;
        if (t->ne[0] % (uint64_t)tk_quant_block_elems((int)t->type) != 0)
            return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' of type %s has a row of %llu elements, not a "
                            "multiple of the block size %d", path, t->name, tk_quant_type_name((int)t->type),
                            (unsigned long long)t->ne[0], tk_quant_block_elems((int)t->type));
        t->nbytes = tk_quant_row_bytes((int)t->type, t->ne[0]) * (n / t->ne[0]);
        if (t->nbytes > size - t->offset)
            return tk_error(TK_ERR_FORMAT, "%s: tensor '%s' (%llu bytes at byte %llu) runs past the end of the "
                            "file (%llu bytes); the file is truncated or the offset is wrong", path, t->name,
                            (unsigned long long)t->nbytes, (unsigned long long)t->offset,
                            (unsigned long long)size);
    }
    return TK_OK;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Returns a name that occurs twice in names[n] (sorted in place), or NULL. */
static const char *find_duplicate(const char **names, uint64_t n)
{
    qsort(names, (size_t)n, sizeof *names, compare_names);
    for (uint64_t i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0) return names[i];
    return NULL;
}

static tk_status check_duplicates(const tk_gguf *g, const char *path)
{
    uint64_t most = g->n_kv > g->n_tensors ? g->n_kv : g->n_tensors;
    const char **names = malloc((size_t)(most ? most : 1) * sizeof *names);
    if (!names) return tk_error(TK_ERR_NOMEM, "%s: out of memory indexing GGUF", path);
    for (uint64_t i = 0; i < g->n_kv; i++) names[i] = g->kv[i].key;
    const char *dup = find_duplicate(names, g->n_kv);
    tk_status s = dup ? tk_error(TK_ERR_FORMAT, "%s: metadata key '%s' appears twice", path, dup) : TK_OK;
    for (uint64_t i = 0; s == TK_OK && i < g->n_tensors; i++) names[i] = g->tensors[i].name;
    if (s == TK_OK && (dup = find_duplicate(names, g->n_tensors)))
        s = tk_error(TK_ERR_FORMAT, "%s: tensor '%s' appears twice", path, dup);
    free(names);
    return s;
}

static tk_status parse(tk_gguf *g, const char *path)
{
    cursor c = {g->file.data, g->file.data + g->file.size, g->file.data, path};
    TK_TRY(read_header(g, &c));
    g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->kv || !g->tensors) return tk_error(TK_ERR_NOMEM, "%s: out of memory indexing GGUF", path);
    const uint8_t *first_kv = c.p;
    size_t names_bytes = 0;
    TK_TRY(walk_infos(g, &c, NULL, &names_bytes));
    uint64_t end_of_infos = cursor_offset(&c);
    g->strings = malloc(names_bytes ? names_bytes : 1);
    if (!g->strings) return tk_error(TK_ERR_NOMEM, "%s: out of memory indexing GGUF", path);
    c.p = first_kv;
    names_bytes = 0;
    TK_TRY(walk_infos(g, &c, g->strings, &names_bytes));
    TK_TRY(check_duplicates(g, path));
    TK_TRY(read_alignment(g, path));
    return place_tensors(g, path, end_of_infos);
}

tk_status tk_gguf_open(tk_gguf **out, const char *path)
{
    *out = NULL;
    tk_gguf *g = calloc(1, sizeof *g);
    if (!g) return tk_error(TK_ERR_NOMEM, "%s: out of memory", path);
    tk_status s = tk_file_map(&g->file, path);
    if (s == TK_OK) s = parse(g, path);
    if (s != TK_OK) {
        tk_gguf_close(g);
        return s;
    }
    *out = g;
    return TK_OK;
}

void tk_gguf_close(tk_gguf *g)
{
    if (!g) return;
    tk_file_unmap(&g->file);
    free(g->kv);
    free(g->tensors);
    free(g->strings);
    free(g);
}

const tk_gguf_kv *tk_gguf_find(const tk_gguf *g, const char *key)
{
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (strcmp(g->kv[i].key, key) == 0) return &g->kv[i];
    return NULL;
}
