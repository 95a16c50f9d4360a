/* test_safetensors.c: the safetensors reader, indexes and checkpoints.
 *
 * File images are built in memory (and a few written to a temporary
 * directory): one malformed image per validation rule, each expected to fail
 * with WS_ERR_FORMAT and a message naming the file and the tensor, then the
 * happy paths (values, zero copy, read-only, tensors outliving their file),
 * indexes and sharded checkpoints, and a mutation loop that must never crash. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "checkpoint.h"
#include "safetensors.h"
#include "tensor.h"

/* An image: 8-byte length, header, then `data` bytes of the pattern i*7+1. */
static unsigned char *image(const char *header, size_t data, size_t *size)
{
    size_t h = strlen(header);
    *size = 8 + h + data;
    unsigned char *p = malloc(*size ? *size : 1);
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(p + 8, header, h);
    for (size_t i = 0; i < data; i++) p[8 + h + i] = (unsigned char)(i * 7 + 1);
    return p;
}

/* The header fails to parse with WS_ERR_FORMAT, a message naming the file
 * label and containing both needles (NULL: not checked). */
static void expect_bad_at(int line, const char *header, size_t data, const char *n1,
                          const char *n2)
{
    size_t size;
    unsigned char *p = image(header, data, &size);
    ws_st_file *f = (ws_st_file *)1;
    ws_status rc = ws_st_parse(p, size, "bad.safetensors", &f);
    const char *msg = ws_errmsg();
    if (rc != WS_ERR_FORMAT || f != NULL || !strstr(msg, "'bad.safetensors'") ||
        (n1 && !strstr(msg, n1)) || (n2 && !strstr(msg, n2))) {
        fprintf(stderr, "line %d: header %s: expected FORMAT with [%s] [%s], got %s: %s\n", line,
                header, n1 ? n1 : "", n2 ? n2 : "", ws_status_name(rc), msg);
        check_case_failed_ = 1;
    }
    if (rc == WS_OK) ws_st_unref(f);
    free(p);
}
#define expect_bad(h, d, n1, n2) expect_bad_at(__LINE__, (h), (d), (n1), (n2))

static ws_st_file *parse_ok(const char *header, size_t data, unsigned char **img)
{
    size_t size;
    *img = image(header, data, &size);
    ws_st_file *f = NULL;
    CHECK_OK(ws_st_parse(*img, size, "ok.safetensors", &f));
    return f;
}

static void test_file_level_rules(void)
{
    unsigned char raw[16] = {0};
    ws_st_file *f = NULL;
    CHECK_ERR(ws_st_parse(raw, 0, "tiny.safetensors", &f), WS_ERR_FORMAT,
              "safetensors 'tiny.safetensors': the file is 0 bytes, shorter than the 8-byte");
    CHECK_ERR(ws_st_parse(raw, 7, "tiny.safetensors", &f), WS_ERR_FORMAT, "7 bytes, shorter");
    CHECK(f == NULL);
    /* Header length past the end of the file. */
    raw[0] = 9;
    CHECK_ERR(ws_st_parse(raw, 16, "cut.safetensors", &f), WS_ERR_FORMAT,
              "header length 9 goes past the end of the file (16 bytes)");
    /* Above the 100 MB bound, even before comparing with the file size. */
    uint64_t big = 200000000;
    for (int i = 0; i < 8; i++) raw[i] = (unsigned char)(big >> (8 * i));
    CHECK_ERR(ws_st_parse(raw, 16, "big.safetensors", &f), WS_ERR_FORMAT,
              "header length 200000000 is above the limit of 100000000 bytes");
    memset(raw, 0xff, 8);
    CHECK_ERR(ws_st_parse(raw, 16, "big.safetensors", &f), WS_ERR_FORMAT, "above the limit");
    CHECK(f == NULL);

    expect_bad("", 0, "not valid JSON", NULL);
    expect_bad("{\"w\": {\"dtype\": \"F32\"", 0, "not valid JSON", NULL);
    expect_bad("{\"a\": 1,}", 0, "not valid JSON", NULL);
    expect_bad("{} x", 0, "bytes after its JSON value", NULL);
    expect_bad("[1, 2]", 0, "must be a JSON object, got a list", NULL);
    expect_bad("\"str\"", 0, "must be a JSON object, got a string", NULL);
    expect_bad("null", 0, "must be a JSON object, got null", NULL);
}

static void test_entry_rules(void)
{
    expect_bad("{\"w\": 3}", 0, "tensor 'w': the entry must be an object", "got a number");
    expect_bad("{\"w\": [1]}", 0, "tensor 'w': the entry must be an object", NULL);
    expect_bad("{\"w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "tensor 'w'",
               "lacks \"dtype\"");
    expect_bad("{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, "tensor 'w'",
               "lacks \"shape\"");
    expect_bad("{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "tensor 'w'",
               "lacks \"data_offsets\"");
    expect_bad("{\"w\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
               "tensor 'w'", "\"dtype\" must be a string");
    /* Unsupported dtypes name the dtype and list the supported ones. */
    const char *unsupported[] = {"F64", "F8_E5M2", "BOOL", "I8", "I16", "U64", "f32", ""};
    for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++) {
        char h[200], want[64];
        snprintf(h, sizeof h, "{\"w\": {\"dtype\": \"%s\", \"shape\": [1], \"data_offsets\": "
                 "[0, 8]}}", unsupported[i]);
        snprintf(want, sizeof want, "tensor 'w': dtype '%s' is not supported", unsupported[i]);
        expect_bad(h, 8, want, "F32, BF16, F16, F8_E4M3, U8, I32, I64");
    }
    expect_bad("{\"w\": {\"dtype\": \"F32\", \"shape\": 3, \"data_offsets\": [0, 12]}}", 12,
               "tensor 'w'", "\"shape\" must be a list");
    const char *bad_dims[] = {"2.5", "-1", "\"2\"", "null", "true", "1e16", "9007199254740994",
                              "[2]"};
    for (size_t i = 0; i < sizeof bad_dims / sizeof *bad_dims; i++) {
        char h[200];
        snprintf(h, sizeof h, "{\"w\": {\"dtype\": \"U8\", \"shape\": [1, %s], "
                 "\"data_offsets\": [0, 2]}}", bad_dims[i]);
        expect_bad(h, 2, "tensor 'w'", "shape[1] must be a non-negative integer");
    }
    expect_bad("{\"w\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], "
               "\"data_offsets\": [0, 1]}}", 1, "tensor 'w'",
               "shape has 9 dimensions; at most 8");
    expect_bad("{\"w\": {\"dtype\": \"F32\", \"shape\": [9007199254740992, 9007199254740992], "
               "\"data_offsets\": [0, 0]}}", 0, "tensor 'w'", "too large");
    /* Even with a 0 dimension the strides must stay addressable. */
    expect_bad("{\"w\": {\"dtype\": \"F32\", \"shape\": [0, 9007199254740992, 4096], "
               "\"data_offsets\": [0, 0]}}", 0, "tensor 'w'", "too large");
    const char *bad_offsets[] = {"3", "[0]", "[0, 4, 8]", "[-1, 3]", "[0.5, 4]", "[\"0\", 4]",
                                 "[0, null]", "{}", "[]"};
    for (size_t i = 0; i < sizeof bad_offsets / sizeof *bad_offsets; i++) {
        char h[200];
        snprintf(h, sizeof h, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": "
                 "%s}}", bad_offsets[i]);
        expect_bad(h, 8, "tensor 'w'", "\"data_offsets\" must be two non-negative integers");
    }
    expect_bad("{\"w\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 0]}}", 8,
               "tensor 'w'", "data_offsets [4, 0] end before they begin");
    expect_bad("{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 7,
               "tensor 'w'", "data_offsets [0, 8] reach past the data region (7 bytes)");
    expect_bad("{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 8,
               "tensor 'w'", "data_offsets [0, 4] span 4 bytes, but f32[2] needs 8");
    expect_bad("{\"w\": {\"dtype\": \"BF16\", \"shape\": [2, 3], \"data_offsets\": [0, 24]}}",
               24, "tensor 'w'", "span 24 bytes, but bf16[2,3] needs 12");
    /* Overlaps, whatever their order in the header; the message names both. */
    expect_bad("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
               " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}", 12,
               "tensor 'b': its bytes [4, 12) overlap those of tensor 'a' [0, 8)", NULL);
    expect_bad("{\"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]},"
               " \"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16,
               "overlap", "'a'");
    expect_bad("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
               " \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
               "tensor 'b'", "overlap those of tensor 'a'");
    expect_bad("{\"__metadata__\": [], \"w\": {\"dtype\": \"U8\", \"shape\": [1], "
               "\"data_offsets\": [0, 1]}}", 1, "\"__metadata__\" must be an object", NULL);
    expect_bad("{\"__metadata__\": {\"format\": \"pt\", \"n\": 3}}", 0,
               "\"__metadata__\" must map strings to strings; 'n' is a number", NULL);
    expect_bad("{\"__metadata__\": {}, \"__metadata__\": {}}", 0, "\"__metadata__\" appears twice",
               NULL);
    expect_bad("{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},"
               " \"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [1, 2]}}", 2,
               "tensor 'w': the name appears twice", NULL);
}

static void test_valid_layouts(void)
{
    unsigned char *img;
    /* Empty header, empty data region. */
    ws_st_file *f = parse_ok("{}", 0, &img);
    if (f) {
        CHECK(ws_st_count(f) == 0);
        CHECK(ws_st_find(f, "x") == NULL);
        ws_st_unref(f);
    }
    free(img);
    /* Space padding after the JSON, gaps between tensors, zero-size tensors
     * (anywhere, even inside another's bytes), metadata. */
    f = parse_ok("{\"__metadata__\": {\"format\": \"pt\", \"by\": \"test\"},"
                 " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [16, 24]},"
                 " \"a\": {\"dtype\": \"U8\", \"shape\": [3], \"data_offsets\": [0, 3]},"
                 " \"z\": {\"dtype\": \"BF16\", \"shape\": [4, 0], \"data_offsets\": [1, 1]},"
                 " \"s\": {\"dtype\": \"I64\", \"shape\": [], \"data_offsets\": [24, 32]}}    ",
                 40, &img);
    if (f) {
        CHECK(ws_st_count(f) == 4);
        CHECK(strcmp(ws_st_entry_at(f, 0)->name, "b") == 0); /* header order */
        CHECK(strcmp(ws_st_entry_at(f, 3)->name, "s") == 0);
        CHECK(ws_st_entry_at(f, 4) == NULL);
        const ws_st_entry *z = ws_st_find(f, "z");
        CHECK(z && z->dtype == WS_BF16 && z->ndim == 2 && z->shape[1] == 0);
        const ws_st_entry *s = ws_st_find(f, "s");
        CHECK(s && s->ndim == 0 && s->begin == 24 && s->end == 32);
        CHECK(ws_st_metadata_count(f) == 2);
        CHECK(strcmp(ws_st_metadata_key(f, 0), "format") == 0);
        CHECK(strcmp(ws_st_metadata_value(f, 1), "test") == 0);
        CHECK(strcmp(ws_st_label(f), "ok.safetensors") == 0);
        ws_tensor t;
        CHECK_OK(ws_st_tensor(f, z, &t));
        CHECK(ws_tensor_numel(&t) == 0);
        ws_tensor_free(&t);
        CHECK_OK(ws_st_tensor(f, ws_st_find(f, "a"), &t));
        double v;
        CHECK_OK(ws_tensor_get(&t, 2, &v));
        CHECK(v == 15.0); /* byte 2 of the pattern i*7+1 */
        ws_tensor_free(&t);
        ws_st_unref(f);
    }
    free(img);
    /* Every supported dtype, by its safetensors name. */
    const char *names[] = {"F32", "BF16", "F16", "F8_E4M3", "U8", "I32", "I64"};
    ws_dtype want[] = {WS_F32, WS_BF16, WS_F16, WS_FP8E4M3, WS_U8, WS_I32, WS_I64};
    for (int i = 0; i < 7; i++) {
        char h[200];
        size_t es = ws_dtype_size(want[i]);
        snprintf(h, sizeof h, "{\"t\": {\"dtype\": \"%s\", \"shape\": [3], \"data_offsets\": "
                 "[0, %zu]}}", names[i], 3 * es);
        f = parse_ok(h, 3 * es, &img);
        CHECK(f && ws_st_find(f, "t")->dtype == want[i]);
        CHECK(strcmp(ws_st_dtype_name(want[i]), names[i]) == 0);
        ws_st_unref(f);
        free(img);
    }
}

static void test_values_zero_copy_read_only(void)
{
    /* f32 [1.5, -2] then bf16 [3.0] (0x4040), written by hand. */
    const char *h = "{\"x\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                    " \"y\": {\"dtype\": \"BF16\", \"shape\": [1, 1], \"data_offsets\": [8, 10]}}";
    size_t size;
    unsigned char *img = image(h, 10, &size);
    unsigned char *data = img + 8 + strlen(h);
    float fx[2] = {1.5f, -2.0f};
    memcpy(data, fx, 8);
    data[8] = 0x40, data[9] = 0x40;
    ws_st_file *f = NULL;
    CHECK_OK(ws_st_parse(img, size, "vals.safetensors", &f));
    if (!f) {
        free(img);
        return;
    }
    size_t dsize;
    CHECK(ws_st_data(f, &dsize) == data && dsize == 10);
    ws_tensor x, y, mine;
    CHECK_OK(ws_st_tensor(f, ws_st_find(f, "x"), &x));
    CHECK_OK(ws_st_tensor(f, ws_st_find(f, "y"), &y));
    ws_st_unref(f); /* the tensors keep the file */
    double v;
    CHECK_OK(ws_tensor_get(&x, 0, &v));
    CHECK(v == 1.5);
    CHECK_OK(ws_tensor_get(&x, 1, &v));
    CHECK(v == -2.0);
    CHECK_OK(ws_tensor_get(&y, 0, &v));
    CHECK(v == 3.0);
    CHECK(strcmp(x.name, "x") == 0 && ws_tensor_is_read_only(&x));
    void *p;
    CHECK_OK(ws_tensor_access(&y, WS_ACCESS_READ, "test", &p));
    CHECK(p == data + 8); /* zero copy */
    /* Every write path refuses, naming the tensor and the file. */
    const char *ro = "tensor 'x' is read-only (mapped from 'vals.safetensors'); copy it into a "
                     "tensor of its own to change it";
    CHECK_ERR(ws_tensor_access(&x, WS_ACCESS_WRITE, "test", &p), WS_ERR_ARG, ro);
    CHECK(p == NULL);
    CHECK_ERR(ws_tensor_access(&x, WS_ACCESS_READ | WS_ACCESS_WRITE, "t", &p), WS_ERR_ARG, ro);
    CHECK_ERR(ws_tensor_fill(&x, 0.0), WS_ERR_ARG, ro);
    CHECK_ERR(ws_tensor_set(&x, 0, 1.0), WS_ERR_ARG, ro);
    CHECK_ERR(ws_tensor_random(&x, 1, 1.0f, 0), WS_ERR_ARG, ro);
    int64_t shape[1] = {2};
    CHECK_OK(ws_tensor_empty(&mine, WS_F32, 1, shape, NULL));
    CHECK_ERR(ws_tensor_copy(&x, &mine), WS_ERR_ARG, ro);
    ws_tensor *dsts[1] = {&x};
    const ws_tensor *srcs[1] = {&mine};
    CHECK_ERR(ws_copy_many(dsts, srcs, 1), WS_ERR_ARG, ro);
    const ws_tensor *psrcs[1] = {&mine};
    CHECK_ERR(ws_pack(&x, psrcs, 1, NULL), WS_ERR_ARG, ro);
    ws_tensor view;
    CHECK_OK(ws_tensor_narrow(&view, &x, 0, 1, 1));
    CHECK_ERR(ws_tensor_fill(&view, 0.0), WS_ERR_ARG, "is read-only (mapped from");
    ws_tensor_free(&view);
    /* Copying out is how to change it. */
    CHECK_OK(ws_tensor_copy(&mine, &x));
    CHECK_OK(ws_tensor_set(&mine, 0, 7.0));
    CHECK_OK(ws_tensor_get(&x, 0, &v));
    CHECK(v == 1.5);
    CHECK(memcmp(data, fx, 8) == 0);
    ws_tensor_free(&mine);
    ws_tensor_free(&x);
    ws_tensor_free(&y);
    free(img);
}

static int released;
static void count_release(void *ctx) { released += *(int *)ctx; }

static void test_external_storage(void)
{
    /* Writable external memory: written in place; the release callback runs
     * once, when the last view goes. */
    float buf[4] = {0};
    int one = 1;
    released = 0;
    ws_external mem = {.data = buf, .nbytes = sizeof buf, .source = "buffer",
                       .release = count_release, .release_ctx = &one};
    int64_t shape[2] = {2, 2};
    ws_tensor t, v;
    CHECK_OK(ws_tensor_external(&t, &mem, WS_F32, 2, shape, "ext"));
    CHECK(!ws_tensor_is_read_only(&t));
    CHECK_OK(ws_tensor_fill(&t, 2.5));
    CHECK(buf[3] == 2.5f);
    CHECK_OK(ws_tensor_narrow(&v, &t, 0, 1, 1));
    ws_tensor_free(&t);
    CHECK(released == 0);
    ws_tensor_free(&v);
    CHECK(released == 1);
    /* Too small: refused, and the callback is not called (the caller keeps it). */
    int64_t big[1] = {5};
    CHECK_ERR(ws_tensor_external(&t, &mem, WS_F32, 1, big, "ext"), WS_ERR_ARG,
              "creating tensor 'ext' f32[5] over external memory: it needs 20 bytes, the memory "
              "from 'buffer' holds 16 B");
    CHECK(ws_tensor_is_released(&t) && released == 1);
}

/* A header of n tensors named "model.layers.<i>.weight", 2 bytes each. */
static char *many_header(size_t n)
{
    size_t cap = 128 * n + 16, k = 0;
    char *h = malloc(cap);
    k += (size_t)snprintf(h + k, cap - k, "{");
    for (size_t i = 0; i < n; i++)
        k += (size_t)snprintf(h + k, cap - k, "%s\"model.layers.%zu.weight\": {\"dtype\": "
                              "\"BF16\", \"shape\": [1], \"data_offsets\": [%zu, %zu]}",
                              i ? ", " : "", i, 2 * i, 2 * i + 2);
    snprintf(h + k, cap - k, "}");
    return h;
}

static void test_many_tensors_lookup(void)
{
    const size_t n = 37000;
    char *h = many_header(n);
    unsigned char *img;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    ws_st_file *f = parse_ok(h, 2 * n, &img);
    int found = 0;
    char name[64];
    for (size_t round = 0; f && round < 10; round++) {
        for (size_t i = 0; i < n; i++) {
            snprintf(name, sizeof name, "model.layers.%zu.weight", i);
            const ws_st_entry *e = ws_st_find(f, name);
            found += e && e->begin == 2 * i;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    CHECK(found == (int)(10 * n));
    CHECK(f && ws_st_find(f, "model.layers.37000.weight") == NULL);
    /* A linear search would take seconds; hashed, it is a few ms even
     * under sanitizers. */
    CHECK(ms < 5000);
    ws_st_unref(f);
    free(img);
    free(h);
}

/* ---- index --------------------------------------------------------------------------- */

static void expect_bad_index_at(int line, const char *text, const char *n1, const char *n2)
{
    ws_st_index *x = (ws_st_index *)1;
    ws_status rc = ws_st_index_parse(text, strlen(text), "m.index.json", &x);
    const char *msg = ws_errmsg();
    if (rc != WS_ERR_FORMAT || x != NULL || !strstr(msg, "safetensors index 'm.index.json'") ||
        (n1 && !strstr(msg, n1)) || (n2 && !strstr(msg, n2))) {
        fprintf(stderr, "line %d: index %s: expected FORMAT with [%s] [%s], got %s: %s\n", line,
                text, n1 ? n1 : "", n2 ? n2 : "", ws_status_name(rc), msg);
        check_case_failed_ = 1;
    }
    if (rc == WS_OK) ws_st_index_free(x);
}
#define expect_bad_index(t, n1, n2) expect_bad_index_at(__LINE__, (t), (n1), (n2))

static void test_index_rules(void)
{
    expect_bad_index("", "not valid JSON", NULL);
    expect_bad_index("{\"weight_map\": {}", "not valid JSON", NULL);
    expect_bad_index("{} {}", "bytes after the JSON value", NULL);
    expect_bad_index("[]", "must be a JSON object", NULL);
    expect_bad_index("{\"metadata\": {}}", "\"weight_map\" must be an object", NULL);
    expect_bad_index("{\"weight_map\": [\"a\"]}", "\"weight_map\" must be an object", NULL);
    expect_bad_index("{\"weight_map\": {}, \"metadata\": 3}", "\"metadata\" must be an object",
                     NULL);
    expect_bad_index("{\"weight_map\": {\"w\": 1}}", "tensor 'w'", "maps to something else");
    expect_bad_index("{\"weight_map\": {\"w\": \"../x.safetensors\"}}", "tensor 'w'",
                     "file name '../x.safetensors' must be a plain name");
    expect_bad_index("{\"weight_map\": {\"w\": \"/etc/passwd\"}}", "tensor 'w'", "plain name");
    expect_bad_index("{\"weight_map\": {\"w\": \"..\"}}", "tensor 'w'", "plain name");
    expect_bad_index("{\"weight_map\": {\"w\": \"\"}}", "tensor 'w'", "plain name");
    expect_bad_index("{\"weight_map\": {\"w\": \"a\", \"v\": \"b\", \"w\": \"a\"}}",
                     "tensor 'w': the name appears twice", NULL);

    const char *text = "{\"metadata\": {\"total_size\": 123, \"note\": \"hi\"},\n"
                       " \"weight_map\": {\"b\": \"s2\", \"a\": \"s1\", \"c\": \"s2\"}}\n";
    ws_st_index *x = NULL;
    CHECK_OK(ws_st_index_parse(text, strlen(text), "m.index.json", &x));
    if (!x) return;
    CHECK(ws_st_index_count(x) == 3);
    CHECK(strcmp(ws_st_index_name(x, 0), "b") == 0 && strcmp(ws_st_index_name(x, 2), "c") == 0);
    CHECK(ws_st_index_file_count(x) == 2);
    CHECK(strcmp(ws_st_index_file(x, 0), "s2") == 0 && strcmp(ws_st_index_file(x, 1), "s1") == 0);
    CHECK(ws_st_index_file_of(x, 1) == 1 && ws_st_index_file_of(x, 2) == 0);
    size_t i = 99;
    CHECK(ws_st_index_find(x, "c", &i) && i == 2);
    CHECK(!ws_st_index_find(x, "d", &i));
    CHECK(ws_st_index_metadata_count(x) == 2);
    CHECK(strcmp(ws_st_index_metadata_key(x, 0), "total_size") == 0);
    CHECK(strcmp(ws_st_index_metadata_value(x, 0), "123") == 0);
    CHECK(strcmp(ws_st_index_metadata_value(x, 1), "hi") == 0);
    ws_st_index_free(x);
}

/* ---- files and checkpoints ------------------------------------------------------------- */

static char tmpdir[256];

static void write_file(const char *name, const void *bytes, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *fp = fopen(path, "wb");
    CHECK(fp != NULL);
    if (!fp) return;
    CHECK(fwrite(bytes, 1, n, fp) == n);
    fclose(fp);
}

static void write_st(const char *name, const char *header, size_t data)
{
    size_t size;
    unsigned char *img = image(header, data, &size);
    write_file(name, img, size);
    free(img);
}

static void write_text(const char *name, const char *text) { write_file(name, text, strlen(text)); }

static char *path_of(const char *name)
{
    static char path[4][512];
    static int next;
    char *p = path[next++ % 4];
    snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}

static void test_open_file(void)
{
    mkdir(path_of("one"), 0755);
    write_st("one/model.safetensors",
             "{\"w\": {\"dtype\": \"U8\", \"shape\": [2, 3], \"data_offsets\": [0, 6]}}", 6);
    ws_st_file *f = NULL;
    CHECK_OK(ws_st_open(path_of("one/model.safetensors"), &f));
    if (f) {
        ws_tensor t;
        CHECK_OK(ws_st_tensor(f, ws_st_find(f, "w"), &t));
        size_t dsize;
        const unsigned char *d = ws_st_data(f, &dsize);
        void *p;
        CHECK_OK(ws_tensor_access(&t, WS_ACCESS_READ, "test", &p));
        CHECK(p == d && dsize == 6); /* inside the mapping: no copy */
        char want[600];
        snprintf(want, sizeof want, "tensor 'w' is read-only (mapped from '%s')",
                 path_of("one/model.safetensors"));
        CHECK_ERR(ws_tensor_set(&t, 0, 1.0), WS_ERR_ARG, want);
        ws_st_unref(f); /* the mapping stays while the tensor lives */
        double v;
        CHECK_OK(ws_tensor_get(&t, 5, &v));
        CHECK(v == 36.0);
        ws_tensor_free(&t);
    }
    CHECK_ERR(ws_st_open(path_of("one/absent.safetensors"), &f), WS_ERR_IO,
              "absent.safetensors': cannot open: No such file or directory");
    CHECK_ERR(ws_st_open(path_of("one"), &f), WS_ERR_IO, "not a regular file");
    write_file("one/short.safetensors", "abc", 3);
    CHECK_ERR(ws_st_open(path_of("one/short.safetensors"), &f), WS_ERR_FORMAT,
              "short.safetensors': the file is 3 bytes");
    write_st("one/bad.safetensors",
             "{\"w\": {\"dtype\": \"F64\", \"shape\": [1], \"data_offsets\": [0, 8]}}", 8);
    CHECK_ERR(ws_st_open(path_of("one/bad.safetensors"), &f), WS_ERR_FORMAT,
              "bad.safetensors': tensor 'w': dtype 'F64' is not supported");
    CHECK(f == NULL);

    /* The directory and the file itself open as one-file checkpoints. */
    ws_ckpt *c = NULL;
    CHECK_OK(ws_ckpt_open(path_of("one"), &c));
    if (c) {
        CHECK(ws_ckpt_count(c) == 1 && ws_ckpt_file_count(c) == 1);
        CHECK(strcmp(ws_ckpt_file_name(c, 0), "model.safetensors") == 0);
        CHECK(strcmp(ws_ckpt_path(c), path_of("one")) == 0);
        size_t j = 9;
        const ws_st_entry *e = ws_ckpt_find(c, "w", &j);
        CHECK(e && j == 0 && e->shape[1] == 3);
        CHECK(ws_ckpt_metadata_count(c) == 0);
        ws_ckpt_free(c);
    }
    CHECK_OK(ws_ckpt_open(path_of("one/model.safetensors"), &c));
    ws_ckpt_free(c);
    mkdir(path_of("empty"), 0755);
    CHECK_ERR(ws_ckpt_open(path_of("empty"), &c), WS_ERR_IO,
              "holds neither model.safetensors.index.json nor model.safetensors");
    CHECK_ERR(ws_ckpt_open(path_of("nowhere"), &c), WS_ERR_IO, "nowhere': cannot open");
    CHECK(c == NULL);
}

static void test_sharded_checkpoint(void)
{
    mkdir(path_of("sh"), 0755);
    write_text("sh/model.safetensors.index.json",
               "{\"metadata\": {\"total_size\": 14},\n \"weight_map\": {\n"
               "  \"layers.1.w\": \"model-00002-of-00002.safetensors\",\n"
               "  \"layers.0.w\": \"model-00001-of-00002.safetensors\",\n"
               "  \"layers.0.b\": \"model-00001-of-00002.safetensors\"}}\n");
    write_st("sh/model-00001-of-00002.safetensors",
             "{\"layers.0.w\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]},"
             " \"layers.0.b\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [4, 6]},"
             " \"extra\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [6, 7]}}", 7);
    write_st("sh/model-00002-of-00002.safetensors",
             "{\"layers.1.w\": {\"dtype\": \"I32\", \"shape\": [2], \"data_offsets\": [0, 8]}}",
             8);
    ws_ckpt *c = NULL;
    CHECK_OK(ws_ckpt_open(path_of("sh"), &c));
    if (c) {
        CHECK(ws_ckpt_count(c) == 3 && ws_ckpt_file_count(c) == 2); /* each shard once */
        CHECK(strcmp(ws_ckpt_name(c, 0), "layers.1.w") == 0); /* index order */
        CHECK(strcmp(ws_ckpt_name(c, 2), "layers.0.b") == 0);
        CHECK(strcmp(ws_ckpt_file_name(c, 0), "model-00002-of-00002.safetensors") == 0);
        size_t j = 9;
        const ws_st_entry *e = ws_ckpt_find(c, "layers.0.b", &j);
        CHECK(e && j == 1 && e->begin == 4);
        CHECK(ws_ckpt_find(c, "extra", &j) == NULL); /* not in the index */
        CHECK(ws_ckpt_metadata_count(c) == 1);
        CHECK(strcmp(ws_ckpt_metadata_value(c, 0), "14") == 0);
        ws_tensor t;
        CHECK_OK(ws_ckpt_tensor(c, "layers.0.b", &t));
        ws_ckpt_free(c); /* the tensor keeps its shard */
        double v;
        CHECK_OK(ws_tensor_get(&t, 1, &v));
        CHECK(v == 36.0); /* byte 5 of the pattern */
        ws_tensor_free(&t);
    }
    /* The index file itself. */
    CHECK_OK(ws_ckpt_open(path_of("sh/model.safetensors.index.json"), &c));
    if (c) {
        ws_tensor t;
        char want[600];
        snprintf(want, sizeof want, "safetensors checkpoint '%s' has no tensor 'nope'",
                 path_of("sh/model.safetensors.index.json"));
        CHECK_ERR(ws_ckpt_tensor(c, "nope", &t), WS_ERR_ARG, want);
        ws_ckpt_free(c);
    }

    /* A missing shard names the shard and a tensor listed in it. */
    mkdir(path_of("miss"), 0755);
    write_text("miss/model.safetensors.index.json",
               "{\"weight_map\": {\"a\": \"s1.safetensors\", \"b\": \"s2.safetensors\"}}");
    write_st("miss/s1.safetensors",
             "{\"a\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1);
    CHECK_ERR(ws_ckpt_open(path_of("miss"), &c), WS_ERR_IO,
              "shard 's2.safetensors' (listed in the index for tensor 'b')");
    CHECK(strstr(ws_errmsg(), "No such file or directory") != NULL);
    /* A tensor the index lists but its shard lacks. */
    write_st("miss/s2.safetensors",
             "{\"c\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1);
    CHECK_ERR(ws_ckpt_open(path_of("miss"), &c), WS_ERR_FORMAT,
              "tensor 'b' is listed in the index for shard 's2.safetensors', which does not "
              "hold it");
    /* A malformed shard: its own message, after the shard and tensor. */
    write_st("miss/s2.safetensors",
             "{\"b\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 1]}}", 1);
    CHECK_ERR(ws_ckpt_open(path_of("miss"), &c), WS_ERR_FORMAT,
              "s2.safetensors': tensor 'b': data_offsets [0, 1] span 1 bytes, but u8[2] needs 2");
    write_text("miss/model.safetensors.index.json", "{\"weight_map\": {\"a\": \"../s1\"}}");
    CHECK_ERR(ws_ckpt_open(path_of("miss"), &c), WS_ERR_FORMAT, "must be a plain name");
    CHECK(c == NULL);
}

/* Random damage to valid images: every result is a clean parse or one
 * format error; the sanitizer builds check that nothing is read out of
 * bounds and nothing leaks. */
static void test_mutations_never_crash(void)
{
    const char *h = "{\"__metadata__\": {\"format\": \"pt\"},"
                    " \"a\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 16]},"
                    " \"b\": {\"dtype\": \"BF16\", \"shape\": [3], \"data_offsets\": [16, 22]}}";
    size_t size;
    unsigned char *base = image(h, 22, &size);
    unsigned char *img = malloc(size);
    uint64_t s = 0x243F6A8885A308D3ull;
    int ok = 0, bad = 0;
    for (int iter = 0; iter < 20000; iter++) {
        memcpy(img, base, size);
        int flips = 1 + (int)(iter % 4);
        for (int k = 0; k < flips; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            size_t at = (size_t)(s >> 33) % size;
            const char pool[] = "{}[]\",:0123456789-.eE \\u\x00\xff";
            img[at] = (s >> 20) & 1 ? (unsigned char)pool[(s >> 40) % (sizeof pool - 1)]
                                    : (unsigned char)(s >> 48);
        }
        size_t n = (s >> 8) % 8 ? size : (size_t)(s >> 13) % (size + 1); /* sometimes cut */
        ws_st_file *f = NULL;
        ws_status rc = ws_st_parse(img, n, "fuzz", &f);
        if (rc == WS_OK) {
            ok++;
            for (size_t i = 0; i < ws_st_count(f); i++) {
                ws_tensor t;
                if (ws_st_tensor(f, ws_st_entry_at(f, i), &t) != WS_OK) continue;
                uint64_t sum;
                CHECK_OK(ws_tensor_checksum(&t, 0, t.dtype, &sum));
                ws_tensor_free(&t);
            }
            ws_st_unref(f);
        } else {
            bad++;
            CHECK(rc == WS_ERR_FORMAT && f == NULL && strstr(ws_errmsg(), "'fuzz'"));
        }
        ws_st_index *x = NULL;
        if (ws_st_index_parse((const char *)img + 8, n > 8 ? n - 8 : 0, "fuzz", &x) == WS_OK)
            ws_st_index_free(x);
    }
    CHECK(ok > 0 && bad > 0);
    free(img);
    free(base);
}

static void remove_tree(void)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    CHECK(system(cmd) == 0);
}

int main(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/ws_st_XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(test_file_level_rules);
    RUN(test_entry_rules);
    RUN(test_valid_layouts);
    RUN(test_values_zero_copy_read_only);
    RUN(test_external_storage);
    RUN(test_many_tensors_lookup);
    RUN(test_index_rules);
    RUN(test_open_file);
    RUN(test_sharded_checkpoint);
    RUN(test_mutations_never_crash);
    remove_tree();
    return check_summary();
}
