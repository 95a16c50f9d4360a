/* test_cuda.c: the cuda device backend (device_cuda.c, cuda_kernels.cu).
 *
 * Without a usable GPU (CI) every GPU case is skipped with the probe's
 * reason, but the probe itself is tested: it must report zero GPUs with a
 * reason, and asking for "cuda" must fail cleanly with WS_ERR_DEVICE. With a
 * GPU the cases compare the GPU against the cpu backend byte for byte:
 * every dtype conversion pair over every 8- and 16-bit pattern, random,
 * fill and checksum, a 10k-descriptor batch, strided copies, and a pool
 * that sleeps (memory really returned) and wakes at the same address. */
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "device.h"
#include "pool.h"
#include "tensor.h"

static ws_device *gpu; /* NULL without a usable GPU */

#define NEED_GPU()                                                                       \
    do {                                                                                 \
        if (!gpu) SKIP(ws_device_cuda_unavailable_reason());                             \
    } while (0)

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static uint64_t rng_state = 0x243F6A8885A308D3ull;
static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* ---- without a GPU (and with one) ---------------------------------------------- */

static void test_probe(void)
{
    int n = ws_device_cuda_count();
    const char *reason = ws_device_cuda_unavailable_reason();
    ws_device *d = NULL;
    if (n == 0) {
        CHECK(reason && *reason);
        CHECK_ERR(ws_device_get("cuda", &d), WS_ERR_DEVICE, reason);
        CHECK(d == NULL);
        CHECK_ERR(ws_device_get("cuda:0", &d), WS_ERR_DEVICE, "no usable GPU");
        const char *why = NULL;
        CHECK(ws_device_default(&why) == ws_device_cpu());
        CHECK(why && strstr(why, reason));
#ifdef WS_HAVE_CUDA
        ws_device devs[2];
        const char *r2 = NULL;
        CHECK(ws_cuda_probe(devs, 2, &r2) == 0);
        CHECK(r2 && strcmp(r2, reason) == 0);
        /* This CI machine has no driver at all: the reason must say so. */
        void *lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
        if (!lib) CHECK(strstr(reason, "libcuda.so.1 not found") != NULL);
        else dlclose(lib);
#else
        CHECK(strstr(reason, "built without CUDA") != NULL);
#endif
        printf("  (no GPU: %s)\n", reason);
        return;
    }
    CHECK(reason == NULL);
    CHECK_OK(ws_device_get("cuda", &d));
    CHECK(d && d->kind == WS_DEVICE_CUDA && strcmp(d->name, "cuda:0") == 0);
    CHECK(d && strstr(d->description, "(sm_") && strstr(d->description, "GiB)"));
    CHECK_ERR(ws_device_get("cuda:99", &d), WS_ERR_DEVICE, "does not exist");
    const char *why = NULL;
    CHECK(ws_device_default(&why)->kind == WS_DEVICE_CUDA);
    printf("  (%s: %s)\n", gpu->name, gpu->description);
}

/* ---- memory -------------------------------------------------------------------- */

static void test_alloc_free_oom(void)
{
    NEED_GPU();
    const size_t gib = (size_t)1 << 30;
    ws_mem_info m0, m1, m2;
    CHECK_OK(ws_device_synchronize(gpu));
    CHECK_OK(ws_device_mem_info(gpu, &m0));
    CHECK(m0.total > gib && m0.free <= m0.total);
    void *p = NULL;
    CHECK_OK(gpu->ops->alloc(gpu, 2 * gib, &p));
    CHECK(p != NULL);
    CHECK_OK(gpu->ops->fill(gpu, p, WS_U8, 2 * gib, 7)); /* touch it */
    CHECK_OK(ws_device_synchronize(gpu));
    CHECK_OK(ws_device_mem_info(gpu, &m1));
    CHECK(m1.held == m0.held + 2 * gib);
    CHECK(m1.peak >= m1.held);
    CHECK(m1.free + 2 * gib <= m0.free + gib / 8);
    gpu->ops->free(gpu, p, 2 * gib);
    CHECK_OK(ws_device_synchronize(gpu));
    CHECK_OK(ws_device_mem_info(gpu, &m2));
    CHECK(m2.held == m0.held);
    /* The pool keeps at most 256 MiB for reuse; the rest goes back. */
    CHECK(m2.free + gib / 2 >= m0.free);

    /* Out of memory is an error with numbers, not a crash, and leaves the
     * device usable. */
    void *q = NULL;
    CHECK_ERR(gpu->ops->alloc(gpu, m0.total * 4, &q), WS_ERR_NOMEM, "out of memory");
    CHECK(strstr(ws_errmsg(), "free of") != NULL && strstr(ws_errmsg(), gpu->name) != NULL);
    CHECK(q == NULL);
    CHECK_OK(gpu->ops->alloc(gpu, 4096, &q));
    CHECK_OK(gpu->ops->fill(gpu, q, WS_F32, 1024, 1.0));
    CHECK_OK(ws_device_synchronize(gpu));
    gpu->ops->free(gpu, q, 4096);

    /* Through the tensor API: the message names the tensor. */
    ws_tensor t = {0};
    int64_t huge = (int64_t)(m0.total / 2);
    ws_tensor_opts o = {.device = gpu, .name = "too.big"};
    ws_status rc = ws_tensor_empty(&t, WS_F32, 1, &huge, &o);
    CHECK(rc == WS_ERR_NOMEM);
    CHECK(ws_tensor_is_released(&t));
}

static void test_copies(void)
{
    NEED_GPU();
    const size_t n = ((size_t)48 << 20) + 13; /* odd size: exercises tails */
    unsigned char *h = malloc(n), *back = malloc(n), *pin = NULL, *pin2 = NULL;
    void *a = NULL, *b = NULL;
    CHECK(h && back);
    if (!h || !back) goto out;
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(rng() >> 24);
    CHECK_OK(gpu->ops->alloc(gpu, n, &a));
    CHECK_OK(gpu->ops->alloc(gpu, n, &b));
    CHECK_OK(gpu->ops->host_alloc(gpu, n, (void **)&pin));
    CHECK_OK(gpu->ops->host_alloc(gpu, n, (void **)&pin2));
    if (!a || !b || !pin || !pin2) goto out;
    CHECK(gpu->host_held >= 2 * n);
    /* pageable -> device -> device (unaligned both ways) -> pageable */
    CHECK_OK(gpu->ops->copy(gpu, a, h, n));
    CHECK_OK(gpu->ops->copy(gpu, (char *)b + 3, (char *)a + 5, n - 5));
    memset(back, 0, n);
    CHECK_OK(gpu->ops->copy(gpu, back, (char *)b + 3, n - 5));
    CHECK(memcmp(back, h + 5, n - 5) == 0);
    /* pinned -> device -> pinned, then an async device op followed by a
     * host read must see it (ordering across the two streams). */
    memcpy(pin, h, n);
    CHECK_OK(gpu->ops->copy(gpu, b, pin, n));
    CHECK_OK(gpu->ops->fill(gpu, b, WS_U8, 1000, 42));
    memset(pin2, 0, n);
    CHECK_OK(gpu->ops->copy(gpu, pin2, b, n));
    CHECK(pin2[0] == 42 && pin2[999] == 42);
    CHECK(memcmp(pin2 + 1000, h + 1000, n - 1000) == 0);
    /* host -> host through the gpu device is a plain copy */
    CHECK_OK(gpu->ops->copy(gpu, back, pin, n));
    CHECK(memcmp(back, h, n) == 0);
out:
    if (a) gpu->ops->free(gpu, a, n);
    if (b) gpu->ops->free(gpu, b, n);
    if (pin) gpu->ops->host_free(gpu, pin, n);
    if (pin2) gpu->ops->host_free(gpu, pin2, n);
    free(h);
    free(back);
}

/* ---- conversions: bit-identical to dtype.c -------------------------------------- */

/* Source patterns per dtype: every pattern for 8/16-bit types, and for f32
 * every upper half with rounding-sensitive lower halves plus random bits. */
static size_t make_patterns(ws_dtype t, void **out)
{
    size_t n;
    switch (t) {
    case WS_BF16: case WS_F16: {
        n = 65536;
        uint16_t *p = malloc(n * 2);
        for (size_t i = 0; p && i < n; i++) p[i] = (uint16_t)i;
        *out = p;
        return p ? n : 0;
    }
    case WS_FP8E4M3: case WS_U8: {
        n = 256;
        uint8_t *p = malloc(n);
        for (size_t i = 0; p && i < n; i++) p[i] = (uint8_t)i;
        *out = p;
        return p ? n : 0;
    }
    case WS_F32: {
        static const uint16_t lows[] = {0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1000, 0x0FFF};
        const size_t nl = sizeof lows / sizeof lows[0];
        n = 65536 * nl + 2 * 65536 + 16;
        uint32_t *p = malloc(n * 4);
        if (!p) return 0;
        size_t k = 0;
        for (uint32_t hi = 0; hi < 65536; hi++)
            for (size_t j = 0; j < nl; j++) p[k++] = hi << 16 | lows[j];
        for (uint32_t i = 0; i < 65536; i++) {
            p[k++] = (uint32_t)rng();
            /* f16/fp8 round at bit 13/20: halfway and near-halfway cases. */
            p[k++] = (i << 16 & 0xFFFF0000u) | ((i & 1) ? 0x1000 : 0x0FFF) | ((i & 2) ? 0x2000 : 0);
        }
        static const float specials[] = {0.0f, -0.0f, 448.0f, 464.0f, 480.0f, 65504.0f,
                                         65520.0f, 1e-8f, -1e-40f, 3.0e38f, 255.5f, 256.0f,
                                         -1.5f, 2147483648.0f, -2147483904.0f, 9.3e18f};
        for (size_t i = 0; i < 16; i++) memcpy(&p[k++], &specials[i], 4);
        *out = p;
        return k;
    }
    case WS_I32: {
        n = 65536 + 16;
        int32_t *p = malloc(n * 4);
        if (!p) return 0;
        static const int32_t edges[] = {0, 1, -1, 255, 256, -256, 16777216, 16777217, -16777217,
                                        INT32_MAX, INT32_MIN, INT32_MAX - 63, 127, 128, 65504,
                                        65520};
        for (size_t i = 0; i < 16; i++) p[i] = edges[i];
        for (size_t i = 16; i < n; i++) p[i] = (int32_t)(rng() >> (rng() % 40));
        *out = p;
        return n;
    }
    default: { /* WS_I64 */
        n = 65536 + 12;
        int64_t *p = malloc(n * 8);
        if (!p) return 0;
        static const int64_t edges[] = {0, -1, 255, 256, INT64_MAX, INT64_MIN,
                                        (1ll << 53) + 1, -(1ll << 53) - 3, (1ll << 24) + 1,
                                        INT32_MAX + 1ll, INT32_MIN - 1ll, 0x7FFFFF8000000000ll};
        for (size_t i = 0; i < 12; i++) p[i] = edges[i];
        for (size_t i = 12; i < n; i++) p[i] = (int64_t)(rng() >> (rng() % 64));
        *out = p;
        return n;
    }
    }
}

static void test_conversions_bit_identical(void)
{
    NEED_GPU();
    enum { T = WS_DTYPE_COUNT };
    void *hsrc[T] = {0}, *dsrc[T] = {0}, *ddst[T][T] = {{0}};
    size_t nsrc[T] = {0};
    ws_copy_desc descs[T * T];
    size_t nd = 0;
    for (int s = 0; s < T; s++) {
        nsrc[s] = make_patterns((ws_dtype)s, &hsrc[s]);
        CHECK(nsrc[s] > 0);
        if (!nsrc[s]) goto out;
        size_t sb = nsrc[s] * ws_dtype_size((ws_dtype)s);
        CHECK_OK(gpu->ops->alloc(gpu, sb, &dsrc[s]));
        if (!dsrc[s]) goto out;
        CHECK_OK(gpu->ops->copy(gpu, dsrc[s], hsrc[s], sb));
        for (int d = 0; d < T; d++) {
            CHECK_OK(gpu->ops->alloc(gpu, nsrc[s] * ws_dtype_size((ws_dtype)d), &ddst[s][d]));
            if (!ddst[s][d]) goto out;
            descs[nd++] = (ws_copy_desc){ddst[s][d], dsrc[s], nsrc[s], (ws_dtype)d, (ws_dtype)s};
        }
    }
    /* All 49 pairs in one batched launch. */
    CHECK_OK(gpu->ops->copy_batch(gpu, descs, nd));
    for (int s = 0; s < T; s++) {
        for (int d = 0; d < T; d++) {
            size_t es = ws_dtype_size((ws_dtype)d), nb = nsrc[s] * es;
            unsigned char *want = malloc(nb), *got = malloc(nb);
            if (!want || !got) {
                free(want);
                free(got);
                CHECK(0);
                goto out;
            }
            ws_convert_host(want, (ws_dtype)d, hsrc[s], (ws_dtype)s, nsrc[s]);
            CHECK_OK(gpu->ops->copy(gpu, got, ddst[s][d], nb));
            size_t bad = 0, first = 0;
            for (size_t i = 0; i < nsrc[s]; i++) {
                if (memcmp(want + i * es, got + i * es, es) != 0 && bad++ == 0) first = i;
            }
            if (bad) {
                uint64_t in = ws_load_bits((char *)hsrc[s] + first * ws_dtype_size((ws_dtype)s),
                                           (ws_dtype)s);
                fprintf(stderr, "  %s -> %s: %zu of %zu differ; first: in 0x%llx cpu 0x%llx gpu 0x%llx\n",
                        ws_dtype_name((ws_dtype)s), ws_dtype_name((ws_dtype)d), bad, nsrc[s],
                        (unsigned long long)in,
                        (unsigned long long)ws_load_bits(want + first * es, (ws_dtype)d),
                        (unsigned long long)ws_load_bits(got + first * es, (ws_dtype)d));
            }
            CHECK(bad == 0);
            /* The checksum with conversion hashes the same converted bits. */
            ws_layout l;
            int64_t ns = (int64_t)nsrc[s];
            ws_layout_contiguous(&l, 1, &ns);
            uint64_t cs_gpu = 1, cs_cpu = 2;
            CHECK_OK(gpu->ops->checksum(gpu, dsrc[s], (ws_dtype)s, &l, 11, (ws_dtype)d, &cs_gpu));
            CHECK_OK(ws_cpu_ops()->checksum(ws_device_cpu(), hsrc[s], (ws_dtype)s, &l, 11,
                                            (ws_dtype)d, &cs_cpu));
            CHECK_EQ_U64(cs_gpu, cs_cpu);
            free(want);
            free(got);
        }
    }
out:
    for (int s = 0; s < T; s++) {
        for (int d = 0; d < T; d++)
            if (ddst[s][d]) gpu->ops->free(gpu, ddst[s][d], nsrc[s] * ws_dtype_size((ws_dtype)d));
        if (dsrc[s]) gpu->ops->free(gpu, dsrc[s], nsrc[s] * ws_dtype_size((ws_dtype)s));
        free(hsrc[s]);
    }
}

/* Any bit pattern (NaN payloads included), every dtype, a first index past
 * 2^32 and enough elements for the cpu to split them across threads: the
 * GPU's checksum is the cpu's, as a whole and as uneven shards. */
static void test_checksum_raw_bits_match_cpu(void)
{
    NEED_GPU();
    const int64_t n = ((int64_t)1 << 21) + 4097;
    const uint64_t first = ((uint64_t)1 << 32) + 12345;
    for (int t = 0; t < WS_DTYPE_COUNT; t++) {
        size_t nb = (size_t)n * ws_dtype_size((ws_dtype)t);
        unsigned char *h = malloc(nb);
        void *dptr = NULL;
        CHECK(h != NULL);
        if (!h) return;
        for (size_t i = 0; i < nb; i += 8) {
            uint64_t r = rng();
            memcpy(h + i, &r, nb - i < 8 ? nb - i : 8);
        }
        CHECK_OK(gpu->ops->alloc(gpu, nb, &dptr));
        if (!dptr) {
            free(h);
            return;
        }
        CHECK_OK(gpu->ops->copy(gpu, dptr, h, nb));
        ws_layout l;
        ws_layout_contiguous(&l, 1, &n);
        uint64_t g = 1, c = 2;
        CHECK_OK(gpu->ops->checksum(gpu, dptr, (ws_dtype)t, &l, first, (ws_dtype)t, &g));
        CHECK_OK(ws_cpu_ops()->checksum(ws_device_cpu(), h, (ws_dtype)t, &l, first, (ws_dtype)t,
                                        &c));
        CHECK_EQ_U64(g, c);
        /* Shards on the GPU with their global first index sum to the cpu's whole. */
        int64_t cut = n / 3 + 1;
        ws_layout l1, l2;
        int64_t n2 = n - cut;
        ws_layout_contiguous(&l1, 1, &cut);
        ws_layout_contiguous(&l2, 1, &n2);
        uint64_t s1 = 0, s2 = 0;
        size_t off = (size_t)cut * ws_dtype_size((ws_dtype)t);
        CHECK_OK(gpu->ops->checksum(gpu, dptr, (ws_dtype)t, &l1, first, (ws_dtype)t, &s1));
        CHECK_OK(gpu->ops->checksum(gpu, (char *)dptr + off, (ws_dtype)t, &l2,
                                    first + (uint64_t)cut, (ws_dtype)t, &s2));
        CHECK_EQ_U64(s1 + s2, c);
        /* Rows of a block with their global indices: the cpu's sum. */
        int64_t cols = n / 7 + 1, rows = n / cols;
        uint64_t pitch = (uint64_t)cols * 3 + 5, gr = 1, cr = 2;
        CHECK_OK(gpu->ops->checksum_rows(gpu, dptr, (ws_dtype)t, rows, cols, first, pitch,
                                         (ws_dtype)t, &gr));
        CHECK_OK(ws_cpu_ops()->checksum_rows(ws_device_cpu(), h, (ws_dtype)t, rows, cols, first,
                                             pitch, (ws_dtype)t, &cr));
        CHECK_EQ_U64(gr, cr);
        gpu->ops->free(gpu, dptr, nb);
        free(h);
    }
}

/* ---- random, fill, checksum through the tensor API ----------------------------- */

static void test_random_fill_checksum_match_cpu(void)
{
    NEED_GPU();
    const int64_t shape[2] = {333, 1031};
    for (int t = 0; t < WS_DTYPE_COUNT; t++) {
        ws_tensor c = {0}, g = {0}, back = {0}, cv = {0}, gv = {0};
        ws_tensor_opts oc = {.device = ws_device_cpu(), .name = "cpu.t"};
        ws_tensor_opts og = {.device = gpu, .name = "gpu.t"};
        CHECK_OK(ws_tensor_empty(&c, (ws_dtype)t, 2, shape, &oc));
        CHECK_OK(ws_tensor_empty(&g, (ws_dtype)t, 2, shape, &og));
        CHECK_OK(ws_tensor_empty(&back, (ws_dtype)t, 2, shape, &oc));
        if (ws_tensor_is_released(&c) || ws_tensor_is_released(&g) || ws_tensor_is_released(&back))
            goto next;
        size_t nb = ws_tensor_nbytes(&c);
        CHECK_OK(ws_tensor_random(&c, 1234, 300.0f, 77));
        CHECK_OK(ws_tensor_random(&g, 1234, 300.0f, 77));
        CHECK_OK(ws_tensor_copy(&back, &g));
        CHECK(memcmp(ws_tensor_data(&c), ws_tensor_data(&back), nb) == 0);
        uint64_t a = 1, b = 2;
        CHECK_OK(ws_tensor_checksum(&c, 5, (ws_dtype)t, &a));
        CHECK_OK(ws_tensor_checksum(&g, 5, (ws_dtype)t, &b));
        CHECK_EQ_U64(a, b);
        CHECK_OK(ws_tensor_checksum(&c, 0, WS_BF16, &a));
        CHECK_OK(ws_tensor_checksum(&g, 0, WS_BF16, &b));
        CHECK_EQ_U64(a, b);
        /* A strided view: columns [100, 900) of every row. */
        CHECK_OK(ws_tensor_narrow(&cv, &c, 1, 100, 800));
        CHECK_OK(ws_tensor_narrow(&gv, &g, 1, 100, 800));
        CHECK_OK(ws_tensor_checksum(&cv, 9, (ws_dtype)t, &a));
        CHECK_OK(ws_tensor_checksum(&gv, 9, (ws_dtype)t, &b));
        CHECK_EQ_U64(a, b);
        /* Fill, including values that round, overflow or saturate. */
        static const double values[] = {1.5, -3.3, 1e10, -1e10, 300.7, 0.0};
        for (size_t k = 0; k < sizeof values / sizeof values[0]; k++) {
            CHECK_OK(ws_tensor_fill(&c, values[k]));
            CHECK_OK(ws_tensor_fill(&g, values[k]));
            CHECK_OK(ws_tensor_copy(&back, &g));
            CHECK(memcmp(ws_tensor_data(&c), ws_tensor_data(&back), nb) == 0);
        }
    next:
        ws_tensor_free(&cv);
        ws_tensor_free(&gv);
        ws_tensor_free(&c);
        ws_tensor_free(&g);
        ws_tensor_free(&back);
    }
}

/* ---- batched copies --------------------------------------------------------------- */

static void test_copy_batch_10k(void)
{
    NEED_GPU();
    enum { N = 10000 };
    static const ws_dtype kinds[][2] = {
        {WS_F32, WS_F32}, {WS_BF16, WS_F32}, {WS_F32, WS_BF16}, {WS_U8, WS_U8}, {WS_F16, WS_BF16}};
    ws_copy_desc *descs = calloc(N, sizeof *descs);
    size_t *soff = calloc(N, sizeof *soff), *doff = calloc(N, sizeof *doff);
    size_t sbytes = 0, dbytes = 0;
    unsigned char *hs = NULL, *want = NULL, *got = NULL;
    void *ds = NULL, *dd = NULL;
    CHECK(descs && soff && doff);
    if (!descs || !soff || !doff) goto out;
    for (size_t i = 0; i < N; i++) {
        const ws_dtype *k = kinds[i % 5];
        size_t count = 1 + rng() % (i % 97 == 0 ? 200000 : 3000);
        /* u8 plain copies start at odd byte offsets: the unaligned path. */
        size_t salign = k[1] == WS_U8 ? 1 : 16, dalign = k[0] == WS_U8 ? 1 : 16;
        sbytes = (sbytes + salign - 1) / salign * salign + (k[1] == WS_U8 ? rng() % 7 : 0);
        dbytes = (dbytes + dalign - 1) / dalign * dalign + (k[0] == WS_U8 ? rng() % 5 : 0);
        soff[i] = sbytes;
        doff[i] = dbytes;
        sbytes += count * ws_dtype_size(k[1]);
        dbytes += count * ws_dtype_size(k[0]);
        descs[i] = (ws_copy_desc){NULL, NULL, count, k[0], k[1]};
    }
    hs = malloc(sbytes);
    want = calloc(1, dbytes);
    got = malloc(dbytes);
    CHECK(hs && want && got);
    if (!hs || !want || !got) goto out;
    /* Random bits, NaNs included: both sides must produce the same bits. */
    for (size_t i = 0; i < sbytes; i++) hs[i] = (unsigned char)(rng() >> 33);
    CHECK_OK(gpu->ops->alloc(gpu, sbytes, &ds));
    CHECK_OK(gpu->ops->alloc(gpu, dbytes, &dd));
    if (!ds || !dd) goto out;
    CHECK_OK(gpu->ops->copy(gpu, ds, hs, sbytes));
    CHECK_OK(gpu->ops->fill(gpu, dd, WS_U8, dbytes, 0));
    for (size_t i = 0; i < N; i++) {
        descs[i].src = (char *)ds + soff[i];
        descs[i].dst = (char *)dd + doff[i];
        ws_convert_host(want + doff[i], descs[i].dst_dtype, hs + soff[i], descs[i].src_dtype,
                        descs[i].count);
    }
    CHECK_OK(ws_device_synchronize(gpu));
    double t0 = now_ms();
    CHECK_OK(gpu->ops->copy_batch(gpu, descs, N));
    double t1 = now_ms();
    CHECK_OK(ws_device_synchronize(gpu));
    double t2 = now_ms();
    printf("  copy_batch: %d descriptors, %.1f MB out: issue %.3f ms, done %.3f ms\n", N,
           (double)dbytes / 1e6, t1 - t0, t2 - t0);
    CHECK_OK(gpu->ops->copy(gpu, got, dd, dbytes));
    CHECK(memcmp(got, want, dbytes) == 0);
out:
    if (ds) gpu->ops->free(gpu, ds, sbytes);
    if (dd) gpu->ops->free(gpu, dd, dbytes);
    free(hs);
    free(want);
    free(got);
    free(descs);
    free(soff);
    free(doff);
}

/* A batch mixing every route: pageable and pinned host memory on either
 * side, with and without conversion, small and large. */
static void test_copy_batch_host_routes(void)
{
    NEED_GPU();
    const size_t n = (size_t)1 << 20; /* elements per descriptor */
    float *hsrc = malloc(n * 4), *pin_src = NULL;
    uint16_t *hdst = malloc(n * 2), *pin_dst = NULL, *want16 = malloc(n * 2), *got16 = malloc(n * 2);
    float *hdst32 = malloc(n * 4);
    void *dev_a = NULL, *dev_b = NULL, *dev_c = NULL;
    if (!hsrc || !hdst || !want16 || !got16 || !hdst32) {
        CHECK(0);
        goto out;
    }
    for (size_t i = 0; i < n; i++) hsrc[i] = ws_random_elem(3, i, 1000.0f);
    ws_convert_host(want16, WS_BF16, hsrc, WS_F32, n);
    CHECK_OK(gpu->ops->host_alloc(gpu, n * 4, (void **)&pin_src));
    CHECK_OK(gpu->ops->host_alloc(gpu, n * 2, (void **)&pin_dst));
    CHECK_OK(gpu->ops->alloc(gpu, n * 2, &dev_a));
    CHECK_OK(gpu->ops->alloc(gpu, n * 2, &dev_b));
    CHECK_OK(gpu->ops->alloc(gpu, n * 4, &dev_c));
    if (!pin_src || !pin_dst || !dev_a || !dev_b || !dev_c) goto out;
    memcpy(pin_src, hsrc, n * 4);
    ws_copy_desc in[] = {
        {dev_a, hsrc, n, WS_BF16, WS_F32},    /* pageable -> device, converted on the host */
        {dev_b, pin_src, n, WS_BF16, WS_F32}, /* pinned -> device, converted by the kernel */
        {dev_c, pin_src, n, WS_F32, WS_F32},  /* pinned -> device, copy engine */
    };
    CHECK_OK(gpu->ops->copy_batch(gpu, in, 3));
    ws_copy_desc outd[] = {
        {hdst, dev_a, n, WS_BF16, WS_BF16},   /* device -> pageable, copy engine */
        {pin_dst, dev_b, n, WS_BF16, WS_BF16},
        {hdst32, dev_b, n, WS_F32, WS_BF16},  /* device -> pageable, converted on the host */
        {got16, hsrc, n, WS_BF16, WS_F32},    /* host -> host */
    };
    CHECK_OK(gpu->ops->copy_batch(gpu, outd, 4));
    CHECK(memcmp(hdst, want16, n * 2) == 0);
    CHECK(memcmp(pin_dst, want16, n * 2) == 0);
    CHECK(memcmp(got16, want16, n * 2) == 0);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += hdst32[i] != ws_bf16_to_f32(want16[i]);
    CHECK(bad == 0);
    float *back32 = malloc(n * 4);
    if (back32) {
        CHECK_OK(gpu->ops->copy(gpu, back32, dev_c, n * 4));
        CHECK(memcmp(back32, hsrc, n * 4) == 0);
        free(back32);
    }
out:
    if (pin_src) gpu->ops->host_free(gpu, pin_src, n * 4);
    if (pin_dst) gpu->ops->host_free(gpu, pin_dst, n * 2);
    if (dev_a) gpu->ops->free(gpu, dev_a, n * 2);
    if (dev_b) gpu->ops->free(gpu, dev_b, n * 2);
    if (dev_c) gpu->ops->free(gpu, dev_c, n * 4);
    free(hsrc);
    free(hdst);
    free(want16);
    free(got16);
    free(hdst32);
}

/* ---- strided copies ---------------------------------------------------------------- */

/* dst (on `dd`) narrowed along `dim` <- src; the same on the cpu as reference. */
static void strided_case(ws_device *sd, const int64_t *dshape, const int64_t *sshape, int dim,
                         int64_t start, ws_dtype dt, ws_dtype st)
{
    ws_tensor src = {0}, dst = {0}, view = {0}, ref = {0}, refview = {0}, back = {0}, srccpu = {0};
    ws_tensor_opts oc = {.device = ws_device_cpu()}, og = {.device = gpu}, os = {.device = sd};
    CHECK_OK(ws_tensor_empty(&srccpu, st, 2, sshape, &oc));
    CHECK_OK(ws_tensor_empty(&src, st, 2, sshape, &os));
    CHECK_OK(ws_tensor_empty(&dst, dt, 2, dshape, &og));
    CHECK_OK(ws_tensor_empty(&ref, dt, 2, dshape, &oc));
    CHECK_OK(ws_tensor_empty(&back, dt, 2, dshape, &oc));
    if (ws_tensor_is_released(&srccpu) || ws_tensor_is_released(&src) ||
        ws_tensor_is_released(&dst) || ws_tensor_is_released(&ref) || ws_tensor_is_released(&back))
        goto out;
    CHECK_OK(ws_tensor_random(&srccpu, 42, 10.0f, 0));
    CHECK_OK(ws_tensor_copy(&src, &srccpu));
    CHECK_OK(ws_tensor_fill(&dst, -1.0));
    CHECK_OK(ws_tensor_fill(&ref, -1.0));
    CHECK_OK(ws_tensor_narrow(&view, &dst, dim, start, sshape[dim]));
    CHECK_OK(ws_tensor_narrow(&refview, &ref, dim, start, sshape[dim]));
    CHECK_OK(ws_tensor_copy(&view, &src));
    CHECK_OK(ws_tensor_copy(&refview, &srccpu));
    CHECK_OK(ws_tensor_copy(&back, &dst));
    CHECK(memcmp(ws_tensor_data(&back), ws_tensor_data(&ref), ws_tensor_nbytes(&ref)) == 0);
    uint64_t a = 1, b = 2;
    CHECK_OK(ws_tensor_checksum(&view, 3, dt, &a));
    CHECK_OK(ws_tensor_checksum(&refview, 3, dt, &b));
    CHECK_EQ_U64(a, b);
out:
    ws_tensor_free(&view);
    ws_tensor_free(&refview);
    ws_tensor_free(&src);
    ws_tensor_free(&srccpu);
    ws_tensor_free(&dst);
    ws_tensor_free(&ref);
    ws_tensor_free(&back);
}

static void test_strided_narrow(void)
{
    NEED_GPU();
    const int64_t big_d[2] = {256, 3000}, big_s[2] = {256, 1000};
    const int64_t thin_d[2] = {5000, 7}, thin_s[2] = {5000, 3};
    const int64_t rows_d[2] = {600, 512}, rows_s[2] = {200, 512};
    /* TP-style column slice (long rows), device -> device, converting */
    strided_case(gpu, big_d, big_s, 1, 1000, WS_BF16, WS_F32);
    /* the same from host memory (staged) */
    strided_case(ws_device_cpu(), big_d, big_s, 1, 1000, WS_BF16, WS_F32);
    /* short rows: the per-element index path */
    strided_case(gpu, thin_d, thin_s, 1, 2, WS_F16, WS_BF16);
    strided_case(gpu, thin_d, thin_s, 1, 4, WS_F32, WS_F32);
    /* a row slice is contiguous: plain copy */
    strided_case(gpu, rows_d, rows_s, 0, 200, WS_BF16, WS_BF16);

    /* Layouts of different shapes, same numel: a transposed read into a
     * contiguous [6, 4]; and a device -> pageable strided scatter. */
    float h[24], out[24], want[24];
    for (int i = 0; i < 24; i++) h[i] = (float)i;
    void *a = NULL, *b = NULL;
    CHECK_OK(gpu->ops->alloc(gpu, sizeof h, &a));
    CHECK_OK(gpu->ops->alloc(gpu, sizeof h, &b));
    if (!a || !b) goto out;
    CHECK_OK(gpu->ops->copy(gpu, a, h, sizeof h));
    ws_layout sl = {.ndim = 2, .shape = {6, 4}, .strides = {1, 6}}; /* transpose of [4, 6] */
    ws_layout dl;
    int64_t ds[2] = {6, 4};
    ws_layout_contiguous(&dl, 2, ds);
    CHECK_OK(gpu->ops->copy_strided(gpu, b, WS_F32, &dl, a, WS_F32, &sl));
    CHECK_OK(gpu->ops->copy(gpu, out, b, sizeof out));
    for (int r = 0; r < 6; r++)
        for (int c = 0; c < 4; c++) want[r * 4 + c] = h[c * 6 + r];
    CHECK(memcmp(out, want, sizeof out) == 0);
    /* device -> pageable host, strided scatter (staged through pinned memory) */
    memset(out, 0, sizeof out);
    CHECK_OK(gpu->ops->copy_strided(gpu, out, WS_F32, &sl, b, WS_F32, &dl));
    CHECK(memcmp(out, h, sizeof out) == 0);
    /* pageable host -> device, strided gather with conversion (staged) */
    uint16_t out16[24];
    CHECK_OK(gpu->ops->copy_strided(gpu, b, WS_BF16, &dl, h, WS_F32, &sl));
    CHECK_OK(gpu->ops->copy(gpu, out16, b, sizeof out16));
    for (int i = 0; i < 24; i++) CHECK(out16[i] == ws_f32_to_bf16(want[i]));
out:
    if (a) gpu->ops->free(gpu, a, sizeof h);
    if (b) gpu->ops->free(gpu, b, sizeof h);
}

/* ---- sleepable pools ------------------------------------------------------------ */

static void test_pool_sleep_wake(void)
{
    NEED_GPU();
    const size_t cap = (size_t)2 << 30;
    ws_pool *pool = NULL;
    ws_tensor t = {0};
    CHECK_OK(ws_pool_create(gpu, "weights", cap, &pool));
    if (!pool) return;
    int64_t n = (int64_t)(cap / 2 / 2); /* bf16: 1 GiB */
    ws_tensor_opts o = {.pool = pool, .name = "model.w"};
    CHECK_OK(ws_tensor_empty(&t, WS_BF16, 1, &n, &o));
    if (ws_tensor_is_released(&t)) goto out;
    void *addr = ws_tensor_data(&t);
    CHECK_OK(ws_tensor_random(&t, 99, 1.0f, 0));
    uint64_t c0 = 0, c1 = 1;
    CHECK_OK(ws_tensor_checksum(&t, 0, WS_BF16, &c0));
    ws_mem_info awake, asleep;
    CHECK_OK(ws_device_synchronize(gpu));
    CHECK_OK(ws_device_mem_info(gpu, &awake));

    CHECK_OK(ws_pool_sleep(pool, 1, "step 1"));
    CHECK_OK(ws_device_mem_info(gpu, &asleep));
    printf("  sleep(1): free %.2f -> %.2f GiB\n", awake.free / 1073741824.0,
           asleep.free / 1073741824.0);
    CHECK(asleep.free >= awake.free + cap - cap / 8);
    CHECK(asleep.held + cap <= awake.held + 4096);
    CHECK_OK(ws_pool_wake(pool));
    CHECK(ws_tensor_data(&t) == addr);
    CHECK_OK(ws_tensor_checksum(&t, 0, WS_BF16, &c1));
    CHECK_EQ_U64(c1, c0);
    /* The pinned backup stays allocated for the next level-1 sleep. */
    ws_pool_stats pst;
    ws_pool_get_stats(pool, &pst);
    CHECK(pst.backup_bytes == 0 && pst.backup_cached >= pst.used);
    CHECK_OK(ws_pool_sleep(pool, 1, "step 1b"));
    CHECK_OK(ws_pool_wake(pool));
    CHECK_OK(ws_tensor_checksum(&t, 0, WS_BF16, &c1));
    CHECK_EQ_U64(c1, c0);

    CHECK_OK(ws_pool_sleep(pool, 2, "step 2"));
    CHECK_OK(ws_device_mem_info(gpu, &asleep));
    CHECK(asleep.free >= awake.free + cap - cap / 8);
    CHECK_OK(ws_pool_wake(pool));
    CHECK(ws_tensor_data(&t) == addr);
    CHECK_ERR(ws_tensor_checksum(&t, 0, WS_BF16, &c1), WS_ERR_DISCARDED, "model.w");
    CHECK_OK(ws_tensor_random(&t, 99, 1.0f, 0));
    CHECK_OK(ws_tensor_checksum(&t, 0, WS_BF16, &c1));
    CHECK_EQ_U64(c1, c0);
out:
    ws_tensor_free(&t);
    CHECK_OK(ws_pool_destroy(pool));
}

/* ---- events ---------------------------------------------------------------------- */

static void test_events(void)
{
    NEED_GPU();
    ws_event *e0 = NULL, *e1 = NULL;
    void *p = NULL;
    const size_t n = (size_t)256 << 20;
    CHECK_OK(gpu->ops->event_create(gpu, &e0));
    CHECK_OK(gpu->ops->event_create(gpu, &e1));
    CHECK_OK(gpu->ops->alloc(gpu, n, &p));
    if (!e0 || !e1 || !p) goto out;
    CHECK_OK(gpu->ops->event_record(gpu, e0));
    CHECK_OK(gpu->ops->fill(gpu, p, WS_F32, n / 4, 2.0));
    CHECK_OK(gpu->ops->event_record(gpu, e1));
    double ms = -1;
    CHECK_OK(gpu->ops->event_elapsed_ms(gpu, e0, e1, &ms));
    CHECK(ms > 0 && ms < 1000);
    printf("  fill 256 MiB: %.3f ms (%.0f GB/s)\n", ms, (double)n / ms / 1e6);
out:
    if (p) gpu->ops->free(gpu, p, n);
    if (e0) gpu->ops->event_destroy(gpu, e0);
    if (e1) gpu->ops->event_destroy(gpu, e1);
}

int main(void)
{
    if (ws_device_cuda_count() > 0 && ws_device_get("cuda", &gpu) != WS_OK) gpu = NULL;
    RUN(test_probe);
    RUN(test_alloc_free_oom);
    RUN(test_copies);
    RUN(test_conversions_bit_identical);
    RUN(test_random_fill_checksum_match_cpu);
    RUN(test_checksum_raw_bits_match_cpu);
    RUN(test_copy_batch_10k);
    RUN(test_copy_batch_host_routes);
    RUN(test_strided_narrow);
    RUN(test_pool_sleep_wake);
    RUN(test_events);
    return check_summary();
}
