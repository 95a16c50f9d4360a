/* fault.h: allocation fault injection for tests.
 *
 * In a build configured with -DWS_FAULT_INJECTION=ON, the environment
 * variable WSHOST_FAIL_ALLOC="SITE:N" (read once) makes the N-th allocation
 * of one site class fail, as if the memory were not there:
 *   host    heap memory the core keeps for its own bookkeeping (tensor and
 *           pool metadata, plans, batches, request state): ws_malloc & co.
 *   device  device memory (ops->alloc)
 *   pinned  host memory for a device (ops->host_alloc), backups included
 *   map     pool address space and mappings (ops->vm_reserve, ops->vm_map)
 *   backup  the host copy of a pool's contents made by sleep(level=1)
 * Every failure it injects is announced once on stderr ("wshost: fault
 * injection: failing host allocation #N"), so a test knows whether its run
 * reached the N-th allocation at all. In other builds the hooks compile to
 * the plain allocators and `0`. Allocations whose failure already has a
 * fallback needing no memory (the cpu batch index, a storage's written-range
 * growth, a pool's free list) stay plain: failing them changes nothing. */
#ifndef WS_FAULT_H
#define WS_FAULT_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

typedef enum ws_fault_site {
    WS_FAULT_HOST,
    WS_FAULT_DEVICE,
    WS_FAULT_PINNED,
    WS_FAULT_MAP,
    WS_FAULT_BACKUP,
    WS_FAULT_NSITES
} ws_fault_site;

struct ws_device_ops;

#ifdef WS_FAULT_INJECTION
/* 1 when this allocation of `site` is the one to fail. */
int ws_fault_hit(ws_fault_site site);
void *ws_malloc(size_t n);
void *ws_calloc(size_t n, size_t size);
void *ws_realloc(void *p, size_t n);
char *ws_strdup(const char *s);
/* The backend's vtable with alloc, host_alloc, vm_reserve and vm_map
 * going through the hook first (the original is kept for the real work). */
const struct ws_device_ops *ws_fault_wrap_ops(const struct ws_device_ops *ops);
/* WS_OK, or the out-of-memory error an injected failure of `bytes` at `site`
 * reports: for an allocation made through something other than the hooks
 * above, such as a pool's backup. `what` names it ("backup of pool 'kv'"). */
ws_status ws_fault_check(ws_fault_site site, const char *what, size_t bytes);
#else
static inline int ws_fault_hit(ws_fault_site site) { (void)site; return 0; }
static inline void *ws_malloc(size_t n) { return malloc(n); }
static inline void *ws_calloc(size_t n, size_t size) { return calloc(n, size); }
static inline void *ws_realloc(void *p, size_t n) { return realloc(p, n); }
static inline char *ws_strdup(const char *s) { return strdup(s); }
static inline const struct ws_device_ops *ws_fault_wrap_ops(const struct ws_device_ops *ops)
{
    return ops;
}
static inline ws_status ws_fault_check(ws_fault_site site, const char *what, size_t bytes)
{
    (void)site, (void)what, (void)bytes;
    return WS_OK;
}
#endif

#endif
