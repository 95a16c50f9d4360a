/* status.h: error reporting for the wshost core.
 *
 * Core functions return a ws_status. On failure they record a message (what
 * was being done, to what, and what to do) in a thread-local buffer with the
 * C location that raised it. The Lua bindings turn that into a Lua error or a
 * `nil, message, code` triple; C embedders read it with ws_errmsg(). */
#ifndef WS_STATUS_H
#define WS_STATUS_H

#include <stddef.h>

typedef enum ws_status {
    WS_OK = 0,
    WS_ERR_ARG,         /* misuse: bad argument, shape mismatch, out of range */
    WS_ERR_NOMEM,       /* allocation failed (host or device) */
    WS_ERR_DEVICE,      /* device absent or a device API failed */
    WS_ERR_COMM,        /* a collective failed or a peer died */
    WS_ERR_IO,          /* file system */
    WS_ERR_FORMAT,      /* malformed file */
    WS_ERR_DISCARDED,   /* read of contents discarded by a pool sleep */
    WS_ERR_FREED,       /* use of a released tensor or object */
    WS_ERR_UNSUPPORTED, /* valid request this build or device cannot do */
    WS_ERR_INTERRUPTED, /* stopped by a signal */
    WS_ERR_TIMEOUT
} ws_status;

/* Records an error and returns `code`; use through WS_ERR. */
ws_status ws_seterr(ws_status code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define WS_ERR(code, ...) ws_seterr((code), __FILE__, __LINE__, __VA_ARGS__)

/* Prefixes the current message with context: "copy_ into 'x': <old message>". */
void ws_errprefix(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

const char *ws_errmsg(void);        /* message of the last error on this thread */
const char *ws_errloc(void);        /* "file.c:123" of the last error */
ws_status ws_errcode(void);
const char *ws_status_name(ws_status s); /* "ERR_ARG", ... */
void ws_errclear(void);

/* This thread's error, kept across work that may overwrite it (telling a
 * peer about it, cleaning up) and put back as it was. */
typedef struct ws_err_saved {
    ws_status code;
    char msg[1024];
    char loc[128];
} ws_err_saved;
void ws_err_save(ws_err_saved *s);
void ws_err_restore(const ws_err_saved *s);

/* Writes a byte count for a message, "1.5 GiB" (binary units, one decimal;
 * plain "512 B" below 1 KiB), into buf[n] and returns buf. */
const char *ws_format_bytes(char *buf, size_t n, size_t bytes);

#define WS_TRY(expr)                                                                   \
    do {                                                                               \
        ws_status ws_try_rc_ = (expr);                                                 \
        if (ws_try_rc_ != WS_OK) return ws_try_rc_;                                    \
    } while (0)

#endif
