/* pool.c: sleepable memory pools with stable addresses.
 *
 * A pool reserves one virtual range on its device and maps it whole at
 * creation. Tensors are carved out of it (256-byte aligned, first fit over
 * freed blocks, else bump). sleep(1) copies the used prefix to host memory
 * from the device's host_alloc (pinned on cuda) and unmaps; sleep(2) unmaps
 * and forgets the contents: every storage carved from the pool has its
 * written ranges cleared, so a later read names the sleep that discarded it.
 * wake() maps the same addresses again and restores a level-1 backup; the
 * backup buffer is kept for the next level-1 sleep (see ws_pool_wake). The
 * pool tracks its storages in a pointer hash set so destroy can name a tensor
 * still alive and a discard can reach every storage, even with 100k tensors. */
#include "pool.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fault.h"

#define POOL_ALIGN 256

struct ws_pool {
    ws_device *dev;
    char tag[64];
    void *va;
    size_t capacity; /* reserved and (when awake) mapped bytes */
    size_t top;      /* bump pointer: bytes [0, top) have been handed out */
    size_t used;     /* bytes carved and not yet returned */
    ws_range *holes; /* freed blocks below top, sorted, merged */
    size_t n_holes, cap_holes;
    size_t mapped;
    void *backup;        /* host memory for a level-1 backup (kept between sleeps) */
    size_t backup_cap;   /* bytes allocated at `backup` */
    size_t backup_bytes; /* bytes of contents held there now; 0 when awake */
    int asleep, sleeps, last_level;
    int reserved; /* made by ws_pool_reserve and never mapped since: carving allowed asleep */
    char reason[200]; /* the last discarding sleep; empty if none */
    int holds;
    char holder[128]; /* the first of the current holds */
    /* Registered storages: open addressing, tombstones marked by &tomb. */
    ws_storage **slots;
    size_t n_slots, n_live, n_used;
    pthread_mutex_t mu;
};

static ws_storage tomb;

/* ---- the storage set ------------------------------------------------------------- */

static size_t slot_of(const ws_pool *p, const ws_storage *s)
{
    uint64_t h = (uint64_t)(uintptr_t)s * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 17) & (p->n_slots - 1);
}

static int set_rehash(ws_pool *p, size_t n_slots)
{
    ws_storage **old = p->slots;
    size_t old_n = p->n_slots;
    ws_storage **fresh = ws_calloc(n_slots, sizeof *fresh);
    if (!fresh) return -1;
    p->slots = fresh;
    p->n_slots = n_slots;
    p->n_used = p->n_live;
    for (size_t i = 0; i < old_n; i++) {
        ws_storage *s = old[i];
        if (!s || s == &tomb) continue;
        size_t k = slot_of(p, s);
        while (p->slots[k]) k = (k + 1) & (n_slots - 1);
        p->slots[k] = s;
    }
    free(old);
    return 0;
}

/* Makes room for one more insertion, so registering never fails. */
static int set_reserve(ws_pool *p)
{
    if ((p->n_used + 1) * 2 <= p->n_slots) return 0;
    size_t n = p->n_slots ? p->n_slots : 64;
    while ((p->n_live + 1) * 2 > n / 2) n *= 2; /* leave the table at most a quarter full */
    return set_rehash(p, n);
}

void ws_pool_register_storage(ws_pool *p, ws_storage *s)
{
    pthread_mutex_lock(&p->mu);
    if (set_reserve(p) == 0) {
        size_t k = slot_of(p, s);
        while (p->slots[k] && p->slots[k] != &tomb) k = (k + 1) & (p->n_slots - 1);
        if (!p->slots[k]) p->n_used++;
        p->slots[k] = s;
        p->n_live++;
    }
    pthread_mutex_unlock(&p->mu);
}

void ws_pool_unregister_storage(ws_pool *p, ws_storage *s)
{
    pthread_mutex_lock(&p->mu);
    if (p->n_slots) {
        size_t k = slot_of(p, s);
        while (p->slots[k]) {
            if (p->slots[k] == s) {
                p->slots[k] = &tomb;
                p->n_live--;
                break;
            }
            k = (k + 1) & (p->n_slots - 1);
        }
    }
    pthread_mutex_unlock(&p->mu);
}

/* ---- carving ---------------------------------------------------------------------- */

size_t ws_pool_carve_size(size_t bytes)
{
    if (bytes > SIZE_MAX - POOL_ALIGN) return SIZE_MAX;
    return (bytes + POOL_ALIGN - 1) & ~(size_t)(POOL_ALIGN - 1);
}

ws_status ws_pool_carve(ws_pool *p, size_t bytes, size_t *offset, void **ptr)
{
    *ptr = NULL;
    *offset = 0;
    size_t need = ws_pool_carve_size(bytes);
    if (need == SIZE_MAX)
        return WS_ERR(WS_ERR_NOMEM, "pool '%s': a tensor of %zu bytes cannot fit", p->tag, bytes);
    ws_status rc = WS_OK;
    pthread_mutex_lock(&p->mu);
    if (p->asleep && !p->reserved) {
        rc = WS_ERR(WS_ERR_ARG, "pool '%s' is asleep: wake it (pool:wake()) before creating "
                    "tensors in it", p->tag);
        goto out;
    }
    /* Reserve the registration slot now: register cannot report failure. */
    if (set_reserve(p) != 0) {
        rc = WS_ERR(WS_ERR_NOMEM, "pool '%s': out of host memory tracking tensors", p->tag);
        goto out;
    }
    for (size_t i = 0; i < p->n_holes; i++) {
        ws_range *h = &p->holes[i];
        if (h->end - h->begin < need) continue;
        *offset = h->begin;
        h->begin += need;
        if (h->begin == h->end) {
            memmove(h, h + 1, (p->n_holes - i - 1) * sizeof *h);
            p->n_holes--;
        }
        goto found;
    }
    if (need > p->capacity - p->top) {
        char a[32], b[32], c[32];
        ws_format_bytes(a, sizeof a, bytes);
        ws_format_bytes(b, sizeof b, p->capacity - p->used);
        ws_format_bytes(c, sizeof c, p->capacity);
        rc = WS_ERR(WS_ERR_NOMEM, "pool '%s' is full: need %s, %s of %s free (%zu bytes at the "
                    "end); create the pool with more bytes", p->tag, a, b, c,
                    p->capacity - p->top);
        goto out;
    }
    *offset = p->top;
    p->top += need;
found:
    p->used += need;
    *ptr = (char *)p->va + *offset;
out:
    pthread_mutex_unlock(&p->mu);
    return rc;
}

void ws_pool_uncarve(ws_pool *p, size_t offset, size_t bytes)
{
    size_t len = ws_pool_carve_size(bytes);
    if (!len) return;
    pthread_mutex_lock(&p->mu);
    p->used -= len;
    size_t b = offset, e = offset + len;
    /* Insert [b, e) into the sorted holes, merging neighbours. */
    size_t i = 0;
    while (i < p->n_holes && p->holes[i].end < b) i++;
    size_t j = i;
    while (j < p->n_holes && p->holes[j].begin <= e) {
        if (p->holes[j].begin < b) b = p->holes[j].begin;
        if (p->holes[j].end > e) e = p->holes[j].end;
        j++;
    }
    if (e == p->top) {
        /* The freed block reaches the bump pointer: give it back there. */
        p->top = b;
        if (p->n_holes > j)
            memmove(&p->holes[i], &p->holes[j], (p->n_holes - j) * sizeof *p->holes);
        p->n_holes -= j - i;
    } else if (j > i) {
        p->holes[i] = (ws_range){b, e};
        memmove(&p->holes[i + 1], &p->holes[j], (p->n_holes - j) * sizeof *p->holes);
        p->n_holes -= j - i - 1;
    } else {
        if (p->n_holes == p->cap_holes) {
            size_t cap = p->cap_holes ? 2 * p->cap_holes : 16;
            ws_range *grown = realloc(p->holes, cap * sizeof *grown);
            if (!grown) {
                /* Leak the block inside the pool rather than fail a free:
                 * the pool only loses this much capacity until destroyed. */
                pthread_mutex_unlock(&p->mu);
                return;
            }
            p->holes = grown;
            p->cap_holes = cap;
        }
        memmove(&p->holes[i + 1], &p->holes[i], (p->n_holes - i) * sizeof *p->holes);
        p->holes[i] = (ws_range){b, e};
        p->n_holes++;
    }
    pthread_mutex_unlock(&p->mu);
}

/* ---- holds ---------------------------------------------------------------------- */

void ws_pool_hold(ws_pool *p, const char *holder)
{
    if (p->holds++ == 0) snprintf(p->holder, sizeof p->holder, "%s", holder ? holder : "?");
}

void ws_pool_unhold(ws_pool *p)
{
    if (p->holds > 0) p->holds--;
}

static ws_status check_unheld(const ws_pool *p, const char *what)
{
    if (!p->holds) return WS_OK;
    return WS_ERR(WS_ERR_ARG, "%s: pool '%s' is in use by %s; %s it once that has finished",
                  what, p->tag, p->holder, what);
}

/* ---- lifecycle ------------------------------------------------------------------- */

static ws_status pool_make(ws_device *d, const char *tag, size_t capacity, int map,
                           ws_pool **out)
{
    *out = NULL;
    if (!tag || !*tag) tag = "pool";
    if (capacity == 0)
        return WS_ERR(WS_ERR_ARG, "pool '%s': capacity must be more than 0 bytes", tag);
    size_t g = d->ops->vm_granularity(d);
    if (g == 0) g = POOL_ALIGN;
    if (capacity > SIZE_MAX - g)
        return WS_ERR(WS_ERR_NOMEM, "pool '%s': capacity of %zu bytes is too large", tag, capacity);
    size_t cap = (capacity + g - 1) / g * g;
    ws_pool *p = ws_calloc(1, sizeof *p);
    if (!p) return WS_ERR(WS_ERR_NOMEM, "pool '%s': out of host memory", tag);
    snprintf(p->tag, sizeof p->tag, "%s", tag);
    p->dev = d;
    p->capacity = cap;
    pthread_mutex_init(&p->mu, NULL);
    ws_status rc = d->ops->vm_reserve(d, cap, &p->va);
    if (rc == WS_OK && map) {
        rc = d->ops->vm_map(d, p->va, cap);
        if (rc != WS_OK) d->ops->vm_release(d, p->va, cap);
    }
    if (rc != WS_OK) {
        ws_errprefix("creating pool '%s'", p->tag); /* the device names itself */
        pthread_mutex_destroy(&p->mu);
        free(p);
        return rc;
    }
    if (map) {
        p->mapped = cap;
        ws_device_account(d, (ptrdiff_t)cap);
    } else {
        /* Asleep from birth, as after a level-2 sleep: nothing to restore,
         * and a read names why the bytes are not there. */
        p->asleep = 1;
        p->last_level = 2;
        p->reserved = 1;
        snprintf(p->reason, sizeof p->reason,
                 "pool '%s' was reserved without memory (a dry run)", p->tag);
    }
    *out = p;
    return WS_OK;
}

ws_status ws_pool_create(ws_device *d, const char *tag, size_t capacity, ws_pool **out)
{
    return pool_make(d, tag, capacity, 1, out);
}

ws_status ws_pool_reserve(ws_device *d, const char *tag, size_t capacity, ws_pool **out)
{
    return pool_make(d, tag, capacity, 0, out);
}

ws_status ws_pool_destroy(ws_pool *p)
{
    if (!p) return WS_OK;
    WS_TRY(check_unheld(p, "free"));
    pthread_mutex_lock(&p->mu);
    size_t live = p->n_live;
    const ws_storage *one = NULL;
    for (size_t i = 0; i < p->n_slots && !one; i++)
        if (p->slots[i] && p->slots[i] != &tomb) one = p->slots[i];
    pthread_mutex_unlock(&p->mu);
    if (live)
        return WS_ERR(WS_ERR_ARG, "pool '%s' still has %zu live tensor%s ('%s'%s); free them "
                      "before freeing the pool", p->tag, live, live == 1 ? "" : "s",
                      one && one->name ? one->name : "(unnamed)", live > 1 ? " and others" : "");
    ws_device *d = p->dev;
    if (p->mapped) {
        d->ops->vm_unmap(d, p->va, p->capacity);
        ws_device_account(d, -(ptrdiff_t)p->mapped);
    }
    d->ops->vm_release(d, p->va, p->capacity);
    if (p->backup) d->ops->host_free(d, p->backup, p->backup_cap);
    free(p->holes);
    free(p->slots);
    pthread_mutex_destroy(&p->mu);
    free(p);
    return WS_OK;
}

ws_status ws_pool_sleep(ws_pool *p, int level, const char *note)
{
    if (level != 1 && level != 2)
        return WS_ERR(WS_ERR_ARG, "pool '%s': sleep level must be 1 (keep contents in host "
                      "memory) or 2 (discard contents), got %d", p->tag, level);
    WS_TRY(check_unheld(p, "sleep"));
    if (p->asleep && p->reserved)
        return WS_ERR(WS_ERR_ARG, "pool '%s' was reserved without memory (a dry run) and has "
                      "never been awake; wake it first", p->tag);
    if (p->asleep)
        return WS_ERR(WS_ERR_ARG, "pool '%s' is already asleep (sleep(level=%d) #%d); wake it "
                      "first", p->tag, p->last_level, p->sleeps);
    ws_device *d = p->dev;
    WS_TRY(ws_device_synchronize(d));
    size_t keep = level == 1 ? p->top : 0;
    if (keep && p->backup_cap < keep) {
        if (p->backup) d->ops->host_free(d, p->backup, p->backup_cap);
        p->backup = NULL;
        p->backup_cap = 0;
        ws_status rc = ws_fault_check(WS_FAULT_BACKUP, "a pool backup", keep);
        if (rc == WS_OK) rc = d->ops->host_alloc(d, keep, &p->backup);
        if (rc != WS_OK) {
            p->backup = NULL;
            ws_errprefix("sleep(level=1) of pool '%s': backing up %zu bytes", p->tag, keep);
            return rc;
        }
        p->backup_cap = keep;
    }
    if (keep) {
        ws_status rc = d->ops->copy(d, p->backup, p->va, keep);
        if (rc != WS_OK) {
            ws_errprefix("sleep(level=1) of pool '%s': backing up %zu bytes", p->tag, keep);
            return rc;
        }
    }
    ws_status rc = d->ops->vm_unmap(d, p->va, p->capacity);
    if (rc != WS_OK) {
        ws_errprefix("sleep(level=%d) of pool '%s'", level, p->tag);
        return rc;
    }
    ws_device_account(d, -(ptrdiff_t)p->mapped);
    p->mapped = 0;
    p->backup_bytes = keep;
    p->asleep = 1;
    p->sleeps++;
    p->last_level = level;
    if (level == 2) {
        /* Nothing is kept, and a level-2 sleep is asked for to free memory:
         * the cached level-1 backup goes too (the next level-1 sleep
         * allocates it again). */
        if (p->backup) d->ops->host_free(d, p->backup, p->backup_cap);
        p->backup = NULL;
        p->backup_cap = 0;
        if (note && *note)
            snprintf(p->reason, sizeof p->reason, "sleep(level=2) #%d of pool '%s' (%s)",
                     p->sleeps, p->tag, note);
        else
            snprintf(p->reason, sizeof p->reason, "sleep(level=2) #%d of pool '%s'", p->sleeps,
                     p->tag);
        pthread_mutex_lock(&p->mu);
        for (size_t i = 0; i < p->n_slots; i++)
            if (p->slots[i] && p->slots[i] != &tomb) p->slots[i]->n_written = 0;
        pthread_mutex_unlock(&p->mu);
    }
    return WS_OK;
}

ws_status ws_pool_wake(ws_pool *p)
{
    if (!p->asleep) return WS_OK;
    WS_TRY(check_unheld(p, "wake"));
    ws_device *d = p->dev;
    ws_status rc = d->ops->vm_map(d, p->va, p->capacity);
    if (rc != WS_OK) {
        ws_errprefix("wake of pool '%s'", p->tag);
        return rc;
    }
    p->mapped = p->capacity;
    p->reserved = 0;
    ws_device_account(d, (ptrdiff_t)p->capacity);
    if (p->backup_bytes) {
        /* Fresh pages all at once (cpu: in parallel, huge pages), so the
         * restore runs at copy speed rather than one fault per page. */
        if (d->ops->vm_populate) d->ops->vm_populate(d, p->va, p->backup_bytes);
        rc = d->ops->copy(d, p->va, p->backup, p->backup_bytes);
        if (rc != WS_OK) {
            /* Keep the backup and go back to sleep so nothing is lost. */
            d->ops->vm_unmap(d, p->va, p->capacity);
            ws_device_account(d, -(ptrdiff_t)p->capacity);
            p->mapped = 0;
            ws_errprefix("wake of pool '%s': restoring %zu bytes", p->tag, p->backup_bytes);
            return rc;
        }
        rc = ws_device_synchronize(d);
        if (rc != WS_OK) return rc;
        /* The backup stays allocated for the next sleep, on every device:
         * pinned host memory costs seconds per 10 GB to allocate and free
         * (PyTorch's caching host allocator keeps it for vLLM too), and on
         * the cpu a fresh buffer costs a page fault per page on each sleep.
         * The pool's own memory still goes back at every sleep. */
        p->backup_bytes = 0;
    }
    p->asleep = 0;
    return WS_OK;
}

void ws_pool_get_stats(const ws_pool *p, ws_pool_stats *out)
{
    out->capacity = p->capacity;
    out->used = p->used;
    out->mapped = p->mapped;
    out->backup_bytes = p->backup_bytes;
    out->backup_cached = p->backup_cap;
    out->asleep = p->asleep;
    out->sleeps = p->sleeps;
    out->last_level = p->last_level;
}

const char *ws_pool_tag(const ws_pool *p) { return p->tag; }

ws_device *ws_pool_device(const ws_pool *p) { return p->dev; }

int ws_pool_is_asleep(const ws_pool *p) { return p->asleep; }

const char *ws_pool_discard_reason(const ws_pool *p) { return p->reason[0] ? p->reason : NULL; }
