/* status.h - status codes and the human-readable error text of the last failure.
 *
 * Every fallible function in the engine returns a tk_status and, on failure,
 * records a message with tk_error() saying what was wrong (which file, tensor
 * or field; expected vs got). The message lives in thread-local storage, so a
 * caller reads it with tk_last_error() on the same thread right after the
 * failing call (the engine worker copies it into the request it was running).
 * Nothing here ever exits or aborts: the process is a user's notebook.
 */
#ifndef TK_STATUS_H
#define TK_STATUS_H

typedef enum {
    TK_OK = 0,
    TK_ERR_IO = 1,          /* a file could not be opened, mapped or read */
    TK_ERR_FORMAT = 2,      /* a file's contents are malformed or truncated */
    TK_ERR_INVALID = 3,     /* an argument or request is invalid */
    TK_ERR_UNSUPPORTED = 4, /* valid, but not implemented (tensor type, rope kind) */
    TK_ERR_NOMEM = 5,       /* an allocation failed */
    TK_ERR_INTERNAL = 6,    /* a broken invariant inside the engine */
    TK_ERR_CANCELLED = 7,   /* the submitter cancelled the request */
} tk_status;

#if defined(__GNUC__)
#define TK_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define TK_PRINTF(a, b)
#endif

/* Records the message for this thread and returns `status`, so callers write
 * `return tk_error(TK_ERR_FORMAT, "...", ...);`. */
tk_status tk_error(tk_status status, const char *fmt, ...) TK_PRINTF(2, 3);

/* Prefixes the current thread's message with more context ("file.gguf: ..."). */
tk_status tk_error_prefix(tk_status status, const char *fmt, ...) TK_PRINTF(2, 3);

const char *tk_last_error(void);

#define TK_TRY(expr)                      \
    do {                                  \
        tk_status tk_try_s_ = (expr);     \
        if (tk_try_s_ != TK_OK) return tk_try_s_; \
    } while (0)

#endif
