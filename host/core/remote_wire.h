/* remote_wire.h: encoding and decoding of the remote protocol's payloads
 * (remote.h), shared by sender.c and receiver.c only.
 *
 * A writer appends fixed-size integers and byte strings to a growable
 * buffer; a reader takes them back out of a received payload and remembers
 * the first overrun, so a decoder reads every field and checks once. Both
 * ends run on one machine: integers are in host byte order. */
#ifndef WS_REMOTE_WIRE_H
#define WS_REMOTE_WIRE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fault.h"

typedef struct ws_wbuf {
    unsigned char *data;
    size_t len, cap;
    int oom;
} ws_wbuf;

static inline void ws_wbuf_put(ws_wbuf *w, const void *p, size_t n)
{
    if (w->oom) return;
    if (w->len + n > w->cap) {
        size_t cap = w->cap ? w->cap : 256;
        while (cap < w->len + n) cap *= 2;
        unsigned char *d = ws_realloc(w->data, cap);
        if (!d) {
            w->oom = 1;
            return;
        }
        w->data = d;
        w->cap = cap;
    }
    if (n) memcpy(w->data + w->len, p, n);
    w->len += n;
}

static inline void ws_wbuf_u8(ws_wbuf *w, uint8_t v) { ws_wbuf_put(w, &v, sizeof v); }
static inline void ws_wbuf_u16(ws_wbuf *w, uint16_t v) { ws_wbuf_put(w, &v, sizeof v); }
static inline void ws_wbuf_u32(ws_wbuf *w, uint32_t v) { ws_wbuf_put(w, &v, sizeof v); }
static inline void ws_wbuf_u64(ws_wbuf *w, uint64_t v) { ws_wbuf_put(w, &v, sizeof v); }
/* u16 length, the bytes, then a NUL (so a reader can point into the payload). */
static inline void ws_wbuf_str(ws_wbuf *w, const char *s)
{
    size_t n = strlen(s);
    if (n > UINT16_MAX) {
        w->oom = 1; /* refused by the caller's length check before this */
        return;
    }
    ws_wbuf_u16(w, (uint16_t)n);
    ws_wbuf_put(w, s, n + 1);
}
static inline void ws_wbuf_free(ws_wbuf *w)
{
    free(w->data);
    *w = (ws_wbuf){0};
}

typedef struct ws_rbuf {
    const unsigned char *data;
    size_t len, pos;
    int bad;
} ws_rbuf;

static inline int ws_rbuf_get(ws_rbuf *r, void *p, size_t n)
{
    if (r->bad || n > r->len - r->pos) {
        r->bad = 1;
        memset(p, 0, n);
        return 0;
    }
    memcpy(p, r->data + r->pos, n);
    r->pos += n;
    return 1;
}

#define WS_RBUF_INT(bits)                                                                  \
    static inline uint##bits##_t ws_rbuf_u##bits(ws_rbuf *r)                              \
    {                                                                                      \
        uint##bits##_t v;                                                                  \
        ws_rbuf_get(r, &v, sizeof v);                                                      \
        return v;                                                                          \
    }
WS_RBUF_INT(8)
WS_RBUF_INT(16)
WS_RBUF_INT(32)
WS_RBUF_INT(64)
#undef WS_RBUF_INT
/* A string written by ws_wbuf_str, pointing into the payload; "" on overrun. */
static inline const char *ws_rbuf_str(ws_rbuf *r)
{
    size_t n = ws_rbuf_u16(r);
    if (r->bad || n + 1 > r->len - r->pos || r->data[r->pos + n] != '\0' ||
        memchr(r->data + r->pos, '\0', n)) {
        r->bad = 1;
        return "";
    }
    const char *s = (const char *)r->data + r->pos;
    r->pos += n + 1;
    return s;
}

#endif
