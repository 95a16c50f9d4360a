/* status.c: the thread-local error message behind ws_status.
 *
 * Each thread keeps its last message and the C location that raised it, so
 * concurrent callers (worker threads, several Lua states) never see each
 * other's errors. Messages are truncated, never allocated: reporting an
 * out-of-memory error must not need memory. */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define WS_MSG_CAP 1024

static _Thread_local char tl_msg[WS_MSG_CAP];
static _Thread_local char tl_loc[128];
static _Thread_local ws_status tl_code;

ws_status ws_seterr(ws_status code, const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tl_msg, sizeof tl_msg, fmt, ap);
    va_end(ap);
    /* Keep only the basename: build paths are noise in a user's message. */
    const char *base = file ? strrchr(file, '/') : NULL;
    snprintf(tl_loc, sizeof tl_loc, "%s:%d", base ? base + 1 : (file ? file : "?"), line);
    tl_code = code;
    return code;
}

void ws_errprefix(const char *fmt, ...)
{
    char prefix[WS_MSG_CAP];
    char old[WS_MSG_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, tl_msg, sizeof old);
    /* Truncation is intended: the message stays bounded. */
    size_t n = strlen(prefix);
    if (n > sizeof tl_msg - 3) n = sizeof tl_msg - 3;
    memcpy(tl_msg, prefix, n);
    memcpy(tl_msg + n, ": ", 2);
    size_t rest = sizeof tl_msg - n - 3, m = strlen(old);
    if (m > rest) m = rest;
    memcpy(tl_msg + n + 2, old, m);
    tl_msg[n + 2 + m] = '\0';
}

const char *ws_errmsg(void) { return tl_msg; }

const char *ws_errloc(void) { return tl_loc; }

ws_status ws_errcode(void) { return tl_code; }

void ws_err_save(ws_err_saved *s)
{
    s->code = tl_code;
    snprintf(s->msg, sizeof s->msg, "%s", tl_msg);
    snprintf(s->loc, sizeof s->loc, "%s", tl_loc);
}

void ws_err_restore(const ws_err_saved *s)
{
    tl_code = s->code;
    snprintf(tl_msg, sizeof tl_msg, "%s", s->msg);
    snprintf(tl_loc, sizeof tl_loc, "%s", s->loc);
}

void ws_errclear(void)
{
    tl_msg[0] = '\0';
    tl_loc[0] = '\0';
    tl_code = WS_OK;
}

const char *ws_status_name(ws_status s)
{
    switch (s) {
    case WS_OK: return "OK";
    case WS_ERR_ARG: return "ERR_ARG";
    case WS_ERR_NOMEM: return "ERR_NOMEM";
    case WS_ERR_DEVICE: return "ERR_DEVICE";
    case WS_ERR_COMM: return "ERR_COMM";
    case WS_ERR_IO: return "ERR_IO";
    case WS_ERR_FORMAT: return "ERR_FORMAT";
    case WS_ERR_DISCARDED: return "ERR_DISCARDED";
    case WS_ERR_FREED: return "ERR_FREED";
    case WS_ERR_UNSUPPORTED: return "ERR_UNSUPPORTED";
    case WS_ERR_INTERRUPTED: return "ERR_INTERRUPTED";
    case WS_ERR_TIMEOUT: return "ERR_TIMEOUT";
    }
    return "ERR_UNKNOWN";
}

const char *ws_format_bytes(char *buf, size_t n, size_t bytes)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double v = (double)bytes;
    int u = 0;
    while (v >= 1024.0 && u < 6) {
        v /= 1024.0;
        u++;
    }
    if (u == 0) snprintf(buf, n, "%zu B", bytes);
    else snprintf(buf, n, "%.1f %s", v, units[u]);
    return buf;
}
