/* status.c - thread-local error text for tk_status failures (see status.h). */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

enum { TK_ERROR_TEXT_MAX = 1024 };
static _Thread_local char tk_error_text[TK_ERROR_TEXT_MAX];

tk_status tk_error(tk_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tk_error_text, sizeof tk_error_text, fmt, ap);
    va_end(ap);
    return status;
}

tk_status tk_error_prefix(tk_status status, const char *fmt, ...)
{
    char text[TK_ERROR_TEXT_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    size_t used = n < 0 ? 0 : (size_t)n < sizeof text ? (size_t)n : sizeof text - 1;
    /* append the old message after the prefix, truncating at the buffer's end */
    size_t room = sizeof text - 1 - used, old_len = strlen(tk_error_text);
    memcpy(text + used, tk_error_text, old_len < room ? old_len : room);
    text[used + (old_len < room ? old_len : room)] = '\0';
    memcpy(tk_error_text, text, sizeof text);
    return status;
}

const char *tk_last_error(void) { return tk_error_text; }
