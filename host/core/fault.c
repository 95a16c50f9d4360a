/* fault.c: the allocation fault injector of test builds (see fault.h).
 *
 * One counter per site class, bumped atomically since allocations happen on
 * any thread. Only the N-th allocation fails, not every later one: the code
 * under test must report that single failure and unwind; whether the run
 * then goes on is its own business. */
#include "fault.h"
#include "env.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device.h"

static const char *const site_names[WS_FAULT_NSITES] = {"host", "device", "pinned", "map",
                                                        "backup"};

static int armed_site = -1;
static long armed_n;
static long counts[WS_FAULT_NSITES];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void read_env(void)
{
    const char *v = ws_env_get("WSHOST_FAIL_ALLOC");
    if (!v) return;
    const char *colon = strchr(v, ':');
    char *end = NULL;
    long n = colon ? strtol(colon + 1, &end, 10) : 0;
    for (int i = 0; colon && i < WS_FAULT_NSITES; i++) {
        size_t len = strlen(site_names[i]);
        if ((size_t)(colon - v) == len && strncmp(v, site_names[i], len) == 0 && end &&
            end != colon + 1 && *end == '\0' && n > 0) {
            armed_site = i;
            armed_n = n;
            return;
        }
    }
    /* A test that mistypes the variable must not pass by injecting nothing. */
    fprintf(stderr, "wshost: WSHOST_FAIL_ALLOC='%s' is not SITE:N with SITE one of host, "
            "device, pinned, map, backup and N >= 1\n", v);
    exit(2);
}

int ws_fault_hit(ws_fault_site site)
{
    pthread_once(&once, read_env);
    if ((int)site != armed_site) return 0;
    long k = __atomic_add_fetch(&counts[site], 1, __ATOMIC_RELAXED);
    if (k != armed_n) return 0;
    fprintf(stderr, "wshost: fault injection: failing %s allocation #%ld\n", site_names[site], k);
    return 1;
}

ws_status ws_fault_check(ws_fault_site site, const char *what, size_t bytes)
{
    if (!ws_fault_hit(site)) return WS_OK;
    char h[32];
    ws_format_bytes(h, sizeof h, bytes);
    return WS_ERR(WS_ERR_NOMEM, "out of memory allocating %s (%zu bytes) for %s", h, bytes, what);
}

void *ws_malloc(size_t n)
{
    if (ws_fault_hit(WS_FAULT_HOST)) {
        errno = ENOMEM;
        return NULL;
    }
    return malloc(n);
}

void *ws_calloc(size_t n, size_t size)
{
    if (ws_fault_hit(WS_FAULT_HOST)) {
        errno = ENOMEM;
        return NULL;
    }
    return calloc(n, size);
}

void *ws_realloc(void *p, size_t n)
{
    if (ws_fault_hit(WS_FAULT_HOST)) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(p, n);
}

char *ws_strdup(const char *s)
{
    if (ws_fault_hit(WS_FAULT_HOST)) {
        errno = ENOMEM;
        return NULL;
    }
    return strdup(s);
}

/* ---- the device vtable wrapper ---------------------------------------------------- */

/* One wrapped table per backend (cpu, cuda); a device finds its original
 * through the wrapped table it points at. */
static struct {
    const ws_device_ops *orig;
    ws_device_ops wrapped;
} tables[4];
static int n_tables;
static pthread_mutex_t tables_mu = PTHREAD_MUTEX_INITIALIZER;

static const ws_device_ops *orig_of(const ws_device *d)
{
    for (int i = 0; i < n_tables; i++)
        if (d->ops == &tables[i].wrapped) return tables[i].orig;
    return d->ops;
}

static ws_status injected(ws_device *d, const char *what, size_t bytes)
{
    char h[32];
    ws_format_bytes(h, sizeof h, bytes);
    return WS_ERR(WS_ERR_NOMEM, "%s: out of memory %s %s (%zu bytes)", d->name, what, h, bytes);
}

static ws_status f_alloc(ws_device *d, size_t bytes, void **out)
{
    *out = NULL;
    if (ws_fault_hit(WS_FAULT_DEVICE)) return injected(d, "allocating", bytes);
    return orig_of(d)->alloc(d, bytes, out);
}

static ws_status f_host_alloc(ws_device *d, size_t bytes, void **out)
{
    *out = NULL;
    if (ws_fault_hit(WS_FAULT_PINNED)) return injected(d, "allocating host memory of", bytes);
    return orig_of(d)->host_alloc(d, bytes, out);
}

static ws_status f_vm_reserve(ws_device *d, size_t bytes, void **va)
{
    *va = NULL;
    if (ws_fault_hit(WS_FAULT_MAP)) return injected(d, "reserving address space of", bytes);
    return orig_of(d)->vm_reserve(d, bytes, va);
}

static ws_status f_vm_map(ws_device *d, void *va, size_t bytes)
{
    if (ws_fault_hit(WS_FAULT_MAP)) return injected(d, "mapping pool memory of", bytes);
    return orig_of(d)->vm_map(d, va, bytes);
}

const ws_device_ops *ws_fault_wrap_ops(const ws_device_ops *ops)
{
    if (!ops) return ops;
    pthread_mutex_lock(&tables_mu);
    const ws_device_ops *out = NULL;
    for (int i = 0; i < n_tables && !out; i++)
        if (tables[i].orig == ops || &tables[i].wrapped == ops) out = &tables[i].wrapped;
    if (!out && n_tables < (int)(sizeof tables / sizeof tables[0])) {
        tables[n_tables].orig = ops;
        ws_device_ops *w = &tables[n_tables].wrapped;
        *w = *ops;
        if (ops->alloc) w->alloc = f_alloc;
        if (ops->host_alloc) w->host_alloc = f_host_alloc;
        if (ops->vm_reserve) w->vm_reserve = f_vm_reserve;
        if (ops->vm_map) w->vm_map = f_vm_map;
        out = w;
        n_tables++;
    }
    pthread_mutex_unlock(&tables_mu);
    return out ? out : ops;
}
