/* strmap.c: open addressing with linear probing over FNV-1a hashes; the
 * table is at most half full, so probes stay short. */
#include "strmap.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fault.h"

static uint64_t hash_str(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

ws_status ws_strmap_init(ws_strmap *m, size_t max_keys)
{
    memset(m, 0, sizeof *m);
    size_t cap = 16;
    while (cap / 2 < max_keys) {
        if (cap > SIZE_MAX / 4 / sizeof(size_t))
            return WS_ERR(WS_ERR_NOMEM, "a name table for %zu names is too large", max_keys);
        cap *= 2;
    }
    m->keys = ws_calloc(cap, sizeof *m->keys);
    m->values = ws_malloc(cap * sizeof *m->values);
    if (!m->keys || !m->values) {
        ws_strmap_free(m);
        return WS_ERR(WS_ERR_NOMEM, "out of memory for a name table of %zu names", max_keys);
    }
    m->cap = cap;
    return WS_OK;
}

void ws_strmap_free(ws_strmap *m)
{
    free(m->keys);
    free(m->values);
    memset(m, 0, sizeof *m);
}

int ws_strmap_put(ws_strmap *m, const char *key, size_t value, size_t *existing)
{
    if (!m->cap) return 0;
    size_t mask = m->cap - 1;
    for (size_t i = (size_t)hash_str(key) & mask;; i = (i + 1) & mask) {
        if (!m->keys[i]) {
            if (m->count + 1 > m->cap / 2) return 0;
            m->keys[i] = key;
            m->values[i] = value;
            m->count++;
            return 1;
        }
        if (strcmp(m->keys[i], key) == 0) {
            if (existing) *existing = m->values[i];
            return 0;
        }
    }
}

int ws_strmap_get(const ws_strmap *m, const char *key, size_t *value)
{
    if (!m->cap) return 0;
    size_t mask = m->cap - 1;
    for (size_t i = (size_t)hash_str(key) & mask; m->keys[i]; i = (i + 1) & mask) {
        if (strcmp(m->keys[i], key) == 0) {
            *value = m->values[i];
            return 1;
        }
    }
    return 0;
}
