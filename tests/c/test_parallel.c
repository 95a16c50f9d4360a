/* test_parallel.c: the cpu backend's threaded loops give the bytes a single
 * thread would. Sizes are well above the split threshold and the process
 * asks for four workers, so every loop really runs on several threads; this
 * is the test the ThreadSanitizer build leans on (make test-tsan). */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "device.h"
#include "dtype.h"
#include "parallel.h"

#define N ((size_t)3 << 20) /* elements: 12 MiB of f32, several pieces per thread */

static ws_device *cpu;

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) abort();
    return p;
}

/* Worker ids seen by a job whose chunks take long enough for all to join. */
static int seen_ids[64];
static void note_worker(void *ctx, size_t b, size_t e, int worker)
{
    (void)ctx, (void)b, (void)e;
    if (worker >= 0 && worker < 64) __atomic_store_n(&seen_ids[worker], 1, __ATOMIC_RELAXED);
    usleep(2000);
}

static void test_workers_take_part(void)
{
    CHECK(ws_parallel_threads() >= 2);
    ws_parallel_for(64, 1, note_worker, NULL);
    int others = 0;
    for (int i = 1; i < 64; i++) others += seen_ids[i];
    CHECK(others >= 1);
}

static void test_copy(void)
{
    size_t bytes = N * 4;
    unsigned char *a = xmalloc(bytes), *b = xmalloc(bytes);
    for (size_t i = 0; i < bytes; i++) a[i] = (unsigned char)(i * 7 + (i >> 11));
    memset(b, 0, bytes);
    CHECK_OK(cpu->ops->copy(cpu, b, a, bytes));
    CHECK(memcmp(a, b, bytes) == 0);
    free(a);
    free(b);
}

static void test_copy_batch_converts(void)
{
    float *src = xmalloc(N * sizeof *src);
    uint16_t *bf = xmalloc(N * sizeof *bf), *want = xmalloc(N * sizeof *want);
    float *back = xmalloc(N * sizeof *back);
    for (size_t i = 0; i < N; i++) src[i] = (float)((double)i * 0.37 - 1000.0);
    ws_convert_host(want, WS_BF16, src, WS_F32, N); /* one thread: the reference */
    /* Three descriptors of uneven sizes, the largest split across workers. */
    size_t cut1 = 1000, cut2 = N / 3;
    ws_copy_desc d[3] = {
        {bf, src, cut1, WS_BF16, WS_F32},
        {bf + cut1, src + cut1, cut2 - cut1, WS_BF16, WS_F32},
        {bf + cut2, src + cut2, N - cut2, WS_BF16, WS_F32},
    };
    CHECK_OK(cpu->ops->copy_batch(cpu, d, 3));
    CHECK(memcmp(bf, want, N * sizeof *bf) == 0);
    ws_copy_desc up = {back, bf, N, WS_F32, WS_BF16};
    CHECK_OK(cpu->ops->copy_batch(cpu, &up, 1));
    float ref;
    ws_convert_host(&ref, WS_F32, &want[N - 1], WS_BF16, 1);
    CHECK(back[N - 1] == ref);
    free(src);
    free(bf);
    free(want);
    free(back);
}

static void test_copy_strided_transposes(void)
{
    /* dst[j][i] = src[i][j] for a 1536 x 2048 f32 matrix, as bf16. */
    int64_t r = 1536, c = 2048;
    float *src = xmalloc((size_t)(r * c) * sizeof *src);
    uint16_t *dst = xmalloc((size_t)(r * c) * sizeof *dst);
    for (int64_t i = 0; i < r * c; i++) src[i] = (float)(i % 4099);
    ws_layout dl = {2, {c, r}, {r, 1}}, sl = {2, {c, r}, {1, c}};
    CHECK_OK(cpu->ops->copy_strided(cpu, dst, WS_BF16, &dl, src, WS_F32, &sl));
    int bad = 0;
    for (int64_t j = 0; j < c && !bad; j += 13)
        for (int64_t i = 0; i < r && !bad; i += 7) {
            uint16_t w;
            ws_convert_host(&w, WS_BF16, &src[i * c + j], WS_F32, 1);
            bad = dst[j * r + i] != w;
        }
    CHECK(!bad);
    free(src);
    free(dst);
}

static void test_fill_and_random(void)
{
    float *x = xmalloc(N * sizeof *x);
    CHECK_OK(cpu->ops->fill(cpu, x, WS_F32, N, 2.5));
    int bad = 0;
    for (size_t i = 0; i < N; i++) bad |= x[i] != 2.5f;
    CHECK(!bad);
    CHECK_OK(cpu->ops->random(cpu, x, WS_F32, N, 42, 1000, 0.5f));
    for (size_t i = 0; i < N; i += 997) bad |= x[i] != ws_random_elem(42, 1000 + i, 0.5f);
    CHECK(!bad);
    free(x);
}

static void test_checksum_matches_serial(void)
{
    uint16_t *x = xmalloc(N * sizeof *x);
    for (size_t i = 0; i < N; i++) x[i] = (uint16_t)(i * 2654435761u >> 7);
    uint64_t want = 0;
    for (size_t i = 0; i < N; i++) want += ws_hash_elem(5 + i, x[i]);
    /* Rows are the unit the checksum splits across workers. */
    ws_layout l;
    ws_layout_contiguous(&l, 2, (int64_t[]){(int64_t)(N / 1024), 1024});
    uint64_t got = 0;
    CHECK_OK(cpu->ops->checksum(cpu, x, WS_BF16, &l, 5, WS_BF16, &got));
    CHECK_EQ_U64(got, want);
    /* As f32: every element converted on the workers before hashing. */
    uint64_t want32 = 0;
    for (size_t i = 0; i < N; i++) {
        float f;
        uint32_t bits;
        ws_convert_host(&f, WS_F32, &x[i], WS_BF16, 1);
        memcpy(&bits, &f, 4);
        want32 += ws_hash_elem(i, bits);
    }
    CHECK_OK(cpu->ops->checksum(cpu, x, WS_BF16, &l, 0, WS_F32, &got));
    CHECK_EQ_U64(got, want32);
    free(x);
}

/* Two threads issuing parallel loops at once: one gets the workers, the
 * other runs inline; both must get exact results. */
static void *copier(void *arg)
{
    size_t bytes = N * 2;
    unsigned char *a = xmalloc(bytes), *b = xmalloc(bytes);
    memset(a, (int)(intptr_t)arg, bytes);
    int ok = 1;
    for (int k = 0; k < 8 && ok; k++) {
        ok = cpu->ops->copy(cpu, b, a, bytes) == WS_OK && memcmp(a, b, bytes) == 0;
        memset(b, 0, bytes);
    }
    free(a);
    free(b);
    return (void *)(intptr_t)ok;
}

static void test_concurrent_callers(void)
{
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&t[i], NULL, copier, (void *)(intptr_t)(i + 1)) == 0);
    for (int i = 0; i < 2; i++) {
        void *ok = NULL;
        pthread_join(t[i], &ok);
        CHECK(ok == (void *)1);
    }
}

int main(void)
{
    /* Several workers even on a one-core machine, unless the caller chose. */
    setenv("WSHOST_THREADS", "4", 0);
    cpu = ws_device_cpu();
    RUN(test_workers_take_part);
    RUN(test_copy);
    RUN(test_copy_batch_converts);
    RUN(test_copy_strided_transposes);
    RUN(test_fill_and_random);
    RUN(test_checksum_matches_serial);
    RUN(test_concurrent_callers);
    return check_summary();
}
