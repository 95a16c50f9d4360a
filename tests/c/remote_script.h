/* remote_script.h: what the scripted trainer and engine of the tests
 * (tests/c/remote_send.c, remote_recv.c) agree on: tensors given as
 * name:dtype:D0xD1..., and the value of element k of tensor i at weight
 * version V, exact in every float dtype so either side can recompute it. */
#ifndef WS_TEST_REMOTE_SCRIPT_H
#define WS_TEST_REMOTE_SCRIPT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "remote.h"

/* Parses "name:dtype:D0xD1..." in place (the name points into arg); 0 or -1. */
static inline int script_parse_tensor(char *arg, ws_wire_tensor *w)
{
    char *c1 = strchr(arg, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c2) return -1;
    *c1 = *c2 = '\0';
    w->name = arg;
    if (ws_dtype_parse(c1 + 1, &w->dtype) != 0) return -1;
    w->ndim = 0;
    for (char *p = c2 + 1; *p && w->ndim < WS_MAX_DIMS;) {
        w->shape[w->ndim++] = strtoll(p, &p, 10);
        if (*p == 'x') p++;
        else if (*p) return -1;
    }
    return 0;
}

static inline double script_value(int64_t k, int i, uint64_t version)
{
    return (double)((7 * k + 13 * i + 3 * (int64_t)version) % 64) / 8.0 - 4.0;
}

#endif
