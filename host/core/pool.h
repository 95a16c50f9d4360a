/* pool.h: sleepable memory pools with stable addresses.
 *
 * A pool reserves a virtual address range once and carves tensors out of it.
 * sleep(level) gives the physical memory back: level 1 first copies the
 * contents to pinned host memory, level 2 discards them. wake() maps memory at
 * the same addresses again and, after a level-1 sleep, restores the contents.
 * The semantics follow vLLM's CuMemAllocator (vllm/device_allocator/cumem.py). On cuda the
 * backend uses cuMemAddressReserve/cuMemCreate/cuMemMap; on the cpu,
 * mmap(PROT_NONE) + madvise(MADV_DONTNEED), which really returns the pages. */
#ifndef WS_POOL_H
#define WS_POOL_H

#include <stddef.h>

#include "device.h"
#include "status.h"
#include "tensor.h"

typedef enum ws_pool_state { WS_POOL_AWAKE = 0, WS_POOL_ASLEEP = 1 } ws_pool_state;

typedef struct ws_pool_stats {
    size_t capacity;     /* reserved bytes */
    size_t used;         /* bytes carved out for tensors */
    size_t mapped;       /* bytes backed by physical memory now */
    size_t backup_bytes; /* contents held in host memory by a level-1 sleep now */
    size_t backup_cached; /* host memory allocated for backups (kept between sleeps on GPUs) */
    int asleep;
    int sleeps;          /* number of sleeps so far */
    int last_level;      /* level of the last sleep, 0 if none */
} ws_pool_stats;

/* Reserves `capacity` bytes (rounded up to the granularity) and maps them. */
ws_status ws_pool_create(ws_device *d, const char *tag, size_t capacity, ws_pool **out);
/* Reserves the address range only: the pool starts asleep with nothing
 * mapped, yet tensors can be carved from it until its first wake, so a dry
 * run lays out a model larger than memory (reads and writes are refused as
 * in a level-2 sleep; wake() maps it). */
ws_status ws_pool_reserve(ws_device *d, const char *tag, size_t capacity, ws_pool **out);
/* Frees the pool; tensors carved from it must already be released. Returns
 * WS_ERR_ARG naming a live tensor otherwise (the pool is then kept). */
ws_status ws_pool_destroy(ws_pool *p);
/* `note` (may be NULL) is kept for error messages, e.g. "step 4". */
ws_status ws_pool_sleep(ws_pool *p, int level, const char *note);
ws_status ws_pool_wake(ws_pool *p);
void ws_pool_get_stats(const ws_pool *p, ws_pool_stats *out);
const char *ws_pool_tag(const ws_pool *p);
ws_device *ws_pool_device(const ws_pool *p);
int ws_pool_is_asleep(const ws_pool *p);
/* Description of the sleep that discarded the contents, for messages:
 * "sleep(level=2) #3 of pool 'weights' (step 4)". */
const char *ws_pool_discard_reason(const ws_pool *p);

/* Holds (a sync plan executing over the pool, a collective in flight into
 * it) keep the pool as it is: C code holds addresses into it and a Lua
 * callback may run meanwhile. While held, sleep and free are refused with
 * WS_ERR_ARG naming the pool and `holder` (copied; the first holder is
 * named). A held pool is awake, so wake has nothing to do. */
void ws_pool_hold(ws_pool *p, const char *holder);
void ws_pool_unhold(ws_pool *p);

/* Pool capacity a tensor of `bytes` takes: its size rounded up to the
 * carving alignment (256). SIZE_MAX when that does not fit in a size_t. Sum
 * it over tensors to size a pool that holds them all at once. */
size_t ws_pool_carve_size(size_t bytes);

/* Used by tensor.c: carve `bytes` (aligned to 256) out of the pool. */
ws_status ws_pool_carve(ws_pool *p, size_t bytes, size_t *offset, void **ptr);
void ws_pool_uncarve(ws_pool *p, size_t offset, size_t bytes);
void ws_pool_register_storage(ws_pool *p, ws_storage *s);
void ws_pool_unregister_storage(ws_pool *p, ws_storage *s);

#endif
