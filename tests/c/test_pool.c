/* test_pool.c: sleepable pools on the cpu device: stable addresses, level-1
 * round trips, level-2 discards that make reads fail with a message naming
 * the tensor, the pool and the sleep, memory really returned (RSS), carving,
 * accounting and destroy with live tensors. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "pool.h"
#include "tensor.h"

#define MiB ((size_t)1 << 20)

/* Resident set size of this process, from /proc/self/statm. */
static size_t rss_bytes(void)
{
    unsigned long size = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0;
    if (fscanf(f, "%lu %lu", &size, &resident) != 2) resident = 0;
    fclose(f);
    return (size_t)resident * (size_t)sysconf(_SC_PAGESIZE);
}

static ws_status pool_tensor(ws_pool *p, ws_tensor *t, ws_dtype dt, int64_t n, const char *name)
{
    ws_tensor_opts o = {.pool = p, .name = name};
    return ws_tensor_empty(t, dt, 1, &n, &o);
}

static void test_carve_alignment_and_reuse(void)
{
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "carve", 1 * MiB, &p));
    ws_tensor a, b, c, d;
    CHECK_OK(pool_tensor(p, &a, WS_U8, 3, "a"));
    CHECK_OK(pool_tensor(p, &b, WS_F32, 100, "b"));
    CHECK_OK(pool_tensor(p, &c, WS_BF16, 10, "c"));
    char *base = ws_tensor_data(&a);
    CHECK(((uintptr_t)base & 255) == 0);
    CHECK((char *)ws_tensor_data(&b) == base + 256);
    CHECK((char *)ws_tensor_data(&c) == base + 256 + 512);
    ws_pool_stats st;
    ws_pool_get_stats(p, &st);
    CHECK(st.capacity == 1 * MiB && st.used == 256 + 512 + 256 && st.mapped == 1 * MiB);
    /* A freed block is reused first fit. */
    void *bp = ws_tensor_data(&b);
    ws_tensor_free(&b);
    CHECK_OK(pool_tensor(p, &d, WS_F32, 64, "d"));
    CHECK(ws_tensor_data(&d) == bp);
    /* A request larger than what is left fails with a message. */
    ws_tensor big;
    CHECK_ERR(pool_tensor(p, &big, WS_U8, (int64_t)MiB, "big"), WS_ERR_NOMEM,
              "pool 'carve' is full");
    CHECK(strstr(ws_errmsg(), "'big'") != NULL);
    CHECK(ws_tensor_is_released(&big));
    /* Destroy refuses while tensors live, naming one. */
    CHECK_ERR(ws_pool_destroy(p), WS_ERR_ARG, "pool 'carve' still has 3 live tensors");
    ws_tensor_free(&a);
    ws_tensor_free(&c);
    CHECK_ERR(ws_pool_destroy(p), WS_ERR_ARG, "1 live tensor ('d')");
    ws_tensor_free(&d);
    ws_pool_get_stats(p, &st);
    CHECK(st.used == 0);
    CHECK_OK(ws_pool_destroy(p));
}

static void test_level1_round_trip_same_address(void)
{
    ws_device *cpu = ws_device_cpu();
    size_t held0 = cpu->held;
    ws_pool *p;
    CHECK_OK(ws_pool_create(cpu, "kv", 4 * MiB, &p));
    CHECK(cpu->held == held0 + 4 * MiB);
    ws_tensor t;
    CHECK_OK(pool_tensor(p, &t, WS_F32, 100000, "kv.cache"));
    CHECK_OK(ws_tensor_random(&t, 3, 1.0f, 0));
    uint64_t before;
    CHECK_OK(ws_tensor_checksum(&t, 0, WS_F32, &before));
    void *addr = ws_tensor_data(&t);
    CHECK_OK(ws_pool_sleep(p, 1, "rollout done"));
    ws_pool_stats st;
    ws_pool_get_stats(p, &st);
    CHECK(st.asleep && st.mapped == 0 && st.backup_bytes == 400128 && st.last_level == 1);
    CHECK(cpu->held == held0 + 400128); /* the backup is host memory of the cpu */
    /* Asleep: reads and writes fail cleanly instead of faulting. */
    double v;
    CHECK_ERR(ws_tensor_get(&t, 0, &v), WS_ERR_DISCARDED,
              "tensor 'kv.cache' in pool 'kv' cannot be read: the pool is asleep");
    CHECK_ERR(ws_tensor_fill(&t, 0), WS_ERR_DISCARDED, "cannot be written: the pool is asleep");
    ws_tensor more;
    CHECK_ERR(pool_tensor(p, &more, WS_F32, 4, "more"), WS_ERR_ARG, "pool 'kv' is asleep");
    CHECK_ERR(ws_pool_sleep(p, 2, NULL), WS_ERR_ARG, "already asleep");
    CHECK_OK(ws_pool_wake(p));
    CHECK(ws_tensor_data(&t) == addr);
    uint64_t after;
    CHECK_OK(ws_tensor_checksum(&t, 0, WS_F32, &after));
    CHECK_EQ_U64(after, before);
    CHECK(((float *)addr)[99999] == ws_random_elem(3, 99999, 1.0f));
    ws_pool_get_stats(p, &st);
    CHECK(!st.asleep && st.mapped == 4 * MiB && st.backup_bytes == 0 && st.sleeps == 1);
    /* The backup buffer is kept for the next sleep, as on GPUs. */
    CHECK(st.backup_cached == 400128);
    CHECK(cpu->held == held0 + 4 * MiB + 400128);
    CHECK_OK(ws_tensor_fill(&t, 2));
    CHECK_OK(ws_pool_sleep(p, 1, NULL)); /* reuses it */
    ws_pool_get_stats(p, &st);
    CHECK(st.mapped == 0 && st.backup_bytes == 400128 && st.backup_cached == 400128);
    CHECK(cpu->held == held0 + 400128);
    CHECK_OK(ws_pool_wake(p));
    CHECK(((float *)addr)[99999] == 2.0f);
    /* A level-2 sleep keeps nothing, the cached backup included. */
    CHECK_OK(ws_pool_sleep(p, 2, NULL));
    ws_pool_get_stats(p, &st);
    CHECK(st.backup_cached == 0 && cpu->held == held0);
    CHECK_OK(ws_pool_wake(p));
    CHECK(cpu->held == held0 + 4 * MiB);
    CHECK_OK(ws_pool_wake(p)); /* waking an awake pool is harmless */
    CHECK_ERR(ws_pool_sleep(p, 3, NULL), WS_ERR_ARG, "sleep level must be 1");
    ws_tensor_free(&t);
    CHECK_OK(ws_pool_destroy(p));
    CHECK(cpu->held == held0);
}

static void test_level2_discard_names_tensor_pool_and_sleep(void)
{
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "weights", 1 * MiB, &p));
    ws_tensor w, other, half, rest;
    CHECK_OK(pool_tensor(p, &w, WS_BF16, 1000, "model.layers.0.q_proj.weight"));
    CHECK_OK(pool_tensor(p, &other, WS_F32, 10, "other"));
    CHECK_OK(ws_tensor_fill(&w, 1));
    CHECK_OK(ws_pool_sleep(p, 1, "step 3"));
    CHECK_OK(ws_pool_wake(p));
    CHECK_OK(ws_pool_sleep(p, 2, "step 4"));
    CHECK(strcmp(ws_pool_discard_reason(p), "sleep(level=2) #2 of pool 'weights' (step 4)") == 0);
    CHECK_OK(ws_pool_wake(p));
    uint64_t s;
    CHECK_ERR(ws_tensor_checksum(&w, 0, WS_BF16, &s), WS_ERR_DISCARDED,
              "tensor 'model.layers.0.q_proj.weight' in pool 'weights': contents were discarded "
              "by sleep(level=2) #2 of pool 'weights' (step 4) and have not been written since; "
              "write them (send the base weights) before reading");
    ws_tensor copy;
    int64_t n = 1000;
    CHECK_OK(ws_tensor_empty(&copy, WS_BF16, 1, &n, &(ws_tensor_opts){.name = "copy"}));
    CHECK_ERR(ws_tensor_copy(&copy, &w), WS_ERR_DISCARDED, "copy_ src: tensor 'model.layers.0");
    /* Writing half makes only that half readable. */
    CHECK_OK(ws_tensor_narrow(&half, &w, 0, 0, 500));
    CHECK_OK(ws_tensor_narrow(&rest, &w, 0, 500, 500));
    CHECK_OK(ws_tensor_fill(&half, 2));
    CHECK_OK(ws_tensor_checksum(&half, 0, WS_BF16, &s));
    CHECK_ERR(ws_tensor_checksum(&w, 0, WS_BF16, &s), WS_ERR_DISCARDED, "were discarded");
    CHECK_ERR(ws_tensor_checksum(&rest, 500, WS_BF16, &s), WS_ERR_DISCARDED, "were discarded");
    double v;
    CHECK_OK(ws_tensor_get(&w, 499, &v));
    CHECK(v == 2);
    CHECK_ERR(ws_tensor_get(&w, 500, &v), WS_ERR_DISCARDED, "sleep(level=2) #2");
    CHECK_OK(ws_tensor_set(&w, 500, 3)); /* one element */
    CHECK_OK(ws_tensor_get(&w, 500, &v));
    CHECK(v == 3);
    CHECK_OK(ws_tensor_copy(&rest, &half));
    CHECK_OK(ws_tensor_checksum(&w, 0, WS_BF16, &s)); /* all written now */
    /* The other tensor was discarded too; a new tensor after wake is fresh. */
    CHECK_ERR(ws_tensor_get(&other, 0, &v), WS_ERR_DISCARDED, "tensor 'other' in pool 'weights'");
    ws_tensor fresh;
    CHECK_OK(pool_tensor(p, &fresh, WS_F32, 16, "fresh"));
    CHECK_OK(ws_tensor_checksum(&fresh, 0, WS_F32, &s));
    ws_tensor_free(&fresh);
    ws_tensor_free(&copy);
    ws_tensor_free(&half);
    ws_tensor_free(&rest);
    ws_tensor_free(&other);
    ws_tensor_free(&w);
    CHECK_OK(ws_pool_destroy(p));
}

static void test_sleep_returns_memory(void)
{
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "rss", 64 * MiB, &p));
    ws_tensor t;
    CHECK_OK(pool_tensor(p, &t, WS_U8, (int64_t)(64 * MiB), "all"));
    size_t r0 = rss_bytes();
    CHECK_OK(ws_tensor_fill(&t, 7)); /* touch every page */
    size_t r1 = rss_bytes();
    CHECK(r1 >= r0 + 60 * MiB);
    CHECK_OK(ws_pool_sleep(p, 2, NULL));
    size_t r2 = rss_bytes();
    CHECK(r2 + 60 * MiB <= r1);
    printf("    rss: filled %+.1f MiB, after sleep(2) %+.1f MiB\n",
           ((double)r1 - (double)r0) / MiB, ((double)r2 - (double)r0) / MiB);
    CHECK_OK(ws_pool_wake(p));
    CHECK(ws_tensor_data(&t) != NULL);
    /* After a discard the pages come back fresh (zero on the cpu). */
    CHECK(((unsigned char *)ws_tensor_data(&t))[12345] == 0);
    CHECK_OK(ws_tensor_fill(&t, 1));
    CHECK_OK(ws_pool_sleep(p, 1, NULL));
    CHECK_OK(ws_pool_wake(p));
    CHECK(((unsigned char *)ws_tensor_data(&t))[64 * MiB - 1] == 1);
    /* Level 1: the backup buffer stays allocated (resident) between sleeps,
     * and each sleep still gives back the pool's own pages. */
    size_t r3 = rss_bytes();
    CHECK_OK(ws_pool_sleep(p, 1, NULL));
    size_t r4 = rss_bytes();
    ws_pool_stats st;
    ws_pool_get_stats(p, &st);
    CHECK(st.mapped == 0 && st.backup_cached >= 64 * MiB);
    CHECK(r4 + 60 * MiB <= r3);
    printf("    rss: awake with the backup kept %+.1f MiB, after sleep(1) %+.1f MiB\n",
           ((double)r3 - (double)r0) / MiB, ((double)r4 - (double)r0) / MiB);
    CHECK_OK(ws_pool_wake(p));
    CHECK(((unsigned char *)ws_tensor_data(&t))[64 * MiB - 1] == 1);
    CHECK(((unsigned char *)ws_tensor_data(&t))[0] == 1);
    ws_tensor_free(&t);
    CHECK_OK(ws_pool_destroy(p));
}

static void test_many_tensors_in_pool(void)
{
    enum { N = 20000 };
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "many", (size_t)N * 256, &p));
    ws_tensor *ts = calloc(N, sizeof *ts);
    for (int i = 0; i < N; i++) CHECK_OK(pool_tensor(p, &ts[i], WS_F32, 16, NULL));
    CHECK_OK(ws_pool_sleep(p, 2, "many"));
    CHECK_OK(ws_pool_wake(p));
    uint64_t s;
    int discarded = 0;
    for (int i = 0; i < N; i += 97)
        discarded += ws_tensor_checksum(&ts[i], 0, WS_F32, &s) == WS_ERR_DISCARDED;
    CHECK(discarded == (N + 96) / 97);
    /* Free in an interleaved order; the pool ends empty and destroyable. */
    for (int i = 0; i < N; i += 2) ws_tensor_free(&ts[i]);
    for (int i = 1; i < N; i += 2) ws_tensor_free(&ts[i]);
    ws_pool_stats st;
    ws_pool_get_stats(p, &st);
    CHECK(st.used == 0);
    CHECK_OK(ws_pool_destroy(p));
    free(ts);
}

/* A write through a strided view marks only the elements it wrote: the gaps
 * between its rows stay discarded, and reading the view itself works. */
static void test_strided_writes_mark_only_their_elements(void)
{
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "weights", 1 * MiB, &p));
    ws_tensor w, m, col0, col1, rows, part;
    CHECK_OK(pool_tensor(p, &w, WS_F32, 8, "w"));
    int64_t shape[2] = {4, 2};
    CHECK_OK(ws_tensor_reshape(&m, &w, 2, shape));
    CHECK_OK(ws_pool_sleep(p, 2, "step 1"));
    CHECK_OK(ws_pool_wake(p));
    CHECK_OK(ws_tensor_narrow(&col0, &m, 1, 0, 1));
    CHECK_OK(ws_tensor_narrow(&col1, &m, 1, 1, 1));
    CHECK_OK(ws_tensor_fill(&col0, 1));
    uint64_t s;
    CHECK_OK(ws_tensor_checksum(&col0, 0, WS_F32, &s));
    double v;
    CHECK_OK(ws_tensor_get(&m, 2, &v)); /* row 1, column 0 */
    CHECK(v == 1);
    CHECK_ERR(ws_tensor_get(&m, 1, &v), WS_ERR_DISCARDED, "tensor 'w' in pool 'weights'");
    CHECK_OK(ws_tensor_narrow(&rows, &m, 0, 0, 3));
    CHECK_OK(ws_tensor_narrow(&part, &rows, 1, 1, 1));
    CHECK_ERR(ws_tensor_checksum(&part, 0, WS_F32, &s), WS_ERR_DISCARDED, "were discarded");
    CHECK_ERR(ws_tensor_checksum(&col1, 0, WS_F32, &s), WS_ERR_DISCARDED, "were discarded");
    CHECK_ERR(ws_tensor_checksum(&w, 0, WS_F32, &s), WS_ERR_DISCARDED, "were discarded");
    CHECK_OK(ws_tensor_fill(&col1, 2));
    CHECK_OK(ws_tensor_checksum(&w, 0, WS_F32, &s)); /* both columns written */
    CHECK_OK(ws_tensor_get(&m, 7, &v));
    CHECK(v == 2);
    ws_tensor_free(&part);
    ws_tensor_free(&rows);
    ws_tensor_free(&col0);
    ws_tensor_free(&col1);
    ws_tensor_free(&m);
    ws_tensor_free(&w);
    CHECK_OK(ws_pool_destroy(p));
}

/* ws_tensor_access hands out a pool tensor's pointer only for what the pool
 * allows: nothing while it sleeps, and after a level-2 wake writes but no
 * reads until written. */
static void test_access_follows_the_pool(void)
{
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "engine", 1 * MiB, &p));
    ws_tensor w;
    CHECK_OK(pool_tensor(p, &w, WS_F32, 256, "w"));
    void *ptr;
    CHECK_OK(ws_tensor_access(&w, WS_ACCESS_WRITE, "probe", &ptr));
    CHECK(ptr == ws_tensor_data(&w));
    CHECK_OK(ws_tensor_fill(&w, 2));
    CHECK_OK(ws_tensor_access(&w, WS_ACCESS_READ | WS_ACCESS_WRITE, "probe", &ptr));
    for (int level = 1; level <= 2; level++) {
        CHECK_OK(ws_pool_sleep(p, level, NULL));
        CHECK_ERR(ws_tensor_access(&w, WS_ACCESS_WRITE, "probe", &ptr), WS_ERR_DISCARDED,
                  "probe: tensor 'w' in pool 'engine' cannot be written: the pool is asleep");
        CHECK(ptr == NULL);
        CHECK_ERR(ws_tensor_access(&w, WS_ACCESS_READ, "probe", &ptr), WS_ERR_DISCARDED,
                  "cannot be read: the pool is asleep");
        CHECK_OK(ws_pool_wake(p));
    }
    CHECK_ERR(ws_tensor_access(&w, WS_ACCESS_READ, "probe", &ptr), WS_ERR_DISCARDED,
              "probe: tensor 'w' in pool 'engine': contents were discarded by sleep(level=2) #2");
    CHECK(ptr == NULL);
    CHECK_OK(ws_tensor_access(&w, WS_ACCESS_WRITE, "probe", &ptr));
    CHECK_ERR(ws_tensor_access(&w, 0, "probe", &ptr), WS_ERR_ARG, "no access");
    ws_tensor_release(&w);
    CHECK_ERR(ws_tensor_access(&w, WS_ACCESS_WRITE, "probe", &ptr), WS_ERR_FREED,
              "probe: tensor 'w' was freed");
    ws_tensor_free(&w);
    CHECK_OK(ws_pool_destroy(p));
}

/* A held pool keeps its memory: sleep and destroy are refused naming the
 * holder, wake has nothing to do, and the last unhold frees it again. */
static void test_holds_keep_the_pool_mapped(void)
{
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "engine", 1 * MiB, &p));
    ws_pool_hold(p, "plan 'base' (executing)");
    ws_pool_hold(p, "an async all_gather");
    CHECK_ERR(ws_pool_sleep(p, 1, NULL), WS_ERR_ARG,
              "sleep: pool 'engine' is in use by plan 'base' (executing)");
    CHECK_ERR(ws_pool_sleep(p, 2, NULL), WS_ERR_ARG, "in use by plan 'base'");
    CHECK_ERR(ws_pool_destroy(p), WS_ERR_ARG, "free: pool 'engine' is in use by plan 'base'");
    CHECK_OK(ws_pool_wake(p));
    ws_pool_stats st;
    ws_pool_get_stats(p, &st);
    CHECK(!st.asleep && st.sleeps == 0 && st.mapped == st.capacity);
    ws_pool_unhold(p);
    CHECK_ERR(ws_pool_sleep(p, 2, NULL), WS_ERR_ARG, "in use by plan 'base'");
    ws_pool_unhold(p);
    CHECK_OK(ws_pool_sleep(p, 2, NULL));
    CHECK_OK(ws_pool_wake(p));
    CHECK_OK(ws_pool_destroy(p));
}

/* kB of AnonHugePages in the mapping of this process that holds addr, or -1
 * when /proc/self/smaps cannot say. */
static long huge_kb_at(const void *addr)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[512];
    int inside = 0;
    long kb = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) { /* a mapping's first line */
            inside = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
            continue;
        }
        if (inside && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
    }
    fclose(f);
    return kb;
}

/* Where transparent huge pages are on (the setting is "always" or
 * "madvise"), a woken pool is back on them: a page fault per 2 MiB, not per
 * 4 KiB, is what makes a wake run at copy speed. */
static void test_wake_uses_huge_pages(void)
{
    char mode[128] = "";
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f) {
        if (!fgets(mode, sizeof mode, f)) mode[0] = 0;
        fclose(f);
    }
    if (!strstr(mode, "[always]") && !strstr(mode, "[madvise]")) {
        printf("    skip: transparent huge pages are off here (%s)\n", mode[0] ? mode : "?");
        return;
    }
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "huge", 32 * MiB, &p));
    ws_tensor t;
    CHECK_OK(pool_tensor(p, &t, WS_U8, (int64_t)(32 * MiB), "all"));
    CHECK(((uintptr_t)ws_tensor_data(&t) & (2 * MiB - 1)) == 0);
    CHECK_OK(ws_tensor_fill(&t, 5));
    CHECK_OK(ws_pool_sleep(p, 1, NULL));
    CHECK_OK(ws_pool_wake(p));
    long kb = huge_kb_at(ws_tensor_data(&t));
    printf("    %ld kB of the 32 MiB pool on huge pages after wake\n", kb);
    /* Some huge pages at least: the kernel may fall back to small ones
     * where physical memory is fragmented. */
    CHECK(kb < 0 || kb >= 2048);
    CHECK(((unsigned char *)ws_tensor_data(&t))[32 * MiB - 1] == 5);
    ws_tensor_free(&t);
    CHECK_OK(ws_pool_destroy(p));
}

/* More than the machine can commit fails at the map, with the pool and the
 * size in the message, and nothing of the pool is left behind. */
static void test_pool_larger_than_memory(void)
{
    size_t total = 0, free_bytes = 0;
    ws_device *cpu = ws_device_cpu();
    CHECK_OK(cpu->ops->mem_info(cpu, &free_bytes, &total));
    size_t before = cpu->held;
    ws_pool *p = (ws_pool *)&total;
    char want[64];
    snprintf(want, sizeof want, "(%zu bytes)", 4 * total);
    CHECK_ERR(ws_pool_create(cpu, "kv_cache", 4 * total, &p), WS_ERR_NOMEM,
              "creating pool 'kv_cache': cpu: out of memory mapping");
    CHECK(strstr(ws_errmsg(), want) != NULL);
    CHECK(p == NULL);
    CHECK(cpu->held == before);
}

int main(void)
{
    RUN(test_carve_alignment_and_reuse);
    RUN(test_level1_round_trip_same_address);
    RUN(test_level2_discard_names_tensor_pool_and_sleep);
    RUN(test_sleep_returns_memory);
    RUN(test_many_tensors_in_pool);
    RUN(test_strided_writes_mark_only_their_elements);
    RUN(test_access_follows_the_pool);
    RUN(test_holds_keep_the_pool_mapped);
    RUN(test_pool_larger_than_memory);
    RUN(test_wake_uses_huge_pages);
    return check_summary();
}
