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
#include "remote.h"

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

/* ---- proofs (FINISH and VERIFY) ---------------------------------------------------- */

/* Smallest encoded proof: two empty strings and three u64. */
#define WS_WIRE_PROOF_MIN (2 * 3 + 3 * 8)

/* u32 n, then per proof {str tensor, str label ("" for none), u64 elem_offset,
 * u64 elem_count, u64 checksum}. The caller checked the strings' lengths. */
static inline void ws_wbuf_proofs(ws_wbuf *w, const ws_proof *p, size_t n)
{
    ws_wbuf_u32(w, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        ws_wbuf_str(w, p[i].tensor);
        ws_wbuf_str(w, p[i].label ? p[i].label : "");
        ws_wbuf_u64(w, p[i].elem_offset);
        ws_wbuf_u64(w, p[i].elem_count);
        ws_wbuf_u64(w, p[i].checksum);
    }
}

/* The count of proofs that follow, or sets r->bad when they cannot fit. */
static inline uint32_t ws_rbuf_proof_count(ws_rbuf *r)
{
    uint32_t n = ws_rbuf_u32(r);
    if (!r->bad && (size_t)n > (r->len - r->pos) / WS_WIRE_PROOF_MIN) r->bad = 1;
    return r->bad ? 0 : n;
}

/* One proof; its strings point into the payload, a label "" becomes NULL. */
static inline ws_proof ws_rbuf_proof(ws_rbuf *r)
{
    ws_proof p;
    p.tensor = ws_rbuf_str(r);
    p.label = ws_rbuf_str(r);
    if (!*p.label) p.label = NULL;
    p.elem_offset = ws_rbuf_u64(r);
    p.elem_count = ws_rbuf_u64(r);
    p.checksum = ws_rbuf_u64(r);
    return p;
}

#endif
