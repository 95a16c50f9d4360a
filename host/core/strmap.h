/* strmap.h: a fixed-capacity hash map from strings to indices.
 *
 * For lookups by name over tens of thousands of tensors (a checkpoint's
 * names, a header's entries). The map does not copy its keys: they must
 * outlive it. It is sized once for the number of keys it will hold. */
#ifndef WS_STRMAP_H
#define WS_STRMAP_H

#include <stddef.h>

#include "status.h"

typedef struct ws_strmap {
    const char **keys; /* NULL: empty slot */
    size_t *values;
    size_t cap;        /* a power of two, at least twice the keys it may hold */
    size_t count;
} ws_strmap;

/* Room for `max_keys` keys. *m is zeroed first, so it can be freed either way. */
ws_status ws_strmap_init(ws_strmap *m, size_t max_keys);
void ws_strmap_free(ws_strmap *m);
/* Adds key -> value. Returns 1 when added, 0 when the key is already there
 * (its value in *existing, when not NULL) or the map is full. */
int ws_strmap_put(ws_strmap *m, const char *key, size_t value, size_t *existing);
/* 1 and the value in *value when key is there, else 0. */
int ws_strmap_get(const ws_strmap *m, const char *key, size_t *value);

#endif
