/* test_tensor.c: the cpu device, the registry, the thread pool, tensors,
 * views, copies, fills, random values and the shard-composable checksum. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "device.h"
#include "parallel.h"
#include "tensor.h"

static ws_status make(ws_tensor *t, ws_dtype dt, int ndim, const int64_t *shape, const char *name)
{
    ws_tensor_opts o = {.name = name};
    return ws_tensor_empty(t, dt, ndim, shape, &o);
}

/* The reference checksum, element by element over a contiguous f32 array. */
static uint64_t reference_checksum(const float *v, size_t n, uint64_t first)
{
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &v[i], 4);
        s += ws_hash_elem(first + i, bits);
    }
    return s;
}

static void test_registry(void)
{
    ws_device *d = NULL;
    CHECK_OK(ws_device_get("cpu", &d));
    CHECK(d == ws_device_cpu() && d->kind == WS_DEVICE_CPU);
    CHECK(strcmp(d->name, "cpu") == 0 && strstr(d->description, "host memory") != NULL);
    CHECK_ERR(ws_device_get("tpu", &d), WS_ERR_DEVICE,
              "unknown device 'tpu': expected cpu, cuda or cuda:N");
    CHECK(d == NULL);
    CHECK_ERR(ws_device_get("cuda:x", &d), WS_ERR_DEVICE, "unknown device 'cuda:x'");
    const char *why = NULL;
    ws_device *def = ws_device_default(&why);
    CHECK(why != NULL);
    if (ws_device_cuda_count() == 0) {
        CHECK(def == ws_device_cpu());
        CHECK(strstr(why, "no usable GPU: ") == why);
        CHECK_ERR(ws_device_get("cuda", &d), WS_ERR_DEVICE, "no usable GPU: ");
        CHECK(ws_device_cuda_unavailable_reason() != NULL);
#ifndef WS_HAVE_CUDA
        CHECK(strcmp(ws_device_cuda_unavailable_reason(), "built without CUDA") == 0);
#endif
    } else {
        int n = ws_device_cuda_count();
        char name[32], want[64];
        snprintf(name, sizeof name, "cuda:%d", n + 2);
        snprintf(want, sizeof want, "device '%s' does not exist: %d GPU", name, n);
        CHECK_ERR(ws_device_get(name, &d), WS_ERR_DEVICE, want);
        CHECK_OK(ws_device_get("cuda", &d));
        CHECK(d == def && d->kind == WS_DEVICE_CUDA);
    }
}

static void test_layout_helpers(void)
{
    ws_layout l;
    int64_t shape[3] = {2, 3, 4};
    ws_layout_contiguous(&l, 3, shape);
    CHECK(l.strides[0] == 12 && l.strides[1] == 4 && l.strides[2] == 1);
    CHECK(ws_layout_numel(&l) == 24 && ws_layout_is_contiguous(&l));
    l.strides[1] = 5;
    CHECK(!ws_layout_is_contiguous(&l));
    ws_layout_contiguous(&l, 0, shape);
    CHECK(ws_layout_numel(&l) == 1 && ws_layout_is_contiguous(&l));
}

typedef struct {
    unsigned char *hits;
    int max_worker;
} cover_ctx;

static void cover(void *vctx, size_t b, size_t e, int worker)
{
    cover_ctx *c = vctx;
    for (size_t i = b; i < e; i++) c->hits[i]++;
    if (worker > __atomic_load_n(&c->max_worker, __ATOMIC_RELAXED))
        __atomic_store_n(&c->max_worker, worker, __ATOMIC_RELAXED);
}

static void nested(void *vctx, size_t b, size_t e, int worker)
{
    cover_ctx *c = vctx;
    /* A nested call runs inline instead of deadlocking. */
    ws_parallel_for(e - b, 1, cover, &(cover_ctx){c->hits + b, 0});
}

static void test_parallel_for_covers_once(void)
{
    enum { N = 1000003 };
    unsigned char *hits = calloc(N, 1);
    cover_ctx c = {hits, 0};
    ws_parallel_for(N, 1000, cover, &c);
    int bad = 0;
    for (size_t i = 0; i < N; i++) bad += hits[i] != 1;
    CHECK(bad == 0);
    CHECK(c.max_worker < ws_parallel_threads());
    memset(hits, 0, N);
    ws_parallel_for(N, 1000, nested, &c);
    for (size_t i = 0; i < N; i++) bad += hits[i] != 1;
    CHECK(bad == 0);
    ws_parallel_for(0, 1, cover, &c); /* no work, no call */
    free(hits);
    CHECK(ws_parallel_threads() >= 1);
}

static void test_alloc_accounting_and_oom(void)
{
    ws_device *cpu = ws_device_cpu();
    size_t held0 = cpu->held;
    ws_tensor t;
    int64_t shape[2] = {1024, 1024};
    CHECK_OK(make(&t, WS_F32, 2, shape, "big"));
    CHECK(((uintptr_t)ws_tensor_data(&t) & 63) == 0);
    CHECK(cpu->held == held0 + 4u * 1024 * 1024);
    CHECK(cpu->peak >= cpu->held);
    ws_mem_info mi;
    CHECK_OK(ws_device_mem_info(cpu, &mi));
    CHECK(mi.total > 0 && mi.held == cpu->held && mi.free <= mi.total);
    ws_tensor_free(&t);
    CHECK(cpu->held == held0);
    CHECK(ws_tensor_is_released(&t));

    int64_t huge[1] = {(int64_t)1 << 50};
    ws_tensor h;
    CHECK_ERR(make(&h, WS_U8, 1, huge, "huge"), WS_ERR_NOMEM, "out of memory allocating 1.0 PiB");
    CHECK(strstr(ws_errmsg(), "'huge'") != NULL);
    CHECK(ws_tensor_is_released(&h));
    CHECK(cpu->held == held0);
    int64_t neg[1] = {-1};
    CHECK_ERR(make(&h, WS_U8, 1, neg, "neg"), WS_ERR_ARG, "negative size");
    /* Small allocations are 64-byte aligned too. */
    int64_t one[1] = {3};
    CHECK_OK(make(&h, WS_U8, 1, one, NULL));
    CHECK(((uintptr_t)ws_tensor_data(&h) & 63) == 0);
    ws_tensor_free(&h);
}

static void test_empty_tensors(void)
{
    int64_t s[2] = {0, 5};
    ws_tensor a, b;
    CHECK_OK(make(&a, WS_F32, 2, s, "a"));
    CHECK_OK(make(&b, WS_BF16, 2, s, "b"));
    CHECK(ws_tensor_data(&a) != NULL && ws_tensor_nbytes(&a) == 0);
    CHECK_OK(ws_tensor_fill(&a, 1));
    CHECK_OK(ws_tensor_copy(&b, &a));
    uint64_t sum = 1;
    CHECK_OK(ws_tensor_checksum(&a, 0, WS_F32, &sum));
    CHECK(sum == 0);
    double v;
    CHECK_ERR(ws_tensor_get(&a, 0, &v), WS_ERR_ARG, "index 0 out of range for tensor 'a' f32[0,5]");
    ws_tensor_free(&a);
    ws_tensor_free(&b);
}

static void test_labels_and_names(void)
{
    ws_tensor t;
    int64_t shape[2] = {2, 3};
    CHECK_OK(make(&t, WS_BF16, 2, shape, NULL));
    char buf[128];
    CHECK(strcmp(ws_tensor_label(&t, buf, sizeof buf), "<unnamed bf16[2,3]>") == 0);
    CHECK_OK(ws_tensor_set_name(&t, "model.w"));
    CHECK(strcmp(ws_tensor_label(&t, buf, sizeof buf), "'model.w'") == 0);
    CHECK(strcmp(ws_tensor_typestr(&t, buf, sizeof buf), "bf16[2,3]") == 0);
    ws_tensor_free(&t);
    ws_tensor_free(&t); /* idempotent */
}

static void test_fill_get_set(void)
{
    ws_tensor t;
    int64_t shape[2] = {3, 5};
    CHECK_OK(make(&t, WS_BF16, 2, shape, "t"));
    CHECK_OK(ws_tensor_fill(&t, 1.5));
    double v = 0;
    CHECK_OK(ws_tensor_get(&t, 14, &v));
    CHECK(v == 1.5);
    CHECK_OK(ws_tensor_set(&t, 7, 3.140625));
    CHECK_OK(ws_tensor_get(&t, 7, &v));
    CHECK(v == 3.140625);
    CHECK_EQ_U64(((uint16_t *)ws_tensor_data(&t))[7], 0x4049);
    CHECK_ERR(ws_tensor_get(&t, 15, &v), WS_ERR_ARG, "get: index 15 out of range for tensor 't'");
    CHECK_ERR(ws_tensor_set(&t, -1, 0), WS_ERR_ARG, "set: index -1 out of range");
    ws_tensor_free(&t);
    /* Every element of every width, across chunk and block boundaries. */
    static const ws_dtype types[] = {WS_F32, WS_BF16, WS_FP8E4M3, WS_I64};
    for (int k = 0; k < 4; k++) {
        int64_t n[1] = {(1 << 20) + 7};
        ws_tensor f;
        CHECK_OK(make(&f, types[k], 1, n, "f"));
        double value = types[k] == WS_I64 ? -3.0 : -2.5; /* integers take integers only */
        CHECK_OK(ws_tensor_fill(&f, value));
        unsigned char want[8];
        ws_store_scalar(want, types[k], value);
        size_t es = ws_dtype_size(types[k]);
        const unsigned char *p = ws_tensor_data(&f);
        int bad = 0;
        for (int64_t i = 0; i < n[0]; i++) bad += memcmp(p + (size_t)i * es, want, es) != 0;
        CHECK(bad == 0);
        ws_tensor_free(&f);
    }
}

/* An integer element that cannot hold a value exactly is an error naming the
 * value and the dtype, and the tensor keeps what it held. */
static void test_integer_values_are_exact(void)
{
    int64_t n[1] = {4};
    ws_tensor i32, u8, i64;
    CHECK_OK(make(&i32, WS_I32, 1, n, "counts"));
    CHECK_OK(make(&u8, WS_U8, 1, n, "mask"));
    CHECK_OK(make(&i64, WS_I64, 1, n, "ids"));
    CHECK_OK(ws_tensor_fill(&i32, 7));
    CHECK_OK(ws_tensor_fill(&u8, 7));
    CHECK_OK(ws_tensor_fill(&i64, 7));
    CHECK_ERR(ws_tensor_set(&i32, 1, 1099511627776.0), WS_ERR_ARG,
              "set: value 1099511627776 is out of range for i32 (-2147483648 to 2147483647) of "
              "tensor 'counts'");
    CHECK_ERR(ws_tensor_set(&u8, 1, -1), WS_ERR_ARG,
              "set: value -1 is out of range for u8 (0 to 255) of tensor 'mask'");
    CHECK_ERR(ws_tensor_set(&u8, 1, 256), WS_ERR_ARG, "value 256 is out of range for u8");
    CHECK_ERR(ws_tensor_set(&i64, 1, 1.5), WS_ERR_ARG,
              "set: value 1.5 is not an integer; tensor 'ids' holds i64");
    CHECK_ERR(ws_tensor_set(&i64, 1, 9223372036854775808.0), WS_ERR_ARG,
              "value 9.2233720368547758e+18 is out of range for i64");
    CHECK_ERR(ws_tensor_set(&i32, 0, 0.0 / 0.0), WS_ERR_ARG, "value nan is not an integer");
    CHECK_ERR(ws_tensor_fill(&i32, 2147483648.0), WS_ERR_ARG,
              "fill: value 2147483648 is out of range for i32");
    CHECK_ERR(ws_tensor_fill(&u8, 0.5), WS_ERR_ARG, "fill: value 0.5 is not an integer");
    double v;
    for (int64_t i = 0; i < 4; i++) {
        CHECK_OK(ws_tensor_get(&i32, i, &v));
        CHECK(v == 7);
        CHECK_OK(ws_tensor_get(&u8, i, &v));
        CHECK(v == 7);
        CHECK_OK(ws_tensor_get(&i64, i, &v));
        CHECK(v == 7);
    }
    /* The ends of each range are fine. */
    CHECK_OK(ws_tensor_set(&i32, 0, -2147483648.0));
    CHECK_OK(ws_tensor_set(&i32, 1, 2147483647.0));
    CHECK_OK(ws_tensor_set(&u8, 0, 255));
    CHECK_OK(ws_tensor_set(&i64, 0, -9223372036854775808.0));
    CHECK_OK(ws_tensor_get(&i32, 1, &v));
    CHECK(v == 2147483647.0);
    CHECK_OK(ws_tensor_get(&u8, 0, &v));
    CHECK(v == 255);
    ws_tensor_free(&i32);
    ws_tensor_free(&u8);
    ws_tensor_free(&i64);
}

static void test_views_keep_base_alive(void)
{
    ws_tensor base, view, flat, as_bf16;
    int64_t shape[2] = {4, 6};
    CHECK_OK(make(&base, WS_F32, 2, shape, "base"));
    CHECK_OK(ws_tensor_random(&base, 42, 1.0f, 0));
    float expect[6];
    memcpy(expect, (float *)ws_tensor_data(&base) + 12, sizeof expect);
    CHECK_OK(ws_tensor_narrow(&view, &base, 0, 2, 1));
    CHECK(view.storage == base.storage && view.storage->refcount == 2);
    CHECK_OK(ws_tensor_flat_bytes(&flat, &base));
    CHECK(flat.dtype == WS_U8 && flat.layout.shape[0] == 96);
    CHECK_OK(ws_tensor_view_dtype(&as_bf16, &base, WS_BF16));
    CHECK(as_bf16.layout.shape[0] == 4 && as_bf16.layout.shape[1] == 12);
    ws_tensor_free(&base);
    ws_tensor_free(&flat);
    ws_tensor_free(&as_bf16);
    /* The view still owns the storage: reading it is valid (ASan checks). */
    CHECK(view.storage->refcount == 1);
    CHECK(memcmp(ws_tensor_data(&view), expect, sizeof expect) == 0);
    uint64_t sum;
    CHECK_OK(ws_tensor_checksum(&view, 12, WS_F32, &sum));
    CHECK_EQ_U64(sum, reference_checksum(expect, 6, 12));
    char buf[64];
    CHECK(strcmp(ws_tensor_label(&view, buf, sizeof buf), "'base'") == 0);
    ws_tensor_free(&view);
}

static void test_view_errors(void)
{
    ws_tensor t, v;
    int64_t shape[2] = {4, 6};
    CHECK_OK(make(&t, WS_F32, 2, shape, "w"));
    CHECK_ERR(ws_tensor_narrow(&v, &t, 2, 0, 1), WS_ERR_ARG, "dimension 2 out of range");
    CHECK_ERR(ws_tensor_narrow(&v, &t, 1, 4, 3), WS_ERR_ARG, "range [4, 7) of dimension 1");
    int64_t bad[2] = {5, 5};
    CHECK_ERR(ws_tensor_reshape(&v, &t, 2, bad), WS_ERR_ARG,
              "cannot view tensor 'w' f32[4,6] (24 elements) as f32[5,5] (25 elements)");
    int64_t infer[3] = {2, -1, 3};
    CHECK_OK(ws_tensor_reshape(&v, &t, 3, infer));
    CHECK(v.layout.shape[1] == 4 && ws_tensor_is_contiguous(&v));
    ws_tensor_free(&v);
    ws_tensor cols;
    CHECK_OK(ws_tensor_narrow(&cols, &t, 1, 1, 2));
    CHECK(!ws_tensor_is_contiguous(&cols));
    int64_t flat[1] = {8};
    CHECK_ERR(ws_tensor_reshape(&v, &cols, 1, flat), WS_ERR_ARG, "'w' f32[4,2] is not contiguous");
    CHECK_ERR(ws_tensor_flat_bytes(&v, &cols), WS_ERR_ARG, "not contiguous");
    int64_t odd[1] = {3};
    ws_tensor u;
    CHECK_OK(make(&u, WS_U8, 1, odd, "odd"));
    CHECK_ERR(ws_tensor_view_dtype(&v, &u, WS_BF16), WS_ERR_ARG, "cannot reinterpret tensor 'odd'");
    ws_tensor_free(&u);
    ws_tensor_free(&cols);
    ws_tensor_free(&t);
}

static void test_copy_shapes_and_strides(void)
{
    ws_tensor a, b, c;
    int64_t s23[2] = {2, 3}, s32[2] = {3, 2};
    CHECK_OK(make(&a, WS_F32, 2, s23, "a"));
    CHECK_OK(make(&b, WS_F32, 2, s32, "b"));
    CHECK_OK(ws_tensor_fill(&b, 1));
    CHECK_ERR(ws_tensor_copy(&a, &b), WS_ERR_ARG,
              "copy_: shape mismatch: dst 'a' is f32[2,3], src 'b' is f32[3,2]");
    /* Strided source with conversion: columns 1..2 of a 4x5 f32 into bf16. */
    int64_t s45[2] = {4, 5}, s42[2] = {4, 2};
    ws_tensor src, cols;
    CHECK_OK(make(&src, WS_F32, 2, s45, "src"));
    for (int i = 0; i < 20; i++) CHECK_OK(ws_tensor_set(&src, i, i + 0.5));
    CHECK_OK(ws_tensor_narrow(&cols, &src, 1, 1, 2));
    CHECK_OK(make(&c, WS_BF16, 2, s42, "c"));
    CHECK_OK(ws_tensor_copy(&c, &cols));
    int bad = 0;
    for (int r = 0; r < 4; r++)
        for (int k = 0; k < 2; k++) {
            double v;
            CHECK_OK(ws_tensor_get(&c, r * 2 + k, &v));
            if (v != ws_bf16_to_f32(ws_f32_to_bf16((float)(r * 5 + 1 + k + 0.5)))) bad++;
        }
    CHECK(bad == 0);
    /* Strided destination: write the bf16 back into the other columns. */
    ws_tensor cols2;
    CHECK_OK(ws_tensor_narrow(&cols2, &src, 1, 3, 2));
    CHECK_OK(ws_tensor_copy(&cols2, &c));
    double v;
    CHECK_OK(ws_tensor_get(&src, 3, &v));
    CHECK(v == 1.5);
    CHECK_OK(ws_tensor_get(&src, 19, &v));
    CHECK(v == 17.5); /* row 3, column 4 <- c[3][1] = src[3][2] = 17.5 */
    CHECK_OK(ws_tensor_get(&src, 0, &v));
    CHECK(v == 0.5); /* untouched */
    ws_tensor_free(&cols2);
    ws_tensor_free(&cols);
    ws_tensor_free(&src);
    ws_tensor_free(&a);
    ws_tensor_free(&b);
    ws_tensor_free(&c);
}

static void test_large_parallel_copy_and_convert(void)
{
    /* 64 MiB: big enough to be split across threads. */
    int64_t n[1] = {16 << 20};
    ws_tensor a, b, h, back;
    CHECK_OK(make(&a, WS_F32, 1, n, "a"));
    CHECK_OK(make(&b, WS_F32, 1, n, "b"));
    CHECK_OK(make(&h, WS_BF16, 1, n, "h"));
    CHECK_OK(make(&back, WS_F32, 1, n, "back"));
    CHECK_OK(ws_tensor_random(&a, 9, 2.0f, 0));
    CHECK_OK(ws_tensor_copy(&b, &a));
    CHECK(memcmp(ws_tensor_data(&a), ws_tensor_data(&b), ws_tensor_nbytes(&a)) == 0);
    CHECK_OK(ws_tensor_copy(&h, &a));
    CHECK_OK(ws_tensor_copy(&back, &h));
    const float *fa = ws_tensor_data(&a), *fb = ws_tensor_data(&back);
    const uint16_t *hb = ws_tensor_data(&h);
    int bad = 0;
    for (int64_t i = 0; i < n[0]; i += 997) {
        if (hb[i] != ws_f32_to_bf16(fa[i])) bad++;
        if (fb[i] != ws_bf16_to_f32(hb[i])) bad++;
    }
    CHECK(bad == 0);
    uint64_t s1, s2;
    CHECK_OK(ws_tensor_checksum(&a, 0, WS_BF16, &s1));
    CHECK_OK(ws_tensor_checksum(&h, 0, WS_BF16, &s2));
    CHECK_EQ_U64(s1, s2); /* `as` hashes converted bits */
    CHECK_OK(ws_tensor_fill(&b, -0.25));
    CHECK(((float *)ws_tensor_data(&b))[n[0] - 1] == -0.25f);
    ws_tensor_free(&a);
    ws_tensor_free(&b);
    ws_tensor_free(&h);
    ws_tensor_free(&back);
}

/* A large 2-D strided copy (split by rows across threads) with conversion. */
static void test_large_strided_copy(void)
{
    int64_t s[2] = {2048, 2048}, h[2] = {2048, 1000};
    ws_tensor m, cols, out;
    CHECK_OK(make(&m, WS_F32, 2, s, "m"));
    CHECK_OK(ws_tensor_random(&m, 8, 1.0f, 0));
    CHECK_OK(ws_tensor_narrow(&cols, &m, 1, 1000, 1000));
    CHECK_OK(make(&out, WS_BF16, 2, h, "out"));
    CHECK_OK(ws_tensor_copy(&out, &cols));
    const float *f = ws_tensor_data(&m);
    const uint16_t *o = ws_tensor_data(&out);
    int bad = 0;
    for (int r = 0; r < 2048; r += 3)
        for (int c = 0; c < 1000; c += 7) bad += o[r * 1000 + c] != ws_f32_to_bf16(f[r * 2048 + 1000 + c]);
    CHECK(bad == 0);
    uint64_t a, b;
    CHECK_OK(ws_tensor_checksum(&cols, 0, WS_BF16, &a));
    CHECK_OK(ws_tensor_checksum(&out, 0, WS_BF16, &b));
    CHECK_EQ_U64(a, b);
    ws_tensor_free(&out);
    ws_tensor_free(&cols);
    ws_tensor_free(&m);
}

static void test_random_determinism(void)
{
    int64_t n[1] = {1000}, k[1] = {400}, r[1] = {600};
    ws_tensor all, lo, hi;
    CHECK_OK(make(&all, WS_F32, 1, n, "all"));
    CHECK_OK(make(&lo, WS_F32, 1, k, "lo"));
    CHECK_OK(make(&hi, WS_F32, 1, r, "hi"));
    CHECK_OK(ws_tensor_random(&all, 5, 0.5f, 0));
    CHECK_OK(ws_tensor_random(&lo, 5, 0.5f, 0));
    CHECK_OK(ws_tensor_random(&hi, 5, 0.5f, 400));
    const float *fa = ws_tensor_data(&all);
    CHECK(memcmp(fa, ws_tensor_data(&lo), 400 * 4) == 0);
    CHECK(memcmp(fa + 400, ws_tensor_data(&hi), 600 * 4) == 0);
    int bad = 0, distinct = 0;
    for (int i = 0; i < 1000; i++) {
        if (!(fa[i] >= -0.5f && fa[i] < 0.5f)) bad++;
        if (fa[i] != ws_random_elem(5, (uint64_t)i, 0.5f)) bad++;
        if (i && fa[i] != fa[i - 1]) distinct++;
    }
    CHECK(bad == 0 && distinct > 990);
    /* Random into a strided view follows the view's logical order. */
    int64_t s[2] = {10, 10};
    ws_tensor m, col;
    CHECK_OK(make(&m, WS_F32, 2, s, "m"));
    CHECK_OK(ws_tensor_fill(&m, 7));
    CHECK_OK(ws_tensor_narrow(&col, &m, 1, 3, 1));
    CHECK_OK(ws_tensor_random(&col, 1, 1.0f, 0));
    double v;
    CHECK_OK(ws_tensor_get(&m, 53, &v));
    CHECK(v == ws_random_elem(1, 5, 1.0f));
    CHECK_OK(ws_tensor_get(&m, 54, &v));
    CHECK(v == 7);
    ws_tensor_free(&col);
    ws_tensor_free(&m);
    ws_tensor_free(&all);
    ws_tensor_free(&lo);
    ws_tensor_free(&hi);
}

static void test_checksum_composes_over_shards(void)
{
    int64_t n[1] = {3001};
    ws_tensor t;
    CHECK_OK(make(&t, WS_F32, 1, n, "w"));
    CHECK_OK(ws_tensor_random(&t, 77, 1.0f, 0));
    uint64_t full;
    CHECK_OK(ws_tensor_checksum(&t, 0, WS_F32, &full));
    CHECK_EQ_U64(full, reference_checksum(ws_tensor_data(&t), 3001, 0));
    /* Uneven shards, summed in a different order. */
    int64_t cuts[4] = {0, 1000, 1001, 3001};
    uint64_t parts[3];
    for (int i = 0; i < 3; i++) {
        ws_tensor s;
        CHECK_OK(ws_tensor_narrow(&s, &t, 0, cuts[i], cuts[i + 1] - cuts[i]));
        CHECK_OK(ws_tensor_checksum(&s, (uint64_t)cuts[i], WS_F32, &parts[i]));
        ws_tensor_free(&s);
    }
    CHECK_EQ_U64(parts[2] + parts[0] + parts[1], full);
    /* A 2-D view of the same data, and a strided view vs its copy. */
    ws_tensor m, col, colc;
    int64_t s2[2] = {3001, 1};
    CHECK_OK(ws_tensor_reshape(&m, &t, 2, s2));
    uint64_t sm;
    CHECK_OK(ws_tensor_checksum(&m, 0, WS_F32, &sm));
    CHECK_EQ_U64(sm, full);
    ws_tensor_free(&m);
    int64_t s3[2] = {1000, 3};
    ws_tensor t3;
    CHECK_OK(ws_tensor_narrow(&m, &t, 0, 0, 3000));
    CHECK_OK(ws_tensor_reshape(&t3, &m, 2, s3));
    CHECK_OK(ws_tensor_narrow(&col, &t3, 1, 2, 1));
    int64_t s4[2] = {1000, 1};
    CHECK_OK(make(&colc, WS_F32, 2, s4, "colc"));
    CHECK_OK(ws_tensor_copy(&colc, &col));
    uint64_t a, b;
    CHECK_OK(ws_tensor_checksum(&col, 0, WS_F32, &a));
    CHECK_OK(ws_tensor_checksum(&colc, 0, WS_F32, &b));
    CHECK_EQ_U64(a, b);
    /* One changed element changes the sum; so does moving a value. */
    CHECK_OK(ws_tensor_set(&t, 1234, 0.125));
    uint64_t changed;
    CHECK_OK(ws_tensor_checksum(&t, 0, WS_F32, &changed));
    CHECK(changed != full);
    uint64_t shifted;
    CHECK_OK(ws_tensor_checksum(&t, 1, WS_F32, &shifted));
    CHECK(shifted != changed);
    ws_tensor_free(&colc);
    ws_tensor_free(&col);
    ws_tensor_free(&t3);
    ws_tensor_free(&m);
    ws_tensor_free(&t);
}

/* Deterministic raw bytes (any bit pattern, NaNs included: the checksum
 * hashes bits, not values). */
static void fill_bytes(void *p, size_t n, uint64_t seed)
{
    unsigned char *b = p;
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        b[i] = (unsigned char)(s >> 24);
    }
}

static uint64_t checksum_of(const ws_tensor *t, uint64_t first, ws_dtype as)
{
    uint64_t s = 0;
    CHECK_OK(ws_tensor_checksum(t, first, as, &s));
    return s;
}

/* The definition, element by element: the vectorized, piecewise and parallel
 * paths must all agree with it. */
static uint64_t reference_of(const ws_tensor *t, uint64_t first)
{
    size_t es = ws_dtype_size(t->dtype);
    const unsigned char *p = ws_tensor_data(t);
    uint64_t s = 0;
    for (int64_t i = 0; i < ws_tensor_numel(t); i++)
        s += ws_hash_elem(first + (uint64_t)i, ws_load_bits(p + (size_t)i * es, t->dtype));
    return s;
}

/* For every dtype: the sum of the definition over a tensor large enough to be
 * split across threads and pieces; uneven shards with their global first
 * index summing to the whole, whichever order the shards come in (as ranks
 * holding different shards would); strided views equal to their copies. */
static void test_checksum_composes_for_every_dtype(void)
{
    const int64_t n = ((int64_t)1 << 21) + 12345;
    const int64_t cuts[] = {0, 1, 65535, 65537, 700001, 1048576, n};
    const int ncuts = (int)(sizeof cuts / sizeof cuts[0]) - 1;
    const uint64_t first = 1000003;
    for (int dt = 0; dt < WS_DTYPE_COUNT; dt++) {
        ws_tensor t;
        CHECK_OK(make(&t, (ws_dtype)dt, 1, &n, "t"));
        fill_bytes(ws_tensor_data(&t), ws_tensor_nbytes(&t), (uint64_t)dt + 1);
        uint64_t full = checksum_of(&t, first, (ws_dtype)dt);
        CHECK_EQ_U64(full, reference_of(&t, first));
        ws_tensor shards[8];
        const ws_tensor *list[8];
        uint64_t firsts[8], sums[8], forward = 0, backward = 0;
        for (int i = 0; i < ncuts; i++) {
            CHECK_OK(ws_tensor_narrow(&shards[i], &t, 0, cuts[i], cuts[i + 1] - cuts[i]));
            list[ncuts - 1 - i] = &shards[i];
            firsts[ncuts - 1 - i] = first + (uint64_t)cuts[i];
            forward += checksum_of(&shards[i], first + (uint64_t)cuts[i], (ws_dtype)dt);
        }
        /* The shards in the opposite order, as one batch. */
        CHECK_OK(ws_checksum_many(list, (size_t)ncuts, firsts, WS_DTYPE_COUNT, sums));
        for (int i = 0; i < ncuts; i++) backward += sums[i];
        CHECK_EQ_U64(forward, full);
        CHECK_EQ_U64(backward, full);
        /* Shards hashed from index 0 are not the whole. */
        CHECK(checksum_of(&shards[3], 0, (ws_dtype)dt) !=
              checksum_of(&shards[3], first + (uint64_t)cuts[3], (ws_dtype)dt));
        for (int i = 0; i < ncuts; i++) ws_tensor_free(&shards[i]);

        /* Strided views (a column, and every other column of a block) hash as
         * their contiguous copies, with the copy's logical order. */
        int64_t s2[2] = {n / 7, 7}, s1[1] = {n / 7 * 7};
        ws_tensor head, m, col, cols, cc, csc;
        CHECK_OK(ws_tensor_narrow(&head, &t, 0, 0, s1[0]));
        CHECK_OK(ws_tensor_reshape(&m, &head, 2, s2));
        CHECK_OK(ws_tensor_narrow(&col, &m, 1, 3, 1));
        CHECK_OK(ws_tensor_narrow(&cols, &m, 1, 2, 4));
        int64_t c1[2] = {s2[0], 1}, c4[2] = {s2[0], 4};
        CHECK_OK(make(&cc, (ws_dtype)dt, 2, c1, "cc"));
        CHECK_OK(make(&csc, (ws_dtype)dt, 2, c4, "csc"));
        CHECK_OK(ws_tensor_copy(&cc, &col));
        CHECK_OK(ws_tensor_copy(&csc, &cols));
        CHECK_EQ_U64(checksum_of(&col, 17, (ws_dtype)dt), checksum_of(&cc, 17, (ws_dtype)dt));
        CHECK_EQ_U64(checksum_of(&cols, 5, (ws_dtype)dt), checksum_of(&csc, 5, (ws_dtype)dt));
        CHECK_EQ_U64(checksum_of(&cc, 17, (ws_dtype)dt), reference_of(&cc, 17));
        /* Rows longer than one work unit, split across threads mid-row. */
        int64_t w16[2] = {16, n / 16}, b16[2] = {16, 70000};
        ws_tensor head16, m16, block, bc;
        CHECK_OK(ws_tensor_narrow(&head16, &t, 0, 0, 16 * (n / 16)));
        CHECK_OK(ws_tensor_reshape(&m16, &head16, 2, w16));
        CHECK_OK(ws_tensor_narrow(&block, &m16, 1, 1, b16[1]));
        CHECK_OK(make(&bc, (ws_dtype)dt, 2, b16, "bc"));
        CHECK_OK(ws_tensor_copy(&bc, &block));
        CHECK_EQ_U64(checksum_of(&block, 3, (ws_dtype)dt), checksum_of(&bc, 3, (ws_dtype)dt));
        CHECK_EQ_U64(checksum_of(&bc, 3, (ws_dtype)dt), reference_of(&bc, 3));
        ws_tensor_free(&bc);
        ws_tensor_free(&block);
        ws_tensor_free(&m16);
        ws_tensor_free(&head16);
        ws_tensor_free(&csc);
        ws_tensor_free(&cc);
        ws_tensor_free(&cols);
        ws_tensor_free(&col);
        ws_tensor_free(&m);
        ws_tensor_free(&head);
        ws_tensor_free(&t);
    }
}

/* Hashing `as` another dtype hashes the bits of the converted values: the
 * same sum as converting first, contiguous or strided, for every pair. */
static void test_checksum_as_converted(void)
{
    int64_t n = 100003, s2[2] = {n / 3, 3}, c1[2] = {n / 3, 1}, head_n = n / 3 * 3;
    ws_tensor f;
    CHECK_OK(make(&f, WS_F32, 1, &n, "f"));
    CHECK_OK(ws_tensor_random(&f, 21, 300.0f, 0));
    for (int st = 0; st < WS_DTYPE_COUNT; st++) {
        ws_tensor src;
        CHECK_OK(make(&src, (ws_dtype)st, 1, &n, "src"));
        CHECK_OK(ws_tensor_copy(&src, &f));
        for (int as = 0; as < WS_DTYPE_COUNT; as++) {
            ws_tensor conv;
            CHECK_OK(make(&conv, (ws_dtype)as, 1, &n, "conv"));
            CHECK_OK(ws_tensor_copy(&conv, &src));
            CHECK_EQ_U64(checksum_of(&src, 9, (ws_dtype)as), checksum_of(&conv, 9, (ws_dtype)as));
            ws_tensor head, m, col, cc;
            CHECK_OK(ws_tensor_narrow(&head, &src, 0, 0, head_n));
            CHECK_OK(ws_tensor_reshape(&m, &head, 2, s2));
            CHECK_OK(ws_tensor_narrow(&col, &m, 1, 1, 1));
            CHECK_OK(make(&cc, (ws_dtype)as, 2, c1, "cc"));
            CHECK_OK(ws_tensor_copy(&cc, &col));
            CHECK_EQ_U64(checksum_of(&col, 4, (ws_dtype)as), checksum_of(&cc, 4, (ws_dtype)as));
            ws_tensor_free(&cc);
            ws_tensor_free(&col);
            ws_tensor_free(&m);
            ws_tensor_free(&head);
            ws_tensor_free(&conv);
        }
        ws_tensor_free(&src);
    }
    ws_tensor_free(&f);
}

/* Flipping any one bit of any element changes the checksum (the per-element
 * hash is a bijection of the bits at each index), and so does swapping two
 * different values (each index has its own key). */
static void test_checksum_detects_flips_and_swaps(void)
{
    int64_t n = 67;
    for (int dt = 0; dt < WS_DTYPE_COUNT; dt++) {
        ws_tensor t;
        CHECK_OK(make(&t, (ws_dtype)dt, 1, &n, "t"));
        unsigned char *p = ws_tensor_data(&t);
        size_t es = ws_dtype_size((ws_dtype)dt);
        fill_bytes(p, ws_tensor_nbytes(&t), 40 + (uint64_t)dt);
        uint64_t base = checksum_of(&t, 5, (ws_dtype)dt);
        int missed = 0, swaps = 0;
        for (int64_t i = 0; i < n; i++)
            for (size_t bit = 0; bit < 8 * es; bit++) {
                p[(size_t)i * es + bit / 8] ^= (unsigned char)(1u << (bit % 8));
                missed += checksum_of(&t, 5, (ws_dtype)dt) == base;
                p[(size_t)i * es + bit / 8] ^= (unsigned char)(1u << (bit % 8));
            }
        unsigned char tmp[8];
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = i + 1; j < n; j++) {
                unsigned char *a = p + (size_t)i * es, *b = p + (size_t)j * es;
                if (memcmp(a, b, es) == 0) continue;
                memcpy(tmp, a, es);
                memcpy(a, b, es);
                memcpy(b, tmp, es);
                missed += checksum_of(&t, 5, (ws_dtype)dt) == base;
                swaps++;
                memcpy(b, a, es);
                memcpy(a, tmp, es);
            }
        CHECK(missed == 0);
        CHECK(swaps > n * (n - 1) / 4);
        CHECK_EQ_U64(checksum_of(&t, 5, (ws_dtype)dt), base);
        ws_tensor_free(&t);
    }
}

static void test_freed_tensor_errors_name_it(void)
{
    ws_tensor a, b;
    int64_t n[1] = {4};
    CHECK_OK(make(&a, WS_F32, 1, n, "a"));
    CHECK_OK(make(&b, WS_F32, 1, n, "b"));
    ws_tensor_release(&b);
    CHECK(ws_tensor_is_released(&b));
    CHECK_ERR(ws_tensor_copy(&a, &b), WS_ERR_FREED, "copy_ src: tensor 'b' was freed");
    CHECK_ERR(ws_tensor_fill(&b, 1), WS_ERR_FREED, "fill: tensor 'b' was freed");
    uint64_t s;
    CHECK_ERR(ws_tensor_checksum(&b, 0, WS_F32, &s), WS_ERR_FREED, "tensor 'b' was freed");
    ws_tensor v;
    CHECK_ERR(ws_tensor_narrow(&v, &b, 0, 0, 1), WS_ERR_FREED, "'b' was freed");
    ws_tensor_free(&b); /* frees the kept name */
    CHECK(b.name == NULL);
    CHECK_ERR(ws_tensor_fill(&b, 1), WS_ERR_FREED, "tensor <unnamed> was freed");
    ws_tensor_free(&a);
}

static void test_events_measure_time(void)
{
    ws_device *cpu = ws_device_cpu();
    ws_event *e0, *e1;
    CHECK_OK(cpu->ops->event_create(cpu, &e0));
    CHECK_OK(cpu->ops->event_create(cpu, &e1));
    CHECK_OK(cpu->ops->event_record(cpu, e0));
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
    CHECK_OK(cpu->ops->event_record(cpu, e1));
    double ms = 0;
    CHECK_OK(cpu->ops->event_elapsed_ms(cpu, e0, e1, &ms));
    CHECK(ms >= 19.0 && ms < 2000.0);
    cpu->ops->event_destroy(cpu, e0);
    cpu->ops->event_destroy(cpu, e1);
}

/* A forked child (os.execute, popen) starts its own workers instead of
 * waiting forever on threads that only exist in the parent. */
static void test_parallel_after_fork(void)
{
    int64_t n[1] = {4 << 20};
    ws_tensor a, b;
    CHECK_OK(make(&a, WS_F32, 1, n, "a"));
    CHECK_OK(make(&b, WS_F32, 1, n, "b"));
    CHECK_OK(ws_tensor_random(&a, 4, 1.0f, 0)); /* workers now running */
    pid_t pid = fork();
    if (pid == 0) {
        alarm(20); /* a hang becomes SIGALRM, which the parent sees */
        int ok = ws_tensor_copy(&b, &a) == WS_OK &&
                 memcmp(ws_tensor_data(&a), ws_tensor_data(&b), ws_tensor_nbytes(&a)) == 0;
        _exit(ok ? 0 : 1);
    }
    CHECK(pid > 0);
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ws_tensor_free(&a);
    ws_tensor_free(&b);
}

/* Shapes whose element count does not fit are refused, even when a 0-sized
 * dimension makes the byte count 0: their strides and numel would overflow. */
static void test_shape_overflow_is_refused(void)
{
    ws_tensor t, v;
    int64_t big0[3] = {0, INT64_C(1) << 62, INT64_C(1) << 62};
    CHECK_ERR(make(&t, WS_F32, 3, big0, "big0"), WS_ERR_NOMEM, "too large to address");
    CHECK(ws_tensor_is_released(&t));
    int64_t big1[3] = {INT64_C(1) << 40, INT64_C(1) << 40, 0};
    CHECK_ERR(make(&t, WS_F32, 3, big1, "big1"), WS_ERR_NOMEM, "too large to address");
    int64_t n16[1] = {16};
    CHECK_OK(make(&t, WS_F32, 1, n16, "x"));
    /* (2^60 + 1) * 16 wraps to 16 in 64 bits: must not pass as 16 elements. */
    int64_t wrap[2] = {(INT64_C(1) << 60) + 1, 16};
    memset(&v, 0, sizeof v);
    CHECK_ERR(ws_tensor_reshape(&v, &t, 2, wrap), WS_ERR_ARG, "reshape");
    CHECK(ws_tensor_is_released(&v));
    int64_t wrap_infer[3] = {-1, INT64_C(1) << 62, INT64_C(1) << 62};
    CHECK_ERR(ws_tensor_reshape(&v, &t, 3, wrap_infer), WS_ERR_ARG, "reshape");
    CHECK(ws_tensor_is_released(&v));
    ws_tensor_free(&t);
    int64_t empty[2] = {0, 4};
    CHECK_OK(make(&t, WS_F32, 2, empty, "e"));
    int64_t huge_empty[3] = {INT64_C(1) << 40, INT64_C(1) << 40, 0};
    CHECK_ERR(ws_tensor_reshape(&v, &t, 3, huge_empty), WS_ERR_ARG, "reshape");
    CHECK(ws_tensor_is_released(&v));
    int64_t ok_empty[3] = {2, 0, 3};
    CHECK_OK(ws_tensor_reshape(&v, &t, 3, ok_empty));
    CHECK(ws_tensor_numel(&v) == 0);
    ws_tensor_free(&v);
    ws_tensor_free(&t);
}

/* copy_ between overlapping views of one storage behaves as if the source
 * were read completely before anything is written (as memmove does). */
static void check_overlap(int64_t n)
{
    int64_t shape[1] = {n};
    ws_tensor x, a, b;
    CHECK_OK(make(&x, WS_F32, 1, shape, "x"));
    float *v = ws_tensor_data(&x);
    for (int64_t i = 0; i < n; i++) v[i] = (float)i;
    CHECK_OK(ws_tensor_narrow(&a, &x, 0, 0, n - 3));
    CHECK_OK(ws_tensor_narrow(&b, &x, 0, 3, n - 3));
    CHECK_OK(ws_tensor_copy(&b, &a)); /* shift up by 3 */
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad += v[i] != (float)(i < 3 ? i : i - 3);
    CHECK(bad == 0);
    for (int64_t i = 0; i < n; i++) v[i] = (float)i;
    CHECK_OK(ws_tensor_copy(&a, &b)); /* shift down by 3 */
    bad = 0;
    for (int64_t i = 0; i < n; i++) bad += v[i] != (float)(i < n - 3 ? i + 3 : i);
    CHECK(bad == 0);
    /* Strided overlap: every other element, shifted by one pair. */
    int64_t pairs[2] = {n / 2, 2};
    ws_tensor m, c0, c1, lo, hi;
    CHECK_OK(ws_tensor_reshape(&m, &x, 2, pairs));
    CHECK_OK(ws_tensor_narrow(&c0, &m, 1, 0, 1));
    CHECK_OK(ws_tensor_narrow(&lo, &c0, 0, 0, n / 2 - 1));
    CHECK_OK(ws_tensor_narrow(&c1, &m, 1, 0, 1));
    CHECK_OK(ws_tensor_narrow(&hi, &c1, 0, 1, n / 2 - 1));
    for (int64_t i = 0; i < n; i++) v[i] = (float)i;
    CHECK_OK(ws_tensor_copy(&hi, &lo)); /* x[2k+2] <- x[2k] */
    bad = 0;
    for (int64_t k = 0; k < n / 2; k++) bad += v[2 * k] != (float)(k == 0 ? 0 : 2 * k - 2);
    CHECK(bad == 0);
    ws_tensor_free(&lo);
    ws_tensor_free(&hi);
    ws_tensor_free(&c0);
    ws_tensor_free(&c1);
    ws_tensor_free(&m);
    ws_tensor_free(&a);
    ws_tensor_free(&b);
    ws_tensor_free(&x);
}

static void test_overlapping_copy(void)
{
    check_overlap(64);
    check_overlap(INT64_C(3) << 20); /* large enough for the parallel paths */
}

/* Several forked children each run parallel jobs right away: the first job in
 * a child must not be joined early by a worker replaying the parent's job. */
static void test_parallel_after_fork_repeated(void)
{
    int64_t n[1] = {2 << 20};
    ws_tensor a;
    CHECK_OK(make(&a, WS_F32, 1, n, "a"));
    CHECK_OK(ws_tensor_random(&a, 9, 1.0f, 0));
    uint64_t want;
    CHECK_OK(ws_tensor_checksum(&a, 0, WS_F32, &want));
    for (int k = 0; k < 8; k++) {
        pid_t pid = fork();
        if (pid == 0) {
            alarm(20);
            int ok = 1;
            for (int j = 0; j < 4 && ok; j++) {
                ws_tensor b;
                uint64_t got = 0;
                ok = make(&b, WS_F32, 1, n, "b") == WS_OK && ws_tensor_copy(&b, &a) == WS_OK &&
                     ws_tensor_checksum(&b, 0, WS_F32, &got) == WS_OK && got == want;
                ws_tensor_free(&b);
            }
            _exit(ok ? 0 : 1);
        }
        CHECK(pid > 0);
        int status = 0;
        CHECK(waitpid(pid, &status, 0) == pid);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    ws_tensor_free(&a);
}

int main(void)
{
    RUN(test_registry);
    RUN(test_layout_helpers);
    RUN(test_parallel_for_covers_once);
    RUN(test_alloc_accounting_and_oom);
    RUN(test_empty_tensors);
    RUN(test_labels_and_names);
    RUN(test_fill_get_set);
    RUN(test_integer_values_are_exact);
    RUN(test_views_keep_base_alive);
    RUN(test_view_errors);
    RUN(test_copy_shapes_and_strides);
    RUN(test_large_parallel_copy_and_convert);
    RUN(test_large_strided_copy);
    RUN(test_random_determinism);
    RUN(test_checksum_composes_over_shards);
    RUN(test_checksum_composes_for_every_dtype);
    RUN(test_checksum_as_converted);
    RUN(test_checksum_detects_flips_and_swaps);
    RUN(test_freed_tensor_errors_name_it);
    RUN(test_events_measure_time);
    RUN(test_parallel_after_fork);
    RUN(test_shape_overflow_is_refused);
    RUN(test_overlapping_copy);
    RUN(test_parallel_after_fork_repeated);
    return check_summary();
}
