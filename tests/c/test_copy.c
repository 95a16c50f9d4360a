/* test_copy.c: pack, unpack and copy_many: round trips over 100k tensors,
 * conversion on the way, raw-byte packing, explicit offsets, validation that
 * names the offending item, and written-range tracking in pools. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "pool.h"
#include "tensor.h"

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static ws_status make1(ws_tensor *t, ws_dtype dt, int64_t n, const char *name)
{
    ws_tensor_opts o = {.name = name};
    return ws_tensor_empty(t, dt, 1, &n, &o);
}

static void test_pack_unpack_100k(void)
{
    enum { N = 100000 };
    ws_tensor *src = calloc(N, sizeof *src), *dst = calloc(N, sizeof *dst);
    const ws_tensor **sp = calloc(N, sizeof *sp);
    ws_tensor **dp = calloc(N, sizeof *dp);
    int64_t total = 0;
    for (int i = 0; i < N; i++) {
        int64_t n = 1 + (i * 7919) % 64;
        CHECK_OK(make1(&src[i], WS_F32, n, NULL));
        CHECK_OK(make1(&dst[i], WS_F32, n, NULL));
        CHECK_OK(ws_tensor_random(&src[i], 1, 1.0f, (uint64_t)total));
        sp[i] = &src[i];
        dp[i] = &dst[i];
        total += n;
    }
    ws_tensor flat;
    CHECK_OK(make1(&flat, WS_F32, total, "flat"));
    CHECK_OK(ws_tensor_fill(&flat, 0)); /* fault the pages in before timing */
    double t0 = now_ms();
    CHECK_OK(ws_pack(&flat, sp, N, NULL));
    double t1 = now_ms();
    CHECK_OK(ws_unpack(&flat, dp, N, NULL));
    double t2 = now_ms();
    printf("    100k tensors, %lld elements: pack %.1f ms, unpack %.1f ms\n", (long long)total,
           t1 - t0, t2 - t1);
    /* The flat buffer is the concatenation: element k is random value k. */
    const float *f = ws_tensor_data(&flat);
    int bad = 0;
    for (int64_t k = 0; k < total; k += 13) bad += f[k] != ws_random_elem(1, (uint64_t)k, 1.0f);
    CHECK(bad == 0);
    for (int i = 0; i < N; i++)
        bad += memcmp(ws_tensor_data(&src[i]), ws_tensor_data(&dst[i]), ws_tensor_nbytes(&src[i])) != 0;
    CHECK(bad == 0);
    /* Packing converted to bf16 rounds each value once. */
    ws_tensor flat16;
    CHECK_OK(make1(&flat16, WS_BF16, total, "flat16"));
    CHECK_OK(ws_pack(&flat16, sp, N, NULL));
    const uint16_t *h = ws_tensor_data(&flat16);
    for (int64_t k = 0; k < total; k += 11) bad += h[k] != ws_f32_to_bf16(f[k]);
    CHECK(bad == 0);
    uint64_t a, b;
    CHECK_OK(ws_tensor_checksum(&flat, 0, WS_BF16, &a));
    CHECK_OK(ws_tensor_checksum(&flat16, 0, WS_BF16, &b));
    CHECK_EQ_U64(a, b);
    ws_tensor_free(&flat16);
    ws_tensor_free(&flat);
    for (int i = 0; i < N; i++) {
        ws_tensor_free(&src[i]);
        ws_tensor_free(&dst[i]);
    }
    free(src);
    free(dst);
    free(sp);
    free(dp);
}

static void test_raw_bytes_and_offsets(void)
{
    ws_tensor a, b, c, a2, b2, c2, flat;
    CHECK_OK(make1(&a, WS_F32, 3, "a"));
    CHECK_OK(make1(&b, WS_BF16, 5, "b"));
    CHECK_OK(make1(&c, WS_I64, 2, "c"));
    CHECK_OK(ws_tensor_random(&a, 2, 1.0f, 0));
    CHECK_OK(ws_tensor_random(&b, 3, 1.0f, 0));
    CHECK_OK(ws_tensor_fill(&c, -7));
    CHECK_OK(make1(&a2, WS_F32, 3, "a2"));
    CHECK_OK(make1(&b2, WS_BF16, 5, "b2"));
    CHECK_OK(make1(&c2, WS_I64, 2, "c2"));
    CHECK_OK(make1(&flat, WS_U8, 64, "bytes"));
    CHECK_OK(ws_tensor_fill(&flat, 0xEE));
    const ws_tensor *srcs[3] = {&a, &b, &c};
    ws_tensor *dsts[3] = {&a2, &b2, &c2};
    size_t offs[3] = {40, 0, 16}; /* out of order, with gaps */
    CHECK_OK(ws_pack(&flat, srcs, 3, offs));
    const unsigned char *fb = ws_tensor_data(&flat);
    CHECK(memcmp(fb + 40, ws_tensor_data(&a), 12) == 0);
    CHECK(memcmp(fb + 0, ws_tensor_data(&b), 10) == 0);
    CHECK(memcmp(fb + 16, ws_tensor_data(&c), 16) == 0);
    CHECK(fb[10] == 0xEE && fb[32] == 0xEE && fb[52] == 0xEE); /* gaps untouched */
    CHECK_OK(ws_unpack(&flat, dsts, 3, offs));
    CHECK(memcmp(ws_tensor_data(&a2), ws_tensor_data(&a), 12) == 0);
    CHECK(memcmp(ws_tensor_data(&b2), ws_tensor_data(&b), 10) == 0);
    CHECK(((int64_t *)ws_tensor_data(&c2))[1] == -7);
    /* Bounds are checked before anything is copied. */
    size_t bad_offs[3] = {0, 16, 60};
    CHECK_OK(ws_tensor_fill(&a2, 0));
    CHECK_ERR(ws_unpack(&flat, dsts, 3, bad_offs), WS_ERR_ARG,
              "unpack: item 3 'c2' (16 elements at offset 60) does not fit in flat 'bytes' of 64");
    CHECK(((float *)ws_tensor_data(&a2))[0] == 0.0f);
    ws_tensor_free(&a);
    ws_tensor_free(&b);
    ws_tensor_free(&c);
    ws_tensor_free(&a2);
    ws_tensor_free(&b2);
    ws_tensor_free(&c2);
    ws_tensor_free(&flat);
}

static void test_validation_names_items(void)
{
    ws_tensor x, y, z, flat, m, col;
    CHECK_OK(make1(&x, WS_F32, 4, "x"));
    CHECK_OK(make1(&y, WS_F32, 4, "y"));
    CHECK_OK(make1(&z, WS_F32, 4, "z"));
    CHECK_OK(make1(&flat, WS_F32, 12, "flat"));
    ws_tensor_release(&y);
    const ws_tensor *srcs[3] = {&x, &y, &z};
    CHECK_ERR(ws_pack(&flat, srcs, 3, NULL), WS_ERR_FREED, "pack src 2: tensor 'y' was freed");
    int64_t s[2] = {4, 3};
    CHECK_OK(ws_tensor_empty(&m, WS_F32, 2, s, &(ws_tensor_opts){.name = "m"}));
    CHECK_OK(ws_tensor_narrow(&col, &m, 1, 0, 1));
    srcs[1] = &col;
    CHECK_ERR(ws_pack(&flat, srcs, 3, NULL), WS_ERR_ARG, "pack src 2: tensor 'm' f32[4,1] is not contiguous");
    srcs[1] = &x;
    CHECK_OK(ws_pack(&flat, srcs, 3, NULL));
    ws_tensor small;
    CHECK_OK(make1(&small, WS_F32, 7, "small"));
    CHECK_ERR(ws_pack(&small, srcs, 3, NULL), WS_ERR_ARG, "pack: item 2 'x' (4 elements at offset 4) does not fit in flat 'small' of 7");
    /* copy_many: conversion, then a mismatch naming the item. */
    ws_tensor h1, h2;
    CHECK_OK(make1(&h1, WS_BF16, 4, "h1"));
    CHECK_OK(make1(&h2, WS_BF16, 4, "h2"));
    CHECK_OK(ws_tensor_fill(&x, 0.1));
    CHECK_OK(ws_tensor_fill(&z, -3));
    ws_tensor *dsts[2] = {&h1, &h2};
    const ws_tensor *from[2] = {&x, &z};
    CHECK_OK(ws_copy_many(dsts, from, 2));
    CHECK_EQ_U64(((uint16_t *)ws_tensor_data(&h1))[3], ws_f32_to_bf16(0.1f));
    CHECK_EQ_U64(((uint16_t *)ws_tensor_data(&h2))[0], 0xC040);
    from[1] = &flat;
    CHECK_ERR(ws_copy_many(dsts, from, 2), WS_ERR_ARG,
              "copy_many item 2: shape mismatch: dst 'h2' is bf16[4], src 'flat' is f32[12]");
    ws_tensor_free(&h1);
    ws_tensor_free(&h2);
    ws_tensor_free(&small);
    ws_tensor_free(&col);
    ws_tensor_free(&m);
    ws_tensor_free(&x);
    ws_tensor_free(&y);
    ws_tensor_free(&z);
    ws_tensor_free(&flat);
}

static void test_pool_written_ranges_through_batches(void)
{
    ws_pool *p;
    CHECK_OK(ws_pool_create(ws_device_cpu(), "engine", 1 << 20, &p));
    ws_tensor_opts po = {.pool = p, .name = "engine.flat"};
    int64_t n = 64;
    ws_tensor pf, a, b, out;
    CHECK_OK(ws_tensor_empty(&pf, WS_F32, 1, &n, &po));
    CHECK_OK(make1(&a, WS_F32, 16, "a"));
    CHECK_OK(make1(&b, WS_F32, 16, "b"));
    CHECK_OK(make1(&out, WS_F32, 16, "out"));
    CHECK_OK(ws_tensor_fill(&a, 1));
    CHECK_OK(ws_tensor_fill(&b, 2));
    CHECK_OK(ws_pool_sleep(p, 2, "step 9"));
    CHECK_OK(ws_pool_wake(p));
    const ws_tensor *srcs[2] = {&a, &b};
    size_t offs[2] = {0, 32};
    CHECK_OK(ws_pack(&pf, srcs, 2, offs));
    ws_tensor *dsts[1] = {&out};
    size_t at0[1] = {0}, at32[1] = {32}, at16[1] = {16};
    CHECK_OK(ws_unpack(&pf, dsts, 1, at0));
    CHECK_OK(ws_unpack(&pf, dsts, 1, at32));
    CHECK(((float *)ws_tensor_data(&out))[5] == 2.0f);
    /* The gap between the two packed pieces was never written. */
    CHECK_ERR(ws_unpack(&pf, dsts, 1, at16), WS_ERR_DISCARDED,
              "unpack flat (item 1): tensor 'engine.flat' in pool 'engine': contents were "
              "discarded by sleep(level=2) #1 of pool 'engine' (step 9)");
    ws_tensor_free(&pf);
    ws_tensor_free(&a);
    ws_tensor_free(&b);
    ws_tensor_free(&out);
    CHECK_OK(ws_pool_destroy(p));
}

/* One big pair (split inside) among small ones (split by index). */
static void test_copy_many_mixed_sizes(void)
{
    /* Empty tensors, one element, sizes around the cpu backend's 256 KiB
     * pieces (65536 f32), and one large tensor, all in one batch. */
    static const int64_t sizes[] = {1000, 0, 1, 65535, (int64_t)3 << 20, 65536, 0, 65537, 1008};
    enum { N = sizeof sizes / sizeof sizes[0] };
    ws_tensor src[N], dst[N];
    ws_tensor *dp[N];
    const ws_tensor *sp[N];
    for (int i = 0; i < N; i++) {
        int64_t n = sizes[i];
        CHECK_OK(make1(&src[i], WS_F32, n, NULL));
        CHECK_OK(make1(&dst[i], i % 2 ? WS_F16 : WS_BF16, n, NULL));
        CHECK_OK(ws_tensor_random(&src[i], (uint64_t)i, 100.0f, 0));
        sp[i] = &src[i];
        dp[i] = &dst[i];
    }
    CHECK_OK(ws_copy_many(dp, sp, N));
    int bad = 0;
    for (int i = 0; i < N; i++) {
        const float *f = ws_tensor_data(&src[i]);
        const uint16_t *h = ws_tensor_data(&dst[i]);
        for (int64_t k = 0; k < ws_tensor_numel(&src[i]); k++)
            bad += h[k] != (i % 2 ? ws_f32_to_f16(f[k]) : ws_f32_to_bf16(f[k]));
    }
    CHECK(bad == 0);
    for (int i = 0; i < N; i++) {
        ws_tensor_free(&src[i]);
        ws_tensor_free(&dst[i]);
    }
}

/* A missing tensor in a checksum batch is an argument error, not a crash. */
static void test_checksum_many_missing_item(void)
{
    ws_tensor a;
    CHECK_OK(make1(&a, WS_F32, 4, "a"));
    CHECK_OK(ws_tensor_fill(&a, 1));
    const ws_tensor *ts[2] = {&a, NULL};
    uint64_t out[2];
    CHECK_ERR(ws_checksum_many(ts, 2, NULL, WS_DTYPE_COUNT, out), WS_ERR_ARG, "item 2");
    CHECK_ERR(ws_checksum_many(ts, 2, NULL, WS_F32, out), WS_ERR_ARG, "missing");
    ws_tensor_free(&a);
}

int main(void)
{
    RUN(test_pack_unpack_100k);
    RUN(test_copy_many_mixed_sizes);
    RUN(test_raw_bytes_and_offsets);
    RUN(test_validation_names_items);
    RUN(test_pool_written_ranges_through_batches);
    RUN(test_checksum_many_missing_item);
    return check_summary();
}
